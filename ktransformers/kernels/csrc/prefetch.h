// Software prefetch of the weight rows a decode call streams next: asking for the row `ahead`
// while this one is computed keeps more memory requests in flight per core than the hardware
// prefetchers alone (which also stop at every 4 KB page of a file mapping).
#pragma once
#include <xmmintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>

namespace kt {

// Two ways to keep weight reads in flight, tuned per vendor (the kernels' own weight_prefetch_bytes,
// declared in dot.h, is the second): whole rows ahead, issued by the callers below, and a short
// distance ahead inside a row, issued by the dot kernels block by block.
//
// Rows to prefetch ahead in decode; KT_PREFETCH_ROWS=N overrides. The default depends on the core:
// one row on Intel (Sapphire Rapids, 16 threads: a CPU-only decode step took 12.8 ms with it, 15.4 ms
// without), none elsewhere (Zen 4, 2 threads: a whole row's prefetches at once cost 1.6x a step).
inline int64_t prefetch_rows() {
    static const int64_t rows = [] {
        const char* env = std::getenv("KT_PREFETCH_ROWS");
        if (env && *env) return std::max<int64_t>(0, std::atoll(env));
        __builtin_cpu_init();
        return int64_t(__builtin_cpu_is("intel") ? 1 : 0);
    }();
    return rows;
}

inline void prefetch(const uint8_t* p, int64_t bytes) {
    for (int64_t i = 0; i < bytes; i += 64) _mm_prefetch(reinterpret_cast<const char*>(p + i), _MM_HINT_T0);
}

}  // namespace kt
