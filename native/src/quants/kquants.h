// K-quants: Q2_K ... Q6_K on 256-weight super-blocks (as ggq/ggml/kquants.py).
#pragma once

#include "search.h"

namespace ggq_quants {

// ------------------------------------------------------------------ K-quant scale searches

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

// ------------------------------------------------------------------ packing

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

}  // namespace ggq_quants
