/*
 * unmaskd plugin ABI.
 *
 * A plugin is a shared object that exports one function, um_plugin_describe(),
 * returning a pointer to a constant um_plugin_desc_t. The descriptor names the
 * plugin, its kind and the ABI it was built against, and points to the function
 * table of its kind. A remasking policy chooses which masked positions to commit at
 * each denoising step; a tokenizer turns text into token ids and back.
 *
 * Versioning: the host loads a plugin only when abi_major equals
 * UM_PLUGIN_ABI_MAJOR. Minor versions only append fields; the host reads a field
 * added in minor N only when the plugin's abi_minor is at least N and its
 * struct_size covers the field. Every table starts with its own struct_size for
 * the same reason.
 *
 * Plugins reach the host only through the um_host_t table they are handed. They
 * never link against daemon symbols and should be built with hidden visibility,
 * exporting only um_plugin_describe.
 *
 * Threading: the host calls a plugin from one thread at a time per request state
 * (remask) or per loaded tokenizer; different states may be used from different
 * threads at once, so plugins keep no mutable global state.
 */
#ifndef UNMASKD_PLUGIN_H
#define UNMASKD_PLUGIN_H

#include <stddef.h>
#include <stdint.h>

#include <unmaskd/error.h>

#ifdef __cplusplus
extern "C" {
#endif

#define UM_PLUGIN_ABI_MAJOR 1
#define UM_PLUGIN_ABI_MINOR 0

/* Name of the one symbol every plugin exports. */
#define UM_PLUGIN_ENTRY "um_plugin_describe"

#if defined(__GNUC__)
#define UM_PLUGIN_EXPORT __attribute__((visibility("default")))
#else
#define UM_PLUGIN_EXPORT
#endif

typedef enum um_plugin_kind {
    UM_PLUGIN_REMASK = 1,
    UM_PLUGIN_TOKENIZER = 2,
} um_plugin_kind_t;

typedef enum um_log_level {
    UM_LOG_DEBUG = 0,
    UM_LOG_INFO = 1,
    UM_LOG_NOTICE = 2,
    UM_LOG_WARN = 3,
    UM_LOG_ERROR = 4,
} um_log_level_t;

/* Services the host offers to plugins. */
typedef struct um_host {
    uint32_t struct_size;
    /* Log a printf-style message under the plugin's name; cheap when the level is off. */
    void (*log)(int level, const char *plugin, const char *fmt, ...)
        __attribute__((format(printf, 3, 4)));
    void *(*alloc)(size_t size);
    void (*free)(void *ptr);
    /*
     * Uniform double in (0, 1), a pure function of (seed, stream, index): the same
     * counters give the same number on every run and every thread count.
     */
    double (*rng_uniform)(uint64_t seed, uint64_t stream, uint64_t index);
    /*
     * Write to out the indices of the k largest scores among n, highest first, with
     * ties broken by the lower index. Entries equal to -INFINITY or NaN are never
     * chosen, so the return value, the number of indices written, may be below k.
     */
    int32_t (*select_top)(const double *score, int32_t n, int32_t k, int32_t *out);
} um_host_t;

/* ------------------------------------------------------------------------- */
/* Per-request parameters                                                     */

typedef enum um_param_type {
    UM_PARAM_NUMBER = 1,  /* a double */
    UM_PARAM_INTEGER = 2, /* a whole number, passed in the double field */
    UM_PARAM_BOOL = 3,    /* 0 or 1, passed in the double field */
    UM_PARAM_STRING = 4,
} um_param_type_t;

/* A parameter a plugin accepts: the host checks type and range before passing it on. */
typedef struct um_param_spec {
    const char *name;
    um_param_type_t type;
    double default_value; /* ignored for strings */
    double min, max;      /* inclusive range for numbers and integers */
    const char *help;
} um_param_spec_t;

/* A parameter value from a request, already checked against its spec. */
typedef struct um_param {
    const char *name;
    um_param_type_t type;
    double number;
    const char *string; /* NULL unless type is UM_PARAM_STRING */
} um_param_t;

/* ------------------------------------------------------------------------- */
/* Remasking policies                                                         */

/*
 * The input of a policy at one denoising step. Candidates are the positions that may
 * be committed now: still masked and left of the end of the active block, in
 * ascending position order. The host has already predicted a token for each.
 */
typedef struct um_remask_step {
    uint32_t struct_size;
    int32_t n_candidates;
    const int32_t *position; /* (n_candidates) canvas positions, ascending */
    const int32_t *token;    /* (n_candidates) predicted token x0 */
    const double *prob;      /* (n_candidates) softmax of the raw logits at x0, in float64 */
    const float *logits;     /* (n_candidates, n_vocab) row-major, after guidance, before
                                temperature */
    int32_t n_vocab;
    int32_t quota;           /* commits this step under the block's schedule */
    int32_t canvas_length;
    int32_t block_start;     /* active block: canvas positions [block_start, block_end) */
    int32_t block_end;
    int32_t step_in_block;   /* 0-based */
    int32_t steps_in_block;
    int32_t step;            /* 0-based index over the whole generation */
    uint64_t seed;           /* the request's seed, for host->rng_uniform */
    uint64_t rng_stream;     /* a stream reserved for this policy at this step */
    double temperature;
} um_remask_step_t;

typedef struct um_remask_ops {
    uint32_t struct_size;
    const um_param_spec_t *params; /* accepted parameters, n_params entries */
    int32_t n_params;
    /*
     * Begin a request. params holds only names listed in the spec, with checked
     * types and ranges. On failure return a negative UM_E* code and write a message
     * naming the parameter and the fix into err. *state may stay NULL.
     */
    int (*request_begin)(const um_host_t *host, const um_param_t *params, int32_t n_params,
                         void **state, char *err, size_t errlen);
    /*
     * Choose the candidates to commit: write indices into the candidate arrays to
     * commit[] (room for n_candidates) and their count to *n_commit. The host commits
     * exactly these. Committing fewer than quota leaves masks for later steps. If a
     * policy commits none, the host commits the most probable candidate, so every
     * generation terminates.
     */
    int (*select)(void *state, const um_host_t *host, const um_remask_step_t *step,
                  int32_t *commit, int32_t *n_commit);
    void (*request_end)(void *state);
} um_remask_ops_t;

/* ------------------------------------------------------------------------- */
/* Tokenizers                                                                 */

/* Flags for decode. */
#define UM_DECODE_SKIP_SPECIAL 1u /* leave out special (added) tokens */

typedef struct um_tokenizer_ops {
    uint32_t struct_size;
    /*
     * Return a score in [0, 100] for how well this plugin can load the model folder
     * (0: cannot). The host loads the highest-scoring tokenizer unless one is named.
     */
    int (*probe)(const char *model_dir);
    /* Load the tokenizer of model_dir. On failure return UM_E* and explain in err. */
    int (*load)(const um_host_t *host, const char *model_dir, void **tok, char *err,
                size_t errlen);
    void (*unload)(void *tok);
    int32_t (*vocab_size)(void *tok);
    /*
     * Encode len bytes of UTF-8 text (not NUL-terminated) into ids. When cap is too
     * small, return UM_ENOSPACE with the required count in *n_ids.
     */
    int (*encode)(void *tok, const char *text, size_t len, int32_t *ids, size_t cap,
                  size_t *n_ids);
    /*
     * Decode ids into out as UTF-8, NUL-terminated; byte sequences that are not valid
     * UTF-8 become U+FFFD. When cap is too small, return UM_ENOSPACE with the required
     * size (without the NUL) in *len. An id outside the vocabulary is UM_ERANGE.
     */
    int (*decode)(void *tok, const int32_t *ids, size_t n, unsigned flags, char *out,
                  size_t cap, size_t *len);
    /* Look up the id of an exact vocabulary entry or special token; UM_ENOTFOUND if absent. */
    int (*token_to_id)(void *tok, const char *piece, int32_t *id);
    /* Return 1 when id is a special (added) token, else 0. */
    int (*is_special)(void *tok, int32_t id);
} um_tokenizer_ops_t;

/* ------------------------------------------------------------------------- */
/* Descriptor                                                                 */

typedef struct um_plugin_desc {
    uint32_t abi_major;
    uint32_t abi_minor;
    uint32_t struct_size; /* sizeof(um_plugin_desc_t) as the plugin was built */
    uint32_t kind;        /* um_plugin_kind_t */
    const char *name;     /* unique per kind: [a-z0-9_]+, what requests select */
    const char *version;
    const char *description;
    const um_remask_ops_t *remask;       /* set when kind is UM_PLUGIN_REMASK */
    const um_tokenizer_ops_t *tokenizer; /* set when kind is UM_PLUGIN_TOKENIZER */
    void *reserved[8];
} um_plugin_desc_t;

typedef const um_plugin_desc_t *(*um_plugin_describe_fn)(void);

#ifdef __cplusplus
}
#endif

#endif /* UNMASKD_PLUGIN_H */
