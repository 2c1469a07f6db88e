/* Decode attention straight from the paged KV cache, for the CPU serving path.
 *
 * The torch path gathers every decode's blocks into a padded copy and then runs SDPA on it: on a
 * CPU that reads the context three times and writes it once, and SDPA's kernel is built for long
 * queries, not for the one token of a decode. Here each (sequence, kv head) pair reads its K and V
 * rows once, where they sit, for all the query heads of its group (GQA), in three passes over a
 * small score buffer that stays in L1/L2: scores, softmax, weighted sum of V. fp32 throughout.
 *
 * Layout (worker/attention.py): cache [num_blocks, block_size, kv_heads, head_dim], head_dim
 * contiguous; query and output [num_seqs, heads, head_dim], contiguous.
 * Threads: OpenMP, the same runtime (and thread count) as torch's, over (sequence, kv head).
 * With AVX2 and a head_dim that is a multiple of 64 the two hot loops use intrinsics (plain loops
 * leave the CPU waiting on one horizontal sum per score); other shapes take the plain loops.
 */
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define HAVE_AVX2 1
#endif

/* One sequence and a run of its kv heads [kv_head, kv_head + num_kv), with their query heads
 * (num_kv * group of them, consecutive in q and out). All heads of a row sit side by side in the
 * cache, so a task that takes them all reads each block as one contiguous span. */
typedef struct {
    const float *k_cache, *v_cache;
    const int32_t *table;
    int64_t len;
    int group, block_size, kv_heads, head_dim, kv_head, num_kv;
} Context;

/* Walks the context block by block (no division per row): block i holds positions
 * [i * block_size, ...), its rows `stride` floats apart from `base`. */
static inline const float *block_base(const Context *c, const float *cache, int64_t i) {
    return cache + ((int64_t)c->table[i] * c->block_size * c->kv_heads + c->kv_head) * (int64_t)c->head_dim;
}

static inline int64_t rows_in_block(const Context *c, int64_t i) {
    int64_t left = c->len - i * c->block_size;
    return left < c->block_size ? left : c->block_size;
}

#define FOR_EACH_ROW(c, cache, t, ptr, body)                                         \
    do {                                                                             \
        int64_t stride_ = (int64_t)(c)->kv_heads * (c)->head_dim;                    \
        int64_t num_blocks_ = ((c)->len + (c)->block_size - 1) / (c)->block_size;    \
        for (int64_t i_ = 0; i_ < num_blocks_; i_++) {                               \
            const float *base_ = block_base((c), (cache), i_);                       \
            int64_t n_ = rows_in_block((c), i_);                                     \
            for (int64_t o_ = 0; o_ < n_; o_++) {                                    \
                int64_t t = i_ * (c)->block_size + o_;                               \
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

/* scores[r * len + t] = scale * q_r . k_t for the task's query heads r, plain loops. */
static void scores_plain(const Context *c, const float *q, float scale, float *scores) {
    int d = c->head_dim, rows = c->num_kv * c->group;
    FOR_EACH_ROW(c, c->k_cache, t, k, {
        for (int r = 0; r < rows; r++) scores[r * c->len + t] = dot_plain(q + r * d, k + (r / c->group) * d, d) * scale;
    });
}

/* out_r = sum_t p[r * len + t] v_t, plain loops. */
static void weighted_v_plain(const Context *c, const float *p, float *out) {
    int d = c->head_dim, rows = c->num_kv * c->group;
    memset(out, 0, sizeof(float) * rows * d);
    FOR_EACH_ROW(c, c->v_cache, t, v, {
        for (int r = 0; r < rows; r++) axpy_plain(out + r * d, p[r * c->len + t], v + (r / c->group) * d, d);
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

/* Four rows of a block at a time: each q chunk is loaded once for four rows, and four independent
 * accumulators keep the FMA units busy. */
static void scores_avx2(const Context *c, const float *q, float scale, float *scores) {
    int d = c->head_dim;
    int64_t stride = (int64_t)c->kv_heads * d;
    int64_t num_blocks = (c->len + c->block_size - 1) / c->block_size;
    for (int64_t i = 0; i < num_blocks; i++) {
        const float *base = block_base(c, c->k_cache, i);
        int64_t n = rows_in_block(c, i), first = i * c->block_size, o = 0;
        for (; o + 4 <= n; o += 4) {
            for (int r = 0; r < c->num_kv * c->group; r++) {
                const float *k0 = base + o * stride + (r / c->group) * d;
                const float *k1 = k0 + stride, *k2 = k1 + stride, *k3 = k2 + stride;
                const float *qg = q + r * d;
                __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
                __m256 a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
                for (int f = 0; f < d; f += 8) {
                    __m256 qv = _mm256_loadu_ps(qg + f);
                    a0 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k0 + f), a0);
                    a1 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k1 + f), a1);
                    a2 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k2 + f), a2);
                    a3 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k3 + f), a3);
                }
                float *s = scores + r * c->len + first + o;
                s[0] = hsum(a0) * scale;
                s[1] = hsum(a1) * scale;
                s[2] = hsum(a2) * scale;
                s[3] = hsum(a3) * scale;
            }
        }
        for (; o < n; o++)
            for (int r = 0; r < c->num_kv * c->group; r++)
                scores[r * c->len + first + o] = dot_avx2(q + r * d, base + o * stride + (r / c->group) * d, d) * scale;
    }
}

/* Row by row, every query head of the task at once, so V is read as it lies; the sums live in
 * `out` (a few KiB, in L1). */
static void weighted_v_avx2(const Context *c, const float *p, float *out) {
    int d = c->head_dim, rows = c->num_kv * c->group;
    memset(out, 0, sizeof(float) * rows * d);
    FOR_EACH_ROW(c, c->v_cache, t, v, {
        for (int r = 0; r < rows; r++) {
            const float *vr = v + (r / c->group) * d;
            float *o = out + r * d;
            __m256 w = _mm256_broadcast_ss(p + r * c->len + t);
            for (int f = 0; f < d; f += 8)
                _mm256_storeu_ps(o + f, _mm256_fmadd_ps(w, _mm256_loadu_ps(vr + f), _mm256_loadu_ps(o + f)));
        }
    });
}
#endif

static void softmax_rows(float *scores, int rows, int64_t len) {
    for (int g = 0; g < rows; g++) {
        float *s = scores + g * len;
        float top = s[0], total = 0.0f;
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

static void one_group(const Context *c, const float *q, float *out, float scale, float *scores) {
#ifdef HAVE_AVX2
    if (c->head_dim % 64 == 0) {
        scores_avx2(c, q, scale, scores);
        softmax_rows(scores, c->num_kv * c->group, c->len);
        weighted_v_avx2(c, scores, out);
        return;
    }
#endif
    scores_plain(c, q, scale, scores);
    softmax_rows(scores, c->num_kv * c->group, c->len);
    weighted_v_plain(c, scores, out);
}

/* out[b, h, :] = softmax(q[b, h, :] . K[b, :seq_lens[b]]) V[b, :seq_lens[b]] for every decode b. */
void paged_decode_attention(const float *q, const float *k_cache, const float *v_cache,
                            const int32_t *block_tables, int64_t table_stride, const int32_t *seq_lens,
                            float *out, int num_seqs, int heads, int kv_heads, int head_dim,
                            int block_size, float scale) {
    int group = heads / kv_heads;
    int64_t longest = 1;
    for (int b = 0; b < num_seqs; b++) longest = seq_lens[b] > longest ? seq_lens[b] : longest;
    /* A task per sequence (contiguous reads) when there are enough of them to keep every thread
     * busy; otherwise a task per (sequence, kv head). */
    int per_task = num_seqs >= 2 * omp_get_max_threads() ? kv_heads : 1;
    int64_t tasks = (int64_t)num_seqs * (kv_heads / per_task);
#pragma omp parallel
    {
        float *scores = malloc(sizeof(float) * per_task * group * longest);
#pragma omp for schedule(dynamic, 1)
        for (int64_t task = 0; task < tasks; task++) {
            int b = (int)(task / (kv_heads / per_task)), h = (int)(task % (kv_heads / per_task)) * per_task;
            Context c = {k_cache, v_cache, block_tables + b * table_stride, seq_lens[b],
                         group, block_size, kv_heads, head_dim, h, per_task};
            int64_t offset = ((int64_t)b * heads + (int64_t)h * group) * head_dim;
            one_group(&c, q + offset, out + offset, scale, scores);
        }
        free(scores);
    }
}
