"""magnitude: exact sparsity, smallest weights removed, masks survive fine-tuning, and the pruned
layers hint unstructured sparsity to the plan."""

import copy

import pytest
import torch

import sdk
from plugins.prune.magnitude import MagnitudePruner
from sdk.encoding import Hint, Sparsity, hints_of
from sdk.graph import capture
from sdk.masks import sparsity


@pytest.mark.parametrize("s", [0.1, 0.5, 0.8, 0.97])
def test_exact_sparsity_per_layer(small_cnn, s):
    m = MagnitudePruner(sparsity=s).apply(copy.deepcopy(small_cnn))
    for mod in (m.c1, m.c2, m.fc):
        w = mod.weight
        assert int((w == 0).sum()) == round(s * w.numel())
        kept, pruned = w[w != 0].abs(), mod.parametrizations.weight.original[w == 0].abs()
        assert kept.min() >= pruned.max()


def test_exact_even_with_ties():
    lin = torch.nn.Linear(10, 10)
    with torch.no_grad():
        lin.weight.fill_(0.5)
    MagnitudePruner(sparsity=0.37).apply(lin)
    assert int((lin.weight == 0).sum()) == 37


def test_global_scope_ranks_all_layers_together(small_cnn):
    ref = copy.deepcopy(small_cnn)
    m = MagnitudePruner(sparsity=0.6, scope="global").apply(copy.deepcopy(small_cnn))
    all_w = torch.cat([x.weight.detach().abs().flatten() for x in (ref.c1, ref.c2, ref.fc)])
    k = round(0.6 * all_w.numel())
    assert sum(int((x.weight == 0).sum()) for x in (m.c1, m.c2, m.fc)) == k
    threshold = torch.sort(all_w).values[k - 1]
    w = m.c1.weight.detach()
    assert float(w.abs()[w != 0].min()) >= float(threshold)


def test_compress_keeps_sparsity_through_finetuning(small_cnn, digits):
    xtr, ytr, _, _ = digits
    data = [(xtr[i:i + 128], ytr[i:i + 128]) for i in range(0, 512, 128)]
    recipe = {"stages": [{"method": "magnitude", "config": {"sparsity": 0.7, "exclude": ["fc"]}},
                         {"method": "kd", "config": {"epochs": 2, "lr": 1e-2, "progress": False}}]}
    small = sdk.compress(small_cnn, recipe, data=data)
    for name in ("c1", "c2"):
        w = getattr(small, name).weight
        assert int((w == 0).sum()) == round(0.7 * w.numel())
    assert int((small.fc.weight == 0).sum()) == 0
    assert not hasattr(small.c1, "parametrizations")           # masks baked in
    assert not torch.equal(small.c2.weight, small_cnn.c2.weight)  # and it did train
    assert sparsity(small_cnn) == 0.0                            # original untouched


def test_compress_hints_unstructured_sparsity(small_cnn):
    """The pruned layers (not the excluded fc) hint unstructured zeros; capture folds each BN into
    its conv and the hint follows the folded weight."""
    recipe = {"stages": [{"method": "magnitude", "config": {"sparsity": 0.5, "exclude": ["fc"]}}]}
    small = sdk.compress(small_cnn, recipe)
    hint = Hint(sparsity=Sparsity("unstructured"), source="mask")
    for name in ("c1", "c2"):
        assert hints_of(getattr(small, name)) == hint
    assert hints_of(small.fc) is None
    graph = capture(small, (torch.rand(1, 1, 8, 8),))
    assert sorted(graph.hints.values(), key=str) == [hint, hint]
