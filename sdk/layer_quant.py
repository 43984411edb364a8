"""Training-time layer quantization: choose the layers, rewrite each, train through the result.

The training-time quantizers ``ternary``, ``dorefa``, ``kmeans`` (a quantized
weight) and ``bnn``, ``bwn``, ``xnor`` (a binary layer, :mod:`sdk.binary`) do
the same three things, which live here once:

1. **Choose** the Conv/Linear layers (:func:`select_layers`): all of them but
   the first and the last (``keep_first_last``: the input has few channels and
   the classifier's outputs are the logits) and the names in ``exclude``.
2. **Rewrite** each chosen layer (:func:`quantize_layers`; the method's
   :meth:`LayerQuantizer.quantize_layer` says how) in one of two ways:

   * a parametrization of ``weight`` deriving from :class:`WeightQuant`
     (``torch.nn.utils.parametrize``): the layer computes with the quantized
     weight, ``torch.export`` folds it into a constant and
     :func:`sdk.masks.bake` (run by :func:`sdk.compress`) replaces it by the
     quantized tensor for good;
   * a new module deriving from :class:`QuantizedModule` put in the layer's
     place (binary layers, whose forward pass differs from a convolution's).

   Either one states what it fixed about the weight (``hint()``, an
   :class:`sdk.encoding.Hint`: a codebook size, a bit width) and the layer is
   annotated with it, so the plan can tell the target.
3. **Train** the whole network with cross-entropy on ``(x, y)`` batches
   through the quantized forward pass (:func:`sdk.trainer.fit` with the
   stage's training fields, :class:`LayerQuantConfig`), the gradient passing
   the rounding by the straight-through estimator (:func:`ste`).

A model is rewritten by one layer quantizer: a second one is refused
(:func:`quantized_layers` lists what the first did).

>>> import torch
>>> class Sign(WeightQuant):
...     method = "sign"
...     def forward(self, w):
...         return ste(torch.sign(w), w)
>>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 8), torch.nn.Linear(8, 2))
>>> done = quantize_layers(net, "sign", lambda name, layer: Sign())
>>> list(done), sorted(torch.unique(net[1].weight.detach()).tolist())
(['1'], [-1.0, 1.0])
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, ClassVar, Iterable, Sequence

import torch
from torch import nn
from torch.nn.utils import parametrize

from .base import Quantizer
from .encoding import Hint, annotate
from .errors import ConfigError, InputError
from .trainer import TrainConfig, classification_loss, fit

#: the layer types the weight quantizers rewrite
LAYER_TYPES: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Linear)


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
    returns the quantized weight the layer computes with; :meth:`hint` says what
    that weight is (a codebook, a bit width)."""

    method: ClassVar[str] = ""
    #: how a refusal names a model that has these (see :func:`select_layers`)
    describes: ClassVar[str] = "quantized weights"

    def hint(self) -> Hint:
        """What this parametrization fixes about the weight (default: only who made it)."""
        return Hint(source=self.method)


class QuantizedModule(nn.Module):
    """Base of the modules a layer quantizer puts in place of a float Conv/Linear
    (:mod:`sdk.binary`'s binary layers).  ``method`` names the quantizer."""

    describes: ClassVar[str] = "quantized layers"

    @property
    def method(self) -> str:
        raise NotImplementedError

    def hint(self) -> Hint:
        """What the module fixes about its ``weight`` (default: only who made it)."""
        return Hint(source=self.method)


def weight_quant(module: nn.Module) -> WeightQuant | None:
    """The :class:`WeightQuant` parametrization of ``module.weight``, or ``None``."""
    if parametrize.is_parametrized(module, "weight"):
        for p in module.parametrizations.weight:
            if isinstance(p, WeightQuant):
                return p
    return None


def quantized_layers(model: nn.Module) -> dict[str, WeightQuant | QuantizedModule]:
    """``{module name: quantization}`` of the layers a layer quantizer rewrote: the
    :class:`WeightQuant` parametrization, or the :class:`QuantizedModule` itself."""
    found: dict[str, WeightQuant | QuantizedModule] = {}
    for name, module in model.named_modules():
        q = module if isinstance(module, QuantizedModule) else weight_quant(module)
        if q is not None:
            found[name] = q
    return found


def select_layers(model: nn.Module, method: str, keep_first_last: bool, exclude: Iterable[str] = (),
                  types: Sequence[type[nn.Module]] = LAYER_TYPES) -> list[tuple[str, nn.Module]]:
    """The layers of ``types`` to quantize, in module order: all of them but the
    first and the last (``keep_first_last``) and the names in ``exclude``.

    Raises :class:`ConfigError` for an unknown name in ``exclude``, a model that
    a layer quantizer rewrote already, or when no layer is left.

    >>> net = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 3), nn.Linear(3, 1))
    >>> [n for n, _ in select_layers(net, "demo", keep_first_last=True)]
    ['2']
    """
    done = quantized_layers(model)
    if done:
        what = sorted({q.describes for q in done.values()})
        raise ConfigError(f"{method}: the model already has {' and '.join(what)} ({', '.join(done)}, by "
                          f"{', '.join(sorted({q.method for q in done.values()}))}); "
                          "apply one weight quantizer per recipe")
    types = tuple(types)
    # isinstance, not the class name: a pruned layer is a parametrized subclass ("ParametrizedLinear")
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, types)]
    names = [n for n, _ in layers]
    kinds = "/".join(t.__name__ for t in types)
    unknown = sorted(set(exclude) - set(names))
    if unknown:
        raise ConfigError(f"{method}: exclude names {', '.join(unknown)}, which are not {kinds} layers; "
                          f"valid names: {', '.join(names) or '(none)'}")
    keep = set(exclude) | ({names[0], names[-1]} if keep_first_last and names else set())
    chosen = [(n, m) for n, m in layers if n not in keep]
    if not chosen:
        raise ConfigError(f"{method}: no layer left to quantize among {names or f'no {kinds} layers'}"
                          + (" (the first and last stay float: keep_first_last=False quantizes them)"
                             if keep_first_last else ""))
    return chosen


def quantize_layers(model: nn.Module, method: str,
                    rewrite: Callable[[str, nn.Module], WeightQuant | QuantizedModule | None], *,
                    keep_first_last: bool = True, exclude: Iterable[str] = (),
                    types: Sequence[type[nn.Module]] = LAYER_TYPES) -> dict[str, nn.Module]:
    """Rewrite the :func:`select_layers` of ``model`` in place with ``rewrite(name, layer)``,
    which returns a :class:`WeightQuant` (installed as a parametrization of the layer's
    ``weight``, after any mask), a :class:`QuantizedModule` (put in the layer's place) or
    ``None`` (the method changed the layer itself).  Each rewritten layer is annotated
    with its quantization's :meth:`~WeightQuant.hint`.  Returns ``{name: layer}`` as the
    layers now are in ``model``."""
    done: dict[str, nn.Module] = {}
    for name, layer in select_layers(model, method, keep_first_last, exclude, types):
        quant = rewrite(name, layer)
        if isinstance(quant, WeightQuant):
            parametrize.register_parametrization(layer, "weight", quant)
        elif isinstance(quant, QuantizedModule):
            parent, _, child = name.rpartition(".")
            layer = quant.to(layer.weight.device)   # earlier hints stay with the old layer: a new weight
            setattr(model.get_submodule(parent) if parent else model, child, layer)
        if quant is not None:
            annotate(layer, quant.hint())
        done[name] = layer
    return done


@dataclasses.dataclass(frozen=True)
class LayerQuantConfig(TrainConfig):
    """Fields every training-time layer quantizer takes: the training fields of
    :class:`sdk.trainer.TrainConfig` and which layers to rewrite."""

    epochs: int = 5
    keep_first_last: bool = True          # first and last Conv/Linear stay float
    exclude: tuple[str, ...] = ()         # Conv/Linear names left float


class LayerQuantizer(Quantizer):
    """Training-time quantizer: rewrite each chosen layer (:meth:`quantize_layer`), then
    train the whole network with cross-entropy on ``(x, y)`` batches through the
    quantized forward pass — when ``data`` is given, or always where the method
    needs the training (``needs_training``)."""

    post_training = False
    Config: ClassVar[type[LayerQuantConfig]] = LayerQuantConfig
    #: the float layer types the method rewrites
    layer_types: ClassVar[tuple[type[nn.Module], ...]] = LAYER_TYPES
    #: True: the rewritten model is useless untrained, ``data=None`` is an error
    needs_training: ClassVar[bool] = False

    def quantize_layer(self, name: str, layer: nn.Module) -> WeightQuant | QuantizedModule | None:
        """The quantization of ``layer`` (see :func:`quantize_layers`)."""
        raise NotImplementedError

    def after_step(self, layers: list[nn.Module]) -> Callable[[], None] | None:
        """Called after every optimizer step with the rewritten layers (default: nothing)."""
        return None

    def apply(self, model: nn.Module, data: Iterable | None = None) -> nn.Module:
        """Quantize ``model`` in place, train it (see the class); return it (eval mode)."""
        cfg = self.config
        if not isinstance(model, nn.Module):
            raise InputError(f"{self.name} quantizes a torch.nn.Module, got {type(model).__name__}")
        layers = quantize_layers(model, self.name, self.quantize_layer, keep_first_last=cfg.keep_first_last,
                                 exclude=cfg.exclude, types=self.layer_types)
        if data is not None or self.needs_training:
            fit(model, data, self._loss, cfg.training(), after_step=self.after_step(list(layers.values())),
                desc=self.name)
        return model.eval()

    def _loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        hint = "" if self.needs_training else "or data=None to quantize without training"
        return classification_loss(model, batch, who=f"{self.name} training", hint=hint)
