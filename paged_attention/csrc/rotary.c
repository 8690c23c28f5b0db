// RoPE applied in place to the query and key heads of a prompt chunk: one
// call instead of the PyTorch path's four operators (cat, two products, a
// sum) over [tokens, heads, D], each a pass over memory. Bit for bit that
// path's result (rotary.h).

#include <stdint.h>
#include <stdlib.h>

#include "bf16.h"
#include "parallel.h"
#include "rotary.h"

// x: `t` rows of `h` heads of `d` elements, rows `row_stride` elements apart
// (the q and k columns of the fused qkv output); cos, sin [t, d] in x's dtype.
// Returns 0, or -1 when a scratch row could not be allocated.
int rotary_inplace(int dtype, void* x, int64_t row_stride, const void* cos, const void* sin,
                   int64_t t, int64_t h, int64_t d, int num_threads) {
    int failed = 0;
#pragma omp parallel num_threads(num_threads) if (t * h * d >= PARALLEL_MIN_ELEMENTS) reduction(| : failed)
    {
        float* row = malloc(sizeof(float) * (size_t)d);
#pragma omp for schedule(static)
        for (int64_t r = 0; r < t; r++) {
            if (!row) {
                failed = 1;
                continue;
            }
            for (int64_t head = 0; head < h; head++) {
                const int64_t xi = r * row_stride + head * d;
                rotate(dtype, x, xi, cos, sin, r * d, d, row);
                store_row(dtype, x, xi, d, row);
            }
        }
        free(row);
    }
    return failed ? -1 : 0;
}
