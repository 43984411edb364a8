"""Weight sharing by k-means (trained quantization), and the Huffman-coded container of shared weights.

Han, Mao and Dally, "Deep Compression: Compressing Deep Neural Networks with
Pruning, Trained Quantization and Huffman Coding" (ICLR 2016).  What the
``kmeans`` quantizer and the ``deep-compression`` pruner share lives here:

1. **Clustering** (§3.1).  A layer's nonzero weights are grouped into ``k =
   2^bits`` clusters by 1-D k-means (:func:`kmeans_1d`, Lloyd's iterations)
   minimising the within-cluster sum of squares ``Σ_j Σ_{w ∈ c_j} (w − c_j)²``
   (:func:`wcss`).  Centroids start linearly spaced between the smallest and
   the largest weight (:func:`linear_init`, the paper's "linear
   initialization", which keeps the rare large weights represented).  Each
   iteration assigns every weight to its nearest centroid (:func:`assign`,
   ties to the lower one) and moves each centroid to the mean of its members
   (an empty cluster keeps its centroid); it stops when no assignment changes
   or after ``max_iter`` iterations.  Exact zeros (weights a pruner removed)
   take no part and stay zero: a sparse layer keeps its sparsity.
2. **Weight sharing and centroid fine-tuning** (§3.2–3.3).
   :class:`KMeansWeight` is the parametrization ``W = C[I] · M`` (centroids
   ``C`` trained, index buffer ``I``, mask ``M`` of the weights that were
   nonzero), so the gradient of centroid j is the sum of the gradients of the
   weights that share it, ``∂L/∂C_j = Σ_{i: I_i = j} ∂L/∂W_i`` (eq. 3).  Each
   layer hints ``Hint(codebook=k)`` (k + 1 values where a pruner's zeros stay).
3. **The container** (§4).  For layers whose hint comes from one of
   :data:`CODED_SOURCES` (``deep-compression``), the LiteRT targets add
   ``weights.dc`` beside ``model.tflite`` (:func:`attach_container`): each
   such int8 weight tensor of the model, Huffman-coded with relative sparse
   indices (:mod:`sdk.huffman`), and a manifest entry ``weight_container``
   that says how the container expands into the model.  The runners decode
   it and check it against the model before running (:func:`sdk.huffman.expand_model`).

>>> import torch
>>> c, i, _ = kmeans_1d(torch.tensor([0.0, 0.1, 0.9, 1.0]), torch.tensor([0.0, 1.0]))
>>> [round(x, 6) for x in c.tolist()], i.tolist()
([0.05, 0.95], [0, 0, 1, 1])
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch
from torch import nn

from . import huffman
from .weight_container import coded_layers
from .encoding import Hint
from .layer_quant import WeightQuant

__all__ = ["CODED_SOURCES", "KMeansWeight", "assign", "attach_container", "container_stages", "kmeans_1d",
           "linear_init", "wcss"]

#: hint sources (method names) whose int8 weights the LiteRT targets also ship Huffman-coded in ``weights.dc``
CODED_SOURCES = ("deep-compression",)
#: the manifest entry that describes ``weights.dc``
MANIFEST_KEY = "weight_container"


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
    mask ``M`` of the weights that were nonzero when clustered.  ``method`` names the
    quantizer in hints and refusals (``kmeans``, ``deep-compression``)."""

    method = "kmeans"

    def __init__(self, centroids: torch.Tensor, index: torch.Tensor, nonzero: torch.Tensor,
                 method: str | None = None):
        super().__init__()
        self.centroids = nn.Parameter(centroids.detach().clone())
        self.register_buffer("index", index.detach().clone())
        self.register_buffer("nonzero", nonzero.detach().clone())
        if method:
            self.method = method

    @classmethod
    def cluster(cls, w: torch.Tensor, bits: int, max_iter: int = 100, method: str | None = None) -> "KMeansWeight":
        """Cluster the nonzero entries of ``w`` into ``2^bits`` centroids (linear init)."""
        w = w.detach()
        nonzero = w != 0
        values = w[nonzero]
        if values.numel() == 0:     # an all-zero layer: one zero centroid
            return cls(torch.zeros(1, dtype=w.dtype), torch.zeros(w.shape, dtype=torch.long), nonzero.to(w.dtype),
                       method)
        k = min(2 ** bits, values.numel())
        c, idx, _ = kmeans_1d(values, linear_init(values, k), max_iter)
        index = torch.zeros(w.shape, dtype=torch.long, device=w.device)
        index[nonzero] = idx.to(w.device)
        return cls(c.to(w.dtype), index, nonzero.to(w.dtype), method)

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


# ---------------------------------------------------------------------------
# the container in LiteRT artifacts
# ---------------------------------------------------------------------------

def attach_container(package, graph, model_file: str = "model.tflite"):
    """``package`` (a :class:`sdk.contract.Package` holding ``model_file``) with ``weights.dc``
    added when layers of ``graph`` hint one of :data:`CODED_SOURCES`: their int8 weight
    tensors as ``model_file`` stores them (dense, or the values of a sparse one), coded
    by :func:`sdk.huffman.encode_tensor`, and the manifest entry ``weight_container``.
    Weights stored otherwise (float, INT4) stay as they are.  Unchanged when nothing is coded."""
    wanted = {name for name, hint in graph.hints.items() if set(hint.source.split("+")) & set(CODED_SOURCES)}
    if not wanted or model_file not in package.files:
        return package
    model = package.files[model_file]
    coded = [(layer, op, values, huffman.encode_tensor(values, name, offset, scales))
             for layer, name, offset, values, scales, op in coded_layers(package, wanted, model_file)]
    if not coded:
        return package
    blob = huffman.write_container([t for *_, t in coded], model)
    entry = {
        "file": huffman.CONTAINER, "format": huffman.FORMAT, "version": huffman.VERSION, "into": model_file,
        "decoder": "sdk.huffman.expand_model",
        "expand": f"decode each tensor of {huffman.CONTAINER} (int8, C order) into {model_file} at its offset: "
                  f"written over the complete file it must equal the bytes there; inserted into the skeleton "
                  f"(sdk.huffman.skeleton: {model_file} without those bytes) it rebuilds the file, whose sha256 "
                  f"the container and files.{model_file} record",
        "tensors": [{"layer": layer, "tensor": t.name, "offset": t.offset, "bytes": t.count, "diff_bits": t.diff_bits,
                     "codebook": int(t.codebook.size), "entries": t.entries,
                     "density": round(float(np.count_nonzero(v)) / max(v.size, 1), 6)} for layer, _, v, t in coded],
        "sizes": _stage_sizes(coded, len(blob), len(model)),
    }
    return dataclasses.replace(package, files={**package.files, huffman.CONTAINER: blob},
                               extra={**package.extra, MANIFEST_KEY: entry})


def _stage_sizes(coded, container_bytes: int, model_bytes: int) -> dict[str, int]:
    """Bytes of the coded weights after each Deep Compression stage, the paper's accounting:
    fp32 dense; pruned (fp32 values with relative indices of :func:`sdk.huffman.paper_diff_bits`);
    quantized (``ceil(log2(K + 1))``-bit codebook indices instead, plus K fp32 centroids);
    Huffman (the container as written: codebooks, scales, tables, both streams)."""
    fp32 = pruned = quantized = 0
    for _, op, values, t in coded:
        b = huffman.paper_diff_bits(op)
        fp32 += 4 * values.size
        pruned += huffman.fixed_width_bytes(values, b, 32)
        quantized += huffman.fixed_width_bytes(values, b, max(1, math.ceil(math.log2(t.codebook.size + 1))), 32)
    skeleton = model_bytes - sum(t.count for *_, t in coded)
    return {"fp32": fp32, "pruned": pruned, "quantized": quantized, "huffman": container_bytes,
            "skeleton": skeleton}


def container_stages(manifest: dict) -> list[dict]:
    """The Deep Compression table of an artifact's ``weight_container`` entry: one row per stage
    (``fp32``, ``pruned``, ``quantized``, ``huffman``) with its bytes and its compression
    against the fp32 weights, overall and against the stage before."""
    sizes = manifest[MANIFEST_KEY]["sizes"]
    rows, prev = [], None
    for stage in ("fp32", "pruned", "quantized", "huffman"):
        n = sizes[stage]
        rows.append({"stage": stage, "bytes": n, "vs_fp32": round(sizes["fp32"] / n, 2),
                     "vs_previous": round(prev / n, 2) if prev else 1.0})
        prev = n
    return rows
