"""sdk.layer_errors: the per-layer error finder names the one broken layer, and its numbers are right."""

import copy
import json

import numpy as np
import pytest
import torch
import torch.nn as nn

import sdk
from sdk.cli import main
from sdk.errors import InputError
from sdk.layer_errors import SUGGEST_LOST_DB, layer_errors


class Chain(nn.Module):
    """conv-relu x3, then a classifier.  ``bad="weights"`` gives the middle conv (``mid``) one huge weight
    per output channel on an input channel that ``first`` keeps at exactly 0: the int8 per-channel scale is
    then set by a weight that never contributes, and the weights that do round to a few levels.
    ``bad="activations"``: ``first``'s output channel 0 is 60x larger and ``mid`` reads it 60x smaller (the
    same function): one per-tensor int8 scale for ``first``'s output leaves its other channels few levels."""

    def __init__(self, bad: str = ""):
        super().__init__()
        torch.manual_seed(0)
        self.first, self.mid, self.last = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1), \
            nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Linear(8 * 8 * 8, 10)
        with torch.no_grad():
            if bad == "weights":
                self.first.weight[0] = 0.0
                self.first.bias[0] = -1.0          # relu(-1) = 0: input channel 0 of mid is dead
                self.mid.weight[:, 0, 1, 1] = 40.0
            elif bad == "activations":
                self.first.weight[0] *= 60.0
                self.first.bias[0] *= 60.0
                self.mid.weight[:, 0] /= 60.0

    def forward(self, x):
        x = torch.relu(self.first(x))
        x = torch.relu(self.mid(x))
        x = torch.relu(self.last(x))
        return self.head(x.flatten(1))


def _deploy(model, tmp_path, recipe=None):
    torch.manual_seed(1)
    x = torch.randn(2, 3, 8, 8)
    calib = [torch.randn(2, 3, 8, 8) for _ in range(4)]
    return sdk.deploy(model, target="arm-int8", example_inputs=(x,), calibration=calib, recipe=recipe,
                      output=tmp_path / "art", progress=False)


@pytest.fixture(scope="module")
def bad(tmp_path_factory):
    model = Chain(bad="weights").eval()
    return model, _deploy(model, tmp_path_factory.mktemp("bad"))


@pytest.fixture(scope="module")
def healthy(tmp_path_factory):
    model = Chain().eval()
    return model, _deploy(model, tmp_path_factory.mktemp("healthy"))


@pytest.fixture(scope="module")
def outlier(tmp_path_factory):
    model = Chain(bad="activations").eval()
    return model, _deploy(model, tmp_path_factory.mktemp("outlier"))


def test_names_the_broken_layer_first_with_a_keep_float_fix(bad):
    model, art = bad
    rep = layer_errors(art, model=model)
    assert rep.float_source == "model" and not rep.skipped
    worst = rep.rows[0]
    assert worst.module == "mid", rep.table()
    assert worst.sqnr_db < 10.0 and worst.sqnr_lost_db >= SUGGEST_LOST_DB
    assert "float_layers: [mid]" in worst.suggestion and "others round to few levels" in worst.reason
    assert "int8 per-channel" in worst.spec and "out int8 per-tensor" in worst.spec
    # its own loss is far below every other layer's (the others are fed the float inputs)
    assert all(r.sqnr_db > worst.sqnr_db + 15 for r in rep.rows[1:])
    # the accumulated error shows downstream, the local one does not
    last = next(r for r in rep.rows if r.module == "last")
    assert last.cumulative_sqnr_db < 12.0 < last.sqnr_db
    assert [r.sqnr_lost_db for r in rep.rows] == sorted((r.sqnr_lost_db for r in rep.rows), reverse=True)
    json.dumps(rep.to_dict())


def test_the_keep_float_suggestion_fixes_it(bad, tmp_path):
    model, art = bad
    before = {r.module: r for r in layer_errors(art, model=model).rows}
    fixed = _deploy(model, tmp_path, {"version": 1, "stages": [{"method": "ptq", "config": {"float_layers": ["mid"]}}]})
    after = {r.module: r for r in layer_errors(fixed, model=model).rows}
    assert after["mid"].spec.startswith("w float32") and after["mid"].sqnr_db > before["mid"].sqnr_db + 30
    assert after["head"].cumulative_sqnr_db > before["head"].cumulative_sqnr_db + 25
    assert max(r.sqnr_lost_db for r in after.values()) < SUGGEST_LOST_DB


def test_outlier_input_channel_names_the_consumer_and_cle(outlier):
    """``first``'s output tensor keeps its energy (channel 0 dominates it), so the loss shows where that
    tensor is read: ``mid``, fed the float input rounded to that tensor's int8 grid."""
    model, art = outlier
    for rep in (layer_errors(art, model=model), layer_errors(art)):
        worst = rep.rows[0]
        assert worst.module == "mid" and worst.sqnr_db < 20.0, rep.table()
        assert worst.suggestion.startswith("cle") and "layer conv2d (first)" in worst.suggestion
        assert "channel 0 spans" in worst.reason


@pytest.mark.slow
def test_the_cle_suggestion_fixes_it(outlier, tmp_path):
    model, art = outlier
    fixed = _deploy(model, tmp_path, {"version": 1, "stages": [{"method": "cle"}]})
    before = {r.module: r for r in layer_errors(art).rows}
    rep = layer_errors(fixed)           # cle rescaled the channels: the shadow is the right float side
    after = {r.module: r for r in rep.rows}
    assert after["mid"].sqnr_db > before["mid"].sqnr_db + 20 and after["head"].cumulative_sqnr_db > 35.0
    assert "torch-side stages (cle)" in layer_errors(fixed, model=model).notes[0]


def test_an_int4_layer_is_told_to_go_back_to_int8(tmp_path):
    model = Chain().eval()
    art = _deploy(model, tmp_path, {"version": 1, "stages": [{"method": "ptq", "config": {"int4_layers": ["mid"]}}]})
    worst = layer_errors(art, model=model).rows[0]
    assert worst.module == "mid" and worst.spec.startswith("w int4 per-channel")
    assert worst.suggestion == "int8 instead of int4: remove mid from ptq int4_layers"


def test_shadow_without_a_model_sees_activation_error_only(bad):
    _, art = bad
    rep = layer_errors(art)       # float shadow: mid's weights are the coarse codes on both sides
    assert rep.float_source == "shadow"
    assert all(r.sqnr_db > 20.0 for r in rep.rows), rep.table()
    assert "shadow" in rep.table()


def test_healthy_model_has_no_big_loss(healthy):
    model, art = healthy
    rep = layer_errors(art, model=model)
    assert len(rep.rows) == 5
    assert max(r.sqnr_lost_db for r in rep.rows) < SUGGEST_LOST_DB, rep.table()
    assert all(r.suggestion == "" for r in rep.rows)


def test_local_sqnr_matches_a_numpy_int8_layer(healthy):
    """The head's local SQNR by hand: LiteRT's own tensor parameters and codes (ai_edge_litert), the float
    model's input and output of ``head`` (torch hooks), int32 accumulation and requantization in numpy."""
    from ai_edge_litert.interpreter import Interpreter

    model, art = healthy
    rep = layer_errors(art, model=model)
    row = next(r for r in rep.rows if r.module == "head")
    it = Interpreter(model_path=str(art.file("model.tflite")))
    details = {d["index"]: d for d in it.get_tensor_details()}
    (fc,) = [op for op in it._get_ops_details() if op["op_name"] == "FULLY_CONNECTED"]
    xi, wi, bi = fc["inputs"]
    x_d, w_d, b_d, y_d = details[xi], details[wi], details[bi], details[fc["outputs"][0]]
    seen = {}
    model.head.register_forward_hook(lambda m, i, o: seen.update(x=i[0].numpy(), y=o.numpy()))
    golden, _ = art.golden()
    with torch.no_grad():
        model(torch.from_numpy(golden[0]))
    (sx,), (zx,) = x_d["quantization_parameters"]["scales"], x_d["quantization_parameters"]["zero_points"]
    (sy,), (zy,) = y_d["quantization_parameters"]["scales"], y_d["quantization_parameters"]["zero_points"]
    sw = w_d["quantization_parameters"]["scales"]
    xq = np.clip(np.rint(seen["x"] / sx) + zx, -128, 127)
    acc = (xq - zx) @ it.get_tensor(wi).astype(np.float64).T + it.get_tensor(bi)
    yq = np.clip(np.rint(acc * (sx * sw / sy)) + zy, -128, 127)
    y = (yq - zy) * sy
    expect = 10 * np.log10(np.sum(seen["y"].astype(np.float64) ** 2) / np.sum((seen["y"] - y) ** 2))
    assert row.sqnr_db == pytest.approx(expect, abs=0.05)


def test_cli_inspect_errors(bad, tmp_path, capsys):
    model, art = bad
    pt2 = tmp_path / "m.pt2"
    golden, _ = art.golden()
    torch.export.save(torch.export.export(model, (torch.from_numpy(golden[0]),)), pt2)
    assert main(["inspect", str(art.path), "--errors", "--model", str(pt2)]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert "float side: the float model" in lines[0]
    assert "spec" in lines[1] and "suggestion" in lines[1]
    assert lines[3].split()[:3] == ["1", "conv2d_1", "mid"] and "float_layers: [mid]" in lines[3]
    np.savez(tmp_path / "x.npz", golden[0])
    assert main(["inspect", str(art.path), "--errors", "--inputs", str(tmp_path / "x.npz"), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["float_source"] == "shadow" and len(data["rows"]) == 5
    assert set(data["rows"][0]) >= {"name", "op", "sqnr_db", "sqnr_lost_db", "spec", "suggestion"}


def test_bad_inputs_and_targets_get_named_errors(bad, tmp_path, capsys):
    model, art = bad
    with pytest.raises(InputError, match=r"packed for \(2, 3, 8, 8\)"):
        layer_errors(art, inputs=[np.zeros((1, 3, 8, 8), np.float32)])
    with pytest.raises(InputError, match="non-empty list"):
        layer_errors(art, inputs=np.zeros((2, 3, 8, 8), np.float32))
    with pytest.raises(InputError, match="does not match"):
        layer_errors(art, model=nn.Sequential(nn.Flatten(), nn.Linear(192, 10)).eval())
    old = copy.copy(art)        # a profile from before rows named their tensor (fused relus: not the layer name)
    old.profile = {**art.profile, "layers": [{k: v for k, v in r.items() if k not in ("tensor", "layout")}
                                             for r in art.profile["layers"]]}
    with pytest.raises(InputError, match="deploy it again"):
        layer_errors(old)
    fp16 = sdk.deploy(nn.Sequential(nn.Linear(4, 4)).eval(), target="fp16-gpu", example_inputs=(torch.randn(1, 4),),
                      output=tmp_path / "fp16", progress=False)
    with pytest.raises(InputError, match="supports arm-int8, arm-fp32"):
        layer_errors(fp16)
    assert main(["inspect", str(fp16.path), "--errors"]) == 2
    assert "supports arm-int8" in capsys.readouterr().err
