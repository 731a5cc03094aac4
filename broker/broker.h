/*
 * unmask-broker: a ZeroMQ broker between unmaskd's clients and many unmaskd workers
 * (docs/deployment.md, docs/worker-protocol.md).
 *
 * Clients connect DEALER or REQ sockets to the front-end ROUTER and speak the wire
 * protocol of docs/protocol.md unchanged. Workers (unmaskd --connect) connect DEALER
 * sockets to the back-end ROUTER, register with their models and capacity, and
 * exchange heartbeats with the broker. The broker sends each request to the least
 * loaded live worker that serves the requested model, relays its step and final
 * replies, answers info and health itself, forwards cancel, and gives every request
 * it accepted exactly one final reply, also when its worker dies.
 *
 * Threading: um_broker_new, um_broker_run and um_broker_destroy are called from one
 * thread, which owns both sockets and all state. With CURVE a second thread runs the
 * ZAP handler (zap.h).
 */
#ifndef UM_BROKER_H
#define UM_BROKER_H

#include <stddef.h>

#include "curve.h"

/* Default heartbeat interval in milliseconds, and heartbeats a peer may miss. */
#define UM_BROKER_DEFAULT_HEARTBEAT_MS 1000
#define UM_BROKER_DEFAULT_LIVENESS 3
/* Default size limit of one request frame, in bytes (the daemon's default). */
#define UM_BROKER_DEFAULT_MAX_REQUEST (1024 * 1024)

typedef struct um_broker_config {
    const char *frontend;           /* endpoint that clients connect to */
    const char *backend;            /* endpoint that workers connect to */
    int heartbeat_ms;               /* heartbeat interval, both ways */
    int liveness;                   /* a peer silent for heartbeat_ms * liveness is dead */
    const char *default_model;      /* model of requests without "model"; NULL: any
                                       worker while all serve the same models */
    size_t max_request_bytes;       /* larger request frames get an error reply */
    const um_curve_keypair_t *curve; /* broker key pair for tcp endpoints; NULL: none */
    const char *curve_clients;      /* folder of client .pub keys; NULL: any client key */
    const char *curve_workers;      /* folder of worker .pub keys; required with curve
                                       when the back end is tcp */
    int insecure;                   /* allow non-loopback tcp endpoints without CURVE */
    int stop_fd;                    /* turns readable to request shutdown; -1 for none */
} um_broker_config_t;

typedef struct um_broker um_broker_t;

/*
 * Check the configuration, start the ZAP handler when CURVE is on, and bind both
 * endpoints. Returns 0 and sets *out, or -1 with a message in err (an endpoint that
 * cannot be bound, a non-loopback tcp endpoint without CURVE, unreadable keys).
 */
int um_broker_new(um_broker_t **out, const um_broker_config_t *cfg, char *err, size_t errlen);

/*
 * Serve until cfg->stop_fd turns readable. Shutdown gives every request in flight a
 * "cancelled" final reply with reason "shutdown" and tells every worker to let go of
 * its requests. Returns 0, or -1 when polling fails.
 */
int um_broker_run(um_broker_t *b);

/* The endpoints as bound (a tcp port of 0 resolved); valid until destroy. */
const char *um_broker_frontend(const um_broker_t *b);
const char *um_broker_backend(const um_broker_t *b);

/* Close the sockets, waiting up to one second to deliver replies, and free the broker;
   sets *b to NULL. A NULL *b is ignored. */
void um_broker_destroy(um_broker_t **b);

#endif /* UM_BROKER_H */
