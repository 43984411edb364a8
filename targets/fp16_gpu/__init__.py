"""Target ``fp16-gpu``: half-precision LiteRT artifacts for mobile GPU delegates.

Weights and biases are stored as float16 behind DEQUANTIZE ops — the form the
LiteRT GPU delegate consumes directly and CPU runtimes widen to float32.  The
``fp16`` quantizer first checks on the calibration data (or the example inputs)
that no activation leaves the float16 range; layers that do are an error, or
stay float32 with ``keep_fp32=[...]`` / ``auto_fp32=True`` (recorded in the
manifest under ``quantization.keep_fp32``).

Runners: ``host`` (LiteRT on the CPU: fp16 weights, fp32 compute), ``fp16``
(the same flatbuffer executed in float16 arithmetic, see :mod:`.half`),
``reference`` (float64 numpy), ``cuda`` (torch half precision on a GPU, when
one is present).  Each checks ``model.tflite`` with
:func:`targets.arm_int8.fbcheck.check_model` before reading it, and each
session serialises its calls, so it may be shared between threads.

>>> art = sdk.deploy(model, target="fp16-gpu", example_inputs=(x,), calibration=batches)   # doctest: +SKIP
>>> art.verify(model, runners=["host", "fp16"]).passed    # host within 1e-3, fp16 arithmetic within 1e-2  # doctest: +SKIP
True
"""

from __future__ import annotations

import dataclasses

from sdk import Package, Runner, Target, TensorSig, hookimpl
from sdk.config import Config
from sdk.quant import FP16_MAX
from targets.arm_int8.runners import LiteRTHostRunner, ReferenceRunner, adapt, checked_model

NAME = "fp16-gpu"


class FP16GPU(Target):
    """Float16-weight LiteRT model for mobile GPU delegates."""

    name = NAME
    version = "1.0"
    default_quantizer = "fp16"
    default_runner = "host"

    @dataclasses.dataclass(frozen=True)
    class Config(Config):
        keep_fp32: tuple[str, ...] = ()      # nodes/modules kept in float32
        auto_fp32: bool = False              # keep exactly the out-of-range nodes in float32

        def __post_init__(self):
            from plugins.quantize.fp16 import check_fp32_fields

            check_fp32_fields(NAME, self)

    def default_quantizer_config(self):
        return {"keep_fp32": list(self.config.keep_fp32), "auto_fp32": self.config.auto_fp32}

    def check(self, graph):
        from targets.arm_int8.lowering import check

        check(graph, self.name)

    def pack(self, graph, plan, calibration=None):
        from targets.arm_int8.lowering import lower

        keep = frozenset(plan.extra.get("keep_fp32", ())) if plan else frozenset()
        low = lower(graph, None, target=self.name, half_weights=True, keep_fp32=keep)
        layers = low.layers
        analysis = plan.extra.get("layers", {}) if plan else {}
        for row in layers:
            a = analysis.get(row["name"], {})
            row["fp32_bytes"] = 4 * row["params"]
            row["precision"] = "fp32" if row["name"] in keep else "fp16"
            if a:
                row["max_abs"] = round(a["max_abs"], 6)
                row["headroom"] = round(FP16_MAX / a["max_abs"], 2) if a["max_abs"] else None
        extra = {"fp16": {"keep_fp32": sorted(keep), "max_abs": {k: v["max_abs"] for k, v in analysis.items()}}}
        return Package(files={"model.tflite": low.model}, inputs=[TensorSig.from_dict(r) for r in low.inputs],
                       outputs=[TensorSig.from_dict(r) for r in low.outputs], layers=layers, extra=extra)

    def verify_rules(self):
        # fp16 storage (host, reference): within 1e-3 of the float model.  fp16 arithmetic (fp16, cuda):
        # 1e-3 is about one float16 ulp (2^-10) at the largest output, less than rounding the inputs and
        # outputs alone can cost once a few layers accumulate in float16 (measured 1.1e-3 to 4.7e-3 on the
        # zoo, benchmarks/results/fp16_gpu.json); 1e-2 still catches overflow, flushed activations and
        # badly conditioned sums.
        return {"max_rel_err": 1e-3, "runners": {"fp16": {"max_rel_err": 1e-2}, "cuda": {"max_rel_err": 1e-2}}}


class FP16HostRunner(LiteRTHostRunner):
    """LiteRT on this machine's CPU: float16 weights widened, float32 compute."""

    targets = (NAME,)


class FP16ReferenceRunner(ReferenceRunner):
    """float64 numpy execution of the fp16-weight flatbuffer."""

    targets = (NAME,)


class HalfRunner(Runner):
    """The flatbuffer in float16 arithmetic, as LiteRT's GPU delegate computes at F16 precision.

    Float16 storage and float16 accumulators, in the shaders' order (see :mod:`.half`).
    """

    name = "fp16"
    version = "1.0"
    targets = (NAME,)

    def open(self, artifact):
        from .half import HalfInterpreter

        keep = set(artifact.manifest.get("fp16", {}).get("keep_fp32", ()))
        interp = HalfInterpreter(checked_model(artifact), fp32=keep)
        return adapt(artifact, interp.run)


class CudaRunner(Runner):
    """torch float16 on a CUDA GPU: the flatbuffer's graph rebuilt as torch ops (see :mod:`.cuda`)."""

    name = "cuda"
    version = "1.0"
    targets = (NAME,)

    def unavailable(self):
        import torch

        if not torch.cuda.is_available():
            return "no CUDA GPU is visible to torch on this machine"
        return None

    def open(self, artifact):
        from .cuda import TorchLiteRT

        model = TorchLiteRT(checked_model(artifact),
                            fp32=set(artifact.manifest.get("fp16", {}).get("keep_fp32", ())))
        return adapt(artifact, model.run)


@hookimpl
def register_targets(register):
    register(FP16GPU)


@hookimpl
def register_runners(register):
    for cls in (FP16HostRunner, FP16ReferenceRunner, HalfRunner, CudaRunner):
        register(cls)
