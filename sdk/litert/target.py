"""The target side every LiteRT target shares: prepare, check and pack through :mod:`.lowering`.

A target package subclasses :class:`LiteRTTarget` with its name, version and
config (``targets/arm_int8``, ``targets/arm_fp32``); ``quantized = True``
lowers with the quantizer's plan (int8), else in float.  ``targets/fp16_gpu``
keeps prepare and check and packs float16 weights itself.

>>> class ArmFP32(LiteRTTarget):                  # doctest: +SKIP
...     name, version = "arm-fp32", "1.0"
"""

from __future__ import annotations

from sdk import Package, Target, TensorSig

__all__ = ["LiteRTTarget"]


class LiteRTTarget(Target):
    """A target whose artifact is one ``model.tflite`` written by :func:`.lowering.lower`."""

    #: lower with the quantizer's plan (int8 tensors) rather than in float
    quantized = False

    def prepare(self, graph):
        # stand-alone batch norms become depthwise convs before calibration, so that ptq gives
        # their weights int8 specs like any conv's
        from .lowering import prepare

        return prepare(graph)

    def check(self, graph):
        from .lowering import check

        check(graph, self.name)

    def check_plan(self, graph, plan):
        """The contract's check, with each integer weight's storage as the lowering will write it
        (4-bit codes are INT4 only where XNNPACK runs INT4, unless ``int4="always"``)."""
        from sdk.errors import EncodingError

        from .lowering import blockwise_refusal, int_storage, litert_op, weight_mode

        rows = super().check_plan(graph, plan)
        if plan is None or not self.quantized:
            return rows
        owner = {n.inputs[1]: n for n in graph.nodes if n.op in ("conv", "linear") and len(n.inputs) > 1}
        int4 = getattr(self.config, "int4", "where-fast")
        for row in rows:
            spec, node = plan.weights.get(row["tensor"]), owner.get(row["tensor"])
            if spec is None or node is None or spec.dtype.startswith("float"):
                continue
            op = litert_op(graph, node)
            w = graph.constants.get(row["tensor"])
            k = w.shape[1] if w is not None and w.ndim == 2 else 0
            if spec.block_size:
                why = blockwise_refusal(op, plan.compute, spec, k)
                if why:
                    raise EncodingError(self.name, row["layer"], row["tensor"], row["planned"], why, [])
                row["stored_bits"] = 4
                continue
            row["stored_bits"] = 4 if int_storage(op, weight_mode(op, plan.compute), spec.code_bits, int4, k) \
                == "int4" else 8
        return rows

    def pack(self, graph, plan, calibration=None):
        from .lowering import lower

        cfg = self.config
        low = lower(graph, plan if self.quantized else None, target=self.name, io=getattr(cfg, "io", "float"),
                    int4=getattr(cfg, "int4", "where-fast"), sparsity=getattr(cfg, "sparsity", "off"))
        package = Package(files={"model.tflite": low.model}, inputs=[TensorSig.from_dict(r) for r in low.inputs],
                          outputs=[TensorSig.from_dict(r) for r in low.outputs], layers=low.layers,
                          extra=self.shipped(graph, plan, low.layers))
        # deep-compression layers: their int8 weights also ship Huffman-coded in weights.dc (sdk.weight_sharing)
        from sdk.weight_sharing import attach_container
        from sdk.zero_run import attach_container as attach_zero_run

        # zero-run plans: their layers' int8 weights also ship as zero runs + base-encoded values in weights.zr
        return attach_zero_run(attach_container(package, graph), graph, plan)

    def shipped(self, graph, plan, layers) -> dict:
        """The manifest's ``encodings`` as packed: whether each weight's zeros shipped sparse, from
        the lowering's layer rows (sparse storage is chosen where it is smaller, known once packed)."""
        rows = self.check_plan(graph, plan)
        by_weight = {r["weight"]: r for r in layers if "weight" in r}
        for row in rows:
            layer = by_weight.get(row["tensor"])
            if layer is None:
                continue
            if "sparsity" in row:
                row["sparsity"]["shipped"] = "sparse" if layer["weight_storage"].endswith("sparse") else "dense"
        return {"encodings": rows}
