"""Seeded mutation fuzzing of real artifacts of every target.

Each mutated copy is loaded, inspected and run in ``host`` and ``reference``
inside a child process (``tests/core/fuzz_worker.py``), so that a crash of a
native runtime is observed as a dead child instead of killing the suite.
Every outcome must be a clean :class:`~sdk.errors.EdgepackError` or a
completed run; when the mutation leaves the hashes as they were (damage), or
the artifact is signed and loaded with its key (a sender), a completed run
must give exactly the original outputs.  No file outside the artifact may be
opened: mutations point names and symlinks at sentinel files beside it, and an
audit hook in the child watches them.

``EDGEPACK_FUZZ_MUTATIONS`` (default 240 per target, plus a quarter as many
signed) and ``EDGEPACK_FUZZ_SECONDS`` (default 40 per target) size the run;
a long run: ``EDGEPACK_FUZZ_MUTATIONS=5000 EDGEPACK_FUZZ_SECONDS=3600
pytest tests/core/test_fuzz_artifacts.py``.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import sdk
from tamper import rehash

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
N = int(os.environ.get("EDGEPACK_FUZZ_MUTATIONS", "240"))
SECONDS = float(os.environ.get("EDGEPACK_FUZZ_SECONDS", "40"))
KEY = bytes(range(32))


class Worker:
    """The child process; restarted after a crash."""

    def __init__(self):
        self.proc = None
        self.crashes = 0

    def start(self):
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        self.proc = subprocess.Popen([sys.executable, str(HERE / "fuzz_worker.py")], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)

    def ask(self, req: dict) -> dict:
        if self.proc is None or self.proc.poll() is not None:
            self.start()
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            code = self.proc.wait()
            self.crashes += 1
            self.proc = None
            return {"outcome": "crash", "returncode": code, "opened": []}
        return json.loads(line)

    def close(self):
        if self.proc is not None:
            self.proc.stdin.close()
            self.proc.wait(timeout=30)


_JUNK = [None, True, 0, -1, 1 << 40, 1.5, float("nan"), "", "x" * 300, "../../etc/passwd", [], [1, "a"], {},
         {"a": {"b": []}}, [[[[]]]]]


def _junk_json(doc, rng: random.Random):
    """``doc`` with one value replaced by junk, or one key deleted."""
    paths = []

    def walk(obj, path):
        paths.append(path)
        if isinstance(obj, dict):
            for k, v in obj.items():
                walk(v, path + [k])
        elif isinstance(obj, list):
            for i, v in enumerate(obj):
                walk(v, path + [i])
    walk(doc, [])
    path = rng.choice(paths[1:] or [[]])
    if not path:
        return rng.choice(_JUNK)
    parent = doc
    for k in path[:-1]:
        parent = parent[k]
    if isinstance(parent, dict) and rng.random() < 0.25:
        del parent[path[-1]]
    else:
        parent[path[-1]] = rng.choice(_JUNK)
    return doc


def mutate(src: Path, dst: Path, sentinels: dict[str, Path], rng: random.Random, key: bytes | None) -> tuple[str, bool]:
    """Copy ``src`` to ``dst`` and damage it one way; returns (kind, hashes_untouched)."""
    shutil.copytree(src, dst)
    files = sorted(json.loads((dst / "manifest.json").read_text())["files"])
    kind = rng.choice(["flip", "flip", "flip-rehash", "flip-rehash", "edit2-rehash", "truncate", "truncate-rehash",
                       "manifest", "manifest", "json-rehash", "traversal", "symlink", "extra"])
    name = rng.choice(files + ["manifest.json"] + (["signature.json"] if key is not None else []))
    path = dst / name
    if kind in ("flip", "flip-rehash", "edit2-rehash"):
        data = bytearray(path.read_bytes())
        if data:
            for _ in range(2 if kind == "edit2-rehash" else 1):
                i = rng.randrange(len(data))
                data[i] = rng.randrange(256) if kind == "edit2-rehash" else data[i] ^ (1 << rng.randrange(8))
        path.write_bytes(bytes(data))
    elif kind.startswith("truncate"):
        data = path.read_bytes()
        path.write_bytes(data[:rng.randrange(len(data) + 1)])
    elif kind == "manifest" or (kind == "json-rehash" and not name.endswith(".json")):
        name = "manifest.json"
        m = json.loads((dst / name).read_text())
        (dst / name).write_text(json.dumps(_junk_json(m, rng)))
    elif kind == "json-rehash":
        try:
            doc = json.loads(path.read_text())
            path.write_text(json.dumps(_junk_json(doc, rng)))
        except ValueError:
            pass
    elif kind == "traversal":
        target = rng.choice(list(sentinels.values()))
        entry = rng.choice([f"../{target.name}", str(target), f"sub/../../{target.name}"])
        m = json.loads((dst / "manifest.json").read_text())
        data = target.read_bytes()
        m["files"][entry] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
        (dst / "manifest.json").write_text(json.dumps(m))
    elif kind == "symlink":
        name = rng.choice(files)
        outside = sentinels[name]           # same bytes as the file it replaces, so its hash matches
        (dst / name).unlink()
        (dst / name).symlink_to(outside)
    elif kind == "extra":
        (dst / rng.choice(["evil.so", "sitecustomize.py", "model.c.orig"])).write_text("int x;")
    if kind.endswith("-rehash") and name != "manifest.json" and (dst / name).exists():
        rehash(dst, name)
    untouched = not kind.endswith("-rehash") and kind not in ("manifest", "json-rehash") \
        and name != "manifest.json"
    return kind, untouched


def _deploy(target: str, out: Path):
    from examples.models import LeNet

    torch.manual_seed(0)
    x = torch.randn(1, 1, 8, 8)
    if target == "binary-popcount":
        binary = sdk.compress(LeNet(width=64).eval(), {"stages": [{"method": "xnor",
                                                                   "config": {"epochs": 1, "progress": False}}]},
                              data=[(torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,)))])
        return sdk.deploy(binary, target, (x,), output=out, progress=False)
    cal = [torch.randn(4, 1, 8, 8) for _ in range(2)]
    return sdk.deploy(LeNet().eval(), target, (x,), calibration=cal, output=out, progress=False)


@pytest.mark.parametrize("target", ["arm-int8", "arm-fp32", "fp16-gpu", "binary-popcount"])
def test_mutated_artifacts_fail_cleanly(target, tmp_path):
    if target == "binary-popcount":
        from targets.binary_popcount.build import find_compiler

        find_compiler()
    art = _deploy(target, tmp_path / "art")
    runners = ["host", "reference"]
    signed_src = tmp_path / "signed"
    shutil.copytree(art.path, signed_src)
    sdk.sign(signed_src, KEY)
    sentinel_dir = tmp_path / "outside"
    sentinel_dir.mkdir()
    sentinels = {}
    for name in art.manifest["files"]:
        sentinels[name] = sentinel_dir / name
        shutil.copy(art.path / name, sentinels[name])
    worker = Worker()
    try:
        base = worker.ask({"dir": str(art.path), "runners": runners, "sentinels": []})
        assert base["outcome"] == "ran", base
        rng = random.Random(f"{target}-0")
        counts: dict[str, int] = {}
        bad = []
        started = time.monotonic()
        total = N + N // 4
        done = 0
        for i in range(total):
            if time.monotonic() - started > SECONDS and done >= 50:
                break
            signed = i >= N
            dst = tmp_path / f"m{i}"
            kind, untouched = mutate(signed_src if signed else art.path, dst, sentinels, rng, KEY if signed else None)
            res = worker.ask({"dir": str(dst), "runners": runners, "key": KEY.hex() if signed else None,
                              "sentinels": [str(p.resolve()) for p in sentinels.values()]})
            done += 1
            outcome = res["outcome"]
            counts[outcome] = counts.get(outcome, 0) + 1
            must_equal = untouched or signed
            if outcome in ("crash", "raw") or res["opened"] or \
                    (outcome == "ran" and must_equal and res["outputs"] != base["outputs"]):
                bad.append((i, kind, "signed" if signed else "", res))
            shutil.rmtree(dst, ignore_errors=True)
        print(f"{target}: {done} mutations, outcomes {counts}")
        assert not bad, f"{len(bad)} of {done} mutations misbehaved; first: {bad[:3]}"
        assert done >= 50
    finally:
        worker.close()
