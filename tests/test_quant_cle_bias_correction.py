"""cle and bias-correction (Nagel et al. 2019): CLE keeps the function and equalizes per-channel
ranges to the closed form; bias correction removes E[(W̃ − W) x] exactly; both help per-tensor int8."""

import copy

import numpy as np
import pytest
import torch
from torch import nn

import sdk
import sdk.plugins as P
from examples.models import make
from plugins.quantize import bias_correction as bc_module
from plugins.quantize import cle as cle_module
from plugins.quantize.bias_correction import BiasCorrection
from plugins.quantize.cle import CLE
from sdk.errors import ConfigError, InputError


@pytest.fixture
def registered():
    """Register both modules for recipes (unless the build already lists them); unregister in finally."""
    names = []
    for mod, method in ((cle_module, "cle"), (bc_module, "bias-correction")):
        if method not in P.names("quantizer"):
            names.append(P.register_plugin(mod, f"test-{method}"))
    try:
        yield
    finally:
        for name in names:
            P.unregister_plugin(name)


def relu6_to_relu(model: nn.Module, names=None) -> nn.Module:
    """Replace the ``nn.ReLU6`` modules called ``names`` (all when None) by ``nn.ReLU``."""
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            full = f"{parent_name}.{child_name}" if parent_name else child_name
            if isinstance(child, nn.ReLU6) and (names is None or full in names):
                setattr(parent, child_name, nn.ReLU())
    return model


def out_ranges(layer: nn.Module) -> torch.Tensor:
    """max |w| per output channel."""
    w = layer.weight.detach()
    return w.abs().reshape(w.shape[0], -1).amax(1)


def in_ranges(layer: nn.Module, channels: int) -> torch.Tensor:
    """max |w| over everything that reads input channel c (depthwise: its own filter; linear: its feature slice)."""
    w = layer.weight.detach().abs()
    if isinstance(layer, nn.Linear):
        return w.reshape(w.shape[0], channels, -1).amax((0, 2))
    if layer.groups == 1:
        return w.transpose(0, 1).reshape(channels, -1).amax(1)
    assert layer.groups == channels == w.shape[0]
    return w.reshape(channels, -1).amax(1)


def pair_mismatch(model: nn.Module, pairs) -> float:
    """Largest relative |r1_i − r2_i| over the pairs' shared channels."""
    worst = 0.0
    for a, b in pairs:
        first, second = model.get_submodule(a), model.get_submodule(b)
        r1 = out_ranges(first)
        r2 = in_ranges(second, r1.numel())
        worst = max(worst, float(((r1 - r2).abs() / torch.maximum(r1, r2)).max()))
    return worst


MODELS = {"lenet": ({}, (16, 1, 8, 8), 3),
          "mobilenetv2": ({"width_mult": 0.25}, (4, 3, 16, 16), 35),
          "dscnn": ({"width": 16, "blocks": 2}, (4, 1, 49, 10), 5)}


@pytest.mark.parametrize("name", list(MODELS))
def test_cle_keeps_function_and_equalizes(name):
    """Same outputs (relative 1e-4) as the float model (MobileNetV2: as its ReLU6→ReLU twin, the paper's
    choice), every BN folded away, and r1_i == r2_i for every pair after convergence."""
    kwargs, shape, n_pairs = MODELS[name]
    model, _ = make(name, **kwargs)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    relu6 = "relu" if name == "mobilenetv2" else "skip"
    cle = CLE(relu6=relu6)
    eq = cle.apply(copy.deepcopy(model))
    reference = relu6_to_relu(copy.deepcopy(model), cle.replaced_relu6)
    with torch.no_grad():
        want, got = reference(x), eq(x)
    assert float((want - got).abs().max() / want.abs().max()) < 1e-4
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in eq.modules())
    assert len(cle.pairs) == n_pairs
    if name == "mobilenetv2":   # all but the stem's ReLU6, which feeds a residual block (two consumers)
        assert set(cle.replaced_relu6) == {n for n, m in model.named_modules() if isinstance(m, nn.ReLU6)} - {
            "features.2"}
    folded = copy.deepcopy(model)
    cle_module.fold_batch_norms(folded)
    assert pair_mismatch(relu6_to_relu(folded), cle.pairs) > 0.5      # unequal before ...
    assert pair_mismatch(eq, cle.pairs) < 1e-4                         # ... equalized after


def test_cle_relu6_skip_is_exact_on_mobilenetv2():
    """Default ReLU6 handling leaves pairs across a ReLU6 alone: only the identity-joined pairs are scaled,
    and the original ReLU6 model's function is kept even where activations clip at 6."""
    model, _ = make("mobilenetv2", width_mult=0.25)
    x = 20 * torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(2))   # plenty of clipping
    cle = CLE()
    eq = cle.apply(copy.deepcopy(model))
    as_relu = relu6_to_relu(copy.deepcopy(model))
    with torch.no_grad():
        for part in (lambda m: m.features[:6](x), lambda m: m(x)):
            want, got = part(model), part(eq)
            assert float((want - got).abs().max() / want.abs().max()) < 1e-4
        hidden = model.features[:6](x)
        assert float((as_relu.features[:6](x) - hidden).abs().max() / hidden.abs().max()) > 0.5  # clipping matters
    assert cle.pairs == [("features.19.block.6", "features.20")]
    assert sum(isinstance(m, nn.ReLU6) for m in eq.modules()) == sum(isinstance(m, nn.ReLU6) for m in model.modules())


def test_cle_one_pair_closed_form():
    """Linear → ReLU → Linear: one sweep gives W1/s, b1/s, W2·s with s = sqrt(r1·r2)/r2 (numpy)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    with torch.no_grad():
        net[0].weight.mul_(torch.logspace(-2, 2, 5)[:, None])
    w1, b1, w2 = (t.detach().double().numpy().copy() for t in (net[0].weight, net[0].bias, net[2].weight))
    r1, r2 = np.abs(w1).max(1), np.abs(w2).max(0)
    s = np.sqrt(r1 * r2) / r2
    cle = CLE()
    cle.apply(net)
    assert cle.sweeps == 2          # the second sweep finds every s_i == 1
    np.testing.assert_allclose(net[0].weight.detach().numpy(), w1 / s[:, None], rtol=1e-6)
    np.testing.assert_allclose(net[0].bias.detach().numpy(), b1 / s, rtol=1e-6)
    np.testing.assert_allclose(net[2].weight.detach().numpy(), w2 * s[None, :], rtol=1e-6)
    np.testing.assert_allclose(out_ranges(net[0]).numpy(), np.sqrt(r1 * r2), rtol=1e-6)


def imbalance_lenet(model: nn.Module, seed: int = 0) -> nn.Module:
    """Scale channel i of each pair by a_i ∈ [1e-2, 1e2] on one side and 1/a_i on the other: the function is
    unchanged (ReLU and max-pool commute with positive scales) but per-channel ranges span four decades."""
    rng = np.random.default_rng(seed)
    f, c = model.features, model.classifier
    with torch.no_grad():
        a = torch.from_numpy(10 ** rng.uniform(-2, 2, 16)).float()
        f[1].weight.mul_(a), f[1].bias.mul_(a), f[4].weight.div_(a[None, :, None, None])
        a = torch.from_numpy(10 ** rng.uniform(-2, 2, 32)).float()
        f[5].weight.mul_(a), f[5].bias.mul_(a), c[1].weight.div_(a.repeat_interleave(4)[None])
        a = torch.from_numpy(10 ** rng.uniform(-2, 2, 64)).float()
        c[1].weight.mul_(a[:, None]), c[1].bias.mul_(a), c[3].weight.div_(a[None])
    return model


def sqnr_db(ref: np.ndarray, approx: np.ndarray) -> float:
    return float(10 * np.log10((ref ** 2).sum() / ((approx - ref) ** 2).sum()))


def run_artifact(art, x: torch.Tensor) -> np.ndarray:
    return np.concatenate([art.run(x[i:i + 1])[0] for i in range(len(x))])


PER_TENSOR_PTQ = {"method": "ptq", "config": {"weight_granularity": "per-tensor", "progress": False}}


def test_cle_recovers_per_tensor_int8_on_imbalanced_lenet(digits, registered, tmp_path):
    """arm-int8 with per-tensor weights: the imbalanced LeNet collapses, CLE before ptq restores it to within
    2 dB of the balanced original (measured: 11.5 dB → 46.8 dB, original 46.8 dB); adding bias correction
    (recipe cle → bias-correction → ptq) gains a little more."""
    xtr, _, xte, _ = digits
    cal, test = [xtr[i:i + 32] for i in range(0, 256, 32)], xte[:48]
    model, _ = make("lenet")
    imb = imbalance_lenet(copy.deepcopy(model))
    with torch.no_grad():
        want = model(test).numpy()
        assert np.abs(imb(test).numpy() - want).max() < 1e-5

    def deploy(m, stages, out):
        return sdk.deploy(m, "arm-int8", (test[:1],), calibration=cal, data=cal, progress=False,
                          output=tmp_path / out, recipe={"stages": stages + [PER_TENSOR_PTQ]})

    plain = sqnr_db(want, run_artifact(deploy(imb, [], "imb"), test))
    with_cle = sqnr_db(want, run_artifact(deploy(imb, [{"method": "cle"}], "cle"), test))
    original = sqnr_db(want, run_artifact(deploy(model, [], "orig"), test))
    bc = {"method": "bias-correction", "config": {"weight_granularity": "per-tensor", "progress": False}}
    with_both = sqnr_db(want, run_artifact(deploy(imb, [{"method": "cle"}, bc], "both"), test))
    print(f"per-tensor int8 SQNR: imbalanced {plain:.1f} dB, +cle {with_cle:.1f} dB, +cle+bias-correction "
          f"{with_both:.1f} dB, original {original:.1f} dB")
    assert plain < 20.0
    assert with_cle > plain + 25.0
    assert with_cle > original - 2.0
    assert with_both > with_cle          # the paper's full DFQ pipeline: CLE, then bias correction


def per_tensor_weight_sqnr(model: nn.Module, x: torch.Tensor) -> float:
    """Output SQNR when every conv/linear weight is int8 per-tensor quantized (numpy formula), rest float."""
    q = copy.deepcopy(model)
    with torch.no_grad():
        for m in q.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                w = m.weight.numpy()
                s = np.abs(w).max() / 127.0
                m.weight.copy_(torch.from_numpy(np.clip(np.round(w / s), -127, 127) * s))
        return sqnr_db(model(x).numpy(), q(x).numpy())


def test_cle_improves_weight_sqnr_on_imbalanced_mobilenetv2():
    """MobileNetV2 whose depthwise channels span four decades (scaled against the projection conv,
    function kept): per-tensor weight quantization SQNR improves by more than 15 dB after CLE."""
    model, _ = make("mobilenetv2", width_mult=0.25)
    model = relu6_to_relu(model)
    cle_module.fold_batch_norms(model)
    rng = np.random.default_rng(0)
    with torch.no_grad():
        for block in model.features[3:-3]:
            dw, pw = block.block[-5], block.block[-2]
            a = torch.from_numpy(10 ** rng.uniform(-2, 2, dw.out_channels)).float()
            dw.weight.mul_(a[:, None, None, None]), dw.bias.mul_(a), pw.weight.div_(a[None, :, None, None])
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    before = per_tensor_weight_sqnr(model, x)
    eq = CLE().apply(copy.deepcopy(model))
    after = per_tensor_weight_sqnr(eq, x)
    print(f"MobileNetV2 per-tensor weight SQNR: {before:.1f} dB → {after:.1f} dB after CLE")
    assert after > before + 15.0


# ---------------------------------------------------------------------------
# bias correction
# ---------------------------------------------------------------------------

def np_fake_quant(w: np.ndarray, per_channel: bool) -> np.ndarray:
    """Symmetric narrow int8 (ptq's weights) in numpy."""
    amax = np.abs(w.reshape(w.shape[0], -1)).max(1) if per_channel else np.abs(w).max()
    s = (np.asarray(amax, np.float64) / 127.0).astype(np.float32).astype(np.float64)
    s = s.reshape((-1,) + (1,) * (w.ndim - 1)) if per_channel else s
    return np.clip(np.round(w / s), -127, 127) * s


@pytest.mark.parametrize("granularity", ["per-tensor", "per-channel"])
def test_bias_correction_linear_matches_numpy(granularity):
    """b' = b − (W̃ − W)·mean(x), with W̃ from the numpy int8 formula."""
    torch.manual_seed(0)
    layer = nn.Linear(16, 8)
    batches = [torch.rand(32, 16) + 0.5 for _ in range(3)]
    w, b = layer.weight.detach().double().numpy().copy(), layer.bias.detach().double().numpy().copy()
    mean_x = torch.cat(batches).double().mean(0).numpy()
    expected = b - (np_fake_quant(w.astype(np.float32).astype(np.float64), granularity == "per-channel") - w) @ mean_x
    BiasCorrection(weight_granularity=granularity, progress=False).apply(nn.Sequential(layer), batches)
    np.testing.assert_allclose(layer.bias.detach().numpy(), expected, rtol=1e-5, atol=1e-7)


def test_bias_correction_conv_without_bias_matches_numpy():
    """A bias-less conv gains b' = −(W̃ − W)·mean patch (numpy sliding windows over every position)."""
    torch.manual_seed(1)
    conv = nn.Conv2d(3, 4, 3, bias=False)
    batches = [torch.rand(8, 3, 7, 7) for _ in range(2)]
    w = conv.weight.detach().double().numpy().copy()
    x = torch.cat(batches).double().numpy()
    patches = np.lib.stride_tricks.sliding_window_view(x, (3, 3), axis=(2, 3))    # N, C, 5, 5, 3, 3
    mean_patch = patches.mean(axis=(0, 2, 3))                                     # C, 3, 3
    expected = -((np_fake_quant(w, False) - w).reshape(4, -1) @ mean_patch.reshape(-1))
    BiasCorrection(weight_granularity="per-tensor", progress=False).apply(nn.Sequential(conv), batches)
    np.testing.assert_allclose(conv.bias.detach().numpy(), expected, rtol=1e-5, atol=1e-8)


def test_bias_correction_removes_mean_output_error():
    """A conv on post-ReLU inputs: the mean per-channel output error of the weight-quantized layer on
    held-out data drops by more than 20x after correction."""
    torch.manual_seed(2)
    conv = nn.Conv2d(8, 16, 3, padding=1)
    with torch.no_grad():
        conv.weight.mul_(torch.logspace(-1.5, 0.5, 16)[:, None, None, None])   # small filters round badly
    data = [torch.relu(torch.randn(16, 8, 8, 8) + 0.5) for _ in range(4)]
    held_out = torch.relu(torch.randn(64, 8, 8, 8, generator=torch.Generator().manual_seed(9)) + 0.5)
    float_layer = copy.deepcopy(conv)
    corrected = BiasCorrection(weight_granularity="per-tensor", progress=False).apply(nn.Sequential(conv), data)[0]

    def mean_error(layer):
        q = copy.deepcopy(layer)
        with torch.no_grad():
            q.weight.copy_(torch.from_numpy(np_fake_quant(q.weight.numpy().astype(np.float64), False)))
            return float((q(held_out) - float_layer(held_out)).mean((0, 2, 3)).abs().mean())

    before, after = mean_error(float_layer), mean_error(corrected)
    print(f"mean output error of the quantized conv: {before:.2e} → {after:.2e}")
    assert after < before / 20


def test_bias_correction_shrinks_int8_output_bias(small_cnn, digits, registered, tmp_path):
    """SmallCNN deployed to arm-int8 with per-tensor weights: the mean output bias vs the float model
    shrinks by more than 2x with bias-correction before ptq (measured ~3x) and the SQNR rises."""
    xtr, _, xte, _ = digits
    cal, test = [xtr[i:i + 32] for i in range(0, 256, 32)], xte[:96]
    with torch.no_grad():
        want = small_cnn(test).numpy()
    bc = {"method": "bias-correction", "config": {"weight_granularity": "per-tensor", "progress": False}}
    results = {}
    for label, stages in (("plain", []), ("corrected", [bc])):
        art = sdk.deploy(small_cnn, "arm-int8", (test[:1],), calibration=cal, data=cal, progress=False,
                         output=tmp_path / label, recipe={"stages": stages + [PER_TENSOR_PTQ]})
        got = run_artifact(art, test)
        results[label] = (float(np.abs((got - want).mean(0)).mean()), sqnr_db(want, got))
    print("mean |output bias|, SQNR:", results)
    assert results["corrected"][0] < results["plain"][0] / 2
    assert results["corrected"][1] > results["plain"][1]


# ---------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------

def test_bad_options_and_missing_data():
    with pytest.raises(ConfigError, match="relu6"):
        CLE(relu6="clip")
    with pytest.raises(ConfigError, match="max_sweeps"):
        CLE(max_sweeps=0)
    with pytest.raises(ConfigError, match="weight_granularity"):
        BiasCorrection(weight_granularity="per-row")
    with pytest.raises(InputError, match="data="):
        BiasCorrection().apply(nn.Sequential(nn.Linear(2, 2)), None)
    with pytest.raises(InputError, match="no data batches"):
        BiasCorrection(progress=False).apply(nn.Sequential(nn.Linear(2, 2)), [])


def test_deploy_progress_false_silences_torch_side_stages(tmp_path, capsys):
    model, x = make("lenet")
    cal = [torch.randn(4, *x.shape[1:]) for _ in range(3)]
    sdk.deploy(model, "arm-int8", (x,), calibration=cal, data=cal, output=tmp_path / "a", progress=False,
               recipe={"stages": [{"method": "bias-correction"}, {"method": "ptq"}]})
    assert "bias correction" not in capsys.readouterr().err
