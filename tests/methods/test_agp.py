"""agp (Zhu & Gupta 2017): the schedule equals the closed form and prunes fast then slow, the masks
follow it and reach the final sparsity exactly, a LeNet keeps its digits accuracy and deploys to
int8, and the training fields (optimizer and its options, max_steps) are checked and honoured."""

import copy

import numpy as np
import pytest

import sdk
from examples import digits as D
from examples.models import make
from plugins.prune.agp import AGPPruner, agp_sparsity
from prune_helpers import batches, dense, same_layers  # noqa: F401 (fixtures)
from sdk.errors import ConfigError, InputError
from sdk.masks import bake, mask_of
from sdk.recipe import Recipe
from sdk.trainer import TrainConfig

pytestmark = pytest.mark.usefixtures("one_thread")   # tiny models: one thread is faster


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


def test_agp_trains_with_sgd_and_its_options(batches):
    """optimizer: sgd with momentum 0.5 from a YAML recipe trains (the loss falls) while the schedule is
    still met exactly; max_steps counts against the schedule's end."""
    recipe = Recipe.from_yaml("stages:\n  - method: agp\n    config: {final_sparsity: 0.5, pruning_steps: 4, "
                              "frequency: 2, epochs: 2, lr: 0.05, optimizer: sgd, "
                              "optimizer_options: {momentum: 0.5}, progress: false}\n")
    cfg = recipe.stages[0].config
    assert isinstance(cfg, TrainConfig) and cfg.optimizer_config().momentum == 0.5
    model, _ = make("lenet", randomize_bn=False)
    data = batches[:8]
    pruned = sdk.compress(model, recipe, data=data)
    for name in ("features.4", "classifier.1", "classifier.3"):
        w = pruned.get_submodule(name).weight
        assert int((w == 0).sum()) == round(0.5 * w.numel())
    assert D.accuracy(pruned, *data[0]) > D.accuracy(model, *data[0]) + 0.3
    with pytest.raises(ConfigError, match="max_steps=8"):
        AGPPruner(pruning_steps=4, frequency=2, epochs=2, max_steps=8).apply(make("mlp")[0], data)


def test_agp_bad_input(batches):
    with pytest.raises(InputError, match="data="):
        AGPPruner().apply(make("mlp")[0])
    with pytest.raises(ConfigError, match="raise epochs"):
        AGPPruner(pruning_steps=10, frequency=10, epochs=1).apply(make("mlp")[0], batches[:5])
    with pytest.raises(ConfigError, match="swap"):
        AGPPruner(initial_sparsity=0.5, final_sparsity=0.3)
    with pytest.raises(ConfigError, match="optimizer='adma' is not registered"):
        Recipe.from_yaml("stages:\n  - {method: agp, config: {optimizer: adma}}\n")
    with pytest.raises(ConfigError, match="momentun"):
        Recipe.from_yaml("stages:\n  - {method: agp, config: {optimizer: sgd, optimizer_options: {momentun: 0.5}}}\n")
