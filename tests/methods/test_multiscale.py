"""multiscale: resolution-aware pooling and the loss equal numpy formulas; a student at half
resolution deploys with about scale² of the MACs of the same network at full resolution (read from
the two artifacts' profiles) and agrees with torch; usable from YAML with named streams."""

import numpy as np
import pytest
import torch

import sdk
from distill_helpers import (accuracy, batches, check_training_config, check_yaml_stage_trains, convnet, np_ce,
                             np_kl_batchmean, np_log_softmax, trained)
from plugins.distill.multiscale import MultiScale, align, downscale
from sdk.errors import ConfigError
from sdk.features import capture

pytestmark = pytest.mark.usefixtures("one_thread")   # tiny models: one thread is faster


@pytest.fixture(scope="module")
def teacher(digits):
    xtr, ytr, _, _ = digits
    return trained(convnet(16, 32, 0), xtr, ytr, steps=100)


def test_alignment_pooling_and_downscale_equal_block_means():
    g = torch.Generator().manual_seed(0)
    t = torch.randn(2, 3, 8, 6, generator=g, dtype=torch.float64)
    a = t.numpy()
    expected = a.reshape(2, 3, 4, 2, 3, 2).mean((3, 5))                     # 8x6 -> 4x3: 2x2 block means
    assert np.allclose(align(t, (4, 3)).numpy(), expected, rtol=0, atol=1e-12)
    assert np.allclose(downscale(t, 0.5).numpy(), expected, rtol=0, atol=1e-12)
    # 8 -> 3 rows: adaptive pooling's windows are [floor(i·8/3), ceil((i+1)·8/3)) = [0,3), [2,6), [5,8)
    rows = np.stack([a[:, :, 0:3].mean(2), a[:, :, 2:6].mean(2), a[:, :, 5:8].mean(2)], 2)
    assert np.allclose(align(t, (3, 6)).numpy(), rows, rtol=0, atol=1e-12)


@pytest.mark.parametrize("kind", ["l2", "smooth-l1"])
def test_loss_equals_the_hand_formula(kind):
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(3, 4, 2, 2, generator=g, dtype=torch.float64), 3 * torch.randn(3, 4, 4, 4, generator=g,
                                                                                      dtype=torch.float64)
    zs, zt = torch.randn(3, 10, generator=g, dtype=torch.float64), torch.randn(3, 10, generator=g, dtype=torch.float64)
    y = torch.tensor([1, 5, 7])
    m = MultiScale(feature_loss=kind, feature_weight=0.3, temperature=2.0, alpha=0.7)
    d = s.numpy() - t.numpy().reshape(3, 4, 2, 2, 2, 2).mean((3, 5))
    feat = np.mean(d ** 2) if kind == "l2" else np.mean(np.where(np.abs(d) < 1, 0.5 * d ** 2, np.abs(d) - 0.5))
    log_p = np_log_softmax(zt.numpy() / 2)
    soft = 4 * np_kl_batchmean(np.exp(log_p), np_log_softmax(zs.numpy() / 2))
    expected = 0.3 * feat + 0.7 * soft + 0.3 * np_ce(zs.numpy(), y.numpy())
    assert float(m.loss(s, t, zs, zt, y)) == pytest.approx(expected, rel=1e-9)


def test_low_resolution_student_learns_deploys_and_costs_about_scale_squared_macs(digits, teacher, tmp_path):
    xtr, ytr, xte, yte = digits
    small_te = downscale(xte, 0.5)
    runs = {}
    for name, weight in (("aligned", 0.05), ("kd-only", 0.0)):
        student = convnet(8, 16, 10)
        m = MultiScale(student_layer="3", teacher_layer="3", feature_weight=weight, epochs=5, lr=1e-2, seed=0,
                       progress=False)

        def held_out(adapter):
            with torch.no_grad():
                s = capture(student, small_te, ["3"])[1][0]
                return float(m.feature_loss(adapter(s), capture(teacher, xte, ["3"])[1][0]))

        with torch.no_grad():
            fresh = m.make_adapter(capture(student, small_te[:4], ["3"])[1][0], capture(teacher, xte[:4], ["3"])[1][0])
        before = held_out(fresh)
        after = held_out(m.train_student(student, teacher, batches(xtr, ytr, 32)))
        runs[name] = (student, accuracy(student, small_te, yte), before, after)
    student, acc, before, after = runs["aligned"]
    print(f"multiscale teacher (8x8) {accuracy(teacher, xte, yte):.4f}; student at 4x4: aligned features "
          f"{acc:.4f}, kd only {runs['kd-only'][1]:.4f}; held-out aligned feature loss {before:.2f} -> {after:.2f}")
    assert after < before / 3, (before, after)
    assert acc >= 0.6, acc
    calib = [downscale(xtr[i:i + 64], 0.5) for i in range(0, 256, 64)]
    low = sdk.deploy(student, "arm-int8", (small_te[:1],), calibration=calib, output=tmp_path / "low", progress=False)
    full = sdk.deploy(student, "arm-int8", (xte[:1],), calibration=[xtr[i:i + 64] for i in range(0, 256, 64)],
                      output=tmp_path / "full", progress=False)
    ratio = low.profile["totals"]["macs"] / full.profile["totals"]["macs"]
    print(f"MACs at 4x4 {low.profile['totals']['macs']}, at 8x8 {full.profile['totals']['macs']}: ratio {ratio:.4f}")
    assert ratio == pytest.approx(0.25, abs=0.01)
    int8 = np.concatenate([low.run(small_te[i:i + 1])[0] for i in range(100)]).argmax(1)
    with torch.no_grad():
        agree = float((int8 == student(small_te[:100]).argmax(1).numpy()).mean())
    assert agree >= 0.97, agree


def test_multiscale_errors():
    with pytest.raises(ConfigError, match="scale"):
        MultiScale(scale=1.5)
    with pytest.raises(ConfigError, match=r"student_layer='fc'.*available"):
        MultiScale(student_layer="fc", teacher_layer="3").apply(convnet(4, 8, 0), convnet(4, 8, 1),
                                                                [(torch.zeros(4, 1, 8, 8), torch.zeros(4).long())])
    with pytest.raises(ConfigError, match="4-D"):
        MultiScale(student_layer="5", teacher_layer="5").apply(convnet(4, 8, 0), convnet(4, 8, 1),
                                                               [(torch.zeros(4, 1, 8, 8), torch.zeros(4).long())])


def test_multiscale_config_is_a_training_config():
    check_training_config(MultiScale)


def test_a_yaml_multiscale_stage_with_named_streams_trains_the_student():
    check_yaml_stage_trains("""
stages:
  - method: multiscale
    config: {scale: 0.5, student_layer: "3", teacher_layer: "3", feature_loss: smooth-l1, feature_weight: 0.5,
             epochs: 2, lr: 0.01, optimizer: sgd, optimizer_options: {momentum: 0.5}}
""")
