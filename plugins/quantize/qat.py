"""``qat`` — quantization-aware training for integer-only inference, BatchNorm folded in.

Jacob, Kligys, Chen, Zhu, Tang, Howard, Adam and Kalenichenko, "Quantization
and Training of Neural Networks for Efficient Integer-Arithmetic-Only
Inference" (CVPR 2018).  The network is fine-tuned with the integer graph's
rounding simulated in the forward pass ("fake quantization"), the gradient
passing the rounding by the straight-through estimator, with cross-entropy on
``(x, y)`` batches.  The simulation is :mod:`sdk.fakequant`'s, which
``block-replacement`` shares:

* **BatchNorm folding** (section 3.2, Fig. C.8): a BatchNorm that directly
  follows a Conv/Linear is folded into it, ``w_fold = w·γ/σ``,
  ``b_fold = β + (b − μ)·γ/σ``; batch statistics for the first
  ``freeze_bn_after`` optimizer steps, then frozen running statistics (the
  deployed layer exactly).
* **Weights**: ``q(w) = s·clamp(round(w/s), −127, 127)`` per output channel,
  ``s = max|w_c| / 127`` (symmetric, narrow int8: what ``arm-int8`` ships).
* **Activations**: asymmetric int8 with ``(s, z)`` from an exponential moving
  average of each batch's min and max (``ema_decay``), on the model input and
  the outputs the integer graph has (each Conv/Linear after its folded BN and
  fused activation, other activation modules, average pooling).

After training the model is baked (:meth:`sdk.fakequant.FakeQuantized.bake`):
plain Conv/Linear layers whose weights hold exactly the int8 grid values
(``Hint(bits=8, per_channel=True)``) and the learned ranges as output hints
(``annotate(module, Hint(range=(lo, hi)), "output")``), which the graph-side
``ptq`` uses instead of observing; the input range is kept as
``model.qat_input_range``.  :func:`simulate` re-applies the learned activation
quantization to the baked model: the integer simulation the artifact is
compared with.

>>> import torch
>>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
>>> data = [(torch.randn(16, 4), torch.randint(0, 3, (16,))) for _ in range(4)]
>>> net = QAT(epochs=1, progress=False).apply(net, data)
>>> s = net[0].weight.detach().abs().amax(1, keepdim=True) / 127
>>> codes = net[0].weight.detach() / s       # integers, up to float rounding
>>> bool((codes - codes.round()).abs().max() < 1e-4)
True
"""

from __future__ import annotations

import dataclasses
from typing import Iterable

from torch import nn

from sdk import hookimpl
from sdk.errors import InputError
from sdk.fakequant import (FakeQuantConfig, FakeQuantized, FoldedLayer, fake_quant, fake_quant_weight,
                           range_qparams, simulate)
from sdk.layer_quant import LayerQuantizer
from sdk.trainer import fit

#: the fake-quantization API lives in sdk.fakequant; callers that quantize with qat find it here too
__all__ = ["QAT", "FoldedLayer", "fake_quant", "fake_quant_weight", "range_qparams", "simulate"]


class QAT(LayerQuantizer):
    """Quantization-aware training (Jacob et al. 2018): folded BN, int8 fake quantization, EMA ranges."""

    name = "qat"
    version = "1.0"
    needs_training = True
    streams = ("train",)

    @dataclasses.dataclass(frozen=True)
    class Config(FakeQuantConfig):
        pass

    def apply(self, model: nn.Module, data: Iterable | None = None) -> nn.Module:
        """Fold, fake-quantize and train ``model`` in place, then bake it (see the module); eval mode."""
        if not isinstance(model, nn.Module):
            raise InputError(f"qat quantizes a torch.nn.Module, got {type(model).__name__}")
        if data is None:
            raise InputError("qat trains: pass data= (a list of (x, y) batches or a DataLoader)")
        fq = FakeQuantized(model, self.config, self.name)
        try:
            fit(model, data, self._loss, self.config.training(), after_step=fq.after_step, desc=self.name)
        finally:
            fq.remove_hooks()
        return fq.bake()


@hookimpl
def register_quantizers(register):
    register(QAT)
