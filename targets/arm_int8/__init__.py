"""Targets ``arm-int8`` and ``arm-fp32``: LiteRT flatbuffers for ARM CPUs.

``arm-int8`` writes an integer ``.tflite`` (int8 per-channel symmetric
weights, int8 asymmetric activations, int32 bias, fused ReLU/ReLU6) that
LiteRT's XNNPACK delegate takes whole; the few ops XNNPACK has no int8 kernel
for (layer norm, GELU, attention, softmax, PReLU, bilinear resize) run in float
between DEQUANTIZE and QUANTIZE inside the same partition (``lowering.FLOAT_IN_INT8``); ``arm-fp32`` is the same lowering in
float, the baseline int8 is measured against.  The flatbuffer is written by
:mod:`.flatbuffer` from the LiteRT schema, no TensorFlow involved, and checked
against :mod:`.reference`, a numpy re-execution of the same file.

>>> art = sdk.deploy(model, target="arm-int8", example_inputs=(x,), calibration=batches)   # doctest: +SKIP
>>> art.verify(model).bit_exact_ratio["host"]                                               # doctest: +SKIP
1.0
"""

from __future__ import annotations

import dataclasses

from sdk import Package, Target, TensorSig, hookimpl
from sdk.config import Config, check_choice

from .runners import LiteRTHostRunner, ReferenceRunner


class _LiteRTTarget(Target):
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


class ArmInt8(_LiteRTTarget):
    """Integer LiteRT model for ARM CPUs (XNNPACK int8 kernels, float only where XNNPACK has no int8 one)."""

    name = "arm-int8"
    version = "1.0"
    default_quantizer = "ptq"
    quantized = True

    @dataclasses.dataclass(frozen=True)
    class Config(Config):
        io: str = "float"      # "float": QUANTIZE/DEQUANTIZE at the edges; "int8": integer-only I/O

        def __post_init__(self):
            check_choice("arm-int8", "io", self.io, ("float", "int8"))

    def verify_rules(self):
        # max_lsb / min_bit_exact_ratio: the runtime against the integer reference (same file, same integers).
        # min_sqnr_db: fidelity to the float model (or the golden float outputs), which the reference
        # comparison cannot give, as both run the same file.  Measured on the zoo (examples/models.py,
        # 8 randn calibration batches): 27.7 dB (mlp) to 49.4 dB (dscnn) on randn inputs, 41-48 dB on
        # the golden inputs, 37.5-47.8 dB on digits for mlp/lenet, trained or not.  20 dB (1 % noise
        # power) leaves ~8 dB below the worst of those for other models and data; a file whose outputs
        # moved by 0.2 scores -3.9 dB, and broken scales or weights land far below 20 dB too.
        return {"max_lsb": 1, "min_bit_exact_ratio": 0.99, "min_sqnr_db": 20.0}


class ArmFP32(_LiteRTTarget):
    """Float32 LiteRT model: the baseline for arm-int8."""

    name = "arm-fp32"
    version = "1.0"

    @dataclasses.dataclass(frozen=True)
    class Config(Config):
        pass

    def verify_rules(self):
        return {"max_rel_err": 1e-4}


@hookimpl
def register_targets(register):
    register(ArmInt8)
    register(ArmFP32)


@hookimpl
def register_runners(register):
    register(LiteRTHostRunner)
    register(ReferenceRunner)
