#include "evaluator.h"

#include <algorithm>
#include <cstring>
#include <utility>

#include "ggml-backend.h"
#include "ggml-cpu.h"
#include "logits.h"

namespace ggq {

namespace {

// While alive, llama.cpp's and ggml's log goes here instead of stderr: errors are kept for the
// exception message, the rest (hundreds of lines per model load) is dropped.
class LogCapture {
  public:
    LogCapture() {
        llama_log_get(&prev_callback_, &prev_user_data_);
        llama_log_set(&LogCapture::callback, this);
    }
    ~LogCapture() { llama_log_set(prev_callback_, prev_user_data_); }
    LogCapture(const LogCapture &) = delete;
    LogCapture & operator=(const LogCapture &) = delete;

    // "what: error lines" with the lines joined, or just "what" when llama.cpp said nothing.
    std::string message(const std::string & what) const {
        std::string errors = errors_;
        std::replace(errors.begin(), errors.end(), '\n', ' ');
        while (!errors.empty() && errors.back() == ' ') {
            errors.pop_back();
        }
        return errors.empty() ? what : what + ": " + errors;
    }

  private:
    static void callback(ggml_log_level level, const char * text, void * user_data) {
        auto * self = static_cast<LogCapture *>(user_data);
        std::lock_guard<std::mutex> lock(self->mutex_);
        if (level == GGML_LOG_LEVEL_ERROR || (level == GGML_LOG_LEVEL_CONT && self->in_error_)) {
            self->errors_ += text;
            self->in_error_ = true;
        } else if (level != GGML_LOG_LEVEL_CONT) {
            self->in_error_ = false;
        }
    }

    ggml_log_callback prev_callback_ = nullptr;
    void * prev_user_data_ = nullptr;
    std::mutex mutex_;
    std::string errors_;
    bool in_error_ = false;
};

const llama_vocab * vocab_of(const llama_model * model) { return llama_model_get_vocab(model); }

}  // namespace

Model::Model(const std::string & path, int32_t n_gpu_layers) {
    LogCapture log;
    llama_model_params params = llama_model_default_params();
    params.n_gpu_layers = n_gpu_layers;
    model_ = llama_model_load_from_file(path.c_str(), params);
    if (model_ == nullptr) {
        throw LlamaError(log.message("llama.cpp could not load " + path));
    }
}

Model::~Model() {
    LogCapture quiet;
    llama_model_free(model_);
}

int32_t Model::n_vocab() const { return llama_vocab_n_tokens(vocab_of(model_)); }
int32_t Model::n_ctx_train() const { return llama_model_n_ctx_train(model_); }
bool Model::add_bos() const { return llama_vocab_get_add_bos(vocab_of(model_)); }
bool Model::add_eos() const { return llama_vocab_get_add_eos(vocab_of(model_)); }
int32_t Model::bos() const { return llama_vocab_bos(vocab_of(model_)); }

std::string Model::description() const {
    char buf[256];
    llama_model_desc(model_, buf, sizeof(buf));
    return buf;
}

// common_tokenize()'s two calls: a first guess at the size, then the exact size it reports.
std::vector<int32_t> Model::tokenize(const std::string & text, bool add_special, bool parse_special) const {
    if (text.size() > static_cast<size_t>(INT32_MAX) - 2) {
        throw LlamaError("text of " + std::to_string(text.size()) + " bytes is too large for llama_tokenize");
    }
    LogCapture log;
    const auto n_text = static_cast<int32_t>(text.size());
    std::vector<int32_t> tokens(static_cast<size_t>(n_text) + 2 * add_special);
    int32_t n = llama_tokenize(vocab_of(model_), text.data(), n_text, tokens.data(),
                               static_cast<int32_t>(tokens.size()), add_special, parse_special);
    if (n < 0 && n != INT32_MIN) {
        tokens.resize(static_cast<size_t>(-n));
        n = llama_tokenize(vocab_of(model_), text.data(), n_text, tokens.data(),
                           static_cast<int32_t>(tokens.size()), add_special, parse_special);
    }
    if (n < 0) {
        throw LlamaError(log.message("llama_tokenize failed (" + std::to_string(n) + ")"));
    }
    tokens.resize(static_cast<size_t>(n));
    return tokens;
}

ChunkLayout ChunkLayout::make(int32_t n_ctx, int32_t n_batch) {
    if (n_ctx < 4 || n_batch < 1) {
        throw std::invalid_argument("n_ctx must be >= 4 and n_batch >= 1, got n_ctx=" + std::to_string(n_ctx) +
                                    " n_batch=" + std::to_string(n_batch));
    }
    ChunkLayout l{};
    l.n_ctx = n_ctx;
    l.n_seq = std::max(1, n_batch / n_ctx);  // llama-perplexity: n_parallel = max(1, n_batch / n_ctx)
    l.n_batch = std::min(n_batch, l.n_seq * n_ctx);
    l.n_calls = (n_ctx + l.n_batch - 1) / l.n_batch;
    l.first = n_ctx / 2;
    l.n_scored = n_ctx - 1 - l.first;
    return l;
}

Evaluator::Evaluator(std::shared_ptr<Model> model, int32_t n_ctx, int32_t n_batch, int32_t n_ubatch,
                     int32_t n_threads)
    : model_(std::move(model)), layout_(ChunkLayout::make(n_ctx, n_batch)), n_vocab_(model_->n_vocab()) {
    if (n_threads < 1 || n_ubatch < 1) {
        throw std::invalid_argument("n_threads and n_ubatch must be >= 1");
    }
    LogCapture log;
    // common_threadpools::init(): one CPU thread pool, as the tools attach to their context
    if (ggml_backend_dev_t cpu = ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_CPU)) {
        ggml_backend_reg_t reg = ggml_backend_dev_backend_reg(cpu);
        auto * tp_new = reinterpret_cast<decltype(ggml_threadpool_new) *>(
            ggml_backend_reg_get_proc_address(reg, "ggml_threadpool_new"));
        auto * tp_free = reinterpret_cast<decltype(ggml_threadpool_free) *>(
            ggml_backend_reg_get_proc_address(reg, "ggml_threadpool_free"));
        if (tp_new != nullptr && tp_free != nullptr) {
            ggml_threadpool_params tpp;
            ggml_threadpool_params_init(&tpp, n_threads);
            threadpool_ = {tp_new(&tpp), tp_free};
        }
    }
    // common_context_params_to_llama() with llama-perplexity's defaults
    llama_context_params params = llama_context_default_params();
    params.n_ctx = static_cast<uint32_t>(layout_.n_seq * layout_.n_ctx);
    params.n_batch = static_cast<uint32_t>(layout_.n_batch);
    params.n_ubatch = static_cast<uint32_t>(n_ubatch);
    params.n_seq_max = static_cast<uint32_t>(layout_.n_seq);
    params.n_threads = n_threads;
    params.n_threads_batch = n_threads;
    params.swa_full = false;
    params.no_perf = false;
    ctx_.reset(llama_init_from_model(model_->get(), params));
    if (!ctx_) {
        throw LlamaError(log.message("llama.cpp could not create a context of " + std::to_string(params.n_ctx) +
                                     " tokens"));
    }
    if (threadpool_) {
        llama_attach_threadpool(ctx_.get(), threadpool_.get(), nullptr);
    }
    batch_.reset(new llama_batch(llama_batch_init(layout_.n_batch, 0, 1)));
    warm_up();
}

// common_init_from_params()'s warm-up: decode BOS, EOS once, so that the first timed chunk does
// not pay for first-touch page faults and graph allocation, then forget it.
void Evaluator::warm_up() {
    llama_batch & batch = *batch_;
    batch.n_tokens = 0;
    for (llama_token t : {model_->bos(), llama_vocab_eos(llama_model_get_vocab(model_->get()))}) {
        if (t != LLAMA_TOKEN_NULL && batch.n_tokens < layout_.n_batch) {
            const int32_t i = batch.n_tokens++;
            batch.token[i] = t;
            batch.pos[i] = i;
            batch.n_seq_id[i] = 1;
            batch.seq_id[i][0] = 0;
            batch.logits[i] = false;
        }
    }
    if (batch.n_tokens > 0) {
        batch.logits[batch.n_tokens - 1] = true;
        if (llama_decode(ctx_.get(), batch) != 0) {
            throw LlamaError("llama_decode failed on the warm-up batch");
        }
    }
    llama_memory_clear(llama_get_memory(ctx_.get()), true);
    llama_synchronize(ctx_.get());
}

Evaluator::~Evaluator() {
    LogCapture quiet;  // llama_free() reports its buffer sizes
    batch_.reset();
    ctx_.reset();
    threadpool_.reset();
}

void Evaluator::evaluate(const int32_t * tokens, int32_t n_chunks) {
    std::lock_guard<std::mutex> lock(busy_);
    const ChunkLayout & l = layout_;
    if (n_chunks < 1 || n_chunks > l.n_seq) {
        throw std::invalid_argument("expected 1.." + std::to_string(l.n_seq) + " chunks, got " +
                                    std::to_string(n_chunks));
    }
    LogCapture log;
    n_chunks_ = 0;
    tokens_.assign(tokens, tokens + static_cast<size_t>(n_chunks) * l.n_ctx);
    own_logits_.clear();
    chunk_logits_.assign(n_chunks, nullptr);
    const bool add_bos = model_->add_bos();
    const int32_t bos = model_->bos();

    llama_memory_clear(llama_get_memory(ctx_.get()), true);
    llama_batch & batch = *batch_;
    for (int32_t call = 0; call < l.n_calls; ++call) {
        const int32_t pos0 = call * l.n_batch;
        const int32_t n_pos = std::min(l.n_ctx - pos0, l.n_batch);
        int32_t n_outputs = 0;
        batch.n_tokens = 0;
        for (int32_t seq = 0; seq < n_chunks; ++seq) {
            for (int32_t k = 0; k < n_pos; ++k) {
                const int32_t pos = pos0 + k;
                const int32_t i = batch.n_tokens++;
                batch.token[i] = (add_bos && pos == 0) ? bos : tokens_[static_cast<size_t>(seq) * l.n_ctx + pos];
                batch.pos[i] = pos;
                batch.n_seq_id[i] = 1;
                batch.seq_id[i][0] = seq;
                batch.logits[i] = pos >= l.first;
                n_outputs += pos >= l.first;
            }
        }
        const int32_t ret = llama_decode(ctx_.get(), batch);
        if (ret != 0) {
            throw LlamaError(log.message("llama_decode failed (" + std::to_string(ret) + ")"));
        }
        if (l.n_calls > 1 && n_outputs > 0) {  // n_seq is 1 here
            const float * out = llama_get_logits(ctx_.get());
            own_logits_.insert(own_logits_.end(), out, out + static_cast<size_t>(n_outputs) * n_vocab_);
        }
    }
    for (int32_t seq = 0; seq < n_chunks; ++seq) {
        chunk_logits_[seq] = l.n_calls > 1 ? own_logits_.data() : llama_get_logits_ith(ctx_.get(), seq * l.n_ctx + l.first);
        if (chunk_logits_[seq] == nullptr) {
            throw LlamaError(log.message("llama.cpp returned no logits for chunk " + std::to_string(seq)));
        }
    }
    n_chunks_ = n_chunks;
}

const float * Evaluator::logits(int32_t chunk) const {
    if (chunk < 0 || chunk >= n_chunks_) {
        throw std::out_of_range("chunk " + std::to_string(chunk) + " not in the last evaluate() (" +
                                std::to_string(n_chunks_) + " chunks)");
    }
    return chunk_logits_[chunk];
}

const int32_t * Evaluator::targets(int32_t chunk) const {
    logits(chunk);  // range check
    return tokens_.data() + static_cast<size_t>(chunk) * layout_.n_ctx + layout_.first + 1;
}

void Evaluator::nll(double * out, int n_threads) const {
    std::lock_guard<std::mutex> lock(busy_);
    if (n_chunks_ == 0) {
        throw std::logic_error("nll() before evaluate()");
    }
    const int64_t n_scored = layout_.n_scored;
    parallel_for(n_chunks_ * n_scored, n_threads, [&](int64_t i) {
        const auto chunk = static_cast<int32_t>(i / n_scored);
        const int64_t row = i % n_scored;
        out[i] = nll_row(logits(chunk) + row * n_vocab_, n_vocab_, targets(chunk)[row]);
    });
}

void Evaluator::kld(const Evaluator & base, KldToken * out, int n_threads) const {
    if (&base == this) {
        throw std::invalid_argument("kld(): the base must be another evaluator");
    }
    std::scoped_lock lock(busy_, base.busy_);
    if (n_chunks_ == 0 || base.n_chunks_ == 0) {
        throw std::logic_error("kld() before evaluate() of both models");
    }
    if (base.n_vocab_ != n_vocab_) {
        throw std::invalid_argument("different vocabularies: " + std::to_string(n_vocab_) + " tokens vs " +
                                    std::to_string(base.n_vocab_) + " in the base");
    }
    if (base.layout_.n_ctx != layout_.n_ctx || base.n_chunks_ != n_chunks_ || base.tokens_ != tokens_) {
        throw std::invalid_argument("kld(): the base evaluated other chunks than this model");
    }
    const int64_t n_scored = layout_.n_scored;
    parallel_for(n_chunks_ * n_scored, n_threads, [&](int64_t i) {
        const auto chunk = static_cast<int32_t>(i / n_scored);
        const int64_t row = i % n_scored;
        out[i] = kld_row(logits(chunk) + row * n_vocab_, base.logits(chunk) + row * n_vocab_, n_vocab_,
                         targets(chunk)[row]);
    });
}

void quantize_model(const std::string & input, const std::string & output, int32_t ftype, int32_t n_threads) {
    LogCapture log;  // llama_model_quantize logs every tensor; only its errors are kept
    llama_model_quantize_params params = llama_model_quantize_default_params();
    params.ftype = static_cast<enum llama_ftype>(ftype);
    params.nthread = n_threads;
    if (llama_model_quantize(input.c_str(), output.c_str(), &params) != 0) {
        throw LlamaError(log.message(input + ": llama_model_quantize failed"));
    }
}

}  // namespace ggq
