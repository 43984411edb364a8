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
from tqdm.auto import tqdm

from .graph import WEIGHTED_OPS, Graph
from .quant import QuantSpec, make_observer

__all__ = ["activation_specs", "weight_specs"]


def activation_specs(graph: Graph, batches: Sequence[tuple], *, observer: str = "mse", percentile: float = 99.99,
                     symmetric: bool = False, dtype: str = "int8", num_batches: int | None = None,
                     progress: bool = True) -> dict[str, QuantSpec]:
    """One spec per graph input and node output, from ``observer`` over ``batches`` (at most
    ``num_batches`` of them); a learned output range in ``graph.hints`` wins over the observed one."""
    opts = {"percentile": {"percentile": percentile}, "mse": {"symmetric": symmetric, "dtype": dtype}}.get(observer, {})
    observers = {name: make_observer(observer, **opts) for name, _, _ in graph.inputs}
    observers.update({n.name: make_observer(observer, **opts) for n in graph.nodes})
    used = list(batches)[:num_batches] if num_batches else list(batches)

    def observe(name, value):
        if name in observers:
            observers[name].update(value.detach().cpu().numpy())

    for batch in tqdm(used, desc="calibrating", unit="batch", disable=not progress, leave=False):
        graph.run(batch, observer=observe)
    specs = {}
    for name, obs in observers.items():
        learned = graph.hints.get(name)
        lo, hi = learned.range if learned is not None and learned.range is not None else obs.range()
        specs[name] = QuantSpec.from_range(lo, hi, dtype=dtype, symmetric=symmetric)
    return specs


def weight_specs(graph: Graph, spec: Callable[[np.ndarray, object, object], QuantSpec]) -> dict[str, QuantSpec]:
    """``spec(weight, hint, node)`` for the constant weight of every conv / linear node."""
    return {node.inputs[1]: spec(graph.constants[node.inputs[1]], graph.hints.get(node.inputs[1]), node)
            for node in graph.nodes if node.op in WEIGHTED_OPS and graph.is_const(node.inputs[1])}
