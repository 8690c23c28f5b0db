// A decode step through every decoder layer in one call, for a few sequences
// over int4 weights (a GGUF's Q4 model on the CPU): per layer, add + RMSNorm,
// the q|k|v projection, RoPE + KV write + attention, the o projection, add +
// RMSNorm, gate|up, SwiGLU, down. The same kernels the Python layers call, in
// the same order, with the same roundings: the tokens are those of the
// layer-by-layer path. What it saves is Python: about 300 operator and ctypes
// calls per token, a third of a one-user step on two threads.
//
// `layers` is [num_layers, LAYER_FIELDS] int64: pointers, and each
// projection's scale dtype (int4_gemv.c), in the order of the enum below
// (paged_attention/model/decode_stack.py writes it). Biases may be NULL.

#include <stdint.h>
#include <stdlib.h>

#include "bf16.h"
#include "kernels.h"

enum {
    IN_NORM,
    POST_NORM,
    K_POOL,
    V_POOL,
    QKV,  // each projection: packed values, params, bias, scale dtype
    O = QKV + 4,
    GATE_UP = O + 4,
    DOWN = GATE_UP + 4,
    LAYER_FIELDS = DOWN + 4,
};

#define ROWS_PER_CALL 8  // int4_tile_gemv's limit

// The row width the caller must write (checked when the stack is built).
int decode_stack_layer_fields(void) { return LAYER_FIELDS; }

// y [m, n] = x [m, k] W^T (+ bias, added after y is rounded, as PyTorch adds it).
static int project(int dtype, const int64_t* f, const void* x, void* y, int64_t m, int64_t n,
                   int64_t k, int64_t tile, int64_t group, int threads) {
    const int64_t size = dtype ? 2 : 4;
    for (int64_t r = 0; r < m; r += ROWS_PER_CALL) {
        const int64_t rows = m - r < ROWS_PER_CALL ? m - r : ROWS_PER_CALL;
        const int status = int4_tile_gemv(dtype, (const char*)x + r * k * size, (const uint8_t*)f[0], tile,
                                          (int)f[3], (const void*)f[1], dtype, (char*)y + r * n * size,
                                          rows, n, k, group, threads);
        if (status) return status;
    }
    const void* bias = (const void*)f[2];
    if (bias)
        for (int64_t i = 0; i < m * n; i++)
            store_f32(dtype, y, i, load_f32(dtype, y, i) + load_f32(dtype, bias, i % n));
    return 0;
}

int decode_stack(int dtype, int kv_dtype, void* x, const int64_t* layers, int64_t num_layers, const void* cos,
                 const void* sin, const int64_t* slots, const int64_t* tables, int64_t table_width,
                 const int64_t* ctx_lens, void* pending, int64_t batch, int64_t hidden, int64_t hq,
                 int64_t hkv, int64_t head_dim, int64_t inter, int64_t block_size, int64_t tile,
                 int64_t group, float eps, float scale, int threads) {
    const int64_t size = dtype ? 2 : 4, q = hq * head_dim, qkv_n = (hq + 2 * hkv) * head_dim;
    char* buf = malloc((size_t)(batch * size * (hidden + qkv_n + q + hidden + 2 * inter + inter)));
    if (!buf) return -1;
    char* h = buf;                            // normed residual [batch, hidden]
    char* qkv = h + batch * hidden * size;    // [batch, qkv_n]
    char* attn = qkv + batch * qkv_n * size;  // [batch, q]
    char* o = attn + batch * q * size;        // [batch, hidden]
    char* gu = o + batch * hidden * size;     // [batch, 2 inter]
    char* act = gu + batch * 2 * inter * size;
    int status = 0;
    for (int64_t l = 0; l < num_layers && !status; l++) {
        const int64_t* f = layers + l * LAYER_FIELDS;
        // The previous layer's MLP output is added to x by this norm (none before the first).
        status = add_rms_norm(dtype, x, l ? pending : NULL, (const void*)f[IN_NORM], h, batch, hidden,
                              eps, threads);
        if (!status) status = project(dtype, f + QKV, h, qkv, batch, qkv_n, hidden, tile, group, threads);
        if (!status)
            status = paged_decode_layer(dtype, kv_dtype, qkv, cos, sin, (void*)f[K_POOL], (void*)f[V_POOL], slots,
                                        tables, table_width, ctx_lens, attn, batch, hq, hkv, block_size,
                                        head_dim, scale, threads);
        if (!status) status = project(dtype, f + O, attn, o, batch, hidden, q, tile, group, threads);
        if (!status)
            status = add_rms_norm(dtype, x, o, (const void*)f[POST_NORM], h, batch, hidden, eps, threads);
        if (!status)
            status = project(dtype, f + GATE_UP, h, gu, batch, 2 * inter, hidden, tile, group, threads);
        if (!status) status = swiglu(dtype, gu, 2 * inter, act, batch, inter, threads);
        if (!status) status = project(dtype, f + DOWN, act, pending, batch, hidden, inter, tile, group, threads);
    }
    free(buf);
    return status;
}
