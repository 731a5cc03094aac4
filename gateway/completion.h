/*
 * One completion: a streamed generate request on a session, turned into text that
 * grows only at its end, as OpenAI-style clients expect.
 *
 * A masked-diffusion model commits tokens in any order, so the completion's text is
 * the run of committed positions from the start of the generated part (the
 * frontier). Each time the frontier moves, the run is decoded by the daemon
 * (detokenize), so that characters split over several tokens come out whole.
 * The completion ends at the first special token (end of text, end of turn), at a
 * stop sequence, or when every position is committed. Positions committed before the
 * end never change, so with early_stop the daemon's request is cancelled at that
 * point to save the remaining steps: the text is the same as that of a full run.
 *
 * Threading: belongs to the thread that owns the session.
 */
#ifndef UM_GW_COMPLETION_H
#define UM_GW_COMPLETION_H

#include <stddef.h>
#include <stdint.h>

#include <jansson.h>

#include "upstream.h"

/* Most stop sequences a request may give, as in OpenAI's API. */
#define UM_GW_MAX_STOPS 4

typedef struct um_gw_completion {
    um_gw_session_t *s;
    char id[48];               /* the generate request's id */
    int32_t gen_length;
    int32_t *tokens;           /* (gen_length) committed token ids, -1 while masked */
    unsigned char *special;    /* (gen_length) 1 where the committed token is special */
    int32_t frontier;          /* positions [0, frontier) are committed and not special */

    const char *stops[UM_GW_MAX_STOPS]; /* borrowed stop sequences, non-empty UTF-8 */
    int n_stops;
    int early_stop;            /* cancel the daemon's request once the completion has ended */

    char *text;                /* decoded [0, frontier), cut at a stop sequence; NUL-terminated */
    size_t text_len;
    size_t stable_len;         /* bytes of text that no later step can change */
    size_t emitted;            /* bytes handed out by um_gw_completion_delta */

    int ended;                 /* the completion's text is final */
    const char *finish_reason; /* "stop" or "length" once ended */
    int32_t completion_tokens; /* generated tokens before the end of the completion */
    int sent;                  /* the generate request went out */
    int cancel_sent;
    json_t *final;             /* the daemon's final reply once it arrived */
    int failed;                /* final is an error, or cancelled without the gateway asking */

    int32_t steps;             /* step replies received */
    double step_ms;            /* sum of their step_ms */
} um_gw_completion_t;

/*
 * Send request (generate fields; op, id and stream are set here) and start tracking
 * it. gen_length must equal the request's gen_length. stops (n_stops of them) are
 * borrowed and must outlive c. Returns 0 or a UM_GW_* status; call
 * um_gw_completion_clear in both cases.
 */
int um_gw_completion_start(um_gw_completion_t *c, um_gw_session_t *s, json_t *request,
                           int32_t gen_length, const char *const *stops, int n_stops,
                           int early_stop);

/*
 * Wait at most wait_ms for the next reply and apply it. Returns 0 after a reply (a
 * step, or the final one: then c->final is set), UM_GW_TIMEOUT when none came, or
 * another UM_GW_* status when the session failed.
 */
int um_gw_completion_next(um_gw_completion_t *c, int wait_ms);

/*
 * Run until the final reply, failing after timeout_ms without any reply. Returns 0
 * (check c->failed) or a UM_GW_* status.
 */
int um_gw_completion_run(um_gw_completion_t *c, int timeout_ms);

/*
 * The text that can be handed to a client now and was not handed out before: it
 * stops short of a possible stop sequence and of an incomplete character. Returns its
 * length and points *text into c's text.
 */
size_t um_gw_completion_delta(um_gw_completion_t *c, const char **text);

/* Whether the request is over: the final reply arrived. */
static inline int um_gw_completion_finished(const um_gw_completion_t *c)
{
    return c->final != NULL;
}

/* Cancel the daemon's request when it is still running, and release everything. */
void um_gw_completion_clear(um_gw_completion_t *c);

#endif /* UM_GW_COMPLETION_H */
