"""Helpers shared by the peer workers (``litert_torch_worker.py``, ``executorch_worker.py``).

The workers run in the peers' own venvs, which do not have edgepack's
dependencies, so this module needs only the standard library, numpy and,
imported lazily, ``ai_edge_litert`` (the LiteRT parts) and torch (the job's
tensors and the warm-up conversion; every peer venv has torch).  It mirrors the few
pieces of ``sdk/litert/runtime.py`` the benchmark needs: load an
interpreter with 1 thread, run it, count its XNNPACK partitions, and a timing
loop that interleaves several sides in rounds.

Protocol with ``benchmarks/bench_vs_peers.py`` (the main process):

* the main process writes a job JSON (see :func:`read_job`) and calls
  ``<peer python> <worker>.py --job job.json --result result.json``;
* the worker writes ``result.json`` (timings, sizes, partition counts,
  versions) and the peer's outputs on the 8 test inputs to the ``.npz`` named
  by ``result["outputs_npz"]``; everything else it prints is only logged.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
import traceback
from importlib import metadata
from pathlib import Path
from typing import Callable

import numpy as np


def parse_args(description: str) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--job", required=True, help="job JSON written by bench_vs_peers.py")
    ap.add_argument("--result", required=True, help="where to write the result JSON")
    return ap.parse_args()


def read_job(path: str) -> dict:
    """The job: ``{"model", "program" (.pt2), "data" (.npz), "workdir", "runs", "rounds",
    "warmup", "threads", "edgepack": {"tflite", "input_layouts", "output_layouts"}}``."""
    return json.loads(Path(path).read_text())


def load_data(path: str) -> dict[str, list[np.ndarray]]:
    """``{"inputs": [...], "calibration": [...]}`` from the main process's ``.npz``
    (arrays ``input_<i>`` and ``calib_<i>``, PyTorch layout, float32)."""
    with np.load(path) as z:
        def series(prefix):
            return [z[f"{prefix}_{i}"] for i in range(sum(k.startswith(prefix + "_") for k in z.files))]
        return {"inputs": series("input"), "calibration": series("calib")}


def job_tensors(job: dict) -> tuple[Path, dict[str, list[np.ndarray]], tuple, list[tuple]]:
    """The job's work dir, its arrays (:func:`load_data`), the example input and the calibration
    batches as torch tensors."""
    import torch

    data = load_data(job["data"])
    return (Path(job["workdir"]), data, (torch.from_numpy(data["inputs"][0]),),
            [(torch.from_numpy(c),) for c in data["calibration"]])


def warm_up(convert: Callable, out: Path) -> None:
    """One untimed ``convert(module, example, calibration, out)`` of a tiny Linear model, so that
    one-time costs (first export, converter set-up) are not charged to the benchmarked model."""
    import torch

    tiny = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.ReLU()).eval()
    tx = torch.randn(1, 8)
    convert(tiny, (tx,), [(tx,)], out)


def run_worker(main: Callable[[dict], dict], description: str) -> None:
    """Parse the arguments, run ``main(job)`` and write its result (or the traceback)."""
    args = parse_args(description)
    try:
        result = main(read_job(args.job))
    except Exception as exc:  # reported to the main process, which records it per side
        result = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
    Path(args.result).write_text(json.dumps(result, indent=2) + "\n")
    if "error" in result:
        print(result["traceback"], flush=True)
        raise SystemExit(1)


def versions(*dists: str) -> dict[str, str | None]:
    out = {}
    for d in dists:
        try:
            out[d] = metadata.version(d)
        except metadata.PackageNotFoundError:
            out[d] = None
    return out


# --------------------------------------------------------------------------------------- LiteRT


class LiteRTModel:
    """A ``.tflite`` file on LiteRT (default XNNPACK delegate) with the I/O layout conversions.

    ``input_layouts[i]`` (from an edgepack manifest; ``None`` = PyTorch's own) says
    which PyTorch dim each stored dim holds, e.g. NHWC = ``(0, 2, 3, 1)``.
    """

    def __init__(self, path: str, threads: int = 1, input_layouts=None, output_layouts=None):
        from ai_edge_litert import interpreter as litert

        self.path = path
        self.interp = litert.Interpreter(model_path=str(path), num_threads=int(threads))
        self.interp.allocate_tensors()
        self.inputs = self.interp.get_input_details()
        self.outputs = self.interp.get_output_details()
        self.input_layouts = list(input_layouts or [None] * len(self.inputs))
        self.io_dtypes = [np.dtype(d["dtype"]).name for d in self.inputs + self.outputs]
        self.output_layouts = list(output_layouts or [None] * len(self.outputs))

    def set_inputs(self, xs: list[np.ndarray]) -> None:
        """Load PyTorch-layout float arrays into the input tensors, quantized with the
        tensor's own parameters where the model takes integers (litert-torch's PT2E
        files have int8 inputs and outputs; edgepack's default is float I/O)."""
        for d, lay, x in zip(self.inputs, self.input_layouts, xs):
            x = np.asarray(x, dtype=np.float32)
            if lay is not None:
                x = np.transpose(x, lay)
            dtype = np.dtype(d["dtype"])
            if dtype.kind in "iu":
                scale, zero = d["quantization"]
                info = np.iinfo(dtype)
                x = np.clip(np.round(x / scale) + zero, info.min, info.max)
            self.interp.set_tensor(d["index"], np.ascontiguousarray(x.astype(dtype)))

    def invoke(self) -> None:
        self.interp.invoke()

    def run(self, xs: list[np.ndarray]) -> list[np.ndarray]:
        """Outputs for PyTorch-layout inputs, back in PyTorch layout, float32."""
        self.set_inputs(xs)
        self.invoke()
        outs = []
        for d, lay in zip(self.outputs, self.output_layouts):
            y = self.interp.get_tensor(d["index"])
            if y.dtype.kind in "iu":
                scale, zero = d["quantization"]
                y = (y.astype(np.float32) - zero) * scale
            y = y.astype(np.float32)
            outs.append(np.ascontiguousarray(np.transpose(y, np.argsort(lay))) if lay is not None else y)
        return outs

    def partitions(self) -> dict[str, int]:
        """XNNPACK partitions (DELEGATE nodes) and the model ops left outside them.

        LiteRT lists every original node and, after them, the DELEGATE nodes that
        replaced some; a DELEGATE node shows only its partition's boundary tensors,
        so the replaced nodes are found by walking back from its outputs to its
        inputs (as ``sdk.litert.runtime.op_summary`` does).
        """
        ops = self.interp._get_ops_details()  # the only API that exposes delegation
        original = [o for o in ops if o["op_name"] != "DELEGATE"]
        producer = {int(t): i for i, o in enumerate(original) for t in o["outputs"]}
        delegates = [o for o in ops if o["op_name"] == "DELEGATE"]
        taken: set[int] = set()
        for d in delegates:
            boundary = {int(t) for t in d["inputs"]}
            stack = [producer[int(t)] for t in d["outputs"] if int(t) in producer]
            while stack:
                i = stack.pop()
                if i in taken:
                    continue
                taken.add(i)
                stack.extend(producer[int(t)] for t in original[i]["inputs"]
                             if int(t) in producer and int(t) not in boundary)
        outside = sorted(o["op_name"] for i, o in enumerate(original) if i not in taken)
        return {"xnnpack_partitions": len(delegates), "ops_total": len(original),
                "ops_outside_xnnpack": len(outside), "ops_outside_names": sorted(set(outside))}


def edgepack_model(job: dict) -> LiteRTModel:
    e = job["edgepack"]
    return LiteRTModel(e["tflite"], job.get("threads", 1), e.get("input_layouts"), e.get("output_layouts"))


# --------------------------------------------------------------------------------------- timing


def time_interleaved(sides: dict[str, Callable[[], object]], runs: int, rounds: int,
                     warmup: int) -> dict[str, list[float]]:
    """Median wall time (ms) of one call of each side, per round.

    Every side is warmed up first; then each round times ``runs`` calls of each
    side in turn (the order reversed every other round, so that no side always
    follows the same neighbour), so all sides share the machine's load of that
    moment.  Returns ``{side: [median of round r for r in rounds]}``.
    """
    for fn in sides.values():
        for _ in range(max(warmup, 1)):
            fn()
    names = list(sides)
    out: dict[str, list[float]] = {n: [] for n in names}
    for r in range(max(rounds, 1)):
        for n in (names if r % 2 == 0 else names[::-1]):
            fn = sides[n]
            times = []
            for _ in range(max(runs, 1)):
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
            out[n].append(statistics.median(times))
    return out


def timed(fn: Callable[[], object]) -> tuple[object, float]:
    t0 = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - t0


def save_outputs(path: str, outputs: list[list[np.ndarray]]) -> str:
    """``outputs[i][j]``: output j on test input i, saved as ``out_<i>_<j>``."""
    np.savez(path, **{f"out_{i}_{j}": np.asarray(y, dtype=np.float32)
                      for i, ys in enumerate(outputs) for j, y in enumerate(ys)})
    return str(path)


def file_bytes(path: str) -> int:
    return os.path.getsize(path)
