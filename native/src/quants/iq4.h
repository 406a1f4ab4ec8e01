// IQ4_NL and IQ4_XS: 4-bit indices into a non-linear table (as ggq/ggml/iq4.py).
#pragma once

#include "legacy.h"

namespace ggq_quants {

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
    F8 amax, vmax;
    const I8 empty = group_max8<kQK>(xt, amax, vmax);
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
