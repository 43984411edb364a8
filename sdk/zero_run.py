"""Zero-run coding of sparse int8 weights with base-encoded values, and the ``weights.zr`` container.

The ``zero-run`` quantizer (:mod:`plugins.quantize.zero_run`) puts each pruned
layer's nonzero weights on a few levels; this module is how those int8 weights
travel: each nonzero stored as a small *value field*, the zeros between them as
*run fields*, both bit-packed.  Pure numpy; nothing in a container is executed.

**Value fields (base encoding).**  A tensor's nonzero int8 codes ``v`` are
stored relative to its *base* ``b`` — the smallest nonzero magnitude ``|v|``
in the tensor — as ``value_bits`` bits: a sign bit (1: negative), then
``|v| − b`` in ``value_bits − 1`` bits, where ``value_bits − 1 =
ceil(log2(max|v| − b + 1))`` (0 when every magnitude is ``b``).  The zero is
not a value: it is coded by the runs, so ``2^value_bits`` nonzero levels cost
``value_bits`` bits each.  The quantizer picks the levels ``±b … ±(b + 2^(bits−1) − 1)``
(``value_bits = bits``).

**Run fields (zero-run encoding).**  Before each nonzero, the zeros since the
previous one (its *run* ``z``) are written as ``run_bits``-bit fields with
escape value ``R = 2^run_bits − 1``: a field ``< R`` ends the run with that
many zeros; a field ``= R`` stands for ``R`` zeros and the run goes on in the
next field.  A run of ``z`` zeros costs ``floor(z / R) + 1`` fields; zeros
after the last nonzero are implied by the shape.  ``run_bits = 1`` is a
bitmap of the tensor up to its last nonzero.  The run fields and the value
fields are two streams, each packed most significant bit first and padded with
zero bits to a whole byte, so the stream of ``n`` nonzeros with runs ``z_i``
holds exactly (:func:`stream_bits`)::

    n · value_bits  +  run_bits · (n + Σ_i floor(z_i / (2^run_bits − 1)))   bits

:func:`encode_tensor` takes, unless told, the ``run_bits`` (1..16) that makes
this the smallest (the narrower on a tie).

**The container** ``weights.zr`` (little-endian, version 1)::

    magic      4 bytes   b"EPZR"
    version    u16       1
    n_tensors  u16
    model_size u64       bytes of the model file the tensors expand into
    model_hash 32 bytes  its sha256
    n_tensors times:
      name        u16 length + UTF-8    the model's tensor name ("linear/weight")
      offset      u64                   where the tensor's int8 bytes lie in the model file
      shape       u8 ndim + u32 × ndim  element count = byte count (int8)
      base        u8                    1..128, the smallest nonzero magnitude
      value_bits  u8                    1..8
      run_bits    u8                    1..16
      nonzeros    u32
      run_fields  u32                   run fields, escapes included
      runs        u32 bytes + run stream     (ceil(run_fields · run_bits / 8) bytes)
      values      u32 bytes + value stream   (ceil(nonzeros · value_bits / 8) bytes)

Nothing else follows.  :func:`read_container` checks every field, length and
padding bit and refuses (:class:`~sdk.errors.ArtifactError`) anything
:func:`write_container` would not write: a value field out of int8 range, a
base or width that is not the tensor's smallest, a run stream that ends in an
escape or runs past the tensor.  :func:`expand_model` writes the decoded
tensors into a model file (complete: they must equal its bytes; or its
:func:`skeleton`: they are inserted) and checks the sha256.  The LiteRT
runners load ``model.tflite`` through :func:`expand_artifact_model` when the
manifest's ``weight_container`` entry names this format
(:func:`attach_container` writes both; :func:`check_entry` is the entry's
schema, which :func:`sdk.schema.check_manifest` applies).

>>> flat = np.array([0, 0, 5, 0, 0, 0, 0, -7, 6], np.int8)
>>> base_and_width(flat), run_fields(flat, 2).tolist()       # runs 2, 4 (= 3 + 1), 0
((5, 3), [2, 3, 1, 0])
>>> t = encode_tensor(flat, "w", run_bits=2)
>>> stream_bits(flat, 2, 3), t.run_stream.hex(), t.value_stream.hex(), t.values().tolist()
(17, 'b4', '1880', [0, 0, 5, 0, 0, 0, 0, -7, 6])
"""

from __future__ import annotations

import dataclasses
import math
import struct
from typing import Sequence

import numpy as np

from .errors import ArtifactError, ConfigError
from .weight_container import ContainerFormat, coded_layers, tensor_head

__all__ = ["CONTAINER", "FORMAT", "RUN_BITS", "VERSION", "ZeroRunTensor", "attach_container", "base_and_width",
           "check_entry", "encode_tensor", "expand", "expand_artifact_model", "expand_model", "pack_fields",
           "read_container", "run_fields", "skeleton", "stream_bits", "unpack_fields", "write_container"]

#: the container's file name in an artifact, its format name (manifest) and version
CONTAINER = "weights.zr"
FORMAT = "edgepack-zr"
VERSION = 1
MAGIC = b"EPZR"
#: the run field widths the container may use
RUN_BITS = range(1, 17)
#: the manifest entry that describes the container (shared with weights.dc: an artifact has one)
MANIFEST_KEY = "weight_container"


# ---------------------------------------------------------------------------
# the stream
# ---------------------------------------------------------------------------

def pack_fields(fields: np.ndarray, bits: int) -> bytes:
    """``fields`` (non-negative integers below ``2^bits``) as ``bits``-bit fields, most
    significant bit first, padded with zero bits to a whole byte.

    >>> pack_fields(np.array([1, 2, 3]), 3).hex()              # 001 010 011 (0000000)
    '2980'
    """
    fields = np.asarray(fields, np.int64).reshape(-1)
    if bits == 0 or fields.size == 0:
        return b""
    shifts = np.arange(bits - 1, -1, -1, dtype=np.int64)
    return np.packbits(((fields[:, None] >> shifts) & 1).astype(np.uint8).reshape(-1)).tobytes()


def unpack_fields(data: bytes, count: int, bits: int, what: str = "stream") -> np.ndarray:
    """The ``count`` ``bits``-bit fields of :func:`pack_fields` output ``data`` (int64).
    Raises :class:`ArtifactError` unless ``data`` is exactly that many bytes with zero padding.

    >>> unpack_fields(bytes.fromhex("2980"), 3, 3).tolist()
    [1, 2, 3]
    """
    nbits = count * bits
    if len(data) != (nbits + 7) // 8:
        raise ArtifactError(f"the {what} holds {len(data)} bytes; {count} fields of {bits} bits take "
                            f"{(nbits + 7) // 8}")
    if nbits == 0:
        return np.zeros(count, np.int64)
    raw = np.unpackbits(np.frombuffer(data, np.uint8))
    if raw[nbits:].any():
        raise ArtifactError(f"the {what} has nonzero padding bits")
    shifts = np.arange(bits - 1, -1, -1, dtype=np.int64)
    return (raw[:nbits].reshape(count, bits).astype(np.int64) << shifts).sum(axis=1)


def base_and_width(values: np.ndarray) -> tuple[int, int]:
    """``(base, value_bits)`` of the nonzero int8 ``values``: the smallest nonzero magnitude,
    and a sign bit plus the bits of ``max|v| − base`` (``(1, 1)`` when all are zero).

    >>> base_and_width(np.array([0, 3, -5, 10], np.int8))       # offsets 0..7: 3 bits + sign
    (3, 4)
    """
    mags = np.abs(np.asarray(values, np.int64).reshape(-1))
    mags = mags[mags != 0]
    if mags.size == 0:
        return 1, 1
    base = int(mags.min())
    return base, 1 + math.ceil(math.log2(int(mags.max()) - base + 1))


def _gaps(flat: np.ndarray) -> np.ndarray:
    pos = np.flatnonzero(flat)
    return np.diff(pos, prepend=-1) - 1


def run_fields(values: np.ndarray, run_bits: int) -> np.ndarray:
    """The run fields of ``values`` (flattened in C order): before each nonzero, ``floor(z / R)``
    escapes ``R = 2^run_bits − 1`` and the rest of its run ``z`` (see the module docstring)."""
    span = (1 << run_bits) - 1
    gaps = _gaps(np.asarray(values).reshape(-1))
    escapes = gaps // span
    ends = np.cumsum(escapes + 1) - 1                   # where each nonzero's terminating field lands
    out = np.full(int(ends[-1]) + 1 if ends.size else 0, span, np.int64)
    out[ends] = gaps - escapes * span
    return out


def stream_bits(values: np.ndarray, run_bits: int, value_bits: int) -> int:
    """Bits of the two streams of ``values`` before byte padding:
    ``n · value_bits + run_bits · (n + Σ floor(z_i / (2^run_bits − 1)))``.

    >>> stream_bits(np.array([0] * 10 + [1], np.int8), 2, 1)    # 10 zeros: 3 escapes + 1, a 1-bit value
    9
    """
    gaps = _gaps(np.asarray(values).reshape(-1))
    return int(gaps.size * value_bits + run_bits * (gaps.size + (gaps // ((1 << run_bits) - 1)).sum()))


@dataclasses.dataclass(frozen=True)
class ZeroRunTensor:
    """One int8 tensor of the container: where it goes, its base and widths, its two streams."""

    name: str
    offset: int
    shape: tuple[int, ...]
    base: int
    value_bits: int
    run_bits: int
    nonzeros: int
    run_count: int                  # run fields, escapes included
    run_stream: bytes
    value_stream: bytes

    @property
    def count(self) -> int:
        return math.prod(self.shape)

    @property
    def stream_bytes(self) -> int:
        """Bytes of the two streams (the coded weights without the tensor's header)."""
        return len(self.run_stream) + len(self.value_stream)

    def values(self) -> np.ndarray:
        """The tensor (int8, ``shape``), decoded; :class:`ArtifactError` for streams that
        :func:`encode_tensor` would not write."""
        runs = unpack_fields(self.run_stream, self.run_count, self.run_bits, "run stream")
        fields = unpack_fields(self.value_stream, self.nonzeros, self.value_bits, "value stream")
        span = (1 << self.run_bits) - 1
        ends = np.flatnonzero(runs < span)
        if ends.size != self.nonzeros or (runs.size and runs[-1] == span):
            raise ArtifactError(f"the run stream ends {ends.size} runs for {self.nonzeros} nonzeros"
                                + (" and ends in an escape" if runs.size and runs[-1] == span else ""))
        pos = np.cumsum(runs)[ends] + np.arange(ends.size)      # zeros so far + nonzeros before
        if pos.size and pos[-1] >= self.count:
            raise ArtifactError(f"the runs reach element {int(pos[-1])} of a {self.count}-element tensor")
        mag_bits = self.value_bits - 1
        mags = (fields & ((1 << mag_bits) - 1)) + self.base
        negative = (fields >> mag_bits) == 1
        if mags.size and (int(mags.min()) != self.base or base_and_width(mags)[1] != self.value_bits):
            raise ArtifactError(f"the values do not have base {self.base} and width {self.value_bits}")
        if np.any(mags > np.where(negative, 128, 127)):
            raise ArtifactError("a value field lies outside int8")
        flat = np.zeros(self.count, np.int8)
        flat[pos] = np.where(negative, -mags, mags).astype(np.int8)
        return flat.reshape(self.shape)

    def to_bytes(self) -> bytes:
        """This tensor's record in the container (see the module docstring)."""
        return b"".join([
            tensor_head(self.name, self.offset, self.shape),
            struct.pack("<BBBII", self.base, self.value_bits, self.run_bits, self.nonzeros, self.run_count),
            struct.pack("<I", len(self.run_stream)), self.run_stream,
            struct.pack("<I", len(self.value_stream)), self.value_stream,
        ])


def encode_tensor(values: np.ndarray, name: str, offset: int = 0, run_bits: int | None = None) -> ZeroRunTensor:
    """Code the int8 tensor ``values``; ``run_bits=None`` takes the width (1..16) whose streams
    (:func:`stream_bits`) are the smallest, the narrower on a tie.

    >>> t = encode_tensor(np.array([[0, 3, 0, 0], [0, 0, -2, 3]], np.int8), "w")
    >>> t.base, t.value_bits, t.run_bits, t.values().tolist()
    (2, 2, 1, [[0, 3, 0, 0], [0, 0, -2, 3]])
    """
    values = np.asarray(values)
    if values.dtype != np.int8:
        raise ConfigError(f"the zero-run container holds int8 tensors, got {values.dtype}")
    if run_bits is not None and run_bits not in RUN_BITS:
        raise ConfigError(f"run_bits={run_bits!r} is out of range; allowed: 1..16")
    flat = values.reshape(-1)
    base, value_bits = base_and_width(flat)
    if run_bits is None:
        run_bits = min(RUN_BITS, key=lambda b: (stream_bits(flat, b, value_bits), b))
    nz = flat[flat != 0].astype(np.int64)
    mag_bits = value_bits - 1
    fields = ((nz < 0).astype(np.int64) << mag_bits) | (np.abs(nz) - base)
    runs = run_fields(flat, run_bits)
    return ZeroRunTensor(name, int(offset), tuple(int(d) for d in values.shape), base, value_bits, run_bits,
                         int(nz.size), int(runs.size), pack_fields(runs, run_bits), pack_fields(fields, value_bits))


# ---------------------------------------------------------------------------
# the container
# ---------------------------------------------------------------------------

def _read_body(c, at: str, name: str, offset: int, shape: tuple[int, ...]) -> ZeroRunTensor:
    """The zero-run fields of a tensor record (after :func:`sdk.weight_container.tensor_head`)."""
    count = math.prod(shape)
    base, value_bits, run_bits, nonzeros, run_count = c.unpack("BBBII", f"{at} widths")
    if not (1 <= base <= 128 and 1 <= value_bits <= 8 and run_bits in RUN_BITS
            and nonzeros <= count and nonzeros <= run_count <= count):
        raise ArtifactError(f"{CONTAINER} is damaged: {at} ({name!r}) has base {base}, value_bits "
                            f"{value_bits}, run_bits {run_bits}, {nonzeros} nonzeros and {run_count} run "
                            f"fields for {count} elements")
    if nonzeros == 0 and (base, value_bits) != (1, 1):
        raise ArtifactError(f"{CONTAINER} is damaged: {at} ({name!r}) has no nonzeros but base {base}")
    streams = []
    for what in ("run", "value"):
        (nbytes,) = c.unpack("I", f"{at} {what} stream")
        streams.append(c.take(nbytes, f"{at} {what} stream"))
    return ZeroRunTensor(name, offset, shape, base, value_bits, run_bits, nonzeros, run_count,
                         streams[0], streams[1])


_FORMAT = ContainerFormat(CONTAINER, "zero-run container", MAGIC, VERSION, _read_body)


def write_container(tensors: Sequence[ZeroRunTensor], model: bytes) -> bytes:
    """The ``weights.zr`` bytes of ``tensors``, which expand into ``model`` (its size and sha256
    are recorded; the tensors' byte ranges must lie inside it and not overlap)."""
    return _FORMAT.write(tensors, model)


def read_container(data: bytes) -> tuple[int, bytes, list[ZeroRunTensor]]:
    """``(model size, model sha256, tensors)`` of the ``weights.zr`` bytes ``data``, every header
    field checked (:class:`ArtifactError`); the streams are decoded (and checked) by
    :meth:`ZeroRunTensor.values`."""
    return _FORMAT.read(data)


def expand(data: bytes) -> dict[str, np.ndarray]:
    """``{tensor name: int8 array}`` of the ``weights.zr`` bytes ``data`` (:class:`ArtifactError`
    when it is damaged)."""
    return _FORMAT.expand(data)


def skeleton(model: bytes, data: bytes) -> bytes:
    """``model`` without the byte ranges of the container ``data``'s tensors: what a device
    needs besides ``weights.zr`` to rebuild it (:func:`expand_model`)."""
    return _FORMAT.skeleton(model, data)


def expand_model(model: bytes, data: bytes) -> bytes:
    """The model file the container ``data`` belongs to, with its tensors decoded into it:
    ``model`` is the complete file or its :func:`skeleton`
    (:meth:`sdk.weight_container.ContainerFormat.expand_model`).  :class:`ArtifactError`
    when it does not expand into the recorded size and sha256, or the container is damaged."""
    return _FORMAT.expand_model(model, data)


# ---------------------------------------------------------------------------
# the container in LiteRT artifacts
# ---------------------------------------------------------------------------

_ENTRY_KEYS = {"file", "format", "version", "into", "decoder", "expand", "tensors", "sizes"}
_TENSOR_KEYS = {"layer": str, "tensor": str, "offset": int, "bytes": int, "nonzeros": int, "base": int,
                "value_bits": int, "run_bits": int, "run_fields": int, "stream_bytes": int}
_SIZE_KEYS = ("int8", "streams", "zero_run", "skeleton")


def check_entry(entry, files) -> dict:
    """The manifest's ``weight_container`` entry of this format, checked field by field (its
    ``file`` and ``into`` must be files the manifest lists); :class:`ArtifactError` otherwise."""
    where = "manifest.json: weight_container"
    if not isinstance(entry, dict) or set(entry) != _ENTRY_KEYS:
        got = sorted(entry) if isinstance(entry, dict) else type(entry).__name__
        raise ArtifactError(f"{where}: expected the fields {sorted(_ENTRY_KEYS)}, got {got}")
    if type(entry["version"]) is not int or entry["version"] != VERSION:
        raise ArtifactError(f"{where}: version {entry['version']!r}; this edgepack reads {FORMAT} version {VERSION}")
    for key in ("file", "into", "decoder", "expand"):
        if not isinstance(entry[key], str):
            raise ArtifactError(f"{where}.{key}: expected a string, got {entry[key]!r}")
    if entry["file"] != CONTAINER or entry["into"] not in files or CONTAINER not in files:
        raise ArtifactError(f"{where}: file {entry['file']!r} / into {entry['into']!r} are not files the "
                            f"artifact lists ({CONTAINER} expanding into its model)")
    rows = entry["tensors"]
    if not isinstance(rows, list) or not 1 <= len(rows) <= 100_000:
        raise ArtifactError(f"{where}.tensors: expected 1 to 100000 rows")
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or set(row) != set(_TENSOR_KEYS) or not all(
                isinstance(row[k], t) and not isinstance(row[k], bool) and (t is str or row[k] >= 0)
                for k, t in _TENSOR_KEYS.items()):
            raise ArtifactError(f"{where}.tensors[{i}]: expected {sorted(_TENSOR_KEYS)} (strings and "
                                f"non-negative integers), got {row!r}")
    sizes = entry["sizes"]
    if not isinstance(sizes, dict) or set(sizes) != set(_SIZE_KEYS) or not all(
            isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in sizes.values()):
        raise ArtifactError(f"{where}.sizes: expected non-negative integers {list(_SIZE_KEYS)}, got {sizes!r}")
    return entry


def expand_artifact_model(artifact, name: str, data: bytes) -> bytes:
    """``data``, the artifact's file ``name``, after the artifact's ``weights.zr`` (manifest entry
    ``weight_container`` of this format) is decoded into it (:func:`expand_model`) when it
    belongs to ``name``: what the LiteRT runners load.  :class:`ArtifactError` for a malformed
    entry, a missing or damaged container, or one that does not expand into ``data``."""
    manifest = getattr(artifact, "manifest", None) or {}
    entry = check_entry(manifest.get(MANIFEST_KEY), manifest.get("files") or {})
    if entry["into"] != name:
        return data
    blob = artifact.read_bytes(entry["file"])
    have = [[t.name, t.offset, t.count, t.nonzeros, t.base, t.value_bits, t.run_bits, t.run_count, t.stream_bytes]
            for t in read_container(blob)[2]]
    said = [[r["tensor"], r["offset"], r["bytes"], r["nonzeros"], r["base"], r["value_bits"], r["run_bits"],
             r["run_fields"], r["stream_bytes"]] for r in entry["tensors"]]
    if have != said:
        raise ArtifactError(f"{CONTAINER} does not hold the tensors the manifest's weight_container lists "
                            "(names, offsets, widths or counts differ)")
    return _FORMAT.expand_model(data, blob, complete=True)


def attach_container(package, graph, plan, model_file: str = "model.tflite"):
    """``package`` (a :class:`sdk.contract.Package` holding ``model_file``) with ``weights.zr``
    added for the weights the plan's ``extra["zero_run"]`` names (the ``zero-run`` quantizer's):
    each such int8 tensor as ``model_file`` stores it (dense, or the values of a sparse one),
    coded by :func:`encode_tensor`, and the manifest entry ``weight_container``.  Weights
    stored otherwise (float, INT4) stay as they are; unchanged when nothing is coded.
    :class:`ConfigError` when the package carries another weight container already."""
    extra = getattr(plan, "extra", None) or {}
    wanted = (extra.get("zero_run") or {}).get("tensors") or {}
    if not wanted or model_file not in package.files:
        return package
    if MANIFEST_KEY in package.extra:
        raise ConfigError(f"zero-run: the artifact ships a {package.extra[MANIFEST_KEY].get('format')} weight "
                          f"container already; an artifact holds one (drop deep-compression or zero-run)")
    run_bits = extra["zero_run"].get("run_bits")
    model = package.files[model_file]
    coded = [(layer, encode_tensor(values, name, offset, run_bits))
             for layer, name, offset, values, _, _ in coded_layers(package, wanted, model_file)]
    if not coded:
        return package
    blob = write_container([t for _, t in coded], model)
    raw = sum(t.count for _, t in coded)
    entry = {
        "file": CONTAINER, "format": FORMAT, "version": VERSION, "into": model_file,
        "decoder": "sdk.zero_run.expand_model",
        "expand": f"decode each tensor of {CONTAINER} (int8, C order: zero runs and base-encoded values) into "
                  f"{model_file} at its offset: written over the complete file it must equal the bytes there; "
                  f"inserted into the skeleton (sdk.zero_run.skeleton: {model_file} without those bytes) it "
                  f"rebuilds the file, whose sha256 the container and files.{model_file} record",
        "tensors": [{"layer": layer, "tensor": t.name, "offset": t.offset, "bytes": t.count, "nonzeros": t.nonzeros,
                     "base": t.base, "value_bits": t.value_bits, "run_bits": t.run_bits, "run_fields": t.run_count,
                     "stream_bytes": t.stream_bytes} for layer, t in coded],
        "sizes": {"int8": raw, "streams": sum(t.stream_bytes for _, t in coded), "zero_run": len(blob),
                  "skeleton": len(model) - raw},
    }
    return dataclasses.replace(package, files={**package.files, CONTAINER: blob},
                               extra={**package.extra, MANIFEST_KEY: entry})
