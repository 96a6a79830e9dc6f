#include "q8_row.h"

#include <cmath>

#include "thread_pool.h"

namespace kt {

Q8Rows::Q8Rows(int64_t rows, int64_t n)
    : n_(n), q_(size_t(rows * row_stride())), d_(size_t(rows * blocks_stride())), sum_(size_t(rows * blocks_stride())) {}

void Q8Rows::quantize(int64_t r, const float* x) {
    const Q8Row out = row(r);
    int8_t* q = const_cast<int8_t*>(out.q);
    float* d = const_cast<float*>(out.d);
    int32_t* sum = const_cast<int32_t*>(out.sum);
    for (int64_t b = 0; b < n_ / 32; ++b) {
        const float* xb = x + b * 32;
        float amax = 0.0f;
        for (int i = 0; i < 32; ++i) amax = std::fmax(amax, std::fabs(xb[i]));
        const float scale = amax / 127.0f;
        const float inv = amax > 0.0f ? 127.0f / amax : 0.0f;
        int32_t s = 0;
        for (int i = 0; i < 32; ++i) {
            const int v = int(std::nearbyint(xb[i] * inv));
            q[b * 32 + i] = int8_t(v > 127 ? 127 : (v < -127 ? -127 : v));
            s += q[b * 32 + i];
        }
        d[b] = scale;
        sum[b] = s;
    }
}

Q8Rows quantize_rows(const float* x, int64_t rows, int64_t n) {
    Q8Rows out(rows, n);
    pool().run(rows, [&](int64_t r) { out.quantize(r, x + r * n); });
    return out;
}

}  // namespace kt
