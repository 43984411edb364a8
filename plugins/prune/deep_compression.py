"""``deep-compression`` — prune, share weights by trained k-means, Huffman-code (Han et al. 2016).

Han, Mao and Dally, "Deep Compression: Compressing Deep Neural Networks with
Pruning, Trained Quantization and Huffman Coding", ICLR 2016.  Three stages:

1. **Pruning** (§2; Han et al. 2015).  Each layer's smallest-``|w|`` weights
   are masked to zero, iteratively: ``prune_steps`` rounds, round ``r``
   reaching ``r/prune_steps`` of the layer's target sparsity (exactly
   ``round(s · numel)`` zeros at the end, ties by position), each round
   followed by ``epochs`` of retraining with the mask fixed, so pruned weights
   never come back.  ``sparsity`` applies to every layer, ``layer_sparsity``
   overrides it by module name (the paper prunes LeNet-300-100 to 8 %, 9 %
   and 26 % of its three layers).
2. **Trained quantization** (§3).  The surviving weights of each layer are
   clustered into ``2^bits`` shared values by k-means with linear
   initialisation, zeros kept, and the centroids (with the biases) fine-tuned
   for ``quant_epochs`` at ``quant_lr``: the gradient of a centroid is the sum
   of its members' (:class:`sdk.weight_sharing.KMeansWeight`, the same code
   as the ``kmeans`` quantizer).
3. **Huffman coding** (§4), when the model is packed for ``arm-int8``: each
   layer hints its codebook, sparsity and this method, so the plan gives each
   shared value one int8 code and the target writes ``weights.dc`` beside
   ``model.tflite``: per layer the codebook, and the cluster indices and
   relative sparse indices (gaps with the paper's filler zeros) as two
   canonical Huffman streams (:mod:`sdk.huffman`).  The manifest entry
   ``weight_container`` says how it expands into the ``.tflite`` and gives the
   bytes after each stage; the runners decode it and check it against the
   model before they run (a container that does not expand into the model is
   an :class:`~sdk.errors.ArtifactError`).

Without data the pruning is one-shot and the centroids are not trained.
``stages`` holds, after :meth:`apply`, one record per stage (``dense``,
``pruned``, ``quantized``): nonzero weights, most distinct nonzero values of a
layer, the weights' bytes in the paper's accounting
(:func:`sdk.huffman.fixed_width_bytes`: fp32 dense; fp32 values with 8-bit
(conv) / 5-bit (fc) relative indices; ``ceil(log2(k + 1))``-bit indices with
an fp32 codebook) and, with a ``val`` stream, the accuracy.

>>> import torch
>>> from plugins.prune.deep_compression import DeepCompression
>>> net = torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
>>> dc = DeepCompression(sparsity=0.75, bits=2)
>>> w = dc.apply(net)[0].weight.detach()
>>> int((w == 0).sum()), len(torch.unique(w[w != 0])) <= 4
(96, True)
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
import torch
from torch.nn.utils import parametrize

from sdk import hookimpl
from sdk.base import Pruner
from sdk.config import check_choice, check_range
from sdk.errors import ConfigError
from sdk.huffman import fixed_width_bytes, paper_diff_bits
from sdk.layer_quant import quantize_layers
from sdk.masks import apply_mask, prunable_layers, smallest_mask
from sdk.trainer import TrainConfig, evaluate, finetune
from sdk.weight_sharing import KMeansWeight


class DeepCompression(Pruner):
    """Iterative magnitude pruning, trained k-means weight sharing, Huffman-coded in the artifact."""

    name = "deep-compression"
    version = "1.0"

    @dataclasses.dataclass(frozen=True)
    class Config(TrainConfig):
        """The training fields (:class:`sdk.trainer.TrainConfig`) are the retraining's after each
        pruning round; the centroid fine-tuning takes them with ``quant_epochs`` and ``quant_lr``."""

        sparsity: float = 0.9                   # fraction of zeros of each layer
        layer_sparsity: dict = dataclasses.field(default_factory=dict, hash=False)   # {module name: sparsity}
        prune_steps: int = 3                    # prune + retrain rounds to reach the sparsity
        epochs: int = 5                         # retraining epochs after each round
        bits: int = 5                           # 2^bits shared values (k-means clusters) per layer
        quant_epochs: int = 5                   # centroid fine-tuning epochs (0: none)
        quant_lr: float = 1e-4
        max_iter: int = 100                     # Lloyd iterations at most
        layer_types: tuple[str, ...] = ("Conv1d", "Conv2d", "Linear")
        exclude: tuple[str, ...] = ()           # module names left dense and float

        def __post_init__(self):
            super().__post_init__()
            owner = "deep-compression"
            check_range(owner, "sparsity", self.sparsity, 0.0, 1.0, hi_open=True)
            if not isinstance(self.layer_sparsity, dict):
                raise ConfigError(f"{owner}: layer_sparsity must map module names to sparsities, got "
                                  f"{type(self.layer_sparsity).__name__}")
            for name, s in self.layer_sparsity.items():
                check_range(owner, f"layer_sparsity[{name!r}]", s, 0.0, 1.0, hi_open=True)
            object.__setattr__(self, "layer_sparsity", dict(self.layer_sparsity))
            check_range(owner, "prune_steps", self.prune_steps, 1)
            check_choice(owner, "bits", self.bits, range(1, 9))
            check_range(owner, "quant_epochs", self.quant_epochs, 0)
            check_range(owner, "quant_lr", self.quant_lr, 0.0, lo_open=True)
            check_range(owner, "max_iter", self.max_iter, 1)

    def __init__(self, config: Any = None, **options: Any) -> None:
        super().__init__(config, **options)
        self.stages: list[dict] = []

    def run(self, model, ctx):
        """``apply`` on the ``train`` stream (a ``val`` stream adds each stage's accuracy to
        ``stages``); ``stages`` goes into the manifest's stage reports."""
        model = self.apply(model, ctx.data.get("train"), val=ctx.data.get("val"))
        ctx.report(stages=self.stages)
        return model

    def apply(self, model: torch.nn.Module, data=None, val=None) -> torch.nn.Module:
        cfg = self.config
        layers = prunable_layers(model, cfg.layer_types, cfg.exclude)
        names = [n for n, _ in layers]
        if not layers:
            raise ConfigError(f"deep-compression: the model has no {'/'.join(cfg.layer_types)} layers to compress")
        unknown = sorted(set(cfg.layer_sparsity) - set(names))
        if unknown:
            raise ConfigError(f"deep-compression: layer_sparsity names {', '.join(unknown)}, which are not layers "
                              f"it compresses; valid names: {', '.join(names)}")
        target = {n: cfg.layer_sparsity.get(n, cfg.sparsity) for n in names}
        self.stages = [self._record("dense", layers, model, val)]

        for step in range(1, cfg.prune_steps + 1):
            with torch.no_grad():
                for n, mod in layers:
                    w = mod.weight.detach()
                    keep = smallest_mask(w.abs().reshape(-1), target[n] * step / cfg.prune_steps)
                    apply_mask(mod, keep.reshape(w.shape))
            if data is not None:
                finetune(model, data, cfg.training(), desc=f"deep-compression retrain {step}/{cfg.prune_steps}")
        self.stages.append(self._record("pruned", layers, model, val))

        types = tuple({parametrize.type_before_parametrizations(m) for _, m in layers})
        others = [n for n, m in model.named_modules() if isinstance(m, types) and n not in names]
        quantize_layers(model, self.name, lambda _, layer: KMeansWeight.cluster(layer.weight, cfg.bits, cfg.max_iter,
                                                                                method=self.name),
                        keep_first_last=False, exclude=others, types=types)
        if data is not None and cfg.quant_epochs:
            finetune(model, data, cfg.training(epochs=cfg.quant_epochs, lr=cfg.quant_lr),
                     desc="deep-compression centroids")
        self.stages.append(self._record("quantized", layers, model, val))
        return model.eval()

    @staticmethod
    def _record(stage: str, layers, model, val) -> dict:
        """Nonzeros, most distinct nonzero values of a layer, bytes (the paper's accounting of
        ``stage``) and accuracy."""
        nonzero = distinct = size = total = 0
        with torch.no_grad():
            for _, mod in layers:
                w = mod.weight.detach().cpu().numpy()
                values = np.unique(w[w != 0]).size
                total += w.size
                nonzero += int(np.count_nonzero(w))
                distinct = max(distinct, values)
                conv = "Conv" in parametrize.type_before_parametrizations(mod).__name__
                b = paper_diff_bits("CONV" if conv else "FULLY_CONNECTED")
                if stage == "dense":
                    size += 4 * w.size
                elif stage == "pruned":
                    size += fixed_width_bytes(w, b, 32)
                else:       # a ceil(log2(K + 1))-bit index per entry (symbol 0: zero), K fp32 centroids
                    size += fixed_width_bytes(w, b, max(1, math.ceil(math.log2(values + 1))), 32)
        row = {"stage": stage, "weights": total, "nonzero": nonzero, "distinct": distinct, "bytes": size}
        if val is not None:
            row["accuracy"] = evaluate(model, val)
        return row


@hookimpl
def register_pruners(register):
    register(DeepCompression)
