/*
 * Likelihood: the Monte-Carlo estimate of log p(answer | prompt) that LLaDA defines
 * (its get_log_likelihood): each sample masks n of the answer's L tokens, the model
 * predicts them, and the sample's loss is the cross-entropy of the masked tokens times
 * L / n; the estimate is minus the mean loss, a lower bound on the log-likelihood
 * (the ELBO). Mask counts are stratified within each batch of samples, as LLaDA's are.
 * docs/protocol.md states where unmaskd differs from the reference.
 *
 * Threading: runs on the calling thread and uses the model as um_generate does.
 */
#ifndef UM_SCORE_H
#define UM_SCORE_H

#include <stdint.h>

#include "model.h"

/* Most Monte-Carlo samples one request may ask for. */
#define UM_SCORE_MAX_SAMPLES 4096

/*
 * Most bytes of logits one batch may hold. A batch of b samples over an answer of L
 * tokens needs b * L rows of the vocabulary (twice with guidance), so larger batches are
 * split: batch_size bounds the samples per forward pass, and this bounds the memory.
 */
#define UM_SCORE_MAX_LOGITS_BYTES (1ULL << 30)

/* Random stream of batch b, apart from the generation streams of kernels/rng.h. */
#define UM_RNG_STREAM_SCORE(b) ((1ULL << 62) + (uint64_t)(b))

typedef struct um_score_params {
    int32_t n_samples;    /* Monte-Carlo samples, in [1, UM_SCORE_MAX_SAMPLES] */
    int32_t batch_size;   /* samples per forward pass, >= 1; the last batch may be smaller */
    double cfg_scale;     /* 0: off; > 0: guidance as in um_generate */
    uint64_t seed;
    const int32_t *suffix; /* (n_suffix) fixed tokens after the answer (BERT's [SEP]) */
    int32_t n_suffix;
    int (*on_batch)(void *user); /* called before each batch; nonzero cancels. May be NULL */
    void *user;
} um_score_params_t;

typedef struct um_score_result {
    double log_likelihood; /* minus the mean loss over the samples, in nats */
    double std_error;      /* standard error of that mean (0 with one sample) */
    int32_t n_samples;
    int32_t forward_passes;
    double total_ms;
} um_score_result_t;

/*
 * Check p and the lengths against the model: at least one answer token, and prompt plus
 * answer plus suffix within the model's positions. Returns 0, or UM_ERANGE / UM_EINVAL
 * with a message in err that names the field and the fix.
 */
int um_score_check(const um_model_config_t *cfg, int32_t n_prompt, int32_t n_answer,
                   const um_score_params_t *p, char *err, size_t errlen);

/*
 * Estimate log p(answer | prompt). Returns 0, UM_ECANCELLED when on_batch asked to
 * stop, or another UM_E* code with a message in err (see um_score_check).
 */
int um_score(um_model_t *model, const int32_t *prompt, int32_t n_prompt,
             const int32_t *answer, int32_t n_answer, const um_score_params_t *p,
             um_score_result_t *out, char *err, size_t errlen);

/*
 * The stratified mask counts of one batch of b samples over an answer of L tokens,
 * given k in [1, L]: n_j = ((round(k + j L / b) - 1) mod L) + 1 for j < b. Exposed for
 * the tests.
 */
void um_score_mask_counts(int32_t k, int32_t L, int32_t b, int32_t *counts);

#endif /* UM_SCORE_H */
