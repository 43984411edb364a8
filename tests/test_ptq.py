"""ptq: observers and scales/zero points equal the numpy formulas."""

import numpy as np
import pytest
import torch

from plugins.quantize.ptq import PTQ
from sdk.graph import capture, fold_batch_norm
from sdk.quant import MinMaxObserver, MovingMinMaxObserver, PercentileObserver, QuantSpec, dequantize, qparams, quantize

rng = np.random.default_rng(0)


def np_asym(lo, hi, qmin=-128, qmax=127):
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    s = (hi - lo) / (qmax - qmin)
    return s, int(np.clip(np.round(qmin - lo / s), qmin, qmax))


@pytest.mark.parametrize("lo,hi", [(-1.0, 3.0), (0.5, 7.0), (-4.0, -0.25), (-2.0, 2.0)])
def test_asymmetric_formula(lo, hi):
    s, z = qparams(lo, hi, symmetric=False)
    es, ez = np_asym(lo, hi)
    assert float(s) == pytest.approx(es, rel=1e-6) and int(z) == ez
    # the real zero maps exactly onto the zero point
    assert quantize(np.array([0.0]), s, z)[0] == z


def test_symmetric_per_channel_weights():
    w = rng.normal(size=(6, 3, 3, 3)).astype(np.float32)
    spec = PTQ().weight_spec(w)
    amax = np.abs(w.reshape(6, -1)).max(1)
    np.testing.assert_allclose(spec.scale, amax / 127.0, rtol=1e-6)
    assert spec.zero_point == (0,) * 6 and spec.axis == 0
    q = spec.quantize(w)
    assert q.min() >= -127 and q.max() <= 127
    np.testing.assert_array_equal(q, np.clip(np.round(w / (amax / 127.0)[:, None, None, None]), -127, 127))
    deq = dequantize(q, *spec.arrays(), axis=0)
    assert np.abs(deq - w).max() <= (amax / 127.0).max() / 2 + 1e-7


def test_per_tensor_and_asymmetric_weights():
    w = rng.normal(size=(4, 5)).astype(np.float32)
    spec = PTQ(weight_granularity="per-tensor").weight_spec(w)
    assert spec.axis is None and spec.scale[0] == pytest.approx(np.abs(w).max() / 127, rel=1e-6)
    spec = PTQ(weight_granularity="per-tensor", weight_scheme="asymmetric").weight_spec(w)
    es, ez = np_asym(w.min(), w.max())
    assert spec.scale[0] == pytest.approx(es, rel=1e-6) and spec.zero_point[0] == ez


def test_observers_match_numpy():
    batches = [rng.normal(size=(8, 16)).astype(np.float32) * (i + 1) for i in range(4)]
    mm, mov, pct = MinMaxObserver(), MovingMinMaxObserver(momentum=0.8), PercentileObserver(percentile=99.0)
    for b in batches:
        mm.update(b), mov.update(b), pct.update(b)
    allv = np.concatenate([b.ravel() for b in batches])
    assert mm.range() == (allv.min(), allv.max())
    lo, hi = batches[0].min(), batches[0].max()
    for b in batches[1:]:
        lo, hi = 0.8 * lo + 0.2 * b.min(), 0.8 * hi + 0.2 * b.max()
    np.testing.assert_allclose(mov.range(), (lo, hi), rtol=1e-6)
    np.testing.assert_allclose(pct.range(), (np.percentile(allv, 1.0), np.percentile(allv, 99.0)), rtol=1e-6)
    per_ch = MinMaxObserver(axis=1)
    per_ch.update(batches[0])
    np.testing.assert_array_equal(per_ch.range()[1], batches[0].max(0))


def test_calibrate_graph(small_cnn):
    x = torch.rand(1, 1, 8, 8)
    g = fold_batch_norm(capture(small_cnn, (x,)))
    batches = [(torch.rand(16, 1, 8, 8),) for _ in range(3)]
    plan = PTQ(progress=False).calibrate(g, batches)
    seen = {}
    for (b,) in batches:
        g.run([b], observer=lambda n, v: seen.setdefault(n, []).append(v.numpy()))
    for name, spec in plan.activations.items():
        vals = np.concatenate([v.ravel() for v in seen[name]])
        es, ez = np_asym(float(vals.min()), float(vals.max()))
        assert spec.scale[0] == pytest.approx(es, rel=1e-5) and spec.zero_point[0] == ez, name
    relu_out = [n.name for n in g.nodes if n.op == "relu"][0]
    assert plan.activations[relu_out].zero_point == (-128,)       # ReLU output: lo = 0
    conv_w = [n.inputs[1] for n in g.nodes if n.op == "conv"]
    assert set(conv_w) <= set(plan.weights) and all(plan.weights[w].axis == 0 for w in conv_w)


def test_percentile_clips_outliers():
    batch = np.concatenate([rng.uniform(-1, 1, 100000), [1000.0]]).astype(np.float32)
    mm, pct = MinMaxObserver(), PercentileObserver(percentile=99.9)
    mm.update(batch), pct.update(batch)
    assert mm.range()[1] == 1000.0 and pct.range()[1] < 1.01
    assert QuantSpec.from_range(*pct.range(), symmetric=False).scale[0] < 0.01
