"""``agp`` — automated gradual pruning: a cubic sparsity schedule during training.

Zhu & Gupta, "To prune, or not to prune: exploring the efficacy of pruning for
model compression", 2017.  Sparsity rises from an initial value ``s_i`` to a
final value ``s_f`` over ``n`` pruning steps spaced ``Δt`` training steps apart,
starting at step ``t0``::

    s_t = s_f + (s_i − s_f) · (1 − (t − t0) / (n·Δt))³     t ∈ {t0, t0 + Δt, …, t0 + n·Δt}

The cube prunes fast while many redundant weights remain and slows down as
the network gets sparse, leaving the remaining weights time to recover.  At
every pruning step each prunable layer gets a magnitude mask with exactly
``round(s_t · numel)`` zeros (smallest ``|w|`` of the masked weight, ties by
position).  Masks are multiplied into the previous ones, so pruned weights never
return and (since ``s_t`` only grows) the count stays exact.  Training goes on
after ``t0 + n·Δt`` with the final masks fixed; the schedule must end within
``epochs × len(data)`` steps (and ``max_steps``).  Steps count optimizer steps
from 0.  The training fields are :class:`sdk.trainer.TrainConfig`'s.

:func:`agp_sparsity` is the schedule as a pure function; ``history`` holds
``(step, target sparsity, zeros of each pruned layer)`` for every pruning step
of the last :meth:`apply`.

>>> from plugins.prune.agp import agp_sparsity
>>> round(agp_sparsity(50, initial=0.0, final=0.8, start=0, steps=10, frequency=10), 4)   # 0.8·(1 − 0.5³)
0.7
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from sdk import hookimpl
from sdk.base import Pruner
from sdk.config import check_range
from sdk.errors import ConfigError, InputError
from sdk.masks import apply_mask, mask_of, prunable_layers, smallest_mask
from sdk.trainer import TrainConfig, classification_loss, fit


class AGPPruner(Pruner):
    """Gradual magnitude pruning on the cubic schedule of Zhu & Gupta (2017), while training."""

    name = "agp"
    version = "1.0"
    streams = ("train",)     # prunes while training

    @dataclasses.dataclass(frozen=True)
    class Config(TrainConfig):
        initial_sparsity: float = 0.0             # s_i
        final_sparsity: float = 0.8               # s_f
        start_step: int = 0                       # t0
        pruning_steps: int = 10                   # n
        frequency: int = 10                       # Δt, training steps between pruning steps
        epochs: int = 5
        layer_types: tuple[str, ...] = ("Conv1d", "Conv2d", "Linear")
        exclude: tuple[str, ...] = ()             # module names left dense

        def __post_init__(self):
            super().__post_init__()
            check_range("agp", "initial_sparsity", self.initial_sparsity, 0.0, 1.0, hi_open=True)
            check_range("agp", "final_sparsity", self.final_sparsity, 0.0, 1.0, hi_open=True)
            if self.final_sparsity < self.initial_sparsity:
                raise ConfigError(f"agp: final_sparsity={self.final_sparsity} is below initial_sparsity="
                                  f"{self.initial_sparsity}; the schedule only prunes more, swap them")
            check_range("agp", "start_step", self.start_step, 0)
            check_range("agp", "pruning_steps", self.pruning_steps, 1)
            check_range("agp", "frequency", self.frequency, 1)

        @property
        def end_step(self) -> int:
            """The last pruning step, ``t0 + n·Δt``."""
            return self.start_step + self.pruning_steps * self.frequency

    def __init__(self, config: Any = None, **options: Any) -> None:
        super().__init__(config, **options)
        # (step, target sparsity, zeros of each pruned layer) at every pruning step
        self.history: list[tuple[int, float, tuple[int, ...]]] = []

    def apply(self, model: torch.nn.Module, data=None) -> torch.nn.Module:
        cfg = self.config
        if data is None:
            raise InputError("agp prunes while training: pass labelled (x, y) batches as data=")
        if not hasattr(data, "__len__"):
            data = list(data)
        total = cfg.epochs * len(data)
        if cfg.max_steps is not None:
            total = min(total, cfg.max_steps)
        if total <= cfg.end_step:
            raise ConfigError(f"agp: the schedule ends at step {cfg.end_step} but training runs {total} steps "
                              f"({cfg.epochs} epochs × {len(data)} batches"
                              + (f", max_steps={cfg.max_steps}" if cfg.max_steps is not None else "")
                              + "); raise epochs or lower start_step, pruning_steps or frequency")
        layers = [m for _, m in prunable_layers(model, cfg.layer_types, cfg.exclude)]
        for mod in layers:    # masks exist before the optimizer is built, so it holds the right tensors
            apply_mask(mod, torch.ones_like(mod.weight))
        self.history = []
        step = 0

        def after_step() -> None:
            nonlocal step
            if is_pruning_step(step, cfg.start_step, cfg.pruning_steps, cfg.frequency):
                target = agp_sparsity(step, cfg.initial_sparsity, cfg.final_sparsity, cfg.start_step,
                                      cfg.pruning_steps, cfg.frequency)
                with torch.no_grad():
                    for mod in layers:
                        w = mod.weight
                        apply_mask(mod, smallest_mask(w.abs().reshape(-1), target).reshape(w.shape))
                self.history.append((step, target, tuple(int((mask_of(m) == 0).sum()) for m in layers)))
            step += 1

        fit(model, data, classification_loss, cfg.training(), after_step=after_step, desc="agp")
        return model


def agp_sparsity(step: int, initial: float, final: float, start: int, steps: int, frequency: int) -> float:
    """Target sparsity ``s_f + (s_i − s_f)(1 − (t − t0)/(n·Δt))³``, held at ``s_i`` before ``t0``
    and at ``s_f`` after ``t0 + n·Δt``.

    >>> agp_sparsity(-3, 0.0, 0.5, 0, 4, 5), agp_sparsity(99, 0.0, 0.5, 0, 4, 5)
    (0.0, 0.5)
    """
    progress = min(max((step - start) / (steps * frequency), 0.0), 1.0)
    return final + (initial - final) * (1.0 - progress) ** 3


def is_pruning_step(step: int, start: int, steps: int, frequency: int) -> bool:
    """True at ``t0, t0 + Δt, …, t0 + n·Δt``."""
    return start <= step <= start + steps * frequency and (step - start) % frequency == 0


@hookimpl
def register_pruners(register):
    register(AGPPruner)
