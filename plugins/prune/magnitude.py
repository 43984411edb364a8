"""``magnitude`` — level pruning: zero the smallest-|w| fraction of each layer.

Per layer (``scope="layer"``) exactly ``round(sparsity · numel)`` weights with
the smallest magnitude become zero; ``scope="global"`` ranks all prunable
weights together.  Ties are broken by position, so the count is exact even when
many weights share a magnitude (Han et al., "Learning both Weights and
Connections for Efficient Neural Networks", 2015, uses the same criterion).

The zeros are enforced by a mask (``torch.nn.utils.parametrize``) so later
fine-tuning stages cannot regrow them; :func:`sdk.compress` bakes the masks in
when the recipe ends.

>>> import torch
>>> from plugins.prune.magnitude import MagnitudePruner
>>> m = MagnitudePruner(sparsity=0.5).apply(torch.nn.Linear(8, 4))
>>> int((m.weight == 0).sum())
16
"""

from __future__ import annotations

import dataclasses

import torch

from sdk import hookimpl
from sdk.base import Pruner
from sdk.config import Config, check_choice, check_range
from sdk.masks import apply_mask, prunable_layers, smallest_mask, smallest_masks


class MagnitudePruner(Pruner):
    """Unstructured magnitude pruning to an exact sparsity."""

    name = "magnitude"
    version = "1.0"

    @dataclasses.dataclass(frozen=True)
    class Config(Config):
        sparsity: float = 0.5
        scope: str = "layer"                      # "layer" or "global"
        layer_types: tuple[str, ...] = ("Conv1d", "Conv2d", "Linear")
        exclude: tuple[str, ...] = ()            # module names left dense

        def __post_init__(self):
            check_range("magnitude", "sparsity", self.sparsity, 0.0, 1.0, hi_open=True)
            check_choice("magnitude", "scope", self.scope, ("layer", "global"))

    def apply(self, model: torch.nn.Module, data=None) -> torch.nn.Module:
        cfg = self.config
        layers = prunable_layers(model, cfg.layer_types, cfg.exclude)
        if cfg.scope == "layer":
            for _, mod in layers:
                w = mod.weight.detach()
                apply_mask(mod, smallest_mask(w.abs().reshape(-1), cfg.sparsity).reshape(w.shape))
        else:
            keep = smallest_masks([m.weight.detach().abs() for _, m in layers], cfg.sparsity)
            for (_, mod), mask in zip(layers, keep):
                apply_mask(mod, mask)
        return model


@hookimpl
def register_pruners(register):
    register(MagnitudePruner)
