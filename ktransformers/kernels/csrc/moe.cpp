// Fused routed-experts forward. Tokens are grouped by expert so every active expert's weights
// stream from memory once per call:
//   1. (expert, row chunk) items: h[p, i] = silu(gate_e[i] . x[t]) * (up_e[i] . x[t]) for every
//      (token, slot) pair p routed to e;
//   2. h is quantized once per pair for the down projection;
//   3. row chunks of the hidden dimension: each item owns out[:, rows] and adds the weighted down
//      projections of all active experts, so no two threads ever write the same output float.
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <optional>
#include <vector>

#include "kernels.h"
#include "ops.h"
#include "prefetch.h"
#include "q8_row.h"
#include "thread_pool.h"

namespace kt {
namespace {

// Dot of one weight row with activation row `r`, in whichever form the weight type takes.
struct Activations {
    const float* x = nullptr;
    int64_t n = 0;
    Q8Rows q;
    FloatRowDot float_dot = nullptr;
    RowDot dot = nullptr;

    Activations(const KernelSet* k, int type, const float* rows_x, int64_t rows, int64_t cols)
        : x(rows_x), n(cols) {
        if (is_float_type(type)) float_dot = k->float_dot[type];
        else {
            dot = k->dot[type];
            multi = k->dot_multi[type];
            q = quantize_rows(rows_x, rows, cols);
        }
    }
    RowDotMulti multi = nullptr;

    // out[i] = w . row[rows[i]] for i < count; several rows share one decode of w when possible.
    void dots(const uint8_t* w, const int64_t* rows, int64_t count, float* out) const {
        if (!dot) {
            for (int64_t i = 0; i < count; ++i) out[i] = float_dot(w, x + rows[i] * n, n);
        } else if (!multi || count == 1) {
            for (int64_t i = 0; i < count; ++i) out[i] = dot(w, q.row(rows[i]), n);
        } else {
            for (int64_t i = 0; i < count; i += kMultiRows) {
                const int nx = int(std::min<int64_t>(kMultiRows, count - i));
                Q8Row xs[kMultiRows];
                for (int j = 0; j < nx; ++j) xs[j] = q.row(rows[i + j]);
                multi(w, xs, nx, out + i, n);
            }
        }
    }
};

// Rows per work item: enough items to balance the pool, at most KT_MOE_ROWS (32 by default).
int64_t chunk_rows(int64_t rows, int64_t groups) {
    static const int64_t most = [] {
        const char* env = std::getenv("KT_MOE_ROWS");
        return env && *env ? std::max<int64_t>(1, std::atoll(env)) : int64_t(32);
    }();
    const int64_t wanted_items = int64_t(pool().size()) * 8;
    return std::clamp<int64_t>(rows * groups / wanted_items, 1, most);
}

}  // namespace

void moe_forward(const float* x, int64_t T, int64_t H, const int64_t* ids, const float* weights, int64_t k,
                 const QuantMatrix& gate, const QuantMatrix& up, const QuantMatrix& down, int64_t n_experts, int64_t I,
                 float* out) {
    const KernelSet* ks = active_kernels();
    // Pairs p = t * k + j grouped by expert (counting sort keeps token order inside a group).
    std::vector<int64_t> start(n_experts + 1, 0);
    for (int64_t p = 0; p < T * k; ++p) ++start[ids[p] + 1];
    for (int64_t e = 0; e < n_experts; ++e) start[e + 1] += start[e];
    std::vector<int64_t> pairs(T * k), fill(start.begin(), start.end() - 1);
    for (int64_t p = 0; p < T * k; ++p) pairs[fill[ids[p]]++] = p;
    std::vector<int64_t> active;
    for (int64_t e = 0; e < n_experts; ++e)
        if (start[e + 1] > start[e]) active.push_back(e);
    const int64_t A = int64_t(active.size());

    const int64_t ahead = T <= 2 ? prefetch_rows() : 0;  // decode: each weight row is used once

    // 1. gate/up for every pair, in slot order p.
    const Activations gate_x(ks, gate.ggml_type, x, T, H);
    std::optional<Activations> up_own;  // only when up's type needs another activation form
    if (up.ggml_type != gate.ggml_type) up_own.emplace(ks, up.ggml_type, x, T, H);
    const Activations& upx = up_own ? *up_own : gate_x;
    std::vector<int64_t> pair_token(pairs.size());
    for (size_t s = 0; s < pairs.size(); ++s) pair_token[s] = pairs[s] / k;
    std::vector<float> h(size_t(T * k * I));
    const int64_t ci = chunk_rows(I, A), n_ci = (I + ci - 1) / ci;
    pool().run(A * n_ci, [&](int64_t item) {
        const int64_t e = active[item / n_ci], first = start[e], count = start[e + 1] - first;
        const int64_t i0 = item % n_ci * ci, i1 = std::min(I, i0 + ci);
        std::vector<float> g(count), u(count);
        for (int64_t i = i0; i < i1; ++i) {
            if (ahead && i + ahead < i1) {
                prefetch(gate.row(e * I + i + ahead), gate.row_bytes);
                prefetch(up.row(e * I + i + ahead), up.row_bytes);
            }
            gate_x.dots(gate.row(e * I + i), &pair_token[first], count, g.data());
            upx.dots(up.row(e * I + i), &pair_token[first], count, u.data());
            for (int64_t s = 0; s < count; ++s) h[pairs[first + s] * I + i] = g[s] / (1.0f + std::exp(-g[s])) * u[s];
        }
    });

    // 2. the intermediate, quantized once per pair for the down projection.
    const Activations h_x(ks, down.ggml_type, h.data(), T * k, I);

    // 3. down projections, each item owning a slice of output rows for all tokens.
    std::fill(out, out + T * H, 0.0f);
    const int64_t ch = chunk_rows(H, 1), n_ch = (H + ch - 1) / ch;
    pool().run(n_ch, [&](int64_t item) {
        const int64_t r0 = item * ch, r1 = std::min(H, r0 + ch);
        std::vector<float> y(size_t(T * k));
        for (int64_t e : active) {
            const int64_t first = start[e], count = start[e + 1] - first;
            for (int64_t r = r0; r < r1; ++r) {
                if (ahead && r + ahead < r1) prefetch(down.row(e * H + r + ahead), down.row_bytes);
                h_x.dots(down.row(e * H + r), &pairs[first], count, y.data());
                for (int64_t s = 0; s < count; ++s) {
                    const int64_t p = pairs[first + s];
                    out[p / k * H + r] += weights[p] * y[s];
                }
            }
        }
    });
}

}  // namespace kt
