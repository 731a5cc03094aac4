/*
 * Weight-product and attention suite: prepared weights (f32, bf16 on oneDNN or widened
 * panel by panel) against naive double-precision products, borrowing, argument checks
 * and concurrent use; the fused attention kernel against a naive attention in double,
 * for every kernel table this host runs.
 */
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <unmaskd/error.h>

#include "kernels.h"
#include "testutil.h"

/* Deterministic uniform floats in [lo, hi) from a 64-bit LCG. */
static void s_fill(float *x, size_t n, uint64_t seed, float lo, float hi)
{
    uint64_t state = seed;
    for (size_t i = 0; i < n; i++) {
        state = state * 6364136223846793005ull + 1442695040888963407ull;
        double u = (double)(state >> 11) / 9007199254740992.0;
        x[i] = (float)(lo + (hi - lo) * u);
    }
}

static float s_round_bf16(float x)
{
    uint16_t b;
    float y;
    um_k_f32_to_bf16_ref(&b, &x, 1);
    um_k_bf16_to_f32_ref(&y, &b, 1);
    return y;
}

/* ------------------------------------------------------------------------- */
/* Weight products                                                            */

typedef struct s_weight_case {
    int32_t m, n, k, lda, ldc;
} s_weight_case_t;

/* Ragged sizes around the oneDNN block sizes (16, 64) and the widening panel (64). */
static const s_weight_case_t s_weight_cases[] = {
    {1, 1, 1, 1, 1},      {3, 17, 5, 7, 20},     {16, 64, 64, 64, 64},
    {65, 130, 33, 40, 131}, {160, 256, 200, 200, 300}, {7, 1000, 96, 96, 1000},
};
#define S_N_WEIGHT_CASES (int)(sizeof s_weight_cases / sizeof s_weight_cases[0])

/*
 * Run one product through a prepared weight and compare with a double-precision product
 * of the operands as the weight's dtype rounds them. dtype_loop: 0 f32 weight from f32,
 * 1 bf16 weight from f32, 2 bf16 weight from bf16.
 */
static void s_check_weight_case(const s_weight_case_t *wc, int dtype_loop, int accumulate)
{
    int32_t M = wc->m, N = wc->n, K = wc->k;
    float *A = malloc((size_t)M * wc->lda * sizeof *A);
    float *W = malloc((size_t)N * K * sizeof *W);
    uint16_t *W16 = malloc((size_t)N * K * sizeof *W16);
    float *C = malloc((size_t)M * wc->ldc * sizeof *C);
    float *C0 = malloc((size_t)M * wc->ldc * sizeof *C0);
    s_fill(A, (size_t)M * wc->lda, 11 + M, -1.0f, 1.0f);
    s_fill(W, (size_t)N * K, 12 + N, -1.0f, 1.0f);
    s_fill(C0, (size_t)M * wc->ldc, 13, -2.0f, 2.0f);
    memcpy(C, C0, (size_t)M * wc->ldc * sizeof *C);
    um_k_f32_to_bf16_ref(W16, W, (size_t)N * K);

    int bf16 = dtype_loop > 0;
    um_gemm_weight_t *w = NULL;
    int rc = um_gemm_weight_new(N, K, dtype_loop == 2 ? (const void *)W16 : (const void *)W,
                                dtype_loop == 2, bf16 ? UM_WDTYPE_BF16 : UM_WDTYPE_F32, &w);
    ck_assert_msg(rc == 0, "um_gemm_weight_new returned %s", um_error_name(rc));
    rc = um_gemm_weight_apply(w, M, A, wc->lda, C, wc->ldc, accumulate);
    ck_assert_msg(rc == 0, "um_gemm_weight_apply returned %s", um_error_name(rc));

    /* oneDNN's native bf16 product rounds A to bf16 too; the widened one keeps A in f32. */
    int a_rounded = bf16 && um_gemm_bf16_native();
    for (int32_t i = 0; i < M; i++) {
        for (int32_t j = 0; j < N; j++) {
            double sum = 0, abs_sum = 0;
            for (int32_t p = 0; p < K; p++) {
                double a = A[(size_t)i * wc->lda + p];
                double b = W[(size_t)j * K + p];
                if (bf16)
                    b = s_round_bf16((float)b);
                if (a_rounded)
                    a = s_round_bf16((float)a);
                sum += a * b;
                abs_sum += fabs(a * b);
            }
            double expected = sum + (accumulate ? C0[(size_t)i * wc->ldc + j] : 0.0);
            /* With the operands rounded as the weight's dtype does, only the f32
             * accumulation differs: K terms give at most K * 2^-24 relative to the sum of
             * magnitudes; 1e-5 of it (plus 1e-6 for the accumulated C) covers K <= 200
             * with margin and still catches a wrong element or a missed row. */
            double tol = 1e-5 * abs_sum + 1e-6;
            ck_assert_msg(fabs(C[(size_t)i * wc->ldc + j] - expected) <= tol,
                          "M=%d N=%d K=%d dtype %d acc %d C[%d][%d]=%.9g expected %.9g", M, N,
                          K, dtype_loop, accumulate, i, j, C[(size_t)i * wc->ldc + j], expected);
        }
        /* Columns past N in the ldc padding are untouched. */
        for (int32_t j = N; j < wc->ldc; j++)
            ck_assert_float_eq(C[(size_t)i * wc->ldc + j], C0[(size_t)i * wc->ldc + j]);
    }
    um_gemm_weight_destroy(&w);
    ck_assert_ptr_null(w);
    free(A);
    free(W);
    free(W16);
    free(C);
    free(C0);
}

START_TEST(weight_product_matches_double)
{
    const s_weight_case_t *wc = &s_weight_cases[_i % S_N_WEIGHT_CASES];
    int dtype_loop = _i / S_N_WEIGHT_CASES;
    s_check_weight_case(wc, dtype_loop, 0);
    s_check_weight_case(wc, dtype_loop, 1);
}
END_TEST

START_TEST(weight_borrow_follows_source)
{
    /* A borrowed weight reads the caller's memory, an owned one its own copy: changing the
     * source after preparation must change the product exactly in the first case. */
    for (int dtype_loop = 0; dtype_loop < 3; dtype_loop++) {
        enum { N = 24, K = 32 };
        float W[N * K], A[K], C[N];
        uint16_t W16[N * K];
        s_fill(W, N * K, 5, -1.0f, 1.0f);
        s_fill(A, K, 6, -1.0f, 1.0f);
        um_k_f32_to_bf16_ref(W16, W, N * K);
        void *src = dtype_loop == 2 ? (void *)W16 : (void *)W;
        um_gemm_weight_t *w = NULL;
        ck_assert_int_eq(um_gemm_weight_new(N, K, src, dtype_loop == 2,
                                            dtype_loop ? UM_WDTYPE_BF16 : UM_WDTYPE_F32, &w),
                         0);
        int borrows = um_gemm_weight_borrows(w);
        ck_assert_int_eq(borrows, um_gemm_weight_bytes(w) == 0);

        /* Zero the source: a borrowed weight now yields 0, an owned one does not. */
        memset(src, 0, dtype_loop == 2 ? sizeof W16 : sizeof W);
        ck_assert_int_eq(um_gemm_weight_apply(w, 1, A, K, C, N, 0), 0);
        double norm = 0;
        for (int j = 0; j < N; j++)
            norm += fabs(C[j]);
        if (borrows)
            ck_assert_msg(norm == 0.0, "dtype %d: borrowed weight ignored its source",
                          dtype_loop);
        else
            ck_assert_msg(norm > 0.1, "dtype %d: owned weight read the changed source",
                          dtype_loop);
        um_gemm_weight_destroy(&w);
    }
}
END_TEST

START_TEST(weight_rejects_bad_arguments)
{
    float W[4] = {1, 2, 3, 4}, A[2] = {1, 1}, C[2];
    um_gemm_weight_t *w = (um_gemm_weight_t *)1;
    ck_assert_int_eq(um_gemm_weight_new(0, 2, W, 0, UM_WDTYPE_F32, &w), UM_EINVAL);
    ck_assert_ptr_null(w);
    ck_assert_int_eq(um_gemm_weight_new(2, 2, NULL, 0, UM_WDTYPE_F32, &w), UM_EINVAL);
    ck_assert_int_eq(um_gemm_weight_new(2, 2, W, 0, (um_wdtype_t)7, &w), UM_EINVAL);
    ck_assert_int_eq(um_gemm_weight_apply(NULL, 1, A, 2, C, 2, 0), UM_EINVAL);

    for (int bf16 = 0; bf16 < 2; bf16++) {
        ck_assert_int_eq(um_gemm_weight_new(2, 2, W, 0, bf16 ? UM_WDTYPE_BF16 : UM_WDTYPE_F32,
                                            &w), 0);
        /* lda below K and ldc below N are rejected, M = 0 is an empty product. */
        ck_assert_int_eq(um_gemm_weight_apply(w, 1, A, 1, C, 2, 0), UM_EINVAL);
        ck_assert_int_eq(um_gemm_weight_apply(w, 1, A, 2, C, 1, 0), UM_EINVAL);
        ck_assert_int_eq(um_gemm_weight_apply(w, 0, NULL, 2, NULL, 2, 0), 0);
        ck_assert_int_eq(um_gemm_weight_apply(w, 1, A, 2, C, 2, 0), 0);
        /* Small integers, exact in bf16: W row 0 is (1, 2), row 1 (3, 4), so A W^T = (3, 7). */
        ck_assert_float_eq(C[0], 3.0f);
        ck_assert_float_eq(C[1], 7.0f);
        um_gemm_weight_destroy(&w);
        um_gemm_weight_destroy(&w); /* NULL is ignored */
    }
    um_gemm_weight_destroy(NULL);
}
END_TEST

typedef struct s_weight_job {
    const um_gemm_weight_t *w;
    const float *expected;
    int failures;
} s_weight_job_t;

enum { S_JOB_M = 40, S_JOB_N = 72, S_JOB_K = 48 };

static void *s_weight_thread(void *arg)
{
    s_weight_job_t *job = arg;
    float A[S_JOB_M * S_JOB_K], C[S_JOB_M * S_JOB_N];
    for (int round = 0; round < 20; round++) {
        s_fill(A, S_JOB_M * S_JOB_K, 99, -1.0f, 1.0f);
        if (um_gemm_weight_apply(job->w, S_JOB_M, A, S_JOB_K, C, S_JOB_N, 0) != 0 ||
            memcmp(C, job->expected, sizeof C) != 0)
            job->failures++;
    }
    return NULL;
}

START_TEST(weight_concurrent_threads)
{
    /* One weight shared by four threads: the same primitive on the same input is
     * deterministic, so every result must equal the one computed before they start. */
    for (int bf16 = 0; bf16 < 2; bf16++) {
        static float W[S_JOB_N * S_JOB_K], expected[S_JOB_M * S_JOB_N];
        float A[S_JOB_M * S_JOB_K];
        s_fill(W, S_JOB_N * S_JOB_K, 98, -1.0f, 1.0f);
        s_fill(A, S_JOB_M * S_JOB_K, 99, -1.0f, 1.0f);
        um_gemm_weight_t *w = NULL;
        ck_assert_int_eq(um_gemm_weight_new(S_JOB_N, S_JOB_K, W, 0,
                                            bf16 ? UM_WDTYPE_BF16 : UM_WDTYPE_F32, &w), 0);
        ck_assert_int_eq(um_gemm_weight_apply(w, S_JOB_M, A, S_JOB_K, expected, S_JOB_N, 0), 0);

        pthread_t threads[4];
        s_weight_job_t jobs[4];
        for (int i = 0; i < 4; i++) {
            jobs[i] = (s_weight_job_t){.w = w, .expected = expected};
            ck_assert_int_eq(pthread_create(&threads[i], NULL, s_weight_thread, &jobs[i]), 0);
        }
        for (int i = 0; i < 4; i++) {
            pthread_join(threads[i], NULL);
            ck_assert_msg(jobs[i].failures == 0, "bf16 %d: thread %d saw %d wrong products",
                          bf16, i, jobs[i].failures);
        }
        um_gemm_weight_destroy(&w);
    }
}
END_TEST

/* ------------------------------------------------------------------------- */
/* Fused attention                                                            */

typedef struct s_attention_case {
    int32_t n_seq, seq_len, n_heads, n_kv_heads, head_dim, q_pad, kv_pad;
} s_attention_case_t;

/* Sequence lengths below, at and past one tile, GQA groups of 1, 2 and 4, padded rows. */
static const s_attention_case_t s_attention_cases[] = {
    {1, 1, 2, 2, 8, 0, 0},    {2, 5, 4, 2, 16, 3, 1}, {1, 64, 4, 4, 32, 0, 0},
    {2, 65, 4, 1, 16, 0, 5},  {1, 150, 2, 2, 64, 8, 0},
};
#define S_N_ATTENTION_CASES (int)(sizeof s_attention_cases / sizeof s_attention_cases[0])

/* Compare q, the attention output, with a naive attention in double. */
static void s_check_attention(const s_attention_case_t *ac, const um_attention_shape_t *sh,
                              const float *q, const float *q0, const float *kk, const float *v,
                              double *p, const char *isa, const char *backend)
{
    int32_t L = ac->seq_len, hd = ac->head_dim, H = ac->n_heads, G = H / ac->n_kv_heads;
    um_attention_shape_t shape = *sh;
    size_t T = (size_t)ac->n_seq * L;

    for (int32_t s = 0; s < ac->n_seq; s++) {
        for (int32_t h = 0; h < H; h++) {
            for (int32_t i = 0; i < L; i++) {
                const float *qi = q0 + ((size_t)s * L + i) * shape.q_stride + (size_t)h * hd;
                double max = -INFINITY, sum = 0;
                for (int32_t j = 0; j < L; j++) {
                    const float *kj = kk + ((size_t)s * L + j) * shape.kv_stride +
                                      (size_t)(h / G) * hd;
                    double dot = 0;
                    for (int32_t c = 0; c < hd; c++)
                        dot += (double)qi[c] * kj[c];
                    p[j] = dot;
                    max = fmax(max, dot);
                }
                for (int32_t j = 0; j < L; j++) {
                    p[j] = exp(p[j] - max);
                    sum += p[j];
                }
                for (int32_t c = 0; c < hd; c++) {
                    double out = 0;
                    for (int32_t j = 0; j < L; j++)
                        out += p[j] / sum *
                               v[((size_t)s * L + j) * shape.kv_stride + (size_t)(h / G) * hd + c];
                    float got = q[((size_t)s * L + i) * shape.q_stride + (size_t)h * hd + c];
                    /* Scores below 64 * 2.25 in magnitude lose about 1e-5 relative in f32,
                     * softmax and the weighted sum of values below 1 add a few ulp: 1e-4
                     * absolute is well above that and far below a wrong key or head. */
                    ck_assert_msg(fabs(got - out) <= 1e-4,
                                  "%s/%s seq %d head %d row %d col %d: got %.7g, expected "
                                  "%.7g", isa, backend, s, h, i, c, got, out);
                }
            }
        }
        /* Padding columns of q are not written. */
        for (size_t t = 0; t < T; t++)
            for (int32_t c = H * hd; c < shape.q_stride; c++)
                ck_assert_float_eq(q[t * shape.q_stride + c], q0[t * shape.q_stride + c]);
    }
}

START_TEST(attention_matches_double)
{
    const s_attention_case_t *ac = &s_attention_cases[_i % S_N_ATTENTION_CASES];
    const um_kernel_table_t *k = um_kernels_for((um_isa_t)(_i / S_N_ATTENTION_CASES));
    if (!k)
        return; /* this host cannot run that ISA; the kernel suite reports which */

    int32_t L = ac->seq_len, hd = ac->head_dim, H = ac->n_heads;
    um_attention_shape_t shape = {
        .n_seq = ac->n_seq, .seq_len = L, .n_heads = H, .n_kv_heads = ac->n_kv_heads,
        .head_dim = hd, .q_stride = H * hd + ac->q_pad,
        .kv_stride = ac->n_kv_heads * hd + ac->kv_pad,
    };
    size_t T = (size_t)ac->n_seq * L;
    float *q = malloc(T * shape.q_stride * sizeof *q);
    float *q0 = malloc(T * shape.q_stride * sizeof *q0);
    float *kk = malloc(T * shape.kv_stride * sizeof *kk);
    float *v = malloc(T * shape.kv_stride * sizeof *v);
    s_fill(q0, T * shape.q_stride, 21, -1.5f, 1.5f);
    s_fill(kk, T * shape.kv_stride, 22, -1.5f, 1.5f);
    s_fill(v, T * shape.kv_stride, 23, -1.0f, 1.0f);
    memcpy(q, q0, T * shape.q_stride * sizeof *q);

    int threads = 8;
    float *scratch = malloc(um_attention_scratch_floats(&shape, threads) * sizeof *scratch);
    double *p = malloc((size_t)L * sizeof *p);
    char err[256];
    static const char *const backends[] = {"onednn", "libxsmm"};
    for (int b = 0; b < 2; b++) {
        if (um_attention_select(backends[b], err, sizeof err) != 0)
            continue; /* libxsmm is not in every build */
        memcpy(q, q0, T * shape.q_stride * sizeof *q);
        int rc = um_attention(k, &shape, q, kk, v, scratch);
        ck_assert_msg(rc == 0, "%s: um_attention returned %s", backends[b], um_error_name(rc));
        s_check_attention(ac, &shape, q, q0, kk, v, p, k->isa, backends[b]);
    }
    ck_assert_int_eq(um_attention_select("onednn", err, sizeof err), 0);
    free(p);
    free(scratch);
    free(q);
    free(q0);
    free(kk);
    free(v);
}
END_TEST

START_TEST(attention_select_rejects_unknown)
{
    char err[256] = "";
    ck_assert_int_eq(um_attention_select("cublas", err, sizeof err), UM_EINVAL);
    ck_assert_msg(strstr(err, "'cublas'") && strstr(err, "onednn"),
                  "message \"%s\" names neither the value nor the choices", err);
    ck_assert_str_eq(um_attention_backend_name(), "onednn");
}
END_TEST

START_TEST(attention_rejects_bad_shape)
{
    float buf[64] = {0};
    um_attention_shape_t shape = {.n_seq = 1, .seq_len = 2, .n_heads = 3, .n_kv_heads = 2,
                                  .head_dim = 4, .q_stride = 12, .kv_stride = 8};
    /* 3 query heads cannot share 2 key/value heads evenly. */
    ck_assert_int_eq(um_attention(um_kernels(), &shape, buf, buf, buf, buf), UM_EINVAL);
    shape.n_heads = 2;
    shape.q_stride = 7; /* below n_heads * head_dim */
    ck_assert_int_eq(um_attention(um_kernels(), &shape, buf, buf, buf, buf), UM_EINVAL);
}
END_TEST

Suite *um_gemm_suite(void)
{
    Suite *s = suite_create("gemm");

    TCase *tc = tcase_create("weights");
    tcase_set_timeout(tc, 60);
    tcase_add_loop_test(tc, weight_product_matches_double, 0, 3 * S_N_WEIGHT_CASES);
    tcase_add_test(tc, weight_borrow_follows_source);
    tcase_add_test(tc, weight_rejects_bad_arguments);
    tcase_add_test(tc, weight_concurrent_threads);
    suite_add_tcase(s, tc);

    tc = tcase_create("attention");
    tcase_set_timeout(tc, 60);
    tcase_add_loop_test(tc, attention_matches_double, 0, UM_ISA_COUNT * S_N_ATTENTION_CASES);
    tcase_add_test(tc, attention_rejects_bad_shape);
    tcase_add_test(tc, attention_select_rejects_unknown);
    suite_add_tcase(s, tc);
    return s;
}
