#include "logits.h"

#include <algorithm>
#include <atomic>
#include <cmath>
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

}  // namespace ggq
