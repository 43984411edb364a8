"""``dynamic`` — integer weights, activations quantized at run time (dynamic-range quantization).

Only the weights are quantized offline (symmetric, per output channel or per
tensor, 8 or 4 bits); the activations stay float in the artifact and each
conv / linear quantizes its input at run time from that input's own range
(XNNPACK's "qd8" kernels: per row asymmetric int8, int32 accumulation, a float
epilogue; Krishnamoorthi 2018, §3.3; TFLite's "dynamic range quantization").
No calibration data is needed: a range measured on the input being processed
replaces a calibrated one, which helps models whose activation ranges vary per
input (RNNs, attention) and saves the calibration pass.

``mode: weight-only`` instead dequantizes the weights to float once (at model
load) and computes in float: the file is as small, the speed that of float.
Depthwise convolutions always take that path (XNNPACK has no dynamic-range
depthwise kernel; the builtin one is slower than float).

Measured on this machine (benchmarks/bench_encodings.py, README "Encodings"):
latency and SQNR of a conv net and an MLP side by side with arm-int8 and arm-fp32.

>>> from plugins.quantize.dynamic import Dynamic
>>> Dynamic(weight_bits=4).config.mode
'dynamic'
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

from sdk import hookimpl
from sdk.base import Quantizer
from sdk.calibrate import weight_specs
from sdk.config import Config, check_choice
from sdk.encoding import weight_spec
from sdk.quant import QuantPlan


class Dynamic(Quantizer):
    """Integer weights with float activations quantized at run time (or weight-only)."""

    name = "dynamic"
    version = "1.0"
    requires_calibration = False

    @dataclasses.dataclass(frozen=True)
    class Config(Config):
        weight_bits: int = 8                     # or 4 (INT4 where the target runs it)
        weight_granularity: str = "per-channel"  # or per-tensor
        mode: str = "dynamic"                    # or weight-only: weights dequantized once, float compute

        def __post_init__(self):
            check_choice("dynamic", "weight_bits", self.weight_bits, (4, 8))
            check_choice("dynamic", "weight_granularity", self.weight_granularity, ("per-channel", "per-tensor"))
            check_choice("dynamic", "mode", self.mode, ("dynamic", "weight-only"))

    def calibrate(self, graph, batches: Sequence[tuple]) -> QuantPlan:
        cfg = self.config
        bits = None if cfg.weight_bits == 8 else cfg.weight_bits
        weights = weight_specs(graph, lambda w, hint, node: weight_spec(
            w, hint, granularity=cfg.weight_granularity, scheme="symmetric", bits=bits))
        return QuantPlan({}, weights, method=self.name, config=cfg.to_dict(), compute=cfg.mode)


@hookimpl
def register_quantizers(register):
    register(Dynamic)
