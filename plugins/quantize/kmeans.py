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

The index and codebook of each layer are :meth:`KMeansWeight.codebook`; the
``deep-compression`` pipeline Huffman-codes them.  For deployment the shared
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

import torch
from torch import nn

from sdk import hookimpl
from sdk.config import check_choice, check_range
from sdk.encoding import Hint
from sdk.layer_quant import LayerQuantConfig, LayerQuantizer, WeightQuant


def linear_init(values: torch.Tensor, k: int) -> torch.Tensor:
    """``k`` centroids evenly spaced over ``[min, max]`` of ``values`` (float64).

    >>> linear_init(torch.tensor([-1.0, 3.0]), 3).tolist()
    [-1.0, 1.0, 3.0]
    """
    v = values.detach().double()
    return torch.linspace(float(v.min()), float(v.max()), k, dtype=torch.float64)


def assign(values: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Index of the nearest of the (ascending) ``centroids`` for each value; ties go to the lower.

    In one dimension the nearest centroid is found by the midpoints between
    neighbours, so no ``values × k`` distance matrix is built.

    >>> assign(torch.tensor([0.1, 0.5, 0.9]), torch.tensor([0.0, 1.0])).tolist()
    [0, 0, 1]
    """
    mids = (centroids[1:] + centroids[:-1]) / 2
    return torch.searchsorted(mids, values.to(mids.dtype), side="left")


def kmeans_1d(values: torch.Tensor, centroids: torch.Tensor,
              max_iter: int = 100) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Lloyd's k-means on 1-D ``values`` from ascending initial ``centroids``.

    Returns ``(centroids, index, iterations)`` in float64; ``index`` is the
    nearest-centroid assignment of the returned centroids.  Deterministic.
    Centroids stay sorted: in 1-D each cluster is an interval, and a mean
    stays inside its interval.

    >>> c, i, _ = kmeans_1d(torch.tensor([0.0, 0.1, 0.9, 1.0]), torch.tensor([0.0, 1.0]))
    >>> [round(x, 6) for x in c.tolist()], i.tolist()
    ([0.05, 0.95], [0, 0, 1, 1])
    """
    v = values.detach().double().reshape(-1)
    c = centroids.detach().double().clone()
    index = assign(v, c)
    for it in range(1, max_iter + 1):
        sums = torch.zeros_like(c).index_add_(0, index, v)
        counts = torch.zeros_like(c).index_add_(0, index, torch.ones_like(v))
        c = torch.where(counts > 0, sums / counts.clamp(min=1), c)
        new = assign(v, c)
        if torch.equal(new, index):
            return c, index, it
        index = new
    return c, index, max_iter


def wcss(values: torch.Tensor, centroids: torch.Tensor, index: torch.Tensor) -> float:
    """Within-cluster sum of squares ``Σ (v − centroids[index])²``."""
    return float(((values.double() - centroids.double()[index]) ** 2).sum())


class KMeansWeight(WeightQuant):
    """Parametrization ``W = C[I] · M``: shared centroids ``C`` (trained), index buffer ``I``,
    mask ``M`` of the weights that were nonzero when clustered."""

    method = "kmeans"

    def __init__(self, centroids: torch.Tensor, index: torch.Tensor, nonzero: torch.Tensor):
        super().__init__()
        self.centroids = nn.Parameter(centroids.detach().clone())
        self.register_buffer("index", index.detach().clone())
        self.register_buffer("nonzero", nonzero.detach().clone())

    @classmethod
    def cluster(cls, w: torch.Tensor, bits: int, max_iter: int = 100) -> "KMeansWeight":
        """Cluster the nonzero entries of ``w`` into ``2^bits`` centroids (linear init)."""
        w = w.detach()
        nonzero = w != 0
        values = w[nonzero]
        if values.numel() == 0:     # an all-zero layer: one zero centroid
            return cls(torch.zeros(1, dtype=w.dtype), torch.zeros(w.shape, dtype=torch.long), nonzero.to(w.dtype))
        k = min(2 ** bits, values.numel())
        c, idx, _ = kmeans_1d(values, linear_init(values, k), max_iter)
        index = torch.zeros(w.shape, dtype=torch.long, device=w.device)
        index[nonzero] = idx.to(w.device)
        return cls(c.to(w.dtype), index, nonzero.to(w.dtype))

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        # the latent weight is not used any more: the codebook is the layer's parameter
        return self.centroids[self.index] * self.nonzero

    def hint(self) -> Hint:
        """At most the ``k`` centroids, and 0 where weights were pruned before clustering."""
        pruned = bool((self.nonzero == 0).any())
        return Hint(codebook=self.centroids.numel() + int(pruned), source=self.method)

    def codebook(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(centroids, index)``; pruned positions carry index 0 and are zero in the weight."""
        return self.centroids.detach(), self.index

    def extra_repr(self) -> str:
        return f"k={self.centroids.numel()}"


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
