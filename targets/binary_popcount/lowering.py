"""Lower a captured binary network (:class:`sdk.graph.Graph`) to the layer specs of :mod:`.specs`.

Which layers are binary is read from the graph itself, so a model lowers
whatever modules built it, as long as it uses the SDK's binary ops
(:mod:`sdk.binary`):

* ``edgepack.binarize`` or ``edgepack.approx_sign`` of an activation → :class:`Sign`
  (binarize and pack); a per-channel shift right before it (``x − t``, ReActNet's
  RSign) becomes the Sign's threshold;
* ``edgepack.quantize_uniform`` (k-bit activations, DoReFa) → :class:`BitPlanes`,
  ``edgepack.residual_sign`` (HORQ) → :class:`ResidualSign`: k packed ±1 planes;
* a ``conv``/``linear`` on bit planes or residual planes, or on a Sign with
  low-bit weights, whose constant weight lies on a low-bit grid
  (:func:`.packing.weight_planes`: ±α, ternary {−α, 0, α}, odd multiples of a
  step as DoReFa's k-bit weights, one scale per layer or per output) →
  :class:`BitSerialConv`/:class:`BitSerialLinear`;
* a ``conv``/``linear`` that reads a Sign and whose constant weight has one
  magnitude per output channel (±1 from the binary layers, ±s after
  ``fold_batch_norm``) → :class:`BinaryConv`/:class:`BinaryLinear` with
  ``alpha = s``; a multiplication by a per-channel constant right after it
  (the layer's α) folds into ``alpha``, exactly, since the product before it
  is an integer; after a BinaryConv, multiplications by a constant per output
  row and then per output column (XNOR-Net++'s β, γ) become its ``scale_h`` and
  ``scale_w``, in that order only (the kernel's order of roundings);
* a ``conv``/``linear`` on a real-valued (not binarized) activation whose
  constant weight has one magnitude per output channel (a ``bwn`` layer:
  ``α·sign(W)`` on float input) → :class:`BwnConv`/:class:`BwnLinear`, the
  signs packed one bit per weight; the per-channel ``mul`` (α) and then ``add``
  (the bias) right after it fold into its ``alpha`` and ``bias``; one whose
  weight is on a low-bit grid with more levels (ternary, k-bit) →
  :class:`PlaneWeightConv`/:class:`PlaneWeightLinear`, one sign-selected sum
  per plane;
* a float conv whose weight is at most 256 distinct k×k kernels on a 6-bit grid
  (``kernel-codebook``) → :class:`CodebookConv` (indices + codebook), where that
  stores fewer bytes and decodes to the weight bit for bit;
* a product with ``edgepack.mean_abs_window`` → :class:`MeanAbsScale` (XNOR-Net's K);
* ``batch_norm`` and per-channel ``mul``/``add`` → :class:`ScaleBias`; float
  conv/linear, pools, ReLU, PReLU (and ``leaky_relu``, a PReLU of one slope),
  residual adds, flatten and global means → their float specs;
* ``hardtanh`` (what ``nn.Hardtanh``, ``ReLU6`` and ``torch.clamp``/``clamp_min``/
  ``clamp_max`` with number bounds capture as) → :class:`Clamp`, on any float
  activation: BinaryNet's activation between layers (BN → Hardtanh), before a
  float layer or a pool, or as the output.  One read only by binarize whose
  bounds keep every sign (``lo < 0 <= hi``, e.g. the ±1 clip of the
  straight-through estimator) is dropped instead: it cannot change a sign.

All of these take float activations, wherever they sit between layers; only
binary and bit-serial convs/linears read binarized or bit-plane ones.  Refused, each
naming the node: any other layer on the output of ``edgepack.binarize``,
``quantize_uniform`` or ``residual_sign`` (a clamp there is told to move before the
binarize); a conv/linear on such activations whose weights are on no low-bit grid; a
clamp with tensor bounds (``torch.clamp(x, min=t)``: the kernel takes one pair of
numbers per tensor) or a NaN bound; any op not listed here (the refusal lists
what runs); and a model without any binary layer (a ConfigError saying to apply
xnor, bnn or bwn).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import numpy as np

from sdk.binary import APPROX_SIGN_OP, BINARIZE_OP, MEAN_ABS_WINDOW_OP, QUANTIZE_UNIFORM_OP, RESIDUAL_SIGN_OP
from sdk.errors import ConfigError, UnsupportedOpError
from sdk.graph import Graph, Node

from .packing import weight_planes
from .specs import (
    Add,
    AvgPool,
    BinaryConv,
    BinaryLayer,
    BinaryLinear,
    BitPlanes,
    BitSerialConv,
    BitSerialLinear,
    BinaryWeightLayer,
    BwnConv,
    BwnLinear,
    Clamp,
    CodebookConv,
    Flatten,
    FloatConv,
    FloatLinear,
    GlobalAvgPool,
    InputSpec,
    MaxPool,
    MeanAbsScale,
    PlaneWeightConv,
    PlaneWeightLinear,
    PReLU,
    ReLU,
    ResidualSign,
    ScaleBias,
    Sign,
    layer_profile,
)

APPLY_HINT = ("apply a binary or low-bit quantizer in the recipe (xnor, bnn, bireal, reactnet, horq; bwn, "
              "ternary, dorefa, kernel-codebook for float activations), e.g. "
              "recipe={'stages': [{'method': 'xnor'}]} with data=(x, y) training batches")


@dataclasses.dataclass
class Lowered:
    specs: list                  # layer specs; specs[0] is the InputSpec
    names: list[str]             # graph node each spec comes from ("" for the input)
    layers: list[dict]           # profile rows, one per spec after the input


def lower(graph: Graph, target: str) -> Lowered:
    """Lower ``graph``; :class:`UnsupportedOpError` names the first node that cannot
    run on the kernels and what to change, :class:`ConfigError` says what to apply
    when nothing is binary."""
    return _Lowerer(graph, target).run()


class _Lowerer:
    def __init__(self, graph: Graph, target: str):
        self.g, self.target = graph, target
        self.specs: list = []
        self.names: list[str] = []
        self.ops: list[str] = []
        self.modules: list[str] = []
        self.index: dict[str, int] = {}            # graph value -> spec producing it
        self.windows: dict[str, tuple] = {}        # mean_abs_window node -> (x, kernel, stride, padding, dilation)
        self.fp32_weights: dict[int, int] = {}     # binary / bwn spec -> weights of the float layer it replaces

    def fail(self, node: Node, hint: str) -> UnsupportedOpError:
        where = f" (module {node.module})" if node.module else ""
        return UnsupportedOpError(node.op, node.name, self.target, hint + where)

    def emit(self, spec: Any, node: Node | None, suffix: str = "") -> int:
        self.specs.append(spec)
        self.names.append((node.name + suffix) if node else "")
        self.ops.append(node.op if node else "input")
        self.modules.append(node.module if node else "")
        return len(self.specs) - 1

    def const(self, node: Node, i: int) -> np.ndarray:
        name = node.inputs[i]
        if not self.g.is_const(name):
            raise self.fail(node, f"input {i} must be a constant (a weight), not a computed tensor")
        return np.asarray(self.g.constants[name], np.float32)

    def src(self, node: Node, i: int = 0, *, packed: bool = False) -> int:
        """Spec index of ``node``'s input ``i``, which must be a float (or, when
        ``packed``, a binarized) activation."""
        name = node.inputs[i]
        if name in self.windows:
            raise self.fail(node, "it reads edgepack.mean_abs_window, which the target only takes as the "
                                  "factor K of a binary layer's output (y * K)")
        if name not in self.index:
            raise self.fail(node, f"input {name!r} is not an activation this target computes")
        idx = self.index[name]
        if isinstance(self.specs[idx], _BINARY_ACTIVATIONS) and not packed:
            what = _ACTIVATION_NAMES[type(self.specs[idx])]
            raise self.fail(node, f"it reads {what}; only a conv or linear with binary or low-bit weights can, so "
                                  "quantize its weights too (bnn/xnor/dorefa) or remove the activation quantizer "
                                  "before it")
        return idx

    # -- driver ----------------------------------------------------------------------------
    def run(self) -> Lowered:
        g = self.g
        if len(g.inputs) != 1 or len(g.outputs) != 1:
            raise UnsupportedOpError("signature", f"{len(g.inputs)} inputs, {len(g.outputs)} outputs", self.target,
                                     "binary-popcount models take one input and return one output")
        name, shape, _ = g.inputs[0]
        if len(shape) not in (2, 4):
            raise UnsupportedOpError("input", name, self.target, f"the input must be (N, C, H, W) or (N, F), "
                                     f"got shape {shape}")
        self.index[name] = self.emit(InputSpec(shape), None)
        for node in g.nodes:
            handler = _HANDLERS.get(node.source) or _HANDLERS.get(node.op)
            if handler is None:
                raise self.fail(node, "the binary kernels have no such layer; " + _SUPPORTED)
            handler(self, node)
        out = g.outputs[0]
        if self.index.get(out) != len(self.specs) - 1:
            raise UnsupportedOpError("output", out, self.target, "the model output must be its last computed "
                                     "activation")
        if not any(isinstance(s, (BinaryLayer, BinaryWeightLayer, CodebookConv)) for s in self.specs):
            raise ConfigError(f"target {self.target!r} found no binarized layer in the model: {APPLY_HINT}")
        return Lowered(self.specs, self.names, self._profile())

    def _profile(self) -> list[dict]:
        rows = []
        for prof in layer_profile(self.specs)[1:]:
            i, spec = prof["index"], self.specs[prof["index"]]
            params = sum(a.size for _, a in spec.arrays())
            row = {"name": self.names[i], "module": self.modules[i], "op": f"{self.ops[i]}->{type(spec).__name__}",
                   "in_shape": prof["input_shape"], "out_shape": prof["output_shape"], "params": int(params),
                   "bytes": int(prof["param_bytes"]), "macs": int(prof["macs"]), "bops": int(prof["bops"])}
            if isinstance(spec, BinaryLayer):
                row["params"] = self.fp32_weights[i] + sum(a.size for k, a in spec.arrays()
                                                           if k in ("alpha", "scale_h", "scale_w"))
                row["fp32_bytes"] = 4 * self.fp32_weights[i]
                row["fp32_macs"] = row["bops"]
            elif isinstance(spec, BinaryWeightLayer):
                extra = spec.alpha.size + (0 if spec.bias is None else spec.bias.size)
                row["params"] = self.fp32_weights[i] + extra
                # the float layer it replaces: fp32 weights, and the bias it folded in
                row["fp32_bytes"] = 4 * (self.fp32_weights[i] + (0 if spec.bias is None else spec.bias.size))
                row["fp32_macs"] = row["macs"]
            elif isinstance(spec, CodebookConv):
                # the float conv it replaces; its weights cost the indices, the codebook and its scale
                row["params"] = spec.weights + (0 if spec.bias is None else spec.bias.size)
                row["fp32_bytes"] = 4 * row["params"]
                row["fp32_macs"] = row["macs"]
                row["bits_per_weight"] = round(8 * spec.weight_bytes / spec.weights, 4)
            else:
                row["fp32_bytes"] = row["bytes"]
                row["fp32_macs"] = row["macs"]
            rows.append(row)
        return rows

    # -- weighted layers -------------------------------------------------------------------
    def _weighted(self, node: Node, make: dict[str, Callable]) -> None:
        """A conv or linear: binary (±α weights on a Sign), bit-serial (low-bit weights on
        binary, bit-plane or residual activations), bwn (±α on float), plane-weight
        (low-bit weights on float) or float; ``make[kind]`` builds the spec."""
        w = self.const(node, 1)
        bias = self.const(node, 2) if len(node.inputs) > 2 else None
        src = self.src(node, packed=True)
        act = self.specs[src]
        magnitude = _row_magnitude(w)
        if isinstance(act, _BINARY_ACTIVATIONS):
            if isinstance(act, Sign) and magnitude is not None:
                idx = self.emit(make["binary"](w, magnitude, src), node)
            else:
                planes = weight_planes(w)
                if planes is None:
                    raise self.fail(node, f"its input is {_ACTIVATION_NAMES[type(act)]} but its weights are on no "
                                          "low-bit grid (±α per output channel, {−α, 0, α}, or odd multiples of one "
                                          "step: bnn, xnor, ternary, dorefa); quantize the weights too")
                signs, coefficients, alpha = planes
                if isinstance(act, BitPlanes):       # a = q / inv_step, and the kernel's acc is 2 Σ m q
                    alpha = (alpha * (np.float32(0.5) / act.inv_step[0])).astype(np.float32)
                idx = self.emit(make["bitserial"](signs, coefficients, alpha, src), node)
            self.fp32_weights[idx] = w.size
            if bias is not None:
                idx = self.emit(ScaleBias(np.ones_like(bias), bias, src=idx), node, "/bias")
        else:
            planes = None if magnitude is not None or w[0].size == 1 else weight_planes(w)
            if magnitude is not None and w[0].size > 1 and magnitude.any():
                # binary weights on real-valued input (a bwn layer): sign-selected float adds
                idx = self.emit(make["bwn"](w, magnitude, bias, src), node)
                self.fp32_weights[idx] = w.size
            elif planes is not None:
                # low-bit weights (ternary, k-bit) on real-valued input: one sign-selected sum per plane
                idx = self.emit(make["planes"](*planes, bias, src), node)
                self.fp32_weights[idx] = w.size
            else:
                spec = make["float"](w, bias, src)
                if isinstance(spec, FloatConv):
                    # few distinct k×k kernels on a 6-bit grid (kernel-codebook): indices + codebook, if smaller
                    spec = CodebookConv.from_shared_kernels(w, bias, spec.stride, spec.padding, src) or spec
                idx = self.emit(spec, node)
        self.index[node.name] = idx

    def conv(self, node: Node) -> None:
        a = node.attrs
        k = a["kernel"]
        if a["dims"] != 2:
            raise self.fail(node, f"only 2-D convolutions run here, this is conv{a['dims']}d")
        if (k[0] != k[1] or a["stride"][0] != a["stride"][1] or a["padding"][0] != a["padding"][1]
                or a["dilation"] != (1, 1) or a["groups"] != 1):
            raise self.fail(node, f"the kernels take square kernels with one stride and one padding, no dilation, "
                                  f"groups=1; got kernel {k}, stride {a['stride']}, padding {a['padding']}, "
                                  f"dilation {a['dilation']}, groups {a['groups']}: change the layer")
        st, pad = a["stride"][0], a["padding"][0]
        self._weighted(node, {
            "binary": lambda w, m, s: BinaryConv.from_float(w, m, st, pad, src=s),
            "bitserial": lambda p, c, al, s: BitSerialConv.from_planes(p, c, al, st, pad, src=s),
            "bwn": lambda w, m, b, s: BwnConv.from_float(w, m, b, st, pad, src=s),
            "planes": lambda p, c, al, b, s: PlaneWeightConv.from_planes(p, c, al, b, st, pad, src=s),
            "float": lambda w, b, s: FloatConv(w, b, st, pad, src=s)})

    def linear(self, node: Node) -> None:
        if len(self.g.shape(node.inputs[0])) != 2:
            raise self.fail(node, "linear layers take (N, features) input here; flatten before them")
        self._weighted(node, {
            "binary": lambda w, m, s: BinaryLinear.from_float(w, m, src=s),
            "bitserial": lambda p, c, al, s: BitSerialLinear.from_planes(p, c, al, src=s),
            "bwn": lambda w, m, b, s: BwnLinear.from_float(w, m, b, src=s),
            "planes": lambda p, c, al, b, s: PlaneWeightLinear.from_planes(p, c, al, b, src=s),
            "float": lambda w, b, s: FloatLinear(w, b, src=s)})

    # -- binary-network ops ----------------------------------------------------------------
    def binarize(self, node: Node) -> None:
        """binarize / approx_sign (one forward): a Sign; a per-channel shift just before it that
        nothing else reads (ReActNet's RSign, ``sign(x − t)``) becomes the Sign's threshold."""
        src = self.src(node)
        spec, producer = self.specs[src], node.inputs[0]
        if (isinstance(spec, ScaleBias) and np.all(spec.scale == 1) and src == len(self.specs) - 1
                and len(self.g.users(producer)) == 1 and producer not in self.g.outputs):
            # x + b < 0  ⟺  x < −b exactly in IEEE arithmetic (a nonzero difference never rounds to 0)
            self.specs.pop(), self.names.pop(), self.ops.pop(), self.modules.pop()
            self.index[node.name] = self.emit(Sign(threshold=-spec.bias, src=spec.src), node)
            return
        self.index[node.name] = self.emit(Sign(src=src), node)

    def quantize_uniform(self, node: Node) -> None:
        _, args, _ = node.call
        bits, inv_step = int(args[1]), float(args[2])
        self.index[node.name] = self.emit(BitPlanes(np.array([inv_step], np.float32), bits, src=self.src(node)), node)

    def residual_sign(self, node: Node) -> None:
        _, args, _ = node.call
        self.index[node.name] = self.emit(ResidualSign(int(args[1]), src=self.src(node)), node)

    def mean_abs_window(self, node: Node) -> None:
        _, args, _ = node.call
        x, kernel, stride, padding, dilation = args
        self.windows[node.name] = (x[1], tuple(kernel), tuple(stride), tuple(padding), tuple(dilation))

    def hardtanh(self, node: Node) -> None:
        """hardtanh / relu6 / clamp: dropped where only binarize reads it and it keeps every sign, else a Clamp."""
        lo, hi = float(node.attrs["min"]), float(node.attrs["max"])
        if math.isnan(lo) or math.isnan(hi):
            raise self.fail(node, f"clamp bounds must be numbers (-inf/inf for no bound), got min={lo}, max={hi}")
        if node.inputs[0] in self.index and isinstance(self.specs[self.index[node.inputs[0]]], Sign):
            raise self.fail(node, "it clamps binarized (±1) activations, the output of edgepack.binarize, which only "
                                  "a binary conv or linear reads here; clamp before the binarize instead (there a "
                                  "clamp with min < 0 <= max changes no sign and is dropped)")
        users = self.g.users(node.name)
        if (lo < 0 <= hi and users and all(u.source in (BINARIZE_OP, APPROX_SIGN_OP) for u in users)
                and node.name not in self.g.outputs):
            self.index[node.name] = self.src(node)      # sign(clamp(x)) == sign(x): nothing to run
            return
        self.index[node.name] = self.emit(Clamp.between(lo, hi, src=self.src(node)), node)

    # -- elementwise -----------------------------------------------------------------------
    def mul(self, node: Node) -> None:
        if "scalar" in node.attrs:
            self._scale_bias(node, self.src(node), scale=node.attrs["scalar"])
            return
        a, b = node.inputs
        if a in self.windows or b in self.windows:
            window, yi = (a, 1) if a in self.windows else (b, 0)
            x, kernel, stride, padding, dilation = self.windows[window]
            if kernel and (kernel[0] != kernel[1] or stride[0] != stride[1] or padding[0] != padding[1]
                           or dilation != (1, 1)):
                raise self.fail(node, f"K's window must be square with one stride and padding, no dilation; got "
                                      f"kernel {kernel}, stride {stride}, padding {padding}, dilation {dilation}")
            geometry = (kernel[0], stride[0], padding[0]) if kernel else (1, 1, 0)
            other = self.index.get(x)
            if other is None or isinstance(self.specs[other], _BINARY_ACTIVATIONS):
                raise self.fail(node, "K must be computed from a real-valued activation")
            self.index[node.name] = self.emit(MeanAbsScale(other, *geometry, src=self.src(node, yi)), node)
            return
        if self.g.is_const(a) or self.g.is_const(b):
            ci, vi = (0, 1) if self.g.is_const(a) else (1, 0)
            src = self.src(node, vi)
            spec, value = self.specs[src], self.const(node, ci)
            axis = _spatial_axis(value, node.shape)
            if axis is not None and isinstance(spec, BinaryConv) and len(self.g.users(node.inputs[vi])) == 1:
                field = "scale_h" if axis == 2 else "scale_w"
                # torch's order, α then rows then columns, is the kernel's: anything else is refused
                if spec.scale_w is None and getattr(spec, field) is None:
                    setattr(spec, field, np.ascontiguousarray(value.reshape(-1), np.float32))
                    self.index[node.name] = src
                    return
            scale = self._per_channel(node, value)
            if (isinstance(spec, BinaryLayer) and np.all(spec.alpha == 1) and len(self.g.users(node.inputs[vi])) == 1
                    and getattr(spec, "scale_h", None) is None and getattr(spec, "scale_w", None) is None):
                spec.alpha = scale          # α · (integer product): the same single rounding either way
                self.index[node.name] = src
                return
            if (isinstance(spec, BinaryWeightLayer) and np.all(spec.alpha == 1) and spec.bias is None
                    and len(self.g.users(node.inputs[vi])) == 1):
                spec.alpha = scale          # α · (float sum): the kernel's one product, as torch's mul
                self.index[node.name] = src
                return
            self._scale_bias(node, src, scale=scale)
            return
        raise self.fail(node, "the product of two activations only runs as XNOR-Net's y * K; " + _SUPPORTED)

    def add(self, node: Node) -> None:
        if "scalar" in node.attrs:
            self._scale_bias(node, self.src(node), bias=node.attrs["scalar"])
            return
        a, b = node.inputs
        if self.g.is_const(a) or self.g.is_const(b):
            ci, vi = (0, 1) if self.g.is_const(a) else (1, 0)
            src, bias = self.src(node, vi), self._per_channel(node, self.const(node, ci))
            spec = self.specs[src]
            if isinstance(spec, BinaryWeightLayer) and spec.bias is None and len(self.g.users(node.inputs[vi])) == 1:
                spec.bias = bias            # α · sum + bias: the kernel's one add, as torch's
                self.index[node.name] = src
                return
            self._scale_bias(node, src, bias=bias)
            return
        if self.g.shape(a) != self.g.shape(b):
            raise self.fail(node, f"residual adds need equal shapes, got {self.g.shape(a)} and {self.g.shape(b)}")
        self.index[node.name] = self.emit(Add(other=self.src(node, 1), src=self.src(node, 0)), node)

    def sub(self, node: Node) -> None:
        """``x − c`` for a number or per-channel constant ``c``: a ScaleBias with bias ``−c``."""
        if "scalar" in node.attrs:
            self._scale_bias(node, self.src(node), bias=-node.attrs["scalar"])
            return
        a, b = node.inputs
        if not self.g.is_const(b) or self.g.is_const(a):
            raise self.fail(node, "only activation − constant runs here (a per-channel shift)")
        self._scale_bias(node, self.src(node), bias=-self._per_channel(node, self.const(node, 1)))

    def _per_channel(self, node: Node, value: np.ndarray) -> np.ndarray:
        channels = node.shape[1]
        if value.size == 1:
            return np.full(channels, value.reshape(()), np.float32)
        aligned = (1,) * (len(node.shape) - value.ndim) + value.shape
        if value.size != channels or len(aligned) != len(node.shape) or aligned[1] != channels:
            raise self.fail(node, f"only per-channel constants (shape {(1, channels) + (1,) * (len(node.shape) - 2)})"
                                  f" run here, got shape {value.shape}")
        return np.ascontiguousarray(value.reshape(channels), np.float32)

    def _scale_bias(self, node: Node, src: int, scale: Any = 1.0, bias: Any = 0.0) -> None:
        channels = node.shape[1]
        scale, bias = (np.broadcast_to(np.float32(v), (channels,)) for v in (scale, bias))
        self.index[node.name] = self.emit(ScaleBias(scale, bias, src=src), node)

    def batch_norm(self, node: Node) -> None:
        gamma, beta, mean, var = (self.const(node, i) for i in range(1, 5))
        scale = (gamma / np.sqrt(var + np.float32(node.attrs["eps"]))).astype(np.float32)
        self._scale_bias(node, self.src(node), scale=scale, bias=(beta - mean * scale).astype(np.float32))

    def relu(self, node: Node) -> None:
        self.index[node.name] = self.emit(ReLU(src=self.src(node)), node)

    def prelu(self, node: Node) -> None:
        self.index[node.name] = self.emit(PReLU(self.const(node, 1).reshape(-1), src=self.src(node)), node)

    def tensor_clamp(self, node: Node) -> None:
        raise self.fail(node, "clamp runs here with number bounds, one min and max for the whole tensor; these "
                              "bounds are tensors: pass numbers (torch.clamp(x, -1.0, 1.0), nn.Hardtanh, nn.ReLU6)")

    def leaky_relu(self, node: Node) -> None:
        slope = np.array([node.attrs["slope"]], np.float32)
        self.index[node.name] = self.emit(PReLU(slope, src=self.src(node)), node)

    # -- pools and shapes ------------------------------------------------------------------
    def _window(self, node: Node) -> tuple[int, int, int]:
        a = node.attrs
        if (a["kernel"][0] != a["kernel"][1] or a["stride"][0] != a["stride"][1] or a["padding"][0] != a["padding"][1]
                or a.get("dilation", (1, 1)) != (1, 1) or a["ceil_mode"]):
            raise self.fail(node, f"pools run with square windows, one stride and padding, no dilation or ceil_mode; "
                                  f"got {a}")
        return a["kernel"][0], a["stride"][0], a["padding"][0]

    def max_pool2d(self, node: Node) -> None:
        self.index[node.name] = self.emit(MaxPool(*self._window(node), src=self.src(node)), node)

    def avg_pool2d(self, node: Node) -> None:
        window = self._window(node)
        if not node.attrs["count_include_pad"] or node.attrs["divisor_override"] is not None:
            raise self.fail(node, "average pools divide by the window size here (count_include_pad=True, "
                                  "no divisor_override)")
        self.index[node.name] = self.emit(AvgPool(*window, src=self.src(node)), node)

    def mean(self, node: Node) -> None:
        if len(self.g.shape(node.inputs[0])) != 4 or node.attrs["dims"] != (2, 3):
            raise self.fail(node, "only the global spatial mean (dims 2, 3) of a 4-D tensor runs here")
        idx = self.emit(GlobalAvgPool(src=self.src(node)), node)
        self.index[node.name] = idx if node.attrs["keepdim"] else self.emit(Flatten(src=idx), node, "/flatten")

    def reshape(self, node: Node) -> None:
        before, after = self.g.shape(node.inputs[0]), node.shape
        if before == after:
            self.index[node.name] = self.src(node)
        elif len(after) == 2 and after[0] == before[0] and math.prod(after) == math.prod(before):
            self.index[node.name] = self.emit(Flatten(src=self.src(node)), node)
        else:
            raise self.fail(node, f"only flattening (N, ...) to (N, features) runs here, got {before} -> {after}")


_HANDLERS: dict[str, Callable[[_Lowerer, Node], None]] = {
    BINARIZE_OP: _Lowerer.binarize, APPROX_SIGN_OP: _Lowerer.binarize,
    QUANTIZE_UNIFORM_OP: _Lowerer.quantize_uniform, RESIDUAL_SIGN_OP: _Lowerer.residual_sign, MEAN_ABS_WINDOW_OP: _Lowerer.mean_abs_window,
    "conv": _Lowerer.conv, "linear": _Lowerer.linear, "batch_norm": _Lowerer.batch_norm,
    "mul": _Lowerer.mul, "add": _Lowerer.add, "sub": _Lowerer.sub, "relu": _Lowerer.relu, "prelu": _Lowerer.prelu,
    "leaky_relu": _Lowerer.leaky_relu, "hardtanh": _Lowerer.hardtanh, "max_pool2d": _Lowerer.max_pool2d,
    "avg_pool2d": _Lowerer.avg_pool2d,
    "mean": _Lowerer.mean, "reshape": _Lowerer.reshape,
    **{f"aten.{op}.Tensor": _Lowerer.tensor_clamp for op in ("clamp", "clamp_min", "clamp_max")},
}
_SUPPORTED = ("binary-popcount runs: edgepack.binarize, conv, linear, batch_norm, relu, prelu, leaky_relu, "
              "hardtanh/relu6/clamp with number bounds, max_pool2d, avg_pool2d, global mean, flatten, residual add, "
              "per-channel mul/add, XNOR-Net's K")


#: the activations only binary and bit-serial layers read, and how errors name them
_BINARY_ACTIVATIONS = (Sign, BitPlanes, ResidualSign)
_ACTIVATION_NAMES = {Sign: "binarized activations (the output of edgepack.binarize)",
                     BitPlanes: "k-bit activations (the output of edgepack.quantize_uniform)",
                     ResidualSign: "residual-binarized activations (the output of edgepack.residual_sign)"}


def _spatial_axis(value: np.ndarray, shape: tuple[int, ...]) -> int | None:
    """2 when the constant ``value`` is one factor per row of a 4-D ``shape`` (``(1, 1, H, 1)``, as
    XNOR-Net++'s β), 3 when one per column (``(1, 1, 1, W)``, γ), else None."""
    if len(shape) != 4 or value.size <= 1 or value.ndim > 4:
        return None
    aligned = (1,) * (4 - value.ndim) + tuple(value.shape)
    for axis in (2, 3):
        if aligned == tuple(shape[axis] if d == axis else 1 for d in range(4)):
            return axis
    return None


def _row_magnitude(w: np.ndarray) -> np.ndarray | None:
    """``s`` when every output channel ``o`` of ``w`` is ``±s[o]``, else None."""
    m = np.abs(w.reshape(w.shape[0], -1))
    return m[:, 0].copy() if np.all(m == m[:, :1]) else None
