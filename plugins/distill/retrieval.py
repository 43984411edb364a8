"""``retrieval`` — distil a slow cross-attention scorer's ranking into a fast dual encoder.

Miech, Alayrac, Laptev, Sivic & Zisserman, "Thinking Fast and Slow: Efficient
Text-to-Visual Retrieval with Transformers", CVPR 2021.

A cross-attention scorer ``s_t(q, c)`` sees a query and a candidate together
and is accurate but costs one forward pass per pair; a dual encoder embeds
queries with ``f`` and candidates with ``g`` separately, so a gallery is
embedded once and ranked by a dot product.  The teacher's ranking of each
query's candidate list ``C(q)`` is distilled into the embedding similarities
with a listwise KL, optionally next to the dual encoder's own contrastive loss:

    z_s(q, c) = scale · sim(f(q), g(c))            sim: cosine (default) or dot product
    p_t = softmax_{c ∈ C(q)}(s_t(q, c) / T),  p_s = softmax_{c ∈ C(q)}(z_s(q, c) / T)
    L   = kd_weight · T² · KL(p_t ‖ p_s)  +  contrastive_weight · CE(z_s(q, ·), positive(q))

averaged over the queries (the T² of Hinton et al. keeps the gradient scale
independent of T; the second term is InfoNCE over the same list, at the
student's own ``scale``).  ``kd_weight = 0`` is contrastive training alone and
needs no teacher.

Batches (the ``train`` stream):

in-batch candidates (``candidate_lists = False``, the default)
    ``(queries, candidates)`` with ``B`` rows each, row ``i`` a positive pair.
    Every query's list is the batch's candidates, its own positive at ``i``
    (other rows' candidates count as negatives, even when relevant — the
    teacher's scores are what tells the student otherwise); ``candidates = K``
    (2 ≤ K, at most the batch) shortens each list to the positive plus ``K − 1``
    other candidates of the batch drawn at random (the teacher then scores
    ``B·K`` pairs instead of ``B²``).
explicit lists (``candidate_lists = True``)
    ``(queries, candidates, positive)``: ``candidates`` of shape ``(B, K, ...)``
    (or a sequence of ``B`` tensors ``(K, ...)``, all of the same ``K``) and
    ``positive`` the ``(B,)`` index of each query's positive in its list, or
    ``-1`` for an unlabelled query: the teacher's ranking of its list is all it
    learns from (the paper's gain — the scorer labels lists no annotator did).
    The KL is averaged over every query, InfoNCE over the labelled ones.
    ``positive`` may be left out when ``contrastive_weight`` is 0.

The teacher is called as ``teacher(queries, candidates)`` on paired rows
(``N`` queries, ``N`` candidates) and returns one score per pair (shape
``(N,)`` or ``(N, 1)``); it is put in eval mode and runs without gradient.
The student holds the towers: ``query_encoder`` and ``candidate_encoder`` name
its modules (``named_modules`` names; ``""``, the default, is the student
itself), each called directly on a batch of inputs and returning a batch of
embeddings of one size.  Both ``""`` is a shared (siamese) tower.  Either tower
deploys on its own: ``sdk.deploy(student.query, "arm-int8", (x,), ...)``.

``examples/retrieval_models.py`` holds a worked case: a cross-attention scorer
over strips of digit images (each query digit attends to the candidate's) and
the MLP tower it teaches; the tests measure both on digit-set retrieval.
The temperature matters: ``T`` softens both distributions, so pick it near the
ratio of the teacher's score spread over a list to the student's (a student's
cosine logits span at most ``2 · scale``).

Without ``teacher=``, :func:`sdk.compress` would hand distillers the
uncompressed model — here the dual encoder itself, no scorer — so a recipe stage
with ``kd_weight > 0`` and no teacher raises :class:`~sdk.errors.InputError`.

>>> import torch
>>> from plugins.distill.retrieval import retrieval_loss
>>> z = torch.tensor([[2.0, 0.0, 0.0]])
>>> float(retrieval_loss(z, z, torch.tensor([0]), kd_weight=1.0, contrastive_weight=0.0))   # p_s = p_t
0.0
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import torch
import torch.nn.functional as F

from sdk import hookimpl
from sdk.base import Distiller
from sdk.config import check_choice, check_range
from sdk.errors import ConfigError, InputError
from sdk.features import named_module
from sdk.losses import soft_target_kl
from sdk.trainer import TrainConfig, fit

#: the similarities the student's logits can use
SIMILARITIES = ("cosine", "dot")
_NEEDS_TEACHER = ("retrieval needs a cross-attention scorer as teacher: sdk.compress(model, recipe, data=..., "
                  "teacher=scorer) with scorer(queries, candidates) -> one score per pair (or set kd_weight=0 "
                  "for contrastive training alone)")


def _check_logits(logits: torch.Tensor, what: str) -> None:
    if logits.dim() != 2 or logits.shape[1] < 2:
        raise InputError(f"retrieval: {what} must be (queries, candidates) with at least 2 candidates per "
                         f"query, got shape {tuple(logits.shape)}")


def retrieval_loss(student: torch.Tensor, teacher: torch.Tensor | None = None,
                   positive: torch.Tensor | None = None, *, temperature: float = 1.0, kd_weight: float = 1.0,
                   contrastive_weight: float = 1.0) -> torch.Tensor:
    """``kd_weight · T² · KL(softmax(teacher/T) ‖ softmax(student/T)) + contrastive_weight · CE(student, pos)``.

    ``student`` holds the dual encoder's logits ``(B, K)`` (scaled similarities of each query
    to its ``K`` candidates), ``teacher`` the scorer's scores of the same pairs, ``positive``
    the ``(B,)`` index of each query's positive (``-1``: unlabelled, left out of InfoNCE); the
    KL is a mean over all queries, InfoNCE over the labelled ones (0 when there are none).  A
    term of weight 0 is skipped, and its input may be ``None``.

    >>> s = torch.tensor([[0.0, 0.0]])
    >>> round(float(retrieval_loss(s, None, torch.tensor([1]), kd_weight=0.0)), 4)      # InfoNCE = ln 2
    0.6931
    """
    _check_logits(student, "the student's logits")
    total = student.new_zeros(())
    if kd_weight > 0:
        if teacher is None:
            raise InputError("retrieval: kd_weight > 0 needs the teacher's scores; " + _NEEDS_TEACHER)
        if teacher.shape != student.shape:
            raise InputError(f"retrieval: the teacher's scores {tuple(teacher.shape)} do not match the student's "
                             f"logits {tuple(student.shape)}; score the same (query, candidate) pairs")
        total = total + kd_weight * soft_target_kl(student, teacher.detach(), temperature)
    if contrastive_weight > 0:
        if positive is None:
            raise InputError("retrieval: contrastive_weight > 0 needs each query's positive: pass "
                             "(queries, candidates, positive) batches, or set contrastive_weight=0")
        if positive.shape != student.shape[:1] or positive.dtype.is_floating_point or (
                len(positive) and (int(positive.min()) < -1 or int(positive.max()) >= student.shape[1])):
            raise InputError(f"retrieval: positive must hold one integer index in [0, {student.shape[1]}) per "
                             f"query ({student.shape[0]}), or -1 for an unlabelled query, got {positive.dtype} "
                             f"of shape {tuple(positive.shape)}")
        labelled = positive >= 0
        if bool(labelled.any()):
            total = total + contrastive_weight * F.cross_entropy(student[labelled], positive[labelled].long())
    return total


@dataclasses.dataclass(frozen=True)
class CandidateBatch:
    """One batch laid out for scoring: ``queries`` ``(B, ...)``, the distinct candidate inputs
    ``pool`` ``(M, ...)``, ``index`` ``(B, K)`` (row ``b``: the pool rows of query ``b``'s list)
    and ``positive`` ``(B,)`` (the positive's column in ``index``, ``None`` when not given)."""

    queries: torch.Tensor
    pool: torch.Tensor
    index: torch.Tensor
    positive: torch.Tensor | None


class Retrieval(Distiller):
    """Slow cross-attention scorer → fast dual encoder (Miech 2021): listwise KL of the rankings, plus InfoNCE."""

    name = "retrieval"
    version = "1.0"
    streams = ("train",)

    @dataclasses.dataclass(frozen=True)
    class Config(TrainConfig):
        """Loss weights, candidate lists and towers; the training fields are :class:`TrainConfig`'s."""

        temperature: float = 1.0        # T of the listwise KL (both distributions)
        kd_weight: float = 1.0          # of T²·KL(p_t ‖ p_s); 0: contrastive alone, no teacher
        contrastive_weight: float = 1.0  # of InfoNCE on the positives; 0: distillation alone
        candidates: int = 0             # in-batch list length per query (positive + K−1 drawn); 0: whole batch
        candidate_lists: bool = False   # batches carry explicit (B, K, ...) lists and positives
        query_encoder: str = ""         # student module embedding queries ("" = the student)
        candidate_encoder: str = ""     # student module embedding candidates ("" = the student)
        similarity: str = "cosine"      # cosine | dot
        scale: float = 10.0             # student logits = scale · similarity (cosine lies in [-1, 1])

        def __post_init__(self):
            super().__post_init__()
            check_range("retrieval", "temperature", self.temperature, 0.0, lo_open=True)
            check_range("retrieval", "kd_weight", self.kd_weight, 0.0)
            check_range("retrieval", "contrastive_weight", self.contrastive_weight, 0.0)
            if self.kd_weight == 0 and self.contrastive_weight == 0:
                raise ConfigError("retrieval: kd_weight and contrastive_weight are both 0, nothing to train; "
                                  "set at least one above 0")
            check_range("retrieval", "candidates", self.candidates, 0)
            if not isinstance(self.candidate_lists, bool):
                raise ConfigError(f"retrieval: candidate_lists must be true or false, got {self.candidate_lists!r}")
            if self.candidates == 1:
                raise ConfigError("retrieval: candidates=1 leaves nothing to rank; use 0 (the whole batch) or 2 "
                                  "or more")
            if self.candidate_lists and self.candidates:
                raise ConfigError(f"retrieval: candidates={self.candidates} draws in-batch candidates, but "
                                  "candidate_lists=True uses the batches' own lists whole; set candidates=0")
            check_choice("retrieval", "similarity", self.similarity, SIMILARITIES)
            check_range("retrieval", "scale", self.scale, 0.0, lo_open=True)

    def loss(self, student: torch.Tensor, teacher: torch.Tensor | None = None,
             positive: torch.Tensor | None = None) -> torch.Tensor:
        """The objective for one batch of student logits ``(B, K)``, teacher scores and positives
        (:func:`retrieval_loss` with this config's weights and temperature)."""
        cfg = self.config
        return retrieval_loss(student, teacher, positive, temperature=cfg.temperature, kd_weight=cfg.kd_weight,
                              contrastive_weight=cfg.contrastive_weight)

    def towers(self, student: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module]:
        """The student's query and candidate encoders (:class:`ConfigError` listing the names it has)."""
        cfg = self.config
        return (named_module(student, cfg.query_encoder, "query_encoder"),
                named_module(student, cfg.candidate_encoder, "candidate_encoder"))

    def logits(self, query_embeddings: torch.Tensor, candidate_embeddings: torch.Tensor) -> torch.Tensor:
        """``scale · sim``: queries ``(B, D)`` against their lists ``(B, K, D)`` → ``(B, K)``."""
        if query_embeddings.shape[-1] != candidate_embeddings.shape[-1]:
            raise InputError(f"retrieval: the query embeddings have {query_embeddings.shape[-1]} dimensions and the "
                             f"candidate embeddings {candidate_embeddings.shape[-1]}; the towers must embed into "
                             "one space")
        if self.config.similarity == "cosine":
            query_embeddings = F.normalize(query_embeddings, dim=-1)
            candidate_embeddings = F.normalize(candidate_embeddings, dim=-1)
        return self.config.scale * torch.einsum("bd,bkd->bk", query_embeddings, candidate_embeddings)

    def layout(self, batch: Any) -> CandidateBatch:
        """Check one batch and lay it out as a :class:`CandidateBatch` (in-batch lists are drawn
        from torch's global generator, which :func:`sdk.trainer.fit` seeds)."""
        cfg = self.config
        if not isinstance(batch, (tuple, list)) or len(batch) not in ((2, 3) if cfg.candidate_lists else (2,)):
            form = "(queries, candidates[, positive])" if cfg.candidate_lists else "(queries, candidates)"
            got = f"a {type(batch).__name__} of {len(batch)}" if isinstance(batch, (tuple, list)) else \
                type(batch).__name__
            raise InputError(f"retrieval batches are {form}, got {got}"
                             + ("" if cfg.candidate_lists else "; explicit lists with positives need "
                                "candidate_lists=True"))
        queries, candidates = batch[0], batch[1]
        if not isinstance(queries, torch.Tensor) or queries.dim() < 1:
            raise InputError(f"retrieval: queries must be a tensor with queries on the first axis, got "
                             f"{type(queries).__name__}")
        b = queries.shape[0]
        if cfg.candidate_lists:
            return self._lists(queries, candidates, batch[2] if len(batch) == 3 else None)
        if not isinstance(candidates, torch.Tensor) or candidates.dim() < 1 or candidates.shape[0] != b:
            shape = tuple(candidates.shape) if isinstance(candidates, torch.Tensor) else type(candidates).__name__
            raise InputError(f"retrieval: in-batch mode pairs query i with candidate i, but there are {b} queries "
                             f"and candidates {shape}; give one positive candidate per query (or "
                             "candidate_lists=True for (B, K, ...) lists)")
        if b < 2:
            raise InputError("retrieval: an in-batch list needs at least 2 pairs per batch; use larger batches")
        k = min(cfg.candidates or b, b)
        own = torch.arange(b, device=queries.device)
        if k == b:
            return CandidateBatch(queries, candidates, own.expand(b, b), own)
        draw = torch.rand(b, b, device=queries.device)
        draw.fill_diagonal_(-1.0)                   # never draw the own positive as a negative
        others = draw.topk(k - 1, dim=1).indices
        return CandidateBatch(queries, candidates, torch.cat([own[:, None], others], 1), torch.zeros_like(own))

    def _lists(self, queries: torch.Tensor, candidates: Any, positive: Any) -> CandidateBatch:
        b = queries.shape[0]
        if isinstance(candidates, (list, tuple)):
            if not all(isinstance(c, torch.Tensor) and c.dim() >= 1 for c in candidates):
                raise InputError("retrieval: every candidate list must be a tensor (K, ...)")
            shapes = sorted({tuple(c.shape) for c in candidates})
            if len(shapes) > 1:
                raise InputError(f"retrieval: the candidate lists have different shapes {shapes}; pad or trim every "
                                 "query's list to the same K candidates of the same shape")
            candidates = torch.stack(list(candidates)) if candidates else torch.empty(0)
        if not isinstance(candidates, torch.Tensor) or candidates.dim() < 2 or candidates.shape[0] != b:
            shape = tuple(candidates.shape) if isinstance(candidates, torch.Tensor) else type(candidates).__name__
            raise InputError(f"retrieval: candidate_lists=True needs candidates (B, K, ...) for the {b} queries, "
                             f"got {shape}")
        k = candidates.shape[1]
        if k < 2:
            raise InputError(f"retrieval: each query needs at least 2 candidates to rank, got K={k}")
        if positive is not None:
            positive = torch.as_tensor(positive, device=queries.device)
            if positive.shape != (b,):
                raise InputError(f"retrieval: positive must be the ({b},) index of each query's positive, got shape "
                                 f"{tuple(positive.shape)}")
        index = torch.arange(b * k, device=queries.device).reshape(b, k)
        return CandidateBatch(queries, candidates.reshape(b * k, *candidates.shape[2:]), index, positive)

    def teacher_scores(self, teacher: Callable, laid: CandidateBatch) -> torch.Tensor:
        """The scorer's ``(B, K)`` scores of every query against its list (no gradient)."""
        b, k = laid.index.shape
        with torch.no_grad():
            scores = teacher(laid.queries.repeat_interleave(k, 0), laid.pool[laid.index.reshape(-1)])
        if not isinstance(scores, torch.Tensor) or scores.numel() != b * k:
            shape = tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__
            raise InputError(f"retrieval: the teacher must return one score per (query, candidate) pair ({b * k} "
                             f"pairs), got {shape}")
        scores = scores.reshape(b, k)
        if not torch.isfinite(scores).all():
            raise InputError("retrieval: the teacher's scores are not all finite; check the scorer and the data")
        return scores

    def batch_loss(self, student: torch.nn.Module, teacher: Callable | None, batch: Any) -> torch.Tensor:
        """The objective of one batch: lay it out, score the lists with ``teacher`` (skipped when
        ``kd_weight`` is 0), embed with the student's towers and apply :meth:`loss`."""
        laid = self.layout(batch)
        scores = None
        if self.config.kd_weight > 0:
            if teacher is None:
                raise InputError(_NEEDS_TEACHER)
            scores = self.teacher_scores(teacher, laid)
        f, g = self.towers(student)
        q = f(laid.queries)
        c = g(laid.pool)
        q, c = q.reshape(q.shape[0], -1), c.reshape(c.shape[0], -1)
        logits = self.logits(q, c[laid.index])
        return self.loss(logits, None if scores is None else scores.to(logits.dtype), laid.positive)

    def run(self, model, ctx):
        """``apply`` with the caller's scorer: the uncompressed original is the dual encoder, no
        scorer, so ``ctx.teacher is None`` with ``kd_weight > 0`` is an :class:`InputError`."""
        if ctx.teacher is None and self.config.kd_weight > 0:
            raise InputError(_NEEDS_TEACHER)
        return self.apply(model, ctx.teacher, ctx.data.get("train"))

    def apply(self, student: torch.nn.Module, teacher, data) -> torch.nn.Module:
        cfg = self.config
        if cfg.kd_weight > 0 and not callable(teacher):
            raise InputError(_NEEDS_TEACHER)
        self.towers(student)                       # fail on bad names before any training
        if isinstance(teacher, torch.nn.Module):
            teacher.eval()
        fit(student, data, lambda model, batch: self.batch_loss(model, teacher, batch), cfg, desc="retrieval")
        return student


@hookimpl
def register_distillers(register):
    register(Retrieval)
