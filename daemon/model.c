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
#include <math.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <unmaskd/error.h>

#include "kernels.h"
#include "log.h"
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
};


/* aligned_alloc needs a size that is a multiple of the alignment. */
static void *s_alloc_aligned(size_t bytes)
{
    size_t rounded = (bytes + S_ALIGN - 1) / S_ALIGN * S_ALIGN;
    return aligned_alloc(S_ALIGN, rounded ? rounded : S_ALIGN);
}

/* ------------------------------------------------------------------------- */
/* config.json                                                                */

/*
 * Read an integer field into *out. A missing field takes dflt when required is 0,
 * and is an error otherwise; a present field must be an integer in int32 range.
 */
static int s_config_int(json_t *root, const char *path, const char *field, int required,
                        int32_t dflt, int32_t *out, char *err, size_t errlen)
{
    json_t *v = json_object_get(root, field);
    if (!v || json_is_null(v)) {
        if (required)
            return um_fail(err, errlen, UM_EFORMAT,
                          "%s has no field %s, which a LLaDA model requires: add it", path,
                          field);
        *out = dflt;
        return 0;
    }
    if (!json_is_integer(v) || json_integer_value(v) < INT32_MIN ||
        json_integer_value(v) > INT32_MAX)
        return um_fail(err, errlen, UM_EFORMAT, "%s field %s must be a 32-bit integer: fix it",
                      path, field);
    *out = (int32_t)json_integer_value(v);
    return 0;
}

/* Read a number field (integer or real); a missing field takes dflt. */
static int s_config_number(json_t *root, const char *path, const char *field, double dflt,
                           double *out, char *err, size_t errlen)
{
    json_t *v = json_object_get(root, field);
    if (!v || json_is_null(v)) {
        *out = dflt;
        return 0;
    }
    if (!json_is_number(v))
        return um_fail(err, errlen, UM_EFORMAT, "%s field %s must be a number: fix it", path,
                      field);
    *out = json_number_value(v);
    return 0;
}

/*
 * Reject optional LLaDA features the forward pass does not implement, when config.json
 * turns them on. Absent fields mean the LLaDA-8B setting.
 */
static int s_config_features(json_t *root, const char *path, char *err, size_t errlen)
{
    static const char *const off_flags[] = {
        "include_bias", "include_qkv_bias", "weight_tying", "alibi", "scale_logits",
        "input_emb_norm", "attention_layer_norm",
    };
    for (size_t i = 0; i < sizeof off_flags / sizeof off_flags[0]; i++)
        if (json_is_true(json_object_get(root, off_flags[i])))
            return um_fail(err, errlen, UM_EUNSUPPORTED,
                          "%s sets %s to true, which unmaskd does not implement: only the "
                          "LLaDA-8B layout (%s false) is supported", path, off_flags[i],
                          off_flags[i]);
    if (json_is_number(json_object_get(root, "clip_qkv")))
        return um_fail(err, errlen, UM_EUNSUPPORTED,
                      "%s sets clip_qkv, which unmaskd does not implement: only unclipped "
                      "q, k and v (clip_qkv null, as in LLaDA-8B) are supported", path);
    if (json_is_false(json_object_get(root, "rope")))
        return um_fail(err, errlen, UM_EUNSUPPORTED,
                      "%s sets rope to false, which unmaskd does not implement: only RoPE "
                      "position encoding is supported", path);

    static const struct {
        const char *field, *allowed[2];
    } strings[] = {
        {"block_type", {"llama", NULL}},
        {"layer_norm_type", {"rms", NULL}},
        {"activation_type", {"silu", "swiglu"}},
    };
    for (size_t i = 0; i < sizeof strings / sizeof strings[0]; i++) {
        const char *v = json_string_value(json_object_get(root, strings[i].field));
        if (!v)
            continue;
        if (strcmp(v, strings[i].allowed[0]) == 0 ||
            (strings[i].allowed[1] && strcmp(v, strings[i].allowed[1]) == 0))
            continue;
        return um_fail(err, errlen, UM_EUNSUPPORTED,
                      "%s sets %s to \"%s\", which unmaskd does not implement: only \"%s\" is "
                      "supported", path, strings[i].field, v, strings[i].allowed[0]);
    }
    return 0;
}

/* Check the relations between fields that the forward pass relies on. */
static int s_config_validate(um_model_config_t *c, const char *path, char *err,
                             size_t errlen)
{
    const struct {
        const char *field;
        int32_t value;
    } positive[] = {
        {"d_model", c->d_model},
        {"n_layers", c->n_layers},
        {"n_heads", c->n_heads},
        {"n_kv_heads", c->n_kv_heads},
        {"mlp_hidden_size", c->mlp_hidden_size},
        {"vocab_size", c->vocab_size},
        {"embedding_size", c->embedding_size},
        {"max_sequence_length", c->max_sequence_length},
    };
    for (size_t i = 0; i < sizeof positive / sizeof positive[0]; i++)
        if (positive[i].value <= 0)
            return um_fail(err, errlen, UM_EFORMAT, "%s field %s is %d, but it must be positive",
                          path, positive[i].field, positive[i].value);

    if (c->d_model % c->n_heads != 0 || (c->d_model / c->n_heads) % 2 != 0)
        return um_fail(err, errlen, UM_EFORMAT,
                      "%s has d_model %d and n_heads %d: d_model must be n_heads times an even "
                      "head size", path, c->d_model, c->n_heads);
    c->head_dim = c->d_model / c->n_heads;
    if (c->n_heads % c->n_kv_heads != 0)
        return um_fail(err, errlen, UM_EFORMAT,
                      "%s has n_heads %d and n_kv_heads %d: n_heads must be a multiple of "
                      "n_kv_heads", path, c->n_heads, c->n_kv_heads);
    if (c->embedding_size < c->vocab_size)
        return um_fail(err, errlen, UM_EFORMAT,
                      "%s has embedding_size %d smaller than vocab_size %d: fix either field",
                      path, c->embedding_size, c->vocab_size);
    if (c->mask_token_id < 0 || c->mask_token_id >= c->embedding_size)
        return um_fail(err, errlen, UM_ERANGE,
                      "%s has mask_token_id %d outside [0, %d): fix it", path, c->mask_token_id,
                      c->embedding_size);
    if (c->eos_token_id < -1 || c->eos_token_id >= c->embedding_size)
        return um_fail(err, errlen, UM_ERANGE,
                      "%s has eos_token_id %d outside [0, %d): fix it or remove it", path,
                      c->eos_token_id, c->embedding_size);
    if (!(c->rope_theta > 0.0f) || !isfinite(c->rope_theta))
        return um_fail(err, errlen, UM_ERANGE, "%s has rope_theta %g, but it must be positive",
                      path, (double)c->rope_theta);
    if (!(c->rms_norm_eps > 0.0f) || !isfinite(c->rms_norm_eps))
        return um_fail(err, errlen, UM_ERANGE,
                      "%s has rms_norm_eps %g, but it must be positive", path,
                      (double)c->rms_norm_eps);
    return 0;
}

/* Parse <dir>/config.json into c, applying the LLaDA defaults. */
static int s_config_load(const char *dir, um_model_config_t *c, char *err, size_t errlen)
{
    char path[PATH_MAX];
    if ((size_t)snprintf(path, sizeof path, "%s/config.json", dir) >= sizeof path)
        return um_fail(err, errlen, UM_EINVAL, "model folder path %s is too long", dir);

    json_error_t jerr;
    json_t *root = json_load_file(path, JSON_REJECT_DUPLICATES, &jerr);
    if (!root) {
        if (json_error_code(&jerr) == json_error_cannot_open_file)
            return um_fail(err, errlen, UM_ENOTFOUND,
                          "cannot read %s (%s): pass a Hugging Face model folder with a "
                          "config.json", path, jerr.text);
        return um_fail(err, errlen, UM_EFORMAT, "%s is not valid JSON (%s at line %d, column %d)",
                      path, jerr.text, jerr.line, jerr.column);
    }

    int rc = 0;
    memset(c, 0, sizeof *c);
    if (!json_is_object(root)) {
        rc = um_fail(err, errlen, UM_EFORMAT, "%s is not a JSON object", path);
        goto cleanup;
    }

    json_t *type = json_object_get(root, "model_type");
    if (!type) {
        rc = um_fail(err, errlen, UM_EFORMAT,
                    "%s has no field model_type: add \"model_type\": \"llada\" for a LLaDA "
                    "model", path);
        goto cleanup;
    }
    if (!json_is_string(type) || strcmp(json_string_value(type), "llada") != 0) {
        rc = um_fail(err, errlen, UM_EUNSUPPORTED,
                    "%s has model_type %s%s%s, but unmaskd runs only \"llada\" models", path,
                    json_is_string(type) ? "\"" : "",
                    json_is_string(type) ? json_string_value(type) : "that is not a string",
                    json_is_string(type) ? "\"" : "");
        goto cleanup;
    }
    c->arch = UM_ARCH_LLADA;
    snprintf(c->model_type, sizeof c->model_type, "%s", json_string_value(type));

    double theta, eps, layer_norm_eps;
    if ((rc = s_config_int(root, path, "d_model", 1, 0, &c->d_model, err, errlen)) ||
        (rc = s_config_int(root, path, "n_layers", 1, 0, &c->n_layers, err, errlen)) ||
        (rc = s_config_int(root, path, "n_heads", 1, 0, &c->n_heads, err, errlen)) ||
        (rc = s_config_int(root, path, "n_kv_heads", 0, c->n_heads, &c->n_kv_heads, err,
                           errlen)) ||
        (rc = s_config_int(root, path, "mlp_hidden_size", 1, 0, &c->mlp_hidden_size, err,
                           errlen)) ||
        (rc = s_config_int(root, path, "vocab_size", 1, 0, &c->vocab_size, err, errlen)) ||
        (rc = s_config_int(root, path, "embedding_size", 0, c->vocab_size, &c->embedding_size,
                           err, errlen)) ||
        (rc = s_config_int(root, path, "max_sequence_length", 1, 0, &c->max_sequence_length,
                           err, errlen)) ||
        (rc = s_config_int(root, path, "mask_token_id", 1, 0, &c->mask_token_id, err,
                           errlen)) ||
        (rc = s_config_int(root, path, "eos_token_id", 0, -1, &c->eos_token_id, err,
                           errlen)) ||
        (rc = s_config_number(root, path, "rope_theta", 10000.0, &theta, err, errlen)) ||
        (rc = s_config_number(root, path, "layer_norm_eps", 1e-5, &layer_norm_eps, err,
                              errlen)) ||
        (rc = s_config_number(root, path, "rms_norm_eps", layer_norm_eps, &eps, err,
                              errlen)) ||
        (rc = s_config_features(root, path, err, errlen)))
        goto cleanup;
    c->rope_theta = (float)theta;
    c->rms_norm_eps = (float)eps;
    rc = s_config_validate(c, path, err, errlen);

cleanup:
    json_decref(root);
    return rc;
}

/* ------------------------------------------------------------------------- */
/* Weights                                                                    */

/*
 * One tensor the model expects: its name, shape and where it is bound. Exactly one of
 * vec (an f32 vector), mat (a prepared weight matrix) and raw (the embedding table,
 * read row by row in its stored dtype) is set.
 */
typedef struct s_slot {
    char name[96];
    int32_t ndim;
    int64_t shape[2];
    const float **vec;
    um_gemm_weight_t **mat;
    const void **raw;
    const um_tensor_view_t *view;
} s_slot_t;

static s_slot_t *s_slot_set(s_slot_t *slot, const char *name, int64_t rows, int64_t cols)
{
    snprintf(slot->name, sizeof slot->name, "%s", name);
    slot->ndim = cols ? 2 : 1;
    slot->shape[0] = rows;
    slot->shape[1] = cols;
    slot->view = NULL;
    return slot;
}

/* List every tensor of a LLaDA model with the shape config.json implies. */
static s_slot_t *s_slots_build(um_model_t *m, size_t *n_out)
{
    const um_model_config_t *c = &m->config;
    size_t n = 3 + 9 * (size_t)c->n_layers;
    s_slot_t *slots = calloc(n, sizeof *slots);
    if (!slots)
        return NULL;

    int64_t d = c->d_model, q_dim = (int64_t)c->n_heads * c->head_dim;
    int64_t kv_dim = (int64_t)c->n_kv_heads * c->head_dim, mlp = c->mlp_hidden_size;
    size_t k = 0;
    s_slot_set(&slots[k++], "model.transformer.wte.weight", c->embedding_size, d)->raw =
        &m->weights.wte;
    for (int32_t l = 0; l < c->n_layers; l++) {
        um_block_weights_t *b = &m->blocks[l];
        const struct {
            const char *part;
            int64_t rows, cols;
            const float **vec;
            um_gemm_weight_t **mat;
        } parts[] = {
            {"attn_norm", d, 0, &b->attn_norm, NULL}, {"q_proj", q_dim, d, NULL, &b->q_proj},
            {"k_proj", kv_dim, d, NULL, &b->k_proj},  {"v_proj", kv_dim, d, NULL, &b->v_proj},
            {"attn_out", d, q_dim, NULL, &b->attn_out}, {"ff_norm", d, 0, &b->ff_norm, NULL},
            {"ff_proj", mlp, d, NULL, &b->ff_proj},   {"up_proj", mlp, d, NULL, &b->up_proj},
            {"ff_out", d, mlp, NULL, &b->ff_out},
        };
        for (size_t p = 0; p < 9; p++) {
            char name[96];
            snprintf(name, sizeof name, "model.transformer.blocks.%d.%s.weight", l,
                     parts[p].part);
            s_slot_t *slot = s_slot_set(&slots[k++], name, parts[p].rows, parts[p].cols);
            slot->vec = parts[p].vec;
            slot->mat = parts[p].mat;
        }
    }
    s_slot_set(&slots[k++], "model.transformer.ln_f.weight", d, 0)->vec = &m->weights.ln_f;
    s_slot_set(&slots[k++], "model.transformer.ff_out.weight", c->embedding_size, d)->mat =
        &m->weights.lm_head;
    *n_out = k;
    return slots;
}

/* Find each slot's tensor and check its shape; reject tensors no slot uses. */
static int s_slots_match(const um_model_t *m, s_slot_t *slots, size_t n_slots, char *err,
                         size_t errlen)
{
    const char *source = um_safetensors_source(m->weights_file);
    for (size_t i = 0; i < n_slots; i++) {
        s_slot_t *s = &slots[i];
        s->view = um_safetensors_find(m->weights_file, s->name);
        if (!s->view)
            return um_fail(err, errlen, UM_ENOTFOUND,
                          "tensor %s is missing from %s: the checkpoint does not match "
                          "config.json", s->name, source);
        int same = s->view->ndim == s->ndim;
        for (int32_t j = 0; same && j < s->ndim; j++)
            same = s->view->shape[j] == s->shape[j];
        if (!same) {
            char got[160], expected[160];
            um_shape_format(got, sizeof got, s->view->shape, s->view->ndim);
            um_shape_format(expected, sizeof expected, s->shape, s->ndim);
            return um_fail(err, errlen, UM_EFORMAT,
                          "tensor %s has shape %s, expected %s: the checkpoint does not match "
                          "config.json", s->name, got, expected);
        }
    }

    /* Every slot found a distinct tensor, so equal counts mean nothing is left over. */
    size_t n_tensors = um_safetensors_count(m->weights_file);
    if (n_tensors != n_slots) {
        for (size_t i = 0; i < n_tensors; i++) {
            const um_tensor_view_t *t = um_safetensors_at(m->weights_file, i);
            int used = 0;
            for (size_t j = 0; j < n_slots && !used; j++)
                used = slots[j].view == t;
            if (!used)
                return um_fail(err, errlen, UM_EFORMAT,
                              "tensor %s in %s is not part of a LLaDA model with n_layers %d: "
                              "the checkpoint does not match config.json", t->name, source,
                              m->config.n_layers);
        }
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

/* Bind one slot; data is the tensor's bytes (in the mapping or an aligned copy). */
static int s_slot_bind(um_model_t *m, const s_slot_t *slot, const void *data, char *err,
                       size_t errlen)
{
    const um_tensor_view_t *t = slot->view;
    int bf16 = t->dtype == UM_DTYPE_BF16;
    if (slot->raw) {
        *slot->raw = data;
        m->weights.wte_bf16 = bf16;
        return 0;
    }
    if (slot->vec) {
        *slot->vec = data;
        return 0;
    }
    int rc = um_gemm_weight_new((int32_t)t->shape[0], (int32_t)t->shape[1], data, bf16,
                                m->weight_dtype, slot->mat);
    if (rc != 0)
        return um_fail(err, errlen, rc, "preparing tensor %s (%s) for the %s matrix products "
                       "failed: %s", slot->name, bf16 ? "bf16" : "f32",
                       m->weight_dtype == UM_WDTYPE_BF16 ? "bf16" : "f32", um_strerror(rc));
    m->weight_bytes += um_gemm_weight_bytes(*slot->mat);
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
    for (size_t i = 0; i < n_slots; i++) {
        const s_slot_t *slot = &slots[i];
        const um_tensor_view_t *t = slot->view;
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
        int rc = s_slot_bind(m, slot, data, err, errlen);
        if (rc != 0)
            return rc;
        if (copy == 0 && (!slot->mat || um_gemm_weight_borrows(*slot->mat)))
            n_mapped++;
    }

    /* With nothing pointing into it, the mapping is no longer needed. */
    if (n_mapped == 0)
        um_safetensors_close(&m->weights_file);
    um_info("model", "bound %zu tensors for %s matrix products: %zu read in place, "
            "%.1f MB copied, %.1f MB of prepared weights", n_slots,
            m->weight_dtype == UM_WDTYPE_BF16 ? "bf16" : "f32", n_mapped, arena_bytes / 1e6,
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
    rc = s_config_load(dir, &m->config, err, errlen);
    if (rc != 0)
        goto cleanup;
    m->weight_dtype = opts ? opts->weight_dtype : 0; /* 0: chosen when the dtypes are known */
    rc = s_weights_load(m, err, errlen);
    if (rc != 0)
        goto cleanup;
    rc = s_rope_build(m, err, errlen);
    if (rc != 0)
        goto cleanup;
    snprintf(m->backend, sizeof m->backend, "%s (%s)", um_gemm_backend(),
             m->weight_dtype == UM_WDTYPE_BF16 ? "bf16" : "f32");

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
    free(m->rope);
    for (int32_t l = 0; m->blocks && l < m->config.n_layers; l++) {
        um_block_weights_t *b = &m->blocks[l];
        um_gemm_weight_t **mats[] = {&b->q_proj, &b->k_proj, &b->v_proj, &b->attn_out,
                                     &b->ff_proj, &b->up_proj, &b->ff_out};
        for (size_t i = 0; i < sizeof mats / sizeof mats[0]; i++)
            um_gemm_weight_destroy(mats[i]);
    }
    um_gemm_weight_destroy(&m->weights.lm_head);
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

int um_model_workspace(um_model_t *model, size_t n_floats, float **out)
{
    if (n_floats > model->workspace_floats) {
        if (n_floats > SIZE_MAX / sizeof(float) - S_ALIGN)
            return UM_ENOMEM;
        float *grown = s_alloc_aligned(n_floats * sizeof(float));
        if (!grown)
            return UM_ENOMEM;
        free(model->workspace);
        model->workspace = grown;
        model->workspace_floats = n_floats;
    }
    *out = model->workspace;
    return 0;
}
