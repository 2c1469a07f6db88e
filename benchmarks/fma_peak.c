/* The CPU's float32 FMA ceiling: ten independent chains of 8-wide FMAs per thread (more than the
 * FMA latency times the FMA units, so the units, not the chains, bound it), nothing from memory.
 * benchmarks/fma_peak.py builds and calls it. */
#include <immintrin.h>
#include <omp.h>

#define STEP(a) a = _mm256_fmadd_ps(a, m, c);

/* Runs `iters` rounds of 10 FMAs on each of `threads` threads; returns the seconds it took. The
 * sum written to *sink keeps the compiler from dropping the work. */
double fma_seconds(long iters, int threads, float *sink) {
    double start = omp_get_wtime();
    float total = 0.0f;
#pragma omp parallel num_threads(threads) reduction(+ : total)
    {
        __m256 m = _mm256_set1_ps(0.999999f), c = _mm256_set1_ps(1e-7f);
        __m256 a0 = _mm256_set1_ps(0), a1 = _mm256_set1_ps(1), a2 = _mm256_set1_ps(2), a3 = _mm256_set1_ps(3),
               a4 = _mm256_set1_ps(4), a5 = _mm256_set1_ps(5), a6 = _mm256_set1_ps(6), a7 = _mm256_set1_ps(7),
               a8 = _mm256_set1_ps(8), a9 = _mm256_set1_ps(9);
        for (long i = 0; i < iters; i++) { STEP(a0) STEP(a1) STEP(a2) STEP(a3) STEP(a4) STEP(a5) STEP(a6) STEP(a7) STEP(a8) STEP(a9) }
        __m256 s = _mm256_add_ps(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)),
                                 _mm256_add_ps(_mm256_add_ps(_mm256_add_ps(a4, a5), _mm256_add_ps(a6, a7)),
                                               _mm256_add_ps(a8, a9)));
        total += s[0];
    }
    *sink = total;
    return omp_get_wtime() - start;
}
