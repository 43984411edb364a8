"""ensemble: the loss is T²·KL to the mean of the softened teachers (plus CE); the student comes
close to the ensemble; from a recipe the teachers are the caller's list, and no teacher is an error."""

import copy

import numpy as np
import pytest
import torch
from torch import nn

import sdk
from distill_helpers import (accuracy, batches, check_training_config, digit_teachers, mlp, np_ce, np_kl_batchmean,
                             np_log_softmax)
from plugins.distill.ensemble import Ensemble
from sdk.context import DataStreams, StageContext
from sdk.errors import InputError

pytestmark = pytest.mark.usefixtures("one_thread")   # tiny models: one thread is faster


@pytest.fixture(scope="module")
def teachers(digits):
    return digit_teachers(digits)


@pytest.fixture
def logits():
    g = torch.Generator().manual_seed(5)
    return torch.randn(3, 6, 7, generator=g) * 3, torch.randn(6, 7, generator=g) * 3, torch.tensor([0, 3, 6, 2, 1, 4])


@pytest.mark.parametrize("T", [1.0, 4.0])
def test_ensemble_soft_loss_is_T2_kl_to_mean_of_softened_teachers(logits, T):
    t, s, _ = logits
    p_mean = np.exp(np_log_softmax(t.numpy() / T)).mean(0)       # average of probabilities, not of logits
    expected = T * T * np_kl_batchmean(p_mean, np_log_softmax(s.numpy() / T))
    got = Ensemble(objective="soft", temperature=T).loss(s, list(t))
    assert float(got) == pytest.approx(expected, rel=1e-5)


def test_ensemble_soft_plus_hard_adds_weighted_ce_at_T1(logits):
    t, s, y = logits
    T, alpha = 3.0, 0.7
    p_mean = np.exp(np_log_softmax(t.numpy() / T)).mean(0)
    soft = T * T * np_kl_batchmean(p_mean, np_log_softmax(s.numpy() / T))
    expected = alpha * soft + (1 - alpha) * np_ce(s.numpy(), y.numpy())
    assert float(Ensemble(objective="soft+hard", temperature=T, alpha=alpha).loss(s, t, y)) == \
        pytest.approx(expected, rel=1e-5)


def test_ensemble_refuses_a_single_teacher(teachers):
    with pytest.raises(InputError, match="several teacher models.*teacher=\\[.*'kd'"):
        Ensemble().apply(mlp((16,), 0), teachers[0], [(torch.zeros(4, 1, 8, 8), torch.zeros(4).long())])


def test_ensemble_student_comes_within_3_points_of_the_ensemble(digits, teachers):
    xtr, ytr, xte, yte = digits
    with torch.no_grad():
        ens_acc = float((torch.stack([t(xte).softmax(-1) for t in teachers]).mean(0).argmax(-1) == yte)
                        .float().mean())
    member_accs = [accuracy(t, xte, yte) for t in teachers]
    student = mlp((32,), 7)
    Ensemble(objective="soft+hard", temperature=4.0, alpha=0.9, epochs=15, lr=1e-2, progress=False) \
        .apply(student, list(teachers), batches(xtr, ytr))
    acc = accuracy(student, xte, yte)
    print(f"ensemble members {member_accs}, ensemble {ens_acc:.4f}, student {acc:.4f}")
    assert ens_acc > 0.95
    assert acc >= ens_acc - 0.03, (acc, ens_acc)


def test_ensemble_config_is_a_training_config():
    check_training_config(Ensemble)


# -- from a recipe ------------------------------------------------------------------

@pytest.fixture
def tiny():
    torch.manual_seed(0)
    make = lambda: nn.Sequential(nn.Flatten(), nn.Linear(16, 4))   # noqa: E731
    data = [(torch.randn(8, 1, 4, 4), torch.randint(0, 4, (8,))) for _ in range(3)]
    return make(), [make(), make()], data


RECIPE = {"stages": [{"method": "ensemble", "config": {"temperature": 2.0, "epochs": 2, "lr": 0.05}}]}


def test_a_recipe_ensemble_stage_distils_the_teachers_the_caller_lists(tiny):
    model, teachers, data = tiny
    snapshot = [copy.deepcopy(t.state_dict()) for t in teachers]
    out = sdk.compress(model, RECIPE, data=data, teacher=teachers, progress=False)
    direct = Ensemble(temperature=2.0, epochs=2, lr=0.05, progress=False).apply(copy.deepcopy(model), teachers, data)
    assert torch.equal(out[1].weight, direct[1].weight)                       # the caller's list is the ensemble
    assert not torch.allclose(out[1].weight, model[1].weight)
    assert all(torch.equal(v, t.state_dict()[k]) for t, s in zip(teachers, snapshot) for k, v in s.items())


def test_no_teacher_is_an_error_that_says_what_to_pass_not_a_one_member_ensemble(tiny):
    model, _, data = tiny
    with pytest.raises(InputError, match=r"'ensemble' needs several teacher models and none was given: "
                                         r"pass teacher=\[model_a, model_b, \.\.\.\].*'kd'"):
        sdk.compress(model, RECIPE, data=data, progress=False)
    with pytest.raises(InputError, match="none was given"):       # without running the stage before it
        sdk.compress(model, {"stages": [{"method": "magnitude", "config": {"sparsity": 0.5}}, *RECIPE["stages"]]},
                     data=data, progress=False)
    ctx = StageContext(DataStreams.of(data), original=model, teacher=None)
    with pytest.raises(InputError, match="none was given"):     # the stage's own check, called directly
        Ensemble(progress=False).run(copy.deepcopy(model), ctx)
    # the caller naming the original as the teacher is told apart from naming none
    ctx = StageContext(DataStreams.of(data), original=model, teacher=model)
    with pytest.raises(InputError, match="got a single Sequential"):
        Ensemble(progress=False).run(copy.deepcopy(model), ctx)
