// bfloat16 <-> float32 for the engine's C kernels (bfloat16 is the top half
// of a float32; rounding to it is to nearest even, as PyTorch rounds), and
// reading/writing tensors of either dtype: `dtype` 0 is float32, 1 bfloat16
// (native.DTYPE_CODES).
#pragma once

#include <stdint.h>
#include <string.h>

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);  // NaN stays NaN
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

static inline float round_bf16(float f) { return bf16_to_f32(f32_to_bf16(f)); }

static inline float load_f32(int dtype, const void* base, int64_t i) {
    return dtype ? bf16_to_f32(((const uint16_t*)base)[i]) : ((const float*)base)[i];
}

static inline void store_f32(int dtype, void* base, int64_t i, float v) {
    if (dtype)
        ((uint16_t*)base)[i] = f32_to_bf16(v);
    else
        ((float*)base)[i] = v;
}

// Elements [i, i + n) of `base` as float32 into `dst`.
static inline void load_row(int dtype, const void* base, int64_t i, int64_t n, float* dst) {
    if (dtype) {
        const uint16_t* src = (const uint16_t*)base + i;
#pragma omp simd
        for (int64_t x = 0; x < n; x++) dst[x] = bf16_to_f32(src[x]);
    } else {
        memcpy(dst, (const float*)base + i, sizeof(float) * (size_t)n);
    }
}

// `src` [n] into elements [i, i + n) of `base`, rounded to its dtype.
static inline void store_row(int dtype, void* base, int64_t i, int64_t n, const float* src) {
    if (dtype) {
        uint16_t* dst = (uint16_t*)base + i;
        for (int64_t x = 0; x < n; x++) dst[x] = f32_to_bf16(src[x]);
    } else {
        memcpy((float*)base + i, src, sizeof(float) * (size_t)n);
    }
}
