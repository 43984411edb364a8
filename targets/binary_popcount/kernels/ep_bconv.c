/*
 * Binary convolution as im2col + binary GEMM, with an exact zero-padding
 * correction.
 *
 * im2col fills a padded tap with zero words, i.e. with +1 activations, so the
 * GEMM adds that tap's weight sum  sum_c w[o][tap][c] = C - 2*popcount(w)
 * where a zero-padded float conv adds 0.  Subtracting those sums for the
 * padded taps of each border pixel afterwards makes the result equal to the
 * zero-padded convolution, while the GEMM itself stays branch-free.
 */
#include "ep_kernels.h"
#include "ep_isa.h"

static int out_dim(int in, int k, int stride, int pad) { return (in + 2 * pad - k) / stride + 1; }

static int needs_im2col(int kh, int kw, int stride, int pad) {
    return !(kh == 1 && kw == 1 && stride == 1 && pad == 0);
}

size_t ep_bconv2d_workspace_bytes(int batch, int h, int w, int c, int o,
                                  int kh, int kw, int stride, int pad) {
    const size_t m = (size_t)batch * out_dim(h, kh, stride, pad) * out_dim(w, kw, stride, pad);
    const int kwt = kh * kw * EP_WORDS(c);
    const size_t cols = needs_im2col(kh, kw, stride, pad) ? EP_ALIGN64(m * kwt * sizeof(uint64_t)) : 0;
    /* the GEMM panel and the padding sums are never live together */
    const size_t sums = EP_ALIGN64((size_t)kh * kw * o * sizeof(int32_t));
    return cols + EP_MAX(ep_bgemm_workspace_bytes(o, kwt), sums);
}

static void copy_words(uint64_t *dst, const uint64_t *src, size_t n) {
    /* a plain loop: a tap is often a single word, far below the size where
     * a memcpy call pays off */
    for (size_t q = 0; q < n; ++q) dst[q] = src[q];
}

static void zero_words(uint64_t *dst, size_t n) {
    for (size_t q = 0; q < n; ++q) dst[q] = 0;
}

static void im2col(const uint64_t *x, int batch, int h, int w, int cw, int kh,
                   int kw, int stride, int pad, int oh, int ow, uint64_t *cols) {
    const size_t kwt = (size_t)kh * kw * cw, seg = (size_t)kw * cw;
    for (int n = 0; n < batch; ++n)
        for (int oy = 0; oy < oh; ++oy)
            for (int ox = 0; ox < ow; ++ox) {
                uint64_t *row = cols + (((size_t)n * oh + oy) * ow + ox) * kwt;
                const int x0 = ox * stride - pad;
                for (int ky = 0; ky < kh; ++ky) {
                    const int iy = oy * stride - pad + ky;
                    uint64_t *dst = row + (size_t)ky * seg;
                    if (iy < 0 || iy >= h) {
                        zero_words(dst, seg);
                        continue;
                    }
                    /* the kw taps of one kernel row are adjacent pixels,
                     * hence contiguous words of NHWC input */
                    const uint64_t *src = x + ((size_t)n * h + iy) * w * cw;
                    if (x0 >= 0 && x0 + kw <= w) {
                        copy_words(dst, src + (size_t)x0 * cw, seg);
                        continue;
                    }
                    for (int kx = 0; kx < kw; ++kx) {
                        const int ix = x0 + kx;
                        if (ix < 0 || ix >= w)
                            zero_words(dst + (size_t)kx * cw, cw);
                        else
                            copy_words(dst + (size_t)kx * cw, src + (size_t)ix * cw, cw);
                    }
                }
            }
}

/* sums[tap][o] = sum over channels of the +-1 weights of tap for output o. */
static void tap_sums(const uint64_t *weight, int o, int taps, int c, int32_t *sums) {
    const int cw = EP_WORDS(c);
    for (int oc = 0; oc < o; ++oc)
        for (int t = 0; t < taps; ++t) {
            const uint64_t *wt = weight + ((size_t)oc * taps + t) * cw;
            int ones = 0;
            for (int q = 0; q < cw; ++q) ones += __builtin_popcountll(wt[q]);
            sums[(size_t)t * o + oc] = c - 2 * ones;
        }
}

static void correct_padding(const int32_t *sums, int batch, int h, int w, int o,
                            int kh, int kw, int stride, int pad, int oh, int ow,
                            int32_t *out) {
    for (int oy = 0; oy < oh; ++oy) {
        const int y0 = oy * stride - pad;
        const int y_inside = y0 >= 0 && y0 + kh <= h;
        for (int ox = 0; ox < ow; ++ox) {
            const int x0 = ox * stride - pad;
            if (y_inside && x0 >= 0 && x0 + kw <= w) continue; /* no padded tap */
            for (int ky = 0; ky < kh; ++ky)
                for (int kx = 0; kx < kw; ++kx) {
                    if (y0 + ky >= 0 && y0 + ky < h && x0 + kx >= 0 && x0 + kx < w) continue;
                    const int32_t *s = sums + ((size_t)ky * kw + kx) * o;
                    for (int n = 0; n < batch; ++n) {
                        int32_t *dst = out + (((size_t)n * oh + oy) * ow + ox) * o;
                        for (int oc = 0; oc < o; ++oc) dst[oc] -= s[oc];
                    }
                }
        }
    }
}

void ep_bconv2d(const uint64_t *x, int batch, int h, int w, int c,
                const uint64_t *weight, int o, int kh, int kw, int stride,
                int pad, int32_t *out, void *work) {
    const int cw = EP_WORDS(c);
    const int oh = out_dim(h, kh, stride, pad), ow = out_dim(w, kw, stride, pad);
    const size_t m = (size_t)batch * oh * ow;
    const int kwt = kh * kw * cw;
    unsigned char *ws = (unsigned char *)work;
    const uint64_t *a = x;
    if (needs_im2col(kh, kw, stride, pad)) {
        uint64_t *cols = (uint64_t *)ws;
        im2col(x, batch, h, w, cw, kh, kw, stride, pad, oh, ow, cols);
        a = cols;
        ws += EP_ALIGN64(m * kwt * sizeof(uint64_t));
    }
    ep_bgemm((int)m, o, kwt, kh * kw * c, a, weight, out, ws);
    if (pad > 0) {
        int32_t *sums = (int32_t *)ws;
        tap_sums(weight, o, kh * kw, c, sums);
        correct_padding(sums, batch, h, w, o, kh, kw, stride, pad, oh, ow, out);
    }
}
