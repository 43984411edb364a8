/* Sign + bit-packing of float activations (see ep_kernels.h for the bit
 * convention). */
#include "ep_kernels.h"
#include "ep_isa.h"

const char *ep_kernel_isa(void) { return EP_ISA_NAME; }

/* Bits [0, n) of one word, scalar; also the tail of the vector paths. */
static uint64_t pack_word_scalar(const float *x, const float *thr, int n) {
    uint64_t word = 0;
    for (int b = 0; b < n; ++b) {
        float t = thr ? thr[b] : 0.0f;
        word |= (uint64_t)(x[b] < t) << b;
    }
    return word;
}

/* One full 64-element word with the vector unit. */
static uint64_t pack_word_full(const float *x, const float *thr) {
#if defined(EP_ISA_AVX512)
    uint64_t word = 0;
    for (int q = 0; q < 4; ++q) {
        __m512 t = thr ? _mm512_loadu_ps(thr + 16 * q) : _mm512_setzero_ps();
        __mmask16 m = _mm512_cmp_ps_mask(_mm512_loadu_ps(x + 16 * q), t, _CMP_LT_OQ);
        word |= (uint64_t)m << (16 * q);
    }
    return word;
#elif defined(EP_ISA_AVX2)
    uint64_t word = 0;
    for (int q = 0; q < 8; ++q) {
        __m256 t = thr ? _mm256_loadu_ps(thr + 8 * q) : _mm256_setzero_ps();
        /* movemask of the comparison, not of x itself, so -0.0 stays +1. */
        int m = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(x + 8 * q), t, _CMP_LT_OQ));
        word |= (uint64_t)(unsigned)m << (8 * q);
    }
    return word;
#elif defined(EP_ISA_NEON)
    static const uint32_t lane_bits[4] = {1, 2, 4, 8};
    const uint32x4_t sel = vld1q_u32(lane_bits);
    uint64_t word = 0;
    for (int q = 0; q < 16; ++q) {
        float32x4_t t = thr ? vld1q_f32(thr + 4 * q) : vdupq_n_f32(0.0f);
        uint32x4_t m = vcltq_f32(vld1q_f32(x + 4 * q), t);
        word |= (uint64_t)vaddvq_u32(vandq_u32(m, sel)) << (4 * q);
    }
    return word;
#else
    return pack_word_scalar(x, thr, 64);
#endif
}

void ep_bitpack_f32(const float *x, size_t rows, int channels,
                    const float *threshold, uint64_t *out) {
    const int full = channels / 64, tail = channels % 64;
    const int cw = EP_WORDS(channels);
    for (size_t r = 0; r < rows; ++r) {
        const float *row = x + r * (size_t)channels;
        uint64_t *dst = out + r * (size_t)cw;
        for (int wd = 0; wd < full; ++wd)
            dst[wd] = pack_word_full(row + 64 * wd, threshold ? threshold + 64 * wd : 0);
        if (tail)
            dst[full] = pack_word_scalar(row + 64 * full,
                                         threshold ? threshold + 64 * full : 0, tail);
    }
}
