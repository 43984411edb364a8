"""``zero-run`` — value quantization above a base, shipped as zero runs and base-encoded values.

Three techniques in one method (the seed's one line: "value quantization with
sparsity multiplication, base encoding, and zero-run encoding"; read here as:
quantize the mask-multiplied weights of a pruned layer, zeros kept exactly),
applied after a pruner (``magnitude``, ``agp``, ...) in a recipe:

1. **Value quantization.**  Each coded layer's nonzero weights go onto
   ``2^bits`` nonzero levels ``±(b … b + K − 1) · s`` (``K = 2^(bits−1)``),
   zero kept exactly: ``s`` per output channel (``granularity``) puts the top
   level on the channel's largest ``|w|`` (``s = max|w| / (b + K − 1)``), and
   the *base* ``b`` (one per layer) is the largest integer for which every
   surviving weight still rounds to a level ``≥ b``.  A pruned layer has no
   weight in ``(−t, t)`` (``t`` its smallest survivor), so the levels cover
   ``[t, max|w|]`` only, not the empty gap around zero: at 90 % sparsity the
   step is several times finer than a plain ``bits``-bit grid's.  (``b = 1``,
   the plain grid ``±1 … ±K``, is what a dense layer gets; a 1-bit layer
   keeps ``±max|w|`` only and may round small weights to zero.)  The plan is an
   ordinary static int8 plan with those scales and zero point 0, so the
   ``.tflite``'s int8 weights *are* the level codes ``±(b … b + K − 1)``.
2. **Base encoding.**  Each nonzero is stored as a sign bit and its level
   index ``|code| − b``: ``bits`` bits per nonzero (:mod:`sdk.zero_run`).
3. **Zero-run encoding.**  The zeros before each nonzero are stored as
   ``run_bits``-bit run lengths, a full field ``2^run_bits − 1`` continuing the
   run (escape); ``run_bits: null`` lets each layer take the width that makes
   its stream smallest.  A layer's stream costs ``bits · n + run_bits · (n +
   escapes)`` bits for ``n`` nonzeros.

When the plan is packed for ``arm-int8`` the target writes ``weights.zr``
beside ``model.tflite`` (:func:`sdk.zero_run.attach_container`) and the
manifest entry ``weight_container`` (format ``edgepack-zr``) says how it
expands into the model and its sizes; every LiteRT runner decodes it and
checks it against the model before running.  Activations are calibrated as
``ptq`` does (``activation_observer``); layers not coded get ``ptq``'s
per-channel int8 weights.

Why a (post-training) quantizer and not a packing option: the level grid is
a choice of the plan's scales, made on the graph before lowering, and the
container only pays off on weights that are on it (8-bit ``ptq`` codes would
cost 8 bits a nonzero).  Layers that a torch-side quantizer gave shared
values or codes (``kmeans``, ``deep-compression``, ``dorefa`` ...) are refused:
this method would throw their values away.

>>> import numpy as np
>>> w = np.array([[0.0, 0.6, -1.0, 0.0], [0.4, 0.0, 0.0, -0.7]], np.float32)
>>> scales, base = level_grid(w, bits=2)       # levels ±2, ±3 (x s per channel)
>>> base, np.round(w / scales[:, None]).astype(int).tolist()
(2, [[0, 2, -3, 0], [2, 0, 0, -3]])
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np

from sdk import hookimpl
from sdk.base import Quantizer
from sdk.calibrate import activation_specs, weight_specs
from sdk.config import Config, check_choice, check_range
from sdk.encoding import Sparsity, weight_spec
from sdk.errors import ConfigError
from sdk.graph import WEIGHTED_OPS
from sdk.quant import OBSERVERS, QuantPlan, QuantSpec

__all__ = ["ZeroRun", "level_grid"]


def level_grid(w: np.ndarray, bits: int, per_channel: bool = True) -> tuple[np.ndarray, int]:
    """``(scales, base)`` of ``w``'s levels ``±(base … base + 2^(bits−1) − 1) · scale``: one float32
    scale per output channel (or one), the top level on the channel's ``max|w|``, and the
    largest base for which every nonzero weight rounds (half to even, as
    :func:`sdk.quant.quantize`) to a level, never to zero (base 1 may round some to zero).
    A channel of zeros gets scale 1."""
    k = 1 << (bits - 1)
    rows = np.abs(np.asarray(w, np.float64).reshape(w.shape[0] if per_channel else 1, -1))
    top = rows.max(axis=1)
    held = top > 0
    if not held.any():
        return np.ones(rows.shape[0], np.float32), 1
    low = np.where(rows > 0, rows, np.inf).min(axis=1)[held]
    ratio = low / top[held]
    # round(low / s) >= b with s = top / (b + k − 1)  ⇔  b · (1 − r) <= 0.5 + r · (k − 1)
    with np.errstate(divide="ignore"):
        bound = np.where(ratio < 1, (0.5 + ratio * (k - 1)) / np.maximum(1 - ratio, 1e-12), np.inf)
    most = float(bound.min())       # inf: every channel's survivors share one magnitude
    base = 128 - k if not math.isfinite(most) else int(min(max(math.floor(most), 1), 128 - k))
    while True:     # the bound is exact in reals; the check is on the float32 scales the model stores
        scales = np.where(held, top / (base + k - 1), 1.0).astype(np.float32)
        codes = np.round(rows[held] / scales[held, None].astype(np.float64))
        if base == 1 or codes[rows[held] > 0].min() >= base:
            return scales, base
        base -= 1


class ZeroRun(Quantizer):
    """Weights on 2^bits levels above a base, shipped as zero runs + base-encoded values (weights.zr)."""

    name = "zero-run"
    version = "1.0"

    @dataclasses.dataclass(frozen=True)
    class Config(Config):
        bits: int = 4                           # bits per nonzero: sign + (bits − 1) level index (1..7)
        run_bits: int | None = None             # run field width 1..16 (None: per layer the smallest stream)
        granularity: str = "per-channel"        # the step per output channel, or per-tensor (base: per layer)
        layers: tuple[str, ...] = ()            # conv / linear module names to code (empty: every one)
        exclude: tuple[str, ...] = ()           # module names left to ptq's int8 weights
        activation_observer: str = "mse"
        num_batches: int | None = None
        progress: bool = True

        def __post_init__(self):
            check_choice("zero-run", "bits", self.bits, range(1, 8))
            if self.run_bits is not None:
                check_choice("zero-run", "run_bits", self.run_bits, range(1, 17))
            check_choice("zero-run", "granularity", self.granularity, ("per-channel", "per-tensor"))
            check_choice("zero-run", "activation_observer", self.activation_observer, OBSERVERS)
            if self.num_batches is not None:
                check_range("zero-run", "num_batches", self.num_batches, 1)
            for field in ("layers", "exclude"):
                names = getattr(self, field)
                if isinstance(names, str) or not all(isinstance(n, str) for n in names):
                    raise ConfigError(f"zero-run: {field} must be a list of module names, got {names!r}")
                object.__setattr__(self, field, tuple(names))

    def chosen(self, graph) -> dict[str, str]:
        """``{weight constant: module name}`` of the layers to code; :class:`ConfigError` for an
        unknown name, no layer left, or a layer whose hint fixes shared values or codes."""
        cfg = self.config
        nodes = [n for n in graph.nodes if n.op in WEIGHTED_OPS and graph.is_const(n.inputs[1])]
        names = [n.module or n.name for n in nodes]
        unknown = sorted((set(cfg.layers) | set(cfg.exclude)) - set(names))
        if unknown:
            raise ConfigError(f"zero-run: layers/exclude name {', '.join(unknown)}, which are not conv / linear "
                              f"layers of the model; valid names: {', '.join(names) or '(none)'}")
        chosen = {n.inputs[1]: m for n, m in zip(nodes, names)
                  if (not cfg.layers or m in cfg.layers) and m not in cfg.exclude}
        if not chosen:
            raise ConfigError(f"zero-run: no layer left to code among {', '.join(names) or '(no conv / linear)'}")
        for weight, module in chosen.items():
            hint = graph.hints.get(weight)
            if hint is not None and (hint.codebook or hint.bits):
                raise ConfigError(f"zero-run: layer {module!r} holds the shared values / codes of "
                                  f"{hint.source or 'an earlier stage'}, which zero-run's levels would replace; "
                                  f"exclude the layer (exclude: [{module!r}]) or drop that stage from the recipe")
        return chosen

    def weight_spec(self, w: np.ndarray, hint=None) -> QuantSpec:
        """The int8 spec of one coded weight: :func:`level_grid` scales, zero point 0, codes of
        ``±(base + 2^(bits−1) − 1)`` at most (recorded as at least 5 bits, so that the target keeps
        them in int8 bytes — what ``weights.zr`` expands into — rather than packing INT4)."""
        cfg = self.config
        per_channel = cfg.granularity == "per-channel"
        scales, base = level_grid(w, cfg.bits, per_channel)
        top = base + (1 << (cfg.bits - 1)) - 1
        width = max(5, math.ceil(math.log2(top + 1)) + 1)
        sparsity = None
        if hint is not None and hint.sparsity is not None and np.count_nonzero(w) < w.size:
            sparsity = Sparsity.measure(w, hint.sparsity.pattern, hint.sparsity.block)
        return QuantSpec("int8", tuple(float(s) for s in scales), (0,) * scales.size, 0 if per_channel else None,
                         True, True, width if width < 8 else None, sparsity=sparsity)

    def calibrate(self, graph, batches: Sequence[tuple]) -> QuantPlan:
        cfg = self.config
        chosen = self.chosen(graph)
        acts = activation_specs(graph, batches, observer=cfg.activation_observer, num_batches=cfg.num_batches,
                                progress=cfg.progress)
        weights = weight_specs(graph, lambda w, hint, node: self.weight_spec(w, hint) if node.inputs[1] in chosen
                               else weight_spec(w, hint))
        return QuantPlan(acts, weights, method=self.name, config=cfg.to_dict(),
                         extra={"zero_run": {"tensors": chosen, "run_bits": cfg.run_bits, "bits": cfg.bits}})


@hookimpl
def register_quantizers(register):
    register(ZeroRun)
