// ggq's block encoders in C++: byte-identical to ggml_quantize_chunk at the pinned llama.cpp.
//
// Written from the algorithms (ggml-quants.c and ggq/ggml/*.py describe them), not copied.
// What makes the bytes identical is the float arithmetic, so every kernel here follows three rules:
//
//  * float32 only, in the operation order of the reference (a*b*c is (a*b)*c, a sum runs left
//    to right from the same start value), compiled without FMA contraction and without
//    -ffast-math (CMakeLists: -ffp-contract=off), so each operation rounds exactly as ggml's;
//  * rounding to an integer is the 1.5 * 2^23 trick (round half to even), float -> int
//    conversions truncate as cvttss2si does, and narrowing stores wrap as C's do;
//  * ties in max / argmax searches keep the first element (strict comparisons).
//
// The searches that dominate the time (the candidate-scale loops) also exist lane-parallel,
// one sub-block per lane, 8 at a time: the same operations per lane, selects for branches.
//
// A row encoder takes one row (n values, a whole number of blocks) and, optionally, the
// imatrix column weights of that row; rows are independent, which is what makes the
// thread split in quants.cpp free.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__SSE2__) || defined(_M_X64)
#include <emmintrin.h>
#define GGQ_QUANTS_SSE2 1
#endif

namespace ggq_quants {

constexpr int kQK = 32;     // weights per legacy / IQ4_NL block
constexpr int kQKK = 256;   // weights per K-quant / IQ4_XS super-block
constexpr float kGroupMaxEps = 1e-15f;

// ------------------------------------------------------------------ scalar helpers

inline uint32_t bits_of(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    return u;
}

inline float float_of(uint32_t u) {
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

// Round to the nearest integer, half to even, for |v| < 2^22: adding 1.5 * 2^23 leaves the
// integer in the low mantissa bits. Larger |v| give the same (meaningless) bits as ggml's.
inline int round_int(float v) {
    const float shifted = v + 12582912.0f;
    return static_cast<int>(bits_of(shifted) & 0x007fffffu) - 0x00400000;
}

// C's (int)v for a float: truncation; out of range (and NaN) gives INT_MIN, as cvttss2si does.
inline int32_t trunc_int(float v) {
#ifdef GGQ_QUANTS_SSE2
    return _mm_cvttss_si32(_mm_set_ss(v));
#else
    if (!(v > -2147483648.0f && v < 2147483648.0f)) return INT32_MIN;
    return static_cast<int32_t>(v);
#endif
}

// C's (int)roundf(v): half away from zero. Below 2^22 the fraction v - trunc(v) is exact and
// decides; beyond (and for NaN) roundf itself.
inline int32_t round_away_int(float v) {
    if (std::fabs(v) < 4194304.0f) {
        const int32_t t = trunc_int(v);
        const float frac = v - static_cast<float>(t);
        return frac >= 0.5f ? t + 1 : frac <= -0.5f ? t - 1 : t;
    }
    return trunc_int(std::round(v));
}

// Narrowing stores wrap modulo 256 (C's conversion to int8_t / uint8_t on every ggml target).
inline int8_t wrap_i8(int v) { return static_cast<int8_t>(static_cast<uint8_t>(v & 0xff)); }
inline uint8_t wrap_u8(int v) { return static_cast<uint8_t>(v & 0xff); }

template <class T>
inline T max_of(T a, T b) { return a > b ? a : b; }  // ggml's MAX: the second when unordered
template <class T>
inline T min_of(T a, T b) { return a < b ? a : b; }
inline int clamp_int(int v, int lo, int hi) { return max_of(lo, min_of(hi, v)); }

// float32 -> IEEE binary16, round to nearest even; NaN -> 0x7e00 with the sign kept.
inline uint16_t to_half(float f) {
    const uint32_t w = bits_of(f);
    const uint16_t sign = static_cast<uint16_t>((w >> 16) & 0x8000u);
    const uint32_t mag = w & 0x7fffffffu;
    if (mag > 0x7f800000u) return sign | 0x7e00u;            // NaN
    if (mag >= 0x477ff000u) return sign | 0x7c00u;           // >= 65520 rounds to inf
    if (mag < 0x38800000u) {                                 // below 2^-14: subnormal or zero
        // |f| * 2^24 is exact; adding 2^23 rounds it to an integer, half to even
        const float scaled = float_of(mag) * 16777216.0f + 8388608.0f;
        return sign | static_cast<uint16_t>(bits_of(scaled) - bits_of(8388608.0f));
    }
    uint32_t h = ((mag >> 23) - 112u) << 10 | ((mag >> 13) & 0x3ffu);  // rebias 127 -> 15
    const uint32_t rest = mag & 0x1fffu;
    if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) ++h;  // a carry moves into the exponent
    return sign | static_cast<uint16_t>(h);
}

// IEEE binary16 -> float32, exactly (NaN payloads kept, quieted).
inline float from_half(uint16_t h) {
    const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
    const uint32_t exp = (h >> 10) & 0x1fu;
    const uint32_t man = h & 0x3ffu;
    if (exp == 0x1fu) return float_of(sign | 0x7f800000u | (man << 13) | (man ? 0x00400000u : 0u));
    if (exp != 0) return float_of(sign | ((exp + 112u) << 23) | (man << 13));
    const float sub = static_cast<float>(man) * 5.9604644775390625e-08f;  // man * 2^-24, exact
    return float_of(sign | bits_of(sub));
}

// Round through fp16 and back: what a decoder will see of a stored scale.
inline float half_round(float f) { return from_half(to_half(f)); }

inline void put_half(uint8_t* dst, float f) {
    const uint16_t h = to_half(f);
    dst[0] = static_cast<uint8_t>(h & 0xff);
    dst[1] = static_cast<uint8_t>(h >> 8);
}

inline uint16_t get_half(const uint8_t* src) {
    return static_cast<uint16_t>(src[0] | (src[1] << 8));
}

// First element of largest magnitude: (|v|, v), both 0 when none is above 0.
struct AbsMax {
    float mag = 0.0f;
    float value = 0.0f;
};

inline AbsMax abs_max(const float* x, int n) {
    AbsMax m;
    for (int i = 0; i < n; ++i) {
        const float a = std::fabs(x[i]);
        if (a > m.mag) {
            m.mag = a;
            m.value = x[i];
        }
    }
    return m;
}

// C loop "s = 0; for i: s += x[i] * x[i]".
inline float sum_squares(const float* x, int64_t n) {
    float s = 0.0f;
    for (int64_t i = 0; i < n; ++i) s += x[i] * x[i];
    return s;
}

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

// Symmetric search with coordinate descent (ggml's make_q3_quants, do_rmse): weights x*x,
// first grid from the largest |x|, then up to 5 passes moving one code at a time while the
// least-squares fit improves. Codes L in [0, 2*nmax).
template <int N>
float symmetric_descent(const float* x, int nmax, uint8_t* L) {
    const AbsMax top = abs_max(x, N);
    if (top.mag < kGroupMaxEps) {
        std::memset(L, 0, N);
        return 0.0f;
    }
    const float iscale = static_cast<float>(-nmax) / top.value;
    int l_cur[N];
    float w[N], wx[N];
    float sumlx = 0.0f, suml2 = 0.0f;
    for (int i = 0; i < N; ++i) {
        l_cur[i] = clamp_int(round_int(iscale * x[i]), -nmax, nmax - 1);
        w[i] = x[i] * x[i];
        wx[i] = w[i] * x[i];
        const float lf = static_cast<float>(l_cur[i]);
        sumlx += wx[i] * lf;
        suml2 += w[i] * lf * lf;
    }
    for (int pass = 0; pass < 5; ++pass) {
        bool changed = false;
        for (int i = 0; i < N; ++i) {
            const float lf = static_cast<float>(l_cur[i]);
            float slx = sumlx - wx[i] * lf;
            if (!(slx > 0.0f)) continue;
            float sl2 = suml2 - w[i] * lf * lf;
            const int nl = clamp_int(round_int(x[i] * sl2 / slx), -nmax, nmax - 1);
            if (nl == l_cur[i]) continue;
            const float nf = static_cast<float>(nl);
            slx += wx[i] * nf;
            sl2 += w[i] * nf * nf;
            if (sl2 > 0.0f && slx * slx * suml2 > sumlx * sumlx * sl2) {
                l_cur[i] = nl;
                sumlx = slx;
                suml2 = sl2;
                changed = true;
            }
        }
        if (!changed) break;
    }
    for (int i = 0; i < N; ++i) L[i] = static_cast<uint8_t>(l_cur[i] + nmax);
    return suml2 > 0.0f ? sumlx / suml2 : 0.0f;
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

// Non-negative values to codes in [0, nmax] (ggml's make_qp_quants; used on the sub-block
// scales and mins of a super-block): a grid search, then up to 5 coordinate-descent passes.
// L keeps what C keeps in its uint8 array (codes wrap modulo 256 in degenerate cases).
template <int N>
float positive_search(const float* x, const float* w, int nmax, uint8_t* L) {
    float top = 0.0f;
    for (int i = 0; i < N; ++i) top = max_of(top, x[i]);
    if (top < kGroupMaxEps) {
        std::memset(L, 0, N);
        return 0.0f;
    }
    float iscale = static_cast<float>(nmax) / top;
    for (int i = 0; i < N; ++i) L[i] = wrap_u8(round_int(iscale * x[i]));
    {
        const float scale = 1.0f / iscale;
        float best = 0.0f;
        for (int i = 0; i < N; ++i) {
            const float diff = x[i] - scale * static_cast<float>(L[i]);
            best += w[i] * diff * diff;
        }
        for (int k = -4; k <= 4; ++k) {
            if (k == 0) continue;
            const float iscale_k = (0.1f * static_cast<float>(k) + static_cast<float>(nmax)) / top;
            const float scale_k = 1.0f / iscale_k;
            float mse = 0.0f;
            for (int i = 0; i < N; ++i) {
                const int l = min_of(nmax, round_int(iscale_k * x[i]));
                const float diff = x[i] - scale_k * static_cast<float>(l);
                mse += w[i] * diff * diff;
            }
            if (mse < best) {
                best = mse;
                iscale = iscale_k;
            }
        }
    }
    float sumlx = 0.0f, suml2 = 0.0f;
    for (int i = 0; i < N; ++i) {
        const int l = min_of(nmax, round_int(iscale * x[i]));
        L[i] = wrap_u8(l);
        const float lf = static_cast<float>(l);
        sumlx += w[i] * x[i] * lf;
        suml2 += w[i] * lf * lf;
    }
    for (int pass = 0; pass < 5; ++pass) {
        bool changed = false;
        for (int i = 0; i < N; ++i) {
            const float lf = static_cast<float>(L[i]);
            float slx = sumlx - w[i] * x[i] * lf;
            float sl2 = suml2 - w[i] * lf * lf;
            if (!(slx > 0.0f && sl2 > 0.0f)) continue;
            const int nl = min_of(nmax, round_int(x[i] * sl2 / slx));
            if (nl == static_cast<int>(L[i])) continue;
            const float nf = static_cast<float>(nl);
            slx += w[i] * x[i] * nf;
            sl2 += w[i] * nf * nf;
            if (slx * slx * suml2 > sumlx * sumlx * sl2) {
                L[i] = wrap_u8(nl);
                sumlx = slx;
                suml2 = sl2;
                changed = true;
            }
        }
        if (!changed) break;
    }
    return suml2 > 0.0f ? sumlx / suml2 : 0.0f;
}


// ------------------------------------------------------------------ lane-parallel searches
//
// The same searches over 8 groups at once, one group per lane (GCC / Clang vector extensions;
// 256-bit AVX2 code in the AVX2 clone of each row encoder, pairs of SSE2 operations otherwise).
// Lane arithmetic is IEEE float32 as in the scalar code and in the same order; branches become
// per-lane selects, and lanes that the scalar code leaves early are overwritten at the end.

#if defined(__GNUC__) && !defined(__clang__)
// the vectors never cross a non-inlined call boundary, so the AVX ABI note does not apply
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

typedef float F8 __attribute__((vector_size(32)));
typedef int32_t I8 __attribute__((vector_size(32)));

inline F8 splat(float v) { return F8{v, v, v, v, v, v, v, v}; }
inline I8 splat_i(int v) { return I8{v, v, v, v, v, v, v, v}; }
inline F8 to_f8(I8 v) { return __builtin_convertvector(v, F8); }
inline F8 abs8(F8 v) { return reinterpret_cast<F8>(reinterpret_cast<I8>(v) & splat_i(0x7fffffff)); }
inline I8 round8(F8 v) {
    const F8 shifted = v + splat(12582912.0f);
    return (reinterpret_cast<I8>(shifted) & splat_i(0x007fffff)) - splat_i(0x00400000);
}
inline I8 clamp8(I8 v, int lo, int hi) {
    v = v < splat_i(hi) ? v : splat_i(hi);
    return v > splat_i(lo) ? v : splat_i(lo);
}
inline F8 select8(I8 m, F8 a, F8 b) { return m ? a : b; }
inline I8 select8(I8 m, I8 a, I8 b) { return m ? a : b; }

inline F8 load8(const float* p) {
    F8 v;
    std::memcpy(&v, p, sizeof v);
    return v;
}

inline bool any8(I8 m) {
    int r = 0;
    for (int g = 0; g < 8; ++g) r |= m[g];
    return r != 0;
}

// Lane-wise C (int)v (truncation) for |v| < 2^21; lanes beyond (or NaN) are flagged in `bad`.
inline I8 trunc8(F8 v, I8& bad) {
    const F8 a = abs8(v);
    bad |= ~(a < splat(2097152.0f));
    const I8 t = round8(v);
    const I8 away = abs8(to_f8(t)) > a;  // rounded away from zero: step back toward it
    return t - (away & select8(v < splat(0.0f), splat_i(-1), splat_i(1)));
}

// Lane-wise C (int)roundf(v) (half away from zero) for |v| < 2^21; others flagged in `bad`.
inline I8 round_away8(F8 v, I8& bad) {
    const F8 a = abs8(v);
    bad |= ~(a < splat(2097152.0f));
    I8 r = round8(a);
    r = select8(a - to_f8(r) == splat(0.5f), r + splat_i(1), r);  // a tie that went to even below
    return select8(v < splat(0.0f), -r, r);
}

inline I8 wrap_i8_8(I8 v) { return (v << 24) >> 24; }  // low byte, sign-extended

// abs_max of 32 values: the largest |x| lane-wise (NaN never wins), then the first element
// that attains it, which is the one the scalar loop keeps.
inline AbsMax abs_max32(const float* x) {
    F8 m = splat(0.0f);
    for (int k = 0; k < 4; ++k) {
        const F8 a = abs8(load8(x + 8 * k));
        m = select8(a > m, a, m);
    }
    AbsMax r;
    for (int g = 0; g < 8; ++g) r.mag = m[g] > r.mag ? m[g] : r.mag;
    if (r.mag > 0.0f) {
        int j = 0;
        while (std::fabs(x[j]) != r.mag) ++j;
        r.value = x[j];
    }
    return r;
}

// The first minimum and the first maximum of 32 values as the scalar loops find them
// (start FLT_MAX / -FLT_MAX, strict comparisons: of equal +0 and -0 the first one).
inline void min_max32(const float* x, float& mn, float& mx) {
    F8 lo = splat(3.40282346638528859812e+38f), hi = splat(-3.40282346638528859812e+38f);
    for (int k = 0; k < 4; ++k) {
        const F8 v = load8(x + 8 * k);
        lo = select8(v < lo, v, lo);
        hi = select8(v > hi, v, hi);
    }
    mn = lo[0];
    mx = hi[0];
    for (int g = 1; g < 8; ++g) {
        mn = lo[g] < mn ? lo[g] : mn;
        mx = hi[g] > mx ? hi[g] : mx;
    }
    for (int j = 0; j < kQK; ++j)
        if (x[j] == mn) {
            mn = x[j];
            break;
        }
    for (int j = 0; j < kQK; ++j)
        if (x[j] == mx) {
            mx = x[j];
            break;
        }
}

// 8 consecutive groups of N values -> N position vectors (lane g = group g).
template <int N>
inline void transpose_in(const float* x, F8* xt) {
    for (int i = 0; i < N; ++i)
        for (int g = 0; g < 8; ++g) xt[i][g] = x[N * g + i];
}

template <int N>
inline void transpose_codes_out(const I8* lt, int bias, uint8_t* L) {
    for (int i = 0; i < N; ++i)
        for (int g = 0; g < 8; ++g) L[N * g + i] = static_cast<uint8_t>(lt[i][g] + bias);
}

// symmetric_search (make_qx_quants) for 8 consecutive groups of N: scales[8], L[8*N].
template <int N>
inline void symmetric_search_x8(const float* x, int nmax, const float* qw, float* scales, uint8_t* L) {
    F8 xt[N], w[N], wx[N];
    transpose_in<N>(x, xt);
    if (qw) transpose_in<N>(qw, w);
    F8 amax = splat(0.0f), vmax = splat(0.0f);
    for (int i = 0; i < N; ++i) {
        if (!qw) w[i] = xt[i] * xt[i];
        wx[i] = w[i] * xt[i];
        const F8 a = abs8(xt[i]);
        const I8 take = a > amax;
        amax = select8(take, a, amax);
        vmax = select8(take, xt[i], vmax);
    }
    const I8 empty = amax < splat(kGroupMaxEps);
    vmax = select8(empty, splat(1.0f), vmax);
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

// ------------------------------------------------------------------ packing

// 4-bit codes of 32 weights -> 16 bytes: byte j holds weight j (low) and j + 16 (high).
// The 5-bit types keep the low 4 bits (kMask); the 4-bit types OR the codes in as they are.
template <bool kMask = false>
inline void pack_nibbles32(const uint8_t* L, uint8_t* qs) {
    constexpr int m = kMask ? 0x0f : 0xff;
    for (int j = 0; j < 16; ++j) qs[j] = static_cast<uint8_t>((L[j] & m) | ((L[j + 16] & m) << 4));
}

// Fifth bits of 32 codes -> little-endian uint32: bit j is bit 4 of code j.
inline void pack_fifth_bits32(const uint8_t* L, uint8_t* qh) {
    uint32_t bits = 0;
    for (int j = 0; j < 32; ++j) bits |= static_cast<uint32_t>((L[j] >> 4) & 1u) << j;
    for (int b = 0; b < 4; ++b) qh[b] = static_cast<uint8_t>(bits >> (8 * b));
}

// 2-bit codes of 256 weights -> 64 bytes: per 128, byte l holds l, l+32, l+64, l+96.
inline void pack_crumbs256(const uint8_t* L, uint8_t* qs) {
    for (int half = 0; half < 2; ++half) {
        const uint8_t* c = L + 128 * half;
        for (int l = 0; l < 32; ++l)
            qs[32 * half + l] = static_cast<uint8_t>(c[l] | (c[l + 32] << 2) | (c[l + 64] << 4) | (c[l + 96] << 6));
    }
}

// 4-bit codes of 256 weights -> 128 bytes: per 64, byte l holds l (low) and l+32 (high).
inline void pack_nibbles256(const uint8_t* L, uint8_t* qs) {
    for (int q = 0; q < 4; ++q)
        for (int l = 0; l < 32; ++l) qs[32 * q + l] = static_cast<uint8_t>((L[64 * q + l] & 0xf) | ((L[64 * q + l + 32] & 0xf) << 4));
}

// Bit `bit` of each of 256 codes -> 32 bytes: code e goes to byte e % 32, bit e / 32.
inline void pack_bit_planes256(const uint8_t* L, int bit, uint8_t* out) {
    std::memset(out, 0, 32);
    for (int e = 0; e < 256; ++e) out[e % 32] |= static_cast<uint8_t>(((L[e] >> bit) & 1) << (e / 32));
}

// Q4_K / Q5_K: 8 six-bit scales and mins -> 12 bytes (values above 63 spill as in C).
inline void pack_scales_k4(const uint8_t* ls, const uint8_t* lm, uint8_t* q) {
    for (int j = 0; j < 4; ++j) {
        q[j] = ls[j];
        q[j + 4] = lm[j];
    }
    for (int j = 4; j < 8; ++j) {
        q[j + 4] = static_cast<uint8_t>((ls[j] & 0xf) | ((lm[j] & 0xf) << 4));
        q[j - 4] = static_cast<uint8_t>(q[j - 4] | ((ls[j] >> 4) << 6));
        q[j] = static_cast<uint8_t>(q[j] | ((lm[j] >> 4) << 6));
    }
}

inline void unpack_scale_k4(const uint8_t* q, int j, int& sc, int& m) {
    if (j < 4) {
        sc = q[j] & 63;
        m = q[j + 4] & 63;
    } else {
        sc = (q[j + 4] & 0xf) | ((q[j - 4] >> 6) << 4);
        m = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
    }
}

// Q3_K: 16 six-bit values (scale + 32, as int8 storage) -> 12 bytes.
inline void pack_scales_q3(const int8_t* l6, uint8_t* q) {
    std::memset(q, 0, 12);
    for (int j = 0; j < 16; ++j) {
        int l = l6[j];
        if (j < 8)
            q[j] = static_cast<uint8_t>(l & 0xf);
        else
            q[j - 8] = static_cast<uint8_t>(q[j - 8] | ((l & 0xf) << 4));
        l >>= 4;
        q[j % 4 + 8] = static_cast<uint8_t>(q[j % 4 + 8] | (l << (2 * (j / 4))));
    }
}

inline int unpack_scale_q3(const uint8_t* q, int j) {
    int low = j < 8 ? (q[j] & 0xf) : (q[j - 8] >> 4);
    int v = static_cast<int8_t>(low | (((q[8 + j % 4] >> (2 * (j / 4))) & 3) << 4));
    return wrap_i8(v - 32);
}

// ------------------------------------------------------------------ legacy 32-weight blocks

// Per-row weights of the imatrix paths of Q4_0..Q5_1: imatrix * sqrt(sigma2 + x^2), sigma2 the
// mean square of the whole row.
inline void row_weights32(const float* xb, const float* qw, float sigma2, float* w) {
    for (int j = 0; j < kQK; ++j) w[j] = qw[j] * std::sqrt(sigma2 + xb[j] * xb[j]);
}

inline float row_sigma2(const float* x, int64_t n) {
    return sum_squares(x, n) / static_cast<float>(n);
}

// Q4_0 / Q5_0 without imatrix: d = max / -nmax, code = min(2nmax-1, (int8)(x/d + nmax + 0.5)).
// The codes 8 lanes at a time; a block with a value out of the lanes' range goes element-wise.
template <int kNmax>
inline void symmetric_ref32(const float* xb, float& d, uint8_t* L) {
    const AbsMax top = abs_max32(xb);
    d = top.value / static_cast<float>(-kNmax);
    const float id = d != 0.0f ? 1.0f / d : 0.0f;
    const float bias = static_cast<float>(kNmax) + 0.5f;
    I8 bad = splat_i(0), q[4];
    for (int k = 0; k < 4; ++k) {
        q[k] = wrap_i8_8(trunc8(load8(xb + 8 * k) * splat(id) + splat(bias), bad));
        q[k] = select8(q[k] < splat_i(2 * kNmax - 1), q[k], splat_i(2 * kNmax - 1));
    }
    if (!any8(bad)) {
        for (int j = 0; j < kQK; ++j) L[j] = static_cast<uint8_t>(q[j / 8][j % 8]);
        return;
    }
    for (int j = 0; j < kQK; ++j) {
        const int8_t c = wrap_i8(trunc_int(xb[j] * id + bias));
        L[j] = static_cast<uint8_t>(min_of<int>(2 * kNmax - 1, c));
    }
}

// Q4_1 / Q5_1 without imatrix: d = (max - min) / nmax, code = (x - min)/d + 0.5 truncated;
// Q4_1 clamps with MIN(15, (int8_t)v), Q5_1 stores (uint8_t)v unclamped.
template <int kNmax>
inline void affine_ref32(const float* xb, float& d, float& mn, uint8_t* L) {
    float mx;
    min_max32(xb, mn, mx);
    d = (mx - mn) / static_cast<float>(kNmax);
    const float id = d != 0.0f ? 1.0f / d : 0.0f;
    I8 bad = splat_i(0), q[4];
    for (int k = 0; k < 4; ++k) {
        q[k] = trunc8((load8(xb + 8 * k) - splat(mn)) * splat(id) + splat(0.5f), bad);
        if (kNmax == 15) q[k] = select8(wrap_i8_8(q[k]) < splat_i(15), wrap_i8_8(q[k]), splat_i(15));
    }
    if (!any8(bad)) {
        for (int j = 0; j < kQK; ++j) L[j] = static_cast<uint8_t>(q[j / 8][j % 8] & 0xff);
        return;
    }
    for (int j = 0; j < kQK; ++j) {
        const int t = trunc_int((xb[j] - mn) * id + 0.5f);
        L[j] = kNmax == 15 ? static_cast<uint8_t>(min_of<int>(15, wrap_i8(t))) : wrap_u8(t);
    }
}

template <int kNmax>
void symmetric_row_search(const float* x, int64_t n, const float* qw, float* scales, uint8_t* L) {
    const float sigma2 = row_sigma2(x, n);
    float w[8 * kQK];
    int64_t ib = 0;
    for (; ib + 8 <= n / kQK; ib += 8) {
        for (int b = 0; b < 8; ++b) row_weights32(x + kQK * (ib + b), qw + kQK * (ib + b), sigma2, w + kQK * b);
        symmetric_search_x8<kQK>(x + kQK * ib, kNmax, w, scales + ib, L + kQK * ib);
    }
    for (; ib < n / kQK; ++ib) {
        row_weights32(x + kQK * ib, qw + kQK * ib, sigma2, w);
        scales[ib] = symmetric_search<kQK>(x + kQK * ib, kNmax, w, L + kQK * ib);
    }
}

template <int kNmax>
void affine_row_search(const float* x, int64_t n, const float* qw, float* scales, float* the_mins, uint8_t* L) {
    const float sigma2 = row_sigma2(x, n);
    float w[8 * kQK];
    int64_t ib = 0;
    for (; ib + 8 <= n / kQK; ib += 8) {
        for (int b = 0; b < 8; ++b) row_weights32(x + kQK * (ib + b), qw + kQK * (ib + b), sigma2, w + kQK * b);
        affine_search_x8<kQK, false>(x + kQK * ib, w, kNmax, -0.9f, 0.05f, 36, scales + ib, the_mins + ib, L + kQK * ib);
    }
    for (; ib < n / kQK; ++ib) {
        row_weights32(x + kQK * ib, qw + kQK * ib, sigma2, w);
        scales[ib] = affine_search<kQK, false>(x + kQK * ib, w, kNmax, -0.9f, 0.05f, 36, L + kQK * ib, the_mins + ib);
    }
}

template <int kNmax>  // 8: Q4_0, 16: Q5_0
void encode_row_symmetric32(const float* x, int64_t n, const float* qw, uint8_t* out) {
    constexpr int kSize = kNmax == 8 ? 18 : 22;
    std::vector<float> scales;
    std::vector<uint8_t> codes;
    if (qw) {
        scales.resize(static_cast<size_t>(n / kQK));
        codes.resize(static_cast<size_t>(n));
        symmetric_row_search<kNmax>(x, n, qw, scales.data(), codes.data());
    }
    for (int64_t ib = 0; ib < n / kQK; ++ib, out += kSize) {
        const float* xb = x + kQK * ib;
        uint8_t Lref[kQK];
        const uint8_t* L = Lref;
        float d;
        if (qw) {
            d = scales[static_cast<size_t>(ib)];
            L = codes.data() + kQK * ib;
        } else {
            symmetric_ref32<kNmax>(xb, d, Lref);
        }
        put_half(out, d);
        if (kNmax == 8) {
            pack_nibbles32(L, out + 2);
        } else {
            pack_fifth_bits32(L, out + 2);
            pack_nibbles32<true>(L, out + 6);
        }
    }
}

template <int kNmax>  // 15: Q4_1, 31: Q5_1
void encode_row_affine32(const float* x, int64_t n, const float* qw, uint8_t* out) {
    constexpr int kSize = kNmax == 15 ? 20 : 24;
    std::vector<float> scales, the_mins;
    std::vector<uint8_t> codes;
    if (qw) {
        scales.resize(static_cast<size_t>(n / kQK));
        the_mins.resize(static_cast<size_t>(n / kQK));
        codes.resize(static_cast<size_t>(n));
        affine_row_search<kNmax>(x, n, qw, scales.data(), the_mins.data(), codes.data());
    }
    for (int64_t ib = 0; ib < n / kQK; ++ib, out += kSize) {
        const float* xb = x + kQK * ib;
        uint8_t Lref[kQK];
        const uint8_t* L = Lref;
        float d, m;
        if (qw) {
            d = scales[static_cast<size_t>(ib)];
            m = -the_mins[static_cast<size_t>(ib)];
            L = codes.data() + kQK * ib;
        } else {
            affine_ref32<kNmax>(xb, d, m, Lref);
        }
        put_half(out, d);
        put_half(out + 2, m);
        if (kNmax == 15) {
            pack_nibbles32(L, out + 4);
        } else {
            pack_fifth_bits32(L, out + 4);
            pack_nibbles32<true>(L, out + 8);
        }
    }
}

// Q8_0 (ggml ignores the imatrix): d = amax / 127, q = roundf(x / d).
inline void encode_row_q8_0(const float* x, int64_t n, const float*, uint8_t* out) {
    for (int64_t ib = 0; ib < n / kQK; ++ib, out += 34) {
        const float* xb = x + kQK * ib;
        float amax = 0.0f;
        for (int j = 0; j < kQK; ++j) amax = max_of(amax, std::fabs(xb[j]));
        const float d = amax / 127.0f;
        const float id = d != 0.0f ? 1.0f / d : 0.0f;
        put_half(out, d);
        I8 bad = splat_i(0), q[4];
        for (int k = 0; k < 4; ++k) q[k] = round_away8(load8(xb + 8 * k) * splat(id), bad);
        if (!any8(bad)) {
            for (int j = 0; j < kQK; ++j) out[2 + j] = static_cast<uint8_t>(q[j / 8][j % 8] & 0xff);
            continue;
        }
        for (int j = 0; j < kQK; ++j) out[2 + j] = static_cast<uint8_t>(wrap_i8(round_away_int(xb[j] * id)));
    }
}

// ------------------------------------------------------------------ K-quants

// Sub-block requantization under the stored (fp16) scales: code = clamp(round((x + m) / d))
// (+ bias for the symmetric types); a sub-block whose step d is 0 keeps the search's codes.
inline void requantize(const float* x, int n, float d, float m, int lo, int hi, int bias, uint8_t* L) {
    if (d == 0.0f) return;
    for (int i = 0; i < n; ++i) L[i] = static_cast<uint8_t>(clamp_int(round_int((x[i] + m) / d), lo, hi) + bias);
}

inline void requantize_sym(const float* x, int n, float d, int lo, int hi, int bias, uint8_t* L) {
    if (d == 0.0f) return;
    for (int i = 0; i < n; ++i) L[i] = static_cast<uint8_t>(clamp_int(round_int(x[i] / d), lo, hi) + bias);
}

// imatrix weights of a super-block: qw * sqrt(sigma2 + x^2), and their per-sub-block sums.
template <int kSub>
inline void super_block_weights(const float* x, const float* qw, float sigma2, float* w, float* sw) {
    for (int j = 0; j < kQKK / kSub; ++j) {
        float s = 0.0f;
        for (int l = 0; l < kSub; ++l) {
            w[kSub * j + l] = qw[kSub * j + l] * std::sqrt(sigma2 + x[kSub * j + l] * x[kSub * j + l]);
            s += w[kSub * j + l];
        }
        sw[j] = s;
    }
}

// Q2_K: 16 sub-blocks of 16, codes 0..3, 4-bit scale and min per sub-block.
inline void encode_row_q2_k(const float* x, int64_t n, const float* qw, uint8_t* out) {
    for (int64_t ibl = 0; ibl < n / kQKK; ++ibl, x += kQKK, out += 84) {
        uint8_t L[kQKK];
        float scales[16], mins[16];
        uint8_t* sc = out;
        float d, dmin;
        if (qw) {
            float w[kQKK], sw[16];
            const float sigma2 = sum_squares(x, kQKK) / static_cast<float>(kQKK);
            super_block_weights<16>(x, qw + kQKK * ibl, sigma2, w, sw);
            for (int h = 0; h < 2; ++h)
                affine_search_x8<16, false>(x + 128 * h, w + 128 * h, 3, -0.9f, 0.05f, 36, scales + 8 * h, mins + 8 * h,
                                            L + 128 * h);
            uint8_t ls[16], lm[16];
            d = positive_search<16>(scales, sw, 15, ls);
            dmin = positive_search<16>(mins, sw, 15, lm);
            for (int j = 0; j < 16; ++j) sc[j] = static_cast<uint8_t>(ls[j] | (lm[j] << 4));
        } else {
            float max_scale = 0.0f, max_min = 0.0f;
            float w[kQKK];
            for (int l = 0; l < kQKK; ++l) w[l] = std::fabs(x[l]);
            for (int h = 0; h < 2; ++h)
                affine_search_x8<16, true>(x + 128 * h, w + 128 * h, 3, -0.5f, 0.1f, 15, scales + 8 * h, mins + 8 * h,
                                           L + 128 * h);
            for (int j = 0; j < 16; ++j) {
                if (scales[j] > max_scale) max_scale = scales[j];
                if (mins[j] > max_min) max_min = mins[j];
            }
            if (max_scale > 0.0f) {
                const float iscale = 15.0f / max_scale;
                for (int j = 0; j < 16; ++j) sc[j] = wrap_u8(round_int(iscale * scales[j]));
                d = max_scale / 15.0f;
            } else {
                std::memset(sc, 0, 16);
                d = 0.0f;
            }
            if (max_min > 0.0f) {
                const float iscale = 15.0f / max_min;
                for (int j = 0; j < 16; ++j) sc[j] = wrap_u8(sc[j] | (round_int(iscale * mins[j]) << 4));
                dmin = max_min / 15.0f;
            } else {
                dmin = 0.0f;
            }
        }
        put_half(out + 80, d);
        put_half(out + 82, dmin);
        const float dq = from_half(get_half(out + 80)), mq = from_half(get_half(out + 82));
        for (int j = 0; j < 16; ++j) {
            const float step = dq * static_cast<float>(sc[j] & 0xf);
            requantize(x + 16 * j, 16, step, mq * static_cast<float>(sc[j] >> 4), 0, 3, 0, L + 16 * j);
        }
        pack_crumbs256(L, out + 16);
    }
}

// Q3_K: 16 sub-blocks of 16, codes -4..3, signed 6-bit scales, no min.
inline void encode_row_q3_k(const float* x, int64_t n, const float* qw, uint8_t* out) {
    for (int64_t ibl = 0; ibl < n / kQKK; ++ibl, x += kQKK, out += 110) {
        uint8_t L[kQKK];
        float scales[16];
        int8_t l6[16];
        float d;
        if (qw) {
            float w[kQKK], sw[16];
            const float sigma2 = 2.0f * sum_squares(x, kQKK) / static_cast<float>(kQKK);
            super_block_weights<16>(x, qw + kQKK * ibl, sigma2, w, sw);
            for (int h = 0; h < 2; ++h) symmetric_search_x8<16>(x + 128 * h, 4, w + 128 * h, scales + 8 * h, L + 128 * h);
            uint8_t ls[16];
            d = symmetric_search<16>(scales, 32, sw, ls);
            for (int j = 0; j < 16; ++j) l6[j] = static_cast<int8_t>(ls[j]);
            pack_scales_q3(l6, out + 96);
        } else {
            for (int j = 0; j < 16; ++j) scales[j] = symmetric_descent<16>(x + 16 * j, 4, L + 16 * j);
            const AbsMax top = abs_max(scales, 16);
            if (top.value != 0.0f) {
                const float iscale = -32.0f / top.value;
                for (int j = 0; j < 16; ++j) {
                    const int8_t l = wrap_i8(round_int(iscale * scales[j]));
                    l6[j] = static_cast<int8_t>(clamp_int(l, -32, 31) + 32);
                }
                pack_scales_q3(l6, out + 96);
                d = 1.0f / iscale;
            } else {
                std::memset(out + 96, 0, 12);
                d = 0.0f;
            }
        }
        put_half(out + 108, d);
        const float dq = from_half(get_half(out + 108));
        for (int j = 0; j < 16; ++j) {
            const float step = dq * static_cast<float>(unpack_scale_q3(out + 96, j));
            requantize_sym(x + 16 * j, 16, step, -4, 3, 4, L + 16 * j);
        }
        pack_bit_planes256(L, 2, out);
        for (int e = 0; e < kQKK; ++e) L[e] &= 3;
        pack_crumbs256(L, out + 32);
    }
}

// Q4_K / Q5_K: 8 sub-blocks of 32, codes 0..nmax, 6-bit scale and min per sub-block.
template <int kNmax>
void encode_row_q45_k(const float* x, int64_t n, const float* qw, uint8_t* out) {
    constexpr int kSize = kNmax == 15 ? 144 : 176;
    for (int64_t ibl = 0; ibl < n / kQKK; ++ibl, x += kQKK, out += kSize) {
        uint8_t L[kQKK];
        float scales[8], mins[8];
        uint8_t ls[8], lm[8];
        float d, dmin;
        if (qw) {
            float w[kQKK], sw[8];
            const float sigma2 = 2.0f * sum_squares(x, kQKK) / static_cast<float>(kQKK);
            super_block_weights<32>(x, qw + kQKK * ibl, sigma2, w, sw);
            affine_search_x8<32, false>(x, w, kNmax, -0.9f, 0.05f, 36, scales, mins, L);
            d = positive_search<8>(scales, sw, 63, ls);
            dmin = positive_search<8>(mins, sw, 63, lm);
            if (kNmax == 31) {  // Q5_K clamps, Q4_K does not
                for (int j = 0; j < 8; ++j) {
                    ls[j] = min_of<uint8_t>(63, ls[j]);
                    lm[j] = min_of<uint8_t>(63, lm[j]);
                }
            }
        } else {
            constexpr float kRmin = kNmax == 15 ? -1.0f : -0.5f;
            constexpr int kSteps = kNmax == 15 ? 20 : 15;
            float max_scale = 0.0f, max_min = 0.0f;
            float w[kQKK];
            for (int j = 0; j < 8; ++j) {
                const float* xs = x + 32 * j;
                const float av_x = std::sqrt(sum_squares(xs, 32) / 32.0f);
                for (int l = 0; l < 32; ++l) w[32 * j + l] = av_x + std::fabs(xs[l]);
            }
            affine_search_x8<32, false>(x, w, kNmax, kRmin, 0.1f, kSteps, scales, mins, L);
            for (int j = 0; j < 8; ++j) {
                if (scales[j] > max_scale) max_scale = scales[j];
                if (mins[j] > max_min) max_min = mins[j];
            }
            const float inv_scale = max_scale > 0.0f ? 63.0f / max_scale : 0.0f;
            const float inv_min = max_min > 0.0f ? 63.0f / max_min : 0.0f;
            for (int j = 0; j < 8; ++j) {
                ls[j] = min_of<uint8_t>(63, wrap_u8(round_int(inv_scale * scales[j])));
                lm[j] = min_of<uint8_t>(63, wrap_u8(round_int(inv_min * mins[j])));
            }
            d = max_scale / 63.0f;
            dmin = max_min / 63.0f;
        }
        pack_scales_k4(ls, lm, out + 4);
        put_half(out, d);
        put_half(out + 2, dmin);
        const float dq = from_half(get_half(out)), mq = from_half(get_half(out + 2));
        for (int j = 0; j < 8; ++j) {
            int sc, m;
            unpack_scale_k4(out + 4, j, sc, m);
            requantize(x + 32 * j, 32, dq * static_cast<float>(sc), mq * static_cast<float>(m), 0, kNmax, 0, L + 32 * j);
        }
        if (kNmax == 15) {
            pack_nibbles256(L, out + 16);
        } else {
            pack_bit_planes256(L, 4, out + 16);  // bit 4 of code e: byte e % 32, bit e / 32
            pack_nibbles256(L, out + 48);
        }
    }
}


// Q6_K: 16 sub-blocks of 16, codes -32..31, int8 scales; weights x*x, or the imatrix as is.
inline void encode_row_q6_k(const float* x, int64_t n, const float* qw, uint8_t* out) {
    for (int64_t ibl = 0; ibl < n / kQKK; ++ibl, x += kQKK, out += 210) {
        uint8_t L[kQKK];
        float scales[16];
        for (int h = 0; h < 2; ++h)
            symmetric_search_x8<16>(x + 128 * h, 32, qw ? qw + kQKK * ibl + 128 * h : nullptr, scales + 8 * h, L + 128 * h);
        const AbsMax top = abs_max(scales, 16);
        if (top.mag < kGroupMaxEps) {
            std::memset(out, 0, 210);
            continue;
        }
        const float iscale = -128.0f / top.value;
        int8_t* sc = reinterpret_cast<int8_t*>(out + 192);
        for (int j = 0; j < 16; ++j) sc[j] = wrap_i8(min_of(127, round_int(iscale * scales[j])));
        put_half(out + 208, 1.0f / iscale);
        const float dq = from_half(get_half(out + 208));
        for (int j = 0; j < 16; ++j) requantize_sym(x + 16 * j, 16, dq * static_cast<float>(sc[j]), -32, 31, 32, L + 16 * j);
        // per 128 weights: ql byte l = low nibbles of l and l+64, byte l+32 = of l+32 and l+96;
        // qh byte l = the high 2 bits of l, l+32, l+64, l+96
        for (int half = 0; half < 2; ++half) {
            const uint8_t* c = L + 128 * half;
            uint8_t* ql = out + 64 * half;
            uint8_t* qh = out + 128 + 32 * half;
            for (int l = 0; l < 32; ++l) {
                ql[l] = static_cast<uint8_t>((c[l] & 0xf) | ((c[l + 64] & 0xf) << 4));
                ql[l + 32] = static_cast<uint8_t>((c[l + 32] & 0xf) | ((c[l + 96] & 0xf) << 4));
                qh[l] = static_cast<uint8_t>((c[l] >> 4) | ((c[l + 32] >> 4) << 2) | ((c[l + 64] >> 4) << 4) | ((c[l + 96] >> 4) << 6));
            }
        }
    }
}

// ------------------------------------------------------------------ IQ4_NL / IQ4_XS

constexpr int8_t kIq4Values[16] = {-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113};

// Index of the table entry nearest to v (the upper one on a tie); beyond the ends, the end.
inline int iq4_index(float v) {
    if (v <= static_cast<float>(kIq4Values[0])) return 0;
    if (v >= static_cast<float>(kIq4Values[15])) return 15;
    int lo = 0, hi = 15;  // table[lo] <= v < table[hi]
    while (hi - lo > 1) {
        const int mid = (lo + hi) / 2;
        if (v < static_cast<float>(kIq4Values[mid]))
            hi = mid;
        else
            lo = mid;
    }
    return v - static_cast<float>(kIq4Values[hi - 1]) < static_cast<float>(kIq4Values[hi]) - v ? hi - 1 : hi;
}

// The scale of one 32-weight block: first grid puts the largest |x| on -127, least-squares
// refit, then 15 grids 1/d = (k - 127) / max, k = -7..7, keeping the best fit. 0 for a zero block.
inline float iq4_block_scale(const float* xb, const float* w) {
    const AbsMax top = abs_max(xb, kQK);
    if (top.mag < kGroupMaxEps) return 0.0f;
    auto fit = [&](float id, float& sumqx, float& sumq2) {
        sumqx = 0.0f;
        sumq2 = 0.0f;
        for (int j = 0; j < kQK; ++j) {
            const float q = static_cast<float>(kIq4Values[iq4_index(id * xb[j])]);
            const float wq = w[j] * q;
            sumqx += wq * xb[j];
            sumq2 += wq * q;
        }
    };
    float sumqx, sumq2;
    const float d0 = -top.value / static_cast<float>(kIq4Values[0]);
    fit(1.0f / d0, sumqx, sumq2);
    float d = sumq2 > 0.0f ? sumqx / sumq2 : 0.0f;
    float best = d * sumqx;
    for (int k = -7; k <= 7; ++k) {
        fit(static_cast<float>(k + kIq4Values[0]) / top.value, sumqx, sumq2);
        if (sumq2 > 0.0f && sumqx * sumqx > best * sumq2) {
            d = sumqx / sumq2;
            best = d * sumqx;
        }
    }
    return d;
}

// iq4_index and the table value for 8 lanes. Lane by lane: lower / upper are the entries
// around v (table[count] <= v < table[count + 1] inside the table; beyond its ends the same
// comparison picks the end), a NaN lane gets 15 as the scalar binary search gives it.
// `table` holds the 16 entries, each splat over the lanes.
inline void iq4_lookup8(const F8* table, F8 v, I8& idx, F8& value) {
    F8 lower = table[0], upper = table[1];
    I8 count = splat_i(0);
    for (int k = 1; k < 15; ++k) {
        const I8 le = table[k] <= v;
        lower = select8(le, table[k], lower);
        upper = select8(le, table[k + 1], upper);
        count -= le;  // le is -1 where true
    }
    const I8 nan = v != v;
    const I8 take_lower = (v - lower < upper - v) & ~nan;
    idx = select8(take_lower, count, count + splat_i(1));
    value = select8(take_lower, lower, upper);
    idx = select8(nan, splat_i(15), idx);
    value = select8(nan, table[15], value);
}

// iq4_block_scale for 8 consecutive blocks of 32 (values and weights): scales[8].
inline void iq4_block_scale_x8(const float* x, const float* wts, float* scales) {
    F8 xt[kQK], w[kQK];
    transpose_in<kQK>(x, xt);
    transpose_in<kQK>(wts, w);
    F8 amax = splat(0.0f), vmax = splat(0.0f);
    for (int j = 0; j < kQK; ++j) {
        const F8 a = abs8(xt[j]);
        const I8 take = a > amax;
        amax = select8(take, a, amax);
        vmax = select8(take, xt[j], vmax);
    }
    const I8 empty = amax < splat(kGroupMaxEps);
    vmax = select8(empty, splat(1.0f), vmax);
    F8 table[16];
    for (int k = 0; k < 16; ++k) table[k] = splat(static_cast<float>(kIq4Values[k]));
    F8 sumqx, sumq2;
    auto fit = [&](F8 id) {
        sumqx = splat(0.0f);
        sumq2 = splat(0.0f);
        for (int j = 0; j < kQK; ++j) {
            I8 idx;
            F8 q;
            iq4_lookup8(table, id * xt[j], idx, q);
            const F8 wq = w[j] * q;
            sumqx += wq * xt[j];
            sumq2 += wq * q;
        }
    };
    const F8 d0 = -vmax / splat(static_cast<float>(kIq4Values[0]));
    fit(splat(1.0f) / d0);
    F8 d = select8(sumq2 > splat(0.0f), sumqx / sumq2, splat(0.0f));
    F8 best = d * sumqx;
    for (int k = -7; k <= 7; ++k) {
        fit(splat(static_cast<float>(k + kIq4Values[0])) / vmax);
        const I8 better = (sumq2 > splat(0.0f)) & (sumqx * sumqx > best * sumq2);
        d = select8(better, sumqx / sumq2, d);
        best = select8(better, d * sumqx, best);
    }
    d = select8(empty, splat(0.0f), d);
    for (int g = 0; g < 8; ++g) scales[g] = d[g];
}

// Weights of a (super-)block of n: x*x, or qw * sqrt(sigma2 + x^2) with sigma2 = 2 * mean(x^2).
inline void iq4_weights(const float* x, int n, const float* qw, float* w) {
    if (!qw) {
        for (int j = 0; j < n; ++j) w[j] = x[j] * x[j];
        return;
    }
    float sigma2 = sum_squares(x, n);
    sigma2 *= 2.0f / static_cast<float>(n);
    for (int j = 0; j < n; ++j) w[j] = qw[j] * std::sqrt(sigma2 + x[j] * x[j]);
}

inline void iq4_codes(const float* xb, float id, uint8_t* qs) {
    uint8_t L[kQK];
    for (int j = 0; j < kQK; ++j) L[j] = static_cast<uint8_t>(iq4_index(id * xb[j]));
    pack_nibbles32(L, qs);
}

// iq4_codes for 8 consecutive blocks with their own inverse scales ids[8]: qs[8 * 16].
inline void iq4_codes_x8(const float* x, const float* ids, uint8_t* qs) {
    F8 xt[kQK], table[16];
    I8 codes[kQK];
    transpose_in<kQK>(x, xt);
    for (int k = 0; k < 16; ++k) table[k] = splat(static_cast<float>(kIq4Values[k]));
    F8 id;
    for (int g = 0; g < 8; ++g) id[g] = ids[g];
    for (int j = 0; j < kQK; ++j) {
        F8 value;
        iq4_lookup8(table, id * xt[j], codes[j], value);
    }
    uint8_t L[8 * kQK];
    transpose_codes_out<kQK>(codes, 0, L);
    for (int g = 0; g < 8; ++g) pack_nibbles32(L + kQK * g, qs + 16 * g);
}

// IQ4_NL: the scales 8 blocks at a time (lane-parallel), the last n % 256 values block by block.
inline void encode_row_iq4_nl(const float* x, int64_t n, const float* qw, uint8_t* out) {
    const int64_t nb = n / kQK;
    int64_t ib = 0;
    float w[8 * kQK], scales[8];
    for (; ib < nb; ib += 8) {
        const int group = static_cast<int>(std::min<int64_t>(8, nb - ib));
        for (int b = 0; b < group; ++b)
            iq4_weights(x + kQK * (ib + b), kQK, qw ? qw + kQK * (ib + b) : nullptr, w + kQK * b);
        if (group == 8) {
            iq4_block_scale_x8(x + kQK * ib, w, scales);
        } else {
            for (int b = 0; b < group; ++b) scales[b] = iq4_block_scale(x + kQK * (ib + b), w + kQK * b);
        }
        float ids[8];
        for (int b = 0; b < group; ++b) ids[b] = scales[b] != 0.0f ? 1.0f / scales[b] : 0.0f;
        uint8_t qs[8 * 16];
        if (group == 8) {
            iq4_codes_x8(x + kQK * ib, ids, qs);
        } else {
            for (int b = 0; b < group; ++b) iq4_codes(x + kQK * (ib + b), ids[b], qs + 16 * b);
        }
        for (int b = 0; b < group; ++b) {
            put_half(out + 18 * (ib + b), scales[b]);
            std::memcpy(out + 18 * (ib + b) + 2, qs + 16 * b, 16);
        }
    }
}

inline void encode_row_iq4_xs(const float* x, int64_t n, const float* qw, uint8_t* out) {
    for (int64_t ibl = 0; ibl < n / kQKK; ++ibl, x += kQKK, out += 136) {
        float w[kQKK], scales[8];
        iq4_weights(x, kQKK, qw ? qw + kQKK * ibl : nullptr, w);
        iq4_block_scale_x8(x, w, scales);
        const AbsMax top = abs_max(scales, 8);
        const float d = -top.value / 32.0f;
        const float id = d != 0.0f ? 1.0f / d : 0.0f;
        put_half(out, d);
        uint16_t scales_h = 0;
        uint8_t* scales_l = out + 4;
        std::memset(scales_l, 0, 4);
        float ids[8];
        for (int ib = 0; ib < 8; ++ib) {
            const int l = clamp_int(round_int(id * scales[ib]), -32, 31);
            const float dl = d * static_cast<float>(l);
            ids[ib] = dl != 0.0f ? 1.0f / dl : 0.0f;
            const int biased = l + 32;
            scales_l[ib / 2] = static_cast<uint8_t>(scales_l[ib / 2] | ((biased & 0xf) << (4 * (ib % 2))));
            scales_h = static_cast<uint16_t>(scales_h | ((biased >> 4) << (2 * ib)));
        }
        iq4_codes_x8(x, ids, out + 8);
        out[2] = static_cast<uint8_t>(scales_h & 0xff);
        out[3] = static_cast<uint8_t>(scales_h >> 8);
    }
}

}  // namespace ggq_quants
