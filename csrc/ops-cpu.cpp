#include <cmath>

#include "ops.h"

static double row_dot(const float * a, const float * b, int64_t n) {
    // double accumulation: residual entries reach 1e4 and rows are long
    double sum = 0.0;
    for (int64_t k = 0; k < n; ++k) {
        sum += (double) a[k] * (double) b[k];
    }
    return sum;
}

static void row_axpy(float * h, const float * v, double scale, int64_t n) {
    for (int64_t k = 0; k < n; ++k) {
        h[k] = (float) ((double) h[k] + scale * (double) v[k]);
    }
}

// Plain addition rounds exactly like llama.cpp's control-vector adapter, which adds the float
// product coeff * v to the row (ggml_add): steering through the hook or the adapter gives the
// same bits. (The build turns off FMA contraction, which would round once instead of twice.)
static void row_add(float * h, const float * v, float coeff, int64_t n) {
    for (int64_t k = 0; k < n; ++k) {
        const float product = coeff * v[k];
        h[k] = h[k] + product;
    }
}

static void row_apply(int32_t kind, float * h, const float * v, float coeff, int64_t n) {
    switch (kind) {
        case OPS_ADD:
            row_add(h, v, coeff, n);
            break;
        case OPS_ABLATE:
            row_axpy(h, v, -row_dot(h, v, n), n);
            break;
        case OPS_CLAMP:
            row_axpy(h, v, (double) coeff - row_dot(h, v, n), n);
            break;
        case OPS_ADD_NORMALIZED: {
            const double before = std::sqrt(row_dot(h, h, n));
            row_axpy(h, v, coeff, n);
            const double after = std::sqrt(row_dot(h, h, n));
            if (after > 0.0) {
                const double scale = before / after;
                for (int64_t k = 0; k < n; ++k) {
                    h[k] = (float) ((double) h[k] * scale);
                }
            }
            break;
        }
        default:
            break;
    }
}

void ops_cpu_apply(int32_t kind, float * data, int64_t row_stride, const int32_t * rows, int64_t n_rows,
                   const float * vectors, const int64_t * vector_offsets, float coeff, int64_t n_embd) {
    for (int64_t i = 0; i < n_rows; ++i) {
        row_apply(kind, data + rows[i] * row_stride, vectors + vector_offsets[i], coeff, n_embd);
    }
}
