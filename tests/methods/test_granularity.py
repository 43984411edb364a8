"""granularity (Mao et al. 2017): every group is all-zero or intact, exactly round(s·groups) of the
smallest-norm groups go (numpy reference), coarse groups cost more before retraining but not after,
and each pruned layer hints its sparsity pattern (unstructured, or block tiles) to the plan."""

import copy

import numpy as np
import pytest
import torch
from torch import nn

import sdk
from hint_checks import check_hints
from plugins.prune.granularity import GranularityPruner
from prune_helpers import batches, dense, layer_weights, same_layers  # noqa: F401 (fixtures)
from examples import digits as D
from sdk.encoding import Hint, Sparsity
from sdk.errors import ConfigError
from sdk.trainer import TrainConfig, fit

pytestmark = pytest.mark.usefixtures("one_thread")   # tiny models: one thread is faster

#: numpy axes of an (O, I, H, W) weight that one group spans
NP_GROUP_AXES = {("fine", "width"): (), ("vector", "width"): (3,), ("vector", "height"): (2,),
                 ("kernel", "width"): (2, 3), ("filter", "width"): (1, 2, 3)}


def np_group_norms(w4, axes, norm):
    w = w4.astype(np.float64)
    if norm == "l1":
        return np.abs(w).sum(axis=axes, keepdims=True) if axes else np.abs(w)
    return np.sqrt((w ** 2).sum(axis=axes, keepdims=True)) if axes else np.abs(w)


@pytest.mark.parametrize("norm", ["l1", "l2"])
@pytest.mark.parametrize("granularity,axis", list(NP_GROUP_AXES))
def test_granularity_structure_count_and_smallest_norms(small_cnn, granularity, axis, norm):
    s = 0.4
    before = layer_weights(small_cnn)
    m = GranularityPruner(granularity=granularity, vector_axis=axis, sparsity=s, norm=norm,
                          layer_types=("Conv2d", "Linear")).apply(copy.deepcopy(small_cnn))
    axes = NP_GROUP_AXES[granularity, axis]
    for name, mod in same_layers(m, small_cnn):
        w4 = before[name].reshape(before[name].shape + (1,) * (4 - before[name].ndim))   # Linear: 1×1 conv
        got = mod.weight.detach().numpy().reshape(w4.shape)
        zero_group = np.all(got == 0, axis=axes, keepdims=True) if axes else got == 0
        untouched = np.all(got == w4, axis=axes, keepdims=True) if axes else got == w4
        assert np.all(zero_group | untouched)                       # each group all-zero or intact
        norms = np_group_norms(w4, axes, norm)
        k = round(s * norms.size)
        assert int(zero_group.sum()) == k
        smallest = np.zeros(norms.size, bool)
        smallest[np.argsort(norms.ravel(), kind="stable")[:k]] = True
        np.testing.assert_array_equal(zero_group.ravel(), smallest)


def test_granularity_filter_and_kernel_shapes(small_cnn):
    """Spot-check the structures by hand on c2 (16×8×3×3): 6 of 16 filters, 51 of 128 kernels."""
    f = GranularityPruner(granularity="filter", sparsity=0.4).apply(copy.deepcopy(small_cnn))
    assert int((f.c2.weight.abs().sum((1, 2, 3)) == 0).sum()) == 6
    assert int((f.fc.weight == 0).sum()) == 0                          # Linear not pruned by default
    k = GranularityPruner(granularity="kernel", sparsity=0.4).apply(copy.deepcopy(small_cnn))
    per_kernel_zeros = (k.c2.weight == 0).sum((2, 3))
    assert set(per_kernel_zeros.unique().tolist()) == {0, 9} and int((per_kernel_zeros == 9).sum()) == 51


def test_granularity_coarse_costs_more_before_retraining_not_after(digits, dense, batches):
    """Mao et al.: at equal density, coarser groups lose more accuracy when pruned, but retraining recovers
    it, so kernel sparsity ends close to fine-grained.  Half of the groups of the conv layers after the
    first (whose 1-channel kernels are whole filters) and of nothing else; 2 epochs of retraining."""
    _, _, xte, yte = digits
    model, dense_acc = dense
    before, after = {}, {}
    for g in ("fine", "vector", "kernel"):
        m = GranularityPruner(granularity=g, sparsity=0.5, exclude=("features.0",)).apply(copy.deepcopy(model))
        before[g] = D.accuracy(m, xte, yte)
        if g == "vector":
            continue
        fit(m, batches, lambda net, b: torch.nn.functional.cross_entropy(net(b[0]), b[1]),
            TrainConfig(epochs=2, lr=1e-3, progress=False))
        after[g] = D.accuracy(m, xte, yte)
        w = m.features[4].weight                                    # masks keep the groups pruned
        zero_groups = (w == 0) if g == "fine" else (w == 0).all(3).all(2)
        assert int(zero_groups.sum()) == round(0.5 * zero_groups.numel())
    assert before["fine"] > before["vector"] > before["kernel"], before
    assert min(after.values()) >= dense_acc - 0.02, (dense_acc, after)
    assert after["kernel"] - before["kernel"] > 0.2 and abs(after["fine"] - after["kernel"]) <= 0.025, (before, after)


class ConvNet(nn.Module):
    """conv 3×3 (1→4) → conv 3×5 (4→6) → linear: kernels wider than tall, and no BatchNorm, so the
    captured graph keeps each layer's own weight."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.c1, self.c2 = nn.Conv2d(1, 4, 3, padding=1), nn.Conv2d(4, 6, (3, 5), padding=(1, 2))
        self.fc = nn.Linear(6 * 64, 3)

    def forward(self, x):
        return self.fc(torch.relu(self.c2(torch.relu(self.c1(x)))).flatten(1))


@pytest.mark.parametrize("granularity,axis,c1,c2,fc", [
    ("fine", "width", ("unstructured", None), ("unstructured", None), ("unstructured", None)),
    ("vector", "width", ("block", (1, 3)), ("block", (1, 5)), ("unstructured", None)),
    ("vector", "height", ("kernel-column", (3, 1)), ("kernel-column", (3, 1)), ("unstructured", None)),
    ("kernel", "width", ("block", (1, 9)), ("block", (1, 15)), ("unstructured", None)),
    ("filter", "width", ("block", (1, 9)), ("block", (1, 60)), ("block", (1, 384))),
])
def test_compress_hints_the_group_pattern(granularity, axis, c1, c2, fc):
    """A group that is a contiguous run of n weights in a row of the [out, in·k] matrix is a (1, n)
    block; a kernel column (W[o, i, :, w], kernels wider than 1) is strided there: kernel-column.
    The zeros of the baked weights are exactly those tiles (checked on the [out, in·k] matrix)."""
    model = ConvNet()
    recipe = {"stages": [{"method": "granularity", "config": {
        "granularity": granularity, "vector_axis": axis, "sparsity": 0.5, "layer_types": ["Conv2d", "Linear"]}}]}
    small = sdk.compress(model, recipe)
    expected = {n: Hint(sparsity=Sparsity(*p), source="mask") for n, p in (("c1", c1), ("c2", c2), ("fc", fc))}
    check_hints(small, torch.rand(1, 1, 8, 8), expected)
    for name, (pattern, block) in (("c1", c1), ("c2", c2), ("fc", fc)):
        w = small.get_submodule(name).weight.detach()
        zeros = (w == 0).reshape(w.shape[0], -1).numpy()
        if pattern == "block":             # every aligned 1×n tile all zero or all nonzero
            tiles = zeros.reshape(zeros.shape[0], -1, block[1])
            assert np.all(tiles.all(-1) | ~tiles.any(-1)) and tiles.all(-1).sum() == round(0.5 * tiles[..., 0].size)
        elif pattern == "kernel-column":   # every kernel column all zero or all nonzero
            cols = (w == 0).numpy()
            assert np.all(cols.all(2) | ~cols.any(2))


def test_granularity_bad_config():
    with pytest.raises(ConfigError, match="granularity"):
        GranularityPruner(granularity="channel")
    with pytest.raises(ConfigError, match="norm"):
        GranularityPruner(norm="l3")
