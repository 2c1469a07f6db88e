/* out[r] = the index that u[r] in [0, 1) picks by inverse CDF from row r of w [R, V] (float32 weights
 * >= 0, rows `ld` floats apart, each with a positive entry): index i with probability w[i] / sum.
 *
 * Why: the same two-level draw as worker/sampler.py's draw_from_weights (block sums, then one
 * block), in one parallel region instead of a dozen small torch ops, each of which can wait a time
 * slice for its second thread on cores shared with the router and scheduler.
 *
 * How: per row (OpenMP over rows), the sums of blocks of BLOCK floats (float32, as the torch version),
 * cumulated in double until they pass u * total; then that block's entries, cumulated in double.
 * Zero weights own empty intervals: where rounding leaves the target past the last positive entry,
 * that entry is the pick.
 */
#include <stdint.h>

#define BLOCK 256

static float block_sum(const float *w, int64_t n) {
    float lanes[8] = {0};
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        for (int j = 0; j < 8; j++) lanes[j] += w[i + j];
    float s = 0;
    for (; i < n; i++) s += w[i];
    for (int j = 0; j < 8; j++) s += lanes[j];
    return s;
}

static int64_t draw_row(const float *w, int64_t n, double u) {
    int64_t blocks = (n + BLOCK - 1) / BLOCK;
    float sums[blocks]; /* 4 bytes per 256 tokens: 2.4 KB at 151,936 */
    double total = 0;
    for (int64_t b = 0; b < blocks; b++) {
        int64_t len = n - b * BLOCK < BLOCK ? n - b * BLOCK : BLOCK;
        sums[b] = block_sum(w + b * BLOCK, len);
        total += sums[b];
    }
    double target = u * total, before = 0;
    int64_t b = 0, last_block = -1;
    for (; b < blocks; b++) {
        if (sums[b] > 0) last_block = b;
        if (sums[b] > 0 && before + sums[b] > target) break;
        before += sums[b];
    }
    if (b == blocks) b = last_block < 0 ? 0 : last_block;
    int64_t start = b * BLOCK, end = start + BLOCK < n ? start + BLOCK : n, last = start;
    double acc = before;
    for (int64_t i = start; i < end; i++) {
        if (w[i] > 0) {
            last = i;
            acc += w[i];
            if (acc > target) return i;
        }
    }
    return last;
}

#define PARALLEL_FLOATS (1 << 20) /* below it one thread: see cpu/argmax.c */

void draw_rows(const float *w, int64_t rows, int64_t n, int64_t ld, const double *u, int64_t *out) {
#pragma omp parallel for schedule(static) if (rows * n >= PARALLEL_FLOATS)
    for (int64_t r = 0; r < rows; r++) out[r] = draw_row(w + r * ld, n, u[r]);
}
