// Fused routed-experts forward (and, when given, the shared expert in the same passes: one call
// a layer instead of four). Tokens are grouped by expert so every active expert's weights
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

// Activation rows in the forms weights take: the float rows themselves for F32/F16/BF16 weights,
// and int8 Q8Rows (one quantization shared by every quantized type) for the others. Q8Row::qt is
// filled where a multi-row form may read it (several tokens) or the type's one-row form does.
struct ActivationRows {
    const float* x;
    int64_t n;
    Q8Rows q;

    ActivationRows(const float* rows_x, int64_t rows, int64_t cols, bool quantized, bool with_qt)
        : x(rows_x), n(cols) {
        if (quantized) q = quantize_rows(rows_x, rows, cols, with_qt);
    }
};

// Dot of one weight row of a matrix's type with activation row `r`.
struct MatrixDot {
    const ActivationRows& a;
    FloatRowDot float_dot = nullptr;
    RowDot dot = nullptr;
    RowDotMulti multi = nullptr;

    MatrixDot(const KernelSet* k, int type, const ActivationRows& rows) : a(rows) {
        if (is_float_type(type)) float_dot = k->float_dot[type];
        else dot = k->dot[type], multi = k->dot_multi[type];
    }

    // out[i] = w . row[rows[i]] for i < count; several rows share one decode of w when possible.
    void dots(const uint8_t* w, const int64_t* rows, int64_t count, float* out) const {
        if (!dot) {
            for (int64_t i = 0; i < count; ++i) out[i] = float_dot(w, a.x + rows[i] * a.n, a.n);
        } else if (!multi || count == 1) {
            for (int64_t i = 0; i < count; ++i) out[i] = dot(w, a.q.row(rows[i]), a.n);
        } else {
            for (int64_t i = 0; i < count; i += kMultiRows) {
                const int nx = int(std::min<int64_t>(kMultiRows, count - i));
                Q8Row xs[kMultiRows];
                for (int j = 0; j < nx; ++j) xs[j] = a.q.row(rows[i + j]);
                multi(w, xs, nx, out + i, a.n);
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
                 float* out, float routed_scale, const SharedExpert* shared) {
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
    std::vector<int64_t> tokens(T);  // the shared expert's rows: every token
    for (int64_t t = 0; t < T; ++t) tokens[t] = t;

    // decode: each weight row is used once; rows ahead unless the type's kernel prefetches in the row
    auto rows_ahead = [T](const QuantMatrix& m) {
        return T <= 2 && !prefetches_in_row(m.ggml_type, m.row_bytes) ? prefetch_rows() : int64_t(0);
    };
    auto quantized = [](const QuantMatrix& m) { return !is_float_type(m.ggml_type); };
    auto reads_qt = [ks](const QuantMatrix& m) { return ks->dot_reads_qt[m.ggml_type]; };

    // 1. gate/up for every pair, in slot order p, and for every token through the shared expert.
    const ActivationRows xs(x, T, H, quantized(gate) || quantized(up) ||
                                         (shared && (quantized(shared->gate) || quantized(shared->up))),
                            T > 1 || reads_qt(gate) || reads_qt(up) || (shared && (reads_qt(shared->gate) || reads_qt(shared->up))));
    const MatrixDot gate_x(ks, gate.ggml_type, xs), up_x(ks, up.ggml_type, xs);
    std::vector<int64_t> pair_token(pairs.size());
    for (size_t s = 0; s < pairs.size(); ++s) pair_token[s] = pairs[s] / k;
    const int64_t IS = shared ? shared->I : 0;
    std::vector<float> h(size_t(T * k * I)), hs(size_t(T * IS));
    // rows i0..i1 of one expert's gate/up for `count` activation rows: h[slot(s) * width + i]
    auto gate_up = [&](const QuantMatrix& g, const QuantMatrix& u, const MatrixDot& gd, const MatrixDot& ud,
                       int64_t row0, int64_t i0, int64_t i1, const int64_t* rows, int64_t count, auto slot,
                       float* dest, int64_t width) {
        std::vector<float> gv(count), uv(count);
        const int64_t ahead_g = rows_ahead(g), ahead_u = rows_ahead(u);
        for (int64_t i = i0; i < i1; ++i) {
            if (ahead_g && i + ahead_g < i1) prefetch(g.row(row0 + i + ahead_g), g.row_bytes);
            if (ahead_u && i + ahead_u < i1) prefetch(u.row(row0 + i + ahead_u), u.row_bytes);
            gd.dots(g.row(row0 + i), rows, count, gv.data());
            ud.dots(u.row(row0 + i), rows, count, uv.data());
            for (int64_t s = 0; s < count; ++s) dest[slot(s) * width + i] = gv[s] / (1.0f + std::exp(-gv[s])) * uv[s];
        }
    };
    const int64_t ci = chunk_rows(I, A + (shared ? 1 : 0)), n_ci = (I + ci - 1) / ci;
    const int64_t cs = shared ? chunk_rows(IS, A + 1) : 1, n_cs = shared ? (IS + cs - 1) / cs : 0;
    std::optional<MatrixDot> shared_gate_x, shared_up_x;
    if (shared) shared_gate_x.emplace(ks, shared->gate.ggml_type, xs), shared_up_x.emplace(ks, shared->up.ggml_type, xs);
    pool().run(A * n_ci + n_cs, [&](int64_t item) {
        if (item >= A * n_ci) {
            const int64_t i0 = (item - A * n_ci) * cs, i1 = std::min(IS, i0 + cs);
            gate_up(shared->gate, shared->up, *shared_gate_x, *shared_up_x, 0, i0, i1, tokens.data(), T,
                    [](int64_t s) { return s; }, hs.data(), IS);
            return;
        }
        const int64_t e = active[item / n_ci], first = start[e], count = start[e + 1] - first;
        const int64_t i0 = item % n_ci * ci, i1 = std::min(I, i0 + ci);
        gate_up(gate, up, gate_x, up_x, e * I, i0, i1, &pair_token[first], count,
                [&](int64_t s) { return pairs[first + s]; }, h.data(), I);
    });

    // 2. the intermediates, quantized once per pair (and token) for the down projections.
    const ActivationRows h_rows(h.data(), T * k, I, quantized(down), T > 1 || reads_qt(down));
    const MatrixDot h_x(ks, down.ggml_type, h_rows);
    std::optional<ActivationRows> hs_rows;
    std::optional<MatrixDot> hs_x;
    if (shared)
        hs_rows.emplace(hs.data(), T, IS, quantized(shared->down), T > 1 || reads_qt(shared->down)),
            hs_x.emplace(ks, shared->down.ggml_type, *hs_rows);

    // 3. down projections, each item owning a slice of output rows for all tokens.
    const int64_t ch = chunk_rows(H, 1), n_ch = (H + ch - 1) / ch;
    pool().run(n_ch, [&](int64_t item) {
        const int64_t r0 = item * ch, r1 = std::min(H, r0 + ch);
        for (int64_t t = 0; t < T; ++t) std::fill(out + t * H + r0, out + t * H + r1, 0.0f);
        std::vector<float> y(size_t(T * k + T));
        const int64_t ahead = rows_ahead(down), ahead_s = shared ? rows_ahead(shared->down) : 0;
        for (int64_t e : active) {
            const int64_t first = start[e], count = start[e + 1] - first;
            for (int64_t r = r0; r < r1; ++r) {
                if (ahead && r + ahead < r1) prefetch(down.row(e * H + r + ahead), down.row_bytes);
                h_x.dots(down.row(e * H + r), &pairs[first], count, y.data());
                for (int64_t s = 0; s < count; ++s) {
                    const int64_t p = pairs[first + s];
                    out[p / k * H + r] += routed_scale * weights[p] * y[s];
                }
            }
        }
        if (!shared) return;
        for (int64_t r = r0; r < r1; ++r) {
            if (ahead_s && r + ahead_s < r1) prefetch(shared->down.row(r + ahead_s), shared->down.row_bytes);
            hs_x->dots(shared->down.row(r), tokens.data(), T, y.data());
            for (int64_t t = 0; t < T; ++t) out[t * H + r] += y[t];
        }
    });
}

}  // namespace kt
