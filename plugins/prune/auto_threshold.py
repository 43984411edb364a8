"""``auto-threshold`` — per-layer pruning thresholds learned jointly with the weights.

After Azarian, Bhalgat, Lee & Hamid, "Learned Threshold Pruning" (LTP,
arXiv:2003.00075, 2020): every prunable layer ``l`` has a threshold ``t_l`` that
is a trainable parameter, and the weights below it are pruned.  A hard mask has
no gradient with respect to ``t_l``, so LTP differentiates a sigmoid
surrogate of it; the sparsity each layer ends with is then learned from the
task loss, not set by hand.  As implemented, per layer with weight ``W``::

    hard = |W| > t_l                                      (the forward mask, exactly)
    soft = sigmoid((|W| − t_l) / T_l)                     T_l = temperature · std(W at the start)
    mask = hard + soft − stop_gradient(soft)              (straight-through: value hard, gradient soft's)
    W_eff = W · mask

so ``∂L/∂t_l = Σ_i (∂L/∂W_eff,i) · W_i · (−soft_i (1 − soft_i) / T_l)``, and pruned
weights still get a gradient through the surrogate (they may come back).  The
loss is cross-entropy plus a sparsity regulariser pulling the soft density of
all prunable weights to the target::

    L = CE + strength · (Σ_l Σ_i soft_l,i / N − (1 − sparsity))²

Thresholds start at ``init · std(W)`` and train with the weights (the same
optimizer and ``lr``).  At the end (``project: true``) one factor ``c`` scales all
learned thresholds, ``t_l ← c·t_l``, so that exactly ``round(sparsity · N)`` of the
``N`` prunable weights are pruned (global ranking by ``|w| / t_l``, ties by
position): the per-layer allocation the training learned is kept and the target
is met exactly.  The masks then go to :mod:`sdk.masks` (fixed through any
fine-tuning, shipped as sparse weights where the target carries sparsity), and
the final thresholds are in :attr:`AutoThresholdPruner.thresholds`.

Differences from LTP: the forward uses the hard mask (LTP trains with the soft
one and hardens at the end), the criterion is ``|w|`` rather than ``w²``, and the
regulariser aims at a target density (LTP's soft-L0 term ``λ Σ soft`` has no
target, so the sparsity reached depends on ``λ``).

>>> import torch
>>> from plugins.prune.auto_threshold import ste_mask
>>> w = torch.tensor([0.5, -0.1, 0.3])
>>> ste_mask(w, torch.tensor(0.2), 0.05).tolist()
[1.0, 0.0, 1.0]
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from sdk import hookimpl
from sdk.base import Pruner
from sdk.config import check_range
from sdk.errors import InputError
from sdk.masks import apply_mask, mask_of, prunable_layers, smallest_masks
from sdk.trainer import TrainConfig, classification_loss, finetune_after, fit


def ste_mask(w: torch.Tensor, t: torch.Tensor, temperature: float) -> torch.Tensor:
    """``|w| > t`` in the forward, the gradient of ``sigmoid((|w| − t) / temperature)`` in the backward."""
    soft = torch.sigmoid((w.abs() - t) / temperature)
    hard = (w.abs() > t).to(w.dtype)
    return hard + (soft - soft.detach())


class LearnedThreshold(nn.Module):
    """Parametrization ``W ↦ W · ste_mask(W, t, T)`` with a trainable threshold ``t``."""

    def __init__(self, threshold: float, temperature: float):
        super().__init__()
        self.threshold = nn.Parameter(torch.tensor(float(threshold)))
        self.temperature = float(temperature)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w * ste_mask(w, self.threshold, self.temperature)

    def soft_kept(self, w: torch.Tensor) -> torch.Tensor:
        """``Σ sigmoid((|w| − t) / T)``: the differentiable count of kept weights."""
        return torch.sigmoid((w.abs() - self.threshold) / self.temperature).sum()


class AutoThresholdPruner(Pruner):
    """Learn one magnitude threshold per layer with the weights (LTP); the target met exactly at the end."""

    name = "auto-threshold"
    version = "1.0"
    streams = ("train",)     # the thresholds are learned from the task loss

    @dataclasses.dataclass(frozen=True)
    class Config(TrainConfig):
        """The training fields (:class:`sdk.trainer.TrainConfig`) train weights and thresholds together;
        fine-tuning with the masks fixed takes them with ``finetune_epochs`` and ``finetune_lr``."""

        sparsity: float = 0.8                 # target fraction of zeros over the prunable layers
        strength: float = 10.0                # weight of the squared density gap
        temperature: float = 0.1              # of the sigmoid surrogate, in units of each layer's std(W)
        init: float = 0.0                     # thresholds start at init · std(W)
        epochs: int = 10
        project: bool = True                  # scale the thresholds to meet sparsity exactly
        finetune_epochs: int = 0              # cross-entropy fine-tuning with the masks fixed
        finetune_lr: float | None = None      # default: lr
        layer_types: tuple[str, ...] = ("Conv1d", "Conv2d", "Linear")
        exclude: tuple[str, ...] = ()         # module names left dense

        def __post_init__(self):
            super().__post_init__()
            check_range("auto-threshold", "sparsity", self.sparsity, 0.0, 1.0, hi_open=True)
            check_range("auto-threshold", "strength", self.strength, 0.0)
            check_range("auto-threshold", "temperature", self.temperature, 0.0, lo_open=True)
            check_range("auto-threshold", "init", self.init, 0.0)
            check_range("auto-threshold", "finetune_epochs", self.finetune_epochs, 0)
            if self.finetune_lr is not None:
                check_range("auto-threshold", "finetune_lr", self.finetune_lr, 0.0, lo_open=True)

    def __init__(self, config: Any = None, **options: Any) -> None:
        super().__init__(config, **options)
        self.learned: dict[str, float] = {}       # per-layer sparsity of the learned thresholds (before projection)
        self.thresholds: dict[str, float] = {}    # final per-layer thresholds: the masks are |w| > t

    def apply(self, model: torch.nn.Module, data=None) -> torch.nn.Module:
        cfg = self.config
        if data is None:
            raise InputError("auto-threshold learns its thresholds from the task loss and needs labelled data: "
                             "pass data= as (x, y) batches")
        if not hasattr(data, "__len__"):
            data = list(data)
        layers = self.attach(model)
        fit(model, data, lambda m, b: classification_loss(m, b, who="auto-threshold") + self.penalty(layers),
            cfg.training(), desc="auto-threshold training")
        self.finish(layers)
        finetune_after(model, data, cfg, desc="auto-threshold fine-tune")
        return model.eval()

    def attach(self, model: nn.Module) -> dict[str, nn.Module]:
        """A :class:`LearnedThreshold` on every prunable layer's weight; ``{name: layer}``."""
        cfg = self.config
        layers = dict(prunable_layers(model, cfg.layer_types, cfg.exclude))
        for mod in layers.values():
            std = float(mod.weight.detach().std(correction=0)) or 1.0
            parametrize.register_parametrization(mod, "weight", LearnedThreshold(cfg.init * std,
                                                                                 cfg.temperature * std))
        return layers

    def penalty(self, layers: dict[str, nn.Module]) -> torch.Tensor:
        """``strength · (soft density − (1 − sparsity))²`` over ``layers``."""
        cfg = self.config
        kept = sum(_learned(m).soft_kept(_original(m)) for m in layers.values())
        total = sum(m.weight.numel() for m in layers.values())
        return cfg.strength * (kept / total - (1.0 - cfg.sparsity)) ** 2

    @torch.no_grad()
    def finish(self, layers: dict[str, nn.Module]) -> None:
        """Harden the masks (projected to the exact target when ``project``), drop the thresholds'
        parametrization and mask the weights through :mod:`sdk.masks`."""
        names = list(layers)
        weights = {n: _original(layers[n]).detach().clone() for n in names}   # earlier masks applied
        tiny = torch.finfo(torch.float32).tiny
        ts = {n: float(_learned(layers[n]).threshold) for n in names}
        self.learned = {n: float((weights[n].abs() <= ts[n]).float().mean()) for n in names}
        if self.config.project:
            scaled = [weights[n].abs() / max(ts[n], tiny) for n in names]
            masks = dict(zip(names, smallest_masks(scaled, self.config.sparsity)))
            c = _cut(torch.cat([r.reshape(-1) for r in scaled]), self.config.sparsity)
            ts = {n: c * max(ts[n], tiny) for n in names}
        else:
            masks = {n: (weights[n].abs() > ts[n]).to(weights[n].dtype) for n in names}
        self.thresholds = ts
        for n in names:
            mod = layers[n]
            earlier = mask_of(mod)
            earlier = earlier.clone() if earlier is not None else None
            _unparametrize(mod)                   # the raw weight back, no mask at all
            apply_mask(mod, masks[n] if earlier is None else masks[n] * earlier)


def _learned(mod: nn.Module) -> LearnedThreshold:
    return next(p for p in mod.parametrizations.weight if isinstance(p, LearnedThreshold))


def _original(mod: nn.Module) -> torch.Tensor:
    """The weight the threshold sees: the raw weight with any earlier mask applied."""
    w = mod.parametrizations.weight.original
    earlier = mask_of(mod)
    return w if earlier is None else w * earlier


def _cut(ratios: torch.Tensor, sparsity: float) -> float:
    """A value with exactly the ``k = round(sparsity · n)`` smallest ``ratios`` at or below it
    (the midpoint of the gap above the ``k``-th)."""
    r = torch.sort(ratios).values
    k = round(sparsity * r.numel())
    if k == 0:
        return float(r[0]) / 2
    if k >= r.numel():
        return float(r[-1])
    return (float(r[k - 1]) + float(r[k])) / 2


def _unparametrize(mod: nn.Module) -> None:
    """Remove every parametrization of ``mod.weight``, restoring the stored original."""
    cls = type(mod)   # deep copies share this class and removal edits it: take a private one (as sdk.masks.bake)
    mod.__class__ = type(cls.__name__, cls.__bases__, dict(cls.__dict__))
    parametrize.remove_parametrizations(mod, "weight", leave_parametrized=False)


@hookimpl
def register_pruners(register):
    register(AutoThresholdPruner)
