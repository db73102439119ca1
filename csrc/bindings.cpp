// Thin pybind11 bindings: the Python side owns buffers and batching; C++ owns the callback.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <cstdio>
#include <stdexcept>

#include "ggml.h"
#include "hook.h"
#include "ops.h"
#include "rpc-watch.h"

namespace py = pybind11;

namespace {

using int_array = py::array_t<int32_t, py::array::c_style | py::array::forcecast>;
using float_array = py::array_t<float, py::array::c_style>;
using float_in = py::array_t<float, py::array::c_style | py::array::forcecast>;
using int64_in = py::array_t<int64_t, py::array::c_style | py::array::forcecast>;
using uint8_in = py::array_t<uint8_t, py::array::c_style | py::array::forcecast>;

#ifdef GGSTEER_CUDA
constexpr bool cuda_compiled = true;
constexpr const char * cuda_architectures = GGSTEER_CUDA_ARCHITECTURES;
#else
constexpr bool cuda_compiled = false;
constexpr const char * cuda_architectures = "";
#endif

void check_op_fields(const hook_op & op, int32_t n_layer, size_t n_vectors, int64_t n_embd, size_t n_conditions) {
    if (op.kind < 0 || op.kind >= OPS_KIND_COUNT) {
        throw std::invalid_argument("unknown op kind " + std::to_string(op.kind));
    }
    if (op.layer < 0 || op.layer >= n_layer) {
        throw std::out_of_range("op layer " + std::to_string(op.layer) + " out of range");
    }
    if (op.when < HOOK_WHEN_ALL || op.when > HOOK_WHEN_GENERATED) {
        throw std::invalid_argument("unknown when " + std::to_string(op.when));
    }
    if (op.n_vector_rows < 1 || op.vector_offset < 0 ||
        (size_t) (op.vector_offset + (int64_t) op.n_vector_rows * n_embd) > n_vectors) {
        throw std::out_of_range("op vector outside the vector pool");
    }
    if (op.condition >= (int32_t) n_conditions) {
        throw std::out_of_range("op condition index out of range");
    }
    if (op.skip_first < 0) {
        throw std::invalid_argument("skip_first must be >= 0, got " + std::to_string(op.skip_first));
    }
}

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

    // ops: int32 [n_ops, 8] = kind, layer, slot, when, first_k, condition, n_vector_rows, skip_first
    void set_program(int_array ops, float_in coeffs, int64_in vector_offsets, int_array condition_layers,
                     float_in condition_thresholds, int64_in condition_offsets, float_in vectors, int32_t n_slots) {
        if (ops.ndim() != 2 || ops.shape(1) != 8 || coeffs.size() != ops.shape(0) || vector_offsets.size() != ops.shape(0)) {
            throw std::invalid_argument("ops must be int32 [n_ops, 8] with one coeff and vector offset per op");
        }
        if (condition_thresholds.size() != condition_layers.size() || condition_offsets.size() != condition_layers.size()) {
            throw std::invalid_argument("condition arrays differ in length");
        }
        hook_program prog;
        prog.n_slots = n_slots;
        prog.vectors.assign(vectors.data(), vectors.data() + vectors.size());
        for (py::ssize_t c = 0; c < condition_layers.size(); ++c) {
            hook_condition cond;
            cond.layer = condition_layers.data()[c];
            cond.threshold = condition_thresholds.data()[c];
            cond.vector_offset = condition_offsets.data()[c];
            if (cond.layer < 0 || cond.layer >= state_.n_layer || cond.vector_offset < 0 ||
                (size_t) (cond.vector_offset + state_.n_embd) > prog.vectors.size()) {
                throw std::out_of_range("condition layer or vector out of range");
            }
            prog.conditions.push_back(cond);
        }
        const int32_t * fields = ops.data();
        for (py::ssize_t i = 0; i < ops.shape(0); ++i) {
            const int32_t * f = fields + i * 8;
            hook_op op;
            op.kind = f[0];
            op.layer = f[1];
            op.slot = f[2];
            op.when = f[3];
            op.first_k = f[4];
            op.condition = f[5];
            op.n_vector_rows = f[6];
            op.skip_first = f[7];
            op.coeff = coeffs.data()[i];
            op.vector_offset = vector_offsets.data()[i];
            check_op_fields(op, state_.n_layer, prog.vectors.size(), state_.n_embd, prog.conditions.size());
            if (op.condition >= 0 && prog.conditions[op.condition].layer >= op.layer) {
                throw std::invalid_argument("a conditioned op must come after its condition layer");
            }
            prog.ops.push_back(op);
        }
        hook_set_program(state_, std::move(prog));
    }

    void clear_program() { hook_clear_program(state_); }

    // Who the rows of the next decode are (needed whenever a program is set).
    void set_rows(int_array slots, int_array positions, uint8_in generated, int_array output_rows) {
        if (slots.size() != positions.size() || slots.size() != generated.size()) {
            throw std::invalid_argument("slots, positions and generated differ in length");
        }
        hook_rows rows;
        rows.slot.assign(slots.data(), slots.data() + slots.size());
        rows.pos.assign(positions.data(), positions.data() + positions.size());
        rows.generated.assign(generated.data(), generated.data() + generated.size());
        rows.output_rows.assign(output_rows.data(), output_rows.data() + output_rows.size());
        hook_begin_decode(state_, std::move(rows));
    }

    // End the decode and forget its rows: a decode nobody described fails loudly instead of
    // using stale rows.
    void clear_rows() { hook_end_decode(state_); }

    // The first error the callback met since the last call, or "".
    std::string take_error() {
        std::string error = std::move(state_.error);
        state_.error.clear();
        return error;
    }

    std::vector<int8_t> condition_states() const { return state_.program.cond_on; }

    py::dict counts() const {
        py::dict counts;
        counts["host_kernel"] = state_.counts.host_kernel;
        counts["cuda_kernel"] = state_.counts.cuda_kernel;
        counts["copy_path"] = state_.counts.copy_path;
        counts["row_transfers"] = state_.counts.row_transfers;
        return counts;
    }
    bool intervening() const { return state_.intervening; }

    // -1 turns it off; otherwise every decode ends after l_out-<layer>
    void set_stop_after(int32_t layer) {
        if (layer < -1 || layer >= state_.n_layer) {
            throw std::out_of_range("stop_after layer " + std::to_string(layer) + " out of range -1.." +
                                    std::to_string(state_.n_layer - 1));
        }
        state_.stop_after_layer = layer;
    }
    int32_t stop_after() const { return state_.stop_after_layer; }
    // the layer the last decode stopped at, -1 when it ran the whole graph
    int32_t stopped_at() const { return state_.stopped_at; }
    void set_host_as_device(bool on) { state_.host_as_device = on; }

    ~Hook() { hook_free(state_); }

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
        .def("set_program", &Hook::set_program, py::arg("ops"), py::arg("coeffs"), py::arg("vector_offsets"),
             py::arg("condition_layers"), py::arg("condition_thresholds"), py::arg("condition_offsets"),
             py::arg("vectors"), py::arg("n_slots"),
             "Install interventions: ops int32 [n, 8] (kind, layer, slot, when, first_k, condition, n_vector_rows, skip_first).")
        .def("clear_program", &Hook::clear_program, "Remove every intervention.")
        .def("set_rows", &Hook::set_rows, py::arg("slots"), py::arg("positions"), py::arg("generated"),
             py::arg("output_rows"), "Describe the rows of the next decode: sequence slot, position, phase, outputs.")
        .def("clear_rows", &Hook::clear_rows,
             "End the decode: record an error unless each steered layer was seen once; forget the rows.")
        .def("take_error", &Hook::take_error, "The first error met by the callback since the last call, or ''.")
        .def("condition_states", &Hook::condition_states, "Per (condition, slot): 1 when the condition holds.")
        .def("counts", &Hook::counts,
             "Totals since creation: op applications per path (host_kernel, cuda_kernel, copy_path) and row_transfers.")
        .def_property_readonly("intervening", &Hook::intervening)
        .def("set_stop_after", &Hook::set_stop_after, py::arg("layer"),
             "End every following decode right after l_out-<layer> (-1: run whole graphs). For decodes whose "
             "logits nobody reads: the later blocks' KV cells are left unwritten.")
        .def_property_readonly("stop_after", &Hook::stop_after)
        .def_property_readonly("stopped_at", &Hook::stopped_at,
                               "The layer the last described decode stopped at, or -1.")
        .def("set_host_as_device", &Hook::set_host_as_device,
             "Testing: handle host buffers through the transfer paths of other backends.")
        .def("finish_capture", &Hook::finish_capture,
             "End the capture; return per-layer copy counts, raise RuntimeError on a capture error.");

    m.def("layer_of_name", [](const std::string & name) {
        ggml_tensor t{};
        std::snprintf(t.name, sizeof(t.name), "%s", name.c_str());
        return hook_layer_of(&t);
    }, "Layer index parsed from a graph tensor name like 'l_out-3', or -1.");

    m.attr("OP_KINDS") = py::make_tuple("add", "ablate", "clamp", "add_normalized");
    m.attr("CUDA_COMPILED") = cuda_compiled;

    m.def("apply_op_cpu", [](int32_t kind, float_array data, float_in vectors, float coeff) {
        if (data.ndim() != 2 || vectors.ndim() != 2 || vectors.shape(0) != data.shape(0) || vectors.shape(1) != data.shape(1)) {
            throw std::invalid_argument("data and vectors must both be float32 [n_rows, n]");
        }
        if (kind < 0 || kind >= OPS_KIND_COUNT) {
            throw std::invalid_argument("unknown op kind");
        }
        const int64_t n_rows = data.shape(0), n = data.shape(1);
        std::vector<int32_t> rows(n_rows);
        std::vector<int64_t> offsets(n_rows);
        for (int64_t i = 0; i < n_rows; ++i) {
            rows[i] = (int32_t) i;
            offsets[i] = i * n;
        }
        ops_cpu_apply(kind, data.mutable_data(), n, rows.data(), n_rows, vectors.data(), offsets.data(), coeff, n);
    }, py::arg("kind"), py::arg("data"), py::arg("vectors"), py::arg("coeff"),
       "Apply op `kind` in place to each row of `data` with the matching row of `vectors` (CPU kernel).");

#ifdef GGSTEER_CUDA
    m.def("cuda_device_available", []() { return ops_cuda_device_available(); }, "Whether a CUDA device is visible.");
    m.def("apply_op_cuda", [](int32_t kind, float_array data, float_in vectors, float coeff) {
        if (data.ndim() != 2 || vectors.ndim() != 2 || vectors.shape(0) != data.shape(0) || vectors.shape(1) != data.shape(1)) {
            throw std::invalid_argument("data and vectors must both be float32 [n_rows, n]");
        }
        std::string error;
        if (!ops_cuda_roundtrip(kind, data.mutable_data(), data.shape(0), vectors.data(), coeff, data.shape(1), error)) {
            throw std::runtime_error(error);
        }
    }, py::arg("kind"), py::arg("data"), py::arg("vectors"), py::arg("coeff"),
       "Apply op `kind` like apply_op_cpu, through the CUDA kernel on device copies.");
#else
    m.def("cuda_device_available", []() { return false; }, "Whether a CUDA device is visible (never: built without CUDA).");
#endif

    m.def("watch_rpc_workers", &rpc_watch_workers, py::arg("endpoints"), py::arg("exit_code"),
          "Turn ggml-rpc's abort on a lost worker into one line naming it and _exit(exit_code).");
    m.def("watch_rpc_notify", &rpc_watch_notify, py::arg("fds"), py::arg("grace_ms"),
          "Server mode: also write the lost worker's line to these fds and wait grace_ms before _exit.");

    m.def("build_info", []() {
        py::dict info;
        info["llama_cpp_python_version"] = GGSTEER_LLAMA_CPP_PYTHON_VERSION;
        info["header_hash"] = GGSTEER_HEADER_HASH;
        info["cuda_architectures"] = cuda_architectures;
        return info;
    }, "The llama-cpp-python version, header fingerprint and CUDA architectures of this build.");
}
