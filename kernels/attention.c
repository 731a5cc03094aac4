/*
 * Fused bidirectional attention over heads: for each (sequence, head, tile of query
 * rows) one task computes the tile's scores against every key, a softmax per row, and
 * the weighted sum of values, then writes the result over the tile's queries.
 *
 * The score and value products run through oneDNN or, where the build has it and it
 * is selected, libxsmm. Owns the backend choice; the caller passes a scratch buffer
 * with one score tile (and one transposed key head) per thread.
 * Threading: um_attention_select runs once at startup. Tasks run under an OpenMP
 * parallel loop; the products inside a task run on the calling thread (oneDNN does not
 * nest its own parallelism).
 */
#include "kernels.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

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

static um_attention_backend_t s_backend = UM_ATTENTION_ONEDNN;
static char s_backend_name[48] = "onednn";

int um_attention_select(const char *name, char *err, size_t errlen)
{
    const char *source = "the attention backend";
    if (!name) {
        name = getenv("UNMASKD_ATTENTION");
        source = "UNMASKD_ATTENTION";
        if (!name || !*name)
            name = "onednn";
    }
    if (strcmp(name, "onednn") == 0) {
        s_backend = UM_ATTENTION_ONEDNN;
        snprintf(s_backend_name, sizeof s_backend_name, "onednn");
        return 0;
    }
    if (strcmp(name, "libxsmm") == 0) {
#ifdef UM_HAVE_LIBXSMM
        s_backend = UM_ATTENTION_LIBXSMM;
        snprintf(s_backend_name, sizeof s_backend_name, "libxsmm %s", um_xsmm_version());
        return 0;
#else
        snprintf(err, errlen, "%s 'libxsmm' is not in this build: install the Debian package "
                 "libxsmm-dev (x86-64 only) and rerun configure, or use 'onednn'", source);
        return UM_EINVAL;
#endif
    }
    snprintf(err, errlen, "%s '%s' is unknown: use onednn or libxsmm", source, name);
    return UM_EINVAL;
}

const char *um_attention_backend_name(void)
{
    return s_backend_name;
}

/* Per thread: one score tile of up to UM_ATTENTION_TILE rows of L, one key head
 * transposed to [head_dim, L] for the libxsmm score product. */
static size_t s_thread_floats(const um_attention_shape_t *shape)
{
    size_t rows = shape->seq_len < UM_ATTENTION_TILE ? (size_t)shape->seq_len
                                                     : UM_ATTENTION_TILE;
    return (rows + (size_t)shape->head_dim) * (size_t)shape->seq_len;
}

size_t um_attention_scratch_floats(const um_attention_shape_t *shape, int n_threads)
{
    return (size_t)(n_threads > 0 ? n_threads : 1) * s_thread_floats(shape);
}

/*
 * One task's two products with libxsmm, which is column-major: a row-major matrix with
 * leading dimension ld reads as its column-major transpose with the same ld. The scores
 * S = q k^T are computed as S^T[L, rows] = K[L, hd] q^T[hd, rows], where kT holds the
 * key head copied to [hd, L] row-major (column-major K); the output S v as
 * out^T[hd, rows] = v^T[hd, L] S^T[L, rows].
 */
#ifdef UM_HAVE_LIBXSMM
static int s_task_xsmm(const um_kernel_table_t *k, const um_attention_shape_t *a, int32_t rows,
                       float *q_tile, const float *k_head, const float *v_head, float *S,
                       float *kT)
{
    int32_t L = a->seq_len, hd = a->head_dim;
    um_xsmm_kernel_t scores = um_xsmm_dispatch(L, rows, hd, L, a->q_stride, L);
    um_xsmm_kernel_t values = um_xsmm_dispatch(hd, rows, L, a->kv_stride, L, a->q_stride);
    if (!scores || !values)
        return UM_EBACKEND;
    for (int32_t j = 0; j < L; j++)
        for (int32_t c = 0; c < hd; c++)
            kT[(size_t)c * L + j] = k_head[(size_t)j * a->kv_stride + c];
    scores(kT, q_tile, S);
    for (int32_t i = 0; i < rows; i++)
        k->softmax(S + (size_t)i * L, L);
    values(v_head, S, q_tile);
    return 0;
}
#endif

/* One task's two products with oneDNN. */
static int s_task_onednn(const um_kernel_table_t *k, const um_attention_shape_t *a, int32_t rows,
                         float *q_tile, const float *k_head, const float *v_head, float *S)
{
    int32_t L = a->seq_len, hd = a->head_dim;
    int r = um_gemm_f32_nt(rows, L, hd, q_tile, a->q_stride, k_head, a->kv_stride, S, L, 0);
    if (r != 0)
        return r;
    for (int32_t i = 0; i < rows; i++)
        k->softmax(S + (size_t)i * L, L);
    /* Only this task reads these query rows, so the output replaces them. */
    return um_gemm_f32_nn(rows, hd, L, 1.0f, S, L, v_head, a->kv_stride, q_tile, a->q_stride);
}

int um_attention(const um_kernel_table_t *k, const um_attention_shape_t *shape, float *q,
                 const float *kk, const float *v, float *scratch)
{
    const um_attention_shape_t *a = shape;
    if (a->n_seq < 1 || a->seq_len < 1 || a->q_len < 0 || a->q_len > a->seq_len ||
        a->head_dim < 1 || a->n_kv_heads < 1 ||
        a->n_heads % a->n_kv_heads != 0 || a->q_stride < a->n_heads * a->head_dim ||
        a->kv_stride < a->n_kv_heads * a->head_dim) {
        um_error("attention", "invalid shape: %d sequences of %d keys and %d queries, %d "
                 "heads, %d kv heads, head_dim %d, q stride %d, kv stride %d", a->n_seq,
                 a->seq_len, a->q_len, a->n_heads, a->n_kv_heads, a->head_dim, a->q_stride,
                 a->kv_stride);
        return UM_EINVAL;
    }
    int32_t L = a->seq_len, hd = a->head_dim, group = a->n_heads / a->n_kv_heads;
    int32_t Lq = a->q_len > 0 ? a->q_len : L;
    int32_t n_tiles = (Lq + UM_ATTENTION_TILE - 1) / UM_ATTENTION_TILE;
    size_t per_thread = s_thread_floats(a);
    int64_t n_tasks = (int64_t)a->n_seq * a->n_heads * n_tiles;
    um_attention_backend_t backend = s_backend;
    int rc = 0;

#pragma omp parallel for schedule(dynamic, 1) if (n_tasks > 1)
    for (int64_t task = 0; task < n_tasks; task++) {
        int32_t tile = (int32_t)(task % n_tiles);
        int32_t h = (int32_t)(task / n_tiles % a->n_heads);
        int32_t s = (int32_t)(task / n_tiles / a->n_heads);
        int32_t row0 = tile * UM_ATTENTION_TILE;
        int32_t rows = Lq - row0 < UM_ATTENTION_TILE ? Lq - row0 : UM_ATTENTION_TILE;
        float *S = scratch + (size_t)s_thread_index() * per_thread;
        float *q_tile = q + ((size_t)s * Lq + row0) * a->q_stride + (size_t)h * hd;
        size_t kv_offset = (size_t)s * L * a->kv_stride + (size_t)(h / group) * hd;

        int r;
#ifdef UM_HAVE_LIBXSMM
        if (backend == UM_ATTENTION_LIBXSMM) {
            float *kT = S + (size_t)(L < UM_ATTENTION_TILE ? L : UM_ATTENTION_TILE) * L;
            r = s_task_xsmm(k, a, rows, q_tile, kk + kv_offset, v + kv_offset, S, kT);
        } else
#endif
            r = s_task_onednn(k, a, rows, q_tile, kk + kv_offset, v + kv_offset, S);
        if (r != 0) {
#pragma omp atomic write
            rc = r;
        }
    }
    (void)backend;
    return rc;
}
