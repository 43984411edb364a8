"""deploy() refuses an unsupported model before any torch-side training."""

import pytest
import torch

import sdk
from sdk.errors import UnsupportedOpError


class CumsumNet(torch.nn.Module):
    """A conv net with an operator no LiteRT target lowers (cumsum)."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 4, 3, padding=1)
        self.fc = torch.nn.Linear(4 * 8 * 8, 10)

    def forward(self, x):
        return self.fc(torch.cumsum(self.conv(x), dim=1).flatten(1))


class CountingData:
    """Training data that records whether anyone started to read it."""

    def __init__(self):
        self.reads = 0

    def __iter__(self):
        self.reads += 1
        yield torch.randn(4, 1, 8, 8), torch.randint(0, 10, (4,))


@pytest.mark.parametrize("stages", [[{"method": "magnitude", "config": {"sparsity": 0.5}}],
                                    [{"method": "kd", "config": {"epochs": 1}}]])
def test_unsupported_model_fails_before_training(stages, tmp_path):
    data = CountingData()
    with pytest.raises(UnsupportedOpError, match="cumsum"):
        sdk.deploy(CumsumNet().eval(), "arm-int8", (torch.randn(1, 1, 8, 8),), calibration=[torch.randn(2, 1, 8, 8)],
                   recipe={"stages": stages}, data=data, output=tmp_path / "out", progress=False)
    assert data.reads == 0
    assert list(tmp_path.iterdir()) == []
