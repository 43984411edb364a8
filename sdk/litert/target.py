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

    def pack(self, graph, plan, calibration=None):
        from .lowering import lower

        io = getattr(self.config, "io", "float")
        low = lower(graph, plan if self.quantized else None, target=self.name, io=io)
        return Package(files={"model.tflite": low.model}, inputs=[TensorSig.from_dict(r) for r in low.inputs],
                       outputs=[TensorSig.from_dict(r) for r in low.outputs], layers=low.layers)
