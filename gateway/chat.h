/*
 * Chat templates: turn a list of chat messages into the one prompt a generate
 * request takes. No Jinja engine is involved. The llada template is written out in C
 * after the chat_template of LLaDA-8B-Instruct's tokenizer_config.json, and the plain
 * template is a labelled transcript for models without one (docs/gateway.md shows
 * both).
 *
 * Threading: no shared state.
 */
#ifndef UM_GW_CHAT_H
#define UM_GW_CHAT_H

#include <stddef.h>

#include <jansson.h>

#include "gateway.h"

/* Parse "auto", "model", "plain" or "llada". Returns 0, or -1 for another name. */
int um_gw_chat_template_parse(const char *name, um_gw_chat_template_t *out);

const char *um_gw_chat_template_name(um_gw_chat_template_t t);

/*
 * Resolve UM_GW_CHAT_AUTO on session s. It becomes model when model_template (the
 * chat_template the daemon's info reports, or NULL) is one the daemon renders. Else it
 * becomes llada when the daemon's tokenizer reads each of the llada template's special
 * tokens as one token, and plain otherwise. Other templates are returned unchanged.
 * Returns 0, or -1 with e filled when the daemon fails.
 */
int um_gw_chat_template_resolve(um_gw_session_t *s, um_gw_chat_template_t t,
                                const char *model_template, um_gw_chat_template_t *out,
                                um_gw_error_t *e);

/*
 * Have the daemon render messages with the model's chat template (a tokenize request
 * with messages). Returns the rendered text as a new JSON string, or NULL with e filled.
 */
json_t *um_gw_chat_render_model(um_gw_session_t *s, const json_t *messages,
                                um_gw_error_t *e);

/*
 * Render messages, an array of {"role": string, "content": string} objects already
 * checked by the caller, with template t (llada or plain). Returns a malloc'ed
 * NUL-terminated prompt with its length in *len, or NULL when out of memory.
 */
char *um_gw_chat_render(um_gw_chat_template_t t, const json_t *messages, size_t *len);

#endif /* UM_GW_CHAT_H */
