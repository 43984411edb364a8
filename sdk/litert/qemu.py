"""The ``qemu-aarch64`` runner of LiteRT artifacts: ``model.tflite`` in the aarch64 LiteRT.

:class:`LiteRTQemuRunner` lists no targets: ``targets/arm_int8`` and
``targets/arm_fp32`` each register a subclass naming their own, as they do
with :class:`~.runners.LiteRTHostRunner`.  The runner itself (config,
availability, what the latency figures mean) is :mod:`sdk.qemu`.

The emulated LiteRT (:data:`sdk.emulator.LITERT_VERSION`, default XNNPACK
delegate, ``num_threads`` 1) reads a copy of the bytes
:func:`~.runners.checked_model` accepted, not the artifact's file again, and
the session takes torch-layout float arrays like the ``host`` runner's
(:func:`~.runners.adapt`).

>>> class QemuRunner(LiteRTQemuRunner):            # doctest: +SKIP
...     targets = ("arm-int8",)
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from sdk.emulated_session import EmulatedSession
from sdk.qemu import QemuAarch64Runner

from .runners import adapt, checked_model

__all__ = ["LiteRTQemuRunner", "open_litert"]


def open_litert(artifact, emu, config: QemuAarch64Runner.Config) -> EmulatedSession:
    """An emulated session running ``artifact``'s ``model.tflite`` in the aarch64 LiteRT of ``emu``."""
    data = checked_model(artifact)
    with tempfile.TemporaryDirectory(prefix="edgepack-qemu-model-") as tmp:
        model = Path(tmp) / "model.tflite"
        model.write_bytes(data)
        spec = {"kind": "litert", "model": "checked-model.tflite", "num_threads": config.num_threads,
                "delegate": config.delegate}
        return EmulatedSession(emu, artifact, spec, cpu=config.cpu or None, timeout_s=config.timeout_s,
                               adapt=lambda run_stored: adapt(artifact, run_stored),
                               extra_files={"checked-model.tflite": model})


class LiteRTQemuRunner(QemuAarch64Runner):
    """``model.tflite`` in LiteRT's aarch64 build on an emulated ARM64 Linux (qemu-aarch64), XNNPACK, 1 thread."""

    def start(self, artifact, emu) -> EmulatedSession:
        return open_litert(artifact, emu, self.config)
