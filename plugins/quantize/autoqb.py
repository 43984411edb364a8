"""``autoqb`` — AutoQB: a DDPG agent picks each layer's weight bits (binary included) under a budget.

Lou, Guo, Liu, Jiang and Fan, "AutoQB: AutoML for Network Quantization and
Binarization on Mobile Devices" (arXiv:1902.05690, 2019), after HAQ (Wang, Liu,
Lin, Lin and Han, CVPR 2019) and AMC (He et al., ECCV 2018).  The agent walks the
conv / linear layers one by one; each step it sees the layer's **state** and emits
a continuous **action** in [0, 1] that becomes the layer's weight bits.  After an
episode (one action per layer) the network is quantized at those bits, briefly
fine-tuned, and scored: the **reward** is the accuracy it reaches.

**Space and cost.** One weight width per Conv/Linear layer from ``bits`` (default
8, 4, 2, 1; 1 is a binary layer, ±α per output channel), activations int8, so the
result deploys on ``arm-int8``.  Grids, cost model, QAFT and baking are
:mod:`sdk.bit_search`'s, shared with ``bo-mixed-precision``.  Budgets (hard, any
of them): ``max_weight_bytes`` (what ``arm-int8`` stores for the layers' weights
and biases, the ``bytes`` of the artifact's ``profile.json`` rows), ``max_bops``
(Σ MACs · weight bits · 8) and ``max_packed_bytes`` (weights packed at their
width).  On ``arm-int8`` codes below 4 bits ship inside INT4 or int8 storage, so a
bytes budget alone never favours 1- or 2-bit layers; BOPs and the packed size do.

**State** (:func:`layer_states`): per layer, the layer index, input and output
channels, kernel size, stride, MACs, parameters, whether it is a convolution
(each min-max normalised over the layers, as HAQ does), then the fraction of the
budget spent before it and the previous layer's action.

**Action → bits** (:func:`action_to_bits`): the sorted widths split [0, 1] into
equal bins (``1, 2, 4, 8``: [0, ¼) is binary ... [¾, 1] is 8 bits).

**Budget enforcement** (:func:`clip_choice`, :func:`enforce_budget`): no episode
ever exceeds the budget.  At every step the layer gets the widest width not above
the agent's that leaves room for every remaining layer at its cheapest (AutoQB's
and AMC's action clipping); a budget below the all-cheapest configuration is
refused with :class:`ConfigError` naming the minimum achievable.

**Agent** (:class:`DDPG`, Lillicrap et al. 2016): actor and critic MLPs
(``hidden`` units, two hidden layers; the actor's output through a sigmoid, its
pre-activation penalised by ``action_reg`` so that it does not saturate where no
gradient reaches it), target copies following them by soft updates (``tau``), a
replay buffer (``buffer_size``, minibatches of ``batch_size``), Adam at
``actor_lr`` / ``critic_lr``, ``updates`` minibatch steps after each episode.  As
in HAQ every transition of an episode gets the episode's reward, and the critic's
target is ``r + γ · Q'(s', μ'(s'))`` (γ = ``discount``; HAQ uses 1; the default 0
makes the target each step's episode reward, which learnt fastest in the few
episodes a QAFT-scored search can afford: tests/methods/test_autoqb.py).  The
reward is the accuracy minus a moving baseline (``baseline_decay``, AMC's moving
average), divided by the spread of the rewards so far.  The transition stores the
agent's own action (the clipping is part of the environment).  Exploration: the
first ``warmup_episodes`` act uniformly at random and only fill the buffer; then
the actor's action plus truncated normal noise on [0, 1] of width ``noise``,
multiplied by ``noise_decay`` after each episode (HAQ's schedule).

**Reward and bounded search** (:func:`search`): each episode's configuration is
fine-tuned ``finetune_steps`` QAFT steps (:func:`sdk.bit_search.evaluate`, the same
seed for all) and scored by the integer simulation's accuracy on the ``val``
stream, or on the last ``holdout`` fraction of the ``train`` batches, which the
fine-tuning then does not see; a configuration met again is not scored again.  At
most ``episodes`` episodes (warm-up included), none started after
``max_seconds``; the progress bar shows the best accuracy.

**Result.** The best configuration seen is fine-tuned ``final_epochs`` epochs on all
``train`` batches (0: ``finetune_steps`` steps) and baked
(:func:`sdk.bit_search.apply_bits`: weights on their grids with the hints that make
``arm-int8`` ship those codes).  The episode history (bits, accuracy, costs, time,
warm-up or agent) goes to the manifest's ``stages`` (``ctx.report``) and stays on
the result as ``model._edgepack_autoqb``.

>>> costs = [[(1,), (2,), (4,)], [(1,), (2,), (4,)], [(1,), (2,), (4,)]]
>>> enforce_budget([2, 2, 2], costs, (7,))
[2, 1, 0]
>>> action_to_bits(0.6, (8, 4, 2, 1))
4
"""

from __future__ import annotations

import copy
import dataclasses
import math
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
from torch import nn

from sdk import bit_search as bs
from sdk import hookimpl
from sdk.base import Quantizer
from sdk.channels import example_from
from sdk.config import Config, check_bool, check_int, check_range
from sdk.context import DataStreams, StageContext
from sdk.errors import ConfigError, InputError

#: the weight widths a layer may take by default (1: binary ±α per output channel)
BITS = (8, 4, 2, 1)


# ---------------------------------------------------------------------------
# actions, states, the budget
# ---------------------------------------------------------------------------

def action_to_bits(action: float, choices: Sequence[int]) -> int:
    """The bits of ``action`` in [0, 1]: the sorted ``choices`` split [0, 1] into equal bins.

    >>> [action_to_bits(a, (1, 2, 4, 8)) for a in (0.0, 0.26, 0.74, 1.0)]
    [1, 2, 4, 8]
    """
    ordered = sorted(choices)
    return ordered[_bin(action, len(ordered))]


def _bin(action: float, n: int) -> int:
    return min(int(float(np.clip(action, 0.0, 1.0)) * n), n - 1)


def _centre(index: int, n: int) -> float:
    """The action at the middle of choice ``index``'s bin."""
    return (index + 0.5) / n


def least_rest(costs: Sequence[Sequence[tuple[int, ...]]]) -> np.ndarray:
    """``rest[t]``: per resource, the least the layers ``t..`` cost (each at its cheapest choice)."""
    res = [np.asarray(c, np.int64) for c in costs]
    dims = res[0].shape[1] if res else 0
    rest = np.zeros((len(res) + 1, dims), np.int64)
    for t in range(len(res) - 1, -1, -1):
        rest[t] = rest[t + 1] + res[t].min(axis=0)
    return rest


def _fits(t: int, index: int, used: np.ndarray, costs, rest: np.ndarray, budgets: np.ndarray) -> bool:
    """Whether layer ``t`` at choice ``index`` leaves room for the layers after it at their cheapest."""
    return bool(np.all(used + np.asarray(costs[t][index], np.int64) + rest[t + 1] <= budgets))


def clip_choice(t: int, index: int, used: np.ndarray, costs, rest: np.ndarray, budgets: np.ndarray) -> int:
    """The choice layer ``t`` takes when the agent asks for ``index`` (choices sorted by bits): the
    widest one not above it that still lets the remaining layers fit; where none does (costs that
    are not monotone in the bits), the cheapest feasible one."""
    for j in range(index, -1, -1):
        if _fits(t, j, used, costs, rest, budgets):
            return j
    fits = [j for j in range(len(costs[t])) if _fits(t, j, used, costs, rest, budgets)]
    if not fits:       # only below the all-cheapest minimum, which sdk.bit_search.check_budget refuses first
        raise ConfigError(f"autoqb: no bit width of layer {t} fits the budget {tuple(budgets)}")
    return min(fits, key=lambda j: tuple(costs[t][j]))


def enforce_budget(wanted: Sequence[int], costs: Sequence[Sequence[tuple[int, ...]]],
                   budgets: tuple[int, ...]) -> list[int]:
    """The choice indices an episode takes when the agent asks for ``wanted`` (one per layer; choices
    ordered by bits, ``costs[t][j]`` one integer per budget), layer by layer as :func:`clip_choice`.

    >>> enforce_budget([1, 1], [[(1,), (3,)], [(1,), (3,)]], (4,))
    [1, 0]
    """
    rest, limit = least_rest(costs), np.asarray(budgets, np.int64)
    used = np.zeros(len(budgets), np.int64)
    taken = []
    for t, want in enumerate(wanted):
        j = clip_choice(t, int(want), used, costs, rest, limit)
        used += np.asarray(costs[t][j], np.int64)
        taken.append(j)
    return taken


#: static features of a layer's state, in order (then: budget spent before it, previous action)
STATE_FEATURES = ("index", "in_channels", "out_channels", "kernel", "stride", "macs", "params", "is_conv")


def layer_states(layers: Sequence[dict]) -> np.ndarray:
    """The static part of each layer's state: :data:`STATE_FEATURES` from each ``layers`` row
    (``index`` is the position), min-max normalised per feature over the layers (a constant
    feature becomes 0).

    >>> layer_states([{"in_channels": 4, "out_channels": 8, "kernel": 1, "stride": 1, "macs": 32,
    ...                "params": 32, "is_conv": 0}, {"in_channels": 8, "out_channels": 2, "kernel": 1,
    ...                "stride": 1, "macs": 16, "params": 16, "is_conv": 0}])[:, :3].tolist()
    [[0.0, 0.0, 1.0], [1.0, 1.0, 0.0]]
    """
    raw = np.array([[t] + [float(row[f]) for f in STATE_FEATURES[1:]] for t, row in enumerate(layers)],
                   np.float64)
    lo, span = raw.min(axis=0), np.ptp(raw, axis=0)
    return ((raw - lo) / np.where(span > 0, span, 1.0)).astype(np.float32)


# ---------------------------------------------------------------------------
# the agent
# ---------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class AgentConfig(Config):
    """The DDPG agent's and the episode loop's fields (module docstring)."""

    episodes: int = 60                 # at most this many episodes, warm-up included
    max_seconds: float | None = None   # no episode starts after this many seconds of search
    warmup_episodes: int = 15          # uniformly random episodes that only fill the replay buffer
    hidden: int = 64                   # units of each of the two hidden layers (actor and critic)
    actor_lr: float = 1e-3
    critic_lr: float = 2e-3
    tau: float = 0.01                  # soft update of the target networks
    discount: float = 0.0              # γ of the TD target (0: each step's target is the episode's reward)
    action_reg: float = 0.01           # weight of the actor's pre-sigmoid action² (keeps it off saturation)
    buffer_size: int = 2000            # transitions the replay buffer keeps
    batch_size: int = 64
    updates: int = 32                  # minibatch updates of the agent after each episode past the warm-up
    noise: float = 0.5                 # width of the truncated normal exploration noise
    noise_decay: float = 0.95          # noise *= noise_decay after each episode past the warm-up
    baseline_decay: float = 0.5        # weight of the newest episode in the moving reward baseline
    seed: int = 0
    progress: bool = True

    def __post_init__(self):
        owner = self.type_tag
        check_int(owner, "episodes", self.episodes, 1)
        if self.max_seconds is not None:
            check_range(owner, "max_seconds", self.max_seconds, 0.0, lo_open=True)
        check_int(owner, "warmup_episodes", self.warmup_episodes, 0)
        for field in ("hidden", "buffer_size", "batch_size", "updates"):
            check_int(owner, field, getattr(self, field), 1)
        check_int(owner, "seed", self.seed, 0)
        check_range(owner, "action_reg", self.action_reg, 0.0, 1e3)
        for field in ("actor_lr", "critic_lr"):
            check_range(owner, field, getattr(self, field), 0.0, 10.0, lo_open=True)
        check_range(owner, "noise", self.noise, 0.0, 1e3, lo_open=True)
        for field in ("tau", "baseline_decay"):
            check_range(owner, field, getattr(self, field), 0.0, 1.0, lo_open=True)
        for field in ("discount", "noise_decay"):
            check_range(owner, field, getattr(self, field), 0.0, 1.0)
        check_bool(owner, "progress", self.progress)


AgentConfig.type_tag = "autoqb.agent"


def _mlp(inputs: int, hidden: int, out: nn.Module | None = None) -> nn.Sequential:
    layers = [nn.Linear(inputs, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 1)]
    return nn.Sequential(*layers, *([out] if out is not None else []))


class ReplayBuffer:
    """A ring of the last ``capacity`` transitions ``(state, action, reward, next state, done)``."""

    def __init__(self, capacity: int, state_dim: int):
        self.capacity, self.size, self.next = capacity, 0, 0
        self.s = np.zeros((capacity, state_dim), np.float32)
        self.a = np.zeros((capacity, 1), np.float32)
        self.r = np.zeros((capacity, 1), np.float32)
        self.s1 = np.zeros((capacity, state_dim), np.float32)
        self.done = np.zeros((capacity, 1), np.float32)

    def add(self, s, a: float, r: float, s1, done: bool) -> None:
        i = self.next
        self.s[i], self.a[i], self.r[i], self.s1[i], self.done[i] = s, a, r, s1, float(done)
        self.next = (i + 1) % self.capacity
        self.size = min(self.size + 1, self.capacity)

    def sample(self, n: int, rng: np.random.Generator) -> tuple[torch.Tensor, ...]:
        idx = rng.integers(0, self.size, size=min(n, self.size))
        return tuple(torch.from_numpy(v[idx]) for v in (self.s, self.a, self.r, self.s1, self.done))


class DDPG:
    """Deep deterministic policy gradient (Lillicrap et al., ICLR 2016) for a one-dimensional action
    in [0, 1]: the actor ``μ(s)`` (sigmoid output), the critic ``Q(s, a)``, their target copies,
    a replay buffer and truncated normal exploration.

    >>> agent = DDPG(3, AgentConfig(progress=False))
    >>> 0.0 <= agent.act(np.zeros(3, np.float32), noise=0.0) <= 1.0
    True
    """

    def __init__(self, state_dim: int, cfg: AgentConfig):
        self.cfg = cfg
        self.rng = np.random.default_rng(cfg.seed)
        with torch.random.fork_rng():
            torch.manual_seed(cfg.seed)
            self.actor = _mlp(state_dim, cfg.hidden)
            self.critic = _mlp(state_dim + 1, cfg.hidden)
        self.actor_target = copy.deepcopy(self.actor).requires_grad_(False)
        self.critic_target = copy.deepcopy(self.critic).requires_grad_(False)
        self.actor_opt = torch.optim.Adam(self.actor.parameters(), lr=cfg.actor_lr)
        self.critic_opt = torch.optim.Adam(self.critic.parameters(), lr=cfg.critic_lr)
        self.buffer = ReplayBuffer(cfg.buffer_size, state_dim)

    def act(self, state: np.ndarray, noise: float) -> float:
        """The actor's action for ``state`` plus truncated normal noise of width ``noise`` on [0, 1]."""
        with torch.no_grad():
            mean = float(torch.sigmoid(self.actor(torch.from_numpy(state)[None]))[0, 0])
        return truncated_normal(mean, noise, self.rng) if noise > 0 else mean

    def random_action(self, state: np.ndarray | None = None) -> float:
        """A uniform action in [0, 1] (the warm-up's; ``state`` is ignored)."""
        return float(self.rng.uniform(0.0, 1.0))

    def update(self) -> tuple[float, float]:
        """One minibatch step of the critic (TD target from the target networks) and the actor
        (ascending ``Q(s, μ(s))``), then the soft update of both targets; ``(critic loss, −Q)``."""
        cfg = self.cfg
        s, a, r, s1, done = self.buffer.sample(cfg.batch_size, self.rng)
        with torch.no_grad():
            q_next = self.critic_target(torch.cat([s1, torch.sigmoid(self.actor_target(s1))], 1))
            target = r + cfg.discount * (1.0 - done) * q_next
        critic_loss = nn.functional.mse_loss(self.critic(torch.cat([s, a], 1)), target)
        self.critic_opt.zero_grad(set_to_none=True)
        critic_loss.backward()
        self.critic_opt.step()
        z = self.actor(s)
        actor_loss = -self.critic(torch.cat([s, torch.sigmoid(z)], 1)).mean() + cfg.action_reg * (z ** 2).mean()
        self.actor_opt.zero_grad(set_to_none=True)
        actor_loss.backward()
        self.actor_opt.step()
        with torch.no_grad():
            for net, tgt in ((self.actor, self.actor_target), (self.critic, self.critic_target)):
                for p, q in zip(net.parameters(), tgt.parameters()):
                    q.mul_(1.0 - cfg.tau).add_(p, alpha=cfg.tau)
        return float(critic_loss.detach()), float(actor_loss.detach())


def truncated_normal(mean: float, width: float, rng: np.random.Generator, lo: float = 0.0,
                     hi: float = 1.0) -> float:
    """A sample of the normal distribution ``N(mean, width²)`` truncated to ``[lo, hi]`` (inverse CDF).

    >>> rng = np.random.default_rng(0)
    >>> all(0.0 <= truncated_normal(0.99, 0.5, rng) <= 1.0 for _ in range(100))
    True
    """
    from scipy.special import ndtr, ndtri

    mean = float(np.clip(mean, lo, hi))
    a, b = ndtr((lo - mean) / width), ndtr((hi - mean) / width)
    return float(np.clip(mean + width * ndtri(a + rng.uniform() * (b - a)), lo, hi))


# ---------------------------------------------------------------------------
# the episodes
# ---------------------------------------------------------------------------

class Episodes:
    """The agent and its environment: each :meth:`propose` walks the layers once (an episode) and
    returns the bits it chose within the budget; :meth:`observe` hands it that episode's reward
    (stored, then ``updates`` minibatch steps once the warm-up is over).

    ``features``: one :data:`STATE_FEATURES` row per layer; ``choices``: the bit widths;
    ``costs[t][j]``: layer ``t``'s resources (one integer per budget) at the ``j``-th smallest width;
    ``budgets``: the limits, one per resource.
    """

    def __init__(self, features: Sequence[dict], choices: Sequence[int],
                 costs: Sequence[Sequence[tuple[int, ...]]], budgets: tuple[int, ...], cfg: AgentConfig):
        self.ordered = sorted(int(c) for c in choices)
        if len(costs) != len(features) or any(len(c) != len(self.ordered) for c in costs):
            raise ConfigError(f"autoqb: costs must give one entry per layer and width "
                              f"({len(features)} x {len(self.ordered)})")
        self.cfg, self.costs = cfg, [[tuple(int(v) for v in c) for c in row] for row in costs]
        self.static = layer_states(features)
        self.rest, self.limit = least_rest(self.costs), np.asarray(budgets, np.int64)
        self.agent = DDPG(self.static.shape[1] + 2, cfg)
        self.noise, self.episode = cfg.noise, 0
        self.baseline: float | None = None
        self.rewards: list[float] = []
        self.pending: tuple[list, list] | None = None

    @property
    def warmup(self) -> bool:
        return self.episode < self.cfg.warmup_episodes

    def propose(self) -> tuple[int, ...]:
        """One episode: the bits of every layer, the budget enforced step by step (module docstring)."""
        act = self.agent.random_action if self.warmup else lambda state: self.agent.act(state, self.noise)
        bits, states, actions = self._walk(act)
        self.pending = (states, actions)
        return bits

    def _walk(self, act: Callable[..., float]) -> tuple[tuple[int, ...], list, list]:
        """Walk the layers with ``act(state)``: the widths taken, the states and the agent's actions."""
        n = len(self.ordered)
        used = np.zeros(len(self.limit), np.int64)
        states, actions, picked, prev = [], [], [], 0.0
        for t in range(len(self.costs)):
            spent = float(np.max(used / np.maximum(self.limit, 1)))
            state = np.concatenate([self.static[t], [spent, prev]]).astype(np.float32)
            a = act(state)
            j = clip_choice(t, _bin(a, n), used, self.costs, self.rest, self.limit)
            used += np.asarray(self.costs[t][j], np.int64)
            states.append(state)
            actions.append(a)
            picked.append(j)
            prev = _centre(j, n)
        return tuple(self.ordered[j] for j in picked), states, actions

    def observe(self, reward: float) -> None:
        """The reward of the last proposed episode: centred by the moving baseline and scaled by the
        spread of the rewards so far, given to each of its transitions; then the agent learns."""
        if self.pending is None:
            raise RuntimeError("autoqb: observe() without a proposed episode")
        states, actions = self.pending
        self.pending = None
        r = float(reward)
        self.rewards.append(r)
        spread = float(np.std(self.rewards))
        centred = 0.0 if self.baseline is None else (r - self.baseline) / (spread if spread > 0 else 1.0)
        self.baseline = r if self.baseline is None else self.baseline + self.cfg.baseline_decay * (r - self.baseline)
        last = len(states) - 1
        for t, (s, a) in enumerate(zip(states, actions)):
            self.agent.buffer.add(s, a, centred, states[min(t + 1, last)], t == last)
        if not self.warmup:
            for _ in range(self.cfg.updates):
                self.agent.update()
            self.noise *= self.cfg.noise_decay
        self.episode += 1

    def greedy(self) -> tuple[int, ...]:
        """The actor's configuration without exploration noise (budget enforced)."""
        return self._walk(lambda state: self.agent.act(state, 0.0))[0]


def layer_features(model: nn.Module, layers: Sequence[bs.SearchLayer]) -> list[dict]:
    """The :data:`STATE_FEATURES` of each searched layer, read from its module in ``model``."""
    rows = []
    for layer in layers:
        m = model.get_submodule(layer.name)
        conv = isinstance(m, (nn.Conv1d, nn.Conv2d))
        rows.append({"in_channels": m.in_channels if conv else m.in_features, "out_channels": layer.channels,
                     "kernel": math.prod(m.kernel_size) if conv else 1, "stride": m.stride[0] if conv else 1,
                     "macs": layer.macs, "params": layer.weights, "is_conv": int(conv)})
    return rows


def search(layers: Sequence[bs.SearchLayer], features: Sequence[dict], limits: dict[str, int],
           score: Callable[[tuple[int, ...]], float], cfg: AgentConfig, *, choices: Sequence[int] = BITS,
           int4: str = "where-fast", desc: str = "autoqb") -> tuple[list[bs.Trial], Episodes]:
    """The bounded AutoQB search: at most ``cfg.episodes`` episodes (none started after
    ``cfg.max_seconds``), each a configuration of ``choices`` within ``limits`` (``{metric: limit}``
    of :func:`sdk.bit_search.cost`) scored by ``score(bits)`` (higher is better; a configuration
    scored before is not scored again).  Returns the trials in order (``origin``: ``warmup`` or
    ``agent``) and the :class:`Episodes` (its agent, the noise left).

    >>> from sdk import bit_search as bs
    >>> fc = [bs.SearchLayer(f"{i}", "FULLY_CONNECTED", 64, 64, 8, 8) for i in range(2)]
    >>> trials, _ = search(fc, [{"in_channels": 8, "out_channels": 8, "kernel": 1, "stride": 1, "macs": 64,
    ...                          "params": 64, "is_conv": 0}] * 2, {"bops": 64 * 8 * 10}, lambda b: sum(b),
    ...                    AgentConfig(episodes=4, warmup_episodes=2, progress=False))
    >>> len(trials), all(bs.cost(fc, t.bits, "bops") <= 64 * 8 * 10 for t in trials)
    (4, True)
    """
    ordered = sorted(int(c) for c in choices)
    metrics = list(limits)
    bs.check_budget(layers, ordered, limits, int4=int4, who=desc)
    costs = [[tuple(bs.layer_cost(layer, b, m, int4=int4) for m in metrics) for b in ordered] for layer in layers]
    env = Episodes(features, ordered, costs, tuple(limits[m] for m in metrics), cfg)
    scores: dict[tuple[int, ...], float] = {}

    def propose(trials: list) -> tuple[tuple[int, ...], str]:
        if trials:
            env.observe(trials[-1].accuracy)
        origin = "warmup" if env.warmup else "agent"
        return env.propose(), origin

    def cached(bits: tuple[int, ...]) -> float:
        if bits not in scores:
            scores[bits] = float(score(bits))
        return scores[bits]

    trials = bs.run_trials(bs.SearchBudget(cfg.episodes, cfg.max_seconds), propose, cached, layers=layers,
                           metrics=tuple(dict.fromkeys(("bytes", "bops", *metrics))), limits=limits, int4=int4,
                           desc=desc, progress=cfg.progress)
    return trials, env


# ---------------------------------------------------------------------------
# the quantizer
# ---------------------------------------------------------------------------

#: the model attribute that keeps the search record
ATTR = "_edgepack_autoqb"
#: a budget field of the config and the cost metric it bounds (:func:`sdk.bit_search.cost`)
BUDGETS = bs.BUDGETS


class AutoQB(Quantizer):
    """Per-layer weight bits, binary included, chosen by a DDPG agent under a hard budget (AutoQB)."""

    name = "autoqb"
    version = "1.0"
    post_training = False
    streams = ("train",)

    @dataclasses.dataclass(frozen=True)
    class Config(AgentConfig):
        max_weight_bytes: int | None = None    # arm-int8's stored conv/linear weight + bias bytes
        max_bops: int | None = None            # Σ MACs · weight bits · 8
        max_packed_bytes: int | None = None    # weights packed at their width + int32 biases
        bits: tuple[int, ...] = BITS           # the widths a layer may get (1: binary)
        int4_storage: str = "where-fast"       # arm-int8's int4 option: which layers store INT4
        finetune_steps: int = 60               # QAFT steps per episode's configuration
        lr: float = 1e-3                       # QAFT learning rate (episodes and final)
        final_epochs: int = 3                  # QAFT epochs of the chosen configuration (0: finetune_steps)
        holdout: float = 0.2                   # train batches held out for the reward when no val stream
        ema_decay: float = 0.9                 # activation range EMA (as qat)

        def __post_init__(self):
            super().__post_init__()
            owner = "autoqb"
            bs.check_search_fields(owner, self, min_widths=2)
            if self.warmup_episodes > self.episodes:
                raise ConfigError(f"{owner}: warmup_episodes={self.warmup_episodes} exceeds "
                                  f"episodes={self.episodes}")

        def limits(self) -> dict[str, int]:
            """``{cost metric: limit}`` of the budgets given."""
            return bs.budget_limits(self)

    def apply(self, model: nn.Module, data: Iterable | dict | None = None) -> nn.Module:
        """Search and bake a copy of ``model``; ``data``: ``(x, y)`` batches (``train``) or
        ``{"train": ..., "val": ...}``.  The search record is ``result._edgepack_autoqb``."""
        return self.run(model, StageContext(DataStreams.of(data), original=model, stage=self.name))

    def run(self, model: nn.Module, ctx: StageContext) -> nn.Module:
        cfg = self.config
        if not isinstance(model, nn.Module):
            raise InputError(f"autoqb quantizes a torch.nn.Module, got {type(model).__name__}")
        limits = cfg.limits()
        if not limits:
            raise ConfigError("autoqb: give a budget: max_weight_bytes, max_bops and/or max_packed_bytes "
                              "(module docstring)")
        tune, score_on, train = bs.search_streams(ctx, self.name, "it fine-tunes every episode's configuration",
                                                  self.config.holdout)
        layers = bs.search_layers(model, example_from(train, None, self.name))

        def score(bits: tuple[int, ...]) -> float:
            return bs.evaluate(model, layers, bits, tune, score_on, finetune_steps=cfg.finetune_steps, lr=cfg.lr,
                               seed=cfg.seed, ema_decay=cfg.ema_decay)

        trials, env = search(layers, layer_features(model, layers), limits, score, cfg, choices=cfg.bits,
                             int4=cfg.int4_storage, desc=self.name)
        best = max(trials, key=lambda t: (t.accuracy, -t.costs[next(iter(limits))]))
        final_kw = ({"epochs": cfg.final_epochs, "steps": None} if cfg.final_epochs
                    else {"epochs": 10 ** 6, "steps": cfg.finetune_steps})
        out = bs.apply_bits(model, layers, best.bits, train, lr=cfg.lr, seed=cfg.seed, ema_decay=cfg.ema_decay,
                            method=self.name, **final_kw)
        names = [layer.name for layer in layers]
        record = {"objective": "held-out accuracy of the int8 simulation under the hard budget",
                  "budget": limits, "bits_choices": list(cfg.bits), "int4_storage": cfg.int4_storage,
                  "layers": [layer.to_dict() for layer in layers],
                  "trials": [t.to_dict() for t in trials], "search_seconds": round(trials[-1].seconds, 3),
                  "episodes": len(trials), "warmup_episodes": min(cfg.warmup_episodes, len(trials)),
                  "distinct_configurations": len({t.bits for t in trials}),
                  "final_noise": round(env.noise, 6), "greedy": dict(zip(names, env.greedy())),
                  "best": {"index": best.index, "bits": dict(zip(names, best.bits)), "accuracy": best.accuracy,
                           "costs": best.costs},
                  "scored_on": "val" if ctx.data.get("val") is not None else f"last {len(score_on)} train batches"}
        setattr(out, ATTR, record)
        ctx.report(**record)
        return out


@hookimpl
def register_quantizers(register):
    register(AutoQB)
