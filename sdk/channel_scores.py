"""Data-driven channel importance and iterative channel removal, shared by ``taylor`` and ``apoz``.

Both criteria look at the feature maps a channel group (:mod:`sdk.channels`)
carries while data flows through the model, measured at two kinds of *site*:

* **consumer inputs** (:func:`consumer_sites`): the tensor each ``"in"`` slice
  of the group reads.  Removing channel ``c`` is *exactly* zeroing it in
  every consumer input, so the first-order Taylor change of the loss is
  ``-Σ_sites Σ_positions a·g`` with ``g`` the gradient of that one use (each
  site is tapped through its own copy of the tensor).  Max-/average-pooling,
  ReLU and flatten are positively homogeneous, so ``Σ a·g`` is the same on
  either side of them: scoring at the consumer equals scoring the post-ReLU
  map, up to the number of positions, a per-group constant.
* **activations** (:func:`activation_sites`): walking back from each consumer
  input through pooling, dropout, identity and flatten to the ReLU (``relu``,
  ``relu6``) that made it; the zeros are counted on that ReLU's output, before
  pooling hides them.  Groups with no such ReLU have no activation sites.

:func:`taylor_importance` (Molchanov et al. 2017)::

    Θ_c = 1/N Σ_n | Σ_{s, m} a_{n,s,c,m} · ∂C_n/∂a_{n,s,c,m} | / Σ_s M_s
    Θ̂_c = Θ_c / ‖Θ‖₂            (per group: the paper's layer-wise L2 normalisation)

with ``C_n`` the cross-entropy of sample ``n`` (``N`` samples over the scored
batches, ``M_s`` positions per channel at site ``s``).  With one site this is
the paper's criterion: the absolute mean over the feature map, computed for
each example and averaged over the examples (the mean of ``a·g`` over a
converged network's data is near zero; its magnitude per example is not).  :func:`apoz` (Hu et al. 2016)::

    APoZ_c = #{a_{n,s,c,m} = 0} / (N · Σ_s M_s)

:func:`prune_iteratively` runs the schedule both pruners use: ``steps``
rounds of *score → remove the least important → fine-tune a few batches*, with
the cumulative removal after round ``t`` at ``round(k · t / steps)`` of the
target ``k``.  With ``scope="global"`` ``k = round(ratio · N)`` over all
candidate channels ranked together (normalised scores compare across
layers); with ``scope="group"`` each group of ``C`` channels loses
``round(ratio · C)`` (Python's ``round``, as ``filter-l1``).  No group drops
below ``min_channels``; ties go by index, so the counts are exact.

>>> import torch
>>> net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(),
...                           torch.nn.Linear(4 * 6 * 6, 2))
>>> x = torch.randn(8, 1, 8, 8)
>>> (group,) = [g for g in channel_groups(net, (x[:1],)) if g.prunable]
>>> rate = apoz(net, [group], [x])[group]
>>> torch.allclose(rate, (net[1](net[0](x)) == 0).double().mean((0, 2, 3)))
True
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from torch import nn

from .channels import ChannelGroup, channel_groups, example_from, remove_channels, select_groups, trace
from .config import check_choice, check_range
from .errors import ConfigError, InputError
from .trainer import TrainConfig, finetune, split_batch

SCOPES = ("global", "group")


@dataclasses.dataclass(frozen=True)
class IterativeConfig(TrainConfig):
    """The schedule of :func:`prune_iteratively`; the training fields (:class:`sdk.trainer.TrainConfig`)
    are the fine-tuning's (``epochs`` is not used: ``finetune_steps`` between rounds,
    ``finetune_epochs`` after the last)."""

    min_epochs = 0
    ratio: float = 0.5                # fraction of the candidate channels removed
    scope: str = "global"             # "global": one ranking over all groups; "group": ratio per group
    steps: int = 10                   # removal rounds (steps ≥ channels to remove: one per round)
    score_batches: int = 10           # batches each round's scores are measured on
    finetune_steps: int = 10          # optimizer steps after each round's removal (0: none)
    finetune_epochs: int = 0          # fine-tuning epochs after the last round
    min_channels: int = 1             # channels every group keeps at least
    exclude: tuple[str, ...] = ()     # modules (or parents) that keep their output channels

    def __post_init__(self):
        super().__post_init__()
        owner = self.type_tag
        check_range(owner, "ratio", self.ratio, 0.0, 1.0, hi_open=True)
        check_choice(owner, "scope", self.scope, SCOPES)
        check_range(owner, "steps", self.steps, 1)
        check_range(owner, "score_batches", self.score_batches, 1)
        check_range(owner, "finetune_steps", self.finetune_steps, 0)
        check_range(owner, "finetune_epochs", self.finetune_epochs, 0)
        check_range(owner, "min_channels", self.min_channels, 1)
        for name in ("steps", "score_batches", "finetune_steps", "finetune_epochs", "min_channels"):
            if not isinstance(getattr(self, name), int):
                raise ConfigError(f"{owner}: {name} must be a whole number, got {getattr(self, name)!r}")


# -- sites -------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Site:
    """Where a group's channels are read: the value of fx node ``node`` (or, with
    ``consumer``, that node's first input as this one node sees it).  Channel ``c`` is
    dim-1 index ``offset + c`` of an ``(N, C, ...)`` value, features
    ``offset + c·repeat … + repeat − 1`` of a flat ``(N, F)`` one."""

    node: str
    offset: int = 0
    repeat: int = 1
    consumer: bool = False


_ACT_MODULES = (nn.ReLU, nn.ReLU6)
_ACT_FUNCS = {"relu", "relu_", "relu6"}
_WALK_MODULES = (nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d,
                 nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.Dropout, nn.Dropout1d,
                 nn.Dropout2d, nn.Identity, nn.Flatten)
_WALK_FUNCS = {"max_pool1d", "max_pool2d", "avg_pool1d", "avg_pool2d", "adaptive_avg_pool1d",
               "adaptive_avg_pool2d", "adaptive_max_pool2d", "dropout", "dropout1d", "dropout2d",
               "contiguous", "clone", "flatten", "view", "reshape"}


def _consumer_nodes(gm: torch.fx.GraphModule, module: str) -> list[torch.fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "call_module" and n.target == module]


def _op_name(gm: torch.fx.GraphModule, node: torch.fx.Node) -> Any:
    if node.op == "call_module":
        return gm.get_submodule(node.target)
    if node.op in ("call_function", "call_method"):
        return node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
    return None


def consumer_sites(gm: torch.fx.GraphModule, group: ChannelGroup) -> list[Site]:
    """One site per call of each module that reads ``group`` (its ``"in"`` slices)."""
    return [Site(n.name, s.offset, s.repeat, consumer=True)
            for s in group.of_role("in") for n in _consumer_nodes(gm, s.module)]


def activation_sites(gm: torch.fx.GraphModule, group: ChannelGroup) -> list[Site]:
    """The ReLU outputs behind the consumer inputs of ``group`` (no duplicates; ``[]`` when a
    consumer input comes from anything but a ReLU through pooling, dropout or flatten)."""
    sites: dict[tuple[str, int], Site] = {}
    for s in group.of_role("in"):
        for consumer in _consumer_nodes(gm, s.module):
            node = consumer.args[0]
            while isinstance(node, torch.fx.Node):
                op = _op_name(gm, node)
                if isinstance(op, _ACT_MODULES) or op in _ACT_FUNCS:
                    break
                if not (isinstance(op, _WALK_MODULES) or op in _WALK_FUNCS):
                    node = None
                    break
                node = node.args[0]
            if not isinstance(node, torch.fx.Node):
                continue
            shape = node.meta.get("channels_shape") or ()
            site = Site(node.name, s.offset, s.repeat) if len(shape) == 2 else Site(node.name, s.offset // s.repeat)
            sites.setdefault((site.node, site.offset), site)
    return list(sites.values())


class _Tap(nn.Module):
    """Records the value flowing through it.  A consumer's tap passes on a copy of its input,
    so the gradient recorded there is that one use's share."""

    def __init__(self, consumer: bool):
        super().__init__()
        self.consumer, self.seen = consumer, []

    def forward(self, x):
        if self.consumer:
            x = x.clone() if x.requires_grad else x.detach().requires_grad_(torch.is_grad_enabled())
        self.seen.append(x)
        return x


SiteFinder = Callable[[torch.fx.GraphModule, ChannelGroup], list[Site]]


def _tapped(model: nn.Module, example: tuple, groups: Sequence[ChannelGroup], find: SiteFinder):
    """``model`` traced with a tap at the sites ``find`` gives each group:
    ``(graph module, [(group, site, tap), ...])`` (groups without sites are left out)."""
    gm = trace(model, example)
    nodes = {n.name: n for n in gm.graph.nodes}
    where = {g: find(gm, g) for g in groups}
    made: dict[tuple[str, bool], _Tap] = {}
    taps = []
    for group, sites in where.items():
        for site in sites:
            key = (site.node, site.consumer)
            if key not in made:
                tap = made[key] = _Tap(site.consumer)
                name = f"_channel_tap_{len(made)}"
                gm.add_submodule(name, tap)
                node = nodes[site.node]
                if site.consumer:
                    with gm.graph.inserting_before(node):
                        t = gm.graph.call_module(name, (node.args[0],))
                    node.replace_input_with(node.args[0], t)
                else:
                    with gm.graph.inserting_after(node):
                        gm.graph.call_module(name, (node,))
            taps.append((group, site, made[key]))
    gm.recompile()
    return gm, taps


def _per_channel(t: torch.Tensor, site: Site, channels: int) -> torch.Tensor:
    """``(N, channels, positions)``: the group's part of a site's value."""
    if t.dim() == 2:
        return t[:, site.offset:site.offset + channels * site.repeat].reshape(t.shape[0], channels, site.repeat)
    return t[:, site.offset:site.offset + channels].reshape(t.shape[0], channels, -1)


def _inputs(batch: Any) -> tuple:
    x, _ = split_batch(batch)
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def _batches(batches: Iterable | None, who: str) -> list:
    batches = list(batches) if batches is not None else []
    if not batches:
        raise InputError(f"{who} measures the channels on data: pass at least one batch")
    return batches


class _Measuring:
    """Eval mode while measuring; the taps are emptied afterwards."""

    def __init__(self, model: nn.Module, taps: list):
        self.model, self.taps, self.was = model, taps, model.training

    def __enter__(self):
        self.model.eval()
        return self

    def clear(self) -> None:
        for _, _, tap in self.taps:
            tap.seen.clear()

    def __exit__(self, *exc) -> None:
        self.clear()
        self.model.train(self.was)


def taylor_importance(model: nn.Module, groups: Sequence[ChannelGroup], batches: Iterable, *,
                      example: tuple | None = None, normalize: bool = True) -> dict[ChannelGroup, torch.Tensor]:
    """First-order Taylor importance ``Θ_c`` of each channel of ``groups`` on labelled ``batches``
    (float64 per group; L2-normalised per group unless ``normalize=False``).  The model runs in
    eval mode; its parameters' ``.grad`` are left untouched.  ``example``: an input to trace
    with (default: the first sample of ``batches``).

    >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    >>> (g,) = [g for g in channel_groups(net, (torch.randn(1, 3),)) if g.prunable]
    >>> score = taylor_importance(net, [g], [(torch.randn(5, 3), torch.tensor([0, 1, 0, 1, 1]))])[g]
    >>> tuple(score.shape), round(float(score.norm()), 6)
    ((4,), 1.0)
    """
    batches = _batches(batches, "taylor importance")
    gm, taps = _tapped(model, example or example_from(batches, None, "taylor"), groups, consumer_sites)
    sums = {g: torch.zeros(g.channels, dtype=torch.float64) for g in groups}
    positions = {g: 0 for g in groups}
    samples = 0
    with _Measuring(model, taps) as run:
        for batch in batches:
            _, y = split_batch(batch)
            if y is None:
                raise InputError("taylor needs labelled data (the loss gradient ranks the channels): "
                                 "pass (x, y) batches")
            run.clear()
            with torch.enable_grad():
                loss = nn.functional.cross_entropy(gm(*_inputs(batch)), y, reduction="sum")
                values = list({id(a): a for _, _, tap in taps for a in tap.seen}.values())
                grads = dict(zip(map(id, values), torch.autograd.grad(loss, values, allow_unused=True)))
            change = {g: torch.zeros(len(y), g.channels, dtype=torch.float64) for g in groups}
            for g, site, tap in taps:
                for a in tap.seen:
                    grad = grads[id(a)]
                    if grad is not None:
                        change[g] += _per_channel(a.detach() * grad, site, g.channels).double().sum(2)
                    if not samples:
                        positions[g] += _per_channel(a, site, g.channels).shape[2]
            for g in groups:
                sums[g] += change[g].abs().sum(0)      # |first-order change| of each sample
            samples += len(y)
    scores = {}
    for g in groups:
        theta = sums[g] / (samples * max(positions[g], 1))
        norm = theta.norm()
        scores[g] = theta / norm if normalize and norm > 0 else theta
    return scores


def apoz(model: nn.Module, groups: Sequence[ChannelGroup], batches: Iterable, *,
         example: tuple | None = None) -> dict[ChannelGroup, torch.Tensor]:
    """Average percentage of zeros of the post-ReLU activations of each channel of ``groups``
    over ``batches`` (inputs alone suffice): fractions in [0, 1], float64.  Groups without
    activation sites (:func:`activation_sites`) are left out of the result."""
    batches = _batches(batches, "apoz")
    gm, taps = _tapped(model, example or example_from(batches, None, "apoz"), groups, activation_sites)
    zeros = {g: torch.zeros(g.channels, dtype=torch.float64) for g, _, _ in taps}
    counts = {g: 0 for g in zeros}
    with _Measuring(model, taps) as run, torch.no_grad():
        for batch in batches:
            run.clear()
            gm(*_inputs(batch))
            for g, site, tap in taps:
                for a in tap.seen:
                    per = _per_channel(a, site, g.channels)
                    zeros[g] += (per == 0).double().sum((0, 2))
                    counts[g] += per.shape[0] * per.shape[2]
    return {g: zeros[g] / counts[g] for g in zeros}


# -- the iterative schedule --------------------------------------------------

Importance = Callable[[nn.Module, Sequence[ChannelGroup], list], Mapping[ChannelGroup, torch.Tensor]]


def group_key(group: ChannelGroup) -> str:
    """A name for ``group`` that survives removal: its first producing module."""
    return group.of_role("out")[0].module


def _window(items: list, start: int, n: int) -> list:
    """``n`` items from ``start`` on, cycling through ``items``."""
    return [items[(start + i) % len(items)] for i in range(n)]


def _removal_counts(sizes: Mapping[str, int], cfg: IterativeConfig) -> dict[str, int] | int:
    """Channels to remove: per group (``scope="group"``) or in all (``"global"``)."""
    floor = {k: min(cfg.min_channels, c) for k, c in sizes.items()}
    if cfg.scope == "group":
        return {k: c - max(c - round(cfg.ratio * c), floor[k]) for k, c in sizes.items()}
    return min(round(cfg.ratio * sum(sizes.values())), sum(c - floor[k] for k, c in sizes.items()))


def _lowest(scores: Mapping[ChannelGroup, torch.Tensor], todo: Mapping[str, int] | int,
            floor: int) -> dict[ChannelGroup, list[int]]:
    """The lowest-scoring channels, lowest first: ``todo[key]`` per group, or ``todo`` over all
    groups (ties by graph order and index), no group falling below ``floor`` channels."""
    groups = list(scores)
    if isinstance(todo, Mapping):
        return {g: torch.sort(scores[g], stable=True).indices[:todo[group_key(g)]].tolist() for g in groups}
    flat = torch.cat([scores[g].double() for g in groups])
    owner = [(g, c) for g in groups for c in range(g.channels)]
    plan: dict[ChannelGroup, list[int]] = {g: [] for g in groups}
    for i in torch.sort(flat, stable=True).indices.tolist():
        if todo == 0:
            break
        g, c = owner[i]
        if g.channels - len(plan[g]) > min(floor, g.channels):
            plan[g].append(c)
            todo -= 1
    return plan


def prune_iteratively(model: nn.Module, train: Iterable | None, cfg: IterativeConfig, importance: Importance, *,
                      score_data: Iterable | None = None, desc: str = "pruning") -> dict[str, list[int]]:
    """Remove channels of ``model`` in place over ``cfg.steps`` rounds, lowest ``importance`` first.

    Each round scores the current channels on the next ``cfg.score_batches`` batches of
    ``score_data`` (default ``train``), removes its share of the target physically and
    fine-tunes ``cfg.finetune_steps`` batches of ``train`` (cycling through it);
    ``cfg.finetune_epochs`` follow the last round.  Candidates are the prunable groups
    (``cfg.exclude`` left out) that ``importance`` scores.  Returns, per candidate group
    (:func:`group_key`), the channel indices of the *original* model removed, in the order they
    went (round by round, lowest score first).
    """
    train = list(train) if train is not None else None
    if cfg.finetune_steps or cfg.finetune_epochs:
        if not train or split_batch(train[0])[1] is None:
            raise InputError(f"{desc} fine-tunes and needs labelled data: pass data= as (x, y) batches, or set "
                             "finetune_steps: 0 and finetune_epochs: 0")
    scoring = _batches(score_data if score_data is not None else train, desc)
    example = example_from(scoring, None, desc)

    def current() -> list[ChannelGroup]:
        return select_groups(channel_groups(model, example), cfg.exclude)

    scores = dict(importance(model, current(), _window(scoring, 0, min(cfg.score_batches, len(scoring)))))
    if not scores:
        raise InputError(f"{desc}: no channel group of {type(model).__name__} can be scored (see "
                         "sdk.channel_scores for the sites each criterion reads)")
    alive = {group_key(g): list(range(g.channels)) for g in scores}
    goal = _removal_counts({k: len(v) for k, v in alive.items()}, cfg)
    removed: dict[str, list[int]] = {k: [] for k in alive}
    read = tuned = 0
    for t in range(1, cfg.steps + 1):
        if isinstance(goal, dict):
            todo: dict[str, int] | int = {k: round(n * t / cfg.steps) - len(removed[k]) for k, n in goal.items()}
            if not any(todo.values()):
                continue
        else:
            todo = round(goal * t / cfg.steps) - sum(map(len, removed.values()))
            if not todo:
                continue
        if scores is None:
            groups = [g for g in current() if group_key(g) in alive]
            scores = dict(importance(model, groups, _window(scoring, read, min(cfg.score_batches, len(scoring)))))
        read += cfg.score_batches
        plan = _lowest(scores, todo, cfg.min_channels)
        scores = None
        for g, idx in plan.items():
            kept, gone = alive[group_key(g)], set(idx)
            removed[group_key(g)] += [kept[c] for c in idx]
            alive[group_key(g)] = [c for i, c in enumerate(kept) if i not in gone]
        remove_channels(model, plan)
        if cfg.finetune_steps:
            finetune(model, _window(train, tuned, cfg.finetune_steps), cfg.training(epochs=1, max_steps=None),
                     desc=f"{desc} round {t}")
            tuned += cfg.finetune_steps
    if cfg.finetune_epochs:
        finetune(model, train, cfg.training(epochs=cfg.finetune_epochs), desc=f"{desc} fine-tune")
    model.eval()
    return removed
