"""Runner ``qemu-aarch64``: the artifact itself, run on an emulated ARM64 Linux.

"Verified on the device" should not mean "verified on the x86 host".  This
runner takes the very files that would be copied to an ARM board and runs them
in an aarch64 userland under ``qemu-aarch64`` (see :mod:`sdk.emulator`;
install it once with ``edgepack emulator install``).

:class:`QemuAarch64Runner` is the part every target shares: the config, the
"is the emulator installed" check and the start of a session.  What runs in
the emulator is the target's: each target package registers a subclass
naming its target and implementing :meth:`~QemuAarch64Runner.start`, as it
does for ``host`` and ``reference``:

``arm-int8`` / ``arm-fp32`` (:class:`sdk.litert.qemu.LiteRTQemuRunner`)
    ``model.tflite`` in LiteRT's aarch64 build (ai-edge-litert
    :data:`sdk.emulator.LITERT_VERSION`) with its default XNNPACK delegate and
    1 thread, as the ``host`` runner does on x86: XNNPACK picks its ARM NEON
    (dot-product) kernels here, so integer outputs must be bit-identical.
``binary-popcount`` (:mod:`targets.binary_popcount.qemu`)
    the artifact's C sources cross-compiled with ``aarch64-linux-gnu-gcc``
    (``-march=armv8-a``: the kernels' NEON path, :func:`sdk.emulator.cross_compile`)
    into a shared object that the emulated Python calls through ctypes.

Only the artifact's files and a small server script
(``sdk/emulated_server.py``) go into the emulated process; inputs and outputs
cross as ``.npz`` files.  One process serves all calls of a session
(:class:`sdk.emulated_session.EmulatedSession`): about 2 s to start,
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
>>> class QemuRunner(LiteRTQemuRunner):                                 # doctest: +SKIP
...     targets = ("arm-int8",)
"""

from __future__ import annotations

import dataclasses
from abc import abstractmethod

from sdk import emulator
from sdk.base import Runner
from sdk.config import Config
from sdk.emulated_session import EmulatedSession
from sdk.errors import ConfigError, ToolchainError

__all__ = ["QemuAarch64Runner"]


class QemuAarch64Runner(Runner):
    """The artifact on an emulated ARM64 Linux (qemu-aarch64); subclasses name the
    target and start its session in :meth:`start`."""

    name = "qemu-aarch64"
    version = "1.0"
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
        return self.start(artifact, emulator.find())

    @abstractmethod
    def start(self, artifact, emu: emulator.Emulator) -> EmulatedSession:
        """Start the emulated session serving ``artifact`` in ``emu`` (installed and
        usable), honouring :attr:`config` (``cpu``, ``timeout_s``, ...)."""
