/*
 * Plugin host tests: discovery of the real plugins, every rejection path, rescans,
 * ABI 1.0 compatibility, parameter checks and the host services.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "plugins.h"
#include "testutil.h"

/* Loaded plugins of one kind; tokenizer plugins come and go with other work. */
static size_t s_count_kind(const um_plugin_registry_t *reg, um_plugin_kind_t kind)
{
    size_t n = 0;
    for (size_t i = 0; i < reg->n; i++)
        n += reg->items[i].desc->kind == (uint32_t)kind;
    return n;
}

START_TEST(scan_loads_bundled_plugins)
{
    um_plugin_registry_t reg = {0};
    size_t n = um_plugins_scan(&reg, um_test_env("UM_TEST_PLUGINS"));
    ck_assert_uint_eq(n, reg.n);
    ck_assert_uint_eq(s_count_kind(&reg, UM_PLUGIN_REMASK), 9);
    static const char *const policies[] = {"low_confidence", "random", "maskgit_plus",
                                           "topk_margin", "entropy", "threshold", "factor",
                                           "eb_sampler", "origin"};
    for (size_t i = 0; i < sizeof policies / sizeof policies[0]; i++)
        ck_assert_msg(um_plugins_find(&reg, UM_PLUGIN_REMASK, policies[i]) != NULL,
                      "policy %s not loaded", policies[i]);
    ck_assert_ptr_nonnull(um_plugins_find(&reg, UM_PLUGIN_TOKENIZER, "bpe"));
    ck_assert_ptr_null(um_plugins_find(&reg, UM_PLUGIN_TOKENIZER, "low_confidence"));
    ck_assert_ptr_null(um_plugins_find(&reg, UM_PLUGIN_REMASK, "nope"));
    um_plugins_clear(&reg);
    ck_assert_uint_eq(reg.n, 0);
}
END_TEST

START_TEST(scan_skips_missing_folder)
{
    um_plugin_registry_t reg = {0};
    char dirs[4096];
    snprintf(dirs, sizeof dirs, "/nonexistent/unmaskd:%s::", um_test_env("UM_TEST_PLUGINS"));
    ck_assert_uint_eq(um_plugins_scan(&reg, dirs), reg.n);
    ck_assert_uint_eq(s_count_kind(&reg, UM_PLUGIN_REMASK), 9);
    um_plugins_clear(&reg);
}
END_TEST

/* Each fixture plugin and the substring its rejection message must contain. */
static const struct {
    const char *file;
    const char *reason;
} s_bad[] = {
    {"bad_abi.so", "built for plugin ABI 2."},
    {"no_entry.so", "no um_plugin_describe symbol"},
    {"bad_kind.so", "unknown kind 7"},
    {"no_table.so", "no complete function table"},
    {"bad_name.so", "invalid plugin name"},
    {"small_desc.so", "descriptor is 16 bytes"},
    {"bad_init.so", "failed to initialize (UM_EUNSUPPORTED): fixture refuses to start"},
    {"bad_sampler.so", "declares token_sampler 9"},
};

START_TEST(load_rejects_bad_plugin)
{
    um_plugin_registry_t reg = {0};
    char err[512] = "";
    const char *path = um_test_path(um_test_env("UM_TEST_BAD_PLUGINS"), s_bad[_i].file);
    int rc = um_plugins_load_file(&reg, path, err, sizeof err);
    ck_assert_int_eq(rc, UM_EPLUGIN);
    ck_assert_msg(strstr(err, s_bad[_i].reason) != NULL, "%s: message \"%s\" lacks \"%s\"",
                  s_bad[_i].file, err, s_bad[_i].reason);
    ck_assert_uint_eq(reg.n, 0);
    um_plugins_clear(&reg);
}
END_TEST

START_TEST(load_rejects_non_plugin_file)
{
    um_plugin_registry_t reg = {0};
    char err[512] = "";
    int rc = um_plugins_load_file(&reg, um_test_path(um_test_env("UM_TEST_MODEL"),
                                                     "config.json"), err, sizeof err);
    ck_assert_int_eq(rc, UM_EPLUGIN);
    ck_assert_msg(strstr(err, "cannot load") != NULL, "message: %s", err);
    ck_assert_uint_eq(reg.n, 0);
}
END_TEST

START_TEST(load_rejects_duplicate_name)
{
    um_plugin_registry_t reg = {0};
    char err[512] = "";
    const char *dir = um_test_env("UM_TEST_PLUGINS");
    char path[4096];
    snprintf(path, sizeof path, "%s/low_confidence.so", dir);
    ck_assert_int_eq(um_plugins_load_file(&reg, path, err, sizeof err), 0);
    ck_assert_int_eq(um_plugins_load_file(&reg, path, err, sizeof err), UM_EPLUGIN);
    ck_assert_msg(strstr(err, "already loaded") != NULL, "message: %s", err);
    ck_assert_uint_eq(reg.n, 1);

    /* Two different files that use one name: the second is rejected. */
    const char *bad = um_test_env("UM_TEST_BAD_PLUGINS");
    snprintf(path, sizeof path, "%s/dup_a.so", bad);
    ck_assert_int_eq(um_plugins_load_file(&reg, path, err, sizeof err), 0);
    snprintf(path, sizeof path, "%s/dup_b.so", bad);
    ck_assert_int_eq(um_plugins_load_file(&reg, path, err, sizeof err), UM_EPLUGIN);
    ck_assert_msg(strstr(err, "a remask plugin named \"fixture_dup\" is already loaded"),
                  "message: %s", err);
    ck_assert_uint_eq(reg.n, 2);
    um_plugins_clear(&reg);
}
END_TEST

/* A folder of good and bad plugins: the good ones load, every bad one is skipped. */
START_TEST(scan_keeps_good_plugins)
{
    um_plugin_registry_t reg = {0};
    char dirs[8192];
    snprintf(dirs, sizeof dirs, "%s:%s", um_test_env("UM_TEST_BAD_PLUGINS"),
             um_test_env("UM_TEST_PLUGINS"));
    /* abi10 and one of the two duplicates load; the nine bundled policies after them. */
    ck_assert_uint_eq(um_plugins_scan(&reg, dirs), reg.n);
    ck_assert_uint_eq(s_count_kind(&reg, UM_PLUGIN_REMASK), 11);
    ck_assert_ptr_nonnull(um_plugins_find(&reg, UM_PLUGIN_REMASK, "fixture_abi10"));
    ck_assert_ptr_nonnull(um_plugins_find(&reg, UM_PLUGIN_REMASK, "fixture_dup"));
    ck_assert_ptr_nonnull(um_plugins_find(&reg, UM_PLUGIN_REMASK, "low_confidence"));
    ck_assert_ptr_null(um_plugins_find(&reg, UM_PLUGIN_REMASK, "fixture"));
    /* A rescan finds nothing new and retries no unchanged reject. */
    size_t n = reg.n;
    ck_assert_uint_eq(um_plugins_rescan(&reg, dirs), 0);
    ck_assert_uint_eq(reg.n, n);
    um_plugins_clear(&reg);
}
END_TEST

/* Copy a file; returns 0 on success. */
static int s_copy(const char *from, const char *to)
{
    size_t len = 0;
    char *data = um_test_read_file(from, &len);
    if (!data)
        return -1;
    FILE *f = fopen(to, "wb");
    int ok = f && fwrite(data, 1, len, f) == len;
    if (f)
        fclose(f);
    free(data);
    return ok ? 0 : -1;
}

/* A plugin dropped into a scanned folder loads on the next rescan. */
START_TEST(rescan_loads_new_plugin)
{
    char dir[512], from[4096], to[1024];
    snprintf(dir, sizeof dir, "/tmp/unmaskd-rescan-%ld", (long)getpid());
    mkdir(dir, 0777);
    snprintf(to, sizeof to, "%s/entropy.so", dir);
    unlink(to);

    um_plugin_registry_t reg = {0};
    ck_assert_uint_eq(um_plugins_scan(&reg, dir), 0);
    snprintf(from, sizeof from, "%s/entropy.so", um_test_env("UM_TEST_PLUGINS"));
    ck_assert_int_eq(s_copy(from, to), 0);
    ck_assert_uint_eq(um_plugins_rescan(&reg, dir), 1);
    const um_plugin_t *p = um_plugins_find(&reg, UM_PLUGIN_REMASK, "entropy");
    ck_assert_ptr_nonnull(p);
    /* Entries never move: the pointer stays valid while more plugins load. */
    snprintf(from, sizeof from, "%s/random.so", um_test_env("UM_TEST_PLUGINS"));
    snprintf(to, sizeof to, "%s/random.so", dir);
    ck_assert_int_eq(s_copy(from, to), 0);
    ck_assert_uint_eq(um_plugins_rescan(&reg, dir), 1);
    ck_assert_ptr_eq(um_plugins_find(&reg, UM_PLUGIN_REMASK, "entropy"), p);
    ck_assert_uint_eq(um_plugins_rescan(&reg, dir), 0);
    um_plugins_clear(&reg);
    unlink(to);
    snprintf(to, sizeof to, "%s/entropy.so", dir);
    unlink(to);
    rmdir(dir);
}
END_TEST

/* A plugin built against ABI 1.0 loads and reads as 1.0: Gumbel tokens, LLaDA's quota. */
START_TEST(abi10_plugin_compatible)
{
    um_plugin_registry_t reg = {0};
    char err[512] = "";
    const char *path = um_test_path(um_test_env("UM_TEST_BAD_PLUGINS"), "abi10.so");
    ck_assert_msg(um_plugins_load_file(&reg, path, err, sizeof err) == 0, "%s", err);
    const um_plugin_desc_t *d = reg.items[0].desc;
    ck_assert_uint_eq(d->abi_minor, 0);
    um_remask_traits_t t = um_remask_traits(d->remask);
    ck_assert_uint_eq(t.flags, 0);
    ck_assert_int_eq(t.sampler, UM_SAMPLER_GUMBEL);
    ck_assert_int_eq(t.schedule, UM_SCHEDULE_QUOTA);

    /* Its select receives a 1.1 step and reads only the 1.0 fields. */
    int32_t pos[] = {5, 6, 7}, tok[] = {1, 2, 3}, commit[3], n_commit = -1;
    double prob[] = {0.1, 0.9, 0.5};
    um_remask_step_t step = {.struct_size = sizeof step, .n_candidates = 3, .position = pos,
                             .token = tok, .prob = prob, .quota = 2};
    ck_assert_int_eq(d->remask->select(NULL, um_plugin_host(), &step, commit, &n_commit), 0);
    ck_assert_int_eq(n_commit, 2);
    ck_assert_int_eq(commit[0], 0);
    ck_assert_int_eq(commit[1], 1);
    um_plugins_clear(&reg);
}
END_TEST

/* The traits the bundled policies declare, which info reports. */
START_TEST(bundled_policy_traits)
{
    static const struct {
        const char *name;
        um_token_sampler_t sampler;
        um_schedule_t schedule;
        uint32_t flags;
    } want[] = {
        {"low_confidence", UM_SAMPLER_GUMBEL, UM_SCHEDULE_QUOTA, 0},
        {"random", UM_SAMPLER_GUMBEL, UM_SCHEDULE_QUOTA, 0},
        {"maskgit_plus", UM_SAMPLER_CATEGORICAL, UM_SCHEDULE_TIMESTEP, 0},
        {"topk_margin", UM_SAMPLER_CATEGORICAL, UM_SCHEDULE_TIMESTEP, 0},
        {"entropy", UM_SAMPLER_CATEGORICAL, UM_SCHEDULE_TIMESTEP, 0},
        {"threshold", UM_SAMPLER_GUMBEL, UM_SCHEDULE_QUOTA, UM_REMASK_ADAPTIVE},
        {"factor", UM_SAMPLER_GUMBEL, UM_SCHEDULE_QUOTA, UM_REMASK_ADAPTIVE},
        {"eb_sampler", UM_SAMPLER_CATEGORICAL, UM_SCHEDULE_QUOTA, UM_REMASK_ADAPTIVE},
        {"origin", UM_SAMPLER_CATEGORICAL, UM_SCHEDULE_TIMESTEP, UM_REMASK_ADAPTIVE},
    };
    um_plugin_registry_t reg = {0};
    um_plugins_scan(&reg, um_test_env("UM_TEST_PLUGINS"));
    for (size_t i = 0; i < sizeof want / sizeof want[0]; i++) {
        const um_plugin_t *p = um_plugins_find(&reg, UM_PLUGIN_REMASK, want[i].name);
        ck_assert_msg(p != NULL, "%s not loaded", want[i].name);
        um_remask_traits_t t = um_remask_traits(p->desc->remask);
        ck_assert_msg(t.sampler == want[i].sampler && t.schedule == want[i].schedule
                          && t.flags == want[i].flags,
                      "%s: sampler %d, schedule %d, flags %u", want[i].name, t.sampler,
                      t.schedule, t.flags);
    }
    um_plugins_clear(&reg);
}
END_TEST

static const um_param_spec_t s_spec[] = {
    {"threshold", UM_PARAM_NUMBER, 0.9, 0.0, 1.0, "confidence needed to commit"},
    {"min_commit", UM_PARAM_INTEGER, 1, 1, 64, "commits per step at least"},
    {"order", UM_PARAM_STRING, 0, 0, 0, "ordering"},
};

START_TEST(params_defaults_and_values)
{
    um_param_t in[] = {{"min_commit", UM_PARAM_INTEGER, 4, NULL},
                       {"order", UM_PARAM_STRING, 0, "entropy"}};
    um_param_t out[3];
    char err[256] = "";
    ck_assert_int_eq(um_params_check(s_spec, 3, in, 2, out, err, sizeof err), 0);
    ck_assert_double_eq(out[0].number, 0.9);
    ck_assert_double_eq(out[1].number, 4);
    ck_assert_str_eq(out[2].string, "entropy");
}
END_TEST

START_TEST(params_rejects_bad_values)
{
    um_param_t out[3];
    char err[256] = "";
    um_param_t unknown = {"treshold", UM_PARAM_NUMBER, 0.5, NULL};
    ck_assert_int_eq(um_params_check(s_spec, 3, &unknown, 1, out, err, sizeof err), UM_EINVAL);
    ck_assert_msg(strstr(err, "unknown parameter \"treshold\"") && strstr(err, "threshold"),
                  "message: %s", err);

    um_param_t range = {"threshold", UM_PARAM_NUMBER, 1.5, NULL};
    ck_assert_int_eq(um_params_check(s_spec, 3, &range, 1, out, err, sizeof err), UM_ERANGE);
    ck_assert_msg(strstr(err, "[0, 1], got 1.5") != NULL, "message: %s", err);

    um_param_t frac = {"min_commit", UM_PARAM_NUMBER, 2.5, NULL};
    ck_assert_int_eq(um_params_check(s_spec, 3, &frac, 1, out, err, sizeof err), UM_EINVAL);
    ck_assert_msg(strstr(err, "must be an integer") != NULL,
                  "message: %s", err);

    um_param_t nan_value = {"threshold", UM_PARAM_NUMBER, NAN, NULL};
    ck_assert_int_eq(um_params_check(s_spec, 3, &nan_value, 1, out, err, sizeof err),
                     UM_ERANGE);

    um_param_t type = {"order", UM_PARAM_NUMBER, 1, NULL};
    ck_assert_int_eq(um_params_check(s_spec, 3, &type, 1, out, err, sizeof err), UM_EINVAL);
    ck_assert_msg(strstr(err, "must be a string") != NULL, "message: %s", err);

    ck_assert_int_eq(um_params_check(NULL, 0, &unknown, 1, out, err, sizeof err), UM_EINVAL);
    ck_assert_msg(strstr(err, "takes no parameters") != NULL, "message: %s", err);
}
END_TEST

START_TEST(host_select_top_tie_break)
{
    const um_host_t *h = um_plugin_host();
    double score[] = {0.5, 0.9, -INFINITY, 0.9, 0.1, 0.5};
    int32_t out[6];
    ck_assert_int_eq(h->select_top(score, 6, 4, out), 4);
    ck_assert_int_eq(out[0], 1);
    ck_assert_int_eq(out[1], 3);
    ck_assert_int_eq(out[2], 0);
    ck_assert_int_eq(out[3], 5);
    /* -INFINITY entries are never chosen, so asking for all six yields five. */
    ck_assert_int_eq(h->select_top(score, 6, 6, out), 5);
    ck_assert_int_eq(out[4], 4);
}
END_TEST

START_TEST(host_rank_groups_and_ties)
{
    const um_host_t *h = um_plugin_host();
    ck_assert_uint_ge(h->struct_size, offsetof(um_host_t, rank) + sizeof h->rank);
    double score[] = {0.5, 0.9, -INFINITY, 0.9, NAN, 0.5, 0.95};
    uint8_t demoted[] = {0, 0, 0, 0, 0, 0, 1};
    int32_t order[7];
    ck_assert_int_eq(h->rank(score, demoted, 7, order), 7);
    /* 0.9 (1, 3 by index), 0.5 (0, 5), -inf (2), NaN (4), then the demoted 0.95 (6). */
    const int32_t want[] = {1, 3, 0, 5, 2, 4, 6};
    for (int i = 0; i < 7; i++)
        ck_assert_msg(order[i] == want[i], "order[%d] is %d, expected %d", i, order[i],
                      want[i]);
    ck_assert_int_eq(h->rank(score, NULL, 7, order), 7);
    ck_assert_int_eq(order[0], 6);
    ck_assert_int_eq(h->rank(score, NULL, 0, order), 0);
}
END_TEST

START_TEST(host_rng_in_open_interval)
{
    const um_host_t *h = um_plugin_host();
    double sum = 0;
    for (uint64_t i = 0; i < 100000; i++) {
        double u = h->rng_uniform(42, 7, i);
        ck_assert(u > 0.0 && u < 1.0);
        sum += u;
    }
    /* Mean of 1e5 uniforms: standard error 0.0009, so 0.005 is over five sigma. */
    ck_assert_double_eq_tol(sum / 100000, 0.5, 0.005);
    ck_assert_double_eq(h->rng_uniform(1, 2, 3), h->rng_uniform(1, 2, 3));
    ck_assert(h->rng_uniform(1, 2, 3) != h->rng_uniform(1, 3, 3));
}
END_TEST

Suite *um_plugins_suite(void)
{
    Suite *s = suite_create("plugins");
    TCase *tc = tcase_create("loader");
    tcase_set_timeout(tc, 30);
    tcase_add_test(tc, scan_loads_bundled_plugins);
    tcase_add_test(tc, scan_skips_missing_folder);
    tcase_add_loop_test(tc, load_rejects_bad_plugin, 0, (int)(sizeof s_bad / sizeof s_bad[0]));
    tcase_add_test(tc, load_rejects_non_plugin_file);
    tcase_add_test(tc, load_rejects_duplicate_name);
    tcase_add_test(tc, scan_keeps_good_plugins);
    tcase_add_test(tc, rescan_loads_new_plugin);
    tcase_add_test(tc, abi10_plugin_compatible);
    tcase_add_test(tc, bundled_policy_traits);
    suite_add_tcase(s, tc);
    tc = tcase_create("params");
    tcase_set_timeout(tc, 30);
    tcase_add_test(tc, params_defaults_and_values);
    tcase_add_test(tc, params_rejects_bad_values);
    tcase_add_test(tc, host_select_top_tie_break);
    tcase_add_test(tc, host_rank_groups_and_ties);
    tcase_add_test(tc, host_rng_in_open_interval);
    suite_add_tcase(s, tc);
    return s;
}
