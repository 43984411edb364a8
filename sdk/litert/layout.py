"""Model I/O between torch layout and the layout a LiteRT model stores.

The lowering stores 4-D activations NHWC and records, per model input and
output, the permutation it applied (manifest ``layout``: stored dim ``i`` holds
torch dim ``layout[i]``) and, for ``io="int8"`` artifacts, the int8
parameters (``stored_dtype`` and ``quantization``).  Runners call a model with
torch-layout float arrays; these functions convert on the way in and out.

>>> sig = {"layout": [0, 2, 3, 1]}
>>> to_stored(sig, np.zeros((1, 3, 8, 8))).shape
(1, 8, 8, 3)
>>> inverse_perm((0, 2, 3, 1))
(0, 3, 1, 2)
"""

from __future__ import annotations

import numpy as np

from sdk.quant import dequantize, quantize

__all__ = ["from_stored", "inverse_perm", "to_stored"]


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
