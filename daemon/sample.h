/*
 * Token sampling: from one position's logits to its predicted token and the scores
 * the remasking policies rank by. docs/sampling.md states every rule; tools/llada_ref.py
 * implements the same rules independently.
 *
 * Per row, in order: banned tokens (the mask token, and EOS when the request bans it)
 * get -inf; the row is scaled by 1 / temperature (not at temperature 0); top-p and then
 * top-k remove tokens, in Dream's order; the token is the argmax at temperature 0, else a
 * float64 Gumbel-max or a categorical draw, as the policy declares. The reductions go through
 * the kernel table (um_kernels()->vocab_stats, gumbel_argmax, logsumexp).
 *
 * Threading: no shared state. Each thread passes its own scratch buffers, so rows can be
 * sampled in parallel.
 */
#ifndef UM_SAMPLE_H
#define UM_SAMPLE_H

#include <stdint.h>

#include <unmaskd/plugin.h>

/* Smallest temperature above 0: logits / T past about 1e36 overflow f32. */
#define UM_SAMPLE_MIN_TEMPERATURE 1e-3
/* Largest temperature: beyond it the distribution is uniform to within rounding. */
#define UM_SAMPLE_MAX_TEMPERATURE 1e3

/* Most suppressed ids a row takes (EOS and EOT need two). */
#define UM_SAMPLE_MAX_SUPPRESSED 8

/* What a request sets for token sampling, the same for every row of a step. */
typedef struct um_sample_config {
    int32_t n_vocab;            /* tokens that may be predicted: [0, n_vocab) */
    double temperature;         /* 0: argmax; else in [UM_SAMPLE_MIN_TEMPERATURE, MAX] */
    int32_t top_k;              /* keep tokens >= the k-th largest scaled logit; 0: off */
    double top_p;               /* nucleus mass in (0, 1]; 1: off */
    um_token_sampler_t sampler; /* Gumbel-max (LLaDA) or categorical (Dream) */
    const int32_t *banned;      /* (n_banned) ids never predicted, e.g. the mask token */
    int32_t n_banned;
    /*
     * (n_suppressed) ids, EOS and EOT, left out of the confidence softmax; a row whose
     * token is one of them is demoted. n_suppressed is 0 when the request does not
     * suppress end-of-text confidence, and at most UM_SAMPLE_MAX_SUPPRESSED.
     */
    const int32_t *suppressed;
    int32_t n_suppressed;
} um_sample_config_t;

/* The prediction at one position. */
typedef struct um_sample_result {
    int32_t token;
    double prob;         /* softmax of the raw logits at token (LLaDA's confidence) */
    double sampled_prob; /* q(token), q the sampling distribution after top-p and top-k */
    double margin;       /* top-1 minus top-2 probability of q */
    double entropy;      /* entropy of q in nats */
    uint8_t demoted;     /* token is suppressed: prob is 0 */
} um_sample_result_t;

/* Per-thread scratch for um_sample_row: two rows of n_vocab floats and two of ints. */
typedef struct um_sample_scratch {
    float *raw;      /* (n_vocab) logits with banned tokens at -inf */
    float *scaled;   /* (n_vocab) raw / temperature after top-p and top-k */
    int32_t *index;  /* (n_vocab) token ids, for the top-p sort and the top-k selection */
    int32_t *tmp;    /* (n_vocab) the merge sort's second buffer */
} um_sample_scratch_t;

/* Allocate scratch for n_vocab tokens. Returns 0 or UM_ENOMEM. */
int um_sample_scratch_init(um_sample_scratch_t *s, int32_t n_vocab);

void um_sample_scratch_free(um_sample_scratch_t *s);

/*
 * Predict one row. logits has at least cfg->n_vocab entries. Random numbers come from
 * um_rng_uniform_key(key, base + token) for Gumbel noise and from (key, base) for the
 * categorical draw, so a row's result is a pure function of its inputs. Returns 0, or
 * UM_EBACKEND when the logits are not finite (out->token is then -1).
 */
int um_sample_row(const float *logits, const um_sample_config_t *cfg, uint64_t key,
                  uint64_t base, um_sample_scratch_t *scratch, um_sample_result_t *out);

#endif /* UM_SAMPLE_H */
