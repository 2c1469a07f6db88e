/* y[M, N] = x[M, K] W^T for the few rows of a decode step, W held as GGUF's Q8_0 blocks exactly
 * as the file stores them: int8 codes [N, K] and one scale per 32 of a row, float32 [N, K / 32].
 *
 * Why: torch's int8 op takes one scale per output channel, so a Q8_0 weight had to be requantized
 * (lossy) and its bfloat16 activations run through a path that is not the fastest at one row.
 * Here the activation row is quantized to int8 per block of 32 as well (Q8_0's own rule: scale =
 * max |x| / 127, codes round-to-nearest-even), so a block's dot product is 32 int8 x int8 products
 * summed exactly in int32, then times the two blocks' scales and summed in float32: a quarter of
 * float32's weight bytes, and integer multiply-adds that do four products an instruction.
 * The approach is llama.cpp's (ggml's Q8_0 x Q8_0 dot); the code is our own.
 *
 * How: the int8 x int8 products use the unsigned x signed multiply-adds of x86: |w| (unsigned)
 * times x with w's sign moved onto it (`_mm256_sign_epi8`), so the sum is unchanged. With
 * AVX-VNNI or AVX512-VNNI (+VL) one `vpdpbusd` sums four such products into each int32 lane; with
 * AVX2 `vpmaddubsw` sums pairs into int16 (at most 2 * 128 * 127 = 32512: never saturates, as x's
 * codes stay in [-127, 127]) and `vpmaddwd` with ones pairs those into int32. The eight int32
 * lanes are converted to float32 (exact: |lane| <= 4 * 128 * 127) and accumulated with the block's
 * scale product by FMA; each output is one horizontal sum. A scalar loop serves every other CPU.
 * Threads: OpenMP (torch's runtime) over the output rows; the activation is quantized once, before.
 */
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

#define QK 32    /* weights (and activations) a block */
#define CHUNK 4  /* rows of x against one weight row at a time: 4 x 2 accumulators + 5 temporaries */

#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
#define PATH "avx512vnni"
#elif defined(__AVXVNNI__)
#define PATH "avxvnni"
#elif defined(__AVX2__) && defined(__FMA__)
#define PATH "avx2"
#else
#define PATH "scalar"
#endif

/* Which of the paths above this build compiled (for the log and the tests). */
const char *q8_0_path(void) { return PATH; }

/* q[m, k] and d[m, k / 32] of x[M, K] (K a multiple of 32), block by block: d = max |x| / 127,
 * q = round-half-even(x * (1 / d)), in float32 as written (tests/worker/test_q8_0.py repeats it in
 * torch). A block whose d is zero or subnormal (max |x| < 127 * FLT_MIN) gets codes 0: 1 / d
 * would overflow; one holding a NaN or an infinity gets codes 0 and d = NaN. */
void q8_0_quantize_rows(const float *x, int64_t M, int64_t K, int8_t *q, float *d) {
    for (int64_t i = 0; i < M * (K / QK); i++) {
        const float *xb = x + i * QK;
        float amax = 0.0f;
        int finite = 1;
        for (int j = 0; j < QK; j++) {
            amax = fmaxf(amax, fabsf(xb[j]));
            finite &= isfinite(xb[j]) != 0;
        }
        /* a NaN or infinity makes the block's scale NaN and its codes 0: the outputs it reaches
         * come out NaN, as a float matmul's would be non-finite, rather than silently finite */
        const float db = finite ? amax / 127.0f : NAN;
        const float id = finite && db >= FLT_MIN ? 1.0f / db : 0.0f;
        d[i] = db;
        for (int j = 0; j < QK; j++) q[i * QK + j] = id != 0.0f ? (int8_t)nearbyintf(xb[j] * id) : 0;
    }
}

#if defined(__AVX2__) && defined(__FMA__)
/* The int32 lanes of sum |w| * (x sign w) over a block: 4 products a lane. */
static inline __attribute__((always_inline)) __m256i block_dot(__m256i aw, __m256i xs) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
    return _mm256_dpbusd_epi32(_mm256_setzero_si256(), aw, xs);
#elif defined(__AVXVNNI__)
    return _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), aw, xs);
#else
    return _mm256_madd_epi16(_mm256_maddubs_epi16(aw, xs), _mm256_set1_epi16(1));
#endif
}

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* y[r * ldy] = sum_b wd[b] xd[r, b] (w_b . xq[r]_b) for r < R: one weight row (nb blocks) against
 * R rows of quantized x (row stride K codes, nb scales). Even and odd blocks go to two
 * accumulators, so that one row's FMAs do not wait on each other. */
static inline __attribute__((always_inline)) void dot_rows(const int8_t *w, const float *wd, const int8_t *xq,
                                                           const float *xd, int64_t nb, int64_t K, float *y,
                                                           int64_t ldy, const int R) {
    __m256 acc[CHUNK][2];
    for (int r = 0; r < R; r++) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        const __m256i wv = _mm256_loadu_si256((const __m256i *)(w + b * QK));
        const __m256i aw = _mm256_sign_epi8(wv, wv); /* |w|; -128 gives 0x80, 128 read unsigned */
        for (int r = 0; r < R; r++) {
            const __m256i xv = _mm256_loadu_si256((const __m256i *)(xq + r * K + b * QK));
            const __m256i p = block_dot(aw, _mm256_sign_epi8(xv, wv));
            const __m256 s = _mm256_set1_ps(wd[b] * xd[r * nb + b]);
            acc[r][b & 1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), s, acc[r][b & 1]);
        }
    }
    for (int r = 0; r < R; r++) y[r * ldy] = hsum(_mm256_add_ps(acc[r][0], acc[r][1]));
}
#else
static inline void dot_rows(const int8_t *w, const float *wd, const int8_t *xq, const float *xd, int64_t nb,
                            int64_t K, float *y, int64_t ldy, const int R) {
    for (int r = 0; r < R; r++) {
        float acc = 0.0f;
        for (int64_t b = 0; b < nb; b++) {
            int32_t p = 0;
            for (int j = 0; j < QK; j++) p += (int32_t)w[b * QK + j] * (int32_t)xq[r * K + b * QK + j];
            acc += (float)p * (wd[b] * xd[r * nb + b]);
        }
        y[r * ldy] = acc;
    }
}
#endif

#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
/* The AVX-512 path: two blocks a 64-byte vector. AVX-512 has no byte sign, so the unsigned operand
 * is x's codes offset by 128 (x + 128 in [1, 255]) and the offset's share is taken out in the
 * accumulator's start: sum (x + 128) w - 128 sum w = sum x w, exact in int32 (`vpdpbusd` does
 * not saturate). -128 sum w is computed once a weight block and serves every row, so a row's two
 * blocks cost a load, a `vpdpbusd`, a conversion, a multiply and an FMA: about a third of the
 * 256-bit path's instructions a product, which is what bounds it beyond one row.
 * xu: x's codes + 128 [R, K]; xde: each block's scale of x repeated 8 times [R, nb * 8]. */
static inline __attribute__((always_inline)) void dot_rows_wide(const int8_t *w, const float *wd, const uint8_t *xu,
                                                                const float *xde, int64_t nb, int64_t K, float *y,
                                                                int64_t ldy, const int R) {
    const __m512i pair = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
    const __m512i offset = _mm512_set1_epi8((char)0x80);
    __m512 acc[CHUNK][2];
    for (int r = 0; r < R; r++) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
    int64_t b = 0;
    for (; b + 2 <= nb; b += 2) {
        const __m512i wv = _mm512_loadu_si512((const void *)(w + b * QK));
        const __m512i start = _mm512_sub_epi32(_mm512_setzero_si512(),
                                               _mm512_dpbusd_epi32(_mm512_setzero_si512(), offset, wv));
        /* lanes 0-7 block b's scale, 8-15 block b + 1's */
        const __m512 ws = _mm512_permutexvar_ps(
            pair, _mm512_castps128_ps512(_mm_castsi128_ps(_mm_loadl_epi64((const __m128i *)(wd + b)))));
        for (int r = 0; r < R; r++) {
            const __m512i p = _mm512_dpbusd_epi32(start, _mm512_loadu_si512((const void *)(xu + r * K + b * QK)), wv);
            const __m512 xs = _mm512_loadu_ps(xde + (r * nb + b) * 8);
            acc[r][(b >> 1) & 1] = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(p), ws), xs, acc[r][(b >> 1) & 1]);
        }
    }
    for (int r = 0; r < R; r++) {
        float sum = _mm512_reduce_add_ps(_mm512_add_ps(acc[r][0], acc[r][1]));
        if (b < nb) { /* an odd last block, in 256 bits the same way */
            const __m256i wv = _mm256_loadu_si256((const __m256i *)(w + b * QK));
            const __m256i start = _mm256_sub_epi32(
                _mm256_setzero_si256(), _mm256_dpbusd_epi32(_mm256_setzero_si256(), _mm256_set1_epi8((char)0x80), wv));
            const __m256i p = _mm256_dpbusd_epi32(start, _mm256_loadu_si256((const __m256i *)(xu + r * K + b * QK)), wv);
            sum += hsum(_mm256_cvtepi32_ps(p)) * (wd[b] * xde[(r * nb + b) * 8]);
        }
        y[r * ldy] = sum;
    }
}
#define WIDE 1
#endif

/* y[M, N] = x[M, K] W^T, W as Q8_0 blocks (codes w [N, K] int8, scales wd [N, K / 32] float32),
 * all row-major and contiguous. Returns 0, -1 where the quantized x's buffers cannot be allocated,
 * -2 where K is no multiple of 32. */
int q8_0_linear(const float *x, int64_t M, int64_t K, const int8_t *w, const float *wd, int64_t N, float *y) {
    if (K % QK != 0) return -2;
    const int64_t nb = K / QK;
    int8_t *xq = malloc((size_t)(M * K));
    float *xd = malloc((size_t)(M * nb) * sizeof(float));
    if (xq == NULL || xd == NULL) {
        free(xq);
        free(xd);
        return -1;
    }
    q8_0_quantize_rows(x, M, K, xq, xd);
#ifdef WIDE
    float *xde = malloc((size_t)(M * nb) * 8 * sizeof(float));
    if (xde == NULL) {
        free(xq);
        free(xd);
        return -1;
    }
    for (int64_t i = 0; i < M * K; i++) xq[i] ^= (int8_t)0x80; /* the codes + 128, read unsigned */
    for (int64_t i = 0; i < M * nb * 8; i++) xde[i] = xd[i / 8];
#define DOT(R) dot_rows_wide(wn, wdn, (const uint8_t *)xm, xde + m * nb * 8, nb, K, ym, N, R)
#else
#define DOT(R) dot_rows(wn, wdn, xm, xdm, nb, K, ym, N, R)
#endif
#pragma omp parallel for schedule(static)
    for (int64_t n = 0; n < N; n++) {
        for (int64_t m = 0; m < M; m += CHUNK) {
            const int64_t rows = M - m < CHUNK ? M - m : CHUNK;
            const int8_t *wn = w + n * K, *xm = xq + m * K;
            const float *wdn = wd + n * nb, *xdm = xd + m * nb;
            float *ym = y + m * N + n;
            switch (rows) { /* a constant R each, so that the accumulators stay in registers */
            case 1: DOT(1); break;
            case 2: DOT(2); break;
            case 3: DOT(3); break;
            default: DOT(4); break;
            }
        }
    }
#ifdef WIDE
    free(xde);
#endif
    free(xq);
    free(xd);
    return 0;
}

/* ---- 4-bit weights against the same Q8_0 activation (Q4_0, Q4_1, and Q4_K's sub-blocks of 32) ----
 * A block of 32 weights is w = d q + m, q in [0, 16) (Q4_0: m = -8 d). Its dot product with a
 * quantized x block is d_w d_x (q . x_q) + m_w (d_x sum x_q): the codes are unsigned and x's
 * signed, just what `vpdpbusd` / `vpmaddubsw` take (no sign trick, no offset; pairs of products at
 * most 2 * 15 * 127, far from int16's limit). The m terms are one float dot product a row over its
 * blocks, with d_x sum x_q computed once a call (xs).
 *
 * The codes are packed two a byte by pairs of blocks, in an order of our own (q8_0.py: pack_q4,
 * done once at load) chosen so that unpacking is a load, a shift and a mask with no shuffle: a
 * pair's 32 bytes hold position j's code in byte j's low nibble and position j + 32's in its high
 * one, position p (0-63) being weight (p >> 3) * 4 + (p & 3) of the pair's block (p >> 2) & 1.
 * So the 4-byte groups alternate between the two blocks, int32 lane i of a `vpdpbusd` sums block
 * (i & 1)'s products, and the two blocks' scales are one 8-byte broadcast. x is put in the same
 * order once a call. A last, unpaired block is packed as ggml packs Q4_0 (byte j: weight j, and
 * weight j + 16 in the high nibble), and x's last block stays as it is. */

#define PAIR (2 * QK) /* positions a pair of blocks */

static inline int pair_block(int p) { return (p >> 2) & 1; }
static inline int pair_index(int p) { return (p >> 3) * 4 + (p & 3); }

/* xp[m] = x's codes in the pairs' order (above), [M, K]. */
static void permute_pairs(const int8_t *xq, int64_t M, int64_t K, int8_t *xp) {
    const int64_t pairs = K / PAIR;
    for (int64_t m = 0; m < M; m++) {
        const int8_t *row = xq + m * K;
        int8_t *out = xp + m * K;
        for (int64_t i = 0; i < pairs; i++)
            for (int p = 0; p < PAIR; p++) out[i * PAIR + p] = row[i * PAIR + pair_block(p) * QK + pair_index(p)];
        for (int64_t k = pairs * PAIR; k < K; k++) out[k] = row[k];
    }
}

/* sum_b wm[b] xs[b], b < nb */
static inline float min_terms(const float *wm, const float *xs, int64_t nb) {
    int64_t b = 0;
    float sum = 0.0f;
#if defined(__AVX2__) && defined(__FMA__)
    __m256 acc = _mm256_setzero_ps();
    for (; b + 8 <= nb; b += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(wm + b), _mm256_loadu_ps(xs + b), acc);
    sum = hsum(acc);
#endif
    for (; b < nb; b++) sum += wm[b] * xs[b];
    return sum;
}

/* The last, unpaired block b (ggml's order) of a row against x's: an exact integer. */
static inline int32_t last_block_dot(const uint8_t *w, const int8_t *x) {
    int32_t p = 0;
    for (int j = 0; j < QK / 2; j++) p += (int32_t)(w[j] & 0x0F) * x[j] + (int32_t)(w[j] >> 4) * x[j + QK / 2];
    return p;
}

/* Two adjacent floats as one 8-byte value, to broadcast: lanes then alternate between them. */
static inline double two_floats(const float *f) {
    double d;
    memcpy(&d, f, sizeof d);
    return d;
}

#if defined(__AVX2__) && defined(__FMA__)
/* The int32 lanes of lo . x0 + hi . x1 (lo, hi unsigned codes, x signed). */
static inline __attribute__((always_inline)) __m256i pair_dot(__m256i lo, __m256i hi, __m256i x0, __m256i x1) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
    return _mm256_dpbusd_epi32(_mm256_dpbusd_epi32(_mm256_setzero_si256(), lo, x0), hi, x1);
#elif defined(__AVXVNNI__)
    return _mm256_dpbusd_avx_epi32(_mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), lo, x0), hi, x1);
#else
    const __m256i ones = _mm256_set1_epi16(1);
    return _mm256_add_epi32(_mm256_madd_epi16(_mm256_maddubs_epi16(lo, x0), ones),
                            _mm256_madd_epi16(_mm256_maddubs_epi16(hi, x1), ones));
#endif
}
#endif

/* y[r * ldy] = sum_b wd[b] xd[r, b] (q_b . xq[r]_b) + wm[b] xs[r, b] for r < R (xp: x's codes in
 * the pairs' order, row stride K; xd, xs: row stride nb). */
static inline __attribute__((always_inline)) void q4_rows(const uint8_t *w, const float *wd, const float *wm,
                                                          const int8_t *xp, const float *xd, const float *xs,
                                                          int64_t nb, int64_t K, float *y, int64_t ldy, const int R) {
    const int64_t paired = nb & ~(int64_t)1;
    float sum[CHUNK];
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
    /* the 32 bytes in both halves; the high half shifted by 4: low nibbles, then high nibbles */
    const __m512i shift = _mm512_set_epi64(4, 4, 4, 4, 0, 0, 0, 0), mask = _mm512_set1_epi8(0x0F);
    __m512 acc[CHUNK];
    for (int r = 0; r < R; r++) acc[r] = _mm512_setzero_ps();
    for (int64_t b = 0; b < paired; b += 2) {
        const __m512i v = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)(w + b * 16)));
        const __m512i q = _mm512_and_si512(_mm512_srlv_epi64(v, shift), mask);
        const __m512 ws = _mm512_castpd_ps(_mm512_set1_pd(two_floats(wd + b)));
        for (int r = 0; r < R; r++) {
            const __m512i p = _mm512_dpbusd_epi32(_mm512_setzero_si512(), q,
                                                  _mm512_loadu_si512((const void *)(xp + r * K + b * QK)));
            const __m512 xs2 = _mm512_castpd_ps(_mm512_set1_pd(two_floats(xd + r * nb + b)));
            acc[r] = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(p), ws), xs2, acc[r]);
        }
    }
    for (int r = 0; r < R; r++) sum[r] = _mm512_reduce_add_ps(acc[r]);
#elif defined(__AVX2__) && defined(__FMA__)
    const __m256i mask = _mm256_set1_epi8(0x0F);
    __m256 acc[CHUNK];
    for (int r = 0; r < R; r++) acc[r] = _mm256_setzero_ps();
    for (int64_t b = 0; b < paired; b += 2) {
        const __m256i v = _mm256_loadu_si256((const __m256i *)(w + b * 16));
        const __m256i lo = _mm256_and_si256(v, mask), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), mask);
        const __m256 ws = _mm256_castpd_ps(_mm256_set1_pd(two_floats(wd + b)));
        for (int r = 0; r < R; r++) {
            const int8_t *x = xp + r * K + b * QK;
            const __m256i p = pair_dot(lo, hi, _mm256_loadu_si256((const __m256i *)x),
                                       _mm256_loadu_si256((const __m256i *)(x + 32)));
            const __m256 xs2 = _mm256_castpd_ps(_mm256_set1_pd(two_floats(xd + r * nb + b)));
            acc[r] = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(p), ws), xs2, acc[r]);
        }
    }
    for (int r = 0; r < R; r++) sum[r] = hsum(acc[r]);
#else
    for (int r = 0; r < R; r++) {
        sum[r] = 0.0f;
        for (int64_t b = 0; b < paired; b += 2) {
            int32_t dot[2] = {0, 0};
            for (int p = 0; p < PAIR; p++) {
                const uint8_t byte = w[b * 16 + (p & 31)];
                dot[pair_block(p)] += (int32_t)(p < 32 ? byte & 0x0F : byte >> 4) * xp[r * K + b * QK + p];
            }
            sum[r] += (float)dot[0] * (wd[b] * xd[r * nb + b]) + (float)dot[1] * (wd[b + 1] * xd[r * nb + b + 1]);
        }
    }
#endif
    for (int r = 0; r < R; r++) {
        if (paired < nb) /* the last, unpaired block */
            sum[r] += (float)last_block_dot(w + paired * 16, xp + r * K + paired * QK) * (wd[paired] * xd[r * nb + paired]);
        y[r * ldy] = sum[r] + min_terms(wm, xs + r * nb, nb);
    }
}

/* y[M, N] = x[M, K] W^T, W as 4-bit blocks: codes w [N, K / 2] (packed as above), scales wd and
 * minimums wm [N, K / 32] float32 (w = wd q + wm). Returns 0, -1 where the quantized x's buffers
 * cannot be allocated, -2 where K is no multiple of 32. */
int q4_linear(const float *x, int64_t M, int64_t K, const uint8_t *w, const float *wd, const float *wm, int64_t N,
              float *y) {
    if (K % QK != 0) return -2;
    const int64_t nb = K / QK;
    int8_t *xq = malloc((size_t)(M * K)), *xp = malloc((size_t)(M * K));
    float *xd = malloc((size_t)(M * nb) * sizeof(float)), *xs = malloc((size_t)(M * nb) * sizeof(float));
    if (xq == NULL || xp == NULL || xd == NULL || xs == NULL) {
        free(xq);
        free(xp);
        free(xd);
        free(xs);
        return -1;
    }
    q8_0_quantize_rows(x, M, K, xq, xd);
    for (int64_t i = 0; i < M * nb; i++) {
        int32_t total = 0;
        for (int j = 0; j < QK; j++) total += xq[i * QK + j];
        xs[i] = xd[i] * (float)total;
    }
    permute_pairs(xq, M, K, xp);
#pragma omp parallel for schedule(static)
    for (int64_t n = 0; n < N; n++) {
        for (int64_t m = 0; m < M; m += CHUNK) {
            const int64_t rows = M - m < CHUNK ? M - m : CHUNK;
            const uint8_t *wn = w + n * (K / 2);
            const float *wdn = wd + n * nb, *wmn = wm + n * nb, *xdm = xd + m * nb, *xsm = xs + m * nb;
            const int8_t *xm = xp + m * K;
            float *ym = y + m * N + n;
            switch (rows) {
            case 1: q4_rows(wn, wdn, wmn, xm, xdm, xsm, nb, K, ym, N, 1); break;
            case 2: q4_rows(wn, wdn, wmn, xm, xdm, xsm, nb, K, ym, N, 2); break;
            case 3: q4_rows(wn, wdn, wmn, xm, xdm, xsm, nb, K, ym, N, 3); break;
            default: q4_rows(wn, wdn, wmn, xm, xdm, xsm, nb, K, ym, N, 4); break;
            }
        }
    }
    free(xq);
    free(xp);
    free(xd);
    free(xs);
    return 0;
}
