/*
 * Sampler tests on the bundled model: exact parity with the PyTorch reference's
 * canvases, the block and quota rules, cancellation and reproducibility.
 */
#include <jansson.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "generate.h"
#include "model.h"
#include "plugins.h"
#include "testutil.h"

static um_model_t *s_model;
static um_plugin_registry_t s_reg;
static json_t *s_cases;

static void s_setup(void)
{
    char err[512] = "";
    int rc = um_model_load(um_test_env("UM_TEST_MODEL"), &s_model, err, sizeof err);
    ck_assert_msg(rc == 0, "model load failed: %s", err);
    ck_assert_uint_eq(um_plugins_scan(&s_reg, um_test_env("UM_TEST_PLUGINS")), 3);
    json_error_t jerr;
    const char *path = um_test_path(um_test_env("UM_TEST_FIXTURES"), "generate.json");
    json_t *doc = json_load_file(path, 0, &jerr);
    ck_assert_msg(doc != NULL, "cannot read %s: %s (regenerate with tools/make_fixtures.py)",
                  path, jerr.text);
    s_cases = json_incref(json_object_get(doc, "cases"));
    json_decref(doc);
}

static void s_teardown(void)
{
    json_decref(s_cases);
    um_plugins_clear(&s_reg);
    um_model_destroy(&s_model);
}

static um_gen_params_t s_params(const char *policy, int32_t gen, int32_t block, int32_t steps,
                                double temperature, double cfg, uint64_t seed)
{
    const um_plugin_t *pl = um_plugins_find(&s_reg, UM_PLUGIN_REMASK, policy);
    ck_assert_msg(pl != NULL, "remask plugin %s not loaded", policy);
    return (um_gen_params_t){.gen_length = gen, .block_length = block, .steps = steps,
                             .temperature = temperature, .cfg_scale = cfg, .seed = seed,
                             .remask = pl->desc->remask, .remask_state = NULL};
}

static int32_t *s_ids(json_t *arr, size_t *n)
{
    *n = json_array_size(arr);
    int32_t *ids = malloc((*n + 1) * sizeof *ids);
    for (size_t i = 0; i < *n; i++)
        ids[i] = (int32_t)json_integer_value(json_array_get(arr, i));
    return ids;
}

/* Every fixture case, token for token. */
START_TEST(matches_reference_canvas)
{
    json_t *c = json_array_get(s_cases, (size_t)_i);
    ck_assert_ptr_nonnull(c);
    const char *name = json_string_value(json_object_get(c, "name"));
    size_t n_prompt, n_expected;
    int32_t *prompt = s_ids(json_object_get(c, "prompt_ids"), &n_prompt);
    int32_t *expected = s_ids(json_object_get(c, "canvas"), &n_expected);
    um_gen_params_t p = s_params(json_string_value(json_object_get(c, "remasking")),
                                 (int32_t)json_integer_value(json_object_get(c, "gen_length")),
                                 (int32_t)json_integer_value(json_object_get(c, "block_length")),
                                 (int32_t)json_integer_value(json_object_get(c, "steps")),
                                 json_number_value(json_object_get(c, "temperature")),
                                 json_number_value(json_object_get(c, "cfg_scale")),
                                 (uint64_t)json_integer_value(json_object_get(c, "seed")));
    ck_assert_uint_eq(n_expected, n_prompt + (size_t)p.gen_length);
    int32_t *canvas = malloc(n_expected * sizeof *canvas);
    char err[512] = "";
    int rc = um_generate(s_model, prompt, (int32_t)n_prompt, &p, NULL, NULL, canvas, NULL, err,
                         sizeof err);
    ck_assert_msg(rc == 0, "%s: %s", name, err);
    for (size_t i = 0; i < n_expected; i++)
        ck_assert_msg(canvas[i] == expected[i], "%s: position %zu is %d, reference has %d",
                      name, i, canvas[i], expected[i]);
    free(canvas);
    free(expected);
    free(prompt);
}
END_TEST

/* Records what each step did, to check the schedule's invariants. */
typedef struct {
    int32_t n_calls;
    int32_t committed_total;
    int32_t per_step[256];
    int32_t block_of_step[256];
    int32_t *first_seen; /* step at which each position was committed, -1 before */
    int32_t *value;      /* committed value */
    int32_t L;
    int violations;
    int cancel_after;
} s_trace_t;

static int s_trace_step(void *user, const um_step_info_t *info)
{
    s_trace_t *t = user;
    const int32_t mask = um_model_config(s_model)->mask_token_id;
    if (t->n_calls < 256) {
        t->per_step[t->n_calls] = info->n_committed;
        t->block_of_step[t->n_calls] = info->block;
    }
    t->n_calls++;
    t->committed_total += info->n_committed;
    for (int32_t k = 0; k < info->n_committed; k++) {
        int32_t pos = info->committed[k];
        if (t->first_seen[pos] != -1)
            t->violations++;
        t->first_seen[pos] = info->step;
        t->value[pos] = info->canvas[pos];
    }
    /* A committed token never changes and never turns back into a mask. */
    for (int32_t pos = 0; pos < t->L; pos++)
        if (t->first_seen[pos] != -1
            && (info->canvas[pos] != t->value[pos] || info->canvas[pos] == mask))
            t->violations++;
    return t->cancel_after > 0 && t->n_calls >= t->cancel_after;
}

static s_trace_t s_trace_new(int32_t L)
{
    s_trace_t t = {0};
    t.L = L;
    t.first_seen = malloc((size_t)L * sizeof(int32_t));
    t.value = malloc((size_t)L * sizeof(int32_t));
    for (int32_t i = 0; i < L; i++)
        t.first_seen[i] = -1;
    return t;
}

static void s_trace_free(s_trace_t *t)
{
    free(t->first_seen);
    free(t->value);
}

static const int32_t s_prompt[] = {397, 419, 258, 2054};

/* gen 20, block 8 -> blocks of 8, 8, 4; 7 steps -> 3, 2, 2 steps; quotas 3+3+2, 4+4, 2+2. */
START_TEST(partial_block_schedule)
{
    um_gen_params_t p = s_params("low_confidence", 20, 8, 7, 0, 0, 0);
    int32_t L = 4 + 20, canvas[24];
    s_trace_t t = s_trace_new(L);
    char err[256] = "";
    um_gen_stats_t st;
    ck_assert_int_eq(um_generate(s_model, s_prompt, 4, &p, s_trace_step, &t, canvas, &st, err,
                                 sizeof err), 0);
    const int32_t expect_commits[] = {3, 3, 2, 4, 4, 2, 2};
    const int32_t expect_block[] = {0, 0, 0, 1, 1, 2, 2};
    ck_assert_int_eq(t.n_calls, 7);
    for (int i = 0; i < 7; i++) {
        ck_assert_int_eq(t.per_step[i], expect_commits[i]);
        ck_assert_int_eq(t.block_of_step[i], expect_block[i]);
    }
    ck_assert_int_eq(t.violations, 0);
    ck_assert_int_eq(st.forward_passes, 7);
    ck_assert_int_eq(st.steps_planned, 7);
    /* Each block fills only its own positions: blocks 1 and 2 start at steps 3 and 5. */
    const int32_t block_first_step[] = {0, 3, 5};
    for (int32_t pos = 4; pos < L; pos++)
        ck_assert_int_ge(t.first_seen[pos], block_first_step[(pos - 4) / 8]);
    for (int32_t i = 0; i < 4; i++)
        ck_assert_int_eq(canvas[i], s_prompt[i]);
    s_trace_free(&t);
}
END_TEST

/* More steps than tokens: quota-zero steps run no forward pass. */
START_TEST(zero_quota_steps_skipped)
{
    um_gen_params_t p = s_params("low_confidence", 8, 8, 12, 0, 0, 0);
    int32_t canvas[12];
    s_trace_t t = s_trace_new(12);
    char err[256] = "";
    um_gen_stats_t st;
    ck_assert_int_eq(um_generate(s_model, s_prompt, 4, &p, s_trace_step, &t, canvas, &st, err,
                                 sizeof err), 0);
    ck_assert_int_eq(st.forward_passes, 8);
    ck_assert_int_eq(st.steps_planned, 12);
    ck_assert_int_eq(t.committed_total, 8);
    ck_assert_int_eq(t.violations, 0);
    s_trace_free(&t);
}
END_TEST

/* Fewer steps than blocks: every block still gets one step. */
START_TEST(fewer_steps_than_blocks)
{
    um_gen_params_t p = s_params("low_confidence", 24, 8, 2, 0, 0, 0);
    int32_t canvas[28];
    s_trace_t t = s_trace_new(28);
    char err[256] = "";
    um_gen_stats_t st;
    ck_assert_int_eq(um_generate(s_model, s_prompt, 4, &p, s_trace_step, &t, canvas, &st, err,
                                 sizeof err), 0);
    ck_assert_int_eq(st.forward_passes, 3);
    ck_assert_int_eq(t.per_step[0], 8);
    ck_assert_int_eq(t.per_step[2], 8);
    s_trace_free(&t);
}
END_TEST

START_TEST(cancel_stops_within_one_step)
{
    um_gen_params_t p = s_params("low_confidence", 32, 32, 32, 0, 0, 0);
    int32_t canvas[36];
    s_trace_t t = s_trace_new(36);
    t.cancel_after = 3;
    char err[256] = "";
    um_gen_stats_t st;
    int rc = um_generate(s_model, s_prompt, 4, &p, s_trace_step, &t, canvas, &st, err,
                         sizeof err);
    ck_assert_int_eq(rc, UM_ECANCELLED);
    ck_assert_int_eq(t.n_calls, 3);
    ck_assert_int_eq(st.forward_passes, 3);
    s_trace_free(&t);
}
END_TEST

/* The same seed gives the same canvas on one thread and on two. */
START_TEST(seed_reproducible_across_threads)
{
    um_gen_params_t p = s_params("random", 32, 16, 16, 0.9, 0.5, 77);
    int32_t a[36], b[36], c[36];
    char err[256] = "";
    int saved = omp_get_max_threads();
    omp_set_num_threads(1);
    ck_assert_int_eq(um_generate(s_model, s_prompt, 4, &p, NULL, NULL, a, NULL, err,
                                 sizeof err), 0);
    omp_set_num_threads(2);
    ck_assert_int_eq(um_generate(s_model, s_prompt, 4, &p, NULL, NULL, b, NULL, err,
                                 sizeof err), 0);
    omp_set_num_threads(saved);
    ck_assert_mem_eq(a, b, sizeof a);
    p.seed = 78;
    ck_assert_int_eq(um_generate(s_model, s_prompt, 4, &p, NULL, NULL, c, NULL, err,
                                 sizeof err), 0);
    ck_assert_msg(memcmp(a, c, sizeof a) != 0, "seeds 77 and 78 gave the same canvas");
}
END_TEST

START_TEST(check_rejects_bad_params)
{
    const um_model_config_t *cfg = um_model_config(s_model);
    const char *field = NULL;
    char err[512];
    um_gen_params_t p = s_params("low_confidence", 16, 16, 16, 0, 0, 0);
    ck_assert_int_eq(um_gen_check(cfg, 4, &p, &field, err, sizeof err), 0);

    um_gen_params_t q = p;
    q.steps = 0;
    ck_assert_int_eq(um_gen_check(cfg, 4, &q, &field, err, sizeof err), UM_ERANGE);
    ck_assert_str_eq(field, "steps");
    q = p;
    q.block_length = 0;
    ck_assert_int_eq(um_gen_check(cfg, 4, &q, &field, err, sizeof err), UM_ERANGE);
    ck_assert_str_eq(field, "block_length");
    q = p;
    q.gen_length = -3;
    ck_assert_int_eq(um_gen_check(cfg, 4, &q, &field, err, sizeof err), UM_ERANGE);
    ck_assert_str_eq(field, "gen_length");
    q = p;
    q.temperature = -0.5;
    ck_assert_int_eq(um_gen_check(cfg, 4, &q, &field, err, sizeof err), UM_ERANGE);
    ck_assert_str_eq(field, "temperature");
    ck_assert_msg(strstr(err, "-0.5") != NULL, "message lacks the value: %s", err);
    q = p;
    q.cfg_scale = -1;
    ck_assert_int_eq(um_gen_check(cfg, 4, &q, &field, err, sizeof err), UM_ERANGE);
    ck_assert_str_eq(field, "cfg_scale");
    q = p;
    q.gen_length = cfg->max_sequence_length;
    ck_assert_int_eq(um_gen_check(cfg, 4, &q, &field, err, sizeof err), UM_ERANGE);
    ck_assert_str_eq(field, "gen_length");
    ck_assert_msg(strstr(err, "past the model's") != NULL, "message: %s", err);
    q.gen_length = cfg->max_sequence_length - 4;
    ck_assert_int_eq(um_gen_check(cfg, 4, &q, &field, err, sizeof err), 0);
    q = p;
    ck_assert_int_eq(um_gen_check(cfg, cfg->max_sequence_length, &q, &field, err, sizeof err),
                     UM_ERANGE);
    ck_assert_str_eq(field, "prompt");
    ck_assert_msg(strstr(err, "shorten the prompt") != NULL, "message: %s", err);
    q = p;
    q.cfg_scale = 1e39;
    ck_assert_int_eq(um_gen_check(cfg, 4, &q, &field, err, sizeof err), UM_ERANGE);
    ck_assert_str_eq(field, "cfg_scale");
    q.cfg_scale = UM_GEN_MAX_CFG_SCALE;
    ck_assert_int_eq(um_gen_check(cfg, 4, &q, &field, err, sizeof err), 0);
}
END_TEST

/* INT32_MAX steps for 8 tokens: 8 passes, and the empty steps are skipped, not counted. */
START_TEST(huge_step_count_finishes)
{
    um_gen_params_t p = s_params("low_confidence", 8, 8, INT32_MAX, 0, 0, 0);
    int32_t canvas[12];
    char err[256] = "";
    um_gen_stats_t st;
    ck_assert_int_eq(um_generate(s_model, s_prompt, 4, &p, NULL, NULL, canvas, &st, err,
                                 sizeof err), 0);
    ck_assert_int_eq(st.forward_passes, 8);
    ck_assert_int_eq(st.steps_planned, INT32_MAX);
}
END_TEST

Suite *um_generate_suite(void)
{
    Suite *s = suite_create("generate");
    TCase *tc = tcase_create("reference");
    tcase_add_unchecked_fixture(tc, s_setup, s_teardown);
    tcase_set_timeout(tc, 120);
    /* The fixture file has nine cases, and a missing case fails on its lookup. */
    tcase_add_loop_test(tc, matches_reference_canvas, 0, 9);
    suite_add_tcase(s, tc);
    tc = tcase_create("schedule");
    tcase_add_unchecked_fixture(tc, s_setup, s_teardown);
    tcase_set_timeout(tc, 120);
    tcase_add_test(tc, partial_block_schedule);
    tcase_add_test(tc, zero_quota_steps_skipped);
    tcase_add_test(tc, fewer_steps_than_blocks);
    tcase_add_test(tc, cancel_stops_within_one_step);
    tcase_add_test(tc, seed_reproducible_across_threads);
    tcase_add_test(tc, check_rejects_bad_params);
    tcase_add_test(tc, huge_step_count_finishes);
    suite_add_tcase(s, tc);
    return s;
}
