/*
 * Requests and replies of the wire protocol (docs/protocol.md): parsing one JSON
 * request into a checked um_request_t, and building the JSON replies. Everything
 * here is pure: no sockets, no model, no plugins, so the server and the tests
 * drive it alike. Checks that need the model or the plugins (ranges through
 * um_gen_check, remasking names, token ids) are the server's.
 *
 * Threading: no shared state; a request or reply belongs to one thread at a time.
 */
#ifndef UM_REQUEST_H
#define UM_REQUEST_H

#include <stddef.h>
#include <stdint.h>

#include <jansson.h>

/* Defaults of a generate request; steps and block_length default to gen_length. */
#define UM_REQ_DEFAULT_GEN_LENGTH 64
#define UM_REQ_DEFAULT_REMASKING "low_confidence"
#define UM_REQ_DEFAULT_EPS 1e-3

/* Defaults of a score request: LLaDA's batch size, and fewer samples than its 128. */
#define UM_REQ_DEFAULT_SCORE_SAMPLES 32
#define UM_REQ_DEFAULT_SCORE_BATCH 16
/* Most samples of a score request; the engine's own bound (um_score_check). */
#define UM_REQ_MAX_SCORE_SAMPLES 4096

/* Most messages a chat request may carry. */
#define UM_REQ_MAX_MESSAGES 1024

/* Values of the schedule field; UM_REQ_SCHEDULE_POLICY when absent (the policy's own). */
typedef enum um_req_schedule {
    UM_REQ_SCHEDULE_POLICY = -1,
    UM_REQ_SCHEDULE_QUOTA = 0,    /* equal to UM_SCHEDULE_QUOTA */
    UM_REQ_SCHEDULE_TIMESTEP = 1, /* equal to UM_SCHEDULE_TIMESTEP */
} um_req_schedule_t;

/* Values of the cache field, in the order of um_cache_mode_t; UM_REQ_CACHE_NONE when absent. */
typedef enum um_req_cache {
    UM_REQ_CACHE_NONE = 0,   /* equal to UM_CACHE_NONE */
    UM_REQ_CACHE_PREFIX = 1, /* equal to UM_CACHE_PREFIX */
    UM_REQ_CACHE_DUAL = 2,   /* equal to UM_CACHE_DUAL */
} um_req_cache_t;

typedef enum um_req_op {
    UM_REQ_GENERATE = 0,
    UM_REQ_TOKENIZE,
    UM_REQ_DETOKENIZE,
    UM_REQ_INFO,
    UM_REQ_HEALTH,
    UM_REQ_CANCEL,
    UM_REQ_SCORE,
} um_req_op_t;

/* A protocol error: a UM_ERR_* code, the request field it concerns, and a message. */
typedef struct um_req_error {
    const char *code;  /* one of the UM_ERR_* strings of protocol.h */
    char field[96];    /* "" when the error concerns no single field */
    char message[768]; /* what failed, on which value, and what to do */
} um_req_error_t;

/* A parsed request. Strings and the borrowed JSON values point into root. */
typedef struct um_request {
    json_t *root;  /* the whole request object, owned */
    json_t *id;    /* borrowed from root; NULL when the request has no id */
    um_req_op_t op;

    /* generate and tokenize: a chat, when given in place of prompt or text */
    json_t *messages;          /* borrowed array of checked {"role", "content"} objects */

    /* generate */
    const char *prompt;        /* UTF-8, may contain NUL bytes; NULL with messages */
    size_t prompt_len;         /* bytes */
    int32_t gen_length;
    int gen_length_given;      /* 0: gen_length took its default */
    int32_t steps;
    int steps_given;           /* 0: steps took its default, gen_length */
    int32_t block_length;
    double temperature;
    double cfg_scale;
    const char *remasking;     /* plugin name */
    json_t *remasking_params;  /* borrowed object, or NULL when absent */
    uint64_t seed;
    int has_seed;              /* 0: the server picks a seed and reports it */
    int stream;
    int32_t top_k;             /* 0: off */
    double top_p;              /* (0, 1]; 1: off */
    um_req_schedule_t schedule;
    double eps;                /* final time of the timestep schedule */
    int ban_eos;
    int suppress_eos_confidence;
    int early_stop;
    int trim_eos;              /* cut the reply's tokens and text at the first EOS */
    um_req_cache_t cache;      /* Fast-dLLM block cache: none, prefix or dual */

    /* score: prompt (or messages), cfg_scale and seed as in generate, and these */
    const char *answer;        /* the text whose likelihood is estimated */
    size_t answer_len;
    int32_t n_samples;
    int32_t batch_size;

    /* tokenize */
    const char *text;          /* NULL with messages */
    size_t text_len;

    /* detokenize: ids as sent, range-checked against the vocabulary by the server */
    int32_t *tokens; /* (n_tokens), owned */
    size_t n_tokens;

    /* cancel */
    json_t *target; /* borrowed: the id of the request to cancel */
} um_request_t;

/*
 * Parse one request frame of len bytes: JSON syntax, the object shape, the op,
 * unknown fields, field types and the limits that need no model. Fills req with
 * the defaults of absent fields. Returns 0, or -1 with err filled; on -1, req->id
 * is the request's id when it could be read (so the error reply can echo it) and
 * the caller still calls um_request_clear.
 */
int um_request_parse(const char *data, size_t len, um_request_t *req, um_req_error_t *err);

/* Release what um_request_parse allocated and zero req; safe on a zeroed request. */
void um_request_clear(um_request_t *req);

/* The op's wire name ("generate", ...). */
const char *um_request_op_name(um_req_op_t op);

/* Fill err with code, field (NULL for none) and a printf-style message. */
void um_req_error_set(um_req_error_t *err, const char *code, const char *field,
                      const char *fmt, ...) __attribute__((format(printf, 4, 5)));

/*
 * Return the candidate closest to word by edit distance (insertions, deletions,
 * substitutions and swaps of neighbours each count 1) when that distance is at
 * most 2, else NULL. Used for "did you mean" hints.
 */
const char *um_request_suggest(const char *word, const char *const *candidates, size_t n);

/* Render an id for log lines into buf: the JSON text, cut to fit, or "-" when absent. */
const char *um_request_id_text(const json_t *id, char *buf, size_t size);

/* ------------------------------------------------------------------------- */
/* Replies                                                                   */

/* A new reply object {"id": id or null, "type": type}; id is copied. NULL on ENOMEM. */
json_t *um_reply_new(const json_t *id, const char *type);

/*
 * A JSON string of s, or, when s is not valid UTF-8, of s with every byte above
 * 0x7F replaced by '?'. Never NULL: falls back to JSON null on ENOMEM.
 */
json_t *um_reply_text(const char *s);

/* A JSON string of len bytes of UTF-8 that may contain NUL (sent as \u0000). */
json_t *um_reply_textn(const char *s, size_t len);

/* An error reply {"id", "type": "error", "error": {"code", "field", "message"}}. */
json_t *um_reply_error(const json_t *id, const um_req_error_t *err);

/*
 * Serialize a reply as compact JSON and release the caller's reference to it.
 * Returns a malloc'ed string the caller frees, with its length in *len, or NULL.
 */
char *um_reply_dump(json_t *reply, size_t *len);

#endif /* UM_REQUEST_H */
