"""edgepack quickstart: train a CNN on digits, pack it for an ARM CPU in int8, prove it works.

    make demo        # or: .venv/bin/python examples/quickstart.py

1. train a LeNet-style CNN on scikit-learn's digits (float32),
2. deploy it to ``arm-fp32`` and ``arm-int8`` (LiteRT flatbuffers written by edgepack),
3. verify the int8 artifact: LiteRT vs the SDK's integer reference, and vs the float model,
4. print accuracy, size and latency side by side,
5. train a binary (XNOR-Net) version and pack it to bit-packed weights + C popcount kernels
   (``examples/binary_digits.py``).
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


def main(out_dir: Path) -> None:
    xtr, ytr, xte, yte = digits.load()
    torch.manual_seed(0)
    model = digits.train(LeNet(), xtr, ytr, epochs=15)
    float_acc = digits.accuracy(model, xte, yte)

    example = (xte[:1],)
    calibration = [xtr[i:i + 32] for i in range(0, 512, 32)]     # 512 representative training images
    arts = {t: sdk.deploy(model, target=t, example_inputs=example, calibration=calibration, output=out_dir / t)
            for t in ("arm-fp32", "arm-int8")}

    rep = arts["arm-int8"].verify(model, inputs=[xte[i:i + 1] for i in range(20)])
    print(rep, end="\n\n")

    def acc(art):
        logits = np.concatenate([art.run(xte[i:i + 1])[0] for i in range(len(xte))])
        return float((logits.argmax(1) == yte.numpy()).mean())

    print(f"{'':10s}{'top-1':>8s}{'bytes':>10s}{'latency':>12s}")
    print(f"{'torch':10s}{float_acc:8.4f}{'':>10s}{'':>12s}")
    for name, art in arts.items():
        size = art.manifest["files"]["model.tflite"]["bytes"]
        print(f"{name:10s}{acc(art):8.4f}{size:10d}{art.profile['latency_ms']['host']:10.3f}ms")
    print("\nbinary-popcount (XNOR-Net; first conv and last linear kept float):")
    from examples import binary_digits

    b = binary_digits.main(out_dir)
    print(f"\nartifacts in {out_dir}  (try: edgepack inspect {out_dir / 'arm-int8'})")
    if not (rep.passed and b["verify_passed"]):
        raise SystemExit(1)


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="edgepack-demo-")))
