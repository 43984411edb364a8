"""The plan → target contract (sdk/encoding.py): every post-training quantizer × target either
ships what the plan says (the manifest's encodings and the packed file agree) or is refused
with a named EncodingError; torch-side hints (sparsity, codebooks, bit widths) reach the plan."""

import numpy as np
import pytest
import torch

import sdk
import sdk.plugins as p
from sdk.encoding import Carries, Hint, Sparsity, check_plan, describe, weight_spec
from sdk.errors import ConfigError, EdgepackError, EncodingError
from sdk.graph import capture, fold_batch_norm
from sdk.quant import QuantSpec

pytestmark = pytest.mark.usefixtures("one_thread")


def _lenet():
    from examples.models import make

    return make("lenet")


def _tflite_weights(art):
    """(dtype, quantization, values) of every constant conv/FC weight in the packed file, read by LiteRT
    (which unpacks INT4 to int8); a weight stored sparse behind DENSIFY is read densified by
    sdk.litert.sparse (checked against TFLite's own FormatConverter in tests/targets/arm_int8)."""
    from ai_edge_litert.interpreter import Interpreter

    from sdk.litert.flatbuffer import read_model, tensor_data

    model = read_model(art.read_bytes("model.tflite"))
    stored = {t.name.decode(): t for t in model.subgraphs[0].tensors}
    interp = Interpreter(model_content=art.read_bytes("model.tflite"))
    details = {d["name"]: d for d in interp.get_tensor_details()}
    out = []
    for name, d in details.items():
        if name.endswith(("/weight", "/weight/fp16")) and name + "/fp16" not in details:   # fp16: the stored half
            if name + "/sparse" in stored:
                sp = details[name + "/sparse"]
                out.append((np.dtype(sp["dtype"]).name, sp["quantization_parameters"],
                            tensor_data(model, stored[name + "/sparse"])))
            else:
                out.append((np.dtype(d["dtype"]).name, d["quantization_parameters"], interp.get_tensor(d["index"])))
    return out


def _storage(art) -> dict[str, str]:
    """Weight tensor name -> its stored LiteRT type in the file (int8, int4, float32, ...)."""
    from sdk.litert.flatbuffer import dtype_name, read_model

    model = read_model(art.read_bytes("model.tflite"))
    return {t.name.decode(): dtype_name(t.type) for t in model.subgraphs[0].tensors if t.buffer}


POST_TRAINING = sorted(n for n in p.names("quantizer") if p.get("quantizer", n).post_training)
TARGETS = ["arm-int8", "arm-fp32", "fp16-gpu", "binary-popcount"]
#: measured contract: which pairs ship (the rest must be refused by name)
SHIPS = {("ptq", "arm-int8"), ("fp16", "fp16-gpu"), ("dynamic", "arm-int8"), ("int4", "arm-int8"),
         ("data-free", "arm-int8"), ("dynamic-fixed-point", "arm-int8"), ("mixed-precision", "arm-int8"),
         ("zero-run", "arm-int8")}
#: the config a method needs to run at all here (a budget; a short synthesis)
CONFIGS = {"mixed-precision": {"max_weight_bytes": 10 ** 9, "choices": ["int8", "int4"], "progress": False},
           "data-free": {"steps": 10, "progress": False}}
LENET_LAYERS = ["features.0", "features.4", "classifier.1", "classifier.3"]


def test_post_training_quantizers_are_the_ones_this_matrix_knows():
    assert POST_TRAINING == ["data-free", "dynamic", "dynamic-fixed-point", "fp16", "int4", "mixed-precision", "ptq",
                             "zero-run"]


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("method", POST_TRAINING)
def test_every_post_training_quantizer_times_target(method, target, tmp_path):
    model, x = _lenet()
    cal = [torch.randn(4, 1, 8, 8) for _ in range(2)]
    recipe = {"stages": [{"method": method, "config": CONFIGS.get(method, {})}]}
    data = None
    if target == "binary-popcount":      # the target packs binarized layers: binarize first (one step)
        recipe["stages"].insert(0, {"method": "xnor", "config": {"epochs": 1, "max_steps": 1}})
        data = [(torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,)))]
    if (method, target) not in SHIPS:
        with pytest.raises(EdgepackError) as exc:
            sdk.deploy(model, target, (x,), calibration=cal, recipe=recipe, output=tmp_path / "a", progress=False,
                       data=data)
        err = exc.value
        if method == "zero-run" and target == "binary-popcount":    # refused earlier: xnor's codes are not its to re-level
            assert isinstance(err, ConfigError) and "xnor" in str(err), repr(err)
            assert not (tmp_path / "a").exists()
            return
        assert isinstance(err, EncodingError), repr(err)
        assert err.target == target and err.layer and err.encoding in str(err)
        assert target not in err.carriers
        assert not (tmp_path / "a").exists()
        return
    art = sdk.deploy(model, target, (x,), calibration=cal, recipe=recipe, output=tmp_path / "a", progress=False)
    rows = art.manifest["encodings"]
    assert [r["layer"] for r in rows] == LENET_LAYERS
    if target == "arm-int8":
        packed = _tflite_weights(art)
        assert len(packed) == len(rows) == 4
        # mixed-precision with room for all: int8 (least error); zero-run's 4-bit levels sit above a base,
        # so its codes are planned as int5 (stored in int8 bytes, coded in weights.zr)
        bits = {"int4": 4, "zero-run": 5}.get(method, 8)
        for (dtype, q, _), row in zip(packed, rows):
            # LiteRT reads INT4 back as int8 codes; int4's fully connected layers are INT4 in the file
            stored = 4 if method == "int4" and row["layer"].startswith("classifier") else 8
            gran = "per-tensor" if method == "dynamic-fixed-point" else "per-channel"     # one Q(i.f) per layer
            assert dtype == "int8" and row["stored_bits"] == stored and row["planned"].startswith(f"int{bits} {gran}")
            assert not q["zero_points"].any()
    else:
        assert {r["planned"] for r in rows} == {"float16"} and {r["stored_bits"] for r in rows} == {16}
        packed = _tflite_weights(art)     # the packed file agrees: float16 weight buffers
        assert len(packed) == 4 and {d for d, _, _ in packed} == {"float16"}


def test_fp16_plan_on_arm_int8_names_layer_and_carriers(tmp_path):
    model, x = _lenet()
    with pytest.raises(EncodingError) as exc:
        sdk.deploy(model, "arm-int8", (x,), recipe={"stages": [{"method": "fp16"}]}, progress=False)
    e = exc.value
    assert e.layer == "features.0" and e.encoding == "float16" and e.carriers == ["fp16-gpu"]
    assert "cannot ship layer 'features.0'" in str(e) and "carried by: fp16-gpu" in str(e)


def test_ptq_plan_on_float_target_is_refused_not_ignored():
    model, x = _lenet()
    with pytest.raises(EncodingError) as exc:
        sdk.deploy(model, "arm-fp32", (x,), calibration=[x], recipe={"stages": [{"method": "ptq"}]}, progress=False)
    assert exc.value.carriers == ["arm-int8"] and "int8 per-channel" in exc.value.encoding


def test_int4_codes_ship_as_int4_where_xnnpack_runs_them(tmp_path):
    """4-bit plan: the fully connected layers store INT4 (XNNPACK's qs8-qc4w kernel), the convolutions
    their exact 4-bit codes in int8 (INT4 filters run in builtin kernels only; int4='always' opts in)."""
    model, x = _lenet()
    cal = [torch.randn(4, 1, 8, 8) for _ in range(2)]
    recipe = {"stages": [{"method": "ptq", "config": {"weight_bits": 4}}]}
    art = sdk.deploy(model, "arm-int8", (x,), calibration=cal, progress=False, recipe=recipe)
    rows = art.manifest["encodings"]
    assert [(r["bits"], r["stored_bits"]) for r in rows] == [(4, 8), (4, 8), (4, 4), (4, 4)]
    kinds = [row["weight_storage"] for row in art.profile["layers"] if "weight_storage" in row]
    assert kinds == ["int8", "int8", "int4", "int4"]
    assert sorted(t for n, t in _storage(art).items() if n.endswith("/weight")) == sorted(kinds)   # the file's
    for _, _, w in _tflite_weights(art):
        assert np.abs(w).max() <= 7 and np.abs(w).max() == 7      # narrow 4-bit grid, used to its end
    eight = sdk.deploy(model, "arm-int8", (x,), calibration=cal, progress=False)
    # the cost model and the file count the bytes the target ships: half a byte per FC weight
    fc = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert eight.profile["estimate"]["weight_bytes"] - art.profile["estimate"]["weight_bytes"] == fc // 2
    assert len(eight.read_bytes("model.tflite")) - len(art.read_bytes("model.tflite")) >= fc // 2
    always = sdk.deploy(model, "arm-int8", (x,), calibration=cal, progress=False, recipe=recipe,
                        int4="always")
    assert [r["stored_bits"] for r in always.manifest["encodings"]] == [4] * 4
    assert all(r["kernel"].startswith(("builtin", "xnnpack int8 x int4")) for r in always.profile["layers"]
               if "kernel" in r)


def test_blockwise_plan_is_refused_by_arm_int8():
    from examples.models import make

    model, x = make("mlp")          # 64, 64 and 32 weights per output channel
    with pytest.raises(EncodingError, match="blockwise 32") as exc:
        sdk.deploy(model, "arm-int8", (x,), calibration=[x], progress=False,
                   recipe={"stages": [{"method": "ptq", "config": {"weight_granularity": "blockwise",
                                                                   "block_size": 32}}]})
    assert exc.value.layer == "net.1" and exc.value.carriers == []


def test_asymmetric_weights_refused_by_the_carrier_check():
    model, x = _lenet()
    with pytest.raises(EncodingError, match="asymmetric"):
        sdk.deploy(model, "arm-int8", (x,), calibration=[x], progress=False,
                   recipe={"stages": [{"method": "ptq", "config": {"weight_scheme": "asymmetric"}}]})


def test_pruning_sparsity_reaches_the_manifest(tmp_path):
    model, x = _lenet()
    art = sdk.deploy(model, "arm-int8", (x,), calibration=[x], progress=False,
                     recipe={"stages": [{"method": "magnitude", "config": {"sparsity": 0.75}}]})
    rows = {r["layer"]: r for r in art.manifest["encodings"]}
    storage = {r["weight"]: r["weight_storage"] for r in art.profile["layers"] if "weight" in r}
    for layer, row in rows.items():
        # int8 convolutions ship sparse behind DENSIFY (XNNPACK folds it) where that is smaller: not the
        # 16 3x3x1 filters of features.0 (the index arrays outweigh 108 zero bytes); an int8 FULLY_CONNECTED
        # filter behind DENSIFY makes the delegate fail, so the linears ship dense
        assert row["sparsity"]["pattern"] == "unstructured"
        assert row["sparsity"]["shipped"] == ("sparse" if layer == "features.4" else "dense")
        assert storage[row["tensor"]] == "int8" + (" sparse" if layer == "features.4" else "")
    # measured on the packed weights: the zeros are there, as the plan's density says
    for (_, _, w), row in zip(_tflite_weights(art), art.manifest["encodings"]):
        assert row["sparsity"]["density"] == pytest.approx(np.count_nonzero(w) / w.size, abs=1e-6)


def test_hints_survive_compress_and_capture():
    model, x = _lenet()
    small = sdk.compress(model, {"stages": [{"method": "magnitude", "config": {"sparsity": 0.5}}]}, progress=False)
    assert not hasattr(model.features[0], "edgepack_hints")           # the caller's model is untouched
    g = fold_batch_norm(capture(small, (x,)))
    assert len(g.hints) == 4 and all(h.sparsity.pattern == "unstructured" for h in g.hints.values())
    assert all(name in g.constants for name in g.hints)      # renamed with BN folding


def test_codebook_hint_gives_one_code_per_shared_value():
    rng = np.random.default_rng(0)
    palette = np.array([-0.31, -0.07, 0.05, 0.42], np.float32)
    w = palette[rng.integers(0, 4, (16, 8, 3, 3))]
    w[1::2] = palette[rng.integers(0, 3, (8, 8, 3, 3))]      # half the channels never use 0.42
    spec = weight_spec(w, Hint(codebook=4))
    assert spec.index_bits == 2 and spec.code_bits == 8 and len(spec.codebook) == 4
    codes = spec.quantize(w)
    assert len(np.unique(codes)) == 4                # per-channel requantization would give up to 7+
    # the manifest's codebook is what ships: the codes times the scale, each within half a step of its centroid
    assert np.allclose(spec.codebook, np.unique(codes) * np.float32(spec.scale[0]), rtol=0, atol=1e-7)
    assert np.abs(np.array(spec.codebook) - np.unique(palette)).max() <= spec.scale[0] / 2
    plain = weight_spec(w)
    assert len(np.unique(plain.quantize(w))) > 4


def test_grid_values_are_exact_in_int8():
    w = np.array([[-1.0, -1 / 3, 1 / 3, 1.0]] * 2, np.float32)      # DoReFa 2-bit weights
    spec = weight_spec(w, Hint(bits=2))
    q = spec.quantize(w)
    assert sorted(set(q.ravel().tolist())) == [-3, -1, 1, 3] and spec.code_bits == 3 and spec.index_bits == 2
    assert np.array_equal((q * np.float32(spec.scale[0])).astype(np.float32), w)     # exact in float32
    assert describe(spec) == "2-bit codebook of 4 values (int3 codes)"
    # a target that stores 2-bit codes could not hold {±1, ±3}; 4-bit storage can
    assert Carries("int8", bits=(2,)).takes(spec, "conv") is None and Carries("int8", bits=(4,)).takes(spec, "conv") == 4


def test_carries_takes_rules():
    int8 = Carries("int8", bits=(8,), symmetric=True)
    assert int8.takes(QuantSpec("int8", (0.1,), (0,), bits=4), "conv") == 8
    assert int8.takes(QuantSpec("int8", (0.1,), (3,)), "conv") is None
    assert int8.takes(QuantSpec("float16"), "conv") is None
    assert Carries("float16").takes(QuantSpec("float16"), "linear") == 16
    assert Carries("int8", bits=(4, 8), ops=("linear",)).takes(QuantSpec("int8", (1.0,), (0,), bits=3), "conv") is None


def test_sparsity_measure_and_rows():
    sp = Sparsity.measure(np.array([0.0, 0.0, 1.0, 2.0]), "block", (1, 2))
    assert sp.to_dict() == {"pattern": "block", "density": 0.5, "block": [1, 2]}


def test_check_plan_rows_for_a_hinted_float_target():
    model, x = _lenet()
    small = sdk.compress(model, {"stages": [{"method": "magnitude", "config": {"sparsity": 0.5}}]}, progress=False)
    g = fold_batch_norm(capture(small, (x,)))
    rows = check_plan(p.get("target", "arm-fp32")(), g, None, g.hints)
    assert [r["stored_bits"] for r in rows] == [32] * 4
    assert all(r["sparsity"]["density"] == pytest.approx(0.5, abs=0.01) for r in rows)


@pytest.mark.parametrize("method, config, values, code_bits", [
    ("kmeans", {"bits": 2, "keep_first_last": False}, 4, 8),     # Han et al.: 4 centroids, nearest int8 codes
    ("ternary", {"keep_first_last": False}, 3, 2),               # {-a, 0, a}: codes {-1, 0, 1}
    ("dorefa", {"weight_bits": 2, "activation_bits": 32, "keep_first_last": False}, 4, 3),   # {±1, ±3}
])
def test_shared_weights_reach_arm_int8_as_that_many_codes(method, config, values, code_bits):
    """What the torch-side stage produced is what the packed file holds: one int8 code per shared value
    in each weight of the .tflite (per-channel requantization gave up to 7 codes for 4 centroids)."""
    from examples.models import make

    model, x = make("mlp")
    data = [(torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))) for _ in range(2)]
    art = sdk.deploy(model, "arm-int8", (x,), calibration=[x], progress=False, data=data,
                     recipe={"stages": [{"method": method, "config": {**config, "epochs": 1}}]})
    rows = art.manifest["encodings"]
    packed = _tflite_weights(art)
    assert len(packed) == len(rows) == 3
    for (dtype, q, w), row in zip(packed, rows):
        n = len(np.unique(w))
        assert dtype == "int8" and len(set(q["scales"].tolist())) == 1      # one scale: the codebook's
        assert 2 <= n <= values and row["planned"] == f"2-bit codebook of {n} values (int{code_bits} codes)"
        # codes of at most 4 bits ship as INT4 in fully connected layers (LiteRT reads them back as int8)
        assert row["bits"] == code_bits and row["index_bits"] == 2 and row["stored_bits"] == (4 if code_bits <= 4
                                                                                             else 8)
        assert np.abs(w).max() <= 2 ** (code_bits - 1) - 1
    small = sdk.compress(model, {"stages": [{"method": method, "config": {**config, "epochs": 1}}]}, data=data,
                         progress=False)
    for (_, q, w), layer in zip(packed, [m for m in small.modules() if isinstance(m, torch.nn.Linear)]):
        # grid values (ternary, DoReFa) come back exactly; k-means centroids to within half an int8 step
        shared = np.unique(layer.weight.detach().numpy())
        back = np.unique((w * np.float32(q["scales"][0])).astype(np.float32))
        tol = q["scales"][0] / 2 if method == "kmeans" else 1e-6 * np.abs(shared).max()
        assert back.shape == shared.shape and np.abs(back - shared).max() <= tol


def test_a_learned_output_range_replaces_the_observed_one():
    """A torch-side stage (QAT, LSQ) that learned a clipping range hands it to the plan through an
    output hint: ptq uses it instead of its observer, and the packed file carries that scale."""
    from examples.models import make
    from sdk.encoding import annotate

    model, x = make("mlp")
    annotate(model.net[2], Hint(range=(0.0, 0.75), source="test"), "output")     # the first ReLU
    g = capture(model, (x,))
    (name, hint), = [(k, h) for k, h in g.hints.items() if h.range]
    assert g.node(name).module == "net.2"
    plan = p.get("quantizer", "ptq")(progress=False).calibrate(g, [(torch.randn(8, 1, 8, 8),)])
    want = QuantSpec.from_range(0.0, 0.75, symmetric=False)
    assert plan.activations[name].scale == want.scale and plan.activations[name].zero_point == want.zero_point
    art = sdk.deploy(model, "arm-int8", (x,), calibration=[torch.randn(8, 1, 8, 8)], progress=False)
    from ai_edge_litert.interpreter import Interpreter

    scales = {float(d["quantization_parameters"]["scales"][0]) for d in
              Interpreter(model_content=art.read_bytes("model.tflite")).get_tensor_details()
              if len(d["quantization_parameters"]["scales"]) == 1}
    assert any(abs(s - want.scale[0]) < 1e-9 for s in scales)


def test_bn_folded_ternary_ships_three_codes_per_channel():
    """LeNet's convs are followed by BatchNorm: folding scales each output channel, so the ternary
    codebook becomes one per channel; the packed int8 weights still hold at most 3 codes per row."""
    model, x = _lenet()
    data = [(torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))) for _ in range(2)]
    art = sdk.deploy(model, "arm-int8", (x,), calibration=[x], progress=False, data=data,
                     recipe={"stages": [{"method": "ternary", "config": {"keep_first_last": False, "epochs": 1}}]})
    rows = {r["layer"]: r for r in art.manifest["encodings"]}
    assert rows["features.4"]["planned"].endswith("2-bit codebook per channel") and rows["features.4"]["bits"] == 2
    for (_, _, w), row in zip(_tflite_weights(art), art.manifest["encodings"]):
        if "codebook" in row["planned"]:
            assert max(len(np.unique(r)) for r in w.reshape(w.shape[0], -1)) <= 3
            assert set(np.unique(w).tolist()) <= {-1, 0, 1}
