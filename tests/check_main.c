/*
 * The test runner: one Check suite per unit. CK_RUN_SUITE and CK_RUN_CASE select a
 * subset.
 *
 * Tests run in one process by default. libgomp cannot run a parallel region in a child
 * forked after the parent started its thread pool, and the engine's OpenMP loops and
 * oneDNN both start it, so Check's fork mode would hang. make check runs this program
 * under timeout(1) in place of the per-test timeouts that only fork mode enforces.
 * CK_FORK=yes still selects fork mode, for suites that never touch the engine.
 */
#include <check.h>
#include <stdlib.h>

#include "testutil.h"

Suite *um_log_suite(void);

int main(void)
{
    SRunner *sr = srunner_create(um_kernels_suite());
    srunner_add_suite(sr, um_log_suite());
    srunner_add_suite(sr, um_gemm_suite());
    srunner_add_suite(sr, um_safetensors_suite());
    srunner_add_suite(sr, um_model_suite());
    srunner_add_suite(sr, um_families_suite());
    srunner_add_suite(sr, um_chat_suite());
    srunner_add_suite(sr, um_score_suite());
    srunner_add_suite(sr, um_generate_suite());
    srunner_add_suite(sr, um_cache_suite());
    srunner_add_suite(sr, um_plugins_suite());
    srunner_add_suite(sr, um_tokenizer_suite());
    srunner_add_suite(sr, um_server_suite());
    srunner_add_suite(sr, um_hardening_suite());
    srunner_add_suite(sr, um_gateway_suite());
    srunner_add_suite(sr, um_broker_suite());
    srunner_set_fork_status(sr, CK_NOFORK);
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
