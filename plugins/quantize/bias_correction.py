"""``bias-correction`` — remove the shift in expected layer output that weight quantization causes.

Nagel, van Baalen, Blankevoort and Welling, "Data-Free Quantization Through
Weight Equalization and Bias Correction" (ICCV 2019), §4.2.  Quantizing the
weights of a layer, ``W̃ = W + ε_W``, adds ``ε_W x`` to its output.  Rounding
errors are not zero-mean per output channel once they meet inputs that are
(ReLU outputs are all positive), so the layer's expected output moves by
``E[ε_W x] = ε_W E[x]``, and the shift compounds through the network.  The
correction folds that expectation into the bias::

    b ← b − E[(W̃ − W) x]

``W̃`` is ``W`` quantized and dequantized exactly as ``ptq`` will quantize it
at deploy time (int8, ``weight_granularity`` and ``weight_scheme`` as in ptq's
config; use the same values in both stages).  A layer without a bias gets one.

``mode="empirical"`` (default) is the paper's empirical variant: ``E[·]`` is
the mean over the data batches (and, for a convolution, over every output
position) of the layer applied with weight ``W̃ − W`` and no bias, to the
inputs the layer sees in the float model.

``mode="analytic"`` is the paper's data-free variant: the expected input of a
layer comes from the BatchNorm before it.  A BN's output is taken to be
``N(β, γ²)`` per channel, so after a ReLU ``E[x] = β·Φ(β/γ) + γ·φ(β/γ)``
(``Φ``, ``φ``: standard normal CDF and PDF; ``|γ|`` is the std), after a ReLU6
``E[ReLU(x)] − E[ReLU(x − 6)]``, and ``β`` with no activation.  The correction
is ``b ← b − (W̃ − W)·E[x]``, summed over input channels and kernel taps (the
expected input of a conv is constant over space, so zero padding at the
borders is ignored).  Between the BN and the layer the path may hold, besides
one activation, identity / dropout ops, average pools after the activation
(they keep the mean) and a flatten into a linear layer (each channel then owns
``in_features / C`` consecutive inputs).  A layer whose input does not come
from a BatchNorm that way (the model's input, a residual add, a max pool, a
BN that ``cle`` already folded, a layer called twice) is left uncorrected and
listed in ``skipped``; with no layer correctable the stage raises.  After
``cle`` in a recipe the BNs are already folded, so there the analytic variant
finds nothing: use the empirical one after ``cle``.

BatchNorm that follows a conv/linear is folded into it first (as ``cle``
does), since the deployed, quantized weights are the folded ones.  The stage
goes in a recipe before ``ptq``.  The empirical variant needs data: pass the
batches as ``data=`` to :func:`sdk.compress` / :func:`sdk.deploy`::

    sdk.deploy(model, "arm-int8", (x,), calibration=cal, data=cal,
               recipe={"stages": [{"method": "bias-correction", "config": {"weight_granularity": "per-tensor"}},
                                  {"method": "ptq", "config": {"weight_granularity": "per-tensor"}}]})

The analytic one needs none (``data=None``; ptq still calibrates activations)::

    sdk.deploy(model, "arm-int8", (x,), calibration=cal,
               recipe={"stages": [{"method": "bias-correction", "config": {"mode": "analytic"}},
                                  {"method": "ptq"}]})

>>> import torch
>>> layer = torch.nn.Linear(3, 2)
>>> out = BiasCorrection(progress=False).apply(torch.nn.Sequential(layer), [torch.rand(8, 3)])
>>> out[0].bias.shape
torch.Size([2])
>>> float(expected_relu(torch.tensor(0.0), torch.tensor(1.0)))      # φ(0) = 1/√(2π)
0.3989422804014327
"""

from __future__ import annotations

import dataclasses
import math
from typing import Iterable

import numpy as np
import torch
from torch import nn

from sdk import hookimpl
from sdk.base import Quantizer
from sdk.config import Config, check_choice, check_range
from sdk.errors import InputError
from sdk.encoding import hints_of, weight_spec
from sdk.log import progress as progress_bar
from sdk.quant import dequantize
from sdk.torch_fold import WEIGHTED, fold_batch_norms, module_calls, module_of, trace
from sdk.trainer import split_batch


class BiasCorrection(Quantizer):
    """Bias correction (Nagel et al. 2019, §4.2), empirical or analytic (data-free): a torch-side stage before ``ptq``."""

    name = "bias-correction"
    version = "1.0"
    post_training = False

    @dataclasses.dataclass(frozen=True)
    class Config(Config):
        mode: str = "empirical"                   # "empirical": E[x] from data; "analytic": from BN β, γ
        weight_granularity: str = "per-channel"   # as ptq will quantize: "per-channel" or "per-tensor"
        weight_scheme: str = "symmetric"
        num_batches: int | None = None            # use at most this many data batches
        progress: bool = True

        def __post_init__(self):
            check_choice("bias-correction", "mode", self.mode, ("empirical", "analytic"))
            check_choice("bias-correction", "weight_granularity", self.weight_granularity,
                         ("per-channel", "per-tensor"))
            check_choice("bias-correction", "weight_scheme", self.weight_scheme, ("symmetric", "asymmetric"))
            if self.num_batches is not None:
                check_range("bias-correction", "num_batches", self.num_batches, 1)

    @property
    def requires_calibration(self) -> bool:       # the analytic variant is data-free
        return self.config.mode == "empirical"

    def weight_error(self, w: torch.Tensor, hint=None) -> torch.Tensor:
        """``W̃ − W``: the error ptq's int8 weight quantization (same options, and the layer's
        encoding hint: a codebook keeps one code per shared value) puts on ``w``."""
        arr = w.detach().cpu().float().numpy()
        spec = weight_spec(arr, hint, granularity=self.config.weight_granularity, scheme=self.config.weight_scheme)
        scale, zero = spec.arrays()
        deq = dequantize(spec.quantize(arr), scale if spec.per_channel else scale[0],
                         zero if spec.per_channel else zero[0], axis=spec.axis)
        return torch.from_numpy(deq.astype(np.float64) - arr.astype(np.float64)).to(w.dtype)

    def apply(self, model: nn.Module, data: Iterable | None = None) -> nn.Module:
        """Fold BN, find ``E[(W̃ − W) x]`` per conv/linear layer (from ``data`` or, analytic, from the BN
        statistics), subtract it from the biases."""
        model.eval()
        analytic = self.config.mode == "analytic"
        if not analytic and data is None:
            raise InputError("bias-correction needs data to measure the expected layer inputs: pass input "
                             "batches as data= to sdk.compress or sdk.deploy (e.g. the calibration batches), "
                             "or use mode='analytic' (expected inputs from the BatchNorm statistics)")
        means = expected_inputs(model) if analytic else None      # read before the BNs are folded away
        fold_batch_norms(model)
        layers = [(name, m) for name, m in model.named_modules() if isinstance(m, WEIGHTED)]
        #: layers left uncorrected (analytic: no BatchNorm statistics for their input)
        self.skipped = [name for name, _ in layers if analytic and name not in means]
        layers = [(name, m) for name, m in layers if name not in self.skipped]
        if not layers:
            raise InputError("bias-correction (analytic) found no conv/linear layer whose input comes from a "
                             "BatchNorm through a ReLU/ReLU6 and mean-keeping ops (max pools, residual adds and "
                             "BNs folded by an earlier stage such as cle block it): nothing to correct; use "
                             "mode='empirical' with data=")
        errors = {name: self.weight_error(m.weight, hints_of(m)) for name, m in layers}
        if analytic:
            shifts = {name: analytic_shift(m, errors[name], means[name]) for name, m in layers}
        else:
            shifts = measure_shifts(model, layers, errors, data, self.config.num_batches, self.config.progress)
        with torch.no_grad():
            for name, m in layers:
                eps = shifts[name].to(m.weight.dtype)
                if m.bias is None:
                    m.bias = nn.Parameter(-eps)
                else:
                    m.bias.sub_(eps)
        self.shifts = {name: s.numpy() for name, s in shifts.items()}
        return model


def measure_shifts(model: nn.Module, layers: list[tuple[str, nn.Module]], errors: dict[str, torch.Tensor],
                   data: Iterable, num_batches: int | None = None, progress: bool = False) -> dict[str, torch.Tensor]:
    """Mean output of each layer run with weight ``errors[name]`` and no bias on its float-model inputs,
    per output channel, over every batch and position (float64)."""
    sums = {name: torch.zeros(m.weight.shape[0], dtype=torch.float64) for name, m in layers}
    counts = dict.fromkeys(sums, 0)

    def hook(name: str, layer: nn.Module):
        def pre(_module, inputs):
            err = _layer_output(layer, inputs[0], errors[name].to(inputs[0].dtype))
            channel = -1 if isinstance(layer, nn.Linear) else 1
            flat = err.movedim(channel, -1).reshape(-1, err.shape[channel]).double()
            sums[name] += flat.sum(0)
            counts[name] += flat.shape[0]
        return pre

    handles = [m.register_forward_pre_hook(hook(name, m)) for name, m in layers]
    seen = 0
    try:
        with torch.no_grad():
            for i, batch in enumerate(progress_bar(data, desc="bias correction", unit="batch",
                                                   enabled=progress)):
                if num_batches is not None and i >= num_batches:
                    break
                x, _ = split_batch(batch)
                model(x)
                seen += 1
    finally:
        for h in handles:
            h.remove()
    if not seen:
        raise InputError("bias-correction got no data batches: pass a non-empty list of input batches as data=")
    missing = [name for name in sums if not counts[name]]
    if missing:
        raise InputError(f"bias-correction: layer(s) {', '.join(missing)} never ran on the data; "
                         "they cannot be corrected (remove them or check the model's forward)")
    return {name: sums[name] / counts[name] for name in sums}


def _layer_output(layer: nn.Module, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``layer`` applied to ``x`` with ``weight`` in place of its own and no bias."""
    if isinstance(layer, nn.Linear):
        return torch.nn.functional.linear(x, weight)
    return layer._conv_forward(x, weight, None)


# ---------------------------------------------------------------------------
# analytic variant: expected inputs from BatchNorm statistics
# ---------------------------------------------------------------------------

def expected_relu(mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """``E[ReLU(x)]`` for ``x ~ N(mean, std²)``: ``mean·Φ(mean/std) + std·φ(mean/std)`` (``max(mean, 0)`` at std 0).

    >>> expected_relu(torch.tensor([2.0, -1.0]), torch.tensor([0.0, 0.0])).tolist()
    [2.0, 0.0]
    """
    mean, std = mean.double(), std.double().abs()
    z = mean / torch.where(std > 0, std, 1.0)
    gauss = mean * torch.special.ndtr(z) + std * torch.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)
    return torch.where(std > 0, gauss, mean.clamp(min=0))


def analytic_shift(layer: nn.Module, error: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """``(W̃ − W)·E[x]`` per output channel, ``error = W̃ − W``, ``mean``: ``E[x]`` per input channel (conv:
    constant over space, so the error is summed over kernel taps) or input feature (linear), float64."""
    err = error.double()
    if isinstance(layer, nn.Linear):
        return err @ mean
    taps = err.reshape(err.shape[0], err.shape[1], -1).sum(2)               # [out, in per group]
    g = layer.groups
    per_group = mean.reshape(g, -1).repeat_interleave(err.shape[0] // g, 0)  # [out, in per group]
    return (taps * per_group).sum(1)


def expected_inputs(model: nn.Module) -> dict[str, torch.Tensor]:
    """``E[x]`` (float64, per input channel / feature) of every conv/linear layer whose input comes from a
    BatchNorm through at most one ReLU/ReLU6 and mean-keeping ops; other layers are absent."""
    gm = trace(model)
    calls = module_calls(gm)
    means = {}
    for node in gm.graph.nodes:
        layer = module_of(gm, node)
        if isinstance(layer, WEIGHTED) and calls[node.target] == 1:
            mean = _expected_input(gm, node, layer)
            if mean is not None:
                means[node.target] = mean
    return means


def _expected_input(gm, node, layer) -> torch.Tensor | None:
    steps = []
    cur = node.args[0] if node.args else None
    while True:
        if not isinstance(cur, torch.fx.Node) or any(
                isinstance(a, torch.fx.Node) for a in list(cur.args[1:]) + list(cur.kwargs.values())):
            return None
        bn = module_of(gm, cur)
        if isinstance(bn, nn.modules.batchnorm._BatchNorm):
            break
        step = _step(cur, bn)
        if step is None:
            return None
        steps.append(step)
        cur = cur.args[0] if cur.args else None
    beta = bn.bias.detach().double() if bn.bias is not None else torch.zeros(bn.num_features, dtype=torch.float64)
    gamma = bn.weight.detach().double().abs() if bn.weight is not None else torch.ones_like(beta)
    mean, gaussian, flat = beta, True, False          # gaussian: still N(β, γ²) per channel
    for step in reversed(steps):                      # from the BN forward to the layer
        if step in ("relu", "relu6"):
            if not gaussian:
                return None
            mean = expected_relu(mean, gamma) - (expected_relu(mean - 6, gamma) if step == "relu6" else 0)
            gaussian = False
        elif step == "pool":                          # keeps the mean, not the distribution
            if flat:
                return None
            gaussian = False
        elif step == "flatten":
            flat = True
    c = mean.numel()
    if isinstance(layer, nn.Linear):
        if layer.in_features % c or (not flat and layer.in_features != c):
            return None
        return mean.repeat_interleave(layer.in_features // c)
    return None if flat or layer.in_channels != c else mean


_SAME = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d)
_POOLS = (nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d)


def _step(node: torch.fx.Node, mod: nn.Module | None) -> str | None:
    """What one op between a BN and a layer does: ``relu``, ``relu6``, ``same``, ``pool``, ``flatten`` or
    ``None`` (the expected input is unknown)."""
    if node.op == "call_module":
        if type(mod) is nn.ReLU:
            return "relu"
        if type(mod) is nn.ReLU6:
            return "relu6"
        if isinstance(mod, _SAME):
            return "same"
        if isinstance(mod, _POOLS) and getattr(mod, "padding", 0) in (0, (0,), (0, 0)):
            return "pool"
        if isinstance(mod, nn.Flatten) and mod.start_dim == 1:
            return "flatten"
        return None
    if node.op == "call_function":
        if node.target in (torch.relu, torch.nn.functional.relu):
            return "relu"
        if node.target is torch.nn.functional.relu6:
            return "relu6"
        if node.target is torch.nn.functional.dropout:
            return "same"
        if node.target is torch.flatten and _arg(node, 1, "start_dim", 0) == 1:
            return "flatten"
        if node.target in (torch.nn.functional.adaptive_avg_pool1d, torch.nn.functional.adaptive_avg_pool2d):
            return "pool"
        return None
    if node.op == "call_method":
        if node.target in ("relu", "relu_"):
            return "relu"
        if node.target == "flatten" and _arg(node, 1, "start_dim", 0) == 1:
            return "flatten"
    return None


def _arg(node: torch.fx.Node, i: int, key: str, default):
    return node.args[i] if len(node.args) > i else node.kwargs.get(key, default)


@hookimpl
def register_quantizers(register):
    register(BiasCorrection)
