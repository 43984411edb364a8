"""dorefa (Zhou et al. 2016): weights and activations equal DoReFa's closed forms for k = 1, 2, 4,
only the rounding is straight-through, a 4-bit digits MLP recovers its accuracy by fine-tuning,
weights-only models deploy to arm-fp32 (quantized activations are refused by name), and each
layer hints its k-bit weight grid to the plan."""

import copy

import numpy as np
import pytest
import torch
from torch import nn

import sdk
from plugins.quantize.dorefa import DoReFa, dorefa_activation, dorefa_weight
from hint_checks import check_hints
from quant_helpers import ALL, digits_float, latent, linear_names  # noqa: F401 (fixture)
from sdk.encoding import Hint
from sdk.errors import ConfigError, UnsupportedOpError
from sdk.trainer import evaluate

pytestmark = pytest.mark.usefixtures("one_thread")   # tiny models: one thread is faster


def quantize_k_np(x, k):
    n = 2 ** k - 1
    return np.round(n * x) / n


def dorefa_weight_np(w, k):
    """DoReFa-Net eq. 9 (k > 1) and eq. 7 (k = 1, sign(0) = +1)."""
    if k == 1:
        return np.abs(w).mean() * np.where(w < 0, -1.0, 1.0)
    t = np.tanh(w)
    return 2 * quantize_k_np(t / (2 * np.abs(t).max()) + 0.5, k) - 1


@pytest.mark.parametrize("k", [1, 2, 4])
def test_dorefa_weights_equal_the_closed_form(k):
    torch.manual_seed(k)
    w = torch.randn(32, 16) * 0.5
    got = dorefa_weight(w, k).double().numpy()
    np.testing.assert_allclose(got, dorefa_weight_np(w.double().numpy(), k), atol=1e-6)
    assert len(np.unique(got)) <= 2 ** k
    if k > 1:   # the levels lie on the grid 2j/(2^k − 1) − 1
        j = (got + 1) / 2 * (2 ** k - 1)
        np.testing.assert_allclose(j, np.round(j), atol=1e-5)


@pytest.mark.parametrize("k", [1, 2, 4])
def test_dorefa_activations_equal_the_closed_form_with_identity_gradient_inside(k):
    torch.manual_seed(k)
    x = (torch.rand(1000) * 1.6 - 0.3).requires_grad_(True)
    y = dorefa_activation(x, k)
    xn = x.detach().double().numpy()
    np.testing.assert_allclose(y.detach().double().numpy(), quantize_k_np(np.clip(xn, 0, 1), k), atol=1e-6)
    assert len(torch.unique(y.detach())) <= 2 ** k
    y.sum().backward()
    inside = (xn > 0) & (xn < 1)
    np.testing.assert_array_equal(x.grad.numpy(), inside.astype(np.float32))


def test_dorefa_weight_gradient_is_straight_through_for_round_only():
    torch.manual_seed(3)
    w = (torch.randn(8, 5) * 0.7).requires_grad_(True)
    g = torch.randn(8, 5)
    (dorefa_weight(w, 2) * g).sum().backward()
    # the same formula without the rounding: 2·(tanh(w)/(2 max|tanh w|) + 1/2) − 1
    v = w.detach().clone().requires_grad_(True)
    (torch.tanh(v) / torch.tanh(v).abs().max() * g).sum().backward()
    torch.testing.assert_close(w.grad, v.grad)
    w.grad = None
    (dorefa_weight(w, 1) * g).sum().backward()   # k = 1: the whole quantizer is straight-through
    torch.testing.assert_close(w.grad, g)


def test_dorefa_layer_quantizes_its_input_and_weight():
    torch.manual_seed(4)
    lin = nn.Linear(6, 3)
    w = lin.weight.detach().double().numpy()
    b = lin.bias.detach().double().numpy()
    DoReFa(weight_bits=2, activation_bits=2, keep_first_last=False).apply(nn.Sequential(lin))
    x = torch.randn(5, 6)
    with torch.no_grad():
        y = lin(x).double().numpy()
    xq = quantize_k_np(np.clip(x.double().numpy(), 0, 1), 2)
    np.testing.assert_allclose(y, xq @ dorefa_weight_np(w, 2).T + b, atol=1e-5)


def test_dorefa_digits_4bit_accuracy(digits_float):
    model, data, test, float_acc = digits_float
    cfg = dict(weight_bits=4, activation_bits=4, **ALL)
    untrained = DoReFa(**cfg).apply(copy.deepcopy(model))
    q = DoReFa(epochs=5, lr=1e-3, **cfg).apply(copy.deepcopy(model), data)
    for name in linear_names(q):
        layer = q.get_submodule(name)
        assert len(torch.unique(layer.weight.detach())) <= 16
        torch.testing.assert_close(layer.weight.detach().double(),
                                   torch.from_numpy(dorefa_weight_np(latent(layer), 4)), atol=1e-6, rtol=0)
    acc, acc0 = evaluate(q, test), evaluate(untrained, test)
    assert acc >= float_acc - 0.02, (acc, float_acc)
    assert acc >= acc0 + 0.1, (acc, acc0)      # clipping to [0, 1] needs the fine-tuning


def test_weights_only_cnn_deploys_to_arm_fp32(small_cnn, digits):
    xte = digits[2][:16]
    model = DoReFa(weight_bits=2, activation_bits=32, progress=False,
                   keep_first_last=False).apply(copy.deepcopy(small_cnn))
    art = sdk.deploy(model, "arm-fp32", (xte[:1],), progress=False)
    with torch.no_grad():
        expected = model(xte).numpy()
    got = np.concatenate([art.run(xte[i:i + 1], runner="reference")[0] for i in range(len(xte))])
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def test_dorefa_activations_have_no_arm_fp32_lowering(small_cnn, digits):
    model = DoReFa(progress=False).apply(copy.deepcopy(small_cnn))
    with pytest.raises(UnsupportedOpError, match="quantize_uniform"):
        sdk.deploy(model, "arm-fp32", (digits[2][:1],), progress=False)


@pytest.mark.parametrize("bits", [1, 3])
def test_compress_hints_the_weight_bits(digits_float, bits):
    """After sdk.compress each layer with quantized weights hints Hint(bits=k): at most 2^k levels
    (measured on the baked weight), under its weight constant in the captured graph too."""
    model, data = digits_float[:2]
    recipe = {"stages": [{"method": "dorefa", "config": {"weight_bits": bits, "activation_bits": 32,
                                                         "epochs": 1, **ALL}}]}
    small = sdk.compress(model, recipe, data=data[:3], progress=False)
    for name in linear_names(small):
        assert len(torch.unique(small.get_submodule(name).weight)) <= 2 ** bits
    check_hints(small, data[0][0][:1], {n: Hint(bits=bits, source="dorefa") for n in linear_names(small)})


def test_activations_only_leave_the_weights_unhinted(small_cnn):
    model = DoReFa(weight_bits=32, activation_bits=4, **ALL).apply(copy.deepcopy(small_cnn))
    check_hints(model, torch.rand(1, 1, 8, 8), {})


def test_bad_options_are_named_errors():
    with pytest.raises(ConfigError, match="weight_bits"):
        DoReFa(weight_bits=9)
    with pytest.raises(ConfigError, match="quantize nothing"):
        DoReFa(weight_bits=32, activation_bits=32)
