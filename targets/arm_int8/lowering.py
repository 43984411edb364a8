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
transpose, pad, resize) pass their input's parameters through; SOFTMAX and
LOGISTIC/TANH get the fixed output parameters the runtime requires; inputs
of CONCATENATION whose parameters differ are requantized with QUANTIZE first.
ReLU/ReLU6 following conv, linear or add are fused into them, so XNNPACK
takes the whole graph.  Float (``arm-fp32``): the same lowering without
quantization.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from sdk.errors import ConfigError, UnsupportedOpError
from sdk.graph import Graph, Node, macs
from sdk.quant import QuantPlan, QuantSpec, qparams

from .flatbuffer import ModelBuilder, TensorRef
from .reference import same_padding
from .runners import inverse_perm

#: canonical ops this lowering handles (attribute limits are checked per node)
SUPPORTED = frozenset({
    "conv", "linear", "relu", "hardtanh", "leaky_relu", "prelu", "sigmoid", "tanh", "hardswish", "hardsigmoid",
    "silu", "add", "sub", "mul", "max_pool2d", "avg_pool2d", "mean", "reshape", "permute", "cat", "softmax", "pad",
    "upsample_nearest",
})
NHWC = (0, 2, 3, 1)
#: output parameters the runtime requires (scale, zero point)
FIXED_OUTPUT = {"softmax": (1.0 / 256, -128), "sigmoid": (1.0 / 256, -128), "tanh": (1.0 / 128, 0)}
_FUSABLE = {"relu": "RELU"}


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


def lower(graph: Graph, plan: QuantPlan | None, *, target: str, io: str = "float",
          half_weights: bool = False, keep_fp32: frozenset[str] = frozenset()) -> Lowered:
    """Lower ``graph``; int8 when ``plan`` is given.  ``half_weights``: float
    model with float16 weights and biases behind DEQUANTIZE ops (the form GPU
    delegates consume), except for the nodes in ``keep_fp32``."""
    return _Lowerer(graph, plan, target, io, half_weights, keep_fp32).run()


def check(graph: Graph, target: str) -> None:
    """Raise :class:`UnsupportedOpError` for the first node outside :data:`SUPPORTED`."""
    for node in graph.nodes:
        if node.op not in SUPPORTED:
            raise UnsupportedOpError(
                node.op, node.name, target,
                f"rewrite the model without it (module {node.module or '?'}); {target} lowers: "
                + ", ".join(sorted(SUPPORTED)))
        if node.op == "conv" and node.attrs["dims"] not in (1, 2):
            raise UnsupportedOpError(f"conv{node.attrs['dims']}d", node.name, target, "only Conv1d and Conv2d lower")


def _same_order(stored_shape, perm) -> bool:
    """True when moving dims by ``perm`` only moves size-1 dims (data order unchanged)."""
    kept = [p for p in perm if stored_shape[p] != 1]
    return kept == sorted(kept)


class _Lowerer:
    def __init__(self, graph: Graph, plan: QuantPlan | None, target: str, io: str, half_weights: bool = False,
                 keep_fp32: frozenset[str] = frozenset()):
        self.g, self.plan, self.target, self.io = graph, plan, target, io
        self.half_weights, self.keep_fp32 = half_weights, keep_fp32
        self.q = plan is not None
        self.b = ModelBuilder(description=f"edgepack {target}")
        self.values: dict[str, Value] = {}
        self.layers: list[dict] = []
        self.fused: dict[str, Node] = {}       # producer name -> activation node fused into it
        self.skip: set[str] = set()
        if io not in ("float", "int8"):
            raise ConfigError(f"{target}: io={io!r} is not allowed; choose 'float' or 'int8'")
        if self.q:
            for name, spec in plan.weights.items():
                if not spec.symmetric or any(spec.zero_point):
                    raise ConfigError(f"{target} requires symmetric int8 weights (zero point 0) for XNNPACK; "
                                      f"weight {name} is asymmetric: set ptq weight_scheme: symmetric")

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
        return self.plan.activations[name]

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

    def requant(self, v: Value, spec: QuantSpec, label: str) -> Value:
        """``v`` with other int8 parameters (QUANTIZE int8 → int8)."""
        if not self.q or v.spec == spec or (v.spec.scale, v.spec.zero_point) == (spec.scale, spec.zero_point):
            return v
        out = self.tensor(self.name(f"{label}/requant"), v.stored_shape, spec)
        self.b.add_op("QUANTIZE", [v.ref], [out])
        return Value(out, v.perm, spec)

    def layer(self, node: Node, op: str, params: int = 0, nbytes: int = 0, node_macs: int = 0) -> None:
        ins = [list(self.g.shape(i)) for i in node.inputs if not self.g.is_const(i)]
        self.layers.append({"name": node.name, "module": node.module, "op": f"{node.op}->{op}",
                            "in_shape": ins[0] if ins else [], "out_shape": list(node.shape),
                            "params": int(params), "bytes": int(nbytes), "macs": int(node_macs)})

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
            handler = getattr(self, f"_op_{node.op}", None)
            if handler is None or node.op not in SUPPORTED:
                raise self.unsupported(node, f"{self.target} has no lowering for it")
            handler(node)

        model_outputs, out_sigs = [], []
        for name in g.outputs:
            v = self.values[name]
            shape = g.shape(name)
            if self.q and self.io == "float":
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
        """ReLU / ReLU6 after conv, linear or add with a single user: fuse them."""
        g = self.g
        for node in g.nodes:
            act = None
            if node.op == "relu":
                act = "RELU"
            elif node.op == "hardtanh" and (node.attrs["min"], node.attrs["max"]) == (0.0, 6.0):
                act = "RELU6"
            if act is None:
                continue
            prod = g.node(node.inputs[0])
            if prod is None or prod.op not in ("conv", "linear", "add", "sub", "mul") or prod.name in g.outputs \
                    or len(g.users(prod.name)) != 1 or prod.name in self.fused:
                continue
            self.fused[prod.name] = node
            node.attrs = {**node.attrs, "_fused_act": act}
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
        return v, (act_node.attrs["_fused_act"] if act_node is not None else None), final

    def _in(self, node: Node, i: int = 0) -> Value:
        return self.values[node.inputs[i]]

    # -- ops ------------------------------------------------------------------------
    def _op_conv(self, node: Node) -> None:
        g, a = self.g, node.attrs
        x = self._in(node)
        w = g.constants.get(node.inputs[1])
        if w is None:
            raise self.unsupported(node, "weights computed at run time cannot be packed; make them parameters")
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
        out, act, final = self._out(node, (n, oh, ow, cout), out_perm)
        wref, bref, nbytes = self._weights(node, w, w_t, bias, axis, x)
        opts = dict(stride=tuple(stride), padding=padding, dilation=tuple(dil), activation=act)
        if depthwise:
            self.b.add_op("DEPTHWISE_CONV_2D", [x.ref, wref, bref], [out.ref], depth_multiplier=cout // cin, **opts)
        else:
            self.b.add_op("CONV_2D", [x.ref, wref, bref], [out.ref], **opts)
        if a["dims"] == 1:      # back to (N, C, L) stored as (N, L, C)
            out3 = self.tensor(self.name(f"{final}/as1d"), (n, ow, cout), out.spec)
            self.b.add_op("RESHAPE", [out.ref, self.b.add_const(self.name(f"{final}/s"), (n, ow, cout))], [out3])
            v = Value(out3, (0, 2, 1), out.spec)
            self.values[final] = v
            if final != node.name:
                self.values[node.name] = v
        self.layer(node, "DEPTHWISE_CONV_2D" if depthwise else "CONV_2D", w.size + bias.size, nbytes, macs(self.g, node))

    def _weights(self, node: Node, w: np.ndarray, w_t: np.ndarray, bias: np.ndarray, axis: int, x: Value):
        """Weight and bias tensors; int8 per-channel weights and int32 bias when quantizing."""
        if not self.q:
            if self.half_weights and node.name not in self.keep_fp32:
                return (self._half_const(f"{node.name}/weight", w_t), self._half_const(f"{node.name}/bias", bias),
                        2 * (w.size + bias.size))
            wref = self.b.add_tensor(self.name(f"{node.name}/weight"), w_t.shape, "float32", data=w_t)
            bref = self.b.add_tensor(self.name(f"{node.name}/bias"), bias.shape, "float32", data=bias)
            return wref, bref, 4 * (w.size + bias.size)
        spec = self.plan.weights.get(node.inputs[1])
        if spec is None:
            raise self.unsupported(node, "the quantization plan has no spec for its weight")
        scales = np.asarray(spec.scale, np.float64)
        if len(scales) == 1:
            scales = np.repeat(scales, w.shape[0])
        q = np.clip(np.round(w.reshape(w.shape[0], -1) / scales[:, None]), -127, 127).astype(np.int8).reshape(w.shape)
        if w.ndim == 4:
            q_t = q.transpose((1, 2, 3, 0) if axis == 3 else (0, 2, 3, 1))
        else:
            q_t = q
        wref = self.b.add_tensor(self.name(f"{node.name}/weight"), q_t.shape, "int8", data=q_t,
                                 scale=scales.astype(np.float32), zero_point=0, axis=axis)
        s_in = np.float64(np.float32(x.spec.scale[0]))
        bscale = s_in * scales.astype(np.float32).astype(np.float64)
        qb = np.clip(np.round(bias.astype(np.float64) / bscale), -(2 ** 31), 2 ** 31 - 1).astype(np.int32)
        bref = self.b.add_tensor(self.name(f"{node.name}/bias"), qb.shape, "int32", data=qb,
                                 scale=bscale.astype(np.float32), zero_point=0, axis=0)
        return wref, bref, q.size + 4 * qb.size

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
        if same:
            return x, "SAME"
        return self._pad_explicit(node, x, pad)

    def _op_linear(self, node: Node) -> None:
        x = self._in(node)
        x = self.to_perm(x, tuple(range(len(x.perm))), node.name)
        w = self.g.constants.get(node.inputs[1])
        if w is None:
            raise self.unsupported(node, "weights computed at run time cannot be packed; make them parameters")
        bias = self.g.constants[node.inputs[2]] if len(node.inputs) > 2 else np.zeros(w.shape[0], np.float32)
        shape = tuple(node.shape)
        out, act, _ = self._out(node, shape, tuple(range(len(shape))))
        wref, bref, nbytes = self._weights(node, w, w, bias, 0, x)
        self.b.add_op("FULLY_CONNECTED", [x.ref, wref, bref], [out.ref], activation=act,
                      keep_num_dims=len(shape) > 2)
        self.layer(node, "FULLY_CONNECTED", w.size + bias.size, nbytes, macs(self.g, node))

    def _binary(self, node: Node, op: str) -> None:
        a = self._in(node)
        if len(node.inputs) > 1 and not self.g.is_const(node.inputs[1]):
            b = self._in(node, 1)
            if len(b.perm) == len(a.perm) and b.perm != a.perm:
                b = self.to_perm(b, a.perm, node.name)
            elif len(b.perm) != len(a.perm):
                a = self.to_perm(a, tuple(range(len(a.perm))), node.name)
                b = self.to_perm(b, tuple(range(len(b.perm))), node.name)
            bref = b.ref
        else:
            arr = self.g.constants[node.inputs[1]] if len(node.inputs) > 1 else np.float32(node.attrs["scalar"])
            arr = np.asarray(arr, np.float32)
            if arr.ndim == len(a.perm):
                arr = arr.transpose(a.perm)
            elif arr.ndim > 0 and len(a.perm) != arr.ndim:
                a = self.to_perm(a, tuple(range(len(a.perm))), node.name)
            if arr.ndim == 0:
                arr = arr.reshape(1)
            bref, _ = self.const(self.name(f"{node.name}/operand"), arr)
        stored = tuple(node.shape[p] for p in a.perm)
        out, act, _ = self._out(node, stored, a.perm)
        self.b.add_op(op, [a.ref, bref], [out.ref], activation=act)
        self.layer(node, op)

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
        self._unary(node, "RELU")

    def _op_hardtanh(self, node):
        if (node.attrs["min"], node.attrs["max"]) != (0.0, 6.0):
            raise self.unsupported(node, "only hardtanh(0, 6) (ReLU6) lowers; use ReLU6 or clamp in the data")
        self._unary(node, "RELU6")

    def _op_leaky_relu(self, node):
        self._unary(node, "LEAKY_RELU", alpha=node.attrs["slope"])

    def _op_sigmoid(self, node):
        self._unary(node, "LOGISTIC", spec=self._fixed(node))

    def _op_tanh(self, node):
        self._unary(node, "TANH", spec=self._fixed(node))

    def _op_hardswish(self, node):
        self._unary(node, "HARD_SWISH")

    def _op_prelu(self, node):
        x = self._in(node)
        slope = np.asarray(self.g.constants[node.inputs[1]], np.float32).reshape(-1)
        channels = node.shape[1] if len(node.shape) > 1 else 1
        slope = np.broadcast_to(slope, (channels,)).copy()
        rank = len(x.perm)
        shape = [1] * (rank - 1)
        pos = x.perm.index(1) - 1 if rank > 1 else 0     # alpha broadcasts over all but the batch dim
        shape[pos] = channels
        alpha, _ = self.const(self.name(f"{node.name}/alpha"), slope.reshape(shape))
        out, _, _ = self._out(node, x.stored_shape, x.perm)
        self.b.add_op("PRELU", [x.ref, alpha], [out.ref])
        self.layer(node, "PRELU", slope.size, slope.size)

    def _op_silu(self, node):
        """x · sigmoid(x): LOGISTIC (fixed output parameters) then MUL."""
        x = self._in(node)
        sig = self.tensor(self.name(f"{node.name}/sigmoid"), x.stored_shape, self._fixed_spec(1 / 256, -128))
        self.b.add_op("LOGISTIC", [x.ref], [sig])
        out, _, _ = self._out(node, x.stored_shape, x.perm)
        self.b.add_op("MUL", [x.ref, sig], [out.ref])
        self.layer(node, "LOGISTIC+MUL")

    def _op_hardsigmoid(self, node):
        """relu6(x + 3) / 6 as ADD, RELU6-fused, then MUL by 1/6."""
        x = self._in(node)
        three, _ = self.const(self.name(f"{node.name}/three"), np.array([3.0], np.float32))
        mid = self.tensor(self.name(f"{node.name}/relu6"), x.stored_shape, self._fixed_spec(6.0 / 255, -128))
        self.b.add_op("ADD", [x.ref, three], [mid], activation="RELU6")
        sixth, _ = self.const(self.name(f"{node.name}/sixth"), np.array([1.0 / 6], np.float32))
        out, _, _ = self._out(node, x.stored_shape, x.perm)
        self.b.add_op("MUL", [mid, sixth], [out.ref])
        self.layer(node, "ADD+MUL")

    def _fixed_spec(self, scale, zp) -> QuantSpec | None:
        return QuantSpec("int8", (scale,), (zp,)) if self.q else None

    def _pool(self, node: Node, op: str) -> None:
        a = node.attrs
        x = self.to_perm(self._in(node), NHWC, node.name)
        if a.get("ceil_mode"):
            n, h, w, c = x.stored_shape
            floor_shape = [(s + 2 * p - k) // st + 1 for s, p, k, st in zip((h, w), a["padding"], a["kernel"], a["stride"])]
            if floor_shape != list(node.shape[2:]):
                raise self.unsupported(node, "ceil_mode=True changes the output size here; use ceil_mode=False")
        if tuple(a.get("dilation", (1, 1))) != (1, 1):
            raise self.unsupported(node, "dilated pooling does not lower")
        padding = "VALID"
        if any(a["padding"]):
            if op == "MAX_POOL_2D":
                x, padding = self._explicit_pad(node, x, a["kernel"], a["stride"], a["padding"], (1, 1))
                if padding != "SAME":
                    raise self.unsupported(node, "max-pool padding that is not TFLite SAME does not lower")
            else:
                if not a["count_include_pad"]:
                    raise self.unsupported(node, "avg-pool with count_include_pad=False and padding does not lower")
                x, padding = self._explicit_pad(node, x, a["kernel"], a["stride"], a["padding"], (1, 1))
                if padding == "SAME":   # SAME would exclude the padding from the count: pad explicitly
                    x, _ = self._pad_explicit(node, x, a["padding"])
                    padding = "VALID"
        if op == "AVERAGE_POOL_2D" and a.get("divisor_override"):
            raise self.unsupported(node, "divisor_override does not lower")
        stored = tuple(node.shape[p] for p in NHWC)
        spec = x.spec if self.q else None        # the runtime needs equal input/output parameters
        out, _, _ = self._out(node, stored, NHWC, spec=spec)
        self.b.add_op(op, [x.ref], [out.ref], filter=tuple(a["kernel"]), stride=tuple(a["stride"]), padding=padding)
        self.layer(node, op)

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
        identity = tuple(range(len(x.perm)))
        if not _same_order(x.stored_shape, inverse_perm(x.perm)):     # else RESHAPE reads the data as it is
            x = self.to_perm(x, identity, node.name)
        shape = tuple(node.shape)
        out, _, _ = self._out(node, shape, tuple(range(len(shape))), spec=x.spec if self.q else None)
        self.b.add_op("RESHAPE", [x.ref, self.b.add_const(self.name(f"{node.name}/shape"), shape)], [out.ref])
        self.layer(node, "RESHAPE")

    def _op_permute(self, node):
        x = self._in(node)
        q = node.attrs["perm"]
        inv = inverse_perm(x.perm)
        order = tuple(inv[d] for d in q)
        shape = tuple(node.shape)
        spec = x.spec if self.q else None
        if order == tuple(range(len(order))):
            self.values[node.name] = Value(x.ref, tuple(range(len(shape))), spec)
            return
        out, _, _ = self._out(node, shape, tuple(range(len(shape))), spec=spec)
        self.b.add_op("TRANSPOSE", [x.ref, self.b.add_const(self.name(f"{node.name}/perm"), order)], [out.ref])
        self.layer(node, "TRANSPOSE")

    def _op_cat(self, node):
        ins = [self._in(node, i) for i in range(len(node.inputs))]
        perm = ins[0].perm
        ins = [self.to_perm(v, perm, node.name) for v in ins]
        out_spec = self.spec_of(node.name) if self.q else None
        ins = [self.requant(v, out_spec, node.name) for v in ins] if self.q else ins
        stored = tuple(node.shape[p] for p in perm)
        out, _, _ = self._out(node, stored, perm, spec=out_spec)
        self.b.add_op("CONCATENATION", [v.ref for v in ins], [out.ref], axis=perm.index(node.attrs["dim"]))
        self.layer(node, "CONCATENATION")

    def _op_softmax(self, node):
        x = self._in(node)
        if x.perm.index(node.attrs["dim"]) != len(x.perm) - 1:
            x = self.to_perm(x, tuple(range(len(x.perm))), node.name)
            if node.attrs["dim"] != len(x.perm) - 1:
                raise self.unsupported(node, "softmax lowers over the last dimension only")
        out, _, _ = self._out(node, x.stored_shape, x.perm, spec=self._fixed(node))
        self.b.add_op("SOFTMAX", [x.ref], [out.ref], beta=1.0)
        self.layer(node, "SOFTMAX")

    def _op_pad(self, node):
        x = self._in(node)
        if node.attrs["value"] != 0.0:
            raise self.unsupported(node, "only zero padding lowers")
        pad = node.attrs["pad"]
        rank = len(x.perm)
        torch_pad = [[0, 0] for _ in range(rank)]
        for i in range(len(pad) // 2):      # torch lists the last dim first
            torch_pad[rank - 1 - i] = [pad[2 * i], pad[2 * i + 1]]
        if any(p < 0 for pair in torch_pad for p in pair):
            raise self.unsupported(node, "negative padding (cropping) does not lower")
        stored_pad = [torch_pad[p] for p in x.perm]
        stored = tuple(node.shape[p] for p in x.perm)
        out, _, _ = self._out(node, stored, x.perm, spec=x.spec if self.q else None)
        self.b.add_op("PAD", [x.ref, self.b.add_const(self.name(f"{node.name}/paddings"), stored_pad)], [out.ref])
        self.layer(node, "PAD")

    def _op_upsample_nearest(self, node):
        x = self.to_perm(self._in(node), NHWC, node.name)
        size = tuple(node.attrs["size"])
        n, h, w, c = x.stored_shape
        if size[0] % h or size[1] % w:
            raise self.unsupported(node, "only integer nearest upsampling factors lower")
        out, _, _ = self._out(node, (n, size[0], size[1], c), NHWC, spec=x.spec if self.q else None)
        self.b.add_op("RESIZE_NEAREST_NEIGHBOR", [x.ref, self.b.add_const(self.name(f"{node.name}/size"), size)],
                      [out.ref])
        self.layer(node, "RESIZE_NEAREST_NEIGHBOR")
