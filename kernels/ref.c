/*
 * Scalar reference kernels: the portable version of every op in kernels.h. They are
 * always built, they are what um_kernels() returns on hosts without a SIMD table, and
 * the tests use them as the oracle for every other ISA.
 *
 * Threading: pure functions of their arguments; any number of threads may call them.
 */
#include "kernels.h"

#include <math.h>
#include <string.h>

#include "rng.h"

void um_k_rmsnorm_ref(float *out, const float *x, const float *w, int32_t n, float eps)
{
    float sum_sq = 0.0f;
    for (int32_t i = 0; i < n; i++)
        sum_sq += x[i] * x[i];

    /* Same order as the PyTorch reference: normalise in f32, then scale by the weight. */
    float inv_rms = 1.0f / sqrtf(sum_sq / (float)n + eps);
    for (int32_t i = 0; i < n; i++)
        out[i] = (x[i] * inv_rms) * w[i];
}

void um_k_layernorm_ref(float *out, const float *x, const float *w, const float *b, int32_t n,
                        float eps)
{
    /* Two passes, as PyTorch's layer_norm: the mean first, then the centred squares, so
     * a large common offset does not cancel away the variance. */
    float sum = 0.0f;
    for (int32_t i = 0; i < n; i++)
        sum += x[i];
    float mean = sum / (float)n;
    float sum_sq = 0.0f;
    for (int32_t i = 0; i < n; i++) {
        float c = x[i] - mean;
        sum_sq += c * c;
    }
    float inv_std = 1.0f / sqrtf(sum_sq / (float)n + eps);
    for (int32_t i = 0; i < n; i++) {
        float y = (x[i] - mean) * inv_std * w[i];
        out[i] = b ? y + b[i] : y;
    }
}

void um_k_rope_ref(float *x, const float *cos_sin, int32_t head_dim)
{
    int32_t half = head_dim / 2;
    for (int32_t i = 0; i < half; i++) {
        float c = cos_sin[2 * i];
        float s = cos_sin[2 * i + 1];
        float a = x[i];
        float b = x[i + half];
        x[i] = a * c - b * s;
        x[i + half] = b * c + a * s;
    }
}

void um_k_softmax_ref(float *x, int32_t n)
{
    float max = x[0];
    for (int32_t i = 1; i < n; i++)
        if (x[i] > max)
            max = x[i];

    float sum = 0.0f;
    for (int32_t i = 0; i < n; i++) {
        x[i] = expf(x[i] - max);
        sum += x[i];
    }

    /* sum >= 1 because the maximum contributes exp(0), so the division is safe. */
    float inv_sum = 1.0f / sum;
    for (int32_t i = 0; i < n; i++)
        x[i] *= inv_sum;
}

void um_k_silu_mul_ref(float *out, const float *gate, const float *up, int32_t n)
{
    /* out may alias gate or up: each element is read before it is written. */
    for (int32_t i = 0; i < n; i++) {
        float g = gate[i];
        out[i] = g / (1.0f + expf(-g)) * up[i];
    }
}

void um_k_gelu_erf_ref(float *out, const float *x, int32_t n)
{
    for (int32_t i = 0; i < n; i++) {
        float v = x[i];
        out[i] = 0.5f * v * (1.0f + erff(v * 0.70710678118654752f));
    }
}

void um_k_gelu_tanh_ref(float *out, const float *x, int32_t n)
{
    const float k = 0.79788456080286536f; /* sqrt(2 / pi) */
    for (int32_t i = 0; i < n; i++) {
        float v = x[i];
        out[i] = 0.5f * v * (1.0f + tanhf(k * (v + 0.044715f * v * v * v)));
    }
}

void um_k_add_ref(float *out, const float *x, int32_t n)
{
    for (int32_t i = 0; i < n; i++)
        out[i] += x[i];
}

void um_k_bf16_to_f32_ref(float *out, const uint16_t *in, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        uint32_t bits = (uint32_t)in[i] << 16;
        memcpy(&out[i], &bits, sizeof bits);
    }
}

void um_k_f32_to_bf16_ref(uint16_t *out, const float *in, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        uint32_t bits;
        memcpy(&bits, &in[i], sizeof bits);
        if ((bits & 0x7fffffffu) > 0x7f800000u) {
            /* NaN: keep the sign and force a quiet NaN, which rounding could turn to inf. */
            out[i] = (uint16_t)((bits >> 16) | 0x40);
            continue;
        }
        /* Round to nearest, ties to even: add 0x7fff plus the lowest kept bit. */
        bits += 0x7fffu + ((bits >> 16) & 1u);
        out[i] = (uint16_t)(bits >> 16);
    }
}

float um_k_quantize_s8_ref(int8_t *q, const float *x, int32_t n, int32_t levels)
{
    float max_abs = 0.0f;
    for (int32_t i = 0; i < n; i++)
        max_abs = fmaxf(max_abs, fabsf(x[i]));
    if (max_abs == 0.0f) {
        memset(q, 0, (size_t)n);
        return 0.0f;
    }

    /* A division, not a multiplication by 1 / scale, so that PyTorch's x / scale in
     * tools/quant_ref.py gives the same quotients bit for bit. rintf rounds halves to
     * even in the default rounding mode, as torch.round does. */
    float scale = max_abs / (float)levels;
    float hi = (float)levels;
    for (int32_t i = 0; i < n; i++) {
        float v = rintf(x[i] / scale);
        v = fmaxf(v, -hi); /* fmaxf(NaN, -hi) is -hi */
        v = fminf(v, hi);
        q[i] = (int8_t)v;
    }
    return scale;
}

int32_t um_k_argmax_ref(const float *x, int32_t n)
{
    /* Strict > keeps the first of equal values; a NaN never replaces the running best. */
    int32_t best = 0;
    for (int32_t i = 1; i < n; i++)
        if (x[i] > x[best])
            best = i;
    return best;
}

double um_k_logsumexp_ref(const float *x, int32_t n)
{
    double max = -INFINITY;
    for (int32_t i = 0; i < n; i++)
        if (x[i] > max)
            max = x[i];

    /* An all -inf row has no mass, and a +inf entry dominates: both return max as is. */
    if (isinf(max))
        return max;

    double sum = 0.0;
    for (int32_t i = 0; i < n; i++)
        sum += exp((double)x[i] - max);
    return max + log(sum);
}

void um_k_vocab_stats_ref(const float *x, int32_t n, float scale, um_vocab_stats_t *out)
{
    /* Pass one: the top two values and the index of the first maximum. */
    float max = -INFINITY, second = -INFINITY;
    int32_t arg = 0;
    for (int32_t i = 0; i < n; i++) {
        float v = scale * x[i];
        if (v > max) {
            second = max;
            max = v;
            arg = i;
        } else if (v > second) {
            second = v;
        }
    }
    out->max = max;
    out->argmax = arg;
    out->second = second;
    if (max == -INFINITY) {
        out->lse = -INFINITY;
        out->p_max = out->margin = out->entropy = 0.0;
        return;
    }

    /* Pass two, in float64: s = sum e^(v - max), t = sum e^(v - max) (v - max). Then
     * lse = max + log s and entropy = log s - t / s, both without cancellation. */
    double s = 0.0, t = 0.0;
    for (int32_t i = 0; i < n; i++) {
        double v = (double)(scale * x[i]) - max;
        if (v == -INFINITY)
            continue;
        double e = exp(v);
        s += e;
        t += e * v;
    }
    out->lse = max + log(s);
    out->p_max = 1.0 / s;
    out->margin = out->p_max - exp((double)second - max) / s;
    out->entropy = log(s) - t / s;
}

int32_t um_k_gumbel_argmax_ref(const float *x, int32_t n, double temperature, uint64_t key,
                               uint64_t base)
{
    int32_t best = 0;
    double best_score = -INFINITY;
    for (int32_t i = 0; i < n; i++) {
        if (x[i] == -INFINITY)
            continue;
        double u = um_rng_uniform_key(key, base + (uint64_t)i);
        double score = (double)x[i] / temperature - log(-log(u));
        if (score > best_score) {
            best_score = score;
            best = i;
        }
    }
    return best;
}
