"""``reactnet`` — ReActNet: RSign and RPReLU, learned per-channel shifts around the sign and the activation.

Liu, Shen, Savvides, Xing and Cheng, "ReActNet: Towards Precise Binary Neural
Network with Generalized Activation Functions" (ECCV 2020).  Every chosen
``Conv2d``/``Linear`` (all but the first and the last, ``keep_first_last``)
becomes the block ::

    y = RPReLU(BN_out(RSign(x) ⊛ α·sign(W)) + shortcut(x))

* **RSign**: ``sign(x − t)`` with ``t`` learned per input channel (the
  layer's ``threshold``, initialised to 0; ``BinaryInfo(learned_threshold=True)``).
  The sign's gradient is Bi-Real Net's ApproxSign, as in the paper's code, so
  ``∂/∂t = −ApproxSign'(x − t)``.  The paper's block has no BatchNorm before the
  sign, so ``input_bn`` is off by default (with it on, RSign's ``t`` shifts the
  BN's output).  On ``binary-popcount`` ``t`` becomes the Sign's threshold.
* **RPReLU**: ``PReLU(x − γ) + ζ`` with ``γ``, ``ζ`` and the PReLU slope
  learned per channel (:class:`RPReLU`), on the block's sum, as in the paper's
  code (``rprelu=False`` leaves it out).
* **The real-valued shortcut** of Bi-Real Net, on which ReActNet builds
  (:func:`sdk.binary.shortcut_layer`: identity where the layer keeps
  the shape, ``AvgPool → 1x1 conv → BN`` where a "same" conv changes it, else
  none).  ReActNet-A's MobileNet blocks double the channels by concatenating two
  binary convs instead; that architecture change is not made here.
* Weights: ``α·sign(W)``, ``α = mean |W|`` per output filter, straight-through
  sign gradient.
* **The distributional loss**, optional (``distill=True``): the loss is
  ``KL(softmax(teacher) ‖ softmax(binary))`` at temperature 1 from a float
  teacher: in :func:`sdk.compress` the caller's ``teacher=`` or else the original
  model, in ``apply`` its ``teacher=`` or else a copy of the model as given (so
  that must be trained); the labels are then not used.  Default: cross-entropy
  on the labels.

Not implemented: ReActNet's two-step schedule (binary activations first, then
binary weights) and the MobileNet-V1 based architecture itself.

>>> import torch
>>> f = RPReLU(2)
>>> with torch.no_grad():
...     f.gamma[:], f.zeta[:] = torch.tensor([1.0, -1.0]), torch.tensor([0.5, 0.0])
>>> f(torch.tensor([[3.0, -3.0]])).tolist()                 # [3 − 1 + 0.5, 0.25·(−3 + 1) + 0]
[[2.5, -0.5]]
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any, Callable, Iterable

import torch
from torch import nn

from sdk import hookimpl
from sdk.binary import BinaryConfig, BinaryInfo, BinaryQuantizer, shortcut_layer
from sdk.context import StageContext
from sdk.errors import InputError
from sdk.losses import response_step, soft_target_kl


class RPReLU(nn.Module):
    """ReActNet's RPReLU: ``PReLU(x − γ) + ζ`` with ``γ``, ``ζ`` (init 0) and the slope (init 0.25)
    per channel (dimension 1)."""

    def __init__(self, channels: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.zeros(channels))
        self.prelu = nn.PReLU(channels)
        self.zeta = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        per_channel = (1, -1) + (1,) * (x.ndim - 2)
        return self.prelu(x - self.gamma.view(per_channel)) + self.zeta.view(per_channel)


class ReActNet(BinaryQuantizer):
    """ReActNet: RSign (learned sign thresholds), RPReLU and real-valued shortcuts."""

    name = "reactnet"
    version = "1.0"

    @dataclasses.dataclass(frozen=True)
    class Config(BinaryConfig):
        input_bn: bool = False          # BatchNorm before each RSign (the paper has none)
        rprelu: bool = True             # RPReLU on each block's output
        shortcut: bool = True           # Bi-Real's real-valued shortcut
        downsample: bool = True         # shape-changing convs get AvgPool → 1x1 conv → BN (False: no shortcut)
        output_bn: bool = True          # BatchNorm on the binary product, before the add
        distill: bool = False           # distributional loss from the float model instead of cross-entropy

    _step: Callable[[nn.Module, Any], torch.Tensor] | None = None     # the distillation step while training

    def layer_info(self) -> BinaryInfo:
        return BinaryInfo("reactnet", scale_weights=True, binary_activations=True, scale_activations=False,
                          input_bn=self.config.input_bn, sign="approx", learned_threshold=True)

    def quantize_layer(self, name: str, layer: nn.Module) -> nn.Module:
        cfg = self.config
        return shortcut_layer(name, layer, self.layer_info(), shortcut=cfg.shortcut, downsample=cfg.downsample,
                              output_bn=cfg.output_bn, after=RPReLU if cfg.rprelu else None)

    def run(self, model: nn.Module, ctx: StageContext) -> nn.Module:
        """In :func:`sdk.compress`: the teacher of ``distill`` is the caller's, else the original model."""
        return self.apply(model, ctx.data.get("train"), teacher=ctx.teacher if ctx.teacher is not None else ctx.original)

    def apply(self, model: nn.Module, data: Iterable | None = None, *, teacher: nn.Module | None = None) -> nn.Module:
        """Quantize and train ``model`` in place (:meth:`LayerQuantizer.apply`); with ``distill`` the
        loss is the distributional one from ``teacher`` (default: a copy of ``model`` as given)."""
        if not self.config.distill or not isinstance(model, nn.Module):
            return super().apply(model, data)
        teacher = copy.deepcopy(model) if teacher is None else teacher
        if not isinstance(teacher, nn.Module):
            raise InputError(f"reactnet distill needs one teacher model, got {type(teacher).__name__}")
        self._step = response_step(teacher, lambda student, target, _labels: soft_target_kl(student, target))
        try:
            return super().apply(model, data)
        finally:
            self._step = None

    def _loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        return super()._loss(model, batch) if self._step is None else self._step(model, batch)


@hookimpl
def register_quantizers(register):
    register(ReActNet)
