"""``fitnets`` — hint-based training of a thin student from a teacher's hidden layer.

Romero, Ballas, Kahou, Chassang, Gatta & Bengio, "FitNets: Hints for Thin Deep
Nets", ICLR 2015.

A thin, deep student is hard to train from the teacher's outputs alone.
FitNets first teaches a middle layer of the student (the *guided* layer) to
predict a middle layer of the teacher (the *hint* layer), then trains the
whole student with knowledge distillation:

Stage 1 (``hint_epochs``, ``hint_lr``)
    The student's layers up to the guided layer and a learned regressor ``r``
    minimise the hint loss

        L_hint = ½ · mean((u_h(x) − r(v_g(x)))²)

    where ``u_h`` is the teacher's hint-layer output and ``v_g`` the student's
    guided-layer output.  *Normalisation*: the mean runs over every element of
    the batch's hint tensor (batch × channels × height × width), i.e. the
    paper's ½‖·‖² divided by that element count, so the loss scale does not
    depend on the batch or layer size.  Only parameters that the guided
    layer's output depends on are updated (found by autograd), and both
    forward passes stop at the hooked layer.
Stage 2 (``epochs``, ``lr``)
    The whole student trains with kd's loss (``objective`` ``soft+hard`` by
    default: ``alpha · T² · KL(softmax(t/T) ‖ softmax(s/T)) + (1 − alpha) · CE``),
    :func:`sdk.losses.kd_loss`.

Both stages use the config's training fields (:class:`sdk.trainer.TrainConfig`:
``optimizer``, ``optimizer_options``, ``seed``, ``max_steps`` — each stage counts
its own steps — and ``progress``); stage 1 replaces ``epochs`` and ``lr`` with
``hint_epochs`` and ``hint_lr``.

The regressor (``regressor``): ``conv1x1`` maps conv features ``(N, C, H, W)``
of equal spatial size; ``linear`` maps the flattened features; ``auto`` picks
``conv1x1`` when both features are 4-D with the same height and width, else
``linear``; ``identity`` is allowed when the shapes already match.  As in the
paper ``r`` is linear; pick hint/guided layers with matching activations
(e.g. both before or both after a ReLU).  The regressor is only a training aid:
it is never attached to the student, so the returned student's state dict is
unchanged in its keys.

Layers are named as in ``model.named_modules()`` (``"features.3"``) and
captured with :mod:`sdk.features`.  Both must be given (the defaults are
empty); a missing name or one that does not exist raises a
:class:`~sdk.errors.ConfigError` listing the available ones.

>>> import torch
>>> from plugins.distill.fitnets import FitNets
>>> f = FitNets(hint_layer="0", guided_layer="0", regressor="identity")
>>> float(f.hint_loss(torch.zeros(2, 3), torch.ones(2, 3), torch.nn.Identity()))
0.5
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
from sdk.losses import kd_loss, response_step
from sdk.trainer import TrainConfig, fit, split_batch


class FitNets(Distiller):
    """Hint training of a guided layer through a regressor, then kd."""

    name = "fitnets"
    version = "1.0"
    streams = ("train",)

    @dataclasses.dataclass(frozen=True)
    class Config(TrainConfig):
        """Hint stage and kd stage; ``epochs``/``lr`` (and the other :class:`TrainConfig`
        fields) are the kd stage's."""

        hint_layer: str = ""          # teacher module name (named_modules)
        guided_layer: str = ""        # student module name
        regressor: str = "auto"
        hint_epochs: int = 1
        hint_lr: float = 1e-3
        objective: str = "soft+hard"  # stage 2, as in kd
        temperature: float = 4.0
        alpha: float = 0.9

        def __post_init__(self):
            super().__post_init__()
            check_choice("fitnets", "regressor", self.regressor, ("auto", "linear", "conv1x1", "identity"))
            check_range("fitnets", "hint_epochs", self.hint_epochs, 1)
            check_range("fitnets", "hint_lr", self.hint_lr, 0.0, lo_open=True)
            check_choice("fitnets", "objective", self.objective, ("soft", "soft+hard"))
            check_range("fitnets", "temperature", self.temperature, 0.0, lo_open=True)
            check_range("fitnets", "alpha", self.alpha, 0.0, 1.0)

    # per-batch objectives

    def hint_loss(self, hint: torch.Tensor, guided: torch.Tensor, regressor: torch.nn.Module) -> torch.Tensor:
        """Stage 1: ``½ · mean((hint − regressor(guided))²)`` over all elements."""
        pred = regressor(guided)
        return 0.5 * F.mse_loss(pred.reshape(hint.shape), hint)

    def loss(self, student: torch.Tensor, teacher: torch.Tensor, target: torch.Tensor | None = None) -> torch.Tensor:
        """Stage 2: kd's loss between student and teacher logits (:func:`sdk.losses.kd_loss`)."""
        cfg = self.config
        return kd_loss(student, teacher, target, objective=cfg.objective, temperature=cfg.temperature,
                       alpha=cfg.alpha, who="fitnets")

    # pieces of training

    def features(self, student: torch.nn.Module, teacher: torch.nn.Module,
                 x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(guided, hint)``: the student's guided-layer output (with grad) and
        the teacher's hint-layer output (without); both passes stop there."""
        cfg = self.config
        with torch.no_grad():
            _, (hint,) = capture(teacher, x, [cfg.hint_layer], ["hint_layer"], stop=True)
        _, (guided,) = capture(student, x, [cfg.guided_layer], ["guided_layer"], stop=True)
        return guided, hint

    def make_regressor(self, guided: torch.Tensor, hint: torch.Tensor) -> torch.nn.Module:
        """A freshly (seeded) initialised regressor from guided-shaped to hint-shaped features."""
        kind, g, h = self.config.regressor, tuple(guided.shape[1:]), tuple(hint.shape[1:])
        spatial_match = len(g) == 3 and len(h) == 3 and g[1:] == h[1:]
        if kind == "identity":
            if g != h:
                raise ConfigError(f"fitnets regressor='identity' needs equal feature shapes, got guided {g} and "
                                  f"hint {h}; use regressor='auto'")
            return torch.nn.Identity()
        if kind == "conv1x1" and not spatial_match:
            raise ConfigError(f"fitnets regressor='conv1x1' needs 4-D features of equal height and width, got "
                              f"guided {g} and hint {h}; pick other layers or use regressor='linear'")
        torch.manual_seed(self.config.seed)
        if kind == "conv1x1" or (kind == "auto" and spatial_match):
            return torch.nn.Conv2d(g[0], h[0], kernel_size=1)
        return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(guided[0].numel(), hint[0].numel()))

    def train_hints(self, student: torch.nn.Module, teacher: torch.nn.Module, data: Iterable) -> torch.nn.Module:
        """Stage 1: train the student up to the guided layer and a new regressor
        on the hint loss; return the regressor (the student is changed in place)."""
        cfg = self.config
        data = _batches(data)
        teacher.eval()
        student.eval()    # probing must not move batch-norm statistics
        guided, hint = self.features(student, teacher, split_batch(next(iter(data)))[0])
        regressor = self.make_regressor(guided, hint)
        upstream = _parameters_feeding(student, guided)
        if not upstream:
            raise ConfigError(f"fitnets guided_layer={cfg.guided_layer!r} has no trainable parameters before it; "
                              "choose a deeper student layer")

        def step(_, batch):
            g, h = self.features(student, teacher, split_batch(batch)[0])
            return self.hint_loss(h, g, regressor)

        pair = torch.nn.ModuleList([student, regressor])
        fit(pair, data, step, cfg.training(epochs=cfg.hint_epochs, lr=cfg.hint_lr),
            params=upstream + list(regressor.parameters()), desc="fitnets hints", subject=student)
        return regressor

    def train_kd(self, student: torch.nn.Module, teacher: torch.nn.Module, data: Iterable) -> torch.nn.Module:
        """Stage 2: train the whole student with kd's loss; return it."""
        fit(student, data, response_step(teacher, self.loss), self.config, desc="fitnets kd")
        return student

    def apply(self, student: torch.nn.Module, teacher, data) -> torch.nn.Module:
        if not isinstance(teacher, torch.nn.Module):
            raise InputError("fitnets needs a teacher model: sdk.compress(model, recipe, data=..., teacher=big_model)")
        cfg = self.config
        # fail on bad names before any training; hints on the outputs would just be kd
        named_module(teacher, cfg.hint_layer, "hint_layer", allow_whole=False)
        named_module(student, cfg.guided_layer, "guided_layer", allow_whole=False)
        data = _batches(data)
        self.train_hints(student, teacher, data)                     # the regressor is dropped here
        return self.train_kd(student, teacher, data)


def _batches(data: Iterable) -> list:
    if data is None:
        raise InputError("fitnets needs data: pass data= (a list of (x, y) batches or a DataLoader)")
    data = data if hasattr(data, "__len__") else list(data)
    if len(data) == 0:
        raise InputError("fitnets data is empty")
    return data


def _parameters_feeding(model: torch.nn.Module, out: torch.Tensor) -> list[torch.nn.Parameter]:
    """The trainable parameters of ``model`` that ``out`` depends on."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not out.requires_grad:
        return []
    grads = torch.autograd.grad(out.sum(), params, allow_unused=True)
    return [p for p, g in zip(params, grads) if g is not None]


@hookimpl
def register_distillers(register):
    register(FitNets)
