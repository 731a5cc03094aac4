/* The broker's ZAP handler: see zap.h. */
#include "config.h"

#include "zap.h"

#include <dirent.h>
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include <zmq.h>

#include "curve.h"
#include "log.h"

/* The endpoint where libzmq looks for a ZAP handler (RFC 27). */
#define S_ZAP_ENDPOINT "inproc://zeromq.zap.01"
/* Maximum wait of the handler's poll, in milliseconds (see s_thread_main). */
#define S_POLL_MS 100
/* Rejections logged one by one before only every S_LOG_EVERY-th is. */
#define S_LOG_FIRST 20
#define S_LOG_EVERY 100

/* Public keys allowed in one domain; any = 1 lets every key in. */
typedef struct s_allow {
    uint8_t (*keys)[32];
    size_t n;
    int any;
    char dir[512];
} s_allow_t;

struct um_zap {
    void *zctx;
    void *handler;       /* REP bound to S_ZAP_ENDPOINT, used by the thread only */
    void *stop_main;     /* PAIR: um_zap_stop sends one byte here */
    void *stop_thread;   /* PAIR: the thread's end */
    char stop_name[64];
    pthread_t thread;
    int started;
    s_allow_t clients;
    s_allow_t workers;
    unsigned long rejected;
};

/* ------------------------------------------------------------------------- */
/* Allow-lists                                                               */

static int s_ends_with(const char *s, const char *suffix)
{
    size_t n = strlen(s), k = strlen(suffix);
    return n >= k && strcmp(s + n - k, suffix) == 0;
}

/*
 * Check that no user but the owner may write path: a user who may add a .pub file to the
 * key folder may connect. Returns 0, or -1 with the fix in err.
 */
static int s_check_key_writers(const char *path, const char *label, char *err, size_t errlen)
{
    struct stat st;
    if (stat(path, &st) != 0) {
        snprintf(err, errlen, "cannot read the %s %s: %s", label, path, strerror(errno));
        return -1;
    }
    if (st.st_mode & (S_IWGRP | S_IWOTH)) {
        snprintf(err, errlen, "the %s %s is writable by other users (mode %04o), who could "
                 "add their own key: run chmod go-w %s", label, path,
                 (unsigned)st.st_mode & 07777, path);
        return -1;
    }
    return 0;
}

/* Load every *.pub file of dir. Returns 0, or -1 with a message in err. */
static int s_allow_load(s_allow_t *a, const char *dir, char *err, size_t errlen)
{
    memset(a, 0, sizeof *a);
    if (!dir) {
        a->any = 1;
        return 0;
    }
    snprintf(a->dir, sizeof a->dir, "%s", dir);
    if (s_check_key_writers(dir, "key folder", err, errlen) != 0)
        return -1;
    DIR *d = opendir(dir);
    if (!d) {
        snprintf(err, errlen, "cannot read the key folder %s: %s: give a folder of .pub files "
                 "written by unmask-broker --keygen", dir, strerror(errno));
        return -1;
    }
    struct dirent *e;
    int rc = 0;
    while ((e = readdir(d)) != NULL) {
        if (e->d_name[0] == '.' || !s_ends_with(e->d_name, ".pub"))
            continue;
        char path[4096];
        snprintf(path, sizeof path, "%s/%s", dir, e->d_name);
        um_curve_keypair_t kp;
        if (s_check_key_writers(path, "key file", err, errlen) != 0
            || um_curve_load(path, 0, &kp, err, errlen) != 0) {
            rc = -1;
            break;
        }
        void *grown = realloc(a->keys, (a->n + 1) * sizeof *a->keys);
        if (!grown) {
            snprintf(err, errlen, "out of memory while loading the keys of %s", dir);
            rc = -1;
            break;
        }
        a->keys = grown;
        zmq_z85_decode(a->keys[a->n++], kp.public_key);
    }
    closedir(d);
    if (rc == 0 && a->n == 0) {
        snprintf(err, errlen, "the key folder %s holds no .pub file: copy the public keys of "
                 "the peers to accept into it", dir);
        rc = -1;
    }
    if (rc != 0) {
        free(a->keys);
        a->keys = NULL;
        a->n = 0;
    }
    return rc;
}

static int s_allowed(const s_allow_t *a, const uint8_t *key)
{
    if (a->any)
        return 1;
    for (size_t i = 0; i < a->n; i++)
        if (memcmp(a->keys[i], key, 32) == 0)
            return 1;
    return 0;
}

/* ------------------------------------------------------------------------- */
/* Handler thread                                                            */

static void s_send_frame(void *sock, const char *text, int more)
{
    zmq_send(sock, text, strlen(text), more ? ZMQ_SNDMORE : 0);
}

/*
 * Reply to one ZAP request. Its frames: version, request id, domain, address, routing id,
 * mechanism, then the credentials (for CURVE, the client's 32-byte public key).
 */
static void s_handle_request(um_zap_t *zap)
{
    enum { N_FRAMES = 7 };
    zmq_msg_t f[N_FRAMES];
    int n = 0;
    for (;;) {
        zmq_msg_t m;
        zmq_msg_init(&m);
        if (zmq_msg_recv(&m, zap->handler, 0) < 0) {
            zmq_msg_close(&m);
            break;
        }
        int more = zmq_msg_more(&m);
        if (n < N_FRAMES) {
            zmq_msg_init(&f[n]);
            zmq_msg_move(&f[n++], &m);
        }
        zmq_msg_close(&m);
        if (!more)
            break;
    }

    char domain[64] = "", address[128] = "", mechanism[16] = "";
    if (n >= 6) {
        snprintf(domain, sizeof domain, "%.*s", (int)zmq_msg_size(&f[2]), (char *)zmq_msg_data(&f[2]));
        snprintf(address, sizeof address, "%.*s", (int)zmq_msg_size(&f[3]),
                 (char *)zmq_msg_data(&f[3]));
        snprintf(mechanism, sizeof mechanism, "%.*s", (int)zmq_msg_size(&f[5]),
                 (char *)zmq_msg_data(&f[5]));
    }
    const char *status = "400", *text = "rejected";
    char key_text[UM_CURVE_KEY_LEN + 1] = "?";
    if (n == 7 && strcmp(mechanism, "CURVE") == 0 && zmq_msg_size(&f[6]) == 32) {
        const uint8_t *key = zmq_msg_data(&f[6]);
        zmq_z85_encode(key_text, key, 32);
        const s_allow_t *list = strcmp(domain, UM_ZAP_WORKERS) == 0   ? &zap->workers
                                : strcmp(domain, UM_ZAP_CLIENTS) == 0 ? &zap->clients
                                                                      : NULL;
        if (list && s_allowed(list, key)) {
            status = "200";
            text = "OK";
        }
    }
    if (strcmp(status, "200") == 0) {
        um_debug("zap", "accepted %s key %s from %s", domain, key_text, address);
    } else {
        zap->rejected++;
        if (zap->rejected <= S_LOG_FIRST || zap->rejected % S_LOG_EVERY == 0)
            um_warn("zap", "rejected a %s connection from %s with %s key %s (%lu rejected so "
                    "far): add its .pub file to the %s key folder if it should connect",
                    domain[0] ? domain : "?", address[0] ? address : "?",
                    mechanism[0] ? mechanism : "no", key_text, zap->rejected,
                    strcmp(domain, UM_ZAP_WORKERS) == 0 ? "--curve-workers" : "--curve-clients");
    }

    /* Reply: version, request id, status code, status text, user id, metadata. */
    s_send_frame(zap->handler, "1.0", 1);
    if (n >= 2)
        zmq_send(zap->handler, zmq_msg_data(&f[1]), zmq_msg_size(&f[1]), ZMQ_SNDMORE);
    else
        s_send_frame(zap->handler, "", 1);
    s_send_frame(zap->handler, status, 1);
    s_send_frame(zap->handler, text, 1);
    s_send_frame(zap->handler, strcmp(status, "200") == 0 ? key_text : "", 1);
    s_send_frame(zap->handler, "", 0);
    for (int i = 0; i < n; i++)
        zmq_msg_close(&f[i]);
}

static void *s_thread_main(void *arg)
{
    um_zap_t *zap = arg;
    for (;;) {
        zmq_pollitem_t items[2] = {
            {.socket = zap->handler, .events = ZMQ_POLLIN},
            {.socket = zap->stop_thread, .events = ZMQ_POLLIN},
        };
        /* NOTE: once, on a loaded machine, the CURVE test saw handshakes stop reaching
           this handler for good, and the cause was not found. The bounded wait makes
           zmq_poll process the socket's pending commands (such as the pipe of a new
           handshake) at least every S_POLL_MS, which covers a lost wake-up. */
        if (zmq_poll(items, 2, S_POLL_MS) < 0) {
            if (errno == EINTR)
                continue;
            um_error("zap", "polling the ZAP socket failed: %s: CURVE handshakes will stall",
                     zmq_strerror(errno));
            break;
        }
        if (items[1].revents & ZMQ_POLLIN)
            break;
        if (items[0].revents & ZMQ_POLLIN)
            s_handle_request(zap);
    }
    return NULL;
}

/* ------------------------------------------------------------------------- */
/* Start and stop                                                            */

int um_zap_start(um_zap_t **out, void *zctx, const char *clients_dir, const char *workers_dir,
                 char *err, size_t errlen)
{
    *out = NULL;
    um_zap_t *zap = calloc(1, sizeof *zap);
    if (!zap) {
        snprintf(err, errlen, "out of memory for the ZAP handler");
        return -1;
    }
    zap->zctx = zctx;
    if (s_allow_load(&zap->clients, clients_dir, err, errlen) != 0
        || s_allow_load(&zap->workers, workers_dir, err, errlen) != 0)
        goto fail;

    int linger = 0;
    zap->handler = zmq_socket(zctx, ZMQ_REP);
    if (!zap->handler || zmq_bind(zap->handler, S_ZAP_ENDPOINT) != 0) {
        snprintf(err, errlen, "cannot bind the ZAP handler at %s: %s", S_ZAP_ENDPOINT,
                 zmq_strerror(errno));
        goto fail;
    }
    zmq_setsockopt(zap->handler, ZMQ_LINGER, &linger, sizeof linger);
    snprintf(zap->stop_name, sizeof zap->stop_name, "inproc://unmask-broker-zap-%p", (void *)zap);
    zap->stop_main = zmq_socket(zctx, ZMQ_PAIR);
    zap->stop_thread = zmq_socket(zctx, ZMQ_PAIR);
    if (!zap->stop_main || !zap->stop_thread || zmq_bind(zap->stop_thread, zap->stop_name) != 0
        || zmq_connect(zap->stop_main, zap->stop_name) != 0) {
        snprintf(err, errlen, "cannot create the ZAP handler's stop pipe: %s",
                 zmq_strerror(errno));
        goto fail;
    }
    zmq_setsockopt(zap->stop_main, ZMQ_LINGER, &linger, sizeof linger);
    zmq_setsockopt(zap->stop_thread, ZMQ_LINGER, &linger, sizeof linger);

    /* The thread blocks every signal, so SIGTERM reaches the main thread's handler. */
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, &old);
    int rc = pthread_create(&zap->thread, NULL, s_thread_main, zap);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (rc != 0) {
        snprintf(err, errlen, "cannot start the ZAP handler thread: %s", strerror(rc));
        goto fail;
    }
    zap->started = 1;
    um_info("zap", "CURVE allow-lists: clients %s, workers %s",
            zap->clients.any ? "any key" : zap->clients.dir,
            zap->workers.any ? "any key" : zap->workers.dir);
    *out = zap;
    return 0;

fail:
    um_zap_stop(&zap);
    return -1;
}

void um_zap_stop(um_zap_t **zapp)
{
    um_zap_t *zap = *zapp;
    if (!zap)
        return;
    if (zap->started) {
        char quit = 'q';
        zmq_send(zap->stop_main, &quit, 1, 0);
        pthread_join(zap->thread, NULL);
    }
    if (zap->handler)
        zmq_close(zap->handler);
    if (zap->stop_main)
        zmq_close(zap->stop_main);
    if (zap->stop_thread)
        zmq_close(zap->stop_thread);
    free(zap->clients.keys);
    free(zap->workers.keys);
    free(zap);
    *zapp = NULL;
}
