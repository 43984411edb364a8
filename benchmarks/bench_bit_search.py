"""The three per-layer bit-width quantizers at the same budgets on digits: the README's bit-search table.

Two float MLPs (64-32-32-10 and 64-64-48-32-24-10, sklearn digits 8×8, 30 epochs of Adam) are each
quantized by

``mixed-precision``
    HAWQ-style post-training allocation (measured sensitivities, exact knapsack) over int8 /
    int4 per layer; no fine-tuning, activations calibrated by PTQ.
``bo-mixed-precision``
    Bayesian optimisation (GP + EI) over 8/4/2/1 bits per layer, each candidate fine-tuned
    (QAFT, ``--steps`` steps) and scored on held-out training batches; the best one fine-tuned
    ``--final-epochs`` epochs.
``autoqb``
    the DDPG agent over 8/4/2/1 bits, each episode fine-tuned the same way (skipped, with the
    reason, when the plugin is not registered or fails).

at each budget (fractions of the all-int8 cost: ``bytes`` is what ``arm-int8`` stores for the
layers, ``bops`` Σ MACs·w_bits·8).  Every result is deployed to ``arm-int8``; reported per method:
the artifact's top-1 accuracy on the 450 held-out test digits, the bytes it ships for the
layers (``profile.json`` rows) and their BOPs, the wall seconds of the search (the stage's
report; for ``mixed-precision`` its whole deploy, sensitivities and calibration included) and of
the whole stage (search + final fine-tune), and the trials it scored.  Searches run
with ``--seeds`` seeds (mean ± half the range); ``mixed-precision`` is deterministic.

Usage: ``python benchmarks/bench_bit_search.py [--out FILE] [--seeds 3] [--trials 16] [--steps 60]``
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import sdk  # noqa: E402
from examples import digits as D  # noqa: E402
from sdk import bit_search as bs  # noqa: E402
from sdk import plugins  # noqa: E402
from sdk.trainer import make_loader  # noqa: E402

from hostinfo import machine  # noqa: E402

BUDGETS = (("bytes", 0.6), ("bops", 0.5), ("bops", 0.25))


#: the MLPs measured, by their widths
MODELS = {"64-32-32-10": (64, 32, 32, 10), "64-64-48-32-24-10": (64, 64, 48, 32, 24, 10)}


def mlp(widths):
    torch.manual_seed(0)
    layers = [nn.Flatten()]
    for a, b in zip(widths, widths[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


def artifact_accuracy(art, x, y) -> float:
    out = np.concatenate([art.run(x[i:i + 1])[0] for i in range(len(x))])
    return float((out.argmax(1) == y.numpy()).mean())


def shipped(art, layers) -> dict:
    rows = [r for r in art.profile["layers"] if r["op"].split("->")[0] in ("conv", "linear")]
    bits = [e["bits"] for e in art.manifest["encodings"]]
    return {"bytes": sum(r["bytes"] for r in rows), "encoded_bits": bits,
            "storage": [r.get("weight_storage") for r in rows]}


def stage_config(cls, wanted: dict) -> dict:
    """The entries of ``wanted`` that ``cls.Config`` has as fields (the searchers name theirs alike)."""
    fields = {f.name for f in dataclasses.fields(cls.Config)}
    return {k: v for k, v in wanted.items() if k in fields}


def run_method(method, config, model, train, xtr, xte, yte, layers):
    """Quantize (timed: the search and final fine-tune, or the post-training calibration) and deploy."""
    recipe = {"stages": [{"method": method, "config": config}]}
    calibration = [xtr[i:i + 32] for i in range(0, 256, 32)]
    t0 = time.perf_counter()
    if plugins.get("quantizer", method).post_training:
        art = sdk.deploy(model, "arm-int8", (xte[:1],), calibration=calibration, recipe=recipe, progress=False)
        seconds, reports = time.perf_counter() - t0, []
    else:
        small = sdk.compress(model, recipe, data=train)
        seconds = time.perf_counter() - t0
        art = sdk.deploy(small, "arm-int8", (xte[:1],), calibration=calibration, progress=False)
        reports = getattr(small, "_edgepack_reports", None) or []
    ship = shipped(art, layers)
    trials, bits, search = None, None, None
    for r in reports:
        search = r.get("search_seconds", search)
        history = r.get("trials") or r.get("episodes") or r.get("history") or []
        trials = len(history) or trials
        best = r.get("best") or {}
        if isinstance(best.get("bits"), dict):
            bits = [best["bits"][l.name] for l in layers]
        elif isinstance(best.get("bits"), list):
            bits = best["bits"]
    bits = bits or ship["encoded_bits"]
    return {"accuracy": artifact_accuracy(art, xte, yte), **ship, "bits": bits,
            "bops": bs.cost(layers, bits, "bops"), "seconds": round(seconds, 2),
            "search_seconds": search if search is not None else round(seconds, 2), "trials": trials,
            "config": config, "history": [compact(r) for r in reports]}


def compact(report: dict) -> dict:
    """A stage report without what the table repeats: each trial's bits, accuracy and origin, and the best."""
    history = report.get("trials") or report.get("episodes") or report.get("history") or []
    keep = ("bits", "accuracy", "origin", "reward")
    return {"method": report.get("method"), "best": report.get("best"),
            "trials": [{k: t[k] for k in keep if k in t} for t in history if isinstance(t, dict)]}


def summary(runs: list[dict], key: str) -> dict:
    vals = [r[key] for r in runs if r.get(key) is not None]
    if not vals:
        return {"mean": None, "spread": None}
    return {"mean": float(np.mean(vals)), "spread": float((max(vals) - min(vals)) / 2)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "bit_search.json")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--trials", type=int, default=16)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--final-epochs", type=int, default=3)
    ap.add_argument("--models", default=",".join(MODELS), help=f"comma-separated of {', '.join(MODELS)}")
    args = ap.parse_args()
    torch.set_num_threads(1)

    xtr, ytr, xte, yte = D.load()
    train = list(make_loader(xtr, ytr, batch_size=64, seed=0))
    results = {"machine": machine(), "args": {k: str(v) for k, v in vars(args).items()}, "models": []}
    try:
        autoqb = plugins.get("quantizer", "autoqb")
        autoqb_error = None
    except Exception as exc:          # not registered yet: say so, skip it
        autoqb, autoqb_error = None, f"{type(exc).__name__}: {exc}"
        print(f"autoqb skipped: {autoqb_error}", flush=True)
    for model_name in args.models.split(","):
        model = D.train(mlp(MODELS[model_name]), xtr, ytr.long(), epochs=30, progress=False)
        layers = bs.search_layers(model, (xte[:1],))
        full = {m: bs.cost(layers, (8,) * len(layers), m) for m in ("bytes", "bops")}
        int8 = sdk.deploy(model, "arm-int8", (xte[:1],), calibration=[xtr[i:i + 32] for i in range(0, 256, 32)],
                          progress=False)
        entry_model = {"model": f"MLP {model_name} on digits", "int8": full,
                       "float_accuracy": float((model(xte).argmax(1) == yte).float().mean()),
                       "int8_ptq_accuracy": artifact_accuracy(int8, xte, yte),
                       "layers": [l.to_dict() for l in layers], "budgets": []}
        print(f"\n#### MLP {model_name}: float {entry_model['float_accuracy']:.4f}, int8 PTQ "
              f"{entry_model['int8_ptq_accuracy']:.4f}, int8 {full}", flush=True)
        for metric, fraction in BUDGETS:
            entry_model["budgets"].append(run_budget(metric, fraction, model, layers, full, train, xtr, xte, yte,
                                                     args, autoqb, autoqb_error))
        results["models"].append(entry_model)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print("\n" + table(results))
    return 0


def run_budget(metric, fraction, model, layers, full, train, xtr, xte, yte, args, autoqb, autoqb_error) -> dict:
    limit = int(full[metric] * fraction)
    field = {"bytes": "max_weight_bytes", "bops": "max_bops"}[metric]
    entry = {"metric": metric, "fraction": fraction, "limit": limit, "methods": {}}
    print(f"== {metric} budget {limit} ({fraction:.0%} of int8)", flush=True)
    # mixed-precision: int8/int4 only; below all-int4 it is infeasible
    least = bs.cost(layers, (4,) * len(layers), metric)
    if least > limit:
        entry["methods"]["mixed-precision"] = {"skipped": f"infeasible: its smallest choice (all int4) costs "
                                                          f"{least} {metric}"}
    else:
        r = run_method("mixed-precision", {field: limit, "choices": ["int8", "int4"], "progress": False},
                       model, train, xtr, xte, yte, layers)
        entry["methods"]["mixed-precision"] = {"runs": [r]}
        print(f"  mixed-precision: acc {r['accuracy']:.4f}, {r['bytes']} B, {r['seconds']} s, bits {r['bits']}",
              flush=True)
    searchers = {"bo-mixed-precision": plugins.get("quantizer", "bo-mixed-precision"), "autoqb": autoqb}
    for name, cls in searchers.items():
        if cls is None:
            entry["methods"][name] = {"skipped": autoqb_error}
            continue
        runs = []
        for seed in range(args.seeds):
            wanted = {field: limit, "bits": [8, 4, 2, 1], "trials": args.trials, "episodes": args.trials,
                      "init_trials": max(2, args.trials // 4), "warmup_episodes": max(2, args.trials // 4),
                      "finetune_steps": args.steps, "final_epochs": args.final_epochs, "seed": seed,
                      "progress": False}
            try:
                runs.append(run_method(name, stage_config(cls, wanted), model, train, xtr, xte, yte, layers))
            except Exception as exc:
                entry["methods"][name] = {"skipped": f"{type(exc).__name__}: {exc}"}
                print(f"  {name} failed: {entry['methods'][name]['skipped']}", flush=True)
                runs = None
                break
            print(f"  {name} seed {seed}: acc {runs[-1]['accuracy']:.4f}, {runs[-1]['bytes']} B, "
                  f"{runs[-1]['seconds']} s, bits {runs[-1]['bits']}", flush=True)
        if runs is not None:
            entry["methods"][name] = {"runs": runs}
    for m in entry["methods"].values():
        if "runs" in m:
            m["summary"] = {k: summary(m["runs"], k)
                            for k in ("accuracy", "bytes", "bops", "search_seconds", "seconds", "trials")}
    return entry


def table(results: dict) -> str:
    lines = ["| model | budget | method | artifact accuracy | bytes shipped | BOPs | search s | stage s | trials |",
             "|---|---|---|---|---|---|---|---|---|"]
    for mod in results["models"]:
        name_m = mod["model"].split(" on ")[0]
        lines.append(f"| {name_m} | none (float / int8 PTQ) | — | {100 * mod['float_accuracy']:.1f} % / "
                     f"{100 * mod['int8_ptq_accuracy']:.1f} % | {mod['int8']['bytes']} | {mod['int8']['bops']} | | | |")
        for b in mod["budgets"]:
            label = f"{b['metric']} ≤ {b['limit']} ({b['fraction']:.0%} of int8)"
            for name, m in b["methods"].items():
                if "skipped" in m:
                    lines.append(f"| {name_m} | {label} | {name} | — ({(m['skipped'] or '')[:90]}) | | | | | |")
                    continue
                s = m["summary"]

                def fmt(key, digits, scale=1.0, s=s, m=m):
                    v = s[key]
                    if v["mean"] is None:
                        return "—"
                    return f"{v['mean'] * scale:.{digits}f} ± {v['spread'] * scale:.{digits}f}" \
                        if len(m["runs"]) > 1 else f"{v['mean'] * scale:.{digits}f}"

                lines.append(f"| {name_m} | {label} | {name} | {fmt('accuracy', 1, 100)} % | {fmt('bytes', 0)} | "
                             f"{fmt('bops', 0)} | {fmt('search_seconds', 1)} | {fmt('seconds', 1)} | "
                             f"{fmt('trials', 0)} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
