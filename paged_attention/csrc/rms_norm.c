// Residual add and RMSNorm in one pass, for the decode step's small batches:
// x += r (in place), then y = rms_norm(x) * w. On the CPU the PyTorch path is
// five operators per norm (add, cast, rms_norm, cast, scale) of ~3-16 us
// each at one token; this is one call.
//
// x, r, y [M, D] and w [D] share a dtype: float32 (0) or bfloat16 (1).
// bfloat16 rounds as the PyTorch path does (and transformers): the sum is
// rounded, normalised in float32, rounded, then scaled and rounded; float32
// multiplies by the inverse norm, then by w. The mean of squares is summed in
// a different order from PyTorch's, so values can differ in the last bit.

#include <math.h>
#include <stdint.h>

#include "bf16.h"

// r may be NULL (no residual to add). Returns 0.
int add_rms_norm(int dtype, void* x, const void* r, const void* w, void* y, int64_t m, int64_t d,
                 float eps) {
    for (int64_t row = 0; row < m; row++) {
        const int64_t base = row * d;
        double ss = 0.0;  // double: the order of this sum then matters less
        for (int64_t i = 0; i < d; i++) {
            float v = load_f32(dtype, x, base + i);
            if (r) {
                v += load_f32(dtype, r, base + i);
                if (dtype) v = round_bf16(v);
                store_f32(dtype, x, base + i, v);
            }
            ss += (double)v * v;
        }
        const float inv = 1.f / sqrtf((float)(ss / (double)d) + eps);
        for (int64_t i = 0; i < d; i++) {
            float h = load_f32(dtype, x, base + i) * inv;
            if (dtype) h = round_bf16(h);
            store_f32(dtype, y, base + i, h * load_f32(dtype, w, i));
        }
    }
    return 0;
}
