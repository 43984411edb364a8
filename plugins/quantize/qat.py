"""``qat`` — quantization-aware training for integer-only inference, BatchNorm folded in.

Jacob, Kligys, Chen, Zhu, Tang, Howard, Adam and Kalenichenko, "Quantization
and Training of Neural Networks for Efficient Integer-Arithmetic-Only
Inference" (CVPR 2018).  The network is fine-tuned with the integer graph's
rounding simulated in the forward pass ("fake quantization"), the gradient
passing the rounding by the straight-through estimator:

* **BatchNorm folding** (section 3.2, Fig. C.8).  A BatchNorm that directly
  follows a Conv/Linear is folded into it, as the integer graph will have it:
  ``w_fold = w·γ/σ``, ``b_fold = β + (b − μ)·γ/σ`` with the BN's running
  statistics.  For the first ``freeze_bn_after`` optimizer steps the layer
  computes ``BN_batch(conv(x, q(w_fold))·σ/γ + b)`` — quantized folded weights,
  batch statistics, running statistics updated (torch.ao's form of the paper's
  graph); afterwards the statistics are frozen and the layer computes exactly
  ``conv(x, q(w_fold)) + b_fold``, the deployed layer.
* **Weights**: ``q(w) = s·clamp(round(w/s), −127, 127)`` per output channel,
  ``s = max|w_c| / 127`` (symmetric, narrow int8: what ``arm-int8`` ships);
  straight-through gradient.
* **Activations**: asymmetric int8 ``s·(clamp(round(x/s) + z, −128, 127) − z)``
  with ``(s, z)`` from an exponential moving average of each batch's min and
  max (``ema_decay``; the range widened to contain 0, so 0 is exact), the
  gradient 1 inside the range and 0 where it clamps.  Quantized are the
  model input and the outputs the integer graph has: each Conv/Linear block
  (after its folded BN and the activation module that follows it: nn.ReLU,
  ReLU6, Hardtanh, which fuse into the integer op), every other activation
  module and every average-pooling module called once.

After training the model is baked: each layer is a plain Conv/Linear again
(the BN an ``nn.Identity``) whose weight holds exactly the int8 grid values
and carries ``Hint(bits=8, per_channel=True)``, so the plan's per-channel
scales reproduce the codes exactly; each quantized module output carries its
learned range, ``annotate(module, Hint(range=(lo, hi)), "output")``, which the
graph-side ``ptq`` uses instead of observing (:func:`sdk.calibrate.activation_specs`).
Recalibrated at deploy are the values that are not module outputs: the model
input (its learned range is kept as ``model.qat_input_range``: the graph has
no input hints), functional ops (``torch.relu(x)``, ``x + y``, flatten, which
shares its input's scale), max pooling and modules called more than once.
Where an activation is functional, the block's learned range is that of the
pre-activation value, which the fused integer graph does not have.
:func:`simulate` re-applies the learned activation quantization to the baked
model: the integer simulation the artifact is compared with.

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

import contextlib
import dataclasses
import functools
from typing import Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from sdk import hookimpl, masks
from sdk.config import check_range
from sdk.encoding import Hint, annotate, hints_of
from sdk.errors import ConfigError, InputError
from sdk.layer_quant import LAYER_TYPES, LayerQuantConfig, LayerQuantizer, QuantizedModule, select_layers, ste
from sdk.quant import MovingMinMaxObserver, qparams, qrange
from sdk.torch_fold import module_calls, module_of, set_module, trace

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
    from a learned range (:meth:`sdk.quant.QuantSpec.from_range`)."""
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
                self.observer.update(torch.stack([x.min(), x.max()]).float().cpu().numpy())
        return fake_quant(x, *range_qparams(*self.range))

    @property
    def range(self) -> tuple[float, float]:
        lo, hi = self.observer.range()
        return float(lo), float(hi)


class FoldedLayer(QuantizedModule):
    """A Conv/Linear during QAT, with the BatchNorm it feeds folded in (see the module)."""

    def __init__(self, layer: nn.Module, bn: nn.modules.batchnorm._BatchNorm | None, quantize: bool):
        super().__init__()
        self.layer, self.bn, self.quantize = layer, bn, quantize
        self.frozen = False       # BN statistics frozen: the forward pass is the deployed layer's

    @property
    def method(self) -> str:
        return "qat"

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


def _blocks(model: nn.Module) -> tuple[dict[str, str | None], list[str]]:
    """``({layer: the BN folded into it or None}, [modules whose output is quantized])`` read from
    the model's ``torch.fx`` structure (see the module docstring for which ones)."""
    gm = trace(model)
    calls = module_calls(gm)

    def sole_user(node):
        users = list(node.users)
        return users[0] if len(users) == 1 else None

    def once(node, types):
        mod = module_of(gm, node)
        return node if isinstance(mod, types) and calls[node.target] == 1 else None

    layers: dict[str, str | None] = {}
    points: list[str] = []
    for node in gm.graph.nodes:
        if once(node, LAYER_TYPES) is not None:
            end, bn = node, once(sole_user(node), nn.modules.batchnorm._BatchNorm)
            if bn is not None and module_of(gm, bn).running_mean is not None \
                    and module_of(gm, bn).num_features == module_of(gm, node).weight.shape[0]:
                end = bn
            layers[node.target] = bn.target if end is bn else None
            act = once(sole_user(end), ACTIVATIONS)
            points.append(act.target if act is not None else node.target)
        elif once(node, ACTIVATIONS + POOLS) is not None and node.target not in points:
            points.append(node.target)
    return layers, points


class QAT(LayerQuantizer):
    """Quantization-aware training (Jacob et al. 2018): folded BN, int8 fake quantization, EMA ranges."""

    name = "qat"
    version = "1.0"
    needs_training = True
    streams = ("train",)

    @dataclasses.dataclass(frozen=True)
    class Config(LayerQuantConfig):
        epochs: int = 3
        lr: float = 1e-4                  # fine-tuning a trained float model
        keep_first_last: bool = False     # integer-only inference: every layer's weights are int8
        freeze_bn_after: int = 0          # optimizer steps with batch statistics before BN freezes
        ema_decay: float = 0.9            # weight of the old range in the EMA of batch min / max

        def __post_init__(self):
            super().__post_init__()
            if not isinstance(self.freeze_bn_after, int) or isinstance(self.freeze_bn_after, bool) \
                    or self.freeze_bn_after < 0:
                raise ConfigError(f"qat: freeze_bn_after must be a step count >= 0, got {self.freeze_bn_after!r}")
            check_range("qat", "ema_decay", self.ema_decay, 0.0, 1.0, hi_open=True)

    def apply(self, model: nn.Module, data: Iterable | None = None) -> nn.Module:
        """Fold, fake-quantize and train ``model`` in place, then bake it (see the module); eval mode."""
        from sdk.trainer import fit

        cfg = self.config
        if not isinstance(model, nn.Module):
            raise InputError(f"qat quantizes a torch.nn.Module, got {type(model).__name__}")
        if data is None:
            raise InputError("qat trains: pass data= (a list of (x, y) batches or a DataLoader)")
        chosen = {n for n, _ in select_layers(model, self.name, cfg.keep_first_last, cfg.exclude)}
        layers, points = _blocks(model)
        folded: dict[str, FoldedLayer] = {}
        for name, bn in layers.items():
            folded[name] = FoldedLayer(model.get_submodule(name), model.get_submodule(bn) if bn else None,
                                       quantize=name in chosen)
        for name, wrapper in folded.items():
            set_module(model, name, wrapper)
            if wrapper.bn is not None:
                set_module(model, layers[name], nn.Identity())
        trackers = {name: RangeTracker(cfg.ema_decay) for name in points}
        hooks = [model.get_submodule(n).register_forward_hook(functools.partial(_quantize_output, t))
                 for n, t in trackers.items()]
        source = RangeTracker(cfg.ema_decay)
        hooks.append(model.register_forward_pre_hook(functools.partial(_quantize_input, source)))
        steps = [0]

        def after_step():
            steps[0] += 1
            if steps[0] == cfg.freeze_bn_after:
                for wrapper in folded.values():
                    wrapper.frozen = True

        for wrapper in folded.values():
            wrapper.frozen = cfg.freeze_bn_after == 0
        try:
            fit(model, data, self._loss, cfg.training(), after_step=after_step, desc=self.name)
        finally:
            for hook in hooks:
                hook.remove()
        self._bake(model, folded, chosen)
        for name, tracker in trackers.items():
            annotate(model.get_submodule(name), Hint(range=tracker.range, source=self.name), "output")
        setattr(model, INPUT_RANGE_ATTR, source.range)
        return model.eval()

    def _bake(self, model: nn.Module, folded: dict[str, FoldedLayer], chosen: set[str]) -> None:
        """Each layer back in its place, a plain Conv/Linear with the folded int8-grid weight."""
        for name, wrapper in folded.items():
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
            if name in chosen:
                annotate(layer, Hint(bits=8, per_channel=True, source=self.name))


@contextlib.contextmanager
def simulate(model: nn.Module):
    """Within the block, ``model`` (baked by :class:`QAT`) fake-quantizes its input and every module
    output with a learned range as the integer graph will: the torch QAT model's integer simulation.

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


@hookimpl
def register_quantizers(register):
    register(QAT)
