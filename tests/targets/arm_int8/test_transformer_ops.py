"""Transformer ops end to end: layer norm, GELU, attention, matmul, bilinear resize, layer scale.

Each small model is captured, deployed to the three LiteRT targets and checked
against torch (arm-fp32, fp16-gpu) and against the integer reference under the
arm-int8 rule; the int8 graph must stay one XNNPACK partition with the float
ops between DEQUANTIZE and QUANTIZE, which the profile says per layer.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sdk
from sdk.errors import CalibrationError, UnsupportedOpError
from sdk.graph import capture
from sdk.litert import runtime
from sdk.litert.layout import to_stored
from sdk.litert.lowering import FLOAT_IN_INT8


class Block(nn.Module):
    """A pre-norm transformer block (tokens 8 × 16, 2 heads): LN, attention, LN, MLP with GELU."""

    def __init__(self, causal=False, mask=None, approximate="none"):
        super().__init__()
        self.n1, self.n2 = nn.LayerNorm(16), nn.LayerNorm(16)
        self.qkv, self.proj = nn.Linear(16, 48), nn.Linear(16, 16)
        self.fc1, self.fc2 = nn.Linear(16, 32), nn.Linear(32, 16)
        self.causal, self.approximate = causal, approximate
        self.register_buffer("mask", mask)

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(self.n1(x)).reshape(b, n, 3, 2, 8).permute(2, 0, 3, 1, 4).unbind(0)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask, is_causal=self.causal)
        x = x + self.proj(a.transpose(1, 2).reshape(b, n, c))
        return x + self.fc2(F.gelu(self.fc1(self.n2(x)), approximate=self.approximate))


class Handwritten(nn.Module):
    """Attention as users write it by hand (matmul, softmax), a 2-D layer norm without affine
    parameters, a matmul with a constant matrix and a class token concatenated in front."""

    def __init__(self):
        super().__init__()
        self.cls = nn.Parameter(torch.randn(1, 1, 16))
        self.w = nn.Parameter(torch.randn(16, 16) / 4)
        self.norm = nn.LayerNorm((9, 16), elementwise_affine=False)

    def forward(self, x):
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1)
        scores = (x @ x.transpose(-1, -2)) / 4
        x = torch.softmax(scores, dim=-1) @ x
        return self.norm(x @ self.w)


class Upsampler(nn.Module):
    def __init__(self, align):
        super().__init__()
        self.conv, self.align = nn.Conv2d(3, 8, 3, padding=1), align

    def forward(self, x):
        y = F.interpolate(torch.relu(self.conv(x)), scale_factor=2, mode="bilinear", align_corners=self.align)
        return F.interpolate(y, size=(11, 13), mode="bilinear", align_corners=self.align)


class LayerScale(nn.Module):
    """ConvNeXt's residual: x + gamma · branch(x), gamma 1e-6 at initialisation, written gamma-first."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.gamma = nn.Parameter(torch.full((8, 1, 1), 1e-6))

    def forward(self, x):
        return x + self.gamma * self.conv(x)


def _causal_free_mask():
    keep = torch.ones(8, 8, dtype=torch.bool)
    keep[:, 6:] = False            # the last two tokens are padding
    return keep


CASES = {
    "block": (lambda: Block(), (1, 8, 16)),
    "block-causal": (lambda: Block(causal=True, approximate="tanh"), (1, 8, 16)),
    "block-mask": (lambda: Block(mask=_causal_free_mask()), (1, 8, 16)),
    "handwritten": (Handwritten, (1, 8, 16)),
    "bilinear": (lambda: Upsampler(False), (1, 3, 5, 6)),
    "bilinear-align": (lambda: Upsampler(True), (1, 3, 5, 6)),
    "layer-scale": (LayerScale, (1, 8, 6, 6)),
}


def _build(case):
    make, shape = CASES[case]
    torch.manual_seed(0)
    model = make().eval()
    g = torch.Generator().manual_seed(1)
    return model, torch.randn(shape, generator=g), [torch.randn(shape, generator=g) for _ in range(6)]


def test_capture_names_the_transformer_ops_and_runs_them_like_torch():
    model, x, batches = _build("block-causal")
    graph = capture(model, (x,))
    ops = {n.op for n in graph.nodes}
    assert {"layer_norm", "gelu", "attention"} <= ops
    assert not any(op.startswith("aten.") for op in ops)
    big = torch.randn(3, 8, 16)              # another batch size than the captured one
    with torch.no_grad():
        assert torch.allclose(graph.run([big])[0], model(big), atol=1e-5)
    hand = capture(*_build("handwritten")[:2])
    assert {"matmul", "linear", "layer_norm", "softmax", "cat"} <= {n.op for n in hand.nodes}


@pytest.mark.parametrize("case", sorted(CASES))
def test_deploys_to_the_three_litert_targets(case, tmp_path):
    model, x, batches = _build(case)
    with torch.no_grad():
        want = [model(b).numpy() for b in batches[:2]]

    fp32 = sdk.deploy(model, "arm-fp32", (x,), calibration=batches, output=tmp_path / "fp32", progress=False)
    for b, w in zip(batches, want):
        assert np.abs(fp32.run(b)[0] - w).max() <= 1e-4 * np.abs(w).max()

    fp16 = sdk.deploy(model, "fp16-gpu", (x,), calibration=batches, output=tmp_path / "fp16", progress=False)
    host, ref = fp16.run(batches[0], runner="host")[0], fp16.run(batches[0], runner="reference")[0]
    assert np.abs(host - ref).max() <= 1e-4 * np.abs(ref).max()
    assert np.abs(host - want[0]).max() <= 1e-2 * np.abs(want[0]).max()

    int8 = sdk.deploy(model, "arm-int8", (x,), calibration=batches, output=tmp_path / "int8", progress=False)
    report = int8.verify(model, inputs=batches[:3])      # host against the reference and the model
    assert report.passed, report
    assert report.max_lsb["host"] <= 1 and report.bit_exact_ratio["host"] >= 0.99
    assert report.sqnr_db["host"] >= 20.0
    tflite = int8.file("model.tflite")
    summary = runtime.op_summary(runtime.load_interpreter(tflite))
    assert summary["delegate_nodes"] == 1 and not summary["builtin"], summary
    (y,) = runtime.run(runtime.load_interpreter(tflite, delegate=False),
                      [to_stored(int8.manifest["inputs"][0], batches[0].numpy())])
    assert np.all(np.isfinite(y))
    rows = int8.profile["layers"]
    floats = {r["name"] for r in rows if r.get("precision") == "float32"}
    assert floats == {r["name"] for r in rows if r["op"].split("->")[0] in FLOAT_IN_INT8}
    for r in rows:
        if r["name"] in floats:
            assert r["why_float"] == FLOAT_IN_INT8[r["op"].split("->")[0]]


def test_tiny_residual_branch_stays_in_the_int8_delegate(tmp_path):
    """XNNPACK declines an int8 ADD whose input scale is below 1/1024 of the output's; the
    lowering requantizes such a branch first (here 1e-6 of the other input)."""
    model, x, batches = _build("layer-scale")
    art = sdk.deploy(model, "arm-int8", (x,), calibration=batches, output=tmp_path / "a", progress=False)
    interp = runtime.load_interpreter(art.file("model.tflite"))
    assert runtime.op_summary(interp)["delegate_nodes"] == 1
    assert np.array_equal(art.run(x, runner="host")[0], art.run(x, runner="reference")[0])


def test_fp16_ignores_flushes_a_larger_addend_absorbs(tmp_path):
    """gamma · branch flushes to zero in float16 but lands in x + gamma · branch, which float16
    rounds the same either way; a tiny *output* still is an error."""
    model, x, batches = _build("layer-scale")
    sdk.deploy(model, "fp16-gpu", (x,), calibration=batches, output=tmp_path / "ok", progress=False)

    class TinyOut(nn.Module):
        def forward(self, t):
            return t * 1e-9

    with pytest.raises(CalibrationError, match="flush to zero"):
        sdk.deploy(TinyOut(), "fp16-gpu", (x,), calibration=batches, output=tmp_path / "bad", progress=False)


def test_run_time_attention_mask_is_refused_with_the_fix(tmp_path):
    class Masked(nn.Module):
        def forward(self, q):
            return F.scaled_dot_product_attention(q, q, q, attn_mask=q[..., :8] > 0)

    q = torch.randn(1, 2, 8, 8)
    with pytest.raises(UnsupportedOpError, match="constant mask or is_causal"):
        sdk.deploy(Masked(), "arm-fp32", (q,), output=tmp_path / "m", progress=False)
    assert not (tmp_path / "m").exists()
