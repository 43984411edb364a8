"""The plugin manager and the registries it fills.

Built-in plugins are the modules in :data:`DEFAULT_PLUGINS`; third-party ones
come from the ``edgepack`` entry-point group (set
``EDGEPACK_DISABLE_PLUGIN_AUTOLOAD=1`` to skip those).  Nothing is imported or
registered until the first lookup.

>>> import sdk.plugins as p
>>> p.get("pruner", "magnitude").__name__
'MagnitudePruner'
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import threading
from types import ModuleType
from typing import Any

import pluggy

from . import hookspecs
from .base import KINDS, Plugin, Runner
from .errors import PluginConflictError, PluginLoadError, UnknownPluginError

#: Modules registered before any entry point (the pytest/llm/datasette pattern).
DEFAULT_PLUGINS: tuple[str, ...] = (
    "plugins.optim.sgd",
    "plugins.optim.adam",
    "plugins.optim.adamw",
    "plugins.optim.adam8bit",
    "plugins.distill.kd",
    "plugins.distill.ensemble",
    "plugins.distill.fitnets",
    "plugins.distill.dml",
    "plugins.distill.relational",
    "plugins.distill.data_distill",
    "plugins.distill.task_distill",
    "plugins.distill.factor_transfer",
    "plugins.distill.embedding",
    "plugins.distill.review",
    "plugins.distill.multiscale",
    "plugins.distill.retrieval",
    "plugins.prune.magnitude",
    "plugins.prune.threshold",
    "plugins.prune.agp",
    "plugins.prune.granularity",
    "plugins.prune.filter_l1",
    "plugins.prune.slimming",
    "plugins.prune.sensitivity",
    "plugins.prune.taylor",
    "plugins.prune.apoz",
    "plugins.prune.regularization",
    "plugins.prune.obs",
    "plugins.prune.sss",
    "plugins.prune.auto_threshold",
    "plugins.prune.energy_aware",
    "plugins.prune.hybrid",
    "plugins.prune.surgery",
    "plugins.prune.deep_compression",
    "plugins.prune.low_rank",
    "plugins.prune.early_exit",
    "plugins.quantize.ptq",
    "plugins.quantize.fp16",
    "plugins.quantize.dynamic",
    "plugins.quantize.int4",
    "plugins.quantize.dynamic_fixed_point",
    "plugins.quantize.data_free",
    "plugins.quantize.qat",
    "plugins.quantize.lsq",
    "plugins.quantize.mixed_precision",
    "plugins.quantize.block_replacement",
    "plugins.quantize.bnn",
    "plugins.quantize.bwn",
    "plugins.quantize.xnor",
    "plugins.quantize.bireal",
    "plugins.quantize.reactnet",
    "plugins.quantize.horq",
    "plugins.quantize.ternary",
    "plugins.quantize.dorefa",
    "plugins.quantize.kmeans",
    "plugins.quantize.kernel_codebook",
    "plugins.quantize.cle",
    "plugins.quantize.bias_correction",
    "plugins.quantize.recu",
    "plugins.quantize.xnorpp",
    "plugins.quantize.zero_run",
    "plugins.quantize.incremental",
    "plugins.quantize.bo_mixed_precision",
    "plugins.quantize.autoqb",
    "targets.arm_int8",
    "targets.arm_fp32",
    "targets.binary_popcount",
    "targets.fp16_gpu",
)

ENTRY_POINT_GROUP = "edgepack"
_HOOK_OF_KIND = {
    "distiller": "register_distillers",
    "pruner": "register_pruners",
    "quantizer": "register_quantizers",
    "target": "register_targets",
    "runner": "register_runners",
    "optimizer": "register_optimizers",
}

_lock = threading.RLock()
_pm: pluggy.PluginManager | None = None
_registry: dict[str, dict[Any, type]] | None = None


def get_plugin_manager() -> pluggy.PluginManager:
    """The process-wide plugin manager, built on first use."""
    global _pm
    with _lock:
        if _pm is None:
            pm = pluggy.PluginManager("edgepack")
            pm.add_hookspecs(hookspecs)
            for modname in DEFAULT_PLUGINS:
                pm.register(_import_plugin(modname, modname), modname)
            if not os.environ.get("EDGEPACK_DISABLE_PLUGIN_AUTOLOAD"):
                for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
                    if pm.get_plugin(ep.name) is None and not pm.is_blocked(ep.name):
                        pm.register(_load_entry_point(ep), ep.name)
            pm.check_pending()
            _pm = pm
        return _pm


def _import_plugin(modname: str, label: str) -> ModuleType:
    try:
        return importlib.import_module(modname)
    except Exception as exc:  # report which plugin broke, not only the traceback
        raise PluginLoadError(f"plugin {label!r} ({modname}) failed to import: {exc}") from exc


def _load_entry_point(ep: importlib.metadata.EntryPoint) -> Any:
    try:
        return ep.load()
    except Exception as exc:
        dist = getattr(ep.dist, "name", "?")
        raise PluginLoadError(
            f"entry point {ep.name!r} = {ep.value} (distribution {dist}) failed to load: {exc}; "
            "fix or uninstall it, or set EDGEPACK_DISABLE_PLUGIN_AUTOLOAD=1"
        ) from exc


def register_plugin(plugin: Any, name: str | None = None) -> str:
    """Register a module or object holding ``@hookimpl`` functions (tests, notebooks).

    Returns the name it was registered under; pass it to :func:`unregister_plugin`.
    """
    global _registry
    with _lock:
        pm = get_plugin_manager()
        registered = pm.register(plugin, name)
        pm.check_pending()
        _registry = None
        return registered


def unregister_plugin(name: str) -> None:
    """Undo :func:`register_plugin`."""
    global _registry
    with _lock:
        get_plugin_manager().unregister(name=name)
        _registry = None


def _build_registry() -> dict[str, dict[Any, type]]:
    pm = get_plugin_manager()
    registry: dict[str, dict[Any, type]] = {k: {} for k in KINDS}
    for kind, hookname in _HOOK_OF_KIND.items():
        base = _BASES[kind]

        def register(cls: type, _kind: str = kind, _base: type = base) -> None:
            if not (isinstance(cls, type) and issubclass(cls, _base)) or not cls.name:
                raise PluginLoadError(
                    f"{hookname} got {cls!r}: register a subclass of sdk.{_base.__name__} "
                    "with a non-empty `name`"
                )
            keys = [(cls.name, t) for t in cls.targets] if _kind == "runner" else [cls.name]
            for key in keys:
                prev = registry[_kind].get(key)
                if prev is not None and prev is not cls:
                    raise PluginConflictError(_kind, cls.name, prev.__module__, cls.__module__)
                registry[_kind][key] = cls

        getattr(pm.hook, hookname)(register=register)
    return registry


def _get_registry() -> dict[str, dict[Any, type]]:
    global _registry
    with _lock:
        if _registry is None:
            _registry = _build_registry()
        return _registry


def names(kind: str) -> list[str]:
    """Sorted registered names of one kind."""
    _check_kind(kind)
    keys = _get_registry()[kind]
    return sorted({k[0] if isinstance(k, tuple) else k for k in keys})


def get(kind: str, name: str) -> type[Plugin]:
    """The class registered as ``name`` for ``kind``; :class:`UnknownPluginError` lists valid names."""
    _check_kind(kind)
    if kind == "runner":
        raise TypeError("runners are per target: use sdk.plugins.get_runner(name, target)")
    try:
        return _get_registry()[kind][name]
    except KeyError:
        raise UnknownPluginError(kind, name, names(kind)) from None


def get_runner(name: str, target: str) -> type[Runner]:
    """The runner ``name`` able to execute artifacts of ``target``."""
    reg = _get_registry()["runner"]
    try:
        return reg[(name, target)]
    except KeyError:
        valid = [n for (n, t) in reg if t == target]
        raise UnknownPluginError(f"runner for target {target!r}", name, valid) from None


def runners_for(target: str) -> list[str]:
    """Names of the runners that can execute ``target`` artifacts."""
    return sorted(n for (n, t) in _get_registry()["runner"] if t == target)


def find_method(name: str, kind: str | None = None) -> type[Plugin]:
    """Look a method up by name across distillers, pruners and quantizers (recipes)."""
    kinds = (kind,) if kind else ("distiller", "pruner", "quantizer")
    hits = [_get_registry()[k][name] for k in kinds if name in _get_registry()[k]]
    if len(hits) == 1:
        return hits[0]
    if len(hits) > 1:
        raise UnknownPluginError("method", name, [f"{h.kind}:{h.name}" for h in hits])
    valid = [n for k in kinds for n in _get_registry()[k]]
    raise UnknownPluginError(kind or "method", name, valid)


def list_plugins() -> list[dict[str, Any]]:
    """Every registered class: ``name``, ``kind``, ``version``, ``module`` (and ``targets`` for runners).

    >>> any(p["name"] == "kd" for p in list_plugins())
    True
    """
    rows = []
    seen = set()
    for kind in KINDS:
        for cls in _get_registry()[kind].values():
            if (kind, cls) in seen:
                continue
            seen.add((kind, cls))
            row = {"name": cls.name, "kind": kind, "version": cls.version, "module": cls.__module__}
            if kind == "runner":
                row["targets"] = list(cls.targets)
            rows.append(row)
    rows.sort(key=lambda r: (KINDS.index(r["kind"]), r["name"]))
    return rows


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise UnknownPluginError("plugin kind", kind, KINDS)


def _bases() -> dict[str, type]:
    from . import base

    return {"distiller": base.Distiller, "pruner": base.Pruner, "quantizer": base.Quantizer,
            "target": base.Target, "runner": base.Runner, "optimizer": base.Optimizer}


_BASES = _bases()
