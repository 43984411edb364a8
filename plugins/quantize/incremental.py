"""``incremental`` — incremental network quantization (INQ; SLQ-style error-ordered selection).

Zhou, Yao, Guo, Xu and Chen, "Incremental Network Quantization: Towards
Lossless CNNs with Low-Precision Weights" (ICLR 2017).  Per quantized layer:

1. **Grid.**  Fixed once, from the layer's weights before any step.

   * ``grid: pow2`` (the paper's): ``{0, ±2^n2, …, ±2^n1}`` with
     ``n1 = floor(log2(4·max|W| / 3))`` and ``2^(bits−2)`` powers (``n2 = n1 −
     2^(bits−2) + 1``; one bit for the sign, one code for zero: 5 bits give the
     paper's 8 powers).  A weight becomes ``β·sgn(w)`` when ``(α+β)/2 ≤ |w| <
     3β/2`` for adjacent grid magnitudes ``α < β`` (else 0) — the nearest grid
     value, ties upwards.
   * ``grid: uniform``: the narrow symmetric grid ``s·{−q, …, q}``,
     ``q = 2^(bits−1) − 1`` and ``s = max|W| / q`` per tensor (``±7`` for 4 bits);
     each weight becomes its nearest level (``round(w/s)``, half away from zero).

2. **Incremental freezing.**  For each fraction ``f`` of ``schedule`` (default
   50 % → 75 % → 87.5 % → 100 %) the not yet frozen weights with the largest
   ``|w|`` (``selection: magnitude``, INQ's pruning-inspired partition) or with
   the smallest quantization error ``|w − Q(w)|`` (``selection: error``, SLQ's
   ordering by quantization loss, here per weight) are snapped to the grid and
   frozen until ``round(f·n)`` of the layer's ``n`` weights are; then the network
   is retrained for ``epochs_per_step`` epochs (:func:`sdk.trainer.fit`) while the
   layer computes with ``W = M·Q + (1−M)·W_float`` (:class:`IncrementalWeight`),
   so the frozen weights receive no gradient and do not move.  After the last
   fraction (which must be 1) every weight is on the grid and no retraining
   follows.

Deployment: :func:`sdk.masks.bake` (run by :func:`sdk.compress`) replaces each
layer's weight by its grid values.  A ``uniform`` layer hints ``Hint(bits=bits)``:
the weight is ``codes · s`` and ships with scale ``s`` — on ``arm-int8`` a 4-bit
fully connected layer stores packed INT4 (two codes a byte).  A ``pow2`` layer
hints ``Hint(codebook=2^(bits−1)+1)`` (the values it can hold); its powers are
integer multiples of ``2^n2`` and travel exactly in int8 storage while
``2^(n1−n2) ≤ 127`` (bits ≤ 4).

>>> import torch
>>> pow2_levels(torch.tensor([0.9, -0.1]), bits=4).tolist()
[0.0, 0.125, 0.25, 0.5, 1.0]
>>> snap(torch.tensor([0.7, -0.3, 0.05]), pow2_levels(torch.tensor([0.9]), 4)).tolist()
[0.5, -0.25, 0.0]
"""

from __future__ import annotations

import dataclasses
import math
from typing import Iterable

import torch
from torch import nn

from sdk import hookimpl
from sdk.config import check_choice, check_range
from sdk.encoding import Hint
from sdk.errors import ConfigError, InputError
from sdk.layer_quant import LayerQuantConfig, LayerQuantizer, WeightQuant, quantize_layers
from sdk.trainer import fit

__all__ = ["Incremental", "IncrementalWeight", "pow2_levels", "uniform_levels", "snap"]

GRIDS = ("pow2", "uniform")
SELECTIONS = ("magnitude", "error")


def pow2_levels(w: torch.Tensor, bits: int) -> torch.Tensor:
    """The nonnegative magnitudes of INQ's grid for ``w``, ascending: ``0`` and
    ``2^n2 … 2^n1`` with ``n1 = floor(log2(4·max|w|/3))``, ``2^(bits−2)`` powers."""
    top = float(w.detach().abs().max())
    if top == 0:
        raise InputError("incremental: a layer's weights are all zero; exclude it or use another quantizer")
    n1 = math.floor(math.log2(4 * top / 3))
    n2 = n1 - 2 ** (bits - 2) + 1
    return torch.tensor([0.0] + [2.0 ** n for n in range(n2, n1 + 1)], dtype=torch.float32)


def uniform_levels(w: torch.Tensor, bits: int) -> torch.Tensor:
    """The nonnegative magnitudes of the narrow symmetric ``bits``-bit grid for ``w``:
    ``s·{0, 1, …, q}``, ``q = 2^(bits−1) − 1``, ``s = max|w| / q`` (as float32)."""
    q = 2 ** (bits - 1) - 1
    top = float(w.detach().abs().max())
    if top == 0:
        raise InputError("incremental: a layer's weights are all zero; exclude it or use another quantizer")
    s = torch.tensor(top / q, dtype=torch.float32)
    return torch.arange(q + 1, dtype=torch.float32) * s


def snap(w: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Each weight to ``sgn(w)·β``, ``β`` the nearest of the ascending magnitudes ``levels``
    (``levels[0] = 0``); a magnitude at a midpoint ``(α+β)/2`` goes to ``β`` (the paper's rule)."""
    mags = w.detach().abs()
    mids = (levels[1:] + levels[:-1]) / 2
    idx = torch.bucketize(mags, mids, right=True)     # number of midpoints <= |w|
    return torch.sign(w.detach()) * levels[idx]


class IncrementalWeight(WeightQuant):
    """``W = where(frozen, grid, W_float)``: the frozen weights on the grid (no gradient
    reaches them), the others float and trained.  :meth:`freeze` grows the frozen set."""

    method = "incremental"

    def __init__(self, weight: torch.Tensor, bits: int, grid: str, selection: str):
        super().__init__()
        self.bits, self.grid, self.selection = bits, grid, selection
        levels = pow2_levels(weight, bits) if grid == "pow2" else uniform_levels(weight, bits)
        self.register_buffer("levels", levels.to(weight.device))
        self.register_buffer("frozen", torch.zeros_like(weight, dtype=torch.bool))
        self.register_buffer("quantized", torch.zeros_like(weight))

    @property
    def scale(self) -> float:
        """The uniform grid's step ``s`` (``pow2``: the smallest power ``2^n2``)."""
        return float(self.levels[1])

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return torch.where(self.frozen, self.quantized, w)

    @torch.no_grad()
    def freeze(self, w: torch.Tensor, fraction: float) -> int:
        """Freeze the next weights of ``w`` (the float latent) until ``round(fraction·n)`` are
        frozen, chosen by ``selection`` among those still float; returns how many are frozen."""
        target = round(fraction * w.numel())
        todo = target - int(self.frozen.sum())
        if todo > 0:
            q = snap(w, self.levels)
            key = w.abs() if self.selection == "magnitude" else -(w - q).abs()
            key = key.flatten().masked_fill(self.frozen.flatten(), -math.inf)
            pick = torch.topk(key, todo).indices
            self.quantized.view(-1)[pick] = q.view(-1)[pick]
            self.frozen.view(-1)[pick] = True
            w.copy_(self.forward(w))              # the latent agrees with what the layer computes
        return int(self.frozen.sum())

    def hint(self) -> Hint:
        if self.grid == "uniform":
            return Hint(bits=self.bits, source=self.method)
        return Hint(codebook=2 * (len(self.levels) - 1) + 1, source=self.method)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, grid={self.grid!r}, selection={self.selection!r}"


class Incremental(LayerQuantizer):
    """Incremental network quantization (INQ): freeze growing weight groups on a pow2/uniform grid, retrain the rest."""

    name = "incremental"
    version = "1.0"
    needs_training = True       # the loss hint offers no data=None: only schedule=[1.0] rounds without data

    @dataclasses.dataclass(frozen=True)
    class Config(LayerQuantConfig):
        bits: int = 5                                    # pow2: 2^(bits-2) powers; uniform: ±(2^(bits-1)-1)
        grid: str = "pow2"                               # or uniform (ships INT4 on arm-int8 at bits=4)
        schedule: tuple[float, ...] = (0.5, 0.75, 0.875, 1.0)   # cumulative frozen fractions, last 1
        epochs_per_step: int = 1                         # retraining after each fraction but the last
        selection: str = "magnitude"                     # or error: smallest |w - Q(w)| first

        def __post_init__(self):
            super().__post_init__()
            check_choice("incremental", "grid", self.grid, GRIDS)
            check_choice("incremental", "bits", self.bits, range(3 if self.grid == "pow2" else 2, 9))
            check_choice("incremental", "selection", self.selection, SELECTIONS)
            check_range("incremental", "epochs_per_step", self.epochs_per_step, 1)
            sched = self.schedule
            if isinstance(sched, (int, float)) or not sched:
                raise ConfigError(f"incremental: schedule must be a list of frozen fractions ending in 1, "
                                  f"e.g. [0.5, 0.75, 0.875, 1.0]; got {sched!r}")
            object.__setattr__(self, "schedule", tuple(float(f) for f in sched))
            fr = self.schedule
            if any(not 0 < f <= 1 for f in fr) or any(b <= a for a, b in zip(fr, fr[1:])) or fr[-1] != 1.0:
                raise ConfigError(f"incremental: schedule must be strictly increasing fractions in (0, 1] "
                                  f"ending in 1 (every weight on the grid at the end), got {list(fr)}")

    def quantize_layer(self, name: str, layer: nn.Module) -> IncrementalWeight:
        cfg = self.config
        return IncrementalWeight(layer.weight.detach(), cfg.bits, cfg.grid, cfg.selection)

    def apply(self, model: nn.Module, data: Iterable | None = None, *, on_step=None) -> nn.Module:
        """Quantize ``model`` in place by the schedule (see the module); return it (eval mode).
        ``on_step(fraction, model)`` (optional) is called after each freeze, before retraining."""
        cfg = self.config
        if not isinstance(model, nn.Module):
            raise InputError(f"{self.name} quantizes a torch.nn.Module, got {type(model).__name__}")
        if data is None and len(cfg.schedule) > 1:
            raise InputError("incremental retrains between steps and needs (x, y) training batches; "
                             "pass data, or schedule=[1.0] to round once without training")
        layers = quantize_layers(model, self.name, self.quantize_layer, keep_first_last=cfg.keep_first_last,
                                 exclude=cfg.exclude, types=self.layer_types)
        train = cfg.training(epochs=cfg.epochs_per_step)
        for i, fraction in enumerate(cfg.schedule):
            for layer in layers.values():
                quant = layer.parametrizations.weight
                q = next(p for p in quant if isinstance(p, IncrementalWeight))
                q.freeze(quant.original, fraction)
            if on_step is not None:
                on_step(fraction, model)
            if i < len(cfg.schedule) - 1:
                fit(model, data, self._loss, dataclasses.replace(train, seed=cfg.seed + i),
                    desc=f"{self.name} {fraction:.0%}")
        return model.eval()


@hookimpl
def register_quantizers(register):
    register(Incremental)
