"""Runner ``qemu-aarch64`` of binary-popcount artifacts: the C model cross-compiled for
aarch64 (``-march=armv8-a``: the kernels' NEON path) and called in the emulator.

As with the ``host`` runner (:mod:`.runners`), nothing the artifact ships is
compiled: :func:`open_kernel_library` generates the C afresh from the checked
layer specs.  The runner itself (config, availability, what the latency
figures mean) is :mod:`sdk.qemu`; the emulated side is the ``clib`` kind of
:mod:`sdk.emulated_server`.

>>> art.run(x, runner="qemu-aarch64")          # doctest: +SKIP
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from sdk import emulator, qemu
from sdk.emulated_session import EmulatedSession
from sdk.errors import RunnerError
from sdk.litert.runners import adapt

from .build import kernel_sources
from .emit import generate_sources
from .runners import TARGETS, artifact_specs

__all__ = ["QemuRunner", "open_kernel_library"]


def _stored_shape(sig: dict) -> list[int]:
    shape, layout = list(sig["shape"]), sig.get("layout")
    return [shape[p] for p in layout] if layout else shape


def open_kernel_library(artifact, emu: emulator.Emulator, config: qemu.QemuAarch64Runner.Config) -> EmulatedSession:
    """The C generated afresh from the artifact's (validated) layer specs and the
    kernel sources installed with edgepack, cross-compiled for aarch64 — never the
    artifact's own C, which must equal that generation or the artifact is refused —
    in an emulated session whose Python calls

        int edgepack_model_run(const float *input, float *output, const void *weights)

    with ``weights.bin`` 64-byte aligned, one float32 input and one float32 output in
    their stored layout (manifest ``layout``).
    """
    if len(artifact.manifest["inputs"]) != 1 or len(artifact.manifest["outputs"]) != 1:
        raise RunnerError("qemu-aarch64 runs C artifacts with exactly one input and one output")
    specs, _ = artifact_specs(artifact)            # ArtifactError unless the shipped C is what we generate
    model_c, model_h = generate_sources(specs)
    with tempfile.TemporaryDirectory(prefix="edgepack-xc-") as tmp:
        src = Path(tmp) / "src"
        src.mkdir()
        (src / "model.c").write_text(model_c)
        (src / "model.h").write_text(model_h)
        lib = emulator.cross_compile([src / "model.c", src / "model.h", *kernel_sources()], Path(tmp) / "model.so")
        spec = {"kind": "clib", "library": "model.so", "weights": "artifact/weights.bin",
                "entry": "edgepack_model_run",
                "output_shapes": [_stored_shape(s) for s in artifact.manifest["outputs"]]}
        return EmulatedSession(emu, artifact, spec, cpu=config.cpu or None, timeout_s=config.timeout_s,
                               adapt=lambda run_stored: adapt(artifact, run_stored),
                               extra_files={"model.so": lib})


class QemuRunner(qemu.QemuAarch64Runner):
    """The C model cross-compiled for aarch64 (NEON kernels) on an emulated ARM64 Linux (qemu-aarch64)."""

    targets = TARGETS

    def start(self, artifact, emu) -> EmulatedSession:
        return open_kernel_library(artifact, emu, self.config)
