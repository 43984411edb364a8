"""The flatbuffer writer, the numpy integer reference and LiteRT agree.

Every op is built with :class:`ModelBuilder`, run in LiteRT (default
delegates, one thread) and in :class:`ReferenceInterpreter`, and the int8
outputs must be identical.  TANH may differ by 1 LSB (libm ``tanhf`` versus
float64 tanh at a rounding boundary); there the bit-exact ratio is measured
and must stay >= 0.99.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest

from ai_edge_litert import schema_py_generated as fb
from sdk.errors import ConfigError, InputError, RunnerError, ToolchainError, UnsupportedOpError
from sdk.litert import qmath, runtime
from sdk.litert.flatbuffer import OPS, ModelBuilder, read_model, tensor_data
from sdk.litert.reference import ReferenceInterpreter

SEEDS = range(3)


# --- helpers ---------------------------------------------------------------------


def _q(b: ModelBuilder, name, shape, rng, scale=None, zp=None):
    """An int8 activation tensor with a random (or given) scale and zero point."""
    scale = float(2 ** rng.uniform(-7, -1)) if scale is None else scale
    zp = int(rng.integers(-40, 40)) if zp is None else zp
    return b.add_tensor(name, shape, "int8", scale=scale, zero_point=zp)


def _codes(rng, shape):
    return rng.integers(-128, 128, shape).astype(np.int8)


def _run_both(model: bytes, inputs):
    interp = runtime.load_interpreter(model, num_threads=1)
    return runtime.run(interp, inputs), ReferenceInterpreter(model).run(inputs), runtime.op_summary(interp)


def _assert_int_match(got, want, max_lsb=0, min_exact=1.0):
    diff = np.abs(got.astype(np.int32) - want.astype(np.int32))
    assert got.dtype == want.dtype and got.shape == want.shape
    assert diff.max(initial=0) <= max_lsb, f"max |diff| {diff.max()} LSB"
    assert np.mean(diff == 0) >= min_exact, f"bit-exact ratio {np.mean(diff == 0):.4f}"


def _check(model: bytes, inputs, delegated=(), builtin=(), max_lsb=0, min_exact=1.0):
    """LiteRT == reference, and the ops ran where the reference says they run."""
    got, want, summary = _run_both(model, inputs)
    for g, w in zip(got, want):
        if g.dtype == np.float32:
            np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)
        else:
            _assert_int_match(g, w, max_lsb, min_exact)
    assert set(summary["delegated"]) == set(delegated)
    assert set(summary["builtin"]) == set(builtin)
    return got


def _unary(op, rng, shape=(1, 6, 7, 9), out_q=None, **options):
    b = ModelBuilder()
    x = _q(b, "x", shape, rng)
    y = b.add_tensor("y", shape, "int8", scale=out_q[0], zero_point=out_q[1]) if out_q else _q(b, "y", shape, rng)
    b.add_op(op, [x], [y], **options)
    b.set_io([x], [y])
    return b.finish(), [_codes(rng, shape)]


def _out_hw(size, k, stride, dilation, padding):
    eff = (k - 1) * dilation + 1
    return -(-size // stride) if padding == "SAME" else (size - eff) // stride + 1


# --- flatbuffer writer -----------------------------------------------------------------


def test_writer_round_trip():
    rng = np.random.default_rng(0)
    b = ModelBuilder(description="edgepack-test")
    x = b.add_tensor("x", (1, 4, 4, 3), "int8", scale=0.02, zero_point=-3)
    scales = rng.uniform(0.001, 0.01, 5)
    w_q = rng.integers(-127, 128, (5, 3, 3, 3))
    w = b.add_tensor("w", (5, 3, 3, 3), "int8", data=w_q, scale=scales, zero_point=0, axis=0)
    bias = b.add_tensor("b", (5,), "int32", data=np.arange(5) - 2, scale=0.02 * scales, axis=0)
    y = b.add_tensor("y", (1, 4, 4, 5), "int8", scale=0.05, zero_point=7)
    z = b.add_tensor("z", (1, 4, 4, 5), "int8", scale=0.05, zero_point=7)
    b.add_op("CONV_2D", [x, w, bias], [y], stride=1, padding="SAME", activation="RELU6")
    b.add_op("HARD_SWISH", [y], [z])
    b.set_io([x], [z])
    m = read_model(b.finish())

    assert m.version == 3 and m.description == b"edgepack-test"
    assert m.buffers[0].data is None  # the empty sentinel
    sg = m.subgraphs[0]
    assert [t.name for t in sg.tensors] == [b"x", b"w", b"b", b"y", b"z"]
    np.testing.assert_array_equal(tensor_data(m, sg.tensors[1]), w_q)
    raw = bytes(np.asarray(m.buffers[sg.tensors[2].buffer].data, dtype=np.uint8))
    assert raw == np.arange(-2, 3, dtype="<i4").tobytes()  # little endian
    assert sg.tensors[1].quantization.quantizedDimension == 0
    np.testing.assert_allclose(sg.tensors[1].quantization.scale, scales.astype(np.float32))
    assert all(sg.tensors[i].buffer == 0 for i in (0, 3, 4))
    codes = {c.builtinCode: c for c in m.operatorCodes}
    assert codes[fb.BuiltinOperator.CONV_2D].version == 3
    assert codes[fb.BuiltinOperator.HARD_SWISH].deprecatedBuiltinCode == fb.BuiltinOperator.HARD_SWISH
    opts = sg.operators[0].builtinOptions
    assert (opts.padding, opts.fusedActivationFunction) == (fb.Padding.SAME, fb.ActivationFunctionType.RELU6)
    assert m.signatureDefs[0].signatureKey == b"serving_default"


def test_writer_rejects_bad_input():
    b = ModelBuilder()
    x = b.add_tensor("x", (1, 4), "int8", scale=0.1)
    with pytest.raises(ConfigError, match="unknown LiteRT op 'GELU_FAST'"):
        b.add_op("GELU_FAST", [x], [x])
    with pytest.raises(ConfigError, match="bad options"):
        b.add_op("SOFTMAX", [x], [x], bta=1.0)
    with pytest.raises(ConfigError, match="takes no options"):
        b.add_op("LOGISTIC", [x], [x], alpha=1.0)
    with pytest.raises(ConfigError, match="used twice"):
        b.add_tensor("x", (1,), "int8", scale=0.1)
    with pytest.raises(ConfigError, match="does not fit int8"):
        b.add_tensor("w", (2,), "int8", data=[0, 200], scale=0.1)
    with pytest.raises(ConfigError, match="needs a scale"):
        b.add_tensor("a", (2,), "int8")
    with pytest.raises(ConfigError, match="unknown fused activation"):
        b.add_op("ADD", [x, x], [x], activation="GELU")
    with pytest.raises(ConfigError, match="input 2 is missing"):
        b.add_op("CONV_2D", [x, x, None], [x])
    with pytest.raises(ConfigError, match="set_io"):
        b.finish()


def test_every_op_has_a_reference_kernel():
    from sdk.litert.reference import SUPPORTED_OPS

    assert set(OPS) <= SUPPORTED_OPS


# --- int8 ops: LiteRT == reference ---------------------------------------------------


@pytest.mark.parametrize("seed", range(6))
def test_conv2d(seed):
    rng = np.random.default_rng(seed)
    h, w, c, o = (int(v) for v in rng.integers([5, 5, 1, 1], [13, 13, 9, 24]))
    k, stride = int(rng.integers(1, 4)), int(rng.integers(1, 3))
    dilation = int(rng.integers(1, 3)) if stride == 1 else 1
    padding = ("SAME", "VALID")[seed % 2]
    b = ModelBuilder()
    x = _q(b, "x", (1, h, w, c), rng)
    per_channel = seed % 3 != 0
    ws = rng.uniform(0.002, 0.02, o) if per_channel else 0.01
    wt = b.add_tensor("w", (o, k, k, c), "int8", data=rng.integers(-127, 128, (o, k, k, c)), scale=ws, axis=0)
    bias = b.add_tensor("b", (o,), "int32", data=rng.integers(-3000, 3000, o),
                        scale=np.asarray(ws) * x.scale[0], axis=0)
    oh, ow = _out_hw(h, k, stride, dilation, padding), _out_hw(w, k, stride, dilation, padding)
    y = _q(b, "y", (1, oh, ow, o), rng, scale=float(rng.uniform(0.02, 0.2)))
    b.add_op("CONV_2D", [x, wt, bias], [y], stride=stride, padding=padding, dilation=dilation,
             activation=(None, "RELU", "RELU6")[seed % 3])
    b.set_io([x], [y])
    _check(b.finish(), [_codes(rng, (1, h, w, c))], delegated={"CONV_2D"})


@pytest.mark.parametrize("seed", SEEDS)
def test_depthwise_conv2d(seed):
    rng = np.random.default_rng(seed)
    h, w, c, mult, k = 9, 8, int(rng.integers(2, 7)), int(rng.integers(1, 4)), 3
    stride, dilation, padding = (1, 2, 1)[seed], (2, 1, 1)[seed], ("SAME", "VALID", "SAME")[seed]
    b = ModelBuilder()
    x = _q(b, "x", (1, h, w, c), rng)
    ws = rng.uniform(0.002, 0.02, c * mult)
    wt = b.add_tensor("w", (1, k, k, c * mult), "int8", data=rng.integers(-127, 128, (1, k, k, c * mult)),
                      scale=ws, axis=3)
    bias = b.add_tensor("b", (c * mult,), "int32", data=rng.integers(-3000, 3000, c * mult),
                        scale=ws * x.scale[0], axis=0)
    oh, ow = _out_hw(h, k, stride, dilation, padding), _out_hw(w, k, stride, dilation, padding)
    y = _q(b, "y", (1, oh, ow, c * mult), rng, scale=0.1)
    b.add_op("DEPTHWISE_CONV_2D", [x, wt, bias], [y], stride=stride, padding=padding, dilation=dilation,
             depth_multiplier=mult, activation="RELU6")
    b.set_io([x], [y])
    _check(b.finish(), [_codes(rng, (1, h, w, c))], delegated={"DEPTHWISE_CONV_2D"})


@pytest.mark.parametrize("seed", SEEDS)
def test_fully_connected(seed):
    rng = np.random.default_rng(seed)
    b = ModelBuilder()
    x = _q(b, "x", (2, 3, 40), rng)
    ws = rng.uniform(0.002, 0.02, 10) if seed else 0.01
    wt = b.add_tensor("w", (10, 40), "int8", data=rng.integers(-127, 128, (10, 40)), scale=ws, axis=0)
    bias = None if seed == 2 else b.add_tensor("b", (10,), "int32", data=rng.integers(-3000, 3000, 10),
                                               scale=np.asarray(ws) * x.scale[0], axis=0)
    keep = seed == 1
    y = _q(b, "y", (2, 3, 10) if keep else (6, 10), rng, scale=0.2)
    b.add_op("FULLY_CONNECTED", [x, wt, bias], [y], keep_num_dims=keep, activation=(None, "RELU", None)[seed])
    b.set_io([x], [y])
    _check(b.finish(), [_codes(rng, (2, 3, 40))], delegated={"FULLY_CONNECTED"})


@pytest.mark.parametrize("op", ["ADD", "SUB", "MUL"])
@pytest.mark.parametrize("seed", SEEDS)
def test_binary_broadcast_different_scales(op, seed):
    rng = np.random.default_rng(seed)
    shape, other = (1, 5, 6, 8), [(1, 5, 6, 8), (1, 1, 6, 8), (8,)][seed]
    b = ModelBuilder()
    a, c = _q(b, "a", shape, rng), _q(b, "c", other, rng)
    y = _q(b, "y", shape, rng, scale=float(a.scale[0] * (c.scale[0] * 64 if op == "MUL" else 2.5)))
    b.add_op(op, [a, c], [y], activation=(None, "RELU", "RELU6")[seed])
    b.set_io([a, c], [y])
    _check(b.finish(), [_codes(rng, shape), _codes(rng, other)], delegated={op})


@pytest.mark.parametrize("op", ["ADD", "SUB"])
def test_add_sub_outside_xnnpack_range_falls_back_exactly(op):
    rng = np.random.default_rng(3)
    b = ModelBuilder()
    a = _q(b, "a", (4, 33), rng, scale=0.0005)
    c = _q(b, "c", (4, 33), rng, scale=0.5)
    y = _q(b, "y", (4, 33), rng, scale=0.8)  # a/y < 2**-10: XNNPACK declines
    b.add_op(op, [a, c], [y], activation="RELU")
    b.set_io([a, c], [y])
    _check(b.finish(), [_codes(rng, (4, 33)), _codes(rng, (4, 33))], builtin={op})


def test_mul_below_xnnpack_range_falls_back_exactly():
    rng = np.random.default_rng(6)
    b = ModelBuilder()
    a, c = _q(b, "a", (3, 37), rng, scale=0.004), _q(b, "c", (3, 37), rng, scale=0.003)
    y = _q(b, "y", (3, 37), rng, scale=2.0)  # s_a*s_c/s_y < 2**-16
    b.add_op("MUL", [a, c], [y])
    b.set_io([a, c], [y])
    _check(b.finish(), [_codes(rng, (3, 37)), _codes(rng, (3, 37))], builtin={"MUL"})


def test_requantize_fallback_rounds_like_neon_blocks_and_scalar_tail():
    # s_in/s_out < 2**-8: TFLite's Requantize runs; -179 * s_in/s_out is a tie
    # (-0.5 after the high multiply) that the NEON blocks round up and the
    # scalar tail rounds away from zero.
    b = ModelBuilder()
    x = b.add_tensor("x", (1, 17), "int8", scale=0.009533397853374481, zero_point=73)
    y = b.add_tensor("y", (1, 17), "int8", scale=3.4113032817840576, zero_point=-127)
    b.add_op("QUANTIZE", [x], [y])
    b.set_io([x], [y])
    got = _check(b.finish(), [np.full((1, 17), -106, np.int8)], builtin={"QUANTIZE"})
    assert got[0].tolist() == [[-127] * 16 + [-128]]


@pytest.mark.parametrize("op", ["AVERAGE_POOL_2D", "MAX_POOL_2D"])
@pytest.mark.parametrize("padding", ["SAME", "VALID"])
def test_pooling(op, padding):
    rng = np.random.default_rng(len(op) + len(padding))
    b = ModelBuilder()
    x = _q(b, "x", (1, 9, 10, 5), rng)
    oh, ow = _out_hw(9, 3, 2, 1, padding), _out_hw(10, 3, 2, 1, padding)
    y = b.add_tensor("y", (1, oh, ow, 5), "int8", scale=x.scale, zero_point=x.zero_point)
    b.add_op(op, [x], [y], filter=3, stride=2, padding=padding, activation="RELU")
    b.set_io([x], [y])
    where = {"delegated": {op}} if op == "MAX_POOL_2D" else {"builtin": {op}}
    _check(b.finish(), [_codes(rng, (1, 9, 10, 5))], **where)


@pytest.mark.parametrize("seed", SEEDS)
def test_mean_over_hw(seed):
    rng = np.random.default_rng(seed)
    h, w = int(rng.integers(1, 12)), int(rng.integers(2, 12))
    b = ModelBuilder()
    x = _q(b, "x", (1, h, w, 16), rng)
    axes = b.add_const("axes", [1, 2])
    keep = seed != 1
    y = _q(b, "y", (1, 1, 1, 16) if keep else (1, 16), rng, scale=float(x.scale[0] * rng.uniform(0.2, 1.0)))
    b.add_op("MEAN", [x, axes], [y], keep_dims=keep)
    b.set_io([x], [y])
    _check(b.finish(), [_codes(rng, (1, h, w, 16))], delegated={"MEAN"})


@pytest.mark.parametrize("seed", SEEDS)
def test_softmax(seed):
    rng = np.random.default_rng(seed)
    model, inputs = _unary("SOFTMAX", rng, shape=(3, int(rng.integers(2, 300))), out_q=(1 / 256, -128),
                           beta=(1.0, 0.5, 2.0)[seed])
    _check(model, inputs, builtin={"SOFTMAX"})


@pytest.mark.parametrize("seed", SEEDS)
def test_logistic(seed):
    model, inputs = _unary("LOGISTIC", np.random.default_rng(seed), out_q=(1 / 256, -128))
    _check(model, inputs, delegated={"LOGISTIC"})


@pytest.mark.parametrize("seed", SEEDS)
def test_tanh(seed):
    model, inputs = _unary("TANH", np.random.default_rng(seed), out_q=(1 / 128, 0))
    _check(model, inputs, delegated={"TANH"}, max_lsb=1, min_exact=0.99)


@pytest.mark.parametrize("op", ["HARD_SWISH", "RELU", "RELU6"])
@pytest.mark.parametrize("seed", SEEDS)
def test_builtin_activations(op, seed):
    model, inputs = _unary(op, np.random.default_rng(seed))
    _check(model, inputs, builtin={op})


@pytest.mark.parametrize("seed, alpha", [(0, 0.1), (1, 0.2), (2, 0.3), (3, 0.001)])
def test_leaky_relu(seed, alpha):
    model, inputs = _unary("LEAKY_RELU", np.random.default_rng(seed), alpha=alpha)
    # XNNPACK's 8.8 fixed point cannot hold s_in*alpha/s_out < 1/256: TFLite's kernel runs it.
    where = {"builtin": {"LEAKY_RELU"}} if alpha < 0.01 else {"delegated": {"LEAKY_RELU"}}
    _check(model, inputs, **where)


@pytest.mark.parametrize("seed", SEEDS)
def test_prelu(seed):
    rng = np.random.default_rng(seed)
    b = ModelBuilder()
    x = _q(b, "x", (1, 4, 5, 6), rng)
    alpha = b.add_tensor("alpha", (1, 1, 6), "int8", data=rng.integers(-128, 128, (1, 1, 6)), scale=0.005,
                         zero_point=int(rng.integers(-5, 5)))
    y = _q(b, "y", (1, 4, 5, 6), rng)
    b.add_op("PRELU", [x, alpha], [y])
    b.set_io([x], [y])
    _check(b.finish(), [_codes(rng, (1, 4, 5, 6))], builtin={"PRELU"})


def test_data_movement_ops():
    rng = np.random.default_rng(0)
    b = ModelBuilder()
    x = _q(b, "x", (1, 4, 5, 3), rng)
    same = {"scale": x.scale, "zero_point": x.zero_point}
    padded = b.add_tensor("padded", (1, 7, 8, 3), "int8", **same)
    perm = b.add_tensor("perm", (1, 3, 7, 8), "int8", **same)
    flat = b.add_tensor("flat", (1, 168), "int8", **same)
    b.add_op("PAD", [x, b.add_const("pads", [[0, 0], [1, 2], [2, 1], [0, 0]])], [padded])
    b.add_op("TRANSPOSE", [padded, b.add_const("perm_axes", [0, 3, 1, 2])], [perm])
    b.add_op("RESHAPE", [perm, b.add_const("shape", [1, 168])], [flat], new_shape=[1, 168])
    b.set_io([x], [flat])
    _check(b.finish(), [_codes(rng, (1, 4, 5, 3))], delegated={"PAD", "TRANSPOSE", "RESHAPE"})


@pytest.mark.parametrize("size", [(7, 11), (8, 10), (2, 3)])
def test_resize_nearest(size):
    rng = np.random.default_rng(size[0])
    b = ModelBuilder()
    x = _q(b, "x", (1, 3, 5, 4), rng)
    y = b.add_tensor("y", (1, *size, 4), "int8", scale=x.scale, zero_point=x.zero_point)
    b.add_op("RESIZE_NEAREST_NEIGHBOR", [x, b.add_const("size", list(size))], [y])
    b.set_io([x], [y])
    _check(b.finish(), [_codes(rng, (1, 3, 5, 4))], builtin={"RESIZE_NEAREST_NEIGHBOR"})


def test_concat_of_differently_scaled_inputs_through_requantize():
    rng = np.random.default_rng(1)
    b = ModelBuilder()
    a, c = _q(b, "a", (1, 4, 4, 3), rng, scale=0.03), _q(b, "c", (1, 4, 4, 5), rng, scale=0.11)
    out_q = {"scale": 0.07, "zero_point": -2}
    a_rq = b.add_tensor("a_rq", (1, 4, 4, 3), "int8", **out_q)
    c_rq = b.add_tensor("c_rq", (1, 4, 4, 5), "int8", **out_q)
    y = b.add_tensor("y", (1, 4, 4, 8), "int8", **out_q)
    b.add_op("QUANTIZE", [a], [a_rq])
    b.add_op("QUANTIZE", [c], [c_rq])
    b.add_op("CONCATENATION", [a_rq, c_rq], [y], axis=3)
    b.set_io([a, c], [y])
    _check(b.finish(), [_codes(rng, (1, 4, 4, 3)), _codes(rng, (1, 4, 4, 5))],
           delegated={"QUANTIZE", "CONCATENATION"})


def test_concat_with_mismatched_scales_is_refused_like_litert():
    rng = np.random.default_rng(2)
    b = ModelBuilder()
    a, c = _q(b, "a", (1, 8), rng, scale=0.03), _q(b, "c", (1, 8), rng, scale=0.11)
    y = _q(b, "y", (1, 16), rng, scale=0.07)
    b.add_op("CONCATENATION", [a, c], [y], axis=1)
    b.set_io([a, c], [y])
    model = b.finish()
    with pytest.raises(RunnerError):  # XNNPACK claims the node, then fails to prepare it
        runtime.load_interpreter(model)
    with pytest.raises(UnsupportedOpError, match="QUANTIZE"):
        ReferenceInterpreter(model).run([_codes(rng, (1, 8)), _codes(rng, (1, 8))])


@pytest.mark.parametrize("out_scale", [0.02, 5.0])
def test_quantize_dequantize_at_the_edges(out_scale):
    rng = np.random.default_rng(4)
    b = ModelBuilder()
    x = b.add_tensor("x", (2, 50), "float32")
    q = b.add_tensor("q", (2, 50), "int8", scale=out_scale, zero_point=-7)
    q2 = _q(b, "q2", (2, 50), rng, scale=out_scale * 1.7)
    y = b.add_tensor("y", (2, 50), "float32")
    b.add_op("QUANTIZE", [x], [q])
    b.add_op("QUANTIZE", [q], [q2])  # int8 -> int8 requantize
    b.add_op("DEQUANTIZE", [q2], [y])
    b.set_io([x], [y, q])
    inputs = [rng.normal(0, 3, (2, 50)).astype(np.float32)]
    got, want, summary = _run_both(b.finish(), inputs)
    np.testing.assert_array_equal(got[0], want[0])  # the float output is bit-exact too
    np.testing.assert_array_equal(got[1], want[1])
    assert set(summary["delegated"]) == {"QUANTIZE", "DEQUANTIZE"}


def test_dequantize_float16_weights():
    rng = np.random.default_rng(5)
    w16 = rng.normal(0, 1, (4, 6)).astype(np.float16)
    b = ModelBuilder()
    x = b.add_tensor("x", (2, 6), "float32")
    w_half = b.add_tensor("w_half", (4, 6), "float16", data=w16)
    w = b.add_tensor("w", (4, 6), "float32")
    y = b.add_tensor("y", (2, 4), "float32")
    b.add_op("DEQUANTIZE", [w_half], [w])
    b.add_op("FULLY_CONNECTED", [x, w, None], [y])
    b.set_io([x], [y])
    got, want, _ = _run_both(b.finish(), [rng.normal(0, 1, (2, 6)).astype(np.float32)])
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5, atol=1e-5)


# --- chains ------------------------------------------------------------------------


def _chain(rng, dtype: str) -> bytes:
    """conv -> (fused relu) -> depthwise -> add(residual) -> mean -> fully connected -> softmax."""
    f32 = dtype == "float32"

    def act(name, shape, scale, zp=0):
        if f32:
            return b.add_tensor(name, shape, "float32")
        return b.add_tensor(name, shape, "int8", scale=scale, zero_point=zp)

    def weights(name, values, scales, axis):
        if f32:
            return b.add_tensor(name, values.shape, "float32", data=(values * np.expand_dims(
                scales, [i for i in range(values.ndim) if i != axis])).astype(np.float32))
        return b.add_tensor(name, values.shape, "int8", data=values, scale=scales, axis=axis)

    def bias(name, values, scale):
        if f32:
            return b.add_tensor(name, values.shape, "float32", data=(values * scale).astype(np.float32))
        return b.add_tensor(name, values.shape, "int32", data=values, scale=scale, axis=0)

    b = ModelBuilder()
    x = act("x", (1, 12, 12, 3), 0.02, -5)
    s_conv = rng.uniform(0.003, 0.01, 16)
    conv = act("conv", (1, 12, 12, 16), 0.05, -128)
    b.add_op("CONV_2D", [x, weights("conv_w", rng.integers(-127, 128, (16, 3, 3, 3)), s_conv, 0),
                         bias("conv_b", rng.integers(-500, 500, 16), 0.02 * s_conv)],
             [conv], padding="SAME", activation="RELU")
    s_dw = rng.uniform(0.005, 0.02, 16)
    dw = act("dw", (1, 12, 12, 16), 0.04, 3)
    b.add_op("DEPTHWISE_CONV_2D", [conv, weights("dw_w", rng.integers(-127, 128, (1, 3, 3, 16)), s_dw, 3),
                                   bias("dw_b", rng.integers(-500, 500, 16), 0.05 * s_dw)],
             [dw], padding="SAME", depth_multiplier=1)
    res = act("res", (1, 12, 12, 16), 0.06, -10)
    b.add_op("ADD", [dw, conv], [res], activation="RELU6")
    pooled = act("pooled", (1, 16), 0.03, -20)
    b.add_op("MEAN", [res, b.add_const("hw", [1, 2])], [pooled], keep_dims=False)
    s_fc = rng.uniform(0.005, 0.02, 10)
    logits = act("logits", (1, 10), 0.1, 4)
    b.add_op("FULLY_CONNECTED", [pooled, weights("fc_w", rng.integers(-127, 128, (10, 16)), s_fc, 0),
                                 bias("fc_b", rng.integers(-200, 200, 10), 0.03 * s_fc)], [logits])
    probs = act("probs", (1, 10), 1 / 256, -128)
    b.add_op("SOFTMAX", [logits], [probs], beta=1.0)
    b.set_io([x], [probs])
    return b.finish()


def test_int8_chain_end_to_end():
    rng = np.random.default_rng(7)
    model = _chain(rng, "int8")
    x = _codes(rng, (1, 12, 12, 3))
    got = _check(model, [x], delegated={"CONV_2D", "DEPTHWISE_CONV_2D", "ADD", "MEAN", "FULLY_CONNECTED"},
                 builtin={"SOFTMAX"})
    layers = ReferenceInterpreter(model).trace([x])
    assert list(layers) == ["x", "conv", "dw", "res", "pooled", "logits", "probs"]
    np.testing.assert_array_equal(layers["probs"], got[0])
    interp = runtime.load_interpreter(model)
    assert runtime.delegated_fraction(interp) == pytest.approx(5 / 6)
    assert runtime.time_inference(interp, [x], warmup=1, runs=3) > 0


def test_float32_chain_matches_litert():
    rng = np.random.default_rng(7)
    model = _chain(rng, "float32")
    x = rng.normal(0, 1, (1, 12, 12, 3)).astype(np.float32)
    got, want, summary = _run_both(model, [x])
    np.testing.assert_allclose(got[0], want[0], rtol=1e-4, atol=1e-6)
    assert summary["builtin"] == {}  # XNNPACK takes the whole float graph


# --- reference and runtime errors ---------------------------------------------------


def test_reference_rejects_unknown_ops_and_bad_inputs():
    b = ModelBuilder()
    x = b.add_tensor("x", (1, 4), "float32")
    y = b.add_tensor("y", (1, 4), "float32")
    b.add_op("RELU", [x], [y])
    b.set_io([x], [y])
    m = read_model(b.finish())
    m.operatorCodes[0].builtinCode = m.operatorCodes[0].deprecatedBuiltinCode = fb.BuiltinOperator.SQUARE
    builder = __import__("flatbuffers").Builder(0)
    builder.Finish(m.Pack(builder), file_identifier=b"TFL3")
    with pytest.raises(UnsupportedOpError, match="SQUARE"):
        ReferenceInterpreter(bytes(builder.Output()))

    ref = ReferenceInterpreter(b.finish())
    with pytest.raises(InputError, match="shape"):
        ref.run([np.zeros((2, 4), np.float32)])
    with pytest.raises(InputError, match="dtype"):
        ref.run([np.zeros((1, 4), np.float64)])


def test_conv_requantization_scale_limit():
    b = ModelBuilder()
    x = b.add_tensor("x", (1, 2, 2, 3), "int8", scale=0.5)
    w = b.add_tensor("w", (2, 1, 1, 3), "int8", data=np.ones((2, 1, 1, 3)), scale=[0.5, 0.5], axis=0)
    bias = b.add_tensor("b", (2,), "int32", data=np.zeros(2), scale=[0.25, 0.25], axis=0)
    y = b.add_tensor("y", (1, 2, 2, 2), "int8", scale=0.0005)  # 0.25 / 0.0005 = 500 >= 256
    b.add_op("CONV_2D", [x, w, bias], [y])
    b.set_io([x], [y])
    model = b.finish()
    with pytest.raises(RunnerError):
        runtime.load_interpreter(model)
    with pytest.raises(UnsupportedOpError, match="256"):
        ReferenceInterpreter(model).run([np.zeros((1, 2, 2, 3), np.int8)])


def test_missing_runtime_names_the_pip_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "ai_edge_litert", None)
    monkeypatch.setitem(sys.modules, "ai_edge_litert.interpreter", None)
    monkeypatch.setitem(sys.modules, "tflite_runtime", None)
    with pytest.raises(ToolchainError, match="pip install ai-edge-litert"):
        runtime.load_interpreter(b"")


# --- fixed-point helpers --------------------------------------------------------------


def test_quantize_multiplier_matches_tflite():
    assert qmath.quantize_multiplier(0.5) == (1 << 30, 0)
    assert qmath.quantize_multiplier(1.0) == (1 << 30, 1)
    assert qmath.quantize_multiplier(0.0) == (0, 0)
    assert qmath.quantize_multiplier(2.0 ** -40) == (0, 0)
    m, s = qmath.quantize_multiplier(0.3)
    assert abs(m * 2.0 ** (s - 31) - 0.3) < 1e-9
    # Q31 rounding can reach 2**31: it must renormalise to 2**30 and shift + 1.
    assert qmath.quantize_multiplier(1 - 2 ** -40) == (1 << 30, 1)


def test_fixed_point_rounding():
    x = np.array([5, -5, 6, -6, 7, -7])
    np.testing.assert_array_equal(qmath.rounding_divide_by_pot(x, 1), [3, -3, 3, -3, 4, -4])
    rng = np.random.default_rng(0)
    vals = rng.integers(-(1 << 20), 1 << 20, 1000)
    for real in (0.37, 1e-3, 3.5):
        m, s = qmath.quantize_multiplier(real)
        got = qmath.multiply_by_quantized_multiplier(vals, m, s)
        assert np.max(np.abs(got - vals * real)) <= 1
    assert qmath.xnn_quantize(6.0, 0.05, -3) == 117
    assert qmath.xnn_activation_range("RELU", 0.05, -3) == (-3, 127)
    assert qmath.tflite_activation_range("RELU6", 0.05, -3) == (-3, 117)


def test_bias_quantization():
    scales = np.array([0.01, 0.02], dtype=np.float32)
    np.testing.assert_array_equal(qmath.bias_scale(0.5, scales), np.float32(0.5) * scales)
    np.testing.assert_array_equal(qmath.quantize_bias([0.1, -0.1], 0.5, scales), [20, -10])
    assert qmath.quantize_bias([1e12], 1.0, [1e-3]).tolist() == [2 ** 31 - 1]
