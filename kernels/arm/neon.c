/*
 * NEON (aarch64 Advanced SIMD) versions of every op in kernels.h, published as
 * um_kernels_neon_table. Advanced SIMD is part of the aarch64 base ISA, so this file
 * needs no -m flags. dispatch.c still checks HWCAP_ASIMD before it selects the table.
 *
 * Each kernel runs a vector body of 4 f32 lanes (2 for f64) and finishes the remaining
 * elements in a scalar tail that continues the same index. The vector exp, log and erfc
 * below were written for these kernels; each states its error bound, measured against
 * glibc's double-precision functions under qemu-aarch64.
 *
 * Threading: pure functions of their arguments, like the reference kernels.
 */
#include "kernels.h"

#include <arm_neon.h>
#include <float.h>
#include <math.h>
#include <string.h>

#include "rng.h"

/* ------------------------------------------------------------------------- */
/* Vector math                                                                */

/* ln 2 split so that n * S_LN2_HI_F32 is exact for |n| < 2^8 (16 significant bits). */
#define S_LN2_HI_F32 0.693145751953125f
#define S_LN2_LO_F32 1.428606820e-06f
/* The same split for f64: the high part has 32 significant bits, exact for |n| < 2^11. */
#define S_LN2_HI_F64 0.69314718036912382
#define S_LN2_LO_F64 1.9082149292705877e-10

/* Multiply p by 2^n for integer n in [-150, 129] in two factors, so that neither leaves
 * the normal range and a subnormal result is rounded once, in the second product. */
static inline float32x4_t s_scale_f32(float32x4_t p, int32x4_t n)
{
    int32x4_t n1 = vshrq_n_s32(n, 1);
    int32x4_t n2 = vsubq_s32(n, n1);
    const int32x4_t bias = vdupq_n_s32(127);
    float32x4_t f1 = vreinterpretq_f32_s32(vshlq_n_s32(vaddq_s32(n1, bias), 23));
    float32x4_t f2 = vreinterpretq_f32_s32(vshlq_n_s32(vaddq_s32(n2, bias), 23));
    return vmulq_f32(vmulq_f32(p, f1), f2);
}

/*
 * Compute e^x for 4 floats. x = n ln2 + r with n = round(x / ln2) and |r| <= ln2 / 2,
 * and e^r = 1 + r + r^2 q(r), where q is a degree-4 least-squares fit on Chebyshev nodes
 * (relative error 4e-9 with its coefficients rounded to f32). Measured over 2^24 points
 * of [-104, 89]: at most 1.01 ulp from the exact value, subnormal results included.
 * x > 88.7228 gives +inf, x < -104 gives 0 (e^x is below half the smallest subnormal
 * there), and NaN stays NaN.
 */
static inline float32x4_t s_exp_f32(float32x4_t x)
{
    const float32x4_t lo = vdupq_n_f32(-104.0f), hi = vdupq_n_f32(88.7228391f);
    uint32x4_t under = vcltq_f32(x, lo);
    uint32x4_t over = vcgtq_f32(x, hi);
    /* FMAX and FMIN return NaN for a NaN operand, so NaN passes through the clamp. */
    float32x4_t xc = vminq_f32(vmaxq_f32(x, lo), vdupq_n_f32(89.0f));

    float32x4_t n = vrndnq_f32(vmulq_f32(xc, vdupq_n_f32(1.44269504f)));
    float32x4_t r = vfmsq_f32(xc, n, vdupq_n_f32(S_LN2_HI_F32));
    r = vfmsq_f32(r, n, vdupq_n_f32(S_LN2_LO_F32));

    float32x4_t q = vdupq_n_f32(1.375140739e-03f);
    q = vfmaq_f32(vdupq_n_f32(8.368915878e-03f), q, r);
    q = vfmaq_f32(vdupq_n_f32(4.166953266e-02f), q, r);
    q = vfmaq_f32(vdupq_n_f32(1.666651815e-01f), q, r);
    q = vfmaq_f32(vdupq_n_f32(4.999998808e-01f), q, r);
    float32x4_t p = vaddq_f32(vfmaq_f32(r, vmulq_f32(r, r), q), vdupq_n_f32(1.0f));

    float32x4_t y = s_scale_f32(p, vcvtq_s32_f32(n));
    y = vbslq_f32(under, vdupq_n_f32(0.0f), y);
    return vbslq_f32(over, vdupq_n_f32(INFINITY), y);
}

/* Multiply p by 2^n for integer n in [-1076, 1026], in two factors as in s_scale_f32. */
static inline float64x2_t s_scale_f64(float64x2_t p, int64x2_t n)
{
    int64x2_t n1 = vshrq_n_s64(n, 1);
    int64x2_t n2 = vsubq_s64(n, n1);
    const int64x2_t bias = vdupq_n_s64(1023);
    float64x2_t f1 = vreinterpretq_f64_s64(vshlq_n_s64(vaddq_s64(n1, bias), 52));
    float64x2_t f2 = vreinterpretq_f64_s64(vshlq_n_s64(vaddq_s64(n2, bias), 52));
    return vmulq_f64(vmulq_f64(p, f1), f2);
}

/*
 * Compute e^x for 2 doubles, with the reduction of s_exp_f32 and the Taylor polynomial
 * of e^r to degree 13 (truncation below 6e-18 relative for |r| <= ln2 / 2). Measured over
 * 2^22 points of [-745, 709] and 2^22 of [-60, 0]: at most 1 ulp from glibc's exp.
 * x > 709.7827 gives +inf, x < -745.2 gives 0, NaN stays NaN.
 */
static inline float64x2_t s_exp_f64(float64x2_t x)
{
    const float64x2_t lo = vdupq_n_f64(-745.2), hi = vdupq_n_f64(709.78271289338397);
    uint64x2_t under = vcltq_f64(x, lo);
    uint64x2_t over = vcgtq_f64(x, hi);
    float64x2_t xc = vminq_f64(vmaxq_f64(x, lo), vdupq_n_f64(710.0));

    float64x2_t n = vrndnq_f64(vmulq_f64(xc, vdupq_n_f64(1.4426950408889634)));
    float64x2_t r = vfmsq_f64(xc, n, vdupq_n_f64(S_LN2_HI_F64));
    r = vfmsq_f64(r, n, vdupq_n_f64(S_LN2_LO_F64));

    /* 1/k! for k = 13 down to 2. */
    static const double inv_factorial[] = {
        1.6059043836821613e-10, 2.08767569878681e-09,   2.505210838544172e-08,
        2.7557319223985888e-07, 2.7557319223985893e-06, 2.4801587301587302e-05,
        1.9841269841269841e-04, 1.3888888888888889e-03, 8.3333333333333332e-03,
        4.1666666666666664e-02, 1.6666666666666666e-01, 0.5,
    };
    float64x2_t q = vdupq_n_f64(inv_factorial[0]);
    for (size_t k = 1; k < sizeof inv_factorial / sizeof inv_factorial[0]; k++)
        q = vfmaq_f64(vdupq_n_f64(inv_factorial[k]), q, r);
    float64x2_t p = vaddq_f64(vfmaq_f64(r, vmulq_f64(r, r), q), vdupq_n_f64(1.0));

    float64x2_t y = s_scale_f64(p, vcvtq_s64_f64(n));
    y = vbslq_f64(under, vdupq_n_f64(0.0), y);
    return vbslq_f64(over, vdupq_n_f64(INFINITY), y);
}

/*
 * Compute log(x) for 2 doubles, for positive normal finite x only (the Gumbel noise passes
 * values in [2^-54, 38]). x = 2^k m with m in [sqrt(1/2), sqrt(2)), f = m - 1 (exact)
 * and s = f / (2 + f). Then log m = 2 atanh(s) = f - (f^2/2 - s (f^2/2 + R)) with
 * R = sum 2 s^(2j) / (2j + 1) for j = 1..10 (truncation below 1e-18 for |s| <= 0.172).
 * Measured over 2^22 points of [2^-60, 64]: at most 1 ulp from glibc's log.
 */
static inline float64x2_t s_log_f64(float64x2_t x)
{
    uint64x2_t bits = vreinterpretq_u64_f64(x);
    int64x2_t biased = vreinterpretq_s64_u64(vshrq_n_u64(bits, 52));
    int64x2_t k = vsubq_s64(biased, vdupq_n_s64(1023));
    uint64x2_t mbits = vorrq_u64(vandq_u64(bits, vdupq_n_u64(0x000fffffffffffffull)),
                                 vdupq_n_u64(0x3ff0000000000000ull));
    float64x2_t m = vreinterpretq_f64_u64(mbits);

    /* m in [sqrt(2), 2): halve it and count the factor in k (the mask is -1). */
    uint64x2_t big = vcgeq_f64(m, vdupq_n_f64(1.4142135623730951));
    m = vbslq_f64(big, vmulq_f64(m, vdupq_n_f64(0.5)), m);
    k = vsubq_s64(k, vreinterpretq_s64_u64(big));

    float64x2_t f = vsubq_f64(m, vdupq_n_f64(1.0));
    float64x2_t s = vdivq_f64(f, vaddq_f64(f, vdupq_n_f64(2.0)));
    float64x2_t z = vmulq_f64(s, s);

    /* 2 / (2j + 1) for j = 10 down to 1. */
    static const double odd_inverse[] = {
        0.095238095238095233, 0.10526315789473684, 0.11764705882352941,
        0.13333333333333333,  0.15384615384615385, 0.18181818181818182,
        0.22222222222222221,  0.2857142857142857,  0.40000000000000002,
        0.66666666666666663,
    };
    float64x2_t R = vdupq_n_f64(odd_inverse[0]);
    for (size_t j = 1; j < sizeof odd_inverse / sizeof odd_inverse[0]; j++)
        R = vfmaq_f64(vdupq_n_f64(odd_inverse[j]), R, z);
    R = vmulq_f64(R, z);

    float64x2_t kd = vcvtq_f64_s64(k);
    float64x2_t hfsq = vmulq_f64(vmulq_f64(vdupq_n_f64(0.5), f), f);
    /* Small terms first: s (f^2/2 + R) + k ln2_lo, then f - (f^2/2 - that), then
     * k ln2_hi. */
    float64x2_t small = vfmaq_f64(vmulq_f64(kd, vdupq_n_f64(S_LN2_LO_F64)), s,
                                  vaddq_f64(hfsq, R));
    float64x2_t log_m = vsubq_f64(f, vsubq_f64(hfsq, small));
    return vfmaq_f64(log_m, kd, vdupq_n_f64(S_LN2_HI_F64));
}

/*
 * Compute erfc(a) for 4 floats a = ahi + alo >= 0, where alo is the rounding error of ahi.
 * erfc(a) = exp(-a^2) P(t) with t = 2 / (2 + a), where P is a degree-10 least-squares
 * fit to exp(a^2) erfc(a) on [0, 9.25] at Chebyshev nodes in t (relative error 7e-9 with
 * f32 coefficients). a^2 is carried as a2 + a2lo, the FMA residual of ahi^2 plus
 * 2 ahi alo, and exp(-a2lo) is taken as 1 - a2lo because |a2lo| < 3e-5. Measured over
 * 2^24 points of [0, 10]: relative error at most 4e-7 where erfc(a) is a normal float.
 * a >= 10.5 gives 0 (erfc(10.5) is below the smallest subnormal).
 */
static inline float32x4_t s_erfc_f32(float32x4_t ahi, float32x4_t alo)
{
    float32x4_t a = vminq_f32(ahi, vdupq_n_f32(10.5f));
    float32x4_t a2 = vmulq_f32(a, a);
    float32x4_t a2lo = vfmaq_f32(vnegq_f32(a2), a, a);
    a2lo = vfmaq_f32(a2lo, vaddq_f32(a, a), alo);

    float32x4_t t = vdivq_f32(vdupq_n_f32(2.0f), vaddq_f32(vdupq_n_f32(2.0f), a));
    static const float coef[] = {
        3.132612258e-02f,  -2.301299125e-01f, 6.906767488e-01f, -1.037485003e+00f,
        7.479209304e-01f,  -2.899473608e-01f, 3.005029559e-01f, 2.193777263e-01f,
        2.859663665e-01f,  2.817802429e-01f,  1.117873580e-05f,
    };
    float32x4_t p = vdupq_n_f32(coef[0]);
    for (size_t j = 1; j < sizeof coef / sizeof coef[0]; j++)
        p = vfmaq_f32(vdupq_n_f32(coef[j]), p, t);

    float32x4_t e = s_exp_f32(vnegq_f32(a2));
    e = vfmsq_f32(e, e, a2lo);
    float32x4_t y = vmulq_f32(e, p);
    return vbslq_f32(vcgeq_f32(ahi, vdupq_n_f32(10.5f)), vdupq_n_f32(0.0f), y);
}

/* ------------------------------------------------------------------------- */
/* Row kernels                                                                */

static void um_k_rmsnorm_neon(float *out, const float *x, const float *w, int32_t n,
                              float eps)
{
    /* Two accumulators of 4 lanes, in f32 like the reference, so only the order differs. */
    float32x4_t acc0 = vdupq_n_f32(0.0f), acc1 = vdupq_n_f32(0.0f);
    int32_t i = 0;
    for (; i + 8 <= n; i += 8) {
        float32x4_t a = vld1q_f32(x + i), b = vld1q_f32(x + i + 4);
        acc0 = vfmaq_f32(acc0, a, a);
        acc1 = vfmaq_f32(acc1, b, b);
    }
    float sum_sq = vaddvq_f32(vaddq_f32(acc0, acc1));
    for (; i < n; i++)
        sum_sq += x[i] * x[i];

    float inv_rms = 1.0f / sqrtf(sum_sq / (float)n + eps);
    i = 0;
    for (; i + 4 <= n; i += 4) {
        float32x4_t y = vmulq_n_f32(vld1q_f32(x + i), inv_rms);
        vst1q_f32(out + i, vmulq_f32(y, vld1q_f32(w + i)));
    }
    for (; i < n; i++)
        out[i] = (x[i] * inv_rms) * w[i];
}

static void um_k_layernorm_neon(float *out, const float *x, const float *w, const float *b,
                                int32_t n, float eps)
{
    /* Two passes like the reference: the mean, then the centred squares. */
    float32x4_t acc = vdupq_n_f32(0.0f);
    int32_t i = 0;
    for (; i + 4 <= n; i += 4)
        acc = vaddq_f32(acc, vld1q_f32(x + i));
    float sum = vaddvq_f32(acc);
    for (; i < n; i++)
        sum += x[i];
    float mean = sum / (float)n;

    float32x4_t vmean = vdupq_n_f32(mean);
    acc = vdupq_n_f32(0.0f);
    i = 0;
    for (; i + 4 <= n; i += 4) {
        float32x4_t c = vsubq_f32(vld1q_f32(x + i), vmean);
        acc = vfmaq_f32(acc, c, c);
    }
    float sum_sq = vaddvq_f32(acc);
    for (; i < n; i++) {
        float c = x[i] - mean;
        sum_sq += c * c;
    }

    float inv_std = 1.0f / sqrtf(sum_sq / (float)n + eps);
    i = 0;
    for (; i + 4 <= n; i += 4) {
        float32x4_t y = vmulq_n_f32(vsubq_f32(vld1q_f32(x + i), vmean), inv_std);
        y = vmulq_f32(y, vld1q_f32(w + i));
        if (b)
            y = vaddq_f32(y, vld1q_f32(b + i));
        vst1q_f32(out + i, y);
    }
    for (; i < n; i++) {
        float y = (x[i] - mean) * inv_std * w[i];
        out[i] = b ? y + b[i] : y;
    }
}

static void um_k_rope_neon(float *x, const float *cos_sin, int32_t head_dim)
{
    int32_t half = head_dim / 2;
    int32_t i = 0;
    for (; i + 4 <= half; i += 4) {
        /* vld2q splits the (cos, sin) pairs into a cos vector and a sin vector. */
        float32x4x2_t cs = vld2q_f32(cos_sin + 2 * i);
        float32x4_t a = vld1q_f32(x + i), b = vld1q_f32(x + i + half);
        vst1q_f32(x + i, vfmsq_f32(vmulq_f32(a, cs.val[0]), b, cs.val[1]));
        vst1q_f32(x + i + half, vfmaq_f32(vmulq_f32(b, cs.val[0]), a, cs.val[1]));
    }
    for (; i < half; i++) {
        float c = cos_sin[2 * i];
        float s = cos_sin[2 * i + 1];
        float a = x[i];
        float b = x[i + half];
        x[i] = a * c - b * s;
        x[i + half] = b * c + a * s;
    }
}

static void um_k_softmax_neon(float *x, int32_t n)
{
    /* FMAXNM skips NaN like the reference's strict > does. */
    float32x4_t vmax = vdupq_n_f32(-INFINITY);
    int32_t i = 0;
    for (; i + 4 <= n; i += 4)
        vmax = vmaxnmq_f32(vmax, vld1q_f32(x + i));
    float max = vmaxnmvq_f32(vmax);
    for (; i < n; i++)
        if (x[i] > max)
            max = x[i];

    float32x4_t vmax_all = vdupq_n_f32(max), acc = vdupq_n_f32(0.0f);
    i = 0;
    for (; i + 4 <= n; i += 4) {
        float32x4_t e = s_exp_f32(vsubq_f32(vld1q_f32(x + i), vmax_all));
        vst1q_f32(x + i, e);
        acc = vaddq_f32(acc, e);
    }
    float sum = vaddvq_f32(acc);
    for (; i < n; i++) {
        x[i] = expf(x[i] - max);
        sum += x[i];
    }

    /* sum >= 1 because the maximum contributes exp(0), so the division is safe. */
    float inv_sum = 1.0f / sum;
    i = 0;
    for (; i + 4 <= n; i += 4)
        vst1q_f32(x + i, vmulq_n_f32(vld1q_f32(x + i), inv_sum));
    for (; i < n; i++)
        x[i] *= inv_sum;
}

static void um_k_silu_mul_neon(float *out, const float *gate, const float *up, int32_t n)
{
    /* out may alias gate or up: each vector is loaded before it is stored. A gate below
     * -88.7 makes exp(-g) infinite and the product a signed zero, as in the reference. */
    int32_t i = 0;
    for (; i + 4 <= n; i += 4) {
        float32x4_t g = vld1q_f32(gate + i);
        float32x4_t denom = vaddq_f32(vdupq_n_f32(1.0f), s_exp_f32(vnegq_f32(g)));
        vst1q_f32(out + i, vmulq_f32(vdivq_f32(g, denom), vld1q_f32(up + i)));
    }
    for (; i < n; i++) {
        float g = gate[i];
        out[i] = g / (1.0f + expf(-g)) * up[i];
    }
}

/*
 * GELU, erf form, written as v * phi with phi = 1 - erfc(z) / 2 for z = v / sqrt(2) >= 0
 * and erfc(-z) / 2 below. Both halves avoid the cancellation of 1 + erf(z) for negative
 * v, so the relative error stays below 4e-7 (measured on [-15, 15]) where the
 * reference loses digits. z carries its rounding error (an FMA residual plus the low
 * part of 1 / sqrt(2)), because erfc's relative sensitivity to z grows as 2 z^2.
 */
static void um_k_gelu_erf_neon(float *out, const float *x, int32_t n)
{
    const float k_hi = 7.071067691e-01f, k_lo = 1.210161710e-08f; /* 1 / sqrt(2) */
    int32_t i = 0;
    for (; i + 4 <= n; i += 4) {
        float32x4_t v = vld1q_f32(x + i);
        float32x4_t z = vmulq_n_f32(v, k_hi);
        float32x4_t z_lo = vfmaq_n_f32(vnegq_f32(z), v, k_hi);
        z_lo = vfmaq_n_f32(z_lo, v, k_lo);

        uint32x4_t negative = vcltq_f32(z, vdupq_n_f32(0.0f));
        float32x4_t a = vabsq_f32(z);
        float32x4_t a_lo = vbslq_f32(negative, vnegq_f32(z_lo), z_lo);
        float32x4_t h = vmulq_n_f32(s_erfc_f32(a, a_lo), 0.5f);
        float32x4_t phi = vbslq_f32(negative, h, vsubq_f32(vdupq_n_f32(1.0f), h));
        vst1q_f32(out + i, vmulq_f32(v, phi));
    }
    /* The tail scales by 1 / sqrt(2) in float64, which gives the same accuracy. */
    for (; i < n; i++) {
        double v = x[i];
        out[i] = (float)(0.5 * v * erfc(-v * 0.70710678118654752));
    }
}

/*
 * GELU, tanh form. With y = sqrt(2/pi) (v + 0.044715 v^3), 1 + tanh(y) = 2 / (1 + e^(-2y)),
 * so the result is v / (1 + e^(-2y)): one vector exp and one division, exact in form and
 * free of the cancellation of 1 + tanh(y) for negative y. Measured on [-15, 15]: relative
 * error at most 1.7e-7 against the exact value for the f32 y.
 */
static void um_k_gelu_tanh_neon(float *out, const float *x, int32_t n)
{
    const float k = 0.79788456080286536f; /* sqrt(2 / pi) */
    int32_t i = 0;
    for (; i + 4 <= n; i += 4) {
        float32x4_t v = vld1q_f32(x + i);
        /* The reference's order of products: ((0.044715 v) v) v. */
        float32x4_t cube = vmulq_f32(vmulq_f32(vmulq_n_f32(v, 0.044715f), v), v);
        float32x4_t y = vmulq_n_f32(vaddq_f32(v, cube), k);
        float32x4_t denom = vaddq_f32(vdupq_n_f32(1.0f), s_exp_f32(vmulq_n_f32(y, -2.0f)));
        vst1q_f32(out + i, vdivq_f32(v, denom));
    }
    for (; i < n; i++) {
        float v = x[i];
        float y = k * (v + 0.044715f * v * v * v);
        out[i] = v / (1.0f + expf(-2.0f * y));
    }
}

static void um_k_add_neon(float *out, const float *x, int32_t n)
{
    int32_t i = 0;
    for (; i + 4 <= n; i += 4)
        vst1q_f32(out + i, vaddq_f32(vld1q_f32(out + i), vld1q_f32(x + i)));
    for (; i < n; i++)
        out[i] += x[i];
}

/* ------------------------------------------------------------------------- */
/* bf16 conversions                                                           */

static void um_k_bf16_to_f32_neon(float *out, const uint16_t *in, size_t n)
{
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        uint16x8_t h = vld1q_u16(in + i);
        vst1q_f32(out + i, vreinterpretq_f32_u32(vshll_n_u16(vget_low_u16(h), 16)));
        vst1q_f32(out + i + 4, vreinterpretq_f32_u32(vshll_high_n_u16(h, 16)));
    }
    for (; i < n; i++) {
        uint32_t bits = (uint32_t)in[i] << 16;
        memcpy(&out[i], &bits, sizeof bits);
    }
}

/* Round 4 f32 bit patterns to bf16 (in the upper halves), nearest even, NaN kept quiet. */
static inline uint32x4_t s_round_bf16(uint32x4_t bits)
{
    uint32x4_t nan = vcgtq_u32(vandq_u32(bits, vdupq_n_u32(0x7fffffffu)),
                               vdupq_n_u32(0x7f800000u));
    uint32x4_t lsb = vandq_u32(vshrq_n_u32(bits, 16), vdupq_n_u32(1u));
    uint32x4_t rounded = vaddq_u32(bits, vaddq_u32(vdupq_n_u32(0x7fffu), lsb));
    /* NaN: set the quiet bit (bit 6 of the bf16 value) instead of rounding into inf. */
    uint32x4_t quiet = vorrq_u32(bits, vdupq_n_u32(0x00400000u));
    return vbslq_u32(nan, quiet, rounded);
}

/* ARMv8.6 BFCVTN would round in one instruction, but it is optional before ARMv9 and
 * HWCAP2_BF16 is not probed, so this uses base Advanced SIMD only. */
static void um_k_f32_to_bf16_neon(uint16_t *out, const float *in, size_t n)
{
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        uint32x4_t lo = s_round_bf16(vreinterpretq_u32_f32(vld1q_f32(in + i)));
        uint32x4_t hi = s_round_bf16(vreinterpretq_u32_f32(vld1q_f32(in + i + 4)));
        vst1q_u16(out + i, vshrn_high_n_u32(vshrn_n_u32(lo, 16), hi, 16));
    }
    for (; i < n; i++) {
        uint32_t bits;
        memcpy(&bits, &in[i], sizeof bits);
        if ((bits & 0x7fffffffu) > 0x7f800000u) {
            out[i] = (uint16_t)((bits >> 16) | 0x40);
            continue;
        }
        bits += 0x7fffu + ((bits >> 16) & 1u);
        out[i] = (uint16_t)(bits >> 16);
    }
}

/* ------------------------------------------------------------------------- */
/* Vocabulary reductions                                                      */

/* Return the lowest index of the largest lane value (lanes never updated hold index 0). */
static inline uint32_t s_first_max_index(float32x4_t vmax, uint32x4_t vidx, float *max)
{
    *max = vmaxvq_f32(vmax);
    uint32x4_t at_max = vceqq_f32(vmax, vdupq_n_f32(*max));
    return vminvq_u32(vbslq_u32(at_max, vidx, vdupq_n_u32(UINT32_MAX)));
}

static int32_t um_k_argmax_neon(const float *x, int32_t n)
{
    /* The reference never moves off a NaN at index 0 (nothing compares greater). */
    if (n <= 0 || isnan(x[0]))
        return 0;

    /* Each lane keeps the first index of its largest value, by strict >, so NaN is
     * skipped. The lanes then combine to the lowest index among equal maxima. */
    float32x4_t vmax = vdupq_n_f32(-INFINITY);
    uint32x4_t vidx = vdupq_n_u32(0);
    const uint32_t lane_offsets[4] = {0, 1, 2, 3};
    uint32x4_t cur = vld1q_u32(lane_offsets);
    int32_t i = 0;
    for (; i + 4 <= n; i += 4) {
        float32x4_t v = vld1q_f32(x + i);
        uint32x4_t gt = vcgtq_f32(v, vmax);
        vmax = vbslq_f32(gt, v, vmax);
        vidx = vbslq_u32(gt, cur, vidx);
        cur = vaddq_u32(cur, vdupq_n_u32(4));
    }
    float best_value;
    int32_t best = (int32_t)s_first_max_index(vmax, vidx, &best_value);
    for (; i < n; i++) {
        if (x[i] > best_value) {
            best_value = x[i];
            best = i;
        }
    }
    return best;
}

static double um_k_logsumexp_neon(const float *x, int32_t n)
{
    float32x4_t vmax = vdupq_n_f32(-INFINITY);
    int32_t i = 0;
    for (; i + 4 <= n; i += 4)
        vmax = vmaxnmq_f32(vmax, vld1q_f32(x + i));
    double max = vmaxnmvq_f32(vmax);
    for (; i < n; i++)
        if (x[i] > max)
            max = x[i];

    /* An all -inf row has no mass, and a +inf entry dominates: both return max as is. */
    if (isinf(max))
        return max;

    /* Each f32 lane widens to f64 before the shift, so the sum has the reference's
     * float64 accuracy and only the summation order differs. */
    float64x2_t vm = vdupq_n_f64(max);
    float64x2_t acc0 = vdupq_n_f64(0.0), acc1 = vdupq_n_f64(0.0);
    i = 0;
    for (; i + 4 <= n; i += 4) {
        float32x4_t v = vld1q_f32(x + i);
        acc0 = vaddq_f64(acc0, s_exp_f64(vsubq_f64(vcvt_f64_f32(vget_low_f32(v)), vm)));
        acc1 = vaddq_f64(acc1, s_exp_f64(vsubq_f64(vcvt_high_f64_f32(v), vm)));
    }
    double sum = vaddvq_f64(vaddq_f64(acc0, acc1));
    for (; i < n; i++)
        sum += exp((double)x[i] - max);
    return max + log(sum);
}

/*
 * One lane's share of um_vocab_stats_t: its top two values and first argmax, and the
 * float64 sums s = sum e^(v - ref) and t = sum e^(v - ref) (v - ref) over the values it
 * has folded in, relative to ref, its largest value at the last fold.
 */
typedef struct s_vocab_lane {
    float max;
    float second;
    int32_t arg;
    double ref;
    double s;
    double t;
} s_vocab_lane_t;

/* Re-express the lane's sums relative to new_ref >= ref: every e^(v - ref) gains the
 * factor a = e^(ref - new_ref) and every (v - ref) the term (ref - new_ref). */
static void s_lane_rebase(s_vocab_lane_t *lane, double new_ref)
{
    if (lane->s > 0.0 && new_ref > lane->ref) {
        double shift = lane->ref - new_ref;
        double a = exp(shift);
        lane->t = a * (lane->t + shift * lane->s);
        lane->s *= a;
    }
    lane->ref = new_ref;
}

/* Add one value to a scalar lane, in float64 like the reference. */
static void s_lane_push(s_vocab_lane_t *lane, float v, int32_t i)
{
    if (v > lane->max) {
        lane->second = lane->max;
        lane->max = v;
        lane->arg = i;
    } else if (v > lane->second) {
        lane->second = v;
    }
    /* -inf (a banned token) carries no mass. NaN and +inf are skipped here, and the
     * caller makes the sums NaN. */
    if (!(v > -INFINITY) || v == INFINITY)
        return;
    if (v > lane->ref)
        s_lane_rebase(lane, v);
    double d = (double)v - lane->ref;
    double e = exp(d);
    lane->s += e;
    lane->t += e * d;
}

/* Values per lane between two folds of the f32 sums into the float64 ones: the f32
 * sums then hold at most 128 terms in [0, 1], a relative error below 8e-6. */
#define S_VOCAB_FOLD_EVERY 128

/* Move the f32 lane sums, relative to the lane maxima vmax, into the float64 lanes. */
static void s_vocab_fold(s_vocab_lane_t lanes[4], float32x4_t vmax, float32x4_t *vs,
                         float32x4_t *vt)
{
    float m[4], s[4], t[4];
    vst1q_f32(m, vmax);
    vst1q_f32(s, *vs);
    vst1q_f32(t, *vt);
    for (int l = 0; l < 4; l++) {
        if (s[l] == 0.0f)
            continue;
        s_lane_rebase(&lanes[l], m[l]);
        lanes[l].s += s[l];
        lanes[l].t += t[l];
    }
    *vs = vdupq_n_f32(0.0f);
    *vt = vdupq_n_f32(0.0f);
}

/*
 * One pass. Each f32 lane keeps its running max m and s = sum e^(v - m),
 * t = sum e^(v - m) (v - m). A value above m rescales both sums by a = e^(m - v) and
 * adds (m - v) s to t. Otherwise it adds e^(v - m) to s and e^(v - m) (v - m) to t. One
 * of the two factors is always 1, so each value costs one vector exp.
 * Shifts are clamped at -FLT_MAX, which makes a -inf value contribute exactly 0 where
 * -inf - (-inf) would give NaN. Every 128 values per lane the f32 sums are folded into
 * float64 lanes, and the lanes combine in float64 at the end. A NaN never enters the top
 * two. As in the reference, a NaN or +inf value makes lse, p_max, margin and entropy NaN.
 */
static void um_k_vocab_stats_neon(const float *x, int32_t n, float scale,
                                  um_vocab_stats_t *out)
{
    s_vocab_lane_t lanes[5];
    for (int l = 0; l < 5; l++)
        lanes[l] = (s_vocab_lane_t){-INFINITY, -INFINITY, 0, -INFINITY, 0.0, 0.0};

    const float32x4_t one = vdupq_n_f32(1.0f), zero = vdupq_n_f32(0.0f);
    const float32x4_t shift_min = vdupq_n_f32(-FLT_MAX);
    float32x4_t vmax = vdupq_n_f32(-INFINITY), vsecond = vmax;
    float32x4_t vs = zero, vt = zero;
    uint32x4_t vidx = vdupq_n_u32(0), vbad = vdupq_n_u32(0);
    const uint32_t lane_offsets[4] = {0, 1, 2, 3};
    uint32x4_t cur = vld1q_u32(lane_offsets);

    int32_t i = 0, until_fold = S_VOCAB_FOLD_EVERY;
    for (; i + 4 <= n; i += 4) {
        float32x4_t v = vmulq_n_f32(vld1q_f32(x + i), scale);
        uint32x4_t gt = vcgtq_f32(v, vmax);
        /* NaN and +inf fail v < +inf. */
        vbad = vorrq_u32(vbad, vmvnq_u32(vcltq_f32(v, vdupq_n_f32(INFINITY))));

        /* Top two and first argmax, with the reference's strict comparisons. */
        float32x4_t below = vbslq_f32(vcgtq_f32(v, vsecond), v, vsecond);
        vsecond = vbslq_f32(gt, vmax, below);
        vidx = vbslq_u32(gt, cur, vidx);
        cur = vaddq_u32(cur, vdupq_n_u32(4));

        /* FMAXNM also maps the NaN of -inf - (-inf), or of a NaN v, to -FLT_MAX. */
        float32x4_t shift = vmaxnmq_f32(vsubq_f32(vmax, v), shift_min); /* used where gt */
        float32x4_t d = vmaxnmq_f32(vsubq_f32(v, vmax), shift_min);    /* used elsewhere */
        float32x4_t z = s_exp_f32(vbslq_f32(gt, shift, d));
        float32x4_t a = vbslq_f32(gt, z, one);
        float32x4_t e = vbslq_f32(gt, one, z);
        shift = vbslq_f32(gt, shift, zero);
        d = vbslq_f32(gt, zero, d);

        /* t = a (t + shift s) + e d, s = a s + e. */
        vt = vfmaq_f32(vmulq_f32(a, vt), vmulq_f32(a, shift), vs);
        vt = vfmaq_f32(vt, e, d);
        vs = vfmaq_f32(e, a, vs);
        vmax = vbslq_f32(gt, v, vmax);

        if (--until_fold == 0) {
            s_vocab_fold(lanes, vmax, &vs, &vt);
            until_fold = S_VOCAB_FOLD_EVERY;
        }
    }
    s_vocab_fold(lanes, vmax, &vs, &vt);
    float m[4], sec[4];
    uint32_t idx[4];
    vst1q_f32(m, vmax);
    vst1q_f32(sec, vsecond);
    vst1q_u32(idx, vidx);
    for (int l = 0; l < 4; l++) {
        lanes[l].max = m[l];
        lanes[l].second = sec[l];
        lanes[l].arg = (int32_t)idx[l];
    }

    /* The tail is a fifth lane, in scalar float64. */
    int saw_nan_or_inf = vmaxvq_u32(vbad) != 0;
    for (; i < n; i++) {
        float v = scale * x[i];
        saw_nan_or_inf |= !(v < INFINITY);
        s_lane_push(&lanes[4], v, i);
    }

    /* Combine: the maximum with its lowest index, then the second value. */
    int best = 0;
    for (int l = 1; l < 5; l++) {
        if (lanes[l].max > lanes[best].max ||
            (lanes[l].max == lanes[best].max && lanes[l].arg < lanes[best].arg))
            best = l;
    }
    float max = lanes[best].max, second = lanes[best].second;
    for (int l = 0; l < 5; l++)
        if (l != best && lanes[l].max > second)
            second = lanes[l].max;
    out->max = max;
    out->argmax = lanes[best].arg;
    out->second = second;
    if (max == -INFINITY) {
        out->lse = -INFINITY;
        out->p_max = out->margin = out->entropy = 0.0;
        return;
    }

    double s = 0.0, t = 0.0;
    for (int l = 0; l < 5; l++) {
        if (lanes[l].s == 0.0)
            continue;
        s_lane_rebase(&lanes[l], max);
        s += lanes[l].s;
        t += lanes[l].t;
    }
    if (saw_nan_or_inf)
        s = t = NAN;
    out->lse = max + log(s);
    out->p_max = 1.0 / s;
    out->margin = out->p_max - exp((double)second - max) / s;
    out->entropy = log(s) - t / s;
}

/*
 * The uniforms come from the scalar counter-based generator (64-bit multiplies have no
 * Advanced SIMD form), and the two logarithms of the Gumbel noise run in float64x2 lanes.
 * NOTE: s_log_f64 is within 1 ulp of glibc's log, not equal to it, so the chosen index can
 * differ from the reference's when two scores agree to about 1e-15 relative.
 */
static int32_t um_k_gumbel_argmax_neon(const float *x, int32_t n, double temperature,
                                       uint64_t key, uint64_t base)
{
    const float64x2_t vtemp = vdupq_n_f64(temperature);
    float64x2_t best = vdupq_n_f64(-INFINITY);
    uint64x2_t vidx = vdupq_n_u64(0);
    const uint64_t lane_offsets[2] = {0, 1};
    uint64x2_t cur = vld1q_u64(lane_offsets);

    int32_t i = 0;
    for (; i + 2 <= n; i += 2) {
        double u[2] = {um_rng_uniform_key(key, base + (uint64_t)i),
                       um_rng_uniform_key(key, base + (uint64_t)i + 1)};
        float64x2_t noise = s_log_f64(vnegq_f64(s_log_f64(vld1q_f64(u))));
        /* Division, not a multiply by 1 / temperature, to round as the reference does.
         * A -inf logit scores -inf and so is never taken, as the reference skips it. */
        float64x2_t logits = vcvt_f64_f32(vld1_f32(x + i));
        float64x2_t score = vsubq_f64(vdivq_f64(logits, vtemp), noise);
        uint64x2_t gt = vcgtq_f64(score, best);
        best = vbslq_f64(gt, score, best);
        vidx = vbslq_u64(gt, cur, vidx);
        cur = vaddq_u64(cur, vdupq_n_u64(2));
    }

    /* Combine the two lanes: higher score, then lower index. */
    double s0 = vgetq_lane_f64(best, 0), s1 = vgetq_lane_f64(best, 1);
    uint64_t i0 = vgetq_lane_u64(vidx, 0), i1 = vgetq_lane_u64(vidx, 1);
    double best_score = s0;
    int32_t best_index = (int32_t)i0;
    if (s1 > s0 || (s1 == s0 && i1 < i0)) {
        best_score = s1;
        best_index = (int32_t)i1;
    }

    for (; i < n; i++) {
        if (x[i] == -INFINITY)
            continue;
        double u = um_rng_uniform_key(key, base + (uint64_t)i);
        double score = (double)x[i] / temperature - log(-log(u));
        if (score > best_score) {
            best_score = score;
            best_index = i;
        }
    }
    return best_index;
}

/* ------------------------------------------------------------------------- */
/* The table                                                                  */

const um_kernel_table_t um_kernels_neon_table = {
    .isa = "neon",
    .rmsnorm = um_k_rmsnorm_neon,
    .layernorm = um_k_layernorm_neon,
    .rope = um_k_rope_neon,
    .softmax = um_k_softmax_neon,
    .silu_mul = um_k_silu_mul_neon,
    .gelu_erf = um_k_gelu_erf_neon,
    .gelu_tanh = um_k_gelu_tanh_neon,
    .add = um_k_add_neon,
    .bf16_to_f32 = um_k_bf16_to_f32_neon,
    .f32_to_bf16 = um_k_f32_to_bf16_neon,
    .argmax = um_k_argmax_neon,
    .logsumexp = um_k_logsumexp_neon,
    .vocab_stats = um_k_vocab_stats_neon,
    .gumbel_argmax = um_k_gumbel_argmax_neon,
    /* NOTE: no NEON version of the int8 quantiser yet. */
    .quantize_s8 = um_k_quantize_s8_ref,
};
