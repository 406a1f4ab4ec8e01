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
//
// The kernels are split by family as ggq/ggml/ is: floats.h (the C-float helpers, as floats.py),
// lanes.h (8 groups at once), search.h (the scale searches legacy and K-quants share), legacy.h,
// kquants.h, iq4.h.
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

}  // namespace ggq_quants
