"""early-exit (Bolukbasi et al. 2017): the policies' weighted binary problem against hand-computed
cases and an independent optimizer; a digits CNN with two exits deployed to arm-int8, measured by
running the artifact (exit decisions vs the torch cascade, MACs per input from the artifact's
profile, accuracy vs the full network's artifact); λ against MACs; a YAML recipe; tampered
``early_exit`` sections."""

import copy
import json
import shutil

import numpy as np
import pytest
import torch

import sdk
from examples import digits as D
from examples.early_exit import ExitNet       # the example's three-block digits CNN
from sdk.early_exit import (EarlyExitCascade, attach_exits, fit_policies, fit_policy, policy_features,
                            policy_targets, split_backbone, train_policies)
from sdk.early_exit_artifact import run as run_cascade
from sdk.errors import ArtifactError, ConfigError, InputError
from sdk.trainer import TrainConfig

EXITS = ["features.3", "features.7"]
#: λ values of the sweep, increasing
LAMBDAS = (0.02, 0.1, 0.5)


# -- the policies' problem -------------------------------------------------------------------------

def test_policy_targets_planted_case():
    # per input: exit loss, downstream loss, downstream cost (fraction of the network); λ = 0.25
    exit_loss = torch.tensor([0.0, 1.0, 0.0, 1.0, 1.0])
    down_loss = torch.tensor([0.0, 0.0, 1.0, 1.0, 0.0])
    down_cost = torch.tensor([0.8, 0.8, 0.8, 0.8, 4.0])
    labels, weights = policy_targets(exit_loss, down_loss, down_cost, 0.25)
    # gain = down_loss + 0.25·down_cost − exit_loss: 0.2, −0.8, 1.2, 0.2, 0.0 → exit where ≥ 0
    assert labels.tolist() == [1.0, 0.0, 1.0, 1.0, 1.0]
    assert weights.tolist() == pytest.approx([0.2, 0.8, 1.2, 0.2, 0.0])


def test_greedy_backwards_uses_the_later_policies():
    """Three stages, four inputs, planted logits: exit 1's policy is fitted first; exit 0's problem
    must see the losses and costs of continuing under it."""
    good, bad = [4.0, 0.0], [0.0, 1.0]           # a sure right prediction, an unsure wrong one
    y = torch.tensor([0, 0, 0, 0])
    z0 = torch.tensor([good, bad, good, bad])
    z1 = torch.tensor([good, good, bad, bad])
    z2 = torch.tensor([bad, good, good, good])
    costs, lam = [0.1, 0.4, 0.5], 0.5
    fitted = train_policies([z0, z1, z2], y, costs, lam, [0.5, 0.5])
    # exit 1: continuing costs ℓ2 + λ·0.5 = [1.25, 0.25, 0.25, 0.25]; ℓ1 = [0, 0, 1, 1]
    assert fitted[1]["labels"].tolist() == [1, 1, 0, 0]
    assert fitted[1]["weights"].tolist() == pytest.approx([1.25, 0.25, 0.75, 0.75])
    left = fitted[1]["exit"]
    # the policy sees the same features for inputs 0, 1 (sure) and 2, 3 (unsure): it exits the sure ones
    assert left.tolist() == [True, True, False, False]
    # exit 0: continuing = stage 1 (+0.4), then stage 1's loss where it exits, else stage 2's loss (+0.5)
    down_loss = torch.tensor([0.0, 0.0, 0.0, 0.0])
    down_cost = torch.tensor([0.4, 0.4, 0.9, 0.9])
    want_labels, want_weights = policy_targets(torch.tensor([0.0, 1.0, 0.0, 1.0]), down_loss, down_cost, lam)
    assert fitted[0]["labels"].tolist() == want_labels.tolist() == [1, 0, 1, 0]
    assert fitted[0]["weights"].tolist() == pytest.approx(want_weights.tolist()) == [0.2, 0.8, 0.45, 0.55]


def test_fit_policy_matches_an_independent_optimizer():
    """Newton's method against scipy's BFGS on the documented objective, written out here."""
    from scipy.optimize import minimize

    gen = torch.Generator().manual_seed(0)
    x = torch.rand(200, 2, generator=gen, dtype=torch.float64) * torch.tensor([1.0, 0.1], dtype=torch.float64)
    labels = (x[:, 0] + 3 * x[:, 1] + 0.2 * torch.randn(200, generator=gen, dtype=torch.float64) > 0.6).double()
    weights = torch.rand(200, generator=gen, dtype=torch.float64)
    l2 = 1e-2
    w, b = fit_policy(x, labels, weights, l2)
    xs, ys, ws = x.numpy(), labels.numpy(), weights.numpy() / weights.numpy().sum()
    mu, sd = xs.mean(0), xs.std(0)
    a = np.hstack([(xs - mu) / sd, np.ones((200, 1))])

    def objective(t):
        z = a @ t
        return np.sum(ws * (np.logaddexp(0, z) - ys * z)) + 0.5 * l2 * t @ t

    t = minimize(objective, np.zeros(3), method="BFGS", options={"gtol": 1e-10}).x
    assert w == pytest.approx(t[:2] / sd, rel=1e-5)
    assert b == pytest.approx(t[2] - (t[:2] / sd) @ mu, rel=1e-5)
    # nothing to learn (every input indifferent): always exit
    w0, b0 = fit_policy(x, labels, torch.zeros(200))
    assert not w0.any() and torch.sigmoid(torch.tensor(b0)) > 0.99


def test_policy_features_are_order_free_power_means():
    logits = torch.randn(64, 7, generator=torch.Generator().manual_seed(1))
    p = np.exp(logits.double().numpy())
    p /= p.sum(1, keepdims=True)
    f = policy_features(logits)
    assert np.allclose(f.numpy(), np.stack([(p ** 2).sum(1) / 7, (p ** 4).sum(1) / 7], 1), atol=1e-7)
    assert torch.allclose(policy_features(logits[:, torch.randperm(7)]), f)


# -- splitting --------------------------------------------------------------------------------

def test_split_refuses_what_is_not_one_sequential_backbone():
    net = ExitNet().eval()
    x = torch.rand(2, 1, 8, 8)
    bodies = split_backbone(net, EXITS, x)
    with torch.no_grad():
        h = x
        for b in bodies:
            h = b(h)
        assert torch.allclose(h, net(x), atol=1e-6)
    assert [len(b) for b in bodies[:2]] == [4, 4] and isinstance(bodies[2], ExitNet)
    with pytest.raises(ConfigError, match="not a child of an nn.Sequential"):
        split_backbone(net, ["classifier"], x)            # the model itself is no nn.Sequential
    with pytest.raises(ConfigError, match="one nn.Sequential"):
        split_backbone(net, ["features.3", "classifier.1"], x)
    with pytest.raises(ConfigError, match="forward order"):
        split_backbone(net, ["features.7", "features.3"], x)
    with pytest.raises(ConfigError, match="has no child '42'"):
        split_backbone(net, ["features.42"], x)

    class Skip(ExitNet):          # uses the input after the backbone: not "backbone first, then the rest"
        def forward(self, x):
            return self.classifier(self.features(x)) + x.mean()

    with pytest.raises(ConfigError, match="does not give the model's output"):
        split_backbone(Skip().eval(), EXITS, x)


# -- the digits cascade, deployed ---------------------------------------------------------------

@pytest.fixture(scope="module")
def net(digits, one_thread):
    xtr, ytr, _, _ = digits
    torch.manual_seed(0)
    return D.train(ExitNet(), xtr, ytr.long(), epochs=8, lr=5e-3, progress=False)


@pytest.fixture(scope="module")
def streams(digits):
    """Heads train on all but the first 300 training digits; the policies learn on those 300."""
    xtr, ytr, _, _ = digits
    y = ytr.long()
    train = [(xtr[i:i + 64], y[i:i + 64]) for i in range(300, len(xtr), 64)]
    return {"train": train, "val": [(xtr[:300], y[:300])]}


@pytest.fixture(scope="module")
def cascade(net, streams):
    """The exit heads (λ-free), trained once."""
    return attach_exits(copy.deepcopy(net), EXITS, streams["train"], head_pool=2,
                        train_config=TrainConfig(epochs=6, lr=5e-3, progress=False))


@pytest.fixture(scope="module")
def deployed(net, cascade, streams, digits, tmp_path_factory):
    """``deployed("full")``: the full network's arm-int8 artifact; ``deployed(λ)``: the cascade with its
    policies fitted for λ and its arm-int8 artifact (each made once)."""
    xtr, _, xte, _ = digits
    cal = [xtr[i:i + 64] for i in range(0, 256, 64)]
    root = tmp_path_factory.mktemp("early-exit")
    made = {}

    def get(key):
        if key not in made:
            if key == "full":
                made[key] = sdk.deploy(net, target="arm-int8", example_inputs=(xte[:1],), calibration=cal,
                                       output=root / "full", progress=False)
            else:
                c = copy.deepcopy(cascade)
                fit_policies(c, streams["val"], key)
                made[key] = c, sdk.deploy(c, target="arm-int8", example_inputs=(xte[:4],), calibration=cal,
                                          output=root / f"lam{key}", progress=False)
        return made[key]

    return get


def measured_macs(art, exit_stage) -> float:
    """Mean MACs per input from the artifact's profile: each input pays every layer of the stages it ran."""
    per_stage = np.zeros(len(art.manifest["early_exit"]["stages"]))
    for row in art.profile["layers"]:
        per_stage[row["stage"]] += row.get("macs", 0)
    return float(np.cumsum(per_stage)[exit_stage].mean())


def test_artifact_runs_the_cheap_path_like_the_torch_cascade(deployed, digits):
    _, _, xte, yte = digits
    y = yte.numpy()
    full = deployed("full")
    full_logits = np.concatenate([full.run(xte[i:i + 1])[0] for i in range(len(xte))])
    full_acc, full_macs = float((full_logits.argmax(1) == y).mean()), full.profile["totals"]["macs"]
    c, art = deployed(LAMBDAS[1])
    assert sorted(art.manifest["files"]) == ["golden.npz", "profile.json", "stage0.tflite", "stage1.tflite",
                                             "stage2.tflite"]
    logits = art.run(xte)[0]                     # all 450 held-out digits, one input at a time inside
    info = art.last_run_info
    with torch.no_grad():
        t_logits, t_exit, _ = c.exits(xte)
    agree = float((info.exit_stage == t_exit.numpy()).mean())
    assert agree >= 0.97, agree
    acc = float((logits.argmax(1) == y).mean())
    macs = measured_macs(art, info.exit_stage)
    assert macs == pytest.approx(info.mean_macs)
    assert macs < 0.7 * full_macs, (macs, full_macs)
    assert acc >= full_acc - 0.015, (acc, full_acc)
    assert 0 < info.exit_fractions[0] < 1 and info.stages_run.min() == 1
    # the exits that left early give their own head's logits, not the final ones
    early = (info.exit_stage == 0) & (t_exit.numpy() == 0)
    assert early.sum() >= 20 and np.abs(logits[early] - t_logits.numpy()[early]).max() < 0.5
    # the integer reference runs the same stage files: the same exits and logits, bit for bit
    ref = run_cascade(art, xte[:60], runner="reference")
    host = run_cascade(art, xte[:60])
    assert np.array_equal(ref.exit_stage, host.exit_stage) and np.array_equal(ref.logits, host.logits)
    reopened = sdk.load(art.path)
    assert np.array_equal(reopened.run(xte[:5])[0], logits[:5])


@pytest.mark.slow
def test_larger_cost_weight_fewer_macs(deployed, digits):
    _, _, xte, yte = digits
    macs, accs = [], []
    for lam in LAMBDAS:
        _, art = deployed(lam)
        out = art.run(xte)[0]
        macs.append(measured_macs(art, art.last_run_info.exit_stage))
        accs.append(float((out.argmax(1) == yte.numpy()).mean()))
    assert macs[0] > macs[1] > macs[2], macs
    assert accs[0] >= accs[2], accs


def test_yaml_recipe_with_the_early_exit_stage(net, streams, digits, tmp_path):
    xtr, _, xte, yte = digits
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("stages:\n"
                      "  - method: early-exit\n"
                      "    config: {exits: [features.3, features.7], cost_weight: 0.1, head_pool: 2, epochs: 3,\n"
                      "             lr: 5.0e-3}\n")
    art = sdk.deploy(net, target="arm-fp32", example_inputs=(xte[:2],), recipe=str(recipe), data=streams,
                     output=tmp_path / "art", progress=False)
    report = art.manifest["stages"][0]
    assert report["method"] == "early-exit" and report["exits"] == EXITS
    assert report["policy_data"]["stream"] == "val" and report["policy_data"]["inputs"] == 300
    out = art.run(xte[:100])[0]
    assert out.shape == (100, 10) and (out.argmax(1) == yte[:100].numpy()).mean() > 0.9
    assert art.last_run_info.mean_macs < art.manifest["early_exit"]["stages"][0]["macs"] + sum(
        s["macs"] for s in art.manifest["early_exit"]["stages"][1:])
    with pytest.raises(ConfigError, match="early exits deploy to arm-int8, arm-fp32"):
        sdk.deploy(net, target="fp16-gpu", example_inputs=(xte[:2],), recipe=str(recipe), data=streams,
                   progress=False)
    with pytest.raises(ConfigError, match="exits is empty"):
        sdk.compress(net, {"stages": [{"method": "early-exit"}]}, data=streams, progress=False)


def _tampered(art, tmp_path, edit) -> "sdk.Artifact":
    where = tmp_path / f"t{len(list(tmp_path.iterdir()))}"
    shutil.copytree(art.path, where)
    manifest = json.loads((where / "manifest.json").read_text())
    edit(manifest["early_exit"], manifest)
    (where / "manifest.json").write_text(json.dumps(manifest))
    return where


def test_tampered_early_exit_section_is_refused(deployed, digits, tmp_path):
    _, _, xte, _ = digits
    _, art = deployed(LAMBDAS[1])

    def at_load(edit, match):
        with pytest.raises(ArtifactError, match=match):
            sdk.load(_tampered(art, tmp_path, edit))

    def at_run(edit, match):
        opened = sdk.load(_tampered(art, tmp_path, edit))
        with pytest.raises(ArtifactError, match=match):
            opened.run(xte[:2])

    at_load(lambda s, m: s["stages"][0].update(threshold=1.5), r"threshold.*\(0, 1\)")
    at_load(lambda s, m: s["stages"][1].update(file="../stage1.tflite"), "not a plain file name")
    at_load(lambda s, m: s["stages"][1].update(file="golden.npz"), "not a .tflite file")
    at_load(lambda s, m: s["stages"][1]["inputs"][0]["quantization"].update(scale=[0.5]), "features as stored")
    at_load(lambda s, m: s["stages"].pop(1), "stage 1 must take stage 0's features")
    at_load(lambda s, m: s["stages"][2].update(threshold=0.5), "unknown field")
    at_load(lambda s, m: s.update(version=2), "upgrade edgepack")
    at_load(lambda s, m: m["outputs"][0].update(shape=[4, 11]), "logits")
    # swapped stage files pass the schema, but each file is checked against its stage's signatures
    at_run(lambda s, m: (s["stages"][0].update(file="stage1.tflite"), s["stages"][1].update(file="stage0.tflite")),
           "stage1.tflite of .* is damaged or was not written by edgepack")
    at_run(lambda s, m: s["stages"][1].update(macs=s["stages"][1]["macs"] + 1), "claims .* MACs")
    # a stage file is hashed like every other file
    where = tmp_path / "bytes"
    shutil.copytree(art.path, where)
    data = bytearray((where / "stage1.tflite").read_bytes())
    data[-8] ^= 0xFF
    (where / "stage1.tflite").write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="stage1.tflite is missing or does not match"):
        sdk.load(where)
    # tools that read one model.tflite say what an early-exit artifact is
    from sdk.litert.runners import checked_model

    with pytest.raises(InputError, match="early-exit cascade"):       # a valid artifact, not a damaged one
        checked_model(art)


def test_cascade_module_contract(cascade):
    with pytest.raises(ConfigError, match="at least 2 stages"):
        EarlyExitCascade(list(cascade.stages)[:1], [])
    with pytest.raises(ConfigError, match=r"threshold=1.5 is out of range"):
        EarlyExitCascade(list(cascade.stages), [0.5, 1.5])
    with pytest.raises(ConfigError, match="cascades deploy to arm-int8, arm-fp32"):
        sdk.deploy(cascade, target="fp16-gpu", example_inputs=(torch.rand(1, 1, 8, 8),), progress=False)


@pytest.mark.slow
def test_torchvision_mobilenet_v2_exits_in_features(tmp_path, one_thread):
    """A real architecture: torchvision's MobileNetV2 (10 classes, 32×32 inputs) with exits after two
    inverted-residual blocks of ``features``, deployed to arm-int8: the stages' MACs are the network's
    plus the exit heads', and the integer reference runs the artifact exactly as LiteRT does."""
    gallery = pytest.importorskip("gallery")
    try:
        tv = gallery.import_torchvision()
    except ImportError:
        pytest.skip("torchvision is not installed")
    torch.manual_seed(0)
    model = tv.models.mobilenet_v2(num_classes=10).eval()
    gen = torch.Generator().manual_seed(0)
    data = [(torch.rand(16, 3, 32, 32, generator=gen), torch.randint(0, 10, (16,), generator=gen))
            for _ in range(3)]
    cascade = attach_exits(copy.deepcopy(model), ["features.3", "features.10"], data,
                           train_config=TrainConfig(epochs=2, lr=1e-2, progress=False))
    fit_policies(cascade, data, 0.5)
    x = torch.cat([b[0] for b in data])
    full = sdk.deploy(model, target="arm-int8", example_inputs=(x[:1],), calibration=[x], progress=False)
    art = sdk.deploy(cascade, target="arm-int8", example_inputs=(x[:2],), calibration=[x],
                     output=tmp_path / "mbv2", progress=False)
    heads = sum(s.head.linear.in_features * s.head.linear.out_features + 2 for s in cascade.stages[:-1])
    stage_macs = [s["macs"] for s in art.manifest["early_exit"]["stages"]]
    assert sum(stage_macs) == full.profile["totals"]["macs"] + heads
    assert tuple(stage_macs) == cascade.stage_macs
    host = run_cascade(art, x[:12])
    ref = run_cascade(art, x[:12], runner="reference")
    assert np.array_equal(host.exit_stage, ref.exit_stage) and np.array_equal(host.logits, ref.logits)
    with torch.no_grad():
        _, t_exit, _ = cascade.exits(x[:12])
    assert (host.exit_stage == t_exit.numpy()).mean() >= 0.75
