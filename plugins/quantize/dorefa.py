"""``dorefa`` — DoReFa-Net: k-bit weights and k-bit activations trained with STE.

Zhou, Wu, Ni, Zhou, Wen and Zou, "DoReFa-Net: Training Low Bitwidth
Convolutional Neural Networks with Low Bitwidth Gradients" (arXiv:1606.06160,
2016).  With ``n = 2^k − 1`` and ``quantize_k(x) = round(n·x) / n`` for x in
[0, 1], whose ``round`` has the straight-through gradient (identity):

* weights, k > 1 (eq. 9), per layer::

      w_q = 2 · quantize_k( tanh(w) / (2 · max |tanh(w)|) + 1/2 ) − 1

  the gradient flows through ``tanh`` and the ``max`` as the formula says; only
  the rounding is straight-through.  At most ``2^k`` levels, in [−1, 1].
* weights, k = 1 (eq. 7), per layer: ``w_q = E(|w|) · sign(w)`` with
  ``sign(0) = +1`` and the straight-through gradient ``∂L/∂w = ∂L/∂w_q``.
* activations (eq. 10): ``quantize_k(clip(x, 0, 1))``; the gradient is 1 inside
  (0, 1) and 0 where the clip saturates.

Where activations are quantized: on the **input of every quantized
Conv/Linear layer** (a forward pre-hook that calls the layer's ``input_quant``
module).  In the usual conv → BN → ReLU (→ pool) stack that input is a ReLU
output, as in the paper, and the rule needs no knowledge of the model's
activation functions.  The first and last layers stay float
(``keep_first_last``), so the network's input image and its logits are not
quantized, as in the paper's experiments.  ``weight_bits=32`` or
``activation_bits=32`` switches that part off.  Gradient quantization (the
paper's "G" bits) speeds up training only and is not implemented.

Deployment: the quantized weights fold into float constants.  Quantized
activations need a ``round`` op (the clip is a ``hardtanh``); ``arm-fp32``'s
lowering has none, so a model with ``activation_bits < 32`` is refused there
(``UnsupportedOpError`` naming ``aten.round``) while a weights-only one
(``activation_bits=32``) deploys.  Layers with quantized weights carry the hint
``Hint(bits=weight_bits)`` (:mod:`sdk.encoding`): at most ``2^k`` levels on a
uniform grid.  Layer choice and training: :mod:`sdk.layer_quant`.

>>> import torch
>>> q = DoReFa(weight_bits=2, activation_bits=32)
>>> net = q.apply(torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 8), torch.nn.Linear(8, 2)))
>>> len(torch.unique(net[1].weight.detach())) <= 4
True
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from sdk import hookimpl
from sdk.binary import quantize_uniform
from sdk.config import check_choice
from sdk.encoding import Hint
from sdk.errors import ConfigError
from sdk.layer_quant import LayerQuantConfig, LayerQuantizer, WeightQuant, ste

#: bit widths DoReFa takes; 32 means "not quantized"
BITS = (1, 2, 3, 4, 5, 6, 7, 8, 32)


def quantize_k(x: torch.Tensor, k: int) -> torch.Tensor:
    """``round((2^k − 1) · x) / (2^k − 1)`` with the straight-through gradient for ``round``.

    >>> (quantize_k(torch.tensor([0.0, 0.2, 0.5, 1.0]), 2) * 3).tolist()
    [0.0, 1.0, 2.0, 3.0]
    """
    n = float(2 ** k - 1)
    y = x * n
    return ste(torch.round(y), y) / n


def dorefa_weight(w: torch.Tensor, k: int) -> torch.Tensor:
    """DoReFa's k-bit weights of one layer (eq. 9; eq. 7 for k = 1); differentiable (STE).

    >>> [round(v, 4) for v in dorefa_weight(torch.tensor([0.5, -1.5, 0.0]), 1).tolist()]
    [0.6667, -0.6667, 0.6667]
    """
    if k == 1:
        sign = torch.where(w < 0, -1.0, 1.0).to(w.dtype)
        return ste(w.detach().abs().mean() * sign, w)
    t = torch.tanh(w)
    x = t / (2 * t.abs().max()) + 0.5
    return 2 * quantize_k(x, k) - 1


def dorefa_activation(x: torch.Tensor, k: int) -> torch.Tensor:
    """``quantize_k(clip(x, 0, 1))`` (eq. 10).

    >>> dorefa_activation(torch.tensor([-1.0, 0.4, 3.0]), 1).tolist()
    [0.0, 0.0, 1.0]
    """
    # one op, edgepack::quantize_uniform (round(clamp(n·x, 0, n)) / n, the same values and
    # gradient): binary-popcount packs its codes as bit planes
    return quantize_uniform(x, k, float(2 ** k - 1))


class DoReFaWeight(WeightQuant):
    """Parametrization ``w ↦ w_q`` (k-bit DoReFa weights)."""

    method = "dorefa"

    def __init__(self, bits: int):
        super().__init__()
        self.bits = bits

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return dorefa_weight(w, self.bits)

    def hint(self) -> Hint:
        return Hint(bits=self.bits, source=self.method)

    def extra_repr(self) -> str:
        return f"bits={self.bits}"


class DoReFaActivation(nn.Module):
    """``x ↦ quantize_k(clip(x, 0, 1))``, held by a quantized layer as ``input_quant``."""

    def __init__(self, bits: int):
        super().__init__()
        self.bits = bits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dorefa_activation(x, self.bits)

    def extra_repr(self) -> str:
        return f"bits={self.bits}"


def _quantize_input(layer: nn.Module, args: tuple) -> tuple:
    # a module-level function, so deep copies and pickles of the model keep the hook
    return (layer.input_quant(args[0]), *args[1:])


class DoReFa(LayerQuantizer):
    """DoReFa-Net: k-bit weights (tanh-normalised) and k-bit clipped activations."""

    name = "dorefa"
    version = "1.0"

    @dataclasses.dataclass(frozen=True)
    class Config(LayerQuantConfig):
        weight_bits: int = 4        # 32: float weights
        activation_bits: int = 4    # 32: float activations

        def __post_init__(self):
            super().__post_init__()
            check_choice("dorefa", "weight_bits", self.weight_bits, BITS)
            check_choice("dorefa", "activation_bits", self.activation_bits, BITS)
            if self.weight_bits == 32 and self.activation_bits == 32:
                raise ConfigError("dorefa: weight_bits=32 and activation_bits=32 quantize nothing; "
                                  "lower one of them (e.g. weight_bits=4)")

    def quantize_layer(self, name: str, layer: nn.Module) -> DoReFaWeight | None:
        cfg = self.config
        if cfg.activation_bits < 32:
            if hasattr(layer, "input_quant"):
                raise ConfigError(f"dorefa: layer {name} already quantizes its input; "
                                  "apply one dorefa stage per recipe")
            layer.input_quant = DoReFaActivation(cfg.activation_bits)
            layer.register_forward_pre_hook(_quantize_input)
        return DoReFaWeight(cfg.weight_bits) if cfg.weight_bits < 32 else None


@hookimpl
def register_quantizers(register):
    register(DoReFa)
