/*
 * Matrix products through the oneDNN 2.6 C API (the matmul primitive): f32, and weight
 * products with f32, bf16 or int8 weights prepared once at load.
 *
 * Owns the oneDNN CPU engine, a cache of matmul primitives keyed by everything that
 * fixes a primitive (transposition of B, M, N, K, the three strides, accumulate,
 * alpha), and a pool of execution contexts (a stream plus a scratchpad buffer).
 * Primitive creation, which may JIT-compile code, happens once per key; later calls
 * only wrap the caller's pointers in memory objects and execute.
 *
 * Threading: every function is thread-safe. The cache is behind a read-write lock,
 * the context pool behind a mutex. A product called inside an OpenMP parallel region
 * runs on the calling thread only (oneDNN does not nest its own parallelism), which is
 * how the forward pass runs one attention head per thread. um_gemm_shutdown must not
 * race with running products.
 */
#include "kernels.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#include <oneapi/dnnl/dnnl.h>
#include <oneapi/dnnl/dnnl_debug.h>
#include <unmaskd/error.h>

/* The project's one logging facility, which includes only the public ABI. */
#include "log.h"

/* ------------------------------------------------------------------------- */
/* Cache of primitives                                                        */

/* What B is: a plain f32 matrix with strides, or a prepared weight of some dtype. An int8
 * product takes u8 activations and writes s32 sums (lda is K, ldc is N, no accumulate). */
enum { S_KIND_PLAIN = 0, S_KIND_WEIGHT_F32 = 1, S_KIND_WEIGHT_BF16 = 2, S_KIND_WEIGHT_INT8 = 3 };

static const char *s_kind_name(int kind)
{
    if (kind == S_KIND_WEIGHT_BF16)
        return "bf16";
    if (kind == S_KIND_WEIGHT_INT8)
        return "int8";
    return "f32";
}

typedef struct s_gemm_key {
    int kind;    /* S_KIND_*; for weights ldb is 0 and B's layout is the weight's */
    int trans_b; /* 1: B stored [N, K] (nt), 0: B stored [K, N] (nn) */
    int32_t m, n, k;
    int32_t lda, ldb, ldc;
    int accumulate;
    uint32_t alpha_bits; /* bit pattern of alpha, so -0.0f and NaN compare exactly */
} s_gemm_key_t;

typedef struct s_gemm_entry {
    s_gemm_key_t key;
    dnnl_primitive_t primitive;
    dnnl_memory_desc_t a_md, b_md, c_md, scratch_md;
    size_t scratch_bytes;
    atomic_int users;          /* calls between s_cache_get and s_cache_put */
    atomic_uint_fast64_t used; /* s_clock when a call last took it */
    struct s_gemm_entry *next; /* chain within a hash bucket */
} s_gemm_entry_t;

/* Execution context: a stream and a scratchpad buffer, used by one call at a time. */
typedef struct s_gemm_ctx {
    dnnl_stream_t stream;
    void *scratch;
    size_t scratch_cap;
    uint16_t *a_bf16; /* A rounded to bf16 for products with bf16 weights */
    size_t a_bf16_cap; /* elements */
    uint8_t *a_u8;     /* (M, K) A quantised for products with int8 weights */
    size_t a_u8_cap;   /* bytes */
    float *a_scale;    /* (M) scales of the rows of a_u8 */
    size_t a_scale_cap; /* elements */
    int32_t *c_s32;    /* (M, N) s32 sums of an int8 product */
    size_t c_s32_cap;  /* elements */
    struct s_gemm_ctx *next;
} s_gemm_ctx_t;

#define S_BUCKETS 1024
#define S_SCRATCH_ALIGN 64

/*
 * Most primitives the cache keeps. Each distinct (M, N, K, strides) is an entry of about
 * 65 KB (measured on the bundled model's shapes with oneDNN 2.6), and batched passes
 * meet a new M for every mix of requests. So past this many entries, the least recently
 * used entry that no call is using is destroyed before a new one is added. oneDNN keeps
 * a cache of its own (1024 primitives by default, ONEDNN_PRIMITIVE_CACHE_CAPACITY), so
 * the memory both hold is about twice this bound's share.
 * NOTE: batches that mix many row counts still recreate evicted primitives often;
 * rounding M up to a few sizes would let them share primitives.
 */
#define S_MAX_ENTRIES UM_GEMM_MAX_CACHED

static pthread_rwlock_t s_cache_lock = PTHREAD_RWLOCK_INITIALIZER;
static dnnl_engine_t s_engine;                 /* NULL until the first product */
static s_gemm_entry_t *s_buckets[S_BUCKETS];   /* guarded by s_cache_lock */
static size_t s_n_entries;
static size_t s_n_evicted;                     /* guarded by s_cache_lock */
static size_t s_n_created;                     /* guarded by s_cache_lock */
static atomic_uint_fast64_t s_clock;           /* ticks once per s_cache_get */

static pthread_mutex_t s_pool_lock = PTHREAD_MUTEX_INITIALIZER;
static s_gemm_ctx_t *s_pool; /* idle contexts, guarded by s_pool_lock */

/*
 * Check a oneDNN call: on failure log the call as written, its status and the
 * product's shape, set rc to UM_EBACKEND and jump to cleanup.
 */
#define UM_DNNL_CHECK(call, key)                                                        \
    do {                                                                                \
        dnnl_status_t st_ = (call);                                                     \
        if (st_ != dnnl_success) {                                                      \
            um_error("gemm",                                                            \
                     "%s returned %s for the %s product %s M=%d N=%d K=%d "             \
                     "(lda %d, ldb %d, ldc %d): rerun with ONEDNN_VERBOSE=1 for "       \
                     "oneDNN's reason",                                                 \
                     #call, dnnl_status2str(st_),                                       \
                     s_kind_name((key)->kind),                                          \
                     (key)->trans_b ? "A*B^T" : "A*B",                                  \
                     (key)->m, (key)->n, (key)->k, (key)->lda, (key)->ldb, (key)->ldc); \
            rc = UM_EBACKEND;                                                           \
            goto cleanup;                                                               \
        }                                                                               \
    } while (0)

static uint32_t s_key_hash(const s_gemm_key_t *key)
{
    /* FNV-1a over the fields, which are all 32-bit. */
    const uint32_t words[10] = {
        (uint32_t)key->kind, (uint32_t)key->trans_b, (uint32_t)key->m, (uint32_t)key->n,
        (uint32_t)key->k, (uint32_t)key->lda, (uint32_t)key->ldb,
        (uint32_t)key->ldc, (uint32_t)key->accumulate, key->alpha_bits,
    };
    uint32_t h = 2166136261u;
    for (size_t i = 0; i < 10; i++) {
        h ^= words[i];
        h *= 16777619u;
    }
    return h % S_BUCKETS;
}

static int s_key_equal(const s_gemm_key_t *a, const s_gemm_key_t *b)
{
    return a->kind == b->kind && a->trans_b == b->trans_b && a->m == b->m && a->n == b->n && a->k == b->k &&
           a->lda == b->lda && a->ldb == b->ldb && a->ldc == b->ldc &&
           a->accumulate == b->accumulate && a->alpha_bits == b->alpha_bits;
}

static s_gemm_entry_t *s_cache_find(const s_gemm_key_t *key)
{
    for (s_gemm_entry_t *e = s_buckets[s_key_hash(key)]; e; e = e->next)
        if (s_key_equal(&e->key, key))
            return e;
    return NULL;
}

/*
 * Create the primitive for key; weights_md is B's layout for a weight product, NULL for
 * a plain one. Called with the write lock held and s_engine set.
 */
static int s_entry_create(const s_gemm_key_t *key, float alpha,
                          const dnnl_memory_desc_t *weights_md, s_gemm_entry_t **out)
{
    int rc = 0;
    dnnl_primitive_attr_t attr = NULL;
    dnnl_post_ops_t post_ops = NULL;
    dnnl_primitive_desc_t pd = NULL;
    s_gemm_entry_t *e = calloc(1, sizeof *e);
    if (!e)
        return UM_ENOMEM;
    e->key = *key;

    /* A is [M, K] row-major; C is [M, N] row-major. */
    dnnl_dims_t a_dims = {key->m, key->k}, a_strides = {key->lda, 1};
    dnnl_dims_t c_dims = {key->m, key->n}, c_strides = {key->ldc, 1};
    /* B is the K x N operand. Stored [N, K] (nn.Linear weights), element (k, n) sits at
     * n * ldb + k, so its strides are {1, ldb}; stored [K, N] they are {ldb, 1}. */
    dnnl_dims_t b_dims = {key->k, key->n};
    dnnl_dims_t b_strides = {key->trans_b ? 1 : key->ldb, key->trans_b ? key->ldb : 1};

    dnnl_data_type_t a_type = dnnl_f32, c_type = dnnl_f32;
    if (key->kind == S_KIND_WEIGHT_BF16) {
        a_type = dnnl_bf16;
    } else if (key->kind == S_KIND_WEIGHT_INT8) {
        a_type = dnnl_u8;
        c_type = dnnl_s32;
    }
    UM_DNNL_CHECK(dnnl_memory_desc_init_by_strides(&e->a_md, 2, a_dims, a_type, a_strides), key);
    if (weights_md)
        e->b_md = *weights_md;
    else
        UM_DNNL_CHECK(dnnl_memory_desc_init_by_strides(&e->b_md, 2, b_dims, dnnl_f32, b_strides),
                      key);
    UM_DNNL_CHECK(dnnl_memory_desc_init_by_strides(&e->c_md, 2, c_dims, c_type, c_strides), key);

    UM_DNNL_CHECK(dnnl_primitive_attr_create(&attr), key);
    /* A user scratchpad lets concurrent calls each bring their own buffer. */
    UM_DNNL_CHECK(dnnl_primitive_attr_set_scratchpad_mode(attr, dnnl_scratchpad_mode_user), key);
    if (alpha != 1.0f) {
        /* One common output scale (mask 0): C = alpha * (A B), applied before the sum. */
        UM_DNNL_CHECK(dnnl_primitive_attr_set_output_scales(attr, 1, 0, &alpha), key);
    }
    if (key->accumulate) {
        /* Sum post-op with scale 1: C = (A B) + C. */
        UM_DNNL_CHECK(dnnl_post_ops_create(&post_ops), key);
        UM_DNNL_CHECK(dnnl_post_ops_append_sum(post_ops, 1.0f), key);
        UM_DNNL_CHECK(dnnl_primitive_attr_set_post_ops(attr, post_ops), key);
    }

    dnnl_matmul_desc_t desc;
    UM_DNNL_CHECK(dnnl_matmul_desc_init(&desc, &e->a_md, &e->b_md, NULL, &e->c_md), key);
    UM_DNNL_CHECK(dnnl_primitive_desc_create(&pd, &desc, attr, s_engine, NULL), key);

    const dnnl_memory_desc_t *scratch =
        dnnl_primitive_desc_query_md(pd, dnnl_query_scratchpad_md, 0);
    if (scratch) {
        e->scratch_md = *scratch;
        e->scratch_bytes = dnnl_memory_desc_get_size(scratch);
    }
    UM_DNNL_CHECK(dnnl_primitive_create(&e->primitive, pd), key);

    const char *impl = NULL;
    if (dnnl_primitive_desc_query(pd, dnnl_query_impl_info_str, 0, &impl) != dnnl_success)
        impl = "unknown";
    um_debug("gemm", "created %s matmul %s M=%d N=%d K=%d lda=%d ldb=%d ldc=%d alpha=%g%s: "
             "%s, scratchpad %zu bytes", s_kind_name(key->kind),
             key->trans_b ? "A*B^T" : "A*B", key->m, key->n, key->k, key->lda, key->ldb,
             key->ldc, (double)alpha, key->accumulate ? " accumulate" : "", impl,
             e->scratch_bytes);

cleanup:
    if (pd)
        dnnl_primitive_desc_destroy(pd);
    if (post_ops)
        dnnl_post_ops_destroy(post_ops);
    if (attr)
        dnnl_primitive_attr_destroy(attr);
    if (rc != 0) {
        free(e);
        return rc;
    }
    *out = e;
    return 0;
}

/* Mark e as taken by one more call. Called with either lock held, so that it cannot be
   evicted meanwhile. */
static void s_entry_take(s_gemm_entry_t *e)
{
    atomic_fetch_add(&e->users, 1);
    atomic_store(&e->used, atomic_fetch_add(&s_clock, 1) + 1);
}

/*
 * Destroy the least recently used entry that no call holds, if there is one. Called with
 * the write lock held; the scan is short next to creating a primitive.
 */
static void s_cache_evict_locked(void)
{
    s_gemm_entry_t **victim = NULL;
    uint_fast64_t oldest = UINT_FAST64_MAX;
    for (size_t b = 0; b < S_BUCKETS; b++) {
        for (s_gemm_entry_t **link = &s_buckets[b]; *link; link = &(*link)->next) {
            uint_fast64_t used = atomic_load(&(*link)->used);
            if (atomic_load(&(*link)->users) == 0 && used < oldest) {
                oldest = used;
                victim = link;
            }
        }
    }
    if (!victim)
        return;
    s_gemm_entry_t *e = *victim;
    *victim = e->next;
    dnnl_primitive_destroy(e->primitive);
    free(e);
    s_n_entries--;
    if (s_n_evicted++ == 0)
        um_debug("gemm", "the matmul primitive cache is full (%d entries): the least recently "
                 "used are destroyed from now on", S_MAX_ENTRIES);
}

/* Find or create the cached primitive for key and take it; s_cache_put releases it. */
static int s_engine_get_locked(void);

static int s_cache_get(const s_gemm_key_t *key, float alpha, const dnnl_memory_desc_t *weights_md,
                       s_gemm_entry_t **out)
{
    pthread_rwlock_rdlock(&s_cache_lock);
    s_gemm_entry_t *e = s_engine ? s_cache_find(key) : NULL;
    if (e)
        s_entry_take(e);
    pthread_rwlock_unlock(&s_cache_lock);
    if (e) {
        *out = e;
        return 0;
    }

    pthread_rwlock_wrlock(&s_cache_lock);
    int rc = s_engine_get_locked();
    if (rc != 0)
        goto unlock;
    /* Another thread may have created the entry between the two locks. */
    e = s_cache_find(key);
    if (!e) {
        while (s_n_entries >= S_MAX_ENTRIES) {
            size_t before = s_n_entries;
            s_cache_evict_locked();
            if (s_n_entries == before)
                break; /* every entry is in use: the cache grows past the bound for now */
        }
        rc = s_entry_create(key, alpha, weights_md, &e);
        if (rc != 0)
            goto unlock;
        uint32_t h = s_key_hash(key);
        e->next = s_buckets[h];
        s_buckets[h] = e;
        s_n_entries++;
        s_n_created++;
    }
    s_entry_take(e);
    *out = e;
unlock:
    pthread_rwlock_unlock(&s_cache_lock);
    return rc;
}

size_t um_gemm_cached_primitives(void)
{
    pthread_rwlock_rdlock(&s_cache_lock);
    size_t n = s_n_entries;
    pthread_rwlock_unlock(&s_cache_lock);
    return n;
}

size_t um_gemm_created_primitives(void)
{
    pthread_rwlock_rdlock(&s_cache_lock);
    size_t n = s_n_created;
    pthread_rwlock_unlock(&s_cache_lock);
    return n;
}

/* Release an entry that s_cache_get returned. */
static void s_cache_put(s_gemm_entry_t *e)
{
    atomic_fetch_sub(&e->users, 1);
}

/* Create the engine on first use. Called with the write lock held. */
static int s_engine_get_locked(void)
{
    if (s_engine)
        return 0;
    dnnl_status_t st = dnnl_engine_create(&s_engine, dnnl_cpu, 0);
    if (st != dnnl_success) {
        um_error("gemm", "dnnl_engine_create(dnnl_cpu, 0) returned %s: oneDNN cannot run "
                 "on this host; rerun with ONEDNN_VERBOSE=1 for its reason",
                 dnnl_status2str(st));
        s_engine = NULL;
        return UM_EBACKEND;
    }
    return 0;
}

/* ------------------------------------------------------------------------- */
/* Execution contexts                                                         */

/* Take an idle context, or create one, with a scratchpad of at least scratch_bytes. */
static int s_ctx_take(size_t scratch_bytes, s_gemm_ctx_t **out)
{
    pthread_mutex_lock(&s_pool_lock);
    s_gemm_ctx_t *ctx = s_pool;
    if (ctx)
        s_pool = ctx->next;
    pthread_mutex_unlock(&s_pool_lock);

    if (!ctx) {
        ctx = calloc(1, sizeof *ctx);
        if (!ctx)
            return UM_ENOMEM;
        pthread_rwlock_rdlock(&s_cache_lock);
        dnnl_status_t st = dnnl_stream_create(&ctx->stream, s_engine, dnnl_stream_default_flags);
        pthread_rwlock_unlock(&s_cache_lock);
        if (st != dnnl_success) {
            um_error("gemm", "dnnl_stream_create returned %s: rerun with ONEDNN_VERBOSE=1 for "
                     "oneDNN's reason", dnnl_status2str(st));
            free(ctx);
            return UM_EBACKEND;
        }
    }

    if (ctx->scratch_cap < scratch_bytes) {
        size_t cap = (scratch_bytes + S_SCRATCH_ALIGN - 1) / S_SCRATCH_ALIGN * S_SCRATCH_ALIGN;
        void *buf = aligned_alloc(S_SCRATCH_ALIGN, cap);
        if (!buf) {
            /* Keep the context for later calls; only this call fails. */
            pthread_mutex_lock(&s_pool_lock);
            ctx->next = s_pool;
            s_pool = ctx;
            pthread_mutex_unlock(&s_pool_lock);
            return UM_ENOMEM;
        }
        free(ctx->scratch);
        ctx->scratch = buf;
        ctx->scratch_cap = cap;
    }
    *out = ctx;
    return 0;
}

static void s_ctx_give(s_gemm_ctx_t *ctx)
{
    pthread_mutex_lock(&s_pool_lock);
    ctx->next = s_pool;
    s_pool = ctx;
    pthread_mutex_unlock(&s_pool_lock);
}

/* ------------------------------------------------------------------------- */
/* Products                                                                   */

/* Run e on the caller's matrices with ctx's stream and scratchpad. */
static int s_execute(const s_gemm_entry_t *e, s_gemm_ctx_t *ctx, const void *A, const void *B,
                     void *C)
{
    int rc = 0;
    const s_gemm_key_t *key = &e->key;
    dnnl_memory_t a_mem = NULL, b_mem = NULL, c_mem = NULL, scratch_mem = NULL;

    /* oneDNN takes non-const handles but only reads the sources. */
    UM_DNNL_CHECK(dnnl_memory_create(&a_mem, &e->a_md, s_engine, (void *)A), key);
    UM_DNNL_CHECK(dnnl_memory_create(&b_mem, &e->b_md, s_engine, (void *)B), key);
    UM_DNNL_CHECK(dnnl_memory_create(&c_mem, &e->c_md, s_engine, C), key);

    dnnl_exec_arg_t args[4] = {
        {DNNL_ARG_SRC, a_mem},
        {DNNL_ARG_WEIGHTS, b_mem},
        {DNNL_ARG_DST, c_mem},
    };
    int n_args = 3;
    if (e->scratch_bytes > 0) {
        UM_DNNL_CHECK(dnnl_memory_create(&scratch_mem, &e->scratch_md, s_engine, ctx->scratch),
                      key);
        args[n_args++] = (dnnl_exec_arg_t){DNNL_ARG_SCRATCHPAD, scratch_mem};
    }
    UM_DNNL_CHECK(dnnl_primitive_execute(e->primitive, ctx->stream, n_args, args), key);
    UM_DNNL_CHECK(dnnl_stream_wait(ctx->stream), key);

cleanup:
    if (scratch_mem)
        dnnl_memory_destroy(scratch_mem);
    if (c_mem)
        dnnl_memory_destroy(c_mem);
    if (b_mem)
        dnnl_memory_destroy(b_mem);
    if (a_mem)
        dnnl_memory_destroy(a_mem);
    return rc;
}

/* Validate the arguments of both products; *empty is set when no product needs to run. */
static int s_check_args(const s_gemm_key_t *key, const float *A, const float *B, float *C,
                        int *empty)
{
    *empty = 0;
    int32_t b_min_ld = key->trans_b ? key->k : key->n;
    if (key->m < 0 || key->n < 0 || key->k < 0 || key->lda < key->k || key->ldb < b_min_ld ||
        key->ldc < key->n || key->lda < 1 || key->ldb < 1 || key->ldc < 1) {
        um_error("gemm", "invalid f32 product %s M=%d N=%d K=%d with lda %d, ldb %d, ldc %d: "
                 "sizes must be >= 0 and each stride at least its row length",
                 key->trans_b ? "A*B^T" : "A*B", key->m, key->n, key->k, key->lda, key->ldb,
                 key->ldc);
        return UM_EINVAL;
    }
    if (key->m == 0 || key->n == 0) {
        *empty = 1;
        return 0;
    }
    if (!C || (key->k > 0 && (!A || !B))) {
        um_error("gemm", "f32 product M=%d N=%d K=%d got a NULL matrix pointer",
                 key->m, key->n, key->k);
        return UM_EINVAL;
    }
    if (key->k == 0) {
        /* An empty sum: C = 0, or C unchanged when accumulating. */
        if (!key->accumulate)
            for (int32_t i = 0; i < key->m; i++)
                memset(C + (size_t)i * key->ldc, 0, (size_t)key->n * sizeof *C);
        *empty = 1;
    }
    return 0;
}

static int s_gemm(s_gemm_key_t *key, float alpha, const float *A, const float *B, float *C)
{
    memcpy(&key->alpha_bits, &alpha, sizeof alpha);
    int empty;
    int rc = s_check_args(key, A, B, C, &empty);
    if (rc != 0 || empty)
        return rc;

    s_gemm_entry_t *e;
    rc = s_cache_get(key, alpha, NULL, &e);
    if (rc != 0)
        return rc;
    s_gemm_ctx_t *ctx;
    rc = s_ctx_take(e->scratch_bytes, &ctx);
    if (rc == 0) {
        rc = s_execute(e, ctx, A, B, C);
        s_ctx_give(ctx);
    }
    s_cache_put(e);
    return rc;
}

int um_gemm_f32_nt(int32_t M, int32_t N, int32_t K, const float *A, int32_t lda,
                   const float *B, int32_t ldb, float *C, int32_t ldc, int accumulate)
{
    s_gemm_key_t key = {
        .trans_b = 1, .m = M, .n = N, .k = K, .lda = lda, .ldb = ldb, .ldc = ldc,
        .accumulate = accumulate ? 1 : 0,
    };
    return s_gemm(&key, 1.0f, A, B, C);
}

int um_gemm_f32_nn(int32_t M, int32_t N, int32_t K, float alpha, const float *A, int32_t lda,
                   const float *B, int32_t ldb, float *C, int32_t ldc)
{
    s_gemm_key_t key = {
        .trans_b = 0, .m = M, .n = N, .k = K, .lda = lda, .ldb = ldb, .ldc = ldc,
        .accumulate = 0,
    };
    return s_gemm(&key, alpha, A, B, C);
}

/* ------------------------------------------------------------------------- */
/* Prepared weights                                                           */

struct um_gemm_weight {
    int32_t n, k;
    um_wdtype_t dtype;
    /* bf16 weights on a CPU without native bf16 products, and int8 weights on the dequant
     * path, stay plain [N, K] and are widened to f32 panel by panel inside each product
     * (widen is then 1, md unused). */
    int widen;
    dnnl_memory_desc_t md; /* B as the K x N operand, in the primitive's layout */
    void *data;            /* own copy (owned) or the caller's src */
    int owned;
    size_t bytes;          /* of data, scale and row_sum */
    int32_t levels;        /* int8 on the oneDNN path: activation levels each side of 0 */
    float *scale;          /* (N) int8 only: W[n, k] ~ scale[n] * q[n, k] */
    int32_t *row_sum;      /* (N) int8 only: sum_k q[n, k], for the activations' offset */
};

/* Rows of A a representative product has when the preferred layout is queried. */
#define S_LAYOUT_QUERY_M 256

/*
 * Ask a matmul primitive of kind S_KIND_WEIGHT_* for M = S_LAYOUT_QUERY_M which layout it
 * wants for W; impl (if not NULL) receives the implementation's name, which points into
 * a static string of oneDNN.
 */
static int s_weight_layout(int32_t N, int32_t K, int kind, dnnl_memory_desc_t *md,
                           const char **impl)
{
    int rc = 0;
    s_gemm_key_t key = {.kind = kind, .trans_b = 1, .m = S_LAYOUT_QUERY_M, .n = N, .k = K};
    dnnl_memory_desc_t a_md, b_md, c_md;
    dnnl_primitive_desc_t pd = NULL;
    dnnl_dims_t a_dims = {S_LAYOUT_QUERY_M, K}, b_dims = {K, N}, c_dims = {S_LAYOUT_QUERY_M, N};
    dnnl_data_type_t a_type = dnnl_f32, b_type = dnnl_f32, c_type = dnnl_f32;
    if (kind == S_KIND_WEIGHT_BF16) {
        a_type = b_type = dnnl_bf16;
    } else if (kind == S_KIND_WEIGHT_INT8) {
        a_type = dnnl_u8;
        b_type = dnnl_s8;
        c_type = dnnl_s32;
    }

    UM_DNNL_CHECK(dnnl_memory_desc_init_by_tag(&a_md, 2, a_dims, a_type, dnnl_ab), &key);
    UM_DNNL_CHECK(dnnl_memory_desc_init_by_tag(&b_md, 2, b_dims, b_type, dnnl_format_tag_any),
                  &key);
    UM_DNNL_CHECK(dnnl_memory_desc_init_by_tag(&c_md, 2, c_dims, c_type, dnnl_ab), &key);
    dnnl_matmul_desc_t desc;
    UM_DNNL_CHECK(dnnl_matmul_desc_init(&desc, &a_md, &b_md, NULL, &c_md), &key);
    UM_DNNL_CHECK(dnnl_primitive_desc_create(&pd, &desc, NULL, s_engine, NULL), &key);
    *md = *dnnl_primitive_desc_query_md(pd, dnnl_query_weights_md, 0);
    if (impl && dnnl_primitive_desc_query(pd, dnnl_query_impl_info_str, 0, impl) != dnnl_success)
        *impl = "unknown";

cleanup:
    if (pd)
        dnnl_primitive_desc_destroy(pd);
    return rc;
}

/* Reorder src (described by src_md) into dst (described by dst_md) with oneDNN. */
static int s_reorder(const dnnl_memory_desc_t *src_md, const void *src,
                     const dnnl_memory_desc_t *dst_md, void *dst, const s_gemm_key_t *key)
{
    int rc = 0;
    dnnl_primitive_desc_t pd = NULL;
    dnnl_primitive_t prim = NULL;
    dnnl_memory_t src_mem = NULL, dst_mem = NULL;
    dnnl_stream_t stream = NULL;

    UM_DNNL_CHECK(dnnl_reorder_primitive_desc_create(&pd, src_md, s_engine, dst_md, s_engine,
                                                     NULL), key);
    UM_DNNL_CHECK(dnnl_primitive_create(&prim, pd), key);
    UM_DNNL_CHECK(dnnl_memory_create(&src_mem, src_md, s_engine, (void *)src), key);
    UM_DNNL_CHECK(dnnl_memory_create(&dst_mem, dst_md, s_engine, dst), key);
    UM_DNNL_CHECK(dnnl_stream_create(&stream, s_engine, dnnl_stream_default_flags), key);
    dnnl_exec_arg_t args[2] = {{DNNL_ARG_FROM, src_mem}, {DNNL_ARG_TO, dst_mem}};
    UM_DNNL_CHECK(dnnl_primitive_execute(prim, stream, 2, args), key);
    UM_DNNL_CHECK(dnnl_stream_wait(stream), key);

cleanup:
    if (stream)
        dnnl_stream_destroy(stream);
    if (dst_mem)
        dnnl_memory_destroy(dst_mem);
    if (src_mem)
        dnnl_memory_destroy(src_mem);
    if (prim)
        dnnl_primitive_destroy(prim);
    if (pd)
        dnnl_primitive_desc_destroy(pd);
    return rc;
}

/* Rows of W one widened panel holds: 64 rows of K = 4096 are 1 MiB of f32. */
#define S_WIDEN_PANEL 64

/*
 * Keep a bf16 weight plain for the widening product: borrow a bf16 src, or round an f32
 * src to a bf16 copy. Takes ownership of w on success and on failure.
 */
static int s_weight_new_widened(um_gemm_weight_t *w, const void *src, int src_bf16,
                                um_gemm_weight_t **out)
{
    w->widen = 1;
    if (src_bf16) {
        w->data = (void *)src;
        w->owned = 0;
        *out = w;
        return 0;
    }
    size_t n = (size_t)w->n * (size_t)w->k;
    w->bytes = n * sizeof(uint16_t);
    size_t cap = (w->bytes + S_SCRATCH_ALIGN - 1) / S_SCRATCH_ALIGN * S_SCRATCH_ALIGN;
    w->data = aligned_alloc(S_SCRATCH_ALIGN, cap);
    if (!w->data) {
        um_error("gemm", "out of memory allocating %.1f MB for a %d x %d bf16 weight",
                 cap / 1e6, w->n, w->k);
        free(w);
        return UM_ENOMEM;
    }
    w->owned = 1;
    um_kernels()->f32_to_bf16(w->data, src, n);
    *out = w;
    return 0;
}

/* Widen rows [n0, n0 + rows) of a plain bf16 or int8 weight to f32 rows of K in panel. */
static void s_widen_rows(const um_gemm_weight_t *w, float *panel, int32_t n0, int32_t rows)
{
    if (w->dtype != UM_WDTYPE_INT8) {
        um_kernels()->bf16_to_f32(panel, (const uint16_t *)w->data + (size_t)n0 * w->k,
                                  (size_t)rows * w->k);
        return;
    }
    for (int32_t r = 0; r < rows; r++) {
        const int8_t *q = (const int8_t *)w->data + (size_t)(n0 + r) * w->k;
        float scale = w->scale[n0 + r];
        float *out = panel + (size_t)r * w->k;
        for (int32_t i = 0; i < w->k; i++)
            out[i] = (float)q[i] * scale;
    }
}

/*
 * C = A W^T for a widened bf16 or int8 weight: each thread widens one panel of
 * S_WIDEN_PANEL rows of W to f32 in its own buffer, then multiplies A by that panel into
 * its columns of C. The panel stays in cache between the widening and the product.
 */
static int s_apply_widened(const um_gemm_weight_t *w, int32_t M, const float *A, int32_t lda,
                           float *C, int32_t ldc, int accumulate)
{
    int32_t n_panels = (w->n + S_WIDEN_PANEL - 1) / S_WIDEN_PANEL;
    int rc = 0;

#pragma omp parallel if (n_panels > 1 && !omp_in_parallel())
    {
        float *panel = aligned_alloc(S_SCRATCH_ALIGN, (size_t)S_WIDEN_PANEL * w->k *
                                                          sizeof(float));
        if (!panel) {
#pragma omp atomic write
            rc = UM_ENOMEM;
        }
#pragma omp for schedule(static)
        for (int32_t p = 0; p < n_panels; p++) {
            if (!panel)
                continue;
            int32_t n0 = p * S_WIDEN_PANEL;
            int32_t rows = w->n - n0 < S_WIDEN_PANEL ? w->n - n0 : S_WIDEN_PANEL;
            s_widen_rows(w, panel, n0, rows);
            int r = um_gemm_f32_nt(M, rows, w->k, A, lda, panel, w->k, C + n0, ldc, accumulate);
            if (r != 0) {
#pragma omp atomic write
                rc = r;
            }
        }
        free(panel);
    }
    return rc;
}

/* ------------------------------------------------------------------------- */
/* int8 weights                                                               */

static pthread_mutex_t s_int8_lock = PTHREAD_MUTEX_INITIALIZER;
static um_int8_path_t s_int8_path; /* 0 until selected; guarded by s_int8_lock */
static int32_t s_int8_levels;
static char s_int8_reason[192];

/* Activation levels for oneDNN's int8 kernels on this host (see um_gemm_int8_levels). */
static int32_t s_int8_host_levels(const char **why)
{
#if defined(__x86_64__)
    unsigned isa = (unsigned)dnnl_get_effective_cpu_isa();
    unsigned vnni512 = (unsigned)dnnl_cpu_isa_avx512_core_vnni;
    unsigned vnni256 = (unsigned)dnnl_cpu_isa_avx2_vnni;
    if ((isa & vnni512) == vnni512 || (isa & vnni256) == vnni256) {
        *why = "VNNI sums u8 * s8 products in s32";
        return 127;
    }
    *why = "no VNNI within the ISA cap, so oneDNN sums u8 * s8 pairs in int16";
    return 63;
#else
    *why = "oneDNN sums u8 * s8 products in s32 on this architecture";
    return 127;
#endif
}

/* Select the int8 path by name ("auto", "onednn" or "dequant"); needs the engine. */
static int s_int8_select_locked(const char *name, char *err, size_t errlen)
{
    int want = 0;
    if (strcmp(name, "onednn") == 0)
        want = UM_INT8_ONEDNN;
    else if (strcmp(name, "dequant") == 0)
        want = UM_INT8_DEQUANT;
    else if (strcmp(name, "auto") != 0)
        return um_fail(err, errlen, UM_EINVAL, "int8 product path \"%s\" is unknown: use "
                       "onednn, dequant or auto", name);

    pthread_rwlock_wrlock(&s_cache_lock);
    int rc = s_engine_get_locked();
    pthread_rwlock_unlock(&s_cache_lock);
    if (rc != 0)
        return um_fail(err, errlen, rc, "creating the oneDNN CPU engine failed");

    /* A product of a typical shape shows which implementation oneDNN would run. */
    dnnl_memory_desc_t md;
    const char *impl = NULL;
    int have_int8 = s_weight_layout(S_LAYOUT_QUERY_M, S_LAYOUT_QUERY_M, S_KIND_WEIGHT_INT8,
                                    &md, &impl) == 0;
    int jit = have_int8 && strncmp(impl, "ref", 3) != 0 && strstr(impl, ":ref") == NULL;
    const char *why_levels = "";
    int32_t levels = s_int8_host_levels(&why_levels);

    if (want == UM_INT8_ONEDNN && !have_int8)
        return um_fail(err, errlen, UM_EBACKEND, "int8 product path onednn is not available: "
                       "oneDNN %s has no u8 x s8 matmul here; use dequant or auto",
                       um_gemm_backend());
    if (!want)
        want = jit ? UM_INT8_ONEDNN : UM_INT8_DEQUANT;

    s_int8_path = (um_int8_path_t)want;
    s_int8_levels = levels;
    char before[sizeof s_int8_reason];
    memcpy(before, s_int8_reason, sizeof before);
    if (want == UM_INT8_ONEDNN)
        snprintf(s_int8_reason, sizeof s_int8_reason,
                 "onednn u8 x s8 matmul (%s), activations quantised per row to %d levels "
                 "each side of 0: %s", impl, levels, why_levels);
    else
        snprintf(s_int8_reason, sizeof s_int8_reason,
                 "dequant: int8 weights widened to f32 inside f32 products, because %s",
                 strcmp(name, "dequant") == 0 ? "it was requested"
                 : have_int8 ? "oneDNN would run its reference int8 matmul"
                             : "oneDNN has no int8 matmul here");
    if (strcmp(before, s_int8_reason) != 0)
        um_info("gemm", "int8 weights: %s", s_int8_reason);
    return 0;
}

int um_gemm_int8_select(const char *name, char *err, size_t errlen)
{
    if (!name) {
        name = getenv("UNMASKD_INT8_GEMM");
        if (!name || !*name)
            name = "auto";
    }
    pthread_mutex_lock(&s_int8_lock);
    int rc = s_int8_select_locked(name, err, errlen);
    pthread_mutex_unlock(&s_int8_lock);
    return rc;
}

/* Select from the environment on first use; returns 0 or the selection's error. */
static int s_int8_ensure(void)
{
    pthread_mutex_lock(&s_int8_lock);
    int rc = 0;
    if (!s_int8_path) {
        const char *name = getenv("UNMASKD_INT8_GEMM");
        char err[256];
        rc = s_int8_select_locked(name && *name ? name : "auto", err, sizeof err);
        if (rc != 0)
            um_error("gemm", "%s", err);
    }
    pthread_mutex_unlock(&s_int8_lock);
    return rc;
}

um_int8_path_t um_gemm_int8_path(void)
{
    if (s_int8_ensure() != 0)
        return UM_INT8_DEQUANT;
    pthread_mutex_lock(&s_int8_lock);
    um_int8_path_t path = s_int8_path;
    pthread_mutex_unlock(&s_int8_lock);
    return path;
}

const char *um_gemm_int8_reason(void)
{
    if (s_int8_ensure() != 0)
        return "int8 path selection failed";
    return s_int8_reason;
}

int32_t um_gemm_int8_levels(void)
{
    if (s_int8_ensure() != 0)
        return 127;
    pthread_mutex_lock(&s_int8_lock);
    int32_t levels = s_int8_levels;
    pthread_mutex_unlock(&s_int8_lock);
    return levels;
}

/*
 * Quantise src per row into w (see UM_WDTYPE_INT8), then keep the plain [N, K] int8 rows
 * for the dequant path or reorder them into oneDNN's layout. Takes ownership of w.
 */
static int s_weight_new_int8(um_gemm_weight_t *w, const void *src, int src_bf16,
                             um_gemm_weight_t **out)
{
    int rc = 0;
    int32_t N = w->n, K = w->k;
    size_t n = (size_t)N * (size_t)K;
    size_t cap = (n + S_SCRATCH_ALIGN - 1) / S_SCRATCH_ALIGN * S_SCRATCH_ALIGN;
    int8_t *plain = aligned_alloc(S_SCRATCH_ALIGN, cap);
    float *row = src_bf16 ? malloc((size_t)K * sizeof *row) : NULL;
    w->scale = malloc((size_t)N * sizeof *w->scale);
    w->row_sum = malloc((size_t)N * sizeof *w->row_sum);
    w->owned = 1;
    if (!plain || (src_bf16 && !row) || !w->scale || !w->row_sum) {
        um_error("gemm", "out of memory quantising a %d x %d weight to int8", N, K);
        rc = UM_ENOMEM;
        goto fail;
    }

    for (int32_t r = 0; r < N; r++) {
        const float *x = (const float *)src + (size_t)r * K;
        if (src_bf16) {
            um_kernels()->bf16_to_f32(row, (const uint16_t *)src + (size_t)r * K, (size_t)K);
            x = row;
        }
        int8_t *q = plain + (size_t)r * K;
        w->scale[r] = um_kernels()->quantize_s8(q, x, K, 127);
        int32_t sum = 0;
        for (int32_t i = 0; i < K; i++)
            sum += q[i];
        w->row_sum[r] = sum;
    }
    free(row);
    row = NULL;

    size_t side = (size_t)N * (sizeof *w->scale + sizeof *w->row_sum);
    pthread_mutex_lock(&s_int8_lock);
    w->widen = s_int8_path == UM_INT8_DEQUANT;
    w->levels = s_int8_levels;
    pthread_mutex_unlock(&s_int8_lock);
    if (w->widen) {
        w->data = plain;
        w->bytes = n + side;
        *out = w;
        return 0;
    }

    rc = s_weight_layout(N, K, S_KIND_WEIGHT_INT8, &w->md, NULL);
    if (rc != 0)
        goto fail;
    s_gemm_key_t key = {.kind = S_KIND_WEIGHT_INT8, .trans_b = 1, .n = N, .k = K, .ldb = K};
    dnnl_memory_desc_t src_md;
    dnnl_dims_t dims = {K, N}, strides = {1, K};
    UM_DNNL_CHECK(dnnl_memory_desc_init_by_strides(&src_md, 2, dims, dnnl_s8, strides), &key);
    if (dnnl_memory_desc_equal(&src_md, &w->md)) {
        w->data = plain;
        w->bytes = n + side;
        *out = w;
        return 0;
    }
    size_t bytes = dnnl_memory_desc_get_size(&w->md);
    w->data = aligned_alloc(S_SCRATCH_ALIGN,
                            (bytes + S_SCRATCH_ALIGN - 1) / S_SCRATCH_ALIGN * S_SCRATCH_ALIGN);
    if (!w->data) {
        um_error("gemm", "out of memory allocating %.1f MB for a %d x %d int8 weight",
                 bytes / 1e6, N, K);
        rc = UM_ENOMEM;
        goto fail;
    }
    w->bytes = bytes + side;
    rc = s_reorder(&src_md, plain, &w->md, w->data, &key);
    if (rc != 0)
        goto fail;
    free(plain);
    *out = w;
    return 0;

cleanup:
fail:
    if (w->data != plain)
        free(w->data);
    free(plain);
    free(row);
    free(w->scale);
    free(w->row_sum);
    free(w);
    return rc;
}

int um_gemm_weight_new(int32_t N, int32_t K, const void *src, int src_bf16, um_wdtype_t dtype,
                       um_gemm_weight_t **out)
{
    *out = NULL;
    if (N < 1 || K < 1 || !src || !um_wdtype_name(dtype)) {
        um_error("gemm", "invalid weight N=%d K=%d dtype %d%s: sizes must be >= 1 and the "
                 "dtype f32, bf16 or int8", N, K, (int)dtype, src ? "" : " with NULL data");
        return UM_EINVAL;
    }
    if (dtype == UM_WDTYPE_INT8 && K > UM_GEMM_INT8_MAX_K) {
        um_error("gemm", "int8 weight N=%d K=%d is too wide: K may be at most %d, so that the "
                 "s32 sums cannot overflow; use bf16 or f32", N, K, UM_GEMM_INT8_MAX_K);
        return UM_EINVAL;
    }
    um_gemm_weight_t *w = calloc(1, sizeof *w);
    if (!w)
        return UM_ENOMEM;
    w->n = N;
    w->k = K;
    w->dtype = dtype;
    dnnl_data_type_t type = dtype == UM_WDTYPE_BF16 ? dnnl_bf16 : dnnl_f32;

    pthread_rwlock_wrlock(&s_cache_lock);
    int rc = s_engine_get_locked();
    pthread_rwlock_unlock(&s_cache_lock);
    if (rc != 0)
        goto fail;
    if (dtype == UM_WDTYPE_INT8) {
        rc = s_int8_ensure();
        if (rc != 0)
            goto fail;
        return s_weight_new_int8(w, src, src_bf16, out);
    }
    if (dtype == UM_WDTYPE_BF16 && !um_gemm_bf16_native())
        return s_weight_new_widened(w, src, src_bf16, out);
    rc = s_weight_layout(N, K, type == dnnl_bf16 ? S_KIND_WEIGHT_BF16 : S_KIND_WEIGHT_F32,
                         &w->md, NULL);
    if (rc != 0)
        goto fail;

    /* The source as the K x N operand: element (k, n) sits at n * K + k. */
    s_gemm_key_t key = {.kind = type == dnnl_bf16 ? S_KIND_WEIGHT_BF16 : S_KIND_WEIGHT_F32,
                        .trans_b = 1, .n = N, .k = K, .ldb = K};
    dnnl_memory_desc_t src_md;
    dnnl_dims_t dims = {K, N}, strides = {1, K};
    UM_DNNL_CHECK(dnnl_memory_desc_init_by_strides(&src_md, 2, dims,
                                                   src_bf16 ? dnnl_bf16 : dnnl_f32, strides),
                  &key);
    if (dnnl_memory_desc_equal(&src_md, &w->md)) {
        w->data = (void *)src;
        w->owned = 0;
        *out = w;
        return 0;
    }

    w->bytes = dnnl_memory_desc_get_size(&w->md);
    size_t cap = (w->bytes + S_SCRATCH_ALIGN - 1) / S_SCRATCH_ALIGN * S_SCRATCH_ALIGN;
    w->data = aligned_alloc(S_SCRATCH_ALIGN, cap);
    if (!w->data) {
        um_error("gemm", "out of memory allocating %.1f MB for a %d x %d %s weight", cap / 1e6,
                 N, K, dtype == UM_WDTYPE_BF16 ? "bf16" : "f32");
        rc = UM_ENOMEM;
        goto fail;
    }
    w->owned = 1;
    rc = s_reorder(&src_md, src, &w->md, w->data, &key);
    if (rc != 0)
        goto fail;
    *out = w;
    return 0;

cleanup:
fail:
    if (w->owned)
        free(w->data);
    free(w);
    return rc;
}

void um_gemm_weight_destroy(um_gemm_weight_t **w)
{
    if (!w || !*w)
        return;
    if ((*w)->owned)
        free((*w)->data);
    free((*w)->scale);
    free((*w)->row_sum);
    free(*w);
    *w = NULL;
}

int um_gemm_weight_borrows(const um_gemm_weight_t *w)
{
    return !w->owned;
}

size_t um_gemm_weight_bytes(const um_gemm_weight_t *w)
{
    return w->owned ? w->bytes : 0;
}

/* Round rows of A to bf16 into ctx->a_bf16, packed with row stride K. */
static int s_round_rows_bf16(s_gemm_ctx_t *ctx, int32_t M, int32_t K, const float *A,
                             int32_t lda)
{
    size_t need = (size_t)M * (size_t)K;
    if (ctx->a_bf16_cap < need) {
        size_t bytes = (need * sizeof(uint16_t) + S_SCRATCH_ALIGN - 1) / S_SCRATCH_ALIGN *
                       S_SCRATCH_ALIGN;
        uint16_t *buf = aligned_alloc(S_SCRATCH_ALIGN, bytes);
        if (!buf)
            return UM_ENOMEM;
        free(ctx->a_bf16);
        ctx->a_bf16 = buf;
        ctx->a_bf16_cap = need;
    }
    void (*narrow)(uint16_t *, const float *, size_t) = um_kernels()->f32_to_bf16;
    uint16_t *dst = ctx->a_bf16;
#pragma omp parallel for schedule(static) if (M > 16 && !omp_in_parallel())
    for (int32_t i = 0; i < M; i++)
        narrow(dst + (size_t)i * K, A + (size_t)i * lda, (size_t)K);
    return 0;
}

/* Grow *buf to hold n elements of size bytes each; *cap counts elements. */
static int s_buffer_reserve(void **buf, size_t *cap, size_t n, size_t size)
{
    if (*cap >= n)
        return 0;
    size_t bytes = (n * size + S_SCRATCH_ALIGN - 1) / S_SCRATCH_ALIGN * S_SCRATCH_ALIGN;
    void *grown = aligned_alloc(S_SCRATCH_ALIGN, bytes ? bytes : S_SCRATCH_ALIGN);
    if (!grown)
        return UM_ENOMEM;
    free(*buf);
    *buf = grown;
    *cap = n;
    return 0;
}

/*
 * C = A W^T (+ C) for an int8 weight on the oneDNN path. Row m of A becomes
 * a_scale[m] * q[m, k] with q from the quantize_s8 kernel, stored as u8 q + levels + 1,
 * so oneDNN sums S[m, n] = sum_k (q[m, k] + levels + 1) w[n, k] exactly in s32.
 * Subtracting (levels + 1) * row_sum[n] leaves sum_k q w, which is scaled per row and
 * per column here: oneDNN 2.6's output scales can only vary along N.
 */
static int s_apply_int8_entry(const um_gemm_weight_t *w, const s_gemm_entry_t *e, int32_t M,
                              const float *A, int32_t lda, float *C, int32_t ldc,
                              int accumulate);

static int s_apply_int8(const um_gemm_weight_t *w, int32_t M, const float *A, int32_t lda,
                        float *C, int32_t ldc, int accumulate)
{
    int32_t N = w->n, K = w->k;
    s_gemm_key_t key = {.kind = S_KIND_WEIGHT_INT8, .trans_b = 1, .m = M, .n = N, .k = K,
                        .lda = K, .ldb = K, .ldc = N};
    float one = 1.0f;
    memcpy(&key.alpha_bits, &one, sizeof one);
    s_gemm_entry_t *e;
    int rc = s_cache_get(&key, 1.0f, &w->md, &e);
    if (rc != 0)
        return rc;
    rc = s_apply_int8_entry(w, e, M, A, lda, C, ldc, accumulate);
    s_cache_put(e);
    return rc;
}

/* s_apply_int8 with its cache entry taken. */
static int s_apply_int8_entry(const um_gemm_weight_t *w, const s_gemm_entry_t *e, int32_t M,
                              const float *A, int32_t lda, float *C, int32_t ldc,
                              int accumulate)
{
    int32_t N = w->n, K = w->k;
    if (!dnnl_memory_desc_equal(&e->b_md, &w->md)) {
        um_error("gemm", "cached int8 product M=%d N=%d K=%d expects another weight layout "
                 "than the weight passed", M, N, K);
        return UM_EBACKEND;
    }
    s_gemm_ctx_t *ctx;
    int rc = s_ctx_take(e->scratch_bytes, &ctx);
    if (rc != 0)
        return rc;
    if (s_buffer_reserve((void **)&ctx->a_u8, &ctx->a_u8_cap, (size_t)M * K, 1) != 0 ||
        s_buffer_reserve((void **)&ctx->a_scale, &ctx->a_scale_cap, (size_t)M,
                         sizeof(float)) != 0 ||
        s_buffer_reserve((void **)&ctx->c_s32, &ctx->c_s32_cap, (size_t)M * N,
                         sizeof(int32_t)) != 0) {
        um_error("gemm", "out of memory for the buffers of an int8 product M=%d N=%d K=%d",
                 M, N, K);
        s_ctx_give(ctx);
        return UM_ENOMEM;
    }

    const int32_t levels = w->levels, offset = w->levels + 1;
    uint8_t *a_u8 = ctx->a_u8;
    float *a_scale = ctx->a_scale;
    float (*quantize)(int8_t *, const float *, int32_t, int32_t) = um_kernels()->quantize_s8;
#pragma omp parallel for schedule(static) if (M > 16 && !omp_in_parallel())
    for (int32_t m = 0; m < M; m++) {
        uint8_t *u = a_u8 + (size_t)m * K;
        a_scale[m] = quantize((int8_t *)u, A + (size_t)m * lda, K, levels);
        for (int32_t i = 0; i < K; i++)
            u[i] = (uint8_t)((int32_t)(int8_t)u[i] + offset);
    }

    rc = s_execute(e, ctx, a_u8, w->data, ctx->c_s32);
    if (rc == 0) {
        const int32_t *sums = ctx->c_s32;
        const float *w_scale = w->scale;
        const int32_t *row_sum = w->row_sum;
#pragma omp parallel for schedule(static) if (M > 16 && !omp_in_parallel())
        for (int32_t m = 0; m < M; m++) {
            const int32_t *s_row = sums + (size_t)m * N;
            float *c = C + (size_t)m * ldc;
            float sa = a_scale[m];
            /* The difference is exact in s32. Its conversion to f32 and the two
             * products each round to nearest, by at most 2^-24 relative. */
            for (int32_t n = 0; n < N; n++) {
                float v = sa * (w_scale[n] * (float)(s_row[n] - offset * row_sum[n]));
                c[n] = accumulate ? c[n] + v : v;
            }
        }
    }
    s_ctx_give(ctx);
    return rc;
}

int um_gemm_weight_apply(const um_gemm_weight_t *w, int32_t M, const float *A, int32_t lda,
                         float *C, int32_t ldc, int accumulate)
{
    if (!w) {
        um_error("gemm", "weight product got a NULL weight");
        return UM_EINVAL;
    }
    int bf16 = w->dtype == UM_WDTYPE_BF16;
    s_gemm_key_t key = {
        .kind = bf16 ? S_KIND_WEIGHT_BF16 : S_KIND_WEIGHT_F32,
        .trans_b = 1, .m = M, .n = w->n, .k = w->k,
        /* bf16 activations are repacked with row stride K before the product. */
        .lda = bf16 ? w->k : lda, .ldb = w->k, .ldc = ldc,
        .accumulate = accumulate ? 1 : 0,
    };
    float one = 1.0f;
    memcpy(&key.alpha_bits, &one, sizeof one);
    int empty;
    s_gemm_key_t check = key;
    check.lda = lda;
    int rc = s_check_args(&check, A, w->data, C, &empty);
    if (rc != 0 || empty)
        return rc;
    if (w->widen)
        return s_apply_widened(w, M, A, lda, C, ldc, accumulate);
    if (w->dtype == UM_WDTYPE_INT8)
        return s_apply_int8(w, M, A, lda, C, ldc, accumulate);

    s_gemm_entry_t *e;
    rc = s_cache_get(&key, 1.0f, &w->md, &e);
    if (rc != 0)
        return rc;
    if (!dnnl_memory_desc_equal(&e->b_md, &w->md)) {
        /* Weights of one (dtype, N, K) all get the same layout, so this is a bug. */
        um_error("gemm", "cached product M=%d N=%d K=%d expects another weight layout than "
                 "the weight passed", M, w->n, w->k);
        s_cache_put(e);
        return UM_EBACKEND;
    }
    s_gemm_ctx_t *ctx;
    rc = s_ctx_take(e->scratch_bytes, &ctx);
    if (rc == 0) {
        const void *a = A;
        if (bf16) {
            rc = s_round_rows_bf16(ctx, M, w->k, A, lda);
            a = ctx->a_bf16;
        }
        if (rc == 0)
            rc = s_execute(e, ctx, a, w->data, C);
        s_ctx_give(ctx);
    }
    s_cache_put(e);
    return rc;
}

int um_gemm_bf16_native(void)
{
    /* avx512_core_bf16 and avx512_core_amx both contain the bf16 feature bits. */
    unsigned isa = (unsigned)dnnl_get_effective_cpu_isa();
    return (isa & (unsigned)dnnl_cpu_isa_avx512_core_bf16) ==
           (unsigned)dnnl_cpu_isa_avx512_core_bf16;
}

int um_gemm_set_max_isa(um_isa_t isa)
{
    dnnl_cpu_isa_t cap;
    switch (isa) {
    case UM_ISA_SCALAR:
        /* oneDNN has no scalar path; SSE4.1 is its smallest x86 ISA. */
        cap = dnnl_cpu_isa_sse41;
        break;
    case UM_ISA_AVX2:
        cap = dnnl_cpu_isa_avx2;
        break;
    case UM_ISA_AVX512:
        cap = dnnl_cpu_isa_avx512_core_bf16;
        break;
    default:
        cap = dnnl_cpu_isa_all;
        break;
    }
#if !defined(__x86_64__)
    cap = dnnl_cpu_isa_all;
#endif
    dnnl_status_t st = dnnl_set_max_cpu_isa(cap);
    if (st != dnnl_success) {
        /* The cap is fixed once a primitive has been created. */
        um_warn("gemm", "dnnl_set_max_cpu_isa returned %s: the oneDNN ISA stays as it was",
                dnnl_status2str(st));
        return UM_EBACKEND;
    }
    return 0;
}

/* ------------------------------------------------------------------------- */
/* Backend name and shutdown                                                  */

const char *um_wdtype_name(um_wdtype_t dtype)
{
    switch (dtype) {
    case UM_WDTYPE_F32:
        return "f32";
    case UM_WDTYPE_BF16:
        return "bf16";
    case UM_WDTYPE_INT8:
        return "int8";
    }
    return NULL;
}

int um_wdtype_parse(const char *name, um_wdtype_t *out)
{
    static const um_wdtype_t all[] = {UM_WDTYPE_F32, UM_WDTYPE_BF16, UM_WDTYPE_INT8};
    if (name && strcmp(name, "auto") == 0) {
        *out = 0;
        return 0;
    }
    for (size_t i = 0; name && i < sizeof all / sizeof all[0]; i++) {
        if (strcmp(name, um_wdtype_name(all[i])) == 0) {
            *out = all[i];
            return 0;
        }
    }
    return UM_EINVAL;
}

static pthread_once_t s_backend_once = PTHREAD_ONCE_INIT;
static char s_backend_name[48];

static void s_backend_init(void)
{
    const dnnl_version_t *v = dnnl_version();
    snprintf(s_backend_name, sizeof s_backend_name, "onednn %d.%d.%d", v->major, v->minor,
             v->patch);
}

const char *um_gemm_backend(void)
{
    pthread_once(&s_backend_once, s_backend_init);
    return s_backend_name;
}

void um_gemm_shutdown(void)
{
    pthread_mutex_lock(&s_pool_lock);
    while (s_pool) {
        s_gemm_ctx_t *ctx = s_pool;
        s_pool = ctx->next;
        dnnl_stream_destroy(ctx->stream);
        free(ctx->scratch);
        free(ctx->a_bf16);
        free(ctx->a_u8);
        free(ctx->a_scale);
        free(ctx->c_s32);
        free(ctx);
    }
    pthread_mutex_unlock(&s_pool_lock);

    pthread_rwlock_wrlock(&s_cache_lock);
    for (size_t b = 0; b < S_BUCKETS; b++) {
        while (s_buckets[b]) {
            s_gemm_entry_t *e = s_buckets[b];
            s_buckets[b] = e->next;
            dnnl_primitive_destroy(e->primitive);
            free(e);
        }
    }
    if (s_n_entries > 0)
        um_debug("gemm", "released %zu cached matmul primitives", s_n_entries);
    s_n_entries = 0;
    if (s_engine) {
        dnnl_engine_destroy(s_engine);
        s_engine = NULL;
    }
    pthread_rwlock_unlock(&s_cache_lock);
}
