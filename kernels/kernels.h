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

/* ------------------------------------------------------------------------- */
/* Element-wise and row kernels (scalar reference versions)                   */

/* RMSNorm of one row: out = x / sqrt(mean(x^2) + eps) * w, accumulated in f32. */
void um_k_rmsnorm_ref(float *out, const float *x, const float *w, int32_t n, float eps);

/*
 * LayerNorm of one row (BERT family): out = (x - mean) / sqrt(var + eps) * w + b, with the
 * biased variance mean((x - mean)^2), both accumulated in f32. b may be NULL (no bias).
 */
void um_k_layernorm_ref(float *out, const float *x, const float *w, const float *b, int32_t n,
                        float eps);

/*
 * NeoX rotate-half RoPE in place on one head vector of head_dim floats at position pos:
 * for i < head_dim/2, (a, b) = (x[i], x[i + half]) becomes (a cos - b sin, b cos + a sin)
 * with angle pos * inv_freq[i]. cos_sin contains (cos, sin) pairs for this position.
 */
void um_k_rope_ref(float *x, const float *cos_sin, int32_t head_dim);

/* Numerically stable softmax of one row in place (subtracts the max, f32). */
void um_k_softmax_ref(float *x, int32_t n);

/* SwiGLU: out[i] = silu(gate[i]) * up[i]. out may alias gate or up. */
void um_k_silu_mul_ref(float *out, const float *gate, const float *up, int32_t n);

/* GELU, erf form: out[i] = x/2 * (1 + erf(x / sqrt(2))). out may alias x. */
void um_k_gelu_erf_ref(float *out, const float *x, int32_t n);

/* GELU, tanh form: out[i] = x/2 * (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))). */
void um_k_gelu_tanh_ref(float *out, const float *x, int32_t n);

/* out[i] += x[i]. */
void um_k_add_ref(float *out, const float *x, int32_t n);

/* Widen n bf16 values (upper halves of f32) to f32; exact. */
void um_k_bf16_to_f32_ref(float *out, const uint16_t *in, size_t n);

/* Narrow n f32 values to bf16, rounding to nearest even; NaN stays a quiet NaN. */
void um_k_f32_to_bf16_ref(uint16_t *out, const float *in, size_t n);

/*
 * Symmetric int8 quantisation of one row of n values: scale = max_i |x[i]| / levels in
 * f32, and q[i] = x[i] / scale (an f32 division) rounded to nearest even and clamped to
 * [-levels, levels], for 1 <= levels <= 127. Returns the scale; an all-zero row gets
 * scale 0 and q = 0. The max skips NaN entries, and a NaN entry becomes -levels. SIMD
 * versions give the same bits.
 */
float um_k_quantize_s8_ref(int8_t *q, const float *x, int32_t n, int32_t levels);

/* ------------------------------------------------------------------------- */
/* Vocabulary reductions: one pass over a row of logits                       */

/* Index of the maximum of a row; ties go to the lowest index. */
int32_t um_k_argmax_ref(const float *x, int32_t n);

/* log(sum(exp(x))) of a row, accumulated in float64. */
double um_k_logsumexp_ref(const float *x, int32_t n);

/*
 * What the remasking policies read from one position's distribution p = softmax(scale * x).
 * Entries of x may be -inf (banned tokens: they get probability 0). For a row of only
 * -inf values: argmax 0, max and lse -inf, and p_max, margin and entropy 0.
 */
typedef struct um_vocab_stats {
    float max;      /* largest value of scale * x */
    int32_t argmax; /* its index; ties go to the lowest index */
    float second;   /* second largest value of scale * x (equal to max on a tie) */
    double lse;     /* log(sum(exp(scale * x))) */
    double p_max;   /* probability of argmax: exp(max - lse) */
    double margin;  /* top-2 margin: p_max - exp(second - lse) */
    double entropy; /* -sum p log p in nats */
} um_vocab_stats_t;

/*
 * All of um_vocab_stats_t in one pass over n > 0 values with scale > 0 (1 / temperature).
 * The reference accumulates in float64; SIMD versions may accumulate in f32 lanes and
 * combine the lanes in float64.
 */
void um_k_vocab_stats_ref(const float *x, int32_t n, float scale, um_vocab_stats_t *out);

/*
 * Gumbel-max sampling in float64: the index i maximising x[i] / temperature - log(-log u_i),
 * which draws from softmax(x / temperature), with u_i = um_rng_uniform_key(key, base + i)
 * (rng.h), so the noise is a pure function of (key, base + i). temperature > 0; -inf
 * entries are never chosen unless the whole row is -inf (then 0). Ties go to the lowest
 * index. This picks the same token as LLaDA's exp(x) / (-log u)^T without overflowing exp.
 */
int32_t um_k_gumbel_argmax_ref(const float *x, int32_t n, double temperature, uint64_t key,
                               uint64_t base);

/* ------------------------------------------------------------------------- */
/* The kernel table and ISA dispatch                                          */

/* Instruction sets, ordered so that a larger value needs more of an x86 host. */
typedef enum um_isa {
    UM_ISA_SCALAR = 0,
    UM_ISA_AVX2,   /* x86-64 AVX2 + FMA */
    UM_ISA_AVX512, /* x86-64 AVX-512 F, BW, DQ, VL */
    UM_ISA_AMX,    /* AVX-512 kernels, bf16 matrix products on AMX tiles */
    UM_ISA_NEON,   /* aarch64 Advanced SIMD */
    UM_ISA_COUNT
} um_isa_t;

/* Table of the kernels for one ISA. */
typedef struct um_kernel_table {
    const char *isa; /* "scalar", "avx2", "avx512", "neon" (the AMX ISA uses "avx512") */
    void (*rmsnorm)(float *, const float *, const float *, int32_t, float);
    void (*layernorm)(float *, const float *, const float *, const float *, int32_t, float);
    void (*rope)(float *, const float *, int32_t);
    void (*softmax)(float *, int32_t);
    void (*silu_mul)(float *, const float *, const float *, int32_t);
    void (*gelu_erf)(float *, const float *, int32_t);
    void (*gelu_tanh)(float *, const float *, int32_t);
    void (*add)(float *, const float *, int32_t);
    void (*bf16_to_f32)(float *, const uint16_t *, size_t);
    void (*f32_to_bf16)(uint16_t *, const float *, size_t);
    int32_t (*argmax)(const float *, int32_t);
    double (*logsumexp)(const float *, int32_t);
    void (*vocab_stats)(const float *, int32_t, float, um_vocab_stats_t *);
    int32_t (*gumbel_argmax)(const float *, int32_t, double, uint64_t, uint64_t);
    float (*quantize_s8)(int8_t *, const float *, int32_t, int32_t);
} um_kernel_table_t;

/* "scalar", "avx2", "avx512", "amx", "neon"; NULL for a value outside um_isa_t. */
const char *um_isa_name(um_isa_t isa);

/* Parse an ISA name as above; returns 0 and sets *out, or UM_EINVAL. */
int um_isa_parse(const char *name, um_isa_t *out);

/*
 * Whether this host can run isa: the CPU reports the instructions (cpuid on x86,
 * getauxval(AT_HWCAP) on aarch64), the OS enables their register state (XCR0, and the
 * AMX permission request on Linux), and this build contains the kernels. When it
 * cannot, why (if not NULL) receives a sentence saying what is missing.
 */
int um_isa_supported(um_isa_t isa, char *why, size_t whylen);

/*
 * Select the kernels once, at startup, before any forward pass. cap is the highest ISA
 * allowed (NULL: the environment variable UNMASKD_ISA, else no cap); the best ISA the
 * host supports up to cap is chosen. Returns 0, or UM_EINVAL for an unknown name or a
 * cap this host cannot run, with a message in err naming the value and the fix. The
 * choice and its reason are logged at info and kept for um_kernels_reason().
 */
int um_kernels_select(const char *cap, char *err, size_t errlen);

/* The selected ISA (the best supported one when um_kernels_select was never called). */
um_isa_t um_kernels_isa(void);

/* One sentence saying why the selected ISA was chosen, e.g. "best ISA of this host". */
const char *um_kernels_reason(void);

/* The table chosen at startup. */
const um_kernel_table_t *um_kernels(void);

/* The scalar reference table, which tests compare every other table with. */
const um_kernel_table_t *um_kernels_scalar(void);

/* The table for isa, or NULL when the host cannot run it; tests loop over these. */
const um_kernel_table_t *um_kernels_for(um_isa_t isa);

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

/* ------------------------------------------------------------------------- */
/* Weight products: y = x W^T with W prepared once at load                    */

/* Storage type of a prepared weight matrix; activations are always f32 at the API. */
typedef enum um_wdtype {
    UM_WDTYPE_F32 = 1,
    /* bf16 weights. With native bf16 the activations are rounded to bf16 too and the
     * products accumulate in f32. Without it the weights are widened, so the product is f32. */
    UM_WDTYPE_BF16 = 2,
    /* int8 weights, quantised at load per output channel (row of W): scale_n =
     * max_k |W[n, k]| / 127 and q = um_k_quantize_s8_ref of the row. The product either
     * quantises the activations per row and multiplies integers in oneDNN, or widens the
     * int8 weights to f32 inside the product (um_gemm_int8_path reports which). */
    UM_WDTYPE_INT8 = 3,
} um_wdtype_t;

/* "f32", "bf16", "int8"; NULL for a value outside um_wdtype_t. */
const char *um_wdtype_name(um_wdtype_t dtype);

/* Parse "f32", "bf16" or "int8" (and "auto" as 0); returns 0 and sets *out, or UM_EINVAL. */
int um_wdtype_parse(const char *name, um_wdtype_t *out);

/*
 * A weight matrix W [N, K] (nn.Linear layout) in the layout the matmul primitive
 * prefers on this host (possibly blocked), in f32 or bf16.
 */
typedef struct um_gemm_weight um_gemm_weight_t;

/*
 * Prepare W from src, N rows of K contiguous values, f32 (src_bf16 == 0) or bf16
 * (src_bf16 != 0). The data is reordered once into the primitive's preferred layout
 * and dtype; when that layout and dtype are those of src, the weight borrows src, which
 * must then outlive it (um_gemm_weight_borrows reports which). An int8 weight is
 * quantised first and never borrows. Returns 0 and sets *out, UM_EINVAL for a bad size
 * (int8: K above UM_GEMM_INT8_MAX_K) or NULL src, UM_ENOMEM, or UM_EBACKEND.
 */
int um_gemm_weight_new(int32_t N, int32_t K, const void *src, int src_bf16, um_wdtype_t dtype,
                       um_gemm_weight_t **out);

/* Free the weight (not a borrowed source) and set *w to NULL; NULL is ignored. */
void um_gemm_weight_destroy(um_gemm_weight_t **w);

/* Whether the weight points into the caller's src instead of its own copy. */
int um_gemm_weight_borrows(const um_gemm_weight_t *w);

/* Bytes of the weight's own copy (0 when it borrows). */
size_t um_gemm_weight_bytes(const um_gemm_weight_t *w);

/*
 * C[M, N] = A[M, K] W^T (+ C when accumulate). A and C are f32 row-major with row
 * strides lda and ldc. For a bf16 weight A is rounded to bf16 (nearest even) first and
 * the products are accumulated in f32. For an int8 weight on the oneDNN path each row
 * of A is quantised as um_k_quantize_s8_ref does at um_gemm_int8_levels() levels, the
 * integer products are summed exactly in s32, and C = a_scale[m] * (w_scale[n] * sum).
 * Primitives are cached per (dtype, M, N, K, strides, accumulate). Thread-safe.
 * Returns 0, UM_EINVAL, UM_ENOMEM or UM_EBACKEND.
 */
int um_gemm_weight_apply(const um_gemm_weight_t *w, int32_t M, const float *A, int32_t lda,
                         float *C, int32_t ldc, int accumulate);

/*
 * Whether oneDNN runs bf16 products natively on this host (AVX512-BF16 or AMX, within
 * the ISA cap). Without it a bf16 weight is widened to f32 panel by panel inside each
 * product: half the memory of f32, the same arithmetic as f32 on the widened values.
 */
int um_gemm_bf16_native(void);

/* Largest K of an int8 weight: K * 255 * 127 stays below 2^31 in the s32 sums. */
#define UM_GEMM_INT8_MAX_K 65536

/* How int8 weights are multiplied. */
typedef enum um_int8_path {
    UM_INT8_ONEDNN = 1,  /* u8 activations times s8 weights in oneDNN, s32 sums */
    UM_INT8_DEQUANT = 2, /* weights widened to f32 panel by panel, f32 activations */
} um_int8_path_t;

/*
 * Choose how int8 weights prepared from now on are multiplied: "onednn", "dequant", or
 * "auto" (NULL: the environment variable UNMASKD_INT8_GEMM, else auto). Auto takes
 * oneDNN when its int8 matmul is JIT-compiled on this host and dequant when oneDNN
 * would run its reference loops. The choice is logged at info. Returns 0, or UM_EINVAL
 * with a message in err for an unknown name, or UM_EBACKEND.
 */
int um_gemm_int8_select(const char *name, char *err, size_t errlen);

/* The path int8 weights get now (selecting auto on first use), and one line saying
 * why, e.g. "onednn u8 x s8 matmul (gemm:jit), activations quantised per row to 63
 * levels each side of 0: no VNNI within the ISA cap, ...". */
um_int8_path_t um_gemm_int8_path(void);
const char *um_gemm_int8_reason(void);

/*
 * Levels of the activations on the oneDNN int8 path: 127 where oneDNN multiplies with
 * VNNI (AVX512-VNNI, AVX-VNNI, AMX) or outside x86, else 63. Without VNNI, oneDNN's x86
 * kernels sum pairs of u8 * s8 products in int16 (vpmaddubsw), which saturates once
 * a pair passes 32767. The u8 activation is q + levels + 1, so at 63 levels a pair is
 * at most 2 * 127 * 127 = 32258 and every sum stays exact.
 */
int32_t um_gemm_int8_levels(void);

/*
 * Cap the instruction set oneDNN may use, to match the kernel ISA selection. Must run
 * before the first product; um_kernels_select calls it. Returns 0 or UM_EBACKEND.
 */
int um_gemm_set_max_isa(um_isa_t isa);

/* "onednn X.Y.Z" */
const char *um_gemm_backend(void);

/*
 * libxsmm, where the build has it (UM_HAVE_LIBXSMM): a column-major product
 * C[m, n] = A[m, k] B[k, n] with leading dimensions lda, ldb, ldc, JIT-compiled once per
 * shape. Returns NULL when libxsmm has no kernel for the shape.
 */
typedef void (*um_xsmm_kernel_t)(const float *a, const float *b, float *c);
um_xsmm_kernel_t um_xsmm_dispatch(int32_t m, int32_t n, int32_t k, int32_t lda, int32_t ldb,
                                  int32_t ldc);
const char *um_xsmm_version(void);

/* ------------------------------------------------------------------------- */
/* Attention                                                                  */

/* Query rows one attention task covers; a task's score tile is this many rows of L. */
#define UM_ATTENTION_TILE 64

/*
 * Shapes of a bidirectional multi-head attention over n_seq sequences of seq_len keys.
 * Each sequence has q_len query rows (0 means seq_len), so a block cache can send a
 * window of queries against every key of the sequence.
 */
typedef struct um_attention_shape {
    int32_t n_seq, seq_len;
    int32_t q_len; /* query rows per sequence, in [0, seq_len]; 0: seq_len */
    int32_t n_heads, n_kv_heads, head_dim; /* n_heads a multiple of n_kv_heads */
    int32_t q_stride;  /* floats between rows of q (and of the output) */
    int32_t kv_stride; /* floats between rows of k and of v */
} um_attention_shape_t;

/* Backends for the attention's score and value products. */
typedef enum um_attention_backend {
    UM_ATTENTION_ONEDNN = 0, /* oneDNN matmul primitives, cached per shape */
    UM_ATTENTION_LIBXSMM,    /* libxsmm JIT kernels (x86 builds with libxsmm only) */
} um_attention_backend_t;

/*
 * Choose the backend of um_attention at startup, by name ("onednn" or "libxsmm"; NULL:
 * the environment variable UNMASKD_ATTENTION, else onednn). Returns 0, or UM_EINVAL
 * with a message in err for an unknown name or libxsmm in a build without it.
 */
int um_attention_select(const char *name, char *err, size_t errlen);

/* The selected backend's name: "onednn" or "libxsmm (target ARCH)". */
const char *um_attention_backend_name(void);

/* Floats of score buffer um_attention needs for n_threads threads. */
size_t um_attention_scratch_floats(const um_attention_shape_t *shape, int n_threads);

/*
 * Bidirectional attention without a mask, fused per (sequence, head, tile of
 * UM_ATTENTION_TILE query rows): scores = q k^T, a stable softmax per row, then
 * scores v, written over that tile's query rows in q. q holds (n_seq, q_len) rows,
 * k and v (n_seq, seq_len) rows. q must already carry the
 * 1/sqrt(head_dim) scale. Query head h reads key/value head h / (n_heads / n_kv_heads).
 * Tasks run under OpenMP, each thread with its own tile of scratch (at least
 * um_attention_scratch_floats floats for omp_get_max_threads() threads), so no
 * thread keeps more than one tile of one head's score matrix. Returns 0, UM_EINVAL
 * or UM_EBACKEND.
 */
int um_attention(const um_kernel_table_t *k, const um_attention_shape_t *shape, float *q,
                 const float *kk, const float *v, float *scratch);

/* Release cached primitives (at exit; tests check for leaks). */
void um_gemm_shutdown(void);

/* Matmul primitives in the cache now, and the maximum it keeps when no call uses them. */
size_t um_gemm_cached_primitives(void);
/* Matmul primitives created since the process started, evicted ones included. */
size_t um_gemm_created_primitives(void);
#define UM_GEMM_MAX_CACHED 512

#endif /* UM_KERNELS_H */
