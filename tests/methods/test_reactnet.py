"""reactnet (Liu et al. 2020, ReActNet): RSign is sign(x − t) with t learned per channel and its gradient
ApproxSign's (hand-checked values and gradients), RPReLU is PReLU(x − γ) + ζ, each block is
RPReLU(BN_out(RSign(x) ⊛ α·sign W) + x) by hand, a binary digits CNN trains to a stated accuracy with
thresholds that matter, the distributional loss learns from the float teacher and not the labels, and the
trained model deploys to binary-popcount with each learned threshold as its Sign's threshold."""

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from binary_helpers import (BLOCKS, approx_sign_grad_np, block_input, bn_np, check_binary_artifact, cnn,
                            magnitude_aware_np, sign_np)
from torch import nn

import sdk
import sdk.plugins as p
from plugins.quantize.reactnet import ReActNet, RPReLU
from sdk.binary import shortcuts
from sdk.trainer import make_loader
from targets.binary_popcount import specs as sp
from targets.binary_popcount.runners import artifact_specs

pytestmark = pytest.mark.usefixtures("one_thread")   # tiny models: one thread is faster

EPOCHS, LR = 4, 3e-3


@pytest.fixture(scope="module")
def trained(digits, one_thread):
    """reactnet on digits from the random initialisation of the bireal tests' CNN with ReLUs: every binary
    conv reads x >= 0, where a plain sign(x) is +1 throughout and only RSign's thresholds can tell values apart."""
    xtr, ytr, xte, yte = digits
    data = list(make_loader(xtr, ytr, batch_size=64, seed=0))
    model = ReActNet(epochs=EPOCHS, lr=LR, progress=False).apply(cnn(nn.ReLU), data)
    return {"reactnet": model, "test": (xte, yte.long())}


def rprelu_np(x, gamma, slope, zeta):
    shape = (1, -1) + (1,) * (x.ndim - 2)
    v = x - gamma.reshape(shape)
    return np.where(v > 0, v, slope.reshape(shape) * v) + zeta.reshape(shape)


# --------------------------------------------------------------------------- RSign and RPReLU by hand


def test_rsign_shifts_the_sign_and_learns_its_threshold():
    """A linear layer (6 → 4: no shortcut) without BNs: y = sign(x − t) · (α·sign W)ᵀ + b;
    ∂/∂x = g·(α·sign W) · ApproxSign'(x − t) and ∂/∂t = −Σ_batch of the same."""
    torch.manual_seed(0)
    layer = ReActNet(rprelu=False, output_bn=False).quantize_layer("l", nn.Linear(6, 4))
    assert layer.input_bn is None and layer.shortcut is None and layer.binary_info.learned_threshold
    with torch.no_grad():
        layer.threshold.copy_(torch.tensor([0.5, -0.5, 0.0, 1.0, -2.0, 0.25]))
    x = torch.tensor([[0.3, -0.2, 0.0, 1.5, -1.5, 0.1],
                      [0.7, -0.7, -0.1, 0.9, -2.5, 0.25]], requires_grad=True)
    seen = []
    product = layer._product
    layer._product = lambda a, w: (seen.append(a.detach()), product(a, w))[1]
    y = layer(x)
    # x − t: [-0.2, 0.3, 0, 0.5, 0.5, -0.15] and [0.2, -0.2, -0.1, -0.1, -0.5, 0]
    assert seen[0].tolist() == [[-1, 1, 1, 1, 1, -1], [1, -1, -1, -1, -1, 1]]
    assert (sign_np(x.detach().numpy()) != seen[0].numpy()).sum() == 5     # sign(x) alone differs in 5 places
    g = torch.tensor([[1.0, -2.0, 0.5, 3.0], [-1.0, 0.25, 2.0, -0.5]])
    (y * g).sum().backward()
    w_eff, shifted = magnitude_aware_np(layer.weight), (x - layer.threshold).detach().double().numpy()
    np.testing.assert_allclose(y.detach(), seen[0].double().numpy() @ w_eff.T + layer.bias.detach().double().numpy(),
                               rtol=1e-6)
    dx = (g.double().numpy() @ w_eff) * approx_sign_grad_np(shifted)
    np.testing.assert_allclose(x.grad, dx, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(layer.threshold.grad, -dx.sum(0), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("shape", [(3, 4), (2, 4, 3, 3)])
def test_rprelu_equals_the_formula(shape):
    torch.manual_seed(1)
    f = RPReLU(4)
    with torch.no_grad():
        f.gamma.normal_(), f.zeta.normal_(), f.prelu.weight.uniform_(-0.5, 0.5)
    x = torch.randn(shape, requires_grad=True)
    gamma, zeta, slope = (t.detach().double().numpy() for t in (f.gamma, f.zeta, f.prelu.weight))
    y = f(x)
    np.testing.assert_allclose(y.detach().double(), rprelu_np(x.detach().double().numpy(), gamma, slope, zeta),
                               rtol=1e-6, atol=1e-7)
    y.sum().backward()                  # ∂/∂ζ = 1 per element; ∂/∂γ = −(1 above γ, the slope below)
    reduce = tuple(i for i in range(len(shape)) if i != 1)
    above = (x.detach().double().numpy() - gamma.reshape((1, -1) + (1,) * (len(shape) - 2))) > 0
    count = np.prod(shape) // 4
    np.testing.assert_allclose(f.zeta.grad, np.full(4, count), rtol=1e-6)
    np.testing.assert_allclose(f.gamma.grad, -np.where(above, 1.0, slope.reshape((1, -1) + (1,) * (len(shape) - 2)))
                               .sum(reduce), rtol=1e-5)


@torch.no_grad()
def test_block_equals_the_reactnet_formula(trained):
    """RPReLU(BN_out(sign(x − t) ⊛ α·sign W) + x), main path from numpy signs and α, a plain conv."""
    model, x = trained["reactnet"], trained["test"][0][:16]
    assert shortcuts(model) == BLOCKS
    block, v = model.get_submodule("6"), block_input(model, "6", x).double()
    assert block.input_bn is None
    t = block.threshold.double().numpy().reshape(1, -1, 1, 1)
    product = F.conv2d(torch.from_numpy(sign_np(v.numpy() - t)), torch.from_numpy(magnitude_aware_np(block.weight)),
                       None, 1, 1).numpy()
    f = block.after
    want = rprelu_np(bn_np(block.output_bn, product) + v.numpy(),
                     *(a.double().numpy() for a in (f.gamma, f.prelu.weight, f.zeta)))
    np.testing.assert_allclose(block(v.float()).double().numpy(), want, rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------- digits


def accuracy(model, x, y):
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def minus_ones(model, x):
    """Per block, the fraction of −1 among its binary activations on ``x``."""
    seen = {}

    def count(name):
        def hook(module, args):
            seen[name] = float((module.binarize_input(args[0]) < 0).float().mean())
        return hook

    hooks = [model.get_submodule(n).register_forward_pre_hook(count(n)) for n in BLOCKS]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return seen


def test_reactnet_digits_accuracy_rests_on_the_learned_thresholds(trained):
    """Measured over two seeds (CNN initialisation and data order 0, 1): top-1 0.958 / 0.967, 0.100 / 0.098
    with the thresholds set back to 0 (every sign +1 again)."""
    model, (xte, yte) = trained["reactnet"], trained["test"]
    zeroed = copy.deepcopy(model)
    with torch.no_grad():
        for n in BLOCKS:
            zeroed.get_submodule(n).threshold.zero_()
    acc, acc0 = accuracy(model, xte, yte), accuracy(zeroed, xte, yte)
    learned, at_zero = minus_ones(model, xte[:64]), minus_ones(zeroed, xte[:64])
    print(f"\nreactnet digits: top-1 {acc:.4f}, thresholds set to 0: {acc0:.4f}; fraction of -1 signs {learned}")
    assert acc >= 0.94 and acc0 <= 0.3
    assert all(v == 0 for v in at_zero.values()) and min(learned.values()) > 0.1
    after = model.get_submodule("6").after
    assert after.gamma.abs().mean() > 0.005 and after.zeta.abs().mean() > 0.005


def test_distributional_loss_learns_from_the_teacher_not_the_labels(digits):
    """distill=True: training with shuffled labels gives the very weights the true labels give, not those
    of cross-entropy; in sdk.compress the original model is the teacher, as a copy of it is in apply."""
    xtr, ytr = digits[0][:256], digits[1][:256].long()
    torch.manual_seed(2)
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.Hardtanh(), nn.Linear(64, 64), nn.Hardtanh(),
                        nn.Linear(64, 10))
    shuffled = ytr[torch.randperm(len(ytr), generator=torch.Generator().manual_seed(3))]
    cfg = dict(epochs=1, max_steps=4, progress=False)

    def weights(labels, **options):
        data = list(make_loader(xtr, labels, batch_size=64, seed=0))
        return ReActNet(**cfg, **options).apply(copy.deepcopy(net), data).state_dict()

    true, wrong, ce = weights(ytr, distill=True), weights(shuffled, distill=True), weights(ytr)
    assert all(torch.equal(true[k], wrong[k]) for k in true)
    assert not all(torch.equal(true[k], ce[k]) for k in true)
    recipe = {"stages": [{"method": "reactnet", "config": {**cfg, "distill": True}}]}
    compressed = sdk.compress(net, recipe, data=list(make_loader(xtr, shuffled, batch_size=64, seed=0)))
    assert all(torch.equal(true[k], v) for k, v in compressed.state_dict().items())


# --------------------------------------------------------------------------- deploy


def test_reactnet_deploys_with_its_thresholds_in_the_signs(trained, tmp_path):
    model, (xte, yte) = trained["reactnet"], trained["test"]
    art = sdk.deploy(model, "binary-popcount", (xte[:1],), output=tmp_path / "reactnet", progress=False)
    ops = [r["op"] for r in art.profile["layers"]]
    assert ops.count("conv->BinaryConv") == 5 and ops.count("prelu->PReLU") == 5 and ops.count("add->Add") == 5
    specs, _ = artifact_specs(art)
    signs = [s.threshold for s in specs if isinstance(s, sp.Sign)]
    for got, name in zip(signs, BLOCKS, strict=True):                   # sign(x − t): x < t is −1
        np.testing.assert_array_equal(got, model.get_submodule(name).threshold.detach().numpy())
    slopes = [s.slopes for s in specs if isinstance(s, sp.PReLU)]
    for got, name in zip(slopes, BLOCKS, strict=True):
        np.testing.assert_array_equal(got, model.get_submodule(name).after.prelu.weight.detach().numpy())
    check_binary_artifact(art, model, xte, yte, "reactnet", min_accuracy=0.93)


def test_registered_config_round_trips():
    cls = p.find_method("reactnet", "quantizer")
    assert cls is ReActNet and not cls.post_training
    cfg = cls.Config(epochs=2, rprelu=False, distill=True, input_bn=True, exclude=("fc",))
    assert cls.Config.from_dict(cfg.to_dict()) == cfg
    assert ReActNet().layer_info().sign == "approx" and ReActNet().layer_info().learned_threshold
