"""Intermediate features of a torch model, by module name.

Feature-based distillers (``fitnets``' hint and guided layers, ``relational``'s
embedding layers) name layers as ``model.named_modules()`` does
(``"features.3"``).  :func:`named_module` resolves a name or raises a
:class:`~sdk.errors.ConfigError` listing the names the model has;
:func:`capture` runs the model once with forward hooks on the named modules
and returns their outputs, optionally stopping the forward pass as soon as the
last of them has run (the teacher's later layers are then never computed).

>>> import torch
>>> net = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.ReLU(), torch.nn.Linear(3, 1))
>>> out, (hidden,) = capture(net, torch.zeros(4, 2), ["1"])
>>> tuple(out.shape), tuple(hidden.shape)
((4, 1), (4, 3))
>>> capture(net, torch.zeros(4, 2), ["0"], stop=True)[0] is None     # stopped after layer "0"
True
"""

from __future__ import annotations

from typing import Sequence

import torch

from .errors import ConfigError, InputError


class _Captured(Exception):
    """Raised from a hook to end a forward pass once every wanted feature is in."""


def named_module(model: torch.nn.Module, name: str, role: str, *, allow_whole: bool = True) -> torch.nn.Module:
    """The submodule called ``name`` (``""``: the model itself, unless
    ``allow_whole`` is false), or a :class:`ConfigError` naming ``role`` and
    listing the names ``model`` has.

    >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU())
    >>> named_module(net, "1", "guided_layer")
    ReLU()
    >>> named_module(net, "fc", "guided_layer")
    Traceback (most recent call last):
    sdk.errors.ConfigError: guided_layer='fc' is not a module of Sequential; available: '' (the whole model), '0', '1'
    """
    modules = dict(model.named_modules())
    if name not in modules or (not name and not allow_whole):
        available = ", ".join(repr(n) for n in modules if n) or "(none)"
        whole = "'' (the whole model), " if allow_whole else ""
        what = "is not a module of" if name else "must name a module of"
        raise ConfigError(f"{role}={name!r} {what} {type(model).__name__}; available: {whole}{available}")
    return modules[name]


def capture(model: torch.nn.Module, x: torch.Tensor, names: Sequence[str], roles: Sequence[str] | None = None,
            *, stop: bool = False) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
    """Run ``model(x)`` and return ``(output, [output of each named module])``.

    ``roles`` name the names in error messages (default ``layer '<name>'``).
    With ``stop=True`` the forward pass ends as soon as every named module has
    run (later layers are skipped) and ``output`` is ``None``.  A module called
    several times in one pass contributes its first output; a module returning
    a tuple contributes its first element.
    """
    roles = roles or [f"layer {n!r}" for n in names]
    modules = [named_module(model, n, r) for n, r in zip(names, roles)]
    got: dict[int, torch.Tensor] = {}
    handles = []

    def hook_for(i: int):
        def hook(module, args, out):
            if i not in got:
                out = out[0] if isinstance(out, (tuple, list)) else out
                if not isinstance(out, torch.Tensor):
                    raise InputError(f"{roles[i]}={names[i]!r} returns {type(out).__name__}, not a tensor; "
                                     "choose a layer whose output is a tensor")
                got[i] = out
            if stop and len(got) == len(modules):
                raise _Captured
        return hook

    try:
        for i, m in enumerate(modules):
            handles.append(m.register_forward_hook(hook_for(i)))
        try:
            output = model(x)
        except _Captured:
            output = None
    finally:
        for h in handles:
            h.remove()
    missing = [names[i] for i in range(len(modules)) if i not in got]
    if missing:
        raise ConfigError(f"layer(s) {missing} did not run in {type(model).__name__}.forward; choose layers it uses")
    return output, [got[i] for i in range(len(modules))]
