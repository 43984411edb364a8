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


def torchvision_resnet18():
    """torchvision's resnet18 (10 classes, random init, eval) and 4 random labelled batches of
    8×3×32×32; skips the test when torchvision cannot be imported."""
    import torch

    gallery = pytest.importorskip("gallery")
    try:
        tv = gallery.import_torchvision()
    except ImportError:
        pytest.skip("torchvision is not installed")
    torch.manual_seed(0)
    model = tv.models.resnet18(num_classes=10).eval()
    gen = torch.Generator().manual_seed(0)
    data = [(torch.randn(8, 3, 32, 32, generator=gen), torch.randint(0, 10, (8,), generator=gen)) for _ in range(4)]
    return model, data


def graph_macs(model, x) -> int:
    """MACs of ``model`` as captured on ``x`` (:func:`sdk.graph.macs` over every node)."""
    from sdk.graph import capture, macs

    g = capture(model, (x,))
    return sum(macs(g, n) for n in g.nodes)


#: the digits LeNet's prunable layers and the ReLU module after each
RELU_AFTER = {"features.0": "features.2", "features.4": "features.6", "classifier.1": "classifier.2"}


def prunable_groups(model, x):
    """The channel groups of ``model`` (traced on ``x[:1]``) that a structured pruner may shrink."""
    from sdk.channels import channel_groups

    return [g for g in channel_groups(model, (x[:1],)) if g.prunable]


def lenet_widths(lenet):
    """Output channels of the LeNet's two convs and its hidden linear layer."""
    return lenet.features[0].out_channels, lenet.features[4].out_channels, lenet.classifier[1].out_features


def lenet_macs(c1: int = 16, c2: int = 32, h: int = 64) -> int:
    """The digits LeNet's MACs in closed form, for conv widths ``c1``, ``c2`` and hidden width ``h``
    (8×8 input, 3×3 convs, a 2×2 pool between them and before the classifier)."""
    return c1 * 64 * 9 + c2 * 16 * c1 * 9 + c2 * 4 * h + h * 10


def profile_macs(art) -> int:
    """MACs of a deployed artifact: the sum over its profile's layers."""
    return sum(row.get("macs", 0) for row in art.profile["layers"])


def calibration(x):
    """Ten calibration batches of 32 digits."""
    return [x[i:i + 32] for i in range(0, 320, 32)]


def deploy_with_dense(pruned, dense, xtr, xte, tmp_path):
    """arm-int8 artifacts of ``pruned`` and of the ``dense`` model it came from, on one calibration set."""
    import sdk

    return tuple(sdk.deploy(m, "arm-int8", (xte[:1],), calibration=calibration(xtr), output=tmp_path / name,
                            progress=False) for m, name in ((pruned, "a"), (dense, "dense")))


def int8_accuracy(art, x, y) -> float:
    """Top-1 accuracy of an artifact run one image at a time over ``x``."""
    import numpy as np

    out = np.concatenate([art.run(x[i:i + 1])[0] for i in range(len(x))])
    return float(np.mean(out.argmax(1) == y.numpy()))
