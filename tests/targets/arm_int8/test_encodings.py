"""What compression produced reaches the LiteRT file: INT4 weights, dynamic-range and weight-only
compute, sparse weights behind DENSIFY, per-layer mixed precision (sdk/litert/lowering.py KERNELS).

Every combination is checked three ways: the profile names the kernel the lowering meant, LiteRT's
delegation agrees (an ``xnnpack`` kernel leaves no builtin op of that type), and the runtime agrees
with the numpy reference (sdk/litert/reference.py, sdk/litert/hybrid.py) bit for bit where the
arithmetic is integer or the reproduced dynamic-range GEMM, within the float rule elsewhere."""

import numpy as np
import pytest
import torch
from torch import nn

import sdk
from sdk.errors import EncodingError
from sdk.litert import runtime
from sdk.litert.flatbuffer import dtype_name, read_model
from sdk.litert.lowering import KERNELS, ODD_INT4_FC

pytestmark = pytest.mark.usefixtures("one_thread")

RECIPES = {
    "int8": {"method": "ptq"},
    "int4": {"method": "ptq", "config": {"weight_bits": 4}},
    "dynamic8": {"method": "dynamic"},
    "dynamic4": {"method": "dynamic", "config": {"weight_bits": 4}},
    "weight-only8": {"method": "dynamic", "config": {"mode": "weight-only"}},
    "weight-only4": {"method": "dynamic", "config": {"mode": "weight-only", "weight_bits": 4}},
}


def _layer(kind: str):
    torch.manual_seed(0)
    if kind == "linear":
        return nn.Sequential(nn.Linear(40, 24), nn.ReLU()), torch.randn(2, 40)
    if kind == "linear-odd":        # XNNPACK declines INT4 rows of odd length: int8 storage, or builtin
        return nn.Sequential(nn.Linear(41, 24), nn.ReLU()), torch.randn(2, 41)
    if kind == "conv":
        return nn.Sequential(nn.Conv2d(6, 8, 3, stride=2, padding=1), nn.ReLU6()), torch.randn(1, 6, 9, 9)
    return nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.ReLU()), torch.randn(1, 8, 7, 7)


def _deploy(model, x, recipe, **target_options):
    cal = [torch.randn_like(x) for _ in range(4)]
    return sdk.deploy(model, "arm-int8", (x,), calibration=cal, recipe={"stages": [recipe]}, progress=False,
                      **target_options)


def _builtin_ops(art) -> dict:
    it = runtime.load_interpreter(art.read_bytes("model.tflite"))
    return dict(runtime.op_summary(it)["builtin"])


@pytest.mark.parametrize("int4", ["where-fast", "always"])
@pytest.mark.parametrize("plan", list(RECIPES))
@pytest.mark.parametrize("kind", ["linear", "linear-odd", "conv", "depthwise"])
def test_each_kernel_row_is_what_runs_and_matches_the_reference(kind, plan, int4):
    if int4 == "always" and not plan.endswith("4"):
        pytest.skip("int4='always' only changes 4-bit plans")
    model, x = _layer(kind)
    art = _deploy(model, x, RECIPES[plan], int4=int4)
    (row,) = [r for r in art.profile["layers"] if "kernel" in r]
    op = row["op"].split("->")[1]
    assert any(row["kernel"].startswith(k) for k in [*KERNELS.values(), ODD_INT4_FC])
    builtin = _builtin_ops(art)
    if row["kernel"].startswith("xnnpack"):
        assert builtin == {}, builtin
    else:
        assert op in builtin or "DEQUANTIZE" in builtin
    storage = {dtype_name(t.type) for t in read_model(art.read_bytes("model.tflite")).subgraphs[0].tensors
               if t.name.decode().startswith(row["name"] + "/weight") and t.buffer}
    assert storage == {row["weight_storage"]}
    xs = [torch.randn_like(x) for _ in range(3)]
    rep = art.verify(model, inputs=[[t.numpy()] for t in xs], runners=["host", "reference"])
    assert rep.passed, str(rep)
    if plan in ("int8", "int4") or (plan.startswith("dynamic") and kind != "depthwise"
                                    and row["kernel"].startswith("xnnpack")):
        assert rep.runners["host"].bit_exact_ratio == 1.0, str(rep)


def test_dynamic_mlp_is_bit_exact_and_smaller_than_fp32():
    from examples.models import make

    model, x = make("mlp")
    art = _deploy(model, x, {"method": "dynamic"})
    fp32 = sdk.deploy(model, "arm-fp32", (x,), progress=False)
    assert art.manifest["quantization"]["compute"] == "dynamic"
    assert art.manifest["verify"] == {"max_ref_rel_err": 1e-4, "min_sqnr_db": 20.0}
    rep = art.verify(model, runners=["host", "reference"])
    assert rep.passed and rep.runners["host"].bit_exact_ratio == 1.0, str(rep)
    assert len(art.read_bytes("model.tflite")) < 0.35 * len(fp32.read_bytes("model.tflite"))


def test_int4_mlp_halves_the_weight_bytes():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))
    x = torch.randn(1, 256)
    eight = _deploy(model, x, {"method": "ptq"})
    four = _deploy(model, x, {"method": "int4"})
    weights = sum(m.weight.numel() for m in model if isinstance(m, nn.Linear))
    assert eight.profile["estimate"]["weight_bytes"] - four.profile["estimate"]["weight_bytes"] == weights // 2
    ratio = len(four.read_bytes("model.tflite")) / len(eight.read_bytes("model.tflite"))
    assert ratio <= 0.56, ratio
    rep = four.verify(model, runners=["host", "reference"])
    assert rep.passed and rep.runners["host"].bit_exact_ratio == 1.0, str(rep)


def test_mixed_precision_in_one_artifact():
    """ptq with int4_layers / float_layers: an int8 conv, a 4-bit FC (INT4) and a float FC in one file."""
    from examples.models import make

    model, x = make("lenet")
    art = _deploy(model, x, {"method": "ptq", "config": {"int4_layers": ["classifier.1"],
                                                          "float_layers": ["classifier.3"]}})
    rows = {r["module"]: r for r in art.profile["layers"] if "kernel" in r}
    assert rows["features.0"]["weight_storage"] == "int8" and rows["features.0"]["kernel"] == "xnnpack int8"
    assert rows["classifier.1"]["weight_storage"] == "int4"
    assert rows["classifier.3"]["weight_storage"] == "float32" and rows["classifier.3"]["kernel"] == "xnnpack float"
    enc = {r["layer"]: r for r in art.manifest["encodings"]}
    assert (enc["classifier.1"]["bits"], enc["classifier.1"]["stored_bits"]) == (4, 4)
    assert enc["classifier.3"]["planned"] == "float32"
    assert _builtin_ops(art) == {}
    rep = art.verify(model, runners=["host", "reference"])
    assert rep.passed, str(rep)


def _pruned_convnet():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.ReLU(), nn.Conv2d(16, 64, 1), nn.ReLU(),
        nn.Conv2d(64, 64, 3, padding=1, groups=64), nn.ReLU(), nn.Conv2d(64, 128, 1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, 10))
    x = torch.randn(1, 3, 33, 33)
    small = sdk.compress(model, {"stages": [{"method": "magnitude", "config": {"sparsity": 0.9}}]}, progress=False)
    return small, x


@pytest.mark.parametrize("target", ["arm-fp32", "fp16-gpu", "arm-int8"])
def test_pruned_model_ships_smaller_on_every_target_that_carries_sparsity(target):
    small, x = _pruned_convnet()
    cal = [torch.randn_like(x) for _ in range(4)]
    sparse = sdk.deploy(small, target, (x,), calibration=cal, progress=False)
    dense = sdk.deploy(small, target, (x,), calibration=cal, progress=False, sparsity="off")
    size = len(sparse.read_bytes("model.tflite")), len(dense.read_bytes("model.tflite"))
    # int8: the per-channel scales and int32 biases, which stay dense, are a larger share of the file
    assert size[0] < (0.8 if target == "arm-int8" else 0.5) * size[1], size
    stored = [r["weight_storage"] for r in sparse.profile["layers"] if "weight_storage" in r]
    assert sum(s.endswith("sparse") for s in stored) >= 3, stored
    assert any(r["sparsity"]["shipped"] == "sparse" for r in sparse.manifest["encodings"])
    assert _builtin_ops(sparse) == {}
    # the same numbers, stored differently: LiteRT gives identical outputs for both files
    for _ in range(2):
        xi = torch.randn_like(x).numpy()
        np.testing.assert_array_equal(sparse.run(xi)[0], dense.run(xi)[0])
    rep = sparse.verify(small, runners=["host", "reference"])
    assert rep.passed, str(rep)


def test_encodings_a_target_cannot_carry_are_refused_by_name():
    from examples.models import make

    model, x = make("mlp")
    with pytest.raises(EncodingError) as exc:        # arm-fp32 has no integer weights
        sdk.deploy(model, "arm-fp32", (x,), recipe={"stages": [{"method": "dynamic"}]}, progress=False)
    assert "arm-int8" in exc.value.carriers
    with pytest.raises(EncodingError, match="blockwise 32") as exc:   # LiteRT runs blockwise only dynamic
        _deploy(model, x, {"method": "int4", "config": {"granularity": "grouped", "group_size": 32}})
    assert "activations: float" in str(exc.value)
    with pytest.raises(EncodingError, match="multiple of 32"):
        _deploy(model, x, {"method": "int4", "config": {"granularity": "grouped", "group_size": 16,
                                                         "activations": "float"}})


def test_grouped_int4_runs_in_xnnpack_blockwise_kernel_bit_exact():
    """int4 grouped with float activations: INT4 with float16 scales per 32 weights (BlockwiseQuantization),
    XNNPACK's qd8-qb4w kernel, bit-exact with sdk.litert.hybrid.fully_connected_blockwise."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10))
    x = torch.randn(3, 128)
    art = _deploy(model, x, {"method": "int4", "config": {"granularity": "grouped", "group_size": 32,
                                                           "activations": "float"}})
    rows = [r for r in art.profile["layers"] if "kernel" in r]
    assert [r["weight_storage"] for r in rows] == ["int4 blockwise 32"] * 2
    assert {r["kernel"] for r in rows} == {"xnnpack dynamic range blockwise (qd8-qb4w, bf16 scales)"}
    assert [r["stored_bits"] for r in art.manifest["encodings"]] == [4, 4]
    assert _builtin_ops(art) == {}
    rep = art.verify(model, runners=["host", "reference"])
    assert rep.passed and rep.runners["host"].bit_exact_ratio == 1.0, str(rep)
    per_channel = _deploy(model, x, {"method": "int4", "config": {"activations": "float"}})
    assert rep.sqnr_db["host"] > per_channel.verify(model, runners=["host"]).sqnr_db["host"]


@pytest.mark.parametrize("mode", ["dynamic", "weight-only"])
def test_pruned_dynamic_and_weight_only_plans_deploy(mode):
    """DENSIFY only where XNNPACK takes it: an int8 filter of a dynamic-range conv stays dense (the
    delegate fails to prepare it behind DENSIFY), weight-only int8 weights go sparse."""
    small, x = _pruned_convnet()
    art = _deploy(small, x, {"method": "dynamic", "config": {"mode": mode}})
    rows = [r for r in art.profile["layers"] if "kernel" in r]
    sparse = [r["op"] for r in rows if r["weight_storage"].endswith("sparse")]
    if mode == "dynamic":
        assert not any(op.endswith("->CONV_2D") for op in sparse), sparse
    else:
        assert len(sparse) >= 3, sparse
    assert _builtin_ops(art) == {}
    rep = art.verify(small, runners=["host", "reference"])
    assert rep.passed, str(rep)


@pytest.mark.parametrize("target", ["arm-fp32", "arm-int8"])
def test_an_all_zero_weight_ships_dense(target):
    """A zero-initialised layer (timm's and MobileViT's residual branches) has no values to store sparse:
    LiteRT reads an empty buffer as no data, so it stays dense (found on the gallery's mobilevit_xxs)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 1))
    nn.init.zeros_(model[2].weight)
    x = torch.randn(1, 3, 8, 8)
    art = sdk.deploy(model, target, (x,), calibration=[torch.randn_like(x) for _ in range(2)], progress=False)
    assert [r["weight_storage"] for r in art.profile["layers"] if "weight_storage" in r][-1] in ("float32", "int8")
    assert art.verify(model, runners=["host", "reference"]).passed
