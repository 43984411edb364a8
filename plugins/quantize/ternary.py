"""``ternary`` — Ternary Weight Networks: weights in {−α, 0, +α} per layer.

Li, Zhang and Liu, "Ternary Weight Networks" (arXiv:1605.04711, 2016).  Each
layer's weights W are approximated by ``α · T`` with ``T ∈ {−1, 0, +1}``,
minimising ``‖W − αT‖²``.  The paper's approximate solution, implemented here
exactly as written (per layer, recomputed from the latent float weights on
every forward pass)::

    Δ = t · mean |W|                    (t = threshold_factor, 0.7 in the paper)
    I = { i : |W_i| > Δ }
    α = mean_{i ∈ I} |W_i|              (0 when I is empty)
    W_t = α · sign(W) · 1_I

Training keeps the float weights: the forward pass uses ``W_t``, the backward
pass hands ``∂L/∂W_t`` to W unchanged (straight-through estimator).  The
first and the last Conv/Linear layer stay float when ``keep_first_last``.

The quantized weight is a ``torch.nn.utils.parametrize`` parametrization
(:mod:`sdk.layer_quant`, which also chooses the layers and trains), so
``torch.export`` folds it into a constant and ``sdk.deploy(model, "arm-fp32",
...)`` packs plain float weights; :func:`sdk.compress` bakes it in for good.
Each quantized layer carries the hint ``Hint(codebook=3)`` (:mod:`sdk.encoding`).

>>> import torch
>>> net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 16), torch.nn.Linear(16, 2))
>>> _ = Ternary(keep_first_last=True).apply(net)
>>> len(torch.unique(net[1].weight.detach())) <= 3
True
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from sdk import hookimpl
from sdk.config import check_range
from sdk.encoding import Hint
from sdk.layer_quant import LayerQuantConfig, LayerQuantizer, WeightQuant, ste


def ternarize(w: torch.Tensor, factor: float = 0.7) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(W_t, Δ, α)`` of TWN for one layer (no gradient trick; see :class:`TernaryWeight`).

    >>> wt, delta, alpha = ternarize(torch.tensor([1.0, -0.1, -2.0, 0.5]))
    >>> round(float(delta), 4), float(alpha), wt.tolist()
    (0.63, 1.5, [1.5, 0.0, -1.5, 0.0])
    """
    a = w.abs()
    delta = factor * a.mean()
    keep = a > delta
    alpha = (a * keep).sum() / keep.sum().clamp(min=1)
    return torch.where(keep, alpha * torch.sign(w), torch.zeros_like(w)), delta, alpha


class TernaryWeight(WeightQuant):
    """Parametrization ``W ↦ W_t`` with the straight-through gradient."""

    method = "ternary"

    def __init__(self, factor: float):
        super().__init__()
        self.factor = factor

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return ste(ternarize(w.detach(), self.factor)[0], w)

    def hint(self) -> Hint:
        return Hint(codebook=3, source=self.method)

    def extra_repr(self) -> str:
        return f"threshold_factor={self.factor}"


class Ternary(LayerQuantizer):
    """Ternary Weight Networks: ±α or 0 per layer, threshold Δ = t · mean |W|."""

    name = "ternary"
    version = "1.0"

    @dataclasses.dataclass(frozen=True)
    class Config(LayerQuantConfig):
        threshold_factor: float = 0.7     # t in Δ = t · mean |W|

        def __post_init__(self):
            super().__post_init__()
            # for uniformly distributed weights max |W| = 2 mean |W|: t >= 2 can zero whole layers
            check_range("ternary", "threshold_factor", self.threshold_factor, 0.0, 2.0,
                        lo_open=True, hi_open=True)

    def quantize_layer(self, name: str, layer: nn.Module) -> TernaryWeight:
        return TernaryWeight(self.config.threshold_factor)


@hookimpl
def register_quantizers(register):
    register(Ternary)
