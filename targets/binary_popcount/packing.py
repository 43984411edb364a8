"""Bit-packing of binary (+-1) tensors for the popcount kernels.

Conventions (shared with ``kernels/ep_kernels.h``):

* bit 0 is +1 and bit 1 is -1; a real value binarizes to -1 exactly when it
  is ``< 0`` (so 0, -0.0 and NaN become +1, as in Larq and most BNN
  deployments; torch.sign would give 0, which a binary format cannot hold);
* elements are packed along one axis into little-endian uint64 words,
  element j in word ``j // 64`` at bit ``j % 64``;
* the axis is padded to a multiple of 64 with 0 bits in activations and
  weights alike, so padding XORs to 0 and the dot product of two packed
  vectors of K real elements is ``K - 2 * popcount(a ^ w)`` with no
  correction term.
"""

from __future__ import annotations

import numpy as np

WORD_BITS = 64


def words(n: int) -> int:
    """Number of uint64 words that hold ``n`` packed elements."""
    return -(-int(n) // WORD_BITS)


def binarize(x: np.ndarray) -> np.ndarray:
    """The +-1 values (float32) that packing ``x`` encodes."""
    return np.where(np.asarray(x) < 0, np.float32(-1), np.float32(1))


def pack_bits(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """Pack ``x`` along ``axis`` into uint64 words.

    ``x`` is real (values ``< 0`` become bit 1, i.e. -1) or bool (taken as the
    bits themselves: True = 1 = -1).  The axis shrinks to ``ceil(n / 64)``.
    """
    x = np.asarray(x)
    bits = x if x.dtype == np.bool_ else x < 0
    bits = np.moveaxis(bits, axis, -1)
    n = bits.shape[-1]
    pad = words(n) * WORD_BITS - n
    if pad:
        bits = np.concatenate([bits, np.zeros(bits.shape[:-1] + (pad,), dtype=bool)], axis=-1)
    packed = np.packbits(bits, axis=-1, bitorder="little")
    packed = np.ascontiguousarray(packed).view("<u8").astype(np.uint64, copy=False)
    return np.ascontiguousarray(np.moveaxis(packed, -1, axis))


def unpack_bits(packed: np.ndarray, n: int, axis: int = -1, dtype=np.float32) -> np.ndarray:
    """Inverse of :func:`pack_bits`: ``n`` +-1 values of ``dtype`` along ``axis``
    (``dtype=bool`` returns the raw bits)."""
    packed = np.moveaxis(np.asarray(packed, dtype=np.uint64), axis, -1)
    if packed.shape[-1] != words(n):
        raise ValueError(f"{packed.shape[-1]} words cannot hold exactly {n} elements")
    as_bytes = np.ascontiguousarray(packed.astype("<u8")).view(np.uint8)
    bits = np.unpackbits(as_bytes, axis=-1, bitorder="little")[..., :n].astype(bool)
    out = bits if dtype is bool or dtype is np.bool_ else np.where(bits, -1, 1).astype(dtype)
    return np.moveaxis(out, -1, axis)


def packed_nbytes(shape: tuple[int, ...], axis: int = -1) -> int:
    """Bytes of a binary tensor of logical ``shape`` packed along ``axis``."""
    shape = tuple(int(s) for s in shape)
    axis = axis % len(shape)
    rows = int(np.prod([s for i, s in enumerate(shape) if i != axis], dtype=np.int64))
    return rows * words(shape[axis]) * 8


def channel_scales(weight: np.ndarray) -> np.ndarray:
    """Per-output-channel XNOR-Net / BWN scale alpha = mean |W| (float32 [O])."""
    w = np.asarray(weight, dtype=np.float64)
    return np.abs(w.reshape(w.shape[0], -1)).mean(axis=1).astype(np.float32)


def pack_conv_weight(weight: np.ndarray) -> np.ndarray:
    """Binarize and pack a conv weight ``[O, C, kh, kw]`` into the kernels'
    layout ``[O, kh, kw, ceil(C/64)]`` (input channels packed per tap, to
    match NHWC activations packed per pixel)."""
    weight = np.asarray(weight)
    if weight.ndim != 4:
        raise ValueError(f"conv weight must be [O, C, kh, kw], got shape {weight.shape}")
    return pack_bits(np.transpose(weight, (0, 2, 3, 1)), axis=-1)


def pack_linear_weight(weight: np.ndarray) -> np.ndarray:
    """Binarize and pack a linear weight ``[O, I]`` into ``[O, ceil(I/64)]``."""
    weight = np.asarray(weight)
    if weight.ndim != 2:
        raise ValueError(f"linear weight must be [O, I], got shape {weight.shape}")
    return pack_bits(weight, axis=-1)


def sign_bytes(n: int) -> int:
    """Number of bytes that hold ``n`` signs packed 8 to a byte (the BWN layers' rows)."""
    return -(-int(n) // 8)


def pack_output_signs(weight: np.ndarray) -> np.ndarray:
    """The signs of a BWN weight, one bit per weight packed along the outputs into
    uint8 (bit ``o % 8`` of byte ``o // 8`` set for -1, unused high bits 0): a conv
    ``[O, C, kh, kw]`` becomes ``[kh, kw, C, ceil(O/8)]``, a linear ``[O, I]``
    ``[I, ceil(O/8)]``, the float kernels' layouts with the output innermost."""
    weight = np.asarray(weight)
    if weight.ndim not in (2, 4):
        raise ValueError(f"weight must be [O, I] or [O, C, kh, kw], got shape {weight.shape}")
    moved = np.transpose(weight, (2, 3, 1, 0) if weight.ndim == 4 else (1, 0))
    return np.ascontiguousarray(np.packbits(moved < 0, axis=-1, bitorder="little"))


def unpack_output_signs(packed: np.ndarray, outputs: int) -> np.ndarray:
    """Inverse of :func:`pack_output_signs` as float32 +-1, outputs last (``[..., O]``)."""
    bits = np.unpackbits(np.asarray(packed, np.uint8), axis=-1, count=outputs, bitorder="little")
    return np.where(bits.astype(bool), np.float32(-1), np.float32(1))
