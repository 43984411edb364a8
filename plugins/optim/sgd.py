"""``sgd``: stochastic gradient descent with (Nesterov) momentum (``torch.optim.SGD``).

>>> import torch
>>> opt = SGD(momentum=0.5).build([{"params": [torch.nn.Parameter(torch.ones(1))], "lr": 0.1}])
>>> type(opt).__name__, opt.param_groups[0]["lr"], opt.param_groups[0]["momentum"]
('SGD', 0.1, 0.5)
"""

from __future__ import annotations

import dataclasses

import torch

from sdk import hookimpl
from sdk.base import Optimizer
from sdk.config import Config, check_range


class SGD(Optimizer):
    """SGD with momentum; ``lr`` comes from the training stage."""

    name = "sgd"
    version = "1.0"

    @dataclasses.dataclass(frozen=True)
    class Config(Config):
        momentum: float = 0.9
        nesterov: bool = False
        weight_decay: float = 0.0

        def __post_init__(self):
            check_range("sgd", "momentum", self.momentum, 0.0, 1.0, hi_open=True)
            check_range("sgd", "weight_decay", self.weight_decay, 0.0)

    def build(self, params):
        cfg = self.config
        return torch.optim.SGD(params, lr=1e-3, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0,
                               weight_decay=cfg.weight_decay)


@hookimpl
def register_optimizers(register):
    register(SGD)
