"""``fp16`` — float16 weights, with a range analysis of the activations.

Mobile GPU delegates store weights and compute activations in half precision
(Micikevicius et al., "Mixed Precision Training", 2018, describe the range
problem: float16 tops out at 65504 and flushes magnitudes below 2⁻²⁴ to zero).
``calibrate`` runs the calibration data through the captured graph in float32
and records, per node, the largest |activation| (headroom to 65504) and the
fraction of nonzero values that float16 would flush to zero.

Flushed values that only feed additions with a larger operand are not counted:
float16 rounds them away in the sum anyway (a value below 2⁻²⁵ changes a float16
sum only where the sum itself is below 2⁻¹⁴) — ConvNeXt's residual branches,
scaled by a layer scale of 1e-6 at initialisation, are the case.

A node whose output — or any input — leaves the float16 range is an error
(:class:`~sdk.errors.CalibrationError` naming the nodes) unless it is listed in
``keep_fp32`` or ``auto_fp32=True``; then it stays in float32, and only those.

>>> from plugins.quantize.fp16 import FP16
>>> FP16(auto_fp32=True).config.underflow_fraction
0.01
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from sdk import hookimpl
from sdk.base import Quantizer
from sdk.config import Config, check_bool, check_fp32_fields, check_range
from sdk.errors import CalibrationError
from sdk.graph import WEIGHTED_OPS
from sdk.encoding import float_spec
from sdk.log import progress as progress_bar
from sdk.quant import FP16_MAX, FP16_TINY, QuantPlan


class FP16(Quantizer):
    """Float16 weights and activations, with float32 kept where the range demands it."""

    name = "fp16"
    version = "1.0"
    requires_calibration = False        # the example inputs serve when no calibration is given

    @dataclasses.dataclass(frozen=True)
    class Config(Config):
        keep_fp32: tuple[str, ...] = ()      # node or module names kept in float32
        auto_fp32: bool = False              # keep every out-of-range node in float32
        underflow_fraction: float = 0.01     # flag a node when more of its nonzero outputs flush to zero
        progress: bool = True

        def __post_init__(self):
            check_fp32_fields("fp16", self)
            check_range("fp16", "underflow_fraction", self.underflow_fraction, 0.0, 1.0)
            check_bool("fp16", "progress", self.progress)

    def calibrate(self, graph, batches: Sequence[tuple]) -> QuantPlan:
        cfg = self.config
        stats: dict[str, dict] = {}
        # nodes read only by additions: their flushed values count only where the sum is tiny too
        # (below float16's smallest normal 2⁻¹⁴) or broadcast (not comparable element by element)
        add_fed = {n.name for n in graph.nodes if n.name not in graph.outputs
                   and graph.users(n.name) and all(u.op in ("add", "sub") for u in graph.users(n.name))}
        addends: dict[str, list[str]] = {}
        for name in add_fed:
            for u in graph.users(name):
                addends.setdefault(u.name, []).append(name)

        def observe(name, value, held):
            v = np.abs(value.detach().cpu().numpy().astype(np.float64))
            s = stats.setdefault(name, {"max_abs": 0.0, "nonzero": 0, "flushed": 0})
            s["max_abs"] = max(s["max_abs"], float(v.max()) if v.size else 0.0)
            s["nonzero"] += int((v > 0).sum())
            flushed = (v > 0) & (v < FP16_TINY / 2)
            if name in add_fed:         # [flushed, flushed where some sum keeps them], settled below
                held[name] = [flushed, np.zeros(v.shape, bool)]
            else:
                s["flushed"] += int(flushed.sum())
            for src in addends.get(name, ()):
                f, kept = held[src]
                kept |= f & (v < 2.0 ** -14) if v.shape == f.shape else f

        for batch in progress_bar(list(batches), desc="fp16 range analysis", unit="batch",
                                  enabled=cfg.progress):
            held: dict[str, list[np.ndarray]] = {}
            graph.run(batch, observer=lambda name, value: observe(name, value, held))
            for name, (_, kept) in held.items():
                stats[name]["flushed"] += int(kept.sum())

        layers, problems = {}, {}
        for node in graph.nodes:
            s = stats[node.name]
            flushed = s["flushed"] / s["nonzero"] if s["nonzero"] else 0.0
            in_max = max((stats[i]["max_abs"] for i in node.inputs if i in stats), default=0.0)
            layers[node.name] = {"max_abs": s["max_abs"], "headroom": FP16_MAX / s["max_abs"] if s["max_abs"] else None,
                                 "flushed_fraction": flushed, "module": node.module}
            why = []
            if s["max_abs"] > FP16_MAX:
                why.append(f"output reaches {s['max_abs']:.4g} > 65504")
            elif in_max > FP16_MAX:
                why.append(f"input reaches {in_max:.4g} > 65504")
            if flushed > cfg.underflow_fraction:
                why.append(f"{flushed:.1%} of nonzero outputs flush to zero")
            if why:
                problems[node.name] = "; ".join(why)

        keep = {n.name for n in graph.nodes if n.name in cfg.keep_fp32 or (n.module and n.module in cfg.keep_fp32)}
        unknown = set(cfg.keep_fp32) - keep - {n.module for n in graph.nodes}
        if unknown:
            raise CalibrationError(f"fp16: keep_fp32 names no node or module: {', '.join(sorted(unknown))}")
        if cfg.auto_fp32:
            keep |= set(problems)
        left = {n: why for n, why in problems.items() if n not in keep}
        if left:
            listing = "; ".join(f"{n} ({graph.node(n).module or 'no module'}): {why}" for n, why in left.items())
            raise CalibrationError(
                f"activations leave the float16 range in {len(left)} layer(s): {listing}. "
                "Pass keep_fp32=[...] with these names, or auto_fp32=True, to keep them in float32")
        for name in keep:
            layers[name]["fp32"] = True
        # the record targets check: every weight in float16, those of the layers kept in float32 in float32
        weights = {n.inputs[1]: float_spec(graph.constants[n.inputs[1]], graph.hints.get(n.inputs[1]),
                                           "float32" if n.name in keep else "float16")
                   for n in graph.nodes if n.op in WEIGHTED_OPS and len(n.inputs) > 1 and graph.is_const(n.inputs[1])}
        return QuantPlan({}, weights, method=self.name, config=cfg.to_dict(),
                         extra={"layers": layers, "keep_fp32": sorted(keep), "problems": problems})

@hookimpl
def register_quantizers(register):
    register(FP16)
