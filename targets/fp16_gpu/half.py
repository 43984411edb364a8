"""Execute a float LiteRT model in half-precision arithmetic, as a GPU delegate
without fp32 accumulation does.

:class:`HalfInterpreter` is the integer reference's interpreter with the
float kernels swapped: every op reads float16 values and writes float16 values
(an overflow becomes ±inf, a value below the smallest subnormal becomes 0).
Convolutions and fully connected layers accumulate as LiteRT's GPU shaders do
in F16 precision: one float16 accumulator per output starting at 0, one fused
multiply-add per term in ``(ky, kx, cin)`` order, the bias added at the end
(``order="pairwise"`` gives tree sums instead, the best case of float16
accumulation).  Means, average pools and softmax sums reduce pairwise, as the
work-group reductions of GPU kernels do.  Ops named in ``fp32`` (output tensor
names) run in float32 instead: the layers an fp16 artifact keeps in full
precision.

Ops that only move data (reshape, transpose, pad, concat, max-pool, dequantize
of float16 weights) are exact in either precision and run unchanged.
"""

from __future__ import annotations

import numpy as np

from sdk.litert import reference as R

_CHUNK = 1 << 24        # elements of the product tensor materialised at once


def sum16(p: np.ndarray) -> np.ndarray:
    """Sum the last axis in float16, pairwise: every addition rounds to float16.

    ``p`` may hold exact float32 products of float16 values: the first level
    then adds two exact products and rounds once, as a fused multiply-add does.
    """
    if p.dtype != np.float16 and p.shape[-1] > 1:
        if p.shape[-1] % 2:
            p = np.concatenate([p, np.zeros(p.shape[:-1] + (1,), p.dtype)], axis=-1)
        p = (p[..., 0::2] + p[..., 1::2]).astype(np.float16)
    p = p.astype(np.float16, copy=False)
    while p.shape[-1] > 1:
        if p.shape[-1] % 2:
            p = np.concatenate([p, np.zeros(p.shape[:-1] + (1,), np.float16)], axis=-1)
        p = p[..., 0::2] + p[..., 1::2]
    return p[..., 0]


def mac16(a: np.ndarray, w: np.ndarray) -> np.ndarray:
    """``a [..., K] · w [K, N]`` accumulated the way GPU convolution shaders do it in
    half precision: one float16 accumulator per output, starting at 0, updated
    term by term in ``K`` order (``ky, kx, cin`` for a convolution) with a fused
    multiply-add, i.e. the exact product added and the sum rounded to float16 once.

    (A float16 × float16 product is exact in float64, and so is its sum with a
    float16 accumulator, so ``.astype(float16)`` is the single rounding of an FMA.)
    """
    a = a.astype(np.float16).astype(np.float64)
    w = w.astype(np.float16).astype(np.float64)
    acc = np.zeros(a.shape[:-1] + (w.shape[-1],), np.float16)
    for j in range(a.shape[-1]):
        acc = (acc + a[..., j, None] * w[j]).astype(np.float16)
    return acc


def dot16(a: np.ndarray, w: np.ndarray, order: str = "sequential") -> np.ndarray:
    """``a [M, K] @ w.T [K, N]`` for float16 operands with float16 accumulation.

    ``order="sequential"`` (:func:`mac16`): the shader order of LiteRT's GPU
    convolution and fully connected kernels.  ``order="pairwise"``: products
    exact, sums as :func:`sum16` — the most accurate order a float16 reduction
    can have, for comparison.
    """
    if order == "sequential":
        return mac16(a, w.T)
    if order != "pairwise":
        raise ValueError(f"unknown accumulation order {order!r}; valid: sequential, pairwise")
    a, w = a.astype(np.float16).astype(np.float32), w.astype(np.float16).astype(np.float32)
    m, k = a.shape
    rows = max(1, _CHUNK // max(1, k * w.shape[0]))
    out = np.empty((m, w.shape[0]), np.float16)
    for i in range(0, m, rows):
        out[i:i + rows] = sum16(a[i:i + rows, None, :] * w[None, :, :])
    return out


def _h(x) -> np.ndarray:
    return np.asarray(x).astype(np.float16)


def _act16(x: np.ndarray, act: str) -> np.ndarray:
    return R.float_activation(x, act).astype(np.float16)


def _conv16(interp, k, op, node, ins, vals, out, depthwise: bool):
    o = op.builtinOptions
    x, w, b = _h(vals[0]), _h(vals[1]), _h(vals[2])
    _, kh, kw, _ = ins[1].shape
    win = R.windows(x, kh, kw, (o.strideH, o.strideW), (o.dilationHFactor, o.dilationWFactor), o.padding == 0,
                     np.float16(0))
    n, oh, ow = win.shape[:3]
    if depthwise:
        mult = w.shape[3] // x.shape[3]
        win = np.repeat(win, mult, axis=5)                        # [n, oh, ow, kh, kw, cout]
        taps = win.reshape(n, oh, ow, kh * kw, -1).astype(np.float64)
        wt = w[0].reshape(kh * kw, -1).astype(np.float64)
        if interp.order == "sequential":      # one accumulator per output channel, taps in (ky, kx) order
            y = np.zeros(taps.shape[:3] + taps.shape[4:], np.float16)
            for t in range(kh * kw):
                y = (y + taps[..., t, :] * wt[t]).astype(np.float16)
        else:
            y = sum16((taps * wt).transpose(0, 1, 2, 4, 3))
    else:
        y = R.grouped(win, w, lambda a, ww: dot16(a.reshape(-1, a.shape[-1]), ww.T, interp.order)
                       .reshape(a.shape[:-1] + (-1,)))
    return _act16(y + b, R.fused_activation(op, node))


def _fc16(interp, k, op, node, ins, vals, out):
    x, w = _h(vals[0]), _h(vals[1])
    x2 = x.reshape(-1, w.shape[1])
    y = dot16(x2, w, interp.order)
    if len(vals) > 2 and vals[2] is not None:
        y = y + _h(vals[2])
    return _act16(y, R.fused_activation(op, node)).reshape(out.shape)


def _binary16(fn):
    def k(interp, i, op, node, ins, vals, out):
        return _act16(fn(_h(vals[0]), _h(vals[1])), R.fused_activation(op, node))
    return k


def _mean16(interp, k, op, node, ins, vals, out):
    x = _h(vals[0])
    axes = tuple(int(a) % x.ndim for a in np.asarray(vals[1]).reshape(-1))
    rest = [d for d in range(x.ndim) if d not in axes]
    moved = x.transpose(rest + list(axes)).reshape([x.shape[d] for d in rest] + [-1])
    count = moved.shape[-1]
    return (sum16(moved) * np.float16(1.0 / count)).astype(np.float16)


def _avg_pool16(interp, k, op, node, ins, vals, out):
    x = _h(vals[0])
    win = R.pool_windows(x, op, np.float16(0))
    n, oh, ow, fh, fw, c = win.shape
    total = sum16(win.reshape(n, oh, ow, fh * fw, c).transpose(0, 1, 2, 4, 3))
    return _act16(total * np.float16(1.0 / (fh * fw)), R.fused_activation(op, node))


def _softmax16(interp, k, op, node, ins, vals, out):
    z = _h(vals[0]) * np.float16(op.builtinOptions.beta)
    e = np.exp((z - z.max(axis=-1, keepdims=True)).astype(np.float16))
    return (e / sum16(e)[..., None]).astype(np.float16)


def _elementwise16(fn):
    """Transcendental activations: the exact function of the float16 input, rounded to float16."""
    def k(interp, i, op, node, ins, vals, out):
        return fn(_h(vals[0]).astype(np.float64)).astype(np.float16)
    return k


def _prelu16(interp, k, op, node, ins, vals, out):
    x, a = _h(vals[0]), _h(vals[1])
    return np.where(x >= 0, x, x * a).astype(np.float16)


def _leaky16(interp, k, op, node, ins, vals, out):
    x = _h(vals[0])
    return np.where(x >= 0, x, x * np.float16(op.builtinOptions.alpha)).astype(np.float16)


_HALF = {
    "CONV_2D": lambda *a: _conv16(*a, depthwise=False),
    "DEPTHWISE_CONV_2D": lambda *a: _conv16(*a, depthwise=True),
    "FULLY_CONNECTED": _fc16,
    "ADD": _binary16(np.add), "SUB": _binary16(np.subtract), "MUL": _binary16(np.multiply),
    "MEAN": _mean16, "AVERAGE_POOL_2D": _avg_pool16, "SOFTMAX": _softmax16,
    "LOGISTIC": _elementwise16(lambda x: 1.0 / (1.0 + np.exp(-x))),
    "TANH": _elementwise16(np.tanh),
    "HARD_SWISH": _elementwise16(lambda x: x * np.clip(x + 3.0, 0.0, 6.0) / 6.0),
    "RELU": _elementwise16(lambda x: np.maximum(x, 0.0)),
    "RELU6": _elementwise16(lambda x: np.clip(x, 0.0, 6.0)),
    "LEAKY_RELU": _leaky16, "PRELU": _prelu16,
}


def runs_in_fp32(tensor_name: str, fp32: set[str]) -> bool:
    """Whether the op writing ``tensor_name`` is one an fp16 artifact keeps in float32."""
    return tensor_name in fp32 or tensor_name.split("#")[0] in fp32


class HalfInterpreter(R.ReferenceInterpreter):
    """Float LiteRT model executed in float16 arithmetic (see module docstring).

    ``fp32``: output tensor names of ops that run in float32 instead.
    ``order``: how convolutions and fully connected layers accumulate —
    ``"sequential"`` (LiteRT GPU shaders: one float16 FMA per term) or
    ``"pairwise"`` (tree sums, the best case of float16 accumulation).
    """

    ORDERS = ("sequential", "pairwise")

    def __init__(self, model, fp32: set[str] | frozenset = frozenset(), order: str = "sequential"):
        super().__init__(model)
        if order not in self.ORDERS:
            raise ValueError(f"unknown accumulation order {order!r}; valid: {', '.join(self.ORDERS)}")
        self.order = order
        self.fp32 = set(fp32)
        self._half = {k: _HALF[op_name] for k, (op_name, op, _) in enumerate(self._ops)
                      if op_name in _HALF and not runs_in_fp32(self._tensors[int(op.outputs[0])].name, self.fp32)}

    def _execute(self, inputs):
        # inputs enter the GPU as float16
        inputs = [np.asarray(x).astype(np.float16).astype(np.float32) for x in
                  (inputs if isinstance(inputs, (list, tuple)) else [inputs])]
        with np.errstate(over="ignore", invalid="ignore", under="ignore"):
            return super()._execute(inputs)


def _dispatch(name):
    base = R.ReferenceInterpreter.KERNELS[name]

    def kernel(interp, k, op, node, ins, vals, out):
        fn = interp._half.get(k)
        if fn is None:
            return base(interp, k, op, node, ins, vals, out)
        return np.asarray(fn(interp, k, op, node, ins, vals, out), np.float16).astype(np.float32)
    return kernel


HalfInterpreter.KERNELS = {name: _dispatch(name) for name in R.ReferenceInterpreter.KERNELS}
