#include "prefetch.h"

#include <algorithm>
#include <cstdlib>

namespace kt {
namespace {

// $name when set, else `intel` on Intel cores and `other` elsewhere.
int64_t tuned(const char* name, int64_t intel, int64_t other) {
    const char* env = std::getenv(name);
    if (env && *env) return std::max<int64_t>(0, std::atoll(env));
    __builtin_cpu_init();
    return __builtin_cpu_is("intel") ? intel : other;
}

}  // namespace

// One row on Intel (Sapphire Rapids, 16 threads: a CPU-only decode step took 12.8 ms with it,
// 15.4 ms without); none elsewhere (Zen 4, 2 threads: a whole row's prefetches at once made a step
// up to 1.6x slower).
int64_t prefetch_rows() {
    static const int64_t rows = tuned("KT_PREFETCH_ROWS", 1, 0);
    return rows;
}

// The k-quants prefetch at every super-block, Q8_0 in its 8-block steps (so not in shorter rows).
bool prefetches_in_row(int ggml_type, int64_t row_bytes) {
    if (!weight_prefetch_bytes()) return false;
    switch (ggml_type) {
        case 10: case 11: case 12: case 13: case 14: return true;   // Q2_K, Q3_K, Q4_K, Q5_K, Q6_K
        case 8: return row_bytes >= 8 * 34;       // Q8_0
        default: return false;
    }
}

int64_t prefetch_rows(int ggml_type, int64_t row_bytes) {
    const int64_t rows = prefetches_in_row(ggml_type, row_bytes) ? 0 : prefetch_rows();
    return rows ? std::max(rows, (2048 + row_bytes - 1) / std::max<int64_t>(row_bytes, 1)) : 0;
}

// 4096 bytes on Intel (Sapphire Rapids, 16 threads, fused MoE decode Q4_K/Q4_K/Q6_K: 94 GB/s with
// one row ahead instead, 134 with this, of a 106-125 GB/s streaming read); 1280 elsewhere (Zen 4,
// 2 threads: Q4_K decode from memory 21 -> 28 GB/s).
int64_t weight_prefetch_bytes() {
    static const int64_t bytes = tuned("KT_PREFETCH_BYTES", 4096, 1280);
    return bytes;
}

}  // namespace kt
