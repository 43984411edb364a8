"""What the pruner tests share: digits batches, a trained LeNet and its accuracy, and layer
accessors (imported as ``prune_helpers``: pytest puts this directory on ``sys.path``)."""

import pytest

from examples import digits as D
from examples.models import make
from sdk.masks import prunable_layers
from sdk.trainer import TrainConfig, finetune, make_loader


@pytest.fixture(scope="module")
def batches(digits):
    xtr, ytr, _, _ = digits
    return list(make_loader(xtr, ytr, batch_size=64, seed=0))


@pytest.fixture(scope="module")
def dense(digits, one_thread):
    """A LeNet trained 5 epochs on digits, and its test accuracy."""
    xtr, ytr, xte, yte = digits
    model = D.train(make("lenet", randomize_bn=False)[0].train(), xtr, ytr, epochs=5, progress=False)
    return model, D.accuracy(model, xte, yte)


def layer_weights(model):
    return {n: m.weight.detach().numpy().copy() for n, m in prunable_layers(model)}


def same_layers(pruned, reference):
    """``(name, module)`` of ``pruned`` for the prunable layers of the unpruned ``reference`` (a masked
    layer's class becomes ``Parametrized<Class>``, which ``prunable_layers`` does not list)."""
    return [(n, pruned.get_submodule(n)) for n, _ in prunable_layers(reference)]


@pytest.fixture(scope="module")
def digits_batches(digits):
    """Training batches of 64 and the test set as one batch."""
    xtr, ytr, xte, yte = digits
    return [(xtr[i:i + 64], ytr[i:i + 64].long()) for i in range(0, len(xtr), 64)], [(xte, yte.long())]


@pytest.fixture(scope="module")
def trained_lenet(digits_batches, one_thread):
    """A LeNet fine-tuned 10 epochs at lr 1e-2 on the digits batches (structured pruning's start)."""
    train, _ = digits_batches
    model, _ = make("lenet", randomize_bn=False)
    finetune(model, train, TrainConfig(epochs=10, lr=1e-2, progress=False))
    return model

