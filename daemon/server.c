/*
 * The ZeroMQ server (see server.h and docs/protocol.md).
 *
 * The main thread owns the ROUTER socket, the FIFO of waiting generate requests and
 * the main tokenizer. It replies to info, health, tokenize, detokenize and cancel at
 * once, and checks a generate request completely (fields, plugin, parameters,
 * ranges) before queueing it, so a queued request can only end in done, cancelled
 * or an internal error. The worker thread owns the model and the worker tokenizer.
 * It runs up to max_batch generate jobs in lockstep, one shared forward pass per step
 * (um_gen_step_batch), and takes a job sent while others run at its next step. A score
 * job runs alone.
 *
 * The two threads talk over an inproc PAIR socket, and each message starts with a
 * one-byte kind frame. Main to worker: 'j' and the job pointer runs a job, and 'q'
 * alone quits. Worker to main, always kind, job pointer and payload: 'r' ready (the
 * start handshake, with no job), 's' a step reply, and one final reply per job,
 * 'd' done, 'c' cancelled or 'e' error. Payloads from the worker are finished JSON
 * replies, which the main thread forwards unchanged to the job's client. A job belongs to the main thread except
 * between 'j' and its final reply, when the worker reads it and the job is in the
 * main thread's running set. During that time the main thread touches only the job's
 * client address, its id (read-only) and the atomic cancel flag. The worker's step
 * callback checks that flag after every step.
 *
 * ROUTER sockets do not tell the application that a peer left (ZMQ_ROUTER_NOTIFY is a
 * draft option that Debian's libzmq 4.3.4 lacks), so the main thread also reads the
 * socket monitor's ACCEPTED and DISCONNECTED events. They carry only the connection's
 * file descriptor. Each request frame carries the same descriptor (ZMQ_SRCFD, which
 * libzmq 4.3 still fills in although its manual calls it deprecated), and that maps the
 * descriptor to the routing id of the client. A disconnected client's jobs are
 * cancelled: a waiting one at once, a running one after its current step.
 *
 * In worker mode (unmaskd --connect) a DEALER connected to a broker takes the ROUTER's
 * place (broker_link.h). Requests and replies keep their frames, with the broker's
 * route where a client's routing id was, so everything above works unchanged.
 */
#include "config.h"

#include "server.h"

#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#include <jansson.h>
#include <zmq.h>

#include <unmaskd/protocol.h>

#include "broker_link.h"
#include "chat.h"
#include "score.h"
#include "curve.h"
#include "generate.h"
#include "kernels.h"
#include "log.h"
#include "request.h"
#include "sample.h"
#include "zap.h"

_Static_assert(UM_REQ_MAX_SCORE_SAMPLES == UM_SCORE_MAX_SAMPLES,
               "the request parser and the engine must agree on the most score samples");

/* Largest frame ZeroMQ accepts at all, as a multiple of the request limit. A bigger
   frame makes ZeroMQ drop the connection without a reply. */
#define UM_SERVER_HARD_LIMIT_FACTOR 16
/* Milliseconds that closing the ROUTER socket waits to deliver final replies. */
#define UM_SERVER_LINGER_MS 1000

/* Message kinds on the PAIR socket between the main thread and the worker. */
enum {
    S_MSG_READY = 'r',
    S_MSG_JOB = 'j',
    S_MSG_QUIT = 'q',
    S_MSG_STEP = 's',
    S_MSG_DONE = 'd',
    S_MSG_CANCELLED = 'c',
    S_MSG_ERROR = 'e',
};

/* Values of a job's cancel flag. */
enum {
    S_RUN = 0,
    S_CANCEL = 1,     /* a cancel request named the job */
    S_SHUTDOWN = 2,   /* the daemon is stopping */
    S_DISCONNECT = 3, /* the client's connection closed */
};

/* Values of um_server.stopping. */
enum {
    S_SERVING = 0,
    S_DRAINING = 1,   /* stop signal received: accepted jobs run until the grace ends */
    S_CANCELLING = 2, /* every job is cancelled, the loop ends with the last reply */
};

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

/*
 * Whether a process accepts connections on the socket file of an ipc endpoint. ZeroMQ
 * would replace the file without a word and leave that process unreachable.
 */
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

/* ------------------------------------------------------------------------- */
/* Types                                                                     */

/*
 * A client's address on the ROUTER: its routing id, and whether its request had an
 * empty delimiter frame (REQ sockets add one), which the replies then repeat.
 */
typedef struct s_client {
    unsigned char id[256]; /* ZeroMQ routing ids are 1 to 255 bytes */
    size_t len;
    int delimiter;
} s_client_t;

/* An accepted generate request, from the queue until its final reply. */
typedef struct s_job {
    struct s_job *next; /* queue link */
    s_client_t client;
    um_request_t req;        /* owns the JSON the request fields point into */
    int32_t *prompt;         /* (n_prompt) token ids of the prompt, framing included */
    int32_t n_prompt;
    int32_t suffix;          /* the token that closes the canvas, when params.n_suffix is 1 */
    atomic_int steps_done;   /* steps the worker finished, for the cancel log lines */
    um_gen_params_t params;  /* checked; remask_state from request_begin */
    um_param_t *remask_params; /* (params.remask->n_params) values given to request_begin */
    int remask_begun;        /* request_end is owed */
    int score;               /* a score request: answer and score_params, not params */
    int32_t *answer;         /* (n_answer) token ids of a score request's answer */
    int32_t n_answer;
    um_score_params_t score_params;
    atomic_int cancel;       /* S_RUN, S_CANCEL or S_SHUTDOWN */
    double t_accept_ms;
    char id_text[80];        /* the id for log lines */
} s_job_t;

/* The client last seen on a connection, so a DISCONNECTED event, which carries only the
   connection's file descriptor, finds the client's routing id. */
typedef struct s_peer {
    int fd;
    s_client_t client;
} s_peer_t;

struct um_server {
    um_server_config_t cfg;
    char endpoint[256];   /* as bound, with a tcp port of 0 resolved */
    int bound;            /* the ROUTER socket is bound to endpoint */
    ino_t ipc_inode;      /* inode of the ipc socket file this daemon created, or 0 */
    char pipe_name[64];   /* inproc endpoint of the PAIR sockets */

    um_model_t *model;                 /* used by the worker only */
    const um_model_config_t *model_cfg; /* read-only, shared */
    um_plugin_registry_t *plugins;     /* main thread; entries never move (plugins.h) */
    char *plugin_path;                 /* folders to rescan, or NULL */
    int32_t eot_id;                    /* end-of-turn token of the tokenizer, or -1 */
    um_chat_template_t chat;           /* the model's chat template, read-only */
    um_tokenizer_t *tok;               /* main thread */
    um_tokenizer_t *tok_worker;        /* worker thread */

    void *zctx;
    void *router;  /* clients */
    void *pipe;    /* main thread's end of the PAIR */
    void *monitor; /* PAIR receiving the ROUTER's connection events; NULL in worker mode */
    s_peer_t *peers; /* (n_peers) connections that sent a request, by file descriptor */
    size_t n_peers;
    size_t cap_peers;
    um_zap_t *zap;   /* CURVE allow-list handler, or NULL */

    pthread_t worker;
    int worker_started;

    s_job_t *queue_head; /* waiting jobs, oldest first */
    s_job_t *queue_tail;
    size_t queue_len;
    s_job_t **running;   /* (max_batch) the worker's jobs, n_running of them, oldest first */
    int32_t n_running;
    int32_t max_batch;   /* cfg.max_batch with 0 resolved */
    int stopping;        /* S_SERVING, S_DRAINING or S_CANCELLING */
    double grace_end_ms; /* when S_DRAINING turns into S_CANCELLING */
    int32_t max_prompt_tokens; /* cfg's limits with 0 resolved; max_steps 0: none */
    int32_t max_gen_length;
    int32_t max_steps;
    um_link_t *link;      /* worker mode (--connect): the broker link; NULL when bound */
    int status;           /* um_server_run's result: 0, or UM_EUNSUPPORTED when the
                             broker rejected this worker, or the error of a new socket */

    double t_start_ms;
};

/* ------------------------------------------------------------------------- */
/* Small helpers                                                             */

static double s_now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1e3 + (double)ts.tv_nsec / 1e6;
}

/*
 * A seed for a request that gave none: from the kernel's entropy, cut to 53 bits so
 * that every JSON parser, including those that keep numbers as doubles, reads back
 * the exact value the reply reports.
 */
static uint64_t s_random_seed(void)
{
    uint64_t x = 0;
    if (getentropy(&x, sizeof x) != 0) {
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        x = (uint64_t)ts.tv_nsec * 0x9E3779B97F4A7C15ULL ^ (uint64_t)ts.tv_sec
            ^ ((uint64_t)getpid() << 32);
    }
    return x & ((1ULL << 53) - 1);
}

static int s_same_client(const s_client_t *a, const s_client_t *b)
{
    return a->len == b->len && memcmp(a->id, b->id, a->len) == 0;
}

/*
 * The end-of-turn token that suppress_eos_confidence demotes with EOS: LLaMA-3 style
 * <|eot_id|> (LLaDA), else ChatML <|im_end|> (Dream), else none. config.json names no
 * such token, so the tokenizer is asked.
 */
static int32_t s_find_eot(um_tokenizer_t *tok)
{
    static const char *const names[] = {"<|eot_id|>", "<|im_end|>"};
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++) {
        int32_t id;
        if (tok->ops->token_to_id(tok->state, names[i], &id) == 0)
            return id;
    }
    return -1;
}

/* zmq_msg_recv that retries when a signal interrupts it. */
static int s_msg_recv(zmq_msg_t *msg, void *socket, int flags)
{
    int rc;
    do
        rc = zmq_msg_recv(msg, socket, flags);
    while (rc < 0 && errno == EINTR);
    return rc;
}

static int s_send(void *socket, const void *data, size_t len, int flags)
{
    int rc;
    do
        rc = zmq_send(socket, data, len, flags);
    while (rc < 0 && errno == EINTR);
    return rc;
}

static int s_more(void *socket)
{
    int more = 0;
    size_t size = sizeof more;
    zmq_getsockopt(socket, ZMQ_RCVMORE, &more, &size);
    return more;
}

/* Receive and drop the rest of a multipart message. */
static void s_drain(void *socket)
{
    while (s_more(socket)) {
        zmq_msg_t m;
        zmq_msg_init(&m);
        s_msg_recv(&m, socket, 0);
        zmq_msg_close(&m);
    }
}

/* ------------------------------------------------------------------------- */
/* Sending replies to clients                                                */

/*
 * Send one reply to a client. A ROUTER socket without ZMQ_ROUTER_MANDATORY does not
 * block on send (zmq_socket(3), libzmq 4.3), and it drops a reply to a client that
 * has gone away.
 */
static void s_send_to_client(um_server_t *srv, const s_client_t *client, const char *data,
                             size_t len)
{
    if (s_send(srv->router, client->id, client->len, ZMQ_SNDMORE) < 0
        || (client->delimiter && s_send(srv->router, "", 0, ZMQ_SNDMORE) < 0)
        || s_send(srv->router, data, len, 0) < 0)
        um_warn("server", "sending a %zu-byte reply failed: %s", len, zmq_strerror(errno));
}

/* The reply used when a reply cannot be built, so the request still gets its final. */
static const char s_oom_reply[] =
    "{\"id\":null,\"type\":\"error\",\"error\":{\"code\":\"internal\",\"field\":null,"
    "\"message\":\"out of memory while building the reply: the daemon is short of memory\"}}";

/* Serialize reply (releasing it) and send it to client. */
static void s_send_json(um_server_t *srv, const s_client_t *client, json_t *reply)
{
    size_t len = 0;
    char *text = um_reply_dump(reply, &len);
    if (!text) {
        um_error("server", "out of memory while serializing a reply");
        s_send_to_client(srv, client, s_oom_reply, sizeof s_oom_reply - 1);
        return;
    }
    s_send_to_client(srv, client, text, len);
    free(text);
}

/*
 * Send an error reply and log it with the request id: at warn, except a cancel whose
 * target has already finished, a normal race for any client, which is logged at debug.
 */
static void s_send_error(um_server_t *srv, const s_client_t *client, const json_t *id,
                         const um_req_error_t *err)
{
    char idbuf[80];
    int late_cancel = strcmp(err->code, UM_ERR_NOT_FOUND) == 0 &&
                      strcmp(err->field, "target") == 0;
    UM_LOG(late_cancel ? UM_LOG_DEBUG : UM_LOG_WARN, "server", "request %s: %s%s%s: %s",
           um_request_id_text(id, idbuf, sizeof idbuf), err->code, err->field[0] ? " on " : "",
           err->field, err->message);
    s_send_json(srv, client, um_reply_error(id, err));
}

static json_t *s_cancelled_reply(const json_t *id, int reason)
{
    json_t *r = um_reply_new(id, UM_REPLY_CANCELLED);
    if (r)
        json_object_set_new(r, "reason", json_string(reason == S_SHUTDOWN     ? "shutdown"
                                                     : reason == S_DISCONNECT ? "disconnect"
                                                                              : "cancel"));
    return r;
}

/* ------------------------------------------------------------------------- */
/* Jobs and the queue                                                        */

static void s_job_free(s_job_t *job)
{
    if (!job)
        return;
    if (job->remask_begun && job->params.remask->request_end)
        job->params.remask->request_end(job->params.remask_state);
    um_request_clear(&job->req);
    free(job->prompt);
    free(job->answer);
    free(job->remask_params);
    free(job);
}

static void s_queue_push(um_server_t *srv, s_job_t *job)
{
    job->next = NULL;
    if (srv->queue_tail)
        srv->queue_tail->next = job;
    else
        srv->queue_head = job;
    srv->queue_tail = job;
    srv->queue_len++;
}

/* Unlink job from the queue; prev is its predecessor or NULL for the head. */
static void s_queue_unlink(um_server_t *srv, s_job_t *prev, s_job_t *job)
{
    if (prev)
        prev->next = job->next;
    else
        srv->queue_head = job->next;
    if (srv->queue_tail == job)
        srv->queue_tail = prev;
    job->next = NULL;
    srv->queue_len--;
}

/* The running or waiting job of client with this id, or NULL. */
static s_job_t *s_find_job(um_server_t *srv, const s_client_t *client, const json_t *id,
                           s_job_t **prev_out)
{
    *prev_out = NULL;
    for (int32_t i = 0; i < srv->n_running; i++)
        if (s_same_client(&srv->running[i]->client, client)
            && json_equal(srv->running[i]->req.id, (json_t *)id))
            return srv->running[i];
    s_job_t *prev = NULL;
    for (s_job_t *j = srv->queue_head; j; prev = j, j = j->next) {
        if (s_same_client(&j->client, client) && json_equal(j->req.id, (json_t *)id)) {
            *prev_out = prev;
            return j;
        }
    }
    return NULL;
}

/* Index of job in the running set, or -1. */
static int32_t s_running_index(const um_server_t *srv, const s_job_t *job)
{
    for (int32_t i = 0; i < srv->n_running; i++)
        if (srv->running[i] == job)
            return i;
    return -1;
}

/* Remove entry i of the running set, keeping the others in order. */
static void s_running_remove(um_server_t *srv, int32_t i)
{
    memmove(srv->running + i, srv->running + i + 1,
            (size_t)(srv->n_running - i - 1) * sizeof *srv->running);
    srv->n_running--;
}

/* Flag every running job with reason (S_CANCEL, S_SHUTDOWN); each ends after its step. */
static void s_running_cancel(um_server_t *srv, int reason)
{
    for (int32_t i = 0; i < srv->n_running; i++)
        atomic_store(&srv->running[i]->cancel, reason);
}

/*
 * Whether the worker can take the job at the head of the queue: a generate job while
 * fewer than max_batch generate jobs run, a score job only when nothing runs, since it
 * runs alone.
 */
static int s_worker_has_room(const um_server_t *srv, const s_job_t *head)
{
    if (srv->n_running == 0)
        return 1;
    if (head->score || srv->running[0]->score)
        return 0;
    return srv->n_running < srv->max_batch;
}

/* Whether a new job would wait in the queue rather than start at once. */
static int s_must_wait(const um_server_t *srv, const s_job_t *job)
{
    return srv->queue_head != NULL || !s_worker_has_room(srv, job);
}

/*
 * Hand the oldest waiting jobs to the worker while it has room. Jobs start in arrival
 * order: a score job at the head waits until the running generate jobs end.
 */
static void s_dispatch(um_server_t *srv)
{
    while (srv->queue_head && srv->stopping != S_CANCELLING
           && s_worker_has_room(srv, srv->queue_head)) {
        s_job_t *job = srv->queue_head;
        s_queue_unlink(srv, NULL, job);
        char kind = S_MSG_JOB;
        if (s_send(srv->pipe, &kind, 1, ZMQ_SNDMORE) < 0
            || s_send(srv->pipe, &job, sizeof job, 0) < 0) {
            /* The worker cannot be reached, so the job gets an internal error here. */
            um_req_error_t err;
            um_req_error_set(&err, UM_ERR_INTERNAL, NULL, "the worker thread cannot be "
                             "reached: %s", zmq_strerror(errno));
            s_send_error(srv, &job->client, job->req.id, &err);
            s_job_free(job);
            return;
        }
        srv->running[srv->n_running++] = job;
        um_debug("server", "request %s: %s running after %.1f ms in the queue, %d running",
                 job->id_text, job->score ? "score" : "generate",
                 s_now_ms() - job->t_accept_ms, srv->n_running);
    }
}

/* ------------------------------------------------------------------------- */
/* Worker thread                                                             */

typedef struct s_step_ctx {
    um_server_t *srv;
    void *pipe;
    s_job_t *job;
    int32_t steps_run;
} s_step_ctx_t;

static int s_pipe_send(void *pipe, char kind, s_job_t *job, const char *payload, size_t len)
{
    if (s_send(pipe, &kind, 1, ZMQ_SNDMORE) < 0 || s_send(pipe, &job, sizeof job, ZMQ_SNDMORE) < 0
        || s_send(pipe, payload, len, 0) < 0)
        return -1;
    return 0;
}

/* Send a reply from the worker to the main thread, releasing it. */
static void s_pipe_send_json(void *pipe, char kind, s_job_t *job, json_t *reply)
{
    size_t len = 0;
    char *text = um_reply_dump(reply, &len);
    int rc = text ? s_pipe_send(pipe, kind, job, text, len)
                  : s_pipe_send(pipe, S_MSG_ERROR, job, s_oom_reply, sizeof s_oom_reply - 1);
    if (rc != 0)
        um_error("worker", "sending a reply to the main thread failed: %s", zmq_strerror(errno));
    free(text);
}

/* Decode one token for a step reply; an undecodable id gets "" rather than failing the step. */
static json_t *s_token_text(um_tokenizer_t *tok, int32_t id)
{
    char *text = NULL;
    size_t len = 0;
    if (um_tokenizer_decode(tok, &id, 1, 0, &text, &len) != 0)
        return json_string("");
    json_t *v = um_reply_textn(text, len);
    free(text);
    return v;
}

/*
 * The canvas of a step reply: "canvas" has one entry per generated position, the token
 * or null while masked, and "infill" the same for each mask written in the prompt.
 */
static void s_add_canvas(json_t *r, um_server_t *srv, const s_job_t *job,
                         const um_step_info_t *info)
{
    const int32_t mask_id = srv->model_cfg->mask_token_id;
    json_t *canvas = json_array();
    for (int32_t pos = job->n_prompt; pos < info->canvas_length; pos++)
        json_array_append_new(canvas, info->canvas[pos] == mask_id
                                          ? json_null()
                                          : json_integer(info->canvas[pos]));
    json_object_set_new(r, "canvas", canvas);
    json_t *infill = NULL;
    for (int32_t pos = 0; pos < job->n_prompt; pos++) {
        if (job->prompt[pos] != mask_id)
            continue;
        if (!infill)
            infill = json_array();
        json_t *e = json_object();
        json_object_set_new(e, "pos", json_integer(pos - job->n_prompt));
        json_object_set_new(e, "token", info->canvas[pos] == mask_id
                                            ? json_null()
                                            : json_integer(info->canvas[pos]));
        json_array_append_new(infill, e);
    }
    if (infill)
        json_object_set_new(r, "infill", infill);
}

/* um_generate's step callback: stops a cancelled job, and streams the step when asked. */
static int s_on_step(void *user, const um_step_info_t *info)
{
    s_step_ctx_t *c = user;
    s_job_t *job = c->job;
    c->steps_run++;
    atomic_store(&job->steps_done, c->steps_run);
    if (atomic_load(&job->cancel) != S_RUN)
        return 1;
    if (!job->req.stream)
        return 0;

    json_t *r = um_reply_new(job->req.id, UM_REPLY_STEP);
    json_t *committed = json_array();
    if (!r || !committed) {
        json_decref(r);
        json_decref(committed);
        return 0;
    }
    um_tokenizer_t *tok = c->srv->tok_worker;
    for (int32_t i = 0; i < info->n_committed; i++) {
        int32_t pos = info->committed[i];
        int32_t token = info->canvas[pos];
        json_t *e = json_object();
        /* Positions count from the first generated token, so masks in the prompt are < 0. */
        json_object_set_new(e, "pos", json_integer(pos - job->n_prompt));
        json_object_set_new(e, "token", json_integer(token));
        json_object_set_new(e, "text", s_token_text(tok, token));
        if (tok->ops->is_special && tok->ops->is_special(tok->state, token))
            json_object_set_new(e, "special", json_true());
        json_array_append_new(committed, e);
    }
    json_object_set_new(r, "step", json_integer(info->step));
    json_object_set_new(r, "steps", json_integer(info->n_steps));
    json_object_set_new(r, "block", json_integer(info->block));
    json_object_set_new(r, "blocks", json_integer(info->n_blocks));
    json_object_set_new(r, "committed", committed);
    json_object_set_new(r, "masked", json_integer(info->n_masked));
    json_object_set_new(r, "step_ms", json_real(info->step_ms));
    s_add_canvas(r, c->srv, job, info);
    if (info->early_stop)
        json_object_set_new(r, "early_stop", json_true());
    s_pipe_send_json(c->pipe, S_MSG_STEP, job, r);
    return 0;
}

/*
 * Decode the n_gen tokens after the prompt as the text that continues the prompt: the
 * decoded prompt plus generation, less the decoded prompt. Decoding the generation alone
 * loses the space a WordPiece or SentencePiece tokenizer puts between words ("was" +
 * "little" decodes to "was little", but "little" alone to "little"). When the decoded
 * prompt is not a prefix of the whole, the generation is decoded alone.
 */
static int s_decode_continuation(um_tokenizer_t *tok, const int32_t *canvas, int32_t n_prompt,
                                 int32_t n_gen, char **text, size_t *len)
{
    char *head = NULL, *full = NULL;
    size_t head_len = 0, full_len = 0;
    if (n_prompt > 0
        && um_tokenizer_decode(tok, canvas, (size_t)n_prompt, UM_DECODE_SKIP_SPECIAL, &head,
                               &head_len) == 0
        && um_tokenizer_decode(tok, canvas, (size_t)n_prompt + (size_t)n_gen,
                               UM_DECODE_SKIP_SPECIAL, &full, &full_len) == 0
        && full_len >= head_len && memcmp(full, head, head_len) == 0) {
        memmove(full, full + head_len, full_len - head_len + 1);
        free(head);
        *text = full;
        *len = full_len - head_len;
        return 0;
    }
    free(head);
    free(full);
    return um_tokenizer_decode(tok, canvas + n_prompt, (size_t)n_gen, UM_DECODE_SKIP_SPECIAL,
                               text, len);
}

static json_t *s_done_reply(um_server_t *srv, const s_job_t *job, const int32_t *canvas,
                            const um_gen_stats_t *stats, int32_t steps_run, char *err,
                            size_t errlen)
{
    const int32_t *gen = canvas + job->n_prompt;
    int32_t n_gen = job->params.gen_length;
    const int32_t eos_at = stats->eos_position >= 0 ? stats->eos_position - job->n_prompt : -1;
    if (job->req.trim_eos && eos_at >= 0)
        n_gen = eos_at;
    char *text = NULL;
    size_t text_len = 0;
    int rc = s_decode_continuation(srv->tok_worker, canvas, job->n_prompt, n_gen, &text,
                                   &text_len);
    if (rc != 0) {
        snprintf(err, errlen, "decoding the %d generated tokens failed: %s", n_gen,
                 um_strerror(rc));
        return NULL;
    }
    json_t *r = um_reply_new(job->req.id, UM_REPLY_DONE);
    json_t *tokens = json_array();
    json_t *st = json_object();
    if (!r || !tokens || !st) {
        free(text);
        json_decref(r);
        json_decref(tokens);
        json_decref(st);
        snprintf(err, errlen, "out of memory while building the reply");
        return NULL;
    }
    for (int32_t i = 0; i < n_gen; i++)
        json_array_append_new(tokens, json_integer(gen[i]));
    json_object_set_new(r, "text", um_reply_textn(text, text_len));
    free(text);
    json_object_set_new(r, "tokens", tokens);
    json_object_set_new(r, "prompt_tokens", json_integer(job->n_prompt));

    /* Masks written in the prompt were filled in as well: report them by position. */
    json_t *infill = NULL;
    const int32_t mask_id = srv->model_cfg->mask_token_id;
    for (int32_t i = 0; i < job->n_prompt; i++) {
        if (job->prompt[i] != mask_id)
            continue;
        if (!infill)
            infill = json_array();
        json_t *e = json_object();
        json_object_set_new(e, "pos", json_integer(i - job->n_prompt));
        json_object_set_new(e, "token", json_integer(canvas[i]));
        json_object_set_new(e, "text", s_token_text(srv->tok_worker, canvas[i]));
        json_array_append_new(infill, e);
    }
    if (infill)
        json_object_set_new(r, "infill", infill);
    json_object_set_new(r, "seed", json_integer((json_int_t)job->params.seed));
    json_object_set_new(r, "finish", json_string(eos_at >= 0 ? "eos" : "length"));
    json_object_set_new(r, "eos_pos", eos_at >= 0 ? json_integer(eos_at) : json_null());

    double total_ms = stats->total_ms;
    json_object_set_new(st, "forward_passes", json_integer(stats->forward_passes));
    json_object_set_new(st, "steps", json_integer(steps_run));
    json_object_set_new(st, "steps_planned", json_integer(stats->steps_planned));
    json_object_set_new(st, "total_ms", json_real(total_ms));
    json_object_set_new(st, "ms_per_step", json_real(steps_run > 0 ? total_ms / steps_run : 0.0));
    json_object_set_new(st, "tokens_per_second",
                        json_real(total_ms > 0 ? job->params.gen_length / (total_ms / 1e3)
                                               : 0.0));
    json_object_set_new(st, "ms_per_token", json_real(total_ms / job->params.gen_length));
    json_object_set_new(st, "forward_ms", json_real(stats->forward_ms));
    json_object_set_new(st, "sample_ms", json_real(stats->sample_ms));
    json_object_set_new(st, "early_stop", json_boolean(stats->early_stop));
    json_object_set_new(st, "cache", json_string(um_cache_mode_name(job->params.cache)));
    json_object_set_new(st, "cached_passes", json_integer(stats->cached_passes));
    json_object_set_new(st, "cache_bytes", json_integer((json_int_t)stats->cache_bytes));
    json_object_set_new(st, "batch_size", json_integer(stats->batch_size));
    json_object_set_new(r, "stats", st);
    return r;
}

/* um_score's batch callback: stops a cancelled job. */
static int s_score_should_stop(void *user)
{
    const s_job_t *job = user;
    return atomic_load(&job->cancel) != S_RUN;
}

/* Run a score job on the worker thread and send its final reply. */
static void s_worker_score(um_server_t *srv, void *pipe, s_job_t *job)
{
    um_score_params_t p = job->score_params;
    p.on_batch = s_score_should_stop;
    p.user = job;
    um_score_result_t r;
    char err[512] = "";
    int rc = um_score(srv->model, job->prompt, job->n_prompt, job->answer, job->n_answer, &p,
                      &r, err, sizeof err);
    if (rc == UM_ECANCELLED) {
        s_pipe_send_json(pipe, S_MSG_CANCELLED, job,
                         s_cancelled_reply(job->req.id, atomic_load(&job->cancel)));
        return;
    }
    if (rc != 0) {
        um_req_error_t e;
        um_req_error_set(&e, UM_ERR_INTERNAL, NULL, "scoring failed (%s): %s",
                         um_error_name(rc), err[0] ? err : um_strerror(rc));
        um_warn("worker", "request %s: %s", job->id_text, e.message);
        s_pipe_send_json(pipe, S_MSG_ERROR, job, um_reply_error(job->req.id, &e));
        return;
    }
    json_t *reply = um_reply_new(job->req.id, UM_REPLY_DONE);
    json_t *st = json_object();
    if (!reply || !st) {
        json_decref(reply);
        json_decref(st);
        um_req_error_t e;
        um_req_error_set(&e, UM_ERR_INTERNAL, NULL, "out of memory while building the reply");
        s_pipe_send_json(pipe, S_MSG_ERROR, job, um_reply_error(job->req.id, &e));
        return;
    }
    json_object_set_new(reply, "log_likelihood", json_real(r.log_likelihood));
    json_object_set_new(reply, "std_error", json_real(r.std_error));
    json_object_set_new(reply, "n_samples", json_integer(r.n_samples));
    json_object_set_new(reply, "prompt_tokens", json_integer(job->n_prompt));
    json_object_set_new(reply, "answer_tokens", json_integer(job->n_answer));
    json_object_set_new(reply, "seed", json_integer((json_int_t)p.seed));
    json_object_set_new(st, "forward_passes", json_integer(r.forward_passes));
    json_object_set_new(st, "total_ms", json_real(r.total_ms));
    json_object_set_new(reply, "stats", st);
    s_pipe_send_json(pipe, S_MSG_DONE, job, reply);
}

/* A generate job on the worker: its generation, canvas and step callback context. */
typedef struct s_active {
    s_job_t *job;
    um_gen_t *gen;
    int32_t *canvas; /* (n_prompt + gen_length + n_suffix) */
    s_step_ctx_t ctx;
} s_active_t;

/* Send the internal error reply of a generate job that failed with rc. */
static void s_worker_fail(void *pipe, s_job_t *job, int rc, const char *err)
{
    um_req_error_t e;
    um_req_error_set(&e, UM_ERR_INTERNAL, NULL, "generation failed (%s): %s",
                     um_error_name(rc), err[0] ? err : um_strerror(rc));
    um_warn("worker", "request %s: %s", job->id_text, e.message);
    s_pipe_send_json(pipe, S_MSG_ERROR, job, um_reply_error(job->req.id, &e));
}

/*
 * Start a generate job. Returns its state, or NULL after sending its error reply. The
 * state does not move while the generation runs, because its step callback keeps a
 * pointer to ctx.
 */
static s_active_t *s_worker_begin(um_server_t *srv, void *pipe, s_job_t *job)
{
    const size_t n_canvas = (size_t)job->n_prompt + (size_t)job->params.gen_length
                            + (size_t)job->params.n_suffix;
    char err[512] = "";
    s_active_t *a = calloc(1, sizeof *a);
    int32_t *canvas = malloc(n_canvas * sizeof *canvas);
    if (!a || !canvas) {
        free(a);
        free(canvas);
        snprintf(err, sizeof err, "out of memory for a canvas of %zu tokens", n_canvas);
        s_worker_fail(pipe, job, UM_ENOMEM, err);
        return NULL;
    }
    *a = (s_active_t){.job = job, .canvas = canvas,
                      .ctx = {.srv = srv, .pipe = pipe, .job = job, .steps_run = 0}};
    int rc = um_gen_begin(srv->model, job->prompt, job->n_prompt, &job->params, s_on_step,
                          &a->ctx, canvas, &a->gen, err, sizeof err);
    if (rc != 0) {
        free(canvas);
        free(a);
        s_worker_fail(pipe, job, rc, err);
        return NULL;
    }
    return a;
}

/* End a generate job whose generation is done: send its final reply and free a. */
static void s_worker_end(um_server_t *srv, void *pipe, s_active_t *a)
{
    s_job_t *job = a->job;
    char err[512] = "";
    um_gen_stats_t stats = {0};
    int rc = um_gen_end(&a->gen, &stats, err, sizeof err);
    if (rc == UM_ECANCELLED) {
        s_pipe_send_json(pipe, S_MSG_CANCELLED, job,
                         s_cancelled_reply(job->req.id, atomic_load(&job->cancel)));
    } else {
        json_t *reply = NULL;
        if (rc == 0)
            reply = s_done_reply(srv, job, a->canvas, &stats, a->ctx.steps_run, err,
                                 sizeof err);
        if (reply)
            s_pipe_send_json(pipe, S_MSG_DONE, job, reply);
        else
            s_worker_fail(pipe, job, rc != 0 ? rc : UM_ENOMEM, err);
    }
    free(a->canvas);
    free(a);
}

/*
 * Receive one message from the main thread: its kind and job pointer (NULL for quit).
 * flags 0 waits; ZMQ_DONTWAIT returns 0 when none is waiting. Returns 1 with a message,
 * 0 without one, or -1 when the pipe failed.
 */
static int s_worker_recv(void *pipe, int flags, char *kind, s_job_t **job)
{
    zmq_msg_t msg;
    zmq_msg_init(&msg);
    if (s_msg_recv(&msg, pipe, flags) < 0) {
        zmq_msg_close(&msg);
        if (errno == EAGAIN)
            return 0;
        um_error("worker", "receiving from the main thread failed: %s", zmq_strerror(errno));
        return -1;
    }
    *kind = zmq_msg_size(&msg) == 1 ? *(char *)zmq_msg_data(&msg) : 0;
    zmq_msg_close(&msg);
    *job = NULL;
    if (s_more(pipe)) {
        zmq_msg_init(&msg);
        if (s_msg_recv(&msg, pipe, 0) >= 0 && zmq_msg_size(&msg) == sizeof *job)
            memcpy(job, zmq_msg_data(&msg), sizeof *job);
        zmq_msg_close(&msg);
        s_drain(pipe);
    }
    return 1;
}

/*
 * Take the jobs the main thread sent: wait for one while nothing runs, else take only
 * those already waiting, so that they join at the next step. A score job runs here to
 * its end; the main thread sends one only while no generate job runs. Returns 1 when
 * the main thread sent quit or the pipe failed.
 */
static int s_worker_take(um_server_t *srv, void *pipe, s_active_t **active, int32_t *n_active)
{
    for (;;) {
        char kind = 0;
        s_job_t *job = NULL;
        int got = s_worker_recv(pipe, *n_active == 0 ? 0 : ZMQ_DONTWAIT, &kind, &job);
        if (got < 0)
            return 1;
        if (got == 0)
            return 0;
        if (kind == S_MSG_QUIT)
            return 1;
        UM_ASSERT(kind == S_MSG_JOB && job != NULL);
        if (job->score) {
            s_worker_score(srv, pipe, job);
            continue;
        }
        UM_ASSERT(*n_active < srv->max_batch);
        s_active_t *a = s_worker_begin(srv, pipe, job);
        if (a)
            active[(*n_active)++] = a;
    }
}

static void *s_worker_main(void *arg)
{
    um_server_t *srv = arg;
#ifdef _OPENMP
    /* OpenMP keeps the thread count per thread, so the main thread's setting does not
       reach this one. */
    if (srv->cfg.threads > 0)
        omp_set_num_threads(srv->cfg.threads);
#endif
    void *pipe = zmq_socket(srv->zctx, ZMQ_PAIR);
    s_active_t **active = calloc((size_t)srv->max_batch, sizeof *active);
    um_gen_t **gens = calloc((size_t)srv->max_batch, sizeof *gens);
    if (!pipe || !active || !gens || zmq_connect(pipe, srv->pipe_name) != 0) {
        um_error("worker", "connecting to %s failed: %s", srv->pipe_name,
                 !active || !gens ? "out of memory" : zmq_strerror(errno));
        if (pipe)
            zmq_close(pipe);
        free(active);
        free(gens);
        return NULL;
    }
    void *none = NULL;
    s_pipe_send(pipe, S_MSG_READY, none, "", 0);

    int32_t n_active = 0;
    while (!s_worker_take(srv, pipe, active, &n_active)) {
        if (n_active == 0)
            continue;
        for (int32_t i = 0; i < n_active; i++)
            gens[i] = active[i]->gen;
        if (um_gen_step_batch(gens, n_active) != 0) {
            /* No memory for the shared pass's bookkeeping: step each job alone. */
            for (int32_t i = 0; i < n_active; i++)
                if (!um_gen_done(gens[i]))
                    um_gen_step(gens[i]);
        }
        int32_t kept = 0;
        for (int32_t i = 0; i < n_active; i++) {
            if (um_gen_done(active[i]->gen))
                s_worker_end(srv, pipe, active[i]);
            else
                active[kept++] = active[i];
        }
        n_active = kept;
    }
    /* The main thread quits only once every job has its final reply, so none is left
       here unless the pipe failed; those end as cancelled. */
    for (int32_t i = 0; i < n_active; i++)
        s_worker_end(srv, pipe, active[i]);
    free(active);
    free(gens);
    zmq_close(pipe);
    return NULL;
}

/* Start the worker thread and wait for its ready message. */
static int s_worker_start(um_server_t *srv, char *err, size_t errlen)
{
    /* The worker and the OpenMP threads it starts block the asynchronous signals, so
       SIGINT and SIGTERM reach the main thread and never interrupt the worker's system
       calls. The signals of a fault stay unblocked: blocked, they kill the process at
       once, before a sanitizer or a core dump can tell where it crashed. */
    sigset_t all, old;
    sigfillset(&all);
    const int faults[] = {SIGSEGV, SIGBUS, SIGFPE, SIGILL, SIGTRAP, SIGABRT};
    for (size_t i = 0; i < sizeof faults / sizeof faults[0]; i++)
        sigdelset(&all, faults[i]);
    pthread_sigmask(SIG_BLOCK, &all, &old);
    int rc = pthread_create(&srv->worker, NULL, s_worker_main, srv);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (rc != 0) {
        snprintf(err, errlen, "cannot start the worker thread: %s", strerror(rc));
        return UM_ENOMEM;
    }
    srv->worker_started = 1;

    /* The worker's first message is 'r'; if it could not connect it has exited instead,
       so wait with a timeout rather than forever. */
    zmq_pollitem_t item = {.socket = srv->pipe, .events = ZMQ_POLLIN};
    int n;
    do
        n = zmq_poll(&item, 1, 10000);
    while (n < 0 && errno == EINTR);
    if (n <= 0) {
        snprintf(err, errlen, "the worker thread did not start within 10 s");
        return UM_EIO;
    }
    zmq_msg_t msg;
    zmq_msg_init(&msg);
    s_msg_recv(&msg, srv->pipe, 0);
    zmq_msg_close(&msg);
    s_drain(srv->pipe);
    return 0;
}

/*
 * Stop the worker: cancel its jobs, wait for their final replies (dropped here, since
 * um_server_run has returned), then send quit and join the thread.
 */
static void s_worker_stop(um_server_t *srv)
{
    if (!srv->worker_started)
        return;
    s_running_cancel(srv, S_SHUTDOWN);
    while (srv->n_running > 0) {
        zmq_msg_t msg;
        zmq_msg_init(&msg);
        if (s_msg_recv(&msg, srv->pipe, 0) < 0) {
            zmq_msg_close(&msg);
            break;
        }
        char kind = zmq_msg_size(&msg) == 1 ? *(char *)zmq_msg_data(&msg) : 0;
        zmq_msg_close(&msg);
        s_job_t *job = NULL;
        if (s_more(srv->pipe)) {
            zmq_msg_init(&msg);
            if (s_msg_recv(&msg, srv->pipe, 0) >= 0 && zmq_msg_size(&msg) == sizeof job)
                memcpy(&job, zmq_msg_data(&msg), sizeof job);
            zmq_msg_close(&msg);
        }
        s_drain(srv->pipe);
        int32_t i = s_running_index(srv, job);
        if (i >= 0 && (kind == S_MSG_DONE || kind == S_MSG_CANCELLED || kind == S_MSG_ERROR)) {
            s_running_remove(srv, i);
            s_job_free(job);
        }
    }
    /* Jobs without a final reply from the worker (its pipe failed) are freed without one. */
    while (srv->n_running > 0) {
        s_job_free(srv->running[srv->n_running - 1]);
        srv->n_running--;
    }
    /* Without DONTWAIT this would block forever on a worker that exited early. */
    char kind = S_MSG_QUIT;
    s_send(srv->pipe, &kind, 1, ZMQ_DONTWAIT);
    pthread_join(srv->worker, NULL);
    srv->worker_started = 0;
}

/* Forward one message from the worker to its client; a final reply ends the job. */
static void s_handle_worker(um_server_t *srv)
{
    zmq_msg_t head, ptr, payload;
    zmq_msg_init(&head);
    zmq_msg_init(&ptr);
    zmq_msg_init(&payload);
    char kind = 0;
    s_job_t *job = NULL;
    if (s_msg_recv(&head, srv->pipe, 0) >= 0 && zmq_msg_size(&head) == 1)
        kind = *(char *)zmq_msg_data(&head);
    if (s_more(srv->pipe) && s_msg_recv(&ptr, srv->pipe, 0) >= 0
        && zmq_msg_size(&ptr) == sizeof job)
        memcpy(&job, zmq_msg_data(&ptr), sizeof job);
    if (s_more(srv->pipe))
        s_msg_recv(&payload, srv->pipe, 0);
    s_drain(srv->pipe);

    int32_t index = s_running_index(srv, job);
    UM_ASSERT(job != NULL && index >= 0);
    s_send_to_client(srv, &job->client, zmq_msg_data(&payload), zmq_msg_size(&payload));
    zmq_msg_close(&head);
    zmq_msg_close(&ptr);
    zmq_msg_close(&payload);
    if (kind == S_MSG_STEP)
        return;

    const char *outcome = kind == S_MSG_DONE        ? UM_REPLY_DONE
                          : kind == S_MSG_CANCELLED ? UM_REPLY_CANCELLED
                                                    : UM_REPLY_ERROR;
    int steps = atomic_load(&job->steps_done);
    um_debug("server", "request %s: generate finished with %s after %d step%s, %.1f ms after "
             "it was accepted", job->id_text, outcome, steps, steps == 1 ? "" : "s",
             s_now_ms() - job->t_accept_ms);
    s_running_remove(srv, index);
    s_job_free(job);
    s_dispatch(srv);
}

/* ------------------------------------------------------------------------- */
/* info and health                                                           */

static json_t *s_param_spec_json(const um_param_spec_t *p)
{
    json_t *o = json_object();
    json_object_set_new(o, "name", json_string(p->name));
    json_object_set_new(o, "type", json_string(um_param_type_name(p->type)));
    int numeric = p->type == UM_PARAM_NUMBER || p->type == UM_PARAM_INTEGER;
    if (p->type == UM_PARAM_INTEGER)
        json_object_set_new(o, "default", json_integer((json_int_t)p->default_value));
    else if (p->type == UM_PARAM_NUMBER)
        json_object_set_new(o, "default", json_real(p->default_value));
    else if (p->type == UM_PARAM_BOOL)
        json_object_set_new(o, "default", json_boolean(p->default_value != 0));
    else
        json_object_set_new(o, "default", json_null());
    json_object_set_new(o, "min", numeric ? json_real(p->min) : json_null());
    json_object_set_new(o, "max", numeric ? json_real(p->max) : json_null());
    json_object_set_new(o, "help", p->help ? um_reply_text(p->help) : json_null());
    return o;
}

/* The defaults of a generate request's sampling fields, for the info reply. */
static json_t *s_generate_defaults_json(void)
{
    json_t *g = json_object();
    json_object_set_new(g, "gen_length", json_integer(UM_REQ_DEFAULT_GEN_LENGTH));
    json_object_set_new(g, "steps", json_string("gen_length"));
    json_object_set_new(g, "block_length", json_string("gen_length"));
    json_object_set_new(g, "temperature", json_real(0.0));
    json_object_set_new(g, "min_temperature", json_real(UM_SAMPLE_MIN_TEMPERATURE));
    json_object_set_new(g, "max_temperature", json_real(UM_SAMPLE_MAX_TEMPERATURE));
    json_object_set_new(g, "top_k", json_integer(0));
    json_object_set_new(g, "top_p", json_real(1.0));
    json_object_set_new(g, "cfg_scale", json_real(0.0));
    json_object_set_new(g, "max_cfg_scale", json_real(UM_GEN_MAX_CFG_SCALE));
    json_object_set_new(g, "remasking", json_string(UM_REQ_DEFAULT_REMASKING));
    json_object_set_new(g, "schedule", json_string("the policy's"));
    json_object_set_new(g, "schedules", json_pack("[s, s]", "quota", "timestep"));
    json_object_set_new(g, "eps", json_real(UM_REQ_DEFAULT_EPS));
    json_object_set_new(g, "ban_eos", json_false());
    json_object_set_new(g, "suppress_eos_confidence", json_false());
    json_object_set_new(g, "early_stop", json_false());
    json_object_set_new(g, "trim_eos", json_false());
    return g;
}

/* The limits a request meets before it is queued, for the info reply. */
static json_t *s_limits_json(const um_server_t *srv)
{
    json_t *l = json_object();
    json_object_set_new(l, "max_request_bytes",
                        json_integer((json_int_t)srv->cfg.max_request_bytes));
    json_object_set_new(l, "max_queue", json_integer((json_int_t)srv->cfg.max_queue));
    json_object_set_new(l, "max_batch", json_integer(srv->max_batch));
    json_object_set_new(l, "max_prompt_tokens", json_integer(srv->max_prompt_tokens));
    json_object_set_new(l, "max_gen_length", json_integer(srv->max_gen_length));
    json_object_set_new(l, "max_steps", srv->max_steps > 0 ? json_integer(srv->max_steps)
                                                           : json_null());
    json_object_set_new(l, "max_messages", json_integer(UM_REQ_MAX_MESSAGES));
    json_object_set_new(l, "shutdown_grace_s", json_real(srv->cfg.shutdown_grace_ms / 1e3));
    return l;
}

static json_t *s_plugin_json(const um_plugin_desc_t *d)
{
    json_t *o = json_object();
    json_object_set_new(o, "name", json_string(d->name));
    json_object_set_new(o, "version", d->version ? um_reply_text(d->version) : json_null());
    json_object_set_new(o, "description",
                        d->description ? um_reply_text(d->description) : json_null());
    char abi[32];
    snprintf(abi, sizeof abi, "%u.%u", d->abi_major, d->abi_minor);
    json_object_set_new(o, "abi", json_string(abi));
    if (d->kind == UM_PLUGIN_REMASK) {
        json_t *params = json_array();
        for (int32_t i = 0; i < d->remask->n_params; i++)
            json_array_append_new(params, s_param_spec_json(&d->remask->params[i]));
        json_object_set_new(o, "params", params);
        um_remask_traits_t t = um_remask_traits(d->remask);
        json_object_set_new(o, "sampler", json_string(um_token_sampler_name(t.sampler)));
        json_object_set_new(o, "schedule", json_string(um_schedule_name(t.schedule)));
        json_object_set_new(o, "adaptive", json_boolean(t.flags & UM_REMASK_ADAPTIVE));
    }
    return o;
}

/* The version number out of um_gemm_backend()'s "onednn X.Y.Z". */
static json_t *s_onednn_version(void)
{
    const char *b = um_gemm_backend();
    const char *prefix = "onednn ";
    if (strncmp(b, prefix, strlen(prefix)) == 0)
        return json_string(b + strlen(prefix));
    return um_reply_text(b);
}

static json_t *s_info_reply(um_server_t *srv, const json_t *id)
{
    const um_model_config_t *c = srv->model_cfg;
    json_t *r = um_reply_new(id, UM_REPLY_DONE);
    if (!r)
        return NULL;
    json_object_set_new(r, "version", json_string(PACKAGE_VERSION));
    json_object_set_new(r, "protocol", json_integer(UM_PROTOCOL_VERSION));

    json_t *m = json_object();
    json_object_set_new(m, "dir", um_reply_text(um_model_dir(srv->model)));
    json_object_set_new(m, "model_type", um_reply_text(c->model_type));
    json_object_set_new(m, "d_model", json_integer(c->d_model));
    json_object_set_new(m, "n_layers", json_integer(c->n_layers));
    json_object_set_new(m, "n_heads", json_integer(c->n_heads));
    json_object_set_new(m, "vocab_size", json_integer(c->vocab_size));
    json_object_set_new(m, "max_sequence_length", json_integer(c->max_sequence_length));
    json_object_set_new(m, "mask_token_id", json_integer(c->mask_token_id));
    json_object_set_new(m, "eos_token_id",
                        c->eos_token_id >= 0 ? json_integer(c->eos_token_id) : json_null());
    json_object_set_new(m, "eot_token_id",
                        srv->eot_id >= 0 ? json_integer(srv->eot_id) : json_null());
    json_object_set_new(m, "dtype", json_string(um_model_dtype(srv->model)));
    const char *chat = um_chat_kind_name(srv->chat.kind);
    json_object_set_new(m, "chat_template", chat ? json_string(chat) : json_null());
    /* Tokens the daemon adds around a prompt (BERT's [CLS] and [SEP]), which count
       against max_sequence_length beside the prompt and the generation. */
    int32_t prefix, suffix;
    um_model_framing(c, &prefix, &suffix);
    json_object_set_new(m, "framing_tokens", json_integer((prefix >= 0) + (suffix >= 0)));
    json_object_set_new(r, "model", m);
    json_object_set_new(r, "backend", um_reply_text(um_model_backend(srv->model)));
    json_object_set_new(r, "isa", json_string(um_isa_name(um_kernels_isa())));
    json_object_set_new(r, "isa_reason", um_reply_text(um_kernels_reason()));
    json_object_set_new(r, "attention", um_reply_text(um_attention_backend_name()));
    json_object_set_new(r, "weight_dtype",
                        json_string(um_wdtype_name(um_model_weight_dtype(srv->model))));
    json_object_set_new(r, "tokenizer", json_string(srv->tok->plugin->desc->name));

    json_t *remask = json_array(), *tokenizer = json_array();
    for (size_t i = 0; i < srv->plugins->n; i++) {
        const um_plugin_desc_t *d = srv->plugins->items[i].desc;
        json_array_append_new(d->kind == UM_PLUGIN_REMASK ? remask : tokenizer,
                              s_plugin_json(d));
    }
    json_t *plugins = json_object();
    json_object_set_new(plugins, "remask", remask);
    json_object_set_new(plugins, "tokenizer", tokenizer);
    json_object_set_new(r, "plugins", plugins);
    json_object_set_new(r, "generate", s_generate_defaults_json());
    json_object_set_new(r, "limits", s_limits_json(srv));
    json_object_set_new(r, "curve", json_boolean(srv->zap != NULL));

    int major, minor, patch;
    zmq_version(&major, &minor, &patch);
    char zver[32];
    snprintf(zver, sizeof zver, "%d.%d.%d", major, minor, patch);
    json_t *libs = json_object();
    json_object_set_new(libs, "zmq", json_string(zver));
#if JANSSON_VERSION_HEX >= 0x020d00
    json_object_set_new(libs, "jansson", json_string(jansson_version_str()));
#else
    json_object_set_new(libs, "jansson", json_string(JANSSON_VERSION));
#endif
    json_object_set_new(libs, "onednn", s_onednn_version());
    json_object_set_new(r, "libraries", libs);
    return r;
}

static json_t *s_health_reply(um_server_t *srv, const json_t *id)
{
    json_t *r = um_reply_new(id, UM_REPLY_DONE);
    if (!r)
        return NULL;
    json_object_set_new(r, "status", json_string(srv->stopping ? "stopping" : "ok"));
    json_object_set_new(r, "queue", json_integer((json_int_t)srv->queue_len));
    json_object_set_new(r, "busy", json_boolean(srv->n_running > 0));
    json_object_set_new(r, "uptime_s", json_real((s_now_ms() - srv->t_start_ms) / 1e3));
    return r;
}

/* ------------------------------------------------------------------------- */
/* tokenize, detokenize, cancel                                              */

/*
 * Render the request's messages with the model's chat template into *text (malloc'ed).
 * Returns 0, or -1 with err set.
 */
static int s_render_messages(um_server_t *srv, const um_request_t *req, char **text,
                             size_t *len, um_req_error_t *err)
{
    char msg[512] = "";
    int rc = um_chat_render(&srv->chat, req->messages, text, len, msg, sizeof msg);
    if (rc != 0) {
        um_req_error_set(err, rc == UM_ENOMEM ? UM_ERR_INTERNAL : UM_ERR_INVALID, "messages",
                         "%s", msg);
        return -1;
    }
    return 0;
}

static json_t *s_tokenize_reply(um_server_t *srv, const um_request_t *req, um_req_error_t *err)
{
    char *rendered = NULL;
    const char *text = req->text;
    size_t text_len = req->text_len;
    if (req->messages) {
        if (s_render_messages(srv, req, &rendered, &text_len, err) != 0)
            return NULL;
        text = rendered;
    }
    int32_t *ids = NULL;
    size_t n = 0;
    int rc = um_tokenizer_encode(srv->tok, text, text_len, &ids, &n);
    if (rc != 0) {
        um_req_error_set(err, UM_ERR_INTERNAL, req->messages ? "messages" : "text",
                         "tokenizer %s failed to encode %zu bytes of text: %s",
                         srv->tok->plugin->desc->name, text_len, um_strerror(rc));
        free(rendered);
        return NULL;
    }
    json_t *r = um_reply_new(req->id, UM_REPLY_DONE);
    json_t *tokens = json_array();
    for (size_t i = 0; i < n; i++)
        json_array_append_new(tokens, json_integer(ids[i]));
    free(ids);
    json_object_set_new(r, "tokens", tokens);
    /* A chat's reply carries the rendered text, so clients can show or reuse it. */
    if (rendered)
        json_object_set_new(r, "text", um_reply_textn(rendered, text_len));
    free(rendered);
    return r;
}

static json_t *s_detokenize_reply(um_server_t *srv, const um_request_t *req,
                                  um_req_error_t *err)
{
    int32_t vocab = srv->tok->ops->vocab_size(srv->tok->state);
    for (size_t i = 0; i < req->n_tokens; i++) {
        if (req->tokens[i] < 0 || req->tokens[i] >= vocab) {
            um_req_error_set(err, UM_ERR_OUT_OF_RANGE, "tokens", "tokens[%zu] is %d, outside "
                             "the vocabulary [0, %d): send ids that tokenize returned", i,
                             req->tokens[i], vocab);
            return NULL;
        }
    }
    char *text = NULL;
    size_t text_len = 0;
    int rc = um_tokenizer_decode(srv->tok, req->tokens, req->n_tokens, 0, &text, &text_len);
    if (rc != 0) {
        um_req_error_set(err, rc == UM_ERANGE ? UM_ERR_OUT_OF_RANGE : UM_ERR_INTERNAL, "tokens",
                         "tokenizer %s failed to decode %zu tokens: %s",
                         srv->tok->plugin->desc->name, req->n_tokens, um_strerror(rc));
        return NULL;
    }
    json_t *r = um_reply_new(req->id, UM_REPLY_DONE);
    json_object_set_new(r, "text", um_reply_textn(text, text_len));
    free(text);
    return r;
}

/*
 * Cancel a generate request of the same client. A waiting one is removed and gets its
 * "cancelled" reply at once. A running one is flagged and ends within one step.
 */
static json_t *s_cancel_reply(um_server_t *srv, const s_client_t *client,
                              const um_request_t *req, um_req_error_t *err)
{
    s_job_t *prev = NULL;
    s_job_t *job = s_find_job(srv, client, req->target, &prev);
    if (!job) {
        char idbuf[80];
        um_req_error_set(err, UM_ERR_NOT_FOUND, "target", "no request with id %s is "
                         "waiting or running for this connection: it may have finished "
                         "already, or it was sent on another socket",
                         um_request_id_text(req->target, idbuf, sizeof idbuf));
        return NULL;
    }
    if (s_running_index(srv, job) >= 0) {
        atomic_store(&job->cancel, S_CANCEL);
        int steps = atomic_load(&job->steps_done);
        um_debug("server", "request %s: cancel requested while it runs, after %d step%s",
                 job->id_text, steps, steps == 1 ? "" : "s");
    } else {
        s_queue_unlink(srv, prev, job);
        s_send_json(srv, &job->client, s_cancelled_reply(job->req.id, S_CANCEL));
        um_debug("server", "request %s: generate cancelled while waiting", job->id_text);
        s_job_free(job);
    }
    return um_reply_new(req->id, UM_REPLY_DONE);
}

/* ------------------------------------------------------------------------- */
/* generate                                                                  */

/*
 * Convert remasking_params to um_param_t values, check each one against the plugin's
 * spec (so the error names the parameter), then fill *out with one value per spec
 * entry, defaults included. Returns 0 or -1 with err filled.
 */
static int s_check_remask_params(const um_plugin_desc_t *plugin, json_t *params,
                                 um_param_t **out, um_req_error_t *err)
{
    const um_remask_ops_t *ops = plugin->remask;
    size_t n_in = params ? json_object_size(params) : 0;
    um_param_t *in = calloc(n_in + 1, sizeof *in);
    um_param_t *checked = calloc((size_t)ops->n_params + 1, sizeof *checked);
    const char **names = calloc((size_t)ops->n_params + 1, sizeof *names);
    if (!in || !checked || !names) {
        um_req_error_set(err, UM_ERR_INTERNAL, "remasking_params", "out of memory");
        goto fail;
    }
    for (int32_t s = 0; s < ops->n_params; s++)
        names[s] = ops->params[s].name;

    size_t i = 0;
    const char *key;
    json_t *v;
    json_object_foreach(params, key, v) {
        char field[96];
        snprintf(field, sizeof field, "remasking_params.%s", key);
        int32_t s = 0;
        while (s < ops->n_params && strcmp(ops->params[s].name, key) != 0)
            s++;
        if (s == ops->n_params) {
            char list[256] = "";
            size_t len = 0;
            for (int32_t k = 0; k < ops->n_params && len < sizeof list; k++)
                len += (size_t)snprintf(list + len, sizeof list - len, "%s%s", k ? ", " : "",
                                        names[k]);
            const char *hint = um_request_suggest(key, names, (size_t)ops->n_params);
            if (ops->n_params == 0)
                um_req_error_set(err, UM_ERR_UNKNOWN_FIELD, field, "unknown parameter \"%s\": "
                                 "remasking plugin %s takes no parameters", key, plugin->name);
            else
                um_req_error_set(err, UM_ERR_UNKNOWN_FIELD, field, "unknown parameter \"%s\" "
                                 "for remasking plugin %s: %s%s%saccepted parameters are %s",
                                 key, plugin->name, hint ? "did you mean " : "",
                                 hint ? hint : "", hint ? "? " : "", list);
            goto fail;
        }

        um_param_type_t want = ops->params[s].type;
        in[i].name = key;
        if (json_is_boolean(v)) {
            in[i].type = UM_PARAM_BOOL;
            in[i].number = json_is_true(v);
        } else if (json_is_integer(v)) {
            in[i].type = UM_PARAM_INTEGER;
            in[i].number = (double)json_integer_value(v);
        } else if (json_is_real(v)) {
            double x = json_real_value(v);
            /* JSON has one number type: 3.0 is a valid value for an integer parameter. */
            in[i].type = want == UM_PARAM_INTEGER && x == (double)(int64_t)x ? UM_PARAM_INTEGER
                                                                              : UM_PARAM_NUMBER;
            in[i].number = x;
        } else if (json_is_string(v)) {
            in[i].type = UM_PARAM_STRING;
            in[i].string = json_string_value(v);
        } else {
            um_req_error_set(err, UM_ERR_INVALID, field, "%s must be a %s, got %s", field,
                             um_param_type_name(want),
                             json_is_null(v) ? "null" : json_is_array(v) ? "an array"
                                                                         : "an object");
            goto fail;
        }

        char msg[512];
        int rc = um_params_check(ops->params, ops->n_params, &in[i], 1, checked, msg, sizeof msg);
        if (rc != 0) {
            um_req_error_set(err, rc == UM_ERANGE ? UM_ERR_OUT_OF_RANGE : UM_ERR_INVALID, field,
                             "remasking plugin %s: %s", plugin->name, msg);
            goto fail;
        }
        i++;
    }

    char msg[512];
    int rc = um_params_check(ops->params, ops->n_params, in, (int32_t)n_in, checked, msg,
                             sizeof msg);
    if (rc != 0) {
        um_req_error_set(err, rc == UM_ERANGE ? UM_ERR_OUT_OF_RANGE : UM_ERR_INVALID,
                         "remasking_params", "remasking plugin %s: %s", plugin->name, msg);
        goto fail;
    }
    free(in);
    free(names);
    *out = checked;
    return 0;

fail:
    free(in);
    free(checked);
    free(names);
    return -1;
}

static void s_unknown_plugin(um_server_t *srv, const char *name, um_req_error_t *err)
{
    const char *names[64];
    size_t n = 0;
    char list[512] = "";
    size_t len = 0;
    for (size_t i = 0; i < srv->plugins->n; i++) {
        const um_plugin_desc_t *d = srv->plugins->items[i].desc;
        if (d->kind != UM_PLUGIN_REMASK)
            continue;
        if (n < sizeof names / sizeof names[0])
            names[n++] = d->name;
        if (len < sizeof list)
            len += (size_t)snprintf(list + len, sizeof list - len, "%s%s", len ? ", " : "",
                                    d->name);
    }
    const char *hint = um_request_suggest(name, names, n);
    char clip[52];
    snprintf(clip, sizeof clip, "%s", name);
    um_req_error_set(err, UM_ERR_UNKNOWN_PLUGIN, "remasking", "unknown remasking plugin "
                     "\"%s\": %s%s%savailable: %s", clip, hint ? "did you mean " : "",
                     hint ? hint : "", hint ? "? " : "", list);
}

/*
 * Reject a block cache for a prompt with mask tokens (infilling): the cache never
 * predicts positions before the active block, so um_generate would refuse the job.
 * Returns 0, or -1 with err filled.
 */
static int s_check_cache(const um_server_t *srv, const s_job_t *job, um_req_error_t *err)
{
    if (job->params.cache == UM_CACHE_NONE)
        return 0;
    int32_t n_masks = 0;
    for (int32_t i = 0; i < job->n_prompt; i++)
        n_masks += job->prompt[i] == srv->model_cfg->mask_token_id;
    if (n_masks == 0)
        return 0;
    um_req_error_set(err, UM_ERR_INVALID, "cache", "cache \"%s\" cannot serve a prompt with %d "
                     "mask token%s (infilling), because the block cache never predicts "
                     "positions before the active block: use \"cache\": \"none\"",
                     um_cache_mode_name(job->params.cache), n_masks, n_masks == 1 ? "" : "s");
    return -1;
}

/*
 * Check a job against the operator's limits (--max-prompt-tokens, --max-gen-length,
 * --max-steps). um_gen_check has already held it to the model's positions, so with the
 * default limits none of them fails. Returns 0, or -1 with err filled.
 */
static int s_check_limits(const um_server_t *srv, const s_job_t *job, const um_request_t *req,
                          um_req_error_t *err)
{
    int chat = req->messages != NULL;
    if (job->n_prompt > srv->max_prompt_tokens) {
        int32_t prefix, suffix;
        um_model_framing(srv->model_cfg, &prefix, &suffix);
        um_req_error_set(err, UM_ERR_OUT_OF_RANGE, chat ? "messages" : "prompt", "the prompt "
                         "is %d tokens%s, over this daemon's limit of %d (--max-prompt-tokens): "
                         "shorten it", job->n_prompt,
                         prefix >= 0 ? " with the [CLS] the model reads first" : "",
                         srv->max_prompt_tokens);
        return -1;
    }
    if (job->params.gen_length > srv->max_gen_length) {
        um_req_error_set(err, UM_ERR_OUT_OF_RANGE, "gen_length", "gen_length %s %d, over this "
                         "daemon's limit of %d (--max-gen-length): ask for at most %d tokens",
                         req->gen_length_given ? "is" : "defaults to",
                         job->params.gen_length, srv->max_gen_length, srv->max_gen_length);
        return -1;
    }
    if (srv->max_steps > 0 && job->params.steps > srv->max_steps) {
        if (req->steps_given)
            um_req_error_set(err, UM_ERR_OUT_OF_RANGE, "steps", "steps is %d, over this "
                             "daemon's limit of %d (--max-steps): use at most %d steps",
                             job->params.steps, srv->max_steps, srv->max_steps);
        else
            um_req_error_set(err, UM_ERR_OUT_OF_RANGE, "steps", "steps defaults to gen_length, "
                             "%d, over this daemon's limit of %d (--max-steps): send \"steps\" "
                             "of at most %d", job->params.steps, srv->max_steps,
                             srv->max_steps);
        return -1;
    }
    return 0;
}

/* Put token before the job's prompt (BERT's [CLS]). */
static int s_prepend_token(s_job_t *job, int32_t token)
{
    int32_t *p = realloc(job->prompt, ((size_t)job->n_prompt + 1) * sizeof *p);
    if (!p)
        return UM_ENOMEM;
    memmove(p + 1, p, (size_t)job->n_prompt * sizeof *p);
    p[0] = token;
    job->prompt = p;
    job->n_prompt++;
    return 0;
}

/*
 * Tokenize the request's prompt, or its messages rendered with the model's chat
 * template, into job->prompt with the model's framing ([CLS] first, job->suffix after).
 * Returns 0, or -1 with err set.
 */
static int s_job_encode_prompt(um_server_t *srv, const um_request_t *req, s_job_t *job,
                               um_req_error_t *err)
{
    char *rendered = NULL;
    const char *prompt = req->prompt;
    size_t prompt_len = req->prompt_len;
    if (req->messages) {
        if (s_render_messages(srv, req, &rendered, &prompt_len, err) != 0)
            return -1;
        prompt = rendered;
    }
    size_t n_prompt = 0;
    int rc = um_tokenizer_encode(srv->tok, prompt, prompt_len, &job->prompt, &n_prompt);
    free(rendered);
    if (rc != 0) {
        um_req_error_set(err, UM_ERR_INTERNAL, req->messages ? "messages" : "prompt",
                         "tokenizer %s failed to encode the prompt: %s",
                         srv->tok->plugin->desc->name, um_strerror(rc));
        return -1;
    }
    if (n_prompt >= (size_t)INT32_MAX) {
        um_req_error_set(err, UM_ERR_OUT_OF_RANGE, "prompt", "the prompt has %zu tokens, more "
                         "than any model takes", n_prompt);
        return -1;
    }
    job->n_prompt = (int32_t)n_prompt;
    int32_t prefix = -1;
    um_model_framing(srv->model_cfg, &prefix, &job->suffix);
    if (prefix >= 0 && s_prepend_token(job, prefix) != 0) {
        um_req_error_set(err, UM_ERR_INTERNAL, NULL, "out of memory for the prompt");
        return -1;
    }
    return 0;
}

/*
 * Check a generate request completely and queue it. On success the job takes over
 * the request (req is zeroed) and 0 is returned; otherwise -1 with err filled.
 */
static int s_accept_generate(um_server_t *srv, const s_client_t *client, um_request_t *req,
                             um_req_error_t *err)
{
    if (srv->stopping) {
        um_req_error_set(err, UM_ERR_BUSY, NULL, "the daemon is shutting down and accepts no "
                         "new generate requests: send it to another instance, or retry once "
                         "this one has restarted");
        return -1;
    }
    s_job_t *prev = NULL;
    if (s_find_job(srv, client, req->id, &prev)) {
        char idbuf[80];
        um_req_error_set(err, UM_ERR_DUPLICATE_ID, "id", "a request with id %s is "
                         "already waiting or running for this connection: use a new id for "
                         "each request", um_request_id_text(req->id, idbuf, sizeof idbuf));
        return -1;
    }
    const um_plugin_t *plugin = um_plugins_find(srv->plugins, UM_PLUGIN_REMASK, req->remasking);
    if (!plugin && srv->plugin_path) {
        /* A plugin dropped into a plugin folder since startup is loaded now. */
        char idbuf[80];
        size_t added = um_plugins_rescan(srv->plugins, srv->plugin_path);
        if (added > 0)
            um_info("server", "request %s: rescanned the plugin folders for \"%.64s\": %zu "
                    "new plugin%s loaded", um_request_id_text(req->id, idbuf, sizeof idbuf),
                    req->remasking, added, added == 1 ? "" : "s");
        plugin = um_plugins_find(srv->plugins, UM_PLUGIN_REMASK, req->remasking);
    }
    if (!plugin) {
        s_unknown_plugin(srv, req->remasking, err);
        return -1;
    }

    s_job_t *job = calloc(1, sizeof *job);
    if (!job) {
        um_req_error_set(err, UM_ERR_INTERNAL, NULL, "out of memory for a new job");
        return -1;
    }
    job->client = *client;
    atomic_init(&job->cancel, S_RUN);
    um_request_id_text(req->id, job->id_text, sizeof job->id_text);

    if (s_job_encode_prompt(srv, req, job, err) != 0)
        goto fail;
    int rc;

    um_remask_traits_t traits = um_remask_traits(plugin->desc->remask);
    job->params = (um_gen_params_t){
        .gen_length = req->gen_length,
        .block_length = req->block_length,
        .steps = req->steps,
        .temperature = req->temperature,
        .cfg_scale = req->cfg_scale,
        .seed = req->has_seed ? req->seed : s_random_seed(),
        .remask = plugin->desc->remask,
        .remask_state = NULL,
        .top_k = req->top_k,
        .top_p = req->top_p,
        .schedule = req->schedule == UM_REQ_SCHEDULE_POLICY ? traits.schedule
                                                            : (um_schedule_t)req->schedule,
        .eps = req->eps,
        .eot_id = srv->eot_id,
        .ban_eos = req->ban_eos,
        .suppress_eos = req->suppress_eos_confidence,
        .early_stop = req->early_stop,
        .suffix = &job->suffix,
        .n_suffix = job->suffix >= 0 ? 1 : 0,
        .cache = (um_cache_mode_t)req->cache,
    };
    const char *field = NULL;
    char msg[512] = "";
    rc = um_gen_check(srv->model_cfg, job->n_prompt, &job->params, &field, msg, sizeof msg);
    if (rc != 0) {
        um_req_error_set(err, UM_ERR_OUT_OF_RANGE, field, "%s", msg);
        goto fail;
    }
    if (s_check_cache(srv, job, err) != 0)
        goto fail;
    if (s_check_limits(srv, job, req, err) != 0)
        goto fail;
    if (s_check_remask_params(plugin->desc, req->remasking_params, &job->remask_params, err) != 0)
        goto fail;

    if (s_must_wait(srv, job) && srv->queue_len >= srv->cfg.max_queue) {
        um_req_error_set(err, UM_ERR_BUSY, NULL, "the queue is full (%zu generate requests "
                         "waiting behind the %d running): retry later, or start unmaskd with a "
                         "larger --max-queue or --max-batch", srv->queue_len, srv->n_running);
        goto fail;
    }

    msg[0] = '\0';
    rc = job->params.remask->request_begin(um_plugin_host(), job->remask_params,
                                           job->params.remask->n_params,
                                           &job->params.remask_state, msg, sizeof msg);
    if (rc != 0) {
        um_req_error_set(err, rc == UM_ERANGE ? UM_ERR_OUT_OF_RANGE : UM_ERR_INVALID,
                         "remasking_params", "remasking plugin %s rejected the request: %s",
                         plugin->desc->name, msg[0] ? msg : um_strerror(rc));
        goto fail;
    }
    job->remask_begun = 1;

    job->req = *req;
    memset(req, 0, sizeof *req);
    job->t_accept_ms = s_now_ms();
    s_queue_push(srv, job);
    um_debug("server", "request %s: generate accepted: %d prompt tokens, gen_length %d, steps "
             "%d, block_length %d, remasking %s, schedule %s, temperature %g, seed %llu, %zu "
             "waiting", job->id_text, job->n_prompt, job->params.gen_length, job->params.steps,
             job->params.block_length, plugin->desc->name,
             um_schedule_name(job->params.schedule), job->params.temperature,
             (unsigned long long)job->params.seed, srv->queue_len);
    s_dispatch(srv);
    return 0;

fail:
    s_job_free(job);
    return -1;
}

/* Queue a score request (validated like generate, run by the worker like generate). */
static int s_accept_score(um_server_t *srv, const s_client_t *client, um_request_t *req,
                          um_req_error_t *err)
{
    if (srv->stopping) {
        um_req_error_set(err, UM_ERR_BUSY, NULL, "the daemon is shutting down and accepts no "
                         "new score requests: send it to another instance, or retry once this "
                         "one has restarted");
        return -1;
    }
    s_job_t *prev = NULL;
    if (s_find_job(srv, client, req->id, &prev)) {
        char idbuf[80];
        um_req_error_set(err, UM_ERR_DUPLICATE_ID, "id", "a request with id %s is already "
                         "waiting or running for this connection: use a new id for each "
                         "request", um_request_id_text(req->id, idbuf, sizeof idbuf));
        return -1;
    }
    s_job_t *job = calloc(1, sizeof *job);
    if (!job) {
        um_req_error_set(err, UM_ERR_INTERNAL, NULL, "out of memory for a new job");
        return -1;
    }
    job->client = *client;
    job->score = 1;
    atomic_init(&job->cancel, S_RUN);
    um_request_id_text(req->id, job->id_text, sizeof job->id_text);
    if (s_job_encode_prompt(srv, req, job, err) != 0)
        goto fail;

    size_t n_answer = 0;
    int rc = um_tokenizer_encode(srv->tok, req->answer, req->answer_len, &job->answer,
                                 &n_answer);
    if (rc != 0) {
        um_req_error_set(err, UM_ERR_INTERNAL, "answer", "tokenizer %s failed to encode the "
                         "answer: %s", srv->tok->plugin->desc->name, um_strerror(rc));
        goto fail;
    }
    if (n_answer >= (size_t)INT32_MAX) {
        um_req_error_set(err, UM_ERR_OUT_OF_RANGE, "answer", "the answer has %zu tokens, more "
                         "than any model takes", n_answer);
        goto fail;
    }
    job->n_answer = (int32_t)n_answer;
    /* An answer that contains a token the model never predicts ([MASK], BERT's [CLS] or
       [PAD]) has no likelihood, because the estimate masks answer tokens with [MASK]. */
    int32_t never[UM_MODEL_MAX_NEVER_SAMPLED];
    int32_t n_never = um_model_never_sampled(srv->model_cfg, never);
    for (int32_t i = 0; i < job->n_answer; i++) {
        for (int32_t j = 0; j < n_never; j++) {
            if (job->answer[i] != never[j])
                continue;
            const char *what = never[j] == srv->model_cfg->mask_token_id ? "the mask token"
                               : never[j] == srv->model_cfg->cls_token_id ? "[CLS]"
                                                                           : "[PAD]";
            um_req_error_set(err, UM_ERR_INVALID, "answer", "token %d of the answer is %s "
                             "(id %d), which the model never predicts, so it has no "
                             "likelihood: remove it from the answer", i, what, never[j]);
            goto fail;
        }
    }
    if (job->n_prompt > srv->max_prompt_tokens) {
        um_req_error_set(err, UM_ERR_OUT_OF_RANGE, req->messages ? "messages" : "prompt",
                         "the prompt is %d tokens, over this daemon's limit of %d "
                         "(--max-prompt-tokens): shorten it", job->n_prompt,
                         srv->max_prompt_tokens);
        goto fail;
    }
    /* The answer takes the positions a generation would, so --max-gen-length bounds it. */
    if (job->n_answer > srv->max_gen_length) {
        um_req_error_set(err, UM_ERR_OUT_OF_RANGE, "answer", "the answer is %d tokens, over "
                         "this daemon's limit of %d (--max-gen-length): shorten it",
                         job->n_answer, srv->max_gen_length);
        goto fail;
    }
    job->score_params = (um_score_params_t){
        .n_samples = req->n_samples,
        .batch_size = req->batch_size,
        .cfg_scale = req->cfg_scale,
        .seed = req->has_seed ? req->seed : s_random_seed(),
        .suffix = &job->suffix,
        .n_suffix = job->suffix >= 0 ? 1 : 0,
    };
    char msg[512] = "";
    rc = um_score_check(srv->model_cfg, job->n_prompt, job->n_answer, &job->score_params, msg,
                        sizeof msg);
    if (rc != 0) {
        const char *field = strstr(msg, "n_samples") == msg    ? "n_samples"
                            : strstr(msg, "batch_size") == msg ? "batch_size"
                            : strstr(msg, "cfg_scale") == msg  ? "cfg_scale"
                                                               : "answer";
        um_req_error_set(err, UM_ERR_OUT_OF_RANGE, field, "%s", msg);
        goto fail;
    }
    if (s_must_wait(srv, job) && srv->queue_len >= srv->cfg.max_queue) {
        um_req_error_set(err, UM_ERR_BUSY, NULL, "the queue is full (%zu requests waiting "
                         "behind the %d running): retry later, or start unmaskd with a larger "
                         "--max-queue", srv->queue_len, srv->n_running);
        goto fail;
    }

    job->req = *req;
    memset(req, 0, sizeof *req);
    job->t_accept_ms = s_now_ms();
    s_queue_push(srv, job);
    um_debug("server", "request %s: score accepted: %d prompt tokens, %d answer tokens, %d "
             "samples in batches of %d, seed %llu, %zu waiting", job->id_text, job->n_prompt,
             job->n_answer, job->score_params.n_samples, job->score_params.batch_size,
             (unsigned long long)job->score_params.seed, srv->queue_len);
    s_dispatch(srv);
    return 0;

fail:
    s_job_free(job);
    return -1;
}

/* ------------------------------------------------------------------------- */
/* Worker mode: the broker link (broker_link.h)                              */

static void s_begin_shutdown(um_server_t *srv);

/*
 * Drop every job, because the broker has forgotten this worker and would drop their
 * replies. Waiting jobs are freed without a reply. The running one is cancelled, and
 * its final reply goes to the new socket, where the broker drops it. Then register
 * again on a new socket.
 */
static void s_link_reset(um_server_t *srv)
{
    size_t dropped = srv->queue_len;
    while (srv->queue_head) {
        s_job_t *job = srv->queue_head;
        s_queue_unlink(srv, NULL, job);
        s_job_free(job);
    }
    /* NOTE: the cancelled job keeps the worker thread busy until its current step ends,
       while the broker already counts the full capacity as free. A request that fills
       the last place in that window gets "busy" from this daemon. */
    s_running_cancel(srv, S_CANCEL);
    if (dropped > 0 || srv->n_running > 0)
        um_notice("server", "dropped %zu waiting and %d running generate requests that the "
                  "broker no longer tracks", dropped, srv->n_running);

    char err[512];
    int rc = um_link_open(srv->link, s_info_reply(srv, NULL), err, sizeof err);
    srv->router = um_link_socket(srv->link);
    if (rc != 0) {
        um_error("server", "%s", err);
        srv->status = rc;
        s_begin_shutdown(srv);
    }
}

static void s_link_event(um_server_t *srv, um_link_event_t event)
{
    if (event == UM_LINK_RESET && !srv->stopping) {
        s_link_reset(srv);
    } else if (event == UM_LINK_REJECTED && !srv->stopping) {
        srv->status = UM_EUNSUPPORTED;
        s_begin_shutdown(srv);
    }
}

/* Connect to the broker instead of binding, and register. */
static int s_link_start(um_server_t *srv, char *err, size_t errlen)
{
    char name[160];
    if (srv->cfg.model_name)
        snprintf(name, sizeof name, "%s", srv->cfg.model_name);
    else
        um_link_default_name(um_model_dir(srv->model), name, sizeof name);
    um_link_config_t lc = {
        .endpoint = srv->cfg.connect,
        .model_name = name,
        .capacity = srv->cfg.max_queue + (size_t)srv->max_batch,
        .max_frame = (long long)srv->cfg.max_request_bytes * UM_SERVER_HARD_LIMIT_FACTOR,
        .curve_server_key = srv->cfg.curve_server_key,
        .curve_public_key = srv->cfg.curve_public_key,
        .curve_secret_key = srv->cfg.curve_secret_key,
    };
    snprintf(srv->endpoint, sizeof srv->endpoint, "%s", srv->cfg.connect);
    int rc = um_link_new(&srv->link, srv->zctx, &lc, err, errlen);
    if (rc == 0)
        rc = um_link_open(srv->link, s_info_reply(srv, NULL), err, errlen);
    if (srv->link)
        srv->router = um_link_socket(srv->link);
    return rc;
}

/* ------------------------------------------------------------------------- */
/* Client disconnects (bind mode)                                            */

/*
 * Remember that client sent a request over the connection with file descriptor fd.
 * NOTE: a request that is still unread when its connection's DISCONNECTED event is
 * handled runs to its end, because no later event names that connection.
 */
static void s_peer_seen(um_server_t *srv, int fd, const s_client_t *client)
{
    if (fd < 0 || !srv->monitor)
        return;
    for (size_t i = 0; i < srv->n_peers; i++) {
        if (srv->peers[i].fd == fd) {
            srv->peers[i].client = *client;
            return;
        }
    }
    if (srv->n_peers == srv->cap_peers) {
        size_t cap = srv->cap_peers ? srv->cap_peers * 2 : 16;
        s_peer_t *grown = realloc(srv->peers, cap * sizeof *grown);
        if (!grown) {
            um_warn("server", "out of memory for the connection table: a disconnect of this "
                    "client will not cancel its requests");
            return;
        }
        srv->peers = grown;
        srv->cap_peers = cap;
    }
    srv->peers[srv->n_peers++] = (s_peer_t){.fd = fd, .client = *client};
}

/* Cancel the jobs of a client whose connection closed, since their replies have no reader. */
static void s_client_gone(um_server_t *srv, const s_client_t *client)
{
    s_job_t *prev = NULL;
    for (s_job_t *job = srv->queue_head; job;) {
        s_job_t *next = job->next;
        if (s_same_client(&job->client, client)) {
            s_queue_unlink(srv, prev, job);
            um_info("server", "request %s: the client disconnected, so its waiting generate "
                    "request is dropped", job->id_text);
            s_job_free(job);
        } else {
            prev = job;
        }
        job = next;
    }
    for (int32_t i = 0; i < srv->n_running; i++) {
        s_job_t *job = srv->running[i];
        if (!s_same_client(&job->client, client) || atomic_load(&job->cancel) != S_RUN)
            continue;
        atomic_store(&job->cancel, S_DISCONNECT);
        int steps = atomic_load(&job->steps_done);
        um_info("server", "request %s: the client disconnected after %d step%s, so its "
                "running generate request is cancelled", job->id_text, steps,
                steps == 1 ? "" : "s");
    }
}

/*
 * Read every waiting event of the ROUTER's monitor. A DISCONNECTED event cancels the
 * jobs of the client last seen on that connection. An ACCEPTED event removes a stale
 * entry for the reused file descriptor.
 */
static void s_read_monitor(um_server_t *srv)
{
    if (!srv->monitor)
        return;
    for (;;) {
        zmq_msg_t head;
        zmq_msg_init(&head);
        if (s_msg_recv(&head, srv->monitor, ZMQ_DONTWAIT) < 0) {
            zmq_msg_close(&head);
            return;
        }
        /* The first frame is a 16-bit event and a 32-bit value, the fd for both events. */
        uint16_t event = 0;
        int32_t fd = -1;
        if (zmq_msg_size(&head) >= 6) {
            memcpy(&event, zmq_msg_data(&head), sizeof event);
            memcpy(&fd, (const char *)zmq_msg_data(&head) + 2, sizeof fd);
        }
        zmq_msg_close(&head);
        s_drain(srv->monitor); /* the endpoint frame */
        for (size_t i = 0; i < srv->n_peers; i++) {
            if (srv->peers[i].fd != fd)
                continue;
            s_client_t client = srv->peers[i].client;
            srv->peers[i] = srv->peers[--srv->n_peers];
            if (event == ZMQ_EVENT_DISCONNECTED)
                s_client_gone(srv, &client);
            break;
        }
    }
}

/* Start the ROUTER's monitor, which reports connections accepted and closed. */
static int s_monitor_start(um_server_t *srv, char *err, size_t errlen)
{
    char name[64];
    snprintf(name, sizeof name, "inproc://unmaskd-monitor-%p", (void *)srv);
    srv->monitor = zmq_socket(srv->zctx, ZMQ_PAIR);
    if (!srv->monitor
        || zmq_socket_monitor(srv->router, name, ZMQ_EVENT_ACCEPTED | ZMQ_EVENT_DISCONNECTED)
               != 0
        || zmq_connect(srv->monitor, name) != 0) {
        snprintf(err, errlen, "cannot monitor the ROUTER socket's connections: %s",
                 zmq_strerror(errno));
        return UM_EIO;
    }
    int linger = 0;
    zmq_setsockopt(srv->monitor, ZMQ_LINGER, &linger, sizeof linger);
    return 0;
}

/* ------------------------------------------------------------------------- */
/* Requests from clients                                                     */

/* Parse one request and reply to it, or queue it when it is a valid generate. */
static void s_handle_request(um_server_t *srv, const s_client_t *client, const char *data,
                             size_t len)
{
    um_request_t req;
    um_req_error_t err;
    if (um_request_parse(data, len, &req, &err) != 0) {
        s_send_error(srv, client, req.id, &err);
        um_request_clear(&req);
        return;
    }

    char idbuf[80];
    const char *op = um_request_op_name(req.op);
    um_request_id_text(req.id, idbuf, sizeof idbuf);
    um_debug("server", "request %s: %s started", idbuf, op);

    json_t *reply = NULL;
    switch (req.op) {
    case UM_REQ_GENERATE:
        if (s_accept_generate(srv, client, &req, &err) == 0) {
            um_request_clear(&req);
            return;
        }
        break;
    case UM_REQ_SCORE:
        if (s_accept_score(srv, client, &req, &err) == 0) {
            um_request_clear(&req);
            return;
        }
        break;
    case UM_REQ_TOKENIZE:
        reply = s_tokenize_reply(srv, &req, &err);
        break;
    case UM_REQ_DETOKENIZE:
        reply = s_detokenize_reply(srv, &req, &err);
        break;
    case UM_REQ_INFO:
        reply = s_info_reply(srv, req.id);
        if (!reply)
            um_req_error_set(&err, UM_ERR_INTERNAL, NULL, "out of memory");
        break;
    case UM_REQ_HEALTH:
        reply = s_health_reply(srv, req.id);
        if (!reply)
            um_req_error_set(&err, UM_ERR_INTERNAL, NULL, "out of memory");
        break;
    case UM_REQ_CANCEL:
        reply = s_cancel_reply(srv, client, &req, &err);
        break;
    }
    if (reply) {
        s_send_json(srv, client, reply);
        um_debug("server", "request %s: %s finished with done", idbuf, op);
    } else {
        s_send_error(srv, client, req.id, &err);
    }
    um_request_clear(&req);
}

/*
 * Receive one message from the ROUTER: the routing id, an optional empty delimiter,
 * and the request frame. Anything else gets an error reply.
 */
static void s_handle_client(um_server_t *srv)
{
    s_client_t client = {0};
    zmq_msg_t parts[3]; /* the routing id and the first two frames after it */
    size_t n_parts = 0, n_frames = 0;
    /*
     * A closed connection's file descriptor can be reused at once. Its DISCONNECTED
     * event is queued before the new connection exists, so reading the events first
     * keeps a request of the new connection from being mapped to the old client.
     */
    s_read_monitor(srv);
    for (;;) {
        zmq_msg_t m;
        zmq_msg_init(&m);
        if (s_msg_recv(&m, srv->router, n_frames == 0 ? ZMQ_DONTWAIT : 0) < 0) {
            zmq_msg_close(&m);
            if (n_frames == 0)
                return; /* nothing was waiting after all */
            break;
        }
        n_frames++;
        if (n_parts < 3) {
            zmq_msg_init(&parts[n_parts]);
            zmq_msg_move(&parts[n_parts++], &m);
        }
        zmq_msg_close(&m);
        if (!s_more(srv->router))
            break;
    }

    /* From a broker, one frame is a control message; [route, request] is a request. */
    if (srv->link) {
        um_link_heard(srv->link);
        if (n_frames == 1) {
            um_link_event_t event = um_link_control(srv->link, zmq_msg_data(&parts[0]),
                                                    zmq_msg_size(&parts[0]));
            zmq_msg_close(&parts[0]);
            s_link_event(srv, event);
            return;
        }
    }

    /* parts[0] is the routing id (the broker's route in worker mode); ZeroMQ keeps it
       within 255 bytes. */
    client.len = zmq_msg_size(&parts[0]);
    if (client.len > sizeof client.id)
        client.len = sizeof client.id;
    memcpy(client.id, zmq_msg_data(&parts[0]), client.len);
    /* The frames after the routing id come from the connection and carry its file
       descriptor. The ROUTER makes the routing id frame itself and leaves it at -1. */
    if (n_parts > 1)
        s_peer_seen(srv, zmq_msg_get(&parts[1], ZMQ_SRCFD), &client);

    size_t first = 1;
    size_t n_body = n_frames - 1;
    if (n_body >= 2 && zmq_msg_size(&parts[1]) == 0) {
        client.delimiter = 1;
        first = 2;
        n_body--;
    }

    um_req_error_t err;
    if (n_body != 1) {
        um_req_error_set(&err, UM_ERR_INVALID, NULL, "a request is one message frame holding "
                         "a JSON object, got %zu frames", n_body);
        s_send_error(srv, &client, NULL, &err);
    } else if (first >= n_parts) {
        /* Cannot happen: n_body == 1 means the frame was kept. */
        um_req_error_set(&err, UM_ERR_INTERNAL, NULL, "request frame missing");
        s_send_error(srv, &client, NULL, &err);
    } else {
        zmq_msg_t *body = &parts[first];
        size_t len = zmq_msg_size(body);
        if (len > srv->cfg.max_request_bytes) {
            um_req_error_set(&err, UM_ERR_INVALID, NULL, "request is %zu bytes, over the "
                             "limit of %zu bytes: send a shorter prompt or start unmaskd "
                             "with a larger --max-request-size", len,
                             srv->cfg.max_request_bytes);
            s_send_error(srv, &client, NULL, &err);
        } else {
            s_handle_request(srv, &client, zmq_msg_data(body), len);
        }
    }
    for (size_t i = 0; i < n_parts; i++)
        zmq_msg_close(&parts[i]);
}

/* ------------------------------------------------------------------------- */
/* Main loop                                                                 */

/* Stop reading requests, reply to every waiting job, and flag the running one. */
static void s_begin_shutdown(um_server_t *srv)
{
    int was_draining = srv->stopping == S_DRAINING;
    srv->stopping = S_CANCELLING;
    um_notice("server", "shutting down: %zu waiting and %d running generate requests get a "
              "final reply", srv->queue_len, srv->n_running);
    while (srv->queue_head) {
        s_job_t *job = srv->queue_head;
        s_queue_unlink(srv, NULL, job);
        s_send_json(srv, &job->client, s_cancelled_reply(job->req.id, S_SHUTDOWN));
        s_job_free(job);
    }
    s_running_cancel(srv, S_SHUTDOWN);
    if (srv->link && !was_draining)
        um_link_stopping(srv->link);
}

/*
 * Handle a stop signal. With a grace period and work in hand, let the accepted jobs run
 * and reject new ones. Otherwise, or on a second signal, cancel everything now.
 */
static void s_stop_requested(um_server_t *srv)
{
    if (srv->stopping == S_SERVING && srv->cfg.shutdown_grace_ms > 0
        && (srv->n_running > 0 || srv->queue_head)) {
        srv->stopping = S_DRAINING;
        srv->grace_end_ms = s_now_ms() + srv->cfg.shutdown_grace_ms;
        um_notice("server", "shutting down: %zu waiting and %d running generate requests may "
                  "finish within %.1f s, new ones get \"busy\"; a second stop signal cancels "
                  "them at once", srv->queue_len, srv->n_running,
                  srv->cfg.shutdown_grace_ms / 1e3);
        if (srv->link)
            um_link_stopping(srv->link);
        return;
    }
    if (srv->stopping != S_CANCELLING)
        s_begin_shutdown(srv);
}

/* Read the signal numbers that main's handler wrote to stop_fd. */
static void s_read_signals(um_server_t *srv)
{
    unsigned char buf[64];
    ssize_t got = read(srv->cfg.stop_fd, buf, sizeof buf);
    int hangup = 0, stops = 0;
    for (ssize_t i = 0; i < got; i++) {
        if (buf[i] == SIGHUP)
            hangup = 1;
        else
            stops++;
    }
    if (hangup && srv->cfg.on_hangup)
        srv->cfg.on_hangup();
    for (; stops > 0; stops--)
        s_stop_requested(srv);
}

/* The poll timeout: the broker link's next deadline, or the end of the grace period. */
static int s_poll_timeout_ms(const um_server_t *srv)
{
    int timeout_ms = srv->link ? um_link_timeout_ms(srv->link) : -1;
    if (srv->stopping == S_DRAINING) {
        double left = srv->grace_end_ms - s_now_ms();
        int grace_ms = left > 0 ? (int)left + 1 : 0;
        if (timeout_ms < 0 || grace_ms < timeout_ms)
            timeout_ms = grace_ms;
    }
    return timeout_ms;
}

int um_server_run(um_server_t *srv)
{
    for (;;) {
        int cancelling = srv->stopping == S_CANCELLING;
        zmq_pollitem_t items[4];
        int n_items = 0, i_monitor = -1, i_stop = -1;
        items[n_items++] = (zmq_pollitem_t){.socket = srv->pipe, .events = ZMQ_POLLIN};
        items[n_items++] = (zmq_pollitem_t){.socket = srv->router,
                                            .events = cancelling ? 0 : ZMQ_POLLIN};
        if (srv->monitor) {
            i_monitor = n_items;
            items[n_items++] = (zmq_pollitem_t){.socket = srv->monitor, .events = ZMQ_POLLIN};
        }
        if (srv->cfg.stop_fd >= 0 && !cancelling) {
            i_stop = n_items;
            items[n_items++] = (zmq_pollitem_t){.fd = srv->cfg.stop_fd, .events = ZMQ_POLLIN};
        }
        if (zmq_poll(items, n_items, s_poll_timeout_ms(srv)) < 0) {
            if (errno == EINTR)
                continue;
            um_error("server", "polling the sockets failed: %s", zmq_strerror(errno));
            return UM_EIO;
        }
        if (i_stop >= 0 && (items[i_stop].revents & ZMQ_POLLIN))
            s_read_signals(srv);
        if (srv->stopping == S_DRAINING && s_now_ms() >= srv->grace_end_ms) {
            um_notice("server", "the shutdown grace of %.1f s is over",
                      srv->cfg.shutdown_grace_ms / 1e3);
            s_begin_shutdown(srv);
        }
        if (srv->link)
            s_link_event(srv, um_link_tick(srv->link));
        if (i_monitor >= 0 && (items[i_monitor].revents & ZMQ_POLLIN))
            s_read_monitor(srv);
        if (items[0].revents & ZMQ_POLLIN)
            s_handle_worker(srv);
        if (srv->stopping && srv->n_running == 0 && !srv->queue_head)
            break;
        if (srv->stopping != S_CANCELLING && (items[1].revents & ZMQ_POLLIN))
            s_handle_client(srv);
    }
    /* Every final reply is queued by now, so the broker may forget this worker. */
    if (srv->link)
        um_link_disconnect(srv->link);
    s_worker_stop(srv);
    um_notice("server", "stopped");
    return srv->status;
}

/* ------------------------------------------------------------------------- */
/* Construction                                                              */

const char *um_server_endpoint(const um_server_t *srv)
{
    return srv->endpoint;
}

/*
 * Make the ROUTER a CURVE server when the daemon has a key pair and the endpoint is a
 * network one (tcp, ws), with a ZAP handler that admits the keys of cfg.curve_clients,
 * or any key. ipc endpoints are protected by the socket file's permissions instead.
 */
static int s_bind_curve(um_server_t *srv, const char *endpoint, char *err, size_t errlen)
{
    if (!srv->cfg.curve)
        return 0;
    if (strncmp(endpoint, "ipc://", 6) == 0 || strncmp(endpoint, "inproc://", 9) == 0) {
        um_warn("server", "--curve-key has no effect on %s: CURVE applies to network "
                "endpoints, and an ipc socket is protected by its file permissions", endpoint);
        return 0;
    }
    if (um_zap_start(&srv->zap, srv->zctx, srv->cfg.curve_clients, NULL, err, errlen) != 0
        || um_curve_set_server(srv->router, srv->cfg.curve, UM_ZAP_CLIENTS, err, errlen) != 0)
        return UM_EIO;
    return 0;
}

static int s_bind(um_server_t *srv, const char *endpoint, char *err, size_t errlen)
{
    srv->router = zmq_socket(srv->zctx, ZMQ_ROUTER);
    if (!srv->router) {
        snprintf(err, errlen, "cannot create the ROUTER socket: %s", zmq_strerror(errno));
        return UM_EIO;
    }
    int linger = UM_SERVER_LINGER_MS;
    zmq_setsockopt(srv->router, ZMQ_LINGER, &linger, sizeof linger);
    /*
     * No send limit, so that a client that reads slowly still gets every step and its
     * final reply. The cost is memory for the replies it has not read yet.
     */
    int hwm = 0;
    zmq_setsockopt(srv->router, ZMQ_SNDHWM, &hwm, sizeof hwm);
    int64_t hard = (int64_t)srv->cfg.max_request_bytes * UM_SERVER_HARD_LIMIT_FACTOR;
    zmq_setsockopt(srv->router, ZMQ_MAXMSGSIZE, &hard, sizeof hard);
    int rc = s_bind_curve(srv, endpoint, err, errlen);
    if (rc != 0)
        return rc;

    const char *ipc_path = s_ipc_path(endpoint);
    struct stat ipc_st;
    if (ipc_path && lstat(ipc_path, &ipc_st) == 0 && !S_ISSOCK(ipc_st.st_mode)) {
        snprintf(err, errlen, "cannot bind %s: %s exists and is %s, not a socket, and binding "
                 "would replace it: choose another path with --bind", endpoint, ipc_path,
                 S_ISDIR(ipc_st.st_mode) ? "a folder" : "a file");
        return UM_EIO;
    }
    if (s_ipc_in_use(endpoint)) {
        snprintf(err, errlen, "cannot bind %s: another process is listening on that socket "
                 "file (a running unmaskd?): stop it or choose another path with --bind",
                 endpoint);
        return UM_EIO;
    }
    if (zmq_bind(srv->router, endpoint) != 0) {
        int e = errno;
        snprintf(err, errlen, "cannot bind %s: %s: %s", endpoint, zmq_strerror(e),
                 e == EADDRINUSE ? "stop the process that uses it or choose another endpoint "
                                   "with --bind"
                                 : "check the endpoint's address or path and choose another "
                                   "with --bind if needed");
        return UM_EIO;
    }
    srv->bound = 1;
    srv->ipc_inode = s_ipc_inode(endpoint);
    size_t size = sizeof srv->endpoint;
    if (zmq_getsockopt(srv->router, ZMQ_LAST_ENDPOINT, srv->endpoint, &size) != 0)
        snprintf(srv->endpoint, sizeof srv->endpoint, "%s", endpoint);
    return s_monitor_start(srv, err, errlen);
}

int um_server_new(um_server_t **out, const um_server_config_t *cfg, um_model_t *model,
                  um_plugin_registry_t *plugins, um_tokenizer_t *tok,
                  um_tokenizer_t *tok_worker, char *err, size_t errlen)
{
    *out = NULL;
    um_server_t *srv = calloc(1, sizeof *srv);
    if (!srv) {
        snprintf(err, errlen, "out of memory for the server");
        return UM_ENOMEM;
    }
    srv->cfg = *cfg;
    srv->cfg.endpoint = srv->endpoint; /* set by s_bind; the caller's string is not kept */
    srv->max_batch = cfg->max_batch > 0 ? cfg->max_batch : UM_SERVER_DEFAULT_MAX_BATCH;
    if (srv->max_batch > UM_SERVER_MAX_BATCH)
        srv->max_batch = UM_SERVER_MAX_BATCH;
    srv->running = calloc((size_t)srv->max_batch, sizeof *srv->running);
    if (!srv->running) {
        snprintf(err, errlen, "out of memory for the server");
        free(srv);
        return UM_ENOMEM;
    }
    srv->model = model;
    srv->model_cfg = um_model_config(model);
    srv->plugins = plugins;
    srv->tok = tok;
    srv->tok_worker = tok_worker;
    srv->t_start_ms = s_now_ms();
    srv->eot_id = s_find_eot(tok);
    /* 0 means the model's positions for the token limits (um_gen_check enforces them
       anyway) and no limit for max_steps. */
    int32_t positions = srv->model_cfg->max_sequence_length;
    /* BERT's [CLS] counts in the prompt, and its closing [SEP] takes a position too. */
    int32_t prefix, suffix;
    um_model_framing(srv->model_cfg, &prefix, &suffix);
    const int32_t closing = suffix >= 0 ? 1 : 0, opening = prefix >= 0 ? 1 : 0;
    srv->max_prompt_tokens = cfg->max_prompt_tokens > 0 && cfg->max_prompt_tokens < positions
                                 ? cfg->max_prompt_tokens : positions - 1 - closing;
    srv->max_gen_length = cfg->max_gen_length > 0 && cfg->max_gen_length < positions
                              ? cfg->max_gen_length : positions - opening - closing;
    srv->max_steps = cfg->max_steps > 0 ? cfg->max_steps : 0;
    if (cfg->max_prompt_tokens > srv->max_prompt_tokens)
        um_notice("server", "--max-prompt-tokens %d is past what the model's %d positions "
                  "allow, so the limit is %d", cfg->max_prompt_tokens, positions,
                  srv->max_prompt_tokens);
    if (cfg->max_gen_length > srv->max_gen_length)
        um_notice("server", "--max-gen-length %d is past what the model's %d positions "
                  "allow, so the limit is %d", cfg->max_gen_length, positions,
                  srv->max_gen_length);
    int rc = um_chat_load(um_model_dir(model), &srv->chat, err, errlen);
    if (rc != 0) {
        free(srv->running);
        free(srv);
        return rc;
    }
    if (srv->chat.kind == UM_CHAT_UNSUPPORTED)
        um_warn("server", "the model's chat template (\"%s...\") is neither LLaMA-3-style "
                "headers nor ChatML: requests with messages will be rejected", srv->chat.head);
    if (cfg->plugin_path && !(srv->plugin_path = strdup(cfg->plugin_path))) {
        snprintf(err, errlen, "out of memory for the server");
        um_chat_free(&srv->chat);
        free(srv->running);
        free(srv);
        return UM_ENOMEM;
    }
    snprintf(srv->pipe_name, sizeof srv->pipe_name, "inproc://unmaskd-worker-%p", (void *)srv);

    rc = UM_EIO;
    srv->zctx = zmq_ctx_new();
    if (!srv->zctx) {
        snprintf(err, errlen, "cannot create a ZeroMQ context: %s", zmq_strerror(errno));
        goto fail;
    }
    /* A worker connects to its broker once the worker thread runs (below). */
    rc = cfg->connect ? 0 : s_bind(srv, cfg->endpoint, err, errlen);
    if (rc != 0)
        goto fail;

    rc = UM_EIO;
    srv->pipe = zmq_socket(srv->zctx, ZMQ_PAIR);
    if (!srv->pipe || zmq_bind(srv->pipe, srv->pipe_name) != 0) {
        snprintf(err, errlen, "cannot bind the worker pipe %s: %s", srv->pipe_name,
                 zmq_strerror(errno));
        goto fail;
    }
    int linger = 0;
    zmq_setsockopt(srv->pipe, ZMQ_LINGER, &linger, sizeof linger);
    rc = s_worker_start(srv, err, errlen);
    if (rc != 0)
        goto fail;
    if (cfg->connect && (rc = s_link_start(srv, err, errlen)) != 0)
        goto fail;

    um_info("server", "%s %s", srv->link ? "registering with the broker at" : "listening on",
            srv->endpoint);
    *out = srv;
    return 0;

fail:
    um_server_destroy(&srv);
    return rc;
}

void um_server_destroy(um_server_t **srvp)
{
    um_server_t *srv = *srvp;
    if (!srv)
        return;
    s_worker_stop(srv);
    while (srv->queue_head) {
        s_job_t *job = srv->queue_head;
        s_queue_unlink(srv, NULL, job);
        s_job_free(job);
    }
    if (srv->pipe)
        zmq_close(srv->pipe);
    if (srv->monitor) {
        zmq_socket_monitor(srv->router, NULL, 0);
        zmq_close(srv->monitor);
    }
    free(srv->peers);
    free(srv->running);
    if (srv->link) {
        um_link_destroy(&srv->link); /* closes the socket that router points to */
        srv->router = NULL;
    }
    if (srv->router)
        zmq_close(srv->router);
    um_zap_stop(&srv->zap);
    if (srv->zctx) {
        int rc;
        do
            rc = zmq_ctx_term(srv->zctx);
        while (rc < 0 && errno == EINTR);
    }
    /* libzmq 4.3 leaves the socket file of an ipc endpoint behind ("ipc://@name" is
       an abstract socket with no file), so remove it once the socket is closed. */
    if (srv->bound && srv->ipc_inode != 0 && s_ipc_inode(srv->endpoint) == srv->ipc_inode)
        unlink(srv->endpoint + 6); /* only the file this daemon created, not a successor's */
    free(srv->plugin_path);
    um_chat_free(&srv->chat);
    free(srv);
    *srvp = NULL;
}
