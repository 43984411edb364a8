"""Write LiteRT (``.tflite``) flatbuffers without TensorFlow.

The LiteRT wheel ships the schema's generated object API
(``ai_edge_litert.schema_py_generated``); this module wraps it in a small
builder so the lowering code talks in tensors and ops instead of flatbuffer
tables::

    b = ModelBuilder()
    x = b.add_tensor("x", (1, 8, 8, 3), "int8", scale=0.02, zero_point=-3)
    w = b.add_tensor("w", (16, 3, 3, 3), "int8", data=w_q, scale=w_s, zero_point=0, axis=0)
    bias = b.add_tensor("b", (16,), "int32", data=b_q, scale=0.02 * w_s, zero_point=0, axis=0)
    y = b.add_tensor("y", (1, 8, 8, 16), "int8", scale=0.05, zero_point=-128)
    b.add_op("CONV_2D", [x, w, bias], [y], stride=(1, 1), padding="SAME", activation="RELU")
    b.set_io(inputs=[x], outputs=[y])
    data = b.finish()

Every op is one row of :data:`OPS`: builtin code, options table, the option
keywords it accepts and the opcode version an int8 graph needs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import flatbuffers
import numpy as np

from sdk.errors import ArtifactError, ConfigError

from ai_edge_litert import schema_py_generated as fb

__all__ = [
    "DTYPES",
    "OPS",
    "ModelBuilder",
    "OpSpec",
    "TensorRef",
    "dtype_name",
    "numpy_dtype",
    "pack_int4",
    "unpack_int4",
    "op_name",
    "read_model",
    "tensor_data",
]

SCHEMA_VERSION = 3
FILE_IDENTIFIER = b"TFL3"
# XNNPACK and the builtin kernels read constants in place; 16 bytes keeps
# every element type (and SIMD loads of packed weights) naturally aligned.
_BUFFER_ALIGNMENT = 16

#: dtype name -> (schema TensorType, little-endian numpy dtype)
DTYPES: dict[str, tuple[int, np.dtype]] = {
    "float32": (fb.TensorType.FLOAT32, np.dtype("<f4")),
    "float16": (fb.TensorType.FLOAT16, np.dtype("<f2")),
    "int32": (fb.TensorType.INT32, np.dtype("<i4")),
    "int64": (fb.TensorType.INT64, np.dtype("<i8")),
    "int16": (fb.TensorType.INT16, np.dtype("<i2")),
    "int8": (fb.TensorType.INT8, np.dtype("i1")),
    # two 4-bit codes per byte, element 2i in the low nibble (the numpy dtype is that of the unpacked codes)
    "int4": (fb.TensorType.INT4, np.dtype("i1")),
    "uint8": (fb.TensorType.UINT8, np.dtype("u1")),
    "bool": (fb.TensorType.BOOL, np.dtype("?")),
}
_TYPE_TO_NAME = {code: name for name, (code, _) in DTYPES.items()}

_ACTIVATIONS = {
    None: fb.ActivationFunctionType.NONE,
    "NONE": fb.ActivationFunctionType.NONE,
    "RELU": fb.ActivationFunctionType.RELU,
    "RELU_N1_TO_1": fb.ActivationFunctionType.RELU_N1_TO_1,
    "RELU6": fb.ActivationFunctionType.RELU6,
    "TANH": fb.ActivationFunctionType.TANH,
}
_PADDINGS = {"SAME": fb.Padding.SAME, "VALID": fb.Padding.VALID}


def dtype_name(tensor_type: int) -> str:
    """Name (``"int8"``, ...) of a schema ``TensorType`` code."""
    try:
        return _TYPE_TO_NAME[tensor_type]
    except KeyError:
        raise ArtifactError(f"tensor type code {tensor_type} is not supported by edgepack") from None


def numpy_dtype(name: str) -> np.dtype:
    """Little-endian numpy dtype of a dtype name."""
    try:
        return DTYPES[name][1]
    except KeyError:
        raise ConfigError(f"unknown tensor dtype {name!r}; valid: {', '.join(DTYPES)}") from None


def _activation(value) -> int:
    key = value.upper() if isinstance(value, str) else value
    if key not in _ACTIVATIONS:
        raise ConfigError(f"unknown fused activation {value!r}; valid: NONE, RELU, RELU6, RELU_N1_TO_1, TANH")
    return _ACTIVATIONS[key]


def _padding(value: str) -> int:
    try:
        return _PADDINGS[value.upper()]
    except (KeyError, AttributeError):
        raise ConfigError(f"unknown padding {value!r}; valid: SAME, VALID") from None


def _pair(value) -> tuple[int, int]:
    """``(h, w)`` from an int or a pair."""
    if isinstance(value, int):
        return value, value
    h, w = value
    return int(h), int(w)


# --- options builders: keyword arguments -> schema options object ----------


def _conv_options(stride=(1, 1), padding="VALID", dilation=(1, 1), activation=None):
    o = fb.Conv2DOptionsT()
    o.strideH, o.strideW = _pair(stride)
    o.dilationHFactor, o.dilationWFactor = _pair(dilation)
    o.padding = _padding(padding)
    o.fusedActivationFunction = _activation(activation)
    return o


def _depthwise_options(stride=(1, 1), padding="VALID", dilation=(1, 1), depth_multiplier=1, activation=None):
    o = fb.DepthwiseConv2DOptionsT()
    o.strideH, o.strideW = _pair(stride)
    o.dilationHFactor, o.dilationWFactor = _pair(dilation)
    o.padding = _padding(padding)
    o.depthMultiplier = int(depth_multiplier)
    o.fusedActivationFunction = _activation(activation)
    return o


def _fully_connected_options(activation=None, keep_num_dims=False):
    o = fb.FullyConnectedOptionsT()
    o.fusedActivationFunction = _activation(activation)
    o.keepNumDims = bool(keep_num_dims)
    return o


def _activation_only(cls):
    def build(activation=None):
        o = cls()
        o.fusedActivationFunction = _activation(activation)
        return o

    return build


def _pool_options(filter=(2, 2), stride=(2, 2), padding="VALID", activation=None):  # noqa: A002 - TFLite's name
    o = fb.Pool2DOptionsT()
    o.filterHeight, o.filterWidth = _pair(filter)
    o.strideH, o.strideW = _pair(stride)
    o.padding = _padding(padding)
    o.fusedActivationFunction = _activation(activation)
    return o


def _reducer_options(keep_dims=False):
    o = fb.ReducerOptionsT()
    o.keepDims = bool(keep_dims)
    return o


def _reshape_options(new_shape=None):
    o = fb.ReshapeOptionsT()
    # The shape input tensor is authoritative; the option copy keeps older
    # runtimes (and tools that only read options) happy.
    o.newShape = None if new_shape is None else [int(d) for d in new_shape]
    return o


def _softmax_options(beta=1.0):
    o = fb.SoftmaxOptionsT()
    o.beta = float(beta)
    return o


def _leaky_relu_options(alpha=0.2):
    o = fb.LeakyReluOptionsT()
    o.alpha = float(alpha)
    return o


def _concat_options(axis=-1, activation=None):
    o = fb.ConcatenationOptionsT()
    o.axis = int(axis)
    o.fusedActivationFunction = _activation(activation)
    return o


def _resize_options(cls):
    """Options builder of RESIZE_NEAREST_NEIGHBOR / RESIZE_BILINEAR (the same two flags)."""
    def build(align_corners=False, half_pixel_centers=False):
        o = cls()
        o.alignCorners = bool(align_corners)
        o.halfPixelCenters = bool(half_pixel_centers)
        return o
    return build


def _gelu_options(approximate=False):
    o = fb.GeluOptionsT()
    o.approximate = bool(approximate)
    return o


def _batch_matmul_options(adj_x=False, adj_y=False):
    o = fb.BatchMatMulOptionsT()
    o.adjX, o.adjY = bool(adj_x), bool(adj_y)
    return o


def _empty(cls):
    return lambda: cls()


@dataclass(frozen=True)
class OpSpec:
    """One supported operator: schema code, options table and builder.

    ``int8_version`` is the opcode version the converter writes when the op
    runs on int8 tensors (float graphs use version 1); the first
    ``required_inputs`` inputs may not be left out (LiteRT 2.3.0 refuses a
    CONV_2D or DEPTHWISE_CONV_2D without its bias, for instance).
    """

    code: int
    options_type: int
    build_options: Callable[..., Any] | None
    int8_version: int = 1
    required_inputs: int = 1


_O = fb.BuiltinOptions
_B = fb.BuiltinOperator

#: op name -> how to write it.  Adding an op is adding a row.
OPS: dict[str, OpSpec] = {
    "CONV_2D": OpSpec(_B.CONV_2D, _O.Conv2DOptions, _conv_options, 3, 3),
    "DEPTHWISE_CONV_2D": OpSpec(_B.DEPTHWISE_CONV_2D, _O.DepthwiseConv2DOptions, _depthwise_options, 3, 3),
    "FULLY_CONNECTED": OpSpec(_B.FULLY_CONNECTED, _O.FullyConnectedOptions, _fully_connected_options, 4, 2),
    "ADD": OpSpec(_B.ADD, _O.AddOptions, _activation_only(fb.AddOptionsT), 2, 2),
    "SUB": OpSpec(_B.SUB, _O.SubOptions, _activation_only(fb.SubOptionsT), 2, 2),
    "MUL": OpSpec(_B.MUL, _O.MulOptions, _activation_only(fb.MulOptionsT), 2, 2),
    "AVERAGE_POOL_2D": OpSpec(_B.AVERAGE_POOL_2D, _O.Pool2DOptions, _pool_options, 2),
    "MAX_POOL_2D": OpSpec(_B.MAX_POOL_2D, _O.Pool2DOptions, _pool_options, 2),
    "MEAN": OpSpec(_B.MEAN, _O.ReducerOptions, _reducer_options, 2, 2),
    "RESHAPE": OpSpec(_B.RESHAPE, _O.ReshapeOptions, _reshape_options, 1, 2),
    "SOFTMAX": OpSpec(_B.SOFTMAX, _O.SoftmaxOptions, _softmax_options, 2),
    "LOGISTIC": OpSpec(_B.LOGISTIC, _O.NONE, None, 2),
    "TANH": OpSpec(_B.TANH, _O.NONE, None, 2),
    "HARD_SWISH": OpSpec(_B.HARD_SWISH, _O.HardSwishOptions, _empty(fb.HardSwishOptionsT), 1),
    "RELU": OpSpec(_B.RELU, _O.NONE, None, 2),
    "RELU6": OpSpec(_B.RELU6, _O.NONE, None, 2),
    "RELU_N1_TO_1": OpSpec(_B.RELU_N1_TO_1, _O.NONE, None),
    "MINIMUM": OpSpec(_B.MINIMUM, _O.MaximumMinimumOptions, _empty(fb.MaximumMinimumOptionsT), 2, 2),
    "MAXIMUM": OpSpec(_B.MAXIMUM, _O.MaximumMinimumOptions, _empty(fb.MaximumMinimumOptionsT), 2, 2),
    "SLICE": OpSpec(_B.SLICE, _O.SliceOptions, _empty(fb.SliceOptionsT), 2, 3),
    "LEAKY_RELU": OpSpec(_B.LEAKY_RELU, _O.LeakyReluOptions, _leaky_relu_options, 2),
    "PRELU": OpSpec(_B.PRELU, _O.NONE, None, 1, 2),
    # QUANTIZE and DEQUANTIZE options tables are empty: left out, as the converter does
    "QUANTIZE": OpSpec(_B.QUANTIZE, _O.NONE, None, 2),
    "DEQUANTIZE": OpSpec(_B.DEQUANTIZE, _O.NONE, None, 2),
    "CONCATENATION": OpSpec(_B.CONCATENATION, _O.ConcatenationOptions, _concat_options, 2),
    "PAD": OpSpec(_B.PAD, _O.PadOptions, _empty(fb.PadOptionsT), 2, 2),
    "TRANSPOSE": OpSpec(_B.TRANSPOSE, _O.TransposeOptions, _empty(fb.TransposeOptionsT), 2, 2),
    "RESIZE_NEAREST_NEIGHBOR": OpSpec(_B.RESIZE_NEAREST_NEIGHBOR, _O.ResizeNearestNeighborOptions,
                                      _resize_options(fb.ResizeNearestNeighborOptionsT), 2, 2),
    "RESIZE_BILINEAR": OpSpec(_B.RESIZE_BILINEAR, _O.ResizeBilinearOptions, _resize_options(fb.ResizeBilinearOptionsT),
                              2, 2),
    "GELU": OpSpec(_B.GELU, _O.GeluOptions, _gelu_options, 2),
    "BATCH_MATMUL": OpSpec(_B.BATCH_MATMUL, _O.BatchMatMulOptions, _batch_matmul_options, 2, 2),
    "RSQRT": OpSpec(_B.RSQRT, _O.NONE, None, 2),
    # a sparse constant (Tensor.sparsity) expanded to its dense form; delegates fold it at init
    "DENSIFY": OpSpec(_B.DENSIFY, _O.DensifyOptions, _empty(fb.DensifyOptionsT)),
}

# Builtin codes above 127 live only in the 32-bit field; the deprecated
# 8-bit field then holds PLACEHOLDER_FOR_GREATER_OP_CODES.
_PLACEHOLDER_FOR_GREATER_OP_CODES = 127
_OP_NAMES = {spec.code: name for name, spec in OPS.items()}
_QUANTIZED_TYPES = {fb.TensorType.INT8, fb.TensorType.UINT8, fb.TensorType.INT16, fb.TensorType.INT4}


def pack_int4(codes: np.ndarray) -> bytes:
    """4-bit codes (in [-8, 7]) two per byte, flat element ``2i`` in the low nibble, as LiteRT
    reads ``TensorType.INT4``; an odd count leaves the last high nibble 0."""
    flat = np.asarray(codes, np.int64).reshape(-1)
    if flat.size and (flat.min() < -8 or flat.max() > 7):
        raise ConfigError("int4 data must lie in [-8, 7]")
    nib = (flat & 0xF).astype(np.uint8)
    if nib.size % 2:
        nib = np.append(nib, np.uint8(0))
    return (nib[0::2] | (nib[1::2] << 4)).astype(np.uint8).tobytes()


def unpack_int4(data: bytes, count: int) -> np.ndarray:
    """The ``count`` signed 4-bit codes of :func:`pack_int4`'s bytes, as int8."""
    raw = np.frombuffer(bytes(data), np.uint8)
    nib = np.empty(raw.size * 2, np.int16)
    nib[0::2], nib[1::2] = raw & 0xF, raw >> 4
    nib = nib[:count]
    return np.where(nib > 7, nib - 16, nib).astype(np.int8)


@dataclass(frozen=True)
class TensorRef:
    """Handle on a tensor added to a :class:`ModelBuilder`."""

    index: int
    name: str
    shape: tuple[int, ...]
    dtype: str
    scale: np.ndarray | None = field(default=None, compare=False)
    zero_point: np.ndarray | None = field(default=None, compare=False)
    axis: int = 0


class _AlignedBufferT(fb.BufferT):
    """A buffer whose data vector starts on a 16-byte boundary."""

    def Pack(self, builder):  # noqa: N802 - flatbuffers object API name
        data = None
        if self.data is not None:
            payload = bytes(self.data)
            builder.StartVector(1, len(payload), _BUFFER_ALIGNMENT)
            builder.head -= len(payload)
            builder.Bytes[builder.head : builder.head + len(payload)] = payload
            data = builder.EndVector()
        fb.BufferStart(builder)
        if data is not None:
            fb.BufferAddData(builder, data)
        return fb.BufferEnd(builder)


class _CompactTensorT(fb.TensorT):
    """A tensor whose shape vector is shared with every earlier tensor of the same shape.

    Flatbuffers allows any number of offsets to one vector; most activations
    and every (float16 constant, DEQUANTIZE output) pair repeat a shape.
    """

    shared_shapes: dict = {}

    def Pack(self, builder):  # noqa: N802 - flatbuffers object API name
        shapes = self.shared_shapes        # one dict per ModelBuilder.finish()
        key = tuple(self.shape)
        shape = shapes.get(key)
        if shape is None:
            fb.TensorStartShapeVector(builder, len(key))
            for d in reversed(key):
                builder.PrependInt32(d)
            shape = shapes[key] = builder.EndVector()
        name = builder.CreateString(self.name) if self.name is not None else None
        quantization = self.quantization.Pack(builder) if self.quantization is not None else None
        sparsity = self.sparsity.Pack(builder) if self.sparsity is not None else None
        fb.TensorStart(builder)
        fb.TensorAddShape(builder, shape)
        fb.TensorAddType(builder, self.type)
        fb.TensorAddBuffer(builder, self.buffer)
        if name is not None:
            fb.TensorAddName(builder, name)
        if quantization is not None:
            fb.TensorAddQuantization(builder, quantization)
        if sparsity is not None:
            fb.TensorAddSparsity(builder, sparsity)
        return fb.TensorEnd(builder)


def _as_index(t) -> int:
    if t is None:
        return -1  # optional input left out (e.g. FULLY_CONNECTED without bias)
    return t.index if isinstance(t, TensorRef) else int(t)


class ModelBuilder:
    """Assemble a single-subgraph LiteRT model.

    Tensors are added with :meth:`add_tensor` (constants carry ``data``),
    operators with :meth:`add_op` in execution order, then :meth:`set_io` and
    :meth:`finish` return the serialized flatbuffer.
    """

    def __init__(self, description: str = "edgepack", subgraph_name: str = "main"):
        self.description = description
        self.subgraph_name = subgraph_name
        self._tensors: list[fb.TensorT] = []
        self._refs: list[TensorRef] = []
        self._buffers: list[fb.BufferT] = [_AlignedBufferT()]  # buffer 0: the empty sentinel
        self._operators: list[fb.OperatorT] = []
        self._opcodes: dict[int, fb.OperatorCodeT] = {}
        self._names: set[str] = set()
        self._inputs: list[int] = []
        self._outputs: list[int] = []

    def has_name(self, name: str) -> bool:
        """Whether a tensor called ``name`` was added already."""
        return name in self._names

    @property
    def tensors(self) -> list[TensorRef]:
        """Every tensor added so far, in index order."""
        return list(self._refs)

    def add_tensor(
        self,
        name: str,
        shape: Sequence[int],
        dtype: str = "int8",
        data: np.ndarray | None = None,
        scale=None,
        zero_point=None,
        axis: int = 0,
        sparsity: "fb.SparsityParametersT | None" = None,
        blockwise: "tuple[TensorRef, int] | None" = None,
    ) -> TensorRef:
        """Add a tensor; with ``data`` it is a constant stored in its own buffer.

        ``scale``/``zero_point`` are scalars (per-tensor) or 1-D sequences
        (per-channel along ``axis``).  A missing ``zero_point`` means 0.
        ``int4`` data is packed two codes per byte (:func:`pack_int4`).  With
        ``sparsity`` (:func:`sdk.litert.sparse.encode`) ``data`` holds only the
        stored values and ``shape`` is the dense shape; a DENSIFY op expands it.
        ``blockwise=(scales, block_size)``: INT4 weights ``[n, k]`` with one float16 scale per
        ``block_size`` consecutive weights of a row, held in the constant ``scales`` ``[n, k /
        block_size]`` (``BlockwiseQuantization``; XNNPACK's dynamic-range qb4w kernel).
        Names must be unique: runners and the reference address tensors by name.
        """
        if name in self._names:
            raise ConfigError(f"tensor name {name!r} is used twice")
        shape = tuple(int(d) for d in shape)
        np_dtype = numpy_dtype(dtype)
        t = _CompactTensorT()
        t.name = name
        t.shape = list(shape)
        t.type = DTYPES[dtype][0]
        t.buffer = 0
        t.sparsity = sparsity
        if sparsity is not None and data is None:
            raise ConfigError(f"tensor {name!r}: sparsity parameters describe constant data; pass data")
        if data is not None:
            arr = np.asarray(data)
            if sparsity is None and arr.size != int(np.prod(shape, dtype=np.int64)):
                raise ConfigError(f"tensor {name!r}: data has {arr.size} elements, shape {shape} needs "
                                  f"{int(np.prod(shape))}")
            if arr.dtype.kind in "iu" and np_dtype.kind in "iu":
                info = np.iinfo(np_dtype)
                if arr.size and (arr.min() < info.min or arr.max() > info.max):
                    raise ConfigError(f"tensor {name!r}: data does not fit {dtype}")
            if dtype == "int4":
                payload = pack_int4(arr)
            else:
                payload = np.ascontiguousarray(arr if sparsity is not None else arr.reshape(shape),
                                               dtype=np_dtype).tobytes()
            buf = _AlignedBufferT()
            buf.data = payload
            t.buffer = len(self._buffers)
            self._buffers.append(buf)
        scales = zps = None
        if scale is not None:
            scales = np.atleast_1d(np.asarray(scale, dtype=np.float64)).astype(np.float32)
            zps = np.atleast_1d(np.asarray(0 if zero_point is None else zero_point, dtype=np.int64))
            if zps.size == 1 and scales.size > 1:
                zps = np.repeat(zps, scales.size)
            if zps.size != scales.size:
                raise ConfigError(f"tensor {name!r}: {scales.size} scales but {zps.size} zero points")
            if scales.size > 1 and (not -len(shape) <= axis < len(shape) or shape[axis] != scales.size):
                raise ConfigError(f"tensor {name!r}: {scales.size} scales do not match axis {axis} of {shape}")
            if not np.all(np.isfinite(scales)) or np.any(scales <= 0):
                raise ConfigError(f"tensor {name!r}: quantization scales must be finite and > 0")
            q = fb.QuantizationParametersT()
            q.scale = [float(s) for s in scales]
            q.zeroPoint = [int(z) for z in zps]
            q.quantizedDimension = int(axis) % len(shape) if shape else 0
            t.quantization = q
        elif blockwise is not None:
            scales_ref, block_size = blockwise
            q = fb.QuantizationParametersT()
            q.detailsType = fb.QuantizationDetails.BlockwiseQuantization
            q.details = fb.BlockwiseQuantizationT(scales=scales_ref.index, zeroPoints=-1, blockSize=int(block_size))
            q.quantizedDimension = 0
            t.quantization = q
        elif t.type in _QUANTIZED_TYPES and data is None:
            raise ConfigError(f"tensor {name!r}: a {dtype} activation needs a scale")
        q_axis = t.quantization.quantizedDimension if t.quantization else 0
        ref = TensorRef(len(self._tensors), name, shape, dtype, scales, zps, q_axis)
        self._tensors.append(t)
        self._refs.append(ref)
        self._names.add(name)
        return ref

    def add_const(self, name: str, values, dtype: str = "int32") -> TensorRef:
        """Add an unquantized constant (shape tensors, axes, paddings, permutations)."""
        arr = np.asarray(values, dtype=numpy_dtype(dtype))
        return self.add_tensor(name, arr.shape, dtype, data=arr)

    def add_op(self, op: str, inputs: Sequence, outputs: Sequence, **options) -> int:
        """Append operator ``op`` (a key of :data:`OPS`); returns its index.

        ``inputs``/``outputs`` are :class:`TensorRef` handles or indices;
        ``None`` marks an omitted optional input.  ``options`` are the
        keywords of the op's options builder (``stride``, ``padding``,
        ``activation``, ...); unknown keywords are an error.
        """
        spec = OPS.get(op)
        if spec is None:
            raise ConfigError(f"unknown LiteRT op {op!r}; supported: {', '.join(sorted(OPS))}")
        missing = [i for i in range(spec.required_inputs) if i >= len(inputs) or inputs[i] is None]
        if missing:
            raise ConfigError(f"{op} needs its first {spec.required_inputs} inputs; input {missing[0]} is missing "
                              "(LiteRT refuses the op without it, even when it would be all zeros)")
        o = fb.OperatorT()
        o.inputs = [_as_index(t) for t in inputs]
        o.outputs = [_as_index(t) for t in outputs]
        for i in o.inputs + o.outputs:
            if i >= len(self._tensors):
                raise ConfigError(f"{op}: tensor index {i} was never added")
        o.builtinOptionsType = spec.options_type
        if spec.build_options is None:
            if options:
                raise ConfigError(f"{op} takes no options, got {sorted(options)}")
        else:
            try:
                o.builtinOptions = spec.build_options(**options)
            except TypeError as exc:
                raise ConfigError(f"{op}: bad options {sorted(options)}: {exc}") from None
        o.opcodeIndex = self._opcode_index(spec, inputs)
        self._operators.append(o)
        return len(self._operators) - 1

    def _opcode_index(self, spec: OpSpec, inputs: Sequence) -> int:
        first = _as_index(inputs[0]) if inputs else -1
        quantized = first >= 0 and self._tensors[first].type in _QUANTIZED_TYPES
        version = spec.int8_version if quantized else 1
        code = self._opcodes.get(spec.code)
        if code is None:
            code = fb.OperatorCodeT()
            code.builtinCode = spec.code
            code.deprecatedBuiltinCode = min(spec.code, _PLACEHOLDER_FOR_GREATER_OP_CODES)
            code.version = version
            self._opcodes[spec.code] = code
        code.version = max(code.version, version)
        return list(self._opcodes).index(spec.code)

    def set_io(self, inputs: Sequence, outputs: Sequence) -> None:
        """Declare the model's input and output tensors, in signature order."""
        self._inputs = [_as_index(t) for t in inputs]
        self._outputs = [_as_index(t) for t in outputs]

    def finish(self) -> bytes:
        """Serialize the model (schema version 3, file identifier ``TFL3``)."""
        if not self._outputs:
            raise ConfigError("call set_io() with at least one output before finish()")
        sg = fb.SubGraphT()
        sg.name = self.subgraph_name
        sg.tensors = self._tensors
        sg.operators = self._operators
        sg.inputs = self._inputs
        sg.outputs = self._outputs
        sig = fb.SignatureDefT()
        sig.signatureKey = "serving_default"
        sig.subgraphIndex = 0
        sig.inputs = [self._tensor_map(i) for i in self._inputs]
        sig.outputs = [self._tensor_map(i) for i in self._outputs]
        m = fb.ModelT()
        m.version = SCHEMA_VERSION
        m.description = self.description
        m.operatorCodes = list(self._opcodes.values())
        m.subgraphs = [sg]
        m.buffers = self._buffers
        m.signatureDefs = [sig]
        shapes: dict = {}
        for t in self._tensors:
            t.shared_shapes = shapes
        builder = flatbuffers.Builder(1024 + sum(len(b.data or b"") for b in self._buffers))
        builder.Finish(m.Pack(builder), file_identifier=FILE_IDENTIFIER)
        return bytes(builder.Output())

    def _tensor_map(self, index: int) -> fb.TensorMapT:
        tm = fb.TensorMapT()
        tm.name = self._tensors[index].name
        tm.tensorIndex = index
        return tm


def read_model(data: bytes) -> fb.ModelT:
    """Parse a ``.tflite`` flatbuffer into the schema's object API."""
    buf = bytes(data)
    if len(buf) < 8 or not fb.Model.ModelBufferHasIdentifier(buf, 0):
        raise ArtifactError("not a LiteRT model: the flatbuffer identifier 'TFL3' is missing")
    try:
        return fb.ModelT.InitFromPackedBuf(buf, 0)
    except Exception as exc:  # a truncated buffer fails anywhere inside the generated code
        raise ArtifactError(f"damaged LiteRT model: {exc}") from exc


def op_name(model: fb.ModelT, op: fb.OperatorT) -> str:
    """Builtin name (``"CONV_2D"``) of an operator of ``model``."""
    code = model.operatorCodes[op.opcodeIndex]
    builtin = max(code.builtinCode, code.deprecatedBuiltinCode)
    name = _OP_NAMES.get(builtin)
    if name is None:
        names = {v: k for k, v in vars(fb.BuiltinOperator).items() if not k.startswith("_")}
        name = names.get(builtin, f"BUILTIN_{builtin}")
    return name


def tensor_data(model: fb.ModelT, tensor: fb.TensorT) -> np.ndarray | None:
    """Constant contents of ``tensor`` as a numpy array, or None for activations."""
    data = model.buffers[tensor.buffer].data if 0 <= tensor.buffer < len(model.buffers) else None
    if data is None or len(data) == 0:
        return None
    dt = numpy_dtype(dtype_name(tensor.type))
    shape = tuple(tensor.shape) if tensor.shape is not None else ()
    raw = np.asarray(data, dtype=np.uint8).tobytes()
    if tensor.sparsity is not None:
        from .sparse import densify

        values = unpack_int4(raw, 2 * len(raw)) if tensor.type == fb.TensorType.INT4 else np.frombuffer(raw, dt)
        return densify(values, tensor.sparsity, shape)
    if tensor.type == fb.TensorType.INT4:
        return unpack_int4(raw, int(np.prod(shape, dtype=np.int64))).reshape(shape)
    return np.frombuffer(raw, dtype=dt).reshape(shape)
