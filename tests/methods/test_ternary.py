"""ternary (Li et al. 2016): weights equal TWN's Δ/α formula, the gradient is straight-through, a
digits MLP keeps three values per layer and its accuracy, the first and last layers stay float,
the result deploys to arm-fp32, and each layer hints its 3-value codebook to the plan."""

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sdk
from plugins.quantize.ternary import Ternary
from hint_checks import check_hints
from quant_helpers import ALL, digits_float, latent, linear_names  # noqa: F401 (fixture)
from sdk.encoding import Hint
from sdk.errors import ConfigError, InputError
from sdk.layer_quant import quantized_layers, weight_quant
from sdk.recipe import Recipe
from sdk.trainer import TrainConfig, evaluate

pytestmark = pytest.mark.usefixtures("one_thread")   # tiny models: one thread is faster


def twn_numpy(w, t=0.7):
    """TWN (Li et al. 2016): Δ = t·mean|W|, α = mean |W| over |W| > Δ, W_t ∈ {−α, 0, α}."""
    a = np.abs(w)
    delta = t * a.mean()
    keep = a > delta
    alpha = a[keep].mean()
    return alpha * np.sign(w) * keep, delta, alpha


@pytest.mark.parametrize("factor", [0.7, 0.4])
def test_ternary_weights_equal_the_twn_formula(factor):
    torch.manual_seed(1)
    conv = nn.Conv2d(8, 16, 3)
    w = conv.weight.detach().double().numpy()
    Ternary(threshold_factor=factor, keep_first_last=False).apply(nn.Sequential(conv))
    expected, delta, alpha = twn_numpy(w, factor)
    got = conv.weight.detach().double().numpy()
    np.testing.assert_array_equal(got == 0, np.abs(w) <= delta)          # the threshold Δ
    np.testing.assert_allclose(np.abs(got[got != 0]), alpha, rtol=1e-6)   # one α for the layer
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=0)
    assert len(torch.unique(conv.weight.detach())) == 3


def test_ternary_straight_through_gradient():
    torch.manual_seed(2)
    conv = nn.Conv2d(3, 4, 3)
    Ternary(keep_first_last=False).apply(nn.Sequential(conv))
    x, g = torch.randn(2, 3, 6, 6), torch.randn(2, 4, 4, 4)
    (conv(x) * g).sum().backward()
    # reference: the gradient with respect to the ternary weight itself, computed separately
    wt = conv.weight.detach().clone().requires_grad_(True)
    (F.conv2d(x, wt, conv.bias.detach()) * g).sum().backward()
    torch.testing.assert_close(conv.parametrizations.weight.original.grad, wt.grad)
    assert float(wt.grad.abs().sum()) > 0


def test_ternary_digits_keeps_three_values_and_accuracy(digits_float):
    model, data, test, float_acc = digits_float
    untrained = Ternary(**ALL).apply(copy.deepcopy(model))
    q = Ternary(epochs=5, lr=1e-3, **ALL).apply(copy.deepcopy(model), data)
    assert sorted(quantized_layers(q)) == linear_names(q)
    for name in linear_names(q):
        layer = q.get_submodule(name)
        _, _, alpha = twn_numpy(latent(layer))
        values = torch.unique(layer.weight.detach()).double().numpy()
        assert len(values) <= 3
        np.testing.assert_allclose(np.sort(np.abs(values))[-1], alpha, rtol=1e-5)
        assert set(np.round(values / alpha).tolist()) <= {-1.0, 0.0, 1.0}
    acc = evaluate(q, test)
    assert acc >= float_acc - 0.02, (acc, float_acc)
    assert acc >= evaluate(untrained, test)


def test_keep_first_last_leaves_the_edges_float(digits_float):
    q = Ternary(progress=False).apply(copy.deepcopy(digits_float[0]))
    assert sorted(quantized_layers(q)) == ["3"]
    assert weight_quant(q[1]) is None and weight_quant(q[5]) is None


def test_quantized_cnn_deploys_to_arm_fp32(small_cnn, digits):
    xte = digits[2][:16]
    model = Ternary(progress=False, keep_first_last=False).apply(copy.deepcopy(small_cnn))
    art = sdk.deploy(model, "arm-fp32", (xte[:1],), progress=False)
    with torch.no_grad():
        expected = model(xte).numpy()
    got = np.concatenate([art.run(xte[i:i + 1], runner="reference")[0] for i in range(len(xte))])
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def test_compress_hints_a_three_value_codebook(digits_float):
    """After sdk.compress (parametrization baked) each quantized layer says: at most 3 shared
    values, one set for the whole layer; the captured graph has the hint under the weight."""
    model, data = digits_float[:2]
    small = sdk.compress(model, {"stages": [{"method": "ternary", "config": {"epochs": 1}}]},
                         data=data[:3], progress=False)
    assert len(torch.unique(small[3].weight)) == 3 and not hasattr(small[3], "parametrizations")
    check_hints(small, data[0][0][:1], {"3": Hint(codebook=3, source="ternary")})


def test_training_fields_are_validated_and_used(digits_float):
    """The shared training fields (sdk.trainer.TrainConfig): a misspelt optimizer fails when the
    recipe is read; sgd with momentum trains the latent weights to a different result than adam."""
    assert issubclass(Ternary.Config, TrainConfig) and Ternary.Config().epochs == 5
    with pytest.raises(ConfigError, match="optimizer='adma' is not registered"):
        Recipe.from_yaml("stages:\n  - {method: ternary, config: {optimizer: adma}}\n")
    model, data = digits_float[:2]
    runs = {}
    for opt, options in (("adam", {}), ("sgd", {"momentum": 0.5})):
        q = Ternary(epochs=1, lr=1e-2, optimizer=opt, optimizer_options=options, **ALL)
        runs[opt] = latent(q.apply(copy.deepcopy(model), data[:4])[3])
    before = model[3].weight.detach().double().numpy()
    assert not np.array_equal(runs["adam"], runs["sgd"]) and not np.array_equal(runs["sgd"], before)


def test_bad_options_and_data_are_named_errors(digits_float):
    model = digits_float[0]
    with pytest.raises(ConfigError, match="threshold_factor"):
        Ternary(threshold_factor=2.5)
    with pytest.raises(InputError, match="labelled"):
        Ternary(**ALL).apply(copy.deepcopy(model), [torch.rand(4, 1, 8, 8)])
