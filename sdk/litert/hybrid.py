"""Dynamic-range ("hybrid") FULLY_CONNECTED / CONV_2D / DEPTHWISE_CONV_2D of LiteRT 2.3.0, in numpy.

A hybrid op takes a float32 input, constant symmetric int8 (or INT4) weights
with per-output-channel float scales, a float32 bias and gives a float32
output.  LiteRT quantizes the input at run time; which code does it decides the
arithmetic, and this module reproduces each one bit for bit (x86-64 wheel,
default XNNPACK delegate):

=========================  ========  ==========================================
op / weights               runs in   functions here
=========================  ========  ==========================================
FULLY_CONNECTED int8;      XNNPACK   :func:`fully_connected` (qd8 GEMM, one
INT4 with even k                     quantization per batch row)
FULLY_CONNECTED blockwise  XNNPACK   :func:`fully_connected_blockwise` (qb4w
INT4 (fp16 scales, block             GEMM; other block sizes go to a builtin
a multiple of 32)                    4-bit kernel, not reproduced)
CONV_2D int8               XNNPACK   :func:`conv2d` (qd8 IGEMM, one quantization
                                     per image; 1x1 stride-1 convs become an FC,
                                     one quantization per pixel)
FULLY_CONNECTED INT4,      builtin   :func:`builtin_fully_connected`
odd k
CONV_2D INT4               builtin   :func:`builtin_conv2d`
DEPTHWISE_CONV_2D int8     builtin   :func:`builtin_depthwise_conv2d`
=========================  ========  ==========================================

The builtin functions also reproduce int8 FC / CONV_2D with the delegate off
(``load_interpreter(delegate=False)``), except INT4 FC weights with an even
depth >= 32 and >= 4 outputs, which then take TFLite's separate 4-bit kernel.

:func:`hybrid_fully_connected` and :func:`hybrid_conv2d` pick the path the way
the delegate does (``tflite/delegates/xnnpack/xnnpack_delegate.cc``: a float
input with int8/int4 FC weights or int8 CONV_2D weights is "dynamically
quantized"; INT4 FC weights with an odd input depth and INT4 CONV_2D weights
are declined).

XNNPACK (read in google/XNNPACK: ``src/xnnpack/quantization.h``,
``src/operator-run.c`` ``xnn_compute_f32_qx8_convert``,
``src/f32-qs8-vcvt/gen/f32-qs8-vcvt-avx2-u64.c``,
``src/qd8-f32-qc8w-gemm/gen/qd8-f32-qc8w-gemm-4x8c8-minmax-avx2.c``,
``src/qd8-f32-qc8w-igemm/gen/qd8-f32-qc8w-igemm-4x8c8-minmax-avx2.c``,
``src/qd8-f32-qc4w-gemm/gen/qd8-f32-qc4w-gemm-4x8c8-minmax-avx2-madd-prfm.c``,
``src/subgraph/convolution-2d.c`` for the 1x1 rewrite; the delegate passes
``num_nonbatch_dims`` 1 for FC and 3 for CONV_2D), all in float32:

* per row: ``rmin = min(0, min x)``, ``rmax = max(0, max x)``;
  ``s = 255 / (rmax - rmin)`` (1 when both are 0);
  ``zp = -128 - rmin*s`` if ``(-128 + rmin*s) + (127 + rmax*s) > 0`` else
  ``127 - rmax*s``, clamped to [-128, 127] and rounded half to even (lrintf);
* ``q = sat8(rint_even(min(x*s, 32767)) + zp)``; padding holds ``zp``;
* ``acc = sum((q - zp) * w)`` exact in int32 (the kernels fold ``-zp*sum(w)``
  into the packed weights; the int4 kernel's unsigned-nibble trick is exact too);
* ``y = fma(float(acc) * (1/s), w_scale, bias)`` (one multiply, then a fused
  multiply-add: the AVX2 kernels use ``_mm256_fmadd_ps``), then
  ``min(max(y, out_min), out_max)`` with the activation's range.

TFLite builtin kernels (read in google-ai-edge/LiteRT: ``tflite/kernels/
fully_connected.cc`` ``EvalHybridDense``, ``conv.cc`` ``EvalHybridPerChannel`` /
``EvalHybrid``, ``depthwise_conv.cc`` ``EvalHybridPerChannel``,
``internal/optimized/neon_tensor_utils.cc`` ``NeonSymmetricQuantizeFloats`` /
``NeonAsymmetricQuantizeFloats`` (the x86 wheel compiles them through
NEON_2_SSE), ``internal/optimized/sse_tensor_utils.cc``,
``internal/optimized/optimized_ops.h`` ``HybridConv`` / ``HybridConvPerChannel``,
``internal/optimized/integer_ops/depthwise_conv_hybrid.h``):

* symmetric (FC default; CONV_2D when all weight scales are equal):
  ``range = max(|min x|, |max x|)``, ``sf = range/127``, ``q = clamp(round(x *
  (127/range)), -127, 127)``; asymmetric (FC with ``asymmetric_quantize_inputs``;
  per-channel CONV_2D; DEPTHWISE): ``rmin/rmax`` capped at 0,
  ``scale = double(rmax - rmin)/255``, the zero point of smaller error, in
  double, rounded half away; ``q = clamp(round(x * float(1/scale)) + zp)``;
  "round" is ``trunc(v +- 0.5)`` (float add) on the first ``8*floor(n/8)``
  values of a row and ``std::round`` on the rest;
* FC: ``y = bias + float(acc - zp*rowsum) * float(w_scale*sf)``, then the
  activation; an all-zero input tensor gives ``activation(bias)``.  ``acc``
  comes from ``SseMatrixBatchVectorMultiplyAccumulateImpl``, whose 16/32-wide
  blocks (the first ``k & ~15`` columns) use ``_mm_sign_epi8``: a weight of
  -128 against a negative input code counts as +128 (:func:`_sse_dot`); the
  row sums wrap in int16 lanes past ~2048 columns (:func:`_sse_row_sums`);
* CONV_2D per-channel (ruy GEMM, exact): ``float(acc - zp*rowsum) *
  float(w_scale*sf) + bias``; per-tensor: ``float(acc) * float(sf*w_scale) +
  bias`` (ruy when ``O % 4 == 0``, else the SSE kernel and its -128 quirk);
  then clamp;
* DEPTHWISE: channel blocks of 4: ``(float(acc)*w_scale)*sf + bias``; the last
  ``C % 4`` channels: ``(float(acc)*sf)*w_scale + bias``; then clamp.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "ACTIVATION_RANGES",
    "builtin_conv2d",
    "builtin_depthwise_conv2d",
    "builtin_fully_connected",
    "conv2d",
    "fully_connected",
    "fully_connected_blockwise",
    "hybrid_conv2d",
    "hybrid_fully_connected",
    "qd8_params",
    "qd8_quantize",
    "tflite_asymmetric_quantize",
    "tflite_symmetric_quantize",
    "xnnpack_takes_conv2d",
    "xnnpack_takes_fully_connected",
]

_F32 = np.float32

#: fused activation -> (output_min, output_max): XNNPACK delegate's
#: ConvertActivationToOutputRange, TFLite's CalculateActivationRange
ACTIVATION_RANGES: dict = {
    None: (-np.inf, np.inf),
    "NONE": (-np.inf, np.inf),
    "RELU": (0.0, np.inf),
    "RELU6": (0.0, 6.0),
    "RELU_N1_TO_1": (-1.0, 1.0),
}


def _range(activation) -> tuple[np.float32, np.float32]:
    key = activation.upper() if isinstance(activation, str) else activation
    try:
        lo, hi = ACTIVATION_RANGES[key]
    except KeyError:
        raise ValueError(f"unsupported fused activation {activation!r}; valid: NONE, RELU, RELU6, "
                         "RELU_N1_TO_1") from None
    return _F32(lo), _F32(hi)


def _pair(v) -> tuple[int, int]:
    if isinstance(v, (int, np.integer)):
        return int(v), int(v)
    a, b = v
    return int(a), int(b)


def _exact_dot(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Integer ``a @ b`` through float64 BLAS (exact while |acc| < 2**53), as int64."""
    return np.rint(np.asarray(a, np.float64) @ np.asarray(b, np.float64)).astype(np.int64)


def _i2f(acc: np.ndarray) -> np.ndarray:
    """int32 -> float32 conversion, round to nearest even (cvtdq2ps): through exact float64."""
    return np.asarray(acc, np.int64).astype(np.float64).astype(_F32)


def _fma32(a, b, c) -> np.ndarray:
    """float32 ``fma(a, b, c)`` rounded once: ``a*b`` is exact in float64, the
    sum is taken in float64 with round-to-odd (two-sum error term), so the final
    rounding to float32 is the correct one."""
    p = np.asarray(a, np.float64) * np.asarray(b, np.float64)
    c = np.asarray(c, np.float64)
    p, c = np.broadcast_arrays(p, c)
    s = p + c
    bp = s - p
    err = (p - (s - bp)) + (c - bp)
    bits = np.ascontiguousarray(s).view(np.int64)
    fix = (err != 0) & ((bits & 1) == 0) & np.isfinite(s)
    if fix.any():
        s = np.where(fix, np.nextafter(s, np.where(err > 0, np.inf, -np.inf)), s)
    return s.astype(_F32)


def _clamp_minmax(y: np.ndarray, lo: np.float32, hi: np.float32) -> np.ndarray:
    """``min_ps(max_ps(y, lo), hi)``: SSE max/min return the second operand unless the first wins."""
    y = np.where(y > lo, y, lo)
    return np.where(y < hi, y, hi).astype(_F32)


# --- XNNPACK qd8 ------------------------------------------------------------


def qd8_params(rmin, rmax) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """XNNPACK ``xnn_f32_qd8_asymmetric_quantization_params`` of rows whose
    min/max are ``rmin``/``rmax``: ``(quantize multiplier s, dequantize scale
    1/s, zero point)``, float32, float32, int32."""
    rmin = np.minimum(_F32(0), np.asarray(rmin, _F32))
    rmax = np.maximum(_F32(0), np.asarray(rmax, _F32))
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        s = np.where(rmin == rmax, _F32(1), _F32(255) / (rmax - rmin)).astype(_F32)
        dmin = (rmin * s).astype(_F32)
        dmax = (rmax * s).astype(_F32)
        from_min = (_F32(-128) + dmin).astype(_F32)
        from_max = (_F32(127) + dmax).astype(_F32)
        zp = np.where((from_min + from_max).astype(_F32) > 0, _F32(-128) - dmin, _F32(127) - dmax).astype(_F32)
        zp = np.minimum(np.maximum(zp, _F32(-128)), _F32(127))
        inv = (_F32(1) / s).astype(_F32)
    return s, inv, np.rint(zp).astype(np.int32)


def qd8_quantize(x2d: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """XNNPACK's run-time quantization of each row of ``x2d`` (f32-qs8-vcvt):
    ``(codes int8 [rows, k], dequantize scale float32 [rows], zero point int32 [rows])``."""
    x2d = np.asarray(x2d, _F32)
    if x2d.shape[1] == 0:
        raise ValueError("rows of length 0")
    s, inv, zp = qd8_params(x2d.min(axis=1), x2d.max(axis=1))
    with np.errstate(over="ignore", invalid="ignore"):
        v = np.minimum((x2d * s[:, None]).astype(_F32), _F32(32767))
    v = np.clip(np.rint(v), -32768, 32767).astype(np.int64)          # cvtps (even), packs to int16
    q = np.clip(np.clip(v + zp[:, None], -32768, 32767), -128, 127)  # adds_epi16, packs to int8
    return q.astype(np.int8), inv, zp


def _qd8_epilogue(acc, inv_rows, scales, bias, activation) -> np.ndarray:
    """``min(max(fma(float(acc) * inv, w_scale, bias), lo), hi)`` of an ``[rows, n]`` int accumulator."""
    n = acc.shape[1]
    out = (_i2f(acc) * np.asarray(inv_rows, _F32)[:, None]).astype(_F32)
    sc = np.broadcast_to(np.asarray(scales, _F32).reshape(-1), (n,))
    b = np.zeros(n, _F32) if bias is None else np.asarray(bias, _F32).reshape(n)
    out = _fma32(out, sc[None, :], b[None, :])
    return _clamp_minmax(out, *_range(activation))


def fully_connected(x: np.ndarray, codes: np.ndarray, scales, bias=None, activation="NONE") -> np.ndarray:
    """XNNPACK's dynamically quantized FULLY_CONNECTED (qd8-f32-qc8w / qc4w GEMM).

    ``x`` float32 ``[..., k]`` (rows = all leading dims, as without
    ``keep_num_dims``), ``codes`` int8 ``[n, k]`` (int4 codes as int8 in
    [-8, 7]), ``scales`` float32 ``[n]`` (or one), ``bias`` float32 ``[n]`` or
    None.  Returns float32 ``[rows, n]``.
    """
    codes = np.asarray(codes)
    n, k = codes.shape
    x2 = np.asarray(x, _F32).reshape(-1, k)
    q, inv, zp = qd8_quantize(x2)
    acc = _exact_dot(q.astype(np.int32) - zp[:, None], codes.T)
    return _qd8_epilogue(acc, inv, scales, bias, activation)



def _bf16_round(x: np.ndarray) -> np.ndarray:
    """XNNPACK ``math_cvt_bf16_fp32``: float32 -> bfloat16 (round to nearest even), returned as float32."""
    bits = np.ascontiguousarray(x, _F32).view(np.uint32).astype(np.uint64)
    finite = (bits & 0x7F800000) != 0x7F800000
    bits = np.where(finite, bits + 0x7FFF + ((bits >> 16) & 1), bits)
    return ((bits & 0xFFFF0000) & 0xFFFFFFFF).astype(np.uint32).view(_F32)


def fully_connected_blockwise(x: np.ndarray, codes: np.ndarray, scales_f16: np.ndarray, block_size: int,
                              bias=None, activation="NONE") -> np.ndarray:
    """XNNPACK's dynamically quantized FULLY_CONNECTED with blockwise INT4 weights
    (TFLite ``BlockwiseQuantization``: fp16 scales ``[n, k / block_size]``; qd8-f32-qb4w GEMM).

    Read in ``src/qd8-f32-qb4w-gemm/gen/qd8-f32-qb4w-gemm-3x8c8-minmax-avx2.c``,
    ``src/reference/packing.cc`` (``xnn_pack_qs8_qb4w_gemm_goi_w``),
    ``src/microparams-init.c`` (``xnn_init_blockwise_scale_bf16_params``) and
    ``xnn_create_fully_connected_nc_qd8_f32_qb4w_f16_scales``: the fp16 scales
    become bfloat16 (nearest even); the packed accumulator start is
    ``init = -sum_c(float(sum of 16 weights of chunk c) * scale)`` summed in
    order; each output keeps four float partial sums (k mod 8 in {2l, 2l+1}),
    lane 0 starting at ``init * zp``, and per block adds
    ``fma(float(sum q * 16 w), scale / 16, lane)``; the output is
    ``fma((l0 + l1) + (l2 + l3), 1/s, bias)``, clamped.  ``block_size`` must be
    a multiple of 32 dividing ``k`` (what XNNPACK accepts).
    """
    codes = np.asarray(codes).astype(np.int64)
    n, k = codes.shape
    bl = int(block_size)
    if bl % 32 or k % bl:
        raise ValueError(f"blockwise INT4 needs a block size that is a multiple of 32 and divides {k}")
    nblk = k // bl
    sc = _bf16_round(np.asarray(scales_f16, np.float16).astype(_F32).reshape(n, nblk))
    sc16 = _bf16_round((sc / _F32(16)).astype(_F32))
    x2 = np.asarray(x, _F32).reshape(-1, k)
    q, inv, zp = qd8_quantize(x2)
    # packed accumulator init, one float per output channel, chunk by chunk of 16 weights
    ksum = codes.reshape(n, k // 16, 16).sum(axis=2)
    init = np.zeros(n, _F32)
    for c in range(k // 16):
        init = (init - (ksum[:, c].astype(_F32) * sc[:, (c * 16) // bl]).astype(_F32)).astype(_F32)
    rows = x2.shape[0]
    lanes = np.zeros((4, rows, n), _F32)
    lanes[0] = (init[None, :] * zp.astype(_F32)[:, None]).astype(_F32)
    lanes[1:] = (np.zeros(n, _F32)[None, :] * zp.astype(_F32)[:, None]).astype(_F32)   # +-0
    lane_of_k = (np.arange(k) % 8) // 2
    w16 = 16 * codes
    for b in range(nblk):
        blk = slice(b * bl, (b + 1) * bl)
        for lane in range(4):
            sel = np.nonzero(lane_of_k[blk] == lane)[0] + b * bl
            acc = _exact_dot(q[:, sel].astype(np.int64), w16[:, sel].T)
            lanes[lane] = _fma32(_i2f(acc), sc16[None, :, b], lanes[lane])
    total = ((lanes[0] + lanes[1]).astype(_F32) + (lanes[2] + lanes[3]).astype(_F32)).astype(_F32)
    bvec = np.zeros(n, _F32) if bias is None else np.asarray(bias, _F32).reshape(n)
    out = _fma32(total, inv[:, None], bvec[None, :])
    return _clamp_minmax(out, *_range(activation))


def conv2d(x: np.ndarray, codes: np.ndarray, scales, bias=None, stride=(1, 1), padding="VALID",
           dilation=(1, 1), activation="NONE") -> np.ndarray:
    """XNNPACK's dynamically quantized CONV_2D (qd8-f32-qc8w IGEMM).

    ``x`` float32 NHWC, ``codes`` int8 OHWI (grouped when ``I`` divides ``C``),
    ``scales`` ``[O]`` (or one), ``bias`` ``[O]`` or None, ``padding``
    ``"SAME"``/``"VALID"``.  One quantization per image; a 1x1, stride-1,
    ungrouped conv with ``I + O > 2`` is rewritten by XNNPACK into a fully
    connected op and quantized per pixel.  Returns float32 NHWC.
    """
    from .reference import windows

    x = np.asarray(x, _F32)
    codes = np.asarray(codes)
    nb, h, w, c = x.shape
    o, kh, kw, ci = codes.shape
    if c % ci or o % (c // ci):
        raise ValueError(f"filter {codes.shape} does not fit input depth {c}")
    groups = c // ci
    stride, dilation = _pair(stride), _pair(dilation)
    if groups == 1 and kh == kw == 1 and stride == (1, 1) and ci + o > 2:
        return fully_connected(x.reshape(-1, c), codes.reshape(o, ci), scales, bias, activation).reshape(nb, h, w, o)
    q, inv, zp = qd8_quantize(x.reshape(nb, -1))
    a = (q.astype(np.int32) - zp[:, None]).reshape(x.shape)           # padding = zp -> 0
    win = windows(a, kh, kw, stride, dilation, str(padding).upper() == "SAME", 0)
    oh, ow = win.shape[1:3]
    acc = _grouped_acc(win.reshape(nb * oh * ow, kh * kw, groups, ci), codes, groups)
    out = _qd8_epilogue(acc, np.repeat(inv, oh * ow), scales, bias, activation)
    return out.reshape(nb, oh, ow, o)


def _grouped_acc(win: np.ndarray, codes: np.ndarray, groups: int) -> np.ndarray:
    """``[P, kh*kw, groups, ci]`` windows x OHWI codes -> ``[P, O]`` exact accumulators."""
    o = codes.shape[0]
    og = o // groups
    acc = np.empty((win.shape[0], o), np.int64)
    for g in range(groups):
        cols = win[:, :, g, :].reshape(win.shape[0], -1)
        acc[:, g * og:(g + 1) * og] = _exact_dot(cols, codes[g * og:(g + 1) * og].reshape(og, -1).T)
    return acc


# --- TFLite builtin hybrid kernels -------------------------------------------


def _round_vector_tail(v: np.ndarray, vec: int) -> np.ndarray:
    """NEON_2_SSE ``RoundToNearest`` (``trunc(v + (v < 0 ? -0.5 : 0.5))``, float add) on the
    first ``vec`` columns, ``std::round`` (half away from zero) on the rest."""
    out = np.empty(v.shape, np.float64)
    head = v[:, :vec]
    out[:, :vec] = np.trunc((head + np.where(head < 0, _F32(-0.5), _F32(0.5))).astype(_F32))
    tail = v[:, vec:].astype(np.float64)
    out[:, vec:] = np.sign(tail) * np.floor(np.abs(tail) + 0.5)
    return out


def tflite_symmetric_quantize(x2d: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """TFLite ``SymmetricQuantizeFloats`` of each row: ``(codes int8, scaling factor float32)``."""
    x2d = np.asarray(x2d, _F32)
    n = x2d.shape[1]
    rng = np.maximum(np.abs(x2d.min(axis=1)), np.abs(x2d.max(axis=1))).astype(_F32)
    zero = rng == 0
    safe = np.where(zero, _F32(1), rng)
    sf = np.where(zero, _F32(1), (safe / _F32(127)).astype(_F32)).astype(_F32)
    inv = (_F32(127) / safe).astype(_F32)
    with np.errstate(over="ignore", invalid="ignore"):
        v = (x2d * inv[:, None]).astype(_F32)
    r = _round_vector_tail(v, n & ~7)
    q = np.clip(r, -127, 127)
    q[zero] = 0
    return q.astype(np.int8), sf


def tflite_asymmetric_quantize(x2d: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """TFLite ``AsymmetricQuantizeFloats`` of each row: ``(codes int8, scaling factor float32, offset int32)``."""
    x2d = np.asarray(x2d, _F32)
    n = x2d.shape[1]
    rmin = np.minimum(_F32(0), x2d.min(axis=1)).astype(_F32)
    rmax = np.maximum(_F32(0), x2d.max(axis=1)).astype(_F32)
    zero = rmin == rmax
    scale = (rmax - rmin).astype(_F32).astype(np.float64) / 255.0
    scale = np.where(zero, 1.0, scale)
    zmin = -128.0 - rmin / scale
    zmax = 127.0 - rmax / scale
    emin = 128.0 + np.abs(rmin / scale)
    emax = 127.0 + np.abs(rmax / scale)
    zpd = np.where(emin < emax, zmin, zmax)
    zp = np.where(zpd <= -128, -128, np.where(zpd >= 127, 127, np.sign(zpd) * np.floor(np.abs(zpd) + 0.5)))
    zp = np.where(zero, 0, zp).astype(np.int32)
    sf = np.where(zero, _F32(1), scale.astype(_F32)).astype(_F32)
    inv = (1.0 / sf.astype(np.float64)).astype(_F32)
    with np.errstate(over="ignore", invalid="ignore"):
        v = (x2d * inv[:, None]).astype(_F32)
    r = _round_vector_tail(v, n & ~7)
    q = np.clip(r + zp[:, None], -128, 127)
    q[zero] = 0
    return q.astype(np.int8), sf, zp


def _sse_dot(q: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """``SseMatrixBatchVectorMultiplyAccumulateImpl``'s int32 dot products of
    input rows ``q`` ``[rows, k]`` with weight rows ``codes`` ``[n, k]``.

    Its 16- and 32-wide blocks (the first ``k & ~15`` columns) move the input's
    sign onto the weight with ``_mm_sign_epi8`` before ``_mm_maddubs_epi16``; a
    weight of -128 facing a negative input code stays -128 there, so that
    product comes out as ``+128*q`` instead of ``-128*q`` (``256*q`` off).
    """
    acc = _exact_dot(q, np.asarray(codes).T)
    k16 = q.shape[1] & ~15
    if k16:
        wmin = (np.asarray(codes)[:, :k16] == -128)
        if wmin.any():
            qneg = np.minimum(q[:, :k16].astype(np.int64), 0)
            acc = acc + 256 * _exact_dot(qneg, wmin.T)
    return acc


def _sse_row_sums(codes: np.ndarray) -> np.ndarray:
    """``SseReductionSumVector`` of each weight row: 16-wide blocks and one 8-wide
    block accumulate in eight int16 lanes (which wrap), the rest in int32."""
    codes = np.asarray(codes).astype(np.int64)
    n, k = codes.shape
    k16 = k & ~15
    lanes = np.zeros((n, 8), np.int64)
    if k16:
        blk = codes[:, :k16].reshape(n, -1, 8, 2).sum(axis=3)      # maddubs(1, w): pair sums, per block
        for i in range(blk.shape[1]):                                 # add_epi16, wrapping
            lanes = ((lanes + blk[:, i] + 32768) % 65536) - 32768
    col = k16
    if col < (k & ~7):
        lanes = ((lanes + codes[:, col:col + 8] + 32768) % 65536) - 32768
        col += 8
    return lanes.sum(axis=1) + codes[:, col:].sum(axis=1)


def _per_channel(scales, n: int) -> np.ndarray | None:
    """The per-channel scales (a tensor with more than one scale), or None (per-tensor)."""
    s = np.asarray(scales, _F32).reshape(-1)
    return np.broadcast_to(s, (n,)) if s.size > 1 else None


def builtin_fully_connected(x: np.ndarray, codes: np.ndarray, scales, bias=None, activation="NONE",
                            asymmetric_quantize_inputs: bool = False, weight_dtype: str = "int8") -> np.ndarray:
    """TFLite's builtin hybrid FULLY_CONNECTED (``EvalHybridDense``: int8 weights, or
    INT4 ones unpacked to int8), the kernel LiteRT runs where XNNPACK declines the op.

    Same arguments as :func:`fully_connected`; ``scales`` with one element is
    per-tensor.  Returns float32 ``[rows, n]``.  INT4 weights with an even
    ``k >= 32`` and ``n >= 4`` take TFLite's separate 4-bit kernel
    (``EvalHybridDense4Bit``), which is not reproduced: LiteRT only runs it
    with the XNNPACK delegate disabled (XNNPACK takes every even-``k`` INT4 FC).
    """
    codes = np.asarray(codes)
    n, k = codes.shape
    if weight_dtype == "int4" and k % 2 == 0 and k >= 32 and n >= 4:
        raise ValueError("INT4 FULLY_CONNECTED with an even depth >= 32 runs TFLite's 4-bit kernel "
                         "(EvalHybridDense4Bit), which this module does not reproduce")
    x2 = np.asarray(x, _F32).reshape(-1, k)
    rows = x2.shape[0]
    out = np.zeros((rows, n), _F32) if bias is None else np.tile(np.asarray(bias, _F32).reshape(1, n), (rows, 1))
    lo, hi = _range(activation)
    if not np.any(x2 != 0):                                   # IsZeroVector: skip the product
        return _activation(out, lo, hi)
    if asymmetric_quantize_inputs:
        q, sf, zp = tflite_asymmetric_quantize(x2)
    else:
        (q, sf), zp = tflite_symmetric_quantize(x2), np.zeros(rows, np.int32)
    pc = _per_channel(scales, n)
    if pc is None:
        row_scale = np.broadcast_to((sf * np.asarray(scales, _F32).reshape(-1)[0]).astype(_F32)[:, None], (rows, n))
    else:
        row_scale = (pc[None, :] * sf[:, None]).astype(_F32)
    acc = _sse_dot(q, codes) - zp[:, None].astype(np.int64) * _sse_row_sums(codes)[None, :]
    out = (out + (_i2f(acc) * row_scale).astype(_F32)).astype(_F32)
    return _activation(out, lo, hi)


def _activation(y: np.ndarray, lo, hi) -> np.ndarray:
    """``std::min(std::max(y, lo), hi)`` (the activation functions of tensor_utils)."""
    return np.minimum(np.maximum(y, lo), hi).astype(_F32)


def builtin_conv2d(x: np.ndarray, codes: np.ndarray, scales, bias=None, stride=(1, 1), padding="VALID",
                   dilation=(1, 1), activation="NONE") -> np.ndarray:
    """TFLite's builtin hybrid CONV_2D (what LiteRT runs for INT4 filters with a float input).

    Filters whose scales differ take ``EvalHybridPerChannel`` (asymmetric
    per-image quantization, im2col padded with the zero point); equal scales
    take ``EvalHybrid`` (symmetric per-image quantization, padding 0).
    Ungrouped convs only.  Same arguments as :func:`conv2d`.
    """
    from .reference import windows

    x = np.asarray(x, _F32)
    codes = np.asarray(codes)
    nb, h, w, c = x.shape
    o, kh, kw, ci = codes.shape
    if ci != c:
        raise ValueError("builtin hybrid CONV_2D reproduction covers ungrouped convs only")
    stride, dilation = _pair(stride), _pair(dilation)
    s = np.asarray(scales, _F32).reshape(-1)
    per_channel = s.size > 1 and np.any(s != s[0])
    flat = x.reshape(nb, -1)
    if per_channel:
        q, sf, zp = tflite_asymmetric_quantize(flat)
    else:
        (q, sf), zp = tflite_symmetric_quantize(flat), np.zeros(nb, np.int32)
    a = (q.astype(np.int32) - zp[:, None]).reshape(x.shape)           # pad value zp -> 0 after the offset
    win = windows(a, kh, kw, stride, dilation, str(padding).upper() == "SAME", 0)
    oh, ow = win.shape[1:3]
    cols = win.reshape(nb * oh * ow, -1)
    if per_channel or o % 4 == 0:   # ruy GEMM (x86 with AVX: PreferGemmlowpOnX86() is false)
        acc = _exact_dot(cols, codes.reshape(o, -1).T)
    else:                           # SseMatrixBatchVectorMultiplyAccumulateImpl
        acc = _sse_dot(cols, codes.reshape(o, -1))
    b = np.zeros(o, _F32) if bias is None else np.asarray(bias, _F32).reshape(o)
    lo, hi = _range(activation)
    sf_rows = np.repeat(sf, oh * ow)
    if per_channel:
        mult = (s[None, :] * sf_rows[:, None]).astype(_F32)
    else:
        mult = np.broadcast_to((sf_rows * s[0]).astype(_F32)[:, None], acc.shape)
    out = ((_i2f(acc) * mult).astype(_F32) + b[None, :]).astype(_F32)
    out = np.maximum(np.minimum(out, hi), lo) if per_channel else np.minimum(np.maximum(out, lo), hi)
    return out.astype(_F32).reshape(nb, oh, ow, o)


def builtin_depthwise_conv2d(x: np.ndarray, codes: np.ndarray, scales, bias=None, stride=(1, 1),
                             padding="VALID", dilation=(1, 1), depth_multiplier: int = 1,
                             activation="NONE") -> np.ndarray:
    """TFLite's builtin hybrid DEPTHWISE_CONV_2D (``EvalHybridPerChannel``; XNNPACK
    declines a float input with int8 depthwise weights).

    ``codes`` int8 ``[1, KH, KW, C*M]``, ``scales`` ``[C*M]``.  Asymmetric
    per-image quantization; padded taps are skipped.  Returns float32 NHWC.
    """
    from .reference import windows

    x = np.asarray(x, _F32)
    codes = np.asarray(codes)
    nb, h, w, c = x.shape
    _, kh, kw, oc = codes.shape
    m = int(depth_multiplier)
    if oc != c * m:
        raise ValueError(f"depthwise filter {codes.shape} does not fit {c} channels x {m}")
    stride, dilation = _pair(stride), _pair(dilation)
    q, sf, zp = tflite_asymmetric_quantize(x.reshape(nb, -1))
    a = (q.astype(np.int32) - zp[:, None]).reshape(x.shape)
    win = windows(a, kh, kw, stride, dilation, str(padding).upper() == "SAME", 0)   # N,OH,OW,KH,KW,C
    oh, ow = win.shape[1:3]
    win = np.repeat(win, m, axis=-1).astype(np.int64)                 # output channel c*m + j reads input c
    acc = np.einsum("nhwijc,ijc->nhwc", win, codes[0].astype(np.int64))
    pcs = np.broadcast_to(np.asarray(scales, _F32).reshape(-1), (oc,))
    b = np.zeros(oc, _F32) if bias is None else np.asarray(bias, _F32).reshape(oc)
    sfi = sf[:, None, None, None]
    f = _i2f(acc)
    vec = oc & ~3
    out = np.empty(f.shape, _F32)
    out[..., :vec] = ((f[..., :vec] * pcs[:vec]).astype(_F32) * sfi).astype(_F32)
    out[..., vec:] = ((f[..., vec:] * sfi).astype(_F32) * pcs[vec:]).astype(_F32)
    out = (out + b).astype(_F32)
    lo, hi = _range(activation)
    return np.minimum(np.maximum(out, lo), hi).astype(_F32)


# --- which kernel LiteRT 2.3.0 runs --------------------------------------------


def xnnpack_takes_fully_connected(weight_dtype: str, k: int) -> bool:
    """Whether the XNNPACK delegate runs a hybrid FC with these weights (INT4 needs an even input depth)."""
    return weight_dtype == "int8" or (weight_dtype == "int4" and k % 2 == 0)


def xnnpack_takes_conv2d(weight_dtype: str) -> bool:
    """Whether the XNNPACK delegate runs a hybrid CONV_2D (int8 filters only)."""
    return weight_dtype == "int8"


def hybrid_fully_connected(x, codes, scales, bias=None, activation="NONE", weight_dtype: str = "int8",
                           asymmetric_quantize_inputs: bool = False) -> np.ndarray:
    """What LiteRT 2.3.0 (default delegate) computes for a hybrid FULLY_CONNECTED."""
    codes = np.asarray(codes)
    if xnnpack_takes_fully_connected(weight_dtype, codes.shape[1]):
        return fully_connected(x, codes, scales, bias, activation)
    return builtin_fully_connected(x, codes, scales, bias, activation, asymmetric_quantize_inputs, weight_dtype)


def hybrid_conv2d(x, codes, scales, bias=None, stride=(1, 1), padding="VALID", dilation=(1, 1),
                  activation="NONE", weight_dtype: str = "int8") -> np.ndarray:
    """What LiteRT 2.3.0 (default delegate) computes for a hybrid CONV_2D."""
    if xnnpack_takes_conv2d(weight_dtype):
        return conv2d(x, codes, scales, bias, stride, padding, dilation, activation)
    return builtin_conv2d(x, codes, scales, bias, stride, padding, dilation, activation)
