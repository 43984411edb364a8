"""numpy reference of the binary-popcount runtime.

Written independently of the C kernels so the two can check each other:
binary convs here sum each kernel tap separately and give padded taps 0
(instead of im2col + a correction), binary products use ``np.bitwise_count``,
and float ops are plain numpy.  Integer results (the popcount dot products)
must equal the C runtime's bit for bit; float results agree to rounding.

4-D activations are NHWC, packed ones ``[N, H, W, ceil(C/64)]`` (see
``packing.py`` for the bit convention); :func:`run_reference` takes and
returns torch-ordered tensors like the compiled model.  What each layer kind
computes is its :meth:`.specs.LayerSpec.reference`, which calls the functions
here.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from .packing import pack_bits, pack_code_planes, unpack_output_signs

if TYPE_CHECKING:
    from .specs import LayerSpec

_CHUNK_ELEMS = 1 << 22  # bound the temporaries of the broadcasted XOR


def sign_pack(x: np.ndarray, threshold: np.ndarray | None = None) -> np.ndarray:
    """Binarize ``x[..., C]`` (-1 where ``x < threshold``, default 0) and pack
    along the last axis into uint64 ``[..., ceil(C/64)]``."""
    x = np.asarray(x, dtype=np.float32)
    return pack_bits(x < (0 if threshold is None else np.asarray(threshold, np.float32)))


def binary_gemm(a: np.ndarray, b: np.ndarray, k_bits: int) -> np.ndarray:
    """int32 ``[M, N]`` dot products of +-1 rows: ``k_bits - 2*popcount(a ^ b)``
    for packed ``a [M, Kw]`` and ``b [N, Kw]`` holding ``k_bits`` elements."""
    a = np.asarray(a, dtype=np.uint64)
    b = np.asarray(b, dtype=np.uint64)
    out = np.empty((a.shape[0], b.shape[0]), dtype=np.int32)
    step = max(1, _CHUNK_ELEMS // max(1, b.size))
    for i in range(0, a.shape[0], step):
        pc = np.bitwise_count(a[i:i + step, None, :] ^ b[None, :, :]).sum(axis=-1, dtype=np.int64)
        out[i:i + step] = k_bits - 2 * pc
    return out


def _tap_indices(size: int, out: int, k: int, stride: int, pad: int):
    """Input index per output position for tap k, clipped, and validity."""
    idx = np.arange(out) * stride - pad + k
    valid = (idx >= 0) & (idx < size)
    return np.clip(idx, 0, size - 1), valid


def binary_conv2d(x: np.ndarray, weight: np.ndarray, in_channels: int, stride: int = 1,
                  padding: int = 0) -> np.ndarray:
    """int32 NHWC binary convolution of packed ``x [N, H, W, Cw]`` with packed
    ``weight [O, kh, kw, Cw]``, zero padded: a padded position adds 0, as in
    a float conv of +-1 inputs with zero padding."""
    x = np.asarray(x, dtype=np.uint64)
    weight = np.asarray(weight, dtype=np.uint64)
    n, h, w, _ = x.shape
    o, kh, kw, _ = weight.shape
    oh, ow = (h + 2 * padding - kh) // stride + 1, (w + 2 * padding - kw) // stride + 1
    out = np.zeros((n, oh, ow, o), dtype=np.int32)
    for ky in range(kh):
        iy, vy = _tap_indices(h, oh, ky, stride, padding)
        for kx in range(kw):
            ix, vx = _tap_indices(w, ow, kx, stride, padding)
            rows = x[:, iy][:, :, ix].reshape(-1, x.shape[-1])
            dots = binary_gemm(rows, weight[:, ky, kx, :], in_channels).reshape(n, oh, ow, o)
            valid = (vy[:, None] & vx[None, :])[None, :, :, None]
            out += np.where(valid, dots, 0).astype(np.int32)
    return out


class Planes(NamedTuple):
    """A bit-plane tensor: ``kind`` "planes" (unsigned codes) or "residual" (HORQ), ``words``
    the packed ±1 planes ``[P, N, H, W, Cw]`` (``[P, N, Fw]`` for 2-D tensors), ``betas`` the
    residual planes' float32 scales ``[P, N]`` (None for codes)."""

    kind: str
    words: np.ndarray
    betas: np.ndarray | None = None


def bit_planes(x: np.ndarray, bits: int, inv_step: float) -> Planes:
    """Unsigned codes ``round(clamp(x · inv_step, 0, 2^bits − 1))`` (half to even, NaN → 0)
    of ``x [..., C]`` as ``bits`` packed ±1 planes."""
    v = np.asarray(x, np.float32) * np.float32(inv_step)
    v = np.minimum(np.where(v > 0, v, np.float32(0)), np.float32(2 ** bits - 1))
    return Planes("planes", pack_code_planes(np.rint(v).astype(np.int64), bits))


def residual_planes(x: np.ndarray, order: int) -> Planes:
    """HORQ's residual binarization of each sample of ``x [N, ...]``: ``R = x``, then per plane
    ``β = Σ|R| / count`` (summed in order, in float32, as the C runtime does), the plane
    ``sign(R)``, and ``R −= β · sign(R)``."""
    x = np.asarray(x, np.float32)
    words, betas = [], np.zeros((order, x.shape[0]), np.float32)
    r = x.copy()
    for j in range(order):
        for n in range(x.shape[0]):
            betas[j, n] = np.cumsum(np.abs(r[n]).ravel(), dtype=np.float32)[-1] / np.float32(r[n].size)
        neg = r < 0
        words.append(pack_bits(neg))
        beta = betas[j].reshape((-1,) + (1,) * (x.ndim - 1))
        r = np.where(neg, r + beta, r - beta).astype(np.float32)
    return Planes("residual", np.stack(words), betas)


def bitserial_conv2d(x: np.ndarray | Planes, weight: np.ndarray, coefficients: np.ndarray, in_channels: int,
                     stride: int = 1, padding: int = 0) -> np.ndarray:
    """The integer result of a bit-serial conv: weight planes ``[P, O, k, k, Cw]`` with integer
    ``coefficients [P]`` on a packed sign tensor (``Σ_i c_i P_i``), on unsigned code planes
    (``Σ_i c_i (Σ_j 2^j P_ij + (2^k − 1) Z_i)``, twice the code product: ``Z_i`` is the weight
    sum over the taps that are not padding) or on residual planes (one ``Σ_i c_i P_ij`` per
    plane, stacked first).  ``P_ij`` is :func:`binary_conv2d` of activation plane j with weight
    plane i, computed here tap by tap; int32."""
    coefficients = np.asarray(coefficients, np.int64)

    def product(act: np.ndarray) -> np.ndarray:
        return sum(c * binary_conv2d(act, weight[i], in_channels, stride, padding).astype(np.int64)
                   for i, c in enumerate(coefficients))

    if not isinstance(x, Planes):
        return product(x).astype(np.int32)
    if x.kind == "residual":
        return np.stack([product(plane) for plane in x.words]).astype(np.int32)
    bits = x.words.shape[0]
    acc = (2 ** bits - 1) * product(np.zeros_like(x.words[0][:1]))       # the all-(+1) image: Σ c_i Z_i
    for j, plane in enumerate(x.words):
        acc = acc + (product(plane) << j)
    return acc.astype(np.int32)


def residual_scale(acc: np.ndarray, betas: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """``alpha[o] · Σ_j β_j[n] · acc[j, n, ..., o]``, summed in j order in float32 (the C epilogue)."""
    betas = np.asarray(betas, np.float32)
    s = np.zeros(acc.shape[1:], np.float32)
    for j in range(acc.shape[0]):
        s = s + betas[j].reshape((-1,) + (1,) * (acc.ndim - 2)) * acc[j].astype(np.float32)
    return (np.asarray(alpha, np.float32) * s).astype(np.float32)


def _im2col(x: np.ndarray, k: int, stride: int, pad: int) -> np.ndarray:
    n, h, w, c = x.shape
    xp = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    oh, ow = (h + 2 * pad - k) // stride + 1, (w + 2 * pad - k) // stride + 1
    cols = np.empty((n, oh, ow, k, k, c), dtype=x.dtype)
    for ky in range(k):
        for kx in range(k):
            cols[:, :, :, ky, kx, :] = xp[:, ky:ky + stride * oh:stride, kx:kx + stride * ow:stride]
    return cols


def conv2d(x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None = None, stride: int = 1,
           padding: int = 0) -> np.ndarray:
    """Float NHWC convolution with a torch-layout weight ``[O, C, k, k]``."""
    x = np.asarray(x, dtype=np.float32)
    weight = np.asarray(weight, dtype=np.float32)
    o, c, k, _ = weight.shape
    cols = _im2col(x, k, stride, padding)
    out = cols.reshape(-1, k * k * c) @ weight.transpose(2, 3, 1, 0).reshape(k * k * c, o)
    if bias is not None:
        out += np.asarray(bias, dtype=np.float32)
    return out.reshape(cols.shape[:3] + (o,))


def linear(x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None = None) -> np.ndarray:
    """``x @ weight.T + bias`` in float32 (weight ``[O, I]``)."""
    out = np.asarray(x, dtype=np.float32) @ np.asarray(weight, dtype=np.float32).T
    return out if bias is None else out + np.asarray(bias, dtype=np.float32)


def scale_bias(x: np.ndarray, scale: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """Per-channel (last axis) ``x * scale + bias``: a folded BatchNorm."""
    return (x * np.asarray(scale, np.float32) + np.asarray(bias, np.float32)).astype(np.float32)


def mean_abs_scale(x: np.ndarray, other: np.ndarray, kernel: int = 1, stride: int = 1,
                   padding: int = 0) -> np.ndarray:
    """``x * K``: XNOR-Net's K, the mean of ``|other|`` over the channels and the
    kernel window of each output position (NHWC, zero padding counted as 0),
    or over the features of a 2-D ``other``.

    Unlike the rest of this module it sums in the C runtime's order (channels,
    then taps, sequentially) on purpose: K feeds the next Sign, so it must be
    bit-identical for the binary layers after it to agree bit for bit."""
    flat = np.ndim(other) == 2        # a linear layer: one window, all features
    x = np.asarray(x, np.float32)[:, None, None, :] if flat else np.asarray(x, np.float32)
    other = np.asarray(other, np.float32)[:, None, None, :] if flat else np.asarray(other, np.float32)
    n, h, w, c = other.shape
    a = np.zeros((n, h, w), np.float32)
    for ch in range(c):
        a = a + np.abs(other[..., ch])
    a = np.pad(a / np.float32(c), ((0, 0), (padding, padding), (padding, padding)))
    oh, ow = x.shape[1:3]
    s = np.zeros((n, oh, ow), np.float32)
    for ky in range(kernel):
        for kx in range(kernel):
            s = s + a[:, ky:ky + stride * oh:stride, kx:kx + stride * ow:stride][:, :oh, :ow]
    out = (x * (s / np.float32(kernel * kernel))[..., None]).astype(np.float32)
    return out[:, 0, 0, :] if flat else out


def _bwn_finish(acc: np.ndarray, alpha: np.ndarray, bias: np.ndarray | None) -> np.ndarray:
    out = np.asarray(alpha, np.float32) * acc
    return out if bias is None else (out + np.asarray(bias, np.float32)).astype(np.float32)


def bwn_conv2d(x: np.ndarray, signs: np.ndarray, alpha: np.ndarray, bias: np.ndarray | None = None,
               stride: int = 1, padding: int = 0) -> np.ndarray:
    """NHWC binary-weight conv of float ``x [N, H, W, C]``: ``alpha[o] * sum s x (+ bias[o])`` with
    the signs ``s`` packed ``[k, k, C, ceil(O/8)]`` (:func:`.packing.pack_output_signs`), zero padded.

    Like :func:`mean_abs_scale` it sums in the C runtime's order on purpose, in float32: per
    output, tap by tap (padded taps skipped), then channel by channel, each value added with
    its sign, so the two agree bit for bit on the same input."""
    x = np.asarray(x, np.float32)
    n, h, w, c = x.shape
    o = np.asarray(alpha).shape[0]
    s = unpack_output_signs(signs, o)                       # [k, k, C, O]
    k = s.shape[0]
    oh, ow = (h + 2 * padding - k) // stride + 1, (w + 2 * padding - k) // stride + 1
    acc = np.zeros((n, oh, ow, o), np.float32)
    for ky in range(k):
        iy, vy = _tap_indices(h, oh, ky, stride, padding)
        for kx in range(k):
            ix, vx = _tap_indices(w, ow, kx, stride, padding)
            valid = (vy[:, None] & vx[None, :])[None, :, :, None]
            rows = x[:, iy][:, :, ix]                        # [N, OH, OW, C]
            for ci in range(c):
                acc = np.where(valid, acc + rows[..., ci:ci + 1] * s[ky, kx, ci], acc)
    return _bwn_finish(acc, alpha, bias)


def bwn_linear(x: np.ndarray, signs: np.ndarray, alpha: np.ndarray, bias: np.ndarray | None = None) -> np.ndarray:
    """Binary-weight linear of float ``x [N, I]``, signs packed ``[I, ceil(O/8)]``; summed
    feature by feature in float32, the C runtime's order (see :func:`bwn_conv2d`)."""
    x = np.asarray(x, np.float32)
    s = unpack_output_signs(signs, np.asarray(alpha).shape[0])   # [I, O]
    acc = np.zeros((x.shape[0], s.shape[1]), np.float32)
    for i in range(x.shape[1]):
        acc = acc + x[:, i:i + 1] * s[i]
    return _bwn_finish(acc, alpha, bias)


def relu(x: np.ndarray) -> np.ndarray:
    """max(x, 0)."""
    return np.maximum(x, np.float32(0))


def clamp(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """``min(max(x, lo), hi)`` (torch.clamp's order: ``lo > hi`` gives ``hi``); NaN stays NaN."""
    return np.minimum(np.maximum(np.asarray(x, np.float32), np.float32(lo)), np.float32(hi))


def prelu(x: np.ndarray, slopes: np.ndarray) -> np.ndarray:
    """x where x >= 0, else slope * x (one slope, or one per last-axis channel)."""
    return np.where(x >= 0, x, x * np.asarray(slopes, np.float32)).astype(np.float32)


def max_pool2d(x: np.ndarray, kernel: int, stride: int | None = None, padding: int = 0) -> np.ndarray:
    """NHWC max pool; padding never wins."""
    stride = kernel if stride is None else stride
    xp = np.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)),
                constant_values=-np.inf)
    return _im2col(xp, kernel, stride, 0).max(axis=(3, 4)).astype(np.float32)


def avg_pool2d(x: np.ndarray, kernel: int, stride: int | None = None, padding: int = 0) -> np.ndarray:
    """NHWC average pool over kernel*kernel positions, padding counted as 0
    (torch's count_include_pad=True)."""
    stride = kernel if stride is None else stride
    cols = _im2col(np.asarray(x, np.float32), kernel, stride, padding)
    return (cols.sum(axis=(3, 4)) * np.float32(1.0 / (kernel * kernel))).astype(np.float32)


def global_avg_pool(x: np.ndarray) -> np.ndarray:
    """NHWC ``[N, H, W, C] -> [N, 1, 1, C]`` mean."""
    return np.asarray(x, np.float32).mean(axis=(1, 2), keepdims=True, dtype=np.float32)


def position_scale(y: np.ndarray, scale_h: np.ndarray | None, scale_w: np.ndarray | None) -> np.ndarray:
    """NHWC ``y`` times ``scale_h[row]``, then times ``scale_w[column]`` (each None: no factor), one
    float32 rounding each (XNOR-Net++'s β and γ after a binary conv's α)."""
    if scale_h is not None:
        y = (y * scale_h.astype(np.float32).reshape(1, -1, 1, 1)).astype(np.float32)
    if scale_w is not None:
        y = (y * scale_w.astype(np.float32).reshape(1, 1, -1, 1)).astype(np.float32)
    return y


def run_reference(specs: Sequence[LayerSpec], x: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
    """Execute a layer spec list on ``x`` (the InputSpec shape, torch order).

    Returns the output (NCHW if 4-D) and the int32 result of every binary
    layer in layer order, NHWC ``[N, OH, OW, O]`` or ``[N, O]``: the same
    values and layout as ``CompiledModel.run_debug``.  Raises ConfigError for
    a malformed spec list, InputError for an ``x`` of another shape.  Safe to
    call from several threads: it keeps no state.
    """
    # here, not at the top: the layer kinds in .specs call this module's functions
    from .specs import infer_shapes, model_input, source_index

    infos = infer_shapes(specs)
    tensors: list[np.ndarray] = []
    popcounts: list[np.ndarray] = []
    for i, spec in enumerate(specs):
        t = model_input(x, infos[0].shape) if i == 0 else tensors[source_index(specs, i)]
        tensors.append(spec.reference(t, tensors, popcounts))
    out = tensors[-1]
    return (out.transpose(0, 3, 1, 2) if out.ndim == 4 else out), popcounts
