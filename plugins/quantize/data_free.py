"""``data-free`` — int8 calibration without data, on inputs distilled from BatchNorm statistics.

ZeroQ (Cai et al., "ZeroQ: A Novel Zero Shot Quantization Framework", CVPR 2020):
every BatchNorm layer stores the mean and variance its input had on the training
data.  Starting from ``N(0, 1)`` noise, a batch of ``num_samples`` inputs is
optimised with Adam so that the batch statistics at each BN input match them::

    L(x) = sum over BN layers l of  ||mu_l(x) - running_mean_l||^2 / C_l + ||sigma_l(x) - sqrt(running_var_l)||^2 / C_l

(``C_l`` channels: each layer counts alike, as ZeroQ's per-layer mean squared
error does).  The "distilled data" then calibrates the int8 activation ranges
exactly as ``ptq`` does (the same observers, :func:`sdk.calibrate.activation_specs`);
weights are per-channel symmetric int8 (:func:`sdk.encoding.weight_spec`).

BatchNorm statistics live in the torch model, and the captured graph has them
folded away, so the synthesis runs on the torch model: :meth:`DataFree.calibration_data`
(``model, example_inputs`` -> calibration batches, or :class:`~sdk.errors.InputError`
for a model without BatchNorm).  Calibration data the caller passes is used as given.

>>> from plugins.quantize.data_free import DataFree
>>> DataFree(num_samples=8, steps=100).config.activation_observer
'mse'
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import torch
from torch import nn

from sdk import hookimpl
from sdk.base import Quantizer
from sdk.calibrate import activation_specs, weight_specs
from sdk.config import Config, check_choice, check_range
from sdk.encoding import weight_spec
from sdk.errors import InputError
from sdk.log import progress as progress_bar
from sdk.quant import OBSERVERS, QuantPlan

__all__ = ["DataFree", "batch_norms", "bn_statistics_loss", "synthesize"]


def batch_norms(model: nn.Module) -> list[tuple[str, nn.modules.batchnorm._BatchNorm]]:
    """The BatchNorm layers of ``model`` that hold running statistics, by name."""
    return [(name, m) for name, m in model.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None]


class _BNInputs:
    """Forward hooks recording each BN layer's input batch statistics while a forward runs."""

    def __init__(self, bns):
        self.stats: list[tuple[torch.Tensor, torch.Tensor, nn.Module]] = []
        self.handles = [m.register_forward_hook(self._hook) for _, m in bns]

    def _hook(self, module, args, output):
        x = args[0].transpose(0, 1).flatten(1)           # channels first, then every other axis
        self.stats.append((x.mean(1), x.var(1, unbiased=False), module))

    def remove(self):
        for h in self.handles:
            h.remove()


def bn_statistics_loss(model: nn.Module, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
    """ZeroQ's loss of ``inputs`` on ``model`` (eval mode): per BN layer, the mean squared
    distance of the batch mean and standard deviation from the stored running ones."""
    bns = batch_norms(model)
    rec = _BNInputs(bns)
    try:
        model(*inputs)
    finally:
        rec.remove()
    loss = inputs[0].new_zeros(())
    for mean, var, bn in rec.stats:
        loss = loss + (mean - bn.running_mean).pow(2).mean() \
            + ((var + bn.eps).sqrt() - (bn.running_var + bn.eps).sqrt()).pow(2).mean()
    return loss


def synthesize(model: nn.Module, example_inputs: Sequence[torch.Tensor], *, num_samples: int = 16,
               steps: int = 200, lr: float = 0.1, seed: int = 0,
               progress: bool = True) -> tuple[tuple[torch.Tensor, ...], list[float]]:
    """``num_samples`` inputs shaped like ``example_inputs`` (batch axis aside) whose BN batch
    statistics match ``model``'s running ones, and the loss at every step (``steps + 1``
    values: the initial noise's first).  ``model`` is left as it was (mode, weights, grads).

    >>> x, losses = synthesize(model, (example,), steps=50)          # doctest: +SKIP
    """
    bns = batch_norms(model)
    if not bns:
        raise InputError(f"data-free needs BatchNorm statistics and {type(model).__name__} has no BatchNorm "
                         "layer with running statistics; pass calibration data and use ptq")
    bad = [i for i, x in enumerate(example_inputs) if not x.is_floating_point()]
    if bad:
        raise InputError(f"data-free synthesises float inputs; input {bad[0]} is {example_inputs[bad[0]].dtype}: "
                         "pass calibration data and use ptq")
    gen = torch.Generator().manual_seed(seed)
    xs = [torch.randn((num_samples,) + tuple(x.shape[1:]), generator=gen).requires_grad_() for x in example_inputs]
    opt = torch.optim.Adam(xs, lr=lr)
    losses: list[float] = []
    was_training = model.training
    model.eval()                       # BN normalises with its running statistics and leaves them alone
    try:
        for step in progress_bar(range(steps + 1), desc="data-free: distilling inputs", unit="step",
                                 enabled=progress):
            loss = bn_statistics_loss(model, xs)
            losses.append(float(loss.detach()))
            if step == steps:
                break
            # gradients of the inputs only: the model's parameters get no .grad
            grads = torch.autograd.grad(loss, xs)
            opt.zero_grad(set_to_none=True)
            for x, g in zip(xs, grads):
                x.grad = g
            opt.step()
    finally:
        model.train(was_training)
    return tuple(x.detach() for x in xs), losses


class DataFree(Quantizer):
    """Int8 post-training quantization calibrated on inputs distilled from BN statistics (ZeroQ)."""

    name = "data-free"
    version = "1.0"

    @dataclasses.dataclass(frozen=True)
    class Config(Config):
        num_samples: int = 16             # distilled inputs, optimised as one batch (its BN statistics)
        steps: int = 200                  # Adam steps
        lr: float = 0.1
        seed: int = 0                     # of the initial N(0, 1) noise
        activation_observer: str = "mse"  # as ptq
        percentile: float = 99.99
        progress: bool = True

        def __post_init__(self):
            check_range("data-free", "num_samples", self.num_samples, 2)     # a batch statistic needs two
            check_range("data-free", "steps", self.steps, 0)
            check_range("data-free", "lr", self.lr, 0.0, lo_open=True)
            check_choice("data-free", "activation_observer", self.activation_observer, OBSERVERS)
            check_range("data-free", "percentile", self.percentile, 50.0, 100.0, lo_open=True)

    def calibration_data(self, model: nn.Module, example_inputs: Sequence[torch.Tensor]) -> list[tuple]:
        """The distilled inputs as calibration batches, each shaped like ``example_inputs``."""
        cfg = self.config
        xs, _ = synthesize(model, example_inputs, num_samples=cfg.num_samples, steps=cfg.steps, lr=cfg.lr,
                           seed=cfg.seed, progress=cfg.progress)
        size = max(1, int(example_inputs[0].shape[0]))
        return [tuple(x[i:i + size] for x in xs) for i in range(0, cfg.num_samples, size)]

    def calibrate(self, graph, batches: Sequence[tuple]) -> QuantPlan:
        cfg = self.config
        acts = activation_specs(graph, batches, observer=cfg.activation_observer, percentile=cfg.percentile,
                                progress=cfg.progress)
        weights = weight_specs(graph, lambda w, hint, node: weight_spec(w, hint))
        return QuantPlan(acts, weights, method=self.name, config=cfg.to_dict())


@hookimpl
def register_quantizers(register):
    register(DataFree)
