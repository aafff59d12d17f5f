/* Vector helpers shared by moeq's CPU kernels (clip_screen.c, rtn_codes.c): 16-wide GNU C vectors and,
 * on x86-64, AVX-512 and AVX2 versions of log2 / 2^y / |a|^norm picked at run time (kernel_isa).
 *
 * Accuracy (least-squares fits; the whole |a|^norm measured in tests/moeq/test_clip_native.py): log2
 * <= 3e-6 absolute, 2^y <= 2.7e-6 relative, |a|^norm <= 1.6e-5 relative where the result is in
 * [2^-120, 2^127). */
#ifndef MOEQ_NATIVE_VEC_H
#define MOEQ_NATIVE_VEC_H

#include <math.h>
#include <stdint.h>
#include <string.h>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define HAVE_X86 1
#include <immintrin.h>
#define AVX512 __attribute__((target("avx512f,avx512dq,fma")))
#define AVX2 __attribute__((target("avx2,fma")))
#endif

#define VW 16
typedef float vf __attribute__((vector_size(VW * 4)));
typedef int32_t vi __attribute__((vector_size(VW * 4)));
#define INLINE static inline __attribute__((always_inline))
typedef float vf4 __attribute__((vector_size(16)));  /* the 4-lane pieces below */
typedef int32_t vi4 __attribute__((vector_size(16)));

/* 16 copies of x (as 0 + x: -0 becomes +0), built from a 4-lane broadcast: GCC 12's lowering of (vf){0} + x
 * on narrower targets stores the 16 lanes one at a time and reloads them as vectors, 14-18% of the portable
 * screening's time (perf, same machine as below) */
INLINE vf splat(float x) {
    const float y = x + 0.0f;
    const vf4 p = {y, y, y, y};
    vf4 t[VW / 4];
    for (int k = 0; k < VW / 4; k++) t[k] = p;
    vf v;
    memcpy(&v, t, sizeof v);
    return v;
}
INLINE vi splati(int32_t x) { return (vi)splat(0.0f) + x; }
INLINE vf sel(vi mask, vf a, vf b) { return (vf)((mask & (vi)a) | (~mask & (vi)b)); }

/* Comparisons (all-ones lanes where true), in 4-lane pieces: where the target's vectors are narrower than
 * 16 lanes (SSE2, AVX2, NEON) GCC 12 lowers a 16-lane comparison one lane at a time (a scalar compare, a
 * set and a conditional move per lane), while a 4-lane one is one packed compare on every target. Measured
 * on a 2-core AMD EPYC without AVX-512 (GCC 12.2, -O3): the portable screening spent 53% of its time in
 * those scalar lanes; a Qwen3-30B-A3B-shaped layer's RTN took 54 s on 2 threads with 16-lane comparisons,
 * 16-lane splats and the lane-by-lane sum (benchmarks/results/rtn_speed_avx2.md, portable row: with these pieces). */
#define PIECEWISE(name, R, T, P, RP, expr)                                  \
    INLINE R name(T a, T b) {                                               \
        P x[VW / 4], y[VW / 4];                                             \
        RP r[VW / 4];                                                       \
        R out;                                                              \
        memcpy(x, &a, sizeof x);                                            \
        memcpy(y, &b, sizeof y);                                            \
        for (int k = 0; k < VW / 4; k++) r[k] = (expr);                     \
        memcpy(&out, r, sizeof out);                                        \
        return out;                                                         \
    }
PIECEWISE(vlt, vi, vf, vf4, vi4, (vi4)(x[k] < y[k]))
PIECEWISE(vgt, vi, vf, vf4, vi4, (vi4)(x[k] > y[k]))
PIECEWISE(veq, vi, vf, vf4, vi4, (vi4)(x[k] == y[k]))
PIECEWISE(vilt, vi, vi, vi4, vi4, x[k] < y[k])

/* a > b ? a : b and a < b ? a : b lane by lane (b where either is NaN); on x86-64 SSE's maxps/minps are exactly
 * these, one instruction per 4 lanes instead of a compare and three logic operations */
#ifdef HAVE_X86
PIECEWISE(vmax, vf, vf, __m128, __m128, _mm_max_ps(x[k], y[k]))
PIECEWISE(vmin, vf, vf, __m128, __m128, _mm_min_ps(x[k], y[k]))
#else
INLINE vf vmax(vf a, vf b) { return sel(vgt(a, b), a, b); }
INLINE vf vmin(vf a, vf b) { return sel(vlt(a, b), a, b); }
#endif
#undef PIECEWISE

/* sum of the 16 lanes as a tree (lane i + lane i + 8, then + 4, + 2, + 1), the first two levels on 4-lane
 * pieces (through memory lane by lane it was 10% of the portable screening) */
INLINE float hsum(vf a) {
    vf4 t[VW / 4];
    memcpy(t, &a, sizeof t);
    const vf4 q = (t[0] + t[2]) + (t[1] + t[3]);
    return (q[0] + q[2]) + (q[1] + q[3]);
}

/* The polynomials of the portable and AVX2 sets (one pair, so both have the error bounds measured in
 * clip_native.py), highest degree first: log2(1 + t) / t on t in [sqrt(1/2) - 1, sqrt(2) - 1), and 2^f on
 * f in [-1/2, 1/2] */
static const float LOG2_POLY[6] = {-0.205298290f, 0.322085500f, -0.367703974f, 0.479324371f, -0.721122563f,
                                   1.44271576f};
static const float EXP2_POLY[5] = {0.00956051052f, 0.0559170395f, 0.240249813f, 0.693121970f, 0.999999166f};

/* log2 a for a >= 2^-126 (absolute error <= 3e-6: least-squares degree-6 polynomial on [sqrt(1/2), sqrt(2))) */
INLINE vf log2_generic(vf a) {
    const vi ib = (vi)a;
    vi e = (ib >> 23) - 127;
    vf m = (vf)((ib & 0x007fffff) | 0x3f800000);       /* [1, 2) */
    const vi big = vgt(m, splat(1.41421356f));
    m = sel(big, m * 0.5f, m);                          /* [sqrt(1/2), sqrt(2)) */
    e = e - big;                                        /* big is -1 where halved */
    const vf t = m - 1.0f;
    vf l = splat(LOG2_POLY[0]);                         /* log2(1 + t) / t */
    for (int i = 1; i < 6; i++) l = l * t + LOG2_POLY[i];
    return __builtin_convertvector(e, vf) + l * t;
}

/* 2^y, y clamped to [-126, 127] (relative error <= 2.7e-6 in range: least-squares degree 4 on [-1/2, 1/2]) */
INLINE vf exp2_generic(vf y) {
    const vf yc = vmin(splat(127.0f), vmax(splat(-126.0f), y));
    const vf n = (yc + 12582912.0f) - 12582912.0f;      /* round to nearest: 1.5 * 2^23 */
    const vf f = yc - n;                                /* [-1/2, 1/2], exact */
    vf q = splat(EXP2_POLY[0]);
    for (int i = 1; i < 5; i++) q = q * f + EXP2_POLY[i];
    return q * (vf)((__builtin_convertvector(n, vi) + 127) << 23);
}

/* |a|^norm for a >= 0 (sign cleared): 0 for a < 2^-126, inf above 2^127 */
INLINE vf pow_generic(vf a, float norm) {
    const vf y = splat(norm) * log2_generic(a);
    const vf r = sel(vilt((vi)a, splati(0x00800000)), splat(0.0f), exp2_generic(y));
    return sel(vgt(y, splat(127.0f)), splat(INFINITY), r);
}

/* pow_generic over x [n] in place */
INLINE void pow_array(float *x, int64_t n, float norm) {
    for (int64_t i = 0; i < n; i += VW) {
        float t[VW] = {0};
        const int64_t k = n - i < VW ? n - i : VW;
        memcpy(t, x + i, (size_t)k * sizeof(float));
        vf v;
        memcpy(&v, t, sizeof v);
        v = pow_generic((vf)((vi)v & splati(0x7fffffff)), norm);
        memcpy(t, &v, sizeof v);
        memcpy(x + i, t, (size_t)k * sizeof(float));
    }
}


/* ---------------------------------------------------------------- AVX-512 */
#ifdef HAVE_X86

/* log2 a for a > 0 (-inf at 0): getexp/getmant, least-squares degree 6 on [-1/4, 1/2) */
AVX512 INLINE __m512 log2_avx512(__m512 a) {
    const __m512 m = _mm512_getmant_ps(a, _MM_MANT_NORM_p75_1p5, _MM_MANT_SIGN_zero); /* [0.75, 1.5) */
    __m512 e = _mm512_getexp_ps(a);                                            /* floor(log2 a) */
    e = _mm512_mask_add_ps(e, _mm512_cmp_ps_mask(m, _mm512_set1_ps(1.0f), _CMP_LT_OQ), e,
                           _mm512_set1_ps(1.0f));                              /* m was halved */
    const __m512 t = _mm512_sub_ps(m, _mm512_set1_ps(1.0f));
    __m512 l = _mm512_set1_ps(-0.138730898f);                                  /* log2(1 + t) / t */
    l = _mm512_fmadd_ps(l, t, _mm512_set1_ps(0.288162708f));
    l = _mm512_fmadd_ps(l, t, _mm512_set1_ps(-0.371157289f));
    l = _mm512_fmadd_ps(l, t, _mm512_set1_ps(0.48210296f));
    l = _mm512_fmadd_ps(l, t, _mm512_set1_ps(-0.721109509f));
    l = _mm512_fmadd_ps(l, t, _mm512_set1_ps(1.44267058f));
    return _mm512_fmadd_ps(l, t, e);
}

/* 2^y for y >= -200 (below 2^-149 scalef gives 0, above 2^128 inf) */
AVX512 INLINE __m512 exp2_avx512(__m512 y) {
    const __m512 n = _mm512_roundscale_ps(y, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512 f = _mm512_sub_ps(y, n);
    __m512 q = _mm512_set1_ps(0.00956051052f);
    q = _mm512_fmadd_ps(q, f, _mm512_set1_ps(0.0559170395f));
    q = _mm512_fmadd_ps(q, f, _mm512_set1_ps(0.240249813f));
    q = _mm512_fmadd_ps(q, f, _mm512_set1_ps(0.693121970f));
    q = _mm512_fmadd_ps(q, f, _mm512_set1_ps(0.999999166f));
    return _mm512_scalef_ps(q, n);
}

/* |a|^norm for a >= 0: a = 0 gives log2 = -inf, clamped to -200, and 2^-200 underflows to 0 */
AVX512 INLINE __m512 pow_avx512(__m512 a, float norm) {
    return exp2_avx512(_mm512_max_ps(_mm512_mul_ps(log2_avx512(a), _mm512_set1_ps(norm)), _mm512_set1_ps(-200.0f)));
}

/* the same on GNU C vectors, for the ISA-generic code of clip_screen_rows.h */
AVX512 INLINE vf powv_avx512(vf a, float norm) { return (vf)pow_avx512((__m512)a, norm); }
AVX512 INLINE vf log2v_avx512(vf a) { return (vf)log2_avx512((__m512)a); }
AVX512 INLINE vf exp2v_avx512(vf y) { return (vf)exp2_avx512(_mm512_max_ps((__m512)y, _mm512_set1_ps(-200.0f))); }

#endif

/* ---------------------------------------------------------------- AVX2 + FMA (8 lanes; x86-64 without AVX-512) */
#ifdef HAVE_X86

/* log2 a for a >= 2^-126: log2_generic's reduction and polynomial, with FMA */
AVX2 INLINE __m256 log2_avx2(__m256 a) {
    const __m256i ib = _mm256_castps_si256(a);
    __m256i e = _mm256_sub_epi32(_mm256_srli_epi32(ib, 23), _mm256_set1_epi32(127));  /* a >= 0: no sign bit */
    __m256 m = _mm256_castsi256_ps(_mm256_or_si256(_mm256_and_si256(ib, _mm256_set1_epi32(0x007fffff)),
                                                   _mm256_set1_epi32(0x3f800000)));  /* [1, 2) */
    const __m256 big = _mm256_cmp_ps(m, _mm256_set1_ps(1.41421356f), _CMP_GT_OQ);
    m = _mm256_blendv_ps(m, _mm256_mul_ps(m, _mm256_set1_ps(0.5f)), big);             /* [sqrt(1/2), sqrt(2)) */
    e = _mm256_sub_epi32(e, _mm256_castps_si256(big));                               /* +1 where halved */
    const __m256 t = _mm256_sub_ps(m, _mm256_set1_ps(1.0f));
    __m256 l = _mm256_set1_ps(LOG2_POLY[0]);                                         /* log2(1 + t) / t */
    for (int i = 1; i < 6; i++) l = _mm256_fmadd_ps(l, t, _mm256_set1_ps(LOG2_POLY[i]));
    return _mm256_fmadd_ps(l, t, _mm256_cvtepi32_ps(e));
}

/* 2^y, y clamped to [-126, 127]: exp2_generic's polynomial, with FMA */
AVX2 INLINE __m256 exp2_avx2(__m256 y) {
    const __m256 yc = _mm256_min_ps(_mm256_set1_ps(127.0f), _mm256_max_ps(_mm256_set1_ps(-126.0f), y));
    const __m256 n = _mm256_round_ps(yc, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m256 f = _mm256_sub_ps(yc, n);  /* [-1/2, 1/2], exact */
    __m256 q = _mm256_set1_ps(EXP2_POLY[0]);
    for (int i = 1; i < 5; i++) q = _mm256_fmadd_ps(q, f, _mm256_set1_ps(EXP2_POLY[i]));
    const __m256i p2 = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(q, _mm256_castsi256_ps(p2));
}

/* |a|^norm for a >= 0 (sign cleared), as pow_generic: 0 for a < 2^-126, inf above 2^127 */
AVX2 INLINE __m256 pow_avx2(__m256 a, __m256 norm) {
    const __m256 y = _mm256_mul_ps(norm, log2_avx2(a));
    const __m256 tiny = _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(0x00800000), _mm256_castps_si256(a)));
    const __m256 r = _mm256_andnot_ps(tiny, exp2_avx2(y));
    return _mm256_blendv_ps(r, _mm256_set1_ps(INFINITY), _mm256_cmp_ps(y, _mm256_set1_ps(127.0f), _CMP_GT_OQ));
}

/* the same on 16-lane GNU C vectors (two halves), for the ISA-generic code of clip_screen_rows.h */
#define AVX2_HALVES(name, params, expr)                         \
    AVX2 INLINE vf name params {                                \
        __m256 h[2];                                            \
        memcpy(h, &a, sizeof h);                                \
        for (int k = 0; k < 2; k++) h[k] = (expr);              \
        memcpy(&a, h, sizeof a);                                \
        return a;                                               \
    }
AVX2_HALVES(powv_avx2, (vf a, float norm), pow_avx2(h[k], _mm256_set1_ps(norm)))
AVX2_HALVES(log2v_avx2, (vf a), log2_avx2(h[k]))
AVX2_HALVES(exp2v_avx2, (vf a), exp2_avx2(h[k]))
#undef AVX2_HALVES

#endif

/* Kernel sets: 2 = AVX-512, 1 = AVX2 + FMA, 0 = portable. isa: 0 = the best the CPU has, 1 = portable only,
 * 2 = AVX2 at most (1 and 2 for tests) */
static inline int kernel_isa(int isa) {
#ifdef HAVE_X86
    if (isa == 1) return 0;
    /* the AVX-512 set also runs AVX2 + FMA code (rtn_codes.c): every AVX-512 CPU has both, a VM's CPUID may not */
    const int avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    if (isa != 2 && avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq")) return 2;
    return avx2 ? 1 : 0;
#else
    (void)isa;
    return 0;
#endif
}

#endif
