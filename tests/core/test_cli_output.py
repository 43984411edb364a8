"""What the CLI and the SDK write to a terminal or a log: results on stdout, messages through
``logging`` on stderr, progress bars only on a TTY, no third-party noise (LiteRT's XNNPACK banner,
torch's LeafSpec FutureWarning), verify reports that say what they checked, and ``compress``."""

import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from sdk.cli import main

ROOT = Path(__file__).resolve().parents[2]
X = torch.randn(1, 1, 8, 8, generator=torch.Generator().manual_seed(0))

FACTORY = '''
import torch

def tiny():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                               torch.nn.Linear(4 * 6 * 6, 3))

def not_a_model():
    return 42
'''


def _subprocess(code: str, timeout: int = 120) -> subprocess.CompletedProcess:
    # pipes, not a terminal: what `make demo > log` and CI see
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, cwd=ROOT,
                          timeout=timeout, env={**os.environ, "PYTHONWARNINGS": "default"})


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli-output")
    (d / "tinymodels.py").write_text(FACTORY)
    sys.path.insert(0, str(d))
    import tinymodels

    model = tinymodels.tiny().eval()
    torch.export.save(torch.export.export(model, (X,)), d / "m.pt2")
    rng = np.random.default_rng(0)
    np.savez(d / "cal.npz", x=rng.standard_normal((16, 1, 8, 8), dtype=np.float32))   # like X
    np.savez(d / "train.npz", x=rng.random((32, 1, 8, 8), dtype=np.float32), y=rng.integers(0, 3, 32))
    np.savez(d / "nox.npz", inputs=rng.random((4, 1, 8, 8), dtype=np.float32))
    (d / "recipe.yaml").write_text("version: 1\nstages:\n  - method: magnitude\n    config: {sparsity: 0.5}\n"
                                   "  - method: kd\n    config: {epochs: 1, lr: 0.001}\n")
    try:
        yield d, model
    finally:
        sys.path.remove(str(d))
        sys.modules.pop("tinymodels", None)


@pytest.fixture(scope="module")
def int8_art(files):
    d, _ = files
    out = d / "int8"
    assert main(["--quiet", "deploy", str(d / "m.pt2"), "-t", "arm-int8", "-c", str(d / "cal.npz"),
                 "-o", str(out)]) == 0
    return out


def _cli(capfd, *argv):
    code = main([str(a) for a in argv])
    cap = capfd.readouterr()
    return code, cap.out, cap.err


# -- progress and logging ---------------------------------------------------------------------

def test_deploy_without_a_terminal_logs_one_line_per_stage_and_quiet_logs_nothing(files, capfd, tmp_path):
    d, _ = files
    code, out, err = _cli(capfd, "deploy", d / "m.pt2", "-t", "arm-int8", "-c", d / "cal.npz", "-o", tmp_path / "a")
    assert code == 0, err
    assert out.startswith("wrote ") and "\r" not in out + err
    assert "edgepack: calibrating: 16 batches in" in err, err     # 16 samples, cut at the example batch (1)
    code, out, err = _cli(capfd, "deploy", d / "m.pt2", "-t", "arm-int8", "-c", d / "cal.npz", "-o", tmp_path / "b",
                          "--quiet")                                  # the flag after the command works too
    assert code == 0 and err == "" and out.startswith("wrote ")


def test_quiet_and_verbose_together_is_a_usage_error(capfd):
    code, _, err = _cli(capfd, "-q", "-v", "plugins")
    assert code == 2 and "--quiet and --verbose" in err


def test_library_code_leaves_logging_unconfigured(files, capfd):
    import logging

    before = logging.getLogger("edgepack").handlers[:], logging.getLogger().handlers[:]
    assert main(["-v", "plugins", "--json"]) == 0                      # the CLI's handler goes when main returns
    capfd.readouterr()
    assert (logging.getLogger("edgepack").handlers, logging.getLogger().handlers) == before


def test_progress_without_a_terminal_shows_no_bar_and_logs_the_stage(caplog, capfd):
    from sdk.log import progress

    with caplog.at_level("INFO", logger="edgepack"):
        assert list(progress(range(4), desc="counting", unit="item")) == [0, 1, 2, 3]
        with progress(total=3, desc="steps", unit="step", enabled=False) as bar:
            bar.update(3)
    assert "\r" not in capfd.readouterr().err                         # pytest's stderr is no terminal
    assert [r.getMessage().split(" in ")[0] for r in caplog.records] == ["counting: 4 items"]


def test_quiet_stderr_drops_the_banner_and_keeps_other_lines(capfd):
    from sdk.log import quiet_stderr

    with quiet_stderr(("INFO: banner",)):
        os.write(2, b"INFO: banner line\nreal error\n")
    assert capfd.readouterr().err == "real error\n"


def test_no_xnnpack_banner_when_the_sdk_creates_an_interpreter(int8_art):
    model = int8_art / "model.tflite"
    sdk_run = _subprocess(f"""
        from sdk.litert.runtime import load_interpreter
        load_interpreter({str(model)!r})""")
    raw = _subprocess(f"""
        from ai_edge_litert import interpreter
        interpreter.Interpreter(model_path={str(model)!r}).allocate_tensors()""")
    assert sdk_run.returncode == 0 and raw.returncode == 0, sdk_run.stderr + raw.stderr
    assert "XNNPACK delegate" in raw.stderr           # the runtime does print it: the check below can fail
    assert sdk_run.stderr == "", sdk_run.stderr


def test_no_leafspec_future_warning_when_deploying_a_pt2(files, capfd, tmp_path):
    d, _ = files
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code, _, err = _cli(capfd, "-q", "deploy", d / "m.pt2", "-t", "arm-int8", "-c", d / "cal.npz",
                            "-o", tmp_path / "a")
    assert code == 0, err
    assert not [w for w in caught if issubclass(w.category, FutureWarning)], [str(w.message) for w in caught]


def test_a_script_log_holds_no_progress_spam_or_third_party_noise(files, tmp_path):
    """The quickstart's path, reduced: train with the default progress=True, deploy, verify, run."""
    d, _ = files
    r = _subprocess(f"""
        import sys, numpy as np, torch
        sys.path.insert(0, {str(d)!r})
        import sdk, tinymodels
        from sdk.trainer import TrainConfig, classification_loss, fit
        torch.manual_seed(0)
        m = tinymodels.tiny()
        x, y = torch.rand(64, 1, 8, 8), torch.randint(0, 3, (64,))
        fit(m, [(x[i:i + 16], y[i:i + 16]) for i in range(0, 64, 16)], classification_loss, TrainConfig(epochs=2))
        art = sdk.deploy(m.eval(), target="arm-int8", example_inputs=(x[:1],), calibration=[x[:32]],
                         output={str(tmp_path / "art")!r})
        print(art.verify(m, inputs=[x[i:i + 1] for i in range(4)]))
        art.run(x[:1])
        """)
    assert r.returncode == 0, r.stderr
    log = r.stdout + r.stderr
    assert "\r" not in log
    assert "INFO" not in log and "Warning" not in log and "Deprecat" not in log, r.stderr
    assert "PASSED" in r.stdout


# -- verify ---------------------------------------------------------------------------------

def test_verify_without_a_model_says_what_it_checked_and_what_not(int8_art, capfd):
    code, out, err = _cli(capfd, "verify", int8_art)
    assert code == 0, out + err
    assert "nan" not in out.lower()
    assert "checked: the sha256 and size of 3 file(s) against manifest.json" in out
    assert "the golden outputs (recorded at deploy time): SQNR" in out
    assert "the reference runner: 1.0000 of the quantized outputs bit-exact, max 0 LSB" in out
    assert "not checked: fidelity vs the float (torch) model" in out and "--model" in out


def test_verify_with_the_model_measures_fidelity_against_it(files, int8_art, capfd):
    d, model = files
    inputs = np.random.default_rng(1).random((3, 1, 8, 8), dtype=np.float32)
    np.savez(d / "in.npz", x=inputs)
    code, out, err = _cli(capfd, "verify", int8_art, "--model", d / "m.pt2", "--inputs", d / "in.npz", "--json")
    assert code == 0, out + err
    import json

    host = json.loads(out)["runners"]["host"]
    with torch.no_grad():
        want = model(torch.from_numpy(inputs)).numpy()
    import sdk

    got = np.concatenate([sdk.load(int8_art).run(inputs[i:i + 1])[0] for i in range(3)])
    assert host["max_abs_err"] == pytest.approx(float(np.abs(got - want).max()), rel=1e-5)
    assert "float model" in host["compared_with"]
    code, out, _ = _cli(capfd, "verify", int8_art, "--model", d / "m.pt2")
    assert "the float (torch) model: SQNR" in out and "not checked: fidelity" not in out


def test_binary_popcount_verify_reports_popcounts_and_float_errors():
    """A hand-made report renders as the real one would (the end-to-end case is in the slow test)."""
    from sdk.verify import GOLDEN, REFERENCE, RunnerReport, VerifyReport

    host = RunnerReport("host", bit_exact_ratio=0.702, max_lsb=3e-7, ref_rel_err=2e-7, ref_max_abs_err=3e-7,
                        golden_sqnr_db=130.0, golden_max_abs_err=1e-8, golden_max_rel_err=1e-7, latency_ms=0.05,
                        compared_with=[GOLDEN, REFERENCE],
                        extra={"integers": {"what": "popcounts", "compared": 10560, "differ": 0}})
    text = str(VerifyReport("binary-popcount", {"host": host}, [], {}, inputs="5 given input call(s)"))
    assert "popcounts: 10560 compared, 0 differ; float outputs max abs err 3e-07, max rel err 2e-07" in text
    assert "bit-exact" not in text and "0.702" not in text


@pytest.mark.slow
def test_binary_popcount_verify_end_to_end(tmp_path):
    import sdk
    from examples.models import LeNet

    torch.manual_seed(0)
    x, y = torch.randn(32, 1, 8, 8), torch.randint(0, 10, (32,))
    b = sdk.compress(LeNet(width=64).eval(), {"stages": [{"method": "xnor", "config": {"epochs": 1}}]},
                     data=[(x, y)], progress=False)
    art = sdk.deploy(b, target="binary-popcount", example_inputs=(x[:1],), output=tmp_path / "b", progress=False)
    rep = art.verify(b, inputs=[x[i:i + 1] for i in range(3)])
    ints = rep.runners["host"].extra["integers"]
    assert ints["what"] == "popcounts" and ints["differ"] == 0 and ints["compared"] > 0
    assert rep.passed and f"popcounts: {ints['compared']} compared, 0 differ" in str(rep)


# -- compress -------------------------------------------------------------------------------

def test_compress_from_the_command_line_prunes_distils_saves_and_deploys(files, capfd, tmp_path):
    d, model = files
    out = tmp_path / "small.pt2"
    code, stdout, err = _cli(capfd, "compress", "tinymodels:tiny", "--recipe", d / "recipe.yaml",
                             "--data", d / "train.npz", "--batch-size", "8", "-o", out,
                             "--deploy", "arm-int8", "--artifact", tmp_path / "art")
    assert code == 0, err
    assert "edgepack: kd: 4 steps in" in err                       # 32 samples / batch 8, one epoch
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art", "small.pt2"]     # no temporary left behind
    from sdk.pt2 import load_exported

    small = load_exported(out).module()                 # passes the pickle-safety check deploy applies
    weights = torch.cat([v.flatten() for k, v in small.state_dict().items() if k.endswith("weight")])
    assert abs(float((weights == 0).float().mean()) - 0.5) < 0.02         # magnitude, sparsity 0.5
    assert not (torch.cat([v.flatten() for k, v in model.state_dict().items() if k.endswith("weight")]) == 0).any()
    import sdk

    art = sdk.load(tmp_path / "art")
    with np.load(d / "train.npz") as z:          # calibrated on the --data inputs: verify on their kind
        samples = [torch.from_numpy(z["x"][i:i + 1]) for i in range(4)]
    rep = art.verify(small, inputs=samples)
    assert art.target == "arm-int8" and rep.passed, str(rep)
    code, _, err = _cli(capfd, "compress", "tinymodels:tiny", "--recipe", d / "recipe.yaml",
                        "--data", d / "train.npz", "-o", out)
    assert code == 2 and "exists; pass --force" in err


@pytest.mark.parametrize("argv, message", [
    (["--recipe", "{d}/missing.yaml", "--data", "{d}/train.npz"], "recipe file {d}/missing.yaml does not exist"),
    (["--recipe", "{d}/recipe.yaml", "--data", "{d}/nox.npz"], "has no array 'x' (it holds inputs)"),
    (["--recipe", "{d}/recipe.yaml"], "compress needs data"),
    (["--recipe", "{d}/recipe.yaml", "--data", "{d}/train.npz", "--deploy", "arm-int8"], "needs --artifact"),
    (["--recipe", "{d}/recipe.yaml", "--data", "{d}/train.npz", "--weights", "{d}/cal.npz"], "is not a torch.save"),
    (["--recipe", "{d}/recipe.yaml", "--data", "{d}/train.npz", "--deploy", "nope", "--artifact", "{d}/a"],
     "unknown target 'nope'"),
    (["--recipe", "{d}/recipe.yaml", "--data", "{d}/train.npz", "--deploy", "arm-int8", "--artifact",
      "{d}/recipe.yaml"], "recipe.yaml"),
])
def test_compress_bad_inputs_are_named_errors(files, capfd, tmp_path, argv, message):
    d, _ = files
    code, _, err = _cli(capfd, "compress", "tinymodels:tiny", *[a.format(d=d) for a in argv], "-o", tmp_path / "o.pt2")
    assert code == 2 and message.format(d=d) in err and err.count("\n") == 1, err
    assert not (tmp_path / "o.pt2").exists()


@pytest.mark.parametrize("spec, message", [("tinymodels", "is not PKG.MODULE:FACTORY"),
                                           ("no_such_module:f", "cannot import it"),
                                           ("model.pt2", "compress needs the model as Python code"),
                                           ("tinymodels:not_a_model", "returned a int, not a torch.nn.Module")])
def test_compress_bad_model_specs(files, capfd, tmp_path, spec, message):
    d, _ = files
    code, _, err = _cli(capfd, "compress", spec, "--recipe", d / "recipe.yaml", "--data", d / "train.npz",
                        "-o", tmp_path / "o.pt2")
    assert code == 2 and message in err, err


def test_compress_refuses_a_directory_as_output_before_training(files, capfd, tmp_path):
    d, _ = files
    (tmp_path / "d.pt2").mkdir()
    code, _, err = _cli(capfd, "compress", "tinymodels:tiny", "--recipe", d / "recipe.yaml", "--data", d / "train.npz",
                        "-o", tmp_path / "d.pt2", "--force")
    assert code == 2 and "is a directory" in err and "kd:" not in err, err
    assert (tmp_path / "d.pt2").is_dir()
