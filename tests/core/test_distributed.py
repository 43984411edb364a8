"""Data-parallel training (sdk.distributed): 2 CPU processes under torchrun against 1 process.

The module is also the worker: ``torchrun --standalone --nproc_per_node=2 tests/test_distributed.py OUT``
runs the scenarios below on each rank and saves what each rank got to ``OUT/rank<r>.pt`` (the test
starts the two ranks itself, with torchrun's environment); the tests run the same scenarios in
this (single) process and compare.

Tolerance: 2 processes with the same global batch compute the same gradient as 1 process, but
summed in another order (each rank's half-batch mean, weighted and all-reduced, versus one mean
over the batch), so float32 weights differ by rounding only: max abs diff < 1e-5 after the
runs here (measured: 3e-8 to 5e-8).  The two ranks must hold bit-identical weights (they apply the
same reduced gradient to the same broadcast start).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from examples.models import MLP, LeNet  # noqa: E402
from sdk import distributed  # noqa: E402
from sdk.errors import EdgepackError, InputError  # noqa: E402
from sdk.trainer import TrainConfig, evaluate, fit, make_loader, training_extras  # noqa: E402

TOL = 1e-5


def _digits(n: int):
    """``n`` fixed synthetic 1x8x8 "digits": 10 Gaussian clusters (scikit-learn's import alone
    would take seconds in each process)."""
    gen = torch.Generator().manual_seed(0)
    centres = torch.rand(10, 1, 8, 8, generator=gen)
    y = torch.arange(n) % 10
    return (centres[y] + 0.3 * torch.randn(n, 1, 8, 8, generator=gen)).clamp(0, 1), y


def _ce(model, batch):
    return torch.nn.functional.cross_entropy(model(batch[0]), batch[1])


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# -- the scenarios: every rank (or the one process) runs each of them -----------------------------

def scenario_loader() -> dict:
    """An MLP with Adam on a shuffled make_loader (300 samples, batches of 64: the last has 44)."""
    x, y = _digits(300)
    torch.manual_seed(1)
    net = MLP(hidden=(32,))
    losses = fit(net, make_loader(x, y, batch_size=64, seed=3), _ce,
                 TrainConfig(epochs=2, lr=3e-3, seed=5, progress=False))
    return {"state": _state(net), "losses": losses}


def scenario_list() -> dict:
    """Dict batches of 7 (odd) and one of 1 (a rank gets only a padding sample), SGD with momentum,
    plus a recipe-style penalty (not a per-sample mean: must count once, not once per rank)."""
    x, y = _digits(71)
    sizes = [7] * 8 + [1, 7, 7]
    batches, at = [], 0
    for s in sizes:
        batches.append({"image": x[at:at + s], "label": y[at:at + s], "tag": "digits"})
        at += s
    torch.manual_seed(2)
    net = MLP(hidden=(16,))

    def step(model, batch):
        assert batch["tag"] == "digits"
        return torch.nn.functional.cross_entropy(model(batch["image"]), batch["label"])

    def l2(model):
        return 1e-3 * sum((p ** 2).sum() for p in model.parameters())

    with training_extras([l2], []):
        losses = fit(net, batches, step, TrainConfig(epochs=2, lr=0.05, optimizer="sgd", seed=0, progress=False,
                                                     optimizer_options={"momentum": 0.9}))
    acc = evaluate(net, [(b["image"], b["label"]) for b in batches])
    acc_loader = evaluate(net, make_loader(x, y, batch_size=9, shuffle=False))
    return {"state": _state(net), "losses": losses, "acc": acc, "acc_loader": acc_loader}


def scenario_batchnorm() -> dict:
    """LeNet (BatchNorm in training mode): the ranks stay identical, buffers included."""
    x, y = _digits(128)
    torch.manual_seed(3)
    net = LeNet(width=4)
    losses = fit(net, make_loader(x, y, batch_size=32, seed=0), _ce, TrainConfig(epochs=1, lr=3e-3,
                                                                                 progress=False))
    return {"state": _state(net), "losses": losses}


def scenario_recipe() -> dict:
    """Real plugin stages through sdk.compress: kd from a frozen teacher (called inside the
    step), fitnets (forward hooks on named modules, a params= subset, a ModuleList pair), dml
    (a cohort with the teacher's copy as peer, trained together in a ModuleList)."""
    import sdk

    x, y = _digits(192)
    torch.manual_seed(4)
    teacher = MLP(hidden=(48,))
    fit(teacher, make_loader(x, y, batch_size=64, seed=1), _ce, TrainConfig(epochs=1, lr=3e-3, progress=False))
    torch.manual_seed(5)
    student = MLP(hidden=(16,))
    recipe = {"stages": [
        {"method": "kd", "config": {"epochs": 1, "lr": 3e-3, "temperature": 2.0}},
        {"method": "fitnets", "config": {"hint_layer": "net.2", "guided_layer": "net.2", "hint_epochs": 1,
                                         "epochs": 1, "lr": 1e-3}},
        {"method": "dml", "config": {"epochs": 1, "lr": 1e-3}},
    ]}
    out = sdk.compress(student, recipe, data=make_loader(x, y, batch_size=48, seed=2), teacher=teacher,
                       progress=False)
    return {"state": _state(out), "teacher": _state(teacher)}


SCENARIOS = {"loader": scenario_loader, "list": scenario_list, "batchnorm": scenario_batchnorm,
             "recipe": scenario_recipe}


def _deploy(out: Path) -> dict:
    """sdk.deploy on every rank to one output: only rank 0 may create a staging directory."""
    import sdk
    from sdk import api

    made = []

    class Recording(api.Staging):
        def __init__(self, *args, **kwargs):
            made.append(distributed.rank())
            super().__init__(*args, **kwargs)

    api.Staging = Recording
    x, y = _digits(64)
    torch.manual_seed(6)
    net = MLP(hidden=(16,))
    art = sdk.deploy(net, "arm-fp32", (x[:1],), recipe={"stages": [{"method": "kd", "config": {"epochs": 1}}]},
                     data=[(x[i:i + 16], y[i:i + 16]) for i in range(0, 64, 16)], output=out / "artifact",
                     progress=False)
    return {"staged_on": made, "path": str(art.path), "files": art.manifest["files"]}


def _local(rank: int) -> dict:
    """Inside local_training each rank trains on its own data alone: no reduction."""
    x, y = _digits(40)
    torch.manual_seed(7)
    net = MLP(hidden=(8,))
    with distributed.local_training():
        losses = fit(net, [(x[20 * rank:20 * rank + 20], y[20 * rank:20 * rank + 20])], _ce,
                     TrainConfig(epochs=2, progress=False))
    return {"state": _state(net), "losses": losses}


def _refused(out: Path) -> dict:
    """An output rank 0 refuses: every rank raises at once instead of rank 1 training alone."""
    import sdk

    taken = out / "taken"
    if distributed.is_main():
        taken.write_text("not an artifact")
    x, y = _digits(32)
    try:
        sdk.deploy(MLP(hidden=(8,)), "arm-fp32", (x[:1],), data=[(x, y)], output=taken, progress=False,
                   recipe={"stages": [{"method": "kd", "config": {"epochs": 1}}]})
    except EdgepackError as exc:
        return {"error": type(exc).__name__, "message": str(exc)}
    return {"error": None}


def _worker(out: Path) -> None:
    rank = distributed.rank()
    results = {"rank": rank, "world": distributed.world_size(), "seconds": {}}
    for name, fn in {**SCENARIOS, "deploy": lambda: _deploy(out), "local": lambda: _local(rank),
                            "refused": lambda: _refused(out)}.items():
        t0 = time.perf_counter()
        results[name] = fn()
        results["seconds"][name] = round(time.perf_counter() - t0, 2)
    torch.save(results, out / f"rank{results['rank']}.pt")


# -- the tests ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[list[dict], dict]:
    """``(what each of 2 ranks got, the same scenarios in this one process)``; the reference
    runs while the ranks do (one launch for the module).

    The ranks are started as ``torchrun --standalone --nproc_per_node=2`` would start them —
    two processes with its environment (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``,
    ``MASTER_ADDR``, ``MASTER_PORT``), the process group left to the SDK (``env://``) — minus
    torchrun's supervising agent, whose own torch import costs seconds on 2 cores."""
    out = tmp_path_factory.mktemp("ddp")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    base = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "WORLD_SIZE": "2",
            "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    t0 = time.perf_counter()
    procs = [subprocess.Popen([sys.executable, str(Path(__file__).resolve()), str(out)], cwd=ROOT,
                              env={**base, "RANK": str(r), "LOCAL_RANK": str(r)}, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for r in range(2)]
    try:
        assert distributed.world_size() == 1
        single = {name: fn() for name, fn in SCENARIOS.items()}
        logs = [p.communicate(timeout=240)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for r, (p, log) in enumerate(zip(procs, logs)):
        assert p.returncode == 0, f"rank {r}:\n{log[-8000:]}"
    got = [torch.load(out / f"rank{i}.pt", weights_only=False) for i in range(2)]
    print(f"\n2 ranks: {time.perf_counter() - t0:.1f} s; rank 0 per scenario: {got[0]['seconds']}")
    return [{**g, "out": out} for g in got], single


@pytest.fixture(scope="module")
def ranks(runs) -> list[dict]:
    return runs[0]


@pytest.fixture(scope="module")
def single(runs) -> dict:
    return runs[1]


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def _identical(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_launch_saw_two_ranks(ranks):
    assert [r["rank"] for r in ranks] == [0, 1] and {r["world"] for r in ranks} == {2}


@pytest.mark.parametrize("name", ["loader", "list", "recipe"])
def test_two_processes_reach_the_one_process_weights(ranks, single, name):
    assert _identical(ranks[0][name]["state"], ranks[1][name]["state"])
    diff = _max_diff(ranks[0][name]["state"], single[name]["state"])
    print(f"{name}: max abs weight diff, 2 processes vs 1: {diff:.1e}")
    assert diff < TOL, f"{name}: max abs weight diff {diff:.2e} between 2 processes and 1"
    # and training moved the weights far beyond that tolerance (the comparison can fail)
    torch.manual_seed({"loader": 1, "list": 2, "recipe": 5}[name])
    start = _state(MLP(hidden={"loader": (32,), "list": (16,), "recipe": (16,)}[name]))
    assert _max_diff(start, single[name]["state"]) > 100 * TOL


def test_losses_are_the_whole_batches_and_agree(ranks, single):
    for name in ("loader", "list"):
        a, b, one = (np.array(r[name]["losses"]) for r in (ranks[0], ranks[1], single))
        assert np.array_equal(a, b)
        np.testing.assert_allclose(a, one, rtol=1e-5, atol=1e-6)


def test_evaluate_reduces_counts_across_ranks(ranks, single):
    for key in ("acc", "acc_loader"):
        assert ranks[0]["list"][key] == ranks[1]["list"][key] == single["list"][key]
    assert 0.2 < single["list"]["acc"] < 1.0


def test_batchnorm_ranks_stay_identical(ranks, single):
    a, b = ranks[0]["batchnorm"]["state"], ranks[1]["batchnorm"]["state"]
    assert _identical(a, b)          # weights and running statistics
    # per-rank BatchNorm statistics (half batches): close to one process, not equal
    diff = _max_diff(a, single["batchnorm"]["state"])
    print(f"batchnorm: max abs diff, 2 processes vs 1: {diff:.1e}")
    assert diff < 0.05


def test_only_rank_0_writes_the_artifact(ranks):
    d0, d1 = ranks[0]["deploy"], ranks[1]["deploy"]
    assert d0["staged_on"] == [0] and d1["staged_on"] == []
    assert d0["path"] == d1["path"] == str(ranks[0]["out"] / "artifact")
    assert d0["files"] == d1["files"]                # rank 1 opened rank 0's artifact
    leftovers = [p.name for p in ranks[0]["out"].iterdir() if p.name.startswith(".")]
    assert leftovers == []


def test_an_output_rank_0_refuses_fails_every_rank(ranks):
    r0, r1 = ranks[0]["refused"], ranks[1]["refused"]
    assert r0["error"] == r1["error"] == "ArtifactError"
    assert "not a directory" in r0["message"] and r1["message"].startswith("rank 0 failed (ArtifactError)")
    assert (ranks[0]["out"] / "taken").read_text() == "not an artifact"


def test_local_training_ignores_the_other_rank(ranks):
    a, b = ranks[0]["local"], ranks[1]["local"]
    assert a["losses"] != b["losses"] and not _identical(a["state"], b["state"])


# -- the pure parts --------------------------------------------------------------------------------

def test_shard_sizes_cover_the_batch():
    for n in range(0, 12):
        for world in range(1, 5):
            sizes = distributed.shard_sizes(n, world)
            assert sum(sizes) == n and max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)
    with pytest.raises(InputError):
        distributed.shard_sizes(3, 0)


def test_shard_batch_splits_nested_batches_and_reassembles():
    from collections import namedtuple

    Pair = namedtuple("Pair", "x y")
    batch = {"pair": Pair(torch.arange(14.0).reshape(7, 2), np.arange(7)), "scale": torch.tensor(2.0), "name": "a"}
    parts = [distributed.shard_batch(batch, r, 3) for r in range(3)]
    assert [len(p["pair"].x) for p in parts] == [3, 2, 2]
    assert torch.equal(torch.cat([p["pair"].x for p in parts]), batch["pair"].x)
    assert np.array_equal(np.concatenate([p["pair"].y for p in parts]), batch["pair"].y)
    assert all(isinstance(p["pair"], Pair) and p["scale"] is batch["scale"] and p["name"] == "a" for p in parts)


def test_shard_batch_refuses_what_it_cannot_split():
    with pytest.raises(InputError, match="rows"):
        distributed.shard_batch((torch.zeros(4, 2), torch.zeros(3)), 0, 2)
    with pytest.raises(InputError, match="no tensor"):
        distributed.shard_batch(("a", 1), 0, 2)
    with pytest.raises(InputError, match="outside"):
        distributed.shard_batch(torch.zeros(4), 2, 2)


def test_local_batch_pads_an_empty_slice_with_weight_zero():
    lb = [distributed.local_batch((torch.arange(2), torch.arange(2)), r, 3) for r in range(3)]
    assert [b.rows for b in lb] == [1, 1, 0]
    assert [int(b.batch[0]) for b in lb] == [0, 1, 1]       # the padding is the last (real) sample


def test_sharded_loader_splits_the_one_process_batches():
    """Each global batch of a shuffled loader is the union of the ranks' batches, in order."""
    x, y = torch.arange(23.0)[:, None], torch.arange(23)
    one = [b for b in make_loader(x, y, batch_size=5, seed=7)]
    shards = [list(distributed.shard(make_loader(x, y, batch_size=5, seed=7), r, 2)) for r in range(2)]
    assert len(shards[0]) == len(shards[1]) == len(one) == 5
    for k, whole in enumerate(one):
        a, b = shards[0][k], shards[1][k]
        assert a.rows + b.rows == len(whole[1])
        assert torch.equal(torch.cat([a.batch[1], b.batch[1]]), whole[1])


def test_sharded_sampler_agrees_across_ranks_without_a_generator():
    """A sampler without its own generator uses the shared per-epoch seed, not the rank's RNG."""
    from torch.utils.data import BatchSampler, RandomSampler

    def epochs(rank, rng_seed):
        torch.manual_seed(rng_seed)                           # each rank's own stream differs
        s = distributed.ShardedBatchSampler(BatchSampler(RandomSampler(range(10)), 4, False), rank, 2, seed=1)
        return [list(s), list(s)]

    r0, r1 = epochs(0, 100), epochs(1, 200)
    for e in range(2):
        merged = sorted(i for b0, b1 in zip(r0[e], r1[e]) for i in b0 + b1)
        assert merged == list(range(10))
    assert r0[0] != r0[1]                                     # a new order each epoch


def test_single_process_needs_no_process_group():
    assert distributed.init() is False and distributed.is_main() and distributed.on_main(lambda: 7) == 7


def test_wrong_environment_is_a_named_error(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(InputError, match="torchrun"):
        distributed.init()


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
