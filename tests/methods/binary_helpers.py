"""What the bireal and reactnet tests share (imported as ``binary_helpers``: pytest puts this
directory on ``sys.path``): the digits CNN both binarize, numpy forms of their blocks' pieces, and
the checks of a deployed binary-popcount artifact."""

import numpy as np
import torch
from hint_checks import check_hints
from torch import nn

from sdk.encoding import Hint
from targets.binary_popcount import binary_layer_agreement

WIDTH = 32                       # binary convs fill half a 64-bit word per pixel
BLOCKS = {"3": "identity", "6": "identity", "9": "identity", "12": "identity", "15": "downsample"}


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


def sign_np(x):
    return np.where(x < 0, -1.0, 1.0)


def approx_sign_grad_np(x):
    """ApproxSign, the derivative of Bi-Real Net's piecewise quadratic sign: 2 + 2x on [−1, 0),
    2 − 2x on [0, 1), 0 elsewhere."""
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


def check_binary_artifact(art, model, xte, yte, method: str, min_accuracy: float) -> None:
    """The deployed ``art`` of a 5-block binary ``model``: verify passes and every binary layer's popcounts
    equal the reference's on 20 test digits; on all of ``xte`` the artifact agrees with torch on
    >= 99 % of the top-1 answers and scores at least ``min_accuracy``; the blocks keep their hints."""
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
    print(f"\n{method} artifact: top-1 {art_acc:.4f}, weights.bin {art.file('weights.bin').stat().st_size} bytes, "
          f"binary layers {sum(r['bytes'] for r in binary)} bytes (fp32 {sum(r['fp32_bytes'] for r in binary)})")
    assert (host.argmax(1) == torch_out.argmax(1)).mean() >= 0.99 and art_acc >= min_accuracy
    check_hints(model, xte[:1], {n: Hint(codebook=2, per_channel=True, source=method) for n in BLOCKS})


# the small binary CNN that recu, xnorpp and their side-by-side with xnor train

SMALL_BLOCKS = ("3", "6", "9")        # the binarized convs of SMALL_CNN: two 16 → 16, one 16 → 32 of stride 2
SMALL_CNN = {"width": 16, "depth": 2}
SMALL_BATCH = 90                     # the deployed batch: the 450 test digits in 5 runs


def fresh_cnn(seed):
    """The binary tests' digits CNN (:data:`SMALL_CNN`), its parameters drawn afresh from ``seed`` (0: as cnn()
    makes them)."""
    model = cnn(**SMALL_CNN)
    if seed:
        torch.manual_seed(seed)
        for m in model.modules():
            if m is not model and hasattr(m, "reset_parameters"):
                m.reset_parameters()
    return model


def check_small_artifact(art, model, x, y, method, min_accuracy):
    """The deployed ``art`` of ``model`` (batch: :data:`SMALL_BATCH` digits): on the first batch verify passes, every
    binary layer's popcounts equal the numpy reference's and the host kernel's outputs equal the reference
    runner's; on all of ``x`` they equal torch's to 1e-4 with >= 99 % top-1 agreement and accuracy >=
    ``min_accuracy``; the binary layers keep their hints."""
    first = x[:SMALL_BATCH]
    rep = art.verify(model, inputs=[first])
    assert rep.passed, str(rep)
    rows = binary_layer_agreement(art, [first.numpy()])
    assert len(rows) == len(SMALL_BLOCKS) and all(r["elements"] > 0 and r["mismatches"] == 0 for r in rows), rows
    np.testing.assert_allclose(art.run(first)[0], art.run(first, runner="reference")[0], rtol=1e-5, atol=1e-5)
    host = np.concatenate([art.run(x[i:i + SMALL_BATCH])[0] for i in range(0, len(x), SMALL_BATCH)])
    with torch.no_grad():
        want = model(x).numpy()
    acc = float((host.argmax(1) == y.numpy()).mean())
    binary = [r for r in art.profile["layers"] if "Binary" in r["op"]]
    print(f"\n{method} artifact: top-1 {acc:.4f}, max |artifact - torch| {np.abs(host - want).max():.2e}, "
          f"weights.bin {art.file('weights.bin').stat().st_size} bytes, binary layers "
          f"{sum(r['bytes'] for r in binary)} bytes (fp32 {sum(r['fp32_bytes'] for r in binary)})")
    np.testing.assert_allclose(host, want, rtol=1e-4, atol=1e-4)
    assert (host.argmax(1) == want.argmax(1)).mean() >= 0.99 and acc >= min_accuracy
    check_hints(model, x[:1], {n: Hint(codebook=2, per_channel=True, source=method) for n in SMALL_BLOCKS})
