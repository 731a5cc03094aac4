/*
 * unmask: command-line client for unmaskd. Sends one generate request over a
 * ZeroMQ DEALER socket and shows the result. On a terminal it draws a live view of
 * the canvas after every denoising step. Elsewhere it prints plain text, or the
 * final reply as JSON. It speaks only the wire protocol (docs/protocol.md).
 *
 * Threading: single-threaded. SIGINT only writes to a pipe that the receive loop
 * polls, which then sends a cancel for the running request.
 */
#include "config.h"

#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <locale.h>
#include <math.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <time.h>
#include <unistd.h>
#include <wchar.h>

#include <jansson.h>
#include <zmq.h>

#include <unmaskd/protocol.h>

#include "curve.h"

/* Exit statuses: 1 for an error reply, 2 when the daemon cannot be reached or the
   command line is unusable, 130 after Ctrl-C (128 + SIGINT, as shells report it). */
#define S_EXIT_ERROR 1
#define S_EXIT_UNREACHABLE 2
#define S_EXIT_USAGE 2
#define S_EXIT_INTERRUPTED 130

/* gen_length sent when --gen-length is absent, the daemon's own default. */
#define S_DEFAULT_GEN_LENGTH 64
/* Seconds to wait for the "cancelled" reply after Ctrl-C before giving up. */
#define S_CANCEL_WAIT_S 5.0

/* ANSI escape sequences of the live view. */
#define S_DIM "\033[2m"
#define S_BOLD "\033[1m"
#define S_GREEN "\033[1;32m"
#define S_RESET "\033[0m"
#define S_HIDE_CURSOR "\033[?25l"
#define S_SHOW_CURSOR "\033[?25h"
/* One dim block per masked token. */
#define S_MASK_GLYPH "\xe2\x96\x91\xe2\x96\x91" /* U+2591 U+2591 */

typedef struct s_options {
    const char *endpoint;
    long long gen_length; /* -1 when not given, for this and the next three */
    long long steps;
    long long block_length;
    long long seed;
    double temperature; /* NAN when not given, for this, cfg_scale, top_p and eps */
    double cfg_scale;
    double top_p;
    double eps;
    long long top_k;    /* -1 when not given */
    const char *schedule;
    const char *cache;  /* block cache: none, prefix or dual; NULL when not given */
    int ban_eos;
    int suppress_eos;
    int early_stop;
    int trim_eos;
    const char *remasking;
    json_t *params; /* remasking_params from --param, or NULL */
    int json;
    int plain;
    int no_live;
    double step_delay_ms; /* pause after each live redraw, so a fast model can be watched */
    int info;
    const char *score;  /* --score: the answer whose likelihood to estimate, or NULL */
    long long samples;  /* --samples for --score; -1 when not given */
    double timeout_s;
    const char *prompt; /* argument, or "-" for stdin */
    const char *model;  /* for a broker: route to this model, or NULL */
    int retry;          /* for a broker: allow one resend when a worker dies */
    const char *curve_server_key; /* the daemon's or broker's key or key file, or NULL */
    const char *curve_key;        /* this client's key file, or NULL for a fresh pair */
} s_options_t;

/* ------------------------------------------------------------------------- */
/* Command line                                                              */

static void s_usage(FILE *out)
{
    fprintf(out,
            "usage: unmask [OPTION]... PROMPT\n"
            "Generate text with a running unmaskd. PROMPT \"-\" reads the prompt from stdin,\n"
            "without its final line ending.\n"
            "\n"
            "  --connect ENDPOINT     daemon endpoint; default %s\n"
            "  --gen-length N         tokens to generate; default %d\n"
            "  --steps N              denoising steps; default: gen-length\n"
            "  --block-length N       semi-autoregressive block size; default: gen-length\n"
            "  --temperature T        sampling temperature, 0 for greedy; default 0\n"
            "  --top-k K              keep the K most likely tokens, 0 for all; default 0\n"
            "  --top-p P              keep the smallest set of tokens whose probability\n"
            "                         exceeds P, in (0, 1]; default 1 (all)\n"
            "  --remasking NAME       remasking plugin (--info lists them); default\n"
            "                         low_confidence\n"
            "  --param NAME=VALUE     a remasking plugin parameter (repeatable)\n"
            "  --schedule NAME        quota (LLaDA) or timestep (Dream); default: the\n"
            "                         plugin's\n"
            "  --eps E                final time of the timestep schedule; default 0.001\n"
            "  --cache MODE           block cache: none, prefix or dual (Fast-dLLM's\n"
            "                         approximate caches, faster, may change tokens);\n"
            "                         default none\n"
            "  --ban-eos              never generate the end-of-text token\n"
            "  --suppress-eos         commit end-of-text predictions last\n"
            "  --early-stop           stop once only end-of-text follows the first one\n"
            "  --trim-eos             cut the reply at the first end-of-text token\n"
            "  --cfg-scale S          classifier-free guidance scale, 0 for off; default 0\n"
            "  --seed N               random seed; default: the daemon picks one\n"
            "  --json                 print the final reply as JSON\n"
            "  --plain                print the prompt and the generated text only\n"
            "  --no-live              do not redraw the canvas after every step\n"
            "  --step-delay MS        pause this many milliseconds after each live redraw,\n"
            "                         to watch a fast model unmask; default 0\n"
            "  --timeout SECONDS      give up when the daemon sends nothing for this long;\n"
            "                         default 300\n"
            "  --info                 print the daemon's model, plugins and versions as JSON\n"
            "  --score ANSWER         estimate log p(ANSWER | PROMPT) instead of generating\n"
            "                         (Monte-Carlo, as LLaDA); --seed and --cfg-scale apply\n"
            "  --samples N            Monte-Carlo samples for --score; default: the daemon's\n"
            "                         (32)\n"
            "  --model NAME           through unmask-broker: the model to route to\n"
            "  --retry                through unmask-broker: let it resend the request once\n"
            "                         when its worker dies before the first step streamed\n"
            "  --curve-server-key KEY encrypt with CURVE; KEY is the broker's public key, as\n"
            "                         40 Z85 characters or its .pub file\n"
            "  --curve-key FILE       this client's CURVE key pair (a .key file), for a\n"
            "                         broker that accepts listed clients only; default: a\n"
            "                         fresh key pair\n"
            "  --help                 show this help and exit\n"
            "  --version              show the version and exit\n"
            "\n"
            "Exit status: 0 on success, 1 on an error reply, 2 when the daemon does not\n"
            "reply or the command line is invalid, 130 after Ctrl-C (which cancels the\n"
            "request first).\n",
            UM_DEFAULT_ENDPOINT, S_DEFAULT_GEN_LENGTH);
}

static int s_parse_int(const char *flag, const char *value, long long min, long long max,
                       long long *out)
{
    char *end = NULL;
    errno = 0;
    long long x = strtoll(value, &end, 10);
    if (errno != 0 || end == value || *end != '\0' || x < min || x > max) {
        fprintf(stderr, "unmask: %s must be a whole number in [%lld, %lld], got \"%s\"\n", flag,
                min, max, value);
        return -1;
    }
    *out = x;
    return 0;
}

static int s_parse_real(const char *flag, const char *value, double min, double *out)
{
    char *end = NULL;
    errno = 0;
    double x = strtod(value, &end);
    if (errno != 0 || end == value || *end != '\0' || !isfinite(x) || x < min) {
        fprintf(stderr, "unmask: %s must be a finite number >= %g, got \"%s\"\n", flag, min,
                value);
        return -1;
    }
    *out = x;
    return 0;
}

/* Add NAME=VALUE to params; VALUE is read as JSON (a number, true, false), else as a string. */
static int s_parse_param(s_options_t *opt, const char *arg)
{
    const char *eq = strchr(arg, '=');
    if (!eq || eq == arg) {
        fprintf(stderr, "unmask: --param takes NAME=VALUE, e.g. --param alpha=0.5, got \"%s\"\n",
                arg);
        return -1;
    }
    char name[128];
    size_t len = (size_t)(eq - arg);
    if (len >= sizeof name) {
        fprintf(stderr, "unmask: --param name is longer than %zu bytes\n", sizeof name - 1);
        return -1;
    }
    memcpy(name, arg, len);
    name[len] = '\0';
    json_t *value = json_loads(eq + 1, JSON_DECODE_ANY, NULL);
    if (!value || !(json_is_number(value) || json_is_boolean(value) || json_is_string(value))) {
        json_decref(value);
        value = json_string(eq + 1);
    }
    if (!opt->params)
        opt->params = json_object();
    json_object_set_new(opt->params, name, value);
    return 0;
}

enum {
    S_OPT_CONNECT = 256,
    S_OPT_GEN_LENGTH,
    S_OPT_STEPS,
    S_OPT_BLOCK_LENGTH,
    S_OPT_TEMPERATURE,
    S_OPT_TOP_K,
    S_OPT_TOP_P,
    S_OPT_SCHEDULE,
    S_OPT_CACHE,
    S_OPT_EPS,
    S_OPT_BAN_EOS,
    S_OPT_SUPPRESS_EOS,
    S_OPT_EARLY_STOP,
    S_OPT_TRIM_EOS,
    S_OPT_REMASKING,
    S_OPT_PARAM,
    S_OPT_CFG_SCALE,
    S_OPT_SEED,
    S_OPT_JSON,
    S_OPT_PLAIN,
    S_OPT_NO_LIVE,
    S_OPT_STEP_DELAY,
    S_OPT_TIMEOUT,
    S_OPT_INFO,
    S_OPT_SCORE,
    S_OPT_SAMPLES,
    S_OPT_MODEL,
    S_OPT_RETRY,
    S_OPT_CURVE_SERVER_KEY,
    S_OPT_CURVE_KEY,
    S_OPT_HELP,
    S_OPT_VERSION,
};

/* Returns 0 to run, 1 after --help or --version, -1 on a usage error (already printed). */
static int s_parse_options(int argc, char **argv, s_options_t *opt)
{
    static const struct option longopts[] = {
        {"connect", required_argument, NULL, S_OPT_CONNECT},
        {"gen-length", required_argument, NULL, S_OPT_GEN_LENGTH},
        {"steps", required_argument, NULL, S_OPT_STEPS},
        {"block-length", required_argument, NULL, S_OPT_BLOCK_LENGTH},
        {"temperature", required_argument, NULL, S_OPT_TEMPERATURE},
        {"top-k", required_argument, NULL, S_OPT_TOP_K},
        {"top-p", required_argument, NULL, S_OPT_TOP_P},
        {"schedule", required_argument, NULL, S_OPT_SCHEDULE},
        {"cache", required_argument, NULL, S_OPT_CACHE},
        {"eps", required_argument, NULL, S_OPT_EPS},
        {"ban-eos", no_argument, NULL, S_OPT_BAN_EOS},
        {"suppress-eos", no_argument, NULL, S_OPT_SUPPRESS_EOS},
        {"early-stop", no_argument, NULL, S_OPT_EARLY_STOP},
        {"trim-eos", no_argument, NULL, S_OPT_TRIM_EOS},
        {"remasking", required_argument, NULL, S_OPT_REMASKING},
        {"param", required_argument, NULL, S_OPT_PARAM},
        {"cfg-scale", required_argument, NULL, S_OPT_CFG_SCALE},
        {"seed", required_argument, NULL, S_OPT_SEED},
        {"json", no_argument, NULL, S_OPT_JSON},
        {"plain", no_argument, NULL, S_OPT_PLAIN},
        {"no-live", no_argument, NULL, S_OPT_NO_LIVE},
        {"step-delay", required_argument, NULL, S_OPT_STEP_DELAY},
        {"timeout", required_argument, NULL, S_OPT_TIMEOUT},
        {"info", no_argument, NULL, S_OPT_INFO},
        {"score", required_argument, NULL, S_OPT_SCORE},
        {"samples", required_argument, NULL, S_OPT_SAMPLES},
        {"model", required_argument, NULL, S_OPT_MODEL},
        {"retry", no_argument, NULL, S_OPT_RETRY},
        {"curve-server-key", required_argument, NULL, S_OPT_CURVE_SERVER_KEY},
        {"curve-key", required_argument, NULL, S_OPT_CURVE_KEY},
        {"help", no_argument, NULL, S_OPT_HELP},
        {"version", no_argument, NULL, S_OPT_VERSION},
        {NULL, 0, NULL, 0},
    };
    *opt = (s_options_t){
        .endpoint = UM_DEFAULT_ENDPOINT,
        .gen_length = -1,
        .steps = -1,
        .block_length = -1,
        .seed = -1,
        .samples = -1,
        .temperature = NAN,
        .cfg_scale = NAN,
        .top_p = NAN,
        .eps = NAN,
        .top_k = -1,
        .timeout_s = 300,
    };
    int c;
    while ((c = getopt_long(argc, argv, "", longopts, NULL)) != -1) {
        int rc = 0;
        switch (c) {
        case S_OPT_CONNECT:
            opt->endpoint = optarg;
            break;
        case S_OPT_GEN_LENGTH:
            rc = s_parse_int("--gen-length", optarg, 1, INT32_MAX, &opt->gen_length);
            break;
        case S_OPT_STEPS:
            rc = s_parse_int("--steps", optarg, 1, INT32_MAX, &opt->steps);
            break;
        case S_OPT_BLOCK_LENGTH:
            rc = s_parse_int("--block-length", optarg, 1, INT32_MAX, &opt->block_length);
            break;
        case S_OPT_TEMPERATURE:
            rc = s_parse_real("--temperature", optarg, 0, &opt->temperature);
            break;
        case S_OPT_TOP_K:
            rc = s_parse_int("--top-k", optarg, 0, INT32_MAX, &opt->top_k);
            break;
        case S_OPT_TOP_P:
            rc = s_parse_real("--top-p", optarg, 0, &opt->top_p);
            if (rc == 0 && (opt->top_p <= 0 || opt->top_p > 1)) {
                fprintf(stderr, "unmask: --top-p must be in (0, 1], got \"%s\"\n", optarg);
                rc = -1;
            }
            break;
        case S_OPT_SCHEDULE:
            opt->schedule = optarg;
            break;
        case S_OPT_CACHE:
            opt->cache = optarg;
            break;
        case S_OPT_EPS:
            rc = s_parse_real("--eps", optarg, 0, &opt->eps);
            break;
        case S_OPT_BAN_EOS:
            opt->ban_eos = 1;
            break;
        case S_OPT_SUPPRESS_EOS:
            opt->suppress_eos = 1;
            break;
        case S_OPT_EARLY_STOP:
            opt->early_stop = 1;
            break;
        case S_OPT_TRIM_EOS:
            opt->trim_eos = 1;
            break;
        case S_OPT_REMASKING:
            opt->remasking = optarg;
            break;
        case S_OPT_PARAM:
            rc = s_parse_param(opt, optarg);
            break;
        case S_OPT_CFG_SCALE:
            rc = s_parse_real("--cfg-scale", optarg, 0, &opt->cfg_scale);
            break;
        case S_OPT_SEED:
            rc = s_parse_int("--seed", optarg, 0, INT64_MAX, &opt->seed);
            break;
        case S_OPT_JSON:
            opt->json = 1;
            break;
        case S_OPT_PLAIN:
            opt->plain = 1;
            break;
        case S_OPT_NO_LIVE:
            opt->no_live = 1;
            break;
        case S_OPT_STEP_DELAY:
            rc = s_parse_real("--step-delay", optarg, 0, &opt->step_delay_ms);
            if (rc == 0 && opt->step_delay_ms > 10000) {
                fprintf(stderr, "unmask: --step-delay must be at most 10000 ms, got \"%s\"\n",
                        optarg);
                rc = -1;
            }
            break;
        case S_OPT_TIMEOUT:
            rc = s_parse_real("--timeout", optarg, 0, &opt->timeout_s);
            if (rc == 0 && opt->timeout_s <= 0) {
                fprintf(stderr, "unmask: --timeout must be more than 0 seconds, got \"%s\"\n",
                        optarg);
                rc = -1;
            }
            break;
        case S_OPT_INFO:
            opt->info = 1;
            break;
        case S_OPT_SCORE:
            opt->score = optarg;
            break;
        case S_OPT_SAMPLES:
            rc = s_parse_int("--samples", optarg, 1, 4096, &opt->samples);
            break;
        case S_OPT_MODEL:
            opt->model = optarg;
            break;
        case S_OPT_RETRY:
            opt->retry = 1;
            break;
        case S_OPT_CURVE_SERVER_KEY:
            opt->curve_server_key = optarg;
            break;
        case S_OPT_CURVE_KEY:
            opt->curve_key = optarg;
            break;
        case S_OPT_HELP:
            s_usage(stdout);
            return 1;
        case S_OPT_VERSION:
            printf("unmask %s (protocol %d)\n", PACKAGE_VERSION, UM_PROTOCOL_VERSION);
            return 1;
        default:
            rc = -1;
            break;
        }
        if (rc != 0) {
            fprintf(stderr, "unmask: run unmask --help for the options\n");
            return -1;
        }
    }
    if (opt->curve_key && !opt->curve_server_key) {
        fprintf(stderr, "unmask: --curve-key needs --curve-server-key, the public key of the "
                "daemon or broker to encrypt for\n");
        return -1;
    }
    if (opt->samples > 0 && !opt->score) {
        fprintf(stderr, "unmask: --samples applies to --score only\n");
        return -1;
    }
    if (opt->info) {
        if (optind < argc) {
            fprintf(stderr, "unmask: --info takes no prompt\n");
            return -1;
        }
        return 0;
    }
    if (argc - optind != 1) {
        fprintf(stderr, "unmask: %s: give exactly one PROMPT (or - to read it from stdin), "
                "quoted as one argument\n", optind < argc ? "too many arguments" : "no prompt");
        return -1;
    }
    opt->prompt = argv[optind];
    return 0;
}

/* Read all of stdin into a malloc'ed string. */
static char *s_read_stdin(size_t *len)
{
    size_t cap = 4096, n = 0;
    char *buf = malloc(cap);
    while (buf) {
        size_t got = fread(buf + n, 1, cap - n - 1, stdin);
        n += got;
        if (got == 0)
            break;
        if (cap - n - 1 == 0) {
            char *bigger = realloc(buf, cap * 2);
            if (!bigger) {
                free(buf);
                return NULL;
            }
            buf = bigger;
            cap *= 2;
        }
    }
    if (buf) {
        buf[n] = '\0';
        *len = n;
    }
    return buf;
}

/* ------------------------------------------------------------------------- */
/* Signals and time                                                          */

static int s_sigint_pipe[2] = {-1, -1};

static void s_on_sigint(int sig)
{
    int saved = errno;
    char c = (char)sig;
    ssize_t n = write(s_sigint_pipe[1], &c, 1);
    (void)n; /* a full pipe already records the interrupt */
    errno = saved;
}

static void s_install_sigint(void)
{
    if (pipe(s_sigint_pipe) != 0)
        return; /* Ctrl-C then ends the client without a cancel */
    for (int i = 0; i < 2; i++) {
        fcntl(s_sigint_pipe[i], F_SETFL, fcntl(s_sigint_pipe[i], F_GETFL) | O_NONBLOCK);
        fcntl(s_sigint_pipe[i], F_SETFD, FD_CLOEXEC);
    }
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = s_on_sigint;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGINT, &sa, NULL);
}

static double s_now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* ------------------------------------------------------------------------- */
/* Live view                                                                 */

/* The canvas as the client has seen it, one entry per generated position. */
typedef struct s_view {
    int active;      /* drawing on a terminal */
    int32_t n;       /* gen_length */
    char **text;     /* (n) decoded token, NULL while masked */
    int32_t *last;   /* (n) step that committed the position, -1 while masked */
    unsigned char *special; /* (n) 1 for special tokens, shown dim */
    int32_t step;    /* latest step index */
    char status[160];
    const char *prompt;
    int lines;       /* terminal lines the last draw took, to move back over them */
    char *buf;       /* frame under construction */
    size_t len, cap;
} s_view_t;

static int s_view_init(s_view_t *v, int32_t n, const char *prompt)
{
    memset(v, 0, sizeof *v);
    v->n = n;
    v->prompt = prompt;
    v->step = -1;
    v->text = calloc((size_t)n, sizeof *v->text);
    v->last = malloc((size_t)n * sizeof *v->last);
    v->special = calloc((size_t)n, 1);
    if (!v->text || !v->last || !v->special)
        return -1;
    for (int32_t i = 0; i < n; i++)
        v->last[i] = -1;
    return 0;
}

static void s_view_free(s_view_t *v)
{
    for (int32_t i = 0; v->text && i < v->n; i++)
        free(v->text[i]);
    free(v->text);
    free(v->last);
    free(v->special);
    free(v->buf);
}

static void s_put(s_view_t *v, const char *s, size_t len)
{
    if (v->len + len + 1 > v->cap) {
        size_t cap = v->cap ? v->cap : 4096;
        while (v->len + len + 1 > cap)
            cap *= 2;
        char *bigger = realloc(v->buf, cap);
        if (!bigger)
            return;
        v->buf = bigger;
        v->cap = cap;
    }
    memcpy(v->buf + v->len, s, len);
    v->len += len;
    v->buf[v->len] = '\0';
}

static void s_puts(s_view_t *v, const char *s)
{
    s_put(v, s, strlen(s));
}

/* Append text with control characters other than newline and tab shown as '?'. */
static void s_put_text(s_view_t *v, const char *s)
{
    for (; *s; s++) {
        unsigned char c = (unsigned char)*s;
        char out = (c < 0x20 && c != '\n' && c != '\t') || c == 0x7f ? '?' : (char)c;
        s_put(v, &out, 1);
    }
}

static int s_terminal_width(void)
{
    struct winsize ws;
    if (ioctl(STDOUT_FILENO, TIOCGWINSZ, &ws) == 0 && ws.ws_col > 0)
        return ws.ws_col;
    return 80;
}

/* Decode one UTF-8 character at s into *cp; returns its length (1 for a stray byte). */
static int s_utf8_next(const unsigned char *s, uint32_t *cp)
{
    if (s[0] < 0x80) {
        *cp = s[0];
        return 1;
    }
    int n = 1;
    uint32_t x = s[0];
    if (s[0] >= 0xF0) {
        n = 4;
        x = s[0] & 0x07u;
    } else if (s[0] >= 0xE0) {
        n = 3;
        x = s[0] & 0x0Fu;
    } else if (s[0] >= 0xC0) {
        n = 2;
        x = s[0] & 0x1Fu;
    }
    for (int i = 1; i < n; i++) {
        if ((s[i] & 0xC0) != 0x80) {
            *cp = 0xFFFD;
            return 1;
        }
        x = (x << 6) | (s[i] & 0x3Fu);
    }
    *cp = n == 1 ? 0xFFFD : x;
    return n;
}

/*
 * Count the terminal lines that buf takes at the given width, skipping escape
 * sequences. A line that ends exactly at the right margin wraps only when more
 * text follows, as terminals do.
 */
static int s_count_lines(const char *buf, int width)
{
    int lines = 1, col = 0;
    const unsigned char *s = (const unsigned char *)buf;
    while (*s) {
        if (*s == '\033') {
            s++;
            if (*s == '[') {
                s++;
                while (*s && !(*s >= 0x40 && *s <= 0x7E))
                    s++;
                if (*s)
                    s++;
            }
            continue;
        }
        if (*s == '\n') {
            lines++;
            col = 0;
            s++;
            continue;
        }
        uint32_t cp;
        int w;
        if (*s == '\t') {
            w = 8 - col % 8;
            cp = '\t';
            s++;
        } else {
            s += s_utf8_next(s, &cp);
            w = wcwidth((wchar_t)cp);
            if (w < 0)
                w = 1;
        }
        if (col + w > width) {
            lines++;
            col = 0;
        }
        col += w;
    }
    return lines;
}

/* Build the frame: prompt, canvas and status line. */
static void s_view_compose(s_view_t *v)
{
    v->len = 0;
    s_put_text(v, v->prompt);
    for (int32_t i = 0; i < v->n; i++) {
        if (!v->text[i]) {
            s_puts(v, S_DIM S_MASK_GLYPH S_RESET);
            continue;
        }
        const char *style = S_BOLD;
        if (v->last[i] == v->step)
            style = S_GREEN;
        else if (v->special[i])
            style = S_DIM;
        s_puts(v, style);
        s_put_text(v, v->text[i]);
        s_puts(v, S_RESET);
    }
    s_puts(v, "\n" S_DIM);
    s_puts(v, v->status);
    s_puts(v, S_RESET);
}

/* Move the cursor back to the first line of the last frame and clear from there. */
static void s_view_erase(s_view_t *v)
{
    if (v->lines > 1)
        printf("\r\033[%dA\033[J", v->lines - 1);
    else if (v->lines == 1)
        printf("\r\033[J");
    v->lines = 0;
}

/*
 * Redraw in place. NOTE: a frame taller than the terminal cannot be redrawn in place,
 * because the lines scrolled off the top are out of the cursor's reach. The view then
 * repeats the part that scrolled away.
 */
static void s_view_draw(s_view_t *v)
{
    s_view_compose(v);
    s_view_erase(v);
    fputs(v->buf ? v->buf : "", stdout);
    fflush(stdout);
    v->lines = s_count_lines(v->buf ? v->buf : "", s_terminal_width());
}

static void s_view_step(s_view_t *v, json_t *reply)
{
    json_int_t step = json_integer_value(json_object_get(reply, "step"));
    json_int_t steps = json_integer_value(json_object_get(reply, "steps"));
    json_int_t block = json_integer_value(json_object_get(reply, "block"));
    json_int_t blocks = json_integer_value(json_object_get(reply, "blocks"));
    json_int_t masked = json_integer_value(json_object_get(reply, "masked"));
    double step_ms = json_number_value(json_object_get(reply, "step_ms"));
    v->step = (int32_t)step;

    size_t i;
    json_t *e;
    /* NOTE: each token's text is decoded alone, so the live view runs WordPiece words
       together ("and##t"); the final reply's text is spaced right. */
    json_array_foreach(json_object_get(reply, "committed"), i, e) {
        json_int_t pos = json_integer_value(json_object_get(e, "pos"));
        const char *text = json_string_value(json_object_get(e, "text"));
        if (pos < 0 || pos >= v->n)
            continue; /* a mask inside the prompt: the prompt is shown as typed */
        free(v->text[pos]);
        v->text[pos] = strdup(text ? text : "");
        v->last[pos] = (int32_t)step;
        v->special[pos] = json_is_true(json_object_get(e, "special"));
    }
    /*
     * The step's canvas is the daemon's whole state: null where still masked. A position
     * the client has no text for (a step it never saw) shows as "?", and one the canvas
     * marks as masked shows as a mask whatever the client recorded.
     */
    json_t *canvas = json_object_get(reply, "canvas");
    for (int32_t pos = 0; json_is_array(canvas) && pos < v->n; pos++) {
        json_t *t = json_array_get(canvas, (size_t)pos);
        if (json_is_null(t) || !t) {
            free(v->text[pos]);
            v->text[pos] = NULL;
            v->last[pos] = -1;
        } else if (!v->text[pos]) {
            v->text[pos] = strdup("?");
            v->last[pos] = (int32_t)step;
        }
    }
    snprintf(v->status, sizeof v->status,
             "step %lld/%lld  block %lld/%lld  masked %lld  %.1f ms/step%s", (long long)step + 1,
             (long long)steps, (long long)block + 1, (long long)blocks, (long long)masked,
             step_ms, json_is_true(json_object_get(reply, "early_stop")) ? "  early stop" : "");
    s_view_draw(v);
}

/* ------------------------------------------------------------------------- */
/* Talking to the daemon                                                     */

static void s_no_reply(const s_options_t *opt)
{
    fprintf(stderr, "unmask: no reply from %s within %g s: is unmaskd running? start it with: "
            "unmaskd --model DIR\n", opt->endpoint, opt->timeout_s);
}

static int s_send_json(void *sock, json_t *msg)
{
    char *text = json_dumps(msg, JSON_COMPACT);
    if (!text)
        return -1;
    int rc = zmq_send(sock, text, strlen(text), 0);
    free(text);
    return rc < 0 ? -1 : 0;
}

/*
 * Wait for the next reply until deadline (seconds on the monotonic clock). Returns
 * 1 with *out set, 0 on timeout, -2 when Ctrl-C was pressed, -1 on a socket error.
 */
static int s_recv_reply(void *sock, double deadline, json_t **out)
{
    for (;;) {
        double left = deadline - s_now_s();
        if (left <= 0)
            return 0;
        zmq_pollitem_t items[2] = {
            {.socket = sock, .events = ZMQ_POLLIN},
            {.socket = NULL, .fd = s_sigint_pipe[0], .events = ZMQ_POLLIN},
        };
        int n_items = s_sigint_pipe[0] >= 0 ? 2 : 1;
        int rc = zmq_poll(items, n_items, (long)ceil(left * 1e3));
        if (rc < 0 && errno != EINTR)
            return -1;
        if (n_items == 2 && (items[1].revents & ZMQ_POLLIN)) {
            char buf[16];
            ssize_t got = read(s_sigint_pipe[0], buf, sizeof buf);
            (void)got;
            return -2;
        }
        if (rc <= 0 || !(items[0].revents & ZMQ_POLLIN))
            continue;

        zmq_msg_t msg;
        zmq_msg_init(&msg);
        if (zmq_msg_recv(&msg, sock, 0) < 0) {
            zmq_msg_close(&msg);
            if (errno == EINTR)
                continue;
            return -1;
        }
        json_error_t jerr;
        json_t *reply = json_loadb(zmq_msg_data(&msg), zmq_msg_size(&msg), JSON_ALLOW_NUL, &jerr);
        zmq_msg_close(&msg);
        if (!reply || !json_is_object(reply)) {
            fprintf(stderr, "unmask: ignoring a reply that is not a JSON object: %s\n",
                    reply ? "wrong type" : jerr.text);
            json_decref(reply);
            continue;
        }
        *out = reply;
        return 1;
    }
}

static int s_print_error(json_t *reply)
{
    json_t *e = json_object_get(reply, "error");
    const char *code = json_string_value(json_object_get(e, "code"));
    const char *field = json_string_value(json_object_get(e, "field"));
    const char *message = json_string_value(json_object_get(e, "message"));
    fprintf(stderr, "unmask: error %s%s%s: %s\n", code ? code : "(no code)",
            field ? " in field " : "", field ? field : "", message ? message : "(no message)");
    return S_EXIT_ERROR;
}

static json_t *s_build_request(const s_options_t *opt, const char *id, const char *prompt,
                               size_t prompt_len, int stream)
{
    json_t *r = json_object();
    json_object_set_new(r, "op", json_string(UM_OP_GENERATE));
    json_object_set_new(r, "id", json_string(id));
    json_object_set_new(r, "prompt", json_stringn(prompt, prompt_len));
    json_object_set_new(r, "gen_length", json_integer(opt->gen_length > 0 ? opt->gen_length
                                                                         : S_DEFAULT_GEN_LENGTH));
    if (opt->steps > 0)
        json_object_set_new(r, "steps", json_integer(opt->steps));
    if (opt->block_length > 0)
        json_object_set_new(r, "block_length", json_integer(opt->block_length));
    if (!isnan(opt->temperature))
        json_object_set_new(r, "temperature", json_real(opt->temperature));
    if (!isnan(opt->cfg_scale))
        json_object_set_new(r, "cfg_scale", json_real(opt->cfg_scale));
    if (opt->top_k >= 0)
        json_object_set_new(r, "top_k", json_integer(opt->top_k));
    if (!isnan(opt->top_p))
        json_object_set_new(r, "top_p", json_real(opt->top_p));
    if (opt->schedule)
        json_object_set_new(r, "schedule", json_string(opt->schedule));
    if (opt->cache)
        json_object_set_new(r, "cache", json_string(opt->cache));
    if (!isnan(opt->eps))
        json_object_set_new(r, "eps", json_real(opt->eps));
    if (opt->ban_eos)
        json_object_set_new(r, "ban_eos", json_true());
    if (opt->suppress_eos)
        json_object_set_new(r, "suppress_eos_confidence", json_true());
    if (opt->early_stop)
        json_object_set_new(r, "early_stop", json_true());
    if (opt->trim_eos)
        json_object_set_new(r, "trim_eos", json_true());
    if (opt->remasking)
        json_object_set_new(r, "remasking", json_string(opt->remasking));
    if (opt->params)
        json_object_set(r, "remasking_params", opt->params);
    if (opt->seed >= 0)
        json_object_set_new(r, "seed", json_integer(opt->seed));
    json_object_set_new(r, "stream", json_boolean(stream));
    if (opt->model)
        json_object_set_new(r, UM_FIELD_MODEL, json_string(opt->model));
    if (opt->retry)
        json_object_set_new(r, UM_FIELD_RETRY, json_true());
    return r;
}

/* After Ctrl-C: ask the daemon to cancel id and wait briefly for the request's final reply. */
static void s_cancel(void *sock, const char *id)
{
    char cancel_id[96];
    snprintf(cancel_id, sizeof cancel_id, "%s-cancel", id);
    json_t *c = json_object();
    json_object_set_new(c, "op", json_string(UM_OP_CANCEL));
    json_object_set_new(c, "id", json_string(cancel_id));
    json_object_set_new(c, "target", json_string(id));
    s_send_json(sock, c);
    json_decref(c);

    double deadline = s_now_s() + S_CANCEL_WAIT_S;
    json_t *reply = NULL;
    while (s_recv_reply(sock, deadline, &reply) == 1) {
        const char *rid = json_string_value(json_object_get(reply, "id"));
        const char *type = json_string_value(json_object_get(reply, "type"));
        int final = rid && strcmp(rid, id) == 0 && type && strcmp(type, UM_REPLY_STEP) != 0;
        json_decref(reply);
        if (final)
            return;
    }
}

/* Print the result of a done reply in the chosen output mode. */
static void s_print_done(const s_options_t *opt, s_view_t *view, json_t *reply,
                         const char *prompt)
{
    const char *text = json_string_value(json_object_get(reply, "text"));
    if (opt->json) {
        char *s = json_dumps(reply, JSON_COMPACT);
        printf("%s\n", s ? s : "{}");
        free(s);
        return;
    }
    if (!view->active) {
        printf("%s%s\n", prompt, text ? text : "");
        return;
    }
    json_t *st = json_object_get(reply, "stats");
    s_view_erase(view);
    view->len = 0;
    s_put_text(view, prompt);
    s_puts(view, S_BOLD);
    s_put_text(view, text ? text : "");
    s_puts(view, S_RESET);
    printf("%s\n" S_DIM "%lld tokens, %lld steps, %.1f ms/step, %.1f tokens/s, seed %lld" S_RESET
           "\n",
           view->buf ? view->buf : "",
           (long long)json_array_size(json_object_get(reply, "tokens")),
           (long long)json_integer_value(json_object_get(st, "steps")),
           json_number_value(json_object_get(st, "ms_per_step")),
           json_number_value(json_object_get(st, "tokens_per_second")),
           (long long)json_integer_value(json_object_get(reply, "seed")));
}

/* Send the request and handle replies until the final one; returns the exit status. */
static int s_run_generate(const s_options_t *opt, void *sock, const char *prompt,
                          size_t prompt_len)
{
    int live = isatty(STDOUT_FILENO) && !opt->no_live && !opt->plain && !opt->json;
    char id[64];
    snprintf(id, sizeof id, "unmask-%ld", (long)getpid());

    s_view_t view;
    int32_t n = (int32_t)(opt->gen_length > 0 ? opt->gen_length : S_DEFAULT_GEN_LENGTH);
    if (s_view_init(&view, live ? n : 0, prompt) != 0 && live) {
        fprintf(stderr, "unmask: out of memory for a view of %d tokens\n", n);
        s_view_free(&view);
        return S_EXIT_ERROR;
    }
    view.active = live;

    json_t *req = s_build_request(opt, id, prompt, prompt_len, live);
    int rc = s_send_json(sock, req);
    int send_errno = errno;
    json_decref(req);
    if (rc != 0) {
        s_view_free(&view);
        if (send_errno == EINTR) {
            fprintf(stderr, "unmask: interrupted before the request was sent\n");
            return S_EXIT_INTERRUPTED;
        }
        s_no_reply(opt);
        return S_EXIT_UNREACHABLE;
    }
    if (live)
        fputs(S_HIDE_CURSOR, stdout);

    int status = S_EXIT_ERROR;
    for (;;) {
        json_t *reply = NULL;
        int got = s_recv_reply(sock, s_now_s() + opt->timeout_s, &reply);
        if (got == -2) {
            if (live) {
                s_view_erase(&view);
                fputs(S_SHOW_CURSOR, stdout);
                fflush(stdout);
            }
            fprintf(stderr, "unmask: interrupted, cancelling request %s\n", id);
            s_cancel(sock, id);
            status = S_EXIT_INTERRUPTED;
            break;
        }
        if (got <= 0) {
            if (live)
                s_view_erase(&view);
            s_no_reply(opt);
            status = S_EXIT_UNREACHABLE;
            break;
        }
        const char *type = json_string_value(json_object_get(reply, "type"));
        const char *rid = json_string_value(json_object_get(reply, "id"));
        if (!type || (rid && strcmp(rid, id) != 0)) {
            json_decref(reply);
            continue;
        }
        if (strcmp(type, UM_REPLY_STEP) == 0) {
            if (live) {
                s_view_step(&view, reply);
                if (opt->step_delay_ms > 0) {
                    /* The daemon keeps going; its steps wait in the socket's queue. */
                    struct timespec pause = {
                        .tv_sec = (time_t)(opt->step_delay_ms / 1000),
                        .tv_nsec = (long)(fmod(opt->step_delay_ms, 1000) * 1e6)};
                    nanosleep(&pause, NULL);
                }
            }
            json_decref(reply);
            continue;
        }
        if (live)
            s_view_erase(&view);
        if (strcmp(type, UM_REPLY_DONE) == 0) {
            s_print_done(opt, &view, reply, prompt);
            status = 0;
        } else if (strcmp(type, UM_REPLY_CANCELLED) == 0) {
            const char *reason = json_string_value(json_object_get(reply, "reason"));
            fprintf(stderr, "unmask: request %s was cancelled (%s)\n", id,
                    reason ? reason : "no reason given");
            status = S_EXIT_ERROR;
        } else {
            if (opt->json) {
                char *s = json_dumps(reply, JSON_COMPACT);
                printf("%s\n", s ? s : "{}");
                free(s);
            }
            status = s_print_error(reply);
        }
        json_decref(reply);
        break;
    }
    if (live)
        fputs(S_SHOW_CURSOR, stdout);
    fflush(stdout);
    s_view_free(&view);
    return status;
}

static int s_run_info(const s_options_t *opt, void *sock)
{
    json_t *req = json_object();
    json_object_set_new(req, "op", json_string(UM_OP_INFO));
    json_object_set_new(req, "id", json_string("info"));
    if (opt->model)
        json_object_set_new(req, UM_FIELD_MODEL, json_string(opt->model));
    int rc = s_send_json(sock, req);
    json_decref(req);
    json_t *reply = NULL;
    if (rc != 0 || s_recv_reply(sock, s_now_s() + opt->timeout_s, &reply) != 1) {
        s_no_reply(opt);
        return S_EXIT_UNREACHABLE;
    }
    int status = 0;
    const char *type = json_string_value(json_object_get(reply, "type"));
    if (type && strcmp(type, UM_REPLY_ERROR) == 0) {
        status = s_print_error(reply);
    } else {
        char *s = json_dumps(reply, opt->json ? JSON_COMPACT : JSON_INDENT(2));
        printf("%s\n", s ? s : "{}");
        free(s);
    }
    json_decref(reply);
    return status;
}

/* --score: send a score request and print the estimate, or the reply with --json. */
static int s_run_score(const s_options_t *opt, void *sock, const char *prompt, size_t len)
{
    json_t *req = json_object();
    json_object_set_new(req, "op", json_string(UM_OP_SCORE));
    const char *id = "score";
    json_object_set_new(req, "id", json_string(id));
    json_object_set_new(req, "prompt", json_stringn(prompt, len));
    json_object_set_new(req, "answer", json_string(opt->score));
    if (opt->samples > 0)
        json_object_set_new(req, "n_samples", json_integer(opt->samples));
    if (opt->seed >= 0)
        json_object_set_new(req, "seed", json_integer(opt->seed));
    if (!isnan(opt->cfg_scale))
        json_object_set_new(req, "cfg_scale", json_real(opt->cfg_scale));
    if (opt->model)
        json_object_set_new(req, UM_FIELD_MODEL, json_string(opt->model));
    int rc = s_send_json(sock, req);
    json_decref(req);
    json_t *reply = NULL;
    int got = rc != 0 ? 0 : s_recv_reply(sock, s_now_s() + opt->timeout_s, &reply);
    if (got == -2) {
        fprintf(stderr, "unmask: interrupted, cancelling request %s\n", id);
        s_cancel(sock, id);
        return S_EXIT_INTERRUPTED;
    }
    if (got != 1) {
        s_no_reply(opt);
        return S_EXIT_UNREACHABLE;
    }
    int status = 0;
    const char *type = json_string_value(json_object_get(reply, "type"));
    if (type && strcmp(type, UM_REPLY_ERROR) == 0) {
        status = s_print_error(reply);
    } else if (opt->json) {
        char *s = json_dumps(reply, JSON_COMPACT);
        printf("%s\n", s ? s : "{}");
        free(s);
    } else {
        json_t *st = json_object_get(reply, "stats");
        printf("log p(answer | prompt) = %.4f +- %.4f nats (%lld answer tokens, %lld samples, "
               "%lld forward passes, %.0f ms)\n",
               json_number_value(json_object_get(reply, "log_likelihood")),
               json_number_value(json_object_get(reply, "std_error")),
               (long long)json_integer_value(json_object_get(reply, "answer_tokens")),
               (long long)json_integer_value(json_object_get(reply, "n_samples")),
               (long long)json_integer_value(json_object_get(st, "forward_passes")),
               json_number_value(json_object_get(st, "total_ms")));
    }
    json_decref(reply);
    return status;
}

/* Make sock a CURVE client when --curve-server-key is given; prints the problem. */
static int s_setup_curve(const s_options_t *opt, void *sock)
{
    if (!opt->curve_server_key)
        return 0;
    char err[512];
    char server_key[UM_CURVE_KEY_LEN + 1];
    um_curve_keypair_t own;
    if (um_curve_public_arg(opt->curve_server_key, server_key, err, sizeof err) != 0
        || (opt->curve_key && um_curve_load(opt->curve_key, 1, &own, err, sizeof err) != 0)
        || um_curve_set_client(sock, server_key, opt->curve_key ? &own : NULL, err,
                               sizeof err) != 0) {
        fprintf(stderr, "unmask: %s\n", err);
        return -1;
    }
    return 0;
}

/* ------------------------------------------------------------------------- */

int main(int argc, char **argv)
{
    setlocale(LC_CTYPE, "");
    s_options_t opt;
    int rc = s_parse_options(argc, argv, &opt);
    if (rc != 0) {
        json_decref(opt.params);
        return rc > 0 ? 0 : S_EXIT_USAGE;
    }

    char *stdin_prompt = NULL;
    const char *prompt = opt.prompt;
    size_t prompt_len = prompt ? strlen(prompt) : 0;
    if (prompt && strcmp(prompt, "-") == 0) {
        stdin_prompt = s_read_stdin(&prompt_len);
        if (!stdin_prompt) {
            fprintf(stderr, "unmask: cannot read the prompt from stdin\n");
            return S_EXIT_ERROR;
        }
        /* Drop the one line ending that echo and editors add after the text. */
        if (prompt_len > 0 && stdin_prompt[prompt_len - 1] == '\n')
            stdin_prompt[--prompt_len] = '\0';
        if (prompt_len > 0 && stdin_prompt[prompt_len - 1] == '\r')
            stdin_prompt[--prompt_len] = '\0';
        prompt = stdin_prompt;
    }

    int status = S_EXIT_UNREACHABLE;
    void *ctx = zmq_ctx_new();
    void *sock = ctx ? zmq_socket(ctx, ZMQ_DEALER) : NULL;
    if (!sock) {
        fprintf(stderr, "unmask: cannot create a ZeroMQ socket: %s\n", zmq_strerror(errno));
        goto done;
    }
    int linger = 0;
    zmq_setsockopt(sock, ZMQ_LINGER, &linger, sizeof linger);
    /* Queue the request only on a finished connection, and wait for one at most the
       timeout, so a missing daemon shows as a timeout instead of a silent queue. */
    int immediate = 1;
    zmq_setsockopt(sock, ZMQ_IMMEDIATE, &immediate, sizeof immediate);
    int sndtimeo = opt.timeout_s * 1e3 > INT32_MAX ? -1 : (int)(opt.timeout_s * 1e3);
    zmq_setsockopt(sock, ZMQ_SNDTIMEO, &sndtimeo, sizeof sndtimeo);
    if (s_setup_curve(&opt, sock) != 0)
        goto done;
    if (zmq_connect(sock, opt.endpoint) != 0) {
        fprintf(stderr, "unmask: cannot connect to %s: %s: give an endpoint such as %s\n",
                opt.endpoint, zmq_strerror(errno), UM_DEFAULT_ENDPOINT);
        goto done;
    }
    s_install_sigint();
    if (opt.info)
        status = s_run_info(&opt, sock);
    else if (opt.score)
        status = s_run_score(&opt, sock, prompt, prompt_len);
    else
        status = s_run_generate(&opt, sock, prompt, prompt_len);

done:
    if (sock)
        zmq_close(sock);
    if (ctx)
        zmq_ctx_term(ctx);
    json_decref(opt.params);
    free(stdin_prompt);
    return status;
}
