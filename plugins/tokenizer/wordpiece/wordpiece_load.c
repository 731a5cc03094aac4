/*
 * Loading a BERT-style WordPiece vocabulary from a model folder, in this order:
 *
 * 1. tokenizer_config.json, when present: do_lower_case, strip_accents,
 *    tokenize_chinese_chars, clean_up_tokenization_spaces, the names of the
 *    unknown, separator, padding, classifier and mask tokens, and added_tokens_decoder.
 * 2. tokenizer.json when present, else vocab.txt. The model of tokenizer.json must be
 *    WordPiece, and its normalizer, pre-tokenizer, decoder and added tokens then decide
 *    everything but the decode cleanup. vocab.txt has one token per line, and a
 *    token's id is its 0-based line number.
 * 3. For vocab.txt without do_lower_case, the case handling is inferred from the
 *    vocabulary: fewer than 1% of its entries with an upper-case letter means an
 *    uncased model, which lowercases and strips accents.
 *
 * Every error names the file and the line, byte offset or JSON field at fault.
 */
#include "wordpiece.h"

#include <errno.h>
#include <jansson.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <utf8proc.h>

/* Largest vocab.txt read: bert-base-uncased's is 0.2 MiB, multilingual ones below 2 MiB. */
#define S_MAX_VOCAB_FILE (256u << 20)

/* What a loader step needs to report an error. */
typedef struct s_ctx {
    um_wp_t *wp;
    const char *path;
    char *err;
    size_t errlen;
} s_ctx_t;

/* Write "path: message" to the error buffer and return code. */
__attribute__((format(printf, 3, 4))) static int s_fail(const s_ctx_t *ctx, int code,
                                                          const char *fmt, ...)
{
    if (!ctx->err || ctx->errlen == 0)
        return code;
    int n = snprintf(ctx->err, ctx->errlen, "%s: ", ctx->path);
    if (n >= 0 && (size_t)n < ctx->errlen) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(ctx->err + n, ctx->errlen - (size_t)n, fmt, ap);
        va_end(ap);
    }
    return code;
}

static int s_oom(const s_ctx_t *ctx)
{
    return s_fail(ctx, UM_ENOMEM, "out of memory while loading the tokenizer");
}

/* Settings gathered from the files; -1 means the files did not set it. */
typedef struct s_settings {
    int lowercase;
    int strip_accents;
    int handle_chinese_chars;
    int cleanup;
    char unk[64];              /* the unknown token's text */
    char named[4][64];         /* separator, padding, classifier and mask tokens of vocab.txt */
    json_t *added_decoder;     /* tokenizer_config.json's added_tokens_decoder, borrowed */
    char config_path[4096];    /* for messages about added_decoder */
} s_settings_t;

/* ------------------------------------------------------------------------- */
/* JSON helpers                                                              */

/* Open path with jansson; *rc and the message explain a failure. */
static json_t *s_open_json(const s_ctx_t *ctx, int *rc)
{
    json_error_t jerr;
    json_t *doc = json_load_file(ctx->path, 0, &jerr);
    if (doc) {
        if (json_is_object(doc))
            return doc;
        json_decref(doc);
        *rc = s_fail(ctx, UM_EFORMAT, "the top level must be a JSON object");
        return NULL;
    }
    if (json_error_code(&jerr) == json_error_cannot_open_file) {
        *rc = s_fail(ctx, UM_EIO, "cannot be read: %s", jerr.text);
        return NULL;
    }
    *rc = s_fail(ctx, UM_EFORMAT, "invalid JSON at line %d, column %d: %s", jerr.line,
                 jerr.column, jerr.text);
    return NULL;
}

/* Read an optional boolean field into *out (left alone when absent or null). */
static int s_json_bool(const s_ctx_t *ctx, json_t *obj, const char *prefix, const char *key,
                       int *out)
{
    json_t *value = json_object_get(obj, key);
    if (!value || json_is_null(value))
        return UM_OK;
    if (!json_is_boolean(value))
        return s_fail(ctx, UM_EFORMAT, "%s%s must be true or false", prefix, key);
    *out = json_is_true(value);
    return UM_OK;
}

/*
 * Read a token name given as a string or as {"content": string} into out (size 64);
 * left alone when absent or null.
 */
static int s_json_token_name(const s_ctx_t *ctx, json_t *obj, const char *key, char out[64])
{
    json_t *value = json_object_get(obj, key);
    if (!value || json_is_null(value))
        return UM_OK;
    if (json_is_object(value))
        value = json_object_get(value, "content");
    if (!json_is_string(value) || json_string_length(value) == 0 ||
        json_string_length(value) >= 64)
        return s_fail(ctx, UM_EFORMAT, "%s must be a non-empty string of at most 63 bytes or "
                      "an object with such a \"content\"", key);
    memcpy(out, json_string_value(value), json_string_length(value) + 1);
    return UM_OK;
}

/* Read the token id in value into *id; it must be an integer in [0, UM_WP_MAX_ID]. */
static int s_json_id(const s_ctx_t *ctx, const json_t *value, const char *field, int32_t *id)
{
    if (!json_is_integer(value))
        return s_fail(ctx, UM_EFORMAT, "%s must be an integer token id", field);
    json_int_t v = json_integer_value(value);
    if (v < 0 || v > UM_WP_MAX_ID)
        return s_fail(ctx, UM_EFORMAT, "%s is %lld, outside the supported ids 0..%d", field,
                      (long long)v, UM_WP_MAX_ID);
    *id = (int32_t)v;
    return UM_OK;
}

/* ------------------------------------------------------------------------- */
/* tokenizer_config.json                                                     */

static int s_read_config(const s_ctx_t *ctx, json_t *doc, s_settings_t *set)
{
    static const char *const names[4] = {"sep_token", "pad_token", "cls_token", "mask_token"};
    int rc = s_json_bool(ctx, doc, "", "do_lower_case", &set->lowercase);
    if (!rc)
        rc = s_json_bool(ctx, doc, "", "strip_accents", &set->strip_accents);
    if (!rc)
        rc = s_json_bool(ctx, doc, "", "tokenize_chinese_chars", &set->handle_chinese_chars);
    if (!rc)
        rc = s_json_bool(ctx, doc, "", "clean_up_tokenization_spaces", &set->cleanup);
    if (!rc)
        rc = s_json_token_name(ctx, doc, "unk_token", set->unk);
    for (int i = 0; i < 4 && !rc; i++)
        rc = s_json_token_name(ctx, doc, names[i], set->named[i]);
    if (rc)
        return rc;

    json_t *added = json_object_get(doc, "added_tokens_decoder");
    if (!added || json_is_null(added))
        return UM_OK;
    if (!json_is_object(added))
        return s_fail(ctx, UM_EFORMAT, "added_tokens_decoder must be an object from ids to "
                      "tokens");
    const char *key;
    json_t *entry;
    json_object_foreach(added, key, entry) {
        char *end = NULL;
        long id = strtol(key, &end, 10);
        if (!*key || *end || id < 0 || id > UM_WP_MAX_ID)
            return s_fail(ctx, UM_EFORMAT, "added_tokens_decoder key \"%.40s\" is not a token "
                          "id in 0..%d", key, UM_WP_MAX_ID);
        json_t *content = json_object_get(entry, "content");
        if (!json_is_string(content) || json_string_length(content) == 0)
            return s_fail(ctx, UM_EFORMAT, "added_tokens_decoder[\"%s\"].content is missing or "
                          "not a non-empty string", key);
    }
    set->added_decoder = added;
    return UM_OK;
}

/* ------------------------------------------------------------------------- */
/* Vocabulary                                                                */

/* Allocate the tokens array for ids 0..n_tokens-1 and a table for n_keys entries. */
static int s_alloc_vocab(const s_ctx_t *ctx, int32_t n_tokens, size_t n_keys)
{
    um_wp_t *wp = ctx->wp;
    size_t bytes = (size_t)n_tokens * sizeof *wp->tokens;
    wp->tokens = wp->host->alloc(bytes ? bytes : 1);
    if (!wp->tokens || um_tok_table_init(wp->host, &wp->table, n_keys))
        return s_oom(ctx);
    memset(wp->tokens, 0, bytes);
    wp->n_tokens = n_tokens;
    return UM_OK;
}

/*
 * Give id the text text[0..len) and map the text to id. Returns 1 when the text was
 * already mapped to another id (the new id replaces it, as a dictionary built in file
 * order would), 0 otherwise, or UM_ENOMEM.
 */
static int s_set_token(um_wp_t *wp, int32_t id, const char *text, size_t len)
{
    char *copy = um_wp_arena_copy(wp, text, len);
    if (!copy)
        return UM_ENOMEM;
    um_wp_token_t *t = &wp->tokens[id];
    t->text = copy;
    t->len = (uint32_t)len;
    t->present = 1;
    if (len > wp->max_token_len)
        wp->max_token_len = (uint32_t)len;
    int32_t old = um_tok_table_put(&wp->table, copy, len, id, 1);
    return old >= 0 && old != id;
}

/* Read vocab.txt (data[0..size)): one token per line, ids by line. */
static int s_read_vocab_txt(const s_ctx_t *ctx, const char *data, size_t size)
{
    um_wp_t *wp = ctx->wp;
    size_t n_lines = 0;
    for (size_t i = 0; i < size; i++)
        n_lines += data[i] == '\n';
    if (size > 0 && data[size - 1] != '\n')
        n_lines++; /* a last line without a newline */
    if (n_lines == 0)
        return s_fail(ctx, UM_EFORMAT, "the file is empty; it must list one token per line");
    if (n_lines > (size_t)UM_WP_MAX_ID + 1)
        return s_fail(ctx, UM_EFORMAT, "has %zu lines, more than the %d ids supported", n_lines,
                      UM_WP_MAX_ID + 1);
    int rc = s_alloc_vocab(ctx, (int32_t)n_lines, n_lines);
    if (rc)
        return rc;

    size_t repeats = 0, first_repeat = 0;
    size_t start = 0;
    for (size_t line = 1; line <= n_lines; line++) {
        const char *nl = memchr(data + start, '\n', size - start);
        size_t end = nl ? (size_t)(nl - data) : size;
        size_t len = end - start;
        if (len > 0 && data[start + len - 1] == '\r')
            len--; /* CRLF line ends */
        const char *text = data + start;
        if (len == 0)
            return s_fail(ctx, UM_EFORMAT, "line %zu (byte offset %zu) is empty; every line "
                          "must contain one token", line, start);
        const char *nul = memchr(text, '\0', len);
        if (nul)
            return s_fail(ctx, UM_EFORMAT, "line %zu contains a NUL byte at byte offset %zu",
                          line, (size_t)(nul - data));
        size_t bad = um_utf8_invalid_at((const unsigned char *)text, len);
        if (bad < len)
            return s_fail(ctx, UM_EFORMAT, "line %zu is not valid UTF-8: byte 0x%02x at byte "
                          "offset %zu", line, (unsigned char)text[bad], start + bad);
        rc = s_set_token(wp, (int32_t)(line - 1), text, len);
        if (rc < 0)
            return s_oom(ctx);
        if (rc > 0 && repeats++ == 0)
            first_repeat = line;
        start = end + 1;
    }
    if (repeats)
        UM_WP_LOG(wp, UM_LOG_WARN, "%s: %zu lines repeat an earlier token (the first at line "
                  "%zu); the last line of each wins for encoding", ctx->path, repeats,
                  first_repeat);
    return UM_OK;
}

/* ------------------------------------------------------------------------- */
/* tokenizer.json                                                            */

/* The settings of a BertNormalizer, or none at all for a null normalizer. */
static int s_read_normalizer(const s_ctx_t *ctx, json_t *normalizer)
{
    um_wp_t *wp = ctx->wp;
    if (!normalizer || json_is_null(normalizer)) {
        wp->clean_text = wp->handle_chinese_chars = wp->strip_accents = wp->lowercase = 0;
        return UM_OK;
    }
    const char *type = json_string_value(json_object_get(normalizer, "type"));
    if (!type || strcmp(type, "BertNormalizer") != 0)
        return s_fail(ctx, UM_EUNSUPPORTED, "normalizer of type \"%s\" is not supported; only "
                      "BertNormalizer or null", type ? type : "(missing)");
    int clean = 1, chinese = 1, lower = 1, strip = -1;
    int rc = s_json_bool(ctx, normalizer, "normalizer.", "clean_text", &clean);
    if (!rc)
        rc = s_json_bool(ctx, normalizer, "normalizer.", "handle_chinese_chars", &chinese);
    if (!rc)
        rc = s_json_bool(ctx, normalizer, "normalizer.", "lowercase", &lower);
    if (!rc)
        rc = s_json_bool(ctx, normalizer, "normalizer.", "strip_accents", &strip);
    if (rc)
        return rc;
    wp->clean_text = clean;
    wp->handle_chinese_chars = chinese;
    wp->lowercase = lower;
    wp->strip_accents = strip < 0 ? lower : strip; /* null follows lowercase */
    return UM_OK;
}

/* model.vocab and added_tokens: size the arrays, then fill them. */
static int s_read_json_vocab(const s_ctx_t *ctx, json_t *vocab, json_t *added)
{
    um_wp_t *wp = ctx->wp;
    int32_t max_id = -1;
    const char *key;
    json_t *value;
    json_object_foreach(vocab, key, value) {
        char field[96];
        snprintf(field, sizeof field, "model.vocab[\"%.60s\"]", key);
        int32_t id;
        int rc = s_json_id(ctx, value, field, &id);
        if (rc)
            return rc;
        if (id > max_id)
            max_id = id;
    }
    size_t i;
    json_array_foreach(added, i, value) {
        char field[64];
        json_t *content = json_object_get(value, "content");
        if (!json_is_object(value) || !json_is_string(content) ||
            json_string_length(content) == 0)
            return s_fail(ctx, UM_EFORMAT, "added_tokens[%zu] must be an object with a "
                          "non-empty string \"content\"", i);
        snprintf(field, sizeof field, "added_tokens[%zu].id", i);
        int32_t id;
        int rc = s_json_id(ctx, json_object_get(value, "id"), field, &id);
        if (rc)
            return rc;
        if (id > max_id)
            max_id = id;
    }
    if (max_id < 0)
        return s_fail(ctx, UM_EFORMAT, "model.vocab is empty");

    int rc = s_alloc_vocab(ctx, max_id + 1, json_object_size(vocab) + json_array_size(added));
    if (rc)
        return rc;
    json_object_foreach(vocab, key, value) {
        int32_t id = (int32_t)json_integer_value(value);
        if (wp->tokens[id].present)
            return s_fail(ctx, UM_EFORMAT, "model.vocab gives id %d to both \"%.60s\" and "
                          "\"%.60s\"", (int)id, wp->tokens[id].text, key);
        size_t len = strlen(key);
        if (len == 0 || um_utf8_invalid_at((const unsigned char *)key, len) != len)
            return s_fail(ctx, UM_EFORMAT, "model.vocab has an empty entry for id %d", (int)id);
        if (s_set_token(wp, id, key, len) < 0)
            return s_oom(ctx);
    }
    return UM_OK;
}

/* Mark and index the added tokens of tokenizer.json (checked by s_read_json_vocab). */
static int s_read_json_added(const s_ctx_t *ctx, json_t *added)
{
    um_wp_t *wp = ctx->wp;
    int32_t capacity = (int32_t)json_array_size(added);
    size_t i;
    json_t *entry;
    json_array_foreach(added, i, entry) {
        json_t *content = json_object_get(entry, "content");
        const char *text = json_string_value(content);
        size_t len = json_string_length(content);
        int32_t id = (int32_t)json_integer_value(json_object_get(entry, "id"));
        um_wp_token_t *t = &wp->tokens[id];
        if (!t->present || t->len != len || memcmp(t->text, text, len) != 0) {
            if (t->present)
                UM_WP_LOG(wp, UM_LOG_WARN, "%s: added_tokens[%zu] \"%.60s\" takes id %d from "
                          "model.vocab entry \"%.60s\"", ctx->path, i, text, (int)id, t->text);
            if (s_set_token(wp, id, text, len) < 0)
                return s_oom(ctx);
        }
        t->special = json_is_true(json_object_get(entry, "special"));
        if (um_wp_add_literal(wp, t->text, t->len, id, capacity))
            return s_oom(ctx);
    }
    return UM_OK;
}

static int s_read_tokenizer_json(const s_ctx_t *ctx, json_t *doc, s_settings_t *set)
{
    um_wp_t *wp = ctx->wp;
    json_t *model = json_object_get(doc, "model");
    if (!json_is_object(model))
        return s_fail(ctx, UM_EFORMAT, "model is missing or not an object");
    const char *type = json_string_value(json_object_get(model, "type"));
    if (!type || strcmp(type, "WordPiece") != 0)
        return s_fail(ctx, UM_EUNSUPPORTED, "model.type is \"%s\"; this plugin reads only "
                      "\"WordPiece\"", type ? type : "(missing)");
    json_t *vocab = json_object_get(model, "vocab");
    if (!json_is_object(vocab))
        return s_fail(ctx, UM_EFORMAT, "model.vocab is missing or not an object");
    json_t *added = json_object_get(doc, "added_tokens");
    if (added && !json_is_null(added) && !json_is_array(added))
        return s_fail(ctx, UM_EFORMAT, "added_tokens must be an array");

    json_t *unk = json_object_get(model, "unk_token");
    if (unk && !json_is_null(unk)) {
        if (!json_is_string(unk) || json_string_length(unk) == 0 ||
            json_string_length(unk) >= sizeof set->unk)
            return s_fail(ctx, UM_EFORMAT, "model.unk_token must be a non-empty string");
        memcpy(set->unk, json_string_value(unk), json_string_length(unk) + 1);
    }
    json_t *prefix = json_object_get(model, "continuing_subword_prefix");
    if (prefix && !json_is_null(prefix)) {
        if (!json_is_string(prefix) || json_string_length(prefix) > UM_WP_PREFIX_MAX)
            return s_fail(ctx, UM_EFORMAT, "model.continuing_subword_prefix must be a string of "
                          "at most %d bytes", UM_WP_PREFIX_MAX);
        memcpy(wp->prefix, json_string_value(prefix), json_string_length(prefix) + 1);
        wp->prefix_len = (uint32_t)json_string_length(prefix);
    }
    json_t *max_chars = json_object_get(model, "max_input_chars_per_word");
    if (max_chars && !json_is_null(max_chars)) {
        json_int_t v = json_is_integer(max_chars) ? json_integer_value(max_chars) : 0;
        if (v < 1 || v > INT32_MAX)
            return s_fail(ctx, UM_EFORMAT, "model.max_input_chars_per_word must be a positive "
                          "integer");
        wp->max_chars = (int32_t)v;
    }

    int rc = s_read_normalizer(ctx, json_object_get(doc, "normalizer"));
    if (rc)
        return rc;
    json_t *pre = json_object_get(doc, "pre_tokenizer");
    const char *pre_type = json_string_value(json_object_get(pre, "type"));
    if (!pre_type || strcmp(pre_type, "BertPreTokenizer") != 0)
        return s_fail(ctx, UM_EUNSUPPORTED, "pre_tokenizer of type \"%s\" is not supported; "
                      "only BertPreTokenizer", pre_type ? pre_type : "(missing)");
    json_t *decoder = json_object_get(doc, "decoder");
    if (decoder && !json_is_null(decoder)) {
        const char *dec_type = json_string_value(json_object_get(decoder, "type"));
        if (!dec_type || strcmp(dec_type, "WordPiece") != 0)
            return s_fail(ctx, UM_EUNSUPPORTED, "decoder of type \"%s\" is not supported; only "
                          "WordPiece or null", dec_type ? dec_type : "(missing)");
        int cleanup = 1;
        if ((rc = s_json_bool(ctx, decoder, "decoder.", "cleanup", &cleanup)))
            return rc;
        if (set->cleanup < 0)
            set->cleanup = cleanup;
    }

    rc = s_read_json_vocab(ctx, vocab, added);
    if (!rc)
        rc = s_read_json_added(ctx, added);
    return rc;
}

/* ------------------------------------------------------------------------- */
/* The whole folder                                                          */

/* Read the file at ctx->path into a host buffer; *rc and the message explain a failure. */
static char *s_read_file(const s_ctx_t *ctx, size_t *size, int *rc)
{
    const um_host_t *host = ctx->wp->host;
    FILE *f = fopen(ctx->path, "rb");
    if (!f) {
        *rc = s_fail(ctx, errno == ENOENT ? UM_ENOTFOUND : UM_EIO, "cannot be opened: %s",
                     strerror(errno));
        return NULL;
    }
    char *data = NULL;
    long end = -1;
    if (fseek(f, 0, SEEK_END) == 0)
        end = ftell(f);
    if (end < 0 || fseek(f, 0, SEEK_SET) != 0) {
        *rc = s_fail(ctx, UM_EIO, "cannot be read: %s", strerror(errno));
    } else if ((unsigned long)end > S_MAX_VOCAB_FILE) {
        *rc = s_fail(ctx, UM_EFORMAT, "is %ld bytes, more than the %u a vocabulary may have "
                     "here", end, S_MAX_VOCAB_FILE);
    } else if (!(data = host->alloc((size_t)end + 1))) {
        *rc = s_oom(ctx);
    } else if (fread(data, 1, (size_t)end, f) != (size_t)end) {
        *rc = s_fail(ctx, UM_EIO, "cannot be read: %s", strerror(errno));
        host->free(data);
        data = NULL;
    } else {
        *size = (size_t)end;
    }
    fclose(f);
    return data;
}

/*
 * Decide the case handling of a vocab.txt model that tokenizer_config.json leaves
 * open: uncased when fewer than 1% of the entries outside brackets ([CLS],
 * [unused0]) contain an upper-case letter. bert-base-uncased has 2 such entries of
 * 30,522 (ℝ and ##ℝ); a cased vocabulary has thousands of capitalized words.
 */
static int s_infer_lowercase(const s_ctx_t *ctx)
{
    const um_wp_t *wp = ctx->wp;
    int32_t upper = 0, counted = 0;
    for (int32_t id = 0; id < wp->n_tokens; id++) {
        const um_wp_token_t *t = &wp->tokens[id];
        if (!t->present || (t->len >= 2 && t->text[0] == '[' && t->text[t->len - 1] == ']'))
            continue;
        counted++;
        const unsigned char *s = (const unsigned char *)t->text;
        for (size_t i = 0; i < t->len;) {
            uint32_t cp = 0;
            size_t n = um_utf8_next(s + i, t->len - i, &cp);
            utf8proc_category_t cat = utf8proc_category((utf8proc_int32_t)cp);
            if (cat == UTF8PROC_CATEGORY_LU || cat == UTF8PROC_CATEGORY_LT) {
                upper++;
                break;
            }
            i += n ? n : 1;
        }
    }
    int lowercase = (int64_t)upper * 100 < counted;
    UM_WP_LOG(wp, UM_LOG_INFO, "%s: %d of %d entries contain an upper-case letter, so the "
              "model is taken as %s; set do_lower_case in tokenizer_config.json to override",
              ctx->path, (int)upper, (int)counted, lowercase ? "uncased" : "cased");
    return lowercase;
}

/* The special tokens of a vocab.txt model: the five BERT names and added_tokens_decoder. */
static int s_vocab_txt_specials(const s_ctx_t *ctx, const s_settings_t *set)
{
    um_wp_t *wp = ctx->wp;
    int32_t capacity = 5 + (int32_t)json_object_size(set->added_decoder);
    const char *names[5] = {set->unk, set->named[0], set->named[1], set->named[2],
                            set->named[3]};
    for (int i = 0; i < 5; i++) {
        int32_t id = um_tok_table_get(&wp->table, names[i], strlen(names[i]));
        if (id < 0 || wp->tokens[id].special)
            continue;
        wp->tokens[id].special = 1;
        if (um_wp_add_literal(wp, wp->tokens[id].text, wp->tokens[id].len, id, capacity))
            return s_oom(ctx);
    }

    s_ctx_t config = {wp, set->config_path, ctx->err, ctx->errlen};
    const char *key;
    json_t *entry;
    json_object_foreach(set->added_decoder, key, entry) {
        int32_t id = (int32_t)strtol(key, NULL, 10);
        json_t *content = json_object_get(entry, "content");
        const char *text = json_string_value(content);
        size_t len = json_string_length(content);
        if (id >= wp->n_tokens)
            return s_fail(&config, UM_EFORMAT, "added_tokens_decoder id %d (\"%.60s\") is past the "
                          "%d ids of vocab.txt", (int)id, text, (int)wp->n_tokens);
        um_wp_token_t *t = &wp->tokens[id];
        if (t->len != len || memcmp(t->text, text, len) != 0)
            return s_fail(&config, UM_EFORMAT, "added_tokens_decoder gives id %d to \"%.60s\" but "
                          "vocab.txt line %d is \"%.60s\"", (int)id, text, (int)id + 1, t->text);
        int special = json_is_true(json_object_get(entry, "special"));
        if (t->special)
            continue; /* already a literal */
        t->special = (uint8_t)special;
        if (um_wp_add_literal(wp, t->text, t->len, id, capacity))
            return s_oom(ctx);
    }
    return UM_OK;
}

/* Join dir and name into buf (size 4096); returns 0 or UM_EINVAL when it does not fit. */
static int s_join(char *buf, const char *dir, const char *name)
{
    int n = snprintf(buf, 4096, "%s/%s", dir, name);
    return n < 0 || n >= 4096 ? UM_EINVAL : UM_OK;
}

/*
 * Load tokenizer.json or vocab.txt (step 2 of the file comment) and write the path of
 * the one read to path (size 4096).
 */
static int s_load_vocabulary(um_wp_t *wp, const char *model_dir, s_settings_t *set,
                             char *path, char *err, size_t errlen)
{
    char json_path[4096], txt_path[4096];
    if (s_join(json_path, model_dir, "tokenizer.json") || s_join(txt_path, model_dir,
                                                                 "vocab.txt")) {
        snprintf(err, errlen, "wordpiece: the model folder path %.200s is too long", model_dir);
        return UM_EINVAL;
    }
    int rc = UM_OK;
    if (access(json_path, F_OK) == 0) {
        memcpy(path, json_path, sizeof json_path);
        s_ctx_t ctx = {wp, json_path, err, errlen};
        json_t *doc = s_open_json(&ctx, &rc);
        if (doc) {
            rc = s_read_tokenizer_json(&ctx, doc, set);
            json_decref(doc);
        }
        return rc;
    }

    memcpy(path, txt_path, sizeof txt_path);
    s_ctx_t ctx = {wp, txt_path, err, errlen};
    if (access(txt_path, F_OK) != 0)
        return s_fail(&ctx, UM_ENOTFOUND, "not found, and there is no tokenizer.json: a "
                      "WordPiece model folder needs one of them");
    size_t size = 0;
    char *data = s_read_file(&ctx, &size, &rc);
    if (!data)
        return rc;
    rc = s_read_vocab_txt(&ctx, data, size);
    wp->host->free(data);
    if (rc)
        return rc;

    wp->clean_text = 1;
    wp->lowercase = set->lowercase >= 0 ? set->lowercase : s_infer_lowercase(&ctx);
    wp->strip_accents = set->strip_accents >= 0 ? set->strip_accents : wp->lowercase;
    wp->handle_chinese_chars = set->handle_chinese_chars >= 0 ? set->handle_chinese_chars : 1;
    return s_vocab_txt_specials(&ctx, set);
}

int um_wp_load_dir(um_wp_t *wp, const char *model_dir, char *err, size_t errlen)
{
    s_settings_t set = {.lowercase = -1, .strip_accents = -1, .handle_chinese_chars = -1,
                        .cleanup = -1, .unk = "[UNK]",
                        .named = {"[SEP]", "[PAD]", "[CLS]", "[MASK]"}};
    memcpy(wp->prefix, "##", 3);
    wp->prefix_len = 2;
    wp->max_chars = 100;

    if (s_join(set.config_path, model_dir, "tokenizer_config.json")) {
        snprintf(err, errlen, "wordpiece: the model folder path %.200s is too long", model_dir);
        return UM_EINVAL;
    }
    json_t *config = NULL;
    int rc = UM_OK;
    if (access(set.config_path, F_OK) == 0) {
        s_ctx_t ctx = {wp, set.config_path, err, errlen};
        config = s_open_json(&ctx, &rc);
        if (config)
            rc = s_read_config(&ctx, config, &set);
    }
    char vocab_path[4096] = "";
    if (!rc)
        rc = s_load_vocabulary(wp, model_dir, &set, vocab_path, err, errlen);
    if (!rc) {
        wp->cleanup = set.cleanup >= 0 ? set.cleanup : 1;
        wp->unk_id = um_tok_table_get(&wp->table, set.unk, strlen(set.unk));
        if (wp->unk_id < 0) {
            snprintf(err, errlen, "%s: the unknown token \"%s\" is not in the vocabulary; "
                     "WordPiece needs it for words it cannot spell", vocab_path, set.unk);
            rc = UM_EFORMAT;
        }
    }
    if (!rc)
        um_wp_index_literals(wp);
    json_decref(config);
    return rc;
}

/* ------------------------------------------------------------------------- */
/* Probe                                                                     */

/* 90 when tokenizer.json's model type is WordPiece, else 0. */
static int s_probe_json(const char *path)
{
    json_t *doc = json_load_file(path, 0, NULL);
    const char *type = json_string_value(json_object_get(json_object_get(doc, "model"), "type"));
    int score = type && strcmp(type, "WordPiece") == 0 ? 90 : 0;
    json_decref(doc);
    return score;
}

/*
 * When the first 1 MiB of vocab.txt has a line "[UNK]": 80 with lines starting with "##",
 * 70 without (a vocabulary of whole words only, still read the WordPiece way).
 */
static int s_probe_txt(const char *path)
{
    FILE *f = fopen(path, "rb");
    if (!f)
        return 0;
    char line[512];
    int unk = 0, continuation = 0;
    size_t read = 0;
    while (read < (1u << 20) && fgets(line, sizeof line, f)) {
        read += strlen(line);
        if (strcmp(line, "[UNK]\n") == 0 || strcmp(line, "[UNK]\r\n") == 0 ||
            strcmp(line, "[UNK]") == 0)
            unk = 1;
        else if (line[0] == '#' && line[1] == '#' && line[2] != '\n')
            continuation = 1;
        if (unk && continuation)
            break;
    }
    fclose(f);
    if (!unk)
        return 0;
    return continuation ? 80 : 70;
}

int um_wp_probe_dir(const char *model_dir)
{
    char path[4096];
    if (s_join(path, model_dir, "tokenizer.json"))
        return 0;
    if (access(path, F_OK) == 0)
        return s_probe_json(path); /* tokenizer.json decides the model's tokenizer */
    if (s_join(path, model_dir, "vocab.txt"))
        return 0;
    return s_probe_txt(path);
}
