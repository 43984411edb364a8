"""energy-aware (Yang et al. 2017): the pruning order equals the ranking by a hand evaluation of the cost
model's energy formula (Horowitz's per-operation energies, written out here) for int8 and fp32 targets,
including a model where energy and weight count rank the layers differently; the allocation fills the
ranked layers in turn to an exact overall sparsity; the reported energy before and after equals the
estimate of the shipped arm-int8 artifacts (and the hand formula on the pruned shapes); fine-tuning
recovers LeNet's digits accuracy."""

import copy

import numpy as np
import pytest
import torch
from torch import nn

import sdk
from examples import digits as D
from plugins.prune.energy_aware import ATTR, EnergyAwarePruner
from prune_helpers import batches, dense  # noqa: F401 (fixtures)
from sdk.errors import ConfigError, InputError
from sdk.masks import prunable_layers

pytestmark = pytest.mark.usefixtures("one_thread")   # tiny models: one thread is faster

# pJ per MAC, per weight byte from DRAM, per activation byte to SRAM (Horowitz, ISSCC 2014); bytes per value
ENERGY = {"arm-int8": {"mac": 0.23, "dram": 160.0, "sram": 1.25, "weight": 1, "bias": 4, "act": 1},
          "arm-fp32": {"mac": 4.6, "dram": 160.0, "sram": 1.25, "weight": 4, "bias": 4, "act": 4}}


def hand_energy(model, x, target):
    """µJ of each conv / linear layer for one input: MACs·E_mac + (weights + bias) bytes·E_dram + output
    bytes·E_sram, shapes from forward hooks; every layer has a bias once batch norms are folded."""
    e, shapes = ENERGY[target], {}
    hooks = [m.register_forward_hook(lambda m, i, o, n=n: shapes.__setitem__(n, o.shape))
             for n, m in prunable_layers(model)]
    with torch.no_grad():
        model.eval()(x)
    for h in hooks:
        h.remove()
    out = {}
    for name, m in prunable_layers(model):
        o = shapes[name]
        macs = int(np.prod(o)) * (m.weight[0].numel())          # every output value: one filter's MACs
        wbytes = m.weight.numel() * e["weight"] + m.weight.shape[0] * e["bias"]
        out[name] = (macs * e["mac"] + wbytes * e["dram"] + int(np.prod(o)) * e["act"] * e["sram"]) * 1e-6
    return out


class WideConv(nn.Module):
    """A 3×3 conv over 32×32 (2304 weights, 2.4 M MACs) and a linear with more weights (3072) but less energy."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.c1 = nn.Conv2d(3, 16, 3, padding=1)
        self.c2 = nn.Conv2d(16, 16, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(4)
        self.fc = nn.Linear(256, 12)

    def forward(self, x):
        return self.fc(self.pool(torch.relu(self.c2(torch.relu(self.c1(x))))).flatten(1))


@pytest.mark.parametrize("target", ["arm-int8", "arm-fp32"])
def test_order_is_the_hand_energy_ranking(target):
    model, x = WideConv(), torch.randn(1, 3, 32, 32)
    hand = hand_energy(model, x, target)
    pruned = EnergyAwarePruner(sparsity=0.3, granularity="fine", target=target, input_shape=(1, 3, 32, 32),
                               progress=False).apply(copy.deepcopy(model))
    rep = getattr(pruned, ATTR)
    assert rep["order"] == sorted(hand, key=hand.get, reverse=True)
    for name, uj in hand.items():
        assert rep["layers_before_uj"][name] == pytest.approx(uj, abs=2e-6)
    # energy, not weight count: c2 (2304 weights) costs more than fc (3072); in fp32 c1's MACs (4.6 pJ each)
    # put it above fc too, in int8 (0.23 pJ) fc's DRAM bytes win
    assert rep["order"] == (["c2", "fc", "c1"] if target == "arm-int8" else ["c2", "c1", "fc"])
    assert model.c2.weight.numel() < model.fc.weight.numel()
    # the top layer takes max_layer_sparsity, the next the remainder: round(0.3 · 5808) = 1742 zeros
    n = {k: pruned.get_submodule(k).weight.numel() for k in hand}
    first, second = rep["order"][:2]
    zeros = {k: int((pruned.get_submodule(k).weight == 0).sum()) for k in hand}
    assert zeros[first] == round(0.75 * n[first]) and zeros[second] == 1742 - zeros[first]
    assert sum(zeros.values()) == round(0.3 * sum(n.values())) == 1742


@pytest.fixture(scope="module")
def filtered(dense, batches):
    model, _ = dense
    runs = {}
    for epochs in (0, 3):
        runs[epochs] = EnergyAwarePruner(sparsity=0.5, target="arm-int8", finetune_epochs=epochs, lr=3e-3,
                                         progress=False).apply(copy.deepcopy(model), batches)
    return runs


def test_filter_pruning_follows_the_energy_order_to_an_exact_ratio(dense, filtered):
    """LeNet on arm-int8: classifier.1 (1.354 µJ) > features.4 (0.775) > features.0 (0.037); the classifier's
    outputs are fixed.  56 of 112 channels go: 48 (75%) of classifier.1, then 8 of features.4."""
    model, x = dense[0], torch.zeros(1, 1, 8, 8)
    hand = hand_energy(model, x, "arm-int8")
    small = filtered[3]
    rep = getattr(small, ATTR)
    assert rep["order"] == [n for n in sorted(hand, key=hand.get, reverse=True) if n != "classifier.3"]
    assert [u["pruned"] for u in rep["units"]] == [48, 8, 0]
    kept = (small.features[0].out_channels, small.features[4].out_channels, small.classifier[1].out_features)
    assert kept == (16, 24, 16) and 112 - sum(kept) == round(0.5 * 112)
    assert rep["sparsity"] == 0.5


def test_energy_report_equals_the_shipped_artifacts_estimate(dense, filtered, digits, tmp_path):
    """Measured: 2.277 µJ → 0.909 µJ per inference on the Cortex-A76 profile (−60%); MACs 91776 → 66208;
    model.tflite 20064 → 10208 bytes; digits accuracy 0.989 dense, 0.729 pruned, 0.989 after 3 epochs of
    fine-tuning, 0.987 from the int8 artifact."""
    model, _ = dense
    xtr, _, xte, yte = digits
    small = filtered[3]
    rep = getattr(small, ATTR)
    cal = [xtr[i:i + 32] for i in range(0, 320, 32)]
    arts = {k: sdk.deploy(m, "arm-int8", (xte[:1],), calibration=cal, output=tmp_path / k, progress=False)
            for k, m in (("dense", model), ("pruned", small))}
    est = {k: sum(r["est_energy_uj"] for r in a.profile["estimate"]["layers"]) for k, a in arts.items()}
    assert rep["energy_before_uj"] == pytest.approx(est["dense"], abs=1e-6)
    assert rep["energy_after_uj"] == pytest.approx(est["pruned"], abs=1e-6)
    assert est["pruned"] < est["dense"]
    assert rep["energy_before_uj"] - rep["energy_after_uj"] == pytest.approx(est["dense"] - est["pruned"], abs=1e-6)
    shipped = {r["module"]: r["est_energy_uj"] for r in arts["pruned"].profile["estimate"]["layers"]}
    for name, uj in hand_energy(small, xte[:1], "arm-int8").items():        # the pruned shapes, by hand
        assert shipped[name] == pytest.approx(uj, abs=2e-6), name
    assert arts["pruned"].profile["totals"]["macs"] < arts["dense"].profile["totals"]["macs"]
    assert arts["pruned"].file("model.tflite").stat().st_size < arts["dense"].file("model.tflite").stat().st_size
    acc = {"dense": D.accuracy(model, xte, yte), "pruned": D.accuracy(filtered[0], xte, yte),
           "tuned": D.accuracy(small, xte, yte)}
    assert acc["tuned"] >= acc["dense"] - 0.02 and acc["tuned"] > acc["pruned"], acc
    preds = np.concatenate([arts["pruned"].run(xte[i:i + 1])[0] for i in range(len(xte))]).argmax(1)
    assert np.mean(preds == yte.numpy()) >= acc["tuned"] - 0.02


def test_fine_zeros_are_exact_and_the_dense_estimate_does_not_move(dense, batches):
    """The cost model counts MACs and weight bytes dense: masked zeros leave the estimate where it was."""
    model, _ = dense
    small = sdk.compress(model, {"stages": [{"method": "energy-aware", "config": {"sparsity": 0.5,
                                                                                  "granularity": "fine"}}]},
                         data=batches, target="arm-int8", progress=False)
    rep = getattr(small, ATTR)
    assert rep["target"] == "arm-int8"
    assert rep["order"] == ["classifier.1", "features.4", "classifier.3", "features.0"]
    zeros = [int((small.get_submodule(n).weight == 0).sum()) for n in rep["order"]]
    assert zeros == [round(0.75 * 8192), round(0.5 * 13584) - 6144, 0, 0]
    assert rep["energy_after_uj"] == rep["energy_before_uj"]


def test_no_target_and_bad_config_are_named(dense, batches):
    model, _ = dense
    with pytest.raises(InputError, match="target"):
        EnergyAwarePruner().apply(copy.deepcopy(model), batches)
    with pytest.raises(ConfigError, match="max_layer_sparsity"):
        EnergyAwarePruner(sparsity=0.8, max_layer_sparsity=0.5, target="arm-int8").apply(copy.deepcopy(model),
                                                                                          batches)
    with pytest.raises(ConfigError, match="sparsity"):
        EnergyAwarePruner(sparsity=1.0)
    with pytest.raises(ConfigError, match="granularity"):
        EnergyAwarePruner(granularity="kernel")
