"""The layer kinds of a binary network: one class per kind, and :data:`LAYER_KINDS`, the table of them.

A network is a list of layer specs.  ``specs[0]`` is an :class:`InputSpec`;
every later spec produces tensor ``i`` (its own index) from tensor ``src``
(default: the previous one).  :class:`Add` and :class:`MeanAbsScale` also read
tensor ``other``, which is how residual shortcuts and branches are written.
Logical shapes follow torch: ``(N, C, H, W)`` or ``(N, F)``; inside the
runtime, 4-D tensors are NHWC and binary tensors are packed along channels /
features (see ``packing.py`` for the bit convention).

Everything that differs between layer kinds is on the kind's class, so a new
kind is one class here and one entry in :data:`LAYER_KINDS`:

=================  ==============================================================
``STORED``         the arrays it keeps in ``weights.bin``: dtype, rank and the
                   transpose into the runtime's layout (:mod:`.blob` packs them
                   through :meth:`~LayerSpec.arrays`, :mod:`.runners` reads them
                   back from an artifact)
``__post_init__``  its fields, converted and checked when the spec is made
``infer``          the tensor it makes of its input, or a ConfigError
``cost``           its multiply-accumulates, float or binary, for the profile
``emit``           its C statements (:mod:`.emit` places them in model.c)
``reference``      its numpy semantics, from :mod:`.reference`'s functions
=================  ==============================================================

What the kinds share stays with its concern: :func:`infer_shapes` here, the
blob's header and alignment in :mod:`.blob`, the memory plan and the frame of
model.c in :mod:`.emit`, compiling and loading in :mod:`.build`.

>>> specs = [InputSpec((1, 64)), Sign(), BinaryLinear.from_float(np.ones((4, 64)))]
>>> infer_shapes(specs)[-1]
TensorInfo(kind='float', shape=(1, 4), planes=1)
"""

from __future__ import annotations

import abc
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, NamedTuple

import numpy as np

from sdk.errors import ConfigError, InputError

from . import reference as ref
from .packing import channel_scales, pack_conv_weight, pack_linear_weight, pack_output_signs, sign_bytes, words

if TYPE_CHECKING:
    from .emit import LayerCode

# ---------------------------------------------------------------------------
# What the kinds are described with


@dataclass(frozen=True)
class TensorInfo:
    """A tensor between layers: ``kind`` is "float", "packed" (one ±1 plane, the
    output of :class:`Sign`), "planes" (``planes`` ±1 planes of unsigned codes,
    :class:`BitPlanes`) or "residual" (``planes`` ±1 planes and their
    per-sample scales, :class:`ResidualSign`); ``shape`` is logical (torch order)."""

    kind: str
    shape: tuple[int, ...]
    planes: int = 1

    @property
    def binary(self) -> bool:
        """Bit-packed: what only binary and bit-serial layers read."""
        return self.kind != "float"

    @property
    def channels(self) -> int:
        return self.shape[1]

    @property
    def size(self) -> int:
        """Logical elements."""
        return math.prod(self.shape)

    @property
    def rows(self) -> int:
        """Pixels (4-D) or samples (2-D): the rows of the channel-last layout."""
        return self.shape[0] * (self.shape[2] * self.shape[3] if len(self.shape) == 4 else 1)

    @property
    def nhwc(self) -> tuple[int, int, int, int]:
        """(N, H, W, C) of the channel-last layout; a 2-D ``(N, F)`` tensor is ``(N, 1, 1, F)``."""
        if len(self.shape) == 2:
            return self.shape[0], 1, 1, self.shape[1]
        n, c, h, w = self.shape
        return n, h, w, c

    @property
    def plane_words(self) -> int:
        """uint64 words of one plane."""
        return self.rows * words(self.channels)

    @property
    def nbytes(self) -> int:
        if self.kind == "packed":
            return self.plane_words * 8
        if self.kind == "planes":
            return self.planes * self.plane_words * 8
        if self.kind == "residual":   # the planes, then float32 betas [planes][N]
            return self.planes * self.plane_words * 8 + self.planes * self.shape[0] * 4
        return self.size * 4


class Stored(NamedTuple):
    """How one array of a spec lies in ``weights.bin``."""

    dtype: str                              # numpy's name for it as stored: little endian
    ndim: int
    layout: tuple[int, ...] | None = None   # the transpose from the spec's array to the runtime's


@dataclass(frozen=True)
class InferContext:
    """What :meth:`LayerSpec.infer` checks layer ``index`` against: ``input``, the
    tensor it reads, and ``infos``, every earlier one.  The helpers raise
    ConfigError naming the layer."""

    index: int
    name: str
    input: TensorInfo
    infos: Sequence[TensorInfo]

    def error(self, message: str) -> ConfigError:
        return ConfigError(f"layer {self.index} ({self.name}): {message}")

    def need(self, kind: str, ndim: int) -> None:
        t = self.input
        if t.kind != kind or len(t.shape) != ndim:
            raise ConfigError(f"layer {self.index} ({self.name}) needs a {ndim}-D {kind} input, "
                              f"got {t.kind} {t.shape}")

    def need_float(self) -> None:
        if self.input.kind != "float":
            raise ConfigError(f"layer {self.index} ({self.name}) needs a float input")

    def channels(self, n: int, what: str) -> None:
        if n != self.input.channels:
            raise self.error(f"{what} has {n} channels, input has {self.input.channels}")

    def other(self, j: int) -> TensorInfo:
        """Tensor ``j``, which must be an earlier layer's."""
        if not 0 <= j < self.index:
            raise self.error(f"other {j} must name an earlier layer")
        return self.infos[j]

    def window(self, t: TensorInfo, kernel: int, stride: int, pad: int, pool: bool = False) -> tuple[int, int]:
        """The output height and width of a square window over 4-D ``t``."""
        h, w = t.shape[2], t.shape[3]
        # torch's pools also refuse padding beyond half the window
        if kernel < 1 or stride < 1 or pad < 0 or (pool and 2 * pad > kernel):
            raise self.error(f"invalid kernel {kernel}, stride {stride}, padding {pad}"
                             + (" (pools need padding <= kernel/2)" if pool else ""))
        if h + 2 * pad < kernel or w + 2 * pad < kernel:
            raise self.error(f"kernel {kernel} larger than padded input {h}x{w}")
        return (h + 2 * pad - kernel) // stride + 1, (w + 2 * pad - kernel) // stride + 1


class LayerSpec(abc.ABC):
    """A layer kind: a dataclass of its fields, plus what each concern needs of it.

    ``STORED`` names the ndarray fields that go to ``weights.bin``, in the order
    they are laid out there; a field that is None is left out.
    """

    STORED: ClassVar[dict[str, Stored]] = {}
    #: C this kind's statements call, emitted once into every model.c that has the kind
    C_HELPER: ClassVar[str] = ""

    def __post_init__(self):
        for name, stored in self.STORED.items():
            value = getattr(self, name)
            if value is not None:
                arr = np.ascontiguousarray(np.asarray(value, dtype=stored.dtype))
                if arr.ndim != stored.ndim:
                    raise ConfigError(f"{type(self).__name__}.{name} must be {stored.ndim}-D, got shape {arr.shape}")
                setattr(self, name, arr)

    def arrays(self) -> list[tuple[str, np.ndarray]]:
        """The arrays this layer keeps in weights.bin, in the runtime's layouts."""
        out = []
        for name, stored in self.STORED.items():
            value = getattr(self, name)
            if value is not None:
                out.append((name, np.ascontiguousarray(value.transpose(stored.layout)) if stored.layout else value))
        return out

    @abc.abstractmethod
    def infer(self, ctx: InferContext) -> TensorInfo:
        """The tensor this layer makes of ``ctx.input``; ConfigError (``ctx``'s helpers) when it cannot."""

    def cost(self, out: TensorInfo) -> tuple[int, int]:
        """``(macs, bops)``: full-precision and binary multiply-accumulates that make ``out``."""
        return 0, 0

    @abc.abstractmethod
    def emit(self, c: LayerCode) -> tuple[list[str], str | None]:
        """The C statements of this layer, and an expression of the workspace bytes they need (or None)."""

    @abc.abstractmethod
    def reference(self, x: np.ndarray, tensors: list[np.ndarray], popcounts: list[np.ndarray]) -> np.ndarray:
        """This layer's output, in numpy, for input ``x`` (channel last) and the earlier ``tensors``;
        a binary layer also appends its int32 product to ``popcounts``."""


def _check_bias(ctx: InferContext, bias: np.ndarray | None, outputs: int) -> None:
    if bias is not None and bias.shape != (outputs,):
        raise ctx.error(f"bias must have {outputs} entries")


# ---------------------------------------------------------------------------
# The kinds


@dataclass(eq=False)
class InputSpec(LayerSpec):
    """The network input, logical shape ``(N, C, H, W)`` or ``(N, F)``."""

    shape: tuple[int, ...]

    def __post_init__(self):
        self.shape = tuple(int(s) for s in self.shape)

    def infer(self, ctx):
        raise ConfigError(f"layer {ctx.index}: only layer 0 may be an InputSpec")

    def emit(self, c):
        if len(self.shape) == 4:
            n, ch, h, w = self.shape
            return [f"ep_nchw_to_nhwc_f32({c.src}, {n}, {ch}, {h}, {w}, {c.dst});"], None
        return [f"memcpy({c.dst}, {c.src}, {c.output.nbytes});"], None

    def reference(self, x, tensors, popcounts):
        """``x`` is the network input, torch order."""
        return x.transpose(0, 2, 3, 1) if x.ndim == 4 else x


@dataclass(eq=False)
class FloatConv(LayerSpec):
    """Full-precision conv (first layer, shortcuts); weight ``[O, C, kh, kw]``."""

    STORED = {"weight": Stored("<f4", 4, (2, 3, 1, 0)), "bias": Stored("<f4", 1)}

    weight: np.ndarray
    bias: np.ndarray | None = None
    stride: int = 1
    padding: int = 0
    src: int | None = None

    def infer(self, ctx):
        ctx.need("float", 4)
        o, c, kh, kw = self.weight.shape
        ctx.channels(c, "weight")
        if kh != kw:
            raise ctx.error("only square kernels are supported")
        oh, ow = ctx.window(ctx.input, kh, self.stride, self.padding)
        _check_bias(ctx, self.bias, o)
        return TensorInfo("float", (ctx.input.shape[0], o, oh, ow))

    def cost(self, out):
        return out.size * math.prod(self.weight.shape[1:]), 0

    def emit(self, c):
        n, h, w, ch = c.input.nhwc
        o, _, k, _ = self.weight.shape
        return [f"ep_conv2d_f32({c.src}, {n}, {h}, {w}, {ch}, {c.array('weight')}, {c.array('bias')}, {o}, {k}, "
                f"{k}, {self.stride}, {self.padding}, {c.dst});"], None

    def reference(self, x, tensors, popcounts):
        return ref.conv2d(x, self.weight, self.bias, self.stride, self.padding)


#: the width of a codebook value's code in :class:`CodebookConv` (Kernel Quantization's 6 bits)
CODEBOOK_CODE_BITS = 6


def _pack_fields(values: np.ndarray, width: int) -> np.ndarray:
    """Unsigned ``width``-bit fields as one bit stream in uint8 bytes: field ``i`` takes bits
    ``[i·width, (i+1)·width)``, least significant first, stream bit ``b`` being bit ``b % 8``
    of byte ``b // 8``; the last byte is zero padded.

    >>> _pack_fields(np.array([1, 2, 3]), 4).tolist()   # 0x21, 0x03
    [33, 3]
    """
    v = np.asarray(values, np.uint64).reshape(-1)
    bits = ((v[:, None] >> np.arange(width, dtype=np.uint64)) & np.uint64(1)).astype(np.uint8)
    return np.packbits(bits.reshape(-1), bitorder="little")


def _unpack_fields(stream: np.ndarray, width: int, count: int) -> np.ndarray:
    """The first ``count`` fields of :func:`_pack_fields`'s stream, int64."""
    bits = np.unpackbits(np.asarray(stream, np.uint8), count=count * width, bitorder="little")
    return (bits.reshape(count, width).astype(np.int64) << np.arange(width)).sum(1)


def _grid(values: np.ndarray) -> tuple[np.float32, np.ndarray] | None:
    """``(scale, codes)`` with ``float32(scale) * codes == values`` exactly, the codes integers of
    :data:`CODEBOOK_CODE_BITS` two's complement bits; None when no such grid holds ``values``.

    The scale is ``max |v| / m`` for the code ``m`` of the largest magnitude (or a float32
    neighbour of it: the quantizer rounded ``m · scale`` once), so only those are tried."""
    values = np.asarray(values, np.float32)
    top = float(np.abs(values).max(initial=0))
    if top == 0:
        return np.float32(1), np.zeros(values.shape, np.int64)
    lim = 2 ** (CODEBOOK_CODE_BITS - 1)
    for m in range(1, lim + 1):
        s0 = np.float32(top / m)
        for s in (s0, np.nextafter(s0, np.float32(np.inf)), np.nextafter(s0, np.float32(0))):
            codes = np.rint(values / s)
            if codes.min() >= -lim and codes.max() < lim and np.array_equal(s * codes.astype(np.float32), values):
                return s, codes.astype(np.int64)
    return None


# Inlined into model.c (the C_HELPER mechanism, like MeanAbsScale's): decoding the kernel
# codebook is this layer kind's own business; the conv is the library's float kernel.
_CODEBOOK_CONV_C = """
/* Field i of a bit stream: bits [i*width, (i+1)*width), least significant first, stream bit b
 * being bit b % 8 of byte b / 8.  width <= 8, so a field spans at most two bytes. */
static unsigned codebook_field(const uint8_t *stream, size_t i, int width) {
    const size_t bit = i * (size_t)width;
    const int shift = (int)(bit & 7);
    unsigned v = (unsigned)stream[bit >> 3] >> shift;
    if (shift + width > 8) v |= (unsigned)stream[(bit >> 3) + 1] << (8 - shift);
    return v & ((1u << width) - 1u);
}

/* Kernel-codebook conv: kernel (oc, ci) is codebook entry indices[oc * c + ci] (index_bits
 * wide), each entry k*k 6-bit two's complement codes (ky, kx order) times scale[0].  The weight
 * is decoded into w, [k][k][c][o] as ep_conv2d_f32 takes it (k*k*c*o floats), then convolved. */
static void codebook_conv2d_f32(const float *x, int batch, int h, int wd, int c, const uint8_t *indices,
                                int index_bits, const uint8_t *codes, const float *scale, const float *bias,
                                int o, int k, int stride, int pad, float *out, float *w) {
    const size_t taps = (size_t)k * k;
    for (int oc = 0; oc < o; ++oc)
        for (int ci = 0; ci < c; ++ci) {
            const size_t entry = codebook_field(indices, (size_t)oc * c + ci, index_bits);
            for (size_t t = 0; t < taps; ++t) {
                const int q = (int)codebook_field(codes, entry * taps + t, 6);
                w[(t * c + ci) * o + oc] = scale[0] * (float)(q >= 32 ? q - 64 : q);
            }
        }
    ep_conv2d_f32(x, batch, h, wd, c, w, bias, o, k, k, stride, pad, out);
}
"""


@dataclass(eq=False)
class CodebookConv(LayerSpec):
    """Kernel-codebook conv (Kernel Quantization, Yu et al. 2020) on a float tensor: each of the
    ``O·C`` k×k kernels is one of ``entries`` codebook kernels, whose values are 6-bit codes on
    one grid, ``scale · code``.

    ``indices``: the entry of kernel ``(o, c)`` at field ``o·C + c``, ``index_bits`` wide;
    ``codes``: entry ``e``'s k×k codes (ky, kx order) at fields ``e·k² ..``, 6-bit two's
    complement; both uint8 bit streams (:func:`_pack_fields`).  ``scale``: float32 ``[1]``.
    model.c decodes the weight into the workspace and runs ``ep_conv2d_f32``; the reference
    decodes it (:meth:`weight`) and runs FloatConv's conv, so the two agree to float rounding.
    """

    C_HELPER = _CODEBOOK_CONV_C
    STORED = {"indices": Stored("|u1", 1), "codes": Stored("|u1", 1), "scale": Stored("<f4", 1),
              "bias": Stored("<f4", 1)}
    #: most weights a layer may decode (the workspace holds them as float32)
    MAX_WEIGHTS = 1 << 27

    indices: np.ndarray
    codes: np.ndarray
    scale: np.ndarray
    out_channels: int
    in_channels: int
    kernel: int
    entries: int
    index_bits: int
    bias: np.ndarray | None = None
    stride: int = 1
    padding: int = 0
    src: int | None = None

    def __post_init__(self):
        super().__post_init__()
        o, c, k, e, b = self.out_channels, self.in_channels, self.kernel, self.entries, self.index_bits
        if min(o, c, k) < 1 or not 1 <= b <= 8 or not 1 <= e <= 2 ** b or o * c * k * k > self.MAX_WEIGHTS:
            raise ConfigError(f"CodebookConv needs positive channels and kernel, at most {self.MAX_WEIGHTS} weights, "
                              f"index_bits 1 to 8 and 1 to 2^index_bits entries; got out_channels {o}, in_channels "
                              f"{c}, kernel {k}, index_bits {b}, entries {e}")
        sizes = {"indices": -(-o * c * b // 8), "codes": -(-e * k * k * CODEBOOK_CODE_BITS // 8), "scale": 1}
        for name, size in sizes.items():
            if getattr(self, name).shape != (size,):
                raise ConfigError(f"CodebookConv.{name} must have {size} entries, got shape "
                                  f"{getattr(self, name).shape}")
        if self.bias is not None and self.bias.shape != (o,):
            raise ConfigError(f"CodebookConv.bias must have {o} entries")
        # the C decoder reads codebook entry index[i] unchecked: an index past the codebook is refused here
        top = int(self.index().max())
        if top >= e:
            raise ConfigError(f"CodebookConv.indices name entries up to {top}, the codebook has {e}")

    @classmethod
    def from_codebook(cls, index, codes, scale, bias=None, stride: int = 1, padding: int = 0,
                      src: int | None = None) -> CodebookConv:
        """From ``index`` (int ``[O, C]``), ``codes`` (int ``[entries, k, k]`` in [-32, 31]) and ``scale``.

        >>> spec = CodebookConv.from_codebook(np.zeros((4, 2), int), np.ones((1, 3, 3), int), 0.5)
        >>> spec.index_bits, spec.weight()[3, 1].tolist()
        (1, [[0.5, 0.5, 0.5], [0.5, 0.5, 0.5], [0.5, 0.5, 0.5]])
        """
        index, codes = np.asarray(index), np.asarray(codes)
        lim = 2 ** (CODEBOOK_CODE_BITS - 1)
        if codes.ndim != 3 or codes.shape[1] != codes.shape[2] or codes.min() < -lim or codes.max() >= lim:
            raise ConfigError(f"CodebookConv codes must be [entries, k, k] integers in [{-lim}, {lim - 1}], got shape "
                              f"{codes.shape}, range [{codes.min()}, {codes.max()}]")
        entries, k, _ = codes.shape
        bits = max(1, math.ceil(math.log2(entries)))
        packed_codes = _pack_fields(codes.astype(np.int64) & (2 * lim - 1), CODEBOOK_CODE_BITS)
        return cls(_pack_fields(index, bits), packed_codes, np.asarray([scale], np.float32), index.shape[0],
                   index.shape[1], k, entries, bits, bias, stride, padding, src)

    @classmethod
    def from_shared_kernels(cls, weight, bias=None, stride: int = 1, padding: int = 0,
                            src: int | None = None) -> CodebookConv | None:
        """The codebook form of a real ``[O, C, k, k]`` weight, or None where it has none that pays:
        more than 256 distinct kernels, values on no 6-bit grid (:func:`_grid`), or indices and
        codebook no smaller than the float32 weight.  The decoded weight equals ``weight`` exactly."""
        weight = np.asarray(weight, np.float32)
        o, c, k, _ = weight.shape
        values, inverse = np.unique(weight, return_inverse=True)
        found = _grid(values) if values.size <= 2 ** CODEBOOK_CODE_BITS else None
        if found is None:
            return None
        scale, value_codes = found
        kernels = value_codes[inverse.reshape(-1)].reshape(o * c, k * k)
        entries, index = np.unique(kernels, axis=0, return_inverse=True)
        if len(entries) > 256:
            return None
        spec = cls.from_codebook(index.reshape(o, c), entries.reshape(-1, k, k), scale, bias, stride, padding, src)
        return spec if spec.weight_bytes < weight.nbytes else None

    @property
    def weights(self) -> int:
        """Weights of the conv: ``O·C·k·k``."""
        return self.out_channels * self.in_channels * self.kernel ** 2

    @property
    def weight_bytes(self) -> int:
        """Bytes of the indices, the codebook and its scale (the bias aside)."""
        return self.indices.nbytes + self.codes.nbytes + self.scale.nbytes

    def index(self) -> np.ndarray:
        """The entry of each kernel, int64 ``[O, C]``."""
        n = self.out_channels * self.in_channels
        return _unpack_fields(self.indices, self.index_bits, n).reshape(self.out_channels, self.in_channels)

    def codebook(self) -> np.ndarray:
        """The codes of the entries, int64 ``[entries, k, k]`` in [-32, 31]."""
        k, lim = self.kernel, 2 ** (CODEBOOK_CODE_BITS - 1)
        u = _unpack_fields(self.codes, CODEBOOK_CODE_BITS, self.entries * k * k)
        return np.where(u >= lim, u - 2 * lim, u).reshape(self.entries, k, k)

    def weight(self) -> np.ndarray:
        """The decoded float32 weight ``[O, C, k, k]``: ``scale · codebook[index]``."""
        return self.scale[0] * self.codebook()[self.index()].astype(np.float32)

    def infer(self, ctx):
        ctx.need("float", 4)
        ctx.channels(self.in_channels, "weight")
        oh, ow = ctx.window(ctx.input, self.kernel, self.stride, self.padding)
        return TensorInfo("float", (ctx.input.shape[0], self.out_channels, oh, ow))

    def cost(self, out):
        return out.size * self.in_channels * self.kernel ** 2, 0

    def emit(self, c):
        n, h, w, ch = c.input.nhwc
        return [f"codebook_conv2d_f32({c.src}, {n}, {h}, {w}, {ch}, {c.array('indices', 'uint8_t')}, "
                f"{self.index_bits}, {c.array('codes', 'uint8_t')}, {c.array('scale')}, {c.array('bias')}, "
                f"{self.out_channels}, {self.kernel}, {self.stride}, {self.padding}, {c.dst}, (float *)work);"], \
            f"(size_t){self.weights} * sizeof(float)"

    def reference(self, x, tensors, popcounts):
        return ref.conv2d(x, self.weight(), self.bias, self.stride, self.padding)


class BinaryLayer(LayerSpec):
    """A conv or linear on a packed tensor: the int32 ±1 product, times ``alpha[o]``.

    Its fields include ``weight`` (packed uint64) and ``alpha`` (float32, one per
    output).  Its int32 result also goes to ``edgepack_model_run_debug``'s
    ``binary_outputs`` and to :func:`.reference.run_reference`'s popcounts, which
    must agree bit for bit.
    """

    def results(self, inp: TensorInfo, out: TensorInfo) -> tuple[int, ...]:
        """Shape of the int32 result (``binary_outputs``, the reference's popcounts): NHWC
        ``(N, OH, OW, O)`` or ``(N, O)``."""
        return (out.shape[0], out.shape[2], out.shape[3], out.shape[1]) if len(out.shape) == 4 else out.shape

    def _check_alpha(self) -> None:
        if self.alpha.shape != (self.weight.shape[0],):
            raise ConfigError(f"{type(self).__name__}.alpha must have {self.weight.shape[0]} entries")

    @abc.abstractmethod
    def c_product(self, c: LayerCode) -> tuple[str, str]:
        """The C call writing the int32 product to ``c.acc``, and its workspace expression."""

    @abc.abstractmethod
    def popcount(self, x: np.ndarray) -> np.ndarray:
        """The int32 product, in numpy."""

    def emit(self, c):
        call, workspace = self.c_product(c)
        return [call,
                f"if (binary_outputs) memcpy(binary_outputs + {c.debug_offset}, {c.acc}, {c.output.size * 4});",
                f"ep_scale_i32_f32({c.acc}, {c.output.rows}, {self.weight.shape[0]}, {c.array('alpha')}, "
                f"{c.dst});"], workspace

    def reference(self, x, tensors, popcounts):
        acc = self.popcount(x)
        popcounts.append(acc)
        return acc.astype(np.float32) * self.alpha


@dataclass(eq=False)
class BinaryConv(BinaryLayer):
    """Binary conv on a packed tensor.  ``weight`` is packed
    ``[O, kh, kw, ceil(C/64)]`` uint64, ``alpha`` the per-output scale; the
    float output is ``alpha[o] * (+-1 conv)``, zero padded.  ``scale_h`` and
    ``scale_w`` (XNOR-Net++'s β, γ; None: none) multiply it further by a factor
    per output row, then per output column, one float32 rounding each."""

    STORED = {"weight": Stored("<u8", 4), "alpha": Stored("<f4", 1), "scale_h": Stored("<f4", 1),
              "scale_w": Stored("<f4", 1)}

    weight: np.ndarray
    alpha: np.ndarray
    in_channels: int
    stride: int = 1
    padding: int = 0
    src: int | None = None
    scale_h: np.ndarray | None = None
    scale_w: np.ndarray | None = None

    def __post_init__(self):
        super().__post_init__()
        if self.weight.shape[3] != words(self.in_channels):
            raise ConfigError(f"BinaryConv.weight must be [O, kh, kw, {words(self.in_channels)}] "
                              f"for {self.in_channels} channels, got {self.weight.shape}")
        self._check_alpha()

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

    def infer(self, ctx):
        ctx.need("packed", 4)
        ctx.channels(self.in_channels, "weight")
        kh, kw = self.kernel_size
        if kh != kw:
            raise ctx.error("only square kernels are supported")
        oh, ow = ctx.window(ctx.input, kh, self.stride, self.padding)
        for name, size, what in (("scale_h", oh, "row"), ("scale_w", ow, "column")):
            if getattr(self, name) is not None and getattr(self, name).shape != (size,):
                raise ctx.error(f"{name} must have {size} entries, one per output {what}")
        return TensorInfo("float", (ctx.input.shape[0], self.out_channels, oh, ow))

    def cost(self, out):
        kh, kw = self.kernel_size
        return 0, out.size * self.in_channels * kh * kw

    def emit(self, c):
        stmts, workspace = super().emit(c)
        if self.scale_h is None and self.scale_w is None:
            return stmts, workspace
        n, oh, ow, o = c.output.nhwc
        factors = "".join(f" * {c.array(name)}[{i}]" for name, i in (("scale_h", "oy_"), ("scale_w", "ox_"))
                          if getattr(self, name) is not None)
        # (y * β[row]) * γ[col]: the reference's (and torch's) order of the two roundings
        stmts.append(f"{{ float *y_ = {c.dst}; size_t r_ = 0; for (int n_ = 0; n_ < {n}; ++n_) "
                     f"for (int oy_ = 0; oy_ < {oh}; ++oy_) for (int ox_ = 0; ox_ < {ow}; ++ox_, ++r_) "
                     f"for (int o_ = 0; o_ < {o}; ++o_) y_[r_ * {o} + o_] = y_[r_ * {o} + o_]{factors}; }}")
        return stmts, workspace

    def reference(self, x, tensors, popcounts):
        return ref.position_scale(super().reference(x, tensors, popcounts), self.scale_h, self.scale_w)

    def c_product(self, c):
        n, h, w, ch = c.input.nhwc
        k, _ = self.kernel_size
        o, s, p = self.out_channels, self.stride, self.padding
        return (f"ep_bconv2d({c.src}, {n}, {h}, {w}, {ch}, {c.array('weight', 'uint64_t')}, {o}, {k}, {k}, {s}, "
                f"{p}, {c.acc}, work);",
                f"ep_bconv2d_workspace_bytes({n}, {h}, {w}, {ch}, {o}, {k}, {k}, {s}, {p})")

    def popcount(self, x):
        return ref.binary_conv2d(x, self.weight, self.in_channels, self.stride, self.padding)


@dataclass(eq=False)
class BinaryLinear(BinaryLayer):
    """Binary fully connected layer on a packed ``(N, F)`` tensor; ``weight``
    packed ``[O, ceil(F/64)]``, output ``alpha[o] * (+-1 dot)``."""

    STORED = {"weight": Stored("<u8", 2), "alpha": Stored("<f4", 1)}

    weight: np.ndarray
    alpha: np.ndarray
    in_features: int
    src: int | None = None

    def __post_init__(self):
        super().__post_init__()
        if self.weight.shape[1] != words(self.in_features):
            raise ConfigError(f"BinaryLinear.weight must be [O, {words(self.in_features)}] "
                              f"for {self.in_features} features, got {self.weight.shape}")
        self._check_alpha()

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    @classmethod
    def from_float(cls, weight, alpha=None, src: int | None = None) -> BinaryLinear:
        """From a real ``[O, I]`` weight (alpha defaults to mean |W| per row)."""
        weight = np.asarray(weight)
        alpha = channel_scales(weight) if alpha is None else alpha
        return cls(pack_linear_weight(weight), alpha, weight.shape[1], src)

    def infer(self, ctx):
        ctx.need("packed", 2)
        ctx.channels(self.in_features, "weight")
        return TensorInfo("float", (ctx.input.shape[0], self.out_features))

    def cost(self, out):
        return 0, out.shape[0] * self.out_features * self.in_features

    def c_product(self, c):
        n, f = c.input.shape
        o, fw = self.out_features, words(f)
        return (f"ep_bgemm({n}, {o}, {fw}, {f}, {c.src}, {c.array('weight', 'uint64_t')}, {c.acc}, work);",
                f"ep_bgemm_workspace_bytes({o}, {fw})")

    def popcount(self, x):
        return ref.binary_gemm(x, self.weight, self.in_features)


class BitSerialLayer(BinaryLayer):
    """A conv or linear with k-bit weights on a packed, bit-plane or residual tensor
    (``kernels/ep_bitserial.c``): ``weight`` holds P packed ±1 planes, the weight codes are
    ``Σ_p coefficients[p] · plane_p``, and one binary convolution multiplies every activation
    plane by every weight plane before the planes are combined in integers.  Output
    ``alpha[o] · acc`` (on bit planes ``acc`` is twice the code product: the lowering folds the
    activation step and the 1/2 into ``alpha``), on residual planes ``alpha[o] · Σ_j β_j acc_j``.
    """

    def _check_planes(self, cw: int) -> None:
        name = type(self).__name__
        if self.weight.shape[-1] != cw:
            raise ConfigError(f"{name}.weight must pack {cw} words per row, got shape {self.weight.shape}")
        if self.coefficients.shape != (self.weight.shape[0],):
            raise ConfigError(f"{name}.coefficients must have one entry per weight plane ({self.weight.shape[0]})")
        if self.alpha.shape != (self.weight.shape[1],):
            raise ConfigError(f"{name}.alpha must have {self.weight.shape[1]} entries")

    @property
    def planes(self) -> int:
        return self.weight.shape[0]

    @property
    def outputs(self) -> int:
        return self.weight.shape[1]

    def _check_input(self, ctx: InferContext, ndim: int, reduce: int) -> None:
        t = ctx.input
        if not t.binary or len(t.shape) != ndim:
            raise ctx.error(f"needs a {ndim}-D packed, bit-plane or residual input, got {t.kind} {t.shape}")
        # |acc| <= Σ|c| · (2^k − 1 + Σ 2^j) · reduce must fit int32
        a = 2 * (2 ** t.planes - 1) if t.kind == "planes" else 1
        if int(np.abs(self.coefficients).sum()) * a * reduce >= 2 ** 31:
            raise ctx.error("the bit-serial product could overflow int32: fewer bits or a smaller layer")

    def results(self, inp, out):
        shape = super().results(inp, out)
        return (inp.planes,) + shape if inp.kind == "residual" else shape

    def _geometry(self, c: LayerCode) -> tuple[int, int, int, int, int, int, int]:
        """``(n, h, w, ch, k, stride, pad)`` of the product as a conv."""
        raise NotImplementedError

    def emit(self, c):
        t = c.input
        kind = {"packed": 0, "planes": 1, "residual": 2}[t.kind]
        n, h, w, ch, k, st, pad = self._geometry(c)
        args = f"{kind}, {t.planes}, {n}, {h}, {w}, {ch}"
        geometry = f"{self.planes}, {self.outputs}, {k}, {st}, {pad}"
        results = math.prod(self.results(t, c.output))
        lines = [f"ep_bitserial_conv2d({c.src}, {args}, {c.array('weight', 'uint64_t')}, {self.planes}, "
                 f"{c.array('coefficients', 'int32_t')}, {self.outputs}, {k}, {st}, {pad}, {c.acc}, work);",
                 f"if (binary_outputs) memcpy(binary_outputs + {c.debug_offset}, {c.acc}, {results * 4});"]
        rows = c.output.rows
        if t.kind == "residual":
            betas = f"((const float *)({c.src} + {t.planes * t.plane_words}))"
            lines.append(f"ep_residual_scale_f32({c.acc}, {t.planes}, {n}, {rows // n}, {self.outputs}, {betas}, "
                         f"{c.array('alpha')}, {c.dst});")
        else:
            lines.append(f"ep_scale_i32_f32({c.acc}, {rows}, {self.outputs}, {c.array('alpha')}, {c.dst});")
        return lines, f"ep_bitserial_conv2d_workspace_bytes({args}, {geometry})"

    def c_product(self, c):
        raise NotImplementedError("BitSerialLayer.emit writes its own product")

    def reference(self, x, tensors, popcounts):
        acc = self.popcount(x)
        popcounts.append(acc)
        if isinstance(x, ref.Planes) and x.kind == "residual":
            return ref.residual_scale(acc, x.betas, self.alpha)
        return acc.astype(np.float32) * self.alpha


@dataclass(eq=False)
class BitSerialConv(BitSerialLayer):
    """Bit-serial conv; ``weight`` packed ``[P, O, k, k, ceil(C/64)]`` uint64, ``coefficients``
    int32 ``[P]``, ``alpha`` float32 ``[O]``; zero padded."""

    STORED = {"weight": Stored("<u8", 5), "coefficients": Stored("<i4", 1), "alpha": Stored("<f4", 1)}

    weight: np.ndarray
    coefficients: np.ndarray
    alpha: np.ndarray
    in_channels: int
    stride: int = 1
    padding: int = 0
    src: int | None = None

    def __post_init__(self):
        super().__post_init__()
        self._check_planes(words(self.in_channels))

    @classmethod
    def from_planes(cls, signs, coefficients, alpha, stride: int = 1, padding: int = 0,
                    src: int | None = None) -> BitSerialConv:
        """From ±1 planes ``[P, O, C, k, k]`` (:func:`.packing.weight_planes`)."""
        signs = np.asarray(signs)
        return cls(np.stack([pack_conv_weight(p) for p in signs]), coefficients, alpha, signs.shape[2], stride,
                   padding, src)

    def infer(self, ctx):
        k = self.weight.shape[2]
        self._check_input(ctx, 4, self.in_channels * k * k)
        ctx.channels(self.in_channels, "weight")
        if self.weight.shape[3] != k:
            raise ctx.error("only square kernels are supported")
        oh, ow = ctx.window(ctx.input, k, self.stride, self.padding)
        return TensorInfo("float", (ctx.input.shape[0], self.outputs, oh, ow))

    def cost(self, out):
        return 0, out.size * self.in_channels * self.weight.shape[2] ** 2 * self.planes

    def _geometry(self, c):
        n, h, w, ch = c.input.nhwc
        return n, h, w, ch, self.weight.shape[2], self.stride, self.padding

    def popcount(self, x):
        return ref.bitserial_conv2d(x, self.weight, self.coefficients, self.in_channels, self.stride, self.padding)


@dataclass(eq=False)
class BitSerialLinear(BitSerialLayer):
    """Bit-serial fully connected layer; ``weight`` packed ``[P, O, ceil(F/64)]`` uint64."""

    STORED = {"weight": Stored("<u8", 3), "coefficients": Stored("<i4", 1), "alpha": Stored("<f4", 1)}

    weight: np.ndarray
    coefficients: np.ndarray
    alpha: np.ndarray
    in_features: int
    src: int | None = None

    def __post_init__(self):
        super().__post_init__()
        self._check_planes(words(self.in_features))

    @classmethod
    def from_planes(cls, signs, coefficients, alpha, src: int | None = None) -> BitSerialLinear:
        """From ±1 planes ``[P, O, F]``."""
        signs = np.asarray(signs)
        return cls(np.stack([pack_linear_weight(p) for p in signs]), coefficients, alpha, signs.shape[2], src)

    def infer(self, ctx):
        self._check_input(ctx, 2, self.in_features)
        ctx.channels(self.in_features, "weight")
        return TensorInfo("float", (ctx.input.shape[0], self.outputs))

    def cost(self, out):
        return 0, out.shape[0] * self.outputs * self.in_features * self.planes

    def _geometry(self, c):
        n, f = c.input.shape
        return n, 1, 1, f, 1, 1, 0

    def popcount(self, x):
        if isinstance(x, ref.Planes):
            x = x._replace(words=x.words[:, :, None, None, :])
        else:
            x = x[:, None, None, :]
        acc = ref.bitserial_conv2d(x, self.weight[:, :, None, None, :], self.coefficients, self.in_features)
        return acc.reshape(acc.shape[:-3] + acc.shape[-1:])


class BinaryWeightLayer(LayerSpec):
    """A conv or linear with binary weights on a FLOAT tensor (a ``bwn`` layer,
    XNOR-Net §3.1): ``alpha[o] * sum_k s[k][o] x[k] (+ bias[o])`` with ``s = ±1``.

    Its fields include ``weight``, the signs packed one bit per weight along the
    outputs (uint8, :func:`.packing.pack_output_signs`), ``alpha`` (float32, one
    per output) and an optional float32 ``bias``.  Its product is a float sum,
    not a popcount, so it has no int32 result in ``binary_outputs``; C and
    :mod:`.reference` sum in one order and agree bit for bit on one input.
    """

    def __post_init__(self):
        super().__post_init__()
        self._check()

    @property
    def outputs(self) -> int:
        return self.alpha.shape[0]

    def _infer_conv(self, ctx: InferContext) -> TensorInfo:
        """The float NHWC output of a conv whose packed weight ends ``[..., k, k, C, ceil(O/8)]``."""
        ctx.need("float", 4)
        kh, kw, c, _ = self.weight.shape[-4:]
        ctx.channels(c, "weight")
        if kh != kw:
            raise ctx.error("only square kernels are supported")
        oh, ow = ctx.window(ctx.input, kh, self.stride, self.padding)
        return TensorInfo("float", (ctx.input.shape[0], self.outputs, oh, ow))

    def _check(self) -> None:
        name, o = type(self).__name__, self.alpha.shape[0]
        if self.weight.shape[-1] != sign_bytes(o):
            raise ConfigError(f"{name}.weight must hold {sign_bytes(o)} bytes of signs per row for the "
                              f"{o} outputs alpha gives, got shape {self.weight.shape}")
        if self.bias is not None and self.bias.shape != (o,):
            raise ConfigError(f"{name}.bias must have {o} entries")


@dataclass(eq=False)
class BwnConv(BinaryWeightLayer):
    """Binary-weight conv on a float NHWC tensor; ``weight`` packed
    ``[kh, kw, C, ceil(O/8)]`` uint8, zero padded like a float conv."""

    STORED = {"weight": Stored("|u1", 4), "alpha": Stored("<f4", 1), "bias": Stored("<f4", 1)}

    weight: np.ndarray
    alpha: np.ndarray
    bias: np.ndarray | None = None
    stride: int = 1
    padding: int = 0
    src: int | None = None

    @classmethod
    def from_float(cls, weight, alpha=None, bias=None, stride: int = 1, padding: int = 0,
                   src: int | None = None) -> BwnConv:
        """From a real ``[O, C, kh, kw]`` weight: its signs packed, with ``alpha`` given,
        or mean |W| per output channel when None."""
        weight = np.asarray(weight)
        alpha = channel_scales(weight) if alpha is None else alpha
        return cls(pack_output_signs(weight), alpha, bias, stride, padding, src)

    def infer(self, ctx):
        return self._infer_conv(ctx)

    def cost(self, out):
        kh, kw, c, _ = self.weight.shape
        return out.size * kh * kw * c, 0          # sign-selected float adds

    def emit(self, c):
        n, h, w, ch = c.input.nhwc
        k = self.weight.shape[0]
        return [f"ep_bwn_conv2d_f32({c.src}, {n}, {h}, {w}, {ch}, {c.array('weight', 'uint8_t')}, "
                f"{c.array('alpha')}, {c.array('bias')}, {self.outputs}, {k}, {k}, {self.stride}, "
                f"{self.padding}, {c.dst});"], None

    def reference(self, x, tensors, popcounts):
        return ref.bwn_conv2d(x, self.weight, self.alpha, self.bias, self.stride, self.padding)


@dataclass(eq=False)
class BwnLinear(BinaryWeightLayer):
    """Binary-weight fully connected layer on a float ``(N, F)`` tensor; ``weight``
    packed ``[F, ceil(O/8)]`` uint8."""

    STORED = {"weight": Stored("|u1", 2), "alpha": Stored("<f4", 1), "bias": Stored("<f4", 1)}

    weight: np.ndarray
    alpha: np.ndarray
    bias: np.ndarray | None = None
    src: int | None = None

    @classmethod
    def from_float(cls, weight, alpha=None, bias=None, src: int | None = None) -> BwnLinear:
        """From a real ``[O, I]`` weight (alpha defaults to mean |W| per row)."""
        weight = np.asarray(weight)
        alpha = channel_scales(weight) if alpha is None else alpha
        return cls(pack_output_signs(weight), alpha, bias, src)

    def infer(self, ctx):
        ctx.need("float", 2)
        ctx.channels(self.weight.shape[0], "weight")
        return TensorInfo("float", (ctx.input.shape[0], self.outputs))

    def cost(self, out):
        return out.shape[0] * self.outputs * self.weight.shape[0], 0

    def emit(self, c):
        n, f = c.input.shape
        return [f"ep_bwn_linear_f32({c.src}, {n}, {f}, {c.array('weight', 'uint8_t')}, {c.array('alpha')}, "
                f"{c.array('bias')}, {self.outputs}, {c.dst});"], None

    def reference(self, x, tensors, popcounts):
        return ref.bwn_linear(x, self.weight, self.alpha, self.bias)


class PlaneWeightLayer(BinaryWeightLayer):
    """A conv or linear with k-bit weights (P ±1 planes, :func:`.packing.weight_planes`) on a
    FLOAT tensor: one sign-selected sum per plane (the bwn kernels), added in plane order:
    ``Σ_p alpha[p, o] · Σ_k s_p[k][o] x[k] (+ bias[o] with plane 0)``; ``alpha[p]`` is the
    layer scale times the plane's coefficient.  Ternary weights ship as two planes."""

    @property
    def outputs(self) -> int:
        return self.alpha.shape[1]

    @property
    def planes(self) -> int:
        return self.alpha.shape[0]

    def _check(self) -> None:
        name, o = type(self).__name__, self.outputs
        if self.weight.shape[0] != self.planes or self.weight.shape[-1] != sign_bytes(o):
            raise ConfigError(f"{name}.weight must hold {self.planes} planes of {sign_bytes(o)} bytes of signs "
                              f"per row, got shape {self.weight.shape}")
        if self.bias is not None and self.bias.shape != (o,):
            raise ConfigError(f"{name}.bias must have {o} entries")

    def _plane_call(self, c: LayerCode, p: int, bias: str, dst: str) -> str:
        raise NotImplementedError

    def emit(self, c):
        size = c.output.size
        lines = [self._plane_call(c, 0, c.array("bias"), c.dst)]
        for p in range(1, self.planes):
            lines += [self._plane_call(c, p, "NULL", "(float *)work"),
                      f"ep_add_f32({c.dst}, (const float *)work, {size}, {c.dst});"]
        return lines, (f"(size_t){size} * sizeof(float)" if self.planes > 1 else None)

    def _plane_reference(self, x: np.ndarray, p: int, bias: np.ndarray | None) -> np.ndarray:
        raise NotImplementedError

    def reference(self, x, tensors, popcounts):
        out = self._plane_reference(x, 0, self.bias)
        for p in range(1, self.planes):
            out = (out + self._plane_reference(x, p, None)).astype(np.float32)
        return out

    @staticmethod
    def _plane_scales(coefficients, alpha) -> np.ndarray:
        return (np.asarray(coefficients, np.float32)[:, None] * np.asarray(alpha, np.float32)[None, :])


@dataclass(eq=False)
class PlaneWeightConv(PlaneWeightLayer):
    """k-bit-weight conv on a float NHWC tensor; ``weight`` packed ``[P, k, k, C, ceil(O/8)]``
    uint8, ``alpha`` ``[P, O]``; zero padded."""

    STORED = {"weight": Stored("|u1", 5), "alpha": Stored("<f4", 2), "bias": Stored("<f4", 1)}

    weight: np.ndarray
    alpha: np.ndarray
    bias: np.ndarray | None = None
    stride: int = 1
    padding: int = 0
    src: int | None = None

    @classmethod
    def from_planes(cls, signs, coefficients, alpha, bias=None, stride: int = 1, padding: int = 0,
                    src: int | None = None) -> PlaneWeightConv:
        """From ±1 planes ``[P, O, C, k, k]``."""
        return cls(np.stack([pack_output_signs(p) for p in np.asarray(signs)]), cls._plane_scales(coefficients, alpha),
                   bias, stride, padding, src)

    def infer(self, ctx):
        return self._infer_conv(ctx)

    def cost(self, out):
        _, kh, kw, c, _ = self.weight.shape
        return out.size * kh * kw * c * self.planes, 0

    def _plane_call(self, c, p, bias, dst):
        n, h, w, ch = c.input.nhwc
        k, plane = self.weight.shape[1], math.prod(self.weight.shape[1:])
        return (f"ep_bwn_conv2d_f32({c.src}, {n}, {h}, {w}, {ch}, {c.array('weight', 'uint8_t')} + {p * plane}, "
                f"{c.array('alpha')} + {p * self.outputs}, {bias}, {self.outputs}, {k}, {k}, {self.stride}, "
                f"{self.padding}, {dst});")

    def _plane_reference(self, x, p, bias):
        return ref.bwn_conv2d(x, self.weight[p], self.alpha[p], bias, self.stride, self.padding)


@dataclass(eq=False)
class PlaneWeightLinear(PlaneWeightLayer):
    """k-bit-weight fully connected layer on a float ``(N, F)`` tensor; ``weight`` packed
    ``[P, F, ceil(O/8)]`` uint8, ``alpha`` ``[P, O]``."""

    STORED = {"weight": Stored("|u1", 3), "alpha": Stored("<f4", 2), "bias": Stored("<f4", 1)}

    weight: np.ndarray
    alpha: np.ndarray
    bias: np.ndarray | None = None
    src: int | None = None

    @classmethod
    def from_planes(cls, signs, coefficients, alpha, bias=None, src: int | None = None) -> PlaneWeightLinear:
        """From ±1 planes ``[P, O, F]``."""
        return cls(np.stack([pack_output_signs(p) for p in np.asarray(signs)]), cls._plane_scales(coefficients, alpha),
                   bias, src)

    def infer(self, ctx):
        ctx.need("float", 2)
        ctx.channels(self.weight.shape[1], "weight")
        return TensorInfo("float", (ctx.input.shape[0], self.outputs))

    def cost(self, out):
        return out.shape[0] * self.outputs * self.weight.shape[1] * self.planes, 0

    def _plane_call(self, c, p, bias, dst):
        n, f = c.input.shape
        plane = math.prod(self.weight.shape[1:])
        return (f"ep_bwn_linear_f32({c.src}, {n}, {f}, {c.array('weight', 'uint8_t')} + {p * plane}, "
                f"{c.array('alpha')} + {p * self.outputs}, {bias}, {self.outputs}, {dst});")

    def _plane_reference(self, x, p, bias):
        return ref.bwn_linear(x, self.weight[p], self.alpha[p], bias)

@dataclass(eq=False)
class ScaleBias(LayerSpec):
    """Per-channel ``x * scale + bias`` (a folded BatchNorm)."""

    STORED = {"scale": Stored("<f4", 1), "bias": Stored("<f4", 1)}

    scale: np.ndarray
    bias: np.ndarray
    src: int | None = None

    def infer(self, ctx):
        ctx.need_float()
        ctx.channels(self.scale.shape[0], "scale")
        ctx.channels(self.bias.shape[0], "bias")
        return ctx.input

    def emit(self, c):
        t = c.input
        return [f"ep_scale_bias_f32({c.src}, {t.rows}, {t.channels}, {c.array('scale')}, {c.array('bias')}, "
                f"{c.dst});"], None

    def reference(self, x, tensors, popcounts):
        return ref.scale_bias(x, self.scale, self.bias)


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


@dataclass(eq=False)
class MeanAbsScale(LayerSpec):
    """``x * K`` with XNOR-Net's K (Rastegari et al. 2016, §3.2) computed from
    tensor ``other``, the real-valued input of the binary layer that made ``x``:
    the mean of ``|other|`` over its channels and the ``kernel`` window of each
    output position (zero padding counted as 0); over all features when
    ``other`` is 2-D."""

    C_HELPER = _MEAN_ABS_SCALE_C

    other: int
    kernel: int = 1
    stride: int = 1
    padding: int = 0
    src: int | None = None

    def infer(self, ctx):
        t, u = ctx.input, ctx.other(self.other)
        if t.kind != "float" or u.kind != "float" or len(u.shape) != len(t.shape) or u.shape[0] != t.shape[0]:
            raise ctx.error(f"needs float tensors of one rank and batch, got {t} and {u}")
        if len(u.shape) == 4:
            window = ctx.window(u, self.kernel, self.stride, self.padding)
            if window != t.shape[2:]:
                raise ctx.error(f"the window of {u.shape} gives {window}, the input is {t.shape[2:]}")
        elif (self.kernel, self.stride, self.padding) != (1, 1, 0):
            raise ctx.error("2-D tensors take no window")
        return t

    def emit(self, c):
        n, h, w, ch = c.info(self.other).nhwc
        _, oh, ow, o = c.input.nhwc
        return [f"mean_abs_scale_f32({c.src}, {c.tensor(self.other)}, {n}, {h}, {w}, {ch}, {self.kernel}, "
                f"{self.stride}, {self.padding}, {oh}, {ow}, {o}, {c.dst}, (float *)work);"], \
            f"(size_t){n * h * w} * sizeof(float)"

    def reference(self, x, tensors, popcounts):
        return ref.mean_abs_scale(x, tensors[self.other], self.kernel, self.stride, self.padding)


@dataclass(eq=False)
class Sign(LayerSpec):
    """Binarize and pack: -1 where ``x < threshold`` (per channel; 0 when
    None), +1 elsewhere."""

    STORED = {"threshold": Stored("<f4", 1)}

    threshold: np.ndarray | None = None
    src: int | None = None

    def infer(self, ctx):
        ctx.need_float()
        if self.threshold is not None:
            ctx.channels(self.threshold.shape[0], "threshold")
        return TensorInfo("packed", ctx.input.shape)

    def emit(self, c):
        t = c.input
        return [f"ep_bitpack_f32({c.src}, {t.rows}, {t.channels}, {c.array('threshold')}, {c.dst});"], None

    def reference(self, x, tensors, popcounts):
        return ref.sign_pack(x, self.threshold)


@dataclass(eq=False)
class BitPlanes(LayerSpec):
    """Unsigned ``bits``-bit activation codes ``round(clamp(x · inv_step, 0, 2^bits − 1))``
    (what ``edgepack::quantize_uniform`` computes; NaN gives 0), packed as ``bits`` ±1 planes
    for the bit-serial layers.  ``inv_step`` is one float32 in weights.bin."""

    STORED = {"inv_step": Stored("<f4", 1)}

    inv_step: np.ndarray
    bits: int
    src: int | None = None

    def __post_init__(self):
        super().__post_init__()
        if not 1 <= self.bits <= 8 or self.inv_step.shape != (1,) or not self.inv_step[0] > 0:
            raise ConfigError(f"BitPlanes needs 1 <= bits <= 8 and one positive inv_step, got {self.bits}, "
                              f"{self.inv_step.tolist()}")

    def infer(self, ctx):
        ctx.need_float()
        return TensorInfo("planes", ctx.input.shape, self.bits)

    def emit(self, c):
        t = c.input
        return [f"ep_bitplanes_f32({c.src}, {t.rows}, {t.channels}, {self.bits}, {c.array('inv_step')}[0], "
                f"{c.dst});"], None

    def reference(self, x, tensors, popcounts):
        return ref.bit_planes(x, self.bits, self.inv_step[0])


@dataclass(eq=False)
class ResidualSign(LayerSpec):
    """HORQ's order-``order`` residual binarization of each sample (``edgepack::residual_sign``):
    ``order`` packed ±1 planes and their float32 scales β, which the bit-serial layer reading
    them applies after its popcounts."""

    order: int
    src: int | None = None

    def __post_init__(self):
        if not 1 <= self.order <= 8:
            raise ConfigError(f"ResidualSign.order must be 1..8, got {self.order}")

    def infer(self, ctx):
        ctx.need_float()
        return TensorInfo("residual", ctx.input.shape, self.order)

    def emit(self, c):
        t, out = c.input, c.output
        n = t.shape[0]
        betas = f"((float *)({c.dst} + {out.planes * out.plane_words}))"
        return [f"ep_residual_planes_f32({c.src}, {n}, {t.rows // n}, {t.channels}, {self.order}, {c.dst}, "
                f"{betas}, (float *)work);"], f"(size_t){t.size // n} * sizeof(float)"

    def reference(self, x, tensors, popcounts):
        return ref.residual_planes(x, self.order)


@dataclass(eq=False)
class _Pool(LayerSpec):
    """A square-window pool; stride defaults to the kernel."""

    C_FUNCTION: ClassVar[str]

    kernel: int
    stride: int | None = None
    padding: int = 0
    src: int | None = None

    @property
    def step(self) -> int:
        return self.kernel if self.stride is None else self.stride

    def infer(self, ctx):
        ctx.need("float", 4)
        oh, ow = ctx.window(ctx.input, self.kernel, self.step, self.padding, pool=True)
        return TensorInfo("float", ctx.input.shape[:2] + (oh, ow))

    def emit(self, c):
        n, h, w, ch = c.input.nhwc
        return [f"{self.C_FUNCTION}({c.src}, {n}, {h}, {w}, {ch}, {self.kernel}, {self.step}, {self.padding}, "
                f"{c.dst});"], None


@dataclass(eq=False)
class MaxPool(_Pool):
    """Max pool (square window; stride defaults to the kernel)."""

    C_FUNCTION = "ep_maxpool2d_f32"

    def reference(self, x, tensors, popcounts):
        return ref.max_pool2d(x, self.kernel, self.stride, self.padding)


@dataclass(eq=False)
class AvgPool(_Pool):
    """Average pool dividing by kernel*kernel (torch's count_include_pad=True)."""

    C_FUNCTION = "ep_avgpool2d_f32"

    def reference(self, x, tensors, popcounts):
        return ref.avg_pool2d(x, self.kernel, self.stride, self.padding)


@dataclass(eq=False)
class ReLU(LayerSpec):
    """max(x, 0)."""

    src: int | None = None

    def infer(self, ctx):
        ctx.need_float()
        return ctx.input

    def emit(self, c):
        return [f"ep_relu_f32({c.src}, {c.input.size}, {c.dst});"], None

    def reference(self, x, tensors, popcounts):
        return ref.relu(x)


@dataclass(eq=False)
class Clamp(LayerSpec):
    """``min(max(x, lo), hi)`` elementwise with one pair of bounds for the whole
    tensor, ``bounds = [lo, hi]`` (float32; ``-inf``/``inf`` for no bound): what
    hardtanh, ReLU6 and torch.clamp with number bounds compute, in torch.clamp's
    order (``lo > hi`` gives ``hi``).  A NaN input stays NaN, as in torch; NaN
    bounds are refused.  The bounds live in weights.bin, like every other float
    of a layer, so layers.json carries only integers."""

    STORED = {"bounds": Stored("<f4", 1)}

    bounds: np.ndarray
    src: int | None = None

    def __post_init__(self):
        super().__post_init__()
        if self.bounds.shape != (2,) or np.isnan(self.bounds).any():
            raise ConfigError(f"Clamp.bounds must be [lo, hi], two numbers (-inf/inf for no bound), got "
                              f"{self.bounds.tolist()}")

    @classmethod
    def between(cls, lo: float, hi: float, src: int | None = None) -> Clamp:
        return cls(np.array([lo, hi], np.float32), src)

    @property
    def lo(self) -> float:
        return float(self.bounds[0])

    @property
    def hi(self) -> float:
        return float(self.bounds[1])

    def infer(self, ctx):
        ctx.need_float()
        return ctx.input

    def emit(self, c):
        bounds = c.array("bounds")
        return [f"ep_clamp_f32({c.src}, {c.input.size}, {bounds}[0], {bounds}[1], {c.dst});"], None

    def reference(self, x, tensors, popcounts):
        return ref.clamp(x, self.bounds[0], self.bounds[1])


@dataclass(eq=False)
class PReLU(LayerSpec):
    """x if x >= 0 else slope * x, with one slope or one per channel."""

    STORED = {"slopes": Stored("<f4", 1)}

    slopes: np.ndarray
    src: int | None = None

    def infer(self, ctx):
        ctx.need_float()
        if self.slopes.shape[0] != 1:
            ctx.channels(self.slopes.shape[0], "slopes")
        return ctx.input

    def emit(self, c):
        t = c.input
        return [f"ep_prelu_f32({c.src}, {t.rows}, {t.channels}, {c.array('slopes')}, {self.slopes.shape[0]}, "
                f"{c.dst});"], None

    def reference(self, x, tensors, popcounts):
        return ref.prelu(x, self.slopes)


@dataclass(eq=False)
class Add(LayerSpec):
    """Elementwise sum of tensor ``src`` and tensor ``other`` (a residual)."""

    other: int
    src: int | None = None

    def infer(self, ctx):
        t, u = ctx.input, ctx.other(self.other)
        if t.kind != "float" or u != TensorInfo("float", t.shape):
            raise ctx.error(f"needs two float tensors of one shape, got {t} and {u}")
        return t

    def emit(self, c):
        return [f"ep_add_f32({c.src}, {c.tensor(self.other)}, {c.input.size}, {c.dst});"], None

    def reference(self, x, tensors, popcounts):
        return (x + tensors[self.other]).astype(np.float32)


@dataclass(eq=False)
class GlobalAvgPool(LayerSpec):
    """Mean over H and W: ``(N, C, H, W) -> (N, C, 1, 1)``."""

    src: int | None = None

    def infer(self, ctx):
        ctx.need("float", 4)
        return TensorInfo("float", ctx.input.shape[:2] + (1, 1))

    def emit(self, c):
        n, h, w, ch = c.input.nhwc
        return [f"ep_global_avgpool_f32({c.src}, {n}, {h * w}, {ch}, {c.dst});"], None

    def reference(self, x, tensors, popcounts):
        return ref.global_avg_pool(x)


@dataclass(eq=False)
class Flatten(LayerSpec):
    """``(N, C, H, W) -> (N, C*H*W)`` in torch's (C, H, W) order."""

    src: int | None = None

    def infer(self, ctx):
        ctx.need_float()
        return TensorInfo("float", (ctx.input.shape[0], math.prod(ctx.input.shape[1:])))

    def emit(self, c):
        if len(c.input.shape) == 4:
            n, h, w, ch = c.input.nhwc
            return [f"ep_nhwc_to_nchw_f32({c.src}, {n}, {h}, {w}, {ch}, {c.dst});"], None
        return [f"memcpy({c.dst}, {c.src}, {c.input.nbytes});"], None

    def reference(self, x, tensors, popcounts):
        return x.transpose(0, 3, 1, 2).reshape(x.shape[0], -1) if x.ndim == 4 else x


@dataclass(eq=False)
class FloatLinear(LayerSpec):
    """Full-precision fully connected layer; weight ``[O, I]``."""

    STORED = {"weight": Stored("<f4", 2, (1, 0)), "bias": Stored("<f4", 1)}

    weight: np.ndarray
    bias: np.ndarray | None = None
    src: int | None = None

    def infer(self, ctx):
        ctx.need("float", 2)
        ctx.channels(self.weight.shape[1], "weight")
        _check_bias(ctx, self.bias, self.weight.shape[0])
        return TensorInfo("float", (ctx.input.shape[0], self.weight.shape[0]))

    def cost(self, out):
        return out.shape[0] * self.weight.size, 0

    def emit(self, c):
        o, f = self.weight.shape
        return [f"ep_linear_f32({c.src}, {c.input.shape[0]}, {f}, {c.array('weight')}, {c.array('bias')}, {o}, "
                f"{c.dst});"], None

    def reference(self, x, tensors, popcounts):
        return ref.linear(x, self.weight, self.bias)


#: every layer kind by its name, the ``type`` of a layer in an artifact's layers.json
LAYER_KINDS: dict[str, type[LayerSpec]] = {cls.__name__: cls for cls in (
    InputSpec, FloatConv, BinaryConv, BinaryLinear, BitSerialConv, BitSerialLinear, BitPlanes, ResidualSign,
    CodebookConv, BwnConv, BwnLinear, PlaneWeightConv, PlaneWeightLinear, ScaleBias, MeanAbsScale, Sign, MaxPool,
    AvgPool, ReLU, Clamp, PReLU, Add, GlobalAvgPool, Flatten, FloatLinear)}

# ---------------------------------------------------------------------------
# Networks


def source_index(specs: Sequence[LayerSpec], i: int) -> int:
    """Index of the tensor that layer ``i`` reads."""
    src = getattr(specs[i], "src", None)
    return i - 1 if src is None else src


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
        if not isinstance(spec, LayerSpec):
            raise ConfigError(f"layer {i}: unknown layer spec {spec!r}")
        name, s = type(spec).__name__, source_index(specs, i)
        if not 0 <= s < i:
            raise ConfigError(f"layer {i} ({name}): src {s} must name an earlier layer")
        infos.append(spec.infer(InferContext(i, name, infos[s], infos)))
    if infos[-1].kind != "float":
        raise ConfigError("the last layer must produce a float tensor, not a packed one")
    return infos


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


def binary_output_shapes(specs: Sequence[LayerSpec]) -> list[tuple[int, ...]]:
    """Shapes of the int32 results of the binary layers, in layer order:
    NHWC ``(N, OH, OW, O)`` for convs, ``(N, O)`` for linears."""
    infos = infer_shapes(specs)
    return [spec.results(infos[source_index(specs, i)], infos[i])
            for i, spec in enumerate(specs) if isinstance(spec, BinaryLayer)]


def layer_profile(specs: Sequence[LayerSpec]) -> list[dict]:
    """Per layer: op, input and output shapes, parameter bytes as packed, and
    MACs (full precision) or BOPs (binary multiply-accumulates)."""
    infos = infer_shapes(specs)
    rows = []
    for i, spec in enumerate(specs):
        out = infos[i]
        macs, bops = spec.cost(out)
        if isinstance(spec, BitSerialLayer):      # one binary product per pair of planes
            bops *= infos[source_index(specs, i)].planes
        row = {"index": i, "op": type(spec).__name__, "output_shape": list(out.shape), "output_kind": out.kind,
               "param_bytes": sum(a.nbytes for _, a in spec.arrays()), "macs": macs, "bops": bops}
        if i:
            row["input_shape"] = list(infos[source_index(specs, i)].shape)
        rows.append(row)
    return rows
