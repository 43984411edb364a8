"""Binary-popcount kernels against PyTorch fp32 on this CPU, one thread each.

Figures of the README's performance table:

* binary GEMM, M = N = K = 1024 (bits), against ``torch.mm`` in fp32;
* binary 3x3 conv, 256 -> 256 channels, 14x14, stride 1, padding 1, timed
  from float NHWC activations to float output (bitpack + conv + alpha
  scaling), against ``torch.nn.functional.conv2d`` in fp32 (NCHW);
* the same conv bit-serial, 2-bit weights x 2-bit activations (and 1 x 2),
  as a generated model from float NCHW input (activation planes included).

"Effective MACs/s" counts one binary multiply-accumulate per bit, the same
count as the float op it replaces.  The two sides are timed alternately in
one loop so drifting clocks and neighbours hit both alike; medians are
reported.  Usage: ``python benchmarks/bench_binary.py [--repeats N] [--out FILE]``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from targets.binary_popcount import build, packing  # noqa: E402


def side_by_side(binary, baseline, repeats: int) -> tuple[float, float]:
    """Median seconds of ``binary()`` and ``baseline()``, timed alternately."""
    binary(), baseline()  # warm caches and lazy initialisation
    tb, tf = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        binary()
        tb.append(time.perf_counter() - start)
        start = time.perf_counter()
        baseline()
        tf.append(time.perf_counter() - start)
    return statistics.median(tb), statistics.median(tf)


def bench_gemm(lib: build.KernelLibrary, n: int, repeats: int) -> dict:
    rng = np.random.default_rng(0)
    a = packing.pack_bits(rng.standard_normal((n, n)))
    b = packing.pack_bits(rng.standard_normal((n, n)))
    out = np.empty((n, n), dtype=np.int32)
    fa, fb, fout = torch.randn(n, n), torch.randn(n, n), torch.empty(n, n)
    tb, tf = side_by_side(lambda: lib.bgemm(a, b, n, out=out),
                          lambda: torch.mm(fa, fb, out=fout), repeats)
    macs = n ** 3
    return {"shape": [n, n, n], "binary_ms": tb * 1e3, "torch_fp32_ms": tf * 1e3,
            "binary_gmacs_per_s": macs / tb / 1e9, "torch_fp32_gmacs_per_s": macs / tf / 1e9,
            "speedup": tf / tb}


def bench_conv(lib: build.KernelLibrary, channels: int, size: int, repeats: int) -> dict:
    rng = np.random.default_rng(1)
    x = rng.standard_normal((1, size, size, channels)).astype(np.float32)  # NHWC
    w = rng.standard_normal((channels, channels, 3, 3)).astype(np.float32)
    wp, alpha = packing.pack_conv_weight(w), packing.channel_scales(w)
    xp = lib.bitpack(x)
    acc = np.empty((1, size, size, channels), dtype=np.int32)
    y = np.empty((1, size, size, channels), dtype=np.float32)

    def binary():
        lib.bitpack(x, out=xp)
        lib.bconv2d(xp, channels, wp, 1, 1, out=acc)
        lib.scale(acc, alpha, out=y)

    xt = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
    wt = torch.from_numpy(w)
    tb, tf = side_by_side(binary, lambda: torch.nn.functional.conv2d(xt, wt, padding=1), repeats)
    macs = size * size * channels * channels * 9
    return {"shape": {"in_channels": channels, "out_channels": channels, "hw": [size, size],
                      "kernel": 3, "stride": 1, "padding": 1},
            "includes": "float NHWC -> bitpack -> binary conv -> alpha scale (3 ctypes calls)",
            "binary_us": tb * 1e6, "torch_fp32_us": tf * 1e6,
            "binary_gmacs_per_s": macs / tb / 1e9, "torch_fp32_gmacs_per_s": macs / tf / 1e9,
            "speedup": tf / tb}


def bench_bitserial(channels: int, size: int, weight_bits: int, act_bits: int, repeats: int) -> dict:
    """A generated two-layer model: float NCHW input -> k-bit activation planes -> bit-serial 3x3 conv
    -> float NHWC output, one ``edgepack_model_run`` call, against torch's fp32 conv."""
    from targets.binary_popcount import specs as sp

    rng = np.random.default_rng(2)
    n = 2 ** weight_bits - 1
    w = ((2 * rng.integers(0, n + 1, (channels, channels, 3, 3)) - n) / n).astype(np.float32)
    specs = [sp.InputSpec((1, channels, size, size)),
             sp.BitPlanes(np.array([float(2 ** act_bits - 1)], np.float32), act_bits),
             sp.BitSerialConv.from_planes(*packing.weight_planes(w), stride=1, padding=1)]
    model = build.compile_model(specs)
    x = rng.uniform(0, 1, (1, channels, size, size)).astype(np.float32)
    xt, wt = torch.from_numpy(x), torch.from_numpy(w)
    tb, tf = side_by_side(lambda: model.run(x), lambda: torch.nn.functional.conv2d(xt, wt, padding=1), repeats)
    macs = size * size * channels * channels * 9
    return {"shape": {"in_channels": channels, "out_channels": channels, "hw": [size, size], "kernel": 3,
                      "stride": 1, "padding": 1},
            "weight_bits": weight_bits, "activation_bits": act_bits,
            "includes": "float NCHW -> NHWC -> k-bit planes -> bit-serial conv (one binary conv of every "
                        "plane pair + integer combine) -> alpha scale, one generated-model call",
            "bitserial_us": tb * 1e6, "torch_fp32_us": tf * 1e6,
            "bitserial_gmacs_per_s": macs / tb / 1e9, "torch_fp32_gmacs_per_s": macs / tf / 1e9,
            "speedup": tf / tb}


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    args = parser.parse_args(argv)

    torch.set_num_threads(1)
    lib = build.load_kernels()
    result = {
        "benchmark": "binary_popcount",
        "threads": {"binary": 1, "torch": torch.get_num_threads()},
        "cpu": cpu_name(), "kernel_isa": lib.isa, "torch": torch.__version__,
        "repeats": args.repeats, "statistic": "median",
        "gemm": bench_gemm(lib, 1024, args.repeats),
        "conv3x3": bench_conv(lib, 256, 14, args.repeats * 5),
        "bitserial_conv3x3_w2a2": bench_bitserial(256, 14, 2, 2, args.repeats * 5),
        "bitserial_conv3x3_w1a2": bench_bitserial(256, 14, 1, 2, args.repeats * 5),
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return result


if __name__ == "__main__":
    main()
