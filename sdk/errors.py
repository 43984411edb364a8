"""Every error edgepack raises on purpose.

One base class, :class:`EdgepackError`, so callers can catch everything the SDK
means to raise with one ``except``.  Each subclass carries the object it is
about (a plugin name, a node, a path) as attributes, and its message says what
to do next.  Several also subclass the matching builtin (``ValueError``,
``LookupError``) so generic handlers keep working.
"""

from __future__ import annotations

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


class UnsupportedOpError(EdgepackError):
    """An operator that the chosen target cannot lower.

    Attributes: ``op`` (the operator), ``node`` (graph node name), ``target``
    and ``hint`` (what to do instead).
    """

    def __init__(self, op: str, node: str, target: str, hint: str = ""):
        self.op, self.node, self.target, self.hint = op, node, target, hint
        msg = f"target {target!r} cannot lower op {op!r} (node {node!r})"
        if hint:
            msg += f": {hint}"
        super().__init__(msg)


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
