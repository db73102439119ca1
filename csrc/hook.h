// ggsteer's eval callback: sees every node of llama.cpp's compute graph and acts on the
// residual-stream outputs `l_out-<il>`: it copies rows out (capture) and modifies rows in place
// (interventions that llama.cpp's additive control vector cannot express).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

struct ggml_tensor;

// What to copy out of one llama_decode call (one ubatch).
struct capture_plan {
    // destination: [rows.size(), n_slots, n_embd] float32, owned by the caller
    float * out = nullptr;
    // slot of each layer in `out`, -1 where the layer is not captured
    std::vector<int32_t> slot_of_layer;
    int32_t n_slots = 0;
    // batch rows to copy, and each row's index among the output rows (-1: not an output)
    std::vector<int32_t> rows;
    std::vector<int32_t> out_rows;
    int64_t n_tokens = 0;
    int64_t n_outputs = 0;
};

enum hook_when : int32_t {
    HOOK_WHEN_ALL = 0,
    HOOK_WHEN_PROMPT = 1,
    HOOK_WHEN_GENERATED = 2,
};

// One intervention: an ops_kind applied at one layer to the rows of one sequence slot (or all).
struct hook_op {
    int32_t kind = 0;
    int32_t layer = 0;
    int32_t slot = -1;       // -1: every row
    int32_t when = HOOK_WHEN_ALL;
    int32_t first_k = -1;    // >= 0: only positions < first_k
    int32_t condition = -1;  // index into hook_program::conditions, -1: unconditional
    float coeff = 0.0f;
    int64_t vector_offset = 0;  // into hook_program::vectors
    int32_t n_vector_rows = 1;  // > 1: position p uses vector row p (token-aligned, ActAdd)
    int32_t skip_first = 0;     // positions < skip_first are left alone (attention sinks)
};

// CAST-style condition: the cosine between the mean of a sequence's prompt rows at `layer` and
// a unit direction, compared with `threshold`, switches the ops that name it on or off.
struct hook_condition {
    int32_t layer = 0;
    float threshold = 0.0f;
    int64_t vector_offset = 0;
};

struct hook_program {
    std::vector<hook_op> ops;
    std::vector<hook_condition> conditions;
    std::vector<float> vectors;
    std::vector<uint8_t> layer_active;  // per layer: any op or condition there
    int32_t n_slots = 0;
    // per (condition, slot): running sum of prompt rows, their count, and the decision
    std::vector<double> cond_sum;
    std::vector<int64_t> cond_count;
    std::vector<int8_t> cond_on;
    uint64_t version = 0;  // bumped on every change, so device copies know when to refresh
};

// Who each row of the current batch is: its sequence slot, position and phase.
struct hook_rows {
    bool described = false;  // false: a decode ggsteer did not describe (e.g. Llama.embed)
    std::vector<int32_t> slot;
    std::vector<int32_t> pos;
    std::vector<uint8_t> generated;
    std::vector<int32_t> output_rows;  // batch rows that produce outputs, in order
};

struct hook_cuda_scratch;

// Running totals since the hook was made: op applications per backend path (one op on one
// l_out tensor), and transfers of l_out rows to the host (capture, conditions off the host).
struct hook_counts {
    int64_t host_kernel = 0;
    int64_t cuda_kernel = 0;
    int64_t copy_path = 0;
    int64_t row_transfers = 0;
};

struct hook_state {
    int32_t n_layer = 0;
    int64_t n_embd = 0;

    bool capturing = false;
    capture_plan plan;
    // per-layer count of captured tensors since the plan was set
    std::vector<int32_t> seen;

    bool intervening = false;
    // treat host buffers like any other backend's (copy rows out and back, capture through
    // transfers): lets the CPU tests run the paths that non-host backends take
    bool host_as_device = false;
    hook_program program;
    hook_rows rows;
    hook_cuda_scratch * cuda = nullptr;

    // >= 0: end the graph after this layer's l_out (capture-only decodes: the later blocks and the
    // output head would compute logits nobody reads); the layer it stopped at in this decode, or -1
    int32_t stop_after_layer = -1;
    int32_t stopped_at = -1;

    // per decode: callback calls (0 when the graph never ran) and per-layer intervention visits
    int64_t decode_nodes = 0;
    std::vector<int32_t> intervened;
    hook_counts counts;
    // rows copied out of a non-host tensor, reused between layers
    std::vector<float> scratch;

    // first error met inside the callback (the callback cannot throw into C)
    std::string error;
};

// Layer index of a tensor named `l_out-<il>`, or -1.
int32_t hook_layer_of(const ggml_tensor * t);

// The ggml_backend_sched_eval_callback installed on ggsteer's contexts.
bool hook_eval_callback(ggml_tensor * t, bool ask, void * user_data);

void hook_set_capture(hook_state & state, capture_plan plan);
void hook_clear_capture(hook_state & state);
void hook_set_program(hook_state & state, hook_program program);
void hook_clear_program(hook_state & state);
void hook_free(hook_state & state);

// Starts a decode ggsteer described: its rows, fresh per-layer visits, and no error left over
// from a decode nobody described (that error belongs to a call that is over).
void hook_begin_decode(hook_state & state, hook_rows rows);
// Ends it: each layer the program acts on must have been visited exactly once; forgets the rows.
void hook_end_decode(hook_state & state);

// `count` rows of `t` from row `first` in host memory: the tensor's own memory when it lives
// there, else one transfer into `copy`. Row r (counted from `first`) starts at r * row_stride.
const float * hook_read_rows(hook_state & state, const ggml_tensor * t, int64_t first, int64_t count,
                             std::vector<float> & copy, int64_t & row_stride);
// Whether the kernels may work on the tensor's memory in place.
bool hook_in_host_memory(const hook_state & state, const ggml_tensor * t);

// Records the first error met inside the callback.
void hook_fail(hook_state & state, std::string message);

// Runs the program's ops on the rows of one l_out tensor (defined in hook-interventions.cpp).
void hook_intervene(hook_state & state, ggml_tensor * t, int32_t il);
