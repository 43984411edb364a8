"""bo-mixed-precision: the GP posterior and EI against hand-written formulas (numpy inverse, scipy
quadrature), the search honours the budget on every trial, at a tight BOPs budget its arm-int8 artifact
beats the uniform lowest width and matches the torch integer simulation on held-out digits, a YAML
recipe records the trials in the manifest, and the trial / time bounds stop the search."""

import math

import numpy as np
import pytest
import torch
from scipy import integrate, stats
from torch import nn

from quant_helpers import artifact_accuracy, deploy_int8, float_mlp  # noqa: F401 (fixture)
from plugins.quantize.bo_mixed_precision import BOMixedPrecision, GaussianProcess, expected_improvement
from sdk import bit_search as bs
from sdk.errors import ConfigError
from sdk.fakequant import simulate
from sdk.recipe import Recipe

pytestmark = pytest.mark.usefixtures("one_thread")


def test_gp_posterior_equals_the_textbook_formula():
    """3 observations in 2-D: mean μ + σ·k*ᵀ(K + s²I)⁻¹(y − μ)/σ and variance σ²(1 − k*ᵀ(K + s²I)⁻¹k*), with the
    Matérn-5/2 kernel written out here and numpy's inverse."""
    x = np.array([[0.0, 1.0], [1.0, 0.3], [0.5, 0.5]])
    y = np.array([0.9, 0.7, 0.8])
    xs = np.array([[0.2, 0.9], [1.0, 1.0]])
    ls, noise = 0.7, 1e-2

    def k(a, b, ls=ls):
        r = np.linalg.norm(a - b) / ls
        return (1 + math.sqrt(5) * r + 5 * r * r / 3) * math.exp(-math.sqrt(5) * r)

    K = np.array([[k(a, b) for b in x] for a in x]) + noise * np.eye(3)
    ks = np.array([[k(a, b) for b in x] for a in xs])
    mu, sd = y.mean(), y.std()
    inv = np.linalg.inv(K)
    mean = mu + sd * ks @ inv @ ((y - mu) / sd)
    var = sd ** 2 * (1 - np.einsum("ij,jk,ik->i", ks, inv, ks))
    gp_mean, gp_var = GaussianProcess(ls, noise).fit(x, y).predict(xs)
    np.testing.assert_allclose(gp_mean, mean, rtol=1e-10)
    np.testing.assert_allclose(gp_var, var, rtol=1e-8)
    # the marginal likelihood picks a GP from the grid: no grid point has a greater one
    best = GaussianProcess.select(x, y)
    z = (y - mu) / sd
    for ls2 in (0.1, 1.0, 3.0):
        K2 = np.array([[k(a, b, ls2) for b in x] for a in x]) + 1e-2 * np.eye(3)
        lml = -0.5 * z @ np.linalg.solve(K2, z) - 0.5 * np.linalg.slogdet(K2)[1] - 1.5 * math.log(2 * math.pi)
        assert best.lml >= lml - 1e-9


def test_expected_improvement_equals_the_integral():
    for mean, std, best in [(0.8, 0.05, 0.82), (0.9, 0.2, 0.7), (0.5, 1e-3, 0.6), (0.0, 1.0, 0.0)]:
        ref, _ = integrate.quad(lambda f: (f - best) * stats.norm.pdf(f, mean, std), best, mean + 12 * std)
        assert expected_improvement(np.array([mean]), np.array([std]), best)[0] == pytest.approx(ref, abs=1e-9)
    assert expected_improvement(np.array([0.7, 0.4]), np.array([0.0, 0.0]), 0.5).tolist() == pytest.approx([0.2, 0])


def test_tight_bops_budget_from_a_yaml_recipe(float_mlp, digits, tmp_path):
    """A quarter of int8's BOPs (all-2-bit exactly) with widths 8/4/2/1: every trial within it, the trial
    history in the manifest, the artifact at least 1.5 points above the uniform lowest width (all binary,
    fine-tuned as long) and within 1.5 points of the torch integer simulation on the held-out digits."""
    model, train = float_mlp
    _, _, xte, yte = digits
    layers = bs.search_layers(model, (xte[:1],))
    budget = bs.cost(layers, (8, 8, 8), "bops") // 4
    path = tmp_path / "r.yaml"
    path.write_text(f"stages:\n  - method: bo-mixed-precision\n    config: {{max_bops: {budget}, bits: [8, 4, 2, 1], "
                    "trials: 10, init_trials: 4, finetune_steps: 40, final_epochs: 2, progress: false}\n")
    art = deploy_int8(model, digits, recipe=Recipe.from_yaml(path.read_text()), data=train)
    (report,) = art.manifest["stages"]
    assert report["method"] == "bo-mixed-precision" and len(report["trials"]) == 10
    assert all(t["costs"]["bops"] <= budget for t in report["trials"])
    assert [t["origin"] for t in report["trials"]] == ["uniform"] + ["initial"] * 3 + ["acquisition"] * 6
    assert report["trials"][0]["bits"] == [2, 2, 2]         # the widest uniform width within the budget
    best = report["best"]
    assert best["accuracy"] == max(t["accuracy"] for t in report["trials"])
    acc = artifact_accuracy(art, xte, yte)
    baked = BOMixedPrecision(max_bops=budget, bits=(8, 4, 2, 1), trials=10, init_trials=4, finetune_steps=40,
                             final_epochs=2, progress=False).apply(model, train)
    assert baked._edgepack_bit_search["best"] == best                     # deterministic for the seed
    with simulate(baked):
        torch_acc = float((baked(xte).argmax(1) == yte).float().mean())
    assert abs(acc - torch_acc) <= 0.015, (acc, torch_acc)
    lowest = bs.apply_bits(model, layers, (1, 1, 1), train, epochs=2)
    low_acc = artifact_accuracy(deploy_int8(lowest, digits), xte, yte)
    print(f"\nbo {best['bits']} artifact {acc:.4f} (torch {torch_acc:.4f}); all-binary {low_acc:.4f}")
    assert acc >= low_acc + 0.015, (acc, low_acc)


def test_trial_and_time_bounds_stop_the_search(float_mlp):
    model, train = float_mlp
    cfg = dict(max_weight_bytes=10 ** 6, bits=(8, 4, 2), init_trials=2, finetune_steps=3, final_epochs=0,
               progress=False)
    rec = BOMixedPrecision(trials=3, **cfg).apply(model, train)._edgepack_bit_search
    assert len(rec["trials"]) == 3
    rec = BOMixedPrecision(trials=50, max_seconds=1e-3, **cfg).apply(model, train)._edgepack_bit_search
    assert len(rec["trials"]) == 1
    # 2 layers x 2 widths under a bytes budget that excludes all-8: the 3 feasible ones, then it stops
    small = nn.Sequential(nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))
    layers = bs.search_layers(small, (torch.zeros(1, 64),))
    limit = bs.cost(layers, (8, 8), "bytes") - 1
    flat = [(x.flatten(1), y) for x, y in train]
    rec = BOMixedPrecision(max_weight_bytes=limit, bits=(8, 4), trials=20, init_trials=1, finetune_steps=2,
                           final_epochs=0, progress=False).apply(small, flat)._edgepack_bit_search
    assert sorted(tuple(t["bits"]) for t in rec["trials"]) == [(4, 4), (4, 8), (8, 4)]


def test_bad_configs_are_named(float_mlp):
    model, train = float_mlp
    with pytest.raises(ConfigError, match="give a budget"):
        BOMixedPrecision(progress=False).apply(model, train)
    layers = bs.search_layers(model, (torch.zeros(1, 1, 8, 8),))
    least = bs.cost(layers, (2, 2, 2), "bops")
    with pytest.raises(ConfigError, match=f"at least {least}"):
        BOMixedPrecision(max_bops=least - 1, progress=False).apply(model, train)
    with pytest.raises(ConfigError, match="bits"):
        BOMixedPrecision(max_bops=10, bits=(8, 16))
    with pytest.raises(ConfigError, match="init_trials"):
        BOMixedPrecision(max_bops=10, trials=3, init_trials=4)
    assert BOMixedPrecision.Config.from_dict(BOMixedPrecision(max_bops=10, bits=[2, 8]).config.to_dict()).bits == (8, 2)
