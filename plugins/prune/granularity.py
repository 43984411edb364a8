"""``granularity`` — prune whole groups of weights: fine, vector, kernel or filter.

Mao, Han, Pool, Li, Liu, Wang & Dally, "Exploring the Regularity of Sparse
Structure in Convolutional Neural Networks", CVPR Workshops 2017.  The paper
compares pruning at four granularities of a conv weight ``W[o, i, h, w]``:

===========  ======================================  =========================
granularity  one group is                            groups per layer
===========  ======================================  =========================
``fine``     one weight ``W[o, i, h, w]``            ``O·I·H·W``
``vector``   one kernel row ``W[o, i, h, :]``        ``O·I·H`` (``width``)
             (or column ``W[o, i, :, w]``)           ``O·I·W`` (``height``)
``kernel``   one k×k kernel ``W[o, i, :, :]``        ``O·I``
``filter``   one output filter ``W[o, :, :, :]``     ``O``
===========  ======================================  =========================

and finds that coarser (more regular) sparsity costs little accuracy at the
same density while being far cheaper to index and to exploit in hardware.

Each group is scored by its norm, ``Σ|w|`` (``norm="l1"``) or ``√Σw²``
(``"l2"``), and in every layer exactly ``round(sparsity · groups)`` groups with
the smallest scores are zeroed (ties broken by position).  The zeros are a mask
(:mod:`sdk.masks`), so a later training stage keeps them.  Linear layers, if
listed in ``layer_types``, are treated as 1×1 convolutions and Conv1d kernels
as 1×k ones; by default only convolutions are pruned, because filter pruning
of the classifier would delete output classes.  The paper retrains after
pruning: follow this stage with a training stage (``kd``, ``qat``...).

Each pruned layer carries the sparsity pattern for the plan
(:class:`sdk.encoding.Sparsity`, on the ``[out, in·k]`` matrix of the weight):
``fine`` is ``unstructured``; a group that is a contiguous run of ``n``
weights of one row — a row ``W[o, i, h, :]``, a kernel, a filter — is
``block`` with ``block=(1, n)`` (aligned ``1×n`` tiles of zeros); a kernel
column ``W[o, i, :, w]`` (``vector`` with ``vector_axis="height"``, kernels
wider than 1) is strided in that matrix and is ``kernel-column`` with the
column's ``block=(H, 1)`` inside the kernel.  (:func:`group_pattern`.)

>>> import torch
>>> from plugins.prune.granularity import GranularityPruner
>>> conv = GranularityPruner(granularity="kernel", sparsity=0.25).apply(torch.nn.Conv2d(4, 8, 3))
>>> int((conv.weight.abs().sum((2, 3)) == 0).sum())        # 8 of the 32 kernels
8
"""

from __future__ import annotations

import dataclasses

import torch

from sdk import hookimpl
from sdk.base import Pruner
from sdk.config import Config, check_choice, check_range
from sdk.errors import ConfigError
from sdk.masks import apply_mask, prunable_layers, smallest_mask

#: dims of the (O, I, H, W) view of a weight that one group spans
GROUP_DIMS: dict[str, tuple[int, ...]] = {
    "fine": (),
    "vector-width": (3,),
    "vector-height": (2,),
    "kernel": (2, 3),
    "filter": (1, 2, 3),
}


class GranularityPruner(Pruner):
    """Group pruning at a chosen granularity to an exact fraction of groups per layer (Mao et al. 2017)."""

    name = "granularity"
    version = "1.0"

    @dataclasses.dataclass(frozen=True)
    class Config(Config):
        granularity: str = "kernel"               # fine, vector, kernel, filter
        sparsity: float = 0.5                     # fraction of groups removed per layer
        norm: str = "l1"                          # group score: l1 or l2
        vector_axis: str = "width"                # vector groups run along kernel width or height
        layer_types: tuple[str, ...] = ("Conv1d", "Conv2d")
        exclude: tuple[str, ...] = ()             # module names left dense

        def __post_init__(self):
            check_choice("granularity", "granularity", self.granularity, ("fine", "vector", "kernel", "filter"))
            check_range("granularity", "sparsity", self.sparsity, 0.0, 1.0, hi_open=True)
            check_choice("granularity", "norm", self.norm, ("l1", "l2"))
            check_choice("granularity", "vector_axis", self.vector_axis, ("width", "height"))

    def apply(self, model: torch.nn.Module, data=None) -> torch.nn.Module:
        cfg = self.config
        key = f"vector-{cfg.vector_axis}" if cfg.granularity == "vector" else cfg.granularity
        for name, mod in prunable_layers(model, cfg.layer_types, cfg.exclude):
            pattern, block = group_pattern(as_4d(mod.weight, name).shape, GROUP_DIMS[key])
            apply_mask(mod, group_mask(mod.weight, GROUP_DIMS[key], cfg.sparsity, cfg.norm, layer=name),
                       pattern=pattern, block=block)
        return model


def as_4d(weight: torch.Tensor, layer: str = "") -> torch.Tensor:
    """``weight`` viewed as (O, I, H, W): Linear → (O, I, 1, 1), Conv1d → (O, I, 1, K)."""
    if weight.dim() == 2:
        return weight[:, :, None, None]
    if weight.dim() == 3:
        return weight[:, :, None, :]
    if weight.dim() == 4:
        return weight
    raise ConfigError(f"granularity: layer {layer!r} has a {weight.dim()}-D weight; only Linear, Conv1d and "
                      "Conv2d are supported: drop it from layer_types or name it in exclude")


def group_pattern(shape: tuple[int, ...], dims: tuple[int, ...]) -> tuple[str, tuple[int, int] | None]:
    """The :class:`sdk.encoding.Sparsity` ``(pattern, block)`` of groups spanning ``dims`` of an
    (O, I, H, W) weight of ``shape``, seen as its ``[O, I·H·W]`` matrix (see the module docstring).

    >>> group_pattern((8, 4, 3, 3), GROUP_DIMS["kernel"]), group_pattern((8, 4, 3, 3), GROUP_DIMS["fine"])
    (('block', (1, 9)), ('unstructured', None))
    >>> group_pattern((8, 4, 3, 3), GROUP_DIMS["vector-height"])
    ('kernel-column', (3, 1))
    """
    n = 1
    for d in dims:
        n *= shape[d]
    if n == 1:                      # fine, or a 1-wide group (Linear, Conv1d kernels): single weights
        return "unstructured", None
    # contiguous in a row when every dim after the first spanned one is spanned too (or has size 1)
    if all(d in dims or shape[d] == 1 for d in range(min(dims), 4)):
        return "block", (1, n)
    return "kernel-column", (n, 1)


def group_scores(weight: torch.Tensor, dims: tuple[int, ...], norm: str = "l1") -> torch.Tensor:
    """Norm of every group of the (O, I, H, W) view; the spanned ``dims`` are kept with size 1."""
    w = as_4d(weight.detach())
    if not dims:
        return w.abs()
    if norm == "l1":
        return w.abs().sum(dims, keepdim=True)
    return w.pow(2).sum(dims, keepdim=True).sqrt()


def group_mask(weight: torch.Tensor, dims: tuple[int, ...], sparsity: float, norm: str = "l1",
               layer: str = "") -> torch.Tensor:
    """Float mask shaped like ``weight`` that zeroes the ``round(sparsity · groups)`` smallest-norm groups.

    >>> m = group_mask(torch.tensor([[1.0, 2.0], [0.1, 0.1]]), GROUP_DIMS["filter"], 0.5)
    >>> m.tolist()
    [[1.0, 1.0], [0.0, 0.0]]
    """
    w4 = as_4d(weight, layer)
    scores = group_scores(weight, dims, norm)
    keep = smallest_mask(scores.reshape(-1), sparsity).reshape(scores.shape)
    return keep.expand_as(w4).reshape(weight.shape).clone()


@hookimpl
def register_pruners(register):
    register(GranularityPruner)
