"""The artifact: a directory with the packed model, a manifest and a profile.

::

    out/model/
      manifest.json   format, versions, target, plugins, I/O signature, sha256 of every file
      profile.json    per-layer op, shapes, params, bytes, MACs; totals; measured latency
      golden.npz      example inputs and the float model's outputs on them
      model.tflite    (arm-int8 / arm-fp32 / fp16-gpu) or model.c + model.h + weights.bin

Writing goes to a hidden staging directory beside ``output`` that is renamed
into place only when everything is written, so a failed deploy leaves nothing
at ``output``.  :func:`load` checks the format, the version and every hash.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from .base import TensorSig
from .errors import ArtifactError, InputError

FORMAT = "edgepack-artifact"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
PROFILE = "profile.json"
GOLDEN = "golden.npz"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Staging:
    """A hidden directory beside ``output`` that becomes the artifact on :meth:`commit`.

    Use as a context manager: leaving the block with an exception removes it.
    """

    def __init__(self, output: str | os.PathLike | None):
        if output is None:
            output = Path(tempfile.mkdtemp(prefix="edgepack-")) / "artifact"
        self.output = Path(output).absolute()
        if self.output.exists() and not self.output.is_dir():
            raise ArtifactError(f"output {self.output} exists and is not a directory")
        if self.output.is_dir() and any(self.output.iterdir()) and not (self.output / MANIFEST).is_file():
            raise ArtifactError(f"output {self.output} is a non-empty directory that is not an edgepack "
                                "artifact; choose another path or empty it")
        self.output.parent.mkdir(parents=True, exist_ok=True)
        self.path = Path(tempfile.mkdtemp(prefix=f".{self.output.name}.staging-", dir=self.output.parent))
        self.files: dict[str, bytes] = {}

    def __enter__(self) -> "Staging":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.path.exists():
            shutil.rmtree(self.path, ignore_errors=True)

    def add(self, name: str, data: bytes) -> Path:
        if "/" in name or name in (MANIFEST,) or name.startswith("."):
            raise ArtifactError(f"invalid artifact file name {name!r}")
        p = self.path / name
        p.write_bytes(data)
        self.files[name] = data
        return p

    def commit(self, manifest: dict) -> Path:
        """Write ``manifest.json`` with the hashes and move the directory into place."""
        manifest = dict(manifest)
        manifest["files"] = {n: {"sha256": sha256(d), "bytes": len(d)} for n, d in sorted(self.files.items())}
        (self.path / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
        old = None
        if self.output.exists():
            old = self.output.with_name(f".{self.output.name}.old-{os.getpid()}-{time.monotonic_ns()}")
            self.output.rename(old)
        self.path.rename(self.output)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return self.output


def save_npz(arrays: dict[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


class Artifact:
    """A packed model on disk.  Made by :func:`sdk.deploy` or :func:`sdk.load`.

    >>> art = sdk.load("out/model")                     # doctest: +SKIP
    >>> art.run(x)[0].shape                             # doctest: +SKIP
    (1, 10)
    """

    def __init__(self, path: str | os.PathLike, manifest: dict, profile: dict):
        self.path = Path(path)
        self.manifest = manifest
        self.profile = profile
        self._sessions: dict[str, Callable] = {}

    # -- description -----------------------------------------------------
    @property
    def target(self) -> str:
        return self.manifest["target"]["name"]

    @property
    def inputs(self) -> list[TensorSig]:
        return [TensorSig.from_dict(d) for d in self.manifest["inputs"]]

    @property
    def outputs(self) -> list[TensorSig]:
        return [TensorSig.from_dict(d) for d in self.manifest["outputs"]]

    @property
    def signature(self) -> list[tuple[str, tuple[int, ...], str]]:
        return [(t.name, t.shape, t.dtype) for t in self.inputs]

    def file(self, name: str) -> Path:
        """Path of one of the artifact's files."""
        if name not in self.manifest.get("files", {}) and not (self.path / name).is_file():
            raise ArtifactError(f"artifact {self.path} has no file {name!r}")
        return self.path / name

    def golden(self) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """``(inputs, float_outputs)`` recorded at deploy time."""
        with np.load(self.path / GOLDEN) as z:
            ins = [z[f"input_{i}"] for i in range(len(self.manifest["inputs"]))]
            outs = [z[f"output_{i}"] for i in range(len(self.manifest["outputs"]))]
        return ins, outs

    def __repr__(self) -> str:
        return f"Artifact({str(self.path)!r}, target={self.target!r})"

    # -- running -----------------------------------------------------------
    def runner_names(self) -> list[str]:
        from . import plugins

        return plugins.runners_for(self.target)

    def session(self, runner: str | None = None) -> Callable[[list[np.ndarray]], list[np.ndarray]]:
        """The loaded runner for this artifact (cached): a function inputs → outputs."""
        from . import plugins
        from .errors import ToolchainError

        runner = runner or self.manifest["target"].get("default_runner", "host")
        if runner not in self._sessions:
            cls = plugins.get_runner(runner, self.target)
            inst = cls()
            reason = inst.unavailable()
            if reason:
                raise ToolchainError(f"runner {runner!r} cannot run here: {reason}")
            self._sessions[runner] = inst.open(self)
        return self._sessions[runner]

    def run(self, *inputs: Any, runner: str | None = None) -> list[np.ndarray]:
        """Run one call; returns the float (dequantized) outputs as numpy arrays."""
        from .data import as_inputs

        if len(inputs) == 1 and isinstance(inputs[0], (tuple, list)):
            inputs = tuple(inputs[0])
        if not inputs:
            raise InputError("art.run() needs the model's input(s)")
        return self.session(runner)(as_inputs(inputs, self.signature))

    def verify(self, model: Any = None, inputs: Sequence | None = None, runners: Sequence[str] | None = None,
               **kwargs: Any):
        """Run the artifact in ``runners`` and compare; see :func:`sdk.verify.verify`."""
        from .verify import verify

        return verify(self, model, inputs, runners, **kwargs)


def load(path: str | os.PathLike) -> Artifact:
    """Open an artifact directory, checking format, version and every file's sha256.

    Raises :class:`ArtifactError` for a missing, damaged, foreign or too-new artifact.
    """
    path = Path(path)
    mpath = path / MANIFEST
    if not path.is_dir():
        raise ArtifactError(f"no artifact at {path}: not a directory")
    if not mpath.is_file():
        raise ArtifactError(f"{path} is not an edgepack artifact: it has no {MANIFEST}")
    try:
        manifest = json.loads(mpath.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{mpath} is damaged: not valid JSON ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ArtifactError(f"{path} is not an edgepack artifact (format {manifest.get('format')!r}"
                            if isinstance(manifest, dict) else f"{mpath} is damaged: not a JSON object")
    version = manifest.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ArtifactError(f"{path} has artifact format version {version!r}; this edgepack reads up to "
                            f"{FORMAT_VERSION}: upgrade edgepack")
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise ArtifactError(f"{mpath} is damaged: no file list")
    for name, meta in files.items():
        fpath = path / name
        if not fpath.is_file():
            raise ArtifactError(f"artifact {path} is missing {name}")
        if sha256(fpath.read_bytes()) != meta.get("sha256"):
            raise ArtifactError(f"artifact {path} is damaged: {name} does not match its sha256 in {MANIFEST}; "
                                "deploy again or restore the file")
    extra = sorted(p.name for p in path.iterdir() if p.name != MANIFEST and p.name not in files)
    if extra:
        raise ArtifactError(f"artifact {path} holds file(s) its manifest does not list: {', '.join(extra)}")
    for key in ("target", "inputs", "outputs"):
        if key not in manifest:
            raise ArtifactError(f"{mpath} is damaged: no {key!r}")
    try:
        profile = json.loads((path / PROFILE).read_text()) if PROFILE in files else {}
    except ValueError as exc:
        raise ArtifactError(f"{path / PROFILE} is damaged: {exc}") from None
    return Artifact(path, manifest, profile)
