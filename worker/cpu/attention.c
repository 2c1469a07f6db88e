/* Attention straight from the paged KV cache, for the CPU serving path: decodes and prefill chunks.
 *
 * The torch path gathers every decode's blocks into a padded copy and then runs SDPA on it: on a
 * CPU that reads the context three times and writes it once, and SDPA's kernel is built for long
 * queries, not for the one token of a decode. Here each (sequence, kv head) pair reads its K and V
 * rows once, where they sit, for all the query heads of its group (GQA), in three passes over a
 * small score buffer that stays in L1/L2: scores, softmax (libmvec's vector expf), weighted sum of
 * V. fp32 throughout, or with bfloat16 q, out and cache (their `bf16` argument): each block of K
 * or V is converted to float32 once per task into a small buffer that the same loops then read, a
 * task's queries are converted on the way in and its outputs rounded to bfloat16 (to nearest, ties
 * to even, as torch rounds) on the way out; the arithmetic is the float32 path's.
 *
 * A prefill chunk is the same computation for each of its query positions, causally: a task takes
 * up to QUERY_TILE consecutive positions of one sequence, so every block it reads serves all of them
 * from L1. Against one SDPA call per sequence (torch's flash kernel) on 2 Zen 3 cores, SmolLM2's
 * heads: 1.8-2.8x faster at 64-token prompts, 1.5x at 290, 1.4x at 512, level at 768, slower beyond
 * (the score buffer outgrows L2), where worker/attention.py keeps SDPA.
 *
 * Layout (worker/attention.py): cache [num_blocks, block_size, kv_heads, head_dim], head_dim
 * contiguous; query and output [rows, heads, head_dim], contiguous.
 * Threads: OpenMP, the same runtime (and thread count) as torch's, over the tasks.
 * With AVX2 and a head_dim that is a multiple of 32 the two hot loops use intrinsics: scores eight
 * rows at a time (plain loops wait on one horizontal sum per score), the V sums in registers over
 * eight rows (plain loops load and store them for every row); other shapes take the plain loops.
 */
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "bf16.h" /* bf16_to_float, float_to_bf16 */
/* glibc's libmvec has a vector expf (within 1 ulp, reached through -lm); glibc declares it only
 * under -ffast-math, which this build avoids (see cpu/attention.py), so the softmax declares it. */
#pragma omp declare simd notinbranch
float expf(float);

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define HAVE_AVX2 1
#endif

/* One sequence, a run of its kv heads [kv_head, kv_head + num_kv) with their query heads (num_kv *
 * group of them, consecutive in q and out), and a run of `queries` consecutive query positions from
 * `first_pos` (a decode: one, its last position): query p sees keys [lo_p, first_pos + p], lo_p = 0,
 * or with a sliding window W, max(0, first_pos + p - W + 1) (Hugging Face's: W keys, itself
 * included). The task reads keys [base, len), len = first_pos + queries, base the start of the block
 * that holds lo_0: blocks wholly before it may have been released (their table entries then name a
 * block that is not this sequence's). Scores are kept per row for keys [base, len), `span` of them.
 * All heads of a row sit side by side in the cache, so a task that takes them all reads each block
 * as one contiguous span; its query positions share every block it reads, which stays in L1 while
 * they use it. softcap > 0: scores become softcap * tanh(score / softcap) (Gemma 2). */
typedef struct {
    const void *k_cache, *v_cache; /* float, or uint16_t holding bfloat16 where bf16 is set */
    const int32_t *table;
    int64_t len, first_pos, q_stride; /* q_stride: floats from one query position to the next in q and out */
    int group, block_size, kv_heads, head_dim, kv_head, num_kv, queries;
    int64_t window, base, span; /* window 0: none */
    float softcap;
    int bf16;           /* the cache holds bfloat16: blocks are converted into `stage` */
    float *stage;       /* bf16: one block of the task's kv heads, float32 [block_size, num_kv, head_dim] */
    int64_t row_stride; /* floats from one row of a block to the next as the loops read it */
} Context;

/* The first key query p of the task sees. */
static inline int64_t first_key(const Context *c, int p) {
    int64_t lo = c->first_pos + p - c->window + 1;
    return c->window > 0 && lo > 0 ? lo : 0;
}

/* How many of block i's rows (`n` of them, from position `first`) query p sees: 0 to n. */
static inline int64_t visible_rows(const Context *c, int p, int64_t first, int64_t n) {
    int64_t seen = c->first_pos + p + 1 - first;
    return seen < 0 ? 0 : seen < n ? seen : n;
}

/* Walks the context block by block (no division per row): block i holds positions
 * [i * block_size, ...); the task's first row of it is this many elements into the cache, the next
 * kv_heads * head_dim after it. */
static inline int64_t block_offset(const Context *c, int64_t i) {
    return ((int64_t)c->table[i] * c->block_size * c->kv_heads + c->kv_head) * (int64_t)c->head_dim;
}

static inline int64_t rows_in_block(const Context *c, int64_t i) {
    int64_t left = c->len - i * c->block_size;
    return left < c->block_size ? left : c->block_size;
}

/* Brings block i's rows (the task's kv heads) into L1 with plain loads, back to back. The
 * arithmetic reads a block's rows in an order (eight rows of one head, then the next head) that the
 * hardware prefetcher does not follow, and on a miss it waits with little else in flight; loads
 * with nothing between them keep many misses in flight at once. Measured on 2 Zen 3 cores, batch
 * 64, 30 layers: the kernel went from 7-9 to 10-14 GB/s of K/V (`pagedserve bench kernels`,
 * docs/PERFORMANCE.md). Block i + 1 is meanwhile asked for by `Ahead`. */
static inline void stage_block(const Context *c, const float *base, int64_t i) {
#ifdef HAVE_AVX2
    int64_t stride = (int64_t)c->kv_heads * c->head_dim, span = (int64_t)c->num_kv * c->head_dim;
    __m256 a0 = _mm256_setzero_ps(), a1 = a0;
    for (int64_t o = 0; o < rows_in_block(c, i); o++)
        for (int64_t f = 0; f + 32 <= span; f += 32) { /* one load per 64-byte line */
            a0 = _mm256_add_ps(a0, _mm256_loadu_ps(base + o * stride + f));
            a1 = _mm256_add_ps(a1, _mm256_loadu_ps(base + o * stride + f + 16));
        }
    __asm__ volatile("" ::"x"(a0), "x"(a1)); /* the loads are the point: keep them */
#else
    (void)c, (void)base, (void)i;
#endif
}

/* Block i's rows (the task's kv heads) as float32, c->row_stride floats apart: a float32 cache's
 * own (brought into L1 first where `stage`), or a bfloat16 cache's converted into c->stage, which
 * reads them once, in order, and leaves them in L1 the same way. */
static inline const float *block_rows(const Context *c, const void *cache, int64_t i, int stage) {
    if (!c->bf16) {
        const float *base = (const float *)cache + block_offset(c, i);
        if (stage) stage_block(c, base, i);
        return base;
    }
    const uint16_t *src = (const uint16_t *)cache + block_offset(c, i);
    int64_t stride = (int64_t)c->kv_heads * c->head_dim, n = rows_in_block(c, i);
    for (int64_t o = 0; o < n; o++) bf16_to_float(c->stage + o * c->row_stride, src + o * stride, c->row_stride);
    return c->stage;
}

/* The lines of block i + 1 (the task's kv heads), asked for AHEAD_LINES at a time between the
 * steps that compute block i, and the rest when it is done. Asked for all at once (192 prefetches
 * for SmolLM2's 16-row blocks), they filled the core's queue of misses and stalled it: a quarter
 * of the kernel's cycles sat on them. Spread out: 12.6 -> 14.3 GB/s with consecutive blocks,
 * 10.0 -> 11.3 scattered (2 Zen 3 cores, batch 64, context 304, 8 layers' caches in turn; 3 to 12
 * lines a step measured, 8 best). */
#define AHEAD_LINES 8
typedef struct {
    const char *base;
    int64_t stride, span, rows, row, f; /* bytes, but rows and row */
} Ahead;

static inline Ahead ahead_of(const Context *c, const void *cache, int64_t i) {
    int64_t size = c->bf16 ? 2 : 4;
    Ahead a = {0, (int64_t)c->kv_heads * c->head_dim * size, (int64_t)c->num_kv * c->head_dim * size, 0, 0, 0};
    if ((i + 1) * c->block_size < c->len) {
        a.base = (const char *)cache + block_offset(c, i + 1) * size;
        a.rows = rows_in_block(c, i + 1);
    }
    return a;
}

static inline void ahead_fetch(Ahead *a, int lines) {
    for (int l = 0; l < lines && a->row < a->rows; l++) {
        __builtin_prefetch(a->base + a->row * a->stride + a->f);
        a->f += 64;
        if (a->f >= a->span) {
            a->f = 0;
            a->row++;
        }
    }
}

#define FOR_EACH_ROW(c, cache, t, ptr, body)                                         \
    do {                                                                             \
        int64_t stride_ = (c)->row_stride;                                           \
        int64_t num_blocks_ = ((c)->len + (c)->block_size - 1) / (c)->block_size;    \
        for (int64_t i_ = (c)->base / (c)->block_size; i_ < num_blocks_; i_++) {    \
            const float *base_ = block_rows((c), (cache), i_, 0);                    \
            int64_t n_ = rows_in_block((c), i_);                                     \
            for (int64_t o_ = 0; o_ < n_; o_++) {                                    \
                int64_t t = i_ * (c)->block_size + o_ - (c)->base;                   \
                const float *ptr = base_ + o_ * stride_;                             \
                body                                                                 \
            }                                                                        \
        }                                                                            \
    } while (0)

static inline float dot_plain(const float *a, const float *b, int d) {
    float s = 0.0f;
#pragma omp simd reduction(+ : s)
    for (int i = 0; i < d; i++) s += a[i] * b[i];
    return s;
}

static inline void axpy_plain(float *y, float a, const float *x, int d) {
#pragma omp simd
    for (int i = 0; i < d; i++) y[i] += a * x[i];
}

/* scores[r * span + t - base] = scale * q_r . k_t for the task's query heads r, plain loops. */
static void scores_plain(const Context *c, const float *q, float scale, float *scores) {
    int d = c->head_dim, rows = c->num_kv * c->group;
    FOR_EACH_ROW(c, c->k_cache, t, k, {
        for (int r = 0; r < rows; r++) scores[r * c->span + t] = dot_plain(q + r * d, k + (r / c->group) * d, d) * scale;
    });
}

/* out_r = sum_t p[r * span + t - base] v_t, plain loops. */
static void weighted_v_plain(const Context *c, const float *p, float *out) {
    int d = c->head_dim, rows = c->num_kv * c->group;
    memset(out, 0, sizeof(float) * rows * d);
    FOR_EACH_ROW(c, c->v_cache, t, v, {
        for (int r = 0; r < rows; r++) axpy_plain(out + r * d, p[r * c->span + t], v + (r / c->group) * d, d);
    });
}

#ifdef HAVE_AVX2
static inline float hsum(__m256 v) {
    __m128 x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    x = _mm_add_ps(x, _mm_movehl_ps(x, x));
    return _mm_cvtss_f32(_mm_add_ss(x, _mm_movehdup_ps(x)));
}

static inline float dot_avx2(const float *a, const float *b, int d) {
    __m256 acc = _mm256_setzero_ps();
    for (int i = 0; i < d; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
    return hsum(acc);
}

/* Lane j of the result is the sum of a_j's eight lanes: eight dot products finished with six
 * hadds and two permutes, where eight separate horizontal sums would take ~40 shuffles. */
static inline __m256 sum_lanes8(__m256 a0, __m256 a1, __m256 a2, __m256 a3, __m256 a4, __m256 a5, __m256 a6,
                                __m256 a7) {
    __m256 s0123 = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
    __m256 s4567 = _mm256_hadd_ps(_mm256_hadd_ps(a4, a5), _mm256_hadd_ps(a6, a7));
    return _mm256_add_ps(_mm256_permute2f128_ps(s0123, s4567, 0x20), _mm256_permute2f128_ps(s0123, s4567, 0x31));
}

/* Scores of eight consecutive rows (k, k + stride, ...) against one query head: each q chunk is
 * loaded once for the eight rows, eight independent accumulators keep the FMA units busy. */
static inline __m256 scores8(const float *q, const float *k, int64_t stride, int d) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0;
    for (int f = 0; f < d; f += 8) {
        __m256 qv = _mm256_loadu_ps(q + f);
        a0 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k + f), a0);
        a1 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k + stride + f), a1);
        a2 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k + 2 * stride + f), a2);
        a3 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k + 3 * stride + f), a3);
        a4 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k + 4 * stride + f), a4);
        a5 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k + 5 * stride + f), a5);
        a6 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k + 6 * stride + f), a6);
        a7 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k + 7 * stride + f), a7);
    }
    return sum_lanes8(a0, a1, a2, a3, a4, a5, a6, a7);
}

/* Block by block (each staged into L1 first), eight rows at a time, for every query position and
 * head of the task: scores[(p * heads + r) * span + t - base]. */
static void scores_avx2(const Context *c, const float *q, float scale, float *scores) {
    int d = c->head_dim, rows = c->num_kv * c->group;
    int64_t stride = c->row_stride;
    int64_t num_blocks = (c->len + c->block_size - 1) / c->block_size;
    __m256 scale8 = _mm256_set1_ps(scale);
    for (int64_t i = c->base / c->block_size; i < num_blocks; i++) {
        const float *base = block_rows(c, c->k_cache, i, 1);
        int64_t n = rows_in_block(c, i), first = i * c->block_size;
        Ahead next = ahead_of(c, c->k_cache, i);
        for (int p = 0; p < c->queries; p++) {
            int64_t seen = visible_rows(c, p, first, n);
            const float *qp = q + p * c->q_stride;
            float *sp = scores + (int64_t)p * rows * c->span + first - c->base;
            for (int64_t o = 0; o < seen; o += 8) {
                for (int r = 0; r < rows; r++) {
                    ahead_fetch(&next, AHEAD_LINES);
                    const float *k = base + o * stride + (r / c->group) * d, *qr = qp + r * d;
                    float *s = sp + r * c->span + o;
                    if (o + 8 <= seen) _mm256_storeu_ps(s, _mm256_mul_ps(scores8(qr, k, stride, d), scale8));
                    else for (int64_t t = 0; t < seen - o; t++) s[t] = dot_avx2(qr, k + t * stride, d) * scale;
                }
            }
        }
        ahead_fetch(&next, 1 << 30);
    }
}

/* out[r] += sum over n rows t of p[r][t] * v_t[chunk], for `nr` (1 to 3) query heads of one kv
 * head and one 32-float chunk of head_dim: 4 * nr accumulators stay in registers over the rows,
 * so the sums cost one load and one store per n rows instead of one per row. */
static inline __attribute__((always_inline)) void weighted_chunk(const float *v, int64_t stride, int64_t n,
                                                                 const float *p, int64_t len, float *out, int d,
                                                                 const int nr) {
    __m256 acc[3][4];
    for (int r = 0; r < nr; r++)
        for (int j = 0; j < 4; j++) acc[r][j] = _mm256_loadu_ps(out + r * d + 8 * j);
    for (int64_t t = 0; t < n; t++) {
        const float *row = v + t * stride;
        for (int r = 0; r < nr; r++) {
            __m256 w = _mm256_broadcast_ss(p + r * len + t);
            for (int j = 0; j < 4; j++) acc[r][j] = _mm256_fmadd_ps(w, _mm256_loadu_ps(row + 8 * j), acc[r][j]);
        }
    }
    for (int r = 0; r < nr; r++)
        for (int j = 0; j < 4; j++) _mm256_storeu_ps(out + r * d + 8 * j, acc[r][j]);
}

/* Block by block (each block's V read from memory once, then from L1), every query position and
 * head of the task, in 32-float chunks of head_dim. */
static void weighted_v_avx2(const Context *c, const float *p, float *out) {
    int d = c->head_dim, rows = c->num_kv * c->group;
    int64_t stride = c->row_stride;
    int64_t num_blocks = (c->len + c->block_size - 1) / c->block_size;
    for (int q = 0; q < c->queries; q++) memset(out + q * c->q_stride, 0, sizeof(float) * rows * d);
    for (int64_t i = c->base / c->block_size; i < num_blocks; i++) {
        const float *base = block_rows(c, c->v_cache, i, 1);
        int64_t n = rows_in_block(c, i), first = i * c->block_size;
        Ahead next = ahead_of(c, c->v_cache, i);
        for (int q = 0; q < c->queries; q++) {
            int64_t seen = visible_rows(c, q, first, n);
            const float *pq = p + (int64_t)q * rows * c->span + first - c->base;
            for (int64_t o = 0; o < seen; o += 8) { /* eight rows at a time, as in scores_avx2 */
                int64_t m = seen - o < 8 ? seen - o : 8;
                int nr;
                for (int r = 0; r < rows; r += nr) {
                    /* Up to three heads at a time, never across two kv heads (they read different rows). */
                    int in_group = c->group - r % c->group;
                    nr = in_group < 3 ? in_group : 3;
                    const float *v = base + o * stride + (r / c->group) * d, *pr = pq + r * c->span + o;
                    for (int f = 0; f < d; f += 32) {
                        ahead_fetch(&next, AHEAD_LINES);
                        float *acc = out + q * c->q_stride + r * d + f;
                        if (nr == 3) weighted_chunk(v + f, stride, m, pr, c->span, acc, d, 3);
                        else if (nr == 2) weighted_chunk(v + f, stride, m, pr, c->span, acc, d, 2);
                        else weighted_chunk(v + f, stride, m, pr, c->span, acc, d, 1);
                    }
                }
            }
        }
        ahead_fetch(&next, 1 << 30);
    }
}
#endif

/* Row g holds `end` scores, `stride` floats after row g - 1; the first `skip` of them are outside the
 * window and get weight 0. softcap > 0 caps the others first: softcap * tanh(s / softcap). */
static void softmax_rows(float *scores, int rows, int64_t skip, int64_t end, int64_t stride, float softcap) {
    int64_t len = end - skip;
    for (int g = 0; g < rows; g++) {
        float *s = scores + g * stride;
        memset(s, 0, sizeof(float) * skip);
        s += skip;
        if (softcap > 0.0f)
            for (int64_t t = 0; t < len; t++) s[t] = softcap * tanhf(s[t] / softcap);
        float top = s[0], total = 0.0f;
#pragma omp simd reduction(max : top)
        for (int64_t t = 1; t < len; t++) top = s[t] > top ? s[t] : top;
#pragma omp simd reduction(+ : total)
        for (int64_t t = 0; t < len; t++) {
            s[t] = expf(s[t] - top);
            total += s[t];
        }
        float inv = 1.0f / total;
#pragma omp simd
        for (int64_t t = 0; t < len; t++) s[t] *= inv;
    }
}

static void one_task(const Context *c, const float *q, float *out, float scale, float *scores) {
    int rows = c->num_kv * c->group;
#ifdef HAVE_AVX2
    if (c->head_dim % 32 == 0) {
        scores_avx2(c, q, scale, scores);
        for (int p = 0; p < c->queries; p++)
            softmax_rows(scores + (int64_t)p * rows * c->span, rows, first_key(c, p) - c->base,
                         c->first_pos + p + 1 - c->base, c->span, c->softcap);
        weighted_v_avx2(c, scores, out);
        return;
    }
#endif
    for (int p = 0; p < c->queries; p++) { /* one query position at a time, as a decode */
        Context one = *c;
        one.len = c->first_pos + p + 1;
        one.first_pos = one.len - 1;
        one.queries = 1;
        one.span = one.len - one.base;
        scores_plain(&one, q + p * c->q_stride, scale, scores);
        softmax_rows(scores, rows, first_key(c, p) - c->base, one.span, one.span, c->softcap);
        weighted_v_plain(&one, scores, out + p * c->q_stride);
    }
}

#ifndef QUERY_TILE
#define QUERY_TILE 8 /* query positions per task in a prefill */
#endif

/* Per-thread buffers: the scores, and with a bfloat16 cache one block of it in float32 and the
 * task's queries and outputs in float32 (tile_floats each). */
typedef struct {
    float *scores, *stage, *q, *out;
} Buffers;

/* One task's queries (`count` positions of `rows` heads, q_stride elements apart, from `q` and
 * `out`): float32 straight through; bfloat16 converted to float32 on the way in and rounded back
 * on the way out, the Context then reading its q and out from the buffers. */
static void run_task(Context *c, const void *q, void *out, int64_t count, float scale, const Buffers *b) {
    if (!c->bf16) {
        one_task(c, q, out, scale, b->scores);
        return;
    }
    int64_t width = (int64_t)c->num_kv * c->group * c->head_dim, q_stride = c->q_stride;
    for (int64_t p = 0; p < count; p++) bf16_to_float(b->q + p * width, (const uint16_t *)q + p * q_stride, width);
    c->stage = b->stage;
    c->row_stride = (int64_t)c->num_kv * c->head_dim;
    c->q_stride = width;
    one_task(c, b->q, b->out, scale, b->scores);
    for (int64_t p = 0; p < count; p++) float_to_bf16((uint16_t *)out + p * q_stride, b->out + p * width, width);
}

/* The attention of every sequence's queries: sequence b has the query_lens[b] rows of q and out
 * from row query_start[b] (both NULL: row b alone, a decode), the last of its seq_lens[b] positions.
 * q, out and the caches hold float32, or bfloat16 (uint16_t) where bf16 is set.
 * Tasks: runs of up to QUERY_TILE query positions of one sequence, each over every kv head when
 * there are enough of them to keep every thread busy, else over one. Returns 0, or -1 when memory
 * runs out (out then incomplete). */
static int attend(const void *q, const void *k_cache, const void *v_cache, const int32_t *block_tables,
                  int64_t table_stride, const int32_t *seq_lens, const int32_t *query_start,
                  const int32_t *query_lens, void *out, int num_seqs, int heads, int kv_heads, int head_dim,
                  int block_size, float scale, int64_t window, float softcap, int bf16) {
    int group = heads / kv_heads, widest = 1;
    int64_t longest = 1;
    int64_t *tile_start = malloc(sizeof(int64_t) * (num_seqs + 1)); /* tiles before sequence b */
    if (!tile_start) return -1;
    int failed = 0;
    tile_start[0] = 0;
    for (int b = 0; b < num_seqs; b++) {
        int64_t q_len = query_lens ? query_lens[b] : 1;
        int tile = q_len < QUERY_TILE ? (int)q_len : QUERY_TILE; /* positions in its first task */
        tile_start[b + 1] = tile_start[b] + (q_len + QUERY_TILE - 1) / QUERY_TILE;
        longest = seq_lens[b] > longest ? seq_lens[b] : longest;
        widest = tile > widest ? tile : widest;
    }
    int64_t tiles = tile_start[num_seqs];
    /* A task's scores span its window (from the start of a block) and its own positions at most. */
    if (window > 0 && window + widest + block_size < longest) longest = window + widest + block_size;
    int per_task = tiles >= 2 * omp_get_max_threads() ? kv_heads : 1;
    int64_t splits = kv_heads / per_task, tasks = tiles * splits, q_stride = (int64_t)heads * head_dim;
    int64_t score_floats = (int64_t)widest * per_task * group * longest;
    int64_t stage_floats = (int64_t)block_size * per_task * head_dim;
    int64_t tile_floats = (int64_t)widest * per_task * group * head_dim;
#pragma omp parallel
    {
        Buffers buf = {malloc(sizeof(float) * (score_floats + (bf16 ? stage_floats + 2 * tile_floats : 0))), 0, 0, 0};
        if (buf.scores && bf16) {
            buf.stage = buf.scores + score_floats;
            buf.q = buf.stage + stage_floats;
            buf.out = buf.q + tile_floats;
        }
#pragma omp for schedule(dynamic, 1)
        for (int64_t task = 0; task < tasks; task++) {
            int64_t tile = task / splits;
            int h = (int)(task % splits) * per_task, lo = 0, hi = num_seqs - 1;
            while (lo < hi) { /* the sequence b with tile_start[b] <= tile < tile_start[b + 1] */
                int mid = (lo + hi + 1) / 2;
                if (tile_start[mid] <= tile) lo = mid;
                else hi = mid - 1;
            }
            int b = lo;
            int64_t row0 = query_start ? query_start[b] : b, q_len = query_lens ? query_lens[b] : 1;
            int64_t first = (tile - tile_start[b]) * QUERY_TILE, count = q_len - first;
            count = count < QUERY_TILE ? count : QUERY_TILE;
            int64_t first_pos = seq_lens[b] - q_len + first;
            Context c = {k_cache, v_cache, block_tables + b * table_stride, first_pos + count, first_pos, q_stride,
                         group, block_size, kv_heads, head_dim, h, per_task, (int)count, window, 0, 0, softcap,
                         bf16, 0, (int64_t)kv_heads * head_dim};
            c.base = first_key(&c, 0) / block_size * block_size;
            c.span = c.len - c.base;
            int64_t offset = (row0 + first) * q_stride + (int64_t)h * group * head_dim, size = bf16 ? 2 : 4;
            if (buf.scores)
                run_task(&c, (const char *)q + offset * size, (char *)out + offset * size, count, scale, &buf);
            else {
#pragma omp atomic write
                failed = 1;
            }
        }
        free(buf.scores);
    }
    free(tile_start);
    return failed ? -1 : 0;
}

/* out[b, h, :] = softmax(q[b, h, :] . K[b, :seq_lens[b]]) V[b, :seq_lens[b]] for every decode b;
 * q, out and the caches float32, or bfloat16 where bf16 is nonzero. */
int paged_decode_attention(const void *q, const void *k_cache, const void *v_cache, const int32_t *block_tables,
                           int64_t table_stride, const int32_t *seq_lens, void *out, int num_seqs, int heads,
                           int kv_heads, int head_dim, int block_size, float scale, int64_t window, float softcap,
                           int bf16) {
    return attend(q, k_cache, v_cache, block_tables, table_stride, seq_lens, 0, 0, out, num_seqs, heads, kv_heads,
                  head_dim, block_size, scale, window, softcap, bf16);
}

/* Causal attention of prefill chunks: sequence b's query_lens[b] rows of q and out ([rows, heads,
 * head_dim]) from row query_start[b] are its last positions, each seeing the cache (this step's K/V
 * written) up to itself. Element types as in paged_decode_attention. */
int paged_prefill_attention(const void *q, const void *k_cache, const void *v_cache, const int32_t *block_tables,
                            int64_t table_stride, const int32_t *seq_lens, const int32_t *query_start,
                            const int32_t *query_lens, void *out, int num_seqs, int heads, int kv_heads,
                            int head_dim, int block_size, float scale, int64_t window, float softcap, int bf16) {
    return attend(q, k_cache, v_cache, block_tables, table_stride, seq_lens, query_start, query_lens, out, num_seqs,
                  heads, kv_heads, head_dim, block_size, scale, window, softcap, bf16);
}
