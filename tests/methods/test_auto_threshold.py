"""auto-threshold (learned thresholds, after Azarian et al. 2020): the forward mask is exactly
|w| > t, the thresholds get the straight-through gradient computed by hand, training lands near the
target sparsity and the final projection meets it exactly with masks still |w| > t, the digits
LeNet keeps its accuracy, and the sparsity is shipped in the arm-int8 manifest."""

import copy

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

import sdk
from examples.models import make
from plugins.prune.auto_threshold import AutoThresholdPruner, LearnedThreshold
from prune_helpers import calibration, digits_batches, trained_lenet  # noqa: F401 (fixtures)
from sdk.errors import ConfigError, InputError
from sdk.masks import apply_mask, bake, mask_of, prunable_layers, smallest_mask
from sdk.recipe import Recipe
from sdk.trainer import evaluate

pytestmark = pytest.mark.usefixtures("one_thread")   # tiny models: one thread is faster


LAYERS = ("features.0", "features.4", "classifier.1", "classifier.3")


def _sigmoid(z):
    return 1 / (1 + np.exp(-z))


def test_the_forward_mask_is_exactly_abs_w_above_t():
    model, x = make("lenet")
    raw = {n: model.get_submodule(n).weight.detach().clone() for n in LAYERS}
    pruner = AutoThresholdPruner(init=0.8, temperature=0.1)
    layers = pruner.attach(model)
    assert list(layers) == list(LAYERS)
    for name, mod in layers.items():
        lt = next(p for p in mod.parametrizations.weight if isinstance(p, LearnedThreshold))
        std = float(raw[name].std(correction=0))
        assert float(lt.threshold.detach()) == pytest.approx(0.8 * std) and lt.temperature == pytest.approx(0.1 * std)
        w = raw[name]
        assert torch.equal(mod.weight, w * (w.abs() > lt.threshold).float())


def test_thresholds_and_weights_get_the_hand_computed_gradient():
    """L = Σ R ⊙ (x W_effᵀ): ∂L/∂W_eff = Rᵀx = G, and with s = σ((|w| − t)/T) the straight-through
    mask gives ∂L/∂t = Σ G·w·(−s(1 − s)/T) and ∂L/∂w = G·(|w| > t) + G·w·sign(w)·s(1 − s)/T."""
    torch.manual_seed(0)
    layer = nn.Linear(6, 4, bias=False)
    pruner = AutoThresholdPruner(init=0.5, temperature=0.2)
    pruner.attach(layer)
    lt = layer.parametrizations.weight[0]
    x, r = torch.randn(5, 6), torch.randn(5, 4)
    (layer(x) * r).sum().backward()
    w = layer.parametrizations.weight.original.detach().double().numpy()
    t, temp = float(lt.threshold.detach()), lt.temperature
    g = r.double().numpy().T @ x.double().numpy()
    s = _sigmoid((np.abs(w) - t) / temp)
    ds = s * (1 - s) / temp
    assert 0 < (np.abs(w) > t).mean() < 1
    assert float(lt.threshold.grad) == pytest.approx(float((g * w * -ds).sum()), rel=1e-5)
    np.testing.assert_allclose(layer.parametrizations.weight.original.grad.double().numpy(),
                               g * (np.abs(w) > t) + g * w * np.sign(w) * ds, rtol=1e-5, atol=1e-7)


def test_the_regulariser_is_the_squared_soft_density_gap():
    model, _ = make("lenet")
    pruner = AutoThresholdPruner(sparsity=0.7, strength=3.0, init=0.5, temperature=0.1)
    layers = pruner.attach(model)
    kept = total = 0.0
    for mod in layers.values():
        lt = mod.parametrizations.weight[0]
        w = mod.parametrizations.weight.original.detach().double().numpy()
        kept += _sigmoid((np.abs(w) - float(lt.threshold.detach())) / lt.temperature).sum()
        total += w.size
    assert float(pruner.penalty(layers).detach()) == pytest.approx(3.0 * (kept / total - 0.3) ** 2, rel=1e-4)


@pytest.fixture(scope="module")
def learned(trained_lenet, digits_batches):
    train, _ = digits_batches
    pruner = AutoThresholdPruner(sparsity=0.8, strength=10.0, temperature=0.3, epochs=5, lr=1e-3, progress=False)
    return pruner, pruner.apply(copy.deepcopy(trained_lenet), train)


def test_training_reaches_the_target_and_the_projection_meets_it_exactly(trained_lenet, learned):
    pruner, model = learned
    sizes = {n: model.get_submodule(n).weight.numel() for n in LAYERS}
    total = sum(sizes.values())
    before = sum(pruner.learned[n] * sizes[n] for n in LAYERS) / total
    assert before == pytest.approx(0.8, abs=0.03), pruner.learned                  # measured 0.806
    assert len(set(round(v, 2) for v in pruner.learned.values())) == 4             # one sparsity per layer
    zeros = 0
    for name in LAYERS:
        mod = model.get_submodule(name)
        raw = mod.parametrizations.weight.original.detach()
        mask = mask_of(mod)
        assert torch.equal(mask, (raw.abs() > pruner.thresholds[name]).float()), name
        zeros += int((mask == 0).sum())
    assert zeros == round(0.8 * total)
    # the projection is one global ranking by |w| / t_learned: the same masks as sdk.masks.smallest_mask
    ratios = torch.cat([model.get_submodule(n).parametrizations.weight.original.detach().abs().reshape(-1)
                        / pruner.thresholds[n] for n in LAYERS])
    keep = smallest_mask(ratios, 0.8)
    assert torch.equal(keep, torch.cat([mask_of(model.get_submodule(n)).reshape(-1) for n in LAYERS]))


def test_digits_accuracy_and_the_sparsity_shipped_in_arm_int8(trained_lenet, learned, digits_batches, digits,
                                                             tmp_path):
    _, test = digits_batches
    xtr, _, xte, yte = digits
    base = evaluate(trained_lenet, test)
    _, model = learned
    small = bake(copy.deepcopy(model))
    acc = evaluate(small, test)
    assert acc >= base - 0.015, (base, acc)                                        # measured 0.980 → 0.991
    art = sdk.deploy(small, "arm-int8", (xte[:1],), calibration=calibration(xtr),
                     output=tmp_path / "a", progress=False)
    rows = {r["layer"]: r["sparsity"] for r in art.manifest["encodings"]}
    for name, mod in prunable_layers(small):
        density = float((mod.weight != 0).float().mean())
        assert rows[name]["density"] == pytest.approx(density, abs=1e-5), name
    assert rows["features.4"]["shipped"] == "sparse"
    int8 = np.concatenate([art.run(xte[i:i + 1])[0] for i in range(len(xte))]).argmax(1)
    assert np.mean(int8 == yte.numpy()) >= acc - 0.02
    # arm-fp32 ships every sparse FC and the sparse conv in a sparse format: the file shrinks 3×
    fp32 = {name: sdk.deploy(m, "arm-fp32", (xte[:1],), output=tmp_path / name, progress=False)
            for name, m in (("sparse", small), ("dense", trained_lenet))}
    size = {k: len(a.read_bytes("model.tflite")) for k, a in fp32.items()}
    assert size["sparse"] < 0.4 * size["dense"], size                              # measured 17680 vs 57024 B
    assert sum(r["sparsity"]["shipped"] == "sparse" for r in fp32["sparse"].manifest["encodings"]) >= 3


def test_earlier_masks_stay_and_count(digits_batches):
    """A layer an earlier stage masked keeps those zeros; they count towards the target."""
    train, _ = digits_batches
    model, _ = make("lenet", randomize_bn=False)
    fc = model.classifier[1]
    earlier = torch.ones_like(fc.weight)
    earlier[:, :64] = 0.0
    apply_mask(fc, earlier)
    pruner = AutoThresholdPruner(sparsity=0.6, epochs=1, max_steps=3, lr=1e-3, progress=False)
    pruner.apply(model, train[:3])
    assert torch.all(mask_of(fc)[:, :64] == 0)
    zeros = sum(int((mask_of(model.get_submodule(n)) == 0).sum()) for n in LAYERS)
    assert zeros == round(0.6 * sum(model.get_submodule(n).weight.numel() for n in LAYERS))


def test_a_yaml_recipe_runs_it_through_compress(digits_batches):
    train, _ = digits_batches
    recipe = Recipe.from_yaml("stages:\n  - method: auto-threshold\n    config: {sparsity: 0.5, epochs: 1, max_steps: 2, "
                              "optimizer: sgd, lr: 0.01}\n")
    small = sdk.compress(make("lenet", randomize_bn=False)[0], recipe, data=train, progress=False)
    layers = prunable_layers(small)
    assert not any(parametrize.is_parametrized(m) for _, m in layers)          # baked: plain weights
    assert sum(int((m.weight == 0).sum()) for _, m in layers) == round(0.5 * sum(m.weight.numel() for _, m in layers))


def test_bad_config_and_input_get_named_errors():
    with pytest.raises(ConfigError, match="sparsity"):
        AutoThresholdPruner(sparsity=1.0)
    with pytest.raises(ConfigError, match="temperature"):
        AutoThresholdPruner(temperature=0.0)
    with pytest.raises(InputError, match="labelled data"):
        AutoThresholdPruner().apply(make("lenet")[0])
