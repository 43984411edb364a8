"""The whole hook surface of edgepack: six registration hooks.

Every plugin — built-in or third-party — is a module with functions marked
``@hookimpl`` whose names match the specs below.  Each hook receives a
``register`` callback owned by the host; the plugin calls it once per class it
provides.  The host checks the class, stores it under its ``name`` and reports
duplicates with both modules named.

A complete third-party plugin::

    from sdk import hookimpl, Pruner

    class RandomPruner(Pruner):
        name = "random"
        ...

    @hookimpl
    def register_pruners(register):
        register(RandomPruner)
"""

from __future__ import annotations

from typing import Callable

from pluggy import HookimplMarker, HookspecMarker

hookspec = HookspecMarker("edgepack")
hookimpl = HookimplMarker("edgepack")


@hookspec
def register_distillers(register: Callable[[type], None]) -> None:
    """Register knowledge-distillation methods.

    Called once, when the plugin manager is first built (lazily, on the first
    registry lookup), for every loaded plugin.

    :param register: call ``register(cls)`` for each :class:`sdk.Distiller`
        subclass the plugin provides; ``cls.name`` is the name recipes use.
    :returns: nothing; return values are ignored.
    """


@hookspec
def register_pruners(register: Callable[[type], None]) -> None:
    """Register pruning methods.

    Called once, when the plugin manager is first built, for every loaded plugin.

    :param register: call ``register(cls)`` for each :class:`sdk.Pruner`
        subclass the plugin provides; ``cls.name`` is the name recipes use.
    :returns: nothing; return values are ignored.
    """


@hookspec
def register_quantizers(register: Callable[[type], None]) -> None:
    """Register quantization methods.

    Called once, when the plugin manager is first built, for every loaded plugin.

    :param register: call ``register(cls)`` for each :class:`sdk.Quantizer`
        subclass the plugin provides; ``cls.name`` is the name recipes use.
    :returns: nothing; return values are ignored.
    """


@hookspec
def register_targets(register: Callable[[type], None]) -> None:
    """Register hardware targets (the packers that write artifacts).

    Called once, when the plugin manager is first built, for every loaded plugin.

    :param register: call ``register(cls)`` for each :class:`sdk.Target`
        subclass; ``cls.name`` is what ``sdk.deploy(target=...)`` takes.
    :returns: nothing; return values are ignored.
    """


@hookspec
def register_runners(register: Callable[[type], None]) -> None:
    """Register runners: ways to execute an artifact of some targets.

    Called once, when the plugin manager is first built, for every loaded plugin.
    Runner names are unique per target, so ``host`` can exist once for each
    target (LiteRT for ``arm-int8``, a compiled kernel for ``binary-popcount``).

    :param register: call ``register(cls)`` for each :class:`sdk.Runner`
        subclass; ``cls.name`` is what ``art.run(x, runner=...)`` takes and
        ``cls.targets`` the target names it can execute.
    :returns: nothing; return values are ignored.
    """


@hookspec
def register_optimizers(register: Callable[[type], None]) -> None:
    """Register optimizers that every training stage can name (``optimizer: adamw``).

    Called once, when the plugin manager is first built, for every loaded plugin.
    Built in: ``sgd``, ``adam``, ``adamw``.  A stage's ``optimizer_options``
    mapping is validated against the optimizer's ``Config`` when the recipe is
    read, so a typo fails before any stage trains.

    :param register: call ``register(cls)`` for each :class:`sdk.Optimizer`
        subclass; ``cls.name`` is what a stage's ``optimizer`` field takes.
    :returns: nothing; return values are ignored.
    """
