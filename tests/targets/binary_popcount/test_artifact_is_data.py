"""A binary-popcount artifact is data, never code.

A hostile sender controls every byte of an artifact and can rewrite the
manifest's sha256 list, so these tests tamper with files *and* rewrite their
hashes: a C constructor payload in ``model.c`` or a bundled kernel must be
refused before anything is compiled (the payload writes a marker file; the
marker never appears), a shared object planted in the compile cache must never
be loaded, and damaged ``layers.json`` / ``weights.bin`` must end in
``ArtifactError``, nothing else.  Untampered artifacts still run, on several
threads at once, with the same outputs.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import random
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

import sdk
from examples.models import LeNet
from sdk.errors import ArtifactError, InputError, ToolchainError
from targets.binary_popcount import binary_layer_agreement, blob, build, emit, packing
from targets.binary_popcount import reference as ref
from targets.binary_popcount import specs as sp
from targets.binary_popcount.runners import artifact_specs, dump_specs, load_specs
from tamper import rewrite

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler")]

XNOR_RECIPE = {"stages": [{"method": "xnor", "config": {"epochs": 1, "progress": False}}]}
SHAPE = (2, 1, 8, 8)


def payload_c(marker: Path) -> str:
    return f"""
#include <stdio.h>
__attribute__((constructor)) static void edgepack_test_payload(void) {{
    FILE *f = fopen("{marker}", "w");
    if (f) {{ fputs("payload ran\\n", f); fclose(f); }}
}}
"""


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A private compile cache for the module (EDGEPACK_CACHE), so planted files stay here."""
    root = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EDGEPACK_CACHE", str(root))
        yield build.default_cache_dir()


@pytest.fixture(scope="module")
def art(cache, tmp_path_factory):
    """LeNet (width 8) through the xnor recipe for one epoch on random data: Sign, BinaryConv,
    MeanAbsScale, ScaleBias, pools and float layers, deployed in a few seconds."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(16, 1, 8, 8, generator=g), torch.randint(0, 4, (16,), generator=g)) for _ in range(2)]
    return sdk.deploy(LeNet(4, width=8), "binary-popcount", (torch.randn(SHAPE),), recipe=XNOR_RECIPE, data=data,
                      output=tmp_path_factory.mktemp("deploy") / "art", progress=False)


@pytest.fixture(scope="module")
def inputs():
    rng = np.random.default_rng(3)
    return [rng.standard_normal(SHAPE).astype(np.float32) for _ in range(4)]


def copy_of(art, tmp_path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(art.path, dst)
    return dst


# --------------------------------------------------------------------------- C payloads


def test_the_payload_runs_when_the_shipped_sources_are_compiled(art, tmp_path):
    """The control for the refusals below: compiling the tampered files runs the payload."""
    marker = tmp_path / "ran"
    src = copy_of(art, tmp_path)
    rewrite(src, "model.c", (src / "model.c").read_bytes() + payload_c(marker).encode())
    build.compile_library([src / p.name for p in build.kernel_sources()] + [src / "model.c", src / "model.h"],
                          cache_dir=tmp_path / "c")
    assert marker.read_text() == "payload ran\n"


@pytest.mark.parametrize("name", ["model.c", "ep_bgemm.c", "ep_kernels.h"])
def test_a_payload_in_a_shipped_c_file_is_refused_and_never_runs(art, tmp_path, name, inputs):
    marker = tmp_path / "ran"
    src = copy_of(art, tmp_path)
    rewrite(src, name, (src / name).read_bytes() + payload_c(marker).encode())
    loaded = sdk.load(src)                             # the rewritten hashes pass
    for runner in ("host", "reference"):
        with pytest.raises(ArtifactError, match=rf"{name} differs from .*deploy the model again") as exc:
            loaded.run(inputs[0], runner=runner)
        assert str(src) in str(exc.value)
    with pytest.raises(ArtifactError, match=f"{name} differs"):
        binary_layer_agreement(loaded, inputs[:1])
    assert not marker.exists()


def test_an_extra_or_missing_c_file_is_refused(art, tmp_path, inputs):
    marker = tmp_path / "ran"
    src = copy_of(art, tmp_path)
    rewrite(src, "ep_extra.c", payload_c(marker).encode())
    with pytest.raises(ArtifactError, match="ep_extra.c is not a file this edgepack ships"):
        sdk.load(src).run(inputs[0])
    rewrite(src, "ep_extra.c", None)
    rewrite(src, "ep_bitpack.c", None)
    with pytest.raises(ArtifactError, match="ep_bitpack.c is missing"):
        sdk.load(src).run(inputs[0])
    assert not marker.exists()


def test_a_model_c_generated_for_other_weights_is_refused(art, tmp_path, inputs):
    """Consistent but foreign: model.c of another model (a valid edgepack file) beside these layers."""
    src = copy_of(art, tmp_path)
    rng = np.random.default_rng(0)
    other = [sp.InputSpec((1, 70)), sp.Sign(), sp.BinaryLinear.from_float(rng.standard_normal((4, 70)))]
    rewrite(src, "model.c", emit.generate_sources(other)[0].encode())
    with pytest.raises(ArtifactError, match="model.c differs from what this edgepack generates"):
        sdk.load(src).run(inputs[0])


def test_a_file_changed_after_load_is_refused(art, tmp_path, inputs):
    src = copy_of(art, tmp_path)
    loaded = sdk.load(src)
    (src / "model.c").write_bytes((src / "model.c").read_bytes() + b"\n")
    with pytest.raises(ArtifactError, match="model.c changed after it was loaded"):
        loaded.run(inputs[0], runner="reference")


# --------------------------------------------------------------------------- the compile cache


@pytest.fixture(scope="module")
def payload_so(tmp_path_factory):
    """A shared object whose constructor writes the marker it returns beside it."""
    root = tmp_path_factory.mktemp("payload")
    marker = root / "ran"
    (root / "payload.c").write_text(payload_c(marker))
    subprocess.run(["cc", "-shared", "-fPIC", "-o", str(root / "payload.so"), str(root / "payload.c")], check=True)
    return (root / "payload.so").read_bytes(), marker


def plant(so: Path, payload: bytes, sidecar: str) -> None:
    so.write_bytes(payload)
    mac = so.with_name(so.name + ".hmac")
    if sidecar == "none":
        mac.unlink()
    elif sidecar == "forged":                      # what a sender without the key can compute
        mac.write_text(hashlib.sha256(payload).hexdigest() * 2)
    # "stale": the genuine sidecar of the object the payload replaced


@pytest.mark.parametrize("sidecar", ["none", "stale", "forged"])
def test_a_shared_object_planted_in_the_cache_is_rebuilt_not_loaded(tmp_path, payload_so, sidecar):
    payload, marker = payload_so
    src = tmp_path / "lib.c"
    src.write_text("int edgepack_test_answer(void) { return 42; }\n")
    so = build.build_shared_object([src], cache_dir=tmp_path / "c")    # built, signed, never loaded
    plant(so, payload, sidecar)
    lib = build.compile_library([src], cache_dir=tmp_path / "c")
    assert lib.edgepack_test_answer() == 42
    assert not marker.exists() and so.read_bytes() != payload


def test_a_planted_object_named_for_the_artifact_is_never_loaded(art, tmp_path, monkeypatch, payload_so, inputs):
    payload, marker = payload_so
    monkeypatch.setenv("EDGEPACK_CACHE", str(tmp_path / "fresh"))   # an object name this process never loaded
    model_c, model_h = emit.generate_sources(artifact_specs(art)[0])
    (tmp_path / "model.c").write_text(model_c)
    (tmp_path / "model.h").write_text(model_h)
    so = build.build_shared_object([tmp_path / "model.c", tmp_path / "model.h", *build.kernel_sources()])
    plant(so, payload, "none")
    got = sdk.load(art.path).run(inputs[0])[0]
    assert not marker.exists() and so.read_bytes() != payload
    np.testing.assert_array_equal(got, art.run(inputs[0])[0])


def test_the_cache_is_private_and_keyed(tmp_path):
    src = tmp_path / "lib.c"
    src.write_text("int f(void) { return 1; }\n")
    cache = tmp_path / "a" / "kernels"
    so = build.build_shared_object([src], cache_dir=cache)
    assert cache.stat().st_mode & 0o777 == 0o700
    assert (cache / "cache.key").stat().st_mode & 0o777 == 0o600 and len((cache / "cache.key").read_bytes()) == 32
    assert len(so.with_name(so.name + ".hmac").read_text()) == 64

    (cache / "cache.key").chmod(0o644)
    with pytest.raises(ToolchainError, match="cache.key is not a 32-byte file readable only by you; delete it"):
        build.build_shared_object([src], cache_dir=cache)
    (cache / "cache.key").unlink()                  # a new key: what the old one signed is rebuilt
    tag = so.with_name(so.name + ".hmac").read_text()
    assert build.build_shared_object([src], cache_dir=cache) == so
    assert so.with_name(so.name + ".hmac").read_text() != tag

    cache.chmod(0o777)
    with pytest.raises(ToolchainError, match=r"writable by group or others \(mode 0777\).*chmod go-w"):
        build.compile_library([src], cache_dir=cache)
    cache.chmod(0o700)
    if os.getuid() == 0:                            # only root can give the directory away
        os.chown(cache, 4321, -1)
        with pytest.raises(ToolchainError, match="belongs to uid 4321, not to you"):
            build.compile_library([src], cache_dir=cache)


# --------------------------------------------------------------------------- hostile layers.json and weights.bin


def _layer(doc, kind):
    return next(layer for layer in doc["layers"] if layer["type"] == kind)


def _set(path, value):
    def edit(doc):
        obj = doc
        for key in path[:-1]:
            obj = obj[key] if not callable(key) else key(obj)
        obj[path[-1]] = value
    return edit


def _conv(doc):
    return _layer(doc, "BinaryConv")


def _relu(doc):
    return _layer(doc, "ReLU")


def _shift_conv_weight(doc):
    _conv(doc)["arrays"]["weight"]["offset"] += 64


SMALL = {"offset": 64, "dtype": "<f4", "shape": [1]}


MUTATIONS = {
    "format-bool": _set(["format"], True),
    "format-str": _set(["format"], "1"),
    "format-2": _set(["format"], 2),
    "extra-top-key": _set(["code"], "int main;"),
    "layers-dict": _set(["layers"], {}),
    "layers-empty": _set(["layers"], []),
    "layer-list": _set(["layers", 1], [1, 2]),
    "unknown-type": _set(["layers", 1, "type"], "System"),
    "type-list": _set(["layers", 1, "type"], ["Sign"]),
    "name-int": _set(["layers", 1, "name"], 7),
    "name-control": _set(["layers", 1, "name"], "a\n*/ system(\"x\"); /*"),
    "name-huge": _set(["layers", 1, "name"], "n" * 5000),
    "field-str": _set([_conv, "fields", "stride"], "1"),
    "field-bool": _set([_conv, "fields", "stride"], True),
    "field-float": _set([_conv, "fields", "padding"], 1.0),
    "field-negative": _set([_conv, "fields", "padding"], -1),
    "field-huge": _set([_conv, "fields", "padding"], 1 << 40),
    "field-c-text": _set([_conv, "fields", "stride"], "1); system(\"id\"); (1"),
    "field-unknown": _set([_conv, "fields", "code"], 1),
    "field-missing": lambda d: _conv(d)["fields"].pop("in_channels"),
    "fields-list": _set([_conv, "fields"], [1]),
    "padding-vast": _set([_conv, "fields", "padding"], 1 << 23),
    "src-forward": _set([_conv, "fields", "src"], 99),
    "src-self": lambda d: _conv(d)["fields"].__setitem__("src", d["layers"].index(_conv(d))),
    "in-channels-wrong": _set([_conv, "fields", "in_channels"], 9),
    "input-huge": _set(["layers", 0, "fields", "shape"], [1, 1, 100000, 100000]),
    "input-zero": _set(["layers", 0, "fields", "shape"], [0, 1, 8, 8]),
    "input-1d": _set(["layers", 0, "fields", "shape"], [2]),
    "input-empty": _set(["layers", 0, "fields", "shape"], []),
    "input-nested": _set(["layers", 0, "fields", "shape"], [[2], 1, 8, 8]),
    "dtype-object": _set([_conv, "arrays", "weight", "dtype"], "|O"),
    "dtype-f8": _set([_conv, "arrays", "alpha", "dtype"], "<f8"),
    "dtype-big-endian": _set([_conv, "arrays", "alpha", "dtype"], ">f4"),
    "dtype-int": _set([_conv, "arrays", "alpha", "dtype"], 5),
    "dtype-struct": _set([_conv, "arrays", "alpha", "dtype"], [["a", "<f4"]]),
    "shape-huge": _set([_conv, "arrays", "weight", "shape"], [1 << 20, 1 << 20, 3, 1]),
    "shape-rank": _set([_conv, "arrays", "weight", "shape"], [16, 9, 1]),
    "shape-negative": _set([_conv, "arrays", "alpha", "shape"], [-16]),
    "shape-str": _set([_conv, "arrays", "alpha", "shape"], "16"),
    "offset-negative": _set([_conv, "arrays", "weight", "offset"], -64),
    "offset-past-end": _set([_conv, "arrays", "weight", "offset"], 1 << 40),
    "offset-into-header": _set([_conv, "arrays", "weight", "offset"], 0),
    "offset-shifted": _shift_conv_weight,
    "offset-float": _set([_conv, "arrays", "weight", "offset"], 576.0),
    "offset-str": _set([_conv, "arrays", "weight", "offset"], "576"),
    "array-missing": lambda d: _conv(d)["arrays"].pop("alpha"),
    "array-unknown": _set([_conv, "arrays", "code"], SMALL),
    "array-extra-key": _set([_conv, "arrays", "alpha", "code"], 1),
    "array-on-relu": _set([_relu, "arrays", "weight"], SMALL),
    "two-inputs": lambda d: d["layers"].insert(1, copy.deepcopy(d["layers"][0])),
    "layers-too-many": _set(["layers"], [{"type": "ReLU", "name": "r", "fields": {}, "arrays": {}}] * 5000),
}

BLOBS = {
    "not-json": b"{\"format\": 1, ",
    "not-utf8": b"\xff\xfe\x00{",
    "json-list": b"[1, 2]",
    "json-null": b"null",
    "deep": b"[" * 100_000 + b"]" * 100_000,
    "long-int": b"{\"format\": " + b"1" * 10_000 + b", \"layers\": []}",
    "nan": b"{\"format\": NaN, \"layers\": []}",
}


@pytest.fixture(scope="module")
def stored(art):
    return art.file("layers.json").read_bytes(), art.file("weights.bin").read_bytes()


@pytest.mark.parametrize("case", sorted(MUTATIONS))
def test_a_damaged_layers_json_is_an_artifact_error(stored, case):
    layers, weights = stored
    doc = json.loads(layers)
    MUTATIONS[case](doc)
    with pytest.raises(ArtifactError):
        load_specs(json.dumps(doc).encode(), weights)


@pytest.mark.parametrize("case", sorted(BLOBS))
def test_a_layers_json_that_is_no_document_is_an_artifact_error(stored, case):
    with pytest.raises(ArtifactError, match="layers.json"):
        load_specs(BLOBS[case], stored[1])


@pytest.mark.parametrize("case", ["truncated", "extended", "empty", "padding", "fingerprint"])
def test_a_damaged_weights_bin_is_an_artifact_error(stored, case):
    layers, weights = stored
    w = bytearray(weights)
    if case == "truncated":
        w = w[:-8]
    elif case == "extended":
        w += b"\0" * 64
    elif case == "empty":
        w = bytearray()
    elif case == "padding":                        # between two arrays: no spec reads it, the blob check does
        w[_layer(json.loads(layers), "BinaryConv")["arrays"]["weight"]["offset"] - 1] ^= 0xFF
    else:
        w[16] ^= 1
    with pytest.raises(ArtifactError, match="weights.bin"):
        load_specs(layers, bytes(w))


def test_damaged_layers_reach_the_user_as_artifact_errors(art, tmp_path, inputs):
    src = copy_of(art, tmp_path)
    doc = json.loads((src / "layers.json").read_text())
    MUTATIONS["dtype-object"](doc)
    rewrite(src, "layers.json", json.dumps(doc).encode())
    for runner in ("host", "reference"):
        with pytest.raises(ArtifactError, match=r"layers.json: layer \d+ \(BinaryConv .*dtype '\|O'.*deploy the model"):
            sdk.load(src).run(inputs[0], runner=runner)


def test_manifest_shapes_must_match_the_layers(art, tmp_path, inputs):
    src = copy_of(art, tmp_path)
    doc = json.loads((src / "layers.json").read_text())
    doc["layers"][0]["fields"]["shape"] = [1, 1, 8, 8]     # a valid network of batch 1 under a batch-2 manifest
    specs = load_specs(json.dumps(doc).encode(), (src / "weights.bin").read_bytes())[0]
    assert specs[0].shape == (1, 1, 8, 8)
    rewrite(src, "layers.json", json.dumps(doc).encode())
    with pytest.raises(ArtifactError, match="its manifest gives inputs and outputs of shapes"):
        sdk.load(src).session("reference")


def _mutate(rng: random.Random, node, depth=0):
    """One random edit somewhere in a JSON tree (in place); returns the (possibly new) root."""
    hostile = [None, True, -1, 0, 1 << 31, 1.5, "", "<f4", "x" * 300, [], {}, [1, 2], {"a": 1}, 64, 10 ** 30]
    if isinstance(node, (dict, list)) and node and rng.random() < 0.8:
        keys = list(node) if isinstance(node, dict) else list(range(len(node)))
        key = rng.choice(keys)
        node[key] = _mutate(rng, node[key], depth + 1)
        if rng.random() < 0.1:
            node.pop(key) if isinstance(node, dict) else node.pop(key)
        return node
    if isinstance(node, int) and not isinstance(node, bool) and rng.random() < 0.6:
        return node + rng.choice([-65, -64, -1, 1, 64, 1 << 20])
    return rng.choice(hostile)


def test_random_damage_is_an_artifact_error_or_the_same_model(stored):
    """Seeded fuzz: tree edits of layers.json and byte flips of both files."""
    layers, weights = stored
    rng = random.Random(1234)
    refused = 0
    for _ in range(400):
        doc, w = json.loads(layers), weights
        if rng.random() < 0.7:
            for _ in range(rng.randint(1, 3)):
                doc = _mutate(rng, doc)
        else:
            w = bytearray(weights)
            w[rng.randrange(len(w))] ^= 1 << rng.randrange(8)
            w = bytes(w)
        text = json.dumps(doc).encode()
        if rng.random() < 0.2:
            text = bytearray(text)
            text[rng.randrange(len(text))] = rng.randrange(256)
            text = bytes(text)
        try:
            specs, _ = load_specs(text, w)
        except ArtifactError:
            refused += 1
            continue
        # accepted: a well-formed model of exactly these bytes (maybe another one, e.g. a layer reading an
        # earlier tensor, which artifact_specs then refuses since the shipped model.c is not its code)
        assert blob.write_weights_bin(specs) == w
        emit.generate_sources(specs)
        ref.run_reference(specs, np.zeros(specs[0].shape, np.float32))
    assert refused > 300


def test_every_layer_type_round_trips_through_layers_json():
    rng = np.random.default_rng(5)
    specs = [sp.InputSpec((2, 3, 8, 8)), sp.FloatConv(rng.standard_normal((70, 3, 3, 3)), rng.standard_normal(70),
                                                      padding=1),
             sp.ScaleBias(rng.standard_normal(70), rng.standard_normal(70)), sp.PReLU(rng.standard_normal(70)),
             sp.Sign(rng.standard_normal(70)), sp.BinaryConv.from_float(rng.standard_normal((16, 70, 3, 3)), padding=1),
             sp.MeanAbsScale(other=3, kernel=3, padding=1), sp.ReLU(), sp.MaxPool(2),
             sp.AvgPool(2, stride=1, padding=1), sp.Add(other=9, src=9), sp.GlobalAvgPool(src=8), sp.Flatten(),
             sp.FloatLinear(rng.standard_normal((70, 16))), sp.Sign(),
             sp.BinaryLinear.from_float(rng.standard_normal((5, 70))), sp.FloatLinear(rng.standard_normal((3, 5))),
             sp.Clamp.between(-np.inf, 0.5),
             sp.BwnLinear.from_float(rng.standard_normal((13, 3)), bias=rng.standard_normal(13)), sp.ReLU(src=9),
             sp.BwnConv.from_float(rng.standard_normal((11, 16, 3, 3)), stride=2, padding=1)]
    n = len(specs)
    grid = packing.weight_planes(((2 * rng.integers(0, 4, (6, 70, 3, 3)) - 3) / 3).astype(np.float32))
    three = packing.weight_planes(rng.integers(-1, 2, (5, 70, 3, 3)).astype(np.float32))
    specs += [sp.BitPlanes(np.array([3.0], np.float32), 2, src=1), sp.BitSerialConv.from_planes(*grid, padding=1),
              sp.ResidualSign(2, src=1), sp.BitSerialConv.from_planes(*grid, stride=2),
              sp.PlaneWeightConv.from_planes(*three, bias=rng.standard_normal(5), padding=1, src=1), sp.Flatten(),
              sp.PlaneWeightLinear.from_planes(*packing.weight_planes(rng.integers(-1, 2, (4, 320)).astype(
                  np.float32))), sp.BitPlanes(np.array([1.0], np.float32), 3),
              sp.BitSerialLinear.from_planes(*packing.weight_planes(np.array([[1.0, -3, 1, 3]] * 3, np.float32))),
              sp.CodebookConv.from_codebook(rng.integers(0, 5, (6, 70)), rng.integers(-32, 32, (5, 3, 3)), 0.5,
                                            rng.standard_normal(6), padding=1, src=1)]
    assert sp.infer_shapes(specs)[n + 3].kind == "float"
    assert {type(s).__name__ for s in specs} == set(sp.LAYER_KINDS)
    names = [f"layer{i}" for i in range(len(specs))]
    back, back_names = load_specs(dump_specs(specs, names), blob.write_weights_bin(specs))
    assert back_names == names and emit.generate_sources(back) == emit.generate_sources(specs)
    x = rng.standard_normal((2, 3, 8, 8)).astype(np.float32)
    np.testing.assert_array_equal(ref.run_reference(back, x)[0], ref.run_reference(specs, x)[0])


# --------------------------------------------------------------------------- untampered artifacts, inputs, threads


def test_an_untampered_artifact_runs_and_agrees_with_the_reference(art, inputs):
    loaded = sdk.load(art.path)
    for x in inputs:
        host, want = loaded.run(x)[0], loaded.run(x, runner="reference")[0]
        np.testing.assert_allclose(host, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    rows = binary_layer_agreement(loaded, inputs)
    assert rows and all(r["elements"] > 0 and r["mismatches"] == 0 for r in rows), rows


@pytest.mark.parametrize("runner", ["host", "reference"])
def test_runners_refuse_inputs_of_another_shape(art, runner):
    session = art.session(runner)
    for bad in ([np.zeros((1, 1, 8, 8), np.float32)], [], [np.zeros(SHAPE, np.float32)] * 2, [object()]):
        with pytest.raises(InputError):
            session(bad)
    with pytest.raises(InputError, match=r"shape \(2, 1, 8, 8\)"):
        binary_layer_agreement(art, [np.zeros((2, 1, 8, 9), np.float32)])


@pytest.mark.parametrize("runner", ["host", "reference"])
def test_runners_are_safe_from_four_threads(art, inputs, runner, in_threads):
    loaded = sdk.load(art.path)
    want = [loaded.run(x, runner=runner)[0] for x in inputs]
    errors, wrong = [], []

    def work(seed):
        try:
            for i in range(50):
                k = (seed + i) % len(inputs)
                if not np.array_equal(loaded.run(inputs[k], runner=runner)[0], want[k]):
                    wrong.append(k)
        except Exception as exc:  # noqa: BLE001 - any failure in a thread is the finding
            errors.append(exc)

    in_threads(work)
    assert errors == [] and wrong == []


def test_kernel_library_wrappers_are_safe_from_four_threads(in_threads):
    lib = build.load_kernels()
    rng = np.random.default_rng(0)
    # workspaces of different sizes: a shared one would be regrown under another thread's feet
    cases = [(rng.integers(0, 1 << 63, (256, kw), dtype=np.uint64), rng.integers(0, 1 << 63, (n, kw), dtype=np.uint64))
             for n, kw in ((64, 8), (256, 16), (96, 24), (128, 16))]
    want = [ref.binary_gemm(a, b, 64 * a.shape[1]) for a, b in cases]
    wrong = []

    def work(seed):
        for i in range(50):
            k = (seed + i) % len(cases)
            if not np.array_equal(lib.bgemm(*cases[k], 64 * cases[k][0].shape[1]), want[k]):
                wrong.append(k)

    in_threads(work)
    assert wrong == []
