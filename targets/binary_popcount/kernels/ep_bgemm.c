/*
 * Binary GEMM: c[i][j] = k_bits - 2 * popcount(a[i] XOR b[j]).
 *
 * Layout of the work: b is repacked, EP_NR rows at a time, into a panel
 * [kw * EP_SPLIT][EP_NR] of EP_LANE_BITS-bit lanes, so that one vector load
 * brings the same slice of K for EP_NR consecutive output columns.  The
 * micro-kernel broadcasts that slice of each of EP_MR rows of a, XORs it
 * against the panel vectors, popcounts and accumulates: an EP_MR x EP_NR tile
 * of sums lives in registers for the whole K loop and no horizontal
 * reduction is ever needed.  The panel (EP_NR * kw words) stays in L1 while
 * every row block of a streams past it.
 */
#include <string.h>

#include "ep_kernels.h"
#include "ep_isa.h"

/* Tile shapes: enough independent accumulators to cover the popcount
 * latency without spilling the register file of each ISA.  AVX-512 works on
 * 32-bit lanes (vpopcntd) so a tile holds twice the columns and its sums
 * are already int32: the per-tile epilogue matters when K is a few words. */
#if defined(EP_ISA_AVX512)
typedef uint32_t ep_lane_t;
#define EP_NV 4
#define EP_VL 16
#define EP_MR 4
#elif defined(EP_ISA_AVX2)
typedef uint64_t ep_lane_t;
#define EP_NV 2
#define EP_VL 4
#define EP_MR 3
#elif defined(EP_ISA_NEON)
typedef uint64_t ep_lane_t;
#define EP_NV 2
#define EP_VL 2
#define EP_MR 4
#else
typedef uint64_t ep_lane_t;
#define EP_NV 4
#define EP_VL 1
#define EP_MR 4
#endif
#define EP_NR (EP_NV * EP_VL)
#define EP_LANE_BITS ((int)(8 * sizeof(ep_lane_t)))
#define EP_SPLIT (64 / EP_LANE_BITS) /* lanes per 64-bit word */

size_t ep_bgemm_workspace_bytes(int n, int kw) {
    (void)n; /* one panel is reused for every column block */
    return EP_ALIGN64((size_t)EP_NR * (size_t)kw * sizeof(uint64_t));
}

/* Transpose nr (<= EP_NR) rows of b into the panel, zero-filling the missing
 * columns so the micro-kernel never needs a column edge case. */
static void pack_panel(const uint64_t *b, int nr, int kw, ep_lane_t *panel) {
    /* strided reads, contiguous writes */
    for (int k = 0; k < kw; ++k)
        for (int h = 0; h < EP_SPLIT; ++h) {
            ep_lane_t *dst = panel + ((size_t)k * EP_SPLIT + h) * EP_NR;
            for (int j = 0; j < nr; ++j)
                dst[j] = (ep_lane_t)(b[(size_t)j * (size_t)kw + k] >> (EP_LANE_BITS * h));
            for (int j = nr; j < EP_NR; ++j) dst[j] = 0;
        }
}

#if defined(EP_ISA_AVX512)

static void ukernel(int kw, const uint64_t *const *a, const ep_lane_t *panel,
                    int32_t *c, size_t ldc, int32_t k_bits) {
    __m512i acc[EP_MR][EP_NV];
    EP_UNROLL for (int i = 0; i < EP_MR; ++i)
        EP_UNROLL for (int v = 0; v < EP_NV; ++v) acc[i][v] = _mm512_setzero_si512();
    for (int k = 0; k < 2 * kw; ++k) {
        __m512i bv[EP_NV];
        EP_UNROLL for (int v = 0; v < EP_NV; ++v)
            bv[v] = _mm512_loadu_si512((const void *)(panel + (size_t)k * EP_NR + EP_VL * v));
        EP_UNROLL for (int i = 0; i < EP_MR; ++i) {
            /* x86 is little endian: bytes 4k..4k+3 of a row are its bits
             * 32k..32k+31, the slice the panel holds in row k */
            int32_t slice;
            memcpy(&slice, (const char *)a[i] + 4 * k, sizeof slice);
            const __m512i av = _mm512_set1_epi32(slice);
            EP_UNROLL for (int v = 0; v < EP_NV; ++v)
                acc[i][v] = _mm512_add_epi32(
                    acc[i][v], _mm512_popcnt_epi32(_mm512_xor_si512(av, bv[v])));
        }
    }
    const __m512i kv = _mm512_set1_epi32(k_bits);
    EP_UNROLL for (int i = 0; i < EP_MR; ++i)
        EP_UNROLL for (int v = 0; v < EP_NV; ++v)
            _mm512_storeu_si512((void *)(c + (size_t)i * ldc + EP_VL * v),
                                _mm512_sub_epi32(kv, _mm512_add_epi32(acc[i][v], acc[i][v])));
}

#elif defined(EP_ISA_AVX2)

/* AVX2 has no vector popcount: nibble lookup with pshufb (Mula), byte counts
 * summed for up to 31 words (31 * 8 < 256) before widening with psadbw. */
static void ukernel(int kw, const uint64_t *const *a, const ep_lane_t *panel,
                    int32_t *c, size_t ldc, int32_t k_bits) {
    const __m256i lut = _mm256_setr_epi8(0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4,
                                         0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4);
    const __m256i low = _mm256_set1_epi8(0x0f);
    const __m256i zero = _mm256_setzero_si256();
    __m256i acc[EP_MR][EP_NV];
    EP_UNROLL for (int i = 0; i < EP_MR; ++i)
        EP_UNROLL for (int v = 0; v < EP_NV; ++v) acc[i][v] = zero;
    for (int k0 = 0; k0 < kw; k0 += 31) {
        const int k1 = EP_MIN(kw, k0 + 31);
        __m256i bytes[EP_MR][EP_NV];
        EP_UNROLL for (int i = 0; i < EP_MR; ++i)
            EP_UNROLL for (int v = 0; v < EP_NV; ++v) bytes[i][v] = zero;
        for (int k = k0; k < k1; ++k) {
            __m256i bv[EP_NV];
            EP_UNROLL for (int v = 0; v < EP_NV; ++v)
                bv[v] = _mm256_loadu_si256((const __m256i *)(panel + (size_t)k * EP_NR + EP_VL * v));
            EP_UNROLL for (int i = 0; i < EP_MR; ++i) {
                const __m256i av = _mm256_set1_epi64x((long long)a[i][k]);
                EP_UNROLL for (int v = 0; v < EP_NV; ++v) {
                    const __m256i x = _mm256_xor_si256(av, bv[v]);
                    const __m256i lo = _mm256_shuffle_epi8(lut, _mm256_and_si256(x, low));
                    const __m256i hi = _mm256_shuffle_epi8(
                        lut, _mm256_and_si256(_mm256_srli_epi16(x, 4), low));
                    bytes[i][v] = _mm256_add_epi8(bytes[i][v], _mm256_add_epi8(lo, hi));
                }
            }
        }
        EP_UNROLL for (int i = 0; i < EP_MR; ++i)
            EP_UNROLL for (int v = 0; v < EP_NV; ++v)
                acc[i][v] = _mm256_add_epi64(acc[i][v], _mm256_sad_epu8(bytes[i][v], zero));
    }
    /* the low 32 bits of each 64-bit sum, gathered into one 128-bit vector */
    const __m256i even = _mm256_setr_epi32(0, 2, 4, 6, 0, 2, 4, 6);
    const __m128i kv = _mm_set1_epi32(k_bits);
    EP_UNROLL for (int i = 0; i < EP_MR; ++i)
        EP_UNROLL for (int v = 0; v < EP_NV; ++v) {
            __m128i pc = _mm256_castsi256_si128(_mm256_permutevar8x32_epi32(acc[i][v], even));
            _mm_storeu_si128((__m128i *)(c + (size_t)i * ldc + EP_VL * v),
                             _mm_sub_epi32(kv, _mm_slli_epi32(pc, 1)));
        }
}

#elif defined(EP_ISA_NEON)

/* vcnt gives byte counts; vpadal folds them into uint16 lanes (each lane
 * gains at most 16 per word, so 4095 words fit) and those are widened into
 * uint32 lanes once per chunk. */
static void ukernel(int kw, const uint64_t *const *a, const ep_lane_t *panel,
                    int32_t *c, size_t ldc, int32_t k_bits) {
    uint32x4_t acc[EP_MR][EP_NV];
    EP_UNROLL for (int i = 0; i < EP_MR; ++i)
        EP_UNROLL for (int v = 0; v < EP_NV; ++v) acc[i][v] = vdupq_n_u32(0);
    for (int k0 = 0; k0 < kw; k0 += 4095) {
        const int k1 = EP_MIN(kw, k0 + 4095);
        uint16x8_t part[EP_MR][EP_NV];
        EP_UNROLL for (int i = 0; i < EP_MR; ++i)
            EP_UNROLL for (int v = 0; v < EP_NV; ++v) part[i][v] = vdupq_n_u16(0);
        for (int k = k0; k < k1; ++k) {
            uint64x2_t bv[EP_NV];
            EP_UNROLL for (int v = 0; v < EP_NV; ++v) bv[v] = vld1q_u64(panel + (size_t)k * EP_NR + EP_VL * v);
            EP_UNROLL for (int i = 0; i < EP_MR; ++i) {
                const uint64x2_t av = vdupq_n_u64(a[i][k]);
                EP_UNROLL for (int v = 0; v < EP_NV; ++v)
                    part[i][v] = vpadalq_u8(part[i][v],
                                            vcntq_u8(vreinterpretq_u8_u64(veorq_u64(av, bv[v]))));
            }
        }
        EP_UNROLL for (int i = 0; i < EP_MR; ++i)
            EP_UNROLL for (int v = 0; v < EP_NV; ++v) acc[i][v] = vpadalq_u16(acc[i][v], part[i][v]);
    }
    const int32x2_t kv = vdup_n_s32(k_bits);
    EP_UNROLL for (int i = 0; i < EP_MR; ++i)
        EP_UNROLL for (int v = 0; v < EP_NV; ++v) {
            /* lanes 0-1 hold column 0's halves, lanes 2-3 column 1's */
            const int32x2_t pc = vreinterpret_s32_u32(vmovn_u64(vpaddlq_u32(acc[i][v])));
            vst1_s32(c + (size_t)i * ldc + EP_VL * v, vsub_s32(kv, vshl_n_s32(pc, 1)));
        }
}

#else

static void ukernel(int kw, const uint64_t *const *a, const ep_lane_t *panel,
                    int32_t *c, size_t ldc, int32_t k_bits) {
    int32_t acc[EP_MR][EP_NR] = {{0}};
    for (int k = 0; k < kw; ++k) {
        const uint64_t *bk = panel + (size_t)k * EP_NR;
        EP_UNROLL for (int i = 0; i < EP_MR; ++i) {
            const uint64_t ak = a[i][k];
            EP_UNROLL for (int j = 0; j < EP_NR; ++j) acc[i][j] += __builtin_popcountll(ak ^ bk[j]);
        }
    }
    EP_UNROLL for (int i = 0; i < EP_MR; ++i)
        EP_UNROLL for (int j = 0; j < EP_NR; ++j) c[(size_t)i * ldc + j] = k_bits - 2 * acc[i][j];
}

#endif

/* Fewer rows than one tile (a batch-1 binary linear layer): repacking b
 * would cost as much as the product, so take each dot product directly. */
static void gemm_few_rows(int m, int n, int kw, int k_bits, const uint64_t *a,
                          const uint64_t *b, int32_t *c) {
    for (int i = 0; i < m; ++i) {
        const uint64_t *x = a + (size_t)i * (size_t)kw;
        for (int j = 0; j < n; ++j) {
            const uint64_t *y = b + (size_t)j * (size_t)kw;
            int32_t ones = 0;
            for (int q = 0; q < kw; ++q) ones += (int32_t)__builtin_popcountll(x[q] ^ y[q]);
            c[(size_t)i * (size_t)n + j] = k_bits - 2 * ones;
        }
    }
}

void ep_bgemm(int m, int n, int kw, int k_bits, const uint64_t *a,
              const uint64_t *b, int32_t *c, void *work) {
    ep_lane_t *panel = (ep_lane_t *)work;
    if (m < EP_MR) {
        gemm_few_rows(m, n, kw, k_bits, a, b, c);
        return;
    }
    for (int j0 = 0; j0 < n; j0 += EP_NR) {
        const int nr = EP_MIN(EP_NR, n - j0);
        pack_panel(b + (size_t)j0 * (size_t)kw, nr, kw, panel);
        for (int i0 = 0; i0 < m; i0 += EP_MR) {
            const int mr = EP_MIN(EP_MR, m - i0);
            /* a short last row block repeats its last row instead of reading
             * past the end; those results are dropped */
            const uint64_t *rows[EP_MR];
            for (int i = 0; i < EP_MR; ++i)
                rows[i] = a + (size_t)(i0 + EP_MIN(i, mr - 1)) * (size_t)kw;
            int32_t *dst = c + (size_t)i0 * (size_t)n + (size_t)j0;
            if (mr == EP_MR && nr == EP_NR) {
                ukernel(kw, rows, panel, dst, (size_t)n, k_bits);
            } else {
                int32_t tile[EP_MR * EP_NR];
                ukernel(kw, rows, panel, tile, EP_NR, k_bits);
                for (int i = 0; i < mr; ++i)
                    memcpy(dst + (size_t)i * (size_t)n, tile + i * EP_NR, (size_t)nr * sizeof(int32_t));
            }
        }
    }
}
