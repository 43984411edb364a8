"""The graph every target consumes: captured with ``torch.export``, canonicalised.

:func:`capture` exports a module, folds constants (parameters, buffers, pruning
masks), and maps each ATen call to a small canonical op set with normalised
attributes (``conv``, ``linear``, ``batch_norm``, ``relu``, ``add``, ``slice``,
...).  Models are taken as torchvision and timm write them: in-place ops
(``relu_``, ``out += identity``) become their functional op, every ATen form
of eval batch norm is one ``batch_norm``, ``clamp``/``relu6`` are ``hardtanh``
with their bounds, and chunk/split/unbind/select/narrow become ``slice`` nodes
(plus a ``reshape`` where a dim goes away).  Ops outside that set keep the name
``"aten.<op>"``: targets reject those with :class:`~sdk.errors.UnsupportedOpError`.
Layout stays PyTorch's (NCHW); each target converts at its own boundary.

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


#: canonical ops whose second input is a weight (what quantizers give a weight spec)
WEIGHTED_OPS = ("conv", "linear")


@dataclasses.dataclass
class Graph:
    nodes: list[Node]
    inputs: list[tuple[str, tuple[int, ...], str]]   # (name, shape, dtype)
    outputs: list[str]
    constants: dict[str, np.ndarray]
    #: torch-side stages' hints by weight constant (sdk.encoding.Hint: masks, codebooks, bit widths)
    hints: dict[str, Any] = dataclasses.field(default_factory=dict)

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
                     list(self.inputs), list(self.outputs), dict(self.constants), dict(self.hints))

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
    from .encoding import graph_hints

    graph = from_exported(ep)
    graph.hints = graph_hints(model, graph)
    return graph


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
            if x.dtype.kind != "f":
                raise InputError(f"example_inputs[{i}] is an array of dtype {x.dtype}; edgepack targets take "
                                 "float inputs")
            x = torch.from_numpy(np.ascontiguousarray(x))
        if not isinstance(x, torch.Tensor):
            raise InputError(f"example_inputs[{i}] is a {type(x).__name__}, not a tensor")
        if not x.is_floating_point():
            raise InputError(f"example_inputs[{i}] has dtype {x.dtype}; edgepack targets take float inputs")
        if x.layout != torch.strided or x.device.type == "meta":
            raise InputError(f"example_inputs[{i}] is a {x.layout if x.layout != torch.strided else 'meta'} "
                             "tensor; pass a dense tensor holding real sample values")
        if x.numel() == 0:
            raise InputError(f"example_inputs[{i}] has shape {tuple(x.shape)}: no elements; pass a batch of at "
                             "least one real sample, e.g. x[:1] of shape (1, ...) (the artifact is packed for this "
                             "batch size and stores it as its golden input)")
        x = x.detach().float()
        if not bool(torch.isfinite(x).all()):
            bad = int((~torch.isfinite(x)).sum())
            raise InputError(f"example_inputs[{i}] has {bad} NaN/inf value(s); pass real, finite samples "
                             "(the artifact stores them as its golden input and verifies against them)")
        out.append(x)
    return tuple(out)


def from_exported(ep: "torch.export.ExportedProgram") -> Graph:
    """Canonicalise an :class:`torch.export.ExportedProgram` into a :class:`Graph`.

    In-place ops (``relu_``, ``add_`` from ``out += identity``, ...) become
    their functional op, and later reads of the tensor they overwrote read the
    new node instead.  Where the overwritten tensor shares storage with another
    value still read afterwards (a view of it, or the tensor it views), that
    renaming would be wrong: the program is functionalized by torch first.
    """
    if _aliased_mutation(ep.graph):
        ep = ep.run_decompositions({})
    sig = ep.graph_signature
    state = {**ep.state_dict, **getattr(ep, "constants", {})}
    lifted = {**sig.inputs_to_parameters, **sig.inputs_to_buffers,
              **getattr(sig, "inputs_to_lifted_tensor_constants", {})}
    consts: dict[str, torch.Tensor] = {}
    values: dict[str, Any] = {}          # fx node name -> value name or python scalar
    pieces: dict[str, dict[int, str]] = {}   # multi-output fx node -> {output index: value name}
    versions: dict[str, list[str]] = {}      # fx names holding one tensor that in-place ops rewrote
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
        mutated = _mutated_input(fx)
        if mutated is not None:
            tname = _functional_name(tname)

        # constant folding: every tensor argument is a constant (masks, reshaped weights, ...)
        tensor_args = [a for a in _flat(args) + _flat(list(kwargs.values())) if isinstance(a, torch.fx.Node)]
        if tensor_args and all(values.get(a.name) in consts for a in tensor_args):
            # an in-place op writes its input: give it a copy, never the model's own parameter
            sub = lambda a: (consts[values[a.name]].clone() if a is mutated else consts[values[a.name]]) \
                if isinstance(a, torch.fx.Node) else a  # noqa: E731
            with torch.no_grad():
                res = target(*_map(args, sub), **_map(kwargs, sub))
            if isinstance(res, torch.Tensor):
                consts[fx.name] = res.detach()
                values[fx.name] = fx.name
                if mutated is not None:
                    _rebind(values, versions, mutated.name, fx.name)
                continue
        if tname in _IDENTITY:
            values[fx.name] = values[args[0].name]
            continue
        if tname in _SKIP:
            continue
        if tname == "getitem":
            src, k = args
            known = pieces.get(src.name)
            if known is not None and k in known:
                values[fx.name] = known[k]
            else:  # single-result ops exported as tuples: result 0 is the node itself
                values[fx.name] = values[src.name] if k == 0 else f"{src.name}[{k}]"
            continue

        val = fx.meta.get("val")
        if isinstance(val, (tuple, list)) and val and isinstance(val[0], torch.Tensor):
            val = val[0]             # batch-norm forms return (output, saved statistics...)
        shape = tuple(int(d) for d in val.shape) if isinstance(val, torch.Tensor) else ()
        stack = fx.meta.get("nn_module_stack") or {}
        module = list(stack.values())[-1][0] if stack else ""
        ref = lambda a: values[a.name]  # noqa: E731
        if tname in _SPLITS:
            made, pieces[fx.name] = _split(fx, tname, ref)
            for node in made:
                node.module, node.source = module, str(target)
                nodes.append(node)
            continue
        canon = _CANON.get(tname)
        made = canon(fx.name, args, kwargs, shape, ref, consts, fx) if canon is not None else None
        if made is None:
            made = Node(fx.name, f"aten.{_aten_name(target)}", [values[a.name] for a in tensor_args], {}, shape,
                        call=(target, _map(args, lambda a: ("$", values[a.name])),
                              _map(kwargs, lambda a: ("$", values[a.name]))))
        if isinstance(made, str):       # a no-op in this form (a full slice): its input flows through
            values[fx.name] = made
        else:
            for node in made if isinstance(made, list) else [made]:
                node.module, node.source = module, str(target)
                nodes.append(node)
            node.shape = shape
            values[fx.name] = node.name
        if mutated is not None:
            _rebind(values, versions, mutated.name, fx.name)

    graph = Graph(_live(nodes, outputs), inputs, outputs,
                  {k: v.detach().cpu().float().numpy().copy() if v.is_floating_point() else v.cpu().numpy().copy()
                   for k, v in consts.items()})
    return prune_unused_constants(graph)


def _live(nodes: list[Node], outputs: list[str]) -> list[Node]:
    """``nodes`` without those no output depends on (the unread results of chunk/unbind, say)."""
    needed = set(outputs)
    kept = []
    for node in reversed(nodes):
        if node.name in needed:
            kept.append(node)
            needed.update(node.inputs)
    return kept[::-1]


def _rebind(values: dict, versions: dict, written: str, result: str) -> None:
    """After an in-place op: every earlier name of the tensor it wrote now reads its result."""
    chain = versions.setdefault(written, [written])
    for name in chain:
        values[name] = values[result]
    chain.append(result)
    versions[result] = chain


def _mutated_input(fx: "torch.fx.Node") -> "torch.fx.Node | None":
    """The argument an in-place op overwrites (``Tensor(a!) self``), or None."""
    schema = getattr(fx.target, "_schema", None)
    if schema is None:
        return None
    for i, a in enumerate(schema.arguments):
        if a.alias_info is not None and a.alias_info.is_write:
            v = fx.args[i] if i < len(fx.args) else fx.kwargs.get(a.name)
            return v if isinstance(v, torch.fx.Node) else None
    return None


def _viewed_input(fx: "torch.fx.Node") -> "torch.fx.Node | None":
    """The argument whose storage an op's result shares (``Tensor(a) self -> Tensor(a)``: view, slice,
    transpose, chunk, ...), or None."""
    if fx.op != "call_function":
        return None
    if _aten_name(fx.target) == "getitem":       # one piece of chunk/split/unbind
        src = fx.args[0]
        return src if isinstance(src, torch.fx.Node) and _viewed_input(src) is not None else None
    schema = getattr(fx.target, "_schema", None)
    if schema is None or not schema.returns or schema.returns[0].alias_info is None \
            or schema.returns[0].alias_info.is_write:
        return None
    for i, a in enumerate(schema.arguments):
        if a.alias_info is not None and not a.alias_info.is_write:
            v = fx.args[i] if i < len(fx.args) else fx.kwargs.get(a.name)
            return v if isinstance(v, torch.fx.Node) else None
    return None


def _aliased_mutation(graph: "torch.fx.Graph") -> bool:
    """Whether an in-place op overwrites storage that another value, read after it, shares.

    :func:`from_exported` renames the overwritten tensor (and its earlier
    versions) to the in-place op's result.  That is exact for reads of those
    versions and for views taken of the result, but not for another value of
    the same storage taken before the write and read after it: a view of the
    tensor (``v = x.view(...); x.relu_(); v + 1``), the tensor a written view
    belongs to (``x[:, :8].relu_(); x + 1``), or another view of that one.
    """
    order = {n: i for i, n in enumerate(graph.nodes)}
    parent: dict = {}            # value -> the value whose storage it shares (the one it overwrote or views)
    writes: list = []
    for n in graph.nodes:
        m = _mutated_input(n) if n.op == "call_function" else None
        if m is not None:
            parent[n] = m
            writes.append(n)
            continue
        v = _viewed_input(n)
        if v is not None:
            parent[n] = v
    written = set(writes)

    def ancestors(n):
        out = [n]
        while out[-1] in parent:
            out.append(parent[out[-1]])
        return out

    def head(n):                 # the first version of a tensor that in-place ops rewrote
        while n in written:
            n = parent[n]
        return n

    group: dict = {}
    for n in graph.nodes:
        group.setdefault(ancestors(n)[-1], []).append(n)
    for w in writes:
        tensor = head(w)
        for other in group[ancestors(w)[-1]]:
            if head(other) is tensor or w in ancestors(other):
                continue
            if any(order[u] > order[w] for u in other.users):
                return True
    return False


def _functional_name(tname: str) -> str:
    """``relu_.default`` -> ``relu.default``: the out-of-place op an in-place one computes."""
    base, _, overload = tname.partition(".")
    return f"{base[:-1]}.{overload}" if base.endswith("_") else tname


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
        old_w = prod.inputs[1]
        hint = g.hints.get(old_w)
        if hint is not None:       # each output channel is scaled: shared values now differ per channel
            g.hints[w_name] = dataclasses.replace(hint, per_channel=True) if hint.codebook or hint.bits else hint
        prod.inputs = [prod.inputs[0], w_name, b_name]
        if hint is not None and not any(old_w in n.inputs for n in g.nodes):     # a weight shared by two convs
            del g.hints[old_w]
        prod.module = prod.module or bn.module
        # the BN's output name now comes from the conv: rename consumers
        _rename_value(g, bn.name, prod.name)
        removed.add(bn.name)
    g.nodes = [n for n in g.nodes if n.name not in removed]
    return prune_unused_constants(g)


def batch_norm_as_conv(graph: Graph) -> Graph:
    """Rewrite each ``batch_norm`` :func:`fold_batch_norm` left (one that does not
    follow a conv or linear, as DenseNet's pre-activation BN) as the per-channel
    affine map it is in eval mode: a depthwise 1×1 ``conv`` (``conv1d`` for
    ``(N, C, L)``; ``(N, C)`` is reshaped to ``(N, C, 1)`` around it).  A target
    then lowers it with its conv kernel, int8 per-channel weights included, and
    a following ReLU fuses into it.  The conv keeps the BN's name, so plans and
    analyses keyed by node name still find it; other ranks are left alone."""
    g = graph.copy()
    nodes: list[Node] = []
    for bn in g.nodes:
        rank = len(bn.shape)
        if bn.op != "batch_norm" or rank not in (2, 3, 4) or not all(g.is_const(i) for i in bn.inputs[1:5]):
            nodes.append(bn)
            continue
        gamma, beta, mean, var = (g.constants[i].astype(np.float64) for i in bn.inputs[1:5])
        scale = gamma / np.sqrt(var + bn.attrs["eps"])
        c, dims = bn.shape[1], 2 if rank == 4 else 1
        w_name, b_name = g.unique_name(f"{bn.name}_scale"), g.unique_name(f"{bn.name}_shift")
        g.constants[w_name] = scale.reshape((c, 1) + (1,) * dims).astype(np.float32)
        g.constants[b_name] = (beta - mean * scale).astype(np.float32)
        attrs = {"stride": (1,) * dims, "padding": (0,) * dims, "dilation": (1,) * dims, "groups": c,
                 "kernel": (1,) * dims, "dims": dims}
        meta = {"module": bn.module, "source": bn.source}
        if rank == 2:
            wide = bn.shape + (1,)
            pre = Node(g.unique_name(f"{bn.name}_as3d"), "reshape", [bn.inputs[0]], {"shape": wide}, wide, **meta)
            conv = Node(g.unique_name(f"{bn.name}_conv"), "conv", [pre.name, w_name, b_name], attrs, wide, **meta)
            nodes += [pre, conv, Node(bn.name, "reshape", [conv.name], {"shape": bn.shape}, bn.shape, **meta)]
        else:
            nodes.append(Node(bn.name, "conv", [bn.inputs[0], w_name, b_name], attrs, bn.shape, **meta))
    g.nodes = nodes
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
             "feature_dropout.default", "_to_copy.default", "lift_fresh_copy.default", "alpha_dropout.default",
             "feature_alpha_dropout.default"}
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


def _batch_norm(training_at: int | None, eps_at: int):
    """Every ATen form of eval-mode batch norm: ``batch_norm`` (training IR),
    ``_native_batch_norm_legit_no_training`` (functionalized programs),
    ``native_batch_norm``; they differ in where ``training`` and ``eps`` sit.
    Batch statistics (``training=True``, or no running statistics) stay unsupported."""

    def make(name, args, kwargs, shape, ref, consts, fx):
        x, w, b, mean, var = args[:5]
        training = training_at is not None and bool(_arg(args, kwargs, training_at, "training", False))
        if training or mean is None or var is None:
            return None
        eps = float(_arg(args, kwargs, eps_at, "eps", 1e-5))
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
    return make


def _unary(op, **fixed):
    def make(name, args, kwargs, shape, ref, consts, fx):
        return Node(name, op, [ref(args[0])], dict(fixed), shape)
    return make


def _hardtanh(name, args, kwargs, shape, ref, consts, fx):
    lo = float(_arg(args, kwargs, 1, "min_val", -1.0))
    hi = float(_arg(args, kwargs, 2, "max_val", 1.0))
    return Node(name, "hardtanh", [ref(args[0])], {"min": lo, "max": hi}, shape)


def _clamp(lo_at: int | None, hi_at: int | None):
    """``clamp`` / ``clamp_min`` / ``clamp_max`` with number bounds: ``hardtanh``
    with a missing bound at ±inf (tensor bounds stay unsupported)."""

    def make(name, args, kwargs, shape, ref, consts, fx):
        lo = _arg(args, kwargs, lo_at, "min", None) if lo_at is not None else None
        hi = _arg(args, kwargs, hi_at, "max", None) if hi_at is not None else None
        if isinstance(lo, torch.fx.Node) or isinstance(hi, torch.fx.Node):
            return None
        return Node(name, "hardtanh", [ref(args[0])], {"min": -math.inf if lo is None else float(lo),
                                                       "max": math.inf if hi is None else float(hi)}, shape)
    return make


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
    """Global pooling is a ``mean``; output sizes that divide the input are a plain average pool."""
    if tuple(shape[2:]) == (1,) * (len(shape) - 2):
        return Node(name, "mean", [ref(args[0])], {"dims": tuple(range(2, len(shape))), "keepdim": True}, shape)
    in_hw = tuple(int(d) for d in fx.args[0].meta["val"].shape[2:])
    if len(in_hw) == 2 and all(i % o == 0 for i, o in zip(in_hw, shape[2:])):
        k = tuple(i // o for i, o in zip(in_hw, shape[2:]))
        return Node(name, "avg_pool2d", [ref(args[0])], {"kernel": k, "stride": k, "padding": (0, 0),
                                                         "ceil_mode": False, "count_include_pad": True,
                                                         "divisor_override": None}, shape)
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
    if len(args[0]) == 1:              # torch.cat([x]): x (DenseNet starts each block so)
        return ref(args[0][0])
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


def _layer_norm(name, args, kwargs, shape, ref, consts, fx):
    """``layer_norm`` / ``native_layer_norm`` over the last ``len(normalized_shape)`` dims; a
    missing weight or bias becomes a constant of ones or zeros."""
    normalized = tuple(int(d) for d in args[1])
    inputs = [ref(args[0])]
    for i, key, fill in ((2, "weight", 1.0), (3, "bias", 0.0)):
        t = _arg(args, kwargs, i, key, None)
        if t is None:
            cname = f"{name}_{key}"
            consts[cname] = torch.full(normalized, fill)
            inputs.append(cname)
        else:
            inputs.append(ref(t))
    return Node(name, "layer_norm", inputs, {"dims": len(normalized),
                                             "eps": float(_arg(args, kwargs, 4, "eps", 1e-5))}, shape)


def _gelu(name, args, kwargs, shape, ref, consts, fx):
    approximate = _arg(args, kwargs, 1, "approximate", "none")
    return Node(name, "gelu", [ref(args[0])], {"approximate": str(approximate)}, shape)


def _attention(name, args, kwargs, shape, ref, consts, fx):
    """``scaled_dot_product_attention`` (eval: no dropout): softmax(q·kᵀ·scale + mask)·v.  A
    causal flag becomes a constant additive mask; a boolean mask becomes 0 / -inf."""
    q, k, v = args[:3]
    mask = _arg(args, kwargs, 3, "attn_mask", None)
    causal = bool(_arg(args, kwargs, 5, "is_causal", False))
    scale = _arg(args, kwargs, 6, "scale", None)
    if _arg(args, kwargs, 7, "enable_gqa", False):
        return None
    qs, ks = (tuple(int(d) for d in a.meta["val"].shape) for a in (q, k))
    if len(qs) < 2 or qs[:-2] != ks[:-2]:
        return None            # grouped-query attention (fewer key heads) stays unsupported
    inputs = [ref(q), ref(k), ref(v)]
    if isinstance(mask, torch.fx.Node) and ref(mask) not in consts:
        if causal:
            return None
        inputs.append(ref(mask))      # computed at run time: the targets refuse it with their hint
    elif mask is not None or causal:
        n, m = qs[-2], ks[-2]
        additive = torch.zeros(n, m)
        if causal:
            additive = additive.masked_fill(~torch.ones(n, m, dtype=torch.bool).tril(), -math.inf)
        if mask is not None:
            if not isinstance(mask, torch.fx.Node):
                return None
            given = consts[ref(mask)]
            given = torch.zeros(given.shape).masked_fill(~given, -math.inf) if given.dtype == torch.bool \
                else given.float()
            additive = additive + given
        cname = f"{name}_mask"
        consts[cname] = additive
        inputs.append(cname)
    e = qs[-1]
    return Node(name, "attention", inputs, {"scale": float(scale) if scale is not None else 1.0 / math.sqrt(e)},
                shape)


def _matmul(name, args, kwargs, shape, ref, consts, fx):
    """``matmul`` / ``bmm``: a ``linear`` when the right operand is a 2-D constant, else a
    ``matmul`` of two activations (rank >= 2 both)."""
    a, b = args[0], args[1]
    ra, rb = (len(t.meta["val"].shape) for t in (a, b))
    if ra < 2 or rb < 2:
        return None
    if ref(b) in consts and rb == 2:
        cname = f"{name}_weight"
        consts[cname] = consts[ref(b)].t().contiguous()
        return Node(name, "linear", [ref(a), cname], {}, shape)
    return Node(name, "matmul", [ref(a), ref(b)], {}, shape)


def _upsample_bilinear(name, args, kwargs, shape, ref, consts, fx):
    align = bool(_arg(args, kwargs, 2, "align_corners", False))
    return Node(name, "upsample_bilinear", [ref(args[0])], {"size": tuple(shape[2:]), "align_corners": align},
                shape)


def _in_shape(fx) -> tuple[int, ...]:
    return tuple(int(d) for d in fx.args[0].meta["val"].shape)


def _slice_node(name, x: str, in_shape, dim: int, start: int, end: int, step: int = 1) -> Node | str:
    """``x[..., start:end:step, ...]`` along ``dim`` (``x`` itself when that is all of it)."""
    if (start, end, step) == (0, in_shape[dim], 1):
        return x
    shape = list(in_shape)
    shape[dim] = len(range(start, end, step))
    return Node(name, "slice", [x], {"dim": dim, "start": start, "end": end, "step": step}, tuple(shape))


def _slice(name, args, kwargs, shape, ref, consts, fx):
    in_shape = _in_shape(fx)
    dim = _dim(int(_arg(args, kwargs, 1, "dim", 0)), len(in_shape))
    step = int(_arg(args, kwargs, 4, "step", 1))
    start, end, _ = slice(_arg(args, kwargs, 2, "start", None), _arg(args, kwargs, 3, "end", None), step) \
        .indices(in_shape[dim])      # torch clamps and wraps slice bounds as Python does
    return _slice_node(name, ref(args[0]), in_shape, dim, start, max(end, start), step)


def _narrow(name, args, kwargs, shape, ref, consts, fx):
    in_shape = _in_shape(fx)
    dim = _dim(int(args[1]), len(in_shape))
    start = int(args[2]) % in_shape[dim] if int(args[2]) < 0 else int(args[2])
    return _slice_node(name, ref(args[0]), in_shape, dim, start, start + int(args[3]))


def _select(name, args, kwargs, shape, ref, consts, fx):
    """``x.select(dim, i)`` = a one-wide slice, then a reshape that drops ``dim``."""
    in_shape = _in_shape(fx)
    dim = _dim(int(args[1]), len(in_shape))
    i = int(args[2]) % in_shape[dim]
    part = _slice_node(f"{name}/slice", ref(args[0]), in_shape, dim, i, i + 1)
    squeeze = Node(name, "reshape", [part if isinstance(part, str) else part.name], {"shape": shape}, shape)
    return [squeeze] if isinstance(part, str) else [part, squeeze]


#: ops with several results, all views of one input: (args index of ``dim``, how the input is cut)
_SPLITS = {"chunk.default", "unsafe_chunk.default", "split.Tensor", "unsafe_split.Tensor", "split.sizes",
           "split_with_sizes.default", "unsafe_split_with_sizes.default", "unbind.int"}


def _split(fx, tname: str, ref) -> tuple[list[Node], dict[int, str]]:
    """chunk / split / unbind: one ``slice`` per result the program reads (plus a reshape that
    drops the dim for ``unbind``).  Returns the nodes and ``{result index: value name}``."""
    in_shape = _in_shape(fx)
    base = tname.split(".")[0]
    dim = _dim(int(_arg(fx.args, fx.kwargs, 1 if base == "unbind" else 2, "dim", 0)), len(in_shape))
    size = in_shape[dim]
    if base == "unbind":
        sizes = [1] * size
    elif base.endswith("chunk"):
        step = -(-size // int(fx.args[1]))
        sizes = [min(step, size - s) for s in range(0, size, step)]
    elif isinstance(fx.args[1], (list, tuple)):
        sizes = [int(v) for v in fx.args[1]]
    else:
        step = int(fx.args[1])
        sizes = [min(step, size - s) for s in range(0, size, step)]
    starts = np.cumsum([0] + sizes[:-1]).tolist()
    made: list[Node] = []
    names: dict[int, str] = {}
    for user in fx.users:
        k = user.args[1]
        piece = _slice_node(user.name if base != "unbind" else f"{user.name}/slice", ref(fx.args[0]), in_shape,
                            dim, starts[k], starts[k] + sizes[k])
        if not isinstance(piece, str):
            made.append(piece)
            piece = piece.name
        if base == "unbind":
            shape = tuple(int(d) for d in user.meta["val"].shape)
            made.append(Node(user.name, "reshape", [piece], {"shape": shape}, shape))
            piece = user.name
        names[k] = piece
    return made, names


def _unflatten(name, args, kwargs, shape, ref, consts, fx):
    return Node(name, "reshape", [ref(args[0])], {"shape": shape}, shape)


_CANON: dict[str, Callable] = {
    "conv2d.default": _conv, "conv1d.default": _conv, "conv2d.padding": _conv, "conv1d.padding": _conv,
    "linear.default": _linear,
    "batch_norm.default": _batch_norm(5, 7), "native_batch_norm.default": _batch_norm(5, 7),
    "_native_batch_norm_legit.default": _batch_norm(5, 7),
    "_native_batch_norm_legit_no_training.default": _batch_norm(None, 6),
    "relu.default": _unary("relu"), "relu6.default": _unary("hardtanh", min=0.0, max=6.0),
    "hardtanh.default": _hardtanh, "clamp.default": _clamp(1, 2), "clamp_min.default": _clamp(1, None),
    "clamp_max.default": _clamp(None, 1), "leaky_relu.default": _leaky, "prelu.default": _prelu,
    "sigmoid.default": _unary("sigmoid"), "tanh.default": _unary("tanh"),
    "hardswish.default": _unary("hardswish"), "hardsigmoid.default": _unary("hardsigmoid"),
    "silu.default": _unary("silu"),
    "add.Tensor": _binary("add"), "sub.Tensor": _binary("sub"), "mul.Tensor": _binary("mul"),
    "div.Tensor": _binary("div"), "add.Scalar": _binary("add"), "sub.Scalar": _binary("sub"),
    "mul.Scalar": _binary("mul"), "div.Scalar": _binary("div"),
    "max_pool2d.default": _max_pool, "avg_pool2d.default": _avg_pool,
    "adaptive_avg_pool2d.default": _adaptive_avg, "_adaptive_avg_pool2d.default": _adaptive_avg,
    "mean.dim": _mean,
    "view.default": _reshape, "reshape.default": _reshape, "_unsafe_view.default": _reshape,
    "flatten.using_ints": _reshape, "squeeze.dim": _reshape, "squeeze.dims": _reshape,
    "unsqueeze.default": _reshape, "unflatten.int": _unflatten,
    "slice.Tensor": _slice, "narrow.default": _narrow, "select.int": _select,
    "permute.default": _permute, "transpose.int": _transpose, "t.default": _transpose,
    "cat.default": _cat, "concat.default": _cat,
    "softmax.int": _softmax, "_softmax.default": _softmax,
    "pad.default": _pad, "constant_pad_nd.default": _constant_pad,
    "upsample_nearest2d.vec": _upsample, "upsample_nearest2d.default": _upsample,
    "upsample_bilinear2d.vec": _upsample_bilinear, "upsample_bilinear2d.default": _upsample_bilinear,
    "layer_norm.default": _layer_norm, "native_layer_norm.default": _layer_norm, "gelu.default": _gelu,
    "scaled_dot_product_attention.default": _attention, "matmul.default": _matmul, "bmm.default": _matmul,
}


# ---------------------------------------------------------------------------
# execution of canonical ops (torch)
# ---------------------------------------------------------------------------

def _x_conv(node, a, batch):
    w, b = a[1], (a[2] if len(a) > 2 else None)
    fn = F.conv2d if node.attrs["dims"] == 2 else F.conv1d
    return fn(a[0], w, b, node.attrs["stride"], node.attrs["padding"], node.attrs["dilation"], node.attrs["groups"])


def _x_reshape(node, a, batch):
    """The captured shape; when the run's batch size differs from the captured one, the leading dim
    (which holds the batch, maybe folded with others: MobileViT's ``B·C·n_h``) is inferred."""
    shape = list(node.attrs["shape"])
    if shape and a[0].numel() != math.prod(shape):
        shape[0] = -1
    return a[0].reshape(shape)


def _x_binary(fn):
    def run(node, a, batch):
        other = a[1] if len(a) > 1 else node.attrs["scalar"]
        return fn(a[0], other)
    return run


def _x_slice(node, a, batch):
    index = [slice(None)] * a[0].dim()
    index[node.attrs["dim"]] = slice(node.attrs["start"], node.attrs["end"], node.attrs["step"])
    return a[0][tuple(index)]


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
    "slice": _x_slice,
    "permute": lambda n, a, b: a[0].permute(n.attrs["perm"]),
    "cat": lambda n, a, b: torch.cat(a, n.attrs["dim"]),
    "softmax": lambda n, a, b: torch.softmax(a[0], n.attrs["dim"]),
    "pad": lambda n, a, b: F.pad(a[0], n.attrs["pad"], value=n.attrs["value"]),
    "upsample_nearest": lambda n, a, b: F.interpolate(a[0], size=n.attrs["size"], mode="nearest"),
    "upsample_bilinear": lambda n, a, b: F.interpolate(a[0], size=n.attrs["size"], mode="bilinear",
                                                       align_corners=n.attrs["align_corners"]),
    "layer_norm": lambda n, a, b: F.layer_norm(a[0], a[1].shape, a[1], a[2], n.attrs["eps"]),
    "gelu": lambda n, a, b: F.gelu(a[0], approximate=n.attrs["approximate"]),
    "attention": lambda n, a, b: F.scaled_dot_product_attention(a[0], a[1], a[2], a[3] if len(a) > 3 else None,
                                                                scale=n.attrs["scale"]),
    "matmul": lambda n, a, b: torch.matmul(a[0], a[1]),
}

CANONICAL_OPS = frozenset(_EXEC)


def macs(graph: Graph, node: Node) -> int:
    """Multiply-accumulates of one node (conv, linear, matmul, attention; 0 for the rest)."""
    if node.op == "conv":
        w = graph.shape(node.inputs[1])
        return int(math.prod(node.shape) * math.prod(w[1:]))
    if node.op == "linear":
        w = graph.shape(node.inputs[1])
        return int(math.prod(node.shape[:-1]) * w[0] * w[1])
    if node.op == "matmul":
        return int(math.prod(node.shape) * graph.shape(node.inputs[0])[-1])
    if node.op == "attention":      # q·kᵀ and p·v
        q, k = graph.shape(node.inputs[0]), graph.shape(node.inputs[1])
        return int(math.prod(q[:-1]) * k[-2] * (q[-1] + node.shape[-1]))
    return 0
