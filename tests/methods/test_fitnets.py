"""fitnets: the hint loss is ½·MSE through the regressor; stage 1 trains only up to the guided
layer; hints make a thin deep student beat kd alone; the student deploys."""

import copy

import numpy as np
import pytest
import torch
from torch import nn

import sdk
from distill_helpers import accuracy, batches, check_training_config, digit_teachers, mlp
from plugins.distill.fitnets import FitNets
from plugins.distill.kd import KD
from sdk.errors import ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")   # tiny models: one thread is faster


@pytest.fixture(scope="module")
def teachers(digits):
    return digit_teachers(digits)


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


# -- the training fields ----------------------------------------------------------

def test_fitnets_config_is_a_training_config():
    check_training_config(FitNets)


def test_both_stages_take_the_stage_optimizer_and_stage1_its_own_epochs_and_lr(monkeypatch):
    """Stage 1 is the stage's training with hint_epochs/hint_lr, stage 2 the stage's own."""
    import plugins.distill.fitnets as fitnets_module

    seen = []
    real_fit = fitnets_module.fit
    monkeypatch.setattr(fitnets_module, "fit", lambda *a, **k: seen.append((a[3], k["desc"])) or real_fit(*a, **k))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    data = [(torch.randn(8, 6), torch.randint(0, 3, (8,))) for _ in range(2)]
    recipe = {"stages": [{"method": "fitnets", "config": {
        "hint_layer": "0", "guided_layer": "0", "hint_epochs": 3, "hint_lr": 0.2, "epochs": 2, "lr": 0.01,
        "optimizer": "sgd", "optimizer_options": {"momentum": 0.5}}}]}
    out = sdk.compress(model, recipe, data=data, progress=False)                # no teacher: the original
    (hints, hints_desc), (kd, kd_desc) = seen
    assert (hints_desc, kd_desc) == ("fitnets hints", "fitnets kd")
    assert (hints.epochs, hints.lr, kd.epochs, kd.lr) == (3, 0.2, 2, 0.01)
    assert hints.optimizer == kd.optimizer == "sgd" and hints.optimizer_config().momentum == 0.5 == \
        kd.optimizer_config().momentum
    assert not torch.equal(out[0].weight, model[0].weight)
