"""The early-exit artifact: its manifest section, and running its stages input by input (torch-free).

An ``early-exit`` cascade (:mod:`sdk.early_exit` builds and packs it) ships one graph per stage
instead of ``model.tflite``: ``stage0.tflite``, ``stage1.tflite``, ..., each packed for one input.
Every stage but the last outputs ``(features, logits, score)``: the features the next stage
takes, its exit head's logits and its policy's score; the last outputs ``logits``.  A device runs
stage 0, compares the score with the stage's threshold — exit with these logits when ``score ≥
threshold`` — and otherwise hands the features, as stored, to the next stage.

The manifest's ``early_exit`` section, checked strictly by :func:`check_section` when the
artifact is loaded::

    "early_exit": {"format": "edgepack-early-exit", "version": 1, "stages": [
        {"file": "stage0.tflite", "inputs": [<sig>], "outputs": [<sig>, <sig>, <sig>],
         "roles": ["features", "logits", "score"], "threshold": 0.5, "macs": 18592},
        ...,
        {"file": "stage2.tflite", "inputs": [<sig>], "outputs": [<sig>], "roles": ["logits"], "macs": 297472}]}

``<sig>`` is a tensor signature as in the manifest's ``inputs`` (:class:`sdk.contract.TensorSig`:
torch shape with batch 1, dtype, stored layout and dtype, quantization); ``macs`` are the stage's
MACs per input (its graph's layers, tagged ``"stage": k`` in ``profile.json``, sum to it — the
runners check that).  The section must agree with itself and with the manifest: 2 to
:data:`MAX_STAGES` stages, each file listed in ``files`` once, stage ``k + 1``'s input is stage
``k``'s features (shape, layout, stored dtype and quantization: the hand-off copies bytes), every
stage's logits have the same shape, a score is one number in ``(0, 1)`` compared with a threshold
in ``(0, 1)``, and the manifest's ``inputs``/``outputs`` are stage 0's input and the logits with any
batch size.  Each stage file goes through the runner's flatbuffer check against its own
signatures before a runtime sees it (:func:`open_cascade`).  Anything else is
:class:`~sdk.errors.ArtifactError`.

Running (:func:`open_cascade`, :func:`run`): the LiteRT runners (``host``, ``reference``) open
each stage and run a batch stage by stage — stage 0 for every input, then each later stage for the
inputs that are still there — one input per call, as a device would.  :func:`run` (what
``art.run(x)`` calls for a cascade, keeping the result as ``art.last_run_info``) returns a
:class:`CascadeRun`: the logits, each input's exit stage, the scores, and the MACs each input
cost, from the artifact's own stage MACs.

>>> stage_file(2)
'stage2.tflite'
"""

from __future__ import annotations

import dataclasses
import threading
from typing import Any, Callable, Sequence

import numpy as np

from .errors import ArtifactError, InputError

__all__ = ["CascadeRun", "FORMAT", "MAX_STAGES", "SECTION", "check_section", "open_cascade", "run", "stage_file"]

SECTION = "early_exit"
FORMAT = "edgepack-early-exit"
VERSION = 1
#: most stages a cascade may have
MAX_STAGES = 16
#: most MACs a stage may claim (their running sums stay exact in int64 and float64)
MAX_STAGE_MACS = 1 << 53
#: outputs of a stage with an exit, in order, and of the last stage
EXIT_ROLES = ("features", "logits", "score")
FINAL_ROLES = ("logits",)
_WHERE = "manifest.json: early_exit"


def stage_file(k: int) -> str:
    """The file name of stage ``k``'s graph."""
    return f"stage{k}.tflite"


def _fail(where: str, what: str) -> ArtifactError:
    return ArtifactError(f"{where}: {what}")


def _same_tensor(a: dict, b: dict) -> bool:
    """Whether two signatures describe the same stored tensor (shape, layout, dtypes, quantization)."""
    if any(a.get(k) != b.get(k) for k in ("shape", "layout", "stored_dtype", "dtype")):
        return False
    qa, qb = a.get("quantization"), b.get("quantization")
    if qa is None or qb is None:
        return qa is None and qb is None
    return qa.get("zero_point") == qb.get("zero_point") and qa.get("axis") == qb.get("axis") and \
        len(qa.get("scale", [])) == len(qb.get("scale", [])) and \
        bool(np.allclose(np.float32(qa["scale"]), np.float32(qb["scale"]), rtol=1e-6, atol=0))


def check_section(section: Any, manifest: dict) -> dict:
    """Raise :class:`ArtifactError` unless ``section`` is an ``early_exit`` section this edgepack
    writes, consistent with itself and with ``manifest`` (see the module docstring)."""
    from .schema import _dict, _int, _list, _num, check_file_name, check_tensor_sig

    s = _dict(_WHERE, section)
    unknown = set(s) - {"format", "version", "stages"}
    if unknown:
        raise _fail(_WHERE, f"unknown field(s) {sorted(unknown)}")
    if s.get("format") != FORMAT:
        raise _fail(f"{_WHERE}.format", f"{s.get('format')!r} is not {FORMAT!r}")
    if not _int(s.get("version")) or not 1 <= s["version"] <= VERSION:
        raise _fail(f"{_WHERE}.version", f"{s.get('version')!r}: this edgepack reads early-exit version "
                    f"{VERSION}; upgrade edgepack for a newer one")
    stages = _list(f"{_WHERE}.stages", s.get("stages"))
    if not 2 <= len(stages) <= MAX_STAGES:
        raise _fail(f"{_WHERE}.stages", f"expected 2 to {MAX_STAGES} stages, got {len(stages)}")
    files = manifest.get("files") or {}
    seen: set[str] = set()
    for k, st in enumerate(stages):
        at = f"{_WHERE}.stages[{k}]"
        st = _dict(at, st)
        final = k == len(stages) - 1
        allowed = {"file", "inputs", "outputs", "roles", "macs"} | (set() if final else {"threshold"})
        unknown = set(st) - allowed
        if unknown:
            raise _fail(at, f"unknown field(s) {sorted(unknown)}")
        name = check_file_name(st.get("file"), f"{at}.file")
        if name not in files or not name.endswith(".tflite"):
            raise _fail(f"{at}.file", f"{name!r} is not a .tflite file the manifest lists")
        if name in seen:
            raise _fail(f"{at}.file", f"{name!r} is named by two stages")
        seen.add(name)
        roles = EXIT_ROLES if not final else FINAL_ROLES
        if st.get("roles") != list(roles):
            raise _fail(f"{at}.roles", f"expected {list(roles)}, got {st.get('roles')!r}")
        ins = _list(f"{at}.inputs", st.get("inputs"))
        outs = _list(f"{at}.outputs", st.get("outputs"))
        if len(ins) != 1 or len(outs) != len(roles):
            raise _fail(at, f"expected 1 input and {len(roles)} outputs, got {len(ins)} and {len(outs)}")
        for where, sig in [(f"{at}.inputs[0]", ins[0])] + [(f"{at}.outputs[{i}]", o) for i, o in enumerate(outs)]:
            check_tensor_sig(where, sig)
            if not sig["shape"] or sig["shape"][0] != 1:
                raise _fail(where, f"shape {sig['shape']}: stages are packed for one input "
                            "(batch 1)")
        if not (_int(st.get("macs")) and 0 <= st["macs"] <= MAX_STAGE_MACS):
            raise _fail(f"{at}.macs", f"expected an integer in [0, {MAX_STAGE_MACS}], got {st.get('macs')!r}")
        if not final:
            t = st.get("threshold")
            if not (_num(t) and 0 < t < 1):
                raise _fail(f"{at}.threshold", f"expected a number in (0, 1), got {t!r}")
            if list(outs[2]["shape"]) != [1, 1]:
                raise _fail(f"{at}: score", f"shape {outs[2]['shape']}, expected [1, 1] (one score per input)")
    logits = stages[-1]["outputs"][0]
    for k in range(1, len(stages)):           # the stages chain: each takes the features before it as stored
        prev, now = stages[k - 1]["outputs"][0], stages[k]["inputs"][0]
        if not _same_tensor(prev, now):
            raise _fail(f"{_WHERE}.stages[{k}].inputs[0]", f"stage {k} must take stage {k - 1}'s features as "
                        f"stored (shape, layout, dtype, quantization): {prev} vs {now}")
        if list(stages[k - 1]["outputs"][1]["shape"]) != list(logits["shape"]):
            raise _fail(f"{_WHERE}.stages[{k - 1}]", f"its logits are {stages[k - 1]['outputs'][1]['shape']}, the "
                        f"last stage's {logits['shape']}: every exit predicts the same classes")
    m_in, m_out = manifest.get("inputs") or [], manifest.get("outputs") or []
    first = stages[0]["inputs"][0]
    if len(m_in) != 1 or list(m_in[0].get("shape", [])[1:]) != list(first["shape"][1:]):
        raise _fail(_WHERE, f"the manifest's inputs must be stage 0's input {first['shape'][1:]} per sample")
    if len(m_out) != 1 or list(m_out[0].get("shape", [])[1:]) != list(logits["shape"][1:]):
        raise _fail(_WHERE, f"the manifest's outputs must be the logits {logits['shape'][1:]} per sample")
    return s


# ---------------------------------------------------------------------------
# running
# ---------------------------------------------------------------------------

@dataclasses.dataclass
class CascadeRun:
    """One run of a cascade over ``N`` inputs.

    ``logits`` ``(N, classes)`` float: each input's logits from the stage it exited at;
    ``exit_stage`` ``(N,)``: that stage (``stages − 1``: it ran to the end); ``scores`` ``(N,
    stages − 1)``: the policy scores of the exits it reached (NaN after it left);
    ``stage_macs``: MACs per input of each stage, from the artifact.
    """

    logits: np.ndarray
    exit_stage: np.ndarray
    scores: np.ndarray
    stage_macs: tuple[int, ...]

    @property
    def stages_run(self) -> np.ndarray:
        """How many stages each input ran."""
        return self.exit_stage + 1

    @property
    def macs(self) -> np.ndarray:
        """MACs each input cost: the sum of the stages it ran."""
        return np.cumsum(np.asarray(self.stage_macs, dtype=np.int64))[self.exit_stage]

    @property
    def mean_macs(self) -> float:
        """Mean MACs per input."""
        return float(self.macs.mean())

    @property
    def exit_fractions(self) -> list[float]:
        """Fraction of the inputs leaving at each stage."""
        return [float(v) for v in np.bincount(self.exit_stage, minlength=len(self.stage_macs)) / len(self.exit_stage)]


def _check_profile(artifact, stages: list[dict]) -> None:
    """The stage MACs of the manifest are those of the profile's layers of each stage."""
    layers = (getattr(artifact, "profile", None) or {}).get("layers")
    if not layers:          # the staged artifact of deploy's first run has no profile yet
        return
    sums = [0] * len(stages)
    for row in layers:
        k = row.get("stage")
        if not isinstance(k, int) or isinstance(k, bool) or not 0 <= k < len(stages):
            raise ArtifactError(f"artifact {artifact.path}: profile.json layer {row.get('name')!r} belongs to no "
                                f"stage of the early-exit cascade (stage {k!r})")
        sums[k] += int(row.get("macs", 0) or 0)
    for k, (st, got) in enumerate(zip(stages, sums)):
        if st["macs"] != got:
            raise ArtifactError(f"artifact {artifact.path}: manifest.json early_exit stage {k} claims {st['macs']} "
                                f"MACs, its layers in profile.json sum to {got}; deploy the cascade again")


def open_cascade(artifact, load: Callable[[dict, bytes], Callable]) -> Callable[[list[np.ndarray]], list[np.ndarray]]:
    """A session running ``artifact``'s cascade: ``session([x]) -> [logits]`` for any batch ``N``;
    ``session.cascade([x])`` gives the :class:`CascadeRun`.

    ``load(stage, data)`` is the runner's: it checks a stage file's bytes against the stage's
    signatures (``{"inputs", "outputs"}`` of ``stage``; :class:`ArtifactError` when they do not
    match) and returns a function from the stage's stored inputs to its stored outputs (it may
    carry ``delegation``: the session's ``profile`` sums them).  Calls are serialised (one lock:
    the runtimes are not thread-safe)."""
    from .litert.layout import from_stored, to_stored

    section = artifact.manifest[SECTION]
    stages = section["stages"]
    _check_profile(artifact, stages)
    runs = [load(st, artifact.read_bytes(st["file"])) for st in stages]
    macs = tuple(int(st["macs"]) for st in stages)
    last = len(stages) - 1
    lock = threading.Lock()

    def cascade(inputs: list[np.ndarray]) -> CascadeRun:
        (x,) = inputs
        n = x.shape[0]
        first = stages[0]["inputs"][0]
        held = [to_stored(first, x[i:i + 1]) for i in range(n)]
        classes = stages[last]["outputs"][0]["shape"][1:]
        logits = np.zeros((n, *classes), np.float32)
        exit_stage = np.full(n, last, np.int64)
        scores = np.full((n, last), np.nan, np.float32)
        active = list(range(n))
        with lock:
            for k, (st, fn) in enumerate(zip(stages, runs)):
                outs_sig = st["outputs"]
                going = []
                for i in active:
                    outs = fn([held[i]])
                    if k == last:
                        logits[i] = from_stored(outs_sig[0], outs[0])[0]
                        continue
                    score = np.float32(from_stored(outs_sig[2], outs[2]).reshape(-1)[0])
                    scores[i, k] = score
                    if score >= np.float32(st["threshold"]):
                        logits[i] = from_stored(outs_sig[1], outs[1])[0]
                        exit_stage[i] = k
                    else:
                        held[i] = outs[0]           # the features as stored: the next stage's input
                        going.append(i)
                active = going
        return CascadeRun(logits, exit_stage, scores, macs)

    def session(inputs: list[np.ndarray]) -> list[np.ndarray]:
        if len(inputs) != 1:
            raise InputError(f"an early-exit cascade takes 1 input, got {len(inputs)}")
        return [cascade(inputs).logits]

    session.cascade = cascade
    session.lock = lock
    delegations = [getattr(fn, "delegation", None) for fn in runs]
    if all(delegations):
        outside: dict[str, int] = {}
        for d in delegations:
            for op, count in d.get("outside_delegate", {}).items():
                outside[op] = outside.get(op, 0) + count
        session.profile = {"delegation": {"delegate": delegations[0].get("delegate", ""),
                                          "partitions": sum(d.get("partitions", 0) for d in delegations),
                                          "delegated_ops": sum(d.get("delegated_ops", 0) for d in delegations),
                                          "outside_delegate": dict(sorted(outside.items()))}}
    return session


def cascade_inputs(artifact, inputs: Sequence[Any]) -> list[np.ndarray]:
    """One call's input as a float32 array of any batch size, checked against the artifact's
    per-input shape (:class:`InputError` otherwise)."""
    from .data import as_inputs

    if len(inputs) == 1 and isinstance(inputs[0], (tuple, list)):
        inputs = tuple(inputs[0])
    (name, shape, dtype), = artifact.signature
    if len(inputs) != 1:
        raise InputError(f"an early-exit cascade takes 1 input ({name} (N, {', '.join(map(str, shape[1:]))})), "
                         f"got {len(inputs)}")
    got = tuple(np.shape(inputs[0])) if not hasattr(inputs[0], "shape") else tuple(inputs[0].shape)
    if not got or got[0] < 1:
        raise InputError(f"input {name!r} has shape {got}; pass a batch (N, {', '.join(map(str, shape[1:]))}) "
                         "with N >= 1")
    return as_inputs(list(inputs), [(name, (got[0], *shape[1:]), dtype)])


def run(artifact, *inputs: Any, runner: str | None = None) -> CascadeRun:
    """Run a cascade artifact on a batch (any size) in ``runner`` (default: the target's).

    >>> res = run(art, x_test)                       # doctest: +SKIP
    >>> res.mean_macs, res.exit_fractions           # doctest: +SKIP
    """
    if SECTION not in artifact.manifest:
        raise InputError(f"artifact {artifact.path} is not an early-exit cascade (its manifest has no {SECTION})")
    session = artifact.session(runner)
    return session.cascade(cascade_inputs(artifact, inputs))
