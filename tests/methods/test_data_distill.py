"""data-distill: the ensembled pseudo-labels equal a numpy computation; the threshold filters
exactly; the transforms do what they say; with 100 labelled digits and the rest unlabelled the
student beats labelled-only training at the same epochs; a YAML recipe with named streams runs
it; the student deploys to arm-int8."""

import numpy as np
import pytest
import torch
from torch import nn

import sdk
from distill_helpers import accuracy, batches, check_training_config, mlp, trained
from plugins.distill.data_distill import DataDistill, make_transform
from sdk.context import REPORTS_ATTR
from sdk.errors import ConfigError, InputError
from sdk.trainer import TrainConfig, finetune

pytestmark = pytest.mark.usefixtures("one_thread")   # tiny models: one thread is faster


def inputs(x, size=64):
    """An unlabelled stream: batches of inputs alone."""
    return [x[i:i + size] for i in range(0, len(x), size)]


def np_softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_pseudo_labels_are_the_averaged_softmax_over_transforms():
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(6, 3))
    x = torch.randn(5, 1, 2, 3)
    w, b = teacher[1].weight.detach().numpy(), teacher[1].bias.detach().numpy()
    xn = x.numpy()
    views = [xn, xn[..., ::-1], np.pad(xn, ((0, 0), (0, 0), (0, 0), (1, 0)))[..., :3]]   # identity, hflip, shift:1,0
    p = np.mean([np_softmax(v.reshape(5, 6) @ w.T + b) for v in views], axis=0)
    dd = DataDistill(transforms=["identity", "hflip", "shift:1,0"])
    np.testing.assert_allclose(dd.ensemble(teacher, x).numpy(), p, rtol=1e-5, atol=1e-7)
    by_hand = DataDistill(transforms=["identity", lambda t: t.flip(-1), "shift:1,0"])   # a user callable
    np.testing.assert_allclose(by_hand.ensemble(teacher, x).numpy(), p, rtol=1e-5, atol=1e-7)
    px, py, conf = dd.pseudo_labels(teacher, [x[:2], (x[2:],)])                 # x and (x,) batches
    assert torch.equal(px, x)
    assert py.tolist() == p.argmax(1).tolist()
    np.testing.assert_allclose(conf.numpy(), p.max(1), rtol=1e-5)


def test_threshold_keeps_exactly_the_confident_examples():
    teacher = nn.Identity()                                     # logits are the inputs: confidences known
    logits = torch.log(torch.tensor([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7], [0.5, 0.5], [0.2, 0.8]]))
    x, y, conf = DataDistill(transforms=["identity"], threshold=0.7).pseudo_labels(teacher, [(logits, None)])
    np.testing.assert_allclose(conf.numpy(), [0.9, 0.7, 0.8], rtol=1e-6)   # 0.6 and 0.5 are dropped, 0.7 kept
    assert torch.equal(x, logits[[0, 2, 4]]) and y.tolist() == [0, 1, 1]
    assert len(DataDistill(transforms=["identity"], threshold=0.95).pseudo_labels(teacher, [logits])[1]) == 0


def test_transforms_move_pixels_as_named_and_bad_ones_are_refused():
    x = torch.arange(9.0).reshape(1, 1, 3, 3)
    assert make_transform("hflip")(x)[0, 0, 0].tolist() == [2.0, 1.0, 0.0]
    assert make_transform("vflip")(x)[0, 0, :, 0].tolist() == [6.0, 3.0, 0.0]
    assert make_transform("shift:-1,1")(x)[0, 0].tolist() == [[0, 0, 0], [1, 2, 0], [4, 5, 0]]
    assert torch.allclose(make_transform("scale:1")(x), x, atol=1e-5)
    zoomed = make_transform("scale:2")(torch.ones(1, 1, 4, 4))
    assert torch.allclose(zoomed, torch.ones(1, 1, 4, 4))                       # zooming in: no zero fill
    assert float(make_transform("scale:0.5")(torch.ones(1, 1, 4, 4))[0, 0, 0, 0]) == 0.0   # zooming out: border 0
    assert make_transform(lambda t: t * 2)(x).max() == 16                       # a callable passes through
    for bad in ("rotate", "shift:1", "scale:-1", "hflip:2", 3):
        with pytest.raises(ConfigError, match="transforms entry"):
            DataDistill(transforms=[bad])
    with pytest.raises(ConfigError, match="non-empty list"):
        DataDistill(transforms="hflip")
    with pytest.raises(ConfigError, match="threshold"):
        DataDistill(threshold=1.5)


def test_data_distill_config_is_a_training_config():
    check_training_config(DataDistill)


@pytest.fixture(scope="module")
def few_labels(digits):
    """100 labelled training digits, the other 1247 unlabelled, and a teacher trained on the 100."""
    xtr, ytr, xte, yte = digits
    teacher = trained(mlp((64, 64), 0), xtr[:100], ytr[:100])
    return xtr[:100], ytr[:100], xtr[100:], xte, yte, teacher


TRANSFORMS = ["identity", "scale:1.1", "scale:0.9"]


def test_ensembling_over_transforms_makes_the_confident_pseudo_labels_more_accurate(digits, few_labels):
    """The paper's reason for the ensemble: its confidence is a better filter than one view's."""
    xu, yu = few_labels[2], digits[1][100:]

    def kept_accuracy(transforms, threshold):
        conf, label = DataDistill(transforms=transforms).ensemble(few_labels[5], xu).max(-1)
        keep = conf >= threshold
        return float((label[keep] == yu[keep]).float().mean()), int(keep.sum())

    single, ensembled, unfiltered = (kept_accuracy(["identity"], 0.9), kept_accuracy(TRANSFORMS, 0.9),
                                     kept_accuracy(TRANSFORMS, 0.0))
    print(f"pseudo-label accuracy (kept): identity@0.9 {single}, ensemble@0.9 {ensembled}, ensemble@0 {unfiltered}")
    assert ensembled[0] >= single[0] + 0.02, (single, ensembled)
    assert ensembled[0] >= unfiltered[0] + 0.05, (unfiltered, ensembled)


def test_student_with_pseudo_labels_beats_labelled_only_and_deploys(digits, few_labels, tmp_path):
    """The paper's claim: confident ensembled pseudo-labels on unlabelled data add to few labels."""
    xl, yl, xu, xte, yte, teacher = few_labels
    gains = []
    for seed in (0, 1, 2):
        alone, student = mlp((32,), 10 + seed), mlp((32,), 10 + seed)
        finetune(alone, batches(xl, yl, 32), TrainConfig(epochs=20, lr=5e-3, seed=seed, progress=False))
        DataDistill(transforms=TRANSFORMS, threshold=0.5, epochs=20, lr=5e-3, seed=seed,
                    progress=False).apply(student, teacher, batches(xl, yl, 32), unlabeled=inputs(xu))
        gains.append((accuracy(alone, xte, yte), accuracy(student, xte, yte)))
    print("labelled-only vs data-distill, seeds 0-2:", gains, "teacher", accuracy(teacher, xte, yte))
    alone_acc, dd_acc = np.mean(gains, axis=0)
    assert dd_acc >= alone_acc + 0.04, gains
    assert all(d > a for a, d in gains), gains
    xtr = digits[0]
    art = sdk.deploy(student, "arm-int8", (xte[:1],), calibration=[xtr[i:i + 64] for i in range(0, 256, 64)],
                     output=tmp_path / "data-distill", progress=False)
    int8 = np.concatenate([art.run(xte[i:i + 1])[0] for i in range(0, 100)]).argmax(1)
    with torch.no_grad():
        agree = float((int8 == student(xte[:100]).argmax(1).numpy()).mean())
    assert agree >= 0.97, agree


def test_a_yaml_recipe_with_named_streams_runs_it_and_reports_the_pseudo_labels(few_labels):
    xl, yl, xu, xte, yte, teacher = few_labels
    recipe = ("stages:\n  - method: data-distill\n    config: {transforms: [identity, 'scale:1.1'], threshold: 0.9,"
              " epochs: 2, lr: 0.005, progress: false}\n")
    student = mlp((32,), 3)
    out = sdk.compress(student, recipe, data={"train": batches(xl, yl, 32), "unlabeled": inputs(xu)},
                       teacher=teacher, progress=False)
    kept = len(DataDistill(transforms=["identity", "scale:1.1"], threshold=0.9).pseudo_labels(teacher, [xu])[1])
    (report,) = getattr(out, REPORTS_ATTR)
    assert report["method"] == "data-distill" and report["pseudo_labels"] == kept and 0 < kept < len(xu)
    assert report["mean_confidence"] >= 0.9
    assert not torch.equal(out[1].weight, student[1].weight)
    with pytest.raises(InputError, match="unlabeled"):
        sdk.compress(student, recipe, data={"train": batches(xl, yl, 32)}, teacher=teacher, progress=False)
