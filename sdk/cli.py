"""The ``edgepack`` command (also ``python -m sdk``).

    edgepack plugins
    edgepack deploy MODEL.pt2 --target arm-int8 --calibration DATA.npz [--recipe R.yaml] -o OUT
    edgepack verify OUT [--inputs DATA.npz] [--runner host --runner reference]
    edgepack inspect OUT
    edgepack emulator install [--cache DIR] [--force]   (the ARM64 emulator of runner qemu-aarch64)
    edgepack emulator status [--cache DIR] [--json]    (exit 0 when installed and usable, else 1)

Exit codes: 0 ok, 1 verification failed, 2 usage or input error.  Errors are
one line on stderr (``--debug`` shows the traceback).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

from .errors import EdgepackError

EXIT_OK, EXIT_VERIFY, EXIT_USAGE = 0, 1, 2


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

    s = sub.add_parser("verify", help="check an artifact's hashes and run it against its reference")
    s.add_argument("artifact")
    s.add_argument("--inputs", help=".npz of inputs (default: the golden inputs stored in the artifact)")
    s.add_argument("--runner", action="append", help="runner(s) to use (repeatable)")
    s.add_argument("--json", action="store_true")

    s = sub.add_parser("inspect", help="print an artifact's profile")
    s.add_argument("artifact")
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
    args = build_parser().parse_args(argv)
    try:
        return _COMMANDS[args.command](args)
    except EdgepackError as exc:
        if args.debug:
            raise
        print(f"edgepack: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (OSError, ValueError) as exc:
        if args.debug:
            raise
        print(f"edgepack: error: {exc}", file=sys.stderr)
        return EXIT_USAGE


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


def _load_npz(path: str) -> list:
    import numpy as np

    with np.load(path) as z:
        return [z[k] for k in z.files]


def _cmd_deploy(args) -> int:
    from pathlib import Path

    import torch
    import yaml

    from .api import deploy
    from .data import split_batches
    from .errors import InputError

    if not Path(args.model).is_file():
        raise InputError(f"model file {args.model} does not exist")
    try:
        ep = torch.export.load(args.model)
    except Exception as exc:
        raise InputError(f"{args.model} is not a torch.export.save() file: {exc}") from None
    example = tuple(ep.example_inputs[0]) if ep.example_inputs else None
    if not example:
        raise InputError(f"{args.model} carries no example inputs; export it with example inputs")
    calibration = None
    if args.calibration:
        arrays = _load_npz(args.calibration)
        calibration = split_batches(arrays, args.batch_size or example[0].shape[0])
    options = {}
    for item in args.option:
        key, sep, value = item.partition("=")
        if not sep:
            raise InputError(f"--option {item!r} is not KEY=VALUE")
        options[key] = yaml.safe_load(value)
    art = deploy(ep.module(), target=args.target, example_inputs=example, calibration=calibration,
                 recipe=args.recipe, output=args.output, **options)
    size = sum(m["bytes"] for m in art.manifest["files"].values())
    print(f"wrote {art.path} ({args.target}, {size} bytes)")
    return EXIT_OK


def _cmd_verify(args) -> int:
    from .artifact import load

    art = load(args.artifact)
    inputs = None
    if args.inputs:
        arrays = _load_npz(args.inputs)
        n = arrays[0].shape[0] // art.inputs[0].shape[0]
        b = art.inputs[0].shape[0]
        inputs = [tuple(a[i * b:(i + 1) * b] for a in arrays) for i in range(n)]
    rep = art.verify(inputs=inputs, runners=args.runner)
    print(json.dumps(rep.to_dict(), indent=2) if args.json else rep)
    return EXIT_OK if rep.passed else EXIT_VERIFY


def _cmd_inspect(args) -> int:
    from .artifact import load

    art = load(args.artifact)
    prof = art.profile
    if args.json:
        print(json.dumps(prof, indent=2))
        return EXIT_OK
    cols = ["name", "op", "in_shape", "out_shape", "params", "bytes", "macs"]
    extra = sorted({k for layer in prof.get("layers", []) for k in layer} - set(cols))
    rows = [[_fmt(layer.get(c, "")) for c in cols + extra] for layer in prof.get("layers", [])]
    print(f"{art.path}  target={art.target}")
    print(_table(cols + extra, rows))
    totals = prof.get("totals", {})
    print("totals: " + ", ".join(f"{k}={v}" for k, v in totals.items()))
    for runner, ms in prof.get("latency_ms", {}).items():
        print(f"latency ({runner}): {ms:.3f} ms")
    if prof.get("latency_note"):
        print(f"latency: {prof['latency_note']}")
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


_COMMANDS = {"plugins": _cmd_plugins, "deploy": _cmd_deploy, "verify": _cmd_verify, "inspect": _cmd_inspect,
             "emulator": _cmd_emulator}
