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


def as_batches(data: Any, signature: Sequence[tuple[str, tuple[int, ...], str]], *, what: str = "calibration",
               limit: int | None = None, error: type = CalibrationError) -> list[tuple[torch.Tensor, ...]]:
    """Normalise ``data`` to a list of input tuples matching ``signature``.

    Each tensor must have the captured shape in every dimension except the
    first (the batch).  Raises ``error`` (:class:`CalibrationError` by default)
    for empty data, non-finite values or a wrong shape, naming the batch.
    """
    if data is None:
        raise error(f"{what} data is required: pass a list of input batches shaped like example_inputs")
    if isinstance(data, (torch.Tensor, np.ndarray)):
        data = [data]
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
            if isinstance(x, np.ndarray):
                x = torch.from_numpy(x)
            if not isinstance(x, torch.Tensor):
                raise error(f"{what} batch {i}: input {name!r} is a {type(x).__name__}, not a tensor or array")
            x = x.detach().float()
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
    (artifacts have static shapes)."""
    if isinstance(inputs, (torch.Tensor, np.ndarray)):
        inputs = (inputs,)
    inputs = list(inputs)
    if len(inputs) != len(signature):
        raise InputError(f"the artifact takes {len(signature)} input(s), got {len(inputs)}")
    out = []
    for (name, shape, _), x in zip(signature, inputs):
        if isinstance(x, torch.Tensor):
            x = x.detach().cpu().numpy()
        x = np.asarray(x, np.float32)
        if tuple(x.shape) != tuple(shape):
            raise InputError(f"input {name!r} has shape {tuple(x.shape)}; the artifact was packed for {tuple(shape)}")
        out.append(np.ascontiguousarray(x))
    return out


def split_batches(data: Iterable, batch_size: int) -> list[tuple[torch.Tensor, ...]]:
    """Cut arrays of samples (first dim) into batches of ``batch_size`` (the CLI's .npz files)."""
    arrays = [torch.as_tensor(np.asarray(a)) for a in data]
    n = min(a.shape[0] for a in arrays)
    return [tuple(a[i:i + batch_size] for a in arrays) for i in range(0, n, batch_size)]
