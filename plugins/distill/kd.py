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

The formulas live in :mod:`sdk.losses` (``ensemble``, ``fitnets`` and ``dml``
use them too).  The training fields (``epochs``, ``lr``, ``optimizer`` — a
registered optimizer — with ``optimizer_options``, ``seed``, ``max_steps``,
``progress``) are :class:`sdk.trainer.TrainConfig`'s.

>>> import torch
>>> from plugins.distill.kd import KD
>>> kd = KD(objective="logits-mse")
>>> float(kd.loss(torch.zeros(1, 3), torch.ones(1, 3)))
1.0
"""

from __future__ import annotations

import dataclasses

import torch

from sdk import hookimpl
from sdk.base import Distiller
from sdk.config import check_choice, check_range
from sdk.errors import InputError
from sdk.losses import OBJECTIVES, kd_loss, response_step
from sdk.trainer import TrainConfig, fit


class KD(Distiller):
    """Response-based distillation from one teacher's logits."""

    name = "kd"
    version = "1.0"
    streams = ("train",)

    @dataclasses.dataclass(frozen=True)
    class Config(TrainConfig):
        """kd's objective; the training fields (epochs, lr, optimizer, ...) are :class:`TrainConfig`'s."""

        objective: str = "soft+hard"
        temperature: float = 4.0
        alpha: float = 0.9            # weight of the soft term in soft+hard

        def __post_init__(self):
            super().__post_init__()
            check_choice("kd", "objective", self.objective, OBJECTIVES)
            check_range("kd", "temperature", self.temperature, 0.0, lo_open=True)
            check_range("kd", "alpha", self.alpha, 0.0, 1.0)

    def loss(self, student: torch.Tensor, teacher: torch.Tensor, target: torch.Tensor | None = None) -> torch.Tensor:
        """The distillation loss for one batch of student and teacher logits (:func:`sdk.losses.kd_loss`)."""
        cfg = self.config
        return kd_loss(student, teacher, target, objective=cfg.objective, temperature=cfg.temperature,
                       alpha=cfg.alpha, who="kd")

    def apply(self, student: torch.nn.Module, teacher, data) -> torch.nn.Module:
        if not isinstance(teacher, torch.nn.Module):
            raise InputError("kd needs a teacher model: sdk.compress(model, recipe, data=..., teacher=big_model)")
        fit(student, data, response_step(teacher, self.loss), self.config, desc="kd")
        return student


@hookimpl
def register_distillers(register):
    register(KD)
