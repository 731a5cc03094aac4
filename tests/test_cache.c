/*
 * Block cache tests (Fast-dLLM's prefix and dual caches). The cached forward pass with
 * nothing stale must equal the uncached one on every family, and it rejects bad calls.
 * Cached generations on the bundled model must match the PyTorch reference's canvases
 * (tests/fixtures/cache.json, written by tools/make_cache_fixtures.py). The daemon
 * accepts, rejects and reports the request's cache field.
 */
#include <jansson.h>
#include <math.h>
#include <zmq.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <unmaskd/error.h>
#include <unmaskd/protocol.h>

#include "generate.h"
#include "kernels.h"
#include "model.h"
#include "plugins.h"
#include "request.h"
#include "testutil.h"

static um_model_t *s_model;
static um_plugin_registry_t s_reg;
static json_t *s_cases;

static void s_setup(void)
{
    char err[512] = "";
    int rc = um_model_load(um_test_env("UM_TEST_MODEL"), &s_model, err, sizeof err);
    ck_assert_msg(rc == 0, "model load failed: %s", err);
    ck_assert_uint_ge(um_plugins_scan(&s_reg, um_test_env("UM_TEST_PLUGINS")), 10);
    json_error_t jerr;
    const char *path = um_test_path(um_test_env("UM_TEST_FIXTURES"), "cache.json");
    json_t *doc = json_load_file(path, 0, &jerr);
    ck_assert_msg(doc != NULL, "cannot read %s: %s (regenerate with "
                  "tools/make_cache_fixtures.py)", path, jerr.text);
    s_cases = json_incref(json_object_get(doc, "cases"));
    json_decref(doc);
}

static void s_teardown(void)
{
    json_decref(s_cases);
    um_plugins_clear(&s_reg);
    um_model_destroy(&s_model);
}

/* ------------------------------------------------------------------------- */
/* The cached forward pass                                                    */

/* Models the fresh-cache check runs on: the bundled LLaDA model and each family's. */
static const char *const s_models[] = {NULL, "dream", "bert", "distilbert"};
#define S_N_MODELS (int)(sizeof s_models / sizeof s_models[0])

static um_model_t *s_load_family(int index)
{
    char dir[4096];
    if (!s_models[index])
        snprintf(dir, sizeof dir, "%s", um_test_env("UM_TEST_MODEL"));
    else
        snprintf(dir, sizeof dir, "%s/families/%s", um_test_env("UM_TEST_FIXTURES"),
                 s_models[index]);
    um_model_options_t opts = {.weight_dtype = UM_WDTYPE_F32};
    um_model_t *m = NULL;
    char err[512] = "";
    int rc = um_model_load_opts(dir, &opts, &m, err, sizeof err);
    ck_assert_msg(rc == 0, "load %s: %s", dir, err);
    return m;
}

/* Largest |a - b| over n floats, relative to the largest |b| (at least 1). */
static double s_max_rel_diff(const float *a, const float *b, size_t n)
{
    double diff = 0, scale = 1;
    for (size_t i = 0; i < n; i++) {
        diff = fmax(diff, fabs((double)a[i] - b[i]));
        scale = fmax(scale, fabs((double)b[i]));
    }
    return diff / scale;
}

/*
 * With nothing stale (the same ids in the filling pass and in the window pass) a
 * window's logits must equal the uncached pass's. The whole-sequence pass runs the
 * same products on the same shapes, so it is bit-identical. A narrower window differs
 * only in the products' row counts, which oneDNN may block differently, so a row's sums
 * run in another order. The worst difference seen is about 5e-7 of the largest logit on
 * each of the four models (f32, AVX2). The bound 1e-4 leaves a factor of 200 for other ISAs and
 * backends and is still far below the change a wrong position or a stale row makes.
 */
#define S_FRESH_TOLERANCE 1e-4

START_TEST(fresh_cache_equals_uncached)
{
    um_model_t *m = s_load_family(_i);
    const um_model_config_t *c = um_model_config(m);
    const int32_t n_seq = 2, T = 24, E = c->embedding_size;
    int32_t ids[2 * 24];
    for (int32_t t = 0; t < n_seq * T; t++)
        ids[t] = t % 5 == 3 ? c->mask_token_id : (int32_t)((t * 37 + 11) % c->vocab_size);
    float *full = malloc((size_t)n_seq * T * E * sizeof *full);
    float *got = malloc((size_t)n_seq * T * E * sizeof *got);
    int32_t rows[2 * 24];
    ck_assert_int_eq(um_model_forward(m, ids, n_seq, T, full), 0);

    um_kv_cache_t *cache = NULL;
    ck_assert_int_eq(um_kv_cache_new(m, n_seq, T, &cache), 0);
    ck_assert_uint_eq(um_kv_cache_bytes(cache), 2 * (size_t)c->n_layers * n_seq * T *
                                                    c->n_kv_heads * c->head_dim * 4);
    /* Windows: the whole sequence (fills), a prefix-cache suffix, a dual-cache block. */
    const int32_t windows[][2] = {{0, 24}, {8, 16}, {8, 8}, {1, 5}};
    for (size_t w = 0; w < sizeof windows / sizeof windows[0]; w++) {
        int32_t q_start = windows[w][0], q_len = windows[w][1], n_rows = 0;
        for (int32_t s = 0; s < n_seq; s++)
            for (int32_t p = q_start; p < q_start + q_len; p++)
                /* Dream's logits at p read position p - 1, which must be in the window. */
                if (!c->logits_shift || p == 0 || p - 1 >= q_start)
                    rows[n_rows++] = s * T + p;
        ck_assert_int_eq(um_model_forward_cached(m, cache, ids, n_seq, T, q_start, q_len, rows,
                                                 n_rows, got), 0);
        for (int32_t i = 0; i < n_rows; i++) {
            if (q_len == T)
                ck_assert_msg(memcmp(got + (size_t)i * E, full + (size_t)rows[i] * E,
                                     (size_t)E * sizeof *got) == 0, "whole-sequence cached "
                              "pass differs from the uncached pass at row %d", rows[i]);
            double rel = s_max_rel_diff(got + (size_t)i * E, full + (size_t)rows[i] * E,
                                        (size_t)E);
            ck_assert_msg(rel <= S_FRESH_TOLERANCE, "%s: window [%d, %d) row %d differs from "
                          "the uncached pass by %.3g of the largest logit",
                          s_models[_i] ? s_models[_i] : "tinystories", q_start,
                          q_start + q_len, rows[i], rel);
        }
    }
    um_kv_cache_destroy(&cache);
    ck_assert_ptr_null(cache);
    free(full);
    free(got);
    um_model_destroy(&m);
}
END_TEST

/* Ids for a canvas of n positions: tokens from the vocabulary, every fifth a mask. */
static void s_fill_ids(const um_model_config_t *c, int32_t *ids, int32_t n, int32_t salt)
{
    for (int32_t t = 0; t < n; t++)
        ids[t] = t % 5 == 3 ? c->mask_token_id
                            : (int32_t)((t * 37 + salt * 101 + 11) % c->vocab_size);
}

/* Every position of n_seq sequences of T whose logits a window of [q_start, q_start +
   q_len) can give (Dream's logits at p read p - 1). Returns the count. */
static int32_t s_window_rows(const um_model_config_t *c, int32_t n_seq, int32_t T,
                             int32_t q_start, int32_t q_len, int32_t *rows)
{
    int32_t n = 0;
    for (int32_t s = 0; s < n_seq; s++)
        for (int32_t p = q_start; p < q_start + q_len; p++)
            if (!c->logits_shift || p == 0 || p - 1 >= q_start)
                rows[n++] = s * T + p;
    return n;
}

/*
 * One parts pass of three members equals their separate calls: a dual-cache window on
 * two sequences whose cache contains stale rows, an uncached sequence of another length,
 * and a cache being filled by a whole-sequence pass. Each part's attention must read
 * only its own sequences and cache, and the filled cache must serve later windows as
 * one filled alone does. The passes differ only in the weight products' row counts, so
 * S_FRESH_TOLERANCE applies (see there).
 */
START_TEST(parts_match_separate_calls)
{
    um_model_t *m = s_load_family(_i);
    const um_model_config_t *c = um_model_config(m);
    const int32_t E = c->embedding_size, TA = 24, TB = 17, TC = 20;
    int32_t ids_a[2 * 24], stale_a[2 * 24], ids_b[17], ids_c[20];
    s_fill_ids(c, ids_a, 2 * TA, 1);
    s_fill_ids(c, ids_b, TB, 2);
    s_fill_ids(c, ids_c, TC, 3);
    /* The cache of part A is filled from other ids outside the window, so it is stale. */
    memcpy(stale_a, ids_a, sizeof stale_a);
    for (int32_t t = 0; t < 2 * TA; t++)
        if (t % TA < 8)
            stale_a[t] = (stale_a[t] + 7) % c->vocab_size;

    um_kv_cache_t *cache_a = NULL, *cache_a1 = NULL, *cache_c = NULL, *cache_c1 = NULL;
    ck_assert_int_eq(um_kv_cache_new(m, 2, TA, &cache_a), 0);
    ck_assert_int_eq(um_kv_cache_new(m, 2, TA, &cache_a1), 0);
    ck_assert_int_eq(um_kv_cache_new(m, 1, TC, &cache_c), 0);
    ck_assert_int_eq(um_kv_cache_new(m, 1, TC, &cache_c1), 0);
    int32_t rows_a[2 * 24], rows_b[17], rows_c[20], all_a[2 * 24];
    float *scratch = malloc((size_t)2 * TA * E * sizeof *scratch);
    int32_t n_all_a = s_window_rows(c, 2, TA, 0, TA, all_a);
    ck_assert_int_eq(um_model_forward_cached(m, cache_a, stale_a, 2, TA, 0, TA, all_a, n_all_a,
                                             scratch), 0);
    ck_assert_int_eq(um_model_forward_cached(m, cache_a1, stale_a, 2, TA, 0, TA, all_a,
                                             n_all_a, scratch), 0);
    int32_t n_a = s_window_rows(c, 2, TA, 8, 8, rows_a);
    int32_t n_b = s_window_rows(c, 1, TB, 0, TB, rows_b);
    int32_t n_c = s_window_rows(c, 1, TC, 0, TC, rows_c);
    /* Part B lists its rows last to first, so the row order differs from the index. */
    for (int32_t i = 0; i < n_b / 2; i++) {
        int32_t tmp = rows_b[i];
        rows_b[i] = rows_b[n_b - 1 - i];
        rows_b[n_b - 1 - i] = tmp;
    }
    const um_forward_part_t parts[3] = {
        {.ids = ids_a, .n_seq = 2, .seq_len = TA, .cache = cache_a, .q_start = 8, .q_len = 8,
         .rows = rows_a, .n_rows = n_a},
        {.ids = ids_b, .n_seq = 1, .seq_len = TB, .q_start = 0, .q_len = TB, .rows = rows_b,
         .n_rows = n_b},
        {.ids = ids_c, .n_seq = 1, .seq_len = TC, .cache = cache_c, .q_start = 0, .q_len = TC,
         .rows = rows_c, .n_rows = n_c},
    };
    const int32_t n_out = n_a + n_b + n_c;
    float *got = malloc((size_t)n_out * E * sizeof *got);
    float *want = malloc((size_t)n_out * E * sizeof *want);
    ck_assert_int_eq(um_model_forward_parts(m, parts, 3, got), 0);
    ck_assert_int_eq(um_model_forward_cached(m, cache_a1, ids_a, 2, TA, 8, 8, rows_a, n_a,
                                             want), 0);
    ck_assert_int_eq(um_model_forward_rows(m, ids_b, 1, TB, rows_b, n_b,
                                           want + (size_t)n_a * E), 0);
    ck_assert_int_eq(um_model_forward_cached(m, cache_c1, ids_c, 1, TC, 0, TC, rows_c, n_c,
                                             want + (size_t)(n_a + n_b) * E), 0);
    const char *family = s_models[_i] ? s_models[_i] : "tinystories";
    for (int32_t i = 0; i < n_out; i++) {
        double rel = s_max_rel_diff(got + (size_t)i * E, want + (size_t)i * E, (size_t)E);
        ck_assert_msg(rel <= S_FRESH_TOLERANCE, "%s: row %d of the parts pass differs from "
                      "its separate call by %.3g of the largest logit", family, i, rel);
    }
    /* The cache the parts pass filled serves a window like the one filled alone. */
    int32_t n_w = s_window_rows(c, 1, TC, 4, 6, rows_c);
    ck_assert_int_eq(um_model_forward_cached(m, cache_c, ids_c, 1, TC, 4, 6, rows_c, n_w, got),
                     0);
    ck_assert_int_eq(um_model_forward_cached(m, cache_c1, ids_c, 1, TC, 4, 6, rows_c, n_w,
                                             want), 0);
    for (int32_t i = 0; i < n_w; i++)
        ck_assert_msg(s_max_rel_diff(got + (size_t)i * E, want + (size_t)i * E, (size_t)E)
                          <= S_FRESH_TOLERANCE,
                      "%s: the cache filled in a parts pass gives other logits at row %d",
                      family, i);
    um_kv_cache_destroy(&cache_a);
    um_kv_cache_destroy(&cache_a1);
    um_kv_cache_destroy(&cache_c);
    um_kv_cache_destroy(&cache_c1);
    free(scratch);
    free(got);
    free(want);
    um_model_destroy(&m);
}
END_TEST

/* A parts pass rejects what each part's own call rejects, and a cache shared by parts. */
START_TEST(parts_reject_bad_calls)
{
    const um_model_config_t *c = um_model_config(s_model);
    const int32_t T = 16, E = c->embedding_size;
    int32_t ids[16], all[16], row = 9;
    for (int32_t t = 0; t < T; t++) {
        ids[t] = t + 10;
        all[t] = t;
    }
    float *logits = malloc((size_t)2 * T * E * sizeof *logits);
    um_kv_cache_t *cache = NULL;
    ck_assert_int_eq(um_kv_cache_new(s_model, 1, T, &cache), 0);
    um_forward_part_t parts[2] = {
        {.ids = ids, .n_seq = 1, .seq_len = T, .cache = cache, .q_start = 8, .q_len = 8,
         .rows = &row, .n_rows = 1},
        {.ids = ids, .n_seq = 1, .seq_len = T, .q_start = 0, .q_len = T, .rows = all,
         .n_rows = T},
    };
    /* A window of a cache no whole-sequence pass has filled. */
    ck_assert_int_eq(um_model_forward_parts(s_model, parts, 2, logits), UM_EINVAL);
    parts[0].q_start = 0;
    parts[0].q_len = T;
    ck_assert_int_eq(um_model_forward_parts(s_model, parts, 2, logits), 0);
    parts[0].q_start = 8;
    parts[0].q_len = 8;
    ck_assert_int_eq(um_model_forward_parts(s_model, parts, 2, logits), 0);
    /* Two parts writing one cache. */
    parts[1].cache = cache;
    ck_assert_int_eq(um_model_forward_parts(s_model, parts, 2, logits), UM_EINVAL);
    /* A window without a cache. */
    parts[1].cache = NULL;
    parts[1].q_start = 4;
    parts[1].q_len = 12;
    ck_assert_int_eq(um_model_forward_parts(s_model, parts, 2, logits), UM_EINVAL);
    parts[1].q_start = 0;
    parts[1].q_len = T;
    /* A row outside the window, a window outside the sequence, a bad id, no logits. */
    row = 3;
    ck_assert_int_eq(um_model_forward_parts(s_model, parts, 2, logits), UM_ERANGE);
    row = 9;
    parts[0].q_len = 9;
    ck_assert_int_eq(um_model_forward_parts(s_model, parts, 2, logits), UM_ERANGE);
    parts[0].q_len = 8;
    ids[2] = c->embedding_size;
    ck_assert_int_eq(um_model_forward_parts(s_model, parts, 2, logits), UM_ERANGE);
    ids[2] = 12;
    ck_assert_int_eq(um_model_forward_parts(s_model, parts, 2, NULL), UM_EINVAL);
    ck_assert_int_eq(um_model_forward_parts(s_model, parts, 0, logits), UM_EINVAL);
    ck_assert_int_eq(um_model_forward_parts(s_model, parts, 2, logits), 0);
    um_kv_cache_destroy(&cache);
    free(logits);
}
END_TEST

START_TEST(cached_forward_rejects_bad_calls)
{
    const um_model_config_t *c = um_model_config(s_model);
    const int32_t T = 16, E = c->embedding_size;
    int32_t ids[16];
    for (int32_t t = 0; t < T; t++)
        ids[t] = t + 10;
    float *logits = malloc((size_t)T * E * sizeof *logits);
    int32_t row = 9;
    um_kv_cache_t *cache = NULL;
    ck_assert_int_eq(um_kv_cache_new(s_model, 1, T, &cache), 0);

    /* A window before any whole-sequence pass would read unset rows. */
    ck_assert_int_eq(um_model_forward_cached(s_model, cache, ids, 1, T, 8, 8, &row, 1, logits),
                     UM_EINVAL);
    int32_t all[16];
    for (int32_t t = 0; t < T; t++)
        all[t] = t;
    ck_assert_int_eq(um_model_forward_cached(s_model, cache, ids, 1, T, 0, T, all, T, logits),
                     0);
    /* Rows outside the window, windows outside the sequence, a cache of another shape. */
    row = 3;
    ck_assert_int_eq(um_model_forward_cached(s_model, cache, ids, 1, T, 8, 8, &row, 1, logits),
                     UM_ERANGE);
    row = 9;
    ck_assert_int_eq(um_model_forward_cached(s_model, cache, ids, 1, T, 8, 9, &row, 1, logits),
                     UM_ERANGE);
    ck_assert_int_eq(um_model_forward_cached(s_model, cache, ids, 1, T, 8, 0, &row, 1, logits),
                     UM_ERANGE);
    ck_assert_int_eq(um_model_forward_cached(s_model, cache, ids, 1, T - 1, 8, 7, &row, 1,
                                             logits), UM_EINVAL);
    ck_assert_int_eq(um_model_forward_cached(s_model, NULL, ids, 1, T, 8, 8, &row, 1, logits),
                     UM_EINVAL);
    ck_assert_int_eq(um_model_forward_cached(s_model, cache, ids, 1, T, 8, 8, &row, 1, logits),
                     0);
    um_kv_cache_destroy(&cache);
    ck_assert_int_eq(um_kv_cache_new(s_model, 1, c->max_sequence_length + 1, &cache), UM_ERANGE);
    ck_assert_ptr_null(cache);
    um_kv_cache_destroy(&cache); /* a NULL cache is ignored */
    free(logits);
}
END_TEST

/* ------------------------------------------------------------------------- */
/* Generations                                                                */

static const um_remask_ops_t *s_policy(const char *name)
{
    const um_plugin_t *pl = um_plugins_find(&s_reg, UM_PLUGIN_REMASK, name);
    ck_assert_msg(pl != NULL, "remask plugin %s not loaded", name);
    return pl->desc->remask;
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

static int32_t *s_ids(json_t *arr, size_t *n)
{
    *n = json_array_size(arr);
    int32_t *ids = malloc((*n + 1) * sizeof *ids);
    for (size_t i = 0; i < *n; i++)
        ids[i] = (int32_t)json_integer_value(json_array_get(arr, i));
    return ids;
}

static int64_t s_int(json_t *c, const char *key)
{
    return json_integer_value(json_object_get(c, key));
}

/* A fixture case: its JSON, prompt, expected canvas and generation parameters. */
typedef struct s_cache_case {
    json_t *json;
    const char *name, *mode, *policy;
    int32_t *prompt, *expected;
    size_t n_prompt, n_expected;
    um_gen_params_t p; /* with its policy state begun */
} s_cache_case_t;

static void s_cache_case_load(int index, s_cache_case_t *k)
{
    json_t *c = json_array_get(s_cases, (size_t)index);
    ck_assert_msg(c != NULL, "cache.json has no case %d: regenerate with "
                  "tools/make_cache_fixtures.py", index);
    k->json = c;
    k->name = json_string_value(json_object_get(c, "name"));
    k->mode = json_string_value(json_object_get(c, "cache"));
    k->policy = json_string_value(json_object_get(c, "remasking"));
    k->prompt = s_ids(json_object_get(c, "prompt_ids"), &k->n_prompt);
    k->expected = s_ids(json_object_get(c, "canvas"), &k->n_expected);
    const um_remask_ops_t *ops = s_policy(k->policy);
    const char *schedule = json_string_value(json_object_get(c, "schedule"));
    k->p = (um_gen_params_t){
        .gen_length = (int32_t)s_int(c, "gen_length"),
        .block_length = (int32_t)s_int(c, "block_length"),
        .steps = (int32_t)s_int(c, "steps"),
        .temperature = json_number_value(json_object_get(c, "temperature")),
        .cfg_scale = json_number_value(json_object_get(c, "cfg_scale")),
        .seed = (uint64_t)s_int(c, "seed"),
        .remask = ops,
        .remask_state = s_begin(ops, json_object_get(c, "remasking_params"), k->name),
        .schedule = schedule ? (strcmp(schedule, "timestep") == 0 ? UM_SCHEDULE_TIMESTEP
                                                                  : UM_SCHEDULE_QUOTA)
                             : um_remask_traits(ops).schedule,
        .eps = UM_GEN_DEFAULT_EPS,
        .eot_id = -1,
        .early_stop = json_is_true(json_object_get(c, "early_stop")),
        .cache = strcmp(k->mode, "dual") == 0 ? UM_CACHE_DUAL : UM_CACHE_PREFIX,
    };
}

static void s_cache_case_free(s_cache_case_t *k)
{
    k->p.remask->request_end(k->p.remask_state);
    free(k->expected);
    free(k->prompt);
}

/* The canvas, forward passes, cached passes, early stop and cache size of a case. */
static void s_cache_case_assert(const s_cache_case_t *k, const int32_t *canvas,
                                const um_gen_stats_t *st, const char *how)
{
    json_t *c = k->json;
    for (size_t i = 0; i < k->n_expected; i++)
        ck_assert_msg(canvas[i] == k->expected[i], "%s (%s cache, %s, seed %d, %s): position "
                      "%zu is %d, the reference has %d", k->name, k->mode, k->policy,
                      (int)k->p.seed, how, i, canvas[i], k->expected[i]);
    ck_assert_msg(st->forward_passes == s_int(c, "forward_passes"), "%s (%s): %d forward "
                  "passes, the reference ran %lld", k->name, how, st->forward_passes,
                  (long long)s_int(c, "forward_passes"));
    ck_assert_msg(st->cached_passes == s_int(c, "cached_passes"), "%s (%s): %d cached passes, "
                  "the reference ran %lld", k->name, how, st->cached_passes,
                  (long long)s_int(c, "cached_passes"));
    ck_assert_int_eq(st->early_stop, json_is_true(json_object_get(c, "early_stopped")));
    ck_assert_int_eq(st->eos_position, s_int(c, "eos_position"));
    const um_model_config_t *cfg = um_model_config(s_model);
    ck_assert_int_eq(st->cache_bytes, 2 * (int64_t)cfg->n_layers * (k->p.cfg_scale > 0 ? 2 : 1)
                                          * (int64_t)k->n_expected * cfg->n_kv_heads *
                                          cfg->head_dim * 4);
}

/* A fixture case, token for token, with its forward passes and cached passes. */
START_TEST(cached_generation_matches_reference)
{
    s_cache_case_t k;
    s_cache_case_load(_i, &k);
    int32_t *canvas = malloc(k.n_expected * sizeof *canvas);
    char err[512] = "";
    um_gen_stats_t st;
    int rc = um_generate(s_model, k.prompt, (int32_t)k.n_prompt, &k.p, NULL, NULL, canvas, &st,
                         err, sizeof err);
    ck_assert_msg(rc == 0, "%s: %s", k.name, err);
    s_cache_case_assert(&k, canvas, &st, "alone");
    free(canvas);
    s_cache_case_free(&k);
}
END_TEST

/* Cases per batch in cached_batch_matches_reference. Group g: cases g, g + G, ... */
#define S_BATCH 4

/*
 * Cached generations in one batch, each with its own cache and window in the shared
 * pass, give the reference's canvases, passes and cached passes. Each case keeps its
 * decisions farther from a tie than the reference's logits differ from ours
 * (tools/make_cache_fixtures.py), and the shared pass differs from a lone one by f32
 * rounding only (parts_match_separate_calls), so no token may change. Every second
 * member runs without a cache, so cached and uncached parts share passes too. Those
 * members are checked against the uncached run of the same case.
 */
START_TEST(cached_batch_matches_reference)
{
    const int n_cases = (int)json_array_size(s_cases);
    const int G = (n_cases + S_BATCH - 1) / S_BATCH;
    s_cache_case_t k[S_BATCH];
    int32_t *canvas[S_BATCH], *uncached[S_BATCH];
    um_gen_t *gens[S_BATCH];
    char err[512] = "";
    int n = 0;
    for (int idx = _i; idx < n_cases && n < S_BATCH; idx += G, n++) {
        s_cache_case_load(idx, &k[n]);
        canvas[n] = malloc(k[n].n_expected * sizeof *canvas[n]);
        uncached[n] = NULL;
        if (n % 2) {
            /* This member runs uncached: its expected canvas is its lone uncached run. */
            k[n].p.cache = UM_CACHE_NONE;
            uncached[n] = malloc(k[n].n_expected * sizeof *uncached[n]);
            ck_assert_int_eq(um_generate(s_model, k[n].prompt, (int32_t)k[n].n_prompt, &k[n].p,
                                         NULL, NULL, uncached[n], NULL, err, sizeof err), 0);
            k[n].p.remask->request_end(k[n].p.remask_state);
            k[n].p.remask_state = s_begin(k[n].p.remask,
                                          json_object_get(k[n].json, "remasking_params"),
                                          k[n].name);
        }
        ck_assert_msg(um_gen_begin(s_model, k[n].prompt, (int32_t)k[n].n_prompt, &k[n].p, NULL,
                                   NULL, canvas[n], &gens[n], err, sizeof err) == 0, "%s: %s",
                      k[n].name, err);
    }
    um_test_step_batch_to_end(gens, n);
    for (int j = 0; j < n; j++) {
        um_gen_stats_t st;
        ck_assert_msg(um_gen_end(&gens[j], &st, err, sizeof err) == 0, "%s: %s", k[j].name,
                      err);
        ck_assert_int_eq(st.batch_size, n);
        if (uncached[j]) {
            for (size_t i = 0; i < k[j].n_expected; i++)
                ck_assert_msg(canvas[j][i] == uncached[j][i], "%s (uncached, batched): "
                              "position %zu is %d, alone %d", k[j].name, i, canvas[j][i],
                              uncached[j][i]);
            ck_assert_int_eq(st.cached_passes, 0);
        } else {
            s_cache_case_assert(&k[j], canvas[j], &st, "batched");
        }
        free(uncached[j]);
        free(canvas[j]);
        s_cache_case_free(&k[j]);
    }
}
END_TEST

/* The fixture must cover both modes, guidance, sampling and a case that differs from
   the uncached canvas, so the checks above can fail on a cache that is never read. */
START_TEST(fixture_covers_modes)
{
    int prefix = 0, dual = 0, cfg = 0, hot = 0, differs = 0;
    size_t i;
    json_t *c;
    json_array_foreach(s_cases, i, c) {
        const char *mode = json_string_value(json_object_get(c, "cache"));
        prefix += strcmp(mode, "prefix") == 0;
        dual += strcmp(mode, "dual") == 0;
        cfg += json_number_value(json_object_get(c, "cfg_scale")) > 0;
        hot += json_number_value(json_object_get(c, "temperature")) > 0;
        differs += !json_is_true(json_object_get(c, "matches_uncached"));
    }
    ck_assert_int_ge(prefix, 4);
    ck_assert_int_ge(dual, 4);
    ck_assert_int_ge(cfg, 2);
    ck_assert_int_ge(hot, 2);
    ck_assert_int_ge(differs, 2);
}
END_TEST

START_TEST(cache_rejects_prompt_masks)
{
    const um_model_config_t *c = um_model_config(s_model);
    const um_remask_ops_t *ops = s_policy("low_confidence");
    void *state = s_begin(ops, NULL, "low_confidence");
    const int32_t prompt[] = {397, c->mask_token_id, 258, 2054};
    um_gen_params_t p = {.gen_length = 8, .block_length = 4, .steps = 8, .remask = ops,
                         .remask_state = state, .eot_id = -1, .cache = UM_CACHE_DUAL};
    int32_t canvas[12];
    char err[512] = "";
    um_gen_stats_t st;
    ck_assert_int_eq(um_generate(s_model, prompt, 4, &p, NULL, NULL, canvas, &st, err,
                                 sizeof err), UM_EINVAL);
    ck_assert_msg(strstr(err, "cache dual") && strstr(err, "1 mask token")
                  && strstr(err, "use cache none"), "unexpected message: %s", err);
    p.cache = UM_CACHE_NONE;
    ck_assert_int_eq(um_generate(s_model, prompt, 4, &p, NULL, NULL, canvas, &st, err,
                                 sizeof err), 0);
    ck_assert_int_eq(st.cache_bytes, 0);
    ck_assert_int_eq(st.cached_passes, 0);

    const char *field = NULL;
    p.cache = (um_cache_mode_t)7;
    ck_assert_int_eq(um_gen_check(c, 4, &p, &field, err, sizeof err), UM_EINVAL);
    ck_assert_str_eq(field, "cache");
    ck_assert_str_eq(um_cache_mode_name(UM_CACHE_PREFIX), "prefix");
    ck_assert_str_eq(um_cache_mode_name(UM_CACHE_DUAL), "dual");
    ck_assert_str_eq(um_cache_mode_name(UM_CACHE_NONE), "none");
    ops->request_end(state);
}
END_TEST

/* ------------------------------------------------------------------------- */
/* Requests                                                                   */

/* Parse a request; returns 0 or -1 with err filled. */
static int s_parse(const char *text, um_request_t *req, um_req_error_t *err)
{
    memset(req, 0, sizeof *req);
    return um_request_parse(text, strlen(text), req, err);
}

START_TEST(request_parses_cache)
{
    um_request_t req;
    um_req_error_t err;
    const char *names[] = {"none", "prefix", "dual"};
    const um_req_cache_t modes[] = {UM_REQ_CACHE_NONE, UM_REQ_CACHE_PREFIX, UM_REQ_CACHE_DUAL};
    char text[160];
    for (int i = 0; i < 3; i++) {
        snprintf(text, sizeof text, "{\"op\":\"generate\",\"id\":1,\"prompt\":\"a\","
                 "\"cache\":\"%s\"}", names[i]);
        ck_assert_int_eq(s_parse(text, &req, &err), 0);
        ck_assert_int_eq(req.cache, modes[i]);
        ck_assert_int_eq((int)modes[i], i == 0   ? UM_CACHE_NONE
                                        : i == 1 ? UM_CACHE_PREFIX
                                                 : UM_CACHE_DUAL);
        um_request_clear(&req);
    }
    ck_assert_int_eq(s_parse("{\"op\":\"generate\",\"id\":1,\"prompt\":\"a\"}", &req, &err),
                     0);
    ck_assert_int_eq(req.cache, UM_REQ_CACHE_NONE);
    um_request_clear(&req);

    ck_assert_int_eq(s_parse("{\"op\":\"generate\",\"id\":1,\"prompt\":\"a\","
                             "\"cache\":\"duall\"}", &req, &err), -1);
    ck_assert_str_eq(err.field, "cache");
    ck_assert_msg(strstr(err.message, "\"duall\"") && strstr(err.message, "did you mean dual")
                  && strstr(err.message, "use none"), "unexpected message: %s", err.message);
    um_request_clear(&req);
    ck_assert_int_eq(s_parse("{\"op\":\"generate\",\"id\":1,\"prompt\":\"a\","
                             "\"cache\":true}", &req, &err), -1);
    ck_assert_str_eq(err.field, "cache");
    um_request_clear(&req);
    /* A score request runs single passes over fixed canvases: no cache field. */
    ck_assert_int_eq(s_parse("{\"op\":\"score\",\"id\":1,\"prompt\":\"a\","
                             "\"answer\":\"b\",\"cache\":\"dual\"}", &req, &err), -1);
    ck_assert_str_eq(err.code, UM_ERR_UNKNOWN_FIELD);
    um_request_clear(&req);
}
END_TEST

/* Send one request and return the final reply (done or error), skipping step replies. */
static json_t *s_final_reply(void *sock, const char *text)
{
    json_error_t jerr;
    json_t *msg = json_loads(text, 0, &jerr);
    ck_assert_msg(msg != NULL, "bad test request %s: %s", text, jerr.text);
    um_test_send_json(sock, msg);
    for (;;) {
        json_t *r = um_test_recv(sock, 120000);
        ck_assert_msg(r != NULL, "no reply to %s", text);
        const char *type = json_string_value(json_object_get(r, "type"));
        if (strcmp(type, UM_REPLY_DONE) == 0 || strcmp(type, UM_REPLY_ERROR) == 0)
            return r;
        json_decref(r);
    }
}

START_TEST(daemon_reports_cache)
{
    um_test_daemon_t d;
    ck_assert_msg(um_test_daemon_spawn(&d, "cache", NULL) == 0, "cannot start %s",
                  um_test_env("UM_TEST_DAEMON"));
    ck_assert_msg(um_test_daemon_wait_ready(&d, 60000) == 0, "unmaskd did not start: see %s",
                  d.log);
    void *ctx = zmq_ctx_new();
    void *sock = um_test_dealer(ctx, d.endpoint);

    json_t *r = s_final_reply(sock, "{\"op\":\"generate\",\"id\":\"c1\",\"prompt\":"
                              "\"once upon a time\",\"gen_length\":16,\"block_length\":8,"
                              "\"steps\":16,\"cache\":\"dual\"}");
    ck_assert_str_eq(json_string_value(json_object_get(r, "type")), UM_REPLY_DONE);
    json_t *st = json_object_get(r, "stats");
    ck_assert_str_eq(json_string_value(json_object_get(st, "cache")), "dual");
    ck_assert_int_eq(json_integer_value(json_object_get(st, "cached_passes")), 14);
    ck_assert_int_gt(json_integer_value(json_object_get(st, "cache_bytes")), 0);
    json_decref(r);

    r = s_final_reply(sock, "{\"op\":\"generate\",\"id\":\"c2\",\"prompt\":\"a\","
                      "\"gen_length\":8}");
    st = json_object_get(r, "stats");
    ck_assert_str_eq(json_string_value(json_object_get(st, "cache")), "none");
    ck_assert_int_eq(json_integer_value(json_object_get(st, "cached_passes")), 0);
    ck_assert_int_eq(json_integer_value(json_object_get(st, "cache_bytes")), 0);
    json_decref(r);

    r = s_final_reply(sock, "{\"op\":\"generate\",\"id\":\"c3\",\"prompt\":\"a\","
                      "\"cache\":\"full\"}");
    ck_assert_str_eq(json_string_value(json_object_get(r, "type")), UM_REPLY_ERROR);
    json_t *e = json_object_get(r, "error");
    ck_assert_str_eq(json_string_value(json_object_get(e, "field")), "cache");
    ck_assert_ptr_nonnull(strstr(json_string_value(json_object_get(e, "message")), "\"full\""));
    json_decref(r);

    r = s_final_reply(sock, "{\"op\":\"generate\",\"id\":\"c4\",\"prompt\":"
                      "\"once upon a <|mdm_mask|> there\",\"gen_length\":8,"
                      "\"cache\":\"prefix\"}");
    ck_assert_str_eq(json_string_value(json_object_get(r, "type")), UM_REPLY_ERROR);
    e = json_object_get(r, "error");
    ck_assert_str_eq(json_string_value(json_object_get(e, "field")), "cache");
    const char *msg = json_string_value(json_object_get(e, "message"));
    ck_assert_msg(strstr(msg, "1 mask token") && strstr(msg, "\"none\""), "message: %s", msg);
    json_decref(r);

    zmq_close(sock);
    zmq_ctx_term(ctx);
    ck_assert_int_eq(um_test_daemon_stop(&d, 10000), 0);
}
END_TEST

/* The number of fixture cases, read when the suite is built; 1 when unreadable so the
   first case's lookup fails with the reason. */
static int s_count_cases(void)
{
    const char *dir = getenv("UM_TEST_FIXTURES");
    if (!dir)
        return 1;
    json_t *doc = json_load_file(um_test_path(dir, "cache.json"), 0, NULL);
    int n = (int)json_array_size(json_object_get(doc, "cases"));
    json_decref(doc);
    return n > 0 ? n : 1;
}

Suite *um_cache_suite(void)
{
    Suite *s = suite_create("cache");
    TCase *tc = tcase_create("forward");
    tcase_set_timeout(tc, 120);
    tcase_add_loop_test(tc, fresh_cache_equals_uncached, 0, S_N_MODELS);
    tcase_add_loop_test(tc, parts_match_separate_calls, 0, S_N_MODELS);
    suite_add_tcase(s, tc);
    tc = tcase_create("generate");
    tcase_add_unchecked_fixture(tc, s_setup, s_teardown);
    tcase_set_timeout(tc, 300);
    tcase_add_test(tc, cached_forward_rejects_bad_calls);
    tcase_add_test(tc, parts_reject_bad_calls);
    tcase_add_loop_test(tc, cached_generation_matches_reference, 0, s_count_cases());
    tcase_add_loop_test(tc, cached_batch_matches_reference, 0,
                        (s_count_cases() + S_BATCH - 1) / S_BATCH);
    tcase_add_test(tc, fixture_covers_modes);
    tcase_add_test(tc, cache_rejects_prompt_masks);
    suite_add_tcase(s, tc);
    tc = tcase_create("request");
    tcase_set_timeout(tc, 120);
    tcase_add_test(tc, request_parses_cache);
    tcase_add_test(tc, daemon_reports_cache);
    suite_add_tcase(s, tc);
    return s;
}
