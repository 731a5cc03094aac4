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
