/*
 * unmaskd: the daemon's entry point. Parses the command line, loads the model, the
 * plugins and the tokenizer, logs what it found, and runs the server until SIGINT
 * or SIGTERM; SIGHUP reopens the log file. This is the only place that decides to
 * exit the process.
 *
 * Threading: runs on the main thread; the server starts the worker thread. The
 * signal handler only writes the signal's number to a pipe that the server polls.
 */
#include "config.h"

#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <limits.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#include <unmaskd/protocol.h>

#include "curve.h"
#include "kernels.h"
#include "log.h"
#include "model.h"
#include "plugins.h"
#include "server.h"
#include "tokenizer.h"

/* Exit status for a command line that cannot be used, as getopt-based tools do. */
#define S_EXIT_USAGE 2

typedef struct s_options {
    const char *model_dir;
    int model_given;
    const char *endpoint;
    const char **plugin_dirs; /* (n_plugin_dirs) from --plugin-dir, in order */
    size_t n_plugin_dirs;
    const char *tokenizer;    /* NULL: the plugin whose probe scores highest */
    int threads;              /* 0: OpenMP's default */
    const char *isa;          /* --isa cap; NULL: UNMASKD_ISA or none */
    const char *attention;    /* --attention backend; NULL: UNMASKD_ATTENTION or onednn */
    um_wdtype_t weight_dtype; /* 0: auto */
    int log_level;
    size_t max_queue;
    int32_t max_batch;
    size_t max_request_bytes;
    int bind_given;
    const char *connect;          /* --connect: a broker's back end (worker mode), or NULL */
    const char *model_name;       /* --model-name, or NULL */
    const char *curve_key;        /* --curve-key: this daemon's key file, or NULL */
    const char *curve_server_key; /* --curve-server-key: the broker's key or its file */
    const char *curve_clients;    /* --curve-clients: folder of allowed clients' keys */
    int insecure;                 /* --insecure: a public tcp bind without CURVE is fine */
    const char *log_file;         /* --log-file, or NULL for stderr */
    int shutdown_grace_s;
    int32_t max_prompt_tokens;    /* 0: the model's positions (server.h) */
    int32_t max_gen_length;
    int32_t max_steps;
} s_options_t;

/* Written by the signal handler, polled by the server: [0] read end, [1] write end. */
static int s_stop_pipe[2] = {-1, -1};

/* ------------------------------------------------------------------------- */
/* Command line                                                              */

static void s_usage(FILE *out)
{
    fprintf(out,
            "usage: unmaskd [OPTION]...\n"
            "Serve a masked-diffusion language model over ZeroMQ.\n"
            "\n"
            "  --model DIR            Hugging Face model folder (config.json, *.safetensors,\n"
            "                         tokenizer files); default %s\n"
            "  --bind ENDPOINT        ZeroMQ endpoint to listen on; default %s\n"
            "  --plugin-dir DIR       also load plugins from DIR (repeatable); the installed\n"
            "                         folder %s comes first, the colon-separated\n"
            "                         UNMASKD_PLUGIN_PATH last\n"
            "  --tokenizer NAME       tokenizer plugin to use; default: the one that fits the\n"
            "                         model folder best\n"
            "  --threads N            OpenMP threads for the forward pass; default: OpenMP's\n"
            "                         choice (OMP_NUM_THREADS or all cores)\n"
            "  --isa NAME             highest instruction set the kernels may use: scalar,\n"
            "                         avx2, avx512, amx or neon; default: the best this CPU\n"
            "                         runs (UNMASKD_ISA sets the same cap)\n"
            "  --attention NAME       backend of the attention products: onednn or libxsmm\n"
            "                         (x86 builds with libxsmm-dev); default onednn\n"
            "                         (UNMASKD_ATTENTION sets the same)\n"
            "  --list-isas            show which instruction sets this CPU and build can run,\n"
            "                         and why not, then exit\n"
            "  --weight-dtype TYPE, --weights TYPE\n"
            "                         dtype of the stored weight matrices: f32, bf16, int8\n"
            "                         or auto; auto picks bf16 where the CPU computes in\n"
            "                         bf16 (AVX512-BF16 or AMX) or the checkpoint is all\n"
            "                         bf16 (then widened to f32 inside each product), else\n"
            "                         f32; int8 quantises every matrix per output channel\n"
            "                         at load (UNMASKD_WEIGHT_DTYPE sets the same; default\n"
            "                         auto, and UNMASKD_INT8_GEMM=onednn|dequant|auto picks\n"
            "                         how int8 weights are multiplied)\n"
            "  --log-level LEVEL      debug, info, notice, warn or error; default info\n"
            "  --log-file PATH        append the log to PATH instead of stderr; SIGHUP\n"
            "                         reopens it (for logrotate)\n"
            "  --max-queue N          generate requests that may wait behind the running ones;\n"
            "                         more get a \"busy\" error; default %d\n"
            "  --max-batch N          generate requests that run together, sharing each step's\n"
            "                         forward pass; 1 runs one at a time; default %d\n"
            "  --max-request-size N   largest request in bytes; larger ones get an error;\n"
            "                         default %d\n"
            "  --max-prompt-tokens N  longest prompt in tokens; default: the model's positions\n"
            "                         less one\n"
            "  --max-gen-length N     largest gen_length; default: the model's positions\n"
            "  --max-steps N          largest steps; default: no limit (a generation never\n"
            "                         runs more steps than it has masks to fill)\n"
            "  --shutdown-grace SECONDS  after SIGTERM, let accepted generate requests run for\n"
            "                         up to this long before cancelling them; default 0\n"
            "  --curve-key FILE       this daemon's CURVE key pair (a .key file from\n"
            "                         unmask-broker --keygen): with --bind, encrypt a tcp\n"
            "                         endpoint; with --connect, the worker's key\n"
            "  --curve-clients DIR    with --bind and --curve-key: accept only clients whose\n"
            "                         public key is a .pub file in DIR; default: any client\n"
            "                         that has the daemon's public key\n"
            "  --insecure             allow --bind on a tcp address that other hosts can reach\n"
            "                         without --curve-key (a trusted network only)\n"
            "  --connect ENDPOINT     work for an unmask-broker: connect to its back end\n"
            "                         instead of binding (not with --bind)\n"
            "  --model-name NAME      with --connect: the model name clients route by;\n"
            "                         default: the model folder's name\n"
            "  --curve-server-key KEY with --connect: the broker's CURVE public key, as 40\n"
            "                         Z85 characters or its .pub file\n"
            "  --help                 show this help and exit\n"
            "  --version              show the version and exit\n"
            "\n"
            "SIGINT or SIGTERM stops the daemon: accepted generate requests may finish\n"
            "within --shutdown-grace, the rest get a final \"cancelled\" reply, then it\n"
            "exits with status 0. SIGHUP reopens the --log-file.\n"
            "The protocol is described in %s/protocol.md, the security model in\n"
            "%s/security.md.\n",
            UM_MODEL_DIR, UM_DEFAULT_ENDPOINT, UM_PLUGIN_DIR, UM_SERVER_DEFAULT_MAX_QUEUE,
            UM_SERVER_DEFAULT_MAX_BATCH,
            UM_SERVER_DEFAULT_MAX_REQUEST, UM_DOC_DIR, UM_DOC_DIR);
}

/* Parse a whole decimal number in [min, max] for flag; prints the problem and returns -1. */
static int s_parse_count(const char *flag, const char *value, long long min, long long max,
                         long long *out)
{
    char *end = NULL;
    errno = 0;
    long long x = strtoll(value, &end, 10);
    if (errno != 0 || end == value || *end != '\0' || x < min || x > max) {
        fprintf(stderr, "unmaskd: %s must be a whole number in [%lld, %lld], got \"%s\"\n", flag,
                min, max, value);
        return -1;
    }
    *out = x;
    return 0;
}

enum {
    S_OPT_MODEL = 256,
    S_OPT_BIND,
    S_OPT_PLUGIN_DIR,
    S_OPT_TOKENIZER,
    S_OPT_THREADS,
    S_OPT_LOG_LEVEL,
    S_OPT_MAX_QUEUE,
    S_OPT_MAX_BATCH,
    S_OPT_MAX_REQUEST,
    S_OPT_ISA,
    S_OPT_LIST_ISAS,
    S_OPT_ATTENTION,
    S_OPT_WEIGHT_DTYPE,
    S_OPT_CONNECT,
    S_OPT_MODEL_NAME,
    S_OPT_CURVE_KEY,
    S_OPT_CURVE_SERVER_KEY,
    S_OPT_CURVE_CLIENTS,
    S_OPT_INSECURE,
    S_OPT_LOG_FILE,
    S_OPT_SHUTDOWN_GRACE,
    S_OPT_MAX_PROMPT_TOKENS,
    S_OPT_MAX_GEN_LENGTH,
    S_OPT_MAX_STEPS,
    S_OPT_HELP,
    S_OPT_VERSION,
};

/* Print one line per ISA: "NAME yes" or "NAME no: reason". */
static void s_list_isas(void)
{
    for (int i = 0; i < UM_ISA_COUNT; i++) {
        char why[160];
        if (um_isa_supported((um_isa_t)i, why, sizeof why))
            printf("%-7s yes\n", um_isa_name((um_isa_t)i));
        else
            printf("%-7s no: %s\n", um_isa_name((um_isa_t)i), why);
    }
}

/* Check that the worker-mode options fit together; prints the problem and returns -1. */
static int s_check_worker_options(const s_options_t *opt)
{
    if (opt->connect && opt->bind_given) {
        fprintf(stderr, "unmaskd: --bind and --connect exclude each other: a worker receives "
                "requests from its broker and binds nothing\n");
        return -1;
    }
    if (!opt->connect && (opt->model_name || opt->curve_server_key)) {
        fprintf(stderr, "unmaskd: --model-name and --curve-server-key apply to a worker only: "
                "add --connect with the broker's back-end endpoint\n");
        return -1;
    }
    if (opt->connect && (opt->curve_clients || opt->insecure)) {
        fprintf(stderr, "unmaskd: --curve-clients and --insecure apply to --bind only: a "
                "worker's broker decides which clients reach it\n");
        return -1;
    }
    if (opt->connect && !opt->curve_key != !opt->curve_server_key) {
        fprintf(stderr, "unmaskd: CURVE needs both --curve-key (this worker's key pair) and "
                "--curve-server-key (the broker's public key)\n");
        return -1;
    }
    if (opt->curve_clients && !opt->curve_key) {
        fprintf(stderr, "unmaskd: --curve-clients needs --curve-key FILE, the daemon's own "
                "key pair\n");
        return -1;
    }
    return 0;
}

/*
 * Refuse a bind that other hosts can reach without CURVE: anyone who reaches the port
 * could use the model, and prompts and replies would cross the network in clear text.
 * Runs before the model loads, so the daemon exits before it binds anything.
 */
static int s_check_bind_security(const s_options_t *opt)
{
    if (opt->connect || !um_curve_endpoint_is_public(opt->endpoint) || opt->curve_key
        || opt->insecure)
        return 0;
    fprintf(stderr, "unmaskd: --bind %s accepts connections from other hosts, but the socket "
            "has no CURVE key, so anyone who reaches the port could use the model and "
            "prompts and replies would cross the network in clear text: give --curve-key "
            "FILE (and --curve-clients DIR to admit only known clients), or bind to "
            "127.0.0.1 or an ipc:// path, or add --insecure on a network you trust (see "
            "%s/security.md)\n", opt->endpoint, UM_DOC_DIR);
    return -1;
}

/* Parse argv into opt. Returns 0 to run, 1 when --help or --version was served, -1 on error. */
static int s_parse_options(int argc, char **argv, s_options_t *opt)
{
    static const struct option longopts[] = {
        {"model", required_argument, NULL, S_OPT_MODEL},
        {"bind", required_argument, NULL, S_OPT_BIND},
        {"plugin-dir", required_argument, NULL, S_OPT_PLUGIN_DIR},
        {"tokenizer", required_argument, NULL, S_OPT_TOKENIZER},
        {"threads", required_argument, NULL, S_OPT_THREADS},
        {"isa", required_argument, NULL, S_OPT_ISA},
        {"list-isas", no_argument, NULL, S_OPT_LIST_ISAS},
        {"attention", required_argument, NULL, S_OPT_ATTENTION},
        {"weight-dtype", required_argument, NULL, S_OPT_WEIGHT_DTYPE},
        {"weights", required_argument, NULL, S_OPT_WEIGHT_DTYPE},
        {"log-level", required_argument, NULL, S_OPT_LOG_LEVEL},
        {"max-queue", required_argument, NULL, S_OPT_MAX_QUEUE},
        {"max-batch", required_argument, NULL, S_OPT_MAX_BATCH},
        {"max-request-size", required_argument, NULL, S_OPT_MAX_REQUEST},
        {"connect", required_argument, NULL, S_OPT_CONNECT},
        {"model-name", required_argument, NULL, S_OPT_MODEL_NAME},
        {"curve-key", required_argument, NULL, S_OPT_CURVE_KEY},
        {"curve-server-key", required_argument, NULL, S_OPT_CURVE_SERVER_KEY},
        {"curve-clients", required_argument, NULL, S_OPT_CURVE_CLIENTS},
        {"insecure", no_argument, NULL, S_OPT_INSECURE},
        {"log-file", required_argument, NULL, S_OPT_LOG_FILE},
        {"shutdown-grace", required_argument, NULL, S_OPT_SHUTDOWN_GRACE},
        {"max-prompt-tokens", required_argument, NULL, S_OPT_MAX_PROMPT_TOKENS},
        {"max-gen-length", required_argument, NULL, S_OPT_MAX_GEN_LENGTH},
        {"max-steps", required_argument, NULL, S_OPT_MAX_STEPS},
        {"help", no_argument, NULL, S_OPT_HELP},
        {"version", no_argument, NULL, S_OPT_VERSION},
        {NULL, 0, NULL, 0},
    };
    *opt = (s_options_t){
        .model_dir = UM_MODEL_DIR,
        .endpoint = UM_DEFAULT_ENDPOINT,
        .log_level = UM_LOG_INFO,
        .max_queue = UM_SERVER_DEFAULT_MAX_QUEUE,
        .max_batch = UM_SERVER_DEFAULT_MAX_BATCH,
        .max_request_bytes = UM_SERVER_DEFAULT_MAX_REQUEST,
    };
    opt->plugin_dirs = calloc((size_t)argc + 1, sizeof *opt->plugin_dirs);
    if (!opt->plugin_dirs) {
        fprintf(stderr, "unmaskd: out of memory\n");
        return -1;
    }

    int c;
    long long x;
    while ((c = getopt_long(argc, argv, "", longopts, NULL)) != -1) {
        switch (c) {
        case S_OPT_MODEL:
            opt->model_dir = optarg;
            opt->model_given = 1;
            break;
        case S_OPT_BIND:
            opt->endpoint = optarg;
            opt->bind_given = 1;
            break;
        case S_OPT_CONNECT:
            opt->connect = optarg;
            break;
        case S_OPT_MODEL_NAME:
            opt->model_name = optarg;
            break;
        case S_OPT_CURVE_KEY:
            opt->curve_key = optarg;
            break;
        case S_OPT_CURVE_SERVER_KEY:
            opt->curve_server_key = optarg;
            break;
        case S_OPT_CURVE_CLIENTS:
            opt->curve_clients = optarg;
            break;
        case S_OPT_INSECURE:
            opt->insecure = 1;
            break;
        case S_OPT_LOG_FILE:
            opt->log_file = optarg;
            break;
        case S_OPT_SHUTDOWN_GRACE:
            /* A day, so that the grace in milliseconds fits an int. */
            if (s_parse_count("--shutdown-grace", optarg, 0, 86400, &x) != 0)
                return -1;
            opt->shutdown_grace_s = (int)x;
            break;
        case S_OPT_MAX_PROMPT_TOKENS:
            if (s_parse_count("--max-prompt-tokens", optarg, 1, INT32_MAX, &x) != 0)
                return -1;
            opt->max_prompt_tokens = (int32_t)x;
            break;
        case S_OPT_MAX_GEN_LENGTH:
            if (s_parse_count("--max-gen-length", optarg, 1, INT32_MAX, &x) != 0)
                return -1;
            opt->max_gen_length = (int32_t)x;
            break;
        case S_OPT_MAX_STEPS:
            if (s_parse_count("--max-steps", optarg, 1, INT32_MAX, &x) != 0)
                return -1;
            opt->max_steps = (int32_t)x;
            break;
        case S_OPT_PLUGIN_DIR:
            opt->plugin_dirs[opt->n_plugin_dirs++] = optarg;
            break;
        case S_OPT_TOKENIZER:
            opt->tokenizer = optarg;
            break;
        case S_OPT_THREADS:
            if (s_parse_count("--threads", optarg, 1, 4096, &x) != 0)
                return -1;
            opt->threads = (int)x;
            break;
        case S_OPT_ISA:
            opt->isa = optarg;
            break;
        case S_OPT_ATTENTION:
            opt->attention = optarg;
            break;
        case S_OPT_LIST_ISAS:
            s_list_isas();
            return 1;
        case S_OPT_WEIGHT_DTYPE:
            if (um_wdtype_parse(optarg, &opt->weight_dtype) != 0) {
                fprintf(stderr, "unmaskd: --weight-dtype (--weights) must be f32, bf16, int8 "
                        "or auto, got "
                        "\"%s\"\n", optarg);
                return -1;
            }
            break;
        case S_OPT_LOG_LEVEL:
            opt->log_level = um_log_parse_level(optarg);
            if (opt->log_level < 0) {
                fprintf(stderr, "unmaskd: --log-level must be debug, info, notice, warn or "
                        "error, got \"%s\"\n", optarg);
                return -1;
            }
            break;
        case S_OPT_MAX_QUEUE:
            if (s_parse_count("--max-queue", optarg, 0, 1000000, &x) != 0)
                return -1;
            opt->max_queue = (size_t)x;
            break;
        case S_OPT_MAX_BATCH:
            if (s_parse_count("--max-batch", optarg, 1, UM_SERVER_MAX_BATCH, &x) != 0)
                return -1;
            opt->max_batch = (int32_t)x;
            break;
        case S_OPT_MAX_REQUEST:
            /* The upper bound keeps the ZeroMQ frame cap (16 times this) within int64. */
            if (s_parse_count("--max-request-size", optarg, 1024, 1LL << 32, &x) != 0)
                return -1;
            opt->max_request_bytes = (size_t)x;
            break;
        case S_OPT_HELP:
            s_usage(stdout);
            return 1;
        case S_OPT_VERSION:
            printf("unmaskd %s (protocol %d)\n", PACKAGE_VERSION, UM_PROTOCOL_VERSION);
            return 1;
        default:
            fprintf(stderr, "unmaskd: run unmaskd --help for the options\n");
            return -1;
        }
    }
    if (optind < argc) {
        fprintf(stderr, "unmaskd: unexpected argument \"%s\": unmaskd takes only options, see "
                "unmaskd --help\n", argv[optind]);
        return -1;
    }
    if (s_check_worker_options(opt) != 0)
        return -1;
    return s_check_bind_security(opt);
}

/* ------------------------------------------------------------------------- */
/* Startup                                                                   */

/* The plugin search path: the installed folder, each --plugin-dir, UNMASKD_PLUGIN_PATH. */
static char *s_plugin_path(const s_options_t *opt)
{
    const char *env = getenv("UNMASKD_PLUGIN_PATH");
    size_t len = strlen(UM_PLUGIN_DIR) + 2 + (env ? strlen(env) + 1 : 0);
    for (size_t i = 0; i < opt->n_plugin_dirs; i++)
        len += strlen(opt->plugin_dirs[i]) + 1;
    char *path = malloc(len);
    if (!path)
        return NULL;
    strcpy(path, UM_PLUGIN_DIR);
    for (size_t i = 0; i < opt->n_plugin_dirs; i++) {
        strcat(path, ":");
        strcat(path, opt->plugin_dirs[i]);
    }
    if (env && *env) {
        strcat(path, ":");
        strcat(path, env);
    }
    return path;
}

static int s_check_model_dir(const s_options_t *opt)
{
    struct stat st;
    if (stat(opt->model_dir, &st) == 0 && S_ISDIR(st.st_mode))
        return 0;
    if (opt->model_given)
        um_error("main", "model folder %s does not exist or is not a folder: check the path "
                 "given to --model", opt->model_dir);
    else
        um_error("main", "the bundled model folder %s does not exist (was unmaskd installed "
                 "with make install?): pass --model DIR with a Hugging Face model folder",
                 opt->model_dir);
    return -1;
}

static void s_log_model(const um_model_t *model)
{
    const um_model_config_t *c = um_model_config(model);
    um_info("main", "model %s: %s, d_model %d, %d layers, %d heads (%d key/value), head_dim "
            "%d, mlp %d, vocab %d (embedding %d), max positions %d, mask id %d, eos id %d",
            um_model_dir(model), c->model_type, c->d_model, c->n_layers, c->n_heads,
            c->n_kv_heads, c->head_dim, c->mlp_hidden_size, c->vocab_size, c->embedding_size,
            c->max_sequence_length, c->mask_token_id, c->eos_token_id);
    um_info("main", "weights %s on disk, GEMM backend %s, attention %s, kernel ISA %s: %s",
            um_model_dtype(model), um_model_backend(model), um_attention_backend_name(),
            um_isa_name(um_kernels_isa()), um_kernels_reason());
    if (um_model_weight_dtype(model) == UM_WDTYPE_BF16 && !um_gemm_bf16_native())
        um_info("main", "this CPU has no bf16 matrix instructions (AVX512-BF16 or AMX): bf16 "
                "weights are widened to f32 inside each product");
    if (um_model_weight_dtype(model) == UM_WDTYPE_INT8)
        um_info("main", "int8 weights: %s", um_gemm_int8_reason());
}

/* Require a remasking plugin; warn when the default one is missing. */
static int s_check_plugins(const um_plugin_registry_t *reg, const char *path)
{
    size_t n_remask = 0;
    for (size_t i = 0; i < reg->n; i++)
        n_remask += reg->items[i].desc->kind == UM_PLUGIN_REMASK;
    if (n_remask == 0) {
        um_error("main", "no remasking plugin was loaded from %s: build the plugins (make), "
                 "and point --plugin-dir or UNMASKD_PLUGIN_PATH at the folder holding "
                 "low_confidence.so", path);
        return -1;
    }
    if (!um_plugins_find(reg, UM_PLUGIN_REMASK, "low_confidence"))
        um_warn("main", "the default remasking plugin low_confidence is not loaded: requests "
                "must name a remasking plugin");
    return 0;
}

static void s_on_signal(int sig)
{
    int saved = errno;
    char c = (char)sig;
    ssize_t n = write(s_stop_pipe[1], &c, 1);
    (void)n; /* a full pipe already contains a stop request */
    errno = saved;
}

/* Route sig to s_on_signal. */
static int s_catch(int sig)
{
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = s_on_signal;
    sigemptyset(&sa.sa_mask);
    return sigaction(sig, &sa, NULL);
}

/*
 * Create the signal pipe and catch SIGHUP at startup, so that a log rotation while the
 * model loads is served once the server runs instead of ending the process.
 */
static int s_install_hangup(void)
{
    if (pipe(s_stop_pipe) != 0)
        return -1;
    for (int i = 0; i < 2; i++) {
        fcntl(s_stop_pipe[i], F_SETFL, fcntl(s_stop_pipe[i], F_GETFL) | O_NONBLOCK);
        fcntl(s_stop_pipe[i], F_SETFD, FD_CLOEXEC);
    }
    return s_catch(SIGHUP);
}

/*
 * Catch SIGINT and SIGTERM once there is a server to stop them. Until then they end the
 * process at once, which is all that a daemon still loading its model needs.
 */
static int s_install_stop_signals(void)
{
    if (s_catch(SIGINT) != 0 || s_catch(SIGTERM) != 0)
        return -1;
    signal(SIGPIPE, SIG_IGN);
    return 0;
}

/* SIGHUP, on the main thread: open the log file again, for logrotate. */
static void s_on_hangup(void)
{
    char err[512];
    int rc = um_log_reopen(err, sizeof err);
    if (rc > 0)
        um_notice("main", "SIGHUP: log file reopened");
    else if (rc == 0)
        um_info("main", "SIGHUP: the log goes to stderr (no --log-file), nothing to reopen");
    else
        um_warn("main", "SIGHUP: %s; logging to the old file", err);
}

/* ------------------------------------------------------------------------- */

int main(int argc, char **argv)
{
    s_options_t opt;
    int rc = s_parse_options(argc, argv, &opt);
    if (rc != 0) {
        free(opt.plugin_dirs);
        return rc > 0 ? EXIT_SUCCESS : S_EXIT_USAGE;
    }
    um_log_set_level(opt.log_level);
    char err[1024] = "";
    if (opt.log_file && um_log_open_file(opt.log_file, err, sizeof err) != 0) {
        fprintf(stderr, "unmaskd: %s\n", err);
        free(opt.plugin_dirs);
        return EXIT_FAILURE;
    }
    if (s_install_hangup() != 0) {
        fprintf(stderr, "unmaskd: cannot install the SIGHUP handler: %s\n", strerror(errno));
        free(opt.plugin_dirs);
        return EXIT_FAILURE;
    }
    um_info("main", "unmaskd %s starting (protocol %d)", PACKAGE_VERSION, UM_PROTOCOL_VERSION);

    int status = EXIT_FAILURE;
    um_model_t *model = NULL;
    um_plugin_registry_t plugins = {0};
    um_tokenizer_t tok = {0}, tok_worker = {0};
    um_server_t *server = NULL;
    char *plugin_path = NULL;
    um_curve_keypair_t own_keys = {.public_key = "", .secret_key = ""};
    char broker_key[UM_CURVE_KEY_LEN + 1] = "";

    if (s_check_model_dir(&opt) != 0)
        goto done;
    /* Keys are read before the model, so a wrong path fails in a second, not minutes. */
    if ((opt.curve_key && um_curve_load(opt.curve_key, 1, &own_keys, err, sizeof err) != 0)
        || (opt.curve_server_key
            && um_curve_public_arg(opt.curve_server_key, broker_key, err, sizeof err) != 0)) {
        um_error("main", "%s", err);
        goto done;
    }
    if (opt.connect && !opt.curve_key && strncmp(opt.connect, "tcp://127.", 10) != 0
        && strncmp(opt.connect, "ipc://", 6) != 0)
        um_warn("main", "connecting to %s without CURVE: prompts and replies cross the network "
                "in clear text unless the broker's host is this one; give --curve-key and "
                "--curve-server-key (docs/deployment.md)", opt.connect);
#ifdef _OPENMP
    if (opt.threads > 0)
        omp_set_num_threads(opt.threads);
    um_info("main", "OpenMP threads: %d", opt.threads > 0 ? opt.threads : omp_get_max_threads());
#else
    if (opt.threads > 1)
        um_warn("main", "--threads %d has no effect: unmaskd was built without OpenMP",
                opt.threads);
#endif

    rc = um_kernels_select(opt.isa, err, sizeof err);
    if (rc == 0)
        rc = um_attention_select(opt.attention, err, sizeof err);
    if (rc != 0) {
        um_error("main", "%s", err);
        goto done;
    }
    um_model_options_t load_opts = {.weight_dtype = opt.weight_dtype};
    rc = um_model_load_opts(opt.model_dir, &load_opts, &model, err, sizeof err);
    if (rc != 0) {
        um_error("main", "cannot load the model from %s: %s", opt.model_dir, err);
        goto done;
    }
    s_log_model(model);

    plugin_path = s_plugin_path(&opt);
    if (!plugin_path) {
        um_error("main", "out of memory");
        goto done;
    }
    um_info("main", "plugin folders: %s", plugin_path);
    um_plugins_scan(&plugins, plugin_path);
    if (s_check_plugins(&plugins, plugin_path) != 0)
        goto done;

    /* Two instances, because a tokenizer serves one thread at a time (see server.h). */
    rc = um_tokenizer_open(&tok, &plugins, opt.tokenizer, opt.model_dir, err, sizeof err);
    if (rc == 0)
        rc = um_tokenizer_open_copy(&tok_worker, &tok, opt.model_dir, err, sizeof err);
    if (rc != 0) {
        um_error("main", "cannot open a tokenizer: %s", err);
        goto done;
    }
    int32_t vocab = tok.ops->vocab_size(tok.state);
    um_info("main", "tokenizer: plugin %s %s, %d tokens", tok.plugin->desc->name,
            tok.plugin->desc->version ? tok.plugin->desc->version : "", vocab);
    if (vocab > um_model_config(model)->embedding_size)
        um_warn("main", "the tokenizer has %d tokens but the model embeds only %d: the "
                "tokenizer may not belong to this model", vocab,
                um_model_config(model)->embedding_size);

    if (s_install_stop_signals() != 0) {
        um_error("main", "cannot install the SIGINT and SIGTERM handlers: %s", strerror(errno));
        goto done;
    }
    um_server_config_t cfg = {
        .endpoint = opt.endpoint,
        .max_queue = opt.max_queue,
        .max_batch = opt.max_batch,
        .max_request_bytes = opt.max_request_bytes,
        .threads = opt.threads,
        .plugin_path = plugin_path,
        .stop_fd = s_stop_pipe[0],
        .on_hangup = s_on_hangup,
        .shutdown_grace_ms = opt.shutdown_grace_s * 1000,
        .max_prompt_tokens = opt.max_prompt_tokens,
        .max_gen_length = opt.max_gen_length,
        .max_steps = opt.max_steps,
        .curve = opt.curve_key && !opt.connect ? &own_keys : NULL,
        .curve_clients = opt.curve_clients,
        .connect = opt.connect,
        .model_name = opt.model_name,
        .curve_server_key = opt.curve_key && opt.connect ? broker_key : NULL,
        .curve_public_key = own_keys.public_key,
        .curve_secret_key = own_keys.secret_key,
    };
    rc = um_server_new(&server, &cfg, model, &plugins, &tok, &tok_worker, err, sizeof err);
    if (rc != 0) {
        um_error("main", "%s", err);
        goto done;
    }
    if (um_server_run(server) == 0)
        status = EXIT_SUCCESS;

done:
    um_server_destroy(&server);
    um_tokenizer_close(&tok_worker);
    um_tokenizer_close(&tok);
    um_plugins_clear(&plugins);
    um_model_destroy(&model);
    um_gemm_shutdown();
    free(plugin_path);
    free(opt.plugin_dirs);
    for (int i = 0; i < 2; i++)
        if (s_stop_pipe[i] >= 0)
            close(s_stop_pipe[i]);
    um_info("main", "exiting with status %d", status);
    return status;
}
