"""Quantization math shared by quantizers and targets.

Affine quantization maps a real ``r`` to an integer ``q = clamp(round(r / s) + z)``
and back with ``r ≈ s · (q − z)``.  This module computes ``(s, z)`` from observed
ranges with the usual formulas, keeps the observers that collect those ranges,
and defines :class:`QuantSpec` / :class:`QuantPlan`, the record a quantizer hands
to a target.

>>> s, z = qparams(np.float32(-1.0), np.float32(3.0), dtype="int8", symmetric=False)
>>> round(float(s), 6), int(z)
(0.015686, -64)
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from .errors import CalibrationError

FP16_MAX = 65504.0            # largest finite float16
FP16_TINY = 2.0 ** -24        # smallest float16 subnormal: |x| below half of it rounds to 0

_RANGES = {"int8": (-128, 127), "uint8": (0, 255), "int4": (-8, 7), "int2": (-2, 1), "int16": (-32768, 32767),
           "int32": (-(2 ** 31), 2 ** 31 - 1)}


def qrange(dtype: str, narrow: bool = False) -> tuple[int, int]:
    """Integer range of ``dtype``; ``narrow`` drops the lowest value (int8 → [-127, 127])."""
    lo, hi = _RANGES[dtype]
    return (lo + 1 if narrow else lo), hi


def qparams(lo: np.ndarray | float, hi: np.ndarray | float, *, dtype: str = "int8", symmetric: bool,
            narrow: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Scale and zero point for the real range ``[lo, hi]`` (scalars or per-channel arrays).

    The range is first widened to contain 0 so that zero is exactly representable
    (padding and ReLU need it).  Symmetric: ``s = max(|lo|, |hi|) / ((qmax − qmin) / 2)``,
    ``z = 0``.  Asymmetric: ``s = (hi − lo) / (qmax − qmin)``,
    ``z = clamp(round(qmin − lo / s))``.  An all-zero range gets ``s = 1``.
    """
    qmin, qmax = qrange(dtype, narrow)
    lo = np.minimum(np.asarray(lo, np.float64), 0.0)
    hi = np.maximum(np.asarray(hi, np.float64), 0.0)
    if symmetric:
        amax = np.maximum(-lo, hi)
        scale = amax / ((qmax - qmin) / 2.0)
        zero = np.zeros_like(scale, dtype=np.int64)
    else:
        scale = (hi - lo) / float(qmax - qmin)
        safe = np.where(scale > 0, scale, 1.0)
        zero = np.clip(np.round(qmin - lo / safe), qmin, qmax).astype(np.int64)
    scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
    return scale, zero


def quantize(x: np.ndarray, scale: np.ndarray, zero: np.ndarray, *, dtype: str = "int8", axis: int | None = None,
             narrow: bool = False) -> np.ndarray:
    """``clamp(round_half_even(x / s) + z)`` as ``dtype`` (per-channel along ``axis``)."""
    qmin, qmax = qrange(dtype, narrow)
    s, z = np.asarray(scale, np.float64), np.asarray(zero, np.int64)
    if axis is not None and s.ndim:
        shape = [1] * x.ndim
        shape[axis] = -1
        s, z = s.reshape(shape), z.reshape(shape)
    q = np.clip(np.round(x.astype(np.float64) / s) + z, qmin, qmax)
    return q.astype({"int8": np.int8, "uint8": np.uint8, "int4": np.int8, "int16": np.int16,
                     "int32": np.int32}[dtype])


def dequantize(q: np.ndarray, scale: np.ndarray, zero: np.ndarray, axis: int | None = None) -> np.ndarray:
    """``s · (q − z)`` as float32."""
    s, z = np.asarray(scale, np.float64), np.asarray(zero, np.int64)
    if axis is not None and s.ndim:
        shape = [1] * q.ndim
        shape[axis] = -1
        s, z = s.reshape(shape), z.reshape(shape)
    return (s * (q.astype(np.int64) - z)).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class QuantSpec:
    """How one tensor is quantized, and for a weight the encoding the target must ship.

    ``dtype`` is the storage type of the integers (``int8``, ``int32``) or a float
    type (``float16``: scale and zero point unused).  ``bits`` is the width of the
    integer codes (``None``: the dtype's width); codes narrower than the storage
    (a 4-bit plan in int8 storage) must be shipped exactly.  Granularity is
    per-tensor (``axis`` None), per-channel (``axis``) or blockwise (``axis`` and
    ``block_size``: one scale per ``block_size`` consecutive weights of a channel).
    ``codebook``: weights are shared, ``len(codebook)`` real values, each
    an index of ``index_bits`` (per channel when ``codebook`` is ``None``).  ``sparsity``: zeros to be exploited (see
    :class:`sdk.encoding.Sparsity`).
    """

    dtype: str                          # "int8", "int4", "int32", "float16", ...
    scale: tuple[float, ...] = ()
    zero_point: tuple[int, ...] = ()
    axis: int | None = None             # channel axis for per-channel specs
    symmetric: bool = False
    narrow: bool = False
    bits: int | None = None             # width of the integer codes; None: the dtype's
    block_size: int | None = None       # blockwise granularity along the flattened input dims
    codebook: tuple[float, ...] | None = None
    sparsity: Any = None                # sdk.encoding.Sparsity
    index_bits: int | None = None       # width of an index into shared values (codebook, or per channel)

    @classmethod
    def from_range(cls, lo: Any, hi: Any, *, dtype: str = "int8", symmetric: bool, narrow: bool = False,
                   axis: int | None = None) -> "QuantSpec":
        s, z = qparams(lo, hi, dtype=dtype, symmetric=symmetric, narrow=narrow)
        return cls(dtype, tuple(float(v) for v in np.atleast_1d(s)), tuple(int(v) for v in np.atleast_1d(z)),
                   axis, symmetric, narrow)

    @property
    def per_channel(self) -> bool:
        return self.axis is not None

    @property
    def granularity(self) -> str:
        """``per-tensor``, ``per-channel`` or ``blockwise``."""
        if self.axis is None:
            return "per-tensor"
        return "blockwise" if self.block_size else "per-channel"

    @property
    def code_bits(self) -> int:
        """Width of the integer codes (``bits``, else the storage width)."""
        if self.bits is not None:
            return self.bits
        return {"int8": 8, "uint8": 8, "int4": 4, "int16": 16, "int32": 32, "float16": 16}.get(self.dtype, 32)

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        return np.asarray(self.scale, np.float32), np.asarray(self.zero_point, np.int64)

    def quantize(self, x: np.ndarray) -> np.ndarray:
        s, z = self.arrays()
        if self.block_size:          # one (scale, zero) per block of a channel's flattened weights
            blocks = x.reshape(x.shape[0], -1, self.block_size)
            q = quantize(blocks, s.reshape(blocks.shape[:2] + (1,)), z.reshape(blocks.shape[:2] + (1,)),
                         dtype=self.dtype, narrow=self.narrow)
            return q.reshape(x.shape)
        return quantize(x, s if self.per_channel else s[0], z if self.per_channel else z[0], dtype=self.dtype,
                        axis=self.axis, narrow=self.narrow)

    def to_dict(self) -> dict:
        d = {"dtype": self.dtype, "scale": list(self.scale), "zero_point": list(self.zero_point), "axis": self.axis}
        if self.bits is not None:
            d["bits"] = self.bits
        if self.block_size is not None:
            d["block_size"] = self.block_size
        if self.codebook is not None:
            d["codebook"] = list(self.codebook)
        if self.index_bits is not None:
            d["index_bits"] = self.index_bits
        if self.sparsity is not None:
            d["sparsity"] = self.sparsity.to_dict()
        return d


#: where a plan's integer weights meet the activations (:attr:`QuantPlan.compute`)
COMPUTE = ("static", "dynamic", "weight-only")


@dataclasses.dataclass
class QuantPlan:
    """Quantization specs of a graph's values, by value name: the record a quantizer
    hands to a target.

    ``activations`` covers graph inputs and node outputs (empty: float
    activations, e.g. weight-only plans), ``weights`` the constant weight inputs
    of conv/linear nodes, one :class:`QuantSpec` each: the encoding the target
    must ship (:func:`sdk.encoding.check_plan` refuses what it cannot).
    ``method`` names the quantizer that made it (recorded in the manifest).
    ``compute`` says where the integer weights meet the activations:
    ``static`` (integer activations with the calibrated specs), ``dynamic``
    (float activations quantized at run time, per op: dynamic-range
    quantization) or ``weight-only`` (the weights are dequantized to float once
    and the ops compute in float: a size win at float speed).
    """

    activations: dict[str, QuantSpec]
    weights: dict[str, QuantSpec]
    method: str = ""
    config: dict = dataclasses.field(default_factory=dict)
    extra: dict = dataclasses.field(default_factory=dict)    # method-specific results (fp16 range analysis)
    compute: str = "static"

    def __post_init__(self):
        if self.compute not in COMPUTE:
            from .errors import ConfigError

            raise ConfigError(f"QuantPlan.compute must be one of {', '.join(COMPUTE)}, got {self.compute!r}")

    def then(self, later: "QuantPlan") -> "QuantPlan":
        """This plan refined by a later graph-side stage's: its specs win where both have one, and
        ``extra`` (method-specific results, e.g. fp16's ``keep_fp32``) is the later stage's."""
        stages = [*self.config.get("stages", [self.config]), *later.config.get("stages", [later.config])]
        return QuantPlan({**self.activations, **later.activations}, {**self.weights, **later.weights},
                         method=f"{self.method}+{later.method}", config={"stages": stages},
                         extra=dict(later.extra), compute=later.compute if later.compute != "static" else self.compute)


# ---------------------------------------------------------------------------
# observers: collect a range from calibration tensors
# ---------------------------------------------------------------------------

class Observer:
    """Collects statistics of one tensor over calibration batches; ``range()`` returns ``(lo, hi)``."""

    def __init__(self, axis: int | None = None):
        self.axis = axis
        self.count = 0

    def _reduce_dims(self, x: np.ndarray) -> tuple[int, ...]:
        return tuple(d for d in range(x.ndim) if d != self.axis) if self.axis is not None else tuple(range(x.ndim))

    def update(self, x: np.ndarray) -> None:
        x = np.asarray(x, np.float32)
        if x.size == 0:
            raise CalibrationError(
                f"a layer produced an empty tensor (shape {tuple(x.shape)}) during calibration: a layer with "
                "0 channels or features has nothing to quantize; remove it from the model (or give it at "
                "least one output) before deploying")
        if self.axis is not None and not -x.ndim <= self.axis < x.ndim:
            raise CalibrationError(f"observer channel axis {self.axis} does not exist in a tensor of shape "
                                   f"{tuple(x.shape)}")
        if not np.all(np.isfinite(x)):
            raise CalibrationError("non-finite values (NaN or inf) reached an observer")
        self._update(x)
        self.count += 1

    def _update(self, x: np.ndarray) -> None:
        raise NotImplementedError

    def range(self) -> tuple[np.ndarray, np.ndarray]:
        if not self.count:
            raise CalibrationError("observer saw no data")
        return self._range()

    def _range(self) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError


class MinMaxObserver(Observer):
    """Running min and max over every batch."""

    def __init__(self, axis: int | None = None):
        super().__init__(axis)
        self.lo = self.hi = None

    def _update(self, x):
        d = self._reduce_dims(x)
        lo, hi = x.min(axis=d), x.max(axis=d)
        self.lo = lo if self.lo is None else np.minimum(self.lo, lo)
        self.hi = hi if self.hi is None else np.maximum(self.hi, hi)

    def _range(self):
        return self.lo, self.hi


class MovingMinMaxObserver(Observer):
    """Exponential moving average of per-batch min and max (``momentum`` weight of the old value)."""

    def __init__(self, axis: int | None = None, momentum: float = 0.9):
        super().__init__(axis)
        self.momentum = momentum
        self.lo = self.hi = None

    def _update(self, x):
        d = self._reduce_dims(x)
        lo, hi = x.min(axis=d).astype(np.float64), x.max(axis=d).astype(np.float64)
        if self.lo is None:
            self.lo, self.hi = lo, hi
        else:
            m = self.momentum
            self.lo, self.hi = m * self.lo + (1 - m) * lo, m * self.hi + (1 - m) * hi

    def _range(self):
        return self.lo, self.hi


class _SampleObserver(Observer):
    """Keeps (a bounded sample of) the values; subclasses pick a range from them."""

    max_values = 1 << 20

    def __init__(self, axis: int | None = None, seed: int = 0):
        super().__init__(axis)
        self.values: list[np.ndarray] = []
        self.rng = np.random.default_rng(seed)

    def _update(self, x):
        flat = x.reshape(-1)
        if flat.size > self.max_values // 8:
            flat = self.rng.choice(flat, self.max_values // 8, replace=False)
        self.values.append(flat)

    def all(self) -> np.ndarray:
        return np.concatenate(self.values)


class PercentileObserver(_SampleObserver):
    """Clip to the ``percentile``-th percentile of |x| on each side (outlier-robust)."""

    def __init__(self, axis: int | None = None, percentile: float = 99.99):
        super().__init__(axis)
        self.percentile = percentile

    def _range(self):
        v = self.all()
        lo = np.percentile(v, 100.0 - self.percentile)
        hi = np.percentile(v, self.percentile)
        return np.float64(lo), np.float64(hi)


class MSEObserver(_SampleObserver):
    """The clipping range that minimises the mean squared quantize-dequantize error.

    Candidates shrink the observed range ``[lo, hi]`` by factors ``α`` in
    ``[α_min, 1]`` (``grid`` of them; both ends together, so zero stays where
    it is); each is scored on a ``bins``-bin histogram of the observed values
    with the same :func:`qparams` rule the plan will use (``symmetric``,
    ``dtype``).  Outliers are clipped when the precision gained on the bulk of
    the values outweighs their clipping error.
    """

    def __init__(self, axis: int | None = None, *, symmetric: bool = False, dtype: str = "int8",
                 grid: int = 100, alpha_min: float = 0.05, bins: int = 2048):
        super().__init__(axis)
        self.symmetric, self.dtype, self.grid, self.alpha_min, self.bins = symmetric, dtype, grid, alpha_min, bins

    def _range(self):
        v = self.all().astype(np.float64)
        lo, hi = min(float(v.min()), 0.0), max(float(v.max()), 0.0)
        if hi - lo == 0:
            return np.float64(lo), np.float64(hi)
        counts, edges = np.histogram(v, bins=self.bins, range=(lo, hi))
        centers = (edges[:-1] + edges[1:]) / 2
        best, best_err = (lo, hi), np.inf
        for a in np.linspace(1.0, self.alpha_min, self.grid):
            err = quantization_mse(centers, counts, a * lo, a * hi, symmetric=self.symmetric, dtype=self.dtype)
            if err < best_err:
                best, best_err = (a * lo, a * hi), err
        return np.float64(best[0]), np.float64(best[1])


def quantization_mse(values: np.ndarray, weights: np.ndarray, lo: float, hi: float, *, symmetric: bool,
                     dtype: str = "int8") -> float:
    """Weighted mean of ``(x − dequantize(quantize(x)))²`` with the parameters of ``[lo, hi]``."""
    scale, zero = qparams(lo, hi, dtype=dtype, symmetric=symmetric, narrow=False)
    qmin, qmax = qrange(dtype)
    q = np.clip(np.round(values / float(scale) + int(zero)), qmin, qmax)
    err = (values - (q - int(zero)) * float(scale)) ** 2
    return float(np.sum(err * weights) / max(float(np.sum(weights)), 1.0))


class EntropyObserver(_SampleObserver):
    """TensorRT's calibration (Migacz, "8-bit Inference with TensorRT", GTC 2017):
    the threshold whose quantized distribution loses the least information.

    A histogram of |x| (of x when no value is negative; ``bins`` bins, fewer
    when there are under 8 values per bin) is cut at every candidate bin
    ``i ≥ levels``: ``P`` is the first ``i`` bins
    with the clipped tail added to the last one, ``Q`` merges those bins into
    ``levels`` quantization levels and spreads each level's mass evenly over its
    non-empty bins; the chosen threshold minimises ``KL(P ‖ Q)``.  Exact zeros
    are left out: zero is representable at any threshold, and a ReLU output's
    spike at zero would pull the threshold down for nothing.  ``levels`` is
    127 for values of both signs (one side of a symmetric int8 grid) and 255 for
    non-negative values.  The range is ``[-T, T]`` (``[0, T]``), clipped to what
    was observed.
    """

    def __init__(self, axis: int | None = None, *, bins: int = 2048, stride: int = 1):
        super().__init__(axis)
        self.bins, self.stride = bins, stride

    def _range(self):
        v = self.all().astype(np.float64)
        lo, hi = float(v.min()), float(v.max())
        signed = lo < 0
        mags = np.abs(v) if signed else v
        top = float(mags.max())
        if top == 0:
            return np.float64(min(lo, 0.0)), np.float64(max(hi, 0.0))
        # at least ~8 values per bin on average: a sparse histogram is no distribution to compare
        # (too few values for more bins than levels: no clipping)
        mags = mags[mags > 0]      # zero is exact at every threshold: ReLU's spike would only skew the fit
        bins = max(1, min(self.bins, mags.size // 8))
        hist, _ = np.histogram(mags, bins=bins, range=(0.0, top))
        levels = 127 if signed else 255
        i = kl_threshold_bin(hist, levels, self.stride)
        t = (i + 0.5) * top / bins if i < bins else top
        return np.float64(max(lo, -t) if signed else min(lo, 0.0)), np.float64(min(hi, t))


def kl_threshold_bin(hist: np.ndarray, levels: int, stride: int = 1) -> int:
    """Number of histogram bins to keep (see :class:`EntropyObserver`)."""
    hist = np.asarray(hist, np.float64)
    n = hist.size
    if n <= levels:
        return n
    best_i, best_kl = n, np.inf
    for i in range(levels, n + 1, stride):
        p = hist[:i].copy()
        p[-1] += hist[i:].sum()
        # merge the i bins into `levels` consecutive groups, then spread each group's mass evenly
        # over its non-empty bins
        group = np.arange(i) * levels // i
        nonempty = p > 0
        mass = np.bincount(group, weights=hist[:i], minlength=levels)
        count = np.bincount(group, weights=nonempty, minlength=levels)
        q = np.where(nonempty, mass[group] / np.maximum(count[group], 1), 0.0)
        kl = _kl(p, q)
        if kl < best_kl:
            best_i, best_kl = i, kl
    return best_i


def _smooth(d: np.ndarray, eps: float = 1e-4) -> np.ndarray:
    """Normalise ``d``, give its empty bins ``eps`` of mass, and normalise again."""
    d = d / d.sum()
    d = np.where(d == 0, eps, d)
    return d / d.sum()


def _kl(p: np.ndarray, q: np.ndarray) -> float:
    """``KL(P ‖ Q)`` over P's support, both normalised; Q smoothed where P has mass and Q none."""
    if q.sum() == 0:
        return np.inf
    p, q = p / p.sum(), _smooth(q)
    m = p > 0
    return float(np.sum(p[m] * np.log(p[m] / q[m])))


def make_observer(kind: str, axis: int | None = None, **options: Any) -> Observer:
    """Observer by name: ``minmax``, ``moving-minmax``, ``percentile``, ``mse``, ``entropy``."""
    table = {"minmax": MinMaxObserver, "moving-minmax": MovingMinMaxObserver, "percentile": PercentileObserver,
             "mse": MSEObserver, "entropy": EntropyObserver}
    if kind not in table:
        from .errors import ConfigError

        raise ConfigError(f"unknown observer {kind!r}; choose one of {', '.join(table)}")
    return table[kind](axis, **options)


OBSERVERS = ("minmax", "moving-minmax", "percentile", "mse", "entropy")
