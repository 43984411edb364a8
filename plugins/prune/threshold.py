"""``threshold`` — prune below a multiple of each layer's weight spread, retrain, repeat.

Han, Pool, Tran & Dally, "Learning both Weights and Connections for Efficient
Neural Networks", NeurIPS 2015.  The paper trains a dense network, removes the
connections whose weights fall below a threshold, and retrains the remaining
ones so they compensate; pruning and retraining are iterated.  The threshold of
a layer is "a quality parameter multiplied by the standard deviation of the
layer's weights".  Per round ``r`` and prunable layer with (masked) weight
``W``::

    keep = |W| >= s · std(W)          std with ddof = 0, over the whole tensor

where ``s`` is ``quality``.  ``std`` includes the entries already pruned (they
are zero), as in the common implementation of the criterion (Distiller's
sensitivity pruner); the zeros of earlier rounds stay zero because the new mask
is multiplied into the old one.  After each round the network is retrained for
``epochs`` with the masks fixed (pruned weights get no gradient), using
cross-entropy on ``(x, y)`` batches.  Retraining moves weights across the next
round's threshold, so sparsity grows round after round.

With ``data=None`` a single round is applied without retraining (the
``iterations`` option needs data to mean anything).  The per-round sparsities
of the last :meth:`apply` are kept in ``history``.

Not reproduced: the paper's dropout-ratio adjustment for retraining (it is
specific to the model being pruned); the L2 regularisation the paper prefers
during retraining is the optimizer's ``weight_decay`` (``optimizer_options:
{weight_decay: 1e-4}``).  The training fields are :class:`sdk.trainer.TrainConfig`'s;
round ``r`` retrains with seed ``seed + r``.

>>> import torch
>>> from plugins.prune.threshold import ThresholdPruner, threshold_mask
>>> w = torch.tensor([[-2.0, 0.1], [0.5, 3.0]])
>>> threshold_mask(w, 0.5).tolist()        # std = 1.78, threshold 0.89
[[1.0, 0.0], [0.0, 1.0]]
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from sdk import hookimpl
from sdk.base import Pruner
from sdk.config import check_range
from sdk.masks import apply_mask, mask_of, prunable_layers
from sdk.trainer import TrainConfig, classification_loss, fit


class ThresholdPruner(Pruner):
    """Iterative pruning at ``quality × std(W)`` per layer with retraining (Han et al. 2015)."""

    name = "threshold"
    version = "1.0"

    @dataclasses.dataclass(frozen=True)
    class Config(TrainConfig):
        quality: float = 1.0                      # s in |w| < s · std(w)
        iterations: int = 3                       # prune + retrain rounds (1 without data)
        epochs: int = 2                           # retraining epochs per round
        layer_types: tuple[str, ...] = ("Conv1d", "Conv2d", "Linear")
        exclude: tuple[str, ...] = ()             # module names left dense

        def __post_init__(self):
            super().__post_init__()
            check_range("threshold", "quality", self.quality, 0.0, lo_open=True)
            check_range("threshold", "iterations", self.iterations, 1)

    def __init__(self, config: Any = None, **options: Any) -> None:
        super().__init__(config, **options)
        self.history: list[float] = []            # sparsity of the pruned layers after each round

    def apply(self, model: torch.nn.Module, data=None) -> torch.nn.Module:
        cfg = self.config
        layers = [m for _, m in prunable_layers(model, cfg.layer_types, cfg.exclude)]
        self.history = []
        if data is not None and not hasattr(data, "__len__"):
            data = list(data)                     # retrained once per round: must be re-iterable
        rounds = cfg.iterations if data is not None else 1
        for r in range(rounds):
            for mod in layers:
                apply_mask(mod, threshold_mask(mod.weight, cfg.quality))
            self.history.append(masked_fraction(layers))
            if data is not None:
                fit(model, data, classification_loss, cfg.training(seed=cfg.seed + r),
                    desc=f"threshold retrain {r + 1}/{rounds}")
        return model


def threshold_mask(weight: torch.Tensor, quality: float) -> torch.Tensor:
    """Float mask keeping ``|w| >= quality · std(w)`` (population std of the whole tensor).

    >>> threshold_mask(torch.tensor([1.0, -1.0, 0.0, 0.2]), 1.0).tolist()
    [1.0, 1.0, 0.0, 0.0]
    """
    w = weight.detach()
    return (w.abs() >= quality * w.std(correction=0)).to(w.dtype)


def masked_fraction(layers: list[torch.nn.Module]) -> float:
    """Fraction of mask entries that are zero over ``layers`` (layers without a mask count as dense)."""
    zeros = total = 0
    for mod in layers:
        mask = mask_of(mod)
        zeros += 0 if mask is None else int((mask == 0).sum())
        total += mod.weight.numel()
    return zeros / total if total else 0.0


@hookimpl
def register_pruners(register):
    register(ThresholdPruner)
