"""The pieces every runner of a LiteRT artifact shares, and the two runtimes
behind the LiteRT targets' ``host`` and ``reference`` runners.

:class:`LiteRTHostRunner` (the LiteRT interpreter here) and
:class:`ReferenceRunner` (the SDK's numpy reference of the same flatbuffer)
list no targets: each target package registers a subclass naming its own
(``targets/arm_int8``, ``targets/arm_fp32``, ``targets/fp16_gpu``).

Sessions take and return torch-layout float arrays (:func:`adapt`, around
:mod:`.layout`): inputs are transposed to the stored layout (NHWC) and, for
``io="int8"`` artifacts, quantized with the manifest's parameters; outputs are
dequantized and transposed back.

``model.tflite`` goes through :func:`.fbcheck.check_model` (against the
manifest, :func:`checked_model`) before any runtime reads it: LiteRT trusts
the flatbuffer it is given, so a damaged or hostile file would crash the
process instead of raising.

Sessions may be called from several threads: a LiteRT interpreter is not
thread-safe (set_tensor / invoke / get_tensor from two threads interleave and
give errors or, worse, another call's outputs), so every session serialises its
calls with a lock (:func:`serialised`).  One interpreter per thread was the
alternative; it multiplies the packed weights per thread and needs clean-up for
threads that end, for no gain on the one-thread interpreters these runners use.

>>> class HostRunner(LiteRTHostRunner):            # doctest: +SKIP
...     targets = ("arm-int8",)
"""

from __future__ import annotations

import functools
import threading
from typing import Callable

import numpy as np

from sdk import Runner

from .layout import from_stored, to_stored

__all__ = ["LiteRTHostRunner", "ReferenceRunner", "adapt", "checked_model", "open_stages", "serialised"]


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

    if "early_exit" in (getattr(artifact, "manifest", None) or {}):
        from sdk.errors import InputError

        raise InputError(f"artifact {artifact.path} is an early-exit cascade: it has no {name}; its stages run "
                         "in the host and reference runners (art.run, sdk.early_exit_artifact) — this tool reads "
                         "one model file: deploy the network without early-exit for it")
    return check_file(artifact, name)


def open_stages(artifact, make: Callable[[bytes], Callable]):
    """A session running an early-exit cascade (:func:`sdk.early_exit_artifact.open_cascade`): each
    stage file is checked against its own signatures (:func:`.fbcheck.check_model`) and handed to
    ``make(bytes) -> function from stored inputs to stored outputs``."""
    from sdk.early_exit_artifact import open_cascade

    from .fbcheck import check_model

    def load(stage: dict, data: bytes):
        check_model(data, {"inputs": stage["inputs"], "outputs": stage["outputs"]},
                    name=f"{stage['file']} of {artifact.path}")
        return make(data)

    return open_cascade(artifact, load)


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
    exact = True
    num_threads = 1

    def unavailable(self):
        try:
            from .runtime import _interpreter_module

            _interpreter_module()
        except Exception as exc:
            return str(exc)
        return None

    def open(self, artifact):
        from . import runtime

        if "early_exit" in artifact.manifest:
            def make(data: bytes):
                interp = runtime.load_interpreter(data, num_threads=self.num_threads)
                run = functools.partial(runtime.run, interp)
                run.delegation = runtime.delegation(interp)
                return run

            return open_stages(artifact, make)
        interp = runtime.load_interpreter(checked_model(artifact), num_threads=self.num_threads)
        run = adapt(artifact, lambda xs: runtime.run(interp, xs))
        run.profile = {"delegation": runtime.delegation(interp)}    # deploy's first run puts it in profile.json
        return run


class ReferenceRunner(Runner):
    """The SDK's numpy reference of the flatbuffer: int32 accumulation and the runtime's rounding
    for int8 ops, float64 for float ones."""

    name = "reference"
    version = "1.0"
    exact = True

    def open(self, artifact):
        from .reference import ReferenceInterpreter

        if "early_exit" in artifact.manifest:
            return open_stages(artifact, lambda data: ReferenceInterpreter(data).run)
        interp = ReferenceInterpreter(checked_model(artifact))
        return adapt(artifact, interp.run)
