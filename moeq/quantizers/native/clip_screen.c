/* Screening step of the RTN/GPTQ MSE clip search (moeq/quantizers/rtn.py, _best_params), on the CPU.
 *
 * For each group of g float32 weights and each shrink ratio p[c] the search needs the error
 * E[c] = sum_i |d_i|^norm, d_i = q_c(w_i) - w_i. moeq decides the winner only from exact errors computed
 * by torch (bit-identical to a dense search); this file only finds, per group, the ratios that can still
 * hold the first minimum ("candidates"). A ratio is dropped only when a proven bound puts its E above
 * U >= min_c E[c], so the candidates always contain the first argmin. Per group:
 *
 *   1. LBclip[c]: the group's max and min alone, clipped to ratio c's range (every other term is >= 0).
 *   2. Moments (norm >= 2): S1 = sum |d|, S2 = sum d^2, a few vector ops per weight, no power. As
 *      log sum |d|^p is convex in p, extrapolating the chord through p = 1 and p = 2 bounds E from below:
 *      E >= LBmom = S2^(norm-1) / S1^(norm-2) (~0.97 E for residuals spread uniformly in [-s/2, s/2]).
 *   3. Estimates Ê of E with (1 - tau) E - a_c <= Ê <= (1 + tau) E + a_c; U = min over estimated ratios of
 *      (Ê + a_c) / (1 - tau). Two kinds (clip_native.poly_fit decides which a norm gets):
 *      - polynomial (portable and AVX2 sets): E = s^norm sum t^norm with t = |d| fl(1/s), t^norm a
 *        degree-POLY_DEG polynomial in t - 1/4 where t <= 1/2 (every weight whose code is inside the range)
 *        and the power where not (clipped weights: a few per group, one 8-lane branch); a_c = alpha + 16 nv
 *        eps s^norm with eps the polynomial's proven bound (~3.8e-6 at norm 2.4, against a mean term of
 *        0.056). ~20 vector ops per 8 weights instead of ~40; used while s^norm >= 2^-119;
 *      - the power |d|^norm (vec.h's polynomials; a_c = alpha): the AVX-512 set (its power is 26 ops per 16
 *        weights), norms the polynomial fits loosely (< 2), and scales whose power is not a normal float. A
 *        running partial Ê above U (1 + tau) + a_c drops the ratio early (the remaining terms are >= 0).
 *   The previous group's best is estimated first (U is tight from the start); the ratios 1 leaves get
 *   their moments (2), and those 2 leaves are estimated in ascending order of their bound, stopping at the
 *   first bound above U. Candidates: estimated ratios with Ê <= U (1 + tau) + a_c.
 *
 * Error sources (tau, a_c and the bounds' 1e-3 margins cover them; clip_native.screening_error_bound and
 * poly_error_bound):
 *   - the code is round(w * fl(1/s)) instead of round(w / s): it differs only within |q| 2^-23 of a
 *     rounding tie, where both codes give |d| = s/2 up to that amount (relative 4 |q| 2^-23);
 *   - |d|^norm and s^norm through vec.h's polynomials (<= 1.6e-5 relative, measured); the estimates'
 *     polynomial (absolute, proven) and t's two roundings (relative norm 2^-22);
 *   - results below 2^-126 are flushed or approximated (each < 1.2e-38: alpha = 1e-30 covers g < 1e8);
 *   - float32 sums: 16 lanes of g/16 terms, then a 16-lane tree.
 * Groups with non-finite weights or terms near float32's range keep every ratio as a candidate.
 *
 * Measured on this project's 2-core AMD EPYC without AVX-512 (benchmarks/results/rtn_speed_avx2.md), a
 * Qwen3-30B-A3B-shaped layer at W4 g128: ~26 ratios per group get moments, ~9.4 are estimated, of 80; the
 * polynomial estimates take the AVX2 screening of 98304 groups from 0.34 s to 0.26 s on 1 thread.
 *
 * No torch headers: moeq compiles this with the system C compiler on first use (clip_native.py) and calls
 * it through ctypes on tensors' data pointers. Three kernel sets, picked at run time: AVX-512 intrinsics
 * (getexp/getmant/scalef: ~26 instead of ~45 vector ops per |d|^norm), AVX2 + FMA intrinsics (the portable
 * polynomials on two 8-lane halves; x86-64 CPUs without AVX-512), and portable GNU C vectors.
 */
#include <stdlib.h>

#include "threads.h"
#include "vec.h"

enum { SCALE_F32 = 0, SCALE_BF16 = 1, SCALE_F16 = 2 };
enum { POLY_DEG = 7 };  /* degree of the estimates' polynomial (clip_native.poly_fit) */

typedef struct {
    float s, r, lo, hi;  /* scale, fl(1/s), code range [lo, hi] (codes minus zero) */
} ratio_t;

typedef struct {
    const float *w;      /* [m, g] row-major */
    int64_t m, g;
    const float *p;      /* [nc] ratios */
    int64_t nc;
    int bits, sym, scale_kind, isa, decreasing;  /* isa: kernel_isa's set; decreasing: p[c + 1] < p[c] */
    float norm;
    double tau, alpha;
    const float *poly;   /* [POLY_DEG + 1] t^norm as a polynomial in t - 1/4 on t in [0, 1/2], lowest degree
                            first; NULL: power estimates */
    double poly_eps;     /* |poly(t - 1/4) - t^norm| on [0, 1/2], the rounding of t - 1/4 and Horner's included */
    uint8_t *cand;       /* [m, nc] out: 1 = candidate */
    int32_t *best;       /* [m] out: the candidate where there is exactly one, else -1 */
    float *range;        /* [m, 3] out: max |w|, min(min w, 0), max(max w, 0) (what the scales need) */
    int64_t stats[4];    /* out: ratios with moments, ratios estimated, 16-wide vectors estimated, groups
                            with non-finite weights (their range is not meaningful) */
    int failed;          /* out: scratch allocation failed */
} job_t;

/* ---------------------------------------------------------------- portable kernels (GNU C vectors) */

/* a ratio's parameters broadcast once per loop: a splat inside the loop body is not hoisted (it is split
 * into the target's vector pieces after the loop optimizations ran) and cost 18% of the portable screening */
typedef struct {
    vf s, r, lo, hi;
} ratio_v;

INLINE ratio_v ratio_splat(ratio_t rt) { return (ratio_v){splat(rt.s), splat(rt.r), splat(rt.lo), splat(rt.hi)}; }

/* |c s - w| with c = clamp(round(w * fl(1/s))); |q| <= 255 after the clamp, so 1.5 * 2^23 rounds */
INLINE vf resid_generic(vf x, ratio_v rt) {
    vf q = x * rt.r;
    q = vmin(rt.hi, vmax(rt.lo, q));  /* q < lo ? lo : q, then q > hi ? hi : q */
    const vf c = (q + 12582912.0f) - 12582912.0f;
    return (vf)((vi)(c * rt.s - x) & splati(0x7fffffff));  /* c s is exact: the residual rounds once */
}

/* S1 = sum |d|, S2 = sum d^2 of the residuals (resid_generic) */
INLINE void moments_generic(const float *buf, int64_t nv, ratio_t rt, float *s1, float *s2) {
    const ratio_v rv = ratio_splat(rt);
    vf a1 = splat(0.0f), a2 = splat(0.0f);
    for (int64_t v = 0; v < nv; v++) {
        vf x;
        memcpy(&x, buf + v * VW, sizeof x);
        const vf d = resid_generic(x, rv);
        a1 += d;
        a2 += d * d;
    }
    *s1 = hsum(a1);
    *s2 = hsum(a2);
}

INLINE float powsum_generic(const float *buf, int64_t nv, ratio_t rt, float norm, double thr, int64_t *vectors) {
    const ratio_v rv = ratio_splat(rt);
    vf acc = splat(0.0f);
    for (int64_t v = 0; v < nv; v++) {
        vf x;
        memcpy(&x, buf + v * VW, sizeof x);
        acc += pow_generic(resid_generic(x, rv), norm);
        if ((v & 3) == 3 && v + 1 < nv && (double)hsum(acc) > thr) {
            *vectors += v + 1;
            return INFINITY;
        }
    }
    *vectors += nv;
    return hsum(acc);
}

/* sum of t^norm, t = |d| fl(1/s) the residual in units of the scale: poly(t) where t <= 1/2 (every code
 * inside the range), the power where not (clipped weights, a few per group) */
INLINE float polysum_generic(const float *buf, int64_t nv, ratio_t rt, const float *poly, float norm) {
    const ratio_v rv = ratio_splat(rt);
    const vf half = splat(0.5f), quarter = splat(0.25f);
    vf c[POLY_DEG + 1];
    for (int i = 0; i <= POLY_DEG; i++) c[i] = splat(poly[i]);
    vf acc = splat(0.0f);
    for (int64_t v = 0; v < nv; v++) {
        vf x;
        memcpy(&x, buf + v * VW, sizeof x);
        const vf t = resid_generic(x, rv) * rv.r;
        const vf tc = vmin(t, half) - quarter;  /* the fit's centre */
        vf q = c[POLY_DEG];
        for (int i = POLY_DEG - 1; i >= 0; i--) q = q * tc + c[i];
        const vi out = vgt(t, half);
        int any = 0;
        for (int i = 0; i < VW; i++) any |= out[i];
        acc += any ? sel(out, pow_generic(t, norm), q) : q;
    }
    return hsum(acc);
}

/* ---------------------------------------------------------------- AVX-512 kernels */
#ifdef HAVE_X86
AVX512 INLINE __m512 resid_avx512(__m512 x, __m512 s, __m512 r, __m512 lo, __m512 hi) {
    __m512 q = _mm512_min_ps(_mm512_max_ps(_mm512_mul_ps(x, r), lo), hi);
    q = _mm512_roundscale_ps(q, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    return _mm512_abs_ps(_mm512_fmsub_ps(q, s, x));
}

AVX512 INLINE void moments_avx512(const float *buf, int64_t nv, ratio_t rt, float *s1, float *s2) {
    const __m512 s = _mm512_set1_ps(rt.s), r = _mm512_set1_ps(rt.r);
    const __m512 lo = _mm512_set1_ps(rt.lo), hi = _mm512_set1_ps(rt.hi);
    __m512 a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps();
    for (int64_t v = 0; v < nv; v++) {
        const __m512 d = resid_avx512(_mm512_load_ps(buf + v * VW), s, r, lo, hi);
        a1 = _mm512_add_ps(a1, d);
        a2 = _mm512_fmadd_ps(d, d, a2);
    }
    *s1 = _mm512_reduce_add_ps(a1);
    *s2 = _mm512_reduce_add_ps(a2);
}

AVX512 INLINE float powsum_avx512(const float *buf, int64_t nv, ratio_t rt, float norm, double thr,
                                  int64_t *vectors) {
    const __m512 s = _mm512_set1_ps(rt.s), r = _mm512_set1_ps(rt.r);
    const __m512 lo = _mm512_set1_ps(rt.lo), hi = _mm512_set1_ps(rt.hi);
    __m512 acc = _mm512_setzero_ps();
    for (int64_t v = 0; v < nv; v++) {
        acc = _mm512_add_ps(acc, pow_avx512(resid_avx512(_mm512_load_ps(buf + v * VW), s, r, lo, hi), norm));
        if ((v & 3) == 3 && v + 1 < nv && (double)_mm512_reduce_add_ps(acc) > thr) {
            *vectors += v + 1;
            return INFINITY;
        }
    }
    *vectors += nv;
    return _mm512_reduce_add_ps(acc);
}
#endif

/* ---------------------------------------------------------------- AVX2 + FMA kernels (16 lanes as two halves) */
#ifdef HAVE_X86
AVX2 INLINE __m256 resid_avx2(__m256 x, __m256 s, __m256 r, __m256 lo, __m256 hi) {
    __m256 q = _mm256_min_ps(hi, _mm256_max_ps(lo, _mm256_mul_ps(x, r)));
    q = _mm256_round_ps(q, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    return _mm256_andnot_ps(_mm256_set1_ps(-0.0f), _mm256_fmsub_ps(q, s, x));  /* c s exact: one rounding */
}

/* the 16-lane tree of hsum over (lanes 0-7, lanes 8-15) */
AVX2 INLINE float hsum_avx2(__m256 a0, __m256 a1) {
    const __m256 t = _mm256_add_ps(a0, a1);                                          /* i + (i + 8) */
    const __m128 q = _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1)); /* + 4 */
    return (q[0] + q[2]) + (q[1] + q[3]);
}

AVX2 INLINE void moments_avx2(const float *buf, int64_t nv, ratio_t rt, float *s1, float *s2) {
    const __m256 s = _mm256_set1_ps(rt.s), r = _mm256_set1_ps(rt.r);
    const __m256 lo = _mm256_set1_ps(rt.lo), hi = _mm256_set1_ps(rt.hi);
    __m256 a1[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()}, a2[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};
    for (int64_t v = 0; v < nv; v++) {
        for (int k = 0; k < 2; k++) {
            const __m256 d = resid_avx2(_mm256_load_ps(buf + v * VW + 8 * k), s, r, lo, hi);
            a1[k] = _mm256_add_ps(a1[k], d);
            a2[k] = _mm256_fmadd_ps(d, d, a2[k]);
        }
    }
    *s1 = hsum_avx2(a1[0], a1[1]);
    *s2 = hsum_avx2(a2[0], a2[1]);
}

AVX2 INLINE float powsum_avx2(const float *buf, int64_t nv, ratio_t rt, float norm, double thr, int64_t *vectors) {
    const __m256 s = _mm256_set1_ps(rt.s), r = _mm256_set1_ps(rt.r);
    const __m256 lo = _mm256_set1_ps(rt.lo), hi = _mm256_set1_ps(rt.hi), nv8 = _mm256_set1_ps(norm);
    __m256 acc[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};
    for (int64_t v = 0; v < nv; v++) {
        for (int k = 0; k < 2; k++) {
            const __m256 d = resid_avx2(_mm256_load_ps(buf + v * VW + 8 * k), s, r, lo, hi);
            acc[k] = _mm256_add_ps(acc[k], pow_avx2(d, nv8));
        }
        if ((v & 3) == 3 && v + 1 < nv && (double)hsum_avx2(acc[0], acc[1]) > thr) {
            *vectors += v + 1;
            return INFINITY;
        }
    }
    *vectors += nv;
    return hsum_avx2(acc[0], acc[1]);
}

/* polysum_generic with AVX2 + FMA on two 8-lane halves */
AVX2 INLINE float polysum_avx2(const float *buf, int64_t nv, ratio_t rt, const float *poly, float norm) {
    const __m256 s = _mm256_set1_ps(rt.s), r = _mm256_set1_ps(rt.r);
    const __m256 lo = _mm256_set1_ps(rt.lo), hi = _mm256_set1_ps(rt.hi), half = _mm256_set1_ps(0.5f);
    const __m256 quarter = _mm256_set1_ps(0.25f), nv8 = _mm256_set1_ps(norm);
    __m256 c[POLY_DEG + 1];
    for (int i = 0; i <= POLY_DEG; i++) c[i] = _mm256_set1_ps(poly[i]);
    __m256 acc[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};
    for (int64_t v = 0; v < nv; v++) {
        for (int k = 0; k < 2; k++) {
            const __m256 t = _mm256_mul_ps(resid_avx2(_mm256_load_ps(buf + v * VW + 8 * k), s, r, lo, hi), r);
            const __m256 tc = _mm256_sub_ps(_mm256_min_ps(t, half), quarter);  /* the fit's centre */
            __m256 q = c[POLY_DEG];
            for (int i = POLY_DEG - 1; i >= 0; i--) q = _mm256_fmadd_ps(q, tc, c[i]);
            const __m256 out = _mm256_cmp_ps(t, half, _CMP_GT_OQ);
            if (_mm256_movemask_ps(out)) q = _mm256_blendv_ps(q, pow_avx2(t, nv8), out);
            acc[k] = _mm256_add_ps(acc[k], q);
        }
    }
    return hsum_avx2(acc[0], acc[1]);
}
#endif

/* ---------------------------------------------------------------- per-group search (one copy per ISA) */

/* round float32 scales to the scale dtype, to nearest even (bf16: 8 significant bits; fp16: 11, for
 * x >= 2^-14, the fp16 normal range the callers clamp to; above 65504 inf) */
INLINE vf round_scale(vf x, int kind) {
    vi b = (vi)x;
    if (kind == SCALE_BF16) return (vf)((b + 0x7fff + ((b >> 16) & 1)) & (int32_t)0xffff0000);
    if (kind == SCALE_F16) {
        const vf r = (vf)((b + 0x0fff + ((b >> 13) & 1)) & (int32_t)0xffffe000);
        return sel(vgt(r, splat(65504.0f)), splat(INFINITY), r);
    }
    return x;
}

/* max |w|, min w, max w of w [nv * 16]; 0 if any weight is not finite. The zero padding can lower the max
 * to 0 or raise the min to 0: every use clamps them so anyway (asymmetric ranges hold 0; max |w| >= 0). */
INLINE int group_stats(const float *buf, int64_t nv, float *absmax, float *wmin, float *wmax) {
    vf mx = splat(-INFINITY), mn = splat(INFINITY);
    vi bad = splati(0);
    for (int64_t v = 0; v < nv; v++) {
        vf x;
        memcpy(&x, buf + v * VW, sizeof x);
        bad |= ~veq(x - x, splat(0.0f));  /* inf - inf and nan - nan are nan */
        mx = vmax(mx, x);
        mn = vmin(mn, x);
    }
    float a[VW], b[VW];
    int32_t k[VW];
    memcpy(a, &mx, sizeof a);
    memcpy(b, &mn, sizeof b);
    memcpy(k, &bad, sizeof k);
    float hi = a[0], lo = b[0];
    int ok = 1;
    for (int i = 0; i < VW; i++) {
        hi = a[i] > hi ? a[i] : hi;
        lo = b[i] < lo ? b[i] : lo;
        ok &= k[i] == 0;
    }
    *wmax = hi;
    *wmin = lo;
    *absmax = hi > -lo ? hi : -lo;
    return ok;
}

typedef struct {  /* per-thread scratch of screen_rows: per ratio (nc) and one zero-padded group */
    float *buf, *est, *lb, *s, *r, *lo, *hi, *s1, *s2, *sp, *ea;
    int32_t *surv, *done;
} scratch_t;

static int scratch_alloc(scratch_t *sc, int64_t g, int64_t nc) {
    const int64_t nv = (g + VW - 1) / VW;
    memset(sc, 0, sizeof *sc);
    sc->buf = aligned_alloc(64, (size_t)nv * VW * sizeof(float));
    sc->est = malloc((size_t)(10 * nc) * sizeof(float));
    sc->surv = malloc((size_t)(2 * nc) * sizeof(int32_t));
    if (!sc->buf || !sc->est || !sc->surv) return -1;
    float **f[] = {&sc->lb, &sc->s, &sc->r, &sc->lo, &sc->hi, &sc->s1, &sc->s2, &sc->sp, &sc->ea};
    for (int i = 0; i < 9; i++) *f[i] = sc->est + (i + 1) * nc;
    sc->done = sc->surv + nc;
    return 0;
}

static void scratch_free(scratch_t *sc) {
    free(sc->buf);
    free(sc->est);
    free(sc->surv);
}

/* the per-group search, once per kernel set (clip_screen_rows.h: the portable and the AVX-512 kernels) */
#define SCREEN_ROWS screen_rows_generic
#define MOMENT_BOUNDS moment_bounds_generic
#define ATTR
#define MOMENTS moments_generic
#define POWSUM powsum_generic
#define POLYSUM polysum_generic
#define USE_POLY 1
#define RATIO_PARAMS ratio_params_generic
#define POWV pow_generic
#define LOG2V log2_generic
#define EXP2V exp2_generic
#include "clip_screen_rows.h"
#ifdef HAVE_X86
#define SCREEN_ROWS screen_rows_avx512
#define MOMENT_BOUNDS moment_bounds_avx512
#define ATTR AVX512
#define MOMENTS moments_avx512
#define POWSUM powsum_avx512
#define USE_POLY 0
#define RATIO_PARAMS ratio_params_avx512
#define POWV powv_avx512
#define LOG2V log2v_avx512
#define EXP2V exp2v_avx512
#include "clip_screen_rows.h"
#define SCREEN_ROWS screen_rows_avx2
#define MOMENT_BOUNDS moment_bounds_avx2
#define ATTR AVX2
#define MOMENTS moments_avx2
#define POWSUM powsum_avx2
#define POLYSUM polysum_avx2
#define USE_POLY 1
#define RATIO_PARAMS ratio_params_avx2
#define POWV powv_avx2
#define LOG2V log2v_avx2
#define EXP2V exp2v_avx2
#include "clip_screen_rows.h"
#endif

static void *screen_thread(void *arg) {
    job_t *j = arg;
    scratch_t sc;
    if (scratch_alloc(&sc, j->g, j->nc)) {
        j->failed = 1;
    } else {
#ifdef HAVE_X86
        if (j->isa == 2) screen_rows_avx512(j, &sc);
        else if (j->isa == 1) screen_rows_avx2(j, &sc);
        else
#endif
            screen_rows_generic(j, &sc);
    }
    scratch_free(&sc);
    return NULL;
}

/* Candidates of m groups w [m, g]: cand [m, nc] uint8, best [m] int32 (the candidate where exactly one,
 * else -1), range [m, 3] (max |w|, min(min w, 0), max(max w, 0): exact, the inputs of the scales). stats
 * [4]: ratios whose moments were taken, ratios estimated, 16-wide vectors estimated, groups with
 * non-finite weights.
 * poly: the estimates' polynomial [POLY_DEG + 1] (clip_native.poly_fit; coefficients of (t - 1/4)^k) with its
 * bound poly_eps, or NULL for the power estimates everywhere. isa: 0 = best available, 1 = portable kernels
 * only, 2 = AVX2 at most (tests). Splits the groups over nthreads POSIX threads. Returns 0, -1 on bad
 * arguments, -2 when memory for the scratch could not be allocated. */
int moeq_clip_screen(const float *w, int64_t m, int64_t g, const float *p, int64_t nc, int bits, int sym,
                     int scale_kind, float norm, double tau, double alpha, const float *poly, double poly_eps,
                     int nthreads, int isa, uint8_t *cand, int32_t *best, float *range, int64_t *stats) {
    if (m < 0 || g <= 0 || nc <= 0 || bits < 1 || bits > 8 || scale_kind < 0 || scale_kind > 2 || sym < 0 ||
        sym > 1 || !(tau > 0.0 && tau < 0.5) || !(alpha >= 0.0) || !(norm >= 1.0f && norm <= 8.0f) ||
        (poly && !(poly_eps >= 0.0 && poly_eps < 1.0)))
        return -1;
    nthreads = clamp_threads(nthreads, m);
    const int kset = kernel_isa(isa);
    int decreasing = 1;
    for (int64_t c = 0; c + 1 < nc; c++) decreasing &= p[c + 1] < p[c];
    job_t jobs[MAX_THREADS];
    const int64_t per = (m + nthreads - 1) / nthreads;
    for (int t = 0; t < nthreads; t++) {
        const int64_t r0 = t * per < m ? t * per : m, r1 = r0 + per < m ? r0 + per : m;
        jobs[t] = (job_t){w + r0 * g, r1 - r0, g, p, nc, bits, sym, scale_kind, kset, decreasing, norm, tau, alpha,
                          poly, poly_eps, cand + r0 * nc, best + r0, range + 3 * r0, {0, 0, 0, 0}, 0};
    }
    run_jobs(jobs, sizeof jobs[0], nthreads, screen_thread);
    int failed = 0;
    for (int i = 0; i < 4; i++) {
        stats[i] = 0;
        for (int t = 0; t < nthreads; t++) stats[i] += jobs[t].stats[i];
    }
    for (int t = 0; t < nthreads; t++) failed |= jobs[t].failed;
    return failed ? -2 : 0;
}

/* |x|^norm through the estimates' power (isa as above), for tests of its error bound. */
int moeq_pow_approx(const float *x, int64_t n, float norm, int isa, float *out);

#ifdef HAVE_X86
AVX512 static void pow_avx512_array(const float *x, int64_t n, float norm, float *out) {
    for (int64_t i = 0; i < n; i += VW) {
        const __mmask16 k = n - i >= VW ? 0xffff : (__mmask16)((1u << (n - i)) - 1);
        const __m512 v = _mm512_abs_ps(_mm512_maskz_loadu_ps(k, x + i));
        _mm512_mask_storeu_ps(out + i, k, pow_avx512(v, norm));
    }
}
#endif

#ifdef HAVE_X86
AVX2 static void pow_avx2_array(const float *x, int64_t n, float norm, float *out) {
    const __m256 nv = _mm256_set1_ps(norm);
    for (int64_t i = 0; i < n; i += 8) {
        float t[8] = {0};
        const int64_t k = n - i < 8 ? n - i : 8;
        memcpy(t, x + i, (size_t)k * sizeof(float));
        const __m256 v = _mm256_andnot_ps(_mm256_set1_ps(-0.0f), _mm256_loadu_ps(t));
        _mm256_storeu_ps(t, pow_avx2(v, nv));
        memcpy(out + i, t, (size_t)k * sizeof(float));
    }
}
#endif

int moeq_pow_approx(const float *x, int64_t n, float norm, int isa, float *out) {
#ifdef HAVE_X86
    const int kset = kernel_isa(isa);
    if (kset == 2) { pow_avx512_array(x, n, norm, out); return 0; }
    if (kset == 1) { pow_avx2_array(x, n, norm, out); return 0; }
#else
    (void)isa;
#endif
    memcpy(out, x, (size_t)n * sizeof(float));
    pow_array(out, n, norm);
    return 0;
}

/* the kernel set moeq_clip_screen picks with isa 0 (kernel_isa: 2 AVX-512, 1 AVX2, 0 portable) */
int moeq_clip_kernels(void) { return kernel_isa(0); }
