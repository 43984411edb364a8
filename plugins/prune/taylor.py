"""``taylor`` — first-order Taylor importance of channels, iterative removal and fine-tuning.

Molchanov, Tyree, Karras, Aila & Kautz, "Pruning Convolutional Neural Networks
for Resource Efficient Inference", ICLR 2017.  Removing a feature map ``z``
changes the loss by ``|C(z = 0) − C(z)|``; to first order that is
``|∂C/∂z · z|``, one forward and one backward pass for every channel at once.
Per channel ``c`` of a group (see :mod:`sdk.channel_scores`)::

    Θ_c = 1/N Σ_n | 1/M Σ_m a_{n,c,m} · ∂C_n/∂a_{n,c,m} |,    Θ̂_c = Θ_c / ‖Θ‖₂ per layer

where ``a`` is the feature map the next layers read (the post-ReLU map up to
pooling, which leaves ``Σ a·g`` unchanged), ``C_n`` the cross-entropy of sample
``n`` and ``m`` runs over the ``M`` positions: the absolute mean over the map is
taken per example and then averaged, as the paper does over a minibatch (over a
converged network's data ``a·g`` averages out; its size per example does not).
Channels coupled by a residual add sum the change over every layer reading
them (:func:`sdk.channel_scores.taylor_importance`).  The per-layer L2
normalisation makes the scores of different layers comparable, so the paper
ranks all channels of the network together; so does ``scope: global`` here
(``group`` removes ``ratio`` of each group instead).  The ranking ignores what
a channel costs: it takes cheap fully-connected units as readily as
convolution filters (the paper's optional FLOPs term is not implemented).

The schedule (:func:`sdk.channel_scores.prune_iteratively`): ``steps`` rounds of
*score on ``score_batches`` batches → remove the least important channels
physically (:func:`sdk.channels.remove_channels`) → fine-tune
``finetune_steps`` batches*, until ``round(ratio · N)`` of the ``N`` candidate
channels are gone (``steps ≥`` that count removes one per round, as the paper
does); ``finetune_epochs`` of fine-tuning follow.  Labelled ``(x, y)``
batches are required (the loss gradient ranks the channels).

>>> import torch
>>> from examples.models import make
>>> from plugins.prune.taylor import TaylorPruner
>>> model, _ = make("lenet")
>>> data = [(torch.rand(16, 1, 8, 8), torch.randint(0, 10, (16,))) for _ in range(2)]
>>> pruner = TaylorPruner(ratio=0.25, steps=2, finetune_steps=1, progress=False)
>>> small = pruner.apply(model, data)
>>> sum(map(len, pruner.removed.values()))          # round(0.25 · (16 + 32 + 64))
28
>>> small.classifier[1].out_features == 64 - len(pruner.removed["classifier.1"])
True
"""

from __future__ import annotations

import dataclasses

import torch

from sdk import hookimpl
from sdk.base import Pruner
from sdk.channel_scores import IterativeConfig, prune_iteratively, taylor_importance


class TaylorPruner(Pruner):
    """Remove the channels of least first-order Taylor importance (Molchanov et al. 2017).

    A few channels per round, fine-tuning between rounds.  After ``apply``, ``removed`` maps each candidate
    group (its first producing module) to the original channel indices removed, in the order
    they went."""

    name = "taylor"
    version = "1.0"
    streams = ("train",)     # the loss gradient needs labels; fine-tuning trains

    @dataclasses.dataclass(frozen=True)
    class Config(IterativeConfig):
        """The schedule of :class:`sdk.channel_scores.IterativeConfig`; ``scope: global`` ranks the
        normalised scores of all groups together, as the paper does."""

        ratio: float = 0.5
        scope: str = "global"

    def apply(self, model: torch.nn.Module, data=None) -> torch.nn.Module:
        self.removed = prune_iteratively(model, data, self.config, taylor_importance, desc="taylor")
        return model


@hookimpl
def register_pruners(register):
    register(TaylorPruner)
