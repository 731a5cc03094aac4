/*
 * left_to_right: an example remasking policy, built outside the unmaskd tree against
 * the installed SDK (docs/plugins.md walks through it):
 *
 *   cc -shared -fPIC -fvisibility=hidden $(pkg-config --cflags unmaskd-plugin) \
 *       left_to_right.c -o left_to_right.so
 *
 * Each step looks at the quota + lookahead leftmost candidates and commits the quota
 * most confident of them. lookahead 0 decodes strictly left to right, like an
 * autoregressive model; a large lookahead gives LLaDA's low_confidence. Candidates
 * that the request's end-of-text suppression demotes come last within the window.
 *
 * The per-request state contains the lookahead. The policy keeps no global state, so
 * concurrent requests are safe.
 */
#include <stddef.h>
#include <stdio.h>

#include <unmaskd/plugin.h>

typedef struct s_state {
    const um_host_t *host; /* request_end frees the state through it */
    int32_t lookahead;
} s_state_t;

static const um_param_spec_t s_params[] = {
    {"lookahead", UM_PARAM_INTEGER, 0, 0, 1 << 20,
     "candidates past the quota that compete for commits: 0 is strictly left to right"},
};

/* Refuse a host older than ABI 1.1, which lacks the rank service this policy uses. */
static int s_init(const um_host_t *host, char *err, size_t errlen)
{
    if (host->struct_size < offsetof(um_host_t, rank) + sizeof host->rank) {
        snprintf(err, errlen, "needs a host with plugin ABI 1.1 or later");
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
    st->lookahead = (int32_t)params[0].number; /* checked: an integer in [0, 2^20] */
    *state = st;
    return 0;
}

static int s_select(void *state, const um_host_t *host, const um_remask_step_t *step,
                    int32_t *commit, int32_t *n_commit)
{
    const s_state_t *st = state;
    /* Candidates come in ascending position order, so the window is a prefix. */
    int64_t window = (int64_t)step->quota + st->lookahead;
    int32_t n = window < step->n_candidates ? (int32_t)window : step->n_candidates;
    int32_t rc = host->rank(step->prob, step->demoted, n, commit);
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
    .n_params = 1,
    .request_begin = s_begin,
    .select = s_select,
    .request_end = s_end,
    .flags = 0,                         /* commits exactly the quota */
    .token_sampler = UM_SAMPLER_GUMBEL, /* LLaDA's token sampling */
    .schedule = UM_SCHEDULE_QUOTA,      /* LLaDA's per-block quota */
};

static const um_plugin_desc_t s_desc = {
    .abi_major = UM_PLUGIN_ABI_MAJOR,
    .abi_minor = UM_PLUGIN_ABI_MINOR,
    .struct_size = sizeof(um_plugin_desc_t),
    .kind = UM_PLUGIN_REMASK,
    .name = "left_to_right",
    .version = "1.0.0",
    .description = "commit the leftmost candidates, optionally the most confident within a "
                   "window (example plugin)",
    .remask = &s_ops,
    .init = s_init,
};

UM_PLUGIN_EXPORT const um_plugin_desc_t *um_plugin_describe(void)
{
    return &s_desc;
}
