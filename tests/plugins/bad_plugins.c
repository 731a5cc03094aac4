/*
 * Broken plugins for the loader tests: each build flag produces one shared object
 * that must be rejected for one reason.
 */
#include <unmaskd/plugin.h>

static int s_begin(const um_host_t *host, const um_param_t *params, int32_t n_params,
                   void **state, char *err, size_t errlen)
{
    *state = 0;
    return 0;
}

static int s_select(void *state, const um_host_t *host, const um_remask_step_t *step,
                    int32_t *commit, int32_t *n_commit)
{
    *n_commit = 0;
    return 0;
}

static void s_end(void *state)
{
}

static const um_remask_ops_t s_ops __attribute__((unused)) = {
    .struct_size = sizeof(um_remask_ops_t),
    .request_begin = s_begin,
    .select = s_select,
    .request_end = s_end,
};

static const um_plugin_desc_t s_desc = {
#ifdef BAD_ABI
    .abi_major = UM_PLUGIN_ABI_MAJOR + 1,
#else
    .abi_major = UM_PLUGIN_ABI_MAJOR,
#endif
    .abi_minor = UM_PLUGIN_ABI_MINOR,
#ifdef SMALL_DESC
    .struct_size = 16,
#else
    .struct_size = sizeof(um_plugin_desc_t),
#endif
#ifdef BAD_KIND
    .kind = 7,
#else
    .kind = UM_PLUGIN_REMASK,
#endif
#ifdef BAD_NAME
    .name = "Bad Name!",
#else
    .name = "fixture",
#endif
    .version = "0",
    .description = "loader test fixture",
#ifndef NO_TABLE
    .remask = &s_ops,
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
