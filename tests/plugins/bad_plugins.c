/*
 * Fixture plugins for the loader tests: each build flag produces one shared object.
 * Most must be rejected for one reason each (BAD_ABI, NO_ENTRY, BAD_KIND, NO_TABLE,
 * BAD_NAME, SMALL_DESC, BAD_INIT, BAD_SAMPLER, and DUP_NAME built twice under one name).
 * ABI10 builds a working policy exactly as a plugin compiled against ABI 1.0 looks to
 * the host: minor 0, and structs that end where 1.0's ended.
 */
#include <stddef.h>
#include <stdio.h>

#include <unmaskd/plugin.h>

static int s_begin(const um_host_t *host, const um_param_t *params, int32_t n_params,
                   void **state, char *err, size_t errlen)
{
    *state = 0;
    return 0;
}

#ifdef ABI10
/* Commit the quota leftmost candidates, using only 1.0 step fields. */
static int s_select(void *state, const um_host_t *host, const um_remask_step_t *step,
                    int32_t *commit, int32_t *n_commit)
{
    int32_t k = step->quota < step->n_candidates ? step->quota : step->n_candidates;
    for (int32_t j = 0; j < k; j++)
        commit[j] = j;
    *n_commit = k;
    return 0;
}
#else
static int s_select(void *state, const um_host_t *host, const um_remask_step_t *step,
                    int32_t *commit, int32_t *n_commit)
{
    *n_commit = 0;
    return 0;
}
#endif

static void s_end(void *state)
{
}

#ifdef BAD_INIT
static int s_init(const um_host_t *host, char *err, size_t errlen)
{
    snprintf(err, errlen, "fixture refuses to start: no licence key");
    return UM_EUNSUPPORTED;
}
#endif

static const um_remask_ops_t s_ops __attribute__((unused)) = {
#ifdef ABI10
    .struct_size = offsetof(um_remask_ops_t, flags),
#else
    .struct_size = sizeof(um_remask_ops_t),
#endif
    .request_begin = s_begin,
    .select = s_select,
    .request_end = s_end,
#ifdef BAD_SAMPLER
    .token_sampler = 9,
#endif
};

static const um_plugin_desc_t s_desc = {
#ifdef BAD_ABI
    .abi_major = UM_PLUGIN_ABI_MAJOR + 1,
#else
    .abi_major = UM_PLUGIN_ABI_MAJOR,
#endif
#ifdef ABI10
    .abi_minor = 0,
#else
    .abi_minor = UM_PLUGIN_ABI_MINOR,
#endif
#if defined(SMALL_DESC)
    .struct_size = 16,
#elif defined(ABI10)
    .struct_size = offsetof(um_plugin_desc_t, init),
#else
    .struct_size = sizeof(um_plugin_desc_t),
#endif
#ifdef BAD_KIND
    .kind = 7,
#else
    .kind = UM_PLUGIN_REMASK,
#endif
#if defined(BAD_NAME)
    .name = "Bad Name!",
#elif defined(DUP_NAME)
    .name = "fixture_dup",
#elif defined(ABI10)
    .name = "fixture_abi10",
#else
    .name = "fixture",
#endif
    .version = "0",
    .description = "loader test fixture",
#ifndef NO_TABLE
    .remask = &s_ops,
#endif
#ifdef BAD_INIT
    .init = s_init,
#endif
};

#ifndef NO_ENTRY
UM_PLUGIN_EXPORT const um_plugin_desc_t *um_plugin_describe(void)
{
    return &s_desc;
}
#else
UM_PLUGIN_EXPORT const um_plugin_desc_t *not_the_entry(void)
{
    return &s_desc;
}
#endif
