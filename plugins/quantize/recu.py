"""``recu`` — ReCU: standardised, quantile-clamped latent weights, so that "dead" weights flip again.

Xu, Lin, Liu, Chen, Shao, Gao, Tian and Ji, "ReCU: Reviving the Dead Weights in
Binary Neural Networks" (ICCV 2021).  Every chosen ``Conv2d``/``Linear`` (all
but the first and the last, ``keep_first_last``) becomes a binary layer whose
weights are, per output filter (:class:`sdk.binary.ReCULayer`):

1. balanced and standardised: ``z = (W − mean) / std`` (the paper's weight
   standardisation; the mean subtracted keeps about half of each filter's
   signs +1);
2. clamped by the rectified clamp unit ``v = max(min(z, Q(τ)), Q(1 − τ))``,
   ``Q`` the quantile of the layer's ``z`` (:func:`sdk.binary.rectified_clamp`);
3. binarised: ``α · sign(v)`` with ``α = mean |v|`` per output filter.  The
   sign's gradient passes the sign and the clamp straight through to ``z``
   (the paper's code uses the identity for the weights' sign), so the clamped
   tails keep getting the gradient of the value they are clamped to.

After every optimizer step the clamp is also applied to the latent weights
(``revive=True``): ``W ← μ + σ · ReCU_τ(z)``, which moves the weights in the
tails — those that take longest to change sign — back to the quantiles, within
reach of a flip.  ``τ`` follows an exponential schedule from ``tau_start`` to
``tau_end`` over the training steps: the tail mass ``1 − τ`` decays
geometrically, ``1 − τ_t = (1 − τ_start) · ((1 − τ_end) / (1 − τ_start))^(t/T)``
(the paper anneals τ upward, trading quantization error for entropy).

Activations: ``sign(BN(x))`` with Bi-Real Net's ApproxSign gradient
(``2 − 2|x|`` inside ``[−1, 1]``, what the paper's code uses); with
``binary_activations=False`` the layers keep float activations (a bwn-style
ReCU).  On ``binary-popcount`` the layers ship as the existing ±1 packed
weights with α per output channel (``BinaryConv``/``BinaryLinear``, or
``BwnConv``/``BwnLinear`` for float activations): ReCU changes the training,
not the kernel.  The layers carry ``Hint(codebook=2, per_channel=True)``.

Not implemented: the paper's learned scaling factor variant and its two-stage
ImageNet schedule; τ's schedule is the one above, not tuned per network.

>>> from plugins.quantize.recu import ReCU
>>> [round(t, 4) for t in ReCU(tau_start=0.9, tau_end=0.99).schedule(3)]
[0.9, 0.9684, 0.99]
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Iterable

from torch import nn

from sdk import hookimpl
from sdk.binary import BinaryConfig, BinaryInfo, BinaryQuantizer, ReCULayer, recu_layer
from sdk.config import check_bool, check_range
from sdk.errors import ConfigError


class ReCU(BinaryQuantizer):
    """ReCU: standardised, quantile-clamped (revived) binary weights, τ annealed."""

    name = "recu"
    version = "1.0"

    @dataclasses.dataclass(frozen=True)
    class Config(BinaryConfig):
        tau_start: float = 0.85         # ReCU's τ at the first step (tail mass 1 − τ clamped on each side)
        tau_end: float = 0.99           # ... and at the last
        revive: bool = True             # clamp the latent weights too after every step
        binary_activations: bool = True  # sign(BN(x)) inputs (False: float activations, as bwn)
        input_bn: bool = True           # BatchNorm before each sign

        def __post_init__(self):
            super().__post_init__()
            for field in ("tau_start", "tau_end"):
                check_range("recu", field, getattr(self, field), 0.5, 1.0, hi_open=True)
            if self.tau_start > self.tau_end:
                raise ConfigError(f"recu: tau_start={self.tau_start} must not exceed tau_end={self.tau_end} "
                                  "(τ is annealed upward: fewer weights clamped as training goes on)")
            for field in ("revive", "binary_activations", "input_bn"):
                check_bool("recu", field, getattr(self, field))

    _total: int = 1         # optimizer steps of the running apply, for τ's schedule

    def layer_info(self) -> BinaryInfo:
        cfg = self.config
        return BinaryInfo("recu", scale_weights=True, binary_activations=cfg.binary_activations,
                          scale_activations=False, input_bn=cfg.input_bn,
                          sign="approx" if cfg.binary_activations else "ste")

    def quantize_layer(self, name: str, layer: nn.Module) -> ReCULayer:
        return recu_layer(name, layer, self.layer_info(), self.config.tau_start)

    def tau(self, step: int, total: int) -> float:
        """τ after ``step`` of ``total`` optimizer steps (``tau_start`` at 0, ``tau_end`` at ``total``)."""
        cfg = self.config
        t = min(max(step / max(total, 1), 0.0), 1.0)
        return 1.0 - (1.0 - cfg.tau_start) * ((1.0 - cfg.tau_end) / (1.0 - cfg.tau_start)) ** t

    def schedule(self, total: int) -> list[float]:
        """τ at steps ``0, 1, ..., total - 1`` of a run of ``total - 1`` steps (its two ends included)."""
        return [self.tau(s, total - 1) for s in range(total)]

    def apply(self, model: nn.Module, data: Iterable | None = None) -> nn.Module:
        """Quantize and train ``model`` in place (:meth:`LayerQuantizer.apply`), τ annealed over the steps."""
        if data is not None and not hasattr(data, "__len__"):
            data = list(data)
        cfg = self.config
        if data is not None:
            steps = cfg.epochs * len(data)
            self._total = steps if cfg.max_steps is None else min(cfg.max_steps, steps)
        return super().apply(model, data)

    def after_step(self, layers: list[nn.Module]) -> Callable[[], None]:
        step = 0

        def anneal() -> None:
            nonlocal step
            step += 1
            tau = self.tau(step, self._total)
            for layer in layers:
                layer.tau = tau
                if self.config.revive:
                    layer.revive()
        return anneal


@hookimpl
def register_quantizers(register):
    register(ReCU)
