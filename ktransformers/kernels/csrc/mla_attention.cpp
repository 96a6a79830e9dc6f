// One-token MLA attention on the kernel pool (CPU decode). All heads share the latent cache, so
// the work is cut into (head group, block of cache rows) items: a block's rows stay in L2 while
// the group's heads read them, and long contexts split over the pool like short ones do over
// heads. Each item leaves a softmax partial (max, sum, weighted values); the partials of a head
// are merged at the end, as in flash-decoding. Running here rather than in torch keeps torch's
// OpenMP threads asleep during decode: they would contend with the pool's spinning workers.
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
}  // namespace

void mla_decode_attention(const float* q, int64_t H, const float* cache, int64_t S, int64_t D, int64_t V, float scale,
                          float* out) {
    const KernelSet* k = active_kernels();
    const int64_t groups = (H + kHeadsPerItem - 1) / kHeadsPerItem, blocks = (S + kRowsPerBlock - 1) / kRowsPerBlock;
    std::vector<float> m(blocks * H), l(blocks * H), acc(blocks == 1 ? 0 : blocks * H * V);
    float* sums = blocks == 1 ? out : acc.data();  // one block: its partial is the answer once divided by l
    pool().run(groups * blocks, [&](int64_t item) {
        const int64_t g0 = item / blocks * kHeadsPerItem, G = std::min(kHeadsPerItem, H - g0);
        const int64_t b = item % blocks, s0 = b * kRowsPerBlock, C = std::min(kRowsPerBlock, S - s0);
        std::vector<float> scratch(G * C);
        float* partial = sums + (b * H + g0) * V;
        k->attend_block(q + g0 * D, G, cache + s0 * D, C, D, V, scale, scratch.data(), &m[b * H + g0], &l[b * H + g0],
                        partial);
        if (blocks == 1)
            for (int64_t g = 0; g < G; ++g)
                for (int64_t j = 0; j < V; ++j) partial[g * V + j] /= l[g0 + g];
    });
    if (blocks == 1) return;
    pool().run(H, [&](int64_t h) {
        float* o = out + h * V;
        float top = m[h];
        for (int64_t b = 1; b < blocks; ++b) top = std::max(top, m[b * H + h]);
        float total = 0.0f;
        std::fill(o, o + V, 0.0f);
        for (int64_t b = 0; b < blocks; ++b) {
            const float w = std::exp(m[b * H + h] - top);
            total += w * l[b * H + h];
            const float* a = &acc[(b * H + h) * V];
            for (int64_t j = 0; j < V; ++j) o[j] += w * a[j];
        }
        for (int64_t j = 0; j < V; ++j) o[j] /= total;
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
