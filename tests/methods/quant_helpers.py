"""What the training-time weight quantizer tests (ternary, dorefa, kmeans) and the cle /
bias-correction tests share: a digits MLP and its float baseline, layer accessors and the
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

