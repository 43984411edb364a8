"""edgepack: compress PyTorch models and pack them for edge targets, verified by running them.

    import sdk
    art = sdk.deploy(model, target="arm-int8", example_inputs=(x,), calibration=batches)
    art.verify(model, inputs=[x]).passed

Importing ``sdk`` is cheap: torch, numpy and LiteRT load on first use of a verb.
"""

from __future__ import annotations

from typing import Any

from .base import Distiller, Optimizer, Pruner, Quantizer, Runner, Target
from .contract import Package, TensorSig
from .config import Config
from .errors import (
    ArtifactError,
    CalibrationError,
    ConfigError,
    EdgepackError,
    EncodingError,
    ExportError,
    InputError,
    PluginConflictError,
    PluginLoadError,
    RecipeError,
    RunnerError,
    ToolchainError,
    UnknownPluginError,
    UnsupportedOpError,
    VerificationError,
)
from .hookspecs import hookimpl, hookspec

__version__ = "0.1.0"

_LAZY = {
    "deploy": "sdk.api", "compress": "sdk.api", "load": "sdk.artifact", "list_plugins": "sdk.api",
    "sign": "sdk.signing",
    "Recipe": "sdk.recipe", "Stage": "sdk.recipe", "Artifact": "sdk.artifact", "VerifyReport": "sdk.verify",
    "TrainConfig": "sdk.trainer", "StageContext": "sdk.context", "QuantSpec": "sdk.quant", "QuantPlan": "sdk.quant", "Graph": "sdk.graph",
}

__all__ = [
    "deploy", "compress", "load", "sign", "list_plugins", "Recipe", "Stage", "Artifact", "VerifyReport", "TrainConfig", "StageContext",
    "QuantSpec", "QuantPlan", "Graph", "Config", "Distiller", "Optimizer", "Pruner", "Quantizer", "Target", "Runner",
    "Package", "TensorSig", "hookimpl", "hookspec", "__version__",
    "EdgepackError", "UnknownPluginError", "PluginConflictError", "PluginLoadError", "ConfigError", "RecipeError",
    "ExportError", "UnsupportedOpError", "EncodingError", "CalibrationError", "InputError", "ArtifactError", "VerificationError",
    "ToolchainError", "RunnerError",
]


def __getattr__(name: str) -> Any:
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module 'sdk' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(mod), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
