// ggq._quants: ggq's block encoders in C++, byte-identical to ggml_quantize_chunk.
//
//   quantize(type_name, rows, imatrix, n_threads) -> (n_rows, row_bytes) uint8
//
// rows: float32, C-contiguous, (n_rows, n_per_row); imatrix: None or float32 (n_per_row,);
// n_threads: 0 for all cores. Rows are split across std::threads with the GIL released.
// The kernels are in quants/ (one header per family, as ggq/ggml/: legacy.h, kquants.h, iq4.h,
// on floats.h, lanes.h and search.h).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cstdint>
#include <exception>
#include <string>
#include <thread>
#include <vector>

#include "quants/iq4.h"
#include "quants/kquants.h"
#include "quants/legacy.h"

namespace py = pybind11;

namespace {

using RowEncoder = void (*)(const float* x, int64_t n, const float* imatrix, uint8_t* out);

struct NativeType {
    const char* name;
    int block_size;  // weights per block
    int type_size;   // bytes per block
    RowEncoder encode;
};

namespace q = ggq_quants;

// x86-64 Linux with GCC: each encoder is also compiled for AVX2 (no FMA: the float results are
// those of the SSE2 build) and picked at load time; flatten inlines the kernels into each clone.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define GGQ_MULTIVERSION __attribute__((target_clones("avx2", "default"), flatten))
#else
#define GGQ_MULTIVERSION
#endif

#define GGQ_ENCODER(name, kernel)                                                        \
    GGQ_MULTIVERSION void name(const float* x, int64_t n, const float* qw, uint8_t* out) { \
        kernel(x, n, qw, out);                                                           \
    }

GGQ_ENCODER(encode_q4_0, q::encode_row_symmetric32<8>)
GGQ_ENCODER(encode_q4_1, q::encode_row_affine32<15>)
GGQ_ENCODER(encode_q5_0, q::encode_row_symmetric32<16>)
GGQ_ENCODER(encode_q5_1, q::encode_row_affine32<31>)
GGQ_ENCODER(encode_q8_0, q::encode_row_q8_0)
GGQ_ENCODER(encode_q2_k, q::encode_row_q2_k)
GGQ_ENCODER(encode_q3_k, q::encode_row_q3_k)
GGQ_ENCODER(encode_q4_k, q::encode_row_q45_k<15>)
GGQ_ENCODER(encode_q5_k, q::encode_row_q45_k<31>)
GGQ_ENCODER(encode_q6_k, q::encode_row_q6_k)
GGQ_ENCODER(encode_iq4_nl, q::encode_row_iq4_nl)
GGQ_ENCODER(encode_iq4_xs, q::encode_row_iq4_xs)

const NativeType kTypes[] = {
    {"Q4_0", 32, 18, encode_q4_0},     {"Q4_1", 32, 20, encode_q4_1},   {"Q5_0", 32, 22, encode_q5_0},
    {"Q5_1", 32, 24, encode_q5_1},     {"Q8_0", 32, 34, encode_q8_0},   {"Q2_K", 256, 84, encode_q2_k},
    {"Q3_K", 256, 110, encode_q3_k},   {"Q4_K", 256, 144, encode_q4_k}, {"Q5_K", 256, 176, encode_q5_k},
    {"Q6_K", 256, 210, encode_q6_k},   {"IQ4_NL", 32, 18, encode_iq4_nl}, {"IQ4_XS", 256, 136, encode_iq4_xs},
};

const NativeType& find_type(const std::string& name) {
    for (const NativeType& t : kTypes)
        if (name == t.name) return t;
    std::string known;
    for (const NativeType& t : kTypes) known += std::string(known.empty() ? "" : ", ") + t.name;
    throw py::value_error("ggq._quants: no native encoder for type '" + name + "'; native types: " + known);
}

std::string shape_of(const py::array& a) {
    std::string s = "(";
    for (py::ssize_t i = 0; i < a.ndim(); ++i) s += (i ? ", " : "") + std::to_string(a.shape(i));
    return s + (a.ndim() == 1 ? ",)" : ")");
}

std::string dtype_of(const py::array& a) { return py::str(a.dtype()).cast<std::string>(); }

bool is_c_contiguous(const py::array& a) { return (a.flags() & py::array::c_style) != 0; }

void check_float32(const py::array& a, const std::string& what) {
    if (!a.dtype().is(py::dtype::of<float>()))
        throw py::type_error("ggq._quants.quantize: " + what + " must be float32, got " + dtype_of(a));
    if (!is_c_contiguous(a))
        throw py::value_error("ggq._quants.quantize: " + what + " must be C-contiguous (shape " + shape_of(a) +
                              "); pass np.ascontiguousarray(...)");
}

// Encode rows [begin, end) of `x` into `out`.
void encode_rows(const NativeType& t, const float* x, const float* imatrix, int64_t n_per_row, int64_t row_bytes,
                 int64_t begin, int64_t end, uint8_t* out) {
    for (int64_t r = begin; r < end; ++r) t.encode(x + r * n_per_row, n_per_row, imatrix, out + r * row_bytes);
}

// Split rows into contiguous ranges, one per thread; exceptions are rethrown on the caller.
void run_threads(const NativeType& t, const float* x, const float* imatrix, int64_t n_rows, int64_t n_per_row,
                 int64_t row_bytes, int n_threads, uint8_t* out) {
    const int64_t n = std::max<int64_t>(1, std::min<int64_t>(n_threads, n_rows));
    if (n == 1) {
        encode_rows(t, x, imatrix, n_per_row, row_bytes, 0, n_rows, out);
        return;
    }
    std::vector<std::thread> workers;
    std::vector<std::exception_ptr> errors(static_cast<size_t>(n));
    workers.reserve(static_cast<size_t>(n));
    for (int64_t i = 0; i < n; ++i) {
        const int64_t begin = n_rows * i / n, end = n_rows * (i + 1) / n;
        workers.emplace_back([&, i, begin, end] {
            try {
                encode_rows(t, x, imatrix, n_per_row, row_bytes, begin, end, out);
            } catch (...) {
                errors[static_cast<size_t>(i)] = std::current_exception();
            }
        });
    }
    for (std::thread& w : workers) w.join();
    for (const std::exception_ptr& e : errors)
        if (e) std::rethrow_exception(e);
}

py::array_t<uint8_t> quantize(const std::string& type_name, const py::array& rows, const py::object& imatrix,
                              int n_threads) {
    const NativeType& t = find_type(type_name);
    check_float32(rows, "rows");
    if (rows.ndim() != 2)
        throw py::value_error("ggq._quants.quantize: rows must be 2-D (n_rows, n_per_row), got shape " + shape_of(rows));
    const int64_t n_rows = rows.shape(0), n_per_row = rows.shape(1);
    if (n_per_row % t.block_size != 0)
        throw py::value_error(std::string("ggq._quants.quantize: ") + t.name + ": row length " + std::to_string(n_per_row) +
                              " is not a multiple of the block size " + std::to_string(t.block_size));
    const float* qw = nullptr;
    py::array im;
    if (!imatrix.is_none()) {
        if (!py::isinstance<py::array>(imatrix))
            throw py::type_error("ggq._quants.quantize: imatrix must be a numpy array or None");
        im = imatrix.cast<py::array>();
        check_float32(im, "imatrix");
        if (im.ndim() != 1 || im.shape(0) != n_per_row)
            throw py::value_error("ggq._quants.quantize: imatrix has shape " + shape_of(im) + ", expected (" +
                                  std::to_string(n_per_row) + ",)");
        qw = static_cast<const float*>(im.data());
    }
    if (n_threads < 0)
        throw py::value_error("ggq._quants.quantize: n_threads must be >= 0 (0: all cores), got " + std::to_string(n_threads));
    if (n_threads == 0) n_threads = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));

    const int64_t row_bytes = n_per_row / t.block_size * t.type_size;
    py::array_t<uint8_t> out({n_rows, row_bytes});
    const float* x = static_cast<const float*>(rows.data());
    uint8_t* dst = out.mutable_data();
    {
        py::gil_scoped_release release;
        run_threads(t, x, qw, n_rows, n_per_row, row_bytes, n_threads, dst);
    }
    return out;
}

py::dict native_types() {
    py::dict d;
    for (const NativeType& t : kTypes) d[t.name] = py::make_tuple(t.block_size, t.type_size);
    return d;
}

}  // namespace

PYBIND11_MODULE(_quants, m) {
    m.doc() = "ggq's block encoders in C++, byte-identical to ggml_quantize_chunk";
    m.def("quantize", &quantize, py::arg("type_name"), py::arg("rows"), py::arg("imatrix") = py::none(),
          py::arg("n_threads") = 0,
          "Encode (n_rows, n_per_row) float32 C-contiguous rows in a ggml type -> (n_rows, row_bytes) uint8.\n"
          "imatrix: None or float32 (n_per_row,); n_threads: 0 for all cores.");
    m.def("types", &native_types, "The types with a native encoder: {name: (block_size, type_size)}.");
}
