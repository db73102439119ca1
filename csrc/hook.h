// ggsteer's eval callback: sees every node of llama.cpp's compute graph and acts on the
// residual-stream outputs `l_out-<il>` (capture now; interventions build on the same state).
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

struct hook_state {
    int32_t n_layer = 0;
    int64_t n_embd = 0;

    bool capturing = false;
    capture_plan plan;
    // per-layer count of captured tensors since the plan was set
    std::vector<int32_t> seen;
    // first error met inside the callback (the callback cannot throw into C)
    std::string error;
};

// Layer index of a tensor named `l_out-<il>`, or -1.
int32_t hook_layer_of(const ggml_tensor * t);

// The ggml_backend_sched_eval_callback installed on ggsteer's contexts.
bool hook_eval_callback(ggml_tensor * t, bool ask, void * user_data);

void hook_set_capture(hook_state & state, capture_plan plan);
void hook_clear_capture(hook_state & state);
