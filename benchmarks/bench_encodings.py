"""Weight encodings side by side: int4, dynamic range, weight-only, and sparse (DENSIFY) storage.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_encodings.py [--quick] [--out benchmarks/results/encodings.json]

Everything goes through the public API (``sdk.deploy`` / ``sdk.compress`` /
``Artifact.verify``); each section's files are timed side by side in this one
process, 1 thread, ``rounds`` rounds, two ways (half the budget each):

* ``latency_ms`` ("warm"): per round, each interpreter (order rotated per
  round) runs a few untimed calls then ``runs`` timed calls in a row: the
  steady state of one model running on its own;
* ``latency_ms_interleaved`` ("cold"): per step, each interpreter is called
  once, in turn: every call finds the caches (1 MiB L2 per core here) filled with
  the other models' weights, so this measures latency with the weights streamed
  from L3/DRAM, where smaller files win more.  Measured on the MLP: int8 0.06 ms
  warm, 0.14 ms interleaved with the four other variants.

A latency is the median over all timed calls; a ratio (``latency_vs_*``,
``latency_sparse_over_dense*``) the median over rounds of the ratio of the two
per-round medians: the machine is shared and noisy, and ratios measured side by
side are fairer than the absolute numbers.  ``runs`` is sized per section so
that its timing takes about ``--time-budget`` seconds.

Sections (random init, seed 0, batch 1):

1. ``mlp``: MLP 784-1024-1024-10 (``nn.Sequential`` Linear/ReLU) on ``arm-fp32``,
   ``arm-int8`` with ``ptq`` (int8), ``int4`` (int8 activations), ``dynamic``
   (int8 weights, qd8 kernels) and ``int4`` with float activations (dynamic int4).
   File bytes and latency against the int8 file, SQNR against the float model
   (``verify(..., runners=["host", "reference"])``) and the host's bit-exact
   ratio against the reference.  Acceptance: int4 file <= 0.55 x int8 file.
2. ``resnet18``: ``examples/models.py`` ResNet-18 (CIFAR stem, 1x3x32x32; width
   16 with ``--quick``) on ``arm-fp32``, ``arm-int8`` ptq, ``dynamic`` and
   ``dynamic`` weight-only.
3. ``mobilenet_pruned``: a MobileNet-style float net (3x3 s2 stem 3->32, 7
   depthwise 3x3 + 1x1 blocks 64..256 with ReLU6, global average pool, linear
   head; 1x3x97x97) magnitude-pruned to 90 % (``sdk.compress``), deployed with
   ``sparsity="auto"`` and ``"off"`` on ``arm-fp32``, ``fp16-gpu`` and
   ``arm-int8``: bytes and latency sparse / dense (each target's two files
   timed side by side, without the others), and whether the two files of a
   target give identical outputs (``np.array_equal``).
4. ``mlp_pruned``: the MLP of (1) magnitude-pruned to 90 %, same three targets,
   sparsity auto vs off; the per-layer ``weight_storage`` the profile reports
   (int8 FULLY_CONNECTED weights may stay dense: XNNPACK folds DENSIFY only in
   front of float / convolution weights).

A deploy that fails is recorded as ``{"error": ...}`` and the rest goes on.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import os
import statistics
import sys
import time
import traceback
from importlib import metadata
from pathlib import Path

import numpy as np
import torch
from torch import nn

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
import sdk  # noqa: E402
from examples.models import make  # noqa: E402
from hostinfo import machine  # noqa: E402  (benchmarks/, on sys.path as this script's folder)
from sdk.litert import runtime  # noqa: E402
from sdk.litert.layout import from_stored, to_stored  # noqa: E402

SEED = 0
OUT = HERE / "results" / "encodings.json"


def recipe(method: str, **config) -> dict:
    return {"stages": [{"method": method, "config": config}]}


# --------------------------------------------------------------------------------------- models


def mlp() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(SEED)
    model = nn.Sequential(nn.Linear(784, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10))
    return model.eval(), torch.randn(1, 784)


class MobileNetish(nn.Module):
    """3x3 s2 stem, depthwise 3x3 + pointwise 1x1 blocks (ReLU6), global average pool, linear head."""

    BLOCKS = ((64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (256, 1), (256, 1))

    def __init__(self, classes: int = 10):
        super().__init__()
        layers, cin = [nn.Conv2d(3, 32, 3, 2, 1), nn.ReLU6()], 32
        for cout, stride in self.BLOCKS:
            layers += [nn.Conv2d(cin, cin, 3, stride, 1, groups=cin), nn.ReLU6(), nn.Conv2d(cin, cout, 1), nn.ReLU6()]
            cin = cout
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x):
        return self.fc(self.features(x).mean((2, 3)))


def mobilenetish(hw: int = 97) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(SEED)
    return MobileNetish().eval(), torch.randn(1, 3, hw, hw)


def prune(model: nn.Module, sparsity: float = 0.9) -> tuple[nn.Module, dict]:
    """A magnitude-pruned copy and its real zero fractions (per layer, 1x1 convs, overall)."""
    pruned = sdk.compress(model, recipe("magnitude", sparsity=sparsity), progress=False)
    layers, zeros, total, pointwise = {}, 0, 0, []
    for name, mod in pruned.named_modules():
        if isinstance(mod, (nn.Conv2d, nn.Linear)):
            w = mod.weight.detach()
            z = int((w == 0).sum())
            kind = "linear" if isinstance(mod, nn.Linear) else (
                "depthwise" if mod.groups > 1 else ("1x1" if mod.kernel_size == (1, 1) else "conv"))
            layers[name] = {"kind": kind, "params": w.numel(), "zero_fraction": round(z / w.numel(), 4)}
            zeros, total = zeros + z, total + w.numel()
            if kind == "1x1":
                pointwise.append(z / w.numel())
    info = {"requested": sparsity, "overall_zero_fraction": round(zeros / total, 4), "layers": layers}
    if pointwise:
        info["min_1x1_zero_fraction"] = round(min(pointwise), 4)
        info["check_1x1_at_least_0.8"] = min(pointwise) >= 0.8
    return pruned, info


# --------------------------------------------------------------------------------------- measuring


def deploy(model, target: str, x, cal, rcp=None, **opts):
    """``(artifact or None, row)``; a failure is recorded in the row, never raised."""
    row: dict = {"target": target, "recipe": rcp, "target_options": opts}
    t0 = time.perf_counter()
    try:
        art = sdk.deploy(model, target, example_inputs=(x,), calibration=cal, recipe=rcp, progress=False, **opts)
    except Exception as exc:  # noqa: BLE001 - recorded, the benchmark goes on
        row["error"] = f"{type(exc).__name__}: {exc}"
        row["traceback_tail"] = traceback.format_exc().strip().splitlines()[-4:]
        print(f"  deploy {target} {rcp} {opts} FAILED: {row['error']}", flush=True)
        return None, row
    row["deploy_s"] = round(time.perf_counter() - t0, 2)
    blob = art.read_bytes("model.tflite")
    row["bytes"] = len(blob)
    q = art.manifest.get("quantization") or {}
    row["quantization"] = {k: q[k] for k in ("method", "compute", "weight_bits") if k in q}
    storage = collections.Counter((lay.get("op"), lay.get("weight_storage"), lay.get("kernel"))
                                  for lay in art.profile["layers"] if lay.get("weight_storage"))
    row["weight_storage"] = [{"op": op, "weight_storage": ws, "kernel": k, "layers": n}
                             for (op, ws, k), n in storage.items()]
    row["deploy_profile_latency_ms"] = (art.profile.get("latency_ms") or {}).get("host")
    row["deploy_phases_s"] = art.profile.get("deploy_phases_s")
    return (art, blob), row


def fidelity(art, model, inputs, row: dict, reference: bool = False) -> None:
    runners = ["host", "reference"] if reference else ["host"]
    try:
        rep = art.verify(model, inputs=inputs, runners=runners, repeats=1)
        row["sqnr_db"] = round(float(rep.sqnr_db["host"]), 2)
        if reference:
            row["bit_exact_ratio"] = float(rep.runners["host"].bit_exact_ratio)
            row["max_lsb"] = float(rep.runners["host"].max_lsb)
            row["reference_sqnr_db"] = round(float(rep.sqnr_db["reference"]), 2)
        row["verify_passed"] = bool(rep.passed)
        if not rep.passed:
            row["verify_failures"] = list(getattr(rep, "failures", []) or [])
    except Exception as exc:  # noqa: BLE001
        row["verify_error"] = f"{type(exc).__name__}: {exc}"
        print(f"  verify {row['target']} FAILED: {row['verify_error']}", flush=True)


def interpreter(art, blob: bytes, x: torch.Tensor):
    it = runtime.load_interpreter(blob, num_threads=1)
    runtime.run(it, [to_stored(art.manifest["inputs"][0], x.numpy())])     # sets the input
    return it


def outputs(art, it, x: torch.Tensor) -> list[np.ndarray]:
    ins, outs = art.manifest["inputs"], art.manifest["outputs"]
    return [from_stored(s, y) for s, y in zip(outs, runtime.run(it, [to_stored(ins[0], x.numpy())]))]


def side_by_side(interps: dict, rounds: int, budget_s: float, warmup: int, min_runs: int, max_runs: int,
                 mode: str = "blocks") -> dict:
    """Time ``invoke()`` of the interpreters side by side; per name: median ms over all steps, per-round
    medians, and the runs per round.

    ``mode="blocks"``: each round runs every interpreter (order rotated per round) for ``warmup`` untimed
    then ``runs`` timed calls in a row: the steady state of one model running on its own, caches warm.
    ``mode="steps"``: every step calls each interpreter once, in turn (order rotated per step): each call
    finds the caches filled by the other models' weights (cold-cache latency)."""
    names = list(interps)
    for name in names:
        for _ in range(warmup):
            interps[name].invoke()
    t0 = time.perf_counter()              # one probe step, to size runs to the budget
    for name in names:
        interps[name].invoke()
    step_s = max(time.perf_counter() - t0, 1e-6)
    runs = int(min(max_runs, max(min_runs, budget_s / step_s / rounds)))
    per_round = {n: [] for n in names}
    every = {n: [] for n in names}
    k = len(names)
    for rnd in range(rounds):
        times = {n: [] for n in names}
        if mode == "blocks":
            for j in range(k):
                n = names[(j + rnd) % k]
                it = interps[n]
                for _ in range(warmup):
                    it.invoke()
                for _ in range(runs):
                    t = time.perf_counter()
                    it.invoke()
                    times[n].append((time.perf_counter() - t) * 1e3)
        else:
            for r in range(runs):
                for j in range(k):
                    n = names[(j + r) % k]
                    t = time.perf_counter()
                    interps[n].invoke()
                    times[n].append((time.perf_counter() - t) * 1e3)
        for n in names:
            per_round[n].append(statistics.median(times[n]))
            every[n] += times[n]
    return {"runs": runs, "rounds": rounds, "mode": mode,
            **{n: {"latency_ms": round(statistics.median(every[n]), 4),
                   "per_round_ms": [round(v, 4) for v in per_round[n]]} for n in names}}


def ratio(timing: dict, a: str, b: str) -> float:
    """Median over rounds of a's round median / b's."""
    return round(statistics.median(x / y for x, y in zip(timing[a]["per_round_ms"], timing[b]["per_round_ms"])), 4)


MODES = {"blocks": "", "steps": "_interleaved"}      # row key suffix per timing mode


def time_rows(rows: dict, handles: dict, x, args, budget: float) -> dict | None:
    """Both timing modes (half the budget each); ``{mode: timing}`` or None when nothing loaded."""
    interps = {}
    for key, h in handles.items():
        if h is None:
            continue
        try:
            interps[key] = interpreter(h[0], h[1], x)
        except Exception as exc:  # noqa: BLE001
            rows[key]["load_error"] = f"{type(exc).__name__}: {exc}"
    if not interps:
        return None
    timings = {}
    for mode, suffix in MODES.items():
        timing = side_by_side(interps, args.rounds, budget / 2, args.warmup, args.min_runs, args.max_runs, mode)
        timings[mode] = timing
        for key in interps:
            rows[key][f"latency_ms{suffix}"] = timing[key]["latency_ms"]
            rows[key][f"per_round_ms{suffix}"] = timing[key]["per_round_ms"]
    return timings


def add_ratios(rows: dict, timings: dict | None, key: str, base: str, name: str) -> None:
    """``latency_vs_<name>`` (blocks) and ``latency_vs_<name>_interleaved`` (steps) of row ``key``."""
    for mode, suffix in MODES.items():
        t = (timings or {}).get(mode)
        if t and key in t and base in t:
            rows[key][f"latency_vs_{name}{suffix}"] = ratio(t, key, base)


def inputs_like(x: torch.Tensor, n: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(x.shape, generator=g) for _ in range(n)]


# --------------------------------------------------------------------------------------- sections


def section_mlp(args) -> tuple[dict, nn.Module, torch.Tensor, list]:
    print("[1] MLP 784-1024-1024-10", flush=True)
    model, x = mlp()
    cal = inputs_like(x, args.calibration, 100)
    sqnr_in = inputs_like(x, args.sqnr_inputs, 200)
    cases = {
        "arm-fp32": ("arm-fp32", None, {}),
        "int8 (ptq)": ("arm-int8", None, {}),
        "int4 (int8 act)": ("arm-int8", recipe("int4", activations="int8"), {}),
        "dynamic int8": ("arm-int8", recipe("dynamic", weight_bits=8), {}),
        "dynamic int4 (int4, float act)": ("arm-int8", recipe("int4", activations="float"), {}),
    }
    rows, handles = {}, {}
    for key, (target, rcp, opts) in cases.items():
        handles[key], rows[key] = deploy(model, target, x, cal, rcp, **opts)
        if handles[key]:
            fidelity(handles[key][0], model, sqnr_in, rows[key], reference=True)
    timing = time_rows(rows, handles, x, args, args.time_budget)
    base = "int8 (ptq)"
    for key, row in rows.items():
        if "bytes" in row and "bytes" in rows[base]:
            row["bytes_vs_int8"] = round(row["bytes"] / rows[base]["bytes"], 4)
        add_ratios(rows, timing, key, base, "int8")
    acc = {}
    i4 = rows["int4 (int8 act)"]
    if "bytes_vs_int8" in i4:
        acc["int4_file_le_0.55x_int8"] = {"ratio": i4["bytes_vs_int8"], "passed": i4["bytes_vs_int8"] <= 0.55}
    d4 = rows["dynamic int4 (int4, float act)"]
    if "bytes_vs_int8" in d4:
        acc["dynamic_int4_file_le_0.55x_int8"] = {"ratio": d4["bytes_vs_int8"], "passed": d4["bytes_vs_int8"] <= 0.55}
    return {"model": "mlp 784-1024-1024-10", "input": list(x.shape), "rows": rows, "acceptance": acc,
            "timing_runs": timing and {m: t["runs"] for m, t in timing.items()}}, model, x, cal


def section_resnet(args) -> dict:
    width = 16 if args.quick else 64
    print(f"[2] ResNet-18 (width {width}) 1x3x32x32", flush=True)
    model, x = make("resnet18", seed=SEED, width=width)
    cal = inputs_like(x, args.calibration, 101)
    sqnr_in = inputs_like(x, args.sqnr_inputs, 201)
    cases = {
        "arm-fp32": ("arm-fp32", None),
        "int8 (ptq)": ("arm-int8", None),
        "dynamic int8": ("arm-int8", recipe("dynamic")),
        "dynamic weight-only": ("arm-int8", recipe("dynamic", mode="weight-only")),
    }
    rows, handles = {}, {}
    for key, (target, rcp) in cases.items():
        handles[key], rows[key] = deploy(model, target, x, cal, rcp)
        if handles[key]:
            fidelity(handles[key][0], model, sqnr_in, rows[key])
    timing = time_rows(rows, handles, x, args, args.time_budget * 1.5)
    for key, row in rows.items():
        add_ratios(rows, timing, key, "arm-fp32", "arm-fp32")
        add_ratios(rows, timing, key, "int8 (ptq)", "int8")
        for base in ("arm-fp32", "int8 (ptq)"):
            if "bytes" in row and "bytes" in rows[base]:
                row[f"bytes_vs_{base}"] = round(row["bytes"] / rows[base]["bytes"], 4)
    return {"model": f"examples resnet18 width {width}", "input": list(x.shape), "rows": rows,
            "timing_runs": timing and {m: t["runs"] for m, t in timing.items()}}


def sparse_vs_dense(model, x, cal, sqnr_in, args, budget: float) -> tuple[dict, dict]:
    rows, handles = {}, {}
    for target in ("arm-fp32", "fp16-gpu", "arm-int8"):
        for sp in ("auto", "off"):
            key = f"{target} sparsity={sp}"
            handles[key], rows[key] = deploy(model, target, x, cal, None, sparsity=sp)
            if handles[key]:
                fidelity(handles[key][0], model, sqnr_in, rows[key])
    pairs, runs = {}, {}
    for target in ("arm-fp32", "fp16-gpu", "arm-int8"):
        a, b = f"{target} sparsity=auto", f"{target} sparsity=off"
        p: dict = {}
        # each target's two files side by side, alone: six interleaved models would not fit the caches
        timing = time_rows(rows, {k: handles.get(k) for k in (a, b)}, x, args, budget / 3)
        if timing:
            runs[target] = {m: t["runs"] for m, t in timing.items()}
        if "bytes" in rows[a] and "bytes" in rows[b]:
            p["bytes_sparse_over_dense"] = round(rows[a]["bytes"] / rows[b]["bytes"], 4)
        for mode, suffix in MODES.items():
            t = (timing or {}).get(mode)
            if t and a in t and b in t:
                p[f"latency_sparse_over_dense{suffix}"] = ratio(t, a, b)
        if handles.get(a) and handles.get(b):
            try:
                ia, ib = (runtime.load_interpreter(handles[k][1], num_threads=1) for k in (a, b))
                same = [all(np.array_equal(u, v) for u, v in zip(outputs(handles[a][0], ia, s),
                                                                 outputs(handles[b][0], ib, s)))
                        for s in sqnr_in]
                p["outputs_array_equal"] = all(same)
                p["outputs_array_equal_inputs"] = len(same)
                if not all(same):
                    d = max(float(np.max(np.abs(u - v))) for s in sqnr_in
                            for u, v in zip(outputs(handles[a][0], ia, s), outputs(handles[b][0], ib, s)))
                    p["max_abs_diff"] = d
            except Exception as exc:  # noqa: BLE001
                p["compare_error"] = f"{type(exc).__name__}: {exc}"
        pairs[target] = p
    return rows, {"pairs": pairs, "timing_runs": runs}


def section_mobilenet(args) -> dict:
    print("[3] MobileNet-style, 90 % magnitude-pruned, 1x3x97x97", flush=True)
    dense, x = mobilenetish(97)
    model, prune_info = prune(dense, 0.9)
    cal = inputs_like(x, args.calibration, 102)
    sqnr_in = inputs_like(x, args.compare_inputs, 202)
    rows, extra = sparse_vs_dense(model, x, cal, sqnr_in, args, args.time_budget * 1.5)
    return {"model": "mobilenet-style (stem + 7 dw/pw blocks), magnitude 0.9", "input": list(x.shape),
            "pruning": prune_info, "rows": rows, **extra, "sqnr_against": "the pruned float model"}


def section_mlp_pruned(args, model, x, cal) -> dict:
    print("[4] MLP 784-1024-1024-10, 90 % magnitude-pruned", flush=True)
    pruned, prune_info = prune(model, 0.9)
    sqnr_in = inputs_like(x, args.compare_inputs, 203)
    rows, extra = sparse_vs_dense(pruned, x, cal, sqnr_in, args, args.time_budget)
    return {"model": "mlp 784-1024-1024-10, magnitude 0.9", "input": list(x.shape), "pruning": prune_info,
            "rows": rows, **extra, "sqnr_against": "the pruned float model"}


# --------------------------------------------------------------------------------------- report


def _f(v, fmt="{:.3f}"):
    return "—" if v is None else (fmt.format(v) if isinstance(v, (int, float)) else str(v))


def _storage(row: dict) -> str:
    if "weight_storage" not in row:
        return "—"
    c = collections.Counter()
    for s in row["weight_storage"]:
        c[f"{s['op'].split('->')[-1]} {s['weight_storage']} ({s['kernel']})"] += s["layers"]
    return "; ".join(f"{n}x {k}" for k, n in c.items())


def markdown(res: dict) -> str:
    """``warm``: each model timed in blocks of consecutive calls; ``cold``: calls interleaved one by one
    across the section's models (their weights evict each other from the caches)."""
    out = []
    s = res["sections"].get("mlp")
    if s:
        out += [f"### 1. {s['model']}, batch 1, 1 thread", "",
                "| variant | bytes | x int8 | ms warm | x int8 | ms cold | x int8 | SQNR dB | bit-exact host/ref "
                "| kernels |", "|---|---|---|---|---|---|---|---|---|---|"]
        for k, r in s["rows"].items():
            if "error" in r:
                out.append(f"| {k} | failed: {r['error'][:160]} |" + "  |" * 8)
                continue
            out.append(f"| {k} | {r['bytes']} | {_f(r.get('bytes_vs_int8'))} | {_f(r.get('latency_ms'), '{:.4f}')} | "
                       f"{_f(r.get('latency_vs_int8'))} | {_f(r.get('latency_ms_interleaved'), '{:.4f}')} | "
                       f"{_f(r.get('latency_vs_int8_interleaved'))} | {_f(r.get('sqnr_db'), '{:.2f}')} | "
                       f"{_f(r.get('bit_exact_ratio'), '{:.4f}')} | {_storage(r)} |")
        out.append("")
        for k, a in s["acceptance"].items():
            out.append(f"acceptance {k}: ratio {a['ratio']} -> {'PASS' if a['passed'] else 'FAIL'}")
        out.append("")
    s = res["sections"].get("resnet18")
    if s:
        out += [f"### 2. {s['model']}, input {s['input']}", "",
                "| variant | bytes | x fp32 | ms warm | x fp32 | x int8 | ms cold | x fp32 | x int8 | SQNR dB "
                "| kernels |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        for k, r in s["rows"].items():
            if "error" in r:
                out.append(f"| {k} | failed: {r['error'][:160]} |" + "  |" * 9)
                continue
            out.append(f"| {k} | {r['bytes']} | {_f(r.get('bytes_vs_arm-fp32'))} | {_f(r.get('latency_ms'), '{:.3f}')} | "
                       f"{_f(r.get('latency_vs_arm-fp32'))} | {_f(r.get('latency_vs_int8'))} | "
                       f"{_f(r.get('latency_ms_interleaved'), '{:.3f}')} | "
                       f"{_f(r.get('latency_vs_arm-fp32_interleaved'))} | {_f(r.get('latency_vs_int8_interleaved'))} | "
                       f"{_f(r.get('sqnr_db'), '{:.2f}')} | {_storage(r)} |")
        out.append("")
    for key, title in (("mobilenet_pruned", "3."), ("mlp_pruned", "4.")):
        s = res["sections"].get(key)
        if not s:
            continue
        p = s["pruning"]
        extra = f", min 1x1 zeros {p['min_1x1_zero_fraction']}" if "min_1x1_zero_fraction" in p else ""
        out += [f"### {title} {s['model']}, input {s['input']} (zeros overall {p['overall_zero_fraction']}{extra})", "",
                "| target | sparsity | bytes | ms warm | ms cold | SQNR dB vs pruned float | weight_storage (kernel) |",
                "|---|---|---|---|---|---|---|"]
        for k, r in s["rows"].items():
            tgt, sp = k.split(" sparsity=")
            if "error" in r:
                out.append(f"| {tgt} | {sp} | failed: {r['error'][:160]} |  |  |  |  |")
                continue
            out.append(f"| {tgt} | {sp} | {r['bytes']} | {_f(r.get('latency_ms'), '{:.4f}')} | "
                       f"{_f(r.get('latency_ms_interleaved'), '{:.4f}')} | {_f(r.get('sqnr_db'), '{:.2f}')} | "
                       f"{_storage(r)} |")
        out += ["", "| target | bytes sparse/dense | latency sparse/dense warm | cold | outputs array_equal |",
                "|---|---|---|---|---|"]
        for tgt, pr in s["pairs"].items():
            eq = pr.get("outputs_array_equal", pr.get("compare_error", "—"))
            if pr.get("outputs_array_equal") is False:
                eq = f"False (max abs diff {pr.get('max_abs_diff'):.3g})"
            out.append(f"| {tgt} | {_f(pr.get('bytes_sparse_over_dense'), '{:.4f}')} | "
                       f"{_f(pr.get('latency_sparse_over_dense'), '{:.3f}')} | "
                       f"{_f(pr.get('latency_sparse_over_dense_interleaved'), '{:.3f}')} | {eq} |")
        out.append("")
    return "\n".join(out)


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


SECTIONS = ("mlp", "resnet18", "mobilenet_pruned", "mlp_pruned")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small budgets and a width-16 ResNet (< 60 s)")
    ap.add_argument("--sections", nargs="*", default=list(SECTIONS), choices=SECTIONS)
    ap.add_argument("--rounds", type=int, help="interleaved rounds per section (default 5, quick 3)")
    ap.add_argument("--time-budget", type=float, help="seconds of timed invokes per section (default 14, quick 1.5)")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--min-runs", type=int, default=10)
    ap.add_argument("--max-runs", type=int, default=400)
    ap.add_argument("--calibration", type=int, help="calibration batches (default 16, quick 8)")
    ap.add_argument("--sqnr-inputs", type=int, help="inputs for SQNR / bit-exactness (default 8, quick 4)")
    ap.add_argument("--compare-inputs", type=int, default=3, help="inputs for the sparse-vs-dense comparisons")
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args()
    q = args.quick
    args.rounds = args.rounds or (3 if q else 5)
    args.time_budget = args.time_budget or (1.5 if q else 14.0)
    args.calibration = args.calibration or (8 if q else 16)
    args.sqnr_inputs = args.sqnr_inputs or (4 if q else 8)
    torch.set_num_threads(1)

    started = time.perf_counter()
    info = {"benchmark": "weight encodings: int4 / dynamic range / weight-only / sparse storage, 1 thread",
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            **machine(), "quick": q, "rounds": args.rounds, "time_budget_s": args.time_budget,
            "warmup": args.warmup, "calibration_batches": args.calibration, "sqnr_inputs": args.sqnr_inputs,
            "compare_inputs": args.compare_inputs,
            "versions": {"edgepack": _version("edgepack"), "torch": torch.__version__,
                         "ai-edge-litert": _version("ai-edge-litert"), "numpy": np.__version__}}
    sections: dict = {}
    mlp_model = None
    for name in args.sections:
        t0 = time.perf_counter()
        try:
            if name == "mlp":
                sections[name], mlp_model, mx, mcal = section_mlp(args)
            elif name == "resnet18":
                sections[name] = section_resnet(args)
            elif name == "mobilenet_pruned":
                sections[name] = section_mobilenet(args)
            elif name == "mlp_pruned":
                if mlp_model is None:
                    mlp_model, mx = mlp()
                    mcal = inputs_like(mx, args.calibration, 100)
                sections[name] = section_mlp_pruned(args, mlp_model, mx, mcal)
        except Exception as exc:  # noqa: BLE001 - one section's failure does not lose the others
            sections[name] = {"error": f"{type(exc).__name__}: {exc}",
                              "traceback_tail": traceback.format_exc().strip().splitlines()[-6:]}
            print(f"  section {name} FAILED: {sections[name]['error']}", flush=True)
        if isinstance(sections.get(name), dict):
            sections[name]["section_s"] = round(time.perf_counter() - t0, 1)
    info["loadavg_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    info["total_s"] = round(time.perf_counter() - started, 1)
    result = {**info, "sections": sections}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2, default=str) + "\n")
    print()
    print(markdown({"sections": {k: v for k, v in sections.items() if "error" not in v}}))
    for k, v in sections.items():
        if "error" in v:
            print(f"section {k} failed: {v['error']}")
    print(f"total {info['total_s']} s; written: {args.out}")


if __name__ == "__main__":
    main()
