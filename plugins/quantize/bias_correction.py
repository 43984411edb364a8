"""``bias-correction`` — remove the shift in expected layer output that weight quantization causes.

Nagel, van Baalen, Blankevoort and Welling, "Data-Free Quantization Through
Weight Equalization and Bias Correction" (ICCV 2019), §4.2.  Quantizing the
weights of a layer, ``W̃ = W + ε_W``, adds ``ε_W x`` to its output.  Rounding
errors are not zero-mean per output channel once they meet inputs that are
(ReLU outputs are all positive), so the layer's expected output moves by
``E[ε_W x] = ε_W E[x]``, and the shift compounds through the network.  The
correction folds that expectation into the bias::

    b ← b − E[(W̃ − W) x]

This is the paper's *empirical* variant: ``E[·]`` is the mean over the
calibration batches (and, for a convolution, over every output position) of
the layer applied with weight ``W̃ − W`` and no bias, to the inputs the layer
sees in the float model.  ``W̃`` is ``W`` quantized and dequantized exactly as
``ptq`` will quantize it at deploy time (int8, ``weight_granularity`` and
``weight_scheme`` as in ptq's config; use the same values in both stages).
A layer without a bias gets one.

BatchNorm that follows a conv/linear is folded into it first (as ``cle``
does), since the deployed, quantized weights are the folded ones.  The stage
goes in a recipe before ``ptq`` and needs data: pass the batches as
``data=`` to :func:`sdk.compress` / :func:`sdk.deploy`::

    sdk.deploy(model, "arm-int8", (x,), calibration=cal, data=cal,
               recipe={"stages": [{"method": "bias-correction", "config": {"weight_granularity": "per-tensor"}},
                                  {"method": "ptq", "config": {"weight_granularity": "per-tensor"}}]})

>>> import torch
>>> layer = torch.nn.Linear(3, 2)
>>> out = BiasCorrection(progress=False).apply(torch.nn.Sequential(layer), [torch.rand(8, 3)])
>>> out[0].bias.shape
torch.Size([2])
"""

from __future__ import annotations

import dataclasses
from typing import Iterable

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from sdk import hookimpl
from sdk.base import Quantizer
from sdk.config import Config, check_choice, check_range
from sdk.errors import InputError
from sdk.encoding import hints_of, weight_spec
from sdk.quant import dequantize
from sdk.torch_fold import WEIGHTED, fold_batch_norms
from sdk.trainer import split_batch


class BiasCorrection(Quantizer):
    """Empirical bias correction (Nagel et al. 2019, §4.2): a torch-side stage before ``ptq``."""

    name = "bias-correction"
    version = "1.0"
    post_training = False
    requires_calibration = True

    @dataclasses.dataclass(frozen=True)
    class Config(Config):
        weight_granularity: str = "per-channel"   # as ptq will quantize: "per-channel" or "per-tensor"
        weight_scheme: str = "symmetric"
        num_batches: int | None = None            # use at most this many data batches
        progress: bool = True

        def __post_init__(self):
            check_choice("bias-correction", "weight_granularity", self.weight_granularity,
                         ("per-channel", "per-tensor"))
            check_choice("bias-correction", "weight_scheme", self.weight_scheme, ("symmetric", "asymmetric"))
            if self.num_batches is not None:
                check_range("bias-correction", "num_batches", self.num_batches, 1)

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
        """Fold BN, measure ``E[(W̃ − W) x]`` per conv/linear layer on ``data``, subtract it from the biases."""
        if data is None:
            raise InputError("bias-correction needs data to measure the expected layer inputs: pass input "
                             "batches as data= to sdk.compress or sdk.deploy (e.g. the calibration batches)")
        model.eval()
        fold_batch_norms(model)
        layers = [(name, m) for name, m in model.named_modules() if isinstance(m, WEIGHTED)]
        shifts = measure_shifts(model, layers, {name: self.weight_error(m.weight, hints_of(m)) for name, m in layers},
                                data, self.config.num_batches, self.config.progress)
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
            for i, batch in enumerate(tqdm(data, desc="bias correction", unit="batch", disable=not progress,
                                           leave=False)):
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


@hookimpl
def register_quantizers(register):
    register(BiasCorrection)
