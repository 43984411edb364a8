"""A small, deterministic training loop shared by distillation, QAT and
fine-tuning after pruning.

>>> import torch
>>> from sdk.trainer import TrainConfig, fit
>>> net = torch.nn.Linear(2, 1)
>>> data = [(torch.randn(8, 2), torch.randn(8, 1)) for _ in range(4)]
>>> losses = fit(net, data, lambda m, b: torch.nn.functional.mse_loss(m(b[0]), b[1]),
...              TrainConfig(epochs=2, progress=False))
>>> len(losses)
2
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Iterable

import torch
from tqdm.auto import tqdm

from .config import Config, check_choice, check_range
from .errors import InputError


@dataclasses.dataclass(frozen=True)
class TrainConfig(Config):
    epochs: int = 1
    lr: float = 1e-3
    optimizer: str = "adam"
    momentum: float = 0.9
    weight_decay: float = 0.0
    seed: int = 0
    max_steps: int | None = None      # stop after this many optimizer steps
    progress: bool = True

    def __post_init__(self):
        check_range("train", "epochs", self.epochs, 1)
        check_range("train", "lr", self.lr, 0.0, lo_open=True)
        check_choice("train", "optimizer", self.optimizer, ("adam", "adamw", "sgd"))


TrainConfig.type_tag = "train"


def make_optimizer(params: Iterable[torch.nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    return cls(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def fit(model: torch.nn.Module, data: Iterable, loss_fn: Callable[[torch.nn.Module, Any], torch.Tensor],
        cfg: TrainConfig | None = None, *, params: Iterable[torch.nn.Parameter] | None = None,
        after_step: Callable[[], None] | None = None, desc: str = "training") -> list[float]:
    """Minimise ``loss_fn(model, batch)`` over ``data`` for ``cfg.epochs``.

    ``data`` must be re-iterable (a list, a DataLoader).  Seeds torch with
    ``cfg.seed`` first, so two runs on the same data give the same weights.
    Returns the mean loss of each epoch.  Raises :class:`InputError` when the
    loss becomes NaN.
    """
    cfg = cfg or TrainConfig()
    if data is None:
        raise InputError(f"{desc} needs data: pass data= (a list of (x, y) batches or a DataLoader)")
    if not hasattr(data, "__len__"):
        data = list(data)
    if len(data) == 0:
        raise InputError(f"{desc} data is empty")
    torch.manual_seed(cfg.seed)
    opt = make_optimizer(model.parameters() if params is None else params, cfg)
    model.train()
    history, step = [], 0
    total = cfg.epochs * len(data) if cfg.max_steps is None else min(cfg.max_steps, cfg.epochs * len(data))
    with tqdm(total=total, desc=desc, unit="step", disable=not cfg.progress, leave=False) as bar:
        for _ in range(cfg.epochs):
            running, count = 0.0, 0
            for batch in data:
                loss = loss_fn(model, batch)
                if not torch.isfinite(loss):
                    raise InputError(f"{desc}: loss became {loss.item()} at step {step}; lower lr or check data")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if after_step is not None:
                    after_step()
                running += float(loss.detach())
                count += 1
                step += 1
                bar.update(1)
                bar.set_postfix(loss=f"{running / count:.4f}")
                if cfg.max_steps is not None and step >= cfg.max_steps:
                    break
            history.append(running / max(count, 1))
            if cfg.max_steps is not None and step >= cfg.max_steps:
                break
    model.eval()
    return history


def split_batch(batch: Any) -> tuple[Any, Any]:
    """``(inputs, target)`` from a batch: ``(x, y)``, ``[x, y]`` or ``x`` alone (target ``None``)."""
    if isinstance(batch, (tuple, list)):
        return batch[0], (batch[1] if len(batch) > 1 else None)
    return batch, None


def classification_loss(model: torch.nn.Module, batch: Any, *, who: str = "training",
                        hint: str = "") -> torch.Tensor:
    """Cross-entropy of ``model(x)`` against ``y`` for an ``(x, y)`` batch.

    Batches without labels raise :class:`InputError` naming ``who`` needs them
    (and ``hint``, another way out, when there is one).
    """
    x, y = split_batch(batch)
    if y is None:
        raise InputError(f"{who} needs labelled data: pass (x, y) batches as data=" + (f" ({hint})" if hint else ""))
    return torch.nn.functional.cross_entropy(model(x), y)


def finetune(model: torch.nn.Module, data: Any, *, epochs: int, lr: float, optimizer: str = "adam", seed: int = 0,
             progress: bool = True, desc: str = "fine-tune", penalty: Callable[[], torch.Tensor] | None = None
             ) -> list[float]:
    """Cross-entropy training on ``(x, y)`` batches, plus ``penalty()`` when given (pruners'
    fine-tuning and sparsity training)."""
    if data is None:
        raise InputError(f"{desc} needs labelled data: pass data= as (x, y) batches")

    def step(m: torch.nn.Module, batch: Any) -> torch.Tensor:
        loss = classification_loss(m, batch, who=desc)
        return loss + penalty() if penalty is not None else loss

    return fit(model, data, step, TrainConfig(epochs=epochs, lr=lr, optimizer=optimizer, seed=seed,
                                              progress=progress), desc=desc)


def make_loader(x: Any, y: Any = None, *, batch_size: int = 64, shuffle: bool = True, seed: int = 0):
    """A seeded ``DataLoader`` over arrays/tensors ``x`` (and labels ``y``)."""
    x = torch.as_tensor(x, dtype=torch.float32)
    tensors = [x] if y is None else [x, torch.as_tensor(y, dtype=torch.long)]
    ds = torch.utils.data.TensorDataset(*tensors)
    gen = torch.Generator().manual_seed(seed)
    return torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=shuffle, generator=gen)


def evaluate(model: torch.nn.Module, data: Iterable) -> float:
    """Top-1 accuracy of ``model`` on ``(x, y)`` batches."""
    model.eval()
    right = total = 0
    with torch.no_grad():
        for batch in data:
            x, y = split_batch(batch)
            right += int((model(x).argmax(-1) == y).sum())
            total += int(y.numel())
    return right / total if total else math.nan
