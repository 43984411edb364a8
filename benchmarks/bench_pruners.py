"""Every built-in pruner on one digits LeNet, deployed to ``arm-int8``: the README's pruner table.

One float LeNet (``examples.models``: 16/32/64 channels, 8×8 digits) is trained once; each
pruner then runs on a copy through ``sdk.compress`` with the ``train`` and ``val`` streams,
at 75 % sparsity (unstructured pruners) or 50 % of the channels (structured ones).  Then, per
pruner:

* accuracy right after the method (its own fine-tuning, if it has any, included);
* accuracy after a common fine-tune: 2 epochs of cross-entropy with the zeros held by masks
  (removed channels are gone anyway);
* the ``arm-int8`` artifact (``sparsity: auto``): ``model.tflite`` bytes, MACs from the
  profile, LiteRT latency (deploy's median, 1 thread), and its test accuracy (``art.run``).

Then the structured pruners on the zoo's ResNet-18 (32×32): MACs and LiteRT latency against the
dense model, timed alternately (``--only resnet18`` runs just that part).

Usage: ``python benchmarks/bench_pruners.py [--out FILE] [--only NAME ...]``; writes JSON and
prints the markdown table (``--only`` with an existing ``--out`` refreshes those rows).  Test split:
sklearn digits, 450 images (the first 225 are the ``val`` stream, the rest report the accuracies).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import sdk  # noqa: E402
from examples import digits as D  # noqa: E402
from examples.models import make  # noqa: E402
from sdk import masks  # noqa: E402
from sdk.trainer import TrainConfig, finetune, make_loader  # noqa: E402

from hostinfo import machine  # noqa: E402

SPARSITY, RATIO = 0.75, 0.5
#: (name, config) per pruner; short trainings, the same budget class for all
PRUNERS = [
    ("magnitude", {"sparsity": SPARSITY}),
    ("threshold", {"quality": 1.15, "iterations": 2, "epochs": 1}),     # |w| < 1.15 σ: ~75 % of a normal
    ("agp", {"final_sparsity": SPARSITY, "epochs": 2, "pruning_steps": 5, "frequency": 5}),
    ("granularity", {"sparsity": SPARSITY}),
    ("sensitivity", {"sparsity": SPARSITY, "finetune_epochs": 0}),
    ("obs", {"sparsity": SPARSITY}),
    ("surgery", {"sparsity": SPARSITY, "epochs": 2}),
    ("auto-threshold", {"sparsity": SPARSITY, "epochs": 2}),
    ("regularization", {"sparsity": SPARSITY, "epochs": 2}),
    ("energy-aware", {"sparsity": RATIO, "target": "arm-int8"}),
    ("filter-l1", {"ratio": RATIO}),
    ("slimming", {"ratio": RATIO, "epochs": 2, "finetune_epochs": 0}),
    ("taylor", {"ratio": RATIO}),
    ("apoz", {"ratio": RATIO}),
    ("sss", {"gamma": 0.03, "epochs": 5}),
    ("hybrid", {"ratio": 0.25, "sparsity": 0.5}),
    ("deep-compression", {"sparsity": SPARSITY}),
]


def split():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = (d.images / 16.0).astype(np.float32)[:, None]
    xtr, xte, ytr, yte = train_test_split(x, d.target, test_size=0.25, random_state=0, stratify=d.target)
    t = torch.from_numpy
    return t(xtr), t(ytr).long(), t(xte), t(yte).long()


def hold_zeros(model: torch.nn.Module) -> None:
    """Masks on every conv/linear weight that has zeros, so fine-tuning keeps them."""
    for _, m in masks.prunable_layers(model):
        w = m.weight.detach()
        if (w == 0).any():
            masks.apply_mask(m, (w != 0).to(w.dtype))


def artifact_accuracy(art, x, y) -> float:
    out = np.concatenate([art.run(x[i:i + 1])[0] for i in range(len(x))])
    return float((out.argmax(1) == y.numpy()).mean())


def measure(name, model, cfg, streams, cal, test, root: Path) -> dict:
    xh, yh = test
    t0 = time.perf_counter()
    pruned = sdk.compress(model, {"stages": [{"method": name, "config": cfg}]},
                          data=streams, progress=False)
    seconds = time.perf_counter() - t0
    row = {"method": name, "config": cfg, "seconds": round(seconds, 2),
           "acc_after_method": D.accuracy(pruned, xh, yh), "sparsity": masks.sparsity(pruned)}
    tuned = copy.deepcopy(pruned).train()
    hold_zeros(tuned)
    finetune(tuned, streams["train"], TrainConfig(epochs=2, lr=1e-3, progress=False), desc=f"{name} fine-tune")
    masks.bake(tuned)
    tuned.eval()
    row["acc_after_finetune"] = D.accuracy(tuned, xh, yh)
    row["sparsity_after_finetune"] = masks.sparsity(tuned)
    art = sdk.deploy(tuned, "arm-int8", (xh[:1],), calibration=cal, output=root / name, progress=False,
                     overwrite=True, sparsity="auto")
    fp32 = sdk.deploy(tuned, "arm-fp32", (xh[:1],), output=root / f"{name}-fp32", progress=False, overwrite=True,
                      sparsity="auto")
    row["fp32_tflite_bytes"] = fp32.file("model.tflite").stat().st_size
    prof = art.profile
    row.update(tflite_bytes=art.file("model.tflite").stat().st_size,
               artifact_bytes=sum(f.stat().st_size for f in art.path.iterdir() if f.is_file()),
               macs=int(prof["totals"]["macs"]), latency_ms=prof["latency_ms"],
               artifact_accuracy=artifact_accuracy(art, xh, yh))
    return row


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    parser.add_argument("--only", nargs="*", help="pruners to run (default: all)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/edgepack_bench_pruners"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    xtr, ytr, xte, yte = split()
    val, test = (xte[:225], yte[:225]), (xte[225:], yte[225:])
    train = list(make_loader(xtr, ytr, batch_size=64, seed=0))
    streams = {"train": train, "val": [val]}
    cal = [xtr[i:i + 32] for i in range(0, 320, 32)]
    torch.manual_seed(0)
    base = D.train(make("lenet", randomize_bn=False)[0].train(), xtr, ytr, epochs=5, progress=False).eval()
    dense = measure_dense(base, cal, test, args.workdir)
    rows = []
    for name, cfg in PRUNERS:
        if args.only and name not in args.only:
            continue
        try:
            rows.append(measure(name, base, cfg, streams, cal, test, args.workdir))
        except Exception as exc:          # a benchmark reports a method that fails, it does not stop
            rows.append({"method": name, "config": cfg, "error": f"{type(exc).__name__}: {exc}"[:500]})
        print(json.dumps(rows[-1]), flush=True)
    if args.only and args.out and args.out.exists():     # refresh those rows of an earlier full run
        fresh = {r["method"]: r for r in rows}
        rows = [fresh.pop(r["method"], r) for r in json.loads(args.out.read_text())["pruners"]] + list(fresh.values())
    previous = json.loads(args.out.read_text()) if args.only and args.out and args.out.exists() else {}
    resnet = resnet_latency(args.workdir) if not args.only or "resnet18" in args.only else previous.get("resnet18")
    result = {"benchmark": "pruners", "machine": machine(), "model": "digits LeNet (16/32/64)",
              "test_images": len(test[0]), "dense": dense, "pruners": rows, "resnet18": resnet}
    print(table(result))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return result


STRUCTURED = [("filter-l1", {"ratio": RATIO}), ("apoz", {"ratio": RATIO, "finetune_steps": 0}),
              ("taylor", {"ratio": RATIO, "finetune_steps": 0})]


def resnet_latency(root: Path, repeats: int = 40) -> dict:
    """ResNet-18 (CIFAR, 32×32, random weights; the zoo's) dense and with half the channels removed by
    each structured pruner, arm-int8 on the host runtime (1 thread): MACs and latency, the pruned model
    timed alternately with the dense one; medians."""
    import statistics

    model, x = make("resnet18")
    gen = torch.Generator().manual_seed(0)
    data = [(torch.randn(8, *x.shape[1:], generator=gen), torch.randint(0, 10, (8,), generator=gen))
            for _ in range(4)]
    cal = [b[0] for b in data]
    dense = sdk.deploy(model, "arm-int8", (x,), calibration=cal, output=root / "r18-dense", progress=False,
                       overwrite=True)
    out = {"dense": {"macs": int(dense.profile["totals"]["macs"]),
                     "tflite_bytes": dense.file("model.tflite").stat().st_size}}
    run_dense = dense.session("host")
    for name, cfg in STRUCTURED:
        small = sdk.compress(model, {"stages": [{"method": name, "config": cfg}]}, data=data, progress=False)
        art = sdk.deploy(small, "arm-int8", (x,), calibration=cal, output=root / f"r18-{name}", progress=False,
                         overwrite=True)
        run = art.session("host")
        xs = [x.numpy()]
        run(xs), run_dense(xs)
        tp, td = [], []
        for _ in range(repeats):
            t0 = time.perf_counter()
            run(xs)
            tp.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            run_dense(xs)
            td.append(time.perf_counter() - t0)
        out[name] = {"config": cfg, "macs": int(art.profile["totals"]["macs"]),
                     "tflite_bytes": art.file("model.tflite").stat().st_size,
                     "latency_ms": statistics.median(tp) * 1e3, "dense_latency_ms": statistics.median(td) * 1e3,
                     "latency_ratio": statistics.median(tp) / statistics.median(td)}
        print(json.dumps({name: out[name]}), flush=True)
    return out


def measure_dense(model, cal, test, root: Path) -> dict:
    xh, yh = test
    art = sdk.deploy(model, "arm-int8", (xh[:1],), calibration=cal, output=root / "dense", progress=False,
                     overwrite=True)
    fp32 = sdk.deploy(model, "arm-fp32", (xh[:1],), output=root / "dense-fp32", progress=False, overwrite=True)
    return {"accuracy": D.accuracy(model, xh, yh), "tflite_bytes": art.file("model.tflite").stat().st_size,
            "fp32_tflite_bytes": fp32.file("model.tflite").stat().st_size,
            "macs": int(art.profile["totals"]["macs"]), "latency_ms": art.profile["latency_ms"],
            "artifact_accuracy": artifact_accuracy(art, xh, yh)}


def _ms(latency: dict) -> str:
    """deploy's median latency on the default runner (``profile.json`` ``latency_ms``)."""
    return f"{float(latency['host']):.3f}" if latency.get("host") is not None else ""


def table(result: dict) -> str:
    d = result["dense"]
    lines = ["| pruner | zeros / channels | accuracy after method → after fine-tune | int8 artifact accuracy | "
             "int8 / fp32 .tflite bytes | MACs | LiteRT int8 ms |", "|---|---|---|---|---|---|---|",
             f"| (dense) | — | {d['accuracy']:.3f} | {d['artifact_accuracy']:.3f} | {d['tflite_bytes']} / "
             f"{d['fp32_tflite_bytes']} | {d['macs']} | {_ms(d['latency_ms'])} |"]
    for r in result["pruners"]:
        if "error" in r:
            lines.append(f"| `{r['method']}` | failed: {r['error'][:80]} | | | | | |")
            continue
        what = f"{r['sparsity_after_finetune']:.3f} zeros" + (f", MACs −{1 - r['macs'] / d['macs']:.0%}"
                                                              if r["macs"] < d["macs"] else "")
        lines.append(f"| `{r['method']}` | {what} | {r['acc_after_method']:.3f} → {r['acc_after_finetune']:.3f} | "
                     f"{r['artifact_accuracy']:.3f} | {r['tflite_bytes']} / {r['fp32_tflite_bytes']} | {r['macs']} | "
                     f"{_ms(r['latency_ms'])} |")
    r18 = result.get("resnet18")
    if r18:
        lines += ["", "| ResNet-18 (32×32), half the channels | MACs | int8 .tflite bytes | LiteRT int8 latency / dense |",
                  "|---|---|---|---|", f"| (dense) | {r18['dense']['macs']} | {r18['dense']['tflite_bytes']} | 1 |"]
        lines += [f"| `{k}` | {v['macs']} | {v['tflite_bytes']} | {v['latency_ratio']:.2f} ({v['latency_ms']:.2f} vs "
                  f"{v['dense_latency_ms']:.2f} ms) |" for k, v in r18.items() if k != "dense"]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
