"""regularization (L1 / L2 / group lasso): each penalty equals its numpy formula and has the analytic
gradient, the proximal steps are the closed-form shrinkages, the group lasso zeroes whole filters
where L1 at the same strength only scatters zeros, zero input groups are removed without changing
the function, the group-pruned LeNet ships with fewer MACs (closed form) at digits accuracy, and
the penalty reaches the training of a later recipe stage."""

import copy
import math

import numpy as np
import pytest
import torch

import sdk
from examples.models import make
from plugins.prune.regularization import RegularizationPruner, Regularizer
from plugins.prune.threshold import ThresholdPruner
from prune_helpers import (calibration, deploy_with_dense, digits_batches, int8_accuracy, lenet_macs,  # noqa: F401
                           trained_lenet)
from sdk.errors import ConfigError, InputError
from sdk.masks import bake, prunable_layers
from sdk.trainer import TrainConfig, classification_loss, evaluate, fit

pytestmark = pytest.mark.usefixtures("one_thread")   # tiny models: one thread is faster


LAYERS = ("features.0", "features.4", "classifier.1", "classifier.3")
X = (1, 1, 8, 8)                    # LeNet's input shape, for tracing without data


def _w(model, name):
    return model.get_submodule(name).weight.detach().double().numpy()


def _filters(w):          # rows W[c] of a conv / linear weight
    return w.reshape(w.shape[0], -1)


def _columns(w, repeat=1):  # groups W[:, c·repeat … c·repeat + repeat − 1]
    cols = np.moveaxis(w, 1, 0).reshape(w.shape[1], -1)
    return cols.reshape(w.shape[1] // repeat, -1)


def _lasso(rows):          # Σ_c √p ‖W_c‖ with p the row length
    return math.sqrt(rows.shape[1]) * np.linalg.norm(rows, axis=1).sum()


def _groups_by_hand(model, role):
    """LeNet's penalised groups as row matrices: channels of features.0, features.4, classifier.1
    (the classifier's outputs are fixed); 'in' groups are the columns of the layer that reads them."""
    if role == "out":
        return [_filters(_w(model, n)) for n in LAYERS[:3]]
    return [_columns(_w(model, "features.4")), _columns(_w(model, "classifier.1"), repeat=4),
            _columns(_w(model, "classifier.3"))]


@pytest.mark.parametrize("penalty,groups", [("l1", "out"), ("l2", "out"), ("group", "out"), ("group", "in")])
def test_penalty_equals_the_hand_formula(penalty, groups):
    model, _ = make("lenet")
    lam = 0.37
    reg = RegularizationPruner(penalty=penalty, groups=groups, strength=lam, input_shape=X).regularizer(model)
    if penalty == "l1":
        expect = lam * sum(np.abs(_w(model, n)).sum() for n in LAYERS)
    elif penalty == "l2":
        expect = lam * 0.5 * sum((_w(model, n) ** 2).sum() for n in LAYERS)
    else:
        expect = lam * sum(_lasso(rows) for rows in _groups_by_hand(model, groups))
    assert float(reg(model).detach()) == pytest.approx(expect, rel=1e-5)


def test_coupled_channels_form_one_group():
    """A residual add ties the channels of several convolutions: one group per channel spans all
    their filters (ResNet-18's stem and first stage), p = the total length."""
    model, x = make("resnet18", width=8)
    reg = RegularizationPruner(penalty="group", strength=1.0, input_shape=tuple(x.shape)).regularizer(model)
    coupled = max(reg.groups, key=lambda g: len(g.of_role("out")))
    assert len(coupled.of_role("out")) >= 3
    rows = np.concatenate([_filters(_w(model, s.module)) for s in coupled.of_role("out")], axis=1)
    assert float(Regularizer("group", 1.0, groups=(coupled,))(model).detach()) == pytest.approx(_lasso(rows), rel=1e-5)


@pytest.mark.parametrize("penalty,groups", [("l1", "out"), ("l2", "out"), ("group", "out"), ("group", "in")])
def test_penalty_gradient_is_the_analytic_one(penalty, groups):
    model, _ = make("lenet")
    with torch.no_grad():
        model.features[4].weight[3] = 0.0                 # a zero filter: subgradient 0
        model.classifier[3].weight[:, 5] = 0.0            # a zero input column of the last layer
    lam = 0.5
    reg = RegularizationPruner(penalty=penalty, groups=groups, strength=lam, input_shape=X).regularizer(model)
    reg(model).backward()
    for name in LAYERS:
        w, grad = _w(model, name), model.get_submodule(name).weight.grad
        grad = np.zeros_like(w) if grad is None else grad.double().numpy()   # None: not in the penalty
        if penalty == "l1":
            expect = lam * np.sign(w)
        elif penalty == "l2":
            expect = lam * w
        elif groups == "out":
            rows = _filters(w)
            norms = np.linalg.norm(rows, axis=1, keepdims=True)
            fixed = name == "classifier.3"                 # the classifier's outputs are not penalised
            expect = 0 * rows if fixed else lam * math.sqrt(rows.shape[1]) * np.divide(
                rows, norms, out=np.zeros_like(rows), where=norms > 0)
            expect = expect.reshape(w.shape)
        else:
            repeat = {"features.4": 1, "classifier.1": 4, "classifier.3": 1}.get(name)
            if repeat is None:                             # features.0 reads the model input: fixed
                expect = 0 * w
            else:
                rows = _columns(w, repeat)
                norms = np.linalg.norm(rows, axis=1, keepdims=True)
                g = lam * math.sqrt(rows.shape[1]) * np.divide(rows, norms, out=np.zeros_like(rows), where=norms > 0)
                expect = np.moveaxis(g.reshape(w.shape[1], w.shape[0], *w.shape[2:]), 0, 1)
        np.testing.assert_allclose(grad, expect, rtol=1e-5, atol=1e-7, err_msg=name)


def test_proximal_steps_are_the_closed_form_shrinkages():
    model, _ = make("lenet")
    t = 0.02
    for penalty in ("l1", "l2"):
        m = copy.deepcopy(model)
        RegularizationPruner(penalty=penalty, strength=2.0).regularizer(m).prox(m, t / 2.0)
        for name in LAYERS:
            w = _w(model, name)
            expect = np.sign(w) * np.maximum(np.abs(w) - t, 0) if penalty == "l1" else w / (1 + t)
            np.testing.assert_allclose(_w(m, name), expect, rtol=1e-6, atol=1e-7)
    m = copy.deepcopy(model)
    step = float(np.median(np.linalg.norm(_filters(_w(model, "features.4")), axis=1))) / 12   # √p = 12
    RegularizationPruner(penalty="group", strength=1.0, input_shape=X).regularizer(m).prox(m, step)
    for name in LAYERS[:3]:
        rows = _filters(_w(model, name))
        norms = np.linalg.norm(rows, axis=1, keepdims=True)
        expect = rows * np.maximum(0, 1 - step * math.sqrt(rows.shape[1]) / norms)
        np.testing.assert_allclose(_filters(_w(m, name)), expect, rtol=1e-5, atol=1e-7)
    zero = np.abs(_filters(_w(m, "features.4"))).sum(1) == 0
    assert zero.sum() == 16                                 # the filters below the median: exactly 0
    np.testing.assert_array_equal(_w(m, "classifier.3"), _w(model, "classifier.3"))   # fixed: untouched


def _sparse_train(model, data, **cfg):
    pruner = RegularizationPruner(prune=False, epochs=5, lr=1e-3, progress=False, **cfg)
    return pruner.apply(model, data)


def test_group_lasso_zeroes_whole_filters_l1_only_scatters_zeros(trained_lenet, digits_batches):
    """Same λ = 1, same training: L1 zeroes more weights in all, yet no whole filter; the group
    lasso (√p-weighted, so one λ is one strength) zeroes whole filters."""
    train, _ = digits_batches
    counts = {}
    for penalty in ("l1", "group"):
        m = _sparse_train(copy.deepcopy(trained_lenet), train, penalty=penalty, strength=1.0)
        rows = [_filters(_w(m, n)) for n in LAYERS[:3]]
        counts[penalty] = (sum(int((np.abs(r).sum(1) == 0).sum()) for r in rows),
                           sum(int((r == 0).sum()) for r in rows) / sum(r.size for r in rows))
    assert counts["group"][0] >= 10 and counts["l1"][0] == 0, counts         # measured 26 vs 0 filters
    assert counts["l1"][1] > counts["group"][1], counts                      # measured 0.61 vs 0.26 of weights


def test_zero_input_groups_are_removed_without_changing_the_function(trained_lenet, digits_batches):
    train, test = digits_batches
    model = copy.deepcopy(trained_lenet)
    pruner = RegularizationPruner(penalty="group", groups="in", strength=0.5, epochs=10, lr=1e-3, progress=False)
    reg = pruner.regularizer(model, train)
    pruner.train(model, train, reg)
    before = model(test[0][0]).detach()
    pruner.prune(model, reg)
    removed = sum(len(v) for v in pruner.removed.values())
    fc_group = pruner.removed[("classifier.1", "classifier.3")]
    assert removed == len(fc_group) >= 10 and model.classifier[3].in_features == 64 - len(fc_group)
    torch.testing.assert_close(model(test[0][0]), before, atol=1e-5, rtol=1e-5)   # measured 23 channels removed


def test_group_pruned_lenet_ships_with_fewer_macs(trained_lenet, digits_batches, digits, tmp_path):
    train, test = digits_batches
    xtr, _, xte, yte = digits
    base = evaluate(trained_lenet, test)
    pruner = RegularizationPruner(penalty="group", strength=1.0, epochs=10, lr=1e-3, finetune_epochs=5,
                                  finetune_lr=3e-3, progress=False)
    small = pruner.apply(copy.deepcopy(trained_lenet), train)
    c1, c2, h = small.features[0].out_channels, small.features[4].out_channels, small.classifier[1].out_features
    assert c2 <= 24 and h <= 32, (c1, c2, h)                                # measured 16, 15, 17
    acc = evaluate(small, test)
    assert acc >= base - 0.03, (base, acc)                                  # measured 0.980 → 0.973
    art, dense = deploy_with_dense(small, trained_lenet, xtr, xte, tmp_path)
    size = len(art.read_bytes("model.tflite")), len(dense.read_bytes("model.tflite"))
    assert size[0] < 0.6 * size[1], size                                           # measured 8208 vs 20064 B
    assert art.profile["estimate"]["macs"] == lenet_macs(c1, c2, h) < 0.6 * lenet_macs()
    assert int8_accuracy(art, xte, yte) >= acc - 0.02


def test_l1_zeros_become_masks_and_sparsity_is_exact(trained_lenet, digits_batches, digits, tmp_path):
    """With threshold 0 the masks are the proximal step's exact zeros.  Through sdk.compress with
    sparsity 0.7: exactly round(0.7·N) zeros over the layers, the L1 training makes that mask nearly
    free where the same global magnitude mask on the unregularised LeNet is not (Han et al. 2015's
    point), and the artifact's encodings carry each layer's density."""
    train, test = digits_batches
    xtr, _, xte, _ = digits
    pruner = RegularizationPruner(penalty="l1", strength=1.0, epochs=5, lr=1e-3, progress=False)
    m = pruner.apply(copy.deepcopy(trained_lenet), train)
    for name in LAYERS:
        raw = m.get_submodule(name).parametrizations.weight.original.detach()
        assert pruner.masked[name] == int((raw == 0).sum()) > 0
    recipe = {"stages": [{"method": "regularization", "config": {"penalty": "l1", "strength": 1.0, "epochs": 5,
                                                                 "lr": 1e-3, "sparsity": 0.7}}]}
    small = sdk.compress(trained_lenet, recipe, data=train, progress=False)
    layers = prunable_layers(small)
    assert sum(int((w.weight == 0).sum()) for _, w in layers) == round(0.7 * sum(w.weight.numel() for _, w in layers))
    plain = sdk.compress(trained_lenet, {"stages": [{"method": "magnitude", "config": {"sparsity": 0.7,
                                                                                       "scope": "global"}}]})
    base, acc, acc_plain = evaluate(trained_lenet, test), evaluate(small, test), evaluate(plain, test)
    assert acc >= base - 0.015 and acc_plain < acc - 0.08, (base, acc, acc_plain)  # measured 0.980, 0.989, 0.867
    art = sdk.deploy(small, "arm-int8", (xte[:1],), calibration=calibration(xtr),
                     output=tmp_path / "a", progress=False)
    rows = {r["layer"]: r["sparsity"] for r in art.manifest["encodings"]}
    assert set(rows) == set(LAYERS)
    for name, mod in layers:
        assert rows[name]["density"] == pytest.approx(float((mod.weight != 0).float().mean()), abs=1e-5)
    assert rows["features.4"]["shipped"] == "sparse"


def test_the_penalty_reaches_a_later_stage(trained_lenet, digits_batches):
    """{epochs: 0, prune: false} only attaches λ·½Σw²: the threshold stage after it retrains with it,
    which equals the threshold stage's retraining run by hand with that loss."""
    train, _ = digits_batches
    data = train[:4]
    thr = {"method": "threshold", "config": {"quality": 0.5, "iterations": 1, "epochs": 1, "lr": 1e-2}}
    reg = {"method": "regularization", "config": {"penalty": "l2", "strength": 0.5, "epochs": 0, "prune": False}}
    with_penalty = sdk.compress(trained_lenet, {"stages": [reg, thr]}, data=data, progress=False)
    without = sdk.compress(trained_lenet, {"stages": [thr]}, data=data, progress=False)

    by_hand = copy.deepcopy(trained_lenet)
    ThresholdPruner(quality=0.5, iterations=1).apply(by_hand)              # the masks, no retraining
    layers = [by_hand.get_submodule(n) for n in LAYERS]

    def loss(m, b):
        return classification_loss(m, b) + 0.5 * 0.5 * sum((x.weight ** 2).sum() for x in layers)

    fit(by_hand, data, loss, TrainConfig(epochs=1, lr=1e-2, progress=False))
    bake(by_hand)
    moved = 0.0
    for name in LAYERS:
        got, expect = with_penalty.get_submodule(name).weight, by_hand.get_submodule(name).weight
        torch.testing.assert_close(got, expect, atol=1e-6, rtol=1e-5)
        moved = max(moved, float((got - without.get_submodule(name).weight).abs().max().detach()))
    assert moved > 1e-3, moved                                              # the penalty changed the training


def test_bad_config_and_input_get_named_errors():
    with pytest.raises(ConfigError, match="ratio"):
        RegularizationPruner(penalty="group", sparsity=0.5)
    with pytest.raises(ConfigError, match="sparsity"):
        RegularizationPruner(penalty="l1", ratio=0.5)
    with pytest.raises(ConfigError, match="penalty"):
        RegularizationPruner(penalty="l0")
    with pytest.raises(ConfigError, match="groups"):
        RegularizationPruner(groups="kernel")
    with pytest.raises(InputError, match="labelled data"):
        RegularizationPruner(epochs=1).apply(make("lenet")[0])
    with pytest.raises(InputError, match="input_shape"):
        RegularizationPruner(penalty="group", epochs=0).apply(make("lenet")[0])
