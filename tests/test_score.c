/*
 * Likelihood suite: um_score against tools/llada_ref.py's score() on the bundled model
 * and on the BERT fixture (tests/fixtures/score.json, written by
 * tools/make_score_fixtures.py): the same random draws, so the same masks, and
 * estimates that differ only by f32 rounding of the logits.
 */
#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <unmaskd/error.h>

#include "model.h"
#include "score.h"
#include "testutil.h"

static int32_t *s_ids(const json_t *arr, int32_t *n)
{
    *n = (int32_t)json_array_size(arr);
    int32_t *ids = malloc(((size_t)*n + 1) * sizeof *ids);
    for (int32_t i = 0; i < *n; i++)
        ids[i] = (int32_t)json_integer_value(json_array_get(arr, (size_t)i));
    return ids;
}

static um_model_t *s_load(const char *dir)
{
    um_model_t *m = NULL;
    char err[512] = "";
    ck_assert_msg(um_model_load(dir, &m, err, sizeof err) == 0, "%s: %s", dir, err);
    return m;
}

START_TEST(score_matches_reference)
{
    const char *path = um_test_path(um_test_env("UM_TEST_FIXTURES"), "score.json");
    json_error_t jerr;
    json_t *doc = json_load_file(path, 0, &jerr);
    ck_assert_msg(doc != NULL, "%s: %s (run tools/make_score_fixtures.py)", path, jerr.text);
    char bert_dir[4096];
    snprintf(bert_dir, sizeof bert_dir, "%s/families/bert", um_test_env("UM_TEST_FIXTURES"));
    um_model_t *bundled = s_load(um_test_env("UM_TEST_MODEL"));
    um_model_t *bert = s_load(bert_dir);

    size_t i;
    json_t *c;
    json_array_foreach(json_object_get(doc, "cases"), i, c) {
        const char *name = json_string_value(json_object_get(c, "name"));
        int bert_case = strcmp(json_string_value(json_object_get(c, "model")), "bert") == 0;
        int32_t n_prompt, n_answer, n_suffix;
        int32_t *prompt = s_ids(json_object_get(c, "prompt_ids"), &n_prompt);
        int32_t *answer = s_ids(json_object_get(c, "answer_ids"), &n_answer);
        int32_t *suffix = s_ids(json_object_get(c, "suffix"), &n_suffix);
        um_score_params_t p = {
            .n_samples = (int32_t)json_integer_value(json_object_get(c, "n_samples")),
            .batch_size = (int32_t)json_integer_value(json_object_get(c, "batch_size")),
            .cfg_scale = json_number_value(json_object_get(c, "cfg_scale")),
            .seed = (uint64_t)json_integer_value(json_object_get(c, "seed")),
            .suffix = suffix,
            .n_suffix = n_suffix,
        };
        um_score_result_t r;
        char err[512] = "";
        int rc = um_score(bert_case ? bert : bundled, prompt, n_prompt, answer, n_answer, &p, &r,
                          err, sizeof err);
        ck_assert_msg(rc == 0, "%s: %s", name, err);
        double want = json_number_value(json_object_get(c, "log_likelihood"));
        double want_se = json_number_value(json_object_get(c, "std_error"));
        /*
         * The forward passes agree with PyTorch's to about 1e-5 per logit in f32
         * (test_model), so each cross-entropy term moves by at most about 2e-5; a sample
         * sums up to L terms scaled by L / n, which stays under 1e-3 for these answers
         * of at most 9 tokens. A wrong mask or count moves the estimate by nats.
         */
        ck_assert_msg(fabs(r.log_likelihood - want) <= 1e-3, "%s: log p %.6f, reference %.6f",
                      name, r.log_likelihood, want);
        ck_assert_msg(fabs(r.std_error - want_se) <= 1e-3, "%s: std error %.6f, reference %.6f",
                      name, r.std_error, want_se);
        ck_assert_int_eq(r.forward_passes,
                         (int)json_integer_value(json_object_get(c, "forward_passes")));
        ck_assert_int_eq(r.n_samples, p.n_samples);
        printf("%s: log p %.6f (reference %.6f)\n", name, r.log_likelihood, want);
        free(prompt);
        free(answer);
        free(suffix);
    }
    um_model_destroy(&bundled);
    um_model_destroy(&bert);
    json_decref(doc);
}
END_TEST

/* LLaDA's stratification: counts spread evenly over [1, L], shifted by k, wrapped. */
START_TEST(score_mask_counts_stratified)
{
    int32_t n[8];
    um_score_mask_counts(3, 10, 4, n); /* 3, 5.5 -> 6 (half to even), 8, 10.5 -> 10 */
    ck_assert_int_eq(n[0], 3);
    ck_assert_int_eq(n[1], 6);
    ck_assert_int_eq(n[2], 8);
    ck_assert_int_eq(n[3], 10);
    um_score_mask_counts(9, 10, 3, n); /* 9, 12.33 -> 12 -> 2, 15.67 -> 16 -> 6 */
    ck_assert_int_eq(n[0], 9);
    ck_assert_int_eq(n[1], 2);
    ck_assert_int_eq(n[2], 6);
    um_score_mask_counts(1, 1, 5, n); /* a one-token answer is always masked */
    for (int j = 0; j < 5; j++)
        ck_assert_int_eq(n[j], 1);
}
END_TEST

START_TEST(score_rejects_bad_params)
{
    um_model_t *m = s_load(um_test_env("UM_TEST_MODEL"));
    int32_t prompt[] = {1, 2}, answer[] = {3, 4};
    um_score_params_t p = {.n_samples = 0, .batch_size = 4};
    um_score_result_t r;
    char err[512] = "";
    ck_assert_int_eq(um_score(m, prompt, 2, answer, 2, &p, &r, err, sizeof err), UM_ERANGE);
    ck_assert_msg(strstr(err, "n_samples must be in [1, 4096], got 0") != NULL, "%s", err);
    p.n_samples = 4;
    p.batch_size = 0;
    ck_assert_int_eq(um_score(m, prompt, 2, answer, 2, &p, &r, err, sizeof err), UM_ERANGE);
    ck_assert_msg(strstr(err, "batch_size must be at least 1") != NULL, "%s", err);
    p.batch_size = 4;
    ck_assert_int_eq(um_score(m, prompt, 2, answer, 0, &p, &r, err, sizeof err), UM_ERANGE);
    ck_assert_msg(strstr(err, "answer has no tokens") != NULL, "%s", err);
    ck_assert_int_eq(um_score(m, prompt, 2, answer, 127, &p, &r, err, sizeof err), UM_ERANGE);
    ck_assert_msg(strstr(err, "past the model's 128 positions") != NULL, "%s", err);
    um_model_destroy(&m);
}
END_TEST

Suite *um_score_suite(void)
{
    Suite *s = suite_create("score");
    TCase *tc = tcase_create("reference");
    tcase_set_timeout(tc, 120);
    tcase_add_test(tc, score_matches_reference);
    tcase_add_test(tc, score_mask_counts_stratified);
    tcase_add_test(tc, score_rejects_bad_params);
    suite_add_tcase(s, tc);
    return s;
}
