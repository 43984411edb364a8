"""The graph every target consumes: captured with ``torch.export``, canonicalised.

:func:`capture` exports a module, folds constants (parameters, buffers, pruning
masks), and maps each ATen call to a small canonical op set with normalised
attributes (``conv``, ``linear``, ``batch_norm``, ``relu``, ``add``, ...).  Ops
outside that set keep the name ``"aten.<op>"``: targets reject those with
:class:`~sdk.errors.UnsupportedOpError`.  Layout stays PyTorch's (NCHW); each
target converts at its own boundary.

:meth:`Graph.run` executes the canonical graph with torch, so calibration
observes exactly the tensors the target will quantize (after BN folding), and
the same code runs it in float16 for the fp16 analysis.

>>> import torch, sdk.graph as G
>>> g = G.capture(torch.nn.Sequential(torch.nn.Linear(4, 2), torch.nn.ReLU()), (torch.randn(1, 4),))
>>> [n.op for n in g.nodes]
['linear', 'relu']
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .errors import ExportError, InputError


@dataclasses.dataclass
class Node:
    """One operation.  ``inputs`` name values: graph inputs, other nodes'
    outputs, or entries of :attr:`Graph.constants`."""

    name: str
    op: str
    inputs: list[str]
    attrs: dict[str, Any]
    shape: tuple[int, ...]
    module: str = ""      # owning nn.Module path, for messages and profiles
    source: str = ""      # the ATen op it came from
    call: Any = None      # (fn, args, kwargs) template for ops outside the canonical set


@dataclasses.dataclass
class Graph:
    nodes: list[Node]
    inputs: list[tuple[str, tuple[int, ...], str]]   # (name, shape, dtype)
    outputs: list[str]
    constants: dict[str, np.ndarray]

    # -- structure ---------------------------------------------------------
    def node(self, name: str) -> Node | None:
        return self._by_name().get(name)

    def _by_name(self) -> dict[str, Node]:
        return {n.name: n for n in self.nodes}

    def users(self, name: str) -> list[Node]:
        """Nodes that read value ``name``."""
        return [n for n in self.nodes if name in n.inputs]

    def shape(self, name: str) -> tuple[int, ...]:
        for iname, shp, _ in self.inputs:
            if iname == name:
                return shp
        if name in self.constants:
            return tuple(self.constants[name].shape)
        node = self.node(name)
        if node is None:
            raise KeyError(name)
        return node.shape

    def is_const(self, name: str) -> bool:
        return name in self.constants

    def copy(self) -> "Graph":
        return Graph([dataclasses.replace(n, inputs=list(n.inputs), attrs=dict(n.attrs)) for n in self.nodes],
                     list(self.inputs), list(self.outputs), dict(self.constants))

    def unique_name(self, base: str) -> str:
        taken = set(self.constants) | {n.name for n in self.nodes} | {i[0] for i in self.inputs}
        name, k = base, 1
        while name in taken:
            name, k = f"{base}_{k}", k + 1
        return name

    # -- execution -----------------------------------------------------------
    def run(self, inputs: Sequence[torch.Tensor], *, observer: Callable[[str, torch.Tensor], None] | None = None,
            dtype: torch.dtype = torch.float32,
            on_node: Callable[[Node, torch.Tensor], torch.Tensor] | None = None) -> list[torch.Tensor]:
        """Execute with torch.  ``observer(name, value)`` sees every input and
        node output; ``on_node`` may replace a node's output (fake quantization,
        precision emulation).  Batch size may differ from the captured one."""
        env: dict[str, torch.Tensor] = {}
        consts = {k: torch.from_numpy(v).to(dtype) if v.dtype.kind == "f" else torch.from_numpy(v)
                  for k, v in self.constants.items()}
        for (name, _, _), value in zip(self.inputs, inputs):
            env[name] = value.to(dtype)
            if observer:
                observer(name, env[name])
        batch = self.inputs[0][1][0] if self.inputs and self.inputs[0][1] else None
        with torch.no_grad():
            for node in self.nodes:
                args = [env[i] if i in env else consts[i] for i in node.inputs]
                out = _EXEC[node.op](node, args, batch) if node.op in _EXEC else _exec_call(node, env, consts)
                if on_node is not None:
                    out = on_node(node, out)
                env[node.name] = out
                if observer:
                    observer(node.name, out)
        return [env[o] if o in env else consts[o] for o in self.outputs]

    # -- serialisation -------------------------------------------------------
    def to_dict(self) -> dict:
        """JSON-ready structure (constants excluded: store them with :func:`numpy.savez`)."""
        for n in self.nodes:
            if n.call is not None:
                raise ValueError(f"node {n.name} ({n.op}) is not a canonical op and cannot be serialised")
        return {"inputs": [[n, list(s), d] for n, s, d in self.inputs], "outputs": list(self.outputs),
                "nodes": [{"name": n.name, "op": n.op, "inputs": n.inputs, "shape": list(n.shape),
                           "attrs": {k: list(v) if isinstance(v, tuple) else v for k, v in n.attrs.items()},
                           "module": n.module} for n in self.nodes]}

    @classmethod
    def from_dict(cls, data: dict, constants: dict[str, np.ndarray]) -> "Graph":
        """Inverse of :meth:`to_dict`."""
        nodes = [Node(d["name"], d["op"], list(d["inputs"]),
                      {k: tuple(v) if isinstance(v, list) else v for k, v in d["attrs"].items()},
                      tuple(d["shape"]), d.get("module", "")) for d in data["nodes"]]
        return cls(nodes, [(n, tuple(s), dt) for n, s, dt in data["inputs"]], list(data["outputs"]),
                   {k: np.asarray(v) for k, v in constants.items()})

    def summary(self) -> str:
        """One line per node: name, op, inputs, shape."""
        return "\n".join(f"{n.name:24s} {n.op:20s} {','.join(n.inputs):40s} {n.shape}" for n in self.nodes)


# ---------------------------------------------------------------------------
# capture
# ---------------------------------------------------------------------------

def capture(model: torch.nn.Module, example_inputs: Sequence[torch.Tensor]) -> Graph:
    """Export ``model`` (a copy; never mutated) and canonicalise the graph.

    Raises :class:`InputError` when the model does not run on ``example_inputs``
    and :class:`ExportError` when ``torch.export`` cannot capture it.
    """
    example_inputs = check_example_inputs(model, example_inputs)
    was_training = model.training
    try:
        model.eval()
        try:
            with torch.no_grad():
                model(*example_inputs)
        except Exception as exc:
            shapes = ", ".join(str(tuple(x.shape)) for x in example_inputs)
            raise InputError(
                f"{type(model).__name__} does not run on example_inputs of shape(s) {shapes}: "
                f"{_first_line(exc)}; pass inputs shaped as the model expects"
            ) from exc
        try:
            ep = torch.export.export(model, tuple(example_inputs), strict=False)
        except Exception as exc:
            raise ExportError(
                f"torch.export could not capture {type(model).__name__}: {_first_line(exc)}. "
                "Data-dependent control flow (if/while on tensor values) and calls torch cannot "
                "trace must be rewritten (torch.cond, or move them out of forward)"
            ) from exc
    finally:
        model.train(was_training)
    return from_exported(ep)


def check_example_inputs(model: Any, example_inputs: Any) -> tuple[torch.Tensor, ...]:
    """Validate the model and its example inputs; return them as a tuple of float tensors."""
    if not isinstance(model, torch.nn.Module):
        raise InputError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    if not isinstance(example_inputs, (tuple, list)) or not example_inputs:
        raise InputError("example_inputs must be a non-empty tuple of tensors, e.g. (x,)")
    out = []
    for i, x in enumerate(example_inputs):
        if isinstance(x, np.ndarray):
            x = torch.from_numpy(x)
        if not isinstance(x, torch.Tensor):
            raise InputError(f"example_inputs[{i}] is a {type(x).__name__}, not a tensor")
        if not x.is_floating_point():
            raise InputError(f"example_inputs[{i}] has dtype {x.dtype}; edgepack targets take float inputs")
        out.append(x.detach().float())
    return tuple(out)


def from_exported(ep: "torch.export.ExportedProgram") -> Graph:
    """Canonicalise an :class:`torch.export.ExportedProgram` into a :class:`Graph`."""
    sig = ep.graph_signature
    state = {**ep.state_dict, **getattr(ep, "constants", {})}
    lifted = {**sig.inputs_to_parameters, **sig.inputs_to_buffers,
              **getattr(sig, "inputs_to_lifted_tensor_constants", {})}
    consts: dict[str, torch.Tensor] = {}
    values: dict[str, Any] = {}          # fx node name -> value name or python scalar
    inputs: list[tuple[str, tuple[int, ...], str]] = []
    nodes: list[Node] = []
    user_inputs = set(sig.user_inputs)

    for fx in ep.graph.nodes:
        if fx.op == "placeholder":
            if fx.name in lifted:
                consts[fx.name] = state[lifted[fx.name]].detach()
                values[fx.name] = fx.name
            elif fx.name in user_inputs:
                val = fx.meta["val"]
                inputs.append((fx.name, tuple(int(d) for d in val.shape), str(val.dtype).replace("torch.", "")))
                values[fx.name] = fx.name
            continue
        if fx.op == "output":
            outs = fx.args[0]
            outputs = [values[o.name] for o in outs]
            continue
        if fx.op != "call_function":
            continue
        target = fx.target
        tname = _aten_name(target)
        args, kwargs = fx.args, fx.kwargs

        # constant folding: every tensor argument is a constant (masks, reshaped weights, ...)
        tensor_args = [a for a in _flat(args) + _flat(list(kwargs.values())) if isinstance(a, torch.fx.Node)]
        if tensor_args and all(values.get(a.name) in consts for a in tensor_args):
            sub = lambda a: consts[values[a.name]] if isinstance(a, torch.fx.Node) else a  # noqa: E731
            with torch.no_grad():
                res = target(*_map(args, sub), **_map(kwargs, sub))
            if isinstance(res, torch.Tensor):
                consts[fx.name] = res.detach()
                values[fx.name] = fx.name
                continue
        if tname in _IDENTITY:
            values[fx.name] = values[args[0].name]
            continue
        if tname in _SKIP:
            continue
        if tname == "getitem":
            src = args[0]
            values[fx.name] = values[src.name] if args[1] == 0 else f"{src.name}[{args[1]}]"
            continue

        val = fx.meta.get("val")
        shape = tuple(int(d) for d in val.shape) if isinstance(val, torch.Tensor) else ()
        stack = fx.meta.get("nn_module_stack") or {}
        module = list(stack.values())[-1][0] if stack else ""
        ref = lambda a: values[a.name]  # noqa: E731
        canon = _CANON.get(tname)
        node = None
        if canon is not None:
            node = canon(fx.name, args, kwargs, shape, ref, consts, fx)
        if node is None:
            node = Node(fx.name, f"aten.{tname}", [values[a.name] for a in tensor_args], {}, shape,
                        call=(target, _map(args, lambda a: ("$", values[a.name])),
                              _map(kwargs, lambda a: ("$", values[a.name]))))
        node.module, node.source, node.shape = module, str(target), shape
        nodes.append(node)
        values[fx.name] = node.name

    graph = Graph(nodes, inputs, outputs,
                  {k: v.detach().cpu().float().numpy().copy() if v.is_floating_point() else v.cpu().numpy().copy()
                   for k, v in consts.items()})
    return prune_unused_constants(graph)


def prune_unused_constants(graph: Graph) -> Graph:
    used = {i for n in graph.nodes for i in n.inputs} | set(graph.outputs)
    graph.constants = {k: v for k, v in graph.constants.items() if k in used}
    return graph


def fold_batch_norm(graph: Graph) -> Graph:
    """Fold every ``batch_norm`` that follows a ``conv``/``linear`` into its
    weights and bias (exact in float; the BN node disappears)."""
    g = graph.copy()
    removed: set[str] = set()
    for bn in g.nodes:
        if bn.op != "batch_norm":
            continue
        prod = g.node(bn.inputs[0])
        if prod is None or prod.op not in ("conv", "linear") or len(g.users(prod.name)) != 1 \
                or prod.name in g.outputs or not g.is_const(prod.inputs[1]):
            continue
        gamma, beta, mean, var = (g.constants[i] for i in bn.inputs[1:5])
        inv = gamma / np.sqrt(var + bn.attrs["eps"])
        w = g.constants[prod.inputs[1]]
        b = g.constants[prod.inputs[2]] if len(prod.inputs) > 2 else np.zeros(w.shape[0], np.float32)
        w_name = g.unique_name(f"{prod.name}_w_bnfold")
        b_name = g.unique_name(f"{prod.name}_b_bnfold")
        g.constants[w_name] = (w * inv.reshape((-1,) + (1,) * (w.ndim - 1))).astype(np.float32)
        g.constants[b_name] = ((b - mean) * inv + beta).astype(np.float32)
        prod.inputs = [prod.inputs[0], w_name, b_name]
        prod.module = prod.module or bn.module
        # the BN's output name now comes from the conv: rename consumers
        _rename_value(g, bn.name, prod.name)
        removed.add(bn.name)
    g.nodes = [n for n in g.nodes if n.name not in removed]
    return prune_unused_constants(g)


def _rename_value(g: Graph, old: str, new: str) -> None:
    for n in g.nodes:
        n.inputs = [new if i == old else i for i in n.inputs]
    g.outputs = [new if o == old else o for o in g.outputs]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _aten_name(target: Any) -> str:
    if getattr(target, "__name__", "") == "getitem":
        return "getitem"
    name = getattr(target, "_schema", None)
    if name is not None:
        base = target._schema.name.split("::")[-1]
        return f"{base}.{target._overloadname}"
    return getattr(target, "__name__", str(target))


def _flat(xs: Any) -> list:
    out = []
    for x in xs:
        if isinstance(x, (list, tuple)):
            out.extend(_flat(x))
        else:
            out.append(x)
    return out


def _map(obj: Any, fn: Callable) -> Any:
    if isinstance(obj, torch.fx.Node):
        return fn(obj)
    if isinstance(obj, (list, tuple)):
        return type(obj)(_map(o, fn) for o in obj)
    if isinstance(obj, dict):
        return {k: _map(v, fn) for k, v in obj.items()}
    return obj


def _exec_call(node: Node, env: dict, consts: dict) -> torch.Tensor:
    if node.call is None:
        raise KeyError(f"no executor for op {node.op}")
    fn, args, kwargs = node.call

    def sub(o: Any) -> Any:
        if isinstance(o, tuple) and len(o) == 2 and o[0] == "$":
            return env[o[1]] if o[1] in env else consts[o[1]]
        if isinstance(o, (list, tuple)):
            return type(o)(sub(x) for x in o)
        if isinstance(o, dict):
            return {k: sub(v) for k, v in o.items()}
        return o

    return fn(*sub(args), **sub(kwargs))


# ---------------------------------------------------------------------------
# canonicalisation: ATen call -> Node
# ---------------------------------------------------------------------------

_IDENTITY = {"dropout.default", "clone.default", "contiguous.default", "alias.default", "detach.default",
             "feature_dropout.default", "_to_copy.default", "lift_fresh_copy.default", "alpha_dropout.default"}
_SKIP = {"_assert_tensor_metadata.default", "_assert_scalar.default", "sym_constrain_range_for_size.default"}


def _pair(v: Any, n: int = 2) -> tuple[int, ...]:
    if isinstance(v, (list, tuple)):
        v = tuple(int(x) for x in v)
        return v * n if len(v) == 1 else v
    return (int(v),) * n


def _arg(args: tuple, kwargs: dict, i: int, key: str, default: Any) -> Any:
    if len(args) > i:
        return args[i]
    return kwargs.get(key, default)


def _dim(d: int, rank: int) -> int:
    return d + rank if d < 0 else d


def _conv(name, args, kwargs, shape, ref, consts, fx):
    x, w = args[0], args[1]
    b = _arg(args, kwargs, 2, "bias", None)
    k = len(fx.args[1].meta["val"].shape) - 2
    stride = _pair(_arg(args, kwargs, 3, "stride", 1), k)
    padding = _arg(args, kwargs, 4, "padding", 0)
    dilation = _pair(_arg(args, kwargs, 5, "dilation", 1), k)
    groups = int(_arg(args, kwargs, 6, "groups", 1))
    ksize = tuple(fx.args[1].meta["val"].shape[2:])
    if isinstance(padding, str):
        if padding == "valid":
            padding = (0,) * k
        else:  # "same": only symmetric padding is representable as explicit ints
            total = [d * (kk - 1) for d, kk in zip(dilation, ksize)]
            if any(t % 2 for t in total):
                return None
            padding = tuple(t // 2 for t in total)
    inputs = [ref(x), ref(w)] + ([ref(b)] if b is not None else [])
    return Node(name, "conv", inputs, {"stride": stride, "padding": _pair(padding, k), "dilation": dilation,
                                       "groups": groups, "kernel": ksize, "dims": k}, shape)


def _linear(name, args, kwargs, shape, ref, consts, fx):
    b = _arg(args, kwargs, 2, "bias", None)
    return Node(name, "linear", [ref(args[0]), ref(args[1])] + ([ref(b)] if b is not None else []), {}, shape)


def _batch_norm(name, args, kwargs, shape, ref, consts, fx):
    x, w, b, mean, var = args[:5]
    eps = float(args[7]) if len(args) > 7 else float(kwargs.get("eps", 1e-5))
    c = fx.args[0].meta["val"].shape[1]
    inputs = [ref(x)]
    for t, fill in ((w, 1.0), (b, 0.0)):
        if t is None:
            cname = f"{name}_{'weight' if fill else 'bias'}"
            consts[cname] = torch.full((c,), fill)
            inputs.append(cname)
        else:
            inputs.append(ref(t))
    inputs += [ref(mean), ref(var)]
    return Node(name, "batch_norm", inputs, {"eps": eps}, shape)


def _unary(op, **fixed):
    def make(name, args, kwargs, shape, ref, consts, fx):
        return Node(name, op, [ref(args[0])], dict(fixed), shape)
    return make


def _hardtanh(name, args, kwargs, shape, ref, consts, fx):
    lo = float(_arg(args, kwargs, 1, "min_val", -1.0))
    hi = float(_arg(args, kwargs, 2, "max_val", 1.0))
    return Node(name, "hardtanh", [ref(args[0])], {"min": lo, "max": hi}, shape)


def _leaky(name, args, kwargs, shape, ref, consts, fx):
    return Node(name, "leaky_relu", [ref(args[0])], {"slope": float(_arg(args, kwargs, 1, "negative_slope", 0.01))},
                shape)


def _prelu(name, args, kwargs, shape, ref, consts, fx):
    return Node(name, "prelu", [ref(args[0]), ref(args[1])], {}, shape)


def _binary(op):
    def make(name, args, kwargs, shape, ref, consts, fx):
        a, b = args[0], args[1]
        alpha = kwargs.get("alpha", args[2] if len(args) > 2 else 1)
        if not isinstance(a, torch.fx.Node):      # scalar (op) tensor: only commutative ops
            if op not in ("add", "mul"):
                return None
            a, b = b, a
        if isinstance(b, torch.fx.Node):
            if alpha != 1:
                return None
            return Node(name, op, [ref(a), ref(b)], {}, shape)
        scalar = float(b) * float(alpha)
        if op == "div":
            return Node(name, "mul", [ref(a)], {"scalar": 1.0 / scalar}, shape)
        if op == "sub":
            return Node(name, "add", [ref(a)], {"scalar": -scalar}, shape)
        return Node(name, op, [ref(a)], {"scalar": scalar}, shape)
    return make


def _max_pool(name, args, kwargs, shape, ref, consts, fx):
    kernel = _pair(args[1])
    stride = _arg(args, kwargs, 2, "stride", ())
    stride = _pair(stride) if stride else kernel
    return Node(name, "max_pool2d", [ref(args[0])], {
        "kernel": kernel, "stride": stride, "padding": _pair(_arg(args, kwargs, 3, "padding", 0)),
        "dilation": _pair(_arg(args, kwargs, 4, "dilation", 1)),
        "ceil_mode": bool(_arg(args, kwargs, 5, "ceil_mode", False))}, shape)


def _avg_pool(name, args, kwargs, shape, ref, consts, fx):
    kernel = _pair(args[1])
    stride = _arg(args, kwargs, 2, "stride", ())
    stride = _pair(stride) if stride else kernel
    return Node(name, "avg_pool2d", [ref(args[0])], {
        "kernel": kernel, "stride": stride, "padding": _pair(_arg(args, kwargs, 3, "padding", 0)),
        "ceil_mode": bool(_arg(args, kwargs, 4, "ceil_mode", False)),
        "count_include_pad": bool(_arg(args, kwargs, 5, "count_include_pad", True)),
        "divisor_override": _arg(args, kwargs, 6, "divisor_override", None)}, shape)


def _adaptive_avg(name, args, kwargs, shape, ref, consts, fx):
    if tuple(shape[2:]) == (1,) * (len(shape) - 2):
        return Node(name, "mean", [ref(args[0])], {"dims": tuple(range(2, len(shape))), "keepdim": True}, shape)
    return None


def _mean(name, args, kwargs, shape, ref, consts, fx):
    rank = len(fx.args[0].meta["val"].shape)
    dims = _arg(args, kwargs, 1, "dim", None)
    dims = tuple(range(rank)) if dims is None else tuple(sorted(_dim(int(d), rank) for d in _pair(dims, 1)))
    return Node(name, "mean", [ref(args[0])], {"dims": dims, "keepdim": bool(_arg(args, kwargs, 2, "keepdim", False))},
                shape)


def _reshape(name, args, kwargs, shape, ref, consts, fx):
    return Node(name, "reshape", [ref(args[0])], {"shape": shape}, shape)


def _permute(name, args, kwargs, shape, ref, consts, fx):
    rank = len(fx.args[0].meta["val"].shape)
    return Node(name, "permute", [ref(args[0])], {"perm": tuple(_dim(int(d), rank) for d in args[1])}, shape)


def _transpose(name, args, kwargs, shape, ref, consts, fx):
    rank = len(fx.args[0].meta["val"].shape)
    perm = list(range(rank))
    if rank >= 2:
        a = _dim(int(args[1]), rank) if len(args) > 1 else 0
        b = _dim(int(args[2]), rank) if len(args) > 2 else 1
        perm[a], perm[b] = perm[b], perm[a]
    return Node(name, "permute", [ref(args[0])], {"perm": tuple(perm)}, shape)


def _cat(name, args, kwargs, shape, ref, consts, fx):
    dim = _dim(int(_arg(args, kwargs, 1, "dim", 0)), len(shape))
    return Node(name, "cat", [ref(t) for t in args[0]], {"dim": dim}, shape)


def _softmax(name, args, kwargs, shape, ref, consts, fx):
    return Node(name, "softmax", [ref(args[0])], {"dim": _dim(int(args[1]), len(shape))}, shape)


def _pad(name, args, kwargs, shape, ref, consts, fx):
    mode = _arg(args, kwargs, 2, "mode", "constant")
    value = _arg(args, kwargs, 3 if len(args) > 3 or "value" in kwargs else 2, "value", 0.0)
    if mode != "constant":
        return None
    return Node(name, "pad", [ref(args[0])], {"pad": tuple(int(p) for p in args[1]),
                                              "value": float(value or 0.0)}, shape)


def _constant_pad(name, args, kwargs, shape, ref, consts, fx):
    return Node(name, "pad", [ref(args[0])], {"pad": tuple(int(p) for p in args[1]),
                                              "value": float(_arg(args, kwargs, 2, "value", 0.0))}, shape)


def _upsample(name, args, kwargs, shape, ref, consts, fx):
    return Node(name, "upsample_nearest", [ref(args[0])], {"size": tuple(shape[2:])}, shape)


_CANON: dict[str, Callable] = {
    "conv2d.default": _conv, "conv1d.default": _conv, "conv2d.padding": _conv, "conv1d.padding": _conv,
    "linear.default": _linear,
    "batch_norm.default": _batch_norm,
    "relu.default": _unary("relu"), "relu6.default": _unary("hardtanh", min=0.0, max=6.0),
    "hardtanh.default": _hardtanh, "leaky_relu.default": _leaky, "prelu.default": _prelu,
    "sigmoid.default": _unary("sigmoid"), "tanh.default": _unary("tanh"),
    "hardswish.default": _unary("hardswish"), "hardsigmoid.default": _unary("hardsigmoid"),
    "silu.default": _unary("silu"),
    "add.Tensor": _binary("add"), "sub.Tensor": _binary("sub"), "mul.Tensor": _binary("mul"),
    "div.Tensor": _binary("div"),
    "max_pool2d.default": _max_pool, "avg_pool2d.default": _avg_pool,
    "adaptive_avg_pool2d.default": _adaptive_avg, "mean.dim": _mean,
    "view.default": _reshape, "reshape.default": _reshape, "_unsafe_view.default": _reshape,
    "flatten.using_ints": _reshape, "squeeze.dim": _reshape, "squeeze.dims": _reshape,
    "unsqueeze.default": _reshape,
    "permute.default": _permute, "transpose.int": _transpose, "t.default": _transpose,
    "cat.default": _cat, "concat.default": _cat,
    "softmax.int": _softmax, "_softmax.default": _softmax,
    "pad.default": _pad, "constant_pad_nd.default": _constant_pad,
    "upsample_nearest2d.vec": _upsample, "upsample_nearest2d.default": _upsample,
}


# ---------------------------------------------------------------------------
# execution of canonical ops (torch)
# ---------------------------------------------------------------------------

def _x_conv(node, a, batch):
    w, b = a[1], (a[2] if len(a) > 2 else None)
    fn = F.conv2d if node.attrs["dims"] == 2 else F.conv1d
    return fn(a[0], w, b, node.attrs["stride"], node.attrs["padding"], node.attrs["dilation"], node.attrs["groups"])


def _x_reshape(node, a, batch):
    shape = list(node.attrs["shape"])
    if shape and batch is not None and shape[0] == batch:
        shape[0] = a[0].shape[0]
    return a[0].reshape(shape)


def _x_binary(fn):
    def run(node, a, batch):
        other = a[1] if len(a) > 1 else node.attrs["scalar"]
        return fn(a[0], other)
    return run


_EXEC: dict[str, Callable] = {
    "conv": _x_conv,
    "linear": lambda n, a, b: F.linear(a[0], a[1], a[2] if len(a) > 2 else None),
    "batch_norm": lambda n, a, b: F.batch_norm(a[0], a[3], a[4], a[1], a[2], False, 0.0, n.attrs["eps"]),
    "relu": lambda n, a, b: torch.relu(a[0]),
    "hardtanh": lambda n, a, b: torch.clamp(a[0], n.attrs["min"], n.attrs["max"]),
    "leaky_relu": lambda n, a, b: F.leaky_relu(a[0], n.attrs["slope"]),
    "prelu": lambda n, a, b: F.prelu(a[0], a[1]),
    "sigmoid": lambda n, a, b: torch.sigmoid(a[0]),
    "tanh": lambda n, a, b: torch.tanh(a[0]),
    "hardswish": lambda n, a, b: F.hardswish(a[0]),
    "hardsigmoid": lambda n, a, b: F.hardsigmoid(a[0]),
    "silu": lambda n, a, b: F.silu(a[0]),
    "add": _x_binary(torch.add), "sub": _x_binary(torch.sub), "mul": _x_binary(torch.mul),
    "div": _x_binary(torch.div),
    "max_pool2d": lambda n, a, b: F.max_pool2d(a[0], n.attrs["kernel"], n.attrs["stride"], n.attrs["padding"],
                                               n.attrs["dilation"], n.attrs["ceil_mode"]),
    "avg_pool2d": lambda n, a, b: F.avg_pool2d(a[0], n.attrs["kernel"], n.attrs["stride"], n.attrs["padding"],
                                               n.attrs["ceil_mode"], n.attrs["count_include_pad"],
                                               n.attrs["divisor_override"]),
    "mean": lambda n, a, b: a[0].mean(dim=n.attrs["dims"], keepdim=n.attrs["keepdim"]),
    "reshape": _x_reshape,
    "permute": lambda n, a, b: a[0].permute(n.attrs["perm"]),
    "cat": lambda n, a, b: torch.cat(a, n.attrs["dim"]),
    "softmax": lambda n, a, b: torch.softmax(a[0], n.attrs["dim"]),
    "pad": lambda n, a, b: F.pad(a[0], n.attrs["pad"], value=n.attrs["value"]),
    "upsample_nearest": lambda n, a, b: F.interpolate(a[0], size=n.attrs["size"], mode="nearest"),
}

CANONICAL_OPS = frozenset(_EXEC)


def macs(graph: Graph, node: Node) -> int:
    """Multiply-accumulates of one node (conv and linear; 0 for the rest)."""
    if node.op == "conv":
        w = graph.shape(node.inputs[1])
        return int(math.prod(node.shape) * math.prod(w[1:]))
    if node.op == "linear":
        w = graph.shape(node.inputs[1])
        return int(math.prod(node.shape[:-1]) * w[0] * w[1])
    return 0
