"""Runner qemu-aarch64: the very artifact, run on an emulated ARM64 Linux, bit for bit.

Tests marked ``emulation`` install the emulator once per session
(``sdk.emulator.install()``: Debian arm64 packages and aarch64 wheels, about
40 s the first time, instant afterwards) and are skipped when qemu-aarch64 is
missing (``make test`` installs it when run as root).
"""

import json
import math
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import sdk
import sdk.plugins as plugins
from examples.models import make
from sdk import emulator
from sdk.errors import ConfigError, RunnerError, ToolchainError
from sdk.qemu import QemuAarch64Runner
from targets.arm_int8 import QemuRunner as ArmInt8QemuRunner

#: zoo models run under emulation: (make() options, verify repeats).  mobilenetv2 at half
#: width; the full ResNet-18 (11 MB) costs ~0.3 s per emulated call and ~1.5 s per call
#: of the numpy reference, so it is timed over fewer repeats.
MODELS = {"mlp": ({}, 5), "lenet": ({}, 5), "dscnn": ({}, 5), "mobilenetv2": ({"width_mult": 0.5}, 3),
          "resnet18": ({}, 2)}


def batches(shape, n, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) for _ in range(n)]


def deploy(name, tmp_path, target="arm-int8", **kwargs):
    model, x = make(name, **kwargs)
    art = sdk.deploy(model, target=target, example_inputs=(x,), calibration=batches(x.shape, 8, 0),
                     output=tmp_path / f"{name}-{target}", progress=False)
    return model, x, art


# -- without the emulator ----------------------------------------------------------


def test_each_target_registers_its_own_runner():
    modules = {"arm-int8": "targets.arm_int8", "arm-fp32": "targets.arm_fp32",
               "binary-popcount": "targets.binary_popcount.qemu"}
    for target, module in modules.items():
        cls = plugins.get_runner("qemu-aarch64", target)
        assert issubclass(cls, QemuAarch64Runner) and cls.targets == (target,) and cls.__module__ == module
        assert cls.version == "1.0" and cls.exact
    assert "qemu-aarch64" not in plugins.runners_for("fp16-gpu")
    rows = [r for r in plugins.list_plugins() if r["name"] == "qemu-aarch64"]
    assert sorted((r["module"], tuple(r["targets"])) for r in rows) == sorted(
        (m, (t,)) for t, m in modules.items())


def test_config_is_validated_naming_the_field():
    assert ArmInt8QemuRunner().config == QemuAarch64Runner.Config()
    assert ArmInt8QemuRunner(cpu="cortex-a72").config.cpu == "cortex-a72"
    with pytest.raises(ConfigError, match="num_threads must be >= 1, got 0"):
        ArmInt8QemuRunner(num_threads=0)
    with pytest.raises(ConfigError, match="timeout_s must be > 0"):
        plugins.get_runner("qemu-aarch64", "binary-popcount")(timeout_s=0)
    assert QemuAarch64Runner.Config.type_tag == "runner.qemu-aarch64"


def test_without_the_emulator_the_message_says_how_to_install(tmp_path, monkeypatch):
    _, x, art = deploy("mlp", tmp_path)
    monkeypatch.setenv("EDGEPACK_CACHE", str(tmp_path / "empty-cache"))
    reason = ArmInt8QemuRunner().unavailable()
    assert "edgepack emulator install" in reason and "\n" not in reason
    with pytest.raises(ToolchainError) as info:
        art.run(x, runner="qemu-aarch64")
    msg = str(info.value)
    assert "`edgepack emulator install`" in msg and "\n" not in msg and "qemu-aarch64" in msg
    rep = art.verify(inputs=[x], runners=["host", "qemu-aarch64"])
    assert not rep.passed and "edgepack emulator install" in rep.runners["qemu-aarch64"].error
    assert rep.runners["host"].error is None
    # the CLI: status says "not installed" and exits 1
    r = subprocess.run([sys.executable, "-m", "sdk", "emulator", "status"], capture_output=True, text=True,
                       env={**os.environ, "EDGEPACK_CACHE": str(tmp_path / "empty-cache")})
    assert r.returncode == 1 and "not installed" in r.stdout and "edgepack emulator install" in r.stdout
    assert not (tmp_path / "empty-cache").exists(), "asking must not create anything"


def test_missing_qemu_is_a_toolchain_error_naming_the_package(tmp_path, monkeypatch):
    monkeypatch.setattr(emulator, "qemu_binary", lambda: None)
    with pytest.raises(ToolchainError, match=r"apt-get install qemu-user"):
        emulator.install(tmp_path / "cache", progress=False)
    assert "apt-get install qemu-user" in emulator.unavailable(tmp_path / "cache")


def test_stale_install_asks_for_an_update(tmp_path):
    root = emulator.cache_dir(tmp_path)
    root.mkdir(parents=True)
    (root / "stamp.json").write_text(json.dumps({"version": "0:old"}))
    assert "edgepack emulator install" in emulator.unavailable(tmp_path)
    assert emulator.status(tmp_path)["installed"] is False


# -- under emulation ---------------------------------------------------------------


@pytest.mark.emulation
def test_install_is_idempotent_and_reported(emu, capsys):
    t0 = time.perf_counter()
    again = emulator.install(progress=False)
    assert time.perf_counter() - t0 < 1.0 and again.root == emu.root
    st = emulator.status()
    assert st["installed"] and st["python"].startswith("3.11")
    assert st["packages"]["ai-edge-litert"] == emulator.LITERT_VERSION and "numpy" in st["packages"]
    assert st["debian_packages"]["libc6"].startswith("2.36")
    from sdk.cli import main

    assert main(["emulator", "status"]) == 0
    assert "installed:" in capsys.readouterr().out
    assert main(["emulator", "install", "--quiet"]) == 0
    assert "ready" in capsys.readouterr().out


@pytest.mark.emulation
def test_emulated_python_is_aarch64_and_isolated(emu):
    proc = emu.run_python("import sys, platform, numpy; from ai_edge_litert import interpreter; "
                          "print(platform.machine()); print(sys.path)")
    assert proc.returncode == 0, proc.stderr
    machine, path = proc.stdout.splitlines()[:2]
    assert machine == "aarch64"
    assert all(p.startswith(str(emu.root)) for p in eval(path)), path   # nothing of the host's Python


@pytest.mark.emulation
@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n == "resnet18" else n for n in MODELS])
def test_zoo_int8_is_bit_exact_under_emulation(emu, name, tmp_path, record_property):
    options, repeats = MODELS[name]
    model, x, art = deploy(name, tmp_path, **options)
    inputs = batches(x.shape, 3, seed=1)
    rep = art.verify(model, inputs=inputs, runners=["host", "qemu-aarch64", "reference"], repeats=repeats)
    assert rep.passed, str(rep)
    q = rep.runners["qemu-aarch64"]
    assert q.error is None and q.max_lsb <= 1 and q.bit_exact_ratio >= 0.99
    assert q.bit_exact_ratio == rep.bit_exact_ratio["host"] and q.sqnr_db == rep.sqnr_db["host"]
    session = art.session("qemu-aarch64")
    for s in inputs:   # the emulated ARM build of LiteRT gives the host's integers exactly
        np.testing.assert_array_equal(art.run(s, runner="qemu-aarch64")[0], art.run(s, runner="host")[0])
    assert session.info["machine"] == "aarch64" and session.info["runtime"].endswith(emulator.LITERT_VERSION)
    assert session.info["delegate_nodes"] == 1, "XNNPACK should take the whole int8 graph on ARM too"
    record_property("bit_exact_ratio", q.bit_exact_ratio)
    record_property("emulated_ms", session.latency_ms)
    print(f"\n{name}: qemu-aarch64 bit_exact_ratio={q.bit_exact_ratio:.4f} max_lsb={q.max_lsb:g} "
          f"(host {rep.bit_exact_ratio['host']:.4f}), emulated invoke {session.latency_ms:.2f} ms, "
          f"call {q.latency_ms:.2f} ms, host call {rep.latency_ms['host']:.3f} ms")


@pytest.mark.emulation
def test_verify_reports_host_and_emulation(emu, tmp_path):
    model, x, art = deploy("lenet", tmp_path)
    inputs = batches(x.shape, 2, seed=3)
    rep = art.verify(model, inputs, runners=["host", "qemu-aarch64"])
    assert rep.passed, str(rep)
    assert set(rep.runners) == {"host", "qemu-aarch64"}
    assert all(r.error is None and math.isfinite(r.latency_ms) for r in rep.runners.values())
    assert rep.sqnr_db["qemu-aarch64"] == rep.sqnr_db["host"] and rep.top1_agreement["qemu-aarch64"] == 1.0
    assert "qemu-aarch64" in str(rep)


@pytest.mark.emulation
def test_fp32_under_emulation(emu, tmp_path):
    model, x, art = deploy("dscnn", tmp_path, target="arm-fp32")
    inputs = batches(x.shape, 2, seed=4)
    rep = art.verify(model, inputs, runners=["host", "qemu-aarch64"])
    assert rep.passed, str(rep)
    for s in inputs:   # float kernels may sum in another order on ARM: equal to float rounding
        a, b = art.run(s, runner="qemu-aarch64")[0], art.run(s, runner="host")[0]
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * np.abs(b).max())


@pytest.mark.emulation
def test_other_cpu_models_agree(emu, tmp_path):
    """Cortex-A72 has no dot-product instructions: XNNPACK takes other int8 kernels, same integers."""
    _, x, art = deploy("dscnn", tmp_path)
    inputs = [s.numpy() for s in batches(x.shape, 2, seed=5)]
    host = [art.run(s, runner="host")[0] for s in inputs]
    with ArmInt8QemuRunner(cpu="cortex-a72").open(art) as session:
        for s, h in zip(inputs, host):
            np.testing.assert_array_equal(session([s])[0], h)
        assert session.command[session.command.index("-cpu") + 1] == "cortex-a72"


@pytest.mark.emulation
def test_one_process_serves_many_calls(emu, tmp_path):
    _, x, art = deploy("mlp", tmp_path)
    session = ArmInt8QemuRunner().open(art)
    workdir = session.workdir
    assert sorted(p.name for p in (workdir / "artifact").iterdir()) == sorted(
        [*art.manifest["files"], "manifest.json"])
    pid = session.pid
    t0 = time.perf_counter()
    for s in batches(x.shape, 20, seed=6):
        session([s.numpy()])
    per_call = (time.perf_counter() - t0) / 20
    assert session.pid == pid and per_call < 0.25, f"{per_call * 1e3:.1f} ms per call"
    assert len(session.latencies_ms) == 20 and session.latency_ms > 0
    stored = np.ascontiguousarray(x.numpy().transpose(0, 2, 3, 1))
    assert session.time([stored], runs=5) > 0
    # bad input: reported by the emulated runtime, and the session keeps working
    with pytest.raises(RunnerError, match="expected"):
        session.run_stored([np.zeros((1, 3, 3, 1), np.float32)])
    session([x.numpy()])
    session.close()
    assert not workdir.exists()
    with pytest.raises(RunnerError, match="closed"):
        session([x.numpy()])


@pytest.mark.emulation
def test_a_broken_model_is_refused_before_the_emulator(emu, tmp_path):
    from sdk.artifact import Artifact
    from sdk.errors import ArtifactError

    _, x, art = deploy("mlp", tmp_path)
    (art.path / "model.tflite").write_bytes(b"not a flatbuffer" * 8)
    broken = Artifact(art.path, art.manifest, art.profile)   # past load()'s hash check, on purpose
    with pytest.raises(ArtifactError):
        ArmInt8QemuRunner().open(broken)


@pytest.fixture
def binary_target():
    """The binary-popcount target and the xnor quantizer, registered for the test if the
    default plugins do not have them yet."""
    registered = []
    try:
        if "binary-popcount" not in plugins.names("target"):
            import targets.binary_popcount as bp
            registered.append(plugins.register_plugin(bp, "qemu-test-binary-popcount"))
        if "xnor" not in plugins.names("quantizer"):
            import plugins.quantize.xnor as xnor
            registered.append(plugins.register_plugin(xnor, "qemu-test-xnor"))
    except ImportError as exc:
        pytest.skip(f"binary-popcount target not available: {exc}")
    try:
        yield
    finally:
        for name in registered:
            plugins.unregister_plugin(name)


@pytest.mark.emulation
def test_binary_popcount_cross_compiled_neon(emu, binary_target, tmp_path):
    try:
        emulator.cross_compiler()
    except ToolchainError as exc:
        pytest.skip(str(exc))
    model, x = make("lenet", width=32)
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(16, 1, 8, 8, generator=g), torch.randint(0, 10, (16,), generator=g)) for _ in range(2)]
    art = sdk.deploy(model, "binary-popcount", (x,), data=data, output=tmp_path / "bin", progress=False,
                     recipe={"stages": [{"method": "xnor", "config": {"epochs": 1, "progress": False}}]})
    inputs = batches(x.shape, 3, seed=7)
    rep = art.verify(inputs=inputs, runners=["host", "qemu-aarch64", "reference"])
    assert rep.passed, str(rep)
    session = art.session("qemu-aarch64")
    assert session.info["machine"] == "aarch64" and session.info.get("isa") == "neon"
    for s in inputs:
        a, b = art.run(s, runner="qemu-aarch64")[0], art.run(s, runner="host")[0]
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * np.abs(b).max())
    print(f"\nbinary-popcount lenet: qemu-aarch64 equals the reference on {rep.bit_exact_ratio['qemu-aarch64']:.4f} "
          f"of the outputs (max abs diff {rep.max_lsb['qemu-aarch64']:.3g}), emulated {session.latency_ms:.3f} ms")


@pytest.mark.emulation
@pytest.mark.parametrize("recipe, target", [
    ({"stages": [{"method": "int4"}]}, "arm-int8"),                                   # INT4 FC, 4-bit conv codes
    ({"stages": [{"method": "dynamic"}]}, "arm-int8"),                                # dynamic range (qd8)
    ({"stages": [{"method": "magnitude", "config": {"sparsity": 0.9}}]}, "arm-fp32"),  # sparse behind DENSIFY
    ({"stages": [{"method": "magnitude", "config": {"sparsity": 0.9}}, {"method": "ptq"}]}, "arm-int8"),
])
def test_new_encodings_run_under_emulation(emu, recipe, target, tmp_path):
    """INT4, dynamic-range and sparse artifacts run in the aarch64 LiteRT (XNNPACK's NEON kernels): the
    integer ones give the host's integers exactly, the float ones agree within the float rule."""
    model, x = make("lenet")
    stages = recipe["stages"]
    if stages[0]["method"] == "magnitude":        # verify against the pruned model, not the original
        model, stages = sdk.compress(model, {"stages": stages[:1]}, progress=False), stages[1:]
    art = sdk.deploy(model, target=target, example_inputs=(x,), calibration=batches(x.shape, 4, 0),
                     recipe={"stages": stages} if stages else None, output=tmp_path / "a", progress=False)
    inputs = batches(x.shape, 2, seed=5)
    rep = art.verify(model, inputs=inputs, runners=["host", "qemu-aarch64", "reference"])
    assert rep.passed, str(rep)
    if target == "arm-int8" and recipe["stages"][-1]["method"] != "dynamic":
        for s in inputs:
            np.testing.assert_array_equal(art.run(s, runner="qemu-aarch64")[0], art.run(s, runner="host")[0])
    assert art.session("qemu-aarch64").info["delegate_nodes"] == 1


@pytest.mark.emulation
def test_sparse_float_graph_is_right_on_arm_where_xnnpack_switches_to_sparse_inference(emu, tmp_path):
    """On ARM (no AVX gate) XNNPACK runs a pruned float MobileNet-style graph in sparse NCHW inference; a
    compatible chain cut short by a SAME stride-2 depthwise gave outputs off by 3e-3 of their range there.
    edgepack writes strided padded convs of such graphs as PAD + VALID: the emulated ARM run matches."""
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.ReLU6(),
        nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.ReLU6(), nn.Conv2d(16, 64, 1), nn.ReLU6(),
        nn.Conv2d(64, 64, 3, stride=2, padding=1, groups=64), nn.ReLU6(), nn.Conv2d(64, 128, 1), nn.ReLU6(),
        nn.Conv2d(128, 128, 3, stride=2, padding=1, groups=128), nn.ReLU6(), nn.Conv2d(128, 128, 1), nn.ReLU6(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, 10))
    small = sdk.compress(model, {"stages": [{"method": "magnitude", "config": {"sparsity": 0.9}}]}, progress=False)
    x = torch.randn(1, 3, 20, 20)            # 20 -> 10 -> 5 -> 3: the last stride-2 depthwise pads an odd map
    art = sdk.deploy(small, "arm-fp32", (x,), output=tmp_path / "a", progress=False)
    assert sum(r["weight_storage"].endswith("sparse") for r in art.profile["layers"] if "weight_storage" in r) >= 4
    rep = art.verify(small, inputs=batches(x.shape, 2, seed=7), runners=["host", "qemu-aarch64"])
    assert rep.passed, str(rep)
    assert rep.runners["qemu-aarch64"].max_rel_err < 1e-5
