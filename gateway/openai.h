/*
 * OpenAI-compatible completions: POST /v1/completions and POST /v1/chat/completions.
 *
 * A request goes through three stages. Parsing checks the JSON body on its own:
 * every field's type, the settings the diffusion sampler cannot honour (they are
 * rejected, not ignored), and the prompts or messages. Preparing asks the daemon
 * for its info, renders chat messages with a chat template, and counts prompt tokens
 * to pick gen_length when max_tokens is absent. Running sends one generate request
 * per choice, one after the other, and builds either the whole response or its
 * stream of server-sent events. docs/gateway.md lists the field mapping.
 *
 * Threading: a request belongs to the HTTP connection's thread.
 */
#ifndef UM_GW_OPENAI_H
#define UM_GW_OPENAI_H

#include <stddef.h>
#include <stdint.h>
#include <time.h>

#include <jansson.h>

#include "buf.h"
#include "completion.h"
#include "gateway.h"

/* Most completions one request may ask for (n times the number of prompts). */
#define UM_GW_MAX_CHOICES 16
/* gen_length when max_tokens is absent, cut to what the model's context leaves. */
#define UM_GW_DEFAULT_GEN_LENGTH 64

typedef enum um_gw_oai_kind {
    UM_GW_OAI_COMPLETION, /* /v1/completions */
    UM_GW_OAI_CHAT,       /* /v1/chat/completions */
} um_gw_oai_kind_t;

typedef struct um_gw_oai {
    const um_gw_t *gw;
    um_gw_oai_kind_t kind;
    json_t *body;                 /* the request body, owned; the fields below borrow from it */

    /* From parsing */
    json_t *prompts;              /* (n_prompts) strings: the completion prompts, or after
                                     preparing the rendered chat prompt; owned */
    json_t *messages;             /* chat: [{"role", "content"}] with text content; owned */
    int n;                        /* completions per prompt */
    int stream;
    int include_usage;            /* stream_options.include_usage */
    int echo;                     /* completions: put the prompt in front of the text */
    const char *stops[UM_GW_MAX_STOPS];
    int n_stops;
    const char *max_tokens_field; /* "max_tokens" or "max_completion_tokens" as sent */
    json_int_t max_tokens;        /* -1 when absent */
    int has_seed;
    json_int_t seed;
    json_t *daemon_fields;        /* sampler fields passed through to generate; owned */

    /* From preparing */
    char model[128];
    um_gw_chat_template_t chat_template; /* the resolved template, for chat */
    int32_t *prompt_tokens;       /* (n_prompts) */
    int32_t *gen_length;          /* (n_prompts) */

    /* From running */
    char id[40];                  /* "cmpl-..." or "chatcmpl-..." */
    time_t created;
    int64_t usage_prompt;
    int64_t usage_completion;
    json_t *extra;                /* per-choice diffusion details for the "unmaskd" field */

    /* Streaming */
    um_gw_completion_t c;         /* the running choice */
    int choice;                   /* index of the running or next choice */
    int running;                  /* c has started and has not ended */
    int head_sent;                /* the running choice's first chunk went out */
    int stream_over;
    double last_reply_ms;
} um_gw_oai_t;

/*
 * Parse and check a request body of len bytes for kind. Returns 0, or -1 with e filled
 * (400 naming the field). Call um_gw_oai_clear afterwards in both cases.
 */
int um_gw_oai_parse(um_gw_oai_t *o, const um_gw_t *gw, um_gw_oai_kind_t kind,
                    const char *body, size_t len, um_gw_error_t *e);

/* Ask the daemon what preparing needs (see the top of this file). Returns 0 or -1 with e. */
int um_gw_oai_prepare(um_gw_oai_t *o, um_gw_session_t *s, um_gw_error_t *e);

/* Run every choice and build the whole response. Returns it (caller owns), or NULL with e. */
json_t *um_gw_oai_run(um_gw_oai_t *o, um_gw_session_t *s, um_gw_error_t *e);

/*
 * Start streaming: send the first choice and wait briefly for the daemon's first reply,
 * so that an error in the request still gets an HTTP status. Returns 0, or -1 with e.
 */
int um_gw_oai_stream_begin(um_gw_oai_t *o, um_gw_session_t *s, um_gw_error_t *e);

/*
 * Append the next server-sent events to out, blocking until there is something to
 * send (a chunk, or a keep-alive comment). Returns 1 while the stream goes on and 0
 * after its last event ("data: [DONE]", or an error event).
 */
int um_gw_oai_stream_pump(um_gw_oai_t *o, um_gw_session_t *s, um_gw_buf_t *out);

/* Release everything, cancelling a choice still running on the daemon. */
void um_gw_oai_clear(um_gw_oai_t *o);

/* The number of choices, n times the number of prompts. */
int um_gw_oai_choices(const um_gw_oai_t *o);

/*
 * The closest of names to word within two edits, or NULL. Used to suggest a field
 * name in "unknown field" errors.
 */
const char *um_gw_suggest(const char *word, const char *const *names, size_t n);

#endif /* UM_GW_OPENAI_H */
