// ggq._native: the compiled part of ggq, linked against the one llama.cpp build of the
// environment (ggq/lib). This slice reports what was built; the evaluation hot loops follow.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <dlfcn.h>

#include <string>
#include <vector>

#include "ggml-backend.h"
#include "ggml.h"
#include "llama.h"

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
}
