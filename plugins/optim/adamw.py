"""``adamw``: Adam with decoupled weight decay (Loshchilov & Hutter, 2019; ``torch.optim.AdamW``).

>>> import torch
>>> opt = AdamW().build([{"params": [torch.nn.Parameter(torch.ones(1))], "lr": 0.01}])
>>> type(opt).__name__, opt.param_groups[0]["weight_decay"]
('AdamW', 0.0)
"""

from __future__ import annotations

import dataclasses

import torch

from sdk import hookimpl
from sdk.base import Optimizer
from sdk.config import Config, check_betas, check_range


class AdamW(Optimizer):
    """AdamW; ``lr`` comes from the training stage."""

    name = "adamw"
    version = "1.0"

    @dataclasses.dataclass(frozen=True)
    class Config(Config):
        betas: tuple[float, float] = (0.9, 0.999)
        eps: float = 1e-8
        weight_decay: float = 0.0      # edgepack's training stages used 0 before optimizers were plugins

        def __post_init__(self):
            check_betas("adamw", self.betas)
            check_range("adamw", "eps", self.eps, 0.0, lo_open=True)
            check_range("adamw", "weight_decay", self.weight_decay, 0.0)

    def build(self, params):
        cfg = self.config
        return torch.optim.AdamW(params, lr=1e-3, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay)


@hookimpl
def register_optimizers(register):
    register(AdamW)
