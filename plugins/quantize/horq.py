"""``horq`` — High-Order Residual Quantization: order-k residual binarization of the activations.

Li, Ni, Zhang, Yang and Gao, "Performance Guaranteed Network Acceleration via
High-Order Residual Quantization" (ICCV 2017).  The input ``x`` of a binarized
layer is expanded into ``order`` binary planes, each binarizing what the
previous ones left (the residual)::

    R_0 = x,   H_j = sign(R_{j−1}),   β_j = mean |R_{j−1}|,   R_j = R_{j−1} − β_j H_j
    x ≈ Σ_{j=1..order} β_j H_j

each β_j the optimal scale of its plane, computed over each sample; every extra
order takes the part of x the previous ones missed, so the reconstruction error
``‖x − Σ β_j H_j‖`` falls with the order (the paper's guarantee).  Weights are
XNOR-Net's ``α · sign(W)`` with ``α = mean |W|`` per output filter, so a layer
computes ``Σ_j β_j (H_j ⊛ sign(W)) · α``: ``order`` binary products, each one an
XNOR + popcount.  ``order = 1`` is the plain sign of BinaryNet (β_1, one positive
number per sample, is left out, as it is in ``bnn``); XNOR-Net's window scale K is
not used at any order: the βs are the activations' scales.

The input is batch-normalised first (BN → residual sign → binary conv, as in
``xnor``).  Backward: straight-through, ``g · 1_{|x| <= 1}``; the βs are constants
there.  The first conv and the last linear layer stay full precision
(``keep_first_last``).  The binary op is ``edgepack::residual_sign``
(:func:`sdk.binary.residual_sign`), which ``binary-popcount`` lowers to packed bit
planes with the βs applied after the popcounts.  The binary layers carry the hint
``Hint(codebook=2, per_channel=True)`` (weights ±α).

>>> from plugins.quantize.horq import HORQ
>>> HORQ(order=3, epochs=2).layer_info().order
3
"""

from __future__ import annotations

import dataclasses

from sdk import hookimpl
from sdk.binary import BinaryConfig, BinaryInfo, BinaryQuantizer
from sdk.config import check_bool
from sdk.errors import ConfigError

#: the orders residual_sign takes (bit planes per activation)
ORDERS = tuple(range(1, 9))


class HORQ(BinaryQuantizer):
    """HORQ: α · sign(W) weights, activations as an order-k sum of scaled sign planes."""

    name = "horq"
    version = "1.0"

    @dataclasses.dataclass(frozen=True)
    class Config(BinaryConfig):
        order: int = 2                  # binary planes per activation; 1: plain sign
        input_bn: bool = True           # BatchNorm before the residual sign

        def __post_init__(self):
            super().__post_init__()
            if type(self.order) is not int or self.order not in ORDERS:
                raise ConfigError(f"horq: order={self.order!r} is not allowed; choose an integer 1..8 "
                                  "(binary planes per activation)")
            check_bool("horq", "input_bn", self.input_bn)

    def layer_info(self) -> BinaryInfo:
        return BinaryInfo("horq", scale_weights=True, binary_activations=True, scale_activations=False,
                          input_bn=self.config.input_bn, order=self.config.order)


@hookimpl
def register_quantizers(register):
    register(HORQ)
