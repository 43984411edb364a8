"""Per-layer bit-width search: the evaluation core the searching quantizers share.

``bo-mixed-precision`` (Bayesian optimisation) and ``autoqb`` (a reinforcement-
learning agent) search one weight bit width per Conv/Linear layer under a budget
of the target's resources, scoring each candidate by quantization-aware
fine-tuning (QAFT).  What they share lives here once:

* **Layers** (:func:`search_layers`): the Conv/Linear layers that get a width, in
  forward order, with what the cost model needs (MACs per sample, weights, output
  channels, the LiteRT op and a fully connected layer's input width), read from
  the captured graph as ``mixed-precision`` reads it.
* **Grids** (:func:`quantize_weight`): ``b ≥ 2`` bits is symmetric narrow
  per-channel integer, ``s·clamp(round(w/s), −q, q)`` with ``q = 2^(b−1) − 1`` and
  ``s = max|w_c| / q`` (``b = 8`` is :func:`sdk.fakequant.fake_quant_weight`);
  ``b = 1`` is binary, ``α_c·sign(w)`` with ``α_c = mean|w_c|`` and ``sign(0) = +1``
  (what a binary layer is).  Straight-through gradients.
* **Cost** (:func:`cost`, :func:`layer_cost`): ``"bytes"`` is what ``arm-int8``
  stores for the layers' weights and biases — the ``bytes`` of the artifact's
  ``profile.json`` layer rows.  Codes of at most 4 bits (binary codes ±1 are
  2-bit codes) travel as INT4, two a byte, only where the LiteRT lowering stores
  them so (:func:`sdk.litert.lowering.int_storage`: fully connected layers with an
  even input width; convolutions too with ``int4="always"``), else one byte a
  code; every layer ships an int32 bias per output channel.  So on ``arm-int8``
  widths below 4 bits save **no bytes** (they ship inside INT4 or int8 storage):
  they pay off in ``"bops"`` = Σ MACs · weight bits · activation bits (8), the
  BOMP-NAS/HAWQ compute measure, and in ``"packed_bytes"`` = Σ ⌈weights·bits/8⌉ +
  4·channels, the size a target packing codes at their width would store (no
  ``arm-int8`` artifact has that size; it is the model size of the BOMP-NAS paper).
* **QAFT** (:func:`finetune_bits`, :func:`evaluate`): a copy of the model under
  :class:`sdk.fakequant.FakeQuantized` (BatchNorm folded, int8 activations with EMA
  ranges, exactly ``qat``'s simulation) whose layers compute with their weights
  on their own grids, fine-tuned a bounded number of steps with Adam and
  cross-entropy; the accuracy is that of the integer simulation on held-out
  batches.  Deterministic for a seed when the batches are a list (a shuffling
  DataLoader gives another order each pass).
* **Bake** (:func:`apply_bits`): the fine-tuned model with each weight on its grid
  and the hint that makes the target ship exactly those codes
  (``Hint(bits=b, per_channel=True)``; binary ``Hint(codebook=2, per_channel=True)``),
  the learned activation ranges as output hints, as :meth:`FakeQuantized.bake`
  leaves them: ``sdk.deploy(..., target="arm-int8")`` ships the torch codes.
* **Bounded search** (:class:`SearchBudget`, :func:`run_trials`): a trial and/or
  wall-clock bound and a progress bar (:func:`sdk.log.progress`), and the feasible
  set helpers (:func:`feasible`, :func:`random_feasible`, :func:`repair`,
  :func:`check_budget`) so that no search ever scores a configuration over budget.

>>> import torch
>>> net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
>>> layers = search_layers(net, (torch.zeros(1, 8),))
>>> [(l.name, l.weights, l.macs) for l in layers]
[('0', 128, 128), ('2', 64, 64)]
>>> cost(layers, (8, 4), "bytes"), cost(layers, (8, 4), "bops")   # 128 + 4·16 + 64/2 + 4·4; 128·8·8 + 64·4·8
(240, 10240)
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from .config import check_choice, check_int, check_range
from .encoding import Hint, annotate, hints_of, weight_spec
from .errors import ConfigError, InputError
from .fakequant import FakeQuantConfig, FakeQuantized, FoldedLayer
from .layer_quant import LAYER_TYPES, ste
from .log import progress as progress_bar
from .trainer import TrainConfig, classification_loss, fit, split_batch

#: the weight widths a search chooses from by default (1: binary ±α per channel)
BITS = (8, 4, 2, 1)
#: every width the grids and the cost model take
VALID_BITS = (1, 2, 3, 4, 5, 6, 7, 8)
#: the cost metrics :func:`cost` knows (module docstring)
METRICS = ("bytes", "bops", "packed_bytes")
#: activation bits everywhere (int8: what ``arm-int8`` runs)
ACTIVATION_BITS = 8


@dataclasses.dataclass(frozen=True)
class SearchLayer:
    """One Conv/Linear layer that gets a weight width.

    ``name``: module path; ``op``: the LiteRT op it lowers to (``FULLY_CONNECTED``,
    ``CONV_2D``, ``DEPTHWISE_CONV_2D``); ``macs``: multiply-accumulates per input
    sample; ``weights``: weight count; ``channels``: output channels (the int32 biases
    shipped); ``k``: a fully connected layer's input width (0 for a convolution).
    """

    name: str
    op: str
    macs: int
    weights: int
    channels: int
    k: int = 0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def search_layers(model: nn.Module, example: Sequence[torch.Tensor] | torch.Tensor) -> list[SearchLayer]:
    """The Conv/Linear layers of ``model`` that get a width, in forward order, from the graph
    :func:`sdk.graph.capture` takes on ``example`` (one sample counts: MACs are per sample).

    Raises :class:`ConfigError` when the model has no such layer, or one whose module runs more
    than once (a shared layer cannot be fine-tuned at one width per call).

    >>> net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.Flatten(), torch.nn.Linear(4 * 36, 10))
    >>> [(l.name, l.op, l.macs, l.k) for l in search_layers(net, (torch.zeros(1, 1, 8, 8),))]
    [('0', 'CONV_2D', 1296, 0), ('2', 'FULLY_CONNECTED', 1440, 144)]
    """
    from .graph import WEIGHTED_OPS, capture, fold_batch_norm, macs
    from .litert.lowering import litert_op

    example = (example,) if isinstance(example, torch.Tensor) else tuple(example)
    example = tuple(torch.as_tensor(t)[:1] for t in example)
    graph = fold_batch_norm(capture(model, example))
    modules = dict(model.named_modules())
    found: dict[str, SearchLayer] = {}
    for node in graph.nodes:
        if node.op not in WEIGHTED_OPS or not graph.is_const(node.inputs[1]):
            continue
        module = modules.get(node.module)
        if not isinstance(module, LAYER_TYPES):
            continue
        if node.module in found:
            raise ConfigError(f"bit search: layer {node.module!r} runs more than once in the forward pass; "
                              "a shared layer cannot get one width per use (give each use its own module)")
        w = graph.shape(node.inputs[1])
        op = litert_op(graph, node)
        found[node.module] = SearchLayer(node.module, op, macs(graph, node), int(math.prod(w)), int(w[0]),
                                         int(w[1]) if op == "FULLY_CONNECTED" else 0)
    if not found:
        raise ConfigError("bit search: the model has no Conv1d/Conv2d/Linear layer with constant weights "
                          "to give a bit width")
    return list(found.values())


# ---------------------------------------------------------------------------
# grids
# ---------------------------------------------------------------------------

def _check_bits(bits: int, who: str = "bit search") -> int:
    if not isinstance(bits, (int, np.integer)) or isinstance(bits, bool) or int(bits) not in VALID_BITS:
        raise ConfigError(f"{who}: a weight width must be one of {', '.join(map(str, VALID_BITS))}, got {bits!r}")
    return int(bits)


def code_bits(bits: int) -> int:
    """The width of the integer codes a ``bits``-wide weight ships (binary ±1 codes: 2)."""
    return max(2, _check_bits(bits))


def quantize_weight(w: torch.Tensor, bits: int) -> torch.Tensor:
    """``w`` on its ``bits``-wide per-output-channel grid (module docstring); straight-through
    gradient.  An all-zero channel stays zero.

    >>> w = torch.tensor([[0.8, -0.3, 0.5], [0.0, 0.0, 0.0]])
    >>> (quantize_weight(w, 2) / 0.8).round().abs().tolist()          # codes {-1, 0, 1} · max|w|
    [[1.0, 0.0, 1.0], [0.0, 0.0, 0.0]]
    >>> [round(v, 4) for v in quantize_weight(w, 1)[0].tolist()]      # ±mean|w|
    [0.5333, -0.5333, 0.5333]
    """
    bits = _check_bits(bits)
    flat = w.detach().reshape(w.shape[0], -1)
    shape = (-1,) + (1,) * (w.ndim - 1)
    if bits == 1:
        alpha = flat.abs().mean(1).reshape(shape)
        return ste(alpha * torch.where(w < 0, -1.0, 1.0).to(w.dtype), w)
    qmax = 2 ** (bits - 1) - 1
    amax = flat.abs().amax(1)
    scale = torch.where(amax > 0, amax / qmax, torch.ones_like(amax)).reshape(shape)
    return ste(torch.clamp(torch.round(w / scale), -qmax, qmax) * scale, w)


def weight_hint(bits: int, source: str = "bit-search") -> Hint:
    """The hint that makes a target ship a ``bits``-wide grid weight as those codes."""
    bits = _check_bits(bits)
    if bits == 1:
        return Hint(codebook=2, per_channel=True, source=source)
    return Hint(bits=bits, per_channel=True, source=source)


# ---------------------------------------------------------------------------
# cost model
# ---------------------------------------------------------------------------

def layer_cost(layer: SearchLayer, bits: int, metric: str = "bytes", *, int4: str = "where-fast") -> int:
    """One layer's :func:`cost` at ``bits``.

    >>> fc = SearchLayer("fc", "FULLY_CONNECTED", macs=640, weights=640, channels=10, k=64)
    >>> [layer_cost(fc, b) for b in (8, 4, 2, 1)], layer_cost(fc, 2, "packed_bytes")
    ([680, 360, 360, 360], 200)
    """
    from .litert.lowering import int_storage

    bits = _check_bits(bits)
    if metric == "bytes":
        half = int_storage(layer.op, "static", code_bits(bits), int4, layer.k) == "int4"
        return math.ceil(layer.weights * (0.5 if half else 1)) + 4 * layer.channels
    if metric == "bops":
        return layer.macs * bits * ACTIVATION_BITS
    if metric == "packed_bytes":
        return math.ceil(layer.weights * bits / 8) + 4 * layer.channels
    raise ConfigError(f"bit search: unknown cost metric {metric!r}; valid: {', '.join(METRICS)}")


def cost(layers: Sequence[SearchLayer], bits: Sequence[int], metric: str = "bytes", *,
         int4: str = "where-fast") -> int:
    """The target's cost of ``layers`` at widths ``bits`` (one per layer): ``"bytes"`` stored by
    ``arm-int8`` (its ``int4`` option: ``where-fast`` or ``always``), ``"bops"``, or
    ``"packed_bytes"`` (module docstring)."""
    if len(bits) != len(layers):
        raise ConfigError(f"bit search: {len(bits)} widths for {len(layers)} layers")
    return sum(layer_cost(layer, b, metric, int4=int4) for layer, b in zip(layers, bits))


def feasible(layers: Sequence[SearchLayer], bits: Sequence[int], limits: Mapping[str, int], *,
             int4: str = "where-fast") -> bool:
    """Whether ``bits`` meets every ``{metric: limit}`` of ``limits``."""
    return all(cost(layers, bits, m, int4=int4) <= limit for m, limit in limits.items())


def check_budget(layers: Sequence[SearchLayer], choices: Sequence[int], limits: Mapping[str, int], *,
                 int4: str = "where-fast", who: str = "bit search") -> None:
    """:class:`ConfigError` naming the minimum achievable when even the cheapest widths of
    ``choices`` exceed a limit."""
    low = [min(choices)] * len(layers)
    for metric, limit in limits.items():
        least = cost(layers, low, metric, int4=int4)
        if least > limit:
            raise ConfigError(f"{who}: the {metric} budget {limit} is below the minimum achievable {least} "
                              f"(every layer at {min(choices)} bits); raise it to at least {least}")


def repair(layers: Sequence[SearchLayer], bits: Sequence[int], choices: Sequence[int], limits: Mapping[str, int],
           *, rng: np.random.Generator | None = None, int4: str = "where-fast") -> tuple[int, ...]:
    """``bits`` lowered until it meets ``limits`` (unchanged when it does): each step lowers one
    layer to the next smaller width of ``choices`` that saves some of an exceeded resource —
    the layer saving most of it (``rng=None``), or a random one of those that save (``rng``).
    Widths not in ``choices`` count as their nearest one below.  Call :func:`check_budget`
    first: with a feasible minimum this always ends feasible.

    >>> fc = SearchLayer("fc", "FULLY_CONNECTED", 640, 640, 10, 64)
    >>> repair([fc, fc], (8, 8), (8, 4, 2), {"bops": 640 * 8 * 12})
    (4, 8)
    """
    ladder = sorted(set(int(c) for c in choices))
    current = [max([c for c in ladder if c <= b] or ladder[:1]) for b in bits]
    while True:
        over = [m for m, limit in limits.items() if cost(layers, current, m, int4=int4) > limit]
        if not over:
            return tuple(current)
        moves = []
        for i, (layer, b) in enumerate(zip(layers, current)):
            for lower in reversed([c for c in ladder if c < b]):
                saving = layer_cost(layer, b, over[0], int4=int4) - layer_cost(layer, lower, over[0], int4=int4)
                if saving > 0:
                    moves.append((saving, i, lower))
                    break
        if not moves:
            raise ConfigError(f"bit search: no width of {ladder} brings {over[0]} within {limits[over[0]]}; "
                              "raise the budget")
        _, i, lower = moves[int(rng.integers(len(moves)))] if rng is not None else max(moves, key=lambda m: m[0])
        current[i] = lower


def random_feasible(layers: Sequence[SearchLayer], choices: Sequence[int], limits: Mapping[str, int],
                    rng: np.random.Generator, *, int4: str = "where-fast") -> tuple[int, ...]:
    """A random configuration within ``limits``: each layer's width uniform over ``choices``,
    then :func:`repair` with random moves when it exceeds a limit."""
    ladder = [int(c) for c in choices]
    bits = tuple(int(ladder[i]) for i in rng.integers(len(ladder), size=len(layers)))
    return repair(layers, bits, ladder, limits, rng=rng, int4=int4)


# ---------------------------------------------------------------------------
# QAFT
# ---------------------------------------------------------------------------

class BitLayer(FoldedLayer):
    """A :class:`~sdk.fakequant.FoldedLayer` whose folded weight lies on a ``bits``-wide grid
    (:func:`quantize_weight`) instead of int8; its BatchNorm statistics are frozen from the
    start, so the forward pass is the deployed layer's."""

    def __init__(self, layer: nn.Module, bn: nn.Module | None, bits: int, method: str):
        super().__init__(layer, bn, quantize=False, method=method)
        self.bits = _check_bits(bits)
        self.frozen = True

    @classmethod
    def convert(cls, wrapper: FoldedLayer, bits: int) -> "BitLayer":
        """``wrapper`` turned into a BitLayer in place: the activation hooks
        :class:`~sdk.fakequant.FakeQuantized` put on it stay."""
        wrapper.__class__ = cls
        wrapper.bits, wrapper.quantize, wrapper.frozen = _check_bits(bits), False, True
        return wrapper

    def folded(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        w, b = super().folded()
        return quantize_weight(w, self.bits), b


def _batches(data: Iterable | None, who: str) -> list:
    if data is None:
        raise InputError(f"{who} needs labelled data: pass a list of (x, y) batches")
    batches = data if isinstance(data, list) else list(data)
    if not batches:
        raise InputError(f"{who}: the data is empty")
    return batches


def _config(layers: Sequence[SearchLayer], bits: Sequence[int] | Mapping[str, int]) -> dict[str, int]:
    if isinstance(bits, Mapping):
        widths = {k: _check_bits(v) for k, v in bits.items()}
    else:
        if len(bits) != len(layers):
            raise ConfigError(f"bit search: {len(bits)} widths for {len(layers)} layers")
        widths = {layer.name: _check_bits(b) for layer, b in zip(layers, bits)}
    missing = sorted({layer.name for layer in layers} - set(widths))
    if missing:
        raise ConfigError(f"bit search: no width for layer(s) {', '.join(missing)}")
    return widths


def finetune_bits(model: nn.Module, layers: Sequence[SearchLayer], bits: Sequence[int] | Mapping[str, int],
                  train: Iterable, *, steps: int | None = 100, epochs: int = 1, lr: float = 1e-3, seed: int = 0,
                  ema_decay: float = 0.9, method: str = "bit-search") -> tuple[nn.Module, FakeQuantized]:
    """QAFT of a copy of ``model`` (never mutated) at ``bits`` (one per layer of ``layers``, or
    ``{layer name: bits}``): each layer a :class:`BitLayer`, int8 activations as ``qat``
    simulates them, ``epochs`` passes over ``train`` stopped after ``steps`` optimizer steps
    (``None``: no cap; ``0``: no training, the activation ranges observed on up to 4 batches).
    Returns ``(the copy with its fake quantization still on, its FakeQuantized)``; the copy is
    in eval mode and computes the integer simulation."""
    widths = _config(layers, bits)
    batches = _batches(train, "bit search fine-tuning")
    net = copy.deepcopy(model)
    fq = FakeQuantized(net, FakeQuantConfig(keep_first_last=False, freeze_bn_after=0, ema_decay=ema_decay,
                                            progress=False), method)
    for name, bit in widths.items():
        wrapper = fq.folded.get(name)
        if wrapper is None:
            raise ConfigError(f"bit search: layer {name!r} is not a Conv/Linear the int8 simulation folds "
                              f"(those are: {', '.join(fq.folded)})")
        BitLayer.convert(wrapper, bit)
    torch.manual_seed(seed)
    if steps == 0:
        net.train()
        with torch.no_grad():
            for batch in batches[:4]:
                net(split_batch(batch)[0])
    else:
        fit(net, batches, lambda m, b: classification_loss(m, b, who="bit search fine-tuning"),
            TrainConfig(epochs=max(1, epochs), lr=lr, seed=seed, max_steps=steps, progress=False),
            after_step=fq.after_step, desc=f"{method} fine-tune")
    return net.eval(), fq


def accuracy(model: nn.Module, data: Iterable) -> float:
    """Top-1 accuracy of ``model`` (eval mode, no gradients) on ``(x, y)`` batches."""
    model.eval()
    right = total = 0
    with torch.no_grad():
        for batch in data:
            x, y = split_batch(batch)
            if y is None:
                raise InputError("bit search scores on labelled data: pass (x, y) batches")
            right += int((model(x).argmax(-1) == y).sum())
            total += int(y.numel())
    if not total:
        raise InputError("bit search: the held-out data is empty")
    return right / total


def evaluate(model: nn.Module, layers: Sequence[SearchLayer], bits: Sequence[int] | Mapping[str, int],
             train: Iterable, val: Iterable, *, finetune_steps: int = 100, lr: float = 1e-3, seed: int = 0,
             ema_decay: float = 0.9) -> float:
    """The held-out accuracy of ``model`` at ``bits`` after :func:`finetune_bits` with
    ``finetune_steps`` steps: the integer simulation's (int8 activations, weights on their
    grids) on the ``val`` batches.  The expensive inner loop of a search; deterministic for
    a seed when ``train`` is a list."""
    net, fq = finetune_bits(model, layers, bits, train, steps=finetune_steps, epochs=10 ** 6, lr=lr, seed=seed,
                            ema_decay=ema_decay)
    return accuracy(net, _batches(val, "bit search evaluation"))


def _grid_exact(layer: nn.Module, bits: int, source: str) -> None:
    """Make the target's reading of the weight (:func:`sdk.encoding.weight_spec` with the hint)
    give back exactly its codes.  The spec takes a channel's smallest nonzero magnitude (or half
    of it) as the step; a channel of a 3–7-bit grid with no code ±1 or ±2 has neither, so its
    smallest-magnitude weight is moved to code ±1 (rare: only in short rows)."""
    if bits in (1, 2, 8):
        return
    qmax = 2 ** (bits - 1) - 1
    with torch.no_grad():
        w = layer.weight
        flat = w.reshape(w.shape[0], -1)
        amax = flat.abs().amax(1)
        scale = torch.where(amax > 0, amax / qmax, torch.ones_like(amax))
        codes = torch.round(flat / scale[:, None])
        for c in range(flat.shape[0]):
            nz = codes[c][codes[c] != 0].abs()
            if nz.numel() and float(nz.min()) >= 3:
                j = int(torch.where(codes[c] != 0, codes[c].abs(), torch.inf).argmin())
                flat[c, j] = torch.sign(flat[c, j]) * scale[c]
        spec = weight_spec(w.detach().numpy(), hints_of(layer))
        if spec.code_bits > bits:
            raise InputError(f"{source}: the weight of a {bits}-bit layer does not ship as {bits}-bit codes "
                             f"({spec.code_bits}); report this as a bug")


def apply_bits(model: nn.Module, layers: Sequence[SearchLayer], bits: Sequence[int] | Mapping[str, int],
               train: Iterable | None = None, *, steps: int | None = None, epochs: int = 1, lr: float = 1e-3,
               seed: int = 0, ema_decay: float = 0.9, method: str = "bit-search") -> nn.Module:
    """The deployable model at ``bits``: a copy of ``model`` fine-tuned by :func:`finetune_bits`
    (``epochs`` over ``train``, capped at ``steps``) and baked — plain Conv/Linear layers (BN
    folded) whose weights lie exactly on their grids with :func:`weight_hint`, the learned
    activation ranges as output hints.  ``train=None``: no training and no activation hints,
    only the weights put on their grids (the target's PTQ calibrates the activations); refused
    (:class:`InputError`) for a layer followed by a BatchNorm, whose folded weight is what ships.

    >>> net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    >>> layers = search_layers(net, (torch.zeros(1, 8),))
    >>> out = apply_bits(net, layers, (2, 8))
    >>> len(torch.unique(out[0].weight.detach()[0])) <= 3, hints_of(out[0]).bits
    (True, 2)
    """
    widths = _config(layers, bits)
    if train is None:
        from .fakequant import fold_plan
        from .torch_fold import trace

        folded = sorted(n for n, bn in fold_plan(trace(model)).layers.items() if bn is not None and n in widths)
        if folded:
            raise InputError(f"{method}: layer(s) {', '.join(folded)} feed a BatchNorm, which deployment folds into "
                             "the weight after it is put on its grid: pass train batches (the fine-tuning puts the "
                             "folded weight on the grid)")
        net = copy.deepcopy(model)
        with torch.no_grad():
            for name, bit in widths.items():
                layer = net.get_submodule(name)
                layer.weight.copy_(quantize_weight(layer.weight, bit))
    else:
        net, fq = finetune_bits(model, layers, widths, train, steps=steps, epochs=epochs, lr=lr, seed=seed,
                                ema_decay=ema_decay, method=method)
        fq.remove_hooks()
        net = fq.bake()
    for name, bit in widths.items():
        layer = net.get_submodule(name)
        annotate(layer, weight_hint(bit, method))
        _grid_exact(layer, bit, method)
    return net.eval()


# ---------------------------------------------------------------------------
# bounded search
# ---------------------------------------------------------------------------

@dataclasses.dataclass
class SearchBudget:
    """How long a search may run: at most ``max_trials`` scored configurations and/or
    ``max_seconds`` of wall clock (at least one bound).  :meth:`start` starts the clock;
    :meth:`allows` says whether another trial may start (the first always may, so every
    search has a result; a trial under way is never cut short).

    >>> b = SearchBudget(max_trials=2); b.start()
    >>> b.allows(0), b.allows(2)
    (True, False)
    """

    max_trials: int | None = None
    max_seconds: float | None = None
    _t0: float | None = dataclasses.field(default=None, init=False, repr=False)

    def __post_init__(self):
        if self.max_trials is None and self.max_seconds is None:
            raise ConfigError("bit search: bound the search: give max_trials and/or max_seconds")
        if self.max_trials is not None and (not isinstance(self.max_trials, int) or isinstance(self.max_trials, bool)
                                            or self.max_trials < 1):
            raise ConfigError(f"bit search: max_trials={self.max_trials!r} must be a positive integer (or None)")
        if self.max_seconds is not None and not (isinstance(self.max_seconds, (int, float))
                                                 and not isinstance(self.max_seconds, bool)
                                                 and self.max_seconds > 0):
            raise ConfigError(f"bit search: max_seconds={self.max_seconds!r} must be a positive number (or None)")

    def start(self) -> None:
        self._t0 = time.perf_counter()

    @property
    def elapsed(self) -> float:
        """Seconds since :meth:`start` (0 before it)."""
        return 0.0 if self._t0 is None else time.perf_counter() - self._t0

    def allows(self, trials_done: int) -> bool:
        if trials_done == 0:
            return True
        if self.max_trials is not None and trials_done >= self.max_trials:
            return False
        return self.max_seconds is None or self.elapsed < self.max_seconds


@dataclasses.dataclass(frozen=True)
class Trial:
    """One scored configuration: its ``bits`` (one per layer), ``accuracy``, ``costs``
    (``{metric: value}``), the ``seconds`` since the search started when it finished, and
    ``origin`` (how the search proposed it: ``"initial"``, ``"acquisition"``, ``"agent"``...)."""

    index: int
    bits: tuple[int, ...]
    accuracy: float
    costs: dict
    seconds: float
    origin: str = ""

    def to_dict(self) -> dict:
        return {"index": self.index, "bits": list(self.bits), "accuracy": self.accuracy, "costs": dict(self.costs),
                "seconds": round(self.seconds, 3), "origin": self.origin}


def run_trials(budget: SearchBudget, propose: Callable[[list[Trial]], tuple[tuple[int, ...], str]],
               score: Callable[[tuple[int, ...]], float], *, layers: Sequence[SearchLayer],
               metrics: Sequence[str] = ("bytes", "bops"), limits: Mapping[str, int] | None = None,
               int4: str = "where-fast", desc: str = "bit search", progress: bool = True) -> list[Trial]:
    """The bounded search loop: while ``budget`` allows, ``propose(trials so far)`` gives
    ``(bits, origin)``, ``score(bits)`` its accuracy; returns the trials in order.  With
    ``limits`` a proposal over budget is a bug of the searcher and raises :class:`ConfigError`
    (nothing infeasible is ever scored).  Progress: a bar with the best accuracy so far."""
    trials: list[Trial] = []
    budget.start()
    total = budget.max_trials
    with progress_bar(total=total, desc=desc, unit="trial", enabled=progress) as bar:
        while budget.allows(len(trials)):
            bits, origin = propose(trials)
            bits = tuple(int(b) for b in bits)
            costs = {m: cost(layers, bits, m, int4=int4) for m in dict.fromkeys((*metrics, *(limits or {})))}
            if limits and not feasible(layers, bits, limits, int4=int4):
                raise ConfigError(f"{desc}: proposed {bits} with costs {costs} over the budget {dict(limits)}")
            acc = float(score(bits))
            trials.append(Trial(len(trials), bits, acc, costs, budget.elapsed, origin))
            bar.update(1)
            bar.set_postfix(best=f"{max(t.accuracy for t in trials):.4f}")
    return trials


# ---------------------------------------------------------------------------
# what the search quantizers' configs and stages share
# ---------------------------------------------------------------------------

#: the search quantizers' budget fields and the cost metric each one bounds
BUDGETS = {"max_weight_bytes": "bytes", "max_bops": "bops", "max_packed_bytes": "packed_bytes"}


def check_budget_fields(owner: str, config) -> None:
    """:class:`ConfigError` unless each of ``config``'s :data:`BUDGETS` fields is a positive integer or None."""
    for field in BUDGETS:
        value = getattr(config, field)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ConfigError(f"{owner}: {field}={value!r} must be a positive integer (or None)")


def check_search_fields(owner: str, config, min_widths: int = 1) -> None:
    """:class:`ConfigError` unless the fields the search quantizers share are valid: the
    :data:`BUDGETS`, ``bits`` (at least ``min_widths`` distinct widths of :data:`VALID_BITS`;
    stored widest first), ``int4_storage``, ``finetune_steps``, ``lr``, ``final_epochs``,
    ``holdout`` and ``ema_decay``."""
    check_budget_fields(owner, config)
    if not config.bits or len(set(config.bits)) != len(config.bits) or len(config.bits) < min_widths:
        raise ConfigError(f"{owner}: bits={config.bits!r} must list "
                          + ("distinct" if min_widths <= 1 else "at least two distinct")
                          + f" widths of {', '.join(map(str, VALID_BITS))}")
    for b in config.bits:
        check_choice(owner, "bits", b, VALID_BITS)
    object.__setattr__(config, "bits", tuple(sorted(config.bits, reverse=True)))
    check_choice(owner, "int4_storage", config.int4_storage, ("where-fast", "always"))
    check_int(owner, "finetune_steps", config.finetune_steps, 1)
    check_range(owner, "lr", config.lr, 0.0, 10.0, lo_open=True)
    check_int(owner, "final_epochs", config.final_epochs, 0)
    check_range(owner, "holdout", config.holdout, 0.0, 1.0, lo_open=True, hi_open=True)
    check_range(owner, "ema_decay", config.ema_decay, 0.0, 1.0, hi_open=True)


def budget_limits(config) -> dict[str, int]:
    """``{cost metric: limit}`` of the budgets ``config`` gives."""
    return {metric: getattr(config, f) for f, metric in BUDGETS.items() if getattr(config, f) is not None}


def search_streams(ctx, owner: str, why: str, holdout: float) -> tuple[list, list, list]:
    """``(batches each configuration is fine-tuned on, batches it is scored on, all train batches)``
    of a stage context: the ``val`` stream when given, else the last ``holdout`` fraction of the
    ``train`` batches.  :class:`InputError` for empty streams or too few batches to hold any out."""
    train = list(ctx.stream("train", who=f"{owner} ({why})"))
    if not train:
        raise InputError(f"{owner}: the train stream is empty")
    val = ctx.data.get("val")
    if val is not None:
        val = list(val)
        if not val:
            raise InputError(f"{owner}: the val stream is empty")
        return train, val, train
    if len(train) < 2:
        raise InputError(f"{owner} scores configurations on held-out batches: pass a val stream "
                         "(data={'train': ..., 'val': ...}) or at least 2 train batches")
    cut = min(len(train) - 1, max(1, round(len(train) * holdout)))
    return train[:-cut], train[-cut:], train
