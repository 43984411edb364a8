"""recu (Xu et al. 2021, ReCU): the rectified clamp is numpy's quantile clamp, a layer's weights are
α·sign(ReCU(standardised W)) by hand and its gradient passes the clamp straight through (the standardisation's
Jacobian by hand), revive() clamps the latent weights by hand, τ follows its schedule; on digits ReCU leaves
fewer dead weights (signs that never flip) than xnor at the same epochs and balances each filter's signs, and
the trained model deploys to binary-popcount as ±1 packed weights with α per channel: popcounts bit for bit
with the numpy reference, artifact = torch, 1 bit per weight (padded to 64-bit words) + α measured."""

import numpy as np
import pytest
import torch
from binary_helpers import (SMALL_BATCH, SMALL_BLOCKS, SMALL_CNN, bn_np, check_small_artifact, cnn, fresh_cnn,
                            sign_np)
from torch import nn

import sdk
import sdk.plugins as p
from plugins.quantize.recu import ReCU
from plugins.quantize.xnor import XNOR
from sdk.binary import binary_layers, rectified_clamp, standardize_filters
from sdk.errors import ConfigError
from sdk.graph import capture, fold_batch_norm
from sdk.recipe import Recipe
from sdk.trainer import make_loader, training_extras
from targets.binary_popcount import specs as sp
from targets.binary_popcount.lowering import lower

pytestmark = pytest.mark.usefixtures("one_thread")   # tiny models: one thread is faster

EPOCHS, LR = 3, 3e-3


BLOCKS, SMALL, BATCH = SMALL_BLOCKS, SMALL_CNN, SMALL_BATCH


def train(digits, cls, seed, **options):
    """``cls`` on digits from ``fresh_cnn(seed)``, data order ``seed``; returns the model, its test accuracy,
    the fraction of binary weights whose sign never changed between two steps (dead), and the mean over
    filters of |fraction of +1 − 0.5| (sign imbalance)."""
    xtr, ytr, xte, yte = digits
    data = list(make_loader(xtr, ytr, batch_size=64, seed=seed))
    prev, flipped = {}, {}

    def track(model, step):
        with torch.no_grad():
            for name in binary_layers(model):
                signs = model.get_submodule(name).weight_signs() > 0
                if name in prev:
                    flipped[name] |= signs != prev[name]
                else:
                    flipped[name] = torch.zeros_like(signs)
                prev[name] = signs

    with training_extras([], [track]):
        model = cls(epochs=EPOCHS, lr=LR, seed=seed, progress=False, **options).apply(fresh_cnn(seed), data)
    with torch.no_grad():
        acc = float((model(xte).argmax(1) == yte.long()).float().mean())
        plus = [(model.get_submodule(n).weight_signs() > 0).flatten(1).float().mean(1) for n in BLOCKS]
    dead = 1 - sum(int(f.sum()) for f in flipped.values()) / sum(f.numel() for f in flipped.values())
    imbalance = float(torch.cat(plus).sub(0.5).abs().mean())
    return model, acc, dead, imbalance


@pytest.fixture(scope="module")
def trained(digits, one_thread):
    return {name: train(digits, cls, 0) for name, cls in (("recu", ReCU), ("xnor", XNOR))}


# --------------------------------------------------------------------------- the clamp and the layer by hand


@pytest.mark.parametrize("tau", [0.5, 0.85, 0.99])
def test_rectified_clamp_is_numpys_quantile_clamp(tau):
    torch.manual_seed(0)
    w = torch.distributions.Laplace(0.0, 1.0).sample((16, 8, 3, 3)).requires_grad_()
    flat = w.detach().double().numpy().ravel()
    want = np.clip(w.detach().double().numpy(), np.quantile(flat, 1 - tau), np.quantile(flat, tau))
    np.testing.assert_allclose(rectified_clamp(w, tau).detach().double().numpy(), want, rtol=1e-6, atol=1e-6)
    clamped = (want == want.max()) | (want == want.min())
    assert 0.9 * 2 * (1 - tau) * flat.size <= clamped.sum() <= 2 * (1 - tau) * flat.size + 4 or tau == 0.5


def standardised_np(w):
    w = w.detach().double().numpy().reshape(len(w), -1)
    c = w - w.mean(1, keepdims=True)
    r = np.sqrt((c ** 2).mean(1, keepdims=True))
    return c, r, c / (r + 1e-8)


def test_a_recu_layer_is_alpha_sign_of_the_clamped_standardised_weights_by_hand():
    """y = sign(BN(x)) · (α·sign v)ᵀ + b, v = ReCU_τ((W − μ)/σ), α = mean |v| per filter; ∂/∂W of Σ g·sign(v)
    is the standardisation's Jacobian applied to g: straight through the sign and the clamp, so the clamped
    tails get a gradient too."""
    torch.manual_seed(0)
    layer = ReCU().quantize_layer("l", nn.Linear(64, 8)).eval()
    layer.tau = 0.8
    x = torch.randn(5, 64)
    c, r, z = standardised_np(layer.weight)
    v = np.clip(z, np.quantile(z, 0.2), np.quantile(z, 0.8))
    alpha = np.abs(v).mean(1)
    np.testing.assert_allclose(layer.alpha().detach(), alpha, rtol=1e-5)
    assert (layer.weight_signs().detach().numpy() == sign_np(v)).all()
    want = sign_np(bn_np(layer.input_bn, x.double().numpy())) @ (alpha[:, None] * sign_np(v)).T \
        + layer.bias.detach().double().numpy()
    with torch.no_grad():
        np.testing.assert_allclose(layer(x).double().numpy(), want, rtol=1e-5, atol=1e-5)
    g = torch.randn(8, 64, dtype=torch.float64)
    (layer.weight_signs() * g.float()).sum().backward()
    g, n, s = g.numpy(), z.shape[1], r + 1e-8
    dc = g / s - (g * c).sum(1, keepdims=True) / s ** 2 * c / (n * r)
    np.testing.assert_allclose(layer.weight.grad.double().numpy(), dc - dc.mean(1, keepdims=True), rtol=1e-4,
                               atol=1e-6)
    tails = (v == v.max()) | (v == v.min())
    assert tails.sum() >= 0.3 * v.size and (layer.weight.grad.numpy()[tails] != 0).all()


def test_revive_clamps_the_latent_weights_by_hand():
    torch.manual_seed(1)
    layer = ReCU().quantize_layer("l", nn.Conv2d(8, 16, 3))
    layer.tau = 0.9
    with torch.no_grad():
        layer.weight.copy_(torch.distributions.Laplace(0.1, 0.2).sample(layer.weight.shape))
    w = layer.weight.detach().double().numpy().reshape(16, -1)
    c, r, z = standardised_np(layer.weight)
    want = w.mean(1, keepdims=True) + (r + 1e-8) * np.clip(z, np.quantile(z, 0.1), np.quantile(z, 0.9))
    layer.revive()
    np.testing.assert_allclose(layer.weight.detach().double().numpy().reshape(16, -1), want, rtol=1e-5, atol=1e-6)
    moved = np.abs(want - w) > 1e-9
    assert 0.19 <= moved.mean() <= 0.21                 # the 10 % tails on each side, no more


def test_tau_decays_the_tail_mass_geometrically():
    q = ReCU(tau_start=0.85, tau_end=0.99)
    taus = q.schedule(5)
    np.testing.assert_allclose(taus, 1 - 0.15 * (0.01 / 0.15) ** (np.arange(5) / 4), rtol=1e-12)
    assert taus[0] == pytest.approx(0.85) and taus[-1] == pytest.approx(0.99)


# --------------------------------------------------------------------------- digits


def test_recu_revives_dead_weights_and_balances_signs_on_digits(trained):
    """Seed 0, 3 epochs of the small CNN (measured: recu top-1 0.949, dead 0.773, imbalance 0.016; xnor 0.949,
    0.793, 0.046).  Dead: the fraction of binary weights whose sign never changed from one step to the next
    (the paper's "barely updated" weights); imbalance: mean over filters of |fraction of +1 − 0.5|."""
    (_, acc, dead, imbalance), (_, xacc, xdead, ximbalance) = trained["recu"], trained["xnor"]
    print(f"\nrecu digits: top-1 {acc:.4f}, dead {dead:.3f}, imbalance {imbalance:.3f}; "
          f"xnor: {xacc:.4f}, {xdead:.3f}, {ximbalance:.3f}")
    assert acc >= 0.9 and dead < xdead and imbalance < min(ximbalance, 0.03)
    model = trained["recu"][0]
    assert all(model.get_submodule(n).tau == pytest.approx(0.99) for n in BLOCKS)


@pytest.mark.slow
def test_recu_against_xnor_over_three_seeds(digits):
    """Seeds 0, 1, 2 (measured: recu top-1 0.949 / 0.942 / 0.938, dead 0.773 / 0.770 / 0.766, imbalance 0.016;
    xnor 0.949 / 0.956 / 0.956, 0.793 / 0.793 / 0.787, 0.033-0.046): fewer dead weights every time, and
    top-1 within 3 points of xnor's on average (it is 1 point lower)."""
    rows = {name: [train(digits, cls, seed)[1:] for seed in (0, 1, 2)] for name, cls in (("recu", ReCU),
                                                                                        ("xnor", XNOR))}
    mean = {k: np.mean(v, axis=0) for k, v in rows.items()}
    print(f"\nrecu vs xnor, 3 seeds (top-1, dead, imbalance): {rows}\nmeans {mean}")
    assert all(r[1] < x[1] for r, x in zip(rows["recu"], rows["xnor"], strict=True))
    assert mean["recu"][0] >= mean["xnor"][0] - 0.03


# --------------------------------------------------------------------------- deploy


def test_recu_deploys_to_binary_popcount_bit_exact(trained, digits, tmp_path):
    model = trained["recu"][0]
    xte, yte = digits[2], digits[3].long()
    art = sdk.deploy(model, "binary-popcount", (xte[:BATCH],), output=tmp_path / "recu", progress=False)
    binary = [r for r in art.profile["layers"] if "Binary" in r["op"]]
    assert [r["op"] for r in binary] == ["conv->BinaryConv"] * 3
    for r in binary:        # ⌈C/64⌉ 64-bit words per (output, tap), then α: one float32 per output channel
        o, c = r["out_shape"][1], r["in_shape"][1]
        assert r["bytes"] == o * 9 * 8 * -(-c // 64) + 4 * o and r["fp32_bytes"] == 4 * o * c * 9
    check_small_artifact(art, model, xte, yte, "recu", min_accuracy=0.88)


def test_float_activations_lower_to_bwn_layers():
    """binary_activations=False: the packed signs with α per channel of binary-popcount's BwnConv."""
    data = [(torch.rand(8, 1, 8, 8), torch.arange(8))]
    model = ReCU(binary_activations=False, epochs=1, max_steps=1, progress=False).apply(cnn(**SMALL), data)
    specs = lower(fold_batch_norm(capture(model, (torch.rand(1, 1, 8, 8),))), "binary-popcount").specs
    convs = [s for s in specs if isinstance(s, sp.BwnConv)]
    assert len(convs) == 3 and not any(isinstance(s, (sp.Sign, sp.BinaryConv)) for s in specs)
    for spec, name in zip(convs, BLOCKS, strict=True):
        np.testing.assert_allclose(spec.alpha, model.get_submodule(name).alpha().detach().numpy(), rtol=1e-6)


# --------------------------------------------------------------------------- recipe and errors


def test_a_yaml_recipe_runs_it(digits):
    data = list(make_loader(digits[0][:256], digits[1][:256], batch_size=64, seed=0))
    recipe = Recipe.from_yaml("stages:\n  - method: recu\n    config: {epochs: 1, max_steps: 3, tau_start: 0.8, "
                              "tau_end: 0.95, revive: false}\n")
    out = sdk.compress(cnn(**SMALL), recipe, data=data, progress=False)
    assert set(binary_layers(out)) == set(BLOCKS)
    assert all(out.get_submodule(n).tau == pytest.approx(0.95) for n in BLOCKS)


@pytest.mark.parametrize("options, match", [
    ({"tau_start": 0.4}, "tau_start"), ({"tau_end": 1.0}, "tau_end"),
    ({"tau_start": 0.95, "tau_end": 0.9}, "must not exceed"), ({"revive": "yes"}, "revive"),
])
def test_bad_config_is_a_named_error(options, match):
    with pytest.raises(ConfigError, match=match):
        ReCU(**options)


def test_registered_config_round_trips():
    cls = p.find_method("recu", "quantizer")
    assert cls is ReCU and not cls.post_training
    cfg = cls.Config(epochs=2, tau_start=0.7, tau_end=0.9, revive=False, binary_activations=False)
    assert cls.Config.from_dict(cfg.to_dict()) == cfg
    assert ReCU(binary_activations=False).layer_info().sign == "ste" and ReCU().layer_info().sign == "approx"
    with pytest.raises(ConfigError, match="tau"):
        rectified_clamp(torch.zeros(3), 0.3)
    assert standardize_filters(torch.tensor([[2.0, 4.0]])).tolist() == [[-1.0, 1.0]]
