#include "hook.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>

#include "ggml.h"
#include "ggml-backend.h"


int32_t hook_layer_of(const ggml_tensor * t) {
    static const char prefix[] = "l_out-";
    if (std::strncmp(t->name, prefix, sizeof(prefix) - 1) != 0) {
        return -1;
    }
    const char * digits = t->name + sizeof(prefix) - 1;
    if (*digits < '0' || *digits > '9') {
        return -1;
    }
    char * end = nullptr;
    const long il = std::strtol(digits, &end, 10);
    return *end == '\0' ? (int32_t) il : -1;
}

static bool capture_wants(const hook_state & state, int32_t il) {
    return state.capturing && il >= 0 && il < state.n_layer && state.plan.slot_of_layer[il] >= 0;
}

void hook_fail(hook_state & state, std::string message) {
    if (state.error.empty()) {
        state.error = std::move(message);
    }
}

bool hook_in_host_memory(const hook_state & state, const ggml_tensor * t) {
    return ggml_backend_buffer_is_host(t->buffer) && !state.host_as_device;
}

const float * hook_read_rows(hook_state & state, const ggml_tensor * t, int64_t first, int64_t count,
                             std::vector<float> & copy, int64_t & row_stride) {
    row_stride = (int64_t) (t->nb[1] / sizeof(float));
    if (hook_in_host_memory(state, t)) {
        return (const float *) t->data + first * row_stride;
    }
    const size_t bytes = (count - 1) * t->nb[1] + t->ne[0] * sizeof(float);
    copy.resize((bytes + sizeof(float) - 1) / sizeof(float));
    ggml_backend_tensor_get(t, copy.data(), first * t->nb[1], bytes);
    state.counts.row_transfers += 1;
    return copy.data();
}

// Wanted rows closer than this many bytes travel in one transfer with the rows between them:
// a blocking device copy costs about as much as moving this much more data.
static const size_t capture_gap_bytes = 64 * 1024;

// Copies the planned rows of one l_out tensor into the caller's buffer, in as few transfers as
// possible: each span of nearby wanted rows in one copy, then the rows picked on the host.
static void capture_copy_rows(hook_state & state, const ggml_tensor * t, int32_t il) {
    const capture_plan & plan = state.plan;
    if (t->type != GGML_TYPE_F32 || t->ne[0] != state.n_embd || t->nb[0] != sizeof(float)) {
        hook_fail(state, std::string("unexpected layout of ") + t->name);
        return;
    }
    // The last block keeps only the rows that produce outputs (llama.cpp drops the rest).
    const bool all_rows = t->ne[1] == plan.n_tokens;
    if (!all_rows && t->ne[1] != plan.n_outputs) {
        hook_fail(state, std::string(t->name) + " has " + std::to_string(t->ne[1]) +
                     " rows, expected the batch's " + std::to_string(plan.n_tokens) +
                     " tokens or " + std::to_string(plan.n_outputs) + " outputs (was the batch split?)");
        return;
    }
    const std::vector<int32_t> & src = all_rows ? plan.rows : plan.out_rows;
    const size_t n = src.size();
    for (size_t k = 0; k < n; ++k) {
        if (src[k] < 0 || src[k] >= t->ne[1]) {
            hook_fail(state, std::string("row ") + std::to_string(plan.rows[k]) +
                         " is not an output row of " + t->name);
            return;
        }
    }
    const size_t row_bytes = state.n_embd * sizeof(float);
    const size_t gap_rows = capture_gap_bytes / t->nb[1];
    const int32_t slot = plan.slot_of_layer[il];
    size_t k = 0;
    while (k < n) {
        size_t end = k + 1;
        while (end < n && src[end] > src[end - 1] && (size_t) (src[end] - src[end - 1] - 1) <= gap_rows) {
            ++end;
        }
        int64_t row_stride = 0;
        const float * span = hook_read_rows(state, t, src[k], src[end - 1] - src[k] + 1, state.scratch, row_stride);
        for (size_t j = k; j < end; ++j) {
            float * dst = plan.out + (j * plan.n_slots + slot) * state.n_embd;
            std::memcpy(dst, span + (src[j] - src[k]) * row_stride, row_bytes);
        }
        k = end;
    }
    state.seen[il] += 1;
}

static bool program_wants(const hook_state & state, int32_t il) {
    return state.intervening && il >= 0 && il < state.n_layer && state.program.layer_active[il];
}

bool hook_eval_callback(ggml_tensor * t, bool ask, void * user_data) {
    auto * state = static_cast<hook_state *>(user_data);
    state->decode_nodes += 1;
    const int32_t il = hook_layer_of(t);
    const bool capture = capture_wants(*state, il);
    const bool intervene = program_wants(*state, il);
    const bool stop = il >= 0 && il == state->stop_after_layer;
    if (ask) {
        return capture || intervene || stop;
    }
    // interventions first: a capture reads what the next block will read
    if (intervene) {
        state->intervened[il] += 1;
        hook_intervene(*state, t, il);
    }
    if (capture) {
        capture_copy_rows(*state, t, il);
    }
    if (stop) {
        // false cancels the rest of this graph split: the scheduler computes no further node
        state->stopped_at = il;
        return false;
    }
    return true;
}

void hook_set_capture(hook_state & state, capture_plan plan) {
    state.plan = std::move(plan);
    state.seen.assign(state.n_layer, 0);
    state.error.clear();
    state.capturing = true;
}

void hook_clear_capture(hook_state & state) {
    state.capturing = false;
    state.plan = capture_plan{};
}

// Same layer, threshold and direction: the same condition, whatever its index in either program.
static bool same_condition(const hook_program & a, size_t ca, const hook_program & b, size_t cb, int64_t n_embd) {
    const hook_condition & x = a.conditions[ca];
    const hook_condition & y = b.conditions[cb];
    return x.layer == y.layer && x.threshold == y.threshold &&
           std::memcmp(&a.vectors[x.vector_offset], &b.vectors[y.vector_offset], n_embd * sizeof(float)) == 0;
}

// Sequences that keep running under a new program (others joining or leaving the batch) keep
// their condition decisions; a sequence starting over resets its own state at position 0.
static void carry_condition_state(const hook_program & old, hook_program & prog, int64_t n_embd) {
    const int32_t n_slots = std::min(old.n_slots, prog.n_slots);
    for (size_t c = 0; c < prog.conditions.size(); ++c) {
        for (size_t o = 0; o < old.conditions.size(); ++o) {
            if (!same_condition(old, o, prog, c, n_embd)) {
                continue;
            }
            for (int32_t slot = 0; slot < n_slots; ++slot) {
                const size_t from = o * old.n_slots + slot;
                const size_t to = c * prog.n_slots + slot;
                std::copy_n(&old.cond_sum[from * n_embd], n_embd, &prog.cond_sum[to * n_embd]);
                prog.cond_count[to] = old.cond_count[from];
                prog.cond_on[to] = old.cond_on[from];
            }
            break;
        }
    }
}

void hook_set_program(hook_state & state, hook_program program) {
    const uint64_t version = state.program.version + 1;
    const size_t n_cond = program.conditions.size() * (size_t) program.n_slots;
    program.cond_sum.assign(n_cond * state.n_embd, 0.0);
    program.cond_count.assign(n_cond, 0);
    program.cond_on.assign(n_cond, 0);
    carry_condition_state(state.program, program, state.n_embd);
    state.program = std::move(program);
    state.program.version = version;
    state.program.layer_active.assign(state.n_layer, 0);
    for (const hook_op & op : state.program.ops) {
        state.program.layer_active[op.layer] = 1;
    }
    for (const hook_condition & cond : state.program.conditions) {
        state.program.layer_active[cond.layer] = 1;
    }
    state.intervening = !state.program.ops.empty() || !state.program.conditions.empty();
    state.intervened.assign(state.n_layer, 0);
}

#ifdef GGSTEER_CUDA
void hook_cuda_free(hook_state & state);
#endif

void hook_free(hook_state & state) {
#ifdef GGSTEER_CUDA
    hook_cuda_free(state);
#endif
    state.cuda = nullptr;
}

void hook_clear_program(hook_state & state) {
    hook_set_program(state, hook_program{});
    state.rows = hook_rows{};
}

void hook_begin_decode(hook_state & state, hook_rows rows) {
    state.rows = std::move(rows);
    state.rows.described = true;
    state.decode_nodes = 0;
    state.stopped_at = -1;
    state.intervened.assign(state.n_layer, 0);
    state.error.clear();
}

void hook_end_decode(hook_state & state) {
    // a decode that failed before computing its graph visited nothing, and has its own error
    if (state.rows.described && state.intervening && state.decode_nodes > 0) {
        // a graph ended early (stop_after_layer) never reached the layers after it
        const int32_t n_reached = state.stopped_at >= 0 ? state.stopped_at + 1 : state.n_layer;
        for (int32_t il = 0; il < n_reached; ++il) {
            if (state.program.layer_active[il] && state.intervened[il] != 1) {
                hook_fail(state, "layer " + std::to_string(il) + ": the graph had " + std::to_string(state.intervened[il]) +
                                     " nodes named l_out-" + std::to_string(il) + " in this decode, expected exactly 1");
                break;
            }
        }
    }
    state.rows = hook_rows{};
}
