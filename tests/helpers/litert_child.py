"""Run LiteRT on hostile files in child processes, so that a crash (SIGSEGV) is a result, not the end
of pytest: ``run_in_children(jobs, tmp)`` with jobs ``(path, delegate)`` returns per job ``ran``,
``error:<Exception>`` or ``crash:<returncode>``; a fresh child takes the jobs after a crash."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

_CHILD = r"""
import sys
import numpy as np
from sdk.litert import runtime
rng = np.random.default_rng(0)
for line in open(sys.argv[1]):
    i, delegate, path = line.split(" ", 2)
    print("start", i, flush=True)
    try:
        interp = runtime.load_interpreter(open(path.strip(), "rb").read(), delegate=delegate == "1")
        for _ in range(2):
            xs = [rng.standard_normal(d["shape"]).astype(d["dtype"]) if d["dtype"] == np.float32 else
                  rng.integers(-128, 128, d["shape"]).astype(d["dtype"]) for d in interp.get_input_details()]
            runtime.run(interp, xs)
        status = "ran"
    except Exception as exc:
        status = "error:" + type(exc).__name__
    print("done", i, status, flush=True)
"""


def run_in_children(jobs: list[tuple[Path, bool]], tmp: Path, timeout: float = 600) -> dict[int, str]:
    """LiteRT on each ``(path, delegate)`` job, in child processes; see the module docstring."""
    script = tmp / "child.py"
    script.write_text(_CHILD)
    results: dict[int, str] = {}
    todo = list(range(len(jobs)))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    while todo:
        listing = tmp / "todo.txt"
        listing.write_text("".join(f"{i} {int(jobs[i][1])} {jobs[i][0]}\n" for i in todo))
        proc = subprocess.run([sys.executable, str(script), str(listing)], capture_output=True, text=True,
                              env=env, cwd=ROOT, timeout=timeout)
        current = None
        for line in proc.stdout.splitlines():
            parts = line.split()
            if parts[:1] == ["start"]:
                current = int(parts[1])
            elif parts[:1] == ["done"]:
                results[int(parts[1])] = parts[2]
                current = None
        if current is not None:
            results[current] = f"crash:{proc.returncode}"
        left = [i for i in todo if i not in results]
        if left and current is None:
            raise AssertionError(f"the LiteRT child stopped (exit {proc.returncode}) between models: "
                                 f"{proc.stderr[-2000:]}")
        todo = left
    return results
