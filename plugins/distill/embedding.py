"""``embedding`` — regress the student's embedding onto a frozen encoder's (the ViLD core).

Gu, Lin, Kuo & Cui, "Open-vocabulary Object Detection via Vision and Language
Knowledge Distillation" (ViLD), ICLR 2022 (arXiv 2021).

ViLD teaches a detector to embed regions where a frozen image encoder (CLIP)
embeds them, so that the encoder's space — and whatever else lives there, text
prototypes of unseen classes — becomes usable from the small model.  The core
kept here: a chosen layer ``student_layer`` of the student gives ``s(x)``, a
learned linear projection ``W`` maps it (flattened) to the encoder's dimension,
and the projected embedding is regressed with L1 onto the frozen encoder's
L2-normalised embedding ``e(x)``:

    L_emb = mean_i ‖W s(x_i) + b − e(x_i) / ‖e(x_i)‖₂‖₁        (sum over dimensions, mean over the batch)
    L     = ce_weight · CE(student(x), y) + weight · L_emb

(ViLD-image's loss; ``ce_weight`` stands in for the detector's own task loss,
``0`` drops it so unlabeled batches work).  The encoder is any module the caller
passes as ``teacher=`` (``teacher_layer`` picks one of its layers, ``""`` its
output); without one, :func:`sdk.compress` uses the uncompressed original.  It
is never trained: it runs in eval mode without gradient, and its parameters
and ``requires_grad`` flags are left as they were.  Nothing is downloaded.

The projection is part of the embedding, not of the deployed classifier: it is
left on the distiller as ``projection`` (:meth:`Embedding.embed` applies it),
and the student's state dict keeps its keys.  Layer names are as in
``named_modules()`` (captured with :mod:`sdk.features`); a bad one raises a
:class:`~sdk.errors.ConfigError` listing the available ones.

>>> import torch
>>> from plugins.distill.embedding import embedding_loss
>>> float(embedding_loss(torch.tensor([[0.6, 0.8]]), torch.tensor([[3.0, 4.0]])))   # e/‖e‖ = (0.6, 0.8)
0.0
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from sdk import hookimpl
from sdk.base import Distiller
from sdk.config import check_range
from sdk.errors import InputError
from sdk.features import capture, named_module
from sdk.trainer import TrainConfig, fit, split_batch


def embedding_loss(projected: torch.Tensor, encoder: torch.Tensor) -> torch.Tensor:
    """``mean_i ‖projected_i − encoder_i/‖encoder_i‖₂‖₁``: the L1 norm of each sample's
    difference to the L2-normalised encoder embedding, averaged over the batch."""
    target = F.normalize(encoder.reshape(encoder.shape[0], -1), dim=1)
    return (projected.reshape(projected.shape[0], -1) - target).abs().sum(1).mean()


class Embedding(Distiller):
    """L1 regression of a projected student layer onto a frozen encoder's normalised embedding."""

    name = "embedding"
    version = "1.0"
    streams = ("train",)

    @dataclasses.dataclass(frozen=True)
    class Config(TrainConfig):
        """Layers and loss weights; the training fields are :class:`TrainConfig`'s."""

        student_layer: str = ""       # student module whose output is embedded ("" = the output)
        teacher_layer: str = ""       # encoder module ("" = the encoder's output)
        weight: float = 1.0           # of L_emb
        ce_weight: float = 1.0        # of CE on labels; 0 for unlabeled data

        def __post_init__(self):
            super().__post_init__()
            check_range("embedding", "weight", self.weight, 0.0)
            check_range("embedding", "ce_weight", self.ce_weight, 0.0)

    def loss(self, student: torch.Tensor, teacher: torch.Tensor, target: torch.Tensor | None = None,
             logits: torch.Tensor | None = None) -> torch.Tensor:
        """The objective for one batch: ``student`` the projected embeddings, ``teacher`` the
        encoder's (unnormalised) ones; the CE term uses ``logits`` and ``target``."""
        cfg = self.config
        total = cfg.weight * embedding_loss(student, teacher)
        if cfg.ce_weight > 0:
            if target is None or logits is None:
                raise InputError("embedding ce_weight > 0 needs labels: pass (x, y) batches, or set ce_weight=0")
            total = total + cfg.ce_weight * F.cross_entropy(logits, target)
        return total

    def encode(self, encoder: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The frozen encoder's embedding of ``x`` (unnormalised, no gradient)."""
        with torch.no_grad():
            _, (e,) = capture(encoder, x, [self.config.teacher_layer], ["teacher_layer"], stop=True)
        return e

    def embed(self, student: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The student's projected embedding ``W s(x) + b`` (after :meth:`apply`)."""
        _, (s,) = capture(student, x, [self.config.student_layer], ["student_layer"], stop=True)
        return self.projection(s.reshape(s.shape[0], -1))

    def apply(self, student: torch.nn.Module, teacher, data) -> torch.nn.Module:
        if not isinstance(teacher, torch.nn.Module):
            raise InputError("embedding needs a frozen encoder: sdk.compress(model, recipe, data=..., "
                             "teacher=encoder)")
        cfg = self.config
        named_module(teacher, cfg.teacher_layer, "teacher_layer")    # fail on bad names before any training
        named_module(student, cfg.student_layer, "student_layer")
        if data is None:
            raise InputError("embedding needs data: pass data= (a list of (x, y) batches or a DataLoader)")
        data = data if isinstance(data, list) else list(data)
        if not data:
            raise InputError("embedding data is empty")
        teacher.eval()
        probe = split_batch(data[0])[0]
        student.eval()    # probing must not move batch-norm statistics
        with torch.no_grad():
            _, (s,) = capture(student, probe, [cfg.student_layer], ["student_layer"], stop=True)
        e = self.encode(teacher, probe)
        torch.manual_seed(cfg.seed)
        self.projection = torch.nn.Linear(s[0].numel(), e[0].numel())

        def step(models, batch):
            x, y = split_batch(batch)
            target = self.encode(teacher, x)
            out, (s,) = capture(models[0], x, [cfg.student_layer], ["student_layer"])
            return self.loss(models[1](s.reshape(s.shape[0], -1)), target, y, logits=out)

        fit(torch.nn.ModuleList([student, self.projection]), data, step, cfg, desc="embedding", subject=student)
        return student


@hookimpl
def register_distillers(register):
    register(Embedding)
