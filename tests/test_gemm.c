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

#include <jansson.h>
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
/* int8 weights                                                               */

/* Select an int8 path by name, failing the test on an error. */
static void s_int8_select(const char *name)
{
    char err[256] = "";
    int rc = um_gemm_int8_select(name, err, sizeof err);
    ck_assert_msg(rc == 0, "um_gemm_int8_select(%s) returned %s: %s", name, um_error_name(rc),
                  err);
}

START_TEST(int8_quantiser_matches_torch)
{
    /* tools/quant_ref.py quantises the same matrices with torch: the int8 values and the
     * scales must match bit for bit, for the reference and for every kernel table. */
    const char *dir = um_test_env("UM_TEST_FIXTURES");
    json_error_t jerr;
    json_t *root = json_load_file(um_test_path(dir, "quant.json"), 0, &jerr);
    ck_assert_msg(root != NULL, "cannot read quant.json (%s): regenerate it with "
                  "tools/quant_ref.py fixtures tests/fixtures", jerr.text);
    json_t *qz = json_object_get(root, "quantiser");
    size_t x_len = 0, q_len = 0, s_len = 0;
    float *x = (float *)um_test_read_file(
        um_test_path(dir, json_string_value(json_object_get(qz, "x"))), &x_len);
    int8_t *q = (int8_t *)um_test_read_file(
        um_test_path(dir, json_string_value(json_object_get(qz, "q"))), &q_len);
    float *scale = (float *)um_test_read_file(
        um_test_path(dir, json_string_value(json_object_get(qz, "scale"))), &s_len);
    ck_assert(x && q && scale);
    ck_assert_uint_eq(x_len, q_len * sizeof(float));

    json_t *shapes = json_object_get(qz, "shapes");
    size_t at = 0, row_at = 0, zero_rows = 0;
    for (size_t c = 0; c < json_array_size(shapes); c++) {
        json_t *sh = json_array_get(shapes, c);
        int32_t rows = (int32_t)json_integer_value(json_array_get(sh, 0));
        int32_t cols = (int32_t)json_integer_value(json_array_get(sh, 1));
        int8_t *got = malloc((size_t)cols);
        for (int32_t r = 0; r < rows; r++, row_at++, at += (size_t)cols) {
            ck_assert_uint_lt(row_at, s_len / sizeof(float));
            for (int isa = 0; isa < UM_ISA_COUNT; isa++) {
                const um_kernel_table_t *t = um_kernels_for((um_isa_t)isa);
                if (!t)
                    continue;
                float s = t->quantize_s8(got, x + at, cols, 127);
                ck_assert_msg(memcmp(&s, &scale[row_at], sizeof s) == 0, "%s case %zu row %d: "
                              "scale %.9g, torch %.9g", t->isa, c, r, s, scale[row_at]);
                for (int32_t i = 0; i < cols; i++)
                    ck_assert_msg(got[i] == q[at + i], "%s case %zu row %d col %d (x %.9g): "
                                  "%d, torch %d", t->isa, c, r, i, x[at + i], got[i], q[at + i]);
            }
            zero_rows += scale[row_at] == 0.0f;
        }
        free(got);
    }
    ck_assert_uint_eq(at, q_len);
    ck_assert_msg(zero_rows >= 1, "the fixture has no all-zero row");
    free(x);
    free(q);
    free(scale);
    json_decref(root);
}
END_TEST

/*
 * One int8 product on the path `path` against a double product of the operands as that
 * path rounds them: int8 weights q_w * s_w, and on the oneDNN path activations
 * q_a * s_a quantised per row to um_gemm_int8_levels() levels.
 */
static void s_check_int8_case(const s_weight_case_t *wc, const char *path, int accumulate)
{
    int32_t M = wc->m, N = wc->n, K = wc->k;
    float *A = malloc((size_t)M * wc->lda * sizeof *A);
    float *W = malloc((size_t)N * K * sizeof *W);
    float *C = malloc((size_t)M * wc->ldc * sizeof *C);
    float *C0 = malloc((size_t)M * wc->ldc * sizeof *C0);
    int8_t *qw = malloc((size_t)N * K), *qa = malloc((size_t)K);
    float *sw = malloc((size_t)N * sizeof *sw);
    s_fill(A, (size_t)M * wc->lda, 21 + M, -1.0f, 1.0f);
    s_fill(W, (size_t)N * K, 22 + N, -1.0f, 1.0f);
    s_fill(C0, (size_t)M * wc->ldc, 23, -2.0f, 2.0f);
    /* Row 0 of W all zero: scale 0, and its column of the product must be exactly 0. */
    memset(W, 0, (size_t)K * sizeof *W);
    memcpy(C, C0, (size_t)M * wc->ldc * sizeof *C);
    for (int32_t n = 0; n < N; n++)
        sw[n] = um_k_quantize_s8_ref(qw + (size_t)n * K, W + (size_t)n * K, K, 127);

    s_int8_select(path);
    int onednn = um_gemm_int8_path() == UM_INT8_ONEDNN;
    int32_t levels = um_gemm_int8_levels();
    um_gemm_weight_t *w = NULL;
    int rc = um_gemm_weight_new(N, K, W, 0, UM_WDTYPE_INT8, &w);
    ck_assert_msg(rc == 0, "um_gemm_weight_new returned %s", um_error_name(rc));
    ck_assert_int_eq(um_gemm_weight_borrows(w), 0);
    rc = um_gemm_weight_apply(w, M, A, wc->lda, C, wc->ldc, accumulate);
    ck_assert_msg(rc == 0, "um_gemm_weight_apply returned %s", um_error_name(rc));

    for (int32_t i = 0; i < M; i++) {
        const float *a = A + (size_t)i * wc->lda;
        float sa = onednn ? um_k_quantize_s8_ref(qa, a, K, levels) : 1.0f;
        for (int32_t j = 0; j < N; j++) {
            double sum = 0, abs_sum = 0;
            for (int32_t p = 0; p < K; p++) {
                double av = onednn ? (double)qa[p] : (double)a[p];
                /* The dequant path widens q_w * s_w to f32; the oneDNN path sums integers. */
                double bv = onednn ? (double)qw[(size_t)j * K + p]
                                   : (double)((float)qw[(size_t)j * K + p] * sw[j]);
                sum += av * bv;
                abs_sum += fabs(av * bv);
            }
            double dot = onednn ? (double)sa * (double)sw[j] * sum : sum;
            double c0 = accumulate ? C0[(size_t)i * wc->ldc + j] : 0.0;
            double expected = dot + c0, got = C[(size_t)i * wc->ldc + j];
            /* oneDNN path: the s32 sum is exact, then its conversion to f32, two products
             * and the add of C each round once, at most 4 * 2^-24 of |dot| + |C0|, below
             * 3e-7. Dequant path: an f32 product of f32 operands as in
             * weight_product_matches_double, 1e-5 of the sum of magnitudes. */
            double tol = onednn ? 3e-7 * (fabs(dot) + fabs(c0))
                                : 1e-5 * abs_sum + 1e-6;
            ck_assert_msg(fabs(got - expected) <= tol, "%s M=%d N=%d K=%d acc %d C[%d][%d]="
                          "%.9g expected %.9g", path, M, N, K, accumulate, i, j, got, expected);
            if (j == 0 && !accumulate)
                ck_assert_msg(got == 0.0, "%s: the zero weight row gave %.9g", path, got);
        }
        for (int32_t j = N; j < wc->ldc; j++)
            ck_assert_float_eq(C[(size_t)i * wc->ldc + j], C0[(size_t)i * wc->ldc + j]);
    }
    um_gemm_weight_destroy(&w);
    s_int8_select("auto");
    free(A);
    free(W);
    free(C);
    free(C0);
    free(qw);
    free(qa);
    free(sw);
}

START_TEST(int8_product_matches_dequantised)
{
    const s_weight_case_t *wc = &s_weight_cases[_i % S_N_WEIGHT_CASES];
    const char *path = _i / S_N_WEIGHT_CASES ? "dequant" : "onednn";
    s_check_int8_case(wc, path, 0);
    s_check_int8_case(wc, path, 1);
}
END_TEST

START_TEST(int8_sums_exact_at_extremes)
{
    /* Every activation at its largest level and every weight at +-127: each pair of
     * products is as large as the offset u8 activations allow. Without VNNI, oneDNN's
     * int16 pair sums would saturate at 8-bit activations and halve these results. */
    enum { M = 3, N = 4, K = 4096 };
    float *A = malloc((size_t)M * K * sizeof *A), *W = malloc((size_t)N * K * sizeof *W);
    float C[M * N];
    for (int32_t i = 0; i < M * K; i++)
        A[i] = 1.0f;
    /* Rows of W: all 1, all -1, alternating 1 and -1, and all 0.5. */
    for (int32_t k = 0; k < K; k++) {
        W[k] = 1.0f;
        W[K + k] = -1.0f;
        W[2 * K + k] = k % 2 ? 1.0f : -1.0f;
        W[3 * K + k] = 0.5f;
    }
    /* Row 3: one 1 (q 127), so 0.5 / scale is 63.5 exactly in f32 and rounds to even, 64. */
    W[3 * K] = 1.0f;
    s_int8_select("onednn");
    um_gemm_weight_t *w = NULL;
    ck_assert_int_eq(um_gemm_weight_new(N, K, W, 0, UM_WDTYPE_INT8, &w), 0);
    ck_assert_int_eq(um_gemm_weight_apply(w, M, A, K, C, N, 0), 0);
    /* Row 3 sums 127 + 64 * (K - 1) steps of 1/127. */
    const double expected[N] = {K, -K, 0, (127.0 + 64.0 * (K - 1)) / 127.0};
    for (int32_t i = 0; i < M; i++)
        for (int32_t n = 0; n < N; n++)
            ck_assert_msg(fabs(C[i * N + n] - expected[n]) <= 3e-7 * fabs(expected[n]),
                          "C[%d][%d] = %.9g, expected %.9g (%d activation levels)", i, n,
                          C[i * N + n], expected[n], um_gemm_int8_levels());
    um_gemm_weight_destroy(&w);
    s_int8_select("auto");
    free(A);
    free(W);
}
END_TEST

START_TEST(int8_select_and_size)
{
    char err[256] = "";
    ck_assert_int_eq(um_gemm_int8_select("vnni", err, sizeof err), UM_EINVAL);
    ck_assert_msg(strstr(err, "vnni") && strstr(err, "onednn, dequant or auto"),
                  "message: %s", err);

    ck_assert_str_eq(um_wdtype_name(UM_WDTYPE_INT8), "int8");
    ck_assert_ptr_null(um_wdtype_name((um_wdtype_t)9));
    um_wdtype_t d = UM_WDTYPE_F32;
    ck_assert_int_eq(um_wdtype_parse("int8", &d), 0);
    ck_assert_int_eq(d, UM_WDTYPE_INT8);
    ck_assert_int_eq(um_wdtype_parse("auto", &d), 0);
    ck_assert_int_eq(d, 0);
    ck_assert_int_eq(um_wdtype_parse("int4", &d), UM_EINVAL);

    /* One byte per element plus a scale and a row sum per row: exactly that when the
     * weight stays plain (dequant), at most the oneDNN layout's padding more otherwise. */
    enum { N = 40, K = 72 };
    static float W[N * K];
    s_fill(W, N * K, 31, -1.0f, 1.0f);
    const char *paths[] = {"dequant", "onednn"};
    for (int p = 0; p < 2; p++) {
        s_int8_select(paths[p]);
        ck_assert_ptr_nonnull(strstr(um_gemm_int8_reason(), paths[p]));
        um_gemm_weight_t *w = NULL;
        ck_assert_int_eq(um_gemm_weight_new(N, K, W, 0, UM_WDTYPE_INT8, &w), 0);
        size_t plain = (size_t)N * K + (size_t)N * 8;
        if (p == 0)
            ck_assert_uint_eq(um_gemm_weight_bytes(w), plain);
        else
            ck_assert_msg(um_gemm_weight_bytes(w) >= plain &&
                          um_gemm_weight_bytes(w) < 2 * plain, "%zu bytes for %zu plain",
                          um_gemm_weight_bytes(w), plain);
        um_gemm_weight_destroy(&w);
    }
    s_int8_select("auto");

    /* K past UM_GEMM_INT8_MAX_K could overflow the s32 sums. */
    um_gemm_weight_t *w = (um_gemm_weight_t *)1;
    ck_assert_int_eq(um_gemm_weight_new(1, UM_GEMM_INT8_MAX_K + 1, W, 0, UM_WDTYPE_INT8, &w),
                     UM_EINVAL);
    ck_assert_ptr_null(w);
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

    tc = tcase_create("int8");
    tcase_set_timeout(tc, 60);
    tcase_add_test(tc, int8_quantiser_matches_torch);
    tcase_add_loop_test(tc, int8_product_matches_dequantised, 0, 2 * S_N_WEIGHT_CASES);
    tcase_add_test(tc, int8_sums_exact_at_extremes);
    tcase_add_test(tc, int8_select_and_size);
    suite_add_tcase(s, tc);

    tc = tcase_create("attention");
    tcase_set_timeout(tc, 60);
    tcase_add_loop_test(tc, attention_matches_double, 0, UM_ISA_COUNT * S_N_ATTENTION_CASES);
    tcase_add_test(tc, attention_rejects_bad_shape);
    tcase_add_test(tc, attention_select_rejects_unknown);
    suite_add_tcase(s, tc);
    return s;
}
