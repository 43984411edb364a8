"""obs (Hassibi & Stork 1993, empirical Fisher as in WoodFisher / OBC): on a quadratic the saliency and the
OBS update equal the constrained minimum solved in numpy from H (not H⁻¹), iterated removals reach the exact
minimum for the set they remove, the Fisher blocks equal per-sample autograd, the sparsity is exact, and on
the digits LeNet one-shot OBS raises the loss far less than magnitude pruning (and than zeroing the same
weights without the update); the pruned model ships sparse."""

import copy

import numpy as np
import pytest
import torch

import sdk
from examples import digits as D
from plugins.prune.magnitude import MagnitudePruner
from plugins.prune.obs import OBSPruner
from prune_helpers import batches, dense, same_layers  # noqa: F401 (fixtures)
from sdk.errors import ConfigError, InputError
from sdk.hessian import allocate, dampened_inverse, fisher_rows, obs_prune, obs_saliency, obs_update
from sdk.masks import apply_mask, bake, mask_of, prunable_layers

pytestmark = pytest.mark.usefixtures("one_thread")   # tiny models: one thread is faster


def _spd(d, seed):
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(d, d))
    return a @ a.T + 0.5 * np.eye(d), rng.normal(size=d)


def _constrained_minimum(h, w_star, pruned):
    """argmin ½(w − w*)ᵀH(w − w*) with w_P = 0, from H alone: d_R = H_RR⁻¹ H_RP w*_P."""
    pruned = np.asarray(sorted(pruned))
    rest = np.setdiff1d(np.arange(len(w_star)), pruned)
    w = np.zeros_like(w_star)
    w[rest] = w_star[rest] + np.linalg.solve(h[np.ix_(rest, rest)], h[np.ix_(rest, pruned)] @ w_star[pruned])
    d = w - w_star
    return w, 0.5 * d @ h @ d


def test_saliency_and_update_are_the_quadratic_closed_form():
    """For every single weight q: L_q = w_q²/(2[H⁻¹]_qq) is the least loss with w_q = 0, and w* + δw its
    argmin (numpy solves the constrained problem with H)."""
    h, w_star = _spd(7, 0)
    hinv = torch.from_numpy(np.linalg.inv(h))
    w = torch.from_numpy(w_star)
    sal = obs_saliency(w[None], hinv[None])[0].numpy()
    for q in range(7):
        best, loss = _constrained_minimum(h, w_star, [q])
        np.testing.assert_allclose(sal[q], loss, rtol=1e-10)
        np.testing.assert_allclose(w_star + obs_update(w, hinv, q).numpy(), best, rtol=1e-9, atol=1e-12)


def test_iterative_obs_reaches_the_constrained_minimum_of_the_set_it_removes():
    """Three removals with downdates between them: the weights are the exact argmin for the removed set,
    the summed step saliencies its loss, the first step the smallest single saliency, and each step
    cheaper than zeroing alone."""
    h, w_star = _spd(9, 1)
    hinv = torch.from_numpy(np.linalg.inv(h))[None]
    new, keep, losses = obs_prune(torch.from_numpy(w_star)[None], hinv, torch.tensor([3]))
    pruned = np.flatnonzero(~keep[0].numpy())
    assert len(pruned) == 3 and np.all(new[0].numpy()[pruned] == 0)
    best, loss = _constrained_minimum(h, w_star, pruned)
    np.testing.assert_allclose(new[0].numpy(), best, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(float(losses[0, :3].sum()), loss, rtol=1e-9)
    assert np.all(np.isinf(losses[0, 3:].numpy()))
    single = w_star ** 2 / (2 * np.diag(np.linalg.inv(h)))
    assert float(losses[0, 0]) == pytest.approx(single.min(), rel=1e-10)
    zeroed = w_star.copy()
    zeroed[pruned] = 0
    assert loss < 0.5 * (zeroed - w_star) @ h @ (zeroed - w_star)


def test_rows_are_independent_blocks():
    """Two rows pruned in one batched call give what each gives alone."""
    (h1, w1), (h2, w2) = _spd(6, 2), _spd(6, 3)
    hinv = torch.from_numpy(np.stack([np.linalg.inv(h1), np.linalg.inv(h2)]))
    both, _, _ = obs_prune(torch.from_numpy(np.stack([w1, w2])), hinv, torch.tensor([2, 4]))
    for r, (w, k) in enumerate([(w1, 2), (w2, 4)]):
        alone, _, _ = obs_prune(torch.from_numpy(w)[None], hinv[r:r + 1], torch.tensor([k]))
        np.testing.assert_allclose(both[r].numpy(), alone[0].numpy(), rtol=1e-12)


def test_allocate_takes_the_k_cheapest_steps():
    rng = np.random.default_rng(4)
    losses = np.cumsum(rng.exponential(size=(5, 8)), axis=1)           # non-decreasing per row
    for k in (0, 1, 13, 40):
        cheapest = np.argsort(losses.reshape(-1), kind="stable")[:k]
        expected = np.bincount(cheapest // 8, minlength=5)
        np.testing.assert_array_equal(allocate(torch.from_numpy(losses), k).numpy(), expected)
    bumpy = torch.tensor([[0.1, 0.9, 0.2], [0.3, 0.4, 0.5]])            # envelope 0.1, 0.9, 0.9
    assert allocate(bumpy, 3).tolist() == [1, 2]


def test_fisher_rows_equal_per_sample_autograd():
    """F[r] = mean_n g_n,r g_n,rᵀ with g from one backward per sample (a masked layer included: the
    gradient of its stored weight is the masked one)."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2), torch.nn.ReLU(),
                              torch.nn.Flatten(), torch.nn.Linear(2 * 4 * 4, 3))
    net[1].running_mean.uniform_(-0.2, 0.2)
    apply_mask(net[4], (torch.rand(3, 32) > 0.3).float())
    x, y = torch.randn(10, 1, 6, 6), torch.randint(0, 3, (10,))
    layers = prunable_layers(net)
    got = fisher_rows(net, layers, [(x[:4], y[:4]), (x[4:], y[4:])], samples=9, chunk=3)
    net.eval()
    params = [net[0].weight, net[4].parametrizations.weight.original]
    ref = [np.zeros((2, 9, 9)), np.zeros((3, 32, 32))]
    for n in range(9):
        loss = torch.nn.functional.cross_entropy(net(x[n:n + 1]), y[n:n + 1])
        for acc, g in zip(ref, torch.autograd.grad(loss, params)):
            g = g.reshape(g.shape[0], -1).double().numpy()
            acc += np.einsum("ri,rj->rij", g, g) / 9
    for (name, _), r in zip(layers, ref):
        np.testing.assert_allclose(got[name].numpy(), r, rtol=1e-5, atol=1e-12)
    hinv = dampened_inverse(got["4"], 0.1).numpy()
    f = got["4"].numpy()
    for row in range(3):
        lam = 0.1 * np.mean(np.diag(f[row]))
        np.testing.assert_allclose(hinv[row], np.linalg.inv(f[row] + lam * np.eye(32)), rtol=1e-6)


@pytest.fixture(scope="module")
def one_shot(dense, batches):
    """OBS and magnitude, one shot, at 50% and 70% per layer, from the same trained LeNet."""
    model, _ = dense
    runs = {}
    for s in (0.5, 0.7):
        pruner = OBSPruner(sparsity=s)
        runs[s] = (pruner, pruner.apply(copy.deepcopy(model), batches),
                   MagnitudePruner(sparsity=s).apply(copy.deepcopy(model)))
    return runs


def _ce(model, x, y):
    with torch.no_grad():
        return float(torch.nn.functional.cross_entropy(model(x), y))


def test_exact_sparsity_and_the_update_moves_the_kept_weights(dense, one_shot):
    model, _ = dense
    for s, (pruner, pruned, _) in one_shot.items():
        assert set(pruner.history) == {n for n, _ in prunable_layers(model)}
        for (name, mod), (_, ref) in zip(same_layers(pruned, model), prunable_layers(model)):
            w = mod.weight.detach()
            assert int((w == 0).sum()) == round(s * w.numel()) and int((mask_of(mod) == 0).sum()) == round(
                s * w.numel())
            kept = w != 0
            assert not torch.allclose(w[kept], ref.weight.detach()[kept])      # OBS moved them


def test_obs_loss_increase_is_below_magnitudes(digits, dense, one_shot):
    """The issue's acceptance: at the same one-shot sparsity the test cross-entropy rises far less than with
    magnitude pruning, and less than zeroing the same weights without the OBS update.  Measured (dense CE
    0.060, accuracy 0.989): 50%: OBS +0.093 (acc 0.958), zeroing +0.23 (0.922), magnitude +0.81 (0.629);
    70%: +0.34 (0.898), +0.96 (0.720), +1.70 (0.367).  At 90% the quadratic model no longer holds: OBS
    +2.50 vs magnitude +2.27 (both near chance), so the claim is tested at 50% and 70%."""
    _, _, xte, yte = digits
    model, acc = dense
    base = _ce(model, xte, yte)
    for s, (_, obs, mag) in one_shot.items():
        zeroed = copy.deepcopy(model)
        for (_, m), (_, p) in zip(prunable_layers(zeroed), same_layers(obs, model)):
            apply_mask(m, mask_of(p))
        up_obs, up_mag, up_zero = (_ce(m, xte, yte) - base for m in (obs, mag, zeroed))
        assert up_obs < 0.5 * up_mag, (s, up_obs, up_mag)
        assert up_obs < up_zero, (s, up_obs, up_zero)
        assert D.accuracy(obs, xte, yte) > D.accuracy(mag, xte, yte) + 0.2
    assert D.accuracy(one_shot[0.5][1], xte, yte) >= acc - 0.05


def test_obs_pruned_lenet_ships_sparse(digits, one_shot, tmp_path):
    """arm-fp32 (sparsity "auto") stores the pruned layers sparse behind DENSIFY where that makes the file
    smaller (all but the 144-weight first conv, whose sparse tables would cost more than its zeros save):
    the manifest says so with the plan's density, the file is smaller than the dense file of the same
    weights, and the artifact computes what torch does."""
    xtr, _, xte, yte = digits
    pruned = bake(copy.deepcopy(one_shot[0.7][1]))
    sparse = sdk.deploy(pruned, "arm-fp32", (xte[:1],), output=tmp_path / "sparse", progress=False)
    dense_file = sdk.deploy(pruned, "arm-fp32", (xte[:1],), output=tmp_path / "dense", progress=False,
                            sparsity="off")
    rows = sparse.manifest["encodings"]
    assert len(rows) == 4
    assert {r["layer"]: r["sparsity"]["shipped"] for r in rows} == {
        "features.0": "dense", "features.4": "sparse", "classifier.1": "sparse", "classifier.3": "sparse"}
    assert all(abs(r["sparsity"]["density"] - 0.3) < 0.002 for r in rows)
    size, full = len(sparse.read_bytes("model.tflite")), len(dense_file.read_bytes("model.tflite"))
    assert size < 0.6 * full, (size, full)            # measured: 24 864 vs 57 024 bytes
    n = 100
    out = np.concatenate([sparse.run(xte[i:i + 1])[0] for i in range(n)])
    np.testing.assert_allclose(out, pruned(xte[:n]).detach().numpy(), rtol=1e-4, atol=1e-4)
    assert np.mean(out.argmax(1) == yte[:n].numpy()) >= 0.85


def test_obs_runs_as_a_recipe_stage(batches):
    from examples.models import make

    model, _ = make("mlp")
    small = sdk.compress(model, {"stages": [{"method": "obs", "config": {"sparsity": 0.6, "samples": 128}}]},
                         data=batches[:2], progress=False)
    for name in ("net.1", "net.3", "net.5"):
        w = small.get_submodule(name).weight
        assert int((w == 0).sum()) == round(0.6 * w.numel())


def test_obs_bad_input():
    from examples.models import make

    with pytest.raises(InputError, match="data="):
        OBSPruner().apply(make("mlp")[0])
    with pytest.raises(InputError, match="labelled"):
        OBSPruner().apply(make("mlp")[0], [torch.randn(4, 1, 8, 8)])
    with pytest.raises(ConfigError, match="sparsity"):
        OBSPruner(sparsity=1.0)
    with pytest.raises(ConfigError, match="dampening"):
        OBSPruner(dampening=0.0)
