#include "logits.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <thread>
#include <vector>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define GGQ_HAVE_AVX2_KERNEL 1
#include <immintrin.h>
#endif

namespace ggq {

namespace {

constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

// llama-perplexity's log_softmax(), operation for operation: std::max over the row, expf of the
// float difference, the sum in double, the log in double.
double nll_row_scalar(const float * logits, int32_t n_vocab, int32_t target) {
    float max_logit = logits[0];
    for (int32_t i = 1; i < n_vocab; ++i) {
        max_logit = std::max(max_logit, logits[i]);
    }
    double sum_exp = 0.0;
    for (int32_t i = 0; i < n_vocab; ++i) {
        sum_exp += expf(logits[i] - max_logit);
    }
    const float shifted = logits[target] - max_logit;
    return -(shifted - std::log(sum_exp));
}

// perplexity.cpp's nearest_int(): round half to even through the float mantissa (|x| < 2^22).
inline int nearest_int(float fval) {
    const float val = fval + 12582912.f;
    int i;
    std::memcpy(&i, &val, sizeof(int));
    return (i & 0x007fffff) - 0x00400000;
}

KldToken nan_token() {
    const auto nan = std::numeric_limits<float>::quiet_NaN();
    return KldToken{kNaN, nan, nan, nan, kNaN, false};
}

// How the base row is stored: perplexity.cpp's log_softmax(n_vocab, logits, uint16_t *, tok).
struct BaseRow {
    float min_logit;      // clamped to max - 16
    float scale;          // log-prob per code step
    float inv_scale;      // 0 when scale is 0 (every code 0)
    float min_log_prob;   // log-prob of code 0

    int code(float logit) const {
        return scale != 0.0f && logit > min_logit ? nearest_int(inv_scale * (logit - min_logit)) : 0;
    }
    float log_prob(int code) const { return scale * static_cast<float>(code) + min_log_prob; }
    static BaseRow make(float max_logit, float min_logit, double sum_exp) {
        BaseRow b{};
        b.min_logit = std::max(min_logit, max_logit - 16);
        const float log_sum_exp = static_cast<float>(std::log(sum_exp));
        b.min_log_prob = b.min_logit - max_logit - log_sum_exp;
        b.scale = (max_logit - b.min_logit) / 65535.f;
        b.inv_scale = b.scale != 0.0f ? 1 / b.scale : 0.0f;
        return b;
    }
};

// The statistics of one token from the pieces every kernel computes (perplexity.cpp's
// log_softmax(n_vocab, logits, const uint16_t *, tok, kld)).
KldToken finish_token(const BaseRow & b, const float * q, const float * base, int32_t target, float q_max,
                      double q_sum_exp, float b_max, double b_sum_exp, double kld, bool same_top) {
    KldToken t{};
    const float shifted = base[target] - b_max;
    t.nll_base_exact = -(shifted - std::log(b_sum_exp));
    const float log_sum_exp = static_cast<float>(std::log(q_sum_exp));
    t.nll = q_max + log_sum_exp - q[target];
    t.nll_base = -b.log_prob(b.code(base[target]));
    t.kld = kld;
    t.same_top = same_top;
    t.p_diff = expf(-t.nll) - expf(-t.nll_base);
    return t;
}

KldToken kld_row_scalar(const float * q, const float * base, int32_t n_vocab, int32_t target) {
    float b_max = base[0];
    float b_min = base[0];
    float q_max = q[0];
    int32_t q_top = 0;
    bool bad = false;
    for (int32_t i = 0; i < n_vocab; ++i) {
        bad |= !std::isfinite(base[i]) || !std::isfinite(q[i]);
        b_max = std::max(b_max, base[i]);
        b_min = std::min(b_min, base[i]);
        if (q[i] > q_max) {
            q_max = q[i];
            q_top = i;
        }
    }
    if (bad) {
        return nan_token();
    }
    double b_sum = 0.0;
    double q_sum = 0.0;
    for (int32_t i = 0; i < n_vocab; ++i) {
        b_sum += expf(base[i] - b_max);
        q_sum += expf(q[i] - q_max);
    }
    const BaseRow b = BaseRow::make(b_max, b_min, b_sum);
    const float q_norm = q_max + static_cast<float>(std::log(q_sum));
    double kld = 0.0;
    int32_t base_top = -1;
    float best = 0.0f;
    for (int32_t i = 0; i < n_vocab; ++i) {
        const float p_log_base = b.log_prob(b.code(base[i]));
        if (i == 0 || p_log_base > best) {
            best = p_log_base;
            base_top = i;
        }
        if (p_log_base > -16.f) {
            const float p_base = expf(p_log_base);
            kld += p_base * (p_log_base - q[i] + q_norm);
        }
    }
    return finish_token(b, q, base, target, q_max, q_sum, b_max, b_sum, kld, q_top == base_top);
}

#ifdef GGQ_HAVE_AVX2_KERNEL

// exp(x) for x <= 0, 8 lanes, within about 1 ulp of expf (Cody-Waite reduction and Cephes'
// degree-5 polynomial). x is clamped at -87.3, where exp is 1e-38: such terms cannot move a sum
// that holds exp(0) = 1 for the row maximum.
__attribute__((target("avx2,fma"))) inline __m256 exp_nonpositive(__m256 x) {
    x = _mm256_max_ps(x, _mm256_set1_ps(-87.3f));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);  // ln 2 split in two
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    // 2^n: n >= -126 after the clamp, so the exponent field stays normal
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

// Same float/double choices as nll_row_scalar, 8 lanes at a time: the maximum is exact whatever
// the order; the exponentials differ from glibc's expf by about an ulp and are summed in double
// over 8 partial sums, which moves the NLL by ~1e-7 relative at most.
__attribute__((target("avx2,fma"))) double nll_row_avx2(const float * logits, int32_t n_vocab, int32_t target) {
    const int32_t n8 = n_vocab & ~7;
    __m256 vmax = _mm256_set1_ps(logits[0]);
    __m256 unordered = _mm256_setzero_ps();
    for (int32_t i = 0; i < n8; i += 8) {
        const __m256 v = _mm256_loadu_ps(logits + i);
        vmax = _mm256_max_ps(vmax, v);
        unordered = _mm256_or_ps(unordered, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    }
    alignas(32) float lanes[8];
    _mm256_store_ps(lanes, vmax);
    float max_logit = *std::max_element(lanes, lanes + 8);
    bool has_nan = _mm256_movemask_ps(unordered) != 0;
    for (int32_t i = n8; i < n_vocab; ++i) {
        has_nan |= std::isnan(logits[i]);
        max_logit = std::max(max_logit, logits[i]);
    }
    if (has_nan || !std::isfinite(max_logit)) {
        return kNaN;  // llama-perplexity's arithmetic gives NaN here too (NaN or inf - inf)
    }
    const __m256 m = _mm256_set1_ps(max_logit);
    __m256d sum_lo = _mm256_setzero_pd();
    __m256d sum_hi = _mm256_setzero_pd();
    for (int32_t i = 0; i < n8; i += 8) {
        const __m256 e = exp_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(logits + i), m));
        sum_lo = _mm256_add_pd(sum_lo, _mm256_cvtps_pd(_mm256_castps256_ps128(e)));
        sum_hi = _mm256_add_pd(sum_hi, _mm256_cvtps_pd(_mm256_extractf128_ps(e, 1)));
    }
    alignas(32) double partial[4];
    _mm256_store_pd(partial, _mm256_add_pd(sum_lo, sum_hi));
    double sum_exp = (partial[0] + partial[1]) + (partial[2] + partial[3]);
    for (int32_t i = n8; i < n_vocab; ++i) {
        sum_exp += expf(logits[i] - max_logit);
    }
    const float shifted = logits[target] - max_logit;
    return -(shifted - std::log(sum_exp));
}

// The first index of the maximum over 8 lanes that each kept their first maximum (strict >).
int32_t first_argmax(const float * best, const int32_t * idx) {
    float m = best[0];
    for (int k = 1; k < 8; ++k) {
        m = std::max(m, best[k]);
    }
    int32_t first = INT32_MAX;
    for (int k = 0; k < 8; ++k) {
        if (best[k] == m) {
            first = std::min(first, idx[k]);
        }
    }
    return first;
}

__attribute__((target("avx2,fma"))) inline void add_pd(__m256d & lo, __m256d & hi, __m256 v) {
    lo = _mm256_add_pd(lo, _mm256_cvtps_pd(_mm256_castps256_ps128(v)));
    hi = _mm256_add_pd(hi, _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1)));
}

__attribute__((target("avx2,fma"))) inline double hsum_pd(__m256d lo, __m256d hi) {
    alignas(32) double partial[4];
    _mm256_store_pd(partial, _mm256_add_pd(lo, hi));
    return (partial[0] + partial[1]) + (partial[2] + partial[3]);
}

// kld_row_scalar 8 lanes at a time, five passes over the two rows; the exponentials are
// exp_nonpositive's (about an ulp from expf) and the double sums run over 8 partial sums.
__attribute__((target("avx2,fma"))) KldToken kld_row_avx2(const float * q, const float * base, int32_t n_vocab,
                                                          int32_t target) {
    const int32_t n8 = n_vocab & ~7;
    const __m256i step = _mm256_set1_epi32(8);
    alignas(32) float lanes[8];
    alignas(32) float lanes2[8];
    alignas(32) int32_t lane_idx[8];

    // pass 1: base max and min, q max and its first index, NaN/inf anywhere
    __m256 vb_max = _mm256_set1_ps(base[0]);
    __m256 vb_min = vb_max;
    __m256 vq_max = _mm256_set1_ps(-INFINITY);
    __m256i vq_idx = _mm256_setzero_si256();
    __m256i idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    __m256 bad = _mm256_setzero_ps();
    const __m256 inf = _mm256_set1_ps(INFINITY);
    const __m256 sign = _mm256_set1_ps(-0.0f);
    for (int32_t i = 0; i < n8; i += 8) {
        const __m256 vb = _mm256_loadu_ps(base + i);
        const __m256 vq = _mm256_loadu_ps(q + i);
        bad = _mm256_or_ps(bad, _mm256_cmp_ps(_mm256_andnot_ps(sign, vb), inf, _CMP_NLT_UQ));
        bad = _mm256_or_ps(bad, _mm256_cmp_ps(_mm256_andnot_ps(sign, vq), inf, _CMP_NLT_UQ));
        vb_max = _mm256_max_ps(vb_max, vb);
        vb_min = _mm256_min_ps(vb_min, vb);
        const __m256 gt = _mm256_cmp_ps(vq, vq_max, _CMP_GT_OQ);
        vq_max = _mm256_blendv_ps(vq_max, vq, gt);
        vq_idx = _mm256_blendv_epi8(vq_idx, idx, _mm256_castps_si256(gt));
        idx = _mm256_add_epi32(idx, step);
    }
    bool has_bad = _mm256_movemask_ps(bad) != 0;
    _mm256_store_ps(lanes, vb_max);
    float b_max = *std::max_element(lanes, lanes + 8);
    _mm256_store_ps(lanes, vb_min);
    float b_min = *std::min_element(lanes, lanes + 8);
    _mm256_store_ps(lanes, vq_max);
    _mm256_store_si256(reinterpret_cast<__m256i *>(lane_idx), vq_idx);
    int32_t q_top = n8 > 0 ? first_argmax(lanes, lane_idx) : 0;
    float q_max = n8 > 0 ? q[q_top] : q[0];
    for (int32_t i = n8; i < n_vocab; ++i) {
        has_bad |= !std::isfinite(base[i]) || !std::isfinite(q[i]);
        b_max = std::max(b_max, base[i]);
        b_min = std::min(b_min, base[i]);
        if (q[i] > q_max) {
            q_max = q[i];
            q_top = i;
        }
    }
    if (has_bad) {
        return nan_token();
    }

    // pass 2: the two sums of exponentials
    const __m256 vbm = _mm256_set1_ps(b_max);
    const __m256 vqm = _mm256_set1_ps(q_max);
    __m256d b_lo = _mm256_setzero_pd(), b_hi = _mm256_setzero_pd();
    __m256d q_lo = _mm256_setzero_pd(), q_hi = _mm256_setzero_pd();
    for (int32_t i = 0; i < n8; i += 8) {
        add_pd(b_lo, b_hi, exp_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(base + i), vbm)));
        add_pd(q_lo, q_hi, exp_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(q + i), vqm)));
    }
    double b_sum = hsum_pd(b_lo, b_hi);
    double q_sum = hsum_pd(q_lo, q_hi);
    for (int32_t i = n8; i < n_vocab; ++i) {
        b_sum += expf(base[i] - b_max);
        q_sum += expf(q[i] - q_max);
    }
    const BaseRow b = BaseRow::make(b_max, b_min, b_sum);
    const float q_norm = q_max + static_cast<float>(std::log(q_sum));

    // pass 3: the stored base log-probs, their first argmax, and the KL sum
    const __m256 v_min_logit = _mm256_set1_ps(b.min_logit);
    const __m256 v_inv = _mm256_set1_ps(b.inv_scale);
    const __m256 v_scale = _mm256_set1_ps(b.scale);
    const __m256 v_min_lp = _mm256_set1_ps(b.min_log_prob);
    const __m256 v_cut = _mm256_set1_ps(-16.f);
    const __m256 v_qn = _mm256_set1_ps(q_norm);
    __m256 v_best = _mm256_set1_ps(-INFINITY);
    __m256i v_best_idx = _mm256_setzero_si256();
    idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    __m256d k_lo = _mm256_setzero_pd(), k_hi = _mm256_setzero_pd();
    for (int32_t i = 0; i < n8; i += 8) {
        const __m256 vb = _mm256_loadu_ps(base + i);
        const __m256 above = _mm256_cmp_ps(vb, v_min_logit, _CMP_GT_OQ);
        const __m256i code = _mm256_cvtps_epi32(_mm256_mul_ps(v_inv, _mm256_sub_ps(vb, v_min_logit)));
        const __m256 codef = _mm256_and_ps(_mm256_cvtepi32_ps(code), above);  // 0 at or below the minimum
        const __m256 plb = _mm256_add_ps(_mm256_mul_ps(v_scale, codef), v_min_lp);
        const __m256 gt = _mm256_cmp_ps(plb, v_best, _CMP_GT_OQ);
        v_best = _mm256_blendv_ps(v_best, plb, gt);
        v_best_idx = _mm256_blendv_epi8(v_best_idx, idx, _mm256_castps_si256(gt));
        idx = _mm256_add_epi32(idx, step);
        const __m256 term = _mm256_mul_ps(
            exp_nonpositive(plb), _mm256_add_ps(_mm256_sub_ps(plb, _mm256_loadu_ps(q + i)), v_qn));
        add_pd(k_lo, k_hi, _mm256_and_ps(term, _mm256_cmp_ps(plb, v_cut, _CMP_GT_OQ)));
    }
    double kld = hsum_pd(k_lo, k_hi);
    _mm256_store_ps(lanes2, v_best);
    _mm256_store_si256(reinterpret_cast<__m256i *>(lane_idx), v_best_idx);
    int32_t base_top = -1;
    float best = 0.0f;
    if (n8 > 0) {
        base_top = first_argmax(lanes2, lane_idx);
        best = b.log_prob(b.code(base[base_top]));
    }
    for (int32_t i = n8; i < n_vocab; ++i) {
        const float p_log_base = b.log_prob(b.code(base[i]));
        if (base_top < 0 || p_log_base > best) {
            best = p_log_base;
            base_top = i;
        }
        if (p_log_base > -16.f) {
            kld += expf(p_log_base) * (p_log_base - q[i] + q_norm);
        }
    }
    return finish_token(b, q, base, target, q_max, q_sum, b_max, b_sum, kld, q_top == base_top);
}

bool cpu_has_avx2() {
    static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    return ok;
}

#endif  // GGQ_HAVE_AVX2_KERNEL

}  // namespace

double nll_row(const float * logits, int32_t n_vocab, int32_t target) {
#ifdef GGQ_HAVE_AVX2_KERNEL
    if (cpu_has_avx2()) {
        return nll_row_avx2(logits, n_vocab, target);
    }
#endif
    return nll_row_scalar(logits, n_vocab, target);  // NaN or inf - inf propagate to a NaN
}

KldToken kld_row(const float * q, const float * base, int32_t n_vocab, int32_t target) {
#ifdef GGQ_HAVE_AVX2_KERNEL
    if (cpu_has_avx2()) {
        return kld_row_avx2(q, base, n_vocab, target);
    }
#endif
    return kld_row_scalar(q, base, n_vocab, target);
}

void parallel_for(int64_t n, int n_threads, const std::function<void(int64_t)> & fn) {
    const int n_workers = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(n_threads, n)));
    std::atomic<int64_t> next{0};
    auto work = [&]() {
        for (int64_t i = next.fetch_add(1); i < n; i = next.fetch_add(1)) {
            fn(i);
        }
    };
    std::vector<std::thread> workers;
    workers.reserve(n_workers - 1);
    for (int t = 1; t < n_workers; ++t) {
        workers.emplace_back(work);
    }
    work();
    for (auto & w : workers) {
        w.join();
    }
}

void nll_rows(const float * logits, int64_t n_rows, int32_t n_vocab, int64_t row_stride,
              const int32_t * targets, double * nll, int n_threads) {
    parallel_for(n_rows, n_threads, [&](int64_t i) {
        nll[i] = nll_row(logits + i * row_stride, n_vocab, targets[i]);
    });
}

void kld_rows(const float * q, const float * base, int64_t n_rows, int32_t n_vocab, int64_t row_stride,
              const int32_t * targets, KldToken * out, int n_threads) {
    parallel_for(n_rows, n_threads, [&](int64_t i) {
        out[i] = kld_row(q + i * row_stride, base + i * row_stride, n_vocab, targets[i]);
    });
}

}  // namespace ggq
