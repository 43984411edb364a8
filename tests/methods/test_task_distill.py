"""task-distill: the phase-A loss equals a numpy cross-entropy through the projection; a teacher
with another head (20 outputs for a 10-class student) gets a trained projection that is dropped
afterwards; phase A on unlabelled digits lifts a student fine-tuned on 100 labels; a YAML recipe
with named streams runs it; the student deploys to arm-int8."""

import copy

import numpy as np
import pytest
import torch
from torch import nn

import sdk
from distill_helpers import accuracy, batches, check_training_config, mlp, np_log_softmax, trained
from plugins.distill.task_distill import TaskDistill
from sdk.errors import ConfigError, InputError
from sdk.trainer import TrainConfig, finetune

pytestmark = pytest.mark.usefixtures("one_thread")   # tiny models: one thread is faster


def inputs(x, size=64):
    """An unlabelled stream: batches of inputs alone."""
    return [x[i:i + size] for i in range(0, len(x), size)]


def test_loss_is_cross_entropy_between_softened_teacher_and_projected_student():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(4, 10, generator=g), torch.randn(4, 20, generator=g)
    td = TaskDistill(temperature=2.0)
    proj = td.make_projection(s, t)
    assert isinstance(proj, nn.Linear) and (proj.in_features, proj.out_features) == (10, 20)
    w, b = proj.weight.detach().numpy(), proj.bias.detach().numpy()
    p = np.exp(np_log_softmax(t.numpy() / 2.0))
    expected = -np.mean(np.sum(p * np_log_softmax((s.numpy() @ w.T + b) / 2.0), axis=1))
    with torch.no_grad():
        assert float(td.loss(proj(s), t)) == pytest.approx(expected, rel=1e-5)
    assert isinstance(TaskDistill().make_projection(s, s), nn.Identity)            # same head: no projection
    assert isinstance(TaskDistill(projection="linear").make_projection(s, s), nn.Linear)
    with pytest.raises(ConfigError, match="projection='identity' needs equal output sizes"):
        TaskDistill(projection="identity").make_projection(s, t)


def test_a_teacher_with_another_head_trains_a_projection_that_is_then_dropped(digits, monkeypatch):
    import plugins.distill.task_distill as module

    xtr = digits[0][:256]
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(64, 20))                       # 20 outputs
    student = mlp((16,), 0)                                                         # 10 outputs
    keys = set(student.state_dict())
    td = TaskDistill(distill_epochs=3, distill_lr=1e-2, progress=False)
    start = td.make_projection(torch.zeros(1, 10), torch.zeros(1, 20)).weight.detach().clone()
    proj = td.match_teacher(student, teacher, inputs(xtr))
    assert isinstance(proj, nn.Linear) and proj.weight.shape == (20, 10)
    assert not torch.equal(proj.weight, start)                                      # it was trained
    with torch.no_grad():
        t = teacher(xtr)
        before = float(td.loss(td.make_projection(student(xtr), t)(mlp((16,), 0)(xtr)), t))
        after = float(td.loss(proj(student(xtr)), t))
    assert after < before, (before, after)

    seen = []
    real = module.TaskDistill.match_teacher
    monkeypatch.setattr(module.TaskDistill, "match_teacher",
                        lambda self, *a: seen.append(real(self, *a)) or seen[-1])
    td.apply(student, teacher, batches(xtr, digits[1][:256]), unlabeled=inputs(xtr))
    assert isinstance(seen[0], nn.Linear) and set(student.state_dict()) == keys     # the projection is not kept
    with pytest.raises(ConfigError, match=r"feature_layer='9'"):
        TaskDistill(feature_layer="9").apply(mlp((16,), 0), teacher, batches(xtr, digits[1][:256]),
                                             unlabeled=inputs(xtr))


def test_a_feature_layer_is_projected_into_the_teacher_space(digits):
    xtr = digits[0][:128]
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(64, 20))
    proj = TaskDistill(feature_layer="2", distill_epochs=1, progress=False).match_teacher(mlp((16,), 0), teacher,
                                                                                          inputs(xtr))
    assert (proj.in_features, proj.out_features) == (16, 20)                         # the ReLU's 16 features


def test_task_distill_config_is_a_training_config():
    check_training_config(TaskDistill)


@pytest.fixture(scope="module")
def pretrained(digits):
    """A teacher pretrained on all 1347 training digits; a student may see only 100 labels."""
    xtr, ytr, _, _ = digits
    return trained(mlp((64, 64), 0), xtr, ytr)


def test_phase_a_on_unlabelled_data_lifts_a_student_with_few_labels_and_it_deploys(digits, pretrained, tmp_path):
    """With vs without phase A, same phase-B epochs on the same 100 labels."""
    xtr, ytr, xte, yte = digits
    xl, yl, xu = xtr[:100], ytr[:100], xtr[100:]
    runs = []
    for seed in (0, 1, 2):
        alone, student = mlp((32,), 10 + seed), mlp((32,), 10 + seed)
        finetune(alone, batches(xl, yl, 32), TrainConfig(epochs=20, lr=5e-3, seed=seed, progress=False))
        TaskDistill(distill_epochs=20, distill_lr=5e-3, epochs=20, lr=5e-3, seed=seed,
                    progress=False).apply(student, pretrained, batches(xl, yl, 32), unlabeled=inputs(xu))
        runs.append((accuracy(alone, xte, yte), accuracy(student, xte, yte)))
    print("fine-tune only vs task-distill, seeds 0-2:", runs, "teacher", accuracy(pretrained, xte, yte))
    assert all(d >= a + 0.05 for a, d in runs), runs
    art = sdk.deploy(student, "arm-int8", (xte[:1],), calibration=[xtr[i:i + 64] for i in range(0, 256, 64)],
                     output=tmp_path / "task-distill", progress=False)
    int8 = np.concatenate([art.run(xte[i:i + 1])[0] for i in range(0, 100)]).argmax(1)
    with torch.no_grad():
        agree = float((int8 == student(xte[:100]).argmax(1).numpy()).mean())
    assert agree >= 0.97, agree


def test_a_teacher_with_another_head_transfers_through_a_projected_feature_layer(digits):
    """A 20-way teacher (digit x more/less ink than the median) still teaches a 10-way student: its
    hidden layer, projected into the teacher's 20 outputs, is what phase A shapes."""
    xtr, ytr, xte, yte = digits
    ink = xtr.flatten(1).mean(1)
    y20 = ytr * 2 + (ink > ink.median()).long()
    torch.manual_seed(0)
    teacher = trained(nn.Sequential(*list(mlp((64, 64), 0))[:-1], nn.Linear(64, 20)), xtr, y20)
    xl, yl, xu = xtr[:100], ytr[:100], xtr[100:]
    runs = []
    for seed in (0, 1, 2):
        alone, student = mlp((32,), 10 + seed), mlp((32,), 10 + seed)
        finetune(alone, batches(xl, yl, 32), TrainConfig(epochs=20, lr=5e-3, seed=seed, progress=False))
        TaskDistill(feature_layer="2", distill_epochs=20, distill_lr=5e-3, epochs=20, lr=5e-3, seed=seed,
                    progress=False).apply(student, teacher, batches(xl, yl, 32), unlabeled=inputs(xu))
        runs.append((accuracy(alone, xte, yte), accuracy(student, xte, yte)))
    print("20-way teacher: fine-tune only vs task-distill (feature layer), seeds 0-2:", runs)
    assert all(d >= a + 0.05 for a, d in runs), runs


def test_a_yaml_recipe_with_named_streams_runs_both_phases(digits, pretrained, monkeypatch):
    import plugins.distill.task_distill as module

    xtr, ytr, _, _ = digits
    seen = []
    real_fit = module.fit
    monkeypatch.setattr(module, "fit", lambda *a, **k: seen.append((a[3], k["desc"])) or real_fit(*a, **k))
    real_finetune = module.finetune
    monkeypatch.setattr(module, "finetune", lambda *a, **k: seen.append((a[2], k["desc"])) or real_finetune(*a, **k))
    recipe = ("stages:\n  - method: task-distill\n    config: {distill_epochs: 2, distill_lr: 0.01, epochs: 1,"
              " lr: 0.002, temperature: 2.0, optimizer: sgd, optimizer_options: {momentum: 0.5}, progress: false}\n")
    student = mlp((32,), 3)
    before = copy.deepcopy(student)
    out = sdk.compress(student, recipe, data={"train": batches(xtr[:100], ytr[:100], 32),
                                              "unlabeled": inputs(xtr[100:400])}, teacher=pretrained, progress=False)
    (phase_a, desc_a), (phase_b, desc_b) = seen
    assert (desc_a, desc_b) == ("task-distill A", "task-distill B")
    assert (phase_a.epochs, phase_a.lr, phase_b.epochs, phase_b.lr) == (2, 0.01, 1, 0.002)
    assert phase_a.optimizer == phase_b.optimizer == "sgd" and phase_a.optimizer_config().momentum == 0.5
    assert not torch.equal(out[1].weight, before[1].weight)
    with pytest.raises(InputError, match="unlabeled"):
        sdk.compress(student, recipe, data={"train": batches(xtr[:100], ytr[:100], 32)}, teacher=pretrained,
                     progress=False)
