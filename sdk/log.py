"""edgepack's messages: one :mod:`logging` hierarchy and progress bars that respect the terminal.

Every module logs to a child of the ``edgepack`` logger (:func:`get_logger`);
library code never configures logging: the ``edgepack`` command does
(:func:`configure`), a program using the SDK configures its own handlers, and
without any only warnings reach stderr (Python's last-resort handler).

:func:`progress` is the one progress display: a tqdm bar when stderr is a
terminal (tqdm's ``disable=None``), otherwise no bar and one ``INFO`` line per
stage when it ends (``calibrating: 16 batches in 0.41 s`` on ``edgepack.progress``), so
a log file holds no carriage-return spam.  Setting the ``edgepack`` logger to
``WARNING`` or above (the CLI's ``--quiet``) turns the bars off too.

>>> import logging
>>> from sdk.log import progress
>>> sum(progress(range(3), desc="adding", unit="item"))
3
>>> logging.getLogger("edgepack").setLevel(logging.WARNING)    # silence edgepack's bars and stage lines
>>> logging.getLogger("edgepack").setLevel(logging.NOTSET)
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
import threading
import time
from typing import Iterable, Iterator

__all__ = ["configure", "configured", "get_logger", "progress", "quiet_stderr"]

ROOT = "edgepack"

_progress_log = logging.getLogger(f"{ROOT}.progress")


def get_logger(name: str) -> logging.Logger:
    """The logger ``edgepack.<name>`` (``name`` may be a module's ``__name__``: ``sdk.`` is dropped).

    >>> get_logger("sdk.calibrate").name
    'edgepack.calibrate'
    """
    name = name[len("sdk."):] if name.startswith("sdk.") else "" if name == "sdk" else name
    return logging.getLogger(f"{ROOT}.{name}" if name else ROOT)


def _bars_silenced() -> bool:
    # an explicit level on the edgepack logger above INFO (the CLI's --quiet) means "no progress at all"
    level = logging.getLogger(ROOT).level
    return level > logging.INFO


def _plural(unit: str, n: int) -> str:
    if n == 1 or not unit.isalpha():
        return unit
    return unit + ("es" if unit.endswith(("s", "sh", "ch", "x")) else "s")


class _Stage:
    """A tqdm bar, or (bar disabled) a counter that logs one line when the stage ends."""

    def __init__(self, iterable, total, desc, unit, enabled, leave, **tqdm_kwargs):
        self.desc, self.unit, self.n, self.t0 = desc, unit, 0, time.perf_counter()
        self.iterable, self.postfix = iterable, {}
        self.bar = None
        if enabled and not _bars_silenced():
            from tqdm.auto import tqdm

            # disable=None: tqdm shows the bar only when its stream (stderr) is a terminal; a notebook's
            # widget bar (what tqdm.auto picks under Jupyter, whose streams are no terminal) always shows
            notebook = any(c.__module__ == "tqdm.notebook" for c in tqdm.__mro__)
            bar = tqdm(iterable, total=total, desc=desc, unit=unit, disable=False if notebook else None,
                       leave=leave, **tqdm_kwargs)
            if not bar.disable:
                self.bar = bar
            else:
                bar.close()
        self.enabled = enabled

    def __iter__(self) -> Iterator:
        if self.bar is not None:
            yield from self.bar
            return
        try:
            for item in self.iterable:
                self.n += 1
                yield item
        finally:
            self.close()

    def update(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)
        else:
            self.n += n

    def set_postfix(self, **kwargs) -> None:
        self.postfix = kwargs
        if self.bar is not None:
            self.bar.set_postfix(**kwargs)

    def set_description_str(self, desc: str) -> None:
        if self.bar is not None:
            self.bar.set_description_str(desc)
        elif self.enabled:
            _progress_log.info("%s", desc)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            return
        if self.enabled and self.t0 is not None:
            extra = "".join(f", {k} {v}" for k, v in self.postfix.items())
            _progress_log.info("%s: %d %s in %.2f s%s", self.desc, self.n, _plural(self.unit, self.n),
                               time.perf_counter() - self.t0, extra)
        self.t0 = None          # log the stage once

    def __enter__(self) -> "_Stage":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is not None and self.bar is None:
            self.t0 = None      # a stage that failed says so through its exception, not a "done" line
        self.close()


def progress(iterable: Iterable | None = None, *, desc: str, unit: str = "it", total: int | None = None,
             enabled: bool = True, leave: bool = False, **tqdm_kwargs) -> _Stage:
    """Iterate ``iterable`` (or count with ``.update()``) showing progress: a tqdm bar on a terminal,
    else one ``edgepack.progress`` INFO line when the stage ends.  ``enabled=False`` shows and logs
    nothing (the ``progress=False`` of SDK functions).  Use it as a context manager or iterate it.

    >>> with progress(total=2, desc="steps", unit="step", enabled=False) as bar:
    ...     bar.update(2)
    """
    return _Stage(iterable, total, desc, unit, enabled, leave, **tqdm_kwargs)


class _StageFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        return f"edgepack: {text}" if record.levelno < logging.WARNING else \
            f"edgepack: {record.levelname.lower()}: {text}"


def configure(verbosity: int = 0, stream=None) -> logging.Handler:
    """Give the ``edgepack`` logger one stderr handler (the ``edgepack`` command calls this; a library
    never should).  ``verbosity``: -1 warnings only and no progress bars (``--quiet``), 0 stage lines
    (INFO), 1 debug messages too (``--verbose``).  Calling it again replaces the handler."""
    root = logging.getLogger(ROOT)
    for h in [h for h in root.handlers if getattr(h, "_edgepack_cli", False)]:
        root.removeHandler(h)
    handler = logging.StreamHandler(stream or sys.stderr)
    handler._edgepack_cli = True
    handler.setFormatter(_StageFormatter("%(message)s"))
    root.addHandler(handler)
    root.setLevel(logging.WARNING if verbosity < 0 else logging.INFO if verbosity == 0 else logging.DEBUG)
    root.propagate = False
    return handler


@contextlib.contextmanager
def configured(verbosity: int = 0, stream=None):
    """:func:`configure` for the length of a block, then the ``edgepack`` logger as it was (the CLI's
    ``main()`` runs in-process too: in tests, notebooks)."""
    root = logging.getLogger(ROOT)
    saved = root.handlers[:], root.level, root.propagate
    configure(verbosity, stream)
    try:
        yield
    finally:
        root.handlers[:], root.level, root.propagate = saved[0], saved[1], saved[2]


_fd_lock = threading.Lock()


@contextlib.contextmanager
def quiet_stderr(drop: tuple[str, ...]):
    """Run the block with file descriptor 2 (C-level stderr) sent to a temporary file, then write
    back every line that does not start with one of ``drop``: the way to silence a C++ runtime's
    fixed banner (LiteRT's "INFO: Created TensorFlow Lite XNNPACK delegate for CPU.") without losing
    the real errors it prints.  Python's ``sys.stderr`` writes in the block are flushed first and
    kept.  Serialised: fd 2 belongs to the whole process."""
    with _fd_lock:
        try:
            sys.stderr.flush()
            saved = os.dup(2)
        except (OSError, ValueError, AttributeError):     # no real fd 2 (embedded interpreters): leave it
            yield
            return
        with tempfile.TemporaryFile() as tmp:
            os.dup2(tmp.fileno(), 2)
            try:
                yield
            finally:
                with contextlib.suppress(OSError, ValueError, AttributeError):
                    sys.stderr.flush()
                os.dup2(saved, 2)
                os.close(saved)
                tmp.seek(0)
                kept = [line for line in tmp.read().decode(errors="replace").splitlines(keepends=True)
                        if not line.startswith(drop)]
                if kept:
                    sys.stderr.write("".join(kept))
                    sys.stderr.flush()
