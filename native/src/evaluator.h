// Model evaluation through llama.cpp's C API, chunk by chunk, laid out as llama-perplexity lays
// it out (so that the logits, and so the perplexity, are the same).
#pragma once

#include <cstdint>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>

#include "ggml.h"
#include "llama.h"
#include "logits.h"

namespace ggq {

// llama.cpp refused something (a model, a context, a batch); the message carries its errors.
class LlamaError : public std::runtime_error {
  public:
    using std::runtime_error::runtime_error;
};

// A GGUF model loaded by llama.cpp: weights and vocabulary.
class Model {
  public:
    Model(const std::string & path, int32_t n_gpu_layers);
    ~Model();
    Model(const Model &) = delete;
    Model & operator=(const Model &) = delete;

    llama_model * get() const { return model_; }
    int32_t n_vocab() const;
    int32_t n_ctx_train() const;
    bool add_bos() const;
    bool add_eos() const;
    int32_t bos() const;
    std::string description() const;
    std::vector<int32_t> tokenize(const std::string & text, bool add_special, bool parse_special) const;

  private:
    llama_model * model_ = nullptr;
};

// How llama-perplexity lays chunks of n_ctx tokens into decode calls: n_seq chunks side by side
// in one batch when n_batch holds several of them, else one chunk over ceil(n_ctx / n_batch)
// calls. Logits are kept for positions >= first; rows first .. n_ctx-2 are scored (n_scored).
struct ChunkLayout {
    int32_t n_ctx;
    int32_t n_seq;
    int32_t n_batch;  // tokens per decode call, at most n_seq * n_ctx
    int32_t n_calls;  // decode calls per group of chunks
    int32_t first;
    int32_t n_scored;

    static ChunkLayout make(int32_t n_ctx, int32_t n_batch);
};

// One llama.cpp context evaluating groups of up to n_seq chunks, each from an empty KV cache.
// Two evaluators fed the same chunks (a quantized model and its base) give the two logit rows
// per token that a KL-divergence pass compares; nothing here depends on which statistic is taken.
class Evaluator {
  public:
    Evaluator(std::shared_ptr<Model> model, int32_t n_ctx, int32_t n_batch, int32_t n_ubatch, int32_t n_threads);
    ~Evaluator();
    Evaluator(const Evaluator &) = delete;
    Evaluator & operator=(const Evaluator &) = delete;

    const ChunkLayout & layout() const { return layout_; }
    int32_t n_vocab() const { return n_vocab_; }
    int32_t n_chunks() const { return n_chunks_; }  // in the last evaluate()

    // Decodes n_chunks <= n_seq chunks, tokens[n_chunks][n_ctx] row-major, with the KV cache
    // cleared first; BOS replaces each chunk's first token when the model adds BOS.
    void evaluate(const int32_t * tokens, int32_t n_chunks);

    // Scored logits of a chunk: n_scored rows of n_vocab floats (row r is position first + r),
    // and their targets (the token at position first + r + 1). Valid until the next evaluate().
    const float * logits(int32_t chunk) const;
    const int32_t * targets(int32_t chunk) const;

    // NLL of every scored token of the last evaluate(): out[n_chunks][n_scored].
    void nll(double * out, int n_threads) const;

    // llama-perplexity's --kl-divergence statistics of every scored token of the last
    // evaluate() against `base`, which must have evaluated the same chunks with the same
    // layout and vocabulary size: out[n_chunks][n_scored].
    void kld(const Evaluator & base, KldToken * out, int n_threads) const;

  private:
    void warm_up();

    struct FreeContext {
        void operator()(llama_context * ctx) const { llama_free(ctx); }
    };
    struct FreeBatch {
        void operator()(llama_batch * batch) const {
            llama_batch_free(*batch);
            delete batch;
        }
    };
    using FreeThreadpool = void (*)(ggml_threadpool_t);

    // declared in the order they are made: the context goes before its thread pool and model
    std::shared_ptr<Model> model_;
    ChunkLayout layout_;
    int32_t n_vocab_;
    std::unique_ptr<ggml_threadpool, FreeThreadpool> threadpool_{nullptr, nullptr};
    std::unique_ptr<llama_context, FreeContext> ctx_;
    std::unique_ptr<llama_batch, FreeBatch> batch_;
    std::vector<int32_t> tokens_;              // the chunks of the last evaluate(), as given
    std::vector<float> own_logits_;            // when a chunk takes several decode calls
    std::vector<const float *> chunk_logits_;  // per chunk: its first scored row
    int32_t n_chunks_ = 0;
    mutable std::mutex busy_;                  // one evaluate()/nll() at a time (the GIL is released)
};

// llama.cpp's own quantizer (llama_model_quantize, what llama-quantize runs) with its default
// parameters and the given llama_ftype; its per-tensor log is dropped, its errors thrown.
void quantize_model(const std::string & input, const std::string & output, int32_t ftype, int32_t n_threads);

}  // namespace ggq
