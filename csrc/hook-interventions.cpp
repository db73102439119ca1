// Interventions on l_out rows: pick the rows each op applies to, then run the op family on the
// tensor's backend (host memory: CPU kernel; CUDA: CUDA kernel; anything else: copy out and back).
#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "ggml.h"
#include "ggml-backend.h"
#include "hook.h"
#include "ops.h"

#ifdef GGSTEER_CUDA
bool hook_cuda_usable(hook_state & state, const ggml_tensor * t);
bool hook_cuda_apply(hook_state & state, ggml_tensor * t, int32_t kind, const std::vector<int32_t> & rows,
                     const std::vector<int64_t> & offsets, float coeff, std::string & error);
#endif

namespace {

// Batch row of each row of the tensor (the last block keeps only the output rows).
bool tensor_batch_rows(hook_state & state, const ggml_tensor * t, std::vector<int32_t> & batch_rows) {
    const int64_t n_rows = t->ne[1];
    const int64_t n_tokens = (int64_t) state.rows.slot.size();
    if (!state.rows.described) {
        hook_fail(state, std::string("a decode ggsteer did not describe (a direct llama_decode, e.g. Llama.embed) reached ") +
                             t->name + " while hook interventions are set: its rows were not steered");
        return false;
    }
    batch_rows.resize(n_rows);
    if (n_rows == n_tokens) {
        for (int64_t r = 0; r < n_rows; ++r) {
            batch_rows[r] = (int32_t) r;
        }
        return true;
    }
    if (n_rows == (int64_t) state.rows.output_rows.size()) {
        batch_rows = state.rows.output_rows;
        return true;
    }
    hook_fail(state, std::string(t->name) + " has " + std::to_string(n_rows) + " rows but the batch has " +
                         std::to_string(n_tokens) + " tokens and " + std::to_string(state.rows.output_rows.size()) +
                         " outputs (were the rows set for this decode?)");
    return false;
}

void update_conditions(hook_state & state, const ggml_tensor * t, int32_t il, const std::vector<int32_t> & batch_rows) {
    hook_program & prog = state.program;
    const int64_t n = state.n_embd;
    std::vector<float> copy;
    const float * rows = nullptr;
    int64_t row_stride = 0;
    for (size_t c = 0; c < prog.conditions.size(); ++c) {
        const hook_condition & cond = prog.conditions[c];
        if (cond.layer != il) {
            continue;
        }
        std::vector<uint8_t> touched(prog.n_slots, 0);
        // a row at position 0 starts a new sequence in its slot: forget the previous one
        for (size_t r = 0; r < batch_rows.size(); ++r) {
            const int32_t b = batch_rows[r];
            const int32_t slot = state.rows.slot[b];
            if (slot >= 0 && slot < prog.n_slots && state.rows.pos[b] == 0) {
                const size_t at = c * prog.n_slots + slot;
                std::fill(prog.cond_sum.begin() + at * n, prog.cond_sum.begin() + (at + 1) * n, 0.0);
                prog.cond_count[at] = 0;
                prog.cond_on[at] = 0;
            }
        }
        for (size_t r = 0; r < batch_rows.size(); ++r) {
            const int32_t b = batch_rows[r];
            const int32_t slot = state.rows.slot[b];
            if (slot < 0 || slot >= prog.n_slots || state.rows.generated[b]) {
                continue;  // decided on the prompt, then kept while generating
            }
            if (rows == nullptr) {
                rows = hook_read_rows(state, t, 0, t->ne[1], copy, row_stride);
            }
            const float * row = rows + (int64_t) r * row_stride;
            double * sum = &prog.cond_sum[(c * prog.n_slots + slot) * n];
            for (int64_t k = 0; k < n; ++k) {
                sum[k] += row[k];
            }
            prog.cond_count[c * prog.n_slots + slot] += 1;
            touched[slot] = 1;
        }
        const float * dir = &prog.vectors[cond.vector_offset];
        for (int32_t slot = 0; slot < prog.n_slots; ++slot) {
            if (!touched[slot]) {
                continue;
            }
            const double * sum = &prog.cond_sum[(c * prog.n_slots + slot) * n];
            double dot = 0.0, norm = 0.0;
            for (int64_t k = 0; k < n; ++k) {
                dot += sum[k] * dir[k];
                norm += sum[k] * sum[k];
            }
            const double cosine = norm > 0.0 ? dot / std::sqrt(norm) : 0.0;
            prog.cond_on[c * prog.n_slots + slot] = cosine >= cond.threshold ? 1 : 0;
        }
    }
}

bool op_applies(const hook_state & state, const hook_op & op, int32_t b) {
    const int32_t slot = state.rows.slot[b];
    const int32_t pos = state.rows.pos[b];
    const bool generated = state.rows.generated[b] != 0;
    if (op.slot >= 0 && slot != op.slot) {
        return false;
    }
    if ((op.when == HOOK_WHEN_PROMPT && generated) || (op.when == HOOK_WHEN_GENERATED && !generated)) {
        return false;
    }
    if ((op.first_k >= 0 && pos >= op.first_k) || (op.n_vector_rows > 1 && pos >= op.n_vector_rows)) {
        return false;
    }
    if (pos < op.skip_first) {
        return false;  // the sink rows every later token attends to: rewriting them breaks the text
    }
    if (op.condition >= 0) {
        const hook_program & prog = state.program;
        if (slot < 0 || slot >= prog.n_slots || !prog.cond_on[op.condition * prog.n_slots + slot]) {
            return false;
        }
    }
    return true;
}

// Rows of any non-host, non-CUDA backend: copy out, apply on the CPU, copy back.
void apply_by_copy(ggml_tensor * t, const hook_program & prog, int32_t kind, const std::vector<int32_t> & rows,
                   const std::vector<int64_t> & offsets, float coeff, int64_t n) {
    std::vector<float> row(n);
    const int32_t zero = 0;
    for (size_t i = 0; i < rows.size(); ++i) {
        const size_t at = (size_t) rows[i] * t->nb[1];
        ggml_backend_tensor_get(t, row.data(), at, n * sizeof(float));
        ops_cpu_apply(kind, row.data(), n, &zero, 1, prog.vectors.data(), &offsets[i], coeff, n);
        ggml_backend_tensor_set(t, row.data(), at, n * sizeof(float));
    }
}

#ifdef GGSTEER_CUDA
bool is_cuda_buffer(const ggml_tensor * t) {
    const char * name = ggml_backend_buft_name(ggml_backend_buffer_get_type(t->buffer));
    return name != nullptr && std::strncmp(name, "CUDA", 4) == 0;
}
#endif

void apply_op(hook_state & state, ggml_tensor * t, const hook_op & op, const std::vector<int32_t> & rows,
              const std::vector<int64_t> & offsets) {
    const int64_t n = state.n_embd;
    if (hook_in_host_memory(state, t)) {
        ops_cpu_apply(op.kind, (float *) t->data, (int64_t) (t->nb[1] / sizeof(float)), rows.data(),
                      (int64_t) rows.size(), state.program.vectors.data(), offsets.data(), op.coeff, n);
        state.counts.host_kernel += 1;
        return;
    }
#ifdef GGSTEER_CUDA
    // without a kernel that loads on this device, CUDA rows go through ggml's copy functions
    if (is_cuda_buffer(t) && hook_cuda_usable(state, t)) {
        std::string error;
        if (!hook_cuda_apply(state, t, op.kind, rows, offsets, op.coeff, error)) {
            hook_fail(state, error);
            return;
        }
        state.counts.cuda_kernel += 1;
        return;
    }
#endif
    apply_by_copy(t, state.program, op.kind, rows, offsets, op.coeff, n);
    state.counts.copy_path += 1;
}

}  // namespace

void hook_intervene(hook_state & state, ggml_tensor * t, int32_t il) {
    if (t->type != GGML_TYPE_F32 || t->ne[0] != state.n_embd || t->nb[0] != sizeof(float)) {
        hook_fail(state, std::string("unexpected layout of ") + t->name);
        return;
    }
    std::vector<int32_t> batch_rows;
    if (!tensor_batch_rows(state, t, batch_rows)) {
        return;
    }
    update_conditions(state, t, il, batch_rows);
    std::vector<int32_t> rows;
    std::vector<int64_t> offsets;
    for (const hook_op & op : state.program.ops) {
        if (op.layer != il) {
            continue;
        }
        rows.clear();
        offsets.clear();
        for (size_t r = 0; r < batch_rows.size(); ++r) {
            const int32_t b = batch_rows[r];
            if (op_applies(state, op, b)) {
                rows.push_back((int32_t) r);
                const int64_t row_of_vector = op.n_vector_rows > 1 ? state.rows.pos[b] : 0;
                offsets.push_back(op.vector_offset + row_of_vector * state.n_embd);
            }
        }
        if (!rows.empty()) {
            apply_op(state, t, op, rows, offsets);
        }
    }
}
