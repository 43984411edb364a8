"""An artifact is data from someone else: strict schema, files confined to the
directory, keyed signatures, and deploys that never delete what the user owns."""

import hashlib
import json
import os
import re
import threading

import pytest
import torch

import sdk
from sdk.artifact import Staging
from sdk.errors import ArtifactError, ConfigError
from tamper import rehash


@pytest.fixture
def art(example_plugin, tmp_path, small_cnn):
    return sdk.deploy(small_cnn, target="torch-ir", example_inputs=(torch.randn(1, 1, 8, 8),),
                      output=tmp_path / "art")


def _rewrite(art_path, edit):
    """Apply ``edit`` to the manifest dict and write it back (a sender rewriting it)."""
    m = json.loads((art_path / "manifest.json").read_text())
    edit(m)
    (art_path / "manifest.json").write_text(json.dumps(m))


@pytest.mark.parametrize("name", ["../outside.txt", "/etc/hostname", "sub/x", "..", ".hidden", "a\\b", ""])
def test_file_names_are_confined(art, tmp_path, name):
    outside = tmp_path / "outside.txt"
    outside.write_text("secret")
    digest = hashlib.sha256(b"secret").hexdigest()
    _rewrite(art.path, lambda m: m["files"].__setitem__(name, {"sha256": digest, "bytes": 6}))
    with pytest.raises(ArtifactError, match="not a plain file name"):
        sdk.load(art.path)


def test_symlink_out_of_the_artifact_is_refused(art, tmp_path):
    outside = tmp_path / "outside.bin"
    outside.write_bytes((art.path / "weights.npz").read_bytes())
    os.remove(art.path / "weights.npz")
    os.symlink(outside, art.path / "weights.npz")
    with pytest.raises(ArtifactError, match="weights.npz is missing or does not match"):
        sdk.load(art.path)


def test_size_is_checked_before_reading(art):
    # a listed size that differs from the file is refused from lstat alone, the same message as a bad hash
    _rewrite(art.path, lambda m: m["files"]["weights.npz"].__setitem__("bytes", 1 << 30))
    with pytest.raises(ArtifactError, match="weights.npz is missing or does not match its size"):
        sdk.load(art.path)
    _rewrite(art.path, lambda m: m["files"]["weights.npz"].__setitem__("bytes", 1 << 40))
    with pytest.raises(ArtifactError, match=r"files.weights.npz.bytes"):
        sdk.load(art.path)


@pytest.mark.parametrize("version", [True, 0, -1, "1", 1.0, None])
def test_format_version_must_be_a_positive_integer(art, version):
    _rewrite(art.path, lambda m: m.__setitem__("format_version", version))
    with pytest.raises(ArtifactError, match="format_version"):
        sdk.load(art.path)


@pytest.mark.parametrize("path, value, where", [
    (("inputs", 0, "shape"), "abc", "inputs[0].shape"),
    (("inputs", 0, "shape"), [1, -1], "inputs[0].shape"),
    (("inputs", 0, "shape"), [1 << 20, 1 << 20, 1 << 20], "inputs[0].shape"),
    (("inputs", 0, "dtype"), "object", "inputs[0].dtype"),
    (("inputs", 0, "layout"), [0, 0, 1, 2], "inputs[0].layout"),
    (("inputs", 0, "quantization"), {"scale": [0.1], "zero_point": [0, 1], "axis": None}, "quantization.zero_point"),
    (("inputs", 0, "quantization"), {"scale": [float("nan")], "zero_point": [0], "axis": None}, "quantization.scale"),
    (("inputs", 0, "quantization"), {"scale": [0.1, 0.2], "zero_point": [0, 0], "axis": 7}, "quantization.axis"),
    (("inputs",), [], "inputs"),
    (("outputs", 0), "x", "outputs[0]"),
    (("target",), "torch-ir", "target"),
    (("target", "name"), 3, "target.name"),
    (("verify",), {"max_lsb": "1"}, "verify.max_lsb"),
    (("files",), [], "files"),
    (("plugins",), [{"kind": 1}], "plugins[0].kind"),
])
def test_manifest_types_are_checked(art, path, value, where):
    def edit(m):
        obj = m
        for key in path[:-1]:
            obj = obj[key]
        obj[path[-1]] = value
    _rewrite(art.path, edit)
    with pytest.raises(ArtifactError, match=r"manifest.json: .*" + re.escape(where)):
        sdk.load(art.path)


@pytest.mark.parametrize("profile", [[], {"layers": "x"}, {"layers": [{"macs": "many"}]},
                                     {"totals": {"bytes": None}}, {"latency_ms": {"host": "fast"}},
                                     {"layers": [{"in_shape": [1, "a"]}]}])
def test_profile_types_are_checked(art, profile):
    (art.path / "profile.json").write_text(json.dumps(profile))
    rehash(art.path, "profile.json")
    with pytest.raises(ArtifactError, match="profile.json"):
        sdk.load(art.path)


def test_golden_must_match_the_signature(art):
    import io

    import numpy as np

    buf = io.BytesIO()
    np.savez(buf, input_0=np.zeros((2, 2), np.float32), output_0=np.zeros((1, 10), np.float32))
    (art.path / "golden.npz").write_bytes(buf.getvalue())
    rehash(art.path, "golden.npz")
    with pytest.raises(ArtifactError, match="golden.npz is damaged"):
        sdk.load(art.path)
    buf = io.BytesIO()
    np.save(buf, np.array([object()], dtype=object), allow_pickle=True)
    (art.path / "golden.npz").write_bytes(buf.getvalue())
    rehash(art.path, "golden.npz")
    with pytest.raises(ArtifactError, match="golden.npz is damaged"):
        sdk.load(art.path)


def test_load_takes_a_path():
    with pytest.raises(ArtifactError, match="takes the artifact directory's path"):
        sdk.load(None)


# -- signatures ----------------------------------------------------------------

def test_hmac_signature(art, tmp_path):
    key = os.urandom(32)
    sdk.sign(art.path, key)
    assert sdk.load(art.path, verify_key=key).target == "torch-ir"
    keyfile = tmp_path / "team.key"
    keyfile.write_bytes(key)
    assert sdk.load(art.path, verify_key=keyfile).target == "torch-ir"
    assert sdk.load(art.path).target == "torch-ir"               # without a key the signature is not needed
    with pytest.raises(ArtifactError, match="not signed by this key"):
        sdk.load(art.path, verify_key=os.urandom(32))
    with pytest.raises(ConfigError, match="at least 16 bytes"):
        sdk.load(art.path, verify_key=b"short")
    # a sender who rewrites a file and its hash breaks the signature
    (art.path / "graph.json").write_text((art.path / "graph.json").read_text().replace("relu", "relu "))
    rehash(art.path, "graph.json")
    sdk.load(art.path)
    with pytest.raises(ArtifactError, match="not signed by this key"):
        sdk.load(art.path, verify_key=key)


def test_unsigned_is_refused_when_a_key_is_given(art):
    with pytest.raises(ArtifactError, match="is not signed"):
        sdk.load(art.path, verify_key=os.urandom(32))


def test_ed25519_signature(art, tmp_path):
    pytest.importorskip("cryptography")
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    private = ed25519.Ed25519PrivateKey.generate()
    pem = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    public = private.public_key().public_bytes(serialization.Encoding.PEM,
                                               serialization.PublicFormat.SubjectPublicKeyInfo)
    sdk.sign(art.path, pem)
    assert json.loads((art.path / "signature.json").read_text())["algorithm"] == "ed25519"
    assert sdk.load(art.path, verify_key=public).target == "torch-ir"
    other = ed25519.Ed25519PrivateKey.generate().public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    with pytest.raises(ArtifactError, match="not signed by this key"):
        sdk.load(art.path, verify_key=other)
    with pytest.raises(ArtifactError, match="not signed by this key"):    # an HMAC key does not pass either
        sdk.load(art.path, verify_key=os.urandom(32))


# -- output handling ------------------------------------------------------------

def _deploy(model, output, **kw):
    return sdk.deploy(model, target="torch-ir", example_inputs=(torch.randn(1, 1, 8, 8),), output=output, **kw)


def test_deploy_never_removes_what_is_not_an_artifact(example_plugin, small_cnn, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "manifest.json").write_text("my own notes")
    (mine / "thesis.tex").write_text("precious")
    for overwrite in (False, True):
        with pytest.raises(ArtifactError, match="not an edgepack artifact.*never deletes it"):
            _deploy(small_cnn, mine, overwrite=overwrite)
    assert sorted(p.name for p in mine.iterdir()) == ["manifest.json", "thesis.tex"]
    assert (mine / "thesis.tex").read_text() == "precious"
    afile = tmp_path / "a-file"
    afile.write_text("x")
    with pytest.raises(ArtifactError, match="not a directory"):
        _deploy(small_cnn, afile)
    link = tmp_path / "link"
    link.symlink_to(mine)
    with pytest.raises(ArtifactError, match="symbolic link"):
        _deploy(small_cnn, link, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "link", "mine"]


def test_empty_directory_becomes_the_artifact(example_plugin, small_cnn, tmp_path):
    (tmp_path / "out").mkdir()
    assert _deploy(small_cnn, tmp_path / "out").target == "torch-ir"


def test_output_under_a_file_is_a_clean_error(example_plugin, small_cnn, tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(ArtifactError):
        _deploy(small_cnn, tmp_path / "f" / "out")


def test_stale_staging_of_a_dead_process_is_removed(example_plugin, small_cnn, tmp_path):
    dead = tmp_path / ".out.staging-999999999-abc"     # no such pid
    dead.mkdir()
    (dead / "model.tflite").write_bytes(b"half")
    alive = tmp_path / f".out.staging-{os.getpid()}-xyz"
    alive.mkdir()
    _deploy(small_cnn, tmp_path / "out")
    assert not dead.exists() and alive.exists()


def test_concurrent_commit_to_one_output_is_an_artifact_error(example_plugin, small_cnn, tmp_path):
    with Staging(tmp_path / "out"):
        with pytest.raises(ArtifactError, match="another deploy is writing"):
            _deploy(small_cnn, tmp_path / "out")
    assert _deploy(small_cnn, tmp_path / "out").target == "torch-ir"      # the lock went with the first


def test_replacement_is_one_exchange(example_plugin, small_cnn, tmp_path, monkeypatch):
    import sdk.artifact as A

    first = _deploy(small_cnn, tmp_path / "out")
    seen = []
    real = A._exchange

    def spy(a, b):
        assert b.is_dir() and A.load(b)           # the old artifact is in place until the exchange
        ok = real(a, b)
        seen.append(ok)
        return ok
    monkeypatch.setattr(A, "_exchange", spy)
    second = _deploy(small_cnn, tmp_path / "out", overwrite=True)
    assert seen == [True] and second.path == first.path
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_session_opens_once_across_threads(art, monkeypatch, example_plugin, in_threads):
    opened = []
    real_open = example_plugin.TorchIRRunner.open

    def counting_open(self, artifact):
        opened.append(1)
        return real_open(self, artifact)
    monkeypatch.setattr(example_plugin.TorchIRRunner, "open", counting_open)
    fresh = sdk.load(art.path)
    barrier = threading.Barrier(8)

    def go(k):
        barrier.wait()
        fresh.session("host")
    in_threads(go, 8)
    assert len(opened) == 1
