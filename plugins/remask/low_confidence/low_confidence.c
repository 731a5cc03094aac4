/*
 * low_confidence: LLaDA's default remasking policy. Each step commits the quota
 * candidates whose predicted token has the highest probability under the model, the
 * softmax of the raw logits before temperature. Ties go to the lower position.
 * Committing the most confident tokens is the same as remasking the least
 * confident ones, which is how the LLaDA paper phrases it.
 *
 * Stateless, so one descriptor serves any number of concurrent requests.
 */
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
    *n_commit = host->select_top(step->prob, step->n_candidates, step->quota, commit);
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
};

static const um_plugin_desc_t s_desc = {
    .abi_major = UM_PLUGIN_ABI_MAJOR,
    .abi_minor = UM_PLUGIN_ABI_MINOR,
    .struct_size = sizeof(um_plugin_desc_t),
    .kind = UM_PLUGIN_REMASK,
    .name = "low_confidence",
    .version = "1.0.0",
    .description = "commit the most probable predictions first (LLaDA's default)",
    .remask = &s_ops,
};

UM_PLUGIN_EXPORT const um_plugin_desc_t *um_plugin_describe(void)
{
    return &s_desc;
}
