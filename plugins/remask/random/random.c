/*
 * random: LLaDA's random remasking policy. Each step gives every candidate a
 * uniform score from the request's seeded generator and commits the quota
 * candidates with the highest scores, so the order of unmasking ignores the
 * model's confidence. The scores depend only on (seed, step, position), so a
 * seeded request gives the same result on every run. Candidates demoted by the
 * request's end-of-text suppression come last.
 *
 * Tokens: float64 Gumbel-max at the request's temperature. Schedule: LLaDA's quota.
 * Stateless, so one descriptor serves any number of concurrent requests.
 */
#include <stddef.h>
#include <stdio.h>

#include <unmaskd/plugin.h>

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
    *state = NULL;
    return 0;
}

static int s_select(void *state, const um_host_t *host, const um_remask_step_t *step,
                    int32_t *commit, int32_t *n_commit)
{
    int32_t n = step->n_candidates;
    double *score = host->alloc((size_t)(n > 0 ? n : 1) * sizeof *score);
    if (!score)
        return UM_ENOMEM;
    for (int32_t j = 0; j < n; j++)
        score[j] = host->rng_uniform(step->seed, step->rng_stream, (uint64_t)step->position[j]);
    int32_t rc = host->rank(score, step->demoted, n, commit);
    host->free(score);
    if (rc < 0)
        return rc;
    *n_commit = step->quota < n ? step->quota : n;
    return 0;
}

static void s_end(void *state)
{
}

static const um_remask_ops_t s_ops = {
    .struct_size = sizeof(um_remask_ops_t),
    .params = NULL,
    .n_params = 0,
    .request_begin = s_begin,
    .select = s_select,
    .request_end = s_end,
    .flags = 0,
    .token_sampler = UM_SAMPLER_GUMBEL,
    .schedule = UM_SCHEDULE_QUOTA,
};

static const um_plugin_desc_t s_desc = {
    .abi_major = UM_PLUGIN_ABI_MAJOR,
    .abi_minor = UM_PLUGIN_ABI_MINOR,
    .struct_size = sizeof(um_plugin_desc_t),
    .kind = UM_PLUGIN_REMASK,
    .name = "random",
    .version = "1.1.0",
    .description = "commit candidates in a seeded random order (LLaDA's random remasking)",
    .remask = &s_ops,
    .init = s_init,
};

UM_PLUGIN_EXPORT const um_plugin_desc_t *um_plugin_describe(void)
{
    return &s_desc;
}
