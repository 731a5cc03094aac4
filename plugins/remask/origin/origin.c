/*
 * origin: Dream's default "origin" policy. At a step from time t down to s every
 * candidate is committed independently with probability 1 - s / t, drawn from the
 * request's seeded generator (index: the position), whatever the model's confidence.
 * Dream may commit nothing in a step; here the host then commits the most confident
 * candidate, so every step makes progress. A candidate demoted by end-of-text
 * suppression is not drawn; it waits for the last step of its block, which commits
 * everything left.
 *
 * Tokens: one categorical draw, as Dream. Schedule: Dream's timesteps (t and s).
 */
#include <stddef.h>
#include <stdio.h>

#include <unmaskd/plugin.h>

static int s_begin(const um_host_t *host, const um_param_t *params, int32_t n_params,
                   void **state, char *err, size_t errlen)
{
    *state = NULL;
    return 0;
}

static void s_end(void *state)
{
}

static int s_select(void *state, const um_host_t *host, const um_remask_step_t *step,
                    int32_t *commit, int32_t *n_commit)
{
    if (step->struct_size < offsetof(um_remask_step_t, t) + sizeof step->t)
        return UM_EUNSUPPORTED;
    double p = 1.0 - step->s / step->t;
    int32_t k = 0;
    for (int32_t j = 0; j < step->n_candidates; j++) {
        double u = host->rng_uniform(step->seed, step->rng_stream, (uint64_t)step->position[j]);
        if (!step->demoted[j] && u < p)
            commit[k++] = j;
    }
    *n_commit = k;
    return 0;
}

static const um_remask_ops_t s_ops = {
    .struct_size = sizeof(um_remask_ops_t),
    .params = NULL,
    .n_params = 0,
    .request_begin = s_begin,
    .select = s_select,
    .request_end = s_end,
    .flags = UM_REMASK_ADAPTIVE,
    .token_sampler = UM_SAMPLER_CATEGORICAL,
    .schedule = UM_SCHEDULE_TIMESTEP,
};

static const um_plugin_desc_t s_desc = {
    .abi_major = UM_PLUGIN_ABI_MAJOR,
    .abi_minor = UM_PLUGIN_ABI_MINOR,
    .struct_size = sizeof(um_plugin_desc_t),
    .kind = UM_PLUGIN_REMASK,
    .name = "origin",
    .version = "1.0.0",
    .description = "commit each position with probability 1 - s / t, ignoring confidence (Dream's origin)",
    .remask = &s_ops,
};

UM_PLUGIN_EXPORT const um_plugin_desc_t *um_plugin_describe(void)
{
    return &s_desc;
}
