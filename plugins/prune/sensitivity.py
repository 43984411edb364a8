"""``sensitivity`` — prune each layer alone at several levels, then allocate per-layer sparsity.

Sensitivity analysis as Han, Pool, Tran & Dally ("Learning both Weights and
Connections for Efficient Neural Networks", NeurIPS 2015, Fig. 5) run it for
weights and Li, Kadav, Durdanovic, Samet & Graf ("Pruning Filters for
Efficient ConvNets", ICLR 2017, Sec. 4.4) for filters: layers differ in how
much pruning they take, so each one is measured alone and given its own level.

1. **Units** (:mod:`sdk.allocation`): ``granularity: fine`` — each conv / linear
   weight, pruned by element-wise ``|w|``; ``filter`` — each prunable channel
   group, pruned by mean filter L1 with the channels removed physically
   (:mod:`sdk.channels`, as ``filter-l1`` does).
2. **Curves.**  For every unit ``u`` and level ``ℓ`` in ``levels``, a copy of the
   model with only ``u`` pruned (``round(ℓ · size_u)`` weights or channels) is
   evaluated on the ``val`` stream: mean cross-entropy over its samples and top-1
   accuracy.  ``(0, loss of the unpruned model)`` starts every curve.
3. **Allocation.**  ``K = round(sparsity · Σ size_u)`` weights (fine) or
   channels (filter) are pruned in all, split by :func:`sdk.allocation.allocate`:
   the least summed validation loss, the curves taken as linear between levels
   and as adding up across layers, solved exactly on their lower convex hulls
   (greedy by loss per pruned unit).  So the overall sparsity is exactly
   ``K / Σ size_u`` and no unit goes beyond the highest level.
4. Prune with those counts; optionally fine-tune ``finetune_epochs`` with
   cross-entropy on the ``train`` stream (the training fields are
   :class:`sdk.trainer.TrainConfig`'s; ``epochs`` is not used).

The curves, the allocation and the validation loss and accuracy (predicted, after
pruning, after fine-tuning) stay on the returned model as the JSON-able dict
``model._edgepack_sensitivity`` (:data:`ATTR`), which survives :func:`sdk.compress`, and in the
stage's report (:meth:`sdk.context.StageContext.report`: the artifact manifest's ``stages``).

>>> from plugins.prune.sensitivity import SensitivityPruner
>>> SensitivityPruner(sparsity=0.8, granularity="filter").config.levels
(0.25, 0.5, 0.75, 0.9)
"""

from __future__ import annotations

import dataclasses
import math

import torch

from sdk import hookimpl
from sdk.allocation import GRANULARITIES, allocate, prune, pruned_alone, units
from sdk.base import Pruner
from sdk.channels import example_from
from sdk.config import check_choice, check_range
from sdk.context import DataStreams, StageContext
from sdk.errors import ConfigError, InputError
from sdk.log import progress as progress_bar
from sdk.trainer import TrainConfig, finetune, split_batch

#: the model attribute that holds the curves and the allocation
ATTR = "_edgepack_sensitivity"


class SensitivityPruner(Pruner):
    """Per-layer sparsity from each layer's measured pruning curve, to an exact overall sparsity."""

    name = "sensitivity"
    version = "1.0"
    streams = ("val",)       # the curves are measured on held-out data

    @dataclasses.dataclass(frozen=True)
    class Config(TrainConfig):
        """What is pruned and how much; the training fields are the fine-tuning's, whose length
        is ``finetune_epochs`` (``epochs`` is not used)."""

        sparsity: float = 0.5                     # overall fraction of weights (fine) or channels (filter)
        granularity: str = "fine"                 # fine (element-wise |w|) or filter (mean filter L1, removed)
        levels: tuple[float, ...] = (0.25, 0.5, 0.75, 0.9)   # fractions each layer is pruned to alone
        layer_types: tuple[str, ...] = ("Conv1d", "Conv2d", "Linear")   # fine: the layers pruned
        exclude: tuple[str, ...] = ()             # modules left dense (filter: that keep their outputs)
        min_channels: int = 1                     # filter: channels every group keeps at least
        finetune_epochs: int = 0                  # cross-entropy on the train stream after pruning

        def __post_init__(self):
            super().__post_init__()
            check_range("sensitivity", "sparsity", self.sparsity, 0.0, 1.0, hi_open=True)
            check_choice("sensitivity", "granularity", self.granularity, GRANULARITIES)
            levels = tuple(self.levels) if isinstance(self.levels, (tuple, list)) else ()
            if not levels:
                raise ConfigError(f"sensitivity: levels={self.levels!r} must be a non-empty list of fractions")
            for level in levels:
                check_range("sensitivity", "levels", level, 0.0, 1.0, lo_open=True, hi_open=True)
            if list(levels) != sorted(set(levels)):
                raise ConfigError(f"sensitivity: levels={list(levels)} must rise strictly")
            object.__setattr__(self, "levels", levels)
            check_range("sensitivity", "min_channels", self.min_channels, 1)
            check_range("sensitivity", "finetune_epochs", self.finetune_epochs, 0)

    def apply(self, model: torch.nn.Module, data=None) -> torch.nn.Module:
        """``data``: ``{"val": batches, "train": batches}`` (a bare iterable is ``train`` only,
        which is refused: the curves need ``val``)."""
        return self.run(model, StageContext(DataStreams.of(data), original=model))

    def run(self, model: torch.nn.Module, ctx: StageContext) -> torch.nn.Module:
        cfg = self.config
        val = ctx.stream("val", who="sensitivity (it evaluates every layer pruned alone)")
        val = val if hasattr(val, "__len__") else list(val)
        example = example_from(val, None, self.name) if cfg.granularity == "filter" else None
        found = units(model, cfg.granularity, example, layer_types=cfg.layer_types, exclude=cfg.exclude,
                      min_channels=cfg.min_channels)
        if not found:
            raise ConfigError(f"sensitivity: the model has nothing to prune at granularity {cfg.granularity!r} "
                              f"(layer_types={list(cfg.layer_types)}, exclude={list(cfg.exclude)})")
        total = sum(u.size for u in found)
        target = int(round(cfg.sparsity * total))
        reach = sum(u.count(cfg.levels[-1]) for u in found)
        if target > reach:
            raise ConfigError(f"sensitivity: sparsity={cfg.sparsity} prunes {target} of {total} "
                              f"{'weights' if cfg.granularity == 'fine' else 'channels'}, but the highest level "
                              f"{cfg.levels[-1]} reaches {reach}: add a higher level or lower sparsity")
        base = val_metrics(model, val)
        rows = []
        with progress_bar(total=len(found) * len(cfg.levels), desc="sensitivity curves", unit="eval",
                          enabled=cfg.progress) as bar:
            for unit in found:
                counts = [unit.count(level) for level in cfg.levels]
                measured = []
                for k in counts:
                    measured.append(val_metrics(pruned_alone(model, unit, k, cfg.granularity), val))
                    bar.update(1)
                rows.append({"name": unit.name, "size": unit.size, "counts": counts,
                             "loss": [m["loss"] for m in measured], "accuracy": [m["accuracy"] for m in measured]})
        pruned = allocate([[(0, base["loss"])] + list(zip(r["counts"], r["loss"])) for r in rows], target)
        predicted = base["loss"] + sum(_interpolated(r, k, base["loss"]) - base["loss"] for r, k in zip(rows, pruned))
        for r, k in zip(rows, pruned):
            r.update(pruned=k, sparsity=k / r["size"])
        prune(model, {u.name: k for u, k in zip(found, pruned) if k}, cfg.granularity, found)
        record = {"method": self.name, "granularity": cfg.granularity, "metric": "val cross-entropy",
                  "levels": list(cfg.levels), "base": base, "units": rows, "target_sparsity": cfg.sparsity,
                  "pruned": target, "total": total, "sparsity": target / total,
                  "predicted_loss": predicted, "after_pruning": val_metrics(model, val)}
        if cfg.finetune_epochs:
            finetune(model, ctx.stream("train", who="sensitivity's fine-tuning (finetune_epochs > 0)"),
                     cfg.training(epochs=cfg.finetune_epochs), desc="sensitivity fine-tune")
            record["after_finetuning"] = val_metrics(model, val)
        setattr(model, ATTR, record)
        ctx.report(**{k: v for k, v in record.items() if k != "method"})
        return model.eval()


def val_metrics(model: torch.nn.Module, batches) -> dict[str, float]:
    """``{"loss": mean cross-entropy per sample, "accuracy": top-1}`` of ``model`` on ``(x, y)`` batches."""
    model.eval()
    loss = right = n = 0.0
    with torch.no_grad():
        for batch in batches:
            x, y = split_batch(batch)
            if y is None:
                raise InputError("sensitivity evaluates on labelled data: the val stream needs (x, y) batches")
            out = model(x)
            loss += float(torch.nn.functional.cross_entropy(out, y, reduction="sum"))
            right += float((out.argmax(-1) == y).sum())
            n += y.numel()
    return {"loss": loss / n if n else math.nan, "accuracy": right / n if n else math.nan}


def _interpolated(row: dict, k: int, base: float) -> float:
    """The curve's loss at count ``k``, linear between the measured points."""
    points = [(0, base)] + list(zip(row["counts"], row["loss"]))
    for (n0, l0), (n1, l1) in zip(points, points[1:]):
        if n0 <= k <= n1:
            return l0 if n1 == n0 else l0 + (l1 - l0) * (k - n0) / (n1 - n0)
    return points[-1][1]


@hookimpl
def register_pruners(register):
    register(SensitivityPruner)
