"""sdk.bit_search: the grids against numpy formulas and qat's int8 fake quantization, the cost model
against the deployed arm-int8 artifact's profile bytes, the baked codes bit-exact in the LiteRT file,
the feasible-set helpers and the search bounds."""

import numpy as np
import pytest
import torch
from torch import nn

import sdk
from sdk import bit_search as bs
from sdk.encoding import hints_of, weight_spec
from sdk.errors import ConfigError, InputError
from sdk.fakequant import fake_quant_weight
from sdk.litert.flatbuffer import op_name, read_model, tensor_data

pytestmark = pytest.mark.usefixtures("one_thread")


def _cnn(x):
    """Conv (BN folded into it) and two fully connected layers; BN statistics from ``x``."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                        nn.Linear(144, 32), nn.ReLU(), nn.Linear(32, 10))
    with torch.no_grad():
        net.train()(x)
    return net.eval()


def test_grids_match_numpy_and_qat():
    w = torch.randn(6, 3, 3, 3, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(bs.quantize_weight(w, 8), fake_quant_weight(w), rtol=0, atol=0)
    flat = w.numpy().reshape(6, -1).astype(np.float64)
    for bits in (2, 3, 4):
        q = 2 ** (bits - 1) - 1
        s = np.abs(flat).max(1, keepdims=True) / q
        ref = np.clip(np.round(flat / s), -q, q) * s
        np.testing.assert_allclose(bs.quantize_weight(w, bits).numpy().reshape(6, -1), ref, rtol=1e-6, atol=1e-7)
        assert len(np.unique(np.round(ref / s))) <= 2 * q + 1
    ref = np.abs(flat).mean(1, keepdims=True) * np.where(flat < 0, -1.0, 1.0)
    np.testing.assert_allclose(bs.quantize_weight(w, 1).numpy().reshape(6, -1), ref, rtol=1e-6)
    x = w.clone().requires_grad_(True)
    bs.quantize_weight(x, 2).sum().backward()
    assert torch.equal(x.grad, torch.ones_like(w))          # straight-through
    with pytest.raises(ConfigError, match="one of 1, 2"):
        bs.quantize_weight(w, 16)


def _weights_of(art):
    """``[(stored codes, per-channel scales)]`` of the artifact's conv / fully connected ops, in order."""
    m = read_model((art.path / "model.tflite").read_bytes())
    sg = m.subgraphs[0]
    found = []
    for op in sg.operators:
        if op_name(m, op) in ("FULLY_CONNECTED", "CONV_2D", "DEPTHWISE_CONV_2D"):
            t = sg.tensors[op.inputs[1]]
            found.append((tensor_data(m, t), np.asarray(t.quantization.scale, np.float32)))
    return found


@pytest.mark.parametrize("bits", [(4, 2, 1), (8, 4, 2)])
def test_deployed_bytes_and_codes_are_the_search_model(digits, bits):
    """A conv (BN folded) + two fully connected layers baked at mixed widths and deployed on arm-int8: each layer's
    profile bytes equal the cost model's (4-bit conv codes one byte each, ≤ 4-bit FC codes INT4, int32
    biases), and the stored codes equal numpy's reading of the torch weight: round(w / (max|w_c| / q))
    for b ≥ 2, sign(w) for binary; the torch weight is exactly code · stored scale."""
    xtr, ytr, xte, _ = digits
    model = _cnn(xtr[:256])
    layers = bs.search_layers(model, (xtr[:1],))
    assert [(l.name, l.op, l.k, l.macs) for l in layers] == [
        ("0", "CONV_2D", 0, 4 * 36 * 9), ("4", "FULLY_CONNECTED", 144, 144 * 32), ("6", "FULLY_CONNECTED", 32, 320)]
    train = [(xtr[i:i + 64], ytr[i:i + 64].long()) for i in range(0, 256, 64)]
    baked = bs.apply_bits(model, layers, bits, train, steps=4)
    art = sdk.deploy(baked, "arm-int8", (xte[:1],), calibration=[xtr[i:i + 32] for i in range(0, 128, 32)],
                     progress=False)
    rows = [r for r in art.profile["layers"] if r["op"].split("->")[0] in ("conv", "linear")]
    expected = [36 + 16, 144 * 32 // 2 + 128, 32 * 10 // 2 + 40]      # the same bytes for both configurations
    assert [r["bytes"] for r in rows] == [bs.layer_cost(l, b) for l, b in zip(layers, bits)] == expected
    assert sum(r["bytes"] for r in rows) == bs.cost(layers, bits, "bytes")
    assert [r["weight_storage"] for r in rows] == ["int8", "int4", "int4"]
    for layer, b, (codes, scales) in zip(layers, bits, _weights_of(art)):
        w = baked.get_submodule(layer.name).weight.detach().numpy()
        if w.ndim == 4:
            w = w.transpose(0, 2, 3, 1)                     # LiteRT conv filters are OHWI
        flat = w.reshape(w.shape[0], -1).astype(np.float64)
        if b == 1:
            ref = np.where(flat < 0, -1, 1)
        else:
            q = 2 ** (b - 1) - 1
            ref = np.round(flat / (np.abs(flat).max(1, keepdims=True) / q))
            assert np.abs(ref).max() == q
        np.testing.assert_array_equal(codes.reshape(ref.shape).astype(np.int64), ref)
        np.testing.assert_array_equal(codes.reshape(ref.shape).astype(np.float32) * scales[:, None],
                                      w.reshape(ref.shape))
    encoded = [e["bits"] for e in art.manifest["encodings"]]
    assert encoded == [bs.code_bits(b) for b in bits]
    assert isinstance(baked[1], nn.Identity) and baked[0].bias is not None      # the BN went into the conv
    with pytest.raises(InputError, match="feed a BatchNorm"):
        bs.apply_bits(model, layers, bits)


def test_a_channel_without_small_codes_still_ships_its_width():
    """A 4-bit row whose codes are all ±3 or more: the target reads a step from the smallest magnitude,
    so the smallest weight moves to code ±1 and the row ships as 4-bit codes on the max|w|/7 grid."""
    layer = nn.Linear(4, 2)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, 0.9, -0.8, 0.5], [0.7, -0.1, 0.35, 0.0]]))
    net = nn.Sequential(layer)
    layers = bs.search_layers(net, (torch.zeros(1, 4),))
    out = bs.apply_bits(net, layers, (4,))
    w = out[0].weight.detach().numpy().astype(np.float64)
    codes = w / (np.abs(w).max(1, keepdims=True) / 7)
    np.testing.assert_allclose(codes, [[7, 6, -6, 1], [7, -1, 4, 0]], atol=1e-5)
    spec = weight_spec(w.astype(np.float32), hints_of(out[0]))
    assert spec.code_bits == 4
    np.testing.assert_allclose(spec.scale, np.abs(w).max(1) / 7, rtol=1e-6)


def test_feasible_set_helpers():
    layers = [bs.SearchLayer(f"l{i}", "FULLY_CONNECTED", m, m, 8, 16) for i, m in enumerate((128, 512, 64, 2048))]
    rng = np.random.default_rng(0)
    top = bs.cost(layers, (8,) * 4, "bops")
    limits = {"bops": top * 3 // 10}
    for _ in range(200):
        c = bs.random_feasible(layers, (8, 4, 2, 1), limits, rng)
        assert bs.cost(layers, c, "bops") <= limits["bops"] and set(c) <= {8, 4, 2, 1}
    # greedy repair lowers the layer that saves most first: the 2048-MAC one
    assert bs.repair(layers, (8, 8, 8, 8), (8, 4, 2), {"bops": top - 1}) == (8, 8, 8, 4)
    assert bs.repair(layers, (4, 4, 4, 4), (8, 4, 2), limits) == bs.repair(layers, (4, 4, 4, 4), (8, 4, 2), limits)
    least = bs.cost(layers, (2,) * 4, "bops")
    with pytest.raises(ConfigError, match=f"at least {least}"):
        bs.check_budget(layers, (8, 4, 2), {"bops": least - 1})
    # bytes: below 4 bits an even-width FC layer saves nothing on arm-int8 (INT4 storage); packed bytes do
    fc = layers[0]
    assert [bs.layer_cost(fc, b) for b in (8, 4, 2, 1)] == [128 + 32, 64 + 32, 64 + 32, 64 + 32]
    assert [bs.layer_cost(fc, b, "packed_bytes") for b in (8, 4, 2, 1)] == [160, 96, 64, 48]
    odd = bs.SearchLayer("odd", "FULLY_CONNECTED", 63, 63, 1, 63)
    assert bs.layer_cost(odd, 4) == 63 + 4 and bs.layer_cost(odd, 4, int4="always") == 32 + 4


def test_search_budget_bounds_the_loop():
    layers = [bs.SearchLayer("a", "FULLY_CONNECTED", 10, 10, 1, 10)]
    trials = bs.run_trials(bs.SearchBudget(max_trials=3), lambda t: ((8,), "x"), lambda b: 0.5, layers=layers,
                           progress=False)
    assert [t.index for t in trials] == [0, 1, 2] and trials[0].costs == {"bytes": 14, "bops": 640}

    def slow(bits):
        import time
        time.sleep(0.02)
        return 0.1

    assert len(bs.run_trials(bs.SearchBudget(max_seconds=0.001), lambda t: ((4,), ""), slow, layers=layers,
                             progress=False)) == 1
    with pytest.raises(ConfigError, match="over the budget"):
        bs.run_trials(bs.SearchBudget(max_trials=2), lambda t: ((8,), ""), lambda b: 0.0, layers=layers,
                      limits={"bops": 100}, progress=False)
    with pytest.raises(ConfigError, match="max_trials and/or max_seconds"):
        bs.SearchBudget()
