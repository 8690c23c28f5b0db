// The exported kernels that other kernels call (one library, see native.py).
#pragma once

#include <stdint.h>

int add_rms_norm(int dtype, void* x, const void* r, const void* w, void* y, int64_t m, int64_t d,
                 float eps, int num_threads);
int swiglu(int dtype, const void* gate_up, int64_t ld, void* out, int64_t m, int64_t n, int num_threads);
int paged_decode_layer(int dtype, int kv_dtype, const void* qkv, const void* cos, const void* sin, void* k_pool,
                       void* v_pool, const int64_t* slots, const int64_t* tables, int64_t table_width,
                       const int64_t* ctx_lens, void* out, int64_t batch, int64_t hq, int64_t hkv,
                       int64_t bs, int64_t d, float scale, int num_threads);
int int4_tile_gemv(int x_dtype, const void* x, const uint8_t* packed, int64_t tile, int scale_dtype,
                   const void* params, int y_dtype, void* y, int64_t m, int64_t n, int64_t k,
                   int64_t group, int num_threads);
