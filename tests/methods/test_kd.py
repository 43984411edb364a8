"""kd: the three objectives equal hand-computed formulas; distillation transfers the teacher;
the training fields (optimizer and its options) are checked at recipe load and honoured."""

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sdk
from distill_helpers import check_training_config, np_log_softmax
from plugins.distill.kd import KD
from sdk.errors import ConfigError, InputError
from sdk.recipe import Recipe


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


# -- the training fields ----------------------------------------------------------

def test_kd_config_is_a_training_config():
    check_training_config(KD)


def test_tuple_optimizer_options_round_trip():
    cfg = KD.Config(optimizer_options={"betas": (0.8, 0.99)})
    assert KD.Config.from_dict(cfg.to_dict()) == cfg


def test_a_typo_in_the_optimizer_fails_when_the_yaml_recipe_is_read(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text("stages:\n  - method: kd\n    config: {objective: soft, optimizer: adma}\n")
    with pytest.raises(ConfigError, match=r"distiller\.kd: optimizer='adma' is not registered; "
                                          r"valid: adam, adam8bit, adamw, sgd"):
        Recipe.from_yaml(path)
    path.write_text("stages:\n  - method: kd\n    config: {optimizer: sgd, optimizer_options: {momentun: 0.5}}\n")
    with pytest.raises(ConfigError, match="momentun"):
        Recipe.from_yaml(path)


def _reference_kd_sgd(model, teacher, data, *, lr, momentum, epochs, T, alpha):
    """torch's own SGD on kd's soft+hard objective written out (p_t · (log p_t − log q_s))."""
    ref = copy.deepcopy(model)
    opt = torch.optim.SGD(ref.parameters(), lr=lr, momentum=momentum)
    for _ in range(epochs):
        for x, y in data:
            s = ref(x)
            with torch.no_grad():
                log_pt = torch.log_softmax(teacher(x) / T, -1)
            soft = (log_pt.exp() * (log_pt - torch.log_softmax(s / T, -1))).sum(-1).mean() * T * T
            loss = alpha * soft + (1 - alpha) * F.cross_entropy(s, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return ref


def test_a_yaml_kd_stage_trains_with_sgd_and_the_momentum_it_names():
    torch.manual_seed(0)
    model, teacher = nn.Linear(6, 4), nn.Linear(6, 4)
    data = [(torch.randn(8, 6), torch.randint(0, 4, (8,))) for _ in range(3)]
    recipe = Recipe.from_yaml("""
stages:
  - method: kd
    config: {optimizer: sgd, optimizer_options: {momentum: 0.5}, lr: 0.1, epochs: 2, temperature: 2.0, alpha: 0.7}
""")
    out = sdk.compress(model, recipe, data=data, teacher=teacher, progress=False)
    expected = _reference_kd_sgd(model, teacher, data, lr=0.1, momentum=0.5, epochs=2, T=2.0, alpha=0.7)
    other = _reference_kd_sgd(model, teacher, data, lr=0.1, momentum=0.9, epochs=2, T=2.0, alpha=0.7)
    assert torch.allclose(out.weight, expected.weight, atol=1e-6) and torch.allclose(out.bias, expected.bias, atol=1e-6)
    assert not torch.allclose(out.weight, other.weight, atol=1e-4)           # sgd's default momentum was not used
    assert not torch.allclose(out.weight, model.weight, atol=1e-3)           # it trained; the original is untouched


def test_a_kd_stage_without_data_is_refused_before_any_stage_runs():
    recipe = {"stages": [{"method": "magnitude", "config": {"sparsity": 0.5}}, {"method": "kd"}]}
    with pytest.raises(InputError, match="stage 'kd' needs the data stream"):
        sdk.compress(nn.Linear(4, 2), recipe)
