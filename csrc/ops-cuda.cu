// CUDA version of ops-cpu.cpp: one thread block per row, a shared-memory reduction for dots.
#include <cuda_runtime.h>

#include "ops.h"

#define OPS_CUDA_BLOCK 256

static __device__ double block_dot(const float * a, const float * b, int64_t n, double * scratch) {
    double sum = 0.0;
    for (int64_t k = threadIdx.x; k < n; k += blockDim.x) {
        sum += (double) a[k] * (double) b[k];
    }
    scratch[threadIdx.x] = sum;
    __syncthreads();
    for (int stride = blockDim.x / 2; stride > 0; stride /= 2) {
        if (threadIdx.x < stride) {
            scratch[threadIdx.x] += scratch[threadIdx.x + stride];
        }
        __syncthreads();
    }
    const double total = scratch[0];
    __syncthreads();
    return total;
}

static __device__ void block_axpy(float * h, const float * v, double scale, int64_t n) {
    for (int64_t k = threadIdx.x; k < n; k += blockDim.x) {
        h[k] = (float) ((double) h[k] + scale * (double) v[k]);
    }
    __syncthreads();
}

// Plain addition rounds like llama.cpp's adapter (a float product, then a float add): the
// _rn intrinsics are never fused into an FMA by nvcc.
static __device__ void block_add(float * h, const float * v, float coeff, int64_t n) {
    for (int64_t k = threadIdx.x; k < n; k += blockDim.x) {
        h[k] = __fadd_rn(h[k], __fmul_rn(coeff, v[k]));
    }
    __syncthreads();
}

static __global__ void ops_cuda_kernel(int32_t kind, float * data, int64_t row_stride, const int32_t * rows,
                                       const float * vectors, const int64_t * vector_offsets, float coeff,
                                       int64_t n_embd) {
    __shared__ double scratch[OPS_CUDA_BLOCK];
    float * h = data + rows[blockIdx.x] * row_stride;
    const float * v = vectors + vector_offsets[blockIdx.x];
    switch (kind) {
        case OPS_ADD:
            block_add(h, v, coeff, n_embd);
            break;
        case OPS_ABLATE:
            block_axpy(h, v, -block_dot(h, v, n_embd, scratch), n_embd);
            break;
        case OPS_CLAMP:
            block_axpy(h, v, (double) coeff - block_dot(h, v, n_embd, scratch), n_embd);
            break;
        case OPS_ADD_NORMALIZED: {
            const double before = sqrt(block_dot(h, h, n_embd, scratch));
            block_axpy(h, v, coeff, n_embd);
            const double after = sqrt(block_dot(h, h, n_embd, scratch));
            if (after > 0.0) {
                block_axpy(h, h, before / after - 1.0, n_embd);
            }
            break;
        }
        default:
            break;
    }
}

static void ops_cuda_launch(int32_t kind, float * data, int64_t row_stride, const int32_t * rows, int64_t n_rows,
                            const float * vectors, const int64_t * vector_offsets, float coeff, int64_t n_embd,
                            cudaStream_t stream) {
    ops_cuda_kernel<<<(unsigned) n_rows, OPS_CUDA_BLOCK, 0, stream>>>(kind, data, row_stride, rows, vectors,
                                                                      vector_offsets, coeff, n_embd);
}

void ops_cuda_apply(int32_t kind, float * data, int64_t row_stride, const int32_t * rows, int64_t n_rows,
                    const float * vectors, const int64_t * vector_offsets, float coeff, int64_t n_embd,
                    void * stream) {
    if (n_rows <= 0 || kind < 0 || kind >= OPS_KIND_COUNT) {
        return;
    }
    ops_cuda_launch(kind, data, row_stride, rows, n_rows, vectors, vector_offsets, coeff, n_embd,
                    (cudaStream_t) stream);
}

bool ops_cuda_kernel_loads(int device) {
    int count = 0;
    cudaFuncAttributes attributes;
    // loads the kernel's module: fails without an image this device can run
    const bool loads = cudaGetDeviceCount(&count) == cudaSuccess && device < count &&
                       cudaSetDevice(device) == cudaSuccess &&
                       cudaFuncGetAttributes(&attributes, ops_cuda_kernel) == cudaSuccess &&
                       attributes.maxThreadsPerBlock >= OPS_CUDA_BLOCK;
    cudaGetLastError();  // clear a failed query, so it does not surface later
    return loads;
}
