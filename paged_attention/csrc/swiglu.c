// SwiGLU's gate: out = silu(gate) * up, from the fused gate/up projection's
// output, in one pass (PyTorch's path is two operators, and silu over the
// strided gate half was as slow as a copy plus a contiguous silu).
//
// bfloat16 rounds as that path does: silu rounded to bfloat16, then the
// product rounded. exp is a polynomial good to ~1 ulp in float32 (PyTorch
// uses SLEEF's, also ~1 ulp), so a value can differ in its last bit.

#include <math.h>
#include <stdint.h>

#include "bf16.h"

// e^x for x in [-87, 88] (e^-87 below, inf above), vectorisable: 2^n * p(r) with
// r = x - n ln2, |r| <= ln2 / 2, p a degree-7 Taylor polynomial.
static inline float exp_approx(float x) {
    const int big = x > 88.72f;  // e^x overflows: inf, as expf gives (silu(-x) is then -0)
    x = x < -87.f ? -87.f : x > 88.f ? 88.f : x;  // vectorises where fminf/fmaxf do not
    // Round to nearest by adding and subtracting 1.5 * 2^23 (rintf and floorf
    // keep the loop from vectorising).
    const float n = (x * 1.44269504088896341f + 12582912.f) - 12582912.f;
    const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
    float p = 1.f / 5040;
    p = p * r + 1.f / 720;
    p = p * r + 1.f / 120;
    p = p * r + 1.f / 24;
    p = p * r + 1.f / 6;
    p = p * r + 0.5f;
    p = p * r + 1.f;
    p = p * r + 1.f;
    const int32_t bits = ((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return big ? INFINITY : p * scale;
}

// gate_up: m rows, row i's gate at [i * ld, i * ld + n) and up right after
// it; out [m, n]. dtype 0 float32, 1 bfloat16 (both tensors). Returns 0.
int swiglu(int dtype, const void* gate_up, int64_t ld, void* out, int64_t m, int64_t n,
           int num_threads) {
#pragma omp parallel for num_threads(num_threads) if (m * n >= 32768) schedule(static)
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
