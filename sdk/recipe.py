"""Recipes: an ordered list of compression stages, from YAML, a dict or code.

.. code-block:: yaml

    # recipe.yaml
    stages:
      - method: magnitude
        config: {sparsity: 0.5}
      - method: kd
        config: {objective: soft+hard, temperature: 4, epochs: 2}
      - method: ptq
        config: {activation_observer: percentile}

Each ``method`` is a registered distiller, pruner or quantizer name (add
``kind:`` when a name exists in two kinds).  Configs are validated when the
recipe is built — training fields included (``optimizer`` must be a registered
optimizer, ``optimizer_options`` its fields) — so a typo fails before any
training starts.  Torch-side stages run in order in :func:`sdk.compress`;
post-training quantizers (any number) run in order on the captured graph in
:func:`sdk.deploy`.

>>> r = Recipe.from_dict({"stages": [{"method": "magnitude", "config": {"sparsity": 0.25}}]})
>>> Recipe.from_yaml(r.to_yaml()) == r
True
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

from . import plugins
from .base import Plugin
from .config import Config
from .errors import EdgepackError, RecipeError

RECIPE_VERSION = 1


@dataclasses.dataclass(frozen=True)
class Stage:
    """One step: a method class and its validated config."""

    method: str
    config: Config
    kind: str

    @classmethod
    def make(cls, method: str, config: Config | dict | None = None, kind: str | None = None) -> "Stage":
        plugin = plugins.find_method(method, kind)
        if isinstance(config, Config):
            if not isinstance(config, plugin.Config):
                raise RecipeError(f"stage {method!r}: config is a {type(config).__qualname__}, "
                                  f"expected {plugin.Config.__qualname__}")
            cfg = config
        else:
            cfg = plugin.Config.from_dict(config or {})
        return cls(plugin.name, cfg, plugin.kind)

    def plugin_class(self) -> type[Plugin]:
        """The registered class of the stage's method."""
        return plugins.find_method(self.method, self.kind)

    def build(self) -> Plugin:
        """An instance of the stage's method."""
        return self.plugin_class()(self.config)

    @property
    def post_training(self) -> bool:
        """True for quantizers that act on the captured graph (applied by ``deploy``)."""
        return self.kind == "quantizer" and plugins.find_method(self.method, self.kind).post_training

    def to_dict(self) -> dict[str, Any]:
        cfg = self.config.to_dict()
        cfg.pop("type")
        return {"method": self.method, "kind": self.kind, "config": cfg}


@dataclasses.dataclass(frozen=True)
class Recipe:
    """An ordered tuple of :class:`Stage`.

    >>> Recipe([("magnitude", {"sparsity": 0.5})]).stages[0].method
    'magnitude'
    """

    stages: tuple[Stage, ...] = ()

    def __init__(self, stages=()):
        built = []
        for s in stages:
            if isinstance(s, Stage):
                built.append(s)
            elif isinstance(s, tuple):
                built.append(Stage.make(*s))
            elif isinstance(s, dict):
                built.append(_stage_from_dict(s))
            else:
                raise RecipeError(f"cannot make a recipe stage from {s!r}")
        object.__setattr__(self, "stages", tuple(built))

    @classmethod
    def from_dict(cls, data: dict) -> "Recipe":
        if not isinstance(data, dict) or not isinstance(data.get("stages", []), list):
            raise RecipeError("a recipe is a mapping with a list under 'stages'")
        unknown = set(data) - {"stages", "version"}
        if unknown:
            raise RecipeError(f"unknown recipe key(s) {', '.join(sorted(unknown))}; valid: stages, version")
        version = data.get("version", RECIPE_VERSION)
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise RecipeError(f"recipe version {version!r} is not a version number (a positive integer; "
                              f"this edgepack writes {RECIPE_VERSION})")
        if version > RECIPE_VERSION:
            raise RecipeError(f"recipe version {data['version']} is newer than this edgepack ({RECIPE_VERSION})")
        return cls(data.get("stages", []))

    @classmethod
    def from_yaml(cls, source: str | os.PathLike) -> "Recipe":
        """From a YAML file path or YAML text."""
        import yaml

        text = source
        if isinstance(source, os.PathLike) or (isinstance(source, str) and "\n" not in source
                                               and source.endswith((".yaml", ".yml"))):
            path = Path(source)
            if not path.is_file():
                raise RecipeError(f"recipe file {path} does not exist")
            text = path.read_text()
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise RecipeError(f"recipe is not valid YAML: {exc}") from None
        return cls.from_dict(data or {})

    def to_dict(self) -> dict[str, Any]:
        return {"version": RECIPE_VERSION, "stages": [s.to_dict() for s in self.stages]}

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @property
    def torch_stages(self) -> tuple[Stage, ...]:
        """Stages applied to the torch module by :func:`sdk.compress`."""
        return tuple(s for s in self.stages if not s.post_training)

    @property
    def graph_stages(self) -> tuple[Stage, ...]:
        """The post-training quantizer stages ``deploy`` runs on the captured graph, in order,
        instead of the target default; each later plan refines the earlier ones
        (:meth:`sdk.quant.QuantPlan.then`)."""
        return tuple(s for s in self.stages if s.post_training)


def _stage_from_dict(d: dict) -> Stage:
    if "method" not in d:
        raise RecipeError(f"recipe stage {d!r} has no 'method'")
    unknown = set(d) - {"method", "kind", "config"}
    if unknown:
        raise RecipeError(f"recipe stage {d['method']!r}: unknown key(s) {', '.join(sorted(unknown))}; "
                          "valid: method, kind, config")
    try:
        return Stage.make(d["method"], d.get("config"), d.get("kind"))
    except EdgepackError:
        raise
    except (TypeError, ValueError) as exc:
        raise RecipeError(f"recipe stage {d['method']!r}: {exc}") from None


def as_recipe(recipe: "Recipe | dict | str | os.PathLike | None") -> Recipe:
    """Accept a Recipe, a dict, a YAML path or YAML text."""
    if recipe is None:
        return Recipe()
    if isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, dict):
        return Recipe.from_dict(recipe)
    if isinstance(recipe, (str, os.PathLike)):
        return Recipe.from_yaml(recipe)
    raise RecipeError(f"recipe must be a Recipe, dict or YAML path, not {type(recipe).__name__}")
