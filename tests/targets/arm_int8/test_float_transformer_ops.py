"""GELU, BATCH_MATMUL, RSQRT and RESIZE_BILINEAR: the float32-only ops of transformers and upsampling.

Each op is built alone with :class:`ModelBuilder` and run three ways: LiteRT (default XNNPACK
delegate, one thread), LiteRT's builtin kernels alone, and the numpy reference; all must agree
with each other and with an independent torch (float64) computation to 1e-5 of the largest
output.  XNNPACK must take every one of them (one partition, nothing left to the builtin
kernels).  fbcheck accepts every such model and refuses the broken ones; the reference refuses
them on int8 tensors (edgepack writes them in float32 only).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sdk.errors import ArtifactError, UnsupportedOpError
from sdk.litert import fbcheck, runtime
from sdk.litert.flatbuffer import ModelBuilder
from sdk.litert.reference import ReferenceInterpreter

RTOL = 1e-5     # of max |reference|


def _max_err(got, want) -> float:
    want = np.asarray(want, dtype=np.float64)
    return float(np.abs(np.asarray(got, dtype=np.float64) - want).max() / max(np.abs(want).max(), 1e-30))


def _unary(op, shape, **options) -> bytes:
    b = ModelBuilder()
    x = b.add_tensor("x", shape, "float32")
    y = b.add_tensor("y", shape, "float32")
    b.add_op(op, [x], [y], **options)
    b.set_io([x], [y])
    return b.finish()


def _batch_matmul(a_shape, b_shape, out_shape, dtype="float32", **options) -> bytes:
    b = ModelBuilder()
    q = {"scale": 0.05, "zero_point": 0} if dtype == "int8" else {}
    x = b.add_tensor("a", a_shape, dtype, **q)
    w = b.add_tensor("b", b_shape, dtype, **q)
    y = b.add_tensor("y", out_shape, dtype, **q)
    b.add_op("BATCH_MATMUL", [x, w], [y], **options)
    b.set_io([x, w], [y])
    return b.finish()


def _resize(shape, size, dtype="float32", **options) -> bytes:
    b = ModelBuilder()
    q = {"scale": 0.05, "zero_point": 0} if dtype == "int8" else {}
    x = b.add_tensor("x", shape, dtype, **q)
    s = b.add_const("size", np.asarray(size, dtype=np.int32))
    y = b.add_tensor("y", (shape[0], size[0], size[1], shape[3]), dtype, **q)
    b.add_op("RESIZE_BILINEAR", [x, s], [y], **options)
    b.set_io([x], [y])
    return b.finish()


def _check(model: bytes, inputs, want=None):
    """LiteRT (delegated and builtin) == reference == torch (``want``), XNNPACK takes the op,
    fbcheck accepts the model.  Returns the errors measured."""
    fbcheck.check_model(model)
    ref = ReferenceInterpreter(model).run(inputs)[0]
    interp = runtime.load_interpreter(model, num_threads=1)
    got = runtime.run(interp, inputs)[0]
    plain = runtime.run(runtime.load_interpreter(model, num_threads=1, delegate=False), inputs)[0]
    assert got.dtype == ref.dtype == np.float32 and got.shape == ref.shape
    errs = {"xnnpack": _max_err(got, ref), "builtin": _max_err(plain, ref)}
    if want is not None:
        assert want.shape == ref.shape
        errs["torch"] = _max_err(ref, want)
    assert all(e <= RTOL for e in errs.values()), errs
    summary = runtime.op_summary(interp)
    assert summary["delegate_nodes"] == 1 and not summary["builtin"], summary
    return errs


# --- GELU ---------------------------------------------------------------------------------


@pytest.mark.parametrize("approximate", [False, True])
def test_gelu(approximate):
    rng = np.random.default_rng(0)
    shape = (1, 7, 9, 16)
    x = (rng.standard_normal(shape) * 3).astype(np.float32)
    x.flat[:5] = [0.0, -10.0, 10.0, -1e-4, 3.5]
    want = F.gelu(torch.from_numpy(x).double(), approximate="tanh" if approximate else "none").numpy()
    _check(_unary("GELU", shape, approximate=approximate), [x], want)


# --- BATCH_MATMUL ---------------------------------------------------------------------------

BMM_CASES = {
    # name: (a shape, b shape, output shape, options)
    "rank3": ((2, 5, 8), (2, 8, 6), (2, 5, 6), {}),
    "rank3_adj_y": ((2, 5, 8), (2, 6, 8), (2, 5, 6), {"adj_y": True}),
    "rank3_adj_x": ((2, 8, 5), (2, 8, 6), (2, 5, 6), {"adj_x": True}),
    "rank3_broadcast": ((3, 5, 8), (1, 8, 6), (3, 5, 6), {}),
    "rank4_broadcast": ((2, 1, 5, 8), (1, 3, 8, 6), (2, 3, 5, 6), {}),
    "rank4_broadcast_adj_y": ((1, 4, 7, 16), (2, 1, 9, 16), (2, 4, 7, 9), {"adj_y": True}),
}


@pytest.mark.parametrize("case", sorted(BMM_CASES))
def test_batch_matmul(case):
    a_shape, b_shape, out_shape, options = BMM_CASES[case]
    rng = np.random.default_rng(1)
    a = rng.standard_normal(a_shape).astype(np.float32)
    b = rng.standard_normal(b_shape).astype(np.float32)
    ta, tb = torch.from_numpy(a).double(), torch.from_numpy(b).double()
    if options.get("adj_x"):
        ta = ta.transpose(-1, -2)
    if options.get("adj_y"):
        tb = tb.transpose(-1, -2)
    want = torch.matmul(ta, tb).numpy()
    _check(_batch_matmul(a_shape, b_shape, out_shape, **options), [a, b], want)


# --- RSQRT -----------------------------------------------------------------------------------


def test_rsqrt():
    rng = np.random.default_rng(2)
    shape = (1, 6, 5, 12)
    x = np.exp(rng.uniform(np.log(1e-3), np.log(1e3), shape)).astype(np.float32)   # positive, 6 decades
    want = torch.rsqrt(torch.from_numpy(x).double()).numpy()
    _check(_unary("RSQRT", shape), [x], want)


# --- RESIZE_BILINEAR -------------------------------------------------------------------------

RESIZE_CASES = {
    # name: (input NHWC, output size, options); torch's align_corners=False is half_pixel_centers=True
    "x2_half_pixel": ((1, 5, 6, 3), (10, 12), {"half_pixel_centers": True}),
    "x2_align_corners": ((1, 5, 6, 3), (10, 12), {"align_corners": True}),
    "fractional_half_pixel": ((2, 5, 7, 4), (8, 11), {"half_pixel_centers": True}),
    "fractional_align_corners": ((2, 5, 7, 4), (8, 11), {"align_corners": True}),
    "down_half_pixel": ((1, 9, 10, 3), (4, 7), {"half_pixel_centers": True}),
    "x2_legacy": ((1, 5, 6, 3), (10, 12), {}),          # neither flag: TFLite's legacy mapping, no torch twin
}


@pytest.mark.parametrize("case", sorted(RESIZE_CASES))
def test_resize_bilinear(case):
    shape, size, options = RESIZE_CASES[case]
    rng = np.random.default_rng(3)
    x = rng.standard_normal(shape).astype(np.float32)
    want = None
    if options:
        t = torch.from_numpy(x).double().permute(0, 3, 1, 2)
        y = F.interpolate(t, size=size, mode="bilinear", align_corners=bool(options.get("align_corners")))
        want = y.permute(0, 2, 3, 1).numpy()
    _check(_resize(shape, size, **options), [x], want)


def test_resize_bilinear_legacy_mapping():
    """Neither flag: source index out * in / out, as TFLite's legacy resize (x2: the even outputs
    are the inputs, the odd ones the mean of two neighbours, the last row/column repeated)."""
    x = np.arange(2 * 3 * 1 * 1, dtype=np.float32).reshape(1, 2, 3, 1)
    (y,) = ReferenceInterpreter(_resize(x.shape, (4, 6))).run([x])
    rows = np.array([[0, 0.5, 1, 1.5, 2, 2], [1.5, 2, 2.5, 3, 3.5, 3.5], [3, 3.5, 4, 4.5, 5, 5],
                     [3, 3.5, 4, 4.5, 5, 5]])
    np.testing.assert_allclose(y[0, :, :, 0], rows, rtol=0, atol=1e-6)


# --- refusals --------------------------------------------------------------------------------


def test_fbcheck_refuses_batch_matmul_whose_inner_dims_disagree():
    fbcheck.check_model(_batch_matmul((2, 5, 8), (2, 6, 8), (2, 5, 6), adj_y=True))
    with pytest.raises(ArtifactError, match="inner dimensions 8 and 6"):
        fbcheck.check_model(_batch_matmul((2, 5, 8), (2, 6, 8), (2, 5, 8)))          # adj_y left out
    with pytest.raises(ArtifactError, match="inner dimensions 8 and 7"):
        fbcheck.check_model(_batch_matmul((2, 5, 8), (2, 7, 6), (2, 5, 6)))


def test_fbcheck_refuses_other_broken_batch_matmuls():
    with pytest.raises(ArtifactError, match="has shape"):                             # wrong stored output
        fbcheck.check_model(_batch_matmul((2, 5, 8), (2, 8, 6), (2, 5, 7)))
    with pytest.raises(ArtifactError, match="do not broadcast"):
        fbcheck.check_model(_batch_matmul((2, 5, 8), (3, 8, 6), (3, 5, 6)))
    with pytest.raises(ArtifactError, match="ranks must be equal"):
        fbcheck.check_model(_batch_matmul((2, 5, 8), (8, 6), (2, 5, 6)))
    with pytest.raises(ArtifactError, match="ranks must be equal"):                  # TFLite's kernel: rank <= 5
        fbcheck.check_model(_batch_matmul((1,) * 4 + (5, 8), (1,) * 4 + (8, 6), (1,) * 4 + (5, 6)))
    with pytest.raises(ArtifactError, match="float32 only"):
        fbcheck.check_model(_batch_matmul((2, 5, 8), (2, 8, 6), (2, 5, 6), dtype="int8"))


def _int8_unary(op) -> bytes:
    b = ModelBuilder()
    x = b.add_tensor("x", (1, 4, 4, 8), "int8", scale=0.05, zero_point=-3)
    y = b.add_tensor("y", (1, 4, 4, 8), "int8", scale=0.03, zero_point=-100)
    b.add_op(op, [x], [y])
    b.set_io([x], [y])
    return b.finish()


@pytest.mark.parametrize("op", ["GELU", "RSQRT"])
def test_fbcheck_refuses_int8_elementwise(op):
    with pytest.raises(ArtifactError, match=f"edgepack writes {op} in float32 only"):
        fbcheck.check_model(_int8_unary(op))


def test_fbcheck_resize_bilinear_rules():
    with pytest.raises(ArtifactError, match="float32 only"):
        fbcheck.check_model(_resize((1, 4, 4, 2), (8, 8), dtype="int8", half_pixel_centers=True))
    with pytest.raises(ArtifactError, match="both align_corners and half_pixel_centers"):
        fbcheck.check_model(_resize((1, 4, 4, 2), (8, 8), align_corners=True, half_pixel_centers=True))
    with pytest.raises(ArtifactError, match="has shape"):
        b = ModelBuilder()
        x = b.add_tensor("x", (1, 4, 4, 2), "float32")
        s = b.add_const("size", np.asarray([8, 8], dtype=np.int32))
        y = b.add_tensor("y", (1, 8, 7, 2), "float32")
        b.add_op("RESIZE_BILINEAR", [x, s], [y], half_pixel_centers=True)
        b.set_io([x], [y])
        fbcheck.check_model(b.finish())


REFUSED_INT8 = {
    "GELU": lambda: _int8_unary("GELU"),
    "RSQRT": lambda: _int8_unary("RSQRT"),
    "BATCH_MATMUL": lambda: _batch_matmul((2, 5, 8), (2, 8, 6), (2, 5, 6), dtype="int8"),
    "RESIZE_BILINEAR": lambda: _resize((1, 4, 4, 2), (8, 8), dtype="int8", half_pixel_centers=True),
}


@pytest.mark.parametrize("op", sorted(REFUSED_INT8))
def test_reference_refuses_int8(op):
    ref = ReferenceInterpreter(REFUSED_INT8[op]())
    inputs = [np.zeros(d["shape"], np.int8) for d in ref.input_details]
    with pytest.raises(UnsupportedOpError, match=f"edgepack writes {op} in float32 only") as e:
        ref.run(inputs)
    assert e.value.op == op and e.value.target == "arm-int8"
