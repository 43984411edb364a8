"""``factor-transfer`` — a paraphraser of the teacher's feature, a translator of the student's.

Kim, Park & Kwak, "Paraphrasing Complex Network: Network Compression via
Factor Transfer", NeurIPS 2018.

The teacher's feature is hard for a smaller student to copy directly.  Factor
transfer first *paraphrases* it: an auto-encoder ``P`` (encoder ``E``, decoder
``D``) is trained without labels to reconstruct the teacher's feature ``x_t``
through a bottleneck of ``m = round(k · C)`` channels, ``k`` the *paraphrase
rate*; the encoder's output ``F_T = E(x_t)`` is the teacher *factor*.  The
student then learns, through a *translator* ``T`` on its own feature ``x_s``,
to produce the same factor ``F_S = T(x_s)``:

Stage 1 (``paraphraser_epochs``, ``paraphraser_lr``)
    ``L_rec = mean((x_t − D(E(x_t)))²)`` over every element; only ``P`` trains
    (the teacher stays frozen).  Its inputs come from the ``unlabeled`` stream
    when one is given (labels are never read), else from ``train``.
Stage 2 (``epochs``, ``lr``)
    The student and the translator minimise

        L = CE(student(x), y) + beta · L_FT,
        L_FT = mean |F_T / ‖F_T‖₂ − F_S / ‖F_S‖₂|        (p = 1)

    with each sample's factor flattened and L2-normalised on its own, and the
    mean over every element of the batch's factors (as the authors' code,
    ``nn.L1Loss``; the paper writes the per-sample norm, which is this times
    the factor size).  ``F_T`` is computed without gradient by the frozen
    paraphraser.  ``beta = 0`` drops the transfer term: plain training.
    The authors use ``beta = 500`` on CIFAR conv factors; on a digits 24-24-24 MLP
    (32-element factors) that drowns the CE term (test accuracy 0.10 after
    3 epochs against 0.43 with ``beta = 0``), hence the default 3.

Both networks are small: for conv features ``(N, C, H, W)`` (teacher and
student of equal height and width) ``E`` is two 3×3 convs ``C → C → m``,
``D`` two 3×3 convs ``m → C → C`` and ``T`` two 3×3 convs ``C_s → C_s → m``,
each conv but the decoder's last followed by a leaky ReLU (slope 0.1) as in
the paper; otherwise the features are flattened and the convs are linear
layers.  Both are training aids only, never attached to the student: its
state dict keeps its keys.  After :meth:`apply` they are left on the
distiller as ``paraphraser`` and ``translator``.

``teacher_layer`` / ``student_layer`` name modules as ``named_modules()`` does
(captured with :mod:`sdk.features`); both must be given, and a bad name raises
a :class:`~sdk.errors.ConfigError` listing the available ones.

>>> import torch
>>> from plugins.distill.factor_transfer import factor_loss
>>> f = torch.tensor([[3.0, 4.0]])
>>> float(factor_loss(2 * f, f))                   # the scale of a factor does not count
0.0
>>> round(float(factor_loss(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]]))), 4)   # mean(|1|, |−1|)
1.0
"""

from __future__ import annotations

import dataclasses
from typing import Iterable

import torch
import torch.nn.functional as F

from sdk import hookimpl
from sdk.base import Distiller
from sdk.config import check_range
from sdk.errors import InputError
from sdk.features import capture, named_module
from sdk.trainer import TrainConfig, fit, split_batch

_SLOPE = 0.1    # the paper's leaky-ReLU slope


def factor_loss(student_factor: torch.Tensor, teacher_factor: torch.Tensor) -> torch.Tensor:
    """``mean |F_T/‖F_T‖₂ − F_S/‖F_S‖₂|``: each sample's factor flattened and L2-normalised,
    the mean taken over all elements of the batch."""
    s = F.normalize(student_factor.reshape(student_factor.shape[0], -1), dim=1)
    t = F.normalize(teacher_factor.reshape(teacher_factor.shape[0], -1), dim=1)
    return F.l1_loss(s, t)


def reconstruction_loss(paraphraser: "Paraphraser", feature: torch.Tensor) -> torch.Tensor:
    """Stage 1's ``mean((x − D(E(x)))²)`` over every element of the feature batch."""
    return F.mse_loss(paraphraser(feature), feature)


def _layers(conv: bool, sizes: list[int], last_act: bool) -> torch.nn.Sequential:
    """3×3 convs (padding 1, spatial size kept) or linear layers ``sizes[0] → sizes[1] → …``,
    each followed by a leaky ReLU except, when ``last_act`` is false, the last."""
    out = []
    for i, (a, b) in enumerate(zip(sizes, sizes[1:])):
        out.append(torch.nn.Conv2d(a, b, 3, padding=1) if conv else torch.nn.Linear(a, b))
        if last_act or i < len(sizes) - 2:
            out.append(torch.nn.LeakyReLU(_SLOPE))
    return torch.nn.Sequential(*out)


class Paraphraser(torch.nn.Module):
    """The auto-encoder of the teacher's feature: ``encode`` gives the factor, ``forward`` the
    reconstruction.  ``conv``: 3×3 convs on ``(N, C, H, W)``; else linear layers on ``(N, C)``."""

    def __init__(self, channels: int, factor_channels: int, conv: bool):
        super().__init__()
        self.conv = conv
        self.encoder = _layers(conv, [channels, channels, factor_channels], last_act=True)
        self.decoder = _layers(conv, [factor_channels, channels, channels], last_act=False)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))


class FactorTransfer(Distiller):
    """Paraphraser on the teacher's feature, translator on the student's, L1 between factors."""

    name = "factor-transfer"
    version = "1.0"
    streams = ("train",)

    @dataclasses.dataclass(frozen=True)
    class Config(TrainConfig):
        """Both stages; ``epochs``/``lr`` (and the other :class:`TrainConfig` fields) are
        stage 2's, stage 1 replaces ``epochs`` and ``lr`` with its own."""

        teacher_layer: str = ""          # teacher module name (named_modules)
        student_layer: str = ""          # student module name
        rate: float = 0.5                # paraphrase rate k: factor channels = round(k · C)
        beta: float = 3.0                # weight of L_FT (0 = no transfer; see the module docstring)
        paraphraser_epochs: int = 10
        paraphraser_lr: float = 1e-3

        def __post_init__(self):
            super().__post_init__()
            check_range("factor-transfer", "rate", self.rate, 0.0, lo_open=True)
            check_range("factor-transfer", "beta", self.beta, 0.0)
            check_range("factor-transfer", "paraphraser_epochs", self.paraphraser_epochs, 1)
            check_range("factor-transfer", "paraphraser_lr", self.paraphraser_lr, 0.0, lo_open=True)

    def loss(self, student: torch.Tensor, teacher: torch.Tensor, target: torch.Tensor | None = None,
             logits: torch.Tensor | None = None) -> torch.Tensor:
        """Stage 2's objective: ``CE(logits, target) + beta · factor_loss(student, teacher)``
        for factors ``student`` (the translator's) and ``teacher`` (the paraphraser's)."""
        if target is None or logits is None:
            raise InputError("factor-transfer's student training needs labels: pass (x, y) batches as 'train'")
        total = F.cross_entropy(logits, target)
        if self.config.beta > 0:
            total = total + self.config.beta * factor_loss(student, teacher)
        return total

    # pieces of training

    def teacher_feature(self, teacher: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            _, (t,) = capture(teacher, x, [self.config.teacher_layer], ["teacher_layer"], stop=True)
        return t

    def make_networks(self, student_feature: torch.Tensor,
                      teacher_feature: torch.Tensor) -> tuple[Paraphraser, torch.nn.Module]:
        """A freshly (seeded) initialised paraphraser and translator for these feature shapes."""
        s, t = tuple(student_feature.shape[1:]), tuple(teacher_feature.shape[1:])
        conv = len(s) == 3 and len(t) == 3 and s[1:] == t[1:]
        c_t = t[0] if conv else teacher_feature[0].numel()
        c_s = s[0] if conv else student_feature[0].numel()
        m = max(1, round(self.config.rate * c_t))
        torch.manual_seed(self.config.seed)
        paraphraser = Paraphraser(c_t, m, conv)
        translator = _layers(conv, [c_s, c_s, m], last_act=True)
        if not conv:
            translator = torch.nn.Sequential(torch.nn.Flatten(), *translator)
        return paraphraser, translator

    def _shaped(self, paraphraser: Paraphraser, feature: torch.Tensor) -> torch.Tensor:
        return feature if paraphraser.conv else feature.reshape(feature.shape[0], -1)

    def train_paraphraser(self, paraphraser: Paraphraser, teacher: torch.nn.Module, data: Iterable) -> list[float]:
        """Stage 1: train ``paraphraser`` to reconstruct the teacher's feature; the epoch losses."""
        cfg = self.config
        teacher.eval()

        def step(p, batch):
            return reconstruction_loss(p, self._shaped(p, self.teacher_feature(teacher, split_batch(batch)[0])))

        history = fit(paraphraser, data, step, cfg.training(epochs=cfg.paraphraser_epochs, lr=cfg.paraphraser_lr),
                      desc="factor-transfer paraphraser")
        paraphraser.requires_grad_(False)
        return history

    def train_student(self, student: torch.nn.Module, teacher: torch.nn.Module, paraphraser: Paraphraser,
                      translator: torch.nn.Module, data: Iterable) -> torch.nn.Module:
        """Stage 2: the student and the translator on CE + beta · L_FT."""
        cfg = self.config
        teacher.eval()
        paraphraser.eval()

        def step(models, batch):
            x, y = split_batch(batch)
            with torch.no_grad():
                f_t = paraphraser.encode(self._shaped(paraphraser, self.teacher_feature(teacher, x)))
            out, (s,) = capture(models[0], x, [cfg.student_layer], ["student_layer"])
            return self.loss(models[1](s), f_t, y, logits=out)

        pair = torch.nn.ModuleList([student, translator])
        fit(pair, data, step, cfg, desc="factor-transfer", subject=student)
        return student

    def run(self, model, ctx):
        """``apply`` with the paraphraser trained on the ``unlabeled`` stream when one is given."""
        teacher = ctx.teacher if ctx.teacher is not None else ctx.original
        return self.apply(model, teacher, ctx.data.get("train"), unlabeled=ctx.data.get("unlabeled"))

    def apply(self, student: torch.nn.Module, teacher, data, unlabeled: Iterable | None = None) -> torch.nn.Module:
        """Both stages; the paraphraser learns on ``unlabeled`` (inputs, or batches whose labels are
        ignored) when given, else on ``data``."""
        if not isinstance(teacher, torch.nn.Module):
            raise InputError("factor-transfer needs a teacher model: sdk.compress(model, recipe, data=..., "
                             "teacher=big_model)")
        cfg = self.config
        named_module(teacher, cfg.teacher_layer, "teacher_layer", allow_whole=False)   # before any training
        named_module(student, cfg.student_layer, "student_layer", allow_whole=False)
        data = _batches(data)
        probe = split_batch(data[0])[0]
        student.eval()    # probing must not move batch-norm statistics
        with torch.no_grad():
            _, (s,) = capture(student, probe, [cfg.student_layer], ["student_layer"], stop=True)
        self.paraphraser, self.translator = self.make_networks(s, self.teacher_feature(teacher, probe))
        self.paraphraser_losses = self.train_paraphraser(self.paraphraser, teacher,
                                                         data if unlabeled is None else _batches(unlabeled))
        return self.train_student(student, teacher, self.paraphraser, self.translator, data)


def _batches(data: Iterable) -> list:
    if data is None:
        raise InputError("factor-transfer needs data: pass data= (a list of (x, y) batches or a DataLoader)")
    data = data if isinstance(data, list) else list(data)
    if not data:
        raise InputError("factor-transfer data is empty")
    return data


@hookimpl
def register_distillers(register):
    register(FactorTransfer)
