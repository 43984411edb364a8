"""kmeans (Han et al. 2016, trained quantization): clustering equals a numpy Lloyd iteration,
each layer is a nearest-centroid codebook whose centroid gradients are the summed member
gradients, a pruned layer keeps its zeros, centroid fine-tuning keeps digits accuracy, the result
deploys to arm-fp32, and each layer hints its k-value codebook (plus 0 when pruned) to the plan."""

import copy

import numpy as np
import pytest
import torch
from torch import nn

import sdk
from plugins.prune.magnitude import MagnitudePruner
from plugins.quantize import kmeans as kmeans_mod
from plugins.quantize.kmeans import KMeans, kmeans_1d, linear_init, wcss
from plugins.quantize.ternary import Ternary
from hint_checks import check_hints
from quant_helpers import ALL, digits_float, latent, linear_names  # noqa: F401 (fixture)
from sdk.encoding import Hint, Sparsity
from sdk.errors import ConfigError
from sdk.layer_quant import weight_quant
from sdk.masks import bake
from sdk.trainer import evaluate

pytestmark = pytest.mark.usefixtures("one_thread")   # tiny models: one thread is faster


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


def test_quantized_cnn_deploys_to_arm_fp32(small_cnn, digits):
    xte = digits[2][:16]
    model = KMeans(bits=4, progress=False, keep_first_last=False).apply(copy.deepcopy(small_cnn))
    art = sdk.deploy(model, "arm-fp32", (xte[:1],), progress=False)
    with torch.no_grad():
        expected = model(xte).numpy()
    got = np.concatenate([art.run(xte[i:i + 1], runner="reference")[0] for i in range(len(xte))])
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def test_compress_bakes_the_shared_weights(digits_float):
    model, data = digits_float[:2]
    recipe = {"stages": [{"method": "magnitude", "config": {"sparsity": 0.5}},
                         {"method": "kmeans", "config": {"bits": 2, "epochs": 1, **ALL}}]}
    small = sdk.compress(model, recipe, data=data[:5])
    for name in linear_names(small):
        w = small.get_submodule(name).weight
        assert not hasattr(small.get_submodule(name), "parametrizations")
        assert int((w == 0).sum()) == round(0.5 * w.numel()) and len(torch.unique(w[w != 0])) <= 4
    # the pruned, shared layers hint both: at most 4 centroids and the zero, unstructured zeros
    pruned = Hint(codebook=5, sparsity=Sparsity("unstructured"), source="mask+kmeans")
    check_hints(small, data[0][0][:1], {n: pruned for n in linear_names(small)})


def test_compress_hints_the_codebook_size(digits_float):
    """Unpruned: Hint(codebook=2^bits), after sdk.compress and under the weight in the captured graph;
    the baked weight indeed holds that many values."""
    model, data = digits_float[:2]
    small = sdk.compress(model, {"stages": [{"method": "kmeans", "config": {"bits": 3, "epochs": 1}}]},
                         data=data[:3], progress=False)
    assert len(torch.unique(small[3].weight)) == 8
    check_hints(small, data[0][0][:1], {"3": Hint(codebook=8, source="kmeans")})


def test_bad_options_and_data_are_named_errors(digits_float):
    model = digits_float[0]
    with pytest.raises(ConfigError, match="bits"):
        KMeans(bits=0)
    with pytest.raises(ConfigError, match="valid names: 1, 3, 5"):
        KMeans(exclude=("fc",)).apply(copy.deepcopy(model))
    with pytest.raises(ConfigError, match="one weight quantizer"):
        KMeans(**ALL).apply(Ternary(**ALL).apply(copy.deepcopy(model)))
