/*
 * forward-bench: where a denoising step's forward pass spends its time, and how close
 * it runs to the matrix-product rate of this CPU.
 *
 * For a model folder and a canvas of --tokens positions it reports the forward pass
 * split by op (weight products, attention, LM head, norms, RoPE, activation, other),
 * then times the same weight products alone, as bare oneDNN matmuls of the same shapes
 * and dtype on fresh random weights, in the same run. The ratio of the two FLOP rates
 * says how much of the hardware's matrix rate the whole step keeps. Prints a table,
 * and with --json FILE also writes the figures as one JSON object. --weight-dtype takes
 * a comma-separated list (f32,bf16,int8): each dtype is loaded and timed in turn, and a
 * closing table puts their pass times and resident memory side by side.
 */
#include <getopt.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <unmaskd/error.h>

#include "kernels.h"
#include "log.h"
#include "model.h"

#include "bench_util.h"

static double s_now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1e3 + (double)ts.tv_nsec / 1e6;
}

/* A /proc/self/status field in MB ("VmHWM:" the peak resident set, "VmRSS:" the current
 * one), or -1 where /proc has none. */
static double s_status_mb(const char *field)
{
    FILE *f = fopen("/proc/self/status", "r");
    if (!f)
        return -1;
    char line[256];
    double kb = -1;
    size_t n = strlen(field);
    while (fgets(line, sizeof line, f))
        if (strncmp(line, field, n) == 0 && sscanf(line + n, " %lf kB", &kb) == 1)
            break;
    fclose(f);
    return kb < 0 ? -1 : kb / 1024.0;
}

static double s_peak_rss_mb(void)
{
    return s_status_mb("VmHWM:");
}

static int s_cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static void s_usage(FILE *out)
{
    fprintf(out,
            "usage: forward-bench [options]\n"
            "  --model DIR          model folder (default models/tinystories)\n"
            "  --tokens N           canvas positions per forward pass (default 160)\n"
            "  --repeat N           timed passes (default 5)\n"
            "  --threads N          OpenMP threads (default: OpenMP's choice)\n"
            "  --isa NAME           kernel ISA cap: scalar, avx2, avx512, amx, neon\n"
            "  --weight-dtype LIST  f32, bf16, int8 or auto, or a comma-separated list of\n"
            "                       them to time each in turn (default auto)\n"
            "  --attention NAME     attention products: onednn (default) or libxsmm\n"
            "  --json FILE          also write the figures as JSON to FILE\n"
            "  --no-bare            skip timing the bare matmuls (for models near the\n"
            "                       memory limit, whose weights they would duplicate)\n");
}

/* One distinct weight shape of the step and how often a pass multiplies by it. */
typedef struct s_shape {
    int32_t n, k, count;
    double ms; /* median time of one bare product */
} s_shape_t;

/* Time bare products of every weight shape of the model on fresh random weights. */
static int s_time_bare_products(s_shape_t *shapes, int n_shapes, int32_t M, um_wdtype_t dtype,
                                int repeat, const float *A, float *C)
{
    for (int i = 0; i < n_shapes; i++) {
        s_shape_t *s = &shapes[i];
        size_t n = (size_t)s->n * s->k;
        uint16_t *w16 = malloc(n * sizeof *w16);
        if (!w16)
            return UM_ENOMEM;
        uint64_t state = 1234 + (uint64_t)i;
        for (size_t j = 0; j < n; j++) {
            state = state * 6364136223846793005ull + 1442695040888963407ull;
            /* bf16 of a small value: sign, exponent near 2^-6, 7 random mantissa bits. */
            w16[j] = (uint16_t)(0x3c80u | ((state >> 40) & 0x7fu) | ((state >> 20) & 0x8000u));
        }
        um_gemm_weight_t *w = NULL;
        int rc = um_gemm_weight_new(s->n, s->k, w16, 1, dtype, &w);
        if (rc != 0) {
            free(w16);
            return rc;
        }
        double *t = malloc((size_t)repeat * sizeof *t);
        um_gemm_weight_apply(w, M, A, s->k, C, s->n, 0); /* warm-up: primitive, pages */
        for (int r = 0; r < repeat; r++) {
            double t0 = s_now_ms();
            rc = um_gemm_weight_apply(w, M, A, s->k, C, s->n, 0);
            t[r] = s_now_ms() - t0;
        }
        qsort(t, (size_t)repeat, sizeof *t, s_cmp_double);
        s->ms = t[repeat / 2];
        free(t);
        um_gemm_weight_destroy(&w);
        free(w16);
        if (rc != 0)
            return rc;
    }
    return 0;
}

/* One dtype's figures for the closing table of a run over several dtypes. */
typedef struct s_summary {
    const char *dtype; /* a static name from um_wdtype_name */
    double step_ms, gemm_ms, lm_head_ms;
    double model_mb; /* resident memory that loading and the passes added */
} s_summary_t;

/*
 * Load model_dir with opts, time its forward passes and its bare products, print the
 * report and write the JSON object to json_path (opened with json_mode) when it is set.
 * Returns 0, 1 when a step fails or 2 for --tokens past the model's positions.
 */
static int s_bench_model(const char *model_dir, const um_model_options_t *opts, int tokens,
                         int repeat, int bare, const char *json_path, const char *json_mode,
                         s_summary_t *sum)
{
    double rss_before = s_status_mb("VmRSS:");
    char err[1024] = "";
    um_model_t *model = NULL;
    double load_start = s_now_ms();
    if (um_model_load_opts(model_dir, opts, &model, err, sizeof err) != 0) {
        fprintf(stderr, "forward-bench: %s\n", err);
        return 1;
    }
    double load_ms = s_now_ms() - load_start;
    const um_model_config_t *cfg = um_model_config(model);
    if (tokens > cfg->max_sequence_length) {
        fprintf(stderr, "forward-bench: --tokens %d is past the model's %d positions\n", tokens,
                cfg->max_sequence_length);
        return 2;
    }
    int32_t L = tokens, d = cfg->d_model, V = cfg->embedding_size;
    int32_t q_dim = cfg->n_heads * cfg->head_dim, kv_dim = cfg->n_kv_heads * cfg->head_dim;
    int32_t mlp = cfg->mlp_hidden_size;

    int32_t *ids = malloc((size_t)L * sizeof *ids);
    float *logits = malloc((size_t)L * V * sizeof *logits);
    double *fwd = malloc((size_t)repeat * sizeof *fwd);
    for (int32_t i = 0; i < L; i++)
        ids[i] = i < L / 5 ? (int32_t)(100 + 37 * i) % cfg->vocab_size : cfg->mask_token_id;

    /* Whole passes, then the same passes with the profile attached. */
    um_model_forward(model, ids, 1, L, logits); /* warm-up: primitives, page faults */
    for (int r = 0; r < repeat; r++) {
        double t0 = s_now_ms();
        if (um_model_forward(model, ids, 1, L, logits) != 0) {
            fprintf(stderr, "forward-bench: the forward pass failed\n");
            return 1;
        }
        fwd[r] = s_now_ms() - t0;
    }
    qsort(fwd, (size_t)repeat, sizeof *fwd, s_cmp_double);
    um_forward_profile_t prof = {0};
    um_model_set_profile(model, &prof);
    for (int r = 0; r < repeat; r++)
        um_model_forward(model, ids, 1, L, logits);
    um_model_set_profile(model, NULL);
    /* Peak memory of loading and running the model, before the bare products allocate
     * weights of their own. */
    double peak_rss_mb = s_peak_rss_mb();
    double model_mb = s_status_mb("VmRSS:") - rss_before;

    /* The weight products of one pass: per layer q, k, v, attn_out, gate, up, down. */
    s_shape_t shapes[] = {
        {q_dim, d, cfg->n_layers, 0},  {kv_dim, d, 2 * cfg->n_layers, 0},
        {d, q_dim, cfg->n_layers, 0},  {mlp, d, 2 * cfg->n_layers, 0},
        {d, mlp, cfg->n_layers, 0},    {V, d, 1, 0},
    };
    int n_shapes = sizeof shapes / sizeof shapes[0];
    size_t a_floats = (size_t)L * (mlp > d ? mlp : d);
    size_t c_floats = (size_t)L * (V > mlp ? V : mlp);
    float *A = calloc(a_floats, sizeof *A), *C = malloc(c_floats * sizeof *C);
    for (size_t i = 0; i < a_floats; i++)
        A[i] = (float)((i * 2654435761u) % 1000) / 1000.0f - 0.5f;
    if (bare &&
        s_time_bare_products(shapes, n_shapes, L, um_model_weight_dtype(model), repeat, A, C)) {
        fprintf(stderr, "forward-bench: timing the bare products failed\n");
        return 1;
    }

    double mat_flops = 0, bare_ms = 0;
    for (int i = 0; i < n_shapes; i++) {
        mat_flops += 2.0 * L * shapes[i].n * (double)shapes[i].k * shapes[i].count;
        bare_ms += shapes[i].ms * shapes[i].count;
    }
    /* Attention adds 2 L^2 head_dim multiply-adds per head for scores and again for values. */
    double att_flops = 4.0 * L * (double)L * cfg->head_dim * cfg->n_heads * cfg->n_layers;
    double n = (double)prof.passes;
    double step_ms = fwd[repeat / 2];
    double mat_ms = (prof.gemm_ms + prof.lm_head_ms) / n;
    double bare_rate = bare ? mat_flops / (bare_ms * 1e6) : 0.0; /* GFLOP/s, 0: not timed */
    double step_rate = (mat_flops + att_flops) / (step_ms * 1e6);
    const char *wdtype = um_wdtype_name(um_model_weight_dtype(model));

    printf("model %s: d_model %d, %d layers, %d heads, mlp %d, vocab %d\n", model_dir, d,
           cfg->n_layers, cfg->n_heads, mlp, V);
    printf("%d tokens per pass, %s products (%s), attention %s, kernels %s, %d threads, "
           "%d runs\n", L, wdtype, um_model_backend(model), um_attention_backend_name(),
           um_isa_name(um_kernels_isa()), omp_get_max_threads(), repeat);
    printf("%-34s %10s %8s\n", "forward pass, by op", "ms/pass", "share");
    const struct {
        const char *name;
        double ms;
    } rows[] = {
        {"weight products (blocks)", prof.gemm_ms}, {"LM head product", prof.lm_head_ms},
        {"attention (fused)", prof.attention_ms},   {"norms", prof.norm_ms},
        {"RoPE", prof.rope_ms},                     {"SiLU x up", prof.activation_ms},
        {"embedding", prof.other_ms},
    };
    double listed = 0;
    for (size_t i = 0; i < sizeof rows / sizeof rows[0]; i++) {
        printf("%-34s %10.2f %7.1f%%\n", rows[i].name, rows[i].ms / n,
               100.0 * rows[i].ms / prof.total_ms);
        listed += rows[i].ms;
    }
    printf("%-34s %10.2f %7.1f%%\n", "unaccounted", (prof.total_ms - listed) / n,
           100.0 * (prof.total_ms - listed) / prof.total_ms);
    printf("%-34s %10.2f (min %.2f, max %.2f)\n", "whole pass, median", step_ms, fwd[0],
           fwd[repeat - 1]);
    printf("load %.0f ms; peak resident memory of load and passes %.0f MB\n", load_ms,
           peak_rss_mb);
    printf("matrix products: %.1f%% of the pass\n", 100.0 * mat_ms / (prof.total_ms / n));
    if (bare) {
        printf("bare oneDNN %s matmuls of the same shapes: %.2f ms, %.1f GFLOP/s\n", wdtype,
               bare_ms, bare_rate);
        printf("whole pass: %.1f GFLOP/s, %.1f%% of the bare matmul rate\n", step_rate,
               100.0 * step_rate / bare_rate);
    } else {
        printf("whole pass: %.1f GFLOP/s (bare matmuls not timed)\n", step_rate);
    }

    if (json_path) {
        FILE *f = fopen(json_path, json_mode);
        if (!f) {
            perror(json_path);
            return 1;
        }
        fprintf(f, "{\"model\":");
        um_bench_json_string(f, model_dir);
        fprintf(f, ",\"d_model\":%d,\"n_layers\":%d,\"n_heads\":%d,"
                "\"mlp_hidden_size\":%d,\"vocab\":%d,\"tokens\":%d,\"weight_dtype\":\"%s\","
                "\"backend\":\"%s\",\"attention\":\"%s\",\"isa\":\"%s\",\"isa_reason\":\"%s\",\"threads\":%d,"
                "\"repeat\":%d,\"load_ms\":%.1f,\"peak_rss_mb\":%.1f,\"forward_ms_median\":%.3f,\"forward_ms_min\":%.3f,"
                "\"ops_ms\":{\"gemm\":%.3f,\"lm_head\":%.3f,\"attention\":%.3f,\"norm\":%.3f,"
                "\"rope\":%.3f,\"activation\":%.3f,\"embedding\":%.3f,\"total\":%.3f},"
                "\"matrix_share\":%.4f,\"bare_matmul_ms\":%.3f,\"bare_matmul_gflops\":%.2f,"
                "\"forward_gflops\":%.2f,\"fraction_of_bare_rate\":%.4f}\n",
                d, cfg->n_layers, cfg->n_heads, mlp, V, L, wdtype,
                um_model_backend(model), um_attention_backend_name(),
                um_isa_name(um_kernels_isa()), um_kernels_reason(),
                omp_get_max_threads(), repeat, load_ms, peak_rss_mb, step_ms, fwd[0], prof.gemm_ms / n,
                prof.lm_head_ms / n, prof.attention_ms / n, prof.norm_ms / n, prof.rope_ms / n,
                prof.activation_ms / n, prof.other_ms / n, prof.total_ms / n,
                mat_ms / (prof.total_ms / n), bare_ms, bare_rate, step_rate,
                bare ? step_rate / bare_rate : 0.0);
        fclose(f);
    }
    free(A);
    free(C);
    free(ids);
    free(logits);
    free(fwd);
    sum->dtype = wdtype;
    sum->step_ms = step_ms;
    sum->gemm_ms = prof.gemm_ms / n;
    sum->lm_head_ms = prof.lm_head_ms / n;
    sum->model_mb = model_mb;
    um_model_destroy(&model);
    return 0;
}

int main(int argc, char **argv)
{
    const char *model_dir = "models/tinystories", *isa = NULL, *json_path = NULL;
    const char *attention = NULL;
    int tokens = 160, repeat = 5, threads = 0, bare = 1;
    const char *dtypes = "auto";
    static const struct option longopts[] = {
        {"model", required_argument, 0, 'm'},  {"tokens", required_argument, 0, 'n'},
        {"repeat", required_argument, 0, 'r'}, {"threads", required_argument, 0, 't'},
        {"isa", required_argument, 0, 'i'},    {"weight-dtype", required_argument, 0, 'w'},
        {"json", required_argument, 0, 'j'},   {"attention", required_argument, 0, 'a'},
        {"no-bare", no_argument, 0, 'B'},
        {"help", no_argument, 0, 'h'},
        {0, 0, 0, 0}};
    int c;
    while ((c = getopt_long(argc, argv, "", longopts, NULL)) != -1) {
        switch (c) {
        case 'm': model_dir = optarg; break;
        case 'n':
            if (um_bench_parse_int("forward-bench", "--tokens", optarg, 1, &tokens) != 0)
                return 2;
            break;
        case 'r':
            if (um_bench_parse_int("forward-bench", "--repeat", optarg, 1, &repeat) != 0)
                return 2;
            break;
        case 't':
            if (um_bench_parse_int("forward-bench", "--threads", optarg, 1, &threads) != 0)
                return 2;
            break;
        case 'i': isa = optarg; break;
        case 'j': json_path = optarg; break;
        case 'a': attention = optarg; break;
        case 'B': bare = 0; break;
        case 'w': dtypes = optarg; break;
        case 'h': s_usage(stdout); return 0;
        default: s_usage(stderr); return 2;
        }
    }
    if (tokens < 1 || repeat < 1) {
        fprintf(stderr, "forward-bench: --tokens and --repeat must be at least 1\n");
        return 2;
    }
    if (threads > 0)
        omp_set_num_threads(threads);
    um_log_set_level(UM_LOG_WARN);

    /* The dtypes to time, in the order given. */
    um_wdtype_t list[8];
    int n_dtypes = 0;
    char names[64];
    snprintf(names, sizeof names, "%s", dtypes);
    for (char *save = NULL, *tok = strtok_r(names, ",", &save); tok;
         tok = strtok_r(NULL, ",", &save)) {
        if (n_dtypes == (int)(sizeof list / sizeof list[0]) ||
            um_wdtype_parse(tok, &list[n_dtypes]) != 0) {
            fprintf(stderr, "forward-bench: --weight-dtype must be f32, bf16, int8 or auto, or "
                    "a list of at most 8 of them separated by commas, got \"%s\"\n", dtypes);
            return 2;
        }
        n_dtypes++;
    }
    if (n_dtypes == 0) {
        fprintf(stderr, "forward-bench: --weight-dtype is empty\n");
        return 2;
    }

    char err[1024] = "";
    if (um_kernels_select(isa, err, sizeof err) != 0 ||
        um_attention_select(attention, err, sizeof err) != 0) {
        fprintf(stderr, "forward-bench: %s\n", err);
        return 2;
    }
    s_summary_t sums[8];
    for (int i = 0; i < n_dtypes; i++) {
        um_model_options_t opts = {.weight_dtype = list[i]};
        if (i > 0)
            printf("\n");
        int rc = s_bench_model(model_dir, &opts, tokens, repeat, bare, json_path,
                               i == 0 ? "w" : "a", &sums[i]);
        if (rc != 0)
            return rc;
    }
    if (n_dtypes > 1) {
        /* All dtypes run in one process, and a later model may reuse pages that an
         * earlier one freed, which can make its figure smaller. Run one dtype per process
         * for exact memory figures. */
        printf("\n%-6s %12s %10s %14s %12s %18s\n", "dtype", "pass ms", "speedup",
               "weight prod ms", "LM head ms", "RSS added MB");
        for (int i = 0; i < n_dtypes; i++)
            printf("%-6s %12.2f %9.2fx %14.2f %12.2f %18.0f\n", sums[i].dtype, sums[i].step_ms,
                   sums[0].step_ms / sums[i].step_ms, sums[i].gemm_ms, sums[i].lm_head_ms,
                   sums[i].model_mb);
    }
    um_gemm_shutdown();
    return 0;
}
