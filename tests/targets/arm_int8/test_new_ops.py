"""The ops real torchvision / timm CNNs use, one small module each, on arm-fp32 and arm-int8.

Every module deploys as written (in-place ops, stand-alone batch norm, padded and
ceil-mode pooling, chunk/split/select, clamps of any bounds, ...).  arm-fp32
must match torch to 1e-5 relative; arm-int8 must equal the integer reference
bit for bit, track torch (SQNR), load with TFLite's builtin kernels alone, and
stay in one XNNPACK partition unless the op has no int8 XNNPACK kernel.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sdk
import sdk.graph as G
from sdk.errors import UnsupportedOpError
from sdk.litert import runtime
from sdk.litert.layout import to_stored


def batches(x, n, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(x.shape, generator=g) for _ in range(n)]


def sqnr(want, got):
    return 10 * np.log10(np.sum(want ** 2) / max(np.sum((want - got) ** 2), 1e-30))


def check(model, x, tmp_path, *, partitions=1, min_sqnr=20.0):
    """Deploy to both targets and check everything the module docstring promises; returns the int8 artifact."""
    model = model.eval()
    cal = batches(x, 8, seed=0)
    inputs = batches(x, 3, seed=1)
    with torch.no_grad():
        want = [model(t).numpy() for t in inputs]
    fp = sdk.deploy(model, "arm-fp32", (x,), calibration=cal, output=tmp_path / "fp32", progress=False)
    for t, w in zip(inputs, want):
        got = fp.run(t)[0]
        assert np.abs(got - w).max() <= 1e-5 * max(np.abs(w).max(), 1e-6), "arm-fp32 differs from torch"
    q = sdk.deploy(model, "arm-int8", (x,), calibration=cal, output=tmp_path / "int8", progress=False)
    host = [q.run(t, runner="host")[0] for t in inputs]
    ref = [q.run(t, runner="reference")[0] for t in inputs]
    if q.manifest["outputs"][0]["quantization"] is None:     # a sigmoid/softmax output computed in float
        assert all(np.abs(h - r).max() <= 1e-6 * np.abs(r).max() for h, r in zip(host, ref)), \
            "float output of the int8 graph differs from the reference"
    else:
        assert all(np.array_equal(h, r) for h, r in zip(host, ref)), "int8 LiteRT differs from the integer reference"
    if min_sqnr is not None:
        db = float(sqnr(np.stack(want), np.stack(host)))
        assert db >= min_sqnr, f"int8 SQNR vs torch {db:.1f} dB"
    model_file = q.file("model.tflite")
    summary = runtime.op_summary(runtime.load_interpreter(model_file))
    assert summary["delegate_nodes"] == partitions, summary
    if partitions == 1:
        assert not summary["builtin"], summary
    plain = runtime.load_interpreter(model_file, delegate=False)     # TFLite's builtin kernels only
    (y,) = runtime.run(plain, [to_stored(q.manifest["inputs"][0], inputs[0].numpy())])
    assert y.dtype == np.float32 and np.all(np.isfinite(y))
    return q


class Seq(nn.Module):
    """A conv stem (so that int8 has a real range to quantize), then ``fn``."""

    def __init__(self, fn, cin=3, cout=8, **conv):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1, **conv)
        self.fn = fn

    def forward(self, x):
        return self.fn(self.conv(x))


X = torch.randn(1, 3, 12, 12)


# --- in-place ops and their functionalized forms -------------------------------------------


class Residual(nn.Module):
    """torchvision's BasicBlock style: in-place ReLU, ``out += identity``, dropout in eval."""

    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3)
        self.c2, self.b2 = nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3)
        self.relu, self.drop = nn.ReLU(inplace=True), nn.Dropout(0.5, inplace=True)

    def forward(self, x):
        identity = x
        out = self.relu(self.b1(self.c1(x)))
        out = self.b2(self.c2(out))
        out += identity
        return self.drop(self.relu(out))


@pytest.mark.parametrize("act", ["relu_", "relu6", "hardswish_", "silu_", "hardsigmoid_", "sigmoid_"])
def test_inplace_activations(act, tmp_path):
    fn = {"relu_": nn.ReLU(inplace=True), "relu6": nn.ReLU6(inplace=True), "hardswish_": nn.Hardswish(inplace=True),
          "silu_": nn.SiLU(inplace=True), "hardsigmoid_": nn.Hardsigmoid(inplace=True),
          "sigmoid_": lambda t: t.sigmoid_()}[act]
    check(Seq(fn), X, tmp_path)


def test_residual_block_with_inplace_add(tmp_path):
    check(Residual(), X, tmp_path)


def test_inplace_graph_reads_the_new_value():
    """An in-place op is renamed: later reads of the tensor it wrote see its result."""

    class M(nn.Module):
        def forward(self, x):
            y = x * 2
            y.relu_()
            return y + x

    x = torch.randn(2, 5)
    g = G.capture(M(), (x,))
    assert [n.op for n in g.nodes] == ["mul", "relu", "add"]
    assert torch.allclose(g.run([x])[0], M()(x))


def test_mutation_through_a_view_is_functionalized():
    """Writing a view of a tensor that is read later needs torch's functionalization: still exact."""

    class M(nn.Module):
        def forward(self, x):
            y = x * 1.5
            y[:, :3].relu_()
            return y - 1

    x = torch.randn(2, 6)
    g = G.capture(M(), (x,))
    assert not [n for n in g.nodes if n.op.endswith("_")]
    assert torch.allclose(g.run([x])[0], M()(x.clone()))


def test_functionalized_program_captures_the_same():
    """``run_decompositions({})`` turns BN into _native_batch_norm_legit_no_training and chunk into split."""

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.c, self.bn = nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8)

        def forward(self, x):
            a, b = F.relu_(self.bn(self.c(x))).chunk(2, dim=1)
            return a * b

    m = M().eval()
    with torch.no_grad():
        m.bn.running_var.uniform_(0.5, 2)
    ep = torch.export.export(m, (X,), strict=False).run_decompositions({})
    g = G.fold_batch_norm(G.from_exported(ep))
    assert [n.op for n in g.nodes] == ["conv", "relu", "slice", "slice", "mul"]
    assert torch.allclose(g.run([X])[0], m(X), atol=1e-6)


def test_inplace_op_on_a_parameter_does_not_change_the_model():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(4))

        def forward(self, x):
            return x * self.w.detach().clone().add_(1)

    m = M()
    G.capture(m, (torch.randn(2, 4),))
    assert torch.equal(m.w.detach(), torch.ones(4))


# --- batch norm --------------------------------------------------------------------------


def _bn(bn):
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
        bn.weight[0] = 0.0              # a dead channel: any weight scale, bias only
    return bn


class PreActivation(nn.Module):
    """DenseNet's pattern: BN and ReLU on a concatenation, then the conv."""

    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = _bn(nn.BatchNorm2d(7))
        self.out = nn.Conv2d(7, 4, 1)

    def forward(self, x):
        return self.out(F.relu(self.bn(torch.cat([self.c(x), x], 1))))


def test_standalone_batch_norm_2d(tmp_path):
    q = check(PreActivation(), X, tmp_path)
    assert any(layer["op"] == "conv->DEPTHWISE_CONV_2D" and layer["name"] == "batch_norm"
               for layer in q.profile["layers"])


@pytest.mark.parametrize("rank", [2, 3])
def test_standalone_batch_norm_1d(rank, tmp_path):
    shape = (1, 6) if rank == 2 else (1, 6, 10)
    m = nn.Sequential(nn.Tanh(), _bn(nn.BatchNorm1d(6)), nn.ReLU())
    check(m, torch.randn(*shape), tmp_path)


# --- pooling ------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [12, 13])
@pytest.mark.parametrize("pool", ["resnet-stem", "ceil", "ceil-padded", "same"])
def test_max_pool_padding_and_ceil_mode(pool, size, tmp_path):
    """No ReLU in front: negative maxima must survive the padding."""
    p = {"resnet-stem": nn.MaxPool2d(3, 2, padding=1), "ceil": nn.MaxPool2d(3, 2, ceil_mode=True),
         "ceil-padded": nn.MaxPool2d(2, 2, padding=1, ceil_mode=True), "same": nn.MaxPool2d(3, 1, padding=1)}[pool]
    check(Seq(p), torch.randn(1, 3, size, size), tmp_path)


def test_average_pool_excluding_padding_stays_builtin_in_int8(tmp_path):
    """count_include_pad=False divides border windows by fewer taps: TFLite's SAME pool, which XNNPACK takes in
    float only."""
    check(Seq(nn.AvgPool2d(3, 1, padding=1, count_include_pad=False)), X, tmp_path, partitions=2)


def test_max_pool_padding_keeps_negative_edges():
    m = nn.MaxPool2d(3, 2, padding=1).eval()
    x = -torch.rand(1, 2, 6, 6) - 1
    g = G.capture(m, (x,))
    from sdk.litert.lowering import lower
    from sdk.litert.reference import ReferenceInterpreter

    low = lower(g, None, target="arm-fp32")
    (y,) = ReferenceInterpreter(low.model).run([x.numpy().transpose(0, 2, 3, 1).copy()])
    assert np.allclose(y.transpose(0, 3, 1, 2), m(x).numpy())


@pytest.mark.parametrize("pool", ["avg2", "avg3-padded", "adaptive"])
def test_average_pool_is_one_partition_in_int8(pool, tmp_path):
    p = {"avg2": nn.AvgPool2d(2), "avg3-padded": nn.AvgPool2d(3, 1, padding=1),
         "adaptive": nn.AdaptiveAvgPool2d(3)}[pool]
    check(Seq(p), X, tmp_path)


# --- slicing ------------------------------------------------------------------------------


class Slices(nn.Module):
    def __init__(self, how):
        super().__init__()
        self.how = how
        self.conv = nn.Conv2d(3, 12, 1)

    def forward(self, x):
        y = self.conv(x)
        if self.how == "chunk":
            a, b = y.chunk(2, dim=1)
            return torch.cat([b, a * 0.5], 1)
        if self.how == "split":
            a, b, c = y.split([2, 4, 6], dim=1)
            return torch.cat([c, a * b[:, 2:]], 1)
        if self.how == "unbind":
            parts = y[:, :3].unbind(1)
            return parts[0] * parts[2]
        if self.how == "select":
            return y.select(1, 3)[:, 2:6] + y[:, 5, 2:6] + y[:, :, 2:10].narrow(2, 1, 4).mean(1)
        if self.how == "shuffle":       # ShuffleNet's channel shuffle
            n, c, h, w = y.shape
            return y.view(n, 3, c // 3, h, w).transpose(1, 2).contiguous().view(n, c, h, w)
        return y.flatten(2).unflatten(2, (6, 24))


@pytest.mark.parametrize("how", ["chunk", "split", "unbind", "select", "shuffle", "unflatten"])
def test_slicing_ops(how, tmp_path):
    check(Slices(how), X, tmp_path)


def test_chunk_becomes_slices():
    g = G.capture(Slices("chunk"), (X,))
    assert [n.op for n in g.nodes] == ["conv", "slice", "slice", "mul", "cat"]


def test_concatenation_of_many_inputs(tmp_path):
    class Dense(nn.Module):
        def __init__(self):
            super().__init__()
            self.convs = nn.ModuleList(nn.Conv2d(3, 2, 1) for _ in range(12))

        def forward(self, x):
            return torch.cat([torch.cat([x])] + [c(x) for c in self.convs], 1)

    check(Dense(), X, tmp_path)


# --- clamps -------------------------------------------------------------------------------


@pytest.mark.parametrize("bounds", [(-1.0, 1.0), (0.0, 1.0), (-2.0, 3.0), (0.0, 6.0), (None, 0.5), (-0.5, None)])
def test_clamps_fused_and_standalone(bounds, tmp_path):
    lo, hi = bounds

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = nn.Conv2d(3, 4, 3, padding=1)

        def forward(self, x):
            fused = torch.clamp(self.c(x), lo, hi) if lo is not None and hi is not None else \
                (torch.clamp_max(self.c(x), hi) if lo is None else torch.clamp_min(self.c(x), lo))
            standalone = F.hardtanh(torch.cat([x, x], 1)[:, :4], -1.0 if lo is None else lo, 1.0 if hi is None else hi)
            return fused + standalone

    check(M(), X, tmp_path)


def test_clamp_away_from_zero_runs_in_builtin_kernels(tmp_path):
    """clamp(0.5, 2) cannot be a saturation (its range excludes 0): int8 MAXIMUM/MINIMUM, builtin."""
    check(Seq(lambda t: torch.clamp(torch.cat([t, t], 1), 0.5, 2.0)), X, tmp_path, partitions=2, min_sqnr=20)


# --- hardswish networks -------------------------------------------------------------------


class SqueezeExcite(nn.Module):
    """MobileNetV3's block: hardswish, SE with hardsigmoid gate, residual."""

    def __init__(self, c=8):
        super().__init__()
        self.dw = nn.Conv2d(c, c, 3, padding=1, groups=c)
        self.fc1, self.fc2 = nn.Conv2d(c, 4, 1), nn.Conv2d(4, c, 1)

    def forward(self, x):
        y = F.hardswish(self.dw(x))
        s = F.hardsigmoid(self.fc2(F.relu(self.fc1(y.mean((2, 3), keepdim=True)))))
        return x + y * s


def test_hardswish_and_se_block_in_one_partition(tmp_path):
    check(Seq(SqueezeExcite()), X, tmp_path)


# --- what cannot be packed ----------------------------------------------------------------


def test_every_refused_node_is_listed(tmp_path):
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Conv2d(3, 4, 3)

        def forward(self, x):
            y = torch.cumsum(self.body(x), 1)
            return torch.cumsum(y, 2)[:, :, ::2].flatten(1).sort(1).values

    with pytest.raises(UnsupportedOpError) as exc:
        sdk.deploy(Odd(), "arm-int8", (X,), calibration=batches(X, 2, 0), output=tmp_path / "o", progress=False)
    e = exc.value
    assert e.op == "aten.cumsum.default" and e.target == "arm-int8"
    assert [r.op for r in e.refused] == ["aten.cumsum.default", "aten.cumsum.default", "slice", "aten.sort.default"]
    text = str(e)
    assert "4 nodes" in text and "cumsum_1" in text and "step other than 1" in text and "sort" in text
    assert not (tmp_path / "o").exists()


def test_degenerate_ranges_load_without_xnnpack(tmp_path):
    """A near-constant activation (range 1e-12) once gave scale 4e-15: TFLite refused the model."""

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = nn.Conv2d(3, 4, 3, padding=1)
            self.d = nn.Conv2d(4, 4, 1)
            with torch.no_grad():
                self.d.weight.mul_(1e-12)
                self.d.bias.zero_()

        def forward(self, x):
            return F.relu6(self.d(F.relu(self.c(x))))

    check(Tiny(), X, tmp_path, min_sqnr=None)     # the output is ~1e-12: int8 rounds it to 0


def test_fp16_gpu_lowers_the_new_ops_and_its_torch_translation_agrees(tmp_path):
    """fp16-gpu shares the lowering: float SLICE, MAXIMUM/MINIMUM, RELU_N1_TO_1, replicated-edge max pool and
    stand-alone BN; the cuda runner's torch translation (here on the CPU, float32) equals the reference."""
    from sdk.litert.reference import ReferenceInterpreter
    from targets.fp16_gpu.cuda import TorchLiteRT

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.c, self.bn = nn.Conv2d(3, 8, 3, padding=1), _bn(nn.BatchNorm2d(4))

        def forward(self, x):
            a, b = F.max_pool2d(self.c(x), 3, 2, padding=1).chunk(2, 1)
            return torch.cat([F.hardtanh(a), torch.clamp(self.bn(b), 0.2, 0.5)], 1)

    m = M().eval()
    art = sdk.deploy(m, "fp16-gpu", (X,), calibration=batches(X, 2, 0), output=tmp_path / "f16", progress=False)
    data = art.file("model.tflite").read_bytes()
    stored = to_stored(art.manifest["inputs"][0], X.numpy())
    (want,) = ReferenceInterpreter(data).run([stored])
    (got,) = TorchLiteRT(data, device="cpu", dtype=torch.float32).run([stored])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        np.testing.assert_allclose(art.run(X, runner="fp16")[0], m(X).numpy(), atol=2e-2)
