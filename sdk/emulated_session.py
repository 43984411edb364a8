"""One long-lived emulated process serving one artifact (the sessions of the ``qemu-aarch64`` runners).

:class:`EmulatedSession` copies the artifact's files and
``emulated_server.py`` into a fresh work directory, starts the server in the
emulated aarch64 Python (``qemu-aarch64 -L SYSROOT python3.11 -I -S``) with
that directory as its working directory, and then exchanges inputs and outputs
as ``.npz`` files there, one JSON line per call over the process's stdin and
stdout.  Starting costs about 2 s (importing numpy and LiteRT under
emulation); a call then costs the emulated invoke plus a few milliseconds.

The process ends with :meth:`EmulatedSession.close`, when the session is
garbage collected, or at interpreter exit.

What the emulated process loads is the runner's business (:mod:`sdk.qemu`
and its per-target subclasses): it passes a ``spec`` that
:mod:`sdk.emulated_server` reads (a LiteRT model, :mod:`sdk.litert.qemu`, or
a cross-compiled C library, :mod:`targets.binary_popcount.qemu`) and an
``adapt`` that wraps the stored-layout call (:func:`sdk.litert.runners.adapt`
for both).  The emulator itself (sysroot, site folder, command lines) is
:mod:`sdk.emulator`.

>>> with EmulatedSession(emulator.find(), art, {"kind": "litert", "model": "artifact/model.tflite"}) as s:  # doctest: +SKIP
...     ys = s.run_stored([x_nhwc])
"""

from __future__ import annotations

import json
import os
import selectors
import shutil
import statistics
import subprocess
import tempfile
import threading
import time
import weakref
from pathlib import Path
from typing import Any, Callable, Sequence

from sdk.errors import RunnerError

SERVER = Path(__file__).resolve().parent / "emulated_server.py"
ARTIFACT_DIR = "artifact"


def _stop(proc: subprocess.Popen, workdir: str) -> None:
    try:
        if proc.poll() is None:
            try:
                proc.stdin.write(b'{"op": "quit"}\n')
                proc.stdin.flush()
                proc.wait(timeout=5)
            except (OSError, ValueError, subprocess.TimeoutExpired):
                proc.kill()
                proc.wait(timeout=10)
    finally:
        for stream in (proc.stdin, proc.stdout):
            try:
                stream.close()
            except (OSError, ValueError):
                pass
        shutil.rmtree(workdir, ignore_errors=True)


class EmulatedSession:
    """A running emulated server for one artifact.

    Calling it maps inputs to outputs like every runner session (the backend
    supplies ``adapt``, the torch-layout ↔ stored-layout conversion).
    Emulated latency, kept apart from host wall time:

    ``latency_ms``
        median time of one model invoke measured inside the emulated process
        (qemu's translated code on this host's CPU: neither device latency nor
        host latency; useful for relative comparisons only);
    ``latencies_ms``
        every invoke time recorded so far;
    :meth:`time`
        ``runs`` back-to-back invokes in the emulator, median ms.
    """

    def __init__(self, emu, artifact, spec: dict, *, cpu: str | None = None, timeout_s: float = 600.0,
                 adapt: Callable[[Callable], Callable] | None = None,
                 extra_files: dict[str, str | os.PathLike] | None = None):
        self.artifact_path = Path(artifact.path)
        self.timeout_s = float(timeout_s)
        self.latencies_ms: list[float] = []
        self._lock = threading.RLock()     # one request at a time on the pipe; time() holds it across its call
        self.workdir = Path(tempfile.mkdtemp(prefix="edgepack-qemu-"))
        try:
            art_dir = self.workdir / ARTIFACT_DIR
            art_dir.mkdir()
            for name in [*artifact.manifest.get("files", {}), "manifest.json"]:
                shutil.copyfile(self.artifact_path / name, art_dir / name)
            for name, src in (extra_files or {}).items():
                shutil.copyfile(src, self.workdir / name)
            shutil.copyfile(SERVER, self.workdir / SERVER.name)
            spec = {"site": str(emu.site), **spec}
            self.command = emu.python_command(SERVER.name, json.dumps(spec), cpu=cpu)
            self._stderr = open(self.workdir / "stderr.log", "wb")
            self.proc = subprocess.Popen(self.command, cwd=self.workdir, env=emu.env(home=self.workdir),
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr)
        except BaseException:
            shutil.rmtree(self.workdir, ignore_errors=True)
            raise
        self._finalizer = weakref.finalize(self, _stop, self.proc, str(self.workdir))
        self._buf = b""
        t0 = time.perf_counter()
        ready = self._receive(f"starting the emulated runtime for {self.artifact_path}")
        self.startup_s = time.perf_counter() - t0
        if not ready.get("ready"):
            err = ready.get("error", "no reason given")
            tail = self.stderr_tail()
            self.close()
            raise RunnerError(f"qemu-aarch64 could not load {self.artifact_path}: {err}"
                              + (f"\n{tail}" if tail else ""))
        self.info: dict = ready.get("info", {})
        self._call = adapt(self.run_stored) if adapt else self.run_stored

    # -- protocol ----------------------------------------------------------
    def stderr_tail(self, lines: int = 15) -> str:
        try:
            text = (self.workdir / "stderr.log").read_text(errors="replace")
        except OSError:
            return ""
        keep = [ln for ln in text.strip().splitlines() if not ln.startswith("INFO: ")]
        return "\n".join(keep[-lines:])

    def _receive(self, what: str) -> dict:
        deadline = time.monotonic() + self.timeout_s
        with selectors.DefaultSelector() as sel:
            sel.register(self.proc.stdout, selectors.EVENT_READ)
            while b"\n" not in self._buf:
                left = deadline - time.monotonic()
                if left <= 0:
                    self.close()
                    raise RunnerError(f"qemu-aarch64: {what} took more than {self.timeout_s:.0f} s; stopped it")
                if not sel.select(timeout=min(left, 1.0)):
                    continue
                chunk = os.read(self.proc.stdout.fileno(), 65536)
                if not chunk:
                    rc = self.proc.wait()
                    tail = self.stderr_tail()
                    self.close()
                    raise RunnerError(f"qemu-aarch64: the emulated process died (exit {rc}) while {what}"
                                      + (f":\n{tail}" if tail else ""))
                self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        try:
            return json.loads(line)
        except ValueError:
            raise RunnerError(f"qemu-aarch64: unexpected output from the emulated process: {line[:200]!r}") from None

    def run_stored(self, xs: Sequence[Any], repeat: int = 1) -> list:
        """One call with inputs already in the model's stored layout and dtype."""
        import numpy as np

        with self._lock:
            if not self._finalizer.alive:
                raise RunnerError("qemu-aarch64 session is closed")
            inp, out = self.workdir / "in.npz", self.workdir / "out.npz"
            np.savez(inp, **{f"x{i}": np.asarray(x) for i, x in enumerate(xs)})
            req = {"op": "run", "inputs": inp.name, "outputs": out.name, "repeat": int(repeat)}
            try:
                self.proc.stdin.write((json.dumps(req) + "\n").encode())
                self.proc.stdin.flush()
            except (BrokenPipeError, OSError):
                pass   # _receive reports the dead process with its stderr
            resp = self._receive(f"running {self.artifact_path.name}")
            if not resp.get("ok"):
                raise RunnerError(f"qemu-aarch64: {resp.get('error', 'failed')}")
            self.latencies_ms.extend(resp["ms"])
            self.last_ms = resp["ms"]
            with np.load(out) as z:
                return [z[f"y{i}"] for i in range(len(z.files))]

    # -- the runner interface ------------------------------------------------
    def __call__(self, inputs):
        return self._call(inputs)

    @property
    def latency_ms(self) -> float:
        """Median emulated invoke time so far (ms); NaN before the first call."""
        times = list(self.latencies_ms)
        return statistics.median(times) if times else float("nan")

    def time(self, stored_inputs: Sequence[Any], runs: int = 20) -> float:
        """Median emulated time (ms) of ``runs`` back-to-back invokes on stored-layout inputs."""
        with self._lock:
            self.run_stored(stored_inputs, repeat=max(int(runs), 1) + 1)
            return statistics.median(self.last_ms[1:])

    @property
    def pid(self) -> int:
        return self.proc.pid

    def close(self) -> None:
        """Stop the emulated process and remove the work directory."""
        self._finalizer()
        try:
            self._stderr.close()
        except (AttributeError, OSError):
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self) -> str:
        state = "running" if self._finalizer.alive else "closed"
        return f"<EmulatedSession {self.artifact_path} pid={self.proc.pid} {state}>"
