"""Every error edgepack raises on purpose.

One base class, :class:`EdgepackError`, so callers can catch everything the SDK
means to raise with one ``except``.  Each subclass carries the object it is
about (a plugin name, a node, a path) as attributes, and its message says what
to do next.  Several also subclass the matching builtin (``ValueError``,
``LookupError``) so generic handlers keep working.
"""

from __future__ import annotations

import dataclasses
import shlex
from typing import Sequence


class EdgepackError(Exception):
    """Base class of every error edgepack raises deliberately."""


class UnknownPluginError(EdgepackError, LookupError):
    """A name that no registered plugin of that kind provides.

    >>> UnknownPluginError("pruner", "magnitud", ["magnitude"]).valid
    ['magnitude']
    """

    def __init__(self, kind: str, name: str, valid):
        self.kind, self.name, self.valid = kind, name, sorted(valid)
        listing = ", ".join(self.valid) or "(none registered)"
        super().__init__(f"unknown {kind} {name!r}; valid {kind}s: {listing}")


class PluginConflictError(EdgepackError):
    """Two plugins registered the same name for the same kind."""

    def __init__(self, kind: str, name: str, first_module: str, second_module: str):
        self.kind, self.name = kind, name
        self.modules = (first_module, second_module)
        super().__init__(
            f"{kind} {name!r} is registered twice: by {first_module} and by "
            f"{second_module}; uninstall or disable one of them"
        )


class PluginLoadError(EdgepackError, ImportError):
    """A plugin module or entry point failed to import."""


class ConfigError(EdgepackError, ValueError):
    """A method or target configuration value that is not allowed."""


class RecipeError(EdgepackError, ValueError):
    """A recipe file or dict that cannot be understood."""


class ExportError(EdgepackError):
    """``torch.export`` could not capture the model (data-dependent control flow,
    unsupported Python, ...).  The message carries torch's reason."""


@dataclasses.dataclass(frozen=True)
class RefusedNode:
    """One graph node a target cannot lower: its op, node name, owning module
    path and what to do about it."""

    op: str
    node: str
    module: str = ""
    hint: str = ""


class UnsupportedOpError(EdgepackError):
    """Operators that the chosen target cannot lower.

    Attributes: ``op`` (the operator), ``node`` (graph node name), ``target``
    and ``hint`` (what to do instead) of the first refused node, and
    ``refused``: every refused node (:class:`RefusedNode`), so that one error
    lists all a model needs changed.  :meth:`of` builds one from that list.

    >>> e = UnsupportedOpError.of("arm-int8", [RefusedNode("aten.cumsum.default", "cumsum", "body", "no kernel")])
    >>> (e.op, e.node, len(e.refused))
    ('aten.cumsum.default', 'cumsum', 1)
    """

    def __init__(self, op: str, node: str, target: str, hint: str = "", *, module: str = "",
                 refused: Sequence[RefusedNode] = ()):
        self.op, self.node, self.target, self.hint, self.module = op, node, target, hint, module
        self._refused = list(refused) or [RefusedNode(op, node, module, hint)]
        super().__init__(_refusal_message(target, self._refused))

    @classmethod
    def of(cls, target: str, refused: Sequence[RefusedNode]) -> "UnsupportedOpError":
        first = refused[0]
        return cls(first.op, first.node, target, first.hint, module=first.module, refused=refused)

    @property
    def refused(self) -> list[RefusedNode]:
        # subclasses that set the attributes themselves (channel pruning) still answer
        found = getattr(self, "_refused", None)
        return found if found else [RefusedNode(self.op, self.node, getattr(self, "module", ""), self.hint)]


def _refusal_message(target: str, refused: Sequence[RefusedNode]) -> str:
    """One line for a single node; otherwise one line per (op, fix), naming every node and module."""
    where = lambda r: f"{r.node!r}" + (f" in {r.module}" if r.module else "")  # noqa: E731
    if len(refused) == 1:
        r = refused[0]
        return f"target {target!r} cannot lower op {r.op!r} (node {where(r)})" + (f": {r.hint}" if r.hint else "")
    groups: dict[tuple[str, str], list[RefusedNode]] = {}
    for r in refused:
        groups.setdefault((r.op, r.hint), []).append(r)
    lines = [f"target {target!r} cannot lower {len(refused)} nodes:"]
    for (op, hint), rs in groups.items():
        lines.append(f"  - op {op!r} at {len(rs)} node(s): " + ", ".join(where(r) for r in rs)
                     + (f"\n    fix: {hint}" if hint else ""))
    return "\n".join(lines)


class EncodingError(EdgepackError, ValueError):
    """A plan asks a target to ship an encoding it does not carry.

    Attributes: ``target``, ``layer`` (module path or node), ``tensor``,
    ``encoding`` (its description) and ``carriers`` (registered targets that
    carry it).
    """

    def __init__(self, target: str, layer: str, tensor: str, encoding: str, carried: str,
                 carriers: Sequence[str] = (), *, kind: str = "weight"):
        self.target, self.layer, self.tensor, self.encoding = target, layer, tensor, encoding
        self.carriers = sorted(carriers)
        where = ", ".join(self.carriers) if self.carriers else "no registered target"
        super().__init__(f"target {target!r} cannot ship layer {layer!r} ({kind} {tensor!r}) as {encoding}: it "
                         f"carries {carried}; carried by: {where}. Deploy to one of those, or change the "
                         "recipe's quantizer")


class CalibrationError(EdgepackError, ValueError):
    """Calibration data that is empty, non-finite, of the wrong shape, or
    activations that do not fit the target's number format."""


class InputError(EdgepackError, ValueError):
    """Inputs that do not match the model's signature (count, shape, dtype)."""


class ArtifactError(EdgepackError):
    """An artifact directory that is damaged, foreign, or from an incompatible
    format version."""


class VerificationError(EdgepackError):
    """An artifact whose outputs disagree with the reference beyond tolerance."""


class ToolchainError(EdgepackError, RuntimeError):
    """A compiler, emulator or runtime that the requested step needs is missing.
    The message names the package or command that installs it."""


class CompileError(ToolchainError):
    """The compiler ran but rejected the sources; ``stderr`` holds its output."""

    def __init__(self, command: Sequence[str], stderr: str):
        self.command, self.stderr = list(command), stderr
        super().__init__(f"C compilation failed: {shlex.join(self.command)}\n{stderr.strip()}")


class RunnerError(EdgepackError, RuntimeError):
    """A runner failed to execute an artifact."""
