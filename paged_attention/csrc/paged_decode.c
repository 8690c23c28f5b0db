// Paged decode attention on the CPU: one query token per sequence, read
// straight from the block pool (no gathered copy of K or V), one pass.
//
// Built at first use by attention/cpu_kernel.py (gcc -O3 -march=native
// -fopenmp) and called through ctypes. Its OpenMP runtime is the one PyTorch
// already loaded (same soname), so both share one thread pool.
//
// Layouts (all contiguous):
//   q, out       [T, Hq, D]            rows q_rows[b] belong to sequence b
//   k_pool, v    [N, Hkv, BS, D]
//   tables       [B, W] int64          block ids of each sequence
//   ctx_lens     [B] int64             tokens in each context (incl. the new one)
// dtype 0: float32, 1: bfloat16. bfloat16 rounds where the PyTorch path
// rounds (scores and probabilities to bfloat16), accumulating in float32.

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "bf16.h"

// exp(x) for x <= 0 (softmax after subtracting the max), in a form the
// compiler vectorises (libm's expf is a scalar call per score unless
// -ffast-math, which would also drop the infinity semantics used here).
// Cody-Waite reduction x = n ln2 + r, |r| <= ln2 / 2, then a degree-7
// Taylor polynomial: relative error ~1e-7, about one float ulp.
static inline float exp_nonpositive(float x) {
    x = x < -87.0f ? -87.0f : x;  // below this exp underflows float; 2^n stays normal
    const float n = __builtin_rintf(x * 1.44269504089f);
    const float r = (x - n * 0.693145751953125f) - n * 1.428606765330187e-06f;
    float p = 1.f / 5040.f;
    p = p * r + 1.f / 720.f;
    p = p * r + 1.f / 120.f;
    p = p * r + 1.f / 24.f;
    p = p * r + 1.f / 6.f;
    p = p * r + 0.5f;
    p = p * r + 1.f;
    p = p * r + 1.f;
    const uint32_t bits = (uint32_t)((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

// Writes the float32 copy of row `i` of `base` (d values) into `dst`.
static inline void load_row(int dtype, const void* base, int64_t i, int64_t d, float* dst) {
    if (dtype) {
        const uint16_t* src = (const uint16_t*)base + i;
#pragma omp simd
        for (int64_t x = 0; x < d; x++) dst[x] = bf16_to_f32(src[x]);
    } else {
        memcpy(dst, (const float*)base + i, sizeof(float) * (size_t)d);
    }
}

// One (sequence, KV head): its `group` query heads over `ctx` tokens, walked
// block by block (no division per token). Each (block, head) piece of K or V
// is first converted to float32 in one pass into `piece` (a long run of
// independent loads keeps many cache misses in flight: 2x faster than
// converting a row at a time between dot products), then used by every query
// head of the group.
static void attend(int dtype, const void* q, const void* k_pool, const void* v_pool,
                   const int64_t* table, int64_t ctx, int64_t q_row, void* out, int64_t kvh,
                   int64_t hq, int64_t hkv, int64_t bs, int64_t d, float scale, float* scores,
                   float* qf, float* acc, float* piece) {
    const int64_t group = hq / hkv;
    const int64_t head0 = kvh * group;
    load_row(dtype, q, (q_row * hq + head0) * d, group * d, qf);

    for (int64_t start = 0, blk = 0; start < ctx; start += bs, blk++) {
        const int64_t base = (table[blk] * hkv + kvh) * bs * d;
        const int64_t n = ctx - start < bs ? ctx - start : bs;
        load_row(dtype, k_pool, base, n * d, piece);
        for (int64_t t = 0; t < n; t++) {
            const float* row = piece + t * d;
            for (int64_t j = 0; j < group; j++) {
                const float* qj = qf + j * d;
                float s = 0.f;
#pragma omp simd reduction(+ : s)
                for (int64_t x = 0; x < d; x++) s += qj[x] * row[x];
                // bfloat16: a bfloat16 matmul's output is rounded.
                scores[j * ctx + start + t] = (dtype ? round_bf16(s) : s) * scale;
            }
        }
    }

    for (int64_t j = 0; j < group; j++) {
        float* sj = scores + j * ctx;
        float m = -INFINITY;
        for (int64_t t = 0; t < ctx; t++) m = sj[t] > m ? sj[t] : m;
        float sum = 0.f;
#pragma omp simd reduction(+ : sum)
        for (int64_t t = 0; t < ctx; t++) {
            sj[t] = exp_nonpositive(sj[t] - m);
            sum += sj[t];
        }
        const float inv = 1.f / sum;
        if (dtype) {
            for (int64_t t = 0; t < ctx; t++) sj[t] = round_bf16(sj[t] * inv);
        } else {
#pragma omp simd
            for (int64_t t = 0; t < ctx; t++) sj[t] *= inv;
        }
    }

    memset(acc, 0, sizeof(float) * (size_t)(group * d));
    for (int64_t start = 0, blk = 0; start < ctx; start += bs, blk++) {
        const int64_t base = (table[blk] * hkv + kvh) * bs * d;
        const int64_t n = ctx - start < bs ? ctx - start : bs;
        load_row(dtype, v_pool, base, n * d, piece);
        for (int64_t t = 0; t < n; t++) {
            const float* row = piece + t * d;
            for (int64_t j = 0; j < group; j++) {
                const float p = scores[j * ctx + start + t];
                float* aj = acc + j * d;
#pragma omp simd
                for (int64_t x = 0; x < d; x++) aj[x] += p * row[x];
            }
        }
    }
    const int64_t ooff = (q_row * hq + head0) * d;
    for (int64_t i = 0; i < group * d; i++) {
        if (dtype)
            ((uint16_t*)out)[ooff + i] = f32_to_bf16(acc[i]);
        else
            ((float*)out)[ooff + i] = acc[i];
    }
}

// Returns 0, or -1 when a scratch buffer could not be allocated.
int paged_decode_attention(int dtype, const void* q, const void* k_pool, const void* v_pool,
                           const int64_t* tables, int64_t table_width, const int64_t* ctx_lens,
                           const int64_t* q_rows, void* out, int64_t batch, int64_t hq,
                           int64_t hkv, int64_t bs, int64_t d, float scale, int num_threads) {
    int64_t max_ctx = 0;
    for (int64_t b = 0; b < batch; b++) max_ctx = ctx_lens[b] > max_ctx ? ctx_lens[b] : max_ctx;
    const int64_t group = hq / hkv;
    int failed = 0;
#pragma omp parallel num_threads(num_threads) reduction(| : failed)
    {
        // Per thread: one task's queries, sums, scores and a converted piece.
        float* scratch = malloc(sizeof(float) * (size_t)(group * (2 * d + max_ctx) + bs * d));
#pragma omp for schedule(dynamic, 1) collapse(2)
        for (int64_t b = 0; b < batch; b++)
            for (int64_t h = 0; h < hkv; h++) {
                if (!scratch) {  // every thread still takes part in the loop
                    failed = 1;
                    continue;
                }
                attend(dtype, q, k_pool, v_pool, tables + b * table_width, ctx_lens[b], q_rows[b], out,
                       h, hq, hkv, bs, d, scale, scratch + group * 2 * d, scratch, scratch + group * d,
                       scratch + group * (2 * d + max_ctx));
            }
        free(scratch);
    }
    return failed ? -1 : 0;
}
