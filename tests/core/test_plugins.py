"""Plugin system: discovery, conflicts, unknown names, and one test per hook."""

import importlib.util
import inspect
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import sdk
import sdk.hookspecs
import sdk.plugins as p
from sdk.errors import PluginConflictError, UnknownPluginError

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]


def _load_test_plugin(name):
    spec = importlib.util.spec_from_file_location(f"tests_plugins_{name}", HERE / "plugins" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def hook_names():
    return [n for n, f in inspect.getmembers(sdk.hookspecs, inspect.isfunction) if n.startswith("register_")]


# -- meta-tests (the datasette habit) -------------------------------------------

@pytest.mark.parametrize("hook", hook_names())
def test_every_hook_has_docstring(hook):
    doc = getattr(sdk.hookspecs, hook).__doc__ or ""
    assert ":param register:" in doc and "Called" in doc and ":returns:" in doc, hook


@pytest.mark.parametrize("hook", hook_names())
def test_every_hook_has_a_test(hook):
    assert f"test_hook_{hook}" in globals(), f"add test_hook_{hook} to {__file__}"


def test_hook_surface_is_the_six_registration_hooks():
    assert sorted(hook_names()) == sorted(["register_distillers", "register_pruners", "register_quantizers",
                                           "register_targets", "register_runners", "register_optimizers"])


# -- one test per hook: each kind reaches the registry through its hook ------------

def _registered_via_hook(hookname, kind, name):
    pm = p.get_plugin_manager()
    got = []
    getattr(pm.hook, hookname)(register=got.append)
    return any(c.name == name and c.kind == kind for c in got)


def test_hook_register_distillers():
    assert _registered_via_hook("register_distillers", "distiller", "kd")
    assert p.get("distiller", "kd").__module__ == "plugins.distill.kd"


def test_hook_register_pruners():
    assert _registered_via_hook("register_pruners", "pruner", "magnitude")


def test_hook_register_quantizers():
    assert _registered_via_hook("register_quantizers", "quantizer", "ptq")


def test_hook_register_targets(example_plugin):
    assert _registered_via_hook("register_targets", "target", "torch-ir")
    assert "torch-ir" in p.names("target")


def test_hook_register_runners(example_plugin):
    assert _registered_via_hook("register_runners", "runner", "host")
    assert p.get_runner("host", "torch-ir").__name__ == "TorchIRRunner"


def test_hook_register_optimizers(example_plugin):
    assert _registered_via_hook("register_optimizers", "optimizer", "adamw")
    assert _registered_via_hook("register_optimizers", "optimizer", "lion")
    assert p.names("optimizer") == ["adam", "adam8bit", "adamw", "lion", "sgd"]
    assert p.get("optimizer", "sgd").__module__ == "plugins.optim.sgd"


# -- errors ------------------------------------------------------------------------

def test_unknown_name_lists_valid_ones():
    with pytest.raises(UnknownPluginError) as exc:
        p.get("pruner", "magnitud")
    assert "magnitude" in str(exc.value) and exc.value.valid and "magnitude" in exc.value.valid
    with pytest.raises(UnknownPluginError, match="valid targets"):
        sdk.deploy(torch.nn.Linear(2, 2), target="no-such-target", example_inputs=(torch.randn(1, 2),))


def test_duplicate_name_names_both_modules():
    mod = _load_test_plugin("conflict_magnitude")
    name = p.register_plugin(mod, "conflict-test")
    try:
        with pytest.raises(PluginConflictError) as exc:
            p.get("pruner", "magnitude")
        msg = str(exc.value)
        assert "plugins.prune.magnitude" in msg and mod.__name__ in msg
    finally:
        p.unregister_plugin(name)
    assert p.get("pruner", "magnitude").__module__ == "plugins.prune.magnitude"


def test_misspelled_hook_is_caught():
    import pluggy

    mod = _load_test_plugin("misspelled_hook")
    with pytest.raises(pluggy.PluginValidationError, match="register_prunerz"):
        p.register_plugin(mod, "misspelled")
    p.get_plugin_manager().unregister(name="misspelled")


def test_register_rejects_non_plugin_classes():
    from sdk.errors import PluginLoadError
    from sdk import hookimpl

    class Bad:
        @hookimpl
        def register_pruners(self, register):
            register(int)

    name = p.register_plugin(Bad(), "bad-class")
    try:
        with pytest.raises(PluginLoadError, match="subclass of sdk.Pruner"):
            p.names("pruner")
    finally:
        p.unregister_plugin(name)


def test_list_plugins_rows():
    rows = sdk.list_plugins()
    by = {(r["kind"], r["name"]): r for r in rows}
    assert by[("quantizer", "ptq")]["module"] == "plugins.quantize.ptq"
    assert all({"name", "kind", "version", "module"} <= set(r) for r in rows)


# -- real entry point ---------------------------------------------------------------

def _run(*args, env):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)


@pytest.fixture(scope="module")
def installed_example(example_plugin_env):
    """examples/plugin_example installed for subprocesses only (see conftest.example_plugin_env)."""
    return example_plugin_env


def test_entry_point_plugin_is_listed_and_deploys(installed_example, tmp_path):
    r = _run("-m", "sdk", "plugins", "--json", env=installed_example)
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    assert {"name": "torch-ir", "kind": "target", "version": "0.1.0", "module": "edgepack_example"} in rows
    assert any(r["name"] == "random" and r["kind"] == "pruner" for r in rows)
    code = f"""
import torch, sdk
torch.manual_seed(0)
m = torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.ReLU(), torch.nn.Linear(4, 3)).eval()
x = torch.randn(2, 6)
art = sdk.deploy(m, target="torch-ir", example_inputs=(x,), output={str(tmp_path / 'a')!r},
                 recipe={{"stages": [{{"method": "random", "config": {{"sparsity": 0.5}}}}]}})
w = [mod.weight for mod in m if hasattr(mod, "weight")]
assert art.manifest["plugins"][0]["module"] == "edgepack_example"
assert any(r["name"] == "random" for r in art.manifest["plugins"])
print(art.verify().passed)
"""
    r = _run("-c", code, env=installed_example)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().endswith("True")


def test_autoload_can_be_disabled(installed_example):
    r = _run("-m", "sdk", "plugins", "--json", env={**installed_example, "EDGEPACK_DISABLE_PLUGIN_AUTOLOAD": "1"})
    assert r.returncode == 0
    assert not any(row["module"] == "edgepack_example" for row in json.loads(r.stdout))


def _plugin_imports(module: str, source: str, roots: tuple[str, ...] = ("plugins",)) -> list[str]:
    """The ``plugins.*`` (or other ``roots``) modules that ``source`` (the text of module ``module``)
    imports, relative imports resolved (``from .kd import KD`` in ``plugins.distill.fitnets``:
    ``plugins.distill.kd``)."""
    import ast

    package = module.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level:
            base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
            found += [f"{base}.{node.module}"] if node.module else [f"{base}.{a.name}" for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            found.append(node.module or "")
    return [n for n in found if n.split(".")[0] in roots]


def test_no_plugin_module_imports_another_plugin():
    """Shared logic lives in sdk/ (BN folding: sdk/torch_fold.py, weight specs: sdk.quant.weight_spec,
    feature capture: sdk/features.py, distillation losses: sdk/losses.py), relative imports included."""
    assert _plugin_imports("plugins.distill.fitnets", "from .kd import KD\nfrom .. import prune\n"
                           "import plugins.quantize.ptq\nfrom sdk.features import capture\n") == \
        ["plugins.distill.kd", "plugins.prune", "plugins.quantize.ptq"]
    offenders = []
    for path in (ROOT / "plugins").rglob("*.py"):
        # "plugins.distill.__init__" resolves relative imports against its package, as Python does
        module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        offenders += [f"{path.relative_to(ROOT)}: {n}" for n in _plugin_imports(module, path.read_text())]
    assert not offenders, offenders


def _foreign_target_imports(module: str, source: str) -> list[str]:
    """What a module under ``targets/`` imports of ``plugins.*`` or of a target package other than its own."""
    own = ".".join(module.split(".")[:2])            # targets.<name>
    return [n for n in _plugin_imports(module, source, roots=("plugins", "targets"))
            if n != own and not n.startswith(own + ".")]


def test_a_target_package_imports_only_sdk_and_itself():
    """A target package is self-contained: what two targets share lives in sdk/ (the LiteRT toolkit:
    sdk/litert/, the qemu-aarch64 runner base: sdk/qemu.py, the emulator: sdk/emulator.py), and a
    target never imports a method plugin (fp32 field checks: sdk.config.check_fp32_fields)."""
    assert _foreign_target_imports("targets.binary_popcount.qemu",
                                   "from .build import kernel_sources\nfrom .. import arm_int8\n"
                                   "from ..arm_fp32 import NAME\nimport targets.fp16_gpu.half\n"
                                   "from targets.binary_popcount.emit import generate_sources\n"
                                   "from plugins.quantize.fp16 import check_fp32_fields\n"
                                   "from sdk import emulator\nimport numpy\n") == \
        ["targets.arm_int8", "targets.arm_fp32", "targets.fp16_gpu.half", "plugins.quantize.fp16"]
    assert _foreign_target_imports("targets.arm_int8.__init__", "from .lowering import lower\n") == []
    offenders = []
    for path in (ROOT / "targets").rglob("*.py"):
        module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        offenders += [f"{path.relative_to(ROOT)}: {n}" for n in _foreign_target_imports(module, path.read_text())]
    assert not offenders, offenders
