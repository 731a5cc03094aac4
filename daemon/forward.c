/*
 * The LLaDA transformer forward pass in f32: embedding, pre-norm blocks with
 * bidirectional multi-head attention and a SwiGLU MLP, final RMSNorm, untied LM head.
 * Weight products go through prepared um_gemm_weight_t matrices (f32 or bf16),
 * attention through the fused um_attention kernel, everything else through the kernel
 * table, so a SIMD table or another GEMM backend changes no line here.
 *
 * Owns nothing: the buffers are carved from the model's workspace on each call.
 * Threading: one forward pass at a time per model. Row loops run under OpenMP; the
 * weight products use oneDNN's OpenMP threads; attention runs one task per thread.
 */
#include "model.h"

#include <math.h>
#include <stdint.h>
#include <string.h>
#include <time.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#include <unmaskd/error.h>

#include "kernels.h"
#include "log.h"

static int s_max_threads(void)
{
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
}

static double s_now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1e3 + (double)ts.tv_nsec / 1e6;
}

/* Buffers of one call, all views into the model's workspace. */
typedef struct s_buffers {
    float *x;      /* (T, d_model) residual stream */
    float *h;      /* (T, d_model) normalised input of a sub-layer */
    float *q;      /* (T, n_heads * head_dim); attention writes its output here too */
    float *k;      /* (T, n_kv_heads * head_dim) */
    float *v;      /* (T, n_kv_heads * head_dim) */
    float *gate;   /* (T, mlp_hidden_size), then silu(gate) * up */
    float *up;     /* (T, mlp_hidden_size) */
    float *scores; /* um_attention's scratch: one score tile per thread */
    float *rows;   /* (n_rows, d_model) final-normed rows for the LM head */
} s_buffers_t;

/* Round a float count up to 16 floats, so every buffer starts 64-byte aligned. */
static size_t s_round16(size_t n)
{
    return (n + 15) / 16 * 16;
}

static int s_buffers_get(um_model_t *m, size_t T, const um_attention_shape_t *att,
                         size_t n_rows, int n_threads, s_buffers_t *b)
{
    const um_model_config_t *c = um_model_config(m);
    size_t d = c->d_model, q_dim = (size_t)c->n_heads * c->head_dim;
    size_t kv_dim = (size_t)c->n_kv_heads * c->head_dim, mlp = c->mlp_hidden_size;
    size_t sizes[9] = {
        T * d, T * d, T * q_dim, T * kv_dim, T * kv_dim, T * mlp, T * mlp,
        um_attention_scratch_floats(att, n_threads), n_rows * d,
    };
    size_t total = 0;
    for (size_t i = 0; i < 9; i++)
        total += s_round16(sizes[i]);

    float *ws;
    int rc = um_model_workspace(m, total, &ws);
    if (rc != 0) {
        um_error("forward", "out of memory growing the workspace to %.1f MB for %zu positions",
                 total * 4.0 / 1e6, T);
        return rc;
    }
    float **views[9] = {&b->x, &b->h, &b->q, &b->k, &b->v, &b->gate, &b->up, &b->scores,
                        &b->rows};
    for (size_t i = 0; i < 9; i++) {
        *views[i] = ws;
        ws += s_round16(sizes[i]);
    }
    return 0;
}

/* ------------------------------------------------------------------------- */
/* Row-wise steps                                                             */

static void s_embed(const um_kernel_table_t *k, const um_model_weights_t *w,
                    const int32_t *ids, size_t T, int32_t d, float *x)
{
#pragma omp parallel for schedule(static) if (T > 1)
    for (size_t t = 0; t < T; t++) {
        size_t row = (size_t)ids[t] * d;
        if (w->wte_bf16)
            k->bf16_to_f32(x + t * d, (const uint16_t *)w->wte + row, (size_t)d);
        else
            memcpy(x + t * d, (const float *)w->wte + row, (size_t)d * sizeof *x);
    }
}

static void s_rmsnorm_rows(const um_kernel_table_t *k, float *out, const float *x,
                           const float *w, size_t T, int32_t d, float eps)
{
#pragma omp parallel for schedule(static) if (T > 1)
    for (size_t t = 0; t < T; t++)
        k->rmsnorm(out + t * d, x + t * d, w, d, eps);
}

/*
 * Rotate q and k by their position within the sequence, and fold the attention scale
 * 1/sqrt(head_dim) into q so that the score product needs no scaling of its own. The
 * scale is applied after the rotation, so it changes no result beyond f32 rounding.
 */
static void s_rope_rows(const um_kernel_table_t *k, const um_model_config_t *c,
                        const float *rope, float *q, float *kk, size_t T, int32_t seq_len)
{
    int32_t hd = c->head_dim;
    size_t q_dim = (size_t)c->n_heads * hd, kv_dim = (size_t)c->n_kv_heads * hd;
    float scale = (float)(1.0 / sqrt((double)hd));
#pragma omp parallel for schedule(static) if (T > 1)
    for (size_t t = 0; t < T; t++) {
        const float *cos_sin = rope + (size_t)(t % (size_t)seq_len) * hd;
        float *q_row = q + t * q_dim, *k_row = kk + t * kv_dim;
        for (int32_t h = 0; h < c->n_heads; h++)
            k->rope(q_row + (size_t)h * hd, cos_sin, hd);
        for (int32_t h = 0; h < c->n_kv_heads; h++)
            k->rope(k_row + (size_t)h * hd, cos_sin, hd);
        for (size_t i = 0; i < q_dim; i++)
            q_row[i] *= scale;
    }
}

static void s_silu_mul_rows(const um_kernel_table_t *k, float *gate, const float *up, size_t T,
                            int32_t n)
{
#pragma omp parallel for schedule(static) if (T > 1)
    for (size_t t = 0; t < T; t++)
        k->silu_mul(gate + t * n, gate + t * n, up + t * n, n);
}

/* ------------------------------------------------------------------------- */
/* Blocks and the whole pass                                                  */

/* Time the statement into the profile's field when profiling is on. */
#define S_TIMED(prof, field, stmt)                          \
    do {                                                    \
        double t0_ = (prof) ? s_now_ms() : 0.0;             \
        stmt;                                               \
        if (prof)                                           \
            (prof)->field += s_now_ms() - t0_;              \
    } while (0)

/* Apply up to three weights to the same input rows x (the third may be NULL). */
static int s_apply3(const um_gemm_weight_t *w1, float *y1, int32_t ld1,
                    const um_gemm_weight_t *w2, float *y2, int32_t ld2,
                    const um_gemm_weight_t *w3, float *y3, int32_t ld3, int32_t T,
                    const float *x, int32_t ldx)
{
    int rc = um_gemm_weight_apply(w1, T, x, ldx, y1, ld1, 0);
    if (rc == 0)
        rc = um_gemm_weight_apply(w2, T, x, ldx, y2, ld2, 0);
    if (rc == 0 && w3)
        rc = um_gemm_weight_apply(w3, T, x, ldx, y3, ld3, 0);
    return rc;
}

/* One pre-norm block: x += attention(attn_norm(x)); x += mlp(ff_norm(x)). */
static int s_block(const um_kernel_table_t *k, const um_model_config_t *c,
                   const um_block_weights_t *w, const float *rope, const s_buffers_t *b,
                   const um_attention_shape_t *att, um_forward_profile_t *prof)
{
    int32_t T = att->n_seq * att->seq_len, d = c->d_model, mlp = c->mlp_hidden_size;
    int32_t q_dim = c->n_heads * c->head_dim, kv_dim = c->n_kv_heads * c->head_dim;
    int rc = 0;

    S_TIMED(prof, norm_ms, s_rmsnorm_rows(k, b->h, b->x, w->attn_norm, T, d, c->rms_norm_eps));
    S_TIMED(prof, gemm_ms,
            rc = s_apply3(w->q_proj, b->q, q_dim, w->k_proj, b->k, kv_dim, w->v_proj, b->v,
                          kv_dim, T, b->h, d));
    if (rc)
        return rc;
    S_TIMED(prof, rope_ms, s_rope_rows(k, c, rope, b->q, b->k, T, att->seq_len));
    S_TIMED(prof, attention_ms, rc = um_attention(k, att, b->q, b->k, b->v, b->scores));
    if (rc)
        return rc;
    S_TIMED(prof, gemm_ms, rc = um_gemm_weight_apply(w->attn_out, T, b->q, q_dim, b->x, d, 1));
    if (rc)
        return rc;

    S_TIMED(prof, norm_ms, s_rmsnorm_rows(k, b->h, b->x, w->ff_norm, T, d, c->rms_norm_eps));
    S_TIMED(prof, gemm_ms,
            rc = s_apply3(w->ff_proj, b->gate, mlp, w->up_proj, b->up, mlp, NULL, NULL, 0, T,
                          b->h, d));
    if (rc)
        return rc;
    S_TIMED(prof, activation_ms, s_silu_mul_rows(k, b->gate, b->up, T, mlp));
    S_TIMED(prof, gemm_ms, rc = um_gemm_weight_apply(w->ff_out, T, b->gate, mlp, b->x, d, 1));
    return rc;
}

/*
 * Check the arguments both entry points share. rows is NULL for every position;
 * otherwise it lists n_rows positions, and logits may be NULL only when n_rows is 0.
 */
static int s_check_args(const um_model_t *m, const int32_t *ids, int32_t n_seq,
                        int32_t seq_len, const int32_t *rows, int32_t n_rows,
                        const float *logits, int all_rows)
{
    if (!m || !ids || n_rows < 0 || (!all_rows && n_rows > 0 && !rows) ||
        (!logits && (all_rows || n_rows > 0)))
        return UM_EINVAL;
    const um_model_config_t *c = um_model_config(m);
    if (n_seq < 1 || seq_len < 1 || seq_len > c->max_sequence_length) {
        um_warn("forward", "cannot run %d sequences of %d tokens: seq_len must be in [1, %d] "
                "(max_sequence_length) and n_seq at least 1", n_seq, seq_len,
                c->max_sequence_length);
        return UM_ERANGE;
    }
    if ((int64_t)n_seq * seq_len > INT32_MAX) {
        um_warn("forward", "%d sequences of %d tokens exceed 2^31 positions", n_seq, seq_len);
        return UM_ERANGE;
    }
    int32_t T = n_seq * seq_len;
    for (int32_t t = 0; t < T; t++) {
        if (ids[t] < 0 || ids[t] >= c->embedding_size) {
            um_warn("forward", "token id %d at position %d of sequence %d is outside [0, %d) "
                    "(embedding_size)", ids[t], t % seq_len, t / seq_len, c->embedding_size);
            return UM_ERANGE;
        }
    }
    for (int32_t i = 0; i < n_rows; i++) {
        if (rows[i] < 0 || rows[i] >= T) {
            um_warn("forward", "row %d (entry %d of rows) is outside the %d positions of %d "
                    "sequences of %d tokens", rows[i], i, T, n_seq, seq_len);
            return UM_ERANGE;
        }
    }
    return 0;
}

/* The forward pass; rows == NULL computes logits for every position. */
static int s_forward(um_model_t *m, const int32_t *ids, int32_t n_seq, int32_t seq_len,
                     const int32_t *rows, int32_t n_rows, float *logits)
{
    const um_model_config_t *c = um_model_config(m);
    const um_model_weights_t *w = um_model_weights(m);
    const um_kernel_table_t *k = um_kernels();
    um_forward_profile_t *prof = um_model_profile(m);
    int32_t T = n_seq * seq_len, d = c->d_model;
    int32_t n_out = rows ? n_rows : T;
    int n_threads = s_max_threads();
    double start = prof ? s_now_ms() : 0.0;
    const um_attention_shape_t att = {
        .n_seq = n_seq, .seq_len = seq_len, .n_heads = c->n_heads,
        .n_kv_heads = c->n_kv_heads, .head_dim = c->head_dim,
        .q_stride = c->n_heads * c->head_dim, .kv_stride = c->n_kv_heads * c->head_dim,
    };

    s_buffers_t b;
    int rc = s_buffers_get(m, (size_t)T, &att, rows ? (size_t)n_rows : 0, n_threads, &b);
    if (rc != 0)
        return rc;

    S_TIMED(prof, other_ms, s_embed(k, w, ids, (size_t)T, d, b.x));
    for (int32_t l = 0; l < c->n_layers; l++) {
        rc = s_block(k, c, &w->blocks[l], um_model_rope_table(m), &b, &att, prof);
        if (rc != 0) {
            um_error("forward", "block %d of %d failed: %s", l, c->n_layers, um_strerror(rc));
            return rc;
        }
    }

    /* Only the rows whose logits are wanted go through the final norm and the head. */
    float *final = b.h;
    double t0 = prof ? s_now_ms() : 0.0;
    if (rows) {
        final = b.rows;
#pragma omp parallel for schedule(static) if (n_rows > 1)
        for (int32_t i = 0; i < n_rows; i++)
            k->rmsnorm(final + (size_t)i * d, b.x + (size_t)rows[i] * d, w->ln_f, d,
                       c->rms_norm_eps);
    } else {
        s_rmsnorm_rows(k, final, b.x, w->ln_f, (size_t)T, d, c->rms_norm_eps);
    }
    if (prof)
        prof->norm_ms += s_now_ms() - t0;
    S_TIMED(prof, lm_head_ms,
            rc = um_gemm_weight_apply(w->lm_head, n_out, final, d, logits, c->embedding_size, 0));
    if (rc != 0)
        um_error("forward", "LM head product for %d rows failed: %s", n_out, um_strerror(rc));
    if (prof) {
        prof->total_ms += s_now_ms() - start;
        prof->passes++;
    }
    return rc;
}

int um_model_forward(um_model_t *model, const int32_t *ids, int32_t n_seq, int32_t seq_len,
                     float *logits)
{
    int rc = s_check_args(model, ids, n_seq, seq_len, NULL, 0, logits, 1);
    if (rc != 0)
        return rc;
    return s_forward(model, ids, n_seq, seq_len, NULL, 0, logits);
}

int um_model_forward_rows(um_model_t *model, const int32_t *ids, int32_t n_seq,
                          int32_t seq_len, const int32_t *rows, int32_t n_rows,
                          float *logits)
{
    int rc = s_check_args(model, ids, n_seq, seq_len, rows, n_rows, logits, 0);
    if (rc != 0 || n_rows == 0)
        return rc;
    return s_forward(model, ids, n_seq, seq_len, rows, n_rows, logits);
}
