"""What the distiller tests share: numpy references, digits MLPs and teachers, and the
training-config checks every distiller's Config must pass (imported as ``distill_helpers``:
pytest puts this directory on ``sys.path``)."""

import functools

import numpy as np
import pytest
import torch
from torch import nn

from sdk.errors import ConfigError
from sdk.trainer import TrainConfig, evaluate

# -- numpy references -----------------------------------------------------------


def np_log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def np_kl_batchmean(p, log_q):
    """KL(p ‖ q) summed over classes, averaged over the batch."""
    return float(np.sum(p * (np.log(p) - log_q)) / p.shape[0])


def np_ce(z, y):
    return float(-np.mean(np_log_softmax(z)[np.arange(len(y)), y]))


# -- digits models ----------------------------------------------------------------


def mlp(hidden, seed):
    torch.manual_seed(seed)
    layers, prev = [nn.Flatten()], 64
    for h in hidden:
        layers += [nn.Linear(prev, h), nn.ReLU()]
        prev = h
    return nn.Sequential(*layers, nn.Linear(prev, 10))


def convnet(c1, c2, seed):
    """Two convs (the second at stride 2), global pooling, a linear head: any resolution."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, c1, 3, padding=1), nn.ReLU(), nn.Conv2d(c1, c2, 3, stride=2, padding=1),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c2, 10))


def check_yaml_stage_trains(stage_yaml: str):
    """A recipe of one stage (YAML) with named ``train``/``val`` streams trains a convnet
    student from a bigger convnet teacher and keeps its state-dict keys."""
    import sdk
    from sdk.recipe import Recipe

    torch.manual_seed(0)
    model, teacher = convnet(4, 8, 0), convnet(8, 16, 1)
    data = {"train": [(torch.rand(8, 1, 8, 8), torch.randint(0, 10, (8,))) for _ in range(3)],
            "val": [(torch.rand(8, 1, 8, 8), torch.randint(0, 10, (8,)))]}
    out = sdk.compress(model, Recipe.from_yaml(stage_yaml), data=data, teacher=teacher, progress=False)
    assert not torch.allclose(out[0].weight, model[0].weight, atol=1e-5)
    assert set(out.state_dict()) == set(model.state_dict())


def trained(model, xtr, ytr, steps=150, lr=1e-2):
    """Full-batch Adam on cross-entropy: a quick, deterministic teacher."""
    torch.manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(xtr), ytr).backward()
        opt.step()
    return model.eval()


def batches(x, y, size=64):
    return [(x[i:i + size], y[i:i + size]) for i in range(0, len(x), size)]


def accuracy(model, x, y):
    return evaluate(model, [(x, y)])


@functools.cache
def digit_teachers(digits):
    """Three 64-64 MLP teachers trained from different seeds; trained once per session for the
    test modules that use them (``digits`` is the session fixture, the same tuple each time).
    Tests only read them."""
    xtr, ytr, _, _ = digits
    return tuple(trained(mlp((64, 64), seed), xtr, ytr) for seed in (0, 1, 2))


# -- the shared training fields -----------------------------------------------------


def check_training_config(cls):
    """``cls.Config`` is a :class:`TrainConfig` whose optimizer and options are checked when it
    is built, and which round-trips through its dict form with ``optimizer_options``."""
    assert issubclass(cls.Config, TrainConfig)
    assert "train" in cls.streams                                           # refused before any stage runs
    for options in ({"optimizer": "sgd", "optimizer_options": {"momentum": 0.5, "nesterov": True}},
                    {"optimizer": "adam", "optimizer_options": {"betas": [0.8, 0.99]}, "max_steps": 3}):
        cfg = cls.Config(**options)
        assert cls.Config.from_dict(cfg.to_dict()) == cfg
        assert cfg.training().optimizer_config() == cfg.optimizer_config()
    with pytest.raises(ConfigError, match=r"optimizer='adma' is not registered; valid: .*adam.*adamw.*sgd"):
        cls.Config(optimizer="adma")
    with pytest.raises(ConfigError, match="sgd.*momentun.*valid fields: momentum"):
        cls.Config(optimizer="sgd", optimizer_options={"momentun": 0.5})
    with pytest.raises(ConfigError, match="momentum=1.5 is out of range"):
        cls.Config.from_dict({"optimizer": "sgd", "optimizer_options": {"momentum": 1.5}})
    with pytest.raises(ConfigError, match="lr=0"):
        cls(lr=0)
