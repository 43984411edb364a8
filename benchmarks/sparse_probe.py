"""Does XNNPACK's sparse-inference path (NCHW + SpMM, Elsen et al. 2020) ever run in this LiteRT wheel?

XNNPACK rewrites a float subgraph to NCHW and runs its 1x1 convolutions as
sparse-matrix x dense-matrix products when (a) the delegate passes
``XNN_FLAG_HINT_SPARSE_INFERENCE`` (the TFLite delegate does so for a partition
that consumes a DENSIFY'd sparse constant), (b) ``xnn_is_chw_compatible_config``
holds (on x86: the CPU has *no AVX*), (c) the subgraph has an NCHW-compatible
cluster that starts at a 3x3 stride-2 conv on 3 channels with padding 1 and ends
at a global mean / average pool, and (d) more than 2/3 of the cluster's 1x1 weights
are zero.  This script builds each variant twice (weights sparse behind DENSIFY,
and a dense twin with the same values), times them side by side in one process
(alternating invokes, medians), compares outputs and reads XNNPACK's own
once-initialised kernel configs out of the loaded library to see whether any
NCHW/SpMM kernel was ever set up.

Modes of every conv variant:

* ``native``: the shipped runtime, unmodified, on this CPU.
* ``gate_lifted``: the same runtime in-process, with the AVX bit of XNNPACK's
  ``hardware_config.arch_flags`` cleared only while the sparse model is created
  (its dense twin is created first, so every dense kernel config stays the AVX2/FMA
  one).  Not a shipped configuration: it measures what the AVX gate forgoes and
  shows which graph forms the NCHW rewrite accepts.
* ``qemu_nehalem`` (full run only): the unmodified runtime under
  ``qemu-x86_64 -cpu Nehalem`` (an x86 CPU without AVX), to show the real gate
  opens there.  Times are emulated and only the engagement columns mean anything.

Second part: TFLite's builtin sparse FULLY_CONNECTED kernels (float random / 1x4
blocks, int8 1x16 blocks) on an MLP 784-1024-1024-10, against dense fp32 / int8 in
XNNPACK, batch 1, 1 thread.

Usage: ``python benchmarks/sparse_probe.py [--quick] [--out FILE]`` (full study: ~6 minutes, writes
``benchmarks/results/sparse_probe.json``; ``--quick``: small models, 5 variants, under a minute, writes a
temporary file unless ``--out`` is given).  Findings: ``benchmarks/results/sparse_probe.md``.
(``--worker SPEC`` is the internal per-variant entry point).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "benchmarks" / "results" / "sparse_probe.json"
LIB_NAME = "libpywrap_litert_common.so"   # the library the Python Interpreter links (XNNPACK with symbols)

# XNNPACK statics read from the loaded library (local symbols; addresses from nm)
_DATA_SYMBOLS = ("hardware_config", "f32_spmm_config", "f32_spmm2_config", "f32_spmm4_config",
                 "f32_spmm_guard", "f32_spmm2_guard", "f32_spmm4_guard",
                 "f32_dwconv2d_chw_config", "f32_conv_hwc2chw_3x3c3s2_config")
XNN_ARCH_X86_AVX = 1 << 4        # src/xnnpack/hardware-config.h: enum xnn_arch_flags
ARCH_FLAGS_OFFSET = 8            # struct xnn_hardware_config { enum xnn_uarch uarch[1]; uint64_t arch_flags; ...}


# --------------------------------------------------------------------------- library introspection

def litert_lib() -> Path:
    import ai_edge_litert
    return Path(ai_edge_litert.__file__).resolve().parent / LIB_NAME


def read_symbols(lib: Path) -> dict:
    """name -> offset for the XNNPACK statics and every NCHW/SpMM micro-kernel (``nm`` of the .so)."""
    out = subprocess.run(["nm", str(lib)], capture_output=True, text=True, check=True).stdout
    data, funcs = {}, {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) != 3:
            continue
        addr, kind, name = parts
        if name in _DATA_SYMBOLS:
            data[name] = int(addr, 16)
        elif kind in "tT" and re.search(r"spmm|dwconv2d_chw|conv_hwc2chw|subgraph_rewrite_for_nchw|"
                                        r"check_nchw_compatibility|subgraph_optimize$", name):
            funcs[name] = int(addr, 16)
    return {"data": data, "funcs": funcs}


def binary_facts(lib: Path, syms: dict) -> dict:
    """What the shipped XNNPACK contains: SpMM/NCHW kernels, log strings, the AVX gate before the rewrite."""
    facts: dict = {"library": str(lib.relative_to(ROOT)) if lib.is_relative_to(ROOT) else str(lib)}
    funcs = syms["funcs"]
    facts["spmm_ukernels"] = sorted(n for n in funcs if "spmm_minmax_ukernel" in n)
    facts["chw_ukernels"] = sorted(n for n in funcs if "ukernel" in n and ("chw" in n) and "spmm" not in n)
    facts["f16_spmm_ukernels"] = sorted(n for n in funcs if n.startswith("xnn_f16_spmm"))
    facts["has_rewrite_for_nchw"] = "xnn_subgraph_rewrite_for_nchw" in funcs
    blob = lib.read_bytes()
    facts["log_string_switched_to_sparse"] = b"switched to sparse inference mode" in blob
    facts["log_string_incompatible_with_sparse"] = b"incompatible with sparse inference" in blob
    # an xnn_log_error() string: absent means XNNPACK was built with XNN_LOG_LEVEL 0 (no xnn_log_* output at all)
    facts["xnnpack_error_log_strings_present"] = b"TensorFlow SAME padding can't be combined" in blob
    facts["delegate_log_strings_present"] = b"failed to create XNNPACK runtime" in blob  # TFLite's own, for contrast
    # the call site: xnn_subgraph_optimize -> xnn_subgraph_rewrite_for_nchw, and what guards it
    start = funcs.get("xnn_subgraph_optimize")
    target = funcs.get("xnn_subgraph_rewrite_for_nchw")
    if start and target and shutil.which("objdump"):
        dis = subprocess.run(["objdump", "-d", "--no-show-raw-insn", f"--start-address={start:#x}",
                              f"--stop-address={start + 0x400:#x}", str(lib)],
                             capture_output=True, text=True).stdout.splitlines()
        for i, line in enumerate(dis):
            if "call" in line and f"{target:x} <xnn_subgraph_rewrite_for_nchw>" in line:
                window = [re.sub(r"\s+", " ", x.strip()) for x in dis[max(0, i - 6): i + 1]]
                facts["rewrite_call_site"] = window
                facts["rewrite_gated_on_sparse_hint"] = any("test $0x1,%bl" in x for x in window)
                facts["rewrite_gated_on_avx_bit"] = any(re.search(r"testb \$0x10,0x8\(%r\w+\)", x) for x in window)
                break
    return facts


class XnnState:
    """Reads (and for the gate-lifted mode, flips) XNNPACK statics of the loaded library."""

    def __init__(self, syms: dict):
        self.syms = syms
        self.base = None
        from ai_edge_litert import interpreter  # noqa: F401 - maps the library
        for line in open("/proc/self/maps"):
            f = line.split()
            if len(f) >= 6 and f[5].endswith(LIB_NAME) and int(f[2], 16) == 0:
                self.base = int(f[0].split("-")[0], 16)
                break
        if self.base is None:
            raise RuntimeError(f"{LIB_NAME} is not mapped")
        self.by_addr = {self.base + off: name for name, off in syms["funcs"].items()}

    def _addr(self, name):
        return self.base + self.syms["data"][name]

    def arch_flags(self) -> int:
        return ctypes.c_uint64.from_address(self._addr("hardware_config") + ARCH_FLAGS_OFFSET).value

    def set_avx(self, on: bool):
        cell = ctypes.c_uint64.from_address(self._addr("hardware_config") + ARCH_FLAGS_OFFSET)
        cell.value = (cell.value | XNN_ARCH_X86_AVX) if on else (cell.value & ~XNN_ARCH_X86_AVX)

    def _ukernel(self, name):
        if name not in self.syms["data"]:
            return None
        ptr = ctypes.c_uint64.from_address(self._addr(name)).value
        return None if ptr == 0 else self.by_addr.get(ptr, hex(ptr))

    def snapshot(self) -> dict:
        """Micro-kernels the NCHW configs were initialised with (None: never set up in this process)."""
        return {"spmm_1x1": self._ukernel("f32_spmm_config"),
                "spmm_2ch_blocks": self._ukernel("f32_spmm2_config"),
                "spmm_4ch_blocks": self._ukernel("f32_spmm4_config"),
                "dwconv_chw_3x3": self._ukernel("f32_dwconv2d_chw_config"),
                "stem_conv_hwc2chw": self._ukernel("f32_conv_hwc2chw_3x3c3s2_config"),
                "avx_bit": bool(self.arch_flags() & XNN_ARCH_X86_AVX)}


# --------------------------------------------------------------------------- model building

BLOCKS = ((1, 64), (2, 128), (1, 128), (2, 256), (1, 256), (2, 512), (1, 512))   # (dw stride, 1x1 out channels)
QUICK_BLOCKS = ((1, 64), (2, 128), (1, 128), (2, 256), (1, 256))
CHAIN = (128, 128, 256, 256)    # plain 1x1 chain on a 33x33x64 input


def prune_mask(rng, o: int, i: int, frac: float, pattern: str) -> np.ndarray:
    """Keep-mask [O, I] with exactly round(frac * blocks) zero blocks."""
    bo, bi = {"random": (1, 1), "1x4": (1, 4), "4x1": (4, 1), "2x1": (2, 1), "1x16": (1, 16)}[pattern]
    go, gi = o // bo, i // bi
    n = go * gi
    keep = np.ones(n, bool)
    keep[rng.permutation(n)[: int(round(frac * n))]] = False
    return np.kron(keep.reshape(go, gi), np.ones((bo, bi), bool)).astype(bool)


def encode_block_o(w: np.ndarray, block: int):
    """Sparsity for an OHWI filter [O,1,1,I] in (block x 1) blocks along O: dims O/b, H, W dense, I CSR, block dense."""
    from ai_edge_litert import schema_py_generated as fb
    o, h, wd, i = w.shape
    blocks = w.reshape(o // block, block, h, wd, i).transpose(0, 2, 3, 4, 1)     # [O/b, H, W, I, b]
    keep = blocks.any(axis=4).reshape(-1, i)                                     # [(O/b)*H*W, I]
    values = blocks.reshape(-1, i, block)[keep].reshape(-1)
    segments = np.concatenate([[0], np.cumsum(keep.sum(axis=1))])
    indices = np.nonzero(keep)[1]

    def vec(values_):
        v = fb.Int32VectorT() if max(values_, default=0) > 65535 else fb.Uint16VectorT()
        v.values = [int(x) for x in values_]
        return (fb.SparseIndexVector.Int32Vector if isinstance(v, fb.Int32VectorT)
                else fb.SparseIndexVector.Uint16Vector), v

    sp = fb.SparsityParametersT()
    sp.traversalOrder = [0, 1, 2, 3, 4]
    sp.blockMap = [0]
    dims = []
    for size in (o // block, h, wd):
        m = fb.DimensionMetadataT()
        m.format, m.denseSize = fb.DimensionType.DENSE, int(size)
        dims.append(m)
    csr = fb.DimensionMetadataT()
    csr.format = fb.DimensionType.SPARSE_CSR
    csr.arraySegmentsType, csr.arraySegments = vec(segments)
    csr.arrayIndicesType, csr.arrayIndices = vec(indices)
    dims.append(csr)
    m = fb.DimensionMetadataT()
    m.format, m.denseSize = fb.DimensionType.DENSE, int(block)
    dims.append(m)
    sp.dimMetadata = dims
    return values.astype(w.dtype), sp


class Net:
    """Small helper over ModelBuilder for float NHWC graphs."""

    def __init__(self, spec: dict, sparse: bool):
        from sdk.litert.flatbuffer import ModelBuilder
        self.b = ModelBuilder(description="sparse_probe")
        self.spec, self.sparse, self.n = spec, sparse, 0

    def name(self, p):
        self.n += 1
        return f"{p}_{self.n}"

    def act(self, shape, dtype="float32"):
        return self.b.add_tensor(self.name("t"), shape, dtype)

    def const(self, arr, dtype="float32"):
        arr = np.asarray(arr)
        return self.b.add_tensor(self.name("c"), arr.shape, dtype, data=arr)

    def weight(self, w: np.ndarray, stored_sparse: bool):
        """A filter input: plain constant, or sparse constant -> DENSIFY (-> DEQUANTIZE for fp16)."""
        from sdk.litert import sparse as sp_mod
        half = self.spec.get("dtype") == "fp16"
        dt = "float16" if half else "float32"
        w = w.astype(np.float16 if half else np.float32)
        if not stored_sparse:
            t = self.const(w, dt)
        else:
            storage = self.spec.get("storage", "csr")
            if storage == "csr_blockO4":
                values, sp = encode_block_o(w, 4)
            else:
                values, sp = sp_mod.encode(w, 4 if storage == "csr_1x4" else 1)
            src = self.b.add_tensor(self.name("sp"), w.shape, dt, data=values, sparsity=sp)
            t = self.act(w.shape, dt)
            self.b.add_op("DENSIFY", [src], [t])
        if half:
            f = self.act(w.shape)
            self.b.add_op("DEQUANTIZE", [t], [f])
            t = f
        return t

    def pad(self, x, shape, p):
        h, w = shape[1] + 2 * p, shape[2] + 2 * p
        y = self.act((1, h, w, shape[3]))
        self.b.add_op("PAD", [x, self.const(np.array([[0, 0], [p, p], [p, p], [0, 0]], np.int32), "int32")], [y])
        return y, (1, h, w, shape[3])


def out_size(n, k, s, padding):
    return (n + s - 1) // s if padding == "SAME" else (n - k) // s + 1


def build_conv_model(spec: dict, sparse: bool, seed: int = 0) -> tuple[bytes, dict]:
    """A MobileNet-style (or plain 1x1-chain) float model; ``sparse`` stores the pruned 1x1 weights via DENSIFY."""
    rng = np.random.default_rng(seed)
    net = Net(spec, sparse)
    b = net.b
    frac, pattern = spec.get("zero_frac", 0.9), spec.get("pattern", "random")
    storage = spec.get("storage", "csr")
    stem = spec.get("stem", "pad")
    hw = spec.get("input_hw", 129)
    zeros = params = 0
    if stem == "none":
        shape = (1, 33, 33, 64)
        x = net.act(shape)
        inp = x
        plan = [(None, c) for c in CHAIN]
    else:
        cin = 4 if stem == "pad_c4" else 3
        shape = (1, hw, hw, cin)
        x = inp = net.act(shape)
        padding = "SAME" if stem == "same" else "VALID"
        if padding == "VALID":
            x, shape = net.pad(x, shape, 1)
        ho = out_size(shape[1], 3, 2, padding)
        y = net.act((1, ho, ho, 32))
        w = (rng.standard_normal((32, 3, 3, cin)) * np.sqrt(2 / 27)).astype(np.float32)
        b.add_op("CONV_2D", [x, net.weight(w, False), net.const(np.zeros(32, np.float32))], [y],
                 stride=2, padding=padding, activation="RELU6")
        x, shape = y, (1, ho, ho, 32)
        plan = list(QUICK_BLOCKS if spec.get("small") else BLOCKS)
    k = spec.get("dw_k", 3)
    first_sparse = True
    for dw_stride, cout in plan:
        c = shape[3]
        if dw_stride is not None:
            form = spec.get("dw_s2", "pad") if dw_stride == 2 else spec.get("dw_s1", "same")
            padding = "SAME" if form == "same" else "VALID"
            xin, sh = (x, shape) if padding == "SAME" else net.pad(x, shape, k // 2)
            ho = out_size(sh[1], k, dw_stride, padding)
            y = net.act((1, ho, ho, c))
            wdw = (rng.standard_normal((1, k, k, c)) * np.sqrt(2 / (k * k))).astype(np.float32)
            b.add_op("DEPTHWISE_CONV_2D", [xin, net.weight(wdw, False), net.const(np.zeros(c, np.float32))], [y],
                     stride=dw_stride, padding=padding, depth_multiplier=1, activation="RELU6")
            x, shape = y, (1, ho, ho, c)
        w = rng.standard_normal((cout, c)) * np.sqrt(2 / (c * (1 - frac) + 1e-9))
        w = (w * prune_mask(rng, cout, c, frac, pattern)).astype(np.float32).reshape(cout, 1, 1, c)
        zeros += int((w == 0).sum())
        params += w.size
        as_sparse = sparse and storage not in ("dense", "dummy") and (storage != "first_only" or first_sparse)
        first_sparse = False
        y = net.act((1, shape[1], shape[2], cout))
        b.add_op("CONV_2D", [x, net.weight(w, as_sparse), net.const(rng.standard_normal(cout).astype(np.float32) * .1)],
                 [y], stride=1, padding="SAME", activation="RELU6")
        x, shape = y, (1, shape[1], shape[2], cout)
    ending = spec.get("ending", "mean_keep")
    c = shape[3]
    if ending in ("mean_keep", "mean_nokeep", "mean_fc"):
        keep = ending == "mean_keep"
        y = net.act((1, 1, 1, c) if keep else (1, c))
        b.add_op("MEAN", [x, net.const(np.array([1, 2], np.int32), "int32")], [y], keep_dims=keep)
        x = y
        if ending == "mean_fc":
            y = net.act((1, 10))
            wfc = (rng.standard_normal((10, c)) / np.sqrt(c)).astype(np.float32)
            b.add_op("FULLY_CONNECTED", [x, net.const(wfc), net.const(np.zeros(10, np.float32))], [y])
            x = y
    elif ending == "avgpool":
        y = net.act((1, 1, 1, c))
        b.add_op("AVERAGE_POOL_2D", [x], [y], filter=(shape[1], shape[2]), stride=(1, 1), padding="VALID")
        x = y
    elif ending == "reshape_fc":
        flat = shape[1] * shape[2] * c
        r = net.act((1, flat))
        b.add_op("RESHAPE", [x, net.const(np.array([1, flat], np.int32), "int32")], [r], new_shape=[1, flat])
        y = net.act((1, 10))
        wfc = (rng.standard_normal((10, flat)) / np.sqrt(flat)).astype(np.float32)
        b.add_op("FULLY_CONNECTED", [r, net.const(wfc), net.const(np.zeros(10, np.float32))], [y])
        x = y
    elif ending != "none":
        raise ValueError(ending)
    if storage == "dummy":
        # dense-stored conv weights; the only sparse constant is a small bias added after the pool
        if ending not in ("mean_keep", "mean_nokeep"):
            raise ValueError("storage=dummy needs a MEAN ending")
        bshape = (1, 1, 1, c) if ending == "mean_keep" else (1, c)
        bias = rng.standard_normal(bshape).astype(np.float32)
        bias[..., ::2] = 0
        y = net.act(bshape)
        b.add_op("ADD", [x, net.weight(bias, sparse)], [y])
        x = y
    b.set_io(inputs=[inp], outputs=[x])
    return b.finish(), {"input_shape": list(inp.shape), "zeros_1x1": zeros, "params_1x1": params,
                        "zero_fraction_1x1": zeros / params}


# --------------------------------------------------------------------------- timing

def load(model: bytes, threads: int = 1, delegate: bool = True):
    from sdk.litert.runtime import load_interpreter
    return load_interpreter(model, num_threads=threads, delegate=delegate)


def invoke_out(interp, x):
    from sdk.litert.runtime import run
    return run(interp, [x])[0]


def side_by_side(interps: list, xs: list, runs: int, rounds: int = 1, warmup: int = 3):
    """Median ms of one invoke per interpreter, the interpreters invoked alternately (order rotated
    every step) for ``rounds`` x ``runs`` steps.  Returns (medians over all samples, per-round medians)."""
    for it, x in zip(interps, xs):
        invoke_out(it, x)
        for _ in range(warmup):
            it.invoke()
    k = len(interps)
    per_round = []
    allt = [[] for _ in interps]
    for _ in range(rounds):
        times = [[] for _ in interps]
        for r in range(runs):
            for j in range(k):
                i = (j + r) % k
                t0 = time.perf_counter()
                interps[i].invoke()
                times[i].append((time.perf_counter() - t0) * 1e3)
        per_round.append([statistics.median(t) for t in times])
        for a, t in zip(allt, times):
            a.extend(t)
    return [statistics.median(t) for t in allt], per_round


def summary(interp) -> dict:
    from sdk.litert.runtime import op_summary
    s = op_summary(interp)
    return {"partitions": s["delegate_nodes"], "delegated": dict(s["delegated"]), "builtin": dict(s["builtin"])}


def compare(a: np.ndarray, b: np.ndarray) -> dict:
    """Values compared flat; a differing output *shape* is reported on its own (XNNPACK's NCHW MEAN with
    keep_dims hands the output back as [1, C, 1, 1])."""
    out = {}
    if a.shape != b.shape:
        out["shape_mismatch"] = [list(a.shape), list(b.shape)]
    a64, b64 = a.astype(np.float64).reshape(-1), b.astype(np.float64).reshape(-1)
    if a64.size != b64.size:
        return {**out, "identical": False, "max_abs_diff": float("inf"), "max_rel_diff": float("inf")}
    diff = float(np.max(np.abs(a64 - b64))) if a64.size else 0.0
    scale = float(np.max(np.abs(b64))) or 1.0
    return {**out, "identical": bool(np.array_equal(a64, b64)) and a.shape == b.shape,
            "values_identical": bool(np.array_equal(a64, b64)), "max_abs_diff": diff, "max_rel_diff": diff / scale}


# --------------------------------------------------------------------------- workers

def conv_worker(spec: dict, mode: str, syms: dict, runs: int, rounds: int) -> dict:
    state = XnnState(syms) if syms else None
    threads = spec.get("threads", 1)
    dense_bytes, info = build_conv_model(spec, sparse=False)
    sparse_bytes, _ = build_conv_model(spec, sparse=True)
    rng = np.random.default_rng(1)
    x = rng.standard_normal(info["input_shape"]).astype(np.float32)
    dense = load(dense_bytes, threads)
    y_dense = invoke_out(dense, x)          # dense twin first: every dense kernel config is the normal one
    before = state.snapshot() if state else None
    if mode == "gate_lifted":
        state.set_avx(False)
    head = {"name": spec["name"], "mode": mode, "spec": spec, **info,
            "bytes_dense": len(dense_bytes), "bytes_sparse": len(sparse_bytes)}
    try:
        sp = load(sparse_bytes, threads)
        y_sparse = invoke_out(sp, x)
    except Exception as exc:  # noqa: BLE001 - a model the runtime refuses is a result
        after = state.snapshot() if state else None
        return {**head, "load_error": f"{type(exc).__name__}: {exc}", "nchw_kernels_after_sparse_load": after,
                "sparse_path_engaged": bool(after and after["spmm_1x1"] and not before["spmm_1x1"])}
    finally:
        if mode == "gate_lifted":
            state.set_avx(True)
    after = state.snapshot() if state else None
    (t_sparse, t_dense), per_round = side_by_side([sp, dense], [x, x], runs, rounds)
    ratios = sorted(a / b for a, b in per_round)
    engaged = bool(after and after["spmm_1x1"] and not before["spmm_1x1"])
    return {**head, "ops_sparse": summary(sp), "ops_dense": summary(dense),
            "ms_sparse": t_sparse, "ms_dense": t_dense,
            # the median of the per-round ratios: robust to the machine's load changing between rounds
            "ratio_sparse_over_dense": statistics.median(ratios), "round_ratios": ratios, "timing": {"runs_per_round": runs, "rounds": rounds},
            "outputs": compare(y_sparse, y_dense), "nchw_kernels_after_sparse_load": after,
            "sparse_path_engaged": engaged}


def quantize_sym(w: np.ndarray):
    s = np.maximum(np.abs(w).max(axis=1), 1e-8) / 127.0
    return np.clip(np.round(w / s[:, None]), -127, 127).astype(np.int8), s.astype(np.float32)


def build_mlp(layers, kind: str, storage: str) -> bytes:
    """784-1024-1024-10 MLP.  kind: fp32 | int8 | hybrid; storage: dense | direct (sparse filter on the FC) |
    densify (sparse constant -> DENSIFY -> FC)."""
    from sdk.litert import sparse as sp_mod
    from sdk.litert.flatbuffer import ModelBuilder
    b = ModelBuilder(description="sparse_probe_mlp")
    ws, bs, block, act_scales = layers["w"], layers["b"], layers["block"], layers["act_scales"]
    q = kind == "int8"
    if q:
        x = inp = b.add_tensor("x", (1, ws[0].shape[1]), "int8", scale=act_scales[0][0], zero_point=act_scales[0][1])
    else:
        x = inp = b.add_tensor("x", (1, ws[0].shape[1]), "float32")
    for li, (w, bias) in enumerate(zip(ws, bs)):
        last = li == len(ws) - 1
        if q or kind == "hybrid":
            wq, wsc = quantize_sym(w)
            per_channel = q
            if not per_channel:  # hybrid: per-tensor symmetric
                s = np.float32(np.abs(w).max() / 127.0)
                wq, wsc = np.clip(np.round(w / s), -127, 127).astype(np.int8), np.array([s], np.float32)
            kw = dict(scale=wsc, zero_point=0, axis=0)
            if storage == "direct":
                values, sp = sp_mod.encode(wq, block)
                wt = b.add_tensor(f"w{li}", w.shape, "int8", data=values, sparsity=sp, **kw)
            else:
                wt = b.add_tensor(f"w{li}", w.shape, "int8", data=wq, **kw)
            if q:
                in_scale = act_scales[li][0]
                bt = b.add_tensor(f"b{li}", bias.shape, "int32",
                                  data=np.round(bias / (in_scale * wsc)).astype(np.int32),
                                  scale=in_scale * wsc, zero_point=0, axis=0)
                os_, oz = act_scales[li + 1]
                y = b.add_tensor(f"y{li}", (1, w.shape[0]), "int8", scale=os_, zero_point=oz)
            else:
                bt = b.add_tensor(f"b{li}", bias.shape, "float32", data=bias)
                y = b.add_tensor(f"y{li}", (1, w.shape[0]), "float32")
        else:
            if storage == "direct":
                values, sp = sp_mod.encode(w, block)
                wt = b.add_tensor(f"w{li}", w.shape, "float32", data=values, sparsity=sp)
            elif storage == "densify":
                values, sp = sp_mod.encode(w, block)
                src = b.add_tensor(f"ws{li}", w.shape, "float32", data=values, sparsity=sp)
                wt = b.add_tensor(f"w{li}", w.shape, "float32")
                b.add_op("DENSIFY", [src], [wt])
            else:
                wt = b.add_tensor(f"w{li}", w.shape, "float32", data=w)
            bt = b.add_tensor(f"b{li}", bias.shape, "float32", data=bias)
            y = b.add_tensor(f"y{li}", (1, w.shape[0]), "float32")
        b.add_op("FULLY_CONNECTED", [x, wt, bt], [y], activation=None if last else "RELU")
        x = y
    b.set_io(inputs=[inp], outputs=[x])
    return b.finish()


def mlp_layers(rng, sizes, frac, pattern, block):
    ws, bs = [], []
    for fi, fo in zip(sizes[:-1], sizes[1:]):
        w = rng.standard_normal((fo, fi)) * np.sqrt(2 / (fi * (1 - frac)))
        w = (w * prune_mask(rng, fo, fi, frac, pattern)).astype(np.float32)
        ws.append(w)
        bs.append((rng.standard_normal(fo) * 0.1).astype(np.float32))
    return {"w": ws, "b": bs, "block": block}


def calibrate(layers, x: np.ndarray):
    """(scale, zero_point) of the input and of each FC output, from a float forward pass on ``x`` (batch)."""
    scales = [(float(np.abs(x).max() / 127.0), 0)]
    a = x
    for li, (w, bias) in enumerate(zip(layers["w"], layers["b"])):
        a = a @ w.T + bias
        last = li == len(layers["w"]) - 1
        if not last:
            a = np.maximum(a, 0)
            scales.append((float(a.max() / 255.0), -128))
        else:
            scales.append((float(np.abs(a).max() / 127.0), 0))
    return scales


def round_ratio(e: dict, base: dict) -> float:
    """Median over rounds of e's per-round median ms / base's (both timed alternately in the same rounds)."""
    if "ms_per_round" not in e or "ms_per_round" not in base:
        return float("nan")
    return statistics.median(a / b for a, b in zip(e["ms_per_round"], base["ms_per_round"]))


def fc_worker(runs: int, rounds: int, frac: float = 0.9, sizes=(784, 1024, 1024, 10)) -> dict:
    rng = np.random.default_rng(0)
    xcal = rng.standard_normal((64, sizes[0])).astype(np.float32)
    x = np.clip(rng.standard_normal((1, sizes[0])).astype(np.float32), -3, 3)
    variants = {}
    sets = {"random": mlp_layers(np.random.default_rng(1), sizes, frac, "random", 1),
            "1x4": mlp_layers(np.random.default_rng(2), sizes, frac, "1x4", 4),
            "1x16": mlp_layers(np.random.default_rng(3), sizes, frac, "1x16", 16)}
    for L in sets.values():
        L["act_scales"] = calibrate(L, np.concatenate([xcal, x]))
    plan = [  # name, layer set, kind, storage, delegate (False: BUILTIN_WITHOUT_DEFAULT_DELEGATES)
        ("fp32 dense [random zeros] XNNPACK", "random", "fp32", "dense", True),
        ("fp32 dense [random zeros] builtin", "random", "fp32", "dense", False),
        ("fp32 sparse-direct random CSR, default delegate", "random", "fp32", "direct", True),
        ("fp32 sparse-direct random CSR, builtin", "random", "fp32", "direct", False),
        ("fp32 DENSIFY random CSR -> XNNPACK", "random", "fp32", "densify", True),
        ("fp32 dense [1x4 zeros] XNNPACK", "1x4", "fp32", "dense", True),
        ("fp32 sparse-direct 1x4 blocks, default delegate", "1x4", "fp32", "direct", True),
        ("fp32 sparse-direct 1x4 blocks, builtin", "1x4", "fp32", "direct", False),
        ("int8 dense [1x16 zeros] XNNPACK", "1x16", "int8", "dense", True),
        ("int8 dense [1x16 zeros] builtin", "1x16", "int8", "dense", False),
        ("int8 sparse-direct 1x16 blocks, default delegate", "1x16", "int8", "direct", True),
        ("int8 sparse-direct 1x16 blocks, builtin", "1x16", "int8", "direct", False),
        ("hybrid int8-weight dense [1x16 zeros] XNNPACK", "1x16", "hybrid", "dense", True),
        ("hybrid int8-weight dense [1x16 zeros] builtin", "1x16", "hybrid", "dense", False),
        ("hybrid int8-weight sparse-direct 1x16, default delegate", "1x16", "hybrid", "direct", True),
        ("hybrid int8-weight sparse-direct 1x16, builtin", "1x16", "hybrid", "direct", False),
    ]
    loaded = []
    for name, key, kind, storage, delegate in plan:
        L = sets[key]
        entry = {"layers": key, "kind": kind, "storage": storage, "xnnpack_requested": delegate}
        try:
            model = build_mlp(L, kind, storage)
            entry["bytes"] = len(model)
            it = load(model, 1, delegate)
            if kind == "int8":
                s, z = L["act_scales"][0]
                xin = np.clip(np.round(x / s) + z, -128, 127).astype(np.int8)
            else:
                xin = x
            y = invoke_out(it, xin)
            if kind == "int8":
                s, z = L["act_scales"][-1]
                entry["output_dequantized"] = ((y.astype(np.float32) - z) * s).tolist()
            entry["ops"] = summary(it)
            entry["_y"] = y
            loaded.append((name, it, xin))
        except Exception as exc:  # noqa: BLE001 - a refused model is a result
            entry["error"] = f"{type(exc).__name__}: {exc}"
        variants[name] = entry
    times, per_round = side_by_side([it for _, it, _ in loaded], [xin for _, _, xin in loaded], runs, rounds)
    for j, ((name, _, _), t) in enumerate(zip(loaded, times)):
        variants[name]["ms"] = t
        variants[name]["ms_per_round"] = [r[j] for r in per_round]
    # float reference of each layer set
    refs = {}
    for key, L in sets.items():
        a = x
        for li, (w, bias) in enumerate(zip(L["w"], L["b"])):
            a = a @ w.T + bias
            if li < len(L["w"]) - 1:
                a = np.maximum(a, 0)
        refs[key] = a
    baseline = {"random": "fp32 dense [random zeros] XNNPACK", "1x4": "fp32 dense [1x4 zeros] XNNPACK",
                "1x16": "int8 dense [1x16 zeros] XNNPACK"}
    for name, e in variants.items():
        if "_y" not in e:
            continue
        base = variants[baseline[e["layers"]]]
        if e["kind"] == "hybrid":
            base = variants["hybrid int8-weight dense [1x16 zeros] XNNPACK"]
        if e["kind"] == "int8" and e["storage"] == "direct":
            e["vs_int8_dense_builtin"] = compare(e["_y"], variants["int8 dense [1x16 zeros] builtin"]["_y"])
        if e["kind"] == "hybrid" and e["storage"] == "direct":
            e["vs_hybrid_dense_builtin"] = compare(e["_y"], variants["hybrid int8-weight dense [1x16 zeros] builtin"]["_y"])
        if "_y" in base:
            e["vs_dense_twin"] = compare(e["_y"], base["_y"])
        if "ms" in e and "ms" in base:
            e["ratio_vs_dense_twin"] = round_ratio(e, base)
        if e["kind"] != "int8":
            e["vs_float_reference"] = compare(e["_y"].astype(np.float32), refs[e["layers"]].astype(np.float32))
        e["ms_vs_fp32_dense_xnnpack"] = round_ratio(e, variants["fp32 dense [random zeros] XNNPACK"])
    for e in variants.values():
        e.pop("_y", None)
    return {"sizes": list(sizes), "zero_frac": frac, "batch": 1, "threads": 1,
            "timing": {"runs_per_round": runs, "rounds": rounds}, "variants": variants}


# --------------------------------------------------------------------------- the study

def conv_variants(quick: bool) -> list[dict]:
    base = {"stem": "pad", "dw_s2": "pad", "dw_s1": "same", "ending": "mean_keep", "zero_frac": 0.9,
            "pattern": "random", "storage": "csr", "dtype": "fp32", "threads": 1}

    def v(name, **kw):
        return {**base, "name": name, **kw}

    earlier = v("earlier probe form: SAME stem + SAME dw s2, 95%", stem="same", dw_s2="same", zero_frac=0.95)
    recipe = v("recipe: PAD+VALID stem & dw s2, MEAN, 90% random")
    if quick:
        return [{**earlier, "small": True}, {**recipe, "small": True},
                {**v("PAD stem, SAME dw s2", dw_s2="same"), "small": True},
                {**v("dense weights + sparse bias ADD after MEAN keep_dims", storage="dummy"), "small": True},
                {**v("1x1 chain, no stem", stem="none"), "small": True}]
    return [
        earlier,
        v("earlier probe form at 85%", stem="same", dw_s2="same", zero_frac=0.85),
        recipe,
        # (1) NCHW compatibility of the convolutions
        v("SAME stem, PAD dw s2", stem="same"),
        v("PAD stem, SAME dw s2", dw_s2="same"),
        v("PAD stem/dw, dw s1 as PAD+VALID too", dw_s1="pad"),
        v("stem on 4 channels (PAD)", stem="pad_c4"),
        v("depthwise 5x5 (PAD)", dw_k=5),
        v("1x1 chain, no stem", stem="none"),
        # (2) ending
        v("ending MEAN keep_dims=false", ending="mean_nokeep"),
        v("ending MEAN + FC", ending="mean_fc"),
        v("ending AVERAGE_POOL_2D whole map", ending="avgpool"),
        v("ending RESHAPE + FC (no pool)", ending="reshape_fc"),
        v("no ending (feature map is the output)", ending="none"),
        # (3) threshold and zero layout
        v("zeros 50%", zero_frac=0.5),
        v("zeros 60% (< 2/3)", zero_frac=0.6),
        v("zeros 70% (> 2/3)", zero_frac=0.7),
        v("zeros 80%", zero_frac=0.8),
        v("zeros 95%", zero_frac=0.95),
        v("1x4 blocks along I, stored CSR 1x4", pattern="1x4", storage="csr_1x4"),
        v("4x1 blocks along O, stored O-blocked", pattern="4x1", storage="csr_blockO4"),
        v("2x1 blocks along O, stored CSR", pattern="2x1"),
        # (4) fp16 storage
        v("fp16 weights (sparse fp16 -> DENSIFY -> DEQUANTIZE)", dtype="fp16"),
        # (6) threads
        v("2 threads", threads=2),
        # (7) how the hint reaches XNNPACK
        v("only the first 1x1 stored sparse", storage="first_only"),
        v("dense weights + sparse bias ADD after MEAN (no keep_dims)", storage="dummy", ending="mean_nokeep"),
        v("dense weights + sparse bias ADD after MEAN keep_dims", storage="dummy"),
        v("no sparse storage at all (dense zeros)", storage="dense"),
    ]


def qemu_variants() -> list[str]:
    return ["recipe: PAD+VALID stem & dw s2, MEAN, 90% random",
            "earlier probe form: SAME stem + SAME dw s2, 95%",
            "PAD stem, SAME dw s2",
            "dense weights + sparse bias ADD after MEAN (no keep_dims)",
            "dense weights + sparse bias ADD after MEAN keep_dims",
            "no sparse storage at all (dense zeros)"]


def run_worker(args_list, timeout=900, qemu_cpu=None) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), *args_list]
    if qemu_cpu:
        cmd = ["qemu-x86_64", "-cpu", qemu_cpu, *cmd]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    if p.returncode:
        return {"error": f"worker exit {p.returncode}: {p.stderr.strip()[-800:]}"}
    return json.loads(p.stdout.strip().splitlines()[-1])


def fmt_eng(r):
    k = r.get("nchw_kernels_after_sparse_load") or {}
    if not r.get("sparse_path_engaged"):
        return "no"
    return f"yes ({k.get('spmm_1x1')})"


def ident(o: dict) -> str:
    """'yes' (bit-identical), 'no', with ' shape!' when the output shape differs."""
    return ("yes" if o.get("values_identical") else "no") + (" shape!" if "shape_mismatch" in o else "")


def spread(r) -> str:
    rr = r.get("round_ratios") or []
    return f"{rr[0]:.2f}-{rr[-1]:.2f}" if rr else ""


def print_conv_table(rows):
    print(f"{'mode':12} {'variant':58} {'deleg':>9} {'dense ms':>9} {'sparse ms':>9} {'ratio':>6} "
          f"{'rounds min-max':>14} {'identical':>10} {'maxdiff':>9}  engaged")
    for r in rows:
        if "error" in r:
            print(f"{r.get('mode', '?'):12} {r.get('name', '?')[:58]:58} ERROR {r['error'][:200]}")
            continue
        if "load_error" in r:
            print(f"{r['mode']:12} {r['name'][:58]:58} sparse model REFUSED: {r['load_error'][-90:]}  "
                  f"engaged={fmt_eng(r)}")
            continue
        o = r["ops_sparse"]
        deleg = f"{sum(o['delegated'].values())}/{sum(o['delegated'].values()) + sum(o['builtin'].values())}"
        print(f"{r['mode']:12} {r['name'][:58]:58} {deleg:>9} {r['ms_dense']:9.3f} {r['ms_sparse']:9.3f} "
              f"{r['ratio_sparse_over_dense']:6.3f} {spread(r):>14} {ident(r['outputs']):>10} "
              f"{r['outputs']['max_abs_diff']:9.2e}  {fmt_eng(r)}")


def print_fc_table(fc):
    print(f"\nMLP {'-'.join(map(str, fc['sizes']))}, {fc['zero_frac']:.0%} zeros, batch 1, 1 thread")
    print(f"{'variant':48} {'bytes':>9} {'ms':>8} {'x fp32dense':>11} {'builtin ops':>22} {'vs dense twin':>22}")
    for name, e in fc["variants"].items():
        if "error" in e:
            print(f"{name:48} ERROR {e['error'][:150]}")
            continue
        cmp_ = e.get("vs_dense_twin", {})
        c = "exact" if cmp_.get("identical") else f"maxdiff {cmp_.get('max_abs_diff', float('nan')):.2e}"
        print(f"{name:48} {e['bytes']:9d} {e.get('ms', float('nan')):8.4f} {e['ms_vs_fp32_dense_xnnpack']:11.3f} "
              f"{str(e['ops']['builtin']):>22} {c:>22}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="a subset, few runs (< 1 minute)")
    ap.add_argument("--out", default=None,
                    help=f"JSON path (default {RESULTS.relative_to(ROOT)}; --quick: a temporary file)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--mode", default="native", help=argparse.SUPPRESS)
    ap.add_argument("--syms", help=argparse.SUPPRESS)
    ap.add_argument("--runs", type=int, default=None, help="invokes per model per round")
    ap.add_argument("--rounds", type=int, default=None, help="rounds of alternating invokes")
    args = ap.parse_args()

    if args.worker:
        syms = json.loads(Path(args.syms).read_text()) if args.syms else None
        if args.worker == "fc":
            res = fc_worker(args.runs or 100, args.rounds or 5)
        else:
            res = conv_worker(json.loads(args.worker), args.mode, syms, args.runs or 30, args.rounds or 5)
        print(json.dumps(res))
        return 0

    t_start = time.time()
    quick = args.quick
    lib = litert_lib()
    syms = read_symbols(lib)
    facts = binary_facts(lib, syms)
    cpu_flags = set()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("flags"):
                cpu_flags = set(line.split(":")[1].split())
                break
    except OSError:
        pass
    import ai_edge_litert
    try:
        from importlib.metadata import version
        litert_version = version("ai-edge-litert")
    except Exception:  # noqa: BLE001
        litert_version = getattr(ai_edge_litert, "__version__", "?")
    env = {"litert": litert_version, "python": platform.python_version(), "machine": platform.machine(),
           "cpu": next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")),
                       "?"),
           "cpu_has_avx": "avx" in cpu_flags, "cpu_has_avx2": "avx2" in cpu_flags, "nproc": os.cpu_count()}
    print("binary:", json.dumps({k: v for k, v in facts.items() if k != "chw_ukernels"}, indent=1))

    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(syms, f)
        sym_path = f.name
    rows = []
    runs = args.runs or (10 if quick else 30)
    rounds = args.rounds or (4 if quick else 5)
    variants = conv_variants(quick)
    modes = ("native", "gate_lifted")
    for mode in modes:
        for spec in variants:
            r = run_worker(["--worker", json.dumps(spec), "--mode", mode, "--syms", sym_path, "--runs", str(runs),
                            "--rounds", str(rounds)])
            r.setdefault("name", spec["name"])
            r.setdefault("mode", mode)
            rows.append(r)
            print_conv_table([r])
    if not quick and shutil.which("qemu-x86_64"):
        by_name = {s["name"]: s for s in variants}
        for name in qemu_variants():
            r = run_worker(["--worker", json.dumps(by_name[name]), "--mode", "qemu_nehalem", "--syms", sym_path,
                            "--runs", "3", "--rounds", "1"], timeout=1800, qemu_cpu="Nehalem")
            r.setdefault("name", name)
            r["mode"] = "qemu_nehalem"
            rows.append(r)
            print_conv_table([r])
    fc = run_worker(["--worker", "fc", "--runs", str(30 if quick else 100), "--rounds", str(2 if quick else 5)])
    os.unlink(sym_path)

    print("\nconv variants (ratio: median over rounds of median sparse ms / median dense-twin ms, "
          "invoked alternately in one process):")
    print_conv_table(rows)
    if "error" in fc:
        print("FC part failed:", fc["error"])
    else:
        print_fc_table(fc)
    out = {"benchmark": "sparse_probe", "quick": quick, "env": env, "binary": facts,
           "conv_timing": {"runs_per_round": runs, "rounds": rounds}, "conv": rows, "fc": fc, "wall_s": round(time.time() - t_start, 1),
           "when": time.strftime("%Y-%m-%d %H:%M:%S")}
    if args.out:
        out_path = Path(args.out)
    elif quick:  # a quick run does not overwrite the full study's results
        out_path = Path(tempfile.gettempdir()) / "sparse_probe_quick.json"
    else:
        out_path = RESULTS
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(out, indent=1))
    print(f"\nwrote {out_path} ({out['wall_s']} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
