/*
 * Chat templates: turning the messages of a request into the prompt text the model was
 * tuned on. Models ship their template as Jinja in tokenizer_config.json. unmaskd has no
 * Jinja engine, so it recognises the two template families that masked-diffusion models
 * ship and renders them in C:
 *
 *   headers  LLaMA-3 style, as LLaDA-8B-Instruct and LLaDA 1.5: the beginning-of-text
 *            token, then per message "<|start_header_id|>ROLE<|end_header_id|>\n\n",
 *            the content trimmed, "<|eot_id|>"; then the assistant header.
 *   chatml   ChatML, as Dream-v0-Instruct (Qwen2): per message
 *            "<|im_start|>ROLE\nCONTENT<|im_end|>\n", then "<|im_start|>assistant\n";
 *            the template's default system message goes first when the messages have
 *            none.
 *
 * Any other template is reported as unsupported, and requests with messages get an
 * error that says to render the prompt themselves. docs/protocol.md has the rules.
 *
 * Threading: a loaded template is read-only and may be shared.
 */
#ifndef UM_CHAT_H
#define UM_CHAT_H

#include <stddef.h>

#include <jansson.h>

typedef enum um_chat_kind {
    UM_CHAT_NONE = 0,    /* the model folder has no chat template */
    UM_CHAT_HEADERS,     /* LLaMA-3-style headers */
    UM_CHAT_CHATML,
    UM_CHAT_UNSUPPORTED, /* a template unmaskd cannot render */
} um_chat_kind_t;

typedef struct um_chat_template {
    um_chat_kind_t kind;
    char *bos;            /* headers: text put first (the template's bos_token), or NULL */
    int trim;             /* headers: contents are trimmed of ASCII white space */
    char *default_system; /* chatml: system message used when none is given, or NULL */
    char head[64];        /* unsupported: the template's first characters, for messages */
} um_chat_template_t;

/*
 * Read the chat template of the model folder's tokenizer_config.json into t. A folder
 * without that file or without a chat_template gives UM_CHAT_NONE. Returns 0, or a UM_E*
 * code with a message in err when the file exists but cannot be read as JSON.
 */
int um_chat_load(const char *model_dir, um_chat_template_t *t, char *err, size_t errlen);

void um_chat_free(um_chat_template_t *t);

/* "headers", "chatml", "unsupported", or NULL for UM_CHAT_NONE. */
const char *um_chat_kind_name(um_chat_kind_t kind);

/*
 * Render messages (an array of {"role", "content"} string objects, checked by the
 * request parser) with t and the generation prompt for the assistant's turn. Returns 0
 * with a malloc'ed text in *out and its length in *len, or UM_EUNSUPPORTED (no template,
 * or one unmaskd cannot render) or UM_ENOMEM with a message in err.
 */
int um_chat_render(const um_chat_template_t *t, const json_t *messages, char **out,
                   size_t *len, char *err, size_t errlen);

#endif /* UM_CHAT_H */
