"""threshold, agp, granularity: masks equal numpy references, schedules equal the closed form,
exact counts are reached, and a pruned LeNet on digits stays within a stated accuracy of the dense one."""

import copy

import numpy as np
import pytest
import torch

import sdk
from examples import digits as D
from examples.models import make
from plugins.prune.agp import AGPPruner, agp_sparsity
from plugins.prune.granularity import GranularityPruner
from plugins.prune.threshold import ThresholdPruner
from sdk.errors import ConfigError, InputError
from sdk.masks import bake, mask_of, prunable_layers
from sdk.trainer import TrainConfig, fit, make_loader


pytestmark = pytest.mark.usefixtures("one_thread")   # tiny models: one thread is faster


@pytest.fixture(scope="module")
def batches(digits):
    xtr, ytr, _, _ = digits
    return list(make_loader(xtr, ytr, batch_size=64, seed=0))


@pytest.fixture(scope="module")
def dense(digits, one_thread):
    """A LeNet trained 5 epochs on digits, and its test accuracy."""
    xtr, ytr, xte, yte = digits
    model = D.train(make("lenet", randomize_bn=False)[0].train(), xtr, ytr, epochs=5, progress=False)
    return model, D.accuracy(model, xte, yte)


def layer_weights(model):
    return {n: m.weight.detach().numpy().copy() for n, m in prunable_layers(model)}


def same_layers(pruned, reference):
    """``(name, module)`` of ``pruned`` for the prunable layers of the unpruned ``reference`` (a masked
    layer's class becomes ``Parametrized<Class>``, which ``prunable_layers`` does not list)."""
    return [(n, pruned.get_submodule(n)) for n, _ in prunable_layers(reference)]


# -- threshold (Han et al. 2015) -------------------------------------------------------------------

@pytest.mark.parametrize("quality", [0.5, 1.0, 1.5])
def test_threshold_round_one_is_numpy_criterion(small_cnn, quality):
    before = layer_weights(small_cnn)
    pruner = ThresholdPruner(quality=quality, iterations=3)
    m = pruner.apply(copy.deepcopy(small_cnn))        # no data: one round, no retraining
    zeros = total = 0
    for name, mod in same_layers(m, small_cnn):
        w = before[name]
        keep = np.abs(w) >= quality * np.std(w)        # numpy std: ddof = 0
        np.testing.assert_array_equal(mask_of(mod).numpy() == 1, keep)
        np.testing.assert_array_equal(mod.weight.detach().numpy(), np.where(keep, w, 0))
        zeros, total = zeros + int((~keep).sum()), total + keep.size
    assert pruner.history == [pytest.approx(zeros / total)]
    assert 0.05 < pruner.history[0] < 0.95


@pytest.fixture(scope="module")
def threshold_run(dense, batches):
    model, _ = dense
    pruner = ThresholdPruner(quality=1.0, iterations=3, epochs=2, lr=1e-3, progress=False)
    return pruner, pruner.apply(copy.deepcopy(model), batches)


def test_threshold_iterations_grow_sparsity_and_never_regrow(dense, threshold_run):
    pruner, pruned = threshold_run
    h = pruner.history
    assert len(h) == 3 and h[0] < h[1] < h[2], h
    before = layer_weights(dense[0])
    zeros = total = 0
    for name, mod in same_layers(pruned, dense[0]):
        w = before[name]
        zeros, total = zeros + int((mod.weight == 0).sum()), total + w.size
        first_round = np.abs(w) < np.std(w)
        assert np.all(mod.weight.detach().numpy()[first_round] == 0)   # round-one zeros stay zero
    assert h[-1] == pytest.approx(zeros / total)


def test_threshold_retraining_keeps_accuracy(digits, dense, threshold_run):
    """Han et al.: pruning alone hurts, prune + retrain loses (almost) nothing: here within 2 points of
    dense at ~2/3 sparsity, while the same first round without retraining loses over 20 points."""
    _, _, xte, yte = digits
    pruner, pruned = threshold_run
    acc = D.accuracy(pruned, xte, yte)
    one_shot = D.accuracy(ThresholdPruner(quality=1.0).apply(copy.deepcopy(dense[0])), xte, yte)
    assert pruner.history[-1] > 0.6
    assert acc >= dense[1] - 0.02, (dense[1], acc, pruner.history)
    assert one_shot < acc - 0.2, (one_shot, acc)


def test_threshold_bad_input(batches):
    with pytest.raises(ConfigError, match="quality"):
        ThresholdPruner(quality=0.0)
    unlabeled = [x for x, _ in batches[:2]]
    with pytest.raises(InputError, match="labelled"):
        ThresholdPruner(epochs=1, progress=False).apply(make("mlp")[0], unlabeled)


# -- agp (Zhu & Gupta 2017) ------------------------------------------------------------------------

@pytest.mark.parametrize("step,expected", [
    (10, 0.1),                                  # before t0: s_i
    (20, 0.1),                                  # t0
    (25, 0.9 - 0.8 * (7 / 8) ** 3),             # 1 of 8 pruning steps: 0.3640625
    (40, 0.8),                                  # half way: 0.9 - 0.8 * 0.5³
    (55, 0.9 - 0.8 * (1 / 8) ** 3),
    (60, 0.9), (500, 0.9),                      # t0 + nΔt and later: s_f
])
def test_agp_schedule_closed_form(step, expected):
    got = agp_sparsity(step, initial=0.1, final=0.9, start=20, steps=8, frequency=5)
    assert got == pytest.approx(expected, abs=1e-12)


def test_agp_schedule_prunes_fast_then_slow():
    s = [agp_sparsity(t, 0.0, 0.8, 0, 10, 10) for t in range(0, 101, 10)]
    steps = np.diff(s)
    assert np.all(steps > 0) and np.all(np.diff(steps) < 0)


@pytest.fixture(scope="module")
def agp_run(dense, batches):
    """80% per layer over 10 pruning steps every 5 training steps, 4 epochs (88 steps) in all.
    The first conv (144 weights, one input channel) stays dense, as is common practice."""
    model, _ = dense
    pruner = AGPPruner(final_sparsity=0.8, pruning_steps=10, frequency=5, epochs=4, lr=3e-3,
                       exclude=("features.0",), progress=False)
    return pruner, pruner.apply(copy.deepcopy(model), batches)


def test_agp_masks_follow_schedule_and_reach_final_exactly(dense, agp_run):
    pruner, pruned = agp_run
    layers = [m for n, m in same_layers(pruned, dense[0]) if n != "features.0"]
    assert len(layers) == 3
    assert [h[0] for h in pruner.history] == list(range(0, 51, 5))
    for step, target, zeros in pruner.history:
        assert target == pytest.approx(0.8 - 0.8 * (1 - step / 50) ** 3)
        assert list(zeros) == [round(target * m.weight.numel()) for m in layers]
    for m in layers:                                              # after 38 more training steps
        assert int((m.weight == 0).sum()) == round(0.8 * m.weight.numel())
    assert mask_of(pruned.features[0]) is None and int((pruned.features[0].weight == 0).sum()) == 0


def test_agp_accuracy_and_deploy(digits, dense, agp_run, tmp_path):
    """Gradual pruning to 80% stays within 1.5 points of dense; the baked model still deploys to int8."""
    xtr, _, xte, yte = digits
    _, pruned = agp_run
    pruned = bake(copy.deepcopy(pruned))
    acc = D.accuracy(pruned, xte, yte)
    assert acc >= dense[1] - 0.015, (dense[1], acc)
    art = sdk.deploy(pruned, "arm-int8", (xte[:1],), calibration=[xtr[i:i + 32] for i in range(0, 320, 32)],
                     output=tmp_path / "agp", progress=False)
    n = 150
    int8 = np.concatenate([art.run(xte[i:i + 1])[0] for i in range(n)]).argmax(1)
    assert np.mean(int8 == pruned(xte[:n]).argmax(1).numpy()) >= 0.97


def test_agp_bad_input(batches):
    with pytest.raises(InputError, match="data="):
        AGPPruner().apply(make("mlp")[0])
    with pytest.raises(ConfigError, match="raise epochs"):
        AGPPruner(pruning_steps=10, frequency=10, epochs=1).apply(make("mlp")[0], batches[:5])
    with pytest.raises(ConfigError, match="swap"):
        AGPPruner(initial_sparsity=0.5, final_sparsity=0.3)


# -- granularity (Mao et al. 2017) -----------------------------------------------------------------

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


def test_granularity_bad_config():
    with pytest.raises(ConfigError, match="granularity"):
        GranularityPruner(granularity="channel")
    with pytest.raises(ConfigError, match="norm"):
        GranularityPruner(norm="l3")
