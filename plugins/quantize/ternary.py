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

This module also holds what the training-time weight quantizers ``ternary``,
``dorefa`` and ``kmeans`` share: :class:`WeightQuantizer` (choose the layers,
install a parametrization of ``weight`` on each, fine-tune with cross-entropy
when data is given), :class:`WeightQuant` (the base of those
parametrizations) and :func:`ste` (forward one value, pass the gradient to
another).  The quantized weight is a ``torch.nn.utils.parametrize``
parametrization, so ``torch.export`` folds it into a constant and
``sdk.deploy(model, "arm-fp32", ...)`` packs plain float weights;
:func:`sdk.masks.bake` (which :func:`sdk.compress` runs at the end of a recipe)
replaces it by the quantized tensor for good.

>>> import torch
>>> net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 16), torch.nn.Linear(16, 2))
>>> _ = Ternary(keep_first_last=True).apply(net)
>>> len(torch.unique(net[1].weight.detach())) <= 3
True
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Iterable

import torch
from torch import nn
from torch.nn.utils import parametrize

from sdk import hookimpl
from sdk.base import Quantizer
from sdk.config import Config, check_range
from sdk.errors import ConfigError, InputError
from sdk.trainer import TrainConfig, classification_loss, fit

#: the layer types the weight quantizers rewrite
LAYER_TYPES = (nn.Conv1d, nn.Conv2d, nn.Linear)

# -- shared by ternary, dorefa and kmeans ---------------------------------------------------


def ste(value: torch.Tensor, through: torch.Tensor) -> torch.Tensor:
    """``value`` in the forward pass, identity gradient to ``through`` in the backward pass.

    Written as ``value.detach() + (through − through.detach())``: the bracket is
    exactly 0 for finite inputs, so the forward result is ``value`` bit for bit
    (``through + (value − through).detach()`` would round).

    >>> w = torch.tensor([0.3, -2.0], requires_grad=True)
    >>> y = ste(torch.sign(w), w)
    >>> y.sum().backward(); y.tolist(), w.grad.tolist()
    ([1.0, -1.0], [1.0, 1.0])
    """
    return value.detach() + (through - through.detach())


class WeightQuant(nn.Module):
    """Base of the weight parametrizations the quantizers install: ``forward(W)``
    returns the quantized weight the layer computes with."""

    method: ClassVar[str] = ""


def weight_quant(module: nn.Module) -> WeightQuant | None:
    """The :class:`WeightQuant` parametrization of ``module.weight``, or ``None``."""
    if parametrize.is_parametrized(module, "weight"):
        for p in module.parametrizations.weight:
            if isinstance(p, WeightQuant):
                return p
    return None


def quantized_layers(model: nn.Module) -> dict[str, WeightQuant]:
    """``{module name: parametrization}`` of the layers whose weight is quantized."""
    return {n: q for n, m in model.named_modules() if (q := weight_quant(m)) is not None}


def select_layers(model: nn.Module, method: str, keep_first_last: bool,
                  exclude: Iterable[str] = ()) -> list[tuple[str, nn.Module]]:
    """The Conv/Linear layers to quantize, in module order: all of them but the
    first and the last (``keep_first_last``) and the names in ``exclude``.

    Raises :class:`ConfigError` for an unknown name in ``exclude``, a model that
    is weight-quantized already, or when no layer is left.
    """
    done = quantized_layers(model)
    if done:
        raise ConfigError(f"{method}: the model already has quantized weights ({', '.join(done)}); "
                          "apply one weight quantizer per recipe")
    # isinstance, not the class name: a pruned layer is a parametrized subclass ("ParametrizedLinear")
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, LAYER_TYPES)]
    names = [n for n, _ in layers]
    unknown = sorted(set(exclude) - set(names))
    if unknown:
        raise ConfigError(f"{method}: exclude names {', '.join(unknown)}, which are not Conv/Linear layers; "
                          f"valid names: {', '.join(names) or '(none)'}")
    keep = set(exclude) | ({names[0], names[-1]} if keep_first_last and names else set())
    chosen = [(n, m) for n, m in layers if n not in keep]
    if not chosen:
        raise ConfigError(f"{method}: no layer left to quantize among {names or 'no Conv/Linear layers'}"
                          + (" (the first and last stay float: keep_first_last=False quantizes them)"
                             if keep_first_last else ""))
    return chosen


@dataclasses.dataclass(frozen=True)
class WeightQuantConfig(Config):
    """Fields every training-time weight quantizer takes."""

    epochs: int = 5
    lr: float = 1e-3
    seed: int = 0
    progress: bool = True
    keep_first_last: bool = True          # first and last Conv/Linear stay float
    exclude: tuple[str, ...] = ()         # Conv/Linear names left float

    def __post_init__(self):
        owner = self.type_tag.rpartition(".")[2]
        check_range(owner, "epochs", self.epochs, 1)
        check_range(owner, "lr", self.lr, 0.0, lo_open=True)


class WeightQuantizer(Quantizer):
    """Training-time quantizer: quantize each chosen layer (:meth:`quantize_layer`),
    then, when ``data`` is given, train the whole network with cross-entropy on
    ``(x, y)`` batches through the quantized forward pass (:func:`sdk.trainer.fit`)."""

    post_training = False
    Config: ClassVar[type[WeightQuantConfig]] = WeightQuantConfig

    def quantize_layer(self, name: str, layer: nn.Module) -> None:
        """Install the quantization on ``layer`` (in place)."""
        raise NotImplementedError

    def apply(self, model: nn.Module, data: Iterable | None = None) -> nn.Module:
        """Quantize ``model`` in place, fine-tune it when ``data`` is given; return it (eval mode)."""
        cfg = self.config
        if not isinstance(model, nn.Module):
            raise InputError(f"{self.name} quantizes a torch.nn.Module, got {type(model).__name__}")
        for name, layer in select_layers(model, self.name, cfg.keep_first_last, cfg.exclude):
            self.quantize_layer(name, layer)
        if data is not None:
            fit(model, data, self._loss, TrainConfig(epochs=cfg.epochs, lr=cfg.lr, seed=cfg.seed,
                                                     progress=cfg.progress), desc=self.name)
        return model.eval()

    def _loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        return classification_loss(model, batch, who=f"{self.name} training",
                                   hint="or data=None to quantize without training")


# -- ternary ------------------------------------------------------------------------------------


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

    def extra_repr(self) -> str:
        return f"threshold_factor={self.factor}"


class Ternary(WeightQuantizer):
    """Ternary Weight Networks: ±α or 0 per layer, threshold Δ = t · mean |W|."""

    name = "ternary"
    version = "1.0"

    @dataclasses.dataclass(frozen=True)
    class Config(WeightQuantConfig):
        threshold_factor: float = 0.7     # t in Δ = t · mean |W|

        def __post_init__(self):
            super().__post_init__()
            # for uniformly distributed weights max |W| = 2 mean |W|: t >= 2 can zero whole layers
            check_range("ternary", "threshold_factor", self.threshold_factor, 0.0, 2.0,
                        lo_open=True, hi_open=True)

    def quantize_layer(self, name: str, layer: nn.Module) -> None:
        parametrize.register_parametrization(layer, "weight", TernaryWeight(self.config.threshold_factor))


@hookimpl
def register_quantizers(register):
    register(Ternary)
