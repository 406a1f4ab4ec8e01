// Legacy 32-weight blocks: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 (as ggq/ggml/legacy.py).
#pragma once

#include "search.h"

namespace ggq_quants {

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

}  // namespace ggq_quants
