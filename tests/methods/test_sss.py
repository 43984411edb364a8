"""sss (Huang & Wang 2018): the APG step is the hand-computed soft-threshold update, the first factor
update in training follows from the BatchNorm gradient identity, factors reach exact zeros, removing
the zero channels or blocks leaves the function unchanged, and the pruned models ship with fewer MACs
(closed form) at digits accuracy."""

import copy

import numpy as np
import pytest
import torch
from torch import nn

import sdk
from examples.models import InvertedResidual, make
from plugins.prune.sss import SSSPruner, residual_blocks, residual_branch
from prune_helpers import (calibration, deploy_with_dense, digits_batches, int8_accuracy, lenet_macs,  # noqa: F401
                           trained_lenet)
from sdk.errors import ConfigError, InputError
from sdk.penalties import APG
from sdk.recipe import Recipe
from sdk.trainer import TrainConfig, evaluate, finetune

pytestmark = pytest.mark.usefixtures("one_thread")   # tiny models: one thread is faster


@pytest.mark.parametrize("momentum,expect", [
    # S(z, ηγ) with η = 0.5, γ = 0.2 (threshold 0.1), by hand:
    # step 1: z = λ0 − η·g1 = [0.8, 0.4, −0.25, 0.05] → S = [0.7, 0.3, −0.15, 0]
    (0.9, {"iterate1": [0.7, 0.3, -0.15, 0.0], "param1": [0.43, 0.3, -0.105, -0.045],      # S + 0.9·(S − λ0)
           "iterate2": [0.28, 0.15, 0.0, 0.0], "param2": [-0.098, 0.015, 0.135, 0.0]}),
    # Nesterov: μ1 = 0, μ2 = 1/4; step 2 from λ'1 = S1: z = [0.65, 0.25, −0.1, 0]
    (None, {"iterate1": [0.7, 0.3, -0.15, 0.0], "param1": [0.7, 0.3, -0.15, 0.0],
            "iterate2": [0.55, 0.15, 0.0, 0.0], "param2": [0.5125, 0.1125, 0.0375, 0.0]}),
])
def test_apg_step_is_the_hand_computed_soft_threshold_update(momentum, expect):
    lam = nn.Parameter(torch.tensor([1.0, 0.3, -0.2, 0.05], dtype=torch.float64))
    apg = APG([lam], lr=0.5, gamma=0.2, momentum=momentum)
    for step, grad in ((1, [0.4, -0.2, 0.1, 0.0]), (2, [0.1, 0.1, -0.1, 0.0])):
        lam.grad = torch.tensor(grad, dtype=torch.float64)
        apg.step()
        assert lam.grad is None
        np.testing.assert_allclose(apg.iterates[0].numpy(), expect[f"iterate{step}"], atol=1e-9)
        np.testing.assert_allclose(lam.detach().numpy(), expect[f"param{step}"], atol=1e-9)
    apg.finish()
    np.testing.assert_allclose(lam.detach().numpy(), expect["iterate2"], atol=1e-9)


def _factor_grads(model, batch):
    """∂CE/∂λ at λ = 1, without any factor: λ scales BN(x) = γx̂ + β, so ∂/∂λ = γ·∂/∂γ + β·∂/∂β;
    for the linear layer (no BN) λ scales Wx + b: Σ_i W_ci ∂/∂W_ci + b_c ∂/∂b_c."""
    model = copy.deepcopy(model).train()
    x, y = batch
    nn.functional.cross_entropy(model(x), y).backward()
    grads = {}
    for name in ("features.1", "features.5"):
        bn = model.get_submodule(name)
        grads[name] = (bn.weight * bn.weight.grad + bn.bias * bn.bias.grad).detach()
    fc = model.classifier[1]
    grads["classifier.1"] = ((fc.weight * fc.weight.grad).sum(1) + fc.bias * fc.bias.grad).detach()
    return grads


@pytest.mark.parametrize("solver", ["apg", "subgradient"])
def test_first_factor_update_follows_the_bn_gradient_identity(trained_lenet, digits_batches, solver):
    train, _ = digits_batches
    eta, gamma, lr = 0.1, 0.03, 1e-3
    pruner = SSSPruner(gamma=gamma, factor_lr=eta, solver=solver, epochs=1, max_steps=1, lr=lr, progress=False)
    model = copy.deepcopy(trained_lenet)
    factors = pruner.attach(model, train)
    assert [s for site in factors.sites for s, _ in site] == ["features.1", "features.5", "classifier.1"]
    pruner.train(model, train, factors)
    grads = _factor_grads(trained_lenet, train[0])
    for (module, _), lam in zip([site[0] for site in factors.sites], pruner.factors):
        g = grads[module].double()
        if solver == "apg":      # λ1 = S(1 − η·g, η·γ)
            expect = torch.sign(1 - eta * g) * torch.clamp((1 - eta * g).abs() - eta * gamma, min=0)
        else:                    # Adam's first step on CE + γ‖λ‖₁: λ − lr · ĝ / (|ĝ| + ε), ĝ = g + γ
            total = g + gamma
            expect = 1 - lr * total / (total.abs() + 1e-8)
        np.testing.assert_allclose(lam.double().numpy(), expect.numpy(), rtol=1e-5, atol=1e-7, err_msg=module)


def test_channel_factors_reach_zero_and_their_removal_is_exact(trained_lenet, digits_batches, digits, tmp_path):
    train, test = digits_batches
    xtr, _, xte, yte = digits
    base = evaluate(trained_lenet, test)
    pruner = SSSPruner(gamma=0.03, factor_lr=0.1, epochs=10, lr=1e-3, progress=False)
    model = copy.deepcopy(trained_lenet)
    factors = pruner.attach(model, train)
    pruner.train(model, train, factors)
    zeros = [int((lam == 0).sum()) for lam in pruner.factors]
    assert sum(zeros) >= 0.3 * sum(len(lam) for lam in pruner.factors), zeros      # measured [0, 14, 45] of 112
    before = model.eval()(xte).detach()
    pruner.remove(model, factors)
    torch.testing.assert_close(model(xte), before, atol=1e-4, rtol=1e-4)           # measured max |Δ| 3e-6
    c1, c2, h = model.features[0].out_channels, model.features[4].out_channels, model.classifier[1].out_features
    assert (16 - c1, 32 - c2, 64 - h) == tuple(zeros)
    finetune(model, train, TrainConfig(epochs=3, lr=1e-3, progress=False))
    acc = evaluate(model, test)
    assert acc >= base - 0.02, (base, acc)                                         # measured 0.980 → 0.996
    art, dense = deploy_with_dense(model, trained_lenet, xtr, xte, tmp_path)
    size = len(art.read_bytes("model.tflite")), len(dense.read_bytes("model.tflite"))
    assert size[0] < 0.6 * size[1], size                                           # measured 9152 vs 20064 B
    assert art.profile["estimate"]["macs"] == lenet_macs(c1, c2, h) < 0.7 * lenet_macs()
    assert int8_accuracy(art, xte, yte) >= acc - 0.02


class Residual(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.branch = nn.Sequential(nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(),
                                    nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c))

    def forward(self, x):
        return x + self.branch(x)


def _residual_net(c=8, blocks=6):
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(), nn.MaxPool2d(2),
                         *[Residual(c) for _ in range(blocks)], nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, 10))


def test_zero_blocks_are_deleted_and_the_function_is_unchanged(digits_batches, digits, tmp_path):
    """From scratch, as the paper trains: block factors reach exact zeros, those blocks become
    nn.Identity, the outputs do not move, and the artifact has 18432 MACs fewer per deleted block."""
    train, test = digits_batches
    xtr, _, xte, yte = digits
    model = _residual_net()
    per_block, dense = 2 * 8 * 8 * 9 * 16, 8 * 9 * 64 + 6 * 2 * 8 * 8 * 9 * 16 + 8 * 10
    pruner = SSSPruner(structure="blocks", gamma=0.3, factor_lr=0.05, epochs=10, lr=1e-2,
                       optimizer_options={"weight_decay": 1e-2}, progress=False)
    factors = pruner.attach(model)
    assert factors.sites == [str(i) for i in range(4, 10)] and set(factors.branches) == {"branch"}
    pruner.train(model, train, factors)
    deleted = [name for name, lam in zip(factors.sites, pruner.factors) if float(lam) == 0.0]
    assert 1 <= len(deleted) < 6, pruner.factors                                   # measured 3 of 6
    before = model.eval()(xte).detach()
    pruner.remove(model, factors)
    assert all(isinstance(model.get_submodule(n), nn.Identity) for n in deleted) and list(pruner.removed) == deleted
    torch.testing.assert_close(model(xte), before, atol=1e-4, rtol=1e-4)
    finetune(model, train, TrainConfig(epochs=5, lr=3e-3, progress=False))
    acc = evaluate(model, test)
    assert acc >= 0.95, acc                                                        # measured 0.989
    art = sdk.deploy(model, "arm-int8", (xte[:1],), calibration=calibration(xtr),
                     output=tmp_path / "b", progress=False)
    assert art.profile["estimate"]["macs"] == dense - per_block * len(deleted)
    int8 = np.concatenate([art.run(xte[i:i + 1])[0] for i in range(len(xte))]).argmax(1)
    assert np.mean(int8 == yte.numpy()) >= acc - 0.03


def test_residual_blocks_are_found_by_their_forward():
    assert residual_branch(Residual(4)) == "branch"
    assert residual_branch(InvertedResidual(16, 16, 1, 6)) == "block"          # x + block(x)
    assert residual_branch(InvertedResidual(16, 24, 1, 6)) is None            # no shortcut
    assert residual_branch(make("resnet18", width=8)[0].layers[0]) is None    # relu(f(x) + shortcut(x))
    mobile, _ = make("mobilenetv2", width_mult=0.25)
    found = residual_blocks(mobile)
    assert found and all(mobile.get_submodule(n).use_res for n in found) and set(found.values()) == {"block"}
    assert len(found) == sum(isinstance(m, InvertedResidual) and m.use_res for m in mobile.modules())
    with pytest.raises(InputError, match="not a residual block"):
        residual_blocks(mobile, ("features.1",))


def test_a_yaml_recipe_runs_it_through_compress(trained_lenet, digits_batches):
    """By name from a recipe: the result is a plain smaller model (no hooks, no factors left)."""
    train, _ = digits_batches
    recipe = Recipe.from_yaml("stages:\n  - method: sss\n    config: {gamma: 0.1, factor_lr: 0.1, epochs: 2, "
                              "lr: 0.001, finetune_epochs: 1}\n")
    small = sdk.compress(trained_lenet, recipe, data=train, progress=False)
    assert not any(m._forward_hooks for m in small.modules())
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in trained_lenet.parameters())
    with pytest.raises(InputError, match="needs the data stream"):
        sdk.compress(trained_lenet, recipe)


def test_bad_config_and_input_get_named_errors():
    with pytest.raises(ConfigError, match="structure"):
        SSSPruner(structure="layers")
    with pytest.raises(ConfigError, match="solver"):
        SSSPruner(solver="sgd")
    with pytest.raises(ConfigError, match="momentum"):
        SSSPruner(momentum=1.0)
    with pytest.raises(InputError, match="labelled data"):
        SSSPruner().apply(make("lenet")[0])
    with pytest.raises(InputError, match="no residual block"):
        SSSPruner(structure="blocks").attach(make("lenet")[0])
