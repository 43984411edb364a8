"""``cle`` — cross-layer equalization of per-channel weight ranges before per-tensor quantization.

Nagel, van Baalen, Blankevoort and Welling, "Data-Free Quantization Through
Weight Equalization and Bias Correction" (ICCV 2019), §4.1.  When one output
channel of a layer has weights a hundred times larger than another, a single
per-tensor int8 scale leaves the small channel with a few quantization levels.
For two consecutive layers ``y = f(W1 x + b1)``, ``z = W2 y + b2`` with ``f``
positively homogeneous (ReLU, leaky ReLU, identity, max/avg pooling, dropout),
``f(v / s) = f(v) / s`` for ``s > 0``, so scaling output channel ``i`` of the
first layer by ``1/s_i`` and input channel ``i`` of the second by ``s_i``
computes the same function::

    W1[i, ...] /= s_i     b1[i] /= s_i     W2[:, i, ...] *= s_i

With ``r1_i = max |W1[i, ...]|`` and ``r2_i = max |W2[:, i, ...]|`` the paper's
choice ``s_i = sqrt(r1_i · r2_i) / r2_i`` makes both ranges equal to
``sqrt(r1_i · r2_i)``, which maximises ``Σ_i p1_i · p2_i`` with ``p_i = r_i / max_j r_j``
the precision a per-tensor scale leaves channel ``i`` of each layer.  A layer in the middle of a chain is the second layer of one pair
and the first of the next, so the pairs are swept repeatedly until every
``s_i`` is within ``tolerance`` of 1 (or ``max_sweeps``).

Before equalizing, every BatchNorm that directly follows a conv/linear is
folded into it on the torch module (``W ← W·γ/σ``, ``b ← (b − μ)·γ/σ + β``;
the BN becomes ``nn.Identity``), because the deployed weights are the folded
ones.  Pairs are found by tracing the model with ``torch.fx``; the path from
the first layer to the second must be a single chain (no residual add, no
second consumer) of the channel-preserving ops above, or a flatten / spatial
mean that feeds a linear layer (each channel then owns ``in_features / C``
consecutive inputs).  Depthwise and grouped convolutions are handled (their
input channel ``i`` is their own filter ``i``), so depthwise-separable
``conv → dw → pw`` chains form two pairs.

ReLU6 is not positively homogeneous (``min(v/s, 6) ≠ min(v, 6)/s``), so
scaling across it would change the function wherever an activation reaches
the clip.  ``relu6="skip"`` (default) leaves such pairs alone and the model
computes exactly the same function.  ``relu6="relu"`` is the paper's choice
for MobileNetV2: the ``nn.ReLU6`` modules between a pair are replaced by
``nn.ReLU`` and the pair equalized; the result computes exactly the function
of the model with those ReLU6 replaced, which differs from the original only
where a pre-activation exceeded 6.  Functional ``F.relu6`` calls cannot be
replaced and always block a pair.

High-bias absorption (§4.1.1, ``absorb_high_bias``, on by default) follows
the equalization.  Equalization divides a first layer's bias by ``s_i``
together with its weights but large biases remain, and they widen the
activation ranges a per-tensor int8 scale must cover.  For a pair whose first
layer had a BatchNorm folded into it, its pre-activation is taken to be
``N(β, γ²)`` per channel (BN's ``β`` and ``|γ|``, divided by the equalization's
``s_i``); ``c = max(0, β − 3γ)`` is then moved from the first layer's bias into
the second's::

    b1 ← b1 − c          b2 ← b2 + W2·c      (conv: W2 summed over kernel taps)

which keeps the function wherever the pre-activation is at least ``c``
(``ReLU(v − c) = ReLU(v) − c`` for ``v ≥ c``: 99.9% of a Gaussian) and, on the
ops in between (identity, max / average pool), exactly.  A second conv with
zero padding is left alone: its border outputs would see the padding, not
``−c``, and move by ``W2·c`` over the padded taps (measured on a 3-block
3×3-conv net with β up to 6: 3.5% max output change and per-tensor int8 SQNR
41 → 27 dB, against 0.17% and 39 → 45 dB without padding).  So are pairs
without a folded BN.  ``absorbed`` records ``c`` per first layer.

The stage is data-free and goes in a recipe before ``ptq`` with per-tensor
weights (per-channel weights gain little: each channel has its own scale)::

    sdk.deploy(model, "arm-int8", (x,), calibration=cal,
               recipe={"stages": [{"method": "cle"},
                                  {"method": "ptq", "config": {"weight_granularity": "per-tensor"}}]})

>>> import torch
>>> net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
>>> eq = CLE().apply(net)
>>> r1 = eq[0].weight.abs().amax(1); r2 = eq[2].weight.abs().amax(0)
>>> bool(torch.allclose(r1, r2, rtol=1e-5))
True
"""

from __future__ import annotations

import dataclasses
from typing import Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from sdk import hookimpl
from sdk.base import Quantizer
from sdk.config import Config, check_choice, check_range
from sdk.torch_fold import WEIGHTED, fold_batch_norms, module_calls, module_of, set_module, trace


#: modules f with f(v / s) = f(v) / s for every per-channel s > 0
_HOMOGENEOUS_MODULES = (nn.ReLU, nn.LeakyReLU, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d,
                        nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d,
                        nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d)
_SPATIAL_ONLY_MODULES = (nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d,
                         nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d)
_HOMOGENEOUS_FUNCTIONS = {torch.relu, F.relu, F.leaky_relu, F.dropout}
_SPATIAL_ONLY_FUNCTIONS = {F.max_pool1d, F.max_pool2d, F.avg_pool1d, F.avg_pool2d, F.adaptive_avg_pool1d,
                           F.adaptive_avg_pool2d}


@dataclasses.dataclass
class Pair:
    """Two layers whose shared channels CLE may rescale.

    ``repeat``: inputs of ``second`` per output channel of ``first`` (> 1 when
    a flatten sits between a conv and a linear layer); ``relu6``: names of the
    ``nn.ReLU6`` modules on the path.
    """

    first_name: str
    second_name: str
    first: nn.Module
    second: nn.Module
    repeat: int = 1
    relu6: tuple[str, ...] = ()
    #: product of the equalization scales applied to the shared channels (one per channel)
    total_scale: np.ndarray | None = None

    def ranges(self, weights: dict[int, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """``(r1, r2)``: max |w| per output channel of ``first`` and per matching input channel of ``second``
        (``weights``: the layers' weights as arrays, by ``id`` of the layer)."""
        w1 = weights[id(self.first)]
        r1 = np.abs(w1.reshape(w1.shape[0], -1)).max(1)
        r2 = np.abs(self._input_view(weights)).max(axis=(1, 3)).reshape(-1)
        return r1, r2

    def scale(self, weights: dict[int, np.ndarray], biases: dict[int, np.ndarray], s: np.ndarray) -> None:
        """Divide output channel i of ``first`` by ``s[i]``, multiply input channel i of ``second`` by ``s[i]``."""
        self.total_scale = s.copy() if self.total_scale is None else self.total_scale * s
        w1 = weights[id(self.first)]
        w1 /= s.reshape((-1,) + (1,) * (w1.ndim - 1))
        if id(self.first) in biases:
            biases[id(self.first)] /= s
        view = self._input_view(weights)
        view *= s.reshape(view.shape[0], 1, -1, 1)

    def _input_view(self, weights: dict[int, np.ndarray]) -> np.ndarray:
        """Weight of ``second`` viewed as ``[groups, out per group, in channels per group, rest]``."""
        w = weights[id(self.second)]
        if isinstance(self.second, nn.Linear):
            return w.reshape(1, w.shape[0], w.shape[1] // self.repeat, self.repeat)
        g = self.second.groups
        return w.reshape(g, w.shape[0] // g, w.shape[1], -1)


class CLE(Quantizer):
    """Cross-layer equalization and high-bias absorption (Nagel et al. 2019): a torch-side stage before ``ptq``."""

    name = "cle"
    version = "1.0"
    post_training = False
    requires_calibration = False

    @dataclasses.dataclass(frozen=True)
    class Config(Config):
        max_sweeps: int = 100       # passes over all pairs at most
        tolerance: float = 1e-6     # stop when every scale of a sweep is within this of 1
        relu6: str = "skip"         # "skip": leave pairs across ReLU6; "relu": replace those ReLU6 by ReLU
        absorb_high_bias: bool = True   # move c = max(0, β − 3γ) from the first layer's bias to the second's

        def __post_init__(self):
            check_range("cle", "max_sweeps", self.max_sweeps, 1)
            check_range("cle", "tolerance", self.tolerance, 0.0, 1.0, lo_open=True, hi_open=True)
            check_choice("cle", "relu6", self.relu6, ("skip", "relu"))
            check_choice("cle", "absorb_high_bias", self.absorb_high_bias, (True, False))

    def apply(self, model: nn.Module, data: Iterable | None = None) -> nn.Module:
        """Fold BN, equalize every pair in place, then absorb high biases (``data`` is not used: the method
        is data-free)."""
        model.eval()
        stats = folded_bn_stats(model)
        pairs = find_pairs(model, allow_relu6=self.config.relu6 == "relu")
        #: what the last apply did: ReLU6 modules replaced, pairs equalized, sweeps made
        self.replaced_relu6 = [name for pair in pairs for name in pair.relu6]
        for name in self.replaced_relu6:
            set_module(model, name, nn.ReLU())
        self.sweeps = equalize(pairs, self.config.max_sweeps, self.config.tolerance)
        self.pairs = [(p.first_name, p.second_name) for p in pairs]
        #: c absorbed per first layer of a pair (float64)
        self.absorbed = absorb_high_biases(pairs, stats) if self.config.absorb_high_bias else {}
        return model


def folded_bn_stats(model: nn.Module) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Fold the BNs (:func:`fold_batch_norms`); return ``(β, |γ|)`` (float64) of each folded BN by the name of
    the layer it went into: the mean and std of that layer's output as the BN assumed them."""
    gm = trace(model)
    before = {}
    for node in gm.graph.nodes:
        bn = module_of(gm, node)
        prev = node.args[0] if node.args else None
        if isinstance(bn, nn.modules.batchnorm._BatchNorm) and isinstance(module_of(gm, prev), WEIGHTED):
            beta = bn.bias.detach().double().numpy().copy() if bn.bias is not None else np.zeros(bn.num_features)
            gamma = np.abs(bn.weight.detach().double().numpy()) if bn.weight is not None else np.ones_like(beta)
            before[node.target] = (prev.target, beta, gamma)
    return {before[bn][0]: before[bn][1:] for bn in fold_batch_norms(model)}


def _zero_padded(layer: nn.Module) -> bool:
    if isinstance(layer, nn.Linear):
        return False
    if layer.padding == "same":
        return any(k > 1 for k in layer.kernel_size)
    return layer.padding != "valid" and any(p > 0 for p in layer.padding)


def absorb_high_biases(pairs: list[Pair], stats: dict[str, tuple[np.ndarray, np.ndarray]]) -> dict[str, np.ndarray]:
    """``b1 ← b1 − c``, ``b2 ← b2 + W2·c`` with ``c = max(0, β/S − 3γ/S)`` per shared channel (``S``: the
    equalization's total scale) for every pair whose first layer has BN ``stats`` and whose second layer is
    not a zero-padded conv; return ``c`` by first layer.

    Runs after :func:`equalize`, on the equalized weights; the second layer gains a bias if it had none."""
    absorbed = {}
    for pair in pairs:
        if pair.first_name not in stats or _zero_padded(pair.second):
            continue
        beta, gamma = stats[pair.first_name]
        scale = pair.total_scale if pair.total_scale is not None else np.ones_like(beta)
        c = np.maximum(0.0, (beta - 3 * gamma) / scale)
        if not c.any():
            continue
        w2 = {id(pair.second): pair.second.weight.detach().double().numpy()}
        view = pair._input_view(w2)                                   # [groups, out/g, in/g, rest]
        delta = np.einsum("gojr,gj->go", view, c.reshape(view.shape[0], -1)).reshape(-1)
        with torch.no_grad():
            pair.first.bias.sub_(torch.from_numpy(c).to(pair.first.bias.dtype))
            if pair.second.bias is None:
                pair.second.bias = nn.Parameter(torch.from_numpy(delta).to(pair.second.weight.dtype))
            else:
                pair.second.bias.add_(torch.from_numpy(delta).to(pair.second.bias.dtype))
        absorbed[pair.first_name] = c
    return absorbed


def equalize(pairs: list[Pair], max_sweeps: int = 100, tolerance: float = 1e-6) -> int:
    """Sweep ``s_i = sqrt(r1_i · r2_i) / r2_i`` over ``pairs`` until converged; return the sweeps made.

    The sweeps run on float64 numpy copies of the weights (no float32 rounding
    accumulates, and tiny tensors are faster there), written back at the end."""
    layers = list({id(m): m for p in pairs for m in (p.first, p.second)}.values())
    weights = {id(m): m.weight.detach().cpu().double().numpy().copy() for m in layers}
    biases = {id(m): m.bias.detach().cpu().double().numpy().copy() for m in layers if m.bias is not None}
    sweeps = 0
    for sweeps in range(1, max_sweeps + 1):
        worst = 0.0
        for pair in pairs:
            r1, r2 = pair.ranges(weights)
            ok = (r1 > 0) & (r2 > 0)        # a dead channel has nothing to balance
            s = np.where(ok, np.sqrt(r1 * r2) / np.where(ok, r2, 1.0), 1.0)
            pair.scale(weights, biases, s)
            worst = max(worst, float(np.abs(s - 1).max(initial=0.0)))
        if worst < tolerance:
            break
    with torch.no_grad():
        for m in layers:
            m.weight.copy_(torch.from_numpy(weights[id(m)]))
            if m.bias is not None:
                m.bias.copy_(torch.from_numpy(biases[id(m)]))
    return sweeps


# ---------------------------------------------------------------------------
# structure: BN folding and pair discovery on the torch module
# ---------------------------------------------------------------------------

def find_pairs(model: nn.Module, *, allow_relu6: bool = False) -> list[Pair]:
    """Consecutive conv/linear layers joined by a single chain of channel-preserving, positively
    homogeneous ops (plus ``nn.ReLU6`` when ``allow_relu6``), in graph order."""
    gm = trace(model)
    calls = module_calls(gm)
    pairs = []
    for node in gm.graph.nodes:
        first = module_of(gm, node)
        if isinstance(first, WEIGHTED) and calls[node.target] == 1:
            pair = _follow(gm, node, first, calls, allow_relu6)
            if pair is not None:
                pairs.append(pair)
    return pairs


def _follow(gm, start, first, calls, allow_relu6: bool) -> Pair | None:
    """Walk from ``start`` to the next weighted layer; ``None`` when the path breaks equivalence."""
    spatial = not isinstance(first, nn.Linear)
    relu6: list[str] = []
    cur = start
    while True:
        if len(cur.users) != 1:
            return None
        nxt = next(iter(cur.users))
        if not nxt.args or nxt.args[0] is not cur or any(
                isinstance(a, torch.fx.Node) for a in list(nxt.args[1:]) + list(nxt.kwargs.values())):
            return None
        mod = module_of(gm, nxt)
        if isinstance(mod, WEIGHTED):
            return _make_pair(gm, start, nxt, first, mod, calls, spatial, relu6)
        step = _step(nxt, mod, spatial)
        if step is None:
            return None
        if step == "relu6":
            if not allow_relu6 or not isinstance(mod, nn.ReLU6):
                return None
            relu6.append(nxt.target)
        elif step == "flatten":
            spatial = False
        cur = nxt


def _make_pair(gm, start, end, first, second, calls, spatial, relu6) -> Pair | None:
    c = first.weight.shape[0]
    if calls[end.target] != 1 or spatial == isinstance(second, nn.Linear):
        return None
    if isinstance(second, nn.Linear):
        if second.in_features % c or (isinstance(first, nn.Linear) and second.in_features != c):
            return None
        repeat = second.in_features // c
    else:
        if second.in_channels != c:
            return None
        repeat = 1
    return Pair(start.target, end.target, first, second, repeat, tuple(relu6))


def _step(node: torch.fx.Node, mod: nn.Module | None, spatial: bool) -> str | None:
    """How one op on the path acts on channels: ``"same"``, ``"relu6"``, ``"flatten"`` or ``None`` (stop)."""
    if node.op == "call_module":
        if isinstance(mod, (nn.ReLU6, nn.Hardtanh)):
            return "relu6" if isinstance(mod, nn.ReLU6) else None
        if isinstance(mod, _HOMOGENEOUS_MODULES):
            return "same" if spatial or not isinstance(mod, _SPATIAL_ONLY_MODULES) else None
        if isinstance(mod, nn.Flatten):
            return "flatten" if spatial and mod.start_dim == 1 else None
        return None
    if node.op == "call_function":
        if node.target in _HOMOGENEOUS_FUNCTIONS:
            return "same"
        if node.target in _SPATIAL_ONLY_FUNCTIONS:
            return "same" if spatial else None
        if node.target is F.relu6:
            return "relu6"
        if node.target is torch.flatten:
            return "flatten" if spatial and _arg(node, 1, "start_dim", 0) == 1 else None
        if node.target is torch.mean:
            return _mean_step(node, spatial)
        return None
    if node.op == "call_method":
        if node.target in ("relu", "relu_"):
            return "same"
        if node.target == "flatten":
            return "flatten" if spatial and _arg(node, 1, "start_dim", 0) == 1 else None
        if node.target == "mean":
            return _mean_step(node, spatial)
    return None


def _mean_step(node: torch.fx.Node, spatial: bool) -> str | None:
    """A mean over spatial dims only (positive indices >= 2) keeps channels; without keepdim it flattens."""
    dims = _arg(node, 1, "dim", None)
    dims = (dims,) if isinstance(dims, int) else dims
    if not spatial or not dims or any(not isinstance(d, int) or d < 2 for d in dims):
        return None
    return "same" if _arg(node, 2, "keepdim", False) else "flatten"


def _arg(node: torch.fx.Node, i: int, key: str, default):
    return node.args[i] if len(node.args) > i else node.kwargs.get(key, default)


@hookimpl
def register_quantizers(register):
    register(CLE)
