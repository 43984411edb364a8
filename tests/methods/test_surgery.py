"""surgery (Guo et al. 2016, Dynamic Network Surgery): the mask rule is the paper's two thresholds
(numpy), every update during training follows it, masked weights keep learning (straight-through) and
come back when the gradient lifts them above b, the updates thin out as p(step) = (1 + γ·step)^(−power),
the final sparsity is exact, and the pruned digits LeNet keeps its accuracy through an int8 artifact."""

import copy

import numpy as np
import pytest
import torch

import sdk
from examples import digits as D
from plugins.prune.surgery import (SurgeryPruner, final_mask, splice_mask, surgery_mask, surgery_thresholds,
                                   update_probability)
from prune_helpers import batches, dense, same_layers  # noqa: F401 (fixtures)
from sdk.errors import ConfigError, InputError
from sdk.masks import apply_mask, bake, mask_of
from sdk.trainer import training_extras

pytestmark = pytest.mark.usefixtures("one_thread")   # tiny models: one thread is faster


def _rule(w, mask, a, b):
    """Guo et al. eq. 3: h(w) = 0 if a > |w|, T if a ≤ |w| < b, 1 if b ≤ |w|."""
    out = mask.copy()
    out[np.abs(w) < a] = 0
    out[np.abs(w) >= b] = 1
    return out


def test_mask_rule_is_the_two_thresholds():
    rng = np.random.default_rng(0)
    w = rng.normal(size=500).astype(np.float32)
    w[:4] = [0.3, -0.3, 0.7, -0.7]                          # on the thresholds: a prunes nothing, b splices
    mask = (rng.random(500) > 0.5).astype(np.float32)
    got = splice_mask(torch.from_numpy(w), torch.from_numpy(mask), 0.3, 0.7).numpy()
    np.testing.assert_array_equal(got, _rule(w, mask, 0.3, 0.7))
    np.testing.assert_array_equal(got[:4], [mask[0], mask[1], 1, 1])
    a, b = surgery_thresholds(torch.from_numpy(w), 0.6, 0.1)
    t = np.sort(np.abs(w))[300]
    assert (a, b) == pytest.approx((0.9 * t, 1.1 * t), rel=1e-6)


def test_final_mask_moves_the_fewest_entries():
    rng = np.random.default_rng(1)
    w = torch.from_numpy(rng.normal(size=40))
    for zeros in (10, 30):
        mask = torch.ones(40)
        mask[torch.randperm(40, generator=torch.Generator().manual_seed(zeros))[:zeros]] = 0
        got = final_mask(w, mask, 0.5)
        assert int((got == 0).sum()) == 20
        assert int((got != mask).sum()) == abs(zeros - 20)
        changed = (got != mask).numpy()
        mag = w.abs().numpy()
        if zeros > 20:    # the largest masked come back
            assert mag[changed].min() >= mag[(mask.numpy() == 0) & ~changed].max()
        else:             # the smallest kept go
            assert mag[changed].max() <= mag[(mask.numpy() == 1) & ~changed].min()


def test_update_probability_decreases():
    p = [update_probability(t, 0.1, 1.0) for t in range(0, 200, 10)]
    assert p[0] == 1.0 and np.all(np.diff(p) < 0)
    assert update_probability(30, 0.1, 2.0) == pytest.approx(4.0 ** -2)


def _splice_problem():
    """Labels depend on feature 3 alone, whose weights start tiny: the first update prunes them."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(512, 4, generator=gen)
    y = (x[:, 3] > 0).long()
    net = torch.nn.Linear(4, 2, bias=False)
    with torch.no_grad():
        net.weight.copy_(torch.tensor([[0.8, -0.7, 0.6, 0.01], [-0.8, 0.7, -0.6, -0.01]]))
    return net, [(x[i:i + 32], y[i:i + 32]) for i in range(0, 512, 32)]


def test_a_pruned_weight_comes_back():
    """Every mask update follows the rule on the weights of that step (checked in numpy from a callback).
    Feature 3's weights are pruned by the first update, keep receiving gradients while masked (plain SGD:
    no momentum carries them; with an ordinary mask they would stay frozen), grow past b and are spliced
    back, and the exact final mask keeps them."""
    net, data = _splice_problem()
    seen = []

    def watch(model, step):
        seen.append((model.parametrizations.weight.original.detach().numpy().copy(),
                     surgery_mask(model).numpy().copy()))

    pruner = SurgeryPruner(sparsity=0.5, margin=0.1, gamma=0.0, epochs=3, finetune_epochs=0, optimizer="sgd",
                           optimizer_options={"momentum": 0.0}, lr=0.5, progress=False)
    with training_extras([], [watch]):
        pruned = pruner.apply(net, data)
    assert [h[0] for h in pruner.history] == list(range(48))   # gamma 0: p = 1, an update after every step
    previous = np.ones((2, 4), np.float32)
    for w, mask in seen:
        t = np.sort(np.abs(w).reshape(-1))[4]
        np.testing.assert_array_equal(mask, _rule(w, previous, 0.9 * t, 1.1 * t))
        previous = mask
    masks = np.array([m[:, 3] for _, m in seen])
    w3 = np.abs(np.array([w[:, 3] for w, _ in seen]))
    assert np.all(masks[0] == 0)                                   # pruned by the first update
    back = next(i for i, m in enumerate(masks) if np.all(m == 1))
    assert np.all(masks[:back] == 0) and pruner.history[back][2] >= 2     # both rows spliced at once
    assert np.all(np.diff(w3[:back + 1], axis=0) > 0)              # it learnt while masked (straight-through)
    assert np.all(w3[back] > 2 * w3[0])
    final = mask_of(pruned)
    assert final[:, 3].tolist() == [1.0, 1.0] and int((final == 0).sum()) == 4
    assert surgery_mask(pruned) is None                            # the training parametrization is gone
    kept = pruned.weight.detach().abs()
    assert float(kept[:, 3].min()) > float(kept[:, :3].max())     # the spliced feature is the one that matters


@pytest.fixture(scope="module")
def dns_run(dense, batches):
    """80% per layer: 2 epochs of surgery (γ = 0.1) and 1 epoch with the final mask fixed."""
    model, _ = dense
    pruner = SurgeryPruner(sparsity=0.8, epochs=2, finetune_epochs=1, lr=3e-3, gamma=0.1, progress=False)
    return pruner, pruner.apply(copy.deepcopy(model), batches)


def test_target_sparsity_reached_and_masks_recovered(dense, dns_run):
    model, _ = dense
    pruner, pruned = dns_run
    for _, mod in same_layers(pruned, model):
        assert int((mod.weight == 0).sum()) == round(0.8 * mod.weight.numel())
        assert int((mask_of(mod) == 0).sum()) == round(0.8 * mod.weight.numel())
    steps = [h[0] for h in pruner.history]
    assert steps[0] == 0 and len(steps) < 0.6 * 44        # updates thin out over the 44 steps (E ≈ 18)
    assert sum(h[2] for h in pruner.history) > 0          # some masked weights were spliced back
    early, late = sum(1 for s in steps if s < 22), sum(1 for s in steps if s >= 22)
    assert early > late


def test_surgery_accuracy_and_int8_artifact(digits, dense, dns_run, tmp_path):
    """Measured: dense 0.989; surgery to 80% with 1 fixed-mask epoch 0.956 (magnitude one-shot then 3
    epochs of fine-tuning: 0.936).  The int8 artifact keeps the sparsity (manifest density 0.2) and the
    accuracy."""
    xtr, _, xte, yte = digits
    _, acc = dense
    pruned = bake(copy.deepcopy(dns_run[1]))
    torch_acc = D.accuracy(pruned, xte, yte)
    assert torch_acc >= acc - 0.06, (acc, torch_acc)
    art = sdk.deploy(pruned, "arm-int8", (xte[:1],), calibration=[xtr[i:i + 32] for i in range(0, 320, 32)],
                     output=tmp_path / "dns", progress=False)
    rows = art.manifest["encodings"]
    assert all(abs(r["sparsity"]["density"] - 0.2) < 0.002 for r in rows)
    assert any(r["sparsity"]["shipped"] == "sparse" for r in rows)
    n = 150
    logits = np.concatenate([art.run(xte[i:i + 1])[0] for i in range(n)])
    assert np.mean(logits.argmax(1) == yte[:n].numpy()) >= torch_acc - 0.04


def test_surgery_bad_input(batches):
    from examples.models import make

    with pytest.raises(InputError, match="data="):
        SurgeryPruner().apply(make("mlp")[0])
    masked = make("mlp")[0]
    apply_mask(masked.net[1], torch.ones_like(masked.net[1].weight))
    with pytest.raises(InputError, match="net.1"):
        SurgeryPruner(epochs=1).apply(masked, batches[:2])
    with pytest.raises(ConfigError, match="margin"):
        SurgeryPruner(margin=1.0)
    with pytest.raises(ConfigError, match="sparsity"):
        SurgeryPruner(sparsity=-0.1)
