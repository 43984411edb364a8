"""fp16-gpu: float16 artifacts, the fp16-arithmetic runner, and the range analysis."""

import numpy as np
import pytest
import torch
from torch import nn

import sdk
from examples.models import make
from sdk.errors import CalibrationError
from sdk.litert.flatbuffer import op_name, read_model
from targets.fp16_gpu.half import dot16, mac16, sum16

FLOAT32, FLOAT16, INT32 = 0, 1, 2          # schema TensorType codes


def test_sum16_rounds_every_addition_to_half():
    # 2048 + 1 + 1 in float16: pairwise (2048+1) rounds to 2048, then +1 again -> 2048; exact sum is 2050
    assert float(sum16(np.array([2048, 1, 1, 0], np.float16))) == 2048.0
    assert float(sum16(np.array([1, 1, 2048, 0], np.float16))) == 2050.0
    rng = np.random.default_rng(0)
    a, w = rng.normal(size=(5, 300)), rng.normal(size=(7, 300))
    ref = a.astype(np.float16).astype(np.float64) @ w.astype(np.float16).astype(np.float64).T
    err = {order: np.abs(dot16(a, w, order).astype(np.float64) - ref).max() for order in ("sequential", "pairwise")}
    # |sums| ~20 (float16 ulp 2^-6): a 300-term float16 chain drifts ~10 ulps, a tree ~2
    assert 0 < err["pairwise"] < 0.05 < err["sequential"] < 0.25, err


def test_mac16_is_a_sequential_chain_of_float16_fmas():
    one = np.ones((1, 3))
    # the GPU shader order: 2048 first, then +1 twice, each sum rounded to float16 (ties to even)
    assert float(mac16(np.array([[2048.0, 1, 1]]), one.T)[0, 0]) == 2048.0
    assert float(mac16(np.array([[1.0, 1, 2048]]), one.T)[0, 0]) == 2050.0
    # fused: (1 + 2^-10)^2 = 1 + 2^-9 + 2^-20 is added exactly to -(1 + 2^-9); a rounded product would give 0
    e = 2.0 ** -10
    got = mac16(np.array([[1.0, 1 + e]]), np.array([[-(1 + 2 * e)], [1 + e]]))
    assert got.dtype == np.float16 and float(got[0, 0]) == 2.0 ** -20
    with pytest.raises(ValueError, match="sequential, pairwise"):
        dot16(one, one, "blocked")


@pytest.mark.parametrize("name", ["mlp", "lenet", "dscnn", pytest.param("mobilenetv2", marks=pytest.mark.slow)])
def test_zoo_fp16(name, tmp_path):
    model, x = make(name)
    g = torch.Generator().manual_seed(0)
    cal = [torch.randn(x.shape, generator=g) for _ in range(4)]
    art = sdk.deploy(model, "fp16-gpu", (x,), calibration=cal, output=tmp_path / "h", progress=False)
    fp32 = sdk.deploy(model, "arm-fp32", (x,), output=tmp_path / "f", progress=False)
    raw = {k: a.file("model.tflite").read_bytes() for k, a in (("h", art), ("f", fp32))}
    h, f = read_model(raw["h"]), read_model(raw["f"])
    ratio = len(raw["h"]) / len(raw["f"])
    assert ratio <= (0.52 if name == "mobilenetv2" else 0.545), ratio

    def const_bytes(m, types):
        return sum(len(m.buffers[t.buffer].data) for t in m.subgraphs[0].tensors
                   if t.buffer > 0 and t.type in types and m.buffers[t.buffer].data is not None)

    # every float32 constant is stored as float16: exactly half the bytes
    assert 2 * const_bytes(h, {FLOAT16}) == const_bytes(f, {FLOAT32}) > 0
    # the structure an fp16 file adds is its DEQUANTIZE ops and their tensors: measured 77-83 bytes each
    every = {FLOAT16, FLOAT32, INT32}
    extra = (len(raw["h"]) - const_bytes(h, every)) - (len(raw["f"]) - const_bytes(f, every))
    n_deq = sum(op_name(h, op) == "DEQUANTIZE" for op in h.subgraphs[0].operators)
    assert 0 < extra <= 88 * n_deq, (extra, n_deq)
    rep = art.verify(model, inputs=[torch.randn(x.shape, generator=g) for _ in range(2)],
                     runners=["host", "fp16", "reference"], repeats=1)
    # float16 storage within 1e-3 of the float model; float16 arithmetic within the looser rule for it
    assert rep.passed, str(rep)
    assert rep.max_rel_err["host"] <= 1e-3 and rep.max_rel_err["fp16"] <= 1e-2
    assert rep.top1_agreement["fp16"] == 1.0
    assert rep.rules["runners"]["fp16"]["max_rel_err"] == 1e-2
    # fp16 arithmetic is measurably worse than fp16 storage alone: the runner is not the host in disguise
    assert rep.max_rel_err["fp16"] > rep.max_rel_err["host"]
    types = {h.subgraphs[0].tensors[op.inputs[0]].type for op in h.subgraphs[0].operators
             if op_name(h, op) == "DEQUANTIZE"}
    assert types == {FLOAT16}          # float16 constants widened by DEQUANTIZE
    layer = next(l for l in art.profile["layers"] if l["params"])
    assert layer["bytes"] * 2 == layer["fp32_bytes"] and layer["headroom"] > 1


def test_digits_fp16_top1_is_identical(digits, tmp_path):
    from examples import digits as D

    xtr, ytr, xte, yte = digits
    torch.manual_seed(0)
    model = D.train(make("lenet", randomize_bn=False)[0].train(), xtr, ytr, epochs=8, progress=False)
    art = sdk.deploy(model, "fp16-gpu", (xte[:1],), calibration=[xtr[:64]], output=tmp_path / "d", progress=False)
    rep = art.verify(model, inputs=[xte[i:i + 1] for i in range(0, len(xte), 6)], runners=["fp16"], repeats=1)
    assert rep.top1_agreement["fp16"] == 1.0
    # trained logits reach ~15 (float16 ulp 2^-7): measured 2.4e-3, i.e. a few ulps at the largest logit
    assert rep.passed and rep.max_rel_err["fp16"] < 4e-3


class Overflowing(nn.Module):
    """A layer whose activations exceed 65504, scaled back down by the next op."""

    def __init__(self):
        super().__init__()
        self.pre = nn.Linear(8, 16)
        self.big = nn.Linear(16, 16)
        self.head = nn.Linear(16, 4)
        with torch.no_grad():
            self.big.weight.mul_(1e6)

    def forward(self, x):
        h = torch.relu(self.pre(x))
        return self.head(self.big(h) * 1e-5)


def test_overflow_is_caught_and_auto_fp32_keeps_only_what_is_needed(tmp_path):
    torch.manual_seed(0)
    m = Overflowing().eval()
    x = torch.randn(2, 8)
    cal = [torch.randn(2, 8) for _ in range(4)]
    with pytest.raises(CalibrationError) as exc:
        sdk.deploy(m, "fp16-gpu", (x,), calibration=cal, output=tmp_path / "o", progress=False)
    msg = str(exc.value)
    assert "linear_1 (big)" in msg and "65504" in msg and "auto_fp32" in msg
    assert list(tmp_path.iterdir()) == []

    art = sdk.deploy(m, "fp16-gpu", (x,), calibration=cal, auto_fp32=True, output=tmp_path / "o", progress=False)
    kept = art.manifest["quantization"]["keep_fp32"]
    assert kept == sorted(["linear_1", "mul"])              # the overflowing layer and the op reading it
    assert art.manifest["fp16"]["keep_fp32"] == kept
    precision = {l["name"]: l["precision"] for l in art.profile["layers"]}
    assert precision == {"linear": "fp16", "linear_1": "fp32", "mul": "fp16", "linear_2": "fp16"} or \
        precision["linear_1"] == "fp32" and precision["linear"] == precision["linear_2"] == "fp16"
    rep = art.verify(m, inputs=cal, runners=["fp16", "host"], repeats=1)
    # the model is ill-conditioned on purpose (1e6 weights); fp16 weights elsewhere give ~1e-3 on both runners
    assert rep.top1_agreement["fp16"] == 1.0 and rep.max_rel_err["fp16"] < 5e-3, str(rep)

    same = sdk.deploy(m, "fp16-gpu", (x,), calibration=cal, keep_fp32=["big", "mul"], output=tmp_path / "k",
                      progress=False)
    assert same.manifest["quantization"]["keep_fp32"] == kept
    # without the fp32 layers, fp16 arithmetic really overflows: the runner shows it
    from targets.fp16_gpu.half import HalfInterpreter
    broken = HalfInterpreter(art.file("model.tflite").read_bytes())
    assert not np.isfinite(broken.run([x.numpy()])[0]).all()


def test_underflow_is_reported(tmp_path):
    m = nn.Sequential(nn.Linear(4, 4)).eval()
    with torch.no_grad():
        m[0].weight.fill_(1e-9)
        m[0].bias.zero_()
    with pytest.raises(CalibrationError, match="flush to zero"):
        sdk.deploy(m, "fp16-gpu", (torch.randn(1, 4),), output=tmp_path / "u", progress=False)


@pytest.mark.parametrize("name", ["lenet", "mobilenetv2"])
def test_torch_translation_used_by_cuda_runner(name, tmp_path):
    """The cuda runner's torch rebuild of the flatbuffer, checked on the CPU in float32."""
    from sdk.litert.reference import ReferenceInterpreter
    from targets.fp16_gpu.cuda import TorchLiteRT

    model, x = make(name)
    art = sdk.deploy(model, "fp16-gpu", (x,), output=tmp_path / "c", progress=False)
    blob = art.file("model.tflite").read_bytes()
    xs = [np.ascontiguousarray(x.numpy().transpose(0, 2, 3, 1))]
    got = TorchLiteRT(blob, device="cpu", dtype=torch.float32).run(xs)[0]
    ref = ReferenceInterpreter(blob).run(xs)[0]
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)
    # the cuda runner's own dtype, on the CPU: half precision really runs, within the fp16-arithmetic rule
    half = TorchLiteRT(blob, device="cpu", dtype=torch.float16).run(xs)[0]
    with torch.no_grad():
        y = model(x).numpy()
    err = np.abs(half - y).max() / np.abs(y).max()
    assert not np.array_equal(half, got) and err <= art.manifest["verify"]["runners"]["cuda"]["max_rel_err"], err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
def test_cuda_runner(tmp_path):
    model, x = make("mobilenetv2")
    art = sdk.deploy(model, "fp16-gpu", (x,), output=tmp_path / "g", progress=False)
    rep = art.verify(model, inputs=[torch.randn(x.shape) for _ in range(2)], runners=["cuda"])
    assert rep.passed and rep.top1_agreement["cuda"] == 1.0, str(rep)


def test_cuda_runner_says_why_it_cannot_run(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    model, x = make("mlp")
    art = sdk.deploy(model, "fp16-gpu", (x,), output=tmp_path / "n", progress=False)
    with pytest.raises(sdk.ToolchainError, match="no CUDA GPU"):
        art.run(x, runner="cuda")


def _sharp_bn_resnet18():
    """resnet18 whose BatchNorms have statistics measured on data (as a trained net's are) and spread
    gamma/beta: the folded weights vary widely per channel, so rounding them to float16 alone costs
    ~4e-3 at the output (torchvision resnet50 with trained BN: ~2e-2), past the old constant 1e-3."""
    model, x = make("resnet18")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.05, 3.0)
                m.bias.uniform_(-1.5, 0.2)
                m.momentum = None
                m.reset_running_stats()
        model.train()
        for _ in range(4):
            model(torch.randn((16,) + x.shape[1:], generator=g))
    return model.eval(), x, g


def _independent_baseline(model, batches):
    """Fold each BN into its conv in torch, round every parameter to float16, compare (no sdk code)."""
    import copy

    from torch.nn.utils.fusion import fuse_conv_bn_eval

    gm = torch.fx.symbolic_trace(copy.deepcopy(model))
    mods = dict(gm.named_modules())
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and isinstance(mods[node.target], nn.BatchNorm2d):
            prev = node.args[0]
            assert prev.op == "call_module" and isinstance(mods[prev.target], nn.Conv2d)
            parent, _, attr = prev.target.rpartition(".")
            setattr(gm.get_submodule(parent) if parent else gm, attr,
                    fuse_conv_bn_eval(mods[prev.target], mods[node.target]))
            node.replace_all_uses_with(prev)
            gm.graph.erase_node(node)
    gm.recompile()
    with torch.no_grad():
        ref = torch.cat([model(b).flatten() for b in batches]).double()
        for p in gm.parameters():
            p.copy_(p.half().float())
        got = torch.cat([gm(b).flatten() for b in batches]).double()
    return float((got - ref).abs().max() / ref.abs().max())


def test_verify_bound_is_derived_from_the_weight_rounding_baseline(tmp_path):
    import json
    import shutil

    from tamper import rewrite
    from sdk.litert.fbcheck import check_model
    from targets.fp16_gpu import REL_ERR_CAP

    model, x, g = _sharp_bn_resnet18()
    cal = [torch.randn(x.shape, generator=g) for _ in range(4)]
    art = sdk.deploy(model, "fp16-gpu", (x,), calibration=cal, output=tmp_path / "r", progress=False)
    base = art.manifest["fp16"]["weight_rounding_rel_err"]
    indep = _independent_baseline(model, cal)
    assert abs(base - indep) <= 0.1 * indep, (base, indep)
    assert 2e-3 < base < 1e-2, base                    # the constant 1e-3 would fail this model
    rules = art.manifest["verify"]
    assert rules["max_rel_err"] == pytest.approx(max(1e-3, 2 * base))
    assert rules["runners"]["fp16"]["max_rel_err"] == pytest.approx(max(1e-2, 4 * base))
    inputs = [torch.randn(x.shape, generator=g) for _ in range(2)]
    rep = art.verify(model, inputs=inputs, runners=["host", "reference"], repeats=1)
    assert rep.passed, str(rep)
    assert rep.rules["max_rel_err"] == rules["max_rel_err"]          # the target's stated rule is only the cap
    assert 1e-3 < rep.max_rel_err["host"] <= rules["max_rel_err"], str(rep)

    # a consistently tampered copy (largest float16 weight buffer scaled by 0.9, hashes rewritten) still fails
    dest = tmp_path / "bad"
    shutil.copytree(art.path, dest)
    data = bytearray((dest / "model.tflite").read_bytes())
    start, end = max(check_model(bytes(data)).buffer_spans, key=lambda s: s[1] - s[0])
    w = np.frombuffer(bytes(data[start:end]), np.float16)
    data[start:end] = (w * np.float16(0.9)).astype(np.float16).tobytes()
    rewrite(dest, "model.tflite", bytes(data))
    rep = sdk.load(dest).verify(model, inputs=inputs, runners=["host", "reference"], repeats=1)
    assert not rep.passed, str(rep)
    assert any("host" in f and "relative error" in f for f in rep.failures), rep.failures
    # an edited manifest cannot loosen the bound past the cap the target states (measured: this tamper
    # costs 0.098, just inside the cap -- the signature, not the numeric bound, is what catches such edits)
    from sdk.verify import merge_rules, target_rules

    manifest = json.loads((dest / "manifest.json").read_text())
    manifest["verify"] = {"max_rel_err": 10.0, "runners": {"fp16": {"max_rel_err": 10.0}}}
    (dest / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    loose = sdk.load(dest)
    merged = merge_rules(loose.manifest["verify"], target_rules(loose))
    assert merged["max_rel_err"] == merged["runners"]["fp16"]["max_rel_err"] == REL_ERR_CAP, merged
