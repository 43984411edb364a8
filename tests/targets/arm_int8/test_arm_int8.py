"""arm-int8 / arm-fp32: every zoo model packs, runs in LiteRT, and equals the integer reference."""

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sdk
from examples.models import ZOO, make
from sdk.errors import CalibrationError, ExportError, UnsupportedOpError
from sdk.litert import runtime
from sdk.litert.flatbuffer import read_model, op_name


def calibration(x, n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(x.shape, generator=g) for _ in range(n)]


@pytest.fixture(scope="module")
def zoo_artifacts(tmp_path_factory):
    out = {}
    root = tmp_path_factory.mktemp("zoo")
    for name in ZOO:
        model, x = make(name)
        for target in ("arm-fp32", "arm-int8"):
            out[name, target] = (model, x, sdk.deploy(model, target=target, example_inputs=(x,),
                                                      calibration=calibration(x), output=root / f"{name}-{target}",
                                                      progress=False))
    return out


@pytest.mark.parametrize("name", list(ZOO))
def test_zoo_int8_is_bit_exact_with_reference(zoo_artifacts, name):
    model, x, art = zoo_artifacts[name, "arm-int8"]
    inputs = calibration(x, n=3, seed=1)
    rep = art.verify(model, inputs=inputs)
    assert rep.passed, str(rep)
    assert rep.bit_exact_ratio["host"] >= 0.99 and rep.max_lsb["host"] <= 1
    assert rep.sqnr_db["host"] > 20, "int8 output should track the float model"
    # the integer graph runs in LiteRT as XNNPACK delegate nodes only (no fallback kernels)
    summary = runtime.op_summary(runtime.load_interpreter(art.file("model.tflite")))
    assert not summary["builtin"], summary


@pytest.mark.parametrize("name", list(ZOO))
def test_zoo_fp32_matches_torch(zoo_artifacts, name):
    model, x, art = zoo_artifacts[name, "arm-fp32"]
    rep = art.verify(model, inputs=calibration(x, n=2, seed=2))
    assert rep.passed, str(rep)
    assert rep.max_rel_err["host"] < 1e-4 and rep.max_rel_err["reference"] < 1e-4


@pytest.mark.parametrize("name", ["resnet18"])
def test_int8_file_is_a_quarter_of_fp32(zoo_artifacts, name):
    size = lambda t: zoo_artifacts[name, t][2].manifest["files"]["model.tflite"]["bytes"]  # noqa: E731
    assert size("arm-int8") <= 0.27 * size("arm-fp32")


def test_int8_model_is_integer_only_inside(zoo_artifacts):
    _, _, art = zoo_artifacts["resnet18", "arm-int8"]
    model = read_model(art.file("model.tflite").read_bytes())
    ops = [op_name(model, op) for op in model.subgraphs[0].operators]
    assert ops[0] == "QUANTIZE" and ops[-1] == "DEQUANTIZE"
    assert "ADD" in ops and ops.count("CONV_2D") == 20


def test_profile_and_inspect(zoo_artifacts, capsys):
    from sdk.cli import main

    _, _, art = zoo_artifacts["lenet", "arm-int8"]
    layers = art.profile["layers"]
    conv = [l for l in layers if l["op"].startswith("conv")]
    assert conv[0]["macs"] == 8 * 8 * 16 * 9 and conv[0]["params"] == 16 * 9 + 16
    assert conv[0]["bytes"] == 16 * 9 + 4 * 16            # int8 weights + int32 bias
    assert art.profile["latency_ms"]["host"] > 0
    assert main(["inspect", str(art.path)]) == 0
    out = capsys.readouterr().out
    assert "conv->CONV_2D" in out and "latency (host)" in out


def test_integer_io(tmp_path):
    model, x = make("lenet")
    cal = calibration(x)
    a = sdk.deploy(model, "arm-int8", (x,), calibration=cal, output=tmp_path / "f", progress=False)
    b = sdk.deploy(model, "arm-int8", (x,), calibration=cal, io="int8", output=tmp_path / "i", progress=False)
    m = read_model(b.file("model.tflite").read_bytes())
    sub = m.subgraphs[0]
    assert all(sub.tensors[i].type == 9 for i in list(sub.inputs) + list(sub.outputs))   # INT8
    assert b.manifest["inputs"][0]["stored_dtype"] == "int8"
    step = b.manifest["outputs"][0]["quantization"]["scale"][0]
    for s in calibration(x, 3, seed=5):
        assert np.abs(a.run(s)[0] - b.run(s)[0]).max() <= step * 1.001
    assert b.verify(model, inputs=calibration(x, 2, seed=6)).passed


class AllOps(nn.Module):
    """Every op the lowering knows, with awkward parameters."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.dw = nn.Conv2d(8, 16, 3, padding=2, dilation=2, groups=8)
        self.pr = nn.PReLU(16)
        self.c1d = nn.Conv1d(4, 6, 3, padding=1)
        self.fc = nn.Linear(70, 5)

    def forward(self, x, seq):
        y = self.pr(self.dw(F.relu(self.c1(x))))
        a = torch.sigmoid(y) * y - 0.5
        b = torch.tanh(y) + F.hardswish(y)
        c = torch.cat([a, F.leaky_relu(b, 0.1), F.silu(y) * 0.5, F.hardsigmoid(y)], 1)
        c = F.max_pool2d(c, 2)
        c = F.avg_pool2d(F.pad(c, (1, 1, 1, 1)), 2)
        c = F.interpolate(c, scale_factor=2, mode="nearest")
        h = torch.cat([c.mean((2, 3)), self.c1d(seq).mean(2)], 1)
        return torch.softmax(self.fc(h), -1), c.permute(0, 2, 1, 3)


@pytest.mark.parametrize("target", ["arm-fp32", "arm-int8"])
def test_all_ops(target, tmp_path):
    torch.manual_seed(0)
    m = AllOps().eval()
    ex = (torch.randn(1, 3, 16, 16), torch.randn(1, 4, 10))
    cal = [(torch.randn(1, 3, 16, 16), torch.randn(1, 4, 10)) for _ in range(8)]
    art = sdk.deploy(m, target, ex, calibration=cal, output=tmp_path / "a", progress=False)
    rep = art.verify(m, inputs=[(torch.randn(1, 3, 16, 16), torch.randn(1, 4, 10)) for _ in range(3)])
    assert rep.passed, str(rep)
    if target == "arm-int8":
        assert rep.sqnr_db["host"] > 25
        # PReLU, softmax (float between DEQUANTIZE/QUANTIZE), nearest upsampling (copies), hardswish,
        # hardsigmoid, LeakyReLU, mean: all inside the one XNNPACK partition
        summary = runtime.op_summary(runtime.load_interpreter(art.file("model.tflite")))
        assert summary["delegate_nodes"] == 1 and not summary["builtin"], summary


@pytest.mark.parametrize("factor", [(3, 3), (2, 7)])
def test_int8_nearest_upsampling_is_exact_copies_in_one_partition(factor, tmp_path):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 4, 1), nn.Upsample(scale_factor=factor, mode="nearest")).eval()
    x = torch.randn(1, 3, 5, 4)
    art = sdk.deploy(m, "arm-int8", (x,), calibration=calibration(x, 4), output=tmp_path / "a", progress=False)
    summary = runtime.op_summary(runtime.load_interpreter(art.file("model.tflite")))
    assert summary["delegate_nodes"] == 1 and not summary["builtin"], summary
    y = art.run(x, runner="host")[0]
    assert np.array_equal(y, art.run(x, runner="reference")[0])
    small = y[:, :, ::factor[0], ::factor[1]]       # every copy equals its source element
    assert np.array_equal(y, np.repeat(np.repeat(small, factor[0], 2), factor[1], 3))


def test_digits_cnn_int8_accuracy_within_one_point(digits, tmp_path):
    from examples import digits as D

    xtr, ytr, xte, yte = digits
    torch.manual_seed(0)
    model = D.train(make("lenet", randomize_bn=False)[0].train(), xtr, ytr, epochs=12, progress=False)
    float_acc = D.accuracy(model, xte, yte)
    art = sdk.deploy(model, "arm-int8", (xte[:1],), calibration=[xtr[i:i + 32] for i in range(0, 320, 32)],
                     output=tmp_path / "d", progress=False)
    int8_logits = np.concatenate([art.run(xte[i:i + 1])[0] for i in range(len(xte))])
    int8_acc = float((int8_logits.argmax(1) == yte.numpy()).mean())
    assert float_acc > 0.95
    assert abs(float_acc - int8_acc) <= 0.01, (float_acc, int8_acc)


@pytest.mark.parametrize("case", ["unsupported-op", "nan-calibration", "wrong-shape-calibration", "control-flow"])
def test_bad_input_leaves_no_artifact(case, tmp_path):
    model, x = make("lenet")

    class Cumsum(nn.Module):
        def forward(self, t):
            return torch.cumsum(t, dim=1)

    class Branchy(nn.Module):
        def forward(self, t):
            return t * 2 if t.mean() > 0 else t

    kw = {"calibration": calibration(x)}
    if case == "unsupported-op":
        model, err = nn.Sequential(model, Cumsum()), UnsupportedOpError
    elif case == "nan-calibration":
        kw["calibration"][3][0, 0, 0, 0] = float("nan")
        err = CalibrationError
    elif case == "wrong-shape-calibration":
        kw["calibration"] = [torch.randn(4, 1, 8, 9)]
        err = CalibrationError
    else:
        model, err = Branchy(), ExportError
    with pytest.raises(err) as exc:
        sdk.deploy(model, "arm-int8", (x,), output=tmp_path / "out", progress=False, **kw)
    if case == "unsupported-op":
        assert exc.value.op == "aten.cumsum.default" and exc.value.target == "arm-int8"
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("target", ["arm-fp32", "arm-int8"])
def test_grouped_conv(target, tmp_path):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1, groups=4), nn.ReLU(), nn.Conv2d(16, 8, 1, groups=2)).eval()
    x = torch.randn(1, 8, 6, 6)
    art = sdk.deploy(m, target, (x,), calibration=calibration(x), output=tmp_path / "g", progress=False)
    rep = art.verify(m, inputs=calibration(x, 3, seed=9))
    assert rep.passed, str(rep)


def test_profile_says_where_deploy_time_goes_and_what_left_xnnpack(tmp_path, capsys):
    from sdk.cli import main

    model, x = make("lenet")
    art = sdk.deploy(model, "arm-int8", (x,), calibration=calibration(x, 2), output=tmp_path / "a", progress=False)
    prof = art.profile
    summary = runtime.op_summary(runtime.load_interpreter(art.file("model.tflite")))
    assert prof["delegation"] == {"delegate": "XNNPACK", "partitions": summary["delegate_nodes"],
                                  "delegated_ops": sum(summary["delegated"].values()),
                                  "outside_delegate": dict(summary["builtin"])}
    phases = prof["deploy_phases_s"]
    assert {"setup", "capture", "calibrate", "pack", "first_run_and_timing"} <= set(phases)
    assert 0 < sum(phases.values()) <= prof["deploy_seconds"] + 1e-3
    assert main(["inspect", str(tmp_path / "a")]) == 0
    out = capsys.readouterr().out
    assert "XNNPACK: 1 partition(s)" in out and "calibrate" in out


@pytest.mark.parametrize("act", [nn.Sigmoid(), nn.Tanh(), nn.Softmax(-1)], ids=["sigmoid", "tanh", "softmax"])
def test_precision_critical_outputs_stay_float(act, tmp_path):
    """A sigmoid / tanh / softmax output of an int8 graph (float I/O) is computed in float from the
    dequantized logits: no int8 step of 1/256 on it, same partition, exact with the reference."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(16, 10), act).eval()
    x = torch.randn(1, 16)
    art = sdk.deploy(m, "arm-int8", (x,), calibration=calibration(torch.randn(4, 16), 4), output=tmp_path / "a",
                     progress=False)
    assert art.manifest["outputs"][0]["quantization"] is None
    row = art.profile["layers"][-1]
    assert row["precision"] == "float32" and "model output" in row["why_float"]
    rep = art.verify(m, inputs=calibration(x, 4, seed=3))
    assert rep.passed and rep.max_lsb["host"] == 0, rep
    values = np.concatenate([art.run(t)[0].ravel() for t in calibration(x, 4, seed=4)])
    assert len(np.unique(values)) > 20 and not np.allclose(values * 256, np.round(values * 256))
    assert runtime.op_summary(runtime.load_interpreter(art.file("model.tflite")))["delegate_nodes"] == 1


def _imports(path: Path) -> list[str]:
    import ast

    tree = ast.parse(path.read_text())
    return [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names] + \
        [("." * n.level) + (n.module or "") for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]


def test_litert_targets_share_sdk_litert_only():
    """The LiteRT toolkit lives in sdk/litert; each LiteRT target package imports no other target,
    and the flatbuffer writer does not import its checker (who writes and then checks calls both)."""
    root = Path(__file__).resolve().parents[3]
    for pkg in ("arm_int8", "arm_fp32", "fp16_gpu"):
        for path in (root / "targets" / pkg).rglob("*.py"):
            others = [m for m in _imports(path) if m.startswith("targets.")]
            assert not others, (path, others)
    writer = _imports(root / "sdk" / "litert" / "flatbuffer.py")
    assert not [m for m in writer if m.endswith("fbcheck")], writer
