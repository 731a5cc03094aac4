/*
 * Kernel suite: every op of the kernel table against a double-precision computation
 * written out in the test and against the scalar reference, and the oneDNN products
 * against naive loops over several shapes, strides and accumulate settings. The element
 * and reduction tests loop over every ISA, with the um_isa_t value as the loop index. An
 * ISA this host cannot run is reported once on stdout, and its tests return early.
 */
#include <float.h>
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include <unmaskd/error.h>

#include "kernels.h"
#include "rng.h"
#include "testutil.h"

/* ------------------------------------------------------------------------- */
/* Helpers                                                                    */

/*
 * The table for ISA index isa, or NULL when this host cannot run it. The first NULL for
 * an ISA prints the reason, so the log of a run shows which kernels it skipped.
 */
static const um_kernel_table_t *s_table(int isa)
{
    static int reported[UM_ISA_COUNT];
    const um_kernel_table_t *t = um_kernels_for((um_isa_t)isa);
    if (!t && !reported[isa]) {
        char why[160] = "";
        um_isa_supported((um_isa_t)isa, why, sizeof why);
        printf("skipping %s kernels: %s\n", um_isa_name((um_isa_t)isa), why);
        fflush(stdout);
        reported[isa] = 1;
    }
    return t;
}

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

/* Ragged lengths around the vector widths (8 and 16 floats), a d_model-sized row and
 * LLaDA's vocabulary of 126464 tokens. */
static const int32_t s_lengths[] = {1, 3, 15, 16, 17, 31, 33, 255, 4097, 126464};
#define S_N_LENGTHS (sizeof s_lengths / sizeof s_lengths[0])

/*
 * Relative error allowed for an f32 sum of n terms of one sign. Each addition rounds by
 * at most 2^-24 of the running sum, and round-to-nearest errors are as often up as down,
 * so they grow like a random walk to about sqrt(n) 2^-24. 4 sqrt(n) 2^-24 leaves room
 * for the spread. Vector lanes split the sum into shorter ones, which only lowers it.
 */
static double s_f32_sum_rel(int32_t n)
{
    return 4.0 * sqrt((double)n) * 0x1p-24;
}

#define S_ULP_F32 0x1p-24 /* half the gap between 1 and the next float: one rounding */

/*
 * ck_assert_msg for checks inside loops over elements. It tests the condition first, so a
 * passing check costs no call into Check, which records every assertion it is given with
 * a write(2) in this runner's no-fork mode.
 */
#define S_CHECK(cond, ...)                                                                     \
    do {                                                                                       \
        if (!(cond))                                                                           \
            ck_abort_msg(__VA_ARGS__);                                                         \
    } while (0)

/* Fails with the op, the ISA, the length and the index when |got - expected| > tol. */
#define S_ASSERT_CLOSE(op, t, n, i, got, expected, tol)                                        \
    S_CHECK(fabs((double)(got) - (double)(expected)) <= (tol),                                 \
            "%s %s n=%d i=%d: got %.9g, expected %.9g (tolerance %.3g)", op, (t)->isa,         \
            (int)(n), (int)(i), (double)(got), (double)(expected), (double)(tol))

/* Whether two floats are the same value, NaN matching NaN (for exact comparisons). */
static int s_same_float(float a, float b)
{
    return (isnan(a) && isnan(b)) || (a == b && !signbit(a) == !signbit(b));
}

/*
 * A row of n floats that ends where an inaccessible page begins, so a kernel that reads
 * or writes past the row's end faults instead of passing by luck. Freed with
 * s_guarded_free.
 */
typedef struct s_guarded {
    void *map;
    size_t map_len;
    void *row;
} s_guarded_t;

static s_guarded_t s_guarded_new(size_t bytes)
{
    size_t page = (size_t)sysconf(_SC_PAGESIZE);
    size_t data = (bytes + page - 1) / page * page;
    s_guarded_t g = {NULL, data + page, NULL};
    g.map = mmap(NULL, g.map_len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    S_CHECK(g.map != MAP_FAILED, "mmap of %zu bytes failed", g.map_len);
    ck_assert_int_eq(mprotect((char *)g.map + data, page, PROT_NONE), 0);
    g.row = (char *)g.map + data - bytes;
    return g;
}

static void s_guarded_free(s_guarded_t *g)
{
    munmap(g->map, g->map_len);
}

/* ------------------------------------------------------------------------- */
/* Kernel selection                                                           */

START_TEST(kernel_table_selected)
{
    const um_kernel_table_t *t = um_kernels();
    ck_assert_ptr_nonnull(t);
    ck_assert_ptr_eq(t, um_kernels_for(um_kernels_isa()));
    ck_assert_ptr_nonnull(t->rmsnorm);
    ck_assert_ptr_nonnull(t->gumbel_argmax);

    const um_kernel_table_t *ref = um_kernels_scalar();
    ck_assert_str_eq(ref->isa, "scalar");
    ck_assert_ptr_eq(ref->rmsnorm, um_k_rmsnorm_ref);
    ck_assert_ptr_eq(ref->logsumexp, um_k_logsumexp_ref);
    ck_assert_ptr_eq(um_kernels_for(UM_ISA_SCALAR), ref);
}
END_TEST

START_TEST(kernels_select_validates_cap)
{
    char err[256] = "";
    ck_assert_int_eq(um_kernels_select("avx9000", err, sizeof err), UM_EINVAL);
    S_CHECK(strstr(err, "avx9000") != NULL, "message \"%s\" does not name the value", err);

    /* Some ISA is always out of reach: neon on x86-64, the x86 ones elsewhere. */
    um_isa_t unsupported = UM_ISA_COUNT, best = UM_ISA_SCALAR;
    for (int i = 0; i < UM_ISA_COUNT; i++) {
        if (!um_isa_supported((um_isa_t)i, NULL, 0)) {
            if (unsupported == UM_ISA_COUNT)
                unsupported = (um_isa_t)i;
        } else {
            best = (um_isa_t)i;
        }
    }
    ck_assert_int_lt(unsupported, UM_ISA_COUNT);
    const char *name = um_isa_name(unsupported);
    err[0] = '\0';
    ck_assert_int_eq(um_kernels_select(name, err, sizeof err), UM_EINVAL);
    S_CHECK(strstr(err, name) != NULL, "message \"%s\" does not name %s", err, name);
    ck_assert_ptr_null(um_kernels_for(unsupported));

    ck_assert_int_eq(um_kernels_select("scalar", err, sizeof err), 0);
    ck_assert_int_eq(um_kernels_isa(), UM_ISA_SCALAR);
    ck_assert_ptr_eq(um_kernels(), um_kernels_scalar());

    /* Back to the default choice, so later suites run on the host's best kernels. The
     * select also caps oneDNN. Before the first product that cap can still change, and
     * after it oneDNN keeps the ISA it started with. */
    ck_assert_int_eq(um_kernels_select(um_isa_name(best), err, sizeof err), 0);
    ck_assert_int_eq(um_kernels_isa(), best);
    ck_assert_ptr_eq(um_kernels(), um_kernels_for(best));
}
END_TEST

/* ------------------------------------------------------------------------- */
/* Row kernels                                                                */

START_TEST(rmsnorm_matches_double)
{
    const um_kernel_table_t *t = s_table(_i);
    if (!t)
        return;
    for (size_t c = 0; c < S_N_LENGTHS; c++) {
        int32_t n = s_lengths[c];
        float *x = malloc(n * sizeof *x), *w = malloc(n * sizeof *w);
        float *out = malloc(n * sizeof *out), *ref = malloc(n * sizeof *ref);
        s_fill(x, n, 11 + c, -3.0f, 3.0f);
        s_fill(w, n, 97 + c, 0.5f, 1.5f);
        const float eps = 1e-5f;
        t->rmsnorm(out, x, w, n, eps);
        um_k_rmsnorm_ref(ref, x, w, n, eps);

        double sum_sq = 0.0;
        for (int32_t i = 0; i < n; i++)
            sum_sq += (double)x[i] * x[i];
        double inv_rms = 1.0 / sqrt(sum_sq / n + eps);
        /* The f32 sum of squares (one sign) is off by s_f32_sum_rel(n), which moves
         * 1 / sqrt by half that. The division, sqrt and two products add a few roundings. */
        double rel = s_f32_sum_rel(n) + 8 * S_ULP_F32;
        for (int32_t i = 0; i < n; i++) {
            double expected = x[i] * inv_rms * w[i];
            S_ASSERT_CLOSE("rmsnorm", t, n, i, out[i], expected, rel * fabs(expected) + 1e-30);
            S_ASSERT_CLOSE("rmsnorm vs scalar", t, n, i, out[i], ref[i],
                           2 * rel * fabs(expected) + 1e-30);
        }
        free(x);
        free(w);
        free(out);
        free(ref);
    }
}
END_TEST

START_TEST(layernorm_matches_double)
{
    const um_kernel_table_t *t = s_table(_i);
    if (!t)
        return;
    for (size_t c = 0; c < S_N_LENGTHS; c++) {
        int32_t n = s_lengths[c];
        float *x = malloc(n * sizeof *x), *w = malloc(n * sizeof *w), *b = malloc(n * sizeof *b);
        float *out = malloc(n * sizeof *out), *ref = malloc(n * sizeof *ref);
        /* An offset of 10 checks that the variance is taken around the mean. */
        s_fill(x, n, 13 + c, 9.0f, 11.0f);
        s_fill(w, n, 17 + c, 0.5f, 1.5f);
        s_fill(b, n, 19 + c, -1.0f, 1.0f);
        const float eps = 1e-5f;

        double sum = 0.0, sum_abs = 0.0;
        for (int32_t i = 0; i < n; i++) {
            sum += x[i];
            sum_abs += fabs(x[i]);
        }
        double mean = sum / n, sq = 0.0;
        for (int32_t i = 0; i < n; i++)
            sq += (x[i] - mean) * (x[i] - mean);
        double inv_std = 1.0 / sqrt(sq / n + eps);

        for (int with_bias = 0; with_bias <= 1; with_bias++) {
            const float *bias = with_bias ? b : NULL;
            t->layernorm(out, x, w, bias, n, eps);
            um_k_layernorm_ref(ref, x, w, bias, n, eps);
            for (int32_t i = 0; i < n; i++) {
                double y = (x[i] - mean) * inv_std * w[i];
                double expected = with_bias ? y + b[i] : y;
                /* The f32 mean is off by about s_f32_sum_rel(n) of the mean magnitude,
                 * which shifts every centred value by that much times inv_std * w. The
                 * f32 sum of centred squares moves inv_std as in rmsnorm. The bias adds
                 * one rounding of its magnitude. */
                double tol = s_f32_sum_rel(n) * (sum_abs / n) * inv_std * w[i] +
                             (s_f32_sum_rel(n) + 8 * S_ULP_F32) * fabs(y) +
                             (with_bias ? 2 * S_ULP_F32 * (fabs(b[i]) + fabs(expected)) : 0.0) +
                             1e-30;
                S_ASSERT_CLOSE(with_bias ? "layernorm+bias" : "layernorm", t, n, i, out[i],
                               expected, tol);
                S_ASSERT_CLOSE("layernorm vs scalar", t, n, i, out[i], ref[i], 2 * tol);
            }
        }
        free(x);
        free(w);
        free(b);
        free(out);
        free(ref);
    }
}
END_TEST

START_TEST(rope_matches_double)
{
    const um_kernel_table_t *t = s_table(_i);
    if (!t)
        return;
    /* 34 and 66 leave pairs beyond the 8- and 16-float vectors. 128 is LLaDA's. */
    const int32_t head_dims[] = {2, 16, 34, 64, 66, 128};
    const int32_t positions[] = {0, 1, 17, 4095};
    for (size_t h = 0; h < sizeof head_dims / sizeof head_dims[0]; h++) {
        int32_t hd = head_dims[h], half = hd / 2;
        for (size_t p = 0; p < 4; p++) {
            int32_t pos = positions[p];
            float x[128], ref[128], original[128], cos_sin[128];
            s_fill(original, hd, 5 + h * 10 + p, -2.0f, 2.0f);
            memcpy(x, original, hd * sizeof *x);
            memcpy(ref, original, hd * sizeof *ref);

            double angle[64];
            for (int32_t i = 0; i < half; i++) {
                angle[i] = pos * pow(10000.0, -2.0 * i / hd);
                cos_sin[2 * i] = (float)cos(angle[i]);
                cos_sin[2 * i + 1] = (float)sin(angle[i]);
            }
            t->rope(x, cos_sin, hd);
            um_k_rope_ref(ref, cos_sin, hd);

            for (int32_t i = 0; i < half; i++) {
                double a = original[i], b = original[i + half];
                double c = cos(angle[i]), s = sin(angle[i]);
                /* cos and sin are rounded to f32 (relative 6e-8) and each output is two
                 * f32 products and a sum of values below 2 in magnitude: 1e-6 absolute
                 * covers that with a 4x margin. */
                S_ASSERT_CLOSE("rope", t, hd, i, x[i], a * c - b * s, 1e-6);
                S_ASSERT_CLOSE("rope", t, hd, i + half, x[i + half], b * c + a * s, 1e-6);
                S_ASSERT_CLOSE("rope vs scalar", t, hd, i, x[i], ref[i], 2e-6);
                S_ASSERT_CLOSE("rope vs scalar", t, hd, i + half, x[i + half], ref[i + half], 2e-6);
            }
        }
    }
}
END_TEST

/* Softmax of x in double, written to expected. */
static void s_softmax_double(const float *x, int32_t n, double *expected)
{
    double max = -INFINITY, sum = 0.0;
    for (int32_t i = 0; i < n; i++)
        max = fmax(max, x[i]);
    for (int32_t i = 0; i < n; i++)
        sum += expected[i] = exp(x[i] - max);
    for (int32_t i = 0; i < n; i++)
        expected[i] /= sum;
}

START_TEST(softmax_matches_double)
{
    const um_kernel_table_t *t = s_table(_i);
    if (!t)
        return;
    for (size_t c = 0; c < S_N_LENGTHS; c++) {
        int32_t n = s_lengths[c];
        float *x = malloc(n * sizeof *x), *ref = malloc(n * sizeof *ref);
        double *expected = malloc(n * sizeof *expected);
        /* Offsets near 80 would overflow expf without the max subtraction. */
        s_fill(x, n, 23 + c, 70.0f, 90.0f);
        /* Every seventh entry is banned (-inf), as a sampler's mask does. */
        for (int32_t i = 5; i < n; i += 7)
            x[i] = -INFINITY;
        s_softmax_double(x, n, expected);
        memcpy(ref, x, n * sizeof *x);
        t->softmax(x, n);
        um_k_softmax_ref(ref, n);

        /* Each output is an f32 exp of a value <= 0 (within 8e-8 relative), divided by
         * an f32 sum of n positive terms (s_f32_sum_rel(n)). Inputs lie within 20 of the
         * maximum, so no term is small enough to flush to zero. */
        double rel = s_f32_sum_rel(n) + 8 * S_ULP_F32, total = 0.0;
        for (int32_t i = 0; i < n; i++) {
            total += x[i];
            S_ASSERT_CLOSE("softmax", t, n, i, x[i], expected[i], rel * expected[i]);
            S_ASSERT_CLOSE("softmax vs scalar", t, n, i, x[i], ref[i], 2 * rel * expected[i]);
        }
        S_CHECK(fabs(total - 1.0) <= rel, "%s softmax n=%d sums to %.9g", t->isa, n, total);
        free(x);
        free(ref);
        free(expected);
    }

    /* One finite entry among -inf: all the mass on it, at the start, middle and end. */
    float row[33];
    for (int at = 0; at < 33; at += 16) {
        for (int i = 0; i < 33; i++)
            row[i] = i == at ? -3.5f : -INFINITY;
        t->softmax(row, 33);
        for (int i = 0; i < 33; i++)
            S_CHECK(row[i] == (i == at ? 1.0f : 0.0f), "%s softmax one-hot at %d: "
                          "row[%d] = %g", t->isa, at, i, row[i]);
    }
}
END_TEST

/* ------------------------------------------------------------------------- */
/* Element-wise kernels                                                       */

START_TEST(silu_mul_matches_double)
{
    const um_kernel_table_t *t = s_table(_i);
    if (!t)
        return;
    for (size_t c = 0; c < S_N_LENGTHS; c++) {
        int32_t n = s_lengths[c];
        float *gate = malloc(n * sizeof *gate), *up = malloc(n * sizeof *up);
        float *out = malloc(n * sizeof *out), *ref = malloc(n * sizeof *ref);
        s_fill(gate, n, 31 + c, -20.0f, 20.0f);
        s_fill(up, n, 37 + c, -2.0f, 2.0f);
        /* Gates where e^-g overflows f32 (the result is -0) and where it underflows. */
        gate[0] = -100.0f;
        if (n > 2)
            gate[n - 1] = 100.0f;
        t->silu_mul(out, gate, up, n);
        um_k_silu_mul_ref(ref, gate, up, n);
        for (int32_t i = 0; i < n; i++) {
            double g = gate[i];
            double expected = g / (1.0 + exp(-g)) * up[i];
            /* An f32 exp (within 8e-8 relative), one division and two products stay
             * within 1e-6 relative. Results below 1e-37 are flushed to 0 in f32, hence
             * the absolute term. */
            S_ASSERT_CLOSE("silu_mul", t, n, i, out[i], expected, 1e-6 * fabs(expected) + 1e-37);
            S_ASSERT_CLOSE("silu_mul vs scalar", t, n, i, out[i], ref[i],
                           2e-6 * fabs(expected) + 1e-37);
        }

        /* In place over the gate, as the forward pass calls it. */
        float *copy = malloc(n * sizeof *copy);
        memcpy(copy, gate, n * sizeof *copy);
        t->silu_mul(copy, copy, up, n);
        for (int32_t i = 0; i < n; i++)
            S_CHECK(s_same_float(copy[i], out[i]), "%s silu_mul in place n=%d i=%d: "
                          "%g != %g", t->isa, n, i, copy[i], out[i]);
        free(copy);
        free(gate);
        free(up);
        free(out);
        free(ref);
    }
}
END_TEST

/* Inputs for the GELU tests: a random spread, zeros, tiny and large values. */
static float *s_gelu_inputs(int32_t n, uint64_t seed)
{
    float *x = malloc(n * sizeof *x);
    s_fill(x, n, seed, -12.0f, 12.0f);
    const float special[] = {0.0f, -0.0f, 1e-30f, -1e-30f, 0.5f, -0.5f, 3.0f, -3.0f, -9.0f, 50.0f};
    for (int32_t i = 0; i < n && i < 10; i++)
        x[(int32_t)((int64_t)i * 9973 % n)] = special[i];
    return x;
}

/*
 * Tolerance of the reference GELUs. They form 1 + erff or 1 + tanhf in f32, which is off
 * by up to about 2 roundings of 1 (2.4e-7) absolute, so the output is off by x/2 times
 * that. Other roundings add 1e-6 relative. The SIMD kernels avoid that cancellation, so
 * each test checks them against a tighter, relative tolerance of their own.
 */
static double s_gelu_ref_tol(double x, double expected)
{
    return 1e-6 * fabs(expected) + 1.5e-7 * fabs(x) + 1e-37;
}

START_TEST(gelu_erf_matches_double)
{
    const um_kernel_table_t *t = s_table(_i);
    if (!t)
        return;
    int scalar = t == um_kernels_scalar();
    for (size_t c = 0; c < S_N_LENGTHS; c++) {
        int32_t n = s_lengths[c];
        float *x = s_gelu_inputs(n, 41 + c);
        float *out = malloc(n * sizeof *out), *ref = malloc(n * sizeof *ref);
        t->gelu_erf(out, x, n);
        um_k_gelu_erf_ref(ref, x, n);
        for (int32_t i = 0; i < n; i++) {
            double v = x[i];
            /* erfc keeps the relative accuracy of the negative side. */
            double expected = v < 0 ? 0.5 * v * erfc(-v / sqrt(2.0))
                                    : 0.5 * v * (1.0 + erf(v / sqrt(2.0)));
            /* SIMD: erfc within 4.2e-7 relative plus a few roundings, so 1e-6 relative.
             * z = x / sqrt(2) is rounded in f32 (2^-24 relative) and erfc's relative
             * sensitivity to z is 2 z^2 = x^2, which adds x^2 2^-24, doubled for margin.
             * Outputs below 1e-36 are flushed or subnormal in f32. */
            double tol = scalar ? s_gelu_ref_tol(v, expected)
                                : (1e-6 + v * v * 0x1p-23) * fabs(expected) + 1e-36;
            S_ASSERT_CLOSE("gelu_erf", t, n, i, out[i], expected, tol);
            S_ASSERT_CLOSE("gelu_erf vs scalar", t, n, i, out[i], ref[i],
                           tol + s_gelu_ref_tol(v, expected));
        }
        /* In place, as the forward pass may call it. */
        t->gelu_erf(x, x, n);
        for (int32_t i = 0; i < n; i++)
            S_CHECK(s_same_float(x[i], out[i]), "%s gelu_erf in place n=%d i=%d", t->isa,
                          n, i);
        free(x);
        free(out);
        free(ref);
    }
}
END_TEST

START_TEST(gelu_tanh_matches_double)
{
    const um_kernel_table_t *t = s_table(_i);
    if (!t)
        return;
    int scalar = t == um_kernels_scalar();
    const double k = sqrt(2.0 / M_PI);
    for (size_t c = 0; c < S_N_LENGTHS; c++) {
        int32_t n = s_lengths[c];
        float *x = s_gelu_inputs(n, 43 + c);
        float *out = malloc(n * sizeof *out), *ref = malloc(n * sizeof *ref);
        t->gelu_tanh(out, x, n);
        um_k_gelu_tanh_ref(ref, x, n);
        for (int32_t i = 0; i < n; i++) {
            double v = x[i];
            double u = k * (v + 0.044715 * v * v * v);
            /* 0.5 (1 + tanh u) = 1 / (1 + e^-2u), without cancellation for u < 0. */
            double expected = v / (1.0 + exp(-2.0 * u));
            /* SIMD: u is formed in f32 (a few roundings, 5e-7 relative), and the output's
             * relative sensitivity to u is at most 2|u|. The exp and division add 1e-6. */
            double tol = scalar ? s_gelu_ref_tol(v, expected)
                                : (1e-6 + 5e-7 * fabs(u)) * fabs(expected) + 1e-36;
            S_ASSERT_CLOSE("gelu_tanh", t, n, i, out[i], expected, tol);
            S_ASSERT_CLOSE("gelu_tanh vs scalar", t, n, i, out[i], ref[i],
                           tol + s_gelu_ref_tol(v, expected));
        }
        t->gelu_tanh(x, x, n);
        for (int32_t i = 0; i < n; i++)
            S_CHECK(s_same_float(x[i], out[i]), "%s gelu_tanh in place n=%d i=%d",
                          t->isa, n, i);
        free(x);
        free(out);
        free(ref);
    }
}
END_TEST

START_TEST(add_is_exact)
{
    const um_kernel_table_t *t = s_table(_i);
    if (!t)
        return;
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
            S_CHECK(out[i] == (float)((double)before[i] + (double)x[i]),
                          "%s add n=%d i=%d: got %.9g", t->isa, n, i, out[i]);
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
    if (!t)
        return;
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
            S_CHECK(isnan(out[i]), "%s bf16 0x%04zx: got %g, expected NaN", t->isa, i,
                          out[i]);
            continue;
        }
        S_CHECK((double)out[i] == expected && !signbit(out[i]) == !signbit(expected),
                      "%s bf16 0x%04zx: got %.9g, expected %.9g", t->isa, i, out[i], expected);
    }
    ck_assert_float_eq(out[0x3f80], 1.0f);
    ck_assert_float_eq(out[0xc000], -2.0f);

    /* Ragged lengths from an odd offset: the same bits as the whole-array conversion. */
    float *part = malloc(n * sizeof *part);
    for (size_t c = 0; c < S_N_LENGTHS && (size_t)s_lengths[c] < n; c++) {
        size_t len = (size_t)s_lengths[c];
        t->bf16_to_f32(part, in + 7, len);
        for (size_t i = 0; i < len; i++)
            S_CHECK(memcmp(&part[i], &out[i + 7], sizeof(float)) == 0,
                          "%s bf16 n=%zu i=%zu differs from the whole-array result", t->isa,
                          len, i);
    }
    free(part);
    free(in);
    free(out);
}
END_TEST

/*
 * bf16 rounding of f32 bits in double arithmetic: the nearer of the two bf16 values
 * around x, the even one on a tie. Above the largest finite bf16 the next value up is
 * 2^128, whose bf16 pattern is inf, so rounding there gives inf as IEEE 754 does.
 */
static uint16_t s_bf16_round_double(uint32_t bits)
{
    float f;
    memcpy(&f, &bits, sizeof f);
    if (isnan(f))
        return (uint16_t)((bits >> 16) | 0x40);
    if (isinf(f))
        return (uint16_t)(bits >> 16);
    uint16_t down = (uint16_t)(bits >> 16), up = (uint16_t)(down + 1);
    double mag = fabs((double)f);
    double mag_down = fabs(s_bf16_decode(down));
    double mag_up = (up & 0x7fff) == 0x7f80 ? ldexp(1.0, 128) : fabs(s_bf16_decode(up));
    double below = mag - mag_down, above = mag_up - mag;
    if (below < above || (below == above && (down & 1) == 0))
        return down;
    return up;
}

START_TEST(f32_to_bf16_rounds_to_nearest_even)
{
    const um_kernel_table_t *t = s_table(_i);
    if (!t)
        return;
    static const struct {
        uint32_t in;
        uint16_t out;
    } cases[] = {
        {0x3f800000u, 0x3f80}, /* 1.0, exact */
        {0x3f808000u, 0x3f80}, /* tie between 0x3f80 and 0x3f81: even is 0x3f80 */
        {0x3f818000u, 0x3f82}, /* tie between 0x3f81 and 0x3f82: even is 0x3f82 */
        {0x3f808001u, 0x3f81}, /* just above the tie */
        {0x3f807fffu, 0x3f80}, /* just below the tie */
        {0xbf818000u, 0xbf82}, /* negative tie to even */
        {0x7f7fffffu, 0x7f80}, /* FLT_MAX rounds up to inf */
        {0x7f7f7fffu, 0x7f7f}, /* below the midpoint stays finite */
        {0x7f800000u, 0x7f80}, /* inf */
        {0xff800000u, 0xff80}, /* -inf */
        {0x7fc00000u, 0x7fc0}, /* quiet NaN */
        {0x7f800001u, 0x7fc0}, /* signalling NaN with a low payload: still NaN, quiet */
        {0xff80ffffu, 0xffc0}, /* negative NaN whose rounding would carry into the sign */
        {0x7fffffffu, 0x7fff}, /* NaN with every payload bit */
        {0x00000000u, 0x0000}, /* +0 */
        {0x80000000u, 0x8000}, /* -0 */
        {0x00018000u, 0x0002}, /* subnormal tie to even */
        {0x00008000u, 0x0000}, /* smallest subnormal tie: to even 0 */
    };
    const size_t n_cases = sizeof cases / sizeof cases[0];
    float in[sizeof cases / sizeof cases[0]];
    uint16_t out[sizeof cases / sizeof cases[0]];
    for (size_t i = 0; i < n_cases; i++)
        memcpy(&in[i], &cases[i].in, sizeof in[i]);
    t->f32_to_bf16(out, in, n_cases);
    for (size_t i = 0; i < n_cases; i++) {
        S_CHECK(out[i] == cases[i].out, "%s f32_to_bf16(0x%08x) = 0x%04x, expected 0x%04x",
                      t->isa, cases[i].in, out[i], cases[i].out);
        ck_assert_uint_eq(s_bf16_round_double(cases[i].in), cases[i].out);
    }

    /* Random bit patterns (NaNs and infinities included), every ragged length, against
     * the double rounding and bit for bit against the reference. */
    const int32_t n = 126464;
    uint32_t *bits = malloc(n * sizeof *bits);
    float *values = malloc(n * sizeof *values);
    uint16_t *got = malloc(n * sizeof *got), *ref = malloc(n * sizeof *ref);
    uint64_t state = 91;
    for (int32_t i = 0; i < n; i++) {
        state = state * 6364136223846793005ull + 1442695040888963407ull;
        bits[i] = (uint32_t)(state >> 32);
        /* A quarter of the values sit exactly on a tie. */
        if (i % 4 == 0)
            bits[i] = (bits[i] & 0xffff0000u) | 0x8000u;
    }
    memcpy(values, bits, n * sizeof *values);
    for (size_t c = 0; c < S_N_LENGTHS; c++) {
        int32_t len = s_lengths[c];
        t->f32_to_bf16(got, values, (size_t)len);
        um_k_f32_to_bf16_ref(ref, values, (size_t)len);
        for (int32_t i = 0; i < len; i++) {
            S_CHECK(got[i] == s_bf16_round_double(bits[i]), "%s f32_to_bf16 n=%d "
                          "i=%d: 0x%08x gave 0x%04x, expected 0x%04x", t->isa, len, i, bits[i],
                          got[i], s_bf16_round_double(bits[i]));
            S_CHECK(got[i] == ref[i], "%s f32_to_bf16 n=%d i=%d: 0x%04x, scalar 0x%04x",
                          t->isa, len, i, got[i], ref[i]);
        }
    }
    free(bits);
    free(values);
    free(got);
    free(ref);
}
END_TEST

START_TEST(quantize_s8_matches_ref)
{
    const um_kernel_table_t *t = s_table(_i);
    if (!t)
        return;
    const int32_t n = 126464;
    float *x = malloc(n * sizeof *x);
    int8_t *got = malloc(n), *ref = malloc(n);
    s_fill(x, n, 77, -3.0f, 3.0f);
    /* A NaN, which the max skips; ties and zero rows are checked after the loop. */
    x[40] = NAN;
    static const int32_t levels[] = {127, 63};

    for (size_t l = 0; l < sizeof levels / sizeof levels[0]; l++) {
        for (size_t c = 0; c < S_N_LENGTHS; c++) {
            int32_t len = s_lengths[c];
            float s_got = t->quantize_s8(got, x, len, levels[l]);
            float s_ref = um_k_quantize_s8_ref(ref, x, len, levels[l]);
            S_CHECK(memcmp(&s_got, &s_ref, sizeof s_got) == 0, "%s quantize_s8 n=%d: scale "
                    "%.9g, scalar %.9g", t->isa, len, s_got, s_ref);
            for (int32_t i = 0; i < len; i++) {
                S_CHECK(got[i] == ref[i], "%s quantize_s8 n=%d levels %d i=%d (x %.9g): %d, "
                        "scalar %d", t->isa, len, levels[l], i, x[i], got[i], ref[i]);
                /* The reference itself: within half a step of x / scale, inside the range. */
                S_CHECK(abs(ref[i]) <= levels[l], "quantize_s8 n=%d i=%d: %d out of range",
                        len, i, ref[i]);
                if (!isnan(x[i]))
                    S_CHECK(fabs(x[i] / s_ref - ref[i]) <= 0.5 + 1e-6, "quantize_s8 n=%d "
                            "i=%d: x %.9g scale %.9g gave %d", len, i, x[i], s_ref, ref[i]);
            }
        }
    }
    /* x[40] is a NaN: it becomes -levels. */
    t->quantize_s8(got, x, 48, 127);
    ck_assert_int_eq(got[40], -127);

    /* All zeros: scale 0 and q 0, whatever q held before. */
    memset(x, 0, 100 * sizeof *x);
    memset(got, 5, 100);
    ck_assert_float_eq(t->quantize_s8(got, x, 100, 127), 0.0f);
    for (int32_t i = 0; i < 100; i++)
        ck_assert_int_eq(got[i], 0);

    /* Ties: scale 1 (max 127), so 2.5 -> 2, 3.5 -> 4, -2.5 -> -2. */
    float ties[40] = {127.0f, 2.5f, 3.5f, -2.5f, 0.5f, -0.5f, 1.5f};
    for (int32_t i = 7; i < 40; i++)
        ties[i] = 2.5f;
    t->quantize_s8(got, ties, 40, 127);
    const int8_t want[7] = {127, 2, 4, -2, 0, 0, 2};
    for (int32_t i = 0; i < 7; i++)
        ck_assert_int_eq(got[i], want[i]);
    for (int32_t i = 7; i < 40; i++)
        ck_assert_int_eq(got[i], 2);
    free(x);
    free(got);
    free(ref);
}
END_TEST

/* ------------------------------------------------------------------------- */
/* Vocabulary reductions                                                      */

/* Index of the first maximum in double, skipping NaNs after index 0 like the contract. */
static int32_t s_argmax_double(const float *x, int32_t n)
{
    int32_t best = 0;
    for (int32_t i = 1; i < n; i++)
        if ((double)x[i] > (double)x[best])
            best = i;
    return best;
}

START_TEST(argmax_lowest_index_on_ties)
{
    const um_kernel_table_t *t = s_table(_i);
    if (!t)
        return;
    for (size_t c = 0; c < S_N_LENGTHS; c++) {
        int32_t n = s_lengths[c];
        float *x = malloc(n * sizeof *x);
        s_fill(x, n, 53 + c, -1.0f, 1.0f);
        ck_assert_int_eq(t->argmax(x, n), s_argmax_double(x, n));
        ck_assert_int_eq(t->argmax(x, n), um_k_argmax_ref(x, n));

        /* The maximum at the last position alone, then also at the first. */
        x[n - 1] = 5.0f;
        ck_assert_int_eq(t->argmax(x, n), n - 1);
        x[0] = 5.0f;
        ck_assert_int_eq(t->argmax(x, n), 0);
        /* Ties in the middle and at the end: the lower one wins. */
        if (n >= 3) {
            x[0] = 0.0f;
            x[n / 2] = 5.0f;
            ck_assert_int_eq(t->argmax(x, n), n / 2);
        }
        /* -inf mixed in and a NaN after index 0 never win. */
        for (int32_t i = 1; i < n; i += 3)
            x[i] = -INFINITY;
        if (n >= 3)
            x[n - 2] = NAN;
        ck_assert_int_eq(t->argmax(x, n), s_argmax_double(x, n));
        ck_assert_int_eq(t->argmax(x, n), um_k_argmax_ref(x, n));
        /* A NaN at index 0: nothing compares greater, so the reference returns 0. */
        x[0] = NAN;
        ck_assert_int_eq(t->argmax(x, n), 0);
        /* A row of only -inf gives 0. */
        for (int32_t i = 0; i < n; i++)
            x[i] = -INFINITY;
        ck_assert_int_eq(t->argmax(x, n), 0);
        free(x);
    }

    const float all_equal[] = {2.0f, 2.0f, 2.0f, 2.0f};
    ck_assert_int_eq(t->argmax(all_equal, 4), 0);
    const float with_inf[] = {-INFINITY, 1.0f, INFINITY, INFINITY};
    ck_assert_int_eq(t->argmax(with_inf, 4), 2);
}
END_TEST

/* log(sum(exp(x))) in long double with the max shift, for any range of values. */
static double s_logsumexp_long_double(const float *x, int32_t n)
{
    long double max = -INFINITY, sum = 0.0L;
    for (int32_t i = 0; i < n; i++)
        if (x[i] > max)
            max = x[i];
    if (isinf(max))
        return (double)max;
    for (int32_t i = 0; i < n; i++)
        sum += expl((long double)x[i] - max);
    return (double)(max + logl(sum));
}

START_TEST(logsumexp_matches_long_double)
{
    const um_kernel_table_t *t = s_table(_i);
    if (!t)
        return;
    for (size_t c = 0; c < S_N_LENGTHS; c++) {
        int32_t n = s_lengths[c];
        float *x = malloc(n * sizeof *x);
        for (int variant = 0; variant < 3; variant++) {
            /* Plain logits, then -inf mixed in, then huge logits, where e^x overflows
             * without the max shift. */
            s_fill(x, n, 61 + c + 100 * variant, -30.0f, 30.0f);
            if (variant == 1)
                for (int32_t i = 2; i < n; i += 5)
                    x[i] = -INFINITY;
            if (variant == 2)
                for (int32_t i = 0; i < n; i++)
                    x[i] = 1e4f + x[i];
            double expected = s_logsumexp_long_double(x, n);
            double got = t->logsumexp(x, n), ref = um_k_logsumexp_ref(x, n);
            /* Accumulated in double with an exp within 1.4e-16 relative: n terms give a
             * relative error near n * 1.1e-16 at worst, so 1e-12 covers n = 126464. */
            double tol = 1e-12 * fabs(expected) + 1e-12;
            S_CHECK(fabs(got - expected) <= tol, "%s logsumexp n=%d variant %d: got "
                          "%.17g, expected %.17g", t->isa, n, variant, got, expected);
            S_CHECK(fabs(got - ref) <= 2 * tol, "%s logsumexp n=%d variant %d: got "
                          "%.17g, scalar %.17g", t->isa, n, variant, got, ref);
        }

        /* One finite entry among -inf gives that entry, and tiny values give log(n). */
        for (int32_t i = 0; i < n; i++)
            x[i] = -INFINITY;
        x[n - 1] = -7.25f;
        ck_assert_double_eq(t->logsumexp(x, n), -7.25);
        for (int32_t i = 0; i < n; i++)
            x[i] = 1e-30f;
        ck_assert_double_eq_tol(t->logsumexp(x, n), log((double)n) + 1e-30, 1e-12);
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

/*
 * um_vocab_stats_t in double from the f32 products scale * x, which the contract fixes as
 * the distribution's logits: top two and argmax by the same comparisons, the sums in long
 * double.
 */
static void s_vocab_stats_double(const float *x, int32_t n, float scale, um_vocab_stats_t *out)
{
    double max = -INFINITY, second = -INFINITY;
    int32_t arg = 0;
    for (int32_t i = 0; i < n; i++) {
        double v = (float)(scale * x[i]);
        if (v > max) {
            second = max;
            max = v;
            arg = i;
        } else if (v > second) {
            second = v;
        }
    }
    out->max = (float)max;
    out->argmax = arg;
    out->second = (float)second;
    if (max == -INFINITY) {
        out->lse = -INFINITY;
        out->p_max = out->margin = out->entropy = 0.0;
        return;
    }
    long double s = 0.0L, entropy = 0.0L;
    for (int32_t i = 0; i < n; i++)
        s += expl((long double)(float)(scale * x[i]) - max);
    for (int32_t i = 0; i < n; i++) {
        long double logp = (long double)(float)(scale * x[i]) - max - logl(s);
        if (isfinite(logp))
            entropy -= expl(logp) * logp;
    }
    out->lse = (double)(max + logl(s));
    out->p_max = (double)(1.0L / s);
    out->margin = (double)((1.0L - expl((long double)second - max)) / s);
    out->entropy = (double)entropy;
}

/* Compare one vocab_stats result with the double computation and with the reference. */
static void s_check_vocab_stats(const um_kernel_table_t *t, const char *what, const float *x,
                                int32_t n, float scale)
{
    um_vocab_stats_t got, ref, expected;
    t->vocab_stats(x, n, scale, &got);
    um_k_vocab_stats_ref(x, n, scale, &ref);
    s_vocab_stats_double(x, n, scale, &expected);

    /* The top two and the argmax come from the same f32 products and comparisons. */
    S_CHECK(got.argmax == expected.argmax && got.argmax == ref.argmax,
                  "%s vocab_stats %s n=%d: argmax %d, expected %d, scalar %d", t->isa, what, n,
                  got.argmax, expected.argmax, ref.argmax);
    S_CHECK(s_same_float(got.max, expected.max) && s_same_float(got.max, ref.max),
                  "%s vocab_stats %s n=%d: max %.9g, expected %.9g", t->isa, what, n, got.max,
                  expected.max);
    S_CHECK(s_same_float(got.second, expected.second) && s_same_float(got.second, ref.second),
                  "%s vocab_stats %s n=%d: second %.9g, expected %.9g", t->isa, what, n,
                  got.second, expected.second);

    if (expected.max == -INFINITY) {
        ck_assert(isinf(got.lse) && got.lse < 0);
        ck_assert(got.p_max == 0.0 && got.margin == 0.0 && got.entropy == 0.0);
        return;
    }
    /*
     * SIMD kernels sum e^(v - max) with an f32 exp (8e-8 relative), an f32 v - max, and f32
     * partial sums of at most 16 vectors before they go to f64 (16 roundings at most). So
     * the sum s is within 2e-6 relative, which is 2e-6 absolute in lse and relative in
     * p_max and margin. The entropy's t / s term is a weighted mean of v - max with terms
     * off by the same relative amounts, so entropy is off by 2e-6 times (1 + entropy). The
     * reference, in double, is far inside these.
     */
    const double rel = 2e-6;
    double p_second = expected.p_max - expected.margin;
    S_CHECK(fabs(got.lse - expected.lse) <= rel + 1e-15 * fabs(expected.lse),
                  "%s vocab_stats %s n=%d: lse %.12g, expected %.12g", t->isa, what, n, got.lse,
                  expected.lse);
    S_CHECK(fabs(got.p_max - expected.p_max) <= rel * expected.p_max,
                  "%s vocab_stats %s n=%d: p_max %.12g, expected %.12g", t->isa, what, n,
                  got.p_max, expected.p_max);
    S_CHECK(fabs(got.margin - expected.margin) <= rel * (expected.p_max + p_second) + 1e-300,
                  "%s vocab_stats %s n=%d: margin %.12g, expected %.12g", t->isa, what, n,
                  got.margin, expected.margin);
    S_CHECK(fabs(got.entropy - expected.entropy) <= rel * (1.0 + expected.entropy),
                  "%s vocab_stats %s n=%d: entropy %.12g, expected %.12g", t->isa, what, n,
                  got.entropy, expected.entropy);
    S_CHECK(fabs(got.lse - ref.lse) <= 2 * rel + 1e-15 * fabs(ref.lse),
                  "%s vocab_stats %s n=%d: lse %.12g, scalar %.12g", t->isa, what, n, got.lse,
                  ref.lse);
    S_CHECK(fabs(got.entropy - ref.entropy) <= 2 * rel * (1.0 + expected.entropy),
                  "%s vocab_stats %s n=%d: entropy %.12g, scalar %.12g", t->isa, what, n,
                  got.entropy, ref.entropy);
}

START_TEST(vocab_stats_matches_double)
{
    const um_kernel_table_t *t = s_table(_i);
    if (!t)
        return;
    const float scales[] = {1.0f, 0.7f, 2.0f};
    for (size_t c = 0; c < S_N_LENGTHS; c++) {
        int32_t n = s_lengths[c];
        float *x = malloc(n * sizeof *x);
        for (size_t k = 0; k < 3; k++) {
            s_fill(x, n, 71 + c + 10 * k, -20.0f, 20.0f);
            s_check_vocab_stats(t, "random", x, n, scales[k]);
        }

        /* Banned tokens (-inf) mixed in. */
        s_fill(x, n, 81 + c, -20.0f, 20.0f);
        for (int32_t i = 0; i < n; i += 3)
            x[i] = -INFINITY;
        s_check_vocab_stats(t, "-inf mixed", x, n, 1.0f);

        /* NaNs never enter the top two or the argmax, as in the reference, and they make
         * the sums NaN (unless no value is finite, where the reference returns early). */
        s_fill(x, n, 82 + c, -20.0f, 20.0f);
        for (int32_t i = n / 2; i < n; i += 4)
            x[i] = NAN;
        um_vocab_stats_t with_nan, ref_nan;
        t->vocab_stats(x, n, 1.0f, &with_nan);
        um_k_vocab_stats_ref(x, n, 1.0f, &ref_nan);
        ck_assert_int_eq(with_nan.argmax, ref_nan.argmax);
        ck_assert_msg(with_nan.max == ref_nan.max && with_nan.second == ref_nan.second,
                      "%s vocab_stats with NaNs n=%d: top two %.9g %.9g, scalar %.9g %.9g",
                      t->isa, n, with_nan.max, with_nan.second, ref_nan.max, ref_nan.second);
        ck_assert_msg(!isnan(with_nan.lse) == !isnan(ref_nan.lse) &&
                          !isnan(with_nan.entropy) == !isnan(ref_nan.entropy),
                      "%s vocab_stats with NaNs n=%d: lse %g entropy %g, scalar %g %g", t->isa,
                      n, with_nan.lse, with_nan.entropy, ref_nan.lse, ref_nan.entropy);

        /* A peaked row: one logit far above the rest, as a confident model gives. */
        s_fill(x, n, 83 + c, -5.0f, 5.0f);
        x[n / 3] = 40.0f;
        s_check_vocab_stats(t, "peaked", x, n, 1.0f);

        /* The maximum at the first and the last position (a tie), then at the last only. */
        s_fill(x, n, 85 + c, -5.0f, 5.0f);
        x[0] = x[n - 1] = 9.0f;
        s_check_vocab_stats(t, "tie first and last", x, n, 1.0f);
        x[0] = 0.0f;
        s_check_vocab_stats(t, "max last", x, n, 1.0f);

        /* Huge and tiny logits. */
        s_fill(x, n, 87 + c, -1.0f, 1.0f);
        for (int32_t i = 0; i < n; i++)
            x[i] *= 1e4f;
        s_check_vocab_stats(t, "huge", x, n, 1.0f);
        for (int32_t i = 0; i < n; i++)
            x[i] *= 1e-34f;
        s_check_vocab_stats(t, "tiny", x, n, 1.0f);

        /* All -inf except one entry, at the start, the middle and the end, then all -inf. */
        const int32_t at[] = {0, n / 2, n - 1};
        for (int a = 0; a < 3; a++) {
            for (int32_t i = 0; i < n; i++)
                x[i] = -INFINITY;
            x[at[a]] = 3.0f;
            s_check_vocab_stats(t, "one finite", x, n, 1.0f);
            um_vocab_stats_t got;
            t->vocab_stats(x, n, 1.0f, &got);
            ck_assert_int_eq(got.argmax, at[a]);
            ck_assert_double_eq_tol(got.p_max, 1.0, 1e-12);
            ck_assert_double_eq_tol(got.entropy, 0.0, 1e-12);
        }
        for (int32_t i = 0; i < n; i++)
            x[i] = -INFINITY;
        s_check_vocab_stats(t, "all -inf", x, n, 1.0f);
        free(x);
    }
}
END_TEST

/* The reference formula for one token's Gumbel score, in double with libm. */
static double s_gumbel_score(const float *x, int32_t i, double temperature, uint64_t key,
                             uint64_t base)
{
    double u = um_rng_uniform_key(key, base + (uint64_t)i);
    return (double)x[i] / temperature - log(-log(u));
}

/* Fails unless got picks the same token as expected, or one whose score is within
 * 1e-12 relative, because vector logs may differ from libm's in the last bits. */
static void s_check_gumbel_pick(const um_kernel_table_t *t, const char *what, const float *x,
                                int32_t n, double temperature, uint64_t key, uint64_t base,
                                int32_t got, int32_t expected)
{
    S_CHECK(got >= 0 && got < n, "%s gumbel %s n=%d: index %d out of range", t->isa,
                  what, n, got);
    if (got == expected)
        return;
    double a = s_gumbel_score(x, got, temperature, key, base);
    double b = s_gumbel_score(x, expected, temperature, key, base);
    S_CHECK(fabs(a - b) <= 1e-12 * fabs(b), "%s gumbel %s n=%d: picked %d (score "
                  "%.17g), expected %d (score %.17g)", t->isa, what, n, got, a, expected, b);
}

START_TEST(gumbel_argmax_matches_double)
{
    const um_kernel_table_t *t = s_table(_i);
    if (!t)
        return;
    const double temperatures[] = {1.0, 0.3, 7.5};
    for (size_t c = 0; c < S_N_LENGTHS; c++) {
        int32_t n = s_lengths[c];
        float *x = malloc(n * sizeof *x);
        for (size_t k = 0; k < 3; k++) {
            uint64_t key = um_rng_key(1234 + c, UM_RNG_STREAM_GUMBEL(k));
            uint64_t base = (uint64_t)k * 126464u;
            s_fill(x, n, 101 + c + 7 * k, -10.0f, 10.0f);
            /* Banned tokens in one of the three rounds. */
            if (k == 1)
                for (int32_t i = 0; i < n; i += 2)
                    x[i] = -INFINITY;

            /* The double loop, written out: first index of the largest score. */
            int32_t expected = 0;
            double best = -INFINITY;
            for (int32_t i = 0; i < n; i++) {
                if (x[i] == -INFINITY)
                    continue;
                double score = s_gumbel_score(x, i, temperatures[k], key, base);
                if (score > best) {
                    best = score;
                    expected = i;
                }
            }
            int32_t got = t->gumbel_argmax(x, n, temperatures[k], key, base);
            s_check_gumbel_pick(t, "random", x, n, temperatures[k], key, base, got, expected);
            s_check_gumbel_pick(t, "vs scalar", x, n, temperatures[k], key, base, got,
                                um_k_gumbel_argmax_ref(x, n, temperatures[k], key, base));
            if (best > -INFINITY)
                S_CHECK(x[got] != -INFINITY, "%s gumbel n=%d picked a banned token %d",
                              t->isa, n, got);
        }

        /* Only one token allowed, at the start, the middle and the end, then none (0). */
        const int32_t at[] = {0, n / 2, n - 1};
        for (int a = 0; a < 3; a++) {
            for (int32_t i = 0; i < n; i++)
                x[i] = -INFINITY;
            x[at[a]] = -50.0f;
            ck_assert_int_eq(t->gumbel_argmax(x, n, 1.0, 99, 0), at[a]);
        }
        for (int32_t i = 0; i < n; i++)
            x[i] = -INFINITY;
        ck_assert_int_eq(t->gumbel_argmax(x, n, 1.0, 99, 0), 0);

        /* A logit 1e4 above the rest wins against any noise the generator can draw. */
        s_fill(x, n, 107 + c, -1.0f, 1.0f);
        x[n - 1] = 1e4f;
        ck_assert_int_eq(t->gumbel_argmax(x, n, 1.0, 5, 77), n - 1);
        free(x);
    }
}
END_TEST

/*
 * Two allowed tokens i and j whose scores differ by only delta: x[i] = 1, x[j] = 0 and a
 * temperature chosen so that 1 / T + g_i - g_j = delta, g the Gumbel noise of each token.
 * The kernel must pick i for delta > 0 and j for delta < 0. With delta = 1e-10 this
 * catches noise off by more than about 1e-11, far below what random rows can show.
 */
START_TEST(gumbel_argmax_resolves_near_ties)
{
    const um_kernel_table_t *t = s_table(_i);
    if (!t)
        return;
    const int32_t n = 67;
    float x[67];
    uint64_t state = 5;
    for (int trial = 0; trial < 400; trial++) {
        state = state * 6364136223846793005ull + 1442695040888963407ull;
        uint64_t key = um_rng_key(state, UM_RNG_STREAM_GUMBEL(trial)), base = state >> 40;
        int32_t i = (int32_t)((state >> 8) % n), j = (int32_t)((state >> 20) % n);
        if (i == j)
            continue;
        double g_i = -log(-log(um_rng_uniform_key(key, base + (uint64_t)i)));
        double g_j = -log(-log(um_rng_uniform_key(key, base + (uint64_t)j)));
        double delta = trial % 2 ? 1e-10 : -1e-10;
        /* 1 / T must be positive: give the 1 to whichever token has the smaller noise. */
        if (g_j - g_i + delta <= 0) {
            int32_t swap = i;
            i = j;
            j = swap;
            double g = g_i;
            g_i = g_j;
            g_j = g;
        }
        double temperature = 1.0 / (g_j - g_i + delta);
        for (int32_t k = 0; k < n; k++)
            x[k] = -INFINITY;
        x[i] = 1.0f;
        x[j] = 0.0f;
        int32_t expected = delta > 0 ? i : j;
        int32_t got = t->gumbel_argmax(x, n, temperature, key, base);
        S_CHECK(got == expected, "%s gumbel near tie %d: picked %d, expected %d (tokens %d and "
                "%d, delta %g)", t->isa, trial, got, expected, i, j, delta);
    }
}
END_TEST

/* ------------------------------------------------------------------------- */
/* Ragged tails stay inside the row                                           */

/* Every op on rows that end at an inaccessible page, for every length up to two AVX-512
 * vectors plus one: a kernel that touches memory past the end faults here. */
START_TEST(tails_stay_inside_row)
{
    const um_kernel_table_t *t = s_table(_i);
    if (!t)
        return;
    for (int32_t n = 1; n <= 33; n++) {
        size_t bytes = (size_t)n * sizeof(float);
        s_guarded_t gx = s_guarded_new(bytes), gy = s_guarded_new(bytes);
        s_guarded_t gw = s_guarded_new(bytes), gout = s_guarded_new(bytes);
        s_guarded_t gh = s_guarded_new((size_t)n * sizeof(uint16_t));
        float *x = gx.row, *y = gy.row, *w = gw.row, *out = gout.row;
        uint16_t *h = gh.row;
        s_fill(x, n, 200 + n, -2.0f, 2.0f);
        s_fill(y, n, 300 + n, -2.0f, 2.0f);
        s_fill(w, n, 400 + n, 0.5f, 1.5f);

        t->rmsnorm(out, x, w, n, 1e-5f);
        t->layernorm(out, x, w, y, n, 1e-5f);
        t->silu_mul(out, x, y, n);
        t->gelu_erf(out, x, n);
        t->gelu_tanh(out, x, n);
        t->add(out, x, n);
        t->f32_to_bf16(h, x, (size_t)n);
        t->bf16_to_f32(out, h, (size_t)n);
        memcpy(out, x, bytes);
        t->softmax(out, n);
        ck_assert_int_eq(t->argmax(x, n), um_k_argmax_ref(x, n));
        ck_assert(isfinite(t->logsumexp(x, n)));
        um_vocab_stats_t st;
        t->vocab_stats(x, n, 1.0f, &st);
        ck_assert_int_eq(st.argmax, um_k_argmax_ref(x, n));
        int32_t g = t->gumbel_argmax(x, n, 1.0, 3, 0);
        ck_assert(g >= 0 && g < n);
        /* rope reads n cos/sin pairs for a head of 2 * (n / 2) values. */
        int32_t hd = n & ~1;
        if (hd > 0)
            t->rope((float *)gout.row + (n - hd), (const float *)gy.row + (n - hd), hd);

        s_guarded_free(&gx);
        s_guarded_free(&gy);
        s_guarded_free(&gw);
        s_guarded_free(&gout);
        s_guarded_free(&gh);
    }
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

/* Run the product of shape i of gemm_cache_evicts_old_shapes: M from 1 to 64 and the
   stride of C from N upward give the distinct shapes. */
static void s_cache_shape(int32_t i, const float *A, const float *B, float *C)
{
    ck_assert_int_eq(um_gemm_f32_nt(1 + i % 64, 3, 5, A, 5, B, 5, C, 3 + i / 64, 0), 0);
}

/*
 * More distinct shapes than the primitive cache keeps: the cache stays at its bound and
 * the least recently used entry gives way. Shape 0 is used again just before the cache
 * overflows, so the first new shape must evict shape 1 and keep shape 0: running shape 0
 * then creates nothing, and running shape 1 creates it again, with the right result.
 * Batched passes meet a new M for every mix of requests, so without the bound a
 * daemon's memory would grow with every new mix.
 */
START_TEST(gemm_cache_evicts_old_shapes)
{
    um_gemm_shutdown();
    const int32_t N = 3, K = 5;
    /* C has room for the widest stride used, N + 8. */
    float A[64 * 5], B[3 * 5], C[64 * (3 + 9)];
    s_fill(A, sizeof A / sizeof A[0], 7, -1.0f, 1.0f);
    s_fill(B, sizeof B / sizeof B[0], 8, -1.0f, 1.0f);
    for (int32_t i = 0; i < UM_GEMM_MAX_CACHED; i++)
        s_cache_shape(i, A, B, C);
    ck_assert_uint_eq(um_gemm_cached_primitives(), UM_GEMM_MAX_CACHED);
    s_cache_shape(0, A, B, C);
    for (int32_t i = UM_GEMM_MAX_CACHED; i < UM_GEMM_MAX_CACHED + 40; i++) {
        s_cache_shape(i, A, B, C);
        ck_assert_uint_eq(um_gemm_cached_primitives(), UM_GEMM_MAX_CACHED);
    }
    size_t created = um_gemm_created_primitives();
    s_cache_shape(0, A, B, C);
    ck_assert_uint_eq(um_gemm_created_primitives(), created);
    /* Shape 1 is M = 2 with stride N. */
    s_cache_shape(1, A, B, C);
    ck_assert_uint_eq(um_gemm_created_primitives(), created + 1);
    for (int32_t m = 0; m < 2; m++) {
        for (int32_t j = 0; j < N; j++) {
            double expected = 0;
            for (int32_t k = 0; k < K; k++)
                expected += (double)A[(size_t)m * K + k] * B[(size_t)j * K + k];
            ck_assert_msg(fabs(C[(size_t)m * N + j] - expected) <= 1e-5,
                          "C[%d][%d]: got %.9g, expected %.9g", m, j, C[(size_t)m * N + j],
                          expected);
        }
    }
    ck_assert_uint_eq(um_gemm_cached_primitives(), UM_GEMM_MAX_CACHED);
    um_gemm_shutdown();
    ck_assert_uint_eq(um_gemm_cached_primitives(), 0);
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

    TCase *tc = tcase_create("select");
    tcase_set_timeout(tc, 10);
    tcase_add_test(tc, kernel_table_selected);
    tcase_add_test(tc, kernels_select_validates_cap);
    suite_add_tcase(s, tc);

    /* Loop index: the um_isa_t value; ISAs this host cannot run return early. */
    tc = tcase_create("elementwise");
    tcase_set_timeout(tc, 60);
    tcase_add_loop_test(tc, rmsnorm_matches_double, 0, UM_ISA_COUNT);
    tcase_add_loop_test(tc, layernorm_matches_double, 0, UM_ISA_COUNT);
    tcase_add_loop_test(tc, rope_matches_double, 0, UM_ISA_COUNT);
    tcase_add_loop_test(tc, softmax_matches_double, 0, UM_ISA_COUNT);
    tcase_add_loop_test(tc, silu_mul_matches_double, 0, UM_ISA_COUNT);
    tcase_add_loop_test(tc, gelu_erf_matches_double, 0, UM_ISA_COUNT);
    tcase_add_loop_test(tc, gelu_tanh_matches_double, 0, UM_ISA_COUNT);
    tcase_add_loop_test(tc, add_is_exact, 0, UM_ISA_COUNT);
    tcase_add_loop_test(tc, bf16_to_f32_exact, 0, UM_ISA_COUNT);
    tcase_add_loop_test(tc, f32_to_bf16_rounds_to_nearest_even, 0, UM_ISA_COUNT);
    tcase_add_loop_test(tc, quantize_s8_matches_ref, 0, UM_ISA_COUNT);
    tcase_add_loop_test(tc, tails_stay_inside_row, 0, UM_ISA_COUNT);
    suite_add_tcase(s, tc);

    tc = tcase_create("reductions");
    tcase_set_timeout(tc, 60);
    tcase_add_loop_test(tc, argmax_lowest_index_on_ties, 0, UM_ISA_COUNT);
    tcase_add_loop_test(tc, logsumexp_matches_long_double, 0, UM_ISA_COUNT);
    tcase_add_loop_test(tc, vocab_stats_matches_double, 0, UM_ISA_COUNT);
    tcase_add_loop_test(tc, gumbel_argmax_matches_double, 0, UM_ISA_COUNT);
    tcase_add_loop_test(tc, gumbel_argmax_resolves_near_ties, 0, UM_ISA_COUNT);
    suite_add_tcase(s, tc);

    tc = tcase_create("gemm");
    tcase_set_timeout(tc, 60);
    tcase_add_loop_test(tc, gemm_nt_matches_naive, 0, S_N_GEMM_CASES);
    tcase_add_loop_test(tc, gemm_nn_matches_naive, 0, S_N_GEMM_CASES);
    tcase_add_test(tc, gemm_rejects_bad_strides);
    tcase_add_test(tc, gemm_empty_k_zeroes_c);
    tcase_add_test(tc, gemm_concurrent_threads);
    tcase_add_test(tc, gemm_cache_evicts_old_shapes);
    tcase_add_test(tc, gemm_backend_and_shutdown);
    suite_add_tcase(s, tc);
    return s;
}
