"""``kmeans`` — trained quantization by weight sharing (k-means codebooks, centroid fine-tuning).

Han, Mao and Dally, "Deep Compression: Compressing Deep Neural Networks with
Pruning, Trained Quantization and Huffman Coding" (ICLR 2016), §3.  Per layer:

1. **Clustering.**  The layer's nonzero weights are grouped into ``k = 2^bits``
   clusters by 1-D k-means (Lloyd's iterations) minimising the within-cluster
   sum of squares ``Σ_j Σ_{w ∈ c_j} (w − c_j)²``.  Centroids start linearly
   spaced between the smallest and the largest weight (the paper's "linear
   initialization", which keeps the rare large weights represented).  Each
   iteration assigns every weight to its nearest centroid (ties to the lower
   one) and moves each centroid to the mean of its members (an empty cluster
   keeps its centroid); it stops when no assignment changes or after
   ``max_iter`` iterations.  Exact zeros (weights a pruner removed) take no
   part and stay zero: a sparse layer keeps its sparsity.
2. **Weight sharing.**  Each weight becomes its centroid: the layer stores a
   ``bits``-bit index per weight and a ``k``-entry codebook.
3. **Centroid fine-tuning.**  The codebook is an ``nn.Parameter`` and the
   weight is ``W = C[I] · M`` (C centroids, I the index buffer, M the nonzero
   mask), so the gradient of centroid j is the sum of the gradients of the
   weights that share it, ``∂L/∂C_j = Σ_{i: I_i = j} ∂L/∂W_i`` (the paper's
   eq. 3), and the optimiser updates the centroids (and the network's float
   parameters: biases, BN, unquantized layers) on ``(x, y)`` batches.

The clustering and the parametrization live in :mod:`sdk.weight_sharing`
(shared with the ``deep-compression`` pruner, which Huffman-codes the result);
the index and codebook of each layer are :meth:`KMeansWeight.codebook`.  For deployment the shared
weights fold into ordinary float constants, and each quantized layer carries
the hint ``Hint(codebook=k)`` (k + 1 values where a pruner's zeros stay;
:mod:`sdk.encoding`).  Layer choice and training: :mod:`sdk.layer_quant`.

>>> import torch
>>> layer = torch.nn.Linear(16, 8)
>>> _ = KMeans(bits=2, keep_first_last=False).apply(torch.nn.Sequential(layer))
>>> len(torch.unique(layer.weight.detach())) <= 4
True
"""

from __future__ import annotations

import dataclasses

from torch import nn

from sdk import hookimpl
from sdk.config import check_choice, check_range
from sdk.layer_quant import LayerQuantConfig, LayerQuantizer
# the clustering functions are this quantizer's public helpers too (tests and users import them from here)
from sdk.weight_sharing import KMeansWeight, assign, kmeans_1d, linear_init, wcss

__all__ = ["KMeans", "KMeansWeight", "assign", "kmeans_1d", "linear_init", "wcss"]


class KMeans(LayerQuantizer):
    """Weight sharing: per-layer k-means codebook of 2^bits centroids, then centroid fine-tuning."""

    name = "kmeans"
    version = "1.0"

    @dataclasses.dataclass(frozen=True)
    class Config(LayerQuantConfig):
        bits: int = 4               # codebook of 2^bits shared weights per layer
        max_iter: int = 100         # Lloyd iterations at most

        def __post_init__(self):
            super().__post_init__()
            check_choice("kmeans", "bits", self.bits, range(1, 9))
            check_range("kmeans", "max_iter", self.max_iter, 1)

    def quantize_layer(self, name: str, layer: nn.Module) -> KMeansWeight:
        return KMeansWeight.cluster(layer.weight, self.config.bits, self.config.max_iter)


@hookimpl
def register_quantizers(register):
    register(KMeans)
