"""``xnorpp`` — XNOR-Net++: binary weights and activations scaled by a learned Γ instead of computed α, β.

Bulat and Tzimiropoulos, "XNOR-Net++: Improved Binary Neural Networks" (BMVC
2019).  Every chosen ``Conv2d``/``Linear`` (all but the first and the last,
``keep_first_last``) computes ::

    y = (sign(BN(x)) ⊛ sign(W)) ⊙ Γ

with Γ learned by backprop (:class:`sdk.binary.LearnedScaleLayer`), the
signs' gradients the straight-through estimator ``g · 1_{|x| <= 1}``:

* ``scale="factorised"`` (the paper's case 3, its best): ``Γ = α ⊗ β ⊗ γ``
  with ``α ∈ R^{C_out}``, ``β ∈ R^{H_out}``, ``γ ∈ R^{W_out}``.  The output
  size of each conv is read from one forward pass of the float model on the
  first training batch, so the deployed model takes inputs of that size only
  (another size is an InputError naming the trained one).  Linear layers get
  α alone.
* ``scale="channel"`` (case 1): ``Γ = α ∈ R^{C_out}``.

α starts at XNOR-Net's mean |W| per filter, β and γ at 1.

On ``binary-popcount`` α is the binary layer's per-channel scale and β, γ its
``scale_h`` and ``scale_w``: the kernel multiplies the popcount by α, then
β[row], then γ[column], torch's order, bit for bit.  They cannot go into the
following BatchNorm instead: a BatchNorm scales whole channels, and
``β[h] · γ[w]`` differs between positions of one channel.  The layers carry
``Hint(codebook=2, per_channel=True)``.

Not implemented: the paper's other forms of Γ (a full ``C_out × H_out × W_out``
tensor, other factorisations) and its ImageNet training schedule.

>>> XNORPP(scale="channel").layer_info().scale_activations
False
"""

from __future__ import annotations

import dataclasses
from typing import Iterable

from torch import nn

from sdk import hookimpl
from sdk.binary import BinaryConfig, BinaryInfo, BinaryQuantizer, LearnedScaleLayer, conv_output_sizes, \
    learned_scale_layer
from sdk.config import check_bool, check_choice
from sdk.errors import ConfigError, InputError
from sdk.trainer import split_batch

SCALES = ("factorised", "channel")


class XNORPP(BinaryQuantizer):
    """XNOR-Net++: sign(W) ⊛ sign(x) scaled by a learned Γ = α ⊗ β ⊗ γ (or α)."""

    name = "xnorpp"
    version = "1.0"

    @dataclasses.dataclass(frozen=True)
    class Config(BinaryConfig):
        scale: str = "factorised"       # "factorised": Γ = α ⊗ β ⊗ γ (case 3); "channel": Γ = α (case 1)
        input_bn: bool = True           # BatchNorm before each sign

        def __post_init__(self):
            super().__post_init__()
            check_choice("xnorpp", "scale", self.scale, SCALES)
            check_bool("xnorpp", "input_bn", self.input_bn)

    _sizes: dict[str, tuple[int, int]] | None = None     # conv output sizes of the running apply

    def layer_info(self) -> BinaryInfo:
        return BinaryInfo("xnorpp", scale_weights=True, binary_activations=True, scale_activations=False,
                          input_bn=self.config.input_bn)

    def quantize_layer(self, name: str, layer: nn.Module) -> LearnedScaleLayer:
        size = None
        if self.config.scale == "factorised" and isinstance(layer, nn.Conv2d):
            if self._sizes is None or name not in self._sizes:
                raise ConfigError(f"xnorpp: layer {name}'s output size is unknown (scale='factorised' reads it "
                                  "from a forward pass of the model on the first training batch; this conv did "
                                  "not run): exclude it, or use scale='channel'")
            size = self._sizes[name]
        return learned_scale_layer(name, layer, self.layer_info(), size)

    def apply(self, model: nn.Module, data: Iterable | None = None) -> nn.Module:
        """Quantize and train ``model`` in place (:meth:`LayerQuantizer.apply`); ``factorised``
        first runs it on the first batch of ``data`` for each conv's output size."""
        if self.config.scale != "factorised" or not isinstance(model, nn.Module):
            return super().apply(model, data)
        if data is not None and not hasattr(data, "__len__"):
            data = list(data)
        if not data:
            raise InputError("xnorpp needs data: pass data= (a list of (x, y) batches or a DataLoader)")
        self._sizes = conv_output_sizes(model, split_batch(next(iter(data)))[0])
        try:
            return super().apply(model, data)
        finally:
            self._sizes = None


@hookimpl
def register_quantizers(register):
    register(XNORPP)
