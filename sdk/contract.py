"""The artifact contract, typed in one place: what a target hands to ``deploy``
and what ``manifest.json`` and ``profile.json`` hold.

=====================  =========================================================
:class:`TensorSig`     one model input or output: name, shape, dtype, quantization, layout
:class:`Package`       what ``Target.pack`` returns: files, I/O signature, profile rows
:class:`ProfileRow`    one layer of ``profile.json`` ``layers``
:class:`EncodingRow`   one weight of ``manifest.json`` ``encodings`` (planned vs stored)
:class:`VerifyRules`   the pass criteria of ``Target.verify_rules`` / manifest ``verify``
:class:`Manifest`      the keys of ``manifest.json``
=====================  =========================================================

:mod:`sdk.schema` checks loaded files against these shapes; :mod:`sdk.base`
(plugins) and :mod:`sdk.artifact` (reading) both import from here and not
from each other.

>>> TensorSig.from_dict(TensorSig("x", (1, 3), "float32").to_dict()).shape
(1, 3)
"""

from __future__ import annotations

import dataclasses
from typing import Any, TypedDict

FORMAT = "edgepack-artifact"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
PROFILE = "profile.json"
GOLDEN = "golden.npz"


@dataclasses.dataclass
class TensorSig:
    """One model input or output as the artifact sees it."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    quantization: dict | None = None  # {"scale": [...], "zero_point": [...], "axis": int|None}
    layout: tuple[int, ...] | None = None   # stored dim i holds torch dim layout[i] (NHWC: 0, 2, 3, 1)
    stored_dtype: str | None = None         # dtype inside the packed model, when not ``dtype``

    def to_dict(self) -> dict:
        d = {"name": self.name, "shape": list(self.shape), "dtype": self.dtype, "quantization": self.quantization}
        if self.layout is not None:
            d["layout"] = list(self.layout)
        if self.stored_dtype is not None:
            d["stored_dtype"] = self.stored_dtype
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TensorSig":
        layout = d.get("layout")
        return cls(d["name"], tuple(d["shape"]), d["dtype"], d.get("quantization"),
                   tuple(layout) if layout is not None else None, d.get("stored_dtype"))


class ProfileRow(TypedDict, total=False):
    """One packed layer: ``name``, ``op``, shapes, ``params``, ``bytes`` (as stored), ``macs`` or
    ``bops``; targets add their own keys (``precision``, ``why_float``, ...)."""

    name: str
    op: str
    in_shape: list[int]
    out_shape: list[int]
    params: int
    bytes: int
    macs: int
    bops: int


class EncodingRow(TypedDict, total=False):
    """What the plan asked for one weight and how the target stores it (:func:`sdk.encoding.check_plan`)."""

    layer: str
    tensor: str
    planned: str
    bits: int
    stored_bits: int
    sparsity: dict


class VerifyRules(TypedDict, total=False):
    """Pass criteria (all optional): ``max_lsb`` (vs the reference runner), ``min_bit_exact_ratio``,
    ``max_ref_rel_err`` (float outputs vs the reference runner),
    ``min_sqnr_db``, ``max_rel_err``, ``min_top1_agreement`` (vs the float model); ``runners``:
    per-runner overrides."""

    max_lsb: float
    min_bit_exact_ratio: float
    min_sqnr_db: float
    max_rel_err: float
    max_ref_rel_err: float      # float outputs against the reference runner (relative to its largest output)
    min_top1_agreement: float
    runners: dict[str, dict[str, float]]


class Manifest(TypedDict, total=False):
    """``manifest.json``; targets may add their own entries (``Package.extra``)."""

    format: str
    format_version: int
    edgepack_version: str
    target: dict[str, Any]
    plugins: list[dict[str, str]]
    inputs: list[dict]
    outputs: list[dict]
    recipe: dict | None
    quantization: dict | None
    verify: VerifyRules
    encodings: list[EncodingRow]
    files: dict[str, dict[str, Any]]


@dataclasses.dataclass
class Package:
    """What a target's :meth:`Target.pack` returns: the files of the artifact
    and what the manifest should say about them."""

    files: dict[str, bytes]
    inputs: list[TensorSig]
    outputs: list[TensorSig]
    layers: list[ProfileRow]                 # per-layer profile rows
    extra: dict = dataclasses.field(default_factory=dict)  # target-specific manifest entries


