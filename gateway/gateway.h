/*
 * unmask-gateway: an HTTP front end for unmaskd. It serves OpenAI-compatible
 * completions, a server-sent-event stream of every denoising step, and the
 * playground page, and it reaches the daemon only through the wire protocol
 * (docs/protocol.md). docs/gateway.md describes the endpoints.
 *
 * This header declares what the gateway's units share: the settings, the process-wide
 * state and the HTTP error that every endpoint reports in one JSON shape.
 *
 * Threading: libmicrohttpd runs one thread per HTTP connection. The state below is
 * read-only after startup, except the atomic stopping flag.
 */
#ifndef UM_GATEWAY_H
#define UM_GATEWAY_H

#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>

#include <jansson.h>

#include "upstream.h"

/* Defaults of the command line, also printed by --help. */
#define UM_GW_DEFAULT_LISTEN "127.0.0.1"
#define UM_GW_DEFAULT_PORT 8557
#define UM_GW_DEFAULT_MAX_BODY (1024 * 1024)
#define UM_GW_DEFAULT_MAX_CONNECTIONS 32
#define UM_GW_DEFAULT_CONNECT_TIMEOUT_MS 1000
#define UM_GW_DEFAULT_TIMEOUT_S 300

/* How long a streaming endpoint waits for the daemon's first reply before it sends the
   HTTP headers. An error found while the daemon checks the request comes well within
   this and still gets an HTTP status. A request that waits longer in the daemon's
   queue starts its stream. */
#define UM_GW_FIRST_REPLY_WAIT_MS 2000
/* Milliseconds between SSE keep-alive comments while the daemon sends nothing, so that
   proxies and clients do not close an idle stream. */
#define UM_GW_KEEPALIVE_MS 15000

/* Chat templates that turn a list of messages into one prompt (see chat.c). */
typedef enum um_gw_chat_template {
    UM_GW_CHAT_AUTO = 0, /* model when the daemon renders the model's own template; else
                            llada when its tokenizer has LLaDA's header tokens; else plain */
    UM_GW_CHAT_PLAIN,
    UM_GW_CHAT_LLADA,
    UM_GW_CHAT_MODEL,    /* the daemon renders the model's chat template */
} um_gw_chat_template_t;

typedef struct um_gw_config {
    const char *endpoint;   /* ZeroMQ endpoint of the daemon or broker */
    const char *listen;     /* numeric IPv4 or IPv6 address, or "localhost" */
    int port;               /* 0: the system picks a free port */
    const char *model_name; /* NULL: the base name of the daemon's model folder */
    um_gw_chat_template_t chat_template;
    size_t max_body;        /* bytes */
    int max_connections;
    int connect_timeout_ms;
    int timeout_ms;         /* a request fails after this long without a reply */
} um_gw_config_t;

typedef struct um_gw {
    um_gw_config_t cfg;
    um_gw_upstream_t up;
    atomic_int stopping;    /* set on SIGINT or SIGTERM, so that waits end with UM_GW_ABORTED */
    atomic_int active;      /* HTTP requests between their headers and their completion */
    struct MHD_Daemon *mhd;
    uint16_t port;          /* the port actually bound */
} um_gw_t;

/* ------------------------------------------------------------------------- */
/* Errors                                                                    */

/*
 * An HTTP error. The body is OpenAI's shape on every endpoint:
 * {"error": {"message", "type", "param", "code"}}.
 */
typedef struct um_gw_error {
    int status;        /* HTTP status */
    char code[48];     /* the daemon's error code, or a gateway code such as "daemon_unavailable" */
    char param[128];   /* the request field at fault, "" for none */
    char message[1024];
    int retry_after_s; /* > 0: send a Retry-After header */
} um_gw_error_t;

/* Fill e. The message states what failed, on which value, and what to do. */
void um_gw_error_set(um_gw_error_t *e, int status, const char *code, const char *param,
                     const char *fmt, ...) __attribute__((format(printf, 5, 6)));

/* Build the error's JSON body, which the caller owns. */
json_t *um_gw_error_json(const um_gw_error_t *e);

/* Fill e for a UM_GW_* status from the upstream (503, 502, 504 or 500). */
void um_gw_error_from_status(um_gw_error_t *e, int status, const char *endpoint);

/*
 * Renames a daemon field to the HTTP request's field, or returns NULL to keep it.
 * The OpenAI endpoints send max_tokens as gen_length, for example.
 */
typedef const char *(*um_gw_field_map_fn)(const char *daemon_field, void *arg);

/*
 * Fill e from a final reply that is not done: an error reply (status by its code) or a
 * cancelled reply (503 during a daemon shutdown). map may be NULL.
 */
void um_gw_error_from_reply(um_gw_error_t *e, const json_t *reply, um_gw_field_map_fn map,
                            void *map_arg);

/* ------------------------------------------------------------------------- */
/* Requests to the daemon shared by the endpoints                            */

/*
 * Fetch the daemon's info reply on session s. Returns the reply (caller owns it), or
 * NULL with e filled.
 */
json_t *um_gw_fetch_info(um_gw_session_t *s, um_gw_error_t *e);

/*
 * The model id the HTTP API reports: --model-name, or the last part of the model
 * folder in info. Writes into buf and returns it.
 */
const char *um_gw_model_id(const um_gw_t *gw, const json_t *info, char *buf, size_t len);

/* ------------------------------------------------------------------------- */
/* The playground page, embedded at build time from gateway/page.html        */

extern const unsigned char um_gw_page_html[];
extern const size_t um_gw_page_html_len;

#endif /* UM_GATEWAY_H */
