"""Runners for LiteRT artifacts: ``host`` (the LiteRT interpreter here) and
``reference`` (the SDK's numpy integer reference of the same flatbuffer).

Both take and return torch-layout float arrays: inputs are transposed to the
stored layout (NHWC) and, for ``io="int8"`` artifacts, quantized with the
manifest's parameters; outputs are dequantized and transposed back.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from sdk import Runner
from sdk.quant import dequantize, quantize

LITERT_TARGETS = ("arm-int8", "arm-fp32")


def inverse_perm(perm) -> tuple[int, ...]:
    """The permutation that undoes ``perm``."""
    inv = [0] * len(perm)
    for i, p in enumerate(perm):
        inv[p] = i
    return tuple(inv)


def to_stored(sig: dict, x: np.ndarray) -> np.ndarray:
    """A torch-layout float input as the model's stored tensor."""
    x = np.ascontiguousarray(x.transpose(sig.get("layout") or range(x.ndim)))
    if sig.get("stored_dtype") == "int8":
        q = sig["quantization"]
        return quantize(x, q["scale"][0], q["zero_point"][0])
    return x.astype(np.float32)


def from_stored(sig: dict, y: np.ndarray) -> np.ndarray:
    """A model output back in torch layout, as float."""
    if y.dtype == np.int8:
        q = sig["quantization"]
        y = dequantize(y, q["scale"][0], q["zero_point"][0])
    return np.ascontiguousarray(y.astype(np.float32).transpose(inverse_perm(sig.get("layout") or range(y.ndim))))


def adapt(artifact, run_stored: Callable[[list[np.ndarray]], list[np.ndarray]]):
    ins, outs = artifact.manifest["inputs"], artifact.manifest["outputs"]

    def run(inputs: list[np.ndarray]) -> list[np.ndarray]:
        ys = run_stored([to_stored(s, x) for s, x in zip(ins, inputs)])
        return [from_stored(s, y) for s, y in zip(outs, ys)]

    return run


class LiteRTHostRunner(Runner):
    """LiteRT on this machine with its default XNNPACK delegate, 1 thread."""

    name = "host"
    version = "1.0"
    targets = LITERT_TARGETS
    exact = True
    num_threads = 1

    def unavailable(self):
        try:
            from .litert import _interpreter_module

            _interpreter_module()
        except Exception as exc:
            return str(exc)
        return None

    def open(self, artifact):
        from . import litert

        interp = litert.load_interpreter(artifact.file("model.tflite"), num_threads=self.num_threads)
        return adapt(artifact, lambda xs: litert.run(interp, xs))


class ReferenceRunner(Runner):
    """The SDK's numpy integer reference: int32 accumulation and the runtime's rounding."""

    name = "reference"
    version = "1.0"
    targets = LITERT_TARGETS
    exact = True

    def open(self, artifact):
        from .reference import ReferenceInterpreter

        interp = ReferenceInterpreter(artifact.file("model.tflite").read_bytes())
        return adapt(artifact, interp.run)
