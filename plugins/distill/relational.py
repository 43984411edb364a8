"""``relational`` — Relational Knowledge Distillation: match how samples relate.

Park, Kim, Lu & Cho, "Relational Knowledge Distillation", CVPR 2019.

Instead of matching each sample's output, the student matches the *structure*
of the batch in embedding space: distances between pairs and angles in
triplets.  Both are invariant to rotating, translating and (after the
normalisation below) scaling the embedding, so the student's embedding may
even have a different size from the teacher's.

For a batch of embeddings ``e_1 … e_N`` (flattened layer outputs):

distance-wise
    ``ψ_D(i, j) = ‖e_i − e_j‖ / μ`` with ``μ`` the mean of ``‖e_i − e_j‖`` over
    the ordered pairs ``i ≠ j``;
    ``L_dist = mean_{i ≠ j} huber(ψ_D^s(i, j) − ψ_D^t(i, j))``.
angle-wise
    ``ψ_A(i, j, k) = ⟨(e_i − e_j)/‖e_i − e_j‖, (e_k − e_j)/‖e_k − e_j‖⟩``, the
    cosine of the angle at ``e_j``;
    ``L_angle = mean over triplets of distinct i, j, k of huber(ψ_A^s − ψ_A^t)``.

``huber`` is the smooth-L1 of the paper (δ = 1): ``½x²`` for ``|x| < 1``,
``|x| − ½`` otherwise.  The objective is

    loss = lambda_distance · L_dist + lambda_angle · L_angle + ce_weight · CE(s, y)

(defaults 1 : 2 between the two relational terms, as in the paper's
metric-learning runs; ``ce_weight = 0`` drops the label term, so unlabeled
data works).

General Instance Distillation (Dai et al., "General Instance Distillation for
Object Detection", CVPR 2021) adds instance selection: not every sample is
worth matching, the informative ones are where teacher and student disagree.
With ``gid_instances = K > 0`` each batch's relation losses are computed over
the ``K`` samples of largest *GI score*

    ``GI(n) = max_c |softmax(z_t(n))_c − softmax(z_s(n))_c|``

(the paper's classification score, ``z`` the models' outputs; its box term has
no classification analogue), so the relational structure is taught where the
student is still wrong.  ``gid_instances = 0``, the default, is plain RKD over
the whole batch.  ``student_layer`` / ``teacher_layer`` name the modules whose
outputs are the embeddings (``named_modules`` names, captured with
:mod:`sdk.features`; ``""``, the default, is the models' outputs); bad names
raise a :class:`~sdk.errors.ConfigError` listing the available ones.  Batches
need at least three samples.

>>> import torch
>>> from plugins.distill.relational import distance_loss
>>> e = torch.randn(6, 4)
>>> float(distance_loss(3 * e, e)) < 1e-12      # scaling the student changes nothing
True
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from sdk import hookimpl
from sdk.base import Distiller
from sdk.config import check_range
from sdk.errors import ConfigError, InputError
from sdk.features import capture, named_module
from sdk.trainer import TrainConfig, fit, split_batch

_EPS = 1e-12


def _flat(e: torch.Tensor) -> torch.Tensor:
    if e.dim() < 2 or e.shape[0] < 3:
        raise InputError(f"relational distillation needs embeddings of at least 3 samples, got shape "
                         f"{tuple(e.shape)}; use batches of 3 or more")
    return e.reshape(e.shape[0], -1)


def normalised_distances(e: torch.Tensor) -> torch.Tensor:
    """``(N, N)`` pairwise Euclidean distances divided by their mean over ``i ≠ j``."""
    e = _flat(e)
    diff = e.unsqueeze(1) - e.unsqueeze(0)
    # sqrt of a clamped square: the diagonal's zero distance would give a NaN gradient
    d = diff.pow(2).sum(-1).clamp_min(_EPS).sqrt()
    n = e.shape[0]
    off = ~torch.eye(n, dtype=torch.bool, device=e.device)
    return d / d[off].mean().clamp_min(_EPS)


def angle_cosines(e: torch.Tensor) -> torch.Tensor:
    """``(N, N, N)`` tensor whose ``[i, j, k]`` is the cosine of the angle at ``e_j`` between ``e_i`` and ``e_k``."""
    e = _flat(e)
    diff = e.unsqueeze(0) - e.unsqueeze(1)            # [j, i] = e_i − e_j
    unit = diff / diff.norm(dim=-1, keepdim=True).clamp_min(_EPS)
    cos_jik = torch.bmm(unit, unit.transpose(1, 2))   # [j, i, k]
    return cos_jik.permute(1, 0, 2)


def distance_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """RKD distance-wise loss: Huber between normalised distances, mean over pairs ``i ≠ j``."""
    ds, dt = normalised_distances(student), normalised_distances(teacher)
    off = ~torch.eye(ds.shape[0], dtype=torch.bool, device=ds.device)
    return F.smooth_l1_loss(ds[off], dt[off], beta=1.0)


def gi_scores(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """GID's general-instance score per sample: ``max_c |p_t − p_s|`` of the softmax outputs."""
    if student_logits.shape != teacher_logits.shape:
        raise InputError(f"GID instance selection compares the models' outputs, but the student's are "
                         f"{tuple(student_logits.shape)} and the teacher's {tuple(teacher_logits.shape)}; "
                         "use models with the same output shape, or gid_instances=0")
    p_s = student_logits.reshape(len(student_logits), -1).softmax(-1)
    p_t = teacher_logits.reshape(len(teacher_logits), -1).softmax(-1)
    return (p_t - p_s).abs().amax(-1)


def select_instances(student_logits: torch.Tensor, teacher_logits: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` samples with the largest GI score (all of them, in order, if ``k`` ≥ the batch)."""
    n = len(student_logits)
    if k >= n:
        return torch.arange(n, device=student_logits.device)
    return gi_scores(student_logits.detach(), teacher_logits.detach()).topk(k).indices


def angle_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """RKD angle-wise loss: Huber between triplet cosines, mean over distinct ``i, j, k``."""
    a_s, a_t = angle_cosines(student), angle_cosines(teacher)
    n = a_s.shape[0]
    # Degenerate triplets add nothing to the sum: with i = j or k = j both cosines are 0
    # (a zero vector), with i = k both are 1.  Summing the full cube and dividing by the
    # number of distinct triplets is the mean over distinct ones, without an N³ mask.
    return F.smooth_l1_loss(a_s, a_t, beta=1.0, reduction="sum") / (n * (n - 1) * (n - 2))


class Relational(Distiller):
    """Distance- and angle-wise relational distillation (RKD-DA), optionally with CE and GID instance selection."""

    name = "relational"
    version = "1.1"
    streams = ("train",)

    @dataclasses.dataclass(frozen=True)
    class Config(TrainConfig):
        """Loss weights and embedding layers; the training fields are :class:`TrainConfig`'s."""

        lambda_distance: float = 1.0
        lambda_angle: float = 2.0
        ce_weight: float = 1.0        # weight of CE on labels; 0 for unlabeled data
        student_layer: str = ""       # "" = the model's output
        teacher_layer: str = ""
        gid_instances: int = 0        # GID: relation losses over the K most-disputed samples (0 = all)

        def __post_init__(self):
            super().__post_init__()
            check_range("relational", "gid_instances", self.gid_instances, 0)
            if self.gid_instances in (1, 2):
                raise ConfigError(f"relational gid_instances={self.gid_instances}: the relation losses need "
                                  "at least 3 instances; use 0 (all samples) or 3 or more")
            check_range("relational", "lambda_distance", self.lambda_distance, 0.0)
            check_range("relational", "lambda_angle", self.lambda_angle, 0.0)
            check_range("relational", "ce_weight", self.ce_weight, 0.0)

    def loss(self, student: torch.Tensor, teacher: torch.Tensor, target: torch.Tensor | None = None,
             logits: torch.Tensor | None = None, teacher_logits: torch.Tensor | None = None) -> torch.Tensor:
        """The objective for one batch of student and teacher embeddings.

        The CE term uses ``logits`` (default: ``student``, right when the
        embeddings are the outputs) and ``target``; it is skipped when
        ``ce_weight`` is 0.  With ``gid_instances`` the relation terms cover the
        selected samples only, chosen from ``logits`` and ``teacher_logits``
        (default: the embeddings themselves).
        """
        cfg = self.config
        rel_s, rel_t = student, teacher
        if cfg.gid_instances:
            keep = select_instances(student if logits is None else logits,
                                    teacher if teacher_logits is None else teacher_logits, cfg.gid_instances)
            rel_s, rel_t = student[keep], teacher[keep]
        total = cfg.lambda_distance * distance_loss(rel_s, rel_t) + cfg.lambda_angle * angle_loss(rel_s, rel_t)
        if cfg.ce_weight > 0:
            if target is None:
                raise InputError("relational ce_weight > 0 needs labels: pass (x, y) batches, or set ce_weight=0")
            total = total + cfg.ce_weight * F.cross_entropy(student if logits is None else logits, target)
        return total

    def apply(self, student: torch.nn.Module, teacher, data) -> torch.nn.Module:
        if not isinstance(teacher, torch.nn.Module):
            raise InputError("relational needs a teacher model: sdk.compress(model, recipe, data=..., "
                             "teacher=big_model)")
        cfg = self.config
        named_module(teacher, cfg.teacher_layer, "teacher_layer")    # fail on bad names before any training
        named_module(student, cfg.student_layer, "student_layer")
        teacher.eval()

        def step(model, batch):
            x, y = split_batch(batch)
            with torch.no_grad():   # GID's selection needs the teacher's outputs, not only its embedding
                t_out, (t,) = capture(teacher, x, [cfg.teacher_layer], ["teacher_layer"],
                                      stop=not cfg.gid_instances)
            out, (s,) = capture(model, x, [cfg.student_layer], ["student_layer"])
            return self.loss(s, t, y, logits=out, teacher_logits=t_out)

        fit(student, data, step, cfg, desc="relational")
        return student


@hookimpl
def register_distillers(register):
    register(Relational)
