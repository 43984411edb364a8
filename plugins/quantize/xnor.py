"""``xnor`` — XNOR-Net: binary weights and activations with α and K (β) scaling.

Rastegari, Ordonez, Redmon and Farhadi, "XNOR-Net: ImageNet Classification
Using Binary Convolutional Neural Networks" (ECCV 2016), §3.2.  A binarized
layer computes ``(sign(x) ⊛ sign(W)) ⊙ K · α``:

* ``α = mean |W|`` per output filter (eq. 4);
* ``K = A ∗ k``, the paper's β for every output position: ``A`` is the mean of
  ``|x|`` across the input channels, ``k`` the kernel-sized averaging filter
  (zero padding counts as 0), i.e. the mean of ``|x|`` over exactly the window
  each output reduces; a linear layer's window is its whole input vector.

Its input is batch-normalised first (the paper's BN → BinActiv → BinConv
block).  Backward: the sign's gradient is the straight-through estimator
``g · 1_{|x| <= 1}``; α is differentiated as a function of W, K is a constant
scale.  The first conv and the last linear layer stay full precision
(``keep_first_last``).  On the ``binary-popcount`` target the product is XNOR +
popcount and K is computed in the generated C (a ``MeanAbsScale`` layer).  The
binary layers carry the hint ``Hint(codebook=2, per_channel=True)`` (weights ±α).

>>> from plugins.quantize.xnor import XNOR
>>> XNOR(epochs=3).layer_info().scale_activations
True
"""

from __future__ import annotations

import dataclasses

from sdk import hookimpl
from sdk.binary import BinaryConfig, BinaryInfo, BinaryQuantizer


class XNOR(BinaryQuantizer):
    """XNOR-Net: α · sign(W) weights, sign activations scaled by K."""

    name = "xnor"
    version = "1.0"

    @dataclasses.dataclass(frozen=True)
    class Config(BinaryConfig):
        input_bn: bool = True           # BatchNorm before each sign

    def layer_info(self) -> BinaryInfo:
        return BinaryInfo("xnor", scale_weights=True, binary_activations=True, scale_activations=True,
                          input_bn=self.config.input_bn)


@hookimpl
def register_quantizers(register):
    register(XNOR)
