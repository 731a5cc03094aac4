/*
 * LLaDA's masked-diffusion sampler (see generate.h and docs/sampler.md).
 *
 * Per step: predict a token for every candidate position (masked and left of the
 * end of the active block), score them, let the remasking plugin pick which to
 * commit, commit those. The LM head runs only on candidate rows, which gives the
 * same tokens as computing every row because no other row is read.
 */
#include "generate.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "kernels.h"
#include "log.h"
#include "plugins.h"
#include "rng.h"

static double s_now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1e3 + (double)ts.tv_nsec / 1e6;
}

int um_gen_check(const um_model_config_t *cfg, int32_t n_prompt, const um_gen_params_t *p,
                 const char **field, char *err, size_t errlen)
{
    *field = NULL;
    if (p->gen_length < 1) {
        *field = "gen_length";
        snprintf(err, errlen, "gen_length must be at least 1, got %d: set it to the number of "
                 "tokens to generate, e.g. 64", p->gen_length);
        return UM_ERANGE;
    }
    if (p->block_length < 1) {
        *field = "block_length";
        snprintf(err, errlen, "block_length must be at least 1, got %d: use gen_length for one "
                 "block, or a divisor of it such as 32 for semi-autoregressive blocks",
                 p->block_length);
        return UM_ERANGE;
    }
    if (p->steps < 1) {
        *field = "steps";
        snprintf(err, errlen, "steps must be at least 1, got %d: set it to the number of "
                 "denoising steps, e.g. equal to gen_length", p->steps);
        return UM_ERANGE;
    }
    if (!isfinite(p->temperature) || p->temperature < 0) {
        *field = "temperature";
        snprintf(err, errlen, "temperature must be a finite number >= 0, got %g: use 0 for "
                 "greedy decoding", p->temperature);
        return UM_ERANGE;
    }
    if (!isfinite(p->cfg_scale) || p->cfg_scale < 0 || p->cfg_scale > UM_GEN_MAX_CFG_SCALE) {
        *field = "cfg_scale";
        snprintf(err, errlen, "cfg_scale must be a number in [0, %g], got %g: use 0 to turn "
                 "classifier-free guidance off, or a scale such as 1 to 3",
                 UM_GEN_MAX_CFG_SCALE, p->cfg_scale);
        return UM_ERANGE;
    }
    if (n_prompt >= cfg->max_sequence_length) {
        *field = "prompt";
        snprintf(err, errlen, "the prompt is %d tokens, and the model has %d positions in all: "
                 "shorten the prompt to at most %d tokens to leave room for generation",
                 n_prompt, cfg->max_sequence_length, cfg->max_sequence_length - 1);
        return UM_ERANGE;
    }
    if (n_prompt < 0 || (int64_t)n_prompt + p->gen_length > cfg->max_sequence_length) {
        *field = "gen_length";
        snprintf(err, errlen, "prompt (%d tokens) plus gen_length (%d) is %lld tokens, past the "
                 "model's %d positions: shorten the prompt or set gen_length to at most %d",
                 n_prompt, p->gen_length, (long long)n_prompt + p->gen_length,
                 cfg->max_sequence_length,
                 cfg->max_sequence_length - n_prompt > 0 ? cfg->max_sequence_length - n_prompt
                                                         : 0);
        return UM_ERANGE;
    }
    if (!p->remask) {
        *field = "remasking";
        snprintf(err, errlen, "no remasking policy given");
        return UM_EINVAL;
    }
    return 0;
}

/* Steps of block b: an even split, the first steps % n_blocks blocks take one more, at least 1. */
static int32_t s_block_steps(int32_t steps, int32_t n_blocks, int32_t b)
{
    int32_t s = steps / n_blocks + (b < steps % n_blocks ? 1 : 0);
    return s > 0 ? s : 1;
}

/* LLaDA's per-step quota: n_masked spread over n_steps, the remainder on the first steps. */
static int32_t s_quota(int32_t n_masked, int32_t n_steps, int32_t i)
{
    return n_masked / n_steps + (i < n_masked % n_steps ? 1 : 0);
}

/*
 * Predict the token of one row and its probability. Greedy at temperature 0;
 * otherwise Gumbel-max in float64: argmax of logit / T - log(-log u), which picks
 * the same token as LLaDA's exp(logit) / (-log u)^T without overflowing exp.
 */
static void s_predict(const float *row, int32_t n_vocab, int32_t mask_id, double temperature,
                      uint64_t key, uint64_t base, int32_t *token, double *prob)
{
    int32_t best = -1;
    if (temperature == 0) {
        float bv = -INFINITY;
        for (int32_t v = 0; v < n_vocab; v++)
            if (v != mask_id && (best < 0 || row[v] > bv)) {
                bv = row[v];
                best = v;
            }
    } else {
        double bv = -INFINITY;
        for (int32_t v = 0; v < n_vocab; v++) {
            if (v == mask_id)
                continue;
            double u = um_rng_uniform_key(key, base + (uint64_t)v);
            double g = (double)row[v] / temperature - log(-log(u));
            if (best < 0 || g > bv) {
                bv = g;
                best = v;
            }
        }
    }
    /* Softmax over the raw logits without the mask token, in float64. */
    double mx = -INFINITY;
    for (int32_t v = 0; v < n_vocab; v++)
        if (v != mask_id && row[v] > mx)
            mx = row[v];
    double sum = 0;
    for (int32_t v = 0; v < n_vocab; v++)
        if (v != mask_id)
            sum += exp((double)row[v] - mx);
    *token = best;
    *prob = exp((double)row[best] - mx) / sum;
}

typedef struct s_work {
    int32_t *ids;     /* (n_seq, L) forward input */
    int32_t *rows;    /* forward rows to compute */
    float *logits;    /* (n_rows, embedding_size) */
    int32_t *cand;    /* candidate positions */
    int32_t *token;   /* predicted token per candidate */
    double *prob;     /* probability per candidate */
    int32_t *commit;  /* indices into cand */
    int32_t *committed; /* positions committed this step, ascending */
    unsigned char *seen;
} s_work_t;

static void s_work_free(s_work_t *w)
{
    free(w->ids);
    free(w->rows);
    free(w->logits);
    free(w->cand);
    free(w->token);
    free(w->prob);
    free(w->commit);
    free(w->committed);
    free(w->seen);
}

static int s_cmp_i32(const void *a, const void *b)
{
    int32_t x = *(const int32_t *)a, y = *(const int32_t *)b;
    return (x > y) - (x < y);
}

int um_generate(um_model_t *model, const int32_t *prompt, int32_t n_prompt,
                const um_gen_params_t *p, um_step_fn on_step, void *user, int32_t *canvas,
                um_gen_stats_t *stats, char *err, size_t errlen)
{
    const um_model_config_t *cfg = um_model_config(model);
    const char *field;
    int rc = um_gen_check(cfg, n_prompt, p, &field, err, errlen);
    if (rc != 0)
        return rc;

    const int32_t L = n_prompt + p->gen_length;
    const int32_t V = cfg->vocab_size < cfg->embedding_size ? cfg->vocab_size
                                                            : cfg->embedding_size;
    const int32_t E = cfg->embedding_size;
    const int32_t mask_id = cfg->mask_token_id;
    const int use_cfg = p->cfg_scale > 0;
    const int32_t n_seq = use_cfg ? 2 : 1;
    const int32_t block_length = p->block_length < p->gen_length ? p->block_length
                                                                 : p->gen_length;
    const int32_t n_blocks = (p->gen_length + block_length - 1) / block_length;

    um_gen_stats_t st = {0};
    for (int32_t b = 0; b < n_blocks; b++)
        st.steps_planned += s_block_steps(p->steps, n_blocks, b);
    double t_start = s_now_ms();

    memcpy(canvas, prompt, (size_t)n_prompt * sizeof *canvas);
    for (int32_t i = n_prompt; i < L; i++)
        canvas[i] = mask_id;

    /* Candidates are masked positions, and no step adds masks, so the initial count bounds them. */
    int32_t max_cand = 0;
    for (int32_t i = 0; i < L; i++)
        max_cand += canvas[i] == mask_id;

    s_work_t w = {0};
    w.ids = malloc((size_t)n_seq * L * sizeof *w.ids);
    w.rows = malloc((size_t)n_seq * L * sizeof *w.rows);
    w.logits = malloc((size_t)n_seq * max_cand * E * sizeof *w.logits);
    w.cand = malloc((size_t)L * sizeof *w.cand);
    w.token = malloc((size_t)L * sizeof *w.token);
    w.prob = malloc((size_t)L * sizeof *w.prob);
    w.commit = malloc((size_t)L * sizeof *w.commit);
    w.committed = malloc((size_t)L * sizeof *w.committed);
    w.seen = malloc((size_t)L);
    if (!w.ids || !w.rows || !w.logits || !w.cand || !w.token || !w.prob || !w.commit
        || !w.committed || !w.seen) {
        snprintf(err, errlen, "out of memory for a canvas of %d tokens", L);
        rc = UM_ENOMEM;
        goto done;
    }

    const um_host_t *host = um_plugin_host();
    int32_t step = 0;
    for (int32_t b = 0; b < n_blocks; b++) {
        const int32_t block_start = n_prompt + b * block_length;
        const int32_t block_end = block_start + block_length < L ? block_start + block_length : L;
        const int32_t n_steps = s_block_steps(p->steps, n_blocks, b);
        /*
         * The quota covers every mask left of the block's end, not only the block's own:
         * masks written in the prompt (infilling) compete for the same commits, and
         * counting them too means no mask survives the last block.
         */
        int32_t n_masked = 0;
        for (int32_t i = 0; i < block_end; i++)
            n_masked += canvas[i] == mask_id;

        for (int32_t i = 0; i < n_steps; i++, step++) {
            const int32_t quota = s_quota(n_masked, n_steps, i);
            if (quota == 0) {
                /*
                 * Quotas never grow again within a block, so the rest of its steps commit
                 * nothing: LLaDA runs and discards a pass for each, unmaskd skips them all,
                 * keeping the step numbers (and so the random streams) as if they ran.
                 */
                step += n_steps - i;
                break;
            }
            double t_step = s_now_ms();

            int32_t n_cand = 0;
            for (int32_t pos = 0; pos < block_end; pos++)
                if (canvas[pos] == mask_id)
                    w.cand[n_cand++] = pos;
            if (n_cand == 0)
                continue;

            /* Conditional sequence, then (with guidance) the same canvas with the prompt masked. */
            memcpy(w.ids, canvas, (size_t)L * sizeof *w.ids);
            for (int32_t j = 0; j < n_cand; j++)
                w.rows[j] = w.cand[j];
            if (use_cfg) {
                for (int32_t pos = 0; pos < L; pos++)
                    w.ids[L + pos] = pos < n_prompt ? mask_id : canvas[pos];
                for (int32_t j = 0; j < n_cand; j++)
                    w.rows[n_cand + j] = L + w.cand[j];
            }
            double t_fwd = s_now_ms();
            rc = um_model_forward_rows(model, w.ids, n_seq, L, w.rows, n_seq * n_cand, w.logits);
            st.forward_ms += s_now_ms() - t_fwd;
            st.forward_passes++;
            if (rc != 0) {
                snprintf(err, errlen, "forward pass failed at step %d: %s", step,
                         um_strerror(rc));
                goto done;
            }
            if (use_cfg) {
                /* logits = uncond + (scale + 1) * (cond - uncond), as LLaDA defines it. */
                const float s1 = (float)(p->cfg_scale + 1.0);
                for (int32_t j = 0; j < n_cand; j++) {
                    float *c = w.logits + (size_t)j * E;
                    const float *u = w.logits + (size_t)(n_cand + j) * E;
                    for (int32_t v = 0; v < E; v++)
                        c[v] = u[v] + s1 * (c[v] - u[v]);
                }
            }

            const uint64_t key = um_rng_key(p->seed, UM_RNG_STREAM_GUMBEL(step));
#pragma omp parallel for schedule(dynamic, 4)
            for (int32_t j = 0; j < n_cand; j++)
                s_predict(w.logits + (size_t)j * E, V, mask_id, p->temperature, key,
                          (uint64_t)w.cand[j] * (uint64_t)E, &w.token[j], &w.prob[j]);

            um_remask_step_t rs = {
                .struct_size = sizeof rs,
                .n_candidates = n_cand,
                .position = w.cand,
                .token = w.token,
                .prob = w.prob,
                .logits = w.logits,
                .n_vocab = E,
                .quota = quota,
                .canvas_length = L,
                .block_start = block_start,
                .block_end = block_end,
                .step_in_block = i,
                .steps_in_block = n_steps,
                .step = step,
                .seed = p->seed,
                .rng_stream = UM_RNG_STREAM_REMASK(step),
                .temperature = p->temperature,
            };
            int32_t n_commit = 0;
            rc = p->remask->select(p->remask_state, host, &rs, w.commit, &n_commit);
            if (rc != 0) {
                snprintf(err, errlen, "remasking policy failed at step %d: %s", step,
                         um_strerror(rc));
                goto done;
            }
            if (n_commit < 0 || n_commit > n_cand) {
                snprintf(err, errlen, "remasking policy returned %d commits for %d candidates",
                         n_commit, n_cand);
                rc = UM_EPLUGIN;
                goto done;
            }
            if (n_commit == 0) /* every step commits at least one token, so generation ends */
                n_commit = host->select_top(w.prob, n_cand, 1, w.commit);

            for (int32_t j = 0; j < n_cand; j++) {
                if (w.token[j] < 0 || isnan(w.prob[j])) {
                    snprintf(err, errlen, "the model produced non-finite logits at step %d, "
                             "position %d: lower cfg_scale or check the weights for NaN or "
                             "infinity", step, w.cand[j]);
                    rc = UM_EBACKEND;
                    goto done;
                }
            }

            memset(w.seen, 0, (size_t)L);
            for (int32_t k = 0; k < n_commit; k++) {
                int32_t j = w.commit[k];
                if (j < 0 || j >= n_cand || w.seen[j]) {
                    snprintf(err, errlen, "remasking policy returned an invalid or repeated "
                             "candidate index %d at step %d", j, step);
                    rc = UM_EPLUGIN;
                    goto done;
                }
                w.seen[j] = 1;
                canvas[w.cand[j]] = w.token[j];
                w.committed[k] = w.cand[j];
            }
            qsort(w.committed, (size_t)n_commit, sizeof *w.committed, s_cmp_i32);

            if (on_step) {
                int32_t left = 0;
                for (int32_t pos = 0; pos < L; pos++)
                    left += canvas[pos] == mask_id;
                um_step_info_t info = {
                    .step = step,
                    .n_steps = st.steps_planned,
                    .block = b,
                    .n_blocks = n_blocks,
                    .canvas = canvas,
                    .canvas_length = L,
                    .committed = w.committed,
                    .n_committed = n_commit,
                    .n_masked = left,
                    .step_ms = s_now_ms() - t_step,
                };
                if (on_step(user, &info) != 0) {
                    rc = UM_ECANCELLED;
                    snprintf(err, errlen, "cancelled at step %d", step);
                    goto done;
                }
            }
        }
    }
    rc = 0;

done:
    st.total_ms = s_now_ms() - t_start;
    if (stats)
        *stats = st;
    s_work_free(&w);
    return rc;
}
