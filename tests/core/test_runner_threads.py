"""Every runner's session may be shared between threads: 4 threads x 100 calls on one
artifact give no error and exactly the single-threaded outputs.

LiteRT interpreters are not thread-safe (without the session lock, 4 threads x 250 calls
gave 750 RunnerErrors and one silently wrong output); the runners serialise each call.
"""

import threading

import numpy as np
import pytest
import torch

import sdk
from examples.models import make
from sdk import emulator

THREADS, CALLS, DISTINCT = 4, 100, 8

RUNNERS = {"arm-int8": ["host", "reference", "qemu-aarch64"],
           "arm-fp32": ["host", "reference", "qemu-aarch64"],
           "fp16-gpu": ["host", "reference", "fp16", "cuda"]}
CASES = [(t, r) for t, rs in RUNNERS.items() for r in rs]


def _batches(shape, n, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) for _ in range(n)]


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    root = tmp_path_factory.mktemp("threads")
    model, x = make("lenet")
    return {t: sdk.deploy(model, target=t, example_inputs=(x,), calibration=_batches(x.shape, 8, 0),
                          output=root / t, progress=False) for t in RUNNERS}


def _skip_unless_runnable(art, runner):
    if runner == "qemu-aarch64":
        if emulator.qemu_binary() is None:
            pytest.skip("qemu-aarch64 is not installed: `apt-get install qemu-user` (make test does it as root)")
        try:
            emulator.install(progress=False)
        except Exception as exc:  # noqa: BLE001 - no network, no sysroot: nothing to test here
            pytest.skip(f"the aarch64 sysroot could not be installed: {exc}")
    from sdk import plugins

    reason = plugins.get_runner(runner, art.target)().unavailable()
    if reason:
        pytest.skip(reason)


@pytest.mark.parametrize("target, runner", CASES, ids=[f"{t}-{r}" for t, r in CASES])
def test_four_threads_share_one_session(artifacts, target, runner, one_thread, in_threads):
    art = artifacts[target]
    _skip_unless_runnable(art, runner)
    fn = art.session(runner)
    xs = [[x.numpy()] for x in _batches((1, 1, 8, 8), DISTINCT, 1)]
    want = [fn(x) for x in xs]                           # single-threaded outputs
    assert len({w[0].tobytes() for w in want}) == DISTINCT, "inputs must give distinct outputs"
    errors, wrong, done = [], [], []
    start = threading.Barrier(THREADS)

    def work(k):
        start.wait()
        for i in range(CALLS):
            j = (k * 3 + i) % DISTINCT
            try:
                got = fn(xs[j])
            except Exception as exc:  # noqa: BLE001 - every failure counts
                errors.append(f"{type(exc).__name__}: {exc}")
                continue
            if len(got) != len(want[j]) or not all(np.array_equal(a, b) for a, b in zip(got, want[j])):
                wrong.append((k, i, j))
            done.append(1)

    in_threads(work, THREADS)
    assert not errors, f"{len(errors)} errors, first: {errors[0]}"
    assert not wrong, f"{len(wrong)} wrong outputs of {THREADS * CALLS}"
    assert len(done) == THREADS * CALLS


def _race(fn, xs, want, in_threads, calls=250):
    """4 threads calling ``fn``; returns (errors, wrong outputs)."""
    errors, wrong = [], []

    def work(k):
        for i in range(calls):
            j = (k * 3 + i) % DISTINCT
            try:
                got = fn(xs[j])
            except Exception as exc:  # noqa: BLE001
                errors.append(type(exc).__name__)
                continue
            if not np.array_equal(got[0], want[j][0]):
                wrong.append(j)

    in_threads(work, THREADS)
    return errors, wrong


def test_the_lock_is_what_makes_litert_safe(artifacts, one_thread, in_threads):
    """A bare LiteRT interpreter raced from 4 threads fails (when the scheduler interleaves
    them); the same interpreter behind the session's lock does not."""
    from sdk.litert import layout, runners, runtime

    art = artifacts["arm-int8"]
    interp = runtime.load_interpreter(runners.checked_model(art))
    sig_in, sig_out = art.manifest["inputs"][0], art.manifest["outputs"][0]

    def bare(x):
        return [layout.from_stored(sig_out, runtime.run(interp, [layout.to_stored(sig_in, x[0])])[0])]

    xs = [[x.numpy()] for x in _batches((1, 1, 8, 8), DISTINCT, 1)]
    want = [bare(x) for x in xs]
    errors, wrong = _race(runners.adapt(art, lambda s: runtime.run(interp, s)), xs, want, in_threads)
    assert not errors and not wrong, (errors[:5], wrong[:5])
    errors, wrong = _race(bare, xs, want, in_threads)
    if not errors and not wrong:
        pytest.skip("no race observed this time: the scheduler kept the bare calls apart")
