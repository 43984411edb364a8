/*
 * Bit-serial k-bit layers: a k-bit dot product as a weighted sum of binary ones.
 *
 * Weights are integer codes m = sum_i coef[i] * s_i over +-1 planes s_i, packed
 * like binary weights and stacked as w_planes * o output rows.  Activations
 * arrive as +-1 planes too (ep_bitplanes_f32, ep_residual_planes_f32, or the
 * single plane of ep_bitpack_f32), stacked as images.  One call of the binary
 * convolution (ep_bconv2d: im2col + XNOR-popcount GEMM, exact zero padding)
 * multiplies every activation plane by every weight plane; the planes are then
 * combined in integers:
 *
 *   kind 0, sign planes (1 plane, +-1):         acc = sum_i coef[i] P_i
 *   kind 1, unsigned codes a = sum_j 2^j e_j:   acc = sum_i coef[i] (sum_j 2^j P_ij + (2^k - 1) Z_i)
 *           (= 2 * sum m * a, since 2a = (2^k - 1) + sum_j 2^j (2 e_j - 1); Z_i is the
 *           weight sum of plane i over the taps of each output that are not
 *           padding, summed here from per-tap popcounts)
 *   kind 2, residual planes (HORQ):              acc_j = sum_i coef[i] P_ij, one per plane
 *
 * Every path is integer arithmetic until the float epilogue, so the C and
 * numpy results are equal bit for bit.
 */
#include <string.h>

#include "ep_kernels.h"
#include "ep_isa.h"

static int out_dim(int in, int k, int stride, int pad) { return (in + 2 * pad - k) / stride + 1; }

void ep_bitplanes_f32(const float *x, size_t rows, int channels, int bits, float inv_step, uint64_t *out) {
    const int cw = EP_WORDS(channels);
    const float top = (float)((1 << bits) - 1);
    const size_t plane = rows * (size_t)cw;
    uint32_t q[64];
    for (size_t r = 0; r < rows; ++r) {
        const float *src = x + r * (size_t)channels;
        for (int wi = 0; wi < cw; ++wi) {
            const int n = EP_MIN(64, channels - 64 * wi);
            /* the codes of 64 channels: clamp (NaN -> 0), then round half to even as torch.round
             * (v is in [0, 255]: truncation is floor, and the fraction is exact) */
            for (int b = 0; b < n; ++b) {
                float v = src[64 * wi + b] * inv_step;
                v = v > 0.0f ? v : 0.0f;
                v = v < top ? v : top;
                {
                    const uint32_t t = (uint32_t)v;
                    const float frac = v - (float)t;
                    q[b] = t + (uint32_t)(frac > 0.5f) + ((uint32_t)(frac == 0.5f) & t & 1u);
                }
            }
            /* plane j: bit b is 0 (+1) where bit j of the code is set, 1 (-1) elsewhere; unused
             * high bits 0 */
            for (int j = 0; j < bits; ++j) {
                uint64_t word = 0;
                for (int b = 0; b < n; ++b) word |= (uint64_t)((~q[b] >> j) & 1u) << b;
                out[(size_t)j * plane + r * cw + wi] = word;
            }
        }
    }
}

void ep_residual_planes_f32(const float *x, int batch, size_t per_sample, int channels, int order,
                            uint64_t *out, float *betas, float *work) {
    const int cw = EP_WORDS(channels);
    const size_t count = per_sample * (size_t)channels;
    const size_t plane = (size_t)batch * per_sample * (size_t)cw;
    memset(out, 0, plane * (size_t)order * sizeof(uint64_t));
    for (int n = 0; n < batch; ++n) {
        float *r = work;
        memcpy(r, x + (size_t)n * count, count * sizeof(float));
        for (int j = 0; j < order; ++j) {
            float s = 0.0f, beta;
            uint64_t *dst = out + (size_t)j * plane + (size_t)n * per_sample * cw;
            for (size_t i = 0; i < count; ++i) s += r[i] < 0.0f ? -r[i] : r[i];
            beta = s / (float)count;
            betas[(size_t)j * batch + n] = beta;
            for (size_t p = 0; p < per_sample; ++p)
                for (int ch = 0; ch < channels; ++ch) {
                    float *v = r + p * channels + ch;
                    if (*v < 0.0f) {
                        dst[p * cw + ch / 64] |= 1ull << (ch % 64);
                        *v = *v + beta;
                    } else {
                        *v = *v - beta;
                    }
                }
        }
    }
}

static int images_of(int kind, int a_planes, int batch) { return kind == 0 ? batch : a_planes * batch; }

size_t ep_bitserial_conv2d_workspace_bytes(int kind, int a_planes, int batch, int h, int w, int c,
                                           int w_planes, int o, int k, int stride, int pad) {
    const int images = images_of(kind, a_planes, batch);
    const size_t pix = (size_t)out_dim(h, k, stride, pad) * out_dim(w, k, stride, pad);
    const size_t raw = (size_t)images * pix * (size_t)w_planes * o * sizeof(int32_t);
    const size_t sums = ((size_t)k * k + pix) * (size_t)o * sizeof(int32_t);
    return EP_ALIGN64(raw) + EP_MAX(ep_bconv2d_workspace_bytes(images, h, w, c, w_planes * o, k, k, stride, pad),
                                    sums);
}

/* z[p][oc]: the sum of the +-1 weights of plane `weight` ([o][k][k][cw]) over the taps of
 * output pixel p that fall inside the h x w image; tap: k*k*o scratch. */
static void valid_sums(const uint64_t *weight, int o, int k, int c, int h, int w, int stride, int pad,
                       int oh, int ow, int32_t *tap, int32_t *z) {
    const int cw = EP_WORDS(c), taps = k * k;
    for (int oc = 0; oc < o; ++oc)
        for (int t = 0; t < taps; ++t) {
            const uint64_t *wt = weight + ((size_t)oc * taps + t) * cw;
            int ones = 0;
            for (int q = 0; q < cw; ++q) ones += __builtin_popcountll(wt[q]);
            tap[(size_t)t * o + oc] = c - 2 * ones;
        }
    for (int oy = 0; oy < oh; ++oy)
        for (int ox = 0; ox < ow; ++ox) {
            int32_t *dst = z + ((size_t)oy * ow + ox) * o;
            for (int oc = 0; oc < o; ++oc) dst[oc] = 0;
            for (int ky = 0; ky < k; ++ky) {
                const int iy = oy * stride - pad + ky;
                if (iy < 0 || iy >= h) continue;
                for (int kx = 0; kx < k; ++kx) {
                    const int ix = ox * stride - pad + kx;
                    if (ix < 0 || ix >= w) continue;
                    const int32_t *src = tap + ((size_t)ky * k + kx) * o;
                    for (int oc = 0; oc < o; ++oc) dst[oc] += src[oc];
                }
            }
        }
}

void ep_bitserial_conv2d(const uint64_t *x, int kind, int a_planes, int batch, int h, int w, int c,
                         const uint64_t *weight, int w_planes, const int32_t *coef, int o, int k,
                         int stride, int pad, int32_t *acc, void *work) {
    const int images = images_of(kind, a_planes, batch);
    const int oh = out_dim(h, k, stride, pad), ow = out_dim(w, k, stride, pad);
    const size_t pix = (size_t)oh * ow;
    const size_t ot = (size_t)w_planes * o;
    int32_t *raw = (int32_t *)work;
    unsigned char *rest = (unsigned char *)work + EP_ALIGN64((size_t)images * pix * ot * sizeof(int32_t));
    ep_bconv2d(x, images, h, w, c, weight, w_planes * o, k, k, stride, pad, raw, rest);
    /* acc[plane][n][p][:] = sum_i (coef[i] << j) raw[j*batch + n][p][i*o:(i+1)*o], over j too for
     * kind 1; the inner loops run over contiguous outputs */
    {
        const int sums_planes = kind == 1 ? a_planes : 1;
        const int results = kind == 2 ? a_planes : 1;
        memset(acc, 0, (size_t)results * batch * pix * o * sizeof(int32_t));
        for (int r = 0; r < results; ++r)
            for (int j = 0; j < sums_planes; ++j)
                for (int i = 0; i < w_planes; ++i) {
                    const int32_t m = coef[i] * (1 << j);
                    for (size_t q = 0; q < (size_t)batch * pix; ++q) {
                        const int32_t *src = raw + (((size_t)(r + j) * batch * pix) + q) * ot + (size_t)i * o;
                        int32_t *dst = acc + ((size_t)r * batch * pix + q) * o;
                        for (int oc = 0; oc < o; ++oc) dst[oc] += m * src[oc];
                    }
                }
    }
    if (kind == 1) {       /* + (2^k - 1) coef[i] Z_i */
        const int32_t full = (1 << a_planes) - 1;
        int32_t *tap = (int32_t *)rest, *z = tap + (size_t)k * k * o;
        for (int i = 0; i < w_planes; ++i) {
            const int32_t f = full * coef[i];
            valid_sums(weight + (size_t)i * o * k * k * EP_WORDS(c), o, k, c, h, w, stride, pad, oh, ow, tap, z);
            for (int n = 0; n < batch; ++n)
                for (size_t q = 0; q < pix * (size_t)o; ++q) acc[(size_t)n * pix * o + q] += f * z[q];
        }
    }
}

void ep_residual_scale_f32(const int32_t *acc, int order, int batch, size_t rows_per_sample, int o,
                           const float *betas, const float *alpha, float *out) {
    const size_t plane = (size_t)batch * rows_per_sample * o;
    for (int n = 0; n < batch; ++n)
        for (size_t r = 0; r < rows_per_sample; ++r) {
            const size_t row = ((size_t)n * rows_per_sample + r) * o;
            for (int oc = 0; oc < o; ++oc) {
                float s = 0.0f;
                for (int j = 0; j < order; ++j) {
                    const float term = betas[(size_t)j * batch + n] * (float)acc[(size_t)j * plane + row + oc];
                    s = s + term;
                }
                out[row + oc] = alpha[oc] * s;
            }
        }
}
