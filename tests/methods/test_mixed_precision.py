"""mixed-precision: the layer with weight outliers keeps the higher precision, the allocation equals a
brute-force enumeration, arm-int8 artifacts never exceed the byte budget (the plan's bytes are the
artifact's layer rows, 4-bit conv codes one byte each) and their SQNR rises with the budget, and a
budget below the smallest assignment names the minimum."""

import itertools
import math

import numpy as np
import pytest
import torch
from torch import nn

import sdk
from examples.models import make
from plugins.quantize.mixed_precision import MixedPrecision, allocate
from quant_helpers import run_artifact, sqnr_db
from sdk import plugins
from sdk.errors import ConfigError
from sdk.graph import capture, fold_batch_norm

pytestmark = pytest.mark.usefixtures("one_thread")


def _mlp(widths=(64, 256, 256, 256, 10)):
    torch.manual_seed(0)
    layers = []
    for a, b in zip(widths, widths[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers[:-1]).eval()


def _batches(shape, n=6, batch=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn((batch,) + tuple(shape[1:]), generator=g) for _ in range(n)]


def _graph(model, x):
    return plugins.get("target", "arm-int8")().prepare(fold_batch_norm(capture(model, (x,))))


def _plan(model, x, cal, **cfg):
    return MixedPrecision(progress=False, **cfg).calibrate(_graph(model, x), [(b,) for b in cal])


def _weighted_rows(art):
    return [r for r in art.profile["layers"] if r["op"].split("->")[0] in ("conv", "linear")]


def _deploy(model, x, cal, **cfg):
    recipe = {"stages": [{"method": "mixed-precision", "config": {"progress": False, **cfg}}]}
    return sdk.deploy(model, "arm-int8", (x,), calibration=cal, recipe=recipe, progress=False)


def test_outlier_layer_keeps_int8():
    """Three equal layers, the middle one with a 50x outlier in every row: at 4 bits its per-channel
    scale rounds every other weight to zero.  The outliers meet an input that is always 0 (a dead unit
    of the first layer), so they leave the activations as they were.  A budget that lifts one layer to
    int8 lifts that one."""
    model = _mlp((32, 32, 32, 32))
    with torch.no_grad():
        model[0].weight[0], model[0].bias[0] = 0, 0
        model[2].weight[:, 0] = 50 * model[2].weight.abs().max()
    x, cal = torch.randn(1, 32), _batches((1, 32))
    int4_bytes = 3 * (32 * 32 // 2 + 4 * 32)
    plan = _plan(model, x, cal, max_weight_bytes=int4_bytes + 32 * 32 // 2, choices=("int8", "int4"))
    table = {r["layer"]: r for r in plan.extra["mixed_precision"]["layers"]}
    assert [table[m]["precision"] for m in ("0", "2", "4")] == ["int4", "int8", "int4"]
    gain = {m: r["options"]["int4"]["sensitivity"] - r["options"]["int8"]["sensitivity"] for m, r in table.items()}
    assert gain["2"] > 10 * max(gain["0"], gain["4"]), gain
    assert plan.extra["mixed_precision"]["weight_bytes"] == int4_bytes + 32 * 32 // 2
    assert plan.weights[table["2"]["tensor"]].code_bits == 8


def _brute(costs, resources, budgets):
    best = math.inf
    for combo in itertools.product(*[range(len(c)) for c in costs]):
        used = np.sum([resources[g][j] for g, j in enumerate(combo)], axis=0)
        if np.all(used <= budgets):
            best = min(best, sum(costs[g][j] for g, j in enumerate(combo)))
    return best


def test_allocation_equals_brute_force():
    """Random 4-6 layer tables (bytes, or bytes and BOPs) and a real MLP's table over several budgets:
    the DP's total sensitivity equals the enumerated optimum and its assignment fits."""
    rng = np.random.default_rng(0)
    cases = []
    for _ in range(60):
        layers, dims = int(rng.integers(4, 7)), int(rng.integers(1, 3))
        costs = rng.exponential(1.0, (layers, 3)).round(3).tolist()
        res = [[tuple(int(v) for v in rng.integers(1, 200, dims)) for _ in range(3)] for _ in range(layers)]
        lo, hi = np.sum([np.min(r, axis=0) for r in res], 0), np.sum([np.max(r, axis=0) for r in res], 0)
        cases.append((costs, res, tuple(int(v) for v in rng.integers(lo, hi + 1))))
    model, x = _mlp((64, 48, 40, 32, 24, 10)), torch.randn(1, 64)
    table = _plan(model, x, _batches((1, 64)), max_weight_bytes=10 ** 9)
    table = table.extra["mixed_precision"]["layers"]
    costs = [[o["sensitivity"] for o in r["options"].values()] for r in table]
    lo = sum(min(o["bytes"] for o in r["options"].values()) for r in table)
    hi = sum(max(o["bytes"] for o in r["options"].values()) for r in table)
    for b in np.linspace(lo, hi, 9).astype(int):
        cases.append((costs, [[(o["bytes"],) for o in r["options"].values()] for r in table], (int(b),)))
        cases.append((costs, [[(o["bytes"], o["bops"]) for o in r["options"].values()] for r in table],
                      (int(b), 3 * 10 ** 6)))
    for costs, res, budgets in cases:
        expected = _brute(costs, res, np.asarray(budgets))
        if math.isinf(expected):
            with pytest.raises(ConfigError):
                allocate(costs, res, budgets)
            continue
        picked, total = allocate(costs, res, budgets)
        assert total == pytest.approx(expected, abs=1e-9)
        assert total == pytest.approx(sum(costs[g][j] for g, j in enumerate(picked)))
        assert np.all(np.sum([res[g][j] for g, j in enumerate(picked)], axis=0) <= budgets)


def test_arm_int8_budget_holds_and_sqnr_rises():
    """MLP 64-256-256-256-10 on arm-int8 at budgets from all-int4 to all-int8: the artifact's conv/linear
    layer bytes equal the plan's and never exceed the budget; SQNR vs float does not fall as the
    budget grows; host and reference agree."""
    model, x = _mlp(), torch.randn(1, 64)
    cal, test = _batches((1, 64)), torch.randn(48, 64, generator=torch.Generator().manual_seed(7))
    ref = model(test).detach().numpy()
    counts = [(64 * 256, 256), (256 * 256, 256), (256 * 256, 256), (256 * 10, 10)]
    all4 = sum(n // 2 + 4 * c for n, c in counts)
    all8 = sum(n + 4 * c for n, c in counts)
    curve = []
    for budget in np.linspace(all4, all8, 5).astype(int).tolist():
        art = _deploy(model, x, cal, max_weight_bytes=budget)
        shipped = sum(r["bytes"] for r in _weighted_rows(art))
        planned = _plan(model, x, cal, max_weight_bytes=budget).extra["mixed_precision"]["weight_bytes"]
        assert shipped == planned <= budget
        assert art.profile["estimate"]["weight_bytes"] == shipped       # every layer has its bias
        curve.append((budget, shipped, sqnr_db(ref, run_artifact(art, test)),
                      [r["weight_storage"] for r in _weighted_rows(art)]))
        if budget == all4:
            assert curve[-1][3] == ["int4"] * 4
    print("\nbudget, shipped bytes, SQNR dB, storage:\n" + "\n".join(map(str, curve)))
    sqnrs = [c[2] for c in curve]
    assert all(b >= a - 0.3 for a, b in zip(sqnrs, sqnrs[1:])), curve
    assert sqnrs[-1] > sqnrs[0] + 10, curve
    rep = art.verify(model, runners=["host", "reference"])
    assert rep.passed, str(rep)


@pytest.mark.parametrize("int4", ["where-fast", "always"])
def test_lenet_conv_codes_counted_as_stored(int4):
    """LeNet at the smallest budget: the fully connected layers are INT4; a 4-bit conv ships in int8
    bytes unless int4="always", so there its int8 codes cost nothing more and are chosen (4-bit and
    INT4 with "always"); the artifact's bytes equal the budget computed from the modules."""
    model, x = make("lenet")
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    fcs = [m for m in model.modules() if isinstance(m, nn.Linear)]
    conv_item = 0.5 if int4 == "always" else 1
    least = sum(int(math.ceil(m.weight.numel() * conv_item)) + 4 * m.out_channels for m in convs) + \
        sum(m.weight.numel() // 2 + 4 * m.out_features for m in fcs)
    cal = _batches(x.shape, n=4)
    with pytest.raises(ConfigError, match=f"minimum achievable {least} "):
        _plan(model, x, cal, max_weight_bytes=least - 1, int4_storage=int4)
    recipe = {"stages": [{"method": "mixed-precision",
                          "config": {"max_weight_bytes": least, "int4_storage": int4, "progress": False}}]}
    art = sdk.deploy(model, "arm-int8", (x,), calibration=cal, recipe=recipe, progress=False, int4=int4)
    rows = _weighted_rows(art)
    assert sum(r["bytes"] for r in rows) == least
    assert [r["weight_storage"] for r in rows] == ["int4" if int4 == "always" else "int8"] * 2 + ["int4"] * 2
    conv_bits = 4 if int4 == "always" else 8
    assert [e["bits"] for e in art.manifest["encodings"]] == [conv_bits] * 2 + [4] * 2
    if int4 == "where-fast":
        rep = art.verify(model, runners=["host", "reference"])
        assert rep.passed, str(rep)


def test_infeasible_bops_and_bad_configs_are_named():
    model, x = _mlp((32, 16, 10)), torch.randn(1, 32)
    least = (32 * 16 + 16 * 10) * 4 * 8
    with pytest.raises(ConfigError, match=f"max_bops={least - 1} is below the minimum achievable {least} "):
        _plan(model, x, _batches((1, 32)), max_bops=least - 1)
    assert _plan(model, x, _batches((1, 32)), max_bops=least).extra["mixed_precision"]["bops"] == least
    with pytest.raises(ConfigError, match="give a budget"):          # at calibration: Config() is the default
        _plan(model, x, _batches((1, 32)))
    with pytest.raises(ConfigError, match="choices"):
        MixedPrecision(max_weight_bytes=100, choices=("int8", "int2"))
    with pytest.raises(ConfigError, match="int4_storage"):
        MixedPrecision(max_weight_bytes=100, int4_storage="never")
