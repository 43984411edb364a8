"""Runners for binary-popcount artifacts: ``host`` (C generated here, compiled with the
system compiler and called through ctypes) and ``reference`` (the numpy
implementation in :mod:`.reference`).  Both take and return torch-layout float
arrays, refuse inputs of another shape with ``InputError``, and may be called
from several threads at once.

An artifact is data, never code.  Both runners rebuild the layer list from
``layers.json`` and ``weights.bin`` with :func:`load_specs`, which treats them as
hostile: a strict schema, known layer types only, typed and bounded fields,
arrays of the expected dtype and rank lying where this edgepack puts them inside
``weights.bin``, and ``weights.bin`` byte for byte what those specs give.  Then
:func:`artifact_specs` checks that the C files the artifact ships (for firmware
builds) are exactly what this edgepack makes: ``model.c`` and ``model.h`` what
:func:`.emit.generate_sources` gives for the specs, each ``ep_*`` kernel file
the one installed with edgepack, and no other C file; anything else is refused
with ``ArtifactError``.  The host runner compiles the freshly generated C and the
installed kernels, never a file of the artifact, and loads only shared objects
that its compile cache signed (:mod:`.build`).

``layers.json`` is what :meth:`BinaryPopcount.pack` writes beside ``weights.bin``:
each layer's type, name and integer fields, and the dtype, stored shape and byte
offset of each of its arrays inside ``weights.bin``, so the reference reads the
very bytes the C code reads.  Names label reports only; nothing from
``layers.json`` but validated integers reaches the generated C.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

import numpy as np

from sdk import Runner, __version__
from sdk.errors import ArtifactError, ConfigError, InputError, ToolchainError

from .blob import weight_layout, write_weights_bin
from .build import CompiledModel, compile_model, find_compiler, kernel_sources
from .emit import generate_sources
from .reference import run_reference
from .specs import LAYER_KINDS, BinaryLayer, Stored, infer_shapes

TARGETS = ("binary-popcount",)
LAYERS_FILE = "layers.json"
LAYERS_FORMAT = 1
_MAX_LAYERS_JSON_BYTES = 16 << 20
_MAX_LAYERS = 4096              # the memory planner is quadratic in the layer count
_MAX_NAME = 1024
#: kernel sizes, strides, paddings, channel counts, layer indices: far beyond real layers,
#: and small enough that the kernels' int arithmetic on sums of them cannot overflow
_MAX_FIELD = 1 << 24
_MAX_ELEMENTS = 1 << 27         # per array and per tensor
_MAX_ACTIVATION_BYTES = 1 << 31  # all tensors of one run together: the reference keeps every one


def dump_specs(specs: list, names: list[str]) -> bytes:
    """``layers.json`` for ``specs``: each layer's type, name and scalar fields, and for
    each array its dtype, stored shape and byte offset in ``weights.bin``."""
    offsets = weight_layout(specs).offsets
    layers = []
    for i, (spec, name) in enumerate(zip(specs, names, strict=True)):
        arrays = dict(spec.arrays())
        fields = {f.name: _plain(getattr(spec, f.name)) for f in dataclasses.fields(spec)
                  if f.name not in arrays and not isinstance(getattr(spec, f.name), np.ndarray)
                  and getattr(spec, f.name) is not None}
        layers.append({"type": type(spec).__name__, "name": name, "fields": fields,
                       "arrays": {k: {"offset": offsets[(i, k)], "dtype": a.dtype.str, "shape": list(a.shape)}
                                  for k, a in arrays.items()}})
    return (json.dumps({"format": LAYERS_FORMAT, "layers": layers}, indent=1) + "\n").encode()


def _plain(v: Any) -> Any:
    return list(v) if isinstance(v, tuple) else v


def load_specs(layers_json: bytes, weights: bytes) -> tuple[list, list[str]]:
    """Inverse of :func:`dump_specs`: ``(specs, names)``, the arrays read from ``weights``
    (read-only views).  Both come from whoever sent the artifact, so every value is
    checked before it is used; shapes must make a network :func:`.specs.infer_shapes`
    accepts, within size bounds, and ``weights`` must be exactly the blob
    :func:`.blob.write_weights_bin` makes of the result.

    Raises ArtifactError, saying which layer and what is wrong, for anything else.
    """
    if len(layers_json) > _MAX_LAYERS_JSON_BYTES:
        raise ArtifactError(f"{LAYERS_FILE} is larger than {_MAX_LAYERS_JSON_BYTES} bytes")
    try:
        doc = json.loads(layers_json)
    except (ValueError, RecursionError) as exc:      # UnicodeDecodeError is a ValueError
        raise ArtifactError(f"{LAYERS_FILE} is not valid JSON ({exc})") from None
    _check_keys(doc, {"format", "layers"}, "the document")
    if not _is_int(doc["format"], LAYERS_FORMAT, LAYERS_FORMAT):
        raise ArtifactError(f"{LAYERS_FILE} has format {_show(doc['format'])}; this edgepack reads {LAYERS_FORMAT}")
    layers = doc["layers"]
    if not isinstance(layers, list) or not 1 <= len(layers) <= _MAX_LAYERS:
        raise ArtifactError(f"{LAYERS_FILE}: 'layers' must be a list of 1 to {_MAX_LAYERS} layers")
    specs, names, offsets = [], [], {}
    for i, layer in enumerate(layers):
        _check_keys(layer, {"type", "name", "fields", "arrays"}, f"layer {i}")
        kind, name = layer["type"], layer["name"]
        if not isinstance(kind, str) or kind not in LAYER_KINDS:
            raise ArtifactError(f"{LAYERS_FILE}: layer {i} has type {_show(kind)}; known types: "
                                f"{', '.join(sorted(LAYER_KINDS))}")
        if not isinstance(name, str) or len(name) > _MAX_NAME or not name.isprintable():
            raise ArtifactError(f"{LAYERS_FILE}: layer {i} ({kind}) needs a name of at most {_MAX_NAME} printable "
                                f"characters, got {_show(name)}")
        where = f"layer {i} ({kind} {_show(name)})"
        kwargs = _fields(layer["fields"], kind, where)
        stored = LAYER_KINDS[kind].STORED
        arrays = layer["arrays"]
        if not isinstance(arrays, dict) or not set(arrays) <= set(stored):
            raise ArtifactError(f"{LAYERS_FILE}: {where}: 'arrays' must be an object with keys among "
                                f"{sorted(stored)}, got {_show(arrays)}")
        for key, ref in arrays.items():
            kwargs[key] = _array(ref, stored[key], weights, f"{where}, array {key!r}")
            offsets[(i, key)] = ref["offset"]
        missing = sorted(f.name for f in dataclasses.fields(LAYER_KINDS[kind])
                         if f.default is dataclasses.MISSING and f.name not in kwargs)
        if missing:
            raise ArtifactError(f"{LAYERS_FILE}: {where} lacks {', '.join(missing)}")
        try:
            specs.append(LAYER_KINDS[kind](**kwargs))
        except ConfigError as exc:
            raise ArtifactError(f"{LAYERS_FILE}: {where}: {exc}") from None
        names.append(name)
    try:
        infos = infer_shapes(specs)
    except ConfigError as exc:
        raise ArtifactError(f"{LAYERS_FILE} describes no valid network: {exc}") from None
    # math.prod, not TensorInfo.nbytes: numpy's int64 product could wrap on hostile shapes
    sizes = [math.prod(t.shape) for t in infos]
    if max(sizes) > _MAX_ELEMENTS or sum(sizes) * 4 > _MAX_ACTIVATION_BYTES:
        raise ArtifactError(f"{LAYERS_FILE} describes tensors beyond this edgepack's bounds ({_MAX_ELEMENTS} "
                            f"elements each, {_MAX_ACTIVATION_BYTES} bytes in all)")
    if weight_layout(specs).offsets != offsets:
        raise ArtifactError(f"{LAYERS_FILE} places arrays in weights.bin where this edgepack does not")
    if write_weights_bin(specs) != weights:
        raise ArtifactError(f"weights.bin is not the blob {LAYERS_FILE} describes (its header, fingerprint, "
                            "padding or size differs)")
    return specs, names


def _is_int(v: Any, lo: int, hi: int) -> bool:
    # JSON's true/false arrive as bools, which are ints to Python
    return type(v) is int and lo <= v <= hi


def _show(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


def _check_keys(obj: Any, keys: set[str], where: str) -> None:
    if not isinstance(obj, dict) or set(obj) != keys:
        got = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
        raise ArtifactError(f"{LAYERS_FILE}: {where} must be an object with keys {sorted(keys)}, got {_show(got)}")


def _fields(fields: Any, kind: str, where: str) -> dict:
    """The spec's keyword arguments from a layer's ``fields``: every one an int but
    InputSpec's shape, a list of 2 or 4 positive ints."""
    allowed = {f.name for f in dataclasses.fields(LAYER_KINDS[kind])} - set(LAYER_KINDS[kind].STORED)
    if not isinstance(fields, dict) or not set(fields) <= allowed:
        raise ArtifactError(f"{LAYERS_FILE}: {where}: 'fields' must be an object with keys among "
                            f"{sorted(allowed)}, got {_show(fields)}")
    kwargs = {}
    for key, value in fields.items():
        if kind == "InputSpec":
            if (not isinstance(value, list) or len(value) not in (2, 4)
                    or not all(_is_int(d, 1, _MAX_ELEMENTS) for d in value) or math.prod(value) > _MAX_ELEMENTS):
                raise ArtifactError(f"{LAYERS_FILE}: {where}: shape must be 2 or 4 positive integers of at most "
                                    f"{_MAX_ELEMENTS} elements in all, got {_show(value)}")
            kwargs[key] = tuple(value)
        elif _is_int(value, 0, _MAX_FIELD):
            kwargs[key] = value
        else:
            raise ArtifactError(f"{LAYERS_FILE}: {where}: {key} must be an integer from 0 to {_MAX_FIELD}, "
                                f"got {_show(value)}")
    return kwargs


def _array(ref: Any, stored: Stored, weights: bytes, where: str) -> np.ndarray:
    """The array ``ref`` points at in ``weights``, in the spec's layout."""
    dtype, ndim = stored.dtype, stored.ndim
    _check_keys(ref, {"offset", "dtype", "shape"}, where)
    if ref["dtype"] != dtype:
        raise ArtifactError(f"{LAYERS_FILE}: {where} has dtype {_show(ref['dtype'])}; it is stored as {dtype!r}")
    shape = ref["shape"]
    if (not isinstance(shape, list) or len(shape) != ndim or not all(_is_int(d, 1, _MAX_ELEMENTS) for d in shape)
            or math.prod(shape) > _MAX_ELEMENTS):
        raise ArtifactError(f"{LAYERS_FILE}: {where} must have {ndim} positive dimensions of at most "
                            f"{_MAX_ELEMENTS} elements in all, got shape {_show(shape)}")
    count, offset = math.prod(shape), ref["offset"]
    if not _is_int(offset, 0, len(weights)) or offset + count * np.dtype(dtype).itemsize > len(weights):
        raise ArtifactError(f"{LAYERS_FILE}: {where} at offset {_show(offset)} does not lie inside weights.bin "
                            f"({len(weights)} bytes)")
    arr = np.frombuffer(weights, np.dtype(dtype), count, offset).reshape(shape)
    return arr.transpose(np.argsort(stored.layout)) if stored.layout else arr


def artifact_specs(artifact) -> tuple[list, list[str]]:
    """``(specs, names)`` of an artifact, from its ``layers.json`` and ``weights.bin``
    (see :func:`load_specs`), once its manifest's input and output shapes and its C
    files are checked against them: ``model.c``/``model.h`` as generated from the
    specs, every ``ep_*`` kernel file as installed with this edgepack, no other C file.

    Raises ArtifactError, with what differs and what to do, otherwise.
    """
    redeploy = (f"the artifact was damaged, edited, or made by another edgepack version; nothing of it was "
                f"compiled or run: deploy the model again with this edgepack ({__version__})")
    try:
        specs, names = load_specs(artifact.read_bytes(LAYERS_FILE), artifact.read_bytes("weights.bin"))
    except ArtifactError as exc:
        raise ArtifactError(f"artifact {artifact.path}: {exc}; {redeploy}") from None
    infos = infer_shapes(specs)
    shapes = ([tuple(t.shape) for t in artifact.inputs], [tuple(t.shape) for t in artifact.outputs])
    if shapes != ([infos[0].shape], [infos[-1].shape]):
        raise ArtifactError(f"artifact {artifact.path}: its manifest gives inputs and outputs of shapes {shapes}, "
                            f"its {LAYERS_FILE} {[infos[0].shape]} and {[infos[-1].shape]}; {redeploy}")
    model_c, model_h = generate_sources(specs)
    expected = {"model.c": model_c.encode(), "model.h": model_h.encode(),
                **{p.name: p.read_bytes() for p in kernel_sources()}}
    shipped = {n for n in artifact.manifest["files"] if n.lower().endswith((".c", ".h"))}
    problems = []
    for name in sorted(shipped | set(expected)):
        if name not in expected:
            problems.append(f"{name} is not a file this edgepack ships")
        elif name not in shipped:
            problems.append(f"{name} is missing")
        elif artifact.read_bytes(name) != expected[name]:
            problems.append(f"{name} differs from " + (f"what this edgepack generates from {LAYERS_FILE} and "
                                                       "weights.bin" if name.startswith("model.")
                                                       else "the kernel installed with this edgepack"))
    if problems:
        raise ArtifactError(f"artifact {artifact.path}: {'; '.join(problems)}; {redeploy}")
    return specs, names


def compile_artifact(artifact) -> CompiledModel:
    """The checked artifact (:func:`artifact_specs`) as a :class:`.build.CompiledModel`:
    C generated afresh from its specs and the kernels installed with edgepack, compiled
    for this machine (cached in ``build.default_cache_dir()``) and loaded."""
    specs, _ = artifact_specs(artifact)
    return compile_model(specs)


def binary_layer_agreement(artifact, inputs, model: CompiledModel | None = None) -> list[dict]:
    """Run each of ``inputs`` (arrays shaped like the artifact's input) through the compiled
    model and the reference; per binary layer, in order: ``name``, ``elements``
    compared and ``mismatches``, the int32 popcount results that differ (0 when the
    two agree bit for bit).

    >>> [r["mismatches"] for r in binary_layer_agreement(art, [x])]   # doctest: +SKIP
    [0, 0]
    """
    specs, names = artifact_specs(artifact)
    model = compile_model(specs) if model is None else model
    rows = [{"name": n, "elements": 0, "mismatches": 0} for s, n in zip(specs, names) if isinstance(s, BinaryLayer)]
    for x in inputs:
        _, got = model.run_debug(x)
        _, want = run_reference(specs, x)
        for row, a, b in zip(rows, got, want, strict=True):
            row["elements"] += a.size
            row["mismatches"] += int(np.count_nonzero(a != b))
    return rows


def _only_input(inputs) -> Any:
    if not isinstance(inputs, (list, tuple)) or len(inputs) != 1:
        got = f"{len(inputs)}" if isinstance(inputs, (list, tuple)) else type(inputs).__name__
        raise InputError(f"a binary-popcount model takes one input, got {got}")
    return inputs[0]


class HostRunner(Runner):
    """The C model generated from the artifact's layer specs and the kernel library
    installed with edgepack, compiled with ``cc -O3 -march=native``."""

    name = "host"
    version = "1.0"
    targets = TARGETS

    def unavailable(self):
        try:
            find_compiler()
        except ToolchainError as exc:
            return str(exc)
        return None

    def open(self, artifact):
        model = compile_artifact(artifact)
        session = lambda inputs: [model.run(_only_input(inputs))]  # noqa: E731

        def integer_agreement(samples) -> dict:
            # verify's integer check: the compiled popcounts against the reference's, bit for bit
            rows = binary_layer_agreement(artifact, [_only_input(s) for s in samples], model)
            return {"what": "popcounts", "compared": sum(r["elements"] for r in rows),
                    "differ": sum(r["mismatches"] for r in rows)}

        session.integer_agreement = integer_agreement
        return session


class ReferenceRunner(Runner):
    """The SDK's numpy reference of the binary runtime (integer popcounts, float32 elsewhere)."""

    name = "reference"
    version = "1.0"
    targets = TARGETS

    def open(self, artifact):
        specs, _ = artifact_specs(artifact)
        return lambda inputs: [run_reference(specs, _only_input(inputs))[0]]
