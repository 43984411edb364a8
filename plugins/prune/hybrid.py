"""``hybrid`` — structured then unstructured pruning in one schedule.

Channels first, weights second, as the two compose on a target: removing
channels shrinks every layer (fewer MACs, no sparse kernel needed), and the
layers that remain still hold small weights that sparse storage can drop.
The schedule:

1. **channels**: in each prunable channel group (:mod:`sdk.channels`) of ``C``
   channels, ``min(round(ratio · C), C − min_channels)`` with the lowest mean
   filter L1 ``Σ_producers ‖W_p[c]‖₁ / numel(W_p[c])`` are removed physically
   (:func:`sdk.allocation.prune`, granularity ``filter``; for a group with one
   producer the ranking is ``filter-l1``'s plain L1, Li et al. 2017);
2. fine-tune ``between_epochs`` (cross-entropy);
3. **weights**: every prunable layer of the smaller model loses exactly
   ``round(sparsity · numel)`` of its smallest ``|w|`` (granularity ``fine``:
   magnitude masks from :mod:`sdk.masks`, Han et al. 2015);
4. fine-tune ``finetune_epochs`` with the masks fixed.

``exclude`` keeps layers' output channels (the classifier keeps its outputs
anyway); ``dense`` leaves layers without zeros.  The training fields are
:class:`sdk.trainer.TrainConfig`'s, for both fine-tunings (``epochs`` is not
used).  ``removed`` maps each group (its producing layers) to the channels it
lost.

>>> import torch
>>> from examples.models import make
>>> from plugins.prune.hybrid import HybridPruner
>>> model, x = make("lenet")
>>> small = HybridPruner(ratio=0.5, sparsity=0.5, between_epochs=0, finetune_epochs=0,
...                      input_shape=(1, 1, 8, 8)).apply(model)
>>> small.features[4].out_channels, int((small.features[4].weight == 0).sum()), small.features[4].weight.numel()
(16, 576, 1152)
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from sdk import hookimpl
from sdk.allocation import prune, units
from sdk.base import Pruner
from sdk.channels import example_from
from sdk.config import check_range
from sdk.errors import InputError
from sdk.trainer import TrainConfig, finetune


class HybridPruner(Pruner):
    """Remove the lowest-L1 channels, fine-tune, then magnitude-prune what remains, fine-tune."""

    name = "hybrid"
    version = "1.0"

    @dataclasses.dataclass(frozen=True)
    class Config(TrainConfig):
        min_epochs = 0
        ratio: float = 0.5                      # fraction of each group's channels removed
        sparsity: float = 0.5                   # fraction of zeros in each remaining layer
        exclude: tuple[str, ...] = ()           # modules (or parents) that keep their output channels
        dense: tuple[str, ...] = ()             # modules left without zeros
        layer_types: tuple[str, ...] = ("Conv1d", "Conv2d", "Linear")
        min_channels: int = 1                   # channels every group keeps at least
        input_shape: tuple[int, ...] | None = None  # example input shape when no data is given
        between_epochs: int = 1                 # fine-tuning after the channels go (needs data)
        finetune_epochs: int = 1                # fine-tuning after the weights go (needs data)

        def __post_init__(self):
            super().__post_init__()
            check_range("hybrid", "ratio", self.ratio, 0.0, 1.0, hi_open=True)
            check_range("hybrid", "sparsity", self.sparsity, 0.0, 1.0, hi_open=True)
            check_range("hybrid", "min_channels", self.min_channels, 1)
            check_range("hybrid", "between_epochs", self.between_epochs, 0)
            check_range("hybrid", "finetune_epochs", self.finetune_epochs, 0)

    def __init__(self, config: Any = None, **options: Any) -> None:
        super().__init__(config, **options)
        self.removed: dict[str, int] = {}      # group (producers joined by "+") -> channels removed

    def apply(self, model: torch.nn.Module, data=None) -> torch.nn.Module:
        cfg = self.config
        if (cfg.between_epochs or cfg.finetune_epochs) and data is None:
            raise InputError("hybrid fine-tunes between and after its two steps and needs labelled data: pass "
                             "data= as (x, y) batches, or set between_epochs and finetune_epochs to 0")
        groups = units(model, "filter", example_from(data, cfg.input_shape, self.name), exclude=cfg.exclude,
                       min_channels=cfg.min_channels)
        self.removed = {u.name: u.count(cfg.ratio) for u in groups}
        prune(model, self.removed, "filter", groups)
        if cfg.between_epochs:
            finetune(model, data, cfg.training(epochs=cfg.between_epochs), desc="hybrid fine-tune (channels)")
        layers = units(model, "fine", layer_types=cfg.layer_types, exclude=cfg.dense)
        prune(model, {u.name: u.count(cfg.sparsity) for u in layers}, "fine", layers)
        if cfg.finetune_epochs:
            finetune(model, data, cfg.training(epochs=cfg.finetune_epochs), desc="hybrid fine-tune (weights)")
        return model.eval()


@hookimpl
def register_pruners(register):
    register(HybridPruner)
