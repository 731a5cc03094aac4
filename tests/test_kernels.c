/*
 * Kernel suite: every op of the kernel table against a double-precision computation
 * written out in the test, and the oneDNN products against naive loops over several
 * shapes, strides and accumulate settings. The element tests loop over the scalar
 * reference and the table um_kernels() selects, so a SIMD table is checked by the same
 * cases when it arrives.
 */
#include <float.h>
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <unmaskd/error.h>

#include "kernels.h"
#include "testutil.h"

/* ------------------------------------------------------------------------- */
/* Helpers                                                                    */

/* Loop index 0 is the scalar reference, 1 the table selected for this host. */
static const um_kernel_table_t *s_table(int index)
{
    return index == 0 ? um_kernels_scalar() : um_kernels();
}

#define S_N_TABLES 2

/* Deterministic uniform floats in [lo, hi) from a 64-bit LCG. */
static float s_uniform(uint64_t *state, float lo, float hi)
{
    *state = *state * 6364136223846793005ull + 1442695040888963407ull;
    double u = (double)(*state >> 11) / 9007199254740992.0;
    return (float)(lo + (hi - lo) * u);
}

static void s_fill(float *x, size_t n, uint64_t seed, float lo, float hi)
{
    uint64_t state = seed;
    for (size_t i = 0; i < n; i++)
        x[i] = s_uniform(&state, lo, hi);
}

static const int32_t s_lengths[] = {1, 2, 7, 64, 257, 4096};
#define S_N_LENGTHS (sizeof s_lengths / sizeof s_lengths[0])

/* ------------------------------------------------------------------------- */
/* Element-wise kernels                                                       */

START_TEST(kernel_table_scalar)
{
    const um_kernel_table_t *t = um_kernels();
    ck_assert_ptr_nonnull(t);
    ck_assert_str_eq(t->isa, "scalar");
    ck_assert_ptr_eq(t->rmsnorm, um_k_rmsnorm_ref);
    ck_assert_ptr_eq(t->logsumexp, um_k_logsumexp_ref);
}
END_TEST

START_TEST(rmsnorm_matches_double)
{
    const um_kernel_table_t *t = s_table(_i);
    for (size_t c = 0; c < S_N_LENGTHS; c++) {
        int32_t n = s_lengths[c];
        float *x = malloc(n * sizeof *x), *w = malloc(n * sizeof *w);
        float *out = malloc(n * sizeof *out);
        s_fill(x, n, 11 + c, -3.0f, 3.0f);
        s_fill(w, n, 97 + c, 0.5f, 1.5f);
        const float eps = 1e-5f;
        t->rmsnorm(out, x, w, n, eps);

        double sum_sq = 0.0;
        for (int32_t i = 0; i < n; i++)
            sum_sq += (double)x[i] * x[i];
        double inv_rms = 1.0 / sqrt(sum_sq / n + eps);
        for (int32_t i = 0; i < n; i++) {
            double expected = x[i] * inv_rms * w[i];
            /* The f32 sum of n squares has relative error below n * FLT_EPSILON; the
             * rsqrt and two products add a few ulp. 4096 * 1.2e-7 = 5e-4 is the worst
             * case; random signs keep the real error near sqrt(n) ulp, so 1e-5 relative
             * leaves a margin without hiding a wrong formula. */
            ck_assert_msg(fabs(out[i] - expected) <= 1e-5 * fabs(expected) + 1e-6,
                          "%s rmsnorm n=%d i=%d: got %.9g, expected %.9g", t->isa, n, i,
                          out[i], expected);
        }
        free(x);
        free(w);
        free(out);
    }
}
END_TEST

START_TEST(rope_matches_double)
{
    const um_kernel_table_t *t = s_table(_i);
    const int32_t head_dims[] = {2, 16, 64, 128};
    const int32_t positions[] = {0, 1, 17, 4095};
    for (size_t h = 0; h < 4; h++) {
        int32_t hd = head_dims[h], half = hd / 2;
        for (size_t p = 0; p < 4; p++) {
            int32_t pos = positions[p];
            float x[128], original[128], cos_sin[128];
            s_fill(original, hd, 5 + h * 10 + p, -2.0f, 2.0f);
            memcpy(x, original, hd * sizeof *x);

            double angle[64];
            for (int32_t i = 0; i < half; i++) {
                angle[i] = pos * pow(10000.0, -2.0 * i / hd);
                cos_sin[2 * i] = (float)cos(angle[i]);
                cos_sin[2 * i + 1] = (float)sin(angle[i]);
            }
            t->rope(x, cos_sin, hd);

            for (int32_t i = 0; i < half; i++) {
                double a = original[i], b = original[i + half];
                double c = cos(angle[i]), s = sin(angle[i]);
                /* cos and sin are rounded to f32 (relative 6e-8) and each output is two
                 * f32 products and a sum of values below 2 in magnitude: 1e-6 absolute
                 * covers that with a 4x margin. */
                ck_assert_msg(fabs(x[i] - (a * c - b * s)) <= 1e-6,
                              "%s rope hd=%d pos=%d i=%d: got %.9g, expected %.9g", t->isa,
                              hd, pos, i, x[i], a * c - b * s);
                ck_assert_msg(fabs(x[i + half] - (b * c + a * s)) <= 1e-6,
                              "%s rope hd=%d pos=%d i=%d: got %.9g, expected %.9g", t->isa,
                              hd, pos, i + half, x[i + half], b * c + a * s);
            }
        }
    }
}
END_TEST

START_TEST(softmax_matches_double)
{
    const um_kernel_table_t *t = s_table(_i);
    for (size_t c = 0; c < S_N_LENGTHS; c++) {
        int32_t n = s_lengths[c];
        float *x = malloc(n * sizeof *x);
        double *expected = malloc(n * sizeof *expected);
        /* Offsets near 80 would overflow expf without the max subtraction. */
        s_fill(x, n, 23 + c, 70.0f, 90.0f);
        double max = x[0], sum = 0.0;
        for (int32_t i = 1; i < n; i++)
            max = fmax(max, x[i]);
        for (int32_t i = 0; i < n; i++)
            sum += expected[i] = exp(x[i] - max);
        t->softmax(x, n);

        double total = 0.0;
        for (int32_t i = 0; i < n; i++) {
            expected[i] /= sum;
            total += x[i];
            /* Each output is expf of a value <= 0 (a few ulp) divided by an f32 sum of
             * n terms (relative error below n * FLT_EPSILON, in practice sqrt(n) ulp):
             * 1e-5 relative plus 1e-9 absolute for the tiny terms. */
            ck_assert_msg(fabs(x[i] - expected[i]) <= 1e-5 * expected[i] + 1e-9,
                          "%s softmax n=%d i=%d: got %.9g, expected %.9g", t->isa, n, i,
                          x[i], expected[i]);
        }
        ck_assert_msg(fabs(total - 1.0) <= 1e-4, "%s softmax n=%d sums to %.9g", t->isa, n,
                      total);
        free(x);
        free(expected);
    }
}
END_TEST

START_TEST(silu_mul_matches_double)
{
    const um_kernel_table_t *t = s_table(_i);
    for (size_t c = 0; c < S_N_LENGTHS; c++) {
        int32_t n = s_lengths[c];
        float *gate = malloc(n * sizeof *gate), *up = malloc(n * sizeof *up);
        float *out = malloc(n * sizeof *out);
        s_fill(gate, n, 31 + c, -20.0f, 20.0f);
        s_fill(up, n, 37 + c, -2.0f, 2.0f);
        t->silu_mul(out, gate, up, n);
        for (int32_t i = 0; i < n; i++) {
            double g = gate[i];
            double expected = g / (1.0 + exp(-g)) * up[i];
            /* expf, one division and two products: a few ulp, so 1e-6 relative. */
            ck_assert_msg(fabs(out[i] - expected) <= 1e-6 * fabs(expected) + 1e-12,
                          "%s silu_mul n=%d i=%d: got %.9g, expected %.9g", t->isa, n, i,
                          out[i], expected);
        }

        /* In place over the gate, as the forward pass calls it. */
        float *copy = malloc(n * sizeof *copy);
        memcpy(copy, gate, n * sizeof *copy);
        t->silu_mul(copy, copy, up, n);
        for (int32_t i = 0; i < n; i++)
            ck_assert_float_eq(copy[i], out[i]);
        free(copy);
        free(gate);
        free(up);
        free(out);
    }
}
END_TEST

START_TEST(add_is_exact)
{
    const um_kernel_table_t *t = s_table(_i);
    for (size_t c = 0; c < S_N_LENGTHS; c++) {
        int32_t n = s_lengths[c];
        float *out = malloc(n * sizeof *out), *x = malloc(n * sizeof *x);
        float *before = malloc(n * sizeof *before);
        s_fill(out, n, 41 + c, -1.0f, 1.0f);
        s_fill(x, n, 43 + c, -1.0f, 1.0f);
        memcpy(before, out, n * sizeof *out);
        t->add(out, x, n);
        /* One f32 addition per element, so the result is the correctly rounded sum. */
        for (int32_t i = 0; i < n; i++)
            ck_assert_float_eq(out[i], (float)((double)before[i] + (double)x[i]));
        free(out);
        free(x);
        free(before);
    }
}
END_TEST

/* Decode a bf16 bit pattern in double arithmetic, independently of the kernel. */
static double s_bf16_decode(uint16_t bits)
{
    int sign = bits >> 15, exponent = (bits >> 7) & 0xff, mantissa = bits & 0x7f;
    double magnitude;
    if (exponent == 0xff)
        magnitude = mantissa ? NAN : INFINITY;
    else if (exponent == 0)
        magnitude = ldexp(mantissa, -126 - 7);
    else
        magnitude = ldexp(128 + mantissa, exponent - 127 - 7);
    return sign ? -magnitude : magnitude;
}

START_TEST(bf16_to_f32_exact)
{
    const um_kernel_table_t *t = s_table(_i);
    /* Every bf16 bit pattern, so normals, subnormals, zeros and infinities are covered. */
    const size_t n = 65536;
    uint16_t *in = malloc(n * sizeof *in);
    float *out = malloc(n * sizeof *out);
    for (size_t i = 0; i < n; i++)
        in[i] = (uint16_t)i;
    t->bf16_to_f32(out, in, n);
    for (size_t i = 0; i < n; i++) {
        double expected = s_bf16_decode(in[i]);
        if (isnan(expected)) {
            ck_assert_msg(isnan(out[i]), "%s bf16 0x%04zx: got %g, expected NaN", t->isa, i,
                          out[i]);
            continue;
        }
        ck_assert_msg((double)out[i] == expected && !signbit(out[i]) == !signbit(expected),
                      "%s bf16 0x%04zx: got %.9g, expected %.9g", t->isa, i, out[i], expected);
    }
    ck_assert_float_eq(out[0x3f80], 1.0f);
    ck_assert_float_eq(out[0xc000], -2.0f);
    free(in);
    free(out);
}
END_TEST

START_TEST(argmax_lowest_index_on_ties)
{
    const um_kernel_table_t *t = s_table(_i);
    for (size_t c = 0; c < S_N_LENGTHS; c++) {
        int32_t n = s_lengths[c];
        float *x = malloc(n * sizeof *x);
        s_fill(x, n, 53 + c, -1.0f, 1.0f);
        int32_t expected = 0;
        for (int32_t i = 1; i < n; i++)
            if ((double)x[i] > (double)x[expected])
                expected = i;
        ck_assert_int_eq(t->argmax(x, n), expected);

        /* Put the maximum at two later positions: the lower one must win. */
        if (n >= 3) {
            x[n - 1] = 5.0f;
            x[n / 2] = 5.0f;
            ck_assert_int_eq(t->argmax(x, n), n / 2);
        }
        free(x);
    }

    const float all_equal[] = {2.0f, 2.0f, 2.0f, 2.0f};
    ck_assert_int_eq(t->argmax(all_equal, 4), 0);
    const float with_inf[] = {-INFINITY, 1.0f, INFINITY, INFINITY};
    ck_assert_int_eq(t->argmax(with_inf, 4), 2);
}
END_TEST

START_TEST(logsumexp_matches_long_double)
{
    const um_kernel_table_t *t = s_table(_i);
    for (size_t c = 0; c < S_N_LENGTHS; c++) {
        int32_t n = s_lengths[c];
        float *x = malloc(n * sizeof *x);
        s_fill(x, n, 61 + c, -30.0f, 30.0f);
        /* Values within +-30 allow the direct formula, without the max shift, in long double. */
        long double sum = 0.0L;
        for (int32_t i = 0; i < n; i++)
            sum += expl((long double)x[i]);
        double expected = (double)logl(sum);
        double got = t->logsumexp(x, n);
        /* Accumulated in double: n terms give a relative error near n * 1.1e-16, so
         * 1e-12 relative covers n = 4096 with a margin. */
        ck_assert_msg(fabs(got - expected) <= 1e-12 * fabs(expected) + 1e-12,
                      "%s logsumexp n=%d: got %.17g, expected %.17g", t->isa, n, got, expected);
        free(x);
    }

    /* Large values must not overflow: n equal values v give v + log(n). */
    float big[8];
    for (int i = 0; i < 8; i++)
        big[i] = 1000.0f;
    ck_assert_double_eq_tol(t->logsumexp(big, 8), 1000.0 + log(8.0), 1e-12);

    const float no_mass[] = {-INFINITY, -INFINITY};
    double empty = t->logsumexp(no_mass, 2);
    ck_assert(isinf(empty) && empty < 0);
}
END_TEST

/* ------------------------------------------------------------------------- */
/* Matrix products                                                            */

typedef struct s_gemm_case {
    int32_t m, n, k;
    int32_t pad_a, pad_b, pad_c; /* extra elements per row beyond the minimum stride */
} s_gemm_case_t;

static const s_gemm_case_t s_gemm_cases[] = {
    {1, 1, 1, 0, 0, 0},     {3, 5, 7, 0, 0, 0},       {17, 33, 65, 0, 0, 0},
    {64, 128, 256, 0, 0, 0}, {130, 1, 7, 0, 0, 0},    {1, 300, 129, 0, 0, 0},
    {5, 9, 11, 3, 5, 7},    {31, 17, 64, 64, 1, 15},  {64, 64, 32, 96, 96, 192},
};
#define S_N_GEMM_CASES (sizeof s_gemm_cases / sizeof s_gemm_cases[0])

/* Marker for stride padding in C, which no product may write. */
#define S_PAD_VALUE 12345.0f

/*
 * Compare C with alpha * A op(B) (+ C0) computed in double. The bound for an f32 dot
 * product of length K is K * FLT_EPSILON * sum |a_i b_i| (a standard worst case for
 * any summation order), plus one rounding for the accumulate and the alpha scale.
 */
static void s_check_product(const char *what, const s_gemm_case_t *gc, int trans_b,
                            float alpha, const float *A, int32_t lda, const float *B,
                            int32_t ldb, const float *C0, const float *C, int32_t ldc)
{
    for (int32_t i = 0; i < gc->m; i++) {
        for (int32_t j = 0; j < gc->n; j++) {
            double sum = 0.0, sum_abs = 0.0;
            for (int32_t p = 0; p < gc->k; p++) {
                double a = A[(size_t)i * lda + p];
                double b = trans_b ? B[(size_t)j * ldb + p] : B[(size_t)p * ldb + j];
                sum += a * b;
                sum_abs += fabs(a * b);
            }
            double expected = alpha * sum;
            double c0 = C0 ? C0[(size_t)i * ldc + j] : 0.0;
            expected += c0;
            double tol = (gc->k + 2) * FLT_EPSILON * (fabs(alpha) * sum_abs + fabs(c0)) + 1e-30;
            double got = C[(size_t)i * ldc + j];
            ck_assert_msg(fabs(got - expected) <= tol,
                          "%s M=%d N=%d K=%d C[%d][%d]: got %.9g, expected %.9g (tolerance %.3g)",
                          what, gc->m, gc->n, gc->k, i, j, got, expected, tol);
        }
        for (int32_t j = gc->n; j < ldc; j++)
            ck_assert_msg(C[(size_t)i * ldc + j] == S_PAD_VALUE,
                          "%s M=%d N=%d K=%d wrote C[%d][%d], past N inside the stride", what,
                          gc->m, gc->n, gc->k, i, j);
    }
}

START_TEST(gemm_nt_matches_naive)
{
    const s_gemm_case_t *gc = &s_gemm_cases[_i];
    int32_t lda = gc->k + gc->pad_a, ldb = gc->k + gc->pad_b, ldc = gc->n + gc->pad_c;
    float *A = malloc((size_t)gc->m * lda * sizeof *A);
    float *B = malloc((size_t)gc->n * ldb * sizeof *B);
    float *C = malloc((size_t)gc->m * ldc * sizeof *C);
    float *C0 = malloc((size_t)gc->m * ldc * sizeof *C0);
    s_fill(A, (size_t)gc->m * lda, 101 + _i, -1.0f, 1.0f);
    s_fill(B, (size_t)gc->n * ldb, 201 + _i, -1.0f, 1.0f);

    for (int accumulate = 0; accumulate <= 1; accumulate++) {
        s_fill(C0, (size_t)gc->m * ldc, 301 + _i, -1.0f, 1.0f);
        for (int32_t i = 0; i < gc->m; i++)
            for (int32_t j = gc->n; j < ldc; j++)
                C0[(size_t)i * ldc + j] = S_PAD_VALUE;
        memcpy(C, C0, (size_t)gc->m * ldc * sizeof *C);
        int rc = um_gemm_f32_nt(gc->m, gc->n, gc->k, A, lda, B, ldb, C, ldc, accumulate);
        ck_assert_msg(rc == 0, "um_gemm_f32_nt returned %s", um_error_name(rc));
        s_check_product(accumulate ? "nt accumulate" : "nt", gc, 1, 1.0f, A, lda, B, ldb,
                        accumulate ? C0 : NULL, C, ldc);
    }
    free(A);
    free(B);
    free(C);
    free(C0);
}
END_TEST

START_TEST(gemm_nn_matches_naive)
{
    const s_gemm_case_t *gc = &s_gemm_cases[_i];
    int32_t lda = gc->k + gc->pad_a, ldb = gc->n + gc->pad_b, ldc = gc->n + gc->pad_c;
    float *A = malloc((size_t)gc->m * lda * sizeof *A);
    float *B = malloc((size_t)gc->k * ldb * sizeof *B);
    float *C = malloc((size_t)gc->m * ldc * sizeof *C);
    s_fill(A, (size_t)gc->m * lda, 401 + _i, -1.0f, 1.0f);
    s_fill(B, (size_t)gc->k * ldb, 501 + _i, -1.0f, 1.0f);

    /* 1, a power of two and 1/sqrt(32), the attention scale of a 32-wide head. */
    const float alphas[] = {1.0f, 0.5f, (float)(1.0 / sqrt(32.0))};
    for (size_t a = 0; a < 3; a++) {
        s_fill(C, (size_t)gc->m * ldc, 601 + _i, -1.0f, 1.0f);
        for (int32_t i = 0; i < gc->m; i++)
            for (int32_t j = gc->n; j < ldc; j++)
                C[(size_t)i * ldc + j] = S_PAD_VALUE;
        int rc = um_gemm_f32_nn(gc->m, gc->n, gc->k, alphas[a], A, lda, B, ldb, C, ldc);
        ck_assert_msg(rc == 0, "um_gemm_f32_nn returned %s", um_error_name(rc));
        s_check_product("nn", gc, 0, alphas[a], A, lda, B, ldb, NULL, C, ldc);
    }
    free(A);
    free(B);
    free(C);
}
END_TEST

START_TEST(gemm_rejects_bad_strides)
{
    float A[4] = {0}, B[4] = {0}, C[4] = {0};
    ck_assert_int_eq(um_gemm_f32_nt(2, 2, 2, A, 1, B, 2, C, 2, 0), UM_EINVAL);
    ck_assert_int_eq(um_gemm_f32_nt(2, 2, 2, A, 2, B, 1, C, 2, 0), UM_EINVAL);
    ck_assert_int_eq(um_gemm_f32_nn(2, 2, 2, 1.0f, A, 2, B, 2, C, 1), UM_EINVAL);
    ck_assert_int_eq(um_gemm_f32_nt(-1, 2, 2, A, 2, B, 2, C, 2, 0), UM_EINVAL);
    ck_assert_int_eq(um_gemm_f32_nt(2, 2, 2, NULL, 2, B, 2, C, 2, 0), UM_EINVAL);
}
END_TEST

START_TEST(gemm_empty_k_zeroes_c)
{
    float C[6] = {1, 2, 3, 4, 5, 6};
    ck_assert_int_eq(um_gemm_f32_nt(2, 3, 0, NULL, 1, NULL, 1, C, 3, 1), 0);
    ck_assert_float_eq(C[5], 6.0f);
    ck_assert_int_eq(um_gemm_f32_nt(2, 3, 0, NULL, 1, NULL, 1, C, 3, 0), 0);
    for (int i = 0; i < 6; i++)
        ck_assert_float_eq(C[i], 0.0f);
}
END_TEST

typedef struct s_thread_job {
    int failures;
} s_thread_job_t;

/* One thread's share of the concurrency test: products of one shape, checked exactly
 * against a single-threaded product computed before the threads start. */
static const float *s_shared_b;
static float s_shared_expected[48 * 40];

static void *s_thread_products(void *arg)
{
    s_thread_job_t *job = arg;
    float A[48 * 24], C[48 * 40];
    for (int round = 0; round < 20; round++) {
        s_fill(A, 48 * 24, 777, -1.0f, 1.0f);
        if (um_gemm_f32_nt(48, 40, 24, A, 24, s_shared_b, 24, C, 40, 0) != 0 ||
            memcmp(C, s_shared_expected, sizeof C) != 0)
            job->failures++;
    }
    return NULL;
}

START_TEST(gemm_concurrent_threads)
{
    float A[48 * 24];
    static float B[40 * 24];
    s_fill(A, 48 * 24, 777, -1.0f, 1.0f);
    s_fill(B, 40 * 24, 778, -1.0f, 1.0f);
    s_shared_b = B;
    ck_assert_int_eq(um_gemm_f32_nt(48, 40, 24, A, 24, B, 24, s_shared_expected, 40, 0), 0);

    /* The same primitive on the same inputs is deterministic, so results must match
     * bit for bit whichever thread runs it. */
    pthread_t threads[4];
    s_thread_job_t jobs[4] = {{0}};
    for (int i = 0; i < 4; i++)
        ck_assert_int_eq(pthread_create(&threads[i], NULL, s_thread_products, &jobs[i]), 0);
    for (int i = 0; i < 4; i++) {
        pthread_join(threads[i], NULL);
        ck_assert_int_eq(jobs[i].failures, 0);
    }
}
END_TEST

START_TEST(gemm_backend_and_shutdown)
{
    const char *name = um_gemm_backend();
    ck_assert_msg(strncmp(name, "onednn ", 7) == 0 && name[7] >= '0' && name[7] <= '9',
                  "backend name \"%s\" is not \"onednn X.Y.Z\"", name);

    /* After a shutdown the next product builds a fresh engine and cache. */
    float A[6] = {1, 2, 3, 4, 5, 6}, B[6] = {1, 0, 0, 0, 1, 0}, C[4];
    ck_assert_int_eq(um_gemm_f32_nt(2, 2, 3, A, 3, B, 3, C, 2, 0), 0);
    um_gemm_shutdown();
    ck_assert_int_eq(um_gemm_f32_nt(2, 2, 3, A, 3, B, 3, C, 2, 0), 0);
    /* B^T picks columns 0 and 1 of A: small integers, so the product is exact. */
    ck_assert_float_eq(C[0], 1.0f);
    ck_assert_float_eq(C[1], 2.0f);
    ck_assert_float_eq(C[2], 4.0f);
    ck_assert_float_eq(C[3], 5.0f);
}
END_TEST

Suite *um_kernels_suite(void)
{
    Suite *s = suite_create("kernels");

    TCase *tc = tcase_create("elementwise");
    tcase_set_timeout(tc, 30);
    tcase_add_test(tc, kernel_table_scalar);
    tcase_add_loop_test(tc, rmsnorm_matches_double, 0, S_N_TABLES);
    tcase_add_loop_test(tc, rope_matches_double, 0, S_N_TABLES);
    tcase_add_loop_test(tc, softmax_matches_double, 0, S_N_TABLES);
    tcase_add_loop_test(tc, silu_mul_matches_double, 0, S_N_TABLES);
    tcase_add_loop_test(tc, add_is_exact, 0, S_N_TABLES);
    tcase_add_loop_test(tc, bf16_to_f32_exact, 0, S_N_TABLES);
    tcase_add_loop_test(tc, argmax_lowest_index_on_ties, 0, S_N_TABLES);
    tcase_add_loop_test(tc, logsumexp_matches_long_double, 0, S_N_TABLES);
    suite_add_tcase(s, tc);

    tc = tcase_create("gemm");
    tcase_set_timeout(tc, 60);
    tcase_add_loop_test(tc, gemm_nt_matches_naive, 0, S_N_GEMM_CASES);
    tcase_add_loop_test(tc, gemm_nn_matches_naive, 0, S_N_GEMM_CASES);
    tcase_add_test(tc, gemm_rejects_bad_strides);
    tcase_add_test(tc, gemm_empty_k_zeroes_c);
    tcase_add_test(tc, gemm_concurrent_threads);
    tcase_add_test(tc, gemm_backend_and_shutdown);
    suite_add_tcase(s, tc);
    return s;
}
