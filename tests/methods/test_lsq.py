"""lsq (Esser et al. 2020; PACT clipping, Choi et al. 2018): the step-size gradient is the paper's
formula, a 4-bit-weight digits MLP fine-tuned with LSQ beats 4-bit ptq in its int8 artifact and
stays near float, the artifact is bit-exact host vs reference and its scales are the learned steps,
and bad options are named errors."""

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

import sdk
from sdk import plugins
from plugins.quantize.lsq import LSQ, LsqActivation, LsqWeight, bake, learned_steps, lsq_quantize
from quant_helpers import digits_float, linear_names, run_artifact  # noqa: F401 (fixture)
from sdk.errors import ConfigError, InputError
from sdk.litert.flatbuffer import op_name, read_model

pytestmark = pytest.mark.usefixtures("one_thread")   # tiny models: one thread is faster

#: LSQ fine-tuning from the float MLP: every layer quantized, 4-bit weights, 8-bit activations
FINE_TUNE = {"bits": 4, "activation_bits": 8, "epochs": 5, "lr": 3e-4, "keep_first_last": False, "progress": False}
#: measured: float 0.973, ptq 4-bit artifact 0.967, lsq 4-bit artifact 0.973 (450 test digits)
FLOAT_GAP = 0.015


def lsq_step_grad_np(x, s, qn, qp, g, up):
    """Esser et al. eq. 3 times the gradient scale: −x/s + round(x/s) inside, Qn / Qp where clipped."""
    v = x / s
    inner = np.where(v <= qn, qn, np.where(v >= qp, qp, -v + np.round(v)))
    return g * float((up * inner).sum())


def test_step_gradient_is_the_papers_formula():
    torch.manual_seed(0)
    x = (torch.randn(200) * 2).double()
    up = torch.randn(200).double()
    for s0, (qn, qp), g in [(0.37, (-7, 7), 1.0), (0.21, (0, 15), 0.05), (0.8, (-128, 127), 1 / math.sqrt(200 * 127))]:
        s = torch.tensor(s0, dtype=torch.float64, requires_grad=True)
        xs = x.clone().requires_grad_(True)
        y = lsq_quantize(xs, s, qn, qp, g)
        (y * up).sum().backward()
        xn, v = x.numpy(), x.numpy() / s0
        np.testing.assert_allclose(y.detach().numpy(), np.clip(np.round(v), qn, qp) * s0, rtol=0, atol=1e-12)
        np.testing.assert_allclose(s.grad.item(), lsq_step_grad_np(xn, s0, qn, qp, g, up.numpy()), rtol=1e-10)
        inside = (v > qn) & (v < qp)
        # straight through inside (the chain rule's (1/s)·s rounds in the last bit), 0 where clipped
        np.testing.assert_allclose(xs.grad.numpy(), np.where(inside, up.numpy(), 0.0), rtol=1e-12, atol=0)


def test_hand_example():
    # x/s = 0.6, 1.8, -0.9, 10 on the grid [-3, 3]: codes 1, 2, -1, 3 (clipped)
    s = torch.tensor(0.5, requires_grad=True)
    y = lsq_quantize(torch.tensor([0.3, 0.9, -0.45, 5.0]), s, -3, 3, 1.0)
    y.sum().backward()
    assert y.tolist() == [0.5, 1.0, -0.5, 1.5]
    # (−0.6 + 1) + (−1.8 + 2) + (0.9 − 1) + 3
    assert s.grad.item() == pytest.approx(0.4 + 0.2 - 0.1 + 3)


def test_weight_step_init_and_gradient_scale():
    torch.manual_seed(1)
    w = torch.randn(16, 32)
    for per_channel in (False, True):
        q = LsqWeight(w, 4, per_channel)
        n = 32 if per_channel else 16 * 32
        want = 2 * (w.abs().mean(1, keepdim=True) if per_channel else w.abs().mean()) / math.sqrt(7)
        torch.testing.assert_close(q.step.detach(), want)
        assert q.grad_scale == pytest.approx(1 / math.sqrt(n * 7))
        up = torch.randn(16, 32)
        (q(w) * up).sum().backward()
        s = q.step.detach().double().numpy()
        for row in range(16 if per_channel else 1):
            rows = slice(row, row + 1) if per_channel else slice(None)
            got = q.step.grad.flatten()[row].item()
            want_g = lsq_step_grad_np(w[rows].double().numpy(), s.flatten()[row], -7, 7, q.grad_scale,
                                      up[rows].double().numpy())
            assert got == pytest.approx(want_g, rel=1e-4)


def test_pact_clip_gradient_flows_where_the_input_exceeds_alpha():
    torch.manual_seed(2)
    act = LsqActivation("fc", 4, "pact")
    x = torch.rand(8, 50) * 3
    act(x)                                   # initializes α to the batch maximum
    assert act.param.item() == pytest.approx(x.max().item())
    with torch.no_grad():
        act.param.fill_(1.5)
    x = (torch.rand(8, 50) * 3).requires_grad_(True)
    up = torch.randn(8, 50)
    y = act(x)
    (y * up).sum().backward()
    s = 1.5 / 15
    yn = np.clip(x.detach().numpy(), 0, 1.5)
    np.testing.assert_allclose(y.detach().numpy(), np.round(yn / s) * s, atol=1e-6)
    above = x.detach() > 1.5
    assert act.param.grad.item() == pytest.approx(up[above].sum().item(), rel=1e-5)
    np.testing.assert_array_equal(x.grad.numpy(), torch.where(above, 0.0, up).numpy())


def fc_tensors(art):
    """(input scale, input zero point, weight scales) of each FULLY_CONNECTED op, in order."""
    m = read_model(art.file("model.tflite").read_bytes())
    sub = m.subgraphs[0]
    rows = []
    for op in sub.operators:
        if op_name(m, op) == "FULLY_CONNECTED":
            ti, tw = sub.tensors[op.inputs[0]], sub.tensors[op.inputs[1]]
            rows.append((float(ti.quantization.scale[0]), int(ti.quantization.zeroPoint[0]),
                         np.asarray(tw.quantization.scale, np.float32)))
    return rows


def accuracy(art, test):
    x, y = test[0]
    return float((run_artifact(art, x).argmax(1) == y.numpy()).mean())


@pytest.fixture(scope="module")
def calibration(digits_float):
    return [b[0] for b in digits_float[1][:4]]


def test_lsq_4bit_beats_4bit_ptq_and_stays_near_float(digits_float, calibration):
    model, data, test, float_acc = digits_float
    x1 = (test[0][0][:1],)
    ptq4 = sdk.deploy(model, "arm-int8", x1, calibration=calibration, progress=False,
                      recipe={"stages": [{"method": "ptq", "config": {"weight_bits": 4}}]})
    lsq4 = sdk.deploy(model, "arm-int8", x1, calibration=calibration, data=data, progress=False,
                      recipe={"stages": [{"method": "lsq", "config": FINE_TUNE}]})
    assert all(row["bits"] == 4 and row["stored_bits"] == 4 for row in lsq4.manifest["encodings"])
    acc_ptq, acc_lsq = accuracy(ptq4, test), accuracy(lsq4, test)
    print(f"digits accuracy: float {float_acc:.4f}, ptq 4-bit artifact {acc_ptq:.4f}, "
          f"lsq 4-bit artifact {acc_lsq:.4f}")
    assert acc_lsq >= acc_ptq, (acc_lsq, acc_ptq)
    assert acc_lsq >= float_acc - FLOAT_GAP, (acc_lsq, float_acc)


@pytest.fixture(scope="module")
def lsq_artifact(digits_float, calibration):
    model, data, test = digits_float[:3]
    q = LSQ(**FINE_TUNE).apply(copy.deepcopy(model), data)
    steps = learned_steps(q)
    bake(q)
    art = sdk.deploy(q, "arm-int8", (test[0][0][:1],), calibration=calibration, progress=False)
    return q, steps, art


def test_artifact_scales_are_the_learned_steps(lsq_artifact):
    q, steps, art = lsq_artifact
    names = linear_names(q)
    rows = fc_tensors(art)
    assert len(rows) == len(names) == len(steps)
    for name, (in_scale, in_zero, w_scales) in zip(names, rows):
        w_step, a_step = np.float32(steps[name]["weight"][0]), steps[name]["activation"]
        assert np.all(w_scales == w_step), (name, w_scales[:4], w_step)
        w = q.get_submodule(name).weight.detach().numpy()
        codes = np.round(w.astype(np.float64) / w_step).astype(np.float32)
        np.testing.assert_array_equal(w, codes * w_step)                  # exactly on the learned grid
        assert np.abs(codes).max() <= 7
        # 8-bit unsigned activations: [0, 255·s] is the whole int8 tensor, so its scale is s
        assert in_scale == np.float32(a_step) and in_zero == -128, (name, in_scale, a_step)


def test_artifact_is_bit_exact_host_vs_reference(lsq_artifact):
    q, _, art = lsq_artifact
    rep = art.verify(q, runners=["host", "reference"])
    assert rep.passed, str(rep)
    assert rep.bit_exact_ratio["host"] == 1.0 and rep.max_lsb["host"] == 0


def test_per_channel_weights_and_4bit_activations(digits_float, calibration):
    model, data, test = digits_float[:3]
    cfg = {**FINE_TUNE, "activation_bits": 4, "granularity": "per-channel", "max_steps": 10}
    q = LSQ(**cfg).apply(copy.deepcopy(model), data)
    steps = learned_steps(q)
    art = sdk.deploy(bake(q), "arm-int8", (test[0][0][:1],), calibration=calibration, progress=False)
    for name, (in_scale, in_zero, w_scales) in zip(linear_names(q), fc_tensors(art)):
        np.testing.assert_array_equal(w_scales, np.float32(steps[name]["weight"]))
        # a 4-bit grid [0, 15·s] ships as the int8 tensor of that range: step 15·s/255, zero point -128
        assert in_scale == pytest.approx(15 * steps[name]["activation"] / 255, rel=1e-6) and in_zero == -128
    assert art.verify(q, runners=["host", "reference"]).passed


def test_bad_options_are_named_errors():
    for field, value in [("bits", 3), ("activation_bits", 2), ("granularity", "per-group"), ("mode", "clip"),
                         ("pact_decay", -1.0)]:
        with pytest.raises(ConfigError, match=field):
            LSQ(**{field: value})
    with pytest.raises(InputError, match="needs data"):
        LSQ(progress=False).apply(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2)))
    net = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 2))   # layer 1's input is signed
    with pytest.raises(ConfigError, match="pact.*layer 1.*negative"):
        LSQ(mode="pact", progress=False).apply(net, [(torch.randn(8, 4), torch.randint(0, 2, (8,)))])
    assert plugins.get("quantizer", "lsq") is LSQ
