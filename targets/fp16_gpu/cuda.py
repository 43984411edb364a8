"""The fp16 flatbuffer rebuilt as torch operations, for the ``cuda`` runner.

:class:`TorchLiteRT` executes a float LiteRT model (as :mod:`sdk.litert.lowering`
writes it) with torch on any device and dtype: ``cuda`` + ``float16`` is the
``cuda`` runner; ``cpu`` + ``float32`` lets tests check the translation
against the numpy reference on machines without a GPU.  Tensors stay NHWC as
in the flatbuffer; convolutions and pools permute to NCHW around the torch call.
Ops listed in ``fp32`` (output tensor names) run in float32, as in the artifact.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from sdk.litert.padding import same_padding
from sdk.litert.reference import ReferenceInterpreter

from .half import runs_in_fp32

_ACT = {0: None, 1: "RELU", 2: "RELU_N1_TO_1", 3: "RELU6"}


def _act(y: torch.Tensor, op) -> torch.Tensor:
    a = _ACT[getattr(op.builtinOptions, "fusedActivationFunction", 0) or 0]
    if a == "RELU":
        return torch.relu(y)
    if a == "RELU6":
        return torch.clamp(y, 0, 6)
    if a == "RELU_N1_TO_1":
        return torch.clamp(y, -1, 1)
    return y


def _nchw(x):
    return x.permute(0, 3, 1, 2)


def _nhwc(x):
    return x.permute(0, 2, 3, 1)


class TorchLiteRT:
    """A float LiteRT model as torch calls on ``device`` in ``dtype``."""

    def __init__(self, model: bytes, *, device: str = "cuda", dtype: torch.dtype = torch.float16,
                 fp32: set[str] | frozenset = frozenset()):
        self.ref = ReferenceInterpreter(model)       # parsing only: tensors, constants, operators
        self.device, self.dtype, self.fp32 = torch.device(device), dtype, set(fp32)
        self.consts = {t.index: torch.from_numpy(np.array(t.data)).to(self.device)
                       for t in self.ref._tensors if t.data is not None}

    def _pad_spatial(self, x, o, kh, kw, value):
        if o.padding != 0:          # VALID
            return x
        dh = getattr(o, "dilationHFactor", 1) or 1
        dw = getattr(o, "dilationWFactor", 1) or 1
        _, t, b = same_padding(x.shape[2], kh, o.strideH, dh)
        _, l, r = same_padding(x.shape[3], kw, o.strideW, dw)
        return F.pad(x, (l, r, t, b), value=value)

    def _op(self, name, op, vals, out_tensor):
        o = op.builtinOptions
        x = vals[0]
        if name == "DEQUANTIZE":
            return x
        if name in ("CONV_2D", "DEPTHWISE_CONV_2D"):
            w, b = vals[1], vals[2]
            kh, kw = w.shape[1], w.shape[2]
            xc = self._pad_spatial(_nchw(x), o, kh, kw, 0.0)
            if name == "CONV_2D":
                wt, groups = w.permute(0, 3, 1, 2), x.shape[3] // w.shape[3]
            else:
                wt, groups = w.permute(3, 0, 1, 2), x.shape[3]
            y = F.conv2d(xc, wt, b, (o.strideH, o.strideW), 0, (o.dilationHFactor, o.dilationWFactor), groups)
            return _act(_nhwc(y), op)
        if name == "FULLY_CONNECTED":
            w = vals[1]
            y = x.reshape(-1, w.shape[1]) @ w.T
            if len(vals) > 2 and vals[2] is not None:
                y = y + vals[2]
            return _act(y, op).reshape(out_tensor.shape)
        if name in ("ADD", "SUB", "MUL"):
            fn = {"ADD": torch.add, "SUB": torch.sub, "MUL": torch.mul}[name]
            return _act(fn(x, vals[1]), op)
        if name == "MEAN":
            axes = [int(a) for a in vals[1].reshape(-1).tolist()]
            return x.mean(dim=axes, keepdim=bool(o.keepDims))
        if name == "RESHAPE":
            return x.reshape(out_tensor.shape)
        if name == "TRANSPOSE":
            return x.permute([int(p) for p in vals[1].tolist()])
        if name == "CONCATENATION":
            return _act(torch.cat(vals, dim=o.axis), op)
        if name == "PAD":
            pads = vals[1].tolist()
            flat = [p for pair in reversed(pads) for p in pair]
            return F.pad(x, flat)
        if name in ("MAX_POOL_2D", "AVERAGE_POOL_2D"):
            xc = _nchw(x)
            if name == "MAX_POOL_2D":
                y = F.max_pool2d(self._pad_spatial(xc, o, o.filterHeight, o.filterWidth, float("-inf")),
                                 (o.filterHeight, o.filterWidth), (o.strideH, o.strideW))
            else:
                if o.padding == 0:
                    raise NotImplementedError("SAME average pooling is not emitted by edgepack's lowering")
                y = F.avg_pool2d(xc, (o.filterHeight, o.filterWidth), (o.strideH, o.strideW))
            return _act(_nhwc(y), op)
        if name == "SOFTMAX":
            return torch.softmax(x * o.beta, dim=-1)
        if name == "LOGISTIC":
            return torch.sigmoid(x)
        if name == "TANH":
            return torch.tanh(x)
        if name == "HARD_SWISH":
            return F.hardswish(x)
        if name == "RELU":
            return torch.relu(x)
        if name == "RELU6":
            return torch.clamp(x, 0, 6)
        if name == "RELU_N1_TO_1":
            return torch.clamp(x, -1, 1)
        if name in ("MINIMUM", "MAXIMUM"):
            return (torch.minimum if name == "MINIMUM" else torch.maximum)(x, vals[1])
        if name == "SLICE":
            begin, size = vals[1].tolist(), vals[2].tolist()
            return x[tuple(slice(b, None if n == -1 else b + n) for b, n in zip(begin, size))]
        if name == "LEAKY_RELU":
            return F.leaky_relu(x, o.alpha)
        if name == "PRELU":
            return torch.where(x >= 0, x, x * vals[1])
        if name == "RESIZE_NEAREST_NEIGHBOR":
            size = [int(s) for s in vals[1].tolist()]
            return _nhwc(F.interpolate(_nchw(x), size=size, mode="nearest"))
        raise NotImplementedError(f"{name} has no torch translation")

    @torch.no_grad()
    def run(self, inputs: list[np.ndarray]) -> list[np.ndarray]:
        env = dict(self.consts)
        for idx, x in zip(self.ref._inputs, inputs):
            env[idx] = torch.from_numpy(np.ascontiguousarray(x)).to(self.device)
        for name, op, node in self.ref._ops:
            out_t = self.ref._tensors[int(op.outputs[0])]
            dtype = torch.float32 if runs_in_fp32(out_t.name, self.fp32) else self.dtype
            vals = [(env[i].to(dtype) if env[i].is_floating_point() else env[i]) if i >= 0 else None
                    for i in op.inputs]
            env[out_t.index] = self._op(name, op, vals, out_t)
        return [env[i].float().cpu().numpy() for i in self.ref._outputs]

