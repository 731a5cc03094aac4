/*
 * The broker's front end: reading client requests, answering info, health and
 * cancel, and sending every other request to a worker (see broker.h).
 *
 * The broker checks only what it needs to route: JSON syntax, the id, the op, and
 * its own fields "model" and "retry", which it removes before a worker sees the
 * request. Every other field is the worker's to check, so a broker does not reject
 * a field that its workers accept. For the ops it answers itself it runs the
 * daemon's own parser, so their errors read exactly as a daemon's.
 */
#include "config.h"

#include "broker_internal.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <zmq.h>

#include <unmaskd/protocol.h>

#include "log.h"

/* ------------------------------------------------------------------------- */
/* Choosing a worker                                                         */

/* Write the names of the models that registered workers serve to buf, ", " separated. */
static void s_model_list(const um_broker_t *b, char *buf, size_t size)
{
    json_t *seen = json_object();
    size_t len = 0;
    buf[0] = '\0';
    for (const um_bk_worker_t *w = b->workers; w && seen; w = w->next) {
        size_t i;
        json_t *m;
        json_array_foreach(w->models, i, m) {
            const char *name = json_string_value(m);
            if (json_object_get(seen, name))
                continue;
            json_object_set_new(seen, name, json_true());
            if (len < size)
                len += (size_t)snprintf(buf + len, size - len, "%s%s", len ? ", " : "", name);
        }
    }
    json_decref(seen);
    if (!buf[0])
        snprintf(buf, size, "none");
}

/* Whether the live workers serve different sets of models. */
static int s_models_differ(const um_broker_t *b)
{
    const um_bk_worker_t *first = NULL;
    for (const um_bk_worker_t *w = b->workers; w; w = w->next) {
        if (w->draining)
            continue;
        if (!first)
            first = w;
        else if (!json_equal(first->models, w->models))
            return 1;
    }
    return 0;
}

/*
 * Pick the worker for a request: live, not draining, serving model (NULL: any), and
 * for generate below its capacity; the fewest generate requests in flight wins, and
 * a tie goes to the worker that got a request longest ago. Returns the worker, or
 * NULL with err filled.
 */
static um_bk_worker_t *s_choose(um_broker_t *b, const char *model, int generate,
                                um_req_error_t *err)
{
    if (!model)
        model = b->cfg.default_model;
    if (!model && s_models_differ(b)) {
        char list[512];
        s_model_list(b, list, sizeof list);
        um_req_error_set(err, UM_ERR_INVALID, UM_FIELD_MODEL, "this broker's workers serve "
                         "different models (%s): name one in the \"model\" field", list);
        return NULL;
    }

    size_t live = 0, serving = 0, in_flight = 0;
    um_bk_worker_t *best = NULL;
    for (um_bk_worker_t *w = b->workers; w; w = w->next) {
        if (w->draining)
            continue;
        live++;
        if (model && !um_bk_worker_serves(w, model))
            continue;
        serving++;
        in_flight += w->generating;
        if (generate && w->generating >= w->capacity)
            continue;
        if (!best || w->generating < best->generating
            || (w->generating == best->generating && w->t_assigned_ms < best->t_assigned_ms))
            best = w;
    }
    if (best)
        return best;

    if (live == 0) {
        um_req_error_set(err, UM_ERR_BUSY, NULL, "no worker is connected to the broker: start "
                         "unmaskd --connect %s on a worker host, then retry", b->backend);
    } else if (serving == 0 && json_object_get(b->models_seen, model)) {
        um_req_error_set(err, UM_ERR_BUSY, UM_FIELD_MODEL, "no live worker serves model \"%.64s\" "
                         "now (its workers stopped or were lost): retry later, or start one "
                         "with unmaskd --connect", model);
    } else if (serving == 0) {
        char list[512];
        s_model_list(b, list, sizeof list);
        um_req_error_set(err, UM_ERR_UNKNOWN_MODEL, UM_FIELD_MODEL, "no worker serves model "
                         "\"%.64s\": the models served are %s (info lists them)", model, list);
    } else {
        char which[96] = "";
        if (model)
            snprintf(which, sizeof which, " serving \"%.64s\"", model);
        um_req_error_set(err, UM_ERR_BUSY, NULL, "all %zu workers%s are at capacity (%zu "
                         "generate requests in flight): retry later, or start more workers or "
                         "give them a larger --max-queue", serving, which, in_flight);
    }
    return NULL;
}

int um_bk_dispatch(um_broker_t *b, um_bk_request_t *r, um_req_error_t *err)
{
    um_bk_worker_t *w = s_choose(b, r->model, r->generate, err);
    if (!w)
        return -1;
    um_bk_request_release(r);
    um_bk_request_new_route(b, r);
    if (um_bk_send_worker(b, w, r->route, r->payload, r->payload_len) != 0) {
        um_req_error_set(err, UM_ERR_INTERNAL, NULL, "sending the request to worker %s failed: "
                         "%s", w->name, zmq_strerror(errno));
        return -1;
    }
    r->worker = w;
    r->counted = 1;
    if (r->generate)
        w->generating++;
    else
        w->other++;
    w->t_assigned_ms = um_bk_now_ms();
    b->n_dispatched++;
    um_debug("broker", "request %s: sent to worker %s (%zu generate requests there)",
             r->id_text, w->name, w->generating);
    return 0;
}

/* ------------------------------------------------------------------------- */
/* info and health                                                           */

static json_t *s_worker_json(const um_bk_worker_t *w, double now)
{
    json_t *o = json_object();
    json_object_set_new(o, "name", json_string(w->name));
    json_object_set_new(o, "host", json_string(w->host));
    json_object_set_new(o, "pid", json_integer(w->pid));
    json_object_set(o, "models", w->models);
    json_object_set_new(o, "capacity", json_integer((json_int_t)w->capacity));
    json_object_set_new(o, "generating", json_integer((json_int_t)w->generating));
    json_object_set_new(o, "other_requests", json_integer((json_int_t)w->other));
    json_object_set_new(o, "state", json_string(w->draining ? "draining" : "ready"));
    json_object_set_new(o, "last_seen_ms", json_real(now - w->t_seen_ms));
    json_object_set_new(o, "uptime_s", json_real((now - w->t_ready_ms) / 1e3));
    json_object_set_new(o, "finished", json_integer((json_int_t)w->finished));
    json_t *v = json_object_get(w->info, "version");
    json_object_set(o, "version", v ? v : json_null());
    return o;
}

static json_t *s_broker_json(const um_broker_t *b, double now)
{
    size_t in_flight = 0;
    for (const um_bk_request_t *r = b->head; r; r = r->next)
        in_flight += !r->done;
    json_t *o = json_object();
    json_object_set_new(o, "version", json_string(PACKAGE_VERSION));
    json_object_set_new(o, "worker_protocol", json_integer(UM_WORKER_PROTOCOL_VERSION));
    json_object_set_new(o, "uptime_s", json_real((now - b->t_start_ms) / 1e3));
    json_object_set_new(o, "heartbeat_ms", json_integer(b->cfg.heartbeat_ms));
    json_object_set_new(o, "liveness", json_integer(b->cfg.liveness));
    json_object_set_new(o, "default_model",
                        b->cfg.default_model ? json_string(b->cfg.default_model) : json_null());
    json_object_set_new(o, "requests_in_flight", json_integer((json_int_t)in_flight));
    json_object_set_new(o, "dispatched", json_integer((json_int_t)b->n_dispatched));
    json_object_set_new(o, "retried", json_integer((json_int_t)b->n_retried));
    json_object_set_new(o, "rerouted", json_integer((json_int_t)b->n_rerouted));
    json_object_set_new(o, "lost_requests", json_integer((json_int_t)b->n_lost_requests));
    json_object_set_new(o, "lost_workers", json_integer((json_int_t)b->n_lost_workers));
    json_object_set_new(o, "late_replies", json_integer((json_int_t)b->n_late));
    return o;
}

/*
 * The info reply: the info of one worker that serves the model (so clients that read
 * "model" or "plugins" work unchanged), plus "broker", "workers" and "models".
 * Returns NULL with err filled when no worker serves a model that was named.
 */
static json_t *s_info_reply(um_broker_t *b, const json_t *id, const char *model,
                            um_req_error_t *err)
{
    double now = um_bk_now_ms();
    um_bk_worker_t *w = NULL;
    if (b->workers) {
        w = s_choose(b, model, 0, err);
        if (!w && model)
            return NULL;
    }
    json_t *r = w && json_is_object(w->info) ? json_deep_copy(w->info) : json_object();
    if (!r)
        return NULL;
    json_object_set_new(r, "id", id ? json_deep_copy(id) : json_null());
    json_object_set_new(r, "type", json_string(UM_REPLY_DONE));
    if (!w) {
        json_object_set_new(r, "version", json_string(PACKAGE_VERSION));
        json_object_set_new(r, "protocol", json_integer(UM_PROTOCOL_VERSION));
    }
    json_object_set_new(r, "broker", s_broker_json(b, now));
    json_t *workers = json_array();
    json_t *models = json_array();
    for (um_bk_worker_t *x = b->workers; x; x = x->next) {
        json_array_append_new(workers, s_worker_json(x, now));
        size_t i;
        json_t *m;
        json_array_foreach(x->models, i, m) {
            size_t j;
            json_t *have;
            int listed = 0;
            json_array_foreach(models, j, have) {
                if (json_equal(have, m))
                    listed = 1;
            }
            if (!listed)
                json_array_append(models, m);
        }
    }
    json_object_set_new(r, "workers", workers);
    json_object_set_new(r, "models", models);
    return r;
}

static json_t *s_health_reply(um_broker_t *b, const json_t *id)
{
    size_t live = 0, queued = 0, running = 0, in_flight = 0;
    for (const um_bk_worker_t *w = b->workers; w; w = w->next) {
        live += !w->draining;
        in_flight += w->generating;
        running += w->generating > 0;
        queued += w->generating > 0 ? w->generating - 1 : 0;
    }
    json_t *r = um_reply_new(id, UM_REPLY_DONE);
    if (!r)
        return NULL;
    json_object_set_new(r, "status", json_string(live > 0 ? "ok" : "no_workers"));
    json_object_set_new(r, "queue", json_integer((json_int_t)queued));
    json_object_set_new(r, "busy", json_boolean(running > 0));
    json_object_set_new(r, "uptime_s", json_real((um_bk_now_ms() - b->t_start_ms) / 1e3));
    json_object_set_new(r, "workers", json_integer((json_int_t)live));
    json_object_set_new(r, "running", json_integer((json_int_t)running));
    json_object_set_new(r, "in_flight", json_integer((json_int_t)in_flight));
    return r;
}

/* ------------------------------------------------------------------------- */
/* cancel                                                                    */

/* The generate request of client with this id that has no final reply yet, or NULL. */
static um_bk_request_t *s_find_generate(um_broker_t *b, const um_bk_peer_t *client,
                                        const json_t *id)
{
    for (um_bk_request_t *r = b->head; r; r = r->next) {
        if (r->generate && !r->done && r->id && client->len == r->client.len
            && memcmp(client->id, r->client.id, client->len) == 0
            && json_equal(r->id, (json_t *)id))
            return r;
    }
    return NULL;
}

/*
 * Send a cancel on to the target's worker under the target's route, where the daemon
 * finds the target. The forwarded cancel has no id, so its reply (id null) cannot be
 * mistaken for one of the target's, whose id is never null.
 */
static void s_cancel(um_broker_t *b, const um_bk_peer_t *client, const um_request_t *req)
{
    um_bk_request_t *r = s_find_generate(b, client, req->target);
    um_req_error_t err;
    if (!r) {
        char idbuf[80];
        um_req_error_set(&err, UM_ERR_NOT_FOUND, "target", "no request with id %s is "
                         "waiting or running for this connection: it may have finished "
                         "already, or it was sent on another socket",
                         um_request_id_text(req->target, idbuf, sizeof idbuf));
        um_bk_send_error(b, client, req->id, &err);
        return;
    }
    um_bk_cancel_t *c = calloc(1, sizeof *c);
    json_t *msg = json_pack("{s:s, s:O}", "op", UM_OP_CANCEL, "target", req->target);
    char *text = msg ? json_dumps(msg, JSON_COMPACT) : NULL;
    json_decref(msg);
    if (!c || !text) {
        free(c);
        free(text);
        um_req_error_set(&err, UM_ERR_INTERNAL, NULL, "out of memory while sending the cancel");
        um_bk_send_error(b, client, req->id, &err);
        return;
    }
    if (um_bk_send_worker(b, r->worker, r->route, text, strlen(text)) != 0)
        um_warn("broker", "request %s: sending the cancel to worker %s failed: %s", r->id_text,
                r->worker->name, zmq_strerror(errno));
    free(text);

    c->client = *client;
    c->id = req->id ? json_deep_copy(req->id) : NULL;
    um_bk_cancel_t **tail = &r->cancels;
    while (*tail)
        tail = &(*tail)->next;
    *tail = c;
    r->cancel = 1;
    um_debug("broker", "request %s: cancel sent on to worker %s", r->id_text, r->worker->name);
}

/* ------------------------------------------------------------------------- */
/* Requests                                                                  */

/*
 * Answer info, health or cancel. The request is checked by the daemon's parser after
 * the broker's own fields were removed, so the errors match a daemon's.
 */
static void s_handle_local(um_broker_t *b, const um_bk_peer_t *client, json_t *root,
                           const char *model)
{
    char *text = json_dumps(root, JSON_COMPACT | JSON_ENCODE_ANY);
    um_request_t req;
    um_req_error_t err;
    if (!text) {
        um_req_error_set(&err, UM_ERR_INTERNAL, NULL, "out of memory");
        um_bk_send_error(b, client, NULL, &err);
        return;
    }
    int rc = um_request_parse(text, strlen(text), &req, &err);
    free(text);
    if (rc != 0) {
        um_bk_send_error(b, client, req.id, &err);
        um_request_clear(&req);
        return;
    }
    json_t *reply = NULL;
    if (req.op == UM_REQ_INFO) {
        reply = s_info_reply(b, req.id, model, &err);
    } else if (req.op == UM_REQ_HEALTH) {
        reply = s_health_reply(b, req.id);
        if (!reply)
            um_req_error_set(&err, UM_ERR_INTERNAL, NULL, "out of memory");
    } else {
        s_cancel(b, client, &req);
        um_request_clear(&req);
        return;
    }
    if (reply)
        um_bk_send_client_json(b, client, reply);
    else
        um_bk_send_error(b, client, req.id, &err);
    um_request_clear(&req);
}

/* Send the daemon parser's error for a frame the broker could not use. */
static void s_reply_parse_error(um_broker_t *b, const um_bk_peer_t *client, const char *data,
                                size_t len)
{
    um_request_t req;
    um_req_error_t err;
    if (um_request_parse(data, len, &req, &err) == 0)
        um_req_error_set(&err, UM_ERR_INTERNAL, NULL, "the broker cannot route this request");
    um_bk_send_error(b, client, req.id, &err);
    um_request_clear(&req);
}

static const char *s_json_type(const json_t *v)
{
    switch (json_typeof(v)) {
    case JSON_OBJECT:
        return "an object";
    case JSON_ARRAY:
        return "an array";
    case JSON_STRING:
        return "a string";
    case JSON_INTEGER:
    case JSON_REAL:
        return "a number";
    case JSON_TRUE:
    case JSON_FALSE:
        return "a boolean";
    default:
        return "null";
    }
}

/*
 * Accept a generate, score, tokenize or detokenize request and send it to a worker. root has
 * lost the broker's fields; it is serialized again only when it had any.
 */
static void s_forward(um_broker_t *b, const um_bk_peer_t *client, json_t *root,
                      const char *data, size_t len, int stripped, char *model, int retry)
{
    json_t *id = json_object_get(root, "id");
    if (id && !json_is_string(id) && !json_is_integer(id))
        id = NULL; /* the worker rejects it and replies with id null */
    /* score runs the model as generate does, so it counts against a worker's capacity. */
    const char *op = json_string_value(json_object_get(root, "op"));
    int generate = strcmp(op, UM_OP_GENERATE) == 0 || strcmp(op, UM_OP_SCORE) == 0;
    um_req_error_t err;

    if (generate && id && s_find_generate(b, client, id)) {
        char idbuf[80];
        um_req_error_set(&err, UM_ERR_DUPLICATE_ID, "id", "a request with id %s is "
                         "already waiting or running for this connection: use a new id for "
                         "each request", um_request_id_text(id, idbuf, sizeof idbuf));
        um_bk_send_error(b, client, id, &err);
        free(model);
        return;
    }

    um_bk_request_t *r = calloc(1, sizeof *r);
    if (r) {
        r->payload = stripped ? json_dumps(root, JSON_COMPACT | JSON_ENCODE_ANY) : malloc(len);
        if (r->payload && !stripped)
            memcpy(r->payload, data, len);
        r->payload_len = stripped && r->payload ? strlen(r->payload) : len;
    }
    if (!r || !r->payload || (id && !(r->id = json_deep_copy(id)))) {
        if (r)
            free(r->payload);
        free(r);
        free(model);
        um_req_error_set(&err, UM_ERR_INTERNAL, NULL, "out of memory for a new request");
        um_bk_send_error(b, client, id, &err);
        return;
    }
    r->client = *client;
    r->generate = generate;
    r->retry = retry;
    r->model = model;
    r->t_accept_ms = um_bk_now_ms();
    um_request_id_text(id, r->id_text, sizeof r->id_text);
    um_bk_request_add(b, r);
    if (um_bk_dispatch(b, r, &err) != 0) {
        um_bk_send_error(b, client, r->id, &err);
        um_bk_request_free(b, r);
    }
}

/* Handle one request frame of len bytes from client. */
static void s_handle_request(um_broker_t *b, const um_bk_peer_t *client, const char *data,
                             size_t len)
{
    json_error_t jerr;
    json_t *root = len ? json_loadb(data, len,
                                    JSON_DECODE_ANY | JSON_ALLOW_NUL | JSON_REJECT_DUPLICATES,
                                    &jerr)
                       : NULL;
    if (!json_is_object(root)) {
        json_decref(root);
        s_reply_parse_error(b, client, data, len);
        return;
    }
    json_t *id = json_object_get(root, "id");
    if (id && !json_is_string(id) && !json_is_integer(id))
        id = NULL;

    um_req_error_t err;
    json_t *model = json_object_get(root, UM_FIELD_MODEL);
    json_t *retry = json_object_get(root, UM_FIELD_RETRY);
    if (model && !json_is_string(model)) {
        um_req_error_set(&err, UM_ERR_INVALID, UM_FIELD_MODEL, "model must be a string naming "
                         "a model that info lists, got %s", s_json_type(model));
        um_bk_send_error(b, client, id, &err);
        json_decref(root);
        return;
    }
    if (retry && !json_is_boolean(retry)) {
        um_req_error_set(&err, UM_ERR_INVALID, UM_FIELD_RETRY, "retry must be true or false, "
                         "got %s", s_json_type(retry));
        um_bk_send_error(b, client, id, &err);
        json_decref(root);
        return;
    }
    char *model_name = model ? strdup(json_string_value(model)) : NULL;
    int allow_retry = retry && json_is_true(retry);
    int stripped = model || retry;
    json_object_del(root, UM_FIELD_MODEL);
    json_object_del(root, UM_FIELD_RETRY);

    const char *op = json_string_value(json_object_get(root, "op"));
    if (op && (strcmp(op, UM_OP_INFO) == 0 || strcmp(op, UM_OP_HEALTH) == 0
               || strcmp(op, UM_OP_CANCEL) == 0)) {
        s_handle_local(b, client, root, model_name);
        free(model_name);
    } else if (op && (strcmp(op, UM_OP_GENERATE) == 0 || strcmp(op, UM_OP_TOKENIZE) == 0
                      || strcmp(op, UM_OP_DETOKENIZE) == 0 || strcmp(op, UM_OP_SCORE) == 0)) {
        s_forward(b, client, root, data, len, stripped, model_name, allow_retry);
    } else {
        /* A missing or unknown op: the daemon's parser words the error and the hint. */
        free(model_name);
        char *text = json_dumps(root, JSON_COMPACT | JSON_ENCODE_ANY);
        if (text) {
            s_reply_parse_error(b, client, text, strlen(text));
            free(text);
        }
    }
    json_decref(root);
}

/*
 * Receive one message from the front end: the routing id, an optional empty
 * delimiter, and the request frame. Returns 0 when one was handled, -1 when none
 * was waiting.
 */
static int s_read_one(um_broker_t *b)
{
    zmq_msg_t parts[3];
    size_t n_parts = 0, n_frames = 0;
    for (;;) {
        zmq_msg_t m;
        zmq_msg_init(&m);
        int rc;
        do
            rc = zmq_msg_recv(&m, b->front, n_frames == 0 ? ZMQ_DONTWAIT : 0);
        while (rc < 0 && errno == EINTR && n_frames > 0);
        if (rc < 0) {
            zmq_msg_close(&m);
            if (n_frames == 0)
                return -1;
            break;
        }
        n_frames++;
        int more = zmq_msg_more(&m);
        if (n_parts < 3) {
            zmq_msg_init(&parts[n_parts]);
            zmq_msg_move(&parts[n_parts++], &m);
        }
        zmq_msg_close(&m);
        if (!more)
            break;
    }

    um_bk_peer_t client = {0};
    client.len = zmq_msg_size(&parts[0]);
    if (client.len > sizeof client.id)
        client.len = sizeof client.id;
    memcpy(client.id, zmq_msg_data(&parts[0]), client.len);
    size_t first = 1, n_body = n_frames - 1;
    if (n_body >= 2 && zmq_msg_size(&parts[1]) == 0) {
        client.delimiter = 1;
        first = 2;
        n_body--;
    }

    um_req_error_t err;
    if (n_body != 1 || first >= n_parts) {
        um_req_error_set(&err, UM_ERR_INVALID, NULL, "a request is one message frame holding "
                         "a JSON object, got %zu frames", n_body);
        um_bk_send_error(b, &client, NULL, &err);
    } else if (zmq_msg_size(&parts[first]) > b->cfg.max_request_bytes) {
        um_req_error_set(&err, UM_ERR_INVALID, NULL, "request is %zu bytes, over the limit of "
                         "%zu bytes: send a shorter prompt or start unmask-broker with a "
                         "larger --max-request-size", zmq_msg_size(&parts[first]),
                         b->cfg.max_request_bytes);
        um_bk_send_error(b, &client, NULL, &err);
    } else {
        s_handle_request(b, &client, zmq_msg_data(&parts[first]), zmq_msg_size(&parts[first]));
    }
    for (size_t i = 0; i < n_parts; i++)
        zmq_msg_close(&parts[i]);
    return 0;
}

void um_bk_clients_read(um_broker_t *b)
{
    for (int i = 0; i < UM_BK_BATCH && !b->stopping; i++)
        if (s_read_one(b) != 0)
            break;
}
