"""fbcheck on the weight encodings beyond plain int8 / float: int4 constants, hybrid (dynamic-range)
CONV_2D and FULLY_CONNECTED, weight-only DEQUANTIZE, and sparse constants (DENSIFY, and sparse
FULLY_CONNECTED weights read by TFLite's sparse kernels).

Each valid model is accepted and runs in LiteRT with the outputs numpy computes; each hostile
edit is an ArtifactError naming the problem.  Several of those edits kill raw LiteRT 2.3.0 with
SIGSEGV (``test_hostile_sparsity_crashes_raw_litert``, in a child process): a CSR index past the
dimension, dim_metadata shorter than the traversal, a Uint8Vector re-typed Int32Vector, and --
with *valid* metadata -- a sparse FULLY_CONNECTED weight under XNNPACK, which reads the stored
values as the dense matrix.
"""

import random

import flatbuffers
import numpy as np
import pytest
from ai_edge_litert import schema_py_generated as fb

from litert_child import run_in_children
from sdk.errors import ArtifactError
from sdk.litert import runtime, sparse
from sdk.litert.fbcheck import check_model
from sdk.litert.flatbuffer import FILE_IDENTIFIER, ModelBuilder, pack_int4, read_model



# -- numpy references -------------------------------------------------------------------------


def _conv(x, w, bias, depthwise=False):
    """VALID, stride 1, NHWC; ``w`` is [O, kh, kw, C] ([1, kh, kw, C] depthwise); float64."""
    _, h, wd, _ = x.shape
    kh, kw = w.shape[1:3]
    out = np.zeros((1, h - kh + 1, wd - kw + 1, w.shape[3] if depthwise else w.shape[0]))
    for i in range(out.shape[1]):
        for j in range(out.shape[2]):
            patch = x[0, i:i + kh, j:j + kw, :].astype(np.float64)
            out[0, i, j] = (patch * w[0]).sum(axis=(0, 1)) if depthwise else \
                np.tensordot(w.astype(np.float64), patch, axes=([1, 2, 3], [0, 1, 2]))
    return out + bias


def _requant(acc, scale, zero_point):
    return np.clip(np.round(acc / np.float32(scale)) + zero_point, -128, 127).astype(np.int8)


def _hybrid_tol(x, w):
    """Dynamic-range ops quantize the input to int8 per row: half a step of max|x|/127 per element."""
    step = np.abs(x).max() / 127
    return float(step * np.abs(w).reshape(w.shape[0], -1).sum(axis=1).max()) + 1e-4


def _codes(rng, dtype, shape):
    lo, hi = (-8, 7) if dtype == "int4" else (-127, 127)
    return rng.integers(lo, hi + 1, shape).astype(np.int8)


# -- valid models: (flatbuffer, input, expected output, tolerance) --------------------------------

SX, ZX, SY, ZY = 0.05, 3, 0.2, -2      # int8 activations


def int8_op(op, wdtype="int4", seed=0):
    """An int8 CONV_2D / DEPTHWISE_CONV_2D / FULLY_CONNECTED with int4 (or int8) per-channel weights."""
    rng = np.random.default_rng(seed)
    depthwise = op == "DEPTHWISE_CONV_2D"
    if op == "FULLY_CONNECTED":
        xshape, wshape, yshape, o = (2, 32), (8, 32), (2, 8), 8
    else:
        o = 4 if depthwise else 6
        xshape, wshape, yshape = (1, 5, 5, 4), ((1, 3, 3, 4) if depthwise else (6, 3, 3, 4)), (1, 3, 3, o)
    b = ModelBuilder()
    x = b.add_tensor("x", xshape, "int8", scale=SX, zero_point=ZX)
    wq = _codes(rng, wdtype, wshape)
    ws = (rng.random(o) * 0.05 + 0.01).astype(np.float32)
    w = b.add_tensor("w", wshape, wdtype, data=wq, scale=ws, zero_point=0, axis=3 if depthwise else 0)
    bq = rng.integers(-100, 100, o)
    bias = b.add_tensor("b", (o,), "int32", data=bq, scale=np.float32(SX) * ws, zero_point=0, axis=0)
    y = b.add_tensor("y", yshape, "int8", scale=SY, zero_point=ZY)
    b.add_op(op, [x, w, bias], [y], **({"depth_multiplier": 1} if depthwise else {}))
    b.set_io([x], [y])
    xq = rng.integers(-128, 128, xshape).astype(np.int8)
    xr = (xq.astype(np.float64) - ZX) * np.float32(SX)
    bf = bq * (np.float32(SX) * ws).astype(np.float64)
    if op == "FULLY_CONNECTED":
        acc = xr @ (wq * ws[:, None]).T + bf
    else:
        acc = _conv(xr, wq * (ws.reshape(1, 1, 1, -1) if depthwise else ws.reshape(-1, 1, 1, 1)), bf, depthwise)
    return b.finish(), xq, _requant(acc, SY, ZY), 1


def hybrid_fc(wdtype, per_channel=True, seed=0):
    """FULLY_CONNECTED on float32 with int8 / int4 constant weights (dynamic range)."""
    rng = np.random.default_rng(seed)
    k, u = 32, 8
    b = ModelBuilder()
    wq = _codes(rng, wdtype, (u, k))
    ws = (rng.random(u) * 0.1 + 0.01).astype(np.float32) if per_channel else np.float32(0.05)
    x = b.add_tensor("x", (2, k), "float32")
    w = b.add_tensor("w", (u, k), wdtype, data=wq, scale=ws, zero_point=0, axis=0)
    bv = rng.standard_normal(u).astype(np.float32)
    bias = b.add_tensor("b", (u,), "float32", data=bv)
    y = b.add_tensor("y", (2, u), "float32")
    b.add_op("FULLY_CONNECTED", [x, w, bias], [y])
    b.set_io([x], [y])
    xv = rng.standard_normal((2, k)).astype(np.float32)
    wd = wq * np.reshape(ws, (-1, 1))
    return b.finish(), xv, xv.astype(np.float64) @ wd.T + bv, _hybrid_tol(xv, wd)


def hybrid_conv(wdtype, per_channel=True, depthwise=False, seed=0):
    """CONV_2D (or DEPTHWISE_CONV_2D: refused) on float32 with int8 / int4 constant weights."""
    rng = np.random.default_rng(seed)
    c = 4
    o = c if depthwise else 6
    b = ModelBuilder()
    x = b.add_tensor("x", (1, 5, 5, c), "float32")
    wq = _codes(rng, wdtype, (1, 3, 3, c) if depthwise else (o, 3, 3, c))
    ws = (rng.random(o) * 0.1 + 0.01).astype(np.float32) if per_channel else np.float32(0.05)
    w = b.add_tensor("w", wq.shape, wdtype, data=wq, scale=ws, zero_point=0, axis=3 if depthwise else 0)
    bv = rng.standard_normal(o).astype(np.float32)
    bias = b.add_tensor("b", (o,), "float32", data=bv)
    y = b.add_tensor("y", (1, 3, 3, o), "float32")
    b.add_op("DEPTHWISE_CONV_2D" if depthwise else "CONV_2D", [x, w, bias], [y],
             **({"depth_multiplier": 1} if depthwise else {}))
    b.set_io([x], [y])
    xv = rng.standard_normal((1, 5, 5, c)).astype(np.float32)
    wd = wq * (np.reshape(ws, (1, 1, 1, -1)) if depthwise else np.reshape(ws, (-1, 1, 1, 1)))
    return b.finish(), xv, _conv(xv, wd, bv, depthwise), _hybrid_tol(xv, np.moveaxis(wd, 3, 0) if depthwise else wd)


def dequantize_fc(wdtype="int8", shape=(5, 16), per_channel=True, seed=0):
    """Weight-only quantization: DEQUANTIZE of an int8 / int4 constant feeds a float FULLY_CONNECTED."""
    rng = np.random.default_rng(seed)
    u, k = shape
    b = ModelBuilder()
    x = b.add_tensor("x", (2, k), "float32")
    wq = _codes(rng, wdtype, (u, k))
    ws = (rng.random(u) * 0.1 + 0.01).astype(np.float32) if per_channel else np.float32(0.05)
    wc = b.add_tensor("wq", (u, k), wdtype, data=wq, scale=ws, zero_point=0, axis=0)
    w = b.add_tensor("w", (u, k), "float32")
    y = b.add_tensor("y", (2, u), "float32")
    b.add_op("DEQUANTIZE", [wc], [w])
    b.add_op("FULLY_CONNECTED", [x, w, None], [y])
    b.set_io([x], [y])
    xv = rng.standard_normal((2, k)).astype(np.float32)
    return b.finish(), xv, xv.astype(np.float64) @ (wq * np.reshape(ws, (-1, 1))).T, 1e-4


def densify_conv(dtype="float32", k=1, sparse_from=3, seed=0):
    """A sparse k x k CONV_2D weight expanded by DENSIFY (float16: then widened by DEQUANTIZE, as
    fp16-gpu ships weights); ``sparse_from``: the first CSR dimension (3: CSR over the input
    channels only; lower: nested CSR levels)."""
    rng = np.random.default_rng(seed)
    c, o = 8, 6
    wd = rng.standard_normal((o, k, k, c)).astype(np.float32)
    wd[rng.random(wd.shape) < 0.6] = 0
    wd = wd.astype(dtype)
    values, sp = sparse.encode(wd, sparse_from=sparse_from)
    b = ModelBuilder()
    x = b.add_tensor("x", (1, 3 + k, 3 + k, c), "float32")
    ws = b.add_tensor("ws", wd.shape, dtype, data=values, sparsity=sp)
    w = b.add_tensor("w", wd.shape, dtype)
    bv = rng.standard_normal(o).astype(np.float32)
    bias = b.add_tensor("b", (o,), "float32", data=bv)
    y = b.add_tensor("y", (1, 4, 4, o), "float32")
    b.add_op("DENSIFY", [ws], [w])
    if dtype == "float16":
        w32 = b.add_tensor("w32", wd.shape, "float32")
        b.add_op("DEQUANTIZE", [w], [w32])
        w = w32
    b.add_op("CONV_2D", [x, w, bias], [y])
    b.set_io([x], [y])
    xv = rng.standard_normal((1, 3 + k, 3 + k, c)).astype(np.float32)
    return b.finish(), xv, _conv(xv, wd.astype(np.float32), bv), 1e-4


def densify_int8_conv(seed=0, hybrid=False, quantized_input=True):
    """Sparse int8 per-channel weights, DENSIFY, int8 CONV_2D (``hybrid``: a float32 CONV_2D,
    refused: XNNPACK fails to prepare a dynamic-range CONV_2D whose weights are not constant).
    ``quantized_input=False``: the quantization on the DENSIFY output only, as the lowering writes."""
    rng = np.random.default_rng(seed)
    c, o = 8, 6
    wq = rng.integers(-127, 128, (o, 1, 1, c)).astype(np.int8)
    wq[rng.random(wq.shape) < 0.6] = 0
    ws = (rng.random(o) * 0.05 + 0.01).astype(np.float32)
    values, sp = sparse.encode(wq, sparse_from=3)
    b = ModelBuilder()
    x = b.add_tensor("x", (1, 4, 4, c), "float32" if hybrid else "int8", **({} if hybrid else {"scale": SX,
                                                                                          "zero_point": ZX}))
    quant = {"scale": ws, "zero_point": 0, "axis": 0}
    wsp = b.add_tensor("ws", wq.shape, "int8", data=values, sparsity=sp, **(quant if quantized_input else {}))
    w = b.add_tensor("w", wq.shape, "int8", **quant)
    if hybrid:
        bias = b.add_tensor("b", (o,), "float32", data=np.zeros(o, np.float32))
        y = b.add_tensor("y", (1, 4, 4, o), "float32")
        b.add_op("DENSIFY", [wsp], [w])
        b.add_op("CONV_2D", [x, w, bias], [y])
        b.set_io([x], [y])
        return b.finish(), None, None, None
    bq = rng.integers(-100, 100, o)
    bias = b.add_tensor("b", (o,), "int32", data=bq, scale=np.float32(SX) * ws, zero_point=0, axis=0)
    y = b.add_tensor("y", (1, 4, 4, o), "int8", scale=SY, zero_point=ZY)
    b.add_op("DENSIFY", [wsp], [w])
    b.add_op("CONV_2D", [x, w, bias], [y])
    b.set_io([x], [y])
    xq = rng.integers(-128, 128, (1, 4, 4, c)).astype(np.int8)
    xr = (xq.astype(np.float64) - ZX) * np.float32(SX)
    acc = _conv(xr, wq * ws.reshape(-1, 1, 1, 1), bq * (np.float32(SX) * ws).astype(np.float64))
    return b.finish(), xq, _requant(acc, SY, ZY), 1


def sparse_fc(kind, block=None, per_channel=True, seed=0):
    """FULLY_CONNECTED reading sparse weights directly (TFLite's sparse kernels; delegate=False).
    ``kind``: "float" (blocks of 1 or 4), "int8" (int8 activations, blocks of 16), "hybrid"
    (float activations, int8 weights, blocks of 16)."""
    rng = np.random.default_rng(seed)
    k, u = 32, 4
    block = block or (1 if kind == "float" else 16)
    wd = rng.standard_normal((u, k)).astype(np.float32) if kind == "float" else \
        rng.integers(-127, 128, (u, k)).astype(np.int8)
    drop = np.repeat(rng.random((u, k // block)) < 0.5, block, axis=1)
    drop[0] = True                                   # an empty row
    wd[drop] = 0
    values, sp = sparse.encode(wd, block, sparse_from=1)
    b = ModelBuilder()
    if kind == "float":
        x = b.add_tensor("x", (2, k), "float32")
        w = b.add_tensor("w", (u, k), "float32", data=values, sparsity=sp)
        bv = rng.standard_normal(u).astype(np.float32)
        bias = b.add_tensor("b", (u,), "float32", data=bv)
        y = b.add_tensor("y", (2, u), "float32")
        xv = rng.standard_normal((2, k)).astype(np.float32)
        ref, tol = xv.astype(np.float64) @ wd.T + bv, 1e-4
    else:
        ws = (rng.random(u) * 0.05 + 0.01).astype(np.float32) if per_channel else np.float32(0.02)
        wdeq = wd * np.reshape(ws, (-1, 1))
        if kind == "int8":
            x = b.add_tensor("x", (2, k), "int8", scale=SX, zero_point=ZX)
            w = b.add_tensor("w", (u, k), "int8", data=values, scale=ws, zero_point=0, axis=0, sparsity=sp)
            bq = rng.integers(-100, 100, u)
            bias = b.add_tensor("b", (u,), "int32", data=bq, scale=np.float32(SX) * ws, zero_point=0, axis=0)
            y = b.add_tensor("y", (2, u), "int8", scale=SY, zero_point=ZY)
            xv = rng.integers(-128, 128, (2, k)).astype(np.int8)
            acc = ((xv.astype(np.float64) - ZX) * np.float32(SX)) @ wdeq.T + \
                bq * (np.float32(SX) * np.asarray(ws, np.float64))
            ref, tol = _requant(acc, SY, ZY), 1
        else:
            x = b.add_tensor("x", (2, k), "float32")
            w = b.add_tensor("w", (u, k), "int8", data=values, scale=ws, zero_point=0, axis=0, sparsity=sp)
            bv = rng.standard_normal(u).astype(np.float32)
            bias = b.add_tensor("b", (u,), "float32", data=bv)
            y = b.add_tensor("y", (2, u), "float32")
            xv = rng.standard_normal((2, k)).astype(np.float32)
            ref, tol = xv.astype(np.float64) @ wdeq.T + bv, _hybrid_tol(xv, wdeq)
    b.add_op("FULLY_CONNECTED", [x, w, bias], [y])
    b.set_io([x], [y])
    return b.finish(), xv, ref, tol


#: name -> (model, delegate): sparse FULLY_CONNECTED weights run without XNNPACK (which reads them
#: as dense); TFLite's builtin hybrid FULLY_CONNECTED gets int4 weights wrong in 2.3.0, XNNPACK right
VALID = {
    "int4 FULLY_CONNECTED int8": (lambda: int8_op("FULLY_CONNECTED"), True),
    "int4 CONV_2D int8": (lambda: int8_op("CONV_2D"), True),
    "int4 DEPTHWISE_CONV_2D int8": (lambda: int8_op("DEPTHWISE_CONV_2D"), True),
    "hybrid FULLY_CONNECTED int8 per-channel": (lambda: hybrid_fc("int8"), True),
    "hybrid FULLY_CONNECTED int4 per-tensor": (lambda: hybrid_fc("int4", per_channel=False), True),
    "hybrid CONV_2D int8 per-tensor": (lambda: hybrid_conv("int8", per_channel=False), True),
    "hybrid CONV_2D int4 per-channel": (lambda: hybrid_conv("int4"), True),
    "hybrid CONV_2D int4 builtin": (lambda: hybrid_conv("int4"), False),
    "DEQUANTIZE int8 per-channel": (lambda: dequantize_fc("int8"), True),
    "DEQUANTIZE int4 odd count": (lambda: dequantize_fc("int4", (5, 15)), True),
    "DENSIFY float32": (lambda: densify_conv("float32"), True),
    "DENSIFY float32 builtin": (lambda: densify_conv("float32"), False),
    "DENSIFY float16": (lambda: densify_conv("float16"), True),
    "DENSIFY nested CSR 3x3": (lambda: densify_conv(k=3, sparse_from=1), True),
    "DENSIFY nested CSR 3x3 builtin": (lambda: densify_conv(k=3, sparse_from=1), False),
    "DENSIFY int8": (lambda: densify_int8_conv(), True),
    "DENSIFY int8, quantization on the output only": (lambda: densify_int8_conv(quantized_input=False), True),
    "DENSIFY int8, quantization on the output only, builtin": (lambda: densify_int8_conv(quantized_input=False),
                                                               False),
    "sparse FULLY_CONNECTED float32": (lambda: sparse_fc("float"), False),
    "sparse FULLY_CONNECTED float32 1x4": (lambda: sparse_fc("float", 4), False),
    "sparse FULLY_CONNECTED int8 1x16": (lambda: sparse_fc("int8"), False),
    "sparse FULLY_CONNECTED hybrid 1x16": (lambda: sparse_fc("hybrid", per_channel=False), False),
}


def _repack(m) -> bytes:
    b = flatbuffers.Builder(1024)
    b.Finish(m.Pack(b), file_identifier=FILE_IDENTIFIER)
    return bytes(b.Output())


def _edit(data: bytes, change) -> bytes:
    m = read_model(data)
    change(m, m.subgraphs[0])
    return _repack(m)


def _run(data, x, delegate):
    it = runtime.load_interpreter(data, delegate=delegate)
    return runtime.run(it, [x])[0]


@pytest.mark.parametrize("case", list(VALID))
def test_valid_encodings_pass_and_run(case):
    build, delegate = VALID[case]
    data, x, expected, tol = build()
    seen = check_model(data, delegate=delegate)
    check_model(_edit(data, lambda m, sg: None), delegate=delegate)      # the object API's repacking too
    assert seen.num_operators >= 1
    out = _run(data, x, delegate)
    err = np.abs(out.astype(np.float64) - expected).max()
    assert out.shape == expected.shape and err <= tol, f"{case}: max error {err:.3g} > {tol:.3g}"


def _asymmetric_inputs(m, sg):
    sg.operators[0].builtinOptions.asymmetricQuantizeInputs = True


def test_hybrid_asymmetric_quantize_inputs_passes():
    data, x, expected, tol = hybrid_fc("int8")
    data = _edit(data, _asymmetric_inputs)
    check_model(data)
    assert np.abs(_run(data, x, True) - expected).max() <= tol


@pytest.mark.parametrize("case", [c for c in VALID if c.startswith("sparse FULLY_CONNECTED")])
def test_sparse_fc_weights_are_refused_for_xnnpack(case):
    """XNNPACK takes a FULLY_CONNECTED with sparse weights and reads the stored values as the dense
    matrix (NaN outputs here; SIGSEGV on a large one): only delegate=False may accept it."""
    data = VALID[case][0]()[0]
    with pytest.raises(ArtifactError, match="XNNPACK .* reads them as dense"):
        check_model(data)


# -- named problems ---------------------------------------------------------------------------------


def _t(sg, name):
    return next(t for t in sg.tensors if (t.name.decode() if isinstance(t.name, bytes) else t.name) == name)


def _i32(values):
    v = fb.Int32VectorT()
    v.values = [int(x) for x in values]
    return v


def _csr(sg, name="ws"):
    """The CSR metadata of the sparse tensor ``name`` (its one SPARSE_CSR dimension)."""
    return next(d for d in _t(sg, name).sparsity.dimMetadata if d.format == fb.DimensionType.SPARSE_CSR)


def _set_csr(sg, segments=None, indices=None, name="ws"):
    d = _csr(sg, name)
    if segments is not None:
        d.arraySegments, d.arraySegmentsType = _i32(segments), fb.SparseIndexVector.Int32Vector
    if indices is not None:
        d.arrayIndices, d.arrayIndicesType = _i32(indices), fb.SparseIndexVector.Int32Vector


def _segments(sg, name="ws"):
    return [int(v) for v in _csr(sg, name).arraySegments.values]


def _indices(sg, name="ws"):
    return [int(v) for v in _csr(sg, name).arrayIndices.values]


def _int4_longer(m, sg):
    t = _t(sg, "w")
    m.buffers[t.buffer].data = bytes(m.buffers[t.buffer].data) + b"\0"


def _zero_points(value, name="w"):
    def change(m, sg):
        q = _t(sg, name).quantization
        q.zeroPoint = [value] * len(q.zeroPoint)
    return change


def _int4_activation(m, sg):
    _t(sg, "y").type = fb.TensorType.INT4


def _int4_bias(m, sg):
    op = sg.operators[0]
    op.inputs = [op.inputs[0], op.inputs[1], op.inputs[1]]


def _unquantized(m, sg):
    _t(sg, "w").quantization = None


def _segments_decrease(m, sg):
    s = _segments(sg)
    s[1] = s[2] + 1
    _set_csr(sg, segments=s)


def _last_segment(m, sg):
    s = _segments(sg)
    s[-1] += 1
    _set_csr(sg, segments=s)


def _short_segments(m, sg):
    _set_csr(sg, segments=_segments(sg)[:-1])


def _index_out_of_range(m, sg):
    i = _indices(sg)
    i[-1] = 8
    _set_csr(sg, indices=i)


def _indices_not_rising(m, sg):
    s, i = _segments(sg), _indices(sg)
    row = next(r for r in range(len(s) - 1) if s[r + 1] - s[r] >= 2)
    i[s[row]], i[s[row] + 1] = i[s[row] + 1], i[s[row]]
    _set_csr(sg, indices=i)


def _values_missing(m, sg, name="ws"):
    t = _t(sg, name)
    m.buffers[t.buffer].data = bytes(m.buffers[t.buffer].data)[:-4]


def _traversal(order, name="ws"):
    return lambda m, sg: setattr(_t(sg, name).sparsity, "traversalOrder", order)


def _block_map(m, sg):
    _t(sg, "w").sparsity.blockMap = [5]


def _block_size(m, sg):
    _t(sg, "w").sparsity.dimMetadata[2].denseSize = 3


def _dense_size(m, sg):
    _t(sg, "ws").sparsity.dimMetadata[0].denseSize = 60000


def _union_type(m, sg):
    _csr(sg).arraySegmentsType = 7


def _retyped_indices(m, sg):
    _csr(sg).arrayIndicesType = fb.SparseIndexVector.Int32Vector       # Uint8Vector bytes read as int32


def _metadata_short(m, sg):
    sp = _t(sg, "ws").sparsity
    sp.dimMetadata = sp.dimMetadata[:2]


def _sparse_activation(m, sg):
    x = _t(sg, "x")
    x.sparsity = sparse.encode(np.ones(x.shape, np.float32))[1]     # metadata that fits its shape


def _densify_shape(m, sg):
    _t(sg, "w").shape = [6, 1, 1, 9]


def _densify_dense_input(m, sg):
    t = _t(sg, "ws")
    t.sparsity = None
    m.buffers[t.buffer].data = np.zeros(48, np.float32).tobytes()


def _densify_quantization(m, sg):
    q = _t(sg, "w").quantization
    q.scale = [2 * s for s in q.scale]


def _sparse_into_conv(m, sg):
    conv = sg.operators[1]
    conv.inputs = [conv.inputs[0], sg.operators[0].inputs[0], conv.inputs[2]]
    sg.operators = [conv]


#: name -> (model, change, message, delegate)
CASES = {
    "int4 buffer length": (lambda: int8_op("FULLY_CONNECTED"), _int4_longer,
                           r"'w' \[8, 32\] int4 needs 128 bytes", True),
    "int4 odd buffer length": (lambda: dequantize_fc("int4", (5, 15)),
                               lambda m, sg: _values_missing(m, sg, "wq"), "int4 needs 38 bytes", True),
    "int4 zero point": (lambda: int8_op("FULLY_CONNECTED"), _zero_points(8), "zero point 8 is outside -8..7", True),
    "int4 asymmetric weights": (lambda: int8_op("CONV_2D"), _zero_points(1), "must be symmetric", True),
    "int4 activation": (lambda: int8_op("FULLY_CONNECTED"), _int4_activation, "'y' is int4 but not a constant", True),
    "int4 as bias": (lambda: hybrid_conv("int4"), _int4_bias, "int4 feeds only the weights", True),
    "int4 unquantized": (lambda: hybrid_fc("int4"), _unquantized, "int4 tensor needs quantization", True),
    "hybrid asymmetric weights": (lambda: hybrid_fc("int8"), _zero_points(3), "must be symmetric", True),
    "hybrid depthwise": (lambda: hybrid_conv("int8", depthwise=True), None,
                         "DEPTHWISE_CONV_2D on float32 needs float32 weights", True),
    "segments decrease": (densify_conv, _segments_decrease, "segments decrease", True),
    "last segment": (densify_conv, _last_segment, r"last segment is \d+, the indices number", True),
    "segment count": (densify_conv, _short_segments, "segments for 6 parent nodes", True),
    "index out of range": (densify_conv, _index_out_of_range, "index 8 is outside 0..7", True),
    "indices not rising": (densify_conv, _indices_not_rising, "indices do not rise", True),
    "values count": (densify_conv, _values_missing, r"needs \d+ bytes \(\d+ sparse values\)", True),
    "traversal not a permutation": (densify_conv, _traversal([0, 0, 1, 2]), "not a permutation", True),
    "traversal against the dense sizes": (densify_conv, _traversal([3, 0, 1, 2]),
                                          r"level 0 \(DENSE, dimension 3\) has size 6, the dimension is 8", True),
    "block map out of range": (lambda: sparse_fc("float", 4), _block_map, r"block map \[5\]", False),
    "block dimension not last": (lambda: sparse_fc("float", 4), _traversal([0, 2, 1], "w"),
                                 "block dimensions must come last", False),
    "block size": (lambda: sparse_fc("float", 4), _block_size, "size dividing dimension 1", False),
    "dense size": (densify_conv, _dense_size, r"level 0 \(DENSE, dimension 0\) has size 60000, the dimension is 6",
                   True),
    "unknown union type": (densify_conv, _union_type, "union type 7", True),
    "index vector re-typed": (densify_conv, _retyped_indices, "outside 0..7", True),
    "metadata count": (densify_conv, _metadata_short, "2 dim_metadata entries for 4", True),
    "sparse non-constant": (densify_conv, _sparse_activation, "'x' has sparsity parameters but no data", True),
    "DENSIFY output shape": (densify_conv, _densify_shape, r"DENSIFY output 'w' has shape \[6, 1, 1, 9\]", True),
    "DENSIFY of a dense constant": (densify_conv, _densify_dense_input, "DENSIFY input 'ws' is not a sparse", True),
    "DENSIFY quantization": (densify_int8_conv, _densify_quantization, "DENSIFY output 'w' is quantized", True),
    "sparse weights without DENSIFY": (densify_conv, _sparse_into_conv, "a sparse constant feeds DENSIFY only",
                                       True),
    "hybrid weights behind DENSIFY": (lambda: densify_int8_conv(hybrid=True), None,
                                      "int8 weights 'w' on float32 must be a constant", True),
    "DENSIFY int8 output unquantized": (lambda: densify_int8_conv(quantized_input=False),
                                        lambda m, sg: setattr(_t(sg, "w"), "quantization", None),
                                        "'w': a int8 tensor needs quantization", True),
    "unquantized sparse int8 weights": (lambda: sparse_fc("int8"),
                                        lambda m, sg: setattr(_t(sg, "w"), "quantization", None),
                                        "int8 weights 'w' have no quantization", False),
    "sparse float32 1x16": (lambda: sparse_fc("float", 16), None, "not a form LiteRT's sparse kernels take",
                            False),
}


@pytest.mark.parametrize("case", list(CASES))
def test_named_problem_is_an_artifact_error(case):
    build, change, match, delegate = CASES[case]
    data = build()[0]
    if change is not None:
        data = _edit(data, change)
    with pytest.raises(ArtifactError, match=match) as info:
        check_model(data, delegate=delegate)
    assert "unchecked case" not in str(info.value)


# -- raw LiteRT on hostile sparsity, in child processes ----------------------------------------------



def _big_sparse_fc() -> bytes:
    """Valid sparse metadata: a 4096x4096 float32 weight with 4 stored values (16 bytes)."""
    wd = np.zeros((4096, 4096), np.float32)
    wd[0, :4] = 1
    values, sp = sparse.encode(wd, sparse_from=1)
    b = ModelBuilder()
    x = b.add_tensor("x", (1, 4096), "float32")
    w = b.add_tensor("w", wd.shape, "float32", data=values, sparsity=sp)
    y = b.add_tensor("y", (1, 4096), "float32")
    b.add_op("FULLY_CONNECTED", [x, w, None], [y])
    b.set_io([x], [y])
    return b.finish()


def test_hostile_sparsity_crashes_raw_litert(tmp_path):
    """Edits found by experiment that kill LiteRT 2.3.0 (SIGSEGV) when it loads them unchecked:
    fbcheck refuses each first."""
    hostile = {
        "index 100000": _edit(densify_conv()[0], lambda m, sg: _set_csr(sg, indices=[100000] + _indices(sg)[1:])),
        "2 dim_metadata": _edit(densify_conv()[0], _metadata_short),
        "sparse FULLY_CONNECTED under XNNPACK": _big_sparse_fc(),
    }
    jobs = []
    for i, data in enumerate(hostile.values()):
        with pytest.raises(ArtifactError):
            check_model(data)
        path = tmp_path / f"h{i}.tflite"
        path.write_bytes(data)
        jobs.append((path, True))
    results = run_in_children(jobs, tmp_path, timeout=300)
    crashed = [name for i, name in enumerate(hostile) if results[i].startswith("crash")]
    if not crashed:
        pytest.skip(f"this LiteRT no longer crashes on them ({results})")
    # the big one is valid without XNNPACK: TFLite's sparse kernel runs it
    check_model(hostile["sparse FULLY_CONNECTED under XNNPACK"], delegate=False)


def _mutate(data: bytes, rng: random.Random) -> bytes:
    b = bytearray(data)
    kind = rng.choice(["flip", "byte", "two", "truncate"])
    p = rng.randrange(len(b) - 1)
    if kind == "flip":
        b[p] ^= 1 << rng.randrange(8)
    elif kind == "byte":
        b[p] = rng.randrange(256)
    elif kind == "two":
        b[p], b[p + 1] = rng.randrange(256), rng.randrange(256)
    else:
        b = b[:p]
    return bytes(b)


FUZZED = {"DENSIFY float32": True, "DENSIFY int8": True, "int4 FULLY_CONNECTED int8": True,
          "sparse FULLY_CONNECTED float32 1x4": False}


def test_fuzz_mutations_are_refused_or_run_without_crashing(tmp_path):
    """Random edits of the small sparse / int4 models (their index vectors and metadata are most of
    the file): each is refused, or runs in LiteRT in a child process without crashing."""
    rng = random.Random("fbcheck-encodings")
    jobs, refused = [], 0
    for case, delegate in FUZZED.items():
        data = VALID[case][0]()[0]
        for i in range(150):
            mutant = _mutate(data, rng)
            try:
                check_model(mutant, delegate=delegate)
            except ArtifactError as exc:
                assert "unchecked case" not in str(exc), f"{case} mutation {i}: {exc}"
                refused += 1
                continue
            path = tmp_path / f"m{len(jobs)}.tflite"
            path.write_bytes(mutant)
            jobs.append((path, delegate))
    results = run_in_children(jobs, tmp_path, timeout=300)
    crashed = {str(jobs[i][0]): r for i, r in results.items() if r.startswith("crash")}
    print(f"\n{150 * len(FUZZED)} mutations, {refused} refused by fbcheck, {len(jobs)} passed it; of those "
          f"{sum(r == 'ran' for r in results.values())} ran, "
          f"{sum(r.startswith('error') for r in results.values())} raised, {len(crashed)} crashed")
    assert not crashed, crashed
    assert refused > 100 and jobs, (refused, len(jobs))


def test_int4_packing_matches_what_litert_reads():
    """Element 2i in the low nibble: a DEQUANTIZE of the packed codes gives them back in order."""
    codes = np.array([[-8, 7, 0, -1, 3], [1, -2, 5, -7, 6]], np.int8)
    b = ModelBuilder()
    x = b.add_tensor("x", (1, 5), "float32")
    wq = b.add_tensor("wq", codes.shape, "int4", data=codes, scale=1.0, zero_point=0)
    w = b.add_tensor("w", codes.shape, "float32")
    y = b.add_tensor("y", (1, 2), "float32")
    b.add_op("DEQUANTIZE", [wq], [w])
    b.add_op("FULLY_CONNECTED", [x, w, None], [y])
    b.set_io([x], [y])
    data = b.finish()
    check_model(data)
    assert len(pack_int4(codes)) == 5
    rows = [_run(data, np.eye(5, dtype=np.float32)[k:k + 1], True)[0] for k in range(5)]
    assert np.array_equal(np.array(rows).T, codes)
