/*
 * The broker's state, shared by its three units: broker.c (sockets, main loop,
 * heartbeats, shutdown, the request table), clients.c (the front end) and workers.c
 * (the back end). Everything here belongs to the broker's one thread.
 */
#ifndef UM_BROKER_INTERNAL_H
#define UM_BROKER_INTERNAL_H

#include <stdint.h>

#include <jansson.h>

#include "broker.h"
#include "request.h"
#include "zap.h"

/* Buckets of the route hash table; a power of two. */
#define UM_BK_BUCKETS 1024
/* Bytes of a route frame: the request's sequence number, big-endian. */
#define UM_BK_ROUTE_LEN 8
/* Messages read from one socket before the loop looks at the other one and the clock. */
#define UM_BK_BATCH 256

/*
 * A peer's address on a ROUTER socket: its routing id, and for clients whether the
 * request had an empty delimiter frame (REQ sockets add one), which replies repeat.
 */
typedef struct um_bk_peer {
    unsigned char id[256]; /* ZeroMQ routing ids are 1 to 255 bytes */
    size_t len;
    int delimiter;
} um_bk_peer_t;

/* A client's cancel sent on to the target's worker, waiting for the worker's reply. */
typedef struct um_bk_cancel {
    struct um_bk_cancel *next;
    um_bk_peer_t client;
    json_t *id; /* the cancel request's own id, or NULL */
} um_bk_cancel_t;

struct um_bk_worker;

/*
 * A request sent to a worker, from dispatch until its final reply has been relayed
 * and every cancel sent on for it has its reply.
 */
typedef struct um_bk_request {
    uint64_t route;                  /* key of the table; new for every dispatch */
    struct um_bk_request *hash_next;
    struct um_bk_request *prev, *next; /* all requests, oldest first */
    struct um_bk_worker *worker;     /* where the current route was sent */
    int counted;                     /* it counts in worker's generating or other */
    um_bk_peer_t client;
    json_t *id;                      /* the client's id, or NULL */
    char id_text[80];                /* the id for log lines */
    int generate;                    /* counts against the worker's capacity */
    int retry;                       /* the client allows one resend */
    int retried;
    int streamed;                    /* steps relayed so far */
    int cancel;                      /* a cancel was sent on for it */
    int done;                        /* the final reply was relayed */
    char *model;                     /* the requested model, or NULL */
    char *payload;                   /* the request as sent; kept until the worker's first
                                        reply shows it was read, for a resend */
    size_t payload_len;
    um_bk_cancel_t *cancels;         /* cancels waiting for the worker, oldest first */
    double t_accept_ms;
} um_bk_request_t;

/* A registered worker. */
typedef struct um_bk_worker {
    struct um_bk_worker *next;
    um_bk_peer_t peer;   /* its routing id on the back end */
    char name[160];      /* host:pid */
    char host[128];
    long long pid;
    json_t *models;      /* array of model names */
    json_t *info;        /* its info reply, without id and type */
    size_t capacity;     /* generate requests it accepts at once */
    size_t generating;   /* generate requests sent to it without a final reply yet */
    size_t other;        /* other requests sent to it without a final reply yet */
    int draining;        /* it announced shutdown: it gets no new requests */
    double t_ready_ms;
    double t_seen_ms;    /* last message from it */
    double t_assigned_ms; /* last request sent to it; ties go to the longest idle */
    uint64_t finished;   /* final replies relayed from it */
} um_bk_worker_t;

struct um_broker {
    um_broker_config_t cfg;
    char frontend[256];  /* as bound */
    char backend[256];
    unsigned long front_inode; /* inodes of the ipc socket files bound, or 0 */
    unsigned long back_inode;
    void *zctx;
    void *front;         /* ROUTER for clients */
    void *back;          /* ROUTER for workers */
    void *front_monitor; /* PAIRs receiving the connection events of front and back */
    void *back_monitor;
    unsigned long handshake_failures;
    um_zap_t *zap;

    um_bk_worker_t *workers; /* registered, in registration order */
    json_t *models_seen;     /* object: every model a worker ever served -> true */

    um_bk_request_t *buckets[UM_BK_BUCKETS];
    um_bk_request_t *head, *tail;
    size_t n_requests;
    uint64_t next_route;

    int stopping;
    double t_start_ms;
    double t_heartbeat_ms;   /* heartbeats were last sent to the workers */
    double t_backlog_ms;     /* since when back-end messages wait unread; 0: none */

    /* Counters for info. */
    uint64_t n_dispatched;
    uint64_t n_retried;
    uint64_t n_rerouted;     /* resent because their worker left before reading them */
    uint64_t n_lost_requests;
    uint64_t n_lost_workers;
    uint64_t n_late;         /* replies dropped because their request had ended */
};

/* ------------------------------------------------------------------------- */
/* broker.c: time, sending, the request table                                */

double um_bk_now_ms(void);

/* Send a reply frame to a client; ZeroMQ drops it when the client has gone. */
void um_bk_send_client(um_broker_t *b, const um_bk_peer_t *client, const void *data, size_t len);

/* Serialize reply (releasing it) and send it to client. */
void um_bk_send_client_json(um_broker_t *b, const um_bk_peer_t *client, json_t *reply);

/* Send an error reply and log it at warn with the request id. */
void um_bk_send_error(um_broker_t *b, const um_bk_peer_t *client, const json_t *id,
                      const um_req_error_t *err);

/* Send [route, data] to worker w. Returns 0, or -1 with errno set. */
int um_bk_send_worker(um_broker_t *b, const struct um_bk_worker *w, uint64_t route,
                      const void *data, size_t len);

/* Send one control message (released) to a worker. */
void um_bk_send_ctl(um_broker_t *b, const um_bk_peer_t *worker, json_t *ctl);

/* A control message {"ctl": name} with an optional "reason". */
json_t *um_bk_ctl(const char *name, const char *reason);

um_bk_request_t *um_bk_request_find(um_broker_t *b, uint64_t route);

/* Add r to the list of requests (not yet to the route table). */
void um_bk_request_add(um_broker_t *b, um_bk_request_t *r);

/* Give r a fresh route and enter it in the route table. */
void um_bk_request_new_route(um_broker_t *b, um_bk_request_t *r);

/* Give back r's place in its worker's counts. */
void um_bk_request_release(um_bk_request_t *r);

/* Remove r from the table and the list and free it. */
void um_bk_request_free(um_broker_t *b, um_bk_request_t *r);

/* Reply done to each waiting cancel of r (r has ended) and free the records. */
void um_bk_request_answer_cancels(um_broker_t *b, um_bk_request_t *r);

/* ------------------------------------------------------------------------- */
/* clients.c                                                                 */

/* Read and handle up to UM_BK_BATCH messages from the front end. */
void um_bk_clients_read(um_broker_t *b);

/*
 * Send r to the least loaded registered worker that serves r->model and is not
 * draining, under a fresh route. Returns 0, or -1 with err filled (busy, unknown_model,
 * invalid_request, or internal when the send fails).
 */
int um_bk_dispatch(um_broker_t *b, um_bk_request_t *r, um_req_error_t *err);

/* ------------------------------------------------------------------------- */
/* workers.c                                                                 */

/* Read and handle up to UM_BK_BATCH messages from the back end. */
void um_bk_workers_read(um_broker_t *b);

/* Send heartbeats when due and declare silent workers lost. */
void um_bk_workers_tick(um_broker_t *b, double now_ms);

/* The milliseconds until um_bk_workers_tick has work. */
int um_bk_workers_timeout_ms(const um_broker_t *b, double now_ms);

/* Whether w serves model. */
int um_bk_worker_serves(const um_bk_worker_t *w, const char *model);

/* Tell every worker to let go of its requests and forget them all (shutdown). */
void um_bk_workers_release_all(um_broker_t *b);

#endif /* UM_BROKER_INTERNAL_H */
