"""``task-distill`` — match a pretrained teacher on unlabelled set A, then fine-tune on labelled set B.

Phase A (``distill_epochs``, ``distill_lr``), on the ``unlabeled`` stream
    The student minimises the cross-entropy between the teacher's and its own
    (temperature-softened) output distributions:

        L_A = −1/N · Σ_n Σ_c softmax(t_n / T)_c · log softmax(P(s_n) / T)_c

    ``t`` are the teacher's outputs, ``s`` the student's outputs (or, with
    ``feature_layer``, the flattened output of that student module) and ``P``
    a learned linear projection into the teacher's output space.  ``P`` is
    needed when the teacher has a different head (20 outputs for a 10-class
    student, another label set); ``projection: auto`` uses it when the sizes
    differ (or a feature layer is named) and the identity otherwise.  ``P`` is a
    training aid and is dropped afterwards: the student keeps its own keys.
    With a different head, name a ``feature_layer`` (e.g. the last hidden
    activation): projecting the student's own logits ties its head to the
    teacher's label set, which phase B must then undo (on digits with a
    20-way teacher this did worse than no phase A; a projected hidden layer
    did much better, see the tests).
Phase B (``epochs``, ``lr``), on the ``train`` stream
    Cross-entropy fine-tuning on the labels.

Both phases use the config's training fields (:class:`sdk.trainer.TrainConfig`);
phase A replaces ``epochs`` and ``lr`` with ``distill_epochs`` and ``distill_lr``.
The teacher is ``teacher=``, or the uncompressed original when none is given.

>>> import torch
>>> from plugins.distill.task_distill import TaskDistill
>>> round(float(TaskDistill().loss(torch.zeros(1, 2), torch.zeros(1, 2))), 4)   # ln 2
0.6931
"""

from __future__ import annotations

import dataclasses
from typing import Iterable

import torch
import torch.nn.functional as F

from sdk import hookimpl
from sdk.base import Distiller
from sdk.config import check_choice, check_range
from sdk.errors import ConfigError, InputError
from sdk.features import capture, named_module
from sdk.trainer import TrainConfig, fit, finetune, split_batch


class TaskDistill(Distiller):
    """Phase A: cross-entropy to the teacher's outputs on unlabelled data; phase B: fine-tune on labels."""

    name = "task-distill"
    version = "1.0"
    streams = ("train", "unlabeled")

    @dataclasses.dataclass(frozen=True)
    class Config(TrainConfig):
        """Phase A (teacher matching) and phase B (fine-tuning); ``epochs``/``lr`` (and the other
        :class:`TrainConfig` fields) are phase B's."""

        distill_epochs: int = 1
        distill_lr: float = 1e-3
        temperature: float = 1.0
        projection: str = "auto"      # auto | linear | identity
        feature_layer: str = ""       # student module whose output is projected ("": the outputs)

        def __post_init__(self):
            super().__post_init__()
            check_range("task-distill", "distill_epochs", self.distill_epochs, 1)
            check_range("task-distill", "distill_lr", self.distill_lr, 0.0, lo_open=True)
            check_range("task-distill", "temperature", self.temperature, 0.0, lo_open=True)
            check_choice("task-distill", "projection", self.projection, ("auto", "linear", "identity"))

    def loss(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        """``−mean_n Σ_c softmax(t/T)_c · log softmax(s/T)_c`` (``s`` already projected)."""
        temp = self.config.temperature
        return -(F.softmax(teacher / temp, -1) * F.log_softmax(student / temp, -1)).sum(-1).mean()

    def student_outputs(self, student: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        """What the projection sees: the student's outputs, or its ``feature_layer`` flattened."""
        layer = self.config.feature_layer
        if not layer:
            return student(x)
        _, (feature,) = capture(student, x, [layer], ["feature_layer"], stop=True)
        return feature.flatten(1)

    def make_projection(self, student_out: torch.Tensor, teacher_out: torch.Tensor) -> torch.nn.Module:
        """A freshly (seeded) initialised map from student outputs to the teacher's output space."""
        cfg, s, t = self.config, student_out.shape[1:], teacher_out.shape[1:]
        if cfg.projection == "identity" or (cfg.projection == "auto" and s == t and not cfg.feature_layer):
            if s != t:
                raise ConfigError(f"task-distill projection='identity' needs equal output sizes, got student "
                                  f"{tuple(s)} and teacher {tuple(t)}; use projection='auto'")
            return torch.nn.Identity()
        torch.manual_seed(cfg.seed)
        return torch.nn.Linear(student_out[0].numel(), teacher_out[0].numel())

    def match_teacher(self, student: torch.nn.Module, teacher: torch.nn.Module, unlabeled: Iterable) -> torch.nn.Module:
        """Phase A on ``unlabeled`` (batches ``x``, ``(x,)`` or ``(x, y)``, ``y`` ignored); returns the
        projection it trained (the student is changed in place)."""
        cfg = self.config
        data = unlabeled if hasattr(unlabeled, "__len__") else list(unlabeled)
        if len(data) == 0:
            raise InputError("task-distill: the 'unlabeled' stream is empty")
        teacher.eval()
        student.eval()    # probing must not move batch-norm statistics
        x0 = split_batch(next(iter(data)))[0]
        with torch.no_grad():
            projection = self.make_projection(self.student_outputs(student, x0), teacher(x0))

        def step(_, batch):
            x, _ = split_batch(batch)
            with torch.no_grad():
                t = teacher(x)
            return self.loss(projection(self.student_outputs(student, x)), t)

        pair = torch.nn.ModuleList([student, projection])
        fit(pair, data, step, cfg.training(epochs=cfg.distill_epochs, lr=cfg.distill_lr),
            desc="task-distill A", subject=student)
        return projection

    def run(self, model, ctx):
        teacher = ctx.teacher if ctx.teacher is not None else ctx.original
        return self.apply(model, teacher, ctx.stream("train", who="task-distill"),
                          unlabeled=ctx.stream("unlabeled", who="task-distill"))

    def apply(self, student: torch.nn.Module, teacher, data, unlabeled: Iterable | None = None) -> torch.nn.Module:
        if not isinstance(teacher, torch.nn.Module):
            raise InputError("task-distill needs a teacher model: sdk.compress(model, recipe, data=..., teacher=...)")
        if unlabeled is None:
            raise InputError("task-distill needs unlabelled data: apply(student, teacher, train, unlabeled=...) or "
                             "sdk.compress(..., data={'train': ..., 'unlabeled': ...})")
        if self.config.feature_layer:
            named_module(student, self.config.feature_layer, "feature_layer", allow_whole=False)
        self.match_teacher(student, teacher, unlabeled)             # the projection is dropped here
        finetune(student, data, self.config, desc="task-distill B")
        return student


@hookimpl
def register_distillers(register):
    register(TaskDistill)
