"""dml: each network's loss is CE + mean KL from its peers; fresh peers differ, given ones are
copied; the cohort is no worse than independent training; in a recipe with no teacher the peers
are fresh (not copies of the original)."""

import copy

import numpy as np
import pytest
import torch
from torch import nn

import sdk
from distill_helpers import accuracy, batches, check_training_config, mlp, np_ce, np_kl_batchmean, np_log_softmax
from plugins.distill.dml import DML
from sdk import masks
from sdk.context import DataStreams, StageContext
from sdk.errors import InputError
from sdk.trainer import TrainConfig, fit

pytestmark = pytest.mark.usefixtures("one_thread")   # tiny models: one thread is faster


@pytest.fixture
def logits():
    g = torch.Generator().manual_seed(5)
    return torch.randn(3, 6, 7, generator=g) * 3, torch.tensor([0, 3, 6, 2, 1, 4])


def np_dml(z, y, k):
    """CE(z_k, y) + 1/(K−1) Σ_{l≠k} KL(p_l ‖ p_k), by hand."""
    log_p = [np_log_softmax(zz) for zz in z]
    kl = [np_kl_batchmean(np.exp(log_p[m]), log_p[k]) for m in range(len(z)) if m != k]
    return np_ce(z[k], y) + sum(kl) / (len(z) - 1)


@pytest.mark.parametrize("K", [2, 3])
def test_dml_loss_is_ce_plus_mean_kl_from_each_peer(logits, K):
    t, y = logits
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


def test_dml_config_is_a_training_config():
    check_training_config(DML)


# -- in a recipe -------------------------------------------------------------------

@pytest.fixture
def spy(monkeypatch):
    """Records each cohort dml builds (its weights at the start) and the logits of its first step."""
    seen = {"start": [], "first_logits": []}
    make, loss = DML.make_cohort, DML.cohort_loss

    def make_cohort(self, student, teacher):
        cohort = make(self, student, teacher)
        seen["start"].append([copy.deepcopy(m.state_dict()) for m in cohort])
        seen["first_logits"].append(None)
        return cohort

    def cohort_loss(self, logits, target):
        if seen["first_logits"][-1] is None:
            seen["first_logits"][-1] = [z.detach().numpy().copy() for z in logits]
        return loss(self, logits, target)

    monkeypatch.setattr(DML, "make_cohort", make_cohort)
    monkeypatch.setattr(DML, "cohort_loss", cohort_loss)
    return seen


def first_step_mimicry(logits):
    """The student's KL from its peers at the first step, by hand (numpy)."""
    log_p = [np_log_softmax(z) for z in logits]
    return sum(np_kl_batchmean(np.exp(lp), log_p[0]) for lp in log_p[1:]) / (len(log_p) - 1)


def test_with_no_teacher_a_recipe_dml_stage_trains_fresh_peers(spy):
    torch.manual_seed(0)
    model = mlp((16,), 0)
    data = [(torch.rand(8, 1, 8, 8), torch.arange(8) % 10) for _ in range(2)]
    recipe = {"stages": [{"method": "dml", "config": {"peers": 2, "seed": 3}}]}
    out = sdk.compress(model, recipe, data=data, progress=False)
    student0, *peers0 = spy["start"][0]
    assert len(peers0) == 2
    assert all(torch.equal(student0[k], v) for k, v in model.state_dict().items())      # the student starts as model
    assert all(not torch.equal(p["1.weight"], student0["1.weight"]) for p in peers0)    # the peers do not
    assert first_step_mimicry(spy["first_logits"][0]) > 1e-3
    assert not torch.equal(out[1].weight, model[1].weight)

    # the caller naming the original as the peer gets exactly that: a copy, no mimicry signal at first
    sdk.compress(model, recipe, data=data, teacher=model, progress=False)
    assert first_step_mimicry(spy["first_logits"][1]) == pytest.approx(0.0, abs=1e-9)


def test_run_tells_no_teacher_from_the_original_given_as_teacher(spy):
    model = mlp((16,), 0)
    data = [(torch.rand(8, 1, 8, 8), torch.arange(8) % 10)]
    DML(progress=False).run(copy.deepcopy(model), StageContext(DataStreams.of(data), original=model))
    DML(progress=False).run(copy.deepcopy(model), StageContext(DataStreams.of(data), original=model, teacher=model))
    fresh, given = (start[1]["1.weight"] for start in spy["start"])
    assert not torch.equal(fresh, model[1].weight) and torch.equal(given, model[1].weight)


def test_fresh_peers_of_a_pruned_student_are_reinitialised_and_keep_its_mask():
    student = mlp((16,), 0)
    mask = (torch.rand(16, 64, generator=torch.Generator().manual_seed(1)) > 0.5).float()
    masks.apply_mask(student[1], mask)
    (_, peer) = DML(peers=1, seed=2).make_cohort(student, None)
    own, fresh = student[1].parametrizations.weight.original, peer[1].parametrizations.weight.original
    assert not torch.equal(own, fresh)                                        # reset, not a copy of the student
    assert bool((peer[1].weight[mask == 0] == 0).all())                      # as sparse as the student
    assert torch.equal(student[1].weight, own * mask)                         # the student's layer is intact
