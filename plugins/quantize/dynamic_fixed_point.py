"""``dynamic-fixed-point`` — per-layer fixed-point formats Q(i.f) chosen from observed ranges.

Dynamic fixed point (Courbariaux et al., "Training deep neural networks with
low precision multiplications", 2014; Gysel et al., "Hardware-oriented
Approximation of Convolutional Neural Networks" (Ristretto), 2016) gives every
layer's weights and every activation its own fixed-point format: a signed
two's complement word of ``1 + i + f`` bits with ``i`` integer and ``f``
fraction bits, i.e. integer codes times the power of two ``2^-f``.  ``i`` is
the fewest integer bits that hold the largest magnitude seen, ``max|x|``:
``i = ceil(log2(max|x|))`` except that the largest code ``qmax = 2^(b-1) - 1``
(not ``2^(b-1)``) must reach it, so ``f`` is the most fraction bits with
``max|x| <= qmax * 2^-f`` and ``i = b - 1 - f`` (``max|x| = 3.2``, 8 bits: Q2.5,
step 1/32; either may be negative: ``max|x| = 0.01`` is Q-6.13).

Weights: one format per layer (``per_channel: true``: per output channel),
narrow grid ``[-qmax, qmax]``; activations: 8-bit words, zero point 0, the
format from the calibration range: ``overflow: none`` covers the largest
``|x|`` seen, ``percentile`` the ``percentile``-th percentile of ``|x|``
(outliers saturate, Ristretto's trade of overflow for resolution).  The plan
is an ordinary static int8 plan, so ``arm-int8`` ships it as it is: every scale
in the file (weights, the plan's activations, int32 bias ``2^-(f_in + f_w)``)
is a power of two, and each requantization ``s_in * s_w / s_out`` a bit shift.

Against ``ptq`` a power-of-two step is up to 2x coarser than the range needs
and zero point 0 leaves half the codes of a ReLU output unused.  Measured
(tests/methods/test_dynamic_fixed_point.py, SQNR vs float on 32 randn inputs):
calibrated on those inputs, lenet 39.0 dB against ptq's 43.9, mlp 34.7 against
41.1; calibrated on other batches, 37.8 against 38.1 and 34.2 against 24.9 (the
ranges rounded up saturate less on inputs beyond the calibration extremes).  A
LeNet trained on digits keeps its float accuracy in int8 (98.67 %, 450 test
digits).  The file is as large as ptq's (int8 codes either way).

>>> from plugins.quantize.dynamic_fixed_point import DynamicFixedPoint, fraction_bits
>>> DynamicFixedPoint(overflow="percentile").config.percentile
99.99
>>> int(fraction_bits(3.2)), int(fraction_bits(0.01))      # Q2.5 and Q-6.13
(5, 13)
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from sdk import hookimpl
from sdk.base import Quantizer
from sdk.calibrate import activation_ranges, weight_specs
from sdk.config import Config, check_choice, check_range
from sdk.encoding import weight_spec
from sdk.quant import QuantPlan, QuantSpec

#: the fraction bits a format may have: 2^-26 is the smallest activation scale arm-int8 writes
#: (sdk.litert.lowering.MIN_ACTIVATION_SCALE); 2^24 steps reach 2^31, far past any activation
FRACTION_BITS = (-24, 26)


def fraction_bits(amax, bits: int = 8) -> np.ndarray:
    """The most fraction bits ``f`` with ``amax <= (2^(bits-1) - 1) * 2^-f`` (per element of
    ``amax``), clamped to :data:`FRACTION_BITS`; an all-zero range gets ``f = 0`` (scale 1, as
    :func:`sdk.quant.qparams` gives it)."""
    amax = np.asarray(amax, np.float64)
    qmax = 2 ** (bits - 1) - 1
    safe = np.where(amax > 0, amax, 1.0)
    f = np.floor(np.log2(qmax / safe)).astype(np.int64)
    # log2 rounds: settle the boundary with exact power-of-two arithmetic
    f = np.where(np.ldexp(float(qmax), -f) < safe, f - 1, f)
    f = np.where(np.ldexp(float(qmax), -(f + 1)) >= safe, f + 1, f)
    f = np.clip(f, *FRACTION_BITS)
    return np.where(amax > 0, f, 0)


def fixed_point_spec(amax, code_bits: int = 8, *, narrow: bool, axis: int | None = None, **fields) -> QuantSpec:
    """The int8 :class:`~sdk.quant.QuantSpec` of the format(s) :func:`fraction_bits` picks:
    scale ``2^-f``, zero point 0 (``fields``: other QuantSpec fields, e.g. ``bits``, ``sparsity``)."""
    f = np.atleast_1d(fraction_bits(amax, code_bits))
    return QuantSpec("int8", tuple(float(np.ldexp(1.0, -int(v))) for v in f), (0,) * f.size, axis,
                     True, narrow, **fields)


def format_name(spec: QuantSpec) -> str:
    """``Qi.f`` of a per-tensor spec (``Qi.f..Qi.f``: the extremes of a per-channel one)."""
    b = spec.code_bits
    fs = sorted({-int(np.frexp(s)[1]) + 1 for s in spec.scale})     # 2^-f has exponent 1 - f in frexp
    names = [f"Q{b - 1 - f}.{f}" for f in (fs[-1], fs[0])] if len(fs) > 1 else [f"Q{b - 1 - fs[0]}.{fs[0]}"]
    return "..".join(names)


class DynamicFixedPoint(Quantizer):
    """Per-layer power-of-two (fixed-point) formats for weights and activations, int8 words."""

    name = "dynamic-fixed-point"
    version = "1.0"

    @dataclasses.dataclass(frozen=True)
    class Config(Config):
        weight_bits: int = 8            # word length of the weights (4: INT4 where the target carries it)
        per_channel: bool = False       # one format per output channel instead of per layer
        overflow: str = "none"          # or percentile: max|x| is that percentile of |x| (outliers saturate)
        percentile: float = 99.99
        num_batches: int | None = None  # use at most this many calibration batches
        progress: bool = True

        def __post_init__(self):
            check_choice("dynamic-fixed-point", "weight_bits", self.weight_bits, (4, 8))
            check_choice("dynamic-fixed-point", "per_channel", self.per_channel, (False, True))
            check_choice("dynamic-fixed-point", "overflow", self.overflow, ("none", "percentile"))
            check_range("dynamic-fixed-point", "percentile", self.percentile, 50.0, 100.0, lo_open=True)
            if self.num_batches is not None:
                check_range("dynamic-fixed-point", "num_batches", self.num_batches, 1)

    def weight_spec(self, w: np.ndarray, hint=None, name: str = "weight") -> QuantSpec:
        """Power-of-two spec of one weight tensor ``[out, ...]``: per layer (or per output channel),
        narrow grid; a sparsity or bit-width hint is honoured, shared values (codebooks) keep their exact codes."""
        cfg = self.config
        base = weight_spec(w, hint, granularity="per-channel" if cfg.per_channel else "per-tensor",
                           scheme="symmetric", bits=None if cfg.weight_bits == 8 else cfg.weight_bits)
        if base.codebook is not None or base.index_bits is not None:
            # shared values a training stage fixed (a codebook, binary or ternary weights) keep their exact
            # codes on the codebook's own step, as ptq ships them: a power of two would not hold them
            return base
        flat = np.abs(w.reshape(w.shape[0], -1).astype(np.float64))
        amax = flat.max(1) if cfg.per_channel else flat.max()
        return fixed_point_spec(amax, base.code_bits, narrow=True, axis=base.axis, bits=base.bits,
                                sparsity=base.sparsity)

    def activation_ranges(self, graph, batches: Sequence[tuple]) -> dict[str, float]:
        """``max|x|`` (or its percentile) of every graph input and node output over ``batches``; a
        learned output range in ``graph.hints`` (QAT, LSQ) wins over the observed one."""
        cfg = self.config
        kind, opts = ("percentile", {"percentile": cfg.percentile}) if cfg.overflow == "percentile" else ("minmax", {})
        ranges = activation_ranges(graph, batches, observer=kind, num_batches=cfg.num_batches, progress=cfg.progress,
                                   transform=np.abs, **opts)
        # |x| observed: hi is max|x|; a learned range (lo, hi) gives max(-lo, hi)
        return {name: float(max(-lo, hi)) for name, (lo, hi) in ranges.items()}

    def calibrate(self, graph, batches: Sequence[tuple]) -> QuantPlan:
        acts = {name: fixed_point_spec(amax, 8, narrow=False)
                for name, amax in self.activation_ranges(graph, batches).items()}
        weights = weight_specs(graph, lambda w, hint, node: self.weight_spec(w, hint, node.inputs[1]))
        formats = {name: format_name(spec) for name, spec in {**acts, **weights}.items()}
        return QuantPlan(acts, weights, method=self.name, config=self.config.to_dict(), extra={"formats": formats})


@hookimpl
def register_quantizers(register):
    register(DynamicFixedPoint)
