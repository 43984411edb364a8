"""``bwn`` — Binary-Weight-Network: binary weights scaled per filter, full-precision activations.

Rastegari, Ordonez, Redmon and Farhadi, "XNOR-Net: ImageNet Classification
Using Binary Convolutional Neural Networks" (ECCV 2016), §3.1: each filter W
is approximated by ``α · sign(W)`` with ``α = mean |W|`` (the optimal scale of
eq. 4), so the layer computes ``(x ⊛ sign(W)) · α`` with real-valued x.  The
sign's gradient is the straight-through estimator ``g · 1_{|W| <= 1}``; α is
differentiated as the function of W it is.  The first conv and the last linear
layer stay full precision (``keep_first_last``).  The binary layers carry the hint
``Hint(codebook=2, per_channel=True)`` (weights ±α, α per filter).

BWN layers keep float activations: the ``binary-popcount`` target ships them as
packed sign bits with a float α per filter and computes sign-selected sums of the
float inputs (its ``BwnConv`` / ``BwnLinear`` kernels), 1/32 of the fp32 weight
bytes plus α and bias.

>>> from plugins.quantize.bwn import BWN
>>> BWN(epochs=2).layer_info().binary_activations
False
"""

from __future__ import annotations

import dataclasses

from sdk import hookimpl
from sdk.binary import BinaryConfig, BinaryInfo, BinaryQuantizer


class BWN(BinaryQuantizer):
    """Binary-Weight-Network: α · sign(W) weights, float activations."""

    name = "bwn"
    version = "1.0"

    @dataclasses.dataclass(frozen=True)
    class Config(BinaryConfig):
        pass

    def layer_info(self) -> BinaryInfo:
        return BinaryInfo("bwn", scale_weights=True, binary_activations=False, scale_activations=False,
                          input_bn=False)


@hookimpl
def register_quantizers(register):
    register(BWN)
