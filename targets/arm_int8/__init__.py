"""Target ``arm-int8``: an integer LiteRT flatbuffer for ARM CPUs.

``model.tflite`` holds int8 per-channel symmetric weights, int8 asymmetric
activations, int32 bias and fused ReLU/ReLU6, which LiteRT's XNNPACK delegate
takes whole; the few ops XNNPACK has no int8 kernel for (layer norm, GELU,
attention, softmax, PReLU, bilinear resize) run in float between DEQUANTIZE and
QUANTIZE inside the same partition (:data:`sdk.litert.lowering.FLOAT_IN_INT8`).
``arm-fp32`` (``targets/arm_fp32``) is the same lowering in float, the
baseline int8 is measured against.  The flatbuffer is written by
:mod:`sdk.litert.flatbuffer` from the LiteRT schema, no TensorFlow involved,
and checked against :mod:`sdk.litert.reference`, a numpy re-execution of the
same file with the runtime's integer arithmetic.

Beyond int8: fully connected layers with 4-bit codes store INT4 (XNNPACK's int8 x int4
kernel; ``int4="always"`` makes convolutions INT4 too, in builtin kernels); ``dynamic`` and
``int4`` plans with float activations run XNNPACK's dynamic-range kernels (inputs quantized per
row at run time), weight-only plans dequantize at load; ``sparsity="auto"`` stores pruned
convolution filters sparse behind DENSIFY.  ``sdk.litert.lowering.KERNELS`` lists what runs where.

Runners: ``host`` (LiteRT here) and ``reference`` (the integer reference);
``qemu-aarch64`` runs the same file on an emulated ARM64 Linux.

>>> art = sdk.deploy(model, target="arm-int8", example_inputs=(x,), calibration=batches)   # doctest: +SKIP
>>> art.verify(model).bit_exact_ratio["host"]                                               # doctest: +SKIP
1.0
"""

from __future__ import annotations

import dataclasses

from sdk import hookimpl
from sdk.config import Config, check_choice
from sdk.cost import ARM_A76
from sdk.encoding import Carries
from sdk.litert import qemu, runners
from sdk.litert.target import LiteRTTarget

NAME = "arm-int8"


class ArmInt8(LiteRTTarget):
    """Integer LiteRT model for ARM CPUs (XNNPACK int8 kernels, float only where XNNPACK has no int8 one)."""

    name = NAME
    version = "1.0"
    default_quantizer = "ptq"
    quantized = True
    # XNNPACK's int8 conv/FC kernels: symmetric (zero point 0) per-tensor or per-channel int8 weights,
    # INT4 (two codes a byte) for fully connected layers; narrower codes (2-bit, codebooks) travel exactly
    # in the next wider one; zeros ship sparse behind DENSIFY where XNNPACK folds it (convolutions), or as
    # float weights of a mixed-precision plan
    carries = (Carries("int8", bits=(4, 8), granularity=("per-tensor", "per-channel"), symmetric=True,
                       sparsity=("unstructured", "block")),
               # blockwise: dynamic-range fully connected layers only (LiteRTTarget.check_plan refuses the rest)
               Carries("int8", bits=(4,), granularity=("blockwise",), ops=("linear",), symmetric=True),
               Carries("float32", sparsity=("unstructured", "block")))
    activation_dtypes = ("int8",)
    needs_activation_specs = True
    computes = ("static", "dynamic", "weight-only")
    device = ARM_A76

    @dataclasses.dataclass(frozen=True)
    class Config(Config):
        io: str = "float"          # "float": QUANTIZE/DEQUANTIZE at the edges; "int8": integer-only I/O
        int4: str = "where-fast"   # "always": INT4 convolutions too (smaller, builtin kernels: slower)
        sparsity: str = "auto"     # "auto": weights with zeros stored sparse where smaller; "off": dense

        def __post_init__(self):
            check_choice(NAME, "io", self.io, ("float", "int8"))
            check_choice(NAME, "int4", self.int4, ("where-fast", "always"))
            check_choice(NAME, "sparsity", self.sparsity, ("auto", "off"))

    def verify_rules(self):
        # max_lsb / min_bit_exact_ratio: the runtime against the integer reference (same file, same integers).
        # min_sqnr_db: fidelity to the float model (or the golden float outputs), which the reference
        # comparison cannot give, as both run the same file.  Measured on the zoo (examples/models.py,
        # 8 randn calibration batches): 27.7 dB (mlp) to 49.4 dB (dscnn) on randn inputs, 41-48 dB on
        # the golden inputs, 37.5-47.8 dB on digits for mlp/lenet, trained or not.  20 dB (1 % noise
        # power) leaves ~8 dB below the worst of those for other models and data; a file whose outputs
        # moved by 0.2 scores -3.9 dB, and broken scales or weights land far below 20 dB too.
        return {"max_lsb": 1, "min_bit_exact_ratio": 0.99, "min_sqnr_db": 20.0}

    def rules_for(self, quantization):
        rules = dict(self.verify_rules())
        q = quantization or {}
        if q.get("weight_bits", 8) <= 4:
            # 4-bit weights cost ~24 dB of weight SQNR against 8-bit: measured 21-27 dB on the zoo (random
            # init, per channel), 15.5 dB on a 3-layer random 256-wide MLP; 10 dB still catches broken
            # scales or codes (those land below 0 dB)
            rules["min_sqnr_db"] = 10.0
        if q.get("compute", "static") != "static":
            # dynamic / weight-only plans: float outputs.  Dynamic-range FC and conv layers are bit-exact
            # with the reference (sdk.litert.hybrid), but weight-only layers and the float ops between them
            # run in XNNPACK's float32 kernels, which the reference evaluates in float64: max_ref_rel_err
            # bounds that (1e-4 is arm-fp32's bound against torch); the int8 LSB rules do not apply
            return {"max_ref_rel_err": 1e-4, "min_sqnr_db": rules["min_sqnr_db"]}
        return rules


class HostRunner(runners.LiteRTHostRunner):
    """LiteRT on this machine with its default XNNPACK delegate, 1 thread."""

    targets = (NAME,)


class ReferenceRunner(runners.ReferenceRunner):
    """The SDK's numpy integer reference: int32 accumulation and the runtime's rounding."""

    targets = (NAME,)


class QemuRunner(qemu.LiteRTQemuRunner):
    """``model.tflite`` in the aarch64 LiteRT on an emulated ARM64 Linux (qemu-aarch64): XNNPACK's NEON int8 kernels."""

    targets = (NAME,)


@hookimpl
def register_targets(register):
    register(ArmInt8)


@hookimpl
def register_runners(register):
    register(HostRunner)
    register(ReferenceRunner)
    register(QemuRunner)
