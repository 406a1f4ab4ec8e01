// Per-token statistics over rows of logits: the hot loops of `ggq ppl`. Plain arrays in, plain
// numbers out; no llama.cpp and no Python here.
#pragma once

#include <cstdint>
#include <functional>

namespace ggq {

// Negative log-likelihood of `target` under softmax(logits[0..n_vocab)), computed the way
// llama-perplexity's log_softmax() does: float max and float exp(logit - max), the sum of the
// exponentials in double, the result in double. NaN when the row holds a NaN or an infinity
// (llama-perplexity would average that NaN in; the caller reports it instead).
double nll_row(const float * logits, int32_t n_vocab, int32_t target);

// Calls fn(i) for every i in [0, n), on n_threads threads (the calling one included), handing
// out indices one at a time so that slow rows do not stall a thread's fixed share.
void parallel_for(int64_t n, int n_threads, const std::function<void(int64_t)> & fn);

// One token of llama-perplexity's --kl-divergence, quantized model row `q` against base row
// `base`, with that tool's definitions: the base row's log-probabilities are stored in 16 bits
// (scale and minimum per row, logits more than 16 below the maximum clamped there) exactly as its
// base logits file holds them, and the KL sum skips base log-probabilities <= -16.
struct KldToken {
    double kld;       // sum_i p_base(i) (log p_base(i) - log p_q(i))
    float p_diff;     // p_q(target) - p_base(target)
    float nll;        // -log p_q(target), as llama-perplexity computes it in KL mode (float)
    float nll_base;   // -log p_base(target) from the 16-bit log-probabilities
    double nll_base_exact;  // -log p_base(target) from the float logits, as nll_row() computes it
    bool same_top;    // the first argmax of q equals the first argmax of the stored base log-probs
};

// NaN in every field but same_top when either row holds a NaN or an infinity.
KldToken kld_row(const float * q, const float * base, int32_t n_vocab, int32_t target);

void kld_rows(const float * q, const float * base, int64_t n_rows, int32_t n_vocab, int64_t row_stride,
              const int32_t * targets, KldToken * out, int n_threads);

// nll[i] = nll_row(logits + i*row_stride, n_vocab, targets[i]) for i in [0, n_rows).
void nll_rows(const float * logits, int64_t n_rows, int32_t n_vocab, int64_t row_stride,
              const int32_t * targets, double * nll, int n_threads);

}  // namespace ggq
