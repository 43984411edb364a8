"""Per-layer cost model of a target, usable before packing.

Each target declares a :class:`DeviceProfile` (``Target.device``): the
throughput of its arithmetic per number format, its memory bandwidth and the
energy of one multiply-accumulate and of one byte moved.  :func:`layer_costs`
walks a captured graph with a plan (or a graph alone: float) and gives, per
layer, the bytes of its weights as they would be stored, its MACs (BOPs for
binary layers), and a roofline estimate::

    latency = max(MACs / throughput(format), bytes moved / bandwidth) + overhead
    energy  = MACs · E_mac(format) + weight bytes · E_dram + activation bytes · E_sram

These are estimates on the declared profile, for planning under a budget
(``mixed-precision``, ``energy-aware``); measured latency per runner is in
``profile.json`` ``latency_ms``.  Energies per operation follow Horowitz,
"Computing's energy problem" (ISSCC 2014, 45 nm): 8-bit integer MAC 0.23 pJ,
16-bit float 1.5 pJ, 32-bit float 4.6 pJ, DRAM 160 pJ/byte, small SRAM
1.25 pJ/byte.

>>> import torch, sdk.graph as G
>>> g = G.capture(torch.nn.Sequential(torch.nn.Linear(64, 32)), (torch.randn(1, 64),))
>>> rows = layer_costs(g, None, ARM_A76)
>>> rows[0]["macs"], rows[0]["weight_bytes"]
(2048, 8320)
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

#: energy of one MAC by number format, picojoules (Horowitz 2014; binary: one XNOR+popcount lane)
PJ_PER_MAC = {"int8": 0.23, "float16": 1.5, "float32": 4.6, "binary": 0.01}
PJ_PER_DRAM_BYTE = 160.0
PJ_PER_SRAM_BYTE = 1.25


@dataclasses.dataclass(frozen=True)
class DeviceProfile:
    """Nominal figures of the device a target ships to (see the module docstring)."""

    name: str
    macs_per_s: dict[str, float]          # sustained MAC/s by format (binary: bit-ops/s)
    bytes_per_s: float                    # memory bandwidth
    overhead_us: float = 1.0              # fixed cost of one op (dispatch)

    def to_dict(self) -> dict:
        return {"name": self.name, "macs_per_s": dict(self.macs_per_s), "bytes_per_s": self.bytes_per_s,
                "overhead_us": self.overhead_us}


#: one Cortex-A76 core at 2.4 GHz, NEON: int8 SDOT 32 MAC/cycle, fp32 FMA 8, fp16 16; ~half sustained
ARM_A76 = DeviceProfile("Cortex-A76, 1 core, 2.4 GHz", {"int8": 38e9, "float16": 19e9, "float32": 9.6e9,
                                                       "binary": 300e9}, 10e9)
#: a mobile GPU of the Adreno 6xx / Mali-G7x class, fp16 ~0.5 TMAC/s sustained
MOBILE_GPU = DeviceProfile("mobile GPU (Adreno 6xx / Mali-G7x class)", {"float16": 500e9, "float32": 250e9,
                                                                       "int8": 250e9}, 25e9, overhead_us=5.0)


def layer_costs(graph: Any, plan: Any, device: DeviceProfile, *, float_format: str = "float32",
                stored_bits: dict[str, int] | None = None) -> list[dict]:
    """One row per graph node: ``name``, ``module``, ``op``, ``format``, ``params``,
    ``weight_bytes`` (as stored: planned bits, or the float format), ``macs``,
    ``bops`` (0 here: a binary target counts its own), ``est_latency_us``, ``est_energy_uj``.
    ``stored_bits`` (weight name → bits, from :func:`sdk.encoding.check_plan`) sizes weights as
    the target stores them; otherwise as planned."""
    from .graph import WEIGHTED_OPS, macs

    act_bytes = 1 if plan is not None and plan.activations else (2 if float_format == "float16" else 4)
    rows = []
    for node in graph.nodes:
        weight = plan.weights.get(node.inputs[1]) if plan is not None and node.op in WEIGHTED_OPS \
            and len(node.inputs) > 1 else None
        # the layer's arithmetic: int8 for integer weights, else its weights' float type
        fmt = float_format if weight is None else ("int8" if not weight.dtype.startswith("float") else weight.dtype)
        wbytes, params = 0, 0
        for i, name in enumerate(node.inputs):
            if not graph.is_const(name):
                continue
            n = int(graph.constants[name].size)
            params += n
            if i == 1 and weight is not None and fmt == "int8":
                wbytes += math.ceil(n * (stored_bits or {}).get(name, min(weight.code_bits, 8)) / 8)
            elif i == 2 and fmt == "int8":
                wbytes += 4 * n                                  # int32 bias
            else:
                wbytes += n * (2 if fmt == "float16" else 4)
        m = macs(graph, node)
        out_bytes = math.prod(node.shape) * act_bytes if node.shape else 0
        latency_us, energy_uj = roofline(device, fmt, m, wbytes, out_bytes)
        rows.append({"name": node.name, "module": node.module, "op": node.op, "format": fmt,
                     "params": params, "weight_bytes": int(wbytes), "macs": int(m), "bops": 0,
                     "est_latency_us": latency_us, "est_energy_uj": energy_uj})
    return rows


def roofline(device: DeviceProfile, fmt: str, ops: int, weight_bytes: int, out_bytes: int) -> tuple[float, float]:
    """``(est_latency_us, est_energy_uj)`` of one layer on ``device`` by the module docstring's
    formulas: ``ops`` MACs in ``fmt`` (bit-ops when ``fmt`` is ``binary``), ``weight_bytes``
    read from DRAM, ``out_bytes`` written to SRAM.  For targets that count their layers
    themselves (a binary lowering).

    >>> roofline(ARM_A76, "binary", 300_000, 0, 0)
    (2.0, 0.003)
    """
    rate = device.macs_per_s.get(fmt, device.macs_per_s.get("float32", 1e9))
    seconds = max(ops / rate, (weight_bytes + out_bytes) / device.bytes_per_s)
    energy_pj = ops * PJ_PER_MAC[fmt] + weight_bytes * PJ_PER_DRAM_BYTE + out_bytes * PJ_PER_SRAM_BYTE
    return round(seconds * 1e6 + device.overhead_us, 3), round(energy_pj * 1e-6, 6)


def totals(rows: list[dict]) -> dict:
    """Sums of a :func:`layer_costs` table."""
    return {"weight_bytes": sum(r["weight_bytes"] for r in rows), "macs": sum(r["macs"] for r in rows),
            "bops": sum(r["bops"] for r in rows),
            "est_latency_ms": round(sum(r["est_latency_us"] for r in rows) / 1e3, 4),
            "est_energy_mj": round(sum(r["est_energy_uj"] for r in rows) / 1e3, 6)}
