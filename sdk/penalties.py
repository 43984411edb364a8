"""Sparsity-inducing penalties and their proximal steps, shared by the pruners that train
towards zeros (``regularization``, ``sss``).

=====================================  ==========================================================
``l1(ws)``                             ``Σ |w|``
``l2(ws)``                             ``½ Σ w²`` (gradient ``w``: weight decay)
``group_norms(model, g, role)``        ``‖W_c‖₂`` per channel ``c`` of a :class:`~sdk.channels.ChannelGroup`
                                       over its slices of ``role`` (``"out"``: filters, ``"in"``:
                                       input columns), coupled slices in one group
``group_lasso(model, gs, role)``       ``Σ_c √p·‖W_c‖₂`` (Yuan & Lin 2006; ``p``: weights in ``W_c``)
``soft_threshold(x, t)``               ``sign(x)·max(|x| − t, 0)``: the proximal step of ``t·|x|``
``shrink_groups(model, g, role, t)``   the group lasso's: ``W_c ← W_c·max(0, 1 − t√p / ‖W_c‖)``
``APG``                                accelerated proximal gradient on L1-regularised factors
                                       (Huang & Wang 2018, §3.3)
=====================================  ==========================================================

A proximal step is why these give *exact* zeros where a subgradient of the same
penalty only makes entries small: ``soft_threshold`` maps the whole interval
``[−t, t]`` to 0.

>>> import torch
>>> soft_threshold(torch.tensor([-1.5, -0.2, 0.0, 0.3, 2.0]), 0.5).tolist()
[-1.0, -0.0, 0.0, 0.0, 1.5]
>>> float(l1([torch.tensor([1.0, -2.0])])), float(l2([torch.tensor([1.0, -2.0])]))
(3.0, 2.5)
"""

from __future__ import annotations

import math
from typing import Iterable

import torch

from .channels import ChannelGroup
from .errors import InputError

#: which weight dimension a channel slice of each role indexes
_DIM = {"out": 0, "in": 1}


def l1(weights: Iterable[torch.Tensor]) -> torch.Tensor:
    """``Σ |w|`` over ``weights`` (a differentiable scalar)."""
    return sum((w.abs().sum() for w in weights), torch.zeros(()))


def l2(weights: Iterable[torch.Tensor]) -> torch.Tensor:
    """``½ Σ w²`` over ``weights``: its gradient is ``w``, what ``weight_decay`` adds."""
    return sum((0.5 * w.pow(2).sum() for w in weights), torch.zeros(()))


def soft_threshold(x: torch.Tensor, t: float | torch.Tensor) -> torch.Tensor:
    """``sign(x) · max(|x| − t, 0)``, the proximal operator of ``t·|x|`` (elementwise)."""
    return torch.sign(x) * torch.clamp(x.abs() - t, min=0.0)


def group_pieces(model: torch.nn.Module, group: ChannelGroup, role: str) -> torch.Tensor:
    """``[channels, m]``: row ``c`` holds every weight of channel ``c`` over the group's slices
    of ``role`` (``"out"``: the producers' filters ``W[offset + c]``; ``"in"``: the consumers'
    input columns ``W[:, offset + c·repeat … + repeat − 1]``), coupled slices side by side."""
    rows = []
    for s in group.of_role(role):
        w = model.get_submodule(s.module).weight
        span = group.channels * s.repeat
        if w.shape[_DIM[role]] < s.offset + span:
            raise InputError(f"channel group of {', '.join(group.modules)} is stale for {s.module!r} "
                             f"(weight {tuple(w.shape)}): the model changed structure after the group was traced")
        if role == "out":
            rows.append(w[s.offset:s.offset + span].reshape(group.channels, -1))
        else:
            part = w[:, s.offset:s.offset + span].transpose(0, 1)       # [span, out, k...]
            rows.append(part.reshape(group.channels, -1))
    if not rows:
        raise InputError(f"channel group of {', '.join(group.modules)} has no {role!r} slice")
    return torch.cat(rows, dim=1)


def group_norms(model: torch.nn.Module, group: ChannelGroup, role: str) -> torch.Tensor:
    """``‖W_c‖₂`` per channel of ``group`` (see :func:`group_pieces`); differentiable, with
    gradient 0 (a subgradient) at a zero group.

    >>> from sdk.channels import ChannelGroup, ChannelSlice
    >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2, bias=False))
    >>> _ = net[0].weight.data.copy_(torch.tensor([[3.0, 4.0], [0.0, 1.0]]))
    >>> group_norms(net, ChannelGroup(2, (ChannelSlice("0", "out"),)), "out").tolist()
    [5.0, 1.0]
    """
    return torch.linalg.vector_norm(group_pieces(model, group, role), dim=1)


def group_lasso(model: torch.nn.Module, groups: Iterable[ChannelGroup], role: str) -> torch.Tensor:
    """``Σ_g √p_g · Σ_c ‖W_c‖₂``: the group lasso of Yuan & Lin (2006), each channel's norm weighted
    by the square root of its size ``p_g`` so that a group of ``p`` equal entries ``a`` costs
    ``p·|a|``, as under L1 (the same ``λ`` means the same strength)."""
    total = torch.zeros(())
    for g in groups:
        pieces = group_pieces(model, g, role)
        total = total + math.sqrt(pieces.shape[1]) * torch.linalg.vector_norm(pieces, dim=1).sum()
    return total


def scale_channels(model: torch.nn.Module, group: ChannelGroup, role: str, scale: torch.Tensor) -> None:
    """Multiply every weight of channel ``c`` (slices of ``role``) by ``scale[c]``, in place."""
    with torch.no_grad():
        for s in group.of_role(role):
            w = model.get_submodule(s.module).weight
            factor = scale.to(w.dtype).repeat_interleave(s.repeat)
            view = [1] * w.dim()
            view[_DIM[role]] = -1
            index = [slice(None)] * w.dim()
            index[_DIM[role]] = slice(s.offset, s.offset + group.channels * s.repeat)
            w[tuple(index)] *= factor.view(view)


def shrink_groups(model: torch.nn.Module, group: ChannelGroup, role: str, t: float) -> None:
    """Proximal step of ``t · √p · Σ_c ‖W_c‖₂`` (:func:`group_lasso` of one group):
    ``W_c ← W_c · max(0, 1 − t√p / ‖W_c‖)``; zero groups stay 0."""
    with torch.no_grad():
        pieces = group_pieces(model, group, role)
        norms = torch.linalg.vector_norm(pieces, dim=1)
        t = t * math.sqrt(pieces.shape[1])
        scale = torch.where(norms > t, 1.0 - t / norms.clamp_min(torch.finfo(norms.dtype).tiny),
                            torch.zeros_like(norms))
    scale_channels(model, group, role, scale)


class APG:
    """Accelerated proximal gradient for ``min G(λ) + γ‖λ‖₁`` over factor tensors ``λ``
    (Huang & Wang, "Data-Driven Sparse Structure Selection for Deep Neural Networks",
    ECCV 2018, §3.3; Parikh & Boyd's APG reformulated so that the gradient is the one
    autograd computed at the current parameter value).

    The parameter holds the look-ahead point ``λ'``; with ``S = soft_threshold``,
    step size ``η`` and momentum ``μ_t``, one :meth:`step` reads ``g = ∇G(λ'_{t−1})``::

        z_t   = λ'_{t−1} − η·g
        v_t   = S(z_t, ηγ) − λ'_{t−1} + μ_{t−1}·v_{t−1}
        λ'_t  = S(z_t, ηγ) + μ_t·v_t

    and keeps the iterate ``λ_t = S(z_t, ηγ)`` (exact zeros) in :attr:`iterates`.
    ``momentum=None`` is Nesterov's schedule ``μ_t = (t − 1)/(t + 2)`` (``μ_0 = 0``);
    a number is a fixed ``μ`` (the paper's MXNet setting, 0.9).  :meth:`finish`
    writes the iterates into the parameters.

    >>> lam = torch.nn.Parameter(torch.tensor([1.0, 0.25]))
    >>> apg = APG([lam], lr=0.5, gamma=1.0, momentum=0.5)
    >>> lam.grad = torch.tensor([0.0, 0.0])
    >>> apg.step()
    >>> apg.iterates[0].tolist(), lam.tolist()     # S([1, 0.25], 0.5); λ' = S + 0.5·(S − λ)
    ([0.5, 0.0], [0.25, -0.125])
    """

    def __init__(self, params: Iterable[torch.nn.Parameter], lr: float, gamma: float,
                 momentum: float | None = None):
        self.params = list(params)
        self.lr, self.gamma, self.momentum = float(lr), float(gamma), momentum
        self.t = 0
        self.velocity = [torch.zeros_like(p) for p in self.params]
        self.iterates = [p.detach().clone() for p in self.params]

    def mu(self, t: int) -> float:
        """The momentum ``μ_t`` after step ``t`` (``μ_0 = 0``)."""
        if t <= 0:
            return 0.0
        return float(self.momentum) if self.momentum is not None else (t - 1) / (t + 2)

    @torch.no_grad()
    def step(self) -> None:
        """One APG step from each parameter's ``.grad`` (missing: 0); the grads are cleared."""
        mu_prev, mu = self.mu(self.t), self.mu(self.t + 1)
        for i, p in enumerate(self.params):
            g = p.grad if p.grad is not None else torch.zeros_like(p)
            s = soft_threshold(p - self.lr * g, self.lr * self.gamma)
            self.velocity[i] = s - p + mu_prev * self.velocity[i]
            self.iterates[i] = s
            p.copy_(s + mu * self.velocity[i])
            p.grad = None
        self.t += 1

    @torch.no_grad()
    def finish(self) -> None:
        """Set every parameter to its iterate ``λ_t`` (exact zeros where soft-thresholded)."""
        for p, lam in zip(self.params, self.iterates):
            p.copy_(lam)

