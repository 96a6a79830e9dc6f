// Quantized linear: activations are quantized once per row, then the work is cut into
// (row chunk, token tile) items. Row chunks are the outer index so threads running at the same
// time share weight rows in cache, and each weight row is read once per tile of tokens.
// head_linear does the same for a stack of per-head matrices, each with its own activation rows
// (MLA's absorbed W_UK / W_UV, read from the GGUF blocks in place), in one pool call.
#include <algorithm>
#include <cstdlib>
#include <vector>

#include "kernels.h"
#include "ops.h"
#include "prefetch.h"
#include "q8_row.h"
#include "thread_pool.h"

namespace kt {

bool is_float_type(int t) { return t == 0 || t == 1 || t == 30; }

bool has_kernel(int t) {
    const KernelSet* k = active_kernels();
    return k && t >= 0 && t < kMaxGGMLType && (k->dot[t] || k->float_dot[t]);
}

namespace {

constexpr int64_t kTokenTile = 32;  // 32 activation rows of 7168 int8 stay in L2 with the weights

// Rows per item: enough items to balance the pool, few enough to amortise the hand-out (each
// item also restarts the hardware prefetchers: short rows get up to 128 KB an item).
int64_t rows_per_item(int64_t rows, int64_t tiles, int64_t row_bytes) {
    const int64_t wanted_items = int64_t(pool().size()) * 8;
    const int64_t most = std::max<int64_t>(64, (128 << 10) / row_bytes);
    return std::clamp<int64_t>(rows * tiles / wanted_items, 1, most);
}

}  // namespace

void head_linear(const float* x, int64_t M, const QuantMatrix& w, int64_t heads, int64_t head_stride, float* out,
                 int64_t out_ld) {
    if (out_ld <= 0) out_ld = w.rows;
    const KernelSet* k = active_kernels();
    const int64_t N = w.rows, K = w.cols;
    const int64_t tiles = (M + kTokenTile - 1) / kTokenTile;
    const int64_t most = rows_per_item(N * heads, tiles, w.row_bytes), chunks = (N + most - 1) / most;
    const int64_t chunk = (N + chunks - 1) / chunks;  // equal chunks of a head's rows
    const int64_t ahead = M <= 2 ? prefetch_rows(w.ggml_type, w.row_bytes) : 0;
    // Items are (head, row chunk, token tile). Within one, each group of `group` tokens runs over all
    // the chunk's rows: group_body(xrow, nx, each_rows) takes the group's activation rows xrow.. once,
    // then each_rows(step, f) calls f(row, o, count) for the chunk's rows, `step` at a time (prefetching
    // ahead in decode), and f writes o[j * out_ld + i] = row i . x[xrow + j] for i < count, j < nx.
    // Groups of a whole tile read each weight row once; the prefill groups of a few tokens keep their
    // activations in L1 while the chunk's rows (in L2 after the first) go by.
    auto for_each_group = [&](int64_t group, auto&& group_body) {
        pool().run(heads * chunks * tiles, [&](int64_t item) {
            const int64_t h = item / (chunks * tiles), rest = item % (chunks * tiles);
            const int64_t r0 = rest / tiles * chunk, r1 = std::min(N, r0 + chunk);
            const int64_t t0 = rest % tiles * kTokenTile, t1 = std::min(M, t0 + kTokenTile);
            const uint8_t* rows = w.data + h * head_stride;
            for (int64_t t = t0; t < t1; t += group) {
                float* o = out + (h * M + t) * out_ld;
                // f(row, o, count) for runs of `step` rows (the last may be shorter)
                auto each_rows = [&](int64_t step, auto&& f) {
                    for (int64_t r = r0; r < r1; r += step) {
                        const int64_t count = std::min(step, r1 - r);
                        if (ahead && r + ahead < r1)
                            prefetch(rows + (r + ahead) * w.row_bytes, std::min(count, r1 - r - ahead) * w.row_bytes);
                        f(rows + r * w.row_bytes, o + r, int(count));
                    }
                };
                group_body(h * M + t, int(std::min(group, t1 - t)), each_rows);
            }
        });
    };
    if (is_float_type(w.ggml_type)) {
        const FloatRowDot dot = k->float_dot[w.ggml_type];
        for_each_group(kTokenTile, [&](int64_t xrow, int nx, auto&& each_rows) {
            each_rows(1, [&](const uint8_t* row, float* o, int) {
                for (int j = 0; j < nx; ++j) o[j * out_ld] = dot(row, x + (xrow + j) * K, K);
            });
        });
        return;
    }
    const ShortRowsDot short_rows = K < kShortRowLimit ? k->short_rows[w.ggml_type] : nullptr;
    const RowDot dot = k->dot[w.ggml_type];
    const RowDotMulti multi = k->dot_multi[w.ggml_type];
    const Q8Rows xq = quantize_rows(x, heads * M, K, !short_rows && ((multi && M > 1) || k->dot_reads_qt[w.ggml_type]));
    if (short_rows) {  // decode and prefill alike: 8 weight rows by up to kMultiRows tokens a call
        for_each_group(kMultiRows, [&](int64_t xrow, int nx, auto&& each_rows) {
            Q8Row xs[kMultiRows] = {};
            for (int j = 0; j < nx; ++j) xs[j] = xq.row(xrow + j);
            each_rows(8, [&](const uint8_t* row, float* o, int count) {
                short_rows(row, w.row_bytes, count, xs, nx, K, o, out_ld);
            });
        });
        return;
    }
    if (!multi || M == 1) {
        for_each_group(kTokenTile, [&](int64_t xrow, int nx, auto&& each_rows) {
            if (nx == 1) {  // decode: the plainest loop
                const Q8Row x0 = xq.row(xrow);
                each_rows(1, [&](const uint8_t* row, float* o, int) { *o = dot(row, x0, K); });
                return;
            }
            Q8Row xs[kTokenTile];
            for (int j = 0; j < nx; ++j) xs[j] = xq.row(xrow + j);
            each_rows(1, [&](const uint8_t* row, float* o, int) {
                for (int j = 0; j < nx; ++j) o[j * out_ld] = dot(row, xs[j], K);
            });
        });
        return;
    }
    // prefill: groups of as many tokens as the type's multi-row kernel decodes a weight block for
    for_each_group(k->multi_width[w.ggml_type], [&](int64_t xrow, int nx, auto&& each_rows) {
        Q8Row xs[kMultiRows] = {};
        for (int j = 0; j < nx; ++j) xs[j] = xq.row(xrow + j);
        each_rows(1, [&](const uint8_t* row, float* o, int) {
            float res[kMultiRows];
            multi(row, xs, nx, res, K);
            for (int j = 0; j < nx; ++j) o[j * out_ld] = res[j];
        });
    });
}

void quant_linear(const float* x, int64_t M, const QuantMatrix& w, float* out) { head_linear(x, M, w, 1, 0, out, 0); }

void linear_group(const float* x, const QuantMatrix* ws, float* const* outs, int count) {
    const KernelSet* k = active_kernels();
    const int64_t K = ws[0].cols;
    bool quantized = false, with_qt = false;
    struct Item { int matrix; int64_t r0, r1; };
    std::vector<Item> items;
    for (int i = 0; i < count; ++i) {
        quantized = quantized || !is_float_type(ws[i].ggml_type);
        with_qt = with_qt || k->dot_reads_qt[ws[i].ggml_type];
        const int64_t step = rows_per_item(ws[i].rows, 1, ws[i].row_bytes);
        for (int64_t r = 0; r < ws[i].rows; r += step) items.push_back({i, r, std::min(ws[i].rows, r + step)});
    }
    const Q8Rows xq = quantized ? quantize_rows(x, 1, K, with_qt) : Q8Rows();
    const Q8Row xr = quantized ? xq.row(0) : Q8Row{};
    pool().run(int64_t(items.size()), [&](int64_t index) {
        const Item& item = items[index];
        const QuantMatrix& w = ws[item.matrix];
        const int64_t ahead = prefetch_rows(w.ggml_type, w.row_bytes);
        float* out = outs[item.matrix];
        // each dot as quant_linear's decode form takes it: the same bits
        const FloatRowDot float_dot = is_float_type(w.ggml_type) ? k->float_dot[w.ggml_type] : nullptr;
        const RowDot dot = float_dot ? nullptr : k->dot[w.ggml_type];
        const ShortRowsDot short_rows = !float_dot && K < kShortRowLimit ? k->short_rows[w.ggml_type] : nullptr;
        if (short_rows) {
            for (int64_t r = item.r0; r < item.r1; r += 8)
                short_rows(w.row(r), w.row_bytes, int(std::min<int64_t>(8, item.r1 - r)), &xr, 1, K, out + r, 0);
            return;
        }
        for (int64_t r = item.r0; r < item.r1; ++r) {
            if (ahead && r + ahead < item.r1) prefetch(w.row(r + ahead), w.row_bytes);
            out[r] = float_dot ? float_dot(w.row(r), x, K) : dot(w.row(r), xr, K);
        }
    });
}

double stream_sum(const uint8_t* p, size_t n) {
    const KernelSet* k = active_kernels();
    const int64_t parts = int64_t(pool().size()) * 4;
    const size_t part = (n / parts + 4095) / 4096 * 4096;
    std::vector<double> sums(parts, 0.0);
    pool().run(parts, [&](int64_t i) {
        const size_t begin = std::min(n, size_t(i) * part), end = std::min(n, begin + part);
        sums[i] = k->stream_sum(p + begin, end - begin);
    });
    double s = 0.0;
    for (double v : sums) s += v;
    return s;
}

}  // namespace kt
