/*
 * policy-bench: every remasking policy on one fixed prompt set, at comparable settings,
 * without the daemon. For each policy, and a few parameter variants, it runs every
 * prompt. It reports the forward passes per generation, the generated tokens per
 * forward pass, and the wall time per generated token: the median over the prompts of
 * total generation time / gen_length. All runs share gen_length, block_length, steps,
 * temperature and seed, so a policy that commits several tokens per step shows fewer
 * passes and less time per token.
 *
 * Prints a table, or one JSON object per policy with --json.
 */
#include <getopt.h>
#include <math.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "generate.h"
#include "kernels.h"
#include "log.h"
#include "model.h"
#include "plugins.h"
#include "tokenizer.h"

/* The fixed prompt set: TinyStories openings, in the bundled model's lower case. */
static const char *const s_prompts[] = {
    "once upon a time, there was a little girl named lily. she",
    "one day, a little boy named tim went to the park. he",
    "the cat sat on the mat and looked at the bird.",
    "mom said, \"we are going to the beach today!\"",
    "the big red ball rolled down the hill and",
    "sam had a toy car. he loved it very much, but one day",
    "the sun was shining and the flowers were",
    "there was a friendly dog who liked to",
};
#define S_N_PROMPTS (sizeof s_prompts / sizeof s_prompts[0])

/* A policy run: the plugin, one optional numeric parameter, and a label. */
typedef struct s_variant {
    const char *policy;
    const char *param; /* NULL: defaults */
    double value;
} s_variant_t;

static const s_variant_t s_variants[] = {
    {"low_confidence", NULL, 0},
    {"random", NULL, 0},
    {"maskgit_plus", NULL, 0},
    {"topk_margin", NULL, 0},
    {"entropy", NULL, 0},
    {"origin", NULL, 0},
    {"threshold", "threshold", 0.9},
    {"threshold", "threshold", 0.5},
    {"factor", "factor", 1.0},
    {"eb_sampler", "gamma", 0.01},
    {"eb_sampler", "gamma", 0.1},
    {"eb_sampler", "gamma", 1.0},
};
#define S_N_VARIANTS (sizeof s_variants / sizeof s_variants[0])

static int s_cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static void s_usage(FILE *out)
{
    fprintf(out,
            "usage: policy-bench [options]\n"
            "  --model DIR         model folder (default models/tinystories)\n"
            "  --plugin-dir DIR    folder with the policy and tokenizer plugins\n"
            "                      (default build-plugins)\n"
            "  --gen-length N      generated tokens per prompt (default 64)\n"
            "  --block-length N    block length (default 32)\n"
            "  --steps N           denoising steps, an upper bound for adaptive policies\n"
            "                      (default: gen-length)\n"
            "  --temperature T     sampling temperature (default 0)\n"
            "  --schedule NAME     quota or timestep for every policy (default: each\n"
            "                      policy's own)\n"
            "  --policy NAME       run only this policy's variants (default: all)\n"
            "  --threads N         OpenMP threads (default: OpenMP's choice)\n"
            "  --json              one JSON object per policy instead of the table\n");
}

/* Begin a request of ops with at most one parameter; returns 0 or the plugin's code. */
static int s_begin(const um_remask_ops_t *ops, const s_variant_t *v, void **state, char *err,
                   size_t errlen)
{
    um_param_t in = {.name = v->param, .type = UM_PARAM_NUMBER, .number = v->value};
    um_param_t *checked = calloc((size_t)ops->n_params + 1, sizeof *checked);
    if (!checked)
        return UM_ENOMEM;
    int rc = um_params_check(ops->params, ops->n_params, &in, v->param ? 1 : 0, checked, err,
                             errlen);
    if (rc == 0)
        rc = ops->request_begin(um_plugin_host(), checked, ops->n_params, state, err, errlen);
    free(checked);
    return rc;
}

int main(int argc, char **argv)
{
    const char *model_dir = "models/tinystories", *plugin_dir = "build-plugins";
    const char *schedule = NULL, *only = NULL;
    int gen_length = 64, block_length = 32, steps = 0, threads = 0, json = 0;
    double temperature = 0.0;
    static const struct option opts[] = {
        {"model", required_argument, 0, 'm'},        {"plugin-dir", required_argument, 0, 'p'},
        {"gen-length", required_argument, 0, 'g'},   {"block-length", required_argument, 0, 'b'},
        {"steps", required_argument, 0, 's'},        {"temperature", required_argument, 0, 'T'},
        {"schedule", required_argument, 0, 'S'},     {"threads", required_argument, 0, 't'},
        {"policy", required_argument, 0, 'P'},
        {"json", no_argument, 0, 'j'},               {"help", no_argument, 0, 'h'},
        {0, 0, 0, 0}};
    int c;
    while ((c = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        switch (c) {
        case 'm': model_dir = optarg; break;
        case 'p': plugin_dir = optarg; break;
        case 'g': gen_length = atoi(optarg); break;
        case 'b': block_length = atoi(optarg); break;
        case 's': steps = atoi(optarg); break;
        case 'T': temperature = atof(optarg); break;
        case 'S': schedule = optarg; break;
        case 'P': only = optarg; break;
        case 't': threads = atoi(optarg); break;
        case 'j': json = 1; break;
        case 'h': s_usage(stdout); return 0;
        default: s_usage(stderr); return 2;
        }
    }
    if (steps == 0)
        steps = gen_length;
    if (gen_length < 1 || block_length < 1 || steps < 1
        || (schedule && strcmp(schedule, "quota") != 0 && strcmp(schedule, "timestep") != 0)) {
        fprintf(stderr, "policy-bench: --gen-length, --block-length and --steps must be at "
                        "least 1, and --schedule quota or timestep\n");
        return 2;
    }
    if (threads > 0)
        omp_set_num_threads(threads);
    um_log_set_level(UM_LOG_WARN);

    char err[1024] = "";
    int status = 1;
    um_model_t *model = NULL;
    um_plugin_registry_t reg = {0};
    um_tokenizer_t tok = {0};
    int32_t *prompts[S_N_PROMPTS] = {0};
    size_t n_prompt[S_N_PROMPTS] = {0};
    int32_t *canvas = NULL;
    if (um_model_load(model_dir, &model, err, sizeof err) != 0) {
        fprintf(stderr, "policy-bench: %s\n", err);
        goto done;
    }
    um_plugins_scan(&reg, plugin_dir);
    if (um_tokenizer_open(&tok, &reg, NULL, model_dir, err, sizeof err) != 0) {
        fprintf(stderr, "policy-bench: %s: build first and pass --plugin-dir\n", err);
        goto done;
    }
    const um_model_config_t *cfg = um_model_config(model);
    size_t longest = 0;
    for (size_t i = 0; i < S_N_PROMPTS; i++) {
        if (um_tokenizer_encode(&tok, s_prompts[i], strlen(s_prompts[i]), &prompts[i],
                                &n_prompt[i]) != 0) {
            fprintf(stderr, "policy-bench: cannot tokenize prompt %zu\n", i);
            goto done;
        }
        if (n_prompt[i] > longest)
            longest = n_prompt[i];
    }
    if ((int64_t)longest + gen_length > cfg->max_sequence_length) {
        fprintf(stderr, "policy-bench: the longest prompt (%zu tokens) plus gen_length %d is past "
                        "the model's %d positions\n", longest, gen_length,
                cfg->max_sequence_length);
        goto done;
    }
    canvas = malloc((longest + (size_t)gen_length) * sizeof *canvas);
    if (!canvas)
        goto done;

    if (!json) {
        printf("model %s, kernels %s, %d threads; %zu prompts, gen_length %d, block_length %d, "
               "steps %d, temperature %g, schedule %s\n", model_dir, um_kernels()->isa,
               omp_get_max_threads(), S_N_PROMPTS, gen_length, block_length, steps,
               temperature, schedule ? schedule : "each policy's");
        printf("%-16s %-16s %-9s %14s %14s %14s\n", "policy", "parameter", "schedule",
               "passes/gen", "tokens/pass", "ms/token");
    }
    for (size_t v = 0; v < S_N_VARIANTS; v++) {
        const s_variant_t *var = &s_variants[v];
        if (only && strcmp(only, var->policy) != 0)
            continue;
        const um_plugin_t *pl = um_plugins_find(&reg, UM_PLUGIN_REMASK, var->policy);
        if (!pl) {
            fprintf(stderr, "policy-bench: plugin %s not found in %s, skipped\n", var->policy,
                    plugin_dir);
            continue;
        }
        const um_remask_ops_t *ops = pl->desc->remask;
        um_gen_params_t p = {.gen_length = gen_length, .block_length = block_length,
                             .steps = steps, .temperature = temperature, .seed = 1,
                             .remask = ops, .eps = UM_GEN_DEFAULT_EPS, .eot_id = -1};
        p.schedule = um_remask_traits(ops).schedule;
        if (schedule)
            p.schedule = strcmp(schedule, "timestep") == 0 ? UM_SCHEDULE_TIMESTEP
                                                           : UM_SCHEDULE_QUOTA;
        if (s_begin(ops, var, &p.remask_state, err, sizeof err) != 0) {
            fprintf(stderr, "policy-bench: %s: %s\n", var->policy, err);
            goto done;
        }
        double ms_per_token[S_N_PROMPTS], passes = 0;
        /* One untimed run first: oneDNN primitives and page faults. */
        um_generate(model, prompts[0], (int32_t)n_prompt[0], &p, NULL, NULL, canvas, NULL, err,
                    sizeof err);
        for (size_t i = 0; i < S_N_PROMPTS; i++) {
            um_gen_stats_t st;
            if (um_generate(model, prompts[i], (int32_t)n_prompt[i], &p, NULL, NULL, canvas,
                            &st, err, sizeof err) != 0) {
                fprintf(stderr, "policy-bench: %s: %s\n", var->policy, err);
                ops->request_end(p.remask_state);
                goto done;
            }
            passes += st.forward_passes;
            ms_per_token[i] = st.total_ms / gen_length;
        }
        ops->request_end(p.remask_state);
        qsort(ms_per_token, S_N_PROMPTS, sizeof ms_per_token[0], s_cmp_double);
        double mean_passes = passes / S_N_PROMPTS;
        double median_ms = (ms_per_token[(S_N_PROMPTS - 1) / 2] + ms_per_token[S_N_PROMPTS / 2])
                           / 2;
        char label[48] = "-";
        if (var->param)
            snprintf(label, sizeof label, "%s=%g", var->param, var->value);
        if (json)
            printf("{\"policy\":\"%s\",\"parameter\":\"%s\",\"schedule\":\"%s\","
                   "\"prompts\":%zu,\"gen_length\":%d,\"block_length\":%d,\"steps\":%d,"
                   "\"temperature\":%g,\"isa\":\"%s\",\"threads\":%d,"
                   "\"forward_passes_mean\":%.2f,\"tokens_per_pass\":%.3f,"
                   "\"ms_per_token_median\":%.3f}\n",
                   var->policy, label, um_schedule_name(p.schedule), S_N_PROMPTS, gen_length,
                   block_length, steps, temperature, um_kernels()->isa, omp_get_max_threads(),
                   mean_passes, gen_length / mean_passes, median_ms);
        else
            printf("%-16s %-16s %-9s %14.1f %14.2f %14.3f\n", var->policy, label,
                   um_schedule_name(p.schedule), mean_passes, gen_length / mean_passes,
                   median_ms);
    }
    status = 0;

done:
    free(canvas);
    for (size_t i = 0; i < S_N_PROMPTS; i++)
        free(prompts[i]);
    um_tokenizer_close(&tok);
    um_plugins_clear(&reg);
    um_model_destroy(&model);
    um_gemm_shutdown();
    return status;
}
