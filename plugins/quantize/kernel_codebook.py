"""``kernel-codebook`` — Kernel Quantization: a codebook of whole k×k kernels, low-bit kernel indices.

Yu, Shi, Huang and Yu, "Kernel Quantization for Efficient Network Compression"
(2020).  The unit of quantization is a convolution kernel, not a weight: a
Conv2d's weight ``[O, C, kh, kw]`` is ``O·C`` kernels of ``kh·kw`` values, and
each becomes one of ``2^index_bits`` codebook kernels.  Per layer (each layer
has its own codebook; layers of other kernel sizes could not share one):

1. **Clustering.**  k-means in ``kh·kw`` dimensions over the layer's kernels
   (Lloyd's iterations, squared Euclidean distance): k-means++ seeding
   (Arthur & Vassilvitskii 2007, from ``seed``), then each iteration assigns
   every kernel to its nearest entry (ties to the lower index) and moves each
   entry to the mean of its kernels (an empty one stays); it stops when no
   assignment changes or after ``max_iter`` iterations.  A layer with fewer
   kernels than ``2^index_bits`` gets one entry per kernel.
2. **6-bit codebook.**  The codebook's values are quantized on one uniform
   symmetric grid per layer, ``s · q`` with ``s = max |C| / 31`` and integer
   ``q`` in ``[-31, 31]`` (the paper's 6-bit parameter quantization).  The layer
   stores ``index_bits`` bits per kernel and ``2^index_bits · kh·kw`` 6-bit codes.
3. **Fine-tuning with the codebook.**  The assignment is kept and the latent
   float codebook ``C`` is the layer's parameter: the weight is
   ``W = Q6(C)[I]`` (``I`` the index buffer), the rounding passed by the
   straight-through estimator, so the gradient of entry ``j`` is the sum of the
   gradients of the kernels that use it, ``∂L/∂C_j = Σ_{(o,c): I_oc = j} ∂L/∂W_oc``
   (Deep Compression's trained quantization, per kernel instead of per weight),
   and the optimiser updates the codebook and the network's float parameters
   (biases, BN, the unquantized layers) on ``(x, y)`` batches.  The grid's
   scale follows the latent codebook's largest magnitude at every step.

The index and codebook of each layer are :meth:`KernelCodebookWeight.codes`.
For deployment the shared kernels fold into an ordinary float constant whose
values lie on the 6-bit grid, and each layer carries ``Hint(codebook=n, bits=6)``
(n ≤ 63 values, :mod:`sdk.encoding`).  The ``binary-popcount`` target finds the
shared kernels in that constant again and ships them as indices + 6-bit codebook
(:class:`targets.binary_popcount.specs.CodebookConv`), about
``index_bits / (kh·kw)`` bits per weight plus the codebook's share.  A BatchNorm
right after such a conv is folded into its weight by deploy, one scale per output
channel, which breaks the sharing: that layer then ships as a float conv.
Layer choice and training: :mod:`sdk.layer_quant`.

>>> import torch
>>> conv = torch.nn.Conv2d(8, 4, 3)
>>> _ = KernelCodebook(index_bits=2, keep_first_last=False).apply(torch.nn.Sequential(conv))
>>> len(torch.unique(conv.weight.detach().reshape(32, 9), dim=0)) <= 4
True
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from sdk import hookimpl
from sdk.config import check_choice, check_range
from sdk.encoding import Hint
from sdk.layer_quant import LayerQuantConfig, LayerQuantizer, WeightQuant, ste

#: the bits of each codebook value: a symmetric grid of 2·31 + 1 levels
CODE_BITS = 6
QMAX = 2 ** (CODE_BITS - 1) - 1
#: elements of the kernel × entry × tap distance block computed at once
_CHUNK = 1 << 22


def kmeanspp_init(kernels: torch.Tensor, k: int, seed: int = 0) -> torch.Tensor:
    """``k`` rows of ``kernels`` ``[n, d]`` picked by k-means++ (float64, deterministic for ``seed``):
    the first uniformly, each next with probability proportional to its squared distance to the
    nearest row picked so far.

    >>> sorted(kmeanspp_init(torch.tensor([[0.0], [0.0], [5.0]]), 2).flatten().tolist())
    [0.0, 5.0]
    """
    x = kernels.detach().double()
    g = torch.Generator().manual_seed(seed)
    picked = [int(torch.randint(len(x), (1,), generator=g))]
    d2 = ((x - x[picked[0]]) ** 2).sum(1)
    for _ in range(1, k):
        total = float(d2.sum())
        # every row coincides with a pick already: any row will do, take the first
        nxt = int(torch.multinomial(d2 / total, 1, generator=g)) if total > 0 else 0
        picked.append(nxt)
        d2 = torch.minimum(d2, ((x - x[nxt]) ** 2).sum(1))
    return x[picked].clone()


def assign_kernels(kernels: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Index of the nearest (squared Euclidean) row of ``centroids`` for each row of ``kernels``;
    ties go to the lower index.  The distances are summed tap by tap, in blocks.

    >>> assign_kernels(torch.tensor([[0.0, 1.0], [3.0, 3.0]]), torch.tensor([[0.0, 0.0], [3.0, 2.0]])).tolist()
    [0, 1]
    """
    x, c = kernels.double(), centroids.double()
    step = max(1, _CHUNK // (c.numel() or 1))
    return torch.cat([((part[:, None, :] - c[None]) ** 2).sum(-1).argmin(1) for part in x.split(step)])


def kmeans_kernels(kernels: torch.Tensor, centroids: torch.Tensor,
                   max_iter: int = 100) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Lloyd's k-means on the rows of ``kernels`` ``[n, d]`` from ``centroids`` ``[k, d]``.

    Returns ``(centroids, index, iterations)``, float64; ``index`` is the nearest-centroid
    assignment of the returned centroids.  An empty cluster keeps its centroid.

    >>> c, i, _ = kmeans_kernels(torch.tensor([[0.0], [0.2], [1.0], [1.2]]), torch.tensor([[0.0], [1.0]]))
    >>> [round(v, 6) for v in c.flatten().tolist()], i.tolist()
    ([0.1, 1.1], [0, 0, 1, 1])
    """
    x = kernels.detach().double()
    c = centroids.detach().double().clone()
    index = assign_kernels(x, c)
    for it in range(1, max_iter + 1):
        sums = torch.zeros_like(c).index_add_(0, index, x)
        counts = torch.zeros(len(c), dtype=x.dtype).index_add_(0, index, torch.ones(len(x), dtype=x.dtype))
        c = torch.where(counts[:, None] > 0, sums / counts.clamp(min=1)[:, None], c)
        new = assign_kernels(x, c)
        if torch.equal(new, index):
            return c, index, it
        index = new
    return c, index, max_iter


def grid(codebook: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q, s)``: the integer codes in ``[-31, 31]`` (as floats) and the scale
    ``s = max |codebook| / 31`` of the 6-bit grid; ``q · s`` is the quantized codebook.

    >>> q, s = grid(torch.tensor([-0.62, 0.1, 0.3]))
    >>> q.tolist(), round(float(s), 6)
    ([-31.0, 5.0, 15.0], 0.02)
    """
    top = codebook.detach().abs().max()
    s = torch.where(top > 0, top / QMAX, torch.ones_like(top))
    return torch.clamp(torch.round(codebook / s), -QMAX, QMAX), s


class KernelCodebookWeight(WeightQuant):
    """Parametrization ``W = Q6(C)[I]``: the latent codebook ``C`` ``[entries, kh, kw]``
    (trained; quantized to the 6-bit grid in the forward pass, straight through in the
    backward pass) and the index buffer ``I`` ``[O, C]`` of each kernel's entry."""

    method = "kernel-codebook"

    def __init__(self, codebook: torch.Tensor, index: torch.Tensor):
        super().__init__()
        self.codebook = nn.Parameter(codebook.detach().clone())
        self.register_buffer("index", index.detach().clone())

    @classmethod
    def cluster(cls, w: torch.Tensor, index_bits: int, max_iter: int = 100, seed: int = 0) -> "KernelCodebookWeight":
        """Cluster the ``O·C`` kernels of ``w`` ``[O, C, kh, kw]`` into ``2^index_bits`` entries
        (k-means++ from ``seed``, then Lloyd)."""
        o, c, kh, kw = w.shape
        kernels = w.detach().double().reshape(o * c, kh * kw).cpu()
        k = min(2 ** index_bits, o * c)
        centroids, index, _ = kmeans_kernels(kernels, kmeanspp_init(kernels, k, seed), max_iter)
        return cls(centroids.reshape(k, kh, kw).to(w), index.reshape(o, c).to(w.device))

    def quantized_codebook(self) -> torch.Tensor:
        """``Q6(C)``: the codebook on its 6-bit grid, identity gradient to ``C``."""
        q, s = grid(self.codebook)
        return ste(q * s, self.codebook)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        # the latent weight is not used any more: the codebook is the layer's parameter
        return self.quantized_codebook()[self.index]

    def hint(self) -> Hint:
        """At most the 63 values of the 6-bit grid (fewer when the codebook has fewer values)."""
        values = min(2 * QMAX + 1, self.codebook.numel())
        return Hint(codebook=values, bits=CODE_BITS, source=self.method)

    def codes(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(q, s, index)``: the codebook's integer codes ``[entries, kh, kw]`` (int64),
        its grid scale, and each kernel's entry ``[O, C]``; the weight is ``(q · s)[index]``."""
        q, s = grid(self.codebook)
        return q.long(), s, self.index

    def extra_repr(self) -> str:
        return f"entries={len(self.codebook)}, kernel={tuple(self.codebook.shape[1:])}"


class KernelCodebook(LayerQuantizer):
    """Kernel Quantization: per-layer codebook of 2^index_bits k×k kernels on a 6-bit grid, fine-tuned."""

    name = "kernel-codebook"
    version = "1.0"
    layer_types = (nn.Conv2d,)

    @dataclasses.dataclass(frozen=True)
    class Config(LayerQuantConfig):
        # every Conv2d by default: the classifier is no conv, and a stem with fewer kernels
        # than entries keeps each kernel, only put on the 6-bit grid
        keep_first_last: bool = False
        index_bits: int = 4         # codebook of 2^index_bits kernels per layer
        max_iter: int = 100         # Lloyd iterations at most

        def __post_init__(self):
            super().__post_init__()
            check_choice("kernel-codebook", "index_bits", self.index_bits, range(1, 9))
            check_range("kernel-codebook", "max_iter", self.max_iter, 1)

    def quantize_layer(self, name: str, layer: nn.Module) -> KernelCodebookWeight:
        cfg = self.config
        return KernelCodebookWeight.cluster(layer.weight, cfg.index_bits, cfg.max_iter, cfg.seed)


@hookimpl
def register_quantizers(register):
    register(KernelCodebook)
