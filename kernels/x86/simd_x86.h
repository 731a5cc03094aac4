/*
 * The x86 SIMD kernels, written once for every vector width. avx2.c and avx512.c each
 * define a vector layer and then include this file, so both builds run the same kernel
 * logic and the AVX2 tests exercise what the AVX-512 build does. The layer provides:
 *   UM_X86_W, UM_X86_WD     f32 and f64 lanes per vector (UM_X86_WD = UM_X86_W / 2)
 *   UM_X86_FN(op)           the kernel's name, um_k_<op>_<isa>
 *   vf_t, vd_t, vi_t        f32, f64 and integer vectors of one register
 *   mf_t, md_t              per-lane masks from f32 and f64 compares
 *   s_vf_*, s_vd_*, s_vi_*  one-instruction wrappers (loads, arithmetic, compares, selects,
 *                           partial loads and stores for ragged tails, widening)
 * The file has no include guard on purpose: each ISA's translation unit includes it once.
 *
 * Every op follows the contract and the numerics of its scalar reference in ref.c, and
 * the comments below state where a kernel rounds differently and by how much. Loops keep
 * one index for the vector body and the tail. Tails use partial loads and stores that
 * touch nothing past the row, or call the reference for the bit-exact conversions.
 *
 * Threading: pure functions of their arguments; any number of threads may call them.
 */
#include <math.h>
#include <stdint.h>

#include "kernels.h"
#include "rng.h"

#if UM_X86_WD * 2 != UM_X86_W
#error "simd_x86.h expects twice as many f32 lanes as f64 lanes"
#endif

/* Lane numbers, for index vectors. */
static const int32_t s_iota32[16] = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
static const double s_iota64[8] = {0, 1, 2, 3, 4, 5, 6, 7};

/* ------------------------------------------------------------------------- */
/* Vector math: exp, log, erfc                                                */

/*
 * e^x in f32 lanes. x = n ln2 + r with n = round(x log2(e)) and |r| <= ln2 / 2. ln2 is
 * split into its f32 value and the remainder, and the FMA makes x - n * ln2_hi exact.
 * e^r is its Taylor polynomial of degree 7 (truncation below 7.5e-9 relative), and n is
 * added to the exponent field. The relative error is below 8e-8, measured against the
 * f64 exp at every float of [-87.3, 88.72] with |x| >= 1e-6. x below ln(FLT_MIN) gives +0
 * (ln(FLT_MIN) = -87.3365, and results that would be subnormal are flushed), x above
 * 88.72283 gives +inf, and a NaN stays NaN.
 */
static inline vf_t s_exp_ps(vf_t x)
{
    const vf_t lo = s_vf_set1(-87.33654475f), hi = s_vf_set1(88.72283172607422f);
    /* The operand order keeps a NaN x: min and max return their second operand then. */
    vf_t xc = s_vf_min(hi, s_vf_max(lo, x));

    /* Adding 1.5 * 2^23 rounds x log2(e) to an integer n held in the low mantissa bits. */
    const vf_t shifter = s_vf_set1(12582912.0f);
    vf_t t = s_vf_fmadd(xc, s_vf_set1(1.44269504088896341f), shifter);
    vf_t n = s_vf_sub(t, shifter);
    vf_t r = s_vf_fnmadd(n, s_vf_set1(0.693147182464599609f), xc);
    r = s_vf_fnmadd(n, s_vf_set1(-1.90465429995776805e-9f), r);

    vf_t p = s_vf_set1(1.0f / 5040.0f);
    p = s_vf_fmadd(p, r, s_vf_set1(1.0f / 720.0f));
    p = s_vf_fmadd(p, r, s_vf_set1(1.0f / 120.0f));
    p = s_vf_fmadd(p, r, s_vf_set1(1.0f / 24.0f));
    p = s_vf_fmadd(p, r, s_vf_set1(1.0f / 6.0f));
    p = s_vf_fmadd(p, r, s_vf_set1(0.5f));
    p = s_vf_fmadd(p, r, s_vf_set1(1.0f));
    p = s_vf_fmadd(p, r, s_vf_set1(1.0f));

    /* p is in [0.7, 1.42], so adding n to its exponent stays a normal number for every
     * n the clamp allows (n = 128 only comes with p < 1). (bits(t) << 23) is n << 23
     * because the shifter's own low 9 bits are zero. */
    vf_t y = s_vf_from_bits(s_vi_add32(s_vf_bits(p), s_vi_slli32(s_vf_bits(t), 23)));
    y = s_vf_select(s_vf_lt(x, lo), s_vf_set1(0.0f), y);
    y = s_vf_select(s_vf_gt(x, hi), s_vf_set1(INFINITY), y);
    return s_vf_select(s_vf_isnan(x), x, y);
}

/*
 * e^x in f64 lanes, as s_exp_ps with the Taylor polynomial of degree 13 (truncation below
 * 6e-18 relative). The relative error is below 1.4e-16, measured against the long double
 * expl at 2e7 random points of [-708, 709]. x below ln(DBL_MIN) = -708.396 gives +0,
 * x above 709.78 (where e^x > 1.6e308) gives +inf, and a NaN stays NaN.
 */
static inline vd_t s_exp_pd(vd_t x)
{
    const vd_t lo = s_vd_set1(-708.3964185322641), hi = s_vd_set1(709.78);
    vd_t xc = s_vd_min(hi, s_vd_max(lo, x));

    /* 1.5 * 2^52 rounds to an integer the same way as the f32 shifter above. */
    const vd_t shifter = s_vd_set1(6755399441055744.0);
    vd_t t = s_vd_fmadd(xc, s_vd_set1(1.4426950408889634074), shifter);
    vd_t n = s_vd_sub(t, shifter);
    vd_t r = s_vd_fnmadd(n, s_vd_set1(0.6931471805599453), xc);
    r = s_vd_fnmadd(n, s_vd_set1(2.3190468138462996e-17), r);

    vd_t p = s_vd_set1(1.0 / 6227020800.0);
    p = s_vd_fmadd(p, r, s_vd_set1(1.0 / 479001600.0));
    p = s_vd_fmadd(p, r, s_vd_set1(1.0 / 39916800.0));
    p = s_vd_fmadd(p, r, s_vd_set1(1.0 / 3628800.0));
    p = s_vd_fmadd(p, r, s_vd_set1(1.0 / 362880.0));
    p = s_vd_fmadd(p, r, s_vd_set1(1.0 / 40320.0));
    p = s_vd_fmadd(p, r, s_vd_set1(1.0 / 5040.0));
    p = s_vd_fmadd(p, r, s_vd_set1(1.0 / 720.0));
    p = s_vd_fmadd(p, r, s_vd_set1(1.0 / 120.0));
    p = s_vd_fmadd(p, r, s_vd_set1(1.0 / 24.0));
    p = s_vd_fmadd(p, r, s_vd_set1(1.0 / 6.0));
    p = s_vd_fmadd(p, r, s_vd_set1(0.5));
    p = s_vd_fmadd(p, r, s_vd_set1(1.0));
    p = s_vd_fmadd(p, r, s_vd_set1(1.0));

    /* The shifter's low 12 bits are zero, so (bits(t) << 52) is n << 52. */
    vd_t y = s_vd_from_bits(s_vi_add64(s_vd_bits(p), s_vi_slli64(s_vd_bits(t), 52)));
    y = s_vd_select(s_vd_lt(x, lo), s_vd_set1(0.0), y);
    y = s_vd_select(s_vd_gt(x, hi), s_vd_set1(INFINITY), y);
    return s_vd_select(s_vd_isnan(x), x, y);
}

/*
 * Natural log in f64 lanes for positive normal x, and -inf for x = +-0. Other input
 * (negative, subnormal, inf, NaN) gives an unspecified value. x = 2^k m with m in
 * [sqrt(1/2), sqrt(2)) and f = m - 1 (exact). log(1 + f) = 2 atanh(s) with
 * s = f / (2 + f), |s| <= 0.1716, is summed as 2s (1 + s^2/3 + ... + s^20/21), which
 * truncates below 1e-18 relative. Because f is exact, the result keeps its relative
 * accuracy near x = 1. The relative error is below 3.1e-16, measured against the long
 * double logl at 2e7 points in (0, 1), just below 1 and over 2^-100 .. 2^100.
 */
static inline vd_t s_log_pd(vd_t x)
{
    vi_t bits = s_vd_bits(x);
    vi_t biased = s_vi_srli64(bits, 52);
    vd_t m = s_vd_from_bits(s_vi_or(s_vi_and(bits, s_vi_set1_64(0x000fffffffffffffULL)),
                                    s_vi_set1_64(0x3ff0000000000000ULL)));
    /* The biased exponent as a double: OR it into the mantissa of 2^52 and subtract. */
    vd_t k = s_vd_sub(s_vd_from_bits(s_vi_or(biased, s_vi_set1_64(0x4330000000000000ULL))),
                      s_vd_set1(4503599627370496.0 + 1023.0));
    md_t big = s_vd_gt(m, s_vd_set1(1.4142135623730950488));
    m = s_vd_select(big, s_vd_mul(m, s_vd_set1(0.5)), m);
    k = s_vd_select(big, s_vd_add(k, s_vd_set1(1.0)), k);

    vd_t f = s_vd_sub(m, s_vd_set1(1.0));
    vd_t s = s_vd_div(f, s_vd_add(f, s_vd_set1(2.0)));
    vd_t z = s_vd_mul(s, s);
    vd_t q = s_vd_set1(1.0 / 21.0);
    q = s_vd_fmadd(q, z, s_vd_set1(1.0 / 19.0));
    q = s_vd_fmadd(q, z, s_vd_set1(1.0 / 17.0));
    q = s_vd_fmadd(q, z, s_vd_set1(1.0 / 15.0));
    q = s_vd_fmadd(q, z, s_vd_set1(1.0 / 13.0));
    q = s_vd_fmadd(q, z, s_vd_set1(1.0 / 11.0));
    q = s_vd_fmadd(q, z, s_vd_set1(1.0 / 9.0));
    q = s_vd_fmadd(q, z, s_vd_set1(1.0 / 7.0));
    q = s_vd_fmadd(q, z, s_vd_set1(1.0 / 5.0));
    q = s_vd_fmadd(q, z, s_vd_set1(1.0 / 3.0));

    /* k ln2 = k ln2_hi + k ln2_lo, and ln2_hi's low 32 mantissa bits are zero, so
     * k ln2_hi is exact for every exponent. The small terms are added first. */
    vd_t two_s = s_vd_add(s, s);
    vd_t small = s_vd_fmadd(s_vd_mul(two_s, z), q, s_vd_mul(k, s_vd_set1(1.9082149292705877e-10)));
    vd_t y = s_vd_fmadd(k, s_vd_set1(0.6931471803691238), s_vd_add(two_s, small));
    return s_vd_select(s_vd_eq(x, s_vd_set1(0.0)), s_vd_set1(-INFINITY), y);
}

/*
 * erfc(a) in f32 lanes for a >= 0 (a NaN stays NaN). Below a = 0.5 it is 1 - erf(a) with
 * erf(a) = a P(a^2), P the Taylor series of degree 5 in a^2 (truncation below 3e-8
 * relative to erf). From 0.5 on it is exp(-a^2) R(t) with t = 1 / (1 + a/2), where R is
 * a degree-9 Chebyshev fit (mpmath chebyfit) of erfc(a) exp(a^2) on [0.5, 10], within
 * 1.1e-8 relative with its coefficients rounded to f32. The FMA residual of a^2 corrects
 * the exponent's rounding. The relative error is below 4.2e-7, measured against the f64
 * erfc at 0 and every float of [1e-4, 9.3]. From about 9.3 on, erfc(a) < FLT_MIN and the
 * result is +0 or subnormal.
 */
static inline vf_t s_erfc_ps(vf_t a)
{
    /* erfc(10) = 2e-45 is below FLT_MIN anyway. The clamp keeps an infinite a out of
     * a * a - a2 below, which would be NaN. */
    a = s_vf_min(s_vf_set1(10.0f), a);
    vf_t a2 = s_vf_mul(a, a);

    vf_t ps = s_vf_set1(-0.000854832702345f);
    ps = s_vf_fmadd(ps, a2, s_vf_set1(0.00522397762544f));
    ps = s_vf_fmadd(ps, a2, s_vf_set1(-0.0268661706451f));
    ps = s_vf_fmadd(ps, a2, s_vf_set1(0.11283791671f));
    ps = s_vf_fmadd(ps, a2, s_vf_set1(-0.376126389032f));
    ps = s_vf_fmadd(ps, a2, s_vf_set1(1.1283791671f));
    vf_t near = s_vf_fnmadd(a, ps, s_vf_set1(1.0f));

    vf_t t = s_vf_div(s_vf_set1(1.0f), s_vf_fmadd(a, s_vf_set1(0.5f), s_vf_set1(1.0f)));
    vf_t pr = s_vf_set1(-0.07732282768f);
    pr = s_vf_fmadd(pr, t, s_vf_set1(0.3636000994f));
    pr = s_vf_fmadd(pr, t, s_vf_set1(-0.6336807973f));
    pr = s_vf_fmadd(pr, t, s_vf_set1(0.4300580953f));
    pr = s_vf_fmadd(pr, t, s_vf_set1(-0.1235281957f));
    pr = s_vf_fmadd(pr, t, s_vf_set1(0.2418988468f));
    pr = s_vf_fmadd(pr, t, s_vf_set1(0.2330688521f));
    pr = s_vf_fmadd(pr, t, s_vf_set1(0.2839369541f));
    pr = s_vf_fmadd(pr, t, s_vf_set1(0.281952557f));
    pr = s_vf_fmadd(pr, t, s_vf_set1(4.812833826e-6f));
    /* exp(-(a2 + a2_lo)) = exp(-a2) (1 - a2_lo) to first order, as |a2_lo| <= ulp(a2) / 2. */
    vf_t a2_lo = s_vf_fmsub(a, a, a2);
    vf_t far = s_vf_mul(s_exp_ps(s_vf_neg(a2)), pr);
    far = s_vf_fnmadd(far, a2_lo, far);

    return s_vf_select(s_vf_lt(a, s_vf_set1(0.5f)), near, far);
}

/* ------------------------------------------------------------------------- */
/* Horizontal reductions (once per call, so through memory in a fixed order)  */

static inline float s_hsum_ps(vf_t v)
{
    float lanes[UM_X86_W];
    s_vf_store(lanes, v);
    float sum = 0.0f;
    for (int l = 0; l < UM_X86_W; l++)
        sum += lanes[l];
    return sum;
}

static inline double s_hsum_pd(vd_t v)
{
    double lanes[UM_X86_WD];
    s_vd_store(lanes, v);
    double sum = 0.0;
    for (int l = 0; l < UM_X86_WD; l++)
        sum += lanes[l];
    return sum;
}

/* Lanes are never NaN where this is used, so a plain comparison suffices. */
static inline float s_hmax_ps(vf_t v)
{
    float lanes[UM_X86_W];
    s_vf_store(lanes, v);
    float max = lanes[0];
    for (int l = 1; l < UM_X86_W; l++)
        if (lanes[l] > max)
            max = lanes[l];
    return max;
}

/* ------------------------------------------------------------------------- */
/* Row sums and maximum                                                       */

/* Sum of (x[i] - c)^2 in f32 lanes, with four accumulators to hide the FMA latency. */
static inline float s_sum_sq(const float *x, int32_t n, float c)
{
    const vf_t vc = s_vf_set1(c);
    vf_t a0 = s_vf_set1(0.0f), a1 = a0, a2 = a0, a3 = a0;
    int32_t i = 0;
    for (; i + 4 * UM_X86_W <= n; i += 4 * UM_X86_W) {
        vf_t d0 = s_vf_sub(s_vf_load(x + i), vc);
        vf_t d1 = s_vf_sub(s_vf_load(x + i + UM_X86_W), vc);
        vf_t d2 = s_vf_sub(s_vf_load(x + i + 2 * UM_X86_W), vc);
        vf_t d3 = s_vf_sub(s_vf_load(x + i + 3 * UM_X86_W), vc);
        a0 = s_vf_fmadd(d0, d0, a0);
        a1 = s_vf_fmadd(d1, d1, a1);
        a2 = s_vf_fmadd(d2, d2, a2);
        a3 = s_vf_fmadd(d3, d3, a3);
    }
    for (; i + UM_X86_W <= n; i += UM_X86_W) {
        vf_t d = s_vf_sub(s_vf_load(x + i), vc);
        a0 = s_vf_fmadd(d, d, a0);
    }
    if (i < n) {
        /* Filling with c makes the unused lanes contribute 0. */
        vf_t d = s_vf_sub(s_vf_load_part(x + i, n - i, c), vc);
        a1 = s_vf_fmadd(d, d, a1);
    }
    return s_hsum_ps(s_vf_add(s_vf_add(a0, a1), s_vf_add(a2, a3)));
}

static inline float s_sum(const float *x, int32_t n)
{
    vf_t a0 = s_vf_set1(0.0f), a1 = a0, a2 = a0, a3 = a0;
    int32_t i = 0;
    for (; i + 4 * UM_X86_W <= n; i += 4 * UM_X86_W) {
        a0 = s_vf_add(a0, s_vf_load(x + i));
        a1 = s_vf_add(a1, s_vf_load(x + i + UM_X86_W));
        a2 = s_vf_add(a2, s_vf_load(x + i + 2 * UM_X86_W));
        a3 = s_vf_add(a3, s_vf_load(x + i + 3 * UM_X86_W));
    }
    for (; i + UM_X86_W <= n; i += UM_X86_W)
        a0 = s_vf_add(a0, s_vf_load(x + i));
    if (i < n)
        a1 = s_vf_add(a1, s_vf_load_part(x + i, n - i, 0.0f));
    return s_hsum_ps(s_vf_add(s_vf_add(a0, a1), s_vf_add(a2, a3)));
}

/* Largest value of a row, ignoring NaNs as the reference's "x[i] > max" does. A row of
 * only -inf and NaN values gives -inf. */
static inline float s_max_row(const float *x, int32_t n)
{
    const vf_t ninf = s_vf_set1(-INFINITY);
    vf_t m0 = ninf, m1 = ninf;
    int32_t i = 0;
    /* max(v, m) returns m when v is a NaN, so the running maxima never become NaN. */
    for (; i + 2 * UM_X86_W <= n; i += 2 * UM_X86_W) {
        m0 = s_vf_max(s_vf_load(x + i), m0);
        m1 = s_vf_max(s_vf_load(x + i + UM_X86_W), m1);
    }
    for (; i + UM_X86_W <= n; i += UM_X86_W)
        m0 = s_vf_max(s_vf_load(x + i), m0);
    if (i < n)
        m1 = s_vf_max(s_vf_load_part(x + i, n - i, -INFINITY), m1);
    return s_hmax_ps(s_vf_max(m0, m1));
}

/* ------------------------------------------------------------------------- */
/* Element-wise and row kernels                                               */

/* The sum of squares is accumulated in f32 lanes, so it rounds in another order than the
 * reference's sequential sum. The scaling is the reference's (x * inv_rms) * w. */
void UM_X86_FN(rmsnorm)(float *out, const float *x, const float *w, int32_t n, float eps)
{
    float inv_rms = 1.0f / sqrtf(s_sum_sq(x, n, 0.0f) / (float)n + eps);
    const vf_t vinv = s_vf_set1(inv_rms);
    int32_t i = 0;
    for (; i + UM_X86_W <= n; i += UM_X86_W)
        s_vf_store(out + i, s_vf_mul(s_vf_mul(s_vf_load(x + i), vinv), s_vf_load(w + i)));
    if (i < n) {
        int32_t r = n - i;
        vf_t y = s_vf_mul(s_vf_mul(s_vf_load_part(x + i, r, 0.0f), vinv),
                          s_vf_load_part(w + i, r, 0.0f));
        s_vf_store_part(out + i, y, r);
    }
}

/* Two passes like the reference: the mean, then the centred squares. The bias is added
 * with an FMA, one rounding fewer than the reference. */
void UM_X86_FN(layernorm)(float *out, const float *x, const float *w, const float *b,
                          int32_t n, float eps)
{
    float mean = s_sum(x, n) / (float)n;
    float inv_std = 1.0f / sqrtf(s_sum_sq(x, n, mean) / (float)n + eps);
    const vf_t vmean = s_vf_set1(mean), vinv = s_vf_set1(inv_std), zero = s_vf_set1(0.0f);
    int32_t i = 0;
    for (; i + UM_X86_W <= n; i += UM_X86_W) {
        vf_t y = s_vf_mul(s_vf_sub(s_vf_load(x + i), vmean), vinv);
        vf_t bias = b ? s_vf_load(b + i) : zero;
        s_vf_store(out + i, s_vf_fmadd(y, s_vf_load(w + i), bias));
    }
    if (i < n) {
        int32_t r = n - i;
        vf_t y = s_vf_mul(s_vf_sub(s_vf_load_part(x + i, r, 0.0f), vmean), vinv);
        vf_t bias = b ? s_vf_load_part(b + i, r, 0.0f) : zero;
        s_vf_store_part(out + i, s_vf_fmadd(y, s_vf_load_part(w + i, r, 0.0f), bias), r);
    }
}

void UM_X86_FN(rope)(float *x, const float *cos_sin, int32_t head_dim)
{
    int32_t half = head_dim / 2, i = 0;
    for (; i + UM_X86_W <= half; i += UM_X86_W) {
        vf_t c, s;
        s_vf_load_pairs(cos_sin + 2 * i, &c, &s);
        vf_t a = s_vf_load(x + i), b = s_vf_load(x + i + half);
        s_vf_store(x + i, s_vf_fmsub(a, c, s_vf_mul(b, s)));
        s_vf_store(x + i + half, s_vf_fmadd(a, s, s_vf_mul(b, c)));
    }
    /* Head dimensions are multiples of 16 in practice. Remaining pairs go one at a time,
     * with the same rounding as the vector body. */
    for (; i < half; i++) {
        float c = cos_sin[2 * i], s = cos_sin[2 * i + 1];
        float a = x[i], b = x[i + half];
        x[i] = fmaf(a, c, -(b * s));
        x[i + half] = fmaf(a, s, b * c);
    }
}

void UM_X86_FN(softmax)(float *x, int32_t n)
{
    const vf_t vmax = s_vf_set1(s_max_row(x, n));
    vf_t sum0 = s_vf_set1(0.0f), sum1 = sum0;
    int32_t i = 0;
    for (; i + 2 * UM_X86_W <= n; i += 2 * UM_X86_W) {
        vf_t e0 = s_exp_ps(s_vf_sub(s_vf_load(x + i), vmax));
        vf_t e1 = s_exp_ps(s_vf_sub(s_vf_load(x + i + UM_X86_W), vmax));
        s_vf_store(x + i, e0);
        s_vf_store(x + i + UM_X86_W, e1);
        sum0 = s_vf_add(sum0, e0);
        sum1 = s_vf_add(sum1, e1);
    }
    for (; i + UM_X86_W <= n; i += UM_X86_W) {
        vf_t e = s_exp_ps(s_vf_sub(s_vf_load(x + i), vmax));
        s_vf_store(x + i, e);
        sum0 = s_vf_add(sum0, e);
    }
    if (i < n) {
        /* -inf fill: e^(-inf) = 0 adds nothing to the sum. */
        vf_t e = s_exp_ps(s_vf_sub(s_vf_load_part(x + i, n - i, -INFINITY), vmax));
        s_vf_store_part(x + i, e, n - i);
        sum1 = s_vf_add(sum1, e);
    }

    /* sum >= 1 because the maximum contributes e^0, so the division is safe. */
    const vf_t inv_sum = s_vf_set1(1.0f / s_hsum_ps(s_vf_add(sum0, sum1)));
    for (i = 0; i + UM_X86_W <= n; i += UM_X86_W)
        s_vf_store(x + i, s_vf_mul(s_vf_load(x + i), inv_sum));
    if (i < n)
        s_vf_store_part(x + i, s_vf_mul(s_vf_load_part(x + i, n - i, 0.0f), inv_sum), n - i);
}

/* silu(g) * u = g / (1 + e^-g) * u, the reference's formula; for g < -88.7, e^-g is +inf
 * and the result -0, as in the reference. */
static inline vf_t s_silu_mul(vf_t g, vf_t u)
{
    vf_t e = s_exp_ps(s_vf_neg(g));
    return s_vf_mul(s_vf_div(g, s_vf_add(s_vf_set1(1.0f), e)), u);
}

void UM_X86_FN(silu_mul)(float *out, const float *gate, const float *up, int32_t n)
{
    /* out may alias gate or up: each vector is loaded before it is stored. */
    int32_t i = 0;
    for (; i + UM_X86_W <= n; i += UM_X86_W)
        s_vf_store(out + i, s_silu_mul(s_vf_load(gate + i), s_vf_load(up + i)));
    if (i < n) {
        int32_t r = n - i;
        vf_t y = s_silu_mul(s_vf_load_part(gate + i, r, 0.0f), s_vf_load_part(up + i, r, 0.0f));
        s_vf_store_part(out + i, y, r);
    }
}

/*
 * x/2 (1 + erf(x / sqrt(2))) written as x (1 - erfc(z) / 2) for x >= 0 and x erfc(z) / 2
 * for x < 0, z = |x| / sqrt(2). The negative side has no cancellation, so it keeps its
 * relative accuracy where the reference's 1 + erff(z) loses digits (x < -3).
 */
static inline vf_t s_gelu_erf(vf_t x)
{
    vf_t h = s_vf_mul(s_vf_set1(0.5f), s_erfc_ps(s_vf_mul(s_vf_abs(x), s_vf_set1(0.70710678118654752f))));
    vf_t phi = s_vf_select(s_vf_lt(x, s_vf_set1(0.0f)), h, s_vf_sub(s_vf_set1(1.0f), h));
    return s_vf_mul(x, phi);
}

void UM_X86_FN(gelu_erf)(float *out, const float *x, int32_t n)
{
    int32_t i = 0;
    for (; i + UM_X86_W <= n; i += UM_X86_W)
        s_vf_store(out + i, s_gelu_erf(s_vf_load(x + i)));
    if (i < n)
        s_vf_store_part(out + i, s_gelu_erf(s_vf_load_part(x + i, n - i, 0.0f)), n - i);
}

/*
 * x/2 (1 + tanh(u)), u = sqrt(2/pi) (x + 0.044715 x^3), through the identity
 * (1 + tanh(u)) / 2 = 1 / (1 + e^(-2u)): one exp, no tanh, and no cancellation for
 * negative x. Large negative x gives e^(-2u) = +inf and the result -0, and x = -inf
 * gives NaN, both like the reference.
 */
static inline vf_t s_gelu_tanh(vf_t x)
{
    vf_t x2c = s_vf_mul(s_vf_mul(x, x), s_vf_set1(0.044715f));
    vf_t u = s_vf_fmadd(x2c, x, x);
    vf_t e = s_exp_ps(s_vf_mul(u, s_vf_set1(-2.0f * 0.79788456080286536f)));
    return s_vf_div(x, s_vf_add(s_vf_set1(1.0f), e));
}

void UM_X86_FN(gelu_tanh)(float *out, const float *x, int32_t n)
{
    int32_t i = 0;
    for (; i + UM_X86_W <= n; i += UM_X86_W)
        s_vf_store(out + i, s_gelu_tanh(s_vf_load(x + i)));
    if (i < n)
        s_vf_store_part(out + i, s_gelu_tanh(s_vf_load_part(x + i, n - i, 0.0f)), n - i);
}

void UM_X86_FN(add)(float *out, const float *x, int32_t n)
{
    int32_t i = 0;
    for (; i + UM_X86_W <= n; i += UM_X86_W)
        s_vf_store(out + i, s_vf_add(s_vf_load(out + i), s_vf_load(x + i)));
    if (i < n) {
        int32_t r = n - i;
        s_vf_store_part(out + i, s_vf_add(s_vf_load_part(out + i, r, 0.0f),
                                          s_vf_load_part(x + i, r, 0.0f)), r);
    }
}

void UM_X86_FN(bf16_to_f32)(float *out, const uint16_t *in, size_t n)
{
    size_t i = 0;
    for (; i + UM_X86_W <= n; i += UM_X86_W)
        s_vf_store(out + i, s_vf_from_bits(s_vi_slli32(s_vi_load_u16(in + i), 16)));
    um_k_bf16_to_f32_ref(out + i, in + i, n - i);
}

/* The reference's bit arithmetic, lane by lane: adding 0x7fff plus the lowest kept bit
 * rounds ties to even. A NaN keeps its sign and upper payload and is forced quiet (0x40). */
void UM_X86_FN(f32_to_bf16)(uint16_t *out, const float *in, size_t n)
{
    const vi_t low_bit = s_vi_set1_32(1), half_ulp = s_vi_set1_32(0x7fff);
    const vi_t abs_mask = s_vi_set1_32(0x7fffffff), inf_bits = s_vi_set1_32(0x7f800000);
    const vi_t quiet_bit = s_vi_set1_32(0x40);
    size_t i = 0;
    for (; i + UM_X86_W <= n; i += UM_X86_W) {
        vi_t bits = s_vf_bits(s_vf_load(in + i));
        vi_t upper = s_vi_srli32(bits, 16);
        vi_t rounded = s_vi_srli32(s_vi_add32(bits, s_vi_add32(half_ulp, s_vi_and(upper, low_bit))), 16);
        /* |bits| > inf as signed int32 is exact: both sides are below 2^31. */
        mf_t nan = s_vi_gt32(s_vi_and(bits, abs_mask), inf_bits);
        s_vi_store_u16(out + i, s_vi_select32(nan, s_vi_or(upper, quiet_bit), rounded));
    }
    um_k_f32_to_bf16_ref(out + i, in + i, n - i);
}

/* ------------------------------------------------------------------------- */
/* Vocabulary reductions                                                      */

/* Lane results of a per-lane argmax: the largest value with the lowest index on ties. */
static inline int32_t s_pick_lane_argmax(const float *val, const int32_t *idx, int lanes)
{
    float best = val[0];
    int32_t arg = idx[0];
    for (int l = 1; l < lanes; l++) {
        if (val[l] > best || (val[l] == best && idx[l] < arg)) {
            best = val[l];
            arg = idx[l];
        }
    }
    return arg;
}

/*
 * Each lane keeps its largest value so far and the index where it first saw it. The
 * comparison is a strict >, so a later equal value never replaces it, and the lanes are
 * merged by value, then lowest index. Lanes start at -inf with index 0, which gives 0 for
 * a row of only -inf and skips NaNs, as the reference does after index 0.
 */
int32_t UM_X86_FN(argmax)(const float *x, int32_t n)
{
    /* In the reference, nothing compares greater than a NaN at index 0, so it wins. */
    if (isnan(x[0]))
        return 0;
    vf_t best = s_vf_set1(-INFINITY);
    vi_t best_i = s_vi_set1_32(0), cur_i = s_vi_load(s_iota32);
    const vi_t step = s_vi_set1_32(UM_X86_W);
    int32_t i = 0;
    for (; i + UM_X86_W <= n; i += UM_X86_W) {
        vf_t v = s_vf_load(x + i);
        mf_t gt = s_vf_gt(v, best);
        best = s_vf_select(gt, v, best);
        best_i = s_vi_select32(gt, cur_i, best_i);
        cur_i = s_vi_add32(cur_i, step);
    }
    if (i < n) {
        vf_t v = s_vf_load_part(x + i, n - i, -INFINITY);
        mf_t gt = s_vf_gt(v, best);
        best = s_vf_select(gt, v, best);
        best_i = s_vi_select32(gt, cur_i, best_i);
    }
    float val[UM_X86_W];
    int32_t idx[UM_X86_W];
    s_vf_store(val, best);
    s_vi_store(idx, best_i);
    return s_pick_lane_argmax(val, idx, UM_X86_W);
}

/* Two passes like the reference: the f32 maximum, then sum e^(x - max) in f64 lanes with
 * the f64 exp. Each term is within 1.4e-16 relative of the reference's, and the summation
 * order differs. */
double UM_X86_FN(logsumexp)(const float *x, int32_t n)
{
    double max = s_max_row(x, n);
    /* An all -inf row has no mass, and a +inf entry dominates: both return max as is. */
    if (isinf(max))
        return max;

    const vd_t vmax = s_vd_set1(max);
    vd_t sum0 = s_vd_set1(0.0), sum1 = sum0, sum2 = sum0, sum3 = sum0;
    int32_t i = 0;
    /* Four independent exp chains per iteration keep the FMA units busy. */
    for (; i + 2 * UM_X86_W <= n; i += 2 * UM_X86_W) {
        vf_t v0 = s_vf_load(x + i), v1 = s_vf_load(x + i + UM_X86_W);
        sum0 = s_vd_add(sum0, s_exp_pd(s_vd_sub(s_vd_lo(v0), vmax)));
        sum1 = s_vd_add(sum1, s_exp_pd(s_vd_sub(s_vd_hi(v0), vmax)));
        sum2 = s_vd_add(sum2, s_exp_pd(s_vd_sub(s_vd_lo(v1), vmax)));
        sum3 = s_vd_add(sum3, s_exp_pd(s_vd_sub(s_vd_hi(v1), vmax)));
    }
    for (; i + UM_X86_W <= n; i += UM_X86_W) {
        vf_t v = s_vf_load(x + i);
        sum0 = s_vd_add(sum0, s_exp_pd(s_vd_sub(s_vd_lo(v), vmax)));
        sum1 = s_vd_add(sum1, s_exp_pd(s_vd_sub(s_vd_hi(v), vmax)));
    }
    if (i < n) {
        vf_t v = s_vf_load_part(x + i, n - i, -INFINITY);
        sum0 = s_vd_add(sum0, s_exp_pd(s_vd_sub(s_vd_lo(v), vmax)));
        sum1 = s_vd_add(sum1, s_exp_pd(s_vd_sub(s_vd_hi(v), vmax)));
    }
    return max + log(s_hsum_pd(s_vd_add(s_vd_add(sum0, sum1), s_vd_add(sum2, sum3))));
}

/*
 * Per-lane state of vocab_stats' single pass over v = scale * x. s and t are relative to
 * the lane's own running maximum. They are summed in f32 for at most S_STATS_FLUSH
 * vectors and then added to the f64 sums, so the f32 rounding error stays below
 * S_STATS_FLUSH * 2^-24 = 1e-6 relative whatever the row length.
 */
typedef struct s_stats_lanes {
    vf_t max, second; /* per lane: largest and second largest v (equal on a tie) */
    vi_t arg;         /* per lane: index of the first occurrence of max */
    vf_t s, t;        /* since the last flush: sum e^(v - max), sum e^(v - max) (v - max) */
    vf_t nan_seen;    /* per lane: a NaN v if the lane has seen one, else 0 */
    vd_t s_lo, s_hi;  /* flushed s in f64, lanes [0, WD) and [WD, W) */
    vd_t t_lo, t_hi;  /* flushed t in f64, likewise */
} s_stats_lanes_t;

#define S_STATS_FLUSH 16

static inline void s_stats_flush(s_stats_lanes_t *st)
{
    st->s_lo = s_vd_add(st->s_lo, s_vd_lo(st->s));
    st->s_hi = s_vd_add(st->s_hi, s_vd_hi(st->s));
    st->t_lo = s_vd_add(st->t_lo, s_vd_lo(st->t));
    st->t_hi = s_vd_add(st->t_hi, s_vd_hi(st->t));
    st->s = st->t = s_vf_set1(0.0f);
}

/*
 * Move the f64 sums of one half of the lanes from maximum m_old to m_new >= m_old:
 * with d = m_old - m_new, s' = e^d s and t' = e^d (t + d s). A lane still at -inf on both
 * sides gives d = NaN and a lane leaving -inf gives d = -inf; both are clamped to -1000,
 * where e^d = 0 and d s = 0 because s is still 0.
 */
static inline void s_stats_rescale_half(vd_t *s, vd_t *t, vd_t m_old, vd_t m_new)
{
    vd_t d = s_vd_max(s_vd_sub(m_old, m_new), s_vd_set1(-1000.0));
    vd_t f = s_exp_pd(d);
    *t = s_vd_mul(f, s_vd_fmadd(d, *s, *t));
    *s = s_vd_mul(f, *s);
}

static inline void s_stats_step(s_stats_lanes_t *st, vf_t v, vi_t index)
{
    mf_t gt = s_vf_gt(v, st->max);
    /* Top two per lane: second' = max(second, min(max, v)). The operand orders make a NaN
     * v leave both unchanged, as the reference's comparisons do. */
    st->second = s_vf_max(s_vf_min(st->max, v), st->second);
    if (s_mf_any(gt)) {
        /* A lane's maximum grew: flush its f32 sums (relative to the old maximum) and
         * rescale the f64 ones. Rare after the first vectors of a row. */
        vf_t new_max = s_vf_max(v, st->max);
        st->arg = s_vi_select32(gt, index, st->arg);
        s_stats_flush(st);
        s_stats_rescale_half(&st->s_lo, &st->t_lo, s_vd_lo(st->max), s_vd_lo(new_max));
        s_stats_rescale_half(&st->s_hi, &st->t_hi, s_vd_hi(st->max), s_vd_hi(new_max));
        st->max = new_max;
    }
    /* v - max is rounded to f32, where the reference subtracts in f64. That moves e^d by
     * at most half an ulp of d, relative, and terms with d below -20 weigh less than 3e-9
     * of the maximum's. -inf, NaN and anything below -100 become -100, where e^d is 0 and
     * so is e^d d. A NaN is remembered instead, to turn the sums NaN at the end. */
    st->nan_seen = s_vf_select(s_vf_isnan(v), v, st->nan_seen);
    vf_t d = s_vf_max(s_vf_sub(v, st->max), s_vf_set1(-100.0f));
    vf_t e = s_exp_ps(d);
    st->s = s_vf_add(st->s, e);
    st->t = s_vf_fmadd(e, d, st->t);
}

/*
 * One pass over the row: per lane the top two values, the first index of the maximum,
 * and s = sum e^(v - max), t = sum e^(v - max) (v - max) with online rescaling when the
 * lane's maximum grows. The lanes are combined in f64. max, second and argmax equal the
 * reference's exactly, because they come from the same f32 products scale * x and the
 * same comparisons. lse, p_max, margin and entropy are within about 1e-6 relative of the
 * reference, from the f32 exp and the f32 partial sums.
 */
void UM_X86_FN(vocab_stats)(const float *x, int32_t n, float scale, um_vocab_stats_t *out)
{
    const vf_t vscale = s_vf_set1(scale);
    s_stats_lanes_t st;
    st.max = st.second = s_vf_set1(-INFINITY);
    st.arg = s_vi_set1_32(0);
    st.s = st.t = st.nan_seen = s_vf_set1(0.0f);
    st.s_lo = st.s_hi = st.t_lo = st.t_hi = s_vd_set1(0.0);

    vi_t index = s_vi_load(s_iota32);
    const vi_t step = s_vi_set1_32(UM_X86_W);
    int32_t i = 0, pending = 0;
    for (; i + UM_X86_W <= n; i += UM_X86_W) {
        s_stats_step(&st, s_vf_mul(vscale, s_vf_load(x + i)), index);
        index = s_vi_add32(index, step);
        if (++pending == S_STATS_FLUSH) {
            s_stats_flush(&st);
            pending = 0;
        }
    }
    if (i < n)
        s_stats_step(&st, s_vf_mul(vscale, s_vf_load_part(x + i, n - i, -INFINITY)), index);
    s_stats_flush(&st);

    float lane_max[UM_X86_W], lane_second[UM_X86_W], lane_nan[UM_X86_W];
    int32_t lane_arg[UM_X86_W];
    double lane_s[UM_X86_W], lane_t[UM_X86_W];
    s_vf_store(lane_max, st.max);
    s_vf_store(lane_second, st.second);
    s_vf_store(lane_nan, st.nan_seen);
    s_vi_store(lane_arg, st.arg);
    s_vd_store(lane_s, st.s_lo);
    s_vd_store(lane_s + UM_X86_WD, st.s_hi);
    s_vd_store(lane_t, st.t_lo);
    s_vd_store(lane_t + UM_X86_WD, st.t_hi);

    /* The row's top two are the top two of the lanes' top twos. */
    float max = -INFINITY, second = -INFINITY;
    for (int l = 0; l < UM_X86_W; l++) {
        const float cand[2] = {lane_max[l], lane_second[l]};
        for (int c = 0; c < 2; c++) {
            if (cand[c] > max) {
                second = max;
                max = cand[c];
            } else if (cand[c] > second) {
                second = cand[c];
            }
        }
    }
    out->max = max;
    out->argmax = s_pick_lane_argmax(lane_max, lane_arg, UM_X86_W);
    out->second = second;
    if (max == -INFINITY) {
        out->lse = -INFINITY;
        out->p_max = out->margin = out->entropy = 0.0;
        return;
    }

    /* Move every lane to the row maximum: s_l e^(m_l - max), t as in the rescale. */
    double s = 0.0, t = 0.0;
    for (int l = 0; l < UM_X86_W; l++) {
        if (lane_max[l] == -INFINITY)
            continue;
        double d = (double)lane_max[l] - max;
        double f = exp(d);
        s += f * lane_s[l];
        t += f * (lane_t[l] + d * lane_s[l]);
    }
    /* As in the reference, a NaN in a row with a finite maximum makes the sums NaN. */
    for (int l = 0; l < UM_X86_W; l++)
        if (isnan(lane_nan[l]))
            s = t = NAN;
    out->lse = max + log(s);
    out->p_max = 1.0 / s;
    out->margin = out->p_max - exp((double)second - max) / s;
    out->entropy = log(s) - t / s;
}

/*
 * um_rng_uniform_key(key, c) for a vector of counters c, bit for bit: the splitmix64
 * finalizer in 64-bit lanes, then ((z >> 11) + 0.5) * 2^-53 in f64. The 53 bits of
 * z >> 11 are converted exactly, as hi * 2^32 + lo from two 32-bit halves that each
 * become a double when OR-ed into the mantissa of 2^52. The + 0.5 then rounds as in
 * rng.h, which also caps the result below 1.
 */
static inline vd_t s_uniform_pd(vi_t z)
{
    z = s_vi_xor(z, s_vi_srli64(z, 30));
    z = s_vi_mullo64(z, 0xBF58476D1CE4E5B9ULL);
    z = s_vi_xor(z, s_vi_srli64(z, 27));
    z = s_vi_mullo64(z, 0x94D049BB133111EBULL);
    z = s_vi_xor(z, s_vi_srli64(z, 31));
    vi_t q = s_vi_srli64(z, 11);

    const vi_t two52_bits = s_vi_set1_64(0x4330000000000000ULL);
    const vd_t two52 = s_vd_set1(4503599627370496.0);
    vd_t hi = s_vd_sub(s_vd_from_bits(s_vi_or(s_vi_srli64(q, 32), two52_bits)), two52);
    vd_t lo = s_vd_sub(s_vd_from_bits(s_vi_or(s_vi_and(q, s_vi_set1_64(0xffffffffULL)), two52_bits)),
                       two52);
    vd_t qd = s_vd_fmadd(hi, s_vd_set1(4294967296.0), lo);
    vd_t u = s_vd_mul(s_vd_add(qd, s_vd_set1(0.5)), s_vd_set1(1.0 / 9007199254740992.0));
    return s_vd_min(u, s_vd_set1(UM_RNG_BELOW_ONE));
}

/* Vectors per block of gumbel_argmax: the noise of a block is staged on the stack. */
#define S_GUMBEL_BLOCK 32

/*
 * Each block of S_GUMBEL_BLOCK vectors runs in three short passes (the uniforms, then
 * -log u, then the scores), so every loop iteration is short and independent of the
 * previous one and the CPU overlaps many of them. One pass of the whole chain per vector
 * (two divisions and two polynomials in a row) is too long for the out-of-order window
 * and ran 1.7 times slower on Zen 3. Lanes keep the best score and the index where
 * they first saw it, and are merged by score, then lowest index.
 */
int32_t UM_X86_FN(gumbel_argmax)(const float *x, int32_t n, double temperature, uint64_t key,
                                 uint64_t base)
{
    /* Lane l starts at counter key + G (base + l + 1) and steps by G * WD (mod 2^64). */
    uint64_t first[UM_X86_WD];
    for (int l = 0; l < UM_X86_WD; l++)
        first[l] = key + UM_RNG_GOLDEN * (base + (uint64_t)l + 1);
    vi_t counter = s_vi_load(first);
    const vi_t counter_step = s_vi_set1_64(UM_RNG_GOLDEN * (uint64_t)UM_X86_WD);
    vd_t index = s_vd_load(s_iota64);
    const vd_t index_step = s_vd_set1(UM_X86_WD), vtemp = s_vd_set1(temperature);
    vd_t best = s_vd_set1(-INFINITY), best_i = s_vd_set1(0.0);

    double noise[S_GUMBEL_BLOCK * UM_X86_WD];
    for (int32_t i = 0; i < n; i += S_GUMBEL_BLOCK * UM_X86_WD) {
        int32_t len = n - i < S_GUMBEL_BLOCK * UM_X86_WD ? n - i : S_GUMBEL_BLOCK * UM_X86_WD;
        int32_t vectors = (len + UM_X86_WD - 1) / UM_X86_WD;

        /* Lanes past n get noise too; their x is -inf below, so they never win. */
        for (int32_t k = 0; k < vectors; k++) {
            s_vd_store(noise + k * UM_X86_WD, s_uniform_pd(counter));
            counter = s_vi_add64(counter, counter_step);
        }
        for (int32_t k = 0; k < vectors; k++) {
            double *p = noise + k * UM_X86_WD;
            s_vd_store(p, s_vd_neg(s_log_pd(s_vd_load(p))));
        }
        for (int32_t k = 0; k < vectors; k++) {
            int32_t at = i + k * UM_X86_WD;
            vd_t xv = at + UM_X86_WD <= n ? s_vd_load_f32(x + at)
                                          : s_vd_load_f32_part(x + at, n - at, -INFINITY);
            /* The reference's x / temperature - log(-log u), with a division (not a
             * multiply by 1 / temperature) so that the first term rounds the same. -inf
             * entries score -inf and never beat the initial -inf, as the reference's
             * skip does. */
            vd_t score = s_vd_sub(s_vd_div(xv, vtemp), s_log_pd(s_vd_load(noise + k * UM_X86_WD)));
            md_t gt = s_vd_gt(score, best);
            best = s_vd_select(gt, score, best);
            best_i = s_vd_select(gt, index, best_i);
            index = s_vd_add(index, index_step);
        }
    }

    double lane_best[UM_X86_WD], lane_i[UM_X86_WD];
    s_vd_store(lane_best, best);
    s_vd_store(lane_i, best_i);
    double top = lane_best[0], arg = lane_i[0];
    for (int l = 1; l < UM_X86_WD; l++) {
        if (lane_best[l] > top || (lane_best[l] == top && lane_i[l] < arg)) {
            top = lane_best[l];
            arg = lane_i[l];
        }
    }
    return (int32_t)arg;
}

/* ------------------------------------------------------------------------- */
/* int8 quantisation                                                          */

/*
 * um_k_quantize_s8_ref with 256-bit AVX2 instructions, which the AVX-512 build has too.
 * It gives the same bits: the same f32 division, VROUNDPS to nearest even (as rintf in
 * the default rounding mode), and max and min whose NaN rule matches fmaxf and fminf in
 * the operand order used.
 */
float UM_X86_FN(quantize_s8)(int8_t *q, const float *x, int32_t n, int32_t levels)
{
    const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    __m256 vmax = _mm256_setzero_ps();
    int32_t i = 0;
    /* VMAXPS returns its second operand when either is a NaN, so NaN lanes keep vmax. */
    for (; i + 8 <= n; i += 8)
        vmax = _mm256_max_ps(_mm256_and_ps(_mm256_loadu_ps(x + i), abs_mask), vmax);
    float lanes[8];
    _mm256_storeu_ps(lanes, vmax);
    float max_abs = 0.0f;
    for (int l = 0; l < 8; l++)
        max_abs = fmaxf(max_abs, lanes[l]);
    for (; i < n; i++)
        max_abs = fmaxf(max_abs, fabsf(x[i]));
    if (max_abs == 0.0f) {
        for (i = 0; i < n; i++)
            q[i] = 0;
        return 0.0f;
    }

    float scale = max_abs / (float)levels;
    const __m256 vscale = _mm256_set1_ps(scale);
    const __m256 hi = _mm256_set1_ps((float)levels), lo = _mm256_set1_ps(-(float)levels);
    /* VPACKS* interleave the 128-bit halves; this restores the order of the 32 values. */
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for (i = 0; i + 32 <= n; i += 32) {
        __m256i v[4];
        for (int k = 0; k < 4; k++) {
            __m256 t = _mm256_div_ps(_mm256_loadu_ps(x + i + 8 * k), vscale);
            t = _mm256_round_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
            t = _mm256_max_ps(t, lo); /* a NaN becomes lo, as fmaxf(NaN, lo) */
            t = _mm256_min_ps(t, hi);
            v[k] = _mm256_cvtps_epi32(t);
        }
        __m256i w16 = _mm256_packs_epi32(v[0], v[1]), x16 = _mm256_packs_epi32(v[2], v[3]);
        __m256i b = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(w16, x16), order);
        _mm256_storeu_si256((__m256i *)(q + i), b);
    }
    /* The tail repeats the reference's steps (the reference itself would recompute the
     * scale from the tail alone). */
    for (; i < n; i++) {
        float t = rintf(x[i] / scale);
        t = fmaxf(t, -(float)levels);
        t = fminf(t, (float)levels);
        q[i] = (int8_t)t;
    }
    return scale;
}
