"""The ``edgepack`` command (also ``python -m sdk``).

    edgepack plugins
    edgepack deploy MODEL.pt2 --target arm-int8 --calibration DATA.npz [--recipe R.yaml] -o OUT [--force]
                    [--trust-pickle]
    edgepack sign OUT --key KEYFILE
    edgepack verify OUT [--inputs DATA.npz] [--runner host --runner reference] [--key KEYFILE]
    edgepack inspect OUT [--key KEYFILE]
    edgepack emulator install [--cache DIR] [--force]   (the ARM64 emulator of runner qemu-aarch64)
    edgepack emulator status [--cache DIR] [--json]    (exit 0 when installed and usable, else 1)

Exit codes: 0 ok; 1 verification failed (and ``emulator status``: not
installed); 2 usage or input error (bad arguments, files, data, options, an
unknown runner, a damaged or unsigned artifact: every :class:`EdgepackError`
and file-system error); 3 internal error (an exception edgepack did not mean
to raise: a bug, please report it).  Errors are one line on stderr;
``--debug`` shows the traceback instead.

``deploy`` refuses ``.pt2`` files from which torch would unpickle anything
(see :mod:`sdk.pt2`); ``--trust-pickle`` lets it, which means running code
from the file: only for files you made yourself.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

from .errors import EdgepackError, InputError, RecipeError, VerificationError

EXIT_OK, EXIT_VERIFY, EXIT_USAGE, EXIT_INTERNAL = 0, 1, 2, 3


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse exits 2 already; keep its one-line form
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"edgepack: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="edgepack", description="Compress and pack PyTorch models for edge targets.")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    s = sub.add_parser("plugins", help="list registered methods, targets and runners")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.add_argument("--markdown", action="store_true", help="a Markdown table (the README's plugin list)")

    s = sub.add_parser("deploy", help="pack a torch.export .pt2 model for a target")
    s.add_argument("model", help="a torch.export.save() file (.pt2)")
    s.add_argument("--target", "-t", required=True)
    s.add_argument("--calibration", "-c", help=".npz with one array per model input, samples on the first axis")
    s.add_argument("--batch-size", type=int, default=None, help="calibration batch size (default: example batch)")
    s.add_argument("--recipe", "-r", help="recipe YAML")
    s.add_argument("--option", "-O", action="append", default=[], metavar="KEY=VALUE",
                   help="target option (YAML value), e.g. -O io=int8")
    s.add_argument("--output", "-o", required=True)
    s.add_argument("--force", action="store_true", help="replace an existing edgepack artifact at --output")
    s.add_argument("--trust-pickle", action="store_true",
                   help="let torch unpickle the .pt2 file's pickled entries: this RUNS CODE FROM THE FILE; "
                        "only for files you made yourself")

    s = sub.add_parser("sign", help="sign an artifact's manifest with a key (HMAC secret or Ed25519 PEM)")
    s.add_argument("artifact")
    s.add_argument("--key", "-k", required=True, metavar="KEYFILE", help="the signing key file")

    s = sub.add_parser("verify", help="check an artifact's hashes and run it against its reference")
    s.add_argument("artifact")
    s.add_argument("--inputs", help=".npz of inputs (default: the golden inputs stored in the artifact)")
    s.add_argument("--runner", action="append", help="runner(s) to use (repeatable)")
    s.add_argument("--key", "-k", metavar="KEYFILE", help="refuse the artifact unless this key signed it")
    s.add_argument("--json", action="store_true")

    s = sub.add_parser("inspect", help="print an artifact's profile")
    s.add_argument("artifact")
    s.add_argument("--key", "-k", metavar="KEYFILE", help="refuse the artifact unless this key signed it")
    s.add_argument("--json", action="store_true")

    s = sub.add_parser("emulator", help="install or inspect the ARM64 emulator (runner qemu-aarch64)")
    esub = s.add_subparsers(dest="emulator_command", required=True, parser_class=_Parser)
    e = esub.add_parser("install", help="build the aarch64 sysroot and LiteRT into the cache (idempotent)")
    e.add_argument("--cache", metavar="DIR", help="cache root (default: $EDGEPACK_CACHE or ~/.cache/edgepack)")
    e.add_argument("--force", action="store_true", help="rebuild even when a current install exists")
    e.add_argument("--quiet", "-q", action="store_true", help="no progress display")
    e = esub.add_parser("status", help="what is installed")
    e.add_argument("--cache", metavar="DIR", help="cache root (default: $EDGEPACK_CACHE or ~/.cache/edgepack)")
    e.add_argument("--json", action="store_true")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line ``argv`` (default ``sys.argv[1:]``); returns the exit code."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:          # usage errors (2) and --help (0) return their code instead of exiting
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    try:
        return _COMMANDS[args.command](args)
    except KeyboardInterrupt:
        if args.debug:
            raise
        print("edgepack: interrupted", file=sys.stderr)
        return 130
    except EdgepackError as exc:
        if args.debug:
            raise
        print(f"edgepack: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_VERIFY if isinstance(exc, VerificationError) else EXIT_USAGE
    except OSError as exc:             # a path, permission or disk problem on the user's side
        if args.debug:
            raise
        print(f"edgepack: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as exc:           # noqa: BLE001 -- nothing edgepack means to raise: say so, in one line
        if args.debug:
            raise
        text = " ".join(str(exc).split())[:300]
        print(f"edgepack: internal error: {type(exc).__name__}{': ' + text if text else ''}; rerun with --debug "
              "for the traceback and report it", file=sys.stderr)
        return EXIT_INTERNAL


def _cmd_plugins(args) -> int:
    from .plugins import list_plugins

    rows = list_plugins()
    if args.json:
        print(json.dumps(rows, indent=2))
        return EXIT_OK
    if args.markdown:
        print(plugins_markdown(rows))
        return EXIT_OK
    print(_table(["name", "kind", "version", "module"],
                 [[r["name"] + (f" [{','.join(r['targets'])}]" if "targets" in r else ""), r["kind"], r["version"],
                   r["module"]] for r in rows]))
    return EXIT_OK


def plugins_markdown(rows: list[dict]) -> str:
    """The built-in plugin list as a Markdown table, with each class's first docstring line."""
    import importlib

    lines = ["| kind | name | module | what it does |", "|---|---|---|---|"]
    for r in rows:
        cls = None
        mod = importlib.import_module(r["module"])
        for obj in vars(mod).values():
            if isinstance(obj, type) and getattr(obj, "name", None) == r["name"] and getattr(obj, "kind", None) == r["kind"]:
                cls = obj
        doc = ((cls.__doc__ or "").strip().splitlines() or [""])[0] if cls else ""
        name = r["name"] + (f" ({', '.join(r['targets'])})" if r.get("targets") else "")
        doc = doc.replace("|", "\\|")          # a literal pipe would split the table cell
        lines.append(f"| {r['kind']} | `{name}` | `{r['module']}` | {doc} |")
    return "\n".join(lines)


def _load_npz(path: str, what: str) -> list:
    """The arrays of an ``.npz`` file, in order; InputError for a missing, foreign or empty file.
    Object arrays are refused (loading them would unpickle)."""
    import zipfile

    import numpy as np

    if not Path(path).is_file():
        raise InputError(f"{what} file {path} does not exist")
    try:
        with np.load(path, allow_pickle=False) as z:
            if not hasattr(z, "files"):
                raise InputError(f"{what} file {path} is a single .npy array, not an .npz; save it with "
                                 "numpy.savez(path, x=array)")
            arrays = [(k, z[k]) for k in z.files]
    except InputError:
        raise
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, KeyError) as exc:
        hint = ("it holds object arrays, which edgepack does not unpickle; save numeric arrays"
                if "allow_pickle" in str(exc) else "write it with numpy.savez(path, x=array, ...)")
        raise InputError(f"{what} file {path} is not a readable .npz ({type(exc).__name__}: {exc}); {hint}") \
            from None
    if not arrays:
        raise InputError(f"{what} file {path} holds no arrays; save one array per model input, samples on the "
                         "first axis: numpy.savez(path, x=samples)")
    for k, a in arrays:
        if a.dtype.kind not in "biuf":
            raise InputError(f"{what} file {path}: array {k!r} has dtype {a.dtype}; save numeric (float) arrays")
        if a.ndim == 0:
            raise InputError(f"{what} file {path}: array {k!r} is a scalar; each array needs samples on its "
                             "first axis")
    return [a for _, a in arrays]


def _deploy_option(item: str, reserved: set[str]):
    import yaml

    key, sep, value = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise InputError(f"--option {item!r} is not KEY=VALUE, e.g. -O io=int8")
    if not key.isidentifier():
        raise InputError(f"--option {item!r}: {key!r} is not an option name")
    if key in reserved:
        raise InputError(f"--option {key}=... is not a target option; use the deploy flag for it "
                         f"(edgepack deploy --help)")
    try:
        parsed = yaml.safe_load(value)
    except yaml.YAMLError as exc:
        reason = " ".join(str(exc).split())
        raise InputError(f"--option {item!r}: the value is not valid YAML ({reason}); write a YAML value "
                         f"(a number, true/false, [a, b]) or quote a string: -O {key}=\"'text'\"") from None
    return key, parsed


def _load_recipe(path: str | None):
    from .recipe import as_recipe

    if path is None:
        return None
    if not Path(path).is_file():
        raise InputError(f"recipe file {path} does not exist")
    try:
        return as_recipe(Path(path))
    except EdgepackError:
        raise
    except (TypeError, ValueError, KeyError, AttributeError, IndexError) as exc:
        # a recipe of the right syntax with values of the wrong type (version: abc, stages: 5, ...)
        raise RecipeError(f"recipe {path} has a value of the wrong type ({type(exc).__name__}: {exc}); a recipe "
                          "is 'version: 1' (an integer) and 'stages: [{method: NAME, config: {...}}, ...]'") from None


def _cmd_deploy(args) -> int:
    import inspect

    from .api import deploy
    from .data import split_batches
    from .pt2 import load_exported

    reserved = {n for n, prm in inspect.signature(deploy).parameters.items() if prm.kind != prm.VAR_KEYWORD}
    options = dict(_deploy_option(item, reserved) for item in args.option)
    if args.batch_size is not None and args.batch_size < 1:
        raise InputError(f"--batch-size must be at least 1, got {args.batch_size}")
    recipe = _load_recipe(args.recipe)
    calibration_arrays = _load_npz(args.calibration, "calibration") if args.calibration else None

    ep = load_exported(args.model, trust_pickle=args.trust_pickle)
    ex = ep.example_inputs
    example = tuple(ex[0]) if isinstance(ex, (tuple, list)) and ex and isinstance(ex[0], (tuple, list)) else None
    if not example:
        raise InputError(f"{args.model} carries no example inputs; export it with example inputs: "
                         "torch.export.export(model, (x,))")
    if isinstance(ex, (tuple, list)) and len(ex) > 1 and ex[1]:
        raise InputError(f"{args.model} was exported with keyword inputs ({', '.join(map(str, ex[1]))}); "
                         "edgepack takes positional inputs only: export with torch.export.export(model, (x, ...))")
    calibration = None
    if calibration_arrays is not None:
        if len(calibration_arrays) != len(example):
            raise InputError(f"calibration file {args.calibration} holds {len(calibration_arrays)} array(s); the "
                             f"model takes {len(example)} input(s): save one array per input, in order")
        batch = args.batch_size or (example[0].shape[0] if getattr(example[0], "ndim", 0) else 1) or 1
        calibration = split_batches(calibration_arrays, batch)
    art = deploy(ep.module(), target=args.target, example_inputs=example, calibration=calibration,
                 recipe=recipe, output=args.output, overwrite=args.force, **options)
    size = sum(m["bytes"] for m in art.manifest["files"].values())
    print(f"wrote {art.path} ({args.target}, {size} bytes)")
    return EXIT_OK


def _cmd_sign(args) -> int:
    from .signing import sign

    out = sign(args.artifact, args.key)
    print(f"signed {args.artifact}" + (f" ({out})" if out else ""))
    return EXIT_OK


def _verify_inputs(path: str, art) -> list[tuple]:
    """The samples of an ``.npz`` cut into calls of the artifact's static batch."""
    arrays = _load_npz(path, "inputs")
    sig = art.signature
    if len(arrays) != len(sig):
        raise InputError(f"inputs file {path} holds {len(arrays)} array(s); the artifact takes {len(sig)} "
                         f"input(s) ({', '.join(f'{n} {tuple(s)}' for n, s, _ in sig)}): one array per input")
    for a, (name, shape, _) in zip(arrays, sig):
        if not shape:
            raise InputError(f"the artifact's input {name!r} is a scalar; it has no batch axis to cut "
                             f"{path} along: call art.run() from Python instead")
        if a.ndim != len(shape) or tuple(a.shape[1:]) != tuple(shape[1:]):
            raise InputError(f"inputs file {path}: the array for input {name!r} has shape {tuple(a.shape)}; "
                             f"expected (N, {', '.join(map(str, shape[1:]))}) with N a multiple of {shape[0]}")
    counts = sorted({a.shape[0] for a in arrays})
    if len(counts) > 1:
        raise InputError(f"inputs file {path}: the arrays hold different numbers of samples "
                         f"({', '.join(map(str, counts))}); give every input the same number")
    n, b = counts[0], sig[0][1][0]
    if b < 1 or n == 0 or n % b:
        raise InputError(f"inputs file {path} holds {n} sample(s); the artifact was packed for batches of {b}: "
                         f"give a positive multiple of {b} samples"
                         + (f" (e.g. the first {n - n % b})" if n >= b and b else ""))
    return [tuple(a[i * b:(i + 1) * b] for a in arrays) for i in range(n // b)]


def _cmd_verify(args) -> int:
    from . import plugins
    from .artifact import load
    from .errors import ToolchainError

    art = load(args.artifact, verify_key=args.key)
    if args.runner:       # a misspelt runner is a usage error (2), not a failed verification (1)
        valid = art.runner_names()
        for name in args.runner:
            if name not in valid:
                raise InputError(f"unknown runner {name!r} for a {art.target} artifact; valid runners: "
                                 f"{', '.join(valid) or '(none registered)'} (edgepack plugins lists them)")
            reason = plugins.get_runner(name, art.target)().unavailable()
            if reason:        # asked for by name but cannot run on this machine: not a verification result
                raise ToolchainError(f"runner {name!r} cannot run here: {reason}")
    inputs = _verify_inputs(args.inputs, art) if args.inputs else None
    rep = art.verify(inputs=inputs, runners=args.runner)
    print(json.dumps(rep.to_dict(), indent=2) if args.json else rep)
    return EXIT_OK if rep.passed else EXIT_VERIFY


def _cmd_inspect(args) -> int:
    from .artifact import load

    art = load(args.artifact, verify_key=args.key)
    prof = art.profile
    if args.json:
        print(json.dumps(prof, indent=2))
        return EXIT_OK
    cols = ["name", "op", "in_shape", "out_shape", "params", "bytes", "macs"]
    extra = sorted({k for layer in prof.get("layers", []) for k in layer} - set(cols) - {"why_float"})
    rows = [[_fmt(layer.get(c, "")) for c in cols + extra] for layer in prof.get("layers", [])]
    print(f"{art.path}  target={art.target}")
    print(_table(cols + extra, rows))
    totals = prof.get("totals", {})
    print("totals: " + ", ".join(f"{k}={v}" for k, v in totals.items()))
    why = {layer["op"].split("->")[0]: layer["why_float"] for layer in prof.get("layers", [])
           if isinstance(layer.get("why_float"), str)}
    for op, reason in sorted(why.items()):
        print(f"kept in float: {op}: {reason}")
    deleg = prof.get("delegation")
    if isinstance(deleg, dict):
        outside = deleg.get("outside_delegate") or {}
        print(f"{deleg.get('delegate', 'delegate')}: {deleg.get('partitions')} partition(s), "
              f"{deleg.get('delegated_ops')} ops inside; outside: "
              + (", ".join(f"{k} x{v}" for k, v in outside.items()) or "none"))
    for runner, ms in prof.get("latency_ms", {}).items():
        print(f"latency ({runner}): {ms:.3f} ms")
    phases = prof.get("deploy_phases_s")
    if isinstance(phases, dict) and phases:
        print(f"deploy {prof.get('deploy_seconds')} s: " + ", ".join(f"{k} {v:.3f} s" for k, v in phases.items()))
    if prof.get("latency_note"):
        print(f"latency: {prof['latency_note']}")
    fid = prof.get("fidelity")
    if isinstance(fid, dict):
        print(f"fidelity vs the float model ({fid.get('runner')}, {fid.get('inputs')}): "
              f"SQNR {fid.get('sqnr_db')} dB, max abs err {_fmt(fid.get('max_abs_err'))}, "
              f"max rel err {_fmt(fid.get('max_rel_err'))}")
    return EXIT_OK


def _cmd_emulator(args) -> int:
    import time

    from . import emulator

    if args.emulator_command == "install":
        t0 = time.perf_counter()
        emu = emulator.install(args.cache, force=args.force, progress=not args.quiet)
        took = time.perf_counter() - t0
        print(f"ARM64 emulator ready in {emu.root} ({took:.1f} s; python {emu.stamp.get('python')}, "
              + ", ".join(f"{k} {v}" for k, v in sorted(emu.stamp.get("packages", {}).items())
                          if k in ("numpy", "ai-edge-litert")) + ")")
        return EXIT_OK
    st = emulator.status(args.cache)
    if args.json:
        print(json.dumps(st, indent=2))
        return EXIT_OK if st["installed"] else EXIT_VERIFY
    if st["installed"]:
        pkgs = ", ".join(f"{k} {v}" for k, v in sorted(st["packages"].items()))
        print(f"installed: {st['path']} ({st['size_mb']} MB, {st['version']})")
        print(f"python:    {st['python']} (from {len(st['debian_packages'])} Debian arm64 packages)")
        print(f"packages:  {pkgs}")
    else:
        print(f"not installed: {st['reason']}")
    print(f"qemu:      {st['qemu'] or 'missing (apt-get install qemu-user)'}"
          + (f" ({st['qemu_version']})" if st["qemu_version"] else ""))
    print(f"cpu:       {st['default_cpu']} (qemu -cpu; set EDGEPACK_QEMU_CPU to change)")
    cross_hint = "missing (apt-get install gcc-aarch64-linux-gnu libc6-dev-arm64-cross)"
    print(f"cross cc:  {st['cross_compiler'] or cross_hint}")
    return EXIT_OK if st["installed"] else EXIT_VERIFY


def _fmt(v) -> str:
    if isinstance(v, (list, tuple)):
        return "x".join(str(x) for x in v)
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max([len(h)] + [len(str(r[i])) for r in rows]) for i, h in enumerate(header)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


_COMMANDS = {"plugins": _cmd_plugins, "deploy": _cmd_deploy, "sign": _cmd_sign, "verify": _cmd_verify,
             "inspect": _cmd_inspect, "emulator": _cmd_emulator}
