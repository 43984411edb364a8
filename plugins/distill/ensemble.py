"""``ensemble`` — distil an ensemble of teachers into one student.

Buciluǎ, Caruana & Niculescu-Mizil, "Model Compression", KDD 2006, and
Hinton, Vinyals & Dean, "Distilling the Knowledge in a Neural Network", 2015
(§ on distilling an ensemble into a single model).

An ensemble predicts better than any of its members but costs K forward
passes.  The student learns the ensemble's *averaged* temperature-softened
distribution, so one model carries the ensemble's knowledge:

    p̄ = (1/K) Σ_k softmax(t_k / T)
    soft = T² · KL(p̄ ‖ softmax(s / T))            (mean over the batch)
    loss = soft                                   (objective "soft")
    loss = alpha · soft + (1 − alpha) · CE(s, y)  (objective "soft+hard", CE at T = 1)

Probabilities are averaged, not logits: averaging logits would be a
geometric mean of the members' distributions, which is a different target.
The averaged distribution is handed to :class:`plugins.distill.kd.KD` as the
pseudo-logits ``T · log p̄`` (``softmax(T · log p̄ / T) = p̄``), so the KL, the
T² scaling and the hard term are kd's own code.

``apply(student, teacher, data)`` needs ``teacher`` to be a list or tuple of at
least two models with the student's number of classes.  A single model is
refused with an :class:`~sdk.errors.InputError` that points at ``kd``: an
"ensemble" of one is kd, and ``sdk.compress`` passes the uncompressed model
as the teacher when none is given, which is never what this method wants.

>>> import torch
>>> from plugins.distill.ensemble import Ensemble
>>> same = [torch.tensor([[2.0, 0.0]]), torch.tensor([[2.0, 0.0]])]
>>> float(Ensemble(objective="soft").loss(torch.tensor([[2.0, 0.0]]), same))   # student = every teacher
0.0
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import torch

from sdk import hookimpl
from sdk.base import Distiller
from sdk.config import Config, check_choice, check_range
from sdk.errors import InputError
from sdk.trainer import TrainConfig, fit, split_batch

from .kd import KD


def ensemble_logits(teacher_logits: torch.Tensor | Sequence[torch.Tensor], temperature: float) -> torch.Tensor:
    """Pseudo-logits ``T · log((1/K) Σ_k softmax(t_k / T))`` of K teachers' logits.

    ``teacher_logits`` is a ``(K, N, C)`` tensor or a sequence of K ``(N, C)``
    tensors.  Dividing the result by ``T`` and taking a softmax gives back the
    averaged distribution exactly, which is what kd's soft term does with it.

    >>> z = ensemble_logits([torch.tensor([[0.0, 0.0]]), torch.tensor([[0.0, 0.0]])], 2.0)
    >>> torch.softmax(z / 2.0, -1).tolist()
    [[0.5, 0.5]]
    """
    stacked = torch.stack(list(teacher_logits)) if not isinstance(teacher_logits, torch.Tensor) else teacher_logits
    if stacked.dim() != 3:
        raise InputError(f"ensemble teacher logits must be (teachers, batch, classes), got shape {tuple(stacked.shape)}")
    log_p = torch.log_softmax(stacked / temperature, dim=-1)
    # log-mean-exp keeps tiny probabilities finite where log(mean(p)) would underflow
    log_mean = torch.logsumexp(log_p, dim=0) - math.log(stacked.shape[0])
    return temperature * log_mean


class Ensemble(Distiller):
    """Response-based distillation from the averaged soft targets of several teachers."""

    name = "ensemble"
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
            check_choice("ensemble", "objective", self.objective, ("soft", "soft+hard"))
            check_range("ensemble", "temperature", self.temperature, 0.0, lo_open=True)
            check_range("ensemble", "alpha", self.alpha, 0.0, 1.0)
            check_range("ensemble", "epochs", self.epochs, 1)
            check_range("ensemble", "lr", self.lr, 0.0, lo_open=True)

    def _kd(self) -> KD:
        cfg = self.config
        return KD(objective=cfg.objective, temperature=cfg.temperature, alpha=cfg.alpha, progress=False)

    def loss(self, student: torch.Tensor, teacher: torch.Tensor | Sequence[torch.Tensor],
             target: torch.Tensor | None = None) -> torch.Tensor:
        """The loss for one batch: ``student`` logits ``(N, C)``, the teachers'
        logits as ``(K, N, C)`` or a list of K ``(N, C)`` tensors, labels ``(N,)``."""
        pseudo = ensemble_logits(teacher, self.config.temperature)
        if pseudo.shape != student.shape:
            raise InputError(f"ensemble: teacher logits {tuple(pseudo.shape)} do not match the student's "
                             f"{tuple(student.shape)}; teachers and student must predict the same classes")
        return self._kd().loss(student, pseudo, target)

    def apply(self, student: torch.nn.Module, teacher, data) -> torch.nn.Module:
        teachers = _teacher_list(teacher)
        for t in teachers:
            t.eval()
        cfg = self.config

        def step(model, batch):
            x, y = split_batch(batch)
            with torch.no_grad():
                logits = torch.stack([t(x) for t in teachers])
            return self.loss(model(x), logits, y)

        fit(student, data, step, TrainConfig(epochs=cfg.epochs, lr=cfg.lr, optimizer=cfg.optimizer, seed=cfg.seed,
                                             progress=cfg.progress), desc="ensemble")
        return student


def _teacher_list(teacher) -> list[torch.nn.Module]:
    """The teachers as a list, or an :class:`InputError` saying what to pass."""
    how = "pass teacher=[model_a, model_b, ...] (sdk.compress(model, recipe, data=..., teacher=[...]))"
    if isinstance(teacher, torch.nn.Module):
        raise InputError(f"ensemble needs several teacher models, got a single {type(teacher).__name__}: {how}; "
                         "to distil from one teacher use the 'kd' distiller")
    if not isinstance(teacher, (list, tuple)) or len(teacher) < 2:
        raise InputError(f"ensemble needs a list of at least two teacher models: {how}")
    bad = [i for i, t in enumerate(teacher) if not isinstance(t, torch.nn.Module)]
    if bad:
        raise InputError(f"ensemble teacher entries {bad} are not torch.nn.Module: {how}")
    return list(teacher)


@hookimpl
def register_distillers(register):
    register(Ensemble)
