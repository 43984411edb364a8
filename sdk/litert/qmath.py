"""Integer and float32 arithmetic exactly as LiteRT's CPU kernels do it.

Two families of requantization live side by side in LiteRT 2.3.0:

* **XNNPACK** (the default delegate, which takes most int8 ops) rescales with
  *fp32* arithmetic: the int32 accumulator is converted to float32, multiplied
  by a float32 scale computed in single precision in a fixed order, clamped,
  rounded to nearest-even and offset by the zero point.  Elementwise ADD and
  requantizing ops use small fixed-point multipliers derived from those
  float32 scales.
* **TFLite builtin kernels** (ops XNNPACK declines) use gemmlowp fixed point:
  :func:`quantize_multiplier` turns a real multiplier into a Q31 integer and a
  power-of-two shift, applied with a saturating rounding doubling high
  multiply and a rounding right shift (TFLite's default "double rounding").

Every helper here works elementwise on numpy arrays and reproduces the C
expression order (float32 rounding after each operation, C's truncating
integer division, round-half-away-from-zero where TFLite calls ``round``).
The lowering code uses the same helpers to choose parameters, so the model
it writes and the reference that checks it agree by construction.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = [
    "INT8_MIN",
    "INT8_MAX",
    "bias_scale",
    "f32",
    "multiply_by_quantized_multiplier",
    "multiply_by_quantized_multiplier_4rows",
    "quantize_bias",
    "quantize_multiplier",
    "round_half_away",
    "rounding_divide_by_pot",
    "saturating_rounding_doubling_high_mul",
    "tflite_activation_range",
    "xnn_activation_range",
    "xnn_add_params",
    "xnn_conv_scale",
    "xnn_cvt_multiplier",
    "xnn_quantize",
    "xnn_requantize_fp32",
]

INT8_MIN, INT8_MAX = -128, 127
_INT32_MIN = -(1 << 31)


def f32(x) -> np.float32:
    """Round a Python/numpy number to float32, as a C ``float`` holds it."""
    return np.float32(x)


def round_half_away(x) -> np.ndarray:
    """``std::round``/``TfLiteRound``: nearest integer, ties away from zero.

    Evaluated in float64 so that ``|x| + 0.5`` cannot round up spuriously
    (0.49999997f + 0.5f is 1.0f in single precision).
    """
    x = np.asarray(x, dtype=np.float64)
    return np.sign(x) * np.floor(np.abs(x) + 0.5)


def bias_scale(input_scale: float, weight_scales) -> np.ndarray:
    """Scale of an int32 bias, per output channel: ``s_in * s_w`` in float32.

    The kernels add the int32 bias to the accumulator unscaled, so it must live
    on the accumulator's scale; its zero point is 0.
    """
    return (f32(input_scale) * np.atleast_1d(np.asarray(weight_scales, dtype=np.float32))).astype(np.float32)


def quantize_bias(bias, input_scale: float, weight_scales) -> np.ndarray:
    """Float bias -> int32 codes on :func:`bias_scale` (nearest, saturated)."""
    q = np.rint(np.asarray(bias, dtype=np.float64) / bias_scale(input_scale, weight_scales).astype(np.float64))
    return np.clip(q, -(1 << 31), (1 << 31) - 1).astype(np.int32)


# --- gemmlowp fixed point (TFLite builtin kernels) ---------------------------


def quantize_multiplier(real: float) -> tuple[int, int]:
    """TFLite ``QuantizeMultiplier``: ``real ≈ multiplier * 2**(shift - 31)``.

    ``multiplier`` is a Q31 integer in [2**30, 2**31); ``shift`` is the
    power-of-two exponent (positive = left shift).  Tiny multipliers
    (shift < -31) flush to (0, 0) as TFLite does.
    """
    real = float(real)
    if real == 0.0:
        return 0, 0
    q, shift = math.frexp(real)
    q_fixed = int(round_half_away(q * (1 << 31)))
    if q_fixed == (1 << 31):
        q_fixed //= 2
        shift += 1
    if shift < -31:
        return 0, 0
    return q_fixed, shift


def saturating_rounding_doubling_high_mul(a, b) -> np.ndarray:
    """gemmlowp ``SaturatingRoundingDoublingHighMul`` on int32 values."""
    a = np.asarray(a, dtype=np.int64)
    b = np.asarray(b, dtype=np.int64)
    ab = a * b
    nudge = np.where(ab >= 0, 1 << 30, 1 - (1 << 30))
    t = ab + nudge
    # C++ integer division truncates toward zero.
    res = np.sign(t) * (np.abs(t) >> 31)
    overflow = (a == _INT32_MIN) & (b == _INT32_MIN)
    return np.where(overflow, (1 << 31) - 1, res)


def rounding_divide_by_pot(x, exponent) -> np.ndarray:
    """gemmlowp ``RoundingDivideByPOT``: ``x / 2**exponent``, ties away from zero."""
    x = np.asarray(x, dtype=np.int64)
    exponent = np.asarray(exponent, dtype=np.int64)
    mask = (np.int64(1) << exponent) - 1
    remainder = x & mask
    threshold = (mask >> 1) + (x < 0)
    return (x >> exponent) + (remainder > threshold)


def multiply_by_quantized_multiplier(x, multiplier, shift) -> np.ndarray:
    """TFLite ``MultiplyByQuantizedMultiplier`` (double-rounding build).

    ``multiplier``/``shift`` may be arrays broadcasting against ``x`` (per
    channel).  The left shift wraps like the C int32 arithmetic it mirrors.
    """
    x = np.asarray(x, dtype=np.int64)
    shift = np.asarray(shift, dtype=np.int64)
    left = np.maximum(shift, 0)
    right = np.maximum(-shift, 0)
    shifted = ((x << left) + (1 << 31)) % (1 << 32) - (1 << 31)
    return rounding_divide_by_pot(saturating_rounding_doubling_high_mul(shifted, multiplier), right)


def multiply_by_quantized_multiplier_4rows(x, multiplier, shift) -> np.ndarray:
    """TFLite's NEON ``MultiplyByQuantizedMultiplier4Rows``.

    Same as :func:`multiply_by_quantized_multiplier` except the final right
    shift is ``vrshl``'s, which rounds ties up (toward +inf) rather than away
    from zero.  LiteRT's x86 wheel compiles TFLite's NEON kernels through a
    NEON-on-SSE layer, so its optimized kernels take this path for every full
    block of 16 elements and the scalar path for the tail.
    """
    x = np.asarray(x, dtype=np.int64)
    shift = np.asarray(shift, dtype=np.int64)
    left = np.maximum(shift, 0)
    right = np.maximum(-shift, 0)
    shifted = ((x << left) + (1 << 31)) % (1 << 32) - (1 << 31)
    high = saturating_rounding_doubling_high_mul(shifted, multiplier)
    return np.where(right > 0, (high + ((np.int64(1) << right) >> 1)) >> right, high)


def tflite_activation_range(activation: str | None, scale: float, zero_point: int,
                            qmin: int = INT8_MIN, qmax: int = INT8_MAX) -> tuple[int, int]:
    """Quantized clamp bounds of a fused activation, as TFLite's builtin kernels
    compute them (``zp + round(f / scale)`` with float32 division)."""

    def q(v: float) -> int:
        return int(zero_point) + int(round_half_away(f32(v) / f32(scale)))

    act = (activation or "NONE").upper()
    if act == "RELU":
        return max(qmin, q(0.0)), qmax
    if act == "RELU6":
        return max(qmin, q(0.0)), min(qmax, q(6.0))
    if act == "RELU_N1_TO_1":
        return max(qmin, q(-1.0)), min(qmax, q(1.0))
    return qmin, qmax


# --- XNNPACK fp32 requantization ---------------------------------------------


def xnn_quantize(value: float, scale: float, zero_point: int) -> int:
    """XNNPACK ``xnn_qs8_quantize``: ``lrintf(clamp(v / s + zp, -128, 127))``."""
    with np.errstate(over="ignore", invalid="ignore"):
        v = f32(value) / f32(scale) + f32(zero_point)
    v = min(max(v, f32(INT8_MIN)), f32(INT8_MAX))
    return int(np.rint(v))


_ACTIVATION_BOUNDS = {
    "NONE": (-math.inf, math.inf),
    "RELU": (0.0, math.inf),
    "RELU6": (0.0, 6.0),
    "RELU_N1_TO_1": (-1.0, 1.0),
}


def xnn_activation_range(activation: str | None, scale: float, zero_point: int) -> tuple[int, int]:
    """Quantized clamp bounds XNNPACK derives from a fused activation."""
    lo, hi = _ACTIVATION_BOUNDS[(activation or "NONE").upper()]
    return xnn_quantize(lo, scale, zero_point), xnn_quantize(hi, scale, zero_point)


def xnn_conv_scale(input_scale: float, weight_scales, output_scale: float) -> np.ndarray:
    """Per-channel requantization scale of XNNPACK conv / depthwise / FC:
    ``(input_scale * weight_scale) / output_scale`` in float32, in that order.
    XNNPACK refuses the op when any value is >= 256."""
    w = np.asarray(weight_scales, dtype=np.float32)
    return (f32(input_scale) * w) / f32(output_scale)


def xnn_requantize_fp32(acc, scale, zero_point: int, qmin: int, qmax: int) -> np.ndarray:
    """XNNPACK fp32 requantization of int32 accumulators to int8.

    ``(float)acc * scale`` in float32, clamped to ``[qmin - zp, qmax - zp]``,
    rounded to nearest-even, plus the output zero point.
    """
    acc = np.asarray(acc)
    scaled = acc.astype(np.float32) * np.asarray(scale, dtype=np.float32)
    scaled = np.clip(scaled, f32(qmin - zero_point), f32(qmax - zero_point))
    return (np.rint(scaled).astype(np.int32) + zero_point).astype(np.int8)


def _float_bits(x: np.float32) -> int:
    return int(np.asarray(x, dtype=np.float32).view(np.uint32))


def _bits_float(bits: int) -> np.float32:
    return np.asarray(bits, dtype=np.uint32).view(np.float32)[()]


def xnn_add_params(a_scale: float, b_scale: float, output_scale: float, sign_b: int = 1):
    """Fixed-point parameters of XNNPACK's qs8 ADD (SUB uses ``sign_b=-1``).

    Returns ``(a_multiplier, b_multiplier, shift)``: the output is
    ``asr(bias + a*a_mult + b*b_mult, shift) + zp`` with
    ``bias = 2**(shift-1) - a_mult*a_zp - b_mult*b_zp``.
    """
    a_out = f32(a_scale) / f32(output_scale)
    b_out = f32(f32(b_scale) * f32(sign_b)) / f32(output_scale)
    abs_a, abs_b = abs(a_out), abs(b_out)
    max_exp = (_float_bits(max(abs_a, abs_b)) >> 23) - 127
    shift = 20 - max_exp
    if not 12 <= shift <= 30:
        raise ValueError(f"input/output scale ratio {float(max(abs_a, abs_b)):.3g} is outside "
                         "XNNPACK's ADD range [2**-10, 2**8)")
    a_mult = int(np.rint(_bits_float(_float_bits(abs_a) + (shift << 23))))
    b_mult = int(np.rint(_bits_float(_float_bits(abs_b) + (shift << 23))))
    if np.signbit(a_out):
        a_mult = -a_mult
    if np.signbit(b_out):
        b_mult = -b_mult
    return a_mult, b_mult, shift


def xnn_cvt_multiplier(input_scale: float, output_scale: float) -> int:
    """8.8 fixed-point multiplier of XNNPACK's qs8 requantize (QUANTIZE int8->int8)
    and of LEAKY_RELU's positive branch: ``lrintf(256 * in / out)``."""
    return int(np.rint(f32(256.0) * (f32(input_scale) / f32(output_scale))))
