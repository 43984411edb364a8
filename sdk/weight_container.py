"""What the artifact's coded-weight containers share: framing, bounds-checked reading, expansion.

A weight container (``weights.dc`` of :mod:`sdk.huffman`, ``weights.zr`` of
:mod:`sdk.zero_run`) holds some int8 weight tensors of a LiteRT model file, coded,
and expands back into that exact file.  The formats differ only in how one tensor's
values are coded; the rest is common and lives here:

* **Framing.**  ``magic`` (4 bytes), ``<HHQ`` format version, tensor count, size of
  the model the container expands into, then its sha256 (32 bytes) and the tensor
  records.  Each record starts with ``<H`` name length, the UTF-8 name, ``<QB``
  byte offset in the model and number of dimensions, ``<I`` per dimension; the
  format's own fields follow (:attr:`ContainerFormat.read_body`).  The tensors' byte
  ranges lie inside the model and do not overlap.
* **Expansion.**  A device holds the container and either the complete model file
  (each decoded tensor must equal the bytes at its offset) or its *skeleton*, the file
  without the coded byte ranges (the decoded tensors are inserted).  Either way the
  result must have the recorded size and sha256.
* **Where the weights are** in a LiteRT file: :func:`int8_weights`.

Every malformed field is an :class:`~sdk.errors.ArtifactError` naming the container
and the field; nothing in a container is executed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import struct
from typing import Any, Callable, Sequence

import numpy as np

from .errors import ArtifactError, ConfigError

#: most dimensions and elements a container tensor may declare, and the largest model it may expand into
MAX_DIMS = 8
MAX_ELEMENTS = 1 << 31
MAX_MODEL_BYTES = 1 << 31       # sdk.schema.MAX_FILE_BYTES


class Cursor:
    """Bounds-checked reading of one container's bytes: every overrun is an ArtifactError naming the field."""

    def __init__(self, data: bytes, container: str):
        self.data, self.pos, self.container = bytes(data), 0, container

    def take(self, n: int, what: str) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise ArtifactError(f"{self.container} is damaged: it ends inside {what}")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def unpack(self, fmt: str, what: str):
        return struct.unpack("<" + fmt, self.take(struct.calcsize("<" + fmt), what))


def tensor_head(name: str, offset: int, shape: Sequence[int]) -> bytes:
    """The common start of a tensor record: name, offset in the model, shape."""
    raw = name.encode()
    return struct.pack("<H", len(raw)) + raw + struct.pack(f"<QB{len(shape)}I", offset, len(shape), *shape)


@dataclasses.dataclass(frozen=True)
class ContainerFormat:
    """One container format: its file name, what messages call it, magic and version, and ``read_body(cursor, at, name,
    offset, shape)``, which reads the rest of a tensor record (the format's fields) and returns
    the tensor — an object with ``name``, ``offset``, ``count`` (elements, one byte each in the
    model), ``values()`` (the decoded int8 array, :class:`ArtifactError` when the streams are
    damaged) and ``to_bytes()`` (its record, starting with :func:`tensor_head`)."""

    file: str
    title: str                  # what error messages call it ("weight container", "zero-run container")
    magic: bytes
    version: int
    read_body: Callable[[Cursor, str, str, int, tuple[int, ...]], Any]

    def check_ranges(self, tensors: Sequence[Any], size: int, error: type) -> None:
        end = 0
        for t in sorted(tensors, key=lambda t: t.offset):
            if t.offset < end or t.offset + t.count > size:
                raise error(f"{self.file}: tensor {t.name!r} (bytes {t.offset}..{t.offset + t.count}) overlaps "
                            f"another or lies outside the {size}-byte model")
            end = t.offset + t.count

    def write(self, tensors: Sequence[Any], model: bytes) -> bytes:
        """The container bytes of ``tensors``, which expand into ``model`` (its size and sha256 are
        recorded; :class:`ConfigError` when the tensors' byte ranges overlap or leave the model)."""
        self.check_ranges(tensors, len(model), ConfigError)
        head = self.magic + struct.pack("<HHQ", self.version, len(tensors), len(model))
        return head + hashlib.sha256(model).digest() + b"".join(t.to_bytes() for t in tensors)

    def read(self, data: bytes) -> tuple[int, bytes, list[Any]]:
        """``(model size, model sha256, tensors)`` of the container bytes ``data``, every field
        checked; the streams are decoded (and checked) by each tensor's ``values()``."""
        c = Cursor(data, self.file)
        magic = c.take(4, "the magic")
        if magic != self.magic:
            raise ArtifactError(f"{self.file} is not an edgepack {self.title} (magic {magic!r}, "
                                f"expected {self.magic!r})")
        version, n, size = c.unpack("HHQ", "the header")
        if size > MAX_MODEL_BYTES:
            raise ArtifactError(f"{self.file} is damaged: it expands into a {size}-byte model, more than the "
                                f"{MAX_MODEL_BYTES} bytes an artifact file may hold")
        if version != self.version:
            raise ArtifactError(f"{self.file} has format version {version}; this edgepack reads version "
                                f"{self.version}")
        digest = c.take(32, "the model hash")
        tensors = []
        for i in range(n):
            at = f"tensor {i}"
            (name_len,) = c.unpack("H", f"{at} name")
            try:
                name = c.take(name_len, f"{at} name").decode()
            except UnicodeDecodeError:
                raise ArtifactError(f"{self.file} is damaged: {at} name is not UTF-8") from None
            offset, ndim = c.unpack("QB", f"{at} offset")
            if ndim > MAX_DIMS:
                raise ArtifactError(f"{self.file} is damaged: {at} ({name!r}) has {ndim} dimensions")
            shape = tuple(c.unpack(f"{ndim}I", f"{at} shape"))
            if math.prod(shape) > MAX_ELEMENTS:
                raise ArtifactError(f"{self.file} is damaged: {at} ({name!r}) has {math.prod(shape)} elements")
            tensors.append(self.read_body(c, at, name, offset, shape))
        if c.pos != len(c.data):
            raise ArtifactError(f"{self.file} is damaged: {len(c.data) - c.pos} bytes follow the last tensor")
        self.check_ranges(tensors, size, ArtifactError)
        return size, digest, tensors

    def values(self, t: Any) -> np.ndarray:
        """``t.values()``, its error naming the container and the tensor."""
        try:
            return t.values()
        except ArtifactError as exc:
            raise ArtifactError(f"{self.file} is damaged: tensor {t.name!r}: {exc}") from None

    def expand(self, data: bytes) -> dict[str, np.ndarray]:
        """``{tensor name: int8 array}`` of the container bytes ``data``."""
        return {t.name: self.values(t) for t in self.read(data)[2]}

    def skeleton(self, model: bytes, data: bytes) -> bytes:
        """``model`` without the byte ranges of the container ``data``'s tensors: what a device
        needs besides the container to rebuild it (:meth:`expand_model`)."""
        size, _, tensors = self.read(data)
        if len(model) != size:
            raise ArtifactError(f"{self.file} expands into a {size}-byte model, not this {len(model)}-byte one")
        keep, at = [], 0
        for t in sorted(tensors, key=lambda t: t.offset):
            keep.append(model[at:t.offset])
            at = t.offset + t.count
        return b"".join(keep) + model[at:]

    def expand_model(self, model: bytes, data: bytes, *, complete: bool = False) -> bytes:
        """The model file the container ``data`` belongs to, with its tensors decoded into it.

        ``model`` is the complete file (each decoded tensor must equal the bytes at its
        offset) or, unless ``complete``, its :meth:`skeleton` (the decoded tensors are
        inserted).  The result must have the size and sha256 the container records.
        :class:`ArtifactError` otherwise, or when the container is damaged.  The sizes are
        checked before anything is decoded, and a skeleton is expanded into one buffer of
        the recorded size (at most :data:`MAX_MODEL_BYTES`).
        """
        size, digest, tensors = self.read(data)
        tensors = sorted(tensors, key=lambda t: t.offset)
        coded = sum(t.count for t in tensors)
        model = bytes(model)
        if len(model) != size and (complete or len(model) != size - coded):
            raise ArtifactError(f"{self.file} expands into a {size}-byte model; got {len(model)} bytes, "
                                + ("not that model" if complete else
                                   f"neither that model nor its skeleton ({size - coded} bytes)"))
        full = len(model) == size
        result = model if full else bytearray(size)
        at, shift = 0, 0                # skeleton: read up to `at`; `shift` coded bytes inserted so far
        for t in tensors:
            values = self.values(t).reshape(-1).view(np.uint8)
            if full:
                if memoryview(model)[t.offset:t.offset + t.count] != memoryview(values):
                    raise ArtifactError(f"{self.file} does not expand into the model: tensor {t.name!r} decodes "
                                        "to other weights than the model holds")
            else:
                cut = t.offset - shift      # where the tensor was cut out of the skeleton
                result[at + shift:t.offset] = model[at:cut]
                result[t.offset:t.offset + t.count] = values.tobytes()
                at, shift = cut, shift + t.count
        if not full:
            result[at + shift:] = model[at:]
            result = bytes(result)
        if hashlib.sha256(result).digest() != digest:
            raise ArtifactError(f"{self.file} does not expand into the model it was written for (sha256 differs)")
        return result


# ---------------------------------------------------------------------------
# where a LiteRT file keeps its int8 weights
# ---------------------------------------------------------------------------

def int8_weights(model: bytes) -> dict[str, tuple[str, int, tuple[int, ...], list[float], str]]:
    """``{weight input name of each conv / fully connected op: (name of the int8 tensor holding
    the data, byte offset in the file, its shape, scales, op)}`` (through a DENSIFY when stored
    sparse: the data is then the values vector)."""
    from ai_edge_litert import schema_py_generated as fb

    from .litert.flatbuffer import op_name, read_model

    m = read_model(model)
    root = fb.Model.GetRootAs(model, 0)
    sg = m.subgraphs[0]
    producer = {o: op for op in sg.operators for o in op.outputs}
    found = {}
    for op in sg.operators:
        kind = op_name(m, op)
        if kind not in ("FULLY_CONNECTED", "CONV_2D", "DEPTHWISE_CONV_2D") or len(op.inputs) < 2:
            continue
        consumer = idx = op.inputs[1]
        if not _has_data(m, sg.tensors[idx]) and idx in producer and op_name(m, producer[idx]) == "DENSIFY":
            idx = producer[idx].inputs[0]
        t = sg.tensors[idx]
        if t.type != fb.TensorType.INT8 or not _has_data(m, t):
            continue
        buf = root.Buffers(t.buffer)
        field = buf._tab.Offset(4)          # Buffer.data, the table's first field
        start, size = buf._tab.Vector(field), buf._tab.VectorLen(field)
        if model[start:start + size] != bytes(m.buffers[t.buffer].data):
            continue
        q = t.quantization if t.quantization is not None and t.quantization.scale is not None else \
            sg.tensors[consumer].quantization
        scales = [float(s) for s in q.scale] if q is not None and q.scale is not None else [1.0]
        shape = tuple(int(d) for d in t.shape) if t.sparsity is None else (size,)
        found[sg.tensors[consumer].name.decode()] = (t.name.decode(), start, shape, scales, kind)
    return found


def coded_layers(package, wanted, model_file: str = "model.tflite"):
    """``(layer, tensor name, byte offset, int8 values, scales, op)`` for each layer of ``package``
    whose weight constant is in ``wanted`` and which ``model_file`` stores as int8 (:func:`int8_weights`;
    weights stored otherwise — float, INT4 — are left out); ``layer`` is its module name."""
    model = package.files[model_file]
    stored = int8_weights(model)
    for layer in package.layers:
        found = stored.get(f"{layer.get('name')}/weight") if layer.get("weight") in wanted else None
        if found is None:
            continue
        name, offset, shape, scales, op = found
        values = np.frombuffer(model, np.int8, count=math.prod(shape), offset=offset).reshape(shape)
        yield layer.get("module") or layer["name"], name, offset, values, scales, op


def _has_data(m, t) -> bool:
    data = m.buffers[t.buffer].data if 0 <= t.buffer < len(m.buffers) else None
    return data is not None and len(data) > 0
