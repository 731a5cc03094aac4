/*
 * Counter-based random numbers for the sampler.
 *
 * u64(seed, stream, index) = mix(mix(seed + G * (stream + 1)) + G * (index + 1)) with
 * G = 0x9E3779B97F4A7C15 and mix the splitmix64 finalizer. A pure function of its
 * counters: the same request gives the same numbers on any thread count, and the
 * PyTorch reference in tools/llada_ref.py computes the same values.
 */
#ifndef UM_RNG_H
#define UM_RNG_H

#include <stdint.h>

#define UM_RNG_GOLDEN 0x9E3779B97F4A7C15ULL

/* Streams per step s: Gumbel noise uses 2s, the remasking policy 2s + 1. */
#define UM_RNG_STREAM_GUMBEL(step) (2ULL * (uint64_t)(step))
#define UM_RNG_STREAM_REMASK(step) (2ULL * (uint64_t)(step) + 1ULL)

static inline uint64_t um_rng_mix(uint64_t z)
{
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}

static inline uint64_t um_rng_key(uint64_t seed, uint64_t stream)
{
    return um_rng_mix(seed + UM_RNG_GOLDEN * (stream + 1));
}

/* The largest double below 1. */
#define UM_RNG_BELOW_ONE 0x1.fffffffffffffp-1

/*
 * Uniform in (0, 1): the top 53 bits, offset by half a unit so 0 never occurs. The
 * largest value, (2^53 - 0.5) / 2^53, rounds to 1.0 in double, so it is capped at the
 * largest double below 1 (once in 2^53 draws), which keeps log(-log u) finite.
 */
static inline double um_rng_uniform_key(uint64_t key, uint64_t index)
{
    uint64_t z = um_rng_mix(key + UM_RNG_GOLDEN * (index + 1));
    double u = ((double)(z >> 11) + 0.5) * (1.0 / 9007199254740992.0);
    return u < UM_RNG_BELOW_ONE ? u : UM_RNG_BELOW_ONE;
}

static inline double um_rng_uniform(uint64_t seed, uint64_t stream, uint64_t index)
{
    return um_rng_uniform_key(um_rng_key(seed, stream), index);
}

#endif /* UM_RNG_H */
