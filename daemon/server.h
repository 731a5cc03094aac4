/*
 * The ZeroMQ server: a ROUTER socket that clients reach, and one worker thread
 * that owns the model and runs one generation at a time.
 *
 * Threading: um_server_new, um_server_run and um_server_destroy are called from
 * one thread (the main thread), which owns the ROUTER socket, the queue of waiting
 * generate requests and the main tokenizer, and replies to the cheap ops itself. The
 * worker thread is reached only through an inproc PAIR socket: it receives jobs,
 * and sends back step and final replies that the main thread forwards to clients.
 */
#ifndef UM_SERVER_H
#define UM_SERVER_H

#include <stddef.h>
#include <stdint.h>

#include "curve.h"
#include "model.h"
#include "plugins.h"
#include "tokenizer.h"

/* Default bound on generate requests waiting behind the running one. */
#define UM_SERVER_DEFAULT_MAX_QUEUE 64
/* Default and largest number of generate requests that run together in lockstep. */
#define UM_SERVER_DEFAULT_MAX_BATCH 8
#define UM_SERVER_MAX_BATCH 256
/* Default size limit of one request frame, in bytes. */
#define UM_SERVER_DEFAULT_MAX_REQUEST (1024 * 1024)

typedef struct um_server_config {
    const char *endpoint;     /* ZeroMQ endpoint to bind, e.g. tcp://127.0.0.1:5557 */
    size_t max_queue;         /* waiting generate requests; past it the reply is "busy" */
    int32_t max_batch;        /* generate requests whose steps share one forward pass, in
                                 [1, UM_SERVER_MAX_BATCH]; 0: UM_SERVER_DEFAULT_MAX_BATCH */
    size_t max_request_bytes; /* larger request frames get an error reply */
    int threads;              /* OpenMP threads for the worker's forward passes; 0: default */
    const char *plugin_path;  /* colon-separated plugin folders rescanned when a request
                                 names an unknown remasking plugin; NULL: never rescan */
    int stop_fd;              /* file descriptor that turns readable when a signal arrived;
                                 it carries one byte per signal, the signal's number.
                                 SIGHUP calls on_hangup, any other starts the shutdown.
                                 -1 for none */
    void (*on_hangup)(void);  /* called on the main thread for SIGHUP; NULL: ignored */
    int shutdown_grace_ms;    /* how long a shutdown lets accepted generate requests run
                                 before it cancels them; 0: cancel at once */
    /* Per-request limits, checked before a generate request is queued. 0 stands for
       the model's max_sequence_length in the first two and for no limit in max_steps,
       since a generation never runs more steps than it has masks to fill. */
    int32_t max_prompt_tokens;
    int32_t max_gen_length;
    int32_t max_steps;
    /* Bind mode: CURVE on the ROUTER socket (docs/security.md). */
    const um_curve_keypair_t *curve; /* the daemon's key pair; NULL: no CURVE */
    const char *curve_clients;       /* folder of the allowed clients' .pub files; NULL:
                                        any client that has the daemon's public key */
    /* Worker mode, read by um_server_new only (docs/worker-protocol.md). */
    const char *connect;      /* a broker's back end to register with instead of binding
                                 endpoint; NULL: bind */
    const char *model_name;   /* name the model is served under; NULL: the folder's name */
    const char *curve_server_key; /* the broker's Z85 public key; NULL: no CURVE */
    const char *curve_public_key; /* this worker's Z85 key pair, with curve_server_key */
    const char *curve_secret_key;
} um_server_config_t;

typedef struct um_server um_server_t;

/*
 * Bind the endpoint, or in worker mode connect to the broker and register, and start
 * the worker thread (synchronous handshake). The server
 * borrows model, plugins and both tokenizers until um_server_destroy: tok serves
 * the main thread, tok_worker the worker, so the two never share tokenizer state.
 * The main thread may add plugins to the registry (rescans, see plugin_path).
 * Returns 0 and sets *out, or a negative UM_E* code with a message in err (the
 * endpoint cannot be bound, out of memory, the thread cannot start).
 */
int um_server_new(um_server_t **out, const um_server_config_t *cfg, um_model_t *model,
                  um_plugin_registry_t *plugins, um_tokenizer_t *tok,
                  um_tokenizer_t *tok_worker, char *err, size_t errlen);

/*
 * Serve until a stop signal arrives on cfg->stop_fd. Shutdown rejects new generate
 * requests with "busy" and lets the accepted ones run for up to shutdown_grace_ms (a
 * second stop signal ends the grace at once). Then it replies to every waiting generate
 * request with a final "cancelled", cancels the running one and forwards its final
 * reply, and stops the worker thread. In worker mode it then sends its broker
 * "disconnect".
 * Returns 0, or a negative UM_E* code when polling fails, or UM_EUNSUPPORTED when the
 * broker rejected this worker.
 */
int um_server_run(um_server_t *srv);

/* The endpoint actually bound (a tcp port of 0 is resolved); valid until destroy. */
const char *um_server_endpoint(const um_server_t *srv);

/*
 * Stop the worker if it still runs and close the sockets, waiting up to one second
 * to flush replies. Then free the server and set *srv to NULL. A NULL *srv is ignored.
 */
void um_server_destroy(um_server_t **srv);

#endif /* UM_SERVER_H */
