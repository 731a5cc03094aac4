/*
 * f32 matrix products through the oneDNN 2.6 C API (the matmul primitive).
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
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <oneapi/dnnl/dnnl.h>
#include <oneapi/dnnl/dnnl_debug.h>
#include <unmaskd/error.h>

/* The project's one logging facility, which includes only the public ABI. */
#include "log.h"

/* ------------------------------------------------------------------------- */
/* Cache of primitives                                                        */

typedef struct s_gemm_key {
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
    struct s_gemm_entry *next; /* chain within a hash bucket */
} s_gemm_entry_t;

/* Execution context: a stream and a scratchpad buffer, used by one call at a time. */
typedef struct s_gemm_ctx {
    dnnl_stream_t stream;
    void *scratch;
    size_t scratch_cap;
    struct s_gemm_ctx *next;
} s_gemm_ctx_t;

#define S_BUCKETS 1024
#define S_SCRATCH_ALIGN 64

/* NOTE: the cache has no eviction. Each distinct (M, N, K, strides) adds entries, so a
 * daemon that serves many sequence lengths keeps one set of primitives per length. */
static pthread_rwlock_t s_cache_lock = PTHREAD_RWLOCK_INITIALIZER;
static dnnl_engine_t s_engine;                 /* NULL until the first product */
static s_gemm_entry_t *s_buckets[S_BUCKETS];   /* guarded by s_cache_lock */
static size_t s_n_entries;

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
                     "%s returned %s for the f32 product %s M=%d N=%d K=%d "            \
                     "(lda %d, ldb %d, ldc %d): rerun with ONEDNN_VERBOSE=1 for "       \
                     "oneDNN's reason",                                                 \
                     #call, dnnl_status2str(st_), (key)->trans_b ? "A*B^T" : "A*B",     \
                     (key)->m, (key)->n, (key)->k, (key)->lda, (key)->ldb, (key)->ldc); \
            rc = UM_EBACKEND;                                                           \
            goto cleanup;                                                               \
        }                                                                               \
    } while (0)

static uint32_t s_key_hash(const s_gemm_key_t *key)
{
    /* FNV-1a over the fields, which are all 32-bit. */
    const uint32_t words[9] = {
        (uint32_t)key->trans_b, (uint32_t)key->m, (uint32_t)key->n,
        (uint32_t)key->k, (uint32_t)key->lda, (uint32_t)key->ldb,
        (uint32_t)key->ldc, (uint32_t)key->accumulate, key->alpha_bits,
    };
    uint32_t h = 2166136261u;
    for (size_t i = 0; i < 9; i++) {
        h ^= words[i];
        h *= 16777619u;
    }
    return h % S_BUCKETS;
}

static int s_key_equal(const s_gemm_key_t *a, const s_gemm_key_t *b)
{
    return a->trans_b == b->trans_b && a->m == b->m && a->n == b->n && a->k == b->k &&
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

/* Create the primitive for key. Called with the write lock held and s_engine set. */
static int s_entry_create(const s_gemm_key_t *key, float alpha, s_gemm_entry_t **out)
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

    UM_DNNL_CHECK(dnnl_memory_desc_init_by_strides(&e->a_md, 2, a_dims, dnnl_f32, a_strides), key);
    UM_DNNL_CHECK(dnnl_memory_desc_init_by_strides(&e->b_md, 2, b_dims, dnnl_f32, b_strides), key);
    UM_DNNL_CHECK(dnnl_memory_desc_init_by_strides(&e->c_md, 2, c_dims, dnnl_f32, c_strides), key);

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
    um_debug("gemm", "created matmul %s M=%d N=%d K=%d lda=%d ldb=%d ldc=%d alpha=%g%s: %s, "
             "scratchpad %zu bytes",
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

/* Find or create the cached primitive for key. */
static int s_cache_get(const s_gemm_key_t *key, float alpha, const s_gemm_entry_t **out)
{
    pthread_rwlock_rdlock(&s_cache_lock);
    s_gemm_entry_t *e = s_engine ? s_cache_find(key) : NULL;
    pthread_rwlock_unlock(&s_cache_lock);
    if (e) {
        *out = e;
        return 0;
    }

    int rc = 0;
    pthread_rwlock_wrlock(&s_cache_lock);
    if (!s_engine) {
        dnnl_status_t st = dnnl_engine_create(&s_engine, dnnl_cpu, 0);
        if (st != dnnl_success) {
            um_error("gemm", "dnnl_engine_create(dnnl_cpu, 0) returned %s: oneDNN cannot run "
                     "on this host; rerun with ONEDNN_VERBOSE=1 for its reason",
                     dnnl_status2str(st));
            s_engine = NULL;
            rc = UM_EBACKEND;
            goto unlock;
        }
    }
    /* Another thread may have created the entry between the two locks. */
    e = s_cache_find(key);
    if (!e) {
        rc = s_entry_create(key, alpha, &e);
        if (rc != 0)
            goto unlock;
        uint32_t h = s_key_hash(key);
        e->next = s_buckets[h];
        s_buckets[h] = e;
        s_n_entries++;
    }
    *out = e;
unlock:
    pthread_rwlock_unlock(&s_cache_lock);
    return rc;
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

static int s_execute(const s_gemm_entry_t *e, const float *A, const float *B, float *C)
{
    int rc = 0;
    const s_gemm_key_t *key = &e->key;
    dnnl_memory_t a_mem = NULL, b_mem = NULL, c_mem = NULL, scratch_mem = NULL;
    s_gemm_ctx_t *ctx = NULL;

    rc = s_ctx_take(e->scratch_bytes, &ctx);
    if (rc != 0)
        return rc;

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
    s_ctx_give(ctx);
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

    const s_gemm_entry_t *e;
    rc = s_cache_get(key, alpha, &e);
    if (rc != 0)
        return rc;
    return s_execute(e, A, B, C);
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
/* Backend name and shutdown                                                  */

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
