"""Layer specs of a binary network and the C code generator that runs them.

A network is a list of layer specs.  ``specs[0]`` is an :class:`InputSpec`;
every later spec produces tensor ``i`` (its own index) from tensor ``src``
(default: the previous one).  :class:`Add` also reads tensor ``other``, which
is how residual shortcuts and branches are written.  Logical shapes follow
torch: ``(N, C, H, W)`` or ``(N, F)``; inside the runtime, 4-D tensors are
NHWC and binary tensors are packed along channels / features (see
``packing.py`` for the bit convention).

:func:`generate_sources` emits ``model.c`` + ``model.h`` calling the kernel
library, :func:`write_weights_bin` the weight blob they read, and
``reference.run_reference`` executes the same specs in numpy, independently.
"""

from __future__ import annotations

import ctypes
import hashlib
import shutil
import struct
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sdk.errors import ConfigError, InputError, RunnerError

from .build import DEFAULT_FLAGS, aligned_empty, compile_library, kernel_sources
from .packing import channel_scales, pack_conv_weight, pack_linear_weight, words

WEIGHTS_MAGIC = b"EPBNNW01"
_HEADER = 64
_ALIGN = 64

# ---------------------------------------------------------------------------
# Layer specs


def _f32(a, name: str, ndim: int | None = None) -> np.ndarray:
    arr = np.ascontiguousarray(np.asarray(a, dtype=np.float32))
    if ndim is not None and arr.ndim != ndim:
        raise ConfigError(f"{name} must be {ndim}-D, got shape {arr.shape}")
    return arr


@dataclass(eq=False)
class InputSpec:
    """The network input, logical shape ``(N, C, H, W)`` or ``(N, F)``."""

    shape: tuple[int, ...]

    def __post_init__(self):
        self.shape = tuple(int(s) for s in self.shape)


@dataclass(eq=False)
class FloatConv:
    """Full-precision conv (first layer, shortcuts); weight ``[O, C, kh, kw]``."""

    weight: np.ndarray
    bias: np.ndarray | None = None
    stride: int = 1
    padding: int = 0
    src: int | None = None

    def __post_init__(self):
        self.weight = _f32(self.weight, "FloatConv.weight", 4)
        self.bias = None if self.bias is None else _f32(self.bias, "FloatConv.bias", 1)


@dataclass(eq=False)
class BinaryConv:
    """Binary conv on a packed tensor.  ``weight`` is packed
    ``[O, kh, kw, ceil(C/64)]`` uint64, ``alpha`` the per-output scale; the
    float output is ``alpha[o] * (+-1 conv)``, zero padded."""

    weight: np.ndarray
    alpha: np.ndarray
    in_channels: int
    stride: int = 1
    padding: int = 0
    src: int | None = None

    def __post_init__(self):
        self.weight = np.ascontiguousarray(self.weight, dtype=np.uint64)
        self.alpha = _f32(self.alpha, "BinaryConv.alpha", 1)
        if self.weight.ndim != 4 or self.weight.shape[3] != words(self.in_channels):
            raise ConfigError(f"BinaryConv.weight must be [O, kh, kw, {words(self.in_channels)}] "
                              f"for {self.in_channels} channels, got {self.weight.shape}")
        if self.alpha.shape != (self.weight.shape[0],):
            raise ConfigError(f"BinaryConv.alpha must have {self.weight.shape[0]} entries")

    @property
    def out_channels(self) -> int:
        return self.weight.shape[0]

    @property
    def kernel_size(self) -> tuple[int, int]:
        return self.weight.shape[1], self.weight.shape[2]

    @classmethod
    def from_float(cls, weight, alpha=None, stride: int = 1, padding: int = 0,
                   src: int | None = None) -> BinaryConv:
        """From a real ``[O, C, kh, kw]`` weight: sign-packed, with ``alpha``
        given, or mean |W| per output channel when None."""
        weight = np.asarray(weight)
        alpha = channel_scales(weight) if alpha is None else alpha
        return cls(pack_conv_weight(weight), alpha, weight.shape[1], stride, padding, src)


@dataclass(eq=False)
class BinaryLinear:
    """Binary fully connected layer on a packed ``(N, F)`` tensor; ``weight``
    packed ``[O, ceil(F/64)]``, output ``alpha[o] * (+-1 dot)``."""

    weight: np.ndarray
    alpha: np.ndarray
    in_features: int
    src: int | None = None

    def __post_init__(self):
        self.weight = np.ascontiguousarray(self.weight, dtype=np.uint64)
        self.alpha = _f32(self.alpha, "BinaryLinear.alpha", 1)
        if self.weight.ndim != 2 or self.weight.shape[1] != words(self.in_features):
            raise ConfigError(f"BinaryLinear.weight must be [O, {words(self.in_features)}] "
                              f"for {self.in_features} features, got {self.weight.shape}")
        if self.alpha.shape != (self.weight.shape[0],):
            raise ConfigError(f"BinaryLinear.alpha must have {self.weight.shape[0]} entries")

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    @classmethod
    def from_float(cls, weight, alpha=None, src: int | None = None) -> BinaryLinear:
        """From a real ``[O, I]`` weight (alpha defaults to mean |W| per row)."""
        weight = np.asarray(weight)
        alpha = channel_scales(weight) if alpha is None else alpha
        return cls(pack_linear_weight(weight), alpha, weight.shape[1], src)


@dataclass(eq=False)
class ScaleBias:
    """Per-channel ``x * scale + bias`` (a folded BatchNorm)."""

    scale: np.ndarray
    bias: np.ndarray
    src: int | None = None

    def __post_init__(self):
        self.scale = _f32(self.scale, "ScaleBias.scale", 1)
        self.bias = _f32(self.bias, "ScaleBias.bias", 1)


@dataclass(eq=False)
class MeanAbsScale:
    """``x * K`` with XNOR-Net's K (Rastegari et al. 2016, §3.2) computed from
    tensor ``other``, the real-valued input of the binary layer that made ``x``:
    the mean of ``|other|`` over its channels and the ``kernel`` window of each
    output position (zero padding counted as 0); over all features when
    ``other`` is 2-D."""

    other: int
    kernel: int = 1
    stride: int = 1
    padding: int = 0
    src: int | None = None


@dataclass(eq=False)
class Sign:
    """Binarize and pack: -1 where ``x < threshold`` (per channel; 0 when
    None), +1 elsewhere."""

    threshold: np.ndarray | None = None
    src: int | None = None

    def __post_init__(self):
        if self.threshold is not None:
            self.threshold = _f32(self.threshold, "Sign.threshold", 1)


@dataclass(eq=False)
class MaxPool:
    """Max pool (square window; stride defaults to the kernel)."""

    kernel: int
    stride: int | None = None
    padding: int = 0
    src: int | None = None


@dataclass(eq=False)
class AvgPool:
    """Average pool dividing by kernel*kernel (torch's count_include_pad=True)."""

    kernel: int
    stride: int | None = None
    padding: int = 0
    src: int | None = None


@dataclass(eq=False)
class ReLU:
    """max(x, 0)."""

    src: int | None = None


@dataclass(eq=False)
class PReLU:
    """x if x >= 0 else slope * x, with one slope or one per channel."""

    slopes: np.ndarray
    src: int | None = None

    def __post_init__(self):
        self.slopes = _f32(self.slopes, "PReLU.slopes", 1)


@dataclass(eq=False)
class Add:
    """Elementwise sum of tensor ``src`` and tensor ``other`` (a residual)."""

    other: int
    src: int | None = None


@dataclass(eq=False)
class GlobalAvgPool:
    """Mean over H and W: ``(N, C, H, W) -> (N, C, 1, 1)``."""

    src: int | None = None


@dataclass(eq=False)
class Flatten:
    """``(N, C, H, W) -> (N, C*H*W)`` in torch's (C, H, W) order."""

    src: int | None = None


@dataclass(eq=False)
class FloatLinear:
    """Full-precision fully connected layer; weight ``[O, I]``."""

    weight: np.ndarray
    bias: np.ndarray | None = None
    src: int | None = None

    def __post_init__(self):
        self.weight = _f32(self.weight, "FloatLinear.weight", 2)
        self.bias = None if self.bias is None else _f32(self.bias, "FloatLinear.bias", 1)


LayerSpec = (InputSpec | FloatConv | BinaryConv | BinaryLinear | ScaleBias | MeanAbsScale | Sign | MaxPool
             | AvgPool | ReLU | PReLU | Add | GlobalAvgPool | Flatten | FloatLinear)
BINARY_LAYERS = (BinaryConv, BinaryLinear)

# ---------------------------------------------------------------------------
# Shape inference


@dataclass(frozen=True)
class TensorInfo:
    """A tensor between layers: ``kind`` is "float" or "packed"; ``shape`` is
    logical (torch order)."""

    kind: str
    shape: tuple[int, ...]

    @property
    def channels(self) -> int:
        return self.shape[1]

    @property
    def rows(self) -> int:
        """Pixels (4-D) or samples (2-D): the rows of the channel-last layout."""
        return self.shape[0] * (self.shape[2] * self.shape[3] if len(self.shape) == 4 else 1)

    @property
    def nbytes(self) -> int:
        if self.kind == "packed":
            return self.rows * words(self.channels) * 8
        return int(np.prod(self.shape)) * 4


def _pool_dim(size: int, kernel: int, stride: int, pad: int) -> int:
    return (size + 2 * pad - kernel) // stride + 1


def source_index(specs: Sequence[LayerSpec], i: int) -> int:
    """Index of the tensor that layer ``i`` reads."""
    src = getattr(specs[i], "src", None)
    return i - 1 if src is None else src


def _check_window(i, name, h, w, kernel, stride, pad, pool=False):
    # torch's pools also refuse padding beyond half the window
    if kernel < 1 or stride < 1 or pad < 0 or (pool and 2 * pad > kernel):
        raise ConfigError(f"layer {i} ({name}): invalid kernel {kernel}, stride {stride}, "
                          f"padding {pad}" + (" (pools need padding <= kernel/2)" if pool else ""))
    if h + 2 * pad < kernel or w + 2 * pad < kernel:
        raise ConfigError(f"layer {i} ({name}): kernel {kernel} larger than padded input {h}x{w}")


def infer_shapes(specs: Sequence[LayerSpec]) -> list[TensorInfo]:
    """Check a spec list and return the tensor each layer produces.

    Raises ConfigError naming the layer for a malformed list: wrong source
    index, float/packed mismatch, channel count mismatch, bad window.
    """
    if not specs or not isinstance(specs[0], InputSpec):
        raise ConfigError("a layer spec list must start with an InputSpec")
    if len(specs[0].shape) not in (2, 4) or min(specs[0].shape) < 1:
        raise ConfigError(f"InputSpec.shape must be (N, C, H, W) or (N, F), got {specs[0].shape}")
    infos = [TensorInfo("float", specs[0].shape)]
    for i, spec in enumerate(specs[1:], start=1):
        name = type(spec).__name__
        if isinstance(spec, InputSpec):
            raise ConfigError(f"layer {i}: only layer 0 may be an InputSpec")
        s = source_index(specs, i)
        if not 0 <= s < i:
            raise ConfigError(f"layer {i} ({name}): src {s} must name an earlier layer")
        t = infos[s]

        def need(kind, ndim, t=t, name=name, i=i):
            if t.kind != kind or len(t.shape) != ndim:
                raise ConfigError(f"layer {i} ({name}) needs a {ndim}-D {kind} input, "
                                  f"got {t.kind} {t.shape}")

        def need_channels(n, what, t=t, name=name, i=i):
            if n != t.channels:
                raise ConfigError(f"layer {i} ({name}): {what} has {n} channels, "
                                  f"input has {t.channels}")

        if isinstance(spec, FloatConv):
            need("float", 4)
            o, c, kh, kw = spec.weight.shape
            need_channels(c, "weight")
            if kh != kw:
                raise ConfigError(f"layer {i} (FloatConv): only square kernels are supported")
            _check_window(i, name, t.shape[2], t.shape[3], kh, spec.stride, spec.padding)
            if spec.bias is not None and spec.bias.shape != (o,):
                raise ConfigError(f"layer {i} (FloatConv): bias must have {o} entries")
            out = TensorInfo("float", (t.shape[0], o,
                                       _pool_dim(t.shape[2], kh, spec.stride, spec.padding),
                                       _pool_dim(t.shape[3], kw, spec.stride, spec.padding)))
        elif isinstance(spec, BinaryConv):
            need("packed", 4)
            need_channels(spec.in_channels, "weight")
            kh, kw = spec.kernel_size
            if kh != kw:
                raise ConfigError(f"layer {i} (BinaryConv): only square kernels are supported")
            _check_window(i, name, t.shape[2], t.shape[3], kh, spec.stride, spec.padding)
            out = TensorInfo("float", (t.shape[0], spec.out_channels,
                                       _pool_dim(t.shape[2], kh, spec.stride, spec.padding),
                                       _pool_dim(t.shape[3], kw, spec.stride, spec.padding)))
        elif isinstance(spec, BinaryLinear):
            need("packed", 2)
            need_channels(spec.in_features, "weight")
            out = TensorInfo("float", (t.shape[0], spec.out_features))
        elif isinstance(spec, FloatLinear):
            need("float", 2)
            need_channels(spec.weight.shape[1], "weight")
            if spec.bias is not None and spec.bias.shape != (spec.weight.shape[0],):
                raise ConfigError(f"layer {i} (FloatLinear): bias must have "
                                  f"{spec.weight.shape[0]} entries")
            out = TensorInfo("float", (t.shape[0], spec.weight.shape[0]))
        elif isinstance(spec, ScaleBias):
            if t.kind != "float":
                raise ConfigError(f"layer {i} (ScaleBias) needs a float input")
            need_channels(spec.scale.shape[0], "scale")
            need_channels(spec.bias.shape[0], "bias")
            out = t
        elif isinstance(spec, Sign):
            if t.kind != "float":
                raise ConfigError(f"layer {i} (Sign) needs a float input")
            if spec.threshold is not None:
                need_channels(spec.threshold.shape[0], "threshold")
            out = TensorInfo("packed", t.shape)
        elif isinstance(spec, (MaxPool, AvgPool)):
            need("float", 4)
            stride = spec.kernel if spec.stride is None else spec.stride
            _check_window(i, name, t.shape[2], t.shape[3], spec.kernel, stride, spec.padding,
                          pool=True)
            out = TensorInfo("float", (t.shape[0], t.shape[1],
                                       _pool_dim(t.shape[2], spec.kernel, stride, spec.padding),
                                       _pool_dim(t.shape[3], spec.kernel, stride, spec.padding)))
        elif isinstance(spec, ReLU):
            if t.kind != "float":
                raise ConfigError(f"layer {i} (ReLU) needs a float input")
            out = t
        elif isinstance(spec, PReLU):
            if t.kind != "float":
                raise ConfigError(f"layer {i} (PReLU) needs a float input")
            if spec.slopes.shape[0] != 1:
                need_channels(spec.slopes.shape[0], "slopes")
            out = t
        elif isinstance(spec, MeanAbsScale):
            if not 0 <= spec.other < i:
                raise ConfigError(f"layer {i} (MeanAbsScale): other {spec.other} must name an earlier layer")
            u = infos[spec.other]
            if t.kind != "float" or u.kind != "float" or len(u.shape) != len(t.shape) or u.shape[0] != t.shape[0]:
                raise ConfigError(f"layer {i} (MeanAbsScale): needs float tensors of one rank and batch, "
                                  f"got {t} and {u}")
            if len(u.shape) == 4:
                _check_window(i, name, u.shape[2], u.shape[3], spec.kernel, spec.stride, spec.padding)
                window = tuple(_pool_dim(u.shape[d], spec.kernel, spec.stride, spec.padding) for d in (2, 3))
                if window != t.shape[2:]:
                    raise ConfigError(f"layer {i} (MeanAbsScale): the window of {u.shape} gives "
                                      f"{window}, the input is {t.shape[2:]}")
            elif (spec.kernel, spec.stride, spec.padding) != (1, 1, 0):
                raise ConfigError(f"layer {i} (MeanAbsScale): 2-D tensors take no window")
            out = t
        elif isinstance(spec, Add):
            if not 0 <= spec.other < i:
                raise ConfigError(f"layer {i} (Add): other {spec.other} must name an earlier layer")
            u = infos[spec.other]
            if t.kind != "float" or u != TensorInfo("float", t.shape):
                raise ConfigError(f"layer {i} (Add): needs two float tensors of one shape, "
                                  f"got {t} and {u}")
            out = t
        elif isinstance(spec, GlobalAvgPool):
            need("float", 4)
            out = TensorInfo("float", (t.shape[0], t.shape[1], 1, 1))
        elif isinstance(spec, Flatten):
            if t.kind != "float":
                raise ConfigError(f"layer {i} (Flatten) needs a float input")
            out = TensorInfo("float", (t.shape[0], int(np.prod(t.shape[1:]))))
        else:
            raise ConfigError(f"layer {i}: unknown layer spec {spec!r}")
        infos.append(out)
    if infos[-1].kind != "float":
        raise ConfigError("the last layer must produce a float tensor, not a packed one")
    return infos


def binary_output_shapes(specs: Sequence[LayerSpec]) -> list[tuple[int, ...]]:
    """Shapes of the int32 results of the binary layers, in layer order:
    NHWC ``(N, OH, OW, O)`` for convs, ``(N, O)`` for linears."""
    infos = infer_shapes(specs)
    shapes = []
    for i, spec in enumerate(specs):
        if isinstance(spec, BINARY_LAYERS):
            shape = infos[i].shape
            shapes.append((shape[0], shape[2], shape[3], shape[1]) if len(shape) == 4 else shape)
    return shapes


def layer_profile(specs: Sequence[LayerSpec]) -> list[dict]:
    """Per layer: op, input and output shapes, parameter bytes as packed, and
    MACs (full precision) or BOPs (binary multiply-accumulates)."""
    infos = infer_shapes(specs)
    rows = []
    for i, spec in enumerate(specs):
        out = infos[i]
        row = {"index": i, "op": type(spec).__name__, "output_shape": list(out.shape),
               "output_kind": out.kind, "param_bytes": 0, "macs": 0, "bops": 0}
        if i:
            row["input_shape"] = list(infos[source_index(specs, i)].shape)
        row["param_bytes"] = sum(a.nbytes for _, a in layer_arrays(spec))
        if isinstance(spec, FloatConv):
            row["macs"] = int(np.prod(out.shape)) * int(np.prod(spec.weight.shape[1:]))
        elif isinstance(spec, FloatLinear):
            row["macs"] = out.shape[0] * spec.weight.size
        elif isinstance(spec, BinaryConv):
            kh, kw = spec.kernel_size
            row["bops"] = int(np.prod(out.shape)) * spec.in_channels * kh * kw
        elif isinstance(spec, BinaryLinear):
            row["bops"] = out.shape[0] * spec.out_features * spec.in_features
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------
# Weight blob


def layer_arrays(spec: LayerSpec) -> list[tuple[str, np.ndarray]]:
    """The arrays a layer keeps in weights.bin, in the runtime's layouts."""
    if isinstance(spec, FloatConv):
        arrays = [("weight", np.ascontiguousarray(spec.weight.transpose(2, 3, 1, 0)))]
        return arrays + ([("bias", spec.bias)] if spec.bias is not None else [])
    if isinstance(spec, FloatLinear):
        arrays = [("weight", np.ascontiguousarray(spec.weight.T))]
        return arrays + ([("bias", spec.bias)] if spec.bias is not None else [])
    if isinstance(spec, (BinaryConv, BinaryLinear)):
        return [("weight", spec.weight), ("alpha", spec.alpha)]
    if isinstance(spec, ScaleBias):
        return [("scale", spec.scale), ("bias", spec.bias)]
    if isinstance(spec, Sign) and spec.threshold is not None:
        return [("threshold", spec.threshold)]
    if isinstance(spec, PReLU):
        return [("slopes", spec.slopes)]
    return []


def weight_layout(specs) -> tuple[dict[tuple[int, str], int], bytes]:
    """Offsets (from the blob start) of every array, and the payload bytes."""
    offsets, chunks, pos = {}, [], _HEADER
    for i, spec in enumerate(specs):
        for name, arr in layer_arrays(spec):
            pad = (-pos) % _ALIGN
            chunks.append(b"\0" * pad)
            pos += pad
            offsets[(i, name)] = pos
            data = arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()
            chunks.append(data)
            pos += len(data)
    return offsets, b"".join(chunks)


def _fingerprint(payload: bytes) -> int:
    return int.from_bytes(hashlib.sha256(payload).digest()[:8], "little")


def write_weights_bin(specs: Sequence[LayerSpec]) -> bytes:
    """The ``weights.bin`` blob for ``specs``.

    Layout: a 64-byte header (magic ``EPBNNW01``, uint64 total size, uint64
    fingerprint = first 8 bytes of the payload's sha256, little endian, rest
    zero), then each layer's arrays, little endian, 64-byte aligned, at the
    offsets baked into the generated model.c.  The model refuses a blob whose
    header does not match.
    """
    infer_shapes(specs)
    _, payload = weight_layout(specs)
    header = WEIGHTS_MAGIC + struct.pack("<QQ", _HEADER + len(payload), _fingerprint(payload))
    return header.ljust(_HEADER, b"\0") + payload


# ---------------------------------------------------------------------------
# Memory plan


def _plan_arena(buffers: list[tuple[int, int, int]]) -> tuple[list[int], int]:
    """First-fit offsets for (nbytes, first_step, last_step) buffers so that
    buffers alive at the same step never overlap; returns offsets and size."""
    placed: list[tuple[int, int, int, int]] = []  # offset, end, first, last
    offsets = []
    for nbytes, first, last in buffers:
        size = -(-nbytes // _ALIGN) * _ALIGN
        busy = sorted((o, e) for o, e, f, end in placed if f <= last and first <= end)
        offset = 0
        for o, e in busy:
            if offset + size <= o:
                break
            offset = max(offset, e)
        placed.append((offset, offset + size, first, last))
        offsets.append(offset)
    return offsets, max((e for _, e, _, _ in placed), default=0)


# ---------------------------------------------------------------------------
# C emission


def _c_dims(t: TensorInfo) -> tuple[int, int, int, int]:
    """(N, H, W, C) of a 4-D tensor."""
    n, c, h, w = t.shape
    return n, h, w, c


class _Emitter:
    def __init__(self, specs: Sequence[LayerSpec]):
        self.specs = list(specs)
        self.infos = infer_shapes(self.specs)
        self.weight_offsets, payload = weight_layout(self.specs)
        self.weights_bytes = _HEADER + len(payload)
        self.fingerprint = _fingerprint(payload)
        n = len(self.specs)
        last = list(range(n))
        for i in range(1, n):
            for j in (source_index(self.specs, i), getattr(self.specs[i], "other", None)):
                if j is not None:
                    last[j] = max(last[j], i)
        last[n - 1] = n  # the result is copied out after the last layer
        buffers = [(info.nbytes, i, last[i]) for i, info in enumerate(self.infos)]
        self.binary = [i for i, s in enumerate(self.specs) if isinstance(s, BINARY_LAYERS)]
        for i in self.binary:
            buffers.append((int(np.prod(self.infos[i].shape)) * 4, i, i))
        offsets, self.arena_bytes = _plan_arena(buffers)
        self.tensor_offsets = offsets[:n]
        self.scratch_offsets = dict(zip(self.binary, offsets[n:], strict=True))
        self.debug_offsets, pos = {}, 0
        for i in self.binary:
            self.debug_offsets[i] = pos
            pos += int(np.prod(self.infos[i].shape))
        self.debug_size = pos

    def t(self, i: int) -> str:
        ctype = "uint64_t" if self.infos[i].kind == "packed" else "float"
        return f"(({ctype} *)(arena + {self.tensor_offsets[i]}))"

    def w(self, i: int, name: str, ctype: str = "float") -> str:
        key = (i, name)
        if key not in self.weight_offsets:
            return "NULL"
        return f"((const {ctype} *)(wb + {self.weight_offsets[key]}))"

    def layer(self, i: int) -> tuple[list[str], str | None]:
        """C statements of layer i, and its workspace-size expression."""
        spec, out = self.specs[i], self.infos[i]
        if isinstance(spec, InputSpec):
            if len(out.shape) == 4:
                n, c, h, w = out.shape
                return [f"ep_nchw_to_nhwc_f32(input, {n}, {c}, {h}, {w}, {self.t(i)});"], None
            return [f"memcpy({self.t(i)}, input, {out.nbytes});"], None
        s = source_index(self.specs, i)
        src, t = self.t(s), self.infos[s]
        dst = self.t(i)
        if isinstance(spec, FloatConv):
            n, h, w, c = _c_dims(t)
            o, _, k, _ = spec.weight.shape
            return [f"ep_conv2d_f32({src}, {n}, {h}, {w}, {c}, {self.w(i, 'weight')}, "
                    f"{self.w(i, 'bias')}, {o}, {k}, {k}, {spec.stride}, {spec.padding}, "
                    f"{dst});"], None
        if isinstance(spec, (BinaryConv, BinaryLinear)):
            acc = f"((int32_t *)(arena + {self.scratch_offsets[i]}))"
            count = int(np.prod(out.shape))
            if isinstance(spec, BinaryConv):
                n, h, w, c = _c_dims(t)
                k, _ = spec.kernel_size
                args = (f"{n}, {h}, {w}, {c}, {spec.out_channels}, {k}, {k}, {spec.stride}, "
                        f"{spec.padding}")
                ws = f"ep_bconv2d_workspace_bytes({args})"
                call = (f"ep_bconv2d({src}, {n}, {h}, {w}, {c}, "
                        f"{self.w(i, 'weight', 'uint64_t')}, {spec.out_channels}, {k}, {k}, "
                        f"{spec.stride}, {spec.padding}, {acc}, work);")
                rows, o = out.rows, spec.out_channels
            else:
                n, f = t.shape
                o, fw = spec.out_features, words(f)
                ws = f"ep_bgemm_workspace_bytes({o}, {fw})"
                call = (f"ep_bgemm({n}, {o}, {fw}, {f}, {src}, "
                        f"{self.w(i, 'weight', 'uint64_t')}, {acc}, work);")
                rows = n
            return [call,
                    f"if (binary_outputs) memcpy(binary_outputs + {self.debug_offsets[i]}, "
                    f"{acc}, {count * 4});",
                    f"ep_scale_i32_f32({acc}, {rows}, {o}, {self.w(i, 'alpha')}, {dst});"], ws
        if isinstance(spec, FloatLinear):
            o, f = spec.weight.shape
            return [f"ep_linear_f32({src}, {t.shape[0]}, {f}, {self.w(i, 'weight')}, "
                    f"{self.w(i, 'bias')}, {o}, {dst});"], None
        if isinstance(spec, ScaleBias):
            return [f"ep_scale_bias_f32({src}, {t.rows}, {t.channels}, {self.w(i, 'scale')}, "
                    f"{self.w(i, 'bias')}, {dst});"], None
        if isinstance(spec, Sign):
            return [f"ep_bitpack_f32({src}, {t.rows}, {t.channels}, "
                    f"{self.w(i, 'threshold')}, {dst});"], None
        if isinstance(spec, (MaxPool, AvgPool)):
            n, h, w, c = _c_dims(t)
            fn = "ep_maxpool2d_f32" if isinstance(spec, MaxPool) else "ep_avgpool2d_f32"
            stride = spec.kernel if spec.stride is None else spec.stride
            return [f"{fn}({src}, {n}, {h}, {w}, {c}, {spec.kernel}, {stride}, "
                    f"{spec.padding}, {dst});"], None
        if isinstance(spec, ReLU):
            return [f"ep_relu_f32({src}, {int(np.prod(t.shape))}, {dst});"], None
        if isinstance(spec, PReLU):
            return [f"ep_prelu_f32({src}, {t.rows}, {t.channels}, {self.w(i, 'slopes')}, "
                    f"{spec.slopes.shape[0]}, {dst});"], None
        if isinstance(spec, MeanAbsScale):
            u = self.infos[spec.other]
            n, h, w, c = _c_dims(u) if len(u.shape) == 4 else (u.shape[0], 1, 1, u.shape[1])
            oh, ow = (t.shape[2], t.shape[3]) if len(t.shape) == 4 else (1, 1)
            return [f"mean_abs_scale_f32({src}, {self.t(spec.other)}, {n}, {h}, {w}, {c}, {spec.kernel}, "
                    f"{spec.stride}, {spec.padding}, {oh}, {ow}, {t.channels}, {dst}, (float *)work);"], \
                f"(size_t){n * h * w} * sizeof(float)"
        if isinstance(spec, Add):
            return [f"ep_add_f32({src}, {self.t(spec.other)}, {int(np.prod(t.shape))}, "
                    f"{dst});"], None
        if isinstance(spec, GlobalAvgPool):
            n, h, w, c = _c_dims(t)
            return [f"ep_global_avgpool_f32({src}, {n}, {h * w}, {c}, {dst});"], None
        if isinstance(spec, Flatten):
            if len(t.shape) == 4:
                n, h, w, c = _c_dims(t)
                return [f"ep_nhwc_to_nchw_f32({src}, {n}, {h}, {w}, {c}, {dst});"], None
            return [f"memcpy({dst}, {src}, {t.nbytes});"], None
        raise AssertionError(f"layer {i}: unhandled layer spec {spec!r}")

    def model_h(self) -> str:
        inp, out = self.infos[0], self.infos[-1]
        return f"""/* Generated by edgepack (binary-popcount target); do not edit. */
#ifndef EDGEPACK_MODEL_H
#define EDGEPACK_MODEL_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {{
#endif

/* float counts; input is NCHW {tuple(inp.shape)}, output {tuple(out.shape)} (NCHW if 4-D) */
#define EDGEPACK_INPUT_SIZE {int(np.prod(inp.shape))}
#define EDGEPACK_OUTPUT_SIZE {int(np.prod(out.shape))}
/* int32 results of the binary layers, concatenated in layer order (NHWC) */
#define EDGEPACK_NUM_BINARY_LAYERS {len(self.binary)}
#define EDGEPACK_BINARY_OUTPUT_SIZE {self.debug_size}
#define EDGEPACK_WEIGHTS_BYTES {self.weights_bytes}

#define EDGEPACK_OK 0
#define EDGEPACK_ERR_NOMEM 1
#define EDGEPACK_ERR_WEIGHTS 2 /* foreign weights.bin, or a big-endian host */

/* Bytes of scratch memory one run allocates (and frees before returning). */
size_t edgepack_model_arena_bytes(void);

/* Run the network.  weights: the contents of weights.bin, 8-byte aligned.
 * Returns EDGEPACK_OK or an EDGEPACK_ERR_* code; reentrant. */
int edgepack_model_run(const float *input, float *output, const void *weights);

/* As edgepack_model_run, and also copies every binary layer's int32
 * popcount result into binary_outputs (EDGEPACK_BINARY_OUTPUT_SIZE int32s)
 * unless it is NULL. */
int edgepack_model_run_debug(const float *input, float *output, const void *weights,
                             int32_t *binary_outputs);

#ifdef __cplusplus
}}
#endif

#endif /* EDGEPACK_MODEL_H */
"""

    def model_c(self) -> str:
        body, ws_exprs = [], []
        for i, spec in enumerate(self.specs):
            stmts, ws = self.layer(i)
            body.append(f"    /* layer {i}: {type(spec).__name__} -> "
                        f"{self.infos[i].kind} {tuple(self.infos[i].shape)} */")
            body.extend("    " + s for s in stmts)
            if ws:
                ws_exprs.append(ws)
        last, out = len(self.specs) - 1, self.infos[-1]
        if len(out.shape) == 4:
            n, h, w, c = _c_dims(out)
            body.append(f"    ep_nhwc_to_nchw_f32({self.t(last)}, {n}, {h}, {w}, {c}, output);")
        else:
            body.append(f"    memcpy(output, {self.t(last)}, {out.nbytes});")
        ws_lines = "".join(f"    need = {e};\n    if (need > ws) ws = need;\n" for e in ws_exprs)
        helpers = _MEAN_ABS_SCALE_C if any(isinstance(s, MeanAbsScale) for s in self.specs) else ""
        return f"""/* Generated by edgepack (binary-popcount target); do not edit.
 * Build: cc -O3 -std=c99 -march=native -c model.c ep_*.c  (with ep_kernels.h beside). */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "ep_kernels.h"
#include "model.h"

#define TENSOR_ARENA_BYTES ((size_t){self.arena_bytes})
{helpers}
static size_t workspace_bytes(void) {{
    size_t ws = 0, need;
{ws_lines}    (void)need;
    return ws;
}}

size_t edgepack_model_arena_bytes(void) {{ return TENSOR_ARENA_BYTES + workspace_bytes() + 64; }}

static int weights_match(const unsigned char *wb) {{
    const uint16_t probe = 1;
    uint64_t size = 0, fingerprint = 0;
    int b;
    /* the arrays in weights.bin are little endian and used in place */
    if (*(const unsigned char *)&probe != 1) return 0;
    if (memcmp(wb, "{WEIGHTS_MAGIC.decode()}", 8) != 0) return 0;
    for (b = 7; b >= 0; --b) {{
        size = (size << 8) | wb[8 + b];
        fingerprint = (fingerprint << 8) | wb[16 + b];
    }}
    return size == {self.weights_bytes}ULL && fingerprint == 0x{self.fingerprint:016x}ULL;
}}

int edgepack_model_run_debug(const float *input, float *output, const void *weights,
                             int32_t *binary_outputs) {{
    const unsigned char *wb = (const unsigned char *)weights;
    unsigned char *raw, *arena;
    void *work;
    if (!weights_match(wb)) return EDGEPACK_ERR_WEIGHTS;
    raw = (unsigned char *)malloc(edgepack_model_arena_bytes());
    if (!raw) return EDGEPACK_ERR_NOMEM;
    arena = raw + ((64 - ((uintptr_t)raw & 63)) & 63);
    work = arena + TENSOR_ARENA_BYTES;
    (void)work;
    (void)binary_outputs;
{chr(10).join(body)}
    free(raw);
    return EDGEPACK_OK;
}}

int edgepack_model_run(const float *input, float *output, const void *weights) {{
    return edgepack_model_run_debug(input, output, weights, NULL);
}}
"""


# Inlined into model.c rather than kept in the kernel library: it is XNOR-Net
# specific and cheap next to the binary product.  The sums run channel by
# channel, then tap by tap, the order reference.mean_abs_scale follows, so K is
# bit-identical in both and the next Sign sees identical values.
_MEAN_ABS_SCALE_C = """
/* out = y * K, K = mean |x| over the channels and the k x k window of each
 * output position, padding counted as 0 (XNOR-Net's K).  a: h*w*batch floats. */
static void mean_abs_scale_f32(const float *y, const float *x, int batch, int h, int w, int c,
                               int k, int stride, int pad, int oh, int ow, int o, float *out,
                               float *a) {
    for (size_t p = 0; p < (size_t)batch * h * w; ++p) {
        const float *src = x + p * (size_t)c;
        float s = 0.0f;
        for (int ch = 0; ch < c; ++ch) s += src[ch] < 0.0f ? -src[ch] : src[ch];
        a[p] = s / (float)c;
    }
    for (int n = 0; n < batch; ++n)
        for (int oy = 0; oy < oh; ++oy)
            for (int ox = 0; ox < ow; ++ox) {
                const size_t row = (((size_t)n * oh + oy) * ow + ox) * o;
                float s = 0.0f, scale;
                for (int ky = 0; ky < k; ++ky) {
                    const int iy = oy * stride - pad + ky;
                    if (iy < 0 || iy >= h) continue;
                    for (int kx = 0; kx < k; ++kx) {
                        const int ix = ox * stride - pad + kx;
                        if (ix >= 0 && ix < w) s += a[((size_t)n * h + iy) * w + ix];
                    }
                }
                scale = s / (float)(k * k);
                for (int oc = 0; oc < o; ++oc) out[row + oc] = y[row + oc] * scale;
            }
}
"""


def generate_sources(specs: Sequence[LayerSpec]) -> tuple[str, str]:
    """``(model_c, model_h)`` for ``specs``: C99 calling the kernel library,
    with weight offsets and the memory plan baked in.  model.c defines
    ``edgepack_model_run(input, output, weights)`` and
    ``edgepack_model_run_debug(input, output, weights, int32_t *binary_outputs)``."""
    emitter = _Emitter(specs)
    return emitter.model_c(), emitter.model_h()


def write_model(specs: Sequence[LayerSpec], directory: str | Path) -> list[Path]:
    """Write a self-contained source tree: model.c, model.h, weights.bin and the
    kernel library files; returns the paths written."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model_c, model_h = generate_sources(specs)
    written = []
    for name, data in (("model.c", model_c.encode()), ("model.h", model_h.encode()),
                       ("weights.bin", write_weights_bin(specs))):
        (directory / name).write_bytes(data)
        written.append(directory / name)
    for src in kernel_sources():
        shutil.copyfile(src, directory / src.name)
        written.append(directory / src.name)
    return written


# ---------------------------------------------------------------------------
# Running a generated model in-process

_ERRORS = {1: "out of memory",
           2: "weights.bin does not belong to this model (or the host is big endian)"}


def model_input(x, shape: tuple[int, ...]) -> np.ndarray:
    """``x`` as the contiguous float32 array of ``shape`` that a model takes.

    Raises InputError for anything else."""
    try:
        arr = np.ascontiguousarray(x, dtype=np.float32)
    except (TypeError, ValueError) as exc:
        raise InputError(f"model input must be a float32 array of shape {tuple(shape)}: {exc}") from None
    if arr.shape != tuple(shape):
        raise InputError(f"model input must have shape {tuple(shape)}, got {arr.shape}")
    return arr


class CompiledModel:
    """A generated model compiled for this machine and loaded with ctypes.

    One instance serves several threads at once: each call has its own input,
    output and debug buffers, the C model allocates its arena per call, and the
    weights are only read."""

    def __init__(self, lib: ctypes.CDLL, specs: Sequence[LayerSpec], weights: bytes):
        self.lib = lib
        self.infos = infer_shapes(specs)
        self.binary_shapes = binary_output_shapes(specs)
        for fn in (lib.edgepack_model_run, lib.edgepack_model_run_debug):
            fn.restype = ctypes.c_int
        lib.edgepack_model_run.argtypes = [ctypes.c_void_p] * 3
        lib.edgepack_model_run_debug.argtypes = [ctypes.c_void_p] * 4
        self.weights = aligned_empty(len(weights))
        self.weights[:] = np.frombuffer(weights, dtype=np.uint8)

    def _call(self, x: np.ndarray, debug: bool):
        x = model_input(x, self.infos[0].shape)
        out = np.empty(self.infos[-1].shape, dtype=np.float32)
        ptrs = [x.ctypes.data, out.ctypes.data, self.weights.ctypes.data]
        if debug:
            binary = np.empty(sum(int(np.prod(s)) for s in self.binary_shapes), dtype=np.int32)
            rc = self.lib.edgepack_model_run_debug(*ptrs, binary.ctypes.data)
        else:
            binary, rc = None, self.lib.edgepack_model_run(*ptrs)
        if rc:
            raise RunnerError(f"edgepack_model_run failed with code {rc}: "
                              f"{_ERRORS.get(rc, 'unknown error')}")
        return out, binary

    def run(self, x: np.ndarray) -> np.ndarray:
        """Output of the network for input ``x`` (float32, the InputSpec shape)."""
        return self._call(x, debug=False)[0]

    def run_debug(self, x: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
        """Output plus each binary layer's int32 result (NHWC, layer order)."""
        out, flat = self._call(x, debug=True)
        results, pos = [], 0
        for shape in self.binary_shapes:
            size = int(np.prod(shape))
            results.append(flat[pos:pos + size].reshape(shape))
            pos += size
        return out, results


def compile_model(specs: Sequence[LayerSpec], *, cc: str | None = None,
                  flags: Sequence[str] = DEFAULT_FLAGS, march: str | None = "native",
                  cache_dir: str | Path | None = None) -> CompiledModel:
    """Generate, compile (cached) and load ``specs`` as a :class:`CompiledModel`."""
    model_c, model_h = generate_sources(specs)
    with tempfile.TemporaryDirectory(prefix="edgepack_model_") as tmp:
        (Path(tmp) / "model.c").write_text(model_c)
        (Path(tmp) / "model.h").write_text(model_h)
        lib = compile_library([Path(tmp) / "model.c", Path(tmp) / "model.h", *kernel_sources()],
                              cc=cc, flags=flags, march=march, cache_dir=cache_dir)
    return CompiledModel(lib, specs, write_weights_bin(specs))
