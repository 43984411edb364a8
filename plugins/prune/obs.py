"""``obs`` — Optimal Brain Surgeon with an empirical-Fisher inverse Hessian, one-shot.

Hassibi & Stork, "Second order derivatives for network pruning: Optimal Brain
Surgeon", NIPS 1993; the Hessian as the empirical Fisher of per-sample
gradients, as in WoodFisher (Singh & Alistarh 2020) and OBC (Frantar &
Alistarh 2022).  Weight ``q`` is removed where the second-order loss increase

    L_q = w_q² / (2 [H⁻¹]_qq)

is smallest, and the remaining weights move by ``δw = −(w_q/[H⁻¹]_qq) H⁻¹ e_q``
to absorb the loss (magnitude pruning only zeroes).  As implemented
(:mod:`sdk.hessian`):

* ``H`` is block-diagonal, **one block per output row** of each layer (a
  ``Linear`` output's input weights, a conv filter); the empirical Fisher of the
  cross-entropy over the first ``samples`` training samples, dampened by
  ``dampening · mean(diag F)`` per row, inverted in float64;
* pruning is **iterative**, one weight per row at a time, each step followed by the
  OBS update and the rank-one downdate of the row's ``H⁻¹``;
* each layer loses exactly ``round(sparsity · numel)`` weights, spread over its
  rows by the estimated loss of every step (each row's path is computed in full
  first; :func:`sdk.hessian.allocate`), then the rows are pruned again to their
  counts.

The zeros are enforced by masks (:mod:`sdk.masks`) so later fine-tuning keeps
them; weights already masked by an earlier stage are zero, cost nothing, and go
first.  ``history`` holds each layer's estimated loss increase ``Σ L_q``.

>>> import torch
>>> from plugins.prune.obs import OBSPruner
>>> net = torch.nn.Sequential(torch.nn.Linear(4, 3))
>>> data = [(torch.randn(16, 4), torch.randint(0, 3, (16,)))]
>>> int((OBSPruner(sparsity=0.5).apply(net, data)[0].weight == 0).sum())
6
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch.nn.utils import parametrize

from sdk import hookimpl
from sdk.base import Pruner
from sdk.config import Config, check_range
from sdk.errors import InputError
from sdk.hessian import allocate, dampened_inverse, fisher_rows, obs_prune
from sdk.masks import apply_mask, prunable_layers


class OBSPruner(Pruner):
    """One-shot Optimal Brain Surgeon to an exact per-layer sparsity."""

    name = "obs"
    version = "1.0"
    streams = ("train",)     # per-sample gradients of the labelled training data

    @dataclasses.dataclass(frozen=True)
    class Config(Config):
        sparsity: float = 0.5
        dampening: float = 1e-2                  # λ, relative to each row's mean Fisher diagonal
        samples: int = 1024                      # training samples in the empirical Fisher
        chunk: int = 64                          # samples per vmap call (memory)
        layer_types: tuple[str, ...] = ("Conv1d", "Conv2d", "Linear")
        exclude: tuple[str, ...] = ()           # module names left dense

        def __post_init__(self):
            check_range("obs", "sparsity", self.sparsity, 0.0, 1.0, hi_open=True)
            check_range("obs", "dampening", self.dampening, 0.0, lo_open=True)
            check_range("obs", "samples", self.samples, 1)
            check_range("obs", "chunk", self.chunk, 1)

    def __init__(self, config: Any = None, **options: Any) -> None:
        super().__init__(config, **options)
        self.history: dict[str, float] = {}     # layer -> estimated loss increase Σ L_q

    def apply(self, model: torch.nn.Module, data=None) -> torch.nn.Module:
        cfg = self.config
        if data is None:
            raise InputError("obs estimates the Hessian from per-sample gradients: pass labelled (x, y) "
                             "batches as data=")
        layers = prunable_layers(model, cfg.layer_types, cfg.exclude)
        fisher = fisher_rows(model, layers, data, samples=cfg.samples, chunk=cfg.chunk)
        self.history = {}
        for name, mod in layers:
            w = mod.weight.detach()
            rows = w.reshape(w.shape[0], -1)
            hinv = dampened_inverse(fisher[name], cfg.dampening)
            _, _, losses = obs_prune(rows, hinv, torch.full((rows.shape[0],), rows.shape[1]))
            counts = allocate(losses, int(round(cfg.sparsity * w.numel())))
            new, keep, step_losses = obs_prune(rows, hinv, counts)
            self.history[name] = float(step_losses[torch.isfinite(step_losses)].sum())
            with torch.no_grad():
                dense = mod.parametrizations.weight.original if parametrize.is_parametrized(mod, "weight") \
                    else mod.weight
                dense.copy_(new.reshape(w.shape))
            apply_mask(mod, keep.reshape(w.shape))
        return model


@hookimpl
def register_pruners(register):
    register(OBSPruner)
