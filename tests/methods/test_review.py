"""review: HCL equals a numpy formula; ABF's attention is a softmax over its 2 inputs; review
training brings the fused student stages to the teacher's; usable from YAML; the student deploys."""

import numpy as np
import pytest
import torch
from torch import nn

import sdk
from distill_helpers import accuracy, batches, check_training_config, check_yaml_stage_trains, convnet, trained
from plugins.distill.review import ABF, Review, hcl_loss
from sdk.errors import ConfigError
from sdk.features import capture

pytestmark = pytest.mark.usefixtures("one_thread")   # tiny models: one thread is faster


@pytest.fixture(scope="module")
def teacher(digits):
    xtr, ytr, _, _ = digits
    return trained(convnet(16, 32, 0), xtr, ytr, steps=100)


def np_pool(a, k):
    """Adaptive average pooling to k x k where k divides the size: block means."""
    n, c, h, w = a.shape
    return a.reshape(n, c, k, h // k, k, w // k).mean((3, 5))


def test_hcl_equals_the_hand_formula():
    g = torch.Generator().manual_seed(0)
    fs = [torch.randn(2, 3, 8, 8, generator=g, dtype=torch.float64), torch.randn(2, 5, 4, 4, generator=g,
                                                                                 dtype=torch.float64)]
    ft = [torch.randn_like(f) for f in fs]
    a8, b8, a4, b4 = fs[0].numpy(), ft[0].numpy(), fs[1].numpy(), ft[1].numpy()

    def mse(a, b):
        return np.mean((a - b) ** 2)

    # 8x8: levels 4, 2, 1 with weights 1/2, 1/4, 1/8; 4x4: level 4 skipped, 2 and 1 with 1/2, 1/4
    stage8 = (mse(a8, b8) + 0.5 * mse(np_pool(a8, 4), np_pool(b8, 4)) + 0.25 * mse(np_pool(a8, 2), np_pool(b8, 2))
              + 0.125 * mse(np_pool(a8, 1), np_pool(b8, 1))) / 1.875
    stage4 = (mse(a4, b4) + 0.5 * mse(np_pool(a4, 2), np_pool(b4, 2))
              + 0.25 * mse(np_pool(a4, 1), np_pool(b4, 1))) / 1.75
    assert float(hcl_loss(fs, ft)) == pytest.approx(stage8 + stage4, rel=1e-10)
    assert float(hcl_loss(fs[:1], ft[:1], levels=(2,))) == pytest.approx(
        (mse(a8, b8) + 0.5 * mse(np_pool(a8, 2), np_pool(b8, 2))) / 1.5, rel=1e-10)


def test_abf_attention_sums_to_one_per_position_and_mixes_the_two_inputs():
    torch.manual_seed(3)
    abf = ABF(4, 6, 8, fuse=True)
    nn.init.normal_(abf.att.weight, std=2.0)                              # far from uniform weights
    s, deeper = torch.randn(2, 4, 8, 8), torch.randn(2, 6, 4, 4)
    x = abf.reduce(s)
    y = nn.functional.interpolate(deeper, size=(8, 8), mode="nearest")
    a = abf.attention(x, y)
    assert a.shape == (2, 2, 8, 8) and bool((a > 0).all())
    assert torch.allclose(a.sum(1), torch.ones(2, 8, 8), atol=1e-6)
    assert float(a[:, 0].detach().std()) > 0.05                                     # position-dependent
    out, fused = abf(s, deeper)
    assert torch.allclose(fused, a[:, :1] * x + a[:, 1:] * y, atol=1e-6)
    assert torch.allclose(out, abf.out(fused), atol=1e-6) and out.shape == (2, 8, 8, 8)


def test_review_brings_fused_student_stages_to_the_teacher_and_deploys(digits, teacher, tmp_path):
    xtr, ytr, xte, yte = digits
    stages = dict(student_stages=("1", "3"), teacher_stages=("1", "3"))
    student, alone = convnet(4, 8, 10), convnet(4, 8, 10)
    r = Review(**stages, review_weight=0.001, epochs=10, lr=1e-2, seed=0, progress=False)
    keys = set(student.state_dict())

    def held_out_hcl(abfs):
        with torch.no_grad():
            s = capture(student, xte, stages["student_stages"])[1]
            t = capture(teacher, xte, stages["teacher_stages"])[1]
            return float(hcl_loss(r.fuse(abfs, s, t), t))

    with torch.no_grad():
        before = held_out_hcl(r.make_fusion(capture(student, xte[:4], ["1", "3"])[1],
                                            capture(teacher, xte[:4], ["1", "3"])[1]))
    abfs = r.train_student(student, teacher, batches(xtr, ytr, 32))
    after = held_out_hcl(abfs)
    Review(**stages, review_weight=0.0, epochs=10, lr=1e-2, seed=0, progress=False) \
        .apply(alone, teacher, batches(xtr, ytr, 32))                      # CE only: the student alone
    acc, alone_acc, t_acc = accuracy(student, xte, yte), accuracy(alone, xte, yte), accuracy(teacher, xte, yte)
    print(f"review teacher {t_acc:.4f}, review student {acc:.4f}, student alone {alone_acc:.4f}; "
          f"held-out HCL {before:.3f} -> {after:.3f}")
    assert after < before / 3, (before, after)                              # the review path reproduces the teacher
    assert set(student.state_dict()) == keys                                # the ABFs were discarded
    assert acc >= 0.6, acc
    art = sdk.deploy(student, "arm-int8", (xte[:1],), calibration=[xtr[i:i + 64] for i in range(0, 256, 64)],
                     output=tmp_path / "review", progress=False)
    int8 = np.concatenate([art.run(xte[i:i + 1])[0] for i in range(100)]).argmax(1)
    with torch.no_grad():
        agree = float((int8 == student(xte[:100]).argmax(1).numpy()).mean())
    assert agree >= 0.97, agree


def test_review_stage_errors():
    with pytest.raises(ConfigError, match="same length"):
        Review(student_stages=("1",), teacher_stages=("1", "3"))
    with pytest.raises(ConfigError, match=r"student_stages='fc'.*available"):
        Review(student_stages=("fc",), teacher_stages=("1",)).apply(convnet(4, 8, 0), convnet(4, 8, 1),
                                                                    [(torch.zeros(4, 1, 8, 8), torch.zeros(4).long())])
    with pytest.raises(ConfigError, match="4-D"):
        Review(student_stages=("5",), teacher_stages=("5",)).apply(convnet(4, 8, 0), convnet(4, 8, 1),
                                                                   [(torch.zeros(4, 1, 8, 8), torch.zeros(4).long())])


def test_review_config_is_a_training_config():
    check_training_config(Review)


def test_a_yaml_review_stage_with_named_streams_trains_the_student():
    check_yaml_stage_trains("""
stages:
  - method: review
    config: {student_stages: ["1", "3"], teacher_stages: ["1", "3"], mid_channels: 8, levels: [2, 1],
             epochs: 2, lr: 0.01, optimizer: sgd, optimizer_options: {momentum: 0.5}}
""")
