"""Pruning masks kept through training, then baked into the weights.

A mask is a ``torch.nn.utils.parametrize`` parametrization of ``weight``: the
module computes ``weight = original * mask`` on every forward, so gradients of
pruned entries are zero and fine-tuning keeps the sparsity.  ``torch.export``
folds the product into a constant.  :func:`bake` removes the parametrization,
leaving a plain (sparse) weight; the layer keeps a sparsity hint
(:func:`sdk.encoding.annotate`) so the plan can tell targets which zeros to exploit.
"""

from __future__ import annotations

import torch
from torch.nn.utils import parametrize


class _Mask(torch.nn.Module):
    def __init__(self, mask: torch.Tensor):
        super().__init__()
        self.register_buffer("mask", mask.detach().clone())

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w * self.mask


def prunable_layers(model: torch.nn.Module, layer_types=("Conv1d", "Conv2d", "Linear"),
                    exclude=()) -> list[tuple[str, torch.nn.Module]]:
    """``(name, module)`` of the layers whose class name is in ``layer_types`` (masked layers
    included: parametrize renames their class ``Parametrized<Class>``)."""
    return [(n, m) for n, m in model.named_modules()
            if parametrize.type_before_parametrizations(m).__name__ in layer_types and n not in exclude
            and getattr(m, "weight", None) is not None]


def smallest_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Float mask with exactly ``round(sparsity·n)`` zeros at the smallest scores.

    A stable sort breaks ties by position, so the count is exact even when many
    scores are equal.
    """
    k = int(round(sparsity * scores.numel()))
    mask = torch.ones_like(scores)
    if k:
        mask[torch.sort(scores, stable=True).indices[:k]] = 0.0
    return mask


def apply_mask(module: torch.nn.Module, mask: torch.Tensor, name: str = "weight", *,
               pattern: str = "unstructured", block: tuple[int, int] | None = None) -> None:
    """Multiply ``module.<name>`` by ``mask`` from now on (combined with an existing mask) and
    hint the sparsity ``pattern`` (``block``: zero tiles of (rows, cols)) to the plan."""
    from .encoding import Hint, Sparsity, annotate

    annotate(module, Hint(sparsity=Sparsity(pattern, tuple(block) if block else None), source="mask"), name)
    mask = mask.to(getattr(module, name).dtype)
    if parametrize.is_parametrized(module, name):
        for p in module.parametrizations[name]:
            if isinstance(p, _Mask):
                p.mask.mul_(mask)
                return
    parametrize.register_parametrization(module, name, _Mask(mask))


def mask_of(module: torch.nn.Module, name: str = "weight") -> torch.Tensor | None:
    if parametrize.is_parametrized(module, name):
        for p in module.parametrizations[name]:
            if isinstance(p, _Mask):
                return p.mask
    return None


def bake(model: torch.nn.Module) -> torch.nn.Module:
    """Replace every mask parametrization by its masked weight (in place)."""
    for mod in list(model.modules()):
        if parametrize.is_parametrized(mod):
            cls = type(mod)   # deep copies share this class and removing edits it: take a private one
            mod.__class__ = type(cls.__name__, cls.__bases__, dict(cls.__dict__))
            for name in list(mod.parametrizations.keys()):
                parametrize.remove_parametrizations(mod, name, leave_parametrized=True)
    return model


def sparsity(model: torch.nn.Module, layer_types=("Conv1d", "Conv2d", "Linear")) -> float:
    """Fraction of zero weights over the prunable layers."""
    layers = prunable_layers(model, layer_types)
    zeros = sum(int((m.weight == 0).sum()) for _, m in layers)
    total = sum(m.weight.numel() for _, m in layers)
    return zeros / total if total else 0.0


def smallest_masks(scores: list[torch.Tensor], sparsity: float) -> list[torch.Tensor]:
    """:func:`smallest_mask` over several tensors ranked together (a global threshold): exactly
    ``round(sparsity·N)`` zeros in all, ``N`` their total size; one mask per tensor, in its shape.

    >>> [m.tolist() for m in smallest_masks([torch.tensor([3.0, 1.0]), torch.tensor([2.0, 0.5])], 0.5)]
    [[1.0, 0.0], [1.0, 0.0]]
    """
    flat = smallest_mask(torch.cat([s.reshape(-1) for s in scores]), sparsity)
    return [m.reshape(s.shape) for m, s in zip(torch.split(flat, [s.numel() for s in scores]), scores)]
