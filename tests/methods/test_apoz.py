"""apoz (Hu et al. 2016, Network Trimming): APoZ is the zero fraction of the ReLU outputs counted
with numpy from hooked activations; a dead channel goes first and costs nothing; each group loses
exactly round(ratio · C), the highest APoZ first; the measurement can come from the val stream;
the pruned digits LeNet ships with fewer MACs and bytes and keeps its accuracy after fine-tuning;
torchvision's resnet18 prunes too."""

import copy

import numpy as np
import pytest
import torch
from torch import nn

import sdk
from examples.models import make
from plugins.prune.apoz import ApozPruner
from prune_helpers import (RELU_AFTER, digits_batches, graph_macs, lenet_macs, lenet_widths,  # noqa: F401
                           profile_macs, prunable_groups, torchvision_resnet18, trained_lenet)
from sdk.channel_scores import apoz, group_key
from sdk.errors import ConfigError, InputError
from sdk.recipe import Recipe
from sdk.trainer import evaluate

pytestmark = pytest.mark.usefixtures("one_thread")   # tiny models: one thread is faster

def _hand_apoz(model, batches):
    """Zero fraction per channel of each ReLU module's output, counted with numpy."""
    seen = {r: [] for r in RELU_AFTER.values()}
    hooks = [model.get_submodule(r).register_forward_hook(lambda m, i, o, r=r: seen[r].append(o.numpy().copy()))
             for r in seen]
    try:
        model.eval()
        with torch.no_grad():
            for b in batches:
                model(b[0] if isinstance(b, (tuple, list)) else b)
    finally:
        for h in hooks:
            h.remove()
    out = {}
    for r, parts in seen.items():
        a = np.concatenate(parts)
        out[r] = (a == 0).reshape(a.shape[0], a.shape[1], -1).mean((0, 2))
    return out


def test_apoz_is_the_zero_fraction_of_the_relu_outputs(trained_lenet, digits_batches):
    """Counted on each ReLU's output (8×8 and 4×4 maps, 64 units), before max-pool merges positions."""
    train, _ = digits_batches
    groups = prunable_groups(trained_lenet, train[0][0])
    hand = _hand_apoz(trained_lenet, train[:5])
    ours = apoz(trained_lenet, groups, train[:5])
    assert len(ours) == 3
    for g in groups:
        np.testing.assert_allclose(ours[g].numpy(), hand[RELU_AFTER[group_key(g)]], rtol=1e-12)
    print("APoZ means:", {group_key(g): round(float(ours[g].mean()), 3) for g in groups})
    # inputs alone are enough, and the same as with labels
    unlabeled = apoz(trained_lenet, groups, [b[0] for b in train[:5]])
    assert all(torch.equal(unlabeled[g], ours[g]) for g in groups)


def _kill(model, conv_channels):
    """Make channels dead: their BN outputs −1 for every input, so ReLU gives exactly 0."""
    with torch.no_grad():
        for bn, c in conv_channels:
            model.get_submodule(bn).weight[c] = 0.0
            model.get_submodule(bn).bias[c] = -1.0
    return model


def test_a_dead_channel_goes_first_and_costs_nothing(trained_lenet, digits_batches):
    train, test = digits_batches
    model = _kill(copy.deepcopy(trained_lenet), [("features.1", 5), ("features.5", 9)])
    groups = prunable_groups(model, train[0][0])
    rates = {group_key(g): r for g, r in apoz(model, groups, train[:5]).items()}
    for key, c in (("features.0", 5), ("features.4", 9)):
        assert rates[key][c] == 1.0 and float(np.delete(rates[key].numpy(), c).max()) < 1.0

    # the dead channels lead the removal order (one per round in the first group, two in the second)
    pruner = ApozPruner(ratio=0.25, steps=4, finetune_steps=2, lr=1e-3, progress=False)
    pruner.apply(copy.deepcopy(model), train)
    assert pruner.removed["features.0"][0] == 5 and pruner.removed["features.4"][0] == 9
    assert [len(v) for v in pruner.removed.values()] == [4, 8, 16]

    # removing only the dead channel changes no output
    only = ApozPruner(ratio=1 / 16, steps=1, finetune_steps=0, exclude=("features.4", "classifier.1"))
    small = only.apply(copy.deepcopy(model), train)
    assert only.removed == {"features.0": [5]} and small.features[0].out_channels == 15
    (xte, _), = test
    with torch.no_grad():
        torch.testing.assert_close(small(xte), model.eval()(xte), rtol=1e-5, atol=1e-5)


def test_each_group_loses_exactly_its_ratio_highest_apoz_first(digits_batches):
    train, _ = digits_batches
    model, _ = make("lenet")
    hand = _hand_apoz(model, train[:10])
    one = ApozPruner(ratio=0.3, steps=1, finetune_steps=0)
    pruned = one.apply(copy.deepcopy(model), train)
    assert lenet_widths(pruned) == (11, 22, 45)                   # 16 − round(4.8), 32 − round(9.6), 64 − round(19.2)
    for key, relu in RELU_AFTER.items():
        highest = np.argsort(1.0 - hand[relu], kind="stable")[:len(one.removed[key])]
        assert sorted(one.removed[key]) == sorted(highest.tolist())
    kept = [c for c in range(32) if c not in one.removed["features.4"]]
    np.testing.assert_array_equal(pruned.features[4].weight.detach().numpy(),
                                  model.features[4].weight.detach().numpy()[kept][:, [
                                      c for c in range(16) if c not in one.removed["features.0"]]])

    rounds = ApozPruner(ratio=0.3, steps=3, finetune_steps=2, lr=1e-3, progress=False)
    assert lenet_widths(rounds.apply(copy.deepcopy(model), train)) == (11, 22, 45)
    assert all(len(set(v)) == len(v) for v in rounds.removed.values())
    ranked = ApozPruner(ratio=0.3, scope="global", steps=2, finetune_steps=1, progress=False).apply(
        copy.deepcopy(model), train)
    assert sum(lenet_widths(ranked)) == 112 - round(0.3 * 112)


def test_pruned_lenet_ships_fewer_macs_and_bytes_and_keeps_accuracy(trained_lenet, digits_batches, tmp_path):
    train, test = digits_batches
    (xte, yte), = test
    base = evaluate(trained_lenet, test)
    raw = ApozPruner(ratio=0.5, steps=1, finetune_steps=0).apply(copy.deepcopy(trained_lenet), train)
    tuned = ApozPruner(ratio=0.5, steps=10, finetune_steps=10, finetune_epochs=2, lr=3e-3, progress=False).apply(
        copy.deepcopy(trained_lenet), train)
    acc_raw, acc_tuned = evaluate(raw, test), evaluate(tuned, test)
    print(f"digits LeNet: dense {base:.3f}, apoz 0.5 without fine-tuning {acc_raw:.3f}, iterative {acc_tuned:.3f}")
    assert acc_tuned >= base - 0.03 and acc_tuned > acc_raw + 0.2        # measured 0.980, 0.418, 0.969

    cal = [train[i][0][:32] for i in range(8)]
    dense = sdk.deploy(trained_lenet, "arm-int8", (xte[:1],), calibration=cal, output=tmp_path / "d", progress=False)
    art = sdk.deploy(tuned, "arm-int8", (xte[:1],), calibration=cal, output=tmp_path / "a", progress=False)
    c1, c2, h = lenet_widths(tuned)
    assert (c1, c2, h) == (8, 16, 32)
    assert profile_macs(art) == lenet_macs(c1, c2, h)
    assert profile_macs(dense) == lenet_macs()
    size = lambda a: a.manifest["files"]["model.tflite"]["bytes"]  # noqa: E731
    print(f"arm-int8: MACs {profile_macs(dense)} → {profile_macs(art)}, "
          f"model.tflite {size(dense)} → {size(art)} B")
    assert profile_macs(art) < 0.3 * profile_macs(dense) and size(art) < 0.5 * size(dense)
    shipped = np.concatenate([art.run(xte[i:i + 1])[0] for i in range(len(xte))]).argmax(1)
    assert np.mean(shipped == yte.numpy()) >= acc_tuned - 0.02


def test_apoz_from_the_val_stream_in_a_recipe(trained_lenet, digits_batches):
    train, test = digits_batches
    recipe = Recipe.from_yaml("stages:\n  - {method: apoz, config: {ratio: 0.25, steps: 2, finetune_steps: 1, "
                              "lr: 0.001, stream: val}}\n")
    out = sdk.compress(trained_lenet, recipe, data={"train": train, "val": test}, progress=False)
    by_hand = ApozPruner(ratio=0.25, steps=2, finetune_steps=1, lr=1e-3, progress=False).apply(
        copy.deepcopy(trained_lenet), train, score_data=test)
    assert lenet_widths(out) == (12, 24, 48)
    assert all(torch.equal(a, b) for a, b in zip(out.state_dict().values(), by_hand.state_dict().values()))
    with pytest.raises(InputError, match="'val'"):
        sdk.compress(trained_lenet, recipe, data=train, progress=False)


def test_named_errors(digits_batches):
    train, _ = digits_batches
    with pytest.raises(ConfigError, match="stream"):
        ApozPruner(stream="holdout")
    with pytest.raises(ConfigError, match="ratio"):
        ApozPruner(ratio=-0.1)
    with pytest.raises(ConfigError, match="finetune_steps"):
        ApozPruner(finetune_steps=1.5)
    with pytest.raises(InputError, match="data"):
        ApozPruner().apply(make("lenet")[0])
    with pytest.raises(InputError, match="labelled"):
        ApozPruner(finetune_steps=1, progress=False).apply(make("lenet")[0], [b[0] for b in train[:2]])
    tanh = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.Tanh(), nn.Linear(16, 10))
    with pytest.raises(InputError, match="no channel group"):
        ApozPruner(finetune_steps=0).apply(tanh, train[:2])


def test_torchvision_resnet18_loses_macs():
    model, data = torchvision_resnet18()

    def total(m):
        return graph_macs(m, data[0][0][:1])

    before, sizes = total(model), {group_key(g): g.channels for g in prunable_groups(model, data[0][0])}
    pruner = ApozPruner(ratio=0.3, steps=2, score_batches=2, finetune_steps=1, progress=False)
    pruner.apply(model, data)
    after = total(model)
    print(f"torchvision resnet18 (1×3×32×32): MACs {before} → {after}")
    assert {k: len(v) for k, v in pruner.removed.items()} == {k: round(0.3 * c) for k, c in sizes.items()}
    assert after < 0.6 * before and model(data[0][0]).shape == (8, 10)
