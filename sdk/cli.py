"""The ``edgepack`` command (also ``python -m sdk``).

    edgepack plugins
    edgepack deploy MODEL.pt2 --target arm-int8 --calibration DATA.npz [--recipe R.yaml] -o OUT [--force]
                    [--trust-pickle]
    edgepack sign OUT --key KEYFILE
    edgepack verify OUT [--inputs DATA.npz] [--model M.pt2] [--runner host --runner reference] [--key KEYFILE]
    edgepack compress PKG.MODULE:FACTORY --recipe R.yaml --data TRAIN.npz [--weights W.pt] [--unlabeled U.npz]
                    [--val V.npz] [--teacher PKG.MODULE:FACTORY [--teacher-weights T.pt]] -o SMALL.pt2
                    [--deploy TARGET --artifact OUT [--calibration CAL.npz]]
    edgepack inspect OUT [--key KEYFILE] [--json] [--errors [--inputs DATA.npz] [--model M.pt2] [--trust-pickle]]
    edgepack report OUT [OUT2 ...] [-o REPORT.html] [--inputs DATA.npz] [--model M.pt2] [--runner R] [--overwrite]
    edgepack emulator install [--cache DIR] [--force]   (the ARM64 emulator of runner qemu-aarch64)
    edgepack emulator status [--cache DIR] [--json]    (exit 0 when installed and usable, else 1)

Exit codes: 0 ok; 1 verification failed (and ``emulator status``: not
installed); 2 usage or input error (bad arguments, files, data, options, an
unknown runner, a damaged or unsigned artifact: every :class:`EdgepackError`
and file-system error); 3 internal error (an exception edgepack did not mean
to raise: a bug, please report it).  Errors are one line on stderr;
``--debug`` shows the traceback instead.

Every command takes ``-q/--quiet`` (warnings and errors only, no progress) and
``-v/--verbose`` (debug messages too), before or after the command name.
Progress is a bar when stderr is a terminal, otherwise one line per stage
(:mod:`sdk.log`); results go to stdout, messages to stderr.

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
    p.add_argument("--quiet", "-q", action="store_true", help="only warnings and errors on stderr, no progress")
    p.add_argument("--verbose", "-v", action="store_true", help="debug messages on stderr too")
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
    s.add_argument("--model", help="the float model (.pt2) to measure fidelity against (default: only the "
                                   "golden outputs recorded at deploy time)")
    s.add_argument("--trust-pickle", action="store_true", help="with --model: as for deploy")
    s.add_argument("--json", action="store_true")

    s = sub.add_parser("compress", help="apply a recipe's stages to a model and save the result as a .pt2")
    s.add_argument("model", metavar="MODEL", help="PKG.MODULE:FACTORY, an importable callable that builds the "
                                                  "torch.nn.Module (e.g. examples.models:LeNet)")
    s.add_argument("--weights", "-w", help="its state dict (torch.save(model.state_dict(), W.pt); read with "
                                           "torch.load(weights_only=True)); default: the factory's weights")
    s.add_argument("--recipe", "-r", required=True, help="recipe YAML")
    s.add_argument("--data", "-d", help="training stream: .npz with array 'x' (inputs) and optional 'y' (targets)")
    s.add_argument("--unlabeled", help="unlabeled stream: .npz with array 'x'")
    s.add_argument("--val", help="validation stream: .npz with arrays 'x' and 'y'")
    s.add_argument("--teacher", metavar="PKG.MODULE:FACTORY", help="teacher for distillation stages (default: "
                                                                   "the uncompressed model)")
    s.add_argument("--teacher-weights", help="the teacher's state dict, as --weights")
    s.add_argument("--batch-size", "-b", type=int, default=32, help="samples per batch (default 32)")
    s.add_argument("--output", "-o", required=True, help="the compressed model, a torch.export .pt2 file")
    s.add_argument("--force", action="store_true", help="replace an existing --output file (and, with --deploy, "
                                                        "an existing artifact at --artifact)")
    s.add_argument("--deploy", metavar="TARGET", help="then deploy the compressed model to TARGET")
    s.add_argument("--artifact", metavar="OUT", help="with --deploy: the artifact directory")
    s.add_argument("--calibration", "-c", help="with --deploy: calibration .npz (default: the --data inputs)")

    s = sub.add_parser("inspect", help="print an artifact's profile")
    s.add_argument("artifact")
    s.add_argument("--key", "-k", metavar="KEYFILE", help="refuse the artifact unless this key signed it")
    s.add_argument("--json", action="store_true")
    s.add_argument("--errors", action="store_true",
                   help="rank the layers by quantization error, worst first (sdk.layer_errors)")
    s.add_argument("--inputs", help="with --errors: .npz of inputs (default: the artifact's golden inputs)")
    s.add_argument("--model", help="with --errors: the float .pt2 model to compare against (default: a float "
                                   "shadow of the packed graph)")
    s.add_argument("--trust-pickle", action="store_true", help="with --model: as for deploy")

    s = sub.add_parser("report", help="write one self-contained HTML report of an artifact, or comparing several")
    s.add_argument("artifacts", nargs="+", metavar="OUT", help="artifact directories (several: of one model)")
    s.add_argument("--output", "-o", help="the .html file (default: ./<name>-report.html; never inside an artifact)")
    s.add_argument("--inputs", help=".npz of inputs (default: the golden inputs stored in each artifact)")
    s.add_argument("--model", help="the float model, a torch.export .pt2 file: fidelity is measured against it "
                                   "(default: against the golden outputs recorded at deploy time)")
    s.add_argument("--runner", action="append", help="runner(s) to time and verify (default: all that run here)")
    s.add_argument("--repeats", type=int, default=30, help="timed calls per runner (default 30)")
    s.add_argument("--overwrite", action="store_true", help="replace an existing report file")
    s.add_argument("--key", "-k", metavar="KEYFILE", help="refuse an artifact unless this key signed it")
    s.add_argument("--trust-pickle", action="store_true",
                   help="let torch unpickle the --model file's pickled entries: this RUNS CODE FROM THE FILE")

    s = sub.add_parser("emulator", help="install or inspect the ARM64 emulator (runner qemu-aarch64)")
    esub = s.add_subparsers(dest="emulator_command", required=True, parser_class=_Parser)
    e = esub.add_parser("install", help="build the aarch64 sysroot and LiteRT into the cache (idempotent)")
    e.add_argument("--cache", metavar="DIR", help="cache root (default: $EDGEPACK_CACHE or ~/.cache/edgepack)")
    e.add_argument("--force", action="store_true", help="rebuild even when a current install exists")
    e.add_argument("--quiet", "-q", action="store_true", help="no progress display")
    e = esub.add_parser("status", help="what is installed")
    e.add_argument("--cache", metavar="DIR", help="cache root (default: $EDGEPACK_CACHE or ~/.cache/edgepack)")
    e.add_argument("--json", action="store_true")
    _add_log_flags(p)
    return p


def _add_log_flags(parser: argparse.ArgumentParser) -> None:
    """-q/-v after the command name too.  A subcommand's flag must not reset the value given before
    the command (argparse lets a subparser's default overwrite it), hence SUPPRESS."""
    for action in parser._actions:
        if not isinstance(action, argparse._SubParsersAction):
            continue
        for sp in action.choices.values():
            for dest, flags, text in (("quiet", ("--quiet", "-q"), "as edgepack --quiet"),
                                      ("verbose", ("--verbose", "-v"), "as edgepack --verbose")):
                mine = [a for a in sp._actions if a.dest == dest]
                if mine:
                    mine[0].default = argparse.SUPPRESS
                elif not any(f in sp._option_string_actions for f in flags):
                    sp.add_argument(*flags, dest=dest, action="store_true", default=argparse.SUPPRESS, help=text)
            _add_log_flags(sp)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line ``argv`` (default ``sys.argv[1:]``); returns the exit code."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:          # usage errors (2) and --help (0) return their code instead of exiting
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    if args.quiet and args.verbose:
        print("edgepack: error: --quiet and --verbose contradict each other; give one", file=sys.stderr)
        return EXIT_USAGE
    from .log import configured

    with configured(-1 if args.quiet else 1 if args.verbose else 0):
        return _run(args)


def _run(args) -> int:
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
    return list(_load_npz_named(path, what).values())


def _load_npz_named(path: str, what: str) -> dict:
    """:func:`_load_npz` with the arrays' names: ``{name: array}`` in the file's order."""
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
    return dict(arrays)


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


def _build_model(spec: str, weights: str | None, what: str):
    """``PKG.MODULE:FACTORY`` called with no arguments, then ``weights`` (a state dict read with
    ``torch.load(weights_only=True)``: tensors only, nothing unpickled that could run code)."""
    import importlib

    import torch

    if spec.endswith(".pt2"):
        raise InputError(f"{what} {spec}: compress needs the model as Python code, PKG.MODULE:FACTORY (and "
                         "--weights W.pt): a torch.export graph has no layers to prune or train (no Conv2d/Linear "
                         "modules, no train(), a fixed batch size); deploy takes .pt2 files")
    mod_name, sep, attr = spec.partition(":")
    if not sep or not mod_name or not attr:
        raise InputError(f"{what} {spec!r} is not PKG.MODULE:FACTORY (an importable callable that returns the "
                         "torch.nn.Module, e.g. examples.models:LeNet)")
    try:
        factory = importlib.import_module(mod_name)
        for part in attr.split("."):
            factory = getattr(factory, part)
    except (ImportError, AttributeError) as exc:
        raise InputError(f"{what} {spec!r}: cannot import it ({type(exc).__name__}: {exc}); give a module on "
                         "sys.path (run from its project, or pip install it) and a name it defines") from None
    if not callable(factory):
        raise InputError(f"{what} {spec!r} is a {type(factory).__name__}, not a callable that builds the model")
    try:
        model = factory()
    except TypeError as exc:            # it needs arguments: the CLI has none to give
        raise InputError(f"{what} {spec!r} cannot be called without arguments ({exc}); give a factory "
                         "function that builds the model with its settings") from None
    if not isinstance(model, torch.nn.Module):
        raise InputError(f"{what} {spec!r}() returned a {type(model).__name__}, not a torch.nn.Module")
    if weights is not None:
        if not Path(weights).is_file():
            raise InputError(f"weights file {weights} does not exist")
        try:
            state = torch.load(weights, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 -- torch raises UnpicklingError, RuntimeError, EOFError...
            raise InputError(f"weights file {weights} is not a torch.save()d state dict of tensors "
                             f"({type(exc).__name__}: {' '.join(str(exc).split())[:200]}); save it with "
                             "torch.save(model.state_dict(), path)") from None
        if not isinstance(state, dict):
            raise InputError(f"weights file {weights} holds a {type(state).__name__}, not a state dict; save it "
                             "with torch.save(model.state_dict(), path)")
        try:
            model.load_state_dict(state)
        except RuntimeError as exc:
            first = str(exc).strip().splitlines()
            raise InputError(f"weights file {weights} does not fit {spec}: {' '.join(first[:2])[:300]}") from None
    return model.eval()


def _stream(path: str | None, what: str, batch_size: int, labelled: bool) -> list | None:
    """The batches of a data stream ``.npz``: array ``x`` (and ``y``, kept when ``labelled``) cut along
    the first axis; floating arrays become float32 (the model's dtype), integer targets int64."""
    import numpy as np
    import torch

    if path is None:
        return None
    arrays = _load_npz_named(path, what)
    if "x" not in arrays:
        raise InputError(f"{what} file {path} has no array 'x' (it holds {', '.join(arrays)}); save the inputs "
                         "as x (and the targets as y): numpy.savez(path, x=inputs, y=targets)")
    x, y = arrays["x"], arrays.get("y") if labelled else None
    if y is not None and len(y) != len(x):
        raise InputError(f"{what} file {path}: 'x' holds {len(x)} samples and 'y' {len(y)}; give one target "
                         "per sample")
    if len(x) == 0:
        raise InputError(f"{what} file {path}: 'x' holds no samples")

    def tensor(a, target: bool = False):
        # inputs are float32 whatever they were saved as (uint8 images too); class targets are int64
        a = a.astype(np.int64) if target and a.dtype.kind in "iub" else a.astype(np.float32)
        return torch.from_numpy(np.ascontiguousarray(a))

    out = []
    for i in range(0, len(x), batch_size):
        xb = tensor(x[i:i + batch_size])
        out.append((xb, tensor(y[i:i + batch_size], True)) if y is not None else (xb,) if labelled else xb)
    return out


def _cmd_compress(args) -> int:
    """``compress``: the recipe's torch-side stages on the model, saved as a .pt2 (atomically), then
    optionally deployed."""
    import os
    import tempfile

    import torch

    from .api import compress, deploy
    from .data import split_batches
    from .pt2 import load_exported

    if args.batch_size < 1:
        raise InputError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.deploy and not args.artifact:
        raise InputError("--deploy TARGET needs --artifact OUT, the artifact directory to write")
    if (args.artifact or args.calibration) and not args.deploy:
        raise InputError("--artifact and --calibration go with --deploy TARGET")
    if args.deploy:                     # before the slow work: an unknown target, an output not ours to replace
        from . import plugins
        from .artifact import check_output

        plugins.get("target", args.deploy)
        check_output(Path(args.artifact), args.force)
    out = Path(args.output)
    if out.suffix != ".pt2":
        raise InputError(f"--output {out} must end in .pt2 (a torch.export.save() file)")
    if out.is_dir():
        raise InputError(f"--output {out} is a directory; give the .pt2 file to write")
    if out.exists() and not args.force:
        raise InputError(f"{out} exists; pass --force to replace it")
    if not out.parent.is_dir():
        raise InputError(f"the directory of --output {out} does not exist")
    recipe = _load_recipe(args.recipe)
    streams = {"train": _stream(args.data, "data", args.batch_size, True),
               "unlabeled": _stream(args.unlabeled, "unlabeled", args.batch_size, False),
               "val": _stream(args.val, "val", args.batch_size, True)}
    first = next((b for b in (streams["train"], streams["unlabeled"], streams["val"]) if b), None)
    if first is None:
        raise InputError("compress needs data: --data TRAIN.npz (array x, and y for labelled stages), or "
                         "--unlabeled U.npz")
    sample = first[0][0] if isinstance(first[0], tuple) else first[0]
    example = (sample[:1],)
    if args.teacher_weights and not args.teacher:
        raise InputError("--teacher-weights goes with --teacher PKG.MODULE:FACTORY")
    model = _build_model(args.model, args.weights, "model")
    teacher = _build_model(args.teacher, args.teacher_weights, "--teacher") if args.teacher else None
    small = compress(model, recipe, data={k: v for k, v in streams.items() if v}, teacher=teacher)
    try:
        ep = torch.export.export(small, example)
    except Exception as exc:  # noqa: BLE001 -- torch.export fails in many ways on unsupported code
        raise InputError(f"the compressed model could not be exported with torch.export "
                         f"({type(exc).__name__}: {' '.join(str(exc).split())[:200]})") from None
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".pt2", dir=out.parent)
    os.close(fd)
    try:
        torch.export.save(ep, tmp)
        load_exported(tmp)              # what deploy will read: refused entries would show here, not later
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    print(f"wrote {out} ({sum(p.numel() for p in small.parameters())} parameters, "
          f"{sum(int((p == 0).sum()) for p in small.parameters())} zero)")
    if args.deploy:
        calibration = (split_batches(_load_npz(args.calibration, "calibration"), args.batch_size) if args.calibration
                       else [(b[0] if isinstance(b, tuple) else b) for b in first])
        graph_only = {"stages": [st.to_dict() for st in recipe.graph_stages]}
        art = deploy(small, target=args.deploy, example_inputs=example, calibration=calibration,
                     recipe=graph_only, output=args.artifact, overwrite=args.force)
        size = sum(m["bytes"] for m in art.manifest["files"].values())
        print(f"wrote {art.path} ({args.deploy}, {size} bytes)")
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
    model = None
    if args.model:
        from .pt2 import load_exported

        model = load_exported(args.model, trust_pickle=args.trust_pickle)
    rep = art.verify(model, inputs=inputs, runners=args.runner)
    if args.json:
        print(json.dumps(rep.to_dict(), indent=2))
        return EXIT_OK if rep.passed else EXIT_VERIFY
    files = art.manifest.get("files", {})
    print(f"checked: the sha256 and size of {len(files)} file(s) against manifest.json"
          + (f"; the manifest's signature (key {args.key})" if args.key else "; no signature (no --key given)"))
    print(rep)
    return EXIT_OK if rep.passed else EXIT_VERIFY


def _cmd_inspect(args) -> int:
    from .artifact import load

    art = load(args.artifact, verify_key=args.key)
    prof = art.profile
    if args.errors:
        return _inspect_errors(args, art)
    if args.inputs or args.model:
        raise InputError("--inputs and --model go with --errors (edgepack inspect OUT --errors --model M.pt2)")
    if args.json:
        print(json.dumps(prof, indent=2))
        return EXIT_OK
    cols = ["name", "op", "in_shape", "out_shape", "params", "bytes", "macs"]
    extra = sorted({k for layer in prof.get("layers", []) for k in layer} - set(cols)
                   - {"why_float", "tensor", "layout"})
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


def _inspect_errors(args, art) -> int:
    """``inspect --errors``: the layers ranked by local SQNR lost (:func:`sdk.layer_errors.layer_errors`)."""
    from .layer_errors import layer_errors

    model = None
    if args.model:
        from .pt2 import load_exported

        model = load_exported(args.model, trust_pickle=args.trust_pickle)
    inputs = [list(call) for call in _verify_inputs(args.inputs, art)] if args.inputs else None
    rep = layer_errors(art, model=model, inputs=inputs)
    print(json.dumps(rep.to_dict(), indent=2) if args.json else rep.table())
    return EXIT_OK


def _cmd_report(args) -> int:
    from .artifact import load
    from .pt2 import load_exported
    from .report import build_report

    arts = [load(p, verify_key=args.key) for p in args.artifacts]
    inputs = _verify_inputs(args.inputs, arts[0]) if args.inputs else None
    model = load_exported(args.model, trust_pickle=args.trust_pickle) if args.model else None
    out = build_report(arts, args.output, model=model, inputs=inputs, runners=args.runner, repeats=args.repeats,
                       overwrite=args.overwrite)
    print(f"wrote {out}")
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
             "inspect": _cmd_inspect, "emulator": _cmd_emulator,
             "report": _cmd_report, "compress": _cmd_compress}
