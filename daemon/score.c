/* Likelihood: see score.h. */
#include "config.h"

#include "score.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <unmaskd/error.h>

#include "kernels.h"
#include "log.h"
#include "rng.h"

static double s_now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1e3 + (double)ts.tv_nsec / 1e6;
}

void um_score_mask_counts(int32_t k, int32_t L, int32_t b, int32_t *counts)
{
    for (int32_t j = 0; j < b; j++) {
        /* nearbyint rounds halves to even, as Python's round and torch.round do. */
        int64_t n = (int64_t)nearbyint((double)k + (double)((int64_t)j * L) / (double)b);
        counts[j] = (int32_t)(((n - 1) % L) + 1);
    }
}

typedef struct s_draw {
    double u;
    int32_t pos;
} s_draw_t;

static int s_cmp_draw(const void *a, const void *b)
{
    const s_draw_t *x = a, *y = b;
    if (x->u != y->u)
        return x->u < y->u ? -1 : 1;
    return (x->pos > y->pos) - (x->pos < y->pos);
}

int um_score_check(const um_model_config_t *cfg, int32_t n_prompt, int32_t n_answer,
                   const um_score_params_t *p, char *err, size_t errlen)
{
    if (n_answer < 1)
        return um_fail(err, errlen, UM_ERANGE, "answer has no tokens: give the text whose "
                       "likelihood to estimate");
    if (p->n_samples < 1 || p->n_samples > UM_SCORE_MAX_SAMPLES)
        return um_fail(err, errlen, UM_ERANGE, "n_samples must be in [1, %d], got %d: LLaDA "
                       "uses 1 for single-token answers and 128 otherwise",
                       UM_SCORE_MAX_SAMPLES, p->n_samples);
    if (p->batch_size < 1)
        return um_fail(err, errlen, UM_ERANGE, "batch_size must be at least 1, got %d: LLaDA "
                       "uses 16", p->batch_size);
    if (!(p->cfg_scale >= 0) || p->cfg_scale > 1000)
        return um_fail(err, errlen, UM_ERANGE, "cfg_scale must be in [0, 1000], got %g: use "
                       "0 for none", p->cfg_scale);
    if (p->n_suffix < 0 || (p->n_suffix > 0 && !p->suffix))
        return um_fail(err, errlen, UM_EINVAL, "n_suffix is %d with suffix %s", p->n_suffix,
                       p->suffix ? "set" : "NULL");
    int64_t total = (int64_t)n_prompt + n_answer + p->n_suffix;
    if (n_prompt < 0 || total > cfg->max_sequence_length)
        return um_fail(err, errlen, UM_ERANGE, "prompt (%d tokens) plus answer (%d) %sis %lld "
                       "tokens, past the model's %d positions: shorten the prompt or the "
                       "answer", n_prompt, n_answer, p->n_suffix > 0 ? "plus closing token " : "",
                       (long long)total, cfg->max_sequence_length);
    return 0;
}

int um_score(um_model_t *model, const int32_t *prompt, int32_t n_prompt,
             const int32_t *answer, int32_t n_answer, const um_score_params_t *p,
             um_score_result_t *out, char *err, size_t errlen)
{
    const um_model_config_t *cfg = um_model_config(model);
    memset(out, 0, sizeof *out);
    int rc = um_score_check(cfg, n_prompt, n_answer, p, err, errlen);
    if (rc != 0)
        return rc;
    const double t0 = s_now_ms();
    const int32_t L = n_answer, T = n_prompt + n_answer + p->n_suffix, E = cfg->embedding_size;
    const int32_t mask_id = cfg->mask_token_id;
    const int n_seq = p->cfg_scale > 0 ? 2 : 1;
    int32_t b_max = p->batch_size < p->n_samples ? p->batch_size : p->n_samples;
    const uint64_t per_sample = (uint64_t)n_seq * (uint64_t)L * (uint64_t)E * sizeof(float);
    if ((uint64_t)b_max * per_sample > UM_SCORE_MAX_LOGITS_BYTES)
        b_max = per_sample >= UM_SCORE_MAX_LOGITS_BYTES
                    ? 1
                    : (int32_t)(UM_SCORE_MAX_LOGITS_BYTES / per_sample);

    /* One batch: b_max rows of T ids (twice with guidance), at most b_max * L rows of logits. */
    int32_t *ids = malloc((size_t)n_seq * b_max * T * sizeof *ids);
    int32_t *rows = malloc((size_t)n_seq * b_max * L * sizeof *rows);
    int32_t *row_target = malloc((size_t)b_max * L * sizeof *row_target);
    int32_t *row_sample = malloc((size_t)b_max * L * sizeof *row_sample);
    float *logits = malloc((size_t)n_seq * b_max * L * E * sizeof *logits);
    int32_t *counts = malloc((size_t)b_max * sizeof *counts);
    s_draw_t *draws = malloc((size_t)L * sizeof *draws);
    double *losses = malloc((size_t)p->n_samples * sizeof *losses);
    if (!ids || !rows || !row_target || !row_sample || !logits || !counts || !draws || !losses) {
        rc = um_fail(err, errlen, UM_ENOMEM, "out of memory for a batch of %d samples of %d "
                     "tokens over %d logits: lower batch_size", b_max, T, E);
        goto done;
    }

    const um_kernel_table_t *k = um_kernels();
    int32_t done_samples = 0;
    for (int32_t batch = 0; done_samples < p->n_samples; batch++) {
        if (p->on_batch && p->on_batch(p->user) != 0) {
            rc = um_fail(err, errlen, UM_ECANCELLED, "cancelled before batch %d", batch);
            goto done;
        }
        const int32_t b = p->n_samples - done_samples < b_max ? p->n_samples - done_samples
                                                              : b_max;
        const uint64_t key = um_rng_key(p->seed, UM_RNG_STREAM_SCORE(batch));
        const int32_t kk = 1 + (int32_t)(um_rng_uniform_key(key, 0) * L);
        um_score_mask_counts(kk < L ? kk : L, L, b, counts);

        int32_t n_rows = 0;
        for (int32_t j = 0; j < b; j++) {
            int32_t *seq = ids + (size_t)j * T;
            memcpy(seq, prompt, (size_t)n_prompt * sizeof *seq);
            memcpy(seq + n_prompt, answer, (size_t)L * sizeof *seq);
            if (p->n_suffix > 0)
                memcpy(seq + n_prompt + L, p->suffix, (size_t)p->n_suffix * sizeof *seq);
            /* Row j masks the counts[j] answer positions with the smallest draws. */
            for (int32_t i = 0; i < L; i++)
                draws[i] = (s_draw_t){um_rng_uniform_key(key, 1 + (uint64_t)j * L + i), i};
            qsort(draws, (size_t)L, sizeof *draws, s_cmp_draw);
            for (int32_t m = 0; m < counts[j]; m++) {
                int32_t pos = n_prompt + draws[m].pos;
                seq[pos] = mask_id;
                rows[n_rows] = j * T + pos;
                row_target[n_rows] = answer[draws[m].pos];
                row_sample[n_rows] = j;
                n_rows++;
            }
        }
        if (n_seq == 2) {
            /* The unconditional batch: every prompt token masked, as in um_generate. */
            int32_t *un = ids + (size_t)b * T;
            memcpy(un, ids, (size_t)b * T * sizeof *un);
            for (int32_t j = 0; j < b; j++)
                for (int32_t i = 0; i < n_prompt; i++)
                    if (prompt[i] != mask_id)
                        un[(size_t)j * T + i] = mask_id;
            for (int32_t r = 0; r < n_rows; r++)
                rows[n_rows + r] = b * T + rows[r];
        }
        rc = um_model_forward_rows(model, ids, n_seq * b, T, rows, n_seq * n_rows, logits);
        out->forward_passes++;
        if (rc != 0) {
            um_fail(err, errlen, rc, "forward pass of batch %d failed: %s", batch,
                    um_strerror(rc));
            goto done;
        }
        for (int32_t j = 0; j < b; j++)
            losses[done_samples + j] = 0;
        const float s1 = (float)(p->cfg_scale + 1.0);
        for (int32_t r = 0; r < n_rows; r++) {
            float *c = logits + (size_t)r * E;
            if (n_seq == 2) {
                const float *u = logits + (size_t)(n_rows + r) * E;
                for (int32_t v = 0; v < E; v++)
                    c[v] = u[v] + s1 * (c[v] - u[v]);
            }
            double nll = k->logsumexp(c, E) - (double)c[row_target[r]];
            losses[done_samples + row_sample[r]] += nll;
        }
        for (int32_t j = 0; j < b; j++) {
            losses[done_samples + j] *= (double)L / (double)counts[j];
            if (!isfinite(losses[done_samples + j])) {
                rc = um_fail(err, errlen, UM_EBACKEND, "the model produced non-finite logits "
                             "in batch %d: lower cfg_scale or check the weights", batch);
                goto done;
            }
        }
        done_samples += b;
    }

    double mean = 0;
    for (int32_t s = 0; s < p->n_samples; s++)
        mean += losses[s];
    mean /= p->n_samples;
    double var = 0;
    for (int32_t s = 0; s < p->n_samples; s++)
        var += (losses[s] - mean) * (losses[s] - mean);
    out->log_likelihood = -mean;
    out->std_error = p->n_samples > 1 ? sqrt(var / (p->n_samples - 1) / p->n_samples) : 0.0;
    out->n_samples = p->n_samples;
    rc = 0;

done:
    out->total_ms = s_now_ms() - t0;
    free(ids);
    free(rows);
    free(row_target);
    free(row_sample);
    free(logits);
    free(counts);
    free(draws);
    free(losses);
    return rc;
}
