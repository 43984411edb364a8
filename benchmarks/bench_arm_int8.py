"""arm-int8 vs arm-fp32 on this machine: LiteRT latency, size, accuracy, deploy time.

    .venv/bin/python benchmarks/bench_arm_int8.py [--out benchmarks/results/arm_int8.json] [--runs 50]

For ResNet-18 and MobileNetV2 (CIFAR-style, 32×32): both artifacts are timed in
the same process, interleaved, 1 thread then 2 threads, median of ``--runs``
calls after warm-up.  ``deploy()`` wall time is for ResNet-18 with 32
calibration batches (imports excluded, measured separately).
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

t_import = time.perf_counter()
import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import sdk  # noqa: E402
from examples.models import make  # noqa: E402
from sdk.litert import runtime  # noqa: E402

IMPORT_S = time.perf_counter() - t_import


def latency(path: Path, x: np.ndarray, threads: int, runs: int) -> float:
    interp = runtime.load_interpreter(path, num_threads=threads)
    return runtime.time_inference(interp, [x], warmup=10, runs=runs)


def bench_model(name: str, runs: int, tmp: Path) -> dict:
    model, x = make(name)
    g = torch.Generator().manual_seed(0)
    cal = [torch.randn(x.shape, generator=g) for _ in range(32)]
    row: dict = {"model": name}
    arts = {}
    for target in ("arm-fp32", "arm-int8"):
        t0 = time.perf_counter()
        arts[target] = sdk.deploy(model, target, (x,), calibration=cal, output=tmp / f"{name}-{target}", progress=False)
        row[f"deploy_s_{target}"] = round(time.perf_counter() - t0, 2)
        row[f"bytes_{target}"] = arts[target].manifest["files"]["model.tflite"]["bytes"]
    xs = np.ascontiguousarray(x.numpy().transpose(0, 2, 3, 1))
    for threads in (1, 2):
        med = {t: [] for t in arts}
        for _ in range(3):                       # interleave the two models to share machine noise
            for t, art in arts.items():
                med[t].append(latency(art.file("model.tflite"), xs, threads, runs))
        for t in arts:
            row[f"latency_ms_{t}_{threads}t"] = round(statistics.median(med[t]), 4)
        row[f"int8_over_fp32_{threads}t"] = round(row[f"latency_ms_arm-int8_{threads}t"]
                                                  / row[f"latency_ms_arm-fp32_{threads}t"], 4)
    for t in arts:
        row[f"2t_over_1t_{t}"] = round(row[f"latency_ms_{t}_2t"] / row[f"latency_ms_{t}_1t"], 4)
    row["size_int8_over_fp32"] = round(row["bytes_arm-int8"] / row["bytes_arm-fp32"], 4)
    inputs = [torch.randn(x.shape, generator=g) for _ in range(8)]
    rep = arts["arm-int8"].verify(model, inputs=inputs)
    row["sqnr_db_int8"] = round(rep.sqnr_db["host"], 2)
    row["bit_exact_ratio_int8"] = rep.bit_exact_ratio["host"]
    summary = runtime.op_summary(runtime.load_interpreter(arts["arm-int8"].file("model.tflite")))
    row["xnnpack_delegated"] = not summary["builtin"]
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "arm_int8.json"))
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--models", nargs="*", default=["resnet18", "mobilenetv2"])
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rows = [bench_model(m, args.runs, Path(tmp)) for m in args.models]
    result = {"benchmark": "arm-int8 vs arm-fp32 (LiteRT, XNNPACK)", "machine": platform.machine(),
              "cpu_count": torch.get_num_threads(), "runs": args.runs, "import_s": round(IMPORT_S, 2),
              "models": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
