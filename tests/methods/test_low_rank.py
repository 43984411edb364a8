"""low-rank (Denton et al. 2014 / Zhang et al. 2016): a factorised layer is numpy's truncated SVD (and the
layer itself at full rank); the rank allocation equals a brute-force optimum of the stated objective —
discarded singular-value energy, or the output error measured by running the layers — under the MACs
budget; the digits LeNet at half its MACs ships to arm-int8 with the budget met in the artifact's profile
and its accuracy kept after fine-tuning; the whole-network allocation beats the same budget applied layer by
layer; torchvision's resnet18 ships with fewer MACs; a YAML recipe with a bytes budget; named errors."""

import copy
import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sdk
from examples import digits as D
from plugins.prune.low_rank import ATTR, LowRankPruner, allocate_ranks, factorise, factorise_model
from prune_helpers import (batches, calibration, deploy_with_dense, dense, graph_macs,  # noqa: F401 (fixtures)
                           int8_accuracy, lenet_macs, profile_macs, torchvision_resnet18)
from sdk.errors import ConfigError, InputError
from sdk.recipe import Recipe

pytestmark = pytest.mark.usefixtures("one_thread")   # tiny models: one thread is faster


def truncated(w: np.ndarray, r: int) -> np.ndarray:
    """numpy's rank-r truncated SVD of a 2-D weight, in float64."""
    u, s, vt = np.linalg.svd(w.astype(np.float64), full_matrices=False)
    return (u[:, :r] * s[:r]) @ vt[:r]


def saving_ranks(m: int, n: int) -> list[int]:
    """The ranks whose two factors cost fewer MACs than the m×n layer, by enumeration."""
    return [r for r in range(1, min(m, n) + 1) if r * (m + n) < m * n]


@pytest.mark.parametrize("full", [False, True])
def test_a_factorised_layer_is_numpys_truncated_svd(full):
    torch.manual_seed(0)
    cases = [(nn.Linear(12, 9), torch.randn(4, 12), lambda x, w, b: F.linear(x, w, b)),
             (nn.Conv2d(5, 7, 3, stride=2, padding=1), torch.randn(2, 5, 9, 9),
              lambda x, w, b: F.conv2d(x, w, b, stride=2, padding=1)),
             (nn.Conv1d(4, 6, 3, padding=2, dilation=2), torch.randn(2, 4, 11),
              lambda x, w, b: F.conv1d(x, w, b, padding=2, dilation=2))]
    for layer, x, op in cases:
        w = layer.weight.detach().numpy()
        w2 = w.reshape(w.shape[0], -1)
        r = min(w2.shape) if full else 3
        first, second = factorise(layer, r)
        assert first.weight.shape[0] == r and first.bias is None and second.weight.shape[1] == r
        assert second.weight.shape[2:] == (1,) * (w.ndim - 2)          # the second conv is 1×1
        product = second.weight.detach().double().numpy().reshape(w.shape[0], r) \
            @ first.weight.detach().double().numpy().reshape(r, -1)
        np.testing.assert_allclose(product, truncated(w2, r), atol=1e-6)
        reference = torch.from_numpy(truncated(w2, r)).float().reshape(w.shape)
        with torch.no_grad():
            out = nn.Sequential(first, second)(x)
            np.testing.assert_allclose(out.numpy(), op(x, reference, layer.bias).numpy(), atol=1e-5)
            if full:
                np.testing.assert_allclose(out.numpy(), layer(x).numpy(), atol=1e-5)
            else:       # Eckart–Young: rank 3 loses exactly the energy of the dropped singular values
                s = np.linalg.svd(w2.astype(np.float64), compute_uv=False)
                assert np.sum((product - w2) ** 2) == pytest.approx(np.sum(s[3:] ** 2), rel=1e-6)


def brute_force(options, budget):
    """The least summed loss over every combination of one ``(cost, loss)`` per group with cost ≤ budget."""
    best = (math.inf, None)
    for combo in itertools.product(*(range(len(g)) for g in options)):
        cost = sum(options[i][j][0] for i, j in enumerate(combo))
        loss = sum(options[i][j][1] for i, j in enumerate(combo))
        if cost <= budget and loss < best[0]:
            best = (loss, combo)
    return best


def test_allocate_ranks_is_the_brute_force_optimum_and_the_coarse_grid_keeps_the_budget():
    rng = np.random.default_rng(0)
    for _ in range(30):
        options = [[(int(c), float(v)) for c, v in zip(rng.integers(1, 200, 5), rng.uniform(0, 1, 5))]
                   for _ in range(3)]
        budget = int(rng.integers(40, 450))
        loss, combo = brute_force(options, budget)
        if combo is None:
            with pytest.raises(ConfigError, match="fits"):
                allocate_ranks(options, budget)
            continue
        got = allocate_ranks(options, budget)
        assert sum(options[i][j][0] for i, j in enumerate(got)) <= budget
        assert sum(options[i][j][1] for i, j in enumerate(got)) == pytest.approx(loss, abs=1e-12)
        # on a grid of 16 buckets: still within budget, and no worse than the optimum 3 grid steps lower
        g = math.gcd(*(c for grp in options for c, _ in grp))
        step = g * max(1, math.ceil(budget / g / 16))
        coarse = allocate_ranks(options, budget, max_buckets=16)
        assert sum(options[i][j][0] for i, j in enumerate(coarse)) <= budget
        lower, _ = brute_force(options, budget - 3 * step)
        assert sum(options[i][j][1] for i, j in enumerate(coarse)) <= lower + 1e-12


class Tiny(nn.Module):
    """conv 3→8, a depthwise conv (left alone, its MACs counted), linear 128→12, linear 12→10 on 4×4."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.fc1 = nn.Linear(8 * 16, 12)
        self.fc2 = nn.Linear(12, 10)

    def forward(self, x):
        x = torch.relu(self.dw(torch.relu(self.conv(x))))
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


#: Tiny's factorisable layers: (name, m, n, output positions)
TINY = [("conv", 8, 27, 16), ("fc1", 12, 128, 1), ("fc2", 10, 12, 1)]
TINY_DW_MACS = 16 * 8 * 9


def measured_errors(model, data, name, ranks):
    """‖(W − W_r) X‖² / ‖W X‖² of layer ``name`` over ``data``, measured by running the layer's op on its
    recorded inputs with the weight difference (no bias)."""
    layer = model.get_submodule(name)
    inputs = []
    handle = layer.register_forward_pre_hook(lambda m, a: inputs.append(a[0].detach()))
    with torch.no_grad():
        for x, _ in data:
            model(x)
    handle.remove()
    w = layer.weight.detach().numpy()
    w2 = w.reshape(w.shape[0], -1)
    op = (lambda x, k: F.linear(x, k)) if isinstance(layer, nn.Linear) else (lambda x, k: F.conv2d(x, k, padding=1))
    whole = sum(float((op(x, layer.weight.detach().double()) ** 2).sum()) for x in map(torch.Tensor.double, inputs))
    out = {}
    for r in ranks:
        diff = torch.from_numpy(w2 - truncated(w2, r)).reshape(w.shape)
        out[r] = sum(float((op(x.double(), diff) ** 2).sum()) for x in inputs) / whole
    return out


@pytest.mark.parametrize("objective,budget,min_rank", [("energy", 0.6, 1), ("output", 0.5, 1), ("output", 0.6, 2)])
def test_the_rank_configuration_is_the_brute_force_optimum(objective, budget, min_rank):
    """Every combination of dense / each saving rank of the three layers, costed by hand (P·r·(m + n) MACs)
    and scored by numpy's singular values (energy) or by the output error measured on the data (output)."""
    model, x = Tiny(), torch.zeros(1, 3, 4, 4)
    gen = torch.Generator().manual_seed(1)
    data = [(torch.randn(16, 3, 4, 4, generator=gen), torch.zeros(16, dtype=torch.long)) for _ in range(3)]
    total = sum(p * m * n for _, m, n, p in TINY) + TINY_DW_MACS
    assert graph_macs(model, x) == total == 6264
    options = []
    for name, m, n, p in TINY:
        ranks = [r for r in saving_ranks(m, n) if r >= min_rank]
        if objective == "energy":
            s = np.linalg.svd(model.get_submodule(name).weight.detach().double().numpy().reshape(m, -1),
                              compute_uv=False)
            loss = {r: float(np.sum(s[r:] ** 2) / np.sum(s ** 2)) for r in ranks}
        else:
            loss = measured_errors(model, data, name, ranks)
        options.append([(p * m * n, 0.0, None)] + [(p * r * (m + n), loss[r], r) for r in ranks])
    limit = math.floor(budget * total)
    best, combo = brute_force([[(c, v) for c, v, _ in o] for o in options], limit - TINY_DW_MACS)
    small = LowRankPruner(budget=budget, objective=objective, min_rank=min_rank, calibration_batches=3,
                          progress=False).apply(copy.deepcopy(model), data)
    rec = getattr(small, ATTR)
    want = {name: o[j][2] for (name, *_), o, j in zip(TINY, options, combo)}
    assert {row["name"]: row["rank"] for row in rec["layers"]} == {**want, "dw": None}
    assert rec["predicted_loss"] == pytest.approx(best, rel=1e-6)
    assert rec["limit"] == limit and rec["macs_after"] <= limit
    assert rec["macs_after"] == graph_macs(small, x) == sum(o[j][0] for o, j in zip(options, combo)) + TINY_DW_MACS
    assert isinstance(small.dw, nn.Conv2d) and small.dw.groups == 8
    assert sum(r is not None for r in want.values()) >= 2            # a real trade-off, not all-dense


@pytest.fixture(scope="module")
def tuned(dense, batches):
    return LowRankPruner(budget=0.5, finetune_epochs=5, lr=1e-3, progress=False).apply(copy.deepcopy(dense[0]),
                                                                                      batches)


def test_lenet_at_half_the_macs_ships_to_arm_int8_and_keeps_its_accuracy(dense, tuned, digits, tmp_path):
    """Measured: ranks {features.4: 12, classifier.1: 11}, features.0 and classifier.3 dense; profile MACs
    91,776 → 45,760 (0.499); weight and bias bytes 14,072 → 5,588; model.tflite 20,064 → 12,848 bytes;
    digits accuracy dense 0.989 (its int8 artifact 0.989), factorised 0.949, fine-tuned 5 epochs 0.987,
    int8 artifact 0.987."""
    model, acc_dense = dense
    xtr, _, xte, yte = digits
    rec = getattr(tuned, ATTR)
    art, full = deploy_with_dense(tuned, model, xtr, xte, tmp_path)
    assert profile_macs(full) == lenet_macs() == rec["macs_before"]
    assert profile_macs(art) == rec["macs_after"] <= 0.5 * lenet_macs()
    assert [sum(row.get("bytes", 0) for row in a.profile["layers"]) for a in (full, art)] == \
        [rec["bytes_before"], rec["bytes_after"]]
    assert rec["ranks"] and all(isinstance(tuned.get_submodule(n), nn.Sequential) for n in rec["ranks"])
    sizes = {k: a.file("model.tflite").stat().st_size for k, a in (("factorised", art), ("dense", full))}
    assert sizes["factorised"] < 0.75 * sizes["dense"], sizes
    acc = int8_accuracy(art, xte, yte)
    assert acc >= acc_dense - 0.03, (acc, acc_dense)


def test_the_whole_network_allocation_beats_the_same_budget_layer_by_layer(dense, batches, digits):
    """Layer by layer: every layer at the largest rank within half its own MACs (features.0 at rank 2 of 9).
    The whole-network allocation at the same or fewer MACs, no fine-tuning either.  Measured: 44,136 MACs
    layer by layer (ranks 2 / 13 / 21 / 4) vs 44,096 (features.4 at 11, classifier.1 at 17, the others
    dense); test cross-entropy 1.29 vs 0.24, accuracy 0.549 vs 0.949."""
    model, _ = dense
    _, _, xte, yte = digits
    layers = {"features.0": (16, 9), "features.4": (32, 144), "classifier.1": (64, 128), "classifier.3": (10, 64)}
    uniform_ranks = {name: max(r for r in range(1, min(m, n)) if r * (m + n) <= 0.5 * m * n)
                     for name, (m, n) in layers.items()}
    uniform = factorise_model(copy.deepcopy(model), uniform_ranks).eval()
    macs = graph_macs(uniform, xte[:1])
    whole = LowRankPruner(budget=macs / lenet_macs(), progress=False).apply(copy.deepcopy(model), batches)
    assert getattr(whole, ATTR)["macs_after"] == graph_macs(whole, xte[:1]) <= macs <= 0.5 * lenet_macs()
    with torch.no_grad():
        scores = {k: (float(F.cross_entropy(m(xte), yte.long())), D.accuracy(m, xte, yte))
                  for k, m in (("uniform", uniform), ("whole", whole))}
    assert scores["whole"][0] < 0.5 * scores["uniform"][0], scores
    assert scores["whole"][1] > scores["uniform"][1] + 0.1, scores


@pytest.mark.slow
def test_torchvision_resnet18_factorises_and_ships_with_fewer_macs(tmp_path):
    """Random init, 32×32: measured 37,016,576 → 18,500,352 MACs in the artifact's profile, 14 of its 21
    convs and linears factorised, SQNR 29 dB against the factorised float model."""
    model, data = torchvision_resnet18()
    x = data[0][0][:1]
    small = LowRankPruner(budget=0.5, calibration_batches=2, progress=False).apply(copy.deepcopy(model), data)
    rec = getattr(small, ATTR)
    assert rec["macs_before"] == graph_macs(model, x)
    art = sdk.deploy(small, "arm-int8", (x,), calibration=[b[0] for b in data], output=tmp_path / "a",
                     progress=False)
    assert profile_macs(art) == rec["macs_after"] <= 0.5 * rec["macs_before"]
    assert len(rec["ranks"]) >= 5
    rep = art.verify(small, inputs=[b[0][:1] for b in data[:2]])
    assert rep.sqnr_db["host"] > 20


def test_a_yaml_recipe_with_a_bytes_budget(dense, batches, digits, tmp_path):
    """arm-int8 bytes: one a weight, four per output for the int32 bias (LeNet: 13,584 weights + 122 biases =
    14,072 bytes; a factorised layer's first half ships a zero bias of its rank), equal to the artifact's
    profile."""
    model, _ = dense
    xtr, _, xte, _ = digits
    recipe = Recipe.from_yaml("stages:\n  - method: low-rank\n    config: {budget: 0.4, metric: bytes, "
                              "objective: energy, min_rank: 2, progress: false}\n")
    art = sdk.deploy(model, "arm-int8", (xte[:1],), calibration=calibration(xtr), recipe=recipe, data=batches,
                     output=tmp_path / "a", progress=False)
    (report,) = art.manifest["stages"]
    assert report["method"] == "low-rank" and report["metric"] == "bytes"
    assert report["bytes_before"] == 13584 + 4 * (16 + 32 + 64 + 10) == 14072
    assert report["bytes_after"] <= 0.4 * 14072
    assert all(r >= 2 for r in report["ranks"].values())
    assert profile_macs(art) == report["macs_after"] < lenet_macs()
    assert sum(row.get("bytes", 0) for row in art.profile["layers"]) == report["bytes_after"]


def test_bad_config_and_nothing_to_factorise_are_named():
    for budget in (0.0, 1.0, 1.5, -0.1):
        with pytest.raises(ConfigError, match="budget"):
            LowRankPruner(budget=budget)
    with pytest.raises(ConfigError, match="metric"):
        LowRankPruner(metric="flops")
    with pytest.raises(ConfigError, match="objective"):
        LowRankPruner(objective="loss")
    with pytest.raises(ConfigError, match="min_rank"):
        LowRankPruner(min_rank=0)
    depthwise = nn.Sequential(nn.Conv2d(4, 4, 3, groups=4), nn.Flatten(), nn.Linear(4, 1))   # 1×4: no rank saves
    with pytest.raises(ConfigError, match="nothing to factorise"):
        LowRankPruner(objective="energy", input_shape=(1, 4, 3, 3)).apply(depthwise)
    with pytest.raises(ConfigError, match="nothing to factorise"):
        LowRankPruner(objective="energy", exclude=("conv", "fc1", "fc2"), input_shape=(1, 3, 4, 4)).apply(Tiny())
    with pytest.raises(ConfigError, match="raise budget"):      # the depthwise alone is 18 % of Tiny's MACs
        LowRankPruner(budget=0.15, objective="energy", input_shape=(1, 3, 4, 4)).apply(Tiny())
    with pytest.raises(InputError, match="objective: energy"):
        LowRankPruner(input_shape=(1, 3, 4, 4)).apply(Tiny())
    with pytest.raises(ConfigError, match="rank=10"):
        factorise(nn.Linear(8, 6), 10)
    with pytest.raises(ConfigError, match="ungrouped"):
        factorise(nn.Conv2d(4, 4, 3, groups=2), 1)
