"""TFLite's padding rule (``ComputePadding``), shared by the writer side and the executors.

The lowering decides from it whether a torch padding is TFLite's SAME (and
writes SAME, or pads explicitly when it is not); the reference, the float16
interpreter and the CUDA runner pad their inputs by it when they run a SAME op.

>>> same_padding(7, 3, 2)      # out 4, 1 before, 1 after
(4, 1, 1)
"""

from __future__ import annotations

__all__ = ["out_size_and_pad", "same_padding"]


def same_padding(size: int, k: int, stride: int, dilation: int = 1) -> tuple[int, int, int]:
    """TFLite's SAME padding of one spatial dim (ComputePadding): ``(out, before, after)``."""
    eff = (k - 1) * dilation + 1
    out = (size + stride - 1) // stride
    total = max((out - 1) * stride + eff - size, 0)
    return out, total // 2, total - total // 2


def out_size_and_pad(size: int, k: int, stride: int, dilation: int, same: bool) -> tuple[int, int]:
    """Output size and leading padding exactly as TFLite's ComputePadding does (SAME or VALID)."""
    if same:
        return same_padding(size, k, stride, dilation)[:2]
    return (size - (k - 1) * dilation - 1 + stride) // stride, 0
