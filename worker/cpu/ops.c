/* The element-wise parts of a Llama layer, one pass over memory each, for the CPU serving path.
 *
 * In torch, RMSNorm is five passes (pow, mean, add, rsqrt-multiply, weight-multiply) plus one for
 * the residual add before it, and the rotation of q and k is six (four products, a difference
 * and a sum, then a cat): a quarter of a prefill step went to them. Here each is one pass per row
 * that stays in L1.
 *
 * Built with -ffp-contract=off: every product and sum is rounded where torch's separate ops
 * round it (no fused multiply-add), so the rotation gives torch's bits exactly and the norm
 * differs only in the order of its sum of squares.
 * The _bf16 twins take bfloat16 tensors (uint16_t): each element is widened, computed in float32,
 * and rounded (to nearest even) wherever the torch fallback stores a bfloat16 tensor, so they give
 * its bits, but for the order of the norm's sum of squares and libmvec's expf (tests/worker/
 * test_cpu_ops_bf16.py: within one bfloat16 ulp).
 * Threads: OpenMP over rows, on torch's runtime, only where the work is worth waking them.
 */
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <string.h>

#include "bf16.h"

#define MIN_PARALLEL_FLOATS 32768 /* torch's own grain size for element-wise ops */

/* glibc's libmvec has vector versions of expf (within 1 ulp; reached through -lm); glibc only
 * declares them under -ffast-math, whose crtfastmath.o would set flush-to-zero for the whole
 * process, so the declaration is made here. */
#pragma omp declare simd notinbranch
float expf(float);

static float sum_of_squares(const float *x, int64_t n) {
    /* Eight running sums: the compiler keeps them in one vector register. */
    float acc[8] = {0};
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        for (int j = 0; j < 8; j++) acc[j] += x[i + j] * x[i + j];
    float total = 0.0f;
    for (; i < n; i++) total += x[i] * x[i];
    for (int j = 0; j < 8; j++) total += acc[j];
    return total;
}

/* out[r] = weight * (h * 1 / sqrt(mean(h^2) + eps)) with h = x[r], or, given `residual`,
 * h = residual[r] + x[r], which is also written back to residual[r] (the next layer's input).
 * x rows are `x_stride` floats apart; residual and out are contiguous [rows, dim]. */
void rms_norm(const float *x, int64_t x_stride, float *residual, const float *weight, float *out, int64_t rows,
              int64_t dim, float eps) {
#pragma omp parallel for schedule(static) if (rows * dim >= MIN_PARALLEL_FLOATS)
    for (int64_t r = 0; r < rows; r++) {
        const float *h = x + r * x_stride;
        if (residual) {
            float *res = residual + r * dim;
            for (int64_t i = 0; i < dim; i++) res[i] = res[i] + h[i];
            h = res;
        }
        float inv = 1.0f / sqrtf(sum_of_squares(h, dim) / (float)dim + eps);
        float *o = out + r * dim;
        for (int64_t i = 0; i < dim; i++) o[i] = weight[i] * (h[i] * inv);
    }
}

/* Rotates, in place, `heads` heads of head_dim floats side by side at the start of each of `rows`
 * rows (`row_stride` floats apart), in the half-split layout of Hugging Face Llama checkpoints:
 * (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin). cos_sin is the [max_position, head_dim] table,
 * cos in its first half, sin in its second; positions [rows] int64. */
void rotary(float *x, int64_t row_stride, int64_t rows, int64_t heads, int64_t head_dim, const int64_t *positions,
            const float *cos_sin) {
    int64_t half = head_dim / 2;
#pragma omp parallel for schedule(static) if (rows * heads * head_dim >= MIN_PARALLEL_FLOATS)
    for (int64_t r = 0; r < rows; r++) {
        const float *c = cos_sin + positions[r] * head_dim, *s = c + half;
        for (int64_t h = 0; h < heads; h++) {
            float *x1 = x + r * row_stride + h * head_dim, *x2 = x1 + half;
            for (int64_t i = 0; i < half; i++) {
                float a = x1[i], b = x2[i];
                x1[i] = a * c[i] - b * s[i];
                x2[i] = b * c[i] + a * s[i];
            }
        }
    }
}

/* Writes a step's new K and V rows into their cache slots: row t of k (`k_stride` elements apart,
 * its `width` = kv_heads * head_dim elements of `elem` bytes side by side: 4 for a float32 cache,
 * 2 for a bfloat16 one) goes to k_cache + slots[t] * width elements, and the same for v. torch's
 * index_copy_ takes several times longer when k and v are views of the fused qkv output, as they
 * are. In parallel from torch's grain size in float32 elements, counted in bytes. */
void write_kv(const char *k, int64_t k_stride, const char *v, int64_t v_stride, char *k_cache, char *v_cache,
              const int64_t *slots, int64_t tokens, int64_t width, int64_t elem) {
    const int64_t row = width * elem;
#pragma omp parallel for schedule(static) if (tokens * row >= MIN_PARALLEL_FLOATS * (int64_t)sizeof(float))
    for (int64_t t = 0; t < tokens; t++) {
        memcpy(k_cache + slots[t] * row, k + t * k_stride * elem, row);
        memcpy(v_cache + slots[t] * row, v + t * v_stride * elem, row);
    }
}

/* out[r] = silu(gate[r]) * up[r], where row r of gate_up (`row_stride` floats apart) is gate's
 * `inter` floats then up's: the fused gate/up projection's output, read once. */
void silu_and_mul(const float *gate_up, int64_t row_stride, float *out, int64_t rows, int64_t inter) {
#pragma omp parallel for schedule(static) if (rows * inter >= MIN_PARALLEL_FLOATS)
    for (int64_t r = 0; r < rows; r++) {
        const float *gate = gate_up + r * row_stride, *up = gate + inter;
        float *o = out + r * inter;
#pragma omp simd
        for (int64_t i = 0; i < inter; i++) o[i] = gate[i] / (1.0f + expf(-gate[i])) * up[i];
    }
}

/* sum_of_squares of a bfloat16 row, widened on the way (the statistics in float32, as
 * transformers computes them). */
static float sum_of_squares_bf16(const uint16_t *x, int64_t n) {
    float acc[16] = {0};
    int64_t i = 0;
    for (; i + 16 <= n; i += 16)
        for (int j = 0; j < 16; j++) {
            float v = bf16_widen(x[i + j]);
            acc[j] += v * v;
        }
    float total = 0.0f;
    for (; i < n; i++) total += bf16_widen(x[i]) * bf16_widen(x[i]);
    for (int j = 0; j < 16; j++) total += acc[j];
    return total;
}

/* rms_norm for bfloat16 x, residual, weight and out: the sum residual + x rounded to bfloat16
 * (the residual stream's dtype), the statistics in float32, then as RMSNorm.normalize stores
 * them: out = bf16(weight * bf16(h * inv)). */
void rms_norm_bf16(const uint16_t *x, int64_t x_stride, uint16_t *residual, const uint16_t *weight, uint16_t *out,
                   int64_t rows, int64_t dim, float eps) {
#pragma omp parallel for schedule(static) if (rows * dim >= MIN_PARALLEL_FLOATS)
    for (int64_t r = 0; r < rows; r++) {
        const uint16_t *h = x + r * x_stride;
        if (residual) {
            uint16_t *res = residual + r * dim;
#pragma omp simd
            for (int64_t i = 0; i < dim; i++) res[i] = bf16_round(bf16_widen(res[i]) + bf16_widen(h[i]));
            h = res;
        }
        float inv = 1.0f / sqrtf(sum_of_squares_bf16(h, dim) / (float)dim + eps);
        uint16_t *o = out + r * dim;
#pragma omp simd
        for (int64_t i = 0; i < dim; i++)
            o[i] = bf16_round(bf16_widen(weight[i]) * bf16_through(bf16_widen(h[i]) * inv));
    }
}

/* rotary for bfloat16 x (cos_sin stays the float32 table): cos and sin rounded to bfloat16 and
 * every product, difference and sum rounded, where torch's separate bfloat16 ops round them
 * (transformers' apply_rotary_pos_emb in bfloat16 does the same): torch's bits exactly. */
void rotary_bf16(uint16_t *x, int64_t row_stride, int64_t rows, int64_t heads, int64_t head_dim,
                 const int64_t *positions, const float *cos_sin) {
    int64_t half = head_dim / 2;
#pragma omp parallel for schedule(static) if (rows * heads * head_dim >= MIN_PARALLEL_FLOATS)
    for (int64_t r = 0; r < rows; r++) {
        const float *c = cos_sin + positions[r] * head_dim, *s = c + half;
        for (int64_t h = 0; h < heads; h++) {
            uint16_t *x1 = x + r * row_stride + h * head_dim, *x2 = x1 + half;
#pragma omp simd
            for (int64_t i = 0; i < half; i++) {
                float a = bf16_widen(x1[i]), b = bf16_widen(x2[i]);
                float ci = bf16_through(c[i]), si = bf16_through(s[i]);
                x1[i] = bf16_round(bf16_through(a * ci) - bf16_through(b * si));
                x2[i] = bf16_round(bf16_through(b * ci) + bf16_through(a * si));
            }
        }
    }
}

/* silu_and_mul for bfloat16: as torch, silu(gate) stored in bfloat16, then times up, rounded. */
void silu_and_mul_bf16(const uint16_t *gate_up, int64_t row_stride, uint16_t *out, int64_t rows, int64_t inter) {
#pragma omp parallel for schedule(static) if (rows * inter >= MIN_PARALLEL_FLOATS)
    for (int64_t r = 0; r < rows; r++) {
        const uint16_t *gate = gate_up + r * row_stride, *up = gate + inter;
        uint16_t *o = out + r * inter;
#pragma omp simd
        for (int64_t i = 0; i < inter; i++) {
            float g = bf16_widen(gate[i]);
            o[i] = bf16_round(bf16_through(g / (1.0f + expf(-g))) * bf16_widen(up[i]));
        }
    }
}
