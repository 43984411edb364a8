"""``slimming`` — Network Slimming: L1 on BatchNorm scales, then remove low-γ channels.

Liu, Li, Shen, Huang, Yan & Zhang, "Learning Efficient Convolutional Networks
through Network Slimming", ICCV 2017.  Each BatchNorm output is
``γ_c · x̂_c + β_c``, so ``γ_c`` is a per-channel scaling factor.  Training with

    L = Σ_(x,y) CE(f(x), y) + λ · Σ_γ |γ|

(the subgradient ``λ · sign(γ)`` is what autograd gives for ``|γ|``) drives
many factors towards zero; channels with a small ``|γ|`` then contribute
little and are removed.  The threshold is *global*: the ``ratio``-quantile of
the scores of all candidate channels, so layers lose different fractions.

As implemented:

1. trace the model (:mod:`sdk.channels`); candidates are the channels of the
   prunable groups holding at least one BatchNorm, and only those BNs are
   penalised;
2. train ``epochs`` with the loss above (``(x, y)`` batches required);
3. score channel ``c`` of a group by ``max |γ_c|`` over the group's BNs —
   coupled channels (residual adds) go only when every BN that scales them is
   small;
4. sort all candidate scores (stable), take the ``k = round(ratio · N)``
   lowest as the threshold set and remove them, except where a group would
   keep fewer than ``min_channels`` (those few stay; ``k`` is then not
   reached);
5. fine-tune ``finetune_epochs`` with plain cross-entropy.

>>> import torch
>>> from plugins.prune.slimming import SlimmingPruner
>>> SlimmingPruner(ratio=0.3, l1=1e-4).config.ratio
0.3
"""

from __future__ import annotations

import dataclasses

import torch

from sdk import hookimpl
from sdk.base import Pruner
from sdk.channels import ChannelGroup, channel_groups, example_from, remove_channels, select_groups
from sdk.config import check_range
from sdk.errors import InputError
from sdk.trainer import TrainConfig, finetune, finetune_after


class SlimmingPruner(Pruner):
    """Sparsify BN scaling factors with an L1 penalty, then remove the smallest globally."""

    name = "slimming"
    version = "1.0"
    streams = ("train",)     # trains with the L1 penalty before removing

    @dataclasses.dataclass(frozen=True)
    class Config(TrainConfig):
        """The training fields (:class:`sdk.trainer.TrainConfig`) are the sparsity training's;
        the fine-tuning takes them with ``finetune_epochs`` and ``finetune_lr``; ``epochs: 0``
        skips the sparsity training (rank the channels by the γ the model has)."""

        min_epochs = 0
        ratio: float = 0.5                # fraction of candidate channels removed (global threshold)
        l1: float = 1e-4                  # λ, weight of Σ|γ| (the paper: 1e-4 on CIFAR)
        epochs: int = 10                  # sparsity training
        finetune_epochs: int = 5          # cross-entropy fine-tuning after removal (0: none)
        finetune_lr: float | None = None  # default: lr
        min_channels: int = 1             # channels every group keeps at least
        exclude: tuple[str, ...] = ()     # modules (or parents) that keep their output channels

        def __post_init__(self):
            super().__post_init__()
            check_range("slimming", "ratio", self.ratio, 0.0, 1.0, hi_open=True)
            check_range("slimming", "l1", self.l1, 0.0)
            check_range("slimming", "finetune_epochs", self.finetune_epochs, 0)
            if self.finetune_lr is not None:
                check_range("slimming", "finetune_lr", self.finetune_lr, 0.0, lo_open=True)
            check_range("slimming", "min_channels", self.min_channels, 1)

    def apply(self, model: torch.nn.Module, data=None) -> torch.nn.Module:
        cfg = self.config
        groups = self.candidates(model, data)
        self.train_sparse(model, data, groups)
        remove_channels(model, self.select(model, groups))
        finetune_after(model, data, cfg, desc="slimming fine-tune")
        return model.eval()

    def candidates(self, model: torch.nn.Module, data) -> list[ChannelGroup]:
        """Prunable groups that hold a BatchNorm (whose γ can rank the channels)."""
        if data is None:
            raise InputError("slimming trains with an L1 penalty on BN scales and needs labelled data: "
                             "pass data= as (x, y) batches")
        groups = select_groups(channel_groups(model, example_from(data, None, self.name)), self.config.exclude)
        return [g for g in groups if g.of_role("norm")]

    def train_sparse(self, model: torch.nn.Module, data, groups: list[ChannelGroup]) -> list[float]:
        """Train with ``CE + λ Σ|γ|`` over the BNs of ``groups``; per-epoch mean losses."""
        cfg = self.config
        bns = {s.module: model.get_submodule(s.module) for g in groups for s in g.of_role("norm")}
        gammas = [bn.weight for bn in bns.values() if bn.weight is not None]

        def penalty() -> torch.Tensor:
            return cfg.l1 * sum(g.abs().sum() for g in gammas)

        if not cfg.epochs:
            return []
        return finetune(model, data, cfg.training(), desc="slimming sparsity training", penalty=penalty)

    def select(self, model: torch.nn.Module, groups: list[ChannelGroup]) -> dict[ChannelGroup, list[int]]:
        """Channels below the global ``ratio`` threshold of the γ scores, per group."""
        cfg = self.config
        scores = [gamma_scores(model, g) for g in groups]
        flat = torch.cat(scores) if scores else torch.zeros(0)
        owner = [(gi, c) for gi, s in enumerate(scores) for c in range(len(s))]
        k = round(cfg.ratio * len(owner))
        plan: dict[ChannelGroup, list[int]] = {g: [] for g in groups}
        for i in torch.sort(flat, stable=True).indices[:k].tolist():
            gi, c = owner[i]
            g = groups[gi]
            if g.channels - len(plan[g]) > cfg.min_channels:
                plan[g].append(c)
        return plan


def gamma_scores(model: torch.nn.Module, group: ChannelGroup) -> torch.Tensor:
    """``max |γ_c|`` over the group's BatchNorms, per channel."""
    score = torch.zeros(group.channels)
    for s in group.of_role("norm"):
        bn = model.get_submodule(s.module)
        gamma = bn.weight.detach().abs() if bn.weight is not None else torch.ones(bn.num_features)
        score = torch.maximum(score, gamma[s.offset:s.offset + group.channels].float())
    return score


@hookimpl
def register_pruners(register):
    register(SlimmingPruner)
