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
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define HAVE_AVX2 1
#endif

typedef struct {
    const float *k_cache, *v_cache;
    const int32_t *table;
    int64_t len;
    int group, block_size, kv_heads, head_dim, kv_head;
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

/* scores[g * len + t] = scale * q_g . k_t, plain loops. */
static void scores_plain(const Context *c, const float *q, float scale, float *scores) {
    int d = c->head_dim;
    FOR_EACH_ROW(c, c->k_cache, t, k, {
        for (int g = 0; g < c->group; g++) scores[g * c->len + t] = dot_plain(q + g * d, k, d) * scale;
    });
}

/* out_g = sum_t p[g * len + t] v_t, plain loops. */
static void weighted_v_plain(const Context *c, const float *p, float *out) {
    int d = c->head_dim;
    memset(out, 0, sizeof(float) * c->group * d);
    FOR_EACH_ROW(c, c->v_cache, t, v, {
        for (int g = 0; g < c->group; g++) axpy_plain(out + g * d, p[g * c->len + t], v, d);
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
            const float *k0 = base + o * stride, *k1 = k0 + stride, *k2 = k1 + stride, *k3 = k2 + stride;
            for (int g = 0; g < c->group; g++) {
                const float *qg = q + g * d;
                __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
                __m256 a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
                for (int f = 0; f < d; f += 8) {
                    __m256 qv = _mm256_loadu_ps(qg + f);
                    a0 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k0 + f), a0);
                    a1 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k1 + f), a1);
                    a2 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k2 + f), a2);
                    a3 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k3 + f), a3);
                }
                float *s = scores + g * c->len + first + o;
                s[0] = hsum(a0) * scale;
                s[1] = hsum(a1) * scale;
                s[2] = hsum(a2) * scale;
                s[3] = hsum(a3) * scale;
            }
        }
        for (; o < n; o++)
            for (int g = 0; g < c->group; g++)
                scores[g * c->len + first + o] = dot_avx2(q + g * d, base + o * stride, d) * scale;
    }
}

/* 64 output features at a time, held in eight registers across the whole context. */
static void weighted_v_avx2(const Context *c, const float *p, float *out) {
    int d = c->head_dim;
    for (int g = 0; g < c->group; g++) {
        const float *pg = p + g * c->len;
        for (int f = 0; f < d; f += 64) {
            __m256 acc[8];
            for (int j = 0; j < 8; j++) acc[j] = _mm256_setzero_ps();
            FOR_EACH_ROW(c, c->v_cache, t, v, {
                __m256 w = _mm256_broadcast_ss(pg + t);
                for (int j = 0; j < 8; j++) acc[j] = _mm256_fmadd_ps(w, _mm256_loadu_ps(v + f + 8 * j), acc[j]);
            });
            for (int j = 0; j < 8; j++) _mm256_storeu_ps(out + g * d + f + 8 * j, acc[j]);
        }
    }
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
        softmax_rows(scores, c->group, c->len);
        weighted_v_avx2(c, scores, out);
        return;
    }
#endif
    scores_plain(c, q, scale, scores);
    softmax_rows(scores, c->group, c->len);
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
#pragma omp parallel
    {
        float *scores = malloc(sizeof(float) * group * longest);
#pragma omp for schedule(dynamic, 1)
        for (int64_t task = 0; task < (int64_t)num_seqs * kv_heads; task++) {
            int b = (int)(task / kv_heads), h = (int)(task % kv_heads);
            Context c = {k_cache, v_cache, block_tables + b * table_stride, seq_lens[b],
                         group, block_size, kv_heads, head_dim, h};
            int64_t offset = ((int64_t)b * heads + (int64_t)h * group) * head_dim;
            one_group(&c, q + offset, out + offset, scale, scores);
        }
        free(scores);
    }
}
