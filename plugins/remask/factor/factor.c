/*
 * factor: Fast-dLLM's factor decoding. Sort the candidates by confidence (step->prob),
 * c_1 >= c_2 >= ..., and commit the longest prefix in which every c_n with n >= 2 is
 * at least 1 - factor / (n + 1); the first candidate is always committed. Fast-dLLM
 * derives the bound from its Theorem 1: greedy parallel decoding of n tokens matches
 * sequential decoding when each marginal exceeds 1 - eps with (n + 1) eps <= 1. A
 * candidate demoted by end-of-text suppression ends the prefix unless it ranks first.
 *
 * Fast-dLLM's loop also commits the first failing candidate when it is the last one;
 * this policy does not. The request's steps bound the steps per block, as for
 * threshold. Tokens: float64 Gumbel-max, as LLaDA. Schedule: LLaDA's quota.
 */
#include <stddef.h>
#include <stdio.h>

#include <unmaskd/plugin.h>

typedef struct s_state {
    const um_host_t *host; /* to free the state in request_end */
    double value;          /* the factor */
} s_state_t;

static const um_param_spec_t s_params[] = {
    {"factor", UM_PARAM_NUMBER, 1.0, 0.0, 1000.0,
     "the n-th most confident candidate is committed when its confidence is at least "
     "1 - factor / (n + 1)"},
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
    int32_t k = 1; /* commit[k] is the (k + 1)-th candidate, c_(k+1) */
    while (k < n && !step->demoted[commit[k]]
           && step->prob[commit[k]] >= 1.0 - st->value / (double)(k + 2))
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
    .name = "factor",
    .version = "1.0.0",
    .description = "commit the longest confident prefix under Fast-dLLM's 1 - factor / (n + 1) bound",
    .remask = &s_ops,
    .init = s_init,
};

UM_PLUGIN_EXPORT const um_plugin_desc_t *um_plugin_describe(void)
{
    return &s_desc;
}
