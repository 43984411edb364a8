"""The ARM64 emulator: an aarch64 Linux userland run by ``qemu-aarch64``.

``edgepack emulator install`` (or :func:`install`) builds, once, into
``$EDGEPACK_CACHE/aarch64`` (default ``~/.cache/edgepack/aarch64``):

``sysroot/``
    Debian 12 (bookworm) arm64 packages unpacked with ``dpkg-deb -x``:
    the C library, libstdc++ and CPython 3.11 with the shared libraries its
    standard library loads.  ``qemu-aarch64 -L sysroot`` resolves the
    dynamic loader and every library inside it.
``site/``
    aarch64 wheels from PyPI unzipped into one folder that goes on the
    emulated Python's ``sys.path``: numpy and ai-edge-litert (pinned to
    :data:`LITERT_VERSION`; later aarch64 builds crash under qemu-user 7.2)
    with their dependencies.
``stamp.json``
    what was installed; a current stamp makes :func:`install` return at once.

The Debian packages are fetched with the host's ``apt-get`` through a private
configuration (its own sources, index and cache under the build directory),
so the host's package state is not touched and root is not needed.  The
build happens in a temporary directory renamed into place at the end, under a
file lock, so an interrupted or concurrent install never leaves a half-built
emulator behind.

The emulated processes are started by :meth:`Emulator.python_command` /
:meth:`Emulator.command` with a clean environment and ``python -I -S``: they
see the sysroot, the site folder and the files they are given, nothing of the
host's Python.  :mod:`sdk.emulated_session` keeps one such process serving
one artifact (the sessions of the ``qemu-aarch64`` runners, :mod:`sdk.qemu`);
:func:`cross_compile` builds the aarch64 shared objects that C artifacts run as.

>>> from sdk import emulator
>>> emulator.status()["installed"]          # doctest: +SKIP
True
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any, Iterator, Sequence

from .errors import ToolchainError

__all__ = ["CROSS_FLAGS", "CROSS_MARCH", "Emulator", "INSTALL_COMMAND", "cache_dir", "cross_compile",
           "cross_compiler", "find", "install", "qemu_binary", "status", "unavailable"]

#: The command users are told to run when the emulator is missing.
INSTALL_COMMAND = "edgepack emulator install"

ARCH = "aarch64"
DEBIAN_ARCH = "arm64"
DEBIAN_SUITE = "bookworm"                 # Debian 12: CPython 3.11, glibc 2.36
PYTHON_VERSION = "3.11"
#: ai-edge-litert 2.3.0's aarch64 build segfaults at interpreter creation
#: under qemu-user 7.2 (any -cpu); 2.0.3 runs and is bit-exact with x86.
LITERT_VERSION = "2.0.3"
#: ai-edge-litert 2.0.3 needs numpy>=1.23.2 and runs with numpy 2 (the host's version).
NUMPY_VERSION = "2.4.6"
WHEELS = (f"ai-edge-litert=={LITERT_VERSION}", f"numpy=={NUMPY_VERSION}")
#: arm64 Debian packages unpacked into the sysroot: the interpreter and the
#: libraries its standard library and the wheels load.
DEBIAN_PACKAGES = (
    "libc6", "libgcc-s1", "libstdc++6",
    "python3.11-minimal", "libpython3.11-minimal", "libpython3.11-stdlib",
    "zlib1g", "libexpat1", "libssl3", "libffi8", "liblzma5", "libbz2-1.0", "libsqlite3-0",
    "libncursesw6", "libtinfo6", "libreadline8", "libuuid1", "libcrypt1", "libdb5.3",
)
#: manylinux tags an aarch64 glibc-2.36 system accepts.
PLATFORMS = ("manylinux2014_aarch64",) + tuple(f"manylinux_2_{v}_aarch64" for v in range(17, 37))
#: Bumped whenever the recipe above changes; a different stamp means "reinstall".
EMULATOR_VERSION = f"1:{DEBIAN_SUITE}:py{PYTHON_VERSION}:litert{LITERT_VERSION}:numpy{NUMPY_VERSION}"

STAMP = "stamp.json"
DEFAULT_MIRROR = "http://deb.debian.org/debian"
DEFAULT_SECURITY_MIRROR = "http://deb.debian.org/debian-security"
DEBIAN_KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"
#: CPU model qemu emulates (override with $EDGEPACK_QEMU_CPU or the runner's ``cpu``):
#: a Cortex-A76 (Raspberry Pi 5 class, ARMv8.2-A with dot product).
DEFAULT_CPU = "cortex-a76"
#: -march for cross-compiled C artifacts: baseline ARMv8-A, NEON included, runs on every ARM64 board.
CROSS_MARCH = "armv8-a"
CROSS_FLAGS = ("-O3", "-std=c99")

_TOOLS = {  # command -> Debian package that provides it
    "qemu-aarch64": "qemu-user",
    "apt-get": "apt",
    "dpkg-deb": "dpkg",
    "gpgv": "gpgv",
}


def cache_dir(cache: str | os.PathLike | None = None) -> Path:
    """Where the emulator lives: ``CACHE/aarch64`` for ``cache`` (or
    ``$EDGEPACK_CACHE``, else ``~/.cache/edgepack``)."""
    if cache is None:
        env = os.environ.get("EDGEPACK_CACHE")
        cache = Path(env) if env else Path.home() / ".cache" / "edgepack"
    return Path(cache).expanduser().absolute() / ARCH


def qemu_binary() -> str | None:
    """Path of ``qemu-aarch64`` (or ``qemu-aarch64-static``), ``None`` when neither is on PATH."""
    return shutil.which("qemu-aarch64") or shutil.which("qemu-aarch64-static")


def cross_compiler() -> str:
    """Path of the aarch64 cross C compiler; :class:`ToolchainError` naming the packages when missing."""
    cc = shutil.which("aarch64-linux-gnu-gcc")
    if cc is None:
        raise ToolchainError("cross-compiling for ARM64 needs aarch64-linux-gnu-gcc; install it with "
                             "`apt-get install gcc-aarch64-linux-gnu libc6-dev-arm64-cross`")
    return cc


def cross_compile(sources: Sequence[Path], output: Path, flags: Sequence[str] = CROSS_FLAGS,
                  march: str = CROSS_MARCH) -> Path:
    """Compile C ``sources`` (``.h`` files only add include directories) into an
    aarch64 shared object at ``output``, for the emulated Python to load.

    >>> cross_compile([src / "model.c", src / "model.h"], tmp / "model.so")   # doctest: +SKIP
    """
    cc = cross_compiler()
    units = [str(s) for s in sources if s.suffix == ".c"]
    includes = sorted({f"-I{s.parent}" for s in sources})
    argv = [cc, *flags, f"-march={march}", "-fPIC", "-shared", *includes, *units, "-o", str(output), "-lm"]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise ToolchainError(f"cross-compiling for aarch64 failed: {shlex.join(argv)}\n{proc.stderr.strip()}")
    return output


def _require(tool: str) -> str:
    path = qemu_binary() if tool == "qemu-aarch64" else shutil.which(tool)
    if path is None:
        raise ToolchainError(f"the ARM64 emulator needs `{tool}`, which is not on PATH; install it with "
                             f"`apt-get install {_TOOLS[tool]}` (Debian/Ubuntu)")
    return path


@dataclasses.dataclass(frozen=True)
class Emulator:
    """An installed emulator: where its pieces are and how to start programs in it."""

    root: Path
    qemu: str
    stamp: dict

    @property
    def sysroot(self) -> Path:
        return self.root / "sysroot"

    @property
    def site(self) -> Path:
        return self.root / "site"

    @property
    def python(self) -> Path:
        return self.sysroot / "usr" / "bin" / f"python{PYTHON_VERSION}"

    def command(self, argv: Sequence[str | os.PathLike], cpu: str | None = None) -> list[str]:
        """``qemu-aarch64 -L SYSROOT -cpu CPU argv...``: runs an aarch64 Linux program
        (dynamically linked against glibc: the sysroot provides the loader and libraries)."""
        cpu = cpu or os.environ.get("EDGEPACK_QEMU_CPU") or DEFAULT_CPU
        return [self.qemu, "-L", str(self.sysroot), "-cpu", cpu, *map(str, argv)]

    def python_command(self, *args: str | os.PathLike, cpu: str | None = None) -> list[str]:
        """The emulated ``python3.11 -I -S -B args...``: isolated from the environment, no
        ``site`` module (so no host ``dist-packages`` can leak in), no bytecode written
        into the cache (:func:`install` byte-compiled it); a script adds :attr:`site`
        to ``sys.path`` itself (``sys.path.insert(0, SITE)``)."""
        return self.command([self.python, "-I", "-S", "-B", *args], cpu=cpu)

    def env(self, home: str | os.PathLike | None = None) -> dict[str, str]:
        """A clean environment for emulated processes."""
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": str(home or self.root)}
        for key in ("QEMU_STRACE", "QEMU_LOG"):   # debugging aids pass through
            if key in os.environ:
                env[key] = os.environ[key]
        return env

    def run_python(self, code: str, timeout: float = 300, cpu: str | None = None) -> subprocess.CompletedProcess:
        """Run ``code`` in the emulated Python with :attr:`site` on its path."""
        prelude = f"import sys; sys.path.insert(0, {str(self.site)!r})\n"
        return subprocess.run(self.python_command("-c", prelude + code, cpu=cpu), capture_output=True,
                              text=True, timeout=timeout, env=self.env(), cwd=str(self.root))


# ---------------------------------------------------------------------------
# Finding an installed emulator


def _read_stamp(root: Path) -> dict | None:
    try:
        stamp = json.loads((root / STAMP).read_text())
    except (OSError, ValueError):
        return None
    return stamp if isinstance(stamp, dict) else None


def unavailable(cache: str | os.PathLike | None = None) -> str | None:
    """``None`` when the emulator can run here, else one line saying why and what to run."""
    root = cache_dir(cache)
    stamp = _read_stamp(root)
    qemu = qemu_binary()
    qemu_hint = "" if qemu else " (it needs qemu-aarch64 first: `apt-get install qemu-user`)"
    if stamp is None:
        return (f"the ARM64 emulator is not installed (looked in {root}); install it with "
                f"`{INSTALL_COMMAND}`{qemu_hint}")
    if stamp.get("version") != EMULATOR_VERSION:
        return (f"the ARM64 emulator in {root} is version {stamp.get('version')!r}, this edgepack needs "
                f"{EMULATOR_VERSION!r}; update it with `{INSTALL_COMMAND}`{qemu_hint}")
    if not (root / "sysroot" / "usr" / "bin" / f"python{PYTHON_VERSION}").is_file():
        return f"the ARM64 emulator in {root} is damaged; reinstall it with `{INSTALL_COMMAND} --force`"
    if qemu is None:
        return "qemu-aarch64 is not on PATH; install it with `apt-get install qemu-user` (Debian/Ubuntu)"
    return None


def find(cache: str | os.PathLike | None = None) -> Emulator:
    """The installed emulator; :class:`ToolchainError` (saying what to run) when there is none."""
    reason = unavailable(cache)
    if reason:
        raise ToolchainError(reason)
    root = cache_dir(cache)
    return Emulator(root, qemu_binary(), _read_stamp(root))


def status(cache: str | os.PathLike | None = None) -> dict[str, Any]:
    """What is installed: ``installed`` (usable now), ``path``, ``reason`` (when not),
    ``version``, ``python``, ``packages`` (wheel versions), ``debian_packages``,
    ``size_mb``, ``installed_at``, ``install_seconds``, ``qemu`` / ``qemu_version``,
    ``cross_compiler`` and ``default_cpu``."""
    root = cache_dir(cache)
    stamp = _read_stamp(root) or {}
    reason = unavailable(cache)
    qemu = qemu_binary()
    qemu_version = None
    if qemu:
        try:
            out = subprocess.run([qemu, "--version"], capture_output=True, text=True, timeout=30).stdout
            qemu_version = out.splitlines()[0].strip() if out else None
        except (OSError, subprocess.SubprocessError):
            pass
    size = None
    if root.is_dir():
        size = round(sum(p.stat().st_size for p in root.rglob("*") if p.is_file() and not p.is_symlink()) / 2**20,
                     1)
    return {
        "installed": reason is None,
        "path": str(root),
        "reason": reason,
        "version": stamp.get("version"),
        "required_version": EMULATOR_VERSION,
        "python": stamp.get("python"),
        "packages": stamp.get("packages", {}),
        "debian_packages": stamp.get("debian_packages", {}),
        "size_mb": size,
        "installed_at": stamp.get("installed_at"),
        "install_seconds": stamp.get("install_seconds"),
        "qemu": qemu,
        "qemu_version": qemu_version,
        "cross_compiler": shutil.which("aarch64-linux-gnu-gcc"),
        "default_cpu": os.environ.get("EDGEPACK_QEMU_CPU") or DEFAULT_CPU,
    }


# ---------------------------------------------------------------------------
# Installing


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _run(argv: Sequence[str], what: str, timeout: float, **kwargs: Any) -> subprocess.CompletedProcess:
    try:
        proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, **kwargs)
    except subprocess.TimeoutExpired:
        raise ToolchainError(f"installing the ARM64 emulator: {what} took more than {timeout:.0f} s") from None
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout or "").strip().splitlines()[-15:])
        raise ToolchainError(f"installing the ARM64 emulator: {what} failed (exit {proc.returncode}):\n{tail}")
    return proc


class _Apt:
    """``apt-get`` with a private configuration rooted in ``root``: arm64 only,
    Debian bookworm sources, its own lists/cache/status.  The host's
    ``apt.conf.d`` (proxies, ...) still applies."""

    def __init__(self, root: Path):
        self.root = root
        for d in ("etc/sources.list.d", "etc/preferences.d", "lists/partial", "cache/archives/partial"):
            (root / d).mkdir(parents=True, exist_ok=True)
        (root / "status").write_text("")
        mirror = os.environ.get("EDGEPACK_DEBIAN_MIRROR", DEFAULT_MIRROR).rstrip("/")
        security = os.environ.get("EDGEPACK_DEBIAN_SECURITY_MIRROR", DEFAULT_SECURITY_MIRROR).rstrip("/")
        opts = f"[arch={DEBIAN_ARCH} signed-by={DEBIAN_KEYRING}]"
        (root / "etc" / "sources.list").write_text(
            f"deb {opts} {mirror} {DEBIAN_SUITE} main\n"
            f"deb {opts} {mirror} {DEBIAN_SUITE}-updates main\n"
            f"deb {opts} {security} {DEBIAN_SUITE}-security main\n")
        self.options = {
            "APT::Architecture": DEBIAN_ARCH,
            "APT::Architectures::": DEBIAN_ARCH,
            "Dir::Etc::sourcelist": str(root / "etc" / "sources.list"),
            "Dir::Etc::sourceparts": str(root / "etc" / "sources.list.d"),
            "Dir::Etc::preferences": str(root / "etc" / "preferences"),
            "Dir::Etc::preferencesparts": str(root / "etc" / "preferences.d"),
            "Dir::State": str(root),
            "Dir::State::lists": str(root / "lists"),
            "Dir::State::status": str(root / "status"),
            "Dir::Cache": str(root / "cache"),
            "Dir::Cache::archives": str(root / "cache" / "archives"),
            "Dir::Cache::pkgcache": "",
            "Dir::Cache::srcpkgcache": "",
            "Debug::NoLocking": "true",
            "APT::Sandbox::User": "root" if os.geteuid() == 0 else "",
            "Acquire::Languages": "none",
            "Acquire::Retries": "3",
        }

    def __call__(self, *args: str, what: str, cwd: Path | None = None, timeout: float = 1800):
        argv = [_require("apt-get"), "-q"]
        for k, v in self.options.items():
            if v or k.startswith("Dir::Cache::"):
                argv += ["-o", f"{k}={v}"]
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive", "LC_ALL": "C"}
        env.pop("APT_CONFIG", None)
        return _run(argv + list(args), what, timeout, cwd=str(cwd) if cwd else None, env=env)


def _pip_download(dest: Path) -> list[Path]:
    argv = [sys.executable, "-m", "pip", "download", "--disable-pip-version-check", "--no-input", "-q",
            "--only-binary=:all:", "--python-version", PYTHON_VERSION, "--implementation", "cp",
            "--abi", "cp" + PYTHON_VERSION.replace(".", ""), "-d", str(dest)]
    for p in PLATFORMS:
        argv += ["--platform", p]
    try:
        import pip  # noqa: F401
    except ImportError:
        raise ToolchainError("installing the ARM64 emulator needs pip in this Python; "
                             f"run `{sys.executable} -m ensurepip`") from None
    _run(argv + list(WHEELS), "pip download of the aarch64 wheels (" + ", ".join(WHEELS) + ")", 1800)
    return sorted(dest.glob("*.whl"))


def _unzip_wheel(wheel: Path, site: Path) -> tuple[str, str]:
    with zipfile.ZipFile(wheel) as zf:
        for info in zf.infolist():
            name = info.filename
            if name.startswith("/") or ".." in Path(name).parts:
                raise ToolchainError(f"wheel {wheel.name} holds an unsafe path {name!r}")
            zf.extract(info, site)
            mode = (info.external_attr >> 16) & 0o777
            if mode & 0o111:
                os.chmod(site / name, mode | 0o644)
    dist, ver = wheel.name.split("-")[:2]
    return dist.replace("_", "-").lower(), ver


def _progress(progress: bool, total: int):
    from .log import progress as progress_bar

    return progress_bar(total=total, desc="ARM64 emulator", unit="step", enabled=progress, leave=True,
                        bar_format="{desc:<48} {percentage:3.0f}%|{bar:20}| {n_fmt}/{total_fmt} [{elapsed}]")


SELF_TEST = """
import platform, numpy
from ai_edge_litert import interpreter
import ai_edge_litert
print(platform.machine(), platform.python_version(), numpy.__version__)
"""


def install(cache: str | os.PathLike | None = None, *, force: bool = False, progress: bool = True) -> Emulator:
    """Build the emulator (sysroot + aarch64 site folder) unless a current one is installed.

    Idempotent (returns immediately when the stamp is current), atomic (builds in
    a temporary directory beside the target and renames it into place) and safe
    to call from several processes at once (a file lock serialises builders).
    Needs ``qemu-aarch64``, ``apt-get``, ``dpkg-deb``, ``gpgv``, the Debian archive
    keyring, pip, and network access to a Debian mirror and PyPI.  Mirrors can be
    changed with ``$EDGEPACK_DEBIAN_MIRROR`` / ``$EDGEPACK_DEBIAN_SECURITY_MIRROR``.

    Raises :class:`ToolchainError` naming the package to install when a tool is
    missing, or carrying the failing command's output.
    """
    root = cache_dir(cache)
    if not force and unavailable(cache) is None:
        return find(cache)
    qemu = _require("qemu-aarch64")
    for tool in ("apt-get", "dpkg-deb", "gpgv"):
        _require(tool)
    if not Path(DEBIAN_KEYRING).is_file():
        raise ToolchainError(f"the ARM64 emulator needs the Debian archive keyring ({DEBIAN_KEYRING}); "
                             "install it with `apt-get install debian-archive-keyring`")
    with _locked(root.parent / f".{root.name}.lock"):
        if not force and unavailable(cache) is None:     # another process built it meanwhile
            return find(cache)
        for stale in [*root.parent.glob(f".{root.name}.tmp-*"), *root.parent.glob(f".{root.name}.old-*")]:
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
        try:
            _build(tmp, root, qemu, progress)
            old = None
            if root.exists():
                old = root.with_name(f".{root.name}.old-{os.getpid()}")
                root.rename(old)
            tmp.rename(root)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return find(cache)


def _build(tmp: Path, final: Path, qemu: str, progress: bool) -> None:
    t0 = time.monotonic()
    sysroot, site, work = tmp / "sysroot", tmp / "site", tmp / "build"
    for d in (sysroot, site, work / "debs", work / "wheels"):
        d.mkdir(parents=True)
    apt = _Apt(work / "apt")
    bar = _progress(progress, 7)
    try:
        bar.set_description_str("emulator: Debian arm64 package index")
        what = (f"apt-get update of the Debian {DEBIAN_SUITE} arm64 index (another mirror: "
                "set EDGEPACK_DEBIAN_MIRROR and EDGEPACK_DEBIAN_SECURITY_MIRROR)")
        proc = apt("update", what=what)
        failed = [ln for ln in (proc.stdout + proc.stderr).splitlines()
                  if ln.startswith(("Err:", "W: Failed to fetch", "E:"))]
        if failed:   # apt-get update exits 0 when an index could not be fetched
            raise ToolchainError(f"installing the ARM64 emulator: {what} failed:\n" + "\n".join(failed[-10:]))
        bar.update()

        bar.set_description_str(f"emulator: downloading {len(DEBIAN_PACKAGES)} Debian packages")
        apt("download", *DEBIAN_PACKAGES, what="apt-get download of the arm64 packages", cwd=work / "debs")
        debs = sorted((work / "debs").glob("*.deb"))
        bar.update()

        bar.set_description_str("emulator: unpacking the sysroot")
        deb_versions = {}
        for deb in debs:
            _run([_require("dpkg-deb"), "-x", str(deb), str(sysroot)], f"dpkg-deb -x {deb.name}", 600)
            name, version = deb.name.split("_")[:2]
            deb_versions[name] = version.replace("%3a", ":")
        missing = sorted(set(DEBIAN_PACKAGES) - set(deb_versions))
        if missing:
            raise ToolchainError(f"installing the ARM64 emulator: apt-get did not fetch {', '.join(missing)}")
        bar.update()

        bar.set_description_str("emulator: downloading aarch64 wheels")
        wheels = _pip_download(work / "wheels")
        bar.update()

        bar.set_description_str("emulator: unpacking wheels")
        packages = dict(_unzip_wheel(w, site) for w in wheels)
        bar.update()

        # Byte-compile the standard library and the wheels once, so emulated processes
        # start faster and never write into the cache.  Bytecode is the same on every
        # platform of one CPython minor version: this Python does it when it is a 3.11
        # (seconds), else the emulated one (~20 s).  Tracebacks name the final paths.
        bar.set_description_str("emulator: byte-compiling")
        emu = Emulator(tmp, qemu, {})
        args = ("-m", "compileall", "-q", "-j", "0", "-s", str(tmp), "-p", str(final),
                "-x", r"/(test|tests|idlelib|tkinter|turtledemo|lib2to3)/",
                str(sysroot / "usr" / "lib" / f"python{PYTHON_VERSION}"), str(site))
        if f"{sys.version_info[0]}.{sys.version_info[1]}" == PYTHON_VERSION:
            _run([sys.executable, "-I", *args], "byte-compiling", 1800, cwd=str(tmp))
        else:
            _run(emu.python_command(*args), "byte-compiling in the emulated Python", 1800, env=emu.env(),
                 cwd=str(tmp))
        bar.update()

        bar.set_description_str("emulator: self-test")
        proc = emu.run_python(SELF_TEST)
        if proc.returncode != 0 or not proc.stdout.startswith("aarch64 "):
            tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
            raise ToolchainError(f"installing the ARM64 emulator: the emulated Python cannot import numpy and "
                                 f"ai_edge_litert (exit {proc.returncode}):\n{tail}")
        machine, python, _numpy = proc.stdout.split()[:3]
        bar.update()
    finally:
        bar.close()
    shutil.rmtree(work, ignore_errors=True)
    stamp = {
        "version": EMULATOR_VERSION,
        "arch": machine,
        "python": python,
        "packages": packages,
        "debian_suite": DEBIAN_SUITE,
        "debian_packages": deb_versions,
        "installed_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "install_seconds": round(time.monotonic() - t0, 1),
    }
    (tmp / STAMP).write_text(json.dumps(stamp, indent=2) + "\n")

