"""LiteRT's sparse tensor format (``Tensor.sparsity``): encode a pruned weight, and expand one.

A sparse constant stores only its nonzero values (or nonzero blocks) plus, per
dimension in ``traversal_order``, either ``DENSE`` (all ``dense_size``
coordinates) or ``SPARSE_CSR`` (``array_segments`` / ``array_indices``, the
compressed-row arrays).  Blocked formats add one dense inner dimension per
entry of ``block_map`` (the dimension it blocks).  The runtime expands it with
a ``DENSIFY`` op; XNNPACK folds that at delegate init, TFLite's builtin
FULLY_CONNECTED reads the 1x4 (float) and 1x16 (int8) block forms directly.

:func:`encode` writes the form edgepack ships: leading dimensions dense, the rest
compressed (nested CSR, split where the file is smallest), the narrowest index
type that holds the indices (checked against TFLite's own FormatConverter in
tests/targets/arm_int8/test_fbcheck_encodings.py);
:func:`densify` reads any form the schema allows and refuses inconsistent
arrays with :class:`~sdk.errors.ArtifactError`.

>>> w = np.array([[0, 2, 0, 0], [0, 0, 0, 5]], np.float32)
>>> values, sp = encode(w)
>>> values.tolist(), sp.dimMetadata[1].arraySegments.values.tolist(), sp.dimMetadata[1].arrayIndices.values.tolist()
([2.0, 5.0], [0, 1, 2], [1, 3])
>>> bool((densify(values, sp, w.shape) == w).all())
True
"""

from __future__ import annotations

import numpy as np

from ai_edge_litert import schema_py_generated as fb

from sdk.errors import ArtifactError, ConfigError

__all__ = ["encode", "densify", "stored_bytes"]

_VECTORS = (  # narrowest first: (union type, object class, numpy dtype)
    (fb.SparseIndexVector.Uint8Vector, fb.Uint8VectorT, np.uint8),
    (fb.SparseIndexVector.Uint16Vector, fb.Uint16VectorT, np.uint16),
    (fb.SparseIndexVector.Int32Vector, fb.Int32VectorT, np.int32),
)


def _index_vector(values: np.ndarray):
    top = int(values.max()) if values.size else 0
    for kind, cls, dt in _VECTORS:
        if top <= np.iinfo(dt).max:
            v = cls()
            v.values = np.ascontiguousarray(values, dt)      # packed with CreateNumpyVector
            return kind, v, np.dtype(dt).itemsize
    raise ConfigError(f"sparse index {top} does not fit int32")


def encode(dense: np.ndarray, block: int = 1, sparse_from: int | None = None
           ) -> tuple[np.ndarray, fb.SparsityParametersT]:
    """``(values, sparsity)`` of ``dense``: dimensions before ``sparse_from`` dense, the rest
    compressed (CSR, nested), the last one in blocks of ``block`` consecutive elements (1:
    element-wise; a block with any nonzero is stored whole).  ``sparse_from=None`` picks the
    split that stores the fewest bytes (an OHWI filter with one input channel compresses over
    its spatial dims, a linear weight over its rows).  ``values`` keeps ``dense``'s dtype."""
    dense = np.asarray(dense)
    if dense.ndim < 2:
        raise ConfigError(f"a sparse tensor needs at least 2 dimensions, got shape {dense.shape}")
    if sparse_from is None:
        options = [encode(dense, block, k) for k in range(1, dense.ndim)]
        return min(options, key=lambda o: stored_bytes(*o))
    n, last = dense.ndim, dense.shape[-1]
    if block < 1 or last % block:
        raise ConfigError(f"sparse block {block} does not divide the last dimension {last}")
    if not 0 <= sparse_from < n:
        raise ConfigError(f"sparse_from {sparse_from} is not a dimension of a rank-{n} tensor")
    blocks = dense.reshape(dense.shape[:-1] + (last // block, block))
    keep = blocks.any(axis=-1)                       # one flag per block, shape S
    shape = keep.shape
    values = blocks[keep].reshape(-1)
    dims = []
    for d in shape[:sparse_from]:
        m = fb.DimensionMetadataT()
        m.format, m.denseSize = fb.DimensionType.DENSE, int(d)
        dims.append(m)
    parents = np.ones(int(np.prod(shape[:sparse_from], dtype=np.int64)), bool)   # every dense prefix
    for level in range(sparse_from, n):
        alive = keep.reshape(shape[:level + 1] + (-1,)).any(axis=-1).reshape(-1, shape[level])[parents]
        m = fb.DimensionMetadataT()
        m.format = fb.DimensionType.SPARSE_CSR
        segments = np.concatenate([[0], np.cumsum(alive.sum(axis=1))]).astype(np.int64)
        m.arraySegmentsType, m.arraySegments, _ = _index_vector(segments)
        m.arrayIndicesType, m.arrayIndices, _ = _index_vector(np.nonzero(alive)[1].astype(np.int64))
        dims.append(m)
        parents = keep.reshape(shape[:level + 1] + (-1,)).any(axis=-1).reshape(-1)   # the next level's nodes
    if block > 1:
        m = fb.DimensionMetadataT()
        m.format, m.denseSize = fb.DimensionType.DENSE, int(block)
        dims.append(m)
    sp = fb.SparsityParametersT()
    sp.traversalOrder = list(range(n + (block > 1)))
    sp.blockMap = [n - 1] if block > 1 else None
    sp.dimMetadata = dims
    return values, sp


def stored_bytes(values: np.ndarray, sp: fb.SparsityParametersT, itemsize: float | None = None) -> int:
    """Bytes of the stored values plus the index arrays (the weight's share of the file)."""
    item = values.dtype.itemsize if itemsize is None else itemsize
    total = int(np.ceil(values.size * item))
    for m in sp.dimMetadata or []:
        if m.format == fb.DimensionType.SPARSE_CSR:
            for vec in (m.arraySegments, m.arrayIndices):
                total += len(vec.values) * _itemsize(vec)
    return total


def _itemsize(vec) -> int:
    for _, cls, dt in _VECTORS:
        if isinstance(vec, cls):
            return np.dtype(dt).itemsize
    raise ArtifactError("unknown sparse index vector type")


def densify(values: np.ndarray, sp, shape: tuple[int, ...]) -> np.ndarray:
    """The dense tensor of ``shape`` that ``values`` and the sparsity parameters ``sp`` describe."""
    shape = tuple(int(d) for d in shape)
    n = len(shape)
    order = [int(i) for i in (sp.traversalOrder if sp.traversalOrder is not None else [])]
    block_map = [int(i) for i in (sp.blockMap if sp.blockMap is not None else [])]
    meta = list(sp.dimMetadata or [])
    total = n + len(block_map)
    if sorted(order) != list(range(total)) or len(meta) != total:
        raise ArtifactError(f"sparse tensor: traversal order {order} is not a permutation of {total} dimensions "
                            f"with {len(meta)} metadata entries")
    if any(not 0 <= b < n for b in block_map) or len(set(block_map)) != len(block_map):
        raise ArtifactError(f"sparse tensor: block map {block_map} names dimensions outside rank {n}")
    # size of each expanded dimension: outer dims of blocked ones are shape / block
    sizes = list(shape) + [0] * len(block_map)
    for j, b in enumerate(block_map):
        m = meta[order.index(n + j)]
        if m.format != fb.DimensionType.DENSE or m.denseSize <= 0 or shape[b] % m.denseSize:
            raise ArtifactError(f"sparse tensor: block dimension {n + j} must be dense and divide {shape[b]}")
        sizes[n + j] = int(m.denseSize)
        sizes[b] = shape[b] // int(m.denseSize)
    nodes = np.zeros(1, np.int64)                    # node ids at the current level
    coords = np.zeros((total, 1), np.int64)          # coordinate of each node per expanded dim
    for level, dim in enumerate(order):
        m = meta[level]
        if m.format == fb.DimensionType.DENSE:
            size = int(m.denseSize)
            if size != sizes[dim]:
                raise ArtifactError(f"sparse tensor: dense size {size} of dimension {dim} is not {sizes[dim]}")
            child = (nodes[:, None] * size + np.arange(size)).reshape(-1)
            coords = np.repeat(coords, size, axis=1)
            coords[dim] = np.tile(np.arange(size), nodes.size)
        elif m.format == fb.DimensionType.SPARSE_CSR:
            seg = np.asarray(m.arraySegments.values if m.arraySegments is not None else [], np.int64)
            idx = np.asarray(m.arrayIndices.values if m.arrayIndices is not None else [], np.int64)
            count = int(nodes.max()) + 1 if nodes.size else 0
            if seg.size < count + 1 or seg[0] != 0 or np.any(np.diff(seg) < 0) or seg[count] > idx.size \
                    or (idx.size and (idx.min() < 0 or idx.max() >= sizes[dim])):
                raise ArtifactError(f"sparse tensor: CSR arrays of dimension {dim} are inconsistent (segments "
                                    f"must rise from 0 to at most {idx.size}, indices lie in [0, {sizes[dim]}))")
            starts, ends = seg[nodes], seg[nodes + 1]
            lengths = ends - starts
            child = np.repeat(starts - np.concatenate([[0], np.cumsum(lengths)[:-1]]), lengths) + \
                np.arange(int(lengths.sum()))
            coords = np.repeat(coords, lengths, axis=1)
            coords[dim] = idx[child]
        else:
            raise ArtifactError(f"sparse tensor: unknown dimension format {m.format}")
        nodes = child
    values = np.asarray(values).reshape(-1)
    if nodes.size > values.size:
        raise ArtifactError(f"sparse tensor: the metadata addresses {nodes.size} values, the buffer holds "
                            f"{values.size}")
    full = coords[:n].copy()
    for j, b in enumerate(block_map):
        full[b] = full[b] * sizes[n + j] + coords[n + j]
    out = np.zeros(shape, values.dtype)
    out[tuple(full)] = values[nodes]
    return out
