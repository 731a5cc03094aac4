/*
 * Compute kernels behind the ISA table. Each op has a scalar reference version
 * (um_k_<op>_ref) that is always built and is the oracle in tests; SIMD versions
 * slot in beside it and are reached through um_kernels(), never called directly.
 * Kernels know nothing of models, requests or plugins.
 *
 * All kernels are thread-safe and allocation-free; callers parallelise over rows.
 */
#ifndef UM_KERNELS_H
#define UM_KERNELS_H

#include <stddef.h>
#include <stdint.h>

/* RMSNorm of one row: out = x / sqrt(mean(x^2) + eps) * w, accumulated in f32. */
void um_k_rmsnorm_ref(float *out, const float *x, const float *w, int32_t n, float eps);

/*
 * NeoX rotate-half RoPE in place on one head vector of head_dim floats at position pos:
 * for i < head_dim/2, (a, b) = (x[i], x[i + half]) becomes (a cos - b sin, b cos + a sin)
 * with angle pos * inv_freq[i]. cos_sin contains (cos, sin) pairs for this position.
 */
void um_k_rope_ref(float *x, const float *cos_sin, int32_t head_dim);

/* Numerically stable softmax of one row in place (subtracts the max, f32). */
void um_k_softmax_ref(float *x, int32_t n);

/* SwiGLU: out[i] = silu(gate[i]) * up[i]. */
void um_k_silu_mul_ref(float *out, const float *gate, const float *up, int32_t n);

/* out[i] += x[i]. */
void um_k_add_ref(float *out, const float *x, int32_t n);

/* Widen n bf16 values (upper halves of f32) to f32. */
void um_k_bf16_to_f32_ref(float *out, const uint16_t *in, size_t n);

/* Index of the maximum of a row; ties go to the lowest index. */
int32_t um_k_argmax_ref(const float *x, int32_t n);

/* log(sum(exp(x))) of a row, accumulated in float64. */
double um_k_logsumexp_ref(const float *x, int32_t n);

/* Table of the kernels selected for this host. */
typedef struct um_kernel_table {
    const char *isa; /* "scalar", later "avx512", "neon", ... */
    void (*rmsnorm)(float *, const float *, const float *, int32_t, float);
    void (*rope)(float *, const float *, int32_t);
    void (*softmax)(float *, int32_t);
    void (*silu_mul)(float *, const float *, const float *, int32_t);
    void (*add)(float *, const float *, int32_t);
    void (*bf16_to_f32)(float *, const uint16_t *, size_t);
    int32_t (*argmax)(const float *, int32_t);
    double (*logsumexp)(const float *, int32_t);
} um_kernel_table_t;

/* The table chosen at startup (today always the scalar reference). */
const um_kernel_table_t *um_kernels(void);

/* The scalar reference table, which tests compare every other table with. */
const um_kernel_table_t *um_kernels_scalar(void);

/* ------------------------------------------------------------------------- */
/* Matrix products through oneDNN                                             */

/*
 * C[M, N] = A[M, K] * B^T (+ C when accumulate), f32, where B is stored [N, K]
 * row-major (nn.Linear weights) and lda, ldb, ldc are row strides in elements.
 * Primitives are created once per shape and stride set and cached. Thread-safe.
 * Returns 0, UM_EINVAL for a negative size, a stride below its row length or a NULL
 * matrix, UM_ENOMEM, or UM_EBACKEND (the oneDNN status is logged).
 */
int um_gemm_f32_nt(int32_t M, int32_t N, int32_t K, const float *A, int32_t lda,
                   const float *B, int32_t ldb, float *C, int32_t ldc, int accumulate);

/*
 * C[M, N] = alpha * A[M, K] * B[K, N], f32, all row-major with the given strides,
 * for attention's probabilities times values. Same caching and errors as above.
 */
int um_gemm_f32_nn(int32_t M, int32_t N, int32_t K, float alpha, const float *A, int32_t lda,
                   const float *B, int32_t ldb, float *C, int32_t ldc);

/* "onednn X.Y.Z" */
const char *um_gemm_backend(void);

/* Release cached primitives (at exit; tests check for leaks). */
void um_gemm_shutdown(void);

#endif /* UM_KERNELS_H */
