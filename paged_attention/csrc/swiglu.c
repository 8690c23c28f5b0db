// SwiGLU's gate: out = silu(gate) * up, from the fused gate/up projection's
// output, in one pass (PyTorch's path is two operators, and silu over the
// strided gate half was as slow as a copy plus a contiguous silu).
//
// bfloat16 rounds as that path does: silu rounded to bfloat16, then the
// product rounded. exp is a polynomial good to ~1 ulp in float32 (fast_exp.h;
// PyTorch uses SLEEF's, also ~1 ulp), so a value can differ in its last bit.

#include <math.h>
#include <stdint.h>

#include "bf16.h"
#include "fast_exp.h"
#include "parallel.h"

// gate_up: m rows, row i's gate at [i * ld, i * ld + n) and up right after
// it; out [m, n]. dtype 0 float32, 1 bfloat16 (both tensors). Returns 0.
int swiglu(int dtype, const void* gate_up, int64_t ld, void* out, int64_t m, int64_t n,
           int num_threads) {
#pragma omp parallel for num_threads(num_threads) if (m * n >= PARALLEL_MIN_ELEMENTS) schedule(static)
    for (int64_t row = 0; row < m; row++) {
        const int64_t g = row * ld, o = row * n;
        if (dtype) {
            const uint16_t* src = (const uint16_t*)gate_up;
            uint16_t* dst = (uint16_t*)out;
#pragma omp simd
            for (int64_t i = 0; i < n; i++) {
                const float x = bf16_to_f32(src[g + i]);
                const float s = round_bf16(x / (1.f + exp_approx(-x)));
                dst[o + i] = f32_to_bf16(s * bf16_to_f32(src[g + n + i]));
            }
        } else {
            const float* src = (const float*)gate_up;
            float* dst = (float*)out;
#pragma omp simd
            for (int64_t i = 0; i < n; i++) {
                const float x = src[g + i];
                dst[o + i] = x / (1.f + exp_approx(-x)) * src[g + n + i];
            }
        }
    }
    return 0;
}
