// A quantized matrix-vector product for a few activation rows (decode at
// small batches): y [M, N] = x [M, K] W^T with W int8 in groups of 32 (a
// GGUF Q8_0 LM head), read in the layout the engine keeps for PyTorch's int8
// kernel, in one pass. PyTorch's kernel has to run once per 32-column group
// (18 calls for SmolLM2's 49152 x 576 head, 5.0-5.3 ms at one row on one
// core against 3.4 here). The int4 counterpart is int4_gemv.c.
//
// x and y are float32 (dtype 0) or bfloat16 (dtype 1); sums are float32.
// Built with the decode attention kernel (see paged_attention/native.py).

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "bf16.h"

#define MAX_ROWS 8    // activation rows per call (more: the caller calls again)
#define PLANE_AHEAD 2048  // bytes ahead of the reads in each group plane to prefetch

// x as float32 [m, k] in a fresh buffer (NULL if allocation fails).
static float* widen(int dtype, const void* x, int64_t m, int64_t k) {
    float* xf = malloc(sizeof(float) * (size_t)(m * k));
    if (xf) load_row(dtype, x, 0, m * k, xf);
    return xf;
}

// int8 in groups of 32 (GGUF Q8_0): values [G, N, 32] int8, scales [N, G]
// float32: W[n, 32 g + j] = values[g, n, j] * scales[n, g]. Each thread takes
// a range of output rows and walks the G group planes for each.
int int8g_gemv(int x_dtype, const void* x, const int8_t* values, const float* scales, int y_dtype,
               void* y, int64_t m, int64_t n, int64_t k, int num_threads) {
    if (m > MAX_ROWS || k % 32) return -2;
    float* xf = widen(x_dtype, x, m, k);
    if (!xf) return -1;
    const int64_t groups = k / 32;
#pragma omp parallel for num_threads(num_threads) schedule(static)
    for (int64_t row = 0; row < n; row++) {
        float acc[MAX_ROWS][32];
        for (int64_t r = 0; r < m; r++)
            for (int64_t j = 0; j < 32; j++) acc[r][j] = 0.f;
        for (int64_t g = 0; g < groups; g++) {
            const int8_t* v = values + (g * n + row) * 32;
            // Each group plane is its own stream: more than the hardware prefetcher follows.
            if (!(row & 1)) __builtin_prefetch(v + PLANE_AHEAD, 0, 3);
            const float s = scales[row * groups + g];
            float w[32];
#pragma omp simd
            for (int64_t j = 0; j < 32; j++) w[j] = (float)v[j] * s;
            for (int64_t r = 0; r < m; r++) {
                const float* xg = xf + r * k + g * 32;
#pragma omp simd
                for (int64_t j = 0; j < 32; j++) acc[r][j] += w[j] * xg[j];
            }
        }
        for (int64_t r = 0; r < m; r++) {
            float s = 0.f;
#pragma omp simd reduction(+ : s)
            for (int64_t j = 0; j < 32; j++) s += acc[r][j];
            store_f32(y_dtype, y, r * n + row, s);
        }
    }
    free(xf);
    return 0;
}
