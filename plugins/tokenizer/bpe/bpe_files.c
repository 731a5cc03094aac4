/*
 * Loading a byte-level BPE vocabulary that comes as separate files instead of one
 * tokenizer.json:
 *
 * - encoder.json + vocab.bpe, GPT-2's own release: the vocabulary as a JSON object
 *   from piece to id, and the merges, one "a b" per line in rank order after a
 *   "#version" line. "<|endoftext|>" is GPT-2's one special token.
 * - vocab.json + merges.txt, the same two files under the names Hugging Face's
 *   GPT2Tokenizer and LLaMA-3 exports use. Added tokens come from special_tokens.txt
 *   ("ID<TAB>TEXT" per line) and tokenizer_config.json's added_tokens_decoder, and
 *   "<|endoftext|>" is special when the vocabulary has it.
 *
 * The files do not say how words are split. GPT-2's pattern is used unless an added
 * token is LLaMA-3's "<|begin_of_text|>": then LLaMA-3's pattern, and whole words
 * found in the vocabulary are one token (ignore_merges), as LLaMA-3's tokenizer.json
 * sets. The files are checked here, so that every error names the file and line,
 * and then turned into the tokenizer.json document that bpe_json.c loads.
 */
#include "bpe.h"

#include <errno.h>
#include <jansson.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

/* Largest merges file read: LLaMA-3's merges.txt is 3.2 MB. */
#define S_MAX_TEXT_FILE (256u << 20)

/* The special token that selects LLaMA-3's pre-tokenizer. */
#define S_LLAMA3_BOS "<|begin_of_text|>"

/* A pair of files this loader reads: the vocabulary and the merges. */
typedef struct s_layout {
    const char *vocab;
    const char *merges;
} s_layout_t;

static const s_layout_t s_layouts[] = {
    {"encoder.json", "vocab.bpe"},
    {"vocab.json", "merges.txt"},
};

/* What a loader step needs to report an error. */
typedef struct s_ctx {
    um_bpe_t *bpe;
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

/* Join dir and name into buf (size 4096); returns 0, or -1 when it does not fit. */
static int s_join(char *buf, const char *dir, const char *name)
{
    int n = snprintf(buf, 4096, "%s/%s", dir, name);
    return n < 0 || n >= 4096 ? -1 : 0;
}

/* Read a text file into a NUL-terminated host buffer; *rc and the message explain a failure. */
static char *s_read_text(const s_ctx_t *ctx, size_t *size, int *rc)
{
    const um_host_t *host = ctx->bpe->host;
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
    } else if ((unsigned long)end > S_MAX_TEXT_FILE) {
        *rc = s_fail(ctx, UM_EFORMAT, "is %ld bytes, more than the %u read here", end,
                     S_MAX_TEXT_FILE);
    } else if (!(data = host->alloc((size_t)end + 1))) {
        *rc = s_oom(ctx);
    } else if (fread(data, 1, (size_t)end, f) != (size_t)end) {
        *rc = s_fail(ctx, UM_EIO, "cannot be read: %s", strerror(errno));
        host->free(data);
        data = NULL;
    } else {
        data[end] = '\0';
        *size = (size_t)end;
    }
    fclose(f);
    return data;
}

/*
 * Cut the next line from text[*pos..size): its start and length without "\n" or
 * "\r\n". Returns 0 at the end of the text.
 */
static int s_next_line(const char *text, size_t size, size_t *pos, const char **line,
                       size_t *len)
{
    if (*pos >= size)
        return 0;
    const char *start = text + *pos;
    const char *nl = memchr(start, '\n', size - *pos);
    size_t n = nl ? (size_t)(nl - start) : size - *pos;
    *pos += n + (nl ? 1 : 0);
    if (n > 0 && start[n - 1] == '\r')
        n--;
    *line = start;
    *len = n;
    return 1;
}

/* Check that line (line number lineno, at byte offset) is UTF-8 without NUL bytes. */
static int s_check_line(const s_ctx_t *ctx, const char *line, size_t len, size_t lineno,
                        size_t offset)
{
    const char *nul = memchr(line, '\0', len);
    if (nul)
        return s_fail(ctx, UM_EFORMAT, "line %zu contains a NUL byte at byte offset %zu",
                      lineno, offset + (size_t)(nul - line));
    const unsigned char *s = (const unsigned char *)line;
    size_t i = 0;
    while (i < len) {
        uint32_t cp;
        size_t step = s[i] < 0x80 ? 1 : um_bpe_utf8_next(s + i, len - i, &cp);
        if (!step)
            return s_fail(ctx, UM_EFORMAT, "line %zu is not valid UTF-8: byte 0x%02x at byte "
                          "offset %zu", lineno, (unsigned char)line[i], offset + i);
        i += step;
    }
    return UM_OK;
}

/* ------------------------------------------------------------------------- */
/* Vocabulary                                                                */

/*
 * Check the vocabulary object: ids are integers in 0..UM_BPE_MAX_ID and no two
 * entries share one. *max_id gets the largest id.
 */
static int s_check_vocab(const s_ctx_t *ctx, json_t *vocab, int32_t *max_id)
{
    *max_id = -1;
    const char *key;
    json_t *value;
    json_object_foreach(vocab, key, value) {
        json_int_t id = json_is_integer(value) ? json_integer_value(value) : -1;
        if (id < 0 || id > UM_BPE_MAX_ID || !*key)
            return s_fail(ctx, UM_EFORMAT, "entry \"%.60s\" must map a non-empty piece to an "
                          "integer id in 0..%d", key, UM_BPE_MAX_ID);
        if (id > *max_id)
            *max_id = (int32_t)id;
    }
    if (*max_id < 0)
        return s_fail(ctx, UM_EFORMAT, "the vocabulary is empty");

    size_t bytes = (size_t)*max_id / 8 + 1;
    unsigned char *seen = ctx->bpe->host->alloc(bytes);
    if (!seen)
        return s_oom(ctx);
    memset(seen, 0, bytes);
    int rc = UM_OK;
    json_object_foreach(vocab, key, value) {
        size_t id = (size_t)json_integer_value(value);
        if (seen[id / 8] & (1u << (id % 8))) {
            rc = s_fail(ctx, UM_EFORMAT, "entry \"%.60s\" repeats id %zu of another entry", key,
                        id);
            break;
        }
        seen[id / 8] |= (unsigned char)(1u << (id % 8));
    }
    ctx->bpe->host->free(seen);
    return rc;
}

/* ------------------------------------------------------------------------- */
/* Merges                                                                    */

/*
 * Read the merges file into a JSON array of "a b" strings in rank order, checking
 * each line: two pieces of the vocabulary separated by one space whose concatenation
 * is in the vocabulary too. A first line starting with "#version" is a header.
 */
static int s_read_merges(const s_ctx_t *ctx, json_t *vocab, json_t *merges)
{
    size_t size = 0;
    int rc = UM_OK;
    char *text = s_read_text(ctx, &size, &rc);
    if (!text)
        return rc;
    char joined[1024];
    const char *line;
    size_t len, pos = 0, lineno = 0, offset = 0;
    while (rc == UM_OK && s_next_line(text, size, &pos, &line, &len)) {
        lineno++;
        offset = (size_t)(line - text);
        if (lineno == 1 && len >= 8 && memcmp(line, "#version", 8) == 0)
            continue;
        if (len == 0) {
            if (pos >= size)
                break; /* the newline that ends the file */
            rc = s_fail(ctx, UM_EFORMAT, "line %zu is empty; every line must be a merge "
                        "\"a b\"", lineno);
            break;
        }
        if ((rc = s_check_line(ctx, line, len, lineno, offset)))
            break;
        const char *space = memchr(line, ' ', len);
        size_t a_len = space ? (size_t)(space - line) : 0;
        size_t b_len = space ? len - a_len - 1 : 0;
        if (len >= sizeof joined) {
            rc = s_fail(ctx, UM_EFORMAT, "line %zu is %zu bytes long, more than the %zu a merge "
                        "may have here", lineno, len, sizeof joined - 1);
            break;
        }
        if (!space || a_len == 0 || b_len == 0 || memchr(space + 1, ' ', b_len)) {
            rc = s_fail(ctx, UM_EFORMAT, "line %zu is \"%.*s\"; expected two pieces separated "
                        "by one space", lineno, (int)(len > 60 ? 60 : len), line);
            break;
        }
        /* jansson looks keys up by NUL-terminated strings, so copy each part. */
        memcpy(joined, line, a_len);
        joined[a_len] = '\0';
        int has_a = json_object_get(vocab, joined) != NULL;
        memcpy(joined, space + 1, b_len);
        joined[b_len] = '\0';
        int has_b = json_object_get(vocab, joined) != NULL;
        memcpy(joined, line, a_len);
        memcpy(joined + a_len, space + 1, b_len);
        joined[a_len + b_len] = '\0';
        if (!has_a || !has_b || !json_object_get(vocab, joined)) {
            rc = s_fail(ctx, UM_EFORMAT, "line %zu (\"%.*s\"): %s is not in the vocabulary",
                        lineno, (int)len, line, !has_a ? "the first piece" : !has_b ?
                        "the second piece" : "the merged piece");
            break;
        }
        if (json_array_append_new(merges, json_stringn(line, len)) != 0)
            rc = s_oom(ctx);
    }
    ctx->bpe->host->free(text);
    return rc;
}

/* ------------------------------------------------------------------------- */
/* Added tokens                                                              */

/* Append {id, content, special} to the added tokens unless the id already has one. */
static int s_add_token(json_t *added, int32_t id, const char *content, size_t len, int special)
{
    size_t i;
    json_t *entry;
    json_array_foreach(added, i, entry) {
        if (json_integer_value(json_object_get(entry, "id")) == id)
            return 0;
    }
    json_t *item = json_pack("{s:i, s:s%, s:b}", "id", (int)id, "content", content, len,
                             "special", special);
    return item && json_array_append_new(added, item) == 0 ? 0 : UM_ENOMEM;
}

/* special_tokens.txt: "ID<TAB>TEXT" per line, every token special. */
static int s_read_special_tokens(const s_ctx_t *ctx, json_t *added)
{
    size_t size = 0;
    int rc = UM_OK;
    char *text = s_read_text(ctx, &size, &rc);
    if (!text)
        return rc;
    const char *line;
    size_t len, pos = 0, lineno = 0;
    while (rc == UM_OK && s_next_line(text, size, &pos, &line, &len)) {
        lineno++;
        if (len == 0)
            continue;
        if ((rc = s_check_line(ctx, line, len, lineno, (size_t)(line - text))))
            break;
        const char *tab = memchr(line, '\t', len);
        char digits[16];
        size_t n_digits = tab ? (size_t)(tab - line) : 0;
        char *end = NULL;
        long id = -1;
        if (n_digits > 0 && n_digits < sizeof digits) {
            memcpy(digits, line, n_digits);
            digits[n_digits] = '\0';
            id = strtol(digits, &end, 10);
        }
        size_t content_len = tab ? len - n_digits - 1 : 0;
        if (!tab || id < 0 || id > UM_BPE_MAX_ID || !end || *end || content_len == 0) {
            rc = s_fail(ctx, UM_EFORMAT, "line %zu is \"%.*s\"; expected a token id in 0..%d, a "
                        "tab and the token's text", lineno, (int)(len > 60 ? 60 : len), line,
                        UM_BPE_MAX_ID);
            break;
        }
        if (s_add_token(added, (int32_t)id, tab + 1, content_len, 1))
            rc = s_oom(ctx);
    }
    ctx->bpe->host->free(text);
    return rc;
}

/* tokenizer_config.json's added_tokens_decoder: {"ID": {"content": TEXT, "special": B}}. */
static int s_read_config_tokens(const s_ctx_t *ctx, json_t *added)
{
    json_error_t jerr;
    json_t *doc = json_load_file(ctx->path, 0, &jerr);
    if (!doc)
        return s_fail(ctx, UM_EFORMAT, "invalid JSON at line %d, column %d: %s", jerr.line,
                      jerr.column, jerr.text);
    json_t *decoder = json_object_get(doc, "added_tokens_decoder");
    int rc = UM_OK;
    const char *key;
    json_t *entry;
    if (decoder && !json_is_object(decoder))
        rc = s_fail(ctx, UM_EFORMAT, "added_tokens_decoder must be an object from ids to tokens");
    json_object_foreach(json_is_object(decoder) ? decoder : NULL, key, entry) {
        char *end = NULL;
        long id = strtol(key, &end, 10);
        json_t *content = json_object_get(entry, "content");
        if (!*key || *end || id < 0 || id > UM_BPE_MAX_ID || !json_is_string(content) ||
            json_string_length(content) == 0) {
            rc = s_fail(ctx, UM_EFORMAT, "added_tokens_decoder[\"%.40s\"] must have an id in "
                        "0..%d as key and a non-empty string \"content\"", key, UM_BPE_MAX_ID);
            break;
        }
        if (s_add_token(added, (int32_t)id, json_string_value(content),
                        json_string_length(content),
                        json_is_true(json_object_get(entry, "special")))) {
            rc = s_oom(ctx);
            break;
        }
    }
    json_decref(doc);
    return rc;
}

/* ------------------------------------------------------------------------- */
/* The document                                                              */

/* Return 1 when an added token's text is text. */
static int s_has_added(json_t *added, const char *text)
{
    size_t i;
    json_t *entry;
    json_array_foreach(added, i, entry) {
        if (strcmp(json_string_value(json_object_get(entry, "content")), text) == 0)
            return 1;
    }
    return 0;
}

/*
 * The pre-tokenizer of the file comment: LLaMA-3's as its tokenizer.json writes it
 * (a Split on its pattern, then ByteLevel without a regex of its own), else GPT-2's
 * (ByteLevel with its built-in pattern).
 */
static json_t *s_pre_tokenizer(int llama3)
{
    if (!llama3)
        return json_pack("{s:s, s:b, s:b}", "type", "ByteLevel", "add_prefix_space", 0,
                         "use_regex", 1);
    return json_pack("{s:s, s:[{s:s, s:{s:s}, s:s, s:b}, {s:s, s:b, s:b}]}", "type", "Sequence",
                     "pretokenizers", "type", "Split", "pattern", "Regex",
                     UM_BPE_LLAMA3_PATTERN, "behavior", "Isolated", "invert", 0, "type",
                     "ByteLevel", "add_prefix_space", 0, "use_regex", 0);
}

/* Collect the added tokens of a layout from the folder's files. */
static int s_read_added(um_bpe_t *bpe, const char *model_dir, json_t *vocab, json_t *added,
                        char *err, size_t errlen)
{
    char path[4096];
    int rc = UM_OK;
    if (s_join(path, model_dir, "special_tokens.txt") == 0 && access(path, F_OK) == 0) {
        s_ctx_t ctx = {bpe, path, err, errlen};
        rc = s_read_special_tokens(&ctx, added);
    }
    if (!rc && s_join(path, model_dir, "tokenizer_config.json") == 0 &&
        access(path, F_OK) == 0) {
        s_ctx_t ctx = {bpe, path, err, errlen};
        rc = s_read_config_tokens(&ctx, added);
    }
    json_t *eot = json_object_get(vocab, "<|endoftext|>");
    if (!rc && eot && s_add_token(added, (int32_t)json_integer_value(eot), "<|endoftext|>",
                                  13, 1))
        rc = UM_ENOMEM;
    return rc;
}

int um_bpe_load_files(um_bpe_t *bpe, const char *model_dir, char *err, size_t errlen)
{
    char vocab_path[4096], merges_path[4096];
    const s_layout_t *layout = NULL;
    for (size_t i = 0; i < sizeof s_layouts / sizeof s_layouts[0] && !layout; i++) {
        if (s_join(vocab_path, model_dir, s_layouts[i].vocab) == 0 &&
            s_join(merges_path, model_dir, s_layouts[i].merges) == 0 &&
            access(vocab_path, F_OK) == 0 && access(merges_path, F_OK) == 0)
            layout = &s_layouts[i];
    }
    if (!layout) {
        snprintf(err, errlen, "%s: no tokenizer.json, encoder.json + vocab.bpe or vocab.json + "
                 "merges.txt found: a byte-level BPE model folder needs one of them", model_dir);
        return UM_ENOTFOUND;
    }

    s_ctx_t ctx = {bpe, vocab_path, err, errlen};
    json_error_t jerr;
    json_t *vocab = json_load_file(vocab_path, 0, &jerr);
    if (!vocab && json_error_code(&jerr) == json_error_cannot_open_file)
        return s_fail(&ctx, UM_EIO, "cannot be read: %s", jerr.text);
    if (!vocab)
        return s_fail(&ctx, UM_EFORMAT, "invalid JSON at line %d, column %d: %s", jerr.line,
                      jerr.column, jerr.text);
    json_t *merges = json_array();
    json_t *added = json_array();
    int32_t max_id;
    int rc = json_is_object(vocab) ? UM_OK : s_fail(&ctx, UM_EFORMAT, "the top level must be a "
                                                    "JSON object from pieces to ids");
    if (!rc && (!merges || !added))
        rc = s_oom(&ctx);
    if (!rc)
        rc = s_check_vocab(&ctx, vocab, &max_id);
    if (!rc) {
        s_ctx_t merges_ctx = {bpe, merges_path, err, errlen};
        rc = s_read_merges(&merges_ctx, vocab, merges);
    }
    if (!rc)
        rc = s_read_added(bpe, model_dir, vocab, added, err, errlen);
    if (rc == UM_ENOMEM)
        rc = s_oom(&ctx);
    if (rc) {
        json_decref(vocab);
        json_decref(merges);
        json_decref(added);
        return rc;
    }

    int llama3 = s_has_added(added, S_LLAMA3_BOS);
    json_t *doc = json_pack("{s:{s:s, s:o, s:o, s:b}, s:o, s:o, s:{s:s}}", "model", "type",
                            "BPE", "vocab", vocab, "merges", merges, "ignore_merges", llama3,
                            "added_tokens", added, "pre_tokenizer", s_pre_tokenizer(llama3),
                            "decoder", "type", "ByteLevel");
    if (!doc)
        return s_oom(&ctx); /* json_pack released the references it was given */
    UM_BPE_LOG(bpe, UM_LOG_INFO, "%s: %s and %s with %s's pre-tokenizer%s", model_dir,
               layout->vocab, layout->merges, llama3 ? "LLaMA-3" : "GPT-2",
               llama3 ? " (the added tokens include " S_LLAMA3_BOS ")" : "");
    rc = um_bpe_load_doc(bpe, doc, vocab_path, err, errlen);
    json_decref(doc);
    return rc;
}

int um_bpe_probe_files(const char *model_dir)
{
    char vocab_path[4096], merges_path[4096];
    for (size_t i = 0; i < sizeof s_layouts / sizeof s_layouts[0]; i++) {
        if (s_join(vocab_path, model_dir, s_layouts[i].vocab) == 0 &&
            s_join(merges_path, model_dir, s_layouts[i].merges) == 0 &&
            access(vocab_path, R_OK) == 0 && access(merges_path, R_OK) == 0)
            return 80;
    }
    return 0;
}
