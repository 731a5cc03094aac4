/* Plugin host tests: discovery of the real plugins, every rejection path, parameter checks. */
#include <math.h>
#include <stdio.h>
#include <string.h>

#include "plugins.h"
#include "testutil.h"

START_TEST(scan_loads_bundled_plugins)
{
    um_plugin_registry_t reg = {0};
    size_t n = um_plugins_scan(&reg, um_test_env("UM_TEST_PLUGINS"));
    ck_assert_uint_eq(n, 3);
    ck_assert_ptr_nonnull(um_plugins_find(&reg, UM_PLUGIN_REMASK, "low_confidence"));
    ck_assert_ptr_nonnull(um_plugins_find(&reg, UM_PLUGIN_REMASK, "random"));
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
    ck_assert_uint_eq(um_plugins_scan(&reg, dirs), 3);
    um_plugins_clear(&reg);
}
END_TEST

/* Each fixture plugin and the substring its rejection message must contain. */
static const struct {
    const char *file;
    const char *reason;
} s_bad[] = {
    {"bad_abi.so", "plugin ABI 2.0"},
    {"no_entry.so", "no um_plugin_describe symbol"},
    {"bad_kind.so", "unknown kind 7"},
    {"no_table.so", "no complete function table"},
    {"bad_name.so", "invalid plugin name"},
    {"small_desc.so", "descriptor is 16 bytes"},
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
    suite_add_tcase(s, tc);
    tc = tcase_create("params");
    tcase_set_timeout(tc, 30);
    tcase_add_test(tc, params_defaults_and_values);
    tcase_add_test(tc, params_rejects_bad_values);
    tcase_add_test(tc, host_select_top_tie_break);
    tcase_add_test(tc, host_rng_in_open_interval);
    suite_add_tcase(s, tc);
    return s;
}
