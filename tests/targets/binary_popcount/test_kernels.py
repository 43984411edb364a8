"""Binary-popcount target: packing, numpy reference, C kernels and generated models.

Layers of checks: the numpy reference against float torch on +-1 tensors
(independent exact integers), then the compiled C kernels (every vector path
this machine can build) against the reference bit for bit, then a generated
network against ``run_reference``.  The network uses dyadic values (small
multiples of powers of two) so that every float op before a Sign is exact in
float32 and both implementations binarize identical values whatever their
summation order.
"""

from __future__ import annotations

import inspect
import platform
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from sdk.errors import ConfigError, RunnerError, ToolchainError
from targets.binary_popcount import build, packing
from targets.binary_popcount import reference as ref
from targets.binary_popcount import specs as sp

X86 = platform.machine().lower() in ("x86_64", "amd64")
SIMDE_NEON = Path("/usr/include/simde/arm/neon.h")


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("edgepack_kernels")


def _variants():
    """Builds of the kernel library that exercise different vector paths."""
    yield pytest.param({}, id="native")
    yield pytest.param({"march": None}, id="baseline")  # portable on x86, NEON on AArch64
    if X86:
        yield pytest.param({"march": "x86-64-v3"}, id="avx2")
        # NEON path compiled on x86 through SIMDe's NEON emulation headers
        yield pytest.param({"march": "x86-64-v2", "neon_shim": True}, id="neon-simde",
                           marks=pytest.mark.skipif(not SIMDE_NEON.exists(),
                                                    reason="apt-get install libsimde-dev"))


@pytest.fixture(scope="session", params=list(_variants()))
def kernels(request, cache_dir, tmp_path_factory):
    opts = dict(request.param)
    flags = list(build.DEFAULT_FLAGS)
    neon_shim = opts.pop("neon_shim", False)
    if neon_shim:
        shim = tmp_path_factory.mktemp("neon_shim")
        # simde must not see the fake target macros, the kernels must
        (shim / "arm_neon.h").write_text(
            "#undef __ARM_NEON\n#undef __aarch64__\n#define SIMDE_ENABLE_NATIVE_ALIASES\n"
            "#include <simde/arm/neon.h>\n#define __ARM_NEON 1\n#define __aarch64__ 1\n")
        flags += [f"-I{shim}", "-D__ARM_NEON=1", "-D__aarch64__=1"]
    lib = build.load_kernels(cache_dir=cache_dir, flags=flags, **opts)
    if neon_shim:
        assert lib.isa == "neon"
    return lib


def pm1(rng, *shape):
    return rng.choice(np.array([-1.0, 1.0], dtype=np.float32), size=shape)


# --------------------------------------------------------------------------- packing


@pytest.mark.parametrize("n", [1, 63, 64, 65, 130, 200])
@pytest.mark.parametrize("axis", [0, -1])
def test_pack_unpack_round_trip(n, axis):
    rng = np.random.default_rng(n)
    shape = (n, 3) if axis == 0 else (2, 3, n)
    x = rng.standard_normal(shape).astype(np.float32)
    packed = packing.pack_bits(x, axis=axis)
    assert packed.dtype == np.uint64 and packed.shape[axis] == -(-n // 64)
    np.testing.assert_array_equal(packing.unpack_bits(packed, n, axis=axis), packing.binarize(x))
    np.testing.assert_array_equal(packing.unpack_bits(packed, n, axis=axis, dtype=bool), x < 0)
    np.testing.assert_array_equal(packing.pack_bits(x < 0, axis=axis), packed)


def test_bit_order_and_padding():
    x = np.ones(70, dtype=np.float32)
    x[[0, 3, 65]] = -1.0
    x[5] = 0.0  # zero and -0.0 are +1
    x[6] = -0.0
    assert packing.pack_bits(x).tolist() == [0b1001, 0b10]
    assert packing.packed_nbytes((8, 70, 3, 3), axis=1) == 8 * 9 * 2 * 8
    w = np.random.default_rng(0).standard_normal((5, 70, 3, 3))
    pw = packing.pack_conv_weight(w)
    assert pw.shape == (5, 3, 3, 2)
    np.testing.assert_array_equal(pw[:, 1, 2], packing.pack_bits(w[:, :, 1, 2]))
    np.testing.assert_allclose(packing.channel_scales(w), np.abs(w).mean(axis=(1, 2, 3)), rtol=1e-6)


# --------------------------------------------------------------------------- reference vs torch


@pytest.mark.parametrize("m,n,k", [(7, 5, 1), (16, 9, 64), (13, 11, 100), (4, 33, 300)])
def test_reference_gemm_is_the_pm1_dot_product(m, n, k):
    rng = np.random.default_rng(k)
    a, b = pm1(rng, m, k), pm1(rng, n, k)
    got = ref.binary_gemm(packing.pack_bits(a), packing.pack_bits(b), k)
    np.testing.assert_array_equal(got, (a.astype(np.int64) @ b.T.astype(np.int64)))


CONV_CASES = [(3, 1, 1), (3, 2, 1), (1, 1, 0), (1, 2, 0), (3, 1, 0), (5, 2, 2)]


@pytest.mark.parametrize("k,stride,pad", CONV_CASES)
@pytest.mark.parametrize("channels", [3, 64, 70])
def test_reference_conv_equals_torch_zero_padded_conv(k, stride, pad, channels):
    rng = np.random.default_rng(channels * 100 + k * 10 + stride)
    x = pm1(rng, 2, channels, 9, 8)
    w = pm1(rng, 6, channels, k, k)
    expected = torch.nn.functional.conv2d(torch.from_numpy(x).double(), torch.from_numpy(w).double(),
                                          stride=stride, padding=pad).numpy()
    got = ref.binary_conv2d(ref.sign_pack(x.transpose(0, 2, 3, 1)), packing.pack_conv_weight(w),
                            channels, stride, pad)
    np.testing.assert_array_equal(got.transpose(0, 3, 1, 2), expected)


# --------------------------------------------------------------------------- C kernels vs reference


@pytest.mark.parametrize("m,n,k", [(1, 1, 1), (5, 7, 100), (64, 64, 64), (33, 70, 1000),
                                   (17, 130, 64 * 37 + 5), (100, 3, 129)])
def test_kernel_gemm_bit_exact(kernels, m, n, k):
    rng = np.random.default_rng(m * n + k)
    a = packing.pack_bits(rng.standard_normal((m, k)))
    b = packing.pack_bits(rng.standard_normal((n, k)))
    np.testing.assert_array_equal(kernels.bgemm(a, b, k), ref.binary_gemm(a, b, k))


def test_kernel_bitpack_bit_exact(kernels):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((3, 5, 7, 150)).astype(np.float32)
    x[0, 0, 0, :6] = [0.0, -0.0, np.nan, -np.inf, np.inf, -1e-38]
    thr = rng.standard_normal(150).astype(np.float32)
    np.testing.assert_array_equal(kernels.bitpack(x), ref.sign_pack(x))
    np.testing.assert_array_equal(kernels.bitpack(x, thr), ref.sign_pack(x, thr))


@pytest.mark.parametrize("k,stride,pad", CONV_CASES)
@pytest.mark.parametrize("channels,out_channels", [(64, 64), (70, 13), (200, 72)])
def test_kernel_conv_bit_exact(kernels, k, stride, pad, channels, out_channels):
    rng = np.random.default_rng(channels + k + stride)
    x = kernels.bitpack(rng.standard_normal((2, 11, 9, channels)).astype(np.float32))
    w = packing.pack_conv_weight(rng.standard_normal((out_channels, channels, k, k)))
    np.testing.assert_array_equal(kernels.bconv2d(x, channels, w, stride, pad),
                                  ref.binary_conv2d(x, w, channels, stride, pad))


def test_kernel_scale(kernels):
    acc = np.arange(-12, 12, dtype=np.int32).reshape(2, 3, 4)
    alpha = np.array([0.5, 1.5, -2.0, 0.25], dtype=np.float32)
    np.testing.assert_array_equal(kernels.scale(acc, alpha), acc * alpha)


#: (batch, h, w, channels, outputs, kernel, stride, pad) of the bwn conv tests: outputs that fill whole
#: bytes and NEON vectors, and ones that leave a tail
BWN_CONVS = [(2, 7, 6, 5, 13, 3, 2, 1), (1, 4, 4, 64, 128, 3, 1, 1), (1, 5, 5, 3, 8, 1, 1, 0), (2, 6, 6, 9, 3, 3, 1, 0)]


def _torch_bwn(x_nhwc, weight, alpha, bias, stride=1, pad=0):
    """float64 torch of alpha * (x conv sign(W)) + bias, NHWC; a 2-D x is a linear."""
    s = torch.from_numpy(np.where(weight < 0, -1.0, 1.0))
    x = torch.from_numpy(x_nhwc.astype(np.float64))
    y = (torch.nn.functional.conv2d(x.permute(0, 3, 1, 2), s, None, stride, pad).permute(0, 2, 3, 1)
         if x.ndim == 4 else x @ s.T)
    y = y * torch.from_numpy(alpha.astype(np.float64))
    return (y if bias is None else y + torch.from_numpy(bias.astype(np.float64))).numpy()


@pytest.mark.parametrize("n,h,w,c,o,k,stride,pad", BWN_CONVS)
@pytest.mark.parametrize("with_bias", [True, False])
def test_kernel_bwn_conv_matches_reference_and_torch(kernels, n, h, w, c, o, k, stride, pad, with_bias):
    rng = np.random.default_rng(n * h * c * o + with_bias)
    x = rng.standard_normal((n, h, w, c)).astype(np.float32)
    weight = rng.standard_normal((o, c, k, k))
    spec = sp.BwnConv.from_float(weight, bias=rng.standard_normal(o) if with_bias else None, stride=stride,
                                 padding=pad)
    assert spec.weight.shape == (k, k, c, -(-o // 8)) and spec.weight.dtype == np.uint8
    got = kernels.bwn_conv2d(x, spec.weight, spec.alpha, spec.bias, stride, pad)
    want = ref.bwn_conv2d(x, spec.weight, spec.alpha, spec.bias, stride, pad)
    np.testing.assert_array_equal(got, want)          # one summation order, every vector path
    exact = _torch_bwn(x, weight, spec.alpha, spec.bias, stride, pad)
    assert np.abs(got - exact).max() <= 1e-5 * np.abs(exact).max()


@pytest.mark.parametrize("n,f,o", [(3, 70, 9), (1, 512, 64), (2, 1, 17)])
def test_kernel_bwn_linear_matches_reference_and_torch(kernels, n, f, o):
    rng = np.random.default_rng(n + f + o)
    x = rng.standard_normal((n, f)).astype(np.float32)
    weight = rng.standard_normal((o, f))
    spec = sp.BwnLinear.from_float(weight, bias=rng.standard_normal(o))
    got = kernels.bwn_linear(x, spec.weight, spec.alpha, spec.bias)
    np.testing.assert_array_equal(got, ref.bwn_linear(x, spec.weight, spec.alpha, spec.bias))
    exact = _torch_bwn(x, weight, spec.alpha, spec.bias)
    assert np.abs(got - exact).max() <= 1e-5 * np.abs(exact).max()


def test_bwn_signs_are_one_bit_per_weight_along_the_outputs():
    w = np.ones((10, 3))
    w[9, 2] = w[0, 0] = -2.0
    packed = packing.pack_output_signs(w)
    assert packed.shape == (3, 2) and packed.dtype == np.uint8
    assert packed.tolist() == [[1, 0], [0, 0], [0, 2]]        # bit o % 8 of byte o // 8; high bits 0
    np.testing.assert_array_equal(packing.unpack_output_signs(packed, 10), np.where(w.T < 0, -1, 1))
    with pytest.raises(ConfigError, match="bytes of signs"):
        sp.BwnLinear(packed, np.ones(17, np.float32))
    with pytest.raises(ConfigError, match="bias must have 10"):
        sp.BwnLinear(packed, np.ones(10, np.float32), np.ones(3, np.float32))
    with pytest.raises(ConfigError, match="float input"):
        sp.infer_shapes([sp.InputSpec((1, 3)), sp.Sign(), sp.BwnLinear(packed, np.ones(10, np.float32))])
    with pytest.raises(ConfigError, match="channels"):
        sp.infer_shapes([sp.InputSpec((1, 4)), sp.BwnLinear(packed, np.ones(10, np.float32))])
    row = sp.layer_profile([sp.InputSpec((2, 3)), sp.BwnLinear(packed, np.ones(10, np.float32))])[1]
    assert row["param_bytes"] == 6 + 40 and row["macs"] == 2 * 10 * 3 and row["bops"] == 0


def test_generated_network_with_bwn_layers_matches_reference(cache_dir):
    rng = np.random.default_rng(3)
    specs = [sp.InputSpec((2, 5, 9, 9)),
             sp.BwnConv.from_float(rng.standard_normal((24, 5, 3, 3)), bias=rng.standard_normal(24), padding=1),
             sp.ReLU(),
             sp.BwnConv.from_float(rng.standard_normal((13, 24, 3, 3)), stride=2, padding=1),
             sp.Flatten(),
             sp.BwnLinear.from_float(rng.standard_normal((10, 13 * 25)), bias=rng.standard_normal(10)),
             sp.Sign(), sp.BinaryLinear.from_float(rng.standard_normal((6, 10)))]
    model = build.compile_model(specs, cache_dir=cache_dir)
    x = rng.standard_normal((2, 5, 9, 9)).astype(np.float32)
    out, (acc,) = model.run_debug(x)
    ref_out, (ref_acc,) = ref.run_reference(specs, x)
    np.testing.assert_array_equal(out, ref_out)         # same order in C and numpy: bit for bit
    np.testing.assert_array_equal(acc, ref_acc)


#: (lo, hi) of the clamp kernel tests: hardtanh, ReLU6, one-sided clamps, a point, and lo > hi (torch: all hi)
CLAMP_BOUNDS = [(-1.0, 1.0), (0.0, 6.0), (-np.inf, 0.5), (0.0, np.inf), (-np.inf, np.inf), (3.0, 3.0), (2.0, 1.0)]


def clamp_edges(lo, hi):
    """The bounds, the floats next to them, zeros, infinities, NaNs, then a random fill: 203 floats,
    so the NEON path runs whole vectors and a 3-float tail."""
    near = [v for b in map(np.float32, (lo, hi)) if np.isfinite(b)
            for v in (b, np.nextafter(b, np.float32(-np.inf)), np.nextafter(b, np.float32(np.inf)))]
    edge = np.array(near + [0.0, -0.0, np.inf, -np.inf, np.nan, -np.nan, 1e-45, -1e-45, 3.4e38, -3.4e38], np.float32)
    fill = np.random.default_rng(0).standard_normal(203 - edge.size).astype(np.float32) * 4
    return np.concatenate([edge, fill])


@pytest.mark.parametrize("lo,hi", CLAMP_BOUNDS)
def test_kernel_clamp_equals_numpy_and_torch_on_edge_values(kernels, lo, hi):
    x = clamp_edges(lo, hi)
    got, want = kernels.clamp(x, lo, hi), ref.clamp(x, lo, hi)
    # NaN stays NaN (every path, as torch.clamp); exactly lo / hi are kept; +0.0 and -0.0 compare equal
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(x))
    np.testing.assert_array_equal(got, torch.clamp(torch.from_numpy(x), lo, hi).numpy())
    assert got.dtype == np.float32 and (np.nanmin(got) >= min(lo, hi)) and (np.nanmax(got) <= hi)
    if lo <= hi:
        inside = (x >= lo) & (x <= hi)
        assert np.array_equal(got[inside], x[inside])          # a value on a bound, or within, passes unchanged


def test_kernel_relu_keeps_nan_as_torch_and_the_reference_do(kernels):
    x = clamp_edges(0.0, np.inf)
    got = kernels.relu(x)
    np.testing.assert_array_equal(got, ref.relu(x))
    np.testing.assert_array_equal(got, torch.relu(torch.from_numpy(x)).numpy())
    assert np.isnan(got).sum() == 2


def test_clamp_spec_checks_its_bounds():
    assert sp.Clamp.between(-np.inf, 6).bounds.tolist() == [-np.inf, 6.0]
    for bad in ([np.nan, 1.0], [0.0, np.nan], [1.0], [0.0, 1.0, 2.0]):
        with pytest.raises(ConfigError, match=r"Clamp.bounds must be \[lo, hi\]"):
            sp.Clamp(np.array(bad, np.float32))
    with pytest.raises(ConfigError, match="needs a float input"):
        sp.infer_shapes([sp.InputSpec((1, 64)), sp.Sign(), sp.Clamp.between(-1, 1)])
    row = sp.layer_profile([sp.InputSpec((2, 5)), sp.Clamp.between(0, 6)])[1]
    assert row["op"] == "Clamp" and row["param_bytes"] == 8 and row["macs"] == row["bops"] == 0
    assert row["input_shape"] == row["output_shape"] == [2, 5]


# --------------------------------------------------------------------------- generated network


def dyadic(rng, shape, step=0.125, top=8):
    """Multiples of ``step`` in [-top*step, top*step]: exact in float32 sums."""
    return (rng.integers(-top, top + 1, size=shape) * step).astype(np.float32)


def network(rng):
    def sb(c):
        return sp.ScaleBias(rng.integers(1, 9, c) * 0.25, dyadic(rng, c))

    def bconv(cin, cout, k, stride, pad):
        w = rng.standard_normal((cout, cin, k, k))
        return sp.BinaryConv.from_float(w, alpha=rng.integers(1, 5, cout) * 0.125,
                                        stride=stride, padding=pad)

    return [
        sp.InputSpec((2, 3, 16, 16)),                                            # 0
        sp.FloatConv(dyadic(rng, (32, 3, 3, 3)), dyadic(rng, 32), 1, 1),         # 1
        sb(32),                                                                  # 2
        sp.Sign(),                                                               # 3
        bconv(32, 32, 3, 1, 1),                                                  # 4  binary 0
        sb(32),                                                                  # 5
        sp.Add(other=2),                                                         # 6  residual
        sp.MaxPool(2),                                                           # 7  8x8
        sp.Sign(threshold=dyadic(rng, 32)),                                      # 8  RSign
        bconv(32, 70, 3, 2, 1),                                                  # 9  binary 1, 4x4
        sp.PReLU(np.full(70, 0.25)),                                             # 10
        sp.Sign(),                                                               # 11
        bconv(70, 70, 1, 1, 0),                                                  # 12 binary 2
        sp.AvgPool(2),                                                           # 13 2x2
        sp.AvgPool(2, src=10),                                                   # 14 shortcut
        sp.Add(other=13),                                                        # 15
        sp.ReLU(),                                                               # 16
        sp.Flatten(),                                                            # 17 (2, 280)
        sp.Sign(threshold=dyadic(rng, 280)),                                     # 18
        sp.BinaryLinear.from_float(rng.standard_normal((40, 280)),
                                   alpha=rng.integers(1, 5, 40) * 0.125),        # 19 binary 3
        sb(40),                                                                  # 20
        sp.FloatLinear(rng.standard_normal((10, 40)), rng.standard_normal(10)),  # 21
        sp.GlobalAvgPool(src=16),                                                # 22
        sp.Flatten(),                                                            # 23
        sp.FloatLinear(rng.standard_normal((10, 70)) * 0.1),                     # 24
        sp.Add(other=21),                                                        # 25
        sp.Clamp.between(-2.0, 2.0),                                             # 26 hardtanh(-2, 2)
    ]


def test_generated_network_matches_reference(cache_dir):
    rng = np.random.default_rng(7)
    specs = network(rng)
    x = dyadic(rng, (2, 3, 16, 16), step=0.25)
    model = build.compile_model(specs, cache_dir=cache_dir)
    out, layers = model.run_debug(x)
    ref_out, ref_layers = ref.run_reference(specs, x)
    assert [a.shape for a in layers] == [(2, 16, 16, 32), (2, 4, 4, 70), (2, 4, 4, 70), (2, 40)]
    for got, want in zip(layers, ref_layers, strict=True):
        np.testing.assert_array_equal(got, want)
    assert out.shape == (2, 10)
    np.testing.assert_allclose(out, ref_out, rtol=1e-4, atol=1e-4 * np.abs(ref_out).max())
    np.testing.assert_array_equal(model.run(x), out)


def test_generated_network_with_4d_output_and_standalone_sources(cache_dir, tmp_path):
    rng = np.random.default_rng(11)
    specs = [sp.InputSpec((1, 5, 7, 6)), sp.Sign(),
             sp.BinaryConv.from_float(rng.standard_normal((9, 5, 3, 3)), stride=2, padding=1)]
    files = build.write_model(specs, tmp_path / "model")
    names = {p.name for p in files}
    assert {"model.c", "model.h", "weights.bin", "ep_kernels.h"} <= names
    lib = build.compile_library([p for p in files if p.suffix in (".c", ".h")], cache_dir=cache_dir)
    model = build.CompiledModel(lib, specs, (tmp_path / "model" / "weights.bin").read_bytes())
    x = rng.standard_normal((1, 5, 7, 6)).astype(np.float32)
    out, (acc,) = model.run_debug(x)
    ref_out, (ref_acc,) = ref.run_reference(specs, x)
    np.testing.assert_array_equal(acc, ref_acc)
    assert out.shape == (1, 9, 4, 3)
    np.testing.assert_allclose(out, ref_out, rtol=1e-6)


def test_model_refuses_foreign_weights(cache_dir):
    rng = np.random.default_rng(1)
    specs = [sp.InputSpec((1, 70)), sp.Sign(),
             sp.BinaryLinear.from_float(rng.standard_normal((4, 70)))]
    model = build.compile_model(specs, cache_dir=cache_dir)
    x = rng.standard_normal((1, 70)).astype(np.float32)
    model.run(x)
    model.weights[20] ^= 1  # corrupt the fingerprint
    with pytest.raises(RunnerError, match="weights.bin"):
        model.run(x)


def test_malformed_specs_are_config_errors():
    rng = np.random.default_rng(0)
    with pytest.raises(ConfigError, match="packed"):
        sp.infer_shapes([sp.InputSpec((1, 64, 4, 4)),
                         sp.BinaryConv.from_float(rng.standard_normal((8, 64, 3, 3)))])
    with pytest.raises(ConfigError, match="channels"):
        sp.infer_shapes([sp.InputSpec((1, 3, 4, 4)), sp.FloatConv(np.zeros((8, 4, 3, 3)))])
    with pytest.raises(ConfigError, match="earlier"):
        sp.infer_shapes([sp.InputSpec((1, 3, 4, 4)), sp.Add(other=5)])


def test_every_layer_kind_is_in_the_table():
    def concrete(cls):
        for sub in cls.__subclasses__():
            yield from concrete(sub)
            if not inspect.isabstract(sub):
                yield sub

    assert set(concrete(sp.LayerSpec)) == set(sp.LAYER_KINDS.values())


def test_layer_profile_counts_bops_and_bytes():
    rng = np.random.default_rng(0)
    specs = [sp.InputSpec((1, 64, 8, 8)), sp.Sign(),
             sp.BinaryConv.from_float(rng.standard_normal((32, 64, 3, 3)), padding=1)]
    row = sp.layer_profile(specs)[2]
    assert row["bops"] == 8 * 8 * 32 * 64 * 9 and row["macs"] == 0
    assert row["param_bytes"] == 32 * 9 * 8 + 32 * 4


# --------------------------------------------------------------------------- toolchain


def test_missing_compiler_is_toolchain_error(monkeypatch, cache_dir):
    monkeypatch.setenv("CC", "/nonexistent/bin/edgepack-no-such-cc")
    with pytest.raises(ToolchainError, match="apt-get install gcc"):
        build.compile_library(build.kernel_sources(), cache_dir=cache_dir)


@pytest.mark.skipif(shutil.which("aarch64-linux-gnu-gcc") is not None, reason="cross gcc installed")
def test_missing_cross_compiler_names_its_package():
    with pytest.raises(ToolchainError, match="apt-get install gcc-aarch64-linux-gnu"):
        build.find_compiler("aarch64-linux-gnu-gcc")


def test_compile_failure_carries_compiler_stderr(tmp_path, cache_dir):
    bad = tmp_path / "bad.c"
    bad.write_text("int broken(void) { return undeclared_identifier; }\n")
    with pytest.raises(build.CompileError, match="undeclared_identifier") as info:
        build.compile_library([bad], cache_dir=cache_dir)
    assert isinstance(info.value, ToolchainError)
    assert not list(Path(cache_dir).glob("*.tmp"))


def test_build_is_cached(cache_dir):
    first = build.build_shared_object(build.kernel_sources(), cache_dir=cache_dir)
    stamp = first.stat().st_mtime_ns
    assert build.build_shared_object(build.kernel_sources(), cache_dir=cache_dir) == first
    assert first.stat().st_mtime_ns == stamp
