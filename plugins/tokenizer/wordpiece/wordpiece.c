/*
 * WordPiece tokenizer plugin: reads the vocabulary of BERT-family models (BERT,
 * DistilBERT and their fine-tunes) from vocab.txt or a WordPiece tokenizer.json, and
 * encodes text to ids and back.
 *
 * This file contains the arena and the special-token list, decode, loading and
 * unloading and the plugin descriptor. The files are read in wordpiece_load.c and
 * text is encoded in wordpiece_encode.c. wordpiece.h describes the shared structure
 * and its threading rule. All memory comes from the host's alloc and free, except
 * what jansson allocates while a file is parsed.
 */
#include "wordpiece.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ------------------------------------------------------------------------- */
/* Arena and special tokens                                                  */

char *um_wp_arena_copy(um_wp_t *wp, const void *src, size_t len)
{
    const size_t block_size = 256 * 1024;
    um_wp_arena_block_t *block = wp->arena;
    if (!block || block->cap - block->used < len + 1) {
        size_t cap = len + 1 > block_size ? len + 1 : block_size;
        block = wp->host->alloc(sizeof *block + cap);
        if (!block)
            return NULL;
        block->cap = cap;
        block->used = 0;
        block->next = wp->arena;
        wp->arena = block;
    }
    char *dst = (char *)block->data + block->used;
    memcpy(dst, src, len);
    dst[len] = '\0';
    block->used += len + 1;
    return dst;
}

int um_wp_add_literal(um_wp_t *wp, const char *text, size_t len, int32_t id, int32_t capacity)
{
    if (!wp->literals) {
        wp->literals = wp->host->alloc((size_t)(capacity > 0 ? capacity : 1) *
                                       sizeof *wp->literals);
        if (!wp->literals)
            return UM_ENOMEM;
    }
    if (wp->n_literals >= capacity)
        return UM_OK; /* not reached: callers count every candidate */
    wp->literals[wp->n_literals++] = (um_wp_literal_t){text, (uint32_t)len, id};
    return UM_OK;
}

static int s_compare_literals(const void *a, const void *b)
{
    const um_wp_literal_t *x = a, *y = b;
    unsigned char fx = (unsigned char)x->text[0], fy = (unsigned char)y->text[0];
    if (fx != fy)
        return fx < fy ? -1 : 1;
    if (x->len != y->len)
        return x->len > y->len ? -1 : 1; /* longest first */
    return x->id < y->id ? -1 : x->id > y->id;
}

void um_wp_index_literals(um_wp_t *wp)
{
    if (wp->n_literals == 0)
        return;
    qsort(wp->literals, (size_t)wp->n_literals, sizeof *wp->literals, s_compare_literals);
    for (int32_t k = wp->n_literals - 1; k >= 0; k--) {
        unsigned char first = (unsigned char)wp->literals[k].text[0];
        wp->literal_first[first] = k;
        wp->literal_count[first]++;
    }
}

/* ------------------------------------------------------------------------- */
/* Decode                                                                    */

/*
 * The replacements of transformers' clean_up_tokenization, applied in this order to
 * the whole text. Each removes the space in front of the punctuation or contraction
 * that BERT's tokenization split off.
 */
static const char *const s_cleanup_rules[] = {
    " .", " ?", " !", " ,", " ' ", " n't", " 'm", " 's", " 've", " 're",
};

/*
 * Apply one rule to s[0..n) in place: every occurrence of rule loses its leading
 * space, and " ' " also its trailing one. Returns the new length.
 */
static size_t s_cleanup_rule(char *s, size_t n, const char *rule)
{
    size_t rule_len = strlen(rule);
    int both = strcmp(rule, " ' ") == 0;
    size_t out = 0;
    for (size_t i = 0; i < n;) {
        if (n - i >= rule_len && memcmp(s + i, rule, rule_len) == 0) {
            size_t keep = rule_len - 1 - (size_t)both;
            memmove(s + out, s + i + 1, keep);
            out += keep;
            i += rule_len;
        } else {
            s[out++] = s[i++];
        }
    }
    return out;
}

/*
 * Decode ids as BERT's decoder does: the first token as it is, then each token that
 * starts with the continuing prefix without it, and every other token after a space.
 * With cleanup, the spaces before punctuation and English contractions go away.
 * Special tokens are left out with UM_DECODE_SKIP_SPECIAL.
 */
static int s_decode(um_wp_t *wp, const int32_t *ids, size_t n, unsigned flags, char *out,
                    size_t cap, size_t *len)
{
    size_t raw = 0;
    for (size_t i = 0; i < n; i++) {
        int32_t id = ids[i];
        if (id < 0 || id >= wp->n_tokens || !wp->tokens[id].present) {
            UM_WP_LOG(wp, UM_LOG_DEBUG, "decode: id %d at index %zu is not in the vocabulary "
                      "(%d ids)", (int)id, i, (int)wp->n_tokens);
            return UM_ERANGE;
        }
        raw += wp->tokens[id].len + 1;
    }
    if (um_tok_buf_reserve(wp->host, &wp->text, raw + 1))
        return UM_ENOMEM;

    char *p = (char *)wp->text.data;
    size_t used = 0;
    size_t written = 0;
    for (size_t i = 0; i < n; i++) {
        const um_wp_token_t *t = &wp->tokens[ids[i]];
        if (t->special && (flags & UM_DECODE_SKIP_SPECIAL))
            continue;
        const char *text = t->text;
        size_t text_len = t->len;
        if (written > 0) {
            if (wp->prefix_len > 0 && text_len >= wp->prefix_len &&
                memcmp(text, wp->prefix, wp->prefix_len) == 0) {
                text += wp->prefix_len;
                text_len -= wp->prefix_len;
            } else {
                p[used++] = ' ';
            }
        }
        memcpy(p + used, text, text_len);
        used += text_len;
        written++;
    }
    if (wp->cleanup) {
        for (size_t r = 0; r < sizeof s_cleanup_rules / sizeof s_cleanup_rules[0]; r++)
            used = s_cleanup_rule(p, used, s_cleanup_rules[r]);
    }

    *len = used;
    if (!out || cap < used + 1)
        return UM_ENOSPACE;
    memcpy(out, p, used);
    out[used] = '\0';
    return UM_OK;
}

/* ------------------------------------------------------------------------- */
/* Loading and unloading                                                     */

static void s_destroy(um_wp_t *wp)
{
    if (!wp)
        return;
    const um_host_t *host = wp->host;
    while (wp->arena) {
        um_wp_arena_block_t *next = wp->arena->next;
        host->free(wp->arena);
        wp->arena = next;
    }
    um_tok_table_free(host, &wp->table);
    um_tok_buf_t *bufs[] = {&wp->cps, &wp->cps2, &wp->word, &wp->bounds, &wp->key, &wp->pieces,
                            &wp->text};
    for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++)
        um_tok_buf_free(host, bufs[i]);
    if (wp->tokens)
        host->free(wp->tokens);
    if (wp->literals)
        host->free(wp->literals);
    host->free(wp);
}

static int s_probe(const char *model_dir)
{
    return model_dir ? um_wp_probe_dir(model_dir) : 0;
}

static int s_load(const um_host_t *host, const char *model_dir, void **tok, char *err,
                  size_t errlen)
{
    if (!host || !tok || !model_dir || host->struct_size < offsetof(um_host_t, free) +
                                                               sizeof host->free ||
        !host->alloc || !host->free) {
        snprintf(err, errlen, "wordpiece: load needs a host table with alloc and free and a "
                 "model folder");
        return UM_EINVAL;
    }
    *tok = NULL;
    um_wp_t *wp = host->alloc(sizeof *wp);
    if (!wp) {
        snprintf(err, errlen, "wordpiece: out of memory loading %s", model_dir);
        return UM_ENOMEM;
    }
    memset(wp, 0, sizeof *wp);
    wp->host = host;

    int rc = um_wp_load_dir(wp, model_dir, err, errlen);
    if (rc) {
        s_destroy(wp);
        return rc;
    }
    UM_WP_LOG(wp, UM_LOG_INFO, "loaded %s: %d ids, %d special tokens, unknown %s, %s, %s "
              "accents, CJK %s, at most %d characters per word", model_dir, (int)wp->n_tokens,
              (int)wp->n_literals, wp->tokens[wp->unk_id].text,
              wp->lowercase ? "lowercased" : "cased", wp->strip_accents ? "strips" : "keeps",
              wp->handle_chinese_chars ? "split" : "kept together", (int)wp->max_chars);
    *tok = wp;
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
    return ((um_wp_t *)tok)->n_tokens;
}

static int s_encode(void *tok, const char *text, size_t len, int32_t *ids, size_t cap,
                    size_t *n_ids)
{
    if (!tok || !n_ids || (!text && len) || (!ids && cap))
        return UM_EINVAL;
    return um_wp_encode(tok, text ? text : "", len, ids, cap, n_ids);
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
    int32_t found = um_tok_table_get(&((um_wp_t *)tok)->table, piece, strlen(piece));
    if (found < 0)
        return UM_ENOTFOUND;
    *id = found;
    return UM_OK;
}

static int s_is_special(void *tok, int32_t id)
{
    const um_wp_t *wp = tok;
    if (!wp || id < 0 || id >= wp->n_tokens)
        return 0;
    return wp->tokens[id].special;
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
    .name = UM_WP_NAME,
    .version = "1.0.0",
    .description = "WordPiece from vocab.txt or tokenizer.json (BERT, DistilBERT)",
    .tokenizer = &s_ops,
};

UM_PLUGIN_EXPORT const um_plugin_desc_t *um_plugin_describe(void)
{
    return &s_desc;
}
