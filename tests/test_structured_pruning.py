"""Structured pruning: channel groups (sdk/channels.py), filter-l1 and slimming.

Channels are physically removed, so each test checks shapes and numbers
against something computed independently: the unpruned model's outputs when
the removed channels were dead anyway, numpy L1 norms, closed-form parameter
and MAC counts, the int8 artifact, and digits accuracy.
"""

import copy

import numpy as np
import pytest
import torch
from torch import nn

import sdk
from examples.models import make
from plugins.prune.filter_l1 import FilterL1Pruner
from plugins.prune.slimming import SlimmingPruner
from sdk.channels import ChannelDependencyError, channel_groups, remove_channels
from sdk.trainer import finetune
from sdk.errors import ConfigError, InputError, UnsupportedOpError
from sdk.graph import capture, macs
from sdk.trainer import evaluate


pytestmark = pytest.mark.usefixtures("one_thread")   # tiny models: one thread is faster


class Branchy(nn.Module):
    """Two branches concatenated, a strided conv, and a flatten concatenated with a pooled skip:
    cat offsets and flatten repeats in one small graph."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 6, 3, padding=1)
        self.b = nn.Conv2d(3, 4, 1)
        self.bn = nn.BatchNorm2d(10)
        self.c = nn.Conv2d(10, 8, 3, stride=2, padding=1)
        self.bnc = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8 * 4 * 4 + 10, 5)

    def forward(self, x):
        y = torch.relu(self.bn(torch.cat([self.a(x), self.b(x)], 1)))
        z = torch.relu(self.bnc(self.c(y)))
        return self.fc(torch.cat([z.flatten(1), y.mean((2, 3))], 1))


def _branchy():
    torch.manual_seed(0)
    m = Branchy().eval()
    with torch.no_grad():
        for bn in (m.bn, m.bnc):
            bn.running_mean.uniform_(-0.2, 0.2)
            bn.running_var.uniform_(0.5, 1.5)
    return m, torch.randn(1, 3, 8, 8)


class SqueezeExcite(nn.Module):
    """Channel attention: the excitation's outputs multiply, so they are tied to the features' channels."""

    def __init__(self):
        super().__init__()
        self.c, self.bn = nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)
        self.f1, self.f2 = nn.Linear(8, 4), nn.Linear(4, 8)
        self.out = nn.Conv2d(8, 5, 1)

    def forward(self, x):
        y = torch.relu(self.bn(self.c(x)))
        w = torch.sigmoid(self.f2(torch.relu(self.f1(y.mean((2, 3))))))
        return self.out(y * w[:, :, None, None]).mean((2, 3))


def _se():
    torch.manual_seed(0)
    return SqueezeExcite().eval(), torch.randn(1, 3, 8, 8)


ZOO = {
    "mlp": lambda: make("mlp"),
    "lenet": lambda: make("lenet"),
    "resnet18": lambda: make("resnet18", width=8),
    "mobilenetv2": lambda: make("mobilenetv2", width_mult=0.25),
    "dscnn": lambda: make("dscnn", width=16),
    "branchy": _branchy,
    "squeeze-excite": _se,
}


def _kill(model, group, idx):
    """Make channels ``idx`` of ``group`` exactly zero: zero filters, biases, BN scale and shift."""
    with torch.no_grad():
        for s in group.slices:
            if s.role == "in":
                continue
            mod = model.get_submodule(s.module)
            rows = [s.offset + c for c in idx]
            mod.weight[rows] = 0.0
            if mod.bias is not None:
                mod.bias[rows] = 0.0


@pytest.mark.parametrize("name", list(ZOO))
def test_removing_dead_channels_leaves_outputs_unchanged(name):
    model, x = ZOO[name]()
    x = torch.randn(4, *x.shape[1:], generator=torch.Generator().manual_seed(1))
    groups = [g for g in channel_groups(model, (x[:1],)) if g.prunable]
    gen = torch.Generator().manual_seed(0)
    plan = {g: sorted(torch.randperm(g.channels, generator=gen)[:max(1, g.channels // 3)].tolist())
            for g in groups}
    for g, idx in plan.items():
        _kill(model, g, idx)
    with torch.no_grad():
        before = model(x)
    params = sum(p.numel() for p in model.parameters())
    remove_channels(model, plan)
    with torch.no_grad():
        after = model(x)
    assert after.shape == before.shape
    assert float((after - before).abs().max()) < 1e-5
    assert sum(p.numel() for p in model.parameters()) < params
    # the pruned model traces again, and every group lost exactly the planned channels
    again = sorted(g.channels for g in channel_groups(model, (x[:1],)) if g.prunable)
    assert again == sorted(g.channels - len(idx) for g, idx in plan.items())


def _layout(group):
    return frozenset((s.module, s.role, s.offset, s.repeat) for s in group.slices)


def test_groups_follow_residuals_flatten_and_cat():
    """Couplings written out by hand from the model definitions."""
    resnet, x = make("resnet18", width=8)
    by_producer = {g.of_role("out")[0].module: g for g in channel_groups(resnet, (x,)) if g.of_role("out")}
    assert _layout(by_producer["stem.0"]) == {
        ("stem.0", "out", 0, 1), ("stem.1", "norm", 0, 1),
        ("layers.0.conv1", "in", 0, 1), ("layers.0.conv2", "out", 0, 1), ("layers.0.bn2", "norm", 0, 1),
        ("layers.1.conv1", "in", 0, 1), ("layers.1.conv2", "out", 0, 1), ("layers.1.bn2", "norm", 0, 1),
        ("layers.2.conv1", "in", 0, 1), ("layers.2.shortcut.0", "in", 0, 1)}
    last = by_producer["layers.6.conv2"]      # the 1x1 strided shortcut joins the stage group; fc reads it
    assert {("layers.6.shortcut.0", "out", 0, 1), ("layers.7.conv2", "out", 0, 1), ("fc", "in", 0, 1)} \
        <= _layout(last)
    assert by_producer["fc"].fixed == "feeds the model output"

    lenet, x = make("lenet")
    conv2 = next(g for g in channel_groups(lenet, (x,)) if ("features.4", "out", 0, 1) in _layout(g))
    assert ("classifier.1", "in", 0, 4) in _layout(conv2)    # 32 channels × 2×2 after the second pool

    mnet, x = make("mobilenetv2", width_mult=0.25)
    expand = next(g for g in channel_groups(mnet, (x,)) if ("features.4.block.0", "out", 0, 1) in _layout(g))
    assert _layout(expand) == {("features.4.block.0", "out", 0, 1), ("features.4.block.1", "norm", 0, 1),
                               ("features.4.block.3", "depthwise", 0, 1), ("features.4.block.4", "norm", 0, 1),
                               ("features.4.block.6", "in", 0, 1)}

    branchy, x = _branchy()
    layouts = {g.of_role("out")[0].module: _layout(g) for g in channel_groups(branchy, (x,)) if g.prunable}
    assert layouts["a"] == {("a", "out", 0, 1), ("bn", "norm", 0, 1), ("c", "in", 0, 1), ("fc", "in", 128, 1)}
    assert layouts["b"] == {("b", "out", 0, 1), ("bn", "norm", 6, 1), ("c", "in", 6, 1), ("fc", "in", 134, 1)}
    assert layouts["c"] == {("c", "out", 0, 1), ("bnc", "norm", 0, 1), ("fc", "in", 0, 16)}

    se, x = _se()
    assert {_layout(g) for g in channel_groups(se, (x,)) if g.prunable} == {
        frozenset({("c", "out", 0, 1), ("bn", "norm", 0, 1), ("f1", "in", 0, 1), ("f2", "out", 0, 1),
                   ("out", "in", 0, 1)}),
        frozenset({("f1", "out", 0, 1), ("f2", "in", 0, 1)})}


def test_filter_l1_removes_the_smallest_l1_filters_per_group():
    model, x = make("resnet18", width=8)
    ref = copy.deepcopy(model)
    groups = [g for g in channel_groups(ref, (x,)) if g.prunable]
    ratio = 0.3
    FilterL1Pruner(ratio=ratio, input_shape=tuple(x.shape)).apply(model)
    kept, kept_in = {}, {}
    for g in groups:
        weights = [ref.get_submodule(s.module).weight.detach().numpy() for s in g.of_role("out")]
        score = sum(np.abs(w).reshape(w.shape[0], -1).sum(1) for w in weights)     # Σ over coupled producers
        kept[g] = np.sort(np.argsort(score, kind="stable")[round(ratio * g.channels):])
        kept_in.update({s.module: kept[g] for s in g.of_role("in")})
    for g in groups:
        assert len(kept[g]) == g.channels - round(ratio * g.channels)
        for s in g.of_role("out"):
            w = ref.get_submodule(s.module).weight.detach().numpy()[kept[g]]
            w = w[:, kept_in[s.module]] if s.module in kept_in else w        # the stem reads the RGB input
            np.testing.assert_array_equal(model.get_submodule(s.module).weight.detach().numpy(), w)
        for s in g.of_role("norm"):
            np.testing.assert_array_equal(model.get_submodule(s.module).running_mean.numpy(),
                                          ref.get_submodule(s.module).running_mean.numpy()[kept[g]])
    assert model.fc.out_features == 10


def _total_macs(model, x):
    g = capture(model, (x,))
    return sum(macs(g, n) for n in g.nodes)


def test_filter_l1_params_and_macs_closed_form():
    model, x = make("lenet")           # conv 1→16, conv 16→32, fc 128→64, fc 64→10
    assert _total_macs(model, x) == 16 * 64 * 9 + 32 * 16 * 16 * 9 + 128 * 64 + 64 * 10
    FilterL1Pruner(ratio=0.5, input_shape=(1, 1, 8, 8)).apply(model)
    c1, c2, h = 8, 16, 32
    params = (9 * c1 + c1) + 2 * c1 + (c1 * 9 * c2 + c2) + 2 * c2 + (c2 * 4 * h + h) + (h * 10 + 10)
    assert sum(p.numel() for p in model.parameters()) == params
    assert _total_macs(model, x) == c1 * 64 * 9 + c2 * 16 * c1 * 9 + c2 * 4 * h + h * 10

    rounded, _ = make("lenet")
    FilterL1Pruner(ratio=0.3, round_to=4, exclude=("classifier.1",), input_shape=(1, 1, 8, 8)).apply(rounded)
    # keep 16−5=11 → 12, 32−10=22 → 24 (multiples of 4); the excluded fc keeps its 64
    assert (rounded.features[0].out_channels, rounded.features[4].out_channels) == (12, 24)
    assert rounded.classifier[1].out_features == 64


@pytest.mark.parametrize("name", ["resnet18", "mobilenetv2"])
def test_pruned_model_deploys_to_int8(name, tmp_path):
    model, x = ZOO[name]()
    full = sum(p.numel() for p in model.parameters())
    pruned = FilterL1Pruner(ratio=0.5, input_shape=tuple(x.shape)).apply(model)
    assert sum(p.numel() for p in pruned.parameters()) < 0.45 * full
    gen = torch.Generator().manual_seed(0)
    cal = [torch.randn(2, *x.shape[1:], generator=gen) for _ in range(4)]
    art = sdk.deploy(pruned, "arm-int8", (x,), calibration=cal, output=tmp_path / "a", progress=False)
    rep = art.verify(pruned, inputs=[torch.randn(*x.shape, generator=gen) for _ in range(3)])
    assert rep.sqnr_db["host"] > 25


@pytest.fixture(scope="module")
def digits_batches(digits):
    xtr, ytr, xte, yte = digits
    return [(xtr[i:i + 64], ytr[i:i + 64].long()) for i in range(0, len(xtr), 64)], [(xte, yte.long())]


@pytest.fixture(scope="module")
def trained_lenet(digits_batches):
    train, _ = digits_batches
    model, _ = make("lenet", randomize_bn=False)
    finetune(model, train, epochs=10, lr=1e-2, progress=False)
    return model


def test_filter_l1_with_finetuning_keeps_digits_accuracy(trained_lenet, digits_batches):
    train, test = digits_batches
    base = evaluate(trained_lenet, test)
    pruned = FilterL1Pruner(ratio=0.3, finetune_epochs=3, lr=3e-3, progress=False).apply(
        copy.deepcopy(trained_lenet), train)
    assert pruned.features[4].out_channels == 22
    assert evaluate(pruned, test) >= base - 0.03       # measured: 0.991 → 0.982


def _gammas(model, groups):
    return torch.cat([model.get_submodule(s.module).weight.detach().abs()
                      for g in groups for s in g.of_role("norm")])


def test_slimming_sparsifies_gamma_and_removal_is_nearly_free(trained_lenet, digits_batches):
    train, test = digits_batches
    base_acc = evaluate(trained_lenet, test)
    cfg = dict(ratio=0.3, l1=3e-2, epochs=10, lr=1e-2, finetune_epochs=3, finetune_lr=1e-3, progress=False)
    pruner = SlimmingPruner(**cfg)
    model, _ = make("lenet", randomize_bn=False)             # same init as trained_lenet
    groups = pruner.candidates(model, train)
    pruner.train_sparse(model, train, groups)
    sparse_acc = evaluate(model, test)

    # γ is much sparser with the L1 penalty than without (same data, init, epochs)
    near_zero = lambda g: float((g < 0.05 * g.max()).float().mean())  # noqa: E731
    slim_g, base_g = _gammas(model, groups), _gammas(trained_lenet, groups)
    assert near_zero(slim_g) >= 0.25 and near_zero(base_g) == 0.0          # measured 0.42 vs 0
    assert float(slim_g.sum() / slim_g.norm()) < 0.75 * float(base_g.sum() / base_g.norm())

    # the global threshold: exactly round(0.3 · 48) channels, every removed |γ| ≤ every kept |γ|
    plan = pruner.select(model, groups)
    removed = [float(_gammas(model, [g])[c]) for g, idx in plan.items() for c in idx]
    kept = [float(v) for g, idx in plan.items() for c, v in enumerate(_gammas(model, [g])) if c not in idx]
    assert len(removed) == round(0.3 * 48) and max(removed) <= min(kept)

    # removing the low-γ channels costs little after sparsity training, a lot without it
    remove_channels(model, plan)
    assert evaluate(model, test) >= sparse_acc - 0.03                        # measured 0.987 → 0.984
    plain = copy.deepcopy(trained_lenet)
    remove_channels(plain, pruner.select(plain, pruner.candidates(plain, train)))
    assert evaluate(plain, test) < base_acc - 0.1                           # measured 0.991 → 0.79

    finetune(model, train, epochs=3, lr=1e-3, progress=False)
    assert evaluate(model, test) >= base_acc - 0.03                          # measured 0.996 vs 0.991

    # apply() runs exactly these steps
    whole = SlimmingPruner(**cfg).apply(make("lenet", randomize_bn=False)[0], train)
    assert all(torch.equal(a, b) for a, b in zip(whole.state_dict().values(), model.state_dict().values()))


class Grouped(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(self.c2(torch.relu(self.c1(x))).mean((2, 3)))


class ChannelReshape(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(4 * 2 * 64, 4)

    def forward(self, x):
        return self.fc(self.c1(x).reshape(-1, 4, 2, 64).flatten(1))


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3)

    def forward(self, x):
        return self.c1(x) if x.sum() > 0 else x


def test_bad_input_gets_named_errors(digits_batches):
    train, _ = digits_batches
    x = torch.randn(1, 3, 8, 8)
    with pytest.raises(UnsupportedOpError, match="grouped conv 'c2' .*groups=2.*depthwise") as exc:
        channel_groups(Grouped(), (x,))
    assert isinstance(exc.value, ChannelDependencyError) and exc.value.node == "c2"
    with pytest.raises(ChannelDependencyError, match="reshape"):
        FilterL1Pruner(input_shape=(1, 3, 8, 8)).apply(ChannelReshape())
    with pytest.raises(ChannelDependencyError, match="could not trace"):
        channel_groups(DataDependent(), (x,))
    with pytest.raises(InputError, match="does not run through"):
        channel_groups(make("lenet")[0], (x,))            # 3 channels into a 1-channel model
    with pytest.raises(InputError, match="input_shape"):
        FilterL1Pruner().apply(make("lenet")[0])
    with pytest.raises(InputError, match="data"):
        FilterL1Pruner(finetune_epochs=1, input_shape=(1, 1, 8, 8)).apply(make("lenet")[0])
    with pytest.raises(InputError, match="labelled data"):
        SlimmingPruner().apply(make("lenet")[0])
    with pytest.raises(InputError, match="labelled"):
        SlimmingPruner(epochs=1, progress=False).apply(make("lenet")[0], [b[0] for b in train])
    with pytest.raises(ConfigError, match="ratio"):
        FilterL1Pruner(ratio=1.0)
    with pytest.raises(ConfigError, match="round_to"):
        FilterL1Pruner(round_to=0)
    model, x = make("lenet")
    groups = channel_groups(model, (x,))
    with pytest.raises(ConfigError, match="fixed .*model output"):
        remove_channels(model, {groups[-1]: [0]})
    with pytest.raises(ConfigError, match="keep at least one"):
        remove_channels(model, {groups[1]: range(groups[1].channels)})
