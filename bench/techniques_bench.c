/*
 * techniques-bench: what each of the engine's savings is worth, side by side in one run.
 *
 * The plain path does what the reference samplers do: the LM head over every position,
 * every step a pass over the whole canvas, every planned step run, weights as loaded.
 * Each other variant adds one technique to it, and the last adds them all:
 *
 *   rows         the LM head only for the positions that can be committed this step
 *   early_stop   stop once everything after the first committed EOS is EOS
 *   prefix       Fast-dLLM's prefix cache (with the rows-only head, as every cached pass)
 *   dual         Fast-dLLM's dual cache (the same)
 *   int8         int8 weights (a second copy of the model, quantised at load)
 *   batch        --batch generations in lockstep, sharing each step's forward pass
 *   all_alone    rows, early_stop, dual and int8 together, one request at a time
 *   all          rows, early_stop, dual, int8 and batch together
 *
 * The variants run in rounds, one generation (or batch) of each per round, so that a busy
 * machine slows them alike. For each it reports the median milliseconds per step. A step
 * is one forward pass and its sampling; in a batch it is the batch's time over its
 * generations' steps. It reports the median generated tokens per second, counting every
 * generation's gen_length over the wall time, since an early stop also fills the canvas.
 * Last come the forward passes of one generation and how many of its generated tokens
 * equal the plain path's.
 */
#include <getopt.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <unmaskd/error.h>

#include "generate.h"
#include "kernels.h"
#include "log.h"
#include "model.h"
#include "plugins.h"
#include "tokenizer.h"

#include "bench_util.h"

#define S_DEFAULT_PROMPT "once upon a time, there was a little girl named lily. she"

enum {
    S_PLAIN, S_ROWS, S_EARLY_STOP, S_PREFIX, S_DUAL, S_INT8, S_BATCH, S_ALL_ALONE, S_ALL,
    S_N_VARIANTS
};

static const char *const s_variant_names[S_N_VARIANTS] = {
    "plain", "rows", "early_stop", "prefix", "dual", "int8", "batch", "all_alone", "all"};

typedef struct s_variant {
    double *step_ms;    /* (repeat) milliseconds per forward pass */
    double *tps;        /* (repeat) generated tokens per second */
    int32_t passes;     /* forward passes of the last run */
    int32_t agree;      /* generated tokens equal to the plain path's, last run (in a
                           batch, the fewest of any member) */
    int early_stopped;  /* the last run stopped early */
} s_variant_t;

static int s_cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static double s_median(double *v, int n)
{
    qsort(v, (size_t)n, sizeof *v, s_cmp_double);
    return v[n / 2];
}

static void s_usage(FILE *out)
{
    fprintf(out,
            "usage: techniques-bench [options]\n"
            "  --model DIR         model folder (default models/tinystories, or\n"
            "                      ../models/tinystories from a build folder)\n"
            "  --plugin-dir DIR    folder with low_confidence.so and the tokenizer plugins\n"
            "                      (default build-plugins, or build/build-plugins from the\n"
            "                      source folder)\n"
            "  --prompt TEXT       prompt, encoded with the model's tokenizer (default a\n"
            "                      story opening)\n"
            "  --prompt-tokens N   a prompt of N fixed token ids instead, as step-bench\n"
            "                      uses (for random-weight models and llama.cpp's lengths)\n"
            "  --gen-length N      generated tokens (default 96)\n"
            "  --steps N           denoising steps (default: gen length)\n"
            "  --block-length N    block length (default 32)\n"
            "  --repeat N          rounds (default 3)\n"
            "  --batch N           generations run together by batch and all\n"
            "                      (default 8)\n"
            "  --threads N         OpenMP threads (default: OpenMP's choice)\n"
            "  --weight-dtype TYPE weights of every variant but int8: f32, bf16 or auto\n"
            "                      (default auto)\n"
            "  --json              print one JSON object instead of the table\n"
            "\n"
            "variants: plain (the LM head over every position, as the reference samplers),\n"
            "rows (the LM head over the candidates only), early_stop, prefix and dual\n"
            "(block caches), int8 (int8 weights), batch (--batch generations sharing\n"
            "each forward pass), all_alone (rows, early_stop, dual, int8), all (those\n"
            "and batch). In a batch, ms/step is the batch's time over its generations'\n"
            "steps, and tokens/s counts every generation's tokens.\n"
            "\"same tokens\" counts generated tokens equal to the plain path's: rows and\n"
            "batch must match it, and the others show what they change.\n");
}

/* The generation parameters of variant v, its policy state not yet begun. */
static um_gen_params_t s_params(int v, const um_remask_ops_t *remask, int32_t gen_length,
                                int32_t steps, int32_t block_length)
{
    um_gen_params_t p = {.gen_length = gen_length, .block_length = block_length,
                         .steps = steps, .temperature = 0, .seed = 1, .remask = remask,
                         .eot_id = -1};
    p.full_lm_head = v == S_PLAIN || v == S_EARLY_STOP || v == S_INT8 || v == S_BATCH;
    p.early_stop = v == S_EARLY_STOP || v == S_ALL_ALONE || v == S_ALL;
    p.cache = v == S_PREFIX                                ? UM_CACHE_PREFIX
              : v == S_DUAL || v == S_ALL_ALONE || v == S_ALL ? UM_CACHE_DUAL
                                                             : UM_CACHE_NONE;
    return p;
}

static double s_now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

/*
 * Run variant v once: n generations of the prompt in lockstep, each with its own policy
 * state, as the daemon's worker runs a batch (n is 1 for the unbatched variants).
 * canvases has room for n canvases of L ids. Writes the first generation's stats and the wall
 * time. Returns 0, or 1 after printing the error.
 */
static int s_run(int v, int32_t n, um_model_t *model, const um_remask_ops_t *remask,
                 const int32_t *prompt, int32_t n_prompt, int32_t gen_length, int32_t steps,
                 int32_t block_length, int32_t *canvases, um_gen_stats_t *first,
                 double *wall_ms)
{
    const int32_t L = n_prompt + gen_length;
    um_gen_params_t *p = calloc((size_t)n, sizeof *p);
    um_gen_t **gens = calloc((size_t)n, sizeof *gens);
    char err[1024] = "";
    int failed = !p || !gens;
    if (failed)
        snprintf(err, sizeof err, "out of memory for %d generations", n);
    double t0 = s_now_ms();
    for (int32_t j = 0; j < n && !failed; j++) {
        p[j] = s_params(v, remask, gen_length, steps, block_length);
        um_param_t checked[16];
        if (remask->n_params > 16
            || um_params_check(remask->params, remask->n_params, NULL, 0, checked, err,
                               sizeof err) != 0
            || remask->request_begin(um_plugin_host(), checked, remask->n_params,
                                     &p[j].remask_state, err, sizeof err) != 0
            || um_gen_begin(model, prompt, n_prompt, &p[j], NULL, NULL,
                            canvases + (size_t)j * L, &gens[j], err, sizeof err) != 0)
            failed = 1;
    }
    for (int running = !failed; running;) {
        if (um_gen_step_batch(gens, n) != 0) {
            snprintf(err, sizeof err, "out of memory for a batch of %d", n);
            failed = 1;
            break;
        }
        running = 0;
        for (int32_t j = 0; j < n; j++)
            running |= !um_gen_done(gens[j]);
    }
    for (int32_t j = 0; j < n; j++) {
        um_gen_stats_t st;
        char gen_err[512] = "";
        if (gens && gens[j] && um_gen_end(&gens[j], &st, gen_err, sizeof gen_err) != 0
            && !failed) {
            snprintf(err, sizeof err, "%s", gen_err);
            failed = 1;
        }
        if (j == 0 && !failed)
            *first = st;
        if (p && p[j].remask_state)
            remask->request_end(p[j].remask_state);
    }
    *wall_ms = s_now_ms() - t0;
    free(p);
    free(gens);
    if (failed)
        fprintf(stderr, "techniques-bench: %s: %s\n", s_variant_names[v], err);
    return failed;
}

int main(int argc, char **argv)
{
    const char *model_dir = "models/tinystories", *plugin_dir = "build-plugins";
    const char *prompt_text = S_DEFAULT_PROMPT;
    int gen_length = 96, steps = 0, block_length = 32, repeat = 3, threads = 0, json = 0;
    int batch = 8, prompt_tokens = 0;
    int opt_model = 0, opt_plugins = 0;
    um_model_options_t base_opts = {0};
    static const struct option opts[] = {
        {"model", required_argument, 0, 'm'},        {"plugin-dir", required_argument, 0, 'p'},
        {"prompt", required_argument, 0, 'P'},       {"gen-length", required_argument, 0, 'g'},
        {"steps", required_argument, 0, 's'},        {"block-length", required_argument, 0, 'b'},
        {"repeat", required_argument, 0, 'r'},       {"threads", required_argument, 0, 't'},
        {"weight-dtype", required_argument, 0, 'w'}, {"json", no_argument, 0, 'j'},
        {"batch", required_argument, 0, 'B'},        {"prompt-tokens", required_argument, 0, 'T'},
        {"help", no_argument, 0, 'h'},               {0, 0, 0, 0}};
    int c;
    while ((c = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        /* The whole-number options, each at least 1. */
        const struct {
            int key;
            const char *name;
            int *value;
        } counts[] = {{'g', "--gen-length", &gen_length}, {'s', "--steps", &steps},
                      {'b', "--block-length", &block_length}, {'r', "--repeat", &repeat},
                      {'t', "--threads", &threads}, {'B', "--batch", &batch},
                      {'T', "--prompt-tokens", &prompt_tokens}};
        int counted = 0;
        for (size_t i = 0; i < sizeof counts / sizeof counts[0]; i++) {
            if (counts[i].key != c)
                continue;
            if (um_bench_parse_int("techniques-bench", counts[i].name, optarg, 1,
                                   counts[i].value) != 0)
                return 2;
            counted = 1;
        }
        if (counted)
            continue;
        switch (c) {
        case 'm': model_dir = optarg; opt_model = 1; break;
        case 'p': plugin_dir = optarg; opt_plugins = 1; break;
        case 'P': prompt_text = optarg; break;
        case 'w':
            if (um_wdtype_parse(optarg, &base_opts.weight_dtype) != 0
                || base_opts.weight_dtype == UM_WDTYPE_INT8) {
                fprintf(stderr, "techniques-bench: --weight-dtype must be f32, bf16 or auto "
                        "(int8 is a variant of its own), got \"%s\"\n", optarg);
                return 2;
            }
            break;
        case 'j': json = 1; break;
        case 'h': s_usage(stdout); return 0;
        default: s_usage(stderr); return 2;
        }
    }
    if (steps == 0)
        steps = gen_length;
    /* The defaults name the source tree's folders; from a build folder inside it they
       are one level up. */
    if (!opt_model && access(model_dir, F_OK) != 0 && access("../models/tinystories", F_OK) == 0)
        model_dir = "../models/tinystories";
    if (!opt_plugins && access(plugin_dir, F_OK) != 0
        && access("build/build-plugins", F_OK) == 0)
        plugin_dir = "build/build-plugins";
    if (threads > 0)
        omp_set_num_threads(threads);
    um_log_set_level(UM_LOG_WARN);

    char err[1024] = "";
    if (um_kernels_select(NULL, err, sizeof err) != 0) {
        fprintf(stderr, "techniques-bench: %s\n", err);
        return 2;
    }
    um_model_t *model = NULL, *model_int8 = NULL;
    um_model_options_t int8_opts = {.weight_dtype = UM_WDTYPE_INT8};
    if (um_model_load_opts(model_dir, &base_opts, &model, err, sizeof err) != 0
        || um_model_load_opts(model_dir, &int8_opts, &model_int8, err, sizeof err) != 0) {
        fprintf(stderr, "techniques-bench: %s\n", err);
        return 1;
    }
    um_plugin_registry_t reg = {0};
    um_plugins_scan(&reg, plugin_dir);
    const um_plugin_t *policy = um_plugins_find(&reg, UM_PLUGIN_REMASK, "low_confidence");
    if (!policy) {
        fprintf(stderr, "techniques-bench: low_confidence.so not found in %s: build first and "
                        "pass --plugin-dir\n", plugin_dir);
        return 1;
    }
    const um_model_config_t *cfg = um_model_config(model);
    um_tokenizer_t tok = {0};
    int32_t *prompt = NULL;
    size_t n_prompt = 0;
    if (prompt_tokens > 0) {
        /* The ids step-bench uses: only the timing matters. */
        n_prompt = (size_t)prompt_tokens;
        prompt = malloc(n_prompt * sizeof *prompt);
        for (size_t i = 0; prompt && i < n_prompt; i++)
            prompt[i] = (int32_t)((100 + 37 * i) % (size_t)cfg->vocab_size);
    } else if (um_tokenizer_open(&tok, &reg, NULL, model_dir, err, sizeof err) != 0
               || um_tokenizer_encode(&tok, prompt_text, strlen(prompt_text), &prompt,
                                      &n_prompt) != 0
               || n_prompt == 0) {
        fprintf(stderr, "techniques-bench: cannot encode the prompt \"%s\": %s\n", prompt_text,
                err[0] ? err : "it has no tokens; give a longer --prompt or --prompt-tokens N");
        return 1;
    }
    int32_t L = (int32_t)n_prompt + gen_length;
    if (L > cfg->max_sequence_length) {
        fprintf(stderr, "techniques-bench: the prompt's %zu tokens plus gen_length %d pass the "
                "model's %d positions: lower --gen-length\n", n_prompt, gen_length,
                cfg->max_sequence_length);
        return 2;
    }

    s_variant_t var[S_N_VARIANTS] = {{0}};
    int32_t *canvas = malloc((size_t)batch * L * sizeof *canvas);
    int32_t *plain = malloc((size_t)L * sizeof *plain);
    for (int v = 0; v < S_N_VARIANTS; v++) {
        var[v].step_ms = calloc((size_t)repeat, sizeof *var[v].step_ms);
        var[v].tps = calloc((size_t)repeat, sizeof *var[v].tps);
    }
    /* Round -1 warms up: primitives, page faults, caches. */
    for (int r = -1; r < repeat; r++) {
        for (int v = 0; v < S_N_VARIANTS; v++) {
            const int32_t n = v == S_BATCH || v == S_ALL ? batch : 1;
            um_model_t *m = v == S_INT8 || v == S_ALL_ALONE || v == S_ALL ? model_int8 : model;
            um_gen_stats_t st = {0};
            double wall_ms = 0;
            if (s_run(v, n, m, policy->desc->remask, prompt, (int32_t)n_prompt, gen_length,
                      steps, block_length, canvas, &st, &wall_ms) != 0)
                return 1;
            if (r < 0)
                continue;
            /* In lockstep every generation runs the same steps as the first. */
            var[v].step_ms[r] = wall_ms / ((double)n * (st.forward_passes > 0
                                                        ? st.forward_passes : 1));
            var[v].tps[r] = (double)n * gen_length / (wall_ms / 1e3);
            var[v].passes = st.forward_passes;
            var[v].early_stopped = st.early_stop;
            if (v == S_PLAIN)
                memcpy(plain, canvas, (size_t)L * sizeof *canvas);
            /* Every member of a batch runs the same prompt and seed, so each must give
               the same tokens: the figure is the member that agrees least. */
            var[v].agree = gen_length;
            for (int32_t j = 0; j < n; j++) {
                const int32_t *member = canvas + (size_t)j * L;
                int32_t agree = 0;
                for (int32_t i = (int32_t)n_prompt; i < L; i++)
                    agree += member[i] == plain[i];
                if (agree < var[v].agree)
                    var[v].agree = agree;
            }
        }
    }
    double step_ms[S_N_VARIANTS], tps[S_N_VARIANTS];
    for (int v = 0; v < S_N_VARIANTS; v++) {
        step_ms[v] = s_median(var[v].step_ms, repeat);
        tps[v] = s_median(var[v].tps, repeat);
    }

    if (json) {
        printf("{\"model\":");
        um_bench_json_string(stdout, model_dir);
        printf(",\"d_model\":%d,\"n_layers\":%d,\"vocab\":%d,"
               "\"weight_dtype\":\"%s\",\"isa\":\"%s\",\"threads\":%d,\"prompt_tokens\":%zu,"
               "\"gen_length\":%d,\"steps\":%d,\"block_length\":%d,\"repeat\":%d,"
               "\"batch\":%d,\"variants\":[",
               cfg->d_model, cfg->n_layers, cfg->embedding_size,
               um_wdtype_name(um_model_weight_dtype(model)), um_isa_name(um_kernels_isa()),
               omp_get_max_threads(), n_prompt, gen_length, steps, block_length, repeat, batch);
        for (int v = 0; v < S_N_VARIANTS; v++)
            printf("%s{\"name\":\"%s\",\"ms_per_step_median\":%.3f,"
                   "\"tokens_per_second_median\":%.3f,\"forward_passes\":%d,"
                   "\"early_stop\":%s,\"tokens_equal_to_plain\":%d,"
                   "\"step_speedup\":%.3f,\"tokens_per_second_speedup\":%.3f}",
                   v ? "," : "", s_variant_names[v], step_ms[v], tps[v], var[v].passes,
                   var[v].early_stopped ? "true" : "false", var[v].agree,
                   step_ms[S_PLAIN] / step_ms[v], tps[v] / tps[S_PLAIN]);
        printf("]}\n");
    } else {
        printf("model %s: d_model %d, %d layers, vocab %d, weights %s (int8 for int8, all_alone "
               "and all)\n",
               model_dir, cfg->d_model, cfg->n_layers, cfg->embedding_size,
               um_wdtype_name(um_model_weight_dtype(model)));
        printf("kernels %s, threads: %d; prompt %zu tokens, gen %d, steps %d, block %d, "
               "batch %d, rounds: %d (medians)\n", um_isa_name(um_kernels_isa()),
               omp_get_max_threads(), n_prompt, gen_length, steps, block_length, batch, repeat);
        printf("%-11s %10s %8s %10s %8s %7s %12s\n", "variant", "ms/step", "speedup",
               "tokens/s", "speedup", "passes", "same tokens");
        for (int v = 0; v < S_N_VARIANTS; v++)
            printf("%-11s %10.2f %7.2fx %10.1f %7.2fx %7d %6d of %d\n", s_variant_names[v],
                   step_ms[v], step_ms[S_PLAIN] / step_ms[v], tps[v], tps[v] / tps[S_PLAIN],
                   var[v].passes, var[v].agree, gen_length);
    }
    for (int v = 0; v < S_N_VARIANTS; v++) {
        free(var[v].step_ms);
        free(var[v].tps);
    }
    free(canvas);
    free(plain);
    free(prompt);
    um_tokenizer_close(&tok);
    um_plugins_clear(&reg);
    um_model_destroy(&model);
    um_model_destroy(&model_int8);
    um_gemm_shutdown();
    return 0;
}
