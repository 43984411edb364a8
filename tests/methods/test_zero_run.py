"""zero-run: value quantization above a base, base-encoded values and zero-run coding (weights.zr).

The codec is checked against a bit-string Python reference written from the format's description
(random sparse tensors, all-zero, no-zero, runs past the escape, int8 extremes) and against a size
worked out by hand; the level grid against a brute-force search for its base.  End to end on the
LeNet-300-100 digits MLP that deep-compression uses: a YAML recipe (agp to 90 %, then zero-run)
deploys to arm-int8; weights.zr expands bit-exactly into the int8 weights read from model.tflite,
which lie on the 2^bits levels with the pruned zeros kept; its bytes equal the hand count and are
compared with deep-compression's Huffman weights.dc of the same int8 tensors (both printed); the
artifact's accuracy is the torch model's within 1 point; damaged containers are refused by
sdk.load / the runners with ArtifactError, and a fuzz of byte flips and truncations never gets through.
"""

import random
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

import sdk
from plugins.quantize.zero_run import ZeroRun, level_grid
from sdk import huffman as H
from sdk import zero_run as Z
from sdk.errors import ArtifactError, ConfigError
from sdk.litert.flatbuffer import op_name, read_model, tensor_data
from sdk.report import size_breakdown
from sdk.schema import check_manifest
from sdk.trainer import TrainConfig, evaluate, finetune
from tamper import rewrite

pytestmark = pytest.mark.usefixtures("one_thread")   # tiny models: one thread is faster

BITS = 4
RECIPE_YAML = f"""\
stages:
  - method: agp
    config: {{final_sparsity: 0.9, pruning_steps: 8, frequency: 20, epochs: 8, lr: 0.003, progress: false}}
  - method: zero-run
    config: {{bits: {BITS}}}
"""


# ---------------------------------------------------------------------------
# a straightforward reference of the stream, from the format's description
# ---------------------------------------------------------------------------

def _bytes(bits: str) -> bytes:
    bits += "0" * (-len(bits) % 8)
    return bytes(int(bits[i:i + 8], 2) for i in range(0, len(bits), 8))


def _bits(data: bytes) -> str:
    return "".join(format(b, "08b") for b in data)


def ref_encode(flat, run_bits):
    """(run stream, value stream, base, value_bits, run fields, stream bits) by walking the tensor."""
    nonzero = [v for v in np.asarray(flat).tolist() if v != 0]
    base = min(abs(v) for v in nonzero) if nonzero else 1
    value_bits = 1 + ((max(abs(v) for v in nonzero) - base).bit_length() if nonzero else 0)
    escape = 2 ** run_bits - 1
    runs, values, fields, zeros = "", "", 0, 0
    for v in np.asarray(flat).tolist():
        if v == 0:
            zeros += 1
            continue
        while zeros >= escape:
            runs, zeros, fields = runs + format(escape, f"0{run_bits}b"), zeros - escape, fields + 1
        runs, zeros, fields = runs + format(zeros, f"0{run_bits}b"), 0, fields + 1
        values += ("1" if v < 0 else "0") + (format(abs(v) - base, f"0{value_bits - 1}b") if value_bits > 1 else "")
    return _bytes(runs), _bytes(values), base, value_bits, fields, len(runs) + len(values)


def ref_decode(run_stream, value_stream, fields, nonzeros, run_bits, value_bits, base, count):
    runs, values = _bits(run_stream), _bits(value_stream)
    escape, out, zeros, r, v = 2 ** run_bits - 1, [], 0, 0, 0
    for _ in range(fields):
        field = int(runs[r:r + run_bits], 2)
        r += run_bits
        zeros += field
        if field == escape:
            continue
        out += [0] * zeros
        zeros = 0
        sign, mag = values[v], int(values[v + 1:v + value_bits] or "0", 2) + base
        v += value_bits
        out.append(-mag if sign == "1" else mag)
    assert len([x for x in out if x]) == nonzeros
    return np.array(out + [0] * (count - len(out)), np.int8)


def sparse(rng, n, density, lo=-128, hi=127):
    flat = np.zeros(n, np.int8)
    k = int(round(density * n))
    pos = rng.choice(n, k, replace=False)
    vals = rng.integers(lo, hi + 1, k)
    vals[vals == 0] = 1
    flat[pos] = vals
    return flat


CASES = {
    "all zero": np.zeros(40, np.int8),
    "no zero": np.array([3, -4, 5, 127, -128, 9], np.int8),
    "one value": np.array([0] * 7 + [-5], np.int8),
    "long runs": np.array([0] * 300 + [7] + [0] * 64 + [-7, 8] + [0] * 5, np.int8),
    "levels": np.array([0, 0, 9, -12, 0, 10, 0, 0, 0, -9, 11, 0], np.int8),
}


@pytest.mark.parametrize("name", [*CASES, "random"])
def test_codec_matches_the_bit_string_reference(name):
    rng = np.random.default_rng(7)
    tensors = [CASES[name]] if name in CASES else \
        [sparse(rng, n, d, *lr) for n, d, lr in [(500, 0.1, (-128, 127)), (777, 0.02, (-20, 20)),
                                                  (64, 0.9, (5, 12)), (1000, 0.3, (-8, 8))]]
    for flat in tensors:
        for run_bits in (1, 2, 3, 5, 8, 16):
            t = Z.encode_tensor(flat.reshape(1, -1), "w", run_bits=run_bits)
            runs, values, base, value_bits, fields, nbits = ref_encode(flat, run_bits)
            assert (t.run_stream, t.value_stream) == (runs, values), (name, run_bits)
            assert (t.base, t.value_bits, t.run_count, t.nonzeros) == (base, value_bits, fields,
                                                                       np.count_nonzero(flat))
            assert Z.stream_bits(flat, run_bits, value_bits) == nbits
            assert np.array_equal(t.values().reshape(-1), flat)
            assert np.array_equal(ref_decode(t.run_stream, t.value_stream, t.run_count, t.nonzeros, run_bits,
                                             t.value_bits, t.base, flat.size), flat)
        best = Z.encode_tensor(flat, "w")          # run_bits=None: the smallest stream over 1..16
        assert best.run_bits == min(range(1, 17), key=lambda b: (ref_encode(flat, b)[5], b))


def test_encoded_size_is_the_formula_by_hand():
    # 20 zeros, 3, 2 zeros, -4, 5 zeros: base 3, |v| - 3 in {0, 1}: 1 + 1 bits a value;
    # run_bits 3 (escape 7): 20 = 7 + 7 + 6 -> 3 fields, 2 -> 1 field; trailing zeros cost nothing
    flat = np.array([0] * 20 + [3] + [0] * 2 + [-4] + [0] * 5, np.int8)
    t = Z.encode_tensor(flat, "fc/weight", offset=16, run_bits=3)
    assert (t.base, t.value_bits, t.run_count) == (3, 2, 4)
    assert Z.stream_bits(flat, 3, 2) == 2 * 2 + 3 * (2 + 2) == 16
    assert (len(t.run_stream), len(t.value_stream)) == (2, 1)       # 12 bits, 4 bits, each padded
    assert _bits(t.run_stream) == "111" "111" "110" "010" "0000" and _bits(t.value_stream) == "0011" "0000"
    model = bytes(64)
    blob = Z.write_container([t], model)
    header = 4 + 2 + 2 + 8 + 32
    record = 2 + len("fc/weight") + 8 + 1 + 4 * 1 + 3 + 4 + 4 + (4 + 2) + (4 + 1)
    assert len(blob) == header + record
    # a dense layer's accounting: (bits per nonzero + bits per run) x nonzeros, plus escapes
    rng = np.random.default_rng(3)
    flat = sparse(rng, 30000, 0.1, -8, 8)
    t = Z.encode_tensor(flat, "w", run_bits=4)
    gaps = np.diff(np.flatnonzero(flat), prepend=-1) - 1
    assert t.value_bits == 4 and t.base == 1
    assert 8 * t.stream_bytes - 14 <= (4 + 4) * 3000 + 4 * int((gaps // 15).sum()) <= 8 * t.stream_bytes


def test_level_grid_takes_the_largest_base_that_keeps_every_weight():
    rng = np.random.default_rng(0)
    for bits in (1, 2, 3, 4, 6):
        k = 2 ** (bits - 1)
        for per_channel in (True, False):
            w = rng.standard_normal((12, 40)).astype(np.float32) * rng.uniform(0.5, 1.5, (12, 1)).astype(np.float32)
            w[np.abs(w) < np.quantile(np.abs(w), 0.85)] = 0              # a 85 % magnitude-pruned layer
            w[3] = 0                                                     # and a pruned-away channel
            scales, base = level_grid(w, bits, per_channel)
            rows = w.reshape(12 if per_channel else 1, -1).astype(np.float64)
            top = np.abs(rows).max(1)

            def keeps(b):                                                 # brute force: scales of base b
                s = np.where(top > 0, top / (b + k - 1), 1.0).astype(np.float32).astype(np.float64)
                codes = np.round(rows / s[:, None])
                return np.all(np.abs(codes[rows != 0]) >= b), s
            best = max(b for b in range(1, 129 - k) if b == 1 or keeps(b)[0])
            assert base == best, (bits, per_channel)
            np.testing.assert_array_equal(scales, keeps(base)[1].astype(np.float32))
            codes = np.abs(np.round(rows / scales[:, None].astype(np.float64)))
            assert codes.max() == base + k - 1 and codes[(rows != 0) & (codes != 0)].min() >= base
            if base > 1:
                assert np.count_nonzero(codes) == np.count_nonzero(w)
            if bits >= 4:
                assert base > 1          # 85 % pruned: the levels start well above zero


# ---------------------------------------------------------------------------
# end to end: LeNet-300-100 on digits
# ---------------------------------------------------------------------------

def lenet_300_100():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(),
                         nn.Linear(100, 10))


@pytest.fixture(scope="module")
def deployed(digits, one_thread, tmp_path_factory):
    """(artifact, compressed torch model, the YAML recipe's path): the recipe's torch stage run by
    sdk.compress gives the model the artifact was deployed from (seeded training)."""
    xtr, ytr, xte, yte = digits
    train = [(xtr[i:i + 64], ytr[i:i + 64].long()) for i in range(0, len(xtr), 64)]
    dense = lenet_300_100()
    finetune(dense, train, TrainConfig(epochs=20, lr=1e-3, progress=False))
    d = tmp_path_factory.mktemp("zr")
    (d / "recipe.yaml").write_text(RECIPE_YAML)
    art = sdk.deploy(dense, "arm-int8", (xte[:1],), calibration=[xtr[i:i + 32] for i in range(0, 256, 32)],
                     recipe=str(d / "recipe.yaml"), data={"train": train}, output=d / "a", progress=False)
    torch_model = sdk.compress(dense, str(d / "recipe.yaml"), data=train, progress=False)
    return art, torch_model, d / "recipe.yaml"


def weight_data(model_bytes, ops=("FULLY_CONNECTED",)):
    """``{tensor name: (int8 data, scales)}`` of the weights of each ``ops`` op, by the flatbuffer reader
    (a sparse-stored weight: the values vector its DENSIFY expands)."""
    m = read_model(model_bytes)
    sg = m.subgraphs[0]
    producer = {o: op for op in sg.operators for o in op.outputs}
    out = {}
    for op in sg.operators:
        if op_name(m, op) in ops:
            t = sg.tensors[op.inputs[1]]
            data = tensor_data(m, t)
            if data is None:
                t = sg.tensors[producer[op.inputs[1]].inputs[0]]
                data = np.frombuffer(bytes(m.buffers[t.buffer].data), np.int8)
            q = sg.tensors[op.inputs[1]].quantization
            out[t.name.decode()] = (data, np.asarray(q.scale, np.float32))
    return out


def artifact_accuracy(art, x, y, runner=None):
    out = np.concatenate([art.run(x[i:i + 1], runner=runner)[0] for i in range(len(x))])
    return float((out.argmax(1) == y.numpy()).mean())


def test_lenet_weights_zr_expands_into_the_levels_and_beats_int8(deployed, digits):
    art, torch_model, _ = deployed
    _, _, xte, yte = digits
    model_bytes = (art.path / "model.tflite").read_bytes()
    blob = art.read_bytes("weights.zr")
    entry = art.manifest["weight_container"]
    assert entry["format"] == "edgepack-zr" and entry["sizes"]["zero_run"] == len(blob)
    stored = weight_data(model_bytes)
    expanded = Z.expand(blob)
    assert sorted(expanded) == sorted(stored) and len(stored) == 3
    _, _, coded = Z.read_container(blob)
    torch_w = {f"linear{s}/weight": torch_model.get_submodule(n).weight.detach().numpy()
               for s, n in (("", "1"), ("_1", "3"), ("_2", "5"))}
    expected_bytes = 48
    rows = []
    for t in coded:
        data, scales = stored[t.name]
        assert np.array_equal(expanded[t.name], data), t.name         # bit-exact with the .tflite
        # the 2^bits levels above the base, the pruned zeros (and only those) kept
        mags = np.abs(data[data != 0].astype(int))
        assert mags.min() >= t.base and mags.max() == t.base + 2 ** (BITS - 1) - 1 and t.value_bits == BITS
        assert np.array_equal(data != 0, torch_w[t.name] != 0)
        assert np.count_nonzero(data) == round(0.1 * data.size)
        # dequantized, each weight is its torch value rounded to the nearest level (half a step)
        w = torch_w[t.name].astype(np.float64)
        assert np.all(np.abs(data * scales[:, None].astype(np.float64) - w) <= scales[:, None] * 0.5 + 1e-7)
        # the size, by hand: the bit-string reference's streams and the record layout
        runs, values, _, _, _, nbits = ref_encode(data.reshape(-1), t.run_bits)
        assert (t.run_stream, t.value_stream) == (runs, values)
        expected_bytes += 2 + len(t.name) + 8 + 1 + 4 * 2 + 3 + 8 + 4 + len(runs) + 4 + len(values)
        rows.append((t.name, data.size, t.nonzeros, t.base, t.run_bits, nbits))
    assert len(blob) == expected_bytes

    # Deep Compression's Huffman container (sdk.huffman) of the very same int8 tensors
    dc = H.write_container([H.encode_tensor(stored[t.name][0], t.name, t.offset, stored[t.name][1]) for t in coded],
                           model_bytes)
    assert H.expand(dc).keys() == expanded.keys()
    int8 = sum(t.count for t in coded)
    fp32 = 4 * int8
    acc_art, acc_torch = artifact_accuracy(art, xte, yte), evaluate(torch_model, [(xte, yte.long())])
    print(f"\nzero-run on LeNet-300-100 (digits), agp 90 % + {BITS}-bit levels above a base")
    print(f"{'tensor':<16} {'weights':>7} {'nonzero':>7} {'base':>4} {'run bits':>8} {'stream bits':>11}")
    for r in rows:
        print(f"{r[0]:<16} {r[1]:>7} {r[2]:>7} {r[3]:>4} {r[4]:>8} {r[5]:>11}")
    zr_streams = sum(t.stream_bytes for t in coded)
    huff = H.read_container(dc)[2]
    dc_streams = sum(len(t.symbol_stream) + len(t.gap_stream) for t in huff)
    dc_tables = sum(t.symbol_lengths.size + t.gap_lengths.size for t in huff)
    dc_scales = sum(4 * t.scales.size for t in huff)
    print(f"fp32 {fp32} B, int8 dense {int8} B; weights.zr {len(blob)} B ({fp32 / len(blob):.1f}x fp32), Huffman "
          f"weights.dc of the same int8 tensors {len(dc)} B ({fp32 / len(dc):.1f}x)")
    print(f"streams alone: zero-run {zr_streams} B, Huffman {dc_streams} B (+ {dc_tables} B code tables; "
          f"weights.dc also carries {dc_scales} B of fp32 scales, which weights.zr leaves to model.tflite)")
    print(f"accuracy: torch model {acc_torch:.4f}, artifact {acc_art:.4f}")
    assert len(blob) < int8 / 5 and len(dc) < int8 / 5
    assert entry["sizes"] == {"int8": int8, "streams": sum(t.stream_bytes for t in coded), "zero_run": len(blob),
                              "skeleton": len(model_bytes) - int8}
    assert abs(acc_art - acc_torch) <= 0.01, (acc_art, acc_torch)
    assert acc_torch >= 0.9


def test_container_rebuilds_the_model_from_its_skeleton(deployed):
    art, _, _ = deployed
    model_bytes = (art.path / "model.tflite").read_bytes()
    blob = art.read_bytes("weights.zr")
    skeleton = Z.skeleton(model_bytes, blob)
    assert len(skeleton) == art.manifest["weight_container"]["sizes"]["skeleton"]
    assert Z.expand_model(skeleton, blob) == model_bytes == Z.expand_model(model_bytes, blob)
    # the size page counts weights.zr once and names what a device needs
    s = size_breakdown(art)
    on_disk = {p.name: p.stat().st_size for p in art.path.iterdir()}
    assert s.model_files == {"model.tflite": on_disk["model.tflite"], "weights.zr": on_disk["weights.zr"]}
    assert s.weights + s.quantization + s.structure == on_disk["model.tflite"] + on_disk["weights.zr"]
    assert f"zero-run coded: a device needs only model.tflite without them ({len(skeleton)} B) and weights.zr: " \
        f"{len(skeleton) + len(blob)} B" in s.note


def test_damaged_containers_are_refused_by_load_and_the_runners(deployed, digits, tmp_path):
    art0, _, _ = deployed
    x = digits[2][:1]
    np.testing.assert_array_equal(art0.run(x)[0], art0.run(x, runner="reference")[0])
    model_bytes = (art0.path / "model.tflite").read_bytes()
    blob = art0.read_bytes("weights.zr")
    _, _, coded = Z.read_container(blob)
    other = []
    for t in coded:
        v = t.values().copy()
        if not other:
            v.reshape(-1)[np.flatnonzero(v)[0]] *= -1          # one weight changes sign: same widths and counts
        other.append(Z.encode_tensor(v, t.name, t.offset, t.run_bits))
    cases = {"decodes to other weights": Z.write_container(other, model_bytes),
             "ends inside": blob[:-3]}
    for i, (match, data) in enumerate(cases.items()):
        d = tmp_path / f"a{i}"
        shutil.copytree(art0.path, d)
        rewrite(d, "weights.zr", data)          # a sender who knows the format: the hashes match
        art = sdk.load(d)
        for runner in ("host", "reference"):
            with pytest.raises(ArtifactError, match=match):
                art.run(x, runner=runner)
    d = tmp_path / "gone"
    shutil.copytree(art0.path, d)
    rewrite(d, "weights.zr", None)
    with pytest.raises(ArtifactError, match="weight_container"):
        sdk.load(d)
    d = tmp_path / "flipped"
    shutil.copytree(art0.path, d)
    data = bytearray((d / "weights.zr").read_bytes())
    data[70] ^= 0x04
    (d / "weights.zr").write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="weights.zr is missing or does not match"):
        sdk.load(d)


def test_fuzzed_containers_never_expand_into_wrong_weights(deployed):
    art, _, _ = deployed
    model_bytes = (art.path / "model.tflite").read_bytes()
    blob = art.read_bytes("weights.zr")
    manifest = art.manifest

    def expand(data):
        fake = SimpleNamespace(manifest=manifest, read_bytes=lambda name: data)
        return Z.expand_artifact_model(fake, "model.tflite", model_bytes)

    assert expand(blob) == model_bytes
    rng = random.Random(19)
    flips = [rng.randrange(len(blob)) for _ in range(150)] + list(range(0, 120, 3))
    for at in flips:
        data = bytearray(blob)
        data[at] ^= 1 << rng.randrange(8)
        with pytest.raises(ArtifactError):
            expand(bytes(data))
    for cut in [0, 3, 20, 47, 60, len(blob) // 2, len(blob) - 1] + [rng.randrange(len(blob)) for _ in range(20)]:
        with pytest.raises(ArtifactError):
            expand(blob[:cut])
        with pytest.raises(ArtifactError):
            Z.expand(blob[:cut])
    with pytest.raises(ArtifactError, match="bytes follow"):
        Z.expand(blob + b"\0")
    # the manifest entry is schema: a field too many, a wrong type
    bad = {**manifest, "weight_container": {**manifest["weight_container"], "extra": 1}}
    with pytest.raises(ArtifactError, match="weight_container"):
        check_manifest(bad, manifest["format"], manifest["format_version"])
    rows = [dict(r) for r in manifest["weight_container"]["tensors"]]
    rows[0]["base"] = "1"
    bad = {**manifest, "weight_container": {**manifest["weight_container"], "tensors": rows}}
    with pytest.raises(ArtifactError, match=r"tensors\[0\]"):
        check_manifest(bad, manifest["format"], manifest["format_version"])


def test_damaged_streams_are_named_errors():
    t = Z.encode_tensor(np.array([0, 0, 5, 0, -6, 0, 0, 0, 7], np.int8), "w", run_bits=2)
    bad = {"padding": Z.ZeroRunTensor(**{**t.__dict__, "value_stream": t.value_stream[:-1] + b"\x01"}),
           "runs": Z.ZeroRunTensor(**{**t.__dict__, "run_count": t.run_count - 1,
                                      "run_stream": Z.pack_fields(Z.run_fields(t.values(), 2)[:-1], 2)}),
           "reach element": Z.ZeroRunTensor(**{**t.__dict__, "shape": (7,)}),
           "base": Z.ZeroRunTensor(**{**t.__dict__, "value_stream": Z.pack_fields(np.array([1, 5, 2]), 3)}),
           "holds": Z.ZeroRunTensor(**{**t.__dict__, "value_stream": t.value_stream + b"\0"})}
    for match, tensor in bad.items():
        with pytest.raises(ArtifactError, match=match):
            tensor.values()


# ---------------------------------------------------------------------------
# a CNN, options and refusals
# ---------------------------------------------------------------------------

def test_cnn_conv_layers_are_coded_and_run(small_cnn, digits, tmp_path):
    xte = digits[2][:16]
    recipe = {"stages": [{"method": "magnitude", "config": {"sparsity": 0.8}},
                         {"method": "zero-run", "config": {"bits": 3, "run_bits": 3, "exclude": ["fc"]}}]}
    art = sdk.deploy(small_cnn, "arm-int8", (xte[:1],), calibration=[xte], recipe=recipe, output=tmp_path / "cnn",
                     progress=False)
    entry = art.manifest["weight_container"]
    assert [r["layer"] for r in entry["tensors"]] == ["c1", "c2"]
    assert all(r["run_bits"] == 3 and r["value_bits"] == 3 for r in entry["tensors"])
    convs = weight_data((art.path / "model.tflite").read_bytes(), ("CONV_2D",))
    expanded = Z.expand(art.read_bytes("weights.zr"))
    assert sorted(expanded) == sorted(convs)
    for name, (data, _) in convs.items():
        assert np.array_equal(expanded[name].reshape(-1), data.reshape(-1))
        assert len(np.unique(data[data != 0])) <= 2 ** 3
    out, ref = art.run(xte[:1])[0], art.run(xte[:1], runner="reference")[0]
    assert np.all(np.isfinite(out))
    np.testing.assert_allclose(out, ref, atol=0.02 * float(np.abs(ref).max()))


def test_registered_and_bad_options_are_named_errors(small_cnn, digits):
    assert any(p["name"] == "zero-run" and p["kind"] == "quantizer" for p in sdk.list_plugins())
    cfg = ZeroRun(bits=3, run_bits=5, layers=["c1"]).config
    assert ZeroRun.Config.from_dict(cfg.to_dict()) == cfg and cfg.layers == ("c1",)
    for bad in ({"bits": 8}, {"bits": 0}, {"run_bits": 17}, {"granularity": "blockwise"}, {"layers": "c1"}):
        with pytest.raises(ConfigError):
            ZeroRun(**bad)
    xte = digits[2][:4]
    with pytest.raises(ConfigError, match="valid names: c1, c2, fc"):
        sdk.deploy(small_cnn, "arm-int8", (xte[:1],), calibration=[xte],
                   recipe={"stages": [{"method": "zero-run", "config": {"layers": ["conv9"]}}]}, progress=False)
    with pytest.raises(ConfigError, match="kmeans"):
        sdk.deploy(small_cnn, "arm-int8", (xte[:1],), calibration=[xte],
                   recipe={"stages": [{"method": "kmeans", "config": {"bits": 2, "progress": False}},
                                      {"method": "zero-run"}]}, progress=False)
    with pytest.raises(ConfigError, match="int8"):
        Z.encode_tensor(np.zeros(4, np.int16), "w")
