// Lane-parallel basics: 8 groups of values at once, one group per lane (see floats.h for the
// float rules every kernel follows).
#pragma once

#include "floats.h"

namespace ggq_quants {

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

// Per lane, the first value of largest magnitude of N position vectors (abs_max lane-wise): amax
// its |x|, vmax the value, or 1 in an empty group (largest |x| below kGroupMaxEps), whose lanes
// the returned mask flags.
template <int N>
inline I8 group_max8(const F8* xt, F8& amax, F8& vmax) {
    amax = splat(0.0f);
    vmax = splat(0.0f);
    for (int i = 0; i < N; ++i) {
        const F8 a = abs8(xt[i]);
        const I8 take = a > amax;
        amax = select8(take, a, amax);
        vmax = select8(take, xt[i], vmax);
    }
    const I8 empty = amax < splat(kGroupMaxEps);
    vmax = select8(empty, splat(1.0f), vmax);
    return empty;
}

template <int N>
inline void transpose_codes_out(const I8* lt, int bias, uint8_t* L) {
    for (int i = 0; i < N; ++i)
        for (int g = 0; g < 8; ++g) L[N * g + i] = static_cast<uint8_t>(lt[i][g] + bias);
}

}  // namespace ggq_quants
