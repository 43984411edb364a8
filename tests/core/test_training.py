"""Training composition (sdk/trainer.py, sdk/context.py, optimizer plugins): one training-config
base validated at recipe load, optimizers named by registry, named data streams, penalties and
callbacks that one stage attaches to the training of the stages after it, and several graph-side
stages in one recipe."""

import dataclasses

import pytest
import torch

import sdk
import sdk.plugins as p
from sdk import hookimpl
from sdk.base import Pruner
from sdk.config import Config
from sdk.errors import ConfigError, InputError
from sdk.recipe import Recipe
from sdk.trainer import TrainConfig, fit

pytestmark = pytest.mark.usefixtures("one_thread")


def _net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))


def _data(n=4):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(n)]


class Recorder(Pruner):
    """Test stage: attaches a penalty and a callback to later stages; needs the streams it is told."""

    name = "recorder"
    calls: list = []

    @dataclasses.dataclass(frozen=True)
    class Config(Config):
        weight: float = 0.0

    def apply(self, model, data=None):
        return model

    def run(self, model, ctx):
        Recorder.calls.append(("run", ctx.teacher is None, ctx.target.name if ctx.target else None))
        w = self.config.weight
        ctx.add_penalty(lambda m: w * sum((q ** 2).sum() for q in m.parameters()))
        ctx.add_callback(lambda m, step: Recorder.calls.append(("step", step)))
        return model


class NeedsVal(Recorder):
    name = "needs-val"
    streams = ("val",)


class _Plugin:
    @hookimpl
    def register_pruners(self, register):
        register(Recorder)
        register(NeedsVal)


@pytest.fixture
def recorder():
    name = p.register_plugin(_Plugin(), "test-recorder")
    Recorder.calls.clear()
    try:
        yield
    finally:
        p.unregister_plugin(name)


def test_train_config_validates_optimizer_and_its_options():
    with pytest.raises(ConfigError, match="adma.*valid: adam, adam8bit, adamw, sgd"):
        TrainConfig(optimizer="adma")
    with pytest.raises(ConfigError, match="momentm"):
        TrainConfig(optimizer="sgd", optimizer_options={"momentm": 0.5})
    cfg = TrainConfig.from_dict(TrainConfig(optimizer="sgd", optimizer_options={"momentum": 0.5}).to_dict())
    assert cfg.optimizer_config().momentum == 0.5


def test_optimizer_options_reach_torch():
    net = _net()

    def loss(m, b):
        return torch.nn.functional.cross_entropy(m(b[0]), b[1])

    cfg = TrainConfig(optimizer="sgd", lr=0.05, optimizer_options={"momentum": 0.0}, progress=False, max_steps=1)
    before = [q.detach().clone() for q in net.parameters()]
    x, y = _data(1)[0]
    net.zero_grad()
    loss(net, (x, y)).backward()
    grads = [q.grad.clone() for q in net.parameters()]
    fit(net, [(x, y)], loss, cfg)
    for b, g, a in zip(before, grads, net.parameters()):     # plain SGD: w - lr * g, exactly
        assert torch.allclose(a.detach(), b - 0.05 * g, atol=1e-6)


def test_penalties_and_callbacks_reach_later_stages(recorder):
    net, data = _net(), _data(3)
    out = sdk.compress(net, {"stages": [{"method": "recorder", "config": {"weight": 0.0}},
                                        {"method": "kd", "config": {"objective": "soft+hard", "epochs": 2}}]},
                       data=data, progress=False)
    steps = [c[1] for c in Recorder.calls if c[0] == "step"]
    assert steps == list(range(6))                 # kd's 2 epochs × 3 batches, each step seen once
    assert Recorder.calls[0] == ("run", True, None)  # no teacher given: ctx.teacher is None
    assert isinstance(out, torch.nn.Module)


def test_penalty_changes_the_later_training(recorder):
    net, data = _net(), _data(4)
    kd = {"method": "kd", "config": {"objective": "soft+hard", "epochs": 3, "lr": 0.01}}
    free = sdk.compress(net, {"stages": [kd]}, data=data, progress=False)
    shrunk = sdk.compress(net, {"stages": [{"method": "recorder", "config": {"weight": 1.0}}, kd]},
                          data=data, progress=False)
    norm = lambda m: float(sum((q.detach() ** 2).sum() for q in m.parameters()))  # noqa: E731
    assert norm(shrunk) < 0.8 * norm(free)


def test_missing_stream_fails_before_any_stage(recorder):
    with pytest.raises(InputError, match="needs-val.*'val'"):
        sdk.compress(_net(), {"stages": [{"method": "recorder"}, {"method": "needs-val"}]}, data=_data(),
                     progress=False)
    assert Recorder.calls == []
    sdk.compress(_net(), {"stages": [{"method": "needs-val"}]}, data={"train": _data(), "val": _data(1)},
                 progress=False)
    with pytest.raises(InputError, match="unknown data stream.*'test'"):
        sdk.compress(_net(), {"stages": []}, data={"test": _data()})


def test_deploy_passes_its_target_to_stages(recorder):
    net = _net()
    sdk.deploy(net, "arm-fp32", (torch.randn(1, 6),), recipe={"stages": [{"method": "recorder"}]},
               progress=False)
    assert Recorder.calls[0] == ("run", True, "arm-fp32")


def test_yaml_recipe_typo_in_training_field_fails_at_load():
    with pytest.raises(ConfigError, match="adma"):
        Recipe.from_yaml("stages:\n  - method: kd\n    config: {optimizer: adma}\n")
    with pytest.raises(ConfigError, match="betaz"):
        Recipe.from_yaml("stages:\n  - method: kd\n    config: {optimizer: adam, optimizer_options: {betaz: 1}}\n")


def test_third_party_optimizer_trains_kd_from_yaml(example_plugin, tmp_path):
    """Lion (examples/plugin_example) through register_optimizers: its first step moves every weight
    with a gradient by exactly lr (the sign of the interpolated momentum)."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text("stages:\n  - method: kd\n    config:\n      objective: soft+hard\n      optimizer: lion\n"
                      "      optimizer_options: {betas: [0.9, 0.99]}\n      lr: 0.001\n      max_steps: 1\n")
    net = _net()
    teacher = _net()
    torch.nn.init.normal_(teacher[2].weight)
    out = sdk.compress(net, recipe, data=_data(2), teacher=teacher, progress=False)
    for before, after in zip(net.parameters(), out.parameters()):
        moved = (after.detach() - before.detach()).abs()
        assert torch.allclose(moved[moved > 0], torch.tensor(0.001), rtol=1e-3)
        assert (moved > 0).float().mean() > 0.9


def test_several_graph_side_stages_refine_one_plan(tmp_path):
    from examples.models import make

    model, x = make("lenet")
    cal = [torch.randn(4, 1, 8, 8) for _ in range(3)]
    both = sdk.deploy(model, "arm-int8", (x,), calibration=cal, progress=False, recipe={"stages": [
        {"method": "ptq", "config": {"activation_observer": "minmax"}},
        {"method": "ptq", "config": {"activation_observer": "percentile"}}]})
    last = sdk.deploy(model, "arm-int8", (x,), calibration=cal, progress=False,
                      recipe={"stages": [{"method": "ptq", "config": {"activation_observer": "percentile"}}]})
    assert both.manifest["quantization"]["method"] == "ptq+ptq"
    assert [s["activation_observer"] for s in both.manifest["quantization"]["config"]["stages"]] == \
        ["minmax", "percentile"]
    assert both.read_bytes("model.tflite") == last.read_bytes("model.tflite")    # the later stage's specs win
