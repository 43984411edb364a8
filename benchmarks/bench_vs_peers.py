"""edgepack ``arm-int8`` side by side with two peers: litert-torch and ExecuTorch (XNNPACK).

    .venv/bin/python benchmarks/bench_vs_peers.py \\
        --litert-torch-python ~/.cache/edgepack-peer/bin/python \\
        --executorch-python ~/.cache/edgepack-executorch/bin/python \\
        [--models resnet18 dscnn ...] [--runs 50] [--rounds 5] [--out benchmarks/results/vs_peers.json]

This script installs nothing.  Each peer lives in its own venv, built by
``../shared/tools/peer-venv`` (litert-torch 0.10, torch 2.13.0, ai-edge-litert)
and ``../shared/tools/executorch-venv`` (ExecuTorch 1.5.1, torch 2.13.0,
ai-edge-litert 2.3.0), and is driven through a worker script in
``benchmarks/peers/`` run by that venv's python; a peer whose python is not
given is left out (edgepack's own numbers are still measured).

Models (random init, fixed seed, eval mode):

=====================  ==============  ===============================================
``resnet18``           1×3×32×32       examples/models.py ResNet-18, CIFAR-style stem
``mobilenetv2``        1×3×64×64       torchvision ``mobilenet_v2`` (tests/helpers/gallery.py)
``mobilenetv3_small``  1×3×64×64       torchvision ``mobilenet_v3_small``: SE + hardswish
``dscnn``              1×1×49×10       examples/models.py DS-CNN (keyword spotting)
``mlp_softmax``        1×1×8×8         examples/models.py MLP followed by a softmax
=====================  ==============  ===============================================

The torchvision models come from ``tests/helpers/gallery.py`` (its ``import_torchvision``
shim lets the CUDA-built PyPI torchvision load with the CPU torch; its ``build``
estimates batch-norm statistics on random inputs).

How models travel to the workers: the main process exports each model once
with ``torch.export.export(model, (x,))`` and writes it with
``torch.export.save`` (``<model>.pt2``).  All three venvs run torch 2.13.0, so
each worker reads it back with ``torch.export.load(...).module()``, a module
with the same graph and weights, and needs neither edgepack, nor
examples/models.py, nor torchvision (the ExecuTorch venv has none).  The test
inputs, the calibration batches and the float outputs travel as one ``.npz``
(PyTorch layout); the worker returns its result as JSON and its outputs as a
``.npz`` (see ``benchmarks/peers/_common.py`` for the protocol).

Per model and side:

* ``deploy_s``: edgepack: ``sdk.deploy(model, "arm-int8", (x,), calibration=32
  batches, output=...)``; peers: export + ``prepare_pt2e`` (per-channel symmetric
  int8 weights, int8 activations) + the same 32 calibration batches + convert +
  lowering and serialising, timed inside the worker.  Every process first
  converts a tiny Linear model untimed, so one-time costs (first export,
  converter set-up) are not charged to a model.  One measurement per side.
* ``latency_ms``: 1 thread, the median over rounds of the median of ``--runs``
  calls after ``--warmup`` calls.  Each ratio is measured side by side in ONE
  process, the sides interleaved round by round: edgepack's and litert-torch's
  ``.tflite`` both run on ``ai_edge_litert`` in the litert-torch worker;
  ExecuTorch's ``.pte`` and edgepack's ``.tflite`` both run in the ExecuTorch
  worker (that venv has ai-edge-litert too).  ``x_edgepack`` (peer ÷ edgepack,
  above 1 means edgepack is faster) is the median over rounds of the per-round
  ratio.  edgepack's ``latency_ms`` is the median over all its rounds in both
  workers (per process in ``latency_ms_by_process``); with no peer it is timed
  in this process.
* ``sqnr_db``: against the float model on 8 fixed random inputs, the mean of the
  per-input SQNR in dB.
* ``bytes``: the ``.tflite`` / ``.pte`` file.
* ``xnnpack_partitions`` and ``ops_outside_xnnpack``: for LiteRT files, the
  XNNPACK delegate's partitions and the ops left in builtin kernels; for
  ExecuTorch, the delegated subgraphs and non-delegated nodes of the lowered
  graph before ``to_executorch`` (``get_delegation_info``, less the ``getitem``
  nodes that unpack a delegate's outputs; these count edge-dialect nodes, so
  they are not the same unit as LiteRT's ops).
* ``io``: the dtypes at the model's boundary.  litert-torch's PT2E files take
  and return int8 (the worker quantizes the float inputs and dequantizes the
  outputs with the file's own parameters, outside the timed ``invoke()``);
  edgepack's default ``io="float"`` and ExecuTorch keep float I/O and do that
  conversion inside the timed call.

The machine is shared: numbers taken while other jobs run are noisy; the
interleaving keeps each ratio fairer than the absolute latencies.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

import numpy as np
import torch
from torch import nn

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "helpers"))
import sdk  # noqa: E402
from examples.models import make  # noqa: E402
from hostinfo import machine  # noqa: E402  (benchmarks/, on sys.path as this script's folder)
from peers import _common  # noqa: E402  (benchmarks/peers, on sys.path as this script's folder)
from sdk.litert import runtime  # noqa: E402
from sdk.litert.layout import from_stored, to_stored  # noqa: E402

N_CALIBRATION = 32
N_INPUTS = 8
SEED = 0
WORKERS = {"litert-torch": HERE / "peers" / "litert_torch_worker.py",
           "executorch": HERE / "peers" / "executorch_worker.py"}
VENV_TOOLS = {"litert-torch": "../shared/tools/peer-venv", "executorch": "../shared/tools/executorch-venv"}


# --------------------------------------------------------------------------------------- models


def _gallery(name: str):
    import gallery  # tests/helpers/gallery.py: torchvision import shim + batch-norm statistics

    return gallery.build(name, seed=SEED)


def _mlp_softmax():
    model, x = make("mlp", seed=SEED)
    return nn.Sequential(model, nn.Softmax(dim=-1)).eval(), x


MODELS = {
    "resnet18": lambda: make("resnet18", seed=SEED),
    "mobilenetv2": lambda: _gallery("mobilenet_v2"),
    "mobilenetv3_small": lambda: _gallery("mobilenet_v3_small"),
    "dscnn": lambda: make("dscnn", seed=SEED),
    "mlp_softmax": _mlp_softmax,
    "lenet": lambda: make("lenet", seed=SEED),
}


# --------------------------------------------------------------------------------------- metrics


def sqnr_db(ref: np.ndarray, out: np.ndarray) -> float:
    ref, out = np.asarray(ref, np.float64), np.asarray(out, np.float64)
    noise = float(np.sum((out - ref) ** 2))
    return 10.0 * np.log10(float(np.sum(ref ** 2)) / max(noise, 1e-30))


def mean_sqnr(floats: list[list[np.ndarray]], outs: list[list[np.ndarray]]) -> float:
    """Mean over inputs of the SQNR (dB) of all outputs of that input together."""
    per_input = [sqnr_db(np.concatenate([r.ravel() for r in rs]), np.concatenate([o.ravel() for o in os_]))
                 for rs, os_ in zip(floats, outs)]
    return round(float(np.mean(per_input)), 2)


def load_outputs(path: str, n_inputs: int) -> list[list[np.ndarray]]:
    with np.load(path) as z:
        outs: list[list[np.ndarray]] = [[] for _ in range(n_inputs)]
        for key in sorted(z.files, key=lambda k: tuple(int(p) for p in k.split("_")[1:])):
            i, _ = (int(p) for p in key.split("_")[1:])
            outs[i].append(z[key])
    return outs


# --------------------------------------------------------------------------------------- sides


def warm_up_edgepack(work: Path) -> None:
    """One untimed deploy of a tiny model, as each worker does for its peer."""
    tiny = nn.Sequential(nn.Linear(8, 4), nn.ReLU()).eval()
    tx = torch.randn(1, 8)
    sdk.deploy(tiny, "arm-int8", (tx,), calibration=[tx], output=work / "warmup-edgepack", progress=False,
               overwrite=True)


def edgepack_side(name: str, model, x, cal, inputs, work: Path) -> tuple[dict, dict]:
    """Deploy with edgepack; returns (metrics, the job's ``edgepack`` entry for the workers)."""
    t0 = time.perf_counter()
    art = sdk.deploy(model, "arm-int8", (x,), calibration=cal, output=work / f"{name}-edgepack", progress=False,
                     overwrite=True)
    deploy_s = time.perf_counter() - t0
    path = art.file("model.tflite")
    ins, outs = art.manifest["inputs"], art.manifest["outputs"]
    interp = runtime.load_interpreter(path, num_threads=1)
    outputs = [[from_stored(s, y) for s, y in zip(outs, runtime.run(interp, [to_stored(ins[0], xi.numpy())]))]
               for xi in inputs]
    summary = runtime.op_summary(interp)
    metrics = {"deploy_s": round(deploy_s, 3), "bytes": os.path.getsize(path), "artifact": str(path),
               "io": sorted({s.get("stored_dtype") or s["dtype"] for s in ins + outs}),
               "xnnpack_partitions": summary["delegate_nodes"],
               "ops_outside_xnnpack": sum(summary["builtin"].values()),
               "ops_outside_names": sorted(summary["builtin"]),
               "outputs": outputs}
    entry = {"tflite": str(path), "input_layouts": [s.get("layout") for s in ins],
             "output_layouts": [s.get("layout") for s in outs]}
    return metrics, entry


def run_worker(side: str, python: str, job: dict, work: Path, timeout: float) -> dict:
    """Run one peer worker; its result, or ``{"error": ...}`` with the log's tail."""
    if not Path(python).exists():
        return {"error": f"{python} not found; build the venv with {VENV_TOOLS[side]}"}
    job_path, result_path, log_path = (work / f"job-{side}.json", work / f"result-{side}.json",
                                       work / f"log-{side}.txt")
    job_path.write_text(json.dumps(job, indent=2))
    result_path.unlink(missing_ok=True)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    t0 = time.perf_counter()
    try:
        with open(log_path, "w") as log:
            proc = subprocess.run([python, str(WORKERS[side]), "--job", str(job_path), "--result", str(result_path)],
                                  stdout=log, stderr=subprocess.STDOUT, env=env, timeout=timeout, cwd=work)
        rc = proc.returncode
    except subprocess.TimeoutExpired:
        rc = "timeout"
    wall = round(time.perf_counter() - t0, 1)
    result = json.loads(result_path.read_text()) if result_path.exists() else {}
    if rc != 0 or "error" in result:
        tail = log_path.read_text(errors="replace").strip().splitlines()[-15:]
        return {"error": result.get("error") or f"worker exited with {rc}", "log_tail": tail, "worker_wall_s": wall}
    result["worker_wall_s"] = wall
    return result


def bench_model(name: str, args, pythons: dict[str, str], work: Path) -> dict:
    work = work / name
    work.mkdir(parents=True, exist_ok=True)
    model, x = MODELS[name]()
    g = torch.Generator().manual_seed(SEED + 1)
    cal = [torch.randn(x.shape, generator=g) for _ in range(N_CALIBRATION)]
    inputs = [torch.randn(x.shape, generator=g) for _ in range(N_INPUTS)]
    with torch.no_grad():
        floats = [[y.numpy() for y in _as_tuple(model(xi))] for xi in inputs]
    program = work / f"{name}.pt2"
    torch.export.save(torch.export.export(model, (x,)), str(program))
    data = work / "data.npz"
    np.savez(data, **{f"input_{i}": t.numpy() for i, t in enumerate(inputs)},
             **{f"calib_{i}": t.numpy() for i, t in enumerate(cal)})

    row: dict = {"model": name, "input_shape": list(x.shape), "sides": {}, "x_edgepack": {}}
    print(f"== {name} {tuple(x.shape)}", flush=True)
    try:
        ours, entry = edgepack_side(name, model, x, cal, inputs, work)
    except Exception as exc:  # recorded; the peers need edgepack's file to time against, so they are skipped
        row["sides"]["edgepack"] = {"error": f"{type(exc).__name__}: {exc}"}
        return row
    ours["sqnr_db"] = mean_sqnr(floats, ours.pop("outputs"))
    row["sides"]["edgepack"] = ours

    job = {"model": name, "program": str(program), "data": str(data), "workdir": str(work), "runs": args.runs,
           "rounds": args.rounds, "warmup": args.warmup, "threads": 1, "edgepack": entry}
    ours_rounds: dict[str, list[float]] = {}
    for side, python in pythons.items():
        print(f"   {side} ...", flush=True)
        res = run_worker(side, python, job, work, args.worker_timeout)
        if "error" in res:
            row["sides"][side] = res
            print(f"   {side} failed: {res['error']}", flush=True)
            continue
        rounds = res.pop("latency_rounds_ms")
        ours_rounds[side] = rounds["edgepack"]
        res["sqnr_db"] = mean_sqnr(floats, load_outputs(res.pop("outputs_npz"), N_INPUTS))
        res["latency_ms"] = round(statistics.median(rounds[side]), 5)
        res["latency_rounds_ms"] = [round(t, 5) for t in rounds[side]]
        row["sides"][side] = res
        row["x_edgepack"][side] = {
            "latency": round(statistics.median(p / e for p, e in zip(rounds[side], rounds["edgepack"])), 3),
            "edgepack_latency_ms_same_process": round(statistics.median(rounds["edgepack"]), 5),
            "bytes": round(res["bytes"] / ours["bytes"], 3),
            "deploy_s": round(res["deploy_s"] / ours["deploy_s"], 3),
        }
    if not ours_rounds:     # no peer ran: time edgepack alone, here
        m = _common.LiteRTModel(entry["tflite"], 1, entry["input_layouts"], entry["output_layouts"])
        m.set_inputs([inputs[0].numpy()])
        ours_rounds["bench_vs_peers"] = _common.time_interleaved({"edgepack": m.invoke}, args.runs, args.rounds,
                                                                 args.warmup)["edgepack"]
    ours["latency_ms"] = round(statistics.median([t for r in ours_rounds.values() for t in r]), 5)
    ours["latency_ms_by_process"] = {p: round(statistics.median(r), 5) for p, r in ours_rounds.items()}
    row["edgepack_int8_over_fp32"] = int8_over_fp32(name, model, x, inputs[0], entry, work, args)
    return row


def int8_over_fp32(name: str, model, x, sample, entry: dict, work: Path, args) -> dict:
    """edgepack's int8 file against its own arm-fp32 file, interleaved in this process: what int8
    buys on this machine (nothing without int8 dot-product instructions)."""
    fp32 = sdk.deploy(model, "arm-fp32", (x,), output=work / f"{name}-edgepack-fp32", progress=False, overwrite=True)
    sigs = fp32.manifest
    sides = {"int8": _common.LiteRTModel(entry["tflite"], 1, entry["input_layouts"], entry["output_layouts"]),
             "fp32": _common.LiteRTModel(str(fp32.file("model.tflite")), 1, [s.get("layout") for s in sigs["inputs"]],
                                         [s.get("layout") for s in sigs["outputs"]])}
    for m in sides.values():
        m.set_inputs([sample.numpy()])
    rounds = _common.time_interleaved({k: m.invoke for k, m in sides.items()}, args.runs, args.rounds, args.warmup)
    return {"int8_ms": round(statistics.median(rounds["int8"]), 5), "fp32_ms": round(statistics.median(rounds["fp32"]), 5),
            "ratio": round(statistics.median(a / b for a, b in zip(rounds["int8"], rounds["fp32"])), 3)}


def _as_tuple(y):
    return tuple(y) if isinstance(y, (tuple, list)) else (y,)


# --------------------------------------------------------------------------------------- report


def markdown(rows: list[dict]) -> str:
    """One line per model and side; ``× edgepack`` is peer ÷ edgepack (above 1: edgepack is faster / smaller)."""
    cols = ["model", "side", "latency µs, 1 thread", "× edgepack", "SQNR dB", "size KB", "× edgepack", "deploy s",
            "I/O", "XNNPACK partitions", "ops outside"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in rows:
        for side, s in row["sides"].items():
            if "error" in s:
                cells = [row["model"], side, f"failed: {s['error'][:100]}"] + [""] * (len(cols) - 3)
            else:
                x = row["x_edgepack"].get(side, {"latency": 1, "bytes": 1} if side == "edgepack" else {})
                lat = f"{s['latency_ms'] * 1e3:.1f}"
                if "edgepack_latency_ms_same_process" in x:
                    lat += f" (edgepack there: {x['edgepack_latency_ms_same_process'] * 1e3:.1f})"
                cells = [row["model"], side, lat, x.get("latency", "—"), f"{s['sqnr_db']:.1f}",
                         f"{s['bytes'] / 1024:.0f}", x.get("bytes", "—"), f"{s['deploy_s']:.2f}", "/".join(s["io"]),
                         s["xnnpack_partitions"], s["ops_outside_xnnpack"]]
            lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--runs", type=int, default=50, help="timed calls per side per round")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds per model")
    ap.add_argument("--warmup", type=int, default=10, help="untimed calls per side before the rounds")
    ap.add_argument("--out", default=str(HERE / "results" / "vs_peers.json"))
    ap.add_argument("--litert-torch-python", help="python of the litert-torch venv (../shared/tools/peer-venv)")
    ap.add_argument("--executorch-python", help="python of the ExecuTorch venv (../shared/tools/executorch-venv)")
    ap.add_argument("--workdir", help="keep the models, artifacts and worker logs here (default: a temp dir)")
    ap.add_argument("--worker-timeout", type=float, default=1800, help="seconds per worker run")
    args = ap.parse_args()
    pythons = {side: p for side, p in (("litert-torch", args.litert_torch_python),
                                       ("executorch", args.executorch_python)) if p}

    info = {"benchmark": "edgepack arm-int8 vs litert-torch and ExecuTorch (XNNPACK), int8, 1 thread",
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            **machine(), "runs": args.runs, "rounds": args.rounds, "warmup": args.warmup,
            "calibration_batches": N_CALIBRATION, "sqnr_inputs": N_INPUTS,
            "versions": {"edgepack": _version("edgepack"), "torch": torch.__version__,
                         "ai-edge-litert": _version("ai-edge-litert")},
            "peer_pythons": pythons}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.workdir or tmp).absolute()
        work.mkdir(parents=True, exist_ok=True)
        warm_up_edgepack(work)
        rows = [bench_model(name, args, pythons, work) for name in args.models]
    for row in rows:
        for side, s in row["sides"].items():
            if side != "edgepack" and "versions" in s:
                info["versions"][side] = s.pop("versions")
            if not args.workdir:
                s.pop("artifact", None)       # it was in the temporary directory
    info["loadavg_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    result = {**info, "models": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(markdown(rows))
    print(f"\nwritten: {args.out}")


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


if __name__ == "__main__":
    main()
