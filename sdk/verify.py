"""Verification: run an artifact and compare it with its float model and with
the SDK's own reference.

For each runner the report holds, over all verification inputs:

``max_abs_err`` / ``max_rel_err`` / ``sqnr_db`` / ``top1_agreement``
    against the float model (the model given, or the golden outputs recorded
    at deploy time);
``bit_exact_ratio`` / ``max_lsb``
    against the ``reference`` runner, in units of the output quantization step
    (only for targets with a reference and quantized outputs);
``latency_ms``
    median wall time of one call in this runner (emulated runners report
    emulated time, not device time).

Pass criteria come from the target (``manifest["verify"]``); a target may
give a runner its own criteria under ``"runners"`` (fp16-gpu holds its
float16-arithmetic runners to a looser error bound than fp16 storage).
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Sequence

import numpy as np

from .errors import VerificationError


@dataclasses.dataclass
class RunnerReport:
    runner: str
    max_abs_err: float = math.nan
    max_rel_err: float = math.nan
    sqnr_db: float = math.nan
    top1_agreement: float = math.nan
    bit_exact_ratio: float = math.nan
    max_lsb: float = math.nan
    latency_ms: float = math.nan
    extra: dict = dataclasses.field(default_factory=dict)
    error: str | None = None


@dataclasses.dataclass
class VerifyReport:
    """Outcome of :meth:`sdk.Artifact.verify`: per-runner rows and the verdict."""

    target: str
    runners: dict[str, RunnerReport]
    failures: list[str]
    rules: dict

    @property
    def passed(self) -> bool:
        return not self.failures

    def _col(self, field: str) -> dict[str, float]:
        return {k: getattr(r, field) for k, r in self.runners.items()}

    max_abs_err = property(lambda self: self._col("max_abs_err"))
    max_rel_err = property(lambda self: self._col("max_rel_err"))
    sqnr_db = property(lambda self: self._col("sqnr_db"))
    top1_agreement = property(lambda self: self._col("top1_agreement"))
    bit_exact_ratio = property(lambda self: self._col("bit_exact_ratio"))
    max_lsb = property(lambda self: self._col("max_lsb"))
    latency_ms = property(lambda self: self._col("latency_ms"))

    def raise_for_failure(self) -> "VerifyReport":
        if self.failures:
            raise VerificationError(f"{self.target} artifact failed verification: " + "; ".join(self.failures))
        return self

    def to_dict(self) -> dict:
        return {"target": self.target, "passed": self.passed, "failures": self.failures, "rules": self.rules,
                "runners": {k: dataclasses.asdict(v) for k, v in self.runners.items()}}

    def __str__(self) -> str:
        cols = ("bit_exact_ratio", "max_lsb", "sqnr_db", "max_abs_err", "max_rel_err", "top1_agreement",
                "latency_ms")
        lines = [f"{'runner':14s}" + "".join(f"{c:>17s}" for c in cols)]
        for name, r in self.runners.items():
            if r.error:
                lines.append(f"{name:14s} ERROR: {r.error}")
                continue
            lines.append(f"{name:14s}" + "".join(f"{getattr(r, c):17.6g}" for c in cols))
        lines.append("PASSED" if self.passed else "FAILED: " + "; ".join(self.failures))
        return "\n".join(lines)


def runner_rules(rules: dict, runner: str) -> dict:
    """The pass criteria for ``runner``: the target's rules, with its
    ``rules["runners"][runner]`` entries taking precedence."""
    out = {k: v for k, v in rules.items() if k != "runners"}
    out.update(rules.get("runners", {}).get(runner, {}))
    return out


def sqnr_db(ref: np.ndarray, test: np.ndarray) -> float:
    """Signal-to-quantization-noise ratio ``10·log10(Σref² / Σ(ref−test)²)``."""
    noise = float(np.sum((ref.astype(np.float64) - test) ** 2))
    signal = float(np.sum(ref.astype(np.float64) ** 2))
    if noise == 0:
        return math.inf
    return 10.0 * math.log10(signal / noise) if signal > 0 else -math.inf


def _output_step(artifact) -> list[float | None]:
    steps = []
    for sig in artifact.outputs:
        q = sig.quantization
        steps.append(float(q["scale"][0]) if q and q.get("scale") and len(q["scale"]) == 1 else None)
    return steps


def _float_outputs(model: Any, samples: list[list[np.ndarray]]) -> list[list[np.ndarray]]:
    import torch

    model.eval()
    outs = []
    with torch.no_grad():
        for s in samples:
            o = model(*[torch.from_numpy(x) for x in s])
            o = o if isinstance(o, (tuple, list)) else (o,)
            outs.append([t.detach().float().numpy() for t in o])
    return outs


def verify(artifact, model: Any = None, inputs: Sequence | None = None, runners: Sequence[str] | None = None,
           *, repeats: int = 5, strict: bool = False) -> VerifyReport:
    """Run ``artifact`` in each runner on ``inputs`` and compare (see module docstring).

    ``inputs``: a list of samples, each a tensor/array or a tuple of them,
    shaped exactly as the artifact's inputs; default: the golden inputs.
    ``runners``: default, the target's default runner and ``reference``.
    ``strict=True`` raises :class:`VerificationError` instead of returning a failed report.
    """
    from .data import as_inputs

    if inputs is None:
        gin, gout = artifact.golden()
        samples = [gin]
        expected = [gout] if model is None else _float_outputs(model, samples)
    else:
        samples = [as_inputs(s, artifact.signature) for s in inputs]
        expected = _float_outputs(model, samples) if model is not None else None
    available = artifact.runner_names()
    if runners is None:
        default = artifact.manifest["target"].get("default_runner", "host")
        runners = [default] + (["reference"] if "reference" in available and default != "reference" else [])
    all_rules = artifact.manifest.get("verify", {})
    steps = _output_step(artifact)

    results: dict[str, list[list[np.ndarray]]] = {}
    report = {}
    failures: list[str] = []
    for name in runners:
        row = RunnerReport(name)
        report[name] = row
        try:
            fn = artifact.session(name)
            outs, times = [], []
            for s in samples:
                outs.append(fn(s))
                for _ in range(max(repeats - 1, 0)):
                    t0 = time.perf_counter()
                    fn(s)
                    times.append(time.perf_counter() - t0)
            results[name] = outs
            row.latency_ms = float(np.median(times)) * 1e3 if times else math.nan
            if getattr(fn, "latency_ms", None) is not None:     # emulated runners time the invoke itself
                row.extra["emulated_invoke_ms"] = fn.latency_ms
        except Exception as exc:  # a runner failing is a verification failure, reported by name
            row.error = f"{type(exc).__name__}: {exc}"
            failures.append(f"runner {name!r} failed: {row.error}")
            continue
        if expected is not None:
            flat_ref = np.concatenate([o.reshape(-1) for e in expected for o in e])
            flat = np.concatenate([o.reshape(-1) for r in outs for o in r]).astype(np.float64)
            diff = np.abs(flat - flat_ref)
            row.max_abs_err = float(diff.max())
            row.max_rel_err = float(diff.max() / max(float(np.abs(flat_ref).max()), 1e-12))
            row.sqnr_db = sqnr_db(flat_ref, flat)
            agree = [np.argmax(r[0].reshape(r[0].shape[0], -1), -1) == np.argmax(e[0].reshape(e[0].shape[0], -1), -1)
                     for r, e in zip(outs, expected)]
            row.top1_agreement = float(np.mean(np.concatenate(agree)))

    if "reference" in results:
        ref = results["reference"]
        for name, outs in results.items():
            if name == "reference":
                continue
            lsb, exact, total = 0.0, 0, 0
            for r_out, t_out in zip(ref, outs):
                for i, (a, b) in enumerate(zip(r_out, t_out)):
                    d = np.abs(a.astype(np.float64) - b)
                    step = steps[i] if i < len(steps) else None
                    units = d / step if step else d
                    units = np.round(units, 6)
                    lsb = max(lsb, float(units.max()))
                    exact += int((units == 0).sum())
                    total += units.size
            report[name].max_lsb = lsb
            report[name].bit_exact_ratio = exact / total if total else math.nan

    for name, row in report.items():
        if row.error:
            continue
        rules = runner_rules(all_rules, name)
        if name != "reference" and "reference" in results:
            if "max_lsb" in rules and row.max_lsb > rules["max_lsb"]:
                failures.append(f"{name}: {row.max_lsb:g} LSB from the reference (allowed {rules['max_lsb']})")
            if "min_bit_exact_ratio" in rules and row.bit_exact_ratio < rules["min_bit_exact_ratio"]:
                failures.append(f"{name}: bit-exact ratio {row.bit_exact_ratio:.4f} < {rules['min_bit_exact_ratio']}")
        if "min_sqnr_db" in rules and row.sqnr_db < rules["min_sqnr_db"]:
            failures.append(f"{name}: SQNR {row.sqnr_db:.1f} dB < {rules['min_sqnr_db']} dB vs the float model")
        if "max_rel_err" in rules and row.max_rel_err > rules["max_rel_err"]:
            failures.append(f"{name}: max relative error {row.max_rel_err:.3g} > {rules['max_rel_err']}")
        if "min_top1_agreement" in rules and row.top1_agreement < rules["min_top1_agreement"]:
            failures.append(f"{name}: top-1 agreement {row.top1_agreement:.3f} < {rules['min_top1_agreement']}")
    rep = VerifyReport(artifact.target, report, failures, all_rules)
    if strict:
        rep.raise_for_failure()
    return rep
