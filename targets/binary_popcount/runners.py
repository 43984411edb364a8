"""Runners for binary-popcount artifacts: ``host`` (the artifact's C sources compiled
here with the system compiler, called through ctypes) and ``reference`` (the
numpy implementation in :mod:`.reference`).  Both take and return torch-layout
float arrays.

Both rebuild the layer list from ``layers.json``, which :meth:`BinaryPopcount.pack`
writes beside ``weights.bin``: each layer's type and scalar fields, and the
byte offset of each of its arrays inside ``weights.bin``, so the reference
reads the very bytes the C code reads.
"""

from __future__ import annotations

import dataclasses
import json
import math
import typing
from typing import Any

import numpy as np

from sdk import Runner
from sdk.errors import ArtifactError, ToolchainError

from . import codegen as cg

TARGETS = ("binary-popcount",)
LAYERS_FILE = "layers.json"
LAYERS_FORMAT = 1
SPEC_TYPES = {cls.__name__: cls for cls in typing.get_args(cg.LayerSpec)}
#: inverse of the transposes codegen.layer_arrays applies on the way into weights.bin
_FROM_STORED = {("FloatConv", "weight"): (3, 2, 0, 1), ("FloatLinear", "weight"): (1, 0)}


def dump_specs(specs: list, names: list[str]) -> bytes:
    """``layers.json`` for ``specs``: each layer's type, name and scalar fields, and for
    each array its dtype, stored shape and byte offset in ``weights.bin``."""
    offsets, _ = cg.weight_layout(specs)
    layers = []
    for i, (spec, name) in enumerate(zip(specs, names, strict=True)):
        arrays = dict(cg.layer_arrays(spec))
        fields = {f.name: _plain(getattr(spec, f.name)) for f in dataclasses.fields(spec)
                  if f.name not in arrays and not isinstance(getattr(spec, f.name), np.ndarray)
                  and getattr(spec, f.name) is not None}
        layers.append({"type": type(spec).__name__, "name": name, "fields": fields,
                       "arrays": {k: {"offset": offsets[(i, k)], "dtype": a.dtype.str, "shape": list(a.shape)}
                                  for k, a in arrays.items()}})
    return (json.dumps({"format": LAYERS_FORMAT, "layers": layers}, indent=1) + "\n").encode()


def load_specs(layers_json: bytes, weights: bytes) -> tuple[list, list[str]]:
    """Inverse of :func:`dump_specs`: ``(specs, names)``, the arrays read from ``weights``."""
    try:
        doc = json.loads(layers_json)
        if doc.get("format") != LAYERS_FORMAT:
            raise ArtifactError(f"{LAYERS_FILE} has format {doc.get('format')!r}; this edgepack reads "
                                f"{LAYERS_FORMAT}")
        specs, names = [], []
        for layer in doc["layers"]:
            kwargs = dict(layer["fields"])
            for key, ref in layer["arrays"].items():
                shape = tuple(ref["shape"])
                arr = np.frombuffer(weights, np.dtype(ref["dtype"]), math.prod(shape), ref["offset"]).reshape(shape)
                perm = _FROM_STORED.get((layer["type"], key))
                kwargs[key] = arr.transpose(perm) if perm else arr
            if "shape" in kwargs:
                kwargs["shape"] = tuple(kwargs["shape"])
            specs.append(SPEC_TYPES[layer["type"]](**kwargs))
            names.append(layer["name"])
    except (ValueError, KeyError, TypeError) as exc:
        raise ArtifactError(f"{LAYERS_FILE} does not describe weights.bin: {exc}") from None
    return specs, names


def _plain(v: Any) -> Any:
    return list(v) if isinstance(v, tuple) else v


def artifact_specs(artifact) -> tuple[list, list[str]]:
    """``(specs, names)`` of an artifact, from its ``layers.json`` and ``weights.bin``."""
    return load_specs(artifact.file(LAYERS_FILE).read_bytes(), artifact.file("weights.bin").read_bytes())


def compile_artifact(artifact) -> cg.CompiledModel:
    """The artifact's ``model.c`` + kernel sources compiled for this machine (cached by
    content hash in ``build.default_cache_dir()``) and loaded."""
    from .build import compile_library, kernel_sources

    sources = [artifact.file(n) for n in ("model.c", "model.h")] + [artifact.file(p.name) for p in kernel_sources()]
    specs, _ = artifact_specs(artifact)
    return cg.CompiledModel(compile_library(sources), specs, artifact.file("weights.bin").read_bytes())


def binary_layer_agreement(artifact, inputs) -> list[dict]:
    """Run each of ``inputs`` (arrays shaped like the artifact's input) through the compiled
    model and the reference; per binary layer, in order: ``name``, ``elements``
    compared and ``mismatches``, the int32 popcount results that differ (0 when the
    two agree bit for bit).

    >>> [r["mismatches"] for r in binary_layer_agreement(art, [x])]   # doctest: +SKIP
    [0, 0]
    """
    from .reference import run_reference

    model = compile_artifact(artifact)
    specs, names = artifact_specs(artifact)
    rows = [{"name": n, "elements": 0, "mismatches": 0} for s, n in zip(specs, names) if isinstance(s, cg.BINARY_LAYERS)]
    for x in inputs:
        x = np.asarray(x, np.float32)
        _, got = model.run_debug(x)
        _, want = run_reference(specs, x)
        for row, a, b in zip(rows, got, want, strict=True):
            row["elements"] += a.size
            row["mismatches"] += int(np.count_nonzero(a != b))
    return rows


class HostRunner(Runner):
    """The generated C model and the kernel library, compiled with ``cc -O3 -march=native``."""

    name = "host"
    version = "1.0"
    targets = TARGETS

    def unavailable(self):
        from .build import find_compiler

        try:
            find_compiler()
        except ToolchainError as exc:
            return str(exc)
        return None

    def open(self, artifact):
        model = compile_artifact(artifact)
        return lambda inputs: [model.run(inputs[0])]


class ReferenceRunner(Runner):
    """The SDK's numpy reference of the binary runtime (integer popcounts, float32 elsewhere)."""

    name = "reference"
    version = "1.0"
    targets = TARGETS

    def open(self, artifact):
        from .reference import run_reference

        specs, _ = artifact_specs(artifact)
        return lambda inputs: [run_reference(specs, inputs[0])[0]]
