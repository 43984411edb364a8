"""Runners for LiteRT artifacts: ``host`` (the LiteRT interpreter here) and
``reference`` (the SDK's numpy integer reference of the same flatbuffer).

Both take and return torch-layout float arrays: inputs are transposed to the
stored layout (NHWC) and, for ``io="int8"`` artifacts, quantized with the
manifest's parameters; outputs are dequantized and transposed back.

``model.tflite`` goes through :func:`.fbcheck.check_model` (against the
manifest) before either runtime reads it: LiteRT trusts the flatbuffer it is
given, so a damaged or hostile file would crash the process instead of raising.

Sessions may be called from several threads: a LiteRT interpreter is not
thread-safe (set_tensor / invoke / get_tensor from two threads interleave and
give errors or, worse, another call's outputs), so every session serialises its
calls with a lock (:func:`serialised`).  One interpreter per thread was the
alternative; it multiplies the packed weights per thread and needs clean-up for
threads that end, for no gain on the one-thread interpreters these runners use.
"""

from __future__ import annotations

import functools
import threading
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


def serialised(fn: Callable) -> Callable:
    """``fn`` behind a lock of its own: one call at a time, from any number of threads."""
    lock = threading.Lock()

    @functools.wraps(fn)
    def call(*args, **kwargs):
        with lock:
            return fn(*args, **kwargs)

    call.lock = lock
    return call


def checked_model(artifact, name: str = "model.tflite") -> bytes:
    """The bytes of ``name``, after the structural check against the manifest
    (:class:`~sdk.errors.ArtifactError` when it fails)."""
    from .fbcheck import check_file

    return check_file(artifact, name)


def adapt(artifact, run_stored: Callable[[list[np.ndarray]], list[np.ndarray]]):
    """Torch-layout float calls around ``run_stored``; the stored-layout call is
    :func:`serialised` (the layout and quantization steps run outside the lock)."""
    ins, outs = artifact.manifest["inputs"], artifact.manifest["outputs"]
    run_locked = serialised(run_stored)

    def run(inputs: list[np.ndarray]) -> list[np.ndarray]:
        ys = run_locked([to_stored(s, x) for s, x in zip(ins, inputs)])
        return [from_stored(s, y) for s, y in zip(outs, ys)]

    run.lock = run_locked.lock
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

        interp = litert.load_interpreter(checked_model(artifact), num_threads=self.num_threads)
        run = adapt(artifact, lambda xs: litert.run(interp, xs))
        run.profile = {"delegation": litert.delegation(interp)}    # deploy's first run puts it in profile.json
        return run


class ReferenceRunner(Runner):
    """The SDK's numpy integer reference: int32 accumulation and the runtime's rounding."""

    name = "reference"
    version = "1.0"
    targets = LITERT_TARGETS
    exact = True

    def open(self, artifact):
        from .reference import ReferenceInterpreter

        interp = ReferenceInterpreter(checked_model(artifact))
        return adapt(artifact, interp.run)
