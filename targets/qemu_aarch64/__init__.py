"""Runner ``qemu-aarch64``: the artifact itself, run on an emulated ARM64 Linux.

"Verified on the device" should not mean "verified on the x86 host".  This
runner takes the very files that would be copied to an ARM board and runs them
in an aarch64 userland under ``qemu-aarch64`` (see :mod:`sdk.emulator`;
install it once with ``edgepack emulator install``):

``arm-int8`` / ``arm-fp32``
    ``model.tflite`` in LiteRT's aarch64 build (ai-edge-litert
    :data:`sdk.emulator.LITERT_VERSION`) with its default XNNPACK delegate and
    1 thread, as the ``host`` runner does on x86: XNNPACK picks its ARM NEON
    (dot-product) kernels here, so integer outputs must be bit-identical.
``binary-popcount``
    the artifact's C sources cross-compiled with ``aarch64-linux-gnu-gcc``
    (``-march=armv8-a``: the kernels' NEON path) into a shared object that
    the emulated Python calls through ctypes; see :func:`open_kernel_library`.

Only the artifact's files and a small server script
(``emulated_server.py``) go into the emulated process; inputs and outputs
cross as ``.npz`` files.  One process serves all calls of a session
(:class:`~targets.qemu_aarch64.session.EmulatedSession`): about 2 s to start,
then the emulated invoke plus a few ms per call.

Latency: ``art.verify(...).latency_ms["qemu-aarch64"]`` is host wall time of
a call *in emulation*, and ``art.session("qemu-aarch64").latency_ms`` the
median invoke time measured inside the emulator.  Neither is device latency:
qemu translates ARM code to x86 code, so the figures only compare kernels and
models relative to each other under emulation.

Options (runner config, or ``$EDGEPACK_QEMU_CPU`` for the CPU model when the
runner is created by ``art.run``/``art.verify``): ``cpu`` (qemu ``-cpu``,
default ``cortex-a76``; ``cortex-a72`` has no dot-product instructions, so
XNNPACK takes other kernels), ``num_threads``, ``delegate`` and ``timeout_s``.
``delegate=False`` runs TFLite's builtin kernels instead of XNNPACK, a
diagnostic only: they requantize differently (measured 1–2 LSB from the
reference on the zoo, and different on ARM and x86).

>>> art.run(x, runner="qemu-aarch64")                                  # doctest: +SKIP
>>> art.verify(model, inputs, runners=["host", "qemu-aarch64", "reference"])  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import shlex
import subprocess
import tempfile
from pathlib import Path
from typing import Callable

from sdk import Runner, hookimpl
from sdk import emulator
from sdk.config import Config
from sdk.errors import ConfigError, RunnerError, ToolchainError

from .session import EmulatedSession

__all__ = ["BACKENDS", "QemuAarch64Runner", "open_kernel_library", "open_litert"]

#: -march for cross-compiled C artifacts: baseline ARMv8-A, NEON included, runs on every ARM64 board.
CROSS_MARCH = "armv8-a"
CROSS_FLAGS = ("-O3", "-std=c99")


def _stored_shape(sig: dict) -> list[int]:
    shape, layout = list(sig["shape"]), sig.get("layout")
    return [shape[p] for p in layout] if layout else shape


def open_litert(artifact, emu, config) -> EmulatedSession:
    """arm-int8 / arm-fp32: ``model.tflite`` in the aarch64 LiteRT."""
    from targets.arm_int8.runners import adapt, checked_model

    # the emulated LiteRT reads exactly the bytes fbcheck accepted (a copy), not the artifact's file again
    data = checked_model(artifact)
    with tempfile.TemporaryDirectory(prefix="edgepack-qemu-model-") as tmp:
        model = Path(tmp) / "model.tflite"
        model.write_bytes(data)
        spec = {"kind": "litert", "model": "checked-model.tflite", "num_threads": config.num_threads,
                "delegate": config.delegate}
        return EmulatedSession(emu, artifact, spec, cpu=config.cpu or None, timeout_s=config.timeout_s,
                               adapt=lambda run_stored: adapt(artifact, run_stored),
                               extra_files={"checked-model.tflite": model})


def cross_compile(sources: list[Path], output: Path, flags=CROSS_FLAGS, march: str = CROSS_MARCH) -> Path:
    """Compile C ``sources`` (``.h`` files only add include directories) into an
    aarch64 shared object at ``output``."""
    cc = emulator.cross_compiler()
    units = [str(s) for s in sources if s.suffix == ".c"]
    includes = sorted({f"-I{s.parent}" for s in sources})
    argv = [cc, *flags, f"-march={march}", "-fPIC", "-shared", *includes, *units, "-o", str(output), "-lm"]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise ToolchainError(f"cross-compiling for aarch64 failed: {shlex.join(argv)}\n{proc.stderr.strip()}")
    return output


def open_kernel_library(artifact, emu, config) -> EmulatedSession:
    """binary-popcount: the C generated afresh from the artifact's (validated) layer
    specs and the kernel sources installed with edgepack are cross-compiled for
    aarch64 — never the artifact's own C, which must equal that generation or the
    artifact is refused — and the emulated Python calls

        int edgepack_model_run(const float *input, float *output, const void *weights)

    with ``weights.bin`` 64-byte aligned, one float32 input and one float32 output in
    their stored layout (manifest ``layout``).
    """
    from targets.arm_int8.runners import adapt
    from targets.binary_popcount.build import kernel_sources
    from targets.binary_popcount.codegen import generate_sources
    from targets.binary_popcount.runners import artifact_specs

    if len(artifact.manifest["inputs"]) != 1 or len(artifact.manifest["outputs"]) != 1:
        raise RunnerError("qemu-aarch64 runs C artifacts with exactly one input and one output")
    specs, _ = artifact_specs(artifact)            # ArtifactError unless the shipped C is what we generate
    model_c, model_h = generate_sources(specs)
    with tempfile.TemporaryDirectory(prefix="edgepack-xc-") as tmp:
        src = Path(tmp) / "src"
        src.mkdir()
        (src / "model.c").write_text(model_c)
        (src / "model.h").write_text(model_h)
        lib = cross_compile([src / "model.c", src / "model.h", *kernel_sources()], Path(tmp) / "model.so")
        spec = {"kind": "clib", "library": "model.so", "weights": "artifact/weights.bin",
                "entry": "edgepack_model_run",
                "output_shapes": [_stored_shape(s) for s in artifact.manifest["outputs"]]}
        return EmulatedSession(emu, artifact, spec, cpu=config.cpu or None, timeout_s=config.timeout_s,
                               adapt=lambda run_stored: adapt(artifact, run_stored),
                               extra_files={"model.so": lib})


#: target name -> function(artifact, emulator, config) opening a session.
BACKENDS: dict[str, Callable] = {
    "arm-int8": open_litert,
    "arm-fp32": open_litert,
    "binary-popcount": open_kernel_library,
}


class QemuAarch64Runner(Runner):
    """The artifact on an emulated ARM64 Linux (qemu-aarch64; aarch64 LiteRT or cross-compiled C)."""

    name = "qemu-aarch64"
    version = "1.0"
    targets = tuple(BACKENDS)
    exact = True

    @dataclasses.dataclass(frozen=True)
    class Config(Config):
        cpu: str = ""              # qemu -cpu model; "": $EDGEPACK_QEMU_CPU, else sdk.emulator.DEFAULT_CPU
        num_threads: int = 1
        delegate: bool = True      # LiteRT's default XNNPACK delegate, as on a board
        timeout_s: float = 600.0   # start-up and each call

        def __post_init__(self):
            if self.num_threads < 1:
                raise ConfigError(f"runner 'qemu-aarch64': num_threads must be >= 1, got {self.num_threads}")
            if self.timeout_s <= 0:
                raise ConfigError(f"runner 'qemu-aarch64': timeout_s must be > 0, got {self.timeout_s}")

    def unavailable(self) -> str | None:
        return emulator.unavailable()

    def open(self, artifact) -> EmulatedSession:
        reason = self.unavailable()
        if reason:
            raise ToolchainError(f"runner 'qemu-aarch64' cannot run here: {reason}")
        try:
            backend = BACKENDS[artifact.target]
        except KeyError:
            raise RunnerError(f"runner 'qemu-aarch64' has no backend for target {artifact.target!r}; "
                              f"it runs {', '.join(BACKENDS)}") from None
        return backend(artifact, emulator.find(), self.config)


@hookimpl
def register_runners(register):
    register(QemuAarch64Runner)
