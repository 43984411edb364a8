"""``bireal`` — Bi-Real Net: a real-valued shortcut around every binary layer, ApproxSign gradient.

Liu, Wu, Luo, Yang, Liu and Cheng, "Bi-Real Net: Enhancing the Performance of
1-bit CNNs with Improved Representational Capability and Advanced Training
Algorithm" (ECCV 2018).  Every chosen ``Conv2d``/``Linear`` (all but the first
and the last, ``keep_first_last``) becomes a Bi-Real block ::

    y = BN_out(sign(BN_in(x)) ⊛ α·sign(W)) + shortcut(x)

where ``x`` is the block's real-valued input (the shortcut carries the
real activations past the 1-bit convolution, so the block's output takes many
more distinct values than the popcount's integers: the paper's "representational
capability").  The shortcut is

* the identity when the layer keeps the shape: a conv with stride 1, as many
  outputs as inputs and "same" padding (``2·padding = dilation·(kernel − 1)``),
  or a linear with ``in_features == out_features``;
* Bi-Real's downsample path ``AvgPool(stride) → float 1x1 conv → BN`` for a
  "same" conv that changes the stride or the channels (``downsample=True``; the
  feature map's height and width must then be multiples of the stride, else the
  forward pass says so);
* none otherwise (a conv without "same" padding, a linear that changes the
  width, or a shape change with ``downsample=False``): the block is then
  ``BN_out(binary(x))``.  :func:`sdk.binary.shortcuts` lists what each layer got
  (``identity``, ``downsample`` or ``none``).

The user model's own layers after the replaced one (its BN, ReLU, ...) act on
the block's sum; ``output_bn`` is the block's BN before the add, as in the paper's
``sign → conv → BN → +`` block.

Implemented besides the shortcut:

* **ApproxSign**, the paper's approximation to the derivative of the sign: the
  activations' sign keeps its forward and gets the derivative of a piecewise
  quadratic, ``2 + 2x`` on ``[-1, 0)``, ``2 − 2x`` on ``[0, 1)``, 0 elsewhere
  (:func:`sdk.binary.approx_sign`, ``BinaryInfo(sign="approx")``).
* **Magnitude-aware weights**: training computes with ``α·sign(W)``,
  ``α = ‖W‖₁ / n`` per output filter.  The weight gradient is the exact
  derivative of that product under the straight-through sign (``g · 1_{|W| <= 1}``):
  the paper's magnitude-aware gradient ``α · ∂sign(W)/∂W`` plus the term through
  α, which the paper's approximation leaves out.  On ``binary-popcount`` α is the
  per-channel scale of the popcount (the paper lets the BN absorb it at test time).

Not implemented: the paper's initialisation from a real-valued network trained
with ``clip(−1, 1)`` in place of ReLU: the model handed to ``apply`` is the
initialisation.  ``shortcut=False`` keeps everything else (the ablation the
paper compares with).

>>> import torch
>>> from torch import nn
>>> from sdk.binary import shortcuts
>>> net = nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.Conv2d(32, 32, 3, padding=1),
...                     nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.Flatten(), nn.Linear(64 * 16, 10))
>>> _ = BiReal(epochs=1, progress=False).apply(net, [(torch.rand(4, 1, 8, 8), torch.tensor([0, 1, 2, 3]))])
>>> shortcuts(net)
{'1': 'identity', '2': 'downsample'}
"""

from __future__ import annotations

import dataclasses

from torch import nn

from sdk import hookimpl
from sdk.binary import (
    BinaryConfig,
    BinaryInfo,
    BinaryQuantizer,
    ShortcutLayer,
    shortcut_layer,
    shortcuts,
)

__all__ = ["BiReal", "shortcuts"]


class BiReal(BinaryQuantizer):
    """Bi-Real Net: binary layers with real-valued shortcuts and the ApproxSign gradient."""

    name = "bireal"
    version = "1.0"

    @dataclasses.dataclass(frozen=True)
    class Config(BinaryConfig):
        input_bn: bool = True           # BatchNorm before each sign
        shortcut: bool = True           # the real-valued shortcut (False: the paper's ablation without it)
        downsample: bool = True         # shape-changing convs get AvgPool → 1x1 conv → BN (False: no shortcut)
        output_bn: bool = True          # BatchNorm on the binary product, before the add

    def layer_info(self) -> BinaryInfo:
        return BinaryInfo("bireal", scale_weights=True, binary_activations=True, scale_activations=False,
                          input_bn=self.config.input_bn, sign="approx")

    def quantize_layer(self, name: str, layer: nn.Module) -> ShortcutLayer:
        cfg = self.config
        return shortcut_layer(name, layer, self.layer_info(), shortcut=cfg.shortcut, downsample=cfg.downsample,
                              output_bn=cfg.output_bn)


@hookimpl
def register_quantizers(register):
    register(BiReal)
