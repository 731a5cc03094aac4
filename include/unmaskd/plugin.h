/*
 * unmaskd plugin ABI.
 *
 * A plugin is a shared object that exports one function, um_plugin_describe(),
 * returning a pointer to a constant um_plugin_desc_t. The descriptor names the
 * plugin, its kind and the ABI it was built against, and points to the function
 * table of its kind. A remasking policy chooses which masked positions to commit at
 * each denoising step; a tokenizer turns text into token ids and back.
 * docs/plugins.md walks through writing, building and loading one.
 *
 * Building: `cc -shared -fPIC -fvisibility=hidden $(pkg-config --cflags unmaskd-plugin)
 * policy.c -o policy.so`. A plugin needs only this header and error.h; it links against
 * nothing from unmaskd.
 *
 * Versioning: the host loads a plugin only when abi_major equals
 * UM_PLUGIN_ABI_MAJOR. Minor versions only append fields; the host reads a field
 * added in minor N only when the plugin's abi_minor is at least N and the struct_size
 * of the struct holding it covers the field, so a plugin built against 1.0 keeps
 * working. Every table starts with its own struct_size for the same reason. In the
 * other direction, a plugin reads a host or step field added in minor N only when that
 * struct's struct_size covers it.
 *
 * What the host guarantees:
 * - Every pointer it passes stays valid until the call returns, and no longer.
 * - Parameters reach request_begin already checked against the plugin's spec: only
 *   listed names, the declared type, numbers finite and inside [min, max], and every
 *   parameter present (defaults filled in).
 * - The candidates of a step are still-masked positions, in ascending order, and never
 *   empty. A position is committed once and never remasked.
 * - The last step of a block commits every remaining candidate without calling select,
 *   and a step whose quota is 0 runs no forward pass and calls no fixed-quota policy.
 * - Random numbers from rng_uniform are a pure function of their counters, so a policy
 *   that draws only from them is reproducible across runs and thread counts.
 *
 * What a plugin must not do:
 * - Keep mutable global or static state: everything per request lives in the state
 *   that request_begin allocates. Read-only constant tables are fine.
 * - Keep pointers into a step after select returns, or write to anything the host
 *   passes except commit[] and *n_commit.
 * - Call exit(), abort(), or install signal handlers, or block (no I/O, no sleeping,
 *   no locks held across calls): the worker thread waits on select.
 * - Link against or call daemon symbols; it reaches the host only through um_host_t,
 *   and exports only um_plugin_describe (build with -fvisibility=hidden).
 * - Return from select with an error for anything but a bug or out of memory: a
 *   failing select ends the request with an internal error.
 *
 * Threading: calls for one request (request_begin, each select, request_end) never
 * overlap, but they may come from different threads: the daemon begins and ends a
 * request on its main thread and runs select on its worker thread. Different requests'
 * states may be used from different threads at once. init and fini run once, on the
 * thread that loads and unloads the plugin, before and after every other call. The
 * host services are thread-safe.
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
#define UM_PLUGIN_ABI_MINOR 1

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

    /* Fields below were added in ABI 1.1; check struct_size before calling them. */

    /*
     * Write all n candidate indices to order, best first: those with demoted[j] == 0 by
     * score descending, then the demoted ones by score descending. Ties go to the lower
     * index; NaN scores come last within their group. -INFINITY is ranked like any other
     * value, so every index is written. demoted may be NULL (nothing demoted). Returns n,
     * or UM_ENOMEM.
     */
    int32_t (*rank)(const double *score, const uint8_t *demoted, int32_t n, int32_t *order);
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
 * How the host draws each candidate's token (docs/sampling.md states both exactly).
 * Both apply top-p and then top-k to logits / temperature first, in Dream's order.
 */
typedef enum um_token_sampler {
    /* LLaDA: argmax of logit / T + Gumbel noise, in float64; argmax at T = 0. */
    UM_SAMPLER_GUMBEL = 0,
    /* Dream: one inverse-CDF draw from softmax(logits / T); argmax at T = 0. */
    UM_SAMPLER_CATEGORICAL = 1,
} um_token_sampler_t;

/* How many commits each step requests (docs/sampling.md). */
typedef enum um_schedule {
    /* LLaDA: a block's masks spread evenly over its steps, the remainder first. */
    UM_SCHEDULE_QUOTA = 0,
    /* Dream: floor(masks * (1 - s / t)) over timesteps from 1 down to eps. */
    UM_SCHEDULE_TIMESTEP = 1,
} um_schedule_t;

/* Flags of um_remask_ops_t (ABI 1.1). */
/* The policy decides how many candidates to commit; quota is only advisory. */
#define UM_REMASK_ADAPTIVE 1u

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
    /*
     * (n_candidates) LLaDA's confidence: the softmax of the raw logits (no temperature,
     * no top-p or top-k) at x0, in float64, over the tokens that may be predicted. With
     * EOS and EOT confidence suppressed, both are left out of that softmax and a
     * demoted candidate gets 0, as LLaDA computes it at temperature 0.
     */
    const double *prob;
    const float *logits;     /* (n_candidates, n_vocab) row-major, after guidance, before
                                any token is banned and before temperature */
    int32_t n_vocab;
    int32_t quota;           /* commits this step under the request's schedule, >= 1 for a
                                fixed-quota policy; advisory for an adaptive one */
    int32_t canvas_length;
    int32_t block_start;     /* active block: canvas positions [block_start, block_end) */
    int32_t block_end;
    int32_t step_in_block;   /* 0-based */
    int32_t steps_in_block;
    int32_t step;            /* 0-based index over the whole generation */
    uint64_t seed;           /* the request's seed, for host->rng_uniform */
    uint64_t rng_stream;     /* a stream reserved for this policy at this step */
    double temperature;

    /* Fields below were added in ABI 1.1; read them only when struct_size covers them. */

    /*
     * Scores of the sampling distribution q = softmax(logits / T) after top-p and top-k
     * (no scaling at T = 0), in float64. Dream's policies rank by these.
     */
    const double *sampled_prob; /* (n_candidates) q at the predicted token */
    const double *margin;       /* (n_candidates) top-1 minus top-2 probability of q */
    const double *entropy;      /* (n_candidates) entropy of q in nats */
    /*
     * (n_candidates) 1 when the request suppresses end-of-text confidence and the
     * predicted token is EOS or EOT. The host has already set prob to 0 for these;
     * a policy ranks them after every other candidate (host->rank does).
     */
    const uint8_t *demoted;
    int32_t n_masked;    /* mask tokens on the whole canvas before this step */
    int32_t top_k;       /* the request's top-k, 0 when off */
    double top_p;        /* the request's top-p, 1 when off */
    double t, s;         /* this step denoises from time t down to s (1 >= t > s >= 0) */
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
     * exactly these. A fixed-quota policy commits quota candidates; an adaptive one
     * (UM_REMASK_ADAPTIVE) commits as many as it decides. Committing fewer leaves masks
     * for later steps. If a policy commits none, the host commits the first candidate
     * of host->rank(prob, demoted), so every step makes progress.
     */
    int (*select)(void *state, const um_host_t *host, const um_remask_step_t *step,
                  int32_t *commit, int32_t *n_commit);
    void (*request_end)(void *state);

    /* Fields below were added in ABI 1.1; the host reads them only when struct_size
       covers them, and uses 0 for each otherwise. */
    uint32_t flags;         /* UM_REMASK_ADAPTIVE or 0 */
    uint32_t token_sampler; /* um_token_sampler_t the host predicts tokens with */
    uint32_t schedule;      /* um_schedule_t used when a request names none */
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

    /* Fields below were added in ABI 1.1; the host reads them only when abi_minor >= 1
       and struct_size covers them. */
    /*
     * Optional, called once after the checks pass and before any other call. Return 0,
     * or a negative UM_E* code with the reason in err: the host then rejects the plugin,
     * logs the reason and unloads it.
     */
    int (*init)(const um_host_t *host, char *err, size_t errlen);
    /* Optional, called once before the plugin is unloaded (only after a successful init). */
    void (*fini)(void);
} um_plugin_desc_t;

typedef const um_plugin_desc_t *(*um_plugin_describe_fn)(void);

#ifdef __cplusplus
}
#endif

#endif /* UNMASKD_PLUGIN_H */
