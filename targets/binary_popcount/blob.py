"""weights.bin: the arrays of a network's layers in one blob, which the generated model.c reads in place.

Layout: a 64-byte header (magic ``EPBNNW01``, uint64 total size, uint64
fingerprint = first 8 bytes of the payload's sha256, little endian, rest
zero), then each layer's arrays (:meth:`.specs.LayerSpec.arrays`), little
endian, 64-byte aligned, at the offsets baked into model.c.  The model refuses
a blob whose header does not match.

>>> import numpy as np
>>> from targets.binary_popcount.specs import BinaryLinear, InputSpec, Sign
>>> specs = [InputSpec((1, 64)), Sign(), BinaryLinear.from_float(np.ones((4, 64)))]
>>> weight_layout(specs).offsets
{(2, 'weight'): 64, (2, 'alpha'): 128}
>>> len(write_weights_bin(specs))
144
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence
from dataclasses import dataclass

from .specs import LayerSpec, infer_shapes

WEIGHTS_MAGIC = b"EPBNNW01"
HEADER_BYTES = 64
_ALIGN = 64


@dataclass(frozen=True)
class WeightLayout:
    """Where each array lies in weights.bin, and the bytes after the header."""

    offsets: dict[tuple[int, str], int]   # (layer index, array name) -> offset from the blob start
    payload: bytes

    @property
    def size(self) -> int:
        """Bytes of the whole blob."""
        return HEADER_BYTES + len(self.payload)

    @property
    def fingerprint(self) -> int:
        return int.from_bytes(hashlib.sha256(self.payload).digest()[:8], "little")

    def blob(self) -> bytes:
        header = WEIGHTS_MAGIC + struct.pack("<QQ", self.size, self.fingerprint)
        return header.ljust(HEADER_BYTES, b"\0") + self.payload


def weight_layout(specs: Sequence[LayerSpec]) -> WeightLayout:
    """The offsets of every array of ``specs`` and the payload they make."""
    offsets, chunks, pos = {}, [], HEADER_BYTES
    for i, spec in enumerate(specs):
        for name, arr in spec.arrays():
            pad = (-pos) % _ALIGN
            chunks.append(b"\0" * pad)
            pos += pad
            offsets[(i, name)] = pos
            data = arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()
            chunks.append(data)
            pos += len(data)
    return WeightLayout(offsets, b"".join(chunks))


def write_weights_bin(specs: Sequence[LayerSpec]) -> bytes:
    """The ``weights.bin`` blob for ``specs`` (checked by :func:`.specs.infer_shapes` first)."""
    infer_shapes(specs)
    return weight_layout(specs).blob()
