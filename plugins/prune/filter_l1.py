"""``filter-l1`` — structured filter pruning by L1 norm, channels physically removed.

Li, Kadav, Durdanovic, Samet & Graf, "Pruning Filters for Efficient
ConvNets", ICLR 2017.  A filter whose weights are small produces weak feature
maps; removing it (and the matching input channels of the next layer) saves
its FLOPs outright, with no sparse kernels needed.  Per channel ``c`` the
importance is the L1 norm of the filter that produces it::

    s_c = Σ_{i,k,l} |W[c, i, k, l]|

Channels are coupled (see :mod:`sdk.channels`): a residual add ties the
outputs of several convolutions together, so for such a group the score sums
over every coupled producer (conv or linear ``"out"`` slice) —
``s_c = Σ_producers ‖W_p[c]‖₁``, as Li et al. do for the projection shortcut.
BatchNorm and depthwise layers in a group follow the producers; they do not
score.

In each prunable group of ``C`` channels, the ``n = round(ratio · C)`` lowest
scores are removed (Python's ``round``, ties by index).  With ``round_to = r``
the kept count ``C − n`` is rounded to the nearest multiple of ``r`` (at least
``r``, at most ``C``); it never drops below ``min_channels``.  The classifier
and other layers feeding the model output never lose outputs.  Optionally the
pruned model is fine-tuned with cross-entropy on ``(x, y)`` batches, as the
paper retrains after pruning.

>>> import torch
>>> from examples.models import make
>>> from plugins.prune.filter_l1 import FilterL1Pruner
>>> model, x = make("lenet")
>>> small = FilterL1Pruner(ratio=0.5, input_shape=(1, 1, 8, 8)).apply(model)
>>> small.features[0].out_channels, small.features[4].out_channels, small.classifier[1].out_features
(8, 16, 32)
"""

from __future__ import annotations

import dataclasses

import torch

from sdk import hookimpl
from sdk.base import Pruner
from sdk.channels import ChannelGroup, channel_groups, example_from, filter_l1, remove_channels, select_groups
from sdk.config import check_range
from sdk.trainer import TrainConfig, finetune


class FilterL1Pruner(Pruner):
    """Remove the smallest-L1 filters of every channel group (Li et al. 2017)."""

    name = "filter-l1"
    version = "1.0"

    @dataclasses.dataclass(frozen=True)
    class Config(TrainConfig):
        """Which channels go; the training fields (:class:`sdk.trainer.TrainConfig`) are the
        fine-tuning's, whose length is ``finetune_epochs`` (``epochs`` is not used)."""

        ratio: float = 0.5                      # fraction of each group's channels removed
        exclude: tuple[str, ...] = ()           # modules (or parents) that keep their output channels
        min_channels: int = 1                   # channels every group keeps at least
        round_to: int = 1                       # kept channels rounded to a multiple of this
        input_shape: tuple[int, ...] | None = None  # example input shape when no data is given
        finetune_epochs: int = 0                # cross-entropy fine-tuning after removal (needs data)

        def __post_init__(self):
            super().__post_init__()
            check_range("filter-l1", "ratio", self.ratio, 0.0, 1.0, hi_open=True)
            check_range("filter-l1", "min_channels", self.min_channels, 1)
            check_range("filter-l1", "round_to", self.round_to, 1)
            check_range("filter-l1", "finetune_epochs", self.finetune_epochs, 0)

    def apply(self, model: torch.nn.Module, data=None) -> torch.nn.Module:
        cfg = self.config
        example = example_from(data, cfg.input_shape, self.name)
        groups = select_groups(channel_groups(model, example), cfg.exclude)
        plan = {g: self.smallest(model, g) for g in groups}
        remove_channels(model, plan)
        if cfg.finetune_epochs:
            finetune(model, data, cfg.training(epochs=cfg.finetune_epochs), desc="filter-l1 fine-tune")
        return model.eval()

    def n_removed(self, channels: int) -> int:
        """How many of a group's ``channels`` are removed under this config."""
        cfg = self.config
        keep = channels - round(cfg.ratio * channels)
        if cfg.round_to > 1:
            keep = min(channels, max(cfg.round_to, cfg.round_to * round(keep / cfg.round_to)))
        keep = max(keep, min(cfg.min_channels, channels))
        return channels - keep

    def smallest(self, model: torch.nn.Module, group: ChannelGroup) -> list[int]:
        """Indices of the group's channels with the lowest filter L1 norms."""
        n = self.n_removed(group.channels)
        if n == 0:
            return []
        order = torch.sort(filter_l1(model, group), stable=True).indices
        return sorted(order[:n].tolist())


@hookimpl
def register_pruners(register):
    register(FilterL1Pruner)
