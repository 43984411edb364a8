"""threshold (Han et al. 2015): round one equals the numpy ``|w| >= s·std(w)`` criterion, retraining
rounds grow sparsity without regrowing weights and keep a LeNet's digits accuracy, and the
retraining honours the shared training fields (optimizer, its options, seed per round)."""

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from examples import digits as D
from examples.models import make
from plugins.prune.threshold import ThresholdPruner
from prune_helpers import batches, dense, layer_weights, same_layers  # noqa: F401 (fixtures)
from sdk.errors import ConfigError, InputError
from sdk.masks import apply_mask, mask_of, prunable_layers
from sdk.recipe import Recipe
from sdk.trainer import TrainConfig

pytestmark = pytest.mark.usefixtures("one_thread")   # tiny models: one thread is faster


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


def sgd_reference(model, data, quality, lr, momentum, weight_decay):
    """One threshold round by hand: the numpy-criterion masks, then one epoch of SGD with momentum and
    L2 weight decay written out (torch's update: g += wd·p; b = m·b + g, b = g at first; p −= lr·b)."""
    for _, mod in prunable_layers(model):
        w = mod.weight.detach()
        apply_mask(mod, torch.from_numpy(np.abs(w.numpy()) >= quality * np.std(w.numpy())).float())
    params = list(model.parameters())
    momenta = [None] * len(params)
    model.train()
    for x, y in data:
        grads = torch.autograd.grad(F.cross_entropy(model(x), y), params)
        with torch.no_grad():
            for i, (p, g) in enumerate(zip(params, grads)):
                g = g + weight_decay * p
                momenta[i] = g.clone() if momenta[i] is None else momentum * momenta[i] + g
                p -= lr * momenta[i]
    return model.eval()


def test_retraining_uses_the_optimizer_and_its_options(batches):
    """optimizer: sgd with optimizer_options {momentum, weight_decay} (the paper's L2 during retraining)
    gives exactly the hand-written SGD's weights; a recipe with a misspelt optimizer fails when read."""
    model, _ = make("lenet")
    data = batches[:4]
    options = {"momentum": 0.5, "weight_decay": 1e-3}
    got = ThresholdPruner(quality=1.0, iterations=1, epochs=1, lr=0.05, optimizer="sgd",
                          optimizer_options=options, progress=False).apply(copy.deepcopy(model), data)
    want = sgd_reference(copy.deepcopy(model), data, 1.0, 0.05, **options)
    for (name, a), b in zip(got.state_dict().items(), want.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    no_decay = ThresholdPruner(quality=1.0, iterations=1, epochs=1, lr=0.05, optimizer="sgd",
                               optimizer_options={"momentum": 0.5}, progress=False).apply(copy.deepcopy(model), data)
    assert not torch.equal(no_decay.classifier[1].weight, got.classifier[1].weight)

    assert issubclass(ThresholdPruner.Config, TrainConfig) and ThresholdPruner.Config().epochs == 2
    with pytest.raises(ConfigError, match="optimizer='adma' is not registered"):
        Recipe.from_yaml("stages:\n  - {method: threshold, config: {optimizer: adma}}\n")
    with pytest.raises(ConfigError, match="weight_decay"):
        Recipe.from_yaml("stages:\n  - {method: threshold, config: {optimizer_options: {weight_decay: -1}}}\n")
    recipe = Recipe.from_yaml("stages:\n  - {method: threshold, config: {optimizer: sgd, "
                              "optimizer_options: {momentum: 0.5, weight_decay: 0.001}}}\n")
    assert recipe.stages[0].config.optimizer_config() == ThresholdPruner(
        optimizer="sgd", optimizer_options=options).config.optimizer_config()


def test_threshold_bad_input(batches):
    with pytest.raises(ConfigError, match="quality"):
        ThresholdPruner(quality=0.0)
    unlabeled = [x for x, _ in batches[:2]]
    with pytest.raises(InputError, match="labelled"):
        ThresholdPruner(epochs=1, progress=False).apply(make("mlp")[0], unlabeled)
