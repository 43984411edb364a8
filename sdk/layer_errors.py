"""Which layer lost the accuracy: per-layer quantization error of a LiteRT artifact.

:func:`layer_errors` runs a float version of the model and the packed model's
integer reference (:mod:`sdk.litert.reference`, bit-exact with LiteRT) side by
side on the same inputs and compares every layer's output tensor.

**The float side** is, in order of preference:

* ``"model"`` — the user's float model (an ``nn.Module``, a
  :class:`torch.export.ExportedProgram` or a ``.pt2`` path), captured with the
  same passes :func:`sdk.deploy` runs (``torch.export``, batch-norm folding,
  the target's ``prepare``), so its node names are the profile's layer names.
  Every profile row records the LiteRT tensor that holds the layer's output
  (``tensor``: a fused activation's, when one was fused in) and its stored
  layout (``layout``), which maps each float node output onto the packed
  tensor.  The error then holds weight *and* activation quantization.  It must
  be the model that was packed: after a recipe's torch-side stages (``cle``
  rescales channels, pruning removes them) pass what they produced
  (:func:`sdk.compress`); a model whose node names or shapes differ is refused.
* ``"shadow"`` (no model given) — the same flatbuffer executed in float64
  with every integer tensor dequantized (weights, biases, constants) and every
  QUANTIZE / DEQUANTIZE an identity: the lowered graph without activation
  quantization.  Its weights are the quantized ones, so this isolates the
  activation-quantization error; weight rounding is invisible to it (and an
  ``arm-fp32`` artifact's shadow is its own arithmetic: pass the model there).

**Definitions** (``x_L``: the float output of layer ``L``, ``q``: the packed
model's output of the same tensor, dequantized; sums run over every element
and every input):

* ``sqnr_db`` — the layer's *local* SQNR, its own contribution: the layer's
  LiteRT ops (those between its inputs and its output tensor: QUANTIZE of a
  model input, TRANSPOSE, PAD, the op itself, a float island's
  DEQUANTIZE/QUANTIZE...) run in the integer reference on the *float* inputs,
  quantized to the int8 grid of the tensors they replace, exactly as the
  deployed layer would meet a perfect upstream::

      sqnr_db = 10·log10( Σ x_L² / Σ (x_L − q_L(float inputs))² )

  Upstream error does not enter it; the rounding of the layer's own input to
  its int8 grid does (the int8 kernel cannot take anything else).  So when
  one channel of layer ``P``'s output spans far more than the others, ``P``'s
  own SQNR stays high (that channel holds the energy) and the loss shows at
  the layer that reads the tensor; its suggestion names ``P``.
* ``cumulative_sqnr_db`` — the same comparison for the whole packed model run
  end to end: what arrives at the layer, the accumulated error.
* ``sqnr_lost_db`` — ``max(0, baseline − sqnr_db)``: how far the layer falls
  below what rounding to its number format costs a well-scaled tensor, with
  ``baseline = 6.02·bits + 1.76`` dB (the SQNR of a uniform ``bits``-bit
  quantizer on a full-scale signal) with the target's format: 49.9 dB for
  every layer of an ``arm-int8`` artifact (float islands too: their inputs are
  int8), 146.2 dB for ``arm-fp32`` (24-bit mantissa).  Rows are ranked by it,
  worst first; rows losing :data:`SUGGEST_LOST_DB` or more get a suggestion.

``spec`` is the layer's encoding as the artifact stores it (weight dtype,
granularity, scale range, sparse storage; output tensor's int8 scale and zero
point, or float) and ``suggestion`` the fix the SDK has for the diagnosed
cause: ``ptq`` ``float_layers`` (keep the layer float), dropping it from
``int4_layers`` (int8 instead of int4), ``ptq`` ``activation_observer``
(``percentile`` / ``mse`` instead of ``minmax``), the ``cle`` recipe stage
(cross-layer equalization) when the input's channels span very different
ranges, or the ``bias-correction`` stage when the error is a shift of the
channel means.

Targets: ``arm-int8`` and ``arm-fp32``; other targets raise
:class:`~sdk.errors.InputError` naming these.

>>> rep = layer_errors(sdk.load("out/model"), model=net)        # doctest: +SKIP
>>> rep.rows[0].name, rep.rows[0].suggestion                     # doctest: +SKIP
('conv2d_1', 'keep it float: ptq float_layers: [body.1] ...')
>>> print(rep.table())                                           # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .errors import InputError

__all__ = ["LayerError", "LayerErrorReport", "SUPPORTED_TARGETS", "layer_errors"]

#: targets whose artifacts the finder reads (one ``model.tflite`` with the integer reference)
SUPPORTED_TARGETS = ("arm-int8", "arm-fp32")
#: SQNR written for an exact match (no error to measure), as the deploy profile caps it
EXACT_DB = 999.0
#: a layer this many dB below its baseline gets a suggestion (int8: local SQNR under 25 dB, 6 % noise
#: amplitude; healthy int8 layers measured 28-49 dB here, a layer that loses its small weights < 10 dB)
SUGGEST_LOST_DB = 25.0
#: per-channel range spread (largest / median channel max |x|) above which one int8 scale starves channels
SPREAD = 8.0
_WEIGHTED = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED")


def baseline_db(bits: int) -> float:
    """SQNR of a uniform ``bits``-bit quantizer on a full-scale signal (6.02·bits + 1.76 dB).

    >>> round(baseline_db(8), 1), round(baseline_db(24), 1)
    (49.9, 146.2)
    """
    return 6.02 * bits + 1.76


@dataclasses.dataclass
class LayerError:
    """One layer's error: local and cumulative SQNR against the float side, its encoding, a fix."""

    name: str                   # profile layer name (graph node)
    op: str                     # canonical op -> LiteRT op(s)
    sqnr_db: float              # local SQNR: the layer alone, fed the float inputs (module docstring)
    sqnr_lost_db: float         # max(0, baseline of its number format - sqnr_db): the ranking key
    spec: str                   # encoding as stored: weights, output activation
    suggestion: str             # the SDK's fix, or "" when the layer is fine
    module: str = ""            # owning nn.Module path (what ptq float_layers / int4_layers name)
    cumulative_sqnr_db: float = EXACT_DB   # the packed model end to end up to this layer's output
    tensor: str = ""            # the LiteRT tensor compared
    reason: str = ""            # the diagnosis behind the suggestion

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class LayerErrorReport:
    """Rows ranked worst first (by ``sqnr_lost_db``); ``float_source``: ``model`` or ``shadow``."""

    artifact: str
    target: str
    float_source: str
    num_inputs: int
    rows: list[LayerError]
    skipped: list[dict] = dataclasses.field(default_factory=list)    # {"name", "why"} of layers not compared
    notes: list[str] = dataclasses.field(default_factory=list)       # caveats about this comparison

    def to_dict(self) -> dict:
        """JSON-ready: every number finite (exact matches are :data:`EXACT_DB`)."""
        return {"artifact": self.artifact, "target": self.target, "float_source": self.float_source,
                "num_inputs": self.num_inputs, "rows": [r.to_dict() for r in self.rows],
                "skipped": list(self.skipped), "notes": list(self.notes)}

    def table(self) -> str:
        """The ranked rows as a text table (worst first), with spec and suggestion columns."""
        what = {"model": "the float model", "shadow": "a float shadow of the packed graph (dequantized weights, "
                                                       "float activations: activation-quantization error only)"}
        head = ["#", "layer", "module", "op", "local dB", "lost dB", "cumul. dB", "spec", "suggestion"]
        body = [[str(i + 1), r.name, r.module, r.op, f"{r.sqnr_db:.1f}", f"{r.sqnr_lost_db:.1f}",
                 f"{r.cumulative_sqnr_db:.1f}", r.spec, r.suggestion or "-"] for i, r in enumerate(self.rows)]
        widths = [max([len(h)] + [len(b[i]) for b in body]) for i, h in enumerate(head)]
        line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
        out = [f"layer errors of {self.artifact} ({self.target}), {self.num_inputs} input(s), float side: "
               f"{what.get(self.float_source, self.float_source)}",
               line(head), line(["-" * w for w in widths])] + [line(b) for b in body]
        out += [f"not compared: {s['name']}: {s['why']}" for s in self.skipped]
        out += [f"note: {n}" for n in self.notes]
        return "\n".join(out)

    __str__ = table


def layer_errors(artifact: Any, model: Any = None, inputs: Sequence | None = None) -> LayerErrorReport:
    """Per-layer SQNR of ``artifact`` (an :class:`~sdk.artifact.Artifact` or its path) against
    ``model`` (``nn.Module``, ``ExportedProgram`` or ``.pt2`` path; None: the float shadow of the
    packed graph), on ``inputs`` (a list of calls: arrays or tuples of arrays shaped as the
    artifact's inputs; None: its golden inputs).  See the module docstring for the definitions.

    >>> rep = layer_errors("out/model", model=net)     # doctest: +SKIP
    >>> rep.rows[0].name                               # the worst layer   # doctest: +SKIP
    """
    from .artifact import Artifact, load
    from .litert.runners import checked_model

    art = artifact if isinstance(artifact, Artifact) else load(artifact)
    if art.target not in SUPPORTED_TARGETS:
        raise InputError(f"layer_errors supports {', '.join(SUPPORTED_TARGETS)} artifacts (one model.tflite and "
                         f"its integer reference); {art.path} is a {art.target!r} artifact: deploy the model to "
                         "arm-int8 to find its worst layers")
    calls = _calls(art, inputs)
    ref = _Reference(checked_model(art))
    layers = [r for r in art.profile.get("layers", []) if isinstance(r, dict) and r.get("name")]
    ins_sig = art.manifest["inputs"]
    from .litert.layout import to_stored

    stored_q = [[to_stored(s, x) for s, x in zip(ins_sig, call)] for call in calls]
    stored_f = [[np.ascontiguousarray(x.transpose(s.get("layout") or range(x.ndim))).astype(np.float32)
                 for s, x in zip(ins_sig, call)] for call in calls]
    skipped: list[dict] = []
    targets = {}                # layer name -> tensor index compared
    unknown = [r["name"] for r in layers if ref.index(r.get("tensor") or r["name"]) is None]
    if unknown:
        # a profile from before rows named their tensor: a fused activation's tensor is not the layer's name, and
        # comparing without it would charge that layer's ops to its consumer
        raise InputError(f"{art.path}: model.tflite has no output tensor for layer(s) {', '.join(unknown[:5])}; the "
                         "artifact was packed before profile.json recorded each layer's tensor: deploy it again "
                         "with this edgepack")
    for row in layers:
        idx = ref.index(row.get("tensor") or row["name"])
        if idx in targets.values():
            skipped.append({"name": row["name"], "why": "it writes no tensor of its own (a no-op in LiteRT)"})
        else:
            targets[row["name"]] = idx
    if model is not None:
        floats, source = _model_floats(model, art, calls, layers, targets, ref), "model"
    else:
        shadow = _Shadow(ref)
        floats = [shadow.trace_idx(s) for s in stored_f]
        source = "shadow"
    # model inputs are boundaries with exact float values
    for f, s in zip(floats, stored_f):
        for i, idx in enumerate(ref.inputs):
            f[idx] = s[i]
    quant = [ref.trace_idx(s) for s in stored_q]
    # the number format the layers round to: int8 (the float islands of an int8 graph too: their inputs are int8)
    bits = 8 if art.target == "arm-int8" else 24
    encodings = {e.get("tensor"): e for e in art.manifest.get("encodings", []) if isinstance(e, dict)}
    cfg = ((art.manifest.get("quantization") or {}).get("config") or {})
    boundary = set(ref.inputs) | {targets[r["name"]] for r in layers if r["name"] in targets
                                  and targets[r["name"]] in floats[0]}
    rows = []
    for row in layers:
        idx = targets.get(row["name"])
        if idx is None or idx not in floats[0]:
            continue
        ops = ref.group(idx, boundary)
        local = [ref.run_ops(ops, f) for f in floats]
        x = [f[idx] for f in floats]
        q_local = [ref.real(idx, v) for v in local]
        q_cum = [ref.real(idx, q[idx]) for q in quant]
        t = ref.tensors[idx]
        sq = _sqnr(x, q_local)
        diag = _Diagnosis(ref, idx, ops, row, floats, x, q_local, encodings, cfg, boundary, layers, targets)
        lost = max(0.0, baseline_db(bits) - sq)
        rows.append(LayerError(
            name=row["name"], op=str(row.get("op", "")), sqnr_db=round(sq, 2), sqnr_lost_db=round(lost, 2),
            spec=diag.spec(), suggestion="", module=str(row.get("module", "")),
            cumulative_sqnr_db=round(_sqnr(x, q_cum), 2), tensor=t.name))
        if lost >= SUGGEST_LOST_DB:
            rows[-1].suggestion, rows[-1].reason = diag.suggest(art.target)
    rows.sort(key=lambda r: -r.sqnr_lost_db)
    return LayerErrorReport(str(art.path), art.target, source, len(calls), rows, skipped,
                            _notes(art, source))


def _notes(art, source: str) -> list[str]:
    """Caveats: torch-side recipe stages change the model the artifact was packed from."""
    from .recipe import as_recipe

    notes = []
    if source == "model" and art.manifest.get("recipe"):
        stages = [s.method for s in as_recipe(art.manifest["recipe"]).torch_stages]
        if stages:
            notes.append(f"the artifact's recipe ran torch-side stages ({', '.join(stages)}) before packing: compare "
                         "against the model they produced (sdk.compress), or leave model out (float shadow); "
                         "those stages may rescale or rewrite layers (cle rescales channels), so the original "
                         "model's layer outputs need not match the packed ones")
    if source == "shadow" and art.target == "arm-fp32":
        notes.append("an arm-fp32 artifact has no quantized activations: its float shadow is the same arithmetic; "
                     "pass the float model to see its float32 error")
    return notes


# --- inputs ------------------------------------------------------------------------------------

def _calls(art, inputs) -> list[list[np.ndarray]]:
    """Validated calls (torch-layout float32 arrays, one per artifact input)."""
    sig = art.signature
    if inputs is None:
        golden, _ = art.golden()
        return [[np.asarray(g, np.float32) for g in golden]]
    if isinstance(inputs, np.ndarray) or not isinstance(inputs, (list, tuple)) or not inputs:
        raise InputError("inputs must be a non-empty list of calls, each an array (one-input models) or a tuple "
                         f"of arrays: {', '.join(f'{n} {tuple(s)}' for n, s, _ in sig)}")
    calls = []
    for k, call in enumerate(inputs):
        call = list(call) if isinstance(call, (tuple, list)) else [call]
        if len(call) != len(sig):
            raise InputError(f"inputs[{k}] holds {len(call)} array(s); the artifact takes {len(sig)}")
        arrays = []
        for x, (name, shape, _) in zip(call, sig):
            x = np.asarray(x.detach().cpu().numpy() if hasattr(x, "detach") else x)
            if tuple(x.shape) != tuple(shape):
                raise InputError(f"inputs[{k}]: input {name!r} has shape {tuple(x.shape)}; the artifact was packed "
                                 f"for {tuple(shape)}: pass arrays of that shape (one call per batch)")
            if x.dtype.kind != "f" or not np.all(np.isfinite(x)):
                raise InputError(f"inputs[{k}]: input {name!r} must be finite float values")
            arrays.append(x.astype(np.float32))
        calls.append(arrays)
    return calls


def _model_floats(model, art, calls, layers, targets, ref) -> list[dict[int, np.ndarray]]:
    """Float stored-layout values, by tensor index, of every layer the float model has a node for."""
    import torch

    from . import plugins
    from .graph import capture, fold_batch_norm
    from .pt2 import copy_module, load_exported

    if isinstance(model, (str, os.PathLike)):
        model = load_exported(Path(model))
    if isinstance(model, torch.export.ExportedProgram):
        model = model.module()       # as `edgepack deploy` does
    if not isinstance(model, torch.nn.Module):
        raise InputError(f"model must be an nn.Module, a torch.export.ExportedProgram or a .pt2 path, got "
                         f"{type(model).__name__}")
    example = tuple(torch.from_numpy(x) for x in calls[0])
    tgt = plugins.get("target", art.target)()
    graph = tgt.prepare(fold_batch_norm(capture(copy_module(model).eval(), example)))
    out, missing = [], {}
    for call in calls:
        seen: dict[str, np.ndarray] = {}
        graph.run([torch.from_numpy(x) for x in call],
                  observer=lambda name, v: seen.__setitem__(name, v.detach().numpy().astype(np.float64)))
        values = {}
        for row in layers:
            idx = targets.get(row["name"])
            if idx is None:
                continue
            stored = ref.tensors[idx].shape
            tname = ref.tensors[idx].name
            value = seen.get(tname, seen.get(tname.split("#")[0]))
            layout = None if value is None else (row.get("layout") or _layout(stored, value.shape))
            if layout is None or len(layout) != value.ndim or tuple(value.shape[p] for p in layout) != stored:
                got = "no such node" if value is None else f"shape {tuple(value.shape)}"
                missing[row["name"]] = f"{tname} {tuple(row.get('out_shape', ()))}: {got}"
                continue
            values[idx] = np.ascontiguousarray(value.transpose(layout))
        out.append(values)
    if missing:
        name, why = next(iter(missing.items()))
        raise InputError(f"the model does not match {art.path}: {len(missing)} of {len(targets)} layers differ "
                         f"(first: layer {name}, tensor {why}); pass the float model that was deployed (same node "
                         "names and shapes: before a recipe pruned it), or no model to compare against the float "
                         "shadow of the packed graph")
    return out


def _layout(stored: tuple, torch_shape: tuple) -> tuple[int, ...] | None:
    """The layout of a tensor whose profile row predates the ``layout`` field: torch order, NHWC, or
    the first permutation that gives the stored shape."""
    rank = len(torch_shape)
    for perm in itertools.chain([tuple(range(rank)), (0, 2, 3, 1) if rank == 4 else (), (0, 2, 1) if rank == 3
                                 else ()], itertools.permutations(range(rank))):
        if len(perm) == rank and tuple(torch_shape[p] for p in perm) == tuple(stored):
            return perm
    return None


def _sqnr(ref: list[np.ndarray], got: list[np.ndarray]) -> float:
    """10·log10(Σ ref² / Σ (ref − got)²) over all calls, within ±:data:`EXACT_DB`."""
    signal = sum(float(np.sum(np.square(r, dtype=np.float64))) for r in ref)
    noise = sum(float(np.sum(np.square(np.asarray(r, np.float64) - g))) for r, g in zip(ref, got))
    if noise == 0.0:
        return EXACT_DB
    if signal == 0.0:
        return -EXACT_DB
    return float(min(EXACT_DB, 10.0 * math.log10(signal / noise)))


# --- the two interpreters ------------------------------------------------------------------------

def _reference_class():
    from .litert.reference import ReferenceInterpreter

    return ReferenceInterpreter


class _Reference:
    """The integer reference of ``model.tflite``, able to run any subset of its ops from given
    tensor values (a layer fed the float inputs)."""

    def __init__(self, model: bytes):
        self.interp = _reference_class()(model)
        self.tensors = self.interp._tensors
        self.inputs = list(self.interp._inputs)
        self.producer = {int(op.outputs[0]): k for k, (_, op, _) in enumerate(self.interp._ops)}
        self.by_name = {t.name: t.index for t in self.tensors}

    def index(self, name: str) -> int | None:
        return self.by_name.get(name)

    def trace_idx(self, stored_inputs) -> dict[int, np.ndarray]:
        return {i: v for i, v in self.interp._execute(stored_inputs).items() if self.tensors[i].data is None}

    def group(self, idx: int, boundary: set[int]) -> list[int]:
        """Indices of the ops that compute tensor ``idx`` from ``boundary`` tensors and constants."""
        ops, todo = set(), [idx]
        while todo:
            t = todo.pop()
            k = self.producer.get(t)
            if k is None or k in ops:
                continue
            ops.add(k)
            for i in self.interp._ops[k][1].inputs:
                i = int(i)
                if i >= 0 and self.tensors[i].data is None and i not in boundary:
                    todo.append(i)
        return sorted(ops)

    def feed(self, idx: int, value: np.ndarray) -> np.ndarray:
        """A float value as tensor ``idx`` holds it (quantized to its int8 grid, or float)."""
        t = self.tensors[idx]
        if not t.quantized:
            return value.astype(np.float32)
        q = np.rint(value.astype(np.float32) / t.s) + t.zp
        return np.clip(q, -128, 127).astype(np.int8)

    def run_ops(self, ops: list[int], floats: dict[int, np.ndarray]) -> np.ndarray:
        """The last op's output when ``ops`` run on float values (by tensor index) fed as the model's tensors."""
        from .litert.flatbuffer import numpy_dtype

        interp, env = self.interp, {}
        out = None
        for k in ops:
            name, op, node = interp._ops[k]
            vals = []
            for i in op.inputs:
                i = int(i)
                if i < 0:
                    vals.append(None)
                elif self.tensors[i].data is not None:
                    vals.append(self.tensors[i].data)
                else:
                    if i not in env:
                        env[i] = self.feed(i, floats[i])
                    vals.append(env[i])
            ins = [self.tensors[int(i)] if int(i) >= 0 else None for i in op.inputs]
            out = self.tensors[int(op.outputs[0])]
            y = interp.KERNELS[name](interp, k, op, node, ins, vals, out)
            env[out.index] = np.asarray(y).astype(numpy_dtype(out.dtype), copy=False).reshape(out.shape)
        return env[out.index]

    def real(self, idx: int, value: np.ndarray) -> np.ndarray:
        """Tensor ``idx``'s value as real numbers (dequantized when int8)."""
        t = self.tensors[idx]
        if t.quantized:
            return (value.astype(np.float64) - t.zp) * np.float64(t.s)
        return value.astype(np.float64)


def _dequantized(t) -> np.ndarray | None:
    """A constant integer tensor's real values (per-tensor, per-axis or blockwise scales)."""
    if t.data is None:
        return None
    d = t.data.astype(np.float64)
    if t.blockwise is not None:
        scales, block = t.blockwise
        return d * np.repeat(scales.astype(np.float64), block, axis=1)[:, :d.shape[1]]
    if t.scale is None or t.data.dtype.kind not in "iu":
        return d
    shape = [1] * d.ndim
    if t.scale.size > 1:
        shape[t.axis] = -1
    return (d - t.zero_point.reshape(shape)) * t.scale.astype(np.float64).reshape(shape)


class _Shadow:
    """The same flatbuffer in float64: integer tensors dequantized, QUANTIZE/DEQUANTIZE identities."""

    def __init__(self, ref: _Reference):
        base = _reference_class()
        identity = lambda interp, k, op, node, ins, vals, out: vals[0]  # noqa: E731

        class Float(base):
            KERNELS = {**base.KERNELS, "QUANTIZE": identity, "DEQUANTIZE": identity}

        interp = Float.__new__(Float)
        interp.__dict__.update(ref.interp.__dict__)
        interp._cache = {}
        interp._tensors = [dataclasses.replace(t, dtype="float32", scale=None, zero_point=None, blockwise=None,
                                               data=_dequantized(t) if t.data is not None else None)
                           if (t.scale is not None or t.blockwise is not None) and t.dtype not in ("float32",
                                                                                                     "float16")
                           else t for t in ref.tensors]
        self.interp = interp

    def trace_idx(self, stored_inputs) -> dict[int, np.ndarray]:
        env = self.interp._execute([x.astype(np.float32) for x in stored_inputs])
        return {i: v.astype(np.float64) for i, v in env.items() if self.interp._tensors[i].data is None}


# --- diagnosis ---------------------------------------------------------------------------------

class _Diagnosis:
    """What a layer's tensors say about the cause of its error, and the SDK's fix for it."""

    def __init__(self, ref, idx, ops, row, floats, x, q, encodings, cfg, boundary, layers, targets):
        self.ref, self.out, self.ops, self.row, self.cfg = ref, idx, ops, row, cfg
        self.x, self.q, self.floats = x, q, floats
        self.enc = encodings.get(row.get("weight"))
        self.weight = None
        for k in ops:
            name, op, _ = ref.interp._ops[k]
            if name in _WEIGHTED:
                self.weight = ref.tensors[int(op.inputs[1])]
        # the layer's activation inputs: boundary tensors its ops read
        self.inputs = sorted({int(i) for k in ops for i in ref.interp._ops[k][1].inputs
                              if int(i) >= 0 and int(i) in boundary})
        owner = {targets[r["name"]]: r for r in layers if r["name"] in targets}
        self.producers = {i: owner.get(i) for i in self.inputs}

    def spec(self) -> str:
        parts = []
        t_out = self.ref.tensors[self.out]
        if self.weight is not None:
            w = self.weight
            storage = self.row.get("weight_storage", w.dtype)
            if self.enc is not None:
                desc = str(self.enc.get("planned", storage))
                if storage != desc.split(" ")[0]:
                    desc += f", stored {storage}"
            else:
                desc = storage
            if w.scale is not None and w.quantized:
                lo, hi = float(w.scale.min()), float(w.scale.max())
                desc += f" (scale {lo:.3g}" + (f"..{hi:.3g}" if f"{lo:.3g}" != f"{hi:.3g}" else "") + ")"
            parts.append(f"w {desc}")
        if self.row.get("precision") == "float32":
            parts.append("computed in float32")
        if t_out.quantized:
            parts.append(f"out int8 per-tensor (scale {float(t_out.s):.3g}, zp {t_out.zp})")
        else:
            parts.append("out float32")
        return "; ".join(parts)

    def _channel_spread(self, values: list[np.ndarray]) -> tuple[float, int]:
        """(largest / median per-channel max |x|, the largest channel) over the last (stored channel) axis."""
        v = np.concatenate([a.reshape(-1, a.shape[-1]) if a.ndim > 1 else a.reshape(1, -1) for a in values])
        peak = np.max(np.abs(v), axis=0)
        med = float(np.median(peak))
        if peak.size < 2 or med <= 0:
            return 1.0, 0
        return float(peak.max() / med), int(np.argmax(peak))

    def _bias_share(self) -> float:
        """Share of the error energy that is a constant shift per output channel (what bias correction removes)."""
        err = np.concatenate([(q - x).reshape(-1, x.shape[-1]) if x.ndim > 1 else (q - x).reshape(1, -1)
                              for x, q in zip(self.x, self.q)])
        total = float(np.sum(err ** 2))
        if total == 0:
            return 0.0
        return float(np.sum(np.mean(err, axis=0) ** 2) * err.shape[0]) / total

    def _coarse_weights(self) -> float:
        """Share of the weight codes within ±2 of zero: large when one weight per output channel sets the
        scale and the others keep a few levels (evenly spread weights: ~3 %)."""
        codes = self.weight.data
        k = self.ref.producer.get(self.weight.index)
        if codes is None and k is not None and self.ref.interp._ops[k][0] == "DENSIFY":   # sparse storage
            codes = self.ref.tensors[int(self.ref.interp._ops[k][1].inputs[0])].data
        if codes is None or codes.dtype.kind not in "iu":
            return 0.0
        return float(np.mean(np.abs(codes.astype(np.int64)) <= 2))

    def suggest(self, target: str) -> tuple[str, str]:
        module = self.row.get("module") or self.row["name"]
        keep = f"keep it float: ptq float_layers: [{module}]"
        if target != "arm-int8":
            return ("none in the SDK: arm-fp32 only rounds to float32, so a loss this large means the packed graph "
                    "computes something else than the model; please report it", "float32 layer far from the model")
        if self.enc is not None and self.enc.get("bits") == 4:
            listed = any(module == n or module.startswith(f"{n}.") for n in self.cfg.get("int4_layers") or ())
            how = f"remove {module} from ptq int4_layers" if listed else \
                f"ptq weight_bits: 8 with int4_layers naming the others (not {module})"
            return f"int8 instead of int4: {how}", "4-bit weights"
        observer = self.cfg.get("activation_observer")
        for i in self.inputs:
            t = self.ref.tensors[i]
            if not t.quantized:
                continue
            spread, ch = self._channel_spread([f[i] for f in self.floats])
            if spread >= SPREAD:
                prod = self.producers.get(i)
                src = f"layer {prod['name']} ({prod.get('module') or prod['name']})" if prod else "the model input"
                return (f"cle (recipe stage `cle` before ptq) to equalize {src} with this layer",
                        f"input {t.name!r} from {src}: channel {ch} spans {spread:.0f}x the median channel, one "
                        "per-tensor int8 scale leaves the others few levels")
        if self.weight is not None and self.weight.quantized and self._coarse_weights() > 0.5:
            return (keep, "one weight per output channel sets the int8 scale and the others round to few levels")
        if self._bias_share() > 0.5:
            return ("bias-correction (recipe stage `bias-correction` before ptq)",
                    "most of the error is a constant shift of the output channels")
        if observer == "minmax":
            return ("ptq activation_observer: mse (or percentile)", "minmax ranges stretched by outliers")
        if self.weight is None:
            return (f"ptq activation_observer: percentile (now {observer})", "the output's int8 range")
        return keep, "int8 rounding of this layer"
