/*
 * SentencePiece BPE tokenizer plugin: reads the tokenizer.model of LLaMA-1/2,
 * TinyLlama and the models built on them, and encodes text to ids and back.
 *
 * This file contains decode, loading and unloading and the plugin descriptor; the
 * protobuf reader is in spm_model.c and encoding in spm_encode.c. spm.h describes the
 * shared structure and its threading rule. All memory comes from the host's alloc and
 * free, except the probe's temporary read of the file.
 */
#include "spm.h"

#include <stdio.h>
#include <string.h>

/* ------------------------------------------------------------------------- */
/* Decode                                                                    */

static int s_is_special_type(uint8_t type)
{
    return type == UM_SPM_CONTROL || type == UM_SPM_UNKNOWN;
}

/*
 * Decode ids. A BYTE piece is its byte, a CONTROL or UNKNOWN piece its text (left out
 * with UM_DECODE_SKIP_SPECIAL), any other piece its text with the space marker
 * turned back into a space. When the first text written comes from a piece that
 * starts with the marker and the model adds a dummy prefix, that space is dropped,
 * as SentencePiece does. Invalid UTF-8 from byte pieces becomes U+FFFD.
 */
static int s_decode(um_spm_t *spm, const int32_t *ids, size_t n, unsigned flags, char *out,
                    size_t cap, size_t *len)
{
    int skip = (flags & UM_DECODE_SKIP_SPECIAL) != 0;
    size_t raw = 0;
    for (size_t i = 0; i < n; i++) {
        int32_t id = ids[i];
        if (id < 0 || id >= spm->n_pieces) {
            UM_SPM_LOG(spm, UM_LOG_DEBUG, "decode: id %d at index %zu is not in the "
                       "vocabulary (%d ids)", (int)id, i, (int)spm->n_pieces);
            return UM_ERANGE;
        }
        raw += spm->pieces[id].len; /* an upper bound: markers shrink, bytes are 1 */
    }
    if (um_tok_buf_reserve(spm->host, &spm->text, raw + 1))
        return UM_ENOMEM;

    const char *marker = spm->escape_whitespaces ? UM_SPM_SPACE : " ";
    size_t marker_len = spm->escape_whitespaces ? UM_SPM_SPACE_LEN : 1;
    int drop_prefix = spm->add_dummy_prefix || spm->remove_extra_whitespaces;
    int at_start = 1;
    unsigned char *p = spm->text.data;
    for (size_t i = 0; i < n; i++) {
        const um_spm_piece_t *piece = &spm->pieces[ids[i]];
        if (s_is_special_type(piece->type)) {
            if (skip)
                continue;
            memcpy(p, piece->text, piece->len);
            p += piece->len;
            at_start = 0;
            continue;
        }
        if (piece->type == UM_SPM_BYTE) {
            *p++ = piece->byte;
            at_start = 0;
            continue;
        }
        const char *t = piece->text;
        const char *end = t + piece->len;
        if (at_start && drop_prefix && piece->len >= marker_len &&
            memcmp(t, marker, marker_len) == 0)
            t += marker_len;
        at_start = 0;
        while (t < end) {
            if (spm->escape_whitespaces && end - t >= UM_SPM_SPACE_LEN &&
                memcmp(t, UM_SPM_SPACE, UM_SPM_SPACE_LEN) == 0) {
                *p++ = ' ';
                t += UM_SPM_SPACE_LEN;
            } else {
                *p++ = (unsigned char)*t++;
            }
        }
    }

    size_t written = (size_t)(p - spm->text.data);
    size_t need = um_utf8_repair(spm->text.data, written, NULL);
    *len = need;
    if (!out || cap < need + 1)
        return UM_ENOSPACE;
    um_utf8_repair(spm->text.data, written, (unsigned char *)out);
    out[need] = '\0';
    return UM_OK;
}

/* ------------------------------------------------------------------------- */
/* Loading and unloading                                                     */

static void s_destroy(um_spm_t *spm)
{
    if (!spm)
        return;
    const um_host_t *host = spm->host;
    um_tok_table_free(host, &spm->table);
    um_tok_buf_free(host, &spm->norm);
    um_tok_buf_free(host, &spm->symbols);
    um_tok_buf_free(host, &spm->heap);
    um_tok_buf_free(host, &spm->text);
    um_tok_buf_free(host, &spm->touched);
    if (spm->pieces)
        host->free(spm->pieces);
    if (spm->strings)
        host->free(spm->strings);
    if (spm->unused_split)
        host->free(spm->unused_split);
    if (spm->literals)
        host->free(spm->literals);
    host->free(spm);
}

static int s_probe(const char *model_dir)
{
    if (!model_dir)
        return 0;
    char path[4096];
    int n = snprintf(path, sizeof path, "%s/" UM_SPM_FILE, model_dir);
    if (n < 0 || (size_t)n >= sizeof path)
        return 0;
    return um_spm_probe_model(path);
}

static const char *s_piece_text(const um_spm_t *spm, int32_t id)
{
    return id >= 0 ? spm->pieces[id].text : "(none)";
}

static int s_load(const um_host_t *host, const char *model_dir, void **tok, char *err,
                  size_t errlen)
{
    if (!host || !tok || !model_dir || host->struct_size < offsetof(um_host_t, free) +
                                                               sizeof host->free ||
        !host->alloc || !host->free) {
        snprintf(err, errlen, "spm: load needs a host table with alloc and free and a model "
                 "folder");
        return UM_EINVAL;
    }
    *tok = NULL;

    char path[4096];
    int n = snprintf(path, sizeof path, "%s/" UM_SPM_FILE, model_dir);
    if (n < 0 || (size_t)n >= sizeof path) {
        snprintf(err, errlen, "spm: the model folder path is longer than %zu bytes",
                 sizeof path - sizeof UM_SPM_FILE - 1);
        return UM_EINVAL;
    }

    um_spm_t *spm = host->alloc(sizeof *spm);
    if (!spm) {
        snprintf(err, errlen, "%s: out of memory while loading the tokenizer", path);
        return UM_ENOMEM;
    }
    memset(spm, 0, sizeof *spm);
    spm->host = host;

    int rc = um_spm_load_model(spm, path, err, errlen);
    if (rc) {
        s_destroy(spm);
        return rc;
    }
    UM_SPM_LOG(spm, UM_LOG_INFO, "loaded %s: %d pieces, %d user-defined, unknown %s, BOS %s, "
               "EOS %s, byte fallback %s, dummy prefix %s, extra spaces %s, merges %s", path,
               (int)spm->n_pieces, (int)spm->n_literals, s_piece_text(spm, spm->unk_id),
               s_piece_text(spm, spm->bos_id), s_piece_text(spm, spm->eos_id),
               spm->byte_fallback ? "on" : "off", spm->add_dummy_prefix ? "on" : "off",
               spm->remove_extra_whitespaces ? "removed" : "kept",
               spm->word_chunks ? "word by word" : "over the whole text");
    *tok = spm;
    return UM_OK;
}

/* ------------------------------------------------------------------------- */
/* Plugin table                                                              */

static void s_unload(void *tok)
{
    s_destroy(tok);
}

static int32_t s_vocab_size(void *tok)
{
    return ((um_spm_t *)tok)->n_pieces;
}

static int s_encode(void *tok, const char *text, size_t len, int32_t *ids, size_t cap,
                    size_t *n_ids)
{
    if (!tok || !n_ids || (!text && len) || (!ids && cap))
        return UM_EINVAL;
    return um_spm_encode(tok, text ? text : "", len, ids, cap, n_ids);
}

static int s_decode_op(void *tok, const int32_t *ids, size_t n, unsigned flags, char *out,
                       size_t cap, size_t *len)
{
    if (!tok || !len || (!ids && n))
        return UM_EINVAL;
    return s_decode(tok, ids, n, flags, out, cap, len);
}

static int s_token_to_id(void *tok, const char *piece, int32_t *id)
{
    if (!tok || !piece || !id)
        return UM_EINVAL;
    int32_t found = um_tok_table_get(&((um_spm_t *)tok)->table, piece, strlen(piece));
    if (found < 0)
        return UM_ENOTFOUND;
    *id = found;
    return UM_OK;
}

/* CONTROL pieces (<s>, </s>) and the unknown piece are special; BYTE pieces are not. */
static int s_is_special(void *tok, int32_t id)
{
    const um_spm_t *spm = tok;
    if (!spm || id < 0 || id >= spm->n_pieces)
        return 0;
    return s_is_special_type(spm->pieces[id].type);
}

static const um_tokenizer_ops_t s_ops = {
    .struct_size = sizeof(um_tokenizer_ops_t),
    .probe = s_probe,
    .load = s_load,
    .unload = s_unload,
    .vocab_size = s_vocab_size,
    .encode = s_encode,
    .decode = s_decode_op,
    .token_to_id = s_token_to_id,
    .is_special = s_is_special,
};

static const um_plugin_desc_t s_desc = {
    .abi_major = UM_PLUGIN_ABI_MAJOR,
    .abi_minor = UM_PLUGIN_ABI_MINOR,
    .struct_size = sizeof(um_plugin_desc_t),
    .kind = UM_PLUGIN_TOKENIZER,
    .name = UM_SPM_NAME,
    .version = "1.0.0",
    .description = "SentencePiece BPE from tokenizer.model (LLaMA-1/2, TinyLlama)",
    .tokenizer = &s_ops,
};

UM_PLUGIN_EXPORT const um_plugin_desc_t *um_plugin_describe(void)
{
    return &s_desc;
}
