"""autoqb: the budget clipping against a hand computation, the DDPG agent against random search on a
toy landscape whose optimum is known by enumeration, and on digits: a tight BOPs budget gives a mixed
configuration with 1- or 2-bit layers whose arm-int8 artifact matches the torch integer simulation and
ships exactly the predicted bytes, from a YAML recipe with the episodes in the manifest; the episode and
time bounds stop the search."""

import itertools

import numpy as np
import pytest
import torch

import sdk
from quant_helpers import artifact_accuracy, deploy_int8, float_mlp  # noqa: F401 (fixture)
from plugins.quantize.autoqb import (AgentConfig, AutoQB, action_to_bits, enforce_budget, search,
                                     truncated_normal)
from sdk import bit_search as bs
from sdk.errors import ConfigError
from sdk.fakequant import simulate
from sdk.recipe import Recipe

pytestmark = pytest.mark.usefixtures("one_thread")

CHOICES = (1, 2, 4, 8)


def test_budget_clipping_by_hand():
    """Weights 100, 50, 10 at b bits cost 100·b, 50·b, 10·b; budget 700.  Asking 8/8/8: layer 0 at 8 would
    leave 700 − 800 < 60 for the others at 1 bit, at 4 it leaves 300 ≥ 60 → 4 (400 spent); layer 1 at 8
    needs 400 + 400 + 10 > 700, at 4: 400 + 200 + 10 = 610 → 4 (600); layer 2 at 8: 680 → 8."""
    costs = [[(w * b,) for b in CHOICES] for w in (100, 50, 10)]
    assert enforce_budget([3, 3, 3], costs, (700,)) == [2, 2, 3]
    assert enforce_budget([0, 3, 3], costs, (700,)) == [0, 3, 3]      # 100 + 400 + 80 = 580: nothing clipped
    assert enforce_budget([3, 3, 3], costs, (160,)) == [0, 0, 0]      # exactly the minimum
    # every request gives a configuration within the budget, and no layer could have kept one more
    # width step without breaking it (given the widths before it and the cheapest after it)
    for want in itertools.product(range(4), repeat=3):
        got = enforce_budget(list(want), costs, (700,))
        spent = [costs[t][j][0] for t, j in enumerate(got)]
        assert sum(spent) <= 700 and all(g <= w for g, w in zip(got, want))
        for t, (g, w) in enumerate(zip(got, want)):
            if g < w:
                rest_min = sum(costs[u][0][0] for u in range(t + 1, 3))
                assert sum(spent[:t]) + costs[t][g + 1][0] + rest_min > 700
    assert [action_to_bits(a, (8, 4, 2, 1)) for a in (0.1, 0.3, 0.6, 0.9)] == [1, 2, 4, 8]


def test_truncated_normal_stays_in_range_and_centres_on_the_mean():
    rng = np.random.default_rng(0)
    draws = np.array([truncated_normal(0.5, 0.1, rng) for _ in range(2000)])
    assert draws.min() >= 0 and draws.max() <= 1 and abs(draws.mean() - 0.5) < 0.01
    assert abs(draws.std() - 0.1) < 0.01        # barely truncated at ±5σ: the plain normal's spread
    edge = np.array([truncated_normal(1.0, 0.3, rng) for _ in range(2000)])
    assert edge.max() <= 1 and 0.7 < edge.mean() < 0.8     # half-normal below 1: 1 − 0.3·√(2/π) = 0.761


# -- the agent on a toy landscape ------------------------------------------------------------

TOY_WEIGHTS = (100, 400, 800, 400, 50)
TOY_OPT = (3, 1, 0, 2, 3)          # index into CHOICES per layer: 8, 2, 1, 4, 8 bits


def _toy():
    layers = [bs.SearchLayer(f"l{t}", "FULLY_CONNECTED", macs=w, weights=w, channels=1, k=w) for t, w in
              enumerate(TOY_WEIGHTS)]
    features = [{"in_channels": 8 * (t + 1), "out_channels": 8 * (t + 2), "kernel": 3 if t < 3 else 1,
                 "stride": 1, "macs": 10 * w, "params": w, "is_conv": int(t < 3)} for t, w in enumerate(TOY_WEIGHTS)]
    opt = tuple(CHOICES[j] for j in TOY_OPT)
    limit = {"packed_bytes": bs.cost(layers, opt, "packed_bytes") * 5 // 4}

    def score(bits):
        return -float(sum((CHOICES.index(b) - o) ** 2 for b, o in zip(bits, TOY_OPT)))

    return layers, features, limit, opt, score


def test_agent_beats_random_search_on_a_toy_landscape():
    """A separable toy reward −Σ (width index − optimum index)² over 5 layers (4⁵ = 1024 configurations,
    the optimum 8/2/1/4/8 checked by enumeration to be the best of the 412 feasible ones) under a
    packed-bytes budget 25 % above the optimum's.  With 60 episodes (15 random warm-up) the agent's best
    is on average at most one width step from the optimum over 3 seeds and reaches it exactly on one at
    least; random feasible search with the same 60 evaluations averages more than 1.4 steps off (mean
    over 100 seeds) and hits the optimum in about 7 % of them."""
    layers, features, limit, opt, score = _toy()
    feasible = [c for c in itertools.product(CHOICES, repeat=5) if bs.feasible(layers, c, limit)]
    assert max(feasible, key=score) == opt and len(feasible) == 412
    random_best = []
    for seed in range(100):
        rng = np.random.default_rng(seed)
        random_best.append(max((bs.random_feasible(layers, CHOICES, limit, rng) for _ in range(60)), key=score))
    assert np.mean([score(b) for b in random_best]) < -1.4
    assert 0.02 <= np.mean([b == opt for b in random_best]) <= 0.15
    agent_best = []
    for seed in range(3):
        trials, env = search(layers, features, limit, score, AgentConfig(episodes=60, warmup_episodes=15,
                             updates=16, seed=seed, progress=False), choices=CHOICES)
        assert len(trials) == 60 and all(bs.feasible(layers, t.bits, limit) for t in trials)
        assert [t.origin for t in trials[:16]] == ["warmup"] * 15 + ["agent"]
        agent_best.append(max(trials, key=lambda t: t.accuracy).bits)
    assert np.mean([score(b) for b in agent_best]) >= -1.0 and opt in agent_best, agent_best


# -- digits ------------------------------------------------------------------------------------

def _shipped_bytes(art):
    """The bytes the artifact's profile rows of its conv / linear layers say it stores."""
    return sum(int(r["bytes"]) for r in art.profile["layers"] if r["op"].split("->")[0] in ("conv", "linear"))


def test_tight_bops_budget_from_a_yaml_recipe(float_mlp, digits, tmp_path):
    """30 % of int8's BOPs with widths 8/4/2/1 (all-2-bit is 25 %): every episode within it, the
    episodes in the manifest, at least one layer at 1 or 2 bits, the artifact within 1.5 points of the
    torch integer simulation on the held-out digits and shipping exactly the predicted bytes."""
    model, train = float_mlp
    _, _, xte, yte = digits
    layers = bs.search_layers(model, (xte[:1],))
    budget = bs.cost(layers, (8, 8, 8), "bops") * 3 // 10
    path = tmp_path / "r.yaml"
    path.write_text(f"stages:\n  - method: autoqb\n    config: {{max_bops: {budget}, episodes: 12, "
                    "warmup_episodes: 4, finetune_steps: 30, final_epochs: 2, progress: false}\n")
    art = deploy_int8(model, digits, recipe=Recipe.from_yaml(path.read_text()), data=train)
    (report,) = art.manifest["stages"]
    assert report["method"] == "autoqb" and len(report["trials"]) == 12 == report["episodes"]
    assert all(t["costs"]["bops"] <= budget for t in report["trials"])
    assert [t["origin"] for t in report["trials"]] == ["warmup"] * 4 + ["agent"] * 8
    best = report["best"]
    assert best["accuracy"] == max(t["accuracy"] for t in report["trials"])
    bits = [best["bits"][layer.name] for layer in layers]
    assert min(bits) <= 2 and bs.cost(layers, bits, "bops") <= budget
    baked = AutoQB(max_bops=budget, episodes=12, warmup_episodes=4, finetune_steps=30, final_epochs=2,
                   progress=False).apply(model, train)
    assert baked._edgepack_autoqb["best"] == best                     # deterministic for the seed
    with simulate(baked):
        torch_acc = float((baked(xte).argmax(1) == yte).float().mean())
    acc = artifact_accuracy(art, xte, yte)
    assert abs(acc - torch_acc) <= 0.015, (acc, torch_acc)
    assert _shipped_bytes(art) == bs.cost(layers, bits, "bytes")
    print(f"\nautoqb {bits} artifact {acc:.4f} (torch {torch_acc:.4f}), {bs.cost(layers, bits, 'bytes')} B, "
          f"search {report['search_seconds']} s")


def test_episode_and_time_bounds_stop_the_search(float_mlp):
    model, train = float_mlp
    cfg = dict(max_weight_bytes=10 ** 6, warmup_episodes=1, finetune_steps=2, final_epochs=0, progress=False)
    rec = AutoQB(episodes=3, **cfg).apply(model, train)._edgepack_autoqb
    assert len(rec["trials"]) == 3
    rec = AutoQB(episodes=50, max_seconds=1e-3, **cfg).apply(model, train)._edgepack_autoqb
    assert len(rec["trials"]) == 1


def test_bad_configs_are_named(float_mlp):
    model, train = float_mlp
    with pytest.raises(ConfigError, match="give a budget"):
        AutoQB(progress=False).apply(model, train)
    layers = bs.search_layers(model, (torch.zeros(1, 1, 8, 8),))
    least = bs.cost(layers, (1, 1, 1), "bops")
    with pytest.raises(ConfigError, match=f"at least {least}"):
        AutoQB(max_bops=least - 1, progress=False).apply(model, train)
    with pytest.raises(ConfigError, match="bits"):
        AutoQB(max_bops=10, bits=(8, 16))
    with pytest.raises(ConfigError, match="warmup_episodes"):
        AutoQB(max_bops=10, episodes=3, warmup_episodes=4)
    with pytest.raises(ConfigError, match="episodes"):
        AutoQB(max_bops=10, episodes=0)
    assert AutoQB.Config.from_dict(AutoQB(max_bops=10, bits=[2, 8]).config.to_dict()).bits == (8, 2)
    assert "autoqb" in {p["name"] for p in sdk.list_plugins() if p["kind"] == "quantizer"}


@pytest.mark.slow
def test_finds_the_exhaustive_optimum_and_beats_uniform_two_bit(float_mlp, digits):
    """30 % of int8's BOPs, 30 episodes: the best episode's accuracy equals the best of every feasible
    configuration scored the same way (enumerated: 18 of the 64), and the deployed artifact is at least
    half a point above uniform 2 bits (25 % of the BOPs) fine-tuned as long.  Measured: 8/4/2/1 → [2, 1, 4],
    93.1 % against 91.6 %, 51 200 BOPs against 54 272."""
    model, train = float_mlp
    _, _, xte, yte = digits
    layers = bs.search_layers(model, (xte[:1],))
    budget = bs.cost(layers, (8, 8, 8), "bops") * 3 // 10
    q = AutoQB(max_bops=budget, episodes=30, warmup_episodes=8, finetune_steps=60, final_epochs=3, progress=False)
    baked = q.apply(model, train)
    rec = baked._edgepack_autoqb
    tune, score_on = train[:-round(len(train) * 0.2)], train[-round(len(train) * 0.2):]
    space = [c for c in itertools.product((8, 4, 2, 1), repeat=3) if bs.cost(layers, c, "bops") <= budget]
    best = max(bs.evaluate(model, layers, c, tune, score_on, finetune_steps=60) for c in space)
    assert len(space) == 18 and rec["best"]["accuracy"] == best
    acc = artifact_accuracy(deploy_int8(baked, digits), xte, yte)
    two = artifact_accuracy(deploy_int8(bs.apply_bits(model, layers, (2, 2, 2), train, epochs=3), digits), xte, yte)
    assert acc >= two + 0.005, (acc, two)
