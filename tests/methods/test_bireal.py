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
from hint_checks import check_hints
from torch import nn

import sdk
import sdk.plugins as p
from plugins.quantize.bireal import BiReal
from sdk.binary import BinaryInfo, binary_layers, shortcut_layer, shortcuts
from sdk.encoding import Hint
from sdk.errors import InputError
from sdk.trainer import make_loader
from targets.binary_popcount import binary_layer_agreement

pytestmark = pytest.mark.usefixtures("one_thread")   # tiny models: one thread is faster

WIDTH = 32                       # binary convs fill half a 64-bit word per pixel
EPOCHS, LR = 4, 3e-3
BLOCKS = {"3": "identity", "6": "identity", "9": "identity", "12": "identity", "15": "downsample"}
INFO = BinaryInfo("bireal", scale_weights=True, binary_activations=True, scale_activations=False, sign="approx")


def cnn(act=nn.Hardtanh, width=WIDTH, depth=4):
    """Conv-BN-act ×(depth + 1) and a stride-2 conv doubling the channels, then a linear head (by default
    BinaryNet's BN → Hardtanh between layers): bireal makes every conv but the first a block (4 identity
    shortcuts, 1 downsample)."""
    torch.manual_seed(0)
    layers = [nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width), act()]
    for _ in range(depth):
        layers += [nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), act()]
    layers += [nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(2 * width),
               act(), nn.Flatten(), nn.Linear(2 * width * 16, 10)]
    return nn.Sequential(*layers)


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


def sign_np(x):
    return np.where(x < 0, -1.0, 1.0)


def approx_sign_grad_np(x):
    """ApproxSign, the derivative of Bi-Real Net's piecewise quadratic sign: 2 + 2x on [−1, 0), 2 − 2x on [0, 1), 0 elsewhere."""
    return np.where((x >= -1) & (x < 0), 2 + 2 * x, np.where((x >= 0) & (x < 1), 2 - 2 * x, 0.0))


def bn_np(bn, x):
    shape = (1, -1) + (1,) * (x.ndim - 2)
    mean, var, g, b = (t.detach().double().numpy().reshape(shape) for t in
                       (bn.running_mean, bn.running_var, bn.weight, bn.bias))
    return (x - mean) / np.sqrt(var + bn.eps) * g + b


def magnitude_aware_np(w):
    """α·sign(W) with α = ‖W‖₁ / n per output filter (Bi-Real Net's magnitude-aware weights)."""
    w = w.detach().double().numpy()
    return np.abs(w).reshape(len(w), -1).mean(1).reshape((-1,) + (1,) * (w.ndim - 1)) * sign_np(w)


def block_input(model, name, x):
    seen = []
    hook = model.get_submodule(name).register_forward_pre_hook(lambda m, a: seen.append(a[0].detach()))
    with torch.no_grad():
        model(x)
    hook.remove()
    return seen[0]


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
    samples = [xte[i:i + 1] for i in range(len(xte))]
    rep = art.verify(model, inputs=samples[:20])
    assert rep.passed, str(rep)
    rows = binary_layer_agreement(art, [s.numpy() for s in samples[:20]])
    assert len(rows) == 5 and all(r["elements"] > 0 and r["mismatches"] == 0 for r in rows), rows
    host = np.concatenate([art.run(s)[0] for s in samples])
    with torch.no_grad():
        torch_out = model(xte).numpy()
    art_acc = float((host.argmax(1) == yte.numpy()).mean())
    binary = [r for r in art.profile["layers"] if "Binary" in r["op"]]
    print(f"\nbireal artifact: top-1 {art_acc:.4f}, weights.bin {art.file('weights.bin').stat().st_size} bytes, "
          f"binary layers {sum(r['bytes'] for r in binary)} bytes (fp32 {sum(r['fp32_bytes'] for r in binary)})")
    assert (host.argmax(1) == torch_out.argmax(1)).mean() >= 0.99 and art_acc >= 0.96
    check_hints(model, xte[:1], {n: Hint(codebook=2, per_channel=True, source="bireal") for n in BLOCKS})


def test_registered_config_round_trips():
    cls = p.find_method("bireal", "quantizer")
    assert cls is BiReal and not cls.post_training
    cfg = cls.Config(epochs=2, shortcut=False, downsample=False, exclude=("fc",))
    assert cls.Config.from_dict(cfg.to_dict()) == cfg
