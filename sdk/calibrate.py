"""Calibration shared by the post-training quantizers: observe activations, spec the weights.

:func:`activation_specs` runs calibration batches through a captured graph and
turns each value's observed range (or a range a torch-side stage learned, QAT
or LSQ: :func:`sdk.encoding.annotate` with ``tensor="output"``) into an int8
:class:`~sdk.quant.QuantSpec`; :func:`weight_specs` gives every conv/linear
weight the spec a quantizer's function returns.  ``ptq`` and ``int4`` use both,
``dynamic`` only the second (its activations are quantized at run time).

>>> from sdk.calibrate import activation_specs, weight_specs      # doctest: +SKIP
>>> acts = activation_specs(graph, batches, observer="mse")         # doctest: +SKIP
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from .graph import WEIGHTED_OPS, Graph
from .log import progress as progress_bar
from .quant import QuantSpec, make_observer

__all__ = ["activation_ranges", "activation_specs", "weight_specs"]


def activation_ranges(graph: Graph, batches: Sequence[tuple], *, observer: str = "mse",
                      num_batches: int | None = None, progress: bool = True, transform: Callable | None = None,
                      **options) -> dict[str, tuple]:
    """``(lo, hi)`` of every graph input and node output, from ``observer`` (with ``options``) over
    ``batches`` (at most ``num_batches``), each value passed through ``transform`` first (``np.abs``
    for symmetric ranges); a learned output range in ``graph.hints`` (QAT, LSQ) wins."""
    observers = {name: make_observer(observer, **options) for name, _, _ in graph.inputs}
    observers.update({n.name: make_observer(observer, **options) for n in graph.nodes})
    used = list(batches)[:num_batches] if num_batches else list(batches)

    def observe(name, value):
        if name in observers:
            v = value.detach().cpu().numpy()
            observers[name].update(transform(v) if transform is not None else v)

    for batch in progress_bar(used, desc="calibrating", unit="batch", enabled=progress):
        graph.run(batch, observer=observe)
    ranges = {}
    for name, obs in observers.items():
        learned = graph.hints.get(name)
        ranges[name] = learned.range if learned is not None and learned.range is not None else obs.range()
    return ranges


def activation_specs(graph: Graph, batches: Sequence[tuple], *, observer: str = "mse", percentile: float = 99.99,
                     symmetric: bool = False, dtype: str = "int8", num_batches: int | None = None,
                     progress: bool = True) -> dict[str, QuantSpec]:
    """One spec per graph input and node output from :func:`activation_ranges`."""
    opts = {"percentile": {"percentile": percentile}, "mse": {"symmetric": symmetric, "dtype": dtype}}.get(observer, {})
    ranges = activation_ranges(graph, batches, observer=observer, num_batches=num_batches, progress=progress, **opts)
    return {name: QuantSpec.from_range(lo, hi, dtype=dtype, symmetric=symmetric) for name, (lo, hi) in ranges.items()}


def weight_specs(graph: Graph, spec: Callable[[np.ndarray, object, object], QuantSpec]) -> dict[str, QuantSpec]:
    """``spec(weight, hint, node)`` for the constant weight of every conv / linear node."""
    return {node.inputs[1]: spec(graph.constants[node.inputs[1]], graph.hints.get(node.inputs[1]), node)
            for node in graph.nodes if node.op in WEIGHTED_OPS and graph.is_const(node.inputs[1])}
