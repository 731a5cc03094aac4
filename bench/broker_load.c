/*
 * broker-load: a load generator for unmaskd or unmask-broker. It keeps a fixed number
 * of generate requests in flight on one DEALER socket until a total has finished. Then
 * it prints requests and generated tokens per second, the latency from send to final
 * reply, and the mean denoising step time that the workers report (stats.ms_per_step).
 * The step time shows whether the workers slow each other down. bench/broker-bench runs it against one,
 * two and three workers.
 *
 * Threading: single-threaded.
 */
#include "config.h"

#include <errno.h>
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <jansson.h>
#include <zmq.h>

typedef struct s_options {
    const char *endpoint;
    long requests;
    long concurrency;
    long gen_length;
    long steps;
    long wait_workers; /* 0: do not wait */
    double timeout_s;
    const char *model;
} s_options_t;

static double s_now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static void s_usage(FILE *out)
{
    fprintf(out,
            "usage: broker-load --connect ENDPOINT [OPTION]...\n"
            "Send generate requests to unmaskd or unmask-broker and report throughput.\n"
            "\n"
            "  --connect ENDPOINT  daemon or broker front end (required)\n"
            "  --requests N        generate requests in total; default 12\n"
            "  --concurrency N     requests kept in flight; default 6\n"
            "  --gen-length N      tokens per request (steps equal to it); default 32\n"
            "  --model NAME        add \"model\" to each request (a broker routes by it)\n"
            "  --wait-workers N    first wait until info lists N workers (a broker)\n"
            "  --timeout SECONDS   give up when nothing arrives for this long; default 120\n");
}

static int s_parse(int argc, char **argv, s_options_t *o)
{
    static const struct option longopts[] = {
        {"connect", required_argument, NULL, 'c'}, {"requests", required_argument, NULL, 'n'},
        {"concurrency", required_argument, NULL, 'j'}, {"gen-length", required_argument, NULL, 'g'},
        {"model", required_argument, NULL, 'm'}, {"wait-workers", required_argument, NULL, 'w'},
        {"timeout", required_argument, NULL, 't'}, {"help", no_argument, NULL, 'h'},
        {NULL, 0, NULL, 0},
    };
    *o = (s_options_t){.requests = 12, .concurrency = 6, .gen_length = 32, .timeout_s = 120};
    int c;
    while ((c = getopt_long(argc, argv, "", longopts, NULL)) != -1) {
        switch (c) {
        case 'c':
            o->endpoint = optarg;
            break;
        case 'n':
            o->requests = atol(optarg);
            break;
        case 'j':
            o->concurrency = atol(optarg);
            break;
        case 'g':
            o->gen_length = atol(optarg);
            break;
        case 'm':
            o->model = optarg;
            break;
        case 'w':
            o->wait_workers = atol(optarg);
            break;
        case 't':
            o->timeout_s = atof(optarg);
            break;
        case 'h':
            s_usage(stdout);
            exit(0);
        default:
            s_usage(stderr);
            return -1;
        }
    }
    if (!o->endpoint || o->requests < 1 || o->concurrency < 1 || o->gen_length < 1
        || o->timeout_s <= 0) {
        fprintf(stderr, "broker-load: --connect is required, and --requests, --concurrency, "
                "--gen-length and --timeout must be positive\n");
        return -1;
    }
    o->steps = o->gen_length;
    return 0;
}

static int s_send(void *sock, json_t *msg)
{
    char *text = json_dumps(msg, JSON_COMPACT);
    json_decref(msg);
    int rc = text ? zmq_send(sock, text, strlen(text), 0) : -1;
    free(text);
    return rc < 0 ? -1 : 0;
}

/* The next reply, or NULL after timeout_s of silence. */
static json_t *s_recv(void *sock, double timeout_s)
{
    zmq_pollitem_t item = {.socket = sock, .events = ZMQ_POLLIN};
    if (zmq_poll(&item, 1, (long)(timeout_s * 1e3)) <= 0)
        return NULL;
    zmq_msg_t m;
    zmq_msg_init(&m);
    if (zmq_msg_recv(&m, sock, 0) < 0) {
        zmq_msg_close(&m);
        return NULL;
    }
    json_t *r = json_loadb(zmq_msg_data(&m), zmq_msg_size(&m), 0, NULL);
    zmq_msg_close(&m);
    return r;
}

/* Wait until info lists n workers. Returns 0, or -1 after the timeout. */
static int s_wait_workers(void *sock, const s_options_t *o)
{
    double deadline = s_now_s() + o->timeout_s;
    while (s_now_s() < deadline) {
        if (s_send(sock, json_pack("{s:s, s:s}", "op", "info", "id", "wait")) != 0)
            return -1;
        json_t *r = s_recv(sock, 5.0);
        size_t n = json_array_size(json_object_get(r, "workers"));
        json_decref(r);
        if ((long)n >= o->wait_workers)
            return 0;
        struct timespec ts = {0, 100000000L};
        nanosleep(&ts, NULL);
    }
    fprintf(stderr, "broker-load: info did not list %ld workers within %.0f s\n",
            o->wait_workers, o->timeout_s);
    return -1;
}

static int s_compare(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

int main(int argc, char **argv)
{
    s_options_t o;
    if (s_parse(argc, argv, &o) != 0)
        return 2;
    void *ctx = zmq_ctx_new();
    void *sock = zmq_socket(ctx, ZMQ_DEALER);
    int linger = 0;
    zmq_setsockopt(sock, ZMQ_LINGER, &linger, sizeof linger);
    if (zmq_connect(sock, o.endpoint) != 0) {
        fprintf(stderr, "broker-load: cannot connect to %s: %s\n", o.endpoint,
                zmq_strerror(errno));
        return 2;
    }
    if (o.wait_workers > 0 && s_wait_workers(sock, &o) != 0)
        return 1;

    double *sent_at = calloc((size_t)o.requests, sizeof *sent_at);
    double *latency = calloc((size_t)o.requests, sizeof *latency);
    if (!sent_at || !latency)
        return 1;
    long next = 0, finished = 0, errors = 0, in_flight = 0;
    double step_ms_sum = 0; /* the workers' stats.ms_per_step over the done replies */
    double t0 = s_now_s();
    int status = 0;
    while (finished < o.requests) {
        while (in_flight < o.concurrency && next < o.requests) {
            char id[32];
            snprintf(id, sizeof id, "%ld", next);
            json_t *req = json_pack("{s:s, s:s, s:s, s:i, s:i, s:i}", "op", "generate", "id", id,
                                    "prompt", "once upon a time", "gen_length", (int)o.gen_length,
                                    "steps", (int)o.steps, "seed", (int)next);
            if (o.model)
                json_object_set_new(req, "model", json_string(o.model));
            sent_at[next] = s_now_s();
            if (s_send(sock, req) != 0) {
                fprintf(stderr, "broker-load: sending failed: %s\n", zmq_strerror(errno));
                return 1;
            }
            next++;
            in_flight++;
        }
        json_t *r = s_recv(sock, o.timeout_s);
        if (!r) {
            fprintf(stderr, "broker-load: nothing from %s for %.0f s; %ld of %ld finished\n",
                    o.endpoint, o.timeout_s, finished, o.requests);
            status = 1;
            break;
        }
        const char *type = json_string_value(json_object_get(r, "type"));
        const char *id = json_string_value(json_object_get(r, "id"));
        if (type && id && strcmp(type, "step") != 0) {
            long k = atol(id);
            if (k >= 0 && k < o.requests)
                latency[finished] = s_now_s() - sent_at[k];
            step_ms_sum += json_number_value(
                json_object_get(json_object_get(r, "stats"), "ms_per_step"));
            if (strcmp(type, "done") != 0) {
                errors++;
                char *text = json_dumps(r, JSON_COMPACT);
                fprintf(stderr, "broker-load: request %s: %s\n", id, text ? text : "?");
                free(text);
            }
            finished++;
            in_flight--;
        }
        json_decref(r);
    }
    double wall = s_now_s() - t0;
    qsort(latency, (size_t)finished, sizeof *latency, s_compare);
    double p50 = finished ? latency[finished / 2] : 0;
    double p95 = finished ? latency[(finished * 95 - 1) / 100] : 0;
    printf("requests %ld, errors %ld, wall %.2f s, %.2f requests/s, %.1f tokens/s, "
           "latency p50 %.0f ms, p95 %.0f ms, step %.1f ms\n", finished, errors, wall,
           finished / wall, (double)(finished - errors) * o.gen_length / wall, p50 * 1e3,
           p95 * 1e3, finished > errors ? step_ms_sum / (double)(finished - errors) : 0.0);
    free(sent_at);
    free(latency);
    zmq_close(sock);
    zmq_ctx_term(ctx);
    return status != 0 ? status : errors > 0;
}
