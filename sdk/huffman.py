"""Canonical Huffman coding, and the Deep Compression weight container (``weights.dc``) built on it.

**Huffman codes.**  :func:`code_lengths` gives each symbol the length of its
code in an optimal prefix code for the symbol counts (Huffman 1952: merge the
two lightest subtrees until one is left; a symbol's length is its depth).
Lengths are limited to :data:`MAX_CODE_BITS` (16): where the optimal tree is
deeper, the counts are halved (rounding up) and the tree rebuilt until it fits
(zlib's approach; it binds only for symbols rarer than about 1 in 2^15).
The code itself is *canonical* (:func:`canonical_codes`): symbols sorted by
(length, symbol) take consecutive codes, each shifted left when the length
grows, so the lengths alone describe the code and are all a decoder stores.
:func:`encode` writes codes most significant bit first, padding the last byte
with zero bits; :func:`decode` reads them through a lookup table of
``2^max_length`` entries.  An optimal code's mean length ``L`` per symbol
satisfies ``H ≤ L < H + 1`` (``H`` the entropy of the counts).

**Relative sparse indices** (Han, Mao & Dally, "Deep Compression", ICLR 2016,
§2 and Fig. 2).  A weight tensor, flattened in C order, is stored as entries
``(gap, symbol)``: ``gap`` counts the zeros skipped since the previous entry,
in ``diff_bits`` bits (``0 ≤ gap ≤ 2^diff_bits − 1``), and ``symbol`` indexes
the layer's codebook (``1..K``; 0 is the zero).  A run of more zeros than a gap
holds is bridged by *filler* entries ``(2^diff_bits − 1, 0)``: skip the
largest gap and store an explicit zero (the paper's padding zero).  Zeros after
the last entry are implied by the shape.  The paper uses 8-bit gaps for
convolutions and 5-bit for fully connected layers (:func:`paper_diff_bits`);
the container picks, per tensor, the width whose Huffman-coded size is the
smallest (:func:`encode_tensor`).  Gaps and symbols are two Huffman streams.

**The container** ``weights.dc`` (little-endian, version 1)::

    magic      4 bytes   b"EPDC"
    version    u16       1
    n_tensors  u16
    model_size u64       bytes of the model file the tensors expand into
    model_hash 32 bytes  its sha256
    n_tensors times:
      name       u16 length + UTF-8     the model's tensor name ("linear/weight")
      offset     u64                    where the tensor's int8 bytes lie in the model file
      shape      u8 ndim + u32 × ndim   element count = byte count (int8)
      diff_bits  u8                     1..8
      codebook   u16 K + int8 × K       the distinct nonzero codes, ascending
      scales     u32 n + f32 × n        dequantization: centroid j = codebook[j] × scale (one
                                        scale, or the model's per output channel where the
                                        channels holding codes differ)
      entries    u32                    (gap, symbol) entries, fillers included
      lengths    u8 × (K + 1)           code length of symbols 0 (zero) .. K
                 u8 × 2^diff_bits       code length of gaps 0 .. 2^diff_bits − 1
      streams    u32 bytes + symbols stream, u32 bytes + gaps stream

Nothing else follows.  :func:`read_container` checks every field and length
and raises :class:`~sdk.errors.ArtifactError` for anything it would not have
written; nothing in the file is executed.  :func:`expand_model` writes the
decoded tensors into a model file — a complete one (each tensor must then be
the bytes already there) or its :func:`skeleton` (the model without those
bytes, what a device needs besides ``weights.dc``) — and checks the result
against ``model_hash``.  The LiteRT runners load ``model.tflite`` through
:func:`expand_artifact_model` when the manifest has a ``weight_container``
entry (:func:`sdk.weight_sharing.attach_container` writes both).

>>> lengths = code_lengths([5, 2, 1, 1])
>>> lengths.tolist(), [format(int(c), f"0{n}b") for c, n in zip(canonical_codes(lengths), lengths)]
([1, 2, 3, 3], ['0', '10', '110', '111'])
>>> data = encode(np.array([0, 1, 0, 3]), lengths)
>>> data.hex(), decode(data, lengths, 4).tolist()
('4e', [0, 1, 0, 3])
>>> codebook, gaps, symbols = relative_entries(np.array([0, 7] + [0] * 10 + [5], np.int8), diff_bits=3)
>>> codebook.tolist(), gaps.tolist(), symbols.tolist()     # 10 zeros before the 5: a filler and 2
([5, 7], [1, 7, 2], [2, 0, 1])
"""

from __future__ import annotations

import dataclasses
import heapq
import math
import struct
from typing import Sequence

import numpy as np

from .errors import ArtifactError, ConfigError
from .weight_container import ContainerFormat, tensor_head

__all__ = ["CONTAINER", "FORMAT", "MAX_CODE_BITS", "VERSION", "CodedTensor", "canonical_codes", "code_lengths",
           "decode", "encode", "encode_tensor", "expand", "expand_artifact_model", "expand_model", "fixed_width_bytes",
           "paper_diff_bits", "read_container", "relative_entries", "skeleton", "write_container"]

#: longest code :func:`code_lengths` makes and :func:`decode` accepts
MAX_CODE_BITS = 16
#: the container's file name in an artifact, its format name (manifest) and version
CONTAINER = "weights.dc"
FORMAT = "edgepack-dc"
VERSION = 1
MAGIC = b"EPDC"
#: the gap widths the container may use (the paper: 8 for convolutions, 5 for fully connected layers)
DIFF_BITS = range(1, 9)


# ---------------------------------------------------------------------------
# canonical Huffman codes
# ---------------------------------------------------------------------------

def code_lengths(counts: Sequence[int], limit: int = MAX_CODE_BITS) -> np.ndarray:
    """Huffman code length of each symbol for ``counts`` (0 for a symbol that never occurs;
    1 when only one does), at most ``limit`` bits.  Ties merge the earlier subtree first,
    so the result is deterministic.

    >>> code_lengths([1, 1, 2, 4, 0]).tolist()
    [3, 3, 2, 1, 0]
    """
    counts = np.asarray(counts, dtype=np.int64).reshape(-1)
    if counts.size and counts.min() < 0:
        raise ConfigError("Huffman counts must be non-negative")
    lengths = np.zeros(counts.size, np.uint8)
    used = np.flatnonzero(counts)
    if used.size == 1:
        lengths[used] = 1
    if used.size <= 1:
        return lengths
    if used.size > 1 << limit:
        raise ConfigError(f"{used.size} symbols do not fit codes of at most {limit} bits")
    weights = counts[used]
    while True:
        depth = _tree_depths(weights)
        if depth.max() <= limit:
            lengths[used] = depth
            return lengths
        weights = (weights + 1) // 2        # flatter counts, shallower tree; all ones is balanced


def _tree_depths(weights: np.ndarray) -> np.ndarray:
    """Depth of each leaf of the Huffman tree over ``weights`` (two or more)."""
    n = weights.size
    heap = [(int(w), i) for i, w in enumerate(weights)]
    heapq.heapify(heap)
    parent = [0] * (2 * n - 1)
    node = n
    while len(heap) > 1:
        w1, a = heapq.heappop(heap)
        w2, b = heapq.heappop(heap)
        parent[a] = parent[b] = node
        heapq.heappush(heap, (w1 + w2, node))
        node += 1
    depth = [0] * (2 * n - 1)
    for i in range(2 * n - 3, -1, -1):      # parents are numbered after their children
        depth[i] = depth[parent[i]] + 1
    return np.asarray(depth[:n], np.int64)


def canonical_codes(lengths: Sequence[int]) -> np.ndarray:
    """The canonical code of each symbol (0 where its length is 0), as integers whose
    ``lengths[s]`` low bits are the code, most significant first.

    Raises :class:`ArtifactError` for lengths no prefix code has (longer than
    :data:`MAX_CODE_BITS`, or a Kraft sum ``Σ 2^-l`` above 1).
    """
    lengths = np.asarray(lengths, dtype=np.int64).reshape(-1)
    if lengths.size and (lengths.min() < 0 or lengths.max() > MAX_CODE_BITS):
        raise ArtifactError(f"a Huffman code length is outside [0, {MAX_CODE_BITS}]")
    used = lengths > 0
    if int((np.int64(1) << (MAX_CODE_BITS - lengths[used])).sum()) > 1 << MAX_CODE_BITS:
        raise ArtifactError("the Huffman code lengths are over-subscribed (Kraft sum above 1)")
    codes = np.zeros(lengths.size, np.int64)
    code, prev = 0, 0
    for s in sorted(np.flatnonzero(used).tolist(), key=lambda s: (lengths[s], s)):
        code <<= int(lengths[s]) - prev
        codes[s] = code
        code += 1
        prev = int(lengths[s])
    return codes


def encode(symbols: np.ndarray, lengths: Sequence[int]) -> bytes:
    """The canonical codes of ``symbols`` one after another, most significant bit first, the
    last byte padded with zero bits.  Every symbol needs a code (a nonzero length)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    symbols = np.asarray(symbols, dtype=np.int64).reshape(-1)
    if symbols.size == 0:
        return b""
    if symbols.min() < 0 or symbols.max() >= lengths.size or not lengths[symbols].all():
        raise ConfigError("encode: a symbol has no Huffman code (its count was 0)")
    codes = canonical_codes(lengths)
    chunks = []
    for start in range(0, symbols.size, 1 << 16):   # bounded memory: one bit matrix per chunk
        s = symbols[start:start + (1 << 16)]
        n, c = lengths[s], codes[s]
        shift = n[:, None] - 1 - np.arange(int(n.max()))[None, :]
        bits = (c[:, None] >> np.maximum(shift, 0)) & 1
        chunks.append(bits[shift >= 0].astype(np.uint8))
    return np.packbits(np.concatenate(chunks)).tobytes()


def decode(data: bytes, lengths: Sequence[int], count: int) -> np.ndarray:
    """``count`` symbols from :func:`encode`'s ``data`` under the code ``lengths``.

    Raises :class:`ArtifactError` when a bit pattern is no code, the data ends
    early, or anything but the zero padding of the last byte follows.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    codes = canonical_codes(lengths)
    data = bytes(data)
    if count == 0:
        if data:
            raise ArtifactError("a Huffman stream of no symbols holds data")
        return np.zeros(0, np.int64)
    top = int(lengths.max()) if lengths.size else 0
    if top == 0:
        raise ArtifactError("a Huffman stream of symbols has no codes")
    shortest = int(lengths[lengths > 0].min())
    if count * shortest > 8 * len(data):    # every symbol takes its shortest code at least: refuse before allocating
        raise ArtifactError(f"Huffman stream: {count} symbols need more than the {8 * len(data)} bits it holds")
    lut_sym = np.full(1 << top, -1, np.int64)
    lut_len = np.zeros(1 << top, np.int64)
    for s in np.flatnonzero(lengths):
        span = top - int(lengths[s])
        lut_sym[codes[s] << span:(codes[s] + 1) << span] = s
        lut_len[codes[s] << span:(codes[s] + 1) << span] = lengths[s]
    syms, steps = lut_sym.tolist(), lut_len.tolist()
    padded = data + b"\0\0\0"
    total, drop = 8 * len(data), 24 - top
    out = [0] * count
    pos = 0
    for i in range(count):
        if pos >= total + 8:        # past the padding byte a symbol may start in: no code reads that far
            raise ArtifactError(f"Huffman stream: {count} symbols need more than the {total} bits it holds")
        b = pos >> 3
        word = (padded[b] << 16 | padded[b + 1] << 8 | padded[b + 2]) << (pos & 7)
        w = (word & 0xFFFFFF) >> drop
        s = syms[w]
        if s < 0:
            raise ArtifactError(f"Huffman stream: bits at {pos} are no code")
        pos += steps[w]
        out[i] = s
    if pos > total:
        raise ArtifactError(f"Huffman stream: {count} symbols need {pos} bits, it holds {total}")
    if total - pos >= 8 or (total > pos and data[-1] & ((1 << (total - pos)) - 1)):
        raise ArtifactError("Huffman stream: data follows the last symbol")
    return np.asarray(out, np.int64)


def coded_bits(counts: np.ndarray, lengths: np.ndarray) -> int:
    """Bits the symbols with these ``counts`` take under the code ``lengths``."""
    return int((np.asarray(counts, np.int64) * np.asarray(lengths, np.int64)[:len(counts)]).sum())


# ---------------------------------------------------------------------------
# relative sparse indices
# ---------------------------------------------------------------------------

def paper_diff_bits(op: str) -> int:
    """The gap width Deep Compression uses: 8 bits for convolutions, 5 for fully connected layers.

    >>> paper_diff_bits("CONV_2D"), paper_diff_bits("FULLY_CONNECTED")
    (8, 5)
    """
    return 8 if "CONV" in op.upper() else 5


def relative_entries(values: np.ndarray, diff_bits: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(codebook, gaps, symbols)`` of ``values`` (any shape, flattened in C order): the
    distinct nonzero values ascending, and per entry the zeros skipped before it and its
    symbol (``1 + `` its codebook index; ``0`` for a filler zero bridging a longer run)."""
    if diff_bits not in DIFF_BITS:
        raise ConfigError(f"diff_bits={diff_bits!r} is out of range; allowed: 1..8")
    flat = np.asarray(values).reshape(-1)
    pos = np.flatnonzero(flat)
    codebook, index = np.unique(flat[pos], return_inverse=True)
    span = 1 << diff_bits
    gaps = np.diff(pos, prepend=-1) - 1
    fillers = gaps // span
    ends = np.cumsum(fillers + 1) - 1                 # where each nonzero's own entry lands
    total = int(ends[-1]) + 1 if ends.size else 0
    out_gaps = np.full(total, span - 1, np.int64)
    out_syms = np.zeros(total, np.int64)
    out_gaps[ends] = gaps - fillers * span
    out_syms[ends] = index.reshape(-1) + 1
    return codebook, out_gaps, out_syms


def from_entries(codebook: np.ndarray, gaps: np.ndarray, symbols: np.ndarray, count: int) -> np.ndarray:
    """The flat tensor of ``count`` values that :func:`relative_entries` describes."""
    pos = np.cumsum(np.asarray(gaps, np.int64) + 1) - 1
    if pos.size and pos[-1] >= count:
        raise ArtifactError(f"the entries run past the tensor's {count} elements")
    flat = np.zeros(count, codebook.dtype)
    table = np.concatenate([np.zeros(1, codebook.dtype), codebook])
    flat[pos] = table[np.asarray(symbols, np.int64)]
    return flat


def fixed_width_bytes(values: np.ndarray, diff_bits: int, value_bits: int, codebook_bits: int = 0) -> int:
    """Bytes of ``values`` in the relative-index format with fixed-width fields: each entry
    ``diff_bits + value_bits`` bits, plus a codebook of ``codebook_bits`` per distinct
    nonzero value (the paper's accounting before Huffman coding).

    >>> fixed_width_bytes(np.array([0, 3, 0, 3, 1]), diff_bits=2, value_bits=32)   # 3 entries of 34 bits
    13
    """
    codebook, gaps, _ = relative_entries(values, diff_bits)
    return math.ceil((gaps.size * (diff_bits + value_bits) + codebook.size * codebook_bits) / 8)


# ---------------------------------------------------------------------------
# the container
# ---------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class CodedTensor:
    """One int8 tensor of the container: where it goes, its codebook and its two Huffman streams."""

    name: str
    offset: int
    shape: tuple[int, ...]
    diff_bits: int
    codebook: np.ndarray            # int8, the distinct nonzero codes ascending
    scales: np.ndarray              # float32: centroid j = codebook[j] * scale (per output channel if several)
    entries: int
    symbol_lengths: np.ndarray      # K + 1 code lengths (symbol 0: zero)
    gap_lengths: np.ndarray         # 2^diff_bits code lengths
    symbol_stream: bytes
    gap_stream: bytes

    @property
    def count(self) -> int:
        return math.prod(self.shape)

    def values(self) -> np.ndarray:
        """The tensor (int8, ``shape``), decoded."""
        symbols = decode(self.symbol_stream, self.symbol_lengths, self.entries)
        gaps = decode(self.gap_stream, self.gap_lengths, self.entries)
        return from_entries(self.codebook, gaps, symbols, self.count).reshape(self.shape)

    def centroids(self) -> np.ndarray:
        """The shared values the codes stand for (float32; per-tensor scale: one row)."""
        return (self.codebook.astype(np.float64)[None, :] * self.scales.astype(np.float64)[:, None]).astype(
            np.float32)

    def to_bytes(self) -> bytes:
        """This tensor's record in the container (see the module docstring)."""
        return b"".join([
            tensor_head(self.name, self.offset, self.shape),
            struct.pack("<BH", self.diff_bits, self.codebook.size), self.codebook.astype(np.int8).tobytes(),
            struct.pack("<I", self.scales.size), self.scales.astype("<f4").tobytes(),
            struct.pack("<I", self.entries),
            self.symbol_lengths.astype(np.uint8).tobytes(), self.gap_lengths.astype(np.uint8).tobytes(),
            struct.pack("<I", len(self.symbol_stream)), self.symbol_stream,
            struct.pack("<I", len(self.gap_stream)), self.gap_stream,
        ])


def encode_tensor(values: np.ndarray, name: str, offset: int = 0, scales: Sequence[float] = (1.0,),
                  diff_bits: int | None = None) -> CodedTensor:
    """Code the int8 tensor ``values``; ``diff_bits=None`` takes the gap width (1..8) whose
    coded size (streams and tables) is the smallest, the narrower on a tie.

    >>> t = encode_tensor(np.array([[0, 3, 0, 0], [0, 0, -2, 3]], np.int8), "w", diff_bits=3)
    >>> t.codebook.tolist(), t.entries, t.values().tolist()
    ([-2, 3], 3, [[0, 3, 0, 0], [0, 0, -2, 3]])
    """
    values = np.asarray(values)
    if values.dtype != np.int8:
        raise ConfigError(f"the weight container holds int8 tensors, got {values.dtype}")
    best = None
    for b in ([diff_bits] if diff_bits is not None else DIFF_BITS):
        codebook, gaps, symbols = relative_entries(values, b)
        sym_counts = np.bincount(symbols, minlength=codebook.size + 1)
        gap_counts = np.bincount(gaps, minlength=1 << b)
        sym_len, gap_len = code_lengths(sym_counts), code_lengths(gap_counts)
        size = coded_bits(sym_counts, sym_len) + coded_bits(gap_counts, gap_len) + 8 * (sym_len.size + gap_len.size)
        if best is None or size < best[0]:
            best = (size, b, codebook, gaps, symbols, sym_len, gap_len)
    _, b, codebook, gaps, symbols, sym_len, gap_len = best
    scales = np.asarray(scales, np.float32).reshape(-1)
    if scales.size > 1 and values.ndim and scales.size == values.shape[0]:
        # one scale when every channel holding a code has the same (a codebook's per-tensor scale, which
        # the model repeats per channel; an all-zero channel may carry any scale there)
        held = scales[np.any(values.reshape(values.shape[0], -1) != 0, axis=1)]
        if held.size and np.all(held == held[0]):
            scales = held[:1]
    return CodedTensor(name, int(offset), tuple(int(d) for d in values.shape), b, codebook.astype(np.int8), scales,
                       int(gaps.size), sym_len, gap_len, encode(symbols, sym_len), encode(gaps, gap_len))


def _read_body(c, at: str, name: str, offset: int, shape: tuple[int, ...]) -> CodedTensor:
    """The Deep Compression fields of a tensor record (after :func:`sdk.weight_container.tensor_head`)."""
    count = math.prod(shape)
    diff_bits, k = c.unpack("BH", f"{at} codebook size")
    if diff_bits not in DIFF_BITS or k > 255:
        raise ArtifactError(f"{CONTAINER} is damaged: {at} ({name!r}) has diff_bits {diff_bits}, {k} codes, "
                            f"{count} elements")
    codebook = np.frombuffer(c.take(k, f"{at} codebook"), np.int8).copy()
    if np.any(codebook == 0) or np.any(np.diff(codebook.astype(np.int64)) <= 0):
        raise ArtifactError(f"{CONTAINER} is damaged: {at} ({name!r}) codebook is not distinct nonzero "
                            "codes in ascending order")
    (n_scales,) = c.unpack("I", f"{at} scales")
    scales = np.frombuffer(c.take(4 * n_scales, f"{at} scales"), "<f4").astype(np.float32)
    if n_scales == 0 or not np.all(np.isfinite(scales) & (scales > 0)):
        raise ArtifactError(f"{CONTAINER} is damaged: {at} ({name!r}) scales are not finite and positive")
    (entries,) = c.unpack("I", f"{at} entries")
    if entries > count:
        raise ArtifactError(f"{CONTAINER} is damaged: {at} ({name!r}) has {entries} entries for {count} "
                            "elements")
    sym_len = np.frombuffer(c.take(k + 1, f"{at} code lengths"), np.uint8).astype(np.int64)
    gap_len = np.frombuffer(c.take(1 << diff_bits, f"{at} code lengths"), np.uint8).astype(np.int64)
    streams = []
    for what in ("symbol", "gap"):
        (nbytes,) = c.unpack("I", f"{at} {what} stream")
        streams.append(c.take(nbytes, f"{at} {what} stream"))
    return CodedTensor(name, offset, shape, diff_bits, codebook, scales, entries, sym_len, gap_len,
                       streams[0], streams[1])


_FORMAT = ContainerFormat(CONTAINER, "weight container", MAGIC, VERSION, _read_body)


def write_container(tensors: Sequence[CodedTensor], model: bytes) -> bytes:
    """The ``weights.dc`` bytes of ``tensors``, which expand into ``model`` (its size and sha256
    are recorded; the tensors' byte ranges must lie inside it and not overlap)."""
    return _FORMAT.write(tensors, model)


def read_container(data: bytes) -> tuple[int, bytes, list[CodedTensor]]:
    """``(model size, model sha256, tensors)`` of the ``weights.dc`` bytes ``data``, every field
    checked (:class:`ArtifactError` for anything :func:`write_container` would not write).
    The streams are decoded by :meth:`CodedTensor.values`."""
    return _FORMAT.read(data)


def expand(data: bytes) -> dict[str, np.ndarray]:
    """``{tensor name: int8 array}`` of the ``weights.dc`` bytes ``data`` (:class:`ArtifactError`
    when it is damaged)."""
    return _FORMAT.expand(data)


def skeleton(model: bytes, data: bytes) -> bytes:
    """``model`` without the byte ranges of the container ``data``'s tensors: what a device
    needs besides ``weights.dc`` to rebuild it (:func:`expand_model`)."""
    return _FORMAT.skeleton(model, data)


def expand_model(model: bytes, data: bytes) -> bytes:
    """The model file the container ``data`` belongs to, with its tensors decoded into it:
    ``model`` is the complete file or its :func:`skeleton`
    (:meth:`sdk.weight_container.ContainerFormat.expand_model`).  :class:`ArtifactError`
    when it does not expand into the recorded size and sha256, or the container is damaged."""
    return _FORMAT.expand_model(model, data)


def expand_artifact_model(artifact, name: str, data: bytes) -> bytes:
    """``data``, the artifact's file ``name``, after the artifact's weight container (manifest
    entry ``weight_container``), when it has one for ``name``, is decoded into it
    (:func:`expand_model`): what the LiteRT runners load.  :class:`ArtifactError` for a
    malformed entry, a missing or damaged container, or one that does not expand into ``data``."""
    entry = (getattr(artifact, "manifest", None) or {}).get("weight_container")
    if entry is None:
        return data
    if not (isinstance(entry, dict) and entry.get("format") == FORMAT and isinstance(entry.get("file"), str)
            and isinstance(entry.get("into"), str)):
        raise ArtifactError(f"manifest.json: weight_container is not an {FORMAT} entry (format, file, into)")
    if entry.get("version") != VERSION:
        raise ArtifactError(f"manifest.json: weight_container has version {entry.get('version')!r}; this edgepack "
                            f"reads version {VERSION}")
    if entry["into"] != name:
        return data
    return _FORMAT.expand_model(data, artifact.read_bytes(entry["file"]), complete=True)
