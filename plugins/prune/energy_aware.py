"""``energy-aware`` — prune first the layers that cost the most energy on the target.

Yang, Chen & Sze, "Designing Energy-Efficient Convolutional Neural Networks
using Energy-Aware Pruning", CVPR 2017.  Weight count is a poor proxy for
energy: what a layer costs depends on its MACs and on the data it moves, and
the paper's estimate on the target hardware drives the pruning order — the
layers that cost the most energy are pruned first (and most), where pruning
saves the most — followed by fine-tuning.

As implemented:

1. **Energy** of each layer is the target's own cost model (``Target.cost``,
   :mod:`sdk.cost`: ``MACs · E_mac(format) + stored weight bytes · E_dram +
   activation bytes · E_sram``), on the graph as :func:`sdk.deploy` builds it
   (batch norms folded, ``Target.prepare``), batch 1, with the plan of the
   target's default quantizer (``ptq`` for ``arm-int8``: int8 weights and
   activations; a float target has none).  The target is ``target`` from the
   config, else the deploy target (``ctx.target``: :func:`sdk.deploy`, or
   ``sdk.compress(target=)``).  Another graph-side quantizer in the recipe
   (``mixed-precision``) is not known yet when torch-side stages run.
2. **Units** (:mod:`sdk.allocation`): ``granularity: filter`` — the prunable
   channel groups, each costing the energy of the layers producing its channels,
   pruned by mean filter L1 with the channels removed physically; ``fine`` — the
   conv / linear weights, pruned by ``|w|``.  They are ranked once, by energy
   of the model as given, highest first (ties: model order).
3. **Allocation**: ``K = round(sparsity · Σ size)`` channels (filter) or
   weights (fine) in all; in energy order each unit is pruned up to
   ``round(max_layer_sparsity · size)`` (filter: keeping ``min_channels``)
   until ``K`` is reached — the last unit touched takes the remainder, so
   ``K`` is exact.  More than the caps allow raises :class:`ConfigError`.
4. Prune, then fine-tune ``finetune_epochs`` with cross-entropy on ``(x, y)``
   batches (the training fields are :class:`sdk.trainer.TrainConfig`'s;
   ``epochs`` is not used).

The estimated energy before and after (per layer and in all, µJ per inference)
stays on the returned model as the JSON-able dict ``model._edgepack_energy``
(:data:`ATTR`) and in the stage report (the artifact manifest's ``stages``).
``filter`` is the default because the cost model counts a layer's MACs and weight bytes dense: removed channels lower both, in the layer
and in the layers that read it, while the zeros of ``fine`` leave the estimate
where it was (``arm-int8`` may store them sparse: a smaller file, the same
estimate) — the report says so with equal numbers.

Not reproduced: the paper's per-layer least-squares restoration of the output
feature maps between layers (a global fine-tune follows instead), and its
zero-skipping hardware model.

>>> from plugins.prune.energy_aware import EnergyAwarePruner
>>> EnergyAwarePruner(sparsity=0.5, target="arm-int8").config.granularity
'filter'
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import torch

from sdk import hookimpl, plugins
from sdk.allocation import GRANULARITIES, Unit, prune, units
from sdk.base import Pruner
from sdk.channels import example_from
from sdk.config import check_choice, check_range
from sdk.context import DataStreams, StageContext
from sdk.errors import ConfigError, InputError
from sdk.masks import bake
from sdk.trainer import TrainConfig, finetune

#: the model attribute that holds the energy report
ATTR = "_edgepack_energy"


class EnergyAwarePruner(Pruner):
    """Prune in the order of the target's estimated per-layer energy, highest first (Yang et al. 2017)."""

    name = "energy-aware"
    version = "1.0"

    @dataclasses.dataclass(frozen=True)
    class Config(TrainConfig):
        """Which units go and how many; the training fields are the fine-tuning's, whose length
        is ``finetune_epochs`` (``epochs`` is not used)."""

        sparsity: float = 0.5                 # overall fraction of channels (filter) or weights (fine)
        granularity: str = "filter"           # filter (mean filter L1, removed) or fine (|w|, masked)
        max_layer_sparsity: float = 0.75      # the most of one unit that goes
        target: str | None = None             # whose cost model ranks the layers (None: the deploy target)
        layer_types: tuple[str, ...] = ("Conv1d", "Conv2d", "Linear")   # fine: the layers pruned
        exclude: tuple[str, ...] = ()         # modules left dense (filter: that keep their outputs)
        min_channels: int = 1                 # filter: channels every group keeps at least
        input_shape: tuple[int, ...] | None = None   # example input shape when no data is given
        finetune_epochs: int = 0              # cross-entropy fine-tuning after pruning (needs data)

        def __post_init__(self):
            super().__post_init__()
            check_range("energy-aware", "sparsity", self.sparsity, 0.0, 1.0, hi_open=True)
            check_choice("energy-aware", "granularity", self.granularity, GRANULARITIES)
            check_range("energy-aware", "max_layer_sparsity", self.max_layer_sparsity, 0.0, 1.0, lo_open=True,
                        hi_open=True)
            if self.target is not None and not isinstance(self.target, str):
                raise ConfigError(f"energy-aware: target must be a target name, got {self.target!r}")
            check_range("energy-aware", "min_channels", self.min_channels, 1)
            check_range("energy-aware", "finetune_epochs", self.finetune_epochs, 0)

    def apply(self, model: torch.nn.Module, data=None) -> torch.nn.Module:
        return self.run(model, StageContext(DataStreams.of(data), original=model))

    def run(self, model: torch.nn.Module, ctx: StageContext) -> torch.nn.Module:
        cfg = self.config
        target = self.cost_target(ctx)
        data = ctx.data.get("train")
        example = example_from(data, cfg.input_shape, self.name)
        found = units(model, cfg.granularity, example, layer_types=cfg.layer_types, exclude=cfg.exclude,
                      min_channels=cfg.min_channels)
        if not found:
            raise ConfigError(f"energy-aware: the model has nothing to prune at granularity {cfg.granularity!r}")
        before = estimated_costs(model, target, example)
        energy = layer_energy(before)
        order = sorted(found, key=lambda u: -sum(energy.get(m, 0.0) for m in u.modules))   # stable: model order
        total = sum(u.size for u in found)
        counts = fill_in_order(order, int(round(cfg.sparsity * total)), cfg.max_layer_sparsity)
        prune(model, {u.name: k for u, k in zip(order, counts) if k}, cfg.granularity, found)
        if cfg.finetune_epochs:
            finetune(model, data, cfg.training(epochs=cfg.finetune_epochs), desc="energy-aware fine-tune")
        after = estimated_costs(model, target, example)
        record = {
            "method": self.name, "target": target.name, "device": target.device.name,
            "granularity": cfg.granularity, "order": [u.name for u in order],
            "units": [{"name": u.name, "size": u.size, "energy_uj": sum(energy.get(m, 0.0) for m in u.modules),
                       "pruned": k, "sparsity": k / u.size} for u, k in zip(order, counts)],
            "sparsity": sum(counts) / total,
            "layers_before_uj": energy, "layers_after_uj": layer_energy(after),
            "energy_before_uj": sum(r["est_energy_uj"] for r in before),
            "energy_after_uj": sum(r["est_energy_uj"] for r in after)}
        setattr(model, ATTR, record)
        ctx.report(**{k: v for k, v in record.items() if k != "method"})
        return model.eval()

    def cost_target(self, ctx: StageContext) -> Any:
        """The target whose cost model ranks the layers: the config's, else the deploy target."""
        if self.config.target is not None:
            target = plugins.get("target", self.config.target)()
        elif ctx.target is not None:
            target = ctx.target
        else:
            raise InputError("energy-aware ranks layers by a target's cost model and has no target: set target: "
                             "<name> in its config (e.g. arm-int8), or run it inside sdk.deploy or "
                             "sdk.compress(target=...)")
        if getattr(target, "device", None) is None:
            raise ConfigError(f"energy-aware: target {target.name!r} declares no device profile (Target.device), "
                              "so it has no energy estimate; name a target that does (arm-int8, arm-fp32)")
        return target


def fill_in_order(order: list[Unit], total: int, cap: float) -> list[int]:
    """Counts for the units of ``order``: each, in turn, up to ``round(cap · size)`` (and its
    ``limit``) until ``total`` are pruned.

    >>> fill_in_order([Unit("a", 10, 10, ("a",)), Unit("b", 10, 9, ("b",))], 12, 0.8)
    [8, 4]
    """
    counts, left = [], total
    for unit in order:
        k = min(unit.count(cap), left)
        counts.append(k)
        left -= k
    if left:
        reach = sum(u.count(cap) for u in order)
        raise ConfigError(f"energy-aware: {total} units to prune but max_layer_sparsity={cap} allows {reach}: "
                          "raise max_layer_sparsity or lower sparsity")
    return counts


def estimated_costs(model: torch.nn.Module, target: Any, example: tuple) -> list[dict]:
    """``target.cost`` rows of ``model`` as :func:`sdk.deploy` computes them: batch norms folded,
    ``target.prepare``, the plan of the target's default quantizer calibrated on ``example``
    (the estimate depends on formats and bits, not on the calibrated ranges)."""
    from sdk.data import as_batches
    from sdk.graph import capture, fold_batch_norm

    graph = target.prepare(fold_batch_norm(capture(bake(copy.deepcopy(model)).eval(), example)))
    plan = None
    if target.default_quantizer:
        quantizer = plugins.get("quantizer", target.default_quantizer)(target.default_quantizer_config())
        if hasattr(quantizer.config, "progress"):
            quantizer.config = quantizer.config.replace(progress=False)
        plan = quantizer.calibrate(graph, as_batches([example], graph.inputs))
    return target.cost(graph, plan)


def layer_energy(rows: list[dict]) -> dict[str, float]:
    """Estimated µJ by module, summed over its rows."""
    out: dict[str, float] = {}
    for r in rows:
        if r["module"]:
            out[r["module"]] = out.get(r["module"], 0.0) + r["est_energy_uj"]
    return out


@hookimpl
def register_pruners(register):
    register(EnergyAwarePruner)
