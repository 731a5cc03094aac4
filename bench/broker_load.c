/*
 * broker-load: a load generator for unmaskd or unmask-broker. It keeps a fixed number
 * of generate requests in flight, spread over one or more client (DEALER) sockets,
 * until a total has finished. Then it prints requests and generated tokens per second,
 * the latency from send to final reply, and the mean denoising step time that the
 * workers report (stats.ms_per_step). The step time shows whether the workers slow each
 * other down. bench/broker-bench runs it against one, two and three workers, and
 * unmask-bench runs it against one daemon with --json for the full latency
 * distribution.
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
    long clients;      /* DEALER sockets that the requests in flight are spread over */
    long gen_length;
    long steps;        /* 0: equal to gen_length */
    long block_length; /* 0: left out, so the daemon uses gen_length */
    long wait_workers; /* 0: do not wait */
    double timeout_s;
    const char *model;
    const char *prompt;
    const char *json_path; /* NULL: no JSON report */
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
            "  --clients N         client sockets the requests in flight are spread over,\n"
            "                      each its own connection; default 1\n"
            "  --gen-length N      tokens per request; default 32\n"
            "  --steps N           denoising steps per request; default: gen-length\n"
            "  --block-length N    block length per request; default: the daemon's\n"
            "  --prompt TEXT       prompt of every request; default \"once upon a time\"\n"
            "  --model NAME        add \"model\" to each request (a broker routes by it)\n"
            "  --wait-workers N    first wait until info lists N workers (a broker)\n"
            "  --timeout SECONDS   give up when nothing arrives for this long; default 120\n"
            "  --json FILE         also write every figure to FILE as one JSON object\n");
}

static int s_parse(int argc, char **argv, s_options_t *o)
{
    static const struct option longopts[] = {
        {"connect", required_argument, NULL, 'c'}, {"requests", required_argument, NULL, 'n'},
        {"concurrency", required_argument, NULL, 'j'}, {"gen-length", required_argument, NULL, 'g'},
        {"model", required_argument, NULL, 'm'}, {"wait-workers", required_argument, NULL, 'w'},
        {"timeout", required_argument, NULL, 't'}, {"clients", required_argument, NULL, 'C'},
        {"steps", required_argument, NULL, 's'}, {"block-length", required_argument, NULL, 'b'},
        {"prompt", required_argument, NULL, 'p'}, {"json", required_argument, NULL, 'J'},
        {"help", no_argument, NULL, 'h'},
        {NULL, 0, NULL, 0},
    };
    *o = (s_options_t){.requests = 12, .concurrency = 6, .clients = 1, .gen_length = 32,
                       .timeout_s = 120, .prompt = "once upon a time"};
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
        case 'C':
            o->clients = atol(optarg);
            break;
        case 'g':
            o->gen_length = atol(optarg);
            break;
        case 's':
            o->steps = atol(optarg);
            break;
        case 'b':
            o->block_length = atol(optarg);
            break;
        case 'p':
            o->prompt = optarg;
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
        case 'J':
            o->json_path = optarg;
            break;
        case 'h':
            s_usage(stdout);
            exit(0);
        default:
            s_usage(stderr);
            return -1;
        }
    }
    if (!o->endpoint || o->requests < 1 || o->concurrency < 1 || o->clients < 1
        || o->gen_length < 1 || o->steps < 0 || o->block_length < 0 || o->timeout_s <= 0) {
        fprintf(stderr, "broker-load: --connect is required; --requests, --concurrency, "
                "--clients, --gen-length and --timeout must be positive, and --steps and "
                "--block-length at least 1 when given\n");
        return -1;
    }
    if (o->steps == 0)
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

/* The next reply on any of the n sockets, or NULL after timeout_s of silence. */
static json_t *s_recv(void **socks, long n, double timeout_s)
{
    zmq_pollitem_t *items = calloc((size_t)n, sizeof *items);
    if (!items)
        return NULL;
    for (long i = 0; i < n; i++)
        items[i] = (zmq_pollitem_t){.socket = socks[i], .events = ZMQ_POLLIN};
    json_t *r = NULL;
    if (zmq_poll(items, (int)n, (long)(timeout_s * 1e3)) > 0) {
        for (long i = 0; i < n && !r; i++) {
            if (!(items[i].revents & ZMQ_POLLIN))
                continue;
            zmq_msg_t m;
            zmq_msg_init(&m);
            if (zmq_msg_recv(&m, socks[i], ZMQ_DONTWAIT) >= 0)
                r = json_loadb(zmq_msg_data(&m), zmq_msg_size(&m), 0, NULL);
            zmq_msg_close(&m);
        }
    }
    free(items);
    return r;
}

/* Wait until info lists n workers. Returns 0, or -1 after the timeout. */
static int s_wait_workers(void *sock, const s_options_t *o)
{
    double deadline = s_now_s() + o->timeout_s;
    while (s_now_s() < deadline) {
        if (s_send(sock, json_pack("{s:s, s:s}", "op", "info", "id", "wait")) != 0)
            return -1;
        json_t *r = s_recv(&sock, 1, 5.0);
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

/* The p-th percentile of n sorted values by the nearest-rank method, 0 when n is 0. */
static double s_percentile(const double *sorted, long n, int p)
{
    if (n == 0)
        return 0;
    long rank = (n * p + 99) / 100;
    return sorted[rank < 1 ? 0 : rank - 1];
}

/* min, mean, p50, p90, p95, p99 and max of n values (sorted in place), in milliseconds. */
static json_t *s_distribution_ms(double *values_s, long n)
{
    qsort(values_s, (size_t)n, sizeof *values_s, s_compare);
    double sum = 0;
    for (long i = 0; i < n; i++)
        sum += values_s[i];
    return json_pack("{s:f, s:f, s:f, s:f, s:f, s:f, s:f}", "min", n ? values_s[0] * 1e3 : 0.0,
                     "mean", n ? sum / (double)n * 1e3 : 0.0,
                     "p50", s_percentile(values_s, n, 50) * 1e3,
                     "p90", s_percentile(values_s, n, 90) * 1e3,
                     "p95", s_percentile(values_s, n, 95) * 1e3,
                     "p99", s_percentile(values_s, n, 99) * 1e3,
                     "max", n ? values_s[n - 1] * 1e3 : 0.0);
}

/* Figures of one run, gathered from the final replies. */
typedef struct s_tally {
    long finished, errors;
    double *latency_s;    /* per finished request: send to final reply */
    double *generation_s; /* per done request: stats.total_ms, without time queued */
    long done;
    double step_ms_sum;        /* stats.ms_per_step over the done replies */
    double forward_passes_sum; /* stats.forward_passes over the done replies */
    double wall_s;
} s_tally_t;

static int s_write_json(const s_options_t *o, s_tally_t *t)
{
    int major, minor, patch;
    zmq_version(&major, &minor, &patch);
    char zver[32];
    snprintf(zver, sizeof zver, "%d.%d.%d", major, minor, patch);
    double tokens = (double)t->done * (double)o->gen_length;
    json_t *j = json_pack(
        "{s:s, s:s, s:I, s:I, s:I, s:I, s:I, s:I, s:I, s:s, s:I, s:I, s:f, s:f, s:f, s:f, "
        "s:f, s:f, s:o, s:o}",
        "endpoint", o->endpoint, "prompt", o->prompt, "requests", (json_int_t)o->requests,
        "concurrency", (json_int_t)o->concurrency, "clients", (json_int_t)o->clients,
        "gen_length", (json_int_t)o->gen_length, "steps", (json_int_t)o->steps,
        "block_length", (json_int_t)o->block_length, "finished", (json_int_t)t->finished,
        "zmq", zver, "done", (json_int_t)t->done, "errors", (json_int_t)t->errors,
        "wall_s", t->wall_s, "requests_per_second", (double)t->finished / t->wall_s,
        "tokens_per_second", tokens / t->wall_s,
        "forward_passes_per_token", tokens > 0 ? t->forward_passes_sum / tokens : 0.0,
        "forward_passes_per_request",
        t->done ? t->forward_passes_sum / (double)t->done : 0.0,
        "ms_per_step_mean", t->done ? t->step_ms_sum / (double)t->done : 0.0,
        "latency_ms", s_distribution_ms(t->latency_s, t->finished),
        "generation_ms", s_distribution_ms(t->generation_s, t->done));
    if (!j) {
        fprintf(stderr, "broker-load: building the JSON report failed\n");
        return -1;
    }
    int rc = json_dump_file(j, o->json_path, JSON_INDENT(1) | JSON_REAL_PRECISION(8));
    json_decref(j);
    if (rc != 0) {
        fprintf(stderr, "broker-load: cannot write %s: %s\n", o->json_path, strerror(errno));
        return -1;
    }
    return 0;
}

/* Send request number k on the client with the fewest requests in flight. */
static int s_send_next(void **socks, long *client_load, long *client_of, const s_options_t *o,
                       long k)
{
    long best = 0;
    for (long i = 1; i < o->clients; i++)
        if (client_load[i] < client_load[best])
            best = i;
    char id[32];
    snprintf(id, sizeof id, "%ld", k);
    json_t *req = json_pack("{s:s, s:s, s:s, s:i, s:i, s:i}", "op", "generate", "id", id,
                            "prompt", o->prompt, "gen_length", (int)o->gen_length, "steps",
                            (int)o->steps, "seed", (int)k);
    if (!req)
        return -1;
    if (o->block_length > 0)
        json_object_set_new(req, "block_length", json_integer(o->block_length));
    if (o->model)
        json_object_set_new(req, "model", json_string(o->model));
    client_of[k] = best;
    client_load[best]++;
    return s_send(socks[best], req);
}

int main(int argc, char **argv)
{
    s_options_t o;
    if (s_parse(argc, argv, &o) != 0)
        return 2;
    void *ctx = zmq_ctx_new();
    void **socks = calloc((size_t)o.clients, sizeof *socks);
    long *client_load = calloc((size_t)o.clients, sizeof *client_load);
    long *client_of = calloc((size_t)o.requests, sizeof *client_of);
    double *sent_at = calloc((size_t)o.requests, sizeof *sent_at);
    s_tally_t t = {.latency_s = calloc((size_t)o.requests, sizeof(double)),
                   .generation_s = calloc((size_t)o.requests, sizeof(double))};
    if (!ctx || !socks || !client_load || !client_of || !sent_at || !t.latency_s
        || !t.generation_s) {
        fprintf(stderr, "broker-load: out of memory for %ld requests and %ld clients\n",
                o.requests, o.clients);
        return 1;
    }
    int linger = 0;
    for (long i = 0; i < o.clients; i++) {
        socks[i] = zmq_socket(ctx, ZMQ_DEALER);
        if (!socks[i]) {
            fprintf(stderr, "broker-load: cannot open client socket %ld: %s\n", i,
                    zmq_strerror(errno));
            return 1;
        }
        zmq_setsockopt(socks[i], ZMQ_LINGER, &linger, sizeof linger);
        if (zmq_connect(socks[i], o.endpoint) != 0) {
            fprintf(stderr, "broker-load: cannot connect to %s: %s\n", o.endpoint,
                    zmq_strerror(errno));
            return 2;
        }
    }
    if (o.wait_workers > 0 && s_wait_workers(socks[0], &o) != 0)
        return 1;

    long next = 0, in_flight = 0;
    double t0 = s_now_s();
    int status = 0;
    while (t.finished < o.requests) {
        while (in_flight < o.concurrency && next < o.requests) {
            sent_at[next] = s_now_s();
            if (s_send_next(socks, client_load, client_of, &o, next) != 0) {
                fprintf(stderr, "broker-load: sending request %ld failed: %s\n", next,
                        zmq_strerror(errno));
                return 1;
            }
            next++;
            in_flight++;
        }
        json_t *r = s_recv(socks, o.clients, o.timeout_s);
        if (!r) {
            fprintf(stderr, "broker-load: nothing from %s for %.0f s; %ld of %ld finished\n",
                    o.endpoint, o.timeout_s, t.finished, o.requests);
            status = 1;
            break;
        }
        const char *type = json_string_value(json_object_get(r, "type"));
        const char *id = json_string_value(json_object_get(r, "id"));
        if (type && id && strcmp(type, "step") != 0) {
            long k = atol(id);
            if (k >= 0 && k < o.requests) {
                t.latency_s[t.finished] = s_now_s() - sent_at[k];
                client_load[client_of[k]]--;
            }
            if (strcmp(type, "done") == 0) {
                json_t *stats = json_object_get(r, "stats");
                t.step_ms_sum += json_number_value(json_object_get(stats, "ms_per_step"));
                t.forward_passes_sum +=
                    json_number_value(json_object_get(stats, "forward_passes"));
                t.generation_s[t.done++] =
                    json_number_value(json_object_get(stats, "total_ms")) / 1e3;
            } else {
                t.errors++;
                char *text = json_dumps(r, JSON_COMPACT);
                fprintf(stderr, "broker-load: request %s: %s\n", id, text ? text : "?");
                free(text);
            }
            t.finished++;
            in_flight--;
        }
        json_decref(r);
    }
    t.wall_s = s_now_s() - t0;

    double *sorted = malloc((size_t)(t.finished ? t.finished : 1) * sizeof *sorted);
    if (!sorted)
        return 1;
    memcpy(sorted, t.latency_s, (size_t)t.finished * sizeof *sorted);
    qsort(sorted, (size_t)t.finished, sizeof *sorted, s_compare);
    printf("requests %ld, errors %ld, wall %.2f s, %.2f requests/s, %.1f tokens/s, "
           "latency p50 %.0f ms, p95 %.0f ms, step %.1f ms\n", t.finished, t.errors, t.wall_s,
           t.finished / t.wall_s, (double)t.done * o.gen_length / t.wall_s,
           s_percentile(sorted, t.finished, 50) * 1e3,
           s_percentile(sorted, t.finished, 95) * 1e3,
           t.done ? t.step_ms_sum / (double)t.done : 0.0);
    free(sorted);
    if (o.json_path && s_write_json(&o, &t) != 0)
        status = 1;

    for (long i = 0; i < o.clients; i++)
        zmq_close(socks[i]);
    zmq_ctx_term(ctx);
    free(socks);
    free(client_load);
    free(client_of);
    free(sent_at);
    free(t.latency_s);
    free(t.generation_s);
    return status != 0 ? status : t.errors > 0;
}
