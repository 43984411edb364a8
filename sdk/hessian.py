"""Second-order pruning: an empirical-Fisher inverse Hessian per output row and the OBS steps.

Optimal Brain Surgeon (Hassibi & Stork, 1993) removes weight ``q`` where the
second-order loss increase is smallest and moves the remaining weights to
absorb it.  With ``H⁻¹`` the inverse Hessian and ``e_q`` the ``q``-th unit
vector::

    saliency   L_q = w_q² / (2 [H⁻¹]_qq)
    update     δw  = −(w_q / [H⁻¹]_qq) · H⁻¹ e_q          (so that w_q + δw_q = 0)

For a quadratic loss ``½ (w − w*)ᵀ H (w − w*)`` at its minimum both are exact:
``L_q`` is the smallest loss increase with ``w_q = 0`` and ``w* + δw`` the
weights reaching it.

**Hessian.**  The empirical Fisher ``F = 1/N Σ_n g_n g_nᵀ`` of per-sample
gradients ``g_n`` of the cross-entropy stands in for ``H`` (WoodFisher, Singh &
Alistarh 2020; OBC, Frantar & Alistarh 2022), block-diagonally: one block per
*output row* of each layer (``Linear``: the ``in_features`` weights of an
output; ``Conv``: the ``in/groups · kh · kw`` weights of one filter); rows and
layers do not interact.  Per row ``F`` is dampened by ``λ · mean(diag F)``
(rows with no gradient at all by ``λ`` times the layer's mean, else ``λ``) and
inverted in float64.

**Pruning.**  :func:`obs_prune` removes weights from every row one at a time
(iterative OBS, not in blocks): after each removal the row's ``H⁻¹`` loses
row and column ``q`` by the rank-one downdate
``H⁻¹ ← H⁻¹ − H⁻¹e_q e_qᵀH⁻¹ / [H⁻¹]_qq``, the inverse of ``H`` with ``q``
fixed at zero, so later steps see the weights already removed.
:func:`allocate` spreads a layer's count over its rows from the loss increase
of each step along every row's path (the OBC allocation).

>>> import torch
>>> w = torch.tensor([[1.0, -0.2, 0.5]])
>>> h = torch.tensor([[[2.0, 0.5, 0.0], [0.5, 1.0, 0.0], [0.0, 0.0, 4.0]]])
>>> new, keep, _ = obs_prune(w, torch.linalg.inv(h), torch.tensor([1]))
>>> keep.tolist(), [round(v, 4) for v in new[0].tolist()]
([[True, False, True]], [0.95, 0.0, 0.5])
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence

import torch
from torch.nn.utils import parametrize

from .errors import InputError


def obs_saliency(w: torch.Tensor, hinv: torch.Tensor) -> torch.Tensor:
    """``w_q² / (2 [H⁻¹]_qq)`` for every ``q`` of each row: ``w`` (rows, d), ``hinv`` (rows, d, d).

    >>> obs_saliency(torch.tensor([[2.0, 1.0]]), torch.eye(2)[None] * 0.5).tolist()
    [[4.0, 1.0]]
    """
    return w ** 2 / (2 * torch.diagonal(hinv, dim1=-2, dim2=-1))


def obs_update(w: torch.Tensor, hinv: torch.Tensor, q: int) -> torch.Tensor:
    """``δw = −(w_q / [H⁻¹]_qq) H⁻¹ e_q`` for one row: ``w`` (d,), ``hinv`` (d, d).

    >>> obs_update(torch.tensor([1.0, 3.0]), torch.tensor([[2.0, 1.0], [1.0, 2.0]]), 0).tolist()
    [-1.0, -0.5]
    """
    return -(w[q] / hinv[q, q]) * hinv[:, q]


def obs_prune(w: torch.Tensor, hinv: torch.Tensor, counts: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Remove ``counts[r]`` weights from each row ``r`` of ``w`` by iterative OBS.

    ``w``: (rows, d); ``hinv``: (rows, d, d) inverse Hessians; ``counts``: (rows,).
    Returns ``(weights, keep, losses)`` in ``w``'s dtype: the updated weights (exact
    zeros where pruned), the boolean keep mask and ``losses[r, j]``, the saliency of
    the weight removed at step ``j`` of row ``r`` (``inf`` past ``counts[r]``).  Ties
    go to the lowest index.
    """
    dtype = w.dtype
    w, hinv = w.double().clone(), hinv.double().clone()
    rows, d = w.shape
    counts = torch.as_tensor(counts, dtype=torch.long)
    if counts.shape != (rows,) or bool((counts < 0).any()) or bool((counts > d).any()):
        raise InputError(f"obs_prune: counts must be {rows} values in 0..{d}, got {counts.tolist()}")
    pruned = torch.zeros(rows, d, dtype=torch.bool)
    losses = torch.full((rows, d), math.inf, dtype=torch.float64)
    r = torch.arange(rows)
    for step in range(int(counts.max()) if rows else 0):
        active = counts > step
        diag = torch.diagonal(hinv, dim1=1, dim2=2)
        sal = torch.where(pruned, math.inf, w ** 2 / (2 * torch.where(pruned, 1.0, diag)))
        q = sal.argmin(1)
        col = hinv[r, :, q]                                   # H⁻¹ e_q of each row
        hqq = col[r, q]
        coef = torch.where(active, w[r, q] / hqq, 0.0)
        w.sub_(coef[:, None] * col)
        scale = torch.where(active, -1.0 / hqq, 0.0)
        hinv.baddbmm_((scale[:, None] * col)[:, :, None], col[:, None, :])
        pruned[r[active], q[active]] = True
        losses[active, step] = sal[r, q][active]
    # removed weights are zero in exact arithmetic; rounding leaves ~1e-16 from later steps' updates
    w[pruned] = 0.0
    return w.to(dtype), ~pruned, losses


def allocate(losses: torch.Tensor, k: int) -> torch.Tensor:
    """How many weights each row loses so that ``k`` go in all, at the least estimated loss.

    ``losses[r, j]`` is the cost of row ``r``'s step ``j`` (:func:`obs_prune` over whole
    rows).  Each row's costs are made non-decreasing (running maximum) so the ``k``
    cheapest steps overall (a stable sort: ties to the lower row, then the earlier step)
    are a prefix of every row's path.

    >>> allocate(torch.tensor([[0.1, 0.5, 0.6], [0.2, 0.3, 0.9]]), 3).tolist()
    [1, 2]
    """
    rows, d = losses.shape
    if not 0 <= k <= rows * d:
        raise InputError(f"allocate: cannot remove {k} of {rows * d} weights")
    envelope = torch.cummax(losses.double(), dim=1).values.reshape(-1)
    chosen = torch.sort(envelope, stable=True).indices[:k]
    return torch.bincount(chosen // d, minlength=rows)


def weight_key(name: str, module: torch.nn.Module) -> str:
    """The parameter name of ``module.weight`` in ``model.named_parameters()`` (masked layers
    keep theirs under ``parametrizations.weight.original``)."""
    prefix = f"{name}." if name else ""
    if parametrize.is_parametrized(module, "weight"):
        return f"{prefix}parametrizations.weight.original"
    return f"{prefix}weight"


def fisher_rows(model: torch.nn.Module, layers: Sequence[tuple[str, torch.nn.Module]], data: Iterable, *,
                samples: int = 1024, chunk: int = 64) -> dict[str, torch.Tensor]:
    """Empirical Fisher per output row of each layer: ``F[r] = 1/N Σ_n g_n,r g_n,rᵀ`` (float64).

    ``g_n,r`` is the gradient of ``cross_entropy(model(x_n), y_n)`` with respect to
    row ``r`` of the layer's (effective, masked) weight flattened to ``d`` values;
    ``data`` yields ``(x, y)`` batches, of which the first ``samples`` samples are
    used.  The model runs in eval mode (BatchNorm statistics fixed); per-sample
    gradients come from ``torch.func.vmap`` over ``chunk`` samples at a time.
    Returns ``{layer name: (rows, d, d)}``.
    """
    from torch.func import functional_call, grad, vmap

    from .trainer import split_batch

    keys = {n: weight_key(n, m) for n, m in layers}
    params = dict(model.named_parameters())
    theta = {keys[n]: params[keys[n]].detach() for n, _ in layers}
    shapes = {n: m.weight.shape for n, m in layers}
    fisher = {n: torch.zeros(s[0], math.prod(s[1:]), math.prod(s[1:]), dtype=torch.float64)
              for n, s in shapes.items()}

    def loss(th, x, y):
        out = functional_call(model, th, (x[None],))
        return torch.nn.functional.cross_entropy(out, y[None])

    per_sample = vmap(grad(loss), in_dims=(None, 0, 0))
    modes = {m: m.training for m in model.modules()}
    model.eval()
    seen = 0
    try:
        with torch.no_grad():     # grad() still differentiates; nothing else records a graph
            for batch in data:
                x, y = split_batch(batch)
                if y is None:
                    raise InputError("the empirical Fisher needs labelled data: pass (x, y) batches")
                x, y = torch.as_tensor(x), torch.as_tensor(y).long()
                x, y = x[:samples - seen], y[:samples - seen]
                for i in range(0, len(x), chunk):
                    grads = per_sample(theta, x[i:i + chunk], y[i:i + chunk])
                    for n, s in shapes.items():
                        g = grads[keys[n]].reshape(-1, s[0], fisher[n].shape[1]).double()
                        fisher[n] += torch.einsum("nri,nrj->rij", g, g)
                seen += len(x)
                if seen >= samples:
                    break
    finally:
        for m, mode in modes.items():
            m.training = mode
    if seen == 0:
        raise InputError("the empirical Fisher needs data: the batches were empty")
    return {n: f / seen for n, f in fisher.items()}


def dampened_inverse(fisher: torch.Tensor, dampening: float) -> torch.Tensor:
    """``(F + λ·mean(diag F)·I)⁻¹`` per row of ``fisher`` (rows, d, d), in float64.

    A row without curvature (``diag F = 0``: a unit that never gets a gradient)
    takes ``λ`` times the layer's mean diagonal, or ``λ`` when the layer has none.

    >>> f = torch.stack([torch.eye(2) * 2.0, torch.zeros(2, 2)])     # the second row has no curvature
    >>> dampened_inverse(f, 1.0).diagonal(dim1=1, dim2=2).tolist()
    [[0.25, 0.25], [1.0, 1.0]]
    """
    f = fisher.double()
    diag = torch.diagonal(f, dim1=1, dim2=2)
    row = diag.mean(1)
    layer = float(diag.mean()) if diag.numel() else 0.0
    fallback = dampening * (layer if layer > 0 else 1.0)
    damp = torch.where(row > 0, dampening * row, fallback)
    eye = torch.eye(f.shape[1], dtype=torch.float64)
    return torch.cholesky_inverse(torch.linalg.cholesky(f + damp[:, None, None] * eye))
