"""Bit-serial k-bit layers of the binary-popcount target: k-bit weights (ternary, DoReFa) as
±1 planes, k-bit / residual activations as ±1 planes, every plane product an XNOR-popcount.

Checked against independent references: the plane decomposition against the weights it
came from; the numpy reference's integers against a float64 torch convolution of the
integer codes; the compiled C against the numpy reference bit for bit (native and portable
builds, and the NEON build under qemu); a DoReFa W2A2 and a ternary network on digits
end to end, with the bytes of the packed layers measured in the artifact."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sdk
from sdk.binary import residual_sign
from targets.binary_popcount import build, packing
from targets.binary_popcount import reference as ref
from targets.binary_popcount import specs as sp

pytestmark = pytest.mark.usefixtures("one_thread")


def dorefa_grid(rng, shape, bits):
    """Weights on DoReFa's k-bit grid (2q − n) / n, q in 0..n."""
    n = 2 ** bits - 1
    return ((2 * rng.integers(0, n + 1, shape) - n) / n).astype(np.float32)


def ternary(rng, shape, alpha=0.37):
    return (alpha * rng.integers(-1, 2, shape)).astype(np.float32)


def rebuild(signs, coefficients, alpha):
    return alpha.reshape((-1,) + (1,) * (signs.ndim - 2)) * np.tensordot(coefficients, signs, 1)


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
@pytest.mark.parametrize("per_row", [False, True])
def test_weight_planes_rebuild_dorefa_grids(bits, per_row):
    rng = np.random.default_rng(bits)
    w = dorefa_grid(rng, (12, 5, 3, 3), bits)
    if per_row:                 # a folded BatchNorm scales each output channel
        w = (w * rng.uniform(0.5, 2.0, (12, 1, 1, 1))).astype(np.float32)
    signs, coefficients, alpha = packing.weight_planes(w)
    assert signs.shape == (bits, 12, 5, 3, 3) and set(np.unique(signs)) <= {-1.0, 1.0}
    assert coefficients.tolist() == [2 ** i for i in range(bits)]
    np.testing.assert_allclose(rebuild(signs, coefficients, alpha), w, rtol=1e-6, atol=1e-7)


def test_weight_planes_of_ternary_weights_are_two_planes():
    w = ternary(np.random.default_rng(0), (8, 16))
    signs, coefficients, alpha = packing.weight_planes(w)
    assert signs.shape == (2, 8, 16) and coefficients.tolist() == [1, 1]
    np.testing.assert_allclose(alpha, 0.37 / 2, rtol=1e-7)
    np.testing.assert_allclose(rebuild(signs, coefficients, alpha), w, rtol=1e-6)


@pytest.mark.parametrize("w", [np.random.default_rng(0).standard_normal((8, 16)),   # float weights
                               np.array([[0.0, 1.0, 3.0, 1.0]]),                     # zero and two levels
                               np.array([[1.0, 2.0, -1.0, 4.0]])],                   # even codes
                         ids=["float", "zero-and-levels", "even"])
def test_weight_planes_refuse_what_is_on_no_grid(w):
    assert packing.weight_planes(w) is None


def codes_of(x, bits, inv_step):
    return np.rint(np.clip(np.nan_to_num(x * np.float32(inv_step), nan=0.0), 0, 2 ** bits - 1))


def torch_conv(x_nchw, w, stride, pad):
    return F.conv2d(torch.tensor(x_nchw, dtype=torch.float64), torch.tensor(w, dtype=torch.float64),
                    stride=stride, padding=pad).numpy().transpose(0, 2, 3, 1)


LAYERS = [("dorefa2", 2, 1, 0), ("dorefa3", 3, 2, 1), ("ternary", None, 1, 1), ("binary", 1, 1, 1)]


@pytest.mark.parametrize("weights,bits,stride,pad", LAYERS)
@pytest.mark.parametrize("act_bits", [1, 2, 4])
def test_reference_on_bit_planes_is_twice_the_integer_conv(weights, bits, stride, pad, act_bits):
    rng = np.random.default_rng(act_bits)
    w = ternary(rng, (7, 70, 3, 3)) if bits is None else dorefa_grid(rng, (7, 70, 3, 3), bits)
    signs, coefficients, alpha = packing.weight_planes(w)
    codes_w = np.rint(w / alpha[:, None, None, None]).astype(np.float64) if bits else \
        np.tensordot(coefficients, signs, 1)                 # ternary: 2t, alpha = a / 2
    x = (rng.standard_normal((2, 6, 7, 70)) * 2).astype(np.float32)   # NHWC
    planes = ref.bit_planes(x, act_bits, 3.0)
    acc = ref.bitserial_conv2d(planes, packing.pack_conv_weight(signs[0])[None] if len(signs) == 1 else
                               np.stack([packing.pack_conv_weight(p) for p in signs]), coefficients, 70, stride, pad)
    q = codes_of(x, act_bits, 3.0).transpose(0, 3, 1, 2)
    np.testing.assert_array_equal(acc, 2 * torch_conv(q, codes_w, stride, pad))


@pytest.mark.parametrize("order", [1, 2, 3])
def test_residual_planes_equal_the_torch_op_and_the_integer_convs(order):
    rng = np.random.default_rng(order)
    x = rng.standard_normal((2, 5, 5, 70)).astype(np.float32)
    planes = ref.residual_planes(x, order)
    h = np.stack([packing.unpack_bits(p, 70) for p in planes.words])       # ±1 [order, N, H, W, C]
    approx = (h * planes.betas[:, :, None, None, None]).sum(0)
    torch_approx = residual_sign(torch.from_numpy(x), order).numpy()
    np.testing.assert_allclose(approx, torch_approx, rtol=1e-5, atol=1e-6)
    w = dorefa_grid(rng, (9, 70, 3, 3), 2)
    signs, coefficients, alpha = packing.weight_planes(w)
    acc = ref.bitserial_conv2d(planes, np.stack([packing.pack_conv_weight(p) for p in signs]), coefficients, 70, 1, 1)
    codes_w = np.rint(w / alpha[:, None, None, None])
    for j in range(order):
        np.testing.assert_array_equal(acc[j], torch_conv(h[j].transpose(0, 3, 1, 2), codes_w, 1, 1))


def test_reconstruction_error_falls_with_the_order():
    x = torch.randn(4, 64, 6, 6)
    errors = [float((x - residual_sign(x, k)).norm()) for k in (1, 2, 3, 4)]
    assert all(a > b for a, b in zip(errors, errors[1:])), errors


def network(act: str, rng) -> list:
    """Conv and linear bit-serial layers on each activation kind, with strides, padding, 70 channels."""
    first = {"planes": lambda: sp.BitPlanes(np.array([3.0], np.float32), 2), "residual": lambda: sp.ResidualSign(3),
             "packed": sp.Sign}[act]
    conv = sp.BitSerialConv.from_planes(*packing.weight_planes(dorefa_grid(rng, (9, 70, 3, 3), 2)), stride=2,
                                        padding=1)
    lin = sp.BitSerialLinear.from_planes(*packing.weight_planes(ternary(rng, (5, 81))))
    second = {"planes": lambda: sp.BitPlanes(np.array([0.5], np.float32), 3), "residual": lambda: sp.ResidualSign(2),
              "packed": sp.Sign}[act]
    return [sp.InputSpec((2, 70, 6, 6)), first(), conv, sp.Flatten(), second(), lin]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("bitserial_kernels")


# every activation mode compiled for the baseline ISA; the native (AVX2 / VPOPCNTDQ) build of two of
# them is a slow duplicate (about 20 s each) of the packed one's
@pytest.mark.parametrize("act, march", [
    pytest.param("planes", "native", marks=pytest.mark.slow, id="native-planes"),
    pytest.param("residual", "native", marks=pytest.mark.slow, id="native-residual"),
    pytest.param("packed", "native", id="native-packed"),
    pytest.param("planes", None, id="baseline-planes"),
    pytest.param("residual", None, id="baseline-residual"),
    pytest.param("packed", None, id="baseline-packed"),
])
def test_compiled_bitserial_network_is_bit_exact_with_the_reference(act, march, cache):
    rng = np.random.default_rng(7)
    specs = network(act, rng)
    model = build.compile_model(specs, march=march, cache_dir=cache)
    x = (rng.standard_normal((2, 70, 6, 6)) * 2).astype(np.float32)
    if act == "planes":
        x[0, :4, 0, 0] = [np.nan, np.inf, -np.inf, 0.5 / 3.0 * 3]    # NaN -> code 0, ±inf clamp
    out, popcounts = model.run_debug(x)
    ref_out, ref_popcounts = ref.run_reference(specs, x)
    assert [p.shape for p in popcounts] == [p.shape for p in ref_popcounts]
    for got, want in zip(popcounts, ref_popcounts):
        np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(out, ref_out)


def test_bit_serial_bops_are_the_plane_pairs_times_the_binary_ones():
    rows = sp.layer_profile(network("planes", np.random.default_rng(0)))
    conv, lin = rows[2], rows[5]
    assert conv["bops"] == 2 * 2 * (2 * 9 * 3 * 3) * 70 * 9       # 2 weight × 2 activation planes
    assert lin["bops"] == 2 * 3 * 2 * 5 * 81                      # ternary: 2 planes × 3 activation planes


# --------------------------------------------------------------------------- end to end on digits


def digits_cnn():
    return nn.Sequential(nn.Conv2d(1, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
                         nn.Conv2d(64, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(64, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
                         nn.Flatten(), nn.Linear(64 * 16, 64), nn.ReLU(), nn.Linear(64, 10))


def accuracy(logits, y) -> float:
    return float((np.asarray(logits).argmax(1) == np.asarray(y)).mean())


def packed_bound(row, bits) -> bool:
    """The issue's bound on a packed low-bit layer: bytes <= (bits/32 + 1/24) x its fp32 bytes."""
    return row["bytes"] <= (bits / 32 + 1 / 24) * row["fp32_bytes"]


@pytest.fixture(scope="module")
def trained(digits, tmp_path_factory):
    """DoReFa W2A2 and ternary (TWN) digits CNNs, fine-tuned from one float model, and their artifacts."""
    from plugins.quantize.dorefa import DoReFa
    from plugins.quantize.ternary import Ternary
    from sdk.trainer import evaluate

    xtr, ytr, xte, yte = digits
    data = [(xtr[i:i + 64], ytr[i:i + 64]) for i in range(0, len(xtr), 64)]
    torch.manual_seed(0)
    base = digits_cnn()
    opt = torch.optim.Adam(base.parameters(), 3e-3)
    for _ in range(4):
        for xb, yb in data:
            opt.zero_grad()
            F.cross_entropy(base(xb), yb).backward()
            opt.step()
    base.eval()
    root = tmp_path_factory.mktemp("bitserial")
    out = {"float": (base, None, evaluate(base, [(xte, yte)]))}
    for name, q in [("dorefa-w2a2", DoReFa(weight_bits=2, activation_bits=2, epochs=4, lr=1e-3, progress=False)),
                    ("ternary", Ternary(epochs=4, lr=1e-3, progress=False))]:
        torch.manual_seed(1)
        model = q.apply(copy.deepcopy(base).train(), data=data).eval()
        art = sdk.deploy(model, "binary-popcount", (xte[:1],), output=root / name, progress=False)
        out[name] = (model, art, evaluate(model, [(xte, yte)]))
    return out


@pytest.mark.parametrize("name,kind,bits", [("dorefa-w2a2", "BitSerialConv", 2), ("ternary", "PlaneWeightConv", 2)])
def test_low_bit_digits_cnn_ships_packed_planes_and_runs_as_torch(trained, digits, name, kind, bits):
    model, art, torch_acc = trained[name]
    xte, yte = digits[2], digits[3]
    float_acc = trained["float"][2]
    got = np.concatenate([art.run(xte[i:i + 1])[0] for i in range(len(xte))])
    with torch.no_grad():
        want = model(xte).numpy()
    assert accuracy(got, want.argmax(1)) >= 0.99
    assert abs(accuracy(got, yte) - torch_acc) <= 0.01
    assert torch_acc >= float_acc - 0.05, (torch_acc, float_acc)
    rows = [r for r in art.profile["layers"] if r["op"].endswith(kind)]
    assert len(rows) == 2                                  # the two inner convs
    for row in rows:
        assert packed_bound(row, bits), row
    ratio = sum(r["bytes"] for r in rows) / sum(r["fp32_bytes"] for r in rows)
    print(f"\n{name}: float {float_acc:.4f}, torch {torch_acc:.4f}, artifact {accuracy(got, yte):.4f}, "
          f"packed convs {ratio:.4f} of fp32 (bound {bits / 32 + 1 / 24:.4f})")


@pytest.mark.emulation
def test_bit_serial_artifact_under_qemu_gives_the_hosts_outputs(emu, trained, digits):
    _, art, _ = trained["dorefa-w2a2"]
    for i in range(3):
        x = digits[2][i:i + 1].numpy()
        got, host = art.run(x, runner="qemu-aarch64")[0], art.run(x)[0]
        np.testing.assert_allclose(got, host, rtol=1e-5, atol=1e-5 * np.abs(host).max())


def test_weight_planes_of_ternary_weights_scaled_per_output():
    rng = np.random.default_rng(2)
    w = ternary(rng, (8, 16)) * rng.uniform(0.5, 2, (8, 1)).astype(np.float32)
    signs, coefficients, alpha = packing.weight_planes(w)
    assert coefficients.tolist() == [1, 1] and len(np.unique(alpha)) == 8
    np.testing.assert_allclose(rebuild(signs, coefficients, alpha), w, rtol=1e-6)
