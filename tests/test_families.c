/*
 * Model family suite: tiny random-weight checkpoints of Dream, BERT and DistilBERT
 * (tests/fixtures/families, written by tools/make_family_fixtures.py) load from their
 * Hugging Face layouts and give the logits of the PyTorch reference in
 * tools/families_ref.py; plus the config errors each family can raise. The bundled
 * DistilBERT model (models/tinystories-distilbert) is checked the same way against
 * reference logits in tests/fixtures/families/tinystories-distilbert.
 */
#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <unmaskd/error.h>

#include "generate.h"
#include "model.h"
#include "plugins.h"
#include "testutil.h"

/* The last entry is the bundled DistilBERT model, whose case.json names its folder. */
static const char *const s_families[] = {"dream", "bert", "distilbert",
                                         "tinystories-distilbert"};
#define S_N_FAMILIES (int)(sizeof s_families / sizeof s_families[0])

static const char *s_family_dir(const char *name)
{
    static char dir[4096];
    snprintf(dir, sizeof dir, "%s/families/%s", um_test_env("UM_TEST_FIXTURES"), name);
    return dir;
}

/* The fixture's ids (n_seq, seq_len) and reference logits; the caller frees both. */
static void s_read_case(const char *dir, int32_t **ids, int32_t *n_seq, int32_t *seq_len,
                        float **logits, int32_t *vocab)
{
    json_error_t jerr;
    json_t *c = json_load_file(um_test_path(dir, "case.json"), 0, &jerr);
    ck_assert_msg(c != NULL, "%s/case.json: %s (run tools/make_family_fixtures.py)", dir,
                  jerr.text);
    json_t *shape = json_object_get(c, "shape"), *rows = json_object_get(c, "ids");
    *n_seq = (int32_t)json_integer_value(json_array_get(shape, 0));
    *seq_len = (int32_t)json_integer_value(json_array_get(shape, 1));
    *vocab = (int32_t)json_integer_value(json_array_get(shape, 2));
    *ids = malloc((size_t)*n_seq * *seq_len * sizeof **ids);
    for (int32_t s = 0; s < *n_seq; s++)
        for (int32_t t = 0; t < *seq_len; t++)
            (*ids)[s * *seq_len + t] =
                (int32_t)json_integer_value(json_array_get(json_array_get(rows, s), t));
    json_decref(c);

    size_t n = (size_t)*n_seq * *seq_len * *vocab, len = 0;
    char *raw = um_test_read_file(um_test_path(dir, "logits.bin"), &len);
    ck_assert_msg(raw && len == n * sizeof(float), "%s/logits.bin has %zu bytes, expected %zu",
                  dir, len, n * sizeof(float));
    *logits = (float *)raw;
}

/* The model folder of a logits case: the fixture folder itself, or the folder its
 * case.json names relative to the source tree. */
static const char *s_case_model_dir(const char *dir)
{
    static char model_dir[4096];
    json_t *c = json_load_file(um_test_path(dir, "case.json"), 0, NULL);
    const char *model = json_string_value(json_object_get(c, "model"));
    if (model)
        snprintf(model_dir, sizeof model_dir, "%s/%s", um_test_env("UM_TEST_SRCDIR"), model);
    else
        snprintf(model_dir, sizeof model_dir, "%s", dir);
    json_decref(c);
    return model_dir;
}

static um_model_t *s_load(const char *dir, um_wdtype_t dtype)
{
    char err[1024] = "";
    um_model_t *m = NULL;
    um_model_options_t opts = {.weight_dtype = dtype};
    int rc = um_model_load_opts(dir, &opts, &m, err, sizeof err);
    ck_assert_msg(rc == 0, "loading %s failed: %s", dir, err);
    return m;
}

START_TEST(family_logits_match_reference)
{
    const char *name = s_families[_i];
    const char *dir = s_family_dir(name);
    int32_t *ids, n_seq, L, V;
    float *expected;
    s_read_case(dir, &ids, &n_seq, &L, &expected, &V);

    um_model_t *m = s_load(s_case_model_dir(dir), UM_WDTYPE_F32);
    const um_model_config_t *c = um_model_config(m);
    ck_assert_int_eq(c->embedding_size, V);
    size_t n = (size_t)n_seq * L * V;
    float *logits = malloc(n * sizeof *logits);
    int rc = um_model_forward(m, ids, n_seq, L, logits);
    ck_assert_msg(rc == 0, "%s forward returned %s", name, um_error_name(rc));

    double max_diff = 0;
    for (size_t i = 0; i < n; i++) {
        double diff = fabs((double)logits[i] - expected[i]);
        if (diff > max_diff)
            max_diff = diff;
        /* f32 sums taken in another order than PyTorch's differ by about 1e-6 relative
         * per product; through two blocks and a head on logits up to 21 that stays below
         * 1e-4, so 1e-3 leaves margin and still catches any wrong op. The bundled model
         * (four blocks, MLP width 1024, logits up to 17) has bf16 weights that widen
         * exactly to f32 on both sides, so it differs only by that order too: 1.3e-5 on
         * this AVX2 host. */
        ck_assert_msg(diff <= 1e-3, "%s logit %zu (position %zu, token %zu): got %.6f, "
                      "expected %.6f", name, i, i / V, i % V, logits[i], expected[i]);
    }
    /* The greedy choice must agree at every position. */
    for (size_t p = 0; p < (size_t)n_seq * L; p++) {
        size_t a = 0, b = 0;
        for (size_t v = 1; v < (size_t)V; v++) {
            if (logits[p * V + v] > logits[p * V + a])
                a = v;
            if (expected[p * V + v] > expected[p * V + b])
                b = v;
        }
        ck_assert_msg(a == b, "%s position %zu: argmax %zu, reference %zu", name, p, a, b);
    }
    printf("%s: max |logit - reference| = %.2e\n", name, max_diff);

    /* Rows of the head alone equal the same rows of the full pass; for Dream this also
     * checks the shift (row p reads hidden state p - 1, the first row of a sequence its
     * own). */
    int32_t rows[] = {0, 1, L - 1, L, L + 5};
    float *part = malloc(5 * (size_t)V * sizeof *part);
    rc = um_model_forward_rows(m, ids, n_seq, L, rows, 5, part);
    ck_assert_int_eq(rc, 0);
    for (int r = 0; r < 5; r++)
        for (int32_t v = 0; v < V; v++)
            ck_assert_msg(fabs(part[(size_t)r * V + v] - logits[(size_t)rows[r] * V + v]) <= 1e-4,
                          "%s row %d token %d: rows pass %.6f, full pass %.6f", name, rows[r],
                          v, part[(size_t)r * V + v], logits[(size_t)rows[r] * V + v]);
    free(part);

    /* Sequences of different lengths in one pass: learned positions (BERT) and the
     * shift (Dream) restart with each sequence. The tolerance is the rows check's. */
    um_test_check_ragged(m, ids, n_seq, L, 1e-4, name);
    free(logits);
    free(expected);
    free(ids);
    um_model_destroy(&m);
}
END_TEST

/*
 * Generations of tools/make_family_generations.py through um_generate: the family's
 * framing (um_model_framing), its never-sampled tokens, guidance and sampling, token for
 * token. The fixture keeps only cases whose closest decision clears the margin that f32
 * rounding differences between the engines could cross.
 */
static const char *const s_generation_sets[] = {"dream", "bert", "distilbert",
                                                "tinystories-distilbert"};
#define S_N_GENERATION_SETS (int)(sizeof s_generation_sets / sizeof s_generation_sets[0])

static int32_t *s_json_ids(const json_t *arr, size_t *n)
{
    *n = json_array_size(arr);
    int32_t *ids = malloc((*n + 1) * sizeof *ids);
    for (size_t i = 0; i < *n; i++)
        ids[i] = (int32_t)json_integer_value(json_array_get(arr, i));
    return ids;
}

START_TEST(family_generation_matches_reference)
{
    const char *set = s_generation_sets[_i];
    const char *dir = s_family_dir(set);
    json_error_t jerr;
    json_t *doc = json_load_file(um_test_path(dir, "generate.json"), 0, &jerr);
    ck_assert_msg(doc != NULL, "%s/generate.json: %s (run tools/make_family_generations.py)",
                  dir, jerr.text);
    /* Random-weight fixtures sit in their own folder; the bundled model in models/. */
    char model_dir[4096];
    const char *model = json_string_value(json_object_get(doc, "model"));
    if (strncmp(model, "tests/fixtures/", 15) == 0)
        snprintf(model_dir, sizeof model_dir, "%s", dir);
    else
        snprintf(model_dir, sizeof model_dir, "%s/../../%s", um_test_env("UM_TEST_FIXTURES"),
                 model);

    um_plugin_registry_t reg = {0};
    ck_assert_uint_ge(um_plugins_scan(&reg, um_test_env("UM_TEST_PLUGINS")), 1);
    const um_plugin_t *pl = um_plugins_find(&reg, UM_PLUGIN_REMASK, "low_confidence");
    ck_assert_ptr_nonnull(pl);
    const um_remask_ops_t *ops = pl->desc->remask;
    um_model_t *m = s_load(model_dir, UM_WDTYPE_F32);
    const um_model_config_t *cfg = um_model_config(m);
    int32_t prefix, suffix;
    um_model_framing(cfg, &prefix, &suffix);

    size_t i;
    json_t *c;
    json_array_foreach(json_object_get(doc, "cases"), i, c) {
        const char *name = json_string_value(json_object_get(c, "name"));
        size_t n_prompt, n_expected, n_suffix;
        int32_t *prompt = s_json_ids(json_object_get(c, "prompt_ids"), &n_prompt);
        int32_t *expected = s_json_ids(json_object_get(c, "canvas"), &n_expected);
        int32_t *want_suffix = s_json_ids(json_object_get(c, "suffix"), &n_suffix);
        /* The reference framed the prompt as the daemon does. */
        ck_assert_int_eq(n_suffix, suffix >= 0 ? 1 : 0);
        if (suffix >= 0)
            ck_assert_int_eq(want_suffix[0], suffix);
        if (prefix >= 0)
            ck_assert_int_eq(prompt[0], prefix);

        void *state = NULL;
        char err[512] = "";
        um_param_t checked[8];
        ck_assert_int_eq(um_params_check(ops->params, ops->n_params, NULL, 0, checked, err,
                                         sizeof err), 0);
        ck_assert_int_eq(ops->request_begin(um_plugin_host(), checked, ops->n_params, &state,
                                            err, sizeof err), 0);
        um_gen_params_t p = {
            .gen_length = (int32_t)json_integer_value(json_object_get(c, "gen_length")),
            .block_length = (int32_t)json_integer_value(json_object_get(c, "block_length")),
            .steps = (int32_t)json_integer_value(json_object_get(c, "steps")),
            .temperature = json_number_value(json_object_get(c, "temperature")),
            .cfg_scale = json_number_value(json_object_get(c, "cfg_scale")),
            .seed = (uint64_t)json_integer_value(json_object_get(c, "seed")),
            .remask = ops,
            .remask_state = state,
            .schedule = um_remask_traits(ops).schedule,
            .eot_id = -1,
            .suffix = &suffix,
            .n_suffix = suffix >= 0 ? 1 : 0,
        };
        ck_assert_uint_eq(n_expected, n_prompt + (size_t)p.gen_length);
        int32_t *canvas = malloc((n_expected + 1) * sizeof *canvas);
        um_gen_stats_t st;
        int rc = um_generate(m, prompt, (int32_t)n_prompt, &p, NULL, NULL, canvas, &st, err,
                             sizeof err);
        ops->request_end(state);
        ck_assert_msg(rc == 0, "%s %s: %s", set, name, err);
        for (size_t k = 0; k < n_expected; k++)
            ck_assert_msg(canvas[k] == expected[k], "%s %s: position %zu is %d, the reference "
                          "has %d", set, name, k, canvas[k], expected[k]);
        if (suffix >= 0)
            ck_assert_int_eq(canvas[n_expected], suffix);
        ck_assert_int_eq(st.forward_passes,
                         (int)json_integer_value(json_object_get(c, "forward_passes")));
        free(canvas);
        free(prompt);
        free(expected);
        free(want_suffix);
    }
    um_model_destroy(&m);
    um_plugins_clear(&reg);
    json_decref(doc);
}
END_TEST

/* The BERT family never predicts [MASK], [CLS] or [PAD]; Dream only never the mask. */
START_TEST(family_never_sampled)
{
    um_model_t *m = s_load(s_family_dir("bert"), UM_WDTYPE_F32);
    const um_model_config_t *c = um_model_config(m);
    int32_t ids[UM_MODEL_MAX_NEVER_SAMPLED], prefix, suffix;
    ck_assert_int_eq(um_model_never_sampled(c, ids), 3);
    ck_assert_int_eq(ids[0], c->mask_token_id);
    ck_assert_int_eq(ids[1], c->cls_token_id);
    ck_assert_int_eq(ids[2], c->pad_token_id);
    um_model_framing(c, &prefix, &suffix);
    ck_assert_int_eq(prefix, c->cls_token_id);
    ck_assert_int_eq(suffix, c->sep_token_id);
    ck_assert_int_eq(c->eos_token_id, c->sep_token_id);
    um_model_destroy(&m);

    m = s_load(s_family_dir("dream"), UM_WDTYPE_F32);
    c = um_model_config(m);
    ck_assert_int_eq(um_model_never_sampled(c, ids), 1);
    ck_assert_int_eq(ids[0], c->mask_token_id);
    um_model_framing(c, &prefix, &suffix);
    ck_assert_int_eq(prefix, -1);
    ck_assert_int_eq(suffix, -1);
    um_model_destroy(&m);
}
END_TEST

START_TEST(family_config_fields)
{
    um_model_t *m = s_load(s_family_dir("dream"), UM_WDTYPE_F32);
    const um_model_config_t *c = um_model_config(m);
    ck_assert_int_eq(c->arch, UM_ARCH_DREAM);
    ck_assert_int_eq(c->n_kv_heads, 2);
    ck_assert_int_eq(c->logits_shift, 1);
    ck_assert_int_eq(c->qkv_bias, 1);
    ck_assert_int_eq(c->mask_token_id, 96);
    ck_assert_str_eq(um_model_dtype(m), "bf16");
    um_model_destroy(&m);

    /* BERT's config has no mask id: [MASK], [CLS] and [SEP] come from vocab.txt. */
    m = s_load(s_family_dir("bert"), UM_WDTYPE_F32);
    c = um_model_config(m);
    ck_assert_int_eq(c->arch, UM_ARCH_BERT);
    ck_assert_int_eq(c->mask_token_id, 4);
    ck_assert_int_eq(c->cls_token_id, 2);
    ck_assert_int_eq(c->sep_token_id, 3);
    ck_assert_int_eq(c->eos_token_id, 3);
    ck_assert_int_eq(c->pad_token_id, 0);
    ck_assert_int_eq(c->activation, UM_ACT_GELU_ERF);
    ck_assert_int_eq(c->post_norm, 1);
    ck_assert_int_eq(c->rope, 0);
    um_model_destroy(&m);

    m = s_load(s_family_dir("distilbert"), UM_WDTYPE_F32);
    c = um_model_config(m);
    ck_assert_int_eq(c->arch, UM_ARCH_DISTILBERT);
    ck_assert_int_eq(c->activation, UM_ACT_GELU_TANH);
    ck_assert_float_eq(c->rms_norm_eps, 1e-12f);
    um_model_destroy(&m);
}
END_TEST

/* ------------------------------------------------------------------------- */
/* Config errors                                                              */

static char s_tmp[4096];

static void s_tmp_setup(void)
{
    const char *base = getenv("TMPDIR");
    snprintf(s_tmp, sizeof s_tmp, "%s/um-families-XXXXXX", base && *base ? base : "/tmp");
    ck_assert_ptr_nonnull(mkdtemp(s_tmp));
}

static void s_tmp_teardown(void)
{
    const char *files[] = {"config.json", "model.safetensors", "vocab.txt"};
    for (size_t i = 0; i < 3; i++)
        unlink(um_test_path(s_tmp, files[i]));
    rmdir(s_tmp);
}

/* Copy a family fixture into s_tmp with one change to its config.json. */
static void s_copy_with(const char *family, const char *field, json_t *value, int keep_vocab)
{
    const char *dir = s_family_dir(family);
    char from[4200];
    snprintf(from, sizeof from, "%s/model.safetensors", dir);
    ck_assert_int_eq(symlink(from, um_test_path(s_tmp, "model.safetensors")), 0);
    if (keep_vocab) {
        snprintf(from, sizeof from, "%s/vocab.txt", dir);
        ck_assert_int_eq(symlink(from, um_test_path(s_tmp, "vocab.txt")), 0);
    }
    json_t *cfg = json_load_file(um_test_path(dir, "config.json"), 0, NULL);
    ck_assert_ptr_nonnull(cfg);
    if (field)
        json_object_set_new(cfg, field, value);
    ck_assert_int_eq(json_dump_file(cfg, um_test_path(s_tmp, "config.json"), 0), 0);
    json_decref(cfg);
}

static void s_expect_load_error(int code, const char *needle1, const char *needle2)
{
    char err[1024] = "";
    um_model_t *m = NULL;
    int rc = um_model_load(s_tmp, &m, err, sizeof err);
    ck_assert_msg(rc == code, "um_model_load returned %s, expected %s (message: %s)",
                  um_error_name(rc), um_error_name(code), err);
    ck_assert_ptr_null(m);
    ck_assert_msg(strstr(err, needle1) && strstr(err, needle2),
                  "message \"%s\" does not mention \"%s\" and \"%s\"", err, needle1, needle2);
}

START_TEST(bert_without_mask_token)
{
    /* No vocab.txt beside the checkpoint and no mask_token_id in config.json. */
    s_copy_with("bert", NULL, NULL, 0);
    s_expect_load_error(UM_EFORMAT, "[MASK]", "mask_token_id");
}
END_TEST

START_TEST(bert_unknown_activation)
{
    s_copy_with("bert", "hidden_act", json_string("relu"), 1);
    s_expect_load_error(UM_EUNSUPPORTED, "\"relu\"", "hidden_act");
}
END_TEST

START_TEST(dream_missing_layer)
{
    /* The config claims a layer the checkpoint does not store: the first missing tensor
     * is named. */
    s_copy_with("dream", "num_hidden_layers", json_integer(3), 0);
    s_expect_load_error(UM_ENOTFOUND, "model.layers.2.", "config.json");
}
END_TEST

START_TEST(distilbert_wrong_dim)
{
    s_copy_with("distilbert", "dim", json_integer(64), 1);
    s_expect_load_error(UM_EFORMAT, "has shape", "distilbert.embeddings.word_embeddings.weight");
}
END_TEST

Suite *um_families_suite(void)
{
    Suite *s = suite_create("families");
    TCase *tc = tcase_create("reference");
    tcase_set_timeout(tc, 60);
    tcase_add_loop_test(tc, family_logits_match_reference, 0, S_N_FAMILIES);
    tcase_add_test(tc, family_config_fields);
    tcase_add_test(tc, family_never_sampled);
    suite_add_tcase(s, tc);

    tc = tcase_create("generation");
    tcase_set_timeout(tc, 120);
    tcase_add_loop_test(tc, family_generation_matches_reference, 0, S_N_GENERATION_SETS);
    suite_add_tcase(s, tc);

    tc = tcase_create("errors");
    tcase_set_timeout(tc, 30);
    tcase_add_checked_fixture(tc, s_tmp_setup, s_tmp_teardown);
    tcase_add_test(tc, bert_without_mask_token);
    tcase_add_test(tc, bert_unknown_activation);
    tcase_add_test(tc, dream_missing_layer);
    tcase_add_test(tc, distilbert_wrong_dim);
    suite_add_tcase(s, tc);
    return s;
}
