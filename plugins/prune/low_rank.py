"""``low-rank`` — factorise convolutions and linears by SVD, ranks chosen for the whole network under a budget.

Denton, Zaremba, Bruna, LeCun & Fergus, "Exploiting Linear Structure Within
Convolutional Networks for Efficient Evaluation" (NeurIPS 2014) and Zhang, Zou,
He & Sun, "Accelerating Very Deep Convolutional Networks for Classification and
Detection" (TPAMI 2016): a layer's weight matrix is close to one of low rank, and
a rank-``r`` product is two thinner layers that cost fewer MACs.  Zhang et al.
choose the ranks of all layers together, under one budget for the whole network,
rather than one fraction per layer; so does this pruner.

1. **Factorisation.**  A linear ``W`` (``m × n``) is ``U S Vᵀ``; rank ``r`` keeps the
   ``r`` largest singular values and becomes ``Linear(n → r, no bias)`` with weight
   ``√S_r V_rᵀ``, then ``Linear(r → m)`` with weight ``U_r √S_r`` and the old bias —
   the product is the truncated SVD ``U_r S_r V_rᵀ``, the best rank-``r``
   approximation of ``W`` (Eckart–Young).  A ``k×k`` convolution ``C_in → C_out``
   is factorised through ``W`` reshaped to ``(C_out, C_in·k·k)``: a ``k×k``
   convolution ``C_in → r`` (the old stride, padding, dilation) then a ``1×1``
   convolution ``r → C_out`` (a ``Conv1d`` alike).  Grouped and depthwise convolutions
   are left alone.  The SVD is :func:`svd` (float64, through the smaller Gram matrix).
   The two layers replace the old one as an ``nn.Sequential`` of the same name
   (``features.4`` becomes ``features.4.0`` and ``features.4.1``).
2. **Cost.**  With ``n`` inputs per output (``in_features`` or ``C_in·k·k``), ``m``
   outputs and ``P`` output positions per sample (1 for a linear on a vector,
   ``H'·W'`` for a convolution), the layer costs ``P·m·n`` MACs dense and
   ``P·r·(m + n)`` factorised (``metric: macs``, as the artifact's profile counts
   them); ``metric: bytes`` counts the weights as ``arm-int8`` ships them (one byte
   a weight, four per output for the int32 bias every conv and linear carries there,
   a zero one where the layer has none: ``m·n + 4m`` dense, ``r·(m + n) + 4r + 4m``
   factorised).
   A layer may only be factorised where that saves: ranks ``min_rank … r_max`` with
   ``r·(m + n) < m·n`` (under ``bytes`` the ranks just below ``r_max`` save MACs but
   not bytes; the allocation never picks them, the dense layer costs less and loses
   nothing).  The model's cost is that of all its convolutions and linears
   (grouped ones, excluded ones and those too small to save included, at their dense
   cost); ``budget`` is the fraction of it that may remain.
3. **Objective.**  Dropping singular direction ``i`` of layer ``l`` costs
   ``e_i = σ_i² · q_i``: ``objective: output`` measures ``q_i = ‖v_iᵀ X‖²`` on the
   layer's inputs ``X`` (its input rows or convolution patches, over
   ``calibration_batches`` batches of ``train``, at most :data:`MAX_ROWS` evenly spaced
   rows per call), so ``Σ_{i>r} e_i`` is exactly the squared output error
   ``‖(W − W_r) X‖²`` of the truncated layer on those rows (the other layers intact); ``objective:
   energy`` takes ``q_i = 1`` (the discarded singular-value energy, no data needed).
   Each layer's error is normalised by its total ``Σ_i e_i`` (the error of
   removing the layer), so layers of any scale count alike, and the ranks minimise
   the sum over layers of the normalised errors subject to the network's cost ≤ the
   budget.
4. **Allocation** (:func:`allocate_ranks`): a multiple-choice knapsack — one option
   per layer (dense, or a rank) — solved by dynamic programming over the cost.  It is
   exact when the budget in units of the costs' greatest common divisor fits
   ``MAX_BUCKETS``; otherwise costs are rounded *up* to a grid of
   ``budget / MAX_BUCKETS``, so the budget still holds and the objective is that of
   the best configuration within ``layers · grid`` of the budget.
   :func:`sdk.allocation.allocate` does not fit: it splits one count of pruned units
   over convex curves, while here each layer's options differ in cost per unit and
   the first step (dense → ``r_max``) is a jump.
5. Factorise; optionally fine-tune ``finetune_epochs`` with cross-entropy on the
   ``train`` stream (the training fields are :class:`sdk.trainer.TrainConfig`'s;
   ``epochs`` is not used).

The ranks, the costs before and after (MACs and bytes, per layer and in all) and the
objective stay on the returned model as the JSON-able dict ``model._edgepack_low_rank``
(:data:`ATTR`) and in the stage report (the artifact manifest's ``stages``).

>>> import torch
>>> from plugins.prune.low_rank import LowRankPruner
>>> net = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
>>> small = LowRankPruner(budget=0.5, objective="energy", input_shape=(1, 64)).apply(net)
>>> type(small[0]).__name__, small._edgepack_low_rank["macs_after"] <= 0.5 * 4736
('Sequential', True)
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrize

from sdk import hookimpl
from sdk.base import Pruner
from sdk.channels import example_from
from sdk.config import check_choice, check_range
from sdk.context import DataStreams, StageContext
from sdk.errors import ConfigError, InputError
from sdk.torch_fold import set_module
from sdk.trainer import TrainConfig, finetune, split_batch

#: the model attribute that holds the ranks and costs
ATTR = "_edgepack_low_rank"
METRICS = ("macs", "bytes")
OBJECTIVES = ("output", "energy")
#: cost grid of the allocation (see the module docstring, step 4)
MAX_BUCKETS = 1 << 15
#: rows of layer inputs kept per forward call when measuring the output objective
MAX_ROWS = 8192
#: the layers counted (subclasses too: their MACs are in the model's cost) and, exactly these types, factorised
LAYER_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d)


class LowRankPruner(Pruner):
    """SVD-factorise convs and linears into two thinner layers, ranks chosen jointly under a MACs or bytes budget."""

    name = "low-rank"
    version = "1.0"

    @dataclasses.dataclass(frozen=True)
    class Config(TrainConfig):
        """The budget and how the ranks are chosen; the training fields are the fine-tuning's, whose
        length is ``finetune_epochs`` (``epochs`` is not used)."""

        budget: float = 0.5                   # fraction of the model's MACs (or bytes) that may remain
        metric: str = "macs"                  # macs (per sample, as the profile counts) or bytes (int8 weights)
        objective: str = "output"             # output (error measured on train inputs) or energy (σ² only)
        min_rank: int = 1                     # the smallest rank a factorised layer keeps
        exclude: tuple[str, ...] = ()         # layers (or their parents) left dense
        calibration_batches: int = 8          # train batches whose layer inputs measure the output objective
        input_shape: tuple[int, ...] | None = None   # example input shape when no data is given
        finetune_epochs: int = 0              # cross-entropy fine-tuning after factorising (needs data)

        def __post_init__(self):
            super().__post_init__()
            check_range("low-rank", "budget", self.budget, 0.0, 1.0, lo_open=True, hi_open=True)
            check_choice("low-rank", "metric", self.metric, METRICS)
            check_choice("low-rank", "objective", self.objective, OBJECTIVES)
            check_range("low-rank", "min_rank", self.min_rank, 1)
            check_range("low-rank", "calibration_batches", self.calibration_batches, 1)
            check_range("low-rank", "finetune_epochs", self.finetune_epochs, 0)

    def apply(self, model: torch.nn.Module, data=None) -> torch.nn.Module:
        return self.run(model, StageContext(DataStreams.of(data), original=model))

    def run(self, model: torch.nn.Module, ctx: StageContext) -> torch.nn.Module:
        cfg = self.config
        data = ctx.data.get("train")
        if cfg.objective == "output" and data is None:
            raise InputError("low-rank: objective 'output' measures each layer's error on its inputs and needs "
                             "data= (batches of (x, y) or x); pass data, or set objective: energy")
        model.eval()
        found = layer_stats(model, example_from(data, cfg.input_shape, self.name), cfg.exclude, cfg.min_rank)
        candidates = [s for s in found if s.max_rank >= cfg.min_rank]
        if not candidates:
            raise ConfigError(f"low-rank: nothing to factorise: of {len(found)} conv / linear layers none is "
                              f"ungrouped, called, not excluded and large enough that a rank ≥ min_rank="
                              f"{cfg.min_rank} saves (r·(m + n) < m·n); lower min_rank or un-exclude layers")
        if cfg.objective == "output":
            measure_output_weights(model, candidates, data, cfg.calibration_batches)
        total = sum(s.cost(None, cfg.metric) for s in found)
        limit = math.floor(cfg.budget * total)
        fixed = sum(s.cost(None, cfg.metric) for s in found if s not in candidates)
        options = [[None] + list(range(s.max_rank, cfg.min_rank - 1, -1)) for s in candidates]
        least = fixed + sum(s.cost(cfg.min_rank, cfg.metric) for s in candidates)
        if least > limit:
            raise ConfigError(f"low-rank: budget={cfg.budget} keeps {limit} of {total} {cfg.metric}, but the "
                              f"layers left dense cost {fixed} and the others at min_rank={cfg.min_rank} "
                              f"{least - fixed} more ({least / total:.3f} of the model): raise budget or lower "
                              "min_rank")
        picks = allocate_ranks([[(s.cost(r, cfg.metric), s.loss(r)) for r in opts]
                                for s, opts in zip(candidates, options)], limit - fixed)
        ranks = {s.name: opts[j] for s, opts, j in zip(candidates, options, picks)}
        chosen = {name: r for name, r in ranks.items() if r is not None}
        factorise_model(model, chosen, {s.name: s.svd for s in candidates})
        if cfg.finetune_epochs:
            finetune(model, ctx.stream("train", who="low-rank's fine-tuning (finetune_epochs > 0)"),
                     cfg.training(epochs=cfg.finetune_epochs), desc="low-rank fine-tune")
        rows = []
        for s in found:
            r = ranks.get(s.name)
            rows.append({"name": s.name, "m": s.m, "n": s.n, "positions": s.positions, "full_rank": min(s.m, s.n),
                         "max_rank": s.max_rank if s in candidates else None, "rank": r,
                         "macs_before": s.cost(None, "macs"), "macs_after": s.cost(r, "macs"),
                         "bytes_before": s.cost(None, "bytes"), "bytes_after": s.cost(r, "bytes"),
                         "loss": s.loss(r) if s in candidates else 0.0})
        record = {"method": self.name, "metric": cfg.metric, "objective": cfg.objective, "budget": cfg.budget,
                  "limit": limit, "total_before": total,
                  "total_after": sum(row[f"{cfg.metric}_after"] for row in rows),
                  "macs_before": sum(row["macs_before"] for row in rows),
                  "macs_after": sum(row["macs_after"] for row in rows),
                  "bytes_before": sum(row["bytes_before"] for row in rows),
                  "bytes_after": sum(row["bytes_after"] for row in rows),
                  "predicted_loss": sum(row["loss"] for row in rows), "ranks": chosen, "layers": rows}
        setattr(model, ATTR, record)
        ctx.report(**{k: v for k, v in record.items() if k != "method"})
        return model.eval()


@dataclasses.dataclass(eq=False)
class LayerStats:
    """One conv / linear layer: its shape as a matrix (``m`` outputs, ``n`` inputs per output),
    ``positions`` (outputs per channel and sample), ``max_rank`` (the largest
    rank that saves; 0 when it may not be factorised), its :func:`svd` ``(u, sigma, vh)`` and
    ``weights`` (each singular direction's share of the objective, :meth:`loss`)."""

    name: str
    m: int
    n: int
    positions: int
    max_rank: int
    svd: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
    weights: np.ndarray | None = None

    def cost(self, rank: int | None, metric: str) -> int:
        """MACs per sample (``macs``) or ``arm-int8`` weight and bias bytes (``bytes``), dense
        (``rank=None``) or at ``rank``."""
        if rank is None:
            return self.positions * self.m * self.n if metric == "macs" else self.m * self.n + 4 * self.m
        core = rank * (self.m + self.n)
        return self.positions * core if metric == "macs" else core + 4 * (rank + self.m)

    def loss(self, rank: int | None) -> float:
        """Normalised error at ``rank``: ``Σ_{i≥rank} weights_i / Σ weights`` (0 dense or for a zero layer)."""
        if rank is None:
            return 0.0
        whole = float(self.weights.sum())
        return float(self.weights[rank:].sum()) / whole if whole > 0 else 0.0


def matrix(layer: nn.Module) -> torch.Tensor:
    """The layer's weight as an ``m × n`` matrix (a convolution's ``(C_out, C_in·k·k)``)."""
    w = layer.weight.detach()
    return w.reshape(w.shape[0], -1)


def max_rank(m: int, n: int) -> int:
    """The largest rank ``r`` with ``r·(m + n) < m·n`` (0 when none).

    >>> max_rank(64, 128), max_rank(16, 9), max_rank(1, 8)
    (42, 5, 0)
    """
    return (m * n - 1) // (m + n)


def layer_stats(model: nn.Module, example: tuple, exclude: Sequence[str] = (), min_rank: int = 1) -> list[LayerStats]:
    """A :class:`LayerStats` of every conv / linear of ``model`` (in model order), positions counted
    over all calls on ``example`` and per sample.  The factorisable ones (``max_rank ≥ min_rank``: a
    plain or masked ``Linear`` / ``Conv1d`` / ``Conv2d``, ungrouped, called, neither in ``exclude`` nor
    inside a module there) carry their SVD and energy weights ``σ²``."""
    calls: dict[str, int] = {}
    batch = example[0].shape[0] if example and example[0].dim() else 1

    def hook(name):
        def count(mod, args, out):
            per_channel = out.numel() // out.shape[-1 if isinstance(mod, nn.Linear) else 1]
            calls[name] = calls.get(name, 0) + per_channel // batch
        return count

    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, LAYER_TYPES)]
    handles = [m.register_forward_hook(hook(n)) for n, m in layers]
    try:
        with torch.no_grad():
            model(*example)
    finally:
        for h in handles:
            h.remove()
    out = []
    for name, layer in layers:
        w = matrix(layer)
        m, n = w.shape
        plain = parametrize.type_before_parametrizations(layer) in LAYER_TYPES and getattr(layer, "groups", 1) == 1
        positions = calls.get(name, 0)
        excluded = any(name == e or name.startswith(e + ".") for e in exclude)
        top = max_rank(m, n) if plain and not excluded and positions else 0
        stats = LayerStats(name, m, n, positions, top)
        if top >= min_rank:
            stats.svd = svd(w.double().cpu().numpy())
            stats.weights = stats.svd[1] ** 2
        out.append(stats)
    return out


def layer_inputs(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The rows the layer's matrix multiplies: a linear's input vectors, a convolution's patches
    (``(C_in·k·k)`` per output position, in the order of :func:`matrix`)."""
    if isinstance(layer, nn.Linear):
        return x.reshape(-1, x.shape[-1])
    if layer.padding_mode != "zeros" or any(layer._reversed_padding_repeated_twice):
        mode = "constant" if layer.padding_mode == "zeros" else layer.padding_mode
        x = nn.functional.pad(x, layer._reversed_padding_repeated_twice, mode=mode)
    two = (lambda t: tuple(t)) if isinstance(layer, nn.Conv2d) else (lambda t: (1,) + tuple(t))
    if isinstance(layer, nn.Conv1d):
        x = x.unsqueeze(-2)
    cols = nn.functional.unfold(x, two(layer.kernel_size), dilation=two(layer.dilation), stride=two(layer.stride))
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


def measure_output_weights(model: nn.Module, found: Sequence[LayerStats], data, batches: int) -> None:
    """Set each layer's ``weights`` to ``σ_i² · ‖v_iᵀ X‖²`` over the layer inputs ``X`` of the first
    ``batches`` batches of ``data`` (at most :data:`MAX_ROWS` evenly spaced rows per call)."""
    sums = {s.name: np.zeros(len(s.svd[1])) for s in found}
    v = {s.name: torch.from_numpy(np.ascontiguousarray(s.svd[2].T)) for s in found}

    def hook(name):
        def measure(mod, args):
            rows = layer_inputs(mod, args[0].detach()).double()
            if rows.shape[0] > MAX_ROWS:
                rows = rows[::math.ceil(rows.shape[0] / MAX_ROWS)]
            sums[name] += ((rows @ v[name]) ** 2).sum(0).numpy()
        return measure

    handles = [model.get_submodule(s.name).register_forward_pre_hook(hook(s.name)) for s in found]
    try:
        with torch.no_grad():
            for k, batch in enumerate(data):
                if k == batches:
                    break
                x, _ = split_batch(batch)
                model(*(x if isinstance(x, (tuple, list)) else (x,)))
    finally:
        for h in handles:
            h.remove()
    for s in found:
        s.weights = s.svd[1] ** 2 * sums[s.name]


def svd(w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Economy SVD ``(u, s, vh)`` of a float64 matrix, singular values descending, through the
    eigenvectors of the smaller Gram matrix (``W Wᵀ`` or ``Wᵀ W``): ten times faster than LAPACK's SVD
    on a 512 × 4608 layer.  ``σ²`` is exact to about ``1e-16 · σ_max²``, and a rank-``r`` product
    ``(u_r · s_r) @ vh_r`` is ``U_r U_rᵀ W`` (``W V_r V_rᵀ`` when tall) — the projection onto the top
    ``r`` singular directions, whatever the error in ``σ`` — so it is the truncated SVD wherever the
    gap ``σ_r − σ_{r+1}`` is not at rounding level.  Directions with ``σ ≤ 1e-7 · σ_max``
    (numerically null) get ``σ = 0`` and a zero singular vector.

    >>> w = np.random.default_rng(0).normal(size=(3, 5))
    >>> u, s, vh = svd(w)
    >>> bool(np.allclose((u * s) @ vh, w)), bool(np.allclose(s, np.linalg.svd(w, compute_uv=False)))
    (True, True)
    """
    wide = w.shape[0] <= w.shape[1]
    lam, vec = np.linalg.eigh(w @ w.T if wide else w.T @ w)
    lam, vec = np.clip(lam[::-1], 0.0, None), vec[:, ::-1]
    s = np.sqrt(lam)
    keep = s > 1e-7 * (s[0] if len(s) else 0.0)
    s = np.where(keep, s, 0.0)
    inv = np.divide(1.0, s, out=np.zeros_like(s), where=keep)
    if wide:                                   # vec = U; V = Wᵀ U / σ
        return vec, s, (vec.T @ w) * inv[:, None]
    return (w @ vec) * inv, s, vec.T           # vec = V; U = W V / σ


def factorise(layer: nn.Module, rank: int,
              decomposition: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None) -> nn.Sequential:
    """Two layers whose product is the rank-``rank`` truncated SVD of ``layer`` (see the module
    docstring); ``rank`` may be anything from 1 to ``min(m, n)`` (full rank reproduces the layer).
    ``decomposition``: the :func:`svd` of the layer's :func:`matrix` when already known.

    >>> lin = torch.nn.Linear(6, 4)
    >>> two = factorise(lin, 4)
    >>> bool(torch.allclose(two(torch.ones(1, 6)), lin(torch.ones(1, 6)), atol=1e-5))
    True
    """
    if parametrize.type_before_parametrizations(layer) not in LAYER_TYPES or getattr(layer, "groups", 1) != 1:
        raise ConfigError(f"low-rank factorises ungrouped Linear / Conv1d / Conv2d layers, not {layer!r}")
    w = matrix(layer)
    m, n = w.shape
    if not 1 <= rank <= min(m, n):
        raise ConfigError(f"low-rank: rank={rank} is out of range for a {m}×{n} layer; allowed: [1, {min(m, n)}]")
    u, s, vh = decomposition if decomposition is not None else svd(w.double().cpu().numpy())
    root = np.sqrt(s[:rank])
    first_w = torch.from_numpy(root[:, None] * vh[:rank])   # √S_r V_rᵀ: r × n
    second_w = torch.from_numpy(u[:, :rank] * root)         # U_r √S_r: m × r
    has_bias = layer.bias is not None
    if isinstance(layer, nn.Linear):
        first, second = nn.Linear(n, rank, bias=False), nn.Linear(rank, m, bias=has_bias)
    else:
        conv = parametrize.type_before_parametrizations(layer)
        first = conv(layer.in_channels, rank, layer.kernel_size, stride=layer.stride, padding=layer.padding,
                     dilation=layer.dilation, bias=False, padding_mode=layer.padding_mode)
        second = conv(rank, m, 1, bias=has_bias)
    ref = layer.weight
    first.to(device=ref.device, dtype=ref.dtype)
    second.to(device=ref.device, dtype=ref.dtype)
    with torch.no_grad():
        first.weight.copy_(first_w.reshape(first.weight.shape).to(ref.dtype))
        second.weight.copy_(second_w.reshape(second.weight.shape).to(ref.dtype))
        if has_bias:
            second.bias.copy_(layer.bias.detach())
    return nn.Sequential(first, second).train(layer.training)


def factorise_model(model: nn.Module, ranks: dict[str, int],
                    decompositions: dict[str, tuple] | None = None) -> nn.Module:
    """Replace each layer named in ``ranks`` by :func:`factorise` of it at that rank (in place; with
    its :func:`svd` from ``decompositions`` where given); return ``model``."""
    for name, rank in ranks.items():
        set_module(model, name, factorise(model.get_submodule(name), rank, (decompositions or {}).get(name)))
    return model


def allocate_ranks(options: Sequence[Sequence[tuple[int, float]]], budget: int,
                   max_buckets: int = MAX_BUCKETS) -> list[int]:
    """Pick one option ``(cost, loss)`` per group, least summed loss with summed cost ≤ ``budget``.

    A multiple-choice knapsack by dynamic programming over the cost: exact when ``budget``
    divided by the greatest common divisor of the costs is at most ``max_buckets``; else every
    cost is rounded up to a multiple of about ``budget / max_buckets`` (the result still fits
    the budget).  Ties go to the earlier option.  Returns the chosen index in each group;
    :class:`ConfigError` when no choice fits.

    >>> allocate_ranks([[(10, 0.0), (6, 0.2), (3, 0.5)], [(10, 0.0), (4, 0.1), (2, 0.9)]], 12)
    [1, 1]
    >>> allocate_ranks([[(10, 0.0), (6, 0.2), (3, 0.5)], [(10, 0.0), (4, 0.1), (2, 0.9)]], 14)
    [0, 1]
    """
    if budget < 0:
        raise ConfigError(f"allocate_ranks: budget={budget} is negative")
    g = math.gcd(*(int(c) for group in options for c, _ in group)) or 1
    unit = g * max(1, math.ceil(budget / g / max_buckets))
    top = budget // unit
    best = np.zeros(top + 1)            # least loss of the groups so far within b units of cost
    picks, sizes = [], []
    for group in options:
        new = np.full(top + 1, np.inf)
        pick = np.full(top + 1, -1, dtype=np.int64)
        size = [-(-int(c) // unit) for c, _ in group]
        for j, ((_, loss), k) in enumerate(zip(group, size)):
            if k > top:
                continue
            cand = best[:top + 1 - k] + float(loss)
            better = cand < new[k:]
            np.copyto(new[k:], cand, where=better)
            np.copyto(pick[k:], j, where=better)
        best = new
        picks.append(pick)
        sizes.append(size)
    if not np.isfinite(best[top]):
        raise ConfigError(f"allocate_ranks: no choice of options fits budget={budget}")
    out, b = [], top
    for pick, size in zip(reversed(picks), reversed(sizes)):
        j = int(pick[b])
        out.append(j)
        b -= size[j]
    return out[::-1]


@hookimpl
def register_pruners(register):
    register(LowRankPruner)
