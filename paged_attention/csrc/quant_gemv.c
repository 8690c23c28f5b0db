// A quantized matrix-vector product for a few activation rows (decode at
// small batches): y [M, N] = x [M, K] W^T with W int8 in groups of 32 (a
// GGUF Q8_0 LM head), read in the layout the engine keeps for PyTorch's int8
// kernel, in one pass. PyTorch's kernel has to run once per 32-column group
// (18 calls for SmolLM2's 49152 x 576 head, 5.0-5.3 ms at one row on one
// core against 1.8 here). The int4 counterpart is int4_gemv.c.
//
// x and y are float32 (dtype 0) or bfloat16 (dtype 1); sums are float32.
// Built with the decode attention kernel (see paged_attention/native.py).

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#include "bf16.h"

#define MAX_ROWS 8    // activation rows per call (more: the caller calls again)
#define ROW_BLOCK 16  // output rows a thread takes at once

// x as float32 [m, k] in a fresh buffer (NULL if allocation fails).
static float* widen(int dtype, const void* x, int64_t m, int64_t k) {
    float* xf = malloc(sizeof(float) * (size_t)(m * k));
    if (xf) load_row(dtype, x, 0, m * k, xf);
    return xf;
}

// Vectors of LANES float32: AVX-512, AVX2, or plain floats elsewhere.
#if defined(__AVX512F__)
#define LANES 16
typedef __m512 vf;
static inline vf vzero(void) { return _mm512_setzero_ps(); }
static inline vf vset1(float a) { return _mm512_set1_ps(a); }
static inline vf vmul(vf a, vf b) { return _mm512_mul_ps(a, b); }
static inline vf vfma(vf a, vf b, vf c) { return _mm512_fmadd_ps(a, b, c); }
static inline vf vload(const float* p) { return _mm512_loadu_ps(p); }
static inline vf vload_i8(const int8_t* p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)p)));
}
static inline float vsum(vf a) { return _mm512_reduce_add_ps(a); }
#elif defined(__AVX2__)
#define LANES 8
typedef __m256 vf;
static inline vf vzero(void) { return _mm256_setzero_ps(); }
static inline vf vset1(float a) { return _mm256_set1_ps(a); }
static inline vf vmul(vf a, vf b) { return _mm256_mul_ps(a, b); }
static inline vf vfma(vf a, vf b, vf c) { return _mm256_fmadd_ps(a, b, c); }
static inline vf vload(const float* p) { return _mm256_loadu_ps(p); }
static inline vf vload_i8(const int8_t* p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)p)));
}
static inline float vsum(vf a) {
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    return _mm_cvtss_f32(_mm_add_ss(h, _mm_movehdup_ps(h)));
}
#else
#define LANES 1
typedef float vf;
static inline vf vzero(void) { return 0.f; }
static inline vf vset1(float a) { return a; }
static inline vf vmul(vf a, vf b) { return a * b; }
static inline vf vfma(vf a, vf b, vf c) { return a * b + c; }
static inline vf vload(const float* p) { return *p; }
static inline vf vload_i8(const int8_t* p) { return (float)*p; }
static inline float vsum(vf a) { return a; }
#endif
#define CHUNKS (32 / LANES)  // vectors per group of 32

// int8 in groups of 32 (GGUF Q8_0): values [G, N, 32] int8, scales [N, G]
// float32: W[n, 32 g + j] = values[g, n, j] * scales[n, g]. Each thread takes
// blocks of ROW_BLOCK output rows and walks the G group planes for each, so
// it reads every plane ROW_BLOCK * 32 contiguous bytes at a time (a row at a
// time, 32 bytes from each of G planes, took SmolLM2's head 3.2 ms at one
// activation row on one core, against 1.8 here; the hardware prefetcher follows
// G planes read this way, and software prefetches did not help). Each (activation row,
// output row) keeps LANES partial sums, added up at the end.
int int8g_gemv(int x_dtype, const void* x, const int8_t* values, const float* scales, int y_dtype,
               void* y, int64_t m, int64_t n, int64_t k, int num_threads) {
    if (m > MAX_ROWS || k % 32) return -2;
    float* xf = widen(x_dtype, x, m, k);
    if (!xf) return -1;
    const int64_t groups = k / 32;
    const int64_t blocks = (n + ROW_BLOCK - 1) / ROW_BLOCK;
#pragma omp parallel for num_threads(num_threads) schedule(static)
    for (int64_t b = 0; b < blocks; b++) {
        const int64_t row0 = b * ROW_BLOCK;
        const int64_t rows = n - row0 < ROW_BLOCK ? n - row0 : ROW_BLOCK;
        vf acc[MAX_ROWS][ROW_BLOCK];
        for (int64_t r = 0; r < m; r++)
            for (int64_t rr = 0; rr < ROW_BLOCK; rr++) acc[r][rr] = vzero();
        for (int64_t g = 0; g < groups; g++) {
            const int8_t* plane = values + (g * n + row0) * 32;
            vf xs[MAX_ROWS][CHUNKS];
            for (int64_t r = 0; r < m; r++)
                for (int c = 0; c < CHUNKS; c++) xs[r][c] = vload(xf + r * k + g * 32 + c * LANES);
            for (int64_t rr = 0; rr < rows; rr++) {
                const int8_t* v = plane + rr * 32;
                const vf s = vset1(scales[(row0 + rr) * groups + g]);
                for (int c = 0; c < CHUNKS; c++) {
                    const vf w = vmul(vload_i8(v + c * LANES), s);
                    for (int64_t r = 0; r < m; r++) acc[r][rr] = vfma(w, xs[r][c], acc[r][rr]);
                }
            }
        }
        for (int64_t r = 0; r < m; r++)
            for (int64_t rr = 0; rr < rows; rr++) store_f32(y_dtype, y, r * n + row0 + rr, vsum(acc[r][rr]));
    }
    free(xf);
    return 0;
}
