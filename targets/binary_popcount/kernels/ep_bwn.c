/*
 * Binary-weight layers on float activations (BWN, XNOR-Net paper section 3.1):
 * out[o] = alpha[o] * sum_k s[k][o] * x[k] (+ bias[o]), s = +-1.
 *
 * The signs are packed along the OUTPUT axis, one bit per weight, bit o % 8
 * of byte o / 8 set for -1 (bit 0 = +1, the convention of ep_kernels.h), rows
 * of EP_BYTES8(o) bytes: [kh][kw][C][EP_BYTES8(o)] for convs, [I][EP_BYTES8(o)]
 * for linears.  Each input value is added to (or subtracted from) every
 * output's running sum in turn, so the inner loop runs over contiguous
 * outputs and every sum is sequential over the inputs: taps (ky, kx) in
 * order, skipping padded ones, then channels.  Subtraction is an add of the
 * value with its sign bit flipped, which is exact, so the NEON path (four
 * outputs per vector, the flip masks looked up per nibble of sign bits) gives
 * the portable path's floats bit for bit, and the numpy reference follows the
 * same order in float32.
 */
#include <string.h>

#include "ep_kernels.h"
#include "ep_isa.h"

#if defined(EP_ISA_NEON)
/* sign-flip masks of 4 outputs, one per nibble of sign bits (bit j -> lane j) */
static const uint32_t flip_masks[16][4] = {
#define M(b) ((b) ? 0x80000000u : 0u)
#define ROW(n) {M((n) & 1), M((n) & 2), M((n) & 4), M((n) & 8)}
    ROW(0), ROW(1), ROW(2), ROW(3), ROW(4), ROW(5), ROW(6), ROW(7),
    ROW(8), ROW(9), ROW(10), ROW(11), ROW(12), ROW(13), ROW(14), ROW(15)
#undef ROW
#undef M
};
#endif

/* acc[oc] += (sign bit of oc ? -v : v) for every input value v = src[ci]. */
static void accumulate(const float *src, int c, const uint8_t *signs, int o, float *acc) {
    const size_t row_bytes = (size_t)EP_BYTES8(o);
    for (int ci = 0; ci < c; ++ci) {
        const float v = src[ci];
        const uint8_t *row = signs + (size_t)ci * row_bytes;
        int oc = 0;
#if defined(EP_ISA_NEON)
        const uint32x4_t vv = vreinterpretq_u32_f32(vdupq_n_f32(v));
        for (; oc + 8 <= o; oc += 8) {
            const uint8_t b = row[oc >> 3];
            const float32x4_t lo = vreinterpretq_f32_u32(veorq_u32(vv, vld1q_u32(flip_masks[b & 15])));
            const float32x4_t hi = vreinterpretq_f32_u32(veorq_u32(vv, vld1q_u32(flip_masks[b >> 4])));
            vst1q_f32(acc + oc, vaddq_f32(vld1q_f32(acc + oc), lo));
            vst1q_f32(acc + oc + 4, vaddq_f32(vld1q_f32(acc + oc + 4), hi));
        }
#endif
        {
            /* branch free: the signs are data, a branch on each would mispredict half the time */
            uint32_t vb;
            memcpy(&vb, &v, sizeof vb);
            for (; oc < o; ++oc) {
                const uint32_t t = vb ^ ((uint32_t)((row[oc >> 3] >> (oc & 7)) & 1u) << 31);
                float f;
                memcpy(&f, &t, sizeof f);
                acc[oc] += f;
            }
        }
    }
}

/* dst[oc] = alpha[oc] * dst[oc] (+ bias[oc]) */
static void finish(float *dst, int o, const float *alpha, const float *bias) {
    if (bias)
        for (int oc = 0; oc < o; ++oc) dst[oc] = alpha[oc] * dst[oc] + bias[oc];
    else
        for (int oc = 0; oc < o; ++oc) dst[oc] = alpha[oc] * dst[oc];
}

void ep_bwn_conv2d_f32(const float *x, int batch, int h, int w, int c,
                       const uint8_t *signs, const float *alpha, const float *bias,
                       int o, int kh, int kw, int stride, int pad, float *out) {
    const int oh = (h + 2 * pad - kh) / stride + 1, ow = (w + 2 * pad - kw) / stride + 1;
    const size_t tap_bytes = (size_t)c * (size_t)EP_BYTES8(o);
    for (int n = 0; n < batch; ++n)
        for (int oy = 0; oy < oh; ++oy)
            for (int ox = 0; ox < ow; ++ox) {
                float *dst = out + (((size_t)n * oh + oy) * ow + ox) * o;
                memset(dst, 0, (size_t)o * sizeof(float));
                for (int ky = 0; ky < kh; ++ky) {
                    const int iy = oy * stride - pad + ky;
                    if (iy < 0 || iy >= h) continue;
                    for (int kx = 0; kx < kw; ++kx) {
                        const int ix = ox * stride - pad + kx;
                        if (ix < 0 || ix >= w) continue;
                        accumulate(x + (((size_t)n * h + iy) * w + ix) * c, c,
                                   signs + ((size_t)ky * kw + kx) * tap_bytes, o, dst);
                    }
                }
                finish(dst, o, alpha, bias);
            }
}

void ep_bwn_linear_f32(const float *x, int batch, int in, const uint8_t *signs,
                       const float *alpha, const float *bias, int out_features, float *out) {
    for (int n = 0; n < batch; ++n) {
        float *dst = out + (size_t)n * out_features;
        memset(dst, 0, (size_t)out_features * sizeof(float));
        accumulate(x + (size_t)n * in, in, signs, out_features, dst);
        finish(dst, out_features, alpha, bias);
    }
}
