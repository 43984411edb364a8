"""Run LiteRT models on this machine: load, invoke, inspect delegation, time.

``ai_edge_litert`` is imported lazily (it takes a while and is optional for
the rest of edgepack); ``tflite_runtime`` is the fallback on hosts that only
ship the older runtime.
"""

from __future__ import annotations

import statistics
import time
from collections import Counter
from pathlib import Path
from typing import Sequence

import numpy as np

from sdk.errors import InputError, RunnerError, ToolchainError
from sdk.log import quiet_stderr

__all__ = ["delegated_fraction", "load_interpreter", "op_summary", "run", "time_inference"]

_INSTALL_HINT = "pip install ai-edge-litert"

#: lines LiteRT's C++ runtime writes to stderr on every interpreter, whatever TF_CPP_MIN_LOG_LEVEL says
_BANNERS = ("INFO: Created TensorFlow Lite XNNPACK delegate for CPU.",)


def _interpreter_module():
    """The ``interpreter`` module of whichever LiteRT runtime is installed;
    raises :class:`~sdk.errors.ToolchainError` (with the pip command) if none."""
    try:
        from ai_edge_litert import interpreter as mod
    except ImportError:
        try:
            from tflite_runtime import interpreter as mod
        except ImportError:
            raise ToolchainError(
                f"running a .tflite model needs the LiteRT runtime; install it with `{_INSTALL_HINT}`"
            ) from None
    return mod


def load_interpreter(model, num_threads: int = 1, delegate: bool = True, *, check: bool = False,
                     manifest: dict | None = None):
    """A ready (tensors allocated) LiteRT interpreter for ``model``.

    ``model`` is the flatbuffer bytes or a path.  ``delegate=False`` disables
    the default XNNPACK delegate so every op runs in TFLite's builtin kernels.
    ``check=True`` (or a ``manifest``) first runs :func:`.fbcheck.check_model`
    on the bytes and hands LiteRT exactly the bytes it checked: LiteRT does not
    validate a flatbuffer's contents and can crash on a damaged one.
    LiteRT's "Created TensorFlow Lite XNNPACK delegate" banner is dropped (its
    other stderr lines are kept: :func:`sdk.log.quiet_stderr`).
    The interpreter is not thread-safe; share it behind a lock.
    """
    mod = _interpreter_module()
    kwargs = {"num_threads": int(num_threads)}
    if check or manifest is not None:
        from .fbcheck import check_model

        model = Path(model).read_bytes() if isinstance(model, (str, Path)) else bytes(model)
        check_model(model, manifest)
    if isinstance(model, (str, Path)):
        kwargs["model_path"] = str(model)
    else:
        kwargs["model_content"] = bytes(model)
    if not delegate:
        kwargs["experimental_op_resolver_type"] = mod.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
    try:
        with quiet_stderr(_BANNERS):
            interp = mod.Interpreter(**kwargs)
            interp.allocate_tensors()
    except (ValueError, RuntimeError) as exc:
        raise RunnerError(f"LiteRT could not load the model: {exc}") from exc
    return interp


def run(interpreter, inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Invoke once; ``inputs`` in the model's input order and dtypes.
    Returns copies of the outputs (the interpreter reuses its buffers)."""
    if isinstance(inputs, np.ndarray):
        inputs = [inputs]
    details = interpreter.get_input_details()
    if len(inputs) != len(details):
        raise InputError(f"model takes {len(details)} inputs, got {len(inputs)}")
    for d, x in zip(details, inputs):
        x = np.asarray(x)
        if tuple(x.shape) != tuple(d["shape"]) or x.dtype != d["dtype"]:
            raise InputError(f"input {d['name']!r}: expected {tuple(d['shape'])} {np.dtype(d['dtype'])}, "
                             f"got {tuple(x.shape)} {x.dtype}")
        interpreter.set_tensor(d["index"], x)
    try:
        interpreter.invoke()
    except (ValueError, RuntimeError) as exc:
        raise RunnerError(f"LiteRT failed to run the model: {exc}") from exc
    return [interpreter.get_tensor(d["index"]).copy() for d in interpreter.get_output_details()]


def op_summary(interpreter) -> dict:
    """Which model ops ran inside a delegate and which in builtin kernels.

    Returns ``{"delegate_nodes": int, "delegated": Counter, "builtin": Counter}``
    where the counters map op names to counts.  LiteRT lists every original
    node and, after them, the DELEGATE nodes that replaced some; a DELEGATE
    node shows only its partition's boundary tensors, so the replaced nodes
    are found by walking back from its outputs to its inputs.
    """
    ops = interpreter._get_ops_details()  # the only API that exposes delegation
    original = [o for o in ops if o["op_name"] != "DELEGATE"]
    producer = {int(t): i for i, o in enumerate(original) for t in o["outputs"]}
    taken: set[int] = set()
    delegates = [o for o in ops if o["op_name"] == "DELEGATE"]
    for d in delegates:
        boundary = {int(t) for t in d["inputs"]}
        stack = [producer[int(t)] for t in d["outputs"] if int(t) in producer]
        while stack:
            i = stack.pop()
            if i in taken:
                continue
            taken.add(i)
            stack.extend(producer[int(t)] for t in original[i]["inputs"]
                         if int(t) in producer and int(t) not in boundary)
    delegated = Counter(original[i]["op_name"] for i in taken)
    builtin = Counter(o["op_name"] for i, o in enumerate(original) if i not in taken)
    return {"delegate_nodes": len(delegates), "delegated": delegated, "builtin": builtin}


def delegation(interpreter) -> dict:
    """The profile's ``delegation`` entry for a loaded LiteRT model: XNNPACK partitions and the ops
    left to builtin kernels (each boundary between the two costs a copy and a synchronisation)."""
    summary = op_summary(interpreter)
    return {"delegate": "XNNPACK", "partitions": summary["delegate_nodes"],
            "delegated_ops": sum(summary["delegated"].values()),
            "outside_delegate": dict(sorted(summary["builtin"].items()))}


def delegated_fraction(interpreter) -> float:
    """Fraction of the model's ops that run inside a delegate (1.0 when
    XNNPACK takes the whole graph)."""
    s = op_summary(interpreter)
    total = sum(s["delegated"].values()) + sum(s["builtin"].values())
    return sum(s["delegated"].values()) / total if total else 0.0


def time_inference(interpreter, inputs: Sequence[np.ndarray], warmup: int = 3, runs: int = 20) -> float:
    """Median wall time of one ``invoke()`` in milliseconds."""
    run(interpreter, inputs)
    for _ in range(max(warmup - 1, 0)):
        interpreter.invoke()
    times = []
    for _ in range(max(runs, 1)):
        t0 = time.perf_counter()
        interpreter.invoke()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)
