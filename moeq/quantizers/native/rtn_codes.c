/* RTN codes of moeq's CPU path (moeq/quantizers/rtn.py, rtn_quantize_with_error): the codes and packed words
 * of moeq_kernels.packing (quantize_with_params, pack) bit for bit, and the error sums of the report, in one
 * pass over the weights. Built with clip_screen.c into one library (clip_native.py). */
#include <stdlib.h>

#include "threads.h"
#include "vec.h"

typedef struct {
    const float *w, *s, *z;  /* w [m, g]; s, z [m] (z NULL: symmetric) */
    int64_t m, g;
    int bits, packed, isa;   /* isa: kernel_isa's set */
    uint8_t *out;            /* codes [m, g], or packed [m, g * bits / 8] bytes (little-endian words) */
    double sums[2];
    int status;
} codes_job_t;

/* the 16 codes qi packed little-end first, bits 1/2/4/8 per code (moeq_kernels.packing.pack): 16 * bits / 8
 * bytes into out */
INLINE void pack16(vi qi, int bits, uint8_t *out) {
    typedef int32_t v8i __attribute__((vector_size(32)));
    typedef int32_t v4i __attribute__((vector_size(16)));
    typedef int32_t v2i __attribute__((vector_size(8)));
    if (bits == 8) {
        typedef uint8_t v16b __attribute__((vector_size(16)));
        const v16b b = __builtin_convertvector(qi, v16b);
        memcpy(out, &b, 16);
        return;
    }
    const v8i p2 = __builtin_shufflevector(qi, qi, 0, 2, 4, 6, 8, 10, 12, 14) |
                   (__builtin_shufflevector(qi, qi, 1, 3, 5, 7, 9, 11, 13, 15) << bits);
    if (bits == 4) {
        typedef uint8_t v8b __attribute__((vector_size(8)));
        const v8b b = __builtin_convertvector(p2, v8b);
        memcpy(out, &b, 8);
        return;
    }
    const v4i p4 = __builtin_shufflevector(p2, p2, 0, 2, 4, 6) |
                   (__builtin_shufflevector(p2, p2, 1, 3, 5, 7) << (2 * bits));
    if (bits == 2) {
        typedef uint8_t v4b __attribute__((vector_size(4)));
        const v4b b = __builtin_convertvector(p4, v4b);
        memcpy(out, &b, 4);
        return;
    }
    const v2i p8 = __builtin_shufflevector(p4, p4, 0, 2) | (__builtin_shufflevector(p4, p4, 1, 3) << (4 * bits));
    out[0] = (uint8_t)p8[0];  /* bits == 1 */
    out[1] = (uint8_t)p8[1];
}

/* codes of x [n] (n <= 16; n < 16 only at a group's end) under scale sf and zero zf, into out (one byte per
 * code, or packed), with their float32 error terms added to e and squares to w2; bad collects non-finite
 * weights */
INLINE void codes_block(const float *x, int64_t n, float sf, float zf, float maxq, int bits, int packed,
                        uint8_t *out, vf *e, vf *w2, vi *bad) {
    vf v;
    if (n == VW) {
        memcpy(&v, x, sizeof v);
    } else {
        float t[VW] = {0};
        memcpy(t, x, (size_t)n * sizeof(float));
        memcpy(&v, t, sizeof v);
    }
    *bad |= ~veq(v - v, splat(0.0f));  /* inf - inf, nan: nan */
    vf q = v / sf;  /* true division, as torch.div */
    q = vmin(vmax(q, splat(-4194304.0f)), splat(4194304.0f));  /* beyond +-2^22 the clamp below decides */
    q = ((q + 12582912.0f) - 12582912.0f) + zf;                    /* round half to even, + zero */
    q = vmin(vmax(q, splat(0.0f)), splat(maxq));
    const vf d = (q - zf) * sf - v;
    *e += d * d;  /* padding lanes: w = 0 has code z exactly, d = 0 */
    *w2 += v * v;
    const vi qi = __builtin_convertvector(q, vi);
    if (packed && n == VW) {
        pack16(qi, bits, out);
        return;
    }
    int32_t qa[VW];
    memcpy(qa, &qi, sizeof qa);
    if (!packed) {
        for (int64_t i = 0; i < n; i++) out[i] = (uint8_t)qa[i];
        return;
    }
    const int per = 8 / bits;  /* a partial block: codes per byte, low bits first */
    for (int64_t b = 0; b < n / per; b++) {
        uint32_t byte = 0;
        for (int i = 0; i < per; i++) byte |= (uint32_t)qa[b * per + i] << (bits * i);
        out[b] = (uint8_t)byte;
    }
}

INLINE void rtn_codes_impl(codes_job_t *j) {
    const float maxq = (float)((1 << j->bits) - 1), zsym = (float)(1 << (j->bits - 1));
    const int64_t g = j->g, row_bytes = j->packed ? g * j->bits / 8 : g;
    for (int64_t row = 0; row < j->m; row++) {
        const float sf = j->s[row], zf = j->z ? j->z[row] : zsym;
        vf e = splat(0.0f), w2 = splat(0.0f);
        vi bad = splati(0);
        for (int64_t i = 0; i < g; i += VW) {
            uint8_t *out = j->out + row * row_bytes + (j->packed ? i * j->bits / 8 : i);
            codes_block(j->w + row * g + i, g - i < VW ? g - i : VW, sf, zf, maxq, j->bits, j->packed, out, &e,
                        &w2, &bad);
        }
        int32_t k[VW];
        memcpy(k, &bad, sizeof k);
        for (int i = 0; i < VW; i++)
            if (k[i]) { j->status = -3; return; }
        j->sums[0] += hsum(e);
        j->sums[1] += hsum(w2);
    }
}

static void rtn_codes_generic(codes_job_t *j) { rtn_codes_impl(j); }

#ifdef HAVE_X86
/* rtn_codes_impl with AVX2 + FMA, 8 codes at a time, g a multiple of 8; nib: the packed code width (2 or 4:
 * the 8 codes are 8 * nib bits of one word) or 0 (one byte per code: uint8 codes, and 8-bit words, whose
 * bytes are the codes in order). The codes are rtn_codes_impl's (true division, round half to even, the
 * clamps); the error sums contract to FMA. 4-bit words of one 2048 x 2048 chunk (16 MiB of float32) on the
 * AVX-512 machine of 2026-12-03 (1 thread, min of 15): 1.75 ms, against 4.66 ms for the portable code
 * compiled for SSE2 and 9.5 ms compiled for AVX-512 (its 16-lane byte conversions and packing become
 * scalar), so AVX-512 CPUs run this one too. */
AVX2 INLINE void codes_avx2(codes_job_t *j, int nib) {
    const float zsym = (float)(1 << (j->bits - 1));
    const __m256 maxq = _mm256_set1_ps((float)((1 << j->bits) - 1)), lim = _mm256_set1_ps(4194304.0f);
    const __m256 zero = _mm256_setzero_ps();
    const __m256i shifts = _mm256_setr_epi32(0, nib, 2 * nib, 3 * nib, 4 * nib, 5 * nib, 6 * nib, 7 * nib);
    const int64_t row_bytes = j->packed ? j->g * j->bits / 8 : j->g;
    for (int64_t row = 0; row < j->m; row++) {
        const __m256 sf = _mm256_set1_ps(j->s[row]), zf = _mm256_set1_ps(j->z ? j->z[row] : zsym);
        const float *w = j->w + row * j->g;
        uint8_t *out = j->out + row * row_bytes;
        __m256 e = zero, w2 = zero, bad = zero;
        for (int64_t i = 0; i < j->g; i += 8) {
            const __m256 v = _mm256_loadu_ps(w + i);
            bad = _mm256_or_ps(bad, _mm256_cmp_ps(_mm256_sub_ps(v, v), zero, _CMP_NEQ_UQ));  /* inf, nan */
            __m256 q = _mm256_min_ps(_mm256_max_ps(_mm256_div_ps(v, sf), _mm256_sub_ps(zero, lim)), lim);
            q = _mm256_add_ps(_mm256_round_ps(q, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC), zf);
            q = _mm256_min_ps(_mm256_max_ps(q, zero), maxq);
            const __m256 d = _mm256_fmsub_ps(_mm256_sub_ps(q, zf), sf, v);
            e = _mm256_fmadd_ps(d, d, e);
            w2 = _mm256_fmadd_ps(v, v, w2);
            const __m256i qi = _mm256_cvtps_epi32(q);
            if (nib) {  /* code k at bits k * nib of the word, OR-ed across the lanes */
                const __m256i sh = _mm256_sllv_epi32(qi, shifts);
                __m128i x = _mm_or_si128(_mm256_castsi256_si128(sh), _mm256_extracti128_si256(sh, 1));
                x = _mm_or_si128(x, _mm_shuffle_epi32(x, 0x4e));  /* lanes (2, 3, 0, 1) */
                x = _mm_or_si128(x, _mm_shuffle_epi32(x, 0xb1));  /* lanes (1, 0, 3, 2) */
                const int32_t word = _mm_cvtsi128_si32(x);
                memcpy(out + i * nib / 8, &word, (size_t)nib);  /* 8 * nib bits: the word's low nib bytes */
            } else {  /* codes <= 255: the unsigned saturations are exact */
                const __m128i h = _mm_packus_epi32(_mm256_castsi256_si128(qi), _mm256_extracti128_si256(qi, 1));
                _mm_storel_epi64((__m128i *)(out + i), _mm_packus_epi16(h, h));
            }
        }
        if (_mm256_movemask_ps(bad)) { j->status = -3; return; }
        float a[8], b[8];
        _mm256_storeu_ps(a, e);
        _mm256_storeu_ps(b, w2);
        double se = 0.0, sw = 0.0;
        for (int k = 0; k < 8; k++) { se += a[k]; sw += b[k]; }
        j->sums[0] += se;
        j->sums[1] += sw;
    }
}

/* codes_avx2 with its code width a constant (the store's branch leaves the loop); packed 1-bit codes (not
 * a format moeq writes) take the portable code */
AVX2 static void rtn_codes_avx2(codes_job_t *j) {
    if (j->packed && j->bits == 4) codes_avx2(j, 4);
    else if (j->packed && j->bits == 2) codes_avx2(j, 2);
    else codes_avx2(j, 0);  /* uint8 codes, 8-bit words */
}
#endif

static void *codes_thread(void *arg) {
    codes_job_t *j = arg;
#ifdef HAVE_X86
    if (j->isa >= 1 && j->g % 8 == 0 && !(j->packed && j->bits == 1)) { rtn_codes_avx2(j); return NULL; }
#endif
    rtn_codes_generic(j);
    return NULL;
}

/* RTN codes and error of m groups w [m, g] under scales s [m] (float32 values of the scale dtype) and zeros
 * z [m] (float32; NULL: symmetric, 2^(bits-1)): codes clamp(round(w / s) + z, 0, maxq), the ops of
 * moeq_kernels.packing.quantize_with_params (true division, round half to even), so the same bits. out:
 * the codes [m, g] uint8, or with packed (g * bits a multiple of 32, bits dividing 8) the bytes of
 * moeq_kernels.packing.pack's little-endian int32 words [m, g * bits / 32]. sums [2] += (sum over groups
 * of float32 sums of ((q - z) s - w)^2, the same of w^2), in double. isa as moeq_clip_screen's (0 best,
 * 1 portable only, 2 AVX2 at most). Returns 0, -1 on bad arguments, -3 at a non-finite weight. */
int moeq_rtn_codes(const float *w, int64_t m, int64_t g, const float *s, const float *z, int bits, int packed,
                   int nthreads, int isa, uint8_t *out, double *sums) {
    if (m < 0 || g <= 0 || bits < 1 || bits > 8 || (packed && (8 % bits || (g * bits) % 32))) return -1;
    nthreads = clamp_threads(nthreads, m);
    const int kset = kernel_isa(isa);  /* AVX2 (also on AVX-512 CPUs) where g is a multiple of 8, else portable */
    const int64_t per = (m + nthreads - 1) / nthreads, row_bytes = packed ? g * bits / 8 : g;
    codes_job_t jobs[MAX_THREADS];
    for (int t = 0; t < nthreads; t++) {
        const int64_t r0 = t * per < m ? t * per : m, r1 = r0 + per < m ? r0 + per : m;
        jobs[t] = (codes_job_t){w + r0 * g, s + r0, z ? z + r0 : NULL, r1 - r0, g, bits, packed, kset,
                                out + r0 * row_bytes, {0.0, 0.0}, 0};
    }
    run_jobs(jobs, sizeof jobs[0], nthreads, codes_thread);
    int status = 0;
    for (int t = 0; t < nthreads; t++) {
        sums[0] += jobs[t].sums[0];
        sums[1] += jobs[t].sums[1];
        status = status ? status : jobs[t].status;
    }
    return status;
}

