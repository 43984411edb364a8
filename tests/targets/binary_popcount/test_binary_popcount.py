"""bnn / bwn / xnor against their papers' formulas, and the binary-popcount target end to end.

Method tests check the definitions by hand-computed values: sign with x >= 0 → +1,
the straight-through gradient ``g · 1_{|x| <= 1}``, α = mean |W| per filter,
XNOR-Net's K as a window mean of |x|, which layers stay float.  Target tests
train a LeNet-style CNN on digits, binarize it, pack it, and check the
compiled kernels against the numpy reference (integer popcounts bit for bit,
outputs to 1e-4) and against the torch binary model (top-1 agreement).
"""

import shutil
import subprocess

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sdk
import sdk.plugins as p
from examples.models import LeNet
from sdk.binary import BinaryConv2d, BinaryInfo, BinaryLinear, binarize, binarize_model, binary_layers, mean_abs_window
from sdk.errors import ConfigError, ToolchainError, UnsupportedOpError
from sdk.recipe import Recipe
from targets.binary_popcount import binary_layer_agreement, blob, build, emit
from targets.binary_popcount import reference as ref
from targets.binary_popcount import specs as sp
from targets.binary_popcount.packing import words
from targets.binary_popcount.runners import artifact_specs

BNN = BinaryInfo("bnn", scale_weights=False, binary_activations=True, scale_activations=False)
BWN = BinaryInfo("bwn", scale_weights=True, binary_activations=False, scale_activations=False, input_bn=False)
XNOR = BinaryInfo("xnor", scale_weights=True, binary_activations=True, scale_activations=True)
XNOR_RECIPE = {"stages": [{"method": "xnor", "config": {"epochs": 10, "lr": 3e-3, "progress": False}}]}
BNN_RECIPE = {"stages": [{"method": "bnn", "config": {"epochs": 5, "lr": 3e-3, "progress": False}}]}
#: test-set top-1 the binary digits model must reach (measured: xnor 0.993, bnn 0.97; float 0.993)
MIN_BINARY_ACCURACY = 0.90


pytestmark = pytest.mark.usefixtures("one_thread")   # tiny models: one thread is faster


def window_mean_abs(x, k, stride, pad):
    """XNOR-Net's K by the definition: mean of |x| over C·k·k inputs of each output, padding 0."""
    n, c, h, w = x.shape
    oh, ow = (h + 2 * pad - k) // stride + 1, (w + 2 * pad - k) // stride + 1
    out = np.zeros((n, 1, oh, ow))
    for oy in range(oh):
        for ox in range(ow):
            total = 0.0
            for ky in range(k):
                for kx in range(k):
                    iy, ix = oy * stride - pad + ky, ox * stride - pad + kx
                    if 0 <= iy < h and 0 <= ix < w:
                        total += np.abs(x[:, :, iy, ix].astype(np.float64)).sum(1)
            out[:, 0, oy, ox] = total / (c * k * k)
    return out


# --------------------------------------------------------------------------- the methods


def test_sign_and_its_straight_through_gradient():
    x = torch.tensor([-2.0, -1.0, -0.5, -0.0, 0.0, 0.3, 1.0, 1.5], requires_grad=True)
    upstream = torch.arange(1.0, 9.0)
    y = binarize(x)
    y.backward(upstream)
    assert y.tolist() == [-1, -1, -1, 1, 1, 1, 1, 1]
    assert x.grad.tolist() == [0, 2, 3, 4, 5, 6, 7, 0]          # g · 1_{|x| <= 1}


@pytest.mark.parametrize("info", [BNN, XNOR], ids=["bnn", "xnor"])
def test_binary_layer_sees_pm1_activations_and_weights(info):
    torch.manual_seed(0)
    layer = BinaryConv2d(nn.Conv2d(6, 5, 3, padding=1), info).eval()
    seen = []
    product = layer._product
    layer._product = lambda x, w: (seen.append((x, w)), product(x, w))[1]
    layer(torch.randn(2, 6, 7, 7))
    (x, w), = seen
    assert set(x.unique().tolist()) == {-1.0, 1.0} and set(w.unique().tolist()) == {-1.0, 1.0}
    if info is BNN:
        assert torch.equal(layer.effective_weight(), torch.where(layer.weight < 0, -1.0, 1.0))


@pytest.mark.parametrize("info", [BWN, XNOR], ids=["bwn", "xnor"])
def test_weights_are_plus_minus_alpha_with_alpha_the_filter_mean(info):
    torch.manual_seed(1)
    layer = BinaryConv2d(nn.Conv2d(4, 3, 3), info)
    w = layer.weight.detach().numpy()
    alpha = np.abs(w).reshape(3, -1).mean(1)
    np.testing.assert_allclose(layer.alpha().detach().numpy(), alpha, rtol=1e-6)
    eff = layer.effective_weight().detach().numpy()
    a = layer.alpha().detach().numpy()[:, None, None, None]
    assert np.array_equal(np.abs(eff), np.broadcast_to(a, eff.shape))          # exactly ±α
    assert np.array_equal(np.sign(eff), np.where(w < 0, -1.0, 1.0))
    if info is BWN:   # float activations: the layer is a conv with the ±α weights
        x = torch.randn(2, 4, 6, 6)
        with torch.no_grad():
            np.testing.assert_allclose(layer(x), F.conv2d(x, torch.from_numpy(eff), layer.bias), atol=1e-5)


@torch.no_grad()
def test_xnor_scales_by_k_the_window_mean_of_abs_x():
    torch.manual_seed(2)
    conv = BinaryConv2d(nn.Conv2d(5, 4, 3, stride=2, padding=1), XNOR).eval()
    x = torch.randn(2, 5, 7, 7)
    xn = conv.input_bn(x)
    k = window_mean_abs(xn.numpy(), 3, 2, 1)
    np.testing.assert_allclose(mean_abs_window(xn, [3, 3], [2, 2], [1, 1], [1, 1]), k, rtol=1e-5)
    expected = F.conv2d(torch.where(xn < 0, -1.0, 1.0), conv.effective_weight(), None, 2, 1) * torch.from_numpy(k) \
        + conv.bias.view(1, -1, 1, 1)
    np.testing.assert_allclose(conv(x), expected, rtol=1e-5, atol=1e-6)

    lin = BinaryLinear(nn.Linear(6, 3), XNOR).eval()
    v = torch.randn(4, 6)
    vn = lin.input_bn(v)
    expected = F.linear(torch.where(vn < 0, -1.0, 1.0), lin.effective_weight()) * vn.abs().mean(1, keepdim=True) \
        + lin.bias
    np.testing.assert_allclose(lin(v), expected, rtol=1e-5, atol=1e-6)


def test_bnn_gradients_are_the_hand_computed_straight_through_ones():
    torch.manual_seed(3)
    layer = BinaryLinear(nn.Linear(5, 3), BinaryInfo("bnn", False, True, False, input_bn=False))
    with torch.no_grad():
        layer.weight[0, 0], layer.weight[1, 2] = 1.7, -3.0        # outside the clip: no gradient
    x = torch.tensor([[0.2, -1.5, 0.9, -0.1, 3.0], [-0.7, 0.4, 1.0, -2.0, 0.0]], requires_grad=True)
    g = torch.randn(2, 3)
    (layer(x) * g).sum().backward()
    xb, wb, w = np.where(x.detach() < 0, -1, 1), np.where(layer.weight.detach() < 0, -1, 1), layer.weight.detach()
    gn = g.numpy()
    np.testing.assert_allclose(layer.weight.grad, (gn.T @ xb) * (np.abs(w.numpy()) <= 1), rtol=1e-6)
    np.testing.assert_allclose(x.grad, (gn @ wb) * (np.abs(x.detach().numpy()) <= 1), rtol=1e-6)


def test_first_and_last_layers_stay_float():
    model = LeNet()
    assert binarize_model(model, XNOR) == ["features.4", "classifier.1"]
    assert type(model.features[0]) is nn.Conv2d and type(model.classifier[3]) is nn.Linear
    assert binary_layers(model) == {"features.4": XNOR, "classifier.1": XNOR}
    assert binarize_model(LeNet(), BNN, keep_first_last=False) == ["features.0", "features.4", "classifier.1",
                                                                    "classifier.3"]
    assert binarize_model(LeNet(), BNN, exclude=("classifier.1",)) == ["features.4"]
    with pytest.raises(ConfigError, match="valid names: features.0"):
        binarize_model(LeNet(), BNN, exclude=("features.9",))
    with pytest.raises(ConfigError, match="already has binary layers"):
        binarize_model(model, BNN)
    with pytest.raises(ConfigError, match="no layer left"):
        binarize_model(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)), BNN)
    with pytest.raises(ConfigError, match="layer 1: .*groups=2.*add it to exclude"):
        binarize_model(nn.Sequential(nn.Conv2d(2, 4, 3), nn.Conv2d(4, 4, 3, groups=2), nn.Conv2d(4, 2, 1)), XNOR)


@pytest.mark.parametrize("name", ["bnn", "bwn", "xnor"])
def test_configs_round_trip_and_validate(name):
    cls = p.find_method(name, "quantizer")
    assert not cls.post_training and cls.__module__ == f"plugins.quantize.{name}"
    cfg = cls.Config(epochs=3, lr=0.01, exclude=("fc",), keep_first_last=False)
    assert cls.Config.from_dict(cfg.to_dict()) == cfg
    recipe = Recipe([(name, {"epochs": 2, "exclude": ["a.b"]})])
    assert Recipe.from_yaml(recipe.to_yaml()) == recipe and recipe.stages[0].config.exclude == ("a.b",)
    with pytest.raises(ConfigError, match="epochs=0"):
        cls(epochs=0)
    with pytest.raises(ConfigError, match="lr=0"):
        cls(lr=0.0)


def test_bnn_training_clips_weights_to_unit_interval():
    torch.manual_seed(4)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.Linear(8, 8), nn.Linear(8, 2))
    with torch.no_grad():
        model[2].weight[0, 0] = 5.0
    data = [(torch.randn(8, 1, 4, 4), torch.randint(0, 2, (8,))) for _ in range(3)]
    out = p.find_method("bnn")(epochs=1, progress=False).apply(model, data)
    assert isinstance(out[2], BinaryLinear) and out[2].weight.abs().max() <= 1.0
    assert not out.training


# --------------------------------------------------------------------------- the target on digits


@pytest.fixture(scope="module")
def trained(digits, tmp_path_factory):
    """Float LeNet (64 channels, so binary layers fill whole words) and its xnor / bnn versions, deployed."""
    from examples import digits as D
    from sdk.trainer import make_loader

    xtr, ytr, xte, yte = digits
    torch.manual_seed(0)
    model = D.train(LeNet(width=64), xtr, ytr.long(), epochs=8, progress=False)
    data = list(make_loader(xtr, ytr, batch_size=64, seed=0))
    root = tmp_path_factory.mktemp("binary")
    xnor = sdk.compress(model, XNOR_RECIPE, data=data)
    bnn = sdk.compress(model, BNN_RECIPE, data=data)
    example = (xte[:1],)
    return {
        "model": model, "data": data, "test": (xte, yte.long()), "xnor": xnor, "bnn": bnn,
        "xnor_art": sdk.deploy(xnor, "binary-popcount", example, output=root / "xnor", progress=False),
        "bnn_art": sdk.deploy(bnn, "binary-popcount", example, output=root / "bnn", progress=False),
        "recipe_art": sdk.deploy(model, "binary-popcount", example, recipe=XNOR_RECIPE, data=data,
                                 output=root / "recipe", progress=False),
    }


def accuracy(logits, y):
    return float((np.asarray(logits).argmax(1) == y.numpy()).mean())


@pytest.mark.parametrize("method", ["xnor", "bnn"])
def test_digits_binary_network_deploys_verifies_and_keeps_accuracy(trained, method):
    xte, yte = trained["test"]
    art, binary = trained[f"{method}_art"], trained[method]
    samples = [xte[i:i + 1] for i in range(len(xte))]
    with torch.no_grad():
        float_acc, torch_acc = accuracy(trained["model"](xte), yte), accuracy(binary(xte), yte)
    host = np.concatenate([art.run(s)[0] for s in samples])
    reference = np.concatenate([art.run(s, runner="reference")[0] for s in samples[:100]])
    art_acc = accuracy(host, yte)
    with torch.no_grad():
        agreement = float((host.argmax(1) == binary(xte).argmax(1).numpy()).mean())
    print(f"\n{method}: float {float_acc:.4f}, torch binary {torch_acc:.4f}, artifact {art_acc:.4f}, "
          f"top-1 agreement with torch {agreement:.4f}, latency {art.profile['latency_ms']['host']:.4f} ms")

    assert float_acc >= 0.95 and torch_acc >= MIN_BINARY_ACCURACY and art_acc >= MIN_BINARY_ACCURACY
    assert agreement >= 0.99
    assert np.abs(host[:100] - reference).max() <= 1e-4 * np.abs(reference).max()
    rep = art.verify(binary, inputs=samples[:40])
    assert rep.passed, str(rep)
    rows = binary_layer_agreement(art, [s.numpy() for s in samples[:100]])
    assert [r["name"] for r in rows] == art.manifest["binary_layers"] and len(rows) == 2
    assert all(r["elements"] > 0 and r["mismatches"] == 0 for r in rows), rows


def test_deploy_with_the_recipe_equals_compress_then_deploy(trained):
    a, b = trained["recipe_art"], trained["xnor_art"]
    assert a.file("weights.bin").read_bytes() == b.file("weights.bin").read_bytes()
    assert a.manifest["recipe"]["stages"][0]["method"] == "xnor"
    assert {"model.c", "model.h", "weights.bin", "ep_kernels.h", "ep_bgemm.c"} <= set(a.manifest["files"])


def test_batch_norm_after_a_bias_free_bnn_conv_folds_into_its_scale(tmp_path):
    torch.manual_seed(6)
    model = nn.Sequential(nn.Conv2d(3, 64, 3, padding=1), nn.Conv2d(64, 32, 3, padding=1, bias=False),
                          nn.BatchNorm2d(32), nn.Flatten(), nn.Linear(32 * 36, 4))
    with torch.no_grad():       # negative γ flips the signs the folded weights carry
        model[2].weight.uniform_(-1.5, 1.5)
        model[2].running_var.uniform_(0.5, 2.0)
        model[2].running_mean.uniform_(-3, 3)
    binarize_model(model, BNN)
    model.eval()
    art = sdk.deploy(model, "binary-popcount", (torch.randn(1, 3, 6, 6),), output=tmp_path / "a", progress=False)
    specs, _ = artifact_specs(art)
    conv = next(s for s in specs if isinstance(s, sp.BinaryConv))
    bn = model[2]
    np.testing.assert_allclose(conv.alpha, (bn.weight / torch.sqrt(bn.running_var + bn.eps)).abs().detach(),
                               rtol=1e-6)
    assert "batch_norm->ScaleBias" not in [r["op"] for r in art.profile["layers"]][3:]
    inputs = [torch.randn(1, 3, 6, 6) for _ in range(5)]
    assert art.verify(model, inputs=inputs).passed


def test_packed_binary_layers_are_under_a_24th_of_fp32(trained):
    rows = [r for r in trained["xnor_art"].profile["layers"] if "Binary" in r["op"]]
    assert [r["module"] for r in rows] == ["features.4", "classifier.1"]
    conv, fc = rows
    assert conv["bytes"] == 128 * 3 * 3 * words(64) * 8 + 4 * 128 and conv["fp32_bytes"] == 128 * 64 * 9 * 4
    assert fc["bytes"] == 64 * words(512) * 8 + 4 * 64 and fc["fp32_bytes"] == 64 * 512 * 4
    assert conv["bops"] == conv["fp32_macs"] == 4 * 4 * 128 * 64 * 9 and conv["macs"] == 0
    assert sum(r["bytes"] for r in rows) * 24 <= sum(r["fp32_bytes"] for r in rows)
    first = trained["xnor_art"].profile["layers"][0]
    assert first["op"] == "conv->FloatConv" and first["macs"] == 8 * 8 * 64 * 9 and first["bops"] == 0


def test_artifact_compiles_standalone_with_a_plain_c_compiler(trained, tmp_path):
    if shutil.which("cc") is None:
        pytest.skip("no C compiler")
    art = trained["xnor_art"]
    src = tmp_path / "fw"
    shutil.copytree(art.path, src)
    (src / "main.c").write_text(r"""
#include <stdio.h>
#include <stdlib.h>
#include "model.h"
int main(int argc, char **argv) {
    static float in[EDGEPACK_INPUT_SIZE], out[EDGEPACK_OUTPUT_SIZE];
    void *w = aligned_alloc(64, (EDGEPACK_WEIGHTS_BYTES + 63) / 64 * 64);
    FILE *f = fopen(argv[1], "rb");
    if (!w || !f || fread(w, 1, EDGEPACK_WEIGHTS_BYTES, f) != EDGEPACK_WEIGHTS_BYTES) return 2;
    for (int i = 0; i < EDGEPACK_INPUT_SIZE; ++i) in[i] = (float)(i % 16) / 16.0f;
    if (edgepack_model_run(in, out, w) != EDGEPACK_OK) return 3;
    for (int i = 0; i < EDGEPACK_OUTPUT_SIZE; ++i) printf("%.9g\n", out[i]);
    return 0;
}
""")
    exe = tmp_path / "fw.bin"
    subprocess.run(["cc", "-std=c11", "-O2", "-o", str(exe), *map(str, src.glob("*.c"))], check=True, cwd=src)
    printed = subprocess.run([str(exe), str(src / "weights.bin")], capture_output=True, text=True, check=True).stdout
    x = (np.arange(64, dtype=np.float32) % 16 / 16).reshape(1, 1, 8, 8)
    np.testing.assert_allclose(np.array(printed.split(), np.float32), art.run(x)[0][0], rtol=1e-5, atol=1e-5)


def test_layers_json_rebuilds_the_same_model(trained):
    art = trained["xnor_art"]
    specs, names = artifact_specs(art)
    assert blob.write_weights_bin(specs) == art.file("weights.bin").read_bytes()
    assert emit.generate_sources(specs) == (art.file("model.c").read_text(), art.file("model.h").read_text())
    assert "features.4" not in names and "conv2d_1" in names        # graph node names


def test_missing_compiler_names_the_package(trained, monkeypatch):
    monkeypatch.setenv("CC", "/nonexistent/edgepack-no-cc")
    with pytest.raises(ToolchainError, match="apt-get install gcc"):
        sdk.load(trained["xnor_art"].path).session("host")


# --------------------------------------------------------------------------- what the target refuses


def test_float_model_gets_told_to_binarize(tmp_path):
    model, x = LeNet().eval(), torch.randn(1, 1, 8, 8)
    with pytest.raises(ConfigError, match="apply a binary or low-bit quantizer"):
        sdk.deploy(model, "binary-popcount", (x,), output=tmp_path / "out", progress=False)
    assert list(tmp_path.iterdir()) == []


BWN_RECIPE = {"stages": [{"method": "bwn", "config": {"epochs": 1, "max_steps": 2, "progress": False}}]}


@pytest.fixture(scope="module")
def bwn_art(tmp_path_factory):
    """LeNet (64 channels) after bwn (binary weights, float activations), deployed."""
    torch.manual_seed(3)
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))
    data = [(x[i:i + 8], y[i:i + 8]) for i in (0, 8)]
    model = LeNet(width=64)
    bwn = sdk.compress(model, BWN_RECIPE, data=data)
    root = tmp_path_factory.mktemp("bwn")
    art = sdk.deploy(bwn, "binary-popcount", (x[:1],), output=root / "a", progress=False)
    return {"model": model, "bwn": bwn, "data": data, "art": art, "root": root, "x": torch.randn(6, 1, 8, 8)}


def test_bwn_network_deploys_as_binary_weight_layers(bwn_art):
    art, bwn = bwn_art["art"], bwn_art["bwn"]
    ops = [(r["module"], r["op"]) for r in art.profile["layers"]]
    assert [o for o in ops if "Bwn" in o[1]] == [("features.4", "conv->BwnConv"), ("classifier.1", "linear->BwnLinear")]
    assert not any(o.startswith(("mul->", "add->")) for _, o in ops)   # α and the bias folded into the layers
    assert art.manifest["binary_layers"] == []                # no popcount product to compare bit for bit
    specs, _ = artifact_specs(art)
    conv = next(s for s in specs if isinstance(s, sp.BwnConv))
    layer = bwn.features[4]
    np.testing.assert_array_equal(conv.alpha, layer.alpha().detach().numpy())
    np.testing.assert_array_equal(conv.bias, layer.bias.detach().numpy())
    rep = art.verify(bwn, inputs=list(bwn_art["x"][:, None]), runners=["host", "reference"])
    assert rep.passed, str(rep)


def test_bwn_deploy_with_the_recipe_equals_compress_then_deploy(bwn_art):
    again = sdk.deploy(bwn_art["model"], "binary-popcount", (bwn_art["x"][:1],), recipe=BWN_RECIPE,
                       data=bwn_art["data"], output=bwn_art["root"] / "recipe", progress=False)
    assert again.file("weights.bin").read_bytes() == bwn_art["art"].file("weights.bin").read_bytes()
    assert again.verify(bwn_art["bwn"], runners=["host", "reference"]).passed


def test_bwn_c_and_numpy_agree_and_match_torch(bwn_art):
    art, x = bwn_art["art"], bwn_art["x"]
    for i in range(len(x)):
        host, = art.run(x[i:i + 1])
        reference, = art.run(x[i:i + 1], runner="reference")
        with torch.no_grad():
            want = bwn_art["bwn"](x[i:i + 1]).numpy()
        # the bwn layers sum in one order in C and numpy (bit for bit on one input); the float
        # conv and linears around them do not, so the outputs agree to float32 rounding
        assert np.abs(host - reference).max() <= 1e-5 * np.abs(reference).max()
        assert np.abs(host - want).max() <= 1e-4 * np.abs(want).max()


def test_bwn_packed_weights_are_1_bit(bwn_art):
    art = bwn_art["art"]
    rows = [r for r in art.profile["layers"] if "Bwn" in r["op"]]
    conv, fc = rows
    # signs: 1 bit a weight, packed along the outputs; then α and the bias, float32 per output
    assert conv["bytes"] == 3 * 3 * 64 * (128 // 8) + 2 * 4 * 128 and conv["fp32_bytes"] == 4 * (128 * 64 * 9 + 128)
    assert fc["bytes"] == 512 * (64 // 8) + 2 * 4 * 64 and fc["fp32_bytes"] == 4 * (64 * 512 + 64)
    assert conv["macs"] == 4 * 4 * 128 * 64 * 9 and conv["bops"] == 0
    assert sum(r["bytes"] for r in rows) <= (1 / 32 + 1 / 24) * sum(r["fp32_bytes"] for r in rows)
    layers = {layer["name"]: layer for layer in __import__("json").loads(art.file("layers.json").read_bytes())["layers"]}
    signs = sum(int(np.prod(layers[r["name"]]["arrays"]["weight"]["shape"])) for r in rows)
    assert signs * 32 == 4 * (128 * 64 * 9 + 64 * 512)        # exactly 1/32 of the fp32 weights


def test_bwn_layer_with_odd_outputs_and_no_bias_lowers_and_verifies(tmp_path):
    torch.manual_seed(8)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 13, 3, stride=2, padding=1, bias=False),
                          nn.Flatten(), nn.Linear(13 * 9, 11), nn.ReLU(), nn.Linear(11, 3))
    binarize_model(model, BWN)
    art = sdk.deploy(model.eval(), "binary-popcount", (torch.randn(2, 3, 6, 6),), output=tmp_path / "a", progress=False)
    assert [r["op"] for r in art.profile["layers"]] == ["conv->FloatConv", "relu->ReLU", "conv->BwnConv",
                                                        "reshape->Flatten", "linear->BwnLinear", "relu->ReLU",
                                                        "linear->FloatLinear"]
    specs, _ = artifact_specs(art)
    assert next(s for s in specs if isinstance(s, sp.BwnConv)).bias is None
    assert art.verify(model, inputs=[torch.randn(2, 3, 6, 6) for _ in range(3)]).passed


class _Odd(nn.Module):
    def __init__(self, case):
        super().__init__()
        self.case = case
        self.c1 = nn.Conv2d(1, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, (3, 1) if case == "non-square-kernel" else 3, padding=1,
                            groups=2 if case == "grouped" else 1)
        self.fc = nn.Linear(8 * 8 * (10 if case == "non-square-kernel" else 8), 2)

    def forward(self, x):
        y = self.c2(self.c1(x))
        return self.fc((torch.sigmoid(y) if self.case == "sigmoid" else y).flatten(1))


@pytest.mark.parametrize("case,op,hint", [("non-square-kernel", "conv", "square kernels"),
                                          ("grouped", "conv", "groups=1"),
                                          ("sigmoid", "sigmoid", "binary kernels have no such layer")])
def test_layers_the_kernels_cannot_run_are_named(case, op, hint, tmp_path):
    model = _Odd(case)
    binarize_model(model, BNN)
    with pytest.raises(UnsupportedOpError, match=hint) as exc:
        sdk.deploy(model.eval(), "binary-popcount", (torch.randn(1, 1, 8, 8),), output=tmp_path / "o", progress=False)
    assert exc.value.op == op and exc.value.node and exc.value.target == "binary-popcount"
    assert list(tmp_path.iterdir()) == []


def test_hardtanh_before_sign_drops_and_untrained_bnn_verifies(tmp_path):
    torch.manual_seed(5)
    model = nn.Sequential(nn.Conv2d(3, 64, 3, padding=1), nn.Hardtanh(), nn.Conv2d(64, 64, 3, stride=2, padding=1),
                          nn.AvgPool2d(2), nn.Flatten(), nn.Linear(64 * 16, 5))
    binarize_model(model, BinaryInfo("bnn", False, True, False, input_bn=False))
    x = torch.randn(2, 3, 16, 16)
    art = sdk.deploy(model.eval(), "binary-popcount", (x,), output=tmp_path / "a", progress=False)
    assert [r["op"] for r in art.profile["layers"]][:3] == ["conv->FloatConv", "aten.binarize.default->Sign",
                                                            "conv->BinaryConv"]
    inputs = [torch.randn(2, 3, 16, 16) for _ in range(3)]
    assert art.verify(model, inputs=inputs).passed
    assert all(r["mismatches"] == 0 for r in binary_layer_agreement(art, [i.numpy() for i in inputs]))


# --------------------------------------------------------------------------- XNOR-Net's K in three implementations


@pytest.mark.parametrize("shape,k,stride,pad", [((2, 70, 7, 6), 3, 2, 1),
                                              pytest.param((1, 64, 5, 5), 1, 1, 0, marks=pytest.mark.slow),
                                              ((3, 70), 1, 1, 0)])
def test_k_scale_agrees_in_torch_numpy_and_c(shape, k, stride, pad, tmp_path):
    rng = np.random.default_rng(sum(shape))
    x = rng.standard_normal(shape).astype(np.float32)
    if len(shape) == 4:
        w = rng.standard_normal((9, shape[1], k, k))
        binary = sp.BinaryConv.from_float(w, np.ones(9), stride, pad)
        geometry = ([k, k], [stride] * 2, [pad] * 2, [1, 1])
    else:
        w = rng.standard_normal((9, shape[1]))
        binary, geometry = sp.BinaryLinear.from_float(w, np.ones(9)), ([], [], [], [])
    specs = [sp.InputSpec(shape), sp.Sign(), binary, sp.MeanAbsScale(0, k, stride, pad)]
    got = build.compile_model(specs, cache_dir=tmp_path).run(x)
    want, _ = ref.run_reference(specs, x)
    np.testing.assert_array_equal(got, want)             # same summation order by design
    xt = torch.from_numpy(x)
    product = (F.conv2d(binarize(xt), torch.from_numpy(np.where(w < 0, -1.0, 1.0)).float(), None, stride, pad)
               if len(shape) == 4 else F.linear(binarize(xt), torch.from_numpy(np.where(w < 0, -1.0, 1.0)).float()))
    scale = mean_abs_window(xt, *geometry)
    np.testing.assert_allclose(want, product * scale, rtol=1e-5)
    if len(shape) == 4:
        np.testing.assert_allclose(scale, window_mean_abs(x, k, stride, pad), rtol=1e-5)
