"""Lower a canonical :class:`sdk.graph.Graph` to a LiteRT flatbuffer.

One pass over the nodes in order.  Each graph value becomes one LiteRT tensor
and remembers its *layout*: ``perm[i]`` is the torch dimension stored at
position ``i``.  4-D activations are stored NHWC (``perm = (0, 2, 3, 1)``),
everything else in torch order; the NCHW → NHWC conversion happens once, at the
model inputs (the runner transposes), and a TRANSPOSE is emitted only where an
op needs torch order (flatten of a spatial map, linear on a 4-D tensor).

Quantized (``arm-int8``): int8 per-channel symmetric weights, int8 asymmetric
activations from the plan, int32 bias with scale ``s_in·s_w``.  Ops whose
runtime kernels require equal input/output parameters (max-pool, reshape,
transpose, pad, slice, resize) pass their input's parameters through;
LOGISTIC/TANH get the fixed output parameters the runtime requires; inputs
of CONCATENATION whose parameters differ are requantized with QUANTIZE first.
Ops XNNPACK runs in float only, or that int8 would ruin (layer norm, GELU,
attention, softmax, matmul, bilinear resize: :data:`FLOAT_IN_INT8` says why
per op), run in float between DEQUANTIZE and QUANTIZE, inside the same
partition; the profile marks those layers ``precision: float32``.

Layouts are lazy: a permute moves no data, it only relabels the layout, and a
consumer that needs another order transposes (ConvNeXt's permute → layer norm
→ permute back costs nothing).

XNNPACK (LiteRT's default delegate) takes only some int8 ops; one it declines
splits the graph into delegate partitions with builtin kernels in between,
which made int8 slower than fp32 on real networks.  So every int8 graph is
written with ops it takes (measured with :func:`.runtime.op_summary`):

* clamps (ReLU, ReLU6, hardtanh, clamp) after conv, linear, add, sub or mul
  fuse into them: as the fused activation where LiteRT has one, else as the
  saturation of the output's int8 range, which the calibration of the clamp's
  output already bounds.  Elsewhere a clamp whose range holds 0 is a QUANTIZE
  into its own output parameters (the requantization saturates); standalone
  int8 RELU/RELU6 and MINIMUM/MAXIMUM run in builtin kernels only;
* hardswish is ``x · hardsigmoid(x)`` = ADD(x, 3) with fused RELU6, MUL by
  1/6, MUL by x (int8 HARD_SWISH has builtin kernels only; measured on six
  conv+hardswish layers, 1 thread: 353 µs in one partition against 918 µs in
  six; DEQUANTIZE + float HARD_SWISH + QUANTIZE took 352 µs but needs
  XNNPACK's float rounding reproduced, a depthwise 1×1 gate 411 µs);
* max pooling with padding torch's and TFLite's SAME do not share pads its
  input by replicating the edge rows and columns (SLICE + CONCATENATION), then
  pools VALID: every torch window holds a real element next to any padding
  (padding <= kernel / 2, ceil-mode windows start inside the input), so a
  copy of the nearest edge never exceeds the window's true maximum.  PADV2
  with a -inf / -128 fill would be the direct form, but XNNPACK declines it.

Float (``arm-fp32``, and ``fp16-gpu`` with float16 weights): the same
lowering without quantization, where XNNPACK takes float HARD_SWISH, RELU,
RELU6, RELU_N1_TO_1, MINIMUM and MAXIMUM as they are.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from sdk.errors import ConfigError, RefusedNode, UnsupportedOpError
from sdk.graph import Graph, Node, batch_norm_as_conv, macs
from sdk.quant import QuantPlan, QuantSpec, qparams, qrange

from .flatbuffer import ModelBuilder, TensorRef
from .layout import inverse_perm
from .padding import same_padding
from .sparse import encode as sparse_encode
from .sparse import stored_bytes as sparse_bytes

#: canonical ops this lowering handles (attribute limits are checked per node)
SUPPORTED = frozenset({
    "conv", "linear", "relu", "hardtanh", "leaky_relu", "prelu", "sigmoid", "tanh", "hardswish", "hardsigmoid",
    "silu", "add", "sub", "mul", "max_pool2d", "avg_pool2d", "mean", "reshape", "permute", "cat", "softmax", "pad",
    "upsample_nearest", "batch_norm", "slice", "layer_norm", "gelu", "attention", "matmul", "upsample_bilinear",
})
#: why a softmax / logistic / tanh that is a model output is computed in float (float outputs only)
FLOAT_OUTPUT = ("a model output: computed in float from its DEQUANTIZEd input, it keeps float precision instead "
                "of the fixed int8 step (1/256) at the cost of the DEQUANTIZE the output needs anyway")
#: ops an int8 graph computes in float between DEQUANTIZE and QUANTIZE (XNNPACK runs all of them, so
#: the graph stays one partition), and why: shown per layer in the profile
FLOAT_IN_INT8 = {
    "layer_norm": "LiteRT has no LAYER_NORM op and its decomposition needs RSQRT, which XNNPACK runs in float "
                  "only; an int8 variance would also lose the precision normalisation needs",
    "gelu": "XNNPACK runs GELU in float only (int8 GELU has builtin kernels only and would split the graph)",
    "attention": "softmax(q·kᵀ) runs in float: XNNPACK declines int8 SOFTMAX (builtin kernels only, the graph "
                 "would split), and its fixed 1/256 output step rounds most weights of a long attention row to 0",
    "matmul": "BATCH_MATMUL of two activations runs in float, as attention does",
    "prelu": "XNNPACK declines int8 PRELU (builtin kernels only, the graph would split); float PRELU is one "
             "multiply per negative value, so the float island is exact",
    "softmax": "XNNPACK declines int8 SOFTMAX (builtin kernels only, the graph would split); as a model "
               "output it stays float, where an int8 step of 1/256 would cost the probabilities precision",
    "upsample_bilinear": "bilinear weights are applied in float (int8 RESIZE_BILINEAR rounds differently in "
                         "XNNPACK and the builtin kernels)",
}
NHWC = (0, 2, 3, 1)
#: output parameters the runtime requires (scale, zero point)
FIXED_OUTPUT = {"sigmoid": (1.0 / 256, -128), "tanh": (1.0 / 128, 0)}
#: clamp bounds LiteRT has a fused activation (and a float op) for
_ACTIVATION_CODES = {(0.0, 6.0): "RELU6", (0.0, math.inf): "RELU", (-1.0, 1.0): "RELU_N1_TO_1"}
#: ops a clamp fuses into
_FUSE_INTO = ("conv", "linear", "add", "sub", "mul")
#: smallest int8 activation scale written: TFLite's builtin kernels quantize the bounds of a fused
#: activation (6.0 for RELU6) into int32 at allocate time and refuse the model when 6 / scale
#: overflows (``no_integer_overflow_from_quantization``), which a near-constant activation's range
#: (1e-12 wide) causes; 2**-26 leaves 6 / scale at 4e8.  Values below it round to zero.
MIN_ACTIVATION_SCALE = 2.0 ** -26
#: smallest input/output scale ratio of an int8 ADD XNNPACK takes (2**-10; measured: 1/1000 is
#: delegated, 1/1030 is not)
MIN_ADD_INPUT_RATIO = 2.0 ** -10
#: most inputs XNNPACK's CONCATENATION takes
_MAX_CONCAT = 5


@dataclasses.dataclass
class Value:
    ref: TensorRef
    perm: tuple[int, ...]           # stored dim i holds torch dim perm[i]
    spec: QuantSpec | None          # int8 parameters (None: float)

    @property
    def stored_shape(self) -> tuple[int, ...]:
        return self.ref.shape


@dataclasses.dataclass
class Lowered:
    model: bytes
    inputs: list[dict]              # name, shape (torch), dtype, layout perm, quantization
    outputs: list[dict]
    layers: list[dict]


#: the kernel a conv / linear runs in, by (op, compute, weight storage), as measured in ai-edge-litert
#: 2.3.0 with its default XNNPACK delegate (tests/targets/arm_int8/test_encodings.py checks it per row);
#: the lowering never writes a combination that is missing (DEPTHWISE dynamic becomes weight-only)
KERNELS = {
    ("FULLY_CONNECTED", "static", "int8"): "xnnpack int8",
    ("FULLY_CONNECTED", "static", "int4"): "xnnpack int8 x int4 (qs8-qc4w)",
    ("FULLY_CONNECTED", "dynamic", "int8"): "xnnpack dynamic range (qd8-qc8w)",
    ("FULLY_CONNECTED", "dynamic", "int4"): "xnnpack dynamic range (qd8-qc4w)",
    ("FULLY_CONNECTED", "weight-only", "int8"): "xnnpack float (weights dequantized at init)",
    ("FULLY_CONNECTED", "weight-only", "int4"): "builtin float (INT4 weights dequantized by a builtin op)",
    ("CONV_2D", "static", "int8"): "xnnpack int8",
    ("CONV_2D", "static", "int4"): "builtin int8 (INT4 filter unpacked on every call)",
    ("CONV_2D", "dynamic", "int8"): "xnnpack dynamic range (qd8-qc8w)",
    ("CONV_2D", "dynamic", "int4"): "builtin dynamic range (INT4 filter unpacked on every call)",
    ("CONV_2D", "weight-only", "int8"): "xnnpack float (weights dequantized at init)",
    ("CONV_2D", "weight-only", "int4"): "builtin float (INT4 weights dequantized by a builtin op)",
    ("DEPTHWISE_CONV_2D", "static", "int8"): "xnnpack int8",
    ("DEPTHWISE_CONV_2D", "static", "int4"): "builtin int8 (INT4 filter unpacked on every call)",
    ("DEPTHWISE_CONV_2D", "weight-only", "int8"): "xnnpack float (weights dequantized at init)",
    ("DEPTHWISE_CONV_2D", "weight-only", "int4"): "builtin float (INT4 weights dequantized by a builtin op)",
}


def weight_mode(op: str, compute: str) -> str:
    """How a conv / linear of a plan with ``compute`` meets its weights: as planned, except that a
    dynamic-range DEPTHWISE_CONV_2D becomes weight-only (XNNPACK has no dynamic-range depthwise
    kernel; TFLite's builtin one is 6x slower than the float one, measured)."""
    return "weight-only" if compute == "dynamic" and op == "DEPTHWISE_CONV_2D" else compute


def int_storage(op: str, mode: str, code_bits: int, int4: str = "where-fast", k: int = 0) -> str:
    """``int4`` or ``int8``: the storage of integer weight codes of ``code_bits`` bits (``int4``:
    ``where-fast`` or ``always``, see :func:`lower`); ``k``: a fully connected layer's input
    width (XNNPACK declines INT4 rows of odd length, :func:`.hybrid.xnnpack_takes_fully_connected`)."""
    if code_bits > 4:
        return "int8"
    fast = op == "FULLY_CONNECTED" and mode in ("static", "dynamic") and k % 2 == 0
    return "int4" if fast or int4 == "always" else "int8"


def litert_op(graph: Graph, node: Node) -> str:
    """The LiteRT op a conv / linear node lowers to."""
    if node.op == "linear":
        return "FULLY_CONNECTED"
    cin = graph.shape(node.inputs[0])[1]
    return "DEPTHWISE_CONV_2D" if node.attrs["groups"] == cin and node.attrs["groups"] > 1 else "CONV_2D"


#: the kernel of blockwise INT4 weights (float16 scales, which XNNPACK rounds to bfloat16)
BLOCKWISE_KERNEL = "xnnpack dynamic range blockwise (qd8-qb4w, bf16 scales)"


def blockwise_refusal(op: str, compute: str, spec: QuantSpec, k: int) -> str | None:
    """Why LiteRT cannot run blockwise weights of ``spec`` here (None: it can): only a dynamic-range
    FULLY_CONNECTED with 4-bit codes in blocks of a multiple of 32 that divides the row (measured;
    XNNPACK's qb4w kernel, other blocks fall to a builtin kernel)."""
    if op != "FULLY_CONNECTED" or compute != "dynamic":
        return ("blockwise (grouped) weight scales run in LiteRT only for fully connected layers with float "
                "activations quantized at run time: use int4 with activations: float (or dynamic), or "
                "per-channel scales")
    if spec.code_bits > 4:
        return "blockwise scales are INT4-only in LiteRT: use 4-bit weights or per-channel scales"
    if spec.block_size % 32 or k % spec.block_size:
        return f"blockwise INT4 needs a block size that is a multiple of 32 and divides {k}, got {spec.block_size}"
    return None


#: the kernel of an INT4 FULLY_CONNECTED whose rows have odd length (int4="always" only)
ODD_INT4_FC = "builtin (XNNPACK declines INT4 rows of odd length)"


def _kernel(op: str, mode: str, dtype: str, k: int = 0) -> str:
    if op == "FULLY_CONNECTED" and dtype == "int4" and mode != "weight-only" and k % 2:
        return ODD_INT4_FC
    return KERNELS[(op, mode, dtype)]


def _sparse_path(op: str, dtype: str, mode: str = "float") -> bool:
    """Whether a DENSIFY of a ``dtype`` weight of ``op`` (in ``mode``: float, static, dynamic,
    weight-only) stays in XNNPACK.  Measured: float32 and float16 weights of every op, int8
    weights dequantized to float (weight-only), int8 filters of static int8 convolutions; an int8
    FULLY_CONNECTED filter or a dynamic-range CONV_2D filter behind DENSIFY makes the delegate fail
    to prepare, INT4 DENSIFY has no kernel."""
    if dtype in ("float32", "float16") or (dtype == "int8" and mode == "weight-only"):
        return True
    return dtype == "int8" and mode == "static" and op in ("CONV_2D", "DEPTHWISE_CONV_2D")


#: bytes a sparse weight adds to the file beyond its values and indices: the second tensor with its
#: sparsity tables, the DENSIFY op and their flatbuffer headers (measured: 290–305 bytes on arm-fp32
#: convs of 72 to 1044 weights); sparse storage is chosen only when it still comes out smaller
SPARSE_OVERHEAD = 320


def _worth_sparse(w: np.ndarray, item: float = 1.0) -> bool:
    """Whether ``w`` (``item`` bytes a value) has zeros enough that sparse storage could pay: each
    kept value costs at least one index byte more.  An all-zero weight never pays: LiteRT reads an
    empty buffer as "no data", not as no values."""
    nnz = np.count_nonzero(w)
    return 0 < nnz and nnz * (item + 1) < w.size * item


@dataclasses.dataclass
class Weights:
    """The weight and bias tensors of one conv / linear, and what the profile says about them."""

    weight: TensorRef
    bias: TensorRef
    nbytes: int                 # stored bytes of weight and bias
    stored: str                 # storage dtype of the weight: int8, int4, float16, float32
    sparse: bool                # stored sparse behind DENSIFY
    kernel: str                 # the kernel it runs in (:data:`KERNELS`)

    def row(self) -> dict:
        kernel = self.kernel + ("; stored sparse, densified at load" if self.sparse else "")
        return {"weight_storage": self.stored + (" sparse" if self.sparse else ""), "kernel": kernel}


def lower(graph: Graph, plan: QuantPlan | None, *, target: str, io: str = "float",
          half_weights: bool = False, keep_fp32: frozenset[str] = frozenset(), int4: str = "where-fast",
          sparsity: str = "off") -> Lowered:
    """Lower ``graph``; with integer weights when ``plan`` is given (int8 activations for a
    ``static`` plan, float ones for ``dynamic`` and ``weight-only``: see :data:`KERNELS`).
    ``half_weights``: float model with float16 weights and biases behind DEQUANTIZE ops (the
    form GPU delegates consume), except for the nodes in ``keep_fp32``.  ``int4``:
    ``where-fast`` stores 4-bit weight codes as INT4 only where XNNPACK has an INT4 kernel
    (fully connected, int8 or dynamic input), elsewhere exactly in int8; ``always`` stores
    every 4-bit weight as INT4 (smaller; those layers run in builtin kernels that unpack the
    weights on every call).  ``sparsity``: ``auto`` stores a weight with zeros sparse
    (:mod:`.sparse`, behind DENSIFY) where that saves bytes and the runtime has a path.

    Stand-alone batch norms become depthwise convs here (:func:`sdk.graph.batch_norm_as_conv`;
    the LiteRT targets already did it in ``prepare``, so that int8 calibration sees the conv)."""
    graph = batch_norm_as_conv(graph)
    check(graph, target)
    if int4 not in ("where-fast", "always"):
        raise ConfigError(f"{target}: int4={int4!r} is not allowed; choose 'where-fast' or 'always'")
    if sparsity not in ("auto", "off"):
        raise ConfigError(f"{target}: sparsity={sparsity!r} is not allowed; choose 'auto' or 'off'")
    return _Lowerer(graph, plan, target, io, half_weights, keep_fp32, int4, sparsity).run()


def prepare(graph: Graph) -> Graph:
    """The graph passes the LiteRT targets run before calibration."""
    return batch_norm_as_conv(graph)


def check(graph: Graph, target: str) -> None:
    """Raise one :class:`UnsupportedOpError` that lists every node this lowering refuses."""
    refused = [RefusedNode(node.op, node.name, node.module, hint) for node in graph.nodes
               if (hint := _refusal(graph, node, target)) is not None]
    if refused:
        raise UnsupportedOpError.of(target, refused)


def _refusal(g: Graph, node: Node, target: str) -> str | None:
    """What to do about ``node`` when this lowering cannot take it (None when it can)."""
    op, a = node.op, node.attrs
    if op not in SUPPORTED:
        name = op.removeprefix("aten.")
        return (f"{target} has no lowering for {name}; express it with supported ops in forward() "
                f"({', '.join(sorted(SUPPORTED))})")
    if op in ("conv", "linear") and not g.is_const(node.inputs[1]):
        return "weights computed at run time cannot be packed; make them parameters"
    if op == "conv" and a["dims"] not in (1, 2):
        return f"conv{a['dims']}d does not lower; only Conv1d and Conv2d do"
    if op == "batch_norm" and (len(node.shape) not in (2, 3, 4)
                               or not all(g.is_const(i) for i in node.inputs[1:5])):
        return ("batch norm over more than two spatial dims, or with statistics computed at run time, does not "
                "lower; use BatchNorm1d/2d in eval mode (track_running_stats=True)")
    if op in ("max_pool2d", "avg_pool2d"):
        if tuple(a.get("dilation", (1, 1))) != (1, 1):
            return "dilated pooling does not lower; use dilation=1"
        if op == "avg_pool2d":
            if a["divisor_override"]:
                return "divisor_override does not lower; scale the pooled output instead"
            hw = g.shape(node.inputs[0])[2:]
            floor = [(s + 2 * p - k) // st + 1 for s, p, k, st in zip(hw, a["padding"], a["kernel"], a["stride"])]
            if floor != list(node.shape[2:]):
                return ("ceil_mode=True changes the average pool's output size here (its border windows have "
                        "a smaller divisor); use ceil_mode=False or pad the input")
            if any(a["padding"]) and not a["count_include_pad"] and not _tflite_same(hw, a, node.shape[2:]):
                return ("avg-pool with count_include_pad=False and padding TFLite's SAME does not share does not "
                        "lower; use count_include_pad=True")
    if op == "pad":
        if a["value"] != 0.0:
            return "only zero padding lowers"
        if any(p < 0 for p in a["pad"]):
            return "negative padding (cropping) does not lower; slice the tensor instead"
    if op == "softmax" and a["dim"] != len(node.shape) - 1:
        return "softmax lowers over the last dimension only; transpose so that it is last"
    if op == "upsample_nearest":
        h, w = g.shape(node.inputs[0])[2:]
        if a["size"][0] % h or a["size"][1] % w:
            return "only integer nearest upsampling factors lower"
    if op == "sub" and len(node.inputs) > 1 and g.is_const(node.inputs[0]):
        return "constant - tensor does not lower; write it as tensor * -1 + constant"
    if op == "attention" and len(node.inputs) > 3 and not g.is_const(node.inputs[3]):
        return "attention masks computed at run time do not lower; pass a constant mask or is_causal=True"
    if op == "layer_norm" and not (g.is_const(node.inputs[1]) and g.is_const(node.inputs[2])):
        return "layer norm weights computed at run time do not lower; make them parameters"
    if op == "matmul" and (len(g.shape(node.inputs[0])) > 5 or len(g.shape(node.inputs[1])) > 5):
        return "matmul of rank above 5 does not lower; reshape to at most 5 dims"
    if op == "matmul" and len(g.shape(node.inputs[0])) != len(g.shape(node.inputs[1])):
        return "matmul of tensors of different rank does not lower; unsqueeze the lower-rank one to the same rank"
    if op == "slice" and a["step"] != 1:
        return "slices with a step other than 1 do not lower; use a strided conv or pooling instead"
    return None


def _pool_pads(hw, a: dict, out_hw) -> list[tuple[int, int]]:
    """Per spatial dim, the (before, after) padding under which a VALID pool gives torch's output
    size: torch's padding before, and after it what the last window needs (more than the padding
    under ``ceil_mode``)."""
    pads = []
    for size, k, s, p, o in zip(hw, a["kernel"], a["stride"], a["padding"], out_hw):
        pads.append((p, max((o - 1) * s + k - size - p, 0)))
    return pads


def _tflite_same(hw, a: dict, out_hw) -> bool:
    """Whether TFLite's SAME pooling windows are torch's: as many, starting as far before the input
    (padding past the last window is never read)."""
    return all(same_padding(size, k, s)[:2] == (o, p)
               for size, k, s, p, o in zip(hw, a["kernel"], a["stride"], a["padding"], out_hw))


def _clamp_bounds(node: Node) -> tuple[float, float] | None:
    """(lo, hi) of a clamp node (relu, relu6, hardtanh, clamp), else None."""
    if node.op == "relu":
        return 0.0, math.inf
    if node.op == "hardtanh":
        return float(node.attrs["min"]), float(node.attrs["max"])
    return None


def _usable(spec: QuantSpec) -> QuantSpec:
    """``spec`` with its scale raised to :data:`MIN_ACTIVATION_SCALE` (the zero point recomputed so
    the same real range stays covered)."""
    if spec.dtype != "int8" or spec.scale[0] >= MIN_ACTIVATION_SCALE:
        return spec
    qmin, qmax = qrange("int8")
    lo = spec.scale[0] * (qmin - spec.zero_point[0])
    zp = int(np.clip(np.round(qmin - lo / MIN_ACTIVATION_SCALE), qmin, qmax))
    return dataclasses.replace(spec, scale=(MIN_ACTIVATION_SCALE,), zero_point=(zp,))


def _same_order(stored_shape, perm) -> bool:
    """True when moving dims by ``perm`` only moves size-1 dims (data order unchanged)."""
    kept = [p for p in perm if stored_shape[p] != 1]
    return kept == sorted(kept)


class _Lowerer:
    def __init__(self, graph: Graph, plan: QuantPlan | None, target: str, io: str, half_weights: bool = False,
                 keep_fp32: frozenset[str] = frozenset(), int4: str = "where-fast", sparsity: str = "off"):
        self.g, self.plan, self.target, self.io = graph, plan, target, io
        self.half_weights, self.keep_fp32 = half_weights, keep_fp32
        self.int4, self.sparsity = int4, sparsity
        # A float graph with sparse weights makes XNNPACK on ARM (not on x86 with AVX) convert the longest
        # NCHW-compatible chain from the input to sparse inference; a chain that ends early at a SAME-padded
        # stride-2 conv gives wrong outputs there (measured under qemu-aarch64, benchmarks/results/
        # sparse_probe.md): such graphs write every strided padded conv as PAD + VALID, which XNNPACK fuses
        # and its NCHW rewrite accepts.
        self.sparse_float = sparsity == "auto" and (plan is None or plan.compute != "static") and any(
            _worth_sparse(graph.constants[n.inputs[1]], 4.0) for n in graph.nodes
            if n.op in ("conv", "linear") and len(n.inputs) > 1 and n.inputs[1] in graph.constants)
        self.compute = plan.compute if plan is not None else None
        self.q = plan is not None and plan.compute == "static"      # int8 activations
        self.b = ModelBuilder(description=f"edgepack {target}")
        self.values: dict[str, Value] = {}
        self.layers: list[dict] = []
        self.fused: dict[str, Node] = {}       # producer name -> activation node fused into it
        self.fused_act: dict[str, str] = {}    # activation node name -> its fused activation code
        self.skip: set[str] = set()
        if io not in ("float", "int8"):
            raise ConfigError(f"{target}: io={io!r} is not allowed; choose 'float' or 'int8'")
        if plan is not None:
            for name, spec in plan.weights.items():
                if not spec.dtype.startswith("float") and (not spec.symmetric or any(spec.zero_point)):
                    raise ConfigError(f"{target} requires symmetric int8 weights (zero point 0) for XNNPACK; "
                                      f"weight {name} is asymmetric: set ptq weight_scheme: symmetric")
            self.acts = {name: _usable(spec) for name, spec in plan.activations.items()}

    # -- helpers ---------------------------------------------------------------
    def name(self, base: str) -> str:
        """A tensor name not used yet: ``base``, else ``base#2``, ``base#3``..."""
        name, n = base, 1
        while self.b.has_name(name):
            n += 1
            name = f"{base}#{n}"
        return name

    def unsupported(self, node: Node, why: str) -> UnsupportedOpError:
        return UnsupportedOpError(node.op, node.name, self.target, why)

    def spec_of(self, name: str) -> QuantSpec:
        return self.acts[name]

    def tensor(self, name: str, shape, spec: QuantSpec | None) -> TensorRef:
        if spec is None:
            return self.b.add_tensor(name, shape, "float32")
        return self.b.add_tensor(name, shape, "int8", scale=spec.scale[0], zero_point=spec.zero_point[0])

    def act_spec(self, name: str) -> QuantSpec | None:
        return self.spec_of(name) if self.q else None

    def const(self, name: str, arr: np.ndarray) -> tuple[TensorRef, QuantSpec | None]:
        """A constant operand of an elementwise op (int8 per-tensor when quantizing)."""
        arr = np.asarray(arr, np.float32)
        if not self.q:
            return self.b.add_tensor(name, arr.shape, "float32", data=arr), None
        s, z = qparams(float(arr.min()), float(arr.max()), symmetric=False)
        spec = QuantSpec("int8", (float(s),), (int(z),))
        return self.b.add_tensor(name, arr.shape, "int8", data=spec.quantize(arr), scale=float(s),
                                 zero_point=int(z)), spec

    def to_perm(self, v: Value, perm: tuple[int, ...], label: str) -> Value:
        """``v`` stored with layout ``perm`` (TRANSPOSE, or a RESHAPE when the data order is unchanged)."""
        if v.perm == perm:
            return v
        inv = inverse_perm(v.perm)
        order = tuple(inv[p] for p in perm)            # stored_out[i] = stored_in[order[i]]
        shape = tuple(v.stored_shape[o] for o in order)
        out = self.tensor(self.name(f"{label}/layout"), shape, v.spec)
        if _same_order(v.stored_shape, order):
            self.b.add_op("RESHAPE", [v.ref, self.b.add_const(self.name(f"{label}/shape"), shape)], [out])
        else:
            self.b.add_op("TRANSPOSE", [v.ref, self.b.add_const(self.name(f"{label}/perm"), order)], [out])
        return Value(out, perm, v.spec)

    def torch_order(self, v: Value, label: str) -> Value:
        """``v`` stored in torch's dim order (:meth:`to_perm` to the identity layout)."""
        return self.to_perm(v, tuple(range(len(v.perm))), label)

    def requant(self, v: Value, spec: QuantSpec, label: str) -> Value:
        """``v`` with other int8 parameters (QUANTIZE int8 → int8)."""
        if not self.q or v.spec == spec or (v.spec.scale, v.spec.zero_point) == (spec.scale, spec.zero_point):
            return v
        out = self.tensor(self.name(f"{label}/requant"), v.stored_shape, spec)
        self.b.add_op("QUANTIZE", [v.ref], [out])
        return Value(out, v.perm, spec)

    def layer(self, node: Node, op: str, params: int = 0, nbytes: int = 0, node_macs: int = 0,
              weights: "Weights | None" = None) -> None:
        ins = [list(self.g.shape(i)) for i in node.inputs if not self.g.is_const(i)]
        row = {"name": node.name, "module": node.module, "op": f"{node.op}->{op}",
               "in_shape": ins[0] if ins else [], "out_shape": list(node.shape),
               "params": int(params), "bytes": int(nbytes), "macs": int(node_macs)}
        if self.q and node.op in FLOAT_IN_INT8:
            row["precision"] = "float32"
            row["why_float"] = FLOAT_IN_INT8[node.op]
        if weights is not None:
            row.update(weights.row(), weight=node.inputs[1])
        out = self.values.get(node.name)
        if out is not None:     # where the layer's output lives (a fused activation's tensor), for sdk.layer_errors
            row.update(tensor=out.ref.name, layout=list(out.perm))
        self.layers.append(row)

    # -- driver ---------------------------------------------------------------------
    def run(self) -> Lowered:
        g = self.g
        self._plan_fusions()
        model_inputs, in_sigs = [], []
        for name, shape, dtype in g.inputs:
            perm = NHWC if len(shape) == 4 else tuple(range(len(shape)))
            stored = tuple(shape[p] for p in perm)
            spec = self.act_spec(name)
            if self.q and self.io == "float":
                fin = self.b.add_tensor(name, stored, "float32")
                qref = self.tensor(self.name(f"{name}/quantized"), stored, spec)
                self.b.add_op("QUANTIZE", [fin], [qref])
                model_inputs.append(fin)
            else:
                qref = self.tensor(name, stored, spec)
                model_inputs.append(qref)
            self.values[name] = Value(qref, perm, spec)
            in_sigs.append(self._sig(name, shape, perm, spec))

        for node in g.nodes:
            if node.name in self.skip:
                continue
            getattr(self, f"_op_{node.op}")(node)       # check() refused every op without one

        model_outputs, out_sigs = [], []
        for name in g.outputs:
            v = self.values[name]
            shape = g.shape(name)
            if self.q and self.io == "float" and v.spec is not None:
                fout = self.b.add_tensor(self.name(f"{name}/float"), v.stored_shape, "float32")
                self.b.add_op("DEQUANTIZE", [v.ref], [fout])
                model_outputs.append(fout)
            else:
                model_outputs.append(v.ref)
            out_sigs.append(self._sig(name, shape, v.perm, v.spec))
        self.b.set_io(model_inputs, model_outputs)
        return Lowered(self.b.finish(), in_sigs, out_sigs, self.layers)

    def _sig(self, name, shape, perm, spec) -> dict:
        quant = spec.to_dict() if spec is not None else None
        return {"name": name, "shape": list(shape), "dtype": "float32", "layout": list(perm),
                "stored_dtype": "int8" if (self.q and self.io == "int8") else "float32", "quantization": quant}

    def _plan_fusions(self) -> None:
        """A clamp after conv, linear, add, sub or mul with a single user fuses into it: as LiteRT's
        fused activation when there is one, else (int8, bounds around 0) as the saturation of the
        clamp's output parameters, which the producer then writes."""
        g = self.g
        for node in g.nodes:
            bounds = _clamp_bounds(node)
            if bounds is None:
                continue
            act = _ACTIVATION_CODES.get(bounds)
            if act is None and not (self.q and bounds[0] <= 0.0 <= bounds[1]):
                continue
            prod = g.node(node.inputs[0])
            if prod is None or prod.op not in _FUSE_INTO or prod.name in g.outputs \
                    or len(g.users(prod.name)) != 1 or prod.name in self.fused:
                continue
            self.fused[prod.name] = node
            self.fused_act[node.name] = act or "NONE"
            self.skip.add(node.name)

    def _out(self, node: Node, stored_shape, perm, *, spec: QuantSpec | None = None) -> tuple[Value, str | None, str]:
        """Output tensor of ``node`` (or of the activation fused into it)."""
        act_node = self.fused.get(node.name)
        final = act_node.name if act_node is not None else node.name
        if spec is None and self.q:
            spec = self.spec_of(final)
        ref = self.tensor(final, stored_shape, spec)
        v = Value(ref, perm, spec)
        self.values[final] = v
        if act_node is not None:
            self.values[node.name] = v
        return v, (self.fused_act[act_node.name] if act_node is not None else None), final

    def _in(self, node: Node, i: int = 0) -> Value:
        return self.values[node.inputs[i]]

    # -- ops ------------------------------------------------------------------------
    def _op_conv(self, node: Node) -> None:
        g, a = self.g, node.attrs
        x = self._in(node)
        w = g.constants[node.inputs[1]]
        bias = g.constants[node.inputs[2]] if len(node.inputs) > 2 else np.zeros(w.shape[0], np.float32)
        if a["dims"] == 1:      # Conv1d as CONV_2D over a 1×L image
            w = w[:, :, None, :]
            stride, pad, dil = (1,) + a["stride"], (0,) + a["padding"], (1,) + a["dilation"]
            x = self.to_perm(x, (0, 2, 1), node.name)        # stored (N, L, C)
            n, length, c = x.stored_shape
            x4 = self.tensor(self.name(f"{node.name}/as2d"), (n, 1, length, c), x.spec)
            self.b.add_op("RESHAPE", [x.ref, self.b.add_const(self.name(f"{node.name}/s"), (n, 1, length, c))], [x4])
            x = Value(x4, NHWC, x.spec)
        else:
            stride, pad, dil = a["stride"], a["padding"], a["dilation"]
            x = self.to_perm(x, NHWC, node.name)
        n, h, wd, cin = x.stored_shape
        cout, kh, kw = w.shape[0], w.shape[2], w.shape[3]
        groups = a["groups"]
        x, padding = self._explicit_pad(node, x, (kh, kw), stride, pad, dil)
        oh = (x.stored_shape[1] - dil[0] * (kh - 1) - 1) // stride[0] + 1 if padding == "VALID" else -(-h // stride[0])
        ow = (x.stored_shape[2] - dil[1] * (kw - 1) - 1) // stride[1] + 1 if padding == "VALID" else -(-wd // stride[1])
        depthwise = groups == cin and groups > 1
        if depthwise:
            w_t = w.transpose(1, 2, 3, 0)                 # [1, kh, kw, cout]
            axis = 3
        else:
            w_t = w.transpose(0, 2, 3, 1)                 # OHWI (I = cin / groups)
            axis = 0
        out_perm = NHWC
        island = self._island(node)
        if island:
            x = self._float(x, node.name)
        out, act, final = self._out(node, (n, oh, ow, cout), out_perm)
        op = "DEPTHWISE_CONV_2D" if depthwise else "CONV_2D"
        wt = self._weights(node, op, w, w_t, bias, axis, x, out)
        dst = self._ftensor(f"{final}/float", out.stored_shape) if island else out.ref
        opts = dict(stride=tuple(stride), padding=padding, dilation=tuple(dil), activation=act)
        if depthwise:
            self.b.add_op(op, [x.ref, wt.weight, wt.bias], [dst], depth_multiplier=cout // cin, **opts)
        else:
            self.b.add_op(op, [x.ref, wt.weight, wt.bias], [dst], **opts)
        if island:
            self.b.add_op("QUANTIZE", [dst], [out.ref])
        if a["dims"] == 1:      # back to (N, C, L) stored as (N, L, C)
            out3 = self.tensor(self.name(f"{final}/as1d"), (n, ow, cout), out.spec)
            self.b.add_op("RESHAPE", [out.ref, self.b.add_const(self.name(f"{final}/s"), (n, ow, cout))], [out3])
            v = Value(out3, (0, 2, 1), out.spec)
            self.values[final] = v
            if final != node.name:
                self.values[node.name] = v
        self.layer(node, op, w.size + bias.size, wt.nbytes, macs(self.g, node), wt)

    def _island(self, node: Node) -> bool:
        """A conv / linear of an int8 graph whose plan keeps its weight float (mixed precision):
        it computes in float between DEQUANTIZE and QUANTIZE."""
        spec = self.plan.weights.get(node.inputs[1]) if self.q else None
        return spec is not None and spec.dtype.startswith("float")

    def _weights(self, node: Node, op: str, w: np.ndarray, w_t: np.ndarray, bias: np.ndarray, axis: int,
                 x: Value, out: Value) -> "Weights":
        """Weight and bias tensors of a conv / linear, in the encoding the plan and the input ask
        for (:data:`KERNELS` names the kernel each combination runs in)."""
        label = node.name
        spec = self.plan.weights.get(node.inputs[1]) if self.plan is not None else None
        if spec is None and self.q:
            raise self.unsupported(node, "the quantization plan has no spec for its weight")
        if spec is None or spec.dtype.startswith("float"):
            half = (self.half_weights and node.name not in self.keep_fp32) or (spec is not None
                                                                                and spec.dtype == "float16")
            dt = "float16" if half else "float32"
            wref, wbytes, sparse = self._const_weight(f"{label}/weight" + ("/fp16" if half else ""), w_t.astype(dt),
                                                      dt, op)
            if half:            # widened for CPU kernels (XNNPACK folds it at init; GPU delegates take fp16)
                wide = self.b.add_tensor(self.name(f"{label}/weight"), w_t.shape, "float32")
                self.b.add_op("DEQUANTIZE", [wref], [wide])
                wref = wide
            bref = self._half_const(f"{label}/bias", bias) if half else \
                self.b.add_tensor(self.name(f"{label}/bias"), bias.shape, "float32", data=bias)
            kernel = "xnnpack float" + (" (float16 weights widened at init)" if half else "")
            return Weights(wref, bref, wbytes + (2 if half else 4) * bias.size, dt, sparse, kernel)
        if spec.block_size:
            return self._blockwise_weights(node, op, w, bias, spec, x)
        scales = np.asarray(spec.scale, np.float64)
        if len(scales) == 1:
            scales = np.repeat(scales, w.shape[0])
        q = np.clip(np.round(w.reshape(w.shape[0], -1) / scales[:, None]), -127, 127).astype(np.int8).reshape(w.shape)
        if x.spec is not None:
            # An all-zero channel (pruned, or a zero BN gamma folded in) has any scale; the plan's 1.0 can
            # push XNNPACK's requantization scale s_in*s_w/s_out past its limit of 256.  s_out/s_in makes it 1.
            zero = ~q.reshape(q.shape[0], -1).any(axis=1)
            scales = np.where(zero, float(np.float32(out.spec.scale[0])) / float(np.float32(x.spec.scale[0])), scales)
        if w.ndim == 4:
            q_t = q.transpose((1, 2, 3, 0) if axis == 3 else (0, 2, 3, 1))
        else:
            q_t = q
        mode = weight_mode(op, "static" if x.spec is not None else self.compute)
        narrow = spec.code_bits <= 4
        dt = int_storage(op, mode, spec.code_bits, self.int4, w.shape[1] if w.ndim == 2 else 0)
        s32 = scales.astype(np.float32)
        if mode == "weight-only":
            wq, wbytes, sparse = self._const_weight(f"{label}/weight/{dt}", q_t, dt, op, scale=s32, axis=axis,
                                                    mode=mode)
            wref = self.b.add_tensor(self.name(f"{label}/weight"), q_t.shape, "float32")
            self.b.add_op("DEQUANTIZE", [wq], [wref])
        else:
            wref, wbytes, sparse = self._const_weight(f"{label}/weight", q_t, dt, op, scale=s32, axis=axis,
                                                      mode=mode)
        if mode == "static":
            s_in = np.float64(np.float32(x.spec.scale[0]))
            bscale = s_in * s32.astype(np.float64)
            qb = np.clip(np.round(bias.astype(np.float64) / bscale), -(2 ** 31), 2 ** 31 - 1).astype(np.int32)
            bref = self.b.add_tensor(self.name(f"{label}/bias"), qb.shape, "int32", data=qb,
                                     scale=bscale.astype(np.float32), zero_point=0, axis=0)
        else:
            bref = self.b.add_tensor(self.name(f"{label}/bias"), bias.shape, "float32", data=bias)
        kernel = _kernel(op, mode, dt, w.shape[1] if w.ndim == 2 else 0)
        if narrow and dt == "int8":
            kernel += f"; its {spec.code_bits}-bit codes ship in int8 (int4='always' stores INT4, smaller and slower)"
        return Weights(wref, bref, wbytes + 4 * bias.size, dt, sparse, kernel)

    def _blockwise_weights(self, node: Node, op: str, w: np.ndarray, bias: np.ndarray, spec: QuantSpec,
                           x: Value) -> "Weights":
        """INT4 weights with one float16 scale per block of a row (``BlockwiseQuantization``), for
        XNNPACK's dynamic-range qb4w kernel: the only blockwise path LiteRT runs delegated
        (:func:`blockwise_refusal` says which plans may ask for it)."""
        why = blockwise_refusal(op, "static" if x.spec is not None else self.compute, spec, w.shape[-1])
        if why:
            raise self.unsupported(node, why)
        n, k = w.shape
        bs = spec.block_size
        s16 = np.asarray(spec.scale, np.float32).reshape(n, k // bs).astype(np.float16)
        s16 = np.where(s16 > 0, s16, np.float16(2.0 ** -14))            # an all-zero block: any scale
        step = np.repeat(s16.astype(np.float64), bs, axis=1)
        q = np.clip(np.round(w.astype(np.float64) / step), -7, 7).astype(np.int8)
        sref = self.b.add_tensor(self.name(f"{node.name}/weight/scales"), s16.shape, "float16", data=s16)
        wref = self.b.add_tensor(self.name(f"{node.name}/weight"), q.shape, "int4", data=q, blockwise=(sref, bs))
        bref = self.b.add_tensor(self.name(f"{node.name}/bias"), bias.shape, "float32", data=bias)
        return Weights(wref, bref, q.size // 2 + 2 * s16.size + 4 * bias.size, f"int4 blockwise {bs}", False,
                       BLOCKWISE_KERNEL)

    def _const_weight(self, label: str, arr: np.ndarray, dtype: str, op: str, *, scale=None,
                      axis: int = 0, mode: str = "float") -> tuple[TensorRef, int, bool]:
        """A weight constant: dense, or (``sparsity="auto"``) stored sparse behind DENSIFY when
        that is smaller and the runtime has a path for it.  Returns (tensor, stored bytes, sparse)."""
        item = 0.5 if dtype == "int4" else np.dtype(dtype).itemsize
        dense_bytes = int(math.ceil(arr.size * item))
        quant = {} if scale is None else {"scale": scale, "zero_point": 0, "axis": axis}
        if self.sparsity == "auto" and _sparse_path(op, dtype, mode) and _worth_sparse(arr, item):
            values, sp = sparse_encode(arr)
            nbytes = sparse_bytes(values, sp, item)
            if nbytes + SPARSE_OVERHEAD < dense_bytes:
                # the quantization lives on the DENSIFY output only: XNNPACK reads it there, and a second
                # copy (a float scale and an int64 zero point per channel) would cost 12 bytes a channel
                stored = self.b.add_tensor(self.name(f"{label}/sparse"), arr.shape, dtype, data=values,
                                           sparsity=sp)
                ref = self.b.add_tensor(self.name(label), arr.shape, dtype, **quant)
                self.b.add_op("DENSIFY", [stored], [ref])
                return ref, nbytes, True
        return self.b.add_tensor(self.name(label), arr.shape, dtype, data=arr, **quant), dense_bytes, False

    def _half_const(self, label: str, arr: np.ndarray) -> TensorRef:
        """A float16 constant and the DEQUANTIZE that widens it for CPU kernels."""
        h = self.b.add_tensor(self.name(f"{label}/fp16"), arr.shape, "float16", data=arr.astype(np.float16))
        f = self.b.add_tensor(self.name(label), arr.shape, "float32")
        self.b.add_op("DEQUANTIZE", [h], [f])
        return f

    def _explicit_pad(self, node, x: Value, kernel, stride, pad, dil):
        """Torch pads symmetrically; TFLite SAME pads (total//2, rest).  Use SAME when they agree,
        else an explicit PAD (zero in the real domain) and VALID."""
        if not any(pad):
            return x, "VALID"
        n, h, w, c = x.stored_shape
        same = True
        for size, k, s, p, d in zip((h, w), kernel, stride, pad, dil):
            out, before, after = same_padding(size, k, s, d)
            torch_out = (size + 2 * p - d * (k - 1) - 1) // s + 1
            same &= before == after == p and torch_out == out
        if same and not (self.sparse_float and any(st > 1 for st in stride)):
            return x, "SAME"
        return self._pad_explicit(node, x, pad)

    def _op_linear(self, node: Node) -> None:
        x = self._in(node)
        x = self.torch_order(x, node.name)
        w = self.g.constants[node.inputs[1]]
        bias = self.g.constants[node.inputs[2]] if len(node.inputs) > 2 else np.zeros(w.shape[0], np.float32)
        shape = tuple(node.shape)
        island = self._island(node)
        if island:
            x = self._float(x, node.name)
        out, act, final = self._out(node, shape, tuple(range(len(shape))))
        wt = self._weights(node, "FULLY_CONNECTED", w, w, bias, 0, x, out)
        dst = self._ftensor(f"{final}/float", out.stored_shape) if island else out.ref
        self.b.add_op("FULLY_CONNECTED", [x.ref, wt.weight, wt.bias], [dst], activation=act,
                      keep_num_dims=len(shape) > 2)
        if island:
            self.b.add_op("QUANTIZE", [dst], [out.ref])
        self.layer(node, "FULLY_CONNECTED", w.size + bias.size, wt.nbytes, macs(self.g, node), wt)

    def _binary(self, node: Node, op: str) -> None:
        if len(node.inputs) > 1 and self.g.is_const(node.inputs[0]):     # constant · x (check(): add, mul)
            node = dataclasses.replace(node, inputs=[node.inputs[1], node.inputs[0]])
        a = self._in(node)
        if len(node.inputs) > 1 and not self.g.is_const(node.inputs[1]):
            b = self._in(node, 1)
            if len(b.perm) == len(a.perm) and b.perm != a.perm:
                b = self.to_perm(b, a.perm, node.name)
            elif len(b.perm) != len(a.perm):
                a = self.torch_order(a, node.name)
                b = self.torch_order(b, node.name)
            bref = b.ref
        else:
            arr = self.g.constants[node.inputs[1]] if len(node.inputs) > 1 else np.float32(node.attrs["scalar"])
            arr = np.asarray(arr, np.float32)
            if 0 < arr.ndim < len(a.perm):       # broadcasting prepends size-1 dims
                arr = arr.reshape((1,) * (len(a.perm) - arr.ndim) + arr.shape)
            if arr.ndim == len(a.perm):
                arr = arr.transpose(a.perm)
            elif arr.ndim > 0:
                a = self.torch_order(a, node.name)
            if arr.ndim == 0:
                arr = arr.reshape(1)
            bref, _ = self.const(self.name(f"{node.name}/operand"), arr)
        stored = tuple(node.shape[p] for p in a.perm)
        out, act, _ = self._out(node, stored, a.perm)
        aref = a.ref
        if self.q and op in ("ADD", "SUB"):
            aref = self._add_operand(a, out.spec, node.name)
            if len(node.inputs) > 1 and not self.g.is_const(node.inputs[1]):
                bref = self._add_operand(b, out.spec, node.name)
        self.b.add_op(op, [aref, bref], [out.ref], activation=act)
        self.layer(node, op)

    def _add_operand(self, v: Value, out_spec: QuantSpec, label: str) -> TensorRef:
        """An int8 ADD/SUB input whose scale is below XNNPACK's limit of 1/1024 of the output's (a
        residual branch scaled by ConvNeXt's initial layer scale of 1e-6): requantized to 1/1000 of
        the output scale, in steps of at most 255x (QUANTIZE's own limit is 256x), so the ADD stays
        in the delegate.  Its values stay below a tenth of an output step either way."""
        s_out = float(np.float32(out_spec.scale[0]))
        if float(np.float32(v.spec.scale[0])) / s_out >= MIN_ADD_INPUT_RATIO:
            return v.ref
        while float(np.float32(v.spec.scale[0])) / s_out < MIN_ADD_INPUT_RATIO:
            scale = min(float(v.spec.scale[0]) * 255.0, s_out / 1000.0)
            v = self.requant(v, QuantSpec("int8", (scale,), (v.spec.zero_point[0],)), label)
        return v.ref

    def _op_add(self, node):
        self._binary(node, "ADD")

    def _op_sub(self, node):
        self._binary(node, "SUB")

    def _op_mul(self, node):
        self._binary(node, "MUL")

    def _unary(self, node: Node, op: str, *, spec: QuantSpec | None = None, **opts) -> None:
        x = self._in(node)
        out, _, _ = self._out(node, x.stored_shape, x.perm, spec=spec)
        self.b.add_op(op, [x.ref], [out.ref], **opts)
        self.layer(node, op)

    def _fixed(self, node: Node) -> QuantSpec | None:
        if not self.q:
            return None
        s, z = FIXED_OUTPUT[node.op]
        return QuantSpec("int8", (s,), (z,))

    def _op_relu(self, node):
        self._clamp(node)

    def _op_hardtanh(self, node):
        self._clamp(node)

    def _clamp(self, node: Node) -> None:
        """A clamp that did not fuse into its producer (see :meth:`_plan_fusions`)."""
        lo, hi = _clamp_bounds(node)
        x = self._in(node)
        if (lo, hi) == (-math.inf, math.inf):
            self.values[node.name] = x
            return
        code = _ACTIVATION_CODES.get((lo, hi))
        if not self.q and code is not None:
            return self._unary(node, code)
        if self.q and lo <= 0.0 <= hi:
            # int8 RELU/RELU6 run in builtin kernels only; the requantization into the clamp's output
            # parameters (calibrated on the clamped values) saturates at the bounds and stays in XNNPACK
            spec = self.spec_of(node.name)
            if (spec.scale, spec.zero_point) == (x.spec.scale, x.spec.zero_point):
                self.values[node.name] = x
                return
            self.values[node.name] = self.requant(x, spec, node.name)
            self.layer(node, "QUANTIZE")
            return
        # MAXIMUM / MINIMUM with constant bounds (int8: on the input's codes, so both keep its parameters)
        v = x
        for op, bound in (("MAXIMUM", lo), ("MINIMUM", hi)):
            if not math.isfinite(bound):
                continue
            c = np.array([bound], np.float32)
            cref = self.b.add_tensor(self.name(f"{node.name}/{op.lower()}"), (1,), "float32", data=c) if not self.q \
                else self.b.add_tensor(self.name(f"{node.name}/{op.lower()}"), (1,), "int8", data=x.spec.quantize(c),
                                       scale=x.spec.scale[0], zero_point=x.spec.zero_point[0])
            last = op == "MINIMUM" or not math.isfinite(hi)
            if last:
                out, _, _ = self._out(node, x.stored_shape, x.perm, spec=x.spec)
                ref = out.ref
            else:
                ref = self.tensor(self.name(f"{node.name}/{op.lower()}d"), x.stored_shape, x.spec)
            self.b.add_op(op, [v.ref, cref], [ref])
            v = Value(ref, x.perm, x.spec)
        self.layer(node, "MAXIMUM+MINIMUM")

    def _op_leaky_relu(self, node):
        self._unary(node, "LEAKY_RELU", alpha=node.attrs["slope"])

    def _op_sigmoid(self, node):
        if not self._float_output(node, "LOGISTIC"):
            self._unary(node, "LOGISTIC", spec=self._fixed(node))

    def _op_tanh(self, node):
        if not self._float_output(node, "TANH"):
            self._unary(node, "TANH", spec=self._fixed(node))

    def _float_output(self, node: Node, op: str, x: Value | None = None) -> bool:
        """A LOGISTIC / TANH that is a model output of an int8 graph with float outputs: computed in
        float from the DEQUANTIZEd input, so the output keeps float precision instead of the fixed
        1/256 (1/128) int8 step, for the price of the DEQUANTIZE the output needed anyway."""
        if not (self.q and self.io == "float" and node.name in self.g.outputs):
            return False
        x = self._float(x or self._in(node), node.name)
        out = self.tensor(node.name, x.stored_shape, None)
        self.values[node.name] = Value(out, x.perm, None)
        self.b.add_op(op, [x.ref], [out])
        self.layer(node, op)
        self.layers[-1].update(precision="float32", why_float=FLOAT_OUTPUT)
        return True

    def _op_hardswish(self, node):
        """Float: HARD_SWISH.  int8: x · hardsigmoid(x) with the gate in fixed [0, 1] parameters,
        three ops XNNPACK runs in int8 (its delegate declines int8 HARD_SWISH; see the module notes)."""
        if not self.q:
            return self._unary(node, "HARD_SWISH")
        x = self._in(node)
        gate = self.tensor(self.name(f"{node.name}/gate"), x.stored_shape, self._fixed_spec(1.0 / 255, -128))
        self._hard_gate(node, x, gate)
        out, _, _ = self._out(node, x.stored_shape, x.perm)
        self.b.add_op("MUL", [x.ref, gate], [out.ref])
        self.layer(node, "ADD+MUL+MUL")

    def _op_prelu(self, node):
        x = self._in(node)
        slope = np.asarray(self.g.constants[node.inputs[1]], np.float32).reshape(-1)
        channels = node.shape[1] if len(node.shape) > 1 else 1
        slope = np.broadcast_to(slope, (channels,)).copy()
        rank = len(x.perm)
        shape = [1] * (rank - 1)
        pos = x.perm.index(1) - 1 if rank > 1 else 0     # alpha broadcasts over all but the batch dim
        shape[pos] = channels
        alpha = self._fconst(f"{node.name}/alpha", slope.reshape(shape))
        x = self._float(x, node.name)
        self._float_result(node, x.stored_shape, x.perm, lambda out: self.b.add_op("PRELU", [x.ref, alpha], [out]))
        self.layer(node, "PRELU", slope.size, 4 * slope.size)

    def _op_silu(self, node):
        """x · sigmoid(x): LOGISTIC (fixed output parameters) then MUL."""
        x = self._in(node)
        sig = self.tensor(self.name(f"{node.name}/sigmoid"), x.stored_shape, self._fixed_spec(1 / 256, -128))
        self.b.add_op("LOGISTIC", [x.ref], [sig])
        out, _, _ = self._out(node, x.stored_shape, x.perm)
        self.b.add_op("MUL", [x.ref, sig], [out.ref])
        self.layer(node, "LOGISTIC+MUL")

    def _op_hardsigmoid(self, node):
        x = self._in(node)
        out, _, _ = self._out(node, x.stored_shape, x.perm)
        self._hard_gate(node, x, out.ref)
        self.layer(node, "ADD+MUL")

    def _hard_gate(self, node: Node, x: Value, out: TensorRef) -> None:
        """hardsigmoid(x) = relu6(x + 3) / 6 into ``out``: ADD with fused RELU6 (int8: into fixed
        [0, 6] parameters), then MUL by 1/6."""
        three, _ = self.const(self.name(f"{node.name}/three"), np.array([3.0], np.float32))
        mid = self.tensor(self.name(f"{node.name}/relu6"), x.stored_shape, self._fixed_spec(6.0 / 255, -128))
        self.b.add_op("ADD", [x.ref, three], [mid], activation="RELU6")
        sixth, _ = self.const(self.name(f"{node.name}/sixth"), np.array([1.0 / 6], np.float32))
        self.b.add_op("MUL", [mid, sixth], [out])

    def _fixed_spec(self, scale, zp) -> QuantSpec | None:
        return QuantSpec("int8", (scale,), (zp,)) if self.q else None

    def _pool(self, node: Node, op: str) -> None:
        a = node.attrs
        x = self.to_perm(self._in(node), NHWC, node.name)
        if op == "AVERAGE_POOL_2D" and self.q and (a["count_include_pad"] or not any(a["padding"])):
            return self._average_as_depthwise(node, x)
        hw = x.stored_shape[1:3]
        pads = _pool_pads(hw, a, node.shape[2:])
        padding = "VALID"
        if any(p for pair in pads for p in pair):
            if _tflite_same(hw, a, node.shape[2:]) and (op == "MAX_POOL_2D" or not a["count_include_pad"]):
                padding = "SAME"    # TFLite's SAME pools leave the padding out, as torch's max and c_i_p=False do
            elif op == "MAX_POOL_2D":
                x = self._replicate_edges(node, x, pads)
            else:                   # count_include_pad=True: zeros that count
                x, _ = self._pad_explicit(node, x, a["padding"])
        stored = tuple(node.shape[p] for p in NHWC)
        spec = x.spec if self.q else None        # the runtime needs equal input/output parameters
        out, _, _ = self._out(node, stored, NHWC, spec=spec)
        self.b.add_op(op, [x.ref], [out.ref], filter=tuple(a["kernel"]), stride=tuple(a["stride"]), padding=padding)
        self.layer(node, op)

    def _average_as_depthwise(self, node: Node, x: Value) -> None:
        """int8 average pooling as a depthwise conv with weights 1/(kh·kw): XNNPACK declines int8
        AVERAGE_POOL_2D, and zero padding that counts in the divisor is a conv's zero padding."""
        a = node.attrs
        kh, kw = a["kernel"]
        c = x.stored_shape[3]
        x, padding = self._explicit_pad(node, x, (kh, kw), a["stride"], a["padding"], (1, 1))
        out, _, _ = self._out(node, tuple(node.shape[p] for p in NHWC), NHWC)
        w_scale = np.full(c, np.float32(1.0 / (kh * kw) / 127), np.float32)    # every tap is code 127
        wref = self.b.add_tensor(self.name(f"{node.name}/weight"), (1, kh, kw, c), "int8",
                                 data=np.full((1, kh, kw, c), 127, np.int8), scale=w_scale, zero_point=0, axis=3)
        bref = self.b.add_tensor(self.name(f"{node.name}/bias"), (c,), "int32", data=np.zeros(c, np.int32),
                                 scale=np.float32(x.spec.scale[0]) * w_scale, zero_point=0, axis=0)
        self.b.add_op("DEPTHWISE_CONV_2D", [x.ref, wref, bref], [out.ref], stride=tuple(a["stride"]),
                      padding=padding, depth_multiplier=1)
        self.layer(node, "DEPTHWISE_CONV_2D", nbytes=kh * kw * c + 4 * c)

    def _replicate_edges(self, node: Node, x: Value, pads) -> Value:
        """NHWC ``x`` padded by copies of its first/last rows and columns (``pads``: (before, after)
        for H, then W) with SLICE + CONCATENATION: the max-pool padding of the module notes."""
        for axis, (before, after) in zip((1, 2), pads):
            if not before and not after:
                continue
            size = x.stored_shape[axis]
            first = [self._slice(f"{node.name}/edge", x, axis, 0, 1)] * before if before else []
            last = [self._slice(f"{node.name}/edge", x, axis, size - 1, 1)] * after if after else []
            shape = list(x.stored_shape)
            shape[axis] += before + after
            out = self.tensor(self.name(f"{node.name}/replicated"), shape, x.spec)
            self.b.add_op("CONCATENATION", first + [x.ref] + last, [out], axis=axis)
            x = Value(out, x.perm, x.spec)
        return x

    def _slice(self, label: str, x: Value, axis: int, start: int, length: int,
               out: TensorRef | None = None) -> TensorRef:
        """Stored ``x[..., start:start + length, ...]`` along stored ``axis`` (SLICE)."""
        begin, size = [0] * len(x.stored_shape), list(x.stored_shape)
        begin[axis], size[axis] = start, length
        if out is None:
            if size == list(x.stored_shape):
                return x.ref
            out = self.tensor(self.name(f"{label}/slice"), size, x.spec)
        self.b.add_op("SLICE", [x.ref, self.b.add_const(self.name(f"{label}/begin"), begin),
                                self.b.add_const(self.name(f"{label}/size"), size)], [out])
        return out

    def _pad_explicit(self, node, x: Value, pad):
        """Zero (in the real domain: the zero point) padding of H and W as a PAD op; then VALID."""
        n, h, w, c = x.stored_shape
        out = self.tensor(self.name(f"{node.name}/pad"), (n, h + 2 * pad[0], w + 2 * pad[1], c), x.spec)
        paddings = self.b.add_const(self.name(f"{node.name}/paddings"), [[0, 0], [pad[0], pad[0]], [pad[1], pad[1]], [0, 0]])
        self.b.add_op("PAD", [x.ref, paddings], [out])
        return Value(out, x.perm, x.spec), "VALID"

    def _op_max_pool2d(self, node):
        self._pool(node, "MAX_POOL_2D")

    def _op_avg_pool2d(self, node):
        self._pool(node, "AVERAGE_POOL_2D")

    def _op_mean(self, node):
        x = self._in(node)
        dims = node.attrs["dims"]
        axes = sorted(x.perm.index(d) for d in dims)
        keep = node.attrs["keepdim"]
        if keep:
            perm, stored = x.perm, tuple(1 if i in axes else s for i, s in enumerate(x.stored_shape))
        else:
            kept = [p for i, p in enumerate(x.perm) if i not in axes]
            rank_map = {d: r for r, d in enumerate(sorted(kept))}     # torch dims renumbered after reduction
            perm = tuple(rank_map[p] for p in kept)
            stored = tuple(s for i, s in enumerate(x.stored_shape) if i not in axes)
        out, _, _ = self._out(node, stored, perm)
        self.b.add_op("MEAN", [x.ref, self.b.add_const(self.name(f"{node.name}/axes"), axes)], [out.ref],
                      keep_dims=keep)
        self.layer(node, "MEAN")

    def _op_reshape(self, node):
        x = self._in(node)
        if not _same_order(x.stored_shape, inverse_perm(x.perm)):     # else RESHAPE reads the data as it is
            x = self.torch_order(x, node.name)
        shape = tuple(node.shape)
        out, _, _ = self._out(node, shape, tuple(range(len(shape))), spec=x.spec if self.q else None)
        self.b.add_op("RESHAPE", [x.ref, self.b.add_const(self.name(f"{node.name}/shape"), shape)], [out.ref])
        self.layer(node, "RESHAPE")

    def _op_permute(self, node):
        """No op: the data stays where it is and only its layout changes (output torch dim j is input
        dim q[j]).  A consumer that needs another order transposes (:meth:`to_perm`), so
        permute → layer norm → permute back (ConvNeXt) moves nothing."""
        x = self._in(node)
        q = tuple(node.attrs["perm"])
        self.values[node.name] = Value(x.ref, tuple(q.index(p) for p in x.perm), x.spec)

    def _op_cat(self, node):
        out_spec = self.spec_of(node.name) if self.q else None
        perm = next(self._in(node, i).perm for i, n in enumerate(node.inputs) if not self.g.is_const(n))
        ins = [self._const_value(node, n, perm, out_spec) if self.g.is_const(n) else self._in(node, i)
               for i, n in enumerate(node.inputs)]       # a constant: ViT's class token
        ins = [self.to_perm(v, perm, node.name) for v in ins]
        ins = [self.requant(v, out_spec, node.name) for v in ins] if self.q else ins
        stored = tuple(node.shape[p] for p in perm)
        axis = perm.index(node.attrs["dim"])
        # XNNPACK concatenates 2 to 5 inputs (DenseNet's blocks join up to 32): groups of 5 first
        parts = [v.ref for v in ins]
        while len(parts) > _MAX_CONCAT:
            groups = [parts[i:i + _MAX_CONCAT] for i in range(0, len(parts), _MAX_CONCAT)]
            parts = [g[0] if len(g) == 1 else self._concat(node, g, axis, out_spec) for g in groups]
        out, _, _ = self._out(node, stored, perm, spec=out_spec)
        self.b.add_op("CONCATENATION", parts, [out.ref], axis=axis)
        self.layer(node, "CONCATENATION")

    def _const_value(self, node: Node, name: str, perm, spec: QuantSpec | None) -> Value:
        """Constant ``name`` stored with layout ``perm`` (int8 in ``spec``'s parameters)."""
        arr = np.asarray(self.g.constants[name], np.float32).transpose(perm)
        label = self.name(f"{node.name}/{name}")
        if spec is None:
            return Value(self.b.add_tensor(label, arr.shape, "float32", data=arr), perm, None)
        ref = self.b.add_tensor(label, arr.shape, "int8", data=spec.quantize(arr), scale=spec.scale[0],
                                zero_point=spec.zero_point[0])
        return Value(ref, perm, spec)

    def _concat(self, node: Node, parts: list[TensorRef], axis: int, spec) -> TensorRef:
        shape = list(parts[0].shape)
        shape[axis] = sum(p.shape[axis] for p in parts)
        out = self.tensor(self.name(f"{node.name}/part"), shape, spec)
        self.b.add_op("CONCATENATION", parts, [out], axis=axis)
        return out

    def _op_softmax(self, node):
        """SOFTMAX in float (int8 graphs: see FLOAT_IN_INT8).  A model output stays float when the
        model's outputs are float: no int8 step of 1/256 on the probabilities."""
        x = self._in(node)
        if x.perm.index(node.attrs["dim"]) != len(x.perm) - 1:
            x = self.torch_order(x, node.name)     # check(): dim is torch's last
        if self._float_output(node, "SOFTMAX", x):
            return
        x = self._float(x, node.name)
        self._float_result(node, x.stored_shape, x.perm,
                           lambda out: self.b.add_op("SOFTMAX", [x.ref], [out], beta=1.0))
        self.layer(node, "SOFTMAX")

    def _op_pad(self, node):
        x = self._in(node)
        pad = node.attrs["pad"]
        rank = len(x.perm)
        torch_pad = [[0, 0] for _ in range(rank)]
        for i in range(len(pad) // 2):      # torch lists the last dim first
            torch_pad[rank - 1 - i] = [pad[2 * i], pad[2 * i + 1]]
        stored_pad = [torch_pad[p] for p in x.perm]
        stored = tuple(node.shape[p] for p in x.perm)
        out, _, _ = self._out(node, stored, x.perm, spec=x.spec if self.q else None)
        self.b.add_op("PAD", [x.ref, self.b.add_const(self.name(f"{node.name}/paddings"), stored_pad)], [out.ref])
        self.layer(node, "PAD")

    def _op_slice(self, node):
        x, a = self._in(node), node.attrs
        axis = x.perm.index(a["dim"])
        stored = tuple(node.shape[p] for p in x.perm)
        out, _, _ = self._out(node, stored, x.perm, spec=x.spec if self.q else None)
        self._slice(node.name, x, axis, a["start"], a["end"] - a["start"], out=out.ref)
        self.layer(node, "SLICE")

    def _op_upsample_nearest(self, node):
        x = self.to_perm(self._in(node), NHWC, node.name)
        size = tuple(node.attrs["size"])
        n, h, w, c = x.stored_shape
        out, _, _ = self._out(node, (n, size[0], size[1], c), NHWC, spec=x.spec if self.q else None)
        if self.q:
            return self._repeat_upsample(node, x, size[0] // h, size[1] // w, out)
        self.b.add_op("RESIZE_NEAREST_NEIGHBOR", [x.ref, self.b.add_const(self.name(f"{node.name}/size"), size)],
                      [out.ref])
        self.layer(node, "RESIZE_NEAREST_NEIGHBOR")

    def _repeat_upsample(self, node: Node, x: Value, fh: int, fw: int, out: Value) -> None:
        """int8 nearest upsampling by integer factors as copies: XNNPACK declines int8
        RESIZE_NEAREST_NEIGHBOR.  Each element is repeated ``fw`` times along W (RESHAPE to
        [n, h, w, 1, c], CONCATENATION of ``fw`` copies on axis 3), then each row ``fh`` times along
        H (RESHAPE to [n, h, 1, w·fw·c], CONCATENATION on axis 2), then RESHAPE to NHWC: data
        movement only, exact."""
        n, h, w, c = x.stored_shape
        v = x.ref
        for axis, f, shape, joined in ((3, fw, (n, h, w, 1, c), (n, h, w, fw, c)),
                                       (2, fh, (n, h, 1, w * fw * c), (n, h, fh, w * fw * c))):
            if f == 1:
                continue
            split = self.tensor(self.name(f"{node.name}/rows" if axis == 2 else f"{node.name}/cols"), shape, x.spec)
            self.b.add_op("RESHAPE", [v, self.b.add_const(self.name(f"{node.name}/s"), shape)], [split])
            rep = self.tensor(self.name(f"{node.name}/repeated"), joined, x.spec)
            parts = [split] * f
            while len(parts) > _MAX_CONCAT:        # XNNPACK joins at most 5 at once
                parts = [self._concat(node, parts[i:i + _MAX_CONCAT], axis, x.spec) if len(parts[i:i + _MAX_CONCAT]) > 1
                         else parts[i] for i in range(0, len(parts), _MAX_CONCAT)]
            self.b.add_op("CONCATENATION", parts, [rep], axis=axis)
            v = rep
        self.b.add_op("RESHAPE", [v, self.b.add_const(self.name(f"{node.name}/s"), out.stored_shape)], [out.ref])
        self.layer(node, "RESHAPE+CONCATENATION")

    # -- float ops (an int8 graph runs them between DEQUANTIZE and QUANTIZE; see FLOAT_IN_INT8) -----
    def _float(self, v: Value, label: str) -> Value:
        """``v`` as float32 (a DEQUANTIZE when it is int8)."""
        if v.spec is None:
            return v
        f = self.b.add_tensor(self.name(f"{label}/float"), v.stored_shape, "float32")
        self.b.add_op("DEQUANTIZE", [v.ref], [f])
        return Value(f, v.perm, None)

    def _float_result(self, node: Node, stored, perm, emit) -> None:
        """Output of ``node`` computed by ``emit(float32 tensor)``; quantized into the node's
        parameters afterwards in an int8 graph."""
        if not self.q:
            out, _, _ = self._out(node, stored, perm)
            emit(out.ref)
            return
        tmp = self.b.add_tensor(self.name(f"{node.name}/float"), stored, "float32")
        emit(tmp)
        out, _, _ = self._out(node, stored, perm)
        self.b.add_op("QUANTIZE", [tmp], [out.ref])

    def _fconst(self, label: str, arr) -> TensorRef:
        arr = np.asarray(arr, np.float32)
        return self.b.add_tensor(self.name(label), arr.shape, "float32", data=arr)

    def _ftensor(self, label: str, shape) -> TensorRef:
        return self.b.add_tensor(self.name(label), tuple(shape), "float32")

    def _op_layer_norm(self, node):
        """(x - mean) · rsqrt(mean((x - mean)²) + eps) · weight + bias over the last dims: MEAN, SUB,
        MUL, MEAN, ADD, RSQRT, MUL, MUL, ADD (LiteRT has no layer-norm op)."""
        x = self._in(node)
        rank, k = len(x.perm), node.attrs["dims"]
        dims = tuple(range(rank - k, rank))
        if x.perm[rank - k:] != dims:        # the normalised dims must be the trailing stored ones
            x = self.torch_order(x, node.name)
        x = self._float(x, node.name)
        stored = x.stored_shape
        axes = self.b.add_const(self.name(f"{node.name}/axes"), list(dims))
        reduced = tuple(1 if i in dims else d for i, d in enumerate(stored))
        weight = np.asarray(self.g.constants[node.inputs[1]], np.float32)
        bias = np.asarray(self.g.constants[node.inputs[2]], np.float32)

        def emit(out):
            b, t = self.b, lambda label, shape: self._ftensor(f"{node.name}/{label}", shape)
            mean, centred, sq, var = t("mean", reduced), t("centred", stored), t("square", stored), t("var", reduced)
            b.add_op("MEAN", [x.ref, axes], [mean], keep_dims=True)
            b.add_op("SUB", [x.ref, mean], [centred])
            b.add_op("MUL", [centred, centred], [sq])
            b.add_op("MEAN", [sq, axes], [var], keep_dims=True)
            shifted, inv, normed, scaled = t("var_eps", reduced), t("rsqrt", reduced), t("normed", stored), \
                t("scaled", stored)
            b.add_op("ADD", [var, self._fconst(f"{node.name}/eps", [node.attrs["eps"]])], [shifted])
            b.add_op("RSQRT", [shifted], [inv])
            b.add_op("MUL", [centred, inv], [normed])
            b.add_op("MUL", [normed, self._fconst(f"{node.name}/weight", weight)], [scaled])
            b.add_op("ADD", [scaled, self._fconst(f"{node.name}/bias", bias)], [out])

        self._float_result(node, stored, x.perm, emit)
        self.layer(node, "MEAN+SUB+MUL+MEAN+ADD+RSQRT+MUL+MUL+ADD", weight.size + bias.size,
                   4 * (weight.size + bias.size))

    def _op_gelu(self, node):
        x = self._float(self._in(node), node.name)
        approximate = node.attrs["approximate"] == "tanh"
        self._float_result(node, x.stored_shape, x.perm,
                           lambda out: self.b.add_op("GELU", [x.ref], [out], approximate=approximate))
        self.layer(node, "GELU")

    def _op_attention(self, node):
        """softmax(q·kᵀ·scale + mask)·v: BATCH_MATMUL (adj_y), MUL, [ADD], SOFTMAX, BATCH_MATMUL."""
        q, k, v = (self._float(self.torch_order(self._in(node, i), node.name), node.name) for i in range(3))
        scores_shape = q.stored_shape[:-1] + (k.stored_shape[-2],)
        mask = self.g.constants[node.inputs[3]] if len(node.inputs) > 3 else None

        def emit(out):
            b, t = self.b, lambda label: self._ftensor(f"{node.name}/{label}", scores_shape)
            raw, scaled = t("scores"), t("scaled")
            b.add_op("BATCH_MATMUL", [q.ref, k.ref], [raw], adj_y=True)
            b.add_op("MUL", [raw, self._fconst(f"{node.name}/scale", [node.attrs["scale"]])], [scaled])
            if mask is not None:
                masked = t("masked")
                b.add_op("ADD", [scaled, self._fconst(f"{node.name}/mask",
                                                      np.maximum(mask, np.finfo(np.float32).min))], [masked])
                scaled = masked
            probs = t("probs")
            b.add_op("SOFTMAX", [scaled], [probs], beta=1.0)
            b.add_op("BATCH_MATMUL", [probs, v.ref], [out])

        shape = tuple(node.shape)
        self._float_result(node, shape, tuple(range(len(shape))), emit)
        self.layer(node, "BATCH_MATMUL+MUL+SOFTMAX+BATCH_MATMUL", node_macs=macs(self.g, node))

    def _op_matmul(self, node):
        a, c = (self._float(self.torch_order(self._in(node, i), node.name), node.name) for i in range(2))
        shape = tuple(node.shape)
        self._float_result(node, shape, tuple(range(len(shape))),
                           lambda out: self.b.add_op("BATCH_MATMUL", [a.ref, c.ref], [out]))
        self.layer(node, "BATCH_MATMUL", node_macs=macs(self.g, node))

    def _op_upsample_bilinear(self, node):
        x = self._float(self.to_perm(self._in(node), NHWC, node.name), node.name)
        size = tuple(node.attrs["size"])
        n, h, w, c = x.stored_shape
        align = node.attrs["align_corners"]
        sref = self.b.add_const(self.name(f"{node.name}/size"), size)
        self._float_result(node, (n, size[0], size[1], c), NHWC,
                           lambda out: self.b.add_op("RESIZE_BILINEAR", [x.ref, sref], [out], align_corners=align,
                                                     half_pixel_centers=not align))
        self.layer(node, "RESIZE_BILINEAR")
