"""The public verbs: :func:`deploy`, :func:`compress`, :func:`load`, :func:`list_plugins`.

The data flow of :func:`deploy`, one line per step::

    target.check(capture(model))      a recipe without training-time quantizers: refuse before training
    compress(model, recipe, ctx)      torch-side stages (StageContext: data streams, teacher, target);
                                      their masks/codebooks/bit widths stay on the layers as hints
    capture(model, example_inputs)    torch.export -> canonical Graph (+ graph.hints by weight)
    fold_batch_norm, target.prepare   graph passes
    target.check(graph)               UnsupportedOpError before any slow work
    quantizer.calibrate(graph, data)  QuantPlan: per-tensor encodings (each graph-side stage refines it)
    target.check_plan(graph, plan)    EncodingError for what the target cannot ship; manifest "encodings"
    target.cost(graph, plan)          per-layer bytes, MACs, estimated latency/energy (profile "estimate")
    target.pack(graph, plan)          files + I/O signature + per-layer profile
    Staging(output) ... commit        smoke-run and time in the default runner, hash, rename into place
                                      (rank 0 only under torchrun: sdk.distributed.on_main)
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Iterable

from . import __version__, distributed, plugins
from .artifact import Artifact, Staging, check_output, load, save_npz
from .contract import FORMAT, FORMAT_VERSION, GOLDEN, PROFILE
from .errors import CalibrationError, EdgepackError, InputError, RunnerError
from .pt2 import copy_module
from .recipe import Stage, as_recipe

__all__ = ["deploy", "compress", "load", "list_plugins"]


def list_plugins() -> list[dict[str, Any]]:
    """Name, kind, version and module of every registered method, target and runner."""
    return plugins.list_plugins()


def compress(model, recipe, data=None, teacher=None, *, progress: bool = True, target=None):
    """Apply a recipe's torch-side stages to a copy of ``model`` and return it.

    ``data`` is an iterable of training batches or named streams
    ``{"train": ..., "unlabeled": ..., "val": ...}``; a stage that needs a
    stream it was not given fails before any stage runs.  Distillers train the
    copy against ``teacher`` (when none is given: the uncompressed ``model``
    itself, so "prune, then distil from the original" is a two-line recipe;
    stages can tell the two apart, :class:`sdk.context.StageContext`); pruners
    and training-time quantizers rewrite it.  A stage may attach loss penalties
    and per-step callbacks to the training of the stages after it.
    Post-training quantizers (``ptq``) are not applied here: they act on the
    captured graph in :func:`deploy`.  ``target`` (a name or instance; ``deploy``
    passes its own) lets stages plan with the target's cost model.  ``model`` is
    never modified.  ``progress=False`` turns off every stage's progress bar.
    What stages fix about weights (masks, codebooks, bit widths) stays on the
    returned layers as hints (:mod:`sdk.encoding`) for the target's plan.

    >>> small = sdk.compress(net, {"stages": [{"method": "magnitude", "config": {"sparsity": 0.5}}]})  # doctest: +SKIP
    """
    import torch

    from . import masks
    from .context import REPORTS_ATTR, DataStreams, StageContext, check_streams
    from .trainer import training_extras

    if not isinstance(model, torch.nn.Module):
        raise InputError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    recipe = as_recipe(recipe)
    streams = DataStreams.of(data)
    check_streams(recipe.torch_stages, streams, teacher)
    if isinstance(target, str):
        target = plugins.get("target", target)()
    work = copy_module(model)
    ctx = StageContext(streams, original=model, teacher=teacher, target=target)
    for stage in recipe.torch_stages:
        method = stage.build()
        if not progress and hasattr(method.config, "progress"):
            method.config = method.config.replace(progress=False)
        ctx.stage = stage.method
        # penalties/callbacks of earlier stages shape this one's training; its own apply to later ones
        with training_extras(list(ctx.penalties), list(ctx.callbacks)):
            work = method.run(work, ctx)
    masks.bake(work)
    setattr(work, REPORTS_ATTR, list(getattr(model, REPORTS_ATTR, [])) + ctx.reports)
    return work.eval()


def deploy(model, target: str, example_inputs, calibration: Iterable | None = None, recipe=None,
           output: str | Path | None = None, *, data=None, teacher=None,
           overwrite: bool = False, progress: bool = True, **target_options: Any) -> Artifact:
    """Compress (optional), capture, quantize and pack ``model`` for ``target``.

    ``model`` is never mutated.  ``calibration`` is an iterable of input
    batches (tensors or tuples) shaped like ``example_inputs`` except for the
    batch size; targets that quantize need it.  ``recipe`` adds compression
    stages (``data`` — batches or ``{"train", "unlabeled", "val"}`` streams — and
    ``teacher`` feed its training stages).  The plan (per-weight encodings, see
    :mod:`sdk.encoding`) is checked against what the target carries before
    packing: one it cannot ship is refused with :class:`EncodingError`.  Extra keyword
    options go to the target's config (e.g. ``io="int8"`` for ``arm-int8``).
    The artifact is written atomically to ``output`` (a temporary directory
    when omitted) and returned opened.  An existing artifact at ``output`` is
    replaced only with ``overwrite=True``; any other non-empty directory there
    is refused (:class:`ArtifactError`) before any slow work and never deleted.
    Under ``torchrun`` every rank trains (:mod:`sdk.distributed`) but only rank 0
    writes ``output``; the others wait for it and return the artifact it wrote.

    >>> art = sdk.deploy(net, target="arm-int8", example_inputs=(x,), calibration=batches)  # doctest: +SKIP
    """
    from .context import REPORTS_ATTR, DataStreams, check_streams
    from .data import as_batches
    from .graph import capture, check_example_inputs, fold_batch_norm

    started = time.perf_counter()
    phases: dict[str, float] = {}     # where deploy time goes (profile.json "deploy_phases_s")

    def phase(name: str, t0: float) -> float:
        now = time.perf_counter()
        phases[name] = round(phases.get(name, 0.0) + now - t0, 4)
        return now
    if not isinstance(overwrite, bool):
        raise InputError(f"overwrite must be True or False, got {overwrite!r}")
    if output is not None:
        # rank 0 alone writes it; when it refuses, every rank raises (none is left waiting in training).
        # The process group starts here for the model's device, as fit would start it (gloo, or nccl for CUDA).
        params = getattr(model, "parameters", None)
        distributed.init(next((p.device for p in params()), None) if callable(params) else None)
        distributed.on_main(lambda: check_output(Path(output).absolute(), overwrite))
    target_cls = plugins.get("target", target)
    tgt = target_cls(**target_options)
    example_inputs = check_example_inputs(model, example_inputs)
    recipe = as_recipe(recipe)
    data = DataStreams.of(data)
    check_streams(recipe.torch_stages, data, teacher)

    qstages = list(recipe.graph_stages)
    if not qstages and tgt.default_quantizer:
        qstages = [Stage.make(tgt.default_quantizer, tgt.default_quantizer_config())]
    quantizers = [q.build() for q in qstages]
    for quantizer in quantizers:
        if hasattr(quantizer.config, "progress") and not progress:
            quantizer.config = quantizer.config.replace(progress=False)

    t = phase("setup", started)
    if recipe.torch_stages and not any(s.kind == "quantizer" for s in recipe.torch_stages):
        # Distillers and pruners keep the model's operators, so the target can refuse an
        # unsupported model — or a plan it cannot ship (a dry calibration on the example
        # inputs) — before hours of training; training-time quantizers add their own ops
        # (binarize, fake-quant), checked after they ran.
        early = tgt.prepare(fold_batch_norm(capture(copy_module(model).eval(), example_inputs)))
        tgt.check(early)
        try:
            tgt.check_plan(early, _plan(quantizers, early, [tuple(example_inputs)]))
        except CalibrationError:          # ranges of the untrained model: the real plan decides
            pass
        t = phase("early_check", t)
    packed_model = compress(model, recipe, data=data, teacher=teacher, progress=progress, target=tgt) \
        if recipe.torch_stages else copy_module(model).eval()
    t = phase("compress" if recipe.torch_stages else "copy", t)
    from .early_exit import is_cascade, pack_cascade

    for q in quantizers if calibration is None else ():      # a quantizer that makes its own (data-free)
        calibration = q.calibration_data(packed_model, example_inputs)
        if calibration is not None:
            break
    if is_cascade(packed_model):        # an early-exit cascade: one packed graph per stage (sdk.early_exit)
        packed = pack_cascade(tgt, packed_model, example_inputs, calibration, quantizers,
                              lambda g, b: _plan(quantizers, g, b))
        package, plan, encodings, cost = packed.package, packed.plan, packed.encodings, packed.cost
    else:
        graph = tgt.prepare(fold_batch_norm(capture(packed_model, example_inputs)))
        tgt.check(graph)
        t = phase("capture", t)

        if calibration is None and quantizers and not any(q.requires_calibration for q in quantizers):
            calibration = [example_inputs]
        batches = None
        if quantizers or calibration is not None:
            batches = as_batches(calibration, graph.inputs)
        plan = _plan(quantizers, graph, batches)
        encodings = tgt.check_plan(graph, plan)
        cost = tgt.cost(graph, plan, encodings)
        t = phase("calibrate", t)
        package = tgt.pack(graph, plan, batches)
    t = phase("pack", t)

    import torch

    with torch.no_grad():
        golden_out = packed_model(*example_inputs)
    golden_out = golden_out if isinstance(golden_out, (tuple, list)) else (golden_out,)
    golden = {f"input_{i}": x.numpy() for i, x in enumerate(example_inputs)}
    golden.update({f"output_{i}": o.detach().float().numpy() for i, o in enumerate(golden_out)})

    # the narrowest integer grid of the plan (shared-value codebooks excluded: those are exact), for the
    # target's fidelity rules (Target.rules_for)
    int_bits = [w.code_bits for w in plan.weights.values()
                if not w.dtype.startswith("float") and w.index_bits is None] if plan else []
    quantization = {"method": plan.method, "config": plan.config, "compute": plan.compute,
                    **({"weight_bits": min(int_bits)} if int_bits else {}),
                    **({"keep_fp32": plan.extra["keep_fp32"]} if "keep_fp32" in plan.extra else {})} if plan else None
    used = [_plugin_row(target_cls)] + [_plugin_row(q.plugin_class()) for q in qstages]
    used += [_plugin_row(plugins.find_method(s.method, s.kind)) for s in recipe.torch_stages]
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "edgepack_version": __version__,
        "target": {"name": tgt.name, "version": tgt.version, "config": tgt.config.to_dict(),
                   "default_runner": tgt.default_runner},
        "plugins": used,
        "inputs": [s.to_dict() for s in package.inputs],
        "outputs": [s.to_dict() for s in package.outputs],
        "recipe": recipe.to_dict() if recipe.stages else None,
        "quantization": quantization,
        "verify": tgt.rules_for(quantization),
        "encodings": encodings,
        **({"stages": getattr(packed_model, REPORTS_ATTR)} if getattr(packed_model, REPORTS_ATTR, None) else {}),
        **package.extra,
    }
    def write(t: float) -> Path:        # under torchrun: rank 0 only (sdk.distributed.on_main)
        with Staging(output, overwrite=overwrite) as stage:
            for name, blob in package.files.items():
                stage.add(name, blob)
            stage.add(GOLDEN, save_npz(golden))
            staged = Artifact(stage.path, {**manifest, "files": stage.file_table()}, {})
            t = phase("golden", t)
            smoke_inputs = [golden[f"input_{i}"] for i in range(len(example_inputs))]
            latency, note, outs, runner_profile = _smoke_and_time(staged, tgt.default_runner, smoke_inputs)
            phase("first_run_and_timing", t)
            profile = {**_profile(tgt.name, package, latency, note, time.perf_counter() - started), **runner_profile}
            profile["deploy_phases_s"] = phases
            if cost:
                from .cost import totals

                profile["estimate"] = {"device": tgt.device.name, **totals(cost), "layers": cost}
            if outs is not None:
                profile["fidelity"] = _fidelity(tgt.default_runner, outs, [golden[f"output_{i}"]
                                                                           for i in range(len(outs))])
            stage.add(PROFILE, (json.dumps(profile, indent=2) + "\n").encode())
            return stage.commit(manifest)

    path = distributed.on_main(lambda: write(t))
    return load(path) if distributed.is_main() else distributed.open_from_main(path)


def _plan(quantizers: list, graph, batches):
    """The graph-side stages' plan: the first calibrates, each later one refines it (``None``: no stage)."""
    plan = None
    for quantizer in quantizers:
        plan = quantizer.calibrate(graph, batches) if plan is None else quantizer.refine(graph, batches, plan)
    return plan


def _plugin_row(cls) -> dict[str, str]:
    return {"kind": cls.kind, "name": cls.name, "version": cls.version, "module": cls.__module__}


def _fidelity(runner: str, outs, golden_outs) -> dict:
    """How close the packed model is to the float model on the example inputs (SQNR capped at
    999 dB: an exact float artifact has none to report)."""
    from .verify import compare_outputs

    try:
        max_abs, max_rel, sqnr = compare_outputs([outs], [golden_outs])
    except InputError as exc:
        raise RunnerError(f"runner {runner!r}: {exc}") from None
    return {"runner": runner, "inputs": "example inputs", "sqnr_db": round(min(sqnr, 999.0), 2),
            "max_abs_err": max_abs, "max_rel_err": max_rel}


def _smoke_and_time(art: Artifact, runner: str, inputs, runs: int = 30) -> tuple[dict, str | None, list | None, dict]:
    """Run the staged artifact once (a broken pack fails here, before commit) and time it;
    returns ``(latency, note, outputs of the first run, the session's profile entries)`` (a
    session may carry ``profile``: LiteRT's host runner reports its XNNPACK delegation)."""
    import numpy as np

    from .errors import ToolchainError

    try:
        fn = art.session(runner)
    except ToolchainError as exc:   # packed fine, but this machine cannot run it: say so in the profile
        return {}, str(exc), None, {}
    try:
        outs = fn(inputs)
    except EdgepackError:
        raise
    except Exception as exc:
        raise RunnerError(f"the packed model failed its first run in runner {runner!r}: {exc}") from exc
    for i, o in enumerate(outs):
        if not np.all(np.isfinite(o)):
            raise RunnerError(f"the packed model produced non-finite output {i} in runner {runner!r}")
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn(inputs)
        times.append(time.perf_counter() - t0)
    return {runner: float(np.median(times)) * 1e3}, None, outs, dict(getattr(fn, "profile", None) or {})


def _profile(target: str, package, latency: dict, note: str | None, deploy_s: float) -> dict:
    layers = package.layers
    totals = {k: sum(int(layer.get(k, 0) or 0) for layer in layers) for k in ("params", "bytes", "macs", "bops")}
    totals["model_bytes"] = sum(len(b) for b in package.files.values())
    prof = {"target": target, "layers": layers, "totals": totals, "latency_ms": latency,
            "deploy_seconds": round(deploy_s, 3)}
    if note:
        prof["latency_note"] = note
    return prof
