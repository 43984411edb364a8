"""edgepack-example: a complete third-party plugin in one module.

Install it (``pip install examples/plugin_example``) and edgepack finds it
through the ``edgepack`` entry point in its pyproject.toml:

    $ edgepack plugins | grep example
    random     pruner  0.1.0  edgepack_example
    torch-ir   target  0.1.0  edgepack_example

``random`` prunes weights at random (the baseline magnitude pruning is judged
against); ``torch-ir`` packs edgepack's canonical graph as JSON + npz and runs
it with torch (a portable float artifact for debugging lowering problems);
``lion`` is the Lion optimizer (Chen et al., "Symbolic Discovery of
Optimization Algorithms", 2023) that any training stage can name::

    stages:
      - method: kd
        config: {optimizer: lion, optimizer_options: {betas: [0.9, 0.99]}, lr: 1.0e-4}
"""

import dataclasses
import io
import json

import numpy as np
import torch

from sdk import Config, Optimizer, Package, Pruner, Runner, Target, TensorSig, UnsupportedOpError, hookimpl
from sdk.config import check_betas, check_range
from sdk.encoding import Carries
from sdk.graph import CANONICAL_OPS, Graph
from sdk.masks import apply_mask, prunable_layers


class RandomPruner(Pruner):
    """Zero a random ``sparsity`` fraction of every Conv/Linear weight (exact count)."""

    name, version = "random", "0.1.0"

    @dataclasses.dataclass(frozen=True)
    class Config(Config):
        sparsity: float = 0.5
        seed: int = 0

        def __post_init__(self):
            check_range("random", "sparsity", self.sparsity, 0.0, 1.0, hi_open=True)

    def apply(self, model, data=None):
        gen = torch.Generator().manual_seed(self.config.seed)
        for _, layer in prunable_layers(model):
            n = layer.weight.numel()
            mask = torch.ones(n)
            mask[torch.randperm(n, generator=gen)[: round(self.config.sparsity * n)]] = 0.0
            apply_mask(layer, mask.reshape(layer.weight.shape))
        return model


class TorchIRTarget(Target):
    """Float graph as ``graph.json`` + ``weights.npz``, executed by torch."""

    name, version = "torch-ir", "0.1.0"
    carries = (Carries("float32"),)         # the graph's float32 constants, as they are

    @dataclasses.dataclass(frozen=True)
    class Config(Config):
        pass

    def check(self, graph):
        for node in graph.nodes:
            if node.op not in CANONICAL_OPS:
                raise UnsupportedOpError(node.op, node.name, self.name, "use ops from sdk.graph.CANONICAL_OPS")

    def pack(self, graph, plan, calibration=None):
        buf = io.BytesIO()
        np.savez(buf, **graph.constants)
        return Package(
            files={"graph.json": json.dumps(graph.to_dict()).encode(), "weights.npz": buf.getvalue()},
            inputs=[TensorSig(n, s, d) for n, s, d in graph.inputs],
            outputs=[TensorSig(o, graph.shape(o), "float32") for o in graph.outputs],
            layers=[{"name": n.name, "op": n.op, "out_shape": list(n.shape)} for n in graph.nodes],
        )

    def verify_rules(self):
        return {"max_rel_err": 1e-5}


class TorchIRRunner(Runner):
    name, version, targets = "host", "0.1.0", ("torch-ir",)

    def open(self, artifact):
        with np.load(artifact.file("weights.npz")) as z:
            graph = Graph.from_dict(json.loads(artifact.file("graph.json").read_text()), dict(z))
        return lambda xs: [o.numpy() for o in graph.run([torch.from_numpy(x) for x in xs])]


class _LionStep(torch.optim.Optimizer):
    """``m ← β2·m + (1−β2)·g`` after stepping ``w ← w − lr·(sign(β1·m + (1−β1)·g) + λ·w)``."""

    def __init__(self, params, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0):
        super().__init__(params, {"lr": lr, "betas": betas, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for w in group["params"]:
                if w.grad is None:
                    continue
                m = self.state[w].setdefault("m", torch.zeros_like(w))
                update = (b1 * m + (1 - b1) * w.grad).sign() + group["weight_decay"] * w
                w.add_(update, alpha=-group["lr"])
                m.mul_(b2).add_(w.grad, alpha=1 - b2)


class Lion(Optimizer):
    """Lion: sign of an interpolated momentum (one moment buffer, half of Adam's memory)."""

    name, version = "lion", "0.1.0"

    @dataclasses.dataclass(frozen=True)
    class Config(Config):
        betas: tuple = (0.9, 0.99)
        weight_decay: float = 0.0

        def __post_init__(self):
            check_betas("lion", self.betas)
            check_range("lion", "weight_decay", self.weight_decay, 0.0)

    def build(self, params):
        return _LionStep(params, betas=tuple(self.config.betas), weight_decay=self.config.weight_decay)


@hookimpl
def register_optimizers(register):
    register(Lion)


@hookimpl
def register_pruners(register):
    register(RandomPruner)


@hookimpl
def register_targets(register):
    register(TorchIRTarget)


@hookimpl
def register_runners(register):
    register(TorchIRRunner)
