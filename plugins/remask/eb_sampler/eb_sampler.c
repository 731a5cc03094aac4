/*
 * eb_sampler: the entropy-bounded sampler (EB-Sampler, Ben-Hamu et al., 2025). Sort the
 * candidates by the entropy of their sampling distribution, lowest first, so the most
 * certain positions go first; commit the longest prefix U whose entropies, summed
 * without the largest of them, stay at or below gamma:
 * sum(H_U) - max(H_U) <= gamma. A single candidate always fits, so every step commits
 * at least one; gamma 0 commits one per step unless entropies are 0. A candidate
 * demoted by end-of-text suppression ends the prefix unless it ranks first.
 *
 * The request's steps bound the steps per block. Tokens: one categorical draw from the
 * sampling distribution, whose entropy this policy bounds. Schedule: LLaDA's quota,
 * which only sets the step bound here.
 */
#include <stddef.h>
#include <stdio.h>

#include <unmaskd/plugin.h>

typedef struct s_state {
    const um_host_t *host; /* to free the state in request_end */
    double value;          /* gamma, in nats */
} s_state_t;

static const um_param_spec_t s_params[] = {
    {"gamma", UM_PARAM_NUMBER, 0.01, 0.0, 1000.0,
     "entropy budget in nats: the committed entropies, less the largest, sum to at most "
     "this"},
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
    double *score = host->alloc((size_t)(n > 0 ? n : 1) * sizeof *score);
    if (!score)
        return UM_ENOMEM;
    for (int32_t j = 0; j < n; j++)
        score[j] = -step->entropy[j];
    int32_t rc = host->rank(score, step->demoted, n, commit);
    host->free(score);
    if (rc < 0)
        return rc;
    double sum = step->entropy[commit[0]], max = sum;
    int32_t k = 1;
    while (k < n && !step->demoted[commit[k]]) {
        double h = step->entropy[commit[k]];
        double next_max = h > max ? h : max;
        if (sum + h - next_max > st->value)
            break;
        sum += h;
        max = next_max;
        k++;
    }
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
    .token_sampler = UM_SAMPLER_CATEGORICAL,
    .schedule = UM_SCHEDULE_QUOTA,
};

static const um_plugin_desc_t s_desc = {
    .abi_major = UM_PLUGIN_ABI_MAJOR,
    .abi_minor = UM_PLUGIN_ABI_MINOR,
    .struct_size = sizeof(um_plugin_desc_t),
    .kind = UM_PLUGIN_REMASK,
    .name = "eb_sampler",
    .version = "1.0.0",
    .description = "commit the longest lowest-entropy prefix whose entropy, less its largest, stays within gamma (EB-Sampler)",
    .remask = &s_ops,
    .init = s_init,
};

UM_PLUGIN_EXPORT const um_plugin_desc_t *um_plugin_describe(void)
{
    return &s_desc;
}
