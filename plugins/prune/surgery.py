"""``surgery`` — Dynamic Network Surgery: prune and splice while training; masks can recover.

Guo, Yao & Chen, "Dynamic Network Surgery for Efficient DNNs", NIPS 2016.
Each prunable layer keeps its dense weights ``W`` and a binary mask ``T``; the
forward pass uses ``W ⊙ T`` but the gradient reaches *every* entry of ``W``
(straight-through: ``∂L/∂W = ∂L/∂(W ⊙ T)``), so a pruned weight keeps
learning and can be *spliced* back.  The mask follows the paper's rule, with
two thresholds ``a < b`` per layer::

    T ← 0   where |W| < a            (prune)
    T ← T   where a ≤ |W| < b        (unchanged: the hysteresis band)
    T ← 1   where |W| ≥ b            (splice)

As implemented: the paper derives ``a, b`` from the mean and standard deviation
of ``|W|`` (its code: 0.9 and 1.1 × (μ + c·σ)); here ``t`` is the magnitude at the
``sparsity`` quantile of the layer's ``|W|`` (the ``k``-th smallest, ``k =
round(sparsity · numel)``, counting from 0) and ``a = (1 − margin) t``,
``b = (1 + margin) t`` (``margin = 0.1`` is the code's 0.9 / 1.1), so the band
stays around the target.  The mask is updated after an optimizer step with
probability ``p(step) = (1 + γ · step)^(−power)`` (the paper's decreasing
``σ(iter)``; ``p(0) = 1``, so the first step always prunes), drawn from a
generator seeded with ``seed``.  When training ends the last mask is made exact
with the fewest changes (:func:`final_mask`: with too many zeros the largest
masked ``|W|`` come back, with too few the smallest kept ``|W|`` go), leaving
``round(sparsity · numel)`` zeros per layer in a fixed :mod:`sdk.masks` mask,
then fine-tuned ``finetune_epochs`` with the mask fixed.

``history`` holds ``(step, zeros, spliced)`` per mask update: the zeros of each
layer and how many masked weights came back in that update.

>>> import torch
>>> from plugins.prune.surgery import splice_mask
>>> splice_mask(torch.tensor([0.1, 0.5, 0.5, 0.9]), torch.tensor([1., 0., 1., 0.]), a=0.3, b=0.7).tolist()
[0.0, 0.0, 1.0, 1.0]
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch.nn.utils import parametrize

from sdk import hookimpl
from sdk.base import Pruner
from sdk.config import check_range
from sdk.errors import InputError
from sdk.masks import apply_mask, prunable_layers, smallest_mask
from sdk.trainer import TrainConfig, classification_loss, finetune, fit


class _Surgery(torch.nn.Module):
    """``W ⊙ T`` forward, identity backward: pruned weights keep their gradients."""

    def __init__(self, mask: torch.Tensor):
        super().__init__()
        self.register_buffer("mask", mask.detach().clone())

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w + (w * self.mask - w).detach()


def splice_mask(w: torch.Tensor, mask: torch.Tensor, a: float, b: float) -> torch.Tensor:
    """The new mask: 0 where ``|w| < a``, 1 where ``|w| ≥ b``, ``mask`` in between."""
    mag = w.abs()
    return torch.where(mag < a, torch.zeros_like(mask), torch.where(mag >= b, torch.ones_like(mask), mask))


def surgery_thresholds(w: torch.Tensor, sparsity: float, margin: float) -> tuple[float, float]:
    """``(a, b) = ((1 − margin) t, (1 + margin) t)``, ``t`` the ``round(sparsity · n)``-th smallest
    ``|w|`` (from 0; the largest when that is ``n``).

    >>> surgery_thresholds(torch.tensor([0.5, -0.125, 0.25, 0.75]), 0.5, 0.5)
    (0.25, 0.75)
    """
    mag = torch.sort(w.detach().abs().reshape(-1)).values
    t = float(mag[min(int(round(sparsity * mag.numel())), mag.numel() - 1)])
    return (1 - margin) * t, (1 + margin) * t


def update_probability(step: int, gamma: float, power: float) -> float:
    """``(1 + γ · step)^(−power)``, the chance of a mask update after ``step``.

    >>> update_probability(0, 0.01, 1.0), update_probability(100, 0.01, 1.0)
    (1.0, 0.5)
    """
    return (1.0 + gamma * step) ** (-power)


def final_mask(w: torch.Tensor, mask: torch.Tensor, sparsity: float) -> torch.Tensor:
    """``mask`` moved the fewest entries to exactly ``round(sparsity · numel)`` zeros: with too many
    zeros the largest-``|w|`` masked entries come back, with too few the smallest-``|w|`` kept ones go.

    >>> final_mask(torch.tensor([0.1, 0.9, 0.5, 0.3]), torch.tensor([0., 0., 1., 1.]), 0.25).tolist()
    [0.0, 1.0, 1.0, 1.0]
    """
    mag = w.detach().abs().reshape(-1).double()
    kept = mask.reshape(-1) != 0
    score = torch.where(kept, mag + float(mag.max()) + 1.0, mag)     # every masked entry ranks first
    return smallest_mask(score, sparsity).reshape(w.shape).to(mask.dtype)


class SurgeryPruner(Pruner):
    """Prune and splice during training (Guo et al. 2016), ending at an exact per-layer sparsity."""

    name = "surgery"
    version = "1.0"
    streams = ("train",)     # prunes while training

    @dataclasses.dataclass(frozen=True)
    class Config(TrainConfig):
        """The training fields (:class:`sdk.trainer.TrainConfig`) are the surgery's; the fine-tuning
        with fixed masks takes them with ``finetune_epochs``."""

        sparsity: float = 0.8
        margin: float = 0.1                        # a = (1 − margin) t, b = (1 + margin) t
        gamma: float = 0.1                         # p(step) = (1 + γ step)^(−power)
        power: float = 1.0
        epochs: int = 5
        finetune_epochs: int = 1                   # after the final mask is made exact, masks fixed
        layer_types: tuple[str, ...] = ("Conv1d", "Conv2d", "Linear")
        exclude: tuple[str, ...] = ()              # module names left dense

        def __post_init__(self):
            super().__post_init__()
            check_range("surgery", "sparsity", self.sparsity, 0.0, 1.0, hi_open=True)
            check_range("surgery", "margin", self.margin, 0.0, 1.0, hi_open=True)
            check_range("surgery", "gamma", self.gamma, 0.0)
            check_range("surgery", "power", self.power, 0.0)
            check_range("surgery", "finetune_epochs", self.finetune_epochs, 0)

    def __init__(self, config: Any = None, **options: Any) -> None:
        super().__init__(config, **options)
        # (step, zeros of each layer, masked weights spliced back in that update) per mask update
        self.history: list[tuple[int, tuple[int, ...], int]] = []

    def apply(self, model: torch.nn.Module, data=None) -> torch.nn.Module:
        cfg = self.config
        if data is None:
            raise InputError("surgery prunes while training: pass labelled (x, y) batches as data=")
        layers = [(n, m) for n, m in prunable_layers(model, cfg.layer_types, cfg.exclude)]
        masked = [n for n, m in layers if parametrize.is_parametrized(m, "weight")]
        if masked:
            raise InputError(f"surgery splices weights back and cannot start from fixed masks on "
                             f"{', '.join(masked)}: run it before other pruners, or exclude those layers")
        mods = [m for _, m in layers]
        for mod in mods:      # the parametrizations exist before the optimizer is built
            parametrize.register_parametrization(mod, "weight", _Surgery(torch.ones_like(mod.weight)))
        self.history = []
        gen = torch.Generator().manual_seed(cfg.seed)
        step = 0

        def after_step() -> None:
            nonlocal step
            p = update_probability(step, cfg.gamma, cfg.power)
            if p >= 1.0 or float(torch.rand((), generator=gen)) < p:
                self.update_masks(mods, step)
            step += 1

        try:
            fit(model, data, classification_loss, cfg.training(), after_step=after_step, desc="surgery")
        finally:
            finals = [final_mask(mod.parametrizations.weight.original.detach(), surgery_mask(mod), cfg.sparsity)
                      for mod in mods]
            for mod in mods:
                parametrize.remove_parametrizations(mod, "weight", leave_parametrized=False)
        for mod, mask in zip(mods, finals):
            apply_mask(mod, mask)
        if cfg.finetune_epochs:
            finetune(model, data, cfg.training(epochs=cfg.finetune_epochs), desc="surgery fine-tune")
        return model.eval()

    def update_masks(self, mods: list[torch.nn.Module], step: int) -> None:
        """Apply :func:`splice_mask` with each layer's thresholds; record the update in ``history``."""
        cfg = self.config
        zeros, spliced = [], 0
        with torch.no_grad():
            for mod in mods:
                holder = mod.parametrizations.weight
                w, old = holder.original, holder[0].mask
                a, b = surgery_thresholds(w, cfg.sparsity, cfg.margin)
                new = splice_mask(w, old, a, b)
                spliced += int(((old == 0) & (new == 1)).sum())
                old.copy_(new)
                zeros.append(int((new == 0).sum()))
        self.history.append((step, tuple(zeros), spliced))


def surgery_mask(module: torch.nn.Module) -> torch.Tensor | None:
    """The mask ``T`` of a layer while :meth:`SurgeryPruner.apply` trains it (``None`` before and
    after; the fixed mask it ends with is :func:`sdk.masks.mask_of`'s)."""
    if parametrize.is_parametrized(module, "weight"):
        for p in module.parametrizations.weight:
            if isinstance(p, _Surgery):
                return p.mask
    return None


@hookimpl
def register_pruners(register):
    register(SurgeryPruner)
