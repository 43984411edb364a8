import importlib.util
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE_PLUGIN = ROOT / "examples" / "plugin_example"


@pytest.fixture(scope="session")
def emu():
    """The installed aarch64 emulator (installs it on first use: downloads packages); skips the
    test when qemu-aarch64 is missing."""
    import time

    from sdk import emulator

    if emulator.qemu_binary() is None:
        pytest.skip("qemu-aarch64 is not installed: `apt-get install qemu-user` (make test does it as root)")
    t0 = time.perf_counter()
    installed = emulator.install(progress=False)
    print(f"\nemulator ready in {time.perf_counter() - t0:.1f} s: {installed.root}")
    return installed


@pytest.fixture(scope="session")
def digits():
    """scikit-learn's digits: (x_train, y_train, x_test, y_test) as float tensors in [0, 1], 1x8x8."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = (d.images / 16.0).astype(np.float32)[:, None]
    xtr, xte, ytr, yte = train_test_split(x, d.target, test_size=0.25, random_state=0, stratify=d.target)
    return torch.from_numpy(xtr), torch.from_numpy(ytr), torch.from_numpy(xte), torch.from_numpy(yte)


@pytest.fixture(scope="session")
def example_plugin_env(tmp_path_factory):
    """Environment variables for subprocesses that see examples/plugin_example installed through
    its entry point: pip-installed into a temporary directory on PYTHONPATH, never into the
    test venv (the in-process registry stays the built-ins')."""
    where = tmp_path_factory.mktemp("example-plugin")
    r = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                        "--target", str(where), str(EXAMPLE_PLUGIN)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(where), os.environ.get("PYTHONPATH")]))}


@pytest.fixture(scope="module")
def one_thread():
    """Torch on one thread for a module of tiny models: OpenMP hand-offs cost more than they save,
    badly so on a busy 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def example_plugin():
    """The example third-party plugin, registered for one test (llm's habit: unregister in finally)."""
    import sdk.plugins as p

    if "torch-ir" in p.names("target"):   # already installed through its entry point
        yield sys.modules.get("edgepack_example")
        return
    spec = importlib.util.spec_from_file_location("edgepack_example", EXAMPLE_PLUGIN / "edgepack_example.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["edgepack_example"] = mod
    spec.loader.exec_module(mod)
    name = p.register_plugin(mod, "edgepack-example-test")
    try:
        yield mod
    finally:
        p.unregister_plugin(name)
        sys.modules.pop("edgepack_example", None)


class SmallCNN(torch.nn.Module):
    """Conv-BN-ReLU x2 + linear: the shape of the models most tests need."""

    def __init__(self, classes=10):
        super().__init__()
        self.c1 = torch.nn.Conv2d(1, 8, 3, padding=1)
        self.b1 = torch.nn.BatchNorm2d(8)
        self.c2 = torch.nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.b2 = torch.nn.BatchNorm2d(16)
        self.fc = torch.nn.Linear(16 * 4 * 4, classes)

    def forward(self, x):
        x = torch.relu(self.b1(self.c1(x)))
        x = torch.relu(self.b2(self.c2(x)))
        return self.fc(x.flatten(1))


@pytest.fixture
def small_cnn():
    torch.manual_seed(0)
    m = SmallCNN()
    with torch.no_grad():   # non-trivial BN statistics so folding is exercised
        for bn in (m.b1, m.b2):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.2, 0.2)
    return m.eval()


def _in_threads(work, n: int = 4, timeout: float = 600) -> None:
    threads = [threading.Thread(target=work, args=(k,)) for k in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=timeout)
    assert not any(t.is_alive() for t in threads), "a thread hung"


@pytest.fixture
def in_threads():
    """``in_threads(work, n=4)``: run ``work(k)`` for k in 0..n-1 on n threads at once and wait;
    fails the test if one hangs."""
    return _in_threads
