"""Channel groups (sdk/channels.py): which layers' channels are coupled (residual adds, concat,
flatten, depthwise, BN, squeeze-excite), and removing channels that are dead anyway leaves the
outputs unchanged; patterns it cannot follow are named errors.  The pruners built on it:
tests/methods/test_filter_l1.py and tests/methods/test_slimming.py."""

import pytest
import torch
from torch import nn

from examples.models import make
from sdk.channels import ChannelDependencyError, channel_groups, remove_channels
from sdk.errors import ConfigError, InputError, UnsupportedOpError


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


class Grouped(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(self.c2(torch.relu(self.c1(x))).mean((2, 3)))


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3)

    def forward(self, x):
        return self.c1(x) if x.sum() > 0 else x


def test_bad_input_gets_named_errors():
    x = torch.randn(1, 3, 8, 8)
    with pytest.raises(UnsupportedOpError, match="grouped conv 'c2' .*groups=2.*depthwise") as exc:
        channel_groups(Grouped(), (x,))
    assert isinstance(exc.value, ChannelDependencyError) and exc.value.node == "c2"
    with pytest.raises(ChannelDependencyError, match="could not trace"):
        channel_groups(DataDependent(), (x,))
    with pytest.raises(InputError, match="does not run through"):
        channel_groups(make("lenet")[0], (x,))            # 3 channels into a 1-channel model
    model, x = make("lenet")
    groups = channel_groups(model, (x,))
    with pytest.raises(ConfigError, match="fixed .*model output"):
        remove_channels(model, {groups[-1]: [0]})
    with pytest.raises(ConfigError, match="keep at least one"):
        remove_channels(model, {groups[1]: range(groups[1].channels)})
