"""``ptq`` — post-training integer quantization with calibrated (offline) ranges.

The weights' ranges come from the weights themselves; the activations' from
observers that watch representative data flow through the captured graph
(Jacob et al., "Quantization and Training of Neural Networks for Efficient
Integer-Arithmetic-Only Inference", CVPR 2018; Krishnamoorthi, "Quantizing deep
convolutional networks for efficient inference", 2018).  Observers:
``minmax`` (running extremes), ``moving-minmax`` (EMA of per-batch extremes),
``percentile`` (outlier clipping), ``mse`` (the clipping range with the least
mean squared quantization error) and ``entropy`` (the KL-divergence threshold of
TensorRT's calibrator, Migacz 2017); see :mod:`sdk.quant`.

The default is ``mse``: measured side by side (benchmarks/bench_vs_peers.py, 32
calibration batches, SQNR vs float on 8 inputs) it gave ResNet-18 43.8 dB
(minmax 43.1, percentile 43.0) and MobileNetV2 6.8 dB (6.1, 6.6); percentile
wins on DS-CNN (49.9 vs 47.4) and MobileNetV3 (10.9 vs 9.7), so a recipe may
pick it.  Bias correction on top gained at most 0.8 dB and lost 0.7 on one
model, for 2-5 s more deploy time: it stays a recipe stage.

>>> from plugins.quantize.ptq import PTQ
>>> PTQ(activation_observer="percentile", percentile=99.9).config.weight_granularity
'per-channel'
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np
from sdk import hookimpl
from sdk.base import Quantizer
from sdk.config import Config, check_choice, check_range
from sdk.calibrate import activation_specs, weight_specs
from sdk.encoding import float_spec, weight_spec
from sdk.quant import OBSERVERS, QuantPlan, QuantSpec


class PTQ(Quantizer):
    """Calibrated post-training quantization (int8 by default)."""

    name = "ptq"
    version = "1.0"

    @dataclasses.dataclass(frozen=True)
    class Config(Config):
        activation_observer: str = "mse"         # measured best on ResNet-18 / MobileNetV2 (README, Performance)
        percentile: float = 99.99
        weight_granularity: str = "per-channel"   # or per-tensor, blockwise (block_size weights per scale)
        weight_scheme: str = "symmetric"
        weight_bits: int = 8                      # 4 or 2: codes of that width (targets that carry them)
        block_size: int = 32
        int4_layers: tuple[str, ...] = ()        # mixed precision: these modules (or their children) 4-bit
        float_layers: tuple[str, ...] = ()       # these compute in float inside the integer graph
        activation_scheme: str = "asymmetric"
        dtype: str = "int8"
        num_batches: int | None = None     # use at most this many calibration batches
        progress: bool = True

        def __post_init__(self):
            check_choice("ptq", "activation_observer", self.activation_observer, OBSERVERS)
            check_range("ptq", "percentile", self.percentile, 50.0, 100.0, lo_open=True)
            check_choice("ptq", "weight_granularity", self.weight_granularity,
                         ("per-channel", "per-tensor", "blockwise"))
            check_choice("ptq", "weight_bits", self.weight_bits, (2, 4, 8))
            check_range("ptq", "block_size", self.block_size, 1)
            check_choice("ptq", "weight_scheme", self.weight_scheme, ("symmetric", "asymmetric"))
            check_choice("ptq", "activation_scheme", self.activation_scheme, ("asymmetric", "symmetric"))
            check_choice("ptq", "dtype", self.dtype, ("int8",))
            if self.num_batches is not None:
                check_range("ptq", "num_batches", self.num_batches, 1)

    def weight_spec(self, w: np.ndarray, hint=None) -> QuantSpec:
        """Spec of one weight tensor [out, ...] (:func:`sdk.encoding.weight_spec`): symmetric
        weights use the narrow range [-127, 127] so that -w is always representable; a
        torch-side hint (codebook, bit width, sparsity) is honoured."""
        cfg = self.config
        return weight_spec(w, hint, granularity=cfg.weight_granularity, scheme=cfg.weight_scheme, dtype=cfg.dtype,
                           bits=None if cfg.weight_bits == 8 else cfg.weight_bits, block_size=cfg.block_size)

    def layer_spec(self, w: np.ndarray, hint, module: str) -> QuantSpec:
        """:meth:`weight_spec`, or per layer what ``int4_layers`` / ``float_layers`` ask for (one
        artifact mixing int8, int4 and float layers)."""
        cfg = self.config

        def named(names):
            return any(module == n or module.startswith(n + ".") for n in names)

        if named(cfg.float_layers):
            return float_spec(w, hint)
        if named(cfg.int4_layers):
            return weight_spec(w, hint, granularity=cfg.weight_granularity, scheme=cfg.weight_scheme,
                               dtype=cfg.dtype, bits=4, block_size=cfg.block_size)
        return self.weight_spec(w, hint)

    def calibrate(self, graph, batches: Sequence[tuple]) -> QuantPlan:
        cfg = self.config
        acts = activation_specs(graph, batches, observer=cfg.activation_observer, percentile=cfg.percentile,
                                symmetric=cfg.activation_scheme == "symmetric", dtype=cfg.dtype,
                                num_batches=cfg.num_batches, progress=cfg.progress)
        weights = weight_specs(graph, lambda w, hint, node: self.layer_spec(w, hint, node.module or node.name))
        return QuantPlan(acts, weights, method=self.name, config=cfg.to_dict())


@hookimpl
def register_quantizers(register):
    register(PTQ)
