/*
 * Model loading: config.json, the safetensors weights bound by their LLaDA names,
 * and the per-model tables the forward pass needs (RoPE, workspace). The forward pass
 * itself is in forward.c.
 *
 * Owns the config, the mapped weights (F32 tensors are used in place), an f32 arena
 * holding widened copies of BF16 tensors, the RoPE table and the forward workspace.
 * Threading: loading and destroying are single-threaded; a loaded model is read-only
 * apart from its workspace, which one forward pass at a time may use. Loading opens no
 * OpenMP region on purpose: libgomp hangs in a child forked after the parent ran a
 * parallel region, and the Check runner loads a model once and forks a child per test.
 */
#include "model.h"

#include <jansson.h>
#include <limits.h>
#ifdef __GLIBC__
#include <malloc.h>
#endif
#include <math.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <unmaskd/error.h>

#include "kernels.h"
#include "log.h"
#include "model_internal.h"
#include "safetensors.h"

#define S_ALIGN 64

struct um_model {
    um_model_config_t config;
    char *dir;
    char dtype[8];               /* "f32", "bf16" or "mixed" */
    char backend[64];
    um_safetensors_t *weights_file; /* kept open only while F32 tensors point into it */
    void *arena;                 /* f32 copies of BF16 vectors, aligned copies of
                                  * misaligned tensors */
    um_wdtype_t weight_dtype;    /* dtype of the prepared weight matrices */
    size_t weight_bytes;         /* bytes of prepared weights not borrowed from the file */
    um_forward_profile_t *profile; /* attached by benchmarks, NULL otherwise */
    um_block_weights_t *blocks;  /* (n_layers) */
    um_model_weights_t weights;
    float *rope;                 /* (max_sequence_length, head_dim / 2, 2) */
    float *workspace;            /* forward buffers, laid out by forward.c */
    size_t workspace_floats;
    float *batch_logits;         /* a shared pass's logits, for the sampler's batches */
    size_t batch_logits_floats;
};


/* aligned_alloc needs a size that is a multiple of the alignment. */
static void *s_alloc_aligned(size_t bytes)
{
    size_t rounded = (bytes + S_ALIGN - 1) / S_ALIGN * S_ALIGN;
    return aligned_alloc(S_ALIGN, rounded ? rounded : S_ALIGN);
}

/* ------------------------------------------------------------------------- */
/* Weights                                                                    */

/*
 * One tensor the model expects: its name, shape and where it is bound. Exactly one of
 * vec (an f32 vector), mat (a prepared weight matrix) and emb (a table read row by row
 * in its stored dtype) is set; an embedding may also be prepared as the tied LM head
 * (tied_mat), unless the slot at index untied_by found a tensor of its own.
 */
typedef struct s_slot {
    char name[128];
    int32_t ndim;
    int64_t shape[2];
    int optional;              /* a missing tensor leaves the binding NULL */
    const float **vec;
    um_gemm_weight_t **mat;
    um_embedding_t *emb;
    um_gemm_weight_t **tied_mat;
    long untied_by;            /* index of the slot that unties tied_mat, or -1 */
    const um_tensor_view_t *view;
} s_slot_t;

/* A growing list of slots. */
typedef struct s_slots {
    s_slot_t *items;
    size_t n, cap;
    int failed; /* out of memory */
} s_slots_t;

/* Append a slot named by fmt (a printf format) with shape [rows] or [rows, cols]. */
static s_slot_t *s_add(s_slots_t *list, int64_t rows, int64_t cols, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

static s_slot_t *s_add(s_slots_t *list, int64_t rows, int64_t cols, const char *fmt, ...)
{
    static s_slot_t sink; /* written to after a failed growth, never read */
    if (list->n == list->cap) {
        size_t cap = list->cap ? 2 * list->cap : 64;
        s_slot_t *grown = realloc(list->items, cap * sizeof *grown);
        if (!grown) {
            list->failed = 1;
            memset(&sink, 0, sizeof sink);
            return &sink;
        }
        list->items = grown;
        list->cap = cap;
    }
    s_slot_t *slot = &list->items[list->n++];
    memset(slot, 0, sizeof *slot);
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(slot->name, sizeof slot->name, fmt, ap);
    va_end(ap);
    slot->ndim = cols ? 2 : 1;
    slot->shape[0] = rows;
    slot->shape[1] = cols;
    slot->untied_by = -1;
    return slot;
}

static void s_vec(s_slots_t *l, const float **dst, int64_t n, const char *prefix,
                  const char *name)
{
    s_add(l, n, 0, "%s%s", prefix, name)->vec = dst;
}

static void s_mat(s_slots_t *l, um_gemm_weight_t **dst, int64_t rows, int64_t cols,
                  const char *prefix, const char *name)
{
    s_add(l, rows, cols, "%s%s", prefix, name)->mat = dst;
}

/* LLaDA's names: model.transformer.{wte, blocks.N.*, ln_f, ff_out}. */
static void s_slots_llada(um_model_t *m, s_slots_t *l)
{
    const um_model_config_t *c = &m->config;
    int64_t d = c->d_model, q_dim = (int64_t)c->n_heads * c->head_dim;
    int64_t kv_dim = (int64_t)c->n_kv_heads * c->head_dim, mlp = c->mlp_hidden_size;
    s_add(l, c->embedding_size, d, "model.transformer.wte.weight")->emb = &m->weights.wte;
    for (int32_t i = 0; i < c->n_layers; i++) {
        um_block_weights_t *b = &m->blocks[i];
        char p[64];
        snprintf(p, sizeof p, "model.transformer.blocks.%d.", i);
        s_vec(l, &b->attn_norm, d, p, "attn_norm.weight");
        s_mat(l, &b->q_proj, q_dim, d, p, "q_proj.weight");
        s_mat(l, &b->k_proj, kv_dim, d, p, "k_proj.weight");
        s_mat(l, &b->v_proj, kv_dim, d, p, "v_proj.weight");
        s_mat(l, &b->attn_out, d, q_dim, p, "attn_out.weight");
        s_vec(l, &b->ff_norm, d, p, "ff_norm.weight");
        s_mat(l, &b->ff_proj, mlp, d, p, "ff_proj.weight");
        s_mat(l, &b->up_proj, mlp, d, p, "up_proj.weight");
        s_mat(l, &b->ff_out, d, mlp, p, "ff_out.weight");
    }
    s_vec(l, &m->weights.ln_f, d, "model.transformer.", "ln_f.weight");
    s_mat(l, &m->weights.lm_head, c->embedding_size, d, "model.transformer.", "ff_out.weight");
}

/* Dream's (Qwen2's) names: model.{embed_tokens, layers.N.*, norm}, lm_head. */
static void s_slots_dream(um_model_t *m, s_slots_t *l)
{
    const um_model_config_t *c = &m->config;
    int64_t d = c->d_model, q_dim = (int64_t)c->n_heads * c->head_dim;
    int64_t kv_dim = (int64_t)c->n_kv_heads * c->head_dim, mlp = c->mlp_hidden_size;
    s_slot_t *wte = s_add(l, c->embedding_size, d, "model.embed_tokens.weight");
    wte->emb = &m->weights.wte;
    if (c->tied_embeddings)
        wte->tied_mat = &m->weights.lm_head;
    for (int32_t i = 0; i < c->n_layers; i++) {
        um_block_weights_t *b = &m->blocks[i];
        char p[64];
        snprintf(p, sizeof p, "model.layers.%d.", i);
        s_vec(l, &b->attn_norm, d, p, "input_layernorm.weight");
        s_mat(l, &b->q_proj, q_dim, d, p, "self_attn.q_proj.weight");
        s_vec(l, &b->q_bias, q_dim, p, "self_attn.q_proj.bias");
        s_mat(l, &b->k_proj, kv_dim, d, p, "self_attn.k_proj.weight");
        s_vec(l, &b->k_bias, kv_dim, p, "self_attn.k_proj.bias");
        s_mat(l, &b->v_proj, kv_dim, d, p, "self_attn.v_proj.weight");
        s_vec(l, &b->v_bias, kv_dim, p, "self_attn.v_proj.bias");
        s_mat(l, &b->attn_out, d, q_dim, p, "self_attn.o_proj.weight");
        s_vec(l, &b->ff_norm, d, p, "post_attention_layernorm.weight");
        s_mat(l, &b->ff_proj, mlp, d, p, "mlp.gate_proj.weight");
        s_mat(l, &b->up_proj, mlp, d, p, "mlp.up_proj.weight");
        s_mat(l, &b->ff_out, d, mlp, p, "mlp.down_proj.weight");
    }
    s_vec(l, &m->weights.ln_f, d, "model.", "norm.weight");
    if (!c->tied_embeddings)
        s_mat(l, &m->weights.lm_head, c->embedding_size, d, "", "lm_head.weight");
}

/*
 * BERT's and DistilBERT's names. Both tie the decoder to the word embeddings; a
 * checkpoint that stores the decoder weight anyway gets it bound as saved.
 */
static void s_slots_bert(um_model_t *m, s_slots_t *l)
{
    const um_model_config_t *c = &m->config;
    int distil = c->arch == UM_ARCH_DISTILBERT;
    int64_t d = c->d_model, mlp = c->mlp_hidden_size, V = c->embedding_size;
    um_model_weights_t *w = &m->weights;
    const char *e = distil ? "distilbert.embeddings." : "bert.embeddings.";

    s_slot_t *wte = s_add(l, V, d, "%sword_embeddings.weight", e);
    size_t wte_index = l->n - 1;
    wte->emb = &w->wte;
    wte->tied_mat = &w->lm_head;
    s_add(l, c->max_sequence_length, d, "%sposition_embeddings.weight", e)->emb = &w->wpe;
    if (!distil)
        s_add(l, c->type_vocab_size, d, "%stoken_type_embeddings.weight", e)->emb = &w->wtte;
    s_vec(l, &w->emb_norm, d, e, "LayerNorm.weight");
    s_vec(l, &w->emb_norm_bias, d, e, "LayerNorm.bias");

    for (int32_t i = 0; i < c->n_layers; i++) {
        um_block_weights_t *b = &m->blocks[i];
        char p[80];
        if (distil) {
            snprintf(p, sizeof p, "distilbert.transformer.layer.%d.", i);
            const struct {
                const char *mat;
                um_gemm_weight_t **w;
                const float **bias;
                int64_t rows, cols;
            } lin[] = {
                {"attention.q_lin", &b->q_proj, &b->q_bias, d, d},
                {"attention.k_lin", &b->k_proj, &b->k_bias, d, d},
                {"attention.v_lin", &b->v_proj, &b->v_bias, d, d},
                {"attention.out_lin", &b->attn_out, &b->attn_out_bias, d, d},
                {"ffn.lin1", &b->ff_proj, &b->ff_proj_bias, mlp, d},
                {"ffn.lin2", &b->ff_out, &b->ff_out_bias, d, mlp},
            };
            for (size_t j = 0; j < sizeof lin / sizeof lin[0]; j++) {
                s_add(l, lin[j].rows, lin[j].cols, "%s%s.weight", p, lin[j].mat)->mat = lin[j].w;
                s_add(l, lin[j].rows, 0, "%s%s.bias", p, lin[j].mat)->vec = lin[j].bias;
            }
            s_vec(l, &b->attn_norm, d, p, "sa_layer_norm.weight");
            s_vec(l, &b->attn_norm_bias, d, p, "sa_layer_norm.bias");
            s_vec(l, &b->ff_norm, d, p, "output_layer_norm.weight");
            s_vec(l, &b->ff_norm_bias, d, p, "output_layer_norm.bias");
            continue;
        }
        snprintf(p, sizeof p, "bert.encoder.layer.%d.", i);
        const struct {
            const char *mat;
            um_gemm_weight_t **w;
            const float **bias;
            int64_t rows, cols;
        } lin[] = {
            {"attention.self.query", &b->q_proj, &b->q_bias, d, d},
            {"attention.self.key", &b->k_proj, &b->k_bias, d, d},
            {"attention.self.value", &b->v_proj, &b->v_bias, d, d},
            {"attention.output.dense", &b->attn_out, &b->attn_out_bias, d, d},
            {"intermediate.dense", &b->ff_proj, &b->ff_proj_bias, mlp, d},
            {"output.dense", &b->ff_out, &b->ff_out_bias, d, mlp},
        };
        for (size_t j = 0; j < sizeof lin / sizeof lin[0]; j++) {
            s_add(l, lin[j].rows, lin[j].cols, "%s%s.weight", p, lin[j].mat)->mat = lin[j].w;
            s_add(l, lin[j].rows, 0, "%s%s.bias", p, lin[j].mat)->vec = lin[j].bias;
        }
        s_vec(l, &b->attn_norm, d, p, "attention.output.LayerNorm.weight");
        s_vec(l, &b->attn_norm_bias, d, p, "attention.output.LayerNorm.bias");
        s_vec(l, &b->ff_norm, d, p, "output.LayerNorm.weight");
        s_vec(l, &b->ff_norm_bias, d, p, "output.LayerNorm.bias");
    }

    const char *h = distil ? "" : "cls.predictions.";
    s_add(l, d, d, "%s%s.weight", h, distil ? "vocab_transform" : "transform.dense")->mat =
        &w->head_dense;
    s_add(l, d, 0, "%s%s.bias", h, distil ? "vocab_transform" : "transform.dense")->vec =
        &w->head_dense_bias;
    s_add(l, d, 0, "%s%s.weight", h, distil ? "vocab_layer_norm" : "transform.LayerNorm")->vec =
        &w->head_norm;
    s_add(l, d, 0, "%s%s.bias", h, distil ? "vocab_layer_norm" : "transform.LayerNorm")->vec =
        &w->head_norm_bias;
    s_add(l, V, 0, "%s", distil ? "vocab_projector.bias" : "cls.predictions.bias")->vec =
        &w->lm_head_bias;
    s_slot_t *decoder = s_add(l, V, d, "%s",
                              distil ? "vocab_projector.weight" : "cls.predictions.decoder.weight");
    decoder->mat = &w->lm_head;
    decoder->optional = 1;
    l->items[wte_index].untied_by = (long)(l->n - 1);
}

/* Tensors a family's checkpoints may carry that inference does not use. */
static int s_ignored(const um_model_config_t *c, const char *name)
{
    static const char *const bert_suffixes[] = {
        "embeddings.position_ids", "cls.predictions.decoder.bias",
    };
    static const char *const bert_prefixes[] = {"bert.pooler.", "cls.seq_relationship."};
    if (c->arch != UM_ARCH_BERT && c->arch != UM_ARCH_DISTILBERT)
        return c->arch == UM_ARCH_DREAM && strstr(name, "rotary_emb.inv_freq") != NULL;
    size_t n = strlen(name);
    for (size_t i = 0; i < sizeof bert_suffixes / sizeof bert_suffixes[0]; i++) {
        size_t k = strlen(bert_suffixes[i]);
        if (n >= k && strcmp(name + n - k, bert_suffixes[i]) == 0)
            return 1;
    }
    for (size_t i = 0; i < sizeof bert_prefixes / sizeof bert_prefixes[0]; i++)
        if (strncmp(name, bert_prefixes[i], strlen(bert_prefixes[i])) == 0)
            return 1;
    return 0;
}

/* List every tensor of the model's family with the shape config.json implies. */
static s_slot_t *s_slots_build(um_model_t *m, size_t *n_out)
{
    s_slots_t list = {0};
    switch (m->config.arch) {
    case UM_ARCH_LLADA:
        s_slots_llada(m, &list);
        break;
    case UM_ARCH_DREAM:
        s_slots_dream(m, &list);
        break;
    case UM_ARCH_BERT:
    case UM_ARCH_DISTILBERT:
        s_slots_bert(m, &list);
        break;
    }
    if (list.failed) {
        free(list.items);
        return NULL;
    }
    *n_out = list.n;
    return list.items;
}

/* Find each slot's tensor and check its shape; reject tensors no slot uses. */
static int s_slots_match(const um_model_t *m, s_slot_t *slots, size_t n_slots, char *err,
                         size_t errlen)
{
    const char *source = um_safetensors_source(m->weights_file);
    for (size_t i = 0; i < n_slots; i++) {
        s_slot_t *s = &slots[i];
        s->view = um_safetensors_find(m->weights_file, s->name);
        if (!s->view && s->optional)
            continue;
        if (!s->view)
            return um_fail(err, errlen, UM_ENOTFOUND,
                          "tensor %s is missing from %s: the checkpoint does not match "
                          "config.json", s->name, source);
        if (s->view->dtype != UM_DTYPE_F32 && s->view->dtype != UM_DTYPE_BF16)
            return um_fail(err, errlen, UM_EUNSUPPORTED,
                          "tensor %s in %s has dtype %s, but weights must be F32 or BF16: "
                          "convert the checkpoint", s->name, source,
                          um_dtype_name(s->view->dtype));
        int same = s->view->ndim == s->ndim;
        for (int32_t j = 0; same && j < s->ndim; j++)
            same = s->view->shape[j] == s->shape[j];
        if (!same) {
            char got[160], expected[160];
            um_shape_format(got, sizeof got, s->view->shape, s->view->ndim);
            um_shape_format(expected, sizeof expected, s->shape, s->ndim);
            return um_fail(err, errlen, UM_EFORMAT,
                          "tensor %s in %s has shape %s, expected %s: the checkpoint does not "
                          "match config.json", s->name, s->view->path, got, expected);
        }
    }

    size_t n_tensors = um_safetensors_count(m->weights_file);
    for (size_t i = 0; i < n_tensors; i++) {
        const um_tensor_view_t *t = um_safetensors_at(m->weights_file, i);
        int used = s_ignored(&m->config, t->name);
        for (size_t j = 0; j < n_slots && !used; j++)
            used = slots[j].view == t;
        if (!used)
            return um_fail(err, errlen, UM_EFORMAT,
                          "tensor %s in %s is not part of a %s model with %d layers: the "
                          "checkpoint does not match config.json", t->name, source,
                          m->config.model_type, m->config.n_layers);
    }
    return 0;
}

/* Whether t's data can be read in place: its address is aligned for its element type. */
static int s_aligned(const um_tensor_view_t *t)
{
    size_t align = t->dtype == UM_DTYPE_F32 ? sizeof(float) : sizeof(uint16_t);
    return (uintptr_t)t->data % align == 0;
}

/* Bytes a slot needs in the arena: f32 copies of vectors not usable in place, and
 * aligned copies of misaligned matrices and embeddings. */
static size_t s_slot_arena_bytes(const s_slot_t *slot)
{
    const um_tensor_view_t *t = slot->view;
    size_t bytes = 0;
    if (!t)
        return 0;
    if (slot->vec && (t->dtype != UM_DTYPE_F32 || !s_aligned(t)))
        bytes = (size_t)t->numel * sizeof(float);
    else if (!slot->vec && !s_aligned(t))
        bytes = t->nbytes;
    return (bytes + S_ALIGN - 1) / S_ALIGN * S_ALIGN;
}

/*
 * Choose the dtype of the matrix products when the options leave it to us: bf16 where
 * oneDNN runs it natively; elsewhere bf16 for an all-bf16 checkpoint, whose weights are
 * then widened to f32 inside each product (the same numbers in half the memory, and on
 * AVX2 no slower), and f32 otherwise.
 */
static um_wdtype_t s_weight_dtype(um_wdtype_t requested, int all_bf16)
{
    if (requested)
        return requested;
    return um_gemm_bf16_native() || all_bf16 ? UM_WDTYPE_BF16 : UM_WDTYPE_F32;
}

/* The dtype UNMASKD_WEIGHT_DTYPE requests: f32, bf16, int8, or auto (0) when unset. */
static int s_weight_dtype_env(um_wdtype_t *out, char *err, size_t errlen)
{
    const char *v = getenv("UNMASKD_WEIGHT_DTYPE");
    *out = 0;
    if (!v || !*v)
        return 0;
    if (um_wdtype_parse(v, out) != 0)
        return um_fail(err, errlen, UM_EINVAL,
                      "UNMASKD_WEIGHT_DTYPE is \"%s\": use f32, bf16, int8 or auto", v);
    return 0;
}

/* Bind one slot; data is the tensor's bytes (in the mapping or an aligned copy). */
static int s_slot_bind(um_model_t *m, const s_slot_t *slots, const s_slot_t *slot,
                       const void *data, char *err, size_t errlen)
{
    const um_tensor_view_t *t = slot->view;
    int bf16 = t->dtype == UM_DTYPE_BF16;
    if (slot->vec) {
        *slot->vec = data;
        return 0;
    }
    if (slot->emb) {
        slot->emb->data = data;
        slot->emb->bf16 = bf16;
    }
    um_gemm_weight_t **mat = slot->mat;
    if (!mat && slot->tied_mat && (slot->untied_by < 0 || !slots[slot->untied_by].view))
        mat = slot->tied_mat;
    if (!mat)
        return 0;
    /* int8 covers the LM head too: on the bundled model, keeping the head in f32 changed
     * the masked-objective loss by at most 2e-4 (tools/quant_ref.py quality), and the
     * head is a quarter of the 1b bench model's matrix weights. */
    int rc = um_gemm_weight_new((int32_t)t->shape[0], (int32_t)t->shape[1], data, bf16,
                                m->weight_dtype, mat);
    if (rc != 0)
        return um_fail(err, errlen, rc, "preparing tensor %s (%s) for the %s matrix products "
                       "failed: %s", slot->name, bf16 ? "bf16" : "f32",
                       um_wdtype_name(m->weight_dtype), um_strerror(rc));
    m->weight_bytes += um_gemm_weight_bytes(*mat);
    return 0;
}

/*
 * Bind every slot: vectors to f32 data, matrices to weights prepared for the matrix
 * products, the embedding table to its stored rows. The mapping stays open while any
 * binding points into it.
 */
static int s_slots_bind(um_model_t *m, s_slot_t *slots, size_t n_slots, char *err,
                        size_t errlen)
{
    size_t arena_bytes = 0, n_bf16 = 0, n_f32 = 0;
    for (size_t i = 0; i < n_slots; i++) {
        if (!slots[i].view)
            continue;
        if (slots[i].view->dtype == UM_DTYPE_BF16)
            n_bf16++;
        else
            n_f32++;
        arena_bytes += s_slot_arena_bytes(&slots[i]);
    }
    const char *dtype = "mixed";
    if (n_bf16 == 0)
        dtype = "f32";
    else if (n_f32 == 0)
        dtype = "bf16";
    snprintf(m->dtype, sizeof m->dtype, "%s", dtype);
    m->weight_dtype = s_weight_dtype(m->weight_dtype, n_f32 == 0);

    if (arena_bytes > 0) {
        m->arena = s_alloc_aligned(arena_bytes);
        if (!m->arena)
            return um_fail(err, errlen, UM_ENOMEM,
                          "out of memory allocating %.1f MB for aligned copies of weights "
                          "of %s", arena_bytes / 1e6, m->dir);
    }

    size_t offset = 0, n_mapped = 0;
    size_t n_bound = 0;
    for (size_t i = 0; i < n_slots; i++) {
        const s_slot_t *slot = &slots[i];
        const um_tensor_view_t *t = slot->view;
        if (!t)
            continue; /* an optional tensor the checkpoint does not have */
        n_bound++;
        size_t copy = s_slot_arena_bytes(slot);
        const void *data = t->data;
        if (copy > 0) {
            void *dst = (char *)m->arena + offset;
            if (slot->vec && t->dtype == UM_DTYPE_BF16)
                um_kernels()->bf16_to_f32(dst, (const uint16_t *)t->data, (size_t)t->numel);
            else
                memcpy(dst, t->data, t->nbytes);
            data = dst;
            offset += copy;
        }
        int rc = s_slot_bind(m, slots, slot, data, err, errlen);
        if (rc != 0)
            return rc;
        /* A matrix copied into its own layout no longer needs its mapped pages; dropping
         * them keeps a large checkpoint from counting twice in resident memory. */
        if (copy == 0 && slot->mat && !um_gemm_weight_borrows(*slot->mat))
            um_safetensors_release(t);
        if (copy == 0 && (!slot->mat || um_gemm_weight_borrows(*slot->mat)))
            n_mapped++;
    }

    /* With nothing pointing into it, the mapping is no longer needed. */
    if (n_mapped == 0)
        um_safetensors_close(&m->weights_file);
#ifdef __GLIBC__
    /* Preparing int8 weights frees a plain copy of each matrix after its reorder, and
     * glibc keeps such blocks in its heap: about 400 MiB of the 1b bench model's resident
     * memory until they are returned to the system here. */
    malloc_trim(0);
#endif
    um_info("model", "bound %zu tensors for %s matrix products: %zu read in place, "
            "%.1f MB copied, %.1f MB of prepared weights", n_bound,
            um_wdtype_name(m->weight_dtype), n_mapped, arena_bytes / 1e6,
            m->weight_bytes / 1e6);
    return 0;
}

static int s_weights_load(um_model_t *m, char *err, size_t errlen)
{
    int rc = um_safetensors_open_dir(m->dir, &m->weights_file, err, errlen);
    if (rc != 0)
        return rc;

    m->blocks = calloc((size_t)m->config.n_layers, sizeof *m->blocks);
    size_t n_slots = 0;
    s_slot_t *slots = m->blocks ? s_slots_build(m, &n_slots) : NULL;
    if (!slots)
        return um_fail(err, errlen, UM_ENOMEM, "out of memory binding the weights of %s",
                      m->dir);
    rc = s_slots_match(m, slots, n_slots, err, errlen);
    if (rc == 0)
        rc = s_slots_bind(m, slots, n_slots, err, errlen);
    free(slots);
    m->weights.blocks = m->blocks;
    return rc;
}

/* ------------------------------------------------------------------------- */
/* RoPE table                                                                 */

static int s_rope_build(um_model_t *m, char *err, size_t errlen)
{
    const um_model_config_t *c = &m->config;
    if (!c->rope)
        return 0;
    int32_t half = c->head_dim / 2;
    size_t n = (size_t)c->max_sequence_length * (size_t)half * 2;
    m->rope = s_alloc_aligned(n * sizeof *m->rope);
    if (!m->rope)
        return um_fail(err, errlen, UM_ENOMEM, "out of memory for the RoPE table of %s", m->dir);

    /* Angles in double, as the reference computes them, so positions near
     * max_sequence_length keep full precision before the f32 rounding. */
    double theta = c->rope_theta;
    for (int32_t pos = 0; pos < c->max_sequence_length; pos++) {
        float *row = m->rope + (size_t)pos * half * 2;
        for (int32_t i = 0; i < half; i++) {
            double inv_freq = 1.0 / pow(theta, (2.0 * i) / c->head_dim);
            double angle = pos * inv_freq;
            row[2 * i] = (float)cos(angle);
            row[2 * i + 1] = (float)sin(angle);
        }
    }
    return 0;
}

/* ------------------------------------------------------------------------- */
/* Public functions                                                           */

int um_model_load(const char *dir, um_model_t **out, char *err, size_t errlen)
{
    return um_model_load_opts(dir, NULL, out, err, errlen);
}

int um_model_load_opts(const char *dir, const um_model_options_t *opts, um_model_t **out,
                       char *err, size_t errlen)
{
    *out = NULL;
    if (err && errlen > 0)
        err[0] = '\0';

    int rc = 0;
    um_model_t *m = calloc(1, sizeof *m);
    if (!m || !(m->dir = strdup(dir))) {
        rc = um_fail(err, errlen, UM_ENOMEM, "out of memory loading the model in %s", dir);
        goto cleanup;
    }
    rc = um_model_config_load(dir, &m->config, err, errlen);
    if (rc != 0)
        goto cleanup;
    m->weight_dtype = opts ? opts->weight_dtype : 0; /* 0: chosen when the dtypes are known */
    if (!m->weight_dtype) {
        rc = s_weight_dtype_env(&m->weight_dtype, err, errlen);
        if (rc != 0)
            goto cleanup;
    }
    rc = s_weights_load(m, err, errlen);
    if (rc != 0)
        goto cleanup;
    rc = s_rope_build(m, err, errlen);
    if (rc != 0)
        goto cleanup;
    snprintf(m->backend, sizeof m->backend, "%s (%s)", um_gemm_backend(),
             um_wdtype_name(m->weight_dtype));

    const um_model_config_t *c = &m->config;
    um_debug("model",
            "loaded %s: %s, d_model %d, %d layers, %d heads (%d kv, head_dim %d), mlp %d, "
            "vocab %d (embedding %d), max_sequence_length %d, %s weights, mask id %d, "
            "kernels %s, matmul %s",
            dir, c->model_type, c->d_model, c->n_layers, c->n_heads, c->n_kv_heads,
            c->head_dim, c->mlp_hidden_size, c->vocab_size, c->embedding_size,
            c->max_sequence_length, m->dtype, c->mask_token_id, um_kernels()->isa,
            m->backend);
    *out = m;
    return 0;

cleanup:
    um_model_destroy(&m);
    return rc;
}

void um_model_destroy(um_model_t **model)
{
    if (!model || !*model)
        return;
    um_model_t *m = *model;
    free(m->workspace);
    free(m->batch_logits);
    free(m->rope);
    for (int32_t l = 0; m->blocks && l < m->config.n_layers; l++) {
        um_block_weights_t *b = &m->blocks[l];
        um_gemm_weight_t **mats[] = {&b->q_proj, &b->k_proj, &b->v_proj, &b->attn_out,
                                     &b->ff_proj, &b->up_proj, &b->ff_out};
        for (size_t i = 0; i < sizeof mats / sizeof mats[0]; i++)
            um_gemm_weight_destroy(mats[i]);
    }
    um_gemm_weight_destroy(&m->weights.lm_head);
    um_gemm_weight_destroy(&m->weights.head_dense);
    free(m->arena);
    free(m->blocks);
    um_safetensors_close(&m->weights_file);
    free(m->dir);
    free(m);
    *model = NULL;
}

const um_model_config_t *um_model_config(const um_model_t *model)
{
    return &model->config;
}

const char *um_model_dir(const um_model_t *model)
{
    return model->dir;
}

const char *um_model_dtype(const um_model_t *model)
{
    return model->dtype;
}

const char *um_model_backend(const um_model_t *model)
{
    return model->backend;
}

void um_model_set_profile(um_model_t *model, um_forward_profile_t *profile)
{
    model->profile = profile;
}

um_forward_profile_t *um_model_profile(const um_model_t *model)
{
    return model->profile;
}

um_wdtype_t um_model_weight_dtype(const um_model_t *model)
{
    return model->weight_dtype;
}

const um_model_weights_t *um_model_weights(const um_model_t *model)
{
    return &model->weights;
}

const float *um_model_rope_table(const um_model_t *model)
{
    return model->rope;
}

/* Grow *buf (of *cap floats) to at least n floats, discarding its contents. */
static int s_grow(float **buf, size_t *cap, size_t n, float **out)
{
    if (n > *cap) {
        if (n > SIZE_MAX / sizeof(float) - S_ALIGN)
            return UM_ENOMEM;
        float *grown = s_alloc_aligned(n * sizeof(float));
        if (!grown)
            return UM_ENOMEM;
        free(*buf);
        *buf = grown;
        *cap = n;
    }
    *out = *buf;
    return 0;
}

int um_model_workspace(um_model_t *model, size_t n_floats, float **out)
{
    return s_grow(&model->workspace, &model->workspace_floats, n_floats, out);
}

int um_model_batch_logits(um_model_t *model, size_t n_floats, float **out)
{
    return s_grow(&model->batch_logits, &model->batch_logits_floats, n_floats, out);
}
