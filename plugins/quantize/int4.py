"""``int4`` — 4-bit weights (per channel or grouped), int8 or float activations.

Weights are quantized symmetrically to the narrow 4-bit grid [-7, 7] (so that
``-w`` is representable), one scale per output channel, or per group of
``group_size`` consecutive weights of a channel ("grouped", as GPTQ/AWQ-style
weight-only schemes use; targets that carry only per-channel scales refuse it
with :class:`~sdk.errors.EncodingError`).  Activations are int8 with
calibrated ranges (``activations: int8``, the ``ptq`` observers) or float,
quantized at run time (``activations: float``: dynamic range, no calibration
data used).

On ``arm-int8`` the fully connected layers store INT4, two codes a byte, and run
in XNNPACK's int8 x int4 (or dynamic qd8 x int4) kernels; convolutions keep
their 4-bit codes exactly in int8 storage unless the target is told
``int4="always"`` (then INT4 too: smaller, but builtin kernels that unpack the
filter on every call).  Sizes and latency: README "Encodings".

>>> from plugins.quantize.int4 import Int4
>>> Int4(group_size=64).config.granularity
'per-channel'
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

from sdk import hookimpl
from sdk.base import Quantizer
from sdk.calibrate import activation_specs, weight_specs
from sdk.config import Config, check_choice, check_range
from sdk.encoding import weight_spec
from sdk.quant import OBSERVERS, QuantPlan


class Int4(Quantizer):
    """4-bit symmetric weights, per channel or grouped; int8 (calibrated) or float activations."""

    name = "int4"
    version = "1.0"

    @dataclasses.dataclass(frozen=True)
    class Config(Config):
        granularity: str = "per-channel"         # or grouped (group_size weights per scale)
        group_size: int = 32
        activations: str = "int8"                # or float: quantized at run time (dynamic range)
        activation_observer: str = "mse"
        num_batches: int | None = None
        progress: bool = True

        def __post_init__(self):
            check_choice("int4", "granularity", self.granularity, ("per-channel", "grouped"))
            check_range("int4", "group_size", self.group_size, 1)
            check_choice("int4", "activations", self.activations, ("int8", "float"))
            check_choice("int4", "activation_observer", self.activation_observer, OBSERVERS)
            if self.num_batches is not None:
                check_range("int4", "num_batches", self.num_batches, 1)

    @property
    def requires_calibration(self) -> bool:       # float activations need no data
        return self.config.activations == "int8"

    def calibrate(self, graph, batches: Sequence[tuple]) -> QuantPlan:
        cfg = self.config
        grouped = cfg.granularity == "grouped"
        weights = weight_specs(graph, lambda w, hint, node: weight_spec(
            w, hint, granularity="blockwise" if grouped else "per-channel", scheme="symmetric", bits=4,
            block_size=cfg.group_size if grouped else None))
        if cfg.activations == "float":
            return QuantPlan({}, weights, method=self.name, config=cfg.to_dict(), compute="dynamic")
        acts = activation_specs(graph, batches, observer=cfg.activation_observer, num_batches=cfg.num_batches,
                                progress=cfg.progress)
        return QuantPlan(acts, weights, method=self.name, config=cfg.to_dict())


@hookimpl
def register_quantizers(register):
    register(Int4)
