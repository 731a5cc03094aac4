/*
 * The transformer forward pass of every supported family, in f32 activations:
 * LLaDA and Dream (embedding, pre-norm RMSNorm blocks with RoPE attention and a SwiGLU
 * MLP, final RMSNorm, LM head; Dream adds q/k/v biases and shifts its logits by one
 * position) and the BERT family (embeddings plus learned positions and a LayerNorm,
 * post-LayerNorm blocks with a GELU MLP, the MLM head tied to the embeddings). All
 * attention is bidirectional.
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
#include <stdlib.h>
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

static int s_thread_index(void)
{
#ifdef _OPENMP
    return omp_get_thread_num();
#else
    return 0;
#endif
}

static double s_now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1e3 + (double)ts.tv_nsec / 1e6;
}

/* The block cache: every layer's keys (after RoPE) and values for every position. */
struct um_kv_cache {
    int32_t n_layers, n_seq, seq_len, kv_dim;
    int filled; /* a whole-sequence pass has written every row */
    float *k;   /* (n_layers, n_seq, seq_len, kv_dim) */
    float *v;   /* (n_layers, n_seq, seq_len, kv_dim) */
};

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
    float *rows;   /* (2, n_out, d_model): the LM head's input rows and one scratch set */
    float *tmp;    /* (n_threads, d_model) one row per thread */
} s_buffers_t;

/*
 * Where the T rows of a pass come from. Uniform: the window [q_start, q_start + q_len)
 * of each of n_seq sequences of seq_len ids, q_len rows per sequence. Parts (parts set):
 * each part a uniform layout of its own, part p being rows [part_rows[p], part_rows[p +
 * 1]), and seq_len the longest part's, which sizes the attention scratch.
 */
typedef struct s_layout {
    int32_t n_seq, seq_len, q_start, q_len;
    const um_forward_part_t *parts; /* (n_parts) NULL unless the pass runs parts */
    const int32_t *part_rows;       /* (n_parts + 1) ascending, from 0 */
    int32_t n_parts;
} s_layout_t;

static int32_t s_layout_rows(const s_layout_t *lo)
{
    return lo->parts ? lo->part_rows[lo->n_parts] : lo->n_seq * lo->q_len;
}

/* The last index s in [0, n) with offsets[s] <= t, for ascending offsets from 0. */
static int32_t s_find_offset(const int32_t *offsets, int32_t n, int32_t t)
{
    int32_t lo_s = 0, hi_s = n - 1;
    while (lo_s < hi_s) {
        int32_t mid = lo_s + (hi_s - lo_s + 1) / 2;
        if (offsets[mid] <= t)
            lo_s = mid;
        else
            hi_s = mid - 1;
    }
    return lo_s;
}

/*
 * Position of row t within its sequence. Sets *token to its token, read from ids (or
 * from its part's ids), unless token is NULL.
 */
static size_t s_row_position(const s_layout_t *lo, const int32_t *ids, size_t t,
                             int32_t *token)
{
    if (lo->parts) {
        int32_t p = s_find_offset(lo->part_rows, lo->n_parts, (int32_t)t);
        const um_forward_part_t *part = &lo->parts[p];
        size_t local = t - (size_t)lo->part_rows[p], q_len = (size_t)part->q_len;
        size_t pos = (size_t)part->q_start + local % q_len;
        if (token)
            *token = part->ids[(local / q_len) * (size_t)part->seq_len + pos];
        return pos;
    }
    size_t pos = (size_t)lo->q_start + t % (size_t)lo->q_len;
    if (token)
        *token = ids[(t / (size_t)lo->q_len) * (size_t)lo->seq_len + pos];
    return pos;
}

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
    size_t sizes[10] = {
        T * d, T * d, T * q_dim, T * kv_dim, T * kv_dim, T * mlp, T * mlp,
        um_attention_scratch_floats(att, n_threads), 2 * n_rows * d, (size_t)n_threads * d,
    };
    size_t total = 0;
    for (size_t i = 0; i < 10; i++)
        total += s_round16(sizes[i]);

    float *ws;
    int rc = um_model_workspace(m, total, &ws);
    if (rc != 0) {
        um_error("forward", "out of memory growing the workspace to %.1f MB for %zu positions",
                 total * 4.0 / 1e6, T);
        return rc;
    }
    float **views[10] = {&b->x, &b->h, &b->q, &b->k, &b->v, &b->gate, &b->up, &b->scores,
                         &b->rows, &b->tmp};
    for (size_t i = 0; i < 10; i++) {
        *views[i] = ws;
        ws += s_round16(sizes[i]);
    }
    return 0;
}

/* ------------------------------------------------------------------------- */
/* Row-wise steps                                                             */

/* Add row `row` of an embedding table to out (or copy it when add is 0). */
static void s_embed_row(const um_kernel_table_t *k, const um_embedding_t *e, size_t row,
                        int32_t d, float *out, float *tmp, int add)
{
    float *dst = add ? tmp : out;
    if (e->bf16)
        k->bf16_to_f32(dst, (const uint16_t *)e->data + row * d, (size_t)d);
    else
        memcpy(dst, (const float *)e->data + row * d, (size_t)d * sizeof *dst);
    if (add)
        k->add(out, tmp, d);
}

/*
 * Token embeddings, plus, for the BERT family, learned positions and token type 0
 * followed by the embedding LayerNorm, for the T rows of the layout. tmp has one row of
 * d floats per thread.
 */
static void s_embed(const um_kernel_table_t *k, const um_model_config_t *c,
                    const um_model_weights_t *w, const int32_t *ids, size_t T,
                    const s_layout_t *lo, float *x, float *tmp)
{
    int32_t d = c->d_model;
#pragma omp parallel for schedule(static) if (T > 1)
    for (size_t t = 0; t < T; t++) {
        float *row = x + t * d, *scratch = tmp + (size_t)s_thread_index() * d;
        int32_t token;
        size_t pos = s_row_position(lo, ids, t, &token);
        s_embed_row(k, &w->wte, (size_t)token, d, row, scratch, 0);
        if (c->rope)
            continue;
        s_embed_row(k, &w->wpe, pos, d, row, scratch, 1);
        if (w->wtte.data)
            s_embed_row(k, &w->wtte, 0, d, row, scratch, 1);
        k->layernorm(scratch, row, w->emb_norm, w->emb_norm_bias, d, c->rms_norm_eps);
        memcpy(row, scratch, (size_t)d * sizeof *row);
    }
}

/* The family's norm over T rows of d: RMSNorm, or LayerNorm with its bias. */
static void s_norm_rows(const um_kernel_table_t *k, const um_model_config_t *c, float *out,
                        const float *x, const float *w, const float *bias, size_t T)
{
    int32_t d = c->d_model;
#pragma omp parallel for schedule(static) if (T > 1)
    for (size_t t = 0; t < T; t++) {
        if (c->layer_norm)
            k->layernorm(out + t * d, x + t * d, w, bias, d, c->rms_norm_eps);
        else
            k->rmsnorm(out + t * d, x + t * d, w, d, c->rms_norm_eps);
    }
}

/* y[t] += bias for T rows of n with row stride ld; a NULL bias adds nothing. */
static void s_bias_rows(const um_kernel_table_t *k, float *y, const float *bias, size_t T,
                        int32_t n, int32_t ld)
{
    if (!bias)
        return;
#pragma omp parallel for schedule(static) if (T > 1)
    for (size_t t = 0; t < T; t++)
        k->add(y + t * ld, bias, n);
}

/*
 * Rotate q and k by their position within the sequence (RoPE families only), and fold
 * the attention scale 1/sqrt(head_dim) into q so that the score product needs no
 * scaling of its own. The scale is applied after the rotation, so it changes no result
 * beyond f32 rounding. Positions come from the layout.
 */
static void s_rope_rows(const um_kernel_table_t *k, const um_model_config_t *c,
                        const float *rope, float *q, float *kk, size_t T, const s_layout_t *lo)
{
    int32_t hd = c->head_dim;
    size_t q_dim = (size_t)c->n_heads * hd, kv_dim = (size_t)c->n_kv_heads * hd;
    float scale = (float)(1.0 / sqrt((double)hd));
#pragma omp parallel for schedule(static) if (T > 1)
    for (size_t t = 0; t < T; t++) {
        float *q_row = q + t * q_dim, *k_row = kk + t * kv_dim;
        if (c->rope) {
            const float *cos_sin = rope + s_row_position(lo, NULL, t, NULL) * hd;
            for (int32_t h = 0; h < c->n_heads; h++)
                k->rope(q_row + (size_t)h * hd, cos_sin, hd);
            for (int32_t h = 0; h < c->n_kv_heads; h++)
                k->rope(k_row + (size_t)h * hd, cos_sin, hd);
        }
        for (size_t i = 0; i < q_dim; i++)
            q_row[i] *= scale;
    }
}

/* The MLP's activation in place on gate: silu(gate) * up, or GELU(gate). */
static void s_activation_rows(const um_kernel_table_t *k, const um_model_config_t *c,
                              float *gate, const float *up, size_t T, int32_t n)
{
#pragma omp parallel for schedule(static) if (T > 1)
    for (size_t t = 0; t < T; t++) {
        if (c->activation == UM_ACT_SWIGLU)
            k->silu_mul(gate + t * n, gate + t * n, up + t * n, n);
        else if (c->activation == UM_ACT_GELU_TANH)
            k->gelu_tanh(gate + t * n, gate + t * n, n);
        else
            k->gelu_erf(gate + t * n, gate + t * n, n);
    }
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

/* Apply up to three weights to the same input rows x (the second and third may be NULL). */
static int s_apply3(const um_gemm_weight_t *w1, float *y1, int32_t ld1,
                    const um_gemm_weight_t *w2, float *y2, int32_t ld2,
                    const um_gemm_weight_t *w3, float *y3, int32_t ld3, int32_t T,
                    const float *x, int32_t ldx)
{
    int rc = um_gemm_weight_apply(w1, T, x, ldx, y1, ld1, 0);
    if (rc == 0 && w2)
        rc = um_gemm_weight_apply(w2, T, x, ldx, y2, ld2, 0);
    if (rc == 0 && w3)
        rc = um_gemm_weight_apply(w3, T, x, ldx, y3, ld3, 0);
    return rc;
}

/*
 * A pass's view of the block cache: this layer's key and value rows, (n_seq, seq_len,
 * kv_dim) each, and where the query window starts. NULL k for an uncached pass.
 */
typedef struct s_layer_cache {
    float *k, *v;
    int32_t q_start;
} s_layer_cache_t;

/*
 * Write the window's fresh keys and values (T rows, q_len per sequence) over their rows
 * of the layer's cache, so that attention reads the cached rows outside the window and
 * the fresh ones inside it.
 */
static void s_cache_store(const um_model_config_t *c, const um_attention_shape_t *att,
                          const s_layer_cache_t *lc, const float *k_rows, const float *v_rows)
{
    size_t kv_dim = (size_t)c->n_kv_heads * c->head_dim, q_len = (size_t)att->q_len;
    size_t bytes = q_len * kv_dim * sizeof(float);
    for (int32_t s = 0; s < att->n_seq; s++) {
        size_t dst = ((size_t)s * att->seq_len + (size_t)lc->q_start) * kv_dim;
        memcpy(lc->k + dst, k_rows + (size_t)s * q_len * kv_dim, bytes);
        memcpy(lc->v + dst, v_rows + (size_t)s * q_len * kv_dim, bytes);
    }
}

/*
 * Attention of a parts pass at layer `layer`: each part's window queries attend over its
 * own sequences only. A part with a cache first writes its window's keys and values over
 * their rows of the cache and then attends over every cached row.
 */
static int s_attention_parts(const um_kernel_table_t *k, const um_model_config_t *c,
                             const s_buffers_t *b, const s_layout_t *lo,
                             const um_attention_shape_t *att, int32_t layer)
{
    size_t q_dim = (size_t)c->n_heads * c->head_dim;
    size_t kv_dim = (size_t)c->n_kv_heads * c->head_dim;
    for (int32_t p = 0; p < lo->n_parts; p++) {
        const um_forward_part_t *part = &lo->parts[p];
        um_attention_shape_t shape = *att;
        shape.n_seq = part->n_seq;
        shape.seq_len = part->seq_len;
        shape.q_len = part->q_len;
        size_t first = (size_t)lo->part_rows[p];
        const float *keys = b->k + first * kv_dim, *values = b->v + first * kv_dim;
        if (part->cache) {
            const um_kv_cache_t *cache = part->cache;
            size_t offset = (size_t)layer * cache->n_seq * cache->seq_len * cache->kv_dim;
            const s_layer_cache_t lc = {cache->k + offset, cache->v + offset, part->q_start};
            s_cache_store(c, &shape, &lc, keys, values);
            keys = lc.k;
            values = lc.v;
        }
        int rc = um_attention(k, &shape, b->q + first * q_dim, keys, values, b->scores);
        if (rc)
            return rc;
    }
    return 0;
}

/*
 * Attention sub-layer on input rows `in`: q, k, v (with biases where the family has
 * them), RoPE and scale, the fused attention, and the output projection added into x
 * (plus its bias). With a cache the window's keys and values first replace theirs in
 * the cache, and the window's queries attend over every cached row.
 */
static int s_attention_sublayer(const um_kernel_table_t *k, const um_model_config_t *c,
                                const um_block_weights_t *w, const float *rope,
                                const s_buffers_t *b, const float *in, const s_layout_t *lo,
                                const um_attention_shape_t *att, const s_layer_cache_t *lc,
                                int32_t layer, um_forward_profile_t *prof)
{
    int32_t T = s_layout_rows(lo), d = c->d_model;
    int32_t q_dim = c->n_heads * c->head_dim, kv_dim = c->n_kv_heads * c->head_dim;
    int rc = 0;

    S_TIMED(prof, gemm_ms,
            rc = s_apply3(w->q_proj, b->q, q_dim, w->k_proj, b->k, kv_dim, w->v_proj, b->v,
                          kv_dim, T, in, d));
    if (rc)
        return rc;
    S_TIMED(prof, other_ms, {
        s_bias_rows(k, b->q, w->q_bias, T, q_dim, q_dim);
        s_bias_rows(k, b->k, w->k_bias, T, kv_dim, kv_dim);
        s_bias_rows(k, b->v, w->v_bias, T, kv_dim, kv_dim);
    });
    S_TIMED(prof, rope_ms, s_rope_rows(k, c, rope, b->q, b->k, T, lo));
    const float *keys = b->k, *values = b->v;
    if (lo->parts) {
        S_TIMED(prof, attention_ms, rc = s_attention_parts(k, c, b, lo, att, layer));
    } else if (lc) {
        /*
         * The cache stores keys after RoPE. Fast-dLLM caches them before RoPE and rotates
         * the whole key set again on every call, with the absolute positions 0..L-1.
         * Positions here are absolute too. So the rotated row of position p is the same
         * f32 value whenever it is computed from the same pre-RoPE row. Storing it rotated
         * gives the same attention and saves one rotation per cached row and call.
         */
        S_TIMED(prof, other_ms, s_cache_store(c, att, lc, b->k, b->v));
        keys = lc->k;
        values = lc->v;
    }
    if (!lo->parts)
        S_TIMED(prof, attention_ms, rc = um_attention(k, att, b->q, keys, values, b->scores));
    if (rc)
        return rc;
    S_TIMED(prof, gemm_ms, rc = um_gemm_weight_apply(w->attn_out, T, b->q, q_dim, b->x, d, 1));
    S_TIMED(prof, other_ms, s_bias_rows(k, b->x, w->attn_out_bias, T, d, d));
    return rc;
}

/* MLP sub-layer on input rows `in`, its output added into x (plus the output bias). */
static int s_mlp_sublayer(const um_kernel_table_t *k, const um_model_config_t *c,
                          const um_block_weights_t *w, const s_buffers_t *b, const float *in,
                          int32_t T, um_forward_profile_t *prof)
{
    int32_t d = c->d_model, mlp = c->mlp_hidden_size;
    int rc = 0;
    S_TIMED(prof, gemm_ms,
            rc = s_apply3(w->ff_proj, b->gate, mlp, w->up_proj, b->up, mlp, NULL, NULL, 0, T,
                          in, d));
    if (rc)
        return rc;
    S_TIMED(prof, other_ms, s_bias_rows(k, b->gate, w->ff_proj_bias, T, mlp, mlp));
    S_TIMED(prof, activation_ms, s_activation_rows(k, c, b->gate, b->up, T, mlp));
    S_TIMED(prof, gemm_ms, rc = um_gemm_weight_apply(w->ff_out, T, b->gate, mlp, b->x, d, 1));
    S_TIMED(prof, other_ms, s_bias_rows(k, b->x, w->ff_out_bias, T, d, d));
    return rc;
}

/*
 * One block. Pre-norm (LLaDA, Dream): x += attention(norm(x)); x += mlp(norm(x)).
 * Post-norm (BERT): x = norm(x + attention(x)); x = norm(x + mlp(x)). The post-norm
 * writes into h and copies back, since the sub-layers read x as their input.
 */
static int s_block(const um_kernel_table_t *k, const um_model_config_t *c,
                   const um_block_weights_t *w, const float *rope, const s_buffers_t *b,
                   const s_layout_t *lo, const um_attention_shape_t *att,
                   const s_layer_cache_t *lc, int32_t layer, um_forward_profile_t *prof)
{
    int32_t T = s_layout_rows(lo), d = c->d_model;
    size_t bytes = (size_t)T * d * sizeof(float);
    int rc;

    if (!c->post_norm) {
        S_TIMED(prof, norm_ms, s_norm_rows(k, c, b->h, b->x, w->attn_norm, NULL, T));
        if ((rc = s_attention_sublayer(k, c, w, rope, b, b->h, lo, att, lc, layer, prof)))
            return rc;
        S_TIMED(prof, norm_ms, s_norm_rows(k, c, b->h, b->x, w->ff_norm, NULL, T));
        return s_mlp_sublayer(k, c, w, b, b->h, T, prof);
    }

    /* The sub-layers add into x, so they read a copy of x from h. */
    memcpy(b->h, b->x, bytes);
    if ((rc = s_attention_sublayer(k, c, w, rope, b, b->h, lo, att, lc, layer, prof)))
        return rc;
    S_TIMED(prof, norm_ms, s_norm_rows(k, c, b->h, b->x, w->attn_norm, w->attn_norm_bias, T));
    memcpy(b->x, b->h, bytes);
    if ((rc = s_mlp_sublayer(k, c, w, b, b->h, T, prof)))
        return rc;
    S_TIMED(prof, norm_ms, s_norm_rows(k, c, b->h, b->x, w->ff_norm, w->ff_norm_bias, T));
    memcpy(b->x, b->h, bytes);
    return 0;
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

/*
 * Map position r (an index into the n_seq * seq_len positions of a uniform layout) to the
 * window row whose hidden state gives its logits. That is r itself, or the position
 * before it within its sequence for families that shift their logits (Dream). Returns
 * the index into the window's rows (q_len per sequence), or -1 when the position is
 * outside the window.
 */
static int32_t s_head_row(const um_model_config_t *c, int32_t r, const s_layout_t *lo)
{
    int32_t seq_len = lo->seq_len, q_start = lo->q_start, q_len = lo->q_len;
    int32_t s = r / seq_len, p = r % seq_len;
    if (c->logits_shift && p != 0)
        p--;
    if (p < q_start || p >= q_start + q_len)
        return -1;
    return s * q_len + (p - q_start);
}

/*
 * The LM head for n_out rows: row i reads the hidden state of position rows[i] (i when
 * rows is NULL) as s_head_row maps it. Pre-norm families apply the final norm; the BERT
 * family its MLM transform (dense, GELU, LayerNorm). Then the head product and its bias.
 */
static int s_head(const um_kernel_table_t *k, const um_model_config_t *c,
                  const um_model_weights_t *w, const s_buffers_t *b, const int32_t *rows,
                  int32_t n_out, const s_layout_t *lo, float *logits,
                  um_forward_profile_t *prof)
{
    int32_t d = c->d_model, V = c->embedding_size;
    float *in = b->rows, *scratch = b->rows + (size_t)n_out * d;
    int rc = 0;

    double t0 = prof ? s_now_ms() : 0.0;
#pragma omp parallel for schedule(static) if (n_out > 1)
    for (int32_t i = 0; i < n_out; i++) {
        /* A parts pass lists pass rows, which um_model_forward_parts mapped already. */
        int32_t r = lo->parts ? rows[i] : s_head_row(c, rows ? rows[i] : i, lo);
        const float *x = b->x + (size_t)r * d;
        if (c->mlm_head)
            memcpy(scratch + (size_t)i * d, x, (size_t)d * sizeof *x);
        else
            k->rmsnorm(in + (size_t)i * d, x, w->ln_f, d, c->rms_norm_eps);
    }
    if (prof)
        prof->norm_ms += s_now_ms() - t0;

    if (c->mlm_head) {
        S_TIMED(prof, gemm_ms,
                rc = um_gemm_weight_apply(w->head_dense, n_out, scratch, d, in, d, 0));
        if (rc)
            return rc;
        S_TIMED(prof, other_ms, s_bias_rows(k, in, w->head_dense_bias, n_out, d, d));
        S_TIMED(prof, activation_ms, s_activation_rows(k, c, in, NULL, n_out, d));
        S_TIMED(prof, norm_ms,
                s_norm_rows(k, c, scratch, in, w->head_norm, w->head_norm_bias, n_out));
        in = scratch;
    }
    S_TIMED(prof, lm_head_ms, rc = um_gemm_weight_apply(w->lm_head, n_out, in, d, logits, V, 0));
    if (rc == 0)
        S_TIMED(prof, other_ms, s_bias_rows(k, logits, w->lm_head_bias, n_out, V, V));
    return rc;
}

/*
 * The forward pass over the rows of the layout; rows == NULL computes logits for every
 * position (whole sequences only). cache is NULL, or (uniform layouts only) receives the
 * window's keys and values and supplies the others. A parts layout reads its ids from its
 * parts, and its rows are pass rows.
 */
static int s_forward(um_model_t *m, um_kv_cache_t *cache, const int32_t *ids,
                     const s_layout_t *lo, const int32_t *rows, int32_t n_rows, float *logits)
{
    const um_model_config_t *c = um_model_config(m);
    const um_model_weights_t *w = um_model_weights(m);
    const um_kernel_table_t *k = um_kernels();
    um_forward_profile_t *prof = um_model_profile(m);
    int32_t T = s_layout_rows(lo);
    int32_t n_out = rows ? n_rows : T;
    int n_threads = s_max_threads();
    double start = prof ? s_now_ms() : 0.0;
    const um_attention_shape_t att = {
        .n_seq = lo->n_seq, .seq_len = lo->seq_len, .q_len = lo->q_len,
        .n_heads = c->n_heads, .n_kv_heads = c->n_kv_heads, .head_dim = c->head_dim,
        .q_stride = c->n_heads * c->head_dim, .kv_stride = c->n_kv_heads * c->head_dim,
    };

    s_buffers_t b;
    int rc = s_buffers_get(m, (size_t)T, &att, (size_t)n_out, n_threads, &b);
    if (rc != 0)
        return rc;

    S_TIMED(prof, other_ms,
            s_embed(k, c, w, ids, (size_t)T, lo, b.x, b.tmp));
    for (int32_t l = 0; l < c->n_layers; l++) {
        s_layer_cache_t lc = {0};
        if (cache) {
            size_t layer = (size_t)l * cache->n_seq * cache->seq_len * cache->kv_dim;
            lc = (s_layer_cache_t){cache->k + layer, cache->v + layer, lo->q_start};
        }
        rc = s_block(k, c, &w->blocks[l], um_model_rope_table(m), &b, lo, &att,
                     cache ? &lc : NULL, l, prof);
        if (rc != 0) {
            um_error("forward", "block %d of %d failed: %s", l, c->n_layers, um_strerror(rc));
            return rc;
        }
    }
    if (n_out > 0)
        rc = s_head(k, c, w, &b, rows, n_out, lo, logits, prof);
    if (rc != 0)
        um_error("forward", "LM head for %d rows failed: %s", n_out, um_strerror(rc));
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
    const s_layout_t lo = {.n_seq = n_seq, .seq_len = seq_len, .q_len = seq_len};
    return s_forward(model, NULL, ids, &lo, NULL, 0, logits);
}

int um_model_forward_rows(um_model_t *model, const int32_t *ids, int32_t n_seq,
                          int32_t seq_len, const int32_t *rows, int32_t n_rows,
                          float *logits)
{
    int rc = s_check_args(model, ids, n_seq, seq_len, rows, n_rows, logits, 0);
    if (rc != 0 || n_rows == 0)
        return rc;
    const s_layout_t lo = {.n_seq = n_seq, .seq_len = seq_len, .q_len = seq_len};
    return s_forward(model, NULL, ids, &lo, rows, n_rows, logits);
}

int um_model_forward_ragged(um_model_t *model, const int32_t *ids,
                            const int32_t *seq_offsets, int32_t n_seq, const int32_t *rows,
                            int32_t n_rows, float *logits)
{
    if (!model || !ids || !seq_offsets || n_rows < 0 || (n_rows > 0 && (!rows || !logits)))
        return UM_EINVAL;
    const um_model_config_t *c = um_model_config(model);
    if (n_seq < 1 || seq_offsets[0] != 0) {
        um_warn("forward", "cannot run %d ragged sequences whose offsets start at %d: pass at "
                "least one sequence and offsets from 0", n_seq, n_seq > 0 ? seq_offsets[0] : 0);
        return UM_ERANGE;
    }
    for (int32_t s = 0; s < n_seq; s++) {
        int64_t len = (int64_t)seq_offsets[s + 1] - seq_offsets[s];
        if (len < 1 || len > c->max_sequence_length) {
            um_warn("forward", "ragged sequence %d has %lld tokens (offsets %d to %d): each "
                    "must have 1 to %d (max_sequence_length)", s, (long long)len,
                    seq_offsets[s], seq_offsets[s + 1], c->max_sequence_length);
            return UM_ERANGE;
        }
    }
    /* Every sequence is at least 1 token, so the ascending offsets fit in int32_t. */
    int32_t T = seq_offsets[n_seq];
    for (int32_t i = 0; i < n_rows; i++) {
        if (rows[i] < 0 || rows[i] >= T) {
            um_warn("forward", "row %d (entry %d of rows) is outside the %d positions of %d "
                    "ragged sequences", rows[i], i, T, n_seq);
            return UM_ERANGE;
        }
    }
    if (n_rows == 0)
        return 0;

    /*
     * Each sequence becomes an uncached part. The parts pass writes its logits grouped
     * by part, so rows are sorted by sequence (a counting sort that keeps their order
     * within a sequence) and the logits moved back to the caller's order.
     */
    const size_t E = (size_t)c->embedding_size;
    um_forward_part_t *parts = calloc((size_t)n_seq, sizeof *parts);
    int32_t *first = calloc((size_t)n_seq + 1, sizeof *first);
    int32_t *local = malloc((size_t)n_rows * sizeof *local);
    int32_t *order = malloc((size_t)n_rows * sizeof *order);
    float *grouped = malloc((size_t)n_rows * E * sizeof *grouped);
    int rc = parts && first && local && order && grouped ? 0 : UM_ENOMEM;
    if (rc == 0) {
        int32_t *seq = order; /* each row's sequence, until order is written */
        for (int32_t i = 0; i < n_rows; i++) {
            seq[i] = s_find_offset(seq_offsets, n_seq, rows[i]);
            first[seq[i] + 1]++;
        }
        for (int32_t sq = 0; sq < n_seq; sq++)
            first[sq + 1] += first[sq];
        int32_t *next = malloc((size_t)n_seq * sizeof *next);
        int32_t *slot = malloc((size_t)n_rows * sizeof *slot);
        if (!next || !slot) {
            rc = UM_ENOMEM;
        } else {
            memcpy(next, first, (size_t)n_seq * sizeof *next);
            for (int32_t i = 0; i < n_rows; i++) {
                slot[i] = next[seq[i]]++;
                local[slot[i]] = rows[i] - seq_offsets[seq[i]];
            }
            for (int32_t i = 0; i < n_rows; i++)
                order[slot[i]] = i;
            for (int32_t sq = 0; sq < n_seq; sq++) {
                int32_t len = seq_offsets[sq + 1] - seq_offsets[sq];
                parts[sq] = (um_forward_part_t){
                    .ids = ids + seq_offsets[sq], .n_seq = 1, .seq_len = len, .q_len = len,
                    .rows = local + first[sq], .n_rows = first[sq + 1] - first[sq]};
            }
            rc = um_model_forward_parts(model, parts, n_seq, grouped);
            for (int32_t j = 0; rc == 0 && j < n_rows; j++)
                memcpy(logits + (size_t)order[j] * E, grouped + (size_t)j * E,
                       E * sizeof *logits);
        }
        free(next);
        free(slot);
    }
    free(parts);
    free(first);
    free(local);
    free(order);
    free(grouped);
    return rc;
}

/* ------------------------------------------------------------------------- */
/* Block cache                                                                */

int um_kv_cache_new(const um_model_t *model, int32_t n_seq, int32_t seq_len,
                    um_kv_cache_t **out)
{
    *out = NULL;
    const um_model_config_t *c = um_model_config(model);
    if (n_seq < 1 || seq_len < 1 || seq_len > c->max_sequence_length)
        return UM_ERANGE;
    um_kv_cache_t *cache = calloc(1, sizeof *cache);
    if (!cache)
        return UM_ENOMEM;
    *cache = (um_kv_cache_t){.n_layers = c->n_layers, .n_seq = n_seq, .seq_len = seq_len,
                             .kv_dim = c->n_kv_heads * c->head_dim};
    size_t n = (size_t)cache->n_layers * n_seq * seq_len * cache->kv_dim;
    size_t bytes = s_round16(n) * sizeof(float);
    cache->k = aligned_alloc(64, bytes);
    cache->v = aligned_alloc(64, bytes);
    if (!cache->k || !cache->v) {
        um_error("forward", "out of memory for a block cache of %.1f MB (%d layers, %d "
                 "sequences of %d positions)", 2.0 * bytes / 1e6, cache->n_layers, n_seq,
                 seq_len);
        um_kv_cache_destroy(&cache);
        return UM_ENOMEM;
    }
    *out = cache;
    return 0;
}

void um_kv_cache_destroy(um_kv_cache_t **cache)
{
    if (!cache || !*cache)
        return;
    free((*cache)->k);
    free((*cache)->v);
    free(*cache);
    *cache = NULL;
}

size_t um_kv_cache_bytes(const um_kv_cache_t *cache)
{
    return 2 * (size_t)cache->n_layers * cache->n_seq * cache->seq_len * cache->kv_dim *
           sizeof(float);
}

int um_model_forward_cached(um_model_t *model, um_kv_cache_t *cache, const int32_t *ids,
                            int32_t n_seq, int32_t seq_len, int32_t q_start, int32_t q_len,
                            const int32_t *rows, int32_t n_rows, float *logits)
{
    if (!cache || !rows)
        return UM_EINVAL;
    int rc = s_check_args(model, ids, n_seq, seq_len, rows, n_rows, logits, 0);
    if (rc != 0)
        return rc;
    const um_model_config_t *c = um_model_config(model);
    if (cache->n_seq != n_seq || cache->seq_len != seq_len || cache->n_layers != c->n_layers
        || cache->kv_dim != c->n_kv_heads * c->head_dim) {
        um_warn("forward", "block cache for %d sequences of %d positions cannot serve %d "
                "sequences of %d: create the cache for the canvas it serves", cache->n_seq,
                cache->seq_len, n_seq, seq_len);
        return UM_EINVAL;
    }
    if (q_start < 0 || q_len < 1 || q_len > seq_len - q_start) {
        um_warn("forward", "query window [%d, %d) is outside the %d positions", q_start,
                q_start + q_len, seq_len);
        return UM_ERANGE;
    }
    int whole = q_start == 0 && q_len == seq_len;
    if (!whole && !cache->filled) {
        um_warn("forward", "query window [%d, %d) needs a filled block cache: run the whole "
                "sequence first", q_start, q_start + q_len);
        return UM_EINVAL;
    }
    for (int32_t i = 0; i < n_rows; i++) {
        const s_layout_t lo = {.n_seq = n_seq, .seq_len = seq_len, .q_start = q_start,
                               .q_len = q_len};
        if (s_head_row(c, rows[i], &lo) < 0) {
            um_warn("forward", "row %d (entry %d of rows) reads a position outside the query "
                    "window [%d, %d)", rows[i], i, q_start, q_start + q_len);
            return UM_ERANGE;
        }
    }
    const s_layout_t lo = {.n_seq = n_seq, .seq_len = seq_len, .q_start = q_start,
                           .q_len = q_len};
    rc = s_forward(model, cache, ids, &lo, rows, n_rows, logits);
    if (rc == 0 && whole)
        cache->filled = 1;
    return rc;
}

/*
 * Check part p of a parts pass as its own call would (s_check_args and the window and
 * cache checks of um_model_forward_cached), logging what is wrong. Returns 0 or the
 * UM_E* code.
 */
static int s_check_part(const um_model_t *m, const um_forward_part_t *parts, int32_t p,
                        const float *logits)
{
    const um_forward_part_t *part = &parts[p];
    const um_model_config_t *c = um_model_config(m);
    int rc = s_check_args(m, part->ids, part->n_seq, part->seq_len, part->rows, part->n_rows,
                          logits, 0);
    if (rc != 0)
        return rc;
    if (part->q_start < 0 || part->q_len < 1 || part->q_len > part->seq_len - part->q_start) {
        um_warn("forward", "part %d: query window [%d, %d) is outside the %d positions", p,
                part->q_start, part->q_start + part->q_len, part->seq_len);
        return UM_ERANGE;
    }
    int whole = part->q_start == 0 && part->q_len == part->seq_len;
    const um_kv_cache_t *cache = part->cache;
    if (!cache && !whole) {
        um_warn("forward", "part %d: query window [%d, %d) needs a block cache: pass the "
                "whole sequence or a cache", p, part->q_start, part->q_start + part->q_len);
        return UM_EINVAL;
    }
    if (cache && (cache->n_seq != part->n_seq || cache->seq_len != part->seq_len
                  || cache->n_layers != c->n_layers
                  || cache->kv_dim != c->n_kv_heads * c->head_dim)) {
        um_warn("forward", "part %d: block cache for %d sequences of %d positions cannot "
                "serve %d sequences of %d: create the cache for the canvas it serves", p,
                cache->n_seq, cache->seq_len, part->n_seq, part->seq_len);
        return UM_EINVAL;
    }
    if (cache && !whole && !cache->filled) {
        um_warn("forward", "part %d: query window [%d, %d) needs a filled block cache: run "
                "the whole sequence first", p, part->q_start, part->q_start + part->q_len);
        return UM_EINVAL;
    }
    for (int32_t q = 0; cache && q < p; q++) {
        if (parts[q].cache == cache) {
            um_warn("forward", "parts %d and %d share one block cache: give each part its "
                    "own", q, p);
            return UM_EINVAL;
        }
    }
    return 0;
}

int um_model_forward_parts(um_model_t *model, const um_forward_part_t *parts,
                           int32_t n_parts, float *logits)
{
    if (!model || !parts || n_parts < 1)
        return UM_EINVAL;
    const um_model_config_t *c = um_model_config(model);
    int64_t n_pass_rows = 0, n_out = 0;
    int32_t longest = 0, n_seq = 0;
    for (int32_t p = 0; p < n_parts; p++) {
        int rc = s_check_part(model, parts, p, logits);
        if (rc != 0)
            return rc;
        n_pass_rows += (int64_t)parts[p].n_seq * parts[p].q_len;
        n_out += parts[p].n_rows;
        n_seq += parts[p].n_seq;
        if (parts[p].seq_len > longest)
            longest = parts[p].seq_len;
    }
    if (n_pass_rows > INT32_MAX || n_out > INT32_MAX) {
        um_warn("forward", "%d parts pass 2^31 rows: split the batch", n_parts);
        return UM_ERANGE;
    }
    if (n_out == 0)
        return 0;

    int32_t *part_rows = malloc((size_t)(n_parts + 1) * sizeof *part_rows);
    int32_t *rows = malloc((size_t)n_out * sizeof *rows);
    if (!part_rows || !rows) {
        free(part_rows);
        free(rows);
        return UM_ENOMEM;
    }
    /* Each part's positions become rows of the pass, as its own window maps them. */
    int rc = 0;
    int32_t out = 0;
    part_rows[0] = 0;
    for (int32_t p = 0; p < n_parts && rc == 0; p++) {
        const um_forward_part_t *part = &parts[p];
        part_rows[p + 1] = part_rows[p] + part->n_seq * part->q_len;
        const s_layout_t plo = {.n_seq = part->n_seq, .seq_len = part->seq_len,
                                .q_start = part->q_start, .q_len = part->q_len};
        for (int32_t i = 0; i < part->n_rows; i++) {
            int32_t r = s_head_row(c, part->rows[i], &plo);
            if (r < 0) {
                um_warn("forward", "part %d: row %d (entry %d of rows) reads a position "
                        "outside the query window [%d, %d)", p, part->rows[i], i,
                        part->q_start, part->q_start + part->q_len);
                rc = UM_ERANGE;
                break;
            }
            rows[out++] = part_rows[p] + r;
        }
    }
    if (rc == 0) {
        const s_layout_t lo = {.n_seq = n_seq, .seq_len = longest, .parts = parts,
                               .part_rows = part_rows, .n_parts = n_parts};
        rc = s_forward(model, NULL, NULL, &lo, rows, (int32_t)n_out, logits);
    }
    for (int32_t p = 0; rc == 0 && p < n_parts; p++)
        if (parts[p].cache && parts[p].q_start == 0 && parts[p].q_len == parts[p].seq_len)
            parts[p].cache->filled = 1;
    free(part_rows);
    free(rows);
    return rc;
}
