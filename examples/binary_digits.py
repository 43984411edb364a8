"""Binary digits: train a CNN, binarize it with XNOR-Net, pack it as XNOR + popcount C, prove it works.

    .venv/bin/python examples/binary_digits.py [out_dir]

1. train a LeNet-style CNN (64-channel, so every binary layer packs whole
   64-bit words) on scikit-learn's digits, in float32;
2. binarize its inner conv and linear layer with the ``xnor`` recipe stage
   (``sdk.compress`` trains the binary network; the first conv and the last
   linear layer stay float);
3. deploy it to ``binary-popcount``: generated C + bit-packed weights, compiled
   here and called through ctypes;
4. verify: the compiled kernels' integer popcounts equal the numpy
   reference's bit for bit, outputs match the torch binary model;
5. report float vs binary accuracy, packed vs fp32 bytes of the binarized
   layers, and latency.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import sdk  # noqa: E402
from examples import digits  # noqa: E402
from examples.models import LeNet  # noqa: E402

RECIPE = {"stages": [{"method": "xnor", "config": {"epochs": 10, "lr": 3e-3, "progress": False}}]}


def main(out_dir: Path) -> dict:
    """Run the demo, writing the artifact to ``out_dir / "binary-popcount"``; returns the figures."""
    from sdk.trainer import make_loader
    from targets.binary_popcount import binary_layer_agreement

    threads = torch.get_num_threads()
    torch.set_num_threads(1)    # a model this small trains faster without OpenMP's hand-offs
    try:
        xtr, ytr, xte, yte = digits.load()
        torch.manual_seed(0)
        model = digits.train(LeNet(width=64), xtr, ytr, epochs=10, progress=False)
        binary = sdk.compress(model, RECIPE, data=list(make_loader(xtr, ytr, batch_size=64, seed=0)))
    finally:
        torch.set_num_threads(threads)
    art = sdk.deploy(binary, target="binary-popcount", example_inputs=(xte[:1],),
                     output=Path(out_dir) / "binary-popcount", progress=False)

    samples = [xte[i:i + 1] for i in range(len(xte))]
    rep = art.verify(binary, inputs=samples[:100])
    popcounts = binary_layer_agreement(art, [s.numpy() for s in samples[:100]])
    logits = np.concatenate([art.run(s)[0] for s in samples])
    rows = [r for r in art.profile["layers"] if "Binary" in r["op"]]
    result = {
        "float_accuracy": digits.accuracy(model, xte, yte),
        "binary_torch_accuracy": digits.accuracy(binary, xte, yte),
        "binary_artifact_accuracy": float((logits.argmax(1) == yte.numpy()).mean()),
        "top1_agreement": rep.top1_agreement["host"],
        "verify_passed": rep.passed,
        "popcount_mismatches": sum(r["mismatches"] for r in popcounts),
        "binary_layers": [r["module"] for r in rows],
        "binary_packed_bytes": sum(r["bytes"] for r in rows),
        "binary_fp32_bytes": sum(r["fp32_bytes"] for r in rows),
        "latency_ms": art.profile["latency_ms"].get("host"),
        "artifact": str(art.path),
    }
    result["size_ratio"] = result["binary_packed_bytes"] / result["binary_fp32_bytes"]

    print(rep, end="\n\n")
    print(f"top-1 on {len(xte)} test digits: float {result['float_accuracy']:.4f}, "
          f"xnor torch {result['binary_torch_accuracy']:.4f}, "
          f"xnor artifact {result['binary_artifact_accuracy']:.4f}")
    print(f"binarized layers {', '.join(result['binary_layers'])}: {result['binary_packed_bytes']} bytes packed "
          f"(weights + scales) vs {result['binary_fp32_bytes']} fp32 (1/{1 / result['size_ratio']:.1f})")
    print(f"popcount results differing from the reference: {result['popcount_mismatches']}")
    if result["latency_ms"] is not None:
        print(f"latency (host, 1 image): {result['latency_ms']:.4f} ms")
    print(f"artifact in {art.path}  (try: edgepack inspect {art.path})")
    return result


if __name__ == "__main__":
    out = main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="edgepack-binary-")))
    if not out["verify_passed"] or out["popcount_mismatches"]:
        raise SystemExit(1)
