#include "prefetch.h"

#include <algorithm>
#include <cstdlib>

#include "dot.h"

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

int64_t prefetch_rows(int64_t row_bytes) {
    const int64_t rows = prefetch_rows();
    return rows ? std::max(rows, (2048 + row_bytes - 1) / std::max<int64_t>(row_bytes, 1)) : 0;
}

// None on Intel, where rows are prefetched; 1280 bytes elsewhere (Zen 4, 2 threads: Q4_K decode
// from memory 21 -> 28 GB/s).
int64_t weight_prefetch_bytes() {
    static const int64_t bytes = tuned("KT_PREFETCH_BYTES", 0, 1280);
    return bytes;
}

}  // namespace kt
