// Batched per-head matrix-vector product of CPU MLA decode: out[h, n] = w[h, n, :] . x[h, :].
// One token's absorbed query (W_UK) and value (W_UV) products stream 67 MB of float weights a
// layer; running them on the kernel pool, right after the pool's own linears, avoids waking and
// contending with torch's OpenMP threads.
#include <algorithm>

#include "kernels.h"
#include "ops.h"
#include "thread_pool.h"

namespace kt {

namespace {

// Rows per work item: about 256 KB of weights, since every item costs a shared atomic and a new
// ramp-up of the hardware prefetchers at its first row (16 KB items ran at half the bandwidth of
// 256 KB ones on a 2-core EPYC VM), yet at least 4 items per pool thread for balance.
int64_t rows_per_item(int64_t rows, int64_t row_bytes) {
    const int64_t by_bytes = std::max<int64_t>(1, (256 << 10) / row_bytes);
    const int64_t by_balance = std::max<int64_t>(1, rows / (int64_t(pool().size()) * 4));
    return std::min(by_bytes, by_balance);
}

}  // namespace

void head_gemv(const uint8_t* w, int ggml_type, int64_t H, int64_t N, int64_t K, const float* x, float* out) {
    const FloatRowDot dot = active_kernels()->float_dot[ggml_type];
    const int64_t row_bytes = K * (ggml_type == 0 ? 4 : 2);  // F32, else F16/BF16
    // Rows of all heads are one sequence (the weight is contiguous), so an item may span two
    // heads: each row just takes its own head's x.
    const int64_t rows = H * N, chunk = rows_per_item(rows, row_bytes);
    pool().run((rows + chunk - 1) / chunk, [&](int64_t item) {
        const int64_t r1 = std::min(rows, (item + 1) * chunk);
        for (int64_t r = item * chunk; r < r1; ++r) out[r] = dot(w + r * row_bytes, x + r / N * K, K);
    });
}

}  // namespace kt
