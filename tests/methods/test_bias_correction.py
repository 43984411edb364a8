"""bias-correction (Nagel et al. 2019): the corrected bias equals b − E[(W̃ − W) x] from numpy (linear,
conv with and without bias), the mean output error of the quantized layer vanishes, and the int8
artifact's output bias shrinks; progress=False keeps the stage silent.  The analytic (data-free)
variant: E[ReLU(x)] for x ~ N(β, γ²) matches Monte Carlo, the corrected bias matches scipy's normal
formula, layers without BN statistics are skipped, and the int8 artifact's bias shrinks with data=None."""

import copy

import numpy as np
import pytest
import torch
from torch import nn

import sdk
from examples.models import make
from plugins.quantize.bias_correction import BiasCorrection
from plugins.quantize.bias_correction import expected_relu
from quant_helpers import PER_TENSOR_PTQ, run_artifact, sqnr_db
from sdk.errors import ConfigError, InputError
from sdk.torch_fold import fold_batch_norms


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


def test_bias_correction_shrinks_int8_output_bias(small_cnn, digits, tmp_path):
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


def test_bad_options_and_missing_data():
    with pytest.raises(ConfigError, match="weight_granularity"):
        BiasCorrection(weight_granularity="per-row")
    with pytest.raises(ConfigError, match="mode"):
        BiasCorrection(mode="exact")
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


# -- analytic (data-free) variant -------------------------------------------------------

@pytest.mark.parametrize("beta,gamma", [(0.0, 1.0), (1.5, 0.5), (-1.0, 2.0), (-3.0, 0.7), (4.0, 0.1)])
def test_expected_relu_matches_monte_carlo(beta, gamma):
    """β·Φ(β/γ) + γ·φ(β/γ) against the mean of ReLU over 4M Gaussian samples: within 5 standard errors
    (SE = std(ReLU(x))/√n ≤ γ/2000); the ReLU6 form E[ReLU(x)] − E[ReLU(x − 6)] likewise."""
    x = np.random.default_rng(0).normal(beta, gamma, 4_000_000)
    for f, analytic in ((lambda v: np.maximum(v, 0), expected_relu(torch.tensor(beta), torch.tensor(gamma))),
                        (lambda v: np.clip(v, 0, 6), expected_relu(torch.tensor(beta), torch.tensor(gamma))
                         - expected_relu(torch.tensor(beta - 6), torch.tensor(gamma)))):
        y = f(x)
        se = y.std() / np.sqrt(len(y))
        assert abs(float(analytic) - y.mean()) < 5 * se + 1e-12, (float(analytic), y.mean(), se)


def bn_relu_conv(groups: int, relu6: bool = False) -> nn.Module:
    torch.manual_seed(3)
    net = nn.Sequential(nn.BatchNorm2d(8), nn.ReLU6() if relu6 else nn.ReLU(), nn.Conv2d(8, 6, 3, groups=groups))
    with torch.no_grad():
        net[0].weight.uniform_(-1.5, 1.5)          # negative γ: the std is |γ|
        net[0].bias.uniform_(-1.0, 2.0)
        net[2].weight.mul_(torch.logspace(-2, 0, 6)[:, None, None, None])
    return net.eval()


@pytest.mark.parametrize("groups,relu6", [(1, False), (2, False), (1, True)])
def test_analytic_conv_matches_scipy_formula(groups, relu6):
    """BN → ReLU(6) → conv: b' = b − Σ_{c, taps} (W̃ − W)[o, c, taps] · E[x_c], E from scipy's normal pdf/cdf;
    no data passed."""
    from scipy.stats import norm

    net = bn_relu_conv(groups, relu6)
    beta, gamma = (t.detach().double().numpy() for t in (net[0].bias, net[0].weight))
    std = np.abs(gamma)

    def e_relu(m):
        return m * norm.cdf(m / std) + std * norm.pdf(m / std)

    ex = e_relu(beta) - (e_relu(beta - 6) if relu6 else 0)
    w, b = net[2].weight.detach().double().numpy().copy(), net[2].bias.detach().double().numpy().copy()
    taps = (np_fake_quant(w, False) - w).sum((2, 3))                       # [6, 8 / groups]
    ex_per_out = np.repeat(ex.reshape(groups, -1), 6 // groups, axis=0)    # the inputs each output reads
    expected = b - (taps * ex_per_out).sum(1)
    bc = BiasCorrection(mode="analytic", weight_granularity="per-tensor")
    bc.apply(net, None)
    assert bc.skipped == []
    np.testing.assert_allclose(net[2].bias.detach().numpy(), expected, rtol=1e-5, atol=1e-7)


def test_analytic_skips_layers_without_bn_statistics():
    """The input layer (model input) and a linear layer behind a max pool keep their bias; a linear layer
    behind BN → ReLU → flatten reads each channel's E[x] repeated over its positions; a model where nothing
    qualifies is refused with the way out named."""
    torch.manual_seed(4)
    net = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                        nn.Linear(4 * 25, 3)).eval()
    w = net[4].weight.detach().double().numpy().copy()
    b = net[4].bias.detach().double().numpy().copy()
    ex = expected_relu(net[1].bias.detach(), net[1].weight.detach()).numpy()
    folded = copy.deepcopy(net)
    fold_batch_norms(folded)
    bc = BiasCorrection(mode="analytic", weight_granularity="per-tensor")
    bc.apply(net)
    assert bc.skipped == ["0"] and set(bc.shifts) == {"4"}
    assert torch.equal(net[0].bias.detach(), folded[0].bias.detach())          # BN folded, not corrected
    np.testing.assert_allclose(net[4].bias.detach().numpy(), b - (np_fake_quant(w, False) - w) @ np.repeat(ex, 25),
                               rtol=1e-5, atol=1e-7)
    lenet, _ = make("lenet")        # every BN → ReLU → max pool
    with pytest.raises(InputError, match="mode='empirical'"):
        BiasCorrection(mode="analytic").apply(lenet)


def bn_net(seed: int = 0) -> nn.Module:
    """Three conv → BN → ReLU blocks, average pool, linear; BN γ spanning two decades (so per-tensor folded
    weights round the small channels badly) and β > 0; running statistics measured on N(0, 1) inputs, so
    every BN output really is ~N(β, γ²) on such inputs."""
    torch.manual_seed(seed)

    def block(cin, cout):
        return [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout, momentum=None), nn.ReLU()]

    net = nn.Sequential(*block(3, 16), *block(16, 32), *block(32, 32), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Linear(32, 10))
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.logspace(-1.5, 0.5, m.num_features)[torch.randperm(m.num_features)])
                m.bias.uniform_(0.0, 1.0)
        net.train()
        for _ in range(20):
            net(torch.randn(64, 3, 12, 12))
    return net.eval()


@pytest.mark.parametrize("granularity", ["per-tensor", "per-channel"])
def test_analytic_shrinks_int8_output_bias_without_data(granularity, tmp_path):
    """bn_net to arm-int8, data=None: the mean output bias vs the float model on 256 random inputs shrinks
    with analytic bias-correction before ptq (measured per-tensor 5.5e-3 → 1.6e-3, SQNR 33.4 → 39.5 dB;
    per-channel, ptq's default, 1.4e-3 → 8.2e-4, 40.9 → 41.9 dB) and the SQNR rises."""
    net = bn_net()
    x = torch.randn(256, 3, 12, 12, generator=torch.Generator().manual_seed(5))
    cal = [torch.randn(32, 3, 12, 12, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    with torch.no_grad():
        want = net(x).numpy()
    ptq = {"method": "ptq", "config": {"weight_granularity": granularity, "progress": False}}
    bc = {"method": "bias-correction", "config": {"mode": "analytic", "weight_granularity": granularity}}
    results = {}
    for label, stages in (("plain", []), ("analytic", [bc])):
        art = sdk.deploy(net, "arm-int8", (x[:1],), calibration=cal, data=None, progress=False,
                         output=tmp_path / label, recipe={"stages": stages + [ptq]})
        got = run_artifact(art, x)
        results[label] = (float(np.abs((got - want).mean(0)).mean()), sqnr_db(want, got))
    print(granularity, "mean |output bias|, SQNR:", results)
    assert results["analytic"][0] < results["plain"][0] / (2.5 if granularity == "per-tensor" else 1.3)
    assert results["analytic"][1] > results["plain"][1] + (5.0 if granularity == "per-tensor" else 0.5)
