"""slimming (Liu et al. 2017): the L1 penalty makes BN scales sparse, the global threshold removes
exactly the lowest |γ| channels, removal is nearly free after sparsity training and costly without,
fine-tuning recovers digits accuracy, and both trainings use the shared training fields."""

import copy

import pytest
import torch

from examples.models import make
from plugins.prune.slimming import SlimmingPruner
from prune_helpers import digits_batches, trained_lenet  # noqa: F401 (fixtures)
from sdk.channels import remove_channels
from sdk.errors import ConfigError, InputError
from sdk.recipe import Recipe
from sdk.trainer import TrainConfig, evaluate, finetune


pytestmark = pytest.mark.usefixtures("one_thread")   # tiny models: one thread is faster


def _gammas(model, groups):
    return torch.cat([model.get_submodule(s.module).weight.detach().abs()
                      for g in groups for s in g.of_role("norm")])


def test_slimming_sparsifies_gamma_and_removal_is_nearly_free(trained_lenet, digits_batches):
    train, test = digits_batches
    base_acc = evaluate(trained_lenet, test)
    cfg = dict(ratio=0.3, l1=3e-2, epochs=10, lr=1e-2, finetune_epochs=3, finetune_lr=1e-3, progress=False)
    pruner = SlimmingPruner(**cfg)
    model, _ = make("lenet", randomize_bn=False)             # same init as trained_lenet
    groups = pruner.candidates(model, train)
    pruner.train_sparse(model, train, groups)
    sparse_acc = evaluate(model, test)

    # γ is much sparser with the L1 penalty than without (same data, init, epochs)
    near_zero = lambda g: float((g < 0.05 * g.max()).float().mean())  # noqa: E731
    slim_g, base_g = _gammas(model, groups), _gammas(trained_lenet, groups)
    assert near_zero(slim_g) >= 0.25 and near_zero(base_g) == 0.0          # measured 0.42 vs 0
    assert float(slim_g.sum() / slim_g.norm()) < 0.75 * float(base_g.sum() / base_g.norm())

    # the global threshold: exactly round(0.3 · 48) channels, every removed |γ| ≤ every kept |γ|
    plan = pruner.select(model, groups)
    removed = [float(_gammas(model, [g])[c]) for g, idx in plan.items() for c in idx]
    kept = [float(v) for g, idx in plan.items() for c, v in enumerate(_gammas(model, [g])) if c not in idx]
    assert len(removed) == round(0.3 * 48) and max(removed) <= min(kept)

    # removing the low-γ channels costs little after sparsity training, a lot without it
    remove_channels(model, plan)
    assert evaluate(model, test) >= sparse_acc - 0.03                        # measured 0.987 → 0.984
    plain = copy.deepcopy(trained_lenet)
    remove_channels(plain, pruner.select(plain, pruner.candidates(plain, train)))
    assert evaluate(plain, test) < base_acc - 0.1                           # measured 0.991 → 0.79

    finetune(model, train, TrainConfig(epochs=3, lr=1e-3, progress=False))
    assert evaluate(model, test) >= base_acc - 0.03                          # measured 0.996 vs 0.991

    # apply() runs exactly these steps
    whole = SlimmingPruner(**cfg).apply(make("lenet", randomize_bn=False)[0], train)
    assert all(torch.equal(a, b) for a, b in zip(whole.state_dict().values(), model.state_dict().values()))


def test_training_fields_reach_both_trainings(digits_batches):
    """Sparsity training runs ``epochs`` at ``lr``, fine-tuning ``finetune_epochs`` at ``finetune_lr``,
    both with the config's optimizer and options: with max_steps=2 each training takes 2 steps, so
    the result equals the two stages run by hand with those fields."""
    train, _ = digits_batches
    cfg = dict(ratio=0.3, l1=1e-2, epochs=1, lr=1e-2, finetune_epochs=1, finetune_lr=1e-3, optimizer="sgd",
               optimizer_options={"momentum": 0.5}, max_steps=2, progress=False)
    pruner = SlimmingPruner(**cfg)
    assert issubclass(SlimmingPruner.Config, TrainConfig)
    whole = pruner.apply(make("lenet", randomize_bn=False)[0], train)
    by_hand, _ = make("lenet", randomize_bn=False)
    groups = pruner.candidates(by_hand, train)
    gammas = [by_hand.get_submodule(s.module).weight for g in groups for s in g.of_role("norm")]
    sgd = dict(optimizer="sgd", optimizer_options={"momentum": 0.5}, max_steps=2, progress=False)
    finetune(by_hand, train, TrainConfig(epochs=1, lr=1e-2, **sgd),
             penalty=lambda: 1e-2 * sum(g.abs().sum() for g in gammas))
    remove_channels(by_hand, pruner.select(by_hand, groups))
    finetune(by_hand, train, TrainConfig(epochs=1, lr=1e-3, **sgd))
    assert all(torch.equal(a, b) for a, b in zip(whole.state_dict().values(), by_hand.state_dict().values()))
    with pytest.raises(ConfigError, match="optimizer='adma' is not registered"):
        Recipe.from_yaml("stages:\n  - {method: slimming, config: {optimizer: adma}}\n")


def test_bad_input_gets_named_errors(digits_batches):
    train, _ = digits_batches
    with pytest.raises(InputError, match="labelled data"):
        SlimmingPruner().apply(make("lenet")[0])
    with pytest.raises(InputError, match="labelled"):
        SlimmingPruner(epochs=1, progress=False).apply(make("lenet")[0], [b[0] for b in train])
