// Thin pybind11 bindings: the Python side owns buffers and batching; C++ owns the callback.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <cstdio>
#include <stdexcept>

#include "ggml.h"
#include "hook.h"

namespace py = pybind11;

namespace {

using int_array = py::array_t<int32_t, py::array::c_style | py::array::forcecast>;
using float_array = py::array_t<float, py::array::c_style>;

class Hook {
  public:
    Hook(int32_t n_layer, int64_t n_embd) {
        if (n_layer <= 0 || n_embd <= 0) {
            throw std::invalid_argument("n_layer and n_embd must be positive");
        }
        state_.n_layer = n_layer;
        state_.n_embd = n_embd;
        state_.seen.assign(n_layer, 0);
    }

    uintptr_t callback_address() const { return reinterpret_cast<uintptr_t>(&hook_eval_callback); }
    uintptr_t user_data_address() { return reinterpret_cast<uintptr_t>(&state_); }

    void set_capture(const std::vector<int32_t> & layers, int_array rows, int_array out_rows,
                     int64_t n_tokens, int64_t n_outputs, float_array out) {
        if (rows.size() != out_rows.size()) {
            throw std::invalid_argument("rows and out_rows differ in length");
        }
        const py::ssize_t n_rows = rows.size();
        if (out.ndim() != 3 || out.shape(0) != n_rows || out.shape(1) != (py::ssize_t) layers.size() ||
            out.shape(2) != state_.n_embd) {
            throw std::invalid_argument("out must be float32 [len(rows), len(layers), n_embd]");
        }
        capture_plan plan;
        plan.out = out.mutable_data();
        plan.n_slots = (int32_t) layers.size();
        plan.slot_of_layer.assign(state_.n_layer, -1);
        for (size_t slot = 0; slot < layers.size(); ++slot) {
            const int32_t il = layers[slot];
            if (il < 0 || il >= state_.n_layer) {
                throw std::out_of_range("layer " + std::to_string(il) + " out of range");
            }
            plan.slot_of_layer[il] = (int32_t) slot;
        }
        plan.rows.assign(rows.data(), rows.data() + n_rows);
        plan.out_rows.assign(out_rows.data(), out_rows.data() + n_rows);
        plan.n_tokens = n_tokens;
        plan.n_outputs = n_outputs;
        out_keepalive_ = out;
        hook_set_capture(state_, std::move(plan));
    }

    // Ends the capture; returns how many times each layer was copied, raises on an error.
    std::vector<int32_t> finish_capture() {
        hook_clear_capture(state_);
        out_keepalive_ = py::none();
        if (!state_.error.empty()) {
            std::string error = std::move(state_.error);
            state_.error.clear();
            throw std::runtime_error("ggsteer capture: " + error);
        }
        return state_.seen;
    }

    int32_t n_layer() const { return state_.n_layer; }
    int64_t n_embd() const { return state_.n_embd; }

  private:
    hook_state state_;
    py::object out_keepalive_ = py::none();
};

}  // namespace

PYBIND11_MODULE(_native, m) {
    m.doc() = "ggsteer's native eval-callback hooks on llama.cpp's compute graph";

    py::class_<Hook>(m, "Hook", "State of the eval callback installed on one llama_context.")
        .def(py::init<int32_t, int64_t>(), py::arg("n_layer"), py::arg("n_embd"))
        .def_property_readonly("callback_address", &Hook::callback_address,
                               "Address of the C callback, for llama_context_params.cb_eval.")
        .def_property_readonly("user_data_address", &Hook::user_data_address,
                               "Address of this hook's state, for cb_eval_user_data.")
        .def_property_readonly("n_layer", &Hook::n_layer)
        .def_property_readonly("n_embd", &Hook::n_embd)
        .def("set_capture", &Hook::set_capture, py::arg("layers"), py::arg("rows"), py::arg("out_rows"),
             py::arg("n_tokens"), py::arg("n_outputs"), py::arg("out"),
             "Plan the copy of `rows` of each layer's l_out into `out` during the next decode.")
        .def("finish_capture", &Hook::finish_capture,
             "End the capture; return per-layer copy counts, raise RuntimeError on a capture error.");

    m.def("layer_of_name", [](const std::string & name) {
        ggml_tensor t{};
        std::snprintf(t.name, sizeof(t.name), "%s", name.c_str());
        return hook_layer_of(&t);
    }, "Layer index parsed from a graph tensor name like 'l_out-3', or -1.");

    m.def("build_info", []() {
        py::dict info;
        info["llama_cpp_python_version"] = GGSTEER_LLAMA_CPP_PYTHON_VERSION;
        info["header_hash"] = GGSTEER_HEADER_HASH;
        return info;
    }, "The llama-cpp-python version and header fingerprint this extension was built against.");
}
