/*
 * The broker's sockets, main loop, shutdown and request table (see broker.h).
 *
 * The loop is a zmq_poll over the front-end ROUTER, the back-end ROUTER and the stop
 * descriptor. It cannot be zmq_proxy: the broker must read every message to choose a
 * worker, track final replies and reply for dead workers, which a proxy never does.
 *
 * Requests in flight live in one table keyed by route, the 8-byte frame that the
 * broker puts before a request on the back end and that the worker echoes before
 * every reply. A route is new for every dispatch, so a reply from a worker that the
 * request is no longer assigned to finds nothing and is dropped.
 */
#include "config.h"

#include "broker_internal.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include <zmq.h>

#include <unmaskd/protocol.h>

#include "log.h"

/* A request frame past this multiple of the limit makes ZeroMQ drop the connection. */
#define S_HARD_LIMIT_FACTOR 16
/* Milliseconds that closing a socket waits to deliver the last replies. */
#define S_LINGER_MS 1000

/* ------------------------------------------------------------------------- */
/* Time and sending                                                          */

double um_bk_now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1e3 + (double)ts.tv_nsec / 1e6;
}

static int s_send(void *sock, const void *data, size_t len, int flags)
{
    int rc;
    do
        rc = zmq_send(sock, data, len, flags);
    while (rc < 0 && errno == EINTR);
    return rc;
}

void um_bk_send_client(um_broker_t *b, const um_bk_peer_t *client, const void *data, size_t len)
{
    if (s_send(b->front, client->id, client->len, ZMQ_SNDMORE) < 0
        || (client->delimiter && s_send(b->front, "", 0, ZMQ_SNDMORE) < 0)
        || s_send(b->front, data, len, 0) < 0)
        um_warn("broker", "sending a %zu-byte reply to a client failed: %s", len,
                zmq_strerror(errno));
}

/* The reply used when a reply cannot be built, so the request still gets its final. */
static const char s_oom_reply[] =
    "{\"id\":null,\"type\":\"error\",\"error\":{\"code\":\"internal\",\"field\":null,"
    "\"message\":\"out of memory while building the reply: the broker is short of memory\"}}";

void um_bk_send_client_json(um_broker_t *b, const um_bk_peer_t *client, json_t *reply)
{
    size_t len = 0;
    char *text = um_reply_dump(reply, &len);
    if (!text) {
        um_error("broker", "out of memory while serializing a reply");
        um_bk_send_client(b, client, s_oom_reply, sizeof s_oom_reply - 1);
        return;
    }
    um_bk_send_client(b, client, text, len);
    free(text);
}

void um_bk_send_error(um_broker_t *b, const um_bk_peer_t *client, const json_t *id,
                      const um_req_error_t *err)
{
    char idbuf[80];
    um_warn("broker", "request %s: %s%s%s: %s", um_request_id_text(id, idbuf, sizeof idbuf),
            err->code, err->field[0] ? " on " : "", err->field, err->message);
    um_bk_send_client_json(b, client, um_reply_error(id, err));
}

json_t *um_bk_ctl(const char *name, const char *reason)
{
    json_t *m = json_pack("{s:s}", "ctl", name);
    if (m && reason)
        json_object_set_new(m, "reason", json_string(reason));
    return m;
}

int um_bk_send_worker(um_broker_t *b, const um_bk_worker_t *w, uint64_t route, const void *data,
                      size_t len)
{
    unsigned char frame[UM_BK_ROUTE_LEN];
    for (int i = 0; i < UM_BK_ROUTE_LEN; i++)
        frame[i] = (unsigned char)(route >> (8 * (UM_BK_ROUTE_LEN - 1 - i)));
    if (s_send(b->back, w->peer.id, w->peer.len, ZMQ_SNDMORE) < 0
        || s_send(b->back, frame, sizeof frame, ZMQ_SNDMORE) < 0
        || s_send(b->back, data, len, 0) < 0)
        return -1;
    return 0;
}

void um_bk_send_ctl(um_broker_t *b, const um_bk_peer_t *worker, json_t *ctl)
{
    char *text = ctl ? json_dumps(ctl, JSON_COMPACT) : NULL;
    json_decref(ctl);
    if (!text) {
        um_error("broker", "out of memory while building a control message");
        return;
    }
    if (s_send(b->back, worker->id, worker->len, ZMQ_SNDMORE) < 0
        || s_send(b->back, text, strlen(text), 0) < 0)
        um_warn("broker", "sending a control message to a worker failed: %s",
                zmq_strerror(errno));
    free(text);
}

/* ------------------------------------------------------------------------- */
/* The request table                                                         */

static size_t s_bucket(uint64_t route)
{
    return (size_t)(route & (UM_BK_BUCKETS - 1));
}

um_bk_request_t *um_bk_request_find(um_broker_t *b, uint64_t route)
{
    for (um_bk_request_t *r = b->buckets[s_bucket(route)]; r; r = r->hash_next)
        if (r->route == route)
            return r;
    return NULL;
}

static void s_hash_remove(um_broker_t *b, um_bk_request_t *r)
{
    if (r->route == 0)
        return;
    um_bk_request_t **p = &b->buckets[s_bucket(r->route)];
    while (*p && *p != r)
        p = &(*p)->hash_next;
    if (*p)
        *p = r->hash_next;
    r->hash_next = NULL;
    r->route = 0;
}

void um_bk_request_add(um_broker_t *b, um_bk_request_t *r)
{
    r->prev = b->tail;
    r->next = NULL;
    if (b->tail)
        b->tail->next = r;
    else
        b->head = r;
    b->tail = r;
    b->n_requests++;
}

void um_bk_request_new_route(um_broker_t *b, um_bk_request_t *r)
{
    s_hash_remove(b, r);
    r->route = ++b->next_route;
    size_t k = s_bucket(r->route);
    r->hash_next = b->buckets[k];
    b->buckets[k] = r;
}

void um_bk_request_release(um_bk_request_t *r)
{
    if (!r->counted || !r->worker)
        return;
    if (r->generate)
        r->worker->generating--;
    else
        r->worker->other--;
    r->counted = 0;
}

void um_bk_request_answer_cancels(um_broker_t *b, um_bk_request_t *r)
{
    while (r->cancels) {
        um_bk_cancel_t *c = r->cancels;
        r->cancels = c->next;
        um_bk_send_client_json(b, &c->client, um_reply_new(c->id, UM_REPLY_DONE));
        json_decref(c->id);
        free(c);
    }
}

void um_bk_request_free(um_broker_t *b, um_bk_request_t *r)
{
    if (!r)
        return;
    um_bk_request_release(r);
    s_hash_remove(b, r);
    if (r->prev)
        r->prev->next = r->next;
    else
        b->head = r->next;
    if (r->next)
        r->next->prev = r->prev;
    else
        b->tail = r->prev;
    b->n_requests--;
    while (r->cancels) {
        um_bk_cancel_t *c = r->cancels;
        r->cancels = c->next;
        json_decref(c->id);
        free(c);
    }
    json_decref(r->id);
    free(r->model);
    free(r->payload);
    free(r);
}

/* ------------------------------------------------------------------------- */
/* Main loop                                                                 */

/* ------------------------------------------------------------------------- */
/* Connection events                                                         */

/* Handshake failures logged one by one before only every S_LOG_EVERY-th is. */
#define S_LOG_FIRST 20
#define S_LOG_EVERY 100

/* Watch sock's connections on a new PAIR socket; NULL when that fails (logged). */
static void *s_monitor(um_broker_t *b, void *sock, const char *side)
{
    char endpoint[96];
    snprintf(endpoint, sizeof endpoint, "inproc://unmask-broker-%s-%p", side, (void *)b);
    void *pair = NULL;
    if (zmq_socket_monitor(sock, endpoint, UM_CURVE_EVENTS) == 0
        && (pair = zmq_socket(b->zctx, ZMQ_PAIR)) != NULL && zmq_connect(pair, endpoint) == 0)
        return pair;
    um_warn("broker", "cannot watch the connections of the %s: %s: failed handshakes will "
            "not be logged", side, zmq_strerror(errno));
    if (pair)
        zmq_close(pair);
    return NULL;
}

/* Log the waiting connection events of one side; failed handshakes at warn. */
static void s_read_events(um_broker_t *b, void *monitor, const char *side)
{
    int event, failed;
    char text[256];
    while (um_curve_read_event(monitor, &event, &failed, text, sizeof text)) {
        if (!failed) {
            um_debug("broker", "%s: %s", side, text);
            continue;
        }
        b->handshake_failures++;
        if (b->handshake_failures <= S_LOG_FIRST || b->handshake_failures % S_LOG_EVERY == 0)
            um_warn("broker", "%s: %s (%lu failed so far): check that the peer uses this "
                    "broker's public key and that its .pub file is in %s", side, text,
                    b->handshake_failures,
                    strcmp(side, "back end") == 0 ? "--curve-workers" : "--curve-clients");
    }
}

/* Give every request in flight its final reply and let the workers go. */
static void s_shutdown(um_broker_t *b)
{
    b->stopping = 1;
    um_notice("broker", "shutting down: %zu requests in flight get a cancelled reply, and %s "
              "workers are told to let go of them", b->n_requests,
              b->workers ? "the" : "no");
    while (b->head) {
        um_bk_request_t *r = b->head;
        if (!r->done) {
            json_t *reply = um_reply_new(r->id, UM_REPLY_CANCELLED);
            if (reply)
                json_object_set_new(reply, "reason", json_string("shutdown"));
            um_bk_send_client_json(b, &r->client, reply);
        }
        um_bk_request_answer_cancels(b, r);
        um_bk_request_free(b, r);
    }
    um_bk_workers_release_all(b);
}

int um_broker_run(um_broker_t *b)
{
    while (!b->stopping) {
        zmq_pollitem_t items[5] = {
            {.socket = b->back, .events = ZMQ_POLLIN},
            {.socket = b->front, .events = ZMQ_POLLIN},
            {.socket = b->back_monitor, .events = b->back_monitor ? ZMQ_POLLIN : 0},
            {.socket = b->front_monitor, .events = b->front_monitor ? ZMQ_POLLIN : 0},
            {.socket = NULL, .fd = b->cfg.stop_fd, .events = ZMQ_POLLIN},
        };
        /* zmq_poll rejects a NULL socket, so an unwatched side polls the back end twice. */
        if (!items[2].socket)
            items[2].socket = b->back;
        if (!items[3].socket)
            items[3].socket = b->back;
        int n_items = b->cfg.stop_fd >= 0 ? 5 : 4;
        int timeout = um_bk_workers_timeout_ms(b, um_bk_now_ms());
        if (zmq_poll(items, n_items, timeout) < 0) {
            if (errno == EINTR)
                continue;
            um_error("broker", "polling the sockets failed: %s", zmq_strerror(errno));
            return -1;
        }
        if (n_items == 5 && (items[4].revents & ZMQ_POLLIN)) {
            char buf[64];
            ssize_t got = read(b->cfg.stop_fd, buf, sizeof buf);
            (void)got;
            s_shutdown(b);
            break;
        }
        if (b->back_monitor && (items[2].revents & ZMQ_POLLIN))
            s_read_events(b, b->back_monitor, "back end");
        if (b->front_monitor && (items[3].revents & ZMQ_POLLIN))
            s_read_events(b, b->front_monitor, "front end");
        /* Worker messages first: they carry heartbeats and free capacity. */
        if (items[0].revents & ZMQ_POLLIN)
            um_bk_workers_read(b);
        um_bk_workers_tick(b, um_bk_now_ms());
        if (items[1].revents & ZMQ_POLLIN)
            um_bk_clients_read(b);
    }
    um_notice("broker", "stopped");
    return 0;
}

/* ------------------------------------------------------------------------- */
/* Construction                                                              */

const char *um_broker_frontend(const um_broker_t *b)
{
    return b->frontend;
}

const char *um_broker_backend(const um_broker_t *b)
{
    return b->backend;
}

/* Path of a file-backed ipc endpoint, or NULL (tcp, abstract "ipc://@name"). */
static const char *s_ipc_path(const char *endpoint)
{
    if (strncmp(endpoint, "ipc://", 6) != 0 || endpoint[6] == '@' || endpoint[6] == '\0')
        return NULL;
    return endpoint + 6;
}

static ino_t s_ipc_inode(const char *endpoint)
{
    const char *path = s_ipc_path(endpoint);
    struct stat st;
    if (!path || stat(path, &st) != 0)
        return 0;
    return st.st_ino;
}

/* Whether a process accepts connections on an ipc socket file, which zmq_bind would
   silently take over. */
static int s_ipc_in_use(const char *endpoint)
{
    const char *path = s_ipc_path(endpoint);
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    if (!path || strlen(path) >= sizeof addr.sun_path)
        return 0;
    strcpy(addr.sun_path, path);
    int fd = socket(AF_UNIX, SOCK_STREAM, 0);
    if (fd < 0)
        return 0;
    int in_use = connect(fd, (struct sockaddr *)&addr, sizeof addr) == 0;
    close(fd);
    return in_use;
}

/* Remove the socket file of an ipc endpoint if it is still the one bound (inode). */
static void s_ipc_unlink(const char *endpoint, ino_t inode)
{
    if (inode != 0 && s_ipc_inode(endpoint) == inode)
        unlink(s_ipc_path(endpoint));
}

/* Whether an endpoint uses a network transport (tcp, ws, ...), where CURVE applies. */
static int s_is_network(const char *endpoint)
{
    return strncmp(endpoint, "ipc://", 6) != 0 && strncmp(endpoint, "inproc://", 9) != 0;
}

/*
 * Check the security of one side: an endpoint that other hosts can reach needs
 * CURVE unless --insecure. Returns 0, or -1 with a message in err.
 */
static int s_check_side(const um_broker_config_t *cfg, const char *what, const char *option,
                        const char *endpoint, char *err, size_t errlen)
{
    if (cfg->curve || cfg->insecure || !um_curve_endpoint_is_public(endpoint))
        return 0;
    snprintf(err, errlen, "the %s endpoint %s (%s) accepts connections from other hosts but "
             "CURVE is off, so prompts and replies would cross the network in clear text: "
             "give --curve-key FILE (see docs/deployment.md), or --insecure on a network you "
             "trust", what, endpoint, option);
    return -1;
}

static void *s_router(um_broker_t *b, const char *endpoint, const char *domain,
                      size_t max_frame, char *out_endpoint, char *err, size_t errlen)
{
    void *sock = zmq_socket(b->zctx, ZMQ_ROUTER);
    if (!sock) {
        snprintf(err, errlen, "cannot create a ROUTER socket: %s", zmq_strerror(errno));
        return NULL;
    }
    int linger = S_LINGER_MS;
    zmq_setsockopt(sock, ZMQ_LINGER, &linger, sizeof linger);
    /* No send limit: a slow reader still gets every reply (the daemon does the same). */
    int hwm = 0;
    zmq_setsockopt(sock, ZMQ_SNDHWM, &hwm, sizeof hwm);
    if (max_frame > 0) {
        int64_t hard = (int64_t)max_frame;
        zmq_setsockopt(sock, ZMQ_MAXMSGSIZE, &hard, sizeof hard);
    }
    if (b->cfg.curve && s_is_network(endpoint)
        && um_curve_set_server(sock, b->cfg.curve, domain, err, errlen) != 0) {
        zmq_close(sock);
        return NULL;
    }
    if (strcmp(domain, UM_ZAP_WORKERS) == 0) {
        /* A worker whose TCP connection broke reconnects with the same routing id
           (it sets one); the new connection takes over from the dead one. */
        int on = 1;
        zmq_setsockopt(sock, ZMQ_ROUTER_HANDOVER, &on, sizeof on);
    }
    const char *ipc_path = s_ipc_path(endpoint);
    struct stat ipc_st;
    if (ipc_path && lstat(ipc_path, &ipc_st) == 0 && !S_ISSOCK(ipc_st.st_mode)) {
        snprintf(err, errlen, "cannot bind %s: %s exists and is %s, not a socket, and binding "
                 "would replace it: choose another path", endpoint, ipc_path,
                 S_ISDIR(ipc_st.st_mode) ? "a folder" : "a file");
        zmq_close(sock);
        return NULL;
    }
    if (s_ipc_in_use(endpoint)) {
        snprintf(err, errlen, "cannot bind %s: another process is listening on that socket "
                 "file (a running unmask-broker or unmaskd?): stop it or choose another path",
                 endpoint);
        zmq_close(sock);
        return NULL;
    }
    if (zmq_bind(sock, endpoint) != 0) {
        int e = errno;
        snprintf(err, errlen, "cannot bind %s: %s: %s", endpoint, zmq_strerror(e),
                 e == EADDRINUSE ? "stop the process that uses it or choose another endpoint"
                                 : "check the endpoint's address or path");
        zmq_close(sock);
        return NULL;
    }
    size_t size = 256;
    if (zmq_getsockopt(sock, ZMQ_LAST_ENDPOINT, out_endpoint, &size) != 0)
        snprintf(out_endpoint, 256, "%s", endpoint);
    return sock;
}

int um_broker_new(um_broker_t **out, const um_broker_config_t *cfg, char *err, size_t errlen)
{
    *out = NULL;
    if (s_check_side(cfg, "front-end", "--frontend", cfg->frontend, err, errlen) != 0
        || s_check_side(cfg, "back-end", "--backend", cfg->backend, err, errlen) != 0)
        return -1;
    if (cfg->curve && s_is_network(cfg->backend) && !cfg->curve_workers) {
        snprintf(err, errlen, "--curve-key needs --curve-workers DIR when the back end is tcp: "
                 "without an allow-list any host that has the broker's public key could "
                 "register as a worker and receive prompts");
        return -1;
    }

    um_broker_t *b = calloc(1, sizeof *b);
    if (!b || !(b->models_seen = json_object())) {
        free(b);
        snprintf(err, errlen, "out of memory for the broker");
        return -1;
    }
    b->cfg = *cfg;
    b->t_start_ms = um_bk_now_ms();
    b->t_heartbeat_ms = b->t_start_ms;
    b->zctx = zmq_ctx_new();
    if (!b->zctx) {
        snprintf(err, errlen, "cannot create a ZeroMQ context: %s", zmq_strerror(errno));
        goto fail;
    }
    int curve_used = cfg->curve && (s_is_network(cfg->frontend) || s_is_network(cfg->backend));
    if (cfg->curve && !curve_used)
        um_warn("broker", "--curve-key has no effect: neither endpoint is tcp (ipc endpoints "
                "are protected by file permissions)");
    if (curve_used && um_zap_start(&b->zap, b->zctx, cfg->curve_clients, cfg->curve_workers,
                                   err, errlen) != 0)
        goto fail;

    b->front = s_router(b, cfg->frontend, UM_ZAP_CLIENTS,
                        cfg->max_request_bytes * S_HARD_LIMIT_FACTOR, b->frontend, err, errlen);
    if (!b->front)
        goto fail;
    b->front_inode = s_ipc_inode(b->frontend);
    b->back = s_router(b, cfg->backend, UM_ZAP_WORKERS, 0, b->backend, err, errlen);
    if (!b->back)
        goto fail;
    b->back_inode = s_ipc_inode(b->backend);
    b->front_monitor = s_monitor(b, b->front, "front end");
    b->back_monitor = s_monitor(b, b->back, "back end");
    b->cfg.frontend = b->frontend;
    b->cfg.backend = b->backend;

    um_info("broker", "clients connect to %s%s, workers to %s%s; heartbeat %d ms, a peer "
            "silent for %d ms is lost", b->frontend,
            cfg->curve && s_is_network(b->frontend) ? " (CURVE)" : "", b->backend,
            cfg->curve && s_is_network(b->backend) ? " (CURVE)" : "", cfg->heartbeat_ms,
            cfg->heartbeat_ms * cfg->liveness);
    *out = b;
    return 0;

fail:
    um_broker_destroy(&b);
    return -1;
}

void um_broker_destroy(um_broker_t **bp)
{
    um_broker_t *b = *bp;
    if (!b)
        return;
    while (b->head)
        um_bk_request_free(b, b->head);
    while (b->workers) {
        um_bk_worker_t *w = b->workers;
        b->workers = w->next;
        json_decref(w->models);
        json_decref(w->info);
        free(w);
    }
    if (b->front_monitor) {
        zmq_socket_monitor(b->front, NULL, 0);
        zmq_close(b->front_monitor);
    }
    if (b->back_monitor) {
        zmq_socket_monitor(b->back, NULL, 0);
        zmq_close(b->back_monitor);
    }
    if (b->front)
        zmq_close(b->front);
    if (b->back)
        zmq_close(b->back);
    um_zap_stop(&b->zap);
    if (b->zctx) {
        int rc;
        do
            rc = zmq_ctx_term(b->zctx);
        while (rc < 0 && errno == EINTR);
    }
    /* libzmq 4.3 leaves the socket files of ipc endpoints behind. */
    s_ipc_unlink(b->frontend, b->front_inode);
    s_ipc_unlink(b->backend, b->back_inode);
    json_decref(b->models_seen);
    free(b);
    *bp = NULL;
}
