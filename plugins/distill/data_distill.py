"""``data-distill`` — pseudo-labels from a teacher ensembled over input transforms.

Radosavovic, Dollár, Girshick, Gkioxari & He, "Data Distillation: Towards
Omni-Supervised Learning", CVPR 2018.

1. The teacher (``teacher=``, or the uncompressed original when none is given)
   runs on every batch of the ``unlabeled`` stream under each of the
   ``transforms``; the softmax outputs are averaged:

       p(x) = 1/K · Σ_k softmax(teacher(T_k(x)))

   For classification the label does not move with the image, so no transform
   is inverted before averaging (detection and pose outputs would need it).
2. ``p``'s arg-max is the pseudo-label; examples whose ensembled confidence
   ``max_c p_c(x)`` is below ``threshold`` are dropped (the paper keeps only
   confident predictions, so pseudo-labels are mostly right).
3. The student retrains with cross-entropy on the ``train`` batches together
   with the kept pseudo-labelled examples, reshuffled each epoch in batches of
   ``batch_size`` (``epochs``, ``lr`` and the other
   :class:`sdk.trainer.TrainConfig` fields).

Transforms (``transforms``, a list) act on ``(N, C, H, W)`` inputs:
``identity``, ``hflip``, ``vflip``, ``shift:DX,DY`` (whole pixels, zero fill),
``scale:S`` (zoom about the centre, bilinear, zero fill), or — from Python — any
callable ``x -> x'`` of the same shape.  Flips suit natural images, not digits:
choose transforms that keep the label.

When run from a recipe the stage reports how many pseudo-labels it kept.

>>> import torch
>>> from plugins.distill.data_distill import DataDistill
>>> teacher = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2))
>>> x, y, conf = DataDistill(transforms=["identity", "hflip"], threshold=0.0).pseudo_labels(
...     teacher, [torch.zeros(3, 1, 2, 2)])
>>> x.shape, y.shape, conf.shape
(torch.Size([3, 1, 2, 2]), torch.Size([3]), torch.Size([3]))
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Iterable

import torch
import torch.nn.functional as F

from sdk import hookimpl
from sdk.base import Distiller
from sdk.config import check_range
from sdk.errors import ConfigError, InputError
from sdk.trainer import TrainConfig, classification_loss, fit, make_loader, split_batch

_NAMED = ("identity", "hflip", "vflip", "shift:DX,DY", "scale:S")


def make_transform(spec) -> Callable[[torch.Tensor], torch.Tensor]:
    """The function a ``transforms`` entry names (see the module docstring); callables pass through.

    >>> make_transform("shift:1,0")(torch.arange(3.0).reshape(1, 1, 1, 3)).tolist()
    [[[[0.0, 0.0, 1.0]]]]
    """
    if callable(spec):
        return spec
    if not isinstance(spec, str):
        raise ConfigError(f"data-distill: transforms entry {spec!r} must be a name ({', '.join(_NAMED)}) or a callable")
    kind, _, arg = spec.partition(":")
    try:
        if kind == "identity" and not arg:
            return lambda x: x
        if kind == "hflip" and not arg:
            return lambda x: x.flip(-1)
        if kind == "vflip" and not arg:
            return lambda x: x.flip(-2)
        if kind == "shift":
            dx, dy = (int(v) for v in arg.split(","))
            return lambda x: _shift(x, dx, dy)
        if kind == "scale":
            s = float(arg)
            if s > 0:
                return lambda x: _scale(x, s)
    except ValueError:
        pass
    raise ConfigError(f"data-distill: transforms entry {spec!r} is not valid; valid: {', '.join(_NAMED)} "
                      "(e.g. 'shift:1,-1', 'scale:1.1') or a callable")


def _shift(x: torch.Tensor, dx: int, dy: int) -> torch.Tensor:
    """Move the content ``dx`` pixels right and ``dy`` down; vacated pixels are 0."""
    h, w = x.shape[-2:]
    padded = F.pad(x, (max(dx, 0), max(-dx, 0), max(dy, 0), max(-dy, 0)))
    top, left = max(-dy, 0), max(-dx, 0)
    return padded[..., top:top + h, left:left + w]


def _scale(x: torch.Tensor, s: float) -> torch.Tensor:
    """Zoom by ``s`` about the centre (s > 1 enlarges), same output size."""
    theta = torch.tensor([[1.0 / s, 0.0, 0.0], [0.0, 1.0 / s, 0.0]], dtype=x.dtype).expand(x.shape[0], 2, 3)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


class DataDistill(Distiller):
    """Teacher ensembled over transforms → confident pseudo-labels → retrain on labelled + pseudo."""

    name = "data-distill"
    version = "1.0"
    streams = ("train", "unlabeled")

    @dataclasses.dataclass(frozen=True)
    class Config(TrainConfig):
        """Pseudo-labelling and retraining; ``epochs``/``lr`` (and the other :class:`TrainConfig`
        fields) are the retraining's."""

        transforms: tuple = ("identity", "hflip")
        threshold: float = 0.0        # keep a pseudo-label when its ensembled confidence >= this
        batch_size: int = 64          # of the mixed labelled + pseudo-labelled retraining batches

        def __post_init__(self):
            super().__post_init__()
            if isinstance(self.transforms, (str, bytes)) or not isinstance(self.transforms, (list, tuple)) \
                    or not self.transforms:
                raise ConfigError(f"data-distill: transforms must be a non-empty list, got {self.transforms!r}")
            object.__setattr__(self, "transforms", tuple(self.transforms))
            for spec in self.transforms:
                make_transform(spec)
            check_range("data-distill", "threshold", self.threshold, 0.0, 1.0)
            check_range("data-distill", "batch_size", self.batch_size, 1)

    def ensemble(self, teacher: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        """``1/K · Σ_k softmax(teacher(T_k(x)))``: the teacher's averaged class probabilities."""
        teacher.eval()
        with torch.no_grad():
            probs = [F.softmax(teacher(make_transform(t)(x)), dim=-1) for t in self.config.transforms]
        return torch.stack(probs).mean(0)

    def pseudo_labels(self, teacher: torch.nn.Module,
                      unlabeled: Iterable) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(x, label, confidence)`` of the unlabelled examples whose ensembled confidence
        reaches ``threshold``; batches may be ``x``, ``(x,)`` or ``(x, y)`` (``y`` is ignored)."""
        xs, labels, confs = [], [], []
        for batch in unlabeled:
            x, _ = split_batch(batch)
            conf, label = self.ensemble(teacher, x).max(-1)
            keep = conf >= self.config.threshold
            xs.append(x[keep])
            labels.append(label[keep])
            confs.append(conf[keep])
        if not xs:
            raise InputError("data-distill: the 'unlabeled' stream is empty")
        return torch.cat(xs), torch.cat(labels), torch.cat(confs)

    def retrain(self, student: torch.nn.Module, data: Iterable, x: torch.Tensor, y: torch.Tensor) -> torch.nn.Module:
        """Cross-entropy on the labelled ``data`` plus the pseudo-labelled ``(x, y)``, shuffled together."""
        if data is None:
            raise InputError("data-distill needs labelled data: pass data={'train': ..., 'unlabeled': ...}")
        pairs = [split_batch(b) for b in data]
        if any(t is None for _, t in pairs):
            raise InputError("data-distill needs (x, y) batches in the 'train' stream")
        cfg = self.config
        mixed = make_loader(torch.cat([p[0] for p in pairs] + [x]), torch.cat([p[1] for p in pairs] + [y]),
                            batch_size=cfg.batch_size, seed=cfg.seed)
        fit(student, mixed, lambda m, b: classification_loss(m, b, who="data-distill"), cfg, desc="data-distill")
        return student

    def run(self, model, ctx):
        """Pseudo-label ``ctx.stream('unlabeled')`` with the teacher (the original when none was
        given), report how many were kept, retrain on ``train`` + pseudo-labels."""
        teacher = ctx.teacher if ctx.teacher is not None else ctx.original
        x, y, conf = self.pseudo_labels(_teacher(teacher), ctx.stream("unlabeled", who="data-distill"))
        ctx.report(pseudo_labels=int(len(y)), mean_confidence=float(conf.mean()) if len(y) else None,
                   threshold=self.config.threshold)
        return self.retrain(model, ctx.stream("train", who="data-distill"), x, y)

    def apply(self, student: torch.nn.Module, teacher, data, unlabeled: Iterable | None = None) -> torch.nn.Module:
        if unlabeled is None:
            raise InputError("data-distill needs unlabelled data: apply(student, teacher, train, unlabeled=...) or "
                             "sdk.compress(..., data={'train': ..., 'unlabeled': ...})")
        x, y, _ = self.pseudo_labels(_teacher(teacher), unlabeled)
        return self.retrain(student, data, x, y)


def _teacher(teacher) -> torch.nn.Module:
    if not isinstance(teacher, torch.nn.Module):
        raise InputError("data-distill needs a teacher model: sdk.compress(model, recipe, data=..., teacher=big_model)")
    return teacher


@hookimpl
def register_distillers(register):
    register(DataDistill)
