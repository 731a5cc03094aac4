/*
 * Requests and replies of the wire protocol (see request.h and docs/protocol.md).
 *
 * Parsing runs in a fixed order so a request with several faults always gets the
 * same error: JSON syntax, object shape, id, op, unknown fields, then each field's
 * type and the limits that need no model. Messages quote client-supplied text
 * only after clipping it at a UTF-8 boundary, so an error reply is always valid
 * JSON however long or odd the request was.
 */
#include "config.h"

#include "request.h"

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <unmaskd/protocol.h>

/* Maximum length of client text quoted in a message, in bytes. */
#define UM_REQ_QUOTE_MAX 48

/* ------------------------------------------------------------------------- */
/* Fields accepted by each op                                                */

static const char *const s_op_names[] = {
    UM_OP_GENERATE, UM_OP_TOKENIZE, UM_OP_DETOKENIZE, UM_OP_INFO, UM_OP_HEALTH, UM_OP_CANCEL,
    UM_OP_SCORE,
};
#define UM_REQ_N_OPS (sizeof s_op_names / sizeof s_op_names[0])

static const char *const s_generate_fields[] = {
    "op", "id", "prompt", "messages", "gen_length", "steps", "block_length", "temperature",
    "cfg_scale", "remasking", "remasking_params", "seed", "stream", "top_k", "top_p",
    "schedule", "eps", "ban_eos", "suppress_eos_confidence", "early_stop", "trim_eos",
    "cache",
};
static const char *const s_schedule_names[] = {"quota", "timestep"};
static const char *const s_cache_names[] = {"none", "prefix", "dual"};
static const char *const s_tokenize_fields[] = {"op", "id", "text", "messages"};
static const char *const s_detokenize_fields[] = {"op", "id", "tokens"};
static const char *const s_plain_fields[] = {"op", "id"};
static const char *const s_cancel_fields[] = {"op", "id", "target"};
static const char *const s_score_fields[] = {"op", "id", "prompt", "messages", "answer",
                                             "n_samples", "batch_size", "cfg_scale", "seed"};

typedef struct s_field_list {
    const char *const *names;
    size_t n;
} s_field_list_t;

#define S_FIELDS(a) {(a), sizeof(a) / sizeof((a)[0])}

/* Indexed by um_req_op_t. */
static const s_field_list_t s_op_fields[] = {
    S_FIELDS(s_generate_fields), S_FIELDS(s_tokenize_fields), S_FIELDS(s_detokenize_fields),
    S_FIELDS(s_plain_fields),    S_FIELDS(s_plain_fields),    S_FIELDS(s_cancel_fields),
    S_FIELDS(s_score_fields),
};

const char *um_request_op_name(um_req_op_t op)
{
    return (size_t)op < UM_REQ_N_OPS ? s_op_names[op] : "?";
}

/* ------------------------------------------------------------------------- */
/* Text helpers                                                              */

/* Length of the longest prefix of s, at most max bytes, that ends on a UTF-8 boundary. */
static size_t s_utf8_prefix(const char *s, size_t len, size_t max)
{
    if (len <= max)
        return len;
    size_t n = max;
    /* Step back over continuation bytes (10xxxxxx) to the start of the cut character. */
    while (n > 0 && ((unsigned char)s[n] & 0xC0) == 0x80)
        n--;
    return n;
}

/* Copy client text into buf for quoting, clipped at a UTF-8 boundary with "..." when cut. */
static const char *s_clip(const char *s, char *buf, size_t size)
{
    size_t len = strlen(s);
    size_t keep = s_utf8_prefix(s, len, size - 4);
    memcpy(buf, s, keep);
    if (keep < len)
        memcpy(buf + keep, "...", 4);
    else
        buf[keep] = '\0';
    return buf;
}

/* Cut a string that snprintf may have truncated back to a whole UTF-8 character. */
static void s_utf8_trim(char *s)
{
    size_t len = strlen(s);
    size_t i = len;
    while (i > 0 && ((unsigned char)s[i - 1] & 0xC0) == 0x80)
        i--;
    if (i == 0)
        return;
    unsigned char lead = (unsigned char)s[i - 1];
    size_t need = 1;
    if (lead >= 0xF0)
        need = 4;
    else if (lead >= 0xE0)
        need = 3;
    else if (lead >= 0xC0)
        need = 2;
    if (len - (i - 1) < need)
        s[i - 1] = '\0';
}

/* Length of the valid UTF-8 character at s[0..n), or 0 when the bytes there are not one. */
static size_t s_utf8_char_len(const unsigned char *s, size_t n)
{
    size_t need;
    unsigned lo = 0x80, hi = 0xBF; /* allowed range of the second byte */
    if (s[0] < 0x80)
        return 1;
    if (s[0] >= 0xC2 && s[0] <= 0xDF) {
        need = 2;
    } else if (s[0] >= 0xE0 && s[0] <= 0xEF) {
        need = 3;
        lo = s[0] == 0xE0 ? 0xA0 : 0x80; /* no overlong forms */
        hi = s[0] == 0xED ? 0x9F : 0xBF; /* no surrogates */
    } else if (s[0] >= 0xF0 && s[0] <= 0xF4) {
        need = 4;
        lo = s[0] == 0xF0 ? 0x90 : 0x80;
        hi = s[0] == 0xF4 ? 0x8F : 0xBF; /* nothing above U+10FFFF */
    } else {
        return 0;
    }
    if (n < need || s[1] < lo || s[1] > hi)
        return 0;
    for (size_t i = 2; i < need; i++)
        if ((s[i] & 0xC0) != 0x80)
            return 0;
    return need;
}

/*
 * Replace each byte that does not belong to a valid UTF-8 character with '?'. A message
 * can quote text cut inside a character (jansson's "near '...'" or a %.40s precision),
 * and um_reply_text would otherwise turn every non-ASCII byte of it into '?'.
 */
static void s_utf8_scrub(char *s)
{
    unsigned char *p = (unsigned char *)s;
    size_t len = strlen(s);
    for (size_t i = 0; i < len;) {
        size_t n = s_utf8_char_len(p + i, len - i);
        if (n == 0) {
            p[i++] = '?';
        } else {
            i += n;
        }
    }
}

void um_req_error_set(um_req_error_t *err, const char *code, const char *field,
                      const char *fmt, ...)
{
    err->code = code;
    snprintf(err->field, sizeof err->field, "%s", field ? field : "");
    s_utf8_trim(err->field);
    s_utf8_scrub(err->field);
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err->message, sizeof err->message, fmt, ap);
    va_end(ap);
    s_utf8_trim(err->message);
    s_utf8_scrub(err->message);
}

/* Article and name of a JSON value's type, for "must be an integer, got a string". */
static const char *s_json_type(const json_t *v)
{
    switch (json_typeof(v)) {
    case JSON_OBJECT:
        return "an object";
    case JSON_ARRAY:
        return "an array";
    case JSON_STRING:
        return "a string";
    case JSON_INTEGER:
        return "an integer";
    case JSON_REAL:
        return "a fractional number";
    case JSON_TRUE:
        return "true";
    case JSON_FALSE:
        return "false";
    case JSON_NULL:
        return "null";
    }
    return "an unknown value";
}

/* Optimal string alignment distance, capped: returns 3 as soon as it must exceed 2. */
static int s_edit_distance(const char *a, const char *b)
{
    size_t la = strlen(a), lb = strlen(b);
    enum { MAXW = 64 };
    if (la > MAXW || lb > MAXW)
        return 3;
    if ((la > lb ? la - lb : lb - la) > 2)
        return 3;
    int d[MAXW + 1][MAXW + 1];
    for (size_t i = 0; i <= la; i++)
        d[i][0] = (int)i;
    for (size_t j = 0; j <= lb; j++)
        d[0][j] = (int)j;
    for (size_t i = 1; i <= la; i++) {
        for (size_t j = 1; j <= lb; j++) {
            int cost = a[i - 1] != b[j - 1];
            int best = d[i - 1][j] + 1;
            if (d[i][j - 1] + 1 < best)
                best = d[i][j - 1] + 1;
            if (d[i - 1][j - 1] + cost < best)
                best = d[i - 1][j - 1] + cost;
            if (i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1]
                && d[i - 2][j - 2] + 1 < best)
                best = d[i - 2][j - 2] + 1;
            d[i][j] = best;
        }
    }
    return d[la][lb] < 3 ? d[la][lb] : 3;
}

/* "an" before a vowel, for messages such as "in an info request". */
static const char *s_article(const char *word)
{
    return strchr("aeiou", word[0]) && word[0] ? "an" : "a";
}

const char *um_request_suggest(const char *word, const char *const *candidates, size_t n)
{
    const char *best = NULL;
    /* Two edits for long words, one for words of up to four letters ("foo" is not "op"). */
    int best_d = strlen(word) > 4 ? 3 : 2;
    for (size_t i = 0; i < n; i++) {
        int d = s_edit_distance(word, candidates[i]);
        if (d < best_d) {
            best_d = d;
            best = candidates[i];
        }
    }
    return best;
}

/* Append ", " separated names to buf (size bytes, already holding a string). */
static void s_append_names(char *buf, size_t size, const char *const *names, size_t n)
{
    size_t len = strlen(buf);
    for (size_t i = 0; i < n && len < size; i++)
        len += (size_t)snprintf(buf + len, size - len, "%s%s", i ? ", " : "", names[i]);
}

const char *um_request_id_text(const json_t *id, char *buf, size_t size)
{
    if (!id) {
        snprintf(buf, size, "-");
    } else if (json_is_string(id)) {
        char clip[UM_REQ_QUOTE_MAX + 4];
        snprintf(buf, size, "\"%s\"", s_clip(json_string_value(id), clip, sizeof clip));
    } else if (json_is_integer(id)) {
        snprintf(buf, size, "%" JSON_INTEGER_FORMAT, json_integer_value(id));
    } else {
        snprintf(buf, size, "?");
    }
    return buf;
}

/* ------------------------------------------------------------------------- */
/* Field readers: each returns 0, or -1 with err filled                      */

/*
 * Read an optional whole number in [min, max]. JSON has one number type, so 64.0 is
 * accepted as 64; 6.5 is not.
 */
static int s_read_int(json_t *obj, const char *key, int64_t min, int64_t max, int64_t def,
                      int64_t *out, um_req_error_t *err)
{
    json_t *v = json_object_get(obj, key);
    if (!v) {
        *out = def;
        return 0;
    }
    if (json_is_integer(v) || (json_is_real(v) && floor(json_real_value(v)) == json_real_value(v))) {
        double x = json_number_value(v);
        /* Compare as doubles first: a real such as 1e300 does not fit an int64. */
        if (x < (double)min || (json_is_integer(v) && json_integer_value(v) < min)) {
            um_req_error_set(err, UM_ERR_OUT_OF_RANGE, key, "%s must be at least %lld, got "
                             "%.17g: use a whole number in [%lld, %lld]", key, (long long)min,
                             x, (long long)min, (long long)max);
            return -1;
        }
        /* (double)INT64_MAX rounds up to 2^63, so a real equal to 2^63 needs its own test. */
        if (x > (double)max || (json_is_integer(v) && json_integer_value(v) > max)
            || (json_is_real(v) && x >= 9223372036854775808.0)) {
            if (json_is_integer(v))
                um_req_error_set(err, UM_ERR_OUT_OF_RANGE, key,
                                 "%s must be at most %lld, got %" JSON_INTEGER_FORMAT ": use "
                                 "a whole number in [%lld, %lld]", key, (long long)max,
                                 json_integer_value(v), (long long)min, (long long)max);
            else
                um_req_error_set(err, UM_ERR_OUT_OF_RANGE, key,
                                 "%s must be at most %lld, got %.17g: use a whole number in "
                                 "[%lld, %lld]", key, (long long)max, x, (long long)min,
                                 (long long)max);
            return -1;
        }
        *out = json_is_integer(v) ? (int64_t)json_integer_value(v) : (int64_t)x;
        return 0;
    }
    if (json_is_real(v))
        um_req_error_set(err, UM_ERR_INVALID, key, "%s must be an integer, got %g: use a "
                         "whole number in [%lld, %lld]", key, json_real_value(v),
                         (long long)min, (long long)max);
    else if (json_is_string(v))
        um_req_error_set(err, UM_ERR_INVALID, key, "%s must be an integer, got the string "
                         "\"%.40s\": write a JSON number without quotes", key,
                         json_string_value(v));
    else
        um_req_error_set(err, UM_ERR_INVALID, key, "%s must be an integer, got %s: use a "
                         "whole number in [%lld, %lld]", key, s_json_type(v), (long long)min,
                         (long long)max);
    return -1;
}

/* Read an optional positive count (gen_length, steps, block_length): 1 to INT32_MAX. */
static int s_read_count(json_t *obj, const char *key, int32_t def, int32_t *out,
                        um_req_error_t *err)
{
    int64_t x;
    if (s_read_int(obj, key, 1, INT32_MAX, def, &x, err) != 0)
        return -1;
    *out = (int32_t)x;
    return 0;
}

static int s_read_number(json_t *obj, const char *key, double def, double *out,
                         um_req_error_t *err)
{
    json_t *v = json_object_get(obj, key);
    if (!v) {
        *out = def;
        return 0;
    }
    if (!json_is_number(v)) {
        if (json_is_string(v))
            um_req_error_set(err, UM_ERR_INVALID, key, "%s must be a number, got the "
                             "string \"%.40s\": write a JSON number without quotes", key,
                             json_string_value(v));
        else
            um_req_error_set(err, UM_ERR_INVALID, key, "%s must be a number, got %s: write a "
                             "JSON number such as 0.5", key, s_json_type(v));
        return -1;
    }
    *out = json_number_value(v);
    return 0;
}

static int s_read_bool(json_t *obj, const char *key, int def, int *out, um_req_error_t *err)
{
    json_t *v = json_object_get(obj, key);
    if (!v) {
        *out = def;
        return 0;
    }
    if (!json_is_boolean(v)) {
        um_req_error_set(err, UM_ERR_INVALID, key, "%s must be true or false, got %s: write "
                         "the JSON literal without quotes", key, s_json_type(v));
        return -1;
    }
    *out = json_is_true(v);
    return 0;
}

/* Read a string field; *out stays NULL when the field is absent and not required. */
/*
 * Reject a NUL character (\u0000) in a string that names something (an op, a plugin,
 * an id): C compares such names up to the first NUL, so "health\u0000x" would match
 * "health". Text fields (prompt, answer, content) may contain one. Returns 0 or -1.
 */
static int s_check_no_nul(json_t *v, const char *key, um_req_error_t *err)
{
    size_t at = strlen(json_string_value(v));
    if (at == json_string_length(v))
        return 0;
    um_req_error_set(err, UM_ERR_INVALID, key, "%s contains a NUL character (\\u0000) at "
                     "byte %zu: a name or id never contains one, so remove it", key, at);
    return -1;
}

static int s_read_string(json_t *obj, const char *key, int required, const char **out,
                         size_t *len, um_req_error_t *err)
{
    json_t *v = json_object_get(obj, key);
    *out = NULL;
    if (len)
        *len = 0;
    if (!v) {
        if (required) {
            um_req_error_set(err, UM_ERR_INVALID, key, "missing field \"%s\": a %s request "
                             "needs a string %s", key,
                             json_string_value(json_object_get(obj, "op")), key);
            return -1;
        }
        return 0;
    }
    if (!json_is_string(v)) {
        um_req_error_set(err, UM_ERR_INVALID, key, "%s must be a string, got %s: put the "
                         "text in double quotes", key, s_json_type(v));
        return -1;
    }
    if (!len && s_check_no_nul(v, key, err) != 0)
        return -1;
    *out = json_string_value(v);
    if (len)
        *len = json_string_length(v);
    return 0;
}

/*
 * The messages field of a chat: a non-empty array of {"role", "content"} objects, role
 * one of system, user and assistant, content a string. *out stays NULL when absent.
 */
static int s_read_messages(json_t *obj, json_t **out, um_req_error_t *err)
{
    json_t *v = json_object_get(obj, "messages");
    *out = NULL;
    if (!v)
        return 0;
    if (!json_is_array(v) || json_array_size(v) == 0) {
        um_req_error_set(err, UM_ERR_INVALID, "messages", "messages must be a non-empty array "
                         "of {\"role\", \"content\"} objects, got %s",
                         json_is_array(v) ? "an empty array" : s_json_type(v));
        return -1;
    }
    if (json_array_size(v) > UM_REQ_MAX_MESSAGES) {
        um_req_error_set(err, UM_ERR_OUT_OF_RANGE, "messages", "messages has %zu entries, "
                         "more than the %d accepted: drop older turns",
                         json_array_size(v), UM_REQ_MAX_MESSAGES);
        return -1;
    }
    size_t i;
    json_t *m;
    json_array_foreach(v, i, m) {
        char field[48];
        snprintf(field, sizeof field, "messages[%zu]", i);
        if (!json_is_object(m)) {
            um_req_error_set(err, UM_ERR_INVALID, field, "%s must be a {\"role\", "
                             "\"content\"} object, got %s", field, s_json_type(m));
            return -1;
        }
        const char *key;
        json_t *value;
        json_object_foreach(m, key, value) {
            if (strcmp(key, "role") != 0 && strcmp(key, "content") != 0) {
                um_req_error_set(err, UM_ERR_INVALID, field, "%s has an unknown field \"%.64s\": "
                                 "a message has only \"role\" and \"content\"", field, key);
                return -1;
            }
        }
        json_t *role = json_object_get(m, "role"), *content = json_object_get(m, "content");
        const char *r = json_string_value(role);
        if (r && strlen(r) != json_string_length(role))
            r = "a string with a NUL character";
        if (!r || (strcmp(r, "system") != 0 && strcmp(r, "user") != 0
                   && strcmp(r, "assistant") != 0)) {
            um_req_error_set(err, UM_ERR_INVALID, field, "%s.role must be \"system\", "
                             "\"user\" or \"assistant\", got %s%.64s%s", field,
                             r ? "\"" : "", r ? r : (role ? s_json_type(role) : "nothing"),
                             r ? "\"" : "");
            return -1;
        }
        if (!json_is_string(content)) {
            um_req_error_set(err, UM_ERR_INVALID, field, "%s.content must be a string, got %s",
                             field, content ? s_json_type(content) : "nothing");
            return -1;
        }
    }
    *out = v;
    return 0;
}

/*
 * Exactly one of a text field (prompt or text) and messages. A request with messages
 * leaves the text NULL for the server to render.
 */
static int s_read_text_or_messages(um_request_t *req, const char *key, const char **text,
                                   size_t *len, um_req_error_t *err)
{
    if (s_read_messages(req->root, &req->messages, err) != 0)
        return -1;
    int has_text = json_object_get(req->root, key) != NULL;
    if (req->messages && has_text) {
        um_req_error_set(err, UM_ERR_INVALID, key, "a %s request takes either \"%s\" or "
                         "\"messages\", not both: drop one", um_request_op_name(req->op), key);
        return -1;
    }
    if (req->messages) {
        *text = NULL;
        *len = 0;
        return 0;
    }
    if (!has_text) {
        um_req_error_set(err, UM_ERR_INVALID, key, "missing field \"%s\": a %s request needs "
                         "a string %s, or \"messages\" for the model's chat template", key,
                         um_request_op_name(req->op), key);
        return -1;
    }
    return s_read_string(req->root, key, 1, text, len, err);
}

/* ------------------------------------------------------------------------- */
/* Per-op parsing                                                            */

/* The schedule field: absent, "quota" or "timestep". */
static int s_parse_schedule(um_request_t *req, um_req_error_t *err)
{
    const char *name = NULL;
    if (s_read_string(req->root, "schedule", 0, &name, NULL, err) != 0)
        return -1;
    req->schedule = UM_REQ_SCHEDULE_POLICY;
    if (!name)
        return 0;
    for (size_t i = 0; i < 2; i++) {
        if (strcmp(name, s_schedule_names[i]) == 0) {
            req->schedule = (um_req_schedule_t)i;
            return 0;
        }
    }
    char clip[UM_REQ_QUOTE_MAX + 4];
    const char *hint = um_request_suggest(name, s_schedule_names, 2);
    um_req_error_set(err, UM_ERR_INVALID, "schedule", "unknown schedule \"%s\": %s%s%s"
                     "use quota (LLaDA's even split per block) or timestep (Dream's "
                     "timesteps from 1 to eps)", s_clip(name, clip, sizeof clip),
                     hint ? "did you mean " : "", hint ? hint : "", hint ? "? " : "");
    return -1;
}

/* The cache field: absent (none), "none", "prefix" or "dual". */
static int s_parse_cache(um_request_t *req, um_req_error_t *err)
{
    const char *name = NULL;
    if (s_read_string(req->root, "cache", 0, &name, NULL, err) != 0)
        return -1;
    req->cache = UM_REQ_CACHE_NONE;
    if (!name)
        return 0;
    for (size_t i = 0; i < 3; i++) {
        if (strcmp(name, s_cache_names[i]) == 0) {
            req->cache = (um_req_cache_t)i;
            return 0;
        }
    }
    char clip[UM_REQ_QUOTE_MAX + 4];
    const char *hint = um_request_suggest(name, s_cache_names, 3);
    um_req_error_set(err, UM_ERR_INVALID, "cache", "unknown cache \"%s\": %s%s%s"
                     "use none (every step runs the whole canvas), prefix or dual "
                     "(Fast-dLLM's approximate block caches)", s_clip(name, clip, sizeof clip),
                     hint ? "did you mean " : "", hint ? hint : "", hint ? "? " : "");
    return -1;
}

/*
 * Token sampling, schedule and end-of-text fields. Ranges that need the engine's
 * limits (temperature, top_p above 1, eps) are checked by um_gen_check; top_p <= 0 is
 * rejected here because the engine reads 0 as off.
 */
static int s_parse_sampling(um_request_t *req, um_req_error_t *err)
{
    json_t *o = req->root;
    int64_t top_k = 0;
    if (s_read_int(o, "top_k", 0, INT32_MAX, 0, &top_k, err) != 0)
        return -1;
    req->top_k = (int32_t)top_k;
    if (s_read_number(o, "top_p", 1.0, &req->top_p, err) != 0)
        return -1;
    if (!(req->top_p > 0)) {
        um_req_error_set(err, UM_ERR_OUT_OF_RANGE, "top_p", "top_p must be a number in (0, "
                         "1], got %g: use 1 to keep every token, or a nucleus mass such as "
                         "0.95", req->top_p);
        return -1;
    }
    if (s_parse_schedule(req, err) != 0 || s_parse_cache(req, err) != 0)
        return -1;
    if (s_read_number(o, "eps", UM_REQ_DEFAULT_EPS, &req->eps, err) != 0)
        return -1;
    if (s_read_bool(o, "ban_eos", 0, &req->ban_eos, err) != 0
        || s_read_bool(o, "suppress_eos_confidence", 0, &req->suppress_eos_confidence, err)
               != 0
        /* A chat (messages) is instruct-style use: its answer ends at EOS, so early
           stop is on unless the request turns it off. */
        || s_read_bool(o, "early_stop", req->messages != NULL, &req->early_stop, err) != 0)
        return -1;
    return s_read_bool(o, "trim_eos", 0, &req->trim_eos, err);
}

static int s_parse_generate(um_request_t *req, um_req_error_t *err)
{
    json_t *o = req->root;
    if (!req->id) {
        um_req_error_set(err, UM_ERR_INVALID, "id", "missing field \"id\": a generate request "
                         "needs an id (a string or an integer) so its replies can be matched "
                         "and it can be cancelled, e.g. \"id\": \"g1\"");
        return -1;
    }
    if (s_read_text_or_messages(req, "prompt", &req->prompt, &req->prompt_len, err) != 0)
        return -1;
    req->gen_length_given = json_object_get(o, "gen_length") != NULL;
    if (s_read_count(o, "gen_length", UM_REQ_DEFAULT_GEN_LENGTH, &req->gen_length, err) != 0)
        return -1;
    req->steps_given = json_object_get(o, "steps") != NULL;
    if (s_read_count(o, "steps", req->gen_length, &req->steps, err) != 0)
        return -1;
    if (s_read_count(o, "block_length", req->gen_length, &req->block_length, err) != 0)
        return -1;
    if (s_read_number(o, "temperature", 0.0, &req->temperature, err) != 0)
        return -1;
    if (s_read_number(o, "cfg_scale", 0.0, &req->cfg_scale, err) != 0)
        return -1;
    if (s_read_string(o, "remasking", 0, &req->remasking, NULL, err) != 0)
        return -1;
    if (!req->remasking)
        req->remasking = UM_REQ_DEFAULT_REMASKING;

    json_t *params = json_object_get(o, "remasking_params");
    if (params && !json_is_object(params)) {
        um_req_error_set(err, UM_ERR_INVALID, "remasking_params",
                         "remasking_params must be an object of parameter names to values, "
                         "got %s", s_json_type(params));
        return -1;
    }
    req->remasking_params = json_is_object(params) ? params : NULL;

    /* jansson integers are signed 64-bit, which bounds the seeds a request can carry. */
    int64_t seed = 0;
    req->has_seed = json_object_get(o, "seed") != NULL;
    if (s_read_int(o, "seed", 0, INT64_MAX, 0, &seed, err) != 0)
        return -1;
    req->seed = (uint64_t)seed;
    if (s_read_bool(o, "stream", 0, &req->stream, err) != 0)
        return -1;
    return s_parse_sampling(req, err);
}

static int s_parse_detokenize(um_request_t *req, um_req_error_t *err)
{
    json_t *tokens = json_object_get(req->root, "tokens");
    if (!tokens) {
        um_req_error_set(err, UM_ERR_INVALID, "tokens", "missing field \"tokens\": a detokenize "
                         "request needs an array of token ids, e.g. [397, 12]");
        return -1;
    }
    if (!json_is_array(tokens)) {
        um_req_error_set(err, UM_ERR_INVALID, "tokens",
                         "tokens must be an array of integers, got %s", s_json_type(tokens));
        return -1;
    }
    size_t n = json_array_size(tokens);
    req->tokens = malloc((n > 0 ? n : 1) * sizeof *req->tokens);
    if (!req->tokens) {
        um_req_error_set(err, UM_ERR_INTERNAL, "tokens", "out of memory for %zu token ids", n);
        return -1;
    }
    for (size_t i = 0; i < n; i++) {
        json_t *t = json_array_get(tokens, i);
        double x = json_is_integer(t) ? (double)json_integer_value(t)
                   : json_is_real(t)  ? json_real_value(t)
                                      : NAN;
        if (isnan(x) || floor(x) != x) {
            um_req_error_set(err, UM_ERR_INVALID, "tokens",
                             "tokens[%zu] must be an integer token id, got %s", i,
                             s_json_type(t));
            return -1;
        }
        if (x < INT32_MIN || x > INT32_MAX) {
            um_req_error_set(err, UM_ERR_OUT_OF_RANGE, "tokens",
                             "tokens[%zu] is %.0f, not a token id: ids are in [0, vocabulary "
                             "size)", i, x);
            return -1;
        }
        req->tokens[i] = (int32_t)x;
    }
    req->n_tokens = n;
    return 0;
}

static int s_parse_cancel(um_request_t *req, um_req_error_t *err)
{
    json_t *target = json_object_get(req->root, "target");
    if (!target) {
        um_req_error_set(err, UM_ERR_INVALID, "target", "missing field \"target\": a cancel "
                         "request needs the id of the generate or score request to stop");
        return -1;
    }
    if (!json_is_string(target) && !json_is_integer(target)) {
        um_req_error_set(err, UM_ERR_INVALID, "target",
                         "target must be a string or an integer (a request id), got %s",
                         s_json_type(target));
        return -1;
    }
    if (json_is_string(target) && s_check_no_nul(target, "target", err) != 0)
        return -1;
    req->target = target;
    return 0;
}

/* ------------------------------------------------------------------------- */
/* JSON errors                                                               */

/* One open object or array while s_json_path_at walks a JSON text. */
typedef struct s_json_frame {
    int is_object;
    int in_value;      /* object: the current member's key has been read */
    const char *key;   /* object: the current member's key, as in the text */
    size_t key_len;
    size_t index;      /* array: the current element */
} s_json_frame_t;

/*
 * Write to out the path of the member whose value is being read at byte pos of a JSON
 * text ("prompt", "messages[1].content"), or "" when pos is in no member's value. The
 * text before pos is assumed well-formed, which is true where jansson reports a bad
 * character inside a string. Keys are copied as written, escapes included.
 */
static void s_json_path_at(const char *data, size_t len, size_t pos, char *out, size_t size)
{
    enum { MAX_DEPTH = 16 };
    s_json_frame_t stack[MAX_DEPTH];
    int depth = 0, in_string = 0, escape = 0, is_key = 0;
    const char *string_start = NULL;
    out[0] = '\0';
    if (pos > len)
        pos = len;
    for (size_t i = 0; i < pos; i++) {
        char c = data[i];
        s_json_frame_t *top = depth > 0 ? &stack[depth - 1] : NULL;
        if (in_string) {
            if (escape) {
                escape = 0;
            } else if (c == '\\') {
                escape = 1;
            } else if (c == '"') {
                in_string = 0;
                if (is_key && top) {
                    top->key = string_start;
                    top->key_len = (size_t)(data + i - string_start);
                }
            }
            continue;
        }
        switch (c) {
        case '"':
            in_string = 1;
            string_start = data + i + 1;
            is_key = top && top->is_object && !top->in_value;
            break;
        case '{':
        case '[':
            if (depth == MAX_DEPTH)
                return;
            stack[depth++] = (s_json_frame_t){.is_object = c == '{'};
            break;
        case '}':
        case ']':
            if (depth > 0)
                depth--;
            break;
        case ':':
            if (top && top->is_object)
                top->in_value = 1;
            break;
        case ',':
            if (top && top->is_object)
                top->in_value = 0;
            else if (top)
                top->index++;
            break;
        default:
            break;
        }
    }
    if (in_string && is_key)
        return; /* the fault is in a key, not in a value */
    size_t used = 0;
    for (int d = 0; d < depth && used < size; d++) {
        const s_json_frame_t *f = &stack[d];
        if (f->is_object && (!f->in_value || !f->key))
            return;
        /* The precision keeps the copy inside the key, which is not NUL-terminated. */
        int key_len = f->key_len > UM_REQ_QUOTE_MAX ? UM_REQ_QUOTE_MAX : (int)f->key_len;
        if (f->is_object)
            used += (size_t)snprintf(out + used, size - used, "%s%.*s", d ? "." : "", key_len,
                                     f->key);
        else
            used += (size_t)snprintf(out + used, size - used, "[%zu]", f->index);
    }
}

/*
 * Fill err for a frame that jansson rejected. A string that is not valid UTF-8, contains
 * a raw control character or line break, or an escape that JSON lacks or that names half
 * a surrogate pair gets the field it is in, so the client learns which text to fix.
 */
static void s_json_error(const char *data, size_t len, const json_error_t *jerr,
                         um_req_error_t *err)
{
    static const struct {
        const char *prefix; /* the start of jansson's message (2.14) */
        const char *fault;
        const char *fix;
    } faults[] = {
        {"unable to decode byte", "is not valid UTF-8", "send the text encoded as UTF-8"},
        {"control character", "contains a raw control character",
         "escape control characters as JSON requires, e.g. \\u0000 for NUL and \\n for a "
         "line feed"},
        {"unexpected newline", "contains a raw line break",
         "write a line feed inside a string as \\n, as JSON requires"},
        {"invalid escape", "has an invalid escape",
         "JSON knows only \\\", \\\\, \\/, \\b, \\f, \\n, \\r, \\t and \\uXXXX: write a "
         "backslash as \\\\"},
        {"too big integer", "is an integer past the 64-bit range",
         "send at most 9223372036854775807 (2^63 - 1)"},
        {"real number overflow", "is a number past the range of a double",
         "send a number below 1.7e308"},
        {"invalid Unicode", "has a \\u escape that is no character",
         "write a character outside the Basic Multilingual Plane as a surrogate pair such as "
         "\\uD83D\\uDE00, never one half alone"},
    };
    char field[96] = "";
    for (size_t i = 0; i < sizeof faults / sizeof faults[0]; i++) {
        if (strncmp(jerr->text, faults[i].prefix, strlen(faults[i].prefix)) != 0)
            continue;
        s_json_path_at(data, len, jerr->position > 0 ? (size_t)jerr->position : 0, field,
                       sizeof field);
        if (!field[0])
            break;
        um_req_error_set(err, UM_ERR_BAD_JSON, field, "%s %s (%s at line %d, column %d): %s",
                         field, faults[i].fault, jerr->text, jerr->line, jerr->column,
                         faults[i].fix);
        return;
    }
    um_req_error_set(err, UM_ERR_BAD_JSON, NULL,
                     "request is not valid JSON: %s at line %d, column %d", jerr->text,
                     jerr->line, jerr->column);
}

/* ------------------------------------------------------------------------- */
/* Entry point                                                               */

static int s_parse_id(um_request_t *req, um_req_error_t *err)
{
    json_t *id = json_object_get(req->root, "id");
    if (!id || json_is_null(id))
        return 0;
    if (!json_is_string(id) && !json_is_integer(id)) {
        um_req_error_set(err, UM_ERR_INVALID, "id", "id must be a string or an integer, got %s",
                         s_json_type(id));
        return -1;
    }
    if (json_is_string(id) && s_check_no_nul(id, "id", err) != 0)
        return -1;
    req->id = id;
    return 0;
}

static int s_parse_op(um_request_t *req, um_req_error_t *err)
{
    char list[160] = "";
    s_append_names(list, sizeof list, s_op_names, UM_REQ_N_OPS);

    json_t *op = json_object_get(req->root, "op");
    if (!op) {
        um_req_error_set(err, UM_ERR_INVALID, "op", "missing field \"op\": set it to one of %s",
                         list);
        return -1;
    }
    if (!json_is_string(op)) {
        um_req_error_set(err, UM_ERR_INVALID, "op", "op must be a string (one of %s), got %s",
                         list, s_json_type(op));
        return -1;
    }
    if (s_check_no_nul(op, "op", err) != 0)
        return -1;
    const char *name = json_string_value(op);
    for (size_t i = 0; i < UM_REQ_N_OPS; i++) {
        if (strcmp(name, s_op_names[i]) == 0) {
            req->op = (um_req_op_t)i;
            return 0;
        }
    }
    char clip[UM_REQ_QUOTE_MAX + 4];
    const char *hint = um_request_suggest(name, s_op_names, UM_REQ_N_OPS);
    if (hint)
        um_req_error_set(err, UM_ERR_UNKNOWN_OP, "op", "unknown op \"%s\": did you mean %s? "
                         "valid ops are %s", s_clip(name, clip, sizeof clip), hint, list);
    else
        um_req_error_set(err, UM_ERR_UNKNOWN_OP, "op", "unknown op \"%s\": valid ops are %s",
                         s_clip(name, clip, sizeof clip), list);
    return -1;
}

static int s_check_fields(um_request_t *req, um_req_error_t *err)
{
    const s_field_list_t *allowed = &s_op_fields[req->op];
    const char *key;
    json_t *value;
    json_object_foreach(req->root, key, value) {
        size_t i = 0;
        while (i < allowed->n && strcmp(key, allowed->names[i]) != 0)
            i++;
        if (i < allowed->n)
            continue;

        char clip[UM_REQ_QUOTE_MAX + 4];
        char list[320] = "";
        s_append_names(list, sizeof list, allowed->names, allowed->n);
        const char *hint = um_request_suggest(key, allowed->names, allowed->n);
        s_clip(key, clip, sizeof clip);
        if (hint)
            um_req_error_set(err, UM_ERR_UNKNOWN_FIELD, clip, "unknown field \"%s\" in %s %s "
                             "request: did you mean %s? valid fields are %s", clip,
                             s_article(um_request_op_name(req->op)), um_request_op_name(req->op),
                             hint, list);
        else
            um_req_error_set(err, UM_ERR_UNKNOWN_FIELD, clip, "unknown field \"%s\" in %s %s "
                             "request: valid fields are %s", clip,
                             s_article(um_request_op_name(req->op)), um_request_op_name(req->op),
                             list);
        return -1;
    }
    return 0;
}

/* score: a prompt (or messages), the answer, and the Monte-Carlo settings. */
static int s_parse_score(um_request_t *req, um_req_error_t *err)
{
    json_t *o = req->root;
    if (!req->id) {
        um_req_error_set(err, UM_ERR_INVALID, "id", "missing field \"id\": a score request "
                         "needs an id (a string or an integer) so its reply can be matched "
                         "and it can be cancelled, e.g. \"id\": \"s1\"");
        return -1;
    }
    if (s_read_text_or_messages(req, "prompt", &req->prompt, &req->prompt_len, err) != 0)
        return -1;
    if (s_read_string(o, "answer", 1, &req->answer, &req->answer_len, err) != 0)
        return -1;
    int64_t n_samples = 0;
    if (s_read_int(o, "n_samples", 1, UM_REQ_MAX_SCORE_SAMPLES, UM_REQ_DEFAULT_SCORE_SAMPLES,
                   &n_samples, err) != 0)
        return -1;
    req->n_samples = (int32_t)n_samples;
    if (s_read_count(o, "batch_size", UM_REQ_DEFAULT_SCORE_BATCH, &req->batch_size, err) != 0)
        return -1;
    if (s_read_number(o, "cfg_scale", 0.0, &req->cfg_scale, err) != 0)
        return -1;
    int64_t seed = 0;
    req->has_seed = json_object_get(o, "seed") != NULL;
    if (s_read_int(o, "seed", 0, INT64_MAX, 0, &seed, err) != 0)
        return -1;
    req->seed = (uint64_t)seed;
    return 0;
}

int um_request_parse(const char *data, size_t len, um_request_t *req, um_req_error_t *err)
{
    memset(req, 0, sizeof *req);
    if (len == 0) {
        um_req_error_set(err, UM_ERR_BAD_JSON, NULL,
                         "empty request: send one JSON object per message");
        return -1;
    }

    json_error_t jerr;
    req->root = json_loadb(data, len, JSON_DECODE_ANY | JSON_ALLOW_NUL | JSON_REJECT_DUPLICATES,
                           &jerr);
    if (!req->root) {
        s_json_error(data, len, &jerr, err);
        return -1;
    }
    if (!json_is_object(req->root)) {
        um_req_error_set(err, UM_ERR_BAD_JSON, NULL,
                         "request must be a JSON object such as {\"op\": \"health\"}, got %s",
                         s_json_type(req->root));
        return -1;
    }

    if (s_parse_id(req, err) != 0 || s_parse_op(req, err) != 0
        || s_check_fields(req, err) != 0)
        return -1;

    switch (req->op) {
    case UM_REQ_GENERATE:
        return s_parse_generate(req, err);
    case UM_REQ_TOKENIZE:
        return s_read_text_or_messages(req, "text", &req->text, &req->text_len, err);
    case UM_REQ_DETOKENIZE:
        return s_parse_detokenize(req, err);
    case UM_REQ_CANCEL:
        return s_parse_cancel(req, err);
    case UM_REQ_SCORE:
        return s_parse_score(req, err);
    case UM_REQ_INFO:
    case UM_REQ_HEALTH:
        return 0;
    }
    return 0;
}

void um_request_clear(um_request_t *req)
{
    json_decref(req->root);
    free(req->tokens);
    memset(req, 0, sizeof *req);
}

/* ------------------------------------------------------------------------- */
/* Replies                                                                   */

json_t *um_reply_new(const json_t *id, const char *type)
{
    json_t *r = json_object();
    if (!r)
        return NULL;
    json_object_set_new(r, "id", id ? json_deep_copy(id) : json_null());
    json_object_set_new(r, "type", json_string(type));
    return r;
}

json_t *um_reply_text(const char *s)
{
    json_t *v = json_string(s);
    if (v)
        return v;
    char *copy = strdup(s);
    if (!copy)
        return json_null();
    for (char *p = copy; *p; p++)
        if ((unsigned char)*p >= 0x80)
            *p = '?';
    v = json_string(copy);
    free(copy);
    return v ? v : json_null();
}

json_t *um_reply_textn(const char *s, size_t len)
{
    /* The tokenizer already replaced invalid UTF-8, so only a bug gets the fallback. */
    json_t *v = json_stringn(s, len);
    return v ? v : um_reply_text(s);
}

json_t *um_reply_error(const json_t *id, const um_req_error_t *err)
{
    json_t *r = um_reply_new(id, UM_REPLY_ERROR);
    if (!r)
        return NULL;
    json_t *e = json_object();
    json_object_set_new(e, "code", json_string(err->code ? err->code : UM_ERR_INTERNAL));
    json_object_set_new(e, "field", err->field[0] ? um_reply_text(err->field) : json_null());
    json_object_set_new(e, "message", um_reply_text(err->message));
    json_object_set_new(r, "error", e);
    return r;
}

char *um_reply_dump(json_t *reply, size_t *len)
{
    if (!reply)
        return NULL;
    char *s = json_dumps(reply, JSON_COMPACT | JSON_ENCODE_ANY);
    json_decref(reply);
    if (s && len)
        *len = strlen(s);
    return s;
}
