/* The per-group clip search screening of clip_screen.c, included once per kernel set with SCREEN_ROWS,
 * MOMENT_BOUNDS and RATIO_PARAMS (the functions' names), ATTR (their target attribute), MOMENTS, POWSUM,
 * POLYSUM (the kernels; POLYSUM only with USE_POLY 1) and POWV, LOG2V, EXP2V (16-wide
 * |a|^norm, log2, 2^y) defined; it undefines them at its end. */

#define RATIO(c) ((ratio_t){sc->s[c], sc->r[c], sc->lo[c], sc->hi[c]})

/* estimate ratio c of the current group (the polynomial where its scale's power is a normal float, else
 * the power); U and the hint follow the estimate. a_: the estimate's absolute error (alpha, plus the
 * polynomial's per lane times the scale's power), rounded up into ea[c] for the candidates' test */
#if USE_POLY
#define POLY_EST(c) (sc->sp[c] * POLYSUM(sc->buf, nv, RATIO(c), j->poly, j->norm))
#else
#define POLY_EST(c) 0.0f
#endif
#define ESTIMATE(c)                                                                                      \
    do {                                                                                                 \
        j->stats[1]++;                                                                                   \
        const int poly_ = poly_on && sc->sp[c] >= 0x1p-119f;                                             \
        const double a_ = (j->alpha + (poly_ ? poly_a * sc->sp[c] : 0.0)) * (1.0 + 1e-6);               \
        float e_;                                                                                        \
        if (poly_) { e_ = POLY_EST(c); j->stats[2] += nv; }                                              \
        else e_ = POWSUM(sc->buf, nv, RATIO(c), j->norm, u * keep + a_, &j->stats[2]);                   \
        sc->ea[c] = (float)a_;                                                                           \
        if (((double)e_ + sc->ea[c]) * up < u) u = ((double)e_ + sc->ea[c]) * up;                        \
        if (e_ < best) { best = e_; hint = (c); }                                                        \
        sc->est[c] = e_;                                                                                 \
        sc->done[n_done++] = (int32_t)(c);                                                               \
    } while (0)

/* scales, reciprocals, code ranges [lo, hi] and clipping lower bounds of the ratios p [nc], 16 at a time:
 * torch's _minmax_params op for op (true division, round half to even) and _clip_lower_bound's terms
 * (the group's max above the range, its min below it), with a 1e-3 margin for the approximate power */
ATTR static void RATIO_PARAMS(const float *p, int64_t c_begin, int64_t c_end, float absmax, float wmin, float wmax,
                              int maxq, int sym, int kind, float norm, float *s_out, float *r_out, float *lo_out,
                              float *hi_out, float *lb_out, float *sp_out) {
    const float tiny = kind == SCALE_F16 ? 6.103515625e-05f : 1.17549435e-38f;
    for (int64_t c0 = c_begin; c0 < c_end; c0 += VW) {
        const int64_t n = c_end - c0 < VW ? c_end - c0 : VW;
        float pt[VW];
        for (int64_t i = 0; i < VW; i++) pt[i] = p[c0 + (i < n ? i : 0)];
        vf pv, s, z;
        memcpy(&pv, pt, sizeof pv);
        if (sym) {
            s = 2.0f * (absmax * pv) / (float)maxq;
            s = round_scale(vmax(s, splat(tiny)), kind);
            z = splat((float)((maxq + 1) / 2));
        } else {
            const vf lo = (wmin < 0.0f ? wmin : 0.0f) * pv, hi = (wmax > 0.0f ? wmax : 0.0f) * pv;
            s = round_scale(vmax((hi - lo) / (float)maxq, splat(tiny)), kind);
            z = ((-lo / s) + 12582912.0f) - 12582912.0f;  /* round half to even: -lo / s <= maxq (1 + 2^-8) */
            z = vmin(vmax(z, splat(0.0f)), splat((float)maxq));
        }
        const vf lo_code = -z, hi_code = (float)maxq - z;
        const vf over_hi = vmax(wmax - hi_code * s, splat(0.0f)), over_lo = vmax(lo_code * s - wmin, splat(0.0f));
        const vf lb = (POWV(over_hi, norm) + POWV(over_lo, norm)) * (1.0f - 1e-3f);
        const vf r = 1.0f / s;
        float o[5][VW];
        memcpy(o[0], &s, sizeof o[0]);
        memcpy(o[1], &r, sizeof o[1]);
        memcpy(o[2], &lo_code, sizeof o[2]);
        memcpy(o[3], &hi_code, sizeof o[3]);
        memcpy(o[4], &lb, sizeof o[4]);
        memcpy(s_out + c0, o[0], (size_t)n * sizeof(float));
        memcpy(r_out + c0, o[1], (size_t)n * sizeof(float));
        memcpy(lo_out + c0, o[2], (size_t)n * sizeof(float));
        memcpy(hi_out + c0, o[3], (size_t)n * sizeof(float));
        memcpy(lb_out + c0, o[4], (size_t)n * sizeof(float));
        if (sp_out) {  /* s^norm, for the polynomial estimates */
            const vf sp = POWV(s, norm);
            memcpy(o[0], &sp, sizeof o[0]);
            memcpy(sp_out + c0, o[0], (size_t)n * sizeof(float));
        }
    }
}

/* moment lower bounds of the survivors surv [ns] into lb (max with their clipping bounds) */
ATTR static void MOMENT_BOUNDS(job_t *j, scratch_t *sc, int64_t nv, int64_t ns) {
    for (int64_t k = 0; k < ns; k++) {
        MOMENTS(sc->buf, nv, RATIO(sc->surv[k]), &sc->s1[k], &sc->s2[k]);
        j->stats[0]++;
    }
    /* S2^(norm-1) / S1^(norm-2) = 2^((norm-1) log2 S2 - (norm-2) log2 S1), 16 ratios at a time */
    for (int64_t k0 = 0; k0 < ns; k0 += VW) {
        float a1[VW], a2[VW], out[VW];
        const int64_t n = ns - k0 < VW ? ns - k0 : VW;
        for (int64_t i = 0; i < VW; i++) {
            a1[i] = i < n ? sc->s1[k0 + i] : 1.0f;
            a2[i] = i < n ? sc->s2[k0 + i] : 1.0f;
        }
        vf v1, v2;
        memcpy(&v1, a1, sizeof v1);
        memcpy(&v2, a2, sizeof v2);
        const vi tiny = vlt(v1, splat(1e-30f)) | vlt(v2, splat(1e-30f));
        v1 = sel(tiny, splat(1.0f), v1);
        v2 = sel(tiny, splat(1.0f), v2);
        vf m = EXP2V((j->norm - 1.0f) * LOG2V(v2) - (j->norm - 2.0f) * LOG2V(v1));
        m = sel(tiny, splat(0.0f), m) * (1.0f - 1e-3f);  /* margin: float sums, logs and powers, torch's error */
        memcpy(out, &m, sizeof out);
        for (int64_t i = 0; i < n; i++) {
            const int64_t c = sc->surv[k0 + i];
            sc->lb[c] = out[i] > sc->lb[c] ? out[i] : sc->lb[c];
        }
    }
}

ATTR static void SCREEN_ROWS(job_t *j, scratch_t *sc) {
    const int64_t g = j->g, nc = j->nc, nv = (g + VW - 1) / VW;
    const int maxq = (1 << j->bits) - 1;
    const double up = 1.0 / (1.0 - j->tau), keep = 1.0 + j->tau;
    const int use_moments = j->norm >= 2.0f;
    const int poly_on = USE_POLY && j->poly != NULL;
    const double poly_a = j->poly_eps * (double)(nv * VW);  /* every lane, the zero padding's too */
    int64_t hint = nc / 8;
    for (int64_t row = 0; row < j->m; row++) {
        const float *w = j->w + row * g;
        uint8_t *cand = j->cand + row * nc;
        memset(sc->buf, 0, (size_t)nv * VW * sizeof(float));  /* zero padding: code 0, residual 0, term 0 */
        memcpy(sc->buf, w, (size_t)g * sizeof(float));
        float absmax, wmin, wmax;
        const int finite = group_stats(sc->buf, nv, &absmax, &wmin, &wmax);
        /* non-finite weights, or terms / sums near float32's range (|d| <= 4 absmax): no estimate is
           claimed, every ratio is a candidate and the exact errors decide, as in the dense search */
        const double top = (j->norm > 2.0f ? j->norm : 2.0) * log2((double)absmax * 4.0) + log2((double)g);
        j->range[3 * row] = absmax;
        j->range[3 * row + 1] = wmin < 0.0f ? wmin : 0.0f;
        j->range[3 * row + 2] = wmax > 0.0f ? wmax : 0.0f;
        j->stats[3] += !finite;
        if (!finite || top > 120.0) {
            memset(cand, 1, (size_t)nc);
            j->best[row] = -1;
            continue;
        }
        /* symmetric with decreasing ratios: the clipping bound grows as the ratio shrinks (the scale can only
           fall, the range with it), so once a computed bound exceeds U every later ratio's does: their
           parameters are computed 16 at a time only while the last bound is <= U */
        const int lazy = j->sym && j->decreasing;
        int64_t n_par = lazy ? (hint / VW + 1) * VW : nc;
        n_par = n_par < nc ? n_par : nc;
#define PARAMS(c0, c1) RATIO_PARAMS(j->p, c0, c1, absmax, wmin, wmax, maxq, j->sym, j->scale_kind, j->norm, sc->s, \
                                    sc->r, sc->lo, sc->hi, sc->lb, poly_on ? sc->sp : NULL)
        PARAMS(0, n_par);
        double u = INFINITY;
        float best = INFINITY;
        int64_t n_done = 0;
        const int64_t first = hint;
        ESTIMATE(first);  /* the previous group's best: a tight U from the start */
        while (n_par < nc && (double)sc->lb[n_par - 1] <= u) {
            const int64_t c1 = n_par + VW < nc ? n_par + VW : nc;
            PARAMS(n_par, c1);
            n_par = c1;
        }
#undef PARAMS
        int64_t ns = 0;
        for (int64_t c = 0; c < n_par; c++) {  /* branch-free: survivors of the clipping bounds */
            sc->surv[ns] = (int32_t)c;
            ns += c != first && (double)sc->lb[c] <= u;
        }
        if (use_moments && ns > 0) MOMENT_BOUNDS(j, sc, nv, ns);
        /* best first: the ratios left, by ascending bound, so U reaches the minimum early and the rest stop
           at the first bound above it */
        int64_t nl = 0;
        for (int64_t k = 0; k < ns; k++) {
            const int32_t c = sc->surv[k];
            if ((double)sc->lb[c] > u) continue;
            int64_t i = nl++;
            while (i > 0 && sc->lb[sc->surv[i - 1]] > sc->lb[c]) { sc->surv[i] = sc->surv[i - 1]; i--; }
            sc->surv[i] = c;
        }
        for (int64_t k = 0; k < nl && (double)sc->lb[sc->surv[k]] <= u; k++) ESTIMATE(sc->surv[k]);
        /* candidates: estimated ratios within the tolerance of U (all ratios where no estimate is finite) */
        if (!(u < INFINITY)) {
            memset(cand, 1, (size_t)nc);
            j->best[row] = -1;
            continue;
        }
        memset(cand, 0, (size_t)nc);
        int32_t n_cand = 0, only = -1;
        for (int64_t k = 0; k < n_done; k++) {
            const int32_t c = sc->done[k];
            if ((double)sc->est[c] <= u * keep + sc->ea[c]) { cand[c] = 1; n_cand++; only = c; }
        }
        j->best[row] = n_cand == 1 ? only : -1;
    }
}

#undef ESTIMATE
#undef POLY_EST
#undef RATIO
/* this inclusion's parameters: the next one defines its own */
#undef SCREEN_ROWS
#undef MOMENT_BOUNDS
#undef ATTR
#undef MOMENTS
#undef POWSUM
#undef POLYSUM
#undef USE_POLY
#undef RATIO_PARAMS
#undef POWV
#undef LOG2V
#undef EXP2V
