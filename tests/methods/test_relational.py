"""relational: RKD distance and angle losses equal loop references and ignore similarity
transforms; a student with a smaller embedding learns the teacher's structure and the task."""

import numpy as np
import pytest
import torch
from torch import nn

import sdk
from distill_helpers import accuracy, batches, check_training_config, digit_teachers, mlp, np_ce
from plugins.distill.relational import Relational, angle_loss, distance_loss, gi_scores, select_instances
from sdk.errors import ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")   # tiny models: one thread is faster


@pytest.fixture(scope="module")
def teachers(digits):
    return digit_teachers(digits)


def np_huber(x):
    return 0.5 * x * x if abs(x) < 1 else abs(x) - 0.5


def np_rkd(s, t):
    """Distance- and angle-wise RKD losses with explicit loops."""
    n = len(s)

    def dist(e):
        d = {(i, j): np.linalg.norm(e[i] - e[j]) for i in range(n) for j in range(n) if i != j}
        mu = sum(d.values()) / len(d)
        return {k: v / mu for k, v in d.items()}

    def cos(e, i, j, k):
        a, b = e[i] - e[j], e[k] - e[j]
        return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))

    ds, dt = dist(s), dist(t)
    l_d = sum(np_huber(ds[p] - dt[p]) for p in ds) / len(ds)
    trip = [(i, j, k) for i in range(n) for j in range(n) for k in range(n) if len({i, j, k}) == 3]
    l_a = sum(np_huber(cos(s, *p) - cos(t, *p)) for p in trip) / len(trip)
    return l_d, l_a


@pytest.fixture
def embeddings():
    g = torch.Generator().manual_seed(2)
    return torch.randn(6, 5, generator=g, dtype=torch.float64), torch.randn(6, 9, generator=g, dtype=torch.float64) * 4


def test_rkd_losses_match_loop_reference(embeddings):
    s, t = embeddings
    l_d, l_a = np_rkd(s.numpy(), t.numpy())
    assert l_d > 0.01 and l_a > 0.01
    assert float(distance_loss(s, t)) == pytest.approx(l_d, rel=1e-9)
    assert float(angle_loss(s, t)) == pytest.approx(l_a, rel=1e-9)
    y = torch.tensor([0, 1, 2, 3, 4, 0])
    r = Relational(lambda_distance=25.0, lambda_angle=50.0, ce_weight=0.5)
    assert float(r.loss(s, t, y)) == pytest.approx(25 * l_d + 50 * l_a + 0.5 * np_ce(s.numpy(), y.numpy()), rel=1e-9)


def test_rkd_losses_ignore_scale_rotation_and_translation_of_the_student(embeddings):
    s, t = embeddings
    q, _ = torch.linalg.qr(torch.randn(5, 5, generator=torch.Generator().manual_seed(8), dtype=torch.float64))
    moved = 3.7 * s @ q + 2.0
    assert float(distance_loss(moved, t)) == pytest.approx(float(distance_loss(s, t)), rel=1e-9)
    assert float(angle_loss(moved, t)) == pytest.approx(float(angle_loss(s, t)), rel=1e-9)
    assert float(distance_loss(moved, s)) < 1e-12 and float(angle_loss(moved, s)) < 1e-12


def test_rkd_student_with_smaller_embedding_learns_the_structure_and_the_task(digits, teachers):
    xtr, ytr, xte, yte = digits
    student = mlp((16,), 5)
    # embeddings: teacher's 64-wide second hidden layer, student's 16-wide hidden layer (after ReLU)
    t_emb, s_emb = (lambda: teachers[0][:5](xte[:100])), (lambda: student[:3](xte[:100]))

    def relational_gap():
        with torch.no_grad():
            return float(distance_loss(s_emb(), t_emb()) + 2 * angle_loss(s_emb(), t_emb()))

    before = relational_gap()
    Relational(teacher_layer="4", student_layer="2", epochs=15, lr=1e-2, progress=False) \
        .apply(student, teachers[0], batches(xtr, ytr))
    after = relational_gap()
    acc, t_acc = accuracy(student, xte, yte), accuracy(teachers[0], xte, yte)
    print(f"relational teacher {t_acc:.4f}, student {acc:.4f}; held-out RKD loss {before:.4f} -> {after:.4f}")
    assert after < before / 3, (before, after)
    assert acc >= t_acc - 0.04, (acc, t_acc)
    with pytest.raises(ConfigError, match="student_layer='fc'.*available"):
        Relational(student_layer="fc").apply(student, teachers[0], batches(xtr, ytr))


def np_softmax(z):
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def test_gid_scores_select_the_disputed_instances_and_the_loss_covers_only_them(embeddings):
    s, t = embeddings
    g = torch.Generator().manual_seed(4)
    t_logits = torch.randn(6, 4, generator=g, dtype=torch.float64) * 3
    s_logits = t_logits.clone()
    s_logits[[1, 3, 4]] = torch.randn(3, 4, generator=g, dtype=torch.float64) * 3   # the student disagrees on 3
    want = np.abs(np_softmax(t_logits.numpy()) - np_softmax(s_logits.numpy())).max(1)
    np.testing.assert_allclose(gi_scores(s_logits, t_logits).numpy(), want, rtol=1e-12)
    assert want[[0, 2, 5]].max() == 0 and want[[1, 3, 4]].min() > 0.05
    assert sorted(select_instances(s_logits, t_logits, 3).tolist()) == [1, 3, 4]
    assert select_instances(s_logits, t_logits, 9).tolist() == list(range(6))
    # the GID objective is RKD over the selected samples (hand loops) plus CE over the whole batch
    y = torch.tensor([0, 1, 2, 3, 0, 1])
    l_d, l_a = np_rkd(s.numpy()[[1, 3, 4]], t.numpy()[[1, 3, 4]])
    r = Relational(lambda_distance=3.0, lambda_angle=5.0, ce_weight=0.5, gid_instances=3)
    got = float(r.loss(s, t, y, logits=s_logits, teacher_logits=t_logits))
    assert got == pytest.approx(3 * l_d + 5 * l_a + 0.5 * np_ce(s_logits.numpy(), y.numpy()), rel=1e-9)
    assert got != pytest.approx(float(Relational(lambda_distance=3.0, lambda_angle=5.0, ce_weight=0.5)
                                      .loss(s, t, y, logits=s_logits)), rel=1e-3)
    with pytest.raises(ConfigError, match="gid_instances=2"):
        Relational(gid_instances=2)
    with pytest.raises(sdk.errors.InputError, match="same output shape"):
        gi_scores(s_logits, t_logits[:, :3])


def test_gid_stage_trains_from_a_recipe(digits, teachers):
    """GID selection inside training: the stage runs from a recipe with the teacher's outputs and
    the distilled student still learns the task."""
    xtr, ytr, xte, yte = digits
    student = mlp((16,), 3)
    stage = {"method": "relational", "config": {"teacher_layer": "4", "student_layer": "2", "gid_instances": 16,
                                                "epochs": 8, "lr": 1e-2}}
    out = sdk.compress(student, {"stages": [stage]}, data=batches(xtr, ytr), teacher=teachers[0], progress=False)
    assert accuracy(out, xte, yte) >= accuracy(teachers[0], xte, yte) - 0.06


def test_relational_config_is_a_training_config():
    check_training_config(Relational)


def test_a_recipe_relational_stage_stops_at_max_steps():
    """The shared training fields reach the stage's training: max_steps ends it early."""
    torch.manual_seed(0)
    model, teacher = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)), nn.Linear(6, 3)
    data = [(torch.randn(8, 6), torch.randint(0, 3, (8,))) for _ in range(4)]
    stage = {"method": "relational", "config": {"optimizer": "sgd", "optimizer_options": {"momentum": 0.0},
                                                "lr": 0.1, "epochs": 3}}
    one = sdk.compress(model, {"stages": [{**stage, "config": {**stage["config"], "max_steps": 1}}]},
                       data=data, teacher=teacher, progress=False)
    full = sdk.compress(model, {"stages": [stage]}, data=data, teacher=teacher, progress=False)
    # one plain SGD step from the original equals the max_steps=1 run: w - lr * grad of the first batch
    ref = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    ref.load_state_dict(model.state_dict())
    x, y = data[0]
    Relational(progress=False).loss(ref(x), teacher(x).detach(), y).backward()
    with torch.no_grad():
        assert torch.allclose(one[2].weight, model[2].weight - 0.1 * ref[2].weight.grad, atol=1e-6)
    assert not torch.allclose(full[2].weight, one[2].weight, atol=1e-4)
