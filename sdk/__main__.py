"""``python -m sdk`` is the ``edgepack`` command."""

from .cli import main

raise SystemExit(main())
