/*
 * The kernel table: which implementation of each op the engine calls on this host.
 * Owns one const table per ISA, the CPU probe that decides which of them this host can
 * run, and the selection made once at startup. Hot code fetches the table once per
 * forward pass and calls through it.
 *
 * Threading: call um_kernels_select before starting work threads; afterwards every
 * function here only reads immutable state and may be called from any thread.
 */
#include "kernels.h"

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <unmaskd/error.h>

#include "log.h"

#if defined(__x86_64__)
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>
#elif defined(__aarch64__)
#include <sys/auxv.h>
#ifndef HWCAP_ASIMD
#define HWCAP_ASIMD (1 << 1)
#endif
#endif

/* Tables of the SIMD builds, compiled with their own -m flags in their own files. */
#ifdef UM_KERNELS_AVX2
extern const um_kernel_table_t um_kernels_avx2_table;
#endif
#ifdef UM_KERNELS_AVX512
extern const um_kernel_table_t um_kernels_avx512_table;
#endif
#ifdef UM_KERNELS_NEON
extern const um_kernel_table_t um_kernels_neon_table;
#endif

static const um_kernel_table_t s_scalar = {
    .isa = "scalar",
    .rmsnorm = um_k_rmsnorm_ref,
    .layernorm = um_k_layernorm_ref,
    .rope = um_k_rope_ref,
    .softmax = um_k_softmax_ref,
    .silu_mul = um_k_silu_mul_ref,
    .gelu_erf = um_k_gelu_erf_ref,
    .gelu_tanh = um_k_gelu_tanh_ref,
    .add = um_k_add_ref,
    .bf16_to_f32 = um_k_bf16_to_f32_ref,
    .f32_to_bf16 = um_k_f32_to_bf16_ref,
    .argmax = um_k_argmax_ref,
    .logsumexp = um_k_logsumexp_ref,
    .vocab_stats = um_k_vocab_stats_ref,
    .gumbel_argmax = um_k_gumbel_argmax_ref,
    .quantize_s8 = um_k_quantize_s8_ref,
};

static const char *const s_isa_names[UM_ISA_COUNT] = {
    [UM_ISA_SCALAR] = "scalar", [UM_ISA_AVX2] = "avx2", [UM_ISA_AVX512] = "avx512",
    [UM_ISA_AMX] = "amx",       [UM_ISA_NEON] = "neon",
};

const char *um_isa_name(um_isa_t isa)
{
    return (unsigned)isa < UM_ISA_COUNT ? s_isa_names[isa] : NULL;
}

int um_isa_parse(const char *name, um_isa_t *out)
{
    for (int i = 0; name && i < UM_ISA_COUNT; i++) {
        if (strcmp(name, s_isa_names[i]) == 0) {
            *out = (um_isa_t)i;
            return 0;
        }
    }
    return UM_EINVAL;
}

/* ------------------------------------------------------------------------- */
/* CPU probe                                                                  */

#if defined(__x86_64__)

/* XCR0: which register state the OS saves on a context switch. */
static uint64_t s_xcr0(void)
{
    uint32_t eax, edx;
    __asm__ volatile("xgetbv" : "=a"(eax), "=d"(edx) : "c"(0));
    return ((uint64_t)edx << 32) | eax;
}

/* Linux keeps AMX tile data disabled until a process requests it. */
static int s_amx_permitted(void)
{
#ifdef SYS_arch_prctl
    const long req_xcomp_perm = 0x1023, xfeature_xtiledata = 18;
    return syscall(SYS_arch_prctl, req_xcomp_perm, xfeature_xtiledata) == 0;
#else
    return 0;
#endif
}

static int s_probe(um_isa_t isa, char *why, size_t whylen)
{
    unsigned a, b, c, d;
    if (!__get_cpuid(1, &a, &b, &c, &d)) {
        snprintf(why, whylen, "cpuid leaf 1 is not available");
        return 0;
    }
    int fma = (c >> 12) & 1, osxsave = (c >> 27) & 1, avx = (c >> 28) & 1;
    uint64_t xcr0 = osxsave ? s_xcr0() : 0;
    unsigned b7 = 0, d7 = 0;
    if (__get_cpuid_max(0, NULL) >= 7)
        __cpuid_count(7, 0, a, b7, c, d7);

    int avx2 = avx && fma && ((b7 >> 5) & 1);
    if (!avx2) {
        snprintf(why, whylen, "the CPU lacks AVX2 or FMA");
        return 0;
    }
    if ((xcr0 & 0x6) != 0x6) {
        snprintf(why, whylen, "the OS does not enable the AVX register state (XCR0 = %#llx)",
                 (unsigned long long)xcr0);
        return 0;
    }
    if (isa == UM_ISA_AVX2)
        return 1;

    /* F (16), DQ (17), BW (30), VL (31). */
    int avx512 = ((b7 >> 16) & 1) && ((b7 >> 17) & 1) && ((b7 >> 30) & 1) && ((b7 >> 31) & 1);
    if (!avx512) {
        snprintf(why, whylen, "the CPU lacks AVX-512 F, DQ, BW or VL");
        return 0;
    }
    if ((xcr0 & 0xe0) != 0xe0) {
        snprintf(why, whylen, "the OS does not enable the AVX-512 register state "
                 "(XCR0 = %#llx)", (unsigned long long)xcr0);
        return 0;
    }
    if (isa == UM_ISA_AVX512)
        return 1;

    /* AMX-BF16 (EDX 22) and AMX-TILE (EDX 24), tile state in XCR0 bits 17 and 18. */
    if (!((d7 >> 22) & 1) || !((d7 >> 24) & 1)) {
        snprintf(why, whylen, "the CPU lacks AMX-TILE or AMX-BF16");
        return 0;
    }
    if ((xcr0 & 0x60000) != 0x60000) {
        snprintf(why, whylen, "the OS does not enable the AMX tile state (XCR0 = %#llx)",
                 (unsigned long long)xcr0);
        return 0;
    }
    if (!s_amx_permitted()) {
        snprintf(why, whylen, "the kernel refused AMX tile data to this process "
                 "(arch_prctl ARCH_REQ_XCOMP_PERM)");
        return 0;
    }
    return 1;
}

#elif defined(__aarch64__)

static int s_probe(um_isa_t isa, char *why, size_t whylen)
{
    (void)isa;
    if (!(getauxval(AT_HWCAP) & HWCAP_ASIMD)) {
        snprintf(why, whylen, "AT_HWCAP does not report Advanced SIMD (asimd)");
        return 0;
    }
    return 1;
}

#else

static int s_probe(um_isa_t isa, char *why, size_t whylen)
{
    (void)isa;
    snprintf(why, whylen, "this architecture has no SIMD kernels");
    return 0;
}

#endif

/* The table built for isa, or NULL when this build has none. */
static const um_kernel_table_t *s_built(um_isa_t isa)
{
    switch (isa) {
    case UM_ISA_SCALAR:
        return &s_scalar;
#ifdef UM_KERNELS_AVX2
    case UM_ISA_AVX2:
        return &um_kernels_avx2_table;
#endif
#ifdef UM_KERNELS_AVX512
    case UM_ISA_AVX512:
    case UM_ISA_AMX:
        return &um_kernels_avx512_table;
#endif
#ifdef UM_KERNELS_NEON
    case UM_ISA_NEON:
        return &um_kernels_neon_table;
#endif
    default:
        return NULL;
    }
}

int um_isa_supported(um_isa_t isa, char *why, size_t whylen)
{
    char scratch[160];
    if (!why) {
        why = scratch;
        whylen = sizeof scratch;
    }
    if ((unsigned)isa >= UM_ISA_COUNT) {
        snprintf(why, whylen, "%d is not an ISA", (int)isa);
        return 0;
    }
    if (!s_built(isa)) {
#if defined(__x86_64__)
        int other_arch = isa == UM_ISA_NEON;
#elif defined(__aarch64__)
        int other_arch = isa != UM_ISA_NEON;
#else
        int other_arch = 1;
#endif
        snprintf(why, whylen, other_arch ? "%s kernels are for another architecture"
                                         : "this build has no %s kernels (the compiler "
                                           "could not build them)",
                 s_isa_names[isa]);
        return 0;
    }
    return isa == UM_ISA_SCALAR || s_probe(isa, why, whylen);
}

/* ------------------------------------------------------------------------- */
/* Selection                                                                  */

static um_isa_t s_selected;
static int s_selected_set;
static char s_reason[256];

static um_isa_t s_best(um_isa_t cap)
{
    for (int i = (int)cap; i > UM_ISA_SCALAR; i--) {
        /* neon and the x86 ISAs never both apply, so walking down from the cap works. */
        if (um_isa_supported((um_isa_t)i, NULL, 0))
            return (um_isa_t)i;
    }
    return UM_ISA_SCALAR;
}

int um_kernels_select(const char *cap, char *err, size_t errlen)
{
    const char *source = "--isa";
    if (!cap) {
        cap = getenv("UNMASKD_ISA");
        source = "UNMASKD_ISA";
        if (cap && !*cap)
            cap = NULL;
    }

    um_isa_t best_all = s_best((um_isa_t)(UM_ISA_COUNT - 1));
    if (!cap) {
        s_selected = best_all;
        snprintf(s_reason, sizeof s_reason, "best ISA of this host (no cap set)");
    } else {
        um_isa_t want;
        if (um_isa_parse(cap, &want) != 0) {
            snprintf(err, errlen, "%s '%s' is not an ISA: use scalar, avx2, avx512, amx "
                     "or neon", source, cap);
            return UM_EINVAL;
        }
        char why[160];
        if (!um_isa_supported(want, why, sizeof why)) {
            snprintf(err, errlen, "%s '%s' cannot run here: %s; this host supports up to "
                     "'%s'", source, cap, why, s_isa_names[best_all]);
            return UM_EINVAL;
        }
        s_selected = want;
        snprintf(s_reason, sizeof s_reason, "capped by %s=%s (host best: %s)", source, cap,
                 s_isa_names[best_all]);
        /* oneDNN's own kernels obey the same cap, so a capped run measures that ISA. */
        um_gemm_set_max_isa(want);
    }
    s_selected_set = 1;
    um_info("kernels", "ISA %s: %s", s_isa_names[s_selected], s_reason);
    return 0;
}

static pthread_once_t s_default_once = PTHREAD_ONCE_INIT;

/* Without a call to um_kernels_select: the uncapped choice, not logged. */
static void s_default_select(void)
{
    if (s_selected_set)
        return;
    s_selected = s_best((um_isa_t)(UM_ISA_COUNT - 1));
    snprintf(s_reason, sizeof s_reason, "best ISA of this host (no cap set)");
    s_selected_set = 1;
}

um_isa_t um_kernels_isa(void)
{
    pthread_once(&s_default_once, s_default_select);
    return s_selected;
}

const char *um_kernels_reason(void)
{
    um_kernels_isa();
    return s_reason;
}

const um_kernel_table_t *um_kernels(void)
{
    return s_built(um_kernels_isa());
}

const um_kernel_table_t *um_kernels_scalar(void)
{
    return &s_scalar;
}

const um_kernel_table_t *um_kernels_for(um_isa_t isa)
{
    return um_isa_supported(isa, NULL, 0) ? s_built(isa) : NULL;
}
