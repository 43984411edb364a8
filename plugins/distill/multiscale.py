"""``multiscale`` — a low-resolution student taught by a full-resolution teacher.

The core of Qi, Kuen, Gu, Lin, Wang, Chen, Li & Jia, "Multi-Scale Aligned
Distillation for Low-Resolution Detection", CVPR 2021.

The teacher sees the input at full resolution; the student sees it shrunk by
``scale`` (``downscale``: average pooling by ``1/scale`` when that is a whole
number, else bilinear interpolation), so it costs about ``scale²`` of the MACs of
the same network at full resolution.  Their features differ in spatial size;
*resolution-aware pooling* aligns them by pooling the teacher's feature to the
student's:

    align(t, (h, w)) = adaptive_avg_pool2d(t, (h, w))
    L_feat = mean((conv1x1(s) − align(t))²)        (feature_loss "l2")
             or mean(smooth_l1(conv1x1(s) − align(t)))   ("smooth-l1", β = 1)
    loss = feature_weight · L_feat + kd_loss(student logits, teacher logits, y)

with ``kd_loss`` :func:`sdk.losses.kd_loss` (``objective``, ``temperature``,
``alpha`` as in ``kd``).  The 1×1 adapter (when the channel counts differ, or
always: ``adapter``) is a training aid, dropped afterwards.  ``student_layer`` and
``teacher_layer`` are ``named_modules`` names (:mod:`sdk.features`).

The student is trained — and must be deployed and run — on ``downscale(x)``:
``sdk.deploy(student, "arm-int8", (downscale(x, 0.5),))``.

>>> import torch
>>> downscale(torch.arange(16.0).reshape(1, 1, 4, 4), 0.5)[0, 0]
tensor([[ 2.5000,  4.5000],
        [10.5000, 12.5000]])
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from sdk import hookimpl
from sdk.base import Distiller
from sdk.config import check_choice, check_range
from sdk.errors import ConfigError, InputError
from sdk.features import capture, named_module
from sdk.losses import kd_loss
from sdk.trainer import TrainConfig, fit, split_batch


def downscale(x: torch.Tensor, scale: float) -> torch.Tensor:
    """``x`` (N, C, H, W) at ``scale`` of its resolution: average pooling by ``1/scale`` when
    that is a whole number dividing H and W, else bilinear interpolation (antialiased)."""
    if scale == 1.0:
        return x
    k = round(1.0 / scale)
    if abs(k * scale - 1.0) < 1e-9 and x.shape[2] % k == 0 and x.shape[3] % k == 0:
        return F.avg_pool2d(x, k)
    return F.interpolate(x, scale_factor=scale, mode="bilinear", align_corners=False, antialias=True)


def align(teacher: torch.Tensor, size) -> torch.Tensor:
    """Resolution-aware pooling: the teacher's feature average-pooled to the spatial ``size``."""
    return F.adaptive_avg_pool2d(teacher, tuple(size))


class MultiScale(Distiller):
    """Full-resolution teacher, low-resolution student: aligned feature loss plus kd."""

    name = "multiscale"
    version = "1.0"
    streams = ("train",)

    @dataclasses.dataclass(frozen=True)
    class Config(TrainConfig):
        """Resolution, layers and loss; the training fields are :class:`TrainConfig`'s."""

        scale: float = 0.5
        student_layer: str = ""
        teacher_layer: str = ""
        feature_loss: str = "l2"
        feature_weight: float = 1.0
        adapter: str = "auto"         # auto: a 1x1 conv when channels differ; always; none
        objective: str = "soft+hard"
        temperature: float = 4.0
        alpha: float = 0.9

        def __post_init__(self):
            super().__post_init__()
            check_range("multiscale", "scale", self.scale, 0.0, 1.0, lo_open=True)
            check_choice("multiscale", "feature_loss", self.feature_loss, ("l2", "smooth-l1"))
            check_range("multiscale", "feature_weight", self.feature_weight, 0.0)
            check_choice("multiscale", "adapter", self.adapter, ("auto", "always", "none"))
            check_choice("multiscale", "objective", self.objective, ("soft", "soft+hard"))
            check_range("multiscale", "temperature", self.temperature, 0.0, lo_open=True)
            check_range("multiscale", "alpha", self.alpha, 0.0, 1.0)

    def feature_loss(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        """L2 (mean squared) or smooth-L1 between ``student`` (already adapted) and the aligned teacher."""
        t = align(teacher, student.shape[2:])
        if self.config.feature_loss == "l2":
            return F.mse_loss(student, t)
        return F.smooth_l1_loss(student, t, beta=1.0)

    def loss(self, s_feat, t_feat, s_logits, t_logits, target=None) -> torch.Tensor:
        cfg = self.config
        total = kd_loss(s_logits, t_logits, target, objective=cfg.objective, temperature=cfg.temperature,
                        alpha=cfg.alpha, who="multiscale")
        if cfg.feature_weight > 0:
            total = total + cfg.feature_weight * self.feature_loss(s_feat, t_feat)
        return total

    def make_adapter(self, s: torch.Tensor, t: torch.Tensor) -> torch.nn.Module:
        for role, f in (("student_layer", s), ("teacher_layer", t)):
            if f.dim() != 4:
                raise ConfigError(f"multiscale {role} gives shape {tuple(f.shape)}; resolution-aware pooling needs "
                                  "4-D (N, C, H, W) conv features")
        kind = self.config.adapter
        if kind == "none" or (kind == "auto" and s.shape[1] == t.shape[1]):
            if s.shape[1] != t.shape[1]:
                raise ConfigError(f"multiscale adapter='none' needs equal channels, got student {s.shape[1]} and "
                                  f"teacher {t.shape[1]}")
            return torch.nn.Identity()
        torch.manual_seed(self.config.seed)
        return torch.nn.Conv2d(s.shape[1], t.shape[1], 1)

    def apply(self, student: torch.nn.Module, teacher, data) -> torch.nn.Module:
        self.train_student(student, teacher, data)              # the adapter is dropped here
        return student

    def train_student(self, student: torch.nn.Module, teacher, data) -> torch.nn.Module:
        """Train ``student`` (in place, on downscaled inputs) with a fresh adapter; return the adapter."""
        if not isinstance(teacher, torch.nn.Module):
            raise InputError("multiscale needs a teacher model: sdk.compress(model, recipe, data=..., "
                             "teacher=big_model)")
        cfg = self.config
        named_module(teacher, cfg.teacher_layer, "teacher_layer", allow_whole=False)
        named_module(student, cfg.student_layer, "student_layer", allow_whole=False)
        if data is None:
            raise InputError("multiscale needs data: pass data= (a list of (x, y) batches or a DataLoader)")
        data = data if hasattr(data, "__len__") else list(data)
        teacher.eval()

        def features(model, x):
            small = downscale(x, cfg.scale)
            with torch.no_grad():
                t_out, (t,) = capture(teacher, x, [cfg.teacher_layer], ["teacher_layer"])
            s_out, (s,) = capture(model, small, [cfg.student_layer], ["student_layer"])
            return s_out, s, t_out, t

        was_training = student.training
        student.eval()
        with torch.no_grad():
            _, s0, _, t0 = features(student, split_batch(next(iter(data)))[0])
        student.train(was_training)
        adapter = self.make_adapter(s0, t0)

        def step(pair, batch):
            x, y = split_batch(batch)
            s_out, s, t_out, t = features(pair[0], x)
            return self.loss(pair[1](s), t, s_out, t_out, y)

        fit(torch.nn.ModuleList([student, adapter]), data, step, cfg, desc="multiscale", subject=student)
        return adapter


@hookimpl
def register_distillers(register):
    register(MultiScale)
