"""``dml`` — Deep Mutual Learning: a cohort of students that teach each other.

Zhang, Xiang, Hospedales & Lu, "Deep Mutual Learning", CVPR 2018.

No pretrained teacher is needed.  K networks train together on the same
batches; each one fits the labels and, at the same time, the other
networks' predicted distributions.  For student ``k`` with probabilities
``p_k = softmax(z_k)``:

    L_k = CE(z_k, y) + 1/(K − 1) · Σ_{l ≠ k} KL(p_l ‖ p_k)

with the peers' ``p_l`` treated as constants (detached) in ``L_k``.  KL is
averaged over the batch; it is kd's soft term at ``T = 1``
(:func:`sdk.losses.soft_target_kl`).  The peers' secondary
probabilities act as a learned, sample-specific label smoothing, which is why
the cohort generalises better than the same networks trained alone.

Update order: every step minimises ``Σ_k L_k`` with one optimizer.  Because
each ``L_k`` sees its peers detached, the gradient for network ``k`` is
exactly ``∇ L_k``: all networks step simultaneously on predictions from
before the step (the paper's Algorithm 1 updates them in turn, recomputing
predictions in between; the simultaneous form is the common implementation
and costs one forward per network per step).

``apply(student, teacher, data)``:

* ``teacher=None``: the cohort is ``student`` plus ``peers`` copies of it,
  re-initialised with seeds ``seed + 1 … seed + peers`` (different starting
  points are what makes the peers informative).
* ``teacher`` a model or a list/tuple of models: these are the peers
  (``peers`` is then ignored).  They are deep-copied first, so the caller's
  models are left untouched.

In a recipe (``sdk.compress(model, recipe, data=..., teacher=...)``) the peers
are the caller's ``teacher`` when one is given and fresh ones when not: unlike
the other distillers, dml does not fall back to the uncompressed model, whose
copy would start where the student starts and teach it nothing at first.

The trained student is returned; the whole trained cohort (student first) is
kept in ``self.cohort`` for callers who want the peers too.

>>> import torch
>>> from plugins.distill.dml import DML
>>> z = torch.tensor([[1.0, 0.0]])
>>> round(float(DML().loss(z, [z], torch.tensor([0]))), 4)   # agreeing peer: only CE is left
0.3133
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Sequence

import torch
import torch.nn.functional as F
from torch.nn.utils import parametrize

from sdk import hookimpl
from sdk.base import Distiller
from sdk.config import check_range
from sdk.errors import InputError
from sdk.losses import soft_target_kl
from sdk.trainer import TrainConfig, fit, split_batch


class DML(Distiller):
    """A cohort of networks trained with cross-entropy plus KL to each other."""

    name = "dml"
    version = "1.0"
    streams = ("train",)

    @dataclasses.dataclass(frozen=True)
    class Config(TrainConfig):
        """Cohort size; the training fields are :class:`TrainConfig`'s (one optimizer for the cohort)."""

        peers: int = 1                # extra freshly initialised copies when no peers are given

        def __post_init__(self):
            super().__post_init__()
            check_range("dml", "peers", self.peers, 1)

    def __init__(self, config=None, **options) -> None:
        super().__init__(config, **options)
        self.cohort: list[torch.nn.Module] = []

    def loss(self, student: torch.Tensor, teacher: torch.Tensor | Sequence[torch.Tensor],
             target: torch.Tensor | None = None) -> torch.Tensor:
        """``L_k`` for one network: its logits ``student`` ``(N, C)``, the peers'
        logits ``teacher`` (``(K−1, N, C)`` or a list), labels ``target``."""
        if target is None:
            raise InputError("dml needs labels: pass (x, y) batches (mutual learning has no teacher to label data)")
        peers = list(teacher)
        if not peers:
            raise InputError("dml needs at least one peer's logits")
        mimicry = sum(soft_target_kl(student, p.detach()) for p in peers) / len(peers)
        return F.cross_entropy(student, target) + mimicry

    def cohort_loss(self, logits: Sequence[torch.Tensor], target: torch.Tensor) -> torch.Tensor:
        """``Σ_k L_k`` over a cohort's logits; its gradient for network k is ``∇ L_k``."""
        return sum(self.loss(z, [p for j, p in enumerate(logits) if j != k], target) for k, z in enumerate(logits))

    def make_cohort(self, student: torch.nn.Module, teacher) -> list[torch.nn.Module]:
        """``[student, peer, ...]`` as described in the module docstring."""
        if teacher is None:
            return [student] + [_fresh_copy(student, self.config.seed + i) for i in range(1, self.config.peers + 1)]
        peers = [teacher] if isinstance(teacher, torch.nn.Module) else teacher
        if not isinstance(peers, (list, tuple)) or not peers or \
                not all(isinstance(p, torch.nn.Module) for p in peers):
            raise InputError("dml takes teacher=None (fresh peers, see config 'peers') or a model or list of models "
                             f"as peers; got {type(teacher).__name__}")
        if any(p is student for p in peers):
            raise InputError("dml: the student cannot be its own peer; pass other models or teacher=None")
        return [student] + [copy.deepcopy(p) for p in peers]

    def run(self, model, ctx):
        """``apply`` with the caller's ``teacher`` as peers, or fresh peers when none was given
        (never a copy of the uncompressed original, see the module docstring)."""
        return self.apply(model, ctx.teacher, ctx.data.get("train"))

    def apply(self, student: torch.nn.Module, teacher, data) -> torch.nn.Module:
        cohort = self.make_cohort(student, teacher)

        def step(models, batch):
            x, y = split_batch(batch)
            return self.cohort_loss([m(x) for m in models], y)

        fit(torch.nn.ModuleList(cohort), data, step, self.config, desc=f"dml x{len(cohort)}", subject=student)
        self.cohort = cohort
        return student


def _fresh_copy(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """A deep copy of ``model`` with every resettable layer re-initialised under ``seed``; a
    pruned layer's mask stays, so the copy is as sparse as ``model``."""
    twin = copy.deepcopy(model)
    torch.manual_seed(seed)
    for m in twin.modules():
        if not hasattr(m, "reset_parameters"):
            continue
        if parametrize.is_parametrized(m):
            _reset_masked(m)
        else:
            m.reset_parameters()
    return twin


def _reset_masked(m: torch.nn.Module) -> None:
    """``reset_parameters`` of a masked layer.  Called on the layer itself it would initialise
    the computed weight·mask, a temporary; it runs instead on a plain view of the layer whose
    tensors are the masked originals (remove_parametrizations cannot be used: the deep copies
    share their parametrized class with the student, and removing edits that class)."""
    plain = object.__new__(parametrize.type_before_parametrizations(m))
    plain.__dict__.update(m.__dict__)
    plain._parameters = {**m._parameters, **{name: p.original for name, p in m.parametrizations.items()}}
    plain._modules = {k: v for k, v in m._modules.items() if k != "parametrizations"}
    plain.reset_parameters()


@hookimpl
def register_distillers(register):
    register(DML)
