/*
 * config.json for every supported model family: the field names each family's
 * Hugging Face config uses, their defaults, and the checks the forward pass relies on.
 * Special token ids a BERT config does not carry ([MASK], [CLS], [SEP]) are looked up
 * in the folder's vocab.txt or tokenizer.json.
 *
 * Owns nothing past the call. Threading: pure functions of their inputs.
 */
#include "model.h"

#include <jansson.h>
#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <unmaskd/error.h>

#include "log.h"
#include "model_internal.h"

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
                          "%s has no field %s, which this model type requires: add it", path,
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
static int s_llada_features(json_t *root, const char *path, char *err, size_t errlen)
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

    if (c->d_model % c->n_heads != 0 || (c->rope && (c->d_model / c->n_heads) % 2 != 0))
        return um_fail(err, errlen, UM_EFORMAT,
                      "%s has hidden size %d and %d heads: the hidden size must be the head "
                      "count times a%s head size", path, c->d_model, c->n_heads,
                      c->rope ? "n even" : "");
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
    const struct {
        const char *field;
        int32_t value;
    } optional_ids[] = {
        {"cls_token_id", c->cls_token_id},
        {"sep_token_id", c->sep_token_id},
        {"pad_token_id", c->pad_token_id},
    };
    for (size_t i = 0; i < sizeof optional_ids / sizeof optional_ids[0]; i++)
        if (optional_ids[i].value < -1 || optional_ids[i].value >= c->embedding_size)
            return um_fail(err, errlen, UM_ERANGE, "%s has %s %d outside [0, %d): fix it",
                          path, optional_ids[i].field, optional_ids[i].value,
                          c->embedding_size);
    if (c->eos_token_id < -1 || c->eos_token_id >= c->embedding_size)
        return um_fail(err, errlen, UM_ERANGE,
                      "%s has eos_token_id %d outside [0, %d): fix it or remove it", path,
                      c->eos_token_id, c->embedding_size);
    if (c->rope && (!(c->rope_theta > 0.0f) || !isfinite(c->rope_theta)))
        return um_fail(err, errlen, UM_ERANGE, "%s has rope_theta %g, but it must be positive",
                      path, (double)c->rope_theta);
    if (!(c->rms_norm_eps > 0.0f) || !isfinite(c->rms_norm_eps))
        return um_fail(err, errlen, UM_ERANGE,
                      "%s has a norm epsilon of %g, but it must be positive", path,
                      (double)c->rms_norm_eps);
    return 0;
}

/* ------------------------------------------------------------------------- */
/* Families                                                                   */

/* LLaDA: the field names of GSAI-ML's config.json. */
static int s_llada(json_t *root, const char *path, um_model_config_t *c, char *err,
                   size_t errlen)
{
    double theta, eps, layer_norm_eps;
    int rc;
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
        (rc = s_config_int(root, path, "pad_token_id", 0, -1, &c->pad_token_id, err,
                           errlen)) ||
        (rc = s_config_number(root, path, "rope_theta", 10000.0, &theta, err, errlen)) ||
        (rc = s_config_number(root, path, "layer_norm_eps", 1e-5, &layer_norm_eps, err,
                              errlen)) ||
        (rc = s_config_number(root, path, "rms_norm_eps", layer_norm_eps, &eps, err,
                              errlen)) ||
        (rc = s_llada_features(root, path, err, errlen)))
        return rc;
    c->rope_theta = (float)theta;
    c->rms_norm_eps = (float)eps;
    c->activation = UM_ACT_SWIGLU;
    c->rope = 1;
    return 0;
}

/* Dream: a Qwen2 config (hidden_size, num_hidden_layers, ...) plus mask_token_id. */
static int s_dream(json_t *root, const char *path, um_model_config_t *c, char *err,
                   size_t errlen)
{
    double theta, eps;
    int rc;
    if ((rc = s_config_int(root, path, "hidden_size", 1, 0, &c->d_model, err, errlen)) ||
        (rc = s_config_int(root, path, "num_hidden_layers", 1, 0, &c->n_layers, err,
                           errlen)) ||
        (rc = s_config_int(root, path, "num_attention_heads", 1, 0, &c->n_heads, err,
                           errlen)) ||
        (rc = s_config_int(root, path, "num_key_value_heads", 0, c->n_heads, &c->n_kv_heads,
                           err, errlen)) ||
        (rc = s_config_int(root, path, "intermediate_size", 1, 0, &c->mlp_hidden_size, err,
                           errlen)) ||
        (rc = s_config_int(root, path, "vocab_size", 1, 0, &c->vocab_size, err, errlen)) ||
        (rc = s_config_int(root, path, "max_position_embeddings", 1, 0,
                           &c->max_sequence_length, err, errlen)) ||
        (rc = s_config_int(root, path, "mask_token_id", 1, 0, &c->mask_token_id, err,
                           errlen)) ||
        (rc = s_config_int(root, path, "eos_token_id", 0, -1, &c->eos_token_id, err,
                           errlen)) ||
        (rc = s_config_int(root, path, "pad_token_id", 0, -1, &c->pad_token_id, err,
                           errlen)) ||
        (rc = s_config_number(root, path, "rope_theta", 10000.0, &theta, err, errlen)) ||
        (rc = s_config_number(root, path, "rms_norm_eps", 1e-6, &eps, err, errlen)))
        return rc;
    const char *act = json_string_value(json_object_get(root, "hidden_act"));
    if (act && strcmp(act, "silu") != 0)
        return um_fail(err, errlen, UM_EUNSUPPORTED,
                      "%s sets hidden_act to \"%s\": a Dream model must use \"silu\"", path, act);
    c->embedding_size = c->vocab_size;
    c->rope_theta = (float)theta;
    c->rms_norm_eps = (float)eps;
    c->activation = UM_ACT_SWIGLU;
    c->rope = 1;
    c->qkv_bias = 1;
    c->logits_shift = 1;
    c->tied_embeddings = json_is_true(json_object_get(root, "tie_word_embeddings"));
    return 0;
}

/* The GELU form a BERT-family hidden_act or activation names. */
static int s_gelu(json_t *root, const char *path, const char *field, um_model_config_t *c,
                  char *err, size_t errlen)
{
    const char *act = json_string_value(json_object_get(root, field));
    if (!act || strcmp(act, "gelu") == 0) {
        c->activation = UM_ACT_GELU_ERF;
        return 0;
    }
    if (strcmp(act, "gelu_new") == 0 || strcmp(act, "gelu_pytorch_tanh") == 0) {
        c->activation = UM_ACT_GELU_TANH;
        return 0;
    }
    return um_fail(err, errlen, UM_EUNSUPPORTED,
                  "%s sets %s to \"%s\", which unmaskd does not implement: use \"gelu\", "
                  "\"gelu_new\" or \"gelu_pytorch_tanh\"", path, field, act);
}

/*
 * Look up a special token in the folder's vocab.txt (one token per line, the line
 * number is the id), then in tokenizer.json (added_tokens, then model.vocab). Returns
 * the id or -1.
 */
static int32_t s_special_id(const char *dir, const char *token)
{
    char path[PATH_MAX];
    snprintf(path, sizeof path, "%s/vocab.txt", dir);
    FILE *f = fopen(path, "r");
    if (f) {
        char line[256];
        int32_t id = 0, found = -1;
        while (found < 0 && fgets(line, sizeof line, f)) {
            line[strcspn(line, "\r\n")] = '\0';
            if (strcmp(line, token) == 0)
                found = id;
            id++;
        }
        fclose(f);
        if (found >= 0)
            return found;
    }
    snprintf(path, sizeof path, "%s/tokenizer.json", dir);
    json_t *root = json_load_file(path, 0, NULL);
    if (!root)
        return -1;
    int32_t found = -1;
    size_t i;
    json_t *t;
    json_array_foreach(json_object_get(root, "added_tokens"), i, t) {
        const char *content = json_string_value(json_object_get(t, "content"));
        if (found < 0 && content && strcmp(content, token) == 0 &&
            json_is_integer(json_object_get(t, "id")))
            found = (int32_t)json_integer_value(json_object_get(t, "id"));
    }
    json_t *id = json_object_get(json_object_get(json_object_get(root, "model"), "vocab"), token);
    if (found < 0 && json_is_integer(id))
        found = (int32_t)json_integer_value(id);
    json_decref(root);
    return found;
}

/* [MASK], [CLS], [SEP] and [PAD] of a BERT-family model: config.json, else the vocabulary. */
static int s_bert_ids(json_t *root, const char *path, const char *dir, um_model_config_t *c,
                      char *err, size_t errlen)
{
    int rc;
    if ((rc = s_config_int(root, path, "mask_token_id", 0, -1, &c->mask_token_id, err,
                           errlen)) ||
        (rc = s_config_int(root, path, "pad_token_id", 0, -1, &c->pad_token_id, err,
                           errlen)) ||
        (rc = s_config_int(root, path, "cls_token_id", 0, -1, &c->cls_token_id, err,
                           errlen)) ||
        (rc = s_config_int(root, path, "sep_token_id", 0, -1, &c->sep_token_id, err,
                           errlen)))
        return rc;
    if (c->mask_token_id < 0)
        c->mask_token_id = s_special_id(dir, "[MASK]");
    if (c->cls_token_id < 0)
        c->cls_token_id = s_special_id(dir, "[CLS]");
    if (c->sep_token_id < 0)
        c->sep_token_id = s_special_id(dir, "[SEP]");
    if (c->pad_token_id < 0)
        c->pad_token_id = s_special_id(dir, "[PAD]");
    if (c->mask_token_id < 0)
        return um_fail(err, errlen, UM_EFORMAT,
                      "%s has no mask_token_id and the folder's vocab.txt or tokenizer.json "
                      "has no [MASK] token: add \"mask_token_id\" to config.json", path);
    /* [SEP] closes a BERT sequence, so it plays the part of end-of-text. */
    c->eos_token_id = c->sep_token_id;
    return 0;
}

/* BERT (BertForMaskedLM). */
static int s_bert(json_t *root, const char *path, const char *dir, um_model_config_t *c,
                  char *err, size_t errlen)
{
    double eps;
    int rc;
    if ((rc = s_config_int(root, path, "hidden_size", 1, 0, &c->d_model, err, errlen)) ||
        (rc = s_config_int(root, path, "num_hidden_layers", 1, 0, &c->n_layers, err,
                           errlen)) ||
        (rc = s_config_int(root, path, "num_attention_heads", 1, 0, &c->n_heads, err,
                           errlen)) ||
        (rc = s_config_int(root, path, "intermediate_size", 1, 0, &c->mlp_hidden_size, err,
                           errlen)) ||
        (rc = s_config_int(root, path, "vocab_size", 1, 0, &c->vocab_size, err, errlen)) ||
        (rc = s_config_int(root, path, "max_position_embeddings", 1, 0,
                           &c->max_sequence_length, err, errlen)) ||
        (rc = s_config_int(root, path, "type_vocab_size", 0, 2, &c->type_vocab_size, err,
                           errlen)) ||
        (rc = s_config_number(root, path, "layer_norm_eps", 1e-12, &eps, err, errlen)) ||
        (rc = s_gelu(root, path, "hidden_act", c, err, errlen)) ||
        (rc = s_bert_ids(root, path, dir, c, err, errlen)))
        return rc;
    const char *pos = json_string_value(json_object_get(root, "position_embedding_type"));
    if (pos && strcmp(pos, "absolute") != 0)
        return um_fail(err, errlen, UM_EUNSUPPORTED,
                      "%s sets position_embedding_type to \"%s\": only \"absolute\" is "
                      "supported", path, pos);
    if (c->type_vocab_size < 1)
        return um_fail(err, errlen, UM_EFORMAT,
                      "%s has type_vocab_size %d: a BERT model needs at least 1", path,
                      c->type_vocab_size);
    c->rms_norm_eps = (float)eps;
    return 0;
}

/* DistilBERT (DistilBertForMaskedLM): its own field names, LayerNorm epsilon 1e-12. */
static int s_distilbert(json_t *root, const char *path, const char *dir, um_model_config_t *c,
                        char *err, size_t errlen)
{
    int rc;
    if ((rc = s_config_int(root, path, "dim", 1, 0, &c->d_model, err, errlen)) ||
        (rc = s_config_int(root, path, "n_layers", 1, 0, &c->n_layers, err, errlen)) ||
        (rc = s_config_int(root, path, "n_heads", 1, 0, &c->n_heads, err, errlen)) ||
        (rc = s_config_int(root, path, "hidden_dim", 1, 0, &c->mlp_hidden_size, err,
                           errlen)) ||
        (rc = s_config_int(root, path, "vocab_size", 1, 0, &c->vocab_size, err, errlen)) ||
        (rc = s_config_int(root, path, "max_position_embeddings", 1, 0,
                           &c->max_sequence_length, err, errlen)) ||
        (rc = s_gelu(root, path, "activation", c, err, errlen)) ||
        (rc = s_bert_ids(root, path, dir, c, err, errlen)))
        return rc;
    /* DistilBERT's modules hard-code eps=1e-12 rather than reading the config. */
    c->rms_norm_eps = 1e-12f;
    return 0;
}

int um_model_config_load(const char *dir, um_model_config_t *c, char *err, size_t errlen)
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
    c->eos_token_id = c->cls_token_id = c->sep_token_id = c->pad_token_id = -1;
    if (!json_is_object(root)) {
        rc = um_fail(err, errlen, UM_EFORMAT, "%s is not a JSON object", path);
        goto cleanup;
    }

    static const struct {
        const char *name;
        um_arch_t arch;
    } types[] = {
        {"llada", UM_ARCH_LLADA}, {"Dream", UM_ARCH_DREAM}, {"dream", UM_ARCH_DREAM},
        {"bert", UM_ARCH_BERT},   {"distilbert", UM_ARCH_DISTILBERT},
    };
    json_t *type = json_object_get(root, "model_type");
    const char *name = json_string_value(type);
    for (size_t i = 0; name && i < sizeof types / sizeof types[0]; i++)
        if (strcmp(name, types[i].name) == 0)
            c->arch = types[i].arch;
    if (!type) {
        rc = um_fail(err, errlen, UM_EFORMAT,
                    "%s has no field model_type: add the model's type (\"llada\", \"Dream\", "
                    "\"bert\" or \"distilbert\")", path);
        goto cleanup;
    }
    if (!c->arch) {
        rc = um_fail(err, errlen, UM_EUNSUPPORTED,
                    "%s has model_type %s%s%s, but unmaskd runs only \"llada\", \"Dream\", "
                    "\"bert\" and \"distilbert\" models", path, name ? "\"" : "",
                    name ? name : "that is not a string", name ? "\"" : "");
        goto cleanup;
    }
    snprintf(c->model_type, sizeof c->model_type, "%s", name);

    switch (c->arch) {
    case UM_ARCH_LLADA:
        rc = s_llada(root, path, c, err, errlen);
        break;
    case UM_ARCH_DREAM:
        rc = s_dream(root, path, c, err, errlen);
        break;
    case UM_ARCH_BERT:
    case UM_ARCH_DISTILBERT:
        rc = c->arch == UM_ARCH_BERT ? s_bert(root, path, dir, c, err, errlen)
                                     : s_distilbert(root, path, dir, c, err, errlen);
        c->n_kv_heads = c->n_heads;
        c->embedding_size = c->vocab_size;
        c->post_norm = c->layer_norm = 1;
        c->qkv_bias = c->dense_bias = 1;
        c->mlm_head = c->tied_embeddings = 1;
        break;
    }
    if (rc == 0)
        rc = s_config_validate(c, path, err, errlen);

cleanup:
    json_decref(root);
    return rc;
}

void um_model_framing(const um_model_config_t *cfg, int32_t *prefix, int32_t *suffix)
{
    const int bert = cfg->arch == UM_ARCH_BERT || cfg->arch == UM_ARCH_DISTILBERT;
    *prefix = bert ? cfg->cls_token_id : -1;
    *suffix = bert ? cfg->sep_token_id : -1;
}

int32_t um_model_never_sampled(const um_model_config_t *cfg, int32_t *out)
{
    int32_t n = 0;
    out[n++] = cfg->mask_token_id;
    if (cfg->arch != UM_ARCH_BERT && cfg->arch != UM_ARCH_DISTILBERT)
        return n;
    const int32_t extra[] = {cfg->cls_token_id, cfg->pad_token_id};
    for (size_t i = 0; i < sizeof extra / sizeof extra[0]; i++)
        if (extra[i] >= 0 && extra[i] != cfg->mask_token_id && extra[i] != cfg->eos_token_id)
            out[n++] = extra[i];
    return n;
}
