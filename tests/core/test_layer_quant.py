"""The layer-rewriting framework (sdk/layer_quant.py) that ternary, dorefa, kmeans (a weight
parametrization) and bnn, bwn, xnor (a binary layer, sdk/binary.py) share: which layers are
chosen, one layer quantizer per model, the hint each rewritten layer carries through
sdk.compress into the captured graph, and the shared training fields."""

import numpy as np
import pytest
import torch
from torch import nn

import sdk
from sdk.binary import BinaryConfig, binary_layers
from sdk.encoding import Hint, hints_of
from sdk.errors import ConfigError
from sdk.graph import WEIGHTED_OPS, capture
from sdk.layer_quant import LayerQuantConfig, quantized_layers, select_layers
from sdk.trainer import TrainConfig

pytestmark = pytest.mark.usefixtures("one_thread")


def net():
    """conv → conv → linear → linear, no BatchNorm (the captured graph keeps each layer's weight)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(),
                         nn.Flatten(), nn.Linear(8 * 64, 16), nn.Linear(16, 3))


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(16, 1, 8, 8, generator=g), torch.randint(0, 3, (16,), generator=g)) for _ in range(3)]


def test_select_layers_keeps_edges_and_names_errors():
    model = net()
    assert [n for n, _ in select_layers(model, "demo", keep_first_last=True)] == ["2", "5"]
    assert [n for n, _ in select_layers(model, "demo", False, exclude=("5",))] == ["0", "2", "6"]
    assert [n for n, _ in select_layers(model, "demo", False, types=(nn.Linear,))] == ["5", "6"]
    with pytest.raises(ConfigError, match="demo: exclude names fc, which are not Conv2d/Linear layers; "
                                          "valid names: 0, 2, 5, 6"):
        select_layers(model, "demo", True, exclude=("fc",), types=(nn.Conv2d, nn.Linear))
    with pytest.raises(ConfigError, match="no layer left to quantize.*keep_first_last=False"):
        select_layers(model, "demo", True, exclude=("2", "5"))


@pytest.mark.parametrize("first,second,already", [
    ("ternary", "bnn", "quantized weights"), ("xnor", "kmeans", "binary layers"), ("dorefa", "ternary", "quantized weights")])
def test_one_layer_quantizer_per_model(data, first, second, already):
    """Binary layers after quantized weights or the reverse would quantize a quantized weight (or skip
    the replaced layers): refused, naming what is there and who made it."""
    recipe = {"stages": [{"method": first, "config": {"epochs": 1, "progress": False}},
                         {"method": second, "config": {"epochs": 1, "progress": False}}]}
    with pytest.raises(ConfigError, match=f"{second}: the model already has {already} \\(2, 5, by {first}\\); "
                                          "apply one weight quantizer per recipe"):
        sdk.compress(net(), recipe, data=data)


@pytest.mark.parametrize("method,per_channel", [("bnn", False), ("bwn", True), ("xnor", True)])
def test_binary_layers_hint_two_values(data, method, per_channel):
    """After sdk.compress each binary layer hints a 2-value codebook, per channel where a per-filter α
    scales it (bwn, xnor); the captured graph holds it under the layer's folded ±1 weight, which
    indeed has two values (and the layer's effective weight two per filter)."""
    small = sdk.compress(net(), {"stages": [{"method": method, "config": {"epochs": 1}}]}, data=data,
                         progress=False)
    assert sorted(binary_layers(small)) == ["2", "5"]
    hint = Hint(codebook=2, per_channel=per_channel, source=method)
    graph = capture(small, (data[0][0][:1],))
    weight_of = {n.module: n.inputs[1] for n in graph.nodes if n.op in WEIGHTED_OPS}
    assert graph.hints == {weight_of["2"]: hint, weight_of["5"]: hint}
    for name in ("2", "5"):
        layer = small.get_submodule(name)
        assert hints_of(layer) == hint
        assert set(np.unique(graph.constants[weight_of[name]]).tolist()) == {-1.0, 1.0}
        rows = layer.effective_weight().detach().reshape(layer.weight.shape[0], -1)
        assert max(len(torch.unique(r)) for r in rows) == 2
        assert (len(torch.unique(rows)) > 2) == per_channel


def test_a_binarized_pruned_layer_drops_the_sparsity_hint(data):
    """sign(0) = +1: a binary layer made from a pruned one has no zeros, so its hint is the binary
    one alone (the float first and last layers keep their masks' hints)."""
    recipe = {"stages": [{"method": "magnitude", "config": {"sparsity": 0.5}},
                         {"method": "xnor", "config": {"epochs": 1}}]}
    small = sdk.compress(net(), recipe, data=data, progress=False)
    assert hints_of(small[2]) == Hint(codebook=2, per_channel=True, source="xnor")
    assert hints_of(small[0]).sparsity is not None and hints_of(small[0]).codebook is None
    assert int((small[2].effective_weight() == 0).sum()) == 0


def test_configs_are_training_configs_with_the_methods_defaults():
    assert issubclass(BinaryConfig, LayerQuantConfig) and issubclass(LayerQuantConfig, TrainConfig)
    for name, epochs in (("ternary", 5), ("dorefa", 5), ("kmeans", 5), ("bnn", 10), ("bwn", 10), ("xnor", 10)):
        cfg = sdk.plugins.find_method(name, "quantizer").Config()
        assert (cfg.epochs, cfg.lr, cfg.optimizer, cfg.seed, cfg.keep_first_last) == (epochs, 1e-3, "adam", 0, True)


def test_binary_training_takes_the_optimizer_fields(data):
    """bnn with sgd and a momentum from its options trains; with max_steps=1 one step moves the weights."""
    one = sdk.compress(net(), {"stages": [{"method": "bnn", "config": {
        "optimizer": "sgd", "optimizer_options": {"momentum": 0.5}, "lr": 0.1, "max_steps": 1}}]},
        data=data, progress=False)
    assert not torch.equal(one[2].weight, net()[2].weight)
    assert quantized_layers(one) == {"2": one[2], "5": one[5]}
    with pytest.raises(ConfigError, match="optimizer='adma' is not registered"):
        sdk.recipe.Recipe.from_yaml("stages:\n  - {method: xnor, config: {optimizer: adma}}\n")
