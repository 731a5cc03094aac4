/* OpenAI-compatible completions: see openai.h. */
#include "config.h"

#include "openai.h"

#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <unmaskd/protocol.h>

#include "chat.h"
#include "log.h"

/* ------------------------------------------------------------------------- */
/* Fields                                                                    */

enum {
    S_COMPLETION = 1,
    S_CHAT = 2,
    S_BOTH = 3,
    S_PASS = 4, /* sent to the daemon's generate request unchanged */
};

/* Every field of the two endpoints. Fields outside this table go to the daemon
   unchanged, so that sampler settings the daemon gains later work here too. The
   daemon rejects the ones it does not take, naming them. */
static const struct s_field {
    const char *name;
    int flags;
} s_fields[] = {
    {"model", S_BOTH},
    {"prompt", S_COMPLETION},
    {"messages", S_CHAT},
    {"max_tokens", S_BOTH},
    {"max_completion_tokens", S_CHAT},
    {"temperature", S_BOTH | S_PASS},
    {"top_p", S_BOTH},
    {"n", S_BOTH},
    {"stream", S_BOTH},
    {"stream_options", S_BOTH},
    {"logprobs", S_BOTH},
    {"top_logprobs", S_CHAT},
    {"echo", S_COMPLETION},
    {"stop", S_BOTH},
    {"presence_penalty", S_BOTH},
    {"frequency_penalty", S_BOTH},
    {"best_of", S_COMPLETION},
    {"logit_bias", S_BOTH},
    {"user", S_BOTH},
    {"seed", S_BOTH},
    {"suffix", S_COMPLETION},
    {"response_format", S_CHAT},
    {"tools", S_CHAT},
    {"tool_choice", S_CHAT},
    {"functions", S_CHAT},
    {"function_call", S_CHAT},
    {"parallel_tool_calls", S_CHAT},
    {"metadata", S_BOTH},
    {"store", S_BOTH},
    {"service_tier", S_BOTH},
    /* The diffusion sampler's settings (docs/protocol.md, generate). */
    {"steps", S_BOTH | S_PASS},
    {"block_length", S_BOTH | S_PASS},
    {"remasking", S_BOTH | S_PASS},
    {"remasking_params", S_BOTH | S_PASS},
    {"cfg_scale", S_BOTH | S_PASS},
};
#define S_N_FIELDS (sizeof s_fields / sizeof s_fields[0])

static int s_kind_flag(um_gw_oai_kind_t kind)
{
    return kind == UM_GW_OAI_CHAT ? S_CHAT : S_COMPLETION;
}

static const char *s_endpoint_name(um_gw_oai_kind_t kind)
{
    return kind == UM_GW_OAI_CHAT ? "POST /v1/chat/completions" : "POST /v1/completions";
}

/* Levenshtein distance, capped: returns 3 for anything over 2. */
static int s_distance(const char *a, const char *b)
{
    size_t la = strlen(a), lb = strlen(b);
    if (la > 64 || lb > 64 || (la > lb ? la - lb : lb - la) > 2)
        return 3;
    int row[65];
    for (size_t j = 0; j <= lb; j++)
        row[j] = (int)j;
    for (size_t i = 1; i <= la; i++) {
        int diag = row[0];
        row[0] = (int)i;
        for (size_t j = 1; j <= lb; j++) {
            int up = row[j];
            int cost = a[i - 1] == b[j - 1] ? 0 : 1;
            int best = diag + cost;
            if (row[j] + 1 < best)
                best = row[j] + 1;
            if (row[j - 1] + 1 < best)
                best = row[j - 1] + 1;
            row[j] = best;
            diag = up;
        }
    }
    return row[lb] > 2 ? 3 : row[lb];
}

const char *um_gw_suggest(const char *word, const char *const *names, size_t n)
{
    const char *best = NULL;
    int best_d = 3;
    for (size_t i = 0; i < n; i++) {
        int d = s_distance(word, names[i]);
        if (d < best_d) {
            best_d = d;
            best = names[i];
        }
    }
    return best;
}

/* "a string", "an array" and so on, for type errors. */
static const char *s_json_kind(const json_t *v)
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
        return "a number";
    case JSON_TRUE:
    case JSON_FALSE:
        return "a boolean";
    default:
        return "null";
    }
}

static int s_type_error(um_gw_error_t *e, const char *field, const char *want, const json_t *v)
{
    um_gw_error_set(e, 400, UM_ERR_INVALID, field, "%s must be %s, got %s", field, want,
                    s_json_kind(v));
    return -1;
}

/* A setting the sampler cannot honour: accepted only at the value that changes nothing. */
static int s_unsupported(um_gw_error_t *e, const char *field, const char *why)
{
    um_gw_error_set(e, 400, "unsupported", field, "%s is not supported: %s", field, why);
    return -1;
}

/* The value of field, or NULL when it is absent or null. */
static json_t *s_get(const json_t *body, const char *field)
{
    json_t *v = json_object_get(body, field);
    return json_is_null(v) ? NULL : v;
}

/* Read an integer field in [min, max], where 64.0 counts as 64. Returns 1 when present,
   0 when absent or null, -1 with e filled. */
static int s_integer(const json_t *body, const char *field, json_int_t min, json_int_t max,
                     json_int_t *out, um_gw_error_t *e)
{
    json_t *v = s_get(body, field);
    if (!v)
        return 0;
    if (json_is_integer(v)) {
        *out = json_integer_value(v);
    } else if (json_is_real(v) && json_real_value(v) == floor(json_real_value(v))
               && fabs(json_real_value(v)) < 9.0e15) {
        *out = (json_int_t)json_real_value(v);
    } else {
        return s_type_error(e, field, "an integer", v);
    }
    if (*out < min || *out > max) {
        um_gw_error_set(e, 400, UM_ERR_OUT_OF_RANGE, field, "%s must be in [%lld, %lld], got "
                        "%lld", field, (long long)min, (long long)max, (long long)*out);
        return -1;
    }
    return 1;
}

static int s_number(const json_t *body, const char *field, double *out, um_gw_error_t *e)
{
    json_t *v = s_get(body, field);
    if (!v)
        return 0;
    if (!json_is_number(v))
        return s_type_error(e, field, "a number", v);
    *out = json_number_value(v);
    return 1;
}

static int s_boolean(const json_t *body, const char *field, int *out, um_gw_error_t *e)
{
    json_t *v = s_get(body, field);
    if (!v)
        return 0;
    if (!json_is_boolean(v))
        return s_type_error(e, field, "true or false", v);
    *out = json_is_true(v);
    return 1;
}

/* Check that field, when present, has JSON type type (JSON_STRING, ...). */
static int s_typed(const json_t *body, const char *field, json_type type, const char *want,
                   um_gw_error_t *e)
{
    json_t *v = s_get(body, field);
    if (v && json_typeof(v) != type)
        return s_type_error(e, field, want, v);
    return 0;
}

/* ------------------------------------------------------------------------- */
/* Parsing                                                                   */

/* Sort every field of the body: known ones stay, the rest go to the daemon. */
static int s_sort_fields(um_gw_oai_t *o, um_gw_error_t *e)
{
    const char *names[S_N_FIELDS];
    size_t n_names = 0;
    int kind = s_kind_flag(o->kind);
    for (size_t i = 0; i < S_N_FIELDS; i++)
        if (s_fields[i].flags & kind)
            names[n_names++] = s_fields[i].name;

    const char *key;
    json_t *v;
    json_object_foreach(o->body, key, v) {
        size_t i = 0;
        while (i < S_N_FIELDS && !((s_fields[i].flags & kind) && strcmp(s_fields[i].name, key) == 0))
            i++;
        if (i < S_N_FIELDS) {
            if ((s_fields[i].flags & S_PASS) && !json_is_null(v))
                json_object_set(o->daemon_fields, key, v);
            continue;
        }
        if (strcmp(key, "gen_length") == 0) {
            um_gw_error_set(e, 400, UM_ERR_UNKNOWN_FIELD, key, "unknown field \"gen_length\" "
                            "for %s: the number of tokens to generate is max_tokens here",
                            s_endpoint_name(o->kind));
            return -1;
        }
        if (strcmp(key, "op") == 0 || strcmp(key, "id") == 0 || strcmp(key, "prompt") == 0) {
            um_gw_error_set(e, 400, UM_ERR_UNKNOWN_FIELD, key, "unknown field \"%s\" for %s%s",
                            key, s_endpoint_name(o->kind),
                            strcmp(key, "prompt") == 0 ? ": chat requests take messages; send "
                                                         "a prompt to POST /v1/completions"
                                                       : ": the gateway sets it");
            return -1;
        }
        const char *hint = um_gw_suggest(key, names, n_names);
        if (hint) {
            um_gw_error_set(e, 400, UM_ERR_UNKNOWN_FIELD, key, "unknown field \"%s\" for %s: "
                            "did you mean %s?", key, s_endpoint_name(o->kind), hint);
            return -1;
        }
        json_object_set(o->daemon_fields, key, v);
    }
    return 0;
}

/* prompt: a string, or an array of strings, one completion set per string. */
static int s_parse_prompt(um_gw_oai_t *o, um_gw_error_t *e)
{
    json_t *p = json_object_get(o->body, "prompt");
    if (!p || json_is_null(p)) {
        um_gw_error_set(e, 400, UM_ERR_INVALID, "prompt", "prompt is required: send the text "
                        "to complete as a string");
        return -1;
    }
    o->prompts = json_array();
    if (json_is_string(p)) {
        json_array_append(o->prompts, p);
        return 0;
    }
    if (!json_is_array(p))
        return s_type_error(e, "prompt", "a string or an array of strings", p);
    if (json_array_size(p) == 0) {
        um_gw_error_set(e, 400, UM_ERR_INVALID, "prompt", "prompt is an empty array: send at "
                        "least one string");
        return -1;
    }
    size_t i;
    json_t *item;
    json_array_foreach(p, i, item) {
        if (json_is_integer(item) || json_is_array(item)) {
            um_gw_error_set(e, 400, "unsupported", "prompt", "prompt as token ids is not "
                            "supported: send the prompt as text");
            return -1;
        }
        if (!json_is_string(item)) {
            char field[32];
            snprintf(field, sizeof field, "prompt[%zu]", i);
            return s_type_error(e, field, "a string", item);
        }
        json_array_append(o->prompts, item);
    }
    return 0;
}

/* The text of message content: a string, an array of text parts, or null (empty). */
static int s_message_text(const json_t *content, size_t index, um_gw_buf_t *out,
                          um_gw_error_t *e)
{
    char field[64];
    snprintf(field, sizeof field, "messages[%zu].content", index);
    if (!content || json_is_null(content))
        return 0;
    if (json_is_string(content)) {
        um_gw_buf_append(out, json_string_value(content), json_string_length(content));
        return 0;
    }
    if (!json_is_array(content))
        return s_type_error(e, field, "a string or an array of text parts", content);
    size_t j;
    json_t *part;
    json_array_foreach(content, j, part) {
        char pfield[96];
        snprintf(pfield, sizeof pfield, "%s[%zu]", field, j);
        const char *type = json_string_value(json_object_get(part, "type"));
        if (!json_is_object(part) || !type) {
            um_gw_error_set(e, 400, UM_ERR_INVALID, pfield, "%s must be an object with a "
                            "\"type\", such as {\"type\": \"text\", \"text\": \"...\"}", pfield);
            return -1;
        }
        if (strcmp(type, "text") != 0) {
            char tfield[112];
            snprintf(tfield, sizeof tfield, "%s.type", pfield);
            um_gw_error_set(e, 400, "unsupported", tfield, "%s \"%s\" is not supported: the "
                            "model reads text parts only", tfield, type);
            return -1;
        }
        json_t *text = json_object_get(part, "text");
        if (!json_is_string(text)) {
            char tfield[112];
            snprintf(tfield, sizeof tfield, "%s.text", pfield);
            return s_type_error(e, tfield, "a string", text ? text : json_null());
        }
        if (j > 0)
            um_gw_buf_puts(out, "\n");
        um_gw_buf_append(out, json_string_value(text), json_string_length(text));
    }
    return 0;
}

/* The role of message i: system, developer, user or assistant. Returns NULL with e filled. */
static const char *s_message_role(const json_t *m, size_t i, um_gw_error_t *e)
{
    char field[48];
    snprintf(field, sizeof field, "messages[%zu].role", i);
    json_t *role = json_object_get(m, "role");
    if (!json_is_string(role)) {
        s_type_error(e, field, "a string", role ? role : json_null());
        return NULL;
    }

    const char *r = json_string_value(role);
    if (strcmp(r, "tool") == 0 || strcmp(r, "function") == 0) {
        um_gw_error_set(e, 400, "unsupported", field, "%s \"%s\" is not supported: the "
                        "gateway does not support tool calls", field, r);
        return NULL;
    }
    if (strcmp(r, "system") != 0 && strcmp(r, "developer") != 0 && strcmp(r, "user") != 0
        && strcmp(r, "assistant") != 0) {
        um_gw_error_set(e, 400, UM_ERR_INVALID, field, "%s \"%s\" is invalid: use system, "
                        "developer, user or assistant", field, r);
        return NULL;
    }
    return r;
}

/* Check message i and append it to o->messages as {"role", "content"} with text content. */
static int s_parse_message(um_gw_oai_t *o, const json_t *m, size_t i, um_gw_error_t *e)
{
    char field[48];
    snprintf(field, sizeof field, "messages[%zu]", i);
    if (!json_is_object(m))
        return s_type_error(e, field, "an object with role and content", m);
    const char *role = s_message_role(m, i, e);
    if (!role)
        return -1;
    if (s_get(m, "tool_calls") || s_get(m, "function_call")) {
        snprintf(field, sizeof field, "messages[%zu].tool_calls", i);
        return s_unsupported(e, field, "the gateway does not support tool calls");
    }

    um_gw_buf_t text = {0};
    um_gw_buf_reserve(&text, 0);
    if (s_message_text(json_object_get(m, "content"), i, &text, e) != 0) {
        um_gw_buf_free(&text);
        return -1;
    }
    json_t *norm = text.failed ? NULL
                               : json_pack("{s:s, s:s%}", "role", role, "content", text.data,
                                           text.len);
    um_gw_buf_free(&text);
    if (!norm) {
        um_gw_error_set(e, 400, UM_ERR_INVALID, field, "messages[%zu] could not be read (out "
                        "of memory, or content that is not UTF-8)", i);
        return -1;
    }
    json_array_append_new(o->messages, norm);
    return 0;
}

/* messages: system, developer, user and assistant turns with text content. */
static int s_parse_messages(um_gw_oai_t *o, um_gw_error_t *e)
{
    json_t *msgs = json_object_get(o->body, "messages");
    if (!msgs || json_is_null(msgs)) {
        um_gw_error_set(e, 400, UM_ERR_INVALID, "messages", "messages is required: send an "
                        "array such as [{\"role\": \"user\", \"content\": \"Hello\"}]");
        return -1;
    }
    if (!json_is_array(msgs))
        return s_type_error(e, "messages", "an array of message objects", msgs);
    if (json_array_size(msgs) == 0) {
        um_gw_error_set(e, 400, UM_ERR_INVALID, "messages", "messages is empty: send at least "
                        "one message");
        return -1;
    }
    o->messages = json_array();
    size_t i;
    json_t *m;
    json_array_foreach(msgs, i, m) {
        if (s_parse_message(o, m, i, e) != 0)
            return -1;
    }
    return 0;
}

/* stop: a string or up to four strings. Empty strings never match, so they are skipped. */
static int s_parse_stop(um_gw_oai_t *o, um_gw_error_t *e)
{
    json_t *stop = s_get(o->body, "stop");
    if (!stop)
        return 0;
    if (json_is_string(stop)) {
        if (json_string_length(stop) > 0)
            o->stops[o->n_stops++] = json_string_value(stop);
        return 0;
    }
    if (!json_is_array(stop))
        return s_type_error(e, "stop", "a string or an array of strings", stop);
    if (json_array_size(stop) > UM_GW_MAX_STOPS) {
        um_gw_error_set(e, 400, UM_ERR_OUT_OF_RANGE, "stop", "stop has %zu sequences, more "
                        "than %d: send at most %d", json_array_size(stop), UM_GW_MAX_STOPS,
                        UM_GW_MAX_STOPS);
        return -1;
    }
    size_t i;
    json_t *s;
    json_array_foreach(stop, i, s) {
        char field[32];
        snprintf(field, sizeof field, "stop[%zu]", i);
        if (!json_is_string(s))
            return s_type_error(e, field, "a string", s);
        if (json_string_length(s) > 0)
            o->stops[o->n_stops++] = json_string_value(s);
    }
    return 0;
}

/* Settings that the sampler cannot honour, and features the gateway does not have. */
static int s_check_unsupported(um_gw_oai_t *o, um_gw_error_t *e)
{
    const json_t *b = o->body;
    double x = 0;
    int rc;
    if ((rc = s_number(b, "top_p", &x, e)) < 0)
        return -1;
    if (rc > 0 && x != 1.0)
        return s_unsupported(e, "top_p", "the diffusion sampler has no nucleus sampling; leave "
                             "top_p out or set it to 1");
    const char *penalties[] = {"presence_penalty", "frequency_penalty"};
    for (size_t i = 0; i < 2; i++) {
        if ((rc = s_number(b, penalties[i], &x, e)) < 0)
            return -1;
        if (rc > 0 && x != 0.0)
            return s_unsupported(e, penalties[i], "unmaskd applies no repetition penalties; "
                                 "leave it out or set it to 0");
    }
    json_t *bias = s_get(b, "logit_bias");
    if (bias && !json_is_object(bias))
        return s_type_error(e, "logit_bias", "an object", bias);
    if (bias && json_object_size(bias) > 0)
        return s_unsupported(e, "logit_bias", "unmaskd cannot bias logits per request; leave "
                             "it out or send {}");

    json_t *logprobs = s_get(b, "logprobs");
    if (logprobs && o->kind == UM_GW_OAI_CHAT && !json_is_boolean(logprobs))
        return s_type_error(e, "logprobs", "true or false", logprobs);
    if (logprobs && o->kind == UM_GW_OAI_COMPLETION && !json_is_integer(logprobs))
        return s_type_error(e, "logprobs", "an integer", logprobs);
    if (logprobs && !json_is_false(logprobs))
        return s_unsupported(e, "logprobs", "the gateway does not return log probabilities");
    json_int_t k = 0;
    if ((rc = s_integer(b, "top_logprobs", 0, 20, &k, e)) < 0)
        return -1;
    if (rc > 0 && k != 0)
        return s_unsupported(e, "top_logprobs", "the gateway does not return log probabilities");
    if ((rc = s_integer(b, "best_of", 1, UM_GW_MAX_CHOICES, &k, e)) < 0)
        return -1;
    if (rc > 0 && k != 1 && k != o->n)
        return s_unsupported(e, "best_of", "the gateway cannot rank completions by log "
                             "probability; leave best_of out or set it to n");
    if (s_typed(b, "suffix", JSON_STRING, "a string", e) < 0)
        return -1;
    json_t *suffix = s_get(b, "suffix");
    if (suffix && json_string_length(suffix) > 0)
        return s_unsupported(e, "suffix", "text after the completion is not supported");

    json_t *format = s_get(b, "response_format");
    if (format) {
        const char *type = json_string_value(json_object_get(format, "type"));
        if (!json_is_object(format) || !type)
            return s_type_error(e, "response_format", "an object with a type", format);
        if (strcmp(type, "text") != 0)
            return s_unsupported(e, "response_format", "only {\"type\": \"text\"} is supported: "
                                 "the sampler cannot constrain output to JSON");
    }
    const char *lists[] = {"tools", "functions"};
    for (size_t i = 0; i < 2; i++) {
        json_t *v = s_get(b, lists[i]);
        if (v && !json_is_array(v))
            return s_type_error(e, lists[i], "an array", v);
        if (v && json_array_size(v) > 0)
            return s_unsupported(e, lists[i], "the gateway does not support tool calls");
    }
    const char *choices[] = {"tool_choice", "function_call"};
    for (size_t i = 0; i < 2; i++) {
        json_t *v = s_get(b, choices[i]);
        const char *s = json_string_value(v);
        if (v && !(s && (strcmp(s, "none") == 0 || strcmp(s, "auto") == 0)))
            return s_unsupported(e, choices[i], "the gateway does not support tool calls; "
                                 "leave it out or set it to \"none\"");
    }
    /* Accepted and ignored: they change nothing in the result. */
    int ignored = 0;
    if (s_boolean(b, "parallel_tool_calls", &ignored, e) < 0 || s_boolean(b, "store", &ignored, e) < 0
        || s_typed(b, "metadata", JSON_OBJECT, "an object", e) < 0
        || s_typed(b, "service_tier", JSON_STRING, "a string", e) < 0
        || s_typed(b, "user", JSON_STRING, "a string", e) < 0
        || s_typed(b, "model", JSON_STRING, "a string", e) < 0)
        return -1;
    return 0;
}

/* The settings the gateway itself uses: counts, streaming, seed, length. */
static int s_parse_settings(um_gw_oai_t *o, um_gw_error_t *e)
{
    const json_t *b = o->body;
    json_int_t v = 0;
    int rc;
    if ((rc = s_integer(b, "n", 1, UM_GW_MAX_CHOICES, &v, e)) < 0)
        return -1;
    o->n = rc > 0 ? (int)v : 1;
    if (s_boolean(b, "stream", &o->stream, e) < 0)
        return -1;
    json_t *so = s_get(b, "stream_options");
    if (so && !json_is_object(so))
        return s_type_error(e, "stream_options", "an object", so);
    if (so && s_boolean(so, "include_usage", &o->include_usage, e) < 0) {
        snprintf(e->param, sizeof e->param, "stream_options.include_usage");
        return -1;
    }
    if (o->kind == UM_GW_OAI_COMPLETION && s_boolean(b, "echo", &o->echo, e) < 0)
        return -1;
    if ((rc = s_integer(b, "seed", 0, INT64_MAX, &o->seed, e)) < 0)
        return -1;
    o->has_seed = rc > 0;

    json_int_t mt = -1, mct = -1;
    if (s_integer(b, "max_tokens", 1, INT32_MAX, &mt, e) < 0)
        return -1;
    if (o->kind == UM_GW_OAI_CHAT && s_integer(b, "max_completion_tokens", 1, INT32_MAX, &mct, e) < 0)
        return -1;
    if (mt > 0 && mct > 0 && mt != mct) {
        um_gw_error_set(e, 400, UM_ERR_INVALID, "max_completion_tokens", "max_tokens (%lld) and "
                        "max_completion_tokens (%lld) differ: send one of them",
                        (long long)mt, (long long)mct);
        return -1;
    }
    o->max_tokens = mct > 0 ? mct : mt;
    o->max_tokens_field = mct > 0 ? "max_completion_tokens" : "max_tokens";

    double t = 0;
    if (s_number(b, "temperature", &t, e) < 0)
        return -1;
    return s_parse_stop(o, e);
}

int um_gw_oai_parse(um_gw_oai_t *o, const um_gw_t *gw, um_gw_oai_kind_t kind,
                    const char *body, size_t len, um_gw_error_t *e)
{
    memset(o, 0, sizeof *o);
    o->gw = gw;
    o->kind = kind;
    o->n = 1;
    o->max_tokens = -1;
    o->max_tokens_field = "max_tokens";
    json_error_t jerr;
    o->body = json_loadb(body, len, JSON_REJECT_DUPLICATES, &jerr);
    if (!o->body) {
        um_gw_error_set(e, 400, UM_ERR_BAD_JSON, NULL, "the request body is not valid JSON: %s "
                        "(line %d, column %d)", jerr.text, jerr.line, jerr.column);
        return -1;
    }
    if (!json_is_object(o->body)) {
        um_gw_error_set(e, 400, UM_ERR_BAD_JSON, NULL, "the request body must be a JSON object, "
                        "got %s", s_json_kind(o->body));
        return -1;
    }
    o->daemon_fields = json_object();
    if (!o->daemon_fields) {
        um_gw_error_set(e, 500, UM_ERR_INTERNAL, NULL, "out of memory");
        return -1;
    }
    if (s_sort_fields(o, e) != 0 || s_parse_settings(o, e) != 0
        || s_check_unsupported(o, e) != 0)
        return -1;
    if (kind == UM_GW_OAI_CHAT ? s_parse_messages(o, e) : s_parse_prompt(o, e))
        return -1;
    if (um_gw_oai_choices(o) > UM_GW_MAX_CHOICES) {
        um_gw_error_set(e, 400, UM_ERR_OUT_OF_RANGE, "n", "n (%d) times the number of prompts "
                        "(%zu) is %d, more than the %d completions one request may ask for",
                        o->n, json_array_size(o->prompts), um_gw_oai_choices(o),
                        UM_GW_MAX_CHOICES);
        return -1;
    }
    return 0;
}

int um_gw_oai_choices(const um_gw_oai_t *o)
{
    size_t prompts = o->kind == UM_GW_OAI_CHAT ? 1 : json_array_size(o->prompts);
    return o->n * (int)prompts;
}

/* ------------------------------------------------------------------------- */
/* Preparing                                                                 */

/* Renames the daemon's fields in its errors to this request's fields. */
static const char *s_map_field(const char *field, void *arg)
{
    const um_gw_oai_t *o = arg;
    if (strcmp(field, "gen_length") == 0)
        return o->max_tokens_field;
    if (strcmp(field, "prompt") == 0 && o->kind == UM_GW_OAI_CHAT)
        return "messages";
    return NULL;
}

/*
 * Fill e from the daemon's final reply, with the daemon's field names renamed to this
 * request's. An unknown field here is one the gateway passed through because it is not
 * in its table, so the message explains both rejections.
 */
static void s_error_from_reply(um_gw_oai_t *o, const json_t *reply, um_gw_error_t *e)
{
    um_gw_error_from_reply(e, reply, s_map_field, o);
    if (strcmp(e->code, UM_ERR_UNKNOWN_FIELD) != 0 || !e->param[0]
        || !json_object_get(o->daemon_fields, e->param))
        return;
    char daemon_message[sizeof e->message];
    snprintf(daemon_message, sizeof daemon_message, "%s", e->message);
    snprintf(e->message, sizeof e->message, "unknown field \"%s\" for %s: it is not an OpenAI "
             "field the gateway knows, and unmaskd rejected it as a generate field (%.700s)",
             e->param, s_endpoint_name(o->kind), daemon_message);
}

/* Count the tokens of prompt with the daemon's tokenizer. Returns the count or -1 with e. */
static int32_t s_count_tokens(um_gw_oai_t *o, um_gw_session_t *s, const json_t *prompt,
                              um_gw_error_t *e)
{
    json_t *req = json_pack("{s:s, s:O}", "op", UM_OP_TOKENIZE, "text", prompt);
    json_t *reply = NULL;
    int rc = req ? um_gw_session_call(s, req, &reply) : UM_GW_NOMEM;
    json_decref(req);
    if (rc != 0) {
        um_gw_error_from_status(e, rc, s->up->endpoint);
        return -1;
    }
    if (strcmp(um_gw_reply_type(reply), UM_REPLY_DONE) != 0) {
        s_error_from_reply(o, reply, e);
        json_decref(reply);
        return -1;
    }
    int32_t n = (int32_t)json_array_size(json_object_get(reply, "tokens"));
    json_decref(reply);
    return n;
}

int um_gw_oai_prepare(um_gw_oai_t *o, um_gw_session_t *s, um_gw_error_t *e)
{
    json_t *info = um_gw_fetch_info(s, e);
    if (!info)
        return -1;
    um_gw_model_id(o->gw, info, o->model, sizeof o->model);
    json_int_t max_seq = json_integer_value(
        json_object_get(json_object_get(info, "model"), "max_sequence_length"));
    /* The daemon's framing tokens (BERT's [CLS] and [SEP]) take positions too. */
    max_seq -= json_integer_value(
        json_object_get(json_object_get(info, "model"), "framing_tokens"));
    char model_template[32] = "";
    const char *mt = json_string_value(
        json_object_get(json_object_get(info, "model"), "chat_template"));
    if (mt)
        snprintf(model_template, sizeof model_template, "%s", mt);
    json_decref(info);

    if (o->kind == UM_GW_OAI_CHAT) {
        if (um_gw_chat_template_resolve(s, o->gw->cfg.chat_template,
                                        model_template[0] ? model_template : NULL,
                                        &o->chat_template, e) != 0)
            return -1;
        json_t *p = NULL;
        if (o->chat_template == UM_GW_CHAT_MODEL) {
            if (!(p = um_gw_chat_render_model(s, o->messages, e)))
                return -1;
        } else {
            size_t len = 0;
            char *prompt = um_gw_chat_render(o->chat_template, o->messages, &len);
            p = prompt ? json_stringn(prompt, len) : NULL;
            free(prompt);
        }
        o->prompts = json_array();
        if (!p || !o->prompts || json_array_append_new(o->prompts, p) != 0) {
            um_gw_error_set(e, 500, UM_ERR_INTERNAL, NULL, "out of memory for the chat prompt");
            return -1;
        }
    }

    size_t n_prompts = json_array_size(o->prompts);
    o->prompt_tokens = calloc(n_prompts, sizeof *o->prompt_tokens);
    o->gen_length = calloc(n_prompts, sizeof *o->gen_length);
    if (!o->prompt_tokens || !o->gen_length) {
        um_gw_error_set(e, 500, UM_ERR_INTERNAL, NULL, "out of memory");
        return -1;
    }
    const char *prompt_field = o->kind == UM_GW_OAI_CHAT ? "messages" : "prompt";
    for (size_t i = 0; i < n_prompts; i++) {
        int32_t n = s_count_tokens(o, s, json_array_get(o->prompts, i), e);
        if (n < 0)
            return -1;
        o->prompt_tokens[i] = n;
        if (o->max_tokens > 0) {
            /* The daemon checks it against the model's context and names the field. */
            o->gen_length[i] = (int32_t)o->max_tokens;
            continue;
        }
        json_int_t room = max_seq > 0 ? max_seq - n : UM_GW_DEFAULT_GEN_LENGTH;
        if (room < 1) {
            um_gw_error_set(e, 400, UM_ERR_OUT_OF_RANGE, prompt_field, "the %s has %d tokens, "
                            "which leaves no room to generate within the model's "
                            "max_sequence_length of %lld: shorten it",
                            o->kind == UM_GW_OAI_CHAT ? "chat prompt" : "prompt", n,
                            (long long)max_seq);
            return -1;
        }
        o->gen_length[i] = (int32_t)(room < UM_GW_DEFAULT_GEN_LENGTH ? room
                                                                      : UM_GW_DEFAULT_GEN_LENGTH);
    }
    return 0;
}

/* ------------------------------------------------------------------------- */
/* Running                                                                   */

/*
 * A seed for a choice that has none: from the kernel's entropy, cut to 53 bits so
 * that clients reading JSON numbers as doubles get the exact value back.
 */
static json_int_t s_random_seed(void)
{
    uint64_t x = 0;
    if (getentropy(&x, sizeof x) != 0)
        x = (uint64_t)time(NULL) * 0x9E3779B97F4A7C15ULL ^ (uint64_t)getpid();
    return (json_int_t)(x & ((1ULL << 53) - 1));
}

static void s_new_response_id(um_gw_oai_t *o)
{
    unsigned char bytes[12] = {0};
    if (getentropy(bytes, sizeof bytes) != 0) {
        uint64_t t = (uint64_t)time(NULL) ^ (uint64_t)getpid() << 20;
        memcpy(bytes, &t, sizeof t);
    }
    int n = snprintf(o->id, sizeof o->id, "%s", o->kind == UM_GW_OAI_CHAT ? "chatcmpl-" : "cmpl-");
    for (size_t i = 0; i < sizeof bytes && (size_t)n + 2 < sizeof o->id; i++)
        n += snprintf(o->id + n, sizeof o->id - (size_t)n, "%02x", bytes[i]);
    o->created = time(NULL);
    o->extra = json_array();
}

/*
 * The generate request of choice i: prompt i / n, with seed + i % n when the request
 * gave a seed. Records the choice's details in o->extra.
 */
static json_t *s_choice_request(um_gw_oai_t *o, int i, int32_t *gen_length)
{
    size_t p = o->kind == UM_GW_OAI_CHAT ? 0 : (size_t)(i / o->n);
    json_int_t seed = o->has_seed ? (json_int_t)(((uint64_t)o->seed + (uint64_t)(i % o->n))
                                                 & (uint64_t)INT64_MAX)
                                  : s_random_seed();
    *gen_length = o->gen_length[p];
    json_t *r = json_deep_copy(o->daemon_fields);
    if (!r)
        return NULL;
    json_object_set(r, "prompt", json_array_get(o->prompts, p));
    json_object_set_new(r, "gen_length", json_integer(*gen_length));
    json_object_set_new(r, "seed", json_integer(seed));
    json_array_append_new(o->extra, json_pack("{s:i, s:I, s:i, s:i}", "index", i, "seed", seed,
                                              "gen_length", *gen_length, "prompt_tokens",
                                              o->prompt_tokens[p]));
    return r;
}

/* Start choice i on s. Returns 0 or -1 with e filled. */
static int s_start_choice(um_gw_oai_t *o, um_gw_session_t *s, int i, um_gw_error_t *e)
{
    int32_t gen_length = 0;
    json_t *req = s_choice_request(o, i, &gen_length);
    if (!req) {
        um_gw_error_set(e, 500, UM_ERR_INTERNAL, NULL, "out of memory");
        return -1;
    }
    int rc = um_gw_completion_start(&o->c, s, req, gen_length, o->stops, o->n_stops, 1);
    json_decref(req);
    if (rc != 0) {
        um_gw_error_from_status(e, rc, s->up->endpoint);
        um_gw_completion_clear(&o->c);
        return -1;
    }
    o->running = 1;
    o->head_sent = 0;
    return 0;
}

/* Record a finished choice's usage and diffusion details, and clear o->c. */
static void s_finish_choice(um_gw_oai_t *o, int i)
{
    json_t *x = json_array_get(o->extra, (size_t)i);
    json_object_set_new(x, "steps", json_integer(o->c.steps));
    json_object_set_new(x, "step_ms", json_real(o->c.step_ms));
    json_object_set_new(x, "stopped_early",
                        json_boolean(o->c.cancel_sent
                                     && strcmp(um_gw_reply_type(o->c.final), UM_REPLY_CANCELLED) == 0));
    o->usage_completion += o->c.completion_tokens;
    um_gw_completion_clear(&o->c);
    o->running = 0;
}

static json_t *s_usage(const um_gw_oai_t *o)
{
    int64_t prompt = 0;
    size_t n_prompts = json_array_size(o->prompts);
    for (size_t i = 0; i < n_prompts; i++)
        prompt += o->prompt_tokens[i];
    return json_pack("{s:I, s:I, s:I}", "prompt_tokens", (json_int_t)prompt,
                     "completion_tokens", (json_int_t)o->usage_completion, "total_tokens",
                     (json_int_t)(prompt + o->usage_completion));
}

/* A choice of the whole response, with the completion's text. */
static json_t *s_choice_json(um_gw_oai_t *o, int i)
{
    const um_gw_completion_t *c = &o->c;
    if (o->kind == UM_GW_OAI_CHAT)
        return json_pack("{s:i, s:{s:s, s:s%}, s:n, s:s}", "index", i, "message", "role",
                         "assistant", "content", c->text, c->text_len, "logprobs",
                         "finish_reason", c->finish_reason);
    json_t *text;
    if (o->echo) {
        const json_t *prompt = json_array_get(o->prompts, (size_t)(i / o->n));
        um_gw_buf_t b = {0};
        um_gw_buf_append(&b, json_string_value(prompt), json_string_length(prompt));
        um_gw_buf_append(&b, c->text, c->text_len);
        text = b.failed ? NULL : json_stringn(b.data ? b.data : "", b.len);
        um_gw_buf_free(&b);
    } else {
        text = json_stringn(c->text, c->text_len);
    }
    return json_pack("{s:i, s:o, s:n, s:s}", "index", i, "text", text, "logprobs",
                     "finish_reason", c->finish_reason);
}

json_t *um_gw_oai_run(um_gw_oai_t *o, um_gw_session_t *s, um_gw_error_t *e)
{
    s_new_response_id(o);
    json_t *choices = json_array();
    int total = um_gw_oai_choices(o);
    for (int i = 0; i < total; i++) {
        if (s_start_choice(o, s, i, e) != 0)
            goto fail;
        int rc = um_gw_completion_run(&o->c, o->gw->cfg.timeout_ms);
        if (rc != 0) {
            um_gw_error_from_status(e, rc, s->up->endpoint);
            goto fail;
        }
        if (o->c.failed) {
            s_error_from_reply(o, o->c.final, e);
            goto fail;
        }
        json_array_append_new(choices, s_choice_json(o, i));
        s_finish_choice(o, i);
    }
    return json_pack("{s:s, s:s, s:I, s:s, s:o, s:o, s:{s:O}}", "id", o->id, "object",
                     o->kind == UM_GW_OAI_CHAT ? "chat.completion" : "text_completion",
                     "created", (json_int_t)o->created, "model", o->model, "choices", choices,
                     "usage",
                     s_usage(o), "unmaskd", "choices", o->extra);

fail:
    json_decref(choices);
    return NULL;
}

/* ------------------------------------------------------------------------- */
/* Streaming                                                                 */

static double s_now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1e3 + (double)ts.tv_nsec / 1e6;
}

/* Append obj as one SSE data event, releasing it. */
static void s_emit(um_gw_buf_t *out, json_t *obj)
{
    char *text = obj ? json_dumps(obj, JSON_COMPACT) : NULL;
    json_decref(obj);
    if (!text) {
        out->failed = 1;
        return;
    }
    um_gw_buf_puts(out, "data: ");
    um_gw_buf_puts(out, text);
    um_gw_buf_puts(out, "\n\n");
    free(text);
}

/*
 * One chunk for choice i: a text delta (text may be NULL for none), the assistant role
 * for the first chat chunk, and a finish reason for the last one.
 */
static json_t *s_chunk(const um_gw_oai_t *o, int i, const char *text, size_t len, int role,
                       const char *finish)
{
    json_t *choice;
    if (o->kind == UM_GW_OAI_CHAT) {
        json_t *delta = json_object();
        if (role)
            json_object_set_new(delta, "role", json_string("assistant"));
        if (text)
            json_object_set_new(delta, "content", json_stringn(text, len));
        choice = json_pack("{s:i, s:o, s:n, s:o}", "index", i, "delta", delta, "logprobs",
                           "finish_reason", finish ? json_string(finish) : json_null());
    } else {
        choice = json_pack("{s:i, s:s%, s:n, s:o}", "index", i, "text", text ? text : "",
                           text ? len : 0, "logprobs", "finish_reason",
                           finish ? json_string(finish) : json_null());
    }
    json_t *chunk = json_pack("{s:s, s:s, s:I, s:s, s:[o]}", "id", o->id, "object",
                              o->kind == UM_GW_OAI_CHAT ? "chat.completion.chunk"
                                                        : "text_completion",
                              "created", (json_int_t)o->created, "model", o->model, "choices",
                              choice);
    if (chunk && o->include_usage)
        json_object_set_new(chunk, "usage", json_null());
    return chunk;
}

/* The error event that ends a stream. */
static void s_emit_error(um_gw_oai_t *o, um_gw_buf_t *out, const um_gw_error_t *e)
{
    um_warn("openai", "%s: stream ends with an error %d %s: %s", o->id, e->status, e->code,
            e->message);
    s_emit(out, um_gw_error_json(e));
    o->stream_over = 1;
}

int um_gw_oai_stream_begin(um_gw_oai_t *o, um_gw_session_t *s, um_gw_error_t *e)
{
    s_new_response_id(o);
    if (s_start_choice(o, s, 0, e) != 0)
        return -1;
    o->last_reply_ms = s_now_ms();
    int rc = um_gw_completion_next(&o->c, UM_GW_FIRST_REPLY_WAIT_MS);
    if (rc == UM_GW_TIMEOUT)
        return 0; /* waiting in the daemon's queue: the stream starts now */
    if (rc != 0) {
        um_gw_error_from_status(e, rc, s->up->endpoint);
        return -1;
    }
    o->last_reply_ms = s_now_ms();
    if (o->c.failed) {
        s_error_from_reply(o, o->c.final, e);
        return -1;
    }
    return 0;
}

/* The first chunk of the running choice: the role for chat, the prompt for echo. */
static void s_emit_head(um_gw_oai_t *o, um_gw_buf_t *out)
{
    o->head_sent = 1;
    if (o->kind == UM_GW_OAI_CHAT) {
        s_emit(out, s_chunk(o, o->choice, "", 0, 1, NULL));
    } else if (o->echo) {
        const json_t *p = json_array_get(o->prompts, (size_t)(o->choice / o->n));
        s_emit(out, s_chunk(o, o->choice, json_string_value(p), json_string_length(p), 0, NULL));
    }
}

/* Wait for the daemon's next reply. A keep-alive comment goes out while it is quiet. */
static int s_stream_wait(um_gw_oai_t *o, um_gw_session_t *s, um_gw_buf_t *out)
{
    int rc = um_gw_completion_next(&o->c, UM_GW_KEEPALIVE_MS);
    if (rc == 0) {
        o->last_reply_ms = s_now_ms();
        return 0;
    }
    if (rc == UM_GW_ABORTED && !atomic_load(&((um_gw_t *)o->gw)->stopping)) {
        /* The client left, and um_gw_oai_clear cancels the choice. */
        o->stream_over = 1;
        return -1;
    }
    um_gw_error_t e;
    if (rc == UM_GW_TIMEOUT && s_now_ms() - o->last_reply_ms < o->gw->cfg.timeout_ms) {
        um_gw_buf_puts(out, ": keep-alive\n\n");
        return 1;
    }
    um_gw_error_from_status(&e, rc, s->up->endpoint);
    s_emit_error(o, out, &e);
    return -1;
}

int um_gw_oai_stream_pump(um_gw_oai_t *o, um_gw_session_t *s, um_gw_buf_t *out)
{
    while (!o->stream_over && out->len == 0 && !out->failed) {
        if (!o->running) {
            if (o->choice == um_gw_oai_choices(o)) {
                if (o->include_usage)
                    s_emit(out, json_pack("{s:s, s:s, s:I, s:s, s:[], s:o}", "id", o->id,
                                          "object", o->kind == UM_GW_OAI_CHAT
                                                        ? "chat.completion.chunk"
                                                        : "text_completion",
                                          "created", (json_int_t)o->created, "model", o->model,
                                          "choices", "usage", s_usage(o)));
                um_gw_buf_puts(out, "data: [DONE]\n\n");
                o->stream_over = 1;
                break;
            }
            um_gw_error_t e;
            if (s_start_choice(o, s, o->choice, &e) != 0) {
                s_emit_error(o, out, &e);
                break;
            }
            o->last_reply_ms = s_now_ms();
        }
        if (!o->head_sent) {
            s_emit_head(o, out);
            continue;
        }
        if (!um_gw_completion_finished(&o->c) && s_stream_wait(o, s, out) != 0)
            continue;

        const char *text = NULL;
        size_t n = um_gw_completion_delta(&o->c, &text);
        if (n > 0)
            s_emit(out, s_chunk(o, o->choice, text, n, 0, NULL));
        if (!um_gw_completion_finished(&o->c))
            continue;
        if (o->c.failed) {
            um_gw_error_t e;
            s_error_from_reply(o, o->c.final, &e);
            s_emit_error(o, out, &e);
            break;
        }
        s_emit(out, s_chunk(o, o->choice, NULL, 0, 0, o->c.finish_reason));
        s_finish_choice(o, o->choice);
        o->choice++;
    }
    return o->stream_over ? 0 : 1;
}

void um_gw_oai_clear(um_gw_oai_t *o)
{
    if (o->running)
        um_gw_completion_clear(&o->c);
    json_decref(o->body);
    json_decref(o->prompts);
    json_decref(o->messages);
    json_decref(o->daemon_fields);
    json_decref(o->extra);
    free(o->prompt_tokens);
    free(o->gen_length);
    memset(o, 0, sizeof *o);
}
