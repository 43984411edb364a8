"""scikit-learn's digits as the real data set of examples: load, train, evaluate."""

from __future__ import annotations

import numpy as np
import torch


def load(test_size: float = 0.25, seed: int = 0):
    """``(x_train, y_train, x_test, y_test)``: 1×8×8 float images in [0, 1] and int64 labels."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = (d.images / 16.0).astype(np.float32)[:, None]
    xtr, xte, ytr, yte = train_test_split(x, d.target, test_size=test_size, random_state=seed, stratify=d.target)
    return (torch.from_numpy(xtr), torch.from_numpy(ytr).long(), torch.from_numpy(xte), torch.from_numpy(yte).long())


def train(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, *, epochs: int = 30, lr: float = 3e-3,
          batch_size: int = 64, seed: int = 0, progress: bool = True) -> torch.nn.Module:
    """Cross-entropy training with the SDK's trainer (seeded, with a progress bar)."""
    from sdk.trainer import TrainConfig, fit, make_loader

    loader = make_loader(x, y, batch_size=batch_size, seed=seed)
    fit(model, loader, lambda m, b: torch.nn.functional.cross_entropy(m(b[0]), b[1]),
        TrainConfig(epochs=epochs, lr=lr, seed=seed, progress=progress), desc="train")
    return model.eval()


def accuracy(predict, x: torch.Tensor, y: torch.Tensor) -> float:
    """Top-1 accuracy of ``predict(batch) -> logits`` over the whole set."""
    with torch.no_grad():
        logits = predict(x)
    logits = torch.as_tensor(np.asarray(logits))
    return float((logits.argmax(-1) == y).float().mean())
