"""Int8 fake quantization during training, as the integer-only graph will compute.

The quantizers that train a network through the integer graph's rounding and
deploy it to an int8 target with what they learned (``qat``,
``block-replacement``) share this machinery, which follows Jacob, Kligys, Chen,
Zhu, Tang, Howard, Adam and Kalenichenko, "Quantization and Training of Neural
Networks for Efficient Integer-Arithmetic-Only Inference" (CVPR 2018):

* **BatchNorm folding** (section 3.2, Fig. C.8, :class:`FoldedLayer`).  A
  BatchNorm that directly follows a Conv/Linear is folded into it, as the
  integer graph will have it: ``w_fold = w·γ/σ``, ``b_fold = β + (b − μ)·γ/σ``
  with the BN's running statistics.  For the first ``freeze_bn_after``
  optimizer steps the layer computes ``BN_batch(conv(x, q(w_fold))·σ/γ + b)`` —
  quantized folded weights, batch statistics, running statistics updated
  (torch.ao's form of the paper's graph); afterwards the statistics are frozen
  and the layer computes exactly ``conv(x, q(w_fold)) + b_fold``, the deployed
  layer.
* **Weights** (:func:`fake_quant_weight`): ``q(w) = s·clamp(round(w/s), −127, 127)``
  per output channel, ``s = max|w_c| / 127`` (symmetric, narrow int8: what
  ``arm-int8`` ships); straight-through gradient.
* **Activations** (:func:`fake_quant`, :class:`RangeTracker`): asymmetric int8
  ``s·(clamp(round(x/s) + z, −128, 127) − z)`` with ``(s, z)`` from an
  exponential moving average of each batch's min and max (``ema_decay``; the
  range widened to contain 0, so 0 is exact), the gradient 1 inside the range
  and 0 where it clamps.  Quantized are the model input and the outputs the
  integer graph has (:func:`fold_plan`): each Conv/Linear block (after its
  folded BN and the activation module that follows it: nn.ReLU, ReLU6,
  Hardtanh, which fuse into the integer op), every other activation module and
  every average-pooling module called once.

:class:`FakeQuantized` puts all of it on a model in place; once trained,
:meth:`FakeQuantized.bake` makes it deployable: each layer is a plain
Conv/Linear again (the BN an ``nn.Identity``) whose weight holds exactly the
int8 grid values and carries ``Hint(bits=8, per_channel=True)``, so the plan's
per-channel scales reproduce the codes exactly; each quantized module output
carries its learned range, ``annotate(module, Hint(range=(lo, hi)), "output")``,
which the graph-side ``ptq`` uses instead of observing
(:func:`sdk.calibrate.activation_specs`).  Recalibrated at deploy are the values
that are not module outputs: the model input (its learned range is kept as
``model.qat_input_range``: the graph has no input hints), functional ops
(``torch.relu(x)``, ``x + y``, flatten, which shares its input's scale), max
pooling and modules called more than once.  Where an activation is
functional, the block's learned range is that of the pre-activation value,
which the fused integer graph does not have.  :func:`simulate` re-applies the
learned activation quantization to the baked model: the integer simulation the
artifact is compared with.

>>> import torch
>>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
>>> fq = FakeQuantized(net, FakeQuantConfig(), "demo")
>>> with torch.no_grad():
...     _ = net(torch.randn(16, 4))           # a training-mode batch: the ranges observe it
>>> fq.remove_hooks(); net = fq.bake()
>>> s = net[0].weight.detach().abs().amax(1, keepdim=True) / 127
>>> codes = net[0].weight.detach() / s       # integers, up to float rounding
>>> bool((codes - codes.round()).abs().max() < 1e-4), hints_of(net[1], "output").range is not None
(True, True)
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import distributed, masks
from .config import check_range
from .encoding import Hint, annotate, hints_of
from .errors import ConfigError
from .layer_quant import LAYER_TYPES, LayerQuantConfig, QuantizedModule, select_layers, ste
from .quant import MovingMinMaxObserver, qparams, qrange
from .torch_fold import module_calls, module_of, set_module, trace

#: activation modules that fuse into the Conv/Linear (or add) before them in the integer graph
ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.Hardtanh)
#: other modules whose output the integer graph requantizes
POOLS = (nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d)
#: the model attribute that keeps the learned input range (no graph hint carries it)
INPUT_RANGE_ATTR = "qat_input_range"

W_QMAX = 127            # symmetric narrow int8 weights: codes in [-127, 127]
A_QMIN, A_QMAX = qrange("int8")


def fake_quant(x: torch.Tensor, scale: float, zero: int, qmin: int = A_QMIN, qmax: int = A_QMAX) -> torch.Tensor:
    """``scale·(clamp(round(x/scale) + zero, qmin, qmax) − zero)``; the gradient is 1 where the
    code lies inside ``[qmin, qmax]`` and 0 where it clamps.

    >>> x = torch.tensor([-1.0, 0.26, 9.0], requires_grad=True)
    >>> y = fake_quant(x, 0.5, -128, -128, 127); y.sum().backward()
    >>> y.tolist(), x.grad.tolist()
    ([0.0, 0.5, 9.0], [0.0, 1.0, 1.0])
    """
    q = torch.round(x / scale) + zero
    inside = ((q >= qmin) & (q <= qmax)).to(x.dtype)
    y = (q.clamp(qmin, qmax) - zero) * scale
    return y.detach() + (x - x.detach()) * inside


def range_qparams(lo: float, hi: float) -> tuple[float, int]:
    """Asymmetric int8 ``(scale, zero point)`` of ``[lo, hi]`` exactly as the plan computes them
    from a learned range (:meth:`sdk.quant.QuantSpec.from_range`).

    >>> s, z = range_qparams(0.0, 2.55)       # the plan's float32 scale
    >>> round(s, 6), z
    (0.01, -128)
    """
    s, z = qparams(np.float64(lo), np.float64(hi), dtype="int8", symmetric=False)
    return float(s), int(z)


def fake_quant_weight(w: torch.Tensor) -> torch.Tensor:
    """Per output channel symmetric narrow int8: ``s·clamp(round(w/s), −127, 127)``,
    ``s = max|w_c| / 127`` (an all-zero channel keeps ``s = 1``); straight-through gradient.

    >>> fake_quant_weight(torch.tensor([[1.0, 0.5, 0.003], [0.0, 0.0, 0.0]])).mul(127).round().tolist()
    [[127.0, 64.0, 0.0], [0.0, 0.0, 0.0]]
    """
    amax = w.detach().abs().reshape(w.shape[0], -1).amax(1)
    scale = torch.where(amax > 0, amax / W_QMAX, torch.ones_like(amax)).reshape((-1,) + (1,) * (w.ndim - 1))
    return ste(torch.clamp(torch.round(w / scale), -W_QMAX, W_QMAX) * scale, w)


class RangeTracker:
    """The EMA of each batch's min and max of one tensor (the paper's activation ranges) and the
    fake quantization with it."""

    def __init__(self, decay: float):
        self.observer = MovingMinMaxObserver(momentum=decay)

    def __call__(self, x: torch.Tensor, observe: bool) -> torch.Tensor:
        if observe:
            with torch.no_grad():
                # under torchrun each rank sees its slice of the batch: the range is the whole batch's
                lo, hi = distributed.all_reduce_range(float(x.min()), float(x.max()))
                self.observer.update(np.array([lo, hi], dtype=np.float32))
        return fake_quant(x, *range_qparams(*self.range))

    @property
    def range(self) -> tuple[float, float]:
        lo, hi = self.observer.range()
        return float(lo), float(hi)


class FoldedLayer(QuantizedModule):
    """A Conv/Linear during fake-quantized training, with the BatchNorm it feeds folded in (see
    the module).  ``method`` names the quantizer training it."""

    def __init__(self, layer: nn.Module, bn: nn.modules.batchnorm._BatchNorm | None, quantize: bool,
                 method: str = "fake-quant"):
        super().__init__()
        self.layer, self.bn, self.quantize = layer, bn, quantize
        self._method = method
        self.frozen = False       # BN statistics frozen: the forward pass is the deployed layer's

    @property
    def method(self) -> str:
        return self._method

    def _scale(self) -> torch.Tensor:
        bn = self.bn
        inv = torch.rsqrt(bn.running_var + bn.eps)
        return inv * bn.weight if bn.weight is not None else inv

    def folded(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The (fake-quantized) folded weight and the folded bias the layer deploys with."""
        w, b = self.layer.weight, self.layer.bias
        if self.bn is not None:
            s = self._scale()
            w = w * s.reshape((-1,) + (1,) * (w.ndim - 1))
            b = (b - self.bn.running_mean if b is not None else -self.bn.running_mean) * s
            b = b + self.bn.bias if self.bn.bias is not None else b
        return (fake_quant_weight(w) if self.quantize else w), b

    def _compute(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        if isinstance(self.layer, nn.Linear):
            return F.linear(x, w, b)
        return self.layer._conv_forward(x, w, b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bn is None or self.frozen or not self.training:
            return self._compute(x, *self.folded())
        # batch statistics: the folded-weight output scaled back to the conv's, then BN in training mode
        s = self._scale()
        w = self.layer.weight * s.reshape((-1,) + (1,) * (self.layer.weight.ndim - 1))
        y = self._compute(x, fake_quant_weight(w) if self.quantize else w, None)
        shape = (1, -1) + (1,) * (y.ndim - 2)
        y = y / s.reshape(shape)
        if self.layer.bias is not None:
            y = y + self.layer.bias.reshape(shape)
        return self.bn(y)


def _quantize_output(tracker: RangeTracker, module: nn.Module, args: tuple, output: torch.Tensor):
    return tracker(output, observe=module.training)


def _quantize_input(tracker: RangeTracker, module: nn.Module, args: tuple):
    return (tracker(args[0], observe=module.training), *args[1:])


@dataclasses.dataclass(frozen=True)
class FoldPlan:
    """What the integer graph will make of a float model's modules (:func:`fold_plan`)."""

    #: ``{Conv/Linear: the BatchNorm folded into it, or None}``
    layers: dict[str, str | None]
    #: the modules whose output is quantized, in graph order
    points: list[str]
    #: ``{Conv/Linear or its folded BN: the last module of its fused unit}`` (the activation
    #: fused into it, else the BN, else the layer): no integer value exists inside a unit
    unit_end: dict[str, str]


def fold_plan(gm: torch.fx.GraphModule) -> FoldPlan:
    """The :class:`FoldPlan` of a float model from its ``torch.fx`` trace (:func:`sdk.torch_fold.trace`;
    see the module docstring for which outputs are quantized).

    >>> net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4, 2))
    >>> plan = fold_plan(trace(net))
    >>> plan.layers, plan.points, plan.unit_end
    ({'0': '1', '4': None}, ['2', '4'], {'0': '2', '1': '2', '4': '4'})
    """
    calls = module_calls(gm)

    def sole_user(node):
        users = list(node.users)
        return users[0] if len(users) == 1 else None

    def once(node, types):
        mod = module_of(gm, node)
        return node if isinstance(mod, types) and calls[node.target] == 1 else None

    layers: dict[str, str | None] = {}
    points: list[str] = []
    unit_end: dict[str, str] = {}
    for node in gm.graph.nodes:
        if once(node, LAYER_TYPES) is not None:
            end, bn = node, once(sole_user(node), nn.modules.batchnorm._BatchNorm)
            if bn is not None and module_of(gm, bn).running_mean is not None \
                    and module_of(gm, bn).num_features == module_of(gm, node).weight.shape[0]:
                end = bn
            layers[node.target] = bn.target if end is bn else None
            act = once(sole_user(end), ACTIVATIONS)
            points.append(act.target if act is not None else node.target)
            for member in dict.fromkeys((node, end)):
                unit_end[member.target] = act.target if act is not None else end.target
        elif once(node, ACTIVATIONS + POOLS) is not None and node.target not in points:
            points.append(node.target)
    return FoldPlan(layers, points, unit_end)


@dataclasses.dataclass(frozen=True)
class FakeQuantConfig(LayerQuantConfig):
    """Fields every quantizer training through :class:`FakeQuantized` takes: the training fields
    and layer choice of :class:`sdk.layer_quant.LayerQuantConfig`, the BN freeze and the range EMA."""

    epochs: int = 3
    lr: float = 1e-4                  # fine-tuning a trained float model
    keep_first_last: bool = False     # integer-only inference: every layer's weights are int8
    freeze_bn_after: int = 0          # optimizer steps with batch statistics before BN freezes
    ema_decay: float = 0.9            # weight of the old range in the EMA of batch min / max

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.freeze_bn_after, int) or isinstance(self.freeze_bn_after, bool) \
                or self.freeze_bn_after < 0:
            raise ConfigError(f"{self.type_tag}: freeze_bn_after must be a step count >= 0, "
                              f"got {self.freeze_bn_after!r}")
        check_range(self.type_tag, "ema_decay", self.ema_decay, 0.0, 1.0, hi_open=True)


class FakeQuantized:
    """Int8 fake quantization put on ``model`` in place for ``method``'s training (see the module):
    each Conv/Linear a :class:`FoldedLayer` (its BN an ``nn.Identity``; the weights of the layers
    ``cfg`` chooses quantized), a :class:`RangeTracker` on the input and on every output the
    integer graph quantizes.  Call :meth:`after_step` after every optimizer step, then
    :meth:`remove_hooks` and :meth:`bake`.

    ``traced`` is the float model's ``torch.fx`` trace taken before the rewrite (its
    module names are those of ``model`` after it) and ``plan`` its :class:`FoldPlan`.
    """

    def __init__(self, model: nn.Module, cfg: FakeQuantConfig, method: str):
        self.model, self.method = model, method
        self.chosen = {n for n, _ in select_layers(model, method, cfg.keep_first_last, cfg.exclude)}
        self.traced = trace(model)
        self.plan = fold_plan(self.traced)
        self.folded: dict[str, FoldedLayer] = {}
        for name, bn in self.plan.layers.items():
            self.folded[name] = FoldedLayer(model.get_submodule(name), model.get_submodule(bn) if bn else None,
                                            quantize=name in self.chosen, method=method)
        for name, wrapper in self.folded.items():
            set_module(model, name, wrapper)
            if wrapper.bn is not None:
                set_module(model, self.plan.layers[name], nn.Identity())
        self.trackers = {name: RangeTracker(cfg.ema_decay) for name in self.plan.points}
        self.source = RangeTracker(cfg.ema_decay)
        self._hooks = [model.get_submodule(n).register_forward_hook(functools.partial(_quantize_output, t))
                       for n, t in self.trackers.items()]
        self._hooks.append(model.register_forward_pre_hook(functools.partial(_quantize_input, self.source)))
        self.freeze_bn_after, self.steps = cfg.freeze_bn_after, 0
        for wrapper in self.folded.values():
            wrapper.frozen = cfg.freeze_bn_after == 0

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        """The model input as the pre-hook quantizes it (observed in training mode): for callers
        that run the model's modules without calling ``model`` itself."""
        return self.source(x, observe=self.model.training)

    def after_step(self) -> None:
        """Count an optimizer step; the BN statistics freeze after ``freeze_bn_after`` of them."""
        self.steps += 1
        if self.steps == self.freeze_bn_after:
            for wrapper in self.folded.values():
                wrapper.frozen = True

    def remove_hooks(self) -> None:
        """Take the training-time activation quantization off the model."""
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    def bake(self) -> nn.Module:
        """Each layer back in its place, a plain Conv/Linear with the folded int8-grid weight; the
        learned ranges as output hints and :data:`INPUT_RANGE_ATTR`.  Returns the model (eval mode)."""
        model = self.model
        for name, wrapper in self.folded.items():
            with torch.no_grad():
                w, b = (t.detach().clone() if t is not None else None for t in wrapper.folded())
            layer = masks.bake(wrapper.layer)        # a pruning mask is in w already
            with torch.no_grad():
                layer.weight.copy_(w)
                if b is not None and layer.bias is None:
                    layer.bias = nn.Parameter(b)
                elif b is not None:
                    layer.bias.copy_(b)
            set_module(model, name, layer)
            if name in self.chosen:
                annotate(layer, Hint(bits=8, per_channel=True, source=self.method))
        for name, tracker in self.trackers.items():
            annotate(model.get_submodule(name), Hint(range=tracker.range, source=self.method), "output")
        setattr(model, INPUT_RANGE_ATTR, self.source.range)
        return model.eval()


@contextlib.contextmanager
def simulate(model: nn.Module):
    """Within the block, ``model`` (baked by :meth:`FakeQuantized.bake`) fake-quantizes its input
    and every module output with a learned range as the integer graph will: the torch model's
    integer simulation.

    >>> with simulate(net):                 # doctest: +SKIP
    ...     logits = net(x)
    """
    def fixed(lo, hi):
        s, z = range_qparams(lo, hi)
        return lambda x: fake_quant(x, s, z)

    hooks = []
    for mod in model.modules():
        hint = hints_of(mod, "output")
        if hint is not None and hint.range is not None:
            q = fixed(*hint.range)
            hooks.append(mod.register_forward_hook(lambda m, a, out, q=q: q(out)))
    if getattr(model, INPUT_RANGE_ATTR, None) is not None:
        q_in = fixed(*getattr(model, INPUT_RANGE_ATTR))
        hooks.append(model.register_forward_pre_hook(lambda m, a: (q_in(a[0]), *a[1:])))
    try:
        yield model
    finally:
        for hook in hooks:
            hook.remove()
