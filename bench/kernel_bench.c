/*
 * kernel-bench: time every op of the kernel table on every ISA this host can run.
 *
 * Sizes are those of the models: rows of d_model 256 (the bundled model), 2048 and 4096
 * (LLaDA-8B) for the row and element-wise ops, a head of 128 for RoPE, and LLaDA's
 * vocabulary of 126464 logits for the reductions. Each figure is the fastest of several
 * timed batches, in nanoseconds per call and in GB/s of the bytes the op reads and writes
 * through its arguments (a row read twice counts once). Prints a table, and with
 * --json FILE also writes the figures as JSON. Single-threaded, like the kernels.
 * --info prints what unmask-bench records about the build and the ISA choice instead.
 */
#include "config.h"

#include <getopt.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "kernels.h"

#include "bench_util.h"

/* The fastest of s_batches batches, each of at least s_batch_ns, is reported; --quick
 * lowers both, which makes the figures noisier on a busy machine. */
static int s_batches = 5;
static double s_batch_ns = 4e6;

static double s_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1e9 + (double)ts.tv_nsec;
}

/* ------------------------------------------------------------------------- */
/* Operands and one call of each op                                           */

/* Buffers shared by every op, sized for the largest row. */
typedef struct s_operands {
    float *x, *y, *w, *b, *out, *cos_sin;
    uint16_t *half;
} s_operands_t;

/* Results of the reductions go here, so no call can be dropped as unused. */
static volatile double s_sink;

typedef struct s_op {
    const char *name;
    int vocab;          /* 1: timed at the vocabulary size, 0: at the d_model sizes */
    int rope;           /* 1: timed at head_dim 128 only */
    double bytes_per_n; /* bytes read and written per element */
} s_op_t;

static const s_op_t s_ops[] = {
    {"rmsnorm", 0, 0, 12},     {"layernorm", 0, 0, 16},  {"rope", 0, 1, 12},
    {"softmax", 0, 0, 8},      {"silu_mul", 0, 0, 12},   {"gelu_erf", 0, 0, 8},
    {"gelu_tanh", 0, 0, 8},    {"add", 0, 0, 12},        {"bf16_to_f32", 0, 0, 6},
    {"f32_to_bf16", 0, 0, 6},  {"argmax", 1, 0, 4},      {"logsumexp", 1, 0, 4},
    {"vocab_stats", 1, 0, 4},  {"gumbel_argmax", 1, 0, 4},
};
#define S_N_OPS (sizeof s_ops / sizeof s_ops[0])

/* One call of op number op on n elements. */
static void s_call(const um_kernel_table_t *t, size_t op, int32_t n, s_operands_t *o)
{
    um_vocab_stats_t st;
    switch (op) {
    case 0: t->rmsnorm(o->out, o->x, o->w, n, 1e-5f); break;
    case 1: t->layernorm(o->out, o->x, o->w, o->b, n, 1e-5f); break;
    case 2: t->rope(o->out, o->cos_sin, n); break;
    case 3: t->softmax(o->out, n); break;
    case 4: t->silu_mul(o->out, o->x, o->y, n); break;
    case 5: t->gelu_erf(o->out, o->x, n); break;
    case 6: t->gelu_tanh(o->out, o->x, n); break;
    case 7: t->add(o->out, o->x, n); break;
    case 8: t->bf16_to_f32(o->out, o->half, (size_t)n); break;
    case 9: t->f32_to_bf16(o->half, o->x, (size_t)n); break;
    case 10: s_sink = t->argmax(o->x, n); break;
    case 11: s_sink = t->logsumexp(o->x, n); break;
    case 12: t->vocab_stats(o->x, n, 1.0f, &st); s_sink = st.entropy; break;
    case 13: s_sink = t->gumbel_argmax(o->x, n, 1.0, 42, 0); break;
    }
}

/* Nanoseconds per call: batches grow until one lasts s_batch_ns, then the fastest of
 * s_batches such batches counts. */
static double s_time_op(const um_kernel_table_t *t, size_t op, int32_t n, s_operands_t *o)
{
    long reps = 1;
    for (;;) {
        double start = s_now_ns();
        for (long r = 0; r < reps; r++)
            s_call(t, op, n, o);
        double took = s_now_ns() - start;
        if (took >= s_batch_ns || reps >= (1L << 30))
            break;
        reps = took > 0 ? (long)(reps * 1.2 * s_batch_ns / took) + 1 : reps * 16;
    }
    double best = INFINITY;
    for (int b = 0; b < s_batches; b++) {
        /* Softmax and add work in place, so restore the row and keep its values logits. */
        memcpy(o->out, o->y, (size_t)n * sizeof(float));
        double start = s_now_ns();
        for (long r = 0; r < reps; r++)
            s_call(t, op, n, o);
        best = fmin(best, (s_now_ns() - start) / (double)reps);
    }
    return best;
}

/* ------------------------------------------------------------------------- */
/* Report                                                                     */

typedef struct s_result {
    const char *op;
    int32_t n;
    const char *isa;
    double ns, gbps;
} s_result_t;

static int s_write_json(const char *path, const s_result_t *res, size_t count)
{
    FILE *f = fopen(path, "w");
    if (!f) {
        perror(path);
        return -1;
    }
    fprintf(f, "{\n  \"selected_isa\": \"%s\",\n  \"results\": [\n",
            um_isa_name(um_kernels_isa()));
    for (size_t i = 0; i < count; i++)
        fprintf(f, "    {\"op\": \"%s\", \"n\": %d, \"isa\": \"%s\", \"ns_per_call\": %.1f, "
                   "\"gb_per_s\": %.3f}%s\n",
                res[i].op, res[i].n, res[i].isa, res[i].ns, res[i].gbps,
                i + 1 < count ? "," : "");
    fprintf(f, "  ]\n}\n");
    if (fclose(f) != 0) {
        perror(path);
        return -1;
    }
    return 0;
}

/* ------------------------------------------------------------------------- */
/* Build and ISA information (--info)                                        */

#if defined(__clang__)
#define S_COMPILER "clang " __clang_version__
#elif defined(__GNUC__)
#define S_COMPILER "gcc " __VERSION__
#else
#define S_COMPILER "unknown"
#endif

#if defined(__x86_64__)
#define S_ARCH "x86_64"
#elif defined(__aarch64__)
#define S_ARCH "aarch64"
#else
#define S_ARCH "other"
#endif

/* Print the build (version, architecture, compiler, oneDNN, libxsmm) and every ISA with
 * whether this host runs it, and which one the kernels selected and why, as JSON. */
static void s_print_info(void)
{
    printf("{\n  \"version\": ");
    um_bench_json_string(stdout, PACKAGE_VERSION);
    printf(",\n  \"arch\": \"%s\",\n  \"compiler\": ", S_ARCH);
    um_bench_json_string(stdout, S_COMPILER);
    printf(",\n  \"gemm_backend\": ");
    um_bench_json_string(stdout, um_gemm_backend());
    printf(",\n  \"bf16_native\": %s", um_gemm_bf16_native() ? "true" : "false");
    /* Selecting libxsmm succeeds only in a build that has it, and then names its target.
     * The default backend is restored at once; nothing runs in between. */
    char err[256];
    printf(",\n  \"libxsmm\": ");
    if (um_attention_select("libxsmm", err, sizeof err) == 0)
        um_bench_json_string(stdout, um_attention_backend_name());
    else
        printf("null");
    um_attention_select("onednn", err, sizeof err);
    printf(",\n  \"isa\": \"%s\",\n  \"isa_reason\": ", um_isa_name(um_kernels_isa()));
    um_bench_json_string(stdout, um_kernels_reason());
    printf(",\n  \"isas\": [");
    for (int i = 0; i < UM_ISA_COUNT; i++) {
        char why[160] = "";
        int ok = um_isa_supported((um_isa_t)i, why, sizeof why);
        printf("%s\n    {\"name\": \"%s\", \"supported\": %s, \"reason\": ", i ? "," : "",
               um_isa_name((um_isa_t)i), ok ? "true" : "false");
        if (ok)
            printf("null}");
        else {
            um_bench_json_string(stdout, why);
            printf("}");
        }
    }
    printf("\n  ]\n}\n");
}

static void s_usage(FILE *out)
{
    fprintf(out, "usage: kernel-bench [--json FILE] [--isa NAME] [--quick] [--info]\n"
                 "  --json FILE   also write the figures to FILE as JSON\n"
                 "  --isa NAME    highest ISA to time: scalar, avx2, avx512, amx or neon\n"
                 "                (default: UNMASKD_ISA, else the best this host runs)\n"
                 "  --quick       3 batches of 1 ms per figure instead of 5 of 4 ms\n"
                 "  --info        print the build and ISA information as JSON and exit\n"
                 "Times every kernel op on every ISA this host runs, up to the cap.\n");
}

int main(int argc, char **argv)
{
    const char *json_path = NULL, *isa = NULL;
    int info = 0;
    static const struct option opts[] = {
        {"json", required_argument, 0, 'j'}, {"isa", required_argument, 0, 'i'},
        {"quick", no_argument, 0, 'q'},      {"info", no_argument, 0, 'I'},
        {"help", no_argument, 0, 'h'},       {0, 0, 0, 0}};
    int c;
    while ((c = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        switch (c) {
        case 'j': json_path = optarg; break;
        case 'i': isa = optarg; break;
        case 'q':
            s_batches = 3;
            s_batch_ns = 1e6;
            break;
        case 'I': info = 1; break;
        case 'h': s_usage(stdout); return 0;
        default: s_usage(stderr); return 2;
        }
    }
    if (optind < argc) {
        s_usage(stderr);
        return 2;
    }

    char err[256];
    if (um_kernels_select(isa, err, sizeof err) != 0) {
        fprintf(stderr, "kernel-bench: %s\n", err);
        return 2;
    }
    if (info) {
        s_print_info();
        return 0;
    }

    /* Every ISA up to the selected one (UNMASKD_ISA caps it), each table once, because
     * the AMX ISA uses the AVX-512 table. */
    const um_kernel_table_t *tables[UM_ISA_COUNT];
    int n_tables = 0;
    for (int i = 0; i <= (int)um_kernels_isa(); i++) {
        const um_kernel_table_t *t = um_kernels_for((um_isa_t)i);
        if (t && (n_tables == 0 || tables[n_tables - 1] != t))
            tables[n_tables++] = t;
    }

    const int32_t d_sizes[] = {256, 2048, 4096}, vocab = 126464, head_dim = 128;
    s_operands_t o;
    o.x = malloc(vocab * sizeof *o.x);
    o.y = malloc(vocab * sizeof *o.y);
    o.w = malloc(vocab * sizeof *o.w);
    o.b = malloc(vocab * sizeof *o.b);
    o.out = malloc(vocab * sizeof *o.out);
    o.cos_sin = malloc(head_dim * sizeof *o.cos_sin);
    o.half = malloc(vocab * sizeof *o.half);
    s_result_t *res = malloc(S_N_OPS * 3 * UM_ISA_COUNT * sizeof *res);
    if (!o.x || !o.y || !o.w || !o.b || !o.out || !o.cos_sin || !o.half || !res) {
        fprintf(stderr, "kernel-bench: out of memory\n");
        return 1;
    }
    uint64_t state = 1;
    for (int32_t i = 0; i < vocab; i++) {
        state = state * 6364136223846793005ull + 1442695040888963407ull;
        double u = (double)(state >> 11) / 9007199254740992.0;
        o.x[i] = o.y[i] = (float)(20.0 * u - 10.0);
        o.w[i] = (float)(0.5 + u);
        o.b[i] = (float)(u - 0.5);
    }
    um_kernels_scalar()->f32_to_bf16(o.half, o.x, (size_t)vocab);
    for (int32_t i = 0; i < head_dim / 2; i++) {
        double angle = 17.0 * pow(10000.0, -2.0 * i / head_dim);
        o.cos_sin[2 * i] = (float)cos(angle);
        o.cos_sin[2 * i + 1] = (float)sin(angle);
    }

    printf("%-14s %7s", "op", "n");
    for (int k = 0; k < n_tables; k++)
        printf("  %10s %8s", tables[k]->isa, "GB/s");
    if (n_tables > 1)
        printf("  %8s", "speedup");
    printf("\n");

    size_t count = 0;
    for (size_t op = 0; op < S_N_OPS; op++) {
        int32_t sizes[3];
        int n_sizes = 0;
        if (s_ops[op].vocab) {
            sizes[n_sizes++] = vocab;
        } else if (s_ops[op].rope) {
            sizes[n_sizes++] = head_dim;
        } else {
            for (int s = 0; s < 3; s++)
                sizes[n_sizes++] = d_sizes[s];
        }
        for (int s = 0; s < n_sizes; s++) {
            int32_t n = sizes[s];
            printf("%-14s %7d", s_ops[op].name, n);
            double first_ns = 0.0, last_ns = 0.0;
            for (int k = 0; k < n_tables; k++) {
                double ns = s_time_op(tables[k], op, n, &o);
                double gbps = s_ops[op].bytes_per_n * n / ns;
                res[count++] = (s_result_t){s_ops[op].name, n, tables[k]->isa, ns, gbps};
                printf("  %8.0fns %8.2f", ns, gbps);
                if (k == 0)
                    first_ns = ns;
                last_ns = ns;
            }
            if (n_tables > 1)
                printf("  %7.1fx", first_ns / last_ns);
            printf("\n");
            fflush(stdout);
        }
    }
    if (n_tables > 1)
        printf("speedup: %s time over %s time\n", tables[0]->isa, tables[n_tables - 1]->isa);

    int rc = 0;
    if (json_path && s_write_json(json_path, res, count) != 0)
        rc = 1;
    free(o.x);
    free(o.y);
    free(o.w);
    free(o.b);
    free(o.out);
    free(o.cos_sin);
    free(o.half);
    free(res);
    return rc;
}
