// e^x for the C kernels (softmax in paged_decode.c, silu in swiglu.c), in a
// form the compiler vectorises: libm's expf is a scalar call per element
// unless -ffast-math, which would also drop the infinities relied on here.
#pragma once

#include <math.h>
#include <stdint.h>
#include <string.h>

// Cody-Waite reduction x = n ln2 + r, |r| <= ln2 / 2, then a degree-7 Taylor
// polynomial: relative error ~1e-7, about one float ulp. Below -87 it gives
// e^-87 (2^n stays a normal float), above 88.72 infinity, as expf does.
static inline float exp_approx(float x) {
    const int big = x > 88.72f;
    x = x < -87.f ? -87.f : x > 88.f ? 88.f : x;  // vectorises where fminf/fmaxf do not
    // Round to nearest by adding and subtracting 1.5 * 2^23 (rintf and floorf
    // keep some loops from vectorising).
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
