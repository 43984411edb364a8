"""Activations between the layers of a binary network on binary-popcount: Hardtanh (Clamp), PReLU, ReLU, BN.

BinaryNet (Courbariaux et al. 2016) puts BatchNorm → Hardtanh between layers;
ReLU6 and ``torch.clamp`` capture as the same ``hardtanh`` op.  The lowering
runs it as a :class:`Clamp` layer on any float activation and drops it only
where binarize alone reads it and its bounds keep every sign.  Checked here: a
BinaryNet-style model trained by ``bnn`` and ``xnor`` deploys, the C and the
numpy reference agree (popcounts bit for bit) and both match torch; clamp
variants map to the right bounds; the compiled Clamp on edge values (exact
bounds, ±0, ±inf, NaN: NaN stays NaN) equals numpy; under qemu-aarch64 the
NEON build gives the host's outputs; what stays refused says why.
"""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sdk
from sdk.binary import BinaryInfo, binarize, binarize_model
from sdk.errors import ArtifactError, UnsupportedOpError
from targets.binary_popcount import binary_layer_agreement, blob
from targets.binary_popcount import specs as sp
from targets.binary_popcount.runners import artifact_specs, dump_specs, load_specs

pytestmark = pytest.mark.usefixtures("one_thread")

#: bnn without the quantizer's input BatchNorm: a Hardtanh then sits right before the binarize
BNN_NO_BN = BinaryInfo("bnn", scale_weights=False, binary_activations=True, scale_activations=False, input_bn=False)
SHAPE = (1, 3, 8, 8)


class BinaryNetStyle(nn.Module):
    """BN → Hardtanh → conv → BN → Hardtanh → binary conv → BN → PReLU → binary conv → BN → Hardtanh → linear
    (BinaryNet's BN → Hardtanh between layers, a PReLU as in ReActNet).  The quantizers keep the first conv
    and the last linear float and give each binary conv an input BN, so every Hardtanh here runs as a Clamp
    (none feeds a binarize directly)."""

    def __init__(self):
        super().__init__()
        self.bn0, self.act0 = nn.BatchNorm2d(3, momentum=None), nn.Hardtanh()
        self.conv0 = nn.Conv2d(3, 64, 3, padding=1)
        self.bn1, self.act1 = nn.BatchNorm2d(64, momentum=None), nn.Hardtanh()
        self.conv1 = nn.Conv2d(64, 64, 3, padding=1, bias=False)
        self.bn2, self.act2 = nn.BatchNorm2d(64, momentum=None), nn.PReLU(64)
        self.conv2 = nn.Conv2d(64, 64, 3, stride=2, padding=1, bias=False)
        self.bn3, self.act3 = nn.BatchNorm2d(64, momentum=None), nn.Hardtanh(-0.75, 1.5)
        self.fc = nn.Linear(64 * 4 * 4, 10)
        for bn in (self.bn0, self.bn1, self.bn3):
            nn.init.constant_(bn.weight, 2.0)           # with true batch statistics: the Hardtanhs clip often

    def forward(self, x):
        x = self.conv0(self.act0(self.bn0(x)))
        x = self.conv1(self.act1(self.bn1(x)))
        x = self.conv2(self.act2(self.bn2(x)))
        return self.fc(self.act3(self.bn3(x)).flatten(1))


def batches(n, seed, batch=16):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn((batch,) + SHAPE[1:], generator=g) * 2 for _ in range(n)]


@pytest.fixture(scope="module")
def binarynet(tmp_path_factory):
    """The model trained one epoch on random labelled batches by bnn and by xnor, each deployed."""
    torch.manual_seed(0)
    model = BinaryNetStyle()
    g = torch.Generator().manual_seed(1)
    data = [(x, torch.randint(0, 10, (x.shape[0],), generator=g)) for x in batches(3, seed=0)]
    root, out = tmp_path_factory.mktemp("binarynet"), {}
    for method in ("bnn", "xnor"):
        recipe = {"stages": [{"method": method, "config": {"epochs": 1, "lr": 3e-3, "progress": False}}]}
        binary = sdk.compress(model, recipe, data=data)
        art = sdk.deploy(binary, "binary-popcount", (torch.zeros(SHAPE),), output=root / method, progress=False)
        out[method] = binary, art
    return out


@pytest.mark.parametrize("method", ["bnn", "xnor"])
def test_binarynet_with_hardtanh_between_layers_deploys_and_verifies(binarynet, method):
    binary, art = binarynet[method]
    ops = [r["op"] for r in art.profile["layers"]]
    assert ops.count("hardtanh->Clamp") == 3 and "prelu->PReLU" in ops and ops.count("conv->BinaryConv") == 2
    assert ops[:3] == ["batch_norm->ScaleBias", "hardtanh->Clamp", "conv->FloatConv"]
    assert ops[-3:] == ["hardtanh->Clamp", "reshape->Flatten", "linear->FloatLinear"]
    specs, _ = artifact_specs(art)
    assert [s.bounds.tolist() for s in specs if isinstance(s, sp.Clamp)] == [[-1, 1], [-1, 1], [-0.75, 1.5]]
    clamps = [r for r in art.profile["layers"] if r["op"] == "hardtanh->Clamp"]
    assert all(r["bytes"] == 8 and r["macs"] == r["bops"] == 0 and r["in_shape"] == r["out_shape"] for r in clamps)

    inputs = batches(4, seed=2, batch=1)
    pre = {"act1": [], "act3": []}      # the clamps must clip here, or a Clamp that did nothing would pass
    hooks = [getattr(binary, n).register_forward_pre_hook(lambda m, a, n=n: pre[n].append(a[0])) for n in pre]
    with torch.no_grad():
        torch_out = torch.cat([binary(x) for x in inputs]).numpy()
    for h in hooks:
        h.remove()
    act1, act3 = (torch.cat(v) for v in pre.values())
    assert (act1.abs() > 1).float().mean() > 0.1 and ((act3 < -0.75) | (act3 > 1.5)).float().mean() > 0.1

    rep = art.verify(binary, inputs=inputs, runners=["host", "reference"])
    assert rep.passed, str(rep)
    host = np.concatenate([art.run(x)[0] for x in inputs])
    reference = np.concatenate([art.run(x, runner="reference")[0] for x in inputs])
    np.testing.assert_allclose(host, reference, rtol=1e-4, atol=1e-4 * np.abs(reference).max())
    np.testing.assert_allclose(host, torch_out, rtol=1e-3, atol=1e-3 * np.abs(torch_out).max())
    assert (host.argmax(1) == torch_out.argmax(1)).all()
    rows = binary_layer_agreement(art, [x.numpy() for x in inputs])
    assert len(rows) == 2 and all(r["elements"] > 0 and r["mismatches"] == 0 for r in rows), rows


def with_nan_and_inf(seed=5):
    """An input with NaN and ±inf pixels: the Clamps keep NaN NaN (torch does), it binarizes to +1
    (``x < 0`` is false), so the binary layers' outputs and the model's stay finite."""
    x = batches(1, seed, batch=1)[0]
    x[0, 0, 1, 1], x[0, 1, 5, 2], x[0, 2, 3, 6], x[0, 0, 7, 0] = float("nan"), float("inf"), -float("inf"), 1.0
    return x


def test_nan_and_inf_inputs_run_as_in_torch(binarynet):
    binary, art = binarynet["bnn"]            # (xnor's K, a mean of |x|, would carry the NaN to the output)
    x = with_nan_and_inf()
    with torch.no_grad():
        want = binary(x).numpy()
    host, reference = art.run(x)[0], art.run(x, runner="reference")[0]
    assert np.isfinite(want).all() and np.isfinite(host).all()
    np.testing.assert_allclose(host, reference, rtol=1e-4, atol=1e-4 * np.abs(reference).max())
    np.testing.assert_allclose(host, want, rtol=1e-3, atol=1e-3 * np.abs(want).max())
    assert all(r["mismatches"] == 0 for r in binary_layer_agreement(art, [x.numpy()]))


class ClampVariants(nn.Module):
    """torch.clamp / clamp_max before a binarize (dropped: they keep every sign), leaky_relu (a PReLU),
    ReLU6 before a float layer and clamp_min on the output (Clamps)."""

    def __init__(self):
        super().__init__()
        self.c0, self.c1 = nn.Conv2d(3, 64, 3, padding=1), nn.Conv2d(64, 64, 3, padding=1)
        self.c2, self.fc = nn.Conv2d(64, 64, 3, stride=2, padding=1), nn.Linear(64 * 16, 10)

    def forward(self, x):
        y = torch.clamp(self.c0(x), -0.5, 2.0)
        y = F.leaky_relu(self.c1(y), 0.1).clamp_max(2.5)
        y = F.relu6(self.c2(y))
        return self.fc(y.flatten(1)).clamp_min(-1.0)


def test_relu6_clamp_and_leaky_relu_map_to_their_layers(tmp_path):
    torch.manual_seed(3)
    model = ClampVariants()
    binarize_model(model, BNN_NO_BN)
    model.eval()
    art = sdk.deploy(model, "binary-popcount", (torch.zeros(2, 3, 8, 8),), output=tmp_path / "a", progress=False)
    assert [r["op"] for r in art.profile["layers"]] == [
        "conv->FloatConv", "aten.binarize.default->Sign", "conv->BinaryConv", "add->ScaleBias", "leaky_relu->PReLU",
        "aten.binarize.default->Sign", "conv->BinaryConv", "add->ScaleBias", "hardtanh->Clamp", "reshape->Flatten",
        "linear->FloatLinear", "hardtanh->Clamp"]
    specs, _ = artifact_specs(art)
    assert [s.bounds.tolist() for s in specs if isinstance(s, sp.Clamp)] == [[0, 6], [-1, np.inf]]
    assert [s.slopes.tolist() for s in specs if isinstance(s, sp.PReLU)] == [[np.float32(0.1)]]
    inputs = [torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    rep = art.verify(model, inputs=inputs, runners=["host", "reference"])
    assert rep.passed, str(rep)
    out = art.run(inputs[0])[0]
    assert (out == -1.0).mean() > 0.2 and out.min() == -1.0          # the output clamp clips exactly at its bound
    assert all(r["mismatches"] == 0 for r in binary_layer_agreement(art, [i.numpy() for i in inputs]))


def test_layers_json_refuses_a_nan_clamp_bound():
    specs = [sp.InputSpec((1, 64)), sp.Clamp.between(-1, 1), sp.Sign(),
             sp.BinaryLinear.from_float(np.random.default_rng(0).standard_normal((4, 64)))]
    layers, weights = dump_specs(specs, ["", "clamp", "sign", "fc"]), blob.write_weights_bin(specs)
    clamp = json.loads(layers)["layers"][1]
    assert clamp["fields"] == {} and clamp["arrays"]["bounds"]["shape"] == [2]      # its floats lie in the blob
    offset = blob.weight_layout(specs).offsets[(1, "bounds")]
    bad = bytearray(weights)
    bad[offset:offset + 4] = np.float32(np.nan).tobytes()
    with pytest.raises(ArtifactError, match=r"layer 1 \(Clamp 'clamp'\).*bounds must be \[lo, hi\]"):
        load_specs(layers, bytes(bad))


# --------------------------------------------------------------------------- what stays refused


class _Three(nn.Module):
    def __init__(self, middle):
        super().__init__()
        self.middle = middle
        self.register_buffer("lo", torch.zeros(1, 64, 1, 1))
        self.c0, self.c1 = nn.Conv2d(3, 64, 3, padding=1), nn.Conv2d(64, 64, 3, padding=1)
        self.c2 = nn.Conv2d(64, 8, 3, padding=1)

    def forward(self, x):
        y = self.c1(self.c0(x))
        if self.middle == "clamp-binarized":
            y = F.hardtanh(binarize(y), -0.5, 0.5)
        elif self.middle == "tensor-bounds":
            y = torch.clamp(y, min=self.lo)
        elif self.middle == "nan-bound":
            y = torch.clamp(y, min=float("nan"))
        else:
            y = torch.sigmoid(y)
        return self.c2(y)


@pytest.mark.parametrize("middle,op,node,hint", [
    ("clamp-binarized", "hardtanh", "hardtanh",
     "it clamps binarized (±1) activations, the output of edgepack.binarize, which only a binary conv or linear reads "
     "here; clamp before the binarize instead (there a clamp with min < 0 <= max changes no sign and is dropped)"),
    ("tensor-bounds", "aten.clamp.Tensor", "clamp",
     "clamp runs here with number bounds, one min and max for the whole tensor; these bounds are tensors: pass "
     "numbers (torch.clamp(x, -1.0, 1.0), nn.Hardtanh, nn.ReLU6)"),
    ("nan-bound", "hardtanh", "clamp", "clamp bounds must be numbers (-inf/inf for no bound), got min=nan, max=inf"),
    ("sigmoid", "sigmoid", "sigmoid", "the binary kernels have no such layer; binary-popcount runs: edgepack.binarize, "
     "conv, linear, batch_norm, relu, prelu, leaky_relu, hardtanh/relu6/clamp with number bounds, max_pool2d"),
])
def test_what_is_still_refused_says_precisely_why(middle, op, node, hint, tmp_path):
    model = _Three(middle)
    binarize_model(model, BNN_NO_BN)
    with pytest.raises(UnsupportedOpError) as exc:
        sdk.deploy(model.eval(), "binary-popcount", (torch.zeros(1, 3, 8, 8),), output=tmp_path / "o", progress=False)
    e = exc.value
    assert (e.op, e.node, e.target) == (op, node, "binary-popcount")
    assert hint in str(e) and "hardtanh only runs here" not in str(e)
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- the NEON build under qemu-aarch64


@pytest.mark.emulation
@pytest.mark.parametrize("method", ["bnn", "xnor"])
def test_binarynet_under_qemu_gives_the_hosts_outputs(emu, binarynet, method):
    """The NEON build (its Clamp uses FMAX/FMIN, which keep NaN) against the host's AVX or portable one."""
    _, art = binarynet[method]
    inputs = [x.numpy() for x in batches(2, seed=4, batch=1)]
    if method == "bnn":
        inputs.append(with_nan_and_inf().numpy())
    for x in inputs:
        got, host = art.run(x, runner="qemu-aarch64")[0], art.run(x)[0]
        # float layers may round differently on ARM; the binary layers' integers do not, so this is tight
        np.testing.assert_allclose(got, host, rtol=1e-5, atol=1e-5 * np.abs(host).max())
        assert got.argmax() == host.argmax()
