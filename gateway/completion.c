/* One completion over a streamed generate request: see completion.h. */
#include "config.h"

#include "completion.h"

#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <unmaskd/protocol.h>

#include "buf.h"
#include "log.h"

/* U+FFFD, what the tokenizer writes for bytes that do not form a whole character. */
#define S_REPLACEMENT "\xEF\xBF\xBD"
#define S_REPLACEMENT_LEN 3
/* How long the end of a completion waits for the reply to its own early-stop cancel. */
#define S_CANCEL_REPLY_WAIT_MS 1000

int um_gw_completion_start(um_gw_completion_t *c, um_gw_session_t *s, json_t *request,
                           int32_t gen_length, const char *const *stops, int n_stops,
                           int early_stop)
{
    memset(c, 0, sizeof *c);
    c->s = s;
    c->gen_length = gen_length;
    c->early_stop = early_stop;
    c->n_stops = n_stops < UM_GW_MAX_STOPS ? n_stops : UM_GW_MAX_STOPS;
    for (int i = 0; i < c->n_stops; i++)
        c->stops[i] = stops[i];
    c->tokens = malloc((size_t)gen_length * sizeof *c->tokens);
    c->special = calloc((size_t)gen_length, 1);
    c->text = calloc(1, 1);
    if (!c->tokens || !c->special || !c->text)
        return UM_GW_NOMEM;
    for (int32_t i = 0; i < gen_length; i++)
        c->tokens[i] = -1;

    um_gw_upstream_new_id(s->up, c->id, sizeof c->id);
    json_object_set_new(request, "op", json_string(UM_OP_GENERATE));
    json_object_set_new(request, "id", json_string(c->id));
    json_object_set_new(request, "stream", json_true());
    int rc = um_gw_session_send(s, request);
    c->sent = rc == 0;
    return rc;
}

void um_gw_completion_clear(um_gw_completion_t *c)
{
    if (c->sent && !c->final)
        um_gw_session_cancel(c->s, c->id);
    free(c->tokens);
    free(c->special);
    free(c->text);
    json_decref(c->final);
    memset(c, 0, sizeof *c);
}

/* ------------------------------------------------------------------------- */
/* Text                                                                      */

/*
 * Decode tokens [0, frontier) with the daemon and make the result the text. Returns 0
 * or a UM_GW_* status.
 */
static int s_decode_prefix(um_gw_completion_t *c)
{
    json_t *ids = json_array();
    for (int32_t i = 0; ids && i < c->frontier; i++)
        json_array_append_new(ids, json_integer(c->tokens[i]));
    json_t *req = ids ? json_pack("{s:s, s:o}", "op", UM_OP_DETOKENIZE, "tokens", ids) : NULL;
    if (!req)
        return UM_GW_NOMEM;
    json_t *reply = NULL;
    int rc = um_gw_session_call(c->s, req, &reply);
    json_decref(req);
    if (rc != 0)
        return rc;
    json_t *text = json_object_get(reply, "text");
    if (strcmp(um_gw_reply_type(reply), UM_REPLY_DONE) != 0 || !json_is_string(text)) {
        char *dump = json_dumps(reply, JSON_COMPACT);
        um_warn("completion", "request %s: detokenize of %d tokens failed: %s", c->id,
                c->frontier, dump ? dump : "(reply)");
        free(dump);
        json_decref(reply);
        return UM_GW_BAD_REPLY;
    }
    size_t len = json_string_length(text);
    char *copy = malloc(len + 1);
    if (!copy) {
        json_decref(reply);
        return UM_GW_NOMEM;
    }
    memcpy(copy, json_string_value(text), len);
    copy[len] = '\0';
    json_decref(reply);
    free(c->text);
    c->text = copy;
    c->text_len = len;
    return 0;
}

/*
 * Bytes of text that later tokens cannot change. Decoding a prefix of the tokens gives
 * a prefix of the full text, except for a character whose bytes are split over tokens
 * not yet committed: the prefix ends in U+FFFD for it. Such trailing replacement
 * characters wait until more text follows them or the completion ends.
 */
static size_t s_stable_len(const um_gw_completion_t *c)
{
    if (c->ended)
        return c->text_len;
    size_t n = c->text_len;
    while (n >= S_REPLACEMENT_LEN
           && memcmp(c->text + n - S_REPLACEMENT_LEN, S_REPLACEMENT, S_REPLACEMENT_LEN) == 0)
        n -= S_REPLACEMENT_LEN;
    return n;
}

/* End the completion at the earliest stop sequence inside the stable text, if any. */
static void s_find_stop(um_gw_completion_t *c)
{
    size_t best = (size_t)-1;
    for (int i = 0; i < c->n_stops; i++) {
        size_t slen = strlen(c->stops[i]);
        for (size_t at = 0; at + slen <= c->stable_len && at < best; at++) {
            if (memcmp(c->text + at, c->stops[i], slen) == 0) {
                best = at;
                break;
            }
        }
    }
    if (best == (size_t)-1)
        return;
    c->text_len = best;
    c->text[best] = '\0';
    c->stable_len = best;
    if (!c->ended) {
        c->ended = 1;
        c->finish_reason = "stop";
        c->completion_tokens = c->frontier;
    }
}

/* Move the frontier over newly committed positions and update the text. */
static int s_advance(um_gw_completion_t *c)
{
    if (c->ended)
        return 0;
    int32_t old = c->frontier;
    while (c->frontier < c->gen_length && c->tokens[c->frontier] >= 0
           && !c->special[c->frontier])
        c->frontier++;
    int end_token = c->frontier < c->gen_length && c->tokens[c->frontier] >= 0;
    if (c->frontier > old) {
        int rc = s_decode_prefix(c);
        if (rc != 0)
            return rc;
    }
    if (end_token || c->frontier == c->gen_length) {
        c->ended = 1;
        c->finish_reason = end_token ? "stop" : "length";
        c->completion_tokens = c->frontier;
    }
    c->stable_len = s_stable_len(c);
    s_find_stop(c);
    if (c->ended && c->early_stop && !c->final && !c->cancel_sent) {
        /* The rest of the canvas cannot change the text any more. */
        if (um_gw_session_cancel_async(c->s, c->id) == 0) {
            c->cancel_sent = 1;
            um_debug("completion", "request %s: completion ended at position %d, cancelling "
                     "the remaining steps", c->id, c->frontier);
        }
    }
    return 0;
}

size_t um_gw_completion_delta(um_gw_completion_t *c, const char **text)
{
    size_t limit = c->stable_len;
    if (!c->ended) {
        /* Hold back a tail that a later step could extend into a stop sequence. */
        for (int i = 0; i < c->n_stops; i++) {
            size_t slen = strlen(c->stops[i]);
            size_t from = c->stable_len >= slen ? c->stable_len - slen + 1 : 0;
            for (size_t at = from < c->emitted ? c->emitted : from; at < limit; at++) {
                if (memcmp(c->text + at, c->stops[i], c->stable_len - at) == 0) {
                    limit = at;
                    break;
                }
            }
        }
    }
    *text = c->text + c->emitted;
    size_t n = limit > c->emitted ? limit - c->emitted : 0;
    c->emitted += n;
    return n;
}

/* ------------------------------------------------------------------------- */
/* Replies                                                                   */

static int s_apply_step(um_gw_completion_t *c, const json_t *step)
{
    c->steps++;
    c->step_ms += json_number_value(json_object_get(step, "step_ms"));
    size_t i;
    const json_t *e;
    json_array_foreach(json_object_get(step, "committed"), i, e) {
        json_int_t pos = json_integer_value(json_object_get(e, "pos"));
        if (pos < 0 || pos >= c->gen_length)
            continue; /* a mask inside the prompt */
        c->tokens[pos] = (int32_t)json_integer_value(json_object_get(e, "token"));
        c->special[pos] = json_is_true(json_object_get(e, "special"));
    }
    return s_advance(c);
}

/* The reply to the early-stop cancel comes right after the final; take it off the queue. */
static void s_drop_cancel_reply(um_gw_completion_t *c)
{
    char cancel_id[96];
    snprintf(cancel_id, sizeof cancel_id, "%s-cancel", c->id);
    json_t *r = NULL;
    if (um_gw_session_recv(c->s, cancel_id, S_CANCEL_REPLY_WAIT_MS, &r) == 0)
        json_decref(r);
}

static int s_apply_final(um_gw_completion_t *c, json_t *reply)
{
    c->final = reply;
    const char *type = um_gw_reply_type(reply);
    if (c->cancel_sent)
        s_drop_cancel_reply(c);
    if (strcmp(type, UM_REPLY_DONE) == 0) {
        /* Every position is committed now; step replies have delivered them all. */
        int rc = s_advance(c);
        if (rc != 0)
            return rc;
        if (!c->ended) {
            c->ended = 1;
            c->finish_reason = "length";
            c->completion_tokens = c->frontier;
            c->stable_len = c->text_len;
        }
        return 0;
    }
    if (strcmp(type, UM_REPLY_CANCELLED) == 0 && c->cancel_sent && c->ended)
        return 0;
    c->failed = 1;
    return 0;
}

int um_gw_completion_next(um_gw_completion_t *c, int wait_ms)
{
    json_t *reply = NULL;
    int rc = um_gw_session_recv(c->s, c->id, wait_ms, &reply);
    if (rc != 0)
        return rc;
    if (strcmp(um_gw_reply_type(reply), UM_REPLY_STEP) == 0) {
        rc = s_apply_step(c, reply);
        json_decref(reply);
        return rc;
    }
    return s_apply_final(c, reply);
}

int um_gw_completion_run(um_gw_completion_t *c, int timeout_ms)
{
    while (!c->final) {
        int rc = um_gw_completion_next(c, timeout_ms);
        if (rc != 0)
            return rc;
    }
    return 0;
}
