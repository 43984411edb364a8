"""ternary / dorefa / kmeans: training-time weight quantizers against their papers' formulas.

Each method is checked against an independent numpy reference (TWN's Δ and α,
DoReFa's closed forms for k = 1, 2, 4, a numpy Lloyd iteration for k-means),
its gradient rule (straight-through, or summed member gradients for shared
centroids) by hand, and on the digits data set: an MLP with every layer
quantized, fine-tuned a few epochs from a float model, must stay within a
stated bound of the float accuracy.  The quantized models deploy to
``arm-fp32`` and the artifact computes what the torch model computes.
"""

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sdk
import sdk.plugins as p
from plugins.prune.magnitude import MagnitudePruner
from plugins.quantize import dorefa as dorefa_mod
from plugins.quantize import kmeans as kmeans_mod
from plugins.quantize import ternary as ternary_mod
from plugins.quantize.dorefa import DoReFa, dorefa_activation, dorefa_weight
from plugins.quantize.kmeans import KMeans, kmeans_1d, linear_init, wcss
from plugins.quantize.ternary import Ternary, quantized_layers, weight_quant
from sdk.errors import ConfigError, InputError, UnsupportedOpError
from sdk.masks import bake
from sdk.trainer import evaluate, make_loader

FLOAT_EPOCHS = 15
ALL = {"keep_first_last": False, "progress": False}   # quantize every layer of the MLP


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(),
                         nn.Linear(64, 10))


pytestmark = pytest.mark.usefixtures("one_thread")   # tiny models: one thread is faster


@pytest.fixture(scope="module")
def digits_float(digits):
    """A float MLP trained on digits, the training batches and the test batch."""
    from examples import digits as D

    xtr, ytr, xte, yte = digits
    model = D.train(mlp(), xtr, ytr.long(), epochs=FLOAT_EPOCHS, progress=False)
    data = list(make_loader(xtr, ytr, batch_size=64, seed=0))
    test = [(xte, yte.long())]
    return model, data, test, evaluate(model, test)


def linear_names(model):
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]


def latent(layer):
    return layer.parametrizations.weight.original.detach().double().numpy()


# --------------------------------------------------------------------------- ternary


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


# --------------------------------------------------------------------------- dorefa


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


# --------------------------------------------------------------------------- kmeans


def lloyd_np(v, c):
    """Reference Lloyd: full distance matrix, argmin (ties to the lower index), empty clusters stay."""
    c = c.copy()
    idx = np.abs(v[:, None] - c[None]).argmin(1)
    while True:
        for j in range(len(c)):
            if (idx == j).any():
                c[j] = v[idx == j].mean()
        new = np.abs(v[:, None] - c[None]).argmin(1)
        if (new == idx).all():
            return c, idx
        idx = new


@pytest.mark.parametrize("bits", [2, 4])
def test_kmeans_matches_numpy_lloyd_and_lowers_wcss(bits):
    torch.manual_seed(5)
    v = torch.cat([torch.randn(600) * 0.05, torch.randn(50) * 0.3])    # heavy tails, as trained weights
    init = linear_init(v, 2 ** bits)
    np.testing.assert_allclose(init.numpy(), np.linspace(float(v.min()), float(v.max()), 2 ** bits))
    c, idx, iters = kmeans_1d(v, init)
    c_ref, idx_ref = lloyd_np(v.double().numpy(), init.numpy())
    np.testing.assert_allclose(c.numpy(), c_ref, rtol=1e-12)
    np.testing.assert_array_equal(idx.numpy(), idx_ref)
    assert 1 < iters < 100
    init_wcss = wcss(v, init, kmeans_mod.assign(v, init))
    assert wcss(v, c, idx) < init_wcss


def test_kmeans_layer_is_a_nearest_centroid_codebook(digits_float):
    q = KMeans(bits=3, **ALL).apply(copy.deepcopy(digits_float[0]))
    for name in linear_names(q):
        layer = q.get_submodule(name)
        w, new = latent(layer), layer.weight.detach().double().numpy()
        centroids, index = weight_quant(layer).codebook()
        assert len(np.unique(new)) <= 8 and centroids.numel() == 8
        dist = np.abs(w[..., None] - centroids.double().numpy())
        np.testing.assert_allclose(np.abs(w - new), dist.min(-1), atol=1e-6)
        np.testing.assert_array_equal(new, centroids.double().numpy()[index.numpy()])


def test_kmeans_centroid_gradient_is_the_sum_of_member_gradients():
    lin = nn.Linear(3, 2, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[0.1, 0.9, -0.5], [0.2, 1.0, -0.4]]))
    KMeans(bits=1, keep_first_last=False).apply(nn.Sequential(lin))
    q = weight_quant(lin)
    # linear init [-0.5, 1.0], midpoint 0.25: {0.1, -0.5, 0.2, -0.4} and {0.9, 1.0}
    torch.testing.assert_close(q.centroids.detach(), torch.tensor([-0.15, 0.95]))
    assert q.index.tolist() == [[0, 1, 0], [0, 1, 0]]
    lin(torch.tensor([[1.0, 2.0, 3.0]])).sum().backward()
    # dL/dW_ij = x_j: centroid 0 collects 1 + 3 + 1 + 3, centroid 1 collects 2 + 2
    torch.testing.assert_close(q.centroids.grad, torch.tensor([8.0, 4.0]))
    torch.optim.SGD([q.centroids], lr=0.1).step()
    torch.testing.assert_close(lin.weight.detach(), torch.tensor([[-0.95, 0.55, -0.95], [-0.95, 0.55, -0.95]]))


def test_kmeans_keeps_the_zeros_of_a_pruned_layer(digits_float):
    model, data = digits_float[:2]
    pruned = MagnitudePruner(sparsity=0.6).apply(copy.deepcopy(model))
    zeros = {n: pruned.get_submodule(n).weight.detach() == 0 for n in linear_names(pruned)}
    q = bake(KMeans(bits=2, epochs=1, **ALL).apply(pruned, data[:5]))
    for name, was_zero in zeros.items():
        w = q.get_submodule(name).weight.detach()
        torch.testing.assert_close(w == 0, was_zero)
        assert int(was_zero.sum()) == round(0.6 * w.numel())
        assert len(torch.unique(w[w != 0])) <= 4


def test_kmeans_digits_4bit_after_centroid_finetuning(digits_float):
    model, data, test, float_acc = digits_float
    clustered = KMeans(bits=4, **ALL).apply(copy.deepcopy(model))
    q = KMeans(bits=4, epochs=5, lr=1e-3, **ALL).apply(copy.deepcopy(model), data)
    for name in linear_names(q):
        before, after = weight_quant(clustered.get_submodule(name)), weight_quant(q.get_submodule(name))
        assert torch.equal(before.index, after.index)                  # the assignment is kept
        assert not torch.equal(before.centroids, after.centroids)      # the centroids were trained
        assert len(torch.unique(q.get_submodule(name).weight.detach())) <= 16
    acc = evaluate(q, test)
    assert acc >= float_acc - 0.01, (acc, float_acc)


# --------------------------------------------------------------------------- deployment and errors


@pytest.mark.parametrize("method", [Ternary(progress=False), KMeans(bits=4, progress=False),
                                    DoReFa(weight_bits=2, activation_bits=32, progress=False)],
                         ids=["ternary", "kmeans", "dorefa-weights"])
def test_quantized_cnn_deploys_to_arm_fp32(small_cnn, digits, method):
    xte = digits[2][:16]
    model = type(method)(method.config, keep_first_last=False).apply(copy.deepcopy(small_cnn))
    art = sdk.deploy(model, "arm-fp32", (xte[:1],), progress=False)
    with torch.no_grad():
        expected = model(xte).numpy()
    got = np.concatenate([art.run(xte[i:i + 1], runner="reference")[0] for i in range(len(xte))])
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def test_dorefa_activations_have_no_arm_fp32_lowering(small_cnn, digits):
    model = DoReFa(progress=False).apply(copy.deepcopy(small_cnn))
    with pytest.raises(UnsupportedOpError, match="aten.round"):
        sdk.deploy(model, "arm-fp32", (digits[2][:1],), progress=False)


@pytest.fixture
def registered():
    """The three modules registered as plugins for one test (unless the lead already lists them)."""
    added = []
    for mod, cls in ((ternary_mod, Ternary), (dorefa_mod, DoReFa), (kmeans_mod, KMeans)):
        if cls.name not in p.names("quantizer"):
            added.append(p.register_plugin(mod, f"test-{cls.name}"))
    try:
        yield
    finally:
        for name in added:
            p.unregister_plugin(name)


def test_compress_bakes_the_shared_weights(registered, digits_float):
    model, data = digits_float[:2]
    recipe = {"stages": [{"method": "magnitude", "config": {"sparsity": 0.5}},
                         {"method": "kmeans", "config": {"bits": 2, "epochs": 1, **ALL}}]}
    small = sdk.compress(model, recipe, data=data[:5])
    for name in linear_names(small):
        w = small.get_submodule(name).weight
        assert not hasattr(small.get_submodule(name), "parametrizations")
        assert int((w == 0).sum()) == round(0.5 * w.numel()) and len(torch.unique(w[w != 0])) <= 4


def test_bad_options_and_data_are_named_errors(digits_float):
    model = digits_float[0]
    with pytest.raises(ConfigError, match="threshold_factor"):
        Ternary(threshold_factor=2.5)
    with pytest.raises(ConfigError, match="weight_bits"):
        DoReFa(weight_bits=9)
    with pytest.raises(ConfigError, match="quantize nothing"):
        DoReFa(weight_bits=32, activation_bits=32)
    with pytest.raises(ConfigError, match="bits"):
        KMeans(bits=0)
    with pytest.raises(ConfigError, match="valid names: 1, 3, 5"):
        KMeans(exclude=("fc",)).apply(copy.deepcopy(model))
    with pytest.raises(ConfigError, match="one weight quantizer"):
        KMeans(**ALL).apply(Ternary(**ALL).apply(copy.deepcopy(model)))
    with pytest.raises(InputError, match="labelled"):
        Ternary(**ALL).apply(copy.deepcopy(model), [torch.rand(4, 1, 8, 8)])
