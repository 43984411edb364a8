/*
 * Full-precision operators around the binary layers.  Inner loops run over
 * the contiguous channel / output axis so the compiler vectorizes them
 * without reassociating any sum (results stay deterministic for a given
 * compiler and flags: no -ffast-math is needed or wanted).
 */
#include <float.h>
#include <string.h>

#include "ep_kernels.h"
#include "ep_isa.h"

void ep_scale_i32_f32(const int32_t *x, size_t rows, int channels,
                      const float *alpha, float *out) {
    for (size_t r = 0; r < rows; ++r) {
        const int32_t *src = x + r * (size_t)channels;
        float *dst = out + r * (size_t)channels;
        for (int ch = 0; ch < channels; ++ch) dst[ch] = alpha[ch] * (float)src[ch];
    }
}

void ep_conv2d_f32(const float *x, int batch, int h, int w, int c,
                   const float *weight, const float *bias, int o, int kh,
                   int kw, int stride, int pad, float *out) {
    const int oh = (h + 2 * pad - kh) / stride + 1, ow = (w + 2 * pad - kw) / stride + 1;
    for (int n = 0; n < batch; ++n)
        for (int oy = 0; oy < oh; ++oy)
            for (int ox = 0; ox < ow; ++ox) {
                float *dst = out + (((size_t)n * oh + oy) * ow + ox) * o;
                if (bias)
                    memcpy(dst, bias, (size_t)o * sizeof(float));
                else
                    memset(dst, 0, (size_t)o * sizeof(float));
                for (int ky = 0; ky < kh; ++ky) {
                    const int iy = oy * stride - pad + ky;
                    if (iy < 0 || iy >= h) continue;
                    for (int kx = 0; kx < kw; ++kx) {
                        const int ix = ox * stride - pad + kx;
                        if (ix < 0 || ix >= w) continue;
                        const float *src = x + (((size_t)n * h + iy) * w + ix) * c;
                        const float *wt = weight + ((size_t)ky * kw + kx) * c * o;
                        for (int ci = 0; ci < c; ++ci) {
                            const float v = src[ci];
                            const float *wr = wt + (size_t)ci * o;
                            for (int oc = 0; oc < o; ++oc) dst[oc] += v * wr[oc];
                        }
                    }
                }
            }
}

void ep_linear_f32(const float *x, int batch, int in, const float *weight,
                   const float *bias, int out_features, float *out) {
    for (int n = 0; n < batch; ++n) {
        float *dst = out + (size_t)n * out_features;
        if (bias)
            memcpy(dst, bias, (size_t)out_features * sizeof(float));
        else
            memset(dst, 0, (size_t)out_features * sizeof(float));
        for (int i = 0; i < in; ++i) {
            const float v = x[(size_t)n * in + i];
            const float *wr = weight + (size_t)i * out_features;
            for (int oc = 0; oc < out_features; ++oc) dst[oc] += v * wr[oc];
        }
    }
}

void ep_scale_bias_f32(const float *x, size_t rows, int channels,
                       const float *scale, const float *bias, float *out) {
    for (size_t r = 0; r < rows; ++r) {
        const float *src = x + r * (size_t)channels;
        float *dst = out + r * (size_t)channels;
        for (int ch = 0; ch < channels; ++ch) dst[ch] = src[ch] * scale[ch] + bias[ch];
    }
}

void ep_relu_f32(const float *x, size_t n, float *out) {
    /* x < 0, not x > 0: a NaN stays NaN, as in torch.relu and the reference */
    for (size_t i = 0; i < n; ++i) out[i] = x[i] < 0.0f ? 0.0f : x[i];
}

void ep_clamp_f32(const float *x, size_t n, float lo, float hi, float *out) {
    size_t i = 0;
#if defined(EP_ISA_NEON)
    /* FMAX/FMIN (not FMAXNM/FMINNM): a NaN operand gives NaN, as below */
    const float32x4_t vlo = vdupq_n_f32(lo), vhi = vdupq_n_f32(hi);
    for (; i + 4 <= n; i += 4) vst1q_f32(out + i, vminq_f32(vmaxq_f32(vld1q_f32(x + i), vlo), vhi));
#endif
    for (; i < n; ++i) {
        const float v = x[i] < lo ? lo : x[i];   /* NaN compares false: it stays NaN */
        out[i] = v > hi ? hi : v;
    }
}

void ep_prelu_f32(const float *x, size_t rows, int channels,
                  const float *slopes, int n_slopes, float *out) {
    for (size_t r = 0; r < rows; ++r) {
        const float *src = x + r * (size_t)channels;
        float *dst = out + r * (size_t)channels;
        for (int ch = 0; ch < channels; ++ch) {
            const float s = slopes[n_slopes == 1 ? 0 : ch];
            dst[ch] = src[ch] >= 0.0f ? src[ch] : s * src[ch];
        }
    }
}

void ep_add_f32(const float *a, const float *b, size_t n, float *out) {
    for (size_t i = 0; i < n; ++i) out[i] = a[i] + b[i];
}

/* Shared window walk of both pools; is_max selects the reduction. */
static void pool2d(const float *x, int batch, int h, int w, int c, int kernel,
                   int stride, int pad, int is_max, float *out) {
    const int oh = (h + 2 * pad - kernel) / stride + 1, ow = (w + 2 * pad - kernel) / stride + 1;
    const float inv = 1.0f / (float)(kernel * kernel);
    for (int n = 0; n < batch; ++n)
        for (int oy = 0; oy < oh; ++oy)
            for (int ox = 0; ox < ow; ++ox) {
                float *dst = out + (((size_t)n * oh + oy) * ow + ox) * c;
                for (int ch = 0; ch < c; ++ch) dst[ch] = is_max ? -FLT_MAX : 0.0f;
                for (int ky = 0; ky < kernel; ++ky) {
                    const int iy = oy * stride - pad + ky;
                    if (iy < 0 || iy >= h) continue;
                    for (int kx = 0; kx < kernel; ++kx) {
                        const int ix = ox * stride - pad + kx;
                        if (ix < 0 || ix >= w) continue;
                        const float *src = x + (((size_t)n * h + iy) * w + ix) * c;
                        if (is_max) {
                            for (int ch = 0; ch < c; ++ch) dst[ch] = src[ch] > dst[ch] ? src[ch] : dst[ch];
                        } else {
                            for (int ch = 0; ch < c; ++ch) dst[ch] += src[ch];
                        }
                    }
                }
                if (!is_max)
                    for (int ch = 0; ch < c; ++ch) dst[ch] *= inv;
            }
}

void ep_maxpool2d_f32(const float *x, int batch, int h, int w, int c,
                      int kernel, int stride, int pad, float *out) {
    pool2d(x, batch, h, w, c, kernel, stride, pad, 1, out);
}

void ep_avgpool2d_f32(const float *x, int batch, int h, int w, int c,
                      int kernel, int stride, int pad, float *out) {
    pool2d(x, batch, h, w, c, kernel, stride, pad, 0, out);
}

void ep_global_avgpool_f32(const float *x, int batch, int hw, int c, float *out) {
    const float inv = 1.0f / (float)hw;
    for (int n = 0; n < batch; ++n) {
        float *dst = out + (size_t)n * c;
        memset(dst, 0, (size_t)c * sizeof(float));
        for (int p = 0; p < hw; ++p) {
            const float *src = x + ((size_t)n * hw + p) * c;
            for (int ch = 0; ch < c; ++ch) dst[ch] += src[ch];
        }
        for (int ch = 0; ch < c; ++ch) dst[ch] *= inv;
    }
}

void ep_nchw_to_nhwc_f32(const float *x, int batch, int c, int h, int w, float *out) {
    const size_t hw = (size_t)h * w;
    for (int n = 0; n < batch; ++n)
        for (int ch = 0; ch < c; ++ch)
            for (size_t p = 0; p < hw; ++p)
                out[((size_t)n * hw + p) * c + ch] = x[((size_t)n * c + ch) * hw + p];
}

void ep_nhwc_to_nchw_f32(const float *x, int batch, int h, int w, int c, float *out) {
    const size_t hw = (size_t)h * w;
    for (int n = 0; n < batch; ++n)
        for (int ch = 0; ch < c; ++ch)
            for (size_t p = 0; p < hw; ++p)
                out[((size_t)n * c + ch) * hw + p] = x[((size_t)n * hw + p) * c + ch];
}
