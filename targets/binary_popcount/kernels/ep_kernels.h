/*
 * edgepack binary-popcount kernel library (C99).
 *
 * Conventions shared by every kernel and by targets/binary_popcount/packing.py:
 *
 *  - A binary value is +1 or -1.  Bit 0 encodes +1, bit 1 encodes -1, and a
 *    float binarizes to -1 exactly when it compares less than its threshold
 *    (0 by default), so 0.0, -0.0 and NaN all become +1.
 *  - Binary tensors are packed along their reduction axis (channels of one
 *    pixel, or features of one row) into little-endian uint64 words: element j
 *    lives in word j / 64 at bit j % 64.  The unused high bits of the last word
 *    are always 0 in activations and weights alike, so they XOR to 0 and add
 *    nothing; the dot product of two packed rows holding K real elements is
 *    K - 2 * popcount(a XOR b).
 *  - Float activations are NHWC; packed activations are [N][H][W][ceil(C/64)].
 *  - Binary conv weights are [O][kh][kw][ceil(C/64)], float conv weights are
 *    [kh][kw][C][O] and float linear weights are [I][O] (output innermost, so
 *    the inner loops run over contiguous outputs).
 *  - Binary convs zero-pad: a padded position contributes 0, exactly like a
 *    float convolution of +-1 inputs with zero padding (what a PyTorch BNN
 *    computes).
 *  - Kernels that take `work` need a scratch buffer of at least the size the
 *    matching *_workspace_bytes function returns, aligned to 64 bytes.
 *
 * The vector path is picked at compile time from the target flags
 * (AVX-512 VPOPCNTDQ, AVX2, or NEON on AArch64), with portable C otherwise;
 * every path returns bit-identical integers.
 */
#ifndef EP_KERNELS_H
#define EP_KERNELS_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Number of 64-bit words that hold `bits` packed elements. */
#define EP_WORDS(bits) (((bits) + 63) / 64)

/* Name of the vector path this library was compiled with. */
const char *ep_kernel_isa(void);

/* Binarize rows x[rows][channels] into out[rows][EP_WORDS(channels)].
 * threshold: per-channel thresholds (ReActNet's RSign), or NULL for 0. */
void ep_bitpack_f32(const float *x, size_t rows, int channels,
                    const float *threshold, uint64_t *out);

/* c[m][n] = k_bits - 2 * popcount(a[m] XOR b[n]) over kw words per row.
 * a: [m][kw], b: [n][kw], both packed along K. */
size_t ep_bgemm_workspace_bytes(int n, int kw);
void ep_bgemm(int m, int n, int kw, int k_bits, const uint64_t *a,
              const uint64_t *b, int32_t *c, void *work);

/* Binary 2-D convolution of packed NHWC activations x[batch][h][w][cw] with
 * packed weights [o][kh][kw][cw]; out is int32 [batch][oh][ow][o]. */
size_t ep_bconv2d_workspace_bytes(int batch, int h, int w, int c, int o,
                                  int kh, int kw, int stride, int pad);
void ep_bconv2d(const uint64_t *x, int batch, int h, int w, int c,
                const uint64_t *weight, int o, int kh, int kw, int stride,
                int pad, int32_t *out, void *work);

/* Bit-serial k-bit layers (ep_bitserial.c).  Unsigned codes
 * q = round(clamp(x * inv_step, 0, 2^bits - 1)) (half to even; NaN gives 0) of
 * rows x[rows][channels] as `bits` packed +-1 planes out[bits][rows][EP_WORDS(channels)]
 * (a set bit j of q packs as +1). */
void ep_bitplanes_f32(const float *x, size_t rows, int channels, int bits, float inv_step, uint64_t *out);
/* HORQ's residual binarization of each of `batch` samples of per_sample rows:
 * R = x; for each plane j: betas[j][n] = sum |R| / count (summed in order),
 * plane j = sign(R) packed, R -= betas[j][n] * sign(R).  out[order][batch *
 * per_sample][EP_WORDS(channels)]; work: per_sample * channels floats. */
void ep_residual_planes_f32(const float *x, int batch, size_t per_sample, int channels, int order,
                            uint64_t *out, float *betas, float *work);
/* Bit-serial conv (a linear layer is the 1x1 conv of a 1x1 image): weights
 * [w_planes][o][k][k][EP_WORDS(c)] packed +-1 planes with integer coefficients
 * coef[w_planes]; x: kind 0, one sign plane [batch][h][w][cw]; kind 1,
 * ep_bitplanes_f32's a_planes planes; kind 2, the planes of
 * ep_residual_planes_f32.  acc: int32 [batch][oh][ow][o] (kind 1: twice the
 * code product), for kind 2 one such result per plane. */
size_t ep_bitserial_conv2d_workspace_bytes(int kind, int a_planes, int batch, int h, int w, int c,
                                           int w_planes, int o, int k, int stride, int pad);
void ep_bitserial_conv2d(const uint64_t *x, int kind, int a_planes, int batch, int h, int w, int c,
                         const uint64_t *weight, int w_planes, const int32_t *coef, int o, int k,
                         int stride, int pad, int32_t *acc, void *work);
/* out[n][r][oc] = alpha[oc] * sum_j betas[j][n] * acc[j][n][r][oc], summed in j order. */
void ep_residual_scale_f32(const int32_t *acc, int order, int batch, size_t rows_per_sample, int o,
                           const float *betas, const float *alpha, float *out);

/* out[r][ch] = alpha[ch] * x[r][ch]: the float output of a binary layer. */
void ep_scale_i32_f32(const int32_t *x, size_t rows, int channels,
                      const float *alpha, float *out);

/* Number of bytes that hold `bits` signs packed 8 to a byte (ep_bwn_*). */
#define EP_BYTES8(bits) (((bits) + 7) / 8)

/* Binary-weight (BWN) layers on float activations: out[o] = alpha[o] *
 * sum_k s[k][o] x[k] (+ bias[o] unless bias is NULL), s = +-1, each sum
 * sequential over the taps (ky, kx; padded ones skipped) and then channels.
 * signs: one bit per weight packed along the outputs, bit o % 8 of byte o / 8
 * set for -1; [kh][kw][c][EP_BYTES8(o)] for the conv (NHWC in and out),
 * [in][EP_BYTES8(out_features)] for the linear. */
void ep_bwn_conv2d_f32(const float *x, int batch, int h, int w, int c,
                       const uint8_t *signs, const float *alpha, const float *bias,
                       int o, int kh, int kw, int stride, int pad, float *out);
void ep_bwn_linear_f32(const float *x, int batch, int in, const uint8_t *signs,
                       const float *alpha, const float *bias, int out_features, float *out);

/* Full-precision layers (the first and last layers of a BNN, shortcuts). */
void ep_conv2d_f32(const float *x, int batch, int h, int w, int c,
                   const float *weight, const float *bias, int o, int kh,
                   int kw, int stride, int pad, float *out);
void ep_linear_f32(const float *x, int batch, int in, const float *weight,
                   const float *bias, int out_features, float *out);
void ep_scale_bias_f32(const float *x, size_t rows, int channels,
                       const float *scale, const float *bias, float *out);
void ep_relu_f32(const float *x, size_t n, float *out);
/* out[i] = min(max(x[i], lo), hi), torch.clamp's order: lo > hi gives hi
 * everywhere, a NaN x stays NaN (on every path), and infinite bounds are no
 * bound.  Between +0.0 and -0.0 either may come out (the NEON path's FMAX
 * prefers +0.0); they compare equal and binarize alike. */
void ep_clamp_f32(const float *x, size_t n, float lo, float hi, float *out);
/* n_slopes is 1 (shared slope) or channels. */
void ep_prelu_f32(const float *x, size_t rows, int channels,
                  const float *slopes, int n_slopes, float *out);
void ep_add_f32(const float *a, const float *b, size_t n, float *out);
/* Pools over NHWC; avg pool divides by kernel*kernel (padding counted, as in
 * torch's default count_include_pad=True), max pool ignores padding. */
void ep_maxpool2d_f32(const float *x, int batch, int h, int w, int c,
                      int kernel, int stride, int pad, float *out);
void ep_avgpool2d_f32(const float *x, int batch, int h, int w, int c,
                      int kernel, int stride, int pad, float *out);
void ep_global_avgpool_f32(const float *x, int batch, int hw, int c,
                           float *out);
void ep_nchw_to_nhwc_f32(const float *x, int batch, int c, int h, int w,
                         float *out);
void ep_nhwc_to_nchw_f32(const float *x, int batch, int h, int w, int c,
                         float *out);

#ifdef __cplusplus
}
#endif

#endif /* EP_KERNELS_H */
