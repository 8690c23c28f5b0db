// RoPE (rotate-half) for the C kernels: shared by the fused decode layer
// (paged_decode.c) and the in-place rotation of prompt rows (rotary.c).
#pragma once

#include <stdint.h>

#include "bf16.h"

// RoPE (rotate-half) of one head x [D] with this token's cos/sin [D] (the
// sine's sign folded in for the first half), as the PyTorch path computes
// x * cos + swap(x) * sin: each product and the sum rounded to the dtype, and
// no fused multiply-add, so the result is that path's bit for bit.
// Two loops (first half pairs with the second and back) so that each vectorises.
__attribute__((optimize("fp-contract=off"))) static inline void rotate(int dtype, const void* x,
                                                                        int64_t xi, const void* cos,
                                                                        const void* sin, int64_t ci,
                                                                        int64_t d, float* out) {
    const int64_t half = d / 2;
    for (int64_t lo = 0; lo < d; lo += half) {
        const int64_t other = lo ? -half : half;  // the partner of element i is i + other
        if (dtype) {
            const uint16_t* xs = (const uint16_t*)x + xi;
            const uint16_t* cs = (const uint16_t*)cos + ci;
            const uint16_t* ss = (const uint16_t*)sin + ci;
            for (int64_t i = lo; i < lo + half; i++) {
                const float a = round_bf16(bf16_to_f32(xs[i]) * bf16_to_f32(cs[i]));
                const float b = round_bf16(bf16_to_f32(xs[i + other]) * bf16_to_f32(ss[i]));
                out[i] = round_bf16(a + b);
            }
        } else {
            const float* xs = (const float*)x + xi;
            const float* cs = (const float*)cos + ci;
            const float* ss = (const float*)sin + ci;
            for (int64_t i = lo; i < lo + half; i++) {
                const float a = xs[i] * cs[i], b = xs[i + other] * ss[i];
                out[i] = a + b;
            }
        }
    }
}
