/*
 * Fused bidirectional attention over heads: for each (sequence, head, tile of query
 * rows) one task computes the tile's scores against every key, a softmax per row, and
 * the weighted sum of values, then writes the result over the tile's queries.
 *
 * Owns nothing; the caller passes a scratch buffer with one score tile per thread.
 * Threading: tasks run under an OpenMP parallel loop; the products inside a task run on
 * the calling thread (oneDNN does not nest its own parallelism).
 */
#include "kernels.h"

#include <unmaskd/error.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "log.h"

static int s_thread_index(void)
{
#ifdef _OPENMP
    return omp_get_thread_num();
#else
    return 0;
#endif
}

size_t um_attention_scratch_floats(const um_attention_shape_t *shape, int n_threads)
{
    size_t rows = shape->seq_len < UM_ATTENTION_TILE ? (size_t)shape->seq_len
                                                     : UM_ATTENTION_TILE;
    return (size_t)(n_threads > 0 ? n_threads : 1) * rows * (size_t)shape->seq_len;
}

int um_attention(const um_kernel_table_t *k, const um_attention_shape_t *shape, float *q,
                 const float *kk, const float *v, float *scratch)
{
    const um_attention_shape_t *a = shape;
    if (a->n_seq < 1 || a->seq_len < 1 || a->head_dim < 1 || a->n_kv_heads < 1 ||
        a->n_heads % a->n_kv_heads != 0 || a->q_stride < a->n_heads * a->head_dim ||
        a->kv_stride < a->n_kv_heads * a->head_dim) {
        um_error("attention", "invalid shape: %d sequences of %d, %d heads, %d kv heads, "
                 "head_dim %d, q stride %d, kv stride %d", a->n_seq, a->seq_len, a->n_heads,
                 a->n_kv_heads, a->head_dim, a->q_stride, a->kv_stride);
        return UM_EINVAL;
    }
    int32_t L = a->seq_len, hd = a->head_dim, group = a->n_heads / a->n_kv_heads;
    int32_t n_tiles = (L + UM_ATTENTION_TILE - 1) / UM_ATTENTION_TILE;
    int32_t tile_rows = L < UM_ATTENTION_TILE ? L : UM_ATTENTION_TILE;
    int64_t n_tasks = (int64_t)a->n_seq * a->n_heads * n_tiles;
    int rc = 0;

#pragma omp parallel for schedule(dynamic, 1) if (n_tasks > 1)
    for (int64_t task = 0; task < n_tasks; task++) {
        int32_t tile = (int32_t)(task % n_tiles);
        int32_t h = (int32_t)(task / n_tiles % a->n_heads);
        int32_t s = (int32_t)(task / n_tiles / a->n_heads);
        int32_t row0 = tile * UM_ATTENTION_TILE;
        int32_t rows = L - row0 < UM_ATTENTION_TILE ? L - row0 : UM_ATTENTION_TILE;
        float *S = scratch + (size_t)s_thread_index() * (size_t)tile_rows * L;
        float *q_tile = q + ((size_t)s * L + row0) * a->q_stride + (size_t)h * hd;
        size_t kv_offset = (size_t)s * L * a->kv_stride + (size_t)(h / group) * hd;

        /* S = q k^T for this tile's rows, then a softmax over each row of S. */
        int r = um_gemm_f32_nt(rows, L, hd, q_tile, a->q_stride, kk + kv_offset, a->kv_stride,
                               S, L, 0);
        if (r == 0) {
            for (int32_t i = 0; i < rows; i++)
                k->softmax(S + (size_t)i * L, L);
            /* Only this task reads these query rows, so the output replaces them. */
            r = um_gemm_f32_nn(rows, hd, L, 1.0f, S, L, v + kv_offset, a->kv_stride, q_tile,
                               a->q_stride);
        }
        if (r != 0) {
#pragma omp atomic write
            rc = r;
        }
    }
    return rc;
}
