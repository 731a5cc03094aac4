/*
 * step-bench: time the engine on a model folder, without the daemon.
 *
 * Reports the forward pass over the whole canvas (what every denoising step costs),
 * then whole generations: milliseconds per denoising step and generated tokens per
 * second. With --batch N it also runs N generations (seeds 1 to N) one after another
 * and then in one batch sharing each step's forward pass (um_gen_step_batch), and
 * reports both. Prints a table, and one JSON object with --json so runs can be compared.
 */
#include <getopt.h>
#include <math.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "generate.h"
#include "kernels.h"
#include "log.h"
#include "model.h"
#include "plugins.h"

#include "bench_util.h"

static double s_now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1e3 + (double)ts.tv_nsec / 1e6;
}

static int s_cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static void s_usage(FILE *out)
{
    fprintf(out,
            "usage: step-bench [options]\n"
            "  --model DIR         model folder (default models/tinystories)\n"
            "  --plugin-dir DIR    folder with low_confidence.so (default build-plugins)\n"
            "  --prompt-tokens N   prompt length in tokens (default 16)\n"
            "  --gen-length N      generated tokens (default 64)\n"
            "  --steps N           denoising steps (default 64)\n"
            "  --block-length N    block length (default 32)\n"
            "  --repeat N          timed runs of each measurement (default 5)\n"
            "  --threads N         OpenMP threads (default: OpenMP's choice)\n"
            "  --isa NAME          kernel ISA cap: scalar, avx2, avx512, amx or neon\n"
            "                      (default: UNMASKD_ISA, else the best this host runs)\n"
            "  --weight-dtype TYPE f32, bf16, int8 or auto (default: UNMASKD_WEIGHT_DTYPE, else\n"
            "                      auto)\n"
            "  --attention NAME    attention products: onednn or libxsmm (default:\n"
            "                      UNMASKD_ATTENTION, else onednn)\n"
            "  --cache LIST        block caches to time generations with, comma-separated:\n"
            "                      none, prefix, dual (default none); the table and JSON\n"
            "                      give each one's step time and agreement with the first\n"
            "  --batch N           also time N generations (seeds 1 to N, cache none) one\n"
            "                      after another and in one batch, side by side\n"
            "  --json              print one JSON object instead of the table\n");
}

/* Medians of one cache mode's generations. */
typedef struct s_gen_result {
    um_cache_mode_t cache;
    int passes, cached_passes;
    double step_ms[3];        /* min, median, max of milliseconds per forward pass */
    double tps[3];            /* min, median, max of generated tokens per second */
    int32_t agree;            /* generated tokens equal to the first mode's */
    double cache_mb;
} s_gen_result_t;

/* Medians of --batch: N generations one after another, then in one batch. */
typedef struct s_batch_result {
    int n;
    double serial_ms, batch_ms;   /* median wall time of all N generations */
    int32_t agree;                /* batched tokens equal to the serial run's */
    int32_t largest_batch;        /* stats.batch_size of the first generation */
} s_batch_result_t;

/* Run N generations of p with seeds 1..N, one after another (batched 0) or in one batch;
 * writes each canvas (L ids) to canvases. Returns the wall time, or -1 with err filled. */
static double s_run_n(um_model_t *model, const int32_t *ids, int prompt_tokens,
                      const um_gen_params_t *p, int n, int batched, int32_t *canvases,
                      int32_t L, int32_t *largest, char *err, size_t errlen)
{
    um_gen_params_t *ps = malloc((size_t)n * sizeof *ps);
    um_gen_t **gens = calloc((size_t)n, sizeof *gens);
    double ms = -1;
    if (!ps || !gens) {
        snprintf(err, errlen, "out of memory for %d generations", n);
        goto done;
    }
    double t0 = s_now_ms();
    for (int i = 0; i < n; i++) {
        ps[i] = *p;
        ps[i].seed = (uint64_t)i + 1;
        int32_t *canvas = canvases + (size_t)i * L;
        if (!batched) {
            um_gen_stats_t st;
            if (um_generate(model, ids, prompt_tokens, &ps[i], NULL, NULL, canvas, &st, err,
                            errlen) != 0)
                goto done;
        } else if (um_gen_begin(model, ids, prompt_tokens, &ps[i], NULL, NULL, canvas, &gens[i],
                                err, errlen) != 0) {
            goto done;
        }
    }
    for (int running = batched; running;) {
        if (um_gen_step_batch(gens, n) != 0) {
            snprintf(err, errlen, "out of memory for a batch of %d", n);
            goto done;
        }
        running = 0;
        for (int i = 0; i < n; i++)
            running |= !um_gen_done(gens[i]);
    }
    for (int i = 0; batched && i < n; i++) {
        um_gen_stats_t st;
        if (um_gen_end(&gens[i], &st, err, errlen) != 0)
            goto done;
        if (i == 0)
            *largest = st.batch_size;
    }
    ms = s_now_ms() - t0;

done:
    for (int i = 0; gens && i < n; i++)
        if (gens[i])
            um_gen_end(&gens[i], NULL, NULL, 0);
    free(gens);
    free(ps);
    return ms;
}

/* Time --batch: repeat times N serial generations, then N batched. Returns 0 or -1. */
static int s_time_batch(um_model_t *model, const int32_t *ids, int prompt_tokens,
                        const um_gen_params_t *p, int repeat, int32_t L, s_batch_result_t *res,
                        char *err, size_t errlen)
{
    const int n = res->n;
    int32_t *serial = malloc((size_t)n * L * sizeof *serial);
    int32_t *batch = malloc((size_t)n * L * sizeof *batch);
    double *serial_ms = malloc((size_t)repeat * sizeof *serial_ms);
    double *batch_ms = malloc((size_t)repeat * sizeof *batch_ms);
    int rc = -1;
    if (!serial || !batch || !serial_ms || !batch_ms) {
        snprintf(err, errlen, "out of memory for %d canvases", n);
        goto done;
    }
    /* Alternate the two so that a change in machine load hits both alike. */
    for (int r = 0; r < repeat; r++) {
        int32_t one = 1;
        serial_ms[r] = s_run_n(model, ids, prompt_tokens, p, n, 0, serial, L, &one, err, errlen);
        batch_ms[r] = s_run_n(model, ids, prompt_tokens, p, n, 1, batch, L,
                              &res->largest_batch, err, errlen);
        if (serial_ms[r] < 0 || batch_ms[r] < 0)
            goto done;
    }
    qsort(serial_ms, (size_t)repeat, sizeof *serial_ms, s_cmp_double);
    qsort(batch_ms, (size_t)repeat, sizeof *batch_ms, s_cmp_double);
    res->serial_ms = serial_ms[repeat / 2];
    res->batch_ms = batch_ms[repeat / 2];
    res->agree = 0;
    for (size_t i = 0; i < (size_t)n * L; i++)
        res->agree += (i % L) >= (size_t)prompt_tokens && serial[i] == batch[i];
    rc = 0;

done:
    free(serial);
    free(batch);
    free(serial_ms);
    free(batch_ms);
    return rc;
}

/* Parse "none,prefix,dual" into modes; returns their count, or -1 for an unknown name. */
static int s_parse_caches(const char *list, um_cache_mode_t *modes, int max)
{
    static const char *const names[] = {"none", "prefix", "dual"};
    int n = 0;
    const char *s = list;
    while (*s && n < max) {
        size_t len = strcspn(s, ",");
        int found = -1;
        for (int i = 0; i < 3; i++)
            if (strlen(names[i]) == len && strncmp(s, names[i], len) == 0)
                found = i;
        if (found < 0)
            return -1;
        modes[n++] = (um_cache_mode_t)found;
        s += len + (s[len] == ',');
    }
    return n > 0 ? n : -1;
}

/* Time repeat generations with p; fills res except agree. Returns 0 or an UM_E* code. */
static int s_time_generations(um_model_t *model, const int32_t *ids, int prompt_tokens,
                              const um_gen_params_t *p, int repeat, int32_t *canvas,
                              s_gen_result_t *res, char *err, size_t errlen)
{
    double *step_ms = malloc((size_t)repeat * sizeof *step_ms);
    double *tps = malloc((size_t)repeat * sizeof *tps);
    if (!step_ms || !tps) {
        free(step_ms);
        free(tps);
        return -1;
    }
    int rc = 0;
    for (int r = 0; r < repeat && rc == 0; r++) {
        um_gen_stats_t st;
        rc = um_generate(model, ids, prompt_tokens, p, NULL, NULL, canvas, &st, err, errlen);
        res->passes = st.forward_passes;
        res->cached_passes = st.cached_passes;
        res->cache_mb = st.cache_bytes / 1e6;
        step_ms[r] = st.total_ms / st.forward_passes;
        tps[r] = p->gen_length / (st.total_ms / 1e3);
    }
    if (rc == 0) {
        qsort(step_ms, (size_t)repeat, sizeof *step_ms, s_cmp_double);
        qsort(tps, (size_t)repeat, sizeof *tps, s_cmp_double);
        res->step_ms[0] = step_ms[0];
        res->step_ms[1] = step_ms[repeat / 2];
        res->step_ms[2] = step_ms[repeat - 1];
        res->tps[0] = tps[0];
        res->tps[1] = tps[repeat / 2];
        res->tps[2] = tps[repeat - 1];
    }
    free(step_ms);
    free(tps);
    return rc;
}

int main(int argc, char **argv)
{
    const char *model_dir = "models/tinystories", *plugin_dir = "build-plugins";
    const char *isa = NULL, *attention = NULL;
    um_model_options_t load_opts = {0};
    int prompt_tokens = 16, gen_length = 64, steps = 64, block_length = 32, repeat = 5;
    int threads = 0, json = 0, n_caches = 1, batch_n = 0;
    um_cache_mode_t caches[3] = {UM_CACHE_NONE};
    static const struct option opts[] = {
        {"model", required_argument, 0, 'm'},      {"plugin-dir", required_argument, 0, 'p'},
        {"prompt-tokens", required_argument, 0, 'P'}, {"gen-length", required_argument, 0, 'g'},
        {"steps", required_argument, 0, 's'},      {"block-length", required_argument, 0, 'b'},
        {"repeat", required_argument, 0, 'r'},     {"threads", required_argument, 0, 't'},
        {"isa", required_argument, 0, 'i'},        {"weight-dtype", required_argument, 0, 'w'},
        {"attention", required_argument, 0, 'a'}, {"cache", required_argument, 0, 'c'},
        {"json", no_argument, 0, 'j'},             {"help", no_argument, 0, 'h'},
        {"batch", required_argument, 0, 'B'},
        {0, 0, 0, 0}};
    int c;
    while ((c = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        switch (c) {
        case 'm': model_dir = optarg; break;
        case 'p': plugin_dir = optarg; break;
        case 'P':
        case 'g':
        case 's':
        case 'b':
        case 'r':
        case 't':
        case 'B': {
            /* Whole numbers of at least 1 (--batch at least 0). */
            const struct {
                int key;
                const char *name;
                int *value;
            } counts[] = {{'P', "--prompt-tokens", &prompt_tokens},
                          {'g', "--gen-length", &gen_length}, {'s', "--steps", &steps},
                          {'b', "--block-length", &block_length}, {'r', "--repeat", &repeat},
                          {'t', "--threads", &threads}, {'B', "--batch", &batch_n}};
            for (size_t i = 0; i < sizeof counts / sizeof counts[0]; i++)
                if (counts[i].key == c
                    && um_bench_parse_int("step-bench", counts[i].name, optarg, c == 'B' ? 0 : 1,
                                          counts[i].value) != 0)
                    return 2;
            break;
        }
        case 'i': isa = optarg; break;
        case 'a': attention = optarg; break;
        case 'c':
            n_caches = s_parse_caches(optarg, caches, 3);
            if (n_caches < 0) {
                fprintf(stderr, "step-bench: --cache must list none, prefix or dual separated "
                        "by commas, got \"%s\"\n", optarg);
                return 2;
            }
            break;
        case 'w':
            if (um_wdtype_parse(optarg, &load_opts.weight_dtype) != 0) {
                fprintf(stderr, "step-bench: --weight-dtype must be f32, bf16, int8 or auto, "
                        "got \"%s\"\n", optarg);
                return 2;
            }
            break;
        case 'j': json = 1; break;
        case 'h': s_usage(stdout); return 0;
        default: s_usage(stderr); return 2;
        }
    }
    if (prompt_tokens < 1 || gen_length < 1 || steps < 1 || block_length < 1 || repeat < 1
        || batch_n < 0) {
        fprintf(stderr, "step-bench: --prompt-tokens, --gen-length, --steps, --block-length "
                        "and --repeat must be at least 1, and --batch at least 0\n");
        return 2;
    }
    if (threads > 0)
        omp_set_num_threads(threads);
    um_log_set_level(UM_LOG_WARN);

    char err[1024] = "";
    if (um_kernels_select(isa, err, sizeof err) != 0 ||
        um_attention_select(attention, err, sizeof err) != 0) {
        fprintf(stderr, "step-bench: %s\n", err);
        return 2;
    }
    um_model_t *model = NULL;
    if (um_model_load_opts(model_dir, &load_opts, &model, err, sizeof err) != 0) {
        fprintf(stderr, "step-bench: %s\n", err);
        return 1;
    }
    um_plugin_registry_t reg = {0};
    um_plugins_scan(&reg, plugin_dir);
    const um_plugin_t *policy = um_plugins_find(&reg, UM_PLUGIN_REMASK, "low_confidence");
    if (!policy) {
        fprintf(stderr, "step-bench: low_confidence.so not found in %s: build first and pass "
                        "--plugin-dir\n", plugin_dir);
        return 1;
    }
    const um_model_config_t *cfg = um_model_config(model);
    int32_t L = prompt_tokens + gen_length;
    if (L > cfg->max_sequence_length) {
        fprintf(stderr, "step-bench: prompt plus gen_length is %d, past the model's %d "
                        "positions\n", L, cfg->max_sequence_length);
        return 2;
    }

    /* A fixed prompt of ordinary tokens, then the masked canvas. */
    int32_t *ids = malloc((size_t)L * sizeof *ids);
    int32_t *canvas = malloc((size_t)L * sizeof *canvas);
    float *logits = malloc((size_t)L * cfg->embedding_size * sizeof *logits);
    double *fwd = malloc((size_t)repeat * sizeof *fwd);
    for (int32_t i = 0; i < L; i++)
        ids[i] = i < prompt_tokens ? (int32_t)(100 + 37 * i) % cfg->vocab_size
                                   : cfg->mask_token_id;

    um_model_forward(model, ids, 1, L, logits); /* warm-up: primitives, page faults */
    for (int r = 0; r < repeat; r++) {
        double t0 = s_now_ms();
        um_model_forward(model, ids, 1, L, logits);
        fwd[r] = s_now_ms() - t0;
    }

    s_gen_result_t res[3] = {{0}};
    int32_t *first = malloc((size_t)L * sizeof *first);
    for (int k = 0; k < n_caches; k++) {
        um_gen_params_t p = {.gen_length = gen_length, .block_length = block_length,
                             .steps = steps, .temperature = 0, .cfg_scale = 0, .seed = 1,
                             .remask = policy->desc->remask, .cache = caches[k]};
        res[k].cache = caches[k];
        if (s_time_generations(model, ids, prompt_tokens, &p, repeat, canvas, &res[k], err,
                               sizeof err) != 0) {
            fprintf(stderr, "step-bench: %s\n", err);
            return 1;
        }
        if (k == 0)
            memcpy(first, canvas, (size_t)L * sizeof *canvas);
        for (int32_t i = prompt_tokens; i < L; i++)
            res[k].agree += canvas[i] == first[i];
    }
    s_batch_result_t batch = {.n = batch_n};
    if (batch_n > 0) {
        um_gen_params_t p = {.gen_length = gen_length, .block_length = block_length,
                             .steps = steps, .temperature = 0, .cfg_scale = 0,
                             .remask = policy->desc->remask};
        if (s_time_batch(model, ids, prompt_tokens, &p, repeat, L, &batch, err, sizeof err)
            != 0) {
            fprintf(stderr, "step-bench: --batch %d: %s\n", batch_n, err);
            return 1;
        }
    }
    const double batch_tokens = (double)batch_n * gen_length;
    int passes = res[0].passes;
    qsort(fwd, (size_t)repeat, sizeof *fwd, s_cmp_double);
    int mid = repeat / 2;
    double flops = 2.0 * L * (double)cfg->n_layers
                       * (4.0 * cfg->d_model * cfg->d_model
                          + 3.0 * cfg->d_model * cfg->mlp_hidden_size
                          + 2.0 * L * cfg->d_model)
                   + 2.0 * L * (double)cfg->d_model * cfg->embedding_size;

    if (json) {
        printf("{\"model\":");
        um_bench_json_string(stdout, model_dir);
        printf(",\"d_model\":%d,\"n_layers\":%d,\"vocab\":%d,\"dtype\":\"%s\","
               "\"backend\":\"%s\",\"weight_dtype\":\"%s\",\"attention\":\"%s\",\"isa\":\"%s\","
               "\"threads\":%d,\"prompt_tokens\":%d,"
               "\"gen_length\":%d,\"steps\":%d,\"block_length\":%d,\"repeat\":%d,"
               "\"forward_passes\":%d,\"forward_ms_median\":%.3f,\"forward_ms_min\":%.3f,"
               "\"forward_gflops\":%.2f,\"ms_per_step_median\":%.3f,"
               "\"tokens_per_second_median\":%.2f,\"caches\":[",
               cfg->d_model, cfg->n_layers, cfg->embedding_size,
               um_model_dtype(model), um_model_backend(model),
               um_wdtype_name(um_model_weight_dtype(model)),
               um_attention_backend_name(), um_isa_name(um_kernels_isa()),
               omp_get_max_threads(), prompt_tokens, gen_length, steps, block_length, repeat,
               passes, fwd[mid], fwd[0], flops / (fwd[mid] * 1e6), res[0].step_ms[1],
               res[0].tps[1]);
        for (int k = 0; k < n_caches; k++)
            printf("%s{\"cache\":\"%s\",\"forward_passes\":%d,\"cached_passes\":%d,"
                   "\"cache_mb\":%.3f,\"ms_per_step_median\":%.3f,"
                   "\"tokens_per_second_median\":%.2f,\"tokens_agreeing\":%d}",
                   k ? "," : "", um_cache_mode_name(res[k].cache), res[k].passes,
                   res[k].cached_passes, res[k].cache_mb, res[k].step_ms[1], res[k].tps[1],
                   res[k].agree);
        printf("]");
        if (batch_n > 0)
            printf(",\"batch\":{\"n\":%d,\"serial_ms_median\":%.3f,\"batch_ms_median\":%.3f,"
                   "\"serial_tokens_per_second\":%.2f,\"batch_tokens_per_second\":%.2f,"
                   "\"speedup\":%.3f,\"batch_size\":%d,\"tokens_agreeing\":%d}",
                   batch_n, batch.serial_ms, batch.batch_ms,
                   batch_tokens / (batch.serial_ms / 1e3), batch_tokens / (batch.batch_ms / 1e3),
                   batch.serial_ms / batch.batch_ms, batch.largest_batch, batch.agree);
        printf("}\n");
    } else {
        printf("model %s: d_model %d, %d layers, vocab %d, weights %s\n", model_dir,
               cfg->d_model, cfg->n_layers, cfg->embedding_size, um_model_dtype(model));
        printf("backend %s, kernels %s, %d threads\n", um_model_backend(model),
               um_kernels()->isa, omp_get_max_threads());
        printf("canvas %d tokens (prompt %d + gen %d), steps %d, block %d, %d runs each\n", L,
               prompt_tokens, gen_length, steps, block_length, repeat);
        printf("%-28s %10s %10s %10s\n", "measure", "min", "median", "max");
        printf("%-28s %10.2f %10.2f %10.2f\n", "forward pass (ms)", fwd[0], fwd[mid],
               fwd[repeat - 1]);
        for (int k = 0; k < n_caches; k++) {
            char label[64];
            const char *name = um_cache_mode_name(res[k].cache);
            snprintf(label, sizeof label, "denoising step (ms), %s", name);
            printf("%-28s %10.2f %10.2f %10.2f\n", label, res[k].step_ms[0], res[k].step_ms[1],
                   res[k].step_ms[2]);
            snprintf(label, sizeof label, "generated tokens/s, %s", name);
            printf("%-28s %10.1f %10.1f %10.1f\n", label, res[k].tps[0], res[k].tps[1],
                   res[k].tps[2]);
        }
        printf("forward passes per generation: %d; forward at %.1f GFLOP/s (median)\n", passes,
               flops / (fwd[mid] * 1e6));
        for (int k = 1; k < n_caches; k++)
            printf("cache %s: %.2fx the step time of %s, %d of %d passes cached, %.1f MB, "
                   "%d of %d tokens as %s\n", um_cache_mode_name(res[k].cache),
                   res[k].step_ms[1] / res[0].step_ms[1], um_cache_mode_name(res[0].cache),
                   res[k].cached_passes, res[k].passes, res[k].cache_mb, res[k].agree,
                   gen_length, um_cache_mode_name(res[0].cache));
        if (batch_n > 0) {
            printf("%d generations (seeds 1 to %d), median of %d runs:\n", batch_n, batch_n,
                   repeat);
            printf("  one after another: %10.1f ms, %8.1f generated tokens/s\n",
                   batch.serial_ms, batch_tokens / (batch.serial_ms / 1e3));
            printf("  in one batch:      %10.1f ms, %8.1f generated tokens/s (%.2fx), "
                   "batch_size %d, %d of %d tokens as one after another\n", batch.batch_ms,
                   batch_tokens / (batch.batch_ms / 1e3), batch.serial_ms / batch.batch_ms,
                   batch.largest_batch, batch.agree, (int)batch_tokens);
        }
    }
    free(ids);
    free(canvas);
    free(logits);
    free(fwd);
    free(first);
    um_plugins_clear(&reg);
    um_model_destroy(&model);
    um_gemm_shutdown();
    return 0;
}
