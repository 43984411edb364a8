"""Early exit on digits: a three-block CNN, exits after blocks 1 and 2, policies for several λ,
every number measured by running the arm-int8 artifacts.

    python examples/early_exit.py [--width 8] [--json out.json]

Prints, for the full network and each λ: the artifact's accuracy on the 450 held-out digits, mean
MACs per input (the stages each input ran, MACs from the artifact's profile), the share of inputs
leaving at each stage, how often the artifact's exit decision equals the torch cascade's, the
median host latency per input through the runner (full network: one call per input; cascade: its
stages, input by input; measured side by side), and the invoke-only latency per input (each graph's
median LiteRT ``invoke()`` time, for the cascade weighted by the share of inputs reaching each stage:
what a device pays without Python around the calls).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

import sdk
from examples import digits as D
from sdk.early_exit import attach_exits, fit_policies
from sdk.trainer import TrainConfig


class ExitNet(nn.Module):
    """Three conv blocks on 8×8 digits, global pooling, a linear head."""

    def __init__(self, c: int = 8):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(c, 2 * c, 3, padding=1), nn.BatchNorm2d(2 * c), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(2 * c, 4 * c, 3, padding=1), nn.BatchNorm2d(4 * c), nn.ReLU())
        self.classifier = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * c, 10))

    def forward(self, x):
        return self.classifier(self.features(x))


def per_input_ms(call, xs, rounds: int = 7) -> float:
    """Median over rounds of the mean time per input of ``call(x)`` over every input, one at a time."""
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for x in xs:
            call(x)
        times.append((time.perf_counter() - t0) / len(xs) * 1e3)
    return statistics.median(times)


def invoke_ms(art, name: str, x: np.ndarray) -> float:
    """Median time of one LiteRT ``invoke()`` of the artifact's graph ``name`` (no Python around it)."""
    from sdk.litert import runtime
    from sdk.litert.layout import to_stored

    interp = runtime.load_interpreter(art.read_bytes(name), check=True)
    sig = (art.manifest["early_exit"]["stages"][int(name[5:-7])]["inputs"][0] if "early_exit" in art.manifest
           else art.manifest["inputs"][0])
    return runtime.time_inference(interp, [to_stored(sig, x)], warmup=20, runs=400)


def main() -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=int, default=8)
    ap.add_argument("--lambdas", type=float, nargs="+", default=[0.02, 0.1, 0.5])
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(1)
    xtr, ytr, xte, yte = D.load()
    torch.manual_seed(0)
    net = D.train(ExitNet(args.width), xtr, ytr, epochs=8, lr=5e-3, progress=False)
    train = [(xtr[i:i + 64], ytr[i:i + 64]) for i in range(300, len(xtr), 64)]
    val = [(xtr[:300], ytr[:300])]
    heads = attach_exits(copy.deepcopy(net), ["features.3", "features.7"], train, head_pool=2,
                         train_config=TrainConfig(epochs=6, lr=5e-3, progress=False))
    cal = [xtr[i:i + 64] for i in range(0, 256, 64)]
    y = yte.numpy()
    singles = [xte[i:i + 1].numpy() for i in range(len(xte))]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        full = sdk.deploy(net, target="arm-int8", example_inputs=(xte[:1],), calibration=cal,
                          output=Path(tmp) / "full", progress=False)
        run_full = full.session("host")
        logits = np.concatenate([run_full([x])[0] for x in singles])
        full_macs = full.profile["totals"]["macs"]
        rows.append({"model": "full network", "accuracy": float((logits.argmax(1) == y).mean()),
                     "mean_macs": full_macs, "macs_ratio": 1.0, "exit_fractions": None, "agreement": None,
                     "file_bytes": full.profile["totals"]["model_bytes"]})
        full_invoke = invoke_ms(full, "model.tflite", singles[0])
        cascades = []
        for lam in args.lambdas:
            c = copy.deepcopy(heads)
            fit_policies(c, val, lam)
            art = sdk.deploy(c, target="arm-int8", example_inputs=(xte[:4],), calibration=cal,
                             output=Path(tmp) / f"lam{lam}", progress=False)
            out = art.run(xte)[0]
            info = art.last_run_info
            with torch.no_grad():
                _, t_exit, _ = c.exits(xte)
            rows.append({"model": f"early exit, λ = {lam}", "accuracy": float((out.argmax(1) == y).mean()),
                         "mean_macs": info.mean_macs, "macs_ratio": info.mean_macs / full_macs,
                         "exit_fractions": info.exit_fractions,
                         "agreement": float((info.exit_stage == t_exit.numpy()).mean()),
                         "file_bytes": art.profile["totals"]["model_bytes"]})
            cascades.append(art.session("host").cascade)
            # invoke-only latency per input: each stage's measured invoke time, paid by the inputs reaching it
            feats = [singles[0]]
            with torch.no_grad():
                h = xte[:1]
                for stage in c.stages[:-1]:
                    h = stage(h)[0]
                    feats.append(h.numpy())
            reach = 1.0 - np.concatenate([[0.0], np.cumsum(info.exit_fractions)[:-1]])
            rows[-1]["invoke_ms_per_input"] = float(sum(
                r * invoke_ms(art, st["file"], f)
                for r, st, f in zip(reach, art.manifest["early_exit"]["stages"], feats)))
        # latency side by side: rounds alternate between the models so load changes hit all alike
        lat = {k: [] for k in range(len(rows))}
        for _ in range(5):
            lat[0].append(per_input_ms(lambda x: run_full([x]), singles, rounds=1))
            for k, cascade in enumerate(cascades, 1):
                lat[k].append(per_input_ms(lambda x: cascade([x]), singles, rounds=1))
        for k, row in enumerate(rows):
            row["latency_ms_per_input"] = statistics.median(lat[k])
        rows[0]["invoke_ms_per_input"] = full_invoke
    print(f"{'model':24s} {'accuracy':>8s} {'MACs/input':>11s} {'ratio':>6s} {'exits (0/1/end)':>18s} "
          f"{'agree':>6s} {'ms/input':>8s} {'invoke ms':>9s}")
    for r in rows:
        fr = "/".join(f"{v:.2f}" for v in r["exit_fractions"]) if r["exit_fractions"] else "-"
        ag = f"{r['agreement']:.3f}" if r["agreement"] is not None else "-"
        print(f"{r['model']:24s} {r['accuracy']:8.4f} {r['mean_macs']:11.0f} {r['macs_ratio']:6.3f} {fr:>18s} "
              f"{ag:>6s} {r['latency_ms_per_input']:8.4f} {r['invoke_ms_per_input']:9.4f}")
    result = {"width": args.width, "rows": rows}
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
