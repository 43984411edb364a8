"""Numpy integer reference of a LiteRT (``.tflite``) model.

:class:`ReferenceInterpreter` parses the flatbuffer itself (no LiteRT
interpreter involved) and re-executes it op by op with int32 accumulation and
the *same* requantization and rounding that ai-edge-litert 2.3.0 uses on
x86-64 with its default XNNPACK delegate, so its int8 outputs equal LiteRT's
bit for bit.

Which arithmetic each int8 op follows (LiteRT 2.3.0, default delegates):

=====================  =========  ==========================================
op                     runs in    arithmetic reproduced
=====================  =========  ==========================================
CONV_2D, DEPTHWISE,    XNNPACK    int32 acc; fp32 scale (s_in*s_w)/s_out;
FULLY_CONNECTED                   float mul, round-to-nearest-even, + zp
ADD, SUB               XNNPACK    2**shift fixed-point multipliers from the
                                  float32 scale ratios, round half up
MUL                    XNNPACK    (a-za)*(b-zb) in int32, fp32 requantization
MEAN                   XNNPACK    int32 sum of raw codes, fp32 convert with
                                  zero point folded into a float offset
LOGISTIC, TANH         XNNPACK    256-entry LUT: dequantize, f(x) in float,
                                  quantize with nearbyint
LEAKY_RELU, QUANTIZE   XNNPACK    8.8 fixed-point multipliers
(int8->int8)
QUANTIZE (f32->int8),  XNNPACK    float32 multiply, nearest-even
DEQUANTIZE
MAX_POOL_2D, PAD,      XNNPACK    exact (no rescaling)
TRANSPOSE, RESHAPE,
CONCATENATION, SLICE
AVERAGE_POOL_2D        builtin    int32 sum / count, rounded half away
SOFTMAX                builtin    float exp table, float sum, std::round
HARD_SWISH             builtin    int16 fixed-point (reference kernel)
RELU, RELU6, PRELU,    builtin    gemmlowp MultiplyByQuantizedMultiplier
RELU_N1_TO_1
MINIMUM, MAXIMUM       builtin    exact (compares codes of one quantization)
RESIZE_NEAREST_NEIGH.  builtin    16.16 fixed-point source index (int8)
=====================  =========  ==========================================

Where the delegate declines an op, the reference follows it into TFLite's
kernel, as LiteRT does: ADD/SUB with an input/output scale ratio below
2**-10 (gemmlowp 2**20 fixed point), MUL with s_a*s_b/s_out below 2**-16,
LEAKY_RELU whose 8.8 multipliers would be out of range (gemmlowp
MultiplyByQuantizedMultiplier), and QUANTIZE int8->int8 with a ratio
outside [2**-8, 2**7].  That last one shows a quirk of the x86 wheel: it
compiles TFLite's NEON code paths through a NEON-on-SSE layer, so full
16-element blocks round ties up (``vrshl``) while the tail rounds them away
from zero; the reference reproduces both.  Parameters LiteRT cannot run
sensibly are refused with :class:`~sdk.errors.UnsupportedOpError` naming
the fix: conv/FC requantization scales >= 256 (XNNPACK fails to load the
model), ADD/SUB/MUL ratios >= 256 (every output saturates; TFLite's
fallback wraps around in int16), HARD_SWISH with (s_in/128)/s_out >= 1,
int8 CONCATENATION / MAX_POOL_2D / AVERAGE_POOL_2D / PAD / SLICE /
MINIMUM / MAXIMUM whose inputs and output are quantized differently, and weights with a nonzero zero point.

All of these are bit-exact on the test suite.  TANH's LUT uses libm's
``tanhf``; the reference evaluates tanh in float64 and rounds, which agrees
with glibc except when a value lands within an ulp of a rounding boundary
(never observed; the tests still allow 1 LSB there and measure the exact
ratio).  On an ARM64 device SOFTMAX takes TFLite's uint16-LUT kernel instead
and may differ by 1 LSB; XNNPACK runs the same arithmetic on every
architecture (its microkernels are tested bit-exact against one scalar
reference).

float32 models (the ``arm-fp32`` baseline) are evaluated in float64 and cast,
so they agree with LiteRT to float rounding, not bit for bit.  GELU,
BATCH_MATMUL, RSQRT and RESIZE_BILINEAR (the transformer and upsampling ops)
exist in float32 only: edgepack never writes them on int8 tensors, and the
reference refuses an int8 one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from ai_edge_litert import schema_py_generated as fb

from sdk.errors import ArtifactError, InputError, UnsupportedOpError

from . import hybrid, qmath
from .flatbuffer import dtype_name, numpy_dtype, op_name, read_model, tensor_data
from .padding import out_size_and_pad
from .qmath import INT8_MAX, INT8_MIN, f32

# the kernel helpers other interpreters of the same flatbuffer reuse (targets/fp16_gpu/half.py)
__all__ = ["ReferenceInterpreter", "SUPPORTED_OPS", "float_activation", "fused_activation", "grouped", "pool_windows",
           "windows"]

TARGET = "arm-int8"

_ACTIVATION_NAMES = {0: "NONE", 1: "RELU", 2: "RELU_N1_TO_1", 3: "RELU6"}


@dataclass
class _Tensor:
    """What the reference needs to know about one tensor of the model."""

    index: int
    name: str
    shape: tuple[int, ...]
    dtype: str
    scale: np.ndarray | None
    zero_point: np.ndarray | None
    axis: int
    data: np.ndarray | None
    blockwise: tuple[np.ndarray, int] | None = None     # (float16 scales [n, k / block], block size)

    @property
    def s(self) -> np.float32:
        """Per-tensor scale (float32, as the runtime stores it)."""
        return np.float32(self.scale[0])

    @property
    def zp(self) -> int:
        """Per-tensor zero point."""
        return int(self.zero_point[0])

    @property
    def quantized(self) -> bool:
        """Whether values are integer codes with a scale (not raw numbers)."""
        return self.dtype in ("int8", "uint8", "int16", "int4") and self.scale is not None


def fused_activation(op, node: str) -> str:
    """The name (``"NONE"``, ``"RELU"``, ...) of ``op``'s fused activation; refuses codes LiteRT's int8 kernels lack."""
    code = getattr(op.builtinOptions, "fusedActivationFunction", 0)
    if code not in _ACTIVATION_NAMES:
        raise UnsupportedOpError(f"fused activation {code}", node, TARGET,
                                 "use NONE, RELU, RELU6 or RELU_N1_TO_1")
    return _ACTIVATION_NAMES[code]


def float_activation(x: np.ndarray, activation: str) -> np.ndarray:
    """``x`` clipped as the fused ``activation`` (a :func:`fused_activation` name) clips float outputs."""
    lo, hi = {"NONE": (-np.inf, np.inf), "RELU": (0.0, np.inf), "RELU6": (0.0, 6.0),
              "RELU_N1_TO_1": (-1.0, 1.0)}[activation]
    return np.clip(x, lo, hi)


def windows(x: np.ndarray, kh: int, kw: int, stride, dilation, same: bool, pad_value) -> np.ndarray:
    """The sliding windows over NHWC ``x`` as an ``(N, OH, OW, KH, KW, C)`` array,
    padded with ``pad_value`` the way TFLite pads SAME/VALID."""
    n, h, w, c = x.shape
    sh, sw = stride
    dh, dw = dilation
    oh, pt = out_size_and_pad(h, kh, sh, dh, same)
    ow, pl = out_size_and_pad(w, kw, sw, dw, same)
    need_h = (oh - 1) * sh + (kh - 1) * dh + 1
    need_w = (ow - 1) * sw + (kw - 1) * dw + 1
    xp = np.pad(x, ((0, 0), (pt, max(need_h - h - pt, 0)), (pl, max(need_w - w - pl, 0)), (0, 0)),
                constant_values=pad_value)
    rows = []
    for i in range(kh):
        cols = []
        for j in range(kw):
            cols.append(xp[:, i * dh: i * dh + (oh - 1) * sh + 1: sh, j * dw: j * dw + (ow - 1) * sw + 1: sw, :])
        rows.append(np.stack(cols, axis=3))
    return np.stack(rows, axis=3)


def _exact_matmul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Integer matmul through float64 BLAS: exact while |acc| < 2**53, which
    int8 x int8 products over any realistic reduction length are."""
    return np.rint(a.astype(np.float64) @ b.astype(np.float64)).astype(np.int64)


class ReferenceInterpreter:
    """Execute a LiteRT model in numpy with the runtime's integer arithmetic.

    >>> ref = ReferenceInterpreter(model_bytes)        # doctest: +SKIP
    >>> (y,) = ref.run([x_int8])                       # doctest: +SKIP
    >>> layers = ref.trace([x_int8])  # every tensor by name  # doctest: +SKIP

    ``model`` is the flatbuffer (bytes) or a path to a ``.tflite`` file.
    Construction fails with :class:`~sdk.errors.UnsupportedOpError` when the
    model holds an op the reference does not implement.
    """

    #: op name -> kernel; subclasses swap rows (the fp16 runner replaces the float arithmetic)
    KERNELS: dict[str, Callable] = {}

    def __init__(self, model: bytes | str | Path):
        data = Path(model).read_bytes() if isinstance(model, (str, Path)) else bytes(model)
        self.model = read_model(data)
        if len(self.model.subgraphs or []) != 1:
            raise ArtifactError("the reference runs single-subgraph models only")
        sg = self.model.subgraphs[0]
        self._tensors = [self._describe(i, t) for i, t in enumerate(sg.tensors or [])]
        self._inputs = [int(i) for i in sg.inputs]
        self._outputs = [int(i) for i in sg.outputs]
        self._ops = []
        for op in sg.operators or []:
            name = op_name(self.model, op)
            node = self._tensors[int(op.outputs[0])].name if len(op.outputs) else name
            if name not in self.KERNELS:
                raise UnsupportedOpError(name, node, TARGET,
                                         f"the integer reference implements {', '.join(sorted(self.KERNELS))}")
            self._ops.append((name, op, node))
        self._cache: dict[int, object] = {}

    def _describe(self, index: int, t) -> _Tensor:
        q = t.quantization
        scale = zp = None
        axis = 0
        if q is not None and q.scale is not None and len(q.scale):
            scale = np.asarray(q.scale, dtype=np.float32)
            zp = np.asarray(q.zeroPoint if q.zeroPoint is not None else [0] * len(scale), dtype=np.int64)
            axis = int(q.quantizedDimension)
        blockwise = None
        if q is not None and q.detailsType == fb.QuantizationDetails.BlockwiseQuantization:
            scales = tensor_data(self.model, self.model.subgraphs[0].tensors[q.details.scales])
            blockwise = (np.asarray(scales, np.float16), int(q.details.blockSize))
        name = t.name.decode() if isinstance(t.name, bytes) else str(t.name)
        shape = tuple(int(d) for d in (t.shape if t.shape is not None else ()))
        return _Tensor(index, name, shape, dtype_name(t.type), scale, zp, axis, tensor_data(self.model, t),
                       blockwise)

    # --- public API ---------------------------------------------------------

    @property
    def input_details(self) -> list[dict]:
        """Name, shape, dtype, scale and zero point of each model input."""
        return [self._details(self._tensors[i]) for i in self._inputs]

    @property
    def output_details(self) -> list[dict]:
        """Name, shape, dtype, scale and zero point of each model output."""
        return [self._details(self._tensors[i]) for i in self._outputs]

    @staticmethod
    def _details(t: _Tensor) -> dict:
        return {
            "name": t.name, "index": t.index, "shape": t.shape, "dtype": numpy_dtype(t.dtype),
            "scale": None if t.scale is None else t.scale.astype(np.float64),
            "zero_point": None if t.zero_point is None else t.zero_point.copy(),
        }

    def run(self, inputs) -> list[np.ndarray]:
        """Run the model; ``inputs`` in signature order, in the model's input
        dtypes.  Returns the outputs in the model's output dtypes."""
        env = self._execute(inputs)
        return [env[i] for i in self._outputs]

    def trace(self, inputs) -> dict[str, np.ndarray]:
        """Run the model and return every tensor it computed (inputs, each op's
        output in execution order, outputs) by tensor name."""
        env = self._execute(inputs)
        return {self._tensors[i].name: v for i, v in env.items() if self._tensors[i].data is None}

    # --- execution ------------------------------------------------------------

    def _execute(self, inputs) -> dict[int, np.ndarray]:
        if isinstance(inputs, np.ndarray):
            inputs = [inputs]
        inputs = list(inputs)
        if len(inputs) != len(self._inputs):
            raise InputError(f"model takes {len(self._inputs)} inputs, got {len(inputs)}")
        env: dict[int, np.ndarray] = {}
        for idx, value in zip(self._inputs, inputs):
            t = self._tensors[idx]
            arr = np.asarray(value)
            if tuple(arr.shape) != t.shape:
                raise InputError(f"input {t.name!r}: expected shape {t.shape}, got {tuple(arr.shape)}")
            if arr.dtype != numpy_dtype(t.dtype):
                raise InputError(f"input {t.name!r}: expected dtype {t.dtype}, got {arr.dtype}")
            env[idx] = arr
        for i, t in enumerate(self._tensors):
            if t.data is not None:
                env[i] = t.data
        for k, (name, op, node) in enumerate(self._ops):
            ins = [self._tensors[i] if i >= 0 else None for i in op.inputs]
            vals = [env[i] if i >= 0 else None for i in op.inputs]
            out = self._tensors[int(op.outputs[0])]
            result = self.KERNELS[name](self, k, op, node, ins, vals, out)
            env[out.index] = np.asarray(result).astype(numpy_dtype(out.dtype), copy=False).reshape(out.shape)
        return env

    def _cached(self, key: int, build: Callable[[], object]):
        if key not in self._cache:
            self._cache[key] = build()
        return self._cache[key]


# --- kernels -------------------------------------------------------------------
# Every kernel: (interp, op_index, op, node, input tensors, input values, output
# tensor) -> output array.  int8 paths reproduce the runtime arithmetic named in
# the module docstring; float paths compute in float64.


def _require_int8(t: _Tensor, node: str, op: str):
    if t.dtype != "int8" or t.scale is None:
        raise UnsupportedOpError(op, node, TARGET, f"tensor {t.name!r} must be int8 with a scale, not {t.dtype}")


def _weight_scales(t: _Tensor, n: int, axis: int, name: str, node: str) -> np.ndarray:
    """``n`` per-output-channel scales of a weight tensor quantized along ``axis``."""
    s = t.scale.astype(np.float32)
    if s.size == 1:
        return np.repeat(s, n)
    if t.axis != axis:
        raise UnsupportedOpError(name, node, TARGET, f"per-channel weights must be quantized along axis {axis}, "
                                 f"not {t.axis}")
    return s


def _conv_like(op, node, ins, vals, out, depthwise: bool):
    o = op.builtinOptions
    x, w, b = vals[0], vals[1], vals[2] if len(vals) > 2 else None
    xt, wt = ins[0], ins[1]
    same = o.padding == 0
    stride, dilation = (o.strideH, o.strideW), (o.dilationHFactor, o.dilationWFactor)
    _, kh, kw, _ = wt.shape
    act = fused_activation(op, node)
    name = "DEPTHWISE_CONV_2D" if depthwise else "CONV_2D"
    if b is None:
        raise UnsupportedOpError(name, node, TARGET, "LiteRT needs the bias input; pass a zero bias")
    if xt.dtype == "float32" and wt.dtype in ("int8", "int4"):       # dynamic range (sdk.litert.hybrid)
        pad = "SAME" if same else "VALID"
        if depthwise:
            scales = _weight_scales(wt, wt.shape[3], 3, name, node)
            return hybrid.builtin_depthwise_conv2d(x, w, scales, b, stride, pad, dilation,
                                                   depth_multiplier=wt.shape[3] // xt.shape[3], activation=act)
        return hybrid.hybrid_conv2d(x, w, wt.scale, b, stride, pad, dilation, activation=act, weight_dtype=wt.dtype)
    if xt.dtype == "float32":
        win = windows(x.astype(np.float64), kh, kw, stride, dilation, same, 0.0)
        wf = w.astype(np.float64)
        if depthwise:
            mult = wf.shape[3] // x.shape[3]
            y = np.einsum("nhwijc,ijc->nhwc", np.repeat(win, mult, axis=5), wf[0])
        else:
            y = grouped(win, wf, lambda a, b: a @ b)
        return float_activation(y + b.astype(np.float64), act).astype(np.float32)
    _require_int8(xt, node, name)
    if np.any(wt.zero_point != 0):
        raise UnsupportedOpError(name, node, TARGET, "int8 weights must be symmetric (zero point 0)")
    xi = x.astype(np.int64) - xt.zp
    win = windows(xi, kh, kw, stride, dilation, same, 0)
    if depthwise:
        mult = wt.shape[3] // xt.shape[3]
        acc = np.einsum("nhwijc,ijc->nhwc", np.repeat(win, mult, axis=5), w[0].astype(np.int64))
        cout = wt.shape[3]
    else:
        acc = grouped(win, w, _exact_matmul)
        cout = wt.shape[0]
    acc = acc + b.astype(np.int64)
    scales = _weight_scales(wt, cout, 3 if depthwise else 0, name, node)
    if wt.dtype == "int4":          # XNNPACK declines INT4 filters of convolutions: TFLite's kernel runs it
        return _requant_builtin(acc, xt, scales, out, act)
    return _requant_xnn(acc, xt, scales, out, act, node, name)


def _requant_builtin(acc, xt: _Tensor, w_scales: np.ndarray, out: _Tensor, act: str) -> np.ndarray:
    """TFLite's per-channel requantization (conv.cc / fully_connected.cc, int8): the multiplier
    s_in*s_w/s_out computed in double, QuantizeMultiplier, gemmlowp's rounding doubling high mul and
    rounding right shift, + zero point, clamped to the activation range (measured bit-exact)."""
    lo, hi = qmath.tflite_activation_range(act, float(out.s), out.zp)
    acc = np.asarray(acc, np.int64)
    y = np.empty(acc.shape, np.int64)
    for c in range(acc.shape[-1]):
        m, sh = qmath.quantize_multiplier(float(np.float64(xt.s) * np.float64(w_scales[c]) / np.float64(out.s)))
        y[..., c] = qmath.multiply_by_quantized_multiplier(acc[..., c], m, sh)
    return np.clip(y + out.zp, lo, hi)


def grouped(win: np.ndarray, w: np.ndarray, matmul) -> np.ndarray:
    """Convolution as matmul over windows ``[n, h, w, kh, kw, cin]`` with OHWI weights whose
    input depth is ``cin / groups`` (TFLite CONV_2D infers the group count from it)."""
    groups = win.shape[-1] // w.shape[3]
    og = w.shape[0] // groups
    parts = []
    for gi in range(groups):
        wg = win[..., gi * w.shape[3]:(gi + 1) * w.shape[3]]
        parts.append(matmul(wg.reshape(wg.shape[:3] + (-1,)), w[gi * og:(gi + 1) * og].reshape(og, -1).T))
    return parts[0] if groups == 1 else np.concatenate(parts, axis=-1)


def _requant_xnn(acc, xt: _Tensor, w_scales: np.ndarray, out: _Tensor, act: str, node: str, name: str):
    scale = qmath.xnn_conv_scale(xt.s, w_scales, out.s)
    if np.any(scale >= 256):
        raise UnsupportedOpError(name, node, TARGET, "requantization scale s_in*s_w/s_out >= 256: XNNPACK "
                                 "refuses it and LiteRT fails to load the model; widen the output scale")
    lo, hi = qmath.xnn_activation_range(act, out.s, out.zp)
    acc32 = ((acc + (1 << 31)) % (1 << 32) - (1 << 31)).astype(np.int32)  # int32 wrap, as in C
    return qmath.xnn_requantize_fp32(acc32, scale, out.zp, lo, hi)


def _k_conv2d(interp, k, op, node, ins, vals, out):
    return _conv_like(op, node, ins, vals, out, depthwise=False)


def _k_depthwise(interp, k, op, node, ins, vals, out):
    return _conv_like(op, node, ins, vals, out, depthwise=True)


def _k_fully_connected(interp, k, op, node, ins, vals, out):
    x, w = vals[0], vals[1]
    b = vals[2] if len(vals) > 2 else None
    xt, wt = ins[0], ins[1]
    n_in = wt.shape[1]
    x2 = x.reshape(-1, n_in)
    act = fused_activation(op, node)
    if xt.dtype == "float32" and wt.blockwise is not None:           # qd8 x qb4w (sdk.litert.hybrid)
        scales, block = wt.blockwise
        return hybrid.fully_connected_blockwise(x2, w, scales, block, b, act)
    if xt.dtype == "float32" and wt.dtype in ("int8", "int4"):       # dynamic range (sdk.litert.hybrid)
        asym = bool(getattr(op.builtinOptions, "asymmetricQuantizeInputs", False))
        return hybrid.hybrid_fully_connected(x2, w, wt.scale, b, act, weight_dtype=wt.dtype,
                                             asymmetric_quantize_inputs=asym)
    if xt.dtype == "float32":
        y = x2.astype(np.float64) @ w.astype(np.float64).T
        if b is not None:
            y = y + b.astype(np.float64)
        return float_activation(y, act).astype(np.float32)
    _require_int8(xt, node, "FULLY_CONNECTED")
    if np.any(wt.zero_point != 0):
        raise UnsupportedOpError("FULLY_CONNECTED", node, TARGET, "int8 weights must be symmetric (zero point 0)")
    acc = _exact_matmul(x2.astype(np.int64) - xt.zp, w.T)
    if b is not None:
        acc = acc + b.astype(np.int64)
    w_scales = _weight_scales(wt, wt.shape[0], 0, "FULLY_CONNECTED", node)
    if wt.dtype == "int4" and n_in % 2:     # XNNPACK declines INT4 rows of odd length
        return _requant_builtin(acc, xt, w_scales, out, act)
    return _requant_xnn(acc, xt, w_scales, out, act, node, "FULLY_CONNECTED")


def _add_path(at: _Tensor, bt: _Tensor, out: _Tensor, name: str, node: str) -> str:
    """Which kernel runs an int8 ADD/SUB: the delegate takes input/output
    scale ratios in [2**-10, 2**8); smaller ratios fall back to TFLite's
    kernel.  Larger ones saturate every nonzero input and hit int16
    wrap-around in TFLite's NEON-emulating kernel, so they are refused."""
    ratios = [t.s / out.s for t in (at, bt)]
    if any(r >= f32(256) for r in ratios):
        raise UnsupportedOpError(name, node, TARGET, "an input scale is >= 256x the output scale; widen the "
                                 "output scale (any nonzero input would saturate)")
    return "xnnpack" if all(r >= f32(1 / 1024) for r in ratios) else "builtin"


def _k_add_sub(sign: int, name: str):
    def kernel(interp, k, op, node, ins, vals, out):
        a, b = vals
        act = fused_activation(op, node)
        if out.dtype == "float32":
            y = a.astype(np.float64) + sign * b.astype(np.float64)
            return float_activation(y, act).astype(np.float32)
        at, bt = ins
        for t in (at, bt, out):
            _require_int8(t, node, name)
        if _add_path(at, bt, out, name, node) == "builtin":
            return _builtin_add_sub(a, b, at, bt, out, sign, act, name, node)
        am, bm, shift = qmath.xnn_add_params(at.s, bt.s, out.s, sign)
        bias = (1 << (shift - 1)) - am * at.zp - bm * bt.zp
        acc = bias + a.astype(np.int64) * am + b.astype(np.int64) * bm
        y = (acc >> shift) + out.zp
        lo, hi = qmath.xnn_activation_range(act, out.s, out.zp)
        return np.clip(y, lo, hi)

    return kernel


def _builtin_add_sub(a, b, at, bt, out, sign, act, name, node):
    """TFLite's int8 ADD/SUB: inputs rescaled to a common 2**20 fixed point.

    The x86 wheel runs ADD's NEON loops through NEON-on-SSE, and they round
    differently from the scalar tail in two places (optimized
    integer_ops/add.h): the elementwise loop (16 at a time) folds each input's
    right shift into the 2**20 left shift, which is the same unless the shift
    exceeds 20, when it becomes a flooring right shift before the multiply;
    the scalar-broadcast loop (8 at a time, one operand a single element)
    floors instead of rounding after the multiply.  Both are reproduced; the
    other broadcasts run the same elementwise loop over inner runs, which
    matters only for such a shift and is refused there.  The int16 narrowing
    only bites in the saturating regime :func:`_add_path` refuses.
    """
    left_shift = 20
    twice_max = 2.0 * float(max(at.s, bt.s))
    m1, s1 = qmath.quantize_multiplier(float(at.s) / twice_max)
    m2, s2 = qmath.quantize_multiplier(float(bt.s) / twice_max)
    mo, so = qmath.quantize_multiplier(twice_max / float(f32(1 << left_shift) * out.s))
    mbqm = qmath.multiply_by_quantized_multiplier
    srdhm = qmath.saturating_rounding_doubling_high_mul
    shape = np.broadcast_shapes(a.shape, b.shape)
    da = np.broadcast_to(a.astype(np.int64) - at.zp, shape)
    db = np.broadcast_to(b.astype(np.int64) - bt.zp, shape)
    x1, x2 = mbqm(da << left_shift, m1, s1), mbqm(db << left_shift, m2, s2)
    if name == "ADD":
        if (a.size == 1) != (b.size == 1):          # AddScalarBroadcast
            blocks = _neon_blocks(shape, 8)
            x1 = np.where(blocks, srdhm(da << left_shift, m1) >> -s1, x1)
            x2 = np.where(blocks, srdhm(db << left_shift, m2) >> -s2, x2)
        elif min(s1, s2) < -left_shift:
            if a.shape != b.shape:
                raise UnsupportedOpError(name, node, TARGET, "a broadcasting int8 ADD whose input scales differ by "
                                         "more than 2**20 (XNNPACK declines it; TFLite's kernel is not reproduced "
                                         "here): widen the smaller input's scale")
            blocks = _neon_blocks(shape)
            x1 = np.where(blocks, srdhm(_shift_left(da, left_shift + s1), m1), x1)
            x2 = np.where(blocks, srdhm(_shift_left(db, left_shift + s2), m2), x2)
    y = mbqm(x1 + sign * x2, mo, so) + out.zp
    lo, hi = qmath.tflite_activation_range(act, out.s, out.zp)
    return np.clip(y, lo, hi)


def _shift_left(x: np.ndarray, n: int) -> np.ndarray:
    """``vshlq_s32``: left shift by ``n``, a flooring right shift when ``n`` is negative."""
    return x << n if n >= 0 else x >> -n


def _k_mul(interp, k, op, node, ins, vals, out):
    a, b = vals
    act = fused_activation(op, node)
    if out.dtype == "float32":
        return float_activation(a.astype(np.float64) * b.astype(np.float64), act).astype(np.float32)
    at, bt = ins
    for t in (at, bt, out):
        _require_int8(t, node, "MUL")
    product = f32(at.s * bt.s) / out.s
    acc = (a.astype(np.int64) - at.zp) * (b.astype(np.int64) - bt.zp)
    if product >= f32(256):
        raise UnsupportedOpError("MUL", node, TARGET, "s_a*s_b/s_out >= 256: widen the output scale (any "
                                 "nonzero product would saturate, and TFLite's fallback kernel wraps around)")
    if product >= f32(1 / 65536):  # the delegate's MUL check; smaller ratios run in TFLite's kernel
        lo, hi = qmath.xnn_activation_range(act, out.s, out.zp)
        return qmath.xnn_requantize_fp32(acc.astype(np.int32), product, out.zp, lo, hi)
    mult, shift = qmath.quantize_multiplier(float(product))
    lo, hi = qmath.tflite_activation_range(act, out.s, out.zp)
    return np.clip(qmath.multiply_by_quantized_multiplier(acc, mult, shift) + out.zp, lo, hi)


def pool_windows(x, op, pad_value):
    """:func:`windows` of a pooling ``op`` (its filter, strides and padding) over NHWC ``x``."""
    o = op.builtinOptions
    return windows(x, o.filterHeight, o.filterWidth, (o.strideH, o.strideW), (1, 1), o.padding == 0, pad_value)


def _k_max_pool(interp, k, op, node, ins, vals, out):
    x = vals[0]
    act = fused_activation(op, node)
    if out.dtype == "float32":
        win = pool_windows(x.astype(np.float64), op, -np.inf)
        return float_activation(win.max(axis=(3, 4)), act).astype(np.float32)
    _require_int8(ins[0], node, "MAX_POOL_2D")
    if ins[0].s != out.s or ins[0].zp != out.zp:
        raise UnsupportedOpError("MAX_POOL_2D", node, TARGET, "int8 max pooling needs equal input and output "
                                 "quantization (XNNPACK fails to prepare otherwise)")
    win = pool_windows(x.astype(np.int16), op, INT8_MIN - 1)  # below every code: padding never wins
    lo, hi = qmath.xnn_activation_range(act, out.s, out.zp)
    return np.clip(win.max(axis=(3, 4)), lo, hi)


def _k_avg_pool(interp, k, op, node, ins, vals, out):
    x = vals[0]
    act = fused_activation(op, node)
    ones = np.ones(x.shape[:3] + (1,), dtype=np.int64)
    count = pool_windows(ones, op, 0).sum(axis=(3, 4))
    if out.dtype == "float32":
        total = pool_windows(x.astype(np.float64), op, 0.0).sum(axis=(3, 4))
        return float_activation(total / count, act).astype(np.float32)
    xt = ins[0]
    _require_int8(xt, node, "AVERAGE_POOL_2D")
    if xt.s != out.s or xt.zp != out.zp:
        raise UnsupportedOpError("AVERAGE_POOL_2D", node, TARGET, "int8 average pooling needs equal input and "
                                 "output quantization")
    acc = pool_windows(x.astype(np.int64), op, 0).sum(axis=(3, 4))
    # C division truncates toward zero; the +-count/2 makes it round half away.
    num = np.where(acc > 0, acc + count // 2, acc - count // 2)
    y = np.sign(num) * (np.abs(num) // count)
    lo, hi = qmath.tflite_activation_range(act, out.s, out.zp)
    return np.clip(y, lo, hi)


def _axes(vals, ndim: int) -> tuple[int, ...]:
    return tuple(sorted({int(a) % ndim for a in np.asarray(vals).reshape(-1)}))


def _k_mean(interp, k, op, node, ins, vals, out):
    x = vals[0]
    axes = _axes(vals[1], x.ndim)
    if out.dtype == "float32":
        return x.astype(np.float64).mean(axis=axes).astype(np.float32)
    xt = ins[0]
    _require_int8(xt, node, "MEAN")
    n = int(np.prod([x.shape[a] for a in axes]))
    total = x.astype(np.int64).sum(axis=axes).astype(np.int32)
    # XNNPACK folds the input zero point into a float output offset and the
    # 1/n into the float scale (reduce-nd.c); every step rounds to float32.
    scale = f32(xt.s / out.s) * (f32(1.0) / f32(n))
    offset = f32(out.zp) - f32(f32(n) * f32(xt.zp)) * scale
    y = np.rint(total.astype(np.float32) * scale + offset)
    return np.clip(y, INT8_MIN, INT8_MAX)


def _k_reshape(interp, k, op, node, ins, vals, out):
    return vals[0]


def _k_transpose(interp, k, op, node, ins, vals, out):
    return np.transpose(vals[0], [int(p) for p in np.asarray(vals[1]).reshape(-1)])


def _k_pad(interp, k, op, node, ins, vals, out):
    pads = np.asarray(vals[1]).reshape(-1, 2)
    fill = out.zp if out.quantized else 0
    if out.quantized and (ins[0].s != out.s or ins[0].zp != out.zp):
        raise UnsupportedOpError("PAD", node, TARGET, "PAD needs equal input and output quantization")
    return np.pad(vals[0], [(int(a), int(b)) for a, b in pads], constant_values=fill)


def _same_quantization(name: str, node: str, ins, out) -> None:
    """int8 data-movement and comparison ops keep their codes: inputs and output must agree."""
    for t in ins:
        if out.quantized and (t.s != out.s or t.zp != out.zp):
            raise UnsupportedOpError(name, node, TARGET, f"int8 {name} needs equal input and output quantization")


def _k_slice(interp, k, op, node, ins, vals, out):
    _same_quantization("SLICE", node, ins[:1], out)
    begin = [int(b) for b in np.asarray(vals[1]).reshape(-1)]
    size = [int(n) for n in np.asarray(vals[2]).reshape(-1)]
    x = vals[0]
    return x[tuple(slice(b, x.shape[i] if n == -1 else b + n) for i, (b, n) in enumerate(zip(begin, size)))]


def _k_min_max(fn: Callable, name: str):
    def kernel(interp, k, op, node, ins, vals, out):
        _same_quantization(name, node, ins, out)
        return fn(vals[0], vals[1])      # on codes of one quantization, as on floats, min/max commute with it
    return kernel


def _k_concat(interp, k, op, node, ins, vals, out):
    o = op.builtinOptions
    axis = int(o.axis) % len(out.shape)
    act = fused_activation(op, node)
    if out.quantized:
        for t in ins:
            if t.s != out.s or t.zp != out.zp:
                raise UnsupportedOpError(
                    "CONCATENATION", node, TARGET,
                    f"int8 input {t.name!r} has scale/zero point {float(t.s):.6g}/{t.zp} but the output has "
                    f"{float(out.s):.6g}/{out.zp}; requantize it with a QUANTIZE op first")
        lo, hi = qmath.xnn_activation_range(act, out.s, out.zp)
        return np.clip(np.concatenate(vals, axis=axis), lo, hi)
    return float_activation(np.concatenate(vals, axis=axis).astype(np.float64), act).astype(np.float32)


def _k_softmax(interp, k, op, node, ins, vals, out):
    x = vals[0]
    beta = f32(op.builtinOptions.beta)
    if out.dtype == "float32":
        z = x.astype(np.float64) * float(beta)
        e = np.exp(z - z.max(axis=-1, keepdims=True))
        return (e / e.sum(axis=-1, keepdims=True)).astype(np.float32)
    xt = ins[0]
    _require_int8(xt, node, "SOFTMAX")
    if out.zp != -128 or abs(float(out.s) - 1 / 256) > 0.001 / 256:
        raise UnsupportedOpError("SOFTMAX", node, TARGET, "int8 SOFTMAX output must have scale 1/256, zero point -128")

    def table():
        # optimized_ops::PopulateSoftmaxLookupTable: table[255 - v] = expf(-s*beta*v)
        scale = -xt.s * beta
        v = np.arange(256, dtype=np.float32)
        return _expf(scale * v)[::-1].copy()

    tab = interp._cached(k, table)
    rows = x.reshape(-1, x.shape[-1]).astype(np.int64)
    mx = rows.max(axis=1, keepdims=True)
    e = tab[255 - mx + rows]  # table_offset[x] = table[255 - max + x]
    total = np.zeros(rows.shape[0], dtype=np.float32)
    for j in range(rows.shape[1]):  # sequential float32 sum, as the C loop runs
        total = total + e[:, j]
    inv = f32(1.0) / (total * out.s)
    prob = e * inv[:, None]
    y = qmath.round_half_away(prob) + out.zp
    return np.clip(y, INT8_MIN, INT8_MAX).reshape(x.shape)


def _expf(x: np.ndarray) -> np.ndarray:
    """libm ``expf``: correctly rounded float32 exp (via float64)."""
    return np.exp(x.astype(np.float64)).astype(np.float32)


def _lut_op(fn: Callable[[np.ndarray], np.ndarray], name: str):
    """XNNPACK int8 unary op through its 256-entry table (unary-elementwise-nc.c):
    dequantize in float32, apply ``fn`` (float64 in, float32 out), quantize
    with nearbyint(r * (1/s_out) + zp)."""

    def kernel(interp, k, op, node, ins, vals, out):
        x = vals[0]
        if out.dtype == "float32":
            return fn(x.astype(np.float64)).astype(np.float32)
        xt = ins[0]
        _require_int8(xt, node, name)

        def table():
            q = np.arange(-128, 128, dtype=np.float32)
            xf = (q - f32(xt.zp)) * xt.s
            r = fn(xf.astype(np.float64)).astype(np.float32)
            y = np.rint(r * (f32(1.0) / out.s) + f32(out.zp))
            return np.clip(y, INT8_MIN, INT8_MAX).astype(np.int8)

        lut = interp._cached(k, table)
        return lut[x.astype(np.int16) + 128]

    return kernel


def _sigmoid(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        e = np.exp(x)
        r = e / (1.0 + e)
    return np.where(x > 100, 1.0, np.where(x < -100, 0.0, r))


def _k_leaky_relu(interp, k, op, node, ins, vals, out):
    x = vals[0]
    alpha = f32(op.builtinOptions.alpha)
    if out.dtype == "float32":
        xf = x.astype(np.float64)
        return np.where(xf >= 0, xf, xf * float(alpha)).astype(np.float32)
    xt = ins[0]
    _require_int8(xt, node, "LEAKY_RELU")
    d = x.astype(np.int64) - xt.zp
    pos_scale = xt.s / out.s
    neg_scale = f32(pos_scale * alpha)
    xnn_ok = (np.isfinite(alpha) and alpha != 0 and abs(alpha) >= np.finfo(np.float32).tiny
              and f32(1 / 256) <= pos_scale <= f32(128)
              and f32(-127.99609375) <= neg_scale <= f32(128) and abs(neg_scale) >= f32(1 / 256))
    if xnn_ok:
        pos = int(np.rint(f32(256.0) * pos_scale))
        neg = int(np.rint(f32(256.0) * neg_scale))
        acc = (out.zp << 8) + 0x80 + d * np.where(d >= 0, pos, neg)
        return np.clip(acc >> 8, INT8_MIN, INT8_MAX)
    # activations.cc LeakyReluPrepare / reference QuantizeLeakyRelu
    m_id, s_id = qmath.quantize_multiplier(float(pos_scale))
    m_a, s_a = qmath.quantize_multiplier(float(f32(xt.s * alpha) / out.s))
    mbqm = qmath.multiply_by_quantized_multiplier
    neg_branch = np.sign(m_a) * mbqm(d, abs(m_a), s_a)
    y = out.zp + np.where(d >= 0, mbqm(d, m_id, s_id), neg_branch)
    return np.clip(y, INT8_MIN, INT8_MAX)


def _k_quantize(interp, k, op, node, ins, vals, out):
    x, xt = vals[0], ins[0]
    _require_int8(out, node, "QUANTIZE")
    if xt.dtype in ("float32", "float16"):
        scaled = x.astype(np.float32) * (f32(1.0) / out.s)
        scaled = np.clip(scaled, f32(INT8_MIN - out.zp), f32(INT8_MAX - out.zp))
        return np.rint(scaled) + out.zp
    _require_int8(xt, node, "QUANTIZE")
    if f32(1 / 256) <= xt.s / out.s <= f32(128):  # the delegate's requantize check
        mult = qmath.xnn_cvt_multiplier(xt.s, out.s)
        bias = (out.zp << 8) - mult * xt.zp + 0x80
        return np.clip((bias + x.astype(np.int64) * mult) >> 8, INT8_MIN, INT8_MAX)
    # quantize.cc: double-precision ratio; optimized Requantize<int8, int8>
    mult, shift = qmath.quantize_multiplier(float(xt.s) / float(out.s))
    d = x.astype(np.int64) - xt.zp
    y = np.where(_neon_blocks(x.shape), qmath.multiply_by_quantized_multiplier_4rows(d, mult, shift),
                 qmath.multiply_by_quantized_multiplier(d, mult, shift)) + out.zp
    return np.clip(y, INT8_MIN, INT8_MAX)


def _neon_blocks(shape, width: int = 16) -> np.ndarray:
    """Elements an optimized TFLite kernel handles in its ``width``-wide NEON loop
    (all but the ``size % width`` tail, in flat order)."""
    size = int(np.prod(shape, dtype=np.int64))
    return (np.arange(size) < size - size % width).reshape(shape)


def _k_dequantize(interp, k, op, node, ins, vals, out):
    x, xt = vals[0], ins[0]
    if xt.dtype == "float16":
        return x.astype(np.float32)
    if xt.dtype in ("int8", "int4") and xt.scale is not None and xt.scale.size > 1:
        # a weight-only weight: per-channel codes widened once (at delegate init), float32 product
        shape = [1] * x.ndim
        shape[xt.axis] = -1
        return (x.astype(np.int32) - xt.zero_point.reshape(shape)).astype(np.float32) * xt.scale.reshape(shape)
    if xt.dtype != "int4":
        _require_int8(xt, node, "DEQUANTIZE")
    return (x.astype(np.int32) - xt.zp).astype(np.float32) * xt.s


def _k_densify(interp, k, op, node, ins, vals, out):
    """DENSIFY of a sparse constant: :func:`.flatbuffer.tensor_data` expanded it already
    (:func:`.sparse.densify`)."""
    if ins[0].data is None:
        raise UnsupportedOpError("DENSIFY", node, TARGET, "DENSIFY expands constant sparse tensors only")
    return vals[0]


def _k_relu_x(name: str):
    """RELU / RELU6 / RELU_N1_TO_1 as standalone ops (TFLite's QuantizedReluX)."""

    def kernel(interp, k, op, node, ins, vals, out):
        x = vals[0]
        if out.dtype == "float32":
            return float_activation(x, name).astype(np.float32)
        xt = ins[0]
        _require_int8(xt, node, name)
        # activations.cc ReluPrepare: float32 ratio widened to double.
        mult, shift = qmath.quantize_multiplier(float(xt.s / out.s))
        y = out.zp + qmath.multiply_by_quantized_multiplier(x.astype(np.int64) - xt.zp, mult, shift)
        return np.clip(y, *qmath.tflite_activation_range(name, out.s, out.zp))

    return kernel


def _k_prelu(interp, k, op, node, ins, vals, out):
    x, a = vals
    if out.dtype == "float32":
        xf = x.astype(np.float64)
        return np.where(xf >= 0, xf, xf * a.astype(np.float64)).astype(np.float32)
    xt, at = ins
    _require_int8(xt, node, "PRELU")
    _require_int8(at, node, "PRELU")
    m1, s1 = qmath.quantize_multiplier(float(xt.s / out.s))
    m2, s2 = qmath.quantize_multiplier(float(f32(xt.s * at.s) / out.s))
    d = x.astype(np.int64) - xt.zp
    da = a.astype(np.int64) - at.zp
    pos = qmath.multiply_by_quantized_multiplier(d, m1, s1)
    neg = qmath.multiply_by_quantized_multiplier(d * da, m2, s2)
    return np.clip(np.where(d >= 0, pos, neg) + out.zp, INT8_MIN, INT8_MAX)


def _k_hard_swish(interp, k, op, node, ins, vals, out):
    x = vals[0]
    if out.dtype == "float32":
        xf = x.astype(np.float64)
        return (xf * np.clip(xf + 3.0, 0.0, 6.0) / 6.0).astype(np.float32)
    xt = ins[0]
    _require_int8(xt, node, "HARD_SWISH")
    p = interp._cached(k, lambda: _hard_swish_params(xt, out))
    if p[1] > 0:
        raise UnsupportedOpError("HARD_SWISH", node, TARGET, "TFLite needs (s_in / 128) / s_out < 1: widen the "
                                 "output scale")
    return _hard_swish_int8(x, xt.zp, out.zp, *p)


def _hard_swish_params(xt: _Tensor, out: _Tensor):
    """HardSwishPrepare: int16 fixed-point multipliers from float32 ratios."""
    hires_input_scale = f32(1.0 / 128.0) * xt.s
    reluish_scale = f32(3.0) / f32(32768.0)
    out_m, out_e = qmath.quantize_multiplier(float(hires_input_scale / out.s))
    rel_m, rel_e = qmath.quantize_multiplier(float(hires_input_scale / reluish_scale))
    return _downscale_to_int16(out_m), out_e, _downscale_to_int16(rel_m), rel_e


def _downscale_to_int16(m: int) -> int:
    if m >= (1 << 31) - 1 - (1 << 15):
        return (1 << 15) - 1
    return (m + (1 << 15)) >> 16


def _srdhm16(a: np.ndarray, b) -> np.ndarray:
    """gemmlowp SaturatingRoundingDoublingHighMul on int16."""
    a = a.astype(np.int64)
    ab = a * int(b)
    t = ab + np.where(ab >= 0, 1 << 14, 1 - (1 << 14))
    res = np.sign(t) * (np.abs(t) >> 15)
    return np.where((a == -32768) & (int(b) == -32768), 32767, res)


def _sat16(x: np.ndarray) -> np.ndarray:
    return np.clip(x, -32768, 32767)


def _hard_swish_int8(x, in_zp, out_zp, out_m16, out_e, rel_m16, rel_e) -> np.ndarray:
    """reference_ops::HardSwish for int8 (x86 builds take this scalar path)."""
    v = x.astype(np.int64) - in_zp
    hires = v * 128
    pre_out = _srdhm16(hires, out_m16)
    rel = hires
    if rel_e > 0:
        rel = _sat16(rel * (1 << (rel_e - 1)))
    rel = _srdhm16(rel, rel_m16)
    if rel_e > 0:
        rel = _sat16(rel * 2)
    if rel_e < 0:
        rel = qmath.rounding_divide_by_pot(rel, -rel_e)
    rel = (rel + (1 << 15)) >> 1
    prod = rel * pre_out
    # SaturatingDoublingHighMul: truncating division by 2**15.
    pre = np.sign(prod) * (np.abs(prod) >> 15)
    pre = np.where((rel == -32768) & (pre_out == -32768), 32767, pre)
    y = qmath.rounding_divide_by_pot(pre, -out_e) + out_zp
    return np.clip(y, INT8_MIN, INT8_MAX)


def _k_resize_nearest(interp, k, op, node, ins, vals, out):
    x = vals[0]
    o = op.builtinOptions
    oh, ow = (int(v) for v in np.asarray(vals[1]).reshape(-1))
    _, ih, iw, _ = x.shape
    if o.alignCorners or o.halfPixelCenters or x.dtype.itemsize != 1:
        rows = _nearest_float(oh, ih, o.alignCorners, o.halfPixelCenters)
        cols = _nearest_float(ow, iw, o.alignCorners, o.halfPixelCenters)
    else:
        # optimized_ops::ResizeNearestNeighbor (8-bit): 16.16 fixed-point scale + 1.
        rows = np.minimum((np.arange(oh) * ((ih << 16) // oh + 1)) >> 16, ih - 1)
        cols = np.minimum((np.arange(ow) * ((iw << 16) // ow + 1)) >> 16, iw - 1)
    return x[:, rows][:, :, cols]


def _nearest_float(out_size: int, in_size: int, align: bool, half: bool) -> np.ndarray:
    """reference_ops GetNearestNeighbor in float32."""
    scale = (f32(in_size - 1) / f32(out_size - 1)) if (align and out_size > 1) else f32(in_size) / f32(out_size)
    pos = (np.arange(out_size, dtype=np.float32) + f32(0.5 if half else 0.0)) * scale
    idx = qmath.round_half_away(pos) if align else np.floor(pos)
    idx = np.minimum(idx.astype(np.int64), in_size - 1)
    return np.maximum(idx, 0) if half else idx


# --- float-only ops: edgepack writes them on float32 tensors, never int8 ------------


def _require_float(ts, node: str, op: str):
    """GELU, BATCH_MATMUL, RSQRT and RESIZE_BILINEAR have no int8 path in edgepack."""
    for t in ts:
        if t.dtype != "float32":
            raise UnsupportedOpError(op, node, TARGET, f"edgepack writes {op} in float32 only; tensor {t.name!r} "
                                     f"is {t.dtype} (keep the op in float: dequantize its inputs first)")


_erf = np.frompyfunc(math.erf, 1, 1)     # numpy has no erf; libm's, element by element, in float64


def _k_gelu(interp, k, op, node, ins, vals, out):
    _require_float([ins[0], out], node, "GELU")
    x = vals[0].astype(np.float64)
    if getattr(op.builtinOptions, "approximate", False):
        y = 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))
    else:
        y = 0.5 * x * (1.0 + np.asarray(_erf(x * math.sqrt(0.5)), dtype=np.float64))
    return y.astype(np.float32)


def _k_batch_matmul(interp, k, op, node, ins, vals, out):
    _require_float([ins[0], ins[1], out], node, "BATCH_MATMUL")
    o = op.builtinOptions
    a, b = (v.astype(np.float64) for v in vals[:2])
    if getattr(o, "adjX", False):
        a = np.swapaxes(a, -1, -2)
    if getattr(o, "adjY", False):
        b = np.swapaxes(b, -1, -2)
    return np.matmul(a, b).astype(np.float32)     # batch dims broadcast as TFLite's do


def _k_rsqrt(interp, k, op, node, ins, vals, out):
    _require_float([ins[0], out], node, "RSQRT")
    with np.errstate(divide="ignore", invalid="ignore"):
        return (1.0 / np.sqrt(vals[0].astype(np.float64))).astype(np.float32)


def _k_resize_bilinear(interp, k, op, node, ins, vals, out):
    _require_float([ins[0], out], node, "RESIZE_BILINEAR")
    o = op.builtinOptions
    if o.alignCorners and o.halfPixelCenters:
        raise UnsupportedOpError("RESIZE_BILINEAR", node, TARGET, "align_corners and half_pixel_centers exclude "
                                 "each other (LiteRT refuses the op)")
    x = vals[0].astype(np.float64)
    oh, ow = (int(v) for v in np.asarray(vals[1]).reshape(-1))
    _, ih, iw, _ = x.shape
    py, y0, y1 = _bilinear_float(oh, ih, o.alignCorners, o.halfPixelCenters)
    px, x0, x1 = _bilinear_float(ow, iw, o.alignCorners, o.halfPixelCenters)
    dy = (py - y0)[None, :, None, None]
    dx = (px - x0)[None, None, :, None]
    top = x[:, y0][:, :, x0] * (1 - dx) + x[:, y0][:, :, x1] * dx
    bottom = x[:, y1][:, :, x0] * (1 - dx) + x[:, y1][:, :, x1] * dx
    return (top * (1 - dy) + bottom * dy).astype(np.float32)


def _bilinear_float(out_size: int, in_size: int, align: bool, half: bool):
    """reference_ops ComputeInterpolationValues in float32: the source position of every
    output index and its lower / upper neighbours (clamped into the input)."""
    scale = (f32(in_size - 1) / f32(out_size - 1)) if (align and out_size > 1) else f32(in_size) / f32(out_size)
    pos = np.arange(out_size, dtype=np.float32)
    pos = (pos + f32(0.5)) * scale - f32(0.5) if half else pos * scale
    lo = np.maximum(np.floor(pos).astype(np.int64), 0)
    hi = np.minimum(np.ceil(pos).astype(np.int64), in_size - 1)
    # below 0 (half-pixel centres) lo == hi == 0, so the weight pos - lo cancels out, as in TFLite
    return pos.astype(np.float64), lo, hi


_KERNELS: dict[str, Callable] = {
    "CONV_2D": _k_conv2d,
    "DEPTHWISE_CONV_2D": _k_depthwise,
    "FULLY_CONNECTED": _k_fully_connected,
    "ADD": _k_add_sub(1, "ADD"),
    "SUB": _k_add_sub(-1, "SUB"),
    "MUL": _k_mul,
    "AVERAGE_POOL_2D": _k_avg_pool,
    "MAX_POOL_2D": _k_max_pool,
    "MEAN": _k_mean,
    "RESHAPE": _k_reshape,
    "SOFTMAX": _k_softmax,
    "LOGISTIC": _lut_op(_sigmoid, "LOGISTIC"),
    "TANH": _lut_op(np.tanh, "TANH"),
    "HARD_SWISH": _k_hard_swish,
    "RELU": _k_relu_x("RELU"),
    "RELU6": _k_relu_x("RELU6"),
    "RELU_N1_TO_1": _k_relu_x("RELU_N1_TO_1"),
    "MINIMUM": _k_min_max(np.minimum, "MINIMUM"),
    "MAXIMUM": _k_min_max(np.maximum, "MAXIMUM"),
    "SLICE": _k_slice,
    "LEAKY_RELU": _k_leaky_relu,
    "PRELU": _k_prelu,
    "QUANTIZE": _k_quantize,
    "DEQUANTIZE": _k_dequantize,
    "DENSIFY": _k_densify,
    "CONCATENATION": _k_concat,
    "PAD": _k_pad,
    "TRANSPOSE": _k_transpose,
    "RESIZE_NEAREST_NEIGHBOR": _k_resize_nearest,
    "GELU": _k_gelu,
    "BATCH_MATMUL": _k_batch_matmul,
    "RSQRT": _k_rsqrt,
    "RESIZE_BILINEAR": _k_resize_bilinear,
}

#: op names the reference implements.
SUPPORTED_OPS = frozenset(_KERNELS)

ReferenceInterpreter.KERNELS = _KERNELS
