// Software prefetch of the weight rows a decode call streams next. Two ways keep weight reads in
// flight, tuned per vendor: whole rows ahead, issued by the callers (prefetch_rows), and a short
// distance ahead inside a row, issued by the dot kernels block by block
// (weight_prefetch_bytes). The hardware prefetchers alone also stop at every 4 KB page of a file mapping.
#pragma once
#include <xmmintrin.h>

#include <cstdint>

namespace kt {

// Rows to prefetch ahead in decode; KT_PREFETCH_ROWS=N overrides (prefetch.cpp).
int64_t prefetch_rows();
// The same for rows of `row_bytes` of a `ggml_type`: none where that type's dot kernel prefetches
// inside the row itself, else at least ~2 KB ahead when rows are prefetched at all, since one row
// ahead of a short row (MLA's W_UK: 136 bytes) is too close to hide the memory's latency.
int64_t prefetch_rows(int ggml_type, int64_t row_bytes);
// Whether the dot kernel of `ggml_type` prefetches inside rows of `row_bytes` itself (then callers
// prefetch no rows: both at once cost bandwidth on Sapphire Rapids).
bool prefetches_in_row(int ggml_type, int64_t row_bytes);

// How far ahead of the block being decoded the k-quant and Q8_0 kernels prefetch their weight row,
// in bytes (0: not at all); fixed at the first call (prefetch.cpp).
int64_t weight_prefetch_bytes();

inline void prefetch(const uint8_t* p, int64_t bytes) {
    for (int64_t i = 0; i < bytes; i += 64) _mm_prefetch(reinterpret_cast<const char*>(p + i), _MM_HINT_T0);
}

}  // namespace kt
