"""Graph capture, trainer determinism, lazy imports, CLI."""

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

import sdk
from sdk.graph import capture, fold_batch_norm
from sdk.trainer import TrainConfig, fit

ROOT = Path(__file__).resolve().parents[2]


def test_capture_matches_model_and_folds_bn(small_cnn):
    g = capture(small_cnn, (torch.randn(1, 1, 8, 8),))
    assert [n.op for n in g.nodes] == ["conv", "batch_norm", "relu", "conv", "batch_norm", "relu", "reshape",
                                       "linear"]
    f = fold_batch_norm(g)
    assert [n.op for n in f.nodes] == ["conv", "relu", "conv", "relu", "reshape", "linear"]
    x = torch.randn(5, 1, 8, 8)                  # another batch size than captured
    ref = small_cnn(x)
    assert torch.allclose(g.run([x])[0], ref, atol=1e-6)
    assert torch.allclose(f.run([x])[0], ref, atol=1e-5)
    assert f.nodes[0].module == "c1"


def test_capture_canonicalises_common_ops():
    class Many(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.dw = torch.nn.Conv2d(4, 4, 3, groups=4, padding=1)
            self.pr = torch.nn.PReLU(4)

        def forward(self, x):
            y = torch.nn.functional.relu6(self.dw(x)) * 0.5 + 1.0
            y = torch.cat([self.pr(y), torch.sigmoid(y), torch.nn.functional.hardswish(y)], 1)
            y = torch.nn.functional.max_pool2d(y, 2)
            y = torch.nn.functional.pad(y, (1, 1, 1, 1))
            y = torch.nn.functional.interpolate(y, scale_factor=2, mode="nearest")
            return torch.softmax(y.mean((2, 3)), -1), y.permute(0, 2, 3, 1)

    m = Many().eval()
    g = capture(m, (torch.randn(1, 4, 8, 8),))
    assert {n.op for n in g.nodes} == {"conv", "hardtanh", "mul", "add", "prelu", "sigmoid", "hardswish", "cat",
                                       "max_pool2d", "pad", "upsample_nearest", "mean", "softmax", "permute"}
    x = torch.randn(2, 4, 8, 8)
    for a, b in zip(g.run([x]), m(x)):
        assert torch.allclose(a, b, atol=1e-6)


def test_trainer_is_deterministic():
    data = [(torch.randn(8, 4, generator=torch.Generator().manual_seed(i)), torch.randn(8, 1)) for i in range(5)]

    def train():
        torch.manual_seed(123)
        net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Dropout(0.2), torch.nn.Linear(8, 1))
        losses = fit(net, data, lambda m, b: torch.nn.functional.mse_loss(m(b[0]), b[1]),
                     TrainConfig(epochs=3, lr=1e-2, seed=7, progress=False))
        return net, losses

    (a, la), (b, lb) = train(), train()
    assert la == lb and la[-1] < la[0]
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_import_sdk_is_lazy():
    code = ("import sys, sdk; heavy = [m for m in sys.modules if m.split('.')[0] in "
            "('torch', 'ai_edge_litert', 'tflite_runtime', 'numpy', 'sklearn')]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def _cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "sdk", *args], capture_output=True, text=True, cwd=ROOT,
                          env=env, timeout=600)


def test_cli_deploy_verify_inspect(tmp_path, small_cnn, example_plugin_env):
    x = torch.randn(1, 1, 8, 8)
    torch.export.save(torch.export.export(small_cnn, (x,)), tmp_path / "m.pt2")
    np.savez(tmp_path / "cal.npz", x=np.random.default_rng(0).random((32, 1, 8, 8), dtype=np.float32))
    out = tmp_path / "art"
    r = _cli("deploy", str(tmp_path / "m.pt2"), "--target", "torch-ir", "--calibration", str(tmp_path / "cal.npz"),
             "-o", str(out), env=example_plugin_env)
    assert r.returncode == 0, r.stderr
    assert "wrote" in r.stdout
    r = _cli("verify", str(out), "--json", env=example_plugin_env)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["passed"] is True
    r = _cli("inspect", str(out), env=example_plugin_env)
    assert r.returncode == 0 and "conv" in r.stdout and "latency (host)" in r.stdout

    # a broken packer: weights changed and re-hashed consistently -> verification fails, exit 1
    import hashlib

    wpath = out / "weights.npz"
    with np.load(wpath) as z:
        arrays = {k: z[k] * 1.5 for k in z.files}
    np.savez(wpath, **arrays)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["files"]["weights.npz"]["sha256"] = hashlib.sha256(wpath.read_bytes()).hexdigest()
    (out / "manifest.json").write_text(json.dumps(manifest))
    r = _cli("verify", str(out))
    assert r.returncode == 1 and "FAILED" in r.stdout

    # a damaged file -> one-line error, exit 2
    with open(wpath, "ab") as f:
        f.write(b"x")
    r = _cli("verify", str(out))
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "ArtifactError" in r.stderr
    assert "Traceback" not in r.stderr


def test_cli_usage_errors(tmp_path):
    r = _cli("deploy", str(tmp_path / "missing.pt2"), "--target", "torch-ir", "-o", str(tmp_path / "o"))
    assert r.returncode == 2 and "does not exist" in r.stderr and "Traceback" not in r.stderr
    r = _cli("frobnicate")
    assert r.returncode == 2
    r = _cli("deploy", str(tmp_path / "missing.pt2"), "--target", "nope", "-o", str(tmp_path / "o"))
    assert r.returncode == 2


def test_readme_plugin_table_matches_registry():
    """The README's built-in plugin list is generated; regenerate it when this fails."""
    from sdk.cli import plugins_markdown

    rows = [r for r in sdk.list_plugins() if r["module"].startswith(("plugins.", "targets."))]
    text = (ROOT / "README.md").read_text()
    table = text.split("<!-- plugins:start -->\n", 1)[1].split("<!-- plugins:end -->", 1)[0].strip()
    assert table == plugins_markdown(rows).strip(), (
        "README plugin table is stale: replace it with the output of "
        "`EDGEPACK_DISABLE_PLUGIN_AUTOLOAD=1 edgepack plugins --markdown`")


def test_readme_commands_exist():
    text = (ROOT / "README.md").read_text()
    makefile = (ROOT / "Makefile").read_text()
    assert "make demo" in text and "make test" in text
    assert "\ndemo:" in makefile and "\ntest:" in makefile
    assert "make test" in (ROOT / ".ci" / "run").read_text()
    # the test files the README cites exist (tests/ mirrors the source tree: a move updates the README)
    cited = set(re.findall(r"`(tests/[\w/]+\.py)", text))
    assert cited and not [c for c in sorted(cited) if not (ROOT / c).is_file()], cited
