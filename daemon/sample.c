/*
 * Token sampling (see sample.h and docs/sampling.md).
 *
 * Numerics: scaled logits are f32 products raw * (float)(1 / T), the same values
 * vocab_stats would form; every sum, softmax and cumulative probability is float64.
 * Ties between equal values go to the lower token id everywhere.
 */
#include "sample.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "kernels.h"
#include "rng.h"

/*
 * Tokens more than this many nats below the maximum scaled logit have at most
 * n_vocab * e^-40 of the mass together (about 5e-13 for 126k tokens). The top-p sort
 * can skip them whenever the rest already exceeds the nucleus mass.
 */
#define S_TOP_P_WINDOW 40.0f

int um_sample_scratch_init(um_sample_scratch_t *s, int32_t n_vocab)
{
    size_t n = (size_t)(n_vocab > 0 ? n_vocab : 1);
    s->raw = malloc(n * sizeof *s->raw);
    s->scaled = malloc(n * sizeof *s->scaled);
    s->index = malloc(n * sizeof *s->index);
    s->tmp = malloc(n * sizeof *s->tmp);
    if (!s->raw || !s->scaled || !s->index || !s->tmp) {
        um_sample_scratch_free(s);
        return UM_ENOMEM;
    }
    return 0;
}

void um_sample_scratch_free(um_sample_scratch_t *s)
{
    free(s->raw);
    free(s->scaled);
    free(s->index);
    free(s->tmp);
    s->raw = s->scaled = NULL;
    s->index = s->tmp = NULL;
}

/* ------------------------------------------------------------------------- */
/* Top-p and top-k                                                            */

/* Bottom-up merge sort of ids by (value descending, id ascending), through tmp. */
static void s_sort_ids(int32_t *ids, int32_t n, const float *z, int32_t *tmp)
{
    for (int32_t width = 1; width < n; width *= 2) {
        for (int32_t lo = 0; lo < n; lo += 2 * width) {
            int32_t mid = lo + width < n ? lo + width : n;
            int32_t hi = lo + 2 * width < n ? lo + 2 * width : n;
            int32_t a = lo, b = mid, k = lo;
            while (a < mid && b < hi) {
                int32_t i = ids[a], j = ids[b];
                int first = z[i] > z[j] || (z[i] == z[j] && i < j);
                tmp[k++] = first ? ids[a++] : ids[b++];
            }
            while (a < mid)
                tmp[k++] = ids[a++];
            while (b < hi)
                tmp[k++] = ids[b++];
        }
        memcpy(ids, tmp, (size_t)n * sizeof *ids);
    }
}

/*
 * Dream's top-p: sort tokens by scaled logit, descending, and keep token j of that order
 * when the probability mass of the tokens before it is at most top_p. So the first token
 * is always kept, and the kept set is the shortest prefix whose mass exceeds top_p. The
 * others get -inf.
 */
static void s_top_p(float *z, int32_t n, double top_p, int32_t *ids, int32_t *tmp)
{
    float max = -INFINITY;
    for (int32_t v = 0; v < n; v++)
        if (z[v] > max)
            max = z[v];
    if (max == -INFINITY)
        return;
    double total = 0.0;
    for (int32_t v = 0; v < n; v++)
        if (z[v] != -INFINITY)
            total += exp((double)z[v] - max);

    /*
     * Sort only the tokens inside the window when they already have more than top_p of
     * the mass: the kept prefix then ends inside the window, and every token outside
     * it is removed. Otherwise sort every finite token.
     */
    int32_t m = 0;
    double window_mass = 0.0;
    for (int32_t v = 0; v < n; v++) {
        if (z[v] != -INFINITY && z[v] >= max - S_TOP_P_WINDOW) {
            ids[m++] = v;
            window_mass += exp((double)z[v] - max);
        }
    }
    int windowed = window_mass / total > top_p;
    if (!windowed) {
        m = 0;
        for (int32_t v = 0; v < n; v++)
            if (z[v] != -INFINITY)
                ids[m++] = v;
    }
    s_sort_ids(ids, m, z, tmp);

    double before = 0.0;
    int32_t keep = m;
    for (int32_t j = 1; j < m; j++) {
        before += exp((double)z[ids[j - 1]] - max) / total;
        if (before > top_p) {
            keep = j;
            break;
        }
    }
    for (int32_t j = keep; j < m; j++)
        z[ids[j]] = -INFINITY;
    if (windowed)
        for (int32_t v = 0; v < n; v++)
            if (z[v] < max - S_TOP_P_WINDOW)
                z[v] = -INFINITY;
}

/* Partition ids[lo..hi] around a pivot value, descending; returns the pivot's index. */
static int32_t s_partition(int32_t *ids, int32_t lo, int32_t hi, const float *z)
{
    int32_t mid = lo + (hi - lo) / 2;
    /* Median of three as the pivot, moved to hi. */
    if (z[ids[mid]] > z[ids[lo]]) {
        int32_t t = ids[mid]; ids[mid] = ids[lo]; ids[lo] = t;
    }
    if (z[ids[hi]] > z[ids[lo]]) {
        int32_t t = ids[hi]; ids[hi] = ids[lo]; ids[lo] = t;
    }
    if (z[ids[mid]] > z[ids[hi]]) {
        int32_t t = ids[mid]; ids[mid] = ids[hi]; ids[hi] = t;
    }
    float pivot = z[ids[hi]];
    int32_t store = lo;
    for (int32_t i = lo; i < hi; i++) {
        if (z[ids[i]] > pivot) {
            int32_t t = ids[i]; ids[i] = ids[store]; ids[store] = t;
            store++;
        }
    }
    int32_t t = ids[hi]; ids[hi] = ids[store]; ids[store] = t;
    return store;
}

/*
 * Dream's top-k: keep every token whose scaled logit is at least the k-th largest
 * (ties at that value are all kept); the others get -inf. A row with at most k finite
 * values is unchanged.
 */
static void s_top_k(float *z, int32_t n, int32_t k, int32_t *ids)
{
    int32_t m = 0;
    for (int32_t v = 0; v < n; v++)
        if (z[v] != -INFINITY)
            ids[m++] = v;
    if (k >= m)
        return;
    /* Quickselect the k-th largest value (position k - 1 of the descending order). */
    int32_t lo = 0, hi = m - 1, target = k - 1;
    while (lo < hi) {
        int32_t p = s_partition(ids, lo, hi, z);
        if (p == target)
            break;
        if (p < target)
            lo = p + 1;
        else
            hi = p - 1;
    }
    float kth = z[ids[target]];
    for (int32_t v = 0; v < n; v++)
        if (z[v] < kth)
            z[v] = -INFINITY;
}

/* ------------------------------------------------------------------------- */
/* One row                                                                    */

/* Inverse-CDF draw from q = exp(z - lse) in token-id order; u uniform in (0, 1). */
static int32_t s_categorical(const float *z, int32_t n, double lse, double u)
{
    double cum = 0.0;
    int32_t last = -1;
    for (int32_t v = 0; v < n; v++) {
        if (z[v] == -INFINITY)
            continue;
        double q = exp((double)z[v] - lse);
        if (q <= 0.0)
            continue;
        cum += q;
        last = v;
        if (cum > u)
            return v;
    }
    /* u fell past the float64 total, which rounding can leave just below 1. */
    return last;
}

static int s_is_member(int32_t id, const int32_t *set, int32_t n)
{
    for (int32_t i = 0; i < n; i++)
        if (set[i] == id)
            return 1;
    return 0;
}

int um_sample_row(const float *logits, const um_sample_config_t *cfg, uint64_t key,
                  uint64_t base, um_sample_scratch_t *scratch, um_sample_result_t *out)
{
    const um_kernel_table_t *k = um_kernels();
    const int32_t n = cfg->n_vocab;
    float *raw = scratch->raw, *z = scratch->scaled;
    *out = (um_sample_result_t){.token = -1};

    memcpy(raw, logits, (size_t)n * sizeof *raw);
    for (int32_t i = 0; i < cfg->n_banned; i++)
        if (cfg->banned[i] >= 0 && cfg->banned[i] < n)
            raw[cfg->banned[i]] = -INFINITY;

    /* LLaDA's confidence normalizer: raw logits, suppressed tokens left out. */
    float saved[UM_SAMPLE_MAX_SUPPRESSED];
    int32_t n_sup = cfg->n_suppressed < UM_SAMPLE_MAX_SUPPRESSED ? cfg->n_suppressed
                                                                : UM_SAMPLE_MAX_SUPPRESSED;
    for (int32_t i = 0; i < n_sup; i++) {
        int32_t id = cfg->suppressed[i];
        saved[i] = id >= 0 && id < n ? raw[id] : 0.0f;
        if (id >= 0 && id < n)
            raw[id] = -INFINITY;
    }
    double conf_lse = k->logsumexp(raw, n);
    for (int32_t i = n_sup; i-- > 0;) /* backwards, in case an id is listed twice */
        if (cfg->suppressed[i] >= 0 && cfg->suppressed[i] < n)
            raw[cfg->suppressed[i]] = saved[i];

    /* The sampling row: scaled, then top-p, then top-k. */
    const int greedy = cfg->temperature == 0.0;
    const float scale = greedy ? 1.0f : (float)(1.0 / cfg->temperature);
    for (int32_t v = 0; v < n; v++)
        z[v] = greedy ? raw[v] : scale * raw[v];
    if (cfg->top_p < 1.0)
        s_top_p(z, n, cfg->top_p, scratch->index, scratch->tmp);
    if (cfg->top_k > 0)
        s_top_k(z, n, cfg->top_k, scratch->index);

    um_vocab_stats_t st;
    k->vocab_stats(z, n, 1.0f, &st);
    if (!isfinite(st.lse) || !isfinite(conf_lse))
        return UM_EBACKEND;

    int32_t token;
    if (greedy) {
        token = st.argmax;
    } else if (cfg->sampler == UM_SAMPLER_CATEGORICAL) {
        token = s_categorical(z, n, st.lse, um_rng_uniform_key(key, base));
    } else {
        /* Gumbel-max runs on raw / T in float64, so filtered tokens go to -inf in raw. */
        if (cfg->top_p < 1.0 || cfg->top_k > 0)
            for (int32_t v = 0; v < n; v++)
                if (z[v] == -INFINITY)
                    raw[v] = -INFINITY;
        token = k->gumbel_argmax(raw, n, cfg->temperature, key, base);
    }
    if (token < 0 || token >= n || z[token] == -INFINITY)
        return UM_EBACKEND;

    out->token = token;
    out->sampled_prob = exp((double)z[token] - st.lse);
    out->margin = st.margin;
    out->entropy = st.entropy;
    out->demoted = (uint8_t)(cfg->n_suppressed > 0
                             && s_is_member(token, cfg->suppressed, cfg->n_suppressed));
    out->prob = out->demoted ? 0.0 : exp((double)logits[token] - conf_lse);
    if (!isfinite(out->prob) || !isfinite(out->sampled_prob))
        return UM_EBACKEND;
    return 0;
}
