"""Target ``arm-fp32``: a float32 LiteRT flatbuffer for ARM CPUs, the baseline ``arm-int8`` is measured against.

The same lowering as ``arm-int8`` (:mod:`sdk.litert.lowering`) without
quantization: float32 weights and activations, 4-D activations stored NHWC,
run by LiteRT's XNNPACK delegate in float.

Runners: ``host`` (LiteRT here) and ``reference`` (the SDK's numpy execution
of the same file in float64); ``qemu-aarch64`` runs it on an emulated ARM64
Linux.

>>> art = sdk.deploy(model, target="arm-fp32", example_inputs=(x,))    # doctest: +SKIP
>>> art.verify(model).max_rel_err["host"] < 1e-4                      # doctest: +SKIP
True
"""

from __future__ import annotations

import dataclasses

from sdk import hookimpl
from sdk.config import Config, check_choice
from sdk.cost import ARM_A76
from sdk.encoding import Carries
from sdk.litert import qemu, runners
from sdk.litert.target import LiteRTTarget

NAME = "arm-fp32"


class ArmFP32(LiteRTTarget):
    """Float32 LiteRT model: the baseline for arm-int8."""

    name = NAME
    version = "1.0"
    # codebooks travel as the float values they are; zeros sparse behind DENSIFY (sparsity="auto")
    carries = (Carries("float32", sparsity=("unstructured", "block")),)
    device = ARM_A76

    @dataclasses.dataclass(frozen=True)
    class Config(Config):
        sparsity: str = "auto"     # "auto": weights with zeros stored sparse where smaller; "off": dense

        def __post_init__(self):
            check_choice(NAME, "sparsity", self.sparsity, ("auto", "off"))

    def verify_rules(self):
        return {"max_rel_err": 1e-4}


class HostRunner(runners.LiteRTHostRunner):
    """LiteRT on this machine with its default XNNPACK delegate, 1 thread."""

    targets = (NAME,)


class ReferenceRunner(runners.ReferenceRunner):
    """The SDK's numpy reference of the float32 flatbuffer, evaluated in float64."""

    targets = (NAME,)


class QemuRunner(qemu.LiteRTQemuRunner):
    """``model.tflite`` in the aarch64 LiteRT on an emulated ARM64 Linux (qemu-aarch64): XNNPACK's NEON fp32 kernels."""

    targets = (NAME,)


@hookimpl
def register_targets(register):
    register(ArmFP32)


@hookimpl
def register_runners(register):
    register(HostRunner)
    register(ReferenceRunner)
    register(QemuRunner)
