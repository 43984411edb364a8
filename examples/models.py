"""Model zoo for examples, tests and benchmarks.

==============  ==========================  ==================================
name            input                       what it exercises
==============  ==========================  ==================================
``mlp``         1×1×8×8 (digits)            flatten, linear, ReLU
``lenet``       1×1×8×8 (digits)            conv, BN, ReLU, max-pool, linear
``resnet18``    1×3×32×32 (CIFAR-style)     residual adds, strided 1×1 shortcuts
``mobilenetv2`` 1×3×32×32                   depthwise, inverted residuals, ReLU6
``dscnn``       1×1×49×10 (MFCC frames)     keyword spotting: depthwise-separable
==============  ==========================  ==================================

>>> model, x = make("lenet")
>>> tuple(model(x).shape)
(1, 10)
"""

from __future__ import annotations

import torch
from torch import nn


class MLP(nn.Module):
    def __init__(self, inputs: int = 64, hidden=(64, 32), classes: int = 10):
        super().__init__()
        layers, prev = [nn.Flatten()], inputs
        for h in hidden:
            layers += [nn.Linear(prev, h), nn.ReLU()]
            prev = h
        layers.append(nn.Linear(prev, classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)


class LeNet(nn.Module):
    """LeNet-style CNN sized for 8×8 digits."""

    def __init__(self, classes: int = 10, width: int = 16):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(2 * width * 4, 64), nn.ReLU(), nn.Linear(64, classes))

    def forward(self, x):
        return self.classifier(self.features(x))


class ConvNet(nn.Module):
    """Two conv stages (the second at stride 2), global average pooling, a linear head: runs at
    any input resolution (the distiller benchmark's students and teachers, at 8×8 and 4×4)."""

    def __init__(self, c1: int = 8, c2: int = 16, classes: int = 10):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, c1, 3, padding=1), nn.BatchNorm2d(c1), nn.ReLU(),
                                  nn.Conv2d(c1, c2, 3, stride=2, padding=1), nn.BatchNorm2d(c2), nn.ReLU())
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c2, classes))

    def forward(self, x):
        return self.head(self.body(x))


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return torch.relu(y + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet-18 for 32×32 inputs (3×3 stem, no max-pool), as in CIFAR papers."""

    def __init__(self, classes: int = 10, width: int = 64):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        blocks, cin = [], width
        for i, n in enumerate((2, 2, 2, 2)):
            cout = width * 2 ** i
            for j in range(n):
                blocks.append(BasicBlock(cin, cout, 2 if (j == 0 and i > 0) else 1))
                cin = cout
        self.layers = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x):
        return self.fc(self.pool(self.layers(self.stem(x))).flatten(1))


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int):
        super().__init__()
        hidden = cin * expand
        self.use_res = stride == 1 and cin == cout
        layers = []
        if expand != 1:
            layers += [nn.Conv2d(cin, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6()]
        layers += [nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False), nn.BatchNorm2d(hidden),
                   nn.ReLU6(), nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout)]
        self.block = nn.Sequential(*layers)

    def forward(self, x):
        return x + self.block(x) if self.use_res else self.block(x)


class MobileNetV2(nn.Module):
    """MobileNetV2 (Sandler et al. 2018) for 32×32 inputs: stride-1 stem, same block table."""

    CFG = ((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))

    def __init__(self, classes: int = 10, width_mult: float = 1.0):
        super().__init__()
        c = lambda v: max(8, int(v * width_mult + 4) // 8 * 8)  # noqa: E731  (channels: multiples of 8)
        cin = c(32)
        layers = [nn.Conv2d(3, cin, 3, 1, 1, bias=False), nn.BatchNorm2d(cin), nn.ReLU6()]
        for t, ch, n, s in self.CFG:
            for i in range(n):
                layers.append(InvertedResidual(cin, c(ch), s if i == 0 else 1, t))
                cin = c(ch)
        last = c(1280) if width_mult > 1 else 1280
        layers += [nn.Conv2d(cin, last, 1, bias=False), nn.BatchNorm2d(last), nn.ReLU6()]
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(last, classes))

    def forward(self, x):
        return self.classifier(self.features(x).mean((2, 3)))


class DSCNN(nn.Module):
    """DS-CNN keyword spotting (Zhang et al., "Hello Edge", 2017), S-size: 49×10 MFCC → 12 keywords."""

    def __init__(self, classes: int = 12, width: int = 64, blocks: int = 4):
        super().__init__()
        layers = [nn.Conv2d(1, width, (10, 4), (2, 2), (5, 1), bias=False), nn.BatchNorm2d(width), nn.ReLU()]
        for _ in range(blocks):
            layers += [nn.Conv2d(width, width, 3, 1, 1, groups=width, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
                       nn.Conv2d(width, width, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU()]
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width, classes)

    def forward(self, x):
        return self.fc(self.pool(self.features(x)).flatten(1))


ZOO = {
    "mlp": (MLP, (1, 1, 8, 8)),
    "lenet": (LeNet, (1, 1, 8, 8)),
    "resnet18": (ResNet18, (1, 3, 32, 32)),
    "mobilenetv2": (MobileNetV2, (1, 3, 32, 32)),
    "dscnn": (DSCNN, (1, 1, 49, 10)),
}


def make(name: str, seed: int = 0, randomize_bn: bool = True, **kwargs) -> tuple[nn.Module, torch.Tensor]:
    """``(model in eval mode, example input)`` for a zoo name.

    ``randomize_bn`` gives BatchNorm non-trivial statistics so that untrained
    models still have realistic, non-identity folded weights.
    """
    cls, shape = ZOO[name]
    torch.manual_seed(seed)
    model = cls(**kwargs)
    if randomize_bn:
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.running_mean.uniform_(-0.2, 0.2)
                    m.running_var.uniform_(0.5, 1.5)
                    m.weight.uniform_(0.5, 1.2)
                    m.bias.uniform_(-0.1, 0.1)
    return model.eval(), torch.randn(shape)
