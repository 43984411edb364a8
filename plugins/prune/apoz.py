"""``apoz`` — Network Trimming: remove the channels whose ReLU outputs are mostly zero.

Hu, Peng, Tai & Tang, "Network Trimming: A Data-Driven Neuron Pruning Approach
towards Efficient Deep Architectures", 2016.  A channel whose post-ReLU
activation is zero for most inputs and positions contributes little; its
*average percentage of zeros* over the data ::

    APoZ_c = #{n, m : a_{n,c,m} = 0} / (N · M)

(``n`` over the ``N`` samples, ``m`` over the ``M`` positions of the ReLU output
that feeds the next layer, see :mod:`sdk.channel_scores`) ranks the channels;
the highest go.  As the paper trims a layer at a time, ``scope: group``
(the default) removes ``round(ratio · C)`` of each group's ``C`` channels;
``global`` ranks all groups' APoZ together.  Groups whose consumers do not
read a ReLU output (a linear bottleneck, a BN-only path) keep their channels.

Removal is physical (:func:`sdk.channels.remove_channels`) and iterative like
the paper's trim-and-retrain loop (:func:`sdk.channel_scores.prune_iteratively`):
``steps`` rounds of *measure APoZ on ``score_batches`` batches → remove →
fine-tune ``finetune_steps`` batches*, then ``finetune_epochs``.  APoZ is
measured on the ``stream`` data stream (``train``, or held-out ``val``, or
``unlabeled``: it needs no labels); fine-tuning trains on ``train``.

>>> import torch
>>> from examples.models import make
>>> from plugins.prune.apoz import ApozPruner
>>> model, _ = make("lenet")
>>> small = ApozPruner(ratio=0.25, steps=1, finetune_steps=0).apply(model, [torch.rand(16, 1, 8, 8)])
>>> small.features[0].out_channels, small.features[4].out_channels, small.classifier[1].out_features
(12, 24, 48)
"""

from __future__ import annotations

import dataclasses

import torch

from sdk import hookimpl
from sdk.base import Pruner
from sdk.channel_scores import IterativeConfig, apoz, prune_iteratively
from sdk.config import check_choice
from sdk.context import STREAMS


def apoz_importance(model, groups, batches):
    """``1 − APoZ`` per channel (the average fraction of non-zeros): low goes first."""
    return {g: 1.0 - rate for g, rate in apoz(model, groups, batches).items()}


class ApozPruner(Pruner):
    """Remove the channels whose ReLU outputs are most often zero (APoZ, Hu et al. 2016).

    A few channels per round, fine-tuning between rounds.  After ``apply``, ``removed`` maps each
    candidate group (its first producing module) to the original channel indices removed, in
    the order they went."""

    name = "apoz"
    version = "1.0"
    streams = ("train",)     # fine-tuning trains (APoZ itself may come from another stream)

    @dataclasses.dataclass(frozen=True)
    class Config(IterativeConfig):
        """The schedule of :class:`sdk.channel_scores.IterativeConfig`, and the data stream the
        APoZ is measured on."""

        ratio: float = 0.5
        scope: str = "group"
        stream: str = "train"          # train, val or unlabeled

        def __post_init__(self):
            super().__post_init__()
            check_choice(self.type_tag, "stream", self.stream, STREAMS)

    def run(self, model: torch.nn.Module, ctx) -> torch.nn.Module:
        """``apply`` with the APoZ measured on ``ctx.stream(stream)``, fine-tuning on ``train``."""
        cfg = self.config
        return self.apply(model, ctx.data.get("train"), score_data=ctx.stream(cfg.stream, who="apoz"))

    def apply(self, model: torch.nn.Module, data=None, *, score_data=None) -> torch.nn.Module:
        """Prune ``model`` measuring APoZ on ``score_data`` (default ``data``), fine-tuning on ``data``."""
        self.removed = prune_iteratively(model, data, self.config, apoz_importance, score_data=score_data,
                                         desc="apoz")
        return model


@hookimpl
def register_pruners(register):
    register(ApozPruner)
