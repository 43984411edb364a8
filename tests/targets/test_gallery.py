"""Real architectures deploy as they are: torchvision and timm models on arm-fp32, arm-int8 and fp16-gpu.

Each gallery model (tests/helpers/gallery.py: random init, eval mode, 64×64 input)
deploys unmodified to the three LiteRT targets; its int8 file runs in one
XNNPACK partition with no builtin kernel left over, and loads and runs with
TFLite's builtin kernels alone.  A CNN's int8 file equals the integer
reference bit for bit; the transformers' (ConvNeXt, ViT, MobileViT) keep layer
norm, GELU and attention in float between QUANTIZE ops, where XNNPACK's float
kernels and the reference's float64 may round one value to the other side of
an int8 step, so they are held to agreeing with the reference far better
than with the float model (see the test).
Fidelity to the float model is benchmarks/bench_gallery.py's business: these
random nets amplify any rounding layer after layer (float16 weights alone
cost them 1e-3 to 5e-2), so it says little about quantization.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import sdk
from sdk.litert import runtime
from sdk.litert.layout import to_stored

import gallery

try:
    gallery.import_torchvision()
except ImportError:
    pass
pytest.importorskip("torchvision")
pytest.importorskip("timm")

MODELS = [pytest.param(e.name, marks=pytest.mark.slow) if e.slow else e.name for e in gallery.GALLERY]


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    yield


def _sqnr(ref, out) -> float:
    noise = float(np.sum((np.asarray(ref, np.float64) - out) ** 2))
    return np.inf if noise == 0 else 10 * np.log10(float(np.sum(np.asarray(ref, np.float64) ** 2)) / noise)


@pytest.mark.parametrize("name", MODELS)
def test_gallery_model_deploys_unmodified(name, tmp_path):
    model, x = gallery.build(name)
    cal = gallery.calibration(x, 4)
    inputs = gallery.calibration(x, 2, seed=2)
    with torch.no_grad():
        want = [model(t).numpy() for t in inputs]

    fp32 = sdk.deploy(model, "arm-fp32", (x,), calibration=cal, output=tmp_path / "fp32", progress=False)
    for t, w in zip(inputs, want):
        assert np.abs(fp32.run(t)[0] - w).max() <= 1e-4 * np.abs(w).max()     # arm-fp32's verify rule

    int8 = sdk.deploy(model, "arm-int8", (x,), calibration=cal, output=tmp_path / "int8", progress=False)
    if gallery.BY_NAME[name].transformer:
        # float islands: XNNPACK's float32 kernels and the reference's float64 differ by an ulp, which
        # can move a value across an int8 step; random-init ViTs amplify such a flip (vit_b_16:
        # 6 LSB on one input of two).  What must hold: the runtime is far closer to the reference
        # than either is to the float model (quantization noise), by 6 dB at least.
        for t, w in zip(inputs, want):
            host, ref = int8.run(t, runner="host")[0], int8.run(t, runner="reference")[0]
            assert _sqnr(ref, host) >= _sqnr(w, ref) + 6.0, (_sqnr(ref, host), _sqnr(w, ref))
        floats = {r["op"].split("->")[0] for r in int8.profile["layers"] if r.get("precision") == "float32"}
        assert floats and floats <= {"layer_norm", "gelu", "attention", "softmax"}, floats
    else:
        for t in inputs:
            assert np.array_equal(int8.run(t, runner="host")[0], int8.run(t, runner="reference")[0])
    tflite = int8.file("model.tflite")
    summary = runtime.op_summary(runtime.load_interpreter(tflite))
    assert summary["delegate_nodes"] == 1 and not summary["builtin"], summary
    (y,) = runtime.run(runtime.load_interpreter(tflite, delegate=False),
                      [to_stored(int8.manifest["inputs"][0], inputs[0].numpy())])
    assert np.all(np.isfinite(y))

    fp16 = sdk.deploy(model, "fp16-gpu", (x,), calibration=cal, output=tmp_path / "fp16", progress=False)
    host, ref = fp16.run(inputs[0], runner="host")[0], fp16.run(inputs[0], runner="reference")[0]
    assert np.abs(host - ref).max() <= 1e-4 * np.abs(ref).max()        # float32 vs float64 of one file
    assert np.abs(host - want[0]).max() <= 0.1 * np.abs(want[0]).max()     # float16 weights, not a broken file
