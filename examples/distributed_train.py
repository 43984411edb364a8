"""Data-parallel training with edgepack: the same script alone or under torchrun.

    .venv/bin/python examples/distributed_train.py                        # 1 process
    torchrun --standalone --nproc_per_node=2 examples/distributed_train.py   # 2 processes, same result

1. train an MLP teacher on scikit-learn's digits with ``sdk.trainer.fit`` (every rank
   takes its slice of each batch of 64; gradients are averaged over ranks),
2. distil a smaller student from it with a ``kd`` recipe and deploy it to ``arm-fp32``
   (``sdk.deploy``: every rank trains, rank 0 alone writes the artifact),
3. print, on rank 0 only, the loss curve (the whole batches' losses), the test accuracy
   (counted over all ranks' slices) and a checksum of the weights, which is the same
   for 1 and 2 processes up to float rounding.

Options: ``--epochs N``, ``--out DIR`` (default: a temporary directory).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import sdk  # noqa: E402
from examples import digits  # noqa: E402
from examples.models import MLP  # noqa: E402
from sdk import distributed  # noqa: E402
from sdk.trainer import TrainConfig, evaluate, fit, make_loader  # noqa: E402


def main(epochs: int = 10, out: Path | None = None) -> dict:
    xtr, ytr, xte, yte = digits.load()
    torch.manual_seed(0)
    teacher = MLP(hidden=(128, 64))
    loader = make_loader(xtr, ytr, batch_size=64, seed=0)
    losses = fit(teacher, loader, lambda m, b: torch.nn.functional.cross_entropy(m(b[0]), b[1]),
                 TrainConfig(epochs=epochs, lr=3e-3, seed=0), desc="teacher")
    test = [(xte[i:i + 100], yte[i:i + 100]) for i in range(0, len(xte), 100)]
    teacher_acc = evaluate(teacher, test)

    torch.manual_seed(1)
    student = MLP(hidden=(32,))
    recipe = {"stages": [{"method": "kd", "config": {"epochs": epochs, "lr": 3e-3, "temperature": 4.0}}]}
    out = out or Path(distributed.on_main(lambda: tempfile.mkdtemp(prefix="edgepack-ddp-")))   # one for all ranks
    art = sdk.deploy(student, "arm-fp32", (xte[:1],), recipe=recipe, data=loader, teacher=teacher,
                     output=out / "student-arm-fp32", overwrite=True)
    result = {"world": distributed.world_size(), "teacher_losses": [round(v, 5) for v in losses],
              "teacher_acc": teacher_acc, "checksum": float(sum(p.detach().double().sum() for p in teacher.parameters())),
              "artifact": str(art.path)}
    if distributed.is_main():
        print(f"processes: {result['world']}")
        print("teacher loss per epoch:", " ".join(f"{v:.4f}" for v in result["teacher_losses"]))
        print(f"teacher test accuracy: {teacher_acc:.4f}   weight checksum: {result['checksum']:.6f}")
        print(f"student artifact (written by rank 0): {art.path}")
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    main(args.epochs, args.out)
