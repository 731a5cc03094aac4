/*
 * Shared helpers for the Check suites: paths from the environment that make check
 * sets, fixture reading, and starting the real daemon as a child process.
 */
#ifndef UM_TESTUTIL_H
#define UM_TESTUTIL_H

#include <check.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

/* Value of an environment variable make check sets; fails the test when unset. */
const char *um_test_env(const char *name);

/* Join two path parts into a static buffer (valid until the next call). */
const char *um_test_path(const char *dir, const char *file);

/* Read a whole file into a malloc'ed, NUL-terminated buffer; NULL on failure. */
char *um_test_read_file(const char *path, size_t *len);

/* Suites, one per unit; check_main.c runs them all. */
Suite *um_kernels_suite(void);
Suite *um_gemm_suite(void);
Suite *um_safetensors_suite(void);
Suite *um_model_suite(void);
Suite *um_families_suite(void);
Suite *um_chat_suite(void);
Suite *um_score_suite(void);
Suite *um_generate_suite(void);
Suite *um_plugins_suite(void);
Suite *um_tokenizer_suite(void);
Suite *um_server_suite(void);
Suite *um_gateway_suite(void);
Suite *um_broker_suite(void);

#endif /* UM_TESTUTIL_H */
