"""bireal (Liu et al. 2018, Bi-Real Net): each block is ``BN_out(sign(BN_in x) ⊛ α·sign W) + shortcut(x)``
by hand, the shortcut is the identity or AvgPool → 1x1 conv → BN as the shapes say, the activations' gradient
in a trained layer is ApproxSign's ``2 ± 2x`` on [−1, 1), the shortcut lets a binary digits CNN fit and
generalise better than the same blocks without it from the same random start (and carries many more
distinct values, the paper's "representational capability"), and the trained model deploys to
binary-popcount (verify, popcounts bit for bit, accuracy kept) with its hints."""


import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sdk
import sdk.plugins as p
from plugins.quantize.bireal import BiReal
from sdk.binary import BinaryInfo, binary_layers, shortcut_layer, shortcuts
from sdk.errors import InputError
from sdk.trainer import make_loader

from binary_helpers import (BLOCKS, WIDTH, approx_sign_grad_np, block_input, bn_np, check_binary_artifact, cnn,
                            magnitude_aware_np, sign_np)

pytestmark = pytest.mark.usefixtures("one_thread")   # tiny models: one thread is faster

EPOCHS, LR = 4, 3e-3
INFO = BinaryInfo("bireal", scale_weights=True, binary_activations=True, scale_activations=False, sign="approx")


@pytest.fixture(scope="module")
def trained(digits, one_thread):
    """bireal on digits from the CNN's random initialisation, with the shortcut and without (the paper's
    ablation): the same start, blocks, epochs and data order."""
    xtr, ytr, xte, yte = digits
    data = list(make_loader(xtr, ytr, batch_size=64, seed=0))
    out = {"train": (xtr, ytr.long()), "test": (xte, yte.long())}
    for label, shortcut in (("bireal", True), ("plain", False)):
        out[label] = BiReal(epochs=EPOCHS, lr=LR, shortcut=shortcut, progress=False).apply(cnn(), data)
    return out


# --------------------------------------------------------------------------- the blocks by hand


def test_shortcut_follows_the_shapes():
    def kind(layer, **options):
        return shortcut_layer("l", layer, INFO, **options).shortcut_kind

    assert kind(nn.Conv2d(8, 8, 3, padding=1)) == kind(nn.Conv2d(8, 8, 5, padding=2)) == "identity"
    assert kind(nn.Linear(16, 16)) == "identity"
    assert kind(nn.Conv2d(8, 8, 3)) == kind(nn.Linear(16, 8)) == "none"          # no "same" padding / width change
    assert kind(nn.Conv2d(8, 16, 3, padding=1), downsample=False) == "none"
    assert kind(nn.Conv2d(8, 8, 3, padding=1), shortcut=False) == "none"
    down = shortcut_layer("l", nn.Conv2d(8, 16, 3, stride=2, padding=1), INFO).shortcut
    assert [type(m) for m in down] == [nn.AvgPool2d, nn.Conv2d, nn.BatchNorm2d]
    assert down[0].kernel_size == down[0].stride == (2, 2) and down[1].kernel_size == (1, 1)
    assert [type(m) for m in shortcut_layer("l", nn.Conv2d(8, 16, 3, padding=1), INFO).shortcut] == \
        [nn.Conv2d, nn.BatchNorm2d]                                                 # channels only: no pool
    with pytest.raises(InputError, match="multiples of the stride"):
        shortcut_layer("l", nn.Conv2d(8, 8, 3, stride=2, padding=1), INFO)(torch.randn(2, 8, 7, 7))


@torch.no_grad()
def test_blocks_equal_the_bireal_formula(trained):
    """Identity block: BN_out(sign(BN_in x) ⊛ α·sign W) + x; the downsample block adds
    BN(1x1 conv(AvgPool₂ x)) instead of x.  Main path from numpy signs and α, a plain conv."""
    model, x = trained["bireal"], trained["test"][0][:16]
    assert shortcuts(model) == BLOCKS and all(i.sign == "approx" for i in binary_layers(model).values())
    for name in ("6", "15"):
        block, v = model.get_submodule(name), block_input(model, name, x).double()
        s = sign_np(bn_np(block.input_bn, v.numpy()))
        product = F.conv2d(torch.from_numpy(s), torch.from_numpy(magnitude_aware_np(block.weight)), None,
                           block.stride, block.padding).numpy()
        want = bn_np(block.output_bn, product)
        if name == "6":
            want = want + v.numpy()
        else:
            pool, conv, bn = block.shortcut
            pooled = v.numpy().reshape(16, WIDTH, 4, 2, 4, 2).mean((3, 5))
            w = conv.weight.detach().double().numpy()[:, :, 0, 0]
            want = want + bn_np(bn, np.einsum("oc,nchw->nohw", w, pooled))
        np.testing.assert_allclose(block(v.float()).double().numpy(), want, rtol=1e-4, atol=1e-4)


def test_trained_layer_input_gradient_is_approx_sign(trained):
    """The gradient reaching BN_in's output u is (gradient at sign(u)) · ApproxSign'(u): the reference
    takes the first factor by autograd through a plain conv on the ±1 tensor, the second from the formula."""
    model, x = trained["bireal"], trained["test"][0][:16]
    block = model.get_submodule("9")
    v = block_input(model, "9", x).requires_grad_(True)
    kept = []

    def keep(module, args, out):
        out.retain_grad()
        kept.append(out)

    hook = block.input_bn.register_forward_hook(keep)
    y = block(v)
    hook.remove()
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(0))
    (y * g).sum().backward()
    (u,) = kept
    un = u.detach().double().numpy()
    assert ((un >= -1) & (un < 0)).mean() > 0.1 and ((un >= 0) & (un < 1)).mean() > 0.1 and (abs(un) >= 1).any()

    s = torch.from_numpy(sign_np(un)).float().requires_grad_(True)
    product = F.conv2d(s, torch.from_numpy(magnitude_aware_np(block.weight)).float(), None, 1, 1)
    (block.output_bn(product) * g).sum().backward()                         # eval: the BN is affine
    want = s.grad.double().numpy() * approx_sign_grad_np(un)
    np.testing.assert_allclose(u.grad.double().numpy(), want, rtol=1e-4, atol=1e-5 * np.abs(want).max())


# --------------------------------------------------------------------------- the paper's claims on digits


def test_shortcut_fits_and_generalises_better_on_digits(trained):
    """Measured over three seeds (CNN initialisation and data order 0, 1, 2): test top-1 0.973 / 0.971 / 0.980
    with the shortcut vs 0.953 / 0.960 / 0.967 without; train cross-entropy 0.016 / 0.021 / 0.027 vs 0.058 /
    0.071 / 0.048.  (The float CNN: 0.984 after 8 epochs.)"""
    (xtr, ytr), (xte, yte) = trained["train"], trained["test"]
    with torch.no_grad():
        acc = {k: float((trained[k](xte).argmax(1) == yte).float().mean()) for k in ("bireal", "plain")}
        fit = {k: float(F.cross_entropy(trained[k](xtr), ytr)) for k in ("bireal", "plain")}
    print(f"\nbireal digits: top-1 {acc}, train cross-entropy {fit}")
    assert acc["bireal"] >= 0.96
    assert acc["bireal"] >= acc["plain"] + 0.005
    assert fit["bireal"] <= 0.7 * fit["plain"]


@torch.no_grad()
def test_shortcut_carries_many_more_distinct_values(trained):
    """Bi-Real Net's representational capability: without the shortcut a block's output per channel is an affine image of the
    popcount, at most C·k² + 1 = 289 values; the real-valued shortcut gives about one per element."""
    x, limit = trained["test"][0][:64], WIDTH * 9 + 1
    distinct = {}
    for label in ("bireal", "plain"):
        model = trained[label]
        block = model.get_submodule("9")
        y = block(block_input(model, "9", x)).transpose(0, 1).reshape(WIDTH, -1)
        distinct[label] = [len(torch.unique(c)) for c in y]
    assert max(distinct["plain"]) <= limit
    assert min(distinct["bireal"]) > 5 * limit, min(distinct["bireal"])


# --------------------------------------------------------------------------- deploy


def test_bireal_deploys_to_binary_popcount(trained, tmp_path):
    model, (xte, yte) = trained["bireal"], trained["test"]
    art = sdk.deploy(model, "binary-popcount", (xte[:1],), output=tmp_path / "bireal", progress=False)
    ops = [r["op"] for r in art.profile["layers"]]
    assert ops.count("conv->BinaryConv") == 5 and ops.count("add->Add") == 5 and "avg_pool2d->AvgPool" in ops
    check_binary_artifact(art, model, xte, yte, "bireal", min_accuracy=0.96)


def test_registered_config_round_trips():
    cls = p.find_method("bireal", "quantizer")
    assert cls is BiReal and not cls.post_training
    cfg = cls.Config(epochs=2, shortcut=False, downsample=False, exclude=("fc",))
    assert cls.Config.from_dict(cfg.to_dict()) == cfg
