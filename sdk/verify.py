"""Verification: run an artifact and compare it with its float model, with the
float outputs stored at deploy time, and with the SDK's own reference.

For each runner the report holds, over all verification inputs:

``max_abs_err`` / ``max_rel_err`` / ``sqnr_db`` / ``top1_agreement``
    against the float model (the model given, or the golden outputs recorded
    at deploy time when neither a model nor inputs are given);
``golden_max_abs_err`` / ``golden_max_rel_err`` / ``golden_sqnr_db``
    against the golden outputs (``golden.npz``: the float model's outputs on the
    example inputs, recorded at deploy time), always: with a model, or with
    inputs but no model, the golden inputs are run once more for this;
``bit_exact_ratio`` / ``max_lsb``
    against the ``reference`` runner, in units of the output quantization step
    (only for targets with a reference; for float outputs the step is 1:
    ``bit_exact_ratio`` is then the fraction of identical floats, which says
    little, and the report shows ``ref_max_abs_err`` / ``ref_rel_err`` instead);
``extra["integers"]``
    a runner session's own integer comparison with the reference, when it has
    one (``session.integer_agreement(samples)``, e.g. binary-popcount's
    popcounts): ``{"what", "compared", "differ"}``; any difference fails;
``compared_with``
    which of ``"float model"``, ``"golden outputs"`` and ``"reference"`` the
    runner was held against (a runner compared with nothing fails);
``latency_ms``
    median wall time of one call in this runner (emulated runners report
    emulated time, not device time).

Pass criteria come from the target: the rules recorded in the manifest at
deploy time (``manifest["verify"]``), tightened by those the installed target
states now (:func:`target_rules`), so an edited manifest cannot loosen them.  A
target may give a runner its own criteria under ``"runners"`` (fp16-gpu holds
its float16-arithmetic runners to a looser error bound than fp16 storage).
The float-model bounds (``min_sqnr_db``, ``max_rel_err``) apply to the golden
comparison too; ``min_top1_agreement`` only to the float model on the inputs
given (one golden sample says little about agreement).
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Sequence

import numpy as np

from .errors import InputError, VerificationError

FLOAT_MODEL, GOLDEN, REFERENCE = "float model", "golden outputs", "reference"


@dataclasses.dataclass
class RunnerReport:
    runner: str
    max_abs_err: float = math.nan
    max_rel_err: float = math.nan
    sqnr_db: float = math.nan
    top1_agreement: float = math.nan
    bit_exact_ratio: float = math.nan
    max_lsb: float = math.nan
    ref_rel_err: float = math.nan       # float outputs: max |runner - reference| / max |reference|
    ref_max_abs_err: float = math.nan   # float outputs: max |runner - reference|
    latency_ms: float = math.nan
    golden_max_abs_err: float = math.nan
    golden_max_rel_err: float = math.nan
    golden_sqnr_db: float = math.nan
    compared_with: list = dataclasses.field(default_factory=list)
    extra: dict = dataclasses.field(default_factory=dict)
    error: str | None = None


@dataclasses.dataclass
class VerifyReport:
    """Outcome of :meth:`sdk.Artifact.verify`: per-runner rows and the verdict."""

    target: str
    runners: dict[str, RunnerReport]
    failures: list[str]
    rules: dict
    #: what the runners were run on (for the text form), and whether a float model was given
    inputs: str = ""
    model_given: bool = False

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
    golden_sqnr_db = property(lambda self: self._col("golden_sqnr_db"))
    golden_max_rel_err = property(lambda self: self._col("golden_max_rel_err"))
    compared_with = property(lambda self: self._col("compared_with"))

    def raise_for_failure(self) -> "VerifyReport":
        if self.failures:
            raise VerificationError(f"{self.target} artifact failed verification: " + "; ".join(self.failures))
        return self

    def to_dict(self) -> dict:
        return {"target": self.target, "passed": self.passed, "failures": self.failures, "rules": self.rules,
                "inputs": self.inputs, "model_given": self.model_given,
                "runners": {k: dataclasses.asdict(v) for k, v in self.runners.items()}}

    def __str__(self) -> str:
        """What was checked and how it came out, one line per runner and comparison; what could
        not be checked (no float model, no reference runner) is said, not shown as NaN columns."""
        lines = [f"{self.target} artifact, run on {self.inputs or 'the given inputs'}:"]
        for name, r in self.runners.items():
            if r.error:
                lines.append(f"  {name}: ERROR: {r.error}")
                continue
            lat = f"{r.latency_ms:.3f} ms/call" if math.isfinite(r.latency_ms) else "not timed"
            lines.append(f"  {name} ({lat}) compared with:")
            if FLOAT_MODEL in r.compared_with:
                lines.append(f"    the float (torch) model: {_errors(r.sqnr_db, r.max_abs_err, r.max_rel_err)}, "
                             f"top-1 agreement {r.top1_agreement:.4f}")
            if GOLDEN in r.compared_with:
                lines.append("    the golden outputs (recorded at deploy time): "
                             + _errors(r.golden_sqnr_db, r.golden_max_abs_err, r.golden_max_rel_err))
            if REFERENCE in r.compared_with:
                parts = []
                ints = r.extra.get("integers")
                if ints:
                    parts.append(f"{ints['what']}: {ints['compared']} compared, {ints['differ']} differ")
                if math.isfinite(r.ref_max_abs_err):
                    parts.append(f"float outputs max abs err {r.ref_max_abs_err:.3g}, "
                                 f"max rel err {r.ref_rel_err:.3g}")
                else:
                    parts.append(f"{r.bit_exact_ratio:.4f} of the quantized outputs bit-exact, "
                                 f"max {r.max_lsb:g} LSB")
                lines.append("    the reference runner: " + "; ".join(parts))
            if not r.compared_with:
                lines.append("    nothing")
        if not any(FLOAT_MODEL in r.compared_with for r in self.runners.values()):
            lines.append("not checked: fidelity vs the float (torch) model on these inputs (give it: "
                         "edgepack verify OUT --model M.pt2, or artifact.verify(model))")
        if "reference" not in self.runners:
            lines.append("not checked: agreement with the reference runner (not run)")
        lines.append("PASSED" if self.passed else "FAILED: " + "; ".join(self.failures))
        return "\n".join(lines)


def _errors(sqnr: float, abs_err: float, rel_err: float) -> str:
    return f"SQNR {sqnr:.1f} dB, max abs err {abs_err:.3g}, max rel err {rel_err:.3g}"


def runner_rules(rules: dict, runner: str) -> dict:
    """The pass criteria for ``runner``: the target's rules, with its
    ``rules["runners"][runner]`` entries taking precedence."""
    out = {k: v for k, v in rules.items() if k != "runners"}
    out.update(rules.get("runners", {}).get(runner, {}))
    return out


def _stricter(key: str, a, b):
    if key.startswith("min_"):
        return max(a, b)
    if key.startswith("max_"):
        return min(a, b)
    return a


def merge_rules(stored: dict, stated: dict) -> dict:
    """``stored`` rules tightened by ``stated`` ones: per key the stricter bound
    (the larger ``min_*``, the smaller ``max_*``), runner sections likewise."""
    out = {k: v for k, v in stored.items() if k != "runners"}
    for k, v in stated.items():
        if k != "runners":
            out[k] = _stricter(k, out[k], v) if k in out else v
    runners = {r: dict(v) for r, v in (stored.get("runners") or {}).items()}
    for r, sub in (stated.get("runners") or {}).items():
        mine = runners.setdefault(r, {})
        for k, v in sub.items():
            mine[k] = _stricter(k, mine[k], v) if k in mine else v
    if runners:
        out["runners"] = runners
    return out


def target_rules(artifact) -> dict:
    """The pass criteria the installed target states for ``artifact`` (``{}``
    when the target plugin is not installed or cannot be built)."""
    from . import plugins

    try:
        cls = plugins.get("target", artifact.target)
    except Exception:  # noqa: BLE001 - an unknown target falls back to the manifest's rules
        return {}
    config = (artifact.manifest.get("target") or {}).get("config") or {}
    for kwargs in (config, {}):
        try:
            target = cls(**kwargs)
            rules = target.rules_for(artifact.manifest.get("quantization"))
            return rules if isinstance(rules, dict) else {}
        except Exception:  # noqa: BLE001 - a config this version does not take: try the defaults
            continue
    return {}


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

    if isinstance(model, torch.export.ExportedProgram):
        model = model.module()
    try:
        model.eval()
    except NotImplementedError:      # a module of an ExportedProgram: it runs as exported and has no eval()
        pass
    outs = []
    with torch.no_grad():
        for s in samples:
            o = model(*[torch.from_numpy(x) for x in s])
            o = o if isinstance(o, (tuple, list)) else (o,)
            outs.append([t.detach().float().numpy() for t in o])
    return outs


def compare_outputs(outs: list[list[np.ndarray]], expected: list[list[np.ndarray]]) -> tuple[float, float, float]:
    """``(max_abs_err, max_rel_err, sqnr_db)`` of runner outputs against expected ones."""
    flat_ref = np.concatenate([np.asarray(o, np.float64).reshape(-1) for e in expected for o in e])
    flat = np.concatenate([np.asarray(o, np.float64).reshape(-1) for r in outs for o in r])
    if flat.shape != flat_ref.shape:
        raise InputError(f"the runner gave {flat.size} output values where {flat_ref.size} were expected")
    diff = np.abs(flat - flat_ref)
    return (float(diff.max()), float(diff.max() / max(float(np.abs(flat_ref).max()), 1e-12)),
            sqnr_db(flat_ref, flat))


def verify(artifact, model: Any = None, inputs: Sequence | None = None, runners: Sequence[str] | None = None,
           *, repeats: int = 5, strict: bool = False) -> VerifyReport:
    """Run ``artifact`` in each runner on ``inputs`` and compare (see module docstring).

    ``inputs``: a list of samples, each a tensor/array or a tuple of them,
    shaped exactly as the artifact's inputs; default: the golden inputs; an
    empty list is an :class:`~sdk.errors.InputError` (nothing would be compared).
    ``runners``: default, the target's default runner and ``reference``.
    ``strict=True`` raises :class:`VerificationError` instead of returning a failed report.
    """
    from .data import as_inputs

    gin, gout = artifact.golden()
    if inputs is None:
        samples = [gin]
        expected = [gout] if model is None else _float_outputs(model, samples)
        golden_in_samples = True        # the golden comparison reuses the outputs on sample 0
        described = "the golden inputs stored in the artifact (1 call)"
    else:
        inputs = [] if isinstance(inputs, (str, bytes)) else list(inputs)
        if not inputs:
            raise InputError("verify needs at least one input: pass a non-empty list of samples "
                             "(or no inputs at all to use the golden inputs stored in the artifact)")
        samples = [as_inputs(s, artifact.signature) for s in inputs]
        expected = _float_outputs(model, samples) if model is not None else None
        golden_in_samples = False
        described = f"{len(samples)} given input call(s)"
    available = artifact.runner_names()
    if runners is None:
        default = artifact.manifest["target"].get("default_runner", "host")
        runners = [default] + (["reference"] if "reference" in available and default != "reference" else [])
    all_rules = merge_rules(artifact.manifest.get("verify", {}) or {}, target_rules(artifact))
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
            golden_outs = outs[0] if golden_in_samples else fn(gin)
            agreement = getattr(fn, "integer_agreement", None)
            if agreement is not None and "reference" in runners:
                row.extra["integers"] = agreement(samples)
            results[name] = outs
            row.latency_ms = float(np.median(times)) * 1e3 if times else math.nan
            if getattr(fn, "latency_ms", None) is not None:     # emulated runners time the invoke itself
                row.extra["emulated_invoke_ms"] = fn.latency_ms
            if expected is not None:
                row.max_abs_err, row.max_rel_err, row.sqnr_db = compare_outputs(outs, expected)
                agree = [np.argmax(r[0].reshape(r[0].shape[0], -1), -1) ==
                         np.argmax(e[0].reshape(e[0].shape[0], -1), -1) for r, e in zip(outs, expected)]
                row.top1_agreement = float(np.mean(np.concatenate(agree)))
                if model is not None:
                    row.compared_with.append(FLOAT_MODEL)
            row.golden_max_abs_err, row.golden_max_rel_err, row.golden_sqnr_db = compare_outputs([golden_outs], [gout])
            row.compared_with.append(GOLDEN)
        except Exception as exc:  # a runner failing is a verification failure, reported by name
            row.error = f"{type(exc).__name__}: {exc}"
            failures.append(f"runner {name!r} failed: {row.error}")
            results.pop(name, None)
            continue

    if "reference" in results:
        ref = results["reference"]
        for name, outs in results.items():
            if name == "reference":
                continue
            lsb, exact, total = 0.0, 0, 0
            fdiff, fmax = 0.0, 0.0
            for r_out, t_out in zip(ref, outs):
                for i, (a, b) in enumerate(zip(r_out, t_out)):
                    d = np.abs(a.astype(np.float64) - b)
                    step = steps[i] if i < len(steps) else None
                    if not step and d.size:
                        fdiff, fmax = max(fdiff, float(d.max())), max(fmax, float(np.abs(a).max()))
                    units = d / step if step else d
                    units = np.round(units, 6)
                    lsb = max(lsb, float(units.max()))
                    exact += int((units == 0).sum())
                    total += units.size
            report[name].max_lsb = lsb
            report[name].bit_exact_ratio = exact / total if total else math.nan
            if fmax > 0 or fdiff > 0 or not any(steps):
                report[name].ref_max_abs_err = fdiff
                report[name].ref_rel_err = fdiff / fmax if fmax > 0 else 0.0 if fdiff == 0 else math.inf
            report[name].compared_with.append(REFERENCE)

    for name, row in report.items():
        if row.error:
            continue
        if not row.compared_with:
            failures.append(f"{name}: compared with nothing")
            continue
        rules = runner_rules(all_rules, name)
        ints = row.extra.get("integers")
        if ints and ints["differ"]:
            failures.append(f"{name}: {ints['differ']} of {ints['compared']} {ints['what']} differ from the "
                            "reference")
        if name != "reference" and "reference" in results:
            if "max_lsb" in rules and row.max_lsb > rules["max_lsb"]:
                failures.append(f"{name}: {row.max_lsb:g} LSB from the reference (allowed {rules['max_lsb']})")
            if "min_bit_exact_ratio" in rules and row.bit_exact_ratio < rules["min_bit_exact_ratio"]:
                failures.append(f"{name}: bit-exact ratio {row.bit_exact_ratio:.4f} < {rules['min_bit_exact_ratio']}")
            if "max_ref_rel_err" in rules and row.ref_rel_err > rules["max_ref_rel_err"]:
                failures.append(f"{name}: float outputs {row.ref_rel_err:.3g} (relative) from the reference "
                                f"(allowed {rules['max_ref_rel_err']})")
        checks = []
        if expected is not None:
            checks.append((row.sqnr_db, row.max_rel_err, "the float model" if model is not None
                           else "the golden outputs stored at deploy time"))
        if model is not None or not golden_in_samples:
            checks.append((row.golden_sqnr_db, row.golden_max_rel_err, "the golden outputs stored at deploy time"))
        for sqnr, rel, what in checks:
            # NaN (nothing computed) fails too: `not x >= bound` rather than `x < bound`
            if "min_sqnr_db" in rules and not sqnr >= rules["min_sqnr_db"]:
                failures.append(f"{name}: SQNR {sqnr:.1f} dB < {rules['min_sqnr_db']} dB vs {what}")
            if "max_rel_err" in rules and not rel <= rules["max_rel_err"]:
                failures.append(f"{name}: max relative error {rel:.3g} > {rules['max_rel_err']} vs {what}")
        if expected is not None and "min_top1_agreement" in rules \
                and not row.top1_agreement >= rules["min_top1_agreement"]:
            failures.append(f"{name}: top-1 agreement {row.top1_agreement:.3f} < {rules['min_top1_agreement']}")
    rep = VerifyReport(artifact.target, report, failures, all_rules, inputs=described,
                       model_given=model is not None)
    if strict:
        rep.raise_for_failure()
    return rep
