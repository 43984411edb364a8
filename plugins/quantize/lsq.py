"""``lsq`` — learned step size quantization (LSQ) and PACT-style learned clipping.

Esser, McKinstry, Bablani, Appuswamy and Modha, "Learned Step Size
Quantization" (ICLR 2020).  Every quantized Conv/Linear layer learns a step
``s`` for its weight (one per tensor, or one per output channel) and one for
its input activation; the quantizer is::

    q(x) = clamp(round(x / s), Qn, Qp) · s

with the straight-through gradient for ``round``, so that (paper eq. 3)::

    ∂q/∂s = −x/s + round(x/s)   for Qn < x/s < Qp,   Qn or Qp where the clamp saturates
    ∂q/∂x = 1 inside, 0 outside

and the step's gradient scaled by ``g = 1/sqrt(N · Qp)`` (N: the weights of
the tensor or channel, or the features of one sample of the activation).
Steps start at ``2 · mean|x| / sqrt(Qp)`` (weights at rewrite time,
activations on the first training batch).  Grids: weights are symmetric on
the narrow range ``Qn = −Qp = −(2^(b−1) − 1)`` (``±7`` for 4 bits; the paper's
extra code ``−2^(b−1)`` has no place on the targets' symmetric narrow int
grid); activations ``[0, 2^b − 1]`` when the first batch holds no negative
value (a ReLU output), else ``[−2^(b−1), 2^(b−1) − 1]``.

``mode="pact"`` (Choi et al., "PACT: Parameterized Clipping Activation for
Quantized Neural Networks", arXiv:1805.06085, 2018) learns the activation's
clipping value ``α`` instead: ``y = clip(x, 0, α)`` quantized with step
``α / (2^b − 1)``, the whole quantizer straight-through, so ``∂q/∂α = 1``
where ``x ≥ α`` and 0 elsewhere; ``pact_decay · α²`` joins the loss (the
paper's L2 on α).  ``α`` starts at the first batch's maximum.  Weights use
LSQ in both modes.  Activations are quantized where ``dorefa`` quantizes
them: on the input of every quantized layer (``input_quant``, a forward
pre-hook); the first and last layers stay float by default
(``keep_first_last``).

Deployment (:func:`bake`, run by :func:`sdk.compress` after training): the
weights stay exactly on the learned grid (``codes · s``) with
``Hint(bits=b)`` (``per_channel`` with a step per channel), so the target's
weight scales are the learned steps; each activation quantizer becomes a
``hardtanh`` to its learned range ``[Qn·s, Qp·s]`` whose output is annotated
with that range (``Hint(range=...)``), which the graph-side ``ptq`` uses
instead of an observed one.  With 8-bit activations that range is 256 codes
of the int8 tensor: its scale is ``s``.  A 4-bit activation grid does not
travel as such: the runtime requantizes into an int8 tensor, which cannot be
told to round onto every 17th code, so the shipped tensor keeps the learned
clipping range on the int8 grid of step ``(Qp − Qn)·s / 255`` (``s/17``; the
16 learned levels are among its codes).

>>> import torch
>>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 8), torch.nn.Linear(8, 2))
>>> q = LSQ(bits=4, progress=False).apply(net, [(torch.rand(16, 4), torch.randint(0, 2, (16,)))])
>>> codes = net[2].weight.detach() / net[2].parametrizations.weight[0].step
>>> bool((codes == codes.round()).all()), int(codes.abs().max()) <= 7
(True, True)
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from sdk import hookimpl, masks
from sdk.config import check_choice, check_range
from sdk.encoding import Hint, annotate
from sdk.errors import ConfigError
from sdk.layer_quant import LayerQuantConfig, LayerQuantizer, WeightQuant, ste


def lsq_quantize(x: torch.Tensor, step: torch.Tensor, qn: int, qp: int, grad_scale: float) -> torch.Tensor:
    """``clamp(round(x/s), Qn, Qp) · s``: straight-through ``round``, LSQ's step gradient
    scaled by ``grad_scale``.  The value is exactly ``code · s`` (the scaling of the
    gradient is written with :func:`sdk.layer_quant.ste`, whose forward value is ``s`` bit for bit).

    >>> s = torch.tensor(0.5, requires_grad=True)
    >>> y = lsq_quantize(torch.tensor([0.3, 0.9, 5.0]), s, -3, 3, 1.0)
    >>> y.sum().backward(); y.tolist(), round(s.grad.item(), 4)
    ([0.5, 1.0, 1.5], 3.6)
    """
    s = ste(step, step * grad_scale)
    v = torch.clamp(x / s, qn, qp)
    return ste(torch.round(v), v) * s


def init_step(x: torch.Tensor, qp: int, dims: tuple[int, ...] | None = None) -> torch.Tensor:
    """LSQ's initial step ``2 · mean|x| / sqrt(Qp)`` (over ``dims``, keeping them; all of ``x`` when None)."""
    mean = x.detach().abs().mean() if dims is None else x.detach().abs().mean(dim=dims, keepdim=True)
    return torch.clamp(2 * mean / math.sqrt(qp), min=torch.finfo(torch.float32).tiny)


def weight_grid(bits: int) -> tuple[int, int]:
    """The symmetric narrow weight grid ``(−(2^(b−1) − 1), 2^(b−1) − 1)``."""
    qp = 2 ** (bits - 1) - 1
    return -qp, qp


def activation_grid(bits: int, signed: bool) -> tuple[int, int]:
    """``[−2^(b−1), 2^(b−1) − 1]`` (signed) or ``[0, 2^b − 1]``."""
    return (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2 ** bits - 1)


class LsqWeight(WeightQuant):
    """Parametrization ``w ↦ clamp(round(w/s), Qn, Qp) · s`` with a learned ``step``
    (shape ``[]``, or ``[out, 1, ...]`` per channel)."""

    method = "lsq"

    def __init__(self, weight: torch.Tensor, bits: int, per_channel: bool):
        super().__init__()
        self.bits, self.per_channel = bits, per_channel
        self.qn, self.qp = weight_grid(bits)
        dims = tuple(range(1, weight.ndim)) if per_channel else None
        self.step = nn.Parameter(init_step(weight, self.qp, dims))
        per_step = weight[0].numel() if per_channel else weight.numel()
        self.grad_scale = 1.0 / math.sqrt(per_step * self.qp)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return lsq_quantize(w, self.step, self.qn, self.qp, self.grad_scale)

    def hint(self) -> Hint:
        return Hint(bits=self.bits, per_channel=self.per_channel, source=self.method)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, per_channel={self.per_channel}"


class LsqActivation(nn.Module):
    """A layer's ``input_quant``: LSQ (a learned ``step``) or PACT (a learned clip ``alpha``,
    step ``alpha / Qp``) on ``bits``; initialized on the first batch it sees."""

    def __init__(self, layer: str, bits: int, mode: str = "lsq"):
        super().__init__()
        self.layer, self.bits, self.mode = layer, bits, mode
        self.param = nn.Parameter(torch.ones(()))      # the step (lsq) or the clip α (pact)
        self.register_buffer("signed", torch.tensor(False))
        self.register_buffer("initialized", torch.tensor(False))

    @property
    def grid(self) -> tuple[int, int]:
        return activation_grid(self.bits, bool(self.signed))

    def step(self) -> torch.Tensor:
        """The learned step (PACT: ``α / Qp``)."""
        return self.param / self.grid[1] if self.mode == "pact" else self.param

    def learned_range(self) -> tuple[float, float]:
        """``(Qn · s, Qp · s)``, the range the quantizer clips to (computed in float64 from the float32 step)."""
        if not bool(self.initialized):
            raise ConfigError(f"lsq: the activation step of layer {self.layer} was never trained "
                              "(no batch went through it)")
        qn, qp = self.grid
        s = float(self.step().detach())
        return qn * s, qp * s

    def _init(self, x: torch.Tensor) -> None:
        signed = bool(x.min() < 0)
        if signed and self.mode == "pact":
            raise ConfigError(f"lsq: mode='pact' clips to [0, α] but the input of layer {self.layer} has negative "
                              f"values (min {float(x.min()):.3g}); use mode='lsq' or exclude={[self.layer]!r}")
        self.signed.fill_(signed)
        qp = activation_grid(self.bits, signed)[1]
        start = x.detach().max() if self.mode == "pact" else init_step(x, qp)
        self.param.data.copy_(torch.clamp(start, min=torch.finfo(torch.float32).tiny))
        self.initialized.fill_(True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not bool(self.initialized):
            with torch.no_grad():
                self._init(x)
        qn, qp = self.grid
        if self.mode == "pact":
            y = torch.minimum(F.relu(x), self.param)
            s = self.step().detach()
            return ste(torch.round(y / s) * s, y)
        features = x[0].numel() if x.ndim > 1 else x.numel()
        return lsq_quantize(x, self.param, qn, qp, 1.0 / math.sqrt(features * qp))

    def extra_repr(self) -> str:
        return f"bits={self.bits}, mode={self.mode!r}"


class LearnedClip(nn.Module):
    """What :func:`bake` leaves of an activation quantizer: ``hardtanh`` to the learned range
    (the target's int8 requantization does the rounding)."""

    def __init__(self, lo: float, hi: float):
        super().__init__()
        self.lo, self.hi = lo, hi

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.hardtanh(x, self.lo, self.hi)

    def extra_repr(self) -> str:
        return f"lo={self.lo}, hi={self.hi}"


def _quantize_input(layer: nn.Module, args: tuple) -> tuple:
    # a module-level function, so deep copies and pickles of the model keep the hook
    return (layer.input_quant(args[0]), *args[1:])


def bake(model: nn.Module) -> nn.Module:
    """Make an LSQ-trained ``model`` deployable, in place: the weights become their quantized
    values (``codes · s``, :func:`sdk.masks.bake`; their ``Hint(bits=...)`` stays) and each
    activation quantizer a :class:`LearnedClip` to its learned range, annotated with that
    range as its output's ``Hint(range=...)``.  Returns ``model``."""
    for module in list(model.modules()):
        act = getattr(module, "input_quant", None)
        if isinstance(act, LsqActivation):
            lo, hi = act.learned_range()
            module.input_quant = LearnedClip(lo, hi)
            annotate(module.input_quant, Hint(range=(lo, hi), source="lsq"), "output")
    masks.bake(model)
    return model


def learned_steps(model: nn.Module) -> dict[str, dict[str, Any]]:
    """``{layer: {"weight": step(s) as a list, "activation": step or None}}`` of an LSQ model
    before :func:`bake` (what the artifact's scales are to equal)."""
    found: dict[str, dict[str, Any]] = {}
    for name, module in model.named_modules():
        wq = next((p for p in getattr(getattr(module, "parametrizations", None), "weight", ())
                   if isinstance(p, LsqWeight)), None)
        act = getattr(module, "input_quant", None)
        if wq is None and not isinstance(act, LsqActivation):
            continue
        found[name] = {"weight": wq.step.detach().flatten().tolist() if wq is not None else None,
                       "activation": float(act.step().detach()) if isinstance(act, LsqActivation) else None}
    return found


class LSQ(LayerQuantizer):
    """Learned step size quantization of weights and activations (PACT clipping optional)."""

    name = "lsq"
    version = "1.0"
    needs_training = True      # the activation steps start from the first batch

    @dataclasses.dataclass(frozen=True)
    class Config(LayerQuantConfig):
        bits: int = 4                          # weights: 4 or 8
        activation_bits: int = 8               # 4 or 8
        granularity: str = "per-tensor"        # weight steps: per-tensor or per-channel
        mode: str = "lsq"                      # activations: lsq (learned step) or pact (learned clip α)
        pact_decay: float = 1e-4               # pact: L2 coefficient on α

        def __post_init__(self):
            super().__post_init__()
            check_choice("lsq", "bits", self.bits, (4, 8))
            check_choice("lsq", "activation_bits", self.activation_bits, (4, 8))
            check_choice("lsq", "granularity", self.granularity, ("per-tensor", "per-channel"))
            check_choice("lsq", "mode", self.mode, ("lsq", "pact"))
            check_range("lsq", "pact_decay", self.pact_decay, 0.0)

    def quantize_layer(self, name: str, layer: nn.Module) -> LsqWeight:
        cfg = self.config
        if hasattr(layer, "input_quant"):
            raise ConfigError(f"lsq: layer {name} already quantizes its input; apply one activation "
                              "quantizer per recipe")
        layer.input_quant = LsqActivation(name, cfg.activation_bits, cfg.mode)
        layer.register_forward_pre_hook(_quantize_input)
        return LsqWeight(layer.weight.detach(), cfg.bits, cfg.granularity == "per-channel")

    def run(self, model: nn.Module, ctx) -> nn.Module:
        """Train (:meth:`apply`), then :func:`bake` for deployment."""
        return bake(self.apply(model, ctx.data.get("train")))

    def _loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        loss = super()._loss(model, batch)
        if self.config.mode == "pact" and self.config.pact_decay:
            alphas = [m.param for m in model.modules() if isinstance(m, LsqActivation)]
            loss = loss + self.config.pact_decay * sum(a * a for a in alphas)
        return loss


@hookimpl
def register_quantizers(register):
    register(LSQ)
