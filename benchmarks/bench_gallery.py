"""Real torchvision / timm CNNs and transformers (tests/helpers/gallery.py) on arm-fp32, arm-int8 and fp16-gpu.

    .venv/bin/python benchmarks/bench_gallery.py [--out benchmarks/results/gallery.json]
        [--resolution 224] [--runs 20] [--models resnet18 ...]

Per model: ``deploy()`` wall time and ``model.tflite`` size for each target
(4 random calibration batches), int8 and fp32 LiteRT latency (1 thread,
median of ``--runs`` calls after warm-up, the two models timed interleaved in
3 rounds to share machine noise), the int8 graph's XNNPACK partitions and
leftover builtin ops, the int8 layers kept in float (layer norm, GELU,
attention, softmax of the transformers: see sdk/litert/lowering.py),
and the int8 SQNR against the float model on 4 random inputs.  The models are random init with batch-norm statistics estimated on
random inputs (see tests/helpers/gallery.py): SQNR measures how much these untrained
nets amplify rounding, not the accuracy a trained model keeps.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "helpers"))
import gallery  # noqa: E402
import sdk  # noqa: E402
from sdk.litert import runtime  # noqa: E402
from sdk.litert.layout import to_stored  # noqa: E402

TARGETS = ("arm-fp32", "arm-int8", "fp16-gpu")


def bench_model(name: str, resolution: int, runs: int, tmp: Path) -> dict:
    gallery.BY_NAME[name] = dataclasses.replace(gallery.BY_NAME[name], resolution=resolution)
    model, x = gallery.build(name)
    cal = gallery.calibration(x, 4)
    row: dict = {"model": name, "source": gallery.BY_NAME[name].source, "input": list(x.shape)}
    arts = {}
    for target in TARGETS:
        t0 = time.perf_counter()
        arts[target] = sdk.deploy(model, target, (x,), calibration=cal, output=tmp / f"{name}-{target}",
                                  progress=False)
        row[f"deploy_s_{target}"] = round(time.perf_counter() - t0, 2)
        row[f"bytes_{target}"] = arts[target].manifest["files"]["model.tflite"]["bytes"]
    row["size_int8_over_fp32"] = round(row["bytes_arm-int8"] / row["bytes_arm-fp32"], 4)
    row["size_fp16_over_fp32"] = round(row["bytes_fp16-gpu"] / row["bytes_arm-fp32"], 4)

    timed = ("arm-fp32", "arm-int8")
    stored = {t: to_stored(arts[t].manifest["inputs"][0], x.numpy()) for t in timed}
    interps = {t: runtime.load_interpreter(arts[t].file("model.tflite"), num_threads=1) for t in timed}
    samples = {t: [] for t in timed}
    for _ in range(3):
        for t in timed:
            samples[t].append(runtime.time_inference(interps[t], [stored[t]], warmup=5, runs=runs))
    for t in timed:
        row[f"latency_ms_{t}"] = round(statistics.median(samples[t]), 3)
    row["int8_over_fp32_latency"] = round(row["latency_ms_arm-int8"] / row["latency_ms_arm-fp32"], 4)

    summary = runtime.op_summary(interps["arm-int8"])
    row["int8_partitions"] = summary["delegate_nodes"]
    row["int8_builtin_ops"] = dict(summary["builtin"])
    row["int8_float_layers"] = sorted({r["op"].split("->")[0] for r in arts["arm-int8"].profile["layers"]
                                       if r.get("precision") == "float32"})
    inputs = gallery.calibration(x, 4, seed=3)
    row["sqnr_db_int8"] = round(arts["arm-int8"].verify(model, inputs=inputs, runners=["host"]).sqnr_db["host"], 2)
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "gallery.json"))
    ap.add_argument("--resolution", type=int, default=224)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--models", nargs="*", default=[e.name for e in gallery.GALLERY])
    ap.add_argument("--readme", help="only rewrite the table between <!-- gallery:start/end --> in this file "
                                     "from --out's JSON")
    args = ap.parse_args()
    if args.readme:
        return write_table(Path(args.readme), json.loads(Path(args.out).read_text()))
    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            rows.append(bench_model(name, args.resolution, args.runs, Path(tmp)))
            print(json.dumps(rows[-1]), flush=True)
    result = {"benchmark": "gallery: torchvision/timm models on arm-fp32, arm-int8, fp16-gpu (LiteRT, XNNPACK, 1 thread)",
              "machine": platform.machine(), "cpu": _cpu(), "date": time.strftime("%Y-%m-%d"),
              "resolution": args.resolution, "runs": args.runs,
              "int8_faster_everywhere": all(r["int8_over_fp32_latency"] < 1 for r in rows),
              "one_partition_everywhere": all(r["int8_partitions"] == 1 and not r["int8_builtin_ops"] for r in rows),
              "models": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


def table(result: dict) -> str:
    """The README's gallery table (markdown) from a gallery.json."""
    lines = ["| model | deploy s fp32 / int8 / fp16 | MB fp32 / int8 / fp16 | latency ms fp32 / int8 | int8/fp32 "
             "| int8 partitions | int8 layers in float | int8 SQNR dB |", "|---|---|---|---|---|---|---|---|"]
    for r in result["models"]:
        mb = "{:.1f} / {:.1f} / {:.1f}".format(*(r[f"bytes_{t}"] / 1e6 for t in TARGETS))
        lines.append(f"| {r['model']} ({r['source']}) | " + " / ".join(str(r[f"deploy_s_{t}"]) for t in TARGETS)
                     + f" | {mb} | {r['latency_ms_arm-fp32']:.2f} / {r['latency_ms_arm-int8']:.2f} | "
                     f"{r['int8_over_fp32_latency']:.2f} | {r['int8_partitions']} | "
                     f"{', '.join(r.get('int8_float_layers', [])) or '—'} | {r['sqnr_db_int8']} |")
    return "\n".join(lines)


def write_table(readme: Path, result: dict) -> None:
    text = readme.read_text()
    start, end = "<!-- gallery:start -->\n", "<!-- gallery:end -->"
    a, b = text.index(start) + len(start), text.index(end)
    readme.write_text(text[:a] + table(result) + "\n" + text[b:])


def _cpu() -> str:
    """CPU model and the SIMD extensions int8 speed depends on (from /proc/cpuinfo)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor()
    model = next((ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("model name")), "")
    flags = set(next((ln.split(":", 1)[1].split() for ln in info.splitlines() if ln.startswith(("flags", "Features"))),
                     []))
    simd = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "asimddp", "i8mm") if f in flags]
    return f"{model} ({', '.join(simd) or 'no avx2/vnni/dotprod'})"


if __name__ == "__main__":
    main()
