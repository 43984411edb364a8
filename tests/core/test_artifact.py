"""Artifact format: hashes, versions, foreign directories, atomic writes."""

import json
import os

import pytest
import torch

import sdk
from sdk.errors import ArtifactError, InputError


@pytest.fixture
def art(example_plugin, tmp_path, small_cnn):
    return sdk.deploy(small_cnn, target="torch-ir", example_inputs=(torch.randn(1, 1, 8, 8),),
                      output=tmp_path / "art")


def test_manifest_contents(art):
    m = art.manifest
    assert m["format"] == "edgepack-artifact" and m["format_version"] == 1
    assert m["edgepack_version"] == sdk.__version__
    assert m["target"]["name"] == "torch-ir"
    assert m["inputs"][0]["shape"] == [1, 1, 8, 8] and m["outputs"][0]["shape"] == [1, 10]
    assert set(m["files"]) == {"graph.json", "weights.npz", "golden.npz", "profile.json"}
    assert all(len(f["sha256"]) == 64 for f in m["files"].values())
    assert art.profile["latency_ms"]["host"] > 0
    assert sdk.load(art.path).manifest == m


@pytest.mark.parametrize("name", ["weights.npz", "graph.json", "profile.json", "golden.npz"])
def test_flipped_byte_is_refused(art, name):
    path = art.path / name
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=f"{name} is missing or does not match its size and sha256"):
        sdk.load(art.path)


def test_missing_extra_foreign_and_newer(art, tmp_path):
    (art.path / "notes.txt").write_text("x")
    with pytest.raises(ArtifactError, match="does not list: notes.txt"):
        sdk.load(art.path)
    os.remove(art.path / "notes.txt")
    os.remove(art.path / "golden.npz")
    with pytest.raises(ArtifactError, match="golden.npz is missing or does not match"):
        sdk.load(art.path)

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "manifest.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(ArtifactError, match="not an edgepack artifact"):
        sdk.load(foreign)
    (foreign / "manifest.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="not valid JSON"):
        sdk.load(foreign)
    (foreign / "manifest.json").write_text(json.dumps({"format": "edgepack-artifact", "format_version": 7}))
    with pytest.raises(ArtifactError, match="upgrade edgepack"):
        sdk.load(foreign)
    with pytest.raises(ArtifactError, match="no manifest.json"):
        sdk.load(tmp_path)


def test_redeploy_replaces_artifact_and_refuses_foreign_dir(example_plugin, art, small_cnn, tmp_path):
    before = (art.path / "manifest.json").read_bytes()
    with pytest.raises(ArtifactError, match="overwrite=True"):
        sdk.deploy(small_cnn, target="torch-ir", example_inputs=(torch.randn(1, 1, 8, 8),), output=art.path)
    assert (art.path / "manifest.json").read_bytes() == before
    again = sdk.deploy(small_cnn, target="torch-ir", example_inputs=(torch.randn(1, 1, 8, 8),), output=art.path,
                       overwrite=True)
    assert sdk.load(again.path).target == "torch-ir"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]     # no staging, lock or old copy left
    other = tmp_path / "mine"
    other.mkdir()
    (other / "keep.txt").write_text("precious")
    with pytest.raises(ArtifactError, match="not an edgepack artifact"):
        sdk.deploy(small_cnn, target="torch-ir", example_inputs=(torch.randn(1, 1, 8, 8),), output=other)
    assert (other / "keep.txt").read_text() == "precious"


def test_failed_pack_leaves_nothing(example_plugin, tmp_path, small_cnn, monkeypatch):
    def broken(self, graph, plan, calibration=None):
        raise RuntimeError("disk full")

    monkeypatch.setattr(example_plugin.TorchIRTarget, "pack", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        sdk.deploy(small_cnn, target="torch-ir", example_inputs=(torch.randn(1, 1, 8, 8),), output=tmp_path / "o")
    assert list(tmp_path.iterdir()) == []


def test_failed_first_run_leaves_nothing(example_plugin, tmp_path, small_cnn, monkeypatch):
    def broken_open(self, artifact):
        return lambda xs: [xs[0] * float("nan")]

    monkeypatch.setattr(example_plugin.TorchIRRunner, "open", broken_open)
    with pytest.raises(sdk.RunnerError, match="non-finite"):
        sdk.deploy(small_cnn, target="torch-ir", example_inputs=(torch.randn(1, 1, 8, 8),), output=tmp_path / "o")
    assert list(tmp_path.iterdir()) == []


def test_run_checks_shapes_and_verify_reports(art, small_cnn):
    with pytest.raises(InputError, match=r"shape \(1, 1, 9, 9\)"):
        art.run(torch.randn(1, 1, 9, 9))
    with pytest.raises(InputError, match="takes 1 input"):
        art.run(torch.randn(1, 1, 8, 8), torch.randn(1, 1, 8, 8))
    x = torch.randn(1, 1, 8, 8)
    out = art.run(x)[0]
    assert torch.allclose(torch.from_numpy(out), small_cnn(x), atol=1e-5)
    rep = art.verify(small_cnn, inputs=[torch.randn(1, 1, 8, 8) for _ in range(3)])
    assert rep.passed and rep.top1_agreement["host"] == 1.0 and rep.sqnr_db["host"] > 80
