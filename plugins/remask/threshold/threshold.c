/*
 * threshold: Fast-dLLM's confidence-aware parallel decoding. Each step commits the
 * most confident candidate and every other candidate whose confidence (step->prob,
 * LLaDA's softmax of the raw logits) is at least the threshold, so a step commits as
 * many tokens as the model is sure of, and at least one. Candidates are those of the
 * active block, as in Fast-dLLM. A candidate demoted by end-of-text suppression is
 * committed only when it ranks first.
 *
 * The request's steps bound the steps per block: the last step of a block commits
 * everything left in it. Tokens: float64 Gumbel-max, as LLaDA. Schedule: LLaDA's
 * quota, which only sets the step bound here.
 */
#include <stddef.h>
#include <stdio.h>

#include <unmaskd/plugin.h>

typedef struct s_state {
    const um_host_t *host; /* to free the state in request_end */
    double value;          /* the threshold */
} s_state_t;

static const um_param_spec_t s_params[] = {
    {"threshold", UM_PARAM_NUMBER, 0.9, 0.0, 1.0,
     "commit every candidate whose confidence is at least this (Fast-dLLM uses 0.9)"},
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
    st->value = n_params > 0 ? params[0].number : s_params[0].default_value;
    *state = st;
    return 0;
}

static void s_end(void *state)
{
    s_state_t *st = state;
    if (st)
        st->host->free(st);
}

static int s_select(void *state, const um_host_t *host, const um_remask_step_t *step,
                    int32_t *commit, int32_t *n_commit)
{
    const s_state_t *st = state;
    int32_t n = step->n_candidates;
    if (step->struct_size < offsetof(um_remask_step_t, t) + sizeof step->t)
        return UM_EUNSUPPORTED;
    int32_t rc = host->rank(step->prob, step->demoted, n, commit);
    if (rc < 0)
        return rc;
    /* The order is by confidence, so the kept ones form a prefix after the first. */
    int32_t k = 1;
    while (k < n && !step->demoted[commit[k]] && step->prob[commit[k]] >= st->value)
        k++;
    *n_commit = k;
    return 0;
}

static const um_remask_ops_t s_ops = {
    .struct_size = sizeof(um_remask_ops_t),
    .params = s_params,
    .n_params = (int32_t)(sizeof s_params / sizeof s_params[0]),
    .request_begin = s_begin,
    .select = s_select,
    .request_end = s_end,
    .flags = UM_REMASK_ADAPTIVE,
    .token_sampler = UM_SAMPLER_GUMBEL,
    .schedule = UM_SCHEDULE_QUOTA,
};

static const um_plugin_desc_t s_desc = {
    .abi_major = UM_PLUGIN_ABI_MAJOR,
    .abi_minor = UM_PLUGIN_ABI_MINOR,
    .struct_size = sizeof(um_plugin_desc_t),
    .kind = UM_PLUGIN_REMASK,
    .name = "threshold",
    .version = "1.0.0",
    .description = "commit every prediction above a confidence threshold, at least one per step (Fast-dLLM)",
    .remask = &s_ops,
    .init = s_init,
};

UM_PLUGIN_EXPORT const um_plugin_desc_t *um_plugin_describe(void)
{
    return &s_desc;
}
