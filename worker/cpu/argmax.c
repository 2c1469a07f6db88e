/* out[r] = argmax of row r of x [R, V] (float32, rows `ld` floats apart): greedy sampling's pick,
 * the same index as torch's argmax (the first of equal maxima; NaN above everything, its first).
 *
 * Why: torch's CPU argmax read 256 x 49,152 floats at a quarter of amax's speed (12.6 against 2.7
 * ms of one core), and a blocked amax-then-argmax in torch took four parallel regions where this is
 * one: on cores shared with the router and scheduler each region can wait a time slice for its
 * second thread.
 *
 * How: per row (OpenMP over rows), one AVX2 pass for the max and any NaN, then a pass over the same
 * row, now in cache, for the first index holding it.
 */
#if !defined(__AVX2__)
#error "needs AVX2 (the sampler then keeps torch's argmax)"
#endif
#include <immintrin.h>
#include <math.h>
#include <stdint.h>

static int64_t row_argmax(const float *x, int64_t n) {
    __m256 top = _mm256_set1_ps(-INFINITY), nan = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 v = _mm256_loadu_ps(x + i);
        top = _mm256_max_ps(top, v); /* meaningless once a NaN came by: then `nan` decides */
        nan = _mm256_or_ps(nan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    }
    float lanes[8], best = -INFINITY;
    _mm256_storeu_ps(lanes, top);
    for (int j = 0; j < 8; j++) best = lanes[j] > best ? lanes[j] : best;
    int any_nan = _mm256_movemask_ps(nan) != 0;
    for (int64_t j = i; j < n; j++) {
        if (isnan(x[j])) any_nan = 1;
        else if (x[j] > best) best = x[j];
    }
    if (any_nan) {
        for (int64_t j = 0; j < n; j++)
            if (isnan(x[j])) return j;
    }
    __m256 b = _mm256_set1_ps(best);
    for (i = 0; i + 8 <= n; i += 8) {
        int hit = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(x + i), b, _CMP_EQ_OQ));
        if (hit) return i + __builtin_ctz(hit);
    }
    for (; i < n; i++)
        if (x[i] == best) return i;
    return 0; /* not reached: best is one of the row's values (or -inf, found at its first) */
}

/* Below PARALLEL_FLOATS (~0.3 ms of one core) one thread does it: a parallel region's second thread
 * can be a time slice away on busy cores (batch 1 at 49k: 11.7 ms with the region, 0.2 without). */
#define PARALLEL_FLOATS (1 << 20)

void argmax_rows(const float *x, int64_t rows, int64_t n, int64_t ld, int64_t *out) {
#pragma omp parallel for schedule(static) if (rows * n >= PARALLEL_FLOATS)
    for (int64_t r = 0; r < rows; r++) out[r] = row_argmax(x + r * ld, n);
}
