"""Distillation losses that several distillers share.

:func:`soft_target_kl` is Hinton et al.'s soft term: the KL divergence from the
teacher's temperature-softened distribution to the student's, scaled by T² so
gradient magnitudes do not depend on T.  :func:`kd_loss` adds kd's other
objectives (``soft+hard``, ``logits-mse``) on top of it; ``kd`` uses it as is,
``fitnets`` for its second stage, ``ensemble`` with the ensemble's
pseudo-logits, ``dml`` takes the soft term at T = 1 as its mimicry loss.

>>> import math, torch
>>> t = torch.tensor([[math.log(3.0), 0.0]])          # teacher: p = (3/4, 1/4)
>>> s = torch.zeros(1, 2)                              # student: q = (1/2, 1/2)
>>> round(float(soft_target_kl(s, t)), 4)              # 3/4·ln(3/2) + 1/4·ln(1/2)
0.1308
>>> float(soft_target_kl(t, t, temperature=4.0))
0.0
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .errors import ConfigError, InputError

#: the objectives :func:`kd_loss` knows
OBJECTIVES = ("soft", "soft+hard", "logits-mse")


def soft_target_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``T² · KL(softmax(teacher/T) ‖ softmax(student/T))`` over the last dimension, averaged over
    the batch (the first dimension).  Gradients flow into both arguments; detach ``teacher``
    where it is a target.
    """
    t = temperature
    return F.kl_div(F.log_softmax(student / t, -1), F.log_softmax(teacher / t, -1), reduction="batchmean",
                    log_target=True) * (t * t)


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, target: torch.Tensor | None = None, *,
            objective: str = "soft+hard", temperature: float = 4.0, alpha: float = 0.9,
            who: str = "kd") -> torch.Tensor:
    """Knowledge-distillation loss of one batch of student and teacher logits ``(N, C)``.

    ``soft``: :func:`soft_target_kl` at ``temperature``; ``soft+hard``:
    ``alpha · soft + (1 − alpha) · CE(student, target)`` with the hard term at T = 1
    (:class:`InputError` naming ``who`` when ``target`` is ``None``); ``logits-mse``:
    ``mean((student − teacher)²)``.

    >>> z = torch.zeros(2, 3)
    >>> round(float(kd_loss(z, z, torch.tensor([0, 1]), alpha=0.5)), 4)     # soft term 0, CE = ln 3
    0.5493
    """
    if objective == "logits-mse":
        return F.mse_loss(student, teacher)
    soft = soft_target_kl(student, teacher, temperature)
    if objective == "soft":
        return soft
    if objective != "soft+hard":
        raise ConfigError(f"{who}: unknown objective {objective!r}; choose one of {', '.join(OBJECTIVES)}")
    if target is None:
        raise InputError(f"{who} objective 'soft+hard' needs labels: pass (x, y) batches, or use objective='soft'")
    return alpha * soft + (1.0 - alpha) * F.cross_entropy(student, target)


def response_step(teacher: torch.nn.Module, loss):
    """A :func:`sdk.trainer.fit` step for response-based distillation: the teacher's logits
    on ``x`` (no gradient; the teacher is put in eval mode) and ``loss(student_logits,
    teacher_logits, y)`` (``y`` None for unlabelled batches)."""
    from .trainer import split_batch

    teacher.eval()

    def step(model: torch.nn.Module, batch) -> torch.Tensor:
        x, y = split_batch(batch)
        with torch.no_grad():
            t = teacher(x)
        return loss(model(x), t, y)

    return step
