"""``regularization`` — L1, L2 or group-lasso penalties in training, then the zeros pruned.

A penalty ``λ·R(W)`` in the training loss pushes weights towards zero:

=========  =====================  ====================  ==========================================
penalty    ``R(W)``               gradient              proximal step (step size ``η``)
=========  =====================  ====================  ==========================================
``l1``     ``Σ |w|``              ``sign(w)``           ``w ← sign(w)·max(|w| − ηλ, 0)``
``l2``     ``½ Σ w²``             ``w``                 ``w ← w / (1 + ηλ)`` (no zeros)
``group``  ``Σ_c √p·‖W_c‖₂``      ``√p·W_c / ‖W_c‖``    ``W_c ← W_c·max(0, 1 − ηλ√p / ‖W_c‖)``
=========  =====================  ====================  ==========================================

L1 and L2 are the two regularisers Han et al. compare before magnitude pruning
("Learning both Weights and Connections", NeurIPS 2015).  The group lasso (Yuan &
Lin 2006) over whole filters or input channels is Wen et al.'s Structured
Sparsity Learning ("Learning Structured Sparsity in Deep Neural Networks",
NeurIPS 2016).  A group ``W_c`` is one channel ``c`` of a channel coupling group
of :mod:`sdk.channels`: with ``groups: out`` the filters ``W[c]`` of every
producer of the channel, with ``groups: in`` the input columns ``W[:, c]`` of
every layer that reads it (``repeat`` columns after a flatten), coupled layers
(residual adds) in one group, so a group that reaches zero is a channel that can
be removed whole.  ``p`` is the number of weights in ``W_c`` (Yuan & Lin's
weighting: ``p`` equal entries ``a`` cost ``p·|a|``, as under L1, so one ``λ`` is
one strength for both).  Fixed groups (the classifier's outputs) are not
penalised.

With ``proximal: true`` (default) the loss is plain cross-entropy and after
every optimizer step the proximal operator of ``ηλ·R`` is applied with
``η = lr`` (proximal gradient, Parikh & Boyd 2014): soft-thresholding gives
*exact* zeros, where the subgradient of ``proximal: false`` only makes weights
small.

After the stage's own training (``epochs`` of it; ``(x, y)`` batches) and with
``prune: true`` the zeros become structure:

* ``l1``/``l2``: a mask keeps ``|w| > threshold`` (``threshold: 0``: everything
  but the exact zeros), or, with ``sparsity``, exactly ``round(sparsity·n)`` of
  the ``n`` weights, the smallest |w|, are masked — ranked over all the layers
  together (``scope: global``, default: one λ put every layer on one scale, and
  the training chose how sparse each layer gets) or in each layer
  (``scope: layer``).  The masks are :mod:`sdk.masks`' (the plan ships them as
  sparse weights where the target carries sparsity);
* ``group``: the channels with ``‖W_c‖ ≤ threshold`` (or, with ``ratio``, the
  ``round(ratio·C)`` smallest of each group) are removed physically
  (:func:`sdk.channels.remove_channels`), keeping ``min_channels`` per group.
  Removing a zero *input* group leaves the function unchanged; a zero filter
  still emits its bias, which the removal drops.

Inside :func:`sdk.compress` (``attach: true``) the stage also adds ``λ·R`` to the
loss of every later stage's training (``ctx.add_penalty``), on the model as this
stage leaves it.  Later stages get the penalty itself (its subgradient), not the
proximal step.  To regularise a later stage's training and prune after it, put
``{epochs: 0, prune: false}`` before it and ``{epochs: 0, attach: false}`` with a
``threshold``, ``sparsity`` or ``ratio`` after it (a subgradient leaves small
weights, not zeros).

>>> import torch
>>> from plugins.prune.regularization import RegularizationPruner
>>> net = torch.nn.Sequential(torch.nn.Linear(2, 2, bias=False))
>>> _ = net[0].weight.data.copy_(torch.tensor([[3.0, -4.0], [0.0, 0.5]]))
>>> reg = RegularizationPruner(penalty="l1", strength=0.1).regularizer(net)
>>> round(float(reg(net).detach()), 4)                                         # 0.1 · 7.5
0.75
>>> pruned = RegularizationPruner(penalty="l1", epochs=0).apply(net)              # only the exact zero goes
>>> pruned[0].weight.tolist()
[[3.0, -4.0], [0.0, 0.5]]
>>> int((pruned[0].parametrizations.weight[0].mask == 0).sum())
1
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch.nn.utils import parametrize

from sdk import hookimpl
from sdk.base import Pruner
from sdk.channels import ChannelGroup, channel_groups, example_from, remove_channels, select_groups
from sdk.config import check_choice, check_range
from sdk.errors import ConfigError, InputError
from sdk.masks import apply_mask, prunable_layers, smallest_mask, smallest_masks
from sdk.penalties import group_lasso, group_norms, l1, l2, shrink_groups, soft_threshold
from sdk.trainer import TrainConfig, classification_loss, finetune_after, fit


@dataclasses.dataclass
class Regularizer:
    """``λ·R`` of one penalty over named layers (``l1``/``l2``) or channel groups (``group``);
    call it on the model for the penalty value, :meth:`prox` for the proximal step."""

    penalty: str
    strength: float
    layers: tuple[str, ...] = ()
    groups: tuple[ChannelGroup, ...] = ()
    role: str = "out"

    def __call__(self, model: torch.nn.Module) -> torch.Tensor:
        if self.penalty == "group":
            return self.strength * group_lasso(model, self.groups, self.role)
        weights = [model.get_submodule(n).weight for n in self.layers]
        return self.strength * (l1(weights) if self.penalty == "l1" else l2(weights))

    def prox(self, model: torch.nn.Module, step: float) -> None:
        """The proximal step of ``step · λ·R`` on the model's weights, in place."""
        t = step * self.strength
        if self.penalty == "group":
            for g in self.groups:
                shrink_groups(model, g, self.role, t)
            return
        with torch.no_grad():
            for n in self.layers:
                w = _raw_weight(model.get_submodule(n))
                w.copy_(soft_threshold(w, t) if self.penalty == "l1" else w / (1.0 + t))


def _raw_weight(module: torch.nn.Module) -> torch.Tensor:
    """The stored weight (the unmasked original when an earlier stage masked the layer)."""
    if parametrize.is_parametrized(module, "weight"):
        return module.parametrizations.weight.original
    return module.weight


class RegularizationPruner(Pruner):
    """Train with an L1, L2 or group-lasso penalty, then mask the zeros or remove the zero channels.

    Proximal steps give exact zeros."""

    name = "regularization"
    version = "1.0"

    @dataclasses.dataclass(frozen=True)
    class Config(TrainConfig):
        """The training fields (:class:`sdk.trainer.TrainConfig`) are the regularised training's
        (``epochs: 0`` skips it); fine-tuning after pruning takes them with ``finetune_epochs``
        and ``finetune_lr``."""

        min_epochs = 0
        penalty: str = "l1"                   # "l1", "l2" or "group" (group lasso)
        strength: float = 1e-4                # λ
        groups: str = "out"                   # group lasso over filters ("out") or input channels ("in")
        proximal: bool = True                 # proximal steps (exact zeros) instead of the penalty's gradient
        epochs: int = 10
        attach: bool = True                   # add λ·R to the training of later recipe stages
        prune: bool = True                    # turn the zeros into masks / removed channels
        threshold: float = 0.0                # |w| (or ‖W_c‖) <= threshold counts as zero
        sparsity: float | None = None         # l1/l2: mask exactly this fraction by |w|
        scope: str = "global"                 # sparsity over all layers ("global") or per layer ("layer")
        ratio: float | None = None            # group: remove exactly this fraction of each group by ‖W_c‖
        finetune_epochs: int = 0              # cross-entropy fine-tuning after pruning
        finetune_lr: float | None = None      # default: lr
        min_channels: int = 1                 # channels every group keeps at least
        layer_types: tuple[str, ...] = ("Conv1d", "Conv2d", "Linear")
        exclude: tuple[str, ...] = ()         # layers (l1/l2) or modules and parents (group) left alone
        input_shape: tuple[int, ...] | None = None   # group: example input shape when no data is given

        def __post_init__(self):
            super().__post_init__()
            owner = "regularization"
            check_choice(owner, "penalty", self.penalty, ("l1", "l2", "group"))
            check_choice(owner, "groups", self.groups, ("out", "in"))
            check_choice(owner, "scope", self.scope, ("global", "layer"))
            check_range(owner, "strength", self.strength, 0.0)
            check_range(owner, "threshold", self.threshold, 0.0)
            check_range(owner, "finetune_epochs", self.finetune_epochs, 0)
            check_range(owner, "min_channels", self.min_channels, 1)
            if self.finetune_lr is not None:
                check_range(owner, "finetune_lr", self.finetune_lr, 0.0, lo_open=True)
            if self.sparsity is not None:
                check_range(owner, "sparsity", self.sparsity, 0.0, 1.0, hi_open=True)
                if self.penalty == "group":
                    raise ConfigError(f"{owner}: sparsity={self.sparsity!r} is for penalty l1/l2 (masks); "
                                      "penalty 'group' removes channels: set ratio instead")
            if self.ratio is not None:
                check_range(owner, "ratio", self.ratio, 0.0, 1.0, hi_open=True)
                if self.penalty != "group":
                    raise ConfigError(f"{owner}: ratio={self.ratio!r} is for penalty 'group' (channel removal); "
                                      f"penalty {self.penalty!r} masks weights: set sparsity instead")

    def __init__(self, config: Any = None, **options: Any) -> None:
        super().__init__(config, **options)
        self.history: list[float] = []            # mean loss per epoch of the regularised training
        self.removed: dict[tuple[str, ...], list[int]] = {}   # group: channels removed, by group modules
        self.masked: dict[str, int] = {}          # l1/l2: weights masked, by layer

    def run(self, model: torch.nn.Module, ctx) -> torch.nn.Module:
        """``apply`` on ``train``, then (``attach``) ``λ·R`` of the result joins later stages' losses."""
        data = ctx.data.get("train")
        if data is not None and not hasattr(data, "__len__"):
            data = list(data)                     # read again for the attached penalty's tracing
        model = self.apply(model, data)
        if self.config.attach:
            ctx.add_penalty(self.regularizer(model, data))
        return model

    def apply(self, model: torch.nn.Module, data=None) -> torch.nn.Module:
        cfg = self.config
        if data is not None and not hasattr(data, "__len__"):
            data = list(data)                     # traced and trained on: must be re-iterable
        reg = self.regularizer(model, data)
        self.history = self.train(model, data, reg)
        if cfg.prune:
            self.prune(model, reg)
        finetune_after(model, data, cfg, desc="regularization fine-tune")
        return model.eval()

    def regularizer(self, model: torch.nn.Module, data=None) -> Regularizer:
        """The penalty over ``model`` as it is now (the group lasso traces its channel groups)."""
        cfg = self.config
        if cfg.penalty != "group":
            return Regularizer(cfg.penalty, cfg.strength,
                               tuple(n for n, _ in prunable_layers(model, cfg.layer_types, cfg.exclude)))
        example = example_from(data, cfg.input_shape, self.name)
        groups = select_groups(channel_groups(model, example), cfg.exclude)
        return Regularizer("group", cfg.strength, groups=tuple(g for g in groups if g.of_role(cfg.groups)),
                           role=cfg.groups)

    def train(self, model: torch.nn.Module, data, reg: Regularizer) -> list[float]:
        """``epochs`` of cross-entropy with ``λ·R`` (its gradient, or proximal steps); per-epoch losses."""
        cfg = self.config
        if not cfg.epochs:
            return []
        if data is None:
            raise InputError("regularization trains with its penalty and needs labelled data: pass data= as "
                             "(x, y) batches, or set epochs: 0 to only attach the penalty to later stages")

        def loss(m: torch.nn.Module, batch: Any) -> torch.Tensor:
            ce = classification_loss(m, batch, who="regularization")
            return ce if cfg.proximal else ce + reg(m)

        after = (lambda: reg.prox(model, cfg.lr)) if cfg.proximal else None
        return fit(model, data, loss, cfg.training(), after_step=after, desc=f"{cfg.penalty} regularised training")

    def prune(self, model: torch.nn.Module, reg: Regularizer) -> None:
        """Mask the zero weights (``l1``/``l2``) or remove the zero channels (``group``)."""
        cfg = self.config
        if reg.penalty == "group":
            self.removed = {g.modules: self.zero_channels(group_norms(model, g, reg.role).detach(), g)
                            for g in reg.groups}
            remove_channels(model, {g: self.removed[g.modules] for g in reg.groups})
            return
        weights = [model.get_submodule(n).weight.detach() for n in reg.layers]
        if cfg.sparsity is None:
            keeps = [(w.abs() > cfg.threshold).to(w.dtype) for w in weights]
        elif cfg.scope == "global":
            keeps = smallest_masks([w.abs() for w in weights], cfg.sparsity)
        else:
            keeps = [smallest_mask(w.abs().reshape(-1), cfg.sparsity).reshape(w.shape) for w in weights]
        self.masked = {}
        for name, keep in zip(reg.layers, keeps):
            if not bool(keep.all()):
                apply_mask(model.get_submodule(name), keep)
            self.masked[name] = int((keep == 0).sum())

    def zero_channels(self, norms: torch.Tensor, group: ChannelGroup) -> list[int]:
        """Channels of ``group`` to remove: ``‖W_c‖ <= threshold`` (or the ``ratio`` smallest),
        the largest ``min_channels`` always kept."""
        cfg = self.config
        order = torch.sort(norms, stable=True).indices
        n = round(cfg.ratio * group.channels) if cfg.ratio is not None else int((norms <= cfg.threshold).sum())
        n = min(n, group.channels - min(cfg.min_channels, group.channels))
        return sorted(order[:n].tolist())


@hookimpl
def register_pruners(register):
    register(RegularizationPruner)
