/*
 * The test runner: one Check suite per unit. CK_RUN_SUITE and CK_RUN_CASE select a
 * subset, CK_FORK=no runs in one process (for gdb and valgrind).
 */
#include <check.h>
#include <stdlib.h>

#include "testutil.h"

int main(void)
{
    SRunner *sr = srunner_create(um_kernels_suite());
    srunner_add_suite(sr, um_safetensors_suite());
    srunner_add_suite(sr, um_model_suite());
    srunner_add_suite(sr, um_generate_suite());
    srunner_add_suite(sr, um_plugins_suite());
    srunner_add_suite(sr, um_tokenizer_suite());
    srunner_add_suite(sr, um_server_suite());
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
