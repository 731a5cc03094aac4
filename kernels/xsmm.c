/*
 * libxsmm for the attention's per-head products. This is the one file that compiles
 * libxsmm from the sources Debian ships (see configure.ac), so the rest of the project
 * sees only the small interface in kernels.h.
 *
 * libxsmm's products are column-major; the callers in attention.c state the mapping
 * from their row-major matrices. Kernels are JIT-generated once per shape and kept in
 * libxsmm's own registry.
 *
 * Threading: libxsmm_smmdispatch and the kernels it returns are thread-safe.
 */
#include "kernels.h"

#include <stdio.h>

#include <libxsmm_source.h>

const char *um_xsmm_version(void)
{
    /* Debian's headers carry no usable version number (LIBXSMM_VERSION is empty), so
     * report the code path libxsmm generates for instead, e.g. "hsw" or "cpx". */
    static char version[48];
    snprintf(version, sizeof version, "(target %s)", libxsmm_get_target_arch());
    return version;
}

um_xsmm_kernel_t um_xsmm_dispatch(int32_t m, int32_t n, int32_t k, int32_t lda, int32_t ldb,
                                  int32_t ldc)
{
    const libxsmm_blasint ld_a = lda, ld_b = ldb, ld_c = ldc;
    const float alpha = 1.0f, beta = 0.0f;
    return (um_xsmm_kernel_t)libxsmm_smmdispatch(m, n, k, &ld_a, &ld_b, &ld_c, &alpha, &beta,
                                                 NULL, NULL);
}
