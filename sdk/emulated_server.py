"""Runs *inside* the emulated aarch64 Python (3.11, numpy and ai_edge_litert only);
never imported by edgepack on the host.

    python -I -S emulated_server.py SPEC_JSON

``SPEC_JSON`` says where the aarch64 site folder is and what to load:

``{"kind": "litert", "model": "checked-model.tflite", "num_threads": 1, "delegate": true}``
    a LiteRT flatbuffer, run by ai_edge_litert's aarch64 build;
``{"kind": "clib", "library": "model.so", "weights": "artifact/weights.bin",
"entry": "edgepack_model_run", "output_shapes": [[1, 10]]}``
    a C model cross-compiled for aarch64, called through ctypes as
    ``int entry(const float *input, float *output, const void *weights)``.

Protocol, one JSON object per line: this process first answers
``{"ready": true, "info": {...}}`` (or ``{"ready": false, "error": ...}``), then
for each request ``{"op": "run", "inputs": "in.npz", "outputs": "out.npz",
"repeat": N}`` it reads ``x0, x1, ...`` from ``inputs``, invokes the model
(``repeat`` times, timing each invoke with ``perf_counter`` inside the
emulator), writes ``y0, y1, ...`` of the first invoke to ``outputs`` and
answers ``{"ok": true, "ms": [...]}`` or ``{"ok": false, "error": ...}``.
``{"op": "quit"}`` ends it.  Anything the runtime prints goes to stderr, never
into the protocol stream.
"""

import json
import os
import platform
import sys
import time
import traceback


def open_litert(spec):
    from ai_edge_litert import interpreter as mod

    kwargs = {"model_path": spec["model"], "num_threads": int(spec.get("num_threads", 1))}
    if not spec.get("delegate", True):
        kwargs["experimental_op_resolver_type"] = mod.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
    interp = mod.Interpreter(**kwargs)
    interp.allocate_tensors()
    ins, outs = interp.get_input_details(), interp.get_output_details()

    def run(xs):
        if len(xs) != len(ins):
            raise ValueError(f"model takes {len(ins)} inputs, got {len(xs)}")
        for d, x in zip(ins, xs):
            if tuple(x.shape) != tuple(d["shape"]) or x.dtype != d["dtype"]:
                raise ValueError(f"input {d['name']!r}: expected {tuple(int(s) for s in d['shape'])} "
                                 f"{d['dtype'].__name__}, got {tuple(x.shape)} {x.dtype}")
            interp.set_tensor(d["index"], x)
        t0 = time.perf_counter()
        interp.invoke()
        dt = time.perf_counter() - t0
        return [interp.get_tensor(d["index"]).copy() for d in outs], dt

    def again():
        t0 = time.perf_counter()
        interp.invoke()
        return time.perf_counter() - t0

    ops = [o["op_name"] for o in interp._get_ops_details()]
    try:
        from importlib.metadata import version

        runtime = "ai-edge-litert " + version("ai-edge-litert")
    except Exception:
        runtime = "ai-edge-litert"
    return run, again, {"runtime": runtime, "delegate_nodes": ops.count("DELEGATE"), "ops": len(ops)}


def open_clib(spec):
    import ctypes

    import numpy as np

    lib = ctypes.CDLL(os.path.abspath(spec["library"]))
    fn = getattr(lib, spec.get("entry", "edgepack_model_run"))
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_void_p] * 3
    raw = np.fromfile(spec["weights"], dtype=np.uint8) if spec.get("weights") else np.zeros(0, np.uint8)
    buf = np.empty(raw.size + 64, dtype=np.uint8)          # 64-byte aligned copy of the weights
    off = (-buf.ctypes.data) % 64
    weights = buf[off:off + raw.size]
    weights[:] = raw
    shapes = [tuple(s) for s in spec["output_shapes"]]
    state = {}

    def call():
        t0 = time.perf_counter()
        rc = fn(state["x"].ctypes.data, state["y"].ctypes.data, weights.ctypes.data)
        dt = time.perf_counter() - t0
        if rc:
            raise RuntimeError(f"{spec.get('entry', 'edgepack_model_run')} returned error code {rc}")
        return dt

    def run(xs):
        if len(xs) != 1:
            raise ValueError(f"model takes 1 input, got {len(xs)}")
        state["x"] = np.ascontiguousarray(xs[0], dtype=np.float32)
        state["y"] = np.empty(shapes[0], dtype=np.float32)
        dt = call()
        return [state["y"].copy()], dt

    info = {"runtime": "ctypes " + os.path.basename(spec["library"])}
    isa = getattr(lib, spec.get("isa_function") or "ep_kernel_isa", None)   # the kernels' vector path
    if isa is not None:
        isa.restype = ctypes.c_char_p
        isa.argtypes = []
        info["isa"] = isa().decode()
    return run, call, info


def main():
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)                        # stray prints go to stderr, not into the protocol
    spec = json.loads(sys.argv[1])
    sys.path.insert(0, spec["site"])

    def send(obj):
        proto.write(json.dumps(obj) + "\n")
        proto.flush()

    try:
        import numpy as np

        run, again, info = {"litert": open_litert, "clib": open_clib}[spec["kind"]](spec)
        info.update(machine=platform.machine(), python=platform.python_version(), numpy=np.__version__)
    except BaseException as exc:
        traceback.print_exc()
        send({"ready": False, "error": f"{type(exc).__name__}: {exc}"})
        return 1
    send({"ready": True, "info": info})
    for line in sys.stdin:
        try:
            req = json.loads(line)
            if req.get("op") == "quit":
                break
            with np.load(req["inputs"]) as z:
                xs = [z[f"x{i}"] for i in range(len(z.files))]
            ys, dt = run(xs)
            ms = [dt * 1e3] + [again() * 1e3 for _ in range(int(req.get("repeat", 1)) - 1)]
            tmp = req["outputs"] + ".tmp.npz"
            np.savez(tmp, **{f"y{i}": y for i, y in enumerate(ys)})
            os.replace(tmp, req["outputs"])
            send({"ok": True, "ms": ms})
        except Exception as exc:
            traceback.print_exc()
            send({"ok": False, "error": f"{type(exc).__name__}: {exc}"})
    return 0


if __name__ == "__main__":
    sys.exit(main())
