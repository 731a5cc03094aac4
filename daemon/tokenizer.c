/* The daemon's tokenizer wrapper: plugin choice and self-sizing buffers (see tokenizer.h). */
#include "tokenizer.h"

#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "log.h"

/*
 * No plugin claimed the folder: say why as precisely as the files allow (a malformed
 * tokenizer.json, a format no loaded plugin reads, or no tokenizer files at all).
 */
static int s_explain_no_plugin(const char *model_dir, char *err, size_t errlen)
{
    char path[4096];
    snprintf(path, sizeof path, "%s/tokenizer.json", model_dir);
    if (access(path, F_OK) == 0) {
        json_error_t jerr;
        json_t *root = json_load_file(path, 0, &jerr);
        if (!root) {
            snprintf(err, errlen, "%s is not valid JSON (%s at line %d, column %d): replace it "
                     "with the tokenizer.json the model was published with", path, jerr.text,
                     jerr.line, jerr.column);
            return UM_EFORMAT;
        }
        const char *type =
            json_string_value(json_object_get(json_object_get(root, "model"), "type"));
        snprintf(err, errlen, "no loaded tokenizer plugin reads %s (model type %s): check "
                 "the plugins rejected in the startup log, or add a plugin for this format",
                 path, type ? type : "missing");
        json_decref(root);
        return UM_EUNSUPPORTED;
    }
    snprintf(err, errlen, "no loaded tokenizer plugin can read the tokenizer files in %s: "
             "add the model's tokenizer.json (or vocab.txt or tokenizer.model with a plugin "
             "for it)", model_dir);
    return UM_ENOTFOUND;
}

int um_tokenizer_open(um_tokenizer_t *tok, const um_plugin_registry_t *reg, const char *name,
                      const char *model_dir, char *err, size_t errlen)
{
    const um_plugin_t *chosen = NULL;
    *tok = (um_tokenizer_t){0};
    if (name) {
        chosen = um_plugins_find(reg, UM_PLUGIN_TOKENIZER, name);
        if (!chosen) {
            snprintf(err, errlen, "no tokenizer plugin named \"%s\" is loaded: check the plugin "
                     "folders in the startup log", name);
            return UM_ENOTFOUND;
        }
    } else {
        int best = 0;
        for (size_t i = 0; i < reg->n; i++) {
            const um_plugin_desc_t *d = reg->items[i].desc;
            if (d->kind != UM_PLUGIN_TOKENIZER)
                continue;
            int score = d->tokenizer->probe(model_dir);
            um_debug("tokenizer", "plugin %s scores %d for %s", d->name, score, model_dir);
            if (score > best) {
                best = score;
                chosen = &reg->items[i];
            }
        }
        if (!chosen)
            return s_explain_no_plugin(model_dir, err, errlen);
    }
    const um_tokenizer_ops_t *ops = chosen->desc->tokenizer;
    void *state = NULL;
    char perr[512] = "";
    int rc = ops->load(um_plugin_host(), model_dir, &state, perr, sizeof perr);
    if (rc != 0) {
        snprintf(err, errlen, "tokenizer plugin %s failed to load %s: %s", chosen->desc->name,
                 model_dir, perr[0] ? perr : um_strerror(rc));
        return rc;
    }
    tok->plugin = chosen;
    tok->ops = ops;
    tok->state = state;
    return 0;
}

int um_tokenizer_open_copy(um_tokenizer_t *tok, const um_tokenizer_t *src,
                           const char *model_dir, char *err, size_t errlen)
{
    void *state = NULL;
    char perr[512] = "";
    int rc = src->ops->load(um_plugin_host_quiet(), model_dir, &state, perr, sizeof perr);
    if (rc != 0) {
        snprintf(err, errlen, "tokenizer plugin %s failed to load %s a second time: %s",
                 src->plugin->desc->name, model_dir, perr[0] ? perr : um_strerror(rc));
        return rc;
    }
    *tok = *src;
    tok->state = state;
    return 0;
}

void um_tokenizer_close(um_tokenizer_t *tok)
{
    if (tok->ops && tok->state)
        tok->ops->unload(tok->state);
    *tok = (um_tokenizer_t){0};
}

int um_tokenizer_encode(um_tokenizer_t *tok, const char *text, size_t len, int32_t **ids,
                        size_t *n)
{
    size_t cap = len + 16;
    *ids = NULL;
    *n = 0;
    for (int attempt = 0; attempt < 2; attempt++) {
        int32_t *buf = malloc(cap * sizeof *buf);
        if (!buf)
            return UM_ENOMEM;
        size_t got = 0;
        int rc = tok->ops->encode(tok->state, text, len, buf, cap, &got);
        if (rc == 0) {
            *ids = buf;
            *n = got;
            return 0;
        }
        free(buf);
        if (rc != UM_ENOSPACE)
            return rc;
        cap = got;
    }
    return UM_EPLUGIN;
}

int um_tokenizer_decode(um_tokenizer_t *tok, const int32_t *ids, size_t n, unsigned flags,
                        char **text, size_t *len)
{
    size_t cap = n * 8 + 16;
    *text = NULL;
    for (int attempt = 0; attempt < 2; attempt++) {
        char *buf = malloc(cap + 1);
        if (!buf)
            return UM_ENOMEM;
        size_t got = 0;
        int rc = tok->ops->decode(tok->state, ids, n, flags, buf, cap + 1, &got);
        if (rc == 0) {
            *text = buf;
            if (len)
                *len = got;
            return 0;
        }
        free(buf);
        if (rc != UM_ENOSPACE)
            return rc;
        cap = got;
    }
    return UM_EPLUGIN;
}
