"""Dynamic-range ("hybrid") FC / CONV_2D / DEPTHWISE_CONV_2D: numpy (sdk.litert.hybrid) == LiteRT, bit for bit.

Each case builds a one-op model (float32 input, constant int8 / INT4 weights
with float scales, float32 bias and output), runs it in LiteRT 2.3.0 (default
XNNPACK delegate, one thread; the delegate-less builtin kernels where noted)
and compares the float32 outputs bit for bit (``view(int32)``, so even the
sign of zero must agree).  The inputs hold the rows that stress the run-time
quantization: all equal, all zero, negative only, a dynamic range of 2**±14,
exact rounding ties, and odd / non-multiple-of-16 depths.
"""

from __future__ import annotations

import numpy as np
import pytest

from sdk.litert import hybrid, runtime
from sdk.litert.flatbuffer import ModelBuilder, fb
from sdk.litert.padding import out_size_and_pad

# --- helpers ---------------------------------------------------------------------


def _row(rng, k: int, kind: str) -> np.ndarray:
    x = rng.standard_normal(k)
    if kind == "wide":
        x = x * np.exp2(rng.uniform(-14, 14, k))
    elif kind == "neg":
        x = -np.abs(x) - 0.25
    elif kind == "pos":
        x = np.abs(x) + 0.25
    elif kind == "equal":
        x = np.full(k, 1.25)
    elif kind == "zero":
        x = np.zeros(k)
    elif kind == "ties":      # qd8: s = 255/6 = 42.5, so x*s lands on .5
        x = rng.choice([0.0, 6.0, 1.0, 3.0, 5.0], k)
        x[:2] = 0.0, 6.0
    elif kind == "ties127":   # builtin symmetric: 127/range = 1, so x*1 lands on .5
        x = rng.choice([-127.0, -2.5, -0.5, 0.5, 1.5, 126.5], k)
        x[0] = -127.0
    return x.astype(np.float32)


KINDS = ("normal", "wide", "neg", "zero", "equal", "ties", "pos", "ties127")


def _rows(rng, rows: int, k: int) -> np.ndarray:
    return np.stack([_row(rng, k, KINDS[i % len(KINDS)]) for i in range(rows)])


def _images(rng, shape, start: int = 0) -> np.ndarray:
    """``shape[0]`` images, each of one row kind (in turn from ``KINDS[start]``)."""
    n, h, w, c = shape
    return np.stack([_row(rng, h * w * c, KINDS[(start + i) % len(KINDS)]).reshape(h, w, c) for i in range(n)])


def _codes(rng, shape, dtype: str) -> np.ndarray:
    lim = 127 if dtype == "int8" else 7
    return rng.integers(-lim - 1, lim + 1, shape).astype(np.int8)


def _scales(rng, n: int) -> np.ndarray:
    return np.exp2(rng.uniform(-9, -3, n)).astype(np.float32)


def _fc_model(x_shape, codes, scales, bias, dtype, activation, keep_num_dims=False, asymmetric=False) -> bytes:
    n, k = codes.shape
    b = ModelBuilder()
    x = b.add_tensor("x", x_shape, "float32")
    w = b.add_tensor("w", (n, k), dtype, data=codes, scale=scales, zero_point=0, axis=0)
    bb = None if bias is None else b.add_tensor("b", (n,), "float32", data=bias)
    out_shape = (*x_shape[:-1], n) if keep_num_dims else (int(np.prod(x_shape[:-1])), n)
    y = b.add_tensor("y", out_shape, "float32")
    b.add_op("FULLY_CONNECTED", [x, w, bb], [y], activation=activation, keep_num_dims=keep_num_dims)
    if asymmetric:   # FullyConnectedOptions.asymmetric_quantize_inputs (the builder has no keyword for it)
        b._operators[-1].builtinOptions.asymmetricQuantizeInputs = True
    b.set_io([x], [y])
    return b.finish()


def _conv_model(x_shape, codes, scales, bias, dtype, stride, padding, dilation, activation) -> bytes:
    n, h, w, _ = x_shape
    o, kh, kw, _ = codes.shape
    oh, _ = out_size_and_pad(h, kh, stride[0], dilation[0], padding == "SAME")
    ow, _ = out_size_and_pad(w, kw, stride[1], dilation[1], padding == "SAME")
    b = ModelBuilder()
    x = b.add_tensor("x", x_shape, "float32")
    wt = b.add_tensor("w", codes.shape, dtype, data=codes, scale=scales, zero_point=0, axis=0)
    bb = b.add_tensor("b", (o,), "float32", data=bias)
    y = b.add_tensor("y", (n, oh, ow, o), "float32")
    b.add_op("CONV_2D", [x, wt, bb], [y], stride=stride, padding=padding, dilation=dilation, activation=activation)
    b.set_io([x], [y])
    return b.finish()


def _dw_model(x_shape, codes, scales, bias, stride, padding, dilation, multiplier, activation) -> bytes:
    n, h, w, _ = x_shape
    _, kh, kw, oc = codes.shape
    oh, _ = out_size_and_pad(h, kh, stride[0], dilation[0], padding == "SAME")
    ow, _ = out_size_and_pad(w, kw, stride[1], dilation[1], padding == "SAME")
    b = ModelBuilder()
    x = b.add_tensor("x", x_shape, "float32")
    wt = b.add_tensor("w", codes.shape, "int8", data=codes, scale=scales, zero_point=0, axis=3)
    bb = b.add_tensor("b", (oc,), "float32", data=bias)
    y = b.add_tensor("y", (n, oh, ow, oc), "float32")
    b.add_op("DEPTHWISE_CONV_2D", [x, wt, bb], [y], stride=stride, padding=padding, dilation=dilation,
             depth_multiplier=multiplier, activation=activation)
    b.set_io([x], [y])
    return b.finish()


def _run(model: bytes, x: np.ndarray, delegate: bool = True):
    interp = runtime.load_interpreter(model, num_threads=1, delegate=delegate)
    (y,) = runtime.run(interp, [x])
    return y, runtime.op_summary(interp)


def _ulps(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    def ordered(v):
        i = v.astype(np.float32).view(np.int32).astype(np.int64)
        return np.where(i < 0, -(i & 0x7FFFFFFF), i)
    return np.abs(ordered(a) - ordered(b))


def _assert_bit_exact(got: np.ndarray, want: np.ndarray):
    assert got.dtype == want.dtype == np.float32 and got.shape == want.shape, (got.shape, want.shape)
    assert np.array_equal(got, want) and np.array_equal(got.view(np.int32), want.view(np.int32)), (
        f"bit-exact fraction {np.mean(got.view(np.int32) == want.view(np.int32)):.4f}, "
        f"max {_ulps(got, want).max()} ulp")


def _where(summary, op: str, delegated: bool):
    side = "delegated" if delegated else "builtin"
    assert summary[side].get(op) == 1, summary


# --- XNNPACK qd8: FULLY_CONNECTED -----------------------------------------------------


FC_SHAPES = [(1, 16, 8), (3, 37, 11), (7, 200, 33), (9, 22, 40), (2, 1030, 5)]


@pytest.mark.parametrize("dtype", ["int8", "int4"])
@pytest.mark.parametrize("activation", ["NONE", "RELU", "RELU6"])
def test_fully_connected_xnnpack(dtype, activation):
    rng = np.random.default_rng(11)
    for rows, k, n in FC_SHAPES:
        if dtype == "int4" and k % 2:
            k += 1                     # XNNPACK takes INT4 weights with an even depth only
        codes, scales = _codes(rng, (n, k), dtype), _scales(rng, n)
        bias = rng.standard_normal(n).astype(np.float32)
        x = _rows(rng, rows, k)
        got, summary = _run(_fc_model(x.shape, codes, scales, bias, dtype, activation), x)
        _where(summary, "FULLY_CONNECTED", delegated=True)
        _assert_bit_exact(got, hybrid.fully_connected(x, codes, scales, bias, activation))
        _assert_bit_exact(got, hybrid.hybrid_fully_connected(x, codes, scales, bias, activation, dtype))


def test_fully_connected_xnnpack_variants():
    """No bias, one (per-tensor) scale, keep_num_dims with a 3-D input, a long reduction (acc > 2**24)."""
    rng = np.random.default_rng(12)
    codes = _codes(rng, (24, 96), "int8")
    x = _rows(rng, 6, 96).reshape(2, 3, 96)
    got, _ = _run(_fc_model(x.shape, codes, np.float32([0.0123]), None, "int8", "RELU", keep_num_dims=True), x)
    _assert_bit_exact(got.reshape(6, 24), hybrid.fully_connected(x, codes, np.float32([0.0123]), None, "RELU"))

    codes = _codes(rng, (16, 4096), "int8")
    scales, bias = _scales(rng, 16), rng.standard_normal(16).astype(np.float32)
    x = _rows(rng, 4, 4096)
    got, _ = _run(_fc_model(x.shape, codes, scales, bias, "int8", "NONE"), x)
    _assert_bit_exact(got, hybrid.fully_connected(x, codes, scales, bias))


def test_epilogue_is_fused():
    """The tests can tell fma(acc*s_in, s_w, b) from two roundings: the unfused epilogue misses."""
    rng = np.random.default_rng(13)
    codes, scales = _codes(rng, (64, 300), "int8"), _scales(rng, 64)
    bias = (rng.standard_normal(64) * 10).astype(np.float32)
    x = _rows(rng, 4, 300)
    got, _ = _run(_fc_model(x.shape, codes, scales, bias, "int8", "NONE"), x)
    q, inv, zp = hybrid.qd8_quantize(x)
    acc = (q.astype(np.int64) - zp[:, None]) @ codes.T.astype(np.int64)
    unfused = ((acc.astype(np.float32) * inv[:, None]).astype(np.float32) * scales).astype(np.float32) + bias
    assert not np.array_equal(got, unfused)
    _assert_bit_exact(got, hybrid.fully_connected(x, codes, scales, bias))


def test_qd8_params_edge_rows():
    s, inv, zp = hybrid.qd8_params(np.float32([0, 0, -2, -3]), np.float32([0, 1.25, -1, 6]))
    assert s[0] == 1 and zp[0] == 127                      # all-zero row: scale 1, zero point 127
    assert zp[1] == -128 and zp[2] == 127                  # positive-only / negative-only rows
    assert s[1] == np.float32(255) / np.float32(1.25) and inv[1] == np.float32(1) / s[1]
    q, _, z = hybrid.qd8_quantize(np.float32([[0, 6, 1, 3, 5]]))   # s = 42.5: ties round to even
    assert z[0] == -128 and list(q[0]) == [-128, 127, 42 - 128, 128 - 128, 212 - 128]


# --- XNNPACK qd8: CONV_2D ----------------------------------------------------------------


CONV_CASES = [  # x shape, out channels, kernel, stride, padding, dilation, filter depth (groups = C / depth)
    ((1, 7, 7, 3), 5, (3, 3), (1, 1), "SAME", (1, 1), 3),
    ((2, 9, 8, 5), 7, (3, 3), (2, 2), "SAME", (1, 1), 5),
    ((2, 9, 8, 5), 7, (3, 2), (2, 1), "VALID", (1, 1), 5),
    ((1, 11, 10, 4), 9, (3, 3), (1, 1), "SAME", (2, 2), 4),
    ((3, 6, 6, 17), 4, (1, 1), (1, 1), "VALID", (1, 1), 17),   # rewritten to FC: one quantization per pixel
    ((2, 5, 5, 3), 4, (1, 1), (2, 2), "SAME", (1, 1), 3),       # strided 1x1 stays a conv: per image
    ((2, 5, 5, 1), 1, (1, 1), (1, 1), "SAME", (1, 1), 1),       # 1 in + 1 out: stays a conv
    ((2, 7, 7, 8), 8, (3, 3), (2, 2), "SAME", (1, 1), 2),       # grouped
]


@pytest.mark.parametrize("activation", ["NONE", "RELU", "RELU6"])
def test_conv2d_xnnpack(activation):
    rng = np.random.default_rng(21)
    for j, (x_shape, o, (kh, kw), stride, padding, dilation, ci) in enumerate(CONV_CASES):
        codes, scales = _codes(rng, (o, kh, kw, ci), "int8"), _scales(rng, o)
        bias = rng.standard_normal(o).astype(np.float32)
        x = _images(rng, x_shape, start=2 * j)
        got, summary = _run(_conv_model(x_shape, codes, scales, bias, "int8", stride, padding, dilation,
                                        activation), x)
        _where(summary, "CONV_2D", delegated=True)
        want = hybrid.conv2d(x, codes, scales, bias, stride, padding, dilation, activation)
        _assert_bit_exact(got, want)
        _assert_bit_exact(got, hybrid.hybrid_conv2d(x, codes, scales, bias, stride, padding, dilation, activation))


# --- TFLite builtin hybrid kernels -----------------------------------------------------------


@pytest.mark.parametrize("asymmetric", [False, True])
def test_fully_connected_builtin(asymmetric):
    """INT4 with an odd depth (XNNPACK declines it) and int8 with the delegate off, -128 weights included."""
    rng = np.random.default_rng(31)
    for dtype, delegate in (("int4", True), ("int8", False)):
        for i, (rows, k, n) in enumerate([(1, 33, 8), (3, 37, 11), (5, 63, 19), (4, 201, 33), (6, 9, 12), (8, 41, 7)]):
            codes = _codes(rng, (n, k), dtype)
            scales = _scales(rng, n) if i % 2 == 0 else np.float32([0.0123])
            bias = rng.standard_normal(n).astype(np.float32) if i != 3 else None
            activation = ("NONE", "RELU", "RELU6")[i % 3]
            x = _rows(rng, rows, k)
            got, summary = _run(_fc_model(x.shape, codes, scales, bias, dtype, activation, asymmetric=asymmetric),
                                x, delegate=delegate)
            _where(summary, "FULLY_CONNECTED", delegated=False)
            want = hybrid.builtin_fully_connected(x, codes, scales, bias, activation, asymmetric, dtype)
            _assert_bit_exact(got, want)
            if delegate:
                _assert_bit_exact(got, hybrid.hybrid_fully_connected(x, codes, scales, bias, activation, dtype,
                                                                     asymmetric))
    # an all-zero input tensor skips the product: activation(bias)
    codes = _codes(rng, (6, 15), "int4")
    bias = rng.standard_normal(6).astype(np.float32)
    x = np.zeros((2, 15), np.float32)
    got, _ = _run(_fc_model(x.shape, codes, _scales(rng, 6), bias, "int4", "RELU", asymmetric=asymmetric), x)
    _assert_bit_exact(got, np.tile(np.maximum(bias, 0), (2, 1)))


def test_conv2d_builtin():
    """INT4 filters (XNNPACK declines them) and int8 with the delegate off; distinct scales take the
    asymmetric per-channel kernel, equal ones the symmetric kernel (GEMM when O % 4 == 0)."""
    rng = np.random.default_rng(41)
    cases = [((1, 7, 7, 3), 4, (3, 3), (1, 1), "SAME", (1, 1)), ((2, 9, 8, 5), 7, (3, 3), (2, 2), "SAME", (1, 1)),
             ((2, 9, 8, 5), 8, (3, 2), (2, 1), "VALID", (1, 1)), ((1, 11, 10, 4), 9, (3, 3), (1, 1), "SAME", (2, 2)),
             ((3, 6, 6, 17), 5, (1, 1), (1, 1), "VALID", (1, 1))]
    for dtype, delegate in (("int4", True), ("int8", False)):
        for per_channel in (True, False):
            for j, (x_shape, o, (kh, kw), stride, padding, dilation) in enumerate(cases):
                codes = _codes(rng, (o, kh, kw, x_shape[3]), dtype)
                scales = _scales(rng, o) if per_channel else np.full(o, 0.0123, np.float32)
                bias = rng.standard_normal(o).astype(np.float32)
                activation = ("NONE", "RELU", "RELU6")[j % 3]
                x = _images(rng, x_shape, start=2 * j)
                got, summary = _run(_conv_model(x_shape, codes, scales, bias, dtype, stride, padding, dilation,
                                                activation), x, delegate=delegate)
                _where(summary, "CONV_2D", delegated=False)
                _assert_bit_exact(got, hybrid.builtin_conv2d(x, codes, scales, bias, stride, padding, dilation,
                                                             activation))
                if delegate:
                    _assert_bit_exact(got, hybrid.hybrid_conv2d(x, codes, scales, bias, stride, padding, dilation,
                                                                activation, dtype))


def test_depthwise_builtin():
    rng = np.random.default_rng(51)
    cases = [((1, 7, 7, 3), 1, (3, 3), (1, 1), "SAME", (1, 1)), ((2, 9, 8, 5), 2, (3, 3), (2, 2), "SAME", (1, 1)),
             ((2, 9, 8, 8), 1, (3, 2), (2, 1), "VALID", (1, 1)), ((1, 11, 10, 4), 3, (3, 3), (1, 1), "SAME", (2, 2)),
             ((3, 6, 6, 17), 1, (5, 5), (1, 1), "SAME", (1, 1))]
    for j, (x_shape, mult, (kh, kw), stride, padding, dilation) in enumerate(cases):
        oc = x_shape[3] * mult
        codes, scales = _codes(rng, (1, kh, kw, oc), "int8"), _scales(rng, oc)
        bias = rng.standard_normal(oc).astype(np.float32)
        activation = ("NONE", "RELU", "RELU6")[j % 3]
        x = _images(rng, x_shape, start=2 * j)
        got, summary = _run(_dw_model(x_shape, codes, scales, bias, stride, padding, dilation, mult, activation), x)
        _where(summary, "DEPTHWISE_CONV_2D", delegated=False)
        _assert_bit_exact(got, hybrid.builtin_depthwise_conv2d(x, codes, scales, bias, stride, padding, dilation,
                                                               mult, activation))


def test_int4_fc_4bit_kernel_refused():
    codes = np.zeros((8, 64), np.int8)
    with pytest.raises(ValueError, match="4-bit"):
        hybrid.builtin_fully_connected(np.ones((1, 64), np.float32), codes, np.float32([0.1]), weight_dtype="int4")


def test_fully_connected_builtin_asymmetric_edges():
    """A zero point that lands on .5 (-126.5: rounded half away, to -127) and weight row sums
    that wrap SseReductionSumVector's int16 lanes (depth 2600 of +-127/-128)."""
    rng = np.random.default_rng(61)
    x = _rows(rng, 3, 41)
    x[0, :2] = -1.5, 253.5                 # scale (253.5 + 1.5) / 255 = 1
    x[0, 2:] = np.clip(x[0, 2:], -1.5, 253.5)
    codes, scales = _codes(rng, (6, 41), "int4"), _scales(rng, 6)
    bias = rng.standard_normal(6).astype(np.float32)
    got, _ = _run(_fc_model(x.shape, codes, scales, bias, "int4", "NONE", asymmetric=True), x)
    _assert_bit_exact(got, hybrid.builtin_fully_connected(x, codes, scales, bias, "NONE", True, "int4"))
    assert hybrid.tflite_asymmetric_quantize(x[:1])[2][0] == -127

    k = 2600
    codes = _codes(rng, (5, k), "int8")
    codes[0], codes[1], codes[2, ::2] = 127, -128, -128
    x = _rows(rng, 3, k)
    scales, bias = _scales(rng, 5), rng.standard_normal(5).astype(np.float32)
    got, _ = _run(_fc_model(x.shape, codes, scales, bias, "int8", "NONE", asymmetric=True), x, delegate=False)
    _assert_bit_exact(got, hybrid.builtin_fully_connected(x, codes, scales, bias, "NONE", True))
    assert hybrid._sse_row_sums(codes[:2]).tolist() != codes[:2].astype(np.int64).sum(axis=1).tolist()


def _blockwise_fc_model(x_shape, codes, scales_f16, block_size, bias, activation) -> bytes:
    """INT4 weights with TFLite ``BlockwiseQuantization`` (fp16 scales in their own tensor)."""
    n, k = codes.shape
    b = ModelBuilder()
    x = b.add_tensor("x", x_shape, "float32")
    w = b.add_tensor("w", (n, k), "int4", data=codes)
    ws = b.add_tensor("ws", scales_f16.shape, "float16", data=scales_f16)
    q = fb.QuantizationParametersT()
    q.detailsType = fb.QuantizationDetails.BlockwiseQuantization
    q.details = fb.BlockwiseQuantizationT(scales=ws.index, zeroPoints=-1, blockSize=block_size)
    q.quantizedDimension = 0
    b._tensors[w.index].quantization = q     # the builder writes affine quantization only
    bb = None if bias is None else b.add_tensor("b", (n,), "float32", data=bias)
    y = b.add_tensor("y", (x_shape[0], n), "float32")
    b.add_op("FULLY_CONNECTED", [x, w, bb], [y], activation=activation)
    b.set_io([x], [y])
    return b.finish()


def test_fully_connected_blockwise_xnnpack():
    rng = np.random.default_rng(71)
    for i, (rows, k, n, bl) in enumerate([(3, 128, 16, 32), (1, 64, 8, 32), (5, 256, 13, 64), (8, 96, 20, 32),
                                          (4, 512, 9, 128), (2, 256, 33, 256)]):
        codes = _codes(rng, (n, k), "int4")
        scales = np.exp2(rng.uniform(-9, -3, (n, k // bl))).astype(np.float16)
        bias = rng.standard_normal(n).astype(np.float32) if i % 2 == 0 else None
        activation = ("NONE", "RELU", "RELU6")[i % 3]
        x = _rows(rng, rows, k)
        got, summary = _run(_blockwise_fc_model(x.shape, codes, scales, bl, bias, activation), x)
        _where(summary, "FULLY_CONNECTED", delegated=True)
        _assert_bit_exact(got, hybrid.fully_connected_blockwise(x, codes, scales, bl, bias, activation))
    with pytest.raises(ValueError, match="multiple of 32"):
        hybrid.fully_connected_blockwise(x, codes, scales, 48)


def test_per_tensor_scale_conv():
    """One filter scale (the delegate repeats it per channel; the builtin kernel runs its symmetric path)."""
    rng = np.random.default_rng(81)
    x = _images(rng, (2, 6, 7, 5), start=3)
    for dtype in ("int8", "int4"):
        codes = _codes(rng, (6, 3, 3, 5), dtype)
        bias = rng.standard_normal(6).astype(np.float32)
        got, summary = _run(_conv_model(x.shape, codes, np.float32([0.0171]), bias, dtype, (2, 2), "SAME", (1, 1),
                                        "RELU"), x)
        _where(summary, "CONV_2D", delegated=dtype == "int8")
        _assert_bit_exact(got, hybrid.hybrid_conv2d(x, codes, np.float32([0.0171]), bias, (2, 2), "SAME", (1, 1),
                                                    "RELU", dtype))
