"""What the training-time weight quantizer tests (ternary, dorefa, kmeans, qat, block-replacement),
the bit-width searches (bo-mixed-precision, autoqb) and the cle / bias-correction tests share: a digits MLP and its float baseline, layer accessors and the
int8 artifact measures (imported as ``quant_helpers``: pytest puts this directory on
``sys.path``)."""

import numpy as np
import pytest
import torch
from torch import nn

from sdk.trainer import evaluate, make_loader

FLOAT_EPOCHS = 15
ALL = {"keep_first_last": False, "progress": False}   # quantize every layer of the MLP


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(),
                         nn.Linear(64, 10))


@pytest.fixture(scope="module")
def digits_float(digits, one_thread):
    """A float MLP trained on digits, the training batches and the test batch."""
    from examples import digits as D

    xtr, ytr, xte, yte = digits
    model = D.train(mlp(), xtr, ytr.long(), epochs=FLOAT_EPOCHS, progress=False)
    data = list(make_loader(xtr, ytr, batch_size=64, seed=0))
    test = [(xte, yte.long())]
    return model, data, test, evaluate(model, test)


def linear_names(model):
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]


def latent(layer):
    return layer.parametrizations.weight.original.detach().double().numpy()


# -- int8 artifacts (cle, bias-correction) ------------------------------------------------

PER_TENSOR_PTQ = {"method": "ptq", "config": {"weight_granularity": "per-tensor", "progress": False}}


def sqnr_db(ref: np.ndarray, approx: np.ndarray) -> float:
    return float(10 * np.log10((ref ** 2).sum() / ((approx - ref) ** 2).sum()))


def run_artifact(art, x: torch.Tensor) -> np.ndarray:
    return np.concatenate([art.run(x[i:i + 1])[0] for i in range(len(x))])


# -- bo-mixed-precision / autoqb: a digits MLP 64-32-32-10 on arm-int8 -------------------------

def mlp32():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 10))


@pytest.fixture(scope="module")
def float_mlp(digits, one_thread):
    """:func:`mlp32` trained 15 epochs on digits, and the training batches."""
    from examples import digits as D

    xtr, ytr, _, _ = digits
    model = D.train(mlp32(), xtr, ytr.long(), epochs=15, progress=False)
    return model, list(make_loader(xtr, ytr, batch_size=64, seed=0))


def artifact_accuracy(art, x, y) -> float:
    return float((run_artifact(art, x).argmax(1) == y.numpy()).mean())


def deploy_int8(model, digits, **kw):
    """``model`` on arm-int8, calibrated on the first 256 training digits."""
    import sdk

    xtr, _, xte, _ = digits
    return sdk.deploy(model, "arm-int8", (xte[:1],), calibration=[xtr[i:i + 32] for i in range(0, 256, 32)],
                      progress=False, **kw)


# -- qat / block-replacement: a depthwise net on which PTQ loses accuracy ----------------------

SKEW = 200.0      # function-preserving rescale of half the depthwise channels (see dw_float)
QAT_STAGE = {"method": "qat", "config": {"epochs": 3, "lr": 1e-3, "freeze_bn_after": 20, "progress": False}}


class DWNet(nn.Module):
    """A narrow depthwise-separable net (MobileNet's block at width 8) on 1×8×8 digits."""

    def __init__(self, width=8):
        super().__init__()
        self.c1, self.b1, self.r1 = nn.Conv2d(1, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()
        self.dw = nn.Conv2d(width, width, 3, padding=1, groups=width, bias=False)
        self.b2, self.r2 = nn.BatchNorm2d(width), nn.ReLU()
        self.pw, self.b3, self.r3 = nn.Conv2d(width, width, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU()
        self.flat, self.fc = nn.Flatten(), nn.Linear(width * 64, 10)

    def forward(self, x):
        x = self.r1(self.b1(self.c1(x)))
        x = self.r2(self.b2(self.dw(x)))
        x = self.r3(self.b3(self.pw(x)))
        return self.fc(self.flat(x))


@pytest.fixture(scope="module")
def dw_float(digits, one_thread):
    """A float DWNet trained on digits.  Half of the depthwise channels are then rescaled by SKEW
    (their BN γ, β ×SKEW, the pointwise weights reading them ÷SKEW): the same function in float, but
    the inter-channel range imbalance of depthwise layers that per-tensor int8 activations lose."""
    from examples import digits as D

    xtr, ytr, xte, yte = digits
    torch.manual_seed(0)
    model = D.train(DWNet(), xtr, ytr.long(), epochs=6, progress=False)
    with torch.no_grad():
        f = torch.ones(8)
        f[::2] = SKEW
        model.b2.weight.mul_(f)
        model.b2.bias.mul_(f)
        model.pw.weight.div_(f.reshape(1, -1, 1, 1))
    data = list(make_loader(xtr, ytr, batch_size=64, seed=0))
    return model, data, xte, yte.long(), evaluate(model, [(xte, yte.long())])


def check_learned_ranges(model, art, x) -> None:
    """Every graph value with a learned range carries exactly its int8 scale and zero point in the
    .tflite (no recalibration); the input's observed [0, 1] equals the learned input range."""
    from sdk.fakequant import range_qparams
    from sdk.graph import capture
    from sdk.litert.flatbuffer import read_model

    graph = capture(model, (x[:1],))
    tensors = {t.name.decode(): t.quantization for t in
               read_model(art.file("model.tflite").read_bytes()).subgraphs[0].tensors}
    learned = {n: h.range for n, h in graph.hints.items() if h.range is not None}
    assert len(learned) == 4
    for name, rng in list(learned.items()) + [("x/quantized", model.qat_input_range)]:
        s, z = range_qparams(*rng)
        assert (float(tensors[name].scale[0]), int(tensors[name].zeroPoint[0])) == (np.float32(s), z), name


def check_matches_simulation(model, art, x, out, sim, what) -> None:
    """The int8 artifact's outputs ``out`` against the torch fake-quant simulation ``sim``: top-1
    agreement >= 0.98 and SQNR >= 30 dB, and the host runner bit-exact with the reference."""
    from sdk.fakequant import simulate

    agree = float((out.argmax(1) == sim.argmax(1)).mean())
    sqnr = sqnr_db(sim.astype(np.float64), out)
    print(f"artifact vs torch {what} simulation: top-1 agreement {agree:.4f}, SQNR {sqnr:.1f} dB")
    assert agree >= 0.98 and sqnr >= 30.0, (agree, sqnr)
    with simulate(model):
        rep = art.verify(model, inputs=[x[i:i + 1] for i in range(64)], runners=["host", "reference"], repeats=1)
    assert rep.bit_exact_ratio["host"] == 1.0 and rep.max_lsb["host"] == 0, str(rep)
    assert rep.top1_agreement["reference"] >= 0.98, str(rep)
