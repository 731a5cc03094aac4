/*
 * AVX2 + FMA kernels: 8 f32 or 4 f64 lanes in 256-bit registers. This file defines the
 * vector layer that simd_x86.h is written against and then includes it, so the kernels
 * themselves are shared with the AVX-512 build. It is compiled with -mavx2 -mfma, and
 * the dispatcher calls it only after the CPU probe has found AVX2, FMA and the OS's YMM
 * state.
 *
 * Threading: pure functions of their arguments; any number of threads may call them.
 */
#include <immintrin.h>

#include "kernels.h"

#define UM_X86_W 8  /* f32 lanes */
#define UM_X86_WD 4 /* f64 lanes */
#define UM_X86_FN(op) um_k_##op##_avx2

typedef __m256 vf_t;  /* 8 x f32 */
typedef __m256d vd_t; /* 4 x f64 */
typedef __m256i vi_t; /* 8 x i32 or 4 x i64 */
typedef __m256 mf_t;  /* per f32 lane: all ones (true) or zero */
typedef __m256d md_t; /* per f64 lane: all ones (true) or zero */

/* ------------------------------------------------------------------------- */
/* f32 lanes                                                                  */

static inline vf_t s_vf_load(const float *p) { return _mm256_loadu_ps(p); }
static inline void s_vf_store(float *p, vf_t v) { _mm256_storeu_ps(p, v); }
static inline vf_t s_vf_set1(float x) { return _mm256_set1_ps(x); }
static inline vf_t s_vf_add(vf_t a, vf_t b) { return _mm256_add_ps(a, b); }
static inline vf_t s_vf_sub(vf_t a, vf_t b) { return _mm256_sub_ps(a, b); }
static inline vf_t s_vf_mul(vf_t a, vf_t b) { return _mm256_mul_ps(a, b); }
static inline vf_t s_vf_div(vf_t a, vf_t b) { return _mm256_div_ps(a, b); }
/* a * b + c, a * b - c and c - a * b, each rounded once. */
static inline vf_t s_vf_fmadd(vf_t a, vf_t b, vf_t c) { return _mm256_fmadd_ps(a, b, c); }
static inline vf_t s_vf_fmsub(vf_t a, vf_t b, vf_t c) { return _mm256_fmsub_ps(a, b, c); }
static inline vf_t s_vf_fnmadd(vf_t a, vf_t b, vf_t c) { return _mm256_fnmadd_ps(a, b, c); }
/* (V)MINPS and (V)MAXPS return the second operand when either one is a NaN. */
static inline vf_t s_vf_min(vf_t a, vf_t b) { return _mm256_min_ps(a, b); }
static inline vf_t s_vf_max(vf_t a, vf_t b) { return _mm256_max_ps(a, b); }
static inline vf_t s_vf_abs(vf_t a) { return _mm256_andnot_ps(_mm256_set1_ps(-0.0f), a); }
static inline vf_t s_vf_neg(vf_t a) { return _mm256_xor_ps(a, _mm256_set1_ps(-0.0f)); }
/* Ordered, non-signalling compares: false when either operand is a NaN. */
static inline mf_t s_vf_gt(vf_t a, vf_t b) { return _mm256_cmp_ps(a, b, _CMP_GT_OQ); }
static inline mf_t s_vf_lt(vf_t a, vf_t b) { return _mm256_cmp_ps(a, b, _CMP_LT_OQ); }
static inline mf_t s_vf_isnan(vf_t a) { return _mm256_cmp_ps(a, a, _CMP_UNORD_Q); }
/* Per lane: m ? t : f. */
static inline vf_t s_vf_select(mf_t m, vf_t t, vf_t f) { return _mm256_blendv_ps(f, t, m); }
static inline int s_mf_any(mf_t m) { return _mm256_movemask_ps(m) != 0; }

/* All ones in lanes [0, r) and zero above, for 0 <= r <= 8. */
static inline __m256i s_lanes_below(int r)
{
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(r), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

/* Lanes [0, r) from p and fill above. Reads no memory past p + r. */
static inline vf_t s_vf_load_part(const float *p, int r, float fill)
{
    __m256i k = s_lanes_below(r);
    return _mm256_blendv_ps(_mm256_set1_ps(fill), _mm256_maskload_ps(p, k),
                            _mm256_castsi256_ps(k));
}

/* Lanes [0, r) to p. Writes no memory past p + r. */
static inline void s_vf_store_part(float *p, vf_t v, int r)
{
    _mm256_maskstore_ps(p, s_lanes_below(r), v);
}

/* Split 16 floats (c0, s0, c1, s1, ...) into (c0 .. c7) and (s0 .. s7). */
static inline void s_vf_load_pairs(const float *p, vf_t *even, vf_t *odd)
{
    __m256 a = _mm256_loadu_ps(p), b = _mm256_loadu_ps(p + 8);
    /* Within each 128-bit half: a0 a2 b0 b2 | a4 a6 b4 b6, so the 64-bit pairs come out
     * as (c0 c1) (c4 c5) (c2 c3) (c6 c7) and the permute puts them in order. */
    __m256 e = _mm256_shuffle_ps(a, b, _MM_SHUFFLE(2, 0, 2, 0));
    __m256 o = _mm256_shuffle_ps(a, b, _MM_SHUFFLE(3, 1, 3, 1));
    *even = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(e), _MM_SHUFFLE(3, 1, 2, 0)));
    *odd = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(o), _MM_SHUFFLE(3, 1, 2, 0)));
}

/* ------------------------------------------------------------------------- */
/* Integer lanes                                                              */

static inline vi_t s_vi_load(const void *p) { return _mm256_loadu_si256((const __m256i *)p); }
static inline void s_vi_store(void *p, vi_t v) { _mm256_storeu_si256((__m256i *)p, v); }
static inline vi_t s_vf_bits(vf_t v) { return _mm256_castps_si256(v); }
static inline vf_t s_vf_from_bits(vi_t v) { return _mm256_castsi256_ps(v); }
static inline vi_t s_vi_and(vi_t a, vi_t b) { return _mm256_and_si256(a, b); }
static inline vi_t s_vi_or(vi_t a, vi_t b) { return _mm256_or_si256(a, b); }
static inline vi_t s_vi_xor(vi_t a, vi_t b) { return _mm256_xor_si256(a, b); }

static inline vi_t s_vi_set1_32(int32_t x) { return _mm256_set1_epi32(x); }
static inline vi_t s_vi_add32(vi_t a, vi_t b) { return _mm256_add_epi32(a, b); }
static inline vi_t s_vi_slli32(vi_t a, int n) { return _mm256_slli_epi32(a, n); }
static inline vi_t s_vi_srli32(vi_t a, int n) { return _mm256_srli_epi32(a, n); }
static inline mf_t s_vi_gt32(vi_t a, vi_t b) { return _mm256_castsi256_ps(_mm256_cmpgt_epi32(a, b)); }
static inline vi_t s_vi_select32(mf_t m, vi_t t, vi_t f)
{
    return _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(f), _mm256_castsi256_ps(t), m));
}

/* 8 uint16 widened to 8 int32 lanes. */
static inline vi_t s_vi_load_u16(const uint16_t *p)
{
    return _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p));
}

/* 8 int32 lanes holding values in [0, 65535] narrowed to 8 uint16. */
static inline void s_vi_store_u16(uint16_t *p, vi_t v)
{
    /* packus works within 128-bit halves (v0-3 v0-3 | v4-7 v4-7), so keep 64-bit parts
     * 0 and 2. */
    __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(v, v), _MM_SHUFFLE(3, 1, 2, 0));
    _mm_storeu_si128((__m128i *)p, _mm256_castsi256_si128(packed));
}

static inline vi_t s_vi_set1_64(uint64_t x) { return _mm256_set1_epi64x((long long)x); }
static inline vi_t s_vi_add64(vi_t a, vi_t b) { return _mm256_add_epi64(a, b); }
static inline vi_t s_vi_slli64(vi_t a, int n) { return _mm256_slli_epi64(a, n); }
static inline vi_t s_vi_srli64(vi_t a, int n) { return _mm256_srli_epi64(a, n); }

/* a * c mod 2^64 per 64-bit lane. AVX2 multiplies only 32 x 32 -> 64 bits, so this is
 * lo(a) lo(c) + ((hi(a) lo(c) + lo(a) hi(c)) << 32). The term hi(a) hi(c) is a multiple
 * of 2^64 and drops out. */
static inline vi_t s_vi_mullo64(vi_t a, uint64_t c)
{
    __m256i c_lo = _mm256_set1_epi64x((long long)(c & 0xffffffffu));
    __m256i c_hi = _mm256_set1_epi64x((long long)(c >> 32));
    __m256i lo_lo = _mm256_mul_epu32(a, c_lo);
    __m256i cross = _mm256_add_epi64(_mm256_mul_epu32(_mm256_srli_epi64(a, 32), c_lo),
                                     _mm256_mul_epu32(a, c_hi));
    return _mm256_add_epi64(lo_lo, _mm256_slli_epi64(cross, 32));
}

/* ------------------------------------------------------------------------- */
/* f64 lanes                                                                  */

static inline vd_t s_vd_load(const double *p) { return _mm256_loadu_pd(p); }
static inline void s_vd_store(double *p, vd_t v) { _mm256_storeu_pd(p, v); }
static inline vd_t s_vd_set1(double x) { return _mm256_set1_pd(x); }
static inline vd_t s_vd_add(vd_t a, vd_t b) { return _mm256_add_pd(a, b); }
static inline vd_t s_vd_sub(vd_t a, vd_t b) { return _mm256_sub_pd(a, b); }
static inline vd_t s_vd_mul(vd_t a, vd_t b) { return _mm256_mul_pd(a, b); }
static inline vd_t s_vd_div(vd_t a, vd_t b) { return _mm256_div_pd(a, b); }
static inline vd_t s_vd_fmadd(vd_t a, vd_t b, vd_t c) { return _mm256_fmadd_pd(a, b, c); }
static inline vd_t s_vd_fnmadd(vd_t a, vd_t b, vd_t c) { return _mm256_fnmadd_pd(a, b, c); }
static inline vd_t s_vd_min(vd_t a, vd_t b) { return _mm256_min_pd(a, b); }
static inline vd_t s_vd_max(vd_t a, vd_t b) { return _mm256_max_pd(a, b); }
static inline vd_t s_vd_neg(vd_t a) { return _mm256_xor_pd(a, _mm256_set1_pd(-0.0)); }
static inline md_t s_vd_gt(vd_t a, vd_t b) { return _mm256_cmp_pd(a, b, _CMP_GT_OQ); }
static inline md_t s_vd_lt(vd_t a, vd_t b) { return _mm256_cmp_pd(a, b, _CMP_LT_OQ); }
static inline md_t s_vd_eq(vd_t a, vd_t b) { return _mm256_cmp_pd(a, b, _CMP_EQ_OQ); }
static inline md_t s_vd_isnan(vd_t a) { return _mm256_cmp_pd(a, a, _CMP_UNORD_Q); }
static inline vd_t s_vd_select(md_t m, vd_t t, vd_t f) { return _mm256_blendv_pd(f, t, m); }
static inline vi_t s_vd_bits(vd_t v) { return _mm256_castpd_si256(v); }
static inline vd_t s_vd_from_bits(vi_t v) { return _mm256_castsi256_pd(v); }

/* f32 lanes [0, 4) and [4, 8) widened to f64 (exact). */
static inline vd_t s_vd_lo(vf_t v) { return _mm256_cvtps_pd(_mm256_castps256_ps128(v)); }
static inline vd_t s_vd_hi(vf_t v) { return _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1)); }

/* 4 floats from p widened to f64. */
static inline vd_t s_vd_load_f32(const float *p) { return _mm256_cvtps_pd(_mm_loadu_ps(p)); }

/* Floats [0, r) from p widened to f64, and fill above. Reads no memory past p + r. */
static inline vd_t s_vd_load_f32_part(const float *p, int r, float fill)
{
    __m128i k = _mm_cmpgt_epi32(_mm_set1_epi32(r), _mm_setr_epi32(0, 1, 2, 3));
    __m128 v = _mm_blendv_ps(_mm_set1_ps(fill), _mm_maskload_ps(p, k), _mm_castsi128_ps(k));
    return _mm256_cvtps_pd(v);
}

#include "simd_x86.h"

const um_kernel_table_t um_kernels_avx2_table = {
    .isa = "avx2",
    .rmsnorm = um_k_rmsnorm_avx2,
    .layernorm = um_k_layernorm_avx2,
    .rope = um_k_rope_avx2,
    .softmax = um_k_softmax_avx2,
    .silu_mul = um_k_silu_mul_avx2,
    .gelu_erf = um_k_gelu_erf_avx2,
    .gelu_tanh = um_k_gelu_tanh_avx2,
    .add = um_k_add_avx2,
    .bf16_to_f32 = um_k_bf16_to_f32_avx2,
    .f32_to_bf16 = um_k_f32_to_bf16_avx2,
    .argmax = um_k_argmax_avx2,
    .logsumexp = um_k_logsumexp_avx2,
    .vocab_stats = um_k_vocab_stats_avx2,
    .gumbel_argmax = um_k_gumbel_argmax_avx2,
    .quantize_s8 = um_k_quantize_s8_avx2,
};
