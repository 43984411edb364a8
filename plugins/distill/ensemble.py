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
The averaged distribution is handed to kd's loss (:func:`sdk.losses.kd_loss`) as
the pseudo-logits ``T · log p̄`` (``softmax(T · log p̄ / T) = p̄``), so the KL,
the T² scaling and the hard term are kd's own code.

``apply(student, teacher, data)`` needs ``teacher`` to be a list or tuple of at
least two models with the student's number of classes.  A single model is
refused with an :class:`~sdk.errors.InputError` that points at ``kd``: an
"ensemble" of one is kd.  In a recipe the teachers come from the caller,
``sdk.compress(model, recipe, data=..., teacher=[model_a, model_b])``; with no
teacher given the stage fails with an :class:`~sdk.errors.InputError` saying
so, instead of falling back to the uncompressed model as other distillers do
(that would be the one-member ensemble, i.e. kd under another name).

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
from sdk.config import check_choice, check_range
from sdk.errors import InputError
from sdk.losses import kd_loss
from sdk.trainer import TrainConfig, fit, split_batch

#: how a caller hands the teachers over
_HOW = "pass teacher=[model_a, model_b, ...] (sdk.compress(model, recipe, data=..., teacher=[...]))"


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
        raise InputError("ensemble teacher logits must be (teachers, batch, classes), "
                         f"got shape {tuple(stacked.shape)}")
    log_p = torch.log_softmax(stacked / temperature, dim=-1)
    # log-mean-exp keeps tiny probabilities finite where log(mean(p)) would underflow
    log_mean = torch.logsumexp(log_p, dim=0) - math.log(stacked.shape[0])
    return temperature * log_mean


class Ensemble(Distiller):
    """Response-based distillation from the averaged soft targets of several teachers."""

    name = "ensemble"
    version = "1.0"
    streams = ("train",)
    needs_teacher = True

    @dataclasses.dataclass(frozen=True)
    class Config(TrainConfig):
        """The soft-target objective; the training fields are :class:`TrainConfig`'s."""

        objective: str = "soft+hard"
        temperature: float = 4.0
        alpha: float = 0.9            # weight of the soft term in soft+hard

        def __post_init__(self):
            super().__post_init__()
            check_choice("ensemble", "objective", self.objective, ("soft", "soft+hard"))
            check_range("ensemble", "temperature", self.temperature, 0.0, lo_open=True)
            check_range("ensemble", "alpha", self.alpha, 0.0, 1.0)

    def loss(self, student: torch.Tensor, teacher: torch.Tensor | Sequence[torch.Tensor],
             target: torch.Tensor | None = None) -> torch.Tensor:
        """The loss for one batch: ``student`` logits ``(N, C)``, the teachers'
        logits as ``(K, N, C)`` or a list of K ``(N, C)`` tensors, labels ``(N,)``."""
        cfg = self.config
        pseudo = ensemble_logits(teacher, cfg.temperature)
        if pseudo.shape != student.shape:
            raise InputError(f"ensemble: teacher logits {tuple(pseudo.shape)} do not match the student's "
                             f"{tuple(student.shape)}; teachers and student must predict the same classes")
        return kd_loss(student, pseudo, target, objective=cfg.objective, temperature=cfg.temperature,
                       alpha=cfg.alpha, who="ensemble")

    def run(self, model, ctx):
        """``apply`` with the caller's teachers; the uncompressed original is no ensemble, so
        ``ctx.teacher is None`` is an :class:`InputError` saying what to pass."""
        if ctx.teacher is None:
            raise InputError(f"ensemble needs several teacher models and none was given: {_HOW}; "
                             "to distil from the uncompressed model alone use the 'kd' distiller")
        return self.apply(model, ctx.teacher, ctx.data.get("train"))

    def apply(self, student: torch.nn.Module, teacher, data) -> torch.nn.Module:
        teachers = _teacher_list(teacher)
        for t in teachers:
            t.eval()

        def step(model, batch):
            x, y = split_batch(batch)
            with torch.no_grad():
                logits = torch.stack([t(x) for t in teachers])
            return self.loss(model(x), logits, y)

        fit(student, data, step, self.config, desc="ensemble")
        return student


def _teacher_list(teacher) -> list[torch.nn.Module]:
    """The teachers as a list, or an :class:`InputError` saying what to pass."""
    if isinstance(teacher, torch.nn.Module):
        raise InputError(f"ensemble needs several teacher models, got a single {type(teacher).__name__}: {_HOW}; "
                         "to distil from one teacher use the 'kd' distiller")
    if not isinstance(teacher, (list, tuple)) or len(teacher) < 2:
        raise InputError(f"ensemble needs a list of at least two teacher models: {_HOW}")
    bad = [i for i, t in enumerate(teacher) if not isinstance(t, torch.nn.Module)]
    if bad:
        raise InputError(f"ensemble teacher entries {bad} are not torch.nn.Module: {_HOW}")
    return list(teacher)


@hookimpl
def register_distillers(register):
    register(Ensemble)
