"""``mixed-precision`` — per-layer int8 / int4 / float32 weights under a size or BOPs budget.

Each conv / linear layer gets one of ``choices`` for its weights; activations are
int8 with calibrated ranges, as ``ptq`` gives them.  The allocation follows the
HAWQ family (Dong et al., "HAWQ-V3", ICML 2021; QBitOpt, OMPQ): a per-layer
*sensitivity* for each precision, then the choice that minimises the summed
sensitivity subject to the budget, solved exactly as a multiple-choice knapsack.

**Sensitivity** (measured, not a Hessian proxy): the increase of the output mean
squared error on the calibration batches (at most ``sensitivity_batches``) when
only that layer's weights are replaced by their quantize-dequantize at that
precision (per-channel symmetric, the specs ``ptq`` would ship); float32 is 0.
Summing them assumes the layers' errors add, as HAWQ does.

**Budget.** ``max_weight_bytes`` bounds the bytes the target stores for conv /
linear weights *and biases*: what the artifact's layer rows say (``bytes`` in
``profile.json`` ``layers``; a bias-less layer still ships a zero int32 bias).
Integer weights are one byte a code, except 4-bit codes that the LiteRT lowering
stores INT4, two a byte (:func:`sdk.litert.lowering.int_storage`):
``int4_storage="where-fast"`` (``arm-int8``'s default) counts INT4 only for fully
connected layers with an even input width and a 4-bit convolution as one byte a
weight, as it ships; ``"always"`` matches ``arm-int8`` with ``int4="always"``.
``where-fast`` never counts less than a target stores, so it is the safe choice
when unsure.  Biases are 4 bytes each (int32, or float32 in a float layer);
float32 weights 4.  ``max_bops`` bounds Σ MACs · weight bits · activation bits over
the conv / linear layers (8 · 8 int8, 4 · 8 int4, 32 · 32 float32).  Both may be
given.  Other constants (elementwise operands) are not part of the budget.

**Solver.** A dynamic programme over the layers that keeps, after each layer, the
Pareto set of partial assignments (resources used, summed sensitivity), dropping
any that cannot meet the budget with the cheapest choices of the remaining layers:
exact (no bucketing; a dominated partial assignment cannot complete better than
its dominator), pseudo-polynomial (at most one state per distinct byte total).  A
budget below the cheapest assignment is refused with :class:`~sdk.errors.ConfigError`
naming the minimum achievable.

>>> from plugins.quantize.mixed_precision import MixedPrecision, allocate
>>> MixedPrecision(max_weight_bytes=10_000).config.choices
('int8', 'int4', 'float32')
>>> allocate([[1.0, 5.0], [2.0, 3.0]], [[(8,), (4,)], [(8,), (4,)]], (12,))
([0, 1], 4.0)
"""

from __future__ import annotations

import bisect
import dataclasses
import math
from typing import Sequence

import numpy as np
import torch

from sdk import hookimpl
from sdk.base import Quantizer
from sdk.calibrate import activation_specs, weight_specs
from sdk.config import Config, check_choice, check_range
from sdk.encoding import float_spec, weight_spec
from sdk.errors import ConfigError
from sdk.graph import WEIGHTED_OPS, macs
from sdk.litert.lowering import int_storage, litert_op
from sdk.log import progress as progress_bar
from sdk.quant import OBSERVERS, QuantPlan, dequantize

PRECISIONS = ("int8", "int4", "float32")
#: (weight bits, activation bits) of a layer's multiply-accumulates at each precision
BOP_BITS = {"int8": (8, 8), "int4": (4, 8), "float32": (32, 32)}


class MixedPrecision(Quantizer):
    """Per-layer weight precision from measured sensitivities, under a guaranteed budget."""

    name = "mixed-precision"
    version = "1.0"

    @dataclasses.dataclass(frozen=True)
    class Config(Config):
        max_weight_bytes: int | None = None      # stored conv/linear weight + bias bytes (module docstring)
        max_bops: int | None = None              # Σ MACs · weight bits · activation bits
        choices: tuple[str, ...] = PRECISIONS
        int4_storage: str = "where-fast"         # the target's int4 option: how 4-bit codes are stored
        activation_observer: str = "mse"
        percentile: float = 99.99
        sensitivity_batches: int = 8             # calibration batches the sensitivities are measured on
        num_batches: int | None = None           # activation calibration: at most this many batches
        progress: bool = True

        def __post_init__(self):
            owner = "mixed-precision"
            for field in ("max_weight_bytes", "max_bops"):
                value = getattr(self, field)
                if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                    raise ConfigError(f"{owner}: {field}={value!r} must be a positive integer (or None)")
            if not self.choices or len(set(self.choices)) != len(self.choices):
                raise ConfigError(f"{owner}: choices={self.choices!r} must name distinct precisions of "
                                  f"{', '.join(PRECISIONS)}")
            for choice in self.choices:
                check_choice(owner, "choices", choice, PRECISIONS)
            check_choice(owner, "int4_storage", self.int4_storage, ("where-fast", "always"))
            check_choice(owner, "activation_observer", self.activation_observer, OBSERVERS)
            check_range(owner, "percentile", self.percentile, 50.0, 100.0, lo_open=True)
            check_range(owner, "sensitivity_batches", self.sensitivity_batches, 1)
            if self.num_batches is not None:
                check_range(owner, "num_batches", self.num_batches, 1)

    def spec(self, w: np.ndarray, hint, precision: str):
        """The weight spec of one precision (``ptq``'s per-channel symmetric grid; a hint is honoured)."""
        if precision == "float32":
            return float_spec(w, hint)
        return weight_spec(w, hint, bits=4 if precision == "int4" else None)

    def layers(self, graph) -> list[dict]:
        """One row per conv / linear weight: ``tensor``, ``layer``, and per choice its ``spec``,
        stored ``bytes`` and ``bops`` (module docstring)."""
        cfg = self.config
        rows: dict[str, dict] = {}
        for node in graph.nodes:
            if node.op not in WEIGHTED_OPS or not graph.is_const(node.inputs[1]):
                continue
            name = node.inputs[1]
            w, hint = graph.constants[name], graph.hints.get(name)
            row = rows.setdefault(name, {"tensor": name, "layer": node.module or node.name,
                                         "options": {c: {"spec": self.spec(w, hint, c), "bytes": 0, "bops": 0}
                                                     for c in cfg.choices}})
            nbias = graph.constants[node.inputs[2]].size if len(node.inputs) > 2 else w.shape[0]
            k = w.shape[1] if w.ndim == 2 else 0
            for choice, opt in row["options"].items():
                spec = opt["spec"]
                if spec.dtype.startswith("float"):
                    opt["bytes"] += 4 * w.size + 4 * nbias
                else:
                    half = int_storage(litert_op(graph, node), "static", spec.code_bits, cfg.int4_storage,
                                       k) == "int4"
                    opt["bytes"] += math.ceil(w.size * (0.5 if half else 1)) + 4 * nbias
                wb, ab = BOP_BITS[choice]
                opt["bops"] += macs(graph, node) * wb * ab
        return list(rows.values())

    def sensitivities(self, graph, batches: Sequence[tuple], rows: list[dict]) -> None:
        """Fill each option's ``sensitivity``: the output MSE with only that weight quantized."""
        used = list(batches)[:self.config.sensitivity_batches]
        reference = [graph.run(b) for b in used]

        def error(g) -> float:
            total = 0.0
            for b, ref in zip(used, reference):
                total += sum(float(torch.mean((o - r) ** 2)) for o, r in zip(g.run(b), ref))
            return total / len(used)

        for row in progress_bar(rows, desc="sensitivity", unit="layer", enabled=self.config.progress):
            w = graph.constants[row["tensor"]]
            for opt in row["options"].values():
                spec = opt["spec"]
                if spec.dtype.startswith("float"):
                    opt["sensitivity"] = 0.0
                    continue
                trial = graph.copy()
                trial.constants[row["tensor"]] = dequantize(spec.quantize(w), *spec.arrays(), axis=spec.axis)
                opt["sensitivity"] = error(trial)

    def calibrate(self, graph, batches: Sequence[tuple]) -> QuantPlan:
        cfg = self.config
        if cfg.max_weight_bytes is None and cfg.max_bops is None:     # checked here: Config() is the default
            raise ConfigError("mixed-precision: give a budget: max_weight_bytes and/or max_bops (bytes of the "
                              "shipped weights, or bit operations)")
        rows = self.layers(graph)
        budgets = [(key, limit) for key, limit in (("bytes", cfg.max_weight_bytes), ("bops", cfg.max_bops))
                   if limit is not None]
        for key, limit in budgets:
            least = sum(min(o[key] for o in r["options"].values()) for r in rows)
            if least > limit:
                field = "max_weight_bytes" if key == "bytes" else "max_bops"
                raise ConfigError(f"mixed-precision: {field}={limit} is below the minimum achievable {least} "
                                  f"({key} with every conv/linear layer at its smallest of "
                                  f"{', '.join(cfg.choices)}); raise it to at least {least}")
        self.sensitivities(graph, batches, rows)
        choices = [list(r["options"]) for r in rows]
        picked, _ = allocate([[r["options"][c]["sensitivity"] for c in cs] for r, cs in zip(rows, choices)],
                             [[tuple(r["options"][c][k] for k, _ in budgets) for c in cs]
                              for r, cs in zip(rows, choices)],
                             tuple(limit for _, limit in budgets))
        chosen = {r["tensor"]: cs[i] for r, cs, i in zip(rows, choices, picked)}
        acts = activation_specs(graph, batches, observer=cfg.activation_observer, percentile=cfg.percentile,
                                num_batches=cfg.num_batches, progress=cfg.progress)
        by_tensor = {r["tensor"]: r for r in rows}
        weights = weight_specs(graph, lambda w, hint, node: by_tensor[node.inputs[1]]["options"]
                               [chosen[node.inputs[1]]]["spec"])
        table = [{"layer": r["layer"], "tensor": r["tensor"], "precision": chosen[r["tensor"]],
                  **{k: r["options"][chosen[r["tensor"]]][k] for k in ("bytes", "bops", "sensitivity")},
                  "options": {c: {k: o[k] for k in ("bytes", "bops", "sensitivity")}
                              for c, o in r["options"].items()}} for r in rows]
        extra = {"mixed_precision": {"layers": table, "weight_bytes": sum(t["bytes"] for t in table),
                                     "bops": sum(t["bops"] for t in table),
                                     "sensitivity": sum(t["sensitivity"] for t in table)}}
        return QuantPlan(acts, weights, method=self.name, config=cfg.to_dict(), extra=extra)


def allocate(costs: Sequence[Sequence[float]], resources: Sequence[Sequence[tuple[int, ...]]],
             budgets: tuple[int, ...]) -> tuple[list[int], float]:
    """The exact multiple-choice knapsack: one option per group minimising the summed ``costs``
    with every summed resource (``resources[g][j]``: one integer per budget) within ``budgets``.
    Returns ``(index of the option per group, total cost)``; :class:`ConfigError` when no
    assignment fits.

    Pareto dynamic programme: after each group only the partial assignments that no other
    beats in every resource and the cost are kept, and only those that can still fit with
    the cheapest resources of the groups left.

    >>> allocate([[0.0, 1.0, 3.0]], [[(4, 9), (2, 5), (1, 1)]], (2, 6))
    ([1], 1.0)
    """
    dims = len(budgets)
    limit = np.asarray(budgets, np.int64)
    res = [np.asarray(r, np.int64).reshape(len(r), dims) for r in resources]
    rest = np.zeros((len(res) + 1, dims), np.int64)           # least resources of groups g.. to the end
    for g in range(len(res) - 1, -1, -1):
        rest[g] = rest[g + 1] + res[g].min(axis=0)
    used, cost = np.zeros((1, dims), np.int64), np.zeros(1)
    trail: list[tuple[np.ndarray, np.ndarray]] = []            # (parent state, option) of each kept state
    for g, (r, c) in enumerate(zip(res, costs)):
        c = np.asarray(c, np.float64)
        n, m = len(cost), len(c)
        cand_used = (used[:, None, :] + r[None, :, :]).reshape(n * m, dims)
        cand_cost = (cost[:, None] + c[None, :]).reshape(n * m)
        parent, option = np.repeat(np.arange(n), m), np.tile(np.arange(m), n)
        fits = np.all(cand_used + rest[g + 1] <= limit, axis=1)
        keep = np.flatnonzero(fits)
        keep = keep[_pareto(cand_used[keep], cand_cost[keep])]
        if keep.size == 0:
            raise ConfigError(f"no assignment of the {len(res)} layers' options meets the budgets {tuple(budgets)}")
        used, cost = cand_used[keep], cand_cost[keep]
        trail.append((parent[keep], option[keep]))
    state = int(np.argmin(cost))
    best = float(cost[state])
    picked = []
    for parent, option in reversed(trail):
        picked.append(int(option[state]))
        state = int(parent[state])
    return picked[::-1], best


def _pareto(used: np.ndarray, cost: np.ndarray) -> np.ndarray:
    """Indices of the states no other one dominates (no more of any resource and less cost; of
    equal ones the first)."""
    if used.shape[1] == 0:
        return np.array([int(np.argmin(cost))]) if cost.size else np.zeros(0, np.int64)
    order = np.lexsort((cost,) + tuple(used[:, d] for d in range(used.shape[1] - 1, -1, -1)))
    if used.shape[1] == 1:
        c = cost[order]
        best_before = np.concatenate(([np.inf], np.minimum.accumulate(c)[:-1]))
        return order[c < best_before]
    # two resources: sweep by the first; a staircase of (second resource, least cost) of those kept
    stairs_r: list[int] = []
    stairs_c: list[float] = []
    kept = []
    for i in order:
        r, c = int(used[i, 1]), float(cost[i])
        j = bisect.bisect_right(stairs_r, r)
        if j and stairs_c[j - 1] <= c:
            continue
        kept.append(i)
        # drop the steps this state beats (second resource at least r, cost at least c)
        k = j
        while k < len(stairs_r) and stairs_c[k] >= c:
            k += 1
        stairs_r[j:k] = [r]
        stairs_c[j:k] = [c]
    return np.asarray(kept, np.int64)


@hookimpl
def register_quantizers(register):
    register(MixedPrecision)
