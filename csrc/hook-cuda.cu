// Device side of the interventions: the program's vectors live on each GPU that holds l_out
// tensors; rows and vector offsets are copied per op. The scheduler has synchronized the backend
// before calling the hook, and we synchronize our stream before returning, so ordering holds.
#include <cuda_runtime.h>

#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "ggml.h"
#include "ggml-backend.h"
#include "hook.h"
#include "ops.h"

namespace {

struct device_scratch {
    cudaStream_t stream = nullptr;
    float * vectors = nullptr;
    size_t vectors_size = 0;  // bytes
    uint64_t vectors_version = 0;
    int32_t * rows = nullptr;
    size_t rows_size = 0;
    int64_t * offsets = nullptr;
    size_t offsets_size = 0;
};

}  // namespace

struct hook_cuda_scratch {
    std::vector<device_scratch> devices;
    std::vector<int8_t> usable;  // per device; -1: not checked yet
};

namespace {

int device_of(const ggml_tensor * t) {
    const char * name = ggml_backend_buft_name(ggml_backend_buffer_get_type(t->buffer));
    return std::atoi(name + 4);  // "CUDA<n>"
}

bool check(cudaError_t status, const char * what, std::string & error) {
    if (status == cudaSuccess) {
        return true;
    }
    error = std::string("CUDA error in ") + what + ": " + cudaGetErrorString(status);
    return false;
}

// Grows a device buffer to at least `bytes`; a failed allocation leaves it empty (size 0),
// never holding the size of memory it no longer owns.
bool reserve(void ** ptr, size_t & size, size_t bytes, std::string & error) {
    if (*ptr != nullptr && bytes <= size) {
        return true;
    }
    if (*ptr != nullptr && !check(cudaFree(*ptr), "cudaFree", error)) {
        return false;
    }
    *ptr = nullptr;
    size = 0;
    if (!check(cudaMalloc(ptr, bytes), "cudaMalloc", error)) {
        *ptr = nullptr;
        return false;
    }
    size = bytes;
    return true;
}

bool upload_vectors(device_scratch & dev, const hook_program & prog, std::string & error) {
    if (dev.vectors_version == prog.version && dev.vectors != nullptr) {
        return true;
    }
    const size_t bytes = prog.vectors.size() * sizeof(float);
    if (!reserve((void **) &dev.vectors, dev.vectors_size, bytes, error) ||
        !check(cudaMemcpyAsync(dev.vectors, prog.vectors.data(), bytes, cudaMemcpyHostToDevice, dev.stream),
               "cudaMemcpyAsync", error)) {
        return false;
    }
    dev.vectors_version = prog.version;
    return true;
}

bool reserve_rows(device_scratch & dev, size_t n, std::string & error) {
    return reserve((void **) &dev.rows, dev.rows_size, n * sizeof(int32_t), error) &&
           reserve((void **) &dev.offsets, dev.offsets_size, n * sizeof(int64_t), error);
}

}  // namespace

bool hook_cuda_usable(hook_state & state, const ggml_tensor * t) {
    if (state.cuda == nullptr) {
        state.cuda = new hook_cuda_scratch();  // hook_cuda_apply runs only after this check
    }
    std::vector<int8_t> & usable = state.cuda->usable;
    const int device = device_of(t);
    if ((int) usable.size() <= device) {
        usable.resize(device + 1, -1);
    }
    if (usable[device] < 0) {
        // ggsteer's CUDA runtime may be newer than the driver, or hold no code for this GPU
        usable[device] = ops_cuda_kernel_loads(device) ? 1 : 0;
    }
    return usable[device] == 1;
}

bool hook_cuda_apply(hook_state & state, ggml_tensor * t, int32_t kind, const std::vector<int32_t> & rows,
                     const std::vector<int64_t> & offsets, float coeff, std::string & error) {
    const int device = device_of(t);
    if ((int) state.cuda->devices.size() <= device) {
        state.cuda->devices.resize(device + 1);
    }
    device_scratch & dev = state.cuda->devices[device];
    if (!check(cudaSetDevice(device), "cudaSetDevice", error)) {
        return false;
    }
    if (dev.stream == nullptr && !check(cudaStreamCreateWithFlags(&dev.stream, cudaStreamNonBlocking), "cudaStreamCreate", error)) {
        return false;
    }
    if (!upload_vectors(dev, state.program, error) || !reserve_rows(dev, rows.size(), error)) {
        return false;
    }
    if (!check(cudaMemcpyAsync(dev.rows, rows.data(), rows.size() * sizeof(int32_t), cudaMemcpyHostToDevice, dev.stream), "cudaMemcpyAsync", error) ||
        !check(cudaMemcpyAsync(dev.offsets, offsets.data(), offsets.size() * sizeof(int64_t), cudaMemcpyHostToDevice, dev.stream), "cudaMemcpyAsync", error)) {
        return false;
    }
    ops_cuda_apply(kind, (float *) t->data, (int64_t) (t->nb[1] / sizeof(float)), dev.rows, (int64_t) rows.size(),
                   dev.vectors, dev.offsets, coeff, state.n_embd, dev.stream);
    return check(cudaGetLastError(), "ops_cuda_kernel launch", error) &&
           check(cudaStreamSynchronize(dev.stream), "cudaStreamSynchronize", error);
}

void hook_cuda_free(hook_state & state) {
    if (state.cuda == nullptr) {
        return;
    }
    for (size_t device = 0; device < state.cuda->devices.size(); ++device) {
        device_scratch & dev = state.cuda->devices[device];
        if (dev.stream == nullptr) {
            continue;
        }
        cudaSetDevice((int) device);
        cudaFree(dev.vectors);
        cudaFree(dev.rows);
        cudaFree(dev.offsets);
        cudaStreamDestroy(dev.stream);
    }
    delete state.cuda;
    state.cuda = nullptr;
}

// Test entry: run one op on host arrays through the CUDA kernel (copies in and out).
bool ops_cuda_roundtrip(int32_t kind, float * data, int64_t n_rows, const float * vectors, float coeff, int64_t n_embd,
                        std::string & error) {
    const size_t data_bytes = n_rows * n_embd * sizeof(float);
    float * d_data = nullptr;
    float * d_vectors = nullptr;
    int32_t * d_rows = nullptr;
    int64_t * d_offsets = nullptr;
    std::vector<int32_t> rows(n_rows);
    std::vector<int64_t> offsets(n_rows);
    for (int64_t i = 0; i < n_rows; ++i) {
        rows[i] = (int32_t) i;
        offsets[i] = i * n_embd;
    }
    bool ok = check(cudaMalloc((void **) &d_data, data_bytes), "cudaMalloc", error) &&
              check(cudaMalloc((void **) &d_vectors, data_bytes), "cudaMalloc", error) &&
              check(cudaMalloc((void **) &d_rows, n_rows * sizeof(int32_t)), "cudaMalloc", error) &&
              check(cudaMalloc((void **) &d_offsets, n_rows * sizeof(int64_t)), "cudaMalloc", error) &&
              check(cudaMemcpy(d_data, data, data_bytes, cudaMemcpyHostToDevice), "cudaMemcpy", error) &&
              check(cudaMemcpy(d_vectors, vectors, data_bytes, cudaMemcpyHostToDevice), "cudaMemcpy", error) &&
              check(cudaMemcpy(d_rows, rows.data(), n_rows * sizeof(int32_t), cudaMemcpyHostToDevice), "cudaMemcpy", error) &&
              check(cudaMemcpy(d_offsets, offsets.data(), n_rows * sizeof(int64_t), cudaMemcpyHostToDevice), "cudaMemcpy", error);
    if (ok) {
        ops_cuda_apply(kind, d_data, n_embd, d_rows, n_rows, d_vectors, d_offsets, coeff, n_embd, nullptr);
        ok = check(cudaGetLastError(), "kernel launch", error) &&
             check(cudaMemcpy(data, d_data, data_bytes, cudaMemcpyDeviceToHost), "cudaMemcpy", error);
    }
    cudaFree(d_data);
    cudaFree(d_vectors);
    cudaFree(d_rows);
    cudaFree(d_offsets);
    return ok;
}

bool ops_cuda_device_available() {
    int count = 0;
    return cudaGetDeviceCount(&count) == cudaSuccess && count > 0;
}
