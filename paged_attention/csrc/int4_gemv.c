// A 4-bit matrix-vector product for a few activation rows (decode at small
// batches): y [M, N] = x [M, K] W^T, W in groups along K, each value
// W[n, i] = q[n, i] * s[n, g] + m[n, g] (g = i / group) with q in 0..15.
// Sums and scales are float32, so the products are those of the float32
// dequantized model up to summation order: PyTorch's int4 kernel takes its
// scales in bfloat16 and its activations in bfloat16 (its float32 path is a
// scalar loop), which cost a GGUF's Q4_1 model 1.5-3 points of top-1
// agreement with its float32 dequantized self (bench quant-accuracy).
//
// Layout. The values: PyTorch's own packing for its CPU kernel
// (`_convert_weight_to_int4pack_for_cpu`), so one copy serves both kernels
// and the dense path: tiles of TILE rows (64 with AVX-512, 32 with AVX2),
// each k-major, byte d of a k holding rows d (low nibble) and d + TILE / 2
// (high). The scales and offsets: tile-major [N / TILE, G, 2, TILE], float32
// (scale_dtype 0) or float16 (2: a Q4_0/Q4_1 file's own fields, exact, and 4
// fewer bytes per 32 weights), so a tile reads two sequential streams (group-
// major [G, N] ones were G streams per tile, more than the prefetcher follows:
// measured up to 2x slower, varying run to run).
//
//   sum_i x_i (q_i s_g + m_g) = sum_g s_g (sum_{i in g} x_i q_i) + sum_g m_g X_g
//
// with X_g the group's sum of x, formed once per call. Each thread takes a
// range of tiles.

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#include "bf16.h"

#define INT4_MAX_ROWS 8  // activation rows per call (more: the caller calls again)
#define SCALE_F16 2

static inline float f16_to_f32(uint16_t h) {
#if defined(__F16C__)
    return _cvtsh_ss(h);
#else
    // Without F16C: rebuild the float32 bits (normal, subnormal, zero, inf/NaN).
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff, u;
    if (exp == 0x1f) {
        u = sign | 0x7f800000u | (man << 13);
    } else if (exp) {
        u = sign | ((exp + 112) << 23) | (man << 13);
    } else if (man) {
        int e = -1;
        do {
            man <<= 1;
            e++;
        } while (!(man & 0x400));
        u = sign | ((uint32_t)(112 - e) << 23) | ((man & 0x3ff) << 13);
    } else {
        u = sign;
    }
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
#endif
}

#if defined(__AVX512F__)
#define LANES 16
typedef __m512 vf;
static inline vf vzero(void) { return _mm512_setzero_ps(); }
static inline vf vset1(float a) { return _mm512_set1_ps(a); }
static inline vf vfma(vf a, vf b, vf c) { return _mm512_fmadd_ps(a, b, c); }
static inline vf vload(const float* p) { return _mm512_loadu_ps(p); }
static inline void vstore(float* p, vf a) { _mm512_storeu_ps(p, a); }
// 16 bytes -> the 16 low nibbles (lo) and 16 high nibbles (hi) as float32.
static inline void nibbles(const uint8_t* b, vf* lo, vf* hi) {
    const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)b));
    *lo = _mm512_cvtepi32_ps(_mm512_and_si512(v, _mm512_set1_epi32(15)));
    *hi = _mm512_cvtepi32_ps(_mm512_srli_epi32(v, 4));
}
static inline vf vload_f16(const uint16_t* p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)p));
}
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define LANES 8
typedef __m256 vf;
static inline vf vzero(void) { return _mm256_setzero_ps(); }
static inline vf vset1(float a) { return _mm256_set1_ps(a); }
static inline vf vfma(vf a, vf b, vf c) { return _mm256_fmadd_ps(a, b, c); }
static inline vf vload(const float* p) { return _mm256_loadu_ps(p); }
static inline void vstore(float* p, vf a) { _mm256_storeu_ps(p, a); }
static inline void nibbles(const uint8_t* b, vf* lo, vf* hi) {
    const __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)b));
    *lo = _mm256_cvtepi32_ps(_mm256_and_si256(v, _mm256_set1_epi32(15)));
    *hi = _mm256_cvtepi32_ps(_mm256_srli_epi32(v, 4));
}
static inline vf vload_f16(const uint16_t* p) {
    return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)p));
}
#else
// Portable: a "vector" of 8 floats the compiler may vectorise.
#define LANES 8
typedef struct {
    float v[LANES];
} vf;
static inline vf vzero(void) {
    vf z;
    memset(&z, 0, sizeof z);
    return z;
}
static inline vf vset1(float a) {
    vf z;
    for (int i = 0; i < LANES; i++) z.v[i] = a;
    return z;
}
static inline vf vfma(vf a, vf b, vf c) {
    for (int i = 0; i < LANES; i++) c.v[i] += a.v[i] * b.v[i];
    return c;
}
static inline vf vload(const float* p) {
    vf z;
    memcpy(z.v, p, sizeof z.v);
    return z;
}
static inline void vstore(float* p, vf a) { memcpy(p, a.v, sizeof a.v); }
static inline void nibbles(const uint8_t* b, vf* lo, vf* hi) {
    for (int i = 0; i < LANES; i++) {
        lo->v[i] = (float)(b[i] & 15);
        hi->v[i] = (float)(b[i] >> 4);
    }
}
static inline vf vload_f16(const uint16_t* p) {
    vf z;
    for (int i = 0; i < LANES; i++) z.v[i] = f16_to_f32(p[i]);
    return z;
}
#endif

#define TILE (4 * LANES)  // rows of W per tile: 4 vectors
#define ROW_BLOCK 4       // activation rows per pass over a group (accumulators in registers)
// Bytes ahead of the reads to prefetch: decode streams W from memory once per
// token, and the hardware prefetcher alone (which stops at 4 KiB pages) kept
// one core at 4.9 GB/s: SmolLM2's 120 int4 layers took 10.9 ms a token
// against 7.1 with this (one thread; 1-16 KiB ahead all gave 7.0-7.8).
#define PREFETCH_AHEAD 4096

// A macro: GCC 12 finds a function holding only a prefetch free of side
// effects and deletes its calls.
#define PREFETCH(p) __builtin_prefetch((const void*)(p), 0, 3)

// Four vectors of TILE float32 or float16 values.
static inline void load_tile(int scale_dtype, const void* p, int64_t at, vf* out) {
    for (int j = 0; j < 4; j++)
        out[j] = scale_dtype == SCALE_F16 ? vload_f16((const uint16_t*)p + at + j * LANES)
                                          : vload((const float*)p + at + j * LANES);
}

// One tile's rows against rows [r0, r0 + mb) of x, over one group's k range:
// acc[r][j] += s_j * sum_k x[r][k] q[k][j] + m_j * X[r][g].
static inline __attribute__((always_inline)) void tile_group(const uint8_t* tb, const float* xf,
                                                             const float* xsum, int64_t k0,
                                                             int64_t group, int64_t k, int64_t groups,
                                                             const vf* sc, const vf* off,
                                                             const int64_t mb, vf acc[][4]) {
    vf c[ROW_BLOCK][4];
    for (int64_t r = 0; r < mb; r++)
        for (int j = 0; j < 4; j++) c[r][j] = vzero();
    for (int64_t kk = k0; kk < k0 + group; kk++) {
        const uint8_t* b = tb + kk * (TILE / 2);
        if (!(kk & 1)) PREFETCH(b + PREFETCH_AHEAD);
        vf w[4];
        nibbles(b, &w[0], &w[2]);
        nibbles(b + LANES, &w[1], &w[3]);
        for (int64_t r = 0; r < mb; r++) {
            const vf xb = vset1(xf[r * k + kk]);
            for (int j = 0; j < 4; j++) c[r][j] = vfma(w[j], xb, c[r][j]);
        }
    }
    const int64_t g = k0 / group;
    for (int64_t r = 0; r < mb; r++) {
        const vf xs = vset1(xsum[r * groups + g]);
        for (int j = 0; j < 4; j++) acc[r][j] = vfma(off[j], xs, vfma(c[r][j], sc[j], acc[r][j]));
    }
}

// The tile width this build reads (the caller checks PyTorch's packing against it).
int int4_tile_width(void) { return TILE; }

// y [M, N] = x [M, K] W^T for W packed as above (N a multiple of TILE).
int int4_tile_gemv(int x_dtype, const void* x, const uint8_t* packed, int64_t tile, int scale_dtype,
                   const void* params, int y_dtype, void* y, int64_t m, int64_t n, int64_t k,
                   int64_t group, int num_threads) {
    if (tile != TILE) return -3;  // PyTorch packed for another tile width: use its kernel
    if (m < 1 || m > INT4_MAX_ROWS || n % TILE || group < 1 || k % group) return -2;
    const int64_t groups = k / group;
    float* xf = malloc(sizeof(float) * (size_t)(m * k + m * groups));
    if (!xf) return -1;
    float* xsum = xf + m * k;
    load_row(x_dtype, x, 0, m * k, xf);
    for (int64_t r = 0; r < m; r++)
        for (int64_t g = 0; g < groups; g++) {
            float s = 0.f;
            for (int64_t i = 0; i < group; i++) s += xf[r * k + g * group + i];
            xsum[r * groups + g] = s;
        }
#pragma omp parallel for num_threads(num_threads) schedule(static)
    for (int64_t t = 0; t < n / TILE; t++) {
        const uint8_t* tb = packed + t * TILE * (k / 2);
        vf acc[INT4_MAX_ROWS][4];
        for (int64_t r = 0; r < m; r++)
            for (int j = 0; j < 4; j++) acc[r][j] = vzero();
        for (int64_t g = 0; g < groups; g++) {
            vf sc[4], off[4];
            const int64_t at = (t * groups + g) * 2 * TILE;
            const int64_t width = scale_dtype == SCALE_F16 ? 2 : 4;
            for (int64_t b = 0; b < 2 * TILE * width; b += 64)
                PREFETCH((const char*)params + at * width + PREFETCH_AHEAD + b);
            load_tile(scale_dtype, params, at, sc);
            load_tile(scale_dtype, params, at + TILE, off);
            for (int64_t r0 = 0; r0 < m; r0 += ROW_BLOCK) {
                const int64_t mb = m - r0 < ROW_BLOCK ? m - r0 : ROW_BLOCK;
                const float* xr = xf + r0 * k;
                const float* xs = xsum + r0 * groups;
                switch (mb) {
#define ROWS(M) \
    case M: tile_group(tb, xr, xs, g * group, group, k, groups, sc, off, M, acc + r0); break;
                    ROWS(1) ROWS(2) ROWS(3) ROWS(4)
#undef ROWS
                }
            }
        }
        for (int64_t r = 0; r < m; r++) {
            float out[TILE];
            for (int j = 0; j < 4; j++) vstore(out + j * LANES, acc[r][j]);
            store_row(y_dtype, y, r * n + t * TILE, TILE, out);
        }
    }
    free(xf);
    return 0;
}
