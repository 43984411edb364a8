"""xnorpp (Bulat & Tzimiropoulos 2019, XNOR-Net++): Γ = α ⊗ β ⊗ γ is the outer product by hand, a layer is
(sign(BN x) ⊛ sign W) ⊙ Γ + b by hand with the gradients of α, β, γ by hand, on digits the learned Γ
trains to a stated accuracy next to xnor's computed α, K at the same epochs; binary-popcount's BinaryConv takes
β, γ as scale_h, scale_w (C kernel = numpy reference = the formula, bit for bit), and the trained model deploys
with its learned β, γ there: popcounts bit for bit, artifact = torch, bytes = 1 bit per weight + α, β, γ."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from binary_helpers import (SMALL_BATCH, SMALL_BLOCKS, SMALL_CNN, bn_np, check_small_artifact, cnn, fresh_cnn,
                            sign_np)
from torch import nn

import sdk
import sdk.plugins as p
from plugins.quantize.xnor import XNOR
from plugins.quantize.xnorpp import XNORPP
from sdk.binary import binary_layers, learned_scale_layer
from sdk.errors import ConfigError, InputError, UnsupportedOpError
from sdk.recipe import Recipe
from sdk.trainer import make_loader
from targets.binary_popcount import build, packing
from targets.binary_popcount import reference as ref
from targets.binary_popcount import specs as sp
from targets.binary_popcount.runners import artifact_specs

pytestmark = pytest.mark.usefixtures("one_thread")   # tiny models: one thread is faster

EPOCHS, LR = 3, 3e-3
INFO = XNORPP().layer_info()


BLOCKS, SMALL, BATCH = SMALL_BLOCKS, SMALL_CNN, SMALL_BATCH


def train(digits, cls, seed, **options):
    xtr, ytr, xte, yte = digits
    data = list(make_loader(xtr, ytr, batch_size=64, seed=seed))
    model = cls(epochs=EPOCHS, lr=LR, seed=seed, progress=False, **options).apply(fresh_cnn(seed), data)
    with torch.no_grad():
        return model, float((model(xte).argmax(1) == yte.long()).float().mean())


@pytest.fixture(scope="module")
def trained(digits, one_thread):
    return {"factorised": train(digits, XNORPP, 0), "channel": train(digits, XNORPP, 0, scale="channel")}


# --------------------------------------------------------------------------- Γ and the layer by hand


def test_gamma_is_the_outer_product_and_the_layer_applies_it():
    torch.manual_seed(0)
    layer = learned_scale_layer("c", nn.Conv2d(6, 4, 3, stride=2, padding=1), INFO, (3, 3)).eval()
    with torch.no_grad():
        for t in (layer.scale_c, layer.scale_h, layer.scale_w):
            t.uniform_(0.5, 2.0)
    a, b, c = (t.detach().double().numpy() for t in (layer.scale_c, layer.scale_h, layer.scale_w))
    gamma = np.einsum("c,h,w->chw", a, b, c)
    np.testing.assert_allclose(layer.gamma().detach().double().numpy(), gamma, rtol=1e-6)
    x = torch.randn(2, 6, 5, 5, requires_grad=True)
    signs = torch.from_numpy(sign_np(bn_np(layer.input_bn, x.detach().double().numpy())))
    product = F.conv2d(signs, torch.from_numpy(sign_np(layer.weight.detach().double().numpy())), None, 2, 1).numpy()
    want = product * gamma + layer.bias.detach().double().numpy().reshape(1, -1, 1, 1)
    y = layer(x)
    np.testing.assert_allclose(y.detach().double().numpy(), want, rtol=1e-6, atol=1e-6)
    g = torch.randn_like(y)
    (y * g).sum().backward()
    gp = g.double().numpy() * product
    np.testing.assert_allclose(layer.scale_c.grad, np.einsum("nchw,h,w->c", gp, b, c), rtol=1e-5)
    np.testing.assert_allclose(layer.scale_h.grad, np.einsum("nchw,c,w->h", gp, a, c), rtol=1e-5)
    np.testing.assert_allclose(layer.scale_w.grad, np.einsum("nchw,c,h->w", gp, a, b), rtol=1e-5)
    with pytest.raises(InputError, match="3x3 output"):
        layer(torch.randn(1, 6, 8, 8))


def test_scales_start_at_xnors_alpha_and_one():
    conv = nn.Conv2d(6, 4, 3)
    layer = learned_scale_layer("c", conv, INFO, (4, 4))
    np.testing.assert_allclose(layer.scale_c.detach(), conv.weight.detach().abs().mean((1, 2, 3)), rtol=1e-6)
    assert layer.scale_h.tolist() == [1.0] * 4 and layer.scale_w.tolist() == [1.0] * 4
    assert learned_scale_layer("l", nn.Linear(8, 4), INFO).gamma().shape == (4,)
    with pytest.raises(ConfigError, match="linear layer takes the per-channel scale"):
        learned_scale_layer("l", nn.Linear(8, 4), INFO, (2, 2))


# --------------------------------------------------------------------------- binary-popcount's scale_h, scale_w


def test_binary_conv_scale_h_w_is_bit_exact_in_c_and_the_reference():
    """α[o], then β[row], then γ[col] on the int32 popcount, one float32 rounding each: numpy by hand =
    reference = compiled C, and the popcounts are the ±1 conv."""
    rng = np.random.default_rng(0)
    n, c, h, o = 2, 70, 6, 5
    x = rng.standard_normal((n, c, h, h)).astype(np.float32)
    w = rng.standard_normal((o, c, 3, 3)).astype(np.float32)
    alpha, beta, gamma = (rng.uniform(0.1, 3, k).astype(np.float32) for k in (o, 3, 3))
    conv = sp.BinaryConv(packing.pack_conv_weight(w), alpha, c, 2, 1, scale_h=beta, scale_w=gamma)
    specs = [sp.InputSpec((n, c, h, h)), sp.Sign(), conv]
    acc = F.conv2d(torch.from_numpy(sign_np(x)), torch.from_numpy(sign_np(w)), None, 2, 1).numpy()
    acc = acc.transpose(0, 2, 3, 1).astype(np.float32)                      # NHWC
    want = (acc * alpha) * beta[None, :, None, None]
    want = (want.astype(np.float32) * gamma[None, None, :, None]).astype(np.float32).transpose(0, 3, 1, 2)
    out, pops = ref.run_reference(specs, x)
    assert np.array_equal(pops[0], acc.astype(np.int32)) and np.array_equal(out, want)
    got, cpops = build.compile_model(specs).run_debug(x)
    assert np.array_equal(cpops[0], pops[0]) and np.array_equal(got, out)
    with pytest.raises(ConfigError, match="scale_w must have 3 entries"):
        sp.infer_shapes([*specs[:2], sp.BinaryConv(conv.weight, alpha, c, 2, 1, scale_w=np.ones(4))])


class _Scaled(nn.Module):
    """A binary conv (from xnorpp) whose product a hand-written forward scales by columns, then rows."""

    def __init__(self):
        super().__init__()
        self.first = nn.Conv2d(1, 8, 3, padding=1)
        self.conv = learned_scale_layer("conv", nn.Conv2d(8, 8, 3, padding=1), INFO)
        self.beta, self.gamma = nn.Parameter(torch.rand(6) + 0.5), nn.Parameter(torch.rand(6) + 0.5)

    def forward(self, x):
        y = self.conv(self.first(x))
        return (y * self.gamma.view(1, 1, 1, -1) * self.beta.view(1, 1, -1, 1)).mean((2, 3))


def test_columns_before_rows_is_refused_not_reordered():
    with pytest.raises(UnsupportedOpError, match="per-channel constants"):
        sdk.deploy(_Scaled().eval(), "binary-popcount", (torch.randn(1, 1, 6, 6),), progress=False)


# --------------------------------------------------------------------------- digits


def test_learned_gamma_on_digits(trained):
    """Seed 0, 3 epochs of the small CNN (measured: factorised 0.949, channel 0.953)."""
    acc = {k: v[1] for k, v in trained.items()}
    print(f"\nxnorpp digits top-1: {acc}")
    assert acc["factorised"] >= 0.9 and acc["channel"] >= 0.9
    model = trained["factorised"][0]
    moved = [float((model.get_submodule(n).scale_h.detach() - 1).abs().max()) for n in BLOCKS]
    assert min(moved) > 1e-3                        # β was learned, not left at its start


@pytest.mark.slow
def test_learned_gamma_against_computed_alpha_over_three_seeds(digits):
    """Seeds 0, 1, 2, 3 epochs (measured: factorised 0.949 / 0.936 / 0.938, channel 0.953 / 0.931 / 0.927,
    xnor's computed α and K 0.949 / 0.956 / 0.956): the learned Γ is not better than the computed scales at this
    size and length (1-2 points lower on average); the bound is 3 points."""
    rows = {name: [train(digits, cls, seed, **opts)[1] for seed in (0, 1, 2)]
            for name, cls, opts in (("factorised", XNORPP, {}), ("channel", XNORPP, {"scale": "channel"}),
                                    ("xnor", XNOR, {}))}
    mean = {k: float(np.mean(v)) for k, v in rows.items()}
    print(f"\nxnorpp vs xnor, 3 seeds: {rows}, means {mean}")
    assert mean["factorised"] >= mean["xnor"] - 0.03 and mean["channel"] >= mean["xnor"] - 0.03


# --------------------------------------------------------------------------- deploy


def deploy(model, digits, tmp_path, label):
    xte, yte = digits[2], digits[3].long()
    art = sdk.deploy(model, "binary-popcount", (xte[:BATCH],), output=tmp_path / label, progress=False)
    check_small_artifact(art, model, xte, yte, "xnorpp", min_accuracy=0.88)
    return art


def test_factorised_gamma_deploys_as_scale_h_w(trained, digits, tmp_path):
    model = trained["factorised"][0]
    art = deploy(model, digits, tmp_path, "factorised")
    convs = [s for s in artifact_specs(art)[0] if isinstance(s, sp.BinaryConv)]
    assert len(convs) == 3
    for spec, name in zip(convs, BLOCKS, strict=True):
        layer = model.get_submodule(name)
        for got, want in ((spec.alpha, layer.scale_c), (spec.scale_h, layer.scale_h), (spec.scale_w, layer.scale_w)):
            np.testing.assert_array_equal(got, want.detach().numpy())
    for r in (r for r in art.profile["layers"] if "Binary" in r["op"]):
        o, c, (oh, ow) = r["out_shape"][1], r["in_shape"][1], r["out_shape"][2:]
        assert r["bytes"] == o * 9 * 8 * -(-c // 64) + 4 * (o + oh + ow)


def test_channel_gamma_deploys_as_alpha(trained, digits, tmp_path):
    art = deploy(trained["channel"][0], digits, tmp_path, "channel")
    convs = [s for s in artifact_specs(art)[0] if isinstance(s, sp.BinaryConv)]
    assert len(convs) == 3 and all(s.scale_h is None and s.scale_w is None for s in convs)


# --------------------------------------------------------------------------- recipe and errors


def test_a_yaml_recipe_runs_it(digits):
    data = list(make_loader(digits[0][:256], digits[1][:256], batch_size=64, seed=0))
    recipe = Recipe.from_yaml("stages:\n  - method: xnorpp\n    config: {epochs: 1, max_steps: 2}\n")
    out = sdk.compress(cnn(**SMALL), recipe, data=data, progress=False)
    assert set(binary_layers(out)) == set(BLOCKS)
    assert tuple(out.get_submodule("9").gamma().shape) == (32, 4, 4)


def test_bad_config_and_input_are_named_errors(digits):
    with pytest.raises(ConfigError, match="scale='full' is not allowed"):
        XNORPP(scale="full")
    with pytest.raises(ConfigError, match="input_bn"):
        XNORPP(input_bn="yes")
    with pytest.raises(InputError, match="xnorpp needs data"):
        XNORPP(progress=False).apply(cnn(**SMALL))


def test_registered_config_round_trips():
    cls = p.find_method("xnorpp", "quantizer")
    assert cls is XNORPP and not cls.post_training
    cfg = cls.Config(epochs=2, scale="channel", input_bn=False, exclude=("3",))
    assert cls.Config.from_dict(cfg.to_dict()) == cfg
