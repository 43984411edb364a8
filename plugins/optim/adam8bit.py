"""``adam8bit``: Adam with 8-bit optimizer states (Dettmers et al., "8-bit Optimizers via
Block-wise Quantization", ICLR 2022).

Both moments of a parameter with at least ``min_8bit_size`` elements are stored as one
``uint8`` code per value: the state is cut into blocks of ``block_size`` values, each block
keeps its float32 absolute maximum, and a value is the index of the nearest entry of the
256-entry *dynamic tree* map (signed for the first moment, unsigned for the second) after
division by its block's absmax.  Each step dequantizes both moments, runs the Adam update
in float32 (bias correction and L2 weight decay as ``torch.optim.Adam``) and re-quantizes.
Smaller parameters (biases, norms) keep float32 moments, as the paper does.  The codes are
the real storage: ``optimizer.state_bytes()`` counts them.

>>> import torch
>>> w = torch.nn.Parameter(torch.ones(64, 64))
>>> opt = Adam8bit().build([{"params": [w], "lr": 0.01}])
>>> w.grad = torch.ones_like(w)
>>> opt.step()
>>> type(opt).__name__, opt.state[w]["exp_avg"].dtype, opt.state_bytes()
('Adam8bitOptimizer', torch.uint8, 8208)
"""

from __future__ import annotations

import dataclasses
import functools
import math

import torch

from sdk import hookimpl
from sdk.base import Optimizer
from sdk.config import Config, check_betas, check_range
from sdk.errors import ConfigError

#: how many exponent bits the map may use (8-bit codes: the paper's 10^0 .. 10^-6 range)
_MAX_EXPONENT_BITS = 7


def dynamic_map(signed: bool) -> torch.Tensor:
    """The 256 sorted float32 values of the dynamic tree data type on [-1, 1] (``signed``) or [0, 1].

    A code is a sign bit (signed only), ``e`` zero bits setting the magnitude ``10**-e``, an
    indicator bit and the remaining ``f`` bits as a linear fraction: bucket ``k`` of ``2**f``
    on [0.1, 1] stands for its midpoint.  The unsigned map spends the sign bit on the fraction.
    Besides ``0``, the code left over (``-0`` when signed) stands for ``1.0`` so that a block's
    absmax is exact, as in bitsandbytes' ``create_dynamic_map``.

    >>> m = dynamic_map(signed=True)
    >>> len(m), float(m[0]) > -1, float(m[-1]), 0.0 in m.tolist()
    (256, True, 1.0, True)
    """
    values = [0.0, 1.0]
    for e in range(_MAX_EXPONENT_BITS):          # e zero bits before the indicator bit
        fraction_bits = _MAX_EXPONENT_BITS - 1 - e + (0 if signed else 1)
        n = 2 ** fraction_bits
        for k in range(n):
            v = 10.0 ** -e * (0.1 + 0.9 * (k + 0.5) / n)
            values += [v, -v] if signed else [v]
    return torch.tensor(sorted(values), dtype=torch.float32)


@functools.cache
def _tables(signed: bool, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The map and the midpoints between its neighbours (nearest-entry search), on ``device``."""
    qmap = dynamic_map(signed).to(device)
    return qmap, (qmap[1:] + qmap[:-1]) / 2


def _blocks(x: torch.Tensor, block_size: int) -> torch.Tensor:
    flat = x.reshape(-1)
    pad = -flat.numel() % block_size
    return torch.nn.functional.pad(flat, (0, pad)).view(-1, block_size)


def quantize_blockwise(x: torch.Tensor, signed: bool, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(codes, absmax)``: uint8 indices into :func:`dynamic_map` (shape of ``x``) and the float32
    absmax of each block of ``block_size`` consecutive values (the last block may be short).

    >>> codes, absmax = quantize_blockwise(torch.tensor([0.5, -1.0, 0.0]), signed=True, block_size=2)
    >>> codes.tolist(), absmax.tolist()
    ([219, 0, 127], [1.0, 0.0])
    >>> [round(v, 4) for v in dequantize_blockwise(codes, absmax, signed=True, block_size=2).tolist()]
    [0.5008, -0.993, 0.0]
    """
    qmap, mids = _tables(signed, x.device)
    blocks = _blocks(x.float(), block_size)
    absmax = blocks.abs().amax(dim=1)
    scaled = blocks / torch.where(absmax > 0, absmax, torch.ones_like(absmax))[:, None]
    codes = torch.bucketize(scaled, mids).to(torch.uint8).reshape(-1)[:x.numel()]
    return codes.view(x.shape), absmax


def dequantize_blockwise(codes: torch.Tensor, absmax: torch.Tensor, signed: bool, block_size: int) -> torch.Tensor:
    """The float32 values the ``codes`` and block ``absmax`` of :func:`quantize_blockwise` stand for."""
    qmap, _ = _tables(signed, codes.device)
    values = _blocks(qmap[codes.long()], block_size) * absmax[:, None]
    return values.reshape(-1)[:codes.numel()].view(codes.shape)


class Adam8bitOptimizer(torch.optim.Optimizer):
    """``torch.optim.Adam`` with block-wise 8-bit moments for parameters of ``min_8bit_size``
    elements or more (state keys ``exp_avg``/``exp_avg_sq`` hold uint8 codes, ``*_absmax`` the
    block scales); smaller parameters keep float32 moments under the same keys."""

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, block_size: int = 2048, min_8bit_size: int = 4096):
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                                      block_size=block_size, min_8bit_size=min_8bit_size))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            bs = group["block_size"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("adam8bit does not support sparse gradients")
                grad = p.grad.float()
                if group["weight_decay"]:
                    grad = grad.add(p.float(), alpha=group["weight_decay"])
                state = self.state[p]
                quantized = p.numel() >= group["min_8bit_size"]
                if not state:
                    state["step"] = 0
                    zeros = torch.zeros_like(p, dtype=torch.float32)
                    if quantized:
                        for key, signed in (("exp_avg", True), ("exp_avg_sq", False)):
                            state[key], state[key + "_absmax"] = quantize_blockwise(zeros, signed, bs)
                    else:
                        state["exp_avg"], state["exp_avg_sq"] = zeros, zeros.clone()
                if quantized:
                    m = dequantize_blockwise(state["exp_avg"], state["exp_avg_absmax"], True, bs)
                    v = dequantize_blockwise(state["exp_avg_sq"], state["exp_avg_sq_absmax"], False, bs)
                else:
                    m, v = state["exp_avg"], state["exp_avg_sq"]
                state["step"] += 1
                t = state["step"]
                m.mul_(beta1).add_(grad, alpha=1 - beta1)
                v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                step_size = group["lr"] / (1 - beta1 ** t)
                denom = (v.sqrt() / math.sqrt(1 - beta2 ** t)).add_(group["eps"])
                # the update uses the float32 moments of this step; only what is kept is quantized
                p.add_((m / denom).to(p.dtype), alpha=-step_size)
                if quantized:
                    state["exp_avg"], state["exp_avg_absmax"] = quantize_blockwise(m, True, bs)
                    state["exp_avg_sq"], state["exp_avg_sq_absmax"] = quantize_blockwise(v, False, bs)
        return loss

    def state_bytes(self) -> int:
        """Bytes of all state tensors (uint8 codes, float32 absmax and float32 moments)."""
        return sum(t.numel() * t.element_size() for s in self.state.values() for t in s.values()
                   if isinstance(t, torch.Tensor))

    def load_state_dict(self, state_dict):
        # torch casts every saved state tensor to its parameter's float dtype; the codes are indices
        super().load_state_dict(state_dict)
        for s in self.state.values():
            if "exp_avg_absmax" in s:
                for key in ("exp_avg", "exp_avg_sq"):
                    s[key] = s[key].to(torch.uint8)


class Adam8bit(Optimizer):
    """Adam with block-wise 8-bit states; ``lr`` comes from the training stage."""

    name = "adam8bit"
    version = "1.0"

    @dataclasses.dataclass(frozen=True)
    class Config(Config):
        betas: tuple[float, float] = (0.9, 0.999)
        eps: float = 1e-8
        weight_decay: float = 0.0
        block_size: int = 2048           # the paper's block size
        min_8bit_size: int = 4096        # smaller tensors keep float32 states, as in the paper

        def __post_init__(self):
            check_betas("adam8bit", self.betas)
            check_range("adam8bit", "eps", self.eps, 0.0, lo_open=True)
            check_range("adam8bit", "weight_decay", self.weight_decay, 0.0)
            for field in ("block_size", "min_8bit_size"):
                value = getattr(self, field)
                if not isinstance(value, int) or isinstance(value, bool):
                    raise ConfigError(f"adam8bit: {field} must be an integer, got {value!r}")
            check_range("adam8bit", "block_size", self.block_size, 1)
            check_range("adam8bit", "min_8bit_size", self.min_8bit_size, 0)

    def build(self, params):
        cfg = self.config
        return Adam8bitOptimizer(params, lr=1e-3, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay,
                                 block_size=cfg.block_size, min_8bit_size=cfg.min_8bit_size)


@hookimpl
def register_optimizers(register):
    register(Adam8bit)
