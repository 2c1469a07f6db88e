/* y[M, N] = x[M, K] @ w[N, K]^T (+ bias) for the few rows of a decode step, float32, the weight as
 * the checkpoint stores it.
 *
 * Why: at decode sizes (M = 1 to 128 rows against weights that stream from memory every step)
 * oneDNN's packed sgemm ran at 85-95 GFLOP/s on 2 Zen 3 cores and MKL's slower; this loop ran at
 * 100-108 (benchmarks/linear.py). It reads each weight row once per 16 rows of x, in the order it
 * lies, and needs no second, packed copy of the weights.
 *
 * How: x is copied into panels of 16 rows laid out k-major ([M/16][K][16], zero-padded), so one
 * k step of a panel is two AVX2 vectors. Each task takes six weight rows (a strip of N) and runs
 * them against every panel: 6 x 16 outputs in 12 accumulators, each k step two vector loads of x,
 * six broadcasts of w and twelve FMAs, each output one fp32 sum over k in order. One to eight
 * rows take a plain matrix-vector loop instead (`gemv`). Threads: OpenMP (torch's runtime) over
 * the strips, or the weight rows.
 */
#if !defined(__AVX2__) || !defined(__FMA__)
#error "needs AVX2 and FMA (the worker then keeps oneDNN for every linear)"
#endif
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>

#define PANEL 16 /* rows of x per panel: two AVX2 vectors */
#define STRIP 6  /* rows of w per task: 6 x 2 accumulators + 2 x loads + 1 broadcast = 15 registers */

static void pack_panels(const float *x, int64_t M, int64_t K, float *xt) {
    for (int64_t p = 0; p < (M + PANEL - 1) / PANEL; p++)
        for (int64_t k = 0; k < K; k++)
            for (int j = 0; j < PANEL; j++) {
                int64_t m = p * PANEL + j;
                xt[(p * K + k) * PANEL + j] = m < M ? x[m * K + k] : 0.0f;
            }
}

/* y[m, n + r] = sum_k w[r, k] xt[k, m] (+ bias[r]) for r < nr, m < rows. With `fetch` (a strip's
 * first panel), it also asks for the 6 * K floats at `ahead`, the next strip's weight rows, three
 * lines every eight k steps: the hardware prefetcher, following six rows at once, starts each row
 * late, and a strip's first panel then waited on memory. Measured on 2 Zen 3 cores inside decode
 * steps (ModelRunner, alternating builds step by step): batch 12-32 steps 1.13-1.29x faster, batch
 * 48-64 1.11x (docs/PERFORMANCE.md); in benchmarks/linear.py 16 rows 63 -> 86 GFLOP/s, 32 rows
 * 81 -> 99. The last strip's successor may be short: prefetches past the weight's end never fault. */
static inline __attribute__((always_inline)) void strip_panel(const float *w, int64_t K, const float *xt,
                                                              const float *bias, float *y, int64_t ldy, int rows,
                                                              const float *ahead, const int nr, const int fetch) {
    __m256 c[STRIP][2];
    for (int r = 0; r < nr; r++) c[r][0] = c[r][1] = _mm256_setzero_ps();
    /* Unrolled four k steps deep: each step's twelve FMAs come with eight loads and, rolled, four
     * instructions of loop and address arithmetic, which kept the FMA units ~10% idle. */
#pragma GCC unroll 4
    for (int64_t k = 0; k < K; k++) {
        __m256 x0 = _mm256_loadu_ps(xt + k * PANEL), x1 = _mm256_loadu_ps(xt + k * PANEL + 8);
        if (fetch && (k & 7) == 0) { /* 6 rows * 8 k steps * 4 bytes = three 64-byte lines */
            __builtin_prefetch(ahead + 6 * k);
            __builtin_prefetch(ahead + 6 * k + 16);
            __builtin_prefetch(ahead + 6 * k + 32);
        }
        for (int r = 0; r < nr; r++) {
            __m256 a = _mm256_broadcast_ss(w + r * K + k);
            c[r][0] = _mm256_fmadd_ps(a, x0, c[r][0]);
            c[r][1] = _mm256_fmadd_ps(a, x1, c[r][1]);
        }
    }
    float out[STRIP][PANEL]; /* transposed on the way out: y is row-major in m */
    for (int r = 0; r < nr; r++) {
        _mm256_storeu_ps(out[r], c[r][0]);
        _mm256_storeu_ps(out[r] + 8, c[r][1]);
    }
    for (int m = 0; m < rows; m++)
        for (int r = 0; r < nr; r++) y[m * ldy + r] = bias ? out[r][m] + bias[r] : out[r][m];
}

/* y[m, n] = w[n] . x[m] (+ bias[n]) for m < M <= GEMV_ROWS: each weight row read once, from memory,
 * against the few rows of x (in L1). With up to eight rows a 16-row panel would be half zeros or more
 * and its arithmetic, not memory, would bound the step; here memory does. */
#define GEMV_ROWS 8
static inline __attribute__((always_inline)) void gemv_row(const float *x, int64_t K, const float *w, float bias,
                                                           float *y, int64_t ldy, const int M) {
    __m256 acc[GEMV_ROWS];
    for (int m = 0; m < M; m++) acc[m] = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 8 <= K; k += 8) {
        __m256 wk = _mm256_loadu_ps(w + k);
        for (int m = 0; m < M; m++) acc[m] = _mm256_fmadd_ps(wk, _mm256_loadu_ps(x + m * K + k), acc[m]);
    }
    for (int m = 0; m < M; m++) {
        __m128 h = _mm_add_ps(_mm256_castps256_ps128(acc[m]), _mm256_extractf128_ps(acc[m], 1));
        h = _mm_add_ps(h, _mm_movehl_ps(h, h));
        float sum = _mm_cvtss_f32(_mm_add_ss(h, _mm_movehdup_ps(h)));
        for (int64_t j = k; j < K; j++) sum += w[j] * x[m * K + j];
        y[m * ldy] = sum + bias;
    }
}

static void gemv(const float *x, int64_t M, int64_t K, const float *w, const float *bias, int64_t N, float *y) {
#pragma omp parallel for schedule(static)
    for (int64_t n = 0; n < N; n++) {
        float b = bias ? bias[n] : 0.0f;
        switch (M) {
            case 8: gemv_row(x, K, w + n * K, b, y + n, N, 8); break;
            case 7: gemv_row(x, K, w + n * K, b, y + n, N, 7); break;
            case 6: gemv_row(x, K, w + n * K, b, y + n, N, 6); break;
            case 5: gemv_row(x, K, w + n * K, b, y + n, N, 5); break;
            case 4: gemv_row(x, K, w + n * K, b, y + n, N, 4); break;
            case 3: gemv_row(x, K, w + n * K, b, y + n, N, 3); break;
            case 2: gemv_row(x, K, w + n * K, b, y + n, N, 2); break;
            default: gemv_row(x, K, w + n * K, b, y + n, N, 1); break;
        }
    }
}

#define STRIP_PANEL(nr)                                                              \
    do {                                                                             \
        if (fetch) strip_panel(ws, K, xp, bs, yp, N, rows, ahead, nr, 1);            \
        else strip_panel(ws, K, xp, bs, yp, N, rows, ahead, nr, 0);                  \
    } while (0)

/* Returns 0, or -1 when the panel buffer cannot be allocated (nothing written). */
int linear_rows(const float *x, int64_t M, int64_t K, const float *w, const float *bias, int64_t N, float *y) {
    if (M <= GEMV_ROWS) {
        gemv(x, M, K, w, bias, N, y);
        return 0;
    }
    int64_t panels = (M + PANEL - 1) / PANEL, strips = (N + STRIP - 1) / STRIP;
    float *xt = aligned_alloc(64, ((panels * K * PANEL * sizeof(float)) + 63) / 64 * 64);
    if (!xt) return -1;
    pack_panels(x, M, K, xt);
#pragma omp parallel for schedule(static)
    for (int64_t s = 0; s < strips; s++) {
        int64_t n = s * STRIP;
        int nr = N - n < STRIP ? (int)(N - n) : STRIP;
        const float *ws = w + n * K, *bs = bias ? bias + n : 0;
        for (int64_t p = 0; p < panels; p++) {
            int rows = M - p * PANEL < PANEL ? (int)(M - p * PANEL) : PANEL;
            const float *xp = xt + p * K * PANEL;
            float *yp = y + p * PANEL * N + n;
            /* The strips of a thread are consecutive (static schedule), and so are their rows. */
            int fetch = p == 0 && n + STRIP < N;
            const float *ahead = ws + STRIP * K;
            switch (nr) { /* constant nr and fetch per call: the accumulators unroll into registers */
                case 6: STRIP_PANEL(6); break;
                case 5: STRIP_PANEL(5); break;
                case 4: STRIP_PANEL(4); break;
                case 3: STRIP_PANEL(3); break;
                case 2: STRIP_PANEL(2); break;
                default: STRIP_PANEL(1); break;
            }
        }
    }
    free(xt);
    return 0;
}
