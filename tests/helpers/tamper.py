"""What a sender who knows the format does to an artifact: change a file and rewrite
its manifest entry (sha256 and size) to match, so that ``sdk.load``'s hash check passes."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path


def rewrite(directory: Path, name: str, data: bytes | None) -> None:
    """Write ``data`` as ``name`` in the artifact ``directory`` (None: delete the file) and
    rewrite the manifest to match."""
    directory = Path(directory)
    manifest = json.loads((directory / "manifest.json").read_text())
    if data is None:
        (directory / name).unlink()
        del manifest["files"][name]
    else:
        (directory / name).write_bytes(data)
        manifest["files"][name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    (directory / "manifest.json").write_text(json.dumps(manifest, indent=1))


def rehash(directory: Path, name: str) -> None:
    """Rewrite the manifest entry of ``name`` to match the file as it is now."""
    rewrite(directory, name, (Path(directory) / name).read_bytes())
