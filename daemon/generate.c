/*
 * The masked-diffusion sampler (see generate.h and docs/sampling.md).
 *
 * A generation is a stepper (um_gen_t) that keeps its place in the loop between steps,
 * so that um_gen_step_batch can advance several in lockstep with one shared forward
 * pass (um_model_forward_parts). um_generate steps one alone until it is done.
 *
 * Per step: find the candidates (masked positions left of the end of the active
 * block) and ask the schedule for a quota. Run one forward pass; with guidance, the
 * unconditional canvas is a second sequence of the same pass. Predict a token and its
 * scores for every candidate (sample.c), let the remasking plugin pick which to commit,
 * commit those, and check for an early stop. The LM head runs only on candidate rows,
 * which gives the same tokens as computing every row because no other row is read.
 */
#include "generate.h"

#include <math.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#include "kernels.h"
#include "log.h"
#include "plugins.h"
#include "rng.h"
#include "sample.h"

static double s_now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1e3 + (double)ts.tv_nsec / 1e6;
}

/* ------------------------------------------------------------------------- */
/* Checks                                                                     */

static int s_check_sampling(const um_gen_params_t *p, const char **field, char *err,
                            size_t errlen)
{
    if (!isfinite(p->temperature) || p->temperature < 0
        || (p->temperature > 0 && p->temperature < UM_SAMPLE_MIN_TEMPERATURE)
        || p->temperature > UM_SAMPLE_MAX_TEMPERATURE) {
        *field = "temperature";
        snprintf(err, errlen, "temperature must be 0 or a number in [%g, %g], got %g: use 0 "
                 "for greedy decoding", UM_SAMPLE_MIN_TEMPERATURE, UM_SAMPLE_MAX_TEMPERATURE,
                 p->temperature);
        return UM_ERANGE;
    }
    if (p->top_k < 0) {
        *field = "top_k";
        snprintf(err, errlen, "top_k must be at least 0, got %d: use 0 to keep every token",
                 p->top_k);
        return UM_ERANGE;
    }
    if (!isfinite(p->top_p) || p->top_p < 0 || p->top_p > 1) {
        *field = "top_p";
        snprintf(err, errlen, "top_p must be a number in (0, 1], got %g: use 1 to keep every "
                 "token, or a nucleus mass such as 0.95", p->top_p);
        return UM_ERANGE;
    }
    if (p->schedule != UM_SCHEDULE_QUOTA && p->schedule != UM_SCHEDULE_TIMESTEP) {
        *field = "schedule";
        snprintf(err, errlen, "unknown schedule %d: use quota or timestep", (int)p->schedule);
        return UM_EINVAL;
    }
    if (!isfinite(p->eps) || p->eps < 0 || p->eps >= 1) {
        *field = "eps";
        snprintf(err, errlen, "eps must be a number in [0, 1), got %g: Dream uses 0.001",
                 p->eps);
        return UM_ERANGE;
    }
    if (!isfinite(p->cfg_scale) || p->cfg_scale < 0 || p->cfg_scale > UM_GEN_MAX_CFG_SCALE) {
        *field = "cfg_scale";
        snprintf(err, errlen, "cfg_scale must be a number in [0, %g], got %g: use 0 to turn "
                 "classifier-free guidance off, or a scale such as 1 to 3",
                 UM_GEN_MAX_CFG_SCALE, p->cfg_scale);
        return UM_ERANGE;
    }
    return 0;
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
    int rc = s_check_sampling(p, field, err, errlen);
    if (rc != 0)
        return rc;
    if (p->n_suffix < 0 || p->n_suffix >= cfg->max_sequence_length
        || (p->n_suffix > 0 && !p->suffix)) {
        *field = "suffix";
        snprintf(err, errlen, "n_suffix is %d with suffix %s: pass the suffix tokens and "
                 "their count, or 0", p->n_suffix, p->suffix ? "set" : "NULL");
        return UM_EINVAL;
    }
    if ((int64_t)n_prompt + p->n_suffix >= cfg->max_sequence_length) {
        *field = "prompt";
        snprintf(err, errlen, "the prompt is %d tokens, and the model has %d positions in all%s: "
                 "shorten the prompt to at most %d tokens to leave room for generation",
                 n_prompt, cfg->max_sequence_length,
                 p->n_suffix > 0 ? " including its closing token" : "",
                 cfg->max_sequence_length - 1 - p->n_suffix);
        return UM_ERANGE;
    }
    if (p->n_suffix > 0
        && (int64_t)n_prompt + p->gen_length + p->n_suffix > cfg->max_sequence_length) {
        *field = "gen_length";
        int64_t room = (int64_t)cfg->max_sequence_length - n_prompt - p->n_suffix;
        snprintf(err, errlen, "prompt (%d tokens) plus gen_length (%d) plus %d closing "
                 "token%s is %lld tokens, past the model's %d positions: shorten the prompt "
                 "or set gen_length to at most %lld", n_prompt, p->gen_length, p->n_suffix,
                 p->n_suffix == 1 ? "" : "s",
                 (long long)n_prompt + p->gen_length + p->n_suffix, cfg->max_sequence_length,
                 room > 0 ? (long long)room : 0LL);
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
    if ((p->ban_eos || p->early_stop) && cfg->eos_token_id < 0) {
        *field = p->ban_eos ? "ban_eos" : "early_stop";
        snprintf(err, errlen, "%s needs an end-of-text token, and the model's config.json has "
                 "no eos_token_id: add it there or leave %s off", *field, *field);
        return UM_EINVAL;
    }
    if (p->cache != UM_CACHE_NONE && p->cache != UM_CACHE_PREFIX && p->cache != UM_CACHE_DUAL) {
        *field = "cache";
        snprintf(err, errlen, "unknown cache mode %d: use none, prefix or dual", (int)p->cache);
        return UM_EINVAL;
    }
    if (!p->remask) {
        *field = "remasking";
        snprintf(err, errlen, "no remasking policy given");
        return UM_EINVAL;
    }
    return 0;
}

/* ------------------------------------------------------------------------- */
/* Schedules                                                                  */

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
 * Times of step i of n: t_i = 1 - i (1 - eps) / n, Dream's linspace(1, eps, n + 1) in
 * float64. The quota schedule reports its linear times with eps 0.
 */
static double s_time(int32_t i, int32_t n, double eps)
{
    return 1.0 - (double)i * (1.0 - eps) / (double)n;
}

/* Dream's count: floor(n_masked * (1 - s / t)) in float64. */
static int32_t s_timestep_quota(int32_t n_masked, double t, double s)
{
    double x = (double)n_masked * (1.0 - s / t);
    return x <= 0 ? 0 : (int32_t)floor(x);
}

/*
 * The first step after i, of a block's n steps, whose quota is at least 1 while
 * n_masked masks stay: the last step always commits. LLaDA's quotas never grow again
 * within a block, so after a 0 only the last step remains. Dream's count
 * floor(n_masked (1 - s / t)) grows with the step, so a binary search finds the first
 * step where it reaches 1.
 */
static int32_t s_next_committing_step(um_schedule_t schedule, int32_t n_masked, int32_t i,
                                      int32_t n_steps, double eps)
{
    int32_t last = n_steps - 1;
    if (schedule != UM_SCHEDULE_TIMESTEP)
        return last;
    int32_t lo = i + 1, hi = last; /* the step sought is in [lo, hi] */
    while (lo < hi) {
        int32_t mid = lo + (hi - lo) / 2;
        if (s_timestep_quota(n_masked, s_time(mid, n_steps, eps), s_time(mid + 1, n_steps, eps))
            >= 1)
            hi = mid;
        else
            lo = mid + 1;
    }
    return lo;
}

/* ------------------------------------------------------------------------- */
/* Working memory                                                             */

typedef struct s_work {
    int32_t *ids;          /* (n_seq, L) forward input */
    int32_t *rows;         /* (n_seq * max_cand) forward rows to compute */
    float *logits;         /* (n_seq * max_cand, E) */
    int32_t *cand;         /* (max_cand) candidate positions */
    int32_t *token;        /* (max_cand) per candidate: predicted token */
    double *prob;          /* (max_cand) LLaDA confidence */
    double *sampled_prob;  /* (max_cand) q at the token */
    double *margin;        /* (max_cand) */
    double *entropy;       /* (max_cand) */
    uint8_t *demoted;      /* (max_cand) */
    int32_t *commit;       /* (max_cand) indices into cand */
    int32_t *committed;    /* (L) positions committed this step, ascending */
    unsigned char *seen;   /* (max_cand) */
    unsigned char *prompt_token; /* (L) 1 where the prompt had a token (not a mask) */
    um_sample_scratch_t *scratch; /* (n_threads) */
    int n_threads;
    um_kv_cache_t *cache;  /* block cache, NULL with UM_CACHE_NONE */
    float *full;           /* (n_seq * T, E) every position's logits, with full_lm_head */
    int32_t *all_rows;     /* (n_seq * T) 0, 1, 2, ...: full_lm_head's rows in a shared pass */
} s_work_t;

static void s_work_free(s_work_t *w)
{
    um_kv_cache_destroy(&w->cache);
    free(w->full);
    free(w->all_rows);
    free(w->ids);
    free(w->rows);
    free(w->logits);
    free(w->cand);
    free(w->token);
    free(w->prob);
    free(w->sampled_prob);
    free(w->margin);
    free(w->entropy);
    free(w->demoted);
    free(w->commit);
    free(w->committed);
    free(w->seen);
    free(w->prompt_token);
    for (int i = 0; w->scratch && i < w->n_threads; i++)
        um_sample_scratch_free(&w->scratch[i]);
    free(w->scratch);
}

static int s_work_alloc(s_work_t *w, int32_t n_seq, int32_t L, int32_t max_cand, int32_t E,
                        int32_t V)
{
    size_t nc = (size_t)(max_cand > 0 ? max_cand : 1);
    w->ids = malloc((size_t)n_seq * L * sizeof *w->ids);
    w->rows = malloc((size_t)n_seq * nc * sizeof *w->rows);
    w->logits = malloc((size_t)n_seq * nc * E * sizeof *w->logits);
    w->cand = malloc(nc * sizeof *w->cand);
    w->token = malloc(nc * sizeof *w->token);
    w->prob = malloc(nc * sizeof *w->prob);
    w->sampled_prob = malloc(nc * sizeof *w->sampled_prob);
    w->margin = malloc(nc * sizeof *w->margin);
    w->entropy = malloc(nc * sizeof *w->entropy);
    w->demoted = malloc(nc);
    w->commit = malloc(nc * sizeof *w->commit);
    w->committed = malloc((size_t)L * sizeof *w->committed);
    w->seen = malloc(nc);
    w->prompt_token = calloc((size_t)L, 1);
#ifdef _OPENMP
    w->n_threads = omp_get_max_threads();
#else
    w->n_threads = 1;
#endif
    w->scratch = calloc((size_t)w->n_threads, sizeof *w->scratch);
    if (!w->ids || !w->rows || !w->logits || !w->cand || !w->token || !w->prob
        || !w->sampled_prob || !w->margin || !w->entropy || !w->demoted || !w->commit
        || !w->committed || !w->seen || !w->prompt_token || !w->scratch)
        return UM_ENOMEM;
    for (int i = 0; i < w->n_threads; i++)
        if (um_sample_scratch_init(&w->scratch[i], V) != 0)
            return UM_ENOMEM;
    return 0;
}

static int s_cmp_i32(const void *a, const void *b)
{
    int32_t x = *(const int32_t *)a, y = *(const int32_t *)b;
    return (x > y) - (x < y);
}

/* ------------------------------------------------------------------------- */
/* One step's parts                                                           */

/* Everything about a generation that stays fixed over its steps. */
typedef struct s_run {
    um_model_t *model;
    const um_gen_params_t *p;
    um_remask_traits_t traits;
    um_sample_config_t sample;
    int32_t banned[UM_MODEL_MAX_NEVER_SAMPLED + 1];
    int32_t suppressed[2];
    int32_t n_prompt, L, E, mask_id, eos_id;
    int32_t T; /* tokens in one forward sequence: L plus the suffix */
    int32_t n_seq;
    int logits_shift; /* the model's logits of position p read position p - 1 (Dream) */
} s_run_t;

const char *um_cache_mode_name(um_cache_mode_t mode)
{
    switch (mode) {
    case UM_CACHE_NONE:
        return "none";
    case UM_CACHE_PREFIX:
        return "prefix";
    case UM_CACHE_DUAL:
        return "dual";
    }
    return "unknown";
}

/*
 * The query window of a block's later pass through the block cache: from the block's
 * start to the end of the canvas (suffix included) for the prefix cache, or to the
 * block's end for the dual cache. For a family that shifts its logits the window also
 * takes the position before the block, whose hidden state gives the logits of the
 * block's first position, so that this row is computed fresh and not read stale.
 */
static void s_cache_window(const s_run_t *r, int32_t block_start, int32_t block_end,
                           int32_t *q_start, int32_t *q_len)
{
    int32_t start = r->logits_shift && block_start > 0 ? block_start - 1 : block_start;
    int32_t end = r->p->cache == UM_CACHE_DUAL ? block_end : r->T;
    *q_start = start;
    *q_len = end - start;
}

/*
 * Write the forward pass's input for the candidates: the canvas, and with cfg_scale > 0
 * a second sequence, the canvas with every prompt token masked (masks written in the
 * prompt keep their committed value, as LLaDA's prompt_index does). The rows are the
 * candidates of each sequence, n_seq * n_cand in all.
 */
static void s_forward_input(const s_run_t *r, s_work_t *w, const int32_t *canvas,
                            int32_t n_cand)
{
    const int32_t T = r->T;
    memcpy(w->ids, canvas, (size_t)T * sizeof *w->ids);
    for (int32_t j = 0; j < n_cand; j++)
        w->rows[j] = w->cand[j];
    if (r->n_seq == 2) {
        /* The suffix is framing, not prompt: the unconditional sequence keeps it. */
        for (int32_t pos = 0; pos < T; pos++)
            w->ids[T + pos] = w->prompt_token[pos] ? r->mask_id : canvas[pos];
        for (int32_t j = 0; j < n_cand; j++)
            w->rows[n_cand + j] = T + w->cand[j];
    }
}

/*
 * Run the generation's own forward pass over the input s_forward_input wrote. With a
 * block cache the pass runs the window [q_start, q_start + q_len) of both sequences,
 * and the unconditional sequence has its own rows in the cache.
 */
static int s_forward_alone(const s_run_t *r, s_work_t *w, int32_t n_cand, int32_t q_start,
                           int32_t q_len)
{
    const int32_t T = r->T, E = r->E;
    int rc;
    if (w->cache) {
        rc = um_model_forward_cached(r->model, w->cache, w->ids, r->n_seq, T, q_start, q_len,
                                     w->rows, r->n_seq * n_cand, w->logits);
    } else if (r->p->full_lm_head) {
        rc = um_model_forward(r->model, w->ids, r->n_seq, T, w->full);
        for (int32_t j = 0; rc == 0 && j < r->n_seq * n_cand; j++)
            memcpy(w->logits + (size_t)j * E, w->full + (size_t)w->rows[j] * E,
                   (size_t)E * sizeof *w->logits);
    } else {
        rc = um_model_forward_rows(r->model, w->ids, r->n_seq, T, w->rows, r->n_seq * n_cand,
                                   w->logits);
    }
    return rc;
}

/*
 * Combine guidance in place: with two sequences, logits (2 * n_cand, E) become
 * uncond + (scale + 1) * (cond - uncond) in their first n_cand rows.
 */
static void s_guidance(const s_run_t *r, float *logits, int32_t n_cand)
{
    if (r->n_seq == 1)
        return;
    const int32_t E = r->E;
    const float s1 = (float)(r->p->cfg_scale + 1.0);
    for (int32_t j = 0; j < n_cand; j++) {
        float *c = logits + (size_t)j * E;
        const float *u = logits + (size_t)(n_cand + j) * E;
        for (int32_t v = 0; v < E; v++)
            c[v] = u[v] + s1 * (c[v] - u[v]);
    }
}

/* Predict every candidate's token and scores from logits (n_cand, E), in parallel over
 * candidates. */
static int s_sample(const s_run_t *r, s_work_t *w, const float *logits, int32_t n_cand,
                    int32_t step)
{
    const uint64_t key = um_rng_key(r->p->seed, UM_RNG_STREAM_GUMBEL(step));
    int failed = 0;
#pragma omp parallel for schedule(dynamic, 1) reduction(| : failed)
    for (int32_t j = 0; j < n_cand; j++) {
#ifdef _OPENMP
        um_sample_scratch_t *scratch = &w->scratch[omp_get_thread_num()];
#else
        um_sample_scratch_t *scratch = &w->scratch[0];
#endif
        um_sample_result_t res;
        int rc = um_sample_row(logits + (size_t)j * r->E, &r->sample, key,
                               (uint64_t)w->cand[j] * (uint64_t)r->E, scratch, &res);
        w->token[j] = res.token;
        w->prob[j] = res.prob;
        w->sampled_prob[j] = res.sampled_prob;
        w->margin[j] = res.margin;
        w->entropy[j] = res.entropy;
        w->demoted[j] = res.demoted;
        failed |= rc != 0;
    }
    return failed ? UM_EBACKEND : 0;
}

/*
 * Early stop: when every position before the first generated EOS is committed and
 * every position after it is EOS or still masked, with at least one mask, the masks
 * after it become EOS.
 * Committed tokens never change, so every token up to that EOS is the one a full run
 * would give. Appends the filled positions to committed; returns how many.
 */
static int32_t s_early_stop(const s_run_t *r, int32_t *canvas, int32_t *committed,
                            int32_t n_committed, int32_t *eos_position)
{
    int32_t first = -1;
    for (int32_t pos = r->n_prompt; pos < r->L && first < 0; pos++)
        if (canvas[pos] == r->eos_id)
            first = pos;
    if (first < 0)
        return -1;
    for (int32_t pos = 0; pos < first; pos++)
        if (canvas[pos] == r->mask_id)
            return -1;
    int32_t n_masks = 0;
    for (int32_t pos = first + 1; pos < r->L; pos++) {
        if (canvas[pos] != r->eos_id && canvas[pos] != r->mask_id)
            return -1;
        n_masks += canvas[pos] == r->mask_id;
    }
    if (n_masks == 0)
        return -1; /* nothing left to skip: the generation ends as it is */
    int32_t n_filled = 0;
    for (int32_t pos = first + 1; pos < r->L; pos++) {
        if (canvas[pos] == r->mask_id) {
            canvas[pos] = r->eos_id;
            committed[n_committed + n_filled++] = pos;
        }
    }
    *eos_position = first;
    return n_filled;
}

/*
 * Ask the policy which candidates to commit and check the indices it returns. At the last
 * step of a block every candidate is committed without calling the policy. Writes indices into cand to
 * w->commit and returns their count, or a negative UM_E* code with err filled.
 */
static int32_t s_select(const s_run_t *r, s_work_t *w, um_remask_step_t *rs, int last,
                        char *err, size_t errlen)
{
    const int32_t n_cand = rs->n_candidates;
    if (last) {
        for (int32_t j = 0; j < n_cand; j++)
            w->commit[j] = j;
        return n_cand;
    }
    const um_host_t *host = um_plugin_host();
    int32_t n_commit = 0;
    int rc = r->p->remask->select(r->p->remask_state, host, rs, w->commit, &n_commit);
    if (rc != 0) {
        snprintf(err, errlen, "remasking policy failed at step %d: %s (%s)", rs->step,
                 um_strerror(rc), um_error_name(rc));
        return rc < 0 ? rc : UM_EPLUGIN;
    }
    if (n_commit < 0 || n_commit > n_cand) {
        snprintf(err, errlen, "remasking policy returned %d commits for %d candidates at "
                 "step %d", n_commit, n_cand, rs->step);
        return UM_EPLUGIN;
    }
    if (n_commit == 0) {
        /* Every step commits at least one token, so every generation ends. */
        int32_t *order = w->committed; /* free until the commits are recorded */
        if (host->rank(w->prob, w->demoted, n_cand, order) != n_cand) {
            snprintf(err, errlen, "out of memory while ranking %d candidates", n_cand);
            return UM_ENOMEM;
        }
        w->commit[0] = order[0];
        n_commit = 1;
    }
    memset(w->seen, 0, (size_t)n_cand);
    for (int32_t k = 0; k < n_commit; k++) {
        int32_t j = w->commit[k];
        if (j < 0 || j >= n_cand || w->seen[j]) {
            snprintf(err, errlen, "remasking policy returned an invalid or repeated "
                     "candidate index %d at step %d", j, rs->step);
            return UM_EPLUGIN;
        }
        w->seen[j] = 1;
    }
    return n_commit;
}

/* ------------------------------------------------------------------------- */
/* The loop                                                                   */

static void s_run_init(s_run_t *r, um_model_t *model, const um_gen_params_t *p,
                       int32_t n_prompt)
{
    const um_model_config_t *cfg = um_model_config(model);
    *r = (s_run_t){.model = model, .p = p, .n_prompt = n_prompt};
    r->traits = um_remask_traits(p->remask);
    r->L = n_prompt + p->gen_length;
    r->T = r->L + p->n_suffix;
    r->E = cfg->embedding_size;
    r->mask_id = cfg->mask_token_id;
    r->eos_id = cfg->eos_token_id;
    r->n_seq = p->cfg_scale > 0 ? 2 : 1;
    r->logits_shift = cfg->logits_shift;

    int32_t n_suppressed = 0;
    int32_t n_banned = um_model_never_sampled(cfg, r->banned);
    if (p->ban_eos && r->eos_id >= 0)
        r->banned[n_banned++] = r->eos_id;
    if (p->suppress_eos) {
        if (r->eos_id >= 0)
            r->suppressed[n_suppressed++] = r->eos_id;
        if (p->eot_id >= 0 && p->eot_id != r->eos_id)
            r->suppressed[n_suppressed++] = p->eot_id;
    }
    r->sample = (um_sample_config_t){
        /* Padding rows past the tokenizer's vocabulary are never predicted. */
        .n_vocab = cfg->vocab_size < cfg->embedding_size ? cfg->vocab_size : cfg->embedding_size,
        .temperature = p->temperature,
        .top_k = p->top_k,
        .top_p = p->top_p > 0 ? p->top_p : 1.0,
        .sampler = r->traits.sampler,
        .banned = r->banned,
        .n_banned = n_banned,
        .suppressed = r->suppressed,
        .n_suppressed = n_suppressed,
    };
}

/*
 * Allocate the block cache for a generation. A later pass of a block reads the
 * positions before the block from the cache and computes no logits there, so a mask
 * written in the prompt (infilling) could never be predicted: such prompts are
 * rejected. Returns 0, UM_EINVAL or UM_ENOMEM with err filled.
 */
static int s_cache_begin(const s_run_t *r, s_work_t *w, const int32_t *prompt, char *err,
                         size_t errlen)
{
    int32_t n_masks = 0;
    for (int32_t i = 0; i < r->n_prompt; i++)
        n_masks += prompt[i] == r->mask_id;
    if (n_masks > 0) {
        snprintf(err, errlen, "cache %s cannot serve a prompt with %d mask token%s "
                 "(infilling), because the block cache never predicts positions before the "
                 "active block: use cache none", um_cache_mode_name(r->p->cache), n_masks,
                 n_masks == 1 ? "" : "s");
        return UM_EINVAL;
    }
    int rc = um_kv_cache_new(r->model, r->n_seq, r->T, &w->cache);
    if (rc != 0)
        snprintf(err, errlen, "out of memory for a %s block cache of %d sequence%s of %d "
                 "positions: use cache none", um_cache_mode_name(r->p->cache), r->n_seq,
                 r->n_seq == 1 ? "" : "s", r->T);
    return rc;
}

/* ------------------------------------------------------------------------- */
/* The stepper                                                                */

/* A generation in progress: fixed settings, buffers, and its place in the loop. */
struct um_gen {
    s_run_t r;
    s_work_t w;
    um_step_fn on_step;
    void *user;
    int32_t *canvas;   /* the caller's, (T) */
    um_gen_stats_t st;
    double t_start;
    int adaptive;      /* the policy may commit more than the quota (UM_REMASK_ADAPTIVE) */
    int32_t block_length, n_blocks;

    /* The place in the loop: block b, its step i, step over the whole generation. */
    int32_t b, i, step;
    int block_open;    /* block b's bounds and mask count are set */
    int32_t block_start, block_end, n_steps, n_masked_block;
    int refresh;       /* the block's next pass refreshes the block cache */

    /* The step s_seek found, which the next forward pass serves. */
    int32_t n_cand, quota;
    double t, s;       /* times of the timestep schedule */
    int last;          /* last step of the block: every candidate is committed */
    double t_step;     /* when the step's pass was prepared */
    int full_pass;     /* the prepared pass lists every position (full_lm_head) */

    int done;          /* finished, failed or cancelled: no more steps */
    int rc;            /* the result once done */
    char err[512];
};

/*
 * Set the bounds of block g->b and count its masks. The quota covers every mask left of
 * the block's end, not only the block's own: masks written in the prompt (infilling)
 * compete for the same commits, and counting them too means no mask survives the last
 * block.
 */
static void s_block_open(um_gen_t *g)
{
    g->block_start = g->r.n_prompt + g->b * g->block_length;
    g->block_end = g->block_start + g->block_length < g->r.L ? g->block_start + g->block_length
                                                             : g->r.L;
    g->n_steps = s_block_steps(g->r.p->steps, g->n_blocks, g->b);
    /* The block's first pass, whichever step runs it, refreshes the block cache. */
    g->refresh = 1;
    g->n_masked_block = 0;
    for (int32_t i = 0; i < g->block_end; i++)
        g->n_masked_block += g->canvas[i] == g->r.mask_id;
    g->i = 0;
    g->block_open = 1;
}

/* Mark the generation finished: find the first generated EOS and succeed. */
static void s_finish(um_gen_t *g)
{
    const s_run_t *r = &g->r;
    if (g->st.eos_position < 0 && r->eos_id >= 0)
        for (int32_t pos = r->n_prompt; pos < r->L && g->st.eos_position < 0; pos++)
            if (g->canvas[pos] == r->eos_id)
                g->st.eos_position = pos;
    g->done = 1;
    g->rc = 0;
}

static void s_fail(um_gen_t *g, int rc)
{
    g->done = 1;
    g->rc = rc;
}

/*
 * Advance from the current step to the next one that runs a forward pass: collect its
 * candidates and quota. Steps that commit nothing and blocks with no mask left are
 * skipped with their step numbers, so the random streams stay as planned. Returns 1
 * with a step ready, or 0 when the generation has finished.
 */
static int s_seek(um_gen_t *g)
{
    const um_gen_params_t *p = g->r.p;
    const int32_t mask_id = g->r.mask_id;
    while (g->b < g->n_blocks) {
        if (!g->block_open)
            s_block_open(g);
        while (g->i < g->n_steps) {
            int32_t n_cand = 0;
            for (int32_t pos = 0; pos < g->block_end; pos++)
                if (g->canvas[pos] == mask_id)
                    g->w.cand[n_cand++] = pos;
            if (n_cand == 0) {
                /* The block is done early (an adaptive policy): skip its other steps,
                   keeping the step numbers, and so the random streams, as planned. */
                g->step += g->n_steps - g->i;
                g->i = g->n_steps;
                break;
            }
            const int last = g->i == g->n_steps - 1;
            const double eps = p->schedule == UM_SCHEDULE_TIMESTEP ? p->eps : 0.0;
            const double t = s_time(g->i, g->n_steps, eps), s = s_time(g->i + 1, g->n_steps, eps);
            int32_t quota = p->schedule == UM_SCHEDULE_TIMESTEP
                                ? s_timestep_quota(n_cand, t, s)
                                : s_quota(g->n_masked_block, g->n_steps, g->i);
            if (last || quota > n_cand)
                quota = n_cand;
            /*
             * A step that commits nothing changes nothing: LLaDA and Dream run and discard
             * its forward pass, unmaskd skips it, and jumps straight to the next step that
             * commits, so even INT32_MAX steps cost only the passes that commit.
             */
            if (quota == 0 && !g->adaptive) {
                int32_t next = s_next_committing_step(p->schedule, n_cand, g->i, g->n_steps, eps);
                g->step += next - g->i;
                g->i = next;
                continue;
            }
            g->n_cand = n_cand;
            g->quota = quota;
            g->t = t;
            g->s = s;
            g->last = last;
            return 1;
        }
        g->b++;
        g->block_open = 0;
    }
    return 0;
}

/* Seek the next step, or finish. Returns nonzero while a step is ready. */
static int s_next(um_gen_t *g)
{
    if (s_seek(g))
        return 1;
    s_finish(g);
    return 0;
}

int um_gen_begin(um_model_t *model, const int32_t *prompt, int32_t n_prompt,
                 const um_gen_params_t *p, um_step_fn on_step, void *user, int32_t *canvas,
                 um_gen_t **out, char *err, size_t errlen)
{
    *out = NULL;
    const um_model_config_t *cfg = um_model_config(model);
    const char *field;
    int rc = um_gen_check(cfg, n_prompt, p, &field, err, errlen);
    if (rc != 0)
        return rc;
    um_gen_t *g = calloc(1, sizeof *g);
    if (!g) {
        snprintf(err, errlen, "out of memory for a generation");
        return UM_ENOMEM;
    }
    g->t_start = s_now_ms();
    s_run_init(&g->r, model, p, n_prompt);
    const s_run_t *r = &g->r;
    g->on_step = on_step;
    g->user = user;
    g->canvas = canvas;
    g->adaptive = (r->traits.flags & UM_REMASK_ADAPTIVE) != 0;
    g->block_length = p->block_length < p->gen_length ? p->block_length : p->gen_length;
    g->n_blocks = (p->gen_length + g->block_length - 1) / g->block_length;
    g->st = (um_gen_stats_t){.eos_position = -1, .batch_size = 1};
    for (int32_t b = 0; b < g->n_blocks; b++)
        g->st.steps_planned += s_block_steps(p->steps, g->n_blocks, b);

    memcpy(canvas, prompt, (size_t)n_prompt * sizeof *canvas);
    for (int32_t i = n_prompt; i < r->L; i++)
        canvas[i] = r->mask_id;
    if (p->n_suffix > 0)
        memcpy(canvas + r->L, p->suffix, (size_t)p->n_suffix * sizeof *canvas);

    /* Candidates are masked positions, and no step adds masks, so the initial count bounds them. */
    int32_t max_cand = 0;
    for (int32_t i = 0; i < r->L; i++)
        max_cand += canvas[i] == r->mask_id;

    if (s_work_alloc(&g->w, r->n_seq, r->T, max_cand, r->E, r->sample.n_vocab) != 0) {
        snprintf(err, errlen, "out of memory for a canvas of %d tokens", r->T);
        rc = UM_ENOMEM;
        goto fail;
    }
    for (int32_t i = 0; i < n_prompt; i++)
        g->w.prompt_token[i] = prompt[i] != r->mask_id;
    if (p->full_lm_head) {
        /* Every position's logits, and the rows that ask for them in a shared pass. */
        const int32_t n_all = r->n_seq * r->T;
        g->w.full = malloc((size_t)n_all * r->E * sizeof *g->w.full);
        g->w.all_rows = malloc((size_t)n_all * sizeof *g->w.all_rows);
        if (!g->w.full || !g->w.all_rows) {
            snprintf(err, errlen, "out of memory for the logits of %d positions", n_all);
            rc = UM_ENOMEM;
            goto fail;
        }
        for (int32_t j = 0; j < n_all; j++)
            g->w.all_rows[j] = j;
    }
    if (p->cache != UM_CACHE_NONE && (rc = s_cache_begin(r, &g->w, prompt, err, errlen)) != 0)
        goto fail;
    g->st.cache_bytes = g->w.cache ? (int64_t)um_kv_cache_bytes(g->w.cache) : 0;
    s_next(g);
    *out = g;
    return 0;

fail:
    s_work_free(&g->w);
    free(g);
    return rc;
}

int um_gen_done(const um_gen_t *g)
{
    return g->done;
}

/* Record the step's forward pass in the stats. */
static void s_count_pass(um_gen_t *g, double forward_ms, int32_t batch_size)
{
    g->st.forward_ms += forward_ms;
    g->st.forward_passes++;
    g->st.steps_run++;
    if (batch_size > g->st.batch_size)
        g->st.batch_size = batch_size;
}

int um_gen_step_prepare(um_gen_t *g, um_gen_forward_t *fwd)
{
    if (g->done)
        return UM_EINVAL;
    g->t_step = s_now_ms();
    s_forward_input(&g->r, &g->w, g->canvas, g->n_cand);
    *fwd = (um_gen_forward_t){
        .ids = g->w.ids,
        .n_seq = g->r.n_seq,
        .seq_len = g->r.T,
        .rows = g->w.rows,
        .n_rows = g->r.n_seq * g->n_cand,
        .logits = g->w.logits,
        .batch_size = 1,
        .cache = g->w.cache,
        .q_start = 0,
        .q_len = g->r.T,
    };
    /* With a block cache, a block's first pass refreshes it and the others run the
       window alone. */
    if (g->w.cache && !g->refresh) {
        s_cache_window(&g->r, g->block_start, g->block_end, &fwd->q_start, &fwd->q_len);
        g->st.cached_passes++;
    }
    g->refresh = 0;
    g->full_pass = 0;
    if (g->r.p->full_lm_head && !g->w.cache) {
        /* The LM head over every position, as the reference samplers compute it.
           um_gen_step_finish picks the candidates' rows out of it. */
        fwd->rows = g->w.all_rows;
        fwd->n_rows = g->r.n_seq * g->r.T;
        fwd->logits = g->w.full;
        g->full_pass = 1;
    }
    return 0;
}

/*
 * The rest of a step once its logits are in: guidance, sampling, the policy's choice,
 * commits, early stop and the step callback. Returns 0 while the generation goes on or
 * has finished, or the UM_E* code that ended it (g->err gives the reason).
 */
static int s_step_rest(um_gen_t *g, float *logits)
{
    const s_run_t *r = &g->r;
    const um_gen_params_t *p = r->p;
    s_work_t *w = &g->w;
    const int32_t L = r->L, mask_id = r->mask_id, n_cand = g->n_cand, step = g->step;
    int rc;

    s_guidance(r, logits, n_cand);
    double t_sample = s_now_ms();
    rc = s_sample(r, w, logits, n_cand, step);
    g->st.sample_ms += s_now_ms() - t_sample;
    if (rc != 0) {
        snprintf(g->err, sizeof g->err, "the model produced non-finite logits at step %d: "
                 "lower cfg_scale or check the weights for NaN or infinity", step);
        return rc;
    }

    int32_t n_masked_all = 0;
    for (int32_t pos = 0; pos < L; pos++)
        n_masked_all += g->canvas[pos] == mask_id;
    um_remask_step_t rs = {
        .struct_size = sizeof rs,
        .n_candidates = n_cand,
        .position = w->cand,
        .token = w->token,
        .prob = w->prob,
        .logits = logits,
        .n_vocab = r->E,
        .quota = g->quota,
        .canvas_length = L,
        .block_start = g->block_start,
        .block_end = g->block_end,
        .step_in_block = g->i,
        .steps_in_block = g->n_steps,
        .step = step,
        .seed = p->seed,
        .rng_stream = UM_RNG_STREAM_REMASK(step),
        .temperature = p->temperature,
        .sampled_prob = w->sampled_prob,
        .margin = w->margin,
        .entropy = w->entropy,
        .demoted = w->demoted,
        .n_masked = n_masked_all,
        .top_k = p->top_k,
        .top_p = r->sample.top_p,
        .t = g->t,
        .s = g->s,
    };
    int32_t n_commit = s_select(r, w, &rs, g->last, g->err, sizeof g->err);
    if (n_commit < 0)
        return n_commit;
    for (int32_t k = 0; k < n_commit; k++) {
        int32_t j = w->commit[k];
        g->canvas[w->cand[j]] = w->token[j];
        w->committed[k] = w->cand[j];
    }

    int32_t n_filled = -1;
    if (p->early_stop)
        n_filled = s_early_stop(r, g->canvas, w->committed, n_commit, &g->st.eos_position);
    int32_t n_committed = n_commit + (n_filled > 0 ? n_filled : 0);
    qsort(w->committed, (size_t)n_committed, sizeof *w->committed, s_cmp_i32);
    if (n_filled >= 0)
        g->st.early_stop = 1;

    if (g->on_step) {
        int32_t left = 0;
        for (int32_t pos = 0; pos < L; pos++)
            left += g->canvas[pos] == mask_id;
        um_step_info_t info = {
            .step = step,
            .n_steps = g->st.steps_planned,
            .block = g->b,
            .n_blocks = g->n_blocks,
            .canvas = g->canvas,
            .canvas_length = L,
            .committed = w->committed,
            .n_committed = n_committed,
            .n_masked = left,
            .step_ms = s_now_ms() - g->t_step,
            .early_stop = g->st.early_stop,
        };
        if (g->on_step(g->user, &info) != 0) {
            snprintf(g->err, sizeof g->err, "cancelled at step %d", step);
            return UM_ECANCELLED;
        }
    }
    return 0;
}

int um_gen_step_finish(um_gen_t *g, const um_gen_forward_t *fwd)
{
    if (g->done)
        return UM_EINVAL;
    s_count_pass(g, fwd->forward_ms, fwd->batch_size);
    int rc = fwd->rc;
    float *logits = fwd->logits;
    if (rc == 0 && g->full_pass) {
        /* Every position's logits came back: keep the candidates' rows. */
        const size_t E = (size_t)g->r.E;
        for (int32_t j = 0; j < g->r.n_seq * g->n_cand; j++)
            memcpy(g->w.logits + j * E, logits + (size_t)g->w.rows[j] * E, E * sizeof *logits);
        logits = g->w.logits;
    }
    if (rc != 0)
        snprintf(g->err, sizeof g->err, "forward pass failed at step %d: %s", g->step,
                 um_strerror(rc));
    else
        rc = s_step_rest(g, logits);
    if (rc != 0) {
        s_fail(g, rc);
        return rc;
    }
    if (g->st.early_stop) {
        s_finish(g);
        return 0;
    }
    g->i++;
    g->step++;
    s_next(g);
    return 0;
}

/* Run a prepared step with a forward pass of its own, then finish it. */
static int s_step_alone(um_gen_t *g, um_gen_forward_t *fwd)
{
    /* The lone pass writes the candidates' rows into the generation's logits itself. */
    g->full_pass = 0;
    fwd->logits = g->w.logits;
    fwd->batch_size = 1;
    double t_fwd = s_now_ms();
    fwd->rc = s_forward_alone(&g->r, &g->w, g->n_cand, fwd->q_start, fwd->q_len);
    fwd->forward_ms = s_now_ms() - t_fwd;
    return um_gen_step_finish(g, fwd);
}

int um_gen_step(um_gen_t *g)
{
    if (g->done)
        return UM_EINVAL;
    um_gen_forward_t fwd;
    um_gen_step_prepare(g, &fwd);
    return s_step_alone(g, &fwd);
}

/*
 * Run one shared forward pass for the prepared steps fwd[0..n). Each step is a part of
 * um_model_forward_parts, with its own window and block cache. Each step's logits point
 * at its rows of the model's batch logits buffer, valid until the next batch. Sets
 * fwd[].rc, forward_ms and batch_size, and returns the pass's result.
 */
static int s_batch_forward(um_model_t *model, um_gen_forward_t *fwd, int32_t n)
{
    const size_t E = (size_t)um_model_config(model)->embedding_size;
    size_t n_rows = 0;
    for (int32_t g = 0; g < n; g++)
        n_rows += (size_t)fwd[g].n_rows;
    double t0 = s_now_ms();
    um_forward_part_t *parts = malloc((size_t)n * sizeof *parts);
    float *logits = NULL;
    int rc = parts ? um_model_batch_logits(model, (n_rows > 0 ? n_rows : 1) * E, &logits)
                   : UM_ENOMEM;
    if (rc == 0) {
        size_t row = 0;
        for (int32_t g = 0; g < n; g++) {
            const um_gen_forward_t *f = &fwd[g];
            parts[g] = (um_forward_part_t){
                .ids = f->ids, .n_seq = f->n_seq, .seq_len = f->seq_len, .cache = f->cache,
                .q_start = f->q_start, .q_len = f->q_len, .rows = f->rows,
                .n_rows = f->n_rows,
            };
            fwd[g].logits = logits + row * E;
            row += (size_t)f->n_rows;
        }
        rc = um_model_forward_parts(model, parts, n, logits);
    }
    double ms = s_now_ms() - t0;
    for (int32_t g = 0; g < n; g++) {
        fwd[g].rc = rc;
        fwd[g].forward_ms = ms;
        fwd[g].batch_size = n;
    }
    free(parts);
    return rc;
}

int um_gen_step_batch(um_gen_t *const *gens, int32_t n)
{
    if (n < 0 || (n > 0 && !gens))
        return UM_EINVAL;
    um_gen_t **shared = malloc((size_t)(n > 0 ? n : 1) * sizeof *shared);
    um_gen_forward_t *fwd = malloc((size_t)(n > 0 ? n : 1) * sizeof *fwd);
    if (!shared || !fwd) {
        free(shared);
        free(fwd);
        return UM_ENOMEM;
    }
    um_model_t *model = NULL;
    for (int32_t g = 0; g < n; g++) {
        if (!gens[g] || gens[g]->done)
            continue;
        if (model && gens[g]->r.model != model) {
            free(shared);
            free(fwd);
            return UM_EINVAL;
        }
        model = gens[g]->r.model;
    }
    int32_t n_shared = 0;
    for (int32_t g = 0; g < n; g++) {
        if (!gens[g] || gens[g]->done)
            continue;
        shared[n_shared++] = gens[g];
    }
    if (n_shared == 1) {
        um_gen_step(shared[0]);
    } else if (n_shared > 1) {
        for (int32_t g = 0; g < n_shared; g++)
            um_gen_step_prepare(shared[g], &fwd[g]);
        if (s_batch_forward(model, fwd, n_shared) == UM_ENOMEM) {
            /* No memory for the shared pass: each generation runs this step alone rather
               than all of them failing. Cache rows the failed pass wrote are written again
               by the lone pass, from the same ids and window.
               NOTE: no test reaches this branch: the suites cannot make the shared pass
               alone run out of memory. */
            /* Logged the first time and then at every power of two, since a batch that
               does not fit retries at every step. */
            static atomic_long fallbacks;
            long n_fallbacks = atomic_fetch_add(&fallbacks, 1) + 1;
            if ((n_fallbacks & (n_fallbacks - 1)) == 0)
                um_warn("generate", "no memory for a shared pass of %d generations: they run "
                        "this step one at a time (%ld steps so far); lower --max-batch",
                        n_shared, n_fallbacks);
            for (int32_t g = 0; g < n_shared; g++)
                s_step_alone(shared[g], &fwd[g]);
        } else {
            for (int32_t g = 0; g < n_shared; g++)
                um_gen_step_finish(shared[g], &fwd[g]);
        }
    }
    free(shared);
    free(fwd);
    return 0;
}

int um_gen_end(um_gen_t **gp, um_gen_stats_t *stats, char *err, size_t errlen)
{
    if (!gp || !*gp)
        return UM_EINVAL;
    um_gen_t *g = *gp;
    int rc = g->rc;
    if (!g->done) {
        rc = UM_ECANCELLED;
        snprintf(g->err, sizeof g->err, "stopped before step %d of %d", g->step,
                 g->st.steps_planned);
    }
    if (rc != 0 && err && errlen > 0)
        snprintf(err, errlen, "%s", g->err);
    g->st.total_ms = s_now_ms() - g->t_start;
    if (stats)
        *stats = g->st;
    s_work_free(&g->w);
    free(g);
    *gp = NULL;
    return rc;
}

int um_generate(um_model_t *model, const int32_t *prompt, int32_t n_prompt,
                const um_gen_params_t *p, um_step_fn on_step, void *user, int32_t *canvas,
                um_gen_stats_t *stats, char *err, size_t errlen)
{
    um_gen_t *g;
    int rc = um_gen_begin(model, prompt, n_prompt, p, on_step, user, canvas, &g, err, errlen);
    if (rc != 0) {
        if (stats)
            *stats = (um_gen_stats_t){.eos_position = -1};
        return rc;
    }
    while (!um_gen_done(g))
        um_gen_step(g);
    return um_gen_end(&g, stats, err, errlen);
}
