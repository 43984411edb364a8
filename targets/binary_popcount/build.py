"""Compile the C kernel library and generated models with the system compiler, and run them in-process.

:func:`compile_model` generates a network's C (:mod:`.emit`), compiles it with
the kernels and loads it as a :class:`CompiledModel`; :func:`write_model` writes
the same sources as a tree a firmware build can take; :func:`load_kernels`
wraps the kernel library alone for tests and benchmarks.

Shared objects are cached by the sha256 of everything that can change the
binary: every source and header, the flags, and the compiler's own description
of the compilation (``cc -###``), which carries its version and, for
``-march=native``, the CPU features it resolved to.  A cache directory shared
between machines therefore never hands one CPU a binary built for another.
Builds write to a temporary name and ``os.replace`` it into place, so
concurrent builders and interrupted builds never leave a torn file behind.

A shared object in the cache is code this process will run, so the cache is
keyed: the directory must belong to the user and be writable by no one else
(it is created 0700), it holds a random secret ``cache.key`` (0600), and every
``ep_<hash>.so`` has a sidecar ``ep_<hash>.so.hmac``, the HMAC-SHA256 under that
key of its name and bytes, written when edgepack built it.  A shared object
whose sidecar is missing or wrong (planted, edited, or from another key) is
never loaded: it is rebuilt from the sources.
"""

from __future__ import annotations

import ctypes
import hashlib
import hmac
import os
import re
import secrets
import shlex
import shutil
import stat
import subprocess
import tempfile
import threading
from collections.abc import Iterable, Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np

from sdk.errors import CompileError, RunnerError, ToolchainError

from .blob import write_weights_bin
from .emit import generate_sources
from .specs import LayerSpec, binary_output_shapes, infer_shapes, model_input

KERNEL_DIR = Path(__file__).resolve().parent / "kernels"
DEFAULT_FLAGS: tuple[str, ...] = ("-O3", "-std=c99")
_ALWAYS_FLAGS = ("-fPIC", "-shared")
_INSTALL_HINT = "install a C compiler, e.g. `apt-get install gcc` (or build-essential)"
_KEY_FILE = "cache.key"
_KEY_BYTES = 32
_MAC_SUFFIX = ".hmac"


def kernel_sources() -> list[Path]:
    """The kernel library's files (``.c`` and ``.h``), in a stable order."""
    return sorted(KERNEL_DIR.glob("ep_*.[ch]"))


def default_cache_dir() -> Path:
    """``$EDGEPACK_CACHE/kernels`` when set, else ``~/.cache/edgepack/kernels``."""
    root = os.environ.get("EDGEPACK_CACHE")
    return Path(root) / "kernels" if root else Path.home() / ".cache" / "edgepack" / "kernels"


def find_compiler(cc: str | None = None) -> list[str]:
    """The compiler command: ``cc`` if given, else ``$CC``, else the first of
    cc, gcc, clang on PATH.  Returned split (``$CC`` may be ``"ccache gcc"``).

    Raises ToolchainError, with the install command, when none can be run.
    """
    spec = cc if cc is not None else os.environ.get("CC")
    candidates = [spec] if spec else ["cc", "gcc", "clang"]
    for candidate in candidates:
        argv = shlex.split(candidate)
        if argv and shutil.which(argv[0]):
            return argv
    wanted = f"C compiler {spec!r}" if spec else "a C compiler (cc, gcc or clang)"
    cross = re.match(r"(?:.*/)?([\w.]+-linux-gnu\w*)-gcc$", shlex.split(spec)[0]) if spec else None
    hint = (f"install the cross compiler, e.g. `apt-get install gcc-{cross.group(1)}`"
            if cross else _INSTALL_HINT)
    raise ToolchainError(f"{wanted} was not found on PATH; {hint}")


@lru_cache(maxsize=32)
def _compiler_identity(argv: tuple[str, ...], flags: tuple[str, ...]) -> str:
    # -### prints the driver's resolved sub-commands (and its version line)
    # without compiling anything.
    try:
        proc = subprocess.run([*argv, *flags, "-###", "-E", "-x", "c", os.devnull],
                              capture_output=True, text=True, timeout=60)
    except OSError as exc:
        raise ToolchainError(f"cannot run {argv[0]!r}: {exc}; {_INSTALL_HINT}") from exc
    return proc.stdout + proc.stderr


def _split_sources(sources: Iterable[str | Path]) -> tuple[list[Path], list[Path]]:
    paths = [Path(s).resolve() for s in sources]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"C sources not found: {', '.join(missing)}")
    units = [p for p in paths if p.suffix == ".c"]
    if not units:
        raise ValueError("compile_library needs at least one .c source")
    return units, [p for p in paths if p.suffix != ".c"]


def build_shared_object(
    sources: Iterable[str | Path],
    *,
    cc: str | None = None,
    flags: Sequence[str] = DEFAULT_FLAGS,
    march: str | None = "native",
    cache_dir: str | Path | None = None,
) -> Path:
    """Compile ``sources`` into a cached shared object and return its path.

    ``.c`` files are compiled; other files (headers) are only hashed, and the
    directories of all files go on the include path.  ``march`` adds
    ``-march=...`` (None leaves it out, e.g. for a cross compiler configured
    by ``flags``).  Works with cross compilers (``cc="aarch64-linux-gnu-gcc"``,
    ``march="armv8.2-a"``); the result is then not loadable here.

    A cached object is reused only when its HMAC sidecar checks under the
    cache's key; anything else at its name is rebuilt over (see the module doc).

    Raises ToolchainError when no compiler is found or the cache directory is
    not private to this user, CompileError (a ToolchainError) with the
    compiler's stderr when compilation fails.
    """
    units, others = _split_sources(sources)
    argv = find_compiler(cc)
    all_flags = tuple(flags) + ((f"-march={march}",) if march else ()) + _ALWAYS_FLAGS
    include_dirs = sorted({str(p.parent) for p in units + others})

    digest = hashlib.sha256()
    digest.update(_compiler_identity(tuple(argv), all_flags).encode())
    digest.update("\0".join(all_flags).encode())
    for path in sorted(units + others, key=lambda p: p.name):
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    key = digest.hexdigest()[:32]

    out_dir = _private_dir(Path(cache_dir) if cache_dir is not None else default_cache_dir())
    mac_key = _mac_key(out_dir)
    target = out_dir / f"ep_{key}.so"
    if _signed(target, mac_key):
        return target
    fd, tmp_name = tempfile.mkstemp(prefix=f".ep_{key}.", suffix=".so.tmp", dir=out_dir)
    os.close(fd)
    fd, tmp_mac = tempfile.mkstemp(prefix=f".ep_{key}.", suffix=".hmac.tmp", dir=out_dir)
    os.close(fd)
    command = [*argv, *all_flags, *(f"-I{d}" for d in include_dirs),
               *map(str, units), "-o", tmp_name]
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            raise CompileError(command, proc.stderr)
        Path(tmp_mac).write_text(_mac(mac_key, target.name, Path(tmp_name).read_bytes()))
        os.replace(tmp_mac, _mac_path(target))
        os.replace(tmp_name, target)
    finally:
        for name in (tmp_name, tmp_mac):
            if os.path.exists(name):
                os.unlink(name)
    return target


def _private_dir(path: Path) -> Path:
    """``path``, created 0700 when missing, once it is known that only this user can
    write into it: otherwise anyone could plant the code the next load runs."""
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = path.stat()
    except OSError as exc:
        raise ToolchainError(f"cannot use the compile cache {path}: {exc.strerror or exc}; set "
                             "EDGEPACK_CACHE to a directory of your own") from None
    if st.st_uid != os.getuid():
        raise ToolchainError(f"the compile cache {path} belongs to uid {st.st_uid}, not to you (uid "
                             f"{os.getuid()}), so its shared objects are not yours to load; set EDGEPACK_CACHE "
                             "to a directory of your own")
    if st.st_mode & 0o022:
        raise ToolchainError(f"the compile cache {path} is writable by group or others (mode "
                             f"{stat.S_IMODE(st.st_mode):04o}), so anyone could plant a shared object there; run "
                             f"`chmod go-w {shlex.quote(str(path))}` or set EDGEPACK_CACHE to a private directory")
    return path


def _mac_key(cache: Path) -> bytes:
    """The cache's secret, made on first use."""
    path = cache / _KEY_FILE
    if not os.path.lexists(path):
        fd, tmp = tempfile.mkstemp(prefix=".key.", suffix=".tmp", dir=cache)   # mode 0600
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(secrets.token_bytes(_KEY_BYTES))
            # link, not replace: a process that raced us here may already sign with its key
            try:
                os.link(tmp, path)
            except FileExistsError:
                pass
        finally:
            os.unlink(tmp)
    try:
        st = os.lstat(path)
        key = path.read_bytes() if stat.S_ISREG(st.st_mode) else b""
    except OSError as exc:
        raise ToolchainError(f"cannot read the compile cache key {path}: {exc.strerror or exc}") from None
    if st.st_uid != os.getuid() or st.st_mode & 0o077 or len(key) != _KEY_BYTES:
        raise ToolchainError(f"the compile cache key {path} is not a {_KEY_BYTES}-byte file readable only by you; "
                             "delete it (edgepack makes a new one and rebuilds what it signed)")
    return key


def _mac_path(so: Path) -> Path:
    return so.with_name(so.name + _MAC_SUFFIX)


def _mac(key: bytes, name: str, data: bytes) -> str:
    # the name is signed too, so a genuine object cannot be renamed into another's place
    return hmac.new(key, name.encode() + b"\0" + data, hashlib.sha256).hexdigest()


def _signed(so: Path, key: bytes) -> bool:
    """True when ``so`` is a file this cache's key signed, as built."""
    try:
        data, tag = so.read_bytes(), _mac_path(so).read_bytes()
    except OSError:
        return False
    return hmac.compare_digest(tag, _mac(key, so.name, data).encode())


def compile_library(
    sources: Iterable[str | Path],
    *,
    cc: str | None = None,
    flags: Sequence[str] = DEFAULT_FLAGS,
    march: str | None = "native",
    cache_dir: str | Path | None = None,
) -> ctypes.CDLL:
    """Compile (or reuse from the cache, once its signature checks) ``sources`` and
    load the result with ctypes.  Same arguments and errors as
    :func:`build_shared_object`."""
    return ctypes.CDLL(str(build_shared_object(sources, cc=cc, flags=flags, march=march,
                                               cache_dir=cache_dir)))


def _ptr(array: np.ndarray) -> ctypes.c_void_p:
    return ctypes.c_void_p(array.ctypes.data)


def aligned_empty(nbytes: int, align: int = 64) -> np.ndarray:
    """A uint8 buffer of ``nbytes`` whose data pointer is ``align``-aligned."""
    raw = np.empty(nbytes + align, dtype=np.uint8)
    start = (-raw.ctypes.data) % align
    return raw[start:start + nbytes]


_SIGNATURES = {
    "ep_kernel_isa": (ctypes.c_char_p, []),
    "ep_bitpack_f32": (None, [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_void_p,
                              ctypes.c_void_p]),
    "ep_bgemm_workspace_bytes": (ctypes.c_size_t, [ctypes.c_int, ctypes.c_int]),
    "ep_bgemm": (None, [ctypes.c_int] * 4 + [ctypes.c_void_p] * 4),
    "ep_bconv2d_workspace_bytes": (ctypes.c_size_t, [ctypes.c_int] * 9),
    "ep_bconv2d": (None, [ctypes.c_void_p] + [ctypes.c_int] * 4 + [ctypes.c_void_p]
                   + [ctypes.c_int] * 5 + [ctypes.c_void_p] * 2),
    "ep_scale_i32_f32": (None, [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int,
                                ctypes.c_void_p, ctypes.c_void_p]),
    "ep_clamp_f32": (None, [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_float, ctypes.c_float, ctypes.c_void_p]),
    "ep_relu_f32": (None, [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]),
    "ep_bwn_conv2d_f32": (None, [ctypes.c_void_p] + [ctypes.c_int] * 4 + [ctypes.c_void_p] * 3
                          + [ctypes.c_int] * 5 + [ctypes.c_void_p]),
    "ep_bwn_linear_f32": (None, [ctypes.c_void_p, ctypes.c_int, ctypes.c_int] + [ctypes.c_void_p] * 3
                          + [ctypes.c_int, ctypes.c_void_p]),
}


class KernelLibrary:
    """The compiled kernel library with numpy-level wrappers of its binary
    kernels and of its clamp and ReLU (used by tests and benchmarks; generated models call the C
    functions directly).  Arrays follow the layouts of ``ep_kernels.h``.
    Safe to call from several threads: each has its own workspace."""

    def __init__(self, lib: ctypes.CDLL):
        self.lib = lib
        for name, (restype, argtypes) in _SIGNATURES.items():
            fn = getattr(lib, name)
            fn.restype, fn.argtypes = restype, argtypes
        self._local = threading.local()

    @property
    def isa(self) -> str:
        """The vector path compiled in: avx512-vpopcntdq, avx2, neon or portable."""
        return self.lib.ep_kernel_isa().decode()

    def _workspace(self, nbytes: int) -> np.ndarray:
        work = getattr(self._local, "work", None)
        if work is None or work.size < nbytes:
            work = self._local.work = aligned_empty(nbytes)
        return work

    def bitpack(self, x: np.ndarray, threshold: np.ndarray | None = None,
                out: np.ndarray | None = None) -> np.ndarray:
        """Sign-pack float32 ``x[..., C]`` into uint64 ``[..., ceil(C/64)]``."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        channels = x.shape[-1]
        rows = x.size // channels if channels else 0
        if out is None:
            out = np.empty(x.shape[:-1] + (-(-channels // 64),), dtype=np.uint64)
        thr = None if threshold is None else np.ascontiguousarray(threshold, dtype=np.float32)
        self.lib.ep_bitpack_f32(_ptr(x), rows, channels, None if thr is None else _ptr(thr), _ptr(out))
        return out

    def bgemm(self, a: np.ndarray, b: np.ndarray, k_bits: int,
              out: np.ndarray | None = None) -> np.ndarray:
        """int32 ``[M, N]`` = k_bits - 2*popcount(a[M, Kw] XOR b[N, Kw])."""
        a = np.ascontiguousarray(a, dtype=np.uint64)
        b = np.ascontiguousarray(b, dtype=np.uint64)
        (m, kw), n = a.shape, b.shape[0]
        if b.shape[1] != kw:
            raise ValueError(f"packed K mismatch: a has {kw} words, b has {b.shape[1]}")
        if out is None:
            out = np.empty((m, n), dtype=np.int32)
        work = self._workspace(self.lib.ep_bgemm_workspace_bytes(n, kw))
        self.lib.ep_bgemm(m, n, kw, k_bits, _ptr(a), _ptr(b), _ptr(out), _ptr(work))
        return out

    def bconv2d(self, x: np.ndarray, channels: int, weight: np.ndarray, stride: int = 1,
                padding: int = 0, out: np.ndarray | None = None) -> np.ndarray:
        """Binary conv of packed NHWC ``x [N, H, W, Cw]`` with packed weights
        ``[O, kh, kw, Cw]``; returns int32 NHWC ``[N, OH, OW, O]``."""
        x = np.ascontiguousarray(x, dtype=np.uint64)
        weight = np.ascontiguousarray(weight, dtype=np.uint64)
        n, h, w, cw = x.shape
        o, kh, kw, wcw = weight.shape
        if cw != wcw or cw != -(-channels // 64):
            raise ValueError(f"packed channel words differ: x {cw}, weight {wcw}, C={channels}")
        oh, ow = (h + 2 * padding - kh) // stride + 1, (w + 2 * padding - kw) // stride + 1
        if out is None:
            out = np.empty((n, oh, ow, o), dtype=np.int32)
        args = (n, h, w, channels, o, kh, kw, stride, padding)
        work = self._workspace(self.lib.ep_bconv2d_workspace_bytes(*args))
        self.lib.ep_bconv2d(_ptr(x), n, h, w, channels, _ptr(weight), o, kh, kw, stride,
                            padding, _ptr(out), _ptr(work))
        return out

    def scale(self, x: np.ndarray, alpha: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """float32 ``alpha[c] * x[..., c]`` of an int32 binary-layer result."""
        x = np.ascontiguousarray(x, dtype=np.int32)
        alpha = np.ascontiguousarray(alpha, dtype=np.float32)
        if out is None:
            out = np.empty(x.shape, dtype=np.float32)
        channels = x.shape[-1]
        self.lib.ep_scale_i32_f32(_ptr(x), x.size // channels, channels, _ptr(alpha), _ptr(out))
        return out

    def clamp(self, x: np.ndarray, lo: float, hi: float, out: np.ndarray | None = None) -> np.ndarray:
        """float32 ``min(max(x, lo), hi)`` elementwise (``ep_clamp_f32``; bounds rounded to float32)."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        if out is None:
            out = np.empty(x.shape, dtype=np.float32)
        self.lib.ep_clamp_f32(_ptr(x), x.size, float(np.float32(lo)), float(np.float32(hi)), _ptr(out))
        return out

    def bwn_conv2d(self, x: np.ndarray, signs: np.ndarray, alpha: np.ndarray, bias: np.ndarray | None = None,
                   stride: int = 1, padding: int = 0) -> np.ndarray:
        """float32 NHWC binary-weight conv of float ``x [N, H, W, C]`` with signs packed
        ``[k, k, C, ceil(O/8)]`` (``ep_bwn_conv2d_f32``); returns ``[N, OH, OW, O]``."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        signs = np.ascontiguousarray(signs, dtype=np.uint8)
        alpha = np.ascontiguousarray(alpha, dtype=np.float32)
        n, h, w, c = x.shape
        k, k2, wc, ob = signs.shape
        o = alpha.shape[0]
        if k != k2 or wc != c or ob != -(-o // 8):
            raise ValueError(f"signs {signs.shape} do not fit {c} channels and {o} outputs")
        bias = None if bias is None else np.ascontiguousarray(bias, dtype=np.float32)
        oh, ow = (h + 2 * padding - k) // stride + 1, (w + 2 * padding - k) // stride + 1
        out = np.empty((n, oh, ow, o), dtype=np.float32)
        self.lib.ep_bwn_conv2d_f32(_ptr(x), n, h, w, c, _ptr(signs), _ptr(alpha),
                                   None if bias is None else _ptr(bias), o, k, k, stride, padding, _ptr(out))
        return out

    def bwn_linear(self, x: np.ndarray, signs: np.ndarray, alpha: np.ndarray,
                   bias: np.ndarray | None = None) -> np.ndarray:
        """float32 ``[N, O]`` binary-weight linear of ``x [N, I]``, signs packed ``[I, ceil(O/8)]``."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        signs = np.ascontiguousarray(signs, dtype=np.uint8)
        alpha = np.ascontiguousarray(alpha, dtype=np.float32)
        (n, f), o = x.shape, alpha.shape[0]
        if signs.shape != (f, -(-o // 8)):
            raise ValueError(f"signs {signs.shape} do not fit {f} features and {o} outputs")
        bias = None if bias is None else np.ascontiguousarray(bias, dtype=np.float32)
        out = np.empty((n, o), dtype=np.float32)
        self.lib.ep_bwn_linear_f32(_ptr(x), n, f, _ptr(signs), _ptr(alpha), None if bias is None else _ptr(bias),
                                   o, _ptr(out))
        return out

    def relu(self, x: np.ndarray) -> np.ndarray:
        """float32 ``max(x, 0)`` elementwise (``ep_relu_f32``; NaN stays NaN)."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        out = np.empty(x.shape, dtype=np.float32)
        self.lib.ep_relu_f32(_ptr(x), x.size, _ptr(out))
        return out


def load_kernels(*, cc: str | None = None, flags: Sequence[str] = DEFAULT_FLAGS,
                 march: str | None = "native",
                 cache_dir: str | Path | None = None) -> KernelLibrary:
    """Compile the kernel library for this machine and wrap it."""
    return KernelLibrary(compile_library(kernel_sources(), cc=cc, flags=flags, march=march,
                                         cache_dir=cache_dir))


def write_model(specs: Sequence[LayerSpec], directory: str | Path) -> list[Path]:
    """Write a self-contained source tree: model.c, model.h, weights.bin and the
    kernel library files; returns the paths written."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model_c, model_h = generate_sources(specs)
    written = []
    for name, data in (("model.c", model_c.encode()), ("model.h", model_h.encode()),
                       ("weights.bin", write_weights_bin(specs))):
        (directory / name).write_bytes(data)
        written.append(directory / name)
    for src in kernel_sources():
        shutil.copyfile(src, directory / src.name)
        written.append(directory / src.name)
    return written


_ERRORS = {1: "out of memory",
           2: "weights.bin does not belong to this model (or the host is big endian)"}


class CompiledModel:
    """A generated model compiled for this machine and loaded with ctypes.

    One instance serves several threads at once: each call has its own input,
    output and debug buffers, the C model allocates its arena per call, and the
    weights are only read."""

    def __init__(self, lib: ctypes.CDLL, specs: Sequence[LayerSpec], weights: bytes):
        self.lib = lib
        self.infos = infer_shapes(specs)
        self.binary_shapes = binary_output_shapes(specs)
        for fn in (lib.edgepack_model_run, lib.edgepack_model_run_debug):
            fn.restype = ctypes.c_int
        lib.edgepack_model_run.argtypes = [ctypes.c_void_p] * 3
        lib.edgepack_model_run_debug.argtypes = [ctypes.c_void_p] * 4
        self.weights = aligned_empty(len(weights))
        self.weights[:] = np.frombuffer(weights, dtype=np.uint8)

    def _call(self, x: np.ndarray, debug: bool):
        x = model_input(x, self.infos[0].shape)
        out = np.empty(self.infos[-1].shape, dtype=np.float32)
        ptrs = [x.ctypes.data, out.ctypes.data, self.weights.ctypes.data]
        if debug:
            binary = np.empty(sum(int(np.prod(s)) for s in self.binary_shapes), dtype=np.int32)
            rc = self.lib.edgepack_model_run_debug(*ptrs, binary.ctypes.data)
        else:
            binary, rc = None, self.lib.edgepack_model_run(*ptrs)
        if rc:
            raise RunnerError(f"edgepack_model_run failed with code {rc}: "
                              f"{_ERRORS.get(rc, 'unknown error')}")
        return out, binary

    def run(self, x: np.ndarray) -> np.ndarray:
        """Output of the network for input ``x`` (float32, the InputSpec shape)."""
        return self._call(x, debug=False)[0]

    def run_debug(self, x: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
        """Output plus each binary layer's int32 result (NHWC, layer order)."""
        out, flat = self._call(x, debug=True)
        results, pos = [], 0
        for shape in self.binary_shapes:
            size = int(np.prod(shape))
            results.append(flat[pos:pos + size].reshape(shape))
            pos += size
        return out, results


def compile_model(specs: Sequence[LayerSpec], *, cc: str | None = None,
                  flags: Sequence[str] = DEFAULT_FLAGS, march: str | None = "native",
                  cache_dir: str | Path | None = None) -> CompiledModel:
    """Generate, compile (cached) and load ``specs`` as a :class:`CompiledModel`.

    >>> model = compile_model([InputSpec((1, 64)), Sign(), BinaryLinear.from_float(w)])   # doctest: +SKIP
    >>> model.run(np.ones((1, 64), np.float32)).shape                                   # doctest: +SKIP
    (1, 4)
    """
    model_c, model_h = generate_sources(specs)
    with tempfile.TemporaryDirectory(prefix="edgepack_model_") as tmp:
        (Path(tmp) / "model.c").write_text(model_c)
        (Path(tmp) / "model.h").write_text(model_h)
        lib = compile_library([Path(tmp) / "model.c", Path(tmp) / "model.h", *kernel_sources()],
                              cc=cc, flags=flags, march=march, cache_dir=cache_dir)
    return CompiledModel(lib, specs, write_weights_bin(specs))
