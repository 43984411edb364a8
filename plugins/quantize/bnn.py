"""``bnn`` — BinaryNet: binary weights and binary activations, trained with a straight-through estimator.

Hubara, Courbariaux, Soudry, El-Yaniv and Bengio, "Binarized Neural Networks"
(NeurIPS 2016; arXiv "BinaryNet", Courbariaux et al. 2016).  Forward: every
binarized layer computes ``sign(x) ⊛ sign(W)`` with values ±1 (x >= 0 → +1),
no scaling factor; its input is batch-normalised first, as in the paper's
``BN → sign`` blocks.  Backward: the sign's gradient is the straight-through
estimator with the hardtanh clip, ``g · 1_{|x| <= 1}``, and the real-valued
weights are clipped to [−1, 1] after each update (outside it their gradient is
0 and they would drift away).  The first conv and the last linear layer stay
full precision (``keep_first_last``).  The result runs on the
``binary-popcount`` target as XNOR + popcount.  The binary layers carry the hint
``Hint(codebook=2)`` (weights ±1, no per-filter scale).

>>> from plugins.quantize.bnn import BNN
>>> BNN(epochs=3).config.clip_weights
True
"""

from __future__ import annotations

import dataclasses

import torch

from sdk import hookimpl
from sdk.binary import BinaryConfig, BinaryInfo, BinaryQuantizer


class BNN(BinaryQuantizer):
    """BinaryNet: sign weights, sign activations, STE with hardtanh clip."""

    name = "bnn"
    version = "1.0"

    @dataclasses.dataclass(frozen=True)
    class Config(BinaryConfig):
        input_bn: bool = True           # BatchNorm before each sign
        clip_weights: bool = True       # keep the real-valued weights in [-1, 1]

    def layer_info(self) -> BinaryInfo:
        return BinaryInfo("bnn", scale_weights=False, binary_activations=True, scale_activations=False,
                          input_bn=self.config.input_bn)

    def after_step(self, layers):
        if not self.config.clip_weights:
            return None

        def clip() -> None:
            with torch.no_grad():
                for layer in layers:
                    layer.weight.clamp_(-1.0, 1.0)

        return clip


@hookimpl
def register_quantizers(register):
    register(BNN)
