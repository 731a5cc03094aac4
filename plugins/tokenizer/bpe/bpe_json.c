/*
 * Loading a Hugging Face tokenizer.json into a um_bpe_t: the BPE vocabulary and
 * merges, the added tokens, and the pre-tokenizer turned into a chain of PCRE2
 * regexes. Every error names the file and the JSON field at fault.
 *
 * The model must be "BPE" without byte_fallback or subword affixes. The
 * pre_tokenizer must be ByteLevel, or a Sequence of Split entries (behavior
 * "Isolated") followed by ByteLevel. The normalizer must be null, or NFC, which is
 * accepted with a warning. The post_processor is ignored because the daemon, not the
 * tokenizer, decides which special tokens wrap a prompt.
 */
#include "bpe.h"

#include <jansson.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

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

/* Read the token id in value into *id; it must be an integer in [0, UM_BPE_MAX_ID]. */
static int s_read_id(const s_ctx_t *ctx, const json_t *value, const char *field, int32_t *id)
{
    if (!json_is_integer(value))
        return s_fail(ctx, UM_EFORMAT, "%s must be an integer token id", field);
    json_int_t v = json_integer_value(value);
    if (v < 0 || v > UM_BPE_MAX_ID)
        return s_fail(ctx, UM_EFORMAT, "%s is %lld, outside the supported ids 0..%d", field,
                      (long long)v, UM_BPE_MAX_ID);
    *id = (int32_t)v;
    return UM_OK;
}

/* ------------------------------------------------------------------------- */
/* Vocabulary and added tokens                                               */

/*
 * Find the largest id in model.vocab and added_tokens and allocate the tokens array.
 * Checks every id and added token entry on the way, so later passes need not.
 */
static int s_size_vocab(const s_ctx_t *ctx, json_t *vocab, json_t *added)
{
    um_bpe_t *bpe = ctx->bpe;
    int32_t max_id = -1;
    const char *key;
    json_t *value;
    json_object_foreach(vocab, key, value) {
        json_int_t id = json_is_integer(value) ? json_integer_value(value) : -1;
        if (id < 0 || id > UM_BPE_MAX_ID) {
            char field[96];
            snprintf(field, sizeof field, "model.vocab[\"%.60s\"]", key);
            int32_t unused;
            return s_read_id(ctx, value, field, &unused);
        }
        if (id > max_id)
            max_id = (int32_t)id;
    }

    size_t i;
    json_array_foreach(added, i, value) {
        char field[64];
        if (!json_is_object(value))
            return s_fail(ctx, UM_EFORMAT, "added_tokens[%zu] must be an object", i);
        json_t *content = json_object_get(value, "content");
        if (!json_is_string(content) || json_string_length(content) == 0)
            return s_fail(ctx, UM_EFORMAT, "added_tokens[%zu].content is missing or not a "
                          "non-empty string", i);
        json_t *special = json_object_get(value, "special");
        if (special && !json_is_boolean(special))
            return s_fail(ctx, UM_EFORMAT, "added_tokens[%zu].special must be true or false",
                          i);
        snprintf(field, sizeof field, "added_tokens[%zu].id", i);
        int32_t id;
        int rc = s_read_id(ctx, json_object_get(value, "id"), field, &id);
        if (rc)
            return rc;
        if (id > max_id)
            max_id = id;
    }

    if (max_id < 0)
        return s_fail(ctx, UM_EFORMAT, "model.vocab is empty");
    bpe->n_tokens = max_id + 1;
    size_t bytes = (size_t)bpe->n_tokens * sizeof *bpe->tokens;
    bpe->tokens = um_bpe_alloc(bpe, bytes);
    if (!bpe->tokens)
        return s_oom(ctx);
    memset(bpe->tokens, 0, bytes);
    return UM_OK;
}

/*
 * Undo the byte-to-unicode map of a vocabulary entry into the arena. An entry with
 * a character outside the map is not byte-level text, so it decodes to its own UTF-8
 * bytes instead.
 */
static const unsigned char *s_piece_bytes(um_bpe_t *bpe, const char *piece, size_t len,
                                          uint32_t *n_bytes)
{
    unsigned char small[256];
    unsigned char *bytes = len <= sizeof small ? small : um_bpe_alloc(bpe, len);
    if (!bytes)
        return NULL;

    size_t n = 0;
    const unsigned char *s = (const unsigned char *)piece;
    for (size_t i = 0; i < len;) {
        uint32_t cp;
        size_t step = um_bpe_utf8_next(s + i, len - i, &cp);
        int b = step ? um_bpe_codepoint_to_byte(cp) : -1;
        if (b < 0) {
            memcpy(bytes, piece, len);
            n = len;
            break;
        }
        bytes[n++] = (unsigned char)b;
        i += step;
    }

    const unsigned char *copy = (const unsigned char *)um_bpe_arena_copy(bpe, bytes, n);
    if (bytes != small)
        um_bpe_free(bpe, bytes);
    *n_bytes = (uint32_t)n;
    return copy;
}

static int s_load_vocab(const s_ctx_t *ctx, json_t *vocab)
{
    um_bpe_t *bpe = ctx->bpe;
    const char *key;
    json_t *value;
    json_object_foreach(vocab, key, value) {
        int32_t id = (int32_t)json_integer_value(value);
        um_bpe_token_t *t = &bpe->tokens[id];
        if (t->present)
            return s_fail(ctx, UM_EFORMAT, "model.vocab gives id %d to both \"%.60s\" and "
                          "\"%.60s\"", (int)id, t->piece, key);
        size_t len = strlen(key);
        t->piece = um_bpe_arena_copy(bpe, key, len);
        t->bytes = t->piece ? s_piece_bytes(bpe, key, len, &t->n_bytes) : NULL;
        if (!t->bytes)
            return s_oom(ctx);
        t->piece_len = (uint32_t)len;
        t->present = 1;
        um_bpe_piece_insert(bpe, t->piece, len, id);
    }

    int missing = 0;
    for (unsigned b = 0; b < 256; b++) {
        char piece[4];
        uint32_t cp = um_bpe_byte_to_codepoint(b);
        size_t len = cp < 0x80 ? 1 : 2; /* the map only reaches U+0143 */
        if (len == 1) {
            piece[0] = (char)cp;
        } else {
            piece[0] = (char)(0xC0 | cp >> 6);
            piece[1] = (char)(0x80 | (cp & 0x3F));
        }
        bpe->byte_id[b] = um_bpe_piece_find(bpe, piece, len);
        missing += bpe->byte_id[b] < 0;
    }
    if (missing)
        UM_BPE_LOG(bpe, UM_LOG_WARN, "%s: model.vocab has no entry for %d of the 256 byte "
                   "values; text containing them cannot be encoded", ctx->path, missing);
    return UM_OK;
}

static int s_compare_added(const void *a, const void *b)
{
    const um_bpe_added_t *x = a, *y = b;
    unsigned char fx = (unsigned char)x->content[0], fy = (unsigned char)y->content[0];
    if (fx != fy)
        return fx < fy ? -1 : 1;
    if (x->len != y->len)
        return x->len > y->len ? -1 : 1; /* longest first */
    return x->id < y->id ? -1 : x->id > y->id;
}

/*
 * Load added_tokens (already checked by s_size_vocab). Each is matched literally in
 * the input before pre-tokenization and decodes to its content. An added token
 * whose id names a different vocabulary entry replaces that entry for decoding.
 * NOTE: the lstrip, rstrip, single_word and normalized options are ignored, so a
 * token with lstrip or rstrip set keeps the spaces around it in the text between.
 */
static int s_load_added(const s_ctx_t *ctx, json_t *added)
{
    um_bpe_t *bpe = ctx->bpe;
    size_t n = json_array_size(added);
    if (n == 0)
        return UM_OK;
    bpe->added = um_bpe_alloc(bpe, n * sizeof *bpe->added);
    if (!bpe->added)
        return s_oom(ctx);

    size_t i;
    json_t *entry;
    json_array_foreach(added, i, entry) {
        json_t *content = json_object_get(entry, "content");
        const char *text = json_string_value(content);
        size_t len = json_string_length(content);
        int32_t id = (int32_t)json_integer_value(json_object_get(entry, "id"));
        um_bpe_token_t *t = &bpe->tokens[id];
        if (t->added)
            return s_fail(ctx, UM_EFORMAT, "added_tokens[%zu] repeats id %d of \"%.60s\"", i,
                          (int)id, t->piece);
        if (t->present && (t->piece_len != len || memcmp(t->piece, text, len) != 0))
            UM_BPE_LOG(bpe, UM_LOG_WARN, "%s: added_tokens[%zu] \"%.60s\" takes id %d from "
                       "model.vocab entry \"%.60s\"", ctx->path, i, text, (int)id, t->piece);

        char *copy = um_bpe_arena_copy(bpe, text, len);
        if (!copy)
            return s_oom(ctx);
        t->piece = copy;
        t->piece_len = (uint32_t)len;
        t->bytes = (const unsigned char *)copy;
        t->n_bytes = (uint32_t)len;
        t->present = 1;
        t->added = 1;
        t->special = json_is_true(json_object_get(entry, "special"));
        um_bpe_piece_insert(bpe, copy, len, id);
        bpe->added[bpe->n_added++] = (um_bpe_added_t){copy, (uint32_t)len, id};
    }

    qsort(bpe->added, (size_t)bpe->n_added, sizeof *bpe->added, s_compare_added);
    for (int32_t k = bpe->n_added - 1; k >= 0; k--) {
        unsigned char first = (unsigned char)bpe->added[k].content[0];
        bpe->added_first[first] = k;
        bpe->added_count[first]++;
    }
    return UM_OK;
}

/* ------------------------------------------------------------------------- */
/* Merges                                                                    */

/* Split merges[index] ("a b" or ["a", "b"]) into its two pieces. */
static int s_merge_parts(const s_ctx_t *ctx, const json_t *merge, size_t index, const char **a,
                         size_t *a_len, const char **b, size_t *b_len)
{
    if (json_is_string(merge)) {
        const char *s = json_string_value(merge);
        const char *space = strchr(s, ' ');
        if (!space || space == s || space[1] == '\0')
            return s_fail(ctx, UM_EFORMAT, "model.merges[%zu] is \"%.60s\", expected two "
                          "pieces separated by one space", index, s);
        *a = s;
        *a_len = (size_t)(space - s);
        *b = space + 1;
        *b_len = strlen(space + 1);
        return UM_OK;
    }
    if (json_is_array(merge) && json_array_size(merge) == 2 &&
        json_is_string(json_array_get(merge, 0)) && json_is_string(json_array_get(merge, 1))) {
        *a = json_string_value(json_array_get(merge, 0));
        *a_len = json_string_length(json_array_get(merge, 0));
        *b = json_string_value(json_array_get(merge, 1));
        *b_len = json_string_length(json_array_get(merge, 1));
        return UM_OK;
    }
    return s_fail(ctx, UM_EFORMAT, "model.merges[%zu] must be a string \"a b\" or an array "
                  "of two strings", index);
}

/* Load the merges; the rank of a merge is its index, and a lower rank merges first. */
static int s_load_merges(const s_ctx_t *ctx, json_t *merges)
{
    um_bpe_t *bpe = ctx->bpe;
    um_bpe_buf_t joined = {0};
    int rc = UM_OK;
    size_t index;
    json_t *merge;
    json_array_foreach(merges, index, merge) {
        const char *a = NULL, *b = NULL;
        size_t a_len = 0, b_len = 0;
        rc = s_merge_parts(ctx, merge, index, &a, &a_len, &b, &b_len);
        if (rc)
            break;

        int32_t left = um_bpe_piece_find(bpe, a, a_len);
        int32_t right = um_bpe_piece_find(bpe, b, b_len);
        if (left < 0 || right < 0) {
            const char *absent = a;
            size_t absent_len = a_len;
            if (left >= 0) {
                absent = b;
                absent_len = b_len;
            }
            rc = s_fail(ctx, UM_EFORMAT, "model.merges[%zu] (\"%.*s\" + \"%.*s\"): piece "
                        "\"%.*s\" is not in model.vocab", index, (int)a_len, a, (int)b_len, b,
                        (int)absent_len, absent);
            break;
        }

        if (um_bpe_buf_reserve(bpe, &joined, a_len + b_len)) {
            rc = s_oom(ctx);
            break;
        }
        memcpy(joined.data, a, a_len);
        memcpy(joined.data + a_len, b, b_len);
        int32_t merged = um_bpe_piece_find(bpe, (const char *)joined.data, a_len + b_len);
        if (merged < 0) {
            rc = s_fail(ctx, UM_EFORMAT, "model.merges[%zu] (\"%.*s\" + \"%.*s\"): merged "
                        "piece \"%.*s%.*s\" is not in model.vocab", index, (int)a_len, a,
                        (int)b_len, b, (int)a_len, a, (int)b_len, b);
            break;
        }
        um_bpe_merge_insert(bpe, left, right, (uint32_t)index, merged);
    }
    um_bpe_free(bpe, joined.data);
    return rc;
}

/* ------------------------------------------------------------------------- */
/* Pre-tokenizer                                                             */

static void *s_pcre_alloc(size_t size, void *data)
{
    um_bpe_t *bpe = data;
    return bpe->host->alloc(size ? size : 1);
}

static void s_pcre_free(void *ptr, void *data)
{
    um_bpe_t *bpe = data;
    if (ptr)
        bpe->host->free(ptr);
}

/* Create the PCRE2 contexts once, with allocation through the host and a JIT stack. */
static int s_pcre_init(const s_ctx_t *ctx)
{
    um_bpe_t *bpe = ctx->bpe;
    if (bpe->pcre_general)
        return UM_OK;
    bpe->pcre_general = pcre2_general_context_create(s_pcre_alloc, s_pcre_free, bpe);
    if (!bpe->pcre_general)
        return s_oom(ctx);
    bpe->pcre_match = pcre2_match_context_create(bpe->pcre_general);
    if (!bpe->pcre_match)
        return s_oom(ctx);
    /*
     * PCRE2's default JIT stack is 32 KiB of the machine stack. A private one that may
     * grow to 1 MiB lets patterns that backtrack deeply run without using the thread's
     * stack.
     */
    bpe->jit_stack = pcre2_jit_stack_create(32 * 1024, 1024 * 1024, bpe->pcre_general);
    if (bpe->jit_stack)
        pcre2_jit_stack_assign(bpe->pcre_match, NULL, bpe->jit_stack);
    return UM_OK;
}

/*
 * Append a step to the pre-tokenizer chain. pattern may be NULL (a ByteLevel step
 * without regex); literal compiles it as a plain string.
 */
static int s_add_step(const s_ctx_t *ctx, const char *field, const char *pattern,
                      size_t pattern_len, int literal, int prefix_space)
{
    um_bpe_t *bpe = ctx->bpe;
    if (!pattern && !prefix_space)
        return UM_OK;
    if (bpe->n_steps == UM_BPE_MAX_STEPS)
        return s_fail(ctx, UM_EUNSUPPORTED, "%s: more than %d pre-tokenizer steps", field,
                      UM_BPE_MAX_STEPS);
    um_bpe_step_t *step = &bpe->steps[bpe->n_steps];
    step->prefix_space = prefix_space;
    if (!pattern) {
        bpe->n_steps++;
        return UM_OK;
    }

    int rc = s_pcre_init(ctx);
    if (rc)
        return rc;
    pcre2_compile_context *cc = pcre2_compile_context_create(bpe->pcre_general);
    if (!cc)
        return s_oom(ctx);
    int code;
    PCRE2_SIZE offset;
    /*
     * NOTE: PCRE2 10.42 puts U+180E in \s, which Unicode's White_Space (and so Python's
     * regex module) has left out since Unicode 6.3, and its \p{L} and \p{N} follow
     * Unicode 14. Text with U+180E or with letters and digits assigned later can split
     * into different words than other implementations produce; it still round-trips.
     */
    uint32_t options = PCRE2_UTF | (literal ? PCRE2_LITERAL : PCRE2_UCP); /* LITERAL rejects UCP */
    step->re = pcre2_compile((PCRE2_SPTR)pattern, pattern_len, options, &code, &offset, cc);
    pcre2_compile_context_free(cc);
    if (!step->re) {
        PCRE2_UCHAR message[256];
        pcre2_get_error_message(code, message, sizeof message);
        return s_fail(ctx, UM_EFORMAT, "%s: the regex does not compile: %s at offset %zu",
                      field, (const char *)message, (size_t)offset);
    }
    bpe->n_steps++; /* from here s_destroy frees re */

    if (pcre2_jit_compile(step->re, PCRE2_JIT_COMPLETE) != 0)
        UM_BPE_LOG(bpe, UM_LOG_DEBUG, "%s: %s: PCRE2 JIT is not available, the regex runs "
                   "in the interpreter", ctx->path, field);
    step->match = pcre2_match_data_create_from_pattern(step->re, bpe->pcre_general);
    if (!step->match)
        return s_oom(ctx);
    return UM_OK;
}

static int s_load_split(const s_ctx_t *ctx, json_t *split, const char *field)
{
    char sub[160];
    json_t *pattern = json_object_get(split, "pattern");
    json_t *regex = json_object_get(pattern, "Regex");
    json_t *string = json_object_get(pattern, "String");
    if (!json_is_string(regex) && !json_is_string(string))
        return s_fail(ctx, UM_EFORMAT, "%s.pattern must be {\"Regex\": ...} or "
                      "{\"String\": ...}", field);

    const char *behavior = json_string_value(json_object_get(split, "behavior"));
    if (!behavior || strcmp(behavior, "Isolated") != 0)
        return s_fail(ctx, UM_EUNSUPPORTED, "%s.behavior is \"%s\"; only \"Isolated\" is "
                      "supported", field, behavior ? behavior : "(missing)");
    if (json_is_true(json_object_get(split, "invert")))
        return s_fail(ctx, UM_EUNSUPPORTED, "%s.invert is true; only false is supported",
                      field);

    json_t *chosen = json_is_string(regex) ? regex : string;
    snprintf(sub, sizeof sub, "%s.pattern.%s", field, chosen == regex ? "Regex" : "String");
    return s_add_step(ctx, sub, json_string_value(chosen), json_string_length(chosen),
                      chosen == string, 0);
}

/*
 * Parse one pre_tokenizer entry at field into steps. *byte_level counts ByteLevel
 * entries: there must be exactly one and it must come last, because a Split after it
 * would see byte-level characters where this plugin keeps the original bytes.
 */
static int s_load_pretokenizer(const s_ctx_t *ctx, json_t *pre, const char *field,
                               int *byte_level)
{
    const char *type = json_string_value(json_object_get(pre, "type"));
    if (!json_is_object(pre) || !type)
        return s_fail(ctx, UM_EFORMAT, "%s must be an object with a string \"type\"", field);

    if (strcmp(type, "Sequence") == 0) {
        json_t *list = json_object_get(pre, "pretokenizers");
        if (!json_is_array(list))
            return s_fail(ctx, UM_EFORMAT, "%s.pretokenizers must be an array", field);
        size_t i;
        json_t *item;
        json_array_foreach(list, i, item) {
            char sub[128];
            snprintf(sub, sizeof sub, "%.90s.pretokenizers[%zu]", field, i);
            int rc = s_load_pretokenizer(ctx, item, sub, byte_level);
            if (rc)
                return rc;
        }
        return UM_OK;
    }

    if (*byte_level)
        return s_fail(ctx, UM_EUNSUPPORTED, "%s (%s) comes after the ByteLevel step; only "
                      "Split steps before one ByteLevel step are supported", field, type);

    if (strcmp(type, "Split") == 0)
        return s_load_split(ctx, pre, field);

    if (strcmp(type, "ByteLevel") == 0) {
        (*byte_level)++;
        /* Hugging Face's defaults when the fields are absent: both true. */
        json_t *prefix = json_object_get(pre, "add_prefix_space");
        json_t *use_regex = json_object_get(pre, "use_regex");
        int add_prefix_space = prefix ? json_is_true(prefix) : 1;
        int regex = use_regex ? json_is_true(use_regex) : 1;
        char sub[160];
        snprintf(sub, sizeof sub, "%s (ByteLevel with use_regex)", field);
        const char *pattern = regex ? UM_BPE_GPT2_PATTERN : NULL;
        return s_add_step(ctx, sub, pattern, pattern ? strlen(pattern) : 0, 0,
                          add_prefix_space);
    }

    return s_fail(ctx, UM_EUNSUPPORTED, "%s.type \"%s\" is not supported; expected "
                  "ByteLevel, Split or Sequence", field, type);
}

/* ------------------------------------------------------------------------- */
/* The whole file                                                            */

static int s_check_model(const s_ctx_t *ctx, json_t *model)
{
    json_t *type = json_object_get(model, "type");
    if (type && (!json_is_string(type) || strcmp(json_string_value(type), "BPE") != 0))
        return s_fail(ctx, UM_EUNSUPPORTED, "model.type is \"%s\"; this plugin reads only "
                      "\"BPE\"", json_is_string(type) ? json_string_value(type) : "(not a string)");
    if (json_is_true(json_object_get(model, "byte_fallback")))
        return s_fail(ctx, UM_EUNSUPPORTED, "model.byte_fallback is true; only byte-level "
                      "vocabularies without byte fallback are supported");
    static const char *const affixes[] = {"continuing_subword_prefix", "end_of_word_suffix"};
    for (size_t i = 0; i < 2; i++) {
        const char *value = json_string_value(json_object_get(model, affixes[i]));
        if (value && *value)
            return s_fail(ctx, UM_EUNSUPPORTED, "model.%s is \"%s\"; subword affixes are not "
                          "supported", affixes[i], value);
    }
    if (!json_is_object(json_object_get(model, "vocab")))
        return s_fail(ctx, UM_EFORMAT, "model.vocab is missing or not an object");
    if (!json_is_array(json_object_get(model, "merges")))
        return s_fail(ctx, UM_EFORMAT, "model.merges is missing or not an array");
    return UM_OK;
}

static int s_check_normalizer(const s_ctx_t *ctx, json_t *normalizer)
{
    if (!normalizer || json_is_null(normalizer))
        return UM_OK;
    const char *type = json_string_value(json_object_get(normalizer, "type"));
    if (type && strcmp(type, "NFC") == 0) {
        /* NOTE: NFC is not applied: input that is not already NFC may encode differently. */
        UM_BPE_LOG(ctx->bpe, UM_LOG_WARN, "%s: normalizer NFC is not applied; text is "
                   "encoded as given", ctx->path);
        return UM_OK;
    }
    return s_fail(ctx, UM_EUNSUPPORTED, "normalizer of type \"%s\" is not supported; only "
                  "null or NFC", type ? type : "(missing)");
}

/* Open path with jansson and turn a failure into an error code and message. */
static json_t *s_open(const s_ctx_t *ctx, int *rc)
{
    json_error_t jerr;
    json_t *doc = json_load_file(ctx->path, JSON_ALLOW_NUL, &jerr);
    if (doc) {
        if (json_is_object(doc))
            return doc;
        json_decref(doc);
        *rc = s_fail(ctx, UM_EFORMAT, "the top level must be a JSON object");
        return NULL;
    }
    if (json_error_code(&jerr) == json_error_cannot_open_file) {
        int exists = access(ctx->path, F_OK) == 0;
        *rc = s_fail(ctx, exists ? UM_EIO : UM_ENOTFOUND, "%s",
                     exists ? "cannot be read" : "not found: the model folder needs a "
                                                 "tokenizer.json");
        return NULL;
    }
    *rc = s_fail(ctx, UM_EFORMAT, "invalid JSON at line %d, column %d: %s", jerr.line,
                 jerr.column, jerr.text);
    return NULL;
}

int um_bpe_load_json(um_bpe_t *bpe, const char *path, char *err, size_t errlen)
{
    s_ctx_t ctx = {bpe, path, err, errlen};
    int rc = UM_OK;
    json_t *doc = s_open(&ctx, &rc);
    if (!doc)
        return rc;
    rc = um_bpe_load_doc(bpe, doc, path, err, errlen);
    json_decref(doc);
    return rc;
}

int um_bpe_load_doc(um_bpe_t *bpe, json_t *doc, const char *path, char *err, size_t errlen)
{
    s_ctx_t ctx = {bpe, path, err, errlen};
    int rc = UM_OK;
    json_t *model = json_object_get(doc, "model");
    json_t *added = json_object_get(doc, "added_tokens");
    if (!json_is_object(model))
        rc = s_fail(&ctx, UM_EFORMAT, "model is missing or not an object");
    else if (added && !json_is_null(added) && !json_is_array(added))
        rc = s_fail(&ctx, UM_EFORMAT, "added_tokens must be an array");
    if (!rc)
        rc = s_check_model(&ctx, model);
    if (!rc)
        rc = s_check_normalizer(&ctx, json_object_get(doc, "normalizer"));
    if (rc)
        goto done;

    json_t *vocab = json_object_get(model, "vocab");
    json_t *merges = json_object_get(model, "merges");
    rc = s_size_vocab(&ctx, vocab, added);
    if (rc)
        goto done;
    if (um_bpe_tables_init(bpe, json_object_size(vocab) + json_array_size(added),
                           json_array_size(merges))) {
        rc = s_oom(&ctx);
        goto done;
    }
    rc = s_load_vocab(&ctx, vocab);
    if (!rc)
        rc = s_load_added(&ctx, added);
    if (!rc)
        rc = s_load_merges(&ctx, merges);
    if (rc)
        goto done;
    bpe->ignore_merges = json_is_true(json_object_get(model, "ignore_merges"));

    json_t *pre = json_object_get(doc, "pre_tokenizer");
    int byte_level = 0;
    if (!pre || json_is_null(pre))
        rc = s_fail(&ctx, UM_EUNSUPPORTED, "pre_tokenizer is null; this plugin needs a "
                    "ByteLevel pre-tokenizer");
    else
        rc = s_load_pretokenizer(&ctx, pre, "pre_tokenizer", &byte_level);
    if (!rc && !byte_level)
        rc = s_fail(&ctx, UM_EUNSUPPORTED, "pre_tokenizer has no ByteLevel step; this plugin "
                    "reads only byte-level BPE");

done:
    return rc;
}

/* Return 1 when entry is a ByteLevel step or a Sequence containing one. */
static int s_has_byte_level(json_t *entry, const char *list_field)
{
    const char *type = json_string_value(json_object_get(entry, "type"));
    if (!type)
        return 0;
    if (strcmp(type, "ByteLevel") == 0)
        return 1;
    if (strcmp(type, "Sequence") != 0)
        return 0;
    size_t i;
    json_t *item;
    json_array_foreach(json_object_get(entry, list_field), i, item) {
        if (s_has_byte_level(item, list_field))
            return 1;
    }
    return 0;
}

int um_bpe_probe_json(const char *path)
{
    json_t *doc = json_load_file(path, JSON_ALLOW_NUL, NULL);
    if (!doc)
        return 0;
    const char *type = json_string_value(json_object_get(json_object_get(doc, "model"), "type"));
    int score = 0;
    if (type && strcmp(type, "BPE") == 0 &&
        (s_has_byte_level(json_object_get(doc, "pre_tokenizer"), "pretokenizers") ||
         s_has_byte_level(json_object_get(doc, "decoder"), "decoders")))
        score = 90;
    json_decref(doc);
    return score;
}
