/*
 * unmask-gateway: the entry point. Parses the command line, starts the HTTP server
 * and serves until SIGINT or SIGTERM. This is the only place that decides to exit.
 *
 * Threading: the main thread blocks SIGINT and SIGTERM before libmicrohttpd starts
 * its threads, so every thread inherits the mask, and then waits for them in
 * sigwait. docs/gateway.md describes the endpoints.
 */
#include "config.h"

#include <errno.h>
#include <getopt.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jansson.h>
#include <microhttpd.h>
#include <zmq.h>

#include <unmaskd/protocol.h>

#include "chat.h"
#include "gateway.h"
#include "http.h"
#include "log.h"

/* Exit status for a command line that cannot be used, as getopt-based tools do. */
#define S_EXIT_USAGE 2

static void s_usage(FILE *out)
{
    fprintf(out,
            "usage: unmask-gateway [OPTION]...\n"
            "Serve a running unmaskd over HTTP: OpenAI-compatible completions, a stream of\n"
            "every denoising step, and a playground page at /.\n"
            "\n"
            "  --connect ENDPOINT     ZeroMQ endpoint of the daemon or broker; default %s\n"
            "  --listen ADDRESS       numeric IPv4 or IPv6 address to serve HTTP on;\n"
            "                         default %s (loopback only)\n"
            "  --port N               TCP port, 0 for a free one; default %d\n"
            "  --model-name NAME      model id in /v1/models and in responses; default: the\n"
            "                         name of the daemon's model folder\n"
            "  --chat-template NAME   how chat messages become a prompt: model (the daemon\n"
            "                         renders the model's own template), llada, plain, or\n"
            "                         auto (model when the daemon renders the model's\n"
            "                         template, else llada when its tokenizer has LLaDA's\n"
            "                         special tokens, else plain); default auto\n"
            "  --max-body-size N      largest request body in bytes; larger ones get 413;\n"
            "                         default %d\n"
            "  --max-connections N    HTTP connections served at once, one thread each;\n"
            "                         default %d\n"
            "  --connect-timeout MS   how long a request waits for a connection to the daemon\n"
            "                         before it gets 503; default %d\n"
            "  --timeout SECONDS      give up on a request when the daemon sends nothing for\n"
            "                         this long (504); default %d\n"
            "  --log-level LEVEL      debug, info, notice, warn or error; default info\n"
            "  --help                 show this help and exit\n"
            "  --version              show the version and exit\n"
            "\n"
            "Once it serves, the gateway prints its URL on stdout, one line, so that a run\n"
            "with --port 0 can be found. SIGINT or SIGTERM stops it; requests still running\n"
            "are cancelled on the daemon. The endpoints are described in\n"
            "%s/gateway.md.\n",
            UM_DEFAULT_ENDPOINT, UM_GW_DEFAULT_LISTEN, UM_GW_DEFAULT_PORT,
            UM_GW_DEFAULT_MAX_BODY, UM_GW_DEFAULT_MAX_CONNECTIONS,
            UM_GW_DEFAULT_CONNECT_TIMEOUT_MS, UM_GW_DEFAULT_TIMEOUT_S, UM_DOC_DIR);
}

/* Parse a whole decimal number in [min, max] for flag. Prints the problem and returns -1. */
static int s_parse_count(const char *flag, const char *value, long long min, long long max,
                         long long *out)
{
    char *end = NULL;
    errno = 0;
    long long x = strtoll(value, &end, 10);
    if (errno != 0 || end == value || *end != '\0' || x < min || x > max) {
        fprintf(stderr, "unmask-gateway: %s must be a whole number in [%lld, %lld], got \"%s\"\n",
                flag, min, max, value);
        return -1;
    }
    *out = x;
    return 0;
}

enum {
    S_OPT_CONNECT = 256,
    S_OPT_LISTEN,
    S_OPT_PORT,
    S_OPT_MODEL_NAME,
    S_OPT_CHAT_TEMPLATE,
    S_OPT_MAX_BODY,
    S_OPT_MAX_CONNECTIONS,
    S_OPT_CONNECT_TIMEOUT,
    S_OPT_TIMEOUT,
    S_OPT_LOG_LEVEL,
    S_OPT_HELP,
    S_OPT_VERSION,
};

/* Parse argv into cfg. Returns 0 to run, 1 after --help or --version, -1 on an error. */
static int s_parse_options(int argc, char **argv, um_gw_config_t *cfg, int *log_level)
{
    static const struct option longopts[] = {
        {"connect", required_argument, NULL, S_OPT_CONNECT},
        {"listen", required_argument, NULL, S_OPT_LISTEN},
        {"port", required_argument, NULL, S_OPT_PORT},
        {"model-name", required_argument, NULL, S_OPT_MODEL_NAME},
        {"chat-template", required_argument, NULL, S_OPT_CHAT_TEMPLATE},
        {"max-body-size", required_argument, NULL, S_OPT_MAX_BODY},
        {"max-connections", required_argument, NULL, S_OPT_MAX_CONNECTIONS},
        {"connect-timeout", required_argument, NULL, S_OPT_CONNECT_TIMEOUT},
        {"timeout", required_argument, NULL, S_OPT_TIMEOUT},
        {"log-level", required_argument, NULL, S_OPT_LOG_LEVEL},
        {"help", no_argument, NULL, S_OPT_HELP},
        {"version", no_argument, NULL, S_OPT_VERSION},
        {NULL, 0, NULL, 0},
    };
    *cfg = (um_gw_config_t){
        .endpoint = UM_DEFAULT_ENDPOINT,
        .listen = UM_GW_DEFAULT_LISTEN,
        .port = UM_GW_DEFAULT_PORT,
        .chat_template = UM_GW_CHAT_AUTO,
        .max_body = UM_GW_DEFAULT_MAX_BODY,
        .max_connections = UM_GW_DEFAULT_MAX_CONNECTIONS,
        .connect_timeout_ms = UM_GW_DEFAULT_CONNECT_TIMEOUT_MS,
        .timeout_ms = UM_GW_DEFAULT_TIMEOUT_S * 1000,
    };
    *log_level = UM_LOG_INFO;
    int c;
    while ((c = getopt_long(argc, argv, "", longopts, NULL)) != -1) {
        long long x = 0;
        int rc = 0;
        switch (c) {
        case S_OPT_CONNECT:
            cfg->endpoint = optarg;
            break;
        case S_OPT_LISTEN:
            cfg->listen = optarg;
            break;
        case S_OPT_PORT:
            rc = s_parse_count("--port", optarg, 0, 65535, &x);
            cfg->port = (int)x;
            break;
        case S_OPT_MODEL_NAME:
            cfg->model_name = optarg;
            if (!*optarg || strlen(optarg) >= 128) {
                fprintf(stderr, "unmask-gateway: --model-name must have 1 to 127 bytes\n");
                rc = -1;
            }
            break;
        case S_OPT_CHAT_TEMPLATE:
            if (um_gw_chat_template_parse(optarg, &cfg->chat_template) != 0) {
                fprintf(stderr, "unmask-gateway: --chat-template must be auto, model, llada or plain, "
                        "got \"%s\"\n", optarg);
                rc = -1;
            }
            break;
        case S_OPT_MAX_BODY:
            rc = s_parse_count("--max-body-size", optarg, 1024, 1LL << 30, &x);
            cfg->max_body = (size_t)x;
            break;
        case S_OPT_MAX_CONNECTIONS:
            rc = s_parse_count("--max-connections", optarg, 1, 4096, &x);
            cfg->max_connections = (int)x;
            break;
        case S_OPT_CONNECT_TIMEOUT:
            rc = s_parse_count("--connect-timeout", optarg, 1, 600000, &x);
            cfg->connect_timeout_ms = (int)x;
            break;
        case S_OPT_TIMEOUT:
            rc = s_parse_count("--timeout", optarg, 1, 86400, &x);
            cfg->timeout_ms = (int)x * 1000;
            break;
        case S_OPT_LOG_LEVEL:
            *log_level = um_log_parse_level(optarg);
            if (*log_level < 0) {
                fprintf(stderr, "unmask-gateway: --log-level must be debug, info, notice, warn "
                        "or error, got \"%s\"\n", optarg);
                rc = -1;
            }
            break;
        case S_OPT_HELP:
            s_usage(stdout);
            return 1;
        case S_OPT_VERSION:
            printf("unmask-gateway %s (protocol %d)\n", PACKAGE_VERSION, UM_PROTOCOL_VERSION);
            return 1;
        default:
            rc = -1;
            break;
        }
        if (rc != 0) {
            fprintf(stderr, "unmask-gateway: run unmask-gateway --help for the options\n");
            return -1;
        }
    }
    if (optind < argc) {
        fprintf(stderr, "unmask-gateway: unexpected argument \"%s\": the gateway takes options "
                "only; run unmask-gateway --help\n", argv[optind]);
        return -1;
    }
    return 0;
}

/* Whether the listen address reaches only this machine. */
static int s_is_loopback(const char *addr)
{
    return strcmp(addr, "localhost") == 0 || strncmp(addr, "127.", 4) == 0
           || strcmp(addr, "::1") == 0 || strcmp(addr, "[::1]") == 0;
}

int main(int argc, char **argv)
{
    static um_gw_t gw; /* static: libmicrohttpd's threads use it until they are joined */
    int log_level = UM_LOG_INFO;
    int rc = s_parse_options(argc, argv, &gw.cfg, &log_level);
    if (rc != 0)
        return rc > 0 ? 0 : S_EXIT_USAGE;
    um_log_set_level(log_level);
    atomic_init(&gw.stopping, 0);
    atomic_init(&gw.active, 0);

    /* Block the stop signals in every thread, so that only sigwait below receives them. */
    sigset_t stop;
    sigemptyset(&stop);
    sigaddset(&stop, SIGINT);
    sigaddset(&stop, SIGTERM);
    pthread_sigmask(SIG_BLOCK, &stop, NULL);
    signal(SIGPIPE, SIG_IGN);

    char err[512];
    if (um_gw_upstream_init(&gw.up, gw.cfg.endpoint, gw.cfg.connect_timeout_ms,
                            gw.cfg.timeout_ms, err, sizeof err) != 0) {
        um_error("gateway", "%s", err);
        return EXIT_FAILURE;
    }
    if (um_gw_http_start(&gw, err, sizeof err) != 0) {
        um_error("gateway", "%s", err);
        um_gw_upstream_fini(&gw.up);
        return EXIT_FAILURE;
    }

    int major, minor, patch;
    zmq_version(&major, &minor, &patch);
    int v6 = strchr(gw.cfg.listen, ':') != NULL && gw.cfg.listen[0] != '[';
    const char *host = strcmp(gw.cfg.listen, "localhost") == 0 ? "127.0.0.1" : gw.cfg.listen;
    um_info("gateway", "unmask-gateway %s serving http://%s%s%s:%u/ for unmaskd at %s "
            "(libmicrohttpd %s, zmq %d.%d.%d, chat template %s, %d connections)", PACKAGE_VERSION,
            v6 ? "[" : "", host, v6 ? "]" : "", gw.port, gw.cfg.endpoint, MHD_get_version(),
            major, minor, patch, um_gw_chat_template_name(gw.cfg.chat_template),
            gw.cfg.max_connections);
    if (!s_is_loopback(gw.cfg.listen))
        um_warn("gateway", "serving on %s, which other machines may reach: the gateway has no "
                "authentication, so anyone who can connect can use the model", gw.cfg.listen);
    printf("http://%s%s%s:%u/\n", v6 ? "[" : "", host, v6 ? "]" : "", gw.port);
    fflush(stdout);

    int sig = 0;
    while (sigwait(&stop, &sig) != 0)
        ;
    um_notice("gateway", "%s received: stopping; running requests are cancelled on the daemon",
              sig == SIGINT ? "SIGINT" : "SIGTERM");
    atomic_store(&gw.stopping, 1);
    um_gw_http_stop(&gw);
    um_gw_upstream_fini(&gw.up);
    um_notice("gateway", "stopped");
    return 0;
}
