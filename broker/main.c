/*
 * unmask-broker: the broker's entry point. Parses the command line, reads the CURVE
 * keys, and runs the broker until SIGINT or SIGTERM. This is the only place that
 * decides to exit the process.
 *
 * Threading: runs on the main thread. The signal handler only writes a byte to a
 * pipe that the broker polls.
 */
#include "config.h"

#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <unmaskd/protocol.h>

#include "broker.h"
#include "curve.h"
#include "log.h"

/* Exit status for a command line that cannot be used, as getopt-based tools do. */
#define S_EXIT_USAGE 2

typedef struct s_options {
    um_broker_config_t cfg;
    const char *curve_key; /* --curve-key file, or NULL */
    const char *keygen;    /* --keygen base name, or NULL */
    int log_level;
} s_options_t;

/* Written by the signal handler, polled by the broker: [0] read end, [1] write end. */
static int s_stop_pipe[2] = {-1, -1};

static void s_usage(FILE *out)
{
    fprintf(out,
            "usage: unmask-broker [OPTION]...\n"
            "Route unmaskd requests from clients to many unmaskd workers (unmaskd --connect).\n"
            "\n"
            "  --frontend ENDPOINT    ZeroMQ endpoint that clients connect to;\n"
            "                         default %s\n"
            "  --backend ENDPOINT     ZeroMQ endpoint that workers connect to;\n"
            "                         default %s\n"
            "  --heartbeat MS         heartbeat interval to and from workers, in\n"
            "                         milliseconds; default %d\n"
            "  --liveness N           heartbeat intervals a worker may stay silent before\n"
            "                         it is declared lost; default %d\n"
            "  --default-model NAME   model of requests without a \"model\" field; default: any\n"
            "                         worker, as long as all workers serve the same models\n"
            "  --max-request-size N   largest request in bytes; larger ones get an error;\n"
            "                         default %d\n"
            "  --curve-key FILE       the broker's CURVE key pair (a .key file): encrypt and\n"
            "                         authenticate every tcp endpoint\n"
            "  --curve-clients DIR    accept only clients whose public key is a .pub file in\n"
            "                         DIR; default: any client that has the broker's key\n"
            "  --curve-workers DIR    accept only workers whose public key is a .pub file in\n"
            "                         DIR; required with --curve-key when the back end is tcp\n"
            "  --insecure             allow tcp endpoints that other hosts can reach without\n"
            "                         CURVE (a trusted network only)\n"
            "  --keygen BASE          write a new key pair to BASE.key (mode 0600) and its\n"
            "                         public key to BASE.pub, then exit\n"
            "  --log-level LEVEL      debug, info, notice, warn or error; default info\n"
            "  --help                 show this help and exit\n"
            "  --version              show the version and exit\n"
            "\n"
            "SIGINT or SIGTERM stops the broker: every request in flight gets a final\n"
            "\"cancelled\" reply, the workers let go of them, and it exits with status 0.\n"
            "See %s/deployment.md.\n",
            UM_BROKER_DEFAULT_FRONTEND, UM_BROKER_DEFAULT_BACKEND, UM_BROKER_DEFAULT_HEARTBEAT_MS,
            UM_BROKER_DEFAULT_LIVENESS, UM_BROKER_DEFAULT_MAX_REQUEST, UM_DOC_DIR);
}

static int s_parse_count(const char *flag, const char *value, long long min, long long max,
                         long long *out)
{
    char *end = NULL;
    errno = 0;
    long long x = strtoll(value, &end, 10);
    if (errno != 0 || end == value || *end != '\0' || x < min || x > max) {
        fprintf(stderr, "unmask-broker: %s must be a whole number in [%lld, %lld], got \"%s\"\n",
                flag, min, max, value);
        return -1;
    }
    *out = x;
    return 0;
}

enum {
    S_OPT_FRONTEND = 256,
    S_OPT_BACKEND,
    S_OPT_HEARTBEAT,
    S_OPT_LIVENESS,
    S_OPT_DEFAULT_MODEL,
    S_OPT_MAX_REQUEST,
    S_OPT_CURVE_KEY,
    S_OPT_CURVE_CLIENTS,
    S_OPT_CURVE_WORKERS,
    S_OPT_INSECURE,
    S_OPT_KEYGEN,
    S_OPT_LOG_LEVEL,
    S_OPT_HELP,
    S_OPT_VERSION,
};

/* Parse argv into opt. Returns 0 to run, 1 when --help or --version was served, -1 on error. */
static int s_parse_options(int argc, char **argv, s_options_t *opt)
{
    static const struct option longopts[] = {
        {"frontend", required_argument, NULL, S_OPT_FRONTEND},
        {"backend", required_argument, NULL, S_OPT_BACKEND},
        {"heartbeat", required_argument, NULL, S_OPT_HEARTBEAT},
        {"liveness", required_argument, NULL, S_OPT_LIVENESS},
        {"default-model", required_argument, NULL, S_OPT_DEFAULT_MODEL},
        {"max-request-size", required_argument, NULL, S_OPT_MAX_REQUEST},
        {"curve-key", required_argument, NULL, S_OPT_CURVE_KEY},
        {"curve-clients", required_argument, NULL, S_OPT_CURVE_CLIENTS},
        {"curve-workers", required_argument, NULL, S_OPT_CURVE_WORKERS},
        {"insecure", no_argument, NULL, S_OPT_INSECURE},
        {"keygen", required_argument, NULL, S_OPT_KEYGEN},
        {"log-level", required_argument, NULL, S_OPT_LOG_LEVEL},
        {"help", no_argument, NULL, S_OPT_HELP},
        {"version", no_argument, NULL, S_OPT_VERSION},
        {NULL, 0, NULL, 0},
    };
    *opt = (s_options_t){
        .cfg = {
            .frontend = UM_BROKER_DEFAULT_FRONTEND,
            .backend = UM_BROKER_DEFAULT_BACKEND,
            .heartbeat_ms = UM_BROKER_DEFAULT_HEARTBEAT_MS,
            .liveness = UM_BROKER_DEFAULT_LIVENESS,
            .max_request_bytes = UM_BROKER_DEFAULT_MAX_REQUEST,
            .stop_fd = -1,
        },
        .log_level = UM_LOG_INFO,
    };

    int c;
    long long x;
    while ((c = getopt_long(argc, argv, "", longopts, NULL)) != -1) {
        switch (c) {
        case S_OPT_FRONTEND:
            opt->cfg.frontend = optarg;
            break;
        case S_OPT_BACKEND:
            opt->cfg.backend = optarg;
            break;
        case S_OPT_HEARTBEAT:
            if (s_parse_count("--heartbeat", optarg, 10, 600000, &x) != 0)
                return -1;
            opt->cfg.heartbeat_ms = (int)x;
            break;
        case S_OPT_LIVENESS:
            if (s_parse_count("--liveness", optarg, 2, 1000, &x) != 0)
                return -1;
            opt->cfg.liveness = (int)x;
            break;
        case S_OPT_DEFAULT_MODEL:
            opt->cfg.default_model = optarg;
            break;
        case S_OPT_MAX_REQUEST:
            if (s_parse_count("--max-request-size", optarg, 1024, 1LL << 32, &x) != 0)
                return -1;
            opt->cfg.max_request_bytes = (size_t)x;
            break;
        case S_OPT_CURVE_KEY:
            opt->curve_key = optarg;
            break;
        case S_OPT_CURVE_CLIENTS:
            opt->cfg.curve_clients = optarg;
            break;
        case S_OPT_CURVE_WORKERS:
            opt->cfg.curve_workers = optarg;
            break;
        case S_OPT_INSECURE:
            opt->cfg.insecure = 1;
            break;
        case S_OPT_KEYGEN:
            opt->keygen = optarg;
            break;
        case S_OPT_LOG_LEVEL:
            opt->log_level = um_log_parse_level(optarg);
            if (opt->log_level < 0) {
                fprintf(stderr, "unmask-broker: --log-level must be debug, info, notice, warn "
                        "or error, got \"%s\"\n", optarg);
                return -1;
            }
            break;
        case S_OPT_HELP:
            s_usage(stdout);
            return 1;
        case S_OPT_VERSION:
            printf("unmask-broker %s (protocol %d, worker protocol %d)\n", PACKAGE_VERSION,
                   UM_PROTOCOL_VERSION, UM_WORKER_PROTOCOL_VERSION);
            return 1;
        default:
            fprintf(stderr, "unmask-broker: run unmask-broker --help for the options\n");
            return -1;
        }
    }
    if (optind < argc) {
        fprintf(stderr, "unmask-broker: unexpected argument \"%s\": unmask-broker takes only "
                "options, see unmask-broker --help\n", argv[optind]);
        return -1;
    }
    if ((opt->cfg.curve_clients || opt->cfg.curve_workers) && !opt->curve_key) {
        fprintf(stderr, "unmask-broker: --curve-clients and --curve-workers need --curve-key "
                "FILE, the broker's own key pair\n");
        return -1;
    }
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

static int s_install_signals(void)
{
    if (pipe(s_stop_pipe) != 0)
        return -1;
    for (int i = 0; i < 2; i++) {
        fcntl(s_stop_pipe[i], F_SETFL, fcntl(s_stop_pipe[i], F_GETFL) | O_NONBLOCK);
        fcntl(s_stop_pipe[i], F_SETFD, FD_CLOEXEC);
    }
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = s_on_signal;
    sigemptyset(&sa.sa_mask);
    if (sigaction(SIGINT, &sa, NULL) != 0 || sigaction(SIGTERM, &sa, NULL) != 0)
        return -1;
    signal(SIGPIPE, SIG_IGN);
    return 0;
}

int main(int argc, char **argv)
{
    s_options_t opt;
    int rc = s_parse_options(argc, argv, &opt);
    if (rc != 0)
        return rc > 0 ? EXIT_SUCCESS : S_EXIT_USAGE;
    um_log_set_level(opt.log_level);

    char err[1024] = "";
    if (opt.keygen) {
        if (um_curve_keygen(opt.keygen, err, sizeof err) != 0) {
            fprintf(stderr, "unmask-broker: %s\n", err);
            return EXIT_FAILURE;
        }
        printf("wrote %s.key (secret, keep it on this host) and %s.pub (public)\n", opt.keygen,
               opt.keygen);
        return EXIT_SUCCESS;
    }

    um_info("main", "unmask-broker %s starting (protocol %d, worker protocol %d)",
            PACKAGE_VERSION, UM_PROTOCOL_VERSION, UM_WORKER_PROTOCOL_VERSION);
    um_curve_keypair_t keys;
    if (opt.curve_key) {
        if (um_curve_load(opt.curve_key, 1, &keys, err, sizeof err) != 0) {
            um_error("main", "%s", err);
            return EXIT_FAILURE;
        }
        opt.cfg.curve = &keys;
        um_info("main", "CURVE public key of this broker: %s", keys.public_key);
    }
    if (s_install_signals() != 0) {
        um_error("main", "cannot install the SIGINT and SIGTERM handlers: %s", strerror(errno));
        return EXIT_FAILURE;
    }
    opt.cfg.stop_fd = s_stop_pipe[0];

    int status = EXIT_FAILURE;
    um_broker_t *broker = NULL;
    if (um_broker_new(&broker, &opt.cfg, err, sizeof err) != 0)
        um_error("main", "%s", err);
    else if (um_broker_run(broker) == 0)
        status = EXIT_SUCCESS;
    um_broker_destroy(&broker);
    for (int i = 0; i < 2; i++)
        close(s_stop_pipe[i]);
    um_info("main", "exiting with status %d", status);
    return status;
}
