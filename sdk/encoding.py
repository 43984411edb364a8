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
('per-tensor', (-0.5, 0.0, 0.5), [-127, 0, 127])
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
    weights with a scale per filter).  ``source`` names the method.
    """

    codebook: int | None = None
    bits: int | None = None
    sparsity: Sparsity | None = None
    per_channel: bool = False
    source: str = ""

    def merged(self, other: "Hint") -> "Hint":
        """Both hints at once (a pruned then k-means-quantized layer); ``other`` wins per field."""
        pick = lambda a, b: b if b is not None else a  # noqa: E731
        return Hint(pick(self.codebook, other.codebook), pick(self.bits, other.bits),
                    pick(self.sparsity, other.sparsity), self.per_channel or other.per_channel,
                    "+".join(dict.fromkeys(s for h in (self, other) for s in h.source.split("+") if s)))

    def to_dict(self) -> dict:
        d = {k: v for k, v in dataclasses.asdict(self).items() if v not in (None, False, "")}
        if self.sparsity is not None:
            d["sparsity"] = self.sparsity.to_dict()
        return d


def annotate(module: Any, hint: Hint, tensor: str = "weight") -> None:
    """Record ``hint`` for ``module.<tensor>`` (merged with earlier stages' hints)."""
    hints = dict(getattr(module, HINTS_ATTR, None) or {})
    hints[tensor] = hints[tensor].merged(hint) if tensor in hints else hint
    setattr(module, HINTS_ATTR, hints)


def hints_of(module: Any, tensor: str = "weight") -> Hint | None:
    """The hint recorded for ``module.<tensor>``, if any."""
    return (getattr(module, HINTS_ATTR, None) or {}).get(tensor)


def graph_hints(model: Any, graph: Any) -> dict[str, Hint]:
    """Hints of ``model``'s layers by the graph's weight constant names (capture calls this)."""
    from .graph import WEIGHTED_OPS

    found: dict[str, Hint] = {}
    for node in graph.nodes:
        if node.op not in WEIGHTED_OPS or not node.module or not graph.is_const(node.inputs[1]):
            continue
        try:
            module = model.get_submodule(node.module)
        except AttributeError:
            continue
        hint = hints_of(module)
        if hint is not None:
            found[node.inputs[1]] = hint
    return found


# ---------------------------------------------------------------------------
# graph side: a weight's spec, honouring its hint
# ---------------------------------------------------------------------------

def weight_spec(w: np.ndarray, hint: Hint | None = None, *, granularity: str = "per-channel",
                scheme: str = "symmetric", dtype: str = "int8", bits: int | None = None,
                block_size: int | None = None) -> QuantSpec:
    """Spec of one weight tensor ``[out, ...]``.

    Without a hint: per output channel (axis 0), per tensor or blockwise (one
    scale per ``block_size`` consecutive weights of a channel), symmetric weights
    on the narrow range ``[-(2^(b-1) - 1), 2^(b-1) - 1]`` so that ``-w`` is
    representable.  With a codebook or bit-width hint the weight's few shared
    values each get one code: a scale that puts them on the integer grid exactly
    when they are multiples of one step (ternary, DoReFa, binary), else the
    symmetric max scale; per tensor unless the values differ per channel.  A
    sparsity hint is measured on ``w`` and recorded.
    """
    qbits = bits if bits is not None else 8
    sparsity = Sparsity.measure(w, hint.sparsity.pattern, hint.sparsity.block) \
        if hint is not None and hint.sparsity is not None and np.count_nonzero(w) < w.size else None
    if hint is not None and (hint.codebook or hint.bits):
        spec = _shared_value_spec(w, hint, dtype)
        if spec is not None:
            return dataclasses.replace(spec, sparsity=sparsity)
    sym = scheme == "symmetric"
    qmax = 2 ** (qbits - 1) - 1
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
    scale, zero = _grid(lo, hi, qmax, sym)
    return QuantSpec(dtype, tuple(float(v) for v in np.atleast_1d(scale)), tuple(int(v) for v in np.atleast_1d(zero)),
                     axis, sym, sym, bits, block_size if granularity == "blockwise" else None, None, sparsity)


def _grid(lo, hi, qmax: int, symmetric: bool):
    """Scale and zero point of a ``bits``-wide grid (``qmax = 2^(b-1) - 1``) over ``[lo, hi]``."""
    if qmax == 127:
        return qparams(lo, hi, dtype="int8", symmetric=symmetric, narrow=symmetric)
    lo = np.minimum(np.asarray(lo, np.float64), 0.0)
    hi = np.maximum(np.asarray(hi, np.float64), 0.0)
    if symmetric:
        scale, zero = np.maximum(-lo, hi) / qmax, np.zeros(np.shape(lo), np.int64)
    else:
        scale = (hi - lo) / (2 * qmax + 1)
        safe = np.where(scale > 0, scale, 1.0)
        zero = np.clip(np.round(-qmax - 1 - lo / safe), -qmax - 1, qmax).astype(np.int64)
    return np.where(scale > 0, scale, 1.0).astype(np.float32), zero


def _shared_value_spec(w: np.ndarray, hint: Hint, dtype: str) -> QuantSpec | None:
    """One code per shared value (see :func:`weight_spec`); ``None`` when ``w`` holds more
    distinct values than the hint allows (the hint no longer describes the weight)."""
    limit = hint.codebook or 2 ** hint.bits
    index_bits = max(1, math.ceil(math.log2(limit))) if limit > 1 else 1
    palette = np.unique(w)
    if palette.size <= limit and not hint.per_channel:
        scale = _exact_step(palette)
        return QuantSpec(dtype, (scale,), (0,), None, True, True, index_bits,
                         codebook=tuple(float(v) for v in palette))
    flat = w.reshape(w.shape[0], -1)
    rows = [np.unique(r) for r in flat]
    if max(r.size for r in rows) > limit:
        return None
    scales = tuple(_exact_step(r) for r in rows)
    return QuantSpec(dtype, scales, (0,) * len(scales), 0, True, True, index_bits)


def _exact_step(values: np.ndarray, qmax: int = 127) -> float:
    """A scale that maps every value to an integer in ``[-qmax, qmax]``: exactly when all
    values are integer multiples of the smallest nonzero magnitude (or of half of it),
    otherwise ``max |v| / qmax``."""
    mags = np.abs(values[values != 0]).astype(np.float64)
    if mags.size == 0:
        return 1.0
    top = float(mags.max())
    for step in (float(mags.min()), float(mags.min()) / 2):
        ratio = values.astype(np.float64) / step
        n = float(np.abs(ratio).max())
        if np.allclose(ratio, np.round(ratio), atol=1e-4) and n <= qmax:
            m = qmax // int(round(n))
            scale = np.float32(step / m)
            codes = values.astype(np.float64) / float(scale)
            if np.allclose(codes, np.round(codes), atol=1e-3):
                return float(scale)
    return float(np.float32(top / qmax))


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
    """``int8 per-channel``, ``int4 codes (blockwise 32)``, ``2-bit codebook of 3 values``, ``float16``."""
    if spec.dtype.startswith("float"):
        return spec.dtype
    if spec.codebook is not None:
        text = f"{spec.code_bits}-bit codebook of {len(spec.codebook)} values"
    else:
        text = f"int{spec.code_bits} {spec.granularity}" + (f" {spec.block_size}" if spec.block_size else "") \
            + ("" if not any(spec.zero_point) else " asymmetric")
    if spec.sparsity is not None:
        text += f", {spec.sparsity.pattern} sparse (density {spec.sparsity.density})"
    return text


def check_plan(target: Any, graph: Any, plan: Any, hints: dict[str, Hint] | None = None) -> list[dict]:
    """Refuse (:class:`EncodingError`) any weight encoding of ``plan`` (or hint of ``hints``
    when there is no plan) that ``target`` cannot ship; return one row per weight
    saying what is planned and how it is stored (the manifest's ``encodings``).

    A target declares ``carries`` (weights) and ``activation_dtypes``; a plan
    with activation specs of another dtype, or none where the target needs
    them (``needs_activation_specs``), is refused too.
    """
    from .errors import ConfigError
    from .graph import WEIGHTED_OPS

    carries = carried_by(target)
    owner = {n.inputs[1]: n for n in graph.nodes if n.op in WEIGHTED_OPS and len(n.inputs) > 1}
    rows = []
    specs = dict(plan.weights) if plan is not None else {}
    for name, hint in (hints or {}).items():
        if name not in specs and name in graph.constants:
            specs[name] = _float_hint_spec(graph.constants[name], hint, float_dtype(target))
    for name, spec in specs.items():
        node = owner.get(name)
        op = node.op if node is not None else ""
        layer = (node.module or node.name) if node is not None else name
        stored = next((w for c in carries if (w := c.takes(spec, op)) is not None), None)
        if stored is None:
            carriers = [t for t in _registered_targets() if t.name != target.name
                        and any(c.takes(spec, op) is not None for c in carried_by(t))]
            carried = "; ".join(c.describe() for c in carries) or "no weight encodings"
            raise EncodingError(target.name, layer, name, describe(spec), carried, [t.name for t in carriers])
        row = {"layer": layer, "tensor": name, "planned": describe(spec), "bits": spec.code_bits,
               "stored_bits": stored}
        if spec.sparsity is not None:
            exploited = any(spec.sparsity.pattern in c.sparsity for c in carries if c.takes(spec, op) is not None)
            row["sparsity"] = {**spec.sparsity.to_dict(), "shipped": "sparse" if exploited else "dense"}
        rows.append(row)
    act_dtypes = tuple(getattr(target, "activation_dtypes", ()))
    for name, spec in (plan.activations.items() if plan is not None else ()):
        if spec.dtype not in act_dtypes:
            node = graph.node(name)
            carriers = [t.name for t in _registered_targets() if spec.dtype in getattr(t, "activation_dtypes", ())]
            raise EncodingError(target.name, (node.module or node.name) if node is not None else name, name,
                                f"{spec.dtype} activations", "/".join(act_dtypes) + " activations" if act_dtypes
                                else "float activations only", carriers, kind="activation")
    if getattr(target, "needs_activation_specs", False) and (plan is None or not plan.activations):
        raise ConfigError(f"target {target.name!r} needs {'/'.join(act_dtypes)} activation specs; the plan "
                          f"{'of ' + repr(plan.method) + ' ' if plan else ''}has none (weight-only plans need a "
                          "target with float activations)")
    return rows


def float_dtype(target: Any) -> str:
    """The float storage a target ships unquantized weights in: its first float carrier (``float32``
    when it has none)."""
    return next((c.dtype for c in carried_by(target) if c.dtype.startswith("float")), "float32")


def carried_by(target: Any) -> tuple[Carries, ...]:
    """A target's ``carries`` declaration; none declared means float32 weights as torch has them."""
    return tuple(getattr(target, "carries", ())) or (Carries("float32"),)


def _float_hint_spec(w: np.ndarray, hint: Hint, dtype: str) -> QuantSpec:
    """A float target without a plan: the hint's codebook and sparsity travel as exact float values."""
    values = np.unique(w)
    codebook = tuple(float(v) for v in values) if (hint.codebook or hint.bits) and not hint.per_channel \
        and values.size <= (hint.codebook or 2 ** (hint.bits or 0)) else None
    sparsity = Sparsity.measure(w, hint.sparsity.pattern, hint.sparsity.block) \
        if hint.sparsity and np.count_nonzero(w) < w.size else None
    return QuantSpec(dtype, codebook=codebook, sparsity=sparsity,
                     bits=max(1, math.ceil(math.log2(len(codebook)))) if codebook and len(codebook) > 1 else None)


def _registered_targets() -> list[type]:
    from . import plugins

    return [plugins.get("target", n) for n in plugins.names("target")]
