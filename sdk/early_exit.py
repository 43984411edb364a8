"""Early exit: a network cut into stages, an exit head after each but the last, and a learned
per-input policy that stops as soon as stopping is worth it — the torch side.

Bolukbasi, Wang, Dekel & Saligrama, "Adaptive Neural Networks for Efficient Inference" (ICML
2017), section 4 (early exit).  The ``early-exit`` pruner (``plugins/prune/early_exit.py``) builds
an :class:`EarlyExitCascade` with :func:`build_cascade`; :func:`sdk.deploy` packs it with
:func:`pack_cascade`; :mod:`sdk.early_exit_artifact` (torch-free) checks the artifact's
``early_exit`` section and runs the stages on a device.

**Stages** (:func:`split_backbone`).  ``exits`` names children of one ``nn.Sequential`` (the
backbone: ``features.3`` is the fourth child of ``model.features``; ``3`` when the model itself is
the ``nn.Sequential``), in forward order.  Stage 0 is the backbone's children up to and including
the first exit, stage ``k`` the children after exit ``k − 1`` up to exit ``k``, and the last stage
the rest of the model: a copy of it with the backbone replaced by the backbone's remaining
children (torchvision's ``features → pool → flatten → classifier`` keeps its functional pooling
this way).  The split is checked by running it: the stages composed must give the model's own
output on the example input, else the model's forward is not "backbone first, then the rest" and
the split is refused with :class:`ConfigError` (say where to put the exits instead).

**Exit heads** (:class:`ExitHead`): adaptive average pooling to ``head_pool × head_pool``
(``1``: global average pooling) and one linear layer to the classes; a 2-D feature needs no
pooling.  They are trained with cross-entropy, **backbone frozen** (the last stage is the
original network, so "every input runs to the end" is exactly the model given): the backbone runs
in eval mode under ``no_grad`` and only the heads learn, all exits together (:func:`train_heads`).

**Policies** (:class:`ExitPolicy`).  After stage ``k``'s head, ``γ_k`` sees the head's softmax
``p`` through two order-free features, the power means ``Σ p² / C`` and ``Σ p⁴ / C`` (how peaked
``p`` is; ``(Σ p^m)^(1/m) → max p`` as ``m`` grows, and the pair tells one dominant class from two
close ones), and gives ``score = sigmoid(w · f + b)``; the input exits when ``score ≥ threshold``.
Two multiplies and two means: the whole policy lowers to int8 LiteRT ops inside the stage's graph,
and a device only compares one float with the threshold.  A sorted softmax would need a sort op the
lowering does not have; the maximum as a tournament of ``b + relu(a − b)`` does lower, but a pair
whose ``relu(a − b)`` is 0 on every calibration input gets a degenerate int8 range that XNNPACK's
ADD refuses (it happened on an untrained MobileNetV2's near-uniform softmax).

**Training the policies** (:func:`train_policies`), greedily from the last exit backwards, as
weighted binary classifications.  ``ℓ_k(x)`` is the loss of exit ``k``'s prediction (0/1 loss as
in the paper, or cross-entropy); ``c_k`` the MACs of stage ``k`` (its backbone part, head and
policy) over the original network's MACs.  Starting from the final classifier
(``L(x) = ℓ_K(x)``, ``D(x) = c_K``), for each exit ``k`` going back::

    gain(x)   = L(x) + λ · D(x) − ℓ_k(x)      what exiting at k saves over continuing
    label(x)  = exit if gain(x) ≥ 0, else continue;   weight(x) = |gain(x)|
    γ_k       = weighted logistic regression of the labels on f_k(x)      (fit_policy)
    L(x) ← ℓ_k(x) where γ_k exits, else L(x);   D(x) ← c_k + (0 where γ_k exits, else D(x))

so ``L`` and ``D`` are what continuing past exit ``k − 1`` costs under the policies already
trained — the paper's objective ``E[loss] + λ · E[cost]`` one exit at a time.  λ is
``cost_weight``: loss units per original network's worth of MACs (0: never trade accuracy for
compute; larger: exit earlier).  The policies learn on the ``val`` stream when one is given
(a head is surer of the inputs it was trained on than of new ones), else on ``train``.

**The cascade** (:class:`EarlyExitCascade`): its forward gives each input the logits of the
stage it exits at — what the artifact gives — computing every stage and selecting (no
data-dependent control flow, so it exports); :meth:`EarlyExitCascade.exits` also says where each
input left.

**Packing** (:func:`pack_cascade`, called by :func:`sdk.deploy` for a cascade): each stage is
captured and packed on its own, for one input at a time (a device decides per input), as
``stage<k>.tflite`` with outputs ``(features, logits, score)`` (the last: ``logits``).  Stage ``k``
is calibrated on the features stages ``0..k − 1`` give for the calibration inputs (float torch),
and for ``arm-int8`` its input takes stage ``k − 1``'s feature output's quantization, so the hand-off
between stages is lossless (int8 → float → the same int8); each policy's value before its sigmoid
gets an int8 range of at least ``±POLICY_Z`` (:func:`_widen_policy_range`).  Targets: ``arm-int8``,
``arm-fp32`` (:data:`TARGETS`); others are refused with :class:`ConfigError`.

>>> import torch
>>> policy_features(torch.tensor([[0.0, 0.0], [9.0, -9.0]])).tolist()      # uniform, then sure
[[0.25, 0.0625], [0.5, 0.5]]
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from torch import nn

from .early_exit_artifact import FINAL_ROLES, EXIT_ROLES, FORMAT, SECTION, VERSION, stage_file
from .errors import ConfigError, InputError

__all__ = ["EarlyExitCascade", "CascadeStage", "ExitHead", "ExitPolicy", "LOSSES", "TARGETS", "attach_exits",
           "build_cascade", "fit_policies", "fit_policy", "is_cascade", "pack_cascade", "policy_features",
           "policy_targets", "split_backbone", "stage_macs", "train_heads", "train_policies"]

#: targets an early-exit cascade deploys to (one LiteRT graph per stage)
TARGETS = ("arm-int8", "arm-fp32")
#: losses an exit's prediction can be scored with when training the policies
LOSSES = ("zero-one", "cross-entropy")
#: default ridge on the policies' standardised weights.  The two features are correlated, and a weak
#: ridge lets weights of opposite sign and size ~500 cancel, which amplifies int8 rounding: on the digits
#: CNN of tests/methods/test_early_exit.py 12 % of the exit decisions then flipped between the float
#: cascade and its int8 artifact at 1e-2, 0.4-1.8 % at 0.1 (λ 0.02-0.5), 1.3-2.7 % at 1
POLICY_L2 = 0.1
#: smallest standard deviation a policy feature is scaled by: the features lie in [0, 1] and one that
#: varies less (an untrained head's near-uniform softmax) would get weights of ~1e8, which no int8
#: linear layer can hold (its requantization leaves LiteRT's range)
MIN_FEATURE_SD = 1e-4
#: the policy's bias (score 0.99966) when every input is indifferent between exiting and continuing
SURE_EXIT = 8.0


# ---------------------------------------------------------------------------
# the cascade's modules
# ---------------------------------------------------------------------------

def policy_features(logits: torch.Tensor) -> torch.Tensor:
    """The policy's view of an exit: ``[Σ p² / C, Σ p⁴ / C]`` of ``p = softmax(logits)``, shape ``(N, 2)``."""
    p = torch.softmax(logits, 1)
    p2 = p * p
    return torch.cat([p2.mean(1, keepdim=True), (p2 * p2).mean(1, keepdim=True)], 1)


class ExitHead(nn.Module):
    """Adaptive average pooling to ``pool × pool`` (4-D features) and a linear layer to ``classes``."""

    def __init__(self, feature_shape: Sequence[int], classes: int, pool: int = 1):
        super().__init__()
        if len(feature_shape) == 3:
            c, h, w = feature_shape
            if h % pool or w % pool:
                raise ConfigError(f"early-exit: head_pool={pool} does not divide the {h}×{w} feature map; use a "
                                  "divisor of both sides (1: global average pooling)")
            self.pool = nn.AdaptiveAvgPool2d(pool)
            width = c * pool * pool
        elif len(feature_shape) == 1:
            self.pool = nn.Identity()
            width = feature_shape[0]
        else:
            raise ConfigError(f"early-exit: an exit head takes (C, H, W) or (F,) features per input, got "
                              f"{tuple(feature_shape)}; put the exit after a convolutional or linear block")
        self.linear = nn.Linear(width, classes)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear(torch.flatten(self.pool(features), 1))


class ExitPolicy(nn.Module):
    """``score = sigmoid(w · policy_features(logits) + b)``; exit when ``score ≥ threshold``."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(2, 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.linear(policy_features(logits)))


class CascadeStage(nn.Module):
    """One stage: ``body`` and, except for the last stage, an exit ``head`` and its ``policy``.
    ``forward`` gives ``(features, logits, score)`` — the last stage: ``logits``."""

    def __init__(self, body: nn.Module, head: ExitHead | None = None, policy: ExitPolicy | None = None):
        super().__init__()
        if (head is None) != (policy is None):
            raise ConfigError("early-exit: a stage has both an exit head and a policy, or neither (the last)")
        self.body, self.head, self.policy = body, head, policy

    def forward(self, x: torch.Tensor):
        f = self.body(x)
        if self.head is None:
            return f
        z = self.head(f)
        return f, z, self.policy(z)


class EarlyExitCascade(nn.Module):
    """Stages run in turn; an input leaves at the first exit whose policy score reaches its threshold.

    ``forward(x)`` gives each input the logits of the stage it exits at (all stages are computed
    and the right logits selected, so it exports and matches the artifact input by input);
    :meth:`exits` also gives each input's exit stage and scores.  ``stage_macs`` (per input, as
    :func:`stage_macs` counts them) and ``full_macs`` (the original network's) are the policies'
    cost model; ``exit_names`` the module paths the exits follow (for reports).
    """

    def __init__(self, stages: Sequence[CascadeStage], thresholds: Sequence[float],
                 stage_macs: Sequence[int] | None = None, full_macs: int | None = None,
                 exit_names: Sequence[str] | None = None):
        super().__init__()
        if len(stages) < 2 or len(thresholds) != len(stages) - 1:
            raise ConfigError(f"early-exit: a cascade needs at least 2 stages and one threshold per exit; got "
                              f"{len(stages)} stages, {len(thresholds)} thresholds")
        if any(s.head is None for s in stages[:-1]) or stages[-1].head is not None:
            raise ConfigError("early-exit: every stage but the last has an exit head and a policy")
        for t in thresholds:
            _check_threshold(t)
        self.stages = nn.ModuleList(stages)
        self.thresholds = tuple(float(t) for t in thresholds)
        self.stage_macs = tuple(int(m) for m in stage_macs) if stage_macs is not None else None
        self.full_macs = int(full_macs) if full_macs is not None else None
        self.exit_names = tuple(exit_names) if exit_names is not None else \
            tuple(f"exit{k}" for k in range(len(thresholds)))

    def exits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(logits, exit_stage, scores)``: each input's logits from the stage it exits at, that
        stage's index (``len(stages) − 1``: ran to the end), and every exit's policy score ``(N, exits)``."""
        done = exit_stage = out = None
        scores = []
        last = len(self.stages) - 1
        h = x
        for k, stage in enumerate(self.stages):
            if k == last:               # the inputs still here take the final classifier's logits
                out = torch.where(done[:, None], out, stage(h))
                break
            h, z, s = stage(h)
            s = s[:, 0]
            scores.append(s)
            leave = s >= self.thresholds[k]
            if done is None:
                done, out = leave, z
                exit_stage = torch.where(leave, torch.zeros_like(leave, dtype=torch.long), last)
            else:
                now = leave & ~done
                out = torch.where(now[:, None], z, out)
                exit_stage = torch.where(now, k, exit_stage)
                done = done | leave
        return out, exit_stage, torch.stack(scores, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.exits(x)[0]


def is_cascade(model: Any) -> bool:
    """Whether ``model`` is an :class:`EarlyExitCascade` (``deploy`` packs those stage by stage)."""
    return isinstance(model, EarlyExitCascade)


def _check_threshold(t: Any) -> None:
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0.0 < t < 1.0:
        raise ConfigError(f"early-exit: threshold={t!r} is out of range; allowed: (0, 1) (a policy score is a "
                          "sigmoid)")


# ---------------------------------------------------------------------------
# splitting a model into stages
# ---------------------------------------------------------------------------

def split_backbone(model: nn.Module, exits: Sequence[str], example: torch.Tensor) -> list[nn.Module]:
    """The stage bodies of ``model`` cut after each module of ``exits`` (see the module docstring).

    The bodies hold ``model``'s own backbone children (not copies); the last is a copy of the rest
    of the model around the remaining children.  Raises :class:`ConfigError` for exits that are not
    children of one ``nn.Sequential`` in forward order, and for a model whose output the stages
    composed do not reproduce on ``example``.

    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    >>> [type(b).__name__ for b in split_backbone(net, ["1"], torch.ones(1, 4))]
    ['Sequential', 'Sequential']
    """
    from .pt2 import copy_module
    from .torch_fold import set_module

    if isinstance(exits, str) or not exits:
        raise ConfigError(f"early-exit: exits must be a list of module paths after which an exit goes, e.g. "
                          f"['features.3', 'features.6'], got {exits!r}")
    parent_path, cuts = None, []
    for path in exits:
        if not isinstance(path, str):
            raise ConfigError(f"early-exit: exit {path!r} is not a module path (a string such as 'features.3')")
        where, _, child = path.rpartition(".")
        try:
            parent = model.get_submodule(where) if where else model
        except AttributeError:
            raise ConfigError(f"early-exit: exit {path!r}: the model has no module {where!r}; name children of its "
                              "nn.Sequential backbone, e.g. 'features.3'") from None
        if not isinstance(parent, nn.Sequential):
            raise ConfigError(f"early-exit: exit {path!r} is not a child of an nn.Sequential "
                              f"({where or 'the model'} is a {type(parent).__name__}); exits go between the children "
                              "of one nn.Sequential backbone (torchvision's `features`, or wrap your layers in one)")
        names = [n for n, _ in parent.named_children()]
        if child not in names:
            raise ConfigError(f"early-exit: exit {path!r}: {where or 'the model'} has no child {child!r}; its "
                              f"children are {', '.join(names)}")
        if parent_path is not None and where != parent_path:
            raise ConfigError(f"early-exit: exits must all be children of one nn.Sequential; {path!r} is in "
                              f"{where or 'the model'}, the first exit in {parent_path or 'the model'}")
        parent_path = where
        cuts.append(names.index(child) + 1)
    if cuts != sorted(set(cuts)):
        raise ConfigError(f"early-exit: exits {list(exits)} must be listed in forward order, each once")
    backbone = model.get_submodule(parent_path) if parent_path else model
    children = list(backbone.children())
    if parent_path == "" and cuts[-1] == len(children):
        raise ConfigError(f"early-exit: exit {exits[-1]!r} is after the model's last layer; its output is the "
                          "network's own: put the last exit earlier")
    bodies = [nn.Sequential(*children[a:b]) for a, b in zip([0] + cuts[:-1], cuts)]
    rest = nn.Sequential(*children[cuts[-1]:])
    if parent_path:
        saved = model.get_submodule(parent_path)
        set_module(model, parent_path, nn.Sequential())      # the copy should not duplicate the backbone
        try:
            final = copy_module(model)
        finally:
            set_module(model, parent_path, saved)
        set_module(final, parent_path, rest)
    else:
        final = rest
    bodies.append(final.train(model.training))
    _check_split(model, bodies, example, exits)
    return bodies


def _check_split(model: nn.Module, bodies: list[nn.Module], example: torch.Tensor, exits) -> None:
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            want = model(example)
            h = example
            for b in bodies:
                b.eval()
                h = b(h)
    except Exception as exc:  # noqa: BLE001 - any failure of the split stages means the forward is not sequential
        raise ConfigError(f"early-exit: the model cut at {list(exits)} does not run stage by stage "
                          f"({type(exc).__name__}: {exc}); its forward must apply the backbone holding the exits to "
                          "its input first and use only the backbone's output afterwards") from None
    finally:
        model.train(was)
        for b in bodies:
            b.train(was)
    if not isinstance(want, torch.Tensor) or want.dim() != 2:
        raise ConfigError(f"early-exit: the model must return one (N, classes) tensor of logits, got "
                          f"{type(want).__name__ if not isinstance(want, torch.Tensor) else tuple(want.shape)}")
    scale = float(want.abs().max()) or 1.0
    if h.shape != want.shape or float((h - want).abs().max()) > 1e-4 * scale:
        raise ConfigError(f"early-exit: the model cut at {list(exits)} does not give the model's output: its forward "
                          "is not 'the backbone holding the exits on the input, then the rest'; put the exits in "
                          "the nn.Sequential the forward applies first (e.g. `features`), or make the model one")


def stage_macs(stages: Sequence[nn.Module], example: torch.Tensor) -> list[int]:
    """MACs per input of each stage, counted on its captured graph as the artifact's profile counts
    them (:func:`sdk.graph.macs` after batch-norm folding), on one input like ``example``."""
    from .graph import capture, fold_batch_norm, macs

    out, h = [], example[:1]
    for stage in stages:
        stage.eval()
        g = fold_batch_norm(capture(stage, (h,)))
        out.append(sum(macs(g, n) for n in g.nodes))
        with torch.no_grad():
            y = stage(h)
        h = y[0] if isinstance(y, tuple) else y
    return out


# ---------------------------------------------------------------------------
# training
# ---------------------------------------------------------------------------

def _inputs(batch: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    from .trainer import split_batch

    x, y = split_batch(batch)
    if isinstance(x, (tuple, list)):
        if len(x) != 1:
            raise InputError(f"early-exit: the model takes one input; a batch holds {len(x)}")
        x = x[0]
    return torch.as_tensor(x, dtype=torch.float32), y


def train_heads(bodies: Sequence[nn.Module], heads: Sequence[ExitHead], data: Iterable, cfg) -> list[float]:
    """Train the exit ``heads`` (one per body but the last) with cross-entropy, the bodies frozen (eval
    mode, no gradients); ``cfg`` is a :class:`sdk.trainer.TrainConfig`.  Returns the epoch losses
    (summed over the exits)."""
    from .trainer import fit

    for b in bodies:
        b.eval()
    group = nn.ModuleList(heads)

    def loss(m: nn.ModuleList, batch: Any) -> torch.Tensor:
        x, y = _inputs(batch)
        if y is None:
            raise InputError("early-exit trains its exit heads on labelled data: pass (x, y) batches as data=")
        total, h = 0.0, x
        with torch.no_grad():
            feats = []
            for b in bodies[:-1]:
                h = b(h)
                feats.append(h)
        for head, f in zip(m, feats):
            total = total + nn.functional.cross_entropy(head(f), torch.as_tensor(y).long())
        return total

    return fit(group, data, loss, cfg, desc="early-exit heads")


def policy_targets(exit_loss: torch.Tensor, down_loss: torch.Tensor, down_cost: torch.Tensor,
                   cost_weight: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(labels, weights)`` of one exit's weighted binary problem: label 1 (exit) where exiting
    costs no more than continuing, ``ℓ_exit ≤ L_down + λ · D_down``; weight the difference.

    >>> policy_targets(torch.tensor([0., 1.]), torch.tensor([0., 0.]), torch.tensor([0.5, 0.5]), 0.2)
    (tensor([1., 0.]), tensor([0.1000, 0.9000]))
    """
    gain = down_loss + cost_weight * down_cost - exit_loss
    return (gain >= 0).to(exit_loss.dtype), gain.abs()


def fit_policy(features: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor, l2: float = POLICY_L2,
               iterations: int = 100) -> tuple[np.ndarray, float]:
    """Weighted logistic regression ``(w, b)`` of ``labels`` on ``features`` by Newton's method, float64.

    Minimises ``Σ_i weights_i · CE(sigmoid(z_i), labels_i) / Σ weights + l2/2 · (|v|² + c²)`` where
    ``z = v · standardised(features) + c`` (each column centred and scaled by its standard deviation,
    at least :data:`MIN_FEATURE_SD`, so ``l2`` treats the features alike); returns the weights on the
    raw features.  All weights zero (every input indifferent, so every label is "exit"):
    ``(0, SURE_EXIT)``, always exit.

    >>> w, b = fit_policy(torch.tensor([[0.], [1.]]), torch.tensor([0., 1.]), torch.ones(2))
    >>> bool(w[0] > 0)
    True
    """
    x = features.detach().double().cpu().numpy()
    y = labels.detach().double().cpu().numpy()
    wt = weights.detach().double().cpu().numpy()
    total = wt.sum()
    if total <= 0:
        return np.zeros(x.shape[1]), SURE_EXIT
    mu = x.mean(0)
    sd = x.std(0)
    sd = np.maximum(sd, MIN_FEATURE_SD)
    a = np.hstack([(x - mu) / sd, np.ones((len(x), 1))])
    wt = wt / total
    theta = np.zeros(a.shape[1])

    def objective(t: np.ndarray) -> float:
        z = a @ t
        return float(np.sum(wt * (np.logaddexp(0.0, z) - y * z)) + 0.5 * l2 * t @ t)

    value = objective(theta)
    for _ in range(iterations):
        s = 1.0 / (1.0 + np.exp(-(a @ theta)))
        grad = a.T @ (wt * (s - y)) + l2 * theta
        hess = (a * (wt * s * (1 - s))[:, None]).T @ a + l2 * np.eye(len(theta))
        step = np.linalg.solve(hess, grad)
        t = 1.0
        while t > 1e-8:                         # damped: Newton's full step may overshoot far from the optimum
            new = objective(theta - t * step)
            if new <= value:
                break
            t *= 0.5
        theta, done = theta - t * step, abs(value - new) < 1e-14
        value = new
        if done or np.abs(t * step).max() < 1e-12:
            break
    v, c = theta[:-1] / sd, theta[-1]
    return v, float(c - v @ mu)


def _stage_losses(logits: torch.Tensor, y: torch.Tensor, loss: str) -> torch.Tensor:
    if loss == "zero-one":
        return (logits.argmax(1) != y).double()
    return nn.functional.cross_entropy(logits.double(), y, reduction="none")


def train_policies(logits: Sequence[torch.Tensor], y: torch.Tensor, costs: Sequence[float], cost_weight: float,
                   thresholds: Sequence[float], *, loss: str = "zero-one", l2: float = POLICY_L2) -> list[dict]:
    """Fit each exit's policy, greedily from the last exit back (see the module docstring).

    ``logits``: every stage's outputs on the policy data (``len(costs)`` tensors ``(N, C)``, the last
    the final classifier's); ``costs``: each stage's MACs over the original network's.  Returns one
    dict per exit, first exit first: ``weight`` (2,), ``bias``, ``labels``/``weights`` of its binary
    problem, ``exit`` (which inputs it lets leave, given the later policies).
    """
    if loss not in LOSSES:
        raise ConfigError(f"early-exit: loss={loss!r} is not allowed; choose one of {', '.join(LOSSES)}")
    y = torch.as_tensor(y).long()
    last = len(logits) - 1
    down_loss = _stage_losses(logits[last], y, loss)
    down_cost = torch.full_like(down_loss, float(costs[last]))
    fitted: list[dict] = []
    for k in range(last - 1, -1, -1):
        exit_loss = _stage_losses(logits[k], y, loss)
        labels, weights = policy_targets(exit_loss, down_loss, down_cost, cost_weight)
        feats = policy_features(logits[k].double())
        w, b = fit_policy(feats, labels, weights, l2)
        score = torch.sigmoid(feats @ torch.from_numpy(w) + b)
        leave = score.float() >= thresholds[k]          # the cascade compares float32 scores
        fitted.append({"weight": w, "bias": b, "labels": labels, "weights": weights, "exit": leave})
        down_loss = torch.where(leave, exit_loss, down_loss)
        down_cost = float(costs[k]) + torch.where(leave, torch.zeros_like(down_cost), down_cost)
    return fitted[::-1]


def attach_exits(model: nn.Module, exits: Sequence[str], train: Iterable, *, head_pool: int = 1,
                 threshold: float = 0.5, train_config=None) -> EarlyExitCascade:
    """Cut ``model`` at ``exits`` and train an exit head after each cut on ``train`` (backbone frozen);
    the policies are left untrained (score 0.5: call :func:`fit_policies`).  ``model`` becomes part of
    the cascade (pass a copy)."""
    from .trainer import TrainConfig

    _check_threshold(threshold)
    data = train if hasattr(train, "__len__") else list(train)
    if not len(data):
        raise InputError("early-exit needs training data: pass data= (x, y) batches")
    example = _inputs(next(iter(data)))[0][:1]
    model.eval()
    bodies = split_backbone(model, exits, example)
    with torch.no_grad():
        h, shapes = example, []
        for b in bodies[:-1]:
            h = b(h)
            shapes.append(tuple(h.shape[1:]))
        classes = int(model(example).shape[1])
    heads = [ExitHead(s, classes, head_pool) for s in shapes]
    train_heads(bodies, heads, data, train_config or TrainConfig(progress=False))
    stages = [CascadeStage(b, hd, ExitPolicy()) for b, hd in zip(bodies[:-1], heads)] + [CascadeStage(bodies[-1])]
    macs = stage_macs(stages, example)
    full = stage_macs([CascadeStage(nn.Sequential(*bodies))], example)[0]
    return EarlyExitCascade(stages, [threshold] * len(heads), macs, full, exits).eval()


def fit_policies(cascade: EarlyExitCascade, data: Iterable, cost_weight: float, *, loss: str = "zero-one",
                 l2: float = POLICY_L2) -> dict:
    """Fit ``cascade``'s policies on the labelled ``data`` (in place) for the trade-off
    ``cost_weight`` (λ) with :func:`train_policies`; heads and thresholds stay.  Returns a JSON-able
    report: per exit its head's accuracy, the share of inputs leaving there and the policy's weights;
    the cascade's accuracy and mean MACs per input on ``data`` against the original network's.

    Re-fitting for another λ needs no retraining of the heads (a λ sweep)."""
    check = float(cost_weight) if not isinstance(cost_weight, bool) else -1.0
    if not isinstance(cost_weight, (int, float)) or check < 0 or not math.isfinite(check):
        raise ConfigError(f"early-exit: cost_weight={cost_weight!r} is out of range; allowed: [0, inf)")
    macs, full = cascade.stage_macs, cascade.full_macs
    if macs is None or not full:
        raise ConfigError("early-exit: the cascade carries no stage MACs, the policies' cost; build it with "
                          "attach_exits (or pass stage_macs and full_macs to EarlyExitCascade)")
    logits, labels = _all_logits(cascade.stages, data)
    fitted = train_policies(logits, labels, [m / full for m in macs], cost_weight, cascade.thresholds,
                            loss=loss, l2=l2)
    for stage, f in zip(cascade.stages, fitted):
        with torch.no_grad():
            stage.policy.linear.weight.copy_(torch.from_numpy(f["weight"]).float()[None])
            stage.policy.linear.bias.fill_(f["bias"])
    cascade.eval()
    with torch.no_grad():
        exit_stage = torch.cat([cascade.exits(_inputs(b)[0])[1] for b in data])
    picked = torch.stack(logits, 0)[exit_stage, torch.arange(len(labels))]
    spent = torch.tensor(np.cumsum(macs), dtype=torch.float64)[exit_stage]
    names = cascade.exit_names
    return {"exits": list(names), "cost_weight": cost_weight, "thresholds": list(cascade.thresholds), "loss": loss,
            "stage_macs": list(macs), "full_macs": full,
            "heads": [{"exit": e, "accuracy": float((z.argmax(1) == labels).double().mean()),
                       "leaving": float((exit_stage == k).double().mean()),
                       "policy_weight": [float(v) for v in f["weight"]], "policy_bias": f["bias"]}
                      for k, (e, z, f) in enumerate(zip(names, logits, fitted))],
            "policy_data": {"inputs": int(len(labels)),
                            "accuracy": float((picked.argmax(1) == labels).double().mean()),
                            "full_accuracy": float((logits[-1].argmax(1) == labels).double().mean()),
                            "mean_macs": float(spent.mean()), "mean_macs_ratio": float(spent.mean() / full)}}


def build_cascade(model: nn.Module, exits: Sequence[str], train: Iterable, policy_data: Iterable, *,
                  cost_weight: float, threshold: float = 0.5, head_pool: int = 1, loss: str = "zero-one",
                  l2: float = POLICY_L2, train_config=None) -> tuple[EarlyExitCascade, dict]:
    """:func:`attach_exits` then :func:`fit_policies` on ``policy_data``: the cascade and the report
    (with ``head_pool``).  ``model`` becomes part of the cascade (pass a copy)."""
    if loss not in LOSSES:          # before training the heads
        raise ConfigError(f"early-exit: loss={loss!r} is not allowed; choose one of {', '.join(LOSSES)}")
    cascade = attach_exits(model, exits, train, head_pool=head_pool, threshold=threshold, train_config=train_config)
    policy_data = policy_data if hasattr(policy_data, "__len__") else list(policy_data)
    report = fit_policies(cascade, policy_data, cost_weight, loss=loss, l2=l2)
    return cascade, {**report, "head_pool": head_pool}


def _all_logits(stages: Sequence[CascadeStage], data: Iterable) -> tuple[list[torch.Tensor], torch.Tensor]:
    outs: list[list[torch.Tensor]] = [[] for _ in stages]
    ys = []
    with torch.no_grad():
        for batch in data:
            x, y = _inputs(batch)
            if y is None:
                raise InputError("early-exit trains its policies on labelled data: pass (x, y) batches")
            h = x
            for k, stage in enumerate(stages):
                r = stage(h)
                if isinstance(r, tuple):
                    h, z, _ = r
                else:
                    z = r
                outs[k].append(z)
            ys.append(torch.as_tensor(y).long())
    return [torch.cat(o) for o in outs], torch.cat(ys)


# ---------------------------------------------------------------------------
# packing (sdk.deploy)
# ---------------------------------------------------------------------------

#: the int8 range of a policy's pre-sigmoid value covers at least [-POLICY_Z, POLICY_Z] (sigmoid(8) = 0.99966)
POLICY_Z = 8.0


def _widen_policy_range(graph, plan) -> None:
    """Let the int8 value before each output sigmoid (a policy's ``w · f + b``) span at least
    ``±POLICY_Z``.  A policy whose calibration inputs all look alike (an untrained head's near-uniform
    softmax) has an almost constant ``w · f + b``: its calibrated step would be so fine that the linear
    layer's requantization ``s_in · s_w / s_out`` leaves the range LiteRT takes (< 256)."""
    from .quant import QuantSpec

    for node in graph.nodes:
        if node.op != "sigmoid" or node.name not in graph.outputs:
            continue
        spec = plan.activations.get(node.inputs[0])
        if spec is None or spec.dtype != "int8" or spec.per_channel:
            continue
        s, z = spec.scale[0], spec.zero_point[0]
        lo, hi = (-128 - z) * s, (127 - z) * s
        if lo > -POLICY_Z or hi < POLICY_Z:
            plan.activations[node.inputs[0]] = QuantSpec.from_range(min(lo, -POLICY_Z), max(hi, POLICY_Z),
                                                                    symmetric=False)


@dataclasses.dataclass
class PackedCascade:
    """What :func:`pack_cascade` gives :func:`sdk.deploy`: the package (stage files, the cascade's
    signature, profile rows tagged with their stage, the manifest's ``early_exit`` and
    ``encodings``), the stages' plans merged (value names prefixed ``stage<k>/``), the
    ``encodings`` rows and the cost rows."""

    package: Any
    plan: Any
    encodings: list[dict]
    cost: list[dict]


def pack_cascade(target, cascade: EarlyExitCascade, example_inputs: tuple, calibration, quantizers: list,
                 plan_for) -> PackedCascade:
    """Capture, calibrate and pack each stage of ``cascade`` for ``target`` (see the module docstring).

    ``plan_for(graph, batches)`` runs the deploy's graph-side quantizers (``None`` plan: float);
    ``quantizers`` are those stages (whether calibration data is needed).  Raises
    :class:`ConfigError` for a target other than :data:`TARGETS` and for plans that add files
    beside a stage's graph (weight containers), :class:`CalibrationError` for bad calibration data.
    """
    from .contract import Package, TensorSig
    from .data import as_batches
    from .graph import capture, fold_batch_norm
    from .litert.target import LiteRTTarget
    from .quant import QuantPlan, QuantSpec

    if target.name not in TARGETS or not isinstance(target, LiteRTTarget):
        raise ConfigError(f"early-exit cascades deploy to {', '.join(TARGETS)} (one LiteRT graph per stage); "
                          f"target {target.name!r} packs one model per artifact: choose one of those, or deploy "
                          "the original network")
    if len(example_inputs) != 1:
        raise InputError(f"an early-exit cascade takes one input, got {len(example_inputs)} example inputs")
    batch = example_inputs[0].shape[0]
    feed = example_inputs[0][:1]
    if calibration is None and quantizers and not any(q.requires_calibration for q in quantizers):
        calibration = [example_inputs]
    batches = [b[0] for b in as_batches(calibration, [("x", tuple(feed.shape), "float32")])] \
        if calibration is not None or quantizers else None
    files, layers, encodings, costs, stages = {}, [], [], [], []
    activations, weights, merged = {}, {}, None
    prev_features = None
    for k, stage in enumerate(cascade.stages):
        stage.eval()
        prefix = f"stage{k}/"
        graph = target.prepare(fold_batch_norm(capture(stage, (feed,))))
        target.check(graph)
        plan = plan_for(graph, [(b,) for b in batches] if batches is not None else None)
        if plan is not None:
            _widen_policy_range(graph, plan)
        if plan is not None and prev_features is not None and prev_features.get("quantization"):
            q = prev_features["quantization"]       # the hand-off: stage k reads stage k-1's int8 features
            plan.activations[graph.inputs[0][0]] = QuantSpec("int8", tuple(q["scale"]), tuple(q["zero_point"]))
        rows = target.check_plan(graph, plan)
        cost = target.cost(graph, plan, rows)
        pkg = target.pack(graph, plan, [(b,) for b in batches] if batches is not None else None)
        if set(pkg.files) != {"model.tflite"}:
            extra = sorted(set(pkg.files) - {"model.tflite"})
            raise ConfigError(f"early-exit: stage {k} packs {', '.join(extra)} beside its graph; weight containers "
                              "(deep-compression, zero-run) do not combine with early exit")
        final = k == len(cascade.stages) - 1
        roles = FINAL_ROLES if final else EXIT_ROLES
        if len(pkg.outputs) != len(roles) or len(pkg.inputs) != 1:
            raise ConfigError(f"early-exit: stage {k} packs {len(pkg.inputs)} input(s) and {len(pkg.outputs)} "
                              f"output(s); a stage takes one tensor and gives {', '.join(roles)}")
        name = stage_file(k)
        files[name] = pkg.files["model.tflite"]
        stage_layers = [{**row, "name": prefix + row["name"], "stage": k} for row in pkg.layers]
        layers += stage_layers
        encodings += [{**row, "layer": prefix + row["layer"], "tensor": prefix + row["tensor"]}
                      for row in pkg.extra.get("encodings", [])]
        costs += [{**row, "name": prefix + row["name"]} for row in cost]
        entry = {"file": name, "inputs": [s.to_dict() for s in pkg.inputs],
                 "outputs": [s.to_dict() for s in pkg.outputs], "roles": list(roles),
                 "macs": sum(int(r.get("macs", 0) or 0) for r in stage_layers)}
        if not final:
            entry["threshold"] = cascade.thresholds[k]
        stages.append(entry)
        if plan is not None:
            activations.update({prefix + n: s for n, s in plan.activations.items()})
            weights.update({prefix + n: s for n, s in plan.weights.items()})
            merged = plan
        prev_features = entry["outputs"][0]
        with torch.no_grad():
            feed = stage(feed)[0]
            if batches is not None:
                batches = [stage(b)[0] for b in batches]
    first, logits = stages[0]["inputs"][0], stages[-1]["outputs"][0]
    inputs = [TensorSig.from_dict({**first, "shape": [batch] + first["shape"][1:]})]
    outputs = [TensorSig(logits["name"], tuple([batch] + logits["shape"][1:]), "float32")]
    section = {"format": FORMAT, "version": VERSION, "stages": stages}
    package = Package(files=files, inputs=inputs, outputs=outputs, layers=layers,
                      extra={"encodings": encodings, SECTION: section})
    plan = None if merged is None else QuantPlan(activations, weights, method=merged.method, config=merged.config,
                                                 extra=merged.extra, compute=merged.compute)
    return PackedCascade(package, plan, encodings, costs)
