// Row operations on a block's output (the residual stream), one family shared by every backend.
// A "row" is one token's hidden state h of length n_embd. Each op reads one vector per row
// (for per-sequence and per-position steering the vector differs between rows).
#pragma once

#include <cstdint>

enum ops_kind : int32_t {
    OPS_ADD = 0,             // h += c * v
    OPS_ABLATE = 1,          // h -= (h . u) u              (u unit)
    OPS_CLAMP = 2,           // h += (c - h . u) u          (projection on u set to c)
    OPS_ADD_NORMALIZED = 3,  // h += c * v, then rescaled to its original norm
    OPS_KIND_COUNT = 4,
};

// Applies `kind` to rows[i] of `data` (row stride `row_stride` floats) with the vector at
// `vectors + vector_offsets[i]`, for i < n_rows.
void ops_cpu_apply(int32_t kind, float * data, int64_t row_stride, const int32_t * rows, int64_t n_rows,
                   const float * vectors, const int64_t * vector_offsets, float coeff, int64_t n_embd);

#ifdef GGSTEER_CUDA
// Same contract on device memory; every pointer is a device pointer. Runs on `stream`.
void ops_cuda_apply(int32_t kind, float * data, int64_t row_stride, const int32_t * rows, int64_t n_rows,
                    const float * vectors, const int64_t * vector_offsets, float coeff, int64_t n_embd,
                    void * stream);
// Whether ops_cuda_apply can launch on `device`: a driver this runtime works with, and code in
// the binary (SASS, or PTX the driver can compile) for the device's architecture.
bool ops_cuda_kernel_loads(int device);
// Host-array entry points for tests.
#include <string>
bool ops_cuda_roundtrip(int32_t kind, float * data, int64_t n_rows, const float * vectors, float coeff, int64_t n_embd,
                        std::string & error);
bool ops_cuda_device_available();
#endif
