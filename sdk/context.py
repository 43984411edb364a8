"""What a torch-side stage sees while :func:`sdk.compress` runs it.

A stage's verb is ``run(model, ctx)``; the default ``run`` of each base class
calls the one-line verbs (``Distiller.apply(student, teacher, data)``,
``Pruner.apply(model, data)``) with the ``train`` stream, so simple methods never
touch the context.  Methods that need more read it:

=====================  ========================================================
``ctx.stream(name)``   a named data stream: ``train``, ``unlabeled``, ``val``
``ctx.teacher``        the teacher the caller gave (``None``: none given)
``ctx.original``       the uncompressed model ``compress`` was called with
``ctx.target``         the Target instance (``deploy``'s, or ``compress(target=)``; else ``None``)
``ctx.add_penalty``    a loss term added to the training of every later stage
``ctx.add_callback``   a per-step callback run in every later stage's training
``ctx.report``         what the stage measured (JSON data: curves, energy, sparsity
                       reached): kept on the compressed model and written into the
                       artifact manifest's ``stages``
=====================  ========================================================

>>> streams = DataStreams.of([1, 2])
>>> streams.names()
['train']
>>> DataStreams.of({"train": [1], "val": [2]}).get("val")
[2]
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Callable, Iterable

from .errors import ConfigError, InputError

#: the streams a stage may declare in ``streams``
STREAMS = ("train", "unlabeled", "val")
#: the attribute of a compressed model that holds its stages' reports (:meth:`StageContext.report`)
REPORTS_ATTR = "_edgepack_reports"


@dataclasses.dataclass(frozen=True)
class DataStreams:
    """Named data streams: ``train`` (labelled batches), ``unlabeled`` (inputs only),
    ``val`` (held-out labelled batches).  A bare iterable means ``train``."""

    streams: dict[str, Iterable]

    @classmethod
    def of(cls, data: "DataStreams | dict | Iterable | None") -> "DataStreams":
        if isinstance(data, DataStreams):
            return data
        if data is None:
            return cls({})
        if isinstance(data, dict):
            unknown = sorted(set(data) - set(STREAMS))
            if unknown:
                raise InputError(f"unknown data stream(s) {', '.join(map(repr, unknown))}; "
                                 f"valid: {', '.join(STREAMS)}")
            return cls({k: v for k, v in data.items() if v is not None})
        return cls({"train": data})

    def names(self) -> list[str]:
        return [s for s in STREAMS if s in self.streams]

    def get(self, name: str) -> Iterable | None:
        return self.streams.get(name)


def check_streams(stages, data: DataStreams, teacher: Any = None) -> None:
    """Raise :class:`InputError` before any stage runs when one needs a stream that was not
    given, or a teacher (``needs_teacher``: an ensemble) and none was."""
    for stage in stages:
        cls = stage.plugin_class()
        if getattr(cls, "needs_teacher", False) and teacher is None:
            raise InputError(f"stage {stage.method!r} needs several teacher models and none was given: pass "
                             "teacher=[model_a, model_b, ...] (checked before any stage runs; to distil from the "
                             "original model alone use 'kd')")
        missing = [s for s in getattr(cls, "streams", ()) if data.get(s) is None]
        if missing:
            given = ", ".join(data.names()) or "none"
            raise InputError(f"stage {stage.method!r} needs the data stream(s) {', '.join(missing)} "
                             f"(given: {given}); pass data={{{', '.join(repr(m) + ': ...' for m in missing)}}} "
                             "(a bare iterable is 'train')")


@dataclasses.dataclass
class StageContext:
    """The state a recipe's torch-side stages share (see the module docstring)."""

    data: DataStreams
    original: Any
    teacher: Any = None
    target: Any = None                 # sdk.Target: its cost model (Target.cost) plans under a budget
    penalties: list[Callable] = dataclasses.field(default_factory=list)
    callbacks: list[Callable] = dataclasses.field(default_factory=list)
    reports: list[dict] = dataclasses.field(default_factory=list)
    stage: str | None = None           # the method running now (set by sdk.compress)

    def stream(self, name: str, *, who: str = "this stage") -> Iterable:
        """The stream ``name``; :class:`InputError` naming ``who`` when it was not given."""
        if name not in STREAMS:
            raise InputError(f"unknown data stream {name!r}; valid: {', '.join(STREAMS)}")
        got = self.data.get(name)
        if got is None:
            raise InputError(f"{who} needs the {name!r} data stream: pass data={{{name!r}: ...}}"
                             + (" or a bare iterable" if name == "train" else ""))
        return got

    def add_penalty(self, penalty: Callable[[Any], Any]) -> None:
        """``penalty(model) -> scalar tensor`` is added to the loss of every later stage's training."""
        self.penalties.append(penalty)

    def add_callback(self, callback: Callable[[Any, int], None]) -> None:
        """``callback(model, step)`` runs after every optimizer step of every later stage's training."""
        self.callbacks.append(callback)

    def report(self, **data: Any) -> None:
        """Record what this stage measured; ``data`` must be JSON (numbers, strings, lists, dicts).
        :func:`sdk.compress` leaves the reports on the model it returns (:data:`REPORTS_ATTR`) and
        :func:`sdk.deploy` writes them into the manifest's ``stages``, one ``{"method", ...}`` each.

        >>> ctx = StageContext(DataStreams.of([]), original=None, stage="sensitivity")
        >>> ctx.report(levels=[0.5, 0.9]); ctx.reports
        [{'method': 'sensitivity', 'levels': [0.5, 0.9]}]
        """
        try:
            row = json.loads(json.dumps({"method": self.stage, **data}, allow_nan=False))
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{self.stage}: a stage report must be JSON data (numbers, strings, lists, dicts; "
                              f"no NaN): {exc}") from None
        self.reports.append(row)
