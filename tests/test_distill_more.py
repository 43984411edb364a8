"""ensemble, fitnets, dml, relational: losses equal hand formulas; each method trains a digits student."""

import copy

import numpy as np
import pytest
import torch
from torch import nn

import sdk
from plugins.distill.dml import DML
from plugins.distill.ensemble import Ensemble
from plugins.distill.fitnets import FitNets
from plugins.distill.kd import KD
from plugins.distill.relational import Relational, angle_loss, distance_loss
from sdk.errors import ConfigError, InputError
from sdk.trainer import TrainConfig, evaluate, fit


# -- helpers --------------------------------------------------------------------

def np_log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def np_kl_batchmean(p, log_q):
    """KL(p ‖ q) summed over classes, averaged over the batch."""
    return float(np.sum(p * (np.log(p) - log_q)) / p.shape[0])


def np_ce(z, y):
    return float(-np.mean(np_log_softmax(z)[np.arange(len(y)), y]))


def mlp(hidden, seed):
    torch.manual_seed(seed)
    layers, prev = [nn.Flatten()], 64
    for h in hidden:
        layers += [nn.Linear(prev, h), nn.ReLU()]
        prev = h
    return nn.Sequential(*layers, nn.Linear(prev, 10))


def trained(model, xtr, ytr, steps=150, lr=1e-2):
    """Full-batch Adam on cross-entropy: a quick, deterministic teacher."""
    torch.manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(xtr), ytr).backward()
        opt.step()
    return model.eval()


def batches(x, y, size=64):
    return [(x[i:i + size], y[i:i + size]) for i in range(0, len(x), size)]


def accuracy(model, x, y):
    return evaluate(model, [(x, y)])


pytestmark = pytest.mark.usefixtures("one_thread")   # tiny models: one thread is faster


@pytest.fixture(scope="module")
def teachers(digits):
    """Three 64-64 MLP teachers trained from different seeds."""
    xtr, ytr, _, _ = digits
    return [trained(mlp((64, 64), seed), xtr, ytr) for seed in (0, 1, 2)]


@pytest.fixture
def logits():
    g = torch.Generator().manual_seed(5)
    return torch.randn(3, 6, 7, generator=g) * 3, torch.randn(6, 7, generator=g) * 3, torch.tensor([0, 3, 6, 2, 1, 4])


# -- ensemble -------------------------------------------------------------------

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
        .apply(student, teachers, batches(xtr, ytr))
    acc = accuracy(student, xte, yte)
    print(f"ensemble members {member_accs}, ensemble {ens_acc:.4f}, student {acc:.4f}")
    assert ens_acc > 0.95
    assert acc >= ens_acc - 0.03, (acc, ens_acc)


# -- fitnets --------------------------------------------------------------------

def test_hint_loss_is_half_mean_squared_error_through_the_regressor():
    g = torch.Generator().manual_seed(1)
    guided, hint = torch.randn(2, 4, 3, 3, generator=g), torch.randn(2, 6, 3, 3, generator=g)
    f = FitNets()
    reg = f.make_regressor(guided, hint)
    assert isinstance(reg, nn.Conv2d) and reg.kernel_size == (1, 1)        # conv features: 1x1 conv
    w, b = reg.weight.detach().numpy()[:, :, 0, 0], reg.bias.detach().numpy()
    pred = np.einsum("oc,nchw->nohw", w, guided.numpy()) + b[None, :, None, None]
    expected = 0.5 * np.mean((hint.numpy() - pred) ** 2)
    with torch.no_grad():
        assert float(f.hint_loss(hint, guided, reg)) == pytest.approx(expected, rel=1e-5)

    gv, hv = torch.randn(5, 3, generator=g), torch.randn(5, 8, generator=g)
    lin = f.make_regressor(gv, hv)                                          # vectors: linear
    w, b = lin[1].weight.detach().numpy(), lin[1].bias.detach().numpy()
    expected = 0.5 * np.mean((hv.numpy() - (gv.numpy() @ w.T + b)) ** 2)
    with torch.no_grad():
        assert float(f.hint_loss(hv, gv, lin)) == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ConfigError, match="equal feature shapes"):
        FitNets(regressor="identity").make_regressor(gv, hv)


def test_fitnets_bad_layer_name_lists_available_modules(teachers):
    with pytest.raises(ConfigError, match=r"hint_layer='net\.9'.*available: .*'1', '2', '3'"):
        FitNets(hint_layer="net.9", guided_layer="1").apply(mlp((16,), 0), teachers[0], [torch.zeros(4, 1, 8, 8)])
    with pytest.raises(ConfigError, match=r"guided_layer='' must name a module of Sequential; available: '0', '1'"):
        FitNets(hint_layer="3").apply(mlp((16,), 0), teachers[0], [torch.zeros(4, 1, 8, 8)])


@pytest.fixture(scope="module")
def thin_deep():
    """Student for fitnets: three 24-wide hidden layers (teacher: two 64-wide)."""
    return lambda: mlp((24, 24, 24), 3)


def test_fitnets_stage1_shrinks_hint_loss_and_trains_only_up_to_guided_layer(digits, teachers, thin_deep):
    xtr, ytr, _, _ = digits
    student = thin_deep()
    before = copy.deepcopy(student.state_dict())
    # teacher "3" = second hidden Linear (pre-ReLU); student "3" = second hidden Linear (pre-ReLU)
    f = FitNets(hint_layer="3", guided_layer="3", hint_epochs=15, hint_lr=1e-2, seed=0, progress=False)
    student.eval()
    guided, hint = f.features(student, teachers[0], xtr)
    with torch.no_grad():
        start = float(f.hint_loss(hint, guided, f.make_regressor(guided, hint)))
    reg = f.train_hints(student, teachers[0], batches(xtr, ytr))
    guided, hint = f.features(student, teachers[0], xtr)
    with torch.no_grad():
        end = float(f.hint_loss(hint, guided, reg))
    print(f"hint loss {start:.4f} -> {end:.4f} ({start / end:.1f}x)")
    assert end < start / 10, (start, end)
    after = student.state_dict()
    for k in before:
        changed = not torch.equal(before[k], after[k])
        assert changed == (k.split(".")[0] in ("1", "3")), k                # only layers feeding the guided one


def test_fitnets_student_beats_kd_alone_keeps_no_regressor_and_deploys(digits, teachers, thin_deep, tmp_path):
    """The paper's point: hints make a thin deep student trainable where kd alone lags."""
    xtr, ytr, xte, yte = digits
    student, kd_only = thin_deep(), thin_deep()
    keys = set(student.state_dict())
    FitNets(hint_layer="3", guided_layer="3", hint_epochs=20, hint_lr=1e-2, epochs=20, lr=5e-3,
            progress=False).apply(student, teachers[0], batches(xtr, ytr))
    KD(epochs=20, lr=5e-3, progress=False).apply(kd_only, teachers[0], batches(xtr, ytr))   # same stage-2 budget
    acc, kd_acc, t_acc = accuracy(student, xte, yte), accuracy(kd_only, xte, yte), accuracy(teachers[0], xte, yte)
    print(f"fitnets teacher {t_acc:.4f}, fitnets student {acc:.4f}, kd-only student {kd_acc:.4f}")
    assert set(student.state_dict()) == keys                                # the regressor was discarded
    assert acc >= t_acc - 0.03, (acc, t_acc)
    assert acc >= kd_acc + 0.02, (acc, kd_acc)
    art = sdk.deploy(student, "arm-int8", (xte[:1],), calibration=[xtr[i:i + 64] for i in range(0, 256, 64)],
                     output=tmp_path / "fitnets", progress=False)
    int8 = np.concatenate([art.run(xte[i:i + 1])[0] for i in range(0, 100)]).argmax(1)
    with torch.no_grad():
        agree = float((int8 == student(xte[:100]).argmax(1).numpy()).mean())
    assert agree >= 0.97, agree


# -- dml ------------------------------------------------------------------------

def np_dml(z, y, k):
    """CE(z_k, y) + 1/(K−1) Σ_{l≠k} KL(p_l ‖ p_k), by hand."""
    log_p = [np_log_softmax(zz) for zz in z]
    kl = [np_kl_batchmean(np.exp(log_p[m]), log_p[k]) for m in range(len(z)) if m != k]
    return np_ce(z[k], y) + sum(kl) / (len(z) - 1)


@pytest.mark.parametrize("K", [2, 3])
def test_dml_loss_is_ce_plus_mean_kl_from_each_peer(logits, K):
    t, _, y = logits
    z = [t[i].clone().requires_grad_(True) for i in range(K)]
    d = DML()
    for k in range(K):
        got = d.loss(z[k], [z[m] for m in range(K) if m != k], y)
        assert float(got.detach()) == pytest.approx(np_dml([zz.detach().numpy() for zz in z], y.numpy(), k), rel=1e-5)
    total = d.cohort_loss(z, y)
    grads = torch.autograd.grad(total, z)
    for k in range(K):          # the peers are detached: network k's gradient is that of L_k alone
        own = torch.autograd.grad(d.loss(z[k], [z[m] for m in range(K) if m != k], y), z[k])[0]
        assert torch.allclose(grads[k], own, atol=1e-6)


def test_dml_makes_fresh_peers_and_leaves_given_peers_untouched():
    student = mlp((16,), 0)
    cohort = DML(peers=2, seed=4).make_cohort(student, None)
    firsts = [m[1].weight.detach() for m in cohort]
    assert len(cohort) == 3 and cohort[0] is student
    assert not torch.equal(firsts[0], firsts[1]) and not torch.equal(firsts[1], firsts[2])
    peer = mlp((16,), 9)
    snapshot = copy.deepcopy(peer.state_dict())
    data = [(torch.rand(8, 1, 8, 8), torch.arange(8) % 10)]
    d = DML(progress=False)
    d.apply(student, peer, data)
    assert all(torch.equal(v, peer.state_dict()[k]) for k, v in snapshot.items())
    assert len(d.cohort) == 2 and not torch.equal(d.cohort[1][1].weight, peer[1].weight)
    with pytest.raises(InputError, match="needs labels"):
        d.apply(student, None, [torch.rand(8, 1, 8, 8)])


def test_dml_cohort_is_no_worse_than_independent_training(digits):
    xtr, ytr, xte, yte = digits
    data, epochs, lr = batches(xtr, ytr), 20, 3e-3
    alone = []
    for seed in (0, 1):
        net = mlp((32,), seed)
        fit(net, data, lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1]),
            TrainConfig(epochs=epochs, lr=lr, progress=False))
        alone.append(accuracy(net, xte, yte))
    d = DML(epochs=epochs, lr=lr, progress=False)
    d.apply(mlp((32,), 0), [mlp((32,), 1)], data)                             # same initialisations as above
    mutual = [accuracy(m, xte, yte) for m in d.cohort]
    print(f"independent {alone}, mutual {mutual}")
    assert min(mutual) > 0.9
    assert all(m >= a - 0.01 for m, a in zip(mutual, alone)), (mutual, alone)


# -- relational -----------------------------------------------------------------

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
