"""Channel coupling groups and physical channel removal for structured pruning.

Removing output channel ``c`` of a convolution is only half the job: every
layer that reads those channels must lose the matching slice too.  This module
finds those couplings by tracing the model (``torch.fx.symbolic_trace`` plus
shape propagation on an example input), the idea behind Torch-Pruning's
dependency graph, written from scratch for the op set of the model zoo:

* a ``Conv1d``/``Conv2d``/``Linear`` *produces* a fresh set of channels (its
  output channels, weight dim 0 and bias: role ``"out"``) and *consumes* its
  input channels (weight dim 1: role ``"in"``);
* ``BatchNorm`` (role ``"norm"``) and depthwise convolutions (``groups ==
  in_channels == out_channels``, role ``"depthwise"``) carry their input's
  channels through unchanged, so they shrink with the producer;
* element-wise ops, activations, pooling, dropout and spatial reductions pass
  channels through; a flatten turns channel ``c`` of a ``C×H×W`` tensor into
  the ``H·W`` features ``c·H·W … c·H·W + H·W − 1`` (slice ``repeat = H·W``);
* a residual ``add`` (or ``mul``, as in squeeze-excitation) of two channel
  tensors ties their channels into one group; ``cat`` along the channel dim
  lays groups side by side (slice ``offset``).

Each :class:`ChannelGroup` lists every ``(module, role, offset, repeat)`` slice
that must lose the same channel indices.  Groups touching the model's inputs
or outputs are *fixed* (the classifier never loses outputs).  Patterns outside
this set (grouped convs that are not depthwise, transposed convs, reshapes
that mix channels, ...) raise :class:`ChannelDependencyError`, a subclass of
:class:`~sdk.errors.UnsupportedOpError`, naming the node.

:func:`remove_channels` then builds smaller ``nn.Conv*``/``nn.BatchNorm*``/
``nn.Linear`` modules holding the kept weights and swaps them into the model.

>>> import torch
>>> net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
...                           torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 2))
>>> groups = [g for g in channel_groups(net, (torch.randn(1, 1, 8, 8),)) if g.prunable]
>>> [(s.module, s.role, s.repeat) for s in groups[0].slices]
[('0', 'out', 1), ('1', 'norm', 1), ('4', 'in', 36)]
>>> net = remove_channels(net, {groups[0]: [1, 3]})
>>> net[0].out_channels, net[1].num_features, net[4].in_features
(2, 2, 72)
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Iterable, Mapping, Sequence

import torch
from torch import nn

from .errors import ConfigError, InputError, UnsupportedOpError

class ChannelDependencyError(UnsupportedOpError):
    """A model pattern whose channel dependencies channel pruning cannot follow.

    Attributes as :class:`UnsupportedOpError`: ``op``, ``node``, ``hint``;
    ``target`` is ``"channel-pruning"``.
    """

    def __init__(self, op: str, node: str, hint: str = ""):
        self.op, self.node, self.target, self.hint = op, node, "channel-pruning", hint
        msg = f"channel pruning cannot follow {op} (node {node!r})"
        Exception.__init__(self, msg + (f": {hint}" if hint else ""))


@dataclasses.dataclass(frozen=True)
class ChannelSlice:
    """One module's share of a group: ``role`` says which dimension shrinks.

    ``"out"``/``"norm"``/``"depthwise"``: channels ``offset + c`` of the
    module's output (weight dim 0, bias, BN statistics).  ``"in"``: input
    features ``offset + c·repeat … offset + c·repeat + repeat − 1`` (weight
    dim 1).
    """

    module: str
    role: str
    offset: int = 0
    repeat: int = 1


@dataclasses.dataclass(frozen=True)
class ChannelGroup:
    """Slices that must lose the same channel indices ``0 … channels − 1``."""

    channels: int
    slices: tuple[ChannelSlice, ...]
    fixed: str = ""          # why the group may not lose channels; "" when it may

    @property
    def prunable(self) -> bool:
        return not self.fixed

    def of_role(self, *roles: str) -> list[ChannelSlice]:
        """The slices with one of ``roles``."""
        return [s for s in self.slices if s.role in roles]

    @property
    def modules(self) -> tuple[str, ...]:
        """Names of the modules the group touches, in slice order."""
        return tuple(dict.fromkeys(s.module for s in self.slices))


# -- tracing -----------------------------------------------------------------

_PASS_MODULES = (nn.ReLU, nn.ReLU6, nn.Hardtanh, nn.LeakyReLU, nn.Sigmoid, nn.Tanh, nn.GELU, nn.SiLU, nn.ELU,
                 nn.Hardswish, nn.Hardsigmoid, nn.Mish, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Identity,
                 nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d,
                 nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.ZeroPad2d)
# functions/methods that keep dims 0 and 1 (checked on the traced shapes)
_PASS_OPS = {"relu", "relu_", "relu6", "hardtanh", "leaky_relu", "sigmoid", "tanh", "gelu", "silu", "elu", "mish",
             "hardswish", "hardsigmoid", "dropout", "dropout1d", "dropout2d", "clamp", "clip", "contiguous", "clone",
             "max_pool1d", "max_pool2d", "avg_pool1d", "avg_pool2d", "adaptive_avg_pool1d", "adaptive_avg_pool2d",
             "adaptive_max_pool2d", "pad", "squeeze", "unsqueeze", "abs", "neg", "float", "to"}
_REDUCE_OPS = {"mean", "sum", "amax", "amin"}
_FLATTEN_OPS = {"flatten", "view", "reshape"}
_BINARY_OPS = {"add", "iadd", "add_", "sub", "isub", "sub_", "mul", "imul", "mul_", "truediv", "div", "div_"}
_CAT_OPS = {"cat", "concat", "concatenate"}
_META_OPS = {"size", "dim", "getattr", "numel"}


@dataclasses.dataclass(frozen=True)
class _Seg:
    space: int         # union-find id of a channel set
    channels: int
    repeat: int        # features per channel along dim 1 (after a flatten)


_CONST = "const"       # a tensor with no tracked channels (a buffer, torch.zeros, ...)


class _Tracer:
    """Walks the fx graph once, assigning each tensor's dim 1 a layout of channel segments."""

    def __init__(self, gm: torch.fx.GraphModule):
        self.gm = gm
        self.parent: list[int] = []
        self.size: list[int] = []
        self.slices: list[tuple[int, ChannelSlice]] = []
        self.fixed: dict[int, str] = {}
        self.layout: dict[torch.fx.Node, Any] = {}
        self.called: set[str] = set()

    # union-find over channel sets
    def new(self, channels: int) -> int:
        self.parent.append(len(self.parent))
        self.size.append(channels)
        return len(self.parent) - 1

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, a: int, b: int) -> None:
        a, b = self.find(a), self.find(b)
        if a != b:
            self.parent[max(a, b)] = min(a, b)

    def run(self) -> list[ChannelGroup]:
        for node in self.gm.graph.nodes:
            self.layout[node] = self.visit(node)
        return self.groups()

    def groups(self) -> list[ChannelGroup]:
        by_root: dict[int, list[ChannelSlice]] = {}
        for space in range(len(self.parent)):
            by_root.setdefault(self.find(space), [])
        for space, sl in self.slices:
            by_root[self.find(space)].append(sl)
        fixed: dict[int, str] = {}
        for space, why in self.fixed.items():
            fixed.setdefault(self.find(space), why)
        out = []
        for root in sorted(by_root):
            slices = tuple(by_root[root])
            why = fixed.get(root, "")
            if not why and not any(s.role == "out" for s in slices):
                why = "no conv or linear layer produces these channels"
            if slices:
                out.append(ChannelGroup(self.size[root], slices, why))
        return out

    # per node -------------------------------------------------------------
    def visit(self, node: torch.fx.Node) -> Any:
        shape = _shape(node)
        if node.op == "placeholder":
            if shape is None or len(shape) < 2:
                return None
            space = self.new(shape[1])
            self.fixed[space] = "model input channels"
            return (_Seg(space, shape[1], 1),)
        if node.op == "get_attr":
            return _CONST if shape is not None else None
        if node.op == "output":
            for lay in _flat([self.layout.get(a) for a in node.all_input_nodes]):
                for seg in lay:
                    self.fixed[seg.space] = "feeds the model output"
            return None
        if node.op == "call_module":
            return self.visit_module(node, shape)
        return self.visit_op(node, shape)

    def tracked(self, node: torch.fx.Node) -> list:
        """Layouts with channels among the node's tensor inputs."""
        return [self.layout[a] for a in node.all_input_nodes if isinstance(self.layout.get(a), tuple)]

    def visit_module(self, node: torch.fx.Node, shape) -> Any:
        name = node.target
        mod = self.gm.get_submodule(name)
        inp = node.args[0] if node.args else None
        lay = self.layout.get(inp) if isinstance(inp, torch.fx.Node) else None
        if isinstance(mod, (nn.Conv1d, nn.Conv2d, nn.Linear, nn.BatchNorm1d, nn.BatchNorm2d)):
            if name in self.called:
                raise ChannelDependencyError(f"{type(mod).__name__} {name!r} called twice", node.name,
                                             "shared layers are not supported; give each call its own module")
            self.called.add(name)
            if torch.nn.utils.parametrize.is_parametrized(mod):
                raise ChannelDependencyError(f"parametrized module {name!r}", node.name,
                                             "bake pruning masks first (sdk.masks.bake), or run structured "
                                             "pruning before unstructured stages")
            if not isinstance(lay, tuple):
                raise ChannelDependencyError(f"{type(mod).__name__} on an untracked input", node.name)
        if isinstance(mod, (nn.Conv1d, nn.Conv2d)):
            return self.conv(node, name, mod, lay, shape)
        if isinstance(mod, nn.Linear):
            if len(_shape(inp)) != 2:
                raise ChannelDependencyError(f"Linear {name!r} on a rank-{len(_shape(inp))} input", node.name,
                                             "only (batch, features) inputs to Linear are supported")
            self.consume(name, lay)
            return (self.produce(name, shape[1]),)
        if isinstance(mod, (nn.BatchNorm1d, nn.BatchNorm2d)):
            self.follow(name, "norm", lay, node)
            return lay
        if not isinstance(lay, tuple):
            return _CONST if shape is not None else None
        if isinstance(mod, nn.Flatten):
            return self.flatten(node, lay, shape)
        if isinstance(mod, _PASS_MODULES):
            return self.passthrough(node, lay, shape)
        return self.unknown(node, f"module {type(mod).__name__} {name!r}")

    def conv(self, node, name: str, mod: nn.Module, lay, shape) -> Any:
        if mod.groups == 1:
            self.consume(name, lay)
            return (self.produce(name, shape[1]),)
        if mod.groups == mod.in_channels == mod.out_channels:
            self.follow(name, "depthwise", lay, node)
            return lay
        raise ChannelDependencyError(
            f"grouped conv {name!r} (groups={mod.groups}, in={mod.in_channels}, out={mod.out_channels})",
            node.name, "only plain (groups=1) and depthwise (groups == in == out channels) convolutions "
            "can lose channels; exclude the model or replace the grouped conv")

    def produce(self, name: str, channels: int) -> _Seg:
        space = self.new(channels)
        self.slices.append((space, ChannelSlice(name, "out")))
        return _Seg(space, channels, 1)

    def consume(self, name: str, lay) -> None:
        offset = 0
        for seg in lay:
            self.slices.append((seg.space, ChannelSlice(name, "in", offset, seg.repeat)))
            offset += seg.channels * seg.repeat

    def follow(self, name: str, role: str, lay, node) -> None:
        offset = 0
        for seg in lay:
            if seg.repeat != 1:
                raise ChannelDependencyError(f"{role} layer {name!r} after a flatten", node.name)
            self.slices.append((seg.space, ChannelSlice(name, role, offset)))
            offset += seg.channels

    def visit_op(self, node: torch.fx.Node, shape) -> Any:
        op = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
        ins = self.tracked(node)
        if not ins:
            # nothing with channels flows in: a constant, a shape, torch.zeros(...)
            return _CONST if shape is not None else None
        first = node.args[0] if node.args else None
        lay = self.layout.get(first) if isinstance(first, torch.fx.Node) else None
        if op in _META_OPS and shape is None:
            return None
        if op in _BINARY_OPS:
            return self.binary(node, op, shape)
        if op in _CAT_OPS:
            return self.cat(node, shape)
        if not isinstance(lay, tuple):
            return self.unknown(node, f"{op}")
        if op in _FLATTEN_OPS:
            return self.flatten(node, lay, shape)
        if op in _REDUCE_OPS:
            dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
            rank = len(_shape(first))
            dims = [dims] if isinstance(dims, int) else list(dims or [])
            if dims and all(d % rank >= 2 for d in dims):
                return lay
            return self.unknown(node, f"{op} over dims {dims}")
        if op in _PASS_OPS or (op == "getitem" and _keeps_batch_and_channels(node.args[1])):
            return self.passthrough(node, lay, shape)
        return self.unknown(node, op)

    def passthrough(self, node, lay, shape) -> Any:
        src = _shape(node.args[0])
        if shape is not None and src is not None and len(shape) >= 2 and shape[:2] == src[:2]:
            return lay
        return self.unknown(node, f"{node.target} changing the channel dim {src} -> {shape}")

    def flatten(self, node, lay, shape) -> Any:
        src = _shape(node.args[0])
        if shape is not None and len(shape) == 2 and shape[0] == src[0] and shape[1] == math.prod(src[1:]):
            spatial = math.prod(src[2:])
            return tuple(_Seg(s.space, s.channels, s.repeat * spatial) for s in lay)
        return self.unknown(node, f"reshape {src} -> {shape}",
                            "only flattening (N, C, ...) to (N, C*...) keeps channels traceable")

    def binary(self, node, op: str, shape) -> Any:
        result = None
        for a in node.args[:2]:
            lay = self.layout.get(a) if isinstance(a, torch.fx.Node) else None
            if isinstance(lay, tuple):
                if result is None:
                    result = lay
                elif [(s.channels, s.repeat) for s in lay] != [(s.channels, s.repeat) for s in result]:
                    return self.unknown(node, f"{op} of tensors with different channel layouts")
                else:
                    for x, y in zip(lay, result):
                        self.union(x.space, y.space)
            elif lay == _CONST and _broadcast_channels(_shape(a), shape) > 1:
                return self.unknown(node, f"{op} with a per-channel constant",
                                    "per-channel constants cannot be sliced; use a BatchNorm or a module")
        return result

    def cat(self, node, shape) -> Any:
        parts = node.args[0]
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        lays = [self.layout.get(p) for p in parts]
        if not all(isinstance(lay, tuple) for lay in lays):
            return self.unknown(node, "cat with a constant or untracked tensor")
        if dim % len(shape) == 1:
            return tuple(seg for lay in lays for seg in lay)
        for lay in lays[1:]:   # cat along another dim: the channels of all parts are the same channels
            if [s.channels for s in lay] != [s.channels for s in lays[0]]:
                return self.unknown(node, f"cat along dim {dim} of different channel layouts")
            for a, b in zip(lay, lays[0]):
                self.union(a.space, b.space)
        return lays[0]

    def unknown(self, node, what: str, hint: str = "") -> Any:
        raise ChannelDependencyError(what, node.name, hint or "this op is outside what channel pruning follows "
                                     "(convs, depthwise convs, BN, Linear, activations, pooling, flatten, add, "
                                     "cat); exclude the model from structured pruning")


def _shape(node: Any) -> tuple[int, ...] | None:
    return node.meta.get("channels_shape") if isinstance(node, torch.fx.Node) else None


class _ShapeRecorder(torch.fx.Interpreter):
    """Runs the traced graph once, noting each tensor-valued node's shape."""

    def run_node(self, n: torch.fx.Node) -> Any:
        result = super().run_node(n)
        n.meta["channels_shape"] = tuple(result.shape) if isinstance(result, torch.Tensor) else None
        return result


def _keeps_batch_and_channels(index: Any) -> bool:
    """An index like ``[:, :, None, None]`` or ``[:, :, 1:]``: whole dims 0 and 1."""
    whole = slice(None, None, None)
    return isinstance(index, tuple) and len(index) >= 2 and index[0] == whole and index[1] == whole


def _broadcast_channels(operand: tuple[int, ...] | None, out: tuple[int, ...] | None) -> int:
    """Size of the operand's dim that broadcasting lines up with the output's dim 1."""
    if operand is None or out is None:
        return 1
    i = len(operand) - (len(out) - 1)
    return operand[i] if 0 <= i < len(operand) else 1


def _flat(xs: Any) -> list:
    return [x for x in xs if isinstance(x, tuple)]


def trace(model: nn.Module, example_inputs: Sequence[torch.Tensor]) -> torch.fx.GraphModule:
    """``symbolic_trace`` ``model`` and record every node's output shape for ``example_inputs``.

    The forward pass runs in eval mode under ``no_grad`` so BatchNorm statistics are untouched.
    """
    if not isinstance(model, nn.Module):
        raise InputError(f"channel pruning needs a torch.nn.Module, got {type(model).__name__}")
    try:
        gm = torch.fx.symbolic_trace(model)
    except Exception as exc:  # noqa: BLE001  (torch.fx raises many kinds)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ChannelDependencyError(f"{type(model).__name__}.forward", "forward",
                                     f"torch.fx could not trace the forward ({first}); remove data-dependent "
                                     "control flow from forward()") from None
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            _ShapeRecorder(gm).run(*example_inputs)
    except Exception as exc:  # noqa: BLE001  (whatever the forward raises)
        shapes = [tuple(t.shape) for t in example_inputs]
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise InputError(f"the example input {shapes} does not run through {type(model).__name__} ({reason}); "
                         "pass data or an input_shape that the model accepts") from None
    finally:
        for m, mode in modes.items():
            m.training = mode
    return gm


def channel_groups(model: nn.Module, example_inputs: Sequence[torch.Tensor]) -> list[ChannelGroup]:
    """Every channel coupling group of ``model``, in graph order (fixed ones included).

    ``example_inputs``: a tuple of tensors the model accepts (batch size 1 is fine).
    Raises :class:`ChannelDependencyError` for patterns it cannot follow.
    """
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    gm = trace(model, tuple(example_inputs))
    return _Tracer(gm).run()


def select_groups(groups: Iterable[ChannelGroup], exclude: Sequence[str] = ()) -> list[ChannelGroup]:
    """The prunable groups whose channels no module in ``exclude`` produces or normalises.

    ``exclude`` names modules or their parents; an excluded layer keeps its
    outputs but may still lose inputs when the layer before it shrinks.
    """
    def excluded(module: str) -> bool:
        return any(module == e or module.startswith(e + ".") for e in exclude)

    return [g for g in groups if g.prunable and not any(excluded(s.module) for s in g.slices if s.role != "in")]


# -- removal -----------------------------------------------------------------

def filter_l1(model: nn.Module, group: ChannelGroup, *, mean: bool = False) -> torch.Tensor:
    """Per channel of ``group``, ``Σ_producers ‖W_p[c]‖₁`` (Li et al. 2017's filter criterion),
    or with ``mean`` each filter's L1 divided by its size (comparable across layers); float64."""
    score = torch.zeros(group.channels, dtype=torch.float64)
    for s in group.of_role("out"):
        w = model.get_submodule(s.module).weight.detach().double()
        rows = w.abs().reshape(w.shape[0], -1)
        score += (rows.mean(1) if mean else rows.sum(1))[s.offset:s.offset + group.channels]
    return score


def remove_channels(model: nn.Module, plan: Mapping[ChannelGroup, Iterable[int]]) -> nn.Module:
    """Remove channel indices ``plan[group]`` of each group from ``model`` (in place); return it.

    Indices refer to the groups as :func:`channel_groups` returned them for the
    model's current structure; several groups are removed in one call so that
    offsets stay valid.  Each layer is replaced by a smaller one of the same
    type holding the kept weights (and BN statistics).
    """
    out_drop: dict[str, set[int]] = {}
    in_drop: dict[str, set[int]] = {}
    for group, indices in plan.items():
        idx = sorted({int(i) for i in indices})
        if not idx:
            continue
        if not group.prunable:
            raise ConfigError(f"cannot remove channels of a group that is fixed ({group.fixed}): "
                              f"{', '.join(group.modules)}")
        if idx[0] < 0 or idx[-1] >= group.channels:
            raise ConfigError(f"channel index out of range 0..{group.channels - 1} for group of "
                              f"{', '.join(group.modules)}: {idx}")
        if len(idx) >= group.channels:
            raise ConfigError(f"removing all {group.channels} channels of group {', '.join(group.modules)} "
                              "would disconnect the model; keep at least one")
        for s in group.slices:
            if s.role == "in":
                in_drop.setdefault(s.module, set()).update(
                    s.offset + c * s.repeat + r for c in idx for r in range(s.repeat))
            else:
                out_drop.setdefault(s.module, set()).update(s.offset + c for c in idx)
    for name in sorted(set(out_drop) | set(in_drop)):
        old = model.get_submodule(name)
        new = _shrink(old, name, out_drop.get(name, set()), in_drop.get(name, set()))
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, leaf, new)
    return model


def _keep(n: int, drop: set[int], name: str) -> torch.Tensor:
    if drop and max(drop) >= n:
        raise ConfigError(f"channel groups are stale for {name!r} (index {max(drop)} of {n}): call "
                          "channel_groups again after changing the model")
    return torch.tensor([i for i in range(n) if i not in drop], dtype=torch.long)


def _shrink(old: nn.Module, name: str, out_drop: set[int], in_drop: set[int]) -> nn.Module:
    if isinstance(old, (nn.Conv1d, nn.Conv2d)):
        return _shrink_conv(old, name, out_drop, in_drop)
    if isinstance(old, nn.Linear):
        keep_o = _keep(old.out_features, out_drop, name)
        keep_i = _keep(old.in_features, in_drop, name)
        new = nn.Linear(len(keep_i), len(keep_o), bias=old.bias is not None,
                        device=old.weight.device, dtype=old.weight.dtype)
        _copy(new.weight, old.weight[keep_o][:, keep_i])
        if old.bias is not None:
            _copy(new.bias, old.bias[keep_o])
        return new.train(old.training)
    if isinstance(old, (nn.BatchNorm1d, nn.BatchNorm2d)):
        keep = _keep(old.num_features, out_drop, name)
        like = old.weight if old.affine else old.running_mean
        factory = {"device": like.device, "dtype": like.dtype} if like is not None else {}
        new = type(old)(len(keep), old.eps, old.momentum, old.affine, old.track_running_stats, **factory)
        for attr in ("weight", "bias", "running_mean", "running_var"):
            src = getattr(old, attr)
            if src is not None:
                _copy(getattr(new, attr), src[keep])
        if old.num_batches_tracked is not None:
            new.num_batches_tracked.copy_(old.num_batches_tracked)
        return new.train(old.training)
    raise ChannelDependencyError(f"removing channels of {type(old).__name__}", name)


def _shrink_conv(old: nn.Module, name: str, out_drop: set[int], in_drop: set[int]) -> nn.Module:
    keep_o = _keep(old.out_channels, out_drop, name)
    depthwise = old.groups > 1
    keep_i = keep_o if depthwise else _keep(old.in_channels, in_drop, name)
    if depthwise and in_drop:
        raise ChannelDependencyError(f"input-only removal on depthwise conv {name!r}", name)
    groups = len(keep_o) if depthwise else 1
    new = type(old)(len(keep_i), len(keep_o), old.kernel_size, old.stride, old.padding, old.dilation, groups,
                    old.bias is not None, old.padding_mode, device=old.weight.device, dtype=old.weight.dtype)
    w = old.weight[keep_o]
    _copy(new.weight, w if depthwise else w[:, keep_i])
    if old.bias is not None:
        _copy(new.bias, old.bias[keep_o])
    return new.train(old.training)


def _copy(dst: torch.Tensor, src: torch.Tensor) -> None:
    with torch.no_grad():
        dst.copy_(src.detach())
    if isinstance(dst, nn.Parameter) and isinstance(src, nn.Parameter):
        dst.requires_grad_(src.requires_grad)


# -- shared by the channel pruners -------------------------------------------

def example_from(data: Any, input_shape: Sequence[int] | None, method: str) -> tuple[torch.Tensor, ...]:
    """An example input for tracing: the first sample of ``data``, else zeros of ``input_shape``."""
    from .trainer import split_batch

    if data is not None:
        for batch in data:
            x, _ = split_batch(batch)
            xs = x if isinstance(x, (tuple, list)) else (x,)
            return tuple(torch.as_tensor(t)[:1] for t in xs)
    if input_shape:
        return (torch.zeros(tuple(input_shape)),)
    raise InputError(f"{method} traces the model and needs an example input: pass data= (batches of (x, y)) "
                     f"or set input_shape=(1, C, H, W) in its config")

