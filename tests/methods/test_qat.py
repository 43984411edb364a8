"""qat (Jacob et al. 2018): fake quantization equals the affine formula with the clipped
straight-through gradient, weights are per-channel narrow int8, the folded layer equals conv → BN
(running and batch statistics), and on digits a depthwise net whose int8 PTQ loses accuracy
recovers it by QAT; the artifact ships the learned ranges (no recalibration) and matches the torch
QAT model's integer simulation, host bit-exact with the reference."""

import copy

import numpy as np
import pytest
import torch
from torch import nn

import sdk
from plugins.quantize.qat import (QAT, FoldedLayer, fake_quant, fake_quant_weight, range_qparams,
                                  simulate)
from quant_helpers import (QAT_STAGE, DWNet, check_learned_ranges, check_matches_simulation,  # noqa: F401
                           dw_float, run_artifact, sqnr_db)
from sdk.encoding import Hint, hints_of, weight_spec
from sdk.errors import ConfigError, InputError
from sdk.graph import capture
from sdk.quant import QuantSpec
from sdk.trainer import make_loader

pytestmark = pytest.mark.usefixtures("one_thread")   # tiny models: one thread is faster

# -- the quantizers' arithmetic -------------------------------------------------------------

def test_fake_quant_is_the_affine_formula_with_a_clipped_straight_through_gradient():
    s, z = range_qparams(-1.0, 2.0)
    spec = QuantSpec.from_range(-1.0, 2.0, symmetric=False)        # what the plan makes of a learned range
    assert (s, z) == (spec.scale[0], spec.zero_point[0])
    x = torch.linspace(-3, 5, 4001, dtype=torch.float64).requires_grad_(True)
    y = fake_quant(x, s, z)
    xn = x.detach().numpy()
    codes = np.round(xn / s) + z
    np.testing.assert_allclose(y.detach().numpy(), s * (np.clip(codes, -128, 127) - z), rtol=0, atol=1e-12)
    y.sum().backward()
    np.testing.assert_array_equal(x.grad.numpy(), ((codes >= -128) & (codes <= 127)).astype(np.float64))
    assert 0 < x.grad.sum() < x.numel()          # both sides of the range are exercised


def test_weights_are_per_channel_narrow_int8_with_identity_gradient():
    torch.manual_seed(0)
    w = (torch.randn(6, 4, 3, 3) * torch.logspace(-2, 1, 6).reshape(-1, 1, 1, 1)).requires_grad_(True)
    wq = fake_quant_weight(w)
    wn = w.detach().double().numpy()
    s = np.abs(wn).reshape(6, -1).max(1).reshape(-1, 1, 1, 1) / 127
    codes = wq.detach().double().numpy() / s
    np.testing.assert_allclose(codes, np.round(codes), atol=1e-4)
    np.testing.assert_allclose(codes, np.clip(np.round(wn / s), -127, 127), atol=1e-4)
    assert np.abs(codes).reshape(6, -1).max(1).round().tolist() == [127.0] * 6
    g = torch.randn_like(w)
    (wq * g).sum().backward()
    torch.testing.assert_close(w.grad, g)


def _conv_bn(seed=1):
    torch.manual_seed(seed)
    conv, bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
    with torch.no_grad():
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.3, 3.0)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.3, 0.3)
    return conv, bn


def test_folded_layer_equals_conv_then_batch_norm():
    conv, bn = _conv_bn()
    ref_conv, ref_bn = copy.deepcopy(conv), copy.deepcopy(bn)
    x = torch.randn(16, 3, 8, 8)
    folded = FoldedLayer(conv, bn, quantize=False)
    folded.frozen = True                         # running statistics: the deployed (inference) form
    with torch.no_grad():
        diff = (folded(x) - ref_bn.eval()(ref_conv(x))).abs().max()
    assert diff < 1e-5, diff
    folded.frozen = False                        # early training: batch statistics, running ones updated
    folded.train()
    ref_bn.train()
    with torch.no_grad():
        diff = (folded(x) - ref_bn(ref_conv(x))).abs().max()
    assert diff < 1e-5, diff
    torch.testing.assert_close(bn.running_mean, ref_bn.running_mean)
    torch.testing.assert_close(bn.running_var, ref_bn.running_var)


def test_quantized_folded_layer_computes_with_the_int8_folded_weight():
    conv, bn = _conv_bn(2)
    w, b = conv.weight.detach().double().numpy(), conv.bias.detach().double().numpy()
    gamma, beta = bn.weight.detach().double().numpy(), bn.bias.detach().double().numpy()
    mean, var = bn.running_mean.double().numpy(), bn.running_var.double().numpy()
    k = gamma / np.sqrt(var + bn.eps)                              # w·γ/σ, β + (b − μ)·γ/σ
    w_fold, b_fold = w * k.reshape(-1, 1, 1, 1), beta + (b - mean) * k
    s = np.abs(w_fold).reshape(8, -1).max(1).reshape(-1, 1, 1, 1) / 127
    w_q = np.clip(np.round(w_fold / s), -127, 127) * s
    folded = FoldedLayer(conv, bn, quantize=True).eval()
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        got = folded(x).double()
    expected = torch.nn.functional.conv2d(x.double(), torch.from_numpy(w_q), torch.from_numpy(b_fold), padding=1)
    assert (got - expected).abs().max() < 1e-5


def test_bad_options_are_named_errors():
    with pytest.raises(ConfigError, match="freeze_bn_after"):
        QAT(freeze_bn_after=-1)
    with pytest.raises(ConfigError, match="freeze_bn_after"):
        QAT(freeze_bn_after=2.5)
    with pytest.raises(ConfigError, match="ema_decay"):
        QAT(ema_decay=1.0)
    with pytest.raises(InputError, match="data="):
        QAT(progress=False).apply(DWNet())


def test_functional_activations_keep_the_pre_activation_range(small_cnn, digits):
    """SmallCNN applies torch.relu in forward: the learned ranges sit on the conv outputs (BN folded
    in), and the relu nodes, which the integer graph fuses, are left to calibration."""
    x, y = digits[0][:96], digits[1][:96]
    q = QAT(epochs=1, progress=False).apply(copy.deepcopy(small_cnn), list(make_loader(x, y, batch_size=32)))
    assert isinstance(q.b1, nn.Identity) and isinstance(q.b2, nn.Identity)
    graph = capture(q, (x[:1],))
    ranged = {graph.node(n).op for n, h in graph.hints.items() if h.range is not None}
    hinted = {graph.node(n).module for n, h in graph.hints.items() if h.range is not None}
    assert ranged == {"conv", "linear"} and hinted == {"c1", "c2", "fc"}


# -- digits: PTQ loses on a depthwise net, QAT recovers; the artifact is the QAT model -------

@pytest.fixture(scope="module")
def dw_results(dw_float):
    model, data, xte, yte, float_acc = dw_float
    cal = [(x,) for x, _ in data[:8]]
    ptq = sdk.deploy(model, "arm-int8", (xte[:1],), calibration=cal, progress=False)
    recipe = {"stages": [QAT_STAGE]}
    # the same seeded training twice: the torch QAT model, and inside deploy (ptq implicit) the artifact
    qat_model = sdk.compress(model, recipe, data=data, progress=False)
    art = sdk.deploy(model, "arm-int8", (xte[:1],), calibration=cal, data=data, recipe=recipe, progress=False)
    ptq_out, qat_out = run_artifact(ptq, xte), run_artifact(art, xte)
    with simulate(qat_model), torch.no_grad():
        sim = qat_model(xte).numpy()
    acc = lambda out: float((out.argmax(1) == yte.numpy()).mean())  # noqa: E731
    return {"model": qat_model, "art": art, "sim": sim, "qat_out": qat_out, "float": float_acc,
            "ptq": acc(ptq_out), "qat": acc(qat_out), "sim_acc": acc(sim), "x": xte}


def test_ptq_loses_accuracy_and_qat_recovers_it(dw_results):
    r = dw_results
    print(f"digits DWNet: float {r['float']:.4f}, ptq int8 {r['ptq']:.4f}, qat int8 {r['qat']:.4f}, "
          f"qat torch simulation {r['sim_acc']:.4f}")
    assert r["ptq"] <= r["float"] - 0.02, r          # the int8 PTQ drop this net is built to show
    assert r["qat"] >= r["ptq"] + 0.01, r
    assert r["qat"] >= r["float"] - 0.02, r


def test_baked_model_is_plain_layers_on_the_int8_grid(dw_results):
    q = dw_results["model"]
    assert all(isinstance(getattr(q, n), nn.Identity) for n in ("b1", "b2", "b3"))
    for name in ("c1", "dw", "pw", "fc"):
        layer = q.get_submodule(name)
        assert type(layer) in (nn.Conv2d, nn.Linear)
        hint = hints_of(layer)
        assert hint == Hint(bits=8, per_channel=True, source="qat"), name
        w = layer.weight.detach().numpy()
        spec = weight_spec(w, hint)                        # the plan's spec: the codes are exact
        assert spec.per_channel and abs(spec.quantize(w)).max() <= 127
        back = spec.quantize(w).astype(np.float64) * np.asarray(spec.scale).reshape((-1,) + (1,) * (w.ndim - 1))
        np.testing.assert_allclose(back, w, rtol=1e-6, atol=0)
    for name in ("r1", "r2", "r3", "fc"):
        assert hints_of(q.get_submodule(name), "output").range is not None, name
    assert q.qat_input_range == (0.0, 1.0)


def test_the_artifact_uses_the_learned_ranges(dw_results):
    """Every graph value with a learned range carries exactly its int8 scale and zero point in the
    .tflite (no recalibration); the input's observed [0, 1] equals the learned input range."""
    check_learned_ranges(dw_results["model"], dw_results["art"], dw_results["x"])


def test_the_artifact_matches_the_torch_qat_simulation(dw_results):
    r = dw_results
    check_matches_simulation(r["model"], r["art"], r["x"], r["qat_out"], r["sim"], "QAT")
