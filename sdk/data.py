"""Turning what users pass as data into checked batches.

Calibration and verification data may be a tensor, an array, a list of them,
a list of tuples, or a ``DataLoader`` yielding ``(x, y)`` pairs; a model with
``n`` inputs takes the first ``n`` items of each tuple.
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

import numpy as np
import torch

from .errors import CalibrationError, InputError


def _not_batches(data: Any) -> str | None:
    """Why ``data`` cannot be a sequence of batches (None when it can be iterated as one)."""
    if isinstance(data, (str, bytes, bytearray, dict)) or isinstance(data, (int, float, complex, bool)) \
            or np.isscalar(data):
        return f"a {type(data).__name__}"
    try:
        iter(data)
    except TypeError:
        return f"a {type(data).__name__}, which is not iterable"
    return None


def _numeric_array(x: Any) -> np.ndarray | str:
    """``x`` as a float32 numpy array, or the reason it is not numeric data."""
    if isinstance(x, torch.Tensor):
        if x.is_complex():
            return f"a complex tensor ({x.dtype})"
        if x.layout != torch.strided or x.device.type == "meta":
            return f"a {x.layout if x.layout != torch.strided else 'meta'} tensor; pass a dense CPU tensor"
        return x.detach().cpu().to(torch.float32).numpy()
    if isinstance(x, (str, bytes, bytearray)):
        return f"a {type(x).__name__} ({x[:20]!r}), not numbers"
    if x is None or isinstance(x, dict):
        return f"a {type(x).__name__}"
    try:
        a = np.asarray(x)
    except (ValueError, TypeError) as exc:       # ragged nested lists
        return f"not an array of numbers ({exc})"
    if a.dtype.kind not in "biuf":
        what = {"O": "object", "U": "string", "S": "bytes", "c": "complex", "M": "datetime",
                "m": "timedelta", "V": "structured"}.get(a.dtype.kind, str(a.dtype))
        return f"an array of dtype {a.dtype} ({what}); pass numeric (float) arrays"
    return np.ascontiguousarray(a, dtype=np.float32)


def as_batches(data: Any, signature: Sequence[tuple[str, tuple[int, ...], str]], *, what: str = "calibration",
               limit: int | None = None, error: type = CalibrationError) -> list[tuple[torch.Tensor, ...]]:
    """Normalise ``data`` to a list of input tuples matching ``signature``.

    Each tensor must have the captured shape in every dimension except the
    first (the batch).  Raises ``error`` (:class:`CalibrationError` by default)
    for empty data, data that is not a sequence of batches, non-numeric arrays,
    non-finite values or a wrong shape, naming the batch.
    """
    if data is None:
        raise error(f"{what} data is required: pass a list of input batches shaped like example_inputs")
    if isinstance(data, (torch.Tensor, np.ndarray)):
        data = [data]
    why = _not_batches(data)
    if why:
        raise error(f"{what} data must be a list (or DataLoader) of input batches shaped like example_inputs, "
                    f"got {why}")
    n = len(signature)
    batches: list[tuple[torch.Tensor, ...]] = []
    for i, item in enumerate(data):
        if limit is not None and i >= limit:
            break
        items = tuple(item) if isinstance(item, (tuple, list)) else (item,)
        if len(items) < n:
            raise error(f"{what} batch {i} has {len(items)} tensor(s); the model takes {n}")
        tensors = []
        for (name, shape, _), x in zip(signature, items[:n]):
            if not isinstance(x, (torch.Tensor, np.ndarray)):
                raise error(f"{what} batch {i}: input {name!r} is a {type(x).__name__}, not a tensor or array")
            a = _numeric_array(x)
            if isinstance(a, str):
                raise error(f"{what} batch {i}: input {name!r} is {a}")
            x = torch.from_numpy(a)
            if x.ndim != len(shape) or tuple(x.shape[1:]) != tuple(shape[1:]):
                raise error(f"{what} batch {i}: input {name!r} has shape {tuple(x.shape)}; expected "
                            f"(N, {', '.join(map(str, shape[1:]))}) like example_inputs")
            if x.shape[0] == 0:
                raise error(f"{what} batch {i}: input {name!r} is an empty batch")
            if not torch.isfinite(x).all():
                bad = int((~torch.isfinite(x)).sum())
                raise error(f"{what} batch {i}: input {name!r} has {bad} NaN/inf value(s); clean the data first")
            tensors.append(x)
        batches.append(tuple(tensors))
    if not batches:
        raise error(f"{what} data is empty: pass at least one batch (100-500 representative samples is typical)")
    return batches


def as_inputs(inputs: Any, signature: Sequence[tuple[str, tuple[int, ...], str]]) -> list[np.ndarray]:
    """One call's inputs as float32 arrays, checked against ``signature`` exactly
    (artifacts have static shapes).  Raises :class:`InputError` for a wrong count,
    shape or a non-numeric input."""
    shapes = ", ".join(f"{name} {tuple(shape)}" for name, shape, _ in signature)
    if not isinstance(inputs, (tuple, list)):
        inputs = (inputs,)
    inputs = list(inputs)
    if not inputs:
        raise InputError(f"no inputs given; the artifact takes {len(signature)} input(s): {shapes}")
    if len(inputs) != len(signature):
        raise InputError(f"the artifact takes {len(signature)} input(s) ({shapes}), got {len(inputs)}")
    out = []
    for (name, shape, _), x in zip(signature, inputs):
        a = _numeric_array(x)
        if isinstance(a, str):
            raise InputError(f"input {name!r} is {a}; pass a numpy array or torch tensor of shape {tuple(shape)}")
        if tuple(a.shape) != tuple(shape):
            raise InputError(f"input {name!r} has shape {tuple(a.shape)}; the artifact was packed for {tuple(shape)}")
        out.append(a)
    return out


def split_batches(data: Iterable, batch_size: int) -> list[tuple[torch.Tensor, ...]]:
    """Cut arrays of samples (first dim) into batches of ``batch_size`` (the CLI's .npz files).

    Raises :class:`CalibrationError` for no arrays, a batch size below 1, arrays
    without a sample axis or with different numbers of samples."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise CalibrationError(f"batch size must be a positive integer, got {batch_size!r}")
    arrays = []
    for i, a in enumerate(data):
        arr = _numeric_array(a)
        if isinstance(arr, str):
            raise CalibrationError(f"array {i} is {arr}")
        if arr.ndim == 0:
            raise CalibrationError(f"array {i} is a scalar; each array needs samples on its first axis")
        arrays.append(torch.from_numpy(arr))
    if not arrays:
        raise CalibrationError("no arrays given: pass one array per model input, samples on the first axis")
    counts = sorted({a.shape[0] for a in arrays})
    if len(counts) > 1:
        raise CalibrationError(f"the arrays hold different numbers of samples ({', '.join(map(str, counts))}); "
                               "give every model input the same number of samples")
    n = counts[0]
    return [tuple(a[i:i + batch_size] for a in arrays) for i in range(0, n, batch_size)]
