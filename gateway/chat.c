/* Chat templates: see chat.h. */
#include "config.h"

#include "chat.h"

#include <string.h>

#include <unmaskd/protocol.h>

#include "buf.h"

/* The special tokens of LLaDA-8B-Instruct's chat template. */
#define S_LLADA_BOS "<|startoftext|>"
#define S_LLADA_HEADER_START "<|start_header_id|>"
#define S_LLADA_HEADER_END "<|end_header_id|>"
#define S_LLADA_EOT "<|eot_id|>"

int um_gw_chat_template_parse(const char *name, um_gw_chat_template_t *out)
{
    if (strcmp(name, "auto") == 0)
        *out = UM_GW_CHAT_AUTO;
    else if (strcmp(name, "plain") == 0)
        *out = UM_GW_CHAT_PLAIN;
    else if (strcmp(name, "llada") == 0)
        *out = UM_GW_CHAT_LLADA;
    else if (strcmp(name, "model") == 0)
        *out = UM_GW_CHAT_MODEL;
    else
        return -1;
    return 0;
}

const char *um_gw_chat_template_name(um_gw_chat_template_t t)
{
    switch (t) {
    case UM_GW_CHAT_PLAIN:
        return "plain";
    case UM_GW_CHAT_LLADA:
        return "llada";
    case UM_GW_CHAT_MODEL:
        return "model";
    default:
        return "auto";
    }
}

int um_gw_chat_template_resolve(um_gw_session_t *s, um_gw_chat_template_t t,
                                const char *model_template, um_gw_chat_template_t *out,
                                um_gw_error_t *e)
{
    *out = t;
    if (t != UM_GW_CHAT_AUTO)
        return 0;
    if (model_template && (strcmp(model_template, "headers") == 0
                           || strcmp(model_template, "chatml") == 0)) {
        *out = UM_GW_CHAT_MODEL;
        return 0;
    }
    /* A tokenizer that has the four special tokens reads this text as four tokens. Any
       other splits it into many pieces of punctuation and letters. */
    const char *probe = S_LLADA_BOS S_LLADA_HEADER_START S_LLADA_HEADER_END S_LLADA_EOT;
    json_t *req = json_pack("{s:s, s:s}", "op", UM_OP_TOKENIZE, "text", probe);
    json_t *reply = NULL;
    int rc = req ? um_gw_session_call(s, req, &reply) : UM_GW_NOMEM;
    json_decref(req);
    if (rc != 0) {
        um_gw_error_from_status(e, rc, s->up->endpoint);
        return -1;
    }
    if (strcmp(um_gw_reply_type(reply), UM_REPLY_DONE) != 0) {
        um_gw_error_from_reply(e, reply, NULL, NULL);
        json_decref(reply);
        return -1;
    }
    size_t n = json_array_size(json_object_get(reply, "tokens"));
    json_decref(reply);
    *out = n == 4 ? UM_GW_CHAT_LLADA : UM_GW_CHAT_PLAIN;
    return 0;
}

json_t *um_gw_chat_render_model(um_gw_session_t *s, const json_t *messages, um_gw_error_t *e)
{
    /* OpenAI's developer role is the system role of the model's template. */
    json_t *msgs = json_array();
    size_t i;
    const json_t *m;
    json_array_foreach(messages, i, m) {
        const char *role = json_string_value(json_object_get(m, "role"));
        json_array_append_new(msgs, json_pack("{s:s, s:O}", "role",
                                              strcmp(role, "developer") == 0 ? "system" : role,
                                              "content", json_object_get(m, "content")));
    }
    json_t *req = json_pack("{s:s, s:o}", "op", UM_OP_TOKENIZE, "messages", msgs);
    json_t *reply = NULL;
    int rc = req ? um_gw_session_call(s, req, &reply) : UM_GW_NOMEM;
    json_decref(req);
    if (rc != 0) {
        um_gw_error_from_status(e, rc, s->up->endpoint);
        return NULL;
    }
    if (strcmp(um_gw_reply_type(reply), UM_REPLY_DONE) != 0) {
        um_gw_error_from_reply(e, reply, NULL, NULL);
        json_decref(reply);
        return NULL;
    }
    json_t *text = json_incref(json_object_get(reply, "text"));
    json_decref(reply);
    if (!json_is_string(text)) {
        json_decref(text);
        um_gw_error_set(e, 502, UM_ERR_INTERNAL, NULL, "the daemon's tokenize reply for the "
                        "chat has no rendered text: update unmaskd to a version that renders "
                        "chat templates");
        return NULL;
    }
    return text;
}

/*
 * Append s without leading and trailing ASCII whitespace, as Jinja's trim filter does
 * for ASCII. NOTE: Jinja (Python's str.strip) also strips Unicode spaces such as
 * U+00A0 and U+3000; those are kept here.
 */
static void s_append_trimmed(um_gw_buf_t *b, const char *s)
{
    const char *ws = " \t\n\r\v\f";
    size_t start = 0, end = strlen(s);
    while (start < end && strchr(ws, s[start]))
        start++;
    while (end > start && strchr(ws, s[end - 1]))
        end--;
    um_gw_buf_append(b, s + start, end - start);
}

/*
 * LLaDA-8B-Instruct: the beginning-of-text token, then per message
 * "<|start_header_id|>ROLE<|end_header_id|>\n\n" + trimmed content + "<|eot_id|>", then
 * the assistant header that the model completes. "developer" (OpenAI's newer name for
 * the system role) is sent as "system", the role the model was trained with.
 */
static void s_render_llada(um_gw_buf_t *b, const json_t *messages)
{
    um_gw_buf_puts(b, S_LLADA_BOS);
    size_t i;
    const json_t *m;
    json_array_foreach(messages, i, m) {
        const char *role = json_string_value(json_object_get(m, "role"));
        if (strcmp(role, "developer") == 0)
            role = "system";
        um_gw_buf_puts(b, S_LLADA_HEADER_START);
        um_gw_buf_puts(b, role);
        um_gw_buf_puts(b, S_LLADA_HEADER_END "\n\n");
        s_append_trimmed(b, json_string_value(json_object_get(m, "content")));
        um_gw_buf_puts(b, S_LLADA_EOT);
    }
    um_gw_buf_puts(b, S_LLADA_HEADER_START "assistant" S_LLADA_HEADER_END "\n\n");
}

/*
 * A labelled transcript: system and developer messages as plain paragraphs, then
 * "User: ..." and "Assistant: ..." lines, ending with "Assistant:" for the model to
 * complete.
 */
static void s_render_plain(um_gw_buf_t *b, const json_t *messages)
{
    size_t i;
    const json_t *m;
    json_array_foreach(messages, i, m) {
        const char *role = json_string_value(json_object_get(m, "role"));
        const char *content = json_string_value(json_object_get(m, "content"));
        if (strcmp(role, "system") == 0 || strcmp(role, "developer") == 0) {
            s_append_trimmed(b, content);
            um_gw_buf_puts(b, "\n\n");
            continue;
        }
        um_gw_buf_puts(b, strcmp(role, "assistant") == 0 ? "Assistant: " : "User: ");
        s_append_trimmed(b, content);
        um_gw_buf_puts(b, "\n");
    }
    um_gw_buf_puts(b, "Assistant:");
}

char *um_gw_chat_render(um_gw_chat_template_t t, const json_t *messages, size_t *len)
{
    um_gw_buf_t b = {0};
    um_gw_buf_reserve(&b, 0);
    if (t == UM_GW_CHAT_LLADA)
        s_render_llada(&b, messages);
    else
        s_render_plain(&b, messages);
    if (b.failed) {
        um_gw_buf_free(&b);
        return NULL;
    }
    *len = b.len;
    return b.data;
}
