"""Child process of the artifact fuzz test: loads and runs mutated artifacts.

Reads one JSON request per line on stdin — ``{"dir": ..., "key": hex|null,
"sentinels": [paths]}`` — and answers one JSON line: ``{"outcome": "error",
"type": ...}`` for an :class:`~sdk.errors.EdgepackError`, ``{"outcome":
"raw", ...}`` for any other exception, or ``{"outcome": "ran", "outputs":
{runner: [sha256 of each output]}}``.  An audit hook records every attempt to
open one of the ``sentinels`` (files outside the artifact that a mutation points
at), reported as ``"opened"``.  A crash (segfault) ends the process; the parent
sees it and starts another.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import sys
import traceback

_SENTINELS: set[str] = set()
_OPENED: list[str] = []


def _audit(event, args):
    if event == "open" and args and isinstance(args[0], (str, bytes)):
        import os

        path = os.path.realpath(os.fsdecode(args[0]))
        if path in _SENTINELS:
            _OPENED.append(path)


def handle(req: dict) -> dict:
    import numpy as np

    import sdk

    _SENTINELS.clear()
    _SENTINELS.update(req.get("sentinels", []))
    _OPENED.clear()
    key = bytes.fromhex(req["key"]) if req.get("key") else None
    try:
        art = sdk.load(req["dir"], verify_key=key)
        inputs, _ = art.golden()
        outs = {}
        for runner in req["runners"]:
            ys = art.run(*inputs, runner=runner)
            outs[runner] = [hashlib.sha256(np.ascontiguousarray(y).tobytes()).hexdigest() for y in ys]
        with contextlib.redirect_stdout(io.StringIO()):     # inspect reads the profile and manifest too
            sdk.cli.main(["--debug", "inspect", req["dir"]])
        res = {"outcome": "ran", "outputs": outs}
    except sdk.EdgepackError as exc:
        res = {"outcome": "error", "type": type(exc).__name__, "message": str(exc)[:300]}
    except BaseException as exc:  # noqa: BLE001 - the point is to see anything that is not ours
        res = {"outcome": "raw", "type": type(exc).__name__, "message": str(exc)[:300],
               "traceback": traceback.format_exc()[-1500:]}
    res["opened"] = sorted(set(_OPENED))
    return res


def main() -> None:
    sys.addaudithook(_audit)
    import sdk.cli  # noqa: F401  - import everything before the first request
    for line in sys.stdin:
        print(json.dumps(handle(json.loads(line))), flush=True)


if __name__ == "__main__":
    main()
