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
    return sdk.deploy(model, target="torch-ir", output=tmp_path / "out", **kw)


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
