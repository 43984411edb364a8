"""Bad input gets a named error and leaves no artifact behind."""

import pytest
import torch

import sdk
from sdk.errors import CalibrationError, ExportError, InputError, UnsupportedOpError

X = torch.randn(1, 1, 8, 8)
PTQ = {"stages": [{"method": "ptq"}]}


class DataDependent(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(64, 10)

    def forward(self, x):
        if x.sum() > 0:               # control flow on a tensor value: cannot be exported
            return self.fc(x.flatten(1))
        return -self.fc(x.flatten(1))


def _deploy(model, tmp_path, **kw):
    kw.setdefault("example_inputs", (X,))
    # a quantizing recipe needs a target that ships int8 (torch-ir would refuse the plan: EncodingError)
    target = "arm-int8" if kw.get("recipe") is PTQ else "torch-ir"
    return sdk.deploy(model, target=target, output=tmp_path / "out", **kw)


@pytest.mark.parametrize("case", ["non-module", "export-fails", "wrong-example-shape", "empty-calibration",
                                  "nan-calibration", "inf-calibration", "wrong-calibration-shape",
                                  "missing-calibration"])
def test_named_error_and_nothing_written(case, example_plugin, small_cnn, tmp_path):
    expected, kw, model = {
        "non-module": (InputError, {}, lambda x: x),
        "export-fails": (ExportError, {}, DataDependent()),
        "wrong-example-shape": (InputError, {"example_inputs": (torch.randn(1, 3, 8, 8),)}, small_cnn),
        "empty-calibration": (CalibrationError, {"calibration": [], "recipe": PTQ}, small_cnn),
        "nan-calibration": (CalibrationError, {"calibration": [torch.full((4, 1, 8, 8), float("nan"))],
                                               "recipe": PTQ}, small_cnn),
        "inf-calibration": (CalibrationError, {"calibration": [X, X * float("inf")], "recipe": PTQ}, small_cnn),
        "wrong-calibration-shape": (CalibrationError, {"calibration": [torch.randn(4, 1, 9, 9)], "recipe": PTQ},
                                    small_cnn),
        "missing-calibration": (CalibrationError, {"recipe": PTQ}, small_cnn),
    }[case]
    with pytest.raises(expected) as exc:
        _deploy(model, tmp_path, **kw)
    assert isinstance(exc.value, sdk.EdgepackError)
    assert list(tmp_path.iterdir()) == []


def test_messages_say_what_to_do(example_plugin, small_cnn, tmp_path):
    with pytest.raises(ExportError, match="control flow"):
        _deploy(DataDependent(), tmp_path)
    with pytest.raises(CalibrationError, match=r"batch 1.*NaN/inf"):
        _deploy(small_cnn, tmp_path, calibration=[X, X * float("nan")], recipe=PTQ)
    with pytest.raises(CalibrationError, match=r"expected \(N, 1, 8, 8\)"):
        _deploy(small_cnn, tmp_path, calibration=[torch.randn(4, 8, 8)], recipe=PTQ)
    with pytest.raises(InputError, match="torch.nn.Module"):
        _deploy("model.pt", tmp_path)


def test_unsupported_op_names_op_node_and_target(example_plugin, tmp_path):
    class Sorts(torch.nn.Module):
        def forward(self, x):
            return torch.sort(x.flatten(1), dim=1).values

    with pytest.raises(UnsupportedOpError) as exc:
        _deploy(Sorts(), tmp_path)
    e = exc.value
    assert e.op == "aten.sort.default" and e.node and e.target == "torch-ir"
    assert "torch-ir" in str(e) and e.node in str(e)
    assert list(tmp_path.iterdir()) == []


def test_model_is_never_mutated(example_plugin, small_cnn, tmp_path):
    before = {k: v.clone() for k, v in small_cnn.state_dict().items()}
    small_cnn.train()
    _deploy(small_cnn, tmp_path, recipe={"stages": [{"method": "magnitude", "config": {"sparsity": 0.5}}]})
    assert small_cnn.training
    assert all(torch.equal(before[k], v) for k, v in small_cnn.state_dict().items())


# -- odd inputs: each a named EdgepackError that says what to do, nothing written ------------------------

import numpy as np  # noqa: E402

from sdk.errors import ConfigError  # noqa: E402


class ZeroWidth(torch.nn.Module):
    """A layer with no outputs in the middle of the network."""

    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(64, 0), torch.nn.Linear(0, 10)

    def forward(self, x):
        return self.b(self.a(x.flatten(1)))


@pytest.mark.parametrize("case", ["batch-0", "nan", "inf", "object-array", "int-array"])
def test_odd_example_inputs_are_refused_before_anything_is_written(case, example_plugin, small_cnn, tmp_path):
    x = {"batch-0": torch.randn(0, 1, 8, 8), "nan": X.clone().index_fill_(3, torch.tensor([2]), float("nan")),
         "inf": X * float("inf"), "object-array": np.array([[1.0, None]], dtype=object),
         "int-array": np.ones((1, 1, 8, 8), np.int64)}[case]
    with pytest.raises(InputError) as exc:
        _deploy(small_cnn, tmp_path, example_inputs=(x,))
    assert {"batch-0": "no elements", "nan": "NaN/inf", "inf": "NaN/inf", "object-array": "float",
            "int-array": "float"}[case] in str(exc.value)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("calibration, match", [(5, "got a int"), ("abc", "got a str"), ({"x": X}, "got a dict"),
                                                ([np.array([[1.0, "a"]], dtype=object)], "dtype object"),
                                                ([np.array(["a", "b"])], "string"),
                                                ([[X, X]], "tensor")])
def test_calibration_that_is_not_batches(calibration, match, example_plugin, small_cnn, tmp_path):
    if match == "tensor":       # one batch of two tensors for a one-input model: fine, the first is used
        _deploy(small_cnn, tmp_path, calibration=calibration, recipe=PTQ)
        return
    with pytest.raises(CalibrationError, match=match):
        _deploy(small_cnn, tmp_path, calibration=calibration, recipe=PTQ)
    assert list(tmp_path.iterdir()) == []


def test_calibration_arrays_with_negative_strides_are_fine(example_plugin, small_cnn, tmp_path):
    data = np.random.default_rng(0).random((8, 1, 8, 8), dtype=np.float32)[::-1]
    assert _deploy(small_cnn, tmp_path, calibration=[data], recipe=PTQ).path.is_dir()


def test_zero_size_layer_is_a_calibration_error(example_plugin, tmp_path):
    with pytest.raises(CalibrationError, match="0 channels or features"):
        _deploy(ZeroWidth(), tmp_path, calibration=[torch.randn(4, 1, 8, 8)], recipe=PTQ)
    assert list(tmp_path.iterdir()) == []
    from sdk.quant import OBSERVERS, make_observer

    for kind in OBSERVERS:
        with pytest.raises(CalibrationError):
            make_observer(kind).update(np.zeros((4, 0), np.float32))


@pytest.fixture
def art(example_plugin, small_cnn, tmp_path):
    return _deploy(small_cnn, tmp_path)


@pytest.mark.parametrize("value", ["abc", b"abc", None, {"x": 1}, np.array([None], dtype=object),
                                   np.zeros((1, 1, 8, 8), np.complex64)])
def test_run_with_inputs_that_are_not_arrays(art, value):
    with pytest.raises(InputError, match="input 'x'"):
        art.run(value)


def test_ragged_nested_lists_are_an_input_error(art):
    from sdk.data import as_inputs

    with pytest.raises(InputError, match="not an array of numbers"):
        as_inputs(([[1.0], [1.0, 2.0]],), art.signature)


def test_run_and_verify_with_no_inputs(art, small_cnn):
    with pytest.raises(InputError):
        art.run()
    with pytest.raises(InputError, match="no inputs given"):
        art.verify(small_cnn, inputs=[[]])
    with pytest.raises(InputError):
        art.verify(small_cnn, inputs=["abc"])
    from sdk.data import as_inputs

    with pytest.raises(InputError, match="no inputs given"):
        as_inputs([], art.signature)
    assert as_inputs(torch.ones(1, 1, 8, 8, dtype=torch.bfloat16), art.signature)[0].dtype == np.float32


def test_verify_with_an_empty_list_of_samples(art, small_cnn):
    """sdk/verify.py refuses an empty list (it would otherwise report PASSED having compared nothing)."""
    with pytest.raises(sdk.EdgepackError):
        art.verify(small_cnn, inputs=[])


@pytest.mark.parametrize("options, match", [({"auto_fp32": "yes"}, "auto_fp32 must be True or False"),
                                            ({"auto_fp32": 1}, "auto_fp32 must be True or False"),
                                            ({"keep_fp32": "c1"}, r"write keep_fp32=\['c1'\]"),
                                            ({"keep_fp32": [1]}, "names"),
                                            ({"keep_fp32": 5}, "list of node or module names")])
def test_fp16_configs_check_types(options, match, small_cnn, tmp_path):
    from plugins.quantize.fp16 import FP16
    from targets.fp16_gpu import FP16GPU

    with pytest.raises(ConfigError, match=match):
        sdk.deploy(small_cnn, target="fp16-gpu", example_inputs=(X,), output=tmp_path / "out", **options)
    with pytest.raises(ConfigError, match=match):
        FP16(**options)
    with pytest.raises(ConfigError, match=match):
        FP16.Config.from_dict(options)
    with pytest.raises(ConfigError, match=match):
        FP16GPU.Config.from_dict(options)
    assert list(tmp_path.iterdir()) == []
    assert FP16(keep_fp32=["c1"]).config.keep_fp32 == ("c1",)
    assert FP16GPU(keep_fp32=["c1"], auto_fp32=True).config.keep_fp32 == ("c1",)
