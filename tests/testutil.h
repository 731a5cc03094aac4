/*
 * Shared helpers for the Check suites: paths from the environment that make check
 * sets, fixture reading, and starting the real daemon as a child process.
 *
 * NOTE: tests/test_server.c and tests/test_broker.c still carry their own copies of
 * the daemon and socket helpers below.
 */
#ifndef UM_TESTUTIL_H
#define UM_TESTUTIL_H

#include <check.h>
#include <jansson.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

/* Value of an environment variable make check sets; fails the test when unset. */
const char *um_test_env(const char *name);

/* Join two path parts into a static buffer (valid until the next call). */
const char *um_test_path(const char *dir, const char *file);

/* Read a whole file into a malloc'ed, NUL-terminated buffer; NULL on failure. */
char *um_test_read_file(const char *path, size_t *len);

/* Milliseconds since an arbitrary start (CLOCK_MONOTONIC). */
double um_test_now_ms(void);

void um_test_sleep_ms(int ms);

/*
 * Check um_model_forward_ragged on model against separate passes: from ids (n_seq,
 * seq_len, n_seq >= 1, seq_len >= 4) it builds three sequences of different lengths
 * (sequence 0 shortened by two tokens, the last sequence whole, the first three tokens
 * of sequence 0), runs them in one ragged pass with every position a row, and compares
 * each logit with um_model_forward of that sequence alone, within tol relative to 1 +
 * |logit|. name labels failures.
 */
struct um_model;
void um_test_check_ragged(struct um_model *model, const int32_t *ids, int32_t n_seq,
                          int32_t seq_len, double tol, const char *name);

/* Step gens[0..n) together with um_gen_step_batch until every one is done. Fail the
   test when a call fails or the batch does not end within 100000 steps. */
struct um_gen;
void um_test_step_batch_to_end(struct um_gen *const *gens, int n);

/* ------------------------------------------------------------------------- */
/* The real daemon as a child process                                        */

typedef struct um_test_daemon {
    pid_t pid;          /* -1 once it has exited and was waited for */
    char endpoint[160]; /* ipc endpoint it binds, unless extra arguments chose another */
    char log[512];      /* its stderr */
} um_test_daemon_t;

/*
 * Start unmaskd with the test model and plugins on a fresh ipc endpoint, at log level
 * debug with one thread, stderr in UM_TEST_OUT/TAG-PID-N.log (/tmp without UM_TEST_OUT).
 * extra is a NULL-terminated list of further arguments, which win over these (a later
 * --bind replaces the ipc endpoint). Returns 0, or -1 when the spawn fails.
 */
int um_test_daemon_spawn(um_test_daemon_t *d, const char *tag, const char *const *extra);

/*
 * Wait until the daemon replies to health on its endpoint. Returns 0, or -1 when it
 * exits first or does not reply within timeout_ms. Uses a ZeroMQ context of its own.
 */
int um_test_daemon_wait_ready(um_test_daemon_t *d, int timeout_ms);

/* Wait up to timeout_ms for the daemon to exit; returns its wait status, or -1. */
int um_test_daemon_wait_exit(um_test_daemon_t *d, int timeout_ms);

/*
 * Send SIGTERM and wait up to timeout_ms; after that, SIGKILL. Returns the wait status,
 * or -1 when it had to be killed or was not running. Removes the ipc socket file.
 */
int um_test_daemon_stop(um_test_daemon_t *d, int timeout_ms);

/* The process's VmRSS from /proc/PID/status in KiB, or -1. */
long um_test_rss_kib(pid_t pid);

/* ------------------------------------------------------------------------- */
/* ZeroMQ clients                                                            */

/* A DEALER socket with linger 0 connected to endpoint; fails the test on error. */
void *um_test_dealer(void *ctx, const char *endpoint);

/* Send msg as one compact JSON frame and release it; fails the test on error. */
void um_test_send_json(void *sock, json_t *msg);

/*
 * The next reply as a JSON object, or NULL when none comes within timeout_ms. Fails the
 * test on a reply that is not a single frame with a JSON object holding id and type.
 */
json_t *um_test_recv(void *sock, int timeout_ms);

/* Suites, one per unit; check_main.c runs them all. */
Suite *um_kernels_suite(void);
Suite *um_gemm_suite(void);
Suite *um_safetensors_suite(void);
Suite *um_model_suite(void);
Suite *um_families_suite(void);
Suite *um_chat_suite(void);
Suite *um_score_suite(void);
Suite *um_generate_suite(void);
Suite *um_cache_suite(void);
Suite *um_plugins_suite(void);
Suite *um_tokenizer_suite(void);
Suite *um_server_suite(void);
Suite *um_hardening_suite(void);
Suite *um_gateway_suite(void);
Suite *um_broker_suite(void);

#endif /* UM_TESTUTIL_H */
