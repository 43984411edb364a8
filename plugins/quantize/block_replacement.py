"""``block-replacement`` — QAT guided by the full-precision partner: quantized blocks swapped into it.

Yu, Yang, Zhang, Ma, Wang and Li, "Improving Quantization-aware Training of
Low-Precision Network via Block Replacement on Full-Precision Counterpart"
(arXiv:2412.15846, 2024).  The low-precision (LP) network Q and a fixed
full-precision (FP) partner F are cut into the same N blocks,
``Q = Q_N ∘ … ∘ Q_1`` and ``F = F_N ∘ … ∘ F_1``.  Alongside the LP backbone,
block-by-block replacement of F's blocks by Q's makes N − 1 mixed-precision
models::

    M_i = F_N ∘ … ∘ F_{i+1} ∘ Q_i ∘ … ∘ Q_1          i = 1 … N − 1

which run in the same training step as Q (they continue from the LP
backbone's own value after block i: one LP forward pass serves them all).
Through M_i the quantized blocks 1…i must produce what the FP blocks after
them expect (the forward pass simulates the FP representation) and they get a
gradient that went back through exact FP blocks instead of the
straight-through estimators of the quantized ones.  The paper's joint
objective combines the task loss with distillation from the FP partner; here
every output, LP and mixed-precision alike, gets the same term and the
mixed-precision ones a common weight (:func:`replacement_loss`); per batch
``(x, y)``::

    L = ℓ(Q(x)) + λ · Σ_{i=1}^{N−1} ℓ(M_i(x)),
    ℓ(z) = CE(z, y) + α · T² · KL(softmax(F(x)/T) ‖ softmax(z/T))

(``mixed_weight`` λ, ``kd_weight`` α, ``temperature`` T; with λ = α = 0 this is
plain ``qat``).  F is the model as the stage receives it, copied and frozen
(eval mode: BN running statistics); only Q trains, and after training only Q
remains.

The LP backbone is ``qat``'s (:mod:`sdk.fakequant`): BatchNorm folded into
the layers, per-channel narrow int8 weights, asymmetric int8 activations on
EMA ranges, straight-through gradients (``freeze_bn_after``, ``ema_decay``); it
is baked the same way, so the model deploys to ``arm-int8`` with the learned
ranges as output hints (no recalibration of those values) and
:func:`sdk.fakequant.simulate` is its integer simulation.

**Blocks** (:class:`Blocks`) are read from the model's ``torch.fx`` graph:
``blocks`` names, in forward order, the modules each of which ends a block
(a block holds the graph nodes after the previous block's end up to the last
call of a module at or under that name; the nodes after the last name join
the last block).  By default they are the model's top-level children that hold
a Conv/Linear (descending into a sole such child, e.g. ``features``).  A block
always extends to the BatchNorm and activation fused into its last layer: the
integer graph has no value between them, so neither has the LP backbone.
A step runs the LP backbone once and the FP partner's blocks after each cut
(``(N + 1) / 2`` FP passes in all): coarse blocks keep deep networks affordable.

>>> import torch
>>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 8), torch.nn.ReLU(),
...                           torch.nn.Linear(8, 3))
>>> Blocks(net).names
[['0', '1'], ['2', '3'], ['4']]
>>> data = [(torch.randn(16, 4), torch.randint(0, 3, (16,))) for _ in range(4)]
>>> net = BlockReplacement(epochs=1, progress=False).apply(net, data)
>>> s = net[2].weight.detach().abs().amax(1, keepdim=True) / 127
>>> codes = net[2].weight.detach() / s       # integers, up to float rounding
>>> bool((codes - codes.round()).abs().max() < 1e-4)
True
"""

from __future__ import annotations

import bisect
import copy
import dataclasses
import functools
from typing import Any, Iterable, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import fx, nn

from sdk import hookimpl
from sdk.config import check_range
from sdk.errors import ConfigError, InputError
from sdk.fakequant import FakeQuantConfig, FakeQuantized, fold_plan
from sdk.layer_quant import LAYER_TYPES, LayerQuantizer
from sdk.losses import soft_target_kl
from sdk.torch_fold import trace
from sdk.trainer import fit, split_batch

METHOD = "block-replacement"


def replacement_loss(lp: torch.Tensor, mixed: Sequence[torch.Tensor], fp: torch.Tensor, y: torch.Tensor, *,
                     mixed_weight: float = 1.0, kd_weight: float = 1.0, temperature: float = 1.0) -> torch.Tensor:
    """``ℓ(lp) + mixed_weight · Σ_i ℓ(mixed_i)`` with
    ``ℓ(z) = CE(z, y) + kd_weight · T² · KL(softmax(fp/T) ‖ softmax(z/T))`` (batch means; ``fp``,
    the FP partner's logits, is a target: pass it detached).

    >>> z = torch.zeros(2, 3)
    >>> round(float(replacement_loss(z, [z, z], z, torch.tensor([0, 1]))), 4)   # 3 · ln 3, the KLs 0
    3.2958
    """
    def term(z: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(z, y) + kd_weight * soft_target_kl(z, fp, temperature)

    loss = term(lp)
    for z in mixed:
        loss = loss + mixed_weight * term(z)
    return loss


class Outputs(NamedTuple):
    """One forward pass of :meth:`Blocks.run`: the LP backbone's output, the mixed-precision
    models' ``[M_1, …, M_{N−1}]`` and the FP partner's (no gradient)."""

    lp: Any
    mixed: list
    fp: Any


def _auto_blocks(model: nn.Module) -> list[str]:
    """The top-level children holding a Conv/Linear (within a sole such child, its children)."""
    prefix, root = "", model
    while True:
        holders = [n for n, c in root.named_children() if any(isinstance(m, LAYER_TYPES) for m in c.modules())]
        if len(holders) != 1 or not list(root.get_submodule(holders[0]).children()):
            return [prefix + n for n in holders]
        prefix, root = f"{prefix}{holders[0]}.", root.get_submodule(holders[0])


def _attr(root: nn.Module, target: str) -> Any:
    return functools.reduce(getattr, target.split("."), root)


class Blocks:
    """A float model's ``torch.fx`` graph cut into N blocks (``names``: the modules that end
    them, see the module; empty: the default) and the forward pass of the LP backbone, its
    mixed-precision models and the FP partner over it (:meth:`run`).  ``names`` (the
    attribute) lists the modules each block calls, in graph order.  Raises
    :class:`ConfigError` for a name the forward pass does not call, names out of forward order
    or fewer than two blocks; :class:`InputError` for a model of more than one input.

    >>> net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(144, 2))
    >>> Blocks(net, ["0", "4"]).names              # the block of conv 0 ends after its BN and ReLU
    [['0', '1', '2'], ['3', '4']]
    """

    def __init__(self, model: nn.Module, names: Sequence[str] = ()):
        gm = trace(model)
        nodes = list(gm.graph.nodes)
        inputs = [n for n in nodes if n.op == "placeholder"]
        if len(inputs) != 1:
            raise InputError(f"{METHOD} runs models of one input; {type(model).__name__}.forward takes "
                             f"{len(inputs)}")
        self.input = inputs[0]
        self.output = next(n for n in nodes if n.op == "output")
        self.body = [n for n in nodes if n.op not in ("placeholder", "output")]
        called = [n.target if n.op == "call_module" else None for n in self.body]
        unit_end = fold_plan(gm).unit_end
        given = bool(names)
        names = list(names) if given else _auto_blocks(model)
        ends = []
        for name in names:
            at = [k for k, t in enumerate(called) if t is not None and (t == name or t.startswith(name + "."))]
            if not at:
                valid = sorted({t.split(".")[0] for t in called if t is not None})
                raise ConfigError(f"{METHOD}: blocks names {name!r}, which the model's forward pass does not "
                                  f"call; valid: modules it calls, e.g. its children {', '.join(valid)}")
            last = called[at[-1]]
            ends.append(max(at[-1], called.index(unit_end[last])) if last in unit_end else at[-1])
        if not given:
            ends = sorted(set(ends))
        for k in range(1, len(ends)):
            if ends[k] <= ends[k - 1]:
                raise ConfigError(f"{METHOD}: blocks must name modules in forward order, each ending a block "
                                  f"after the one before; {names[k]!r} ends where or before {names[k - 1]!r} "
                                  "does (a block extends to its last layer's BN and activation)")
        if len(ends) < 2:
            raise ConfigError(f"{METHOD}: needs at least two blocks to swap, got {len(ends)} "
                              f"({', '.join(map(repr, names)) or 'no Conv/Linear'}); name them with blocks=[...]")
        # node k belongs to the first block ending at or after it; the nodes after the last end join the last
        last = len(ends) - 1
        self.block_of = {node: min(bisect.bisect_left(ends, k), last) for k, node in enumerate(self.body)}
        self.count = len(ends)
        self.names = [[n.target for n in self.body if n.op == "call_module" and self.block_of[n] == b]
                      for b in range(self.count)]
        self._after = [[n for n in self.body if self.block_of[n] > i] for i in range(self.count - 1)]

    def _eval(self, node: fx.Node, env: dict, root: nn.Module) -> Any:
        args = fx.node.map_arg(node.args, env.__getitem__)
        kwargs = fx.node.map_arg(node.kwargs, env.__getitem__)
        if node.op == "call_module":
            return root.get_submodule(node.target)(*args, **kwargs)
        if node.op == "call_function":
            return node.target(*args, **kwargs)
        if node.op == "call_method":
            return getattr(args[0], node.target)(*args[1:], **kwargs)
        return _attr(root, node.target)             # get_attr

    def _result(self, env: dict) -> Any:
        return fx.node.map_arg(self.output.args[0], env.__getitem__)

    def run(self, x: torch.Tensor, lp: FakeQuantized, partner: nn.Module) -> Outputs:
        """The LP backbone ``lp.model`` on ``x`` (its input quantized as its own forward pass would),
        every mixed-precision model ``M_i`` continuing from the LP values of blocks ``1…i`` through
        ``partner``'s modules, and ``partner`` on ``x`` without gradient."""
        env = {self.input: lp.quantize_input(x)}
        for node in self.body:
            env[node] = self._eval(node, env, lp.model)
        with torch.no_grad():
            ref = {self.input: x}
            for node in self.body:
                ref[node] = self._eval(node, ref, partner)
        mixed = []
        for i, after in enumerate(self._after):
            mix = {self.input: env[self.input], **{n: env[n] for n in self.body if self.block_of[n] <= i}}
            for node in after:
                mix[node] = self._eval(node, mix, partner)
            mixed.append(self._result(mix))
        return Outputs(self._result(env), mixed, self._result(ref))


class BlockReplacement(LayerQuantizer):
    """Block-replacement QAT (Yu et al. 2024): int8 blocks trained inside the frozen FP partner, distilled from it."""

    name = METHOD
    version = "1.0"
    needs_training = True
    streams = ("train",)

    @dataclasses.dataclass(frozen=True)
    class Config(FakeQuantConfig):
        blocks: tuple[str, ...] = ()      # modules that end the blocks, in forward order (empty: top-level children)
        mixed_weight: float = 1.0         # λ: weight of each mixed-precision model's loss
        kd_weight: float = 1.0            # α: weight of the KL from the FP partner's output in each loss
        temperature: float = 1.0          # T of that KL

        def __post_init__(self):
            super().__post_init__()
            if not isinstance(self.blocks, tuple) or not all(isinstance(b, str) and b for b in self.blocks):
                raise ConfigError(f"{self.type_tag}: blocks must be module names, got {self.blocks!r}")
            check_range(self.type_tag, "mixed_weight", self.mixed_weight, 0.0)
            check_range(self.type_tag, "kd_weight", self.kd_weight, 0.0)
            check_range(self.type_tag, "temperature", self.temperature, 0.0, lo_open=True)

    def apply(self, model: nn.Module, data: Iterable | None = None) -> nn.Module:
        """Fake-quantize ``model`` in place and train it with its FP partner (a frozen copy of
        ``model`` as given), then bake it like ``qat`` (see the module); eval mode."""
        cfg = self.config
        if not isinstance(model, nn.Module):
            raise InputError(f"{self.name} quantizes a torch.nn.Module, got {type(model).__name__}")
        if data is None:
            raise InputError(f"{self.name} trains: pass data= (a list of (x, y) batches or a DataLoader)")
        partner = copy.deepcopy(model).eval().requires_grad_(False)
        blocks = Blocks(partner, cfg.blocks)           # checked before the model is rewritten
        fq = FakeQuantized(model, cfg, self.name)

        def step(net: nn.Module, batch: Any) -> torch.Tensor:
            x, y = split_batch(batch)
            if y is None:
                raise InputError(f"{self.name} training needs labelled data: pass (x, y) batches as data=")
            out = blocks.run(x, fq, partner)
            return replacement_loss(out.lp, out.mixed, out.fp, y, mixed_weight=cfg.mixed_weight,
                                    kd_weight=cfg.kd_weight, temperature=cfg.temperature)

        try:
            fit(model, data, step, cfg.training(), after_step=fq.after_step, desc=self.name)
        finally:
            fq.remove_hooks()
        return fq.bake()


@hookimpl
def register_quantizers(register):
    register(BlockReplacement)
