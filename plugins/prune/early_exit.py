"""``early-exit`` — exit heads after intermediate stages and a learned per-input policy that stops early.

Bolukbasi, Wang, Dekel & Saligrama, "Adaptive Neural Networks for Efficient Inference" (ICML
2017), section 4: a network evaluated stage by stage, with a classifier after each stage and a
policy ``γ_k`` that decides from that classifier's output whether the input leaves now or goes on;
the policies minimise ``E[loss] + λ · E[cost]``, trained greedily from the last exit back as
weighted binary classifications.  Easy inputs take the cheap path, hard ones the whole network.
It prunes computation per input rather than weights, so it is a pruner.

The stage returns an :class:`sdk.early_exit.EarlyExitCascade` (what :func:`sdk.deploy` packs as one
graph per stage, the policies inside the graphs; :mod:`sdk.early_exit_artifact` runs them):

1. ``exits`` names children of one ``nn.Sequential`` backbone (``[features.3, features.6]``); the
   network is cut after each (:func:`sdk.early_exit.split_backbone`, which refuses a model whose
   forward is not "that backbone first" with :class:`~sdk.errors.ConfigError`).
2. An exit head — average pooling to ``head_pool × head_pool`` and a linear layer — after each
   cut, trained with cross-entropy on ``train`` for ``epochs``, **backbone frozen**: the last stage
   is the network as given.
3. One policy per exit (``Σ p²/C`` and ``Σ p⁴/C`` of the head's softmax, a linear layer and a
   sigmoid; exit when the score reaches ``threshold``), fitted by weighted logistic regression with
   ridge ``policy_l2``, from the last exit back, on ``val`` when given (else ``train``):
   ``cost_weight`` is λ, the loss an input may trade for one original network's worth of MACs;
   ``loss`` is how an exit's prediction is scored (``zero-one`` as in the paper, or
   ``cross-entropy``).  :mod:`sdk.early_exit` writes the rule out.

The report (manifest ``stages``) holds each exit's head accuracy, share of inputs leaving, policy
weights, and the cascade's accuracy and mean MACs per input on the policy data against the original
network's.  Deploy to ``arm-int8`` or ``arm-fp32``; other targets are refused before training.

>>> from plugins.prune.early_exit import EarlyExitPruner
>>> EarlyExitPruner(exits=["features.3"], cost_weight=0.2).config.cost_weight
0.2
"""

from __future__ import annotations

import dataclasses

import torch

from sdk import hookimpl
from sdk.base import Pruner
from sdk.config import check_choice, check_range
from sdk.context import DataStreams, StageContext
from sdk.early_exit import LOSSES, POLICY_L2, TARGETS, build_cascade
from sdk.errors import ConfigError, InputError
from sdk.trainer import TrainConfig


class EarlyExitPruner(Pruner):
    """Early exit: exit heads after named backbone stages and learned per-input stop policies (cost weight λ)."""

    name = "early-exit"
    version = "1.0"
    streams = ("train",)

    @dataclasses.dataclass(frozen=True)
    class Config(TrainConfig):
        """Where the exits go and the accuracy/compute trade-off; the training fields are the exit
        heads' (``epochs``, ``lr``, ...)."""

        exits: tuple[str, ...] = ()        # module paths an exit follows: children of one nn.Sequential
        cost_weight: float = 0.5           # λ: loss per original network's worth of MACs (0: accuracy only)
        threshold: float = 0.5             # an input exits when its policy score reaches this
        head_pool: int = 1                 # exit heads pool to head_pool × head_pool (1: global average)
        loss: str = "zero-one"             # an exit's loss in the policies' problem: zero-one or cross-entropy
        policy_l2: float = POLICY_L2       # ridge on the policies' (standardised) weights
        epochs: int = 10
        lr: float = 3e-3

        def __post_init__(self):
            super().__post_init__()
            if isinstance(self.exits, str) or not all(isinstance(e, str) and e for e in self.exits):
                raise ConfigError(f"early-exit: exits must be a list of module paths (e.g. ['features.3', "
                                  f"'features.6']), got {self.exits!r}")
            object.__setattr__(self, "exits", tuple(self.exits))
            check_range("early-exit", "cost_weight", self.cost_weight, 0.0, 1e6)
            check_range("early-exit", "threshold", self.threshold, 0.0, 1.0, lo_open=True, hi_open=True)
            if isinstance(self.head_pool, bool) or not isinstance(self.head_pool, int):
                raise ConfigError(f"early-exit: head_pool must be an integer >= 1, got {self.head_pool!r}")
            check_range("early-exit", "head_pool", self.head_pool, 1)
            check_choice("early-exit", "loss", self.loss, LOSSES)
            check_range("early-exit", "policy_l2", self.policy_l2, 0.0, lo_open=True)

    def apply(self, model: torch.nn.Module, data=None) -> torch.nn.Module:
        return self.run(model, StageContext(DataStreams.of(data), original=model))

    def run(self, model: torch.nn.Module, ctx: StageContext) -> torch.nn.Module:
        cfg = self.config
        if not cfg.exits:
            raise ConfigError("early-exit: exits is empty; name the modules an exit head follows, children of one "
                              "nn.Sequential backbone, e.g. exits: [features.3, features.6]")
        if ctx.target is not None and ctx.target.name not in TARGETS:
            raise ConfigError(f"early-exit: target {ctx.target.name!r} cannot ship a cascade; early exits deploy to "
                              f"{', '.join(TARGETS)}")
        train = ctx.stream("train", who="early-exit (its exit heads)")
        val = ctx.data.get("val")
        val = list(val) if val is not None else None
        if val is not None and not val:
            raise InputError("early-exit: the val stream is empty; pass batches, or leave it out to fit the "
                             "policies on train")
        policy_data = val if val is not None else train
        cascade, report = build_cascade(model, cfg.exits, train, policy_data, cost_weight=cfg.cost_weight,
                                        threshold=cfg.threshold, head_pool=cfg.head_pool, loss=cfg.loss,
                                        l2=cfg.policy_l2, train_config=cfg.training())
        report["policy_data"]["stream"] = "val" if val is not None else "train"
        ctx.report(**report)
        return cascade


@hookimpl
def register_pruners(register):
    register(EarlyExitPruner)
