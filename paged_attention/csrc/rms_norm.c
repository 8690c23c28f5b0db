// Residual add and RMSNorm in one pass: x += r (in place), then
// y = rms_norm(x) * w. On the CPU the PyTorch path is five to eight operators
// per norm (add, cast, rms_norm's own pow/mean/rsqrt/mul, cast, scale): at one
// token ~3-16 us of dispatch each, and at a prompt chunk's thousands of rows
// that many passes over memory. This is one call, rows split over threads.
//
// x, r, y [M, D] and w [D] share a dtype: float32 (0) or bfloat16 (1).
// bfloat16 rounds as the PyTorch path does (and transformers): the sum is
// rounded, normalised in float32, rounded, then scaled and rounded; float32
// multiplies by the inverse norm, then by w. The mean of squares is summed in
// a different order from PyTorch's, so values can differ in the last bit.

#include <math.h>
#include <stdint.h>

#include "bf16.h"
#include "parallel.h"

static void norm_row(int dtype, void* x, const void* r, const void* w, void* y, int64_t base,
                     int64_t d, float eps) {
    double ss = 0.0;  // double: the order of this sum then matters less
    if (r) {
#pragma omp simd reduction(+ : ss)
        for (int64_t i = 0; i < d; i++) {
            float v = load_f32(dtype, x, base + i) + load_f32(dtype, r, base + i);
            if (dtype) v = round_bf16(v);
            store_f32(dtype, x, base + i, v);
            ss += (double)v * v;
        }
    } else {
#pragma omp simd reduction(+ : ss)
        for (int64_t i = 0; i < d; i++) {
            const float v = load_f32(dtype, x, base + i);
            ss += (double)v * v;
        }
    }
    const float inv = 1.f / sqrtf((float)(ss / (double)d) + eps);
#pragma omp simd
    for (int64_t i = 0; i < d; i++) {
        float h = load_f32(dtype, x, base + i) * inv;
        if (dtype) h = round_bf16(h);
        store_f32(dtype, y, base + i, h * load_f32(dtype, w, i));
    }
}

// r may be NULL (no residual to add). Returns 0.
int add_rms_norm(int dtype, void* x, const void* r, const void* w, void* y, int64_t m, int64_t d,
                 float eps, int num_threads) {
#pragma omp parallel for num_threads(num_threads) if (m * d >= PARALLEL_MIN_ELEMENTS) schedule(static)
    for (int64_t row = 0; row < m; row++) norm_row(dtype, x, r, w, y, row * d, d, eps);
    return 0;
}
