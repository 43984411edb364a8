"""Loading ``torch.export`` ``.pt2`` files without running code from them.

``torch.export.load`` unpickles parts of a ``.pt2`` file, and unpickling runs
whatever callables the pickle names.  In torch 2.13 (``torch/export/pt2_archive/
_package.py`` and ``torch/_export/serde/serialize.py``) these are the places:

* ``data/weights/<model>_weights_config.json`` and
  ``data/constants/<model>_constants_config.json`` list every weight and constant
  with a ``use_pickle`` flag; a flagged entry is read with
  ``torch.load(..., weights_only=False)``.  The others are raw tensor bytes.
* constants whose ``path_name`` starts with ``custom_obj_`` (TorchScript's pickler)
  or ``opaque_obj_`` (``pickle.loads``) are unpickled whatever the flag says.
* ``data/sample_inputs/<model>.pt`` (and the legacy ``data/weights/<model>.pt`` /
  ``data/constants/<model>.pt``) go through ``deserialize_torch_artifact``: first
  ``torch.load(weights_only=True)``, then, when that fails, ``weights_only=False``.
* ``data/aotinductor/...`` holds compiled shared libraries that are loaded.
* when the archive cannot be read as a ``.pt2`` (a ``RuntimeError``) torch falls
  back to its pre-2.8 zip layout, whose ``serialized_*.pt`` entries go through the
  same two-step ``torch.load``; that layout needs a top-level ``version`` entry.

:func:`load_exported` reads the archive with :mod:`zipfile` first (and checks that
torch's own zip reader sees the same entries and bytes) and refuses every entry
that would be unpickled or loaded as code.  Pickles that torch would at most
load with ``weights_only=False`` are not unpickled here: their opcodes are read
with :mod:`pickletools` and they pass only when every global they name is one
of the few that ``torch.save`` writes for plain tensors (``_rebuild_tensor_v2``,
``_rebuild_parameter``, ``OrderedDict``, the ``torch.*Storage`` classes), which
is harmless even under the full unpickler.

``trust_pickle=True`` (the CLI's ``--trust-pickle``) skips the check: it means
*run code from this file*, and is only for files you made yourself.

>>> ep = load_exported("model.pt2")                      # doctest: +SKIP
"""

from __future__ import annotations

import io
import json
import logging
import os
import pickletools
import warnings
import zipfile
from pathlib import Path
from typing import Any

from .errors import EdgepackError, InputError

__all__ = ["copy_module", "load_exported", "unsafe_entries"]

TRUST_HINT = ("pass --trust-pickle (trust_pickle=True) only if you made this file yourself: it lets torch run "
              "code from the file")

_REEXPORT = ("re-export the model with torch.export.save(torch.export.export(model, example_inputs), "
             "'model.pt2')")

#: globals that torch.save writes for tensors, parameters and state dicts (checked by name: never imported)
_SAFE_GLOBALS = {("torch._utils", "_rebuild_tensor_v2"), ("torch._utils", "_rebuild_parameter"),
                 ("collections", "OrderedDict"), ("torch", "UntypedStorage")}
_STORAGES = {"Double", "Float", "Half", "BFloat16", "Long", "Int", "Short", "Char", "Byte", "Bool", "ComplexFloat",
             "ComplexDouble", "QUInt8", "QInt8", "QInt32", "QUInt4x2", "QUInt2x4"}
_SAFE_GLOBALS |= {("torch", f"{s}Storage") for s in _STORAGES}

_STRING_OPS = {"STRING", "BINSTRING", "SHORT_BINSTRING", "UNICODE", "BINUNICODE", "SHORT_BINUNICODE",
               "BINUNICODE8"}
_MARK = object()


def load_exported(path: str | Path, trust_pickle: bool = False):
    """A :class:`torch.export.ExportedProgram` from a ``torch.export.save()`` file.

    Refuses (:class:`~sdk.errors.InputError`, naming the entries) a file in which
    torch would unpickle anything or load compiled code, unless ``trust_pickle``
    is true.  edgepack's custom ops (``edgepack::binarize``,
    ``edgepack::mean_abs_window``) are registered first, so the ``.pt2`` of a
    binary model loads.  Every failure is an :class:`InputError` that says what to do.
    """
    if not isinstance(trust_pickle, bool):
        raise InputError(f"trust_pickle must be True or False, got {trust_pickle!r}")
    if not isinstance(path, (str, os.PathLike)):
        raise InputError(f"load_exported() takes the path of a .pt2 file, got {type(path).__name__}")
    p = Path(path)
    if not p.is_file():
        raise InputError(f"model file {path} does not exist (or is not a file); pass the path of a "
                         "torch.export.save() file")
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise InputError(f"cannot read model file {path}: {exc.strerror or exc}") from None

    if not trust_pickle:
        bad = unsafe_entries(data, str(path))
        if bad:
            raise InputError(
                f"{path}: torch.export.load would unpickle or load code from {len(bad)} entr"
                f"{'y' if len(bad) == 1 else 'ies'} of this file: " + "; ".join(bad)
                + f". A .pt2 file written by torch.export.save() of a plain model has none; {_REEXPORT}, or "
                + TRUST_HINT)

    import torch

    from . import binary  # noqa: F401  (registers torch.ops.edgepack.*)

    caught = _TorchLog()
    try:
        with caught, warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)      # torch's own deprecations, not the user's
            warnings.simplefilter("ignore", DeprecationWarning)
            ep = torch.export.load(io.BytesIO(data))
    except EdgepackError:
        raise
    except Exception as exc:   # torch raises anything from KeyError to SerializeError on a foreign file
        cause = caught.error or exc      # torch logs the real reason, then raises "check the warnings above"
        text = str(cause).strip()
        msg = text.splitlines()[0][:300] if text else ""
        exc = cause
        raise InputError(f"{path} could not be loaded as a torch.export.save() file "
                         f"({type(exc).__name__}{': ' + msg if msg else ''}); {_REEXPORT} with torch "
                         f"{torch.__version__}") from exc
    if not isinstance(ep, torch.export.ExportedProgram):
        raise InputError(f"{path} holds a {type(ep).__name__}, not an ExportedProgram; {_REEXPORT}")
    return ep


#: the FutureWarning torch 2.13 raises when a module from ``ExportedProgram.module()`` is deep-copied
#: (its pytree specs are reconstructed through a deprecated ``LeafSpec`` check): torch's, not the user's
_TREESPEC_WARNING = r"`isinstance\(treespec, LeafSpec\)` is deprecated"


def copy_module(model):
    """``copy.deepcopy(model)`` without torch's ``LeafSpec`` FutureWarning, which every copy of an
    unflattened ``.pt2`` module raises (only that warning is filtered, only during the copy).

    >>> copy_module(torch.nn.Linear(2, 2))                  # doctest: +SKIP
    Linear(in_features=2, out_features=2, bias=True)
    """
    import copy

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_TREESPEC_WARNING, category=FutureWarning)
        return copy.deepcopy(model)


def unsafe_entries(data: bytes, name: str = "the file") -> list[str]:
    """The entries of a ``.pt2`` archive (its bytes) that ``torch.export.load`` would
    unpickle or load as code, each with why.  Raises :class:`InputError` for bytes
    that are not a well-formed ``.pt2`` archive.  Nothing is unpickled."""
    records = _records(data, name, what="a torch.export.save() .pt2 file")
    _cross_check(data, records, name)
    lower = {k.lower(): k for k in records}

    def get(rec: str) -> bytes:
        return records[lower[rec.lower()]]

    if "archive_format" not in lower or get("archive_format").strip() != b"pt2":
        raise InputError(f"{name} is not a torch.export .pt2 archive (no archive_format 'pt2' entry); {_REEXPORT}")

    bad: list[str] = []
    for low, rec in sorted(lower.items()):
        if low.startswith("data/aotinductor/"):
            bad.append(f"{rec} (AOTInductor compiled code, loaded as a shared library)")
        elif low.startswith(("data/weights/", "data/constants/")) and low.endswith("_config.json"):
            bad += _payload_config(rec, records[rec], name)
        elif low.startswith("data/sample_inputs/") or (
                low.startswith(("data/weights/", "data/constants/")) and low.endswith(".pt")):
            why = _torch_save_problem(records[rec])
            if why:
                bad.append(f"{rec} ({why}; torch would retry it with torch.load(weights_only=False))")
    return bad


class _TorchLog(logging.Handler):
    """Keeps torch.export's own log (a warning with a traceback when a .pt2 fails to
    deserialize) off stderr, and remembers the exception it carried."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.error: BaseException | None = None
        self._log = logging.getLogger("torch.export")

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info and record.exc_info[1] is not None and self.error is None:
            self.error = record.exc_info[1]

    def __enter__(self):
        self._saved = self._log.propagate, self._log.handlers[:]
        self._log.propagate, self._log.handlers[:] = False, [self]
        return self

    def __exit__(self, *exc) -> None:
        self._log.propagate, self._log.handlers[:] = self._saved[0], self._saved[1]


# -- the archive -------------------------------------------------------------------------

def _records(data: bytes, name: str, what: str) -> dict[str, bytes]:
    """Entries of a torch zip archive (``root/...``) by name below the root, as torch's reader sees them."""
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
        infos = zf.infolist()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, OSError, EOFError) as exc:
        raise InputError(f"{name} is not {what} (not a zip archive: {exc}); {_REEXPORT}") from None
    if not infos:
        raise InputError(f"{name} is not {what} (an empty zip archive); {_REEXPORT}")
    root = infos[0].filename.split("/", 1)[0] + "/"
    if "/" not in infos[0].filename:
        raise InputError(f"{name} is not {what} (entry {infos[0].filename!r} is not inside a root folder); "
                         f"{_REEXPORT}")
    records: dict[str, bytes] = {}
    seen: set[str] = set()
    for info in infos:
        fn = info.filename
        if not fn.startswith(root):
            # torch's reader fails on such an archive and torch.export.load then tries its legacy layout,
            # whose entries it unpickles
            raise InputError(f"{name}: entry {fn!r} lies outside the archive's root folder {root!r}: not a file "
                             f"torch.export.save() writes (torch would read it with its legacy, pickle-based "
                             f"loader); {_REEXPORT}, or {TRUST_HINT}")
        rec = fn[len(root):]
        if rec.lower() in seen:       # torch's zip reader looks names up ignoring case
            raise InputError(f"{name}: entry {rec!r} appears twice (names compared ignoring case, as torch "
                             f"does), so what torch would read is ambiguous; {_REEXPORT}, or {TRUST_HINT}")
        seen.add(rec.lower())
        if info.is_dir():
            continue
        try:
            records[rec] = zf.read(info)
        except Exception as exc:      # bad CRC, unsupported compression, truncated member
            raise InputError(f"{name}: entry {rec!r} cannot be read ({type(exc).__name__}: {exc}); the file is "
                             f"damaged; {_REEXPORT}") from None
    return records


def _cross_check(data: bytes, records: dict[str, bytes], name: str) -> None:
    """torch reads the archive with its own zip reader (miniz): refuse an archive it sees differently."""
    import torch

    try:
        reader = torch._C.PyTorchFileReader(io.BytesIO(data))
        names = reader.get_all_records()
    except Exception as exc:
        raise InputError(f"{name} is not a torch.export .pt2 archive torch can read ({type(exc).__name__}: "
                         f"{str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}); {_REEXPORT}") from None
    if sorted(n for n in names if not n.endswith("/")) != sorted(records):
        raise InputError(f"{name}: torch's zip reader and Python's zipfile list different entries (a crafted or "
                         f"damaged archive); {_REEXPORT}, or {TRUST_HINT}")
    for rec in records:
        if rec.lower().endswith((".json", ".pt")) or rec.lower() in ("archive_format", "archive_version"):
            try:
                same = bytes(reader.get_record(rec)) == records[rec]
            except Exception:
                same = False
            if not same:
                raise InputError(f"{name}: entry {rec!r} reads differently with torch's zip reader and with "
                                 f"Python's zipfile (a crafted or damaged archive); {_REEXPORT}, or {TRUST_HINT}")


def _payload_config(rec: str, blob: bytes, name: str) -> list[str]:
    """Entries of a weights / constants config that torch would unpickle."""
    folder = rec.rsplit("/", 1)[0] + "/"
    try:
        cfg = json.loads(blob)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InputError(f"{name}: {rec} is not valid JSON ({exc}); the file is damaged; {_REEXPORT}") from None
    entries = cfg.get("config") if isinstance(cfg, dict) else None
    if not isinstance(entries, dict):
        raise InputError(f"{name}: {rec} has no 'config' mapping; the file is damaged; {_REEXPORT}")
    bad = []
    constants = rec.lower().startswith("data/constants/")
    for fqn, meta in entries.items():
        if not isinstance(meta, dict) or not isinstance(meta.get("path_name"), str):
            raise InputError(f"{name}: {rec}: entry {fqn!r} has no path_name; the file is damaged; {_REEXPORT}")
        path_name = meta["path_name"]
        kind = "constant" if constants else "weight"
        if meta.get("use_pickle"):
            bad.append(f"{folder}{path_name} ({kind} {fqn!r} is marked use_pickle: torch.load(weights_only=False))")
        elif constants and path_name.startswith("custom_obj_"):
            bad.append(f"{folder}{path_name} (constant {fqn!r}: a TorchScript object, unpickled)")
        elif constants and path_name.startswith("opaque_obj_"):
            bad.append(f"{folder}{path_name} (constant {fqn!r}: an opaque object, pickle.loads)")
    return bad


# -- torch.save payloads -----------------------------------------------------------------

def _torch_save_problem(blob: bytes) -> str | None:
    """Why torch.load of ``blob`` could run code (None when it could not).

    torch.save's zip layout keeps the object in ``<root>/data.pkl``; its opcodes
    are scanned, never executed.  Other layouts (legacy torch.save, raw pickles)
    are refused.
    """
    if not blob:
        return None                   # torch skips empty sample inputs
    if not blob.startswith(b"PK\x03\x04"):
        return "not in torch.save's zip layout: a raw or legacy pickle"
    try:
        records = _records(blob, "entry", what="a torch.save() file")
    except InputError as exc:
        return str(exc).split("; ")[0].removeprefix("entry ")
    pkl = [r for r in records if r.lower() == "data.pkl"]
    if len(pkl) != 1:
        return "a torch.save() archive without its data.pkl"
    return _pickle_problem(records[pkl[0]])


def _pickle_problem(data: bytes) -> str | None:
    """Scan a pickle's opcodes; the first global outside the tensor-only allowlist, or a
    construct that could reach one, is the problem."""
    stack: list[Any] = []
    memo: dict[int, Any] = {}
    try:
        for op, arg, _pos in pickletools.genops(data):
            name = op.name
            if name in ("GLOBAL", "INST"):
                mod, _, qual = str(arg).partition(" ")
                if (mod, qual) not in _SAFE_GLOBALS:
                    return f"pickle names {mod}.{qual}"
            elif name == "STACK_GLOBAL":
                if len(stack) < 2 or not all(isinstance(v, str) for v in stack[-2:]):
                    return "pickle builds a global from computed names"
                mod, qual = stack[-2], stack[-1]
                if (mod, qual) not in _SAFE_GLOBALS:
                    return f"pickle names {mod}.{qual}"
            elif name.startswith("EXT"):
                return "pickle uses the copyreg extension registry"
            _effect(op, arg, stack, memo)
    except Exception as exc:          # malformed pickle: torch's weights_only load would fail and fall back
        return f"malformed pickle ({type(exc).__name__}: {exc})"
    return None


def _effect(op, arg, stack: list, memo: dict) -> None:
    """Apply an opcode's stack effect, keeping string values (for STACK_GLOBAL) and placeholders otherwise."""
    name = op.name
    if name in _STRING_OPS:
        stack.append(arg if isinstance(arg, str) else None)
        return
    if name == "MARK":
        stack.append(_MARK)
        return
    if name in ("PUT", "BINPUT", "LONG_BINPUT"):
        memo[int(arg)] = stack[-1]
        return
    if name == "MEMOIZE":
        memo[len(memo)] = stack[-1]
        return
    if name in ("GET", "BINGET", "LONG_BINGET"):
        stack.append(memo.get(int(arg)))
        return
    if name == "DUP":
        stack.append(stack[-1])
        return
    before = list(op.stack_before)
    if pickletools.markobject in before:
        while stack.pop() is not _MARK:
            pass
        below = before[:before.index(pickletools.markobject)]
    else:
        below = before
    for _ in below:
        stack.pop()
    stack.extend([None] * len(op.stack_after))
