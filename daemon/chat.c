/* Chat templates: see chat.h. */
#include "config.h"

#include "chat.h"

#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <unmaskd/error.h>

#include "log.h"

#define S_HEADER_START "<|start_header_id|>"
#define S_HEADER_END "<|end_header_id|>"
#define S_EOT "<|eot_id|>"
#define S_IM_START "<|im_start|>"
#define S_IM_END "<|im_end|>"

/* ------------------------------------------------------------------------- */
/* Loading                                                                   */

/* A special token of tokenizer_config.json: a string, or an object with "content". */
static const char *s_token_text(const json_t *v)
{
    if (json_is_object(v))
        v = json_object_get(v, "content");
    return json_string_value(v);
}

/*
 * The template text: chat_template is a string, or a list of {"name", "template"}
 * entries of which the one named "default" is the chat template.
 */
static const char *s_template_text(const json_t *config)
{
    const json_t *v = json_object_get(config, "chat_template");
    if (json_is_string(v))
        return json_string_value(v);
    size_t i;
    const json_t *e;
    json_array_foreach(v, i, e) {
        const char *name = json_string_value(json_object_get(e, "name"));
        if (name && strcmp(name, "default") == 0)
            return json_string_value(json_object_get(e, "template"));
    }
    return NULL;
}

/*
 * ChatML's default system message: the literal text between "<|im_start|>system" plus a
 * newline (written as a newline or as Jinja's "\n" escape) and "<|im_end|>", where that
 * text is plain (no quote, brace or "+" that would make it an expression). NULL when the
 * template has none.
 */
static char *s_default_system(const char *tmpl)
{
    const char *marker = S_IM_START "system";
    for (const char *p = strstr(tmpl, marker); p; p = strstr(p + 1, marker)) {
        const char *q = p + strlen(marker);
        if (*q == '\n')
            q++;
        else if (q[0] == '\\' && q[1] == 'n')
            q += 2;
        else
            continue;
        const char *end = strstr(q, S_IM_END);
        if (!end || end == q || strcspn(q, "'\"{}+") < (size_t)(end - q))
            continue;
        char *out = malloc((size_t)(end - q) + 1);
        if (!out)
            return NULL;
        size_t n = 0;
        for (const char *c = q; c < end; c++) {
            if (c[0] == '\\' && c + 1 < end && c[1] == 'n') {
                out[n++] = '\n';
                c++;
            } else {
                out[n++] = *c;
            }
        }
        out[n] = '\0';
        return out;
    }
    return NULL;
}

int um_chat_load(const char *model_dir, um_chat_template_t *t, char *err, size_t errlen)
{
    memset(t, 0, sizeof *t);
    char path[PATH_MAX];
    if ((size_t)snprintf(path, sizeof path, "%s/tokenizer_config.json", model_dir)
        >= sizeof path)
        return um_fail(err, errlen, UM_EINVAL, "model folder path %s is too long", model_dir);
    if (access(path, F_OK) != 0)
        return 0;
    json_error_t jerr;
    json_t *config = json_load_file(path, 0, &jerr);
    if (!config)
        return um_fail(err, errlen, UM_EFORMAT, "%s is not valid JSON (%s at line %d): fix "
                       "or remove it", path, jerr.text, jerr.line);
    int rc = 0;
    const char *tmpl = s_template_text(config);
    if (!tmpl)
        goto done;
    if (strstr(tmpl, S_HEADER_START) && strstr(tmpl, S_HEADER_END) && strstr(tmpl, S_EOT)) {
        t->kind = UM_CHAT_HEADERS;
        const char *bos = s_token_text(json_object_get(config, "bos_token"));
        if (strstr(tmpl, "bos_token") && bos && *bos && !(t->bos = strdup(bos)))
            rc = UM_ENOMEM;
        t->trim = strstr(tmpl, "| trim") || strstr(tmpl, "|trim");
    } else if (strstr(tmpl, S_IM_START) && strstr(tmpl, S_IM_END)) {
        t->kind = UM_CHAT_CHATML;
        t->default_system = s_default_system(tmpl);
    } else {
        t->kind = UM_CHAT_UNSUPPORTED;
        size_t n = strcspn(tmpl, "\n");
        if (n > sizeof t->head - 1)
            n = sizeof t->head - 1;
        memcpy(t->head, tmpl, n);
        t->head[n] = '\0';
    }
    if (rc != 0)
        um_fail(err, errlen, rc, "out of memory while reading %s", path);
done:
    json_decref(config);
    return rc;
}

void um_chat_free(um_chat_template_t *t)
{
    free(t->bos);
    free(t->default_system);
    memset(t, 0, sizeof *t);
}

const char *um_chat_kind_name(um_chat_kind_t kind)
{
    switch (kind) {
    case UM_CHAT_HEADERS:
        return "headers";
    case UM_CHAT_CHATML:
        return "chatml";
    case UM_CHAT_UNSUPPORTED:
        return "unsupported";
    default:
        return NULL;
    }
}

/* ------------------------------------------------------------------------- */
/* Rendering                                                                 */

typedef struct s_buf {
    char *data;
    size_t len, cap;
    int failed;
} s_buf_t;

static void s_put(s_buf_t *b, const char *s, size_t n)
{
    if (b->failed)
        return;
    if (b->len + n + 1 > b->cap) {
        size_t cap = b->cap ? b->cap : 256;
        while (cap < b->len + n + 1)
            cap *= 2;
        char *d = realloc(b->data, cap);
        if (!d) {
            b->failed = 1;
            return;
        }
        b->data = d;
        b->cap = cap;
    }
    memcpy(b->data + b->len, s, n);
    b->len += n;
    b->data[b->len] = '\0';
}

static void s_puts(s_buf_t *b, const char *s)
{
    s_put(b, s, strlen(s));
}

/* Append a message's content, trimmed of ASCII white space when trim is set. */
static void s_put_content(s_buf_t *b, const json_t *content, int trim)
{
    const char *s = json_string_value(content);
    size_t start = 0, end = json_string_length(content);
    static const char ws[] = " \t\n\r\v\f";
    while (trim && start < end && memchr(ws, s[start], sizeof ws - 1))
        start++;
    while (trim && end > start && memchr(ws, s[end - 1], sizeof ws - 1))
        end--;
    s_put(b, s + start, end - start);
}

int um_chat_render(const um_chat_template_t *t, const json_t *messages, char **out,
                   size_t *len, char *err, size_t errlen)
{
    *out = NULL;
    *len = 0;
    if (t->kind == UM_CHAT_NONE)
        return um_fail(err, errlen, UM_EUNSUPPORTED, "the model folder's tokenizer_config.json "
                       "has no chat_template: send the text as \"prompt\" instead of "
                       "\"messages\"");
    if (t->kind == UM_CHAT_UNSUPPORTED)
        return um_fail(err, errlen, UM_EUNSUPPORTED, "the model's chat template (\"%s...\") is "
                       "neither LLaMA-3-style headers nor ChatML, the two unmaskd renders: "
                       "apply it yourself and send the text as \"prompt\"", t->head);
    s_buf_t b = {0};
    size_t i;
    const json_t *m;
    if (t->kind == UM_CHAT_HEADERS) {
        if (t->bos)
            s_puts(&b, t->bos);
        json_array_foreach(messages, i, m) {
            s_puts(&b, S_HEADER_START);
            s_puts(&b, json_string_value(json_object_get(m, "role")));
            s_puts(&b, S_HEADER_END "\n\n");
            s_put_content(&b, json_object_get(m, "content"), t->trim);
            s_puts(&b, S_EOT);
        }
        s_puts(&b, S_HEADER_START "assistant" S_HEADER_END "\n\n");
    } else {
        const char *first = json_string_value(json_object_get(json_array_get(messages, 0),
                                                              "role"));
        if (t->default_system && !(first && strcmp(first, "system") == 0)) {
            s_puts(&b, S_IM_START "system\n");
            s_puts(&b, t->default_system);
            s_puts(&b, S_IM_END "\n");
        }
        json_array_foreach(messages, i, m) {
            s_puts(&b, S_IM_START);
            s_puts(&b, json_string_value(json_object_get(m, "role")));
            s_puts(&b, "\n");
            s_put_content(&b, json_object_get(m, "content"), 0);
            s_puts(&b, S_IM_END "\n");
        }
        s_puts(&b, S_IM_START "assistant\n");
    }
    if (b.failed) {
        free(b.data);
        return um_fail(err, errlen, UM_ENOMEM, "out of memory while rendering %zu messages",
                       json_array_size(messages));
    }
    *out = b.data;
    *len = b.len;
    return 0;
}
