"""``review`` — Knowledge Review: fused student stages against the teacher's stages.

Chen, Liu, Zhao & Jia, "Distilling Knowledge via Knowledge Review", CVPR 2021.

Earlier distillers match one student stage to the *same* teacher stage.  The
review mechanism lets a shallow teacher stage guide deeper student stages too:
the student's stages are fused from deep to shallow, so the feature compared
with teacher stage ``i`` mixes student stage ``i`` with everything deeper.

Attention-based fusion (ABF), for the stages ``1 … n`` named in
``student_stages`` (shallow to deep) and the matching ``teacher_stages``:

    z_n = conv1x1(s_n)
    z_i = a_i · conv1x1(s_i) + b_i · resize(z_{i+1})      (i < n)
    (a_i, b_i) = softmax over the 2 inputs of conv1x1([conv1x1(s_i), resize(z_{i+1})])
    f_i = conv3x3(z_i)  (to the teacher stage's channels; resized to its height and width)

``resize`` is nearest-neighbour interpolation to ``s_i``'s height and width.  The
attention weights sum to 1 at each position (the paper uses two sigmoids; the
softmax makes the mix a convex combination).  Hierarchical context loss (HCL),
per stage and summed over stages:

    HCL(f, t) = (mse(f, t) + Σ_k w_k · mse(pool_k(f), pool_k(t))) / (1 + Σ_k w_k)

with ``pool_k`` adaptive average pooling to ``k × k`` for ``k`` in ``levels``
(default 4, 2, 1; a level not smaller than the feature's height is skipped) and
``w_k`` halving from ½.  2-D (vector) stages use the plain mse.  The objective
is ``CE(s, y) + review_weight · Σ_i HCL(f_i, t_i)``.

Stages are ``named_modules`` names captured with :mod:`sdk.features`.  The ABF
modules are a training aid, learned with the student and dropped afterwards:
the returned student's state-dict keys are unchanged.

>>> import torch
>>> f = torch.zeros(1, 2, 4, 4); t = torch.ones(1, 2, 4, 4)
>>> float(hcl_loss([f], [t]))      # every level sees a difference of 1
1.0
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import torch
import torch.nn.functional as F

from sdk import hookimpl
from sdk.base import Distiller
from sdk.config import check_range
from sdk.errors import ConfigError, InputError
from sdk.features import capture, named_module
from sdk.trainer import TrainConfig, fit, split_batch


def hcl_loss(student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor],
             levels: Sequence[int] = (4, 2, 1)) -> torch.Tensor:
    """Hierarchical context loss summed over stage pairs (see the module docstring)."""
    total = 0.0
    for fs, ft in zip(student, teacher, strict=True):
        loss, weight, norm = F.mse_loss(fs, ft), 1.0, 1.0
        if fs.dim() == 4:
            for k in levels:
                if k >= fs.shape[2]:
                    continue
                weight /= 2.0
                loss = loss + weight * F.mse_loss(F.adaptive_avg_pool2d(fs, k), F.adaptive_avg_pool2d(ft, k))
                norm += weight
        total = total + loss / norm
    return total


class ABF(torch.nn.Module):
    """One attention-based fusion step: ``in_channels`` → ``mid`` (fused with the deeper
    stage's ``mid``-channel feature, if any) → ``out_channels``."""

    def __init__(self, in_channels: int, mid: int, out_channels: int, fuse: bool):
        super().__init__()
        self.reduce = torch.nn.Conv2d(in_channels, mid, 1, bias=False)
        self.att = torch.nn.Conv2d(2 * mid, 2, 1) if fuse else None
        self.out = torch.nn.Conv2d(mid, out_channels, 3, padding=1, bias=False)

    def attention(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``(N, 2, H, W)`` weights of ``x`` and ``y``: a softmax over the two inputs."""
        return torch.softmax(self.att(torch.cat([x, y], 1)), dim=1)

    def forward(self, s: torch.Tensor, deeper: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(output, fused)``: the feature compared with the teacher, and the one passed on."""
        x = self.reduce(s)
        if deeper is not None:
            y = F.interpolate(deeper, size=x.shape[2:], mode="nearest")
            a = self.attention(x, y)
            x = a[:, :1] * x + a[:, 1:] * y
        return self.out(x), x


class Review(Distiller):
    """Knowledge review: ABF of student stages, HCL against the teacher's stages, plus CE."""

    name = "review"
    version = "1.0"
    streams = ("train",)

    @dataclasses.dataclass(frozen=True)
    class Config(TrainConfig):
        """Stages, fusion width and loss weights; the training fields are :class:`TrainConfig`'s."""

        student_stages: tuple[str, ...] = ()     # module names, shallow to deep
        teacher_stages: tuple[str, ...] = ()     # the same number, matching
        mid_channels: int = 32
        levels: tuple[int, ...] = (4, 2, 1)
        review_weight: float = 1.0
        ce_weight: float = 1.0

        def __post_init__(self):
            super().__post_init__()
            check_range("review", "mid_channels", self.mid_channels, 1)
            check_range("review", "review_weight", self.review_weight, 0.0)
            check_range("review", "ce_weight", self.ce_weight, 0.0)
            for k in self.levels:
                check_range("review", "levels", k, 1)
            if len(self.student_stages) != len(self.teacher_stages):
                raise ConfigError(f"review: student_stages={list(self.student_stages)!r} and teacher_stages="
                                  f"{list(self.teacher_stages)!r} must have the same length")

    def loss(self, fused: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor], logits: torch.Tensor,
             target: torch.Tensor | None) -> torch.Tensor:
        """``ce_weight · CE(logits, target) + review_weight · HCL(fused, teacher)``."""
        cfg = self.config
        total = cfg.review_weight * hcl_loss(fused, teacher, cfg.levels)
        if cfg.ce_weight > 0:
            if target is None:
                raise InputError("review ce_weight > 0 needs labels: pass (x, y) batches, or set ce_weight=0")
            total = total + cfg.ce_weight * F.cross_entropy(logits, target)
        return total

    def make_fusion(self, student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor]) -> torch.nn.ModuleList:
        """A freshly (seeded) initialised ABF per stage, from the captured shapes."""
        for role, feats in (("student_stages", student), ("teacher_stages", teacher)):
            for name, f in zip(getattr(self.config, role), feats):
                if f.dim() != 4:
                    raise ConfigError(f"review {role} {name!r} gives shape {tuple(f.shape)}; ABF needs 4-D "
                                      "(N, C, H, W) conv features")
        torch.manual_seed(self.config.seed)
        n, mid = len(student), self.config.mid_channels
        return torch.nn.ModuleList(ABF(s.shape[1], mid, t.shape[1], fuse=i < n - 1)
                                   for i, (s, t) in enumerate(zip(student, teacher)))

    @staticmethod
    def fuse(abfs: torch.nn.ModuleList, student: Sequence[torch.Tensor],
             teacher: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """The ABF outputs, shallow to deep, each at its teacher stage's height and width."""
        out, deeper = [None] * len(student), None
        for i in reversed(range(len(student))):
            o, deeper = abfs[i](student[i], deeper)
            if o.shape[2:] != teacher[i].shape[2:]:
                o = F.interpolate(o, size=teacher[i].shape[2:], mode="nearest")
            out[i] = o
        return out

    def apply(self, student: torch.nn.Module, teacher, data) -> torch.nn.Module:
        self.train_student(student, teacher, data)              # the ABFs are dropped here
        return student

    def train_student(self, student: torch.nn.Module, teacher, data) -> torch.nn.ModuleList:
        """Train ``student`` (in place) with fresh ABFs; return the ABFs."""
        if not isinstance(teacher, torch.nn.Module):
            raise InputError("review needs a teacher model: sdk.compress(model, recipe, data=..., teacher=big_model)")
        cfg = self.config
        if not cfg.student_stages:
            raise ConfigError("review needs student_stages and teacher_stages (module names, shallow to deep)")
        for s, t in zip(cfg.student_stages, cfg.teacher_stages):
            named_module(student, s, "student_stages", allow_whole=False)
            named_module(teacher, t, "teacher_stages", allow_whole=False)
        if data is None:
            raise InputError("review needs data: pass data= (a list of (x, y) batches or a DataLoader)")
        data = data if hasattr(data, "__len__") else list(data)
        teacher.eval()
        s_roles, t_roles = ["student_stages"] * len(cfg.student_stages), ["teacher_stages"] * len(cfg.teacher_stages)

        def teacher_feats(x):
            with torch.no_grad():
                return capture(teacher, x, cfg.teacher_stages, t_roles, stop=True)[1]

        was_training = student.training
        student.eval()                                   # probing must not move batch-norm statistics
        with torch.no_grad():
            x0 = split_batch(next(iter(data)))[0]
            abfs = self.make_fusion(capture(student, x0, cfg.student_stages, s_roles)[1], teacher_feats(x0))
        student.train(was_training)

        def step(model, batch):
            x, y = split_batch(batch)
            out, feats = capture(model[0], x, cfg.student_stages, s_roles)
            t = teacher_feats(x)
            return self.loss(self.fuse(model[1], feats, t), t, out, y)

        fit(torch.nn.ModuleList([student, abfs]), data, step, cfg, desc="review", subject=student)
        return abfs


@hookimpl
def register_distillers(register):
    register(Review)
