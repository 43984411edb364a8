"""``bo-mixed-precision`` — Bayesian optimisation of per-layer weight bits, fine-tuned in the loop.

The search core of BOMP-NAS (van Son et al., "BOMP-NAS: Bayesian Optimization
Mixed Precision NAS", 2023): a Gaussian-process
surrogate over the mixed-precision configuration, an expected-improvement
acquisition, and quantization-aware fine-tuning (QAFT) of every candidate before
it is scored.  The architecture (width) part of BOMP-NAS is not searched here:
the model's widths stay as given.

**Space.** One weight width per Conv/Linear layer from ``bits`` (default 8, 4, 2;
1 is a binary layer, ±α per output channel), activations int8 everywhere, so the
result deploys on ``arm-int8`` (:mod:`sdk.bit_search`: grids, cost model, QAFT).

**Budget (hard).** ``max_weight_bytes`` (what ``arm-int8`` stores for the layers'
weights and biases, the ``bytes`` of the artifact's ``profile.json`` rows, with
its ``int4_storage`` option; as ``mixed-precision`` counts them), ``max_bops``
(Σ MACs · weight bits · 8) and ``max_packed_bytes`` (weights packed at their
width, the BOMP-NAS size; no ``arm-int8`` artifact has it).  On ``arm-int8``
codes below 4 bits ship inside INT4 or int8 storage, so only the BOPs (and the
packed size) reward them.  Every proposed configuration meets every budget given
— infeasible ones are never scored — and the objective is the held-out accuracy
under that hard budget (ties: the smaller of the first budget's cost).

**Search.** ``init_trials`` initial configurations — the widest uniform width
within the budget (when one is), then distinct random feasible ones
(:func:`sdk.bit_search.random_feasible`) — then until ``trials`` (or
``max_seconds``) are spent: fit the GP (:class:`GaussianProcess`: Matérn-5/2
kernel on ``log2(bits) / 3`` per layer, the scores standardised, length scale
and noise by maximum marginal likelihood over a grid), and score next the
unscored feasible configuration of greatest expected improvement
(:func:`expected_improvement`) over the best so far.  The candidates are every
feasible configuration when the space has at most ``candidates`` of them, else
``candidates`` random feasible ones plus one- and two-layer mutations of the
best five scored (kept only where feasible).  Each trial is
:func:`sdk.bit_search.evaluate`: ``finetune_steps`` steps of QAFT from the
trained model (the same seed for all, so trials differ by their bits only), the
integer simulation's accuracy on the ``val`` stream — or, when none is given, on
the last ``holdout`` fraction of the ``train`` batches, which the fine-tuning
then does not see.

**Result.** The best configuration is fine-tuned ``final_epochs`` epochs on all
``train`` batches (0: ``finetune_steps`` steps, as in its trial) and baked
(:func:`sdk.bit_search.apply_bits`): weights on their grids with the hints that
make ``arm-int8`` ship those codes, the learned activation ranges as output
hints.  The trial history (bits, accuracy, costs, time) is reported to the
artifact manifest's ``stages`` and kept as ``model._edgepack_bit_search``.

>>> import numpy as np
>>> gp = GaussianProcess(lengthscale=0.5, noise=1e-6).fit(np.array([[0.0], [1.0]]), np.array([0.0, 1.0]))
>>> [round(float(v), 3) for v in gp.predict(np.array([[0.0], [1.0]]))[0]]
[0.0, 1.0]
>>> round(float(expected_improvement(np.array([1.0]), np.array([0.0]), 0.5)[0]), 3)
0.5
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Iterable, Sequence

import numpy as np
import torch

from sdk import bit_search as bs
from sdk import hookimpl
from sdk.base import Quantizer
from sdk.channels import example_from
from sdk.config import Config, check_bool, check_int, check_range
from sdk.context import DataStreams, StageContext
from sdk.errors import ConfigError, InputError

#: the model attribute that keeps the search record
ATTR = "_edgepack_bit_search"
#: a budget field of the config and the cost metric it bounds
BUDGETS = bs.BUDGETS
#: the grids the marginal likelihood chooses the GP's hyper-parameters from
LENGTHSCALES = tuple(float(v) for v in np.geomspace(0.05, 5.0, 12))
NOISES = (1e-4, 1e-3, 1e-2, 1e-1, 0.3)


def matern52(a: np.ndarray, b: np.ndarray, lengthscale: float) -> np.ndarray:
    """The Matérn-5/2 kernel ``(1 + √5 r + 5r²/3)·exp(−√5 r)``, ``r = ‖a − b‖ / lengthscale``,
    between the rows of ``a`` and ``b``.

    >>> round(float(matern52(np.zeros((1, 2)), np.ones((1, 2)), 1.0)[0, 0]), 4)
    0.3173
    """
    d2 = np.maximum(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1), 0.0)
    r = np.sqrt(d2) / lengthscale
    return (1.0 + math.sqrt(5) * r + 5.0 / 3.0 * r ** 2) * np.exp(-math.sqrt(5) * r)


class GaussianProcess:
    """A GP regression surrogate: Matérn-5/2 kernel of unit variance on the standardised scores
    ``(y − mean) / std`` plus ``noise`` (a variance, in standardised units) on the diagonal.
    :meth:`fit` conditions on observations; :meth:`predict` gives the posterior mean and
    variance in the scores' units; :meth:`select` picks the hyper-parameters."""

    def __init__(self, lengthscale: float = 0.5, noise: float = 1e-3):
        self.lengthscale, self.noise = float(lengthscale), float(noise)

    def fit(self, x: np.ndarray, y: np.ndarray) -> "GaussianProcess":
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        self.x = x
        self.mean = float(y.mean())
        std = float(y.std())
        self.std = std if std > 1e-12 else 1.0
        z = (y - self.mean) / self.std
        k = matern52(x, x, self.lengthscale) + self.noise * np.eye(len(x))
        self.chol = np.linalg.cholesky(k)
        self.alpha = np.linalg.solve(self.chol.T, np.linalg.solve(self.chol, z))
        self.lml = float(-0.5 * z @ self.alpha - np.log(np.diag(self.chol)).sum()
                         - 0.5 * len(x) * math.log(2 * math.pi))
        return self

    def predict(self, xs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Posterior ``(mean, variance)`` of the scores at the rows of ``xs`` (of the latent
        function: without the observation noise)."""
        ks = matern52(np.asarray(xs, np.float64), self.x, self.lengthscale)
        mean = ks @ self.alpha
        v = np.linalg.solve(self.chol, ks.T)
        var = np.maximum(1.0 - (v ** 2).sum(0), 0.0)
        return self.mean + self.std * mean, self.std ** 2 * var

    @classmethod
    def select(cls, x: np.ndarray, y: np.ndarray, lengthscales: Sequence[float] = LENGTHSCALES,
               noises: Sequence[float] = NOISES) -> "GaussianProcess":
        """The GP of greatest log marginal likelihood over the grid of hyper-parameters, fitted."""
        best = None
        for ls, noise in itertools.product(lengthscales, noises):
            gp = cls(ls, noise).fit(x, y)
            if best is None or gp.lml > best.lml:
                best = gp
        return best


def expected_improvement(mean: np.ndarray, std: np.ndarray, best: float, xi: float = 0.0) -> np.ndarray:
    """``E[max(f − best − xi, 0)]`` for ``f ~ N(mean, std²)``: ``(μ − b)·Φ(z) + σ·φ(z)``,
    ``z = (μ − b) / σ`` (``max(μ − b, 0)`` where ``σ = 0``).

    >>> [round(float(v), 4) for v in expected_improvement(np.array([0.0, 1.0]), np.array([1.0, 1.0]), 0.0)]
    [0.3989, 1.0833]
    """
    mean, std = np.asarray(mean, np.float64), np.asarray(std, np.float64)
    gain = mean - best - xi
    safe = np.where(std > 0, std, 1.0)
    z = gain / safe
    cdf = 0.5 * (1.0 + np.vectorize(math.erf)(z / math.sqrt(2)))
    pdf = np.exp(-0.5 * z ** 2) / math.sqrt(2 * math.pi)
    return np.where(std > 0, gain * cdf + std * pdf, np.maximum(gain, 0.0))


def encode(bits: Sequence[Sequence[int]]) -> np.ndarray:
    """GP inputs of configurations: ``log2(bits) / 3`` per layer (8 bits → 1, binary → 0)."""
    return np.log2(np.asarray(bits, np.float64)) / 3.0


class BOMixedPrecision(Quantizer):
    """Per-layer weight bits by Bayesian optimisation (GP + EI) with QAFT in the loop (BOMP-NAS)."""

    name = "bo-mixed-precision"
    version = "1.0"
    post_training = False
    streams = ("train",)

    @dataclasses.dataclass(frozen=True)
    class Config(Config):
        max_weight_bytes: int | None = None    # arm-int8's stored conv/linear weight + bias bytes
        max_bops: int | None = None            # Σ MACs · weight bits · 8
        max_packed_bytes: int | None = None    # weights packed at their width + int32 biases
        bits: tuple[int, ...] = (8, 4, 2)      # the widths a layer may get (1: binary)
        int4_storage: str = "where-fast"       # arm-int8's int4 option: which layers store INT4
        trials: int = 20                       # scored configurations, initial ones included
        max_seconds: float | None = None       # wall-clock bound of the search (None: trials only)
        init_trials: int = 6                   # random feasible configurations before the GP
        candidates: int = 2048                 # acquisition candidates (enumerated when the space is smaller)
        finetune_steps: int = 60               # QAFT steps per trial
        lr: float = 1e-3                       # QAFT learning rate (trials and final)
        final_epochs: int = 3                  # QAFT epochs of the chosen configuration (0: finetune_steps)
        holdout: float = 0.2                   # train batches held out for scoring when no val stream
        ema_decay: float = 0.9                 # activation range EMA (as qat)
        seed: int = 0
        progress: bool = True

        def __post_init__(self):
            owner = "bo-mixed-precision"
            bs.check_search_fields(owner, self)
            for field in ("trials", "init_trials", "candidates"):
                check_int(owner, field, getattr(self, field), 1)
            check_int(owner, "seed", self.seed, 0)
            check_bool(owner, "progress", self.progress)
            if self.init_trials > self.trials:
                raise ConfigError(f"{owner}: init_trials={self.init_trials} exceeds trials={self.trials}")
            if self.max_seconds is not None:
                check_range(owner, "max_seconds", self.max_seconds, 0.0, lo_open=True)

        def limits(self) -> dict[str, int]:
            """``{cost metric: limit}`` of the budgets given."""
            return bs.budget_limits(self)

    def apply(self, model: torch.nn.Module, data: Iterable | dict | None = None) -> torch.nn.Module:
        """Search and bake a copy of ``model``; ``data``: ``(x, y)`` batches (``train``) or
        ``{"train": ..., "val": ...}``.  The search record is ``result._edgepack_bit_search``."""
        return self.run(model, StageContext(DataStreams.of(data), original=model, stage=self.name))

    def run(self, model: torch.nn.Module, ctx: StageContext) -> torch.nn.Module:
        cfg = self.config
        if not isinstance(model, torch.nn.Module):
            raise InputError(f"bo-mixed-precision quantizes a torch.nn.Module, got {type(model).__name__}")
        limits = cfg.limits()
        if not limits:
            raise ConfigError("bo-mixed-precision: give a budget: max_weight_bytes, max_bops and/or "
                              "max_packed_bytes (module docstring)")
        tune, score_on, train = bs.search_streams(ctx, self.name, "it fine-tunes every candidate",
                                                  self.config.holdout)
        layers = bs.search_layers(model, example_from(train, None, self.name))
        bs.check_budget(layers, cfg.bits, limits, int4=cfg.int4_storage, who=self.name)
        trials = self.search(model, layers, limits, tune, score_on)
        best = max(trials, key=lambda t: (t.accuracy, -t.costs[next(iter(limits))]))
        final_kw = ({"epochs": cfg.final_epochs, "steps": None} if cfg.final_epochs
                    else {"epochs": 10 ** 6, "steps": cfg.finetune_steps})
        out = bs.apply_bits(model, layers, best.bits, train, lr=cfg.lr, seed=cfg.seed, ema_decay=cfg.ema_decay,
                            method=self.name, **final_kw)
        record = {"objective": "held-out accuracy of the int8 simulation under the hard budget",
                  "budget": limits, "bits_choices": list(cfg.bits), "int4_storage": cfg.int4_storage,
                  "layers": [layer.to_dict() for layer in layers],
                  "trials": [t.to_dict() for t in trials], "search_seconds": round(trials[-1].seconds, 3),
                  "best": {"index": best.index, "bits": dict(zip((l.name for l in layers), best.bits)),
                           "accuracy": best.accuracy, "costs": best.costs},
                  "scored_on": "val" if ctx.data.get("val") is not None else f"last {len(score_on)} train batches"}
        setattr(out, ATTR, record)
        ctx.report(**record)
        return out

    def search(self, model, layers, limits, tune, score_on) -> list[bs.Trial]:
        """The BO loop (module docstring); returns the scored trials in order."""
        cfg = self.config
        rng = np.random.default_rng(cfg.seed)
        space = self._enumerate(layers, limits)
        seen: set[tuple[int, ...]] = set()

        def propose(trials: list[bs.Trial]) -> tuple[tuple[int, ...], str]:
            if not trials:
                uniform = next((c for c in ((b,) * len(layers) for b in cfg.bits)
                                if bs.feasible(layers, c, limits, int4=cfg.int4_storage)), None)
                if uniform is not None:
                    return uniform, "uniform"
            if len(trials) < cfg.init_trials:
                return self._initial(layers, limits, rng, seen), "initial"
            pool = [c for c in (space if space is not None else self._candidates(layers, limits, trials, rng))
                    if c not in seen]
            if not pool:
                return self._initial(layers, limits, rng, seen), "random"
            gp = GaussianProcess.select(encode([t.bits for t in trials]), np.array([t.accuracy for t in trials]))
            mean, var = gp.predict(encode(pool))
            ei = expected_improvement(mean, np.sqrt(var), max(t.accuracy for t in trials))
            return pool[int(np.argmax(ei))], "acquisition"

        def score(bits: tuple[int, ...]) -> float:
            seen.add(bits)
            return bs.evaluate(model, layers, bits, tune, score_on, finetune_steps=cfg.finetune_steps, lr=cfg.lr,
                               seed=cfg.seed, ema_decay=cfg.ema_decay)

        budget = bs.SearchBudget(cfg.trials if space is None else min(cfg.trials, len(space)), cfg.max_seconds)
        return bs.run_trials(budget, propose, score, layers=layers, metrics=tuple(dict.fromkeys(
            ("bytes", "bops", *limits))), limits=limits, int4=cfg.int4_storage, desc=self.name,
            progress=cfg.progress)

    def _enumerate(self, layers, limits) -> list[tuple[int, ...]] | None:
        """Every feasible configuration when there are at most ``candidates`` in all, else None."""
        if len(self.config.bits) ** len(layers) > self.config.candidates:
            return None
        return [c for c in itertools.product(self.config.bits, repeat=len(layers))
                if bs.feasible(layers, c, limits, int4=self.config.int4_storage)]

    def _initial(self, layers, limits, rng, seen) -> tuple[int, ...]:
        """A random feasible configuration not scored yet (one scored already after 50 draws)."""
        for _ in range(50):
            c = bs.random_feasible(layers, self.config.bits, limits, rng, int4=self.config.int4_storage)
            if c not in seen:
                return c
        return c

    def _candidates(self, layers, limits, trials, rng) -> list[tuple[int, ...]]:
        cfg = self.config
        found = {bs.random_feasible(layers, cfg.bits, limits, rng, int4=cfg.int4_storage)
                 for _ in range(cfg.candidates)}
        for t in sorted(trials, key=lambda t: -t.accuracy)[:5]:
            for _ in range(max(1, cfg.candidates // 10)):
                c = list(t.bits)
                for i in rng.choice(len(layers), size=min(len(layers), int(rng.integers(1, 3))), replace=False):
                    c[i] = int(rng.choice(cfg.bits))
                if bs.feasible(layers, c, limits, int4=cfg.int4_storage):
                    found.add(tuple(c))
        return sorted(found)


@hookimpl
def register_quantizers(register):
    register(BOMixedPrecision)
