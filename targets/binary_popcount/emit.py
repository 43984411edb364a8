"""model.c and model.h of a network: the memory plan, and the C frame around each layer's statements.

The generated C99 calls the kernel library (``kernels/ep_kernels.h``).  Every
tensor, and the int32 product of every binary layer, gets an offset in one
arena, planned first fit so that buffers alive at the same step never overlap;
weights are used in place from weights.bin, at the offsets :mod:`.blob` lays
out, once model.c has checked the blob's header.  What each layer computes
comes from its kind's ``emit`` (:mod:`.specs`), which gets a :class:`LayerCode`.

>>> import numpy as np
>>> from targets.binary_popcount.specs import BinaryLinear, InputSpec, Sign
>>> model_c, model_h = generate_sources([InputSpec((1, 64)), Sign(), BinaryLinear.from_float(np.ones((4, 64)))])
>>> "ep_bgemm(1, 4, 1, 64" in model_c
True
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from .blob import WEIGHTS_MAGIC, weight_layout
from .specs import BinaryLayer, LayerSpec, TensorInfo, infer_shapes, source_index

_ALIGN = 64


def _plan_arena(buffers: list[tuple[int, int, int]]) -> tuple[list[int], int]:
    """First-fit offsets for (nbytes, first_step, last_step) buffers so that
    buffers alive at the same step never overlap; returns offsets and size."""
    placed: list[tuple[int, int, int, int]] = []  # offset, end, first, last
    offsets = []
    for nbytes, first, last in buffers:
        size = -(-nbytes // _ALIGN) * _ALIGN
        busy = sorted((o, e) for o, e, f, end in placed if f <= last and first <= end)
        offset = 0
        for o, e in busy:
            if offset + size <= o:
                break
            offset = max(offset, e)
        placed.append((offset, offset + size, first, last))
        offsets.append(offset)
    return offsets, max((e for _, e, _, _ in placed), default=0)


class LayerCode:
    """What :meth:`.specs.LayerSpec.emit` writes layer ``index`` with: the shapes of
    the tensor it reads (``input``) and makes (``output``) and C expressions of them
    (``src``, ``dst``; layer 0 reads the caller's NCHW ``input``), of its weights
    (:meth:`array`), of other tensors (:meth:`tensor`), and for a binary layer of
    its int32 scratch (``acc``) and its place in ``binary_outputs`` (``debug_offset``)."""

    def __init__(self, program: _Program, index: int):
        self._program, self.index = program, index
        self.output, self.dst = program.infos[index], program.tensor(index)
        if index:
            s = source_index(program.specs, index)
            self.input, self.src = program.infos[s], program.tensor(s)
        else:
            self.input, self.src = self.output, "input"

    def info(self, j: int) -> TensorInfo:
        return self._program.infos[j]

    def tensor(self, j: int) -> str:
        return self._program.tensor(j)

    def array(self, name: str, ctype: str = "float") -> str:
        """Pointer to this layer's array ``name`` in weights.bin; ``NULL`` when it has none."""
        offset = self._program.layout.offsets.get((self.index, name))
        return "NULL" if offset is None else f"((const {ctype} *)(wb + {offset}))"

    @property
    def acc(self) -> str:
        return f"((int32_t *)(arena + {self._program.scratch_offsets[self.index]}))"

    @property
    def debug_offset(self) -> int:
        return self._program.debug_offsets[self.index]


class _Program:
    """The memory plan of a network and its two C files."""

    def __init__(self, specs: Sequence[LayerSpec]):
        self.specs = list(specs)
        self.infos = infer_shapes(self.specs)
        self.layout = weight_layout(self.specs)
        n = len(self.specs)
        last = list(range(n))
        for i in range(1, n):
            for j in (source_index(self.specs, i), getattr(self.specs[i], "other", None)):
                if j is not None:
                    last[j] = max(last[j], i)
        last[n - 1] = n  # the result is copied out after the last layer
        buffers = [(info.nbytes, i, last[i]) for i, info in enumerate(self.infos)]
        self.binary = [i for i, s in enumerate(self.specs) if isinstance(s, BinaryLayer)]
        self.results = {i: math.prod(self.specs[i].results(self.infos[source_index(self.specs, i)], self.infos[i]))
                        for i in self.binary}
        for i in self.binary:
            buffers.append((self.results[i] * 4, i, i))
        offsets, self.arena_bytes = _plan_arena(buffers)
        self.tensor_offsets = offsets[:n]
        self.scratch_offsets = dict(zip(self.binary, offsets[n:], strict=True))
        self.debug_offsets, pos = {}, 0
        for i in self.binary:
            self.debug_offsets[i] = pos
            pos += self.results[i]
        self.debug_size = pos

    def tensor(self, i: int) -> str:
        ctype = "uint64_t" if self.infos[i].binary else "float"
        return f"(({ctype} *)(arena + {self.tensor_offsets[i]}))"

    def model_h(self) -> str:
        inp, out = self.infos[0], self.infos[-1]
        return f"""/* Generated by edgepack (binary-popcount target); do not edit. */
#ifndef EDGEPACK_MODEL_H
#define EDGEPACK_MODEL_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {{
#endif

/* float counts; input is NCHW {tuple(inp.shape)}, output {tuple(out.shape)} (NCHW if 4-D) */
#define EDGEPACK_INPUT_SIZE {inp.size}
#define EDGEPACK_OUTPUT_SIZE {out.size}
/* int32 results of the binary layers, concatenated in layer order (NHWC) */
#define EDGEPACK_NUM_BINARY_LAYERS {len(self.binary)}
#define EDGEPACK_BINARY_OUTPUT_SIZE {self.debug_size}
#define EDGEPACK_WEIGHTS_BYTES {self.layout.size}

#define EDGEPACK_OK 0
#define EDGEPACK_ERR_NOMEM 1
#define EDGEPACK_ERR_WEIGHTS 2 /* foreign weights.bin, or a big-endian host */

/* Bytes of scratch memory one run allocates (and frees before returning). */
size_t edgepack_model_arena_bytes(void);

/* Run the network.  weights: the contents of weights.bin, 8-byte aligned.
 * Returns EDGEPACK_OK or an EDGEPACK_ERR_* code; reentrant. */
int edgepack_model_run(const float *input, float *output, const void *weights);

/* As edgepack_model_run, and also copies every binary layer's int32
 * popcount result into binary_outputs (EDGEPACK_BINARY_OUTPUT_SIZE int32s)
 * unless it is NULL. */
int edgepack_model_run_debug(const float *input, float *output, const void *weights,
                             int32_t *binary_outputs);

#ifdef __cplusplus
}}
#endif

#endif /* EDGEPACK_MODEL_H */
"""

    def model_c(self) -> str:
        body, ws_exprs = [], []
        for i, spec in enumerate(self.specs):
            stmts, ws = spec.emit(LayerCode(self, i))
            body.append(f"    /* layer {i}: {type(spec).__name__} -> "
                        f"{self.infos[i].kind} {tuple(self.infos[i].shape)} */")
            body.extend("    " + s for s in stmts)
            if ws:
                ws_exprs.append(ws)
        last, out = len(self.specs) - 1, self.infos[-1]
        if len(out.shape) == 4:
            n, h, w, c = out.nhwc
            body.append(f"    ep_nhwc_to_nchw_f32({self.tensor(last)}, {n}, {h}, {w}, {c}, output);")
        else:
            body.append(f"    memcpy(output, {self.tensor(last)}, {out.nbytes});")
        ws_lines = "".join(f"    need = {e};\n    if (need > ws) ws = need;\n" for e in ws_exprs)
        helpers = "".join(dict.fromkeys(type(s).C_HELPER for s in self.specs))
        return f"""/* Generated by edgepack (binary-popcount target); do not edit.
 * Build: cc -O3 -std=c99 -march=native -c model.c ep_*.c  (with ep_kernels.h beside). */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "ep_kernels.h"
#include "model.h"

#define TENSOR_ARENA_BYTES ((size_t){self.arena_bytes})
{helpers}
static size_t workspace_bytes(void) {{
    size_t ws = 0, need;
{ws_lines}    (void)need;
    return ws;
}}

size_t edgepack_model_arena_bytes(void) {{ return TENSOR_ARENA_BYTES + workspace_bytes() + 64; }}

static int weights_match(const unsigned char *wb) {{
    const uint16_t probe = 1;
    uint64_t size = 0, fingerprint = 0;
    int b;
    /* the arrays in weights.bin are little endian and used in place */
    if (*(const unsigned char *)&probe != 1) return 0;
    if (memcmp(wb, "{WEIGHTS_MAGIC.decode()}", 8) != 0) return 0;
    for (b = 7; b >= 0; --b) {{
        size = (size << 8) | wb[8 + b];
        fingerprint = (fingerprint << 8) | wb[16 + b];
    }}
    return size == {self.layout.size}ULL && fingerprint == 0x{self.layout.fingerprint:016x}ULL;
}}

int edgepack_model_run_debug(const float *input, float *output, const void *weights,
                             int32_t *binary_outputs) {{
    const unsigned char *wb = (const unsigned char *)weights;
    unsigned char *raw, *arena;
    void *work;
    if (!weights_match(wb)) return EDGEPACK_ERR_WEIGHTS;
    raw = (unsigned char *)malloc(edgepack_model_arena_bytes());
    if (!raw) return EDGEPACK_ERR_NOMEM;
    arena = raw + ((64 - ((uintptr_t)raw & 63)) & 63);
    work = arena + TENSOR_ARENA_BYTES;
    (void)work;
    (void)binary_outputs;
{chr(10).join(body)}
    free(raw);
    return EDGEPACK_OK;
}}

int edgepack_model_run(const float *input, float *output, const void *weights) {{
    return edgepack_model_run_debug(input, output, weights, NULL);
}}
"""


def generate_sources(specs: Sequence[LayerSpec]) -> tuple[str, str]:
    """``(model_c, model_h)`` for ``specs``: C99 calling the kernel library,
    with weight offsets and the memory plan baked in.  model.c defines
    ``edgepack_model_run(input, output, weights)`` and
    ``edgepack_model_run_debug(input, output, weights, int32_t *binary_outputs)``."""
    program = _Program(specs)
    return program.model_c(), program.model_h()
