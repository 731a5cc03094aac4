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
 * of each of n_seq sequences of seq_len ids, q_len rows per sequence. Ragged (offsets
 * set): n_seq sequences of different lengths concatenated, sequence s being rows and
 * ids [offsets[s], offsets[s + 1]), every position a query row.
 */
typedef struct s_layout {
    int32_t n_seq, seq_len, q_start, q_len;
    const int32_t *offsets; /* (n_seq + 1) ascending, from 0; NULL when uniform */
} s_layout_t;

static int32_t s_layout_rows(const s_layout_t *lo)
{
    return lo->offsets ? lo->offsets[lo->n_seq] : lo->n_seq * lo->q_len;
}

/* The ragged sequence that row t belongs to: the last s with offsets[s] <= t. */
static int32_t s_seq_of_row(const s_layout_t *lo, int32_t t)
{
    int32_t lo_s = 0, hi_s = lo->n_seq - 1;
    while (lo_s < hi_s) {
        int32_t mid = lo_s + (hi_s - lo_s + 1) / 2;
        if (lo->offsets[mid] <= t)
            lo_s = mid;
        else
            hi_s = mid - 1;
    }
    return lo_s;
}

/* Position of row t within its sequence; sets *id to the index of its token in ids. */
static size_t s_row_position(const s_layout_t *lo, size_t t, size_t *id)
{
    if (lo->offsets) {
        *id = t;
        return t - (size_t)lo->offsets[s_seq_of_row(lo, (int32_t)t)];
    }
    size_t pos = (size_t)lo->q_start + t % (size_t)lo->q_len;
    *id = (t / (size_t)lo->q_len) * (size_t)lo->seq_len + pos;
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
        size_t id;
        size_t pos = s_row_position(lo, t, &id);
        s_embed_row(k, &w->wte, (size_t)ids[id], d, row, scratch, 0);
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
            size_t id;
            const float *cos_sin = rope + s_row_position(lo, t, &id) * hd;
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
 * Attention sub-layer on input rows `in`: q, k, v (with biases where the family has
 * them), RoPE and scale, the fused attention, and the output projection added into x
 * (plus its bias). With a cache the window's keys and values first replace theirs in
 * the cache, and the window's queries attend over every cached row.
 */
static int s_attention_sublayer(const um_kernel_table_t *k, const um_model_config_t *c,
                                const um_block_weights_t *w, const float *rope,
                                const s_buffers_t *b, const float *in, const s_layout_t *lo,
                                const um_attention_shape_t *att, const s_layer_cache_t *lc,
                                um_forward_profile_t *prof)
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
    if (lc) {
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
                   const s_layer_cache_t *lc, um_forward_profile_t *prof)
{
    int32_t T = s_layout_rows(lo), d = c->d_model;
    size_t bytes = (size_t)T * d * sizeof(float);
    int rc;

    if (!c->post_norm) {
        S_TIMED(prof, norm_ms, s_norm_rows(k, c, b->h, b->x, w->attn_norm, NULL, T));
        if ((rc = s_attention_sublayer(k, c, w, rope, b, b->h, lo, att, lc, prof)))
            return rc;
        S_TIMED(prof, norm_ms, s_norm_rows(k, c, b->h, b->x, w->ff_norm, NULL, T));
        return s_mlp_sublayer(k, c, w, b, b->h, T, prof);
    }

    /* The sub-layers add into x, so they read a copy of x from h. */
    memcpy(b->h, b->x, bytes);
    if ((rc = s_attention_sublayer(k, c, w, rope, b, b->h, lo, att, lc, prof)))
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
 * Map position r (an index into the n_seq * seq_len positions, or into the concatenated
 * ragged sequences) to the row whose hidden state gives its logits. That is r itself, or
 * the position before it within its sequence for families that shift their logits
 * (Dream). Returns the index into the pass's rows (q_len per sequence when uniform), or
 * -1 when the position is outside the window.
 */
static int32_t s_head_row(const um_model_config_t *c, int32_t r, const s_layout_t *lo)
{
    if (lo->offsets) {
        int first = r == lo->offsets[s_seq_of_row(lo, r)];
        return c->logits_shift && !first ? r - 1 : r;
    }
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
        int32_t r = s_head_row(c, rows ? rows[i] : i, lo);
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
 * window's keys and values and supplies the others.
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
        .n_seq = lo->n_seq, .seq_len = lo->seq_len, .q_len = lo->offsets ? 0 : lo->q_len,
        .n_heads = c->n_heads, .n_kv_heads = c->n_kv_heads, .head_dim = c->head_dim,
        .q_stride = c->n_heads * c->head_dim, .kv_stride = c->n_kv_heads * c->head_dim,
        .seq_offsets = lo->offsets,
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
                     cache ? &lc : NULL, prof);
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
    const s_layout_t lo = {n_seq, seq_len, 0, seq_len, NULL};
    return s_forward(model, NULL, ids, &lo, NULL, 0, logits);
}

int um_model_forward_rows(um_model_t *model, const int32_t *ids, int32_t n_seq,
                          int32_t seq_len, const int32_t *rows, int32_t n_rows,
                          float *logits)
{
    int rc = s_check_args(model, ids, n_seq, seq_len, rows, n_rows, logits, 0);
    if (rc != 0 || n_rows == 0)
        return rc;
    const s_layout_t lo = {n_seq, seq_len, 0, seq_len, NULL};
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
    int32_t longest = 0;
    for (int32_t s = 0; s < n_seq; s++) {
        int64_t len = (int64_t)seq_offsets[s + 1] - seq_offsets[s];
        if (len < 1 || len > c->max_sequence_length) {
            um_warn("forward", "ragged sequence %d has %lld tokens (offsets %d to %d): each "
                    "must have 1 to %d (max_sequence_length)", s, (long long)len,
                    seq_offsets[s], seq_offsets[s + 1], c->max_sequence_length);
            return UM_ERANGE;
        }
        if (len > longest)
            longest = (int32_t)len;
    }
    /* Every sequence is at least 1 token, so the ascending offsets fit in int32_t. */
    int32_t T = seq_offsets[n_seq];
    for (int32_t t = 0; t < T; t++) {
        if (ids[t] < 0 || ids[t] >= c->embedding_size) {
            um_warn("forward", "token id %d at row %d of the ragged batch is outside [0, %d) "
                    "(embedding_size)", ids[t], t, c->embedding_size);
            return UM_ERANGE;
        }
    }
    for (int32_t i = 0; i < n_rows; i++) {
        if (rows[i] < 0 || rows[i] >= T) {
            um_warn("forward", "row %d (entry %d of rows) is outside the %d positions of %d "
                    "ragged sequences", rows[i], i, T, n_seq);
            return UM_ERANGE;
        }
    }
    if (n_rows == 0)
        return 0;
    const s_layout_t lo = {n_seq, longest, 0, 0, seq_offsets};
    return s_forward(model, NULL, ids, &lo, rows, n_rows, logits);
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
        const s_layout_t lo = {n_seq, seq_len, q_start, q_len, NULL};
        if (s_head_row(c, rows[i], &lo) < 0) {
            um_warn("forward", "row %d (entry %d of rows) reads a position outside the query "
                    "window [%d, %d)", rows[i], i, q_start, q_start + q_len);
            return UM_ERANGE;
        }
    }
    const s_layout_t lo = {n_seq, seq_len, q_start, q_len, NULL};
    rc = s_forward(model, cache, ids, &lo, rows, n_rows, logits);
    if (rc == 0 && whole)
        cache->filled = 1;
    return rc;
}
