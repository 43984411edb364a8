"""Per-tensor encodings: what a method asks a target to ship, and what targets carry.

The contract from compression method to artifact has three parts:

1. **Hints** (torch side).  A stage that fixes something about a weight — a
   pruning mask, a shared-value codebook, a bit width, a binary sign — calls
   :func:`annotate` on the layer.  The hint is a plain attribute of the module,
   so it survives :func:`sdk.compress` (masks are baked into the weights, the
   hint stays) and :func:`sdk.graph.capture` hands it to the graph
   (``graph.hints``, by weight constant).
2. **Plans** (graph side).  The quantizer turns weights and hints into
   :class:`sdk.quant.QuantSpec` records (:func:`weight_spec`): bits, granularity,
   codebook, sparsity, float16.
3. **Carriers** (targets).  Each target lists the encodings it ships natively
   (:class:`Carries`, ``Target.carries``); :func:`check_plan` refuses a plan it
   cannot honour with :class:`EncodingError` — the layer, the encoding, and the
   registered targets that do carry it — before anything is packed.

Codes narrower than a carried storage width (4-bit codes, a 3-value ternary
codebook) are shipped exactly inside the wider storage, and the manifest says so
(``encodings``: planned and stored bits per layer).  Sparsity that a target
cannot exploit is shipped as the dense zeros it is, and recorded the same way.

>>> sp = Sparsity.measure(np.array([[0.0, 1.0], [0.0, 0.0]]))
>>> sp.pattern, sp.density
('unstructured', 0.25)
>>> spec = weight_spec(np.array([[-0.5, 0.5, 0.0], [0.5, 0.0, -0.5]], np.float32), Hint(codebook=3))
>>> spec.granularity, spec.codebook, spec.quantize(np.array([-0.5, 0.0, 0.5])).tolist()
('per-tensor', (-0.5, 0.0, 0.5), [-1, 0, 1])
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from .errors import EncodingError
from .quant import QuantSpec, qparams

#: the module attribute that holds a layer's hints (``{tensor name: Hint}``)
HINTS_ATTR = "edgepack_hints"


@dataclasses.dataclass(frozen=True)
class Sparsity:
    """Zeros of a weight that a target may exploit: ``pattern`` ``unstructured`` or
    ``block`` (zeros in whole ``block`` = (rows, cols) tiles of the ``[out, in·k]``
    matrix), and the measured ``density`` (fraction of nonzeros)."""

    pattern: str = "unstructured"
    block: tuple[int, int] | None = None
    density: float | None = None

    @classmethod
    def measure(cls, w: np.ndarray, pattern: str = "unstructured",
                block: tuple[int, int] | None = None) -> "Sparsity":
        return cls(pattern, tuple(block) if block else None, round(float(np.count_nonzero(w)) / max(w.size, 1), 6))

    def to_dict(self) -> dict:
        d: dict[str, Any] = {"pattern": self.pattern, "density": self.density}
        if self.block:
            d["block"] = list(self.block)
        return d


@dataclasses.dataclass(frozen=True)
class Hint:
    """What a torch-side stage fixed about one weight (every field optional).

    ``codebook``: the weight holds at most this many distinct values (k-means,
    ternary, binary, DoReFa levels); ``bits``: integer codes of this width on a
    uniform grid; ``sparsity``: zeros to exploit (pattern and block shape);
    ``per_channel``: the shared values differ per output channel (binary
    weights with a scale per filter); ``range``: a learned ``(lo, hi)`` clipping
    range of a layer's output (``annotate(module, Hint(range=...), "output")``:
    QAT and LSQ hand what they learned to the plan, which uses it instead of
    the observed range).  ``source`` names the method.
    """

    codebook: int | None = None
    bits: int | None = None
    sparsity: Sparsity | None = None
    per_channel: bool = False
    range: tuple[float, float] | None = None
    source: str = ""

    def __post_init__(self):
        from .errors import ConfigError

        if self.range is not None:
            lo, hi = (float(v) for v in self.range)
            if not (math.isfinite(lo) and math.isfinite(hi) and lo <= hi):
                raise ConfigError(f"a learned range must be two finite numbers lo <= hi, got {self.range!r}")
            object.__setattr__(self, "range", (lo, hi))
        for name in ("codebook", "bits"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                raise ConfigError(f"hint {name} must be a positive integer, got {v!r}")

    def merged(self, other: "Hint") -> "Hint":
        """Both hints at once (a pruned then k-means-quantized layer); ``other`` wins per field."""
        pick = lambda a, b: b if b is not None else a  # noqa: E731
        return Hint(pick(self.codebook, other.codebook), pick(self.bits, other.bits),
                    pick(self.sparsity, other.sparsity), self.per_channel or other.per_channel,
                    pick(self.range, other.range),
                    "+".join(dict.fromkeys(s for h in (self, other) for s in h.source.split("+") if s)))

    @property
    def max_values(self) -> int | None:
        """How many distinct values the weight may hold (``codebook``, else ``2^bits``; None: any)."""
        return self.codebook or (2 ** self.bits if self.bits else None)


def annotate(module: Any, hint: Hint, tensor: str = "weight") -> None:
    """Record ``hint`` for ``module.<tensor>`` (merged with earlier stages' hints)."""
    hints = dict(getattr(module, HINTS_ATTR, None) or {})
    hints[tensor] = hints[tensor].merged(hint) if tensor in hints else hint
    setattr(module, HINTS_ATTR, hints)


def hints_of(module: Any, tensor: str = "weight") -> Hint | None:
    """The hint recorded for ``module.<tensor>``, if any."""
    return (getattr(module, HINTS_ATTR, None) or {}).get(tensor)


def graph_hints(model: Any, graph: Any) -> dict[str, Hint]:
    """Hints of ``model``'s layers by graph value (capture calls this): a weight hint under the
    weight constant's name, an ``output`` hint under the name of the last node the module computes."""
    from .graph import WEIGHTED_OPS

    found: dict[str, Hint] = {}
    last: dict[str, str] = {}
    for node in graph.nodes:
        if not node.module:
            continue
        last[node.module] = node.name
        if node.op not in WEIGHTED_OPS or not graph.is_const(node.inputs[1]):
            continue
        hint = hints_of(_submodule(model, node.module))
        if hint is not None:
            found[node.inputs[1]] = hint
    for path, name in last.items():
        hint = hints_of(_submodule(model, path), "output")
        if hint is not None and hint.range is not None:
            found[name] = hint
    placed = {node.module for node in graph.nodes if node.inputs[1:2] and node.inputs[1] in found} | \
        {graph.node(n).module for n in found if graph.node(n) is not None}
    lost = sorted(path for path, mod in model.named_modules()
                  if getattr(mod, HINTS_ATTR, None) and path not in placed)
    if lost:
        import warnings

        warnings.warn(f"encoding hints of {len(lost)} module(s) reach no graph value and are not shipped: "
                      f"{', '.join(lost[:8])}{' ...' if len(lost) > 8 else ''} (a weight used outside its "
                      "module's forward, e.g. F.linear(x, self.fc.weight), or a module torch.export inlined)",
                      stacklevel=3)
    return found


def _submodule(model: Any, path: str) -> Any:
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None


# ---------------------------------------------------------------------------
# graph side: a weight's spec, honouring its hint
# ---------------------------------------------------------------------------

def weight_spec(w: np.ndarray, hint: Hint | None = None, *, granularity: str = "per-channel",
                scheme: str = "symmetric", dtype: str = "int8", bits: int | None = None,
                block_size: int | None = None) -> QuantSpec:
    """Spec of one weight tensor ``[out, ...]``.

    Without a hint: per output channel (axis 0), per tensor or blockwise (one
    scale per ``block_size`` consecutive weights of a channel) on a ``bits``-wide
    grid (default 8); symmetric weights use the narrow range
    ``[-(2^(b-1) - 1), 2^(b-1) - 1]`` so that ``-w`` is representable.  With a
    codebook or bit-width hint the weight's few shared values each get one code
    (:func:`shared_value_spec`); a bit-width hint whose values are not shared
    sets the grid's width.  A sparsity hint is measured on ``w`` and recorded.
    """
    sparsity = _measured_sparsity(w, hint)
    if hint is not None and hint.max_values:
        spec = shared_value_spec(w, hint, dtype)
        if spec is not None:
            return dataclasses.replace(spec, sparsity=sparsity)
        if hint.bits:
            bits = hint.bits
    sym = scheme == "symmetric"
    if granularity == "per-tensor":
        lo, hi, axis = w.min(), w.max(), None
    elif granularity == "blockwise":
        flat = w.reshape(w.shape[0], -1)
        if not block_size or flat.shape[1] % block_size:
            from .errors import ConfigError

            raise ConfigError(f"blockwise weights need a block_size dividing {flat.shape[1]} (the weights per "
                              f"channel), got {block_size}")
        blocks = flat.reshape(-1, block_size)
        lo, hi, axis = blocks.min(1), blocks.max(1), 0
    else:
        flat = w.reshape(w.shape[0], -1)
        lo, hi, axis = flat.min(1), flat.max(1), 0
    scale, zero = qparams(lo, hi, dtype=f"int{bits or 8}", symmetric=sym, narrow=sym)
    return QuantSpec(dtype, tuple(float(v) for v in np.atleast_1d(scale)), tuple(int(v) for v in np.atleast_1d(zero)),
                     axis, sym, sym, bits if bits != 8 else None, block_size if granularity == "blockwise" else None,
                     None, sparsity)


def shared_value_spec(w: np.ndarray, hint: Hint, dtype: str = "int8") -> QuantSpec | None:
    """One integer code per shared value of ``w``, or ``None`` when ``w`` holds more distinct
    values (per tensor, or per channel with ``hint.per_channel``) than the hint allows.

    Values that are integer multiples of one step (ternary ``{-a, 0, a}``, DoReFa's
    ``{±1, ±1/3}``, binary ``±α``) get that step as scale: the codes are the smallest
    integers that hold them exactly (``±1``, ``{±1, ±3}``).  Others (k-means centroids)
    get the symmetric int8 max scale, each value its nearest code; ``codebook`` then
    lists the values shipped (two centroids closer than a step share a code).  ``bits``
    is the width of the codes, ``index_bits`` that of an index into the codebook.
    """
    limit = hint.max_values
    palette = np.unique(w)
    per_tensor = palette.size <= limit and not hint.per_channel
    rows = [palette] if per_tensor else [np.unique(r) for r in w.reshape(w.shape[0], -1)]
    if max(r.size for r in rows) > limit:
        return None
    scales = [_step(r) for r in rows]
    codes = [np.round(r.astype(np.float64) / s) for r, s in zip(rows, scales)]
    top = max(float(np.abs(c).max()) for c in codes)
    bits = max(2, math.ceil(math.log2(top + 1)) + 1)            # narrow symmetric: ±(2^(b-1) - 1)
    if per_tensor:
        shipped = np.unique(codes[0] * np.float64(np.float32(scales[0])))
        return QuantSpec(dtype, (scales[0],), (0,), None, True, True, bits,
                         codebook=tuple(float(v) for v in shipped), index_bits=_index_bits(shipped.size))
    return QuantSpec(dtype, tuple(scales), (0,) * len(scales), 0, True, True, bits,
                     index_bits=_index_bits(max(len(np.unique(c)) for c in codes)))


def _measured_sparsity(w: np.ndarray, hint: Hint | None) -> Sparsity | None:
    """The hint's sparsity pattern with the density measured on ``w`` (None: no hint, or no zeros left)."""
    if hint is None or hint.sparsity is None or np.count_nonzero(w) == w.size:
        return None
    return Sparsity.measure(w, hint.sparsity.pattern, hint.sparsity.block)


def _index_bits(n: int) -> int:
    return max(1, math.ceil(math.log2(n))) if n > 1 else 1


def _step(values: np.ndarray, qmax: int = 127) -> float:
    """The scale of :func:`shared_value_spec`: the common step of ``values`` (the smallest
    nonzero magnitude or half of it) when all are integer multiples of it within
    ``qmax``, else ``max |v| / qmax``."""
    mags = np.abs(values[values != 0]).astype(np.float64)
    if mags.size == 0:
        return 1.0
    for step in (float(mags.min()), float(mags.min()) / 2):
        scale = float(np.float32(step))
        ratio = values.astype(np.float64) / scale
        if np.allclose(ratio, np.round(ratio), rtol=0, atol=1e-4) and float(np.abs(ratio).max()) <= qmax:
            return scale
    return float(np.float32(float(mags.max()) / qmax))


# ---------------------------------------------------------------------------
# targets: what they carry, and the check of a plan against it
# ---------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Carries:
    """One weight encoding a target ships natively.

    ``dtype``: storage (``int8``, ``float16``, ``float32``, ``binary``); ``symmetric``:
    only zero-point-0 weights (XNNPACK's int8 kernels); ``bits``:
    the code widths stored natively (narrower codes travel exactly in the
    smallest wider one); ``granularity``: scale layouts; ``codebook``: shared
    values may be shipped (as one code each); ``sparsity``: patterns whose zeros
    the target skips (others ship dense); ``ops``: canonical ops whose weights
    may use it (empty: every weighted op).
    """

    dtype: str
    bits: tuple[int, ...] = ()
    granularity: tuple[str, ...] = ("per-tensor", "per-channel")
    codebook: bool = True
    sparsity: tuple[str, ...] = ()
    ops: tuple[str, ...] = ()
    symmetric: bool = False

    def takes(self, spec: QuantSpec, op: str) -> int | None:
        """The storage width ``spec`` travels in, or ``None`` when this encoding cannot carry it."""
        if self.ops and op not in self.ops:
            return None
        kind = "float" if spec.dtype.startswith("float") else "int"
        if kind == "float":
            return 16 if self.dtype == spec.dtype == "float16" else (32 if self.dtype == spec.dtype else None)
        if not self.dtype.startswith("int") or spec.granularity not in self.granularity:
            return None
        if spec.codebook is not None and not self.codebook:
            return None
        if self.symmetric and any(spec.zero_point):
            return None
        wide = [b for b in sorted(self.bits) if b >= spec.code_bits]
        return wide[0] if wide else None

    def describe(self) -> str:
        bits = "/".join(map(str, self.bits))
        extra = (", symmetric" if self.symmetric else "") + (f", sparse {'/'.join(self.sparsity)}"
                                                             if self.sparsity else "")
        return f"{self.dtype}{' ' + bits + '-bit' if bits else ''} ({', '.join(self.granularity)}{extra})" \
            if self.dtype.startswith("int") else self.dtype


def describe(spec: QuantSpec) -> str:
    """``int8 per-channel``, ``int4 blockwise 32``, ``2-bit codebook of 3 values (int2 codes)``,
    ``int8 per-channel, 1-bit codebook per channel``, ``float16``; plus sparsity."""
    if spec.dtype.startswith("float"):
        text = spec.dtype + (f", codebook of {len(spec.codebook)} values" if spec.codebook is not None else "")
    elif spec.codebook is not None:
        text = f"{spec.index_bits}-bit codebook of {len(spec.codebook)} values (int{spec.code_bits} codes)"
    else:
        text = f"int{spec.code_bits} {spec.granularity}" + (f" {spec.block_size}" if spec.block_size else "") \
            + ("" if not any(spec.zero_point) else " asymmetric") \
            + (f", {spec.index_bits}-bit codebook per channel" if spec.index_bits else "")
    if spec.sparsity is not None:
        text += f", {spec.sparsity.pattern} sparse (density {spec.sparsity.density})"
    return text


def check_plan(target: Any, graph: Any, plan: Any, hints: dict[str, Hint] | None = None) -> list[dict]:
    """Refuse (:class:`EncodingError`) any weight encoding of ``plan`` (or hint of ``hints``
    when there is no plan) that ``target`` cannot ship; return one row per weight
    saying what is planned and how it is stored (the manifest's ``encodings``).

    Hints of weights the plan has no spec for are checked as float weights.  A
    target declares ``carries`` (weights) and ``activation_dtypes``; a plan with
    activation specs of another dtype, or one missing a spec for a value where the
    target needs every one (``needs_activation_specs``), is refused too.  A target
    that declares no ``carries`` (a third-party one written before them) is not
    checked: its rows report the planned bits as stored.
    """
    from .graph import WEIGHTED_OPS

    declared = bool(getattr(target, "carries", ()))
    carries = carried_by(target)
    owner = {n.inputs[1]: n for n in graph.nodes if n.op in WEIGHTED_OPS and len(n.inputs) > 1}
    rows = []
    specs = dict(plan.weights) if plan is not None else {}
    for name, hint in (hints or {}).items():
        if name not in specs and name in owner and name in graph.constants:
            specs[name] = float_spec(graph.constants[name], hint, float_dtype(target))
    for name, spec in specs.items():
        node = owner.get(name)
        op = node.op if node is not None else ""
        layer = (node.module or node.name) if node is not None else name
        stored = next((w for c in carries if (w := c.takes(spec, op)) is not None), None)
        if stored is None and not declared:
            stored = spec.code_bits
        elif stored is None:
            carriers = [t for t in _registered_targets() if t.name != target.name
                        and any(c.takes(spec, op) is not None for c in carried_by(t))]
            carried = "; ".join(c.describe() for c in carries) or "no weight encodings"
            raise EncodingError(target.name, layer, name, describe(spec), carried, [t.name for t in carriers])
        row = {"layer": layer, "tensor": name, "planned": describe(spec), "bits": spec.code_bits,
               "stored_bits": stored}
        if spec.index_bits is not None:
            row["index_bits"] = spec.index_bits
        if spec.sparsity is not None:
            exploited = any(spec.sparsity.pattern in c.sparsity for c in carries if c.takes(spec, op) is not None)
            row["sparsity"] = {**spec.sparsity.to_dict(), "shipped": "sparse" if exploited else "dense"}
        rows.append(row)
    compute = getattr(plan, "compute", "static") if plan is not None else "static"
    if compute != "static" and compute not in getattr(target, "computes", ("static",)):
        takers = [t.name for t in _registered_targets() if compute in getattr(t, "computes", ("static",))]
        raise EncodingError(target.name, "(every layer)", "(activations)", f"{compute} quantization (plan of "
                            f"{plan.method!r})", "integer weights with static activations only", takers,
                            kind="activation")
    act_dtypes = tuple(getattr(target, "activation_dtypes", ()))
    for name, spec in (plan.activations.items() if plan is not None else ()):
        if spec.dtype not in act_dtypes:
            node = graph.node(name)
            carriers = [t.name for t in _registered_targets() if spec.dtype in getattr(t, "activation_dtypes", ())]
            raise EncodingError(target.name, (node.module or node.name) if node is not None else name, name,
                                f"{spec.dtype} activations", "/".join(act_dtypes) + " activations" if act_dtypes
                                else "float activations only", carriers, kind="activation")
    if getattr(target, "needs_activation_specs", False) and compute == "static":
        have = plan.activations if plan is not None else {}
        for name in [i[0] for i in graph.inputs] + [n.name for n in graph.nodes]:
            if name not in have:
                node = graph.node(name)
                raise EncodingError(target.name, (node.module or node.name) if node is not None else name, name,
                                    "float activations (the plan " + (f"of {plan.method!r} " if plan else "")
                                    + "has no spec for it)", "/".join(act_dtypes) + " activations",
                                    [t.name for t in _registered_targets() if not getattr(t, "needs_activation_specs",
                                                                                          False)],
                                    kind="activation")
    return rows


def float_dtype(target: Any) -> str:
    """The float storage a target ships unquantized weights in: its first float carrier (``float32``
    when it has none)."""
    return next((c.dtype for c in carried_by(target) if c.dtype.startswith("float")), "float32")


def carried_by(target: Any) -> tuple[Carries, ...]:
    """A target's ``carries`` declaration; none declared means float32 weights as torch has them."""
    return tuple(getattr(target, "carries", ())) or (Carries("float32"),)


def float_spec(w: np.ndarray, hint: Hint | None, dtype: str = "float32") -> QuantSpec:
    """A weight shipped as ``dtype`` floats: a hint's shared values (exact in float) and
    sparsity are recorded with it."""
    codebook = None
    if hint is not None and hint.max_values and not hint.per_channel:
        values = np.unique(w)
        if values.size <= hint.max_values:
            codebook = tuple(float(v) for v in values)
    return QuantSpec(dtype, codebook=codebook, sparsity=_measured_sparsity(w, hint),
                     index_bits=_index_bits(len(codebook)) if codebook else None)


def _registered_targets() -> list[type]:
    from . import plugins

    return [plugins.get("target", n) for n in plugins.names("target")]
