"""``edgepack report``: one self-contained HTML page about one artifact, or comparing several.

The page is meant to be looked at: bar charts first, the tables under them.
For each artifact (several artifacts of one model side by side: arm-fp32 vs
arm-int8 vs fp16-gpu, or before and after a recipe) it shows

* **size**: the model file split into weights, quantization parameters and
  structure (:func:`size_breakdown`), per layer and in total, next to the
  artifact's own bookkeeping files;
* **compute**: MACs / BOPs and the cost model's estimated latency per layer
  (``profile.json``);
* **latency** per runner (host, qemu-aarch64, reference, ...): every call timed
  (:func:`time_runner`), shown as median, quartiles and min/max over the runs;
* **fidelity**: :meth:`sdk.Artifact.verify` per runner: SQNR and max error
  against the float model when one is given (else against the golden outputs
  recorded at deploy time; the page says which comparison was made and what
  could not be checked), bit-exactness against the reference runner;
* **per-layer errors** from :mod:`sdk.layer_errors` where it can analyse
  the artifact (else the reason it cannot);
* **recipe stages**: each stage's configuration and its report (the
  manifest's ``stages``: sparsity reached, channels removed, accuracy before
  and after, ...) as tables, with the sensitivity curves drawn where a stage
  measured them, and the per-weight encodings shipped (bits, sparsity).

The file holds everything it shows: charts are PNG ``data:`` URIs, the CSS is
inline, and nothing is fetched (no scripts, fonts or links), so it can be
mailed or attached to a CI run.  Every string that comes from an artifact is
HTML-escaped: an artifact is data from somewhere else.  Charts need matplotlib
(``pip install edgepack[report]``); it is drawn with the Agg canvas and never
touches pyplot's global state.

>>> format_bytes(20064)
'19.6 KiB'
"""

from __future__ import annotations

import base64
import dataclasses
import html
import io
import json
import logging
import math
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable, Sequence

from .errors import EdgepackError, InputError, ToolchainError

log = logging.getLogger("edgepack.report")

#: files every artifact carries for edgepack itself, not for the device
BOOKKEEPING = ("manifest.json", "profile.json", "golden.npz", "signature.json")
#: TFLite stores a quantization scale as float32 and a zero point as int64
_SCALE_BYTES, _ZERO_POINT_BYTES = 4, 8
#: most rows one table shows (a stage report may hold up to 100 000)
MAX_TABLE_ROWS = 200
_PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f")
_PARTS = {"weights": "#4c72b0", "quantization": "#dd8452", "structure": "#55a868", "bookkeeping": "#c7c7c7"}


# --- data ---------------------------------------------------------------------


@dataclasses.dataclass
class LayerSize:
    """Bytes of one layer's constants in the model file."""

    name: str
    op: str
    params: int
    weights: int                # weight and bias payloads as stored, sparse index arrays included
    quantization: int | None    # scale + zero-point payloads (None: not separable in this format)
    sparse_indices: int = 0     # of ``weights``: the index arrays of weights stored sparse


@dataclasses.dataclass
class SizeBreakdown:
    """Where the bytes of an artifact go (see :func:`size_breakdown`)."""

    model_files: dict[str, int]      # the files a device needs, by name
    bookkeeping: dict[str, int]      # manifest, profile, golden outputs, signature
    weights: int                     # sparse index arrays included
    quantization: int | None
    structure: int                   # the rest of the model files: tables, names, shapes, code, padding
    layers: list[LayerSize]
    note: str = ""
    sparse_indices: int = 0          # of ``weights``

    @property
    def model_bytes(self) -> int:
        return sum(self.model_files.values())


@dataclasses.dataclass
class Timing:
    """Per-call times of one runner (ms), wall-clock on this host, and the emulated invoke
    times where the runner measures them inside an emulator."""

    runner: str
    wall_ms: list[float] = dataclasses.field(default_factory=list)
    emulated_ms: list[float] = dataclasses.field(default_factory=list)
    error: str | None = None


@dataclasses.dataclass
class _Entry:
    label: str
    art: Any
    size: SizeBreakdown
    timings: dict[str, Timing]
    skipped: dict[str, str]            # runner -> why it did not run
    verify: Any                        # VerifyReport | None (no runner could run)
    layer_errors: Any                  # LayerErrorReport | None
    layer_errors_reason: str | None


def format_bytes(n: float | None) -> str:
    """``1536`` → ``'1.5 KiB'``; ``None`` → ``'–'``."""
    if n is None:
        return "–"
    for unit, div in (("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= div:
            return f"{n / div:.1f} {unit}"
    return f"{int(n)} B"


def _fmt(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if math.isnan(v):
            return "–"
        if math.isinf(v):
            return "∞" if v > 0 else "-∞"
        return f"{v:.4g}"
    if isinstance(v, (list, tuple)):
        if all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v):
            shown = ", ".join(_fmt(x) for x in v[:12])
            return f"[{shown}{', …' if len(v) > 12 else ''}]"
        return json.dumps(v)[:200]
    if isinstance(v, dict):
        return json.dumps(v)[:200]
    return str(v)


# --- size ---------------------------------------------------------------------


def size_breakdown(art) -> SizeBreakdown:
    """Split the artifact's model file(s) into weights, quantization parameters and structure.

    For a LiteRT artifact (``model.tflite``) the flatbuffer is read after
    :func:`sdk.litert.fbcheck.check_file` has checked it: each constant tensor's
    buffer is charged to the layer its name starts with (``conv2d/weight`` →
    layer ``conv2d``), or whose output it is (the profile's ``tensor``: a fused
    activation's, ``relu``), as weights when that layer has parameters (shape and
    permutation constants count as structure), with the index arrays of a
    weight stored sparse (``Tensor.sparsity``, CSR), and each tensor's scales
    (float32) and zero points (int64) as that layer's quantization parameters;
    what remains of the file (tables, names, shapes, alignment) is structure.
    For other formats (binary-popcount C + ``weights.bin``) the layer's stored
    parameter bytes from ``profile.json`` are its weights (scales included)
    and the rest of the model files is structure (code, headers).

    >>> size_breakdown(sdk.load("out/model")).weights          # doctest: +SKIP
    14072
    """
    files = {n: int(m["bytes"]) for n, m in art.manifest["files"].items()}
    book = {n: b for n, b in files.items() if n in BOOKKEEPING}
    mpath = art.path / "manifest.json"
    book["manifest.json"] = mpath.stat().st_size if mpath.is_file() else 0
    model_files = {n: b for n, b in files.items() if n not in BOOKKEEPING}
    layers = [r for r in art.profile.get("layers", []) if isinstance(r, dict)]
    if "model.tflite" in model_files:
        return _tflite_breakdown(art, model_files, book, layers)
    rows = [LayerSize(str(r.get("name", "?")), str(r.get("op", "")), int(r.get("params", 0)), int(r.get("bytes", 0)),
                      None) for r in layers]
    weights = sum(r.weights for r in rows)
    return SizeBreakdown(model_files, book, weights, None, max(sum(model_files.values()) - weights, 0), rows,
                         note="this format stores scales with the weights: they are counted as weights")


def _tflite_breakdown(art, model_files: dict, book: dict, layers: list[dict]) -> SizeBreakdown:
    from .litert.fbcheck import check_file
    from .litert.flatbuffer import read_model

    data = check_file(art)                       # the model the runners load (weight container decoded)
    model = read_model(data)
    by_name = {str(r.get("name")): r for r in layers}
    by_output = {str(r["tensor"]): str(r.get("name")) for r in layers if isinstance(r.get("tensor"), str)}
    weights = {n: 0 for n in by_name}
    quant: dict[str, int] = {n: 0 for n in by_name}
    indices: dict[str, int] = {n: 0 for n in by_name}
    other_quant = 0
    seen_buffers: set[int] = set()
    for graph in model.subgraphs:
        for t in graph.tensors:
            name = (t.name or b"").decode("utf-8", "replace")
            owner = by_output.get(name) or name.split("/", 1)[0]
            layer = by_name.get(owner)
            q = t.quantization
            qbytes = 0
            if q is not None:
                qbytes = (_SCALE_BYTES * len(q.scale if q.scale is not None else [])
                          + _ZERO_POINT_BYTES * len(q.zeroPoint if q.zeroPoint is not None else []))
            if layer is not None:
                quant[owner] += qbytes
            else:
                other_quant += qbytes
            buf = model.buffers[t.buffer] if 0 <= t.buffer < len(model.buffers) else None
            nbytes = len(buf.data) if buf is not None and buf.data is not None else 0
            if not nbytes or t.buffer in seen_buffers:
                continue
            seen_buffers.add(t.buffer)
            if layer is not None and int(layer.get("params", 0)) > 0:   # shape constants count as structure
                idx = _sparse_index_bytes(t)
                weights[owner] += nbytes + idx
                indices[owner] += idx
    rows = [LayerSize(n, str(r.get("op", "")), int(r.get("params", 0)), weights[n], quant[n], indices[n])
            for n, r in by_name.items()]
    total_w = sum(weights.values())
    total_q = sum(quant.values()) + other_quant
    ondisk = model_files["model.tflite"]
    entry = art.manifest.get("weight_container") if isinstance(art.manifest.get("weight_container"), dict) else {}
    container = entry.get("file") if entry.get("file") in model_files else None
    coded = model_files.get(container, 0) if container else 0
    note = ""
    if ondisk < len(data):          # a skeleton: those weights travel only entropy-coded, in the container
        total_w = max(total_w - (len(data) - ondisk), 0)
        note = (f"model.tflite ships without {len(data) - ondisk} weight bytes: {container} holds them "
                "entropy-coded (counted as weights); the per-layer weights are the decoded sizes")
    elif container:
        raw = sum(int(t.get("bytes", 0)) for t in entry.get("tensors", []) if isinstance(t, dict))
        how = "zero-run coded" if entry.get("format") == "edgepack-zr" else "entropy-coded (Deep Compression)"
        note = (f"{container} ({coded} B, counted as weights) holds {raw} B of model.tflite's int8 weights again, "
                f"{how}: a device needs only model.tflite without them "
                f"({ondisk - raw} B) and {container}: {ondisk - raw + coded} B")
    others = sum(b for n, b in model_files.items() if n not in ("model.tflite", container))
    structure = max(ondisk - total_w - total_q, 0) + others
    return SizeBreakdown(model_files, book, total_w + coded, total_q, structure, rows, note=note,
                         sparse_indices=sum(indices.values()))


def _sparse_index_bytes(tensor) -> int:
    """Bytes of the CSR segment and index arrays of a sparse constant (0 for a dense one)."""
    import numpy as np

    total = 0
    for m in getattr(tensor.sparsity, "dimMetadata", None) or []:
        for vec in (m.arraySegments, m.arrayIndices):
            values = getattr(vec, "values", None)
            if values is not None:
                total += np.asarray(values).nbytes
    return total


# --- latency ------------------------------------------------------------------


def time_runner(session, sample: list, *, runner: str = "", repeats: int = 30, budget_s: float = 2.0,
                min_runs: int = 3) -> Timing:
    """Time ``session(sample)`` after one warm-up call: ``repeats`` calls, fewer when they take
    longer than ``budget_s`` in all (but at least ``min_runs``).  Emulated sessions also give
    each call's invoke time measured inside the emulator (``latencies_ms``).

    >>> t = time_runner(lambda s: s, [1], repeats=5)
    >>> len(t.wall_ms)
    5
    """
    timing = Timing(runner)
    session(sample)
    emulated = getattr(session, "latencies_ms", None)
    before = len(emulated) if isinstance(emulated, list) else 0
    start = time.perf_counter()
    while len(timing.wall_ms) < repeats and (len(timing.wall_ms) < min_runs or time.perf_counter() - start < budget_s):
        t0 = time.perf_counter()
        session(sample)
        timing.wall_ms.append((time.perf_counter() - t0) * 1e3)
    if isinstance(emulated, list):
        timing.emulated_ms = [float(x) for x in emulated[before:]]      # the timed calls' invokes
    return timing


def _spread(ms: list[float]) -> dict[str, float]:
    if not ms:
        return {}
    q = statistics.quantiles(ms, n=4, method="inclusive") if len(ms) > 1 else [ms[0]] * 3
    return {"n": len(ms), "median": statistics.median(ms), "q1": q[0], "q3": q[2], "min": min(ms), "max": max(ms)}


# --- collecting ---------------------------------------------------------------


def _as_artifacts(artifacts) -> list:
    from .artifact import Artifact, load

    if isinstance(artifacts, (Artifact, str, os.PathLike)):
        artifacts = [artifacts]
    try:
        items = list(artifacts)
    except TypeError:
        raise InputError(f"build_report takes an artifact, a path or a list of them, got "
                         f"{type(artifacts).__name__}") from None
    if not items:
        raise InputError("build_report needs at least one artifact")
    out = [a if isinstance(a, Artifact) else load(a) for a in items]
    shapes = {tuple(tuple(t.shape) for t in a.inputs) for a in out}
    if len(shapes) > 1:
        raise InputError("a report compares artifacts of one model, but their inputs differ: "
                         + "; ".join(f"{a.path.name}: {[tuple(t.shape) for t in a.inputs]}" for a in out)
                         + " -- make one report per model")
    return out


def _labels(arts: list) -> list[str]:
    names = [a.path.name for a in arts]
    if len(set(names)) < len(names):
        names = [f"{a.path.name} ({a.target})" for a in arts]
    if len(set(names)) < len(names):
        names = [f"{n} #{i + 1}" for i, n in enumerate(names)]
    return names


def _choose_runners(arts: list, runners: Sequence[str] | None) -> list[tuple[list[str], dict[str, str]]]:
    """Per artifact: the runners to use and those skipped, with why."""
    from . import plugins

    if runners is not None:
        runners = [runners] if isinstance(runners, str) else list(runners)
        known = {r for a in arts for r in a.runner_names()}
        unknown = [r for r in runners if r not in known]
        if unknown:
            raise InputError(f"unknown runner(s) {', '.join(map(repr, unknown))}; these artifacts have: "
                             f"{', '.join(sorted(known)) or '(none registered)'} (edgepack plugins lists them)")
    out = []
    for a in arts:
        names = a.runner_names()
        use, skipped = [], {}
        for r in (runners if runners is not None else names):
            if r not in names:
                skipped[r] = f"not a runner of target {a.target}"
                continue
            reason = plugins.get_runner(r, a.target)().unavailable()
            if reason:
                skipped[r] = reason
            else:
                use.append(r)
        out.append((use, skipped))
    return out


def _layer_errors(art, model, inputs) -> tuple[Any, str | None]:
    from .layer_errors import layer_errors

    try:
        return layer_errors(art, model=model, inputs=inputs), None
    except EdgepackError as exc:
        return None, f"{type(exc).__name__}: {exc}"


def _collect(arts, model, inputs, runners, repeats: int, budget_s: float) -> list[_Entry]:
    from .data import as_inputs

    plans = _choose_runners(arts, runners)
    samples = {id(a): [as_inputs(s, a.signature) for s in inputs] if inputs else None for a in arts}   # InputError
    entries = []
    for art, label, (use, skipped) in zip(arts, _labels(arts), plans):
        log.info("%s: sizes", label)
        size = size_breakdown(art)
        log.info("%s: verify in %s", label, ", ".join(use) or "no runner")
        # a runner that fails is a row of the report (verify records it); bad inputs raise
        rep = art.verify(model, inputs=samples[id(art)], runners=use, repeats=1) if use else None
        sample = samples[id(art)][0] if inputs else art.golden()[0]
        timings = {}
        for r in use:
            row = rep.runners.get(r) if rep is not None else None
            if row is not None and row.error:
                timings[r] = Timing(r, error=row.error)
                continue
            log.info("%s: timing %s", label, r)
            try:
                t = time_runner(art.session(r), sample, runner=r, repeats=repeats, budget_s=budget_s)
            except EdgepackError as exc:
                t = Timing(r, error=f"{type(exc).__name__}: {exc}")
            timings[r] = t
        log.info("%s: per-layer errors", label)
        le, le_reason = _layer_errors(art, model, inputs)
        entries.append(_Entry(label, art, size, timings, skipped, rep, le, le_reason))
    return entries


# --- charts -------------------------------------------------------------------


def _matplotlib():
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise ToolchainError("edgepack report draws its charts with matplotlib, which is not installed: "
                             "pip install edgepack[report]  (or: pip install 'matplotlib>=3.8')") from None
    return Figure, FigureCanvasAgg


class _Charts:
    """Figures drawn on matplotlib's Agg canvas (no pyplot), returned as PNG data URIs."""

    def __init__(self):
        self.Figure, self.Canvas = _matplotlib()

    def figure(self, width: float, height: float, labels: Sequence[str] = (), *, bottom: float = 0.5,
               top: float = 0.35):
        """A figure whose axes leave room (inches) for y tick ``labels`` (8 pt), an x label
        ``bottom`` and a title ``top``: fixed margins, three times faster to draw than a
        layout engine."""
        fig = self.Figure(figsize=(width, height), dpi=100)
        self.Canvas(fig)
        left = 0.35 + 0.062 * max([len(str(x)) for x in labels] + [4])
        fig.subplots_adjust(left=min(left / width, 0.45), right=1 - 0.2 / width, bottom=bottom / height,
                            top=1 - top / height)
        return fig

    def uri(self, fig) -> str:
        buf = io.BytesIO()
        fig.savefig(buf, format="png", metadata={"Software": None})
        return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")

    def totals(self, entries: list[_Entry]) -> str:
        labels = [e.label for e in entries]
        fig = self.figure(9, 1.3 + 0.55 * len(entries), labels, bottom=0.9)
        ax = fig.add_subplot()
        left = [0.0] * len(entries)
        parts = (("weights", "weights"), ("quantization", "quantization parameters"),
                 ("structure", "model structure / code"), ("bookkeeping", "artifact bookkeeping (not shipped)"))
        for key, text in parts:
            vals = [float(_part(e.size, key) or 0) / 1024 for e in entries]
            ax.barh(labels, vals, left=left, color=_PARTS[key], label=text)
            left = [a + b for a, b in zip(left, vals)]
        for i, e in enumerate(entries):
            ax.text(left[i], i, f"  {format_bytes(e.size.model_bytes)} model", va="center", fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel("KiB")
        ax.set_xlim(0, max(left) * 1.25 or 1)
        fig.legend(fontsize=8, loc="lower center", ncols=4, frameon=False)
        ax.set_title("artifact size")
        return self.uri(fig)

    def grouped(self, names: list[str], series: list[tuple[str, str, list[float], list[float] | None]],
                xlabel: str, title: str, log: bool = False) -> str:
        """Horizontal bars per layer, one group member per series ``(label, colour, values, stacked-on)``."""
        n = max(len(series), 1)
        fig = self.figure(9, 0.9 + len(names) * (0.18 + 0.16 * n), names)
        ax = fig.add_subplot()
        h = 0.8 / n
        for k, (label, colour, vals, extra) in enumerate(series):
            ys = [i - 0.4 + h * (k + 0.5) for i in range(len(names))]
            ax.barh(ys, vals, height=h, color=colour, label=label)
            if extra is not None:
                ax.barh(ys, extra, left=vals, height=h, color=colour, alpha=0.45, hatch="//", edgecolor="white")
        ax.set_yticks(range(len(names)), names, fontsize=8)
        ax.invert_yaxis()
        if log:
            ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_title(title)
        if len(series) > 1:
            ax.legend(fontsize=8, loc="lower right")
        ax.grid(axis="x", alpha=0.3)
        return self.uri(fig)

    def latency(self, rows: list[tuple[str, str, list[float]]]) -> str:
        """Box plots of per-call times: ``(label, colour, ms)`` each."""
        fig = self.figure(9, 0.9 + 0.42 * len(rows), [r[0] for r in rows])
        ax = fig.add_subplot()
        data = [r[2] for r in rows]
        box = ax.boxplot(data, orientation="horizontal", patch_artist=True, whis=(0, 100), widths=0.6)
        for patch, (_, colour, _) in zip(box["boxes"], rows):
            patch.set_facecolor(colour)
            patch.set_alpha(0.75)
        for med in box["medians"]:
            med.set_color("black")
        ax.set_yticks(range(1, len(rows) + 1), [r[0] for r in rows], fontsize=8)
        ax.invert_yaxis()
        medians = [statistics.median(d) for d in data if d]
        if medians and max(medians) > 30 * max(min(medians), 1e-9):
            ax.set_xscale("log")
        ax.set_xlabel("ms per call (box: quartiles, whiskers: min / max)")
        ax.set_title("latency per runner")
        ax.grid(axis="x", alpha=0.3)
        return self.uri(fig)

    def sqnr(self, runners: list[str], series: list[tuple[str, str, list[float]]], title: str) -> str:
        fig = self.figure(9, 3.2, ["SQNR"], bottom=0.4)
        ax = fig.add_subplot()
        n = max(len(series), 1)
        w = 0.8 / n
        finite = [v for _, _, vals in series for v in vals if math.isfinite(v)]
        top = max(finite + [1.0])
        for k, (label, colour, vals) in enumerate(series):
            xs = [i - 0.4 + w * (k + 0.5) for i in range(len(runners))]
            shown = [top * 1.1 if v == math.inf else (v if math.isfinite(v) else 0.0) for v in vals]
            bars = ax.bar(xs, shown, width=w, color=colour, label=label)
            for b, v in zip(bars, vals):
                text = "∞ (exact)" if v == math.inf else ("n/a" if not math.isfinite(v) else f"{v:.1f}")
                ax.annotate(text, (b.get_x() + b.get_width() / 2, b.get_height()), ha="center", va="bottom",
                            fontsize=7, xytext=(0, 2), textcoords="offset points")
        ax.set_xticks(range(len(runners)), runners)
        ax.set_ylabel("SQNR (dB)")
        ax.set_ylim(0, top * 1.25)
        ax.set_title(title)
        ax.legend(fontsize=8)
        ax.grid(axis="y", alpha=0.3)
        return self.uri(fig)

    def curves(self, report: dict) -> str | None:
        """A sensitivity stage's curves: metric vs fraction pruned, one line per unit, the chosen
        fraction marked; ``None`` when ``report`` holds none."""
        units = _curve_units(report)
        if not units:
            return None
        metrics = [m for m in ("loss", "accuracy") if all(isinstance(u.get(m), list) for u in units)]
        fig = self.figure(9, 3.4, bottom=0.5, top=0.4)
        fig.subplots_adjust(left=0.07, wspace=0.22)
        axes = fig.subplots(1, len(metrics), squeeze=False)[0]
        base = report.get("base") if isinstance(report.get("base"), dict) else {}
        levels = [float(x) for x in report["levels"]]
        for ax, metric in zip(axes, metrics):
            for k, u in enumerate(units):
                size = u.get("size")
                counts = u.get("counts")
                xs = ([c / size for c in counts] if isinstance(size, (int, float)) and size > 0
                      and isinstance(counts, list) and len(counts) == len(levels) else levels)
                ys = [float(v) for v in u[metric]]
                if _num(base.get(metric)):
                    xs, ys = [0.0] + xs, [float(base[metric])] + ys
                colour = _PALETTE[k % len(_PALETTE)]
                ax.plot(xs, ys, marker="o", ms=3, color=colour, label=str(u.get("name", k)))
                chosen = u.get("sparsity")
                if _num(chosen):
                    ax.axvline(float(chosen), color=colour, ls=":", lw=1)
            ax.set_xlabel("fraction of the layer pruned (dotted: chosen)")
            ax.set_ylabel(str(report.get("metric", "val loss")) if metric == "loss" else "val accuracy")
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=7)
        fig.suptitle("sensitivity: each layer pruned alone")
        return self.uri(fig)


def _num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _curve_units(report: dict) -> list[dict]:
    levels = report.get("levels")
    units = report.get("units")
    if not (isinstance(levels, list) and levels and all(_num(x) for x in levels) and isinstance(units, list)):
        return []
    ok = [u for u in units if isinstance(u, dict) and isinstance(u.get("loss"), list)
          and len(u["loss"]) == len(levels) and all(_num(v) for v in u["loss"])]
    return ok if len(ok) == len(units) else []


def _part(size: SizeBreakdown, key: str) -> int | None:
    if key == "bookkeeping":
        return sum(size.bookkeeping.values())
    return getattr(size, key)


# --- HTML ---------------------------------------------------------------------

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;margin:24px auto;
max-width:1100px;color:#1b1f24;line-height:1.4;padding:0 16px}
h1{font-size:1.6em;margin-bottom:4px}h2{border-bottom:2px solid #4c72b0;padding-bottom:3px;margin-top:32px}
h3{margin-bottom:6px}.sub{color:#57606a;margin-top:0}
table{border-collapse:collapse;margin:8px 0 16px;font-size:13px}
th,td{border:1px solid #d0d7de;padding:3px 8px;text-align:left;vertical-align:top}
th{background:#e8eef6}td.n{text-align:right;font-variant-numeric:tabular-nums}
tr:nth-child(even) td{background:#f6f8fa}
img{max-width:100%;display:block;margin:8px 0;border:1px solid #eaeef2}
.note{background:#fff8c5;border-left:4px solid #d4a72c;padding:6px 10px;margin:8px 0}
.bad{color:#cf222e;font-weight:600}.ok{color:#1a7f37;font-weight:600}
.swatch{display:inline-block;width:10px;height:10px;margin-right:5px;border-radius:2px}
details{margin:6px 0}summary{cursor:pointer;color:#0550ae}
"""


def _e(v: Any) -> str:
    return html.escape(_fmt(v) if not isinstance(v, str) else v, quote=True)


def _table(header: Sequence[str], rows: Iterable[Sequence[Any]], numeric: Sequence[bool] | None = None,
           limit: int = MAX_TABLE_ROWS) -> str:
    rows = list(rows)
    out = ["<table><tr>" + "".join(f"<th>{_e(h)}</th>" for h in header) + "</tr>"]
    for row in rows[:limit]:
        cells = []
        for i, v in enumerate(row):
            num = numeric[i] if numeric is not None and i < len(numeric) else isinstance(v, (int, float))
            cells.append(f"<td class=\"n\">{_e(v)}</td>" if num else f"<td>{_e(v)}</td>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</table>")
    if len(rows) > limit:
        out.append(f"<p class=\"sub\">… {len(rows) - limit} more rows not shown</p>")
    return "".join(out)


def _img(uri: str, alt: str) -> str:
    return f"<img src=\"{uri}\" alt=\"{html.escape(alt, quote=True)}\">"


def _note(text: str) -> str:
    return f"<p class=\"note\">{html.escape(text)}</p>"


def _layer_order(entries: list[_Entry], rows_of) -> list[str]:
    names: list[str] = []
    for e in entries:
        for r in rows_of(e):
            if r not in names:
                names.append(r)
    return names


def _section_summary(entries: list[_Entry], use_model: bool) -> str:
    rows = []
    for i, e in enumerate(entries):
        a, totals = e.art, e.art.profile.get("totals", {})
        first = next(iter(e.timings.values()), None)
        lat = _spread(first.wall_ms).get("median") if first and not first.error else None
        sq = None
        if e.verify is not None and e.verify.runners:
            r0 = next(iter(e.verify.runners.values()))
            sq = None if r0.error else (r0.sqnr_db if use_model else r0.golden_sqnr_db)
        verdict = ("–" if e.verify is None else "passed" if e.verify.passed else "FAILED")
        rows.append([f"<span class=\"swatch\" style=\"background:{_PALETTE[i % len(_PALETTE)]}\"></span>"
                     + html.escape(e.label), html.escape(a.target), html.escape(str(a.path)),
                     _e(format_bytes(e.size.model_bytes)), _e(format_bytes(e.size.weights)),
                     _e(totals.get("macs")), _e(totals.get("bops")),
                     _e(f"{lat:.4g} ms ({first.runner})" if lat is not None else "–"),
                     _e(f"{sq:.1f} dB" if sq is not None and not math.isnan(sq) else "–"),
                     f"<span class=\"{'ok' if verdict == 'passed' else 'bad'}\">{verdict}</span>"])
    head = ["artifact", "target", "path", "model size", "weights", "MACs", "BOPs", "median latency",
            f"SQNR vs {'float model' if use_model else 'golden outputs'} (first runner)", "verify"]
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    return ("<table><tr>" + "".join(f"<th>{h}</th>" for h in head) + "</tr>" + body + "</table>")


def _section_size(entries: list[_Entry], charts: _Charts) -> str:
    parts = ["<h2>Size</h2>", _img(charts.totals(entries), "artifact size breakdown")]
    rows = []
    for e in entries:
        s = e.size
        rows.append([e.label, s.weights, s.sparse_indices, s.quantization if s.quantization is not None
                     else "in weights", s.structure, s.model_bytes, sum(s.bookkeeping.values()),
                     ", ".join(f"{n} {format_bytes(b)}" for n, b in s.model_files.items())])
    parts.append(_table(["artifact", "weights (B)", "of which sparse indices (B)", "quantization params (B)",
                         "structure (B)", "model files (B)", "bookkeeping (B)", "model files"], rows,
                        [False] + [True] * 6 + [False]))
    for e in entries:
        if e.size.note:
            parts.append(_note(f"{e.label}: {e.size.note}"))
    names = _layer_order(entries, lambda e: [r.name for r in e.size.layers if r.params > 0])
    if names:
        series = []
        for i, e in enumerate(entries):
            by = {r.name: r for r in e.size.layers}
            w = [by[n].weights / 1024 if n in by else 0.0 for n in names]
            q = [(by[n].quantization or 0) / 1024 if n in by else 0.0 for n in names]
            series.append((e.label, _PALETTE[i % len(_PALETTE)], w, q if any(q) else None))
        hatched = any(x[3] is not None for x in series)
        parts.append(_img(charts.grouped(names, series, "KiB" + (" (solid: weights, hatched: quantization "
                                                               "parameters)" if hatched else " of weights"),
                                         "size per layer"), "size per layer"))
        sparse = any(r.sparse_indices for e in entries for r in e.size.layers)
        head = ["layer", "op", "params"]
        for e in entries:
            head += [f"{e.label} weights (B)", f"{e.label} quant (B)"] + ([f"{e.label} sparse idx (B)"] if sparse
                                                                           else [])
        rows = []
        for n in names:
            found = [next((r for r in e.size.layers if r.name == n), None) for e in entries]
            first = next(r for r in found if r is not None)
            row: list[Any] = [n, first.op, first.params]
            for r in found:
                row += [r.weights if r else None, (r.quantization if r.quantization is not None else "in weights")
                        if r else None] + ([r.sparse_indices if r else None] if sparse else [])
            rows.append(row)
        parts.append(_table(head, rows, [False, False] + [True] * (len(head) - 2)))
    return "".join(parts)


def _section_compute(entries: list[_Entry], charts: _Charts) -> str:
    def compute_rows(e):
        return [r for r in e.art.profile.get("layers", []) if (r.get("macs") or 0) > 0 or (r.get("bops") or 0) > 0]

    names = _layer_order(entries, lambda e: [str(r.get("name")) for r in compute_rows(e)])
    parts = ["<h2>Compute</h2>"]
    if not names:
        return "".join(parts) + "<p>No layer reports MACs or BOPs.</p>"
    series = []
    any_bops = False
    for i, e in enumerate(entries):
        by = {str(r.get("name")): r for r in e.art.profile.get("layers", [])}
        macs = [float(by[n].get("macs", 0)) if n in by else 0.0 for n in names]
        bops = [float(by[n].get("bops", 0)) if n in by else 0.0 for n in names]
        any_bops |= any(bops)
        series.append((e.label, _PALETTE[i % len(_PALETTE)], macs, bops if any(bops) else None))
    parts.append(_img(charts.grouped(names, series, "operations per call" + (" (hatched: BOPs)" if any_bops else ""),
                                     "MACs per layer" + (" and binary operations (BOPs)" if any_bops else "")),
                      "MACs per layer"))
    head = ["layer", "op", "in shape", "out shape"]
    for e in entries:
        head += [f"{e.label} MACs", f"{e.label} BOPs", f"{e.label} est. µs"]
    rows = []
    for n in names:
        row: list[Any] = [n]
        first = None
        cells: list[Any] = []
        for e in entries:
            r = next((x for x in e.art.profile.get("layers", []) if str(x.get("name")) == n), None)
            est = next((x for x in (e.art.profile.get("estimate") or {}).get("layers", []) if x.get("name") == n), {})
            first = first or r
            cells += [r.get("macs") if r else None, r.get("bops") if r else None, est.get("est_latency_us")]
        row += [first.get("op", ""), "×".join(map(str, first.get("in_shape", []))),
                "×".join(map(str, first.get("out_shape", [])))] + cells
        rows.append(row)
    parts.append(_table(head, rows, [False] * 4 + [True] * (len(head) - 4)))
    devices = {e.label: (e.art.profile.get("estimate") or {}).get("device") for e in entries}
    if any(devices.values()):
        parts.append("<p class=\"sub\">Estimated latency: the target's roofline cost model on "
                     + html.escape("; ".join(f"{k}: {v}" for k, v in devices.items() if v)) + ".</p>")
    return "".join(parts)


def _section_latency(entries: list[_Entry], charts: _Charts) -> str:
    parts = ["<h2>Latency</h2>"]
    boxes, rows = [], []
    for i, e in enumerate(entries):
        colour = _PALETTE[i % len(_PALETTE)]
        for r, t in e.timings.items():
            if t.error:
                rows.append([e.label, r, "error", None, None, None, None, None, t.error])
                continue
            for what, ms in (("wall per call", t.wall_ms), ("emulated invoke", t.emulated_ms)):
                if not ms:
                    continue
                s = _spread(ms)
                boxes.append((f"{e.label} · {r}" + (" (emulated)" if what == "emulated invoke" else ""), colour, ms))
                rows.append([e.label, r, what, s["n"], s["median"], s["q1"], s["q3"], s["min"], s["max"]])
        for r, why in e.skipped.items():
            rows.append([e.label, r, "not run", None, None, None, None, None, why])
    if boxes:
        parts.append(_img(charts.latency(boxes), "latency per runner"))
    parts.append(_table(["artifact", "runner", "measured", "runs", "median ms", "q1 ms", "q3 ms", "min ms",
                         "max ms / why"], rows, [False, False, False] + [True] * 5 + [False]))
    parts.append("<p class=\"sub\">Each runner is called once to warm up, then timed call by call on one input "
                 "on this machine. Emulated runners (qemu-aarch64) translate ARM code: their times compare "
                 "models and kernels with each other, they are not device latency.</p>")
    return "".join(parts)


def _comparison_text(model, inputs) -> tuple[str, list[str]]:
    n = len(inputs) if inputs else 0
    if model is not None and inputs:
        return (f"Each runner's outputs vs the float model's on {n} given input(s), and vs the golden outputs "
                "recorded at deploy time.", [])
    if model is not None:
        return ("Each runner's outputs vs the float model's on the golden inputs (the example input recorded at "
                "deploy time: 1 sample), and vs the golden outputs.",
                ["Only the one golden sample was compared: pass inputs= (--inputs X.npz) for more, and top-1 "
                 "agreement over a real data set."])
    if inputs:
        return (f"No float model was given: the {n} given input(s) were compared between runners (bit-exactness "
                "vs the reference runner) only; SQNR is against the golden outputs recorded at deploy time "
                "(1 sample).",
                ["Not checked: error against the float model on the given inputs (pass model= / --model M.pt2)."])
    return ("No float model and no inputs were given: each runner's outputs on the golden input (1 sample) are "
            "compared with the golden outputs the float model gave at deploy time.",
            ["Not checked: error against the float model on more inputs and top-1 agreement over a data set "
             "(pass model= and inputs=, or --model M.pt2 --inputs X.npz)."])


def _section_fidelity(entries: list[_Entry], charts: _Charts, model, inputs) -> str:
    text, missing = _comparison_text(model, inputs)
    parts = ["<h2>Fidelity</h2>", f"<p>{html.escape(text)}</p>"] + [_note(m) for m in missing]
    runners = _layer_order(entries, lambda e: list(e.verify.runners) if e.verify is not None else [])
    use_model = model is not None
    series = []
    for i, e in enumerate(entries):
        vals = []
        for r in runners:
            row = e.verify.runners.get(r) if e.verify is not None else None
            v = math.nan if row is None or row.error else (row.sqnr_db if use_model else row.golden_sqnr_db)
            vals.append(v)
        series.append((e.label, _PALETTE[i % len(_PALETTE)], vals))
    if runners:
        parts.append(_img(charts.sqnr(runners, series, "output SQNR vs the " + (
            "float model" if use_model else "golden outputs") + " (higher is better)"), "output SQNR per runner"))
    rows = []
    for e in entries:
        if e.verify is None:
            continue
        for r, row in e.verify.runners.items():
            if row.error:
                rows.append([e.label, r, "error: " + row.error] + [None] * 9)
                continue
            vs_float = [row.sqnr_db, row.max_abs_err, row.top1_agreement] if use_model else [None] * 3
            quantized = any(t.quantization for t in e.art.outputs)
            rows.append([e.label, r, ", ".join(row.compared_with) or "nothing", *vs_float, row.golden_sqnr_db,
                         row.golden_max_abs_err, row.bit_exact_ratio, row.max_lsb if quantized else None,
                         None if quantized else row.ref_rel_err,
                         "passed" if not [f for f in e.verify.failures if f.startswith(f"{r}:")
                                          or f.startswith(f"runner {r!r}")] else "FAILED"])
    parts.append(_table(["artifact", "runner", "compared with", "SQNR vs float (dB)", "max abs err vs float",
                         "top-1 agreement vs float", "SQNR vs golden (dB)", "max abs err vs golden",
                         "bit-exact vs reference", "max LSB vs reference", "rel. err vs reference (float outputs)",
                         "verdict"], rows, [False] * 3 + [True] * 8 + [False]))
    for e in entries:
        if e.verify is not None and e.verify.failures:
            parts.append(_note(f"{e.label} failed verification: " + "; ".join(e.verify.failures)))
    return "".join(parts)


def _section_layer_errors(entries: list[_Entry], charts: _Charts) -> str:
    parts = ["<h2>Per-layer errors</h2>"]
    for i, e in enumerate(entries):
        parts.append(f"<h3>{html.escape(e.label)}</h3>")
        if e.layer_errors is None:
            parts.append(f"<p>per-layer errors unavailable: {html.escape(e.layer_errors_reason or 'unknown')}</p>")
            continue
        rows = list(getattr(e.layer_errors, "rows", []))
        if not rows:
            parts.append("<p>No layer to analyse.</p>")
            continue
        source = {"model": "the float model", "shadow": "a float shadow of the packed graph (its quantized weights "
                  "dequantized, activations in float): activation-quantization error only"}
        src = getattr(e.layer_errors, "float_source", "")
        parts.append(f"<p>Each layer alone, fed the float inputs, vs {html.escape(source.get(src, str(src)))}, on "
                     f"{_e(getattr(e.layer_errors, 'num_inputs', '?'))} input(s); ranked by the SQNR lost against "
                     "what rounding to the layer's number format costs, worst first.</p>")
        names = [str(getattr(r, "name", "?")) for r in rows]
        sq = [float(getattr(r, "sqnr_db", math.nan)) for r in rows]
        from .layer_errors import EXACT_DB as exact_db
        inexact = [v for v in sq if math.isfinite(v) and v < exact_db]
        if len(inexact) < len(sq):
            parts.append(f"<p class=\"sub\">{len(sq) - len(inexact)} layer(s) match their float version exactly "
                         f"(shown as {_e(exact_db)} dB).</p>")
        if inexact:
            cap = max(inexact) * 1.15
            shown = [min(v, cap) if math.isfinite(v) else 0.0 for v in sq]
            parts.append(_img(charts.grouped(names, [(e.label, _PALETTE[i % len(_PALETTE)], shown, None)],
                                             "SQNR of the layer's output (dB), worst first",
                                             f"per-layer SQNR: {e.label}"), f"per-layer SQNR of {e.label}"))
        parts.append(_table(["layer", "op", "local SQNR (dB)", "SQNR lost (dB)", "cumulative SQNR (dB)", "encoding",
                             "suggestion"],
                            [[getattr(r, k, None) for k in ("name", "op", "sqnr_db", "sqnr_lost_db",
                                                              "cumulative_sqnr_db", "spec", "suggestion")]
                             for r in rows], [False, False, True, True, True, False, False]))
        for sk in getattr(e.layer_errors, "skipped", None) or []:
            if isinstance(sk, dict):
                parts.append(f"<p class=\"sub\">not compared: {_e(sk.get('name'))}: {_e(sk.get('why'))}</p>")
    return "".join(parts)


def _flatten(report: dict, prefix: str = "") -> tuple[list[tuple[str, Any]], list[tuple[str, Any]]]:
    """``(scalars, tables)``: scalar fields with dotted names (nested dicts of scalars
    flattened), and the fields that are lists of dicts or wide dicts."""
    scalars, tables = [], []
    for k, v in report.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v and all(not isinstance(x, (dict, list)) for x in v.values()) and len(v) <= 6:
            scalars += [(f"{key}.{kk}", vv) for kk, vv in v.items()]
        elif isinstance(v, dict) and v:
            tables.append((key, v))
        elif isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
            tables.append((key, v))
        else:
            scalars.append((key, v))
    return scalars, tables


def _stage_report_html(report: dict, charts: _Charts) -> str:
    scalars, tables = _flatten({k: v for k, v in report.items() if k != "method"})
    parts = []
    if scalars:
        parts.append(_table(["field", "value"], scalars, [False, True]))
    for key, value in tables:
        parts.append(f"<p><b>{html.escape(key)}</b></p>")
        if isinstance(value, dict):
            flat = [(k, v) for k, v in value.items()]
            parts.append(_table([key, "value"], flat, [False, True]))
        else:
            cols: list[str] = []
            for row in value:
                cols += [c for c in row if c not in cols]
            parts.append(_table(cols, [[row.get(c) for c in cols] for row in value]))
    curve = charts.curves(report)
    if curve:
        parts.append(_img(curve, "sensitivity curves"))
    return "".join(parts)


def _section_stages(entries: list[_Entry], charts: _Charts) -> str:
    parts = ["<h2>Recipe stages</h2>"]
    groups: list[tuple[list[str], Any, Any]] = []     # identical recipes and reports are shown once
    for e in entries:
        recipe = (e.art.manifest.get("recipe") or {}).get("stages") or []
        reports = e.art.manifest.get("stages") or []
        key = json.dumps([recipe, reports], sort_keys=True)
        for g in groups:
            if g[1] == key:
                g[0].append(e.label)
                break
        else:
            groups.append(([e.label], key, (recipe, reports, e.art.manifest.get("quantization"))))
    for labels, _, (recipe, reports, quant) in groups:
        parts.append(f"<h3>{html.escape(', '.join(labels))}</h3>")
        if not recipe and not reports:
            parts.append("<p>No recipe: the target's default quantization"
                         + (f" ({html.escape(str(quant.get('method')))})" if isinstance(quant, dict)
                            and quant.get("method") else "") + ".</p>")
            continue
        pending = list(reports)
        for n, stage in enumerate(recipe or [{"method": r.get("method")} for r in reports], 1):
            method = str(stage.get("method"))
            parts.append(f"<h4>{n}. {html.escape(method)}"
                         + (f" <span class=\"sub\">({html.escape(str(stage['kind']))})</span>" if stage.get("kind")
                            else "") + "</h4>")
            config = stage.get("config") or {}
            if config:
                shown = {k: v for k, v in config.items() if k not in ("type", "version", "progress")}
                parts.append("<details><summary>configuration</summary>"
                             + _table(["option", "value"], shown.items(), [False, True]) + "</details>")
            mine = next((r for r in pending if r.get("method") == method), None)
            if mine is not None:
                pending.remove(mine)
                parts.append(_stage_report_html(mine, charts))
            else:
                parts.append("<p class=\"sub\">This stage reported nothing; what it fixed (bits, sparsity, "
                             "codebooks) is in the encodings below.</p>")
    for e in entries:
        enc = e.art.manifest.get("encodings") or []
        if not enc:
            continue
        parts.append(f"<h3>Encodings shipped: {html.escape(e.label)}</h3>")
        parts.append(_table(["layer", "tensor", "planned", "bits", "stored bits", "sparsity pattern", "density",
                             "zeros shipped"],
                            [[r.get("layer"), r.get("tensor"), r.get("planned"), r.get("bits"), r.get("stored_bits"),
                              (r.get("sparsity") or {}).get("pattern"), (r.get("sparsity") or {}).get("density"),
                              (r.get("sparsity") or {}).get("shipped")] for r in enc],
                            [False, False, False, True, True, False, True, False]))
    return "".join(parts)


def _section(anchor: str, body: str) -> str:
    """One part of the page, ``<section id="anchor">`` (the contents links jump to; a style sheet
    can hide one: ``#latency{display:none}``)."""
    return f"<section id=\"{anchor}\">{body}</section>"


def _document(entries: list[_Entry], charts: _Charts, model, inputs, title: str) -> str:
    import datetime

    from . import __version__

    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    nav = " · ".join(f"<a href=\"#{a}\">{t}</a>" for a, t in (
        ("size", "size"), ("compute", "compute"), ("latency", "latency"), ("fidelity", "fidelity"),
        ("layer-errors", "per-layer errors"), ("stages", "recipe stages")))
    body = [
        f"<h1>{html.escape(title)}</h1>",
        f"<p class=\"sub\">edgepack {html.escape(__version__)} report, {when} · {nav}</p>",
        _section("summary", _section_summary(entries, model is not None)),
        _section("size", _section_size(entries, charts)),
        _section("compute", _section_compute(entries, charts)),
        _section("latency", _section_latency(entries, charts)),
        _section("fidelity", _section_fidelity(entries, charts, model, inputs)),
        _section("layer-errors", _section_layer_errors(entries, charts)),
        _section("stages", _section_stages(entries, charts)),
    ]
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>\n"
            + "\n".join(body) + "\n</body></html>\n")


# --- writing ------------------------------------------------------------------


def default_output(artifacts: Sequence) -> Path:
    """``./<name>-report.html`` (``<a>-vs-<b>-report.html`` for several) in the working directory:
    never inside an artifact, whose files are hashed."""
    names = [Path(getattr(a, "path", a)).name or "artifact" for a in artifacts]
    return Path.cwd() / ("-vs-".join(dict.fromkeys(names)) + "-report.html")


def _check_output(output: Path, arts: list, overwrite: bool) -> Path:
    output = Path(output).absolute()
    if output.suffix.lower() not in (".html", ".htm"):
        raise InputError(f"report output {output} should end in .html")
    parent = output.parent.resolve()
    for a in arts:
        root = a.path.resolve()
        if parent == root or root in parent.parents:
            raise InputError(f"report output {output} is inside the artifact {a.path}: an artifact holds only "
                             "the files its manifest hashes (sdk.load would refuse it); write the report "
                             "elsewhere, e.g. -o report.html")
    if not parent.is_dir():
        raise InputError(f"report output {output}: directory {output.parent} does not exist")
    if (output.exists() or output.is_symlink()) and not overwrite:
        raise InputError(f"report output {output} already exists; pass overwrite=True (--overwrite) to replace it")
    if output.is_dir():
        raise InputError(f"report output {output} is a directory; give a file name ending in .html")
    return output


def _write_atomic(output: Path, text: str, overwrite: bool) -> None:
    """Write a temporary file beside ``output`` and move it into place in one step; without
    ``overwrite`` the move fails when ``output`` appeared meanwhile."""
    fd, tmp = tempfile.mkstemp(prefix=f".{output.name}.", suffix=".tmp", dir=output.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        if overwrite:
            os.replace(tmp, output)
        else:
            try:
                os.link(tmp, output)          # fails, never replaces, when output exists
            except FileExistsError:
                raise InputError(f"report output {output} already exists; pass overwrite=True (--overwrite) "
                                 "to replace it") from None
            except OSError:                   # a file system without hard links
                if output.exists():
                    raise InputError(f"report output {output} already exists") from None
                os.replace(tmp, output)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def build_report(artifacts, output: str | os.PathLike | None = None, *, model: Any = None,
                 inputs: Sequence | None = None, runners: Sequence[str] | None = None, repeats: int = 30,
                 time_budget_s: float = 2.0, overwrite: bool = False, title: str | None = None) -> Path:
    """Write one self-contained HTML report about ``artifacts`` and return its path.

    ``artifacts``: an :class:`~sdk.artifact.Artifact` or artifact path, or a list of
    them (artifacts of one model: their inputs must have the same shapes).
    ``output``: the ``.html`` file (default :func:`default_output`); never inside an
    artifact, and an existing file is replaced only with ``overwrite=True``; written
    to a temporary file and renamed into place.  ``model`` (the float
    ``torch.nn.Module`` or its ``torch.export.ExportedProgram``) and ``inputs``
    (samples, as :meth:`~sdk.Artifact.verify` takes them) make the fidelity section
    compare with the float model; without them it compares with the golden outputs
    and says so.  ``runners``: default,
    every runner of each artifact's target that can run here (those that cannot
    are listed with the reason).  Each runner is timed for ``repeats`` calls or
    ``time_budget_s`` seconds, whichever ends first (at least 3 calls).

    Raises :class:`~sdk.errors.ToolchainError` when matplotlib is missing
    (``pip install edgepack[report]``), :class:`~sdk.errors.InputError` for a bad
    output path or unknown runner, :class:`~sdk.errors.ArtifactError` for a
    damaged artifact.

    >>> build_report(["out/arm-fp32", "out/arm-int8"], "report.html", model=net, inputs=[x])  # doctest: +SKIP
    PosixPath('report.html')
    """
    charts = _Charts()            # fails first, before any slow work, when matplotlib is missing
    arts = _as_artifacts(artifacts)
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise InputError(f"repeats must be a positive integer, got {repeats!r}")
    if inputs is not None:
        inputs = [] if isinstance(inputs, (str, bytes)) else list(inputs)
        if not inputs:
            raise InputError("inputs is empty: pass a non-empty list of samples, or none to use the golden inputs")
    out = _check_output(Path(output) if output is not None else default_output(arts), arts, overwrite)
    entries = _collect(arts, model, inputs, runners, repeats, time_budget_s)
    log.info("drawing the report")
    title = title or ("edgepack report: " + " vs ".join(e.label for e in entries))
    import matplotlib

    # chart labels are artifact strings (layer names, stage reports): plain text, never mathtext ("$\\x$"
    # would make matplotlib raise while drawing)
    with matplotlib.rc_context({"text.parse_math": False}):
        text = _document(entries, charts, model, inputs, title)
    _write_atomic(out, text, overwrite)
    log.info("wrote %s (%d bytes)", out, len(text.encode()))
    return out
