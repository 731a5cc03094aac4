/*
 * The kernel table: which implementation of each op the engine calls on this host.
 * Owns one const table per ISA; hot code fetches the table once and calls through it.
 *
 * Threading: the tables are immutable, so um_kernels() may be called from any thread.
 */
#include "kernels.h"

static const um_kernel_table_t s_scalar = {
    .isa = "scalar",
    .rmsnorm = um_k_rmsnorm_ref,
    .rope = um_k_rope_ref,
    .softmax = um_k_softmax_ref,
    .silu_mul = um_k_silu_mul_ref,
    .add = um_k_add_ref,
    .bf16_to_f32 = um_k_bf16_to_f32_ref,
    .argmax = um_k_argmax_ref,
    .logsumexp = um_k_logsumexp_ref,
};

const um_kernel_table_t *um_kernels_scalar(void)
{
    return &s_scalar;
}

const um_kernel_table_t *um_kernels(void)
{
    /* NOTE: only the scalar table exists. SIMD tables (avx512, neon) go beside it,
     * selected by a startup CPU probe that an environment variable can cap. */
    return &s_scalar;
}
