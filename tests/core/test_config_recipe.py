"""Config round trips for every registered method and target; recipe YAML round trip."""

import dataclasses

import pytest

import sdk.plugins as p
from sdk.errors import ConfigError, RecipeError, UnknownPluginError
from sdk.recipe import Recipe

KINDS = ("distiller", "pruner", "quantizer", "target")


def all_classes():
    return [p.get(k, n) for k in KINDS for n in p.names(k)]


@pytest.mark.parametrize("cls", all_classes(), ids=lambda c: f"{c.kind}:{c.name}")
def test_config_round_trip(cls):
    cfg = cls.Config()
    d = cfg.to_dict()
    assert d["type"] == f"{cls.kind}.{cls.name}" and d["version"] == cls.Config.version
    assert cls.Config.from_dict(d) == cfg
    assert dataclasses.is_dataclass(cfg) and cls.Config.__dataclass_params__.frozen
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(cfg, next(iter(f.name for f in dataclasses.fields(cfg)), "x"), 1)


@pytest.mark.parametrize("cls", all_classes(), ids=lambda c: f"{c.kind}:{c.name}")
def test_methods_document_their_paper_or_purpose(cls):
    import sys

    assert (sys.modules[cls.__module__].__doc__ or "").strip(), f"{cls.__module__} needs a module docstring"


def test_config_rejects_unknown_fields_wrong_type_and_newer_versions():
    from plugins.prune.magnitude import MagnitudePruner

    with pytest.raises(ConfigError, match="unknown field.*sparsty.*valid fields"):
        MagnitudePruner.Config.from_dict({"sparsty": 0.5})
    with pytest.raises(ConfigError, match="config of type 'quantizer.ptq'"):
        MagnitudePruner.Config.from_dict({"type": "quantizer.ptq"})
    with pytest.raises(ConfigError, match="newer"):
        MagnitudePruner.Config.from_dict({"version": 99})
    with pytest.raises(ConfigError, match=r"sparsity=1.5 is out of range"):
        MagnitudePruner(sparsity=1.5)
    with pytest.raises(ConfigError, match="scope='tensor' is not allowed"):
        MagnitudePruner(scope="tensor")
    with pytest.raises(ConfigError, match="valid fields"):
        MagnitudePruner(sparsityy=0.1)


def test_tuple_fields_survive_yaml_lists():
    from plugins.prune.magnitude import MagnitudePruner

    cfg = MagnitudePruner.Config(exclude=("fc",))
    assert MagnitudePruner.Config.from_dict({"exclude": ["fc"]}) == cfg


def test_recipe_yaml_round_trip(tmp_path):
    text = """
stages:
  - method: magnitude
    config: {sparsity: 0.75, scope: global}
  - method: kd
    config: {objective: soft, temperature: 2.0, epochs: 3}
  - method: ptq
    config: {activation_observer: percentile, percentile: 99.9}
"""
    path = tmp_path / "r.yaml"
    path.write_text(text)
    r = Recipe.from_yaml(path)
    assert [s.method for s in r.stages] == ["magnitude", "kd", "ptq"]
    assert r.stages[0].config.sparsity == 0.75 and r.stages[1].config.temperature == 2.0
    assert Recipe.from_yaml(r.to_yaml()) == r
    assert Recipe.from_dict(r.to_dict()) == r
    assert [s.method for s in r.torch_stages] == ["magnitude", "kd"]
    assert [s.method for s in r.graph_stages] == ["ptq"]
    built = Recipe([("magnitude", {"sparsity": 0.75, "scope": "global"}), ("kd", {"objective": "soft",
                    "temperature": 2.0, "epochs": 3}), ("ptq", {"activation_observer": "percentile",
                                                               "percentile": 99.9})])
    assert built == r


def test_recipe_errors(tmp_path):
    with pytest.raises(UnknownPluginError, match="magnitude"):
        Recipe.from_dict({"stages": [{"method": "magnitud"}]})
    with pytest.raises(ConfigError, match="temprature"):
        Recipe.from_dict({"stages": [{"method": "kd", "config": {"temprature": 2}}]})
    with pytest.raises(RecipeError, match="unknown recipe key"):
        Recipe.from_dict({"stage": []})
    with pytest.raises(RecipeError, match="no 'method'"):
        Recipe.from_dict({"stages": [{"config": {}}]})
    with pytest.raises(RecipeError, match="does not exist"):
        Recipe.from_yaml(tmp_path / "missing.yaml")
    with pytest.raises(RecipeError, match="not valid YAML"):
        Recipe.from_yaml("stages: [\n  - {method: kd")


@pytest.mark.parametrize("version", ["abc", True, 0, 1.5, None])
def test_recipe_version_must_be_a_positive_integer(version):
    with pytest.raises(RecipeError, match="not a version number"):
        Recipe.from_dict({"version": version, "stages": []})
