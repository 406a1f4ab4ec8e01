// The scale searches legacy blocks and K-quants share (ggml's make_qx_quants and
// make_qkx2/make_qkx3_quants), scalar and lane-parallel.
#pragma once

#include "lanes.h"

namespace ggq_quants {

// ------------------------------------------------------------------ scale searches

// Symmetric weighted scale search (ggml's make_qx_quants, rmse_type 1): codes L in
// [0, 2*nmax), value ~ scale * (L - nmax). Weights are qw, or x*x when qw is null.
// The first grid puts the largest |x| on -nmax; 18 more grids -(nmax + 0.1*k) / max,
// k = -9..9 without 0, each kept when it fits better (least squares).
template <int N>
float symmetric_search(const float* x, int nmax, const float* qw, uint8_t* L) {
    const AbsMax top = abs_max(x, N);
    if (top.mag < kGroupMaxEps) {
        std::memset(L, 0, N);
        return 0.0f;
    }
    float w[N], wx[N];
    for (int i = 0; i < N; ++i) {
        w[i] = qw ? qw[i] : x[i] * x[i];
        wx[i] = w[i] * x[i];
    }
    uint8_t trial[N];
    auto fit = [&](float iscale, float& sumlx, float& suml2) {
        sumlx = 0.0f;
        suml2 = 0.0f;
        for (int i = 0; i < N; ++i) {
            const int l = clamp_int(round_int(iscale * x[i]), -nmax, nmax - 1);
            trial[i] = static_cast<uint8_t>(l + nmax);
            const float lf = static_cast<float>(l);
            sumlx += wx[i] * lf;
            suml2 += w[i] * lf * lf;
        }
    };
    float sumlx, suml2;
    fit(static_cast<float>(-nmax) / top.value, sumlx, suml2);
    std::memcpy(L, trial, N);
    float scale = suml2 != 0.0f ? sumlx / suml2 : 0.0f;
    float best = scale * sumlx;
    for (int k = -9; k <= 9; ++k) {
        if (k == 0) continue;
        fit(-(static_cast<float>(nmax) + 0.1f * static_cast<float>(k)) / top.value, sumlx, suml2);
        if (suml2 > 0.0f && sumlx * sumlx > best * suml2) {
            std::memcpy(L, trial, N);
            scale = sumlx / suml2;
            best = scale * sumlx;
        }
    }
    return scale;
}

// Scale + minimum search (ggml's make_qkx2_quants / make_qkx3_quants, which agree once the
// weights are given): codes L in [0, nmax], value ~ scale * L - the_min. Grids
// (rmin + rdelta*k + nmax) / (max - min) for k = 0..nstep, each refit by weighted least
// squares (min clamped to <= 0); an accepted grid moves min, and later grids start from it.
// The error is the weighted squared difference, or the absolute one when kMad.
template <int N, bool kMad>
float affine_search(const float* x, const float* w, int nmax, float rmin, float rdelta, int nstep,
                    uint8_t* L, float* the_min) {
    float lo = x[0], hi = x[0];
    float sum_w = w[0];
    float sum_x = sum_w * x[0];
    for (int i = 1; i < N; ++i) {
        if (x[i] < lo) lo = x[i];
        if (x[i] > hi) hi = x[i];
        sum_w += w[i];
        sum_x += w[i] * x[i];
    }
    if (lo > 0.0f) lo = 0.0f;
    if (hi == lo) {
        std::memset(L, 0, N);
        *the_min = -lo;
        return 0.0f;
    }
    auto error = [&](float scale, float mn, const uint8_t* codes) {
        float e = 0.0f;
        for (int i = 0; i < N; ++i) {
            float diff = scale * static_cast<float>(codes[i]) + mn - x[i];
            diff = kMad ? std::fabs(diff) : diff * diff;
            e += w[i] * diff;
        }
        return e;
    };
    float iscale = static_cast<float>(nmax) / (hi - lo);
    float scale = 1.0f / iscale;
    for (int i = 0; i < N; ++i) L[i] = static_cast<uint8_t>(clamp_int(round_int(iscale * (x[i] - lo)), 0, nmax));
    float best = error(scale, lo, L);
    uint8_t trial[N];
    for (int k = 0; k <= nstep; ++k) {
        iscale = (rmin + rdelta * static_cast<float>(k) + static_cast<float>(nmax)) / (hi - lo);
        float sum_l = 0.0f, sum_l2 = 0.0f, sum_xl = 0.0f;
        for (int i = 0; i < N; ++i) {
            const int l = clamp_int(round_int(iscale * (x[i] - lo)), 0, nmax);
            trial[i] = static_cast<uint8_t>(l);
            const float wl = w[i] * static_cast<float>(l);
            sum_l += wl;
            sum_l2 += wl * static_cast<float>(l);
            sum_xl += wl * x[i];
        }
        const float det = sum_w * sum_l2 - sum_l * sum_l;
        if (!(det > 0.0f)) continue;
        float this_scale = (sum_w * sum_xl - sum_x * sum_l) / det;
        float this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det;
        if (this_min > 0.0f) {
            this_min = 0.0f;
            this_scale = sum_xl / sum_l2;
        }
        const float cur = error(this_scale, this_min, trial);
        if (cur < best) {
            std::memcpy(L, trial, N);
            best = cur;
            scale = this_scale;
            lo = this_min;
        }
    }
    *the_min = -lo;
    return scale;
}

// symmetric_search (make_qx_quants) for 8 consecutive groups of N: scales[8], L[8*N].
template <int N>
inline void symmetric_search_x8(const float* x, int nmax, const float* qw, float* scales, uint8_t* L) {
    F8 xt[N], w[N], wx[N];
    transpose_in<N>(x, xt);
    if (qw) transpose_in<N>(qw, w);
    for (int i = 0; i < N; ++i) {
        if (!qw) w[i] = xt[i] * xt[i];
        wx[i] = w[i] * xt[i];
    }
    F8 amax, vmax;
    const I8 empty = group_max8<N>(xt, amax, vmax);
    I8 best_l[N], trial[N];
    F8 sumlx, suml2;
    auto fit = [&](F8 iscale) {
        sumlx = splat(0.0f);
        suml2 = splat(0.0f);
        for (int i = 0; i < N; ++i) {
            trial[i] = clamp8(round8(iscale * xt[i]), -nmax, nmax - 1);
            const F8 lf = to_f8(trial[i]);
            sumlx += wx[i] * lf;
            suml2 += w[i] * lf * lf;
        }
    };
    fit(splat(static_cast<float>(-nmax)) / vmax);
    for (int i = 0; i < N; ++i) best_l[i] = trial[i];
    F8 scale = select8(suml2 != splat(0.0f), sumlx / suml2, splat(0.0f));
    F8 best = scale * sumlx;
    for (int k = -9; k <= 9; ++k) {
        if (k == 0) continue;
        fit(-splat(static_cast<float>(nmax) + 0.1f * static_cast<float>(k)) / vmax);
        const I8 better = (suml2 > splat(0.0f)) & (sumlx * sumlx > best * suml2);
        for (int i = 0; i < N; ++i) best_l[i] = select8(better, trial[i], best_l[i]);
        scale = select8(better, sumlx / suml2, scale);
        best = select8(better, scale * sumlx, best);
    }
    scale = select8(empty, splat(0.0f), scale);
    for (int i = 0; i < N; ++i) best_l[i] = select8(empty, splat_i(-nmax), best_l[i]);
    for (int g = 0; g < 8; ++g) scales[g] = scale[g];
    transpose_codes_out<N>(best_l, nmax, L);
}

// affine_search (make_qkx2 / make_qkx3_quants) for 8 consecutive groups of N:
// scales[8], the_mins[8], L[8*N].
template <int N, bool kMad>
inline void affine_search_x8(const float* x, const float* wts, int nmax, float rmin, float rdelta, int nstep,
                             float* scales, float* the_mins, uint8_t* L) {
    F8 xt[N], w[N];
    transpose_in<N>(x, xt);
    transpose_in<N>(wts, w);
    F8 lo = xt[0], hi = xt[0];
    F8 sum_w = w[0];
    F8 sum_x = sum_w * xt[0];
    for (int i = 1; i < N; ++i) {
        lo = select8(xt[i] < lo, xt[i], lo);
        hi = select8(xt[i] > hi, xt[i], hi);
        sum_w += w[i];
        sum_x += w[i] * xt[i];
    }
    lo = select8(lo > splat(0.0f), splat(0.0f), lo);
    const I8 flat = hi == lo;
    const F8 flat_min = lo;
    const F8 span_safe = select8(flat, splat(1.0f), hi - lo);
    I8 best_l[N], trial[N];
    auto error = [&](F8 scale, F8 mn, const I8* codes) {
        F8 e = splat(0.0f);
        for (int i = 0; i < N; ++i) {
            F8 diff = scale * to_f8(codes[i]) + mn - xt[i];
            diff = kMad ? abs8(diff) : diff * diff;
            e += w[i] * diff;
        }
        return e;
    };
    F8 iscale = splat(static_cast<float>(nmax)) / span_safe;
    F8 scale = splat(1.0f) / iscale;
    for (int i = 0; i < N; ++i) best_l[i] = clamp8(round8(iscale * (xt[i] - lo)), 0, nmax);
    F8 best = error(scale, lo, best_l);
    for (int k = 0; k <= nstep; ++k) {
        // an accepted grid moves lo, so later grids of that lane start from it
        const F8 span = select8(flat, splat(1.0f), hi - lo);
        iscale = splat(rmin + rdelta * static_cast<float>(k) + static_cast<float>(nmax)) / span;
        F8 sum_l = splat(0.0f), sum_l2 = splat(0.0f), sum_xl = splat(0.0f);
        for (int i = 0; i < N; ++i) {
            trial[i] = clamp8(round8(iscale * (xt[i] - lo)), 0, nmax);
            const F8 lf = to_f8(trial[i]);
            const F8 wl = w[i] * lf;
            sum_l += wl;
            sum_l2 += wl * lf;
            sum_xl += wl * xt[i];
        }
        const F8 det = sum_w * sum_l2 - sum_l * sum_l;
        const I8 live = (det > splat(0.0f)) & ~flat;
        F8 this_scale = (sum_w * sum_xl - sum_x * sum_l) / det;
        F8 this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det;
        const I8 clamp = this_min > splat(0.0f);
        this_min = select8(clamp, splat(0.0f), this_min);
        this_scale = select8(clamp, sum_xl / sum_l2, this_scale);
        const F8 cur = error(this_scale, this_min, trial);
        const I8 better = live & (cur < best);
        for (int i = 0; i < N; ++i) best_l[i] = select8(better, trial[i], best_l[i]);
        best = select8(better, cur, best);
        scale = select8(better, this_scale, scale);
        lo = select8(better, this_min, lo);
    }
    scale = select8(flat, splat(0.0f), scale);
    lo = select8(flat, flat_min, lo);
    for (int i = 0; i < N; ++i) best_l[i] = select8(flat, splat_i(0), best_l[i]);
    for (int g = 0; g < 8; ++g) {
        scales[g] = scale[g];
        the_mins[g] = -lo[g];
    }
    transpose_codes_out<N>(best_l, 0, L);
}

}  // namespace ggq_quants
