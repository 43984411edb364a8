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
:func:`sdk.litert.fbcheck.check_model` before reading it, and each
session serialises its calls, so it may be shared between threads.  The
lowering, the flatbuffer writer and the reference are the LiteRT toolkit the
arm targets use too (:mod:`sdk.litert`); what is float16's own lives here:
:mod:`.half` and :mod:`.cuda`.

>>> art = sdk.deploy(model, target="fp16-gpu", example_inputs=(x,), calibration=batches)   # doctest: +SKIP
>>> art.verify(model, runners=["host", "fp16"]).passed    # doctest: +SKIP
True

Verify bounds are derived per artifact.  At pack time the captured graph is run
in float32 with its weights rounded to float16 exactly as the flatbuffer stores
them (:func:`weight_rounding_rel_err`); that baseline — the error float16
storage costs before any runtime is involved — is recorded as
``fp16.weight_rounding_rel_err`` and the manifest's ``verify`` rules become
``max(1e-3, 2 × baseline)`` for the storage runners (``host``, ``reference``)
and ``max(1e-2, 4 × baseline)`` for float16 arithmetic (``fp16``, ``cuda``),
both capped at :data:`REL_ERR_CAP`.  The target's stated rules are that cap, so
an edited manifest cannot loosen a bound past it (and signing covers the
manifest).
"""

from __future__ import annotations

import dataclasses

from sdk import Package, Runner, TensorSig, hookimpl
from sdk.config import Config, check_choice, check_fp32_fields
from sdk.cost import MOBILE_GPU
from sdk.encoding import Carries
from sdk.litert import runners
from sdk.litert.runners import adapt, checked_model
from sdk.litert.target import LiteRTTarget
from sdk.quant import FP16_MAX

NAME = "fp16-gpu"

# Floors and factors of the derived verify bounds (see the module docstring).  The storage factor covers the
# verify inputs differing from the calibration data the baseline was measured on, plus the runtime's own
# float32 (host) or float64 (reference) rounding: measured host error / baseline 0.74-1.39 on the zoo
# (mlp, lenet, dscnn, mobilenetv2, resnet18), 2x leaves margin for that spread.  fp16 arithmetic adds
# activation rounding on top of the weight rounding (zoo: 5-24x a small baseline, 7.6e-4 to 4.7e-3 in
# absolute terms, so the 1e-2 floor governs there); 4x only matters once the baseline exceeds 2.5e-3, where
# weight rounding dominates -- not yet measured on such a model with the fp16 runner.
STORAGE_FLOOR, STORAGE_FACTOR = 1e-3, 2.0
ARITH_FLOOR, ARITH_FACTOR = 1e-2, 4.0
# No derived bound exceeds this, and it is what the target states, so a manifest edited to a looser bound
# is tightened back to it by :func:`sdk.verify.merge_rules`.  A weight tampered with in a way that costs
# less than 10 % relative error at the output is beyond what a numeric bound can catch; the signature is not.
REL_ERR_CAP = 0.1


def half_rounded(graph, keep_fp32=frozenset()):
    """``graph`` (prepared: batch norms already convs, as the lowering sees it) with the conv/linear
    weights and biases of the nodes not in ``keep_fp32`` rounded to float16 and back: what
    ``model.tflite`` stores."""
    import numpy as np

    g = graph.copy()
    for node in g.nodes:
        if node.op in ("conv", "linear") and node.name not in keep_fp32:
            for name in node.inputs[1:3]:
                v = g.constants.get(name)
                if v is not None and v.dtype.kind == "f":
                    g.constants[name] = v.astype(np.float16).astype(v.dtype)
    return g


def weight_rounding_rel_err(graph, batches, keep_fp32=frozenset()) -> float:
    """Max relative error (max |diff| / max |float output|, over all outputs of all ``batches``, as
    :func:`sdk.verify` measures it) of ``graph`` run in float32 with float16-rounded weights."""
    from sdk.verify import compare_outputs

    rounded = half_rounded(graph, keep_fp32)
    ref = [[o.detach().double().numpy() for o in graph.run(batch)] for batch in batches]
    got = [[o.detach().double().numpy() for o in rounded.run(batch)] for batch in batches]
    return compare_outputs(got, ref)[1] if ref else 0.0


def derived_rules(baseline: float | None) -> dict:
    """The verify rules for an artifact whose weight-rounding baseline is ``baseline`` (floors when None)."""
    b = 0.0 if baseline is None or not baseline == baseline else float(baseline)
    storage = min(REL_ERR_CAP, max(STORAGE_FLOOR, STORAGE_FACTOR * b))
    arith = min(REL_ERR_CAP, max(ARITH_FLOOR, ARITH_FACTOR * b))
    return {"max_rel_err": storage, "runners": {"fp16": {"max_rel_err": arith}, "cuda": {"max_rel_err": arith}}}


class FP16GPU(LiteRTTarget):
    """Float16-weight LiteRT model for mobile GPU delegates."""

    name = NAME
    version = "1.0"
    default_quantizer = "fp16"
    default_runner = "host"
    # float32: the layers kept in float32; zeros sparse behind DENSIFY (sparsity="auto")
    carries = (Carries("float16", sparsity=("unstructured", "block")), Carries("float32", sparsity=("unstructured",
                                                                                                   "block")))
    device = MOBILE_GPU

    @dataclasses.dataclass(frozen=True)
    class Config(Config):
        keep_fp32: tuple[str, ...] = ()      # nodes/modules kept in float32
        auto_fp32: bool = False              # keep exactly the out-of-range nodes in float32
        sparsity: str = "auto"               # "auto": weights with zeros stored sparse where smaller; "off"

        def __post_init__(self):
            check_fp32_fields(NAME, self)
            check_choice(NAME, "sparsity", self.sparsity, ("auto", "off"))

    def default_quantizer_config(self):
        return {"keep_fp32": list(self.config.keep_fp32), "auto_fp32": self.config.auto_fp32}

    # prepare and check are LiteRTTarget's: stand-alone batch norms become convs before the fp16
    # range analysis, so it and the weight-rounding baseline see the graph that is packed

    def pack(self, graph, plan, calibration=None):
        from sdk.litert.lowering import lower

        keep = frozenset(plan.extra.get("keep_fp32", ())) if plan else frozenset()
        low = lower(graph, None, target=self.name, half_weights=True, keep_fp32=keep, sparsity=self.config.sparsity)
        layers = low.layers
        analysis = plan.extra.get("layers", {}) if plan else {}
        for row in layers:
            a = analysis.get(row["name"], {})
            row["fp32_bytes"] = 4 * row["params"]
            row["precision"] = "fp32" if row["name"] in keep else "fp16"
            if a:
                row["max_abs"] = round(a["max_abs"], 6)
                row["headroom"] = round(FP16_MAX / a["max_abs"], 2) if a["max_abs"] else None
        baseline = weight_rounding_rel_err(graph, calibration, keep) if calibration else None
        extra = {"fp16": {"keep_fp32": sorted(keep), "max_abs": {k: v["max_abs"] for k, v in analysis.items()},
                          "weight_rounding_rel_err": baseline},
                 # overrides the manifest's default ``verify`` (this target's verify_rules(), the caps)
                 "verify": derived_rules(baseline), **self.shipped(graph, plan, layers)}
        return Package(files={"model.tflite": low.model}, inputs=[TensorSig.from_dict(r) for r in low.inputs],
                       outputs=[TensorSig.from_dict(r) for r in low.outputs], layers=layers, extra=extra)

    def verify_rules(self):
        # The bounds this target states for any fp16-gpu artifact: the cap on the per-artifact bounds that
        # pack writes into the manifest (derived_rules).  sdk.verify takes the stricter of the two, so the
        # stated rule must not be tighter than a derived one; it only stops an edited manifest loosening them.
        # Without a derived bound the floors apply: fp16 storage (host, reference) 1e-3 of the float model;
        # fp16 arithmetic (fp16, cuda) 1e-2 -- 1e-3 is about one float16 ulp (2^-10) at the largest output,
        # less than rounding the inputs and outputs alone can cost once a few layers accumulate in float16
        # (measured 1.1e-3 to 4.7e-3 on the zoo, benchmarks/results/fp16_gpu.json); 1e-2 still catches
        # overflow, flushed activations and badly conditioned sums.
        cap = {"max_rel_err": REL_ERR_CAP}
        return {**cap, "runners": {"fp16": dict(cap), "cuda": dict(cap)}}


class FP16HostRunner(runners.LiteRTHostRunner):
    """LiteRT on this machine's CPU: float16 weights widened, float32 compute."""

    targets = (NAME,)


class FP16ReferenceRunner(runners.ReferenceRunner):
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
