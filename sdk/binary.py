"""Binary layers and training shared by the binary quantizers ``bnn``, ``bwn`` and ``xnor``
(layer choice, replacement and training: :mod:`sdk.layer_quant`).

A binary layer replaces a ``Conv2d`` or ``Linear`` and computes ::

    y = (A(x) ⊛ sign(W)) · α · K + b

======  =======  ==================  ===============================  ==========================================
method  A(x)     α (per filter)      K (per output position)          paper
======  =======  ==================  ===============================  ==========================================
bnn     sign(x)  1                   1                                Hubara et al. 2016, "Binarized Neural
                                                                      Networks" (BinaryNet)
bwn     x        mean |W|            1                                Rastegari et al. 2016, "XNOR-Net", §3.1
xnor    sign(x)  mean |W|            mean |x| over the window         Rastegari et al. 2016, "XNOR-Net", §3.2
======  =======  ==================  ===============================  ==========================================

Variants of A(x), chosen by :class:`BinaryInfo`: ``sign="approx"`` keeps the forward
sign with Bi-Real Net's ApproxSign gradient (:func:`approx_sign`);
``learned_threshold`` is ReActNet's RSign, ``sign(x − t)`` with ``t`` learned per
input channel; ``order = k > 1`` replaces sign(x) by HORQ's order-k residual
binarization ``Σ_j β_j H_j`` (:func:`residual_sign`).  Variants of the weights and their
scale, by layer class: :class:`ReCULayer` (``recu``) binarizes ReCU's clamped, standardised
W with ``α = mean |v|``; :class:`LearnedScaleLayer` (``xnorpp``) multiplies the product by
XNOR-Net++'s learned ``Γ = α ⊗ β ⊗ γ`` (or α alone).

``sign`` maps x >= 0 to +1 and x < 0 to −1: a binary format has no 0 (``torch.sign``
would give one), and this is the bit convention of the popcount kernels
(``targets/binary_popcount/packing.py``).  Its gradient is BinaryNet's
straight-through estimator with the hardtanh clip, ``grad · 1_{|x| <= 1}``,
for weights and activations alike.  α is a function of W and is
differentiated; K (XNOR-Net's ``K = A ∗ k``: the mean of |x| over the channels
and the kernel window of each output, zero padding counted as 0; over all
features for a linear layer) is treated as a constant scale in the backward
pass.  α multiplies the ±1 product after the convolution, so the binary part
of the forward pass is an exact integer, as in the popcount kernel.

Layers with binary activations normalise their input with a BatchNorm first
(``input_bn``): the block order of XNOR-Net (BN → BinActiv → BinConv) and of
BinaryNet (BN → sign).  Without it a binary layer after a ReLU would see only +1.

Two custom ops keep the binary structure visible after ``torch.export``, where
the ``binary-popcount`` target finds it: ``edgepack::binarize`` (the sign) and
``edgepack::mean_abs_window`` (K).  The weights' sign is a constant and folds
into the graph as an exactly ±1 tensor.  Each binary layer carries the hint
``Hint(codebook=2, per_channel=<α is used>)`` (:mod:`sdk.encoding`).

>>> import torch
>>> net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 16), torch.nn.Linear(16, 2))
>>> binarize_model(net, BinaryInfo("xnor", scale_weights=True, binary_activations=True, scale_activations=True))
['1']
>>> bool((net[1].effective_weight().abs() == net[1].alpha()[:, None]).all())
True
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, ClassVar, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .encoding import Hint
from .errors import ConfigError, InputError
from .layer_quant import LayerQuantConfig, LayerQuantizer, QuantizedModule, quantize_layers, ste

# -- custom ops ------------------------------------------------------------------------


@torch.library.custom_op("edgepack::binarize", mutates_args=())
def binarize(x: torch.Tensor) -> torch.Tensor:
    """+1 where ``x >= 0``, −1 elsewhere; gradient ``grad · 1_{|x| <= 1}`` (STE with hardtanh clip).

    >>> binarize(torch.tensor([-0.5, 0.0, 2.0])).tolist()
    [-1.0, 1.0, 1.0]
    """
    return torch.where(x < 0, -1.0, 1.0).to(x.dtype)


@binarize.register_fake
def _binarize_fake(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


def _binarize_setup(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
    ctx.save_for_backward(inputs[0])


def _binarize_backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
    (x,) = ctx.saved_tensors
    return grad * (x.abs() <= 1).to(grad.dtype)


binarize.register_autograd(_binarize_backward, setup_context=_binarize_setup)


@torch.library.custom_op("edgepack::approx_sign", mutates_args=())
def approx_sign(x: torch.Tensor) -> torch.Tensor:
    """:func:`binarize`'s forward with Bi-Real Net's ApproxSign gradient (Liu et al. 2018,
    eq. 4): the derivative of the piecewise quadratic that approximates sign,
    ``2 + 2x`` on ``[-1, 0)``, ``2 - 2x`` on ``[0, 1)``, 0 elsewhere.  Deploys exactly
    like ``edgepack::binarize``.

    >>> x = torch.tensor([-2.0, -0.5, 0.0, 0.5], requires_grad=True)
    >>> approx_sign(x).sum().backward(); x.grad.tolist()
    [0.0, 1.0, 2.0, 1.0]
    """
    return torch.where(x < 0, -1.0, 1.0).to(x.dtype)


approx_sign.register_fake(_binarize_fake)


def _approx_sign_backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
    (x,) = ctx.saved_tensors
    slope = torch.where(x < 0, 2 + 2 * x, 2 - 2 * x)
    return grad * torch.where(x.abs() < 1, slope, torch.zeros_like(x)).to(grad.dtype)


approx_sign.register_autograd(_approx_sign_backward, setup_context=_binarize_setup)


@torch.library.custom_op("edgepack::quantize_uniform", mutates_args=())
def quantize_uniform(x: torch.Tensor, bits: int, inv_step: float) -> torch.Tensor:
    """Unsigned ``bits``-bit activations: ``q / inv_step`` with
    ``q = round(clamp(x · inv_step, 0, 2^bits − 1))`` (round half to even), the
    codes ``binary-popcount`` packs as bit planes (DoReFa's ``quantize_k(clip(x, 0, 1))``
    is ``inv_step = 2^k − 1``).  Gradient: straight through strictly inside the range
    (as hardtanh's), 0 where the clamp saturates.

    >>> quantize_uniform(torch.tensor([-1.0, 0.2, 0.5, 2.0]), 2, 3.0).mul(3).tolist()
    [0.0, 1.0, 2.0, 3.0]
    """
    if not 1 <= bits <= 8 or not inv_step > 0:
        raise ConfigError(f"quantize_uniform needs 1 <= bits <= 8 and inv_step > 0, got {bits}, {inv_step}")
    q = torch.round(torch.clamp(x * inv_step, 0, 2 ** bits - 1))
    return q / inv_step


@quantize_uniform.register_fake
def _quantize_uniform_fake(x: torch.Tensor, bits: int, inv_step: float) -> torch.Tensor:
    return torch.empty_like(x)


def _quantize_uniform_setup(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
    x, bits, inv_step = inputs
    ctx.save_for_backward(x)
    ctx.top = (2 ** bits - 1) / inv_step


def _quantize_uniform_backward(ctx: Any, grad: torch.Tensor) -> tuple:
    (x,) = ctx.saved_tensors
    return grad * ((x > 0) & (x < ctx.top)).to(grad.dtype), None, None


quantize_uniform.register_autograd(_quantize_uniform_backward, setup_context=_quantize_uniform_setup)


def _residual_planes(x: torch.Tensor, order: int) -> tuple[torch.Tensor, torch.Tensor]:
    """HORQ's residual binarization of each sample: ``(H, β)`` with ``H[j]`` the ±1 planes
    ``(order, *x.shape)`` and ``β[j]`` ``(order, N)``."""
    r, planes, betas = x, [], []
    dims = tuple(range(1, x.ndim))
    for _ in range(order):
        beta = r.abs().mean(dims)
        h = torch.where(r < 0, -1.0, 1.0).to(x.dtype)
        planes.append(h)
        betas.append(beta)
        r = r - beta.view(-1, *(1,) * (x.ndim - 1)) * h
    return torch.stack(planes), torch.stack(betas)


@torch.library.custom_op("edgepack::residual_sign", mutates_args=())
def residual_sign(x: torch.Tensor, order: int) -> torch.Tensor:
    """Order-``order`` residual binarization (HORQ, Li et al. 2017): ``Σ_j β_j H_j``
    with ``H_1 = sign(x)``, ``β_1 = mean |x|`` over each sample, ``R_1 = x − β_1 H_1``,
    then the same on ``R_1`` and so on; sign as in :func:`binarize` (0 is +1).
    Gradient: BinaryNet's straight-through estimator, ``grad · 1_{|x| <= 1}``.
    ``binary-popcount`` packs the ``order`` planes and multiplies by the βs after the
    popcounts.

    >>> residual_sign(torch.tensor([[1.0, -3.0]]), 2).tolist()
    [[1.0, -3.0]]
    """
    if not 1 <= order <= 8:
        raise ConfigError(f"residual_sign needs 1 <= order <= 8, got {order}")
    h, beta = _residual_planes(x, order)
    return (h * beta.view(order, -1, *(1,) * (x.ndim - 1))).sum(0)


@residual_sign.register_fake
def _residual_sign_fake(x: torch.Tensor, order: int) -> torch.Tensor:
    return torch.empty_like(x)


def _residual_sign_setup(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
    ctx.save_for_backward(inputs[0])


def _residual_sign_backward(ctx: Any, grad: torch.Tensor) -> tuple:
    (x,) = ctx.saved_tensors
    return grad * (x.abs() <= 1).to(grad.dtype), None


residual_sign.register_autograd(_residual_sign_backward, setup_context=_residual_sign_setup)


def _window_mean_abs(x: torch.Tensor, kernel: Sequence[int], stride: Sequence[int], padding: Sequence[int],
                     dilation: Sequence[int]) -> torch.Tensor:
    a = x.abs().mean(1, keepdim=True)
    if x.ndim == 2:
        return a
    box = torch.full((1, 1, *kernel), 1.0 / (kernel[0] * kernel[1]), dtype=x.dtype, device=x.device)
    return F.conv2d(a, box, None, list(stride), list(padding), list(dilation))


@torch.library.custom_op("edgepack::mean_abs_window", mutates_args=())
def mean_abs_window(x: torch.Tensor, kernel: Sequence[int], stride: Sequence[int], padding: Sequence[int],
                    dilation: Sequence[int]) -> torch.Tensor:
    """XNOR-Net's K: mean of ``|x|`` over the channels and the ``kernel`` window of each
    output position of a convolution with this geometry (zero padding counts as 0);
    ``(N, 1, OH, OW)``.  For a 2-D ``x`` (a linear layer; empty geometry) the mean over
    all features, ``(N, 1)``.  No gradient: callers pass a detached ``x``.

    >>> mean_abs_window(torch.tensor([[1.0, -3.0]]), [], [], [], []).tolist()
    [[2.0]]
    """
    return _window_mean_abs(x, kernel, stride, padding, dilation)


mean_abs_window.register_fake(_window_mean_abs)

#: how the captured graph names the ops (``sdk.graph.Node.source``)
BINARIZE_OP = str(torch.ops.edgepack.binarize.default)
APPROX_SIGN_OP = str(torch.ops.edgepack.approx_sign.default)
QUANTIZE_UNIFORM_OP = str(torch.ops.edgepack.quantize_uniform.default)
RESIDUAL_SIGN_OP = str(torch.ops.edgepack.residual_sign.default)
MEAN_ABS_WINDOW_OP = str(torch.ops.edgepack.mean_abs_window.default)


# -- layers ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class BinaryInfo:
    """What a binary layer binarizes and scales (see the module docstring's table)."""

    method: str                 # the quantizer that made the layer
    scale_weights: bool         # α = mean |W| per output filter
    binary_activations: bool    # sign(x) on the input
    scale_activations: bool     # K, the window mean of |x|
    input_bn: bool = True       # BatchNorm on the input before the sign
    sign: str = "ste"           # the activations' sign: "ste" (binarize) or "approx" (Bi-Real's approx_sign)
    order: int = 1              # > 1: HORQ's residual binarization of the activations (residual_sign)
    learned_threshold: bool = False     # ReActNet's RSign: sign(x − t) with t learned per input channel

    def __post_init__(self):
        if self.sign not in ("ste", "approx"):
            raise ConfigError(f"BinaryInfo.sign must be 'ste' or 'approx', got {self.sign!r}")
        if not 1 <= self.order <= 8:
            raise ConfigError(f"BinaryInfo.order must be 1..8, got {self.order}")
        if (self.order > 1 or self.learned_threshold or self.sign != "ste") and not self.binary_activations:
            raise ConfigError("sign, order and learned_threshold describe binary activations; "
                              "set binary_activations=True")


class _BinaryLayer(QuantizedModule):
    binary_info: BinaryInfo
    describes = "binary layers"

    @property
    def method(self) -> str:
        return self.binary_info.method

    def hint(self) -> Hint:
        """Two shared values: ±1, or ±α with α per output filter (``per_channel``)."""
        info = self.binary_info
        return Hint(codebook=2, per_channel=info.scale_weights, source=info.method)

    def _init_from(self, layer: nn.Module, info: BinaryInfo, channels: int, bn: type[nn.Module]) -> None:
        self.binary_info = info
        self.weight = nn.Parameter(layer.weight.detach().clone())
        self.bias = nn.Parameter(layer.bias.detach().clone()) if layer.bias is not None else None
        self.input_bn = bn(channels) if info.binary_activations and info.input_bn else None
        self.threshold = nn.Parameter(torch.zeros(channels)) if info.learned_threshold else None

    def alpha(self) -> torch.Tensor:
        """α = mean |W| of each output filter (XNOR-Net eq. 4)."""
        return self.weight.abs().mean(dim=tuple(range(1, self.weight.ndim)))

    def weight_signs(self) -> torch.Tensor:
        """The ±1 weights of the product: ``binarize(W)`` (ReCU's layers binarize a clamped W)."""
        return binarize(self.weight)

    def effective_weight(self) -> torch.Tensor:
        """The weight the forward pass applies: ±α (bwn, xnor) or ±1 (bnn)."""
        w = self.weight_signs()
        return w * self.alpha().view(-1, *(1,) * (w.ndim - 1)) if self.binary_info.scale_weights else w

    def output_scales(self, y: torch.Tensor) -> list[torch.Tensor]:
        """The factors the ±1 product ``y`` is multiplied by, in order: ``[α]`` per output channel
        when ``scale_weights`` (XNOR-Net++'s factorised layers add one per row and per column)."""
        return [self.alpha().view((1, -1) + (1,) * (y.ndim - 2))] if self.binary_info.scale_weights else []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        info = self.binary_info
        if self.input_bn is not None:
            x = self.input_bn(x)
        y = self._product(self.binarize_input(x) if info.binary_activations else x, self.weight_signs())
        per_channel = (1, -1) + (1,) * (y.ndim - 2)
        for scale in self.output_scales(y):      # one product each: the lowering folds them in this order
            y = y * scale
        if info.scale_activations:
            y = y * mean_abs_window(x.detach(), *self._window())
        if self.bias is not None:
            y = y + self.bias.view(per_channel)
        return y

    def binarize_input(self, x: torch.Tensor) -> torch.Tensor:
        """The binary activations: sign(x) (or sign(x − t), RSign), or HORQ's residual planes' sum."""
        info = self.binary_info
        if self.threshold is not None:
            x = x - self.threshold.view((1, -1) + (1,) * (x.ndim - 2))
        if info.order > 1:
            return residual_sign(x, info.order)
        return approx_sign(x) if info.sign == "approx" else binarize(x)

    def _product(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _window(self) -> tuple[list[int], list[int], list[int], list[int]]:
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"{self.binary_info.method}, weight={tuple(self.weight.shape)}, bias={self.bias is not None}"


class BinaryConv2d(_BinaryLayer):
    """A ``Conv2d`` with binary weights (and activations), made from a float one."""

    def __init__(self, conv: nn.Conv2d, info: BinaryInfo):
        super().__init__()
        if isinstance(conv.padding, str) or conv.padding_mode != "zeros":
            raise ConfigError(f"binary conv needs explicit zero padding, got padding={conv.padding!r}, "
                              f"padding_mode={conv.padding_mode!r}")
        if info.scale_activations and conv.groups != 1:
            raise ConfigError(f"{info.method}: K is defined for convolutions over all channels; "
                              f"a conv with groups={conv.groups} cannot take it")
        self._init_from(conv, info, conv.in_channels, nn.BatchNorm2d)
        self.stride, self.padding, self.dilation, self.groups = conv.stride, conv.padding, conv.dilation, conv.groups

    def _product(self, x, w):
        return F.conv2d(x, w, None, self.stride, self.padding, self.dilation, self.groups)

    def _window(self):
        return list(self.weight.shape[2:]), list(self.stride), list(self.padding), list(self.dilation)


class BinaryLinear(_BinaryLayer):
    """A ``Linear`` with binary weights (and activations), made from a float one."""

    def __init__(self, linear: nn.Linear, info: BinaryInfo):
        super().__init__()
        self._init_from(linear, info, linear.in_features, nn.BatchNorm1d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 2:
            raise InputError(f"binary linear layers take (N, features) inputs, got shape {tuple(x.shape)}")
        return super().forward(x)

    def _product(self, x, w):
        return F.linear(x, w)

    def _window(self):
        return [], [], [], []


#: the float layer types that have a binary twin
BINARY_LAYER_TYPES: tuple[type[nn.Module], ...] = (nn.Conv2d, nn.Linear)


def binary_layers(model: nn.Module) -> dict[str, BinaryInfo]:
    """``{module name: BinaryInfo}`` of the binary layers in ``model``."""
    return {n: m.binary_info for n, m in model.named_modules() if isinstance(m, _BinaryLayer)}


def binary_layer(name: str, layer: nn.Module, info: BinaryInfo) -> _BinaryLayer:
    """The binary twin of the float ``Conv2d``/``Linear`` ``layer`` (module ``name``)."""
    try:
        return BinaryConv2d(layer, info) if isinstance(layer, nn.Conv2d) else BinaryLinear(layer, info)
    except ConfigError as exc:
        raise ConfigError(f"layer {name}: {exc}; add it to exclude to keep it float") from None


def binarize_model(model: nn.Module, info: BinaryInfo, *, keep_first_last: bool = True,
                   exclude: Sequence[str] = ()) -> list[str]:
    """Replace the ``Conv2d``/``Linear`` layers of ``model`` (in place) by binary ones
    (:func:`sdk.layer_quant.quantize_layers`, which annotates each with its hint).

    The first and the last of them (in module order) stay full precision when
    ``keep_first_last``, as in BinaryNet and XNOR-Net: the input has few channels
    and the classifier's outputs are the logits.  Returns the names replaced.
    Raises :class:`ConfigError` for an unknown name in ``exclude``, a model that is
    binarized (or weight-quantized) already, or when no layer is left to binarize.
    """
    done = quantize_layers(model, info.method, lambda name, layer: binary_layer(name, layer, info),
                           keep_first_last=keep_first_last, exclude=exclude, types=BINARY_LAYER_TYPES)
    return list(done)


# -- real-valued shortcuts around binary layers (Bi-Real Net, ReActNet) ----------------------


def _shortcut(layer: nn.Module, downsample: bool) -> tuple[str, nn.Module | None]:
    """The real-valued path around the binary twin of the float ``layer``: the identity when the
    layer keeps the shape (a "same" conv with stride 1 and as many outputs as inputs, a square
    linear), Bi-Real's ``AvgPool(stride) → float 1x1 conv → BN`` for a "same" conv that changes
    the stride or the channels (``downsample``), none otherwise."""
    if isinstance(layer, nn.Linear):
        return ("identity", nn.Identity()) if layer.in_features == layer.out_features else ("none", None)
    k, s, p, d = layer.kernel_size, layer.stride, layer.padding, layer.dilation
    # "same" padding: the output is ceil(input / stride), what a stride-s average pool gives on multiples of s
    if not all(2 * p[i] == d[i] * (k[i] - 1) for i in range(2)):
        return "none", None
    if s == (1, 1) and layer.in_channels == layer.out_channels:
        return "identity", nn.Identity()
    if not downsample:
        return "none", None
    pool = [nn.AvgPool2d(s, s)] if s != (1, 1) else []
    return "downsample", nn.Sequential(*pool, nn.Conv2d(layer.in_channels, layer.out_channels, 1, bias=False),
                                       nn.BatchNorm2d(layer.out_channels))


class ShortcutLayer:
    """Mixin of a binary layer in a Bi-Real block: ``after(BN_out(binary(x)) + shortcut(x))``."""

    def __init__(self, layer: nn.Module, info: BinaryInfo, *, shortcut: bool, downsample: bool, output_bn: bool,
                 after: Callable[[int], nn.Module] | None):
        super().__init__(layer, info)
        out = self.weight.shape[0]
        self.output_bn = (nn.BatchNorm2d if self.weight.ndim == 4 else nn.BatchNorm1d)(out) if output_bn else None
        self.shortcut_kind, self.shortcut = _shortcut(layer, downsample) if shortcut else ("none", None)
        self.after = after(out) if after is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)
        if self.output_bn is not None:
            y = self.output_bn(y)
        if self.shortcut is not None:
            r = self.shortcut(x)
            if r.shape != y.shape:
                raise InputError(f"{self.binary_info.method}: the {self.shortcut_kind} shortcut gives shape "
                                 f"{tuple(r.shape)}, the binary layer {tuple(y.shape)}: the feature map's height and "
                                 "width must be multiples of the stride (or pass downsample=False, or exclude "
                                 "the layer)")
            y = y + r
        return y if self.after is None else self.after(y)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, shortcut={self.shortcut_kind}"


class ShortcutConv2d(ShortcutLayer, BinaryConv2d):
    """A binary ``Conv2d`` in a Bi-Real block (:func:`shortcut_layer`)."""


class ShortcutLinear(ShortcutLayer, BinaryLinear):
    """A binary ``Linear`` in a Bi-Real block (:func:`shortcut_layer`)."""


def shortcut_layer(name: str, layer: nn.Module, info: BinaryInfo, *, shortcut: bool = True, downsample: bool = True,
                   output_bn: bool = True, after: Callable[[int], nn.Module] | None = None) -> ShortcutLayer:
    """The binary twin of the float ``Conv2d``/``Linear`` ``layer`` (module ``name``) in a block
    ``after(BN_out(binary(x)) + shortcut(x))``; ``after(channels)`` makes a module run on the sum
    (ReActNet's RPReLU), ``None`` for none.

    >>> block = shortcut_layer("c", nn.Conv2d(8, 8, 3, padding=1), BinaryInfo("bireal", True, True, False))
    >>> block.shortcut_kind, tuple(block(torch.randn(2, 8, 5, 5)).shape)
    ('identity', (2, 8, 5, 5))
    """
    cls = ShortcutConv2d if isinstance(layer, nn.Conv2d) else ShortcutLinear
    try:
        return cls(layer, info, shortcut=shortcut, downsample=downsample, output_bn=output_bn, after=after)
    except ConfigError as exc:
        raise ConfigError(f"layer {name}: {exc}; add it to exclude to keep it float") from None


def shortcuts(model: nn.Module) -> dict[str, str]:
    """``{module name: shortcut kind}`` of the blocks in ``model``: ``identity``, ``downsample`` or ``none``."""
    return {n: m.shortcut_kind for n, m in model.named_modules() if isinstance(m, ShortcutLayer)}


# -- the quantizers' common part ---------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class BinaryConfig(LayerQuantConfig):
    """Fields every binary quantizer takes (:class:`sdk.layer_quant.LayerQuantConfig`'s)."""

    epochs: int = 10


class BinaryQuantizer(LayerQuantizer):
    """Training-time quantizer: replace the layers by binary ones (:func:`binary_layer`),
    then train the whole network with cross-entropy on ``(x, y)`` batches (data is required:
    a binarized network is useless untrained)."""

    Config: ClassVar[type[BinaryConfig]] = BinaryConfig
    layer_types = BINARY_LAYER_TYPES
    needs_training = True
    streams = ("train",)

    def layer_info(self) -> BinaryInfo:
        """The :class:`BinaryInfo` of the layers this method makes."""
        raise NotImplementedError

    def quantize_layer(self, name: str, layer: nn.Module) -> _BinaryLayer:
        return binary_layer(name, layer, self.layer_info())


# -- ReCU's clamped weights and XNOR-Net++'s learned scales (recu, xnorpp) ---------------------


def standardize_filters(w: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """``(w − mean) / (std + eps)`` of each output filter (dimension 0, population std): ReCU's
    balanced, standardised weights (Xu et al. 2021, §3.3).

    >>> standardize_filters(torch.tensor([[1.0, 3.0], [0.0, -4.0]])).tolist()
    [[-1.0, 1.0], [1.0, -1.0]]
    """
    dims = tuple(range(1, w.ndim))
    centred = w - w.mean(dims, keepdim=True)
    return centred / (centred.pow(2).mean(dims, keepdim=True).sqrt() + eps)


def rectified_clamp(w: torch.Tensor, tau: float) -> torch.Tensor:
    """ReCU, the rectified clamp unit (Xu et al. 2021, eq. 6): ``max(min(w, Q(τ)), Q(1 − τ))``,
    ``Q`` the quantile of all the values of ``w`` (linear interpolation, ``numpy.quantile``'s
    default), taken as constants.  ``0.5 <= tau <= 1``; the gradient is torch.clamp's (0 outside
    the bounds): :class:`ReCULayer` passes its own.

    >>> rectified_clamp(torch.arange(11.0), 0.9).tolist()
    [1.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 9.0]
    """
    if not 0.5 <= tau <= 1:
        raise ConfigError(f"rectified_clamp needs 0.5 <= tau <= 1, got {tau}")
    flat = w.detach().reshape(-1)
    return torch.clamp(w, torch.quantile(flat, 1 - tau), torch.quantile(flat, tau))


class ReCULayer:
    """Mixin of a binary layer with ReCU's weights (Xu et al. 2021): the product uses ``sign(v)``
    and ``α = mean |v|`` per output filter, ``v = ReCU_τ(standardize_filters(W))``
    (:func:`rectified_clamp`).  The sign's gradient passes the sign and the clamp straight
    through to the standardised weights (the clamped tails keep being updated) and then
    the standardisation as autograd has it (α's is torch.clamp's: 0 for the clamped
    weights).  :meth:`revive` applies the clamp to the latent
    weights themselves; ``tau`` is set by the quantizer's schedule."""

    tau: float = 0.99

    def weight_signs(self) -> torch.Tensor:
        z = standardize_filters(self.weight)
        return ste(binarize(rectified_clamp(z.detach(), self.tau)), z)

    def alpha(self) -> torch.Tensor:
        """α = mean |v| of each output filter, v the clamped standardised weights."""
        v = rectified_clamp(standardize_filters(self.weight), self.tau)
        return v.abs().mean(dim=tuple(range(1, v.ndim)))

    @torch.no_grad()
    def revive(self, eps: float = 1e-8) -> None:
        """``W ← μ + σ · ReCU_τ((W − μ) / σ)`` per filter (μ, σ + eps as :func:`standardize_filters`'):
        latent weights beyond the quantiles move back to them, within reach of a sign flip."""
        w, dims = self.weight, tuple(range(1, self.weight.ndim))
        mean = w.mean(dims, keepdim=True)
        std = (w - mean).pow(2).mean(dims, keepdim=True).sqrt() + eps
        w.copy_(mean + std * rectified_clamp((w - mean) / std, self.tau))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, tau={self.tau:g}"


class ReCUConv2d(ReCULayer, BinaryConv2d):
    """A binary ``Conv2d`` with ReCU's weights (:func:`recu_layer`)."""


class ReCULinear(ReCULayer, BinaryLinear):
    """A binary ``Linear`` with ReCU's weights (:func:`recu_layer`)."""


def recu_layer(name: str, layer: nn.Module, info: BinaryInfo, tau: float) -> ReCULayer:
    """The binary twin of the float ``Conv2d``/``Linear`` ``layer`` (module ``name``) with ReCU's
    weights at ``tau``.

    >>> conv = recu_layer("c", nn.Conv2d(4, 8, 3), BinaryInfo("recu", True, True, False), tau=0.9)
    >>> conv.alpha().shape, sorted(torch.unique(conv.weight_signs()).tolist())
    (torch.Size([8]), [-1.0, 1.0])
    """
    if not 0.5 <= tau <= 1:
        raise ConfigError(f"layer {name}: ReCU needs 0.5 <= tau <= 1, got {tau}")
    cls = ReCUConv2d if isinstance(layer, nn.Conv2d) else ReCULinear
    try:
        made = cls(layer, info)
    except ConfigError as exc:
        raise ConfigError(f"layer {name}: {exc}; add it to exclude to keep it float") from None
    made.tau = float(tau)
    return made


class LearnedScaleLayer:
    """Mixin of a binary layer scaled by XNOR-Net++'s learned Γ (Bulat & Tzimiropoulos 2019) in
    place of a computed α: ``α ∈ R^{C_out}`` (initialised to mean |W| per filter, XNOR-Net's α),
    and for a conv made with ``out_size=(H, W)`` also ``β ∈ R^H`` and ``γ ∈ R^W`` (initialised
    to 1): ``Γ = α ⊗ β ⊗ γ`` (the paper's case 3; without ``out_size`` its case 1, ``Γ = α``).
    The product is multiplied by α, then β, then γ (:meth:`output_scales`), the order in which
    binary-popcount applies them; all three are trained by backprop."""

    def __init__(self, layer: nn.Module, info: BinaryInfo, *, out_size: tuple[int, int] | None = None):
        super().__init__(layer, info)
        if not info.scale_weights:
            raise ConfigError(f"{info.method}: a learned scale replaces α; set scale_weights=True")
        self.scale_c = nn.Parameter(self.weight.detach().abs().mean(dim=tuple(range(1, self.weight.ndim))))
        if out_size is not None and self.weight.ndim != 4:
            raise ConfigError(f"{info.method}: β and γ scale the rows and columns of a conv's output; "
                              "a linear layer takes the per-channel scale only")
        h, w = out_size if out_size is not None else (0, 0)
        self.scale_h = nn.Parameter(torch.ones(h)) if out_size is not None else None
        self.scale_w = nn.Parameter(torch.ones(w)) if out_size is not None else None

    def alpha(self) -> torch.Tensor:
        """The learned α, one per output channel."""
        return self.scale_c

    def output_scales(self, y: torch.Tensor) -> list[torch.Tensor]:
        scales = super().output_scales(y)
        if self.scale_h is not None:
            size = (len(self.scale_h), len(self.scale_w))
            if tuple(y.shape[2:]) != size:
                raise InputError(f"{self.binary_info.method}: this layer learned β, γ for a {size[0]}x{size[1]} "
                                 f"output, the input gives {tuple(y.shape[2:])}: feed inputs of the training size "
                                 "(or use the per-channel scale)")
            scales += [self.scale_h.view(1, 1, -1, 1), self.scale_w.view(1, 1, 1, -1)]
        return scales

    def gamma(self) -> torch.Tensor:
        """Γ: ``α ⊗ β ⊗ γ`` of shape ``(C_out, H, W)``, or α ``(C_out,)``."""
        if self.scale_h is None:
            return self.scale_c
        return self.scale_c[:, None, None] * self.scale_h[None, :, None] * self.scale_w[None, None, :]

    def extra_repr(self) -> str:
        size = "" if self.scale_h is None else f", out_size={(len(self.scale_h), len(self.scale_w))}"
        return f"{super().extra_repr()}{size}"


class LearnedScaleConv2d(LearnedScaleLayer, BinaryConv2d):
    """A binary ``Conv2d`` scaled by a learned Γ (:func:`learned_scale_layer`)."""


class LearnedScaleLinear(LearnedScaleLayer, BinaryLinear):
    """A binary ``Linear`` scaled by a learned α (:func:`learned_scale_layer`)."""


def learned_scale_layer(name: str, layer: nn.Module, info: BinaryInfo,
                        out_size: tuple[int, int] | None = None) -> LearnedScaleLayer:
    """The binary twin of the float ``Conv2d``/``Linear`` ``layer`` (module ``name``) scaled by a
    learned Γ: per output channel, and per output row and column for a conv given its ``out_size``.

    >>> conv = learned_scale_layer("c", nn.Conv2d(4, 8, 3), BinaryInfo("xnorpp", True, True, False), (6, 6))
    >>> tuple(conv.gamma().shape), tuple(conv(torch.randn(2, 4, 8, 8)).shape)
    ((8, 6, 6), (2, 8, 6, 6))
    """
    cls = LearnedScaleConv2d if isinstance(layer, nn.Conv2d) else LearnedScaleLinear
    try:
        return cls(layer, info, out_size=out_size)
    except ConfigError as exc:
        raise ConfigError(f"layer {name}: {exc}; add it to exclude to keep it float") from None


def conv_output_sizes(model: nn.Module, x: torch.Tensor) -> dict[str, tuple[int, int]]:
    """``{module name: (H, W)}`` of the output of every ``Conv2d`` of ``model`` on input ``x``
    (one forward pass in eval mode, without gradient; the model's mode is restored).

    >>> conv_output_sizes(nn.Sequential(nn.Conv2d(1, 2, 3, stride=2)), torch.zeros(1, 1, 9, 9))
    {'0': (4, 4)}
    """
    sizes: dict[str, tuple[int, int]] = {}

    def record(name: str) -> Callable:
        def hook(module: nn.Module, args: Any, out: torch.Tensor) -> None:
            sizes[name] = tuple(out.shape[2:])
        return hook

    hooks = [m.register_forward_hook(record(n)) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return sizes
