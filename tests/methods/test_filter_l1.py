"""filter-l1 (Li et al. 2017): the removed filters are the smallest-L1 ones of each channel group (numpy
norms summed over coupled producers), parameter and MAC counts match the closed form, pruned models
deploy to int8, and fine-tuning (the shared training fields) keeps LeNet's digits accuracy."""

import copy

import numpy as np
import pytest
import torch
from torch import nn

import sdk
from examples.models import make
from plugins.prune.filter_l1 import FilterL1Pruner
from prune_helpers import digits_batches, lenet_macs, trained_lenet  # noqa: F401 (fixtures)
from sdk.channels import ChannelDependencyError, channel_groups
from sdk.errors import ConfigError, InputError
from sdk.graph import capture, macs
from sdk.recipe import Recipe
from sdk.trainer import TrainConfig, evaluate


pytestmark = pytest.mark.usefixtures("one_thread")   # tiny models: one thread is faster

ZOO = {"resnet18": lambda: make("resnet18", width=8), "mobilenetv2": lambda: make("mobilenetv2", width_mult=0.25)}


def test_filter_l1_removes_the_smallest_l1_filters_per_group():
    model, x = make("resnet18", width=8)
    ref = copy.deepcopy(model)
    groups = [g for g in channel_groups(ref, (x,)) if g.prunable]
    ratio = 0.3
    FilterL1Pruner(ratio=ratio, input_shape=tuple(x.shape)).apply(model)
    kept, kept_in = {}, {}
    for g in groups:
        weights = [ref.get_submodule(s.module).weight.detach().numpy() for s in g.of_role("out")]
        score = sum(np.abs(w).reshape(w.shape[0], -1).sum(1) for w in weights)     # Σ over coupled producers
        kept[g] = np.sort(np.argsort(score, kind="stable")[round(ratio * g.channels):])
        kept_in.update({s.module: kept[g] for s in g.of_role("in")})
    for g in groups:
        assert len(kept[g]) == g.channels - round(ratio * g.channels)
        for s in g.of_role("out"):
            w = ref.get_submodule(s.module).weight.detach().numpy()[kept[g]]
            w = w[:, kept_in[s.module]] if s.module in kept_in else w        # the stem reads the RGB input
            np.testing.assert_array_equal(model.get_submodule(s.module).weight.detach().numpy(), w)
        for s in g.of_role("norm"):
            np.testing.assert_array_equal(model.get_submodule(s.module).running_mean.numpy(),
                                          ref.get_submodule(s.module).running_mean.numpy()[kept[g]])
    assert model.fc.out_features == 10


def _total_macs(model, x):
    g = capture(model, (x,))
    return sum(macs(g, n) for n in g.nodes)


def test_filter_l1_params_and_macs_closed_form():
    model, x = make("lenet")           # conv 1→16, conv 16→32, fc 128→64, fc 64→10
    assert _total_macs(model, x) == lenet_macs()
    FilterL1Pruner(ratio=0.5, input_shape=(1, 1, 8, 8)).apply(model)
    c1, c2, h = 8, 16, 32
    params = (9 * c1 + c1) + 2 * c1 + (c1 * 9 * c2 + c2) + 2 * c2 + (c2 * 4 * h + h) + (h * 10 + 10)
    assert sum(p.numel() for p in model.parameters()) == params
    assert _total_macs(model, x) == lenet_macs(c1, c2, h)

    rounded, _ = make("lenet")
    FilterL1Pruner(ratio=0.3, round_to=4, exclude=("classifier.1",), input_shape=(1, 1, 8, 8)).apply(rounded)
    # keep 16−5=11 → 12, 32−10=22 → 24 (multiples of 4); the excluded fc keeps its 64
    assert (rounded.features[0].out_channels, rounded.features[4].out_channels) == (12, 24)
    assert rounded.classifier[1].out_features == 64


@pytest.mark.parametrize("name", ["resnet18", "mobilenetv2"])
def test_pruned_model_deploys_to_int8(name, tmp_path):
    model, x = ZOO[name]()
    full = sum(p.numel() for p in model.parameters())
    pruned = FilterL1Pruner(ratio=0.5, input_shape=tuple(x.shape)).apply(model)
    assert sum(p.numel() for p in pruned.parameters()) < 0.45 * full
    gen = torch.Generator().manual_seed(0)
    cal = [torch.randn(2, *x.shape[1:], generator=gen) for _ in range(4)]
    art = sdk.deploy(pruned, "arm-int8", (x,), calibration=cal, output=tmp_path / "a", progress=False)
    rep = art.verify(pruned, inputs=[torch.randn(*x.shape, generator=gen) for _ in range(3)])
    assert rep.sqnr_db["host"] > 25


def test_filter_l1_with_finetuning_keeps_digits_accuracy(trained_lenet, digits_batches):
    train, test = digits_batches
    base = evaluate(trained_lenet, test)
    pruned = FilterL1Pruner(ratio=0.3, finetune_epochs=3, lr=3e-3, progress=False).apply(
        copy.deepcopy(trained_lenet), train)
    assert pruned.features[4].out_channels == 22
    assert evaluate(pruned, test) >= base - 0.03       # measured: 0.991 → 0.982


def test_finetuning_uses_the_training_fields(trained_lenet, digits_batches):
    """The fine-tuning takes lr, optimizer and its options from the config (finetune_epochs long):
    sgd with a momentum of 0.5 from a YAML recipe ends elsewhere than plain sgd; a misspelt
    optimizer fails when the recipe is read."""
    train, _ = digits_batches
    assert issubclass(FilterL1Pruner.Config, TrainConfig) and FilterL1Pruner.Config().finetune_epochs == 0
    runs = {}
    for momentum in (0.0, 0.5):
        recipe = Recipe.from_yaml(f"stages:\n  - {{method: filter-l1, config: {{ratio: 0.3, finetune_epochs: 1, "
                                  f"lr: 0.01, optimizer: sgd, optimizer_options: {{momentum: {momentum}}}}}}}\n")
        runs[momentum] = sdk.compress(trained_lenet, recipe, data=train[:4], progress=False)
    assert runs[0.5].features[4].out_channels == 22
    assert not torch.equal(runs[0.0].features[4].weight, runs[0.5].features[4].weight)
    with pytest.raises(ConfigError, match="optimizer='adma' is not registered"):
        Recipe.from_yaml("stages:\n  - {method: filter-l1, config: {optimizer: adma}}\n")


class ChannelReshape(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(4 * 2 * 64, 4)

    def forward(self, x):
        return self.fc(self.c1(x).reshape(-1, 4, 2, 64).flatten(1))


def test_bad_input_gets_named_errors():
    with pytest.raises(ChannelDependencyError, match="reshape"):
        FilterL1Pruner(input_shape=(1, 3, 8, 8)).apply(ChannelReshape())
    with pytest.raises(InputError, match="input_shape"):
        FilterL1Pruner().apply(make("lenet")[0])
    with pytest.raises(InputError, match="data"):
        FilterL1Pruner(finetune_epochs=1, input_shape=(1, 1, 8, 8)).apply(make("lenet")[0])
    with pytest.raises(ConfigError, match="ratio"):
        FilterL1Pruner(ratio=1.0)
    with pytest.raises(ConfigError, match="round_to"):
        FilterL1Pruner(round_to=0)
