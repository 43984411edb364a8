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


# -- bit planes: k-bit weights and activations as sums of binary ones ---------------------------
#
# A k-bit dot product is a weighted sum of binary ones.  Weights are integer codes
# ``m = Σ_i c_i s_i`` over ±1 planes ``s_i`` (an odd code in [−(2^P − 1), 2^P − 1] takes
# ``c_i = 2^i``; a ternary one {−1, 0, 1} takes ``c = (1, 1)``, as (s_0 + s_1) / 2 with the
# 1/2 in the scale), packed like binary weights.  Unsigned activation codes
# ``a = Σ_j 2^j e_j`` (e_j ∈ {0, 1}) are written as ±1 planes ``h_j = 2 e_j − 1``, since
# ``2a = (2^k − 1) + Σ_j 2^j h_j``: every plane product is then the XNOR-popcount product of
# the binary kernels.


def pack_code_planes(codes: np.ndarray, bits: int) -> np.ndarray:
    """Unsigned integer ``codes [..., C]`` (< 2^bits) as ``bits`` packed ±1 planes
    ``[bits, ..., ceil(C/64)]``: plane j holds ``h_j = 2·bit_j − 1``, so a set bit of the
    code packs as 0 (+1) and a clear one as 1 (−1)."""
    codes = np.asarray(codes).astype(np.int64)
    return np.stack([pack_bits(((codes >> j) & 1) == 0) for j in range(bits)])


def _odd_codes(values: np.ndarray, max_bits: int = 8) -> tuple[float, np.ndarray] | None:
    """``(unit, codes)`` with ``values ≈ unit · codes`` and every code odd, |code| < 2^max_bits."""
    mags = np.unique(np.abs(values))
    if mags[0] == 0:
        return None
    top = 2 ** max_bits - 1
    for d in range(1, top + 1, 2):          # the smallest magnitude is d units
        unit = mags[0] / d
        codes = np.rint(values / unit)
        if (np.abs(codes) <= top).all() and (codes % 2 == 1).all() \
                and np.allclose(codes * unit, values, rtol=0, atol=1e-6 * mags[-1]):
            return float(unit), codes.astype(np.int64)
        if mags[-1] / unit > top:
            break
    return None


def weight_planes(weight: np.ndarray, max_bits: int = 8) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """The bit planes of a low-bit weight ``[O, ...]``: ``(signs, coefficients, alpha)`` with
    ``signs`` ±1 float32 ``[P, O, ...]``, ``coefficients`` int32 ``[P]`` and ``alpha`` float32
    ``[O]`` such that ``weight[o] == alpha[o] · Σ_p coefficients[p] · signs[p, o]`` (to float32
    rounding), or None when ``weight`` is on no such grid.

    Two grids are recognised, with one scale for the layer or, failing that, one per output
    (a folded BatchNorm scales each output): ``{−a, 0, a}`` (ternary: two planes, ``c = (1, 1)``,
    ``alpha = a / 2``) and odd multiples
    of a unit ``u`` up to ``(2^P − 1)·u`` (DoReFa's symmetric k-bit grid, binary ±α included:
    ``c = (1, 2, …, 2^(P−1))``, ``alpha = u``).

    >>> s, c, a = weight_planes(np.array([[1.0, -1 / 3], [1 / 3, -1.0]]))
    >>> c.tolist(), a.tolist() == [np.float32(1 / 3)] * 2, (a[:, None] * np.tensordot(c, s, 1)).round(4).tolist()
    ([1, 2], True, [[1.0, -0.3333], [0.3333, -1.0]])
    """
    w = np.asarray(weight, np.float64)
    rows = w.reshape(w.shape[0], -1)
    if np.unique(rows).size > 2 ** (max_bits + 1):          # float weights: no grid to look for
        return None
    mag = np.abs(rows)
    if not mag.any():
        return None
    top = mag.max(axis=1)
    if (mag == 0).any() and np.all((mag == 0) | np.isclose(mag, top[:, None], rtol=1e-6, atol=0)):
        # ternary, {−a, 0, a} with a per output (one value when the layer has one scale): (s0 + s1) / 2
        a = np.full_like(top, top.max()) if np.allclose(top[top > 0], top.max(), rtol=1e-6) else top
        t = np.sign(w)
        signs = np.stack([np.where(t < 0, -1.0, 1.0), np.where(t > 0, 1.0, -1.0)]).astype(np.float32)
        return signs, np.array([1, 1], np.int32), (a / 2).astype(np.float32)
    found = _odd_codes(rows.ravel(), max_bits)
    if found is not None:
        units, codes = np.full(w.shape[0], found[0]), found[1].reshape(rows.shape)
    else:
        per_row = [_odd_codes(r, max_bits) for r in rows]
        if any(f is None for f in per_row):
            return None
        units = np.array([f[0] for f in per_row])
        codes = np.stack([f[1] for f in per_row])
    planes = max(1, int(np.ceil(np.log2(np.abs(codes).max() + 1))))
    u = (codes + (2 ** planes - 1)) // 2                     # in [0, 2^P − 1]; Σ 2^i (2 b_i − 1) = codes
    signs = np.stack([np.where((u >> i) & 1, 1.0, -1.0).reshape(w.shape) for i in range(planes)])
    return signs.astype(np.float32), (2 ** np.arange(planes)).astype(np.int32), units.astype(np.float32)
