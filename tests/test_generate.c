/*
 * Sampler tests on the bundled model: every remasking policy against the PyTorch
 * reference's canvases over a grid of settings, the schedules' rules, the end-of-text
 * controls, cancellation and reproducibility.
 *
 * The reference cases run with the kernel table the host selects by default (SIMD where
 * available). tools/make_fixtures.py keeps only cases in which every decision is a few
 * times farther from flipping than the two engines' logits and reductions differ, and
 * generate.json records each case's margin. So the tables' last-bit differences cannot
 * change a token, which the scalar loop checks.
 */
#include <jansson.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "generate.h"
#include "kernels.h"
#include "model.h"
#include "plugins.h"
#include "sample.h"
#include "testutil.h"

static um_model_t *s_model;
static um_plugin_registry_t s_reg;
static json_t *s_cases;

static void s_end_open(void);

static void s_setup(void)
{
    char err[512] = "";
    int rc = um_model_load(um_test_env("UM_TEST_MODEL"), &s_model, err, sizeof err);
    ck_assert_msg(rc == 0, "model load failed: %s", err);
    ck_assert_uint_ge(um_plugins_scan(&s_reg, um_test_env("UM_TEST_PLUGINS")), 10);
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
    s_end_open();
    json_decref(s_cases);
    um_plugins_clear(&s_reg);
    um_model_destroy(&s_model);
}

static const um_remask_ops_t *s_policy(const char *name)
{
    const um_plugin_t *pl = um_plugins_find(&s_reg, UM_PLUGIN_REMASK, name);
    ck_assert_msg(pl != NULL, "remask plugin %s not loaded", name);
    return pl->desc->remask;
}

static void *s_begin(const um_remask_ops_t *ops, json_t *params, const char *name);

/* A policy's request state from s_params, ended by the next s_params or the teardown. */
static const um_remask_ops_t *s_open_ops;
static void *s_open_state;

static void s_end_open(void)
{
    if (s_open_ops)
        s_open_ops->request_end(s_open_state);
    s_open_ops = NULL;
    s_open_state = NULL;
}

/* Parameters for policy with its default parameters and schedule. */
static um_gen_params_t s_params(const char *policy, int32_t gen, int32_t block, int32_t steps,
                                double temperature, double cfg, uint64_t seed)
{
    const um_remask_ops_t *ops = s_policy(policy);
    s_end_open();
    s_open_ops = ops;
    s_open_state = s_begin(ops, NULL, policy);
    return (um_gen_params_t){.gen_length = gen, .block_length = block, .steps = steps,
                             .temperature = temperature, .cfg_scale = cfg, .seed = seed,
                             .remask = ops, .remask_state = s_open_state,
                             .schedule = um_remask_traits(ops).schedule, .eot_id = -1};
}

static int32_t *s_ids(json_t *arr, size_t *n)
{
    *n = json_array_size(arr);
    int32_t *ids = malloc((*n + 1) * sizeof *ids);
    for (size_t i = 0; i < *n; i++)
        ids[i] = (int32_t)json_integer_value(json_array_get(arr, i));
    return ids;
}

/* Begin a request on ops with the parameters of a JSON object (NULL: defaults). */
static void *s_begin(const um_remask_ops_t *ops, json_t *params, const char *name)
{
    um_param_t in[8], checked[8];
    int32_t n_in = 0;
    const char *key;
    json_t *v;
    json_object_foreach(params, key, v) {
        ck_assert_int_lt(n_in, 8);
        in[n_in++] = (um_param_t){.name = key, .type = UM_PARAM_NUMBER,
                                  .number = json_number_value(v)};
    }
    char err[256] = "";
    ck_assert_msg(um_params_check(ops->params, ops->n_params, in, n_in, checked, err,
                                  sizeof err) == 0, "%s: %s", name, err);
    void *state = NULL;
    ck_assert_msg(ops->request_begin(um_plugin_host(), checked, ops->n_params, &state, err,
                                     sizeof err) == 0, "%s: %s", name, err);
    return state;
}

/* One fixture case: its request, with a policy state of its own, and the reference's
 * result. */
typedef struct s_case {
    json_t *json;
    const char *name, *policy;
    int32_t *prompt, *expected;
    size_t n_prompt, n_expected;
    um_gen_params_t p;
} s_case_t;

static void s_case_load(int index, s_case_t *k)
{
    json_t *c = json_array_get(s_cases, (size_t)index);
    ck_assert_ptr_nonnull(c);
    k->json = c;
    k->name = json_string_value(json_object_get(c, "name"));
    k->prompt = s_ids(json_object_get(c, "prompt_ids"), &k->n_prompt);
    k->expected = s_ids(json_object_get(c, "canvas"), &k->n_expected);
    k->policy = json_string_value(json_object_get(c, "remasking"));
    const um_remask_ops_t *ops = s_policy(k->policy);
    um_gen_params_t p = {
        .gen_length = (int32_t)json_integer_value(json_object_get(c, "gen_length")),
        .block_length = (int32_t)json_integer_value(json_object_get(c, "block_length")),
        .steps = (int32_t)json_integer_value(json_object_get(c, "steps")),
        .temperature = json_number_value(json_object_get(c, "temperature")),
        .cfg_scale = json_number_value(json_object_get(c, "cfg_scale")),
        .seed = (uint64_t)json_integer_value(json_object_get(c, "seed")),
        .remask = ops,
        .schedule = um_remask_traits(ops).schedule,
        .eot_id = -1,
    };
    p.top_k = (int32_t)json_integer_value(json_object_get(c, "top_k"));
    p.top_p = json_number_value(json_object_get(c, "top_p"));
    const char *schedule = json_string_value(json_object_get(c, "schedule"));
    if (schedule)
        p.schedule = strcmp(schedule, "timestep") == 0 ? UM_SCHEDULE_TIMESTEP
                                                       : UM_SCHEDULE_QUOTA;
    p.eps = json_number_value(json_object_get(c, "eps"));
    p.ban_eos = json_is_true(json_object_get(c, "ban_eos"));
    p.suppress_eos = json_is_true(json_object_get(c, "suppress_eos_confidence"));
    p.early_stop = json_is_true(json_object_get(c, "early_stop"));
    p.remask_state = s_begin(ops, json_object_get(c, "remasking_params"), k->name);
    k->p = p;
    ck_assert_uint_eq(k->n_expected, k->n_prompt + (size_t)p.gen_length);
}

static void s_case_free(s_case_t *k)
{
    k->p.remask->request_end(k->p.remask_state);
    free(k->expected);
    free(k->prompt);
}

/* The reference's canvas token for token, its forward passes and its early stop. how
 * names the way the case ran. */
static void s_case_assert(const s_case_t *k, const int32_t *canvas, const um_gen_stats_t *st,
                          const char *how)
{
    for (size_t i = 0; i < k->n_expected; i++)
        ck_assert_msg(canvas[i] == k->expected[i], "%s (%s, seed %d, %s): position %zu is %d, "
                      "the reference has %d", k->name, k->policy, (int)k->p.seed, how, i,
                      canvas[i], k->expected[i]);
    json_t *c = k->json;
    ck_assert_msg(st->forward_passes == json_integer_value(json_object_get(c, "forward_passes")),
                  "%s (%s): %d forward passes, the reference ran %lld", k->name, how,
                  st->forward_passes,
                  (long long)json_integer_value(json_object_get(c, "forward_passes")));
    ck_assert_msg(st->early_stop == json_is_true(json_object_get(c, "early_stopped")),
                  "%s (%s): early stop %d, the reference %d", k->name, how, st->early_stop,
                  json_is_true(json_object_get(c, "early_stopped")));
    ck_assert_int_eq(st->eos_position, json_integer_value(json_object_get(c, "eos_position")));
}

/*
 * Every fixture case, token for token, with its forward passes and early stop. With
 * full_lm_head the engine computes the LM head for every position, as the reference
 * does, rather than for the candidates only.
 */
static void s_check_case(int index, int full_lm_head)
{
    s_case_t k;
    s_case_load(index, &k);
    k.p.full_lm_head = full_lm_head;
    int32_t *canvas = malloc(k.n_expected * sizeof *canvas);
    char err[512] = "";
    um_gen_stats_t st;
    int rc = um_generate(s_model, k.prompt, (int32_t)k.n_prompt, &k.p, NULL, NULL, canvas, &st,
                         err, sizeof err);
    ck_assert_msg(rc == 0, "%s: %s", k.name, err);
    s_case_assert(&k, canvas, &st, "alone");
    ck_assert_int_eq(st.batch_size, 1);
    free(canvas);
    s_case_free(&k);
}

START_TEST(matches_reference_canvas)
{
    s_check_case(_i, 0);
}
END_TEST

/*
 * Every case again with the LM head over every position, as the reference samplers
 * compute it: the candidates-only head must give the same tokens, and does since both
 * runs match the reference token for token.
 */
START_TEST(full_lm_head_same_tokens)
{
    s_check_case(_i, 1);
}
END_TEST

/*
 * Every third case again on the scalar kernel table, which every SIMD table is compared
 * with: the same tokens on both shows the tables' differences stay inside the margins.
 */
START_TEST(matches_reference_scalar)
{
    char err[256];
    ck_assert_int_eq(um_kernels_select("scalar", err, sizeof err), 0);
    for (size_t i = 0; i < json_array_size(s_cases); i += 3)
        s_check_case((int)i, 0);
    ck_assert_int_eq(um_kernels_select(NULL, err, sizeof err), 0);
}
END_TEST

/* ------------------------------------------------------------------------- */
/* Batches                                                                    */

/* Cases per batch in batch_matches_alone. Group g contains cases g, g + G, g + 2G, ... */
#define S_BATCH 4

static int s_count_groups(int n_cases)
{
    return (n_cases + S_BATCH - 1) / S_BATCH;
}

/*
 * Every fixture case runs in one batch with S_BATCH - 1 others, cases far apart in the
 * grid (other prompts and lengths, policies, temperatures, guidance on and off). Each
 * must give the reference's tokens, forward passes and early stop, whether its pass
 * computes the LM head over its candidates or over every position.
 * matches_reference_canvas checks the same for every case run alone, so batched equals
 * alone without running each case twice here. The shared pass differs from the lone
 * one by f32 rounding only (the model suite's ragged test measures it). Every fixture
 * case keeps each decision several times farther from a tie than the reference's
 * logits differ from ours (tools/make_fixtures.py), a larger difference than that
 * rounding, so no token may change.
 */
START_TEST(batch_matches_alone)
{
    const int n_cases = (int)json_array_size(s_cases);
    const int G = s_count_groups(n_cases);
    s_case_t k[S_BATCH];
    int32_t *batched[S_BATCH];
    um_gen_stats_t st[S_BATCH];
    um_gen_t *gens[S_BATCH];
    char err[512];
    int n = 0;
    for (int idx = _i; idx < n_cases && n < S_BATCH; idx += G, n++) {
        s_case_load(idx, &k[n]);
        /* Every second member requests every position's logits, as plain-path benchmarks do. */
        k[n].p.full_lm_head = n % 2;
        batched[n] = malloc(k[n].n_expected * sizeof *batched[n]);
        int rc = um_gen_begin(s_model, k[n].prompt, (int32_t)k[n].n_prompt, &k[n].p, NULL,
                              NULL, batched[n], &gens[n], err, sizeof err);
        ck_assert_msg(rc == 0, "%s: %s", k[n].name, err);
    }
    um_test_step_batch_to_end(gens, n);
    for (int j = 0; j < n; j++) {
        ck_assert_msg(um_gen_end(&gens[j], &st[j], err, sizeof err) == 0, "%s: %s", k[j].name,
                      err);
        ck_assert_ptr_null(gens[j]);
        s_case_assert(&k[j], batched[j], &st[j], "batched");
        ck_assert_int_eq(st[j].steps_run, st[j].forward_passes);
        /* Every member runs a first step, and all first steps share one pass. */
        ck_assert_int_eq(st[j].batch_size, n);
        free(batched[j]);
        s_case_free(&k[j]);
    }
}
END_TEST

/* Counts the steps in *user (an int32_t) and cancels at the second. */
static int s_cancel_second(void *user, const um_step_info_t *info)
{
    (void)info;
    return ++*(int32_t *)user >= 2;
}

/*
 * In one batch: a generation that cancels at its second pass, one with a prefix cache,
 * one with a dual cache and a plain one. The cancelled one stops there with a partial
 * canvas; every other one equals its lone run.
 */
START_TEST(batch_cancel_and_cache)
{
    enum { N = 4 };
    s_case_t k[N];
    int32_t *alone[N], *batched[N];
    um_gen_t *gens[N];
    um_gen_stats_t st[N], st_alone[N];
    char err[512];
    int32_t n_cancel_steps = 0;
    for (int j = 0; j < N; j++) {
        s_case_load(j, &k[j]);
        k[j].p.cache = UM_CACHE_NONE;
        if (j == 1)
            k[j].p.cache = UM_CACHE_PREFIX;
        if (j == 2)
            k[j].p.cache = UM_CACHE_DUAL;
        alone[j] = malloc(k[j].n_expected * sizeof *alone[j]);
        batched[j] = malloc(k[j].n_expected * sizeof *batched[j]);
        ck_assert_int_eq(um_generate(s_model, k[j].prompt, (int32_t)k[j].n_prompt, &k[j].p,
                                     NULL, NULL, alone[j], &st_alone[j], err, sizeof err), 0);
        k[j].p.remask->request_end(k[j].p.remask_state);
        k[j].p.remask_state = s_begin(k[j].p.remask,
                                      json_object_get(k[j].json, "remasking_params"), k[j].name);
        ck_assert_int_eq(um_gen_begin(s_model, k[j].prompt, (int32_t)k[j].n_prompt, &k[j].p,
                                      j == 0 ? s_cancel_second : NULL, &n_cancel_steps,
                                      batched[j],
                                      &gens[j], err, sizeof err), 0);
    }
    while (!um_gen_done(gens[0]) || !um_gen_done(gens[1]) || !um_gen_done(gens[2])
           || !um_gen_done(gens[3]))
        ck_assert_int_eq(um_gen_step_batch(gens, N), 0);
    for (int j = 0; j < N; j++) {
        int rc = um_gen_end(&gens[j], &st[j], err, sizeof err);
        if (j == 0) {
            ck_assert_int_eq(rc, UM_ECANCELLED);
            ck_assert_msg(strstr(err, "cancelled") != NULL, "%s", err);
            ck_assert_int_eq(st[j].forward_passes, 2);
        } else {
            ck_assert_msg(rc == 0, "%s: %s", k[j].name, err);
            for (size_t i = 0; i < k[j].n_expected; i++)
                ck_assert_int_eq(batched[j][i], alone[j][i]);
            ck_assert_int_eq(st[j].forward_passes, st_alone[j].forward_passes);
            ck_assert_int_eq(st[j].cached_passes, st_alone[j].cached_passes);
            /* All four shared at least their first pass. */
            ck_assert_int_eq(st[j].batch_size, N);
        }
        free(alone[j]);
        free(batched[j]);
        s_case_free(&k[j]);
    }
}
END_TEST

/* A generation ended before it finished reports a stop; a NULL entry is skipped. */
START_TEST(batch_end_early)
{
    s_case_t k;
    s_case_load(0, &k);
    int32_t *canvas = malloc(k.n_expected * sizeof *canvas);
    um_gen_t *gens[2] = {NULL, NULL};
    char err[512] = "";
    ck_assert_int_eq(um_gen_begin(s_model, k.prompt, (int32_t)k.n_prompt, &k.p, NULL, NULL,
                                  canvas, &gens[1], err, sizeof err), 0);
    ck_assert_int_eq(um_gen_step_batch(gens, 2), 0);
    ck_assert(!um_gen_done(gens[1]));
    um_gen_stats_t st;
    ck_assert_int_eq(um_gen_end(&gens[1], &st, err, sizeof err), UM_ECANCELLED);
    ck_assert_msg(strstr(err, "stopped before step") != NULL, "%s", err);
    ck_assert_int_eq(st.forward_passes, 1);
    ck_assert_int_eq(st.batch_size, 1);
    free(canvas);
    s_case_free(&k);
}
END_TEST

/* Every policy ships, and the grid covers each one. */
START_TEST(fixture_covers_every_policy)
{
    static const char *const names[] = {"low_confidence", "random", "maskgit_plus",
                                        "topk_margin", "entropy", "threshold", "factor",
                                        "eb_sampler", "origin"};
    for (size_t k = 0; k < sizeof names / sizeof names[0]; k++) {
        s_policy(names[k]);
        int cases = 0, hot = 0, cfg = 0, blocks = 0;
        size_t i;
        json_t *c;
        json_array_foreach(s_cases, i, c) {
            if (strcmp(json_string_value(json_object_get(c, "remasking")), names[k]) != 0)
                continue;
            cases++;
            hot += json_number_value(json_object_get(c, "temperature")) > 0;
            cfg += json_number_value(json_object_get(c, "cfg_scale")) > 0;
            blocks += json_integer_value(json_object_get(c, "block_length"))
                      < json_integer_value(json_object_get(c, "gen_length"));
        }
        ck_assert_msg(cases >= 5 && hot >= 2 && cfg >= 2 && blocks >= 2, "policy %s has %d "
                      "fixture cases (%d hot, %d guided, %d with blocks): regenerate with "
                      "tools/make_fixtures.py", names[k], cases, hot, cfg, blocks);
    }
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

static void *s_begin_one(const um_remask_ops_t *ops, const char *name, double value);

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

    /* A categorical policy with top-p, top-k and stochastic positions, likewise. */
    p = s_params("entropy", 32, 16, 16, 0.9, 0.5, 77);
    p.top_k = 50;
    p.top_p = 0.9;
    p.remask_state = s_begin_one(p.remask, "alg_temp", 0.5);
    omp_set_num_threads(1);
    ck_assert_int_eq(um_generate(s_model, s_prompt, 4, &p, NULL, NULL, a, NULL, err,
                                 sizeof err), 0);
    omp_set_num_threads(2);
    ck_assert_int_eq(um_generate(s_model, s_prompt, 4, &p, NULL, NULL, b, NULL, err,
                                 sizeof err), 0);
    omp_set_num_threads(saved);
    p.remask->request_end(p.remask_state);
    ck_assert_mem_eq(a, b, sizeof a);
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

    /* Token sampling and schedule fields, each named with its value. */
    q = p;
    q.temperature = 1e-5;
    ck_assert_int_eq(um_gen_check(cfg, 4, &q, &field, err, sizeof err), UM_ERANGE);
    ck_assert_str_eq(field, "temperature");
    q.temperature = UM_SAMPLE_MIN_TEMPERATURE;
    ck_assert_int_eq(um_gen_check(cfg, 4, &q, &field, err, sizeof err), 0);
    q = p;
    q.top_k = -1;
    ck_assert_int_eq(um_gen_check(cfg, 4, &q, &field, err, sizeof err), UM_ERANGE);
    ck_assert_str_eq(field, "top_k");
    q = p;
    q.top_p = 1.5;
    ck_assert_int_eq(um_gen_check(cfg, 4, &q, &field, err, sizeof err), UM_ERANGE);
    ck_assert_str_eq(field, "top_p");
    ck_assert_msg(strstr(err, "1.5") != NULL, "message lacks the value: %s", err);
    q = p;
    q.eps = 1.0;
    ck_assert_int_eq(um_gen_check(cfg, 4, &q, &field, err, sizeof err), UM_ERANGE);
    ck_assert_str_eq(field, "eps");
    q = p;
    q.schedule = (um_schedule_t)7;
    ck_assert_int_eq(um_gen_check(cfg, 4, &q, &field, err, sizeof err), UM_EINVAL);
    ck_assert_str_eq(field, "schedule");
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

    /* Dream's schedule skips its empty steps by search, not one by one. */
    p = s_params("maskgit_plus", 8, 8, INT32_MAX, 0, 0, 0);
    p.eps = 1e-3;
    ck_assert_int_eq(um_generate(s_model, s_prompt, 4, &p, NULL, NULL, canvas, &st, err,
                                 sizeof err), 0);
    ck_assert_int_le(st.forward_passes, 8);
    for (int i = 4; i < 12; i++)
        ck_assert_int_ne(canvas[i], um_model_config(s_model)->mask_token_id);
}
END_TEST

/*
 * Dream's schedule over 16 masks in 4 steps with eps 0.001: floor(16 * 0.24975) = 3, then
 * floor(13 * 0.33289) = 4, floor(9 * 0.49900) = 4, and the last step takes the 5 left.
 */
START_TEST(timestep_schedule_counts)
{
    um_gen_params_t p = s_params("maskgit_plus", 16, 16, 4, 0, 0, 0);
    ck_assert_int_eq(p.schedule, UM_SCHEDULE_TIMESTEP);
    p.eps = 1e-3;
    int32_t canvas[20];
    s_trace_t t = s_trace_new(20);
    char err[256] = "";
    um_gen_stats_t st;
    ck_assert_int_eq(um_generate(s_model, s_prompt, 4, &p, s_trace_step, &t, canvas, &st, err,
                                 sizeof err), 0);
    const int32_t expect[] = {3, 4, 4, 5};
    ck_assert_int_eq(t.n_calls, 4);
    for (int i = 0; i < 4; i++)
        ck_assert_int_eq(t.per_step[i], expect[i]);
    ck_assert_int_eq(t.violations, 0);

    /* The same policy on LLaDA's quota: 4 per step. */
    t.n_calls = 0;
    for (int32_t i = 0; i < 20; i++)
        t.first_seen[i] = -1;
    p.schedule = UM_SCHEDULE_QUOTA;
    ck_assert_int_eq(um_generate(s_model, s_prompt, 4, &p, s_trace_step, &t, canvas, &st, err,
                                 sizeof err), 0);
    for (int i = 0; i < 4; i++)
        ck_assert_int_eq(t.per_step[i], 4);
    s_trace_free(&t);
}
END_TEST

/* Begin a request of a policy with one numeric parameter. */
static void *s_begin_one(const um_remask_ops_t *ops, const char *name, double value)
{
    json_t *params = json_pack("{s:f}", name, value);
    void *state = s_begin(ops, params, name);
    json_decref(params);
    return state;
}

/*
 * An adaptive policy uses steps as a bound: threshold 1 commits one token per step (the
 * top one), and the last of a block's 3 steps commits the 6 left of its 8.
 */
START_TEST(adaptive_steps_are_a_bound)
{
    um_gen_params_t p = s_params("threshold", 16, 8, 6, 0, 0, 0);
    p.remask_state = s_begin_one(p.remask, "threshold", 1.0);
    int32_t canvas[20];
    s_trace_t t = s_trace_new(20);
    char err[256] = "";
    um_gen_stats_t st;
    ck_assert_int_eq(um_generate(s_model, s_prompt, 4, &p, s_trace_step, &t, canvas, &st, err,
                                 sizeof err), 0);
    p.remask->request_end(p.remask_state);
    const int32_t expect[] = {1, 1, 6, 1, 1, 6};
    ck_assert_int_eq(t.n_calls, 6);
    for (int i = 0; i < 6; i++)
        ck_assert_int_eq(t.per_step[i], expect[i]);
    ck_assert_int_eq(t.violations, 0);
    s_trace_free(&t);

    /* Threshold 0 commits a whole block in its first step, and the block's other
       steps run no pass. */
    p.remask_state = s_begin_one(p.remask, "threshold", 0.0);
    t = s_trace_new(20);
    ck_assert_int_eq(um_generate(s_model, s_prompt, 4, &p, s_trace_step, &t, canvas, &st, err,
                                 sizeof err), 0);
    p.remask->request_end(p.remask_state);
    ck_assert_int_eq(st.forward_passes, 2);
    ck_assert_int_eq(t.per_step[0], 8);
    ck_assert_int_eq(t.per_step[1], 8);
    s_trace_free(&t);
}
END_TEST

/* EB-Sampler's bound: gamma 0 commits one token per step unless entropies are 0. */
START_TEST(eb_sampler_gamma_bounds_commits)
{
    um_gen_params_t p = s_params("eb_sampler", 12, 12, 12, 0, 0, 0);
    p.remask_state = s_begin_one(p.remask, "gamma", 0.0);
    int32_t canvas[16];
    s_trace_t t = s_trace_new(16);
    char err[256] = "";
    um_gen_stats_t st;
    ck_assert_int_eq(um_generate(s_model, s_prompt, 4, &p, s_trace_step, &t, canvas, &st, err,
                                 sizeof err), 0);
    p.remask->request_end(p.remask_state);
    ck_assert_int_eq(t.n_calls, 12);
    for (int i = 0; i < 12; i++)
        ck_assert_int_eq(t.per_step[i], 1);
    s_trace_free(&t);

    /* A huge budget commits everything at once. */
    p.remask_state = s_begin_one(p.remask, "gamma", 1000.0);
    ck_assert_int_eq(um_generate(s_model, s_prompt, 4, &p, NULL, NULL, canvas, &st, err,
                                 sizeof err), 0);
    p.remask->request_end(p.remask_state);
    ck_assert_int_eq(st.forward_passes, 1);
}
END_TEST

/* Reads the step where early stop fired. */
typedef struct {
    int fired;
    int32_t n_committed;
    int32_t n_masked;
} s_stop_trace_t;

static int s_stop_step(void *user, const um_step_info_t *info)
{
    s_stop_trace_t *t = user;
    if (info->early_stop) {
        t->fired++;
        t->n_committed = info->n_committed;
        t->n_masked = info->n_masked;
    }
    return 0;
}

/*
 * Early stop on an EOS that arrives while later blocks are still masked. The rest of the
 * canvas becomes EOS, and the step reports those positions as committed. The tokens up
 * to the EOS equal those of the run without early stop.
 */
START_TEST(early_stop_fills_with_eos)
{
    json_t *c = NULL;
    size_t i;
    json_array_foreach(s_cases, i, c)
        if (strcmp(json_string_value(json_object_get(c, "name")), "early_stop_greedy") == 0)
            break;
    ck_assert_msg(i < json_array_size(s_cases), "generate.json lacks early_stop_greedy");
    size_t n_prompt;
    int32_t *prompt = s_ids(json_object_get(c, "prompt_ids"), &n_prompt);
    const int32_t eos = um_model_config(s_model)->eos_token_id;
    um_gen_params_t p = s_params("low_confidence", 40, 4, 40, 0, 0, 0);
    p.early_stop = 1;
    int32_t *a = malloc((n_prompt + 40) * sizeof *a), *b = malloc((n_prompt + 40) * sizeof *b);
    s_stop_trace_t t = {0};
    char err[256] = "";
    um_gen_stats_t st, full;
    ck_assert_int_eq(um_generate(s_model, prompt, (int32_t)n_prompt, &p, s_stop_step, &t, a,
                                 &st, err, sizeof err), 0);
    ck_assert_int_eq(st.early_stop, 1);
    ck_assert_int_eq(t.fired, 1);
    ck_assert_int_eq(t.n_masked, 0);
    ck_assert_int_ge(st.eos_position, (int32_t)n_prompt);
    /* Every position after the first EOS is EOS now; the later blocks never ran. */
    for (int32_t pos = st.eos_position; pos < (int32_t)n_prompt + 40; pos++)
        ck_assert_int_eq(a[pos], eos);
    ck_assert_int_gt(t.n_committed, (int32_t)n_prompt + 40 - st.eos_position - 1 - 4);

    p.early_stop = 0;
    ck_assert_int_eq(um_generate(s_model, prompt, (int32_t)n_prompt, &p, NULL, NULL, b, &full,
                                 err, sizeof err), 0);
    ck_assert_int_lt(st.forward_passes, full.forward_passes);
    ck_assert_int_eq(full.eos_position, st.eos_position);
    ck_assert_mem_eq(a, b, (size_t)(st.eos_position + 1) * sizeof *a);
    free(a);
    free(b);
    free(prompt);
}
END_TEST

/* ban_eos never predicts EOS; the same request without it does. */
START_TEST(ban_eos_removes_eos)
{
    json_t *c = NULL;
    size_t i;
    json_array_foreach(s_cases, i, c)
        if (strcmp(json_string_value(json_object_get(c, "name")), "early_stop_off") == 0)
            break;
    ck_assert_msg(i < json_array_size(s_cases), "generate.json lacks early_stop_off");
    size_t n_prompt;
    int32_t *prompt = s_ids(json_object_get(c, "prompt_ids"), &n_prompt);
    const int32_t eos = um_model_config(s_model)->eos_token_id;
    um_gen_params_t p = s_params("low_confidence", 40, 8, 40, 0, 0, 0);
    int32_t *canvas = malloc((n_prompt + 40) * sizeof *canvas);
    char err[256] = "";
    um_gen_stats_t st;
    ck_assert_int_eq(um_generate(s_model, prompt, (int32_t)n_prompt, &p, NULL, NULL, canvas,
                                 &st, err, sizeof err), 0);
    ck_assert_int_ge(st.eos_position, 0);
    p.ban_eos = 1;
    ck_assert_int_eq(um_generate(s_model, prompt, (int32_t)n_prompt, &p, NULL, NULL, canvas,
                                 &st, err, sizeof err), 0);
    ck_assert_int_eq(st.eos_position, -1);
    for (int32_t pos = (int32_t)n_prompt; pos < (int32_t)n_prompt + 40; pos++)
        ck_assert_int_ne(canvas[pos], eos);
    free(canvas);
    free(prompt);
}
END_TEST

/* The number of fixture cases, read when the suite is built; 1 when unreadable so the
   first case's lookup fails with the reason. */
static int s_count_cases(void)
{
    const char *dir = getenv("UM_TEST_FIXTURES");
    if (!dir)
        return 1;
    json_t *doc = json_load_file(um_test_path(dir, "generate.json"), 0, NULL);
    int n = (int)json_array_size(json_object_get(doc, "cases"));
    json_decref(doc);
    return n > 0 ? n : 1;
}

Suite *um_generate_suite(void)
{
    Suite *s = suite_create("generate");
    TCase *tc = tcase_create("reference");
    tcase_add_unchecked_fixture(tc, s_setup, s_teardown);
    tcase_set_timeout(tc, 300);
    tcase_add_loop_test(tc, matches_reference_canvas, 0, s_count_cases());
    tcase_add_loop_test(tc, full_lm_head_same_tokens, 0, s_count_cases());
    tcase_add_test(tc, matches_reference_scalar);
    tcase_add_test(tc, fixture_covers_every_policy);
    suite_add_tcase(s, tc);
    tc = tcase_create("batch");
    tcase_add_unchecked_fixture(tc, s_setup, s_teardown);
    tcase_set_timeout(tc, 300);
    tcase_add_loop_test(tc, batch_matches_alone, 0, s_count_groups(s_count_cases()));
    tcase_add_test(tc, batch_cancel_and_cache);
    tcase_add_test(tc, batch_end_early);
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
    tcase_add_test(tc, timestep_schedule_counts);
    tcase_add_test(tc, adaptive_steps_are_a_bound);
    tcase_add_test(tc, eb_sampler_gamma_bounds_commits);
    tcase_add_test(tc, early_stop_fills_with_eos);
    tcase_add_test(tc, ban_eos_removes_eos);
    suite_add_tcase(s, tc);
    return s;
}
