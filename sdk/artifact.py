"""The artifact: a directory with the packed model, a manifest and a profile.

::

    out/model/
      manifest.json   format, versions, target, plugins, I/O signature, sha256 of every file
      profile.json    per-layer op, shapes, params, bytes, MACs; totals; measured latency
      golden.npz      example inputs and the float model's outputs on them
      model.tflite    (arm-int8 / arm-fp32 / fp16-gpu) or model.c + model.h + weights.bin

Writing goes to a hidden staging directory beside ``output`` that is renamed
into place only when everything is written, so a failed deploy leaves nothing
at ``output``; an existing artifact is replaced only when asked, in one atomic
exchange, and nothing else is ever deleted.  :func:`load` checks the manifest
and profile against a strict schema, confines files to the directory, checks
sizes before reading and every sha256, and optionally a keyed signature.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import shutil
import stat
import tempfile
import threading
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from .contract import FORMAT, FORMAT_VERSION, GOLDEN, MANIFEST, PROFILE, TensorSig
from .errors import ArtifactError, InputError
from .schema import check_file_name, check_manifest, check_profile
from .signing import SIGNATURE, check_signature

MAX_MANIFEST_BYTES = 8 << 20


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


_STAGING_INFIX, _LOCK_SUFFIX = ".staging-", ".lock"


def check_output(output: Path, overwrite: bool) -> None:
    """Refuse an ``output`` that is not ours to replace: anything but a missing path,
    an empty directory, or (with ``overwrite``) an artifact :func:`load` accepts.

    Called before any slow work and again, under the lock, just before commit."""
    if output.is_symlink():
        raise ArtifactError(f"output {output} is a symbolic link; give the directory it points to, or "
                            "another path")
    if not output.exists():
        return
    if not output.is_dir():
        raise ArtifactError(f"output {output} exists and is not a directory; choose another path")
    if not any(output.iterdir()):
        return
    try:
        load(output)
    except ArtifactError as exc:
        raise ArtifactError(f"output {output} is a non-empty directory that is not an edgepack artifact "
                            f"({exc}); edgepack never deletes it: choose another path or empty it") from None
    if not overwrite:
        raise ArtifactError(f"output {output} already holds an edgepack artifact; pass overwrite=True "
                            "(edgepack deploy --force) to replace it")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _exchange(a: Path, b: Path) -> bool:
    """Swap two directory entries in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``);
    False where the system cannot."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(b))


class Staging:
    """A hidden directory beside ``output`` that becomes the artifact on :meth:`commit`.

    Use as a context manager: leaving the block with an exception removes it.
    While it exists it holds an exclusive lock (``.<name>.lock`` beside
    ``output``), so a second deploy to the same output fails at once with
    :class:`ArtifactError`; staging directories that dead processes left
    behind are removed when the lock is taken.  :meth:`commit` checks
    ``output`` (:func:`check_output`) under that lock; :func:`sdk.deploy` also
    checks it before any slow work.
    """

    def __init__(self, output: str | os.PathLike | None, overwrite: bool = False):
        if output is None:
            output = Path(tempfile.mkdtemp(prefix="edgepack-")) / "artifact"
        self.output = Path(output).absolute()
        self.overwrite = overwrite
        try:
            self.output.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ArtifactError(f"cannot create the directory for output {self.output}: "
                                f"{exc.strerror or exc}") from None
        self._lock_fd = self._lock()
        try:
            self._remove_stale()
            self.path = Path(tempfile.mkdtemp(prefix=f".{self.output.name}{_STAGING_INFIX}{os.getpid()}-",
                                              dir=self.output.parent))
        except OSError as exc:
            self._unlock()
            raise ArtifactError(f"cannot write beside output {self.output}: {exc.strerror or exc}") from None
        self.files: dict[str, bytes] = {}

    # -- locking -------------------------------------------------------------
    def _lock(self) -> int:
        import fcntl

        lock_path = self.output.with_name(f".{self.output.name}{_LOCK_SUFFIX}")
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise ArtifactError(f"cannot write beside output {self.output}: {exc.strerror or exc}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            # the file may have been unlinked by its previous holder between our open and flock
            if os.fstat(fd).st_ino != os.stat(lock_path).st_ino:
                raise BlockingIOError
        except (BlockingIOError, FileNotFoundError):
            os.close(fd)
            raise ArtifactError(f"another deploy is writing {self.output} right now; wait for it to finish "
                                "or choose another output") from None
        self._lock_path = lock_path
        return fd

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            try:
                os.unlink(self._lock_path)
            except OSError:
                pass
            os.close(self._lock_fd)
            self._lock_fd = None

    def _remove_stale(self) -> None:
        prefix = f".{self.output.name}{_STAGING_INFIX}"
        for p in self.output.parent.iterdir():
            if not p.name.startswith(prefix) or p.is_symlink() or not p.is_dir():
                continue
            pid = p.name[len(prefix):].split("-", 1)[0]
            if pid.isdigit() and not _pid_alive(int(pid)):
                shutil.rmtree(p, ignore_errors=True)

    # -- writing ---------------------------------------------------------------
    def __enter__(self) -> "Staging":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.path.exists():
            shutil.rmtree(self.path, ignore_errors=True)
        self._unlock()

    def add(self, name: str, data: bytes) -> Path:
        if name == MANIFEST or name == SIGNATURE:
            raise ArtifactError(f"invalid artifact file name {name!r}")
        check_file_name(name, "artifact file")
        p = self.path / name
        p.write_bytes(data)
        self.files[name] = data
        return p

    def file_table(self) -> dict[str, dict]:
        """The manifest's ``files`` section for what has been added so far."""
        return {n: {"sha256": sha256(d), "bytes": len(d)} for n, d in sorted(self.files.items())}

    def commit(self, manifest: dict) -> Path:
        """Write ``manifest.json`` with the hashes and move the directory into place.

        ``output`` is never absent: a new one appears with one rename, an old one
        is swapped with the new in one atomic exchange (where the system has
        ``renameat2``; elsewhere two renames) and then removed."""
        manifest = dict(manifest)
        manifest["files"] = self.file_table()
        (self.path / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
        _fsync_tree(self.path)
        check_output(self.output, self.overwrite)
        try:
            if not self.output.exists():
                os.rename(self.path, self.output)
            elif _exchange(self.path, self.output):
                shutil.rmtree(self.path, ignore_errors=True)     # the old artifact, now at the staging name
            else:
                old = self.path.with_name(self.path.name + "-old")
                os.rename(self.output, old)
                os.rename(self.path, self.output)
                shutil.rmtree(old, ignore_errors=True)
        except OSError as exc:
            raise ArtifactError(f"could not move the new artifact into {self.output}: "
                                f"{exc.strerror or exc}") from None
        _fsync_dir(self.output.parent)
        return self.output


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    for p in path.iterdir():
        with open(p, "rb") as f:
            os.fsync(f.fileno())
    _fsync_dir(path)


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
        self._sessions_lock = threading.Lock()
        #: early-exit cascades: the last ``run``'s :class:`sdk.early_exit_artifact.CascadeRun` (exit stage and
        #: MACs per input); ``sdk.early_exit_artifact.run(art, x)`` returns it without keeping it
        self.last_run_info = None

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
        if name not in self.manifest.get("files", {}):
            raise ArtifactError(f"artifact {self.path} has no file {name!r}")
        return self.path / name

    def read_bytes(self, name: str) -> bytes:
        """The bytes of one of the artifact's files, checked again against the manifest's
        size and sha256 (the file may have changed since :func:`load` checked it)."""
        meta = self.manifest.get("files", {}).get(name)
        if meta is None:
            raise ArtifactError(f"artifact {self.path} has no file {name!r}")
        data = _read_file(self.path, name, meta)
        if data is None or sha256(data) != meta["sha256"]:
            raise ArtifactError(f"artifact {self.path}: {name} changed after it was loaded (it no longer "
                                f"matches its size and sha256 in {MANIFEST}); load the artifact again")
        return data

    def golden(self) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """``(inputs, float_outputs)`` recorded at deploy time."""
        with np.load(io.BytesIO(self.read_bytes(GOLDEN)), allow_pickle=False) as z:
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
        if not isinstance(runner, str):
            raise InputError(f"runner must be a runner name, got {type(runner).__name__}")
        with self._sessions_lock:           # one open per runner, even when threads race here
            if runner not in self._sessions:
                cls = plugins.get_runner(runner, self.target)
                inst = cls()
                reason = inst.unavailable()
                if reason:
                    raise ToolchainError(f"runner {runner!r} cannot run here: {reason}")
                self._sessions[runner] = inst.open(self)
            return self._sessions[runner]

    def run(self, *inputs: Any, runner: str | None = None) -> list[np.ndarray]:
        """Run one call; returns the float (dequantized) outputs as numpy arrays.  An early-exit
        cascade takes a batch of any size, runs it input by input and keeps where each input
        left in :attr:`last_run_info` (:mod:`sdk.early_exit_artifact`)."""
        from .data import as_inputs

        if len(inputs) == 1 and isinstance(inputs[0], (tuple, list)):
            inputs = tuple(inputs[0])
        if not inputs:
            raise InputError("art.run() needs the model's input(s)")
        if "early_exit" in self.manifest:
            from .early_exit_artifact import run

            self.last_run_info = run(self, *inputs, runner=runner)
            return [self.last_run_info.logits]
        return self.session(runner)(as_inputs(inputs, self.signature))

    def verify(self, model: Any = None, inputs: Sequence | None = None, runners: Sequence[str] | None = None,
               **kwargs: Any):
        """Run the artifact in ``runners`` and compare; see :func:`sdk.verify.verify`."""
        from .verify import verify

        return verify(self, model, inputs, runners, **kwargs)

    def report(self, output: str | os.PathLike | None = None, **kwargs: Any) -> Path:
        """Write a self-contained HTML report of this artifact; see :func:`sdk.report.build_report`
        (needs ``pip install edgepack[report]``).

        >>> art.report("model-report.html", model=net, inputs=[x])     # doctest: +SKIP
        PosixPath('model-report.html')
        """
        from .report import build_report

        return build_report([self], output, **kwargs)


def _read_file(path: Path, name: str, meta: dict) -> bytes | None:
    """The bytes of an artifact file after checking it is a regular file of the listed
    size; ``None`` when it is missing, not regular, or of another size."""
    fpath = path / name
    try:
        st = os.lstat(fpath)
    except OSError:
        return None
    if not stat.S_ISREG(st.st_mode) or st.st_size != meta["bytes"]:
        return None
    try:
        with open(fpath, "rb", buffering=0) as f:
            data = f.read(meta["bytes"] + 1)
    except OSError:
        return None
    return data if len(data) == meta["bytes"] else None


def load(path: str | os.PathLike, verify_key: bytes | str | os.PathLike | None = None) -> Artifact:
    """Open an artifact directory after checking it: the manifest and profile against
    their schema (:mod:`sdk.schema`), every file a plain regular file inside the
    directory of the listed size and sha256, nothing unlisted; with ``verify_key``
    (bytes, or a key file path), also that ``signature.json`` signs the manifest with
    that key (:mod:`sdk.signing`).

    Raises :class:`ArtifactError` for a missing, damaged, foreign, unsigned or too-new artifact.

    >>> art = sdk.load("out/model", verify_key=Path("team.key").read_bytes())   # doctest: +SKIP
    """
    if not isinstance(path, (str, os.PathLike)):
        raise ArtifactError(f"sdk.load() takes the artifact directory's path, got {type(path).__name__}")
    path = Path(path)
    mpath = path / MANIFEST
    if not path.is_dir():
        raise ArtifactError(f"no artifact at {path}: not a directory")
    if mpath.is_symlink() or not mpath.is_file():
        raise ArtifactError(f"{path} is not an edgepack artifact: it has no {MANIFEST}")
    try:
        if mpath.stat().st_size > MAX_MANIFEST_BYTES:
            raise ArtifactError(f"{mpath} is larger than {MAX_MANIFEST_BYTES} bytes: not an edgepack manifest")
        raw = mpath.read_bytes()
        manifest = json.loads(raw)
    except OSError as exc:
        raise ArtifactError(f"cannot read {mpath}: {exc.strerror or exc}") from None
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise ArtifactError(f"{mpath} is damaged: not valid JSON ({exc})") from None
    try:
        check_manifest(manifest, FORMAT, FORMAT_VERSION)
    except ArtifactError as exc:
        raise ArtifactError(f"{path}: {exc}") from None
    if verify_key is not None:
        check_signature(path, raw, verify_key)
    files = manifest["files"]
    contents: dict[str, bytes] = {}
    for name, meta in files.items():
        data = _read_file(path, name, meta)
        if data is None or sha256(data) != meta["sha256"]:
            raise ArtifactError(f"artifact {path} is damaged: {name} is missing or does not match its size and "
                                f"sha256 in {MANIFEST}; deploy again or restore the file")
        if name in (PROFILE, GOLDEN):
            contents[name] = data
    allowed = set(files) | {MANIFEST, SIGNATURE}
    extra = sorted(p.name for p in path.iterdir() if p.name not in allowed)
    if extra:
        raise ArtifactError(f"artifact {path} holds file(s) its manifest does not list: {', '.join(extra)}")
    try:
        profile = check_profile(json.loads(contents[PROFILE])) if PROFILE in contents else {}
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise ArtifactError(f"{path / PROFILE} is damaged: {exc}") from None
    except ArtifactError as exc:
        raise ArtifactError(f"{path}: {exc}") from None
    if GOLDEN in contents:
        _check_golden(path, contents[GOLDEN], manifest)
    return Artifact(path, manifest, profile)


def _check_golden(path: Path, data: bytes, manifest: dict) -> None:
    """``golden.npz`` holds one plain array per input and output, shaped as the signature says."""
    want = {f"input_{i}": s for i, s in enumerate(manifest["inputs"])}
    want.update({f"output_{i}": s for i, s in enumerate(manifest["outputs"])})
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            if sorted(z.files) != sorted(want):
                raise ValueError(f"arrays {sorted(z.files)}, expected {sorted(want)}")
            for key, sig in want.items():
                arr = z[key]
                if arr.dtype.kind not in "fiub" or list(arr.shape) != list(sig["shape"]):
                    raise ValueError(f"{key} is {arr.dtype} {list(arr.shape)}, the signature says {sig['shape']}")
    except Exception as exc:  # noqa: BLE001 - zipfile/zlib/numpy raise many types on hostile bytes
        raise ArtifactError(f"artifact {path}: {GOLDEN} is damaged ({type(exc).__name__}: {exc})") from None
