/* The worker's side of the broker protocol: see broker_link.h. */
#include "config.h"

#include "broker_link.h"

#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <zmq.h>

#include <unmaskd/error.h>
#include <unmaskd/protocol.h>

#include "curve.h"
#include "log.h"

/* Heartbeat interval and liveness until the broker's welcome sets them. */
#define S_DEFAULT_HEARTBEAT_MS 1000
#define S_DEFAULT_LIVENESS 3
/* Maximum wait for a welcome before the ready message is sent again on a new socket. */
#define S_MAX_BACKOFF_MS 32000
/* Milliseconds that closing the socket at exit waits to deliver the last replies. */
#define S_LINGER_MS 1000
/* Failed registrations logged one by one before only every S_LOG_EVERY-th is. */
#define S_LOG_FIRST 3
#define S_LOG_EVERY 10

struct um_link {
    um_link_config_t cfg;
    char endpoint[256];
    char model_name[160];
    char server_key[UM_CURVE_KEY_LEN + 1]; /* Z85 keys, "" without CURVE */
    char public_key[UM_CURVE_KEY_LEN + 1];
    char secret_key[UM_CURVE_KEY_LEN + 1];
    void *zctx;
    void *sock;           /* DEALER to the broker, or NULL before the first open */
    void *monitor;        /* PAIR receiving sock's connection events, or NULL */
    unsigned long opens;  /* sockets opened, for unique monitor endpoints */
    unsigned long handshake_failures;
    int registered;       /* welcome received on this socket */
    int stopping;
    int heartbeat_ms;
    int liveness;
    double t_opened_ms;
    double t_heard_ms;    /* last message from the broker */
    double t_beat_ms;     /* last heartbeat sent */
    int backoff_ms;       /* wait for a welcome before opening again */
    unsigned long attempts; /* opens without a welcome since the last welcome */
    char name[160];       /* host:pid */
    char host[128];
};

static double s_now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1e3 + (double)ts.tv_nsec / 1e6;
}

static void s_copy(char *dst, size_t size, const char *src)
{
    snprintf(dst, size, "%s", src ? src : "");
}

int um_link_new(um_link_t **out, void *zctx, const um_link_config_t *cfg, char *err,
                size_t errlen)
{
    *out = NULL;
    um_link_t *link = calloc(1, sizeof *link);
    if (!link) {
        snprintf(err, errlen, "out of memory for the broker link");
        return UM_ENOMEM;
    }
    link->cfg = *cfg;
    s_copy(link->endpoint, sizeof link->endpoint, cfg->endpoint);
    s_copy(link->model_name, sizeof link->model_name, cfg->model_name);
    s_copy(link->server_key, sizeof link->server_key, cfg->curve_server_key);
    s_copy(link->public_key, sizeof link->public_key, cfg->curve_public_key);
    s_copy(link->secret_key, sizeof link->secret_key, cfg->curve_secret_key);
    link->cfg.endpoint = link->endpoint;
    link->cfg.model_name = link->model_name;
    link->zctx = zctx;
    link->heartbeat_ms = S_DEFAULT_HEARTBEAT_MS;
    link->liveness = S_DEFAULT_LIVENESS;
    link->backoff_ms = S_DEFAULT_HEARTBEAT_MS * S_DEFAULT_LIVENESS;
    if (gethostname(link->host, sizeof link->host) != 0)
        s_copy(link->host, sizeof link->host, "unknown-host");
    link->host[sizeof link->host - 1] = '\0';
    snprintf(link->name, sizeof link->name, "%s:%ld", link->host, (long)getpid());
    *out = link;
    return 0;
}

/* Send one control message (released); failures are logged. */
static void s_send_ctl(um_link_t *link, json_t *msg)
{
    char *text = msg ? json_dumps(msg, JSON_COMPACT) : NULL;
    json_decref(msg);
    if (!text) {
        um_error("link", "out of memory while building a control message for the broker");
        return;
    }
    int rc;
    do
        rc = zmq_send(link->sock, text, strlen(text), ZMQ_DONTWAIT);
    while (rc < 0 && errno == EINTR);
    if (rc < 0)
        um_warn("link", "sending a control message to the broker at %s failed: %s",
                link->endpoint, zmq_strerror(errno));
    free(text);
}

static json_t *s_ready_message(const um_link_t *link, json_t *info)
{
    json_t *m = json_pack("{s:s, s:i, s:i, s:s, s:s, s:I, s:[s], s:I}", "ctl", UM_CTL_READY,
                          "version", UM_WORKER_PROTOCOL_VERSION, "protocol", UM_PROTOCOL_VERSION,
                          "name", link->name, "host", link->host, "pid", (json_int_t)getpid(),
                          "models", link->model_name, "capacity",
                          (json_int_t)link->cfg.capacity);
    if (m && info) {
        json_object_del(info, "id");
        json_object_del(info, "type");
        json_object_set(m, "info", info);
    }
    json_decref(info);
    return m;
}

/* Stop watching the socket's connections and close the monitor. */
static void s_monitor_close(um_link_t *link)
{
    if (!link->monitor)
        return;
    zmq_socket_monitor(link->sock, NULL, 0);
    zmq_close(link->monitor);
    link->monitor = NULL;
}

/* Watch the new socket's connections, so failed CURVE handshakes get logged. */
static void s_monitor_open(um_link_t *link)
{
    char endpoint[96];
    snprintf(endpoint, sizeof endpoint, "inproc://unmaskd-link-%p-%lu", (void *)link,
             ++link->opens);
    if (zmq_socket_monitor(link->sock, endpoint, UM_CURVE_EVENTS) == 0) {
        link->monitor = zmq_socket(link->zctx, ZMQ_PAIR);
        if (link->monitor && zmq_connect(link->monitor, endpoint) == 0)
            return;
    }
    um_warn("link", "cannot watch the connection to the broker: %s: failed handshakes will "
            "not be logged", zmq_strerror(errno));
    s_monitor_close(link);
}

/* Log the connection events that are waiting; failed handshakes at warn. */
static void s_read_events(um_link_t *link)
{
    int event, failed;
    char text[256];
    while (link->monitor && um_curve_read_event(link->monitor, &event, &failed, text,
                                                sizeof text)) {
        if (!failed) {
            um_debug("link", "%s", text);
            continue;
        }
        link->handshake_failures++;
        if (link->handshake_failures <= S_LOG_FIRST
            || link->handshake_failures % S_LOG_EVERY == 0)
            um_warn("link", "%s (%lu failed so far): check --curve-server-key and that the "
                    "broker lists this worker's .pub file in --curve-workers", text,
                    link->handshake_failures);
    }
}

int um_link_open(um_link_t *link, json_t *info, char *err, size_t errlen)
{
    if (link->sock) {
        /* The broker has forgotten this socket: whatever it still queues is dropped. */
        int linger = 0;
        s_monitor_close(link);
        zmq_setsockopt(link->sock, ZMQ_LINGER, &linger, sizeof linger);
        zmq_close(link->sock);
        link->sock = NULL;
    }
    link->registered = 0;
    link->sock = zmq_socket(link->zctx, ZMQ_DEALER);
    if (!link->sock) {
        json_decref(info);
        snprintf(err, errlen, "cannot create the DEALER socket for the broker: %s",
                 zmq_strerror(errno));
        return UM_EIO;
    }
    int linger = S_LINGER_MS, hwm = 0;
    zmq_setsockopt(link->sock, ZMQ_LINGER, &linger, sizeof linger);
    /* No send limit, as on the daemon's ROUTER: steps and finals are never dropped here. */
    zmq_setsockopt(link->sock, ZMQ_SNDHWM, &hwm, sizeof hwm);
    if (link->cfg.max_frame > 0) {
        int64_t max = link->cfg.max_frame;
        zmq_setsockopt(link->sock, ZMQ_MAXMSGSIZE, &max, sizeof max);
    }
    /* An explicit routing id survives a broken TCP connection, so the broker keeps
       this worker when ZeroMQ reconnects. Ids starting with a zero byte are libzmq's. */
    unsigned char id[16];
    if (getentropy(id, sizeof id) != 0) {
        uint64_t x = (uint64_t)s_now_ms() * 0x9E3779B97F4A7C15ULL ^ (uint64_t)getpid();
        memcpy(id, &x, sizeof x);
        memcpy(id + 8, &link, sizeof link < 8 ? sizeof link : 8);
    }
    id[0] = 'w';
    zmq_setsockopt(link->sock, ZMQ_ROUTING_ID, id, sizeof id);
    s_monitor_open(link);

    if (link->server_key[0]) {
        um_curve_keypair_t own;
        s_copy(own.public_key, sizeof own.public_key, link->public_key);
        s_copy(own.secret_key, sizeof own.secret_key, link->secret_key);
        if (um_curve_set_client(link->sock, link->server_key, &own, err, errlen) != 0) {
            json_decref(info);
            return UM_EIO;
        }
    }
    if (zmq_connect(link->sock, link->endpoint) != 0) {
        json_decref(info);
        snprintf(err, errlen, "cannot connect to the broker at %s: %s: check the endpoint "
                 "given to --connect", link->endpoint, zmq_strerror(errno));
        return UM_EIO;
    }
    link->t_opened_ms = link->t_heard_ms = link->t_beat_ms = s_now_ms();
    link->attempts++;
    s_send_ctl(link, s_ready_message(link, info));
    return 0;
}

void *um_link_socket(const um_link_t *link)
{
    return link->sock;
}

int um_link_registered(const um_link_t *link)
{
    return link->registered;
}

int um_link_timeout_ms(const um_link_t *link)
{
    /* A stopping worker that is not registered sends nothing and waits for nothing. */
    if (link->stopping && !link->registered)
        return link->heartbeat_ms;
    double now = s_now_ms();
    double next = link->registered ? link->t_beat_ms + link->heartbeat_ms
                                   : link->t_opened_ms + link->backoff_ms;
    if (link->registered && !link->stopping) {
        double expiry = link->t_heard_ms + (double)link->heartbeat_ms * link->liveness;
        if (expiry < next)
            next = expiry;
    }
    return next <= now ? 0 : (int)(next - now) + 1;
}

um_link_event_t um_link_tick(um_link_t *link)
{
    s_read_events(link);
    double now = s_now_ms();
    if (link->registered && now - link->t_beat_ms >= link->heartbeat_ms) {
        s_send_ctl(link, json_pack("{s:s}", "ctl", UM_CTL_HEARTBEAT));
        link->t_beat_ms = now;
    }
    if (link->stopping)
        return UM_LINK_OK;
    /* Messages waiting unread (this process was descheduled or stopped) are news from
       the broker, so they count before silence is judged. */
    int events = 0;
    size_t size = sizeof events;
    if (zmq_getsockopt(link->sock, ZMQ_EVENTS, &events, &size) == 0 && (events & ZMQ_POLLIN))
        link->t_heard_ms = now;
    if (link->registered) {
        double silent = now - link->t_heard_ms;
        if (silent > (double)link->heartbeat_ms * link->liveness) {
            um_warn("link", "the broker at %s sent nothing for %.0f ms (limit %d ms): dropping "
                    "every request and registering again", link->endpoint, silent,
                    link->heartbeat_ms * link->liveness);
            return UM_LINK_RESET;
        }
        return UM_LINK_OK;
    }
    if (now - link->t_opened_ms >= link->backoff_ms) {
        if (link->attempts <= S_LOG_FIRST || link->attempts % S_LOG_EVERY == 0)
            um_warn("link", "no welcome from the broker at %s within %d ms (attempt %lu): "
                    "registering again on a new connection; check that unmask-broker runs "
                    "there and that the CURVE keys match", link->endpoint, link->backoff_ms,
                    link->attempts);
        link->backoff_ms = link->backoff_ms * 2 > S_MAX_BACKOFF_MS ? S_MAX_BACKOFF_MS
                                                                   : link->backoff_ms * 2;
        return UM_LINK_RESET;
    }
    return UM_LINK_OK;
}

void um_link_heard(um_link_t *link)
{
    link->t_heard_ms = s_now_ms();
}

/* Adopt the heartbeat settings of a welcome, within sane bounds. */
static void s_welcome(um_link_t *link, const json_t *msg)
{
    json_t *hb = json_object_get(msg, "heartbeat_ms");
    json_t *lv = json_object_get(msg, "liveness");
    if (json_is_integer(hb) && json_integer_value(hb) >= 10 && json_integer_value(hb) <= 600000)
        link->heartbeat_ms = (int)json_integer_value(hb);
    if (json_is_integer(lv) && json_integer_value(lv) >= 2 && json_integer_value(lv) <= 1000)
        link->liveness = (int)json_integer_value(lv);
    link->registered = 1;
    link->t_beat_ms = s_now_ms();
    link->backoff_ms = link->heartbeat_ms * link->liveness;
    um_notice("link", "registered with the broker at %s as %s serving %s (capacity %zu, "
              "heartbeat %d ms, liveness %d) after %lu attempt%s", link->endpoint, link->name,
              link->model_name, link->cfg.capacity, link->heartbeat_ms, link->liveness,
              link->attempts, link->attempts == 1 ? "" : "s");
    link->attempts = 0;
}

um_link_event_t um_link_control(um_link_t *link, const void *data, size_t len)
{
    json_t *msg = json_loadb(data, len, 0, NULL);
    const char *ctl = json_string_value(json_object_get(msg, "ctl"));
    um_link_event_t event = UM_LINK_OK;
    if (!ctl) {
        um_warn("link", "the broker sent a %zu-byte control frame that is not a JSON object "
                "with a \"ctl\" name: ignored", len);
    } else if (strcmp(ctl, UM_CTL_WELCOME) == 0) {
        s_welcome(link, msg);
    } else if (strcmp(ctl, UM_CTL_HEARTBEAT) == 0) {
        /* um_link_heard already noted it. */
    } else if (strcmp(ctl, UM_CTL_DISCONNECT) == 0) {
        const char *reason = json_string_value(json_object_get(msg, "reason"));
        if (!link->stopping) {
            um_notice("link", "the broker at %s let go of this worker (%s): dropping every "
                      "request and registering again", link->endpoint, reason ? reason : "no reason given");
            event = UM_LINK_RESET;
        }
    } else if (strcmp(ctl, UM_CTL_REJECT) == 0) {
        const char *message = json_string_value(json_object_get(msg, "message"));
        um_error("link", "the broker at %s rejected this worker: %s", link->endpoint,
                 message ? message : "no reason given");
        event = UM_LINK_REJECTED;
    } else {
        um_warn("link", "the broker sent the unknown control message \"%.32s\": ignored", ctl);
    }
    json_decref(msg);
    return event;
}

void um_link_stopping(um_link_t *link)
{
    link->stopping = 1;
    /* A broker that has not welcomed this socket does not know the worker. */
    if (link->sock && link->registered)
        s_send_ctl(link, json_pack("{s:s}", "ctl", UM_CTL_STOPPING));
}

void um_link_disconnect(um_link_t *link)
{
    if (link->sock && link->registered)
        s_send_ctl(link, json_pack("{s:s}", "ctl", UM_CTL_DISCONNECT));
}

void um_link_default_name(const char *model_dir, char *buf, size_t size)
{
    size_t end = strlen(model_dir);
    while (end > 1 && model_dir[end - 1] == '/')
        end--;
    size_t start = end;
    while (start > 0 && model_dir[start - 1] != '/')
        start--;
    if (end == start)
        snprintf(buf, size, "model");
    else
        snprintf(buf, size, "%.*s", (int)(end - start), model_dir + start);
}

void um_link_destroy(um_link_t **linkp)
{
    um_link_t *link = *linkp;
    if (!link)
        return;
    s_monitor_close(link);
    if (link->sock)
        zmq_close(link->sock);
    free(link);
    *linkp = NULL;
}
