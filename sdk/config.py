"""Frozen configuration dataclasses that round-trip through plain dicts.

Every method, target and runner has a nested ``Config``: a frozen dataclass
deriving from :class:`Config`.  ``to_dict()`` adds a type tag
(``"<kind>.<name>"``) and a version so a recipe file or a manifest can name
it; ``from_dict()`` checks both and refuses unknown fields by name.

>>> from plugins.prune.magnitude import MagnitudePruner
>>> cfg = MagnitudePruner.Config(sparsity=0.5)
>>> MagnitudePruner.Config.from_dict(cfg.to_dict()) == cfg
True
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, ClassVar, Iterable

from .errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Config:
    """Base of every method/target configuration.

    Subclasses are ``@dataclasses.dataclass(frozen=True)`` classes whose fields
    all have defaults.  ``type_tag`` and ``version`` are filled in when the
    owning method class is defined (see :class:`sdk.base.Plugin`).
    """

    type_tag: ClassVar[str] = "config"
    version: ClassVar[int] = 1

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict form: ``{"type": tag, "version": n, <fields>}`` (tuples become lists)."""
        out: dict[str, Any] = {"type": self.type_tag, "version": self.version}
        for f in dataclasses.fields(self):
            out[f.name] = _plain(getattr(self, f.name))
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> "Config":
        """Inverse of :meth:`to_dict`.  ``type`` and ``version`` may be omitted
        (recipes written by hand); when present they must match."""
        data = dict(data or {})
        tag = data.pop("type", cls.type_tag)
        if tag != cls.type_tag:
            raise ConfigError(f"config of type {tag!r} given where {cls.type_tag!r} is expected")
        version = data.pop("version", cls.version)
        if not isinstance(version, int) or version > cls.version:
            raise ConfigError(
                f"{cls.type_tag} config version {version!r} is newer than this edgepack "
                f"understands ({cls.version}); upgrade edgepack"
            )
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(
                f"{cls.type_tag}: unknown field(s) {', '.join(unknown)}; "
                f"valid fields: {', '.join(sorted(names)) or '(none)'}"
            )
        hints = typing.get_type_hints(cls)
        kwargs = {k: _coerce(hints.get(k), v) for k, v in data.items()}
        return cls(**kwargs)

    def replace(self, **changes: Any) -> "Config":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)


def _plain(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _coerce(hint: Any, value: Any) -> Any:
    """YAML and JSON have no tuples: turn lists back into tuples where the field is one."""
    if isinstance(value, list) and hint is not None:
        origin = typing.get_origin(hint)
        if origin is tuple or tuple in typing.get_args(hint) or any(
            typing.get_origin(a) is tuple for a in typing.get_args(hint)
        ):
            return tuple(_coerce(None, v) for v in value)
    return value


# -- validation helpers used by configs' __post_init__ -------------------------

def check_choice(owner: str, field: str, value: Any, allowed: Iterable[Any]) -> None:
    """Raise :class:`ConfigError` unless ``value`` is one of ``allowed``."""
    allowed = tuple(allowed)
    if value not in allowed:
        raise ConfigError(
            f"{owner}: {field}={value!r} is not allowed; choose one of "
            + ", ".join(repr(a) for a in allowed)
        )


def check_range(owner: str, field: str, value: Any, lo: float | None = None,
                hi: float | None = None, *, lo_open: bool = False, hi_open: bool = False) -> None:
    """Raise :class:`ConfigError` unless ``lo <= value <= hi`` (open ends when asked)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if ok and lo is not None:
        ok = value > lo if lo_open else value >= lo
    if ok and hi is not None:
        ok = value < hi if hi_open else value <= hi
    if not ok:
        lb = "(" if lo_open else "["
        rb = ")" if hi_open else "]"
        raise ConfigError(
            f"{owner}: {field}={value!r} is out of range; allowed: "
            f"{lb}{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}{rb}"
        )


def check_int(owner: str, field: str, value: Any, lo: int | None = None, hi: int | None = None) -> None:
    """Raise :class:`ConfigError` unless ``value`` is an integer (not a bool) in ``[lo, hi]``."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise ConfigError(f"{owner}: {field}={value!r} must be an integer")
    check_range(owner, field, value, lo, hi)


def check_betas(owner: str, betas: Any) -> None:
    """Raise :class:`ConfigError` unless ``betas`` is two coefficients in [0, 1) (Adam's moment decays)."""
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ConfigError(f"{owner}: betas must be two numbers in [0, 1), got {betas!r}")
    for b in betas:
        check_range(owner, "betas", b, 0.0, 1.0, hi_open=True)


def check_bool(owner: str, field: str, value) -> None:
    """Raise :class:`ConfigError` unless ``value`` is ``True`` or ``False`` (not ``'yes'``, not ``1``)."""
    if not isinstance(value, bool):
        raise ConfigError(f"{owner}: {field} must be True or False, got {value!r} ({type(value).__name__})"
                          + ("; in YAML write true/false without quotes" if isinstance(value, str) else ""))


def check_fp32_fields(owner: str, cfg) -> None:
    """Validate (and normalise) the ``keep_fp32`` / ``auto_fp32`` fields of a frozen config:
    ``keep_fp32`` a list or tuple of node/module names (stored as a tuple), ``auto_fp32`` a bool."""
    keep = cfg.keep_fp32
    if isinstance(keep, str):
        raise ConfigError(f"{owner}: keep_fp32 must be a list of node or module names, got the string {keep!r}; "
                          f"write keep_fp32=[{keep!r}]")
    if not isinstance(keep, (list, tuple)):
        raise ConfigError(f"{owner}: keep_fp32 must be a list of node or module names, got {keep!r} "
                          f"({type(keep).__name__})")
    bad = [k for k in keep if not isinstance(k, str) or not k]
    if bad:
        raise ConfigError(f"{owner}: keep_fp32 entries must be non-empty node or module names (strings), got "
                          + ", ".join(repr(b) for b in bad))
    object.__setattr__(cfg, "keep_fp32", tuple(keep))
    check_bool(owner, "auto_fp32", cfg.auto_fp32)
