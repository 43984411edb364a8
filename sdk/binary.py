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
from typing import Any, ClassVar, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .encoding import Hint
from .errors import ConfigError, InputError
from .layer_quant import LayerQuantConfig, LayerQuantizer, QuantizedModule, quantize_layers

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

    def alpha(self) -> torch.Tensor:
        """α = mean |W| of each output filter (XNOR-Net eq. 4)."""
        return self.weight.abs().mean(dim=tuple(range(1, self.weight.ndim)))

    def effective_weight(self) -> torch.Tensor:
        """The weight the forward pass applies: ±α (bwn, xnor) or ±1 (bnn)."""
        w = binarize(self.weight)
        return w * self.alpha().view(-1, *(1,) * (w.ndim - 1)) if self.binary_info.scale_weights else w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        info = self.binary_info
        if self.input_bn is not None:
            x = self.input_bn(x)
        y = self._product(binarize(x) if info.binary_activations else x, binarize(self.weight))
        per_channel = (1, -1) + (1,) * (y.ndim - 2)
        if info.scale_weights:
            y = y * self.alpha().view(per_channel)
        if info.scale_activations:
            y = y * mean_abs_window(x.detach(), *self._window())
        if self.bias is not None:
            y = y + self.bias.view(per_channel)
        return y

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
