"""Five issue-19 methods on digits, each measured on its shipped artifact against the baseline it replaces.

Every figure comes from the deployed artifact (``sdk.deploy``): accuracy from ``art.run`` on the
450 held-out digits (``examples.digits.load``), bytes of its files, MACs / BOPs from
``art.profile``, and latency as the median of repeated runs on the host runtime, one thread,
timed round-robin with the baseline's artifact in the same process (other jobs on the machine
shift absolute times; the ratio is the figure).  Where training is involved the whole pipeline
runs once per seed (``--seeds``, default 0 1 2: model init, data order and the method's own
training) and the table shows mean ± half the range.

* ``low-rank`` — the digits LeNet (``examples.models``), trained 5 epochs, factorised at
  ``budget`` 0.5 and 0.3 of its MACs (objective ``output``), then 5 epochs of fine-tuning; the
  baseline is the dense LeNet fine-tuned the same 5 epochs.  Also at 0.5: the per-layer
  allocation (every layer at the largest rank within half its own MACs, by
  ``factorise_model``) against the whole-network allocation at the same or fewer MACs, both
  fine-tuned alike.
* ``zero-run`` — the zero-run test's recipe: LeNet-300-100 (64-300-100-10) trained 20 epochs,
  ``agp`` to 90 % zeros; the same pruned model is then packed by ``zero-run`` (4 bits:
  16 nonzero levels, ``weights.zr``) and by ``deep-compression`` (the zeros it finds already
  pruned, one round, 4-bit k-means — 16 shared nonzero values — no retraining, so no more
  training than zero-run: Huffman-coded ``weights.dc``).  Also: ``sdk.huffman``'s container of
  zero-run's own int8 tensors (the coders on identical values), and the decode time
  (``expand_model`` of each container into its skeleton).
* ``recu``, ``xnorpp`` (``scale`` factorised and channel), ``xnor``, ``bnn`` — the binary
  tests' digits CNN (width 16, two 16→16 binary convs and a 16→32 stride-2 one), 3 epochs at
  lr 3e-3 each, deployed to ``binary-popcount``: ``weights.bin`` bytes, BOPs, popcount-runner
  latency (batch 1) against xnor's artifact.
* ``incremental`` — the incremental test's MLP (64-128-64-10, float 15 epochs), every layer on a
  uniform 4-bit, uniform 3-bit and pow2 5-bit grid: 3 freezing steps × 2 epochs at lr 3e-4;
  the baseline trains the float net the same 6 epochs at the same lr, then rounds every weight
  to the same grid at once (``schedule: [1.0]``).  Both ship to ``arm-int8`` (4-bit uniform
  as packed INT4); the float net's plain int8 PTQ artifact is the reference row.

Usage: ``python benchmarks/bench_seed_methods.py [--out FILE] [--only SECTION ...] [--seeds ...]``
(sections: ``low-rank``, ``zero-run``, ``binary``, ``incremental``); prints JSON rows as they come
and the markdown tables at the end; ``--only`` with an existing ``--out`` refreshes those sections.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import sdk  # noqa: E402
from examples import digits as D  # noqa: E402
from examples.models import make  # noqa: E402
from sdk.trainer import TrainConfig, finetune, make_loader  # noqa: E402

from hostinfo import machine  # noqa: E402

SECTIONS = ("low-rank", "zero-run", "binary", "incremental")
AGAIN = "baseline, timed again"       # the baseline artifact reopened: the latency ratios' noise floor
REPEATS = 200          # latency samples per artifact
INNER = 5              # runs per sample (one run of these models is tens of µs)


# --------------------------------------------------------------------------- shared measures


def spread(values) -> dict:
    """``{"mean", "half_range", "values"}`` of per-seed figures."""
    v = [float(x) for x in values]
    return {"mean": float(np.mean(v)), "half_range": (max(v) - min(v)) / 2, "values": v}


def accuracy(art, x, y) -> float:
    """Top-1 of the artifact over ``x``, in calls of its deployed batch size."""
    b = art.manifest["inputs"][0]["shape"][0]
    out = np.concatenate([art.run(x[i:i + b])[0] for i in range(0, len(x) - len(x) % b, b)])
    return float((out.argmax(1) == y[:len(out)].numpy()).mean())


def file_bytes(art, name: str | None = None) -> int:
    """Bytes of one file of the artifact, or of all its files."""
    if name is not None:
        return art.file(name).stat().st_size
    return sum(f.stat().st_size for f in art.path.iterdir() if f.is_file())


def latencies(arts: dict, x: torch.Tensor, baseline: str, repeats: int = REPEATS, inner: int = INNER) -> dict:
    """Median ms per call of each artifact's host session on ``x``, the artifacts timed round-robin
    (each sample: ``inner`` calls of one artifact, then the next; the order rotates every round).
    The ``baseline`` artifact is also reopened and timed as one more entry, ``AGAIN``: its ratio to
    the baseline is the noise floor of the ratios (identical artifacts measured 0.93-1.06 here)."""
    arts = {**arts, AGAIN: sdk.load(arts[baseline].path)}
    runs = {k: a.session("host") for k, a in arts.items()}
    xs = [x.numpy()]
    for run in runs.values():        # load, warm caches
        run(xs), run(xs)
    times = {k: [] for k in runs}
    order = list(runs)
    for i in range(repeats):
        for k in order[i % len(order):] + order[:i % len(order)]:
            run = runs[k]
            t0 = time.perf_counter()
            for _ in range(inner):
                run(xs)
            times[k].append((time.perf_counter() - t0) / inner)
    return {k: statistics.median(t) * 1e3 for k, t in times.items()}


def profile_total(art, key: str) -> int:
    return int(art.profile["totals"][key])


def calibration(x):
    return [x[i:i + 32] for i in range(0, 320, 32)]


# --------------------------------------------------------------------------- low-rank


def lenet(seed: int, xtr, ytr):
    torch.manual_seed(seed)
    return D.train(make("lenet", randomize_bn=False)[0].train(), xtr, ytr, epochs=5, seed=seed, progress=False)


def graph_macs(model, x) -> int:
    from sdk.graph import capture, macs

    g = capture(model, (x,))
    return sum(macs(g, n) for n in g.nodes)


def per_layer_ranks(model, fraction: float) -> dict:
    """Every conv / linear at the largest rank whose two factors cost at most ``fraction`` of its own
    MACs (``r·(m + n) ≤ fraction·m·n``), the layer-by-layer allocation."""
    ranks = {}
    for name, m in model.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)) and getattr(m, "groups", 1) == 1:
            rows, cols = m.weight.shape[0], m.weight[0].numel()
            fit = [r for r in range(1, min(rows, cols)) if r * (rows + cols) <= fraction * rows * cols]
            if fit:
                ranks[name] = max(fit)
    return ranks


def bench_low_rank(seeds, root: Path) -> dict:
    from plugins.prune.low_rank import ATTR, LowRankPruner, factorise_model

    xtr, ytr, xte, yte = D.load()
    cal = calibration(xtr)
    tune = TrainConfig(epochs=5, lr=1e-3, progress=False)
    arms = ("dense", "low-rank 0.5", "low-rank 0.3", "per-layer 0.5", "whole-network = per-layer MACs")
    rows, null = {a: [] for a in arms}, []
    for seed in seeds:
        data = list(make_loader(xtr, ytr, batch_size=64, seed=seed))
        base = lenet(seed, xtr, ytr)
        models, before = {"dense": copy.deepcopy(base)}, {}
        for budget in (0.5, 0.3):
            m = LowRankPruner(budget=budget, progress=False).apply(copy.deepcopy(base), data)
            models[f"low-rank {budget}"] = m
        uniform = factorise_model(copy.deepcopy(base), per_layer_ranks(base, 0.5)).eval()
        macs = graph_macs(uniform, xte[:1])
        total = getattr(models["low-rank 0.5"], ATTR)["macs_before"]
        models["per-layer 0.5"] = uniform
        models["whole-network = per-layer MACs"] = LowRankPruner(budget=macs / total, progress=False).apply(
            copy.deepcopy(base), data)
        for name, m in models.items():
            before[name] = D.accuracy(m.eval(), xte, yte)
            finetune(m.train(), data, dataclasses.replace(tune, seed=seed), desc=f"{name} fine-tune")
            m.eval()
        arts = {name: sdk.deploy(m, "arm-int8", (xte[:1],), calibration=cal, output=root / f"lr-{seed}-{i}",
                                 progress=False, overwrite=True) for i, (name, m) in enumerate(models.items())}
        lat = latencies(arts, xte[:1], "dense")
        null.append(lat[AGAIN] / lat["dense"])
        for name, art in arts.items():
            rec = getattr(models[name], ATTR, None)
            row = {"seed": seed, "acc_before_finetune": before[name],
                   "torch_accuracy": D.accuracy(models[name], xte, yte),
                   "artifact_accuracy": accuracy(art, xte, yte), "tflite_bytes": file_bytes(art, "model.tflite"),
                   "artifact_bytes": file_bytes(art), "macs": profile_total(art, "macs"),
                   "latency_ms": lat[name], "latency_ratio": lat[name] / lat["dense"],
                   "ranks": rec["ranks"] if rec else (per_layer_ranks(base, 0.5) if name.startswith("per") else {})}
            rows[name].append(row)
            print(json.dumps({"low-rank": name, **row}), flush=True)
    return {"model": "digits LeNet (16/32/64), 5 epochs; every arm then fine-tuned 5 epochs, lr 1e-3",
            "arms": {name: summarise(r) for name, r in rows.items()}, "latency_null_ratio": spread(null)}


def summarise(rows: list[dict]) -> dict:
    """Per-seed rows → spread of every numeric field (integers equal over seeds stay integers)."""
    out = {"per_seed": rows}
    for k, v in rows[0].items():
        if k == "seed" or not isinstance(v, (int, float)):
            continue
        vals = [r[k] for r in rows]
        out[k] = vals[0] if isinstance(v, int) and len(set(vals)) == 1 else spread(vals)
    return out


# --------------------------------------------------------------------------- zero-run


def lenet_300_100(seed: int):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(),
                         nn.Linear(100, 10))


def bench_zero_run(seeds, root: Path) -> dict:
    from sdk import huffman as H
    from sdk import zero_run as Z
    from sdk.weight_container import int8_weights

    xtr, ytr, xte, yte = D.load()
    cal = [xtr[i:i + 32] for i in range(0, 256, 32)]
    rows = []
    for seed in seeds:
        train = [(xtr[i:i + 64], ytr[i:i + 64]) for i in range(0, len(xtr), 64)]
        dense = lenet_300_100(seed)
        finetune(dense, train, TrainConfig(epochs=20, lr=1e-3, seed=seed, progress=False))
        agp = {"final_sparsity": 0.9, "pruning_steps": 8, "frequency": 20, "epochs": 8, "lr": 0.003, "seed": seed,
               "progress": False}
        pruned = sdk.compress(dense, {"stages": [{"method": "agp", "config": agp}]}, data=train, progress=False)
        stages = {"int8": None,
                  "zero-run": {"method": "zero-run", "config": {"bits": 4}},
                  "deep-compression": {"method": "deep-compression",
                                       "config": {"sparsity": 0.9, "prune_steps": 1, "bits": 4, "quant_epochs": 0,
                                                  "progress": False}}}
        arts = {k: sdk.deploy(pruned, "arm-int8", (xte[:1],), calibration=cal, output=root / f"zr-{seed}-{k}",
                              recipe={"stages": [s]} if s else None, progress=False, overwrite=True)
                for k, s in stages.items()}
        zr, dc = arts["zero-run"].read_bytes("weights.zr"), arts["deep-compression"].read_bytes("weights.dc")
        zr_model = arts["zero-run"].file("model.tflite").read_bytes()
        dc_model = arts["deep-compression"].file("model.tflite").read_bytes()
        # sdk.huffman's container of the very int8 tensors weights.zr holds
        stored = int8_weights(zr_model)
        coded = Z.read_container(zr)[2]
        same = H.write_container([H.encode_tensor(Z.expand(zr)[t.name], t.name, t.offset, stored[t.name][3])
                                  for t in coded], zr_model)
        assert H.expand_model(zr_model, same) == zr_model
        skel = {"zr": Z.skeleton(zr_model, zr), "dc": H.skeleton(dc_model, dc)}
        decode = timed_pair(lambda: Z.expand_model(skel["zr"], zr), lambda: H.expand_model(skel["dc"], dc), 30)
        row = {"seed": seed, "torch_accuracy_pruned": D.accuracy(pruned, xte, yte),
               "int8_weights": sum(t.count for t in coded),
               "zr_nonzeros": sum(int(np.count_nonzero(v)) for v in Z.expand(zr).values()),
               "dc_nonzeros": sum(int(np.count_nonzero(v)) for v in H.expand(dc).values()),
               "weights_zr_bytes": len(zr), "weights_dc_bytes": len(dc), "huffman_of_zr_tensors_bytes": len(same),
               "zr_skeleton_bytes": len(skel["zr"]), "dc_skeleton_bytes": len(skel["dc"]),
               "zr_device_bytes": len(skel["zr"]) + len(zr), "dc_device_bytes": len(skel["dc"]) + len(dc),
               "decode_zr_ms": decode[0] * 1e3, "decode_dc_ms": decode[1] * 1e3,
               "decode_ratio_zr_over_dc": decode[0] / decode[1]}
        for k, art in arts.items():
            row[f"{k}_tflite_bytes"] = file_bytes(art, "model.tflite")
            row[f"{k}_artifact_bytes"] = file_bytes(art)
            row[f"{k}_artifact_accuracy"] = accuracy(art, xte, yte)
        rows.append(row)
        print(json.dumps({"zero-run": row}), flush=True)
    return {"model": "LeNet-300-100 (64-300-100-10) trained 20 epochs, agp to 90 % zeros (the zero-run test's recipe)",
            **summarise(rows)}


def timed_pair(a, b, repeats: int) -> tuple[float, float]:
    """Median seconds of ``a()`` and ``b()``, timed alternately."""
    a(), b()
    ta, tb = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        a()
        ta.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        b()
        tb.append(time.perf_counter() - t0)
    return statistics.median(ta), statistics.median(tb)


# --------------------------------------------------------------------------- binary


def binary_cnn(seed: int, width: int = 16, depth: int = 2):
    """The binary tests' digits CNN (``binary_helpers.cnn(width=16, depth=2)``), initialised from ``seed``:
    conv-BN-Hardtanh, ``depth`` width→width convs and a stride-2 one doubling the channels, a linear head."""
    torch.manual_seed(seed)
    layers = [nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width), nn.Hardtanh()]
    for _ in range(depth):
        layers += [nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.Hardtanh()]
    layers += [nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(2 * width),
               nn.Hardtanh(), nn.Flatten(), nn.Linear(2 * width * 16, 10)]
    return nn.Sequential(*layers)


BINARY = [("xnor", "xnor", {}), ("bnn", "bnn", {}), ("recu", "recu", {}),
          ("xnorpp factorised", "xnorpp", {"scale": "factorised"}), ("xnorpp channel", "xnorpp", {"scale": "channel"})]


def bench_binary(seeds, root: Path) -> dict:
    from sdk import plugins

    xtr, ytr, xte, yte = D.load()
    rows, null = {name: [] for name, _, _ in BINARY}, []
    for seed in seeds:
        data = list(make_loader(xtr, ytr, batch_size=64, seed=seed))
        arts = {}
        for name, method, opts in BINARY:
            cls = plugins.find_method(method)
            t0 = time.perf_counter()
            model = cls(epochs=3, lr=3e-3, seed=seed, progress=False, **opts).apply(binary_cnn(seed), data)
            seconds = time.perf_counter() - t0
            arts[name] = art = sdk.deploy(model, "binary-popcount", (xte[:1],), output=root / f"bin-{seed}-{method}"
                                          f"-{opts.get('scale', '')}", progress=False, overwrite=True)
            rows[name].append({"seed": seed, "train_s": seconds, "torch_accuracy": D.accuracy(model, xte, yte),
                               "artifact_accuracy": accuracy(art, xte, yte),
                               "weights_bin_bytes": file_bytes(art, "weights.bin"), "artifact_bytes": file_bytes(art),
                               "binary_layer_bytes": sum(r["bytes"] for r in art.profile["layers"]
                                                         if "Binary" in r["op"]),
                               "bops": profile_total(art, "bops"), "macs": profile_total(art, "macs")})
        lat = latencies(arts, xte[:1], "xnor")
        null.append(lat[AGAIN] / lat["xnor"])
        for name in arts:
            rows[name][-1].update(latency_ms=lat[name], latency_ratio=lat[name] / lat["xnor"])
            print(json.dumps({"binary": name, **rows[name][-1]}), flush=True)
    return {"model": "digits CNN, width 16 (3 binary convs), 3 epochs at lr 3e-3 each, batch 1 on binary-popcount",
            "arms": {name: summarise(r) for name, r in rows.items()}, "latency_null_ratio": spread(null)}


# --------------------------------------------------------------------------- incremental


def mlp(seed: int):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(),
                         nn.Linear(64, 10))


GRIDS = [("uniform", 4), ("uniform", 3), ("pow2", 5)]


def bench_incremental(seeds, root: Path) -> dict:
    from plugins.quantize.incremental import Incremental
    from sdk.masks import bake

    xtr, ytr, xte, yte = D.load()
    cal = calibration(xtr)
    rows: dict[str, list] = {"float int8 (PTQ)": []}
    null = []
    for seed in seeds:
        data = list(make_loader(xtr, ytr, batch_size=64, seed=seed))
        base = D.train(mlp(seed), xtr, ytr, epochs=15, seed=seed, progress=False)
        models = {"float int8 (PTQ)": base}
        for grid, bits in GRIDS:
            cfg = {"bits": bits, "grid": grid, "epochs_per_step": 2, "lr": 3e-4, "seed": seed,
                   "keep_first_last": False, "progress": False}
            models[f"incremental {grid} {bits}-bit"] = bake(Incremental(**cfg).apply(copy.deepcopy(base), data))
            longer = D.train(copy.deepcopy(base), xtr, ytr, epochs=6, lr=3e-4, seed=seed, progress=False)
            models[f"one-shot {grid} {bits}-bit"] = bake(Incremental(**{**cfg, "schedule": [1.0]}).apply(longer))
        arts = {k: sdk.deploy(m, "arm-int8", (xte[:1],), calibration=cal, output=root / f"inq-{seed}-{i}",
                              progress=False, overwrite=True) for i, (k, m) in enumerate(models.items())}
        lat = latencies(arts, xte[:1], "float int8 (PTQ)")
        null.append(lat[AGAIN] / lat["float int8 (PTQ)"])
        for k, art in arts.items():
            enc = art.manifest.get("encodings") or []
            row = {"seed": seed, "torch_accuracy": D.accuracy(models[k], xte, yte),
                   "artifact_accuracy": accuracy(art, xte, yte), "tflite_bytes": file_bytes(art, "model.tflite"),
                   "artifact_bytes": file_bytes(art), "macs": profile_total(art, "macs"),
                   "stored_bits": sorted({int(e.get("stored_bits", 8)) for e in enc}) or [8],
                   "latency_ms": lat[k], "latency_ratio_vs_ptq": lat[k] / lat["float int8 (PTQ)"]}
            rows.setdefault(k, []).append(row)
            print(json.dumps({"incremental": k, **row}), flush=True)
    return {"model": "MLP 64-128-64-10, float 15 epochs; incremental 3 steps × 2 epochs at lr 3e-4 vs the float "
                     "net trained 6 more epochs at lr 3e-4, then rounded once to the same grid",
            "arms": {k: summarise(r) for k, r in rows.items()}, "latency_null_ratio": spread(null)}


# --------------------------------------------------------------------------- tables


def pm(v, digits: int = 3) -> str:
    if isinstance(v, dict):
        return f"{v['mean']:.{digits}f} ± {v['half_range']:.{digits}f}"
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def ints(v) -> str:
    if isinstance(v, dict):
        return f"{v['mean']:.0f} ± {v['half_range']:.0f}"
    return str(v)


def table(result: dict) -> str:
    out = []
    lr = result.get("low-rank")
    if lr:
        out += ["**low-rank** — digits LeNet, arm-int8, vs the dense LeNet (latency side by side)", "",
                "| arm | accuracy before → after fine-tune (torch) | int8 artifact accuracy | model.tflite bytes | "
                "MACs | latency / dense |", "|---|---|---|---|---|---|"]
        for k, a in lr["arms"].items():
            out.append(f"| {k} | {pm(a['acc_before_finetune'])} → {pm(a['torch_accuracy'])} | "
                       f"{pm(a['artifact_accuracy'])} | {ints(a['tflite_bytes'])} | {ints(a['macs'])} | "
                       f"{pm(a['latency_ratio'], 2)} |")
        out.append(f"| (dense, timed again: noise floor) | | | | | {pm(lr['latency_null_ratio'], 2)} |")
    zr = result.get("zero-run")
    if zr:
        out += ["", "**zero-run** — LeNet-300-100, 90 % pruned (agp), same pruned model, arm-int8", "",
                "| container | weights file bytes | model.tflite bytes | a device needs (skeleton + weights file) | "
                "artifact accuracy | decode ms |", "|---|---|---|---|---|---|",
                f"| plain int8 (no container) | — | {ints(zr['int8_tflite_bytes'])} | "
                f"{ints(zr['int8_tflite_bytes'])} | {pm(zr['int8_artifact_accuracy'])} | — |",
                f"| zero-run 4-bit, weights.zr | {ints(zr['weights_zr_bytes'])} | "
                f"{ints(zr['zero-run_tflite_bytes'])} | {ints(zr['zr_device_bytes'])} | "
                f"{pm(zr['zero-run_artifact_accuracy'])} | {pm(zr['decode_zr_ms'], 2)} |",
                f"| deep-compression 4-bit k-means, weights.dc | {ints(zr['weights_dc_bytes'])} | "
                f"{ints(zr['deep-compression_tflite_bytes'])} | {ints(zr['dc_device_bytes'])} | "
                f"{pm(zr['deep-compression_artifact_accuracy'])} | {pm(zr['decode_dc_ms'], 2)} |",
                f"| Huffman (weights.dc format) of zero-run's own int8 tensors | "
                f"{ints(zr['huffman_of_zr_tensors_bytes'])} | — | — | — | — |"]
    b = result.get("binary")
    if b:
        out += ["", "**recu / xnorpp** — digits CNN on binary-popcount, vs xnor (latency side by side, batch 1)", "",
                "| method | artifact accuracy | weights.bin bytes (binary layers) | BOPs | latency / xnor |",
                "|---|---|---|---|---|"]
        for k, a in b["arms"].items():
            out.append(f"| {k} | {pm(a['artifact_accuracy'])} | {ints(a['weights_bin_bytes'])} "
                       f"({ints(a['binary_layer_bytes'])}) | {ints(a['bops'])} | "
                       f"{pm(a['latency_ratio'], 2)} |")
        out.append(f"| (xnor, timed again: noise floor) | | | | {pm(b['latency_null_ratio'], 2)} |")
    inc = result.get("incremental")
    if inc:
        out += ["", "**incremental** — MLP on arm-int8, vs one-shot rounding after the same training", "",
                "| arm | torch accuracy | int8 artifact accuracy | model.tflite bytes | stored bits | "
                "latency / float PTQ |", "|---|---|---|---|---|---|"]
        for k, a in inc["arms"].items():
            bits = "/".join(map(str, a["per_seed"][0]["stored_bits"]))
            out.append(f"| {k} | {pm(a['torch_accuracy'])} | {pm(a['artifact_accuracy'])} | {ints(a['tflite_bytes'])}"
                       f" | {bits} | {pm(a['latency_ratio_vs_ptq'], 2)} |")
        out.append(f"| (float PTQ, timed again: noise floor) | | | | | {pm(inc['latency_null_ratio'], 2)} |")
    return "\n".join(out)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    parser.add_argument("--only", nargs="*", choices=SECTIONS, help="sections to run (default: all)")
    parser.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/edgepack_bench_seed_methods"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    benches = {"low-rank": bench_low_rank, "zero-run": bench_zero_run, "binary": bench_binary,
               "incremental": bench_incremental}
    previous = json.loads(args.out.read_text()) if args.only and args.out and args.out.exists() else {}
    result = {"benchmark": "seed_methods", "machine": machine(), "threads": 1,
              "test_images": 450, "latency": f"median of {REPEATS} samples × {INNER} calls, round-robin, host runner"}
    started = time.perf_counter()
    for name, bench in benches.items():
        if args.only and name not in args.only:
            if name in previous:
                result[name] = previous[name]
            continue
        t0 = time.perf_counter()
        result[name] = bench(args.seeds, args.workdir)
        result[name].update(seeds=args.seeds, seconds=round(time.perf_counter() - t0, 1))
    result["seconds"] = round(time.perf_counter() - started, 1)
    print(table(result))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
