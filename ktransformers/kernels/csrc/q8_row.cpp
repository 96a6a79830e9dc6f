#include "q8_row.h"

#include <cstring>

#include "kernels.h"
#include "thread_pool.h"

namespace kt {

Q8Rows::Q8Rows(int64_t rows, int64_t n, bool transposed)
    : n_(n), transposed_(transposed), q_(size_t(rows * row_stride())), qt_(transposed ? size_t(rows * row_stride()) : 0), d_(size_t(rows * blocks_stride())), sum_(size_t(rows * blocks_stride())),
      sum16_(size_t(rows * 2 * blocks_stride())) {}

void Q8Rows::quantize(int64_t r, const float* x) { quantize(r, x, *active_kernels()); }

void Q8Rows::quantize(int64_t r, const float* x, const KernelSet& kernels) {
    const Q8Row out = row(r);
    kernels.quantize_row_q8(x, n_, const_cast<int8_t*>(out.q), const_cast<float*>(out.d),
                            const_cast<int32_t*>(out.sum), const_cast<int16_t*>(out.sum16));
    if (!transposed_) return;
    // qt: per 256 values, dword c of 32-block k -> dword 8c + k (see Q8Row); the tail as it is
    int8_t* qt = const_cast<int8_t*>(out.qt);
    const int64_t whole = n_ / 256 * 256;
    for (int64_t b = 0; b < whole; b += 256)
        for (int k = 0; k < 8; ++k)
            for (int c = 0; c < 8; ++c) std::memcpy(qt + b + 4 * (8 * c + k), out.q + b + 32 * k + 4 * c, 4);
    std::memcpy(qt + whole, out.q + whole, size_t(n_ - whole));
}

Q8Rows quantize_rows(const float* x, int64_t rows, int64_t n, bool transposed) {
    Q8Rows out(rows, n, transposed);
    pool().run(rows, [&](int64_t r) { out.quantize(r, x + r * n); });
    return out;
}

}  // namespace kt
