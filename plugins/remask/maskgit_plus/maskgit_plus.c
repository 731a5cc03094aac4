/*
 * maskgit_plus: Dream's maskgit_plus policy.
 *
 * Each step commits the quota candidates whose predicted token is most probable under
 * the sampling distribution (step->sampled_prob). With alg_temp > 0
 * the positions are drawn instead of taken in order: without replacement, with
 * probabilities softmax(score / alg_temp) as in Dream's multinomial draw, here as
 * Gumbel-top-k with the request's seeded generator (index: the position). Candidates
 * demoted by the request's end-of-text suppression come last either way. Ties go to
 * the lower position.
 *
 * Tokens: one categorical draw from softmax(logits / T) after top-p and top-k (argmax at
 * T = 0), as Dream's sample_tokens. Schedule: Dream's timesteps unless the request names
 * another. The per-request state contains alg_temp only.
 */
#include <math.h>
#include <stddef.h>
#include <stdio.h>

#include <unmaskd/plugin.h>

typedef struct s_state {
    const um_host_t *host; /* to free the state in request_end */
    double alg_temp;
} s_state_t;

static const um_param_spec_t s_params[] = {
    {"alg_temp", UM_PARAM_NUMBER, 0.0, 0.0, 1000.0,
     "0 takes positions in score order; above 0 draws them from softmax(score / alg_temp)"},
};

static int s_init(const um_host_t *host, char *err, size_t errlen)
{
    if (host->struct_size < offsetof(um_host_t, rank) + sizeof host->rank) {
        snprintf(err, errlen, "the host has no rank service: it predates plugin ABI 1.1");
        return UM_EUNSUPPORTED;
    }
    return 0;
}

static int s_begin(const um_host_t *host, const um_param_t *params, int32_t n_params,
                   void **state, char *err, size_t errlen)
{
    s_state_t *st = host->alloc(sizeof *st);
    if (!st)
        return UM_ENOMEM;
    st->host = host;
    st->alg_temp = n_params > 0 ? params[0].number : 0.0;
    *state = st;
    return 0;
}

static int s_select(void *state, const um_host_t *host, const um_remask_step_t *step,
                    int32_t *commit, int32_t *n_commit)
{
    const s_state_t *st = state;
    int32_t n = step->n_candidates;
    if (step->struct_size < offsetof(um_remask_step_t, t) + sizeof step->t)
        return UM_EUNSUPPORTED;
    double *score = host->alloc((size_t)(n > 0 ? n : 1) * sizeof *score);
    if (!score)
        return UM_ENOMEM;
    for (int32_t j = 0; j < n; j++) {
        score[j] = step->sampled_prob[j];
        if (st->alg_temp > 0) {
            double u = host->rng_uniform(step->seed, step->rng_stream,
                                         (uint64_t)step->position[j]);
            score[j] = score[j] / st->alg_temp - log(-log(u));
        }
    }
    int32_t rc = host->rank(score, step->demoted, n, commit);
    host->free(score);
    if (rc < 0)
        return rc;
    *n_commit = step->quota < n ? step->quota : n;
    return 0;
}

static void s_end(void *state)
{
    s_state_t *st = state;
    if (st)
        st->host->free(st);
}

static const um_remask_ops_t s_ops = {
    .struct_size = sizeof(um_remask_ops_t),
    .params = s_params,
    .n_params = (int32_t)(sizeof s_params / sizeof s_params[0]),
    .request_begin = s_begin,
    .select = s_select,
    .request_end = s_end,
    .flags = 0,
    .token_sampler = UM_SAMPLER_CATEGORICAL,
    .schedule = UM_SCHEDULE_TIMESTEP,
};

static const um_plugin_desc_t s_desc = {
    .abi_major = UM_PLUGIN_ABI_MAJOR,
    .abi_minor = UM_PLUGIN_ABI_MINOR,
    .struct_size = sizeof(um_plugin_desc_t),
    .kind = UM_PLUGIN_REMASK,
    .name = "maskgit_plus",
    .version = "1.0.0",
    .description = "commit the predictions most probable under the sampling distribution (Dream's maskgit_plus)",
    .remask = &s_ops,
    .init = s_init,
};

UM_PLUGIN_EXPORT const um_plugin_desc_t *um_plugin_describe(void)
{
    return &s_desc;
}
