/*
 * Compile-time choice of the vector path, shared by the kernel sources (not
 * part of the public interface).  Exactly one EP_ISA_* macro ends up defined.
 */
#ifndef EP_ISA_H
#define EP_ISA_H

#if defined(__AVX512F__) && defined(__AVX512VPOPCNTDQ__)
#define EP_ISA_AVX512 1
#define EP_ISA_NAME "avx512-vpopcntdq"
#include <immintrin.h>
#elif defined(__AVX2__)
#define EP_ISA_AVX2 1
#define EP_ISA_NAME "avx2"
#include <immintrin.h>
#elif defined(__aarch64__) && defined(__ARM_NEON)
#define EP_ISA_NEON 1
#define EP_ISA_NAME "neon"
#include <arm_neon.h>
#else
#define EP_ISA_PORTABLE 1
#define EP_ISA_NAME "portable"
#endif

/* Full unrolling of the tile loops before scalar replacement, so register
 * tiles held in small arrays really live in registers. */
#if defined(__GNUC__)
#define EP_UNROLL _Pragma("GCC unroll 16")
#else
#define EP_UNROLL
#endif

#define EP_MIN(a, b) ((a) < (b) ? (a) : (b))
#define EP_MAX(a, b) ((a) > (b) ? (a) : (b))
/* Scratch sub-buffers start on cache-line boundaries. */
#define EP_ALIGN64(n) (((size_t)(n) + 63) & ~(size_t)63)

#endif /* EP_ISA_H */
