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

// nll[i] = nll_row(logits + i*row_stride, n_vocab, targets[i]) for i in [0, n_rows).
void nll_rows(const float * logits, int64_t n_rows, int32_t n_vocab, int64_t row_stride,
              const int32_t * targets, double * nll, int n_threads);

}  // namespace ggq
