"""hybrid: the channels removed are exactly the lowest mean-filter-L1 ones of each group (numpy), then each
remaining layer holds exactly round(sparsity · numel) zeros at its smallest weights; fine-tuned on digits the
LeNet keeps most of its accuracy, and its arm-fp32 artifact has both fewer MACs (closed form) and sparse
storage (manifest encodings, file bytes) compared with the dense model and with channel removal alone."""

import copy

import numpy as np
import pytest
import torch

import sdk
from examples import digits as D
from examples.models import make
from plugins.prune.hybrid import HybridPruner
from prune_helpers import batches, dense, lenet_macs  # noqa: F401 (fixtures)
from sdk.channels import ChannelDependencyError, channel_groups
from sdk.errors import ConfigError, InputError
from sdk.masks import apply_mask, bake, mask_of, prunable_layers
from sdk.recipe import Recipe

pytestmark = pytest.mark.usefixtures("one_thread")   # tiny models: one thread is faster


def test_channels_then_weights_exactly():
    """resnet18 (residual adds couple channels): per group the round(ratio·C) lowest mean filter L1 go
    (score summed over the coupled producers, ties by index), the kept weights are the original ones, and
    then every prunable layer of the smaller model has round(sparsity·numel) zeros at its smallest |w|."""
    model, x = make("resnet18", width=8)
    ref = copy.deepcopy(model)
    groups = [g for g in channel_groups(ref, (x,)) if g.prunable]
    ratio, sparsity = 0.3, 0.6
    pruner = HybridPruner(ratio=ratio, sparsity=sparsity, between_epochs=0, finetune_epochs=0,
                          input_shape=tuple(x.shape))
    pruner.apply(model)
    kept, kept_in = {}, {}
    for g in groups:
        weights = [ref.get_submodule(s.module).weight.detach().numpy() for s in g.of_role("out")]
        score = sum(np.abs(w).reshape(w.shape[0], -1).mean(1) for w in weights)
        kept[g] = np.sort(np.argsort(score, kind="stable")[round(ratio * g.channels):])
        kept_in.update({s.module: kept[g] for s in g.of_role("in")})
    assert sorted(pruner.removed.values()) == sorted(round(ratio * g.channels) for g in groups)
    for g in groups:
        for s in g.of_role("out"):
            mod = model.get_submodule(s.module)
            w = ref.get_submodule(s.module).weight.detach().numpy()[kept[g]]
            w = w[:, kept_in[s.module]] if s.module in kept_in else w          # the stem reads the RGB input
            np.testing.assert_array_equal(mod.parametrizations.weight.original.detach().numpy(), w)
    for name, mod in prunable_layers(model):
        w, dense_w = mod.weight.detach(), mod.parametrizations.weight.original.detach()
        assert int((w == 0).sum()) == round(sparsity * w.numel()), name
        assert float(dense_w[w != 0].abs().min()) >= float(dense_w[mask_of(mod) == 0].abs().max())
    assert model.fc.out_features == 10


@pytest.fixture(scope="module")
def hybrid_run(dense, batches):
    """LeNet: half the channels of every group, then half the weights of what remains; 2 + 2 epochs."""
    model, _ = dense
    pruner = HybridPruner(ratio=0.5, sparsity=0.5, between_epochs=2, finetune_epochs=2, lr=3e-3, progress=False)
    return pruner, pruner.apply(copy.deepcopy(model), batches)


def test_hybrid_lenet_accuracy(digits, dense, hybrid_run):
    """Measured: dense 0.989; channels and weights halved (22% of the weights left) and fine-tuned: 0.969."""
    _, _, xte, yte = digits
    _, acc = dense
    pruner, pruned = hybrid_run
    assert pruner.removed == {"features.0": 8, "features.4": 16, "classifier.1": 32}
    assert (pruned.features[0].out_channels, pruned.features[4].out_channels, pruned.classifier[1].out_features) \
        == (8, 16, 32)
    for _, mod in prunable_layers(pruned):
        assert int((mod.weight == 0).sum()) == round(0.5 * mod.weight.numel())
    assert D.accuracy(pruned, xte, yte) >= acc - 0.04


def test_hybrid_artifact_has_fewer_macs_and_sparse_storage(digits, dense, hybrid_run, tmp_path):
    """arm-fp32 (sparsity "auto"): MACs 91 776 → 25 408 (the closed form of the halved LeNet), the layers
    stored sparse where that is smaller (density 0.5 in the manifest), and the file smaller than both the
    dense model's and the same channel-pruned weights stored dense."""
    _, _, xte, yte = digits
    model, _ = dense
    small = bake(copy.deepcopy(hybrid_run[1]))
    x = (xte[:1],)
    full = sdk.deploy(model, "arm-fp32", x, output=tmp_path / "dense", progress=False)
    art = sdk.deploy(small, "arm-fp32", x, output=tmp_path / "hybrid", progress=False)
    unsparse = sdk.deploy(small, "arm-fp32", x, output=tmp_path / "off", progress=False, sparsity="off")
    assert full.profile["estimate"]["macs"] == lenet_macs()
    c1, c2, h = 8, 16, 32
    assert art.profile["estimate"]["macs"] == lenet_macs(c1, c2, h)
    rows = art.manifest["encodings"]
    # the first conv (8 filters of 9 weights after the channel cut) stays dense: its sparse tables would
    # cost more than its zeros save; every larger layer ships sparse
    shipped = {r["layer"]: r["sparsity"]["shipped"] for r in rows}
    assert len(rows) == 4 and shipped.pop("features.0") == "dense" and set(shipped.values()) == {"sparse"}, rows
    assert all(abs(r["sparsity"]["density"] - 0.5) < 0.002 for r in rows)
    sizes = [len(a.read_bytes("model.tflite")) for a in (full, unsparse, art)]
    assert sizes[1] < 0.35 * sizes[0] and sizes[2] < 0.8 * sizes[1], sizes     # measured: 57 024, 16 832, 12 768
    n = 100
    out = np.concatenate([art.run(xte[i:i + 1])[0] for i in range(n)])
    np.testing.assert_allclose(out, small(xte[:n]).detach().numpy(), rtol=1e-4, atol=1e-4)


def test_hybrid_from_a_yaml_recipe(batches):
    recipe = Recipe.from_yaml("stages:\n  - {method: hybrid, config: {ratio: 0.25, sparsity: 0.4, between_epochs: 1, "
                              "finetune_epochs: 0, dense: [classifier.3], lr: 0.003, progress: false}}\n")
    small = sdk.compress(make("lenet", randomize_bn=False)[0], recipe, data=batches[:4], progress=False)
    assert small.features[4].out_channels == 24
    assert int((small.features[4].weight == 0).sum()) == round(0.4 * small.features[4].weight.numel())
    assert int((small.classifier[3].weight == 0).sum()) == 0 and small.classifier[3].in_features == 48


def test_hybrid_bad_input():
    with pytest.raises(InputError, match="data="):
        HybridPruner(input_shape=(1, 1, 8, 8)).apply(make("lenet")[0])
    with pytest.raises(InputError, match="input_shape"):
        HybridPruner(between_epochs=0, finetune_epochs=0).apply(make("lenet")[0])
    masked, _ = make("lenet")
    apply_mask(masked.features[0], torch.ones_like(masked.features[0].weight))
    with pytest.raises(ChannelDependencyError, match="bake"):       # channels go before any mask
        HybridPruner(between_epochs=0, finetune_epochs=0, input_shape=(1, 1, 8, 8)).apply(masked)
    with pytest.raises(ConfigError, match="ratio"):
        HybridPruner(ratio=1.0)
    with pytest.raises(ConfigError, match="sparsity"):
        HybridPruner(sparsity=1.5)
