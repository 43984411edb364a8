"""fp16-gpu on the zoo: file size against arm-fp32, and the error of float16
storage and of float16 arithmetic against the float model.

    .venv/bin/python benchmarks/bench_fp16_gpu.py [--out benchmarks/results/fp16_gpu.json] [--inputs 16]

Size: both ``.tflite`` files are split into constant payload (buffer bytes) and
structure (everything else: tensor and operator tables, names, signature,
alignment).  ``ratio_if_no_extra_structure`` is the ratio the fp16 file would
have if its DEQUANTIZE pairs cost nothing: it bounds what any writer can reach.

Error, over ``--inputs`` standard-normal inputs, as ``verify`` measures it
(max |y − y_float| / max |y_float| per input; median and max over inputs):
``host`` is LiteRT (float16 weights, float32 arithmetic); ``fp16`` is the
float16-arithmetic runner with the GPU shader accumulation order
(sequential float16 FMAs); ``fp16_pairwise`` the same with tree sums, the best
case of float16 accumulation.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import sdk  # noqa: E402
from examples.models import ZOO, make  # noqa: E402
from sdk.litert.flatbuffer import op_name, read_model  # noqa: E402
from sdk.litert.runtime import load_interpreter  # noqa: E402
from targets.fp16_gpu.half import HalfInterpreter  # noqa: E402


def split_bytes(data: bytes) -> dict:
    m = read_model(data)
    payload = sum(len(b.data) for b in m.buffers if b.data is not None)
    ops = [op_name(m, op) for op in m.subgraphs[0].operators]
    return {"bytes": len(data), "payload": payload, "structure": len(data) - payload,
            "tensors": len(m.subgraphs[0].tensors), "ops": len(ops), "dequantize_ops": ops.count("DEQUANTIZE")}


def rel_err(y: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(y.astype(np.float64) - ref).max() / np.abs(ref).max())


def bench_model(name: str, n_inputs: int, tmp: Path) -> dict:
    model, x = make(name)
    g = torch.Generator().manual_seed(0)
    cal = [torch.randn(x.shape, generator=g) for _ in range(8)]
    half = sdk.deploy(model, "fp16-gpu", (x,), calibration=cal, output=tmp / f"{name}-fp16", progress=False)
    full = sdk.deploy(model, "arm-fp32", (x,), output=tmp / f"{name}-fp32", progress=False)
    h_bytes, f_bytes = half.file("model.tflite").read_bytes(), full.file("model.tflite").read_bytes()
    h, f = split_bytes(h_bytes), split_bytes(f_bytes)
    row: dict = {"model": name, "fp16": h, "fp32": f,
                 "size_fp16_over_fp32": round(h["bytes"] / f["bytes"], 4),
                 "ratio_if_no_extra_structure": round((h["payload"] + f["structure"]) / f["bytes"], 4)}

    host = load_interpreter(half.file("model.tflite"))
    runners = {"fp16": HalfInterpreter(h_bytes), "fp16_pairwise": HalfInterpreter(h_bytes, order="pairwise")}
    errs: dict[str, list[float]] = {"host": [], **{k: [] for k in runners}}
    top1: dict[str, int] = {k: 0 for k in errs}
    seconds = {k: 0.0 for k in runners}
    for _ in range(n_inputs):
        xt = torch.randn(x.shape, generator=g)
        with torch.no_grad():
            ref = model(xt).numpy().astype(np.float64)
        xs = np.ascontiguousarray(xt.numpy().transpose(0, 2, 3, 1)) if xt.ndim == 4 else xt.numpy()
        host.set_tensor(host.get_input_details()[0]["index"], xs)
        host.invoke()
        outs = {"host": host.get_tensor(host.get_output_details()[0]["index"])}
        for k, interp in runners.items():
            t0 = time.perf_counter()
            outs[k] = interp.run([xs])[0]
            seconds[k] += time.perf_counter() - t0
        for k, y in outs.items():
            errs[k].append(rel_err(y, ref))
            top1[k] += int(y.argmax() == ref.argmax())
    for k, v in errs.items():
        row[f"max_rel_err_{k}"] = {"median": float(f"{statistics.median(v):.3g}"), "max": float(f"{max(v):.3g}")}
        row[f"top1_agreement_{k}"] = top1[k] / n_inputs
    for k, s in seconds.items():
        row[f"seconds_per_call_{k}"] = round(s / n_inputs, 3)
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "fp16_gpu.json"))
    ap.add_argument("--inputs", type=int, default=16)
    ap.add_argument("--models", nargs="*", default=list(ZOO))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rows = [bench_model(m, args.inputs, Path(tmp)) for m in args.models]
    result = {"benchmark": "fp16-gpu vs arm-fp32 (size) and vs the float model (error)",
              "machine": platform.machine(), "inputs": args.inputs, "models": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
