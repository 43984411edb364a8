"""``sss`` — Sparse Structure Selection: sparse scaling factors on channels or residual blocks,
zero factors removed.

Huang & Wang, "Data-Driven Sparse Structure Selection for Deep Neural
Networks", ECCV 2018.  Each structure ``i`` (a channel, a group, a residual
block) gets a scaling factor ``λ_i`` that multiplies its output, and training
minimises

    L = Σ_(x,y) CE(f(x; W, λ), y) + γ · ‖λ‖₁

The weights ``W`` follow the configured optimizer; the factors follow the
paper's accelerated proximal gradient (``solver: apg``, :class:`sdk.penalties.APG`:
a gradient step of size ``η = factor_lr`` on the cross-entropy, then the soft
threshold ``S(z, ηγ)`` with momentum ``μ``), which sets factors to *exactly* 0.
A structure whose factor is 0 contributes exactly nothing, so removing it leaves
the function unchanged; the other factors are folded into the weights.
``solver: subgradient`` trains the factors with the optimizer on ``L`` as written
(the paper's baseline); factors then only get small, and those with
``|λ| <= zero_tol`` are set to 0 before removal (no longer function-preserving).

``structure: channels`` — one factor per channel of each prunable channel group
of :mod:`sdk.channels` (the paper's "neurons"), multiplying the outputs of the
group's BatchNorms (or, in groups without any, of its conv/linear producers), so
a zero factor zeroes the channel wherever it is read: coupled layers (residual
adds) share the factor.  Groups whose producers are not each followed by one
BatchNorm are skipped.  Zero channels are removed through
:func:`sdk.channels.remove_channels` (``min_channels`` kept per group); exact
when the ops between the scaled layer and its readers map 0 to 0 (ReLU, ReLU6,
pooling, add).

``structure: blocks`` — one factor per residual block, a module whose forward is
``x + branch(x)`` with ``branch`` one child module (MobileNetV2's inverted
residuals; found by tracing each module with its children as leaves, or named in
``blocks``): ``y = x + λ·branch(x)``.  A block whose factor is 0 is the identity
and is replaced by ``nn.Identity`` (deleted); otherwise ``λ`` is folded into the
branch's last layer, which must be a BatchNorm, conv or linear layer.

>>> import torch
>>> from plugins.prune.sss import SSSPruner
>>> SSSPruner(gamma=0.05, structure="blocks").config.solver
'apg'
"""

from __future__ import annotations

import dataclasses
import operator
from typing import Any, Callable

import torch
from torch import nn

from sdk import hookimpl
from sdk.base import Pruner
from sdk.channels import ChannelGroup, ChannelSlice, channel_groups, example_from, remove_channels, select_groups
from sdk.config import check_choice, check_range
from sdk.errors import InputError
from sdk.penalties import APG, l1
from sdk.trainer import TrainConfig, classification_loss, finetune_after, fit

_FOLDABLE = (nn.BatchNorm1d, nn.BatchNorm2d, nn.Conv1d, nn.Conv2d, nn.Linear)


@dataclasses.dataclass
class Factors:
    """The scaling factors of one :class:`SSSPruner` run and the forward hooks that apply them.

    ``params[i]`` scales ``sites[i]``: for channels a list of ``(module, offset)`` whose output
    channels ``offset … offset + len(λ) − 1`` it multiplies (``groups[i]`` is the channel group);
    for blocks the block's name (``branches[i]``: its branch child).
    """

    structure: str
    params: list[nn.Parameter]
    sites: list[Any]
    groups: list[ChannelGroup] = dataclasses.field(default_factory=list)
    branches: list[str] = dataclasses.field(default_factory=list)
    handles: list[Any] = dataclasses.field(default_factory=list)

    def detach(self) -> None:
        """Remove the forward hooks (the factors stop acting)."""
        for h in self.handles:
            h.remove()
        self.handles = []


class SSSPruner(Pruner):
    """Train sparse scaling factors (APG) on channels or residual blocks; remove the zero ones."""

    name = "sss"
    version = "1.0"
    streams = ("train",)     # trains the factors before removing

    @dataclasses.dataclass(frozen=True)
    class Config(TrainConfig):
        """The training fields (:class:`sdk.trainer.TrainConfig`) are the weights' during the sparse
        training; the factors take ``factor_lr`` and ``momentum`` (APG); fine-tuning after removal
        takes the training fields with ``finetune_epochs`` and ``finetune_lr``."""

        structure: str = "channels"           # "channels" (per channel group) or "blocks" (residual blocks)
        gamma: float = 1e-2                   # γ, weight of ‖λ‖₁
        solver: str = "apg"                   # "apg" (proximal: exact zeros) or "subgradient"
        factor_lr: float = 0.1                # η, the factors' step size (apg)
        momentum: float | None = 0.9          # APG momentum μ; None: Nesterov's (t − 1)/(t + 2)
        zero_tol: float = 0.0                 # |λ| <= zero_tol counts as zero (for subgradient)
        epochs: int = 10
        finetune_epochs: int = 0              # cross-entropy fine-tuning after removal
        finetune_lr: float | None = None      # default: lr
        min_channels: int = 1                 # channels every group keeps at least
        blocks: tuple[str, ...] = ()          # residual blocks to scale (blocks); empty: every x + f(x)
        exclude: tuple[str, ...] = ()         # modules (or parents) left alone
        input_shape: tuple[int, ...] | None = None   # example input shape when no data is given

        def __post_init__(self):
            super().__post_init__()
            check_choice("sss", "structure", self.structure, ("channels", "blocks"))
            check_choice("sss", "solver", self.solver, ("apg", "subgradient"))
            check_range("sss", "gamma", self.gamma, 0.0)
            check_range("sss", "factor_lr", self.factor_lr, 0.0, lo_open=True)
            if self.momentum is not None:
                check_range("sss", "momentum", self.momentum, 0.0, 1.0, hi_open=True)
            check_range("sss", "zero_tol", self.zero_tol, 0.0)
            check_range("sss", "finetune_epochs", self.finetune_epochs, 0)
            if self.finetune_lr is not None:
                check_range("sss", "finetune_lr", self.finetune_lr, 0.0, lo_open=True)
            check_range("sss", "min_channels", self.min_channels, 1)

    def __init__(self, config: Any = None, **options: Any) -> None:
        super().__init__(config, **options)
        self.factors: list[torch.Tensor] = []     # the trained factors (zeros exact), per site
        self.removed: dict[Any, list[int]] = {}  # channels: removed channels by group modules; blocks: {name: []}

    def apply(self, model: torch.nn.Module, data=None) -> torch.nn.Module:
        cfg = self.config
        if data is None:
            raise InputError("sss trains scaling factors and needs labelled data: pass data= as (x, y) batches")
        if not hasattr(data, "__len__"):
            data = list(data)
        factors = self.attach(model, data)
        self.train(model, data, factors)
        self.remove(model, factors)
        finetune_after(model, data, cfg, desc="sss fine-tune")
        return model.eval()

    # -- factors -------------------------------------------------------------
    def attach(self, model: torch.nn.Module, data=None) -> Factors:
        """Factors of 1 on every candidate structure, applied by forward hooks."""
        if self.config.structure == "blocks":
            return self._attach_blocks(model)
        return self._attach_channels(model, example_from(data, self.config.input_shape, self.name))

    def _attach_channels(self, model: nn.Module, example) -> Factors:
        groups = [g for g in select_groups(channel_groups(model, example), self.config.exclude)
                  if scaled_slices(model, g)]
        if not groups:
            raise InputError("sss found no channel group to scale: every prunable group needs a BatchNorm "
                             "after each producer, or none at all")
        params = [nn.Parameter(torch.ones(g.channels)) for g in groups]
        sites = [[(s.module, s.offset) for s in scaled_slices(model, g)] for g in groups]
        factors = Factors("channels", params, sites, groups=groups)
        by_module: dict[str, list[tuple[int, nn.Parameter]]] = {}
        for lam, site in zip(params, sites):
            for module, offset in site:
                by_module.setdefault(module, []).append((offset, lam))
        for module, entries in by_module.items():
            factors.handles.append(model.get_submodule(module).register_forward_hook(_channel_hook(entries)))
        return factors

    def _attach_blocks(self, model: nn.Module) -> Factors:
        found = residual_blocks(model, self.config.blocks, self.config.exclude)
        if not found:
            raise InputError("sss structure 'blocks' found no residual block (a module whose forward is "
                             "x + child(x)); name them in blocks= or use structure: channels")
        for name, branch in found.items():
            if _last_layer(model.get_submodule(f"{name}.{branch}")) is None:
                raise InputError(f"sss: the branch {name}.{branch} of residual block {name!r} does not end in a "
                                 "BatchNorm, conv or linear layer, so its factor cannot be folded into it")
        params = [nn.Parameter(torch.ones(())) for _ in found]
        factors = Factors("blocks", params, list(found), branches=list(found.values()))
        for lam, (name, branch) in zip(params, found.items()):
            hook = (lambda lam: lambda mod, inp, out: out * lam)(lam)
            factors.handles.append(model.get_submodule(f"{name}.{branch}").register_forward_hook(hook))
        return factors

    # -- training ------------------------------------------------------------
    def train(self, model: nn.Module, data, factors: Factors) -> list[float]:
        """The sparse training: weights by the optimizer, factors by APG (or the subgradient);
        per-epoch mean losses.  :attr:`factors` holds the result."""
        cfg = self.config
        if cfg.solver == "apg":
            apg = APG(factors.params, cfg.factor_lr, cfg.gamma, cfg.momentum)
            history = fit(model, data, _ce, cfg.training(), after_step=apg.step, desc="sss sparse training")
            apg.finish()
        else:
            def loss(m: nn.Module, batch: Any) -> torch.Tensor:
                return _ce(m, batch) + cfg.gamma * l1(factors.params)

            history = fit(model, data, loss, cfg.training(), params=[*model.parameters(), *factors.params],
                          desc="sss subgradient training")
            with torch.no_grad():
                for lam in factors.params:
                    lam[lam.abs() <= cfg.zero_tol] = 0.0
        self.factors = [lam.detach().clone() for lam in factors.params]
        return history

    # -- removal -------------------------------------------------------------
    def remove(self, model: nn.Module, factors: Factors) -> nn.Module:
        """Fold the factors into the weights, then remove what is zero (channels or blocks)."""
        factors.detach()
        if factors.structure == "blocks":
            return self._remove_blocks(model, factors)
        scales: dict[str, torch.Tensor] = {}
        for lam, site in zip(factors.params, factors.sites):
            for module, offset in site:
                n = _out_channels(model.get_submodule(module))
                s = scales.setdefault(module, torch.ones(n))
                s[offset:offset + len(lam)] = lam.detach()
        for module, s in scales.items():
            _fold(model.get_submodule(module), s)
        self.removed = {}
        for g, lam in zip(factors.groups, factors.params):
            zeros = torch.nonzero(lam.detach() == 0).flatten()
            keep_at_least = min(self.config.min_channels, g.channels)
            if len(zeros) > g.channels - keep_at_least:     # keep the (zero) channels of lowest index
                zeros = zeros[keep_at_least - (g.channels - len(zeros)):]
            self.removed[g.modules] = zeros.tolist()
        remove_channels(model, {g: self.removed[g.modules] for g in factors.groups})
        return model

    def _remove_blocks(self, model: nn.Module, factors: Factors) -> nn.Module:
        self.removed = {}
        for lam, name, branch in zip(factors.params, factors.sites, factors.branches):
            if float(lam.detach()) == 0.0:
                parent, _, leaf = name.rpartition(".")
                setattr(model.get_submodule(parent) if parent else model, leaf, nn.Identity())
                self.removed[name] = []
            else:
                last = _last_layer(model.get_submodule(f"{name}.{branch}"))
                _fold(last, torch.full((_out_channels(last),), float(lam.detach())))
        return model


def _ce(model: nn.Module, batch: Any) -> torch.Tensor:
    return classification_loss(model, batch, who="sss")


def scaled_slices(model: nn.Module, group: ChannelGroup) -> list[ChannelSlice]:
    """The slices of ``group`` whose outputs a channel factor multiplies: its BatchNorms when each
    producer (conv, linear, depthwise) has one, its producers when it has none; ``[]``: not a
    candidate (or a BatchNorm without affine parameters to fold into)."""
    norms = group.of_role("norm")
    producers = group.of_role("out", "depthwise")
    if norms and len(norms) == len(producers):
        return norms if all(model.get_submodule(s.module).affine for s in norms) else []
    return producers if not norms and not group.of_role("depthwise") else []


def _channel_hook(entries: list[tuple[int, nn.Parameter]]) -> Callable:
    """A forward hook multiplying output channels ``offset …`` by each entry's factor."""
    entries = sorted(entries, key=lambda e: e[0])

    def hook(mod: nn.Module, inp: Any, out: torch.Tensor) -> torch.Tensor:
        parts, at = [], 0
        for offset, lam in entries:
            parts += [out.new_ones(offset - at), lam.to(out.dtype)]
            at = offset + len(lam)
        parts.append(out.new_ones(out.shape[1] - at))
        return out * torch.cat(parts).view(1, -1, *[1] * (out.dim() - 2))

    return hook


def _out_channels(module: nn.Module) -> int:
    return module.num_features if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)) else module.weight.shape[0]


def _fold(module: nn.Module, scale: torch.Tensor) -> None:
    """``module(x) · scale`` (per output channel) into the module's own parameters."""
    with torch.no_grad():
        w = module.weight
        w.mul_(scale.to(w.dtype).view(-1, *[1] * (w.dim() - 1)))
        if module.bias is not None:
            module.bias.mul_(scale.to(module.bias.dtype))


def _last_layer(branch: nn.Module) -> nn.Module | None:
    """The layer whose output is the branch's (itself, or a Sequential's last), when foldable."""
    while isinstance(branch, nn.Sequential) and len(branch):
        branch = branch[-1]
    if isinstance(branch, _FOLDABLE) and not (isinstance(branch, (nn.BatchNorm1d, nn.BatchNorm2d))
                                              and not branch.affine):
        return branch
    return None


class _ChildrenAsLeaves(torch.fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return "." not in qualname


def residual_branch(module: nn.Module) -> str | None:
    """The child ``c`` when ``module.forward(x)`` is exactly ``x + c(x)`` (or ``c(x) + x``), else ``None``."""
    try:
        graph = _ChildrenAsLeaves().trace(module)
    except Exception:  # noqa: BLE001  (untraceable forwards are not residual blocks we can rewrite)
        return None
    nodes = list(graph.nodes)
    if [n.op for n in nodes] != ["placeholder", "call_module", "call_function", "output"]:
        return None
    x, call, add, out = nodes
    is_add = add.target in (operator.add, torch.add)
    if not is_add or call.args != (x,) or set(add.args) != {x, call} or len(add.args) != 2 or out.args[0] is not add:
        return None
    return call.target


def residual_blocks(model: nn.Module, names: tuple[str, ...] = (), exclude: tuple[str, ...] = ()) -> dict[str, str]:
    """``{block: branch child}`` of the modules named in ``names`` (each must be ``x + child(x)``:
    :class:`InputError` otherwise), or of every such module (outermost first, not inside another),
    skipping ``exclude`` and its children."""
    def excluded(n: str) -> bool:
        return any(n == e or n.startswith(e + ".") for e in exclude)

    if names:
        found = {}
        for n in names:
            branch = residual_branch(model.get_submodule(n))
            if branch is None:
                raise InputError(f"sss: module {n!r} is not a residual block: its forward must be x + child(x)")
            found[n] = branch
        return found
    found: dict[str, str] = {}
    for n, m in model.named_modules():
        if not n or excluded(n) or any(n.startswith(b + ".") for b in found):
            continue
        branch = residual_branch(m)
        if branch is not None:
            found[n] = branch
    return found


@hookimpl
def register_pruners(register):
    register(SSSPruner)
