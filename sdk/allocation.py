"""Per-layer sparsity allocation: the pruners that give each layer its own level share this.

``sensitivity`` allocates from measured curves, ``energy-aware`` from the
target's cost model; both prune *units* to a count each:

=============  ===================================  ===================================
granularity    one unit is                          pruned by
=============  ===================================  ===================================
``fine``       the weight of one conv / linear      the ``k`` smallest ``|w|`` zeroed
               layer (``size``: its weights)        by a mask (:mod:`sdk.masks`)
``filter``     one prunable channel group           the ``k`` channels of lowest mean
               (:mod:`sdk.channels`; ``size``:      filter L1 removed physically
               its channels)                        (:func:`sdk.channels.remove_channels`)
=============  ===================================  ===================================

Mean filter L1 of channel ``c``: ``s_c = Σ_producers ‖W_p[c]‖₁ / numel(W_p[c])``
(the mean makes producers of different filter sizes, coupled by a residual add,
count alike; within one producer it ranks as the plain L1 norm does).  Ties go
by position, so every count is exact.  A filter unit never loses its last
``min_channels`` channels (``Unit.limit``).

:func:`allocate` turns per-unit curves ``(pruned count, loss)`` into counts that
prune exactly ``total`` with the least summed loss (see there).

>>> import torch
>>> net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
>>> [(u.name, u.size) for u in units(net, "fine")]
[('0', 16), ('2', 8)]
>>> net = prune(net, {"0": 12}, "fine")
>>> int((net[0].weight == 0).sum()), int((net[2].weight == 0).sum())
(12, 0)
"""

from __future__ import annotations

import copy
import dataclasses
import math
from typing import Mapping, Sequence

import torch

from .channels import ChannelGroup, channel_groups, filter_l1, remove_channels, select_groups
from .errors import ConfigError
from .masks import apply_mask, prunable_layers, smallest_mask

GRANULARITIES = ("fine", "filter")


@dataclasses.dataclass(frozen=True)
class Unit:
    """What one entry of an allocation prunes: ``name`` (the layer, or the group's producing
    layers joined by ``+``), ``size`` (weights or channels), ``limit`` (the most that may go),
    ``modules`` (the layers whose weights or output channels it prunes), ``group`` (filter)."""

    name: str
    size: int
    limit: int
    modules: tuple[str, ...]
    group: ChannelGroup | None = None

    def count(self, level: float) -> int:
        """Units pruned at fraction ``level``: ``round(level · size)``, at most ``limit``."""
        return min(int(round(level * self.size)), self.limit)


def units(model: torch.nn.Module, granularity: str, example: tuple | None = None, *,
          layer_types: Sequence[str] = ("Conv1d", "Conv2d", "Linear"), exclude: Sequence[str] = (),
          min_channels: int = 1) -> list[Unit]:
    """The units of ``model`` in model (fine) or graph (filter) order; ``filter`` traces the
    model on ``example`` (a tuple of input tensors)."""
    if granularity == "fine":
        return [Unit(n, m.weight.numel(), m.weight.numel(), (n,))
                for n, m in prunable_layers(model, tuple(layer_types), tuple(exclude))]
    if granularity != "filter":
        raise ConfigError(f"granularity={granularity!r} is not allowed; choose one of "
                          + ", ".join(map(repr, GRANULARITIES)))
    out = []
    for g in select_groups(channel_groups(model, example), exclude):
        producers = tuple(dict.fromkeys(s.module for s in g.of_role("out")))
        if producers:
            out.append(Unit("+".join(producers), g.channels, max(g.channels - min_channels, 0), producers, g))
    return out


def lowest_channels(model: torch.nn.Module, group: ChannelGroup, k: int) -> list[int]:
    """The ``k`` channels of ``group`` with the lowest mean filter L1 (ties by index)."""
    if k <= 0:
        return []
    return sorted(torch.sort(filter_l1(model, group, mean=True), stable=True).indices[:k].tolist())


def prune(model: torch.nn.Module, counts: Mapping[str, int], granularity: str,
          found: Sequence[Unit] | None = None, example: tuple | None = None) -> torch.nn.Module:
    """Prune ``counts[unit name]`` of each unit of ``model`` (in place) and return it.

    ``found``: the units as :func:`units` listed them for this model (filter groups must
    be current: traced again otherwise, on ``example``).
    """
    if granularity == "fine":
        for name, k in counts.items():
            mod = model.get_submodule(name)
            w = mod.weight.detach()
            apply_mask(mod, smallest_mask(w.abs().reshape(-1), k / w.numel()).reshape(w.shape))
        return model
    by_name = {u.name: u for u in (found if found is not None else units(model, "filter", example))}
    plan = {}
    for name, k in counts.items():
        unit = by_name[name]
        if k > unit.limit:
            raise ConfigError(f"unit {name!r} may lose at most {unit.limit} of its {unit.size} channels, "
                              f"asked for {k}")
        plan[unit.group] = lowest_channels(model, unit.group, k)
    return remove_channels(model, plan)


def pruned_alone(model: torch.nn.Module, unit: Unit, count: int, granularity: str) -> torch.nn.Module:
    """A copy of ``model`` with only ``unit`` pruned, by ``count`` (``model`` is left as it is)."""
    return prune(copy.deepcopy(model), {unit.name: count}, granularity, [unit])


def allocate(curves: Sequence[Sequence[tuple[int, float]]], total: int) -> list[int]:
    """Counts per curve, summing to ``total``, with the least summed loss.

    Each curve is the points ``(pruned count, loss)`` of one unit, ``(0, loss
    unpruned)`` among them; between points the loss is taken as linear, and the
    units' losses as adding up (each was measured with the others intact).  The
    rule: replace every curve by its lower convex hull, cut the hulls into
    segments, and take segments in order of increasing loss per pruned unit
    (ties: earlier unit, then earlier segment) until ``total`` are pruned, the
    last segment partly.  That is the exact minimum over the hulls (a fractional
    knapsack: slopes rise along each hull, so a unit's segments are taken in
    order); where a curve is convex, the hull is the curve.  Counts are whole
    because the points are.  More than the curves reach raises
    :class:`ConfigError`.

    >>> allocate([[(0, 0.0), (10, 1.0)], [(0, 0.0), (10, 0.1)]], 12)
    [2, 10]
    >>> allocate([[(0, 0.0), (4, 0.9), (8, 1.0)]], 6)      # the hull skips the bump at 4
    [6]
    """
    segments = []
    for u, points in enumerate(curves):
        best: dict[int, float] = {}
        for n, loss in points:
            best[int(n)] = min(float(loss), best.get(int(n), math.inf))
        if 0 not in best:
            raise ConfigError(f"curve {u} has no point at count 0 (the unpruned loss)")
        hull = _lower_hull(sorted(best.items()))
        for j, ((n0, l0), (n1, l1)) in enumerate(zip(hull, hull[1:])):
            segments.append(((l1 - l0) / (n1 - n0), u, j, n1 - n0))
    reach = sum(w for *_, w in segments)
    if total > reach:
        raise ConfigError(f"the curves reach {reach} pruned units in all, {total} were asked for: "
                          "add a higher level or lower the target")
    counts = [0] * len(curves)
    left = total
    for _, u, _, width in sorted(segments):
        if left == 0:
            break
        take = min(width, left)
        counts[u] += take
        left -= take
    return counts


def _lower_hull(points: list[tuple[int, float]]) -> list[tuple[int, float]]:
    """Andrew's monotone chain, lower half, of points sorted by count (collinear points dropped)."""
    hull: list[tuple[int, float]] = []
    for p in points:
        while len(hull) >= 2 and ((hull[-1][0] - hull[-2][0]) * (p[1] - hull[-2][1])
                                  - (hull[-1][1] - hull[-2][1]) * (p[0] - hull[-2][0])) <= 0:
            hull.pop()
        hull.append(p)
    return hull
