// One-token MLA attention on the kernel pool (CPU decode). All heads share the latent cache, so
// the work is cut into (head group, block of cache rows) items: a block's rows stay in L2 while
// the group's heads read them, and long contexts split over the pool like short ones do over
// heads. Each item leaves a softmax partial (max, sum, weighted values); the partials of a head
// are merged at the end, as in flash-decoding. Running here rather than in torch keeps torch's
// OpenMP threads asleep during decode: they would contend with the pool's spinning workers.
// mla_prefill_attention does the same for a prefill chunk's tokens, each over its own causal prefix;
// it merges a token's blocks as decode does, so the token's output has decode's bits.
// mla_decode chains the whole step between the linears in one call: at decode the torch glue
// between five separate calls cost more than their arithmetic.
#include <algorithm>
#include <cmath>
#include <vector>

#include "kernels.h"
#include "ops.h"
#include "thread_pool.h"

namespace kt {

namespace {
constexpr int64_t kHeadsPerItem = 8;
constexpr int64_t kRowsPerBlock = 256;  // 576 float32 values a row: ~590 KB, within L2

// One head's output o[0..V) from its cache blocks' softmax partials: block b's max m[b * stride],
// sum l[b * stride] and weighted values acc[b * acc_stride..]. Decode and prefill both merge
// here, in this order, so a token's output has the same bits either way. acc may alias o.
void merge_partials(const float* m, const float* l, const float* acc, int64_t blocks, int64_t stride,
                    int64_t acc_stride, int64_t V, float* o) {
    if (blocks == 1) {
        for (int64_t j = 0; j < V; ++j) o[j] = acc[j] / l[0];
        return;
    }
    float top = m[0];
    for (int64_t b = 1; b < blocks; ++b) top = std::max(top, m[b * stride]);
    float total = 0.0f;
    std::fill(o, o + V, 0.0f);
    for (int64_t b = 0; b < blocks; ++b) {
        const float w = std::exp(m[b * stride] - top);
        total += w * l[b * stride];
        const float* a = acc + b * acc_stride;
        for (int64_t j = 0; j < V; ++j) o[j] += w * a[j];
    }
    for (int64_t j = 0; j < V; ++j) o[j] /= total;
}
}  // namespace

void mla_decode_attention(const float* q, int64_t H, const float* cache, int64_t S, int64_t D, int64_t V, float scale,
                          float* out) {
    const KernelSet* k = active_kernels();
    const int64_t groups = (H + kHeadsPerItem - 1) / kHeadsPerItem, blocks = (S + kRowsPerBlock - 1) / kRowsPerBlock;
    std::vector<float> m(blocks * H), l(blocks * H), acc(blocks == 1 ? 0 : blocks * H * V);
    float* sums = blocks == 1 ? out : acc.data();  // one block: its partial is the answer once divided by l
    // block-major items: the head groups of one cache block run one after another (and side by side),
    // so the block is read from memory once, not once per group
    pool().run(groups * blocks, [&](int64_t item) {
        const int64_t g0 = item % groups * kHeadsPerItem, G = std::min(kHeadsPerItem, H - g0);
        const int64_t b = item / groups, s0 = b * kRowsPerBlock, C = std::min(kRowsPerBlock, S - s0);
        std::vector<float> scratch(G * C);
        float* partial = sums + (b * H + g0) * V;
        k->attend_block(q + g0 * D, G, cache + s0 * D, C, D, V, scale, scratch.data(), &m[b * H + g0], &l[b * H + g0],
                        partial);
        if (blocks == 1)
            for (int64_t g = 0; g < G; ++g) merge_partials(&m[g0 + g], &l[g0 + g], partial + g * V, 1, H, 0, V, partial + g * V);
    });
    if (blocks == 1) return;
    pool().run(H, [&](int64_t h) { merge_partials(&m[h], &l[h], &acc[h * V], blocks, H, H * V, V, out + h * V); });
}

void mla_prefill_attention(const float* q, int64_t H, int64_t T, const float* cache, int64_t start, int64_t D,
                           int64_t V, float scale, float* out) {
    const KernelSet* k = active_kernels();
    const int64_t groups = (H + kHeadsPerItem - 1) / kHeadsPerItem;
    // items (token, head group), later tokens first: they see the most rows, so the pool ends evenly
    pool().run(T * groups, [&](int64_t item) {
        const int64_t t = T - 1 - item / groups, g0 = item % groups * kHeadsPerItem, G = std::min(kHeadsPerItem, H - g0);
        const int64_t S = start + t + 1, blocks = (S + kRowsPerBlock - 1) / kRowsPerBlock;
        std::vector<float> rows(G * D), scratch(G * std::min(S, kRowsPerBlock)), m(blocks * G), l(blocks * G),
            acc(blocks * G * V);
        for (int64_t g = 0; g < G; ++g) std::copy_n(q + ((g0 + g) * T + t) * D, D, &rows[g * D]);
        for (int64_t b = 0; b < blocks; ++b) {
            const int64_t s0 = b * kRowsPerBlock, C = std::min(kRowsPerBlock, S - s0);
            k->attend_block(rows.data(), G, cache + s0 * D, C, D, V, scale, scratch.data(), &m[b * G], &l[b * G],
                            &acc[b * G * V]);
        }
        for (int64_t g = 0; g < G; ++g)
            merge_partials(&m[g], &l[g], &acc[g * V], blocks, G, G * V, V, out + ((g0 + g) * T + t) * V);
    });
}

void mla_decode(const MlaShape& s, const float* q, const float* kv, const float* norm_w, float eps, const float* rot,
                bool interleaved, const HeadStack& w_uk, const HeadStack& w_uv, float* cache, int64_t position,
                float scale, float* out) {
    const int64_t width = s.kv_lora + s.rope;
    std::vector<float> q_nope(s.H * s.nope), query(s.H * width), latent(s.H * s.kv_lora);
    const MlaShape one{1, s.H, s.nope, s.rope, s.kv_lora};
    mla_prepare(one, q, kv, norm_w, eps, rot, interleaved, q_nope.data(), query.data(), cache + position * width);
    head_linear(q_nope.data(), 1, w_uk.w, s.H, w_uk.head_stride, query.data(), width);  // the latent columns
    mla_decode_attention(query.data(), s.H, cache, position + 1, width, s.kv_lora, scale, latent.data());
    head_linear(latent.data(), 1, w_uv.w, s.H, w_uv.head_stride, out, 0);
}

}  // namespace kt
