"""``kd`` — knowledge distillation with temperature-softened teacher targets.

Hinton, Vinyals & Dean, "Distilling the Knowledge in a Neural Network", 2015.
Three objectives (``objective``):

``soft``
    ``T² · KL(softmax(t/T) ‖ softmax(s/T))`` averaged over the batch.  The T²
    keeps gradient magnitudes independent of T, as the paper notes.
``soft+hard``
    ``alpha · soft + (1 − alpha) · CE(s, y)``; the hard term uses T = 1 and
    the true labels.  Hinton's advice: a small weight on the hard term.
``logits-mse``
    ``mean((s − t)²)``: regress the logits directly (the T → ∞ limit).

>>> import torch
>>> from plugins.distill.kd import KD
>>> kd = KD(objective="logits-mse")
>>> float(kd.loss(torch.zeros(1, 3), torch.ones(1, 3)))
1.0
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from sdk import hookimpl
from sdk.base import Distiller
from sdk.config import Config, check_choice, check_range
from sdk.errors import InputError
from sdk.trainer import TrainConfig, fit, split_batch


class KD(Distiller):
    """Response-based distillation from one teacher's logits."""

    name = "kd"
    version = "1.0"

    @dataclasses.dataclass(frozen=True)
    class Config(Config):
        objective: str = "soft+hard"
        temperature: float = 4.0
        alpha: float = 0.9            # weight of the soft term in soft+hard
        epochs: int = 1
        lr: float = 1e-3
        optimizer: str = "adam"
        seed: int = 0
        progress: bool = True

        def __post_init__(self):
            check_choice("kd", "objective", self.objective, ("soft", "soft+hard", "logits-mse"))
            check_range("kd", "temperature", self.temperature, 0.0, lo_open=True)
            check_range("kd", "alpha", self.alpha, 0.0, 1.0)

    def loss(self, student: torch.Tensor, teacher: torch.Tensor, target: torch.Tensor | None = None) -> torch.Tensor:
        """The distillation loss for one batch of student and teacher logits."""
        cfg = self.config
        if cfg.objective == "logits-mse":
            return F.mse_loss(student, teacher)
        t = cfg.temperature
        soft = F.kl_div(F.log_softmax(student / t, -1), F.log_softmax(teacher / t, -1), reduction="batchmean",
                        log_target=True) * (t * t)
        if cfg.objective == "soft":
            return soft
        if target is None:
            raise InputError("kd objective 'soft+hard' needs labels: pass (x, y) batches, or use objective='soft'")
        return cfg.alpha * soft + (1.0 - cfg.alpha) * F.cross_entropy(student, target)

    def apply(self, student: torch.nn.Module, teacher, data) -> torch.nn.Module:
        if not isinstance(teacher, torch.nn.Module):
            raise InputError("kd needs a teacher model: sdk.compress(model, recipe, data=..., teacher=big_model)")
        teacher.eval()
        cfg = self.config

        def step(model, batch):
            x, y = split_batch(batch)
            with torch.no_grad():
                t = teacher(x)
            return self.loss(model(x), t, y)

        fit(student, data, step, TrainConfig(epochs=cfg.epochs, lr=cfg.lr, optimizer=cfg.optimizer, seed=cfg.seed,
                                             progress=cfg.progress), desc="kd")
        return student


@hookimpl
def register_distillers(register):
    register(KD)
