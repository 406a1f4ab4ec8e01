// ggq._native: the compiled part of ggq, linked against the one llama.cpp build of the
// environment (ggq/lib): what was built, and model evaluation with its per-token hot loops.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <dlfcn.h>

#include <memory>
#include <string>
#include <vector>

#include "evaluator.h"
#include "ggml-backend.h"
#include "ggml.h"
#include "llama.h"
#include "logits.h"

namespace py = pybind11;

namespace {

const char * device_type_name(enum ggml_backend_dev_type type) {
    switch (type) {
        case GGML_BACKEND_DEVICE_TYPE_CPU:
            return "cpu";
        case GGML_BACKEND_DEVICE_TYPE_GPU:
            return "gpu";
        case GGML_BACKEND_DEVICE_TYPE_IGPU:
            return "igpu";
        case GGML_BACKEND_DEVICE_TYPE_ACCEL:
            return "accel";
        default:
            return "unknown";
    }
}

// Where the dynamic loader found libllama: the file every user of this process shares.
std::string llama_library_path() {
    Dl_info info{};
    if (dladdr(reinterpret_cast<void *>(&llama_print_system_info), &info) == 0 || info.dli_fname == nullptr) {
        return "";
    }
    return info.dli_fname;
}

std::vector<std::string> backend_names() {
    std::vector<std::string> names;
    for (size_t i = 0; i < ggml_backend_reg_count(); ++i) {
        names.emplace_back(ggml_backend_reg_name(ggml_backend_reg_get(i)));
    }
    return names;
}

py::list devices() {
    py::list out;
    for (size_t i = 0; i < ggml_backend_dev_count(); ++i) {
        ggml_backend_dev_t dev = ggml_backend_dev_get(i);
        size_t free_bytes = 0;
        size_t total_bytes = 0;
        ggml_backend_dev_memory(dev, &free_bytes, &total_bytes);
        py::dict d;
        d["name"] = ggml_backend_dev_name(dev);
        d["description"] = ggml_backend_dev_description(dev);
        d["type"] = device_type_name(ggml_backend_dev_type(dev));
        d["backend"] = ggml_backend_reg_name(ggml_backend_dev_backend_reg(dev));
        d["memory_free"] = free_bytes;
        d["memory_total"] = total_bytes;
        out.append(d);
    }
    return out;
}

// Arrays cross the binding only as exactly the dtype, rank and C layout the loops read: a
// silent conversion would hide a caller's bug behind a copy.
template <typename T>
void check_array(const py::array & a, const char * name, py::ssize_t ndim) {
    if (!a.dtype().is(py::dtype::of<T>())) {
        throw py::type_error(std::string(name) + ": expected dtype " + std::string(py::str(py::dtype::of<T>())) +
                             ", got " + std::string(py::str(a.dtype())));
    }
    if (a.ndim() != ndim) {
        throw py::value_error(std::string(name) + ": expected " + std::to_string(ndim) + " dimensions, got " +
                              std::to_string(a.ndim()));
    }
    if (!(a.flags() & py::array::c_style)) {
        throw py::value_error(std::string(name) + ": expected a C-contiguous array");
    }
}

void check_token_ids(const int32_t * ids, size_t n, int32_t n_vocab, const char * name) {
    for (size_t i = 0; i < n; ++i) {
        if (ids[i] < 0 || ids[i] >= n_vocab) {
            throw py::value_error(std::string(name) + "[" + std::to_string(i) + "] = " + std::to_string(ids[i]) +
                                  " is not a token id of a vocabulary of " + std::to_string(n_vocab));
        }
    }
}

py::array_t<int32_t> tokenize(const ggq::Model & model, const py::bytes & text, bool add_special,
                              bool parse_special) {
    std::string s = text;
    std::vector<int32_t> ids;
    {
        py::gil_scoped_release release;
        ids = model.tokenize(s, add_special, parse_special);
    }
    py::array_t<int32_t> out(static_cast<py::ssize_t>(ids.size()));
    std::copy(ids.begin(), ids.end(), out.mutable_data());
    return out;
}

void evaluate(ggq::Evaluator & ev, const py::array & tokens) {
    const ggq::ChunkLayout & l = ev.layout();
    check_array<int32_t>(tokens, "tokens", 2);
    if (tokens.shape(1) != l.n_ctx || tokens.shape(0) < 1 || tokens.shape(0) > l.n_seq) {
        throw py::value_error("tokens: expected shape (1.." + std::to_string(l.n_seq) + ", " +
                              std::to_string(l.n_ctx) + "), got (" + std::to_string(tokens.shape(0)) + ", " +
                              std::to_string(tokens.shape(1)) + ")");
    }
    const auto * ids = static_cast<const int32_t *>(tokens.data());
    check_token_ids(ids, static_cast<size_t>(tokens.size()), ev.n_vocab(), "tokens");
    py::gil_scoped_release release;
    ev.evaluate(ids, static_cast<int32_t>(tokens.shape(0)));
}

py::array_t<double> chunk_nll(const ggq::Evaluator & ev, int n_threads) {
    if (n_threads < 1) {
        throw py::value_error("n_threads must be >= 1, got " + std::to_string(n_threads));
    }
    py::array_t<double> out({static_cast<py::ssize_t>(ev.n_chunks()), static_cast<py::ssize_t>(ev.layout().n_scored)});
    double * dst = out.mutable_data();
    py::gil_scoped_release release;
    ev.nll(dst, n_threads);
    return out;
}

py::array_t<float> chunk_logits(const ggq::Evaluator & ev, int32_t chunk) {
    const float * src = ev.logits(chunk);
    const auto n_scored = static_cast<py::ssize_t>(ev.layout().n_scored);
    py::array_t<float> out({n_scored, static_cast<py::ssize_t>(ev.n_vocab())});
    std::copy(src, src + out.size(), out.mutable_data());
    return out;
}

py::array_t<double> nll_rows(const py::array & logits, const py::array & targets, int n_threads) {
    check_array<float>(logits, "logits", 2);
    check_array<int32_t>(targets, "targets", 1);
    if (targets.shape(0) != logits.shape(0)) {
        throw py::value_error("targets: expected " + std::to_string(logits.shape(0)) + " (one per logits row), got " +
                              std::to_string(targets.shape(0)));
    }
    if (logits.shape(1) < 1 || logits.shape(1) > INT32_MAX || n_threads < 1) {
        throw py::value_error("logits: expected 1..2^31-1 columns and n_threads >= 1");
    }
    const auto n_vocab = static_cast<int32_t>(logits.shape(1));
    const auto * ids = static_cast<const int32_t *>(targets.data());
    check_token_ids(ids, static_cast<size_t>(targets.size()), n_vocab, "targets");
    py::array_t<double> out(targets.shape(0));
    const auto * rows = static_cast<const float *>(logits.data());
    double * dst = out.mutable_data();
    const int64_t n_rows = logits.shape(0);
    py::gil_scoped_release release;
    ggq::nll_rows(rows, n_rows, n_vocab, n_vocab, ids, dst, n_threads);
    return out;
}

// KldToken fields as separate arrays of the given shape, under the names ggq.eval.kld reads.
py::dict kld_arrays(const std::vector<ggq::KldToken> & toks, std::vector<py::ssize_t> shape) {
    py::array_t<double> kld(shape);
    py::array_t<float> p_diff(shape), nll(shape), nll_base(shape);
    py::array_t<double> nll_base_exact(shape);
    py::array_t<bool> same_top(shape);
    for (size_t i = 0; i < toks.size(); ++i) {
        kld.mutable_data()[i] = toks[i].kld;
        p_diff.mutable_data()[i] = toks[i].p_diff;
        nll.mutable_data()[i] = toks[i].nll;
        nll_base.mutable_data()[i] = toks[i].nll_base;
        nll_base_exact.mutable_data()[i] = toks[i].nll_base_exact;
        same_top.mutable_data()[i] = toks[i].same_top;
    }
    py::dict d;
    d["kld"] = kld;
    d["p_diff"] = p_diff;
    d["nll"] = nll;
    d["nll_base"] = nll_base;
    d["nll_base_exact"] = nll_base_exact;
    d["same_top"] = same_top;
    return d;
}

py::dict chunk_kld(const ggq::Evaluator & ev, const ggq::Evaluator & base, int n_threads) {
    if (n_threads < 1) {
        throw py::value_error("n_threads must be >= 1, got " + std::to_string(n_threads));
    }
    std::vector<ggq::KldToken> toks(static_cast<size_t>(ev.n_chunks()) * ev.layout().n_scored);
    {
        py::gil_scoped_release release;
        ev.kld(base, toks.data(), n_threads);
    }
    return kld_arrays(toks, {static_cast<py::ssize_t>(ev.n_chunks()), static_cast<py::ssize_t>(ev.layout().n_scored)});
}

py::dict kld_rows(const py::array & q, const py::array & base, const py::array & targets, int n_threads) {
    check_array<float>(q, "logits", 2);
    check_array<float>(base, "base_logits", 2);
    check_array<int32_t>(targets, "targets", 1);
    if (base.shape(0) != q.shape(0) || base.shape(1) != q.shape(1) || targets.shape(0) != q.shape(0)) {
        throw py::value_error("logits, base_logits and targets: expected shapes (n, n_vocab), (n, n_vocab), (n,)");
    }
    if (q.shape(1) < 1 || q.shape(1) > INT32_MAX || n_threads < 1) {
        throw py::value_error("logits: expected 1..2^31-1 columns and n_threads >= 1");
    }
    const auto n_vocab = static_cast<int32_t>(q.shape(1));
    const auto * ids = static_cast<const int32_t *>(targets.data());
    check_token_ids(ids, static_cast<size_t>(targets.size()), n_vocab, "targets");
    std::vector<ggq::KldToken> toks(static_cast<size_t>(q.shape(0)));
    const auto * qp = static_cast<const float *>(q.data());
    const auto * bp = static_cast<const float *>(base.data());
    {
        py::gil_scoped_release release;
        ggq::kld_rows(qp, bp, q.shape(0), n_vocab, n_vocab, ids, toks.data(), n_threads);
    }
    return kld_arrays(toks, {q.shape(0)});
}

void quantize_model(const std::string & input, const std::string & output, int32_t ftype, int32_t n_threads) {
    py::gil_scoped_release release;
    ggq::quantize_model(input, output, ftype, n_threads);
}

}  // namespace

PYBIND11_MODULE(_native, m) {
    m.doc() = "ggq native extension (llama.cpp " GGQ_LLAMA_COMMIT ")";
    m.attr("LLAMA_CPP_COMMIT") = GGQ_LLAMA_COMMIT;
    m.attr("LLAMA_CPP_SDIST") = GGQ_LLAMA_SDIST;
    m.def("ggml_commit", []() { return std::string(ggml_commit()); }, "Commit the linked ggml reports.");
    m.def("ggml_version", []() { return std::string(ggml_version()); });
    m.def("system_info", []() { return std::string(llama_print_system_info()); },
          "llama_print_system_info(): the CPU features and back ends compiled in.");
    m.def("supports_gpu_offload", []() { return llama_supports_gpu_offload(); });
    m.def("backends", &backend_names, "Names of the registered ggml back ends.");
    m.def("devices", &devices, "Devices the back ends see, with their memory in bytes.");
    m.def("llama_library_path", &llama_library_path, "Path of the libllama this process loaded.");

    llama_backend_init();
    py::register_exception<ggq::LlamaError>(m, "LlamaError", PyExc_RuntimeError);

    py::class_<ggq::Model, std::shared_ptr<ggq::Model>>(m, "Model", "A GGUF model loaded by llama.cpp.")
        .def(py::init([](const std::string & path, int32_t n_gpu_layers) {
                 py::gil_scoped_release release;
                 return std::make_shared<ggq::Model>(path, n_gpu_layers);
             }),
             py::arg("path"), py::arg("n_gpu_layers") = -1)
        .def_property_readonly("n_vocab", &ggq::Model::n_vocab)
        .def_property_readonly("n_ctx_train", &ggq::Model::n_ctx_train)
        .def_property_readonly("add_bos", &ggq::Model::add_bos)
        .def_property_readonly("add_eos", &ggq::Model::add_eos)
        .def_property_readonly("bos", &ggq::Model::bos)
        .def_property_readonly("description", &ggq::Model::description)
        .def("tokenize", &tokenize, py::arg("text"), py::arg("add_special"), py::arg("parse_special"),
             "llama_tokenize() of UTF-8 bytes -> int32 token ids.");

    py::class_<ggq::Evaluator>(m, "Evaluator",
                               "A llama.cpp context evaluating chunks as llama-perplexity lays them out.")
        .def(py::init<std::shared_ptr<ggq::Model>, int32_t, int32_t, int32_t, int32_t>(), py::arg("model"),
             py::arg("n_ctx"), py::arg("n_batch"), py::arg("n_ubatch"), py::arg("n_threads"))
        .def_property_readonly("n_ctx", [](const ggq::Evaluator & e) { return e.layout().n_ctx; })
        .def_property_readonly("n_seq", [](const ggq::Evaluator & e) { return e.layout().n_seq; },
                               "Chunks evaluated side by side per evaluate().")
        .def_property_readonly("n_batch", [](const ggq::Evaluator & e) { return e.layout().n_batch; })
        .def_property_readonly("first", [](const ggq::Evaluator & e) { return e.layout().first; })
        .def_property_readonly("n_scored", [](const ggq::Evaluator & e) { return e.layout().n_scored; },
                               "Scored tokens per chunk: n_ctx - 1 - n_ctx // 2.")
        .def_property_readonly("n_vocab", &ggq::Evaluator::n_vocab)
        .def_property_readonly("n_chunks", &ggq::Evaluator::n_chunks)
        .def("evaluate", &evaluate, py::arg("tokens"),
             "Decode int32 tokens of shape (k, n_ctx), k <= n_seq, from an empty KV cache.")
        .def("nll", &chunk_nll, py::arg("n_threads"),
             "NLL of every scored token of the last evaluate(): float64 (k, n_scored).")
        .def("logits", &chunk_logits, py::arg("chunk"),
             "A copy of one chunk's scored logits: float32 (n_scored, n_vocab).")
        .def("kld", &chunk_kld, py::arg("base"), py::arg("n_threads"),
             "llama-perplexity's KL-divergence statistics against another evaluator that evaluated the "
             "same chunks: dict of arrays (k, n_scored): kld f64, p_diff/nll/nll_base f32, nll_base_exact f64 (the base's "
             "plain NLL), same_top bool.");

    m.def("nll_rows", &nll_rows, py::arg("logits"), py::arg("targets"), py::arg("n_threads"),
          "The per-token kernel on plain arrays: float32 (n, n_vocab), int32 (n,) -> float64 NLL (n,).");
    m.def("quantize", &quantize_model, py::arg("input"), py::arg("output"), py::arg("ftype"), py::arg("n_threads"),
          "llama_model_quantize() with llama.cpp's default parameters and the given llama_ftype.");
    m.def("kld_rows", &kld_rows, py::arg("logits"), py::arg("base_logits"), py::arg("targets"), py::arg("n_threads"),
          "The KL-divergence kernel on plain arrays: dict of (n,) arrays as Evaluator.kld returns.");
}
