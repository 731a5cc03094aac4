/*
 * low_confidence: LLaDA's default remasking policy. Each step commits the quota
 * candidates whose predicted token has the highest probability under the model, the
 * softmax of the raw logits before temperature (step->prob). Ties go to the lower
 * position. Committing the most confident tokens is the same as remasking the least
 * confident ones, which is how the LLaDA paper phrases it. Candidates demoted by the
 * request's end-of-text suppression come last.
 *
 * Tokens: float64 Gumbel-max at the request's temperature. Schedule: LLaDA's quota.
 * Stateless, so one descriptor serves any number of concurrent requests.
 */
#include <stddef.h>

#include <unmaskd/plugin.h>

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
    /* A 1.0 host has no rank service and no demoted candidates: select_top suffices. */
    if (host->struct_size < offsetof(um_host_t, rank) + sizeof host->rank
        || step->struct_size < offsetof(um_remask_step_t, demoted) + sizeof step->demoted) {
        *n_commit = host->select_top(step->prob, n, step->quota, commit);
        return 0;
    }
    int32_t rc = host->rank(step->prob, step->demoted, n, commit);
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
    .name = "low_confidence",
    .version = "1.1.0",
    .description = "commit the most probable predictions first (LLaDA's default)",
    .remask = &s_ops,
};

UM_PLUGIN_EXPORT const um_plugin_desc_t *um_plugin_describe(void)
{
    return &s_desc;
}
