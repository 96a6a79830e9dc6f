// The native kernel ABI shared by every per-type dot kernel (see docs/DEVELOPING.md and
// ktransformers/kernels/__init__.py).
//
// Rules for kernel files (dot_<type>.inc):
//  * They are #included INSIDE `namespace kt::avx2 { ... }` (kernels_avx2.cpp) and
//    `namespace kt::vnni { ... }` (kernels_vnni.cpp), so one source yields one function per ISA.
//    They must not #include system headers or iq_tables.h themselves: the ISA files include
//    <immintrin.h>, <algorithm>, <cstdint>, <cstring>, <cmath>, simd.h, dot.h and (when present) iq_tables.h
//    at global scope before opening the namespace.
//  * Each kernel is a `RowDot`: one weight row of raw GGUF blocks (n elements, n a multiple of
//    the type's block size) times one activation row quantized to Q8Row.
//  * Kernels register themselves in `RowDot table[kMaxGGMLType]` at the type's ggml id
//    (gguf.GGMLQuantizationType values). Low-bit kernels do it in register_lowbit(table).
#pragma once
#include <cstddef>
#include <cstdint>

#include "prefetch.h"  // kernels prefetch their rows with kt::prefetch, weight_prefetch_bytes() ahead

namespace kt {

// One activation row quantized to int8 in blocks of 32: x[i] ~= d[i/32] * q[i]; sum[b] = sum of
// q in block b, sum16[h] = sum of q in the 16-element half h (for the formats with a min or an
// offset per 16 weights, which would otherwise re-add the activations for every weight row).
// Guarantees: |q| <= 127 (never -128), d >= 0 (d == 0 for an all-zero block), q/d/sum/sum16 are
// 64-byte aligned and hold n/32 blocks (n is always a multiple of 256 or of 32).
// qt: the same int8 values with each whole 256-value block's 64 dwords transposed as an 8x8 matrix
// (dword c of 32-block k at dword 8c + k), so that 32 bytes hold one dword of each 32-block: an
// integer dot of 8 such vectors against weights transposed alike sums 32-block k in lane k, one
// float scaling per 256 values instead of per 32 (the prefill forms of the k-quant kernels, and the
// IQ1_S gather form in decode too: KernelSet::dot_reads_qt).
// A tail of fewer than 256 values stays in plain order.
struct Q8Row { const int8_t* q; const float* d; const int32_t* sum; const int16_t* sum16; const int8_t* qt; };

// Dot product of one weight row (raw GGUF blocks of one ggml type, n elements) with a quantized
// activation row.
using RowDot = float (*)(const uint8_t* w, const Q8Row& x, int64_t n);

// Optional (framework types only): one weight row against nx <= kMultiRows activation rows at
// once, out[j] = dot(w, x[j]); the weight blocks are decoded once for all rows (prefill). Kernels
// written for at most 4 rows take larger groups 4 rows at a time (KT_MULTI_IN_FOURS in simd.h).
constexpr int kMultiRows = 8;
using RowDotMulti = void (*)(const uint8_t* w, const Q8Row* x, int nx, float* out, int64_t n);

// Optional: rows shorter than 256 values (MLA's W_UK), nrows <= 8 weight rows `row_bytes` apart
// against nx <= kMultiRows activation rows: out[j * out_ld + i] = dot(row i, x[j]). Decode and
// prefill both take this form for such rows, so their results agree bit for bit.
constexpr int64_t kShortRowLimit = 256;
using ShortRowsDot = void (*)(const uint8_t* w, int64_t row_bytes, int nrows, const Q8Row* x, int nx, int64_t n,
                              float* out, int64_t out_ld);

// Float weights (F32/F16/BF16) take float activations: no activation quantization error.
using FloatRowDot = float (*)(const uint8_t* w, const float* x, int64_t n);

constexpr int kMaxGGMLType = 40;


}  // namespace kt
