"""The artifact's JSON documents, checked strictly before anything reads them.

An artifact comes from somewhere else: a colleague, a CI job, a sender who
means harm.  :func:`check_manifest` and :func:`check_profile` accept exactly
the shapes edgepack writes — types, ranges, permutations, quantization
vectors, plain file names — and raise :class:`~sdk.errors.ArtifactError`
naming the field otherwise, so that no ``KeyError``/``TypeError`` can come out
of code that later trusts them.

>>> check_file_name("model.tflite")
'model.tflite'
>>> check_file_name("../x")
Traceback (most recent call last):
...
sdk.errors.ArtifactError: manifest.json: files: '../x' is not a plain file name inside the artifact
"""

from __future__ import annotations

import math
import re
from typing import Any

from .errors import ArtifactError

#: largest dimension and element count a signature may claim (a 2^31 tensor is not an edge model)
MAX_DIM = 1 << 24
MAX_ELEMENTS = 1 << 31
#: largest file an artifact may list; bigger ones are refused before being read
MAX_FILE_BYTES = 1 << 31
DTYPES = ("float32", "float16", "int8", "uint8", "int16", "int32", "int64", "bool")
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_MAX_DEPTH = 32


def _fail(where: str, what: str) -> ArtifactError:
    return ArtifactError(f"{where}: {what}")


def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _str(where: str, v: Any) -> str:
    if not isinstance(v, str):
        raise _fail(where, f"expected a string, got {type(v).__name__}")
    return v


def _dict(where: str, v: Any) -> dict:
    if not isinstance(v, dict):
        raise _fail(where, f"expected an object, got {type(v).__name__}")
    return v


def _list(where: str, v: Any) -> list:
    if not isinstance(v, list):
        raise _fail(where, f"expected a list, got {type(v).__name__}")
    return v


def check_json_depth(where: str, v: Any, depth: int = 0) -> None:
    """Plain JSON values nested at most 32 deep (free-form sections: recipe, config)."""
    if depth > _MAX_DEPTH:
        raise _fail(where, f"nested more than {_MAX_DEPTH} levels")
    if isinstance(v, dict):
        for k, x in v.items():
            check_json_depth(f"{where}.{k}", x, depth + 1)
    elif isinstance(v, list):
        for i, x in enumerate(v):
            check_json_depth(f"{where}[{i}]", x, depth + 1)
    elif isinstance(v, float) and not math.isfinite(v):
        raise _fail(where, "non-finite number")


def check_file_name(name: Any, where: str = "manifest.json: files") -> str:
    """A plain name of a file directly inside the artifact directory."""
    if not isinstance(name, str) or not _NAME.match(name) or ".." in name:
        raise _fail(where, f"{name!r} is not a plain file name inside the artifact")
    return name


def check_shape(where: str, v: Any) -> tuple[int, ...]:
    dims = _list(where, v)
    if len(dims) > 8 or not all(_int(d) and 0 <= d <= MAX_DIM for d in dims):
        raise _fail(where, f"expected at most 8 dimensions, each an integer in [0, {MAX_DIM}], got {v!r}")
    if math.prod(dims) > MAX_ELEMENTS:
        raise _fail(where, f"{v!r} has more than {MAX_ELEMENTS} elements")
    return tuple(dims)


def check_quantization(where: str, q: Any, shape: tuple[int, ...]) -> None:
    if q is None:
        return
    q = _dict(where, q)
    unknown = set(q) - {"dtype", "scale", "zero_point", "axis"}
    if unknown:
        raise _fail(where, f"unknown field(s) {sorted(unknown)}")
    if q.get("dtype") is not None and q["dtype"] not in DTYPES:
        raise _fail(f"{where}.dtype", f"{q['dtype']!r} is not one of {', '.join(DTYPES)}")
    scale, zp = _list(f"{where}.scale", q.get("scale")), _list(f"{where}.zero_point", q.get("zero_point"))
    if not scale or not all(_num(s) and s > 0 for s in scale):
        raise _fail(f"{where}.scale", "expected a non-empty list of positive finite numbers")
    if len(zp) != len(scale) or not all(_int(z) and -(1 << 31) <= z < (1 << 31) for z in zp):
        raise _fail(f"{where}.zero_point", f"expected {len(scale)} integer(s), one per scale")
    axis = q.get("axis")
    if axis is None:
        if len(scale) != 1:
            raise _fail(where, f"{len(scale)} scales but no axis")
    elif not _int(axis) or not 0 <= axis < max(len(shape), 1) or (shape and shape[axis] != len(scale)):
        raise _fail(f"{where}.axis", f"{axis!r} does not index a dimension of size {len(scale)} in {list(shape)}")


def check_tensor_sig(where: str, d: Any) -> dict:
    """One entry of ``inputs``/``outputs`` (see :class:`sdk.contract.TensorSig`)."""
    d = _dict(where, d)
    unknown = set(d) - {"name", "shape", "dtype", "quantization", "layout", "stored_dtype"}
    if unknown:
        raise _fail(where, f"unknown field(s) {sorted(unknown)}")
    _str(f"{where}.name", d.get("name"))
    shape = check_shape(f"{where}.shape", d.get("shape"))
    for key in ("dtype", "stored_dtype"):
        if (key == "dtype" or d.get(key) is not None) and d.get(key) not in DTYPES:
            raise _fail(f"{where}.{key}", f"{d.get(key)!r} is not one of {', '.join(DTYPES)}")
    layout = d.get("layout")
    if layout is not None and (not all(_int(p) for p in _list(f"{where}.layout", layout))
                               or sorted(layout) != list(range(len(shape)))):
        raise _fail(f"{where}.layout", f"{layout!r} is not a permutation of the {len(shape)} dimensions")
    check_quantization(f"{where}.quantization", d.get("quantization"),
                       tuple(shape[i] for i in layout) if layout is not None else shape)
    return d


def _check_rules(where: str, rules: Any, nested: bool = True) -> None:
    rules = _dict(where, rules)
    for k, v in rules.items():
        if k == "runners" and nested:
            for name, sub in _dict(f"{where}.runners", v).items():
                _check_rules(f"{where}.runners.{name}", sub, nested=False)
        elif not _num(v):
            raise _fail(f"{where}.{k}", f"expected a finite number, got {v!r}")


#: most rows a manifest's ``encodings`` or a profile's ``estimate.layers`` may hold
MAX_ROWS = 100_000


def check_manifest(m: Any, format_name: str, format_version: int) -> dict:
    """Raise :class:`ArtifactError` unless ``m`` is a manifest this edgepack can read."""
    where = "manifest.json"
    if not isinstance(m, dict):
        raise _fail(where, "not a JSON object")
    if m.get("format") != format_name:
        raise ArtifactError(f"not an edgepack artifact (format {m.get('format')!r})")
    v = m.get("format_version")
    if not _int(v) or v < 1:
        raise _fail(f"{where}: format_version", f"{v!r} is not a format version (a positive integer)")
    if v > format_version:
        raise ArtifactError(f"artifact format version {v} is newer than this edgepack reads "
                            f"({format_version}): upgrade edgepack")
    for key in ("edgepack_version",):
        _str(f"{where}: {key}", m.get(key))
    t = _dict(f"{where}: target", m.get("target"))
    for key in ("name", "version"):
        _str(f"{where}: target.{key}", t.get(key))
    if "default_runner" in t:
        _str(f"{where}: target.default_runner", t["default_runner"])
    _dict(f"{where}: target.config", t.get("config", {}))
    for i, row in enumerate(_list(f"{where}: plugins", m.get("plugins", []))):
        row = _dict(f"{where}: plugins[{i}]", row)
        for key in ("kind", "name", "version", "module"):
            _str(f"{where}: plugins[{i}].{key}", row.get(key))
    for key in ("inputs", "outputs"):
        sigs = _list(f"{where}: {key}", m.get(key))
        if not sigs or len(sigs) > 64:
            raise _fail(f"{where}: {key}", "expected 1 to 64 entries")
        for i, sig in enumerate(sigs):
            check_tensor_sig(f"{where}: {key}[{i}]", sig)
    for key in ("recipe", "quantization"):
        if m.get(key) is not None:
            _dict(f"{where}: {key}", m[key])
    stages = _list(f"{where}: stages", m.get("stages", []))
    if len(stages) > MAX_ROWS:
        raise _fail(f"{where}: stages", f"more than {MAX_ROWS} reports")
    for i, row in enumerate(stages):
        _str(f"{where}: stages[{i}].method", _dict(f"{where}: stages[{i}]", row).get("method"))
    _check_rules(f"{where}: verify", m.get("verify", {}))
    encodings = _list(f"{where}: encodings", m.get("encodings", []))
    if len(encodings) > MAX_ROWS:
        raise _fail(f"{where}: encodings", f"more than {MAX_ROWS} rows")
    for i, row in enumerate(encodings):
        at = f"{where}: encodings[{i}]"
        row = _dict(at, row)
        unknown = set(row) - {"layer", "tensor", "planned", "bits", "stored_bits", "index_bits", "sparsity"}
        if unknown:
            raise _fail(at, f"unknown field(s) {sorted(unknown)}")
        for key in ("layer", "tensor", "planned"):
            _str(f"{at}.{key}", row.get(key))
        for key in ("bits", "stored_bits", "index_bits"):
            if (key != "index_bits" or key in row) and (not _int(row.get(key)) or not 1 <= row[key] <= 32):
                raise _fail(f"{at}.{key}", f"expected an integer in [1, 32], got {row.get(key)!r}")
        if "sparsity" in row:
            sp = _dict(f"{at}.sparsity", row["sparsity"])
            extra = set(sp) - {"pattern", "density", "block", "shipped"}
            if extra:
                raise _fail(f"{at}.sparsity", f"unknown field(s) {sorted(extra)}")
            _str(f"{at}.sparsity.pattern", sp.get("pattern"))
            if sp.get("shipped") not in ("dense", "sparse"):
                raise _fail(f"{at}.sparsity.shipped", f"expected 'dense' or 'sparse', got {sp.get('shipped')!r}")
            if not (_num(sp.get("density")) and 0 <= sp["density"] <= 1):
                raise _fail(f"{at}.sparsity.density", f"expected a number in [0, 1], got {sp.get('density')!r}")
            if "block" in sp and not (isinstance(sp["block"], list) and len(sp["block"]) == 2
                                      and all(_int(b) and b >= 1 for b in sp["block"])):
                raise _fail(f"{at}.sparsity.block", f"expected two positive integers, got {sp['block']!r}")
    files = _dict(f"{where}: files", m.get("files"))
    if not files:
        raise _fail(f"{where}: files", "empty file list")
    for name, meta in files.items():
        check_file_name(name)
        if name == "manifest.json":
            raise _fail(f"{where}: files", "lists manifest.json itself")
        meta = _dict(f"{where}: files.{name}", meta)
        if not isinstance(meta.get("sha256"), str) or not _HEX64.match(meta["sha256"]):
            raise _fail(f"{where}: files.{name}.sha256", "expected 64 lower-case hex digits")
        if not _int(meta.get("bytes")) or not 0 <= meta["bytes"] <= MAX_FILE_BYTES:
            raise _fail(f"{where}: files.{name}.bytes", f"expected an integer in [0, {MAX_FILE_BYTES}]")
    if "weight_container" in m:     # weights.dc (sdk.huffman checks it when decoding) or weights.zr
        wc = _dict(f"{where}: weight_container", m["weight_container"])
        if wc.get("format") == "edgepack-zr":
            from .zero_run import check_entry

            check_entry(wc, files)
        elif wc.get("format") != "edgepack-dc":
            raise _fail(f"{where}: weight_container.format", f"{wc.get('format')!r} is not a weight container "
                        "this edgepack reads (edgepack-dc, edgepack-zr)")
    if "early_exit" in m:           # a cascade of stage graphs (sdk.early_exit_artifact checks the section)
        from .early_exit_artifact import check_section

        check_section(m["early_exit"], m)
    check_json_depth(where, m)
    return m


def check_profile(p: Any) -> dict:
    """Raise :class:`ArtifactError` unless ``p`` has the shape of a ``profile.json``."""
    where = "profile.json"
    p = _dict(where, p)
    check_json_depth(where, p)
    for i, row in enumerate(_list(f"{where}: layers", p.get("layers", []))):
        row = _dict(f"{where}: layers[{i}]", row)
        for key in ("name", "op"):
            if key in row:
                _str(f"{where}: layers[{i}].{key}", row[key])
        for key in ("in_shape", "out_shape"):
            if key in row:
                check_shape(f"{where}: layers[{i}].{key}", row[key])
        for key in ("params", "bytes", "macs", "bops"):
            if key in row and not (_num(row[key]) and row[key] >= 0):
                raise _fail(f"{where}: layers[{i}].{key}", f"expected a non-negative number, got {row[key]!r}")
    for section in ("totals", "latency_ms", "deploy_phases_s"):
        for k, v in _dict(f"{where}: {section}", p.get(section, {})).items():
            if not _num(v):
                raise _fail(f"{where}: {section}.{k}", f"expected a finite number, got {v!r}")
    if "delegation" in p:
        d = _dict(f"{where}: delegation", p["delegation"])
        for k in ("partitions", "delegated_ops"):
            if k in d and not (_num(d[k]) and d[k] >= 0):
                raise _fail(f"{where}: delegation.{k}", f"expected a non-negative number, got {d[k]!r}")
        for k, v in _dict(f"{where}: delegation.outside_delegate", d.get("outside_delegate", {})).items():
            if not (_num(v) and v >= 0):
                raise _fail(f"{where}: delegation.outside_delegate.{k}", f"expected a count, got {v!r}")
    if "estimate" in p:
        est = _dict(f"{where}: estimate", p["estimate"])
        _str(f"{where}: estimate.device", est.get("device"))
        for k in ("weight_bytes", "macs", "bops", "est_latency_ms", "est_energy_mj"):
            if not (_num(est.get(k)) and est[k] >= 0):
                raise _fail(f"{where}: estimate.{k}", f"expected a non-negative number, got {est.get(k)!r}")
        rows = _list(f"{where}: estimate.layers", est.get("layers", []))
        if len(rows) > MAX_ROWS:
            raise _fail(f"{where}: estimate.layers", f"more than {MAX_ROWS} rows")
        for i, row in enumerate(rows):
            row = _dict(f"{where}: estimate.layers[{i}]", row)
            for k in ("name", "module", "op", "format"):
                if not isinstance(row.get(k), str):
                    raise _fail(f"{where}: estimate.layers[{i}].{k}", f"expected a string, got {row.get(k)!r}")
            for k in ("params", "weight_bytes", "macs", "bops", "est_latency_us", "est_energy_uj"):
                if not (_num(row.get(k)) and row[k] >= 0):
                    raise _fail(f"{where}: estimate.layers[{i}].{k}",
                                f"expected a non-negative number, got {row.get(k)!r}")
    if "latency_note" in p:
        _str(f"{where}: latency_note", p["latency_note"])
    return p
