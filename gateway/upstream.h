/*
 * The gateway's side of the wire protocol (docs/protocol.md): one ZeroMQ DEALER
 * socket per HTTP request, connected to the daemon or a broker.
 *
 * An upstream contains the ZeroMQ context and the settings that every session shares.
 * A session is one DEALER socket with its own monitor, so that a daemon that goes
 * away shows as an error at once instead of a wait for the reply timeout. Replies
 * are matched by id: a session may have a generation and short requests (such as
 * detokenize) in flight together, and a reply for another id is kept until someone
 * asks for it.
 *
 * Threading: the upstream is shared by all threads (ZeroMQ contexts are thread-safe,
 * the rest is read-only or atomic). A session belongs to one thread.
 */
#ifndef UM_GW_UPSTREAM_H
#define UM_GW_UPSTREAM_H

#include <stdatomic.h>
#include <stddef.h>

#include <jansson.h>

/* Results of session calls beside 0. They are not in the UM_E* table because they
   describe the link to the daemon, which only the gateway has. */
#define UM_GW_STATUS_TABLE(X)                                                              \
    X(UM_GW_UNREACHABLE, -101, "no connection to the daemon within the connect timeout")   \
    X(UM_GW_LOST, -102, "the daemon closed the connection before the final reply")         \
    X(UM_GW_TIMEOUT, -103, "no reply from the daemon within the timeout")                  \
    X(UM_GW_ABORTED, -104, "stopped waiting: the HTTP client left or the gateway stops")   \
    X(UM_GW_BAD_REPLY, -105, "the daemon sent a reply that is not a JSON object with a type") \
    X(UM_GW_NOMEM, -106, "out of memory")

enum um_gw_status {
#define UM_GW_STATUS_ENUM(name, value, text) name = value,
    UM_GW_STATUS_TABLE(UM_GW_STATUS_ENUM)
#undef UM_GW_STATUS_ENUM
};

/* Return the text of a UM_GW_* status, or "unknown status" for other values. */
const char *um_gw_status_text(int status);

typedef struct um_gw_upstream {
    void *zctx;
    char endpoint[256];
    int connect_timeout_ms; /* how long a send waits for a connection */
    int reply_timeout_ms;   /* how long a wait for a reply lasts when nothing arrives */
    atomic_ulong next_id;   /* request and monitor names, unique in this process */
} um_gw_upstream_t;

/* Returns nonzero to stop a wait with UM_GW_ABORTED. Called several times a second. */
typedef int (*um_gw_abort_fn)(void *arg);

typedef struct um_gw_session {
    um_gw_upstream_t *up;
    void *sock;     /* DEALER connected to up->endpoint */
    void *monitor;  /* PAIR receiving the DEALER's connect and disconnect events */
    int connected;  /* the DEALER has seen a connection */
    int lost;       /* the connection went away after it was made */
    um_gw_abort_fn abort_fn;
    void *abort_arg;
    json_t *kept;   /* replies received for other ids, oldest first */
} um_gw_session_t;

/*
 * Create the context and check the endpoint's syntax. Returns 0, or UM_GW_NOMEM or
 * UM_GW_UNREACHABLE (an endpoint ZeroMQ cannot connect to) with err filled. The endpoint
 * is copied. Connections are made per session, so the daemon need not be up yet.
 */
int um_gw_upstream_init(um_gw_upstream_t *up, const char *endpoint, int connect_timeout_ms,
                        int reply_timeout_ms, char *err, size_t errlen);

/* Terminate the context. Every session must be closed first. */
void um_gw_upstream_fini(um_gw_upstream_t *up);

/* Write a fresh request id ("gw-<n>") into buf. */
void um_gw_upstream_new_id(um_gw_upstream_t *up, char *buf, size_t len);

/*
 * Open a session: a DEALER socket and its monitor. abort_fn may be NULL. Returns 0,
 * or UM_GW_NOMEM when ZeroMQ cannot create the sockets (the reason is logged).
 * The caller owns *out and releases it with um_gw_session_close.
 */
int um_gw_session_open(um_gw_upstream_t *up, um_gw_abort_fn abort_fn, void *abort_arg,
                       um_gw_session_t **out);

/* Close the socket without waiting for unsent messages, and free the session. */
void um_gw_session_close(um_gw_session_t **sp);

/*
 * Send one request. Waits up to the connect timeout for a connection. Returns 0,
 * UM_GW_UNREACHABLE, UM_GW_LOST, or UM_GW_NOMEM. The request is not released.
 */
int um_gw_session_send(um_gw_session_t *s, json_t *request);

/*
 * Receive the next reply whose id is the string id, waiting at most wait_ms. Replies
 * for other ids are kept for later calls. Returns 0 with *out set (caller owns it),
 * or UM_GW_TIMEOUT, UM_GW_LOST, UM_GW_ABORTED, UM_GW_BAD_REPLY.
 */
int um_gw_session_recv(um_gw_session_t *s, const char *id, int wait_ms, json_t **out);

/*
 * Send request with a fresh id (set in the object) and wait for its final reply,
 * skipping step replies, for at most the reply timeout. Returns 0 with *out set to
 * the final reply (done, error or cancelled; caller owns it), or a UM_GW_* status.
 */
int um_gw_session_call(um_gw_session_t *s, json_t *request, json_t **out);

/*
 * Ask the daemon to cancel the generate request target and wait up to a few seconds
 * for its final reply, which is dropped. Used when the HTTP client has gone, and for
 * an early stop once the completion has ended.
 */
void um_gw_session_cancel(um_gw_session_t *s, const char *target);

/* Send a cancel for target without waiting for anything. Returns 0 or a UM_GW_* status. */
int um_gw_session_cancel_async(um_gw_session_t *s, const char *target);

/* The "type" string of a reply, or "" when it has none. */
const char *um_gw_reply_type(const json_t *reply);

#endif /* UM_GW_UPSTREAM_H */
