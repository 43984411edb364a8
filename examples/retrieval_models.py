"""Digit-set retrieval: the task, the slow cross-attention scorer and the fast dual encoder of
the ``retrieval`` distiller (Miech et al. 2021, "Thinking Fast and Slow").

A *strip* is ``S`` digit images side by side (``1 × 8 × 8S``, ``S = 3`` by default); two strips
match when they show the same *set* of classes, in any order: the query ``[3|7|1]`` retrieves
the gallery strips ``[7|1|3]``, ``[1|3|7]``, … and strips sharing two of its digits rank next.

:class:`CrossAttentionScorer` (the teacher) reads a pair jointly: every digit of the query
attends to the candidate's digits and a head scores how well it found its match.  It learns one
digit comparison that every position shares, so a few hundred labelled lists teach it.
:class:`StripTower` (the student) embeds a strip alone with an MLP that has to learn each
position's digits separately: from the same labels it retrieves far worse, but a gallery is
embedded once and a query costs one tower pass plus a dot product per candidate, where the
scorer runs once per (query, candidate) pair.  Distillation closes part of the gap by letting
the scorer rank lists of *unlabelled* strips for the student.

>>> import torch
>>> scorer, tower = CrossAttentionScorer(), StripTower()
>>> q = torch.rand(4, 1, 8, 24)
>>> tuple(scorer(q, q.flip(0)).shape), tuple(tower(q).shape)
((4,), (4, 32))
"""

from __future__ import annotations

import dataclasses
import itertools

import torch
import torch.nn.functional as F
from torch import nn

#: digit images per strip
DIGITS = 3


def digit_tokens(strips: torch.Tensor, digits: int = DIGITS) -> torch.Tensor:
    """``(N, 1, 8, 8·digits)`` strips → ``(N, digits, 64)``: one flattened 8×8 image per token."""
    n = strips.shape[0]
    return strips.reshape(n, 8, digits, 8).permute(0, 2, 1, 3).reshape(n, digits, 64)


class CrossAttentionScorer(nn.Module):
    """The slow, accurate model: ``scorer(queries, candidates)`` scores row ``i``'s pair.

    One MLP embeds every digit of both strips as a token; the query's tokens attend to the
    candidate's (one :class:`torch.nn.MultiheadAttention` layer, queries from the query strip,
    keys and values from the candidate); a head scores each query token against what it
    attended to (``[t ⊙ a, |t − a|]``), and the pair's score is the sum over the query's
    tokens — high when every query digit finds its match in the candidate.
    """

    def __init__(self, dim: int = 32, heads: int = 2, hidden: int = 64, digits: int = DIGITS):
        super().__init__()
        self.digits, self.dim, self.hidden = digits, dim, hidden
        self.embed = nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, dim))
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.head = nn.Sequential(nn.Linear(2 * dim, hidden), nn.ReLU(), nn.Linear(hidden, 1))

    def forward(self, query: torch.Tensor, candidate: torch.Tensor) -> torch.Tensor:
        tq = self.embed(digit_tokens(query, self.digits))
        tc = self.embed(digit_tokens(candidate, self.digits))
        attended, _ = self.attn(tq, tc, tc, need_weights=False)
        match = self.head(torch.cat([tq * attended, (tq - attended).abs()], -1))
        return match.squeeze(-1).sum(-1)

    def pair_macs(self) -> int:
        """Multiply-accumulates of scoring one (query, candidate) pair (weights only, no bias
        adds): both strips' token embeddings; the attention's query, key and value projections,
        ``q·kᵀ``, the weighted sum of values and the output projection; the head."""
        s, d, h = self.digits, self.dim, self.hidden
        embed = 2 * s * (64 * h + h * d)
        attention = 3 * s * d * d + 2 * s * s * d + s * d * d
        head = s * (2 * d * h + h)
        return embed + attention + head


class StripTower(nn.Module):
    """The fast model's embedding tower: an MLP from a whole strip to a ``dim``-d embedding
    (queries and candidates share it — both are strips)."""

    def __init__(self, hidden: int = 128, dim: int = 32, digits: int = DIGITS):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64 * digits, hidden), nn.ReLU(), nn.Linear(hidden, dim))

    def forward(self, strips: torch.Tensor) -> torch.Tensor:
        return self.net(strips)


def train_scorer(scorer: CrossAttentionScorer, data, epochs: int, lr: float = 3e-3, seed: int = 0):
    """Fit the scorer on labelled lists ``(queries (B, ...), candidates (B, K, ...), positive (B,))``
    by the softmax cross-entropy of each list's scores against its positive; returns it in eval mode."""
    torch.manual_seed(seed)
    opt = torch.optim.Adam(scorer.parameters(), lr=lr)
    scorer.train()
    for _ in range(epochs):
        for q, c, pos in data:
            b, k = c.shape[:2]
            s = scorer(q.repeat_interleave(k, 0), c.reshape(b * k, *c.shape[2:])).reshape(b, k)
            loss = F.cross_entropy(s, pos)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return scorer.eval()


# -- the task ---------------------------------------------------------------------


def class_sets(digits: int = DIGITS) -> list[tuple[int, ...]]:
    """Every set of ``digits`` distinct classes, sorted (120 for three digits)."""
    return list(itertools.combinations(range(10), digits))


def strips_of(x: torch.Tensor, y: torch.Tensor, sets: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """One strip ``(1, 8, 8S)`` per row of ``sets`` ``(N, S)``: for each class a random image of it
    from ``x``/``y``, the digits in a random order."""
    members = [torch.nonzero(y == k).flatten() for k in range(10)]
    counts = torch.tensor([len(m) for m in members])
    table = torch.stack([F.pad(m, (0, int(counts.max()) - len(m))) for m in members])
    sets = torch.gather(sets, 1, torch.argsort(torch.rand(sets.shape, generator=g), 1))
    picks = table[sets, (torch.rand(sets.shape, generator=g) * counts[sets]).long()]
    return torch.cat(list(x[picks].unbind(1)), -1)


def random_sets(n: int, g: torch.Generator, digits: int = DIGITS) -> torch.Tensor:
    """``n`` class sets ``(n, digits)``, uniform over :func:`class_sets`."""
    every = torch.tensor(class_sets(digits))
    return every[torch.randint(len(every), (n,), generator=g)]


def set_ids(sets: torch.Tensor, digits: int = DIGITS) -> torch.Tensor:
    """Each row's index in :func:`class_sets` (order-free)."""
    index = {s: i for i, s in enumerate(class_sets(digits))}
    return torch.tensor([index[tuple(sorted(row))] for row in sets.tolist()])


@dataclasses.dataclass(frozen=True)
class StripTask:
    """The data of one digit-set retrieval task.

    ``labelled``: batches ``(queries, candidates (B, K, ...), positive)`` — each list holds a strip
    of the query's set at ``positive`` and ``K − 1`` strips of other sets (train images).
    ``unlabelled``: batches of the same form over strips of random train images, no labels used
    (``positive`` = −1, classes may repeat); only a scorer can rank their lists.
    ``queries``/``query_ids`` and ``gallery``/``gallery_ids``: the test retrieval, from disjoint
    halves of the test images, with every set's id (relevant: equal ids).
    """

    labelled: list
    unlabelled: list
    queries: torch.Tensor
    query_ids: torch.Tensor
    gallery: torch.Tensor
    gallery_ids: torch.Tensor


def strip_task(digits_data, labelled: int = 512, unlabelled: int = 4096, k: int = 16, per_set: int = 3,
               test_queries: int = 200, digits: int = DIGITS, seed: int = 0) -> StripTask:
    """Build a :class:`StripTask` from ``(x_train, y_train, x_test, y_test)`` digits."""
    xtr, ytr, xte, yte = digits_data
    g = torch.Generator().manual_seed(seed)
    sets = random_sets(labelled, g, digits)
    others = random_sets(labelled * 4 * (k - 1), g, digits).reshape(labelled, 4 * (k - 1), digits)
    same = (others.sort(-1).values == sets.sort(-1).values[:, None]).all(-1)
    negatives = torch.stack([row[~keep][:k - 1] for row, keep in zip(others, same)])
    q, pos = strips_of(xtr, ytr, sets, g), strips_of(xtr, ytr, sets, g)
    neg = strips_of(xtr, ytr, negatives.reshape(-1, digits), g).reshape(labelled, k - 1, *q.shape[1:])
    lists = torch.cat([pos[:, None], neg], 1)
    zero = torch.zeros(labelled, dtype=torch.long)
    lab = [(q[i:i + 32], lists[i:i + 32], zero[i:i + 32]) for i in range(0, labelled, 32)]

    picks = torch.randint(len(xtr), (unlabelled * (k + 1), digits), generator=g)
    u = torch.cat(list(xtr[picks].unbind(1)), -1)
    uq, ul = u[:unlabelled], u[unlabelled:].reshape(unlabelled, k, *u.shape[1:])
    none = torch.full((unlabelled,), -1, dtype=torch.long)
    unl = [(uq[i:i + 64], ul[i:i + 64], none[i:i + 64]) for i in range(0, unlabelled, 64)]

    half = len(xte) // 2
    qsets = random_sets(test_queries, g, digits)
    gsets = torch.tensor(class_sets(digits)).repeat_interleave(per_set, 0)
    return StripTask(lab, unl, strips_of(xte[:half], yte[:half], qsets, g), set_ids(qsets, digits),
                     strips_of(xte[half:], yte[half:], gsets, g), set_ids(gsets, digits))
