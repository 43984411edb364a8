"""bias-correction (Nagel et al. 2019): the corrected bias equals b − E[(W̃ − W) x] from numpy (linear,
conv with and without bias), the mean output error of the quantized layer vanishes, and the int8
artifact's output bias shrinks; progress=False keeps the stage silent."""

import copy

import numpy as np
import pytest
import torch
from torch import nn

import sdk
from examples.models import make
from plugins.quantize.bias_correction import BiasCorrection
from quant_helpers import PER_TENSOR_PTQ, run_artifact, sqnr_db
from sdk.errors import ConfigError, InputError


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
