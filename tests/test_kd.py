"""kd: the three objectives equal hand-computed formulas; distillation transfers the teacher."""

import numpy as np
import pytest
import torch

from plugins.distill.kd import KD
from sdk.errors import InputError


def np_log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


@pytest.fixture
def logits():
    g = torch.Generator().manual_seed(3)
    return torch.randn(5, 7, generator=g) * 3, torch.randn(5, 7, generator=g) * 3, torch.tensor([0, 3, 6, 2, 1])


@pytest.mark.parametrize("T", [1.0, 2.0, 4.0, 10.0])
def test_soft_is_T2_scaled_kl(logits, T):
    s, t, _ = logits
    ps, pt = np_log_softmax(s.numpy() / T), np_log_softmax(t.numpy() / T)
    expected = T * T * np.sum(np.exp(pt) * (pt - ps)) / s.shape[0]
    got = KD(objective="soft", temperature=T).loss(s, t)
    assert float(got) == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.9, 1.0])
def test_soft_plus_hard_weighting(logits, alpha):
    s, t, y = logits
    T = 3.0
    ps, pt = np_log_softmax(s.numpy() / T), np_log_softmax(t.numpy() / T)
    soft = T * T * np.sum(np.exp(pt) * (pt - ps)) / 5
    hard = -np.mean(np_log_softmax(s.numpy())[np.arange(5), y.numpy()])    # T = 1 for the hard term
    got = KD(objective="soft+hard", temperature=T, alpha=alpha).loss(s, t, y)
    assert float(got) == pytest.approx(alpha * soft + (1 - alpha) * hard, rel=1e-5)


def test_logits_mse(logits):
    s, t, _ = logits
    assert float(KD(objective="logits-mse").loss(s, t)) == pytest.approx(float(np.mean((s.numpy() - t.numpy()) ** 2)),
                                                                         rel=1e-6)


def test_hard_term_needs_labels(logits):
    s, t, _ = logits
    with pytest.raises(InputError, match="needs labels"):
        KD(objective="soft+hard").loss(s, t)


def test_distillation_moves_student_to_teacher(digits):
    """Soft-target training from a teacher alone (no labels) makes the student agree with it."""
    xtr, ytr, xte, _ = digits
    torch.manual_seed(0)
    teacher = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
    opt = torch.optim.Adam(teacher.parameters(), 1e-2)
    for _ in range(150):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(teacher(xtr), ytr).backward()
        opt.step()
    teacher.eval()
    student = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    agree = lambda: float((student(xte).argmax(1) == teacher(xte).argmax(1)).float().mean())  # noqa: E731
    before = agree()
    batches = [xtr[i:i + 64] for i in range(0, len(xtr), 64)]      # unlabeled transfer set
    KD(objective="soft", temperature=4.0, epochs=15, lr=1e-2, progress=False).apply(student, teacher, batches)
    after = agree()
    assert before < 0.3 and after > 0.85, (before, after)
