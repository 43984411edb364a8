"""Structural check of a ``.tflite`` flatbuffer before any runtime reads it.

LiteRT trusts the file it is given: an offset that points outside the file, a
tensor index past the end of the tensor list or a buffer shorter than its
tensor's shape is read as-is, and the process dies with SIGSEGV (a 2-byte edit
was enough).  :func:`check_model` walks the flatbuffer with its own
bounds-checked reader -- never the ``flatbuffers`` package, whose generated
accessors do no checking either -- and accepts exactly the subset of the
schema :mod:`.flatbuffer` writes:

* every offset, vtable, table, vector and string lies inside the file (and is
  aligned as the flatbuffers verifier requires); tables carry no fields that
  edgepack does not write (no custom ops, external or offset buffers, metadata,
  variable tensors, ...);
* one subgraph and one signature; opcodes are builtins of :data:`.flatbuffer.OPS`
  with their options table; every tensor index of an operator, of the subgraph
  inputs/outputs and of the signature is in range; operators run in
  topological order, each tensor has one producer, constants are never written;
* a constant tensor's buffer holds exactly ``prod(shape) * itemsize`` bytes
  (``ceil(prod(shape) / 2)`` for ``int4``, two codes a byte); shapes are
  positive and bounded; quantization has as many zero points as scales, finite
  positive scales (at most 2^20), zero points inside the tensor type ([-8, 7]
  for int4), and a per-axis count equal to the dimension on that axis; the
  requantization multipliers of int8-output ops are in the range LiteRT takes;
* ``int4`` is a constant and feeds only a weight input (input 1) of CONV_2D,
  DEPTHWISE_CONV_2D or FULLY_CONNECTED, as symmetric (zero point 0) weights
  quantized per tensor or along the output-channel axis, or a DEQUANTIZE;
* a sparse tensor (``Tensor.sparsity``) is a float32, float16, int8 or int4
  constant whose metadata its own reader checks in full: the traversal order
  permutes the ``rank + len(block_map)`` dimensions with the block dimensions
  last, the block map names distinct dimensions in increasing order, one
  metadata entry per traversed dimension, DENSE sizes equal the (blocked)
  dimension and block sizes divide it, CSR index vectors have a known union
  type, segments rise from 0 with one entry per parent node plus one and end
  at the index count, indices lie inside the dimension and rise within a
  segment, and the buffer holds exactly the values the metadata addresses.  It
  feeds DENSIFY only (float32, float16, int8; the output is the dense tensor
  of the same type, shape and quantization) -- or, with ``delegate=False``
  only, directly the weights of a FULLY_CONNECTED in the forms TFLite's
  sparse kernels take (float32 unstructured or 1x4 blocks, int8 1x16 blocks):
  XNNPACK, LiteRT's default delegate, takes such a FULLY_CONNECTED and reads
  the stored values as the dense matrix, past the end of the buffer;
* CONV_2D, DEPTHWISE_CONV_2D and FULLY_CONNECTED are float32 (float32 weights
  and bias), int8 (int8 or int4 weights, int32 bias) or, for CONV_2D and
  FULLY_CONNECTED, hybrid (dynamic range: float32 input, bias and output,
  int8 or int4 symmetric weights that are a constant -- not a DENSIFY
  output, which XNNPACK fails to prepare); DEQUANTIZE widens float16 weights,
  an int8 activation, or int8 / int4 weights (weight-only quantization,
  per-axis allowed) to float32;
* every operator's options are in range (strides, dilations and filters >= 1,
  known paddings and activations), its shape-like constant inputs are sane
  (reshape target, permutation, paddings, axes, resize size) and its stored
  output shape is the one the operator computes from its inputs;
* with ``manifest``: the model's inputs and outputs have the shapes, dtypes and
  quantization the manifest declares.

Any problem raises :class:`~sdk.errors.ArtifactError` naming it.  The check
reads the tables (and the index vectors of sparse tensors) only, constant
payloads are not copied, so it takes milliseconds even for an 11 MB ResNet-18.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass, field

import numpy as np

from sdk.errors import ArtifactError

from .flatbuffer import DTYPES, OPS, SCHEMA_VERSION

__all__ = ["CheckedModel", "RULED_OPS", "check_model", "check_file"]

# --- limits -----------------------------------------------------------------

MAX_RANK = 6                  # LiteRT's kernels handle up to 6 dimensions (most only 4 or 5)
MAX_DIM = 1 << 24
MAX_TENSOR_ELEMENTS = 1 << 28
MAX_TENSORS = 1 << 20
MAX_OPERATORS = 1 << 20
MAX_WINDOW = 1 << 16          # strides, dilations, filter sizes, depth multipliers
MAX_PAD = 1 << 16
MAX_SCALE = float(1 << 20)    # a quantization step above 1e6 is a damaged file, not a model
MAX_REQUANT = 256.0           # XNNPACK's limit on s_in*s_w/s_out, s_in/s_out (ADD) and s_a*s_b/s_out (MUL)
MAX_RATIO = float(1 << 20)    # any other int8 op: s_in/s_out and s_out/s_in (huge ones abort LiteRT)
MAX_BATCH_MATMUL_RANK = 5     # TFLite's BATCH_MATMUL kernel refuses rank 6 (XNNPACK would take it)
MAX_SPARSE_DIMS = 2 * MAX_RANK  # traversed dimensions of a sparse tensor: rank + block dimensions

# schema enums (ai_edge_litert.schema_py_generated)
_PADDINGS = {0: "SAME", 1: "VALID"}
_ACTIVATIONS = {0: "NONE", 1: "RELU", 2: "RELU_N1_TO_1", 3: "RELU6", 4: "TANH"}
_TYPE_NAME = {code: name for name, (code, _) in DTYPES.items()}
_ITEMSIZE = {code: dt.itemsize for _, (code, dt) in DTYPES.items()}
_NUMPY = {code: dt for _, (code, dt) in DTYPES.items()}
_INT_RANGE = {"int8": (-128, 127), "uint8": (0, 255), "int4": (-8, 7), "int16": (0, 0), "int32": (0, 0),
              "int64": (0, 0)}
_ACTIVATION_TYPES = {"float32", "int8"}
_CODE_TO_OP = {spec.code: name for name, spec in OPS.items()}
_QUANTIZED = ("int8", "uint8", "int16", "int4")          # tensor types that need quantization parameters

# sparsity (schema DimensionType, SparseIndexVector)
_DENSE, _SPARSE_CSR = 0, 1
_INDEX_VECTORS = {1: ("Int32Vector", "<i4"), 2: ("Uint16Vector", "<u2"), 3: ("Uint8Vector", "u1")}
_SPARSE_TYPES = {"float32", "float16", "int8", "int4"}   # a sparse constant's type
_BLOCKWISE = 2                                          # QuantizationDetails.BlockwiseQuantization
_DENSIFY_TYPES = {"float32", "float16", "int8"}          # what LiteRT's DENSIFY (and XNNPACK's folding) takes
#: (op, input) a sparse constant may feed; FULLY_CONNECTED weights only without XNNPACK (see the docstring)
_SPARSE_USES = {("DENSIFY", 0)}
_SPARSE_FC = ("FULLY_CONNECTED", 1)
#: (op, input) an int4 constant may feed
_INT4_USES = {("CONV_2D", 1), ("DEPTHWISE_CONV_2D", 1), ("FULLY_CONNECTED", 1), ("DEQUANTIZE", 0)}

#: op -> (min inputs, max inputs); every op has exactly one output
_ARITY = {
    "CONV_2D": (3, 3), "DEPTHWISE_CONV_2D": (3, 3), "FULLY_CONNECTED": (2, 3),
    "ADD": (2, 2), "SUB": (2, 2), "MUL": (2, 2), "PRELU": (2, 2),
    "AVERAGE_POOL_2D": (1, 1), "MAX_POOL_2D": (1, 1), "MEAN": (2, 2), "RESHAPE": (1, 2),
    "SOFTMAX": (1, 1), "LOGISTIC": (1, 1), "TANH": (1, 1), "HARD_SWISH": (1, 1), "RELU": (1, 1),
    "RELU6": (1, 1), "LEAKY_RELU": (1, 1), "QUANTIZE": (1, 1), "DEQUANTIZE": (1, 1),
    "CONCATENATION": (1, 1 << 12), "PAD": (2, 2), "TRANSPOSE": (2, 2), "RESIZE_NEAREST_NEIGHBOR": (2, 2),
    "RELU_N1_TO_1": (1, 1), "MINIMUM": (2, 2), "MAXIMUM": (2, 2), "SLICE": (3, 3),
    "GELU": (1, 1), "RSQRT": (1, 1), "BATCH_MATMUL": (2, 2), "RESIZE_BILINEAR": (2, 2), "DENSIFY": (1, 1),
}
_ELEMENTWISE = {"SOFTMAX", "LOGISTIC", "TANH", "HARD_SWISH", "RELU", "RELU6", "RELU_N1_TO_1", "LEAKY_RELU",
                "QUANTIZE", "DEQUANTIZE", "GELU", "RSQRT"}
#: ops edgepack writes on float32 tensors only (their data inputs and output)
_FLOAT_ONLY = {"GELU": 1, "RSQRT": 1, "BATCH_MATMUL": 2, "RESIZE_BILINEAR": 1}
_BINARY = {"ADD", "SUB", "MUL", "PRELU", "MINIMUM", "MAXIMUM"}
#: the ops fbcheck has rules for; a row added to flatbuffer.OPS needs one here (tests/targets/arm_int8/test_fbcheck.py)
RULED_OPS = frozenset(_ARITY)

# options table fields: slot -> (name, struct format); the slots of the schema
_OPTION_FIELDS = {
    "CONV_2D": {0: ("padding", "b"), 1: ("stride_w", "i"), 2: ("stride_h", "i"), 3: ("activation", "b"),
                4: ("dilation_w", "i"), 5: ("dilation_h", "i"), 6: ("quantized_bias_type", "b")},
    "DEPTHWISE_CONV_2D": {0: ("padding", "b"), 1: ("stride_w", "i"), 2: ("stride_h", "i"),
                          3: ("depth_multiplier", "i"), 4: ("activation", "b"), 5: ("dilation_w", "i"),
                          6: ("dilation_h", "i")},
    "FULLY_CONNECTED": {0: ("activation", "b"), 1: ("weights_format", "b"), 2: ("keep_num_dims", "B"),
                        3: ("asymmetric_quantize_inputs", "B"), 4: ("quantized_bias_type", "b")},
    "ADD": {0: ("activation", "b"), 1: ("pot_scale_int16", "B")},
    "SUB": {0: ("activation", "b"), 1: ("pot_scale_int16", "B")},
    "MUL": {0: ("activation", "b")},
    "AVERAGE_POOL_2D": {0: ("padding", "b"), 1: ("stride_w", "i"), 2: ("stride_h", "i"), 3: ("filter_w", "i"),
                        4: ("filter_h", "i"), 5: ("activation", "b")},
    "MAX_POOL_2D": {0: ("padding", "b"), 1: ("stride_w", "i"), 2: ("stride_h", "i"), 3: ("filter_w", "i"),
                    4: ("filter_h", "i"), 5: ("activation", "b")},
    "MEAN": {0: ("keep_dims", "B")},
    "RESHAPE": {0: ("new_shape", "[i")},
    "SOFTMAX": {0: ("beta", "f")},
    "HARD_SWISH": {},
    "LEAKY_RELU": {0: ("alpha", "f")},
    "CONCATENATION": {0: ("axis", "i"), 1: ("activation", "b")},
    "PAD": {},
    "TRANSPOSE": {},
    "RESIZE_NEAREST_NEIGHBOR": {0: ("align_corners", "B"), 1: ("half_pixel_centers", "B")},
    "MINIMUM": {},
    "MAXIMUM": {},
    "SLICE": {},
    "GELU": {0: ("approximate", "B")},
    "BATCH_MATMUL": {0: ("adj_x", "B"), 1: ("adj_y", "B"), 2: ("asymmetric_quantize_inputs", "B")},
    # slots 0, 1 are the deprecated new_height / new_width (never written)
    "RESIZE_BILINEAR": {2: ("align_corners", "B"), 3: ("half_pixel_centers", "B")},
    "DENSIFY": {},
}
#: defaults of the schema for fields left out
_OPTION_DEFAULTS = {"padding": 0, "stride_w": 0, "stride_h": 0, "activation": 0, "dilation_w": 1, "dilation_h": 1,
                    "depth_multiplier": 0, "filter_w": 0, "filter_h": 0, "weights_format": 0,
                    "keep_num_dims": 0, "asymmetric_quantize_inputs": 0, "quantized_bias_type": 0,
                    "pot_scale_int16": 1, "keep_dims": 0, "new_shape": None, "beta": 0.0, "alpha": 0.0,
                    "axis": 0, "align_corners": 0, "half_pixel_centers": 0, "approximate": 0, "adj_x": 0,
                    "adj_y": 0}


class _Bad(Exception):
    """Internal: a structural problem (turned into ArtifactError by check_model)."""


@dataclass
class _Sparse:
    """A sparse tensor's checked metadata."""

    order: list[int]
    block_map: list[int]
    formats: list[int]              # per traversal level: _DENSE or _SPARSE_CSR
    dense_sizes: list[int]          # per level (0 for CSR levels)
    values: int                     # leaf values the metadata addresses (what the buffer must hold)


@dataclass
class _T:
    index: int
    name: str
    shape: tuple[int, ...]
    dtype: str
    type_code: int
    buffer: int
    scale: list[float] | None = None
    zero_point: list[int] | None = None
    qdim: int = 0
    data_span: tuple[int, int] | None = None     # (start, length) of the constant's bytes in the file
    widened: bool = False                        # computed from constants only: DEQUANTIZE of a constant weight
    #                                              (float16, int8, int4) or DENSIFY of a sparse constant
    sparse: _Sparse | None = None
    blockwise: tuple[int, int, int] | None = None  # BlockwiseQuantization: (scales tensor, zero points, block)
    block_scales: "_T | None" = None               # the scales tensor it names

    @property
    def const(self) -> bool:
        return self.data_span is not None

    @property
    def weights(self) -> bool:
        return self.data_span is not None or self.widened


@dataclass
class CheckedModel:
    """What :func:`check_model` saw: sizes and where the constant payloads lie."""

    num_tensors: int
    num_operators: int
    ops: list[str]
    inputs: list[tuple[tuple[int, ...], str]]
    outputs: list[tuple[tuple[int, ...], str]]
    buffer_spans: list[tuple[int, int]] = field(default_factory=list)   # (start, end) of each non-empty buffer


# --- the bounds-checked reader -------------------------------------------------


class _Reader:
    def __init__(self, data: bytes):
        self.b = data
        self.n = len(data)

    def _need(self, pos: int, size: int, what: str, align: int = 1) -> None:
        if pos < 0 or pos + size > self.n:
            raise _Bad(f"{what} at byte {pos} runs past the end of the file ({self.n} bytes)")
        if align > 1 and pos % align:
            raise _Bad(f"{what} at byte {pos} is not {align}-byte aligned")

    def scalar(self, fmt: str, pos: int, what: str):
        size = struct.calcsize("<" + fmt)
        self._need(pos, size, what, size)
        return struct.unpack_from("<" + fmt, self.b, pos)[0]

    def deref(self, pos: int, what: str) -> int:
        off = self.scalar("I", pos, what)
        target = pos + off
        if off == 0 or target >= self.n:
            raise _Bad(f"{what}: offset {off} at byte {pos} points outside the file")
        return target

    def table(self, pos: int, what: str) -> "_Table":
        soff = self.scalar("i", pos, what)
        vt = pos - soff
        self._need(vt, 4, f"{what} vtable", 2)
        vsize, tsize = struct.unpack_from("<HH", self.b, vt)
        if vsize < 4 or vsize % 2:
            raise _Bad(f"{what}: vtable size {vsize} is invalid")
        self._need(vt, vsize, f"{what} vtable")
        if tsize < 4:
            raise _Bad(f"{what}: table size {tsize} is invalid")
        self._need(pos, tsize, what)
        nslots = (vsize - 4) // 2
        slots = struct.unpack_from(f"<{nslots}H", self.b, vt + 4) if nslots else ()
        for i, fo in enumerate(slots):
            if fo and (fo < 4 or fo >= tsize):
                raise _Bad(f"{what}: field {i} lies outside its table")
        return _Table(self, pos, tsize, slots, what)

    def vector(self, pos: int, elem: int, what: str, limit: int | None = None) -> tuple[int, int]:
        """``(start of elements, count)`` of the vector at ``pos``."""
        self._need(pos, 4, f"{what} length", 4)
        count = struct.unpack_from("<I", self.b, pos)[0]
        if limit is not None and count > limit:
            raise _Bad(f"{what} has {count} elements (at most {limit} allowed)")
        start = pos + 4
        if start + count * elem > self.n:
            raise _Bad(f"{what}: {count} elements of {elem} bytes run past the end of the file")
        if elem > 4 and start % elem:
            raise _Bad(f"{what} at byte {start} is not {elem}-byte aligned")
        return start, count

    def string(self, pos: int, what: str) -> str:
        start, count = self.vector(pos, 1, what)
        if start + count >= self.n or self.b[start + count] != 0:
            raise _Bad(f"{what} is not NUL-terminated inside the file")
        try:
            return bytes(self.b[start:start + count]).decode("utf-8")
        except UnicodeDecodeError:
            raise _Bad(f"{what} is not valid UTF-8") from None


class _Table:
    __slots__ = ("r", "pos", "size", "slots", "what")

    def __init__(self, r: _Reader, pos: int, size: int, slots: tuple, what: str):
        self.r, self.pos, self.size, self.slots, self.what = r, pos, size, slots, what

    def only(self, allowed: set[int] | range) -> None:
        extra = [i for i, fo in enumerate(self.slots) if fo and i not in allowed]
        if extra:
            raise _Bad(f"{self.what} has field(s) {extra} that edgepack never writes")

    def _field(self, slot: int, size: int) -> int | None:
        if slot >= len(self.slots) or not self.slots[slot]:
            return None
        fo = self.slots[slot]
        if fo + size > self.size:
            raise _Bad(f"{self.what}: field {slot} runs past the end of its table")
        return self.pos + fo

    def scalar(self, slot: int, fmt: str, default, name: str):
        p = self._field(slot, struct.calcsize("<" + fmt))
        return default if p is None else self.r.scalar(fmt, p, f"{self.what}.{name}")

    def ref(self, slot: int, name: str) -> int | None:
        p = self._field(slot, 4)
        return None if p is None else self.r.deref(p, f"{self.what}.{name}")

    def table(self, slot: int, name: str) -> "_Table | None":
        p = self.ref(slot, name)
        return None if p is None else self.r.table(p, f"{self.what}.{name}")

    def string(self, slot: int, name: str) -> str | None:
        p = self.ref(slot, name)
        return None if p is None else self.r.string(p, f"{self.what}.{name}")

    def vector(self, slot: int, elem: int, name: str, limit: int | None = None) -> tuple[int, int] | None:
        p = self.ref(slot, name)
        return None if p is None else self.r.vector(p, elem, f"{self.what}.{name}", limit)

    def scalars(self, slot: int, fmt: str, name: str, limit: int | None = None) -> list | None:
        size = struct.calcsize("<" + fmt)
        v = self.vector(slot, size, name, limit)
        if v is None:
            return None
        start, count = v
        return list(struct.unpack_from(f"<{count}{fmt}", self.r.b, start))

    def tables(self, slot: int, name: str, limit: int | None = None) -> list["_Table"]:
        v = self.vector(slot, 4, name, limit)
        if v is None:
            return []
        start, count = v
        return [self.r.table(self.r.deref(start + 4 * i, f"{self.what}.{name}[{i}]"), f"{name}[{i}]")
                for i in range(count)]


# --- the model walk ----------------------------------------------------------------


def _prod(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _nbytes(dtype: str, count: int) -> int:
    """Bytes of ``count`` values of ``dtype`` in a buffer (int4: two a byte, the last one may be half used)."""
    return (count + 1) // 2 if dtype == "int4" else count * _ITEMSIZE[DTYPES[dtype][0]]


def _index_vector(r: _Reader, m: _Table, type_slot: int, slot: int, what: str) -> np.ndarray:
    """The values of a SparseIndexVector union (Int32Vector, Uint16Vector, Uint8Vector) as int64."""
    kind = m.scalar(type_slot, "B", 0, f"{what} type")
    if kind not in _INDEX_VECTORS:
        raise _Bad(f"{what} has union type {kind}, not one of "
                   + ", ".join(f"{k} ({n})" for k, (n, _) in _INDEX_VECTORS.items()))
    table = m.table(slot, what)
    if table is None:
        raise _Bad(f"{what} is missing")
    table.only({0})
    dt = np.dtype(_INDEX_VECTORS[kind][1])
    v = table.vector(0, dt.itemsize, f"{what} values", MAX_TENSOR_ELEMENTS + 1)
    if v is None:
        raise _Bad(f"{what} has no values")
    start, count = v            # inside the file (checked by vector): the slice is bounded by the file size
    return np.frombuffer(r.b, dt, count, start).astype(np.int64)


def _read_sparsity(r: _Reader, sp: _Table, shape: tuple[int, ...], name: str) -> _Sparse:
    """Check ``Tensor.sparsity`` against the dense ``shape``; the number of values it addresses.

    The walk follows LiteRT's FormatConverter: level ``l`` of the traversal expands dimension
    ``order[l]``; a DENSE level multiplies the nodes by its size, a CSR level gives each node its
    ``segments[p]..segments[p+1]`` slice of ``indices``.  Every count stays below the dense
    element count (indices rise inside a segment), every array lies inside the file.
    """
    what = f"tensor {name!r} sparsity"
    sp.only({0, 1, 2})          # traversal_order, block_map, dim_metadata
    n = len(shape)
    order = sp.scalars(0, "i", "traversal_order", MAX_SPARSE_DIMS)
    block_map = sp.scalars(1, "i", "block_map", MAX_RANK) or []
    metas = sp.tables(2, "dim_metadata", MAX_SPARSE_DIMS)
    if n < 1:
        raise _Bad(f"{what}: a sparse tensor needs a rank of at least 1")
    total = n + len(block_map)
    if order is None or sorted(order) != list(range(total)):
        raise _Bad(f"{what}: traversal order {order} is not a permutation of 0..{total - 1} "
                   f"({n} dimensions + {len(block_map)} block dimensions)")
    if any(not 0 <= b < n for b in block_map) or len(set(block_map)) != len(block_map):
        raise _Bad(f"{what}: block map {block_map} must name distinct dimensions of rank {n}")
    if block_map != sorted(block_map) or order[n:] != list(range(n, total)):
        # LiteRT's FormatConverter pairs block j with traversal level n + j and the blocked dimensions
        # in increasing order; any other arrangement it expands to the wrong (out-of-range) places
        raise _Bad(f"{what}: block map {block_map} / traversal order {order}: the block dimensions must "
                   "come last, in block-map order, and the block map must increase")
    if len(metas) != total:
        raise _Bad(f"{what}: {len(metas)} dim_metadata entries for {total} traversed dimensions")
    formats, dense_sizes = [], []
    for level, m in enumerate(metas):
        m.only({0, 1, 2, 3, 4, 5})  # format, dense_size, array_segments(_type), array_indices(_type)
        fmt = m.scalar(0, "b", 0, "format")
        if fmt == _DENSE:
            if any(m.slots[k] for k in range(2, min(6, len(m.slots)))):
                raise _Bad(f"{what}: traversal level {level} is DENSE but carries CSR arrays")
            dense_sizes.append(m.scalar(1, "i", 0, "dense_size"))
        elif fmt == _SPARSE_CSR:
            if m.scalar(1, "i", 0, "dense_size"):
                raise _Bad(f"{what}: traversal level {level} is SPARSE_CSR but has a dense_size")
            dense_sizes.append(0)
        else:
            raise _Bad(f"{what}: traversal level {level} has format {fmt} (DENSE 0 or SPARSE_CSR 1)")
        formats.append(fmt)
    # the size of each traversed dimension: a blocked dimension counts blocks, its block dimension
    # the block's elements
    sizes = list(shape) + [0] * len(block_map)
    for j, b in enumerate(block_map):
        size = dense_sizes[n + j]
        if formats[n + j] != _DENSE or size < 1 or shape[b] % size:
            raise _Bad(f"{what}: block dimension {n + j} must be DENSE with a size dividing dimension {b} "
                       f"({shape[b]}), got {'DENSE' if formats[n + j] == _DENSE else 'SPARSE_CSR'} {size}")
        sizes[n + j], sizes[b] = size, shape[b] // size
    nodes = 1
    for level, dim in enumerate(order):
        if formats[level] == _DENSE:
            if dense_sizes[level] != sizes[dim]:
                raise _Bad(f"{what}: traversal level {level} (DENSE, dimension {dim}) has size "
                           f"{dense_sizes[level]}, the dimension is {sizes[dim]}")
            nodes *= sizes[dim]
            continue
        m = metas[level]
        at = f"traversal level {level} (SPARSE_CSR, dimension {dim})"
        seg = _index_vector(r, m, 2, 3, f"{what} {at} array_segments")
        idx = _index_vector(r, m, 4, 5, f"{what} {at} array_indices")
        if seg.size != nodes + 1:
            raise _Bad(f"{what}: {at} has {seg.size} segments for {nodes} parent nodes "
                       f"(needs {nodes + 1})")
        if seg[0] != 0:
            raise _Bad(f"{what}: {at} segments start at {int(seg[0])}, not 0")
        step = np.diff(seg)
        if step.size and step.min() < 0:
            k = int(np.argmax(step < 0))
            raise _Bad(f"{what}: {at} segments decrease ({int(seg[k])} then {int(seg[k + 1])})")
        if seg[-1] != idx.size:
            raise _Bad(f"{what}: {at} last segment is {int(seg[-1])}, the indices number {idx.size}")
        if idx.size and (idx.min() < 0 or idx.max() >= sizes[dim]):
            bad = int(idx[(idx < 0) | (idx >= sizes[dim])][0])
            raise _Bad(f"{what}: {at} index {bad} is outside 0..{sizes[dim] - 1}")
        if idx.size > 1:
            rising = np.diff(idx) > 0
            first = seg[1:-1]
            rising[first[(first > 0) & (first < idx.size)] - 1] = True      # a new segment starts afresh
            if not rising.all():
                raise _Bad(f"{what}: {at} indices do not rise within a segment")
        nodes = int(idx.size)
    return _Sparse(list(order), list(block_map), formats, dense_sizes, nodes)


def _read_tensor(r: _Reader, t: _Table, i: int, nbuf: int) -> _T:
    # 0 shape, 1 type, 2 buffer, 3 name, 4 quantization, 6 sparsity; nothing else (variable, shape_signature,
    # has_rank, variant tensors, external buffers)
    t.only({0, 1, 2, 3, 4, 6})
    shape = t.scalars(0, "i", "shape", MAX_RANK + 1)
    shape = tuple(shape or ())
    if len(shape) > MAX_RANK:
        raise _Bad(f"tensor {i} has rank {len(shape)} (at most {MAX_RANK})")
    for d in shape:
        if not 1 <= d <= MAX_DIM:
            raise _Bad(f"tensor {i} has dimension {d} in shape {list(shape)} (each must be in 1..{MAX_DIM})")
    if _prod(shape) > MAX_TENSOR_ELEMENTS:
        raise _Bad(f"tensor {i} has {_prod(shape)} elements (at most {MAX_TENSOR_ELEMENTS})")
    code = t.scalar(1, "b", 0, "type")
    if code not in _TYPE_NAME:
        raise _Bad(f"tensor {i} has type code {code}, not one edgepack writes")
    buf = t.scalar(2, "I", 0, "buffer")
    if buf >= nbuf:
        raise _Bad(f"tensor {i} names buffer {buf} of {nbuf}")
    name = t.string(3, "name")
    if name is None:
        raise _Bad(f"tensor {i} has no name")
    out = _T(i, name, shape, _TYPE_NAME[code], code, buf)
    q = t.table(4, "quantization")
    if q is not None:
        # 2 scale, 3 zero_point, 4/5 details (BlockwiseQuantization only), 6 quantized_dimension (no min/max)
        q.only({2, 3, 4, 5, 6})
        kind = q.scalar(4, "B", 0, "details_type")
        if kind:
            if kind != _BLOCKWISE:
                raise _Bad(f"tensor {name!r}: quantization details type {kind} is not BlockwiseQuantization")
            d = q.table(5, "details")
            if d is None:
                raise _Bad(f"tensor {name!r}: BlockwiseQuantization details are missing")
            d.only({0, 1, 2})           # scales, zero_points, block_size (no block_shape)
            out.blockwise = (d.scalar(0, "i", 0, "scales"), d.scalar(1, "i", 0, "zero_points"),
                             d.scalar(2, "i", 0, "block_size"))
        elif q.ref(5, "details") is not None:
            raise _Bad(f"tensor {name!r}: quantization details without a type")
        scale = q.scalars(2, "f", "scale", MAX_DIM)
        zp = q.scalars(3, "q", "zero_point", MAX_DIM)
        qdim = q.scalar(6, "i", 0, "quantized_dimension")
        if scale:
            if zp is None or len(zp) != len(scale):
                raise _Bad(f"tensor {name!r}: {len(scale)} scales but {0 if zp is None else len(zp)} zero points")
            if not (0 <= qdim < len(shape) or (qdim == 0 and not shape)):
                raise _Bad(f"tensor {name!r}: quantized dimension {qdim} is outside its rank {len(shape)}")
            if len(scale) > 1 and (not shape or shape[qdim] != len(scale)):
                raise _Bad(f"tensor {name!r}: {len(scale)} scales along axis {qdim} of shape {list(shape)}")
            for s in scale:
                if not (math.isfinite(s) and 1.1754944e-38 <= s <= MAX_SCALE):
                    raise _Bad(f"tensor {name!r}: quantization scale {s:.6g} is not a positive number "
                               f"<= {MAX_SCALE:g}")
            lo, hi = _INT_RANGE.get(out.dtype, (None, None))
            if lo is None:
                raise _Bad(f"tensor {name!r}: a {out.dtype} tensor cannot be quantized")
            for z in zp:
                if not lo <= z <= hi:
                    raise _Bad(f"tensor {name!r}: zero point {z} is outside {lo}..{hi} for {out.dtype}")
            out.scale, out.zero_point, out.qdim = scale, zp, qdim
        elif zp:
            raise _Bad(f"tensor {name!r}: zero points without scales")
    sp = t.table(6, "sparsity")
    if sp is not None:
        if out.dtype not in _SPARSE_TYPES:
            raise _Bad(f"tensor {name!r}: a sparse tensor is {out.dtype} (edgepack writes "
                       f"{', '.join(sorted(_SPARSE_TYPES))})")
        out.sparse = _read_sparsity(r, sp, shape, name)
    # a sparse constant may leave its quantization to the output of its DENSIFY (its only use then)
    if out.blockwise is not None and (out.scale is not None or out.dtype != "int4" or out.sparse is not None):
        raise _Bad(f"tensor {name!r}: blockwise quantization is for dense int4 weights without affine scales")
    if out.dtype in _QUANTIZED and out.scale is None and out.sparse is None and out.blockwise is None:
        raise _Bad(f"tensor {name!r}: a {out.dtype} tensor needs quantization parameters")
    return out


def _read_buffers(model: _Table) -> tuple[list[tuple[int, int] | None], int]:
    tables = model.tables(4, "buffers", MAX_TENSORS + 1)
    if not tables:
        raise _Bad("the model has no buffers")
    spans: list[tuple[int, int] | None] = []
    for i, b in enumerate(tables):
        b.only({0})     # data only: no offset/size into the file beyond the flatbuffer
        v = b.vector(0, 1, f"buffer {i} data")
        spans.append(v if v is not None and v[1] > 0 else None)
    if spans[0] is not None:
        raise _Bad("buffer 0 (the empty sentinel) holds data")
    return spans, len(tables)


def _read_opcodes(model: _Table) -> list[str]:
    names = []
    for i, c in enumerate(model.tables(1, "operator_codes", len(OPS) * 4)):
        c.only({0, 2, 3})       # deprecated_builtin_code, version, builtin_code; no custom code
        dep = c.scalar(0, "b", 0, "deprecated_builtin_code")
        code = c.scalar(3, "i", 0, "builtin_code")
        builtin = max(dep, code)             # what LiteRT's GetBuiltinCode reads
        name = _CODE_TO_OP.get(builtin)
        if name is None:
            raise _Bad(f"operator code {i}: builtin {builtin} is not an op edgepack writes")
        version = c.scalar(2, "i", 1, "version")
        if not 1 <= version <= max(1, OPS[name].int8_version):
            raise _Bad(f"operator code {i} ({name}): version {version} is not one edgepack writes")
        names.append(name)
    if not names:
        raise _Bad("the model has no operator codes")
    return names


def _options(op: _Table, name: str, what: str) -> dict:
    spec = OPS[name]
    otype = op.scalar(3, "B", 0, "builtin_options_type")
    if otype != spec.options_type:
        raise _Bad(f"{what}: options type {otype} does not belong to {name}")
    table = op.table(4, "builtin_options")
    if spec.options_type == 0:              # ops without an options table
        if table is not None:
            raise _Bad(f"{what}: {name} takes no options table")
        return {}
    fields = _OPTION_FIELDS.get(name)
    if fields is None:
        raise _Bad(f"{what}: fbcheck has no rule for the options of {name}")
    if table is None:
        raise _Bad(f"{what}: the {name} options table is missing")
    table.only(set(fields))
    vals = {}
    for slot, (key, fmt) in fields.items():
        if fmt.startswith("["):
            vals[key] = table.scalars(slot, fmt[1:], key, MAX_RANK + 1)
        else:
            vals[key] = table.scalar(slot, fmt, _OPTION_DEFAULTS[key], key)
    for key, v in vals.items():
        if key == "padding" and v not in _PADDINGS:
            raise _Bad(f"{what}: padding code {v} is not SAME or VALID")
        if key == "activation" and v not in _ACTIVATIONS:
            raise _Bad(f"{what}: fused activation code {v} is not one edgepack writes")
        if key in ("stride_w", "stride_h", "dilation_w", "dilation_h", "filter_w", "filter_h", "depth_multiplier") \
                and not 1 <= v <= MAX_WINDOW:
            raise _Bad(f"{what}: {name} {key} {v} is outside 1..{MAX_WINDOW}")
        if key in ("keep_num_dims", "keep_dims", "align_corners", "half_pixel_centers", "pot_scale_int16",
                   "approximate", "adj_x", "adj_y") and v not in (0, 1):
            raise _Bad(f"{what}: {key} {v} is not a boolean")
        if key == "asymmetric_quantize_inputs" and name == "FULLY_CONNECTED":     # hybrid FULLY_CONNECTED
            if v not in (0, 1):
                raise _Bad(f"{what}: {key} {v} is not a boolean")
        elif key in ("weights_format", "asymmetric_quantize_inputs", "quantized_bias_type") and v != 0:
            raise _Bad(f"{what}: {name} {key}={v} is not written by edgepack")
        if key in ("align_corners", "half_pixel_centers") and v != 0 and name != "RESIZE_BILINEAR":
            raise _Bad(f"{what}: {name} {key}={v} is not written by edgepack")
        if key in ("beta", "alpha") and not math.isfinite(v):
            raise _Bad(f"{what}: {name} {key} {v} is not finite")
    if name == "RESIZE_BILINEAR" and vals["align_corners"] and vals["half_pixel_centers"]:
        raise _Bad(f"{what}: RESIZE_BILINEAR sets both align_corners and half_pixel_centers (LiteRT refuses it)")
    if name == "SOFTMAX" and not vals["beta"] > 0:
        raise _Bad(f"{what}: SOFTMAX beta {vals['beta']} must be > 0")
    return vals


def _const_ints(r: _Reader, t: _T, what: str, limit: int = 64) -> list[int]:
    if not t.const:
        raise _Bad(f"{what}: tensor {t.name!r} must be a constant")
    if t.dtype not in ("int32", "int64"):
        raise _Bad(f"{what}: tensor {t.name!r} must be int32, not {t.dtype}")
    count = _prod(t.shape)
    if count > limit:
        raise _Bad(f"{what}: tensor {t.name!r} has {count} values")
    start, _ = t.data_span
    fmt = "i" if t.dtype == "int32" else "q"
    return list(struct.unpack_from(f"<{count}{fmt}", r.b, start))


def _window(size: int, k: int, stride: int, dilation: int, padding: int, what: str) -> int:
    eff = (k - 1) * dilation + 1
    if padding == 0:          # SAME
        return (size + stride - 1) // stride
    if eff > size:
        raise _Bad(f"{what}: a {eff}-wide VALID window does not fit a dimension of {size}")
    return (size - eff + stride) // stride


def _broadcast(a: tuple, b: tuple, what: str) -> tuple:
    rank = max(len(a), len(b))
    a, b = (1,) * (rank - len(a)) + a, (1,) * (rank - len(b)) + b
    out = []
    for x, y in zip(a, b):
        if x != y and 1 not in (x, y):
            raise _Bad(f"{what}: shapes {list(a)} and {list(b)} do not broadcast")
        out.append(max(x, y))
    return tuple(out)


def _expect(out: _T, shape: tuple, name: str, what: str) -> None:
    if tuple(out.shape) != tuple(shape):
        raise _Bad(f"{what}: {name} output {out.name!r} has shape {list(out.shape)}, the op computes {list(shape)}")


def _check_op(r: _Reader, name: str, opt: dict, ins: list[_T | None], out: _T, what: str) -> None:
    """Dtypes of the operands and the output shape the op computes."""
    x = ins[0]
    if x is None:
        raise _Bad(f"{what}: {name} has no first input")
    for k, t in enumerate(ins):
        if t is None and (name != "FULLY_CONNECTED" or k != 2):
            raise _Bad(f"{what}: {name} input {k} is left out")
    if out.dtype not in _ACTIVATION_TYPES and not (name == "DENSIFY" and out.dtype == "float16"):
        raise _Bad(f"{what}: {name} writes a {out.dtype} tensor")
    if name == "QUANTIZE":
        if out.dtype != "int8" or x.dtype not in ("float32", "int8"):
            raise _Bad(f"{what}: QUANTIZE from {x.dtype} to {out.dtype}")
    elif name == "DEQUANTIZE":
        # float16 weights, int8 activations, int8 / int4 weights (weight-only quantization)
        if out.dtype != "float32" or x.dtype not in ("int8", "float16", "int4") or \
                (x.dtype == "float16" and not x.weights):
            raise _Bad(f"{what}: DEQUANTIZE from {x.dtype}{'' if x.weights else ' activation'} to {out.dtype}")
    elif x.dtype != out.dtype:
        raise _Bad(f"{what}: {name} reads {x.dtype} and writes {out.dtype}")
    if name in _FLOAT_ONLY:
        for t in [out] + ins[:_FLOAT_ONLY[name]]:
            if t.dtype != "float32":
                raise _Bad(f"{what}: edgepack writes {name} in float32 only, {t.name!r} is {t.dtype}")
    if name in _ELEMENTWISE:
        return _expect(out, x.shape, name, what)
    if name == "DENSIFY":
        if x.sparse is None or not x.const:
            raise _Bad(f"{what}: DENSIFY input {x.name!r} is not a sparse constant")
        if x.dtype not in _DENSIFY_TYPES:
            raise _Bad(f"{what}: DENSIFY of a {x.dtype} tensor (takes {', '.join(sorted(_DENSIFY_TYPES))})")
        # the codes are copied: a quantized input is quantized as its output (an int8 input may also
        # leave the quantization to the output alone, which _read_tensor requires of an int8 output)
        if x.scale is not None and (out.scale, out.zero_point, out.qdim) != (x.scale, x.zero_point, x.qdim):
            raise _Bad(f"{what}: DENSIFY output {out.name!r} is quantized {out.scale}/{out.zero_point} "
                       f"(axis {out.qdim}), its input {x.scale}/{x.zero_point} (axis {x.qdim})")
        return _expect(out, x.shape, name, what)
    if name in ("CONV_2D", "DEPTHWISE_CONV_2D"):
        w, b = ins[1], ins[2]
        if len(x.shape) != 4 or len(w.shape) != 4 or len(b.shape) != 1:
            raise _Bad(f"{what}: {name} needs a 4-D input and weights and a 1-D bias")
        if not w.weights or not b.weights:
            raise _Bad(f"{what}: {name} weights and bias must be constants")
        _check_weights(name, x, w, b, what)
        n, h, wd, c = x.shape
        if name == "CONV_2D":
            cout, kh, kw, cin = w.shape
            if c % cin or cout % (c // cin):
                raise _Bad(f"{what}: CONV_2D weights {list(w.shape)} do not fit input channels {c}")
        else:
            one, kh, kw, cout = w.shape
            if one != 1 or cout != c * opt["depth_multiplier"]:
                raise _Bad(f"{what}: DEPTHWISE_CONV_2D weights {list(w.shape)} do not fit {c} channels "
                           f"x depth multiplier {opt['depth_multiplier']}")
        if b.shape[0] != cout:
            raise _Bad(f"{what}: {name} bias has {b.shape[0]} values for {cout} output channels")
        oh = _window(h, kh, opt["stride_h"], opt["dilation_h"], opt["padding"], what)
        ow = _window(wd, kw, opt["stride_w"], opt["dilation_w"], opt["padding"], what)
        return _expect(out, (n, oh, ow, cout), name, what)
    if name == "FULLY_CONNECTED":
        w, b = ins[1], ins[2] if len(ins) > 2 else None
        if len(w.shape) != 2 or not w.weights:
            raise _Bad(f"{what}: FULLY_CONNECTED weights must be a 2-D constant")
        _check_weights(name, x, w, b, what)
        if w.sparse is not None:
            _check_sparse_fc(x, w, what)
        units, k = w.shape
        if b is not None and (b.shape != (units,) or not b.weights):
            raise _Bad(f"{what}: FULLY_CONNECTED bias must be a constant of shape [{units}]")
        total = _prod(x.shape)
        if total % k:
            raise _Bad(f"{what}: FULLY_CONNECTED input {list(x.shape)} is not a multiple of {k}")
        if opt["keep_num_dims"]:
            if not x.shape or x.shape[-1] != k:
                raise _Bad(f"{what}: FULLY_CONNECTED keep_num_dims needs a last dimension of {k}")
            return _expect(out, x.shape[:-1] + (units,), name, what)
        return _expect(out, (total // k, units), name, what)
    if name in _BINARY:
        y = ins[1]
        if y.dtype != x.dtype:
            raise _Bad(f"{what}: {name} of {x.dtype} and {y.dtype}")
        shape = _broadcast(x.shape, y.shape, what)
        return _expect(out, shape, name, what)
    if name in ("AVERAGE_POOL_2D", "MAX_POOL_2D"):
        if len(x.shape) != 4:
            raise _Bad(f"{what}: {name} needs a 4-D input")
        n, h, wd, c = x.shape
        oh = _window(h, opt["filter_h"], opt["stride_h"], 1, opt["padding"], what)
        ow = _window(wd, opt["filter_w"], opt["stride_w"], 1, opt["padding"], what)
        return _expect(out, (n, oh, ow, c), name, what)
    if name == "MEAN":
        axes = _const_ints(r, ins[1], what)
        rank = len(x.shape)
        norm = set()
        for a in axes:
            if not -rank <= a < rank:
                raise _Bad(f"{what}: MEAN axis {a} is outside rank {rank}")
            norm.add(a % rank)
        if opt["keep_dims"]:
            shape = tuple(1 if i in norm else d for i, d in enumerate(x.shape))
        else:
            shape = tuple(d for i, d in enumerate(x.shape) if i not in norm)
        return _expect(out, shape, name, what)
    if name == "RESHAPE":
        target = _const_ints(r, ins[1], what, MAX_RANK) if len(ins) > 1 else opt["new_shape"]
        if target is None:
            raise _Bad(f"{what}: RESHAPE has neither a shape input nor new_shape")
        if len(target) > MAX_RANK:
            raise _Bad(f"{what}: RESHAPE to rank {len(target)}")
        total = _prod(x.shape)
        if target.count(-1) > 1 or any(d < -1 or d == 0 for d in target):
            raise _Bad(f"{what}: RESHAPE target {target} is invalid")
        known = _prod(d for d in target if d != -1)
        if -1 in target:
            if total % known:
                raise _Bad(f"{what}: RESHAPE of {total} elements to {target}")
            target = [total // known if d == -1 else d for d in target]
        if _prod(target) != total:
            raise _Bad(f"{what}: RESHAPE of {total} elements to {target}")
        if opt.get("new_shape") is not None and list(opt["new_shape"]) != list(target) and len(ins) < 2:
            raise _Bad(f"{what}: RESHAPE new_shape {opt['new_shape']} disagrees with {target}")
        return _expect(out, tuple(target), name, what)
    if name == "CONCATENATION":
        rank = len(x.shape)
        axis = opt["axis"]
        if not -rank <= axis < rank:
            raise _Bad(f"{what}: CONCATENATION axis {axis} is outside rank {rank}")
        axis %= rank
        total = 0
        for t in ins:
            if t.dtype != x.dtype or len(t.shape) != rank or any(
                    d != e for i, (d, e) in enumerate(zip(t.shape, x.shape)) if i != axis):
                raise _Bad(f"{what}: CONCATENATION input {t.name!r} {list(t.shape)} does not fit {list(x.shape)}")
            total += t.shape[axis]
        return _expect(out, x.shape[:axis] + (total,) + x.shape[axis + 1:], name, what)
    if name == "PAD":
        pads = _const_ints(r, ins[1], what, 2 * MAX_RANK)
        rank = len(x.shape)
        if ins[1].shape != (rank, 2):
            raise _Bad(f"{what}: PAD paddings have shape {list(ins[1].shape)}, not [{rank}, 2]")
        if any(not 0 <= p <= MAX_PAD for p in pads):
            raise _Bad(f"{what}: PAD paddings {pads} are outside 0..{MAX_PAD}")
        shape = tuple(d + pads[2 * i] + pads[2 * i + 1] for i, d in enumerate(x.shape))
        return _expect(out, shape, name, what)
    if name == "TRANSPOSE":
        perm = _const_ints(r, ins[1], what, MAX_RANK)
        if sorted(perm) != list(range(len(x.shape))):
            raise _Bad(f"{what}: TRANSPOSE permutation {perm} does not permute rank {len(x.shape)}")
        return _expect(out, tuple(x.shape[p] for p in perm), name, what)
    if name == "SLICE":
        rank = len(x.shape)
        begin = _const_ints(r, ins[1], what, MAX_RANK)
        size = _const_ints(r, ins[2], what, MAX_RANK)
        if len(begin) != rank or len(size) != rank:
            raise _Bad(f"{what}: SLICE begin {begin} / size {size} do not match rank {rank}")
        shape = []
        for b, n, d in zip(begin, size, x.shape):
            n = d - b if n == -1 else n
            if not (0 <= b < d and 1 <= n and b + n <= d):
                raise _Bad(f"{what}: SLICE begin {begin} size {size} do not fit {list(x.shape)}")
            shape.append(n)
        return _expect(out, tuple(shape), name, what)
    if name in ("RESIZE_NEAREST_NEIGHBOR", "RESIZE_BILINEAR"):
        size = _const_ints(r, ins[1], what, 2)
        if len(x.shape) != 4 or len(size) != 2 or any(not 1 <= s <= MAX_DIM for s in size):
            raise _Bad(f"{what}: {name} of {list(x.shape)} to {size}")
        return _expect(out, (x.shape[0], size[0], size[1], x.shape[3]), name, what)
    if name == "BATCH_MATMUL":
        y = ins[1]
        rank = len(x.shape)
        if not 2 <= rank <= MAX_BATCH_MATMUL_RANK or len(y.shape) != rank:
            raise _Bad(f"{what}: BATCH_MATMUL of {list(x.shape)} and {list(y.shape)} (ranks must be equal "
                       f"and in 2..{MAX_BATCH_MATMUL_RANK})")
        m, kx = (x.shape[-1], x.shape[-2]) if opt["adj_x"] else x.shape[-2:]
        ky, n = (y.shape[-1], y.shape[-2]) if opt["adj_y"] else y.shape[-2:]
        if kx != ky:
            raise _Bad(f"{what}: BATCH_MATMUL inner dimensions {kx} and {ky} of {list(x.shape)} and "
                       f"{list(y.shape)} differ (adj_x={opt['adj_x']}, adj_y={opt['adj_y']})")
        batch = _broadcast(x.shape[:-2], y.shape[:-2], what)
        return _expect(out, batch + (m, n), name, what)
    raise _Bad(f"{what}: fbcheck has no structural rule for {name}")   # a new OPS row needs one (see the test)


def _check_weights(name: str, x: _T, w: _T, b: _T | None, what: str) -> None:
    """Weight and bias types of a convolution / FULLY_CONNECTED on ``x``: float32 (float32 weights),
    int8 (int8 or int4 weights, int32 bias) or hybrid (float32 input, int8 / int4 constant weights,
    float32 bias; CONV_2D and FULLY_CONNECTED only: LiteRT has no int4 hybrid DEPTHWISE_CONV_2D and
    refuses a per-tensor one)."""
    if x.dtype == "int8":
        wdts, bdt = ("int8", "int4"), "int32"
    elif name == "DEPTHWISE_CONV_2D":
        wdts, bdt = ("float32",), "float32"
    else:
        wdts, bdt = ("float32", "int8", "int4"), "float32"
    if w.dtype not in wdts or (b is not None and b.dtype != bdt):
        raise _Bad(f"{what}: {name} on {x.dtype} needs {' or '.join(wdts)} weights and {bdt} bias, "
                   f"got {w.dtype} and {'no bias' if b is None else b.dtype}")
    if w.blockwise is not None:
        _check_blockwise(name, x, w, what)
        return
    if w.dtype in ("int8", "int4") and w.scale is None:      # an unquantized sparse constant used directly
        raise _Bad(f"{what}: {name} {w.dtype} weights {w.name!r} have no quantization parameters")
    if w.dtype == "int4" or (x.dtype == "float32" and w.dtype == "int8"):
        if not w.const:
            raise _Bad(f"{what}: {name} {w.dtype} weights {w.name!r} on {x.dtype} must be a constant")
        if any(z != 0 for z in w.zero_point):
            raise _Bad(f"{what}: {name} {w.dtype} weights {w.name!r} have zero points {w.zero_point[:8]}; "
                       "they must be symmetric (0)")
        axis = 3 if name == "DEPTHWISE_CONV_2D" else 0
        if len(w.scale) > 1 and w.qdim != axis:
            raise _Bad(f"{what}: {name} weights {w.name!r} are quantized along axis {w.qdim}, not the "
                       f"output-channel axis {axis}")


def _check_blockwise(name: str, x: _T, w: _T, what: str) -> None:
    """Blockwise INT4 weights: a dynamic-range FULLY_CONNECTED (float32 input) with [n, k] int4 codes and
    a float16 constant of [n, k / block] finite positive scales; the block a multiple of 32 dividing k
    (XNNPACK's qb4w kernel; other blocks fall to a builtin path edgepack never writes)."""
    scales_t, zp, block = w.blockwise
    scales = w.block_scales
    if name != "FULLY_CONNECTED" or x.dtype != "float32" or not w.const or len(w.shape) != 2:
        raise _Bad(f"{what}: blockwise weights {w.name!r} feed only a FULLY_CONNECTED on float32 input, as a "
                   "2-D constant")
    n, k = w.shape
    if block <= 0 or block % 32 or k % block:
        raise _Bad(f"{what}: blockwise block size {block} must be a positive multiple of 32 dividing {k}")
    if zp != -1:
        raise _Bad(f"{what}: blockwise weights {w.name!r} must have no zero-point tensor (-1), got {zp}")
    if scales is None or scales.dtype != "float16" or not scales.const or scales.shape != (n, k // block):
        raise _Bad(f"{what}: blockwise scales of {w.name!r} must be a float16 constant of shape [{n}, "
                   f"{k // block}]")


def _check_sparse_fc(x: _T, w: _T, what: str) -> None:
    """Sparse FULLY_CONNECTED weights in a form TFLite's kernels take: [units, depth] with the
    units dense and the depth CSR, float32 element-wise or in 1x4 blocks, int8 in 1x16 blocks."""
    sp = w.sparse
    block = 1
    if sp.block_map:
        block = sp.dense_sizes[2] if len(sp.dense_sizes) == 3 else 0
    form = (sp.order, sp.block_map, sp.formats[:2])
    ok_layout = form in (([0, 1], [], [_DENSE, _SPARSE_CSR]), ([0, 1, 2], [1], [_DENSE, _SPARSE_CSR]))
    blocks = {"float32": (1, 4), "int8": (16,)}.get(w.dtype, ())
    if not ok_layout or block not in blocks:
        raise _Bad(f"{what}: sparse FULLY_CONNECTED weights {w.name!r} ({w.dtype}, traversal {sp.order}, block "
                   f"map {sp.block_map}, block {block}) are not a form LiteRT's sparse kernels take: "
                   "[DENSE units, SPARSE_CSR depth], float32 with blocks of 1 or 4, int8 with blocks of 16")


def _check_requant(name: str, ins: list[_T | None], out: _T, what: str) -> None:
    """int8 ops: the requantization multipliers LiteRT derives from the scales stay in the
    range its kernels take (outside it, it refuses the op at best and aborts at worst)."""
    if out.dtype != "int8" or ins[0] is None or ins[0].dtype != "int8":
        return
    f32 = np.float32
    x, s_out = ins[0], f32(out.scale[0])
    if name in ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED"):
        m = (f32(x.scale[0]) * np.asarray(ins[1].scale or [np.inf], np.float32)) / s_out
        if not np.all(m < MAX_REQUANT):
            raise _Bad(f"{what}: requantization scale s_in*s_w/s_out reaches {float(m.max()):.3g} "
                       f"(LiteRT takes < {MAX_REQUANT:g})")
        return
    if name in ("ADD", "SUB"):
        for t in ins:
            if not f32(t.scale[0]) / s_out < MAX_REQUANT:
                raise _Bad(f"{what}: input scale {t.scale[0]:.3g} is >= {MAX_REQUANT:g}x the output scale")
        return
    if name == "MUL":
        if not (f32(ins[0].scale[0]) * f32(ins[1].scale[0])) / s_out < MAX_REQUANT:
            raise _Bad(f"{what}: s_a*s_b/s_out is >= {MAX_REQUANT:g}")
        return
    for t in ins:
        if t is not None and t.dtype == "int8" and t.scale is not None and len(t.scale) == 1:
            r = float(f32(t.scale[0]) / s_out)
            if not 1.0 / MAX_RATIO <= r <= MAX_RATIO:
                raise _Bad(f"{what}: input and output scales differ by a factor {r:.3g}")


def _manifest_sig(sig: dict, t: _T, what: str) -> None:
    try:
        shape = [int(d) for d in sig["shape"]]
        layout = sig.get("layout")
        stored = [shape[p] for p in layout] if layout else shape
        dtype = sig.get("stored_dtype") or sig["dtype"]
    except (KeyError, TypeError, IndexError, ValueError) as exc:
        raise _Bad(f"{what}: the manifest entry is malformed ({type(exc).__name__}: {exc})") from None
    if list(t.shape) != stored or t.dtype != dtype:
        raise _Bad(f"{what} {t.name!r} is {list(t.shape)} {t.dtype} in the model but {stored} {dtype} "
                   "in the manifest")
    if dtype == "int8":
        q = sig.get("quantization") or {}
        try:
            scale, zp = [float(s) for s in q["scale"]], [int(z) for z in q["zero_point"]]
        except (KeyError, TypeError, ValueError):
            raise _Bad(f"{what} {t.name!r}: the manifest has no quantization for an int8 tensor") from None
        if len(scale) != 1 or len(zp) != 1 or zp != list(t.zero_point) or \
                not np.isclose(np.float32(scale[0]), np.float32(t.scale[0]), rtol=1e-6, atol=0):
            raise _Bad(f"{what} {t.name!r}: quantization {scale}/{zp} in the manifest, "
                       f"{t.scale}/{t.zero_point} in the model")


def _walk(data: bytes, manifest: dict | None, delegate: bool) -> CheckedModel:
    r = _Reader(data)
    if r.n < 8:
        raise _Bad(f"the file has {r.n} bytes")
    if bytes(data[4:8]) != b"TFL3":
        raise _Bad("the flatbuffer identifier 'TFL3' is missing")
    model = r.table(r.deref(0, "root offset"), "model")
    # 0 version, 1 operator_codes, 2 subgraphs, 3 description, 4 buffers, 7 signature_defs
    model.only({0, 1, 2, 3, 4, 7})
    version = model.scalar(0, "I", 0, "version")
    if version != SCHEMA_VERSION:
        raise _Bad(f"schema version {version}, not {SCHEMA_VERSION}")
    model.string(3, "description")
    spans, nbuf = _read_buffers(model)
    opnames = _read_opcodes(model)
    subgraphs = model.tables(2, "subgraphs", 2)
    if len(subgraphs) != 1:
        raise _Bad(f"the model has {len(subgraphs)} subgraphs; edgepack writes exactly one")
    sg = subgraphs[0]
    sg.only({0, 1, 2, 3, 4})      # tensors, inputs, outputs, operators, name
    sg.string(4, "name")
    tensors = []
    users = {}
    for i, tt in enumerate(sg.tables(0, "tensors", MAX_TENSORS)):
        t = _read_tensor(r, tt, i, nbuf)
        span = spans[t.buffer]
        if span is not None:
            if t.buffer in users:
                raise _Bad(f"tensors {users[t.buffer]} and {i} share buffer {t.buffer}")
            users[t.buffer] = i
            count = _prod(t.shape) if t.sparse is None else t.sparse.values
            need = _nbytes(t.dtype, count)
            if span[1] != need:
                held = f"{count} {'sparse ' if t.sparse else ''}values"
                raise _Bad(f"tensor {t.name!r} {list(t.shape)} {t.dtype} needs {need} bytes ({held}), "
                           f"its buffer {t.buffer} holds {span[1]}")
            t.data_span = span
        elif t.sparse is not None:
            raise _Bad(f"tensor {t.name!r} has sparsity parameters but no data: a sparse tensor must be a constant")
        elif t.dtype == "int4":
            raise _Bad(f"tensor {t.name!r} is int4 but not a constant: edgepack writes int4 for weights only")
        tensors.append(t)
    nt = len(tensors)
    if not nt:
        raise _Bad("the subgraph has no tensors")
    for t in tensors:
        if t.blockwise is not None:
            idx = t.blockwise[0]
            if not 0 <= idx < nt or tensors[idx] is t:
                raise _Bad(f"tensor {t.name!r}: blockwise scales name tensor {idx} of {nt}")
            sc = tensors[idx]
            if sc.dtype == "float16" and sc.const:
                start, length = sc.data_span
                vals = np.frombuffer(data, "<f2", count=length // 2, offset=start).astype(np.float32)
                if not (np.all(np.isfinite(vals)) and np.all(vals > 0)):
                    raise _Bad(f"tensor {t.name!r}: blockwise scales {sc.name!r} must be finite and > 0")
            t.block_scales = sc

    def index_list(slot: int, what: str) -> list[int]:
        idx = sg.scalars(slot, "i", what, MAX_TENSORS) or []
        for k in idx:
            if not 0 <= k < nt:
                raise _Bad(f"subgraph {what} names tensor {k} of {nt}")
        return idx

    inputs, outputs = index_list(1, "inputs"), index_list(2, "outputs")
    if not outputs:
        raise _Bad("the subgraph has no outputs")
    if len(set(inputs)) != len(inputs):
        raise _Bad(f"the subgraph lists an input twice: {inputs}")
    ready = set()
    for k in inputs:
        if tensors[k].const:
            raise _Bad(f"model input {tensors[k].name!r} is a constant")
        if tensors[k].dtype not in _ACTIVATION_TYPES:
            raise _Bad(f"model input {tensors[k].name!r} is {tensors[k].dtype}")
        ready.add(k)
    ops = []
    for j, op in enumerate(sg.tables(3, "operators", MAX_OPERATORS)):
        what = f"operator {j}"
        op.only({0, 1, 2, 3, 4})    # opcode_index, inputs, outputs, options type, options
        oc = op.scalar(0, "I", 0, "opcode_index")
        if oc >= len(opnames):
            raise _Bad(f"{what}: opcode index {oc} of {len(opnames)}")
        name = opnames[oc]
        what = f"operator {j} ({name})"
        opt = _options(op, name, what)
        if name not in _ARITY:
            raise _Bad(f"{what}: fbcheck has no structural rule for {name}")
        ins = op.scalars(1, "i", "inputs", _ARITY[name][1] + 1) or []
        outs = op.scalars(2, "i", "outputs", 2) or []
        lo, hi = _ARITY[name]
        if not lo <= len(ins) <= hi:
            raise _Bad(f"{what}: {len(ins)} inputs (takes {lo}..{hi})")
        if len(outs) != 1:
            raise _Bad(f"{what}: {len(outs)} outputs (takes 1)")
        in_t = []
        for k in ins:
            if k == -1:
                in_t.append(None)
                continue
            if not 0 <= k < nt:
                raise _Bad(f"{what}: input tensor {k} of {nt}")
            t = tensors[k]
            if not t.const and k not in ready:
                raise _Bad(f"{what}: input {t.name!r} is neither a constant, a model input nor computed earlier")
            use = (name, len(in_t))
            if t.sparse is not None and use not in _SPARSE_USES:
                if use != _SPARSE_FC:
                    raise _Bad(f"{what}: input {len(in_t)} {t.name!r} is sparse; a sparse constant feeds DENSIFY "
                               "only (or, without XNNPACK, FULLY_CONNECTED weights)")
                if delegate:
                    raise _Bad(f"{what}: weights {t.name!r} are sparse; XNNPACK (LiteRT's default delegate) "
                               "reads them as dense, past the end of their buffer: expand them with DENSIFY "
                               "(or check with delegate=False for an interpreter without XNNPACK)")
            if t.dtype == "int4" and use not in _INT4_USES:
                raise _Bad(f"{what}: input {len(in_t)} {t.name!r} is int4; int4 feeds only the weights of "
                           "CONV_2D, DEPTHWISE_CONV_2D, FULLY_CONNECTED or a DEQUANTIZE")
            in_t.append(t)
        k = outs[0]
        if not 0 <= k < nt:
            raise _Bad(f"{what}: output tensor {k} of {nt}")
        out = tensors[k]
        if out.const:
            raise _Bad(f"{what}: writes the constant {out.name!r}")
        if k in ready:
            raise _Bad(f"{what}: {out.name!r} is written twice (or is a model input)")
        if out.scale is not None and len(out.scale) != 1 and name != "DENSIFY":    # DENSIFY: checked below
            raise _Bad(f"{what}: output {out.name!r} has per-axis quantization")
        for t in in_t:
            if t is not None and not t.weights and t.scale is not None and len(t.scale) != 1:
                raise _Bad(f"{what}: input {t.name!r} has per-axis quantization")
        _check_op(r, name, opt, in_t, out, what)
        _check_requant(name, in_t, out, what)
        out.widened = name == "DENSIFY" or (name == "DEQUANTIZE" and in_t[0].weights)
        ready.add(k)
        ops.append(name)
    for k in outputs:
        if k not in ready:
            raise _Bad(f"model output {tensors[k].name!r} is never computed")
    sigs = model.tables(7, "signature_defs", 2)
    if len(sigs) != 1:
        raise _Bad(f"the model has {len(sigs)} signatures; edgepack writes exactly one")
    sig = sigs[0]
    sig.only({0, 1, 2, 4})          # inputs, outputs, signature_key, subgraph_index
    sig.string(2, "signature_key")
    if sig.scalar(4, "I", 0, "subgraph_index") != 0:
        raise _Bad("the signature does not name subgraph 0")
    for slot, what, expected in ((0, "inputs", inputs), (1, "outputs", outputs)):
        maps = sig.tables(slot, f"signature {what}", MAX_TENSORS)
        got = []
        for m in maps:
            m.only({0, 1})
            mname = m.string(0, "name")
            k = m.scalar(1, "I", 0, "tensor_index")
            if k >= nt:
                raise _Bad(f"signature {what} name tensor {k} of {nt}")
            if mname != tensors[k].name:
                raise _Bad(f"signature {what}: {mname!r} maps tensor {tensors[k].name!r}")
            got.append(k)
        if got != list(expected):
            raise _Bad(f"signature {what} {got} differ from the subgraph's {list(expected)}")
    if manifest is not None:
        for key, idx in (("inputs", inputs), ("outputs", outputs)):
            sigs_m = manifest.get(key)
            if not isinstance(sigs_m, list) or len(sigs_m) != len(idx):
                raise _Bad(f"the model has {len(idx)} {key}, the manifest lists "
                           f"{len(sigs_m) if isinstance(sigs_m, list) else 'none'}")
            for n, (s, k) in enumerate(zip(sigs_m, idx)):
                if not isinstance(s, dict):
                    raise _Bad(f"manifest {key}[{n}] is not an object")
                _manifest_sig(s, tensors[k], f"{key[:-1]} {n}")
    return CheckedModel(nt, len(ops), ops, [(tensors[k].shape, tensors[k].dtype) for k in inputs],
                        [(tensors[k].shape, tensors[k].dtype) for k in outputs],
                        [(s[0], s[0] + s[1]) for s in spans if s is not None])


def check_model(data: bytes, manifest: dict | None = None, *, name: str = "model.tflite",
                delegate: bool = True) -> CheckedModel:
    """Check the flatbuffer ``data`` (see the module docstring); returns what it saw.

    ``delegate=False`` says the interpreter will run without XNNPACK (``load_interpreter(...,
    delegate=False)``): only then may a sparse constant be FULLY_CONNECTED weights directly.
    Raises :class:`~sdk.errors.ArtifactError` ``"<name> is damaged or was not written by edgepack: ..."``.
    """
    try:
        return _walk(data, manifest, delegate)
    except _Bad as exc:
        raise ArtifactError(f"{name} is damaged or was not written by edgepack: {exc}; "
                            "deploy the model again or restore the file") from None
    except (struct.error, ArithmeticError, LookupError, ValueError, TypeError, RecursionError) as exc:
        # belt and braces: a case the walk above does not name still ends as an ArtifactError
        raise ArtifactError(f"{name} is damaged (unchecked case, {type(exc).__name__}: {exc}); "
                            "deploy the model again or restore the file") from None


def check_file(artifact, name: str = "model.tflite") -> bytes:
    """Read ``name`` of ``artifact``, check it against the artifact's manifest, return its bytes."""
    from sdk import huffman, zero_run

    path = artifact.file(name)
    # a weight container must decode into this file's weights: deep-compression's weights.dc (sdk.huffman),
    # zero-run's weights.zr (sdk.zero_run)
    entry = (getattr(artifact, "manifest", None) or {}).get("weight_container")
    zr = isinstance(entry, dict) and entry.get("format") == zero_run.FORMAT
    expand = zero_run.expand_artifact_model if zr else huffman.expand_artifact_model
    data = expand(artifact, name, path.read_bytes())
    check_model(data, getattr(artifact, "manifest", None), name=f"{name} of {artifact.path}")
    return data
