/*
 * AVX-512 kernels: 16 f32 or 8 f64 lanes in 512-bit registers, with mask registers for
 * compares, selects and ragged tails. This file defines the vector layer that simd_x86.h
 * is written against and then includes it, so the kernels themselves are shared with the
 * AVX2 build. It is compiled with -mavx512f -mavx512dq -mavx512bw -mavx512vl -mfma. The
 * dispatcher calls it only after the CPU probe has found F, DQ, BW and VL and the OS's
 * ZMM and opmask state. The AMX ISA uses this table too.
 *
 * Instructions beyond AVX512F: VPMULLQ, VEXTRACTF32X8 and the 512-bit VANDNPS, VXORPS
 * and VXORPD (DQ), and the 256-bit masked load (VL). Compares use the same predicates as
 * the AVX2 layer, and VMINPS and VMAXPS keep the legacy rule of returning the second
 * operand when either one is a NaN.
 *
 * Threading: pure functions of their arguments; any number of threads may call them.
 */
#include <immintrin.h>

#include "kernels.h"

#define UM_X86_W 16 /* f32 lanes */
#define UM_X86_WD 8 /* f64 lanes */
#define UM_X86_FN(op) um_k_##op##_avx512

typedef __m512 vf_t;    /* 16 x f32 */
typedef __m512d vd_t;   /* 8 x f64 */
typedef __m512i vi_t;   /* 16 x i32 or 8 x i64 */
typedef __mmask16 mf_t; /* bit l: f32 lane l */
typedef __mmask8 md_t;  /* bit l: f64 lane l */

/* Mask of lanes [0, r), 0 <= r <= 16. */
static inline __mmask16 s_lanes_below(int r)
{
    return (__mmask16)((1u << r) - 1u);
}

/* ------------------------------------------------------------------------- */
/* f32 lanes                                                                  */

static inline vf_t s_vf_load(const float *p) { return _mm512_loadu_ps(p); }
static inline void s_vf_store(float *p, vf_t v) { _mm512_storeu_ps(p, v); }
static inline vf_t s_vf_set1(float x) { return _mm512_set1_ps(x); }
static inline vf_t s_vf_add(vf_t a, vf_t b) { return _mm512_add_ps(a, b); }
static inline vf_t s_vf_sub(vf_t a, vf_t b) { return _mm512_sub_ps(a, b); }
static inline vf_t s_vf_mul(vf_t a, vf_t b) { return _mm512_mul_ps(a, b); }
static inline vf_t s_vf_div(vf_t a, vf_t b) { return _mm512_div_ps(a, b); }
/* a * b + c, a * b - c and c - a * b, each rounded once. */
static inline vf_t s_vf_fmadd(vf_t a, vf_t b, vf_t c) { return _mm512_fmadd_ps(a, b, c); }
static inline vf_t s_vf_fmsub(vf_t a, vf_t b, vf_t c) { return _mm512_fmsub_ps(a, b, c); }
static inline vf_t s_vf_fnmadd(vf_t a, vf_t b, vf_t c) { return _mm512_fnmadd_ps(a, b, c); }
/* VMINPS and VMAXPS return the second operand when either one is a NaN. */
static inline vf_t s_vf_min(vf_t a, vf_t b) { return _mm512_min_ps(a, b); }
static inline vf_t s_vf_max(vf_t a, vf_t b) { return _mm512_max_ps(a, b); }
static inline vf_t s_vf_abs(vf_t a) { return _mm512_andnot_ps(_mm512_set1_ps(-0.0f), a); }
static inline vf_t s_vf_neg(vf_t a) { return _mm512_xor_ps(a, _mm512_set1_ps(-0.0f)); }
/* Ordered, non-signalling compares: false when either operand is a NaN. */
static inline mf_t s_vf_gt(vf_t a, vf_t b) { return _mm512_cmp_ps_mask(a, b, _CMP_GT_OQ); }
static inline mf_t s_vf_lt(vf_t a, vf_t b) { return _mm512_cmp_ps_mask(a, b, _CMP_LT_OQ); }
static inline mf_t s_vf_isnan(vf_t a) { return _mm512_cmp_ps_mask(a, a, _CMP_UNORD_Q); }
/* Per lane: m ? t : f. VBLENDMPS takes its second source where the mask bit is set. */
static inline vf_t s_vf_select(mf_t m, vf_t t, vf_t f) { return _mm512_mask_blend_ps(m, f, t); }
static inline int s_mf_any(mf_t m) { return m != 0; }

/* Lanes [0, r) from p, fill above. Masked-off lanes are not read and cannot fault. */
static inline vf_t s_vf_load_part(const float *p, int r, float fill)
{
    return _mm512_mask_loadu_ps(_mm512_set1_ps(fill), s_lanes_below(r), p);
}

/* Lanes [0, r) to p. Masked-off lanes are not written. */
static inline void s_vf_store_part(float *p, vf_t v, int r)
{
    _mm512_mask_storeu_ps(p, s_lanes_below(r), v);
}

/* Split 32 floats (c0, s0, c1, s1, ...) into (c0 .. c15) and (s0 .. s15). */
static inline void s_vf_load_pairs(const float *p, vf_t *even, vf_t *odd)
{
    /* VPERMT2PS index: bits 3:0 pick the element, bit 4 picks the second table (b). */
    static const int32_t even_idx[16] = {0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30};
    static const int32_t odd_idx[16] = {1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31};
    __m512 a = _mm512_loadu_ps(p), b = _mm512_loadu_ps(p + 16);
    *even = _mm512_permutex2var_ps(a, _mm512_loadu_si512(even_idx), b);
    *odd = _mm512_permutex2var_ps(a, _mm512_loadu_si512(odd_idx), b);
}

/* ------------------------------------------------------------------------- */
/* Integer lanes                                                              */

static inline vi_t s_vi_load(const void *p) { return _mm512_loadu_si512(p); }
static inline void s_vi_store(void *p, vi_t v) { _mm512_storeu_si512(p, v); }
static inline vi_t s_vf_bits(vf_t v) { return _mm512_castps_si512(v); }
static inline vf_t s_vf_from_bits(vi_t v) { return _mm512_castsi512_ps(v); }
static inline vi_t s_vi_and(vi_t a, vi_t b) { return _mm512_and_si512(a, b); }
static inline vi_t s_vi_or(vi_t a, vi_t b) { return _mm512_or_si512(a, b); }
static inline vi_t s_vi_xor(vi_t a, vi_t b) { return _mm512_xor_si512(a, b); }

static inline vi_t s_vi_set1_32(int32_t x) { return _mm512_set1_epi32(x); }
static inline vi_t s_vi_add32(vi_t a, vi_t b) { return _mm512_add_epi32(a, b); }
static inline vi_t s_vi_slli32(vi_t a, int n) { return _mm512_slli_epi32(a, (unsigned)n); }
static inline vi_t s_vi_srli32(vi_t a, int n) { return _mm512_srli_epi32(a, (unsigned)n); }
static inline mf_t s_vi_gt32(vi_t a, vi_t b) { return _mm512_cmpgt_epi32_mask(a, b); }
static inline vi_t s_vi_select32(mf_t m, vi_t t, vi_t f) { return _mm512_mask_blend_epi32(m, f, t); }

/* 16 uint16 widened to 16 int32 lanes. */
static inline vi_t s_vi_load_u16(const uint16_t *p)
{
    return _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p));
}

/* 16 int32 lanes holding values in [0, 65535] narrowed to 16 uint16 (VPMOVDW truncates,
 * which keeps such values as they are). */
static inline void s_vi_store_u16(uint16_t *p, vi_t v)
{
    _mm256_storeu_si256((__m256i *)p, _mm512_cvtepi32_epi16(v));
}

static inline vi_t s_vi_set1_64(uint64_t x) { return _mm512_set1_epi64((long long)x); }
static inline vi_t s_vi_add64(vi_t a, vi_t b) { return _mm512_add_epi64(a, b); }
static inline vi_t s_vi_slli64(vi_t a, int n) { return _mm512_slli_epi64(a, (unsigned)n); }
static inline vi_t s_vi_srli64(vi_t a, int n) { return _mm512_srli_epi64(a, (unsigned)n); }

/* a * c mod 2^64 per 64-bit lane (VPMULLQ keeps the low 64 bits of the product). */
static inline vi_t s_vi_mullo64(vi_t a, uint64_t c)
{
    return _mm512_mullo_epi64(a, _mm512_set1_epi64((long long)c));
}

/* ------------------------------------------------------------------------- */
/* f64 lanes                                                                  */

static inline vd_t s_vd_load(const double *p) { return _mm512_loadu_pd(p); }
static inline void s_vd_store(double *p, vd_t v) { _mm512_storeu_pd(p, v); }
static inline vd_t s_vd_set1(double x) { return _mm512_set1_pd(x); }
static inline vd_t s_vd_add(vd_t a, vd_t b) { return _mm512_add_pd(a, b); }
static inline vd_t s_vd_sub(vd_t a, vd_t b) { return _mm512_sub_pd(a, b); }
static inline vd_t s_vd_mul(vd_t a, vd_t b) { return _mm512_mul_pd(a, b); }
static inline vd_t s_vd_div(vd_t a, vd_t b) { return _mm512_div_pd(a, b); }
static inline vd_t s_vd_fmadd(vd_t a, vd_t b, vd_t c) { return _mm512_fmadd_pd(a, b, c); }
static inline vd_t s_vd_fnmadd(vd_t a, vd_t b, vd_t c) { return _mm512_fnmadd_pd(a, b, c); }
static inline vd_t s_vd_min(vd_t a, vd_t b) { return _mm512_min_pd(a, b); }
static inline vd_t s_vd_max(vd_t a, vd_t b) { return _mm512_max_pd(a, b); }
static inline vd_t s_vd_neg(vd_t a) { return _mm512_xor_pd(a, _mm512_set1_pd(-0.0)); }
static inline md_t s_vd_gt(vd_t a, vd_t b) { return _mm512_cmp_pd_mask(a, b, _CMP_GT_OQ); }
static inline md_t s_vd_lt(vd_t a, vd_t b) { return _mm512_cmp_pd_mask(a, b, _CMP_LT_OQ); }
static inline md_t s_vd_eq(vd_t a, vd_t b) { return _mm512_cmp_pd_mask(a, b, _CMP_EQ_OQ); }
static inline md_t s_vd_isnan(vd_t a) { return _mm512_cmp_pd_mask(a, a, _CMP_UNORD_Q); }
static inline vd_t s_vd_select(md_t m, vd_t t, vd_t f) { return _mm512_mask_blend_pd(m, f, t); }
static inline vi_t s_vd_bits(vd_t v) { return _mm512_castpd_si512(v); }
static inline vd_t s_vd_from_bits(vi_t v) { return _mm512_castsi512_pd(v); }

/* f32 lanes [0, 8) and [8, 16) widened to f64 (exact). */
static inline vd_t s_vd_lo(vf_t v) { return _mm512_cvtps_pd(_mm512_castps512_ps256(v)); }
static inline vd_t s_vd_hi(vf_t v) { return _mm512_cvtps_pd(_mm512_extractf32x8_ps(v, 1)); }

/* 8 floats from p widened to f64. */
static inline vd_t s_vd_load_f32(const float *p) { return _mm512_cvtps_pd(_mm256_loadu_ps(p)); }

/* Floats [0, r) from p widened to f64, and fill above. Masked-off lanes are not read. */
static inline vd_t s_vd_load_f32_part(const float *p, int r, float fill)
{
    __mmask8 k = (__mmask8)s_lanes_below(r);
    return _mm512_cvtps_pd(_mm256_mask_loadu_ps(_mm256_set1_ps(fill), k, p));
}

#include "simd_x86.h"

const um_kernel_table_t um_kernels_avx512_table = {
    .isa = "avx512",
    .rmsnorm = um_k_rmsnorm_avx512,
    .layernorm = um_k_layernorm_avx512,
    .rope = um_k_rope_avx512,
    .softmax = um_k_softmax_avx512,
    .silu_mul = um_k_silu_mul_avx512,
    .gelu_erf = um_k_gelu_erf_avx512,
    .gelu_tanh = um_k_gelu_tanh_avx512,
    .add = um_k_add_avx512,
    .bf16_to_f32 = um_k_bf16_to_f32_avx512,
    .f32_to_bf16 = um_k_f32_to_bf16_avx512,
    .argmax = um_k_argmax_avx512,
    .logsumexp = um_k_logsumexp_avx512,
    .vocab_stats = um_k_vocab_stats_avx512,
    .gumbel_argmax = um_k_gumbel_argmax_avx512,
    .quantize_s8 = um_k_quantize_s8_avx512,
};
