"""Deep Compression (Han, Mao & Dally 2016) on a LeNet-300-100-style MLP on digits, stage by stage.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_deep_compression.py [--bits 4 5 6] [--out ...]

The MLP 64-300-100-10 (LeNet-300-100 with the 8x8 digits as input) is trained
``--float-epochs`` on scikit-learn's digits (75 / 25 split, seed 0), then,
for each codebook width in ``--bits``, compressed and packed in one
``sdk.deploy(..., "arm-int8", recipe=deep-compression)``: pruning to 10 / 7 /
30 % of the three layers' weights in 3 prune + retrain rounds, k-means weight
sharing with centroid fine-tuning, Huffman coding in ``weights.dc``.

Per width the JSON records the paper's table: the bytes of the weights after
each stage (``fp32`` dense; ``pruned``: fp32 values with 5-bit relative
indices; ``quantized``: ``ceil(log2(K + 1))``-bit cluster indices and the
codebook; ``huffman``: ``weights.dc`` as shipped), the compression against fp32
and against the stage before, the accuracy of the torch model after each
stage and of the artifact (host runner, every test image), the container's
per-layer choices (gap width, codebook size, entries), the skeleton's bytes
(``model.tflite`` without the coded weights: what a device needs besides
``weights.dc``) and, as the baseline, the dense model's plain ``arm-int8``
``model.tflite`` bytes and accuracy.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
import sdk  # noqa: E402
from hostinfo import machine  # noqa: E402  (benchmarks/, on sys.path as this script's folder)
from sdk.trainer import TrainConfig, evaluate, finetune  # noqa: E402
from sdk.weight_sharing import container_stages  # noqa: E402

OUT = HERE / "results" / "deep_compression.json"
LAYER_SPARSITY = {"3": 0.93, "5": 0.7}      # layer "1" takes the default 0.9


def digits():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = (d.images / 16.0).astype(np.float32)[:, None]
    xtr, xte, ytr, yte = train_test_split(x, d.target, test_size=0.25, random_state=0, stratify=d.target)
    return torch.from_numpy(xtr), torch.from_numpy(ytr), torch.from_numpy(xte), torch.from_numpy(yte)


def lenet_300_100():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(),
                         nn.Linear(100, 10))


def artifact_accuracy(art, x, y) -> float:
    out = np.concatenate([art.run(x[i:i + 1])[0] for i in range(len(x))])
    return float((out.argmax(1) == y.numpy()).mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bits", type=int, nargs="*", default=[4, 5, 6])
    ap.add_argument("--float-epochs", type=int, default=30)
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args()
    torch.set_num_threads(1)
    started = time.perf_counter()
    xtr, ytr, xte, yte = digits()
    train = [(xtr[i:i + 64], ytr[i:i + 64].long()) for i in range(0, len(xtr), 64)]
    test = [(xte, yte.long())]
    calibration = [xtr[i:i + 32] for i in range(0, 256, 32)]
    model = lenet_300_100()
    finetune(model, train, TrainConfig(epochs=args.float_epochs, lr=1e-3, progress=False))
    dense_acc = evaluate(model, test)
    base = sdk.deploy(model, "arm-int8", (xte[:1],), calibration=calibration, progress=False)
    result = {"benchmark": "deep-compression on LeNet-300-100 (64-300-100-10), digits, arm-int8",
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), **machine(),
              "float_epochs": args.float_epochs, "dense_accuracy": dense_acc,
              "baseline_int8": {"model_tflite_bytes": base.manifest["files"]["model.tflite"]["bytes"],
                                "accuracy": artifact_accuracy(base, xte, yte)},
              "runs": []}
    for bits in args.bits:
        t0 = time.perf_counter()
        config = {"sparsity": 0.9, "layer_sparsity": LAYER_SPARSITY, "bits": bits, "prune_steps": 3, "epochs": 8,
                  "lr": 1e-3, "quant_epochs": 5, "quant_lr": 1e-4, "progress": False}
        art = sdk.deploy(model, "arm-int8", (xte[:1],), calibration=calibration,
                         recipe={"stages": [{"method": "deep-compression", "config": config}]},
                         data={"train": train, "val": test}, progress=False)
        acc = artifact_accuracy(art, xte, yte)
        torch_side = {r["stage"]: r for r in art.manifest["stages"][0]["stages"]}
        accuracy = {"fp32": torch_side["dense"]["accuracy"], "pruned": torch_side["pruned"]["accuracy"],
                    "quantized": torch_side["quantized"]["accuracy"], "huffman": acc}
        entry = art.manifest["weight_container"]
        rows = [{**r, "accuracy": accuracy[r["stage"]]} for r in container_stages(art.manifest)]
        result["runs"].append({"bits": bits, "config": config, "stages": rows,
                               "artifact_accuracy": acc, "accuracy_loss_points": round(100 * (dense_acc - acc), 2),
                               "weights_dc_bytes": entry["sizes"]["huffman"], "skeleton_bytes": entry["sizes"]["skeleton"],
                               "layers": entry["tensors"], "deploy_s": round(time.perf_counter() - t0, 1)})
        print(f"\n{bits}-bit codebooks (dense accuracy {dense_acc:.4f})")
        print(f"{'stage':<10} {'bytes':>8} {'x fp32':>7} {'x prev':>7} {'accuracy':>9}")
        for r in rows:
            print(f"{r['stage']:<10} {r['bytes']:>8} {r['vs_fp32']:>7} {r['vs_previous']:>7} {r['accuracy']:>9.4f}")
    result["total_s"] = round(time.perf_counter() - started, 1)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"\ntotal {result['total_s']} s; written: {args.out}")


if __name__ == "__main__":
    main()
