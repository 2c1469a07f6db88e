/* bfloat16 <-> float32 for the CPU kernels (attention.c, ops.c): one copy of the conversions.
 *
 * bfloat16 is the upper half of a float32, so widening is a 16-bit shift, exact. Narrowing rounds
 * to nearest, ties to even, as torch's c10::BFloat16 does (add 0x7FFF plus the kept half's lowest
 * bit, drop the low half); any NaN becomes torch's 0x7FC0. Plain integer code: it vectorises under
 * `omp simd`, gives the same bits on every x86-64 (AVX2-only machines included), and, unlike
 * vcvtneps2bf16, keeps subnormals as torch does. Bit tests, not isnan: attention.c is built with
 * -ffinite-math-only. */
#ifndef PAGEDSERVE_BF16_H
#define PAGEDSERVE_BF16_H

#include <stdint.h>
#include <string.h>

static inline float bf16_widen(uint16_t b) {
    uint32_t u = (uint32_t)b << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline uint16_t bf16_round(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    uint16_t rounded = (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
    return (u & 0x7FFFFFFFu) > 0x7F800000u ? (uint16_t)0x7FC0 : rounded;
}

/* f rounded to bfloat16 and widened back: where torch stores an intermediate bfloat16 tensor. */
static inline float bf16_through(float f) { return bf16_widen(bf16_round(f)); }

static inline void bf16_to_float(float *dst, const uint16_t *src, int64_t n) {
#pragma omp simd
    for (int64_t i = 0; i < n; i++) dst[i] = bf16_widen(src[i]);
}

static inline void float_to_bf16(uint16_t *dst, const float *src, int64_t n) {
#pragma omp simd
    for (int64_t i = 0; i < n; i++) dst[i] = bf16_round(src[i]);
}

#endif
