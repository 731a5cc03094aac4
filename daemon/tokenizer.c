/* The daemon's tokenizer wrapper: plugin choice and self-sizing buffers (see tokenizer.h). */
#include "tokenizer.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "log.h"

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
        if (!chosen) {
            snprintf(err, errlen, "no loaded tokenizer plugin can read the tokenizer files in "
                     "%s: add tokenizer.json or load a plugin for this format", model_dir);
            return UM_ENOTFOUND;
        }
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
