"""``dml`` — Deep Mutual Learning: a cohort of students that teach each other.

Zhang, Xiang, Hospedales & Lu, "Deep Mutual Learning", CVPR 2018.

No pretrained teacher is needed.  K networks train together on the same
batches; each one fits the labels and, at the same time, the other
networks' predicted distributions.  For student ``k`` with probabilities
``p_k = softmax(z_k)``:

    L_k = CE(z_k, y) + 1/(K − 1) · Σ_{l ≠ k} KL(p_l ‖ p_k)

with the peers' ``p_l`` treated as constants (detached) in ``L_k``.  KL is
averaged over the batch; it is kd's soft term at ``T = 1``
(:class:`plugins.distill.kd.KD`), reused here.  The peers' secondary
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
  models are left untouched — ``sdk.compress`` passes the uncompressed model
  as ``teacher`` and promises not to modify it.

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

from sdk import hookimpl
from sdk.base import Distiller
from sdk.config import Config, check_range
from sdk.errors import InputError
from sdk.trainer import TrainConfig, fit, split_batch

from .kd import KD


class DML(Distiller):
    """A cohort of networks trained with cross-entropy plus KL to each other."""

    name = "dml"
    version = "1.0"

    @dataclasses.dataclass(frozen=True)
    class Config(Config):
        peers: int = 1                # extra freshly initialised copies when no peers are given
        epochs: int = 1
        lr: float = 1e-3
        optimizer: str = "adam"
        seed: int = 0
        progress: bool = True

        def __post_init__(self):
            check_range("dml", "peers", self.peers, 1)
            check_range("dml", "epochs", self.epochs, 1)
            check_range("dml", "lr", self.lr, 0.0, lo_open=True)

    _kl = KD(objective="soft", temperature=1.0, progress=False)

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
        mimicry = sum(self._kl.loss(student, p.detach()) for p in peers) / len(peers)
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

    def apply(self, student: torch.nn.Module, teacher, data) -> torch.nn.Module:
        cfg = self.config
        cohort = self.make_cohort(student, teacher)

        def step(models, batch):
            x, y = split_batch(batch)
            return self.cohort_loss([m(x) for m in models], y)

        fit(torch.nn.ModuleList(cohort), data, step,
            TrainConfig(epochs=cfg.epochs, lr=cfg.lr, optimizer=cfg.optimizer, seed=cfg.seed, progress=cfg.progress),
            desc=f"dml x{len(cohort)}")
        self.cohort = cohort
        return student


def _fresh_copy(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """A deep copy of ``model`` with every resettable layer re-initialised under ``seed``."""
    twin = copy.deepcopy(model)
    torch.manual_seed(seed)
    for m in twin.modules():
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
    return twin


@hookimpl
def register_distillers(register):
    register(DML)
