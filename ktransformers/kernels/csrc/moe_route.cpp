// The MoE router's choice of experts from its logits, as operators/moe_gate.py computes it with
// torch ops (which cost a decode step some fifteen small tensor ops a layer): sigmoid (DeepSeek V3)
// or softmax (V2) scores; V3's noaux_tc (score + bias, groups ranked by their two best, top-k
// within the best groups), V2's group_limited_greedy (groups ranked by their best) or greedy;
// weights are the unbiased scores of the chosen experts, normalized when asked. Ties go to the
// lower index; ids come out best first, like torch.topk.
#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <vector>

#include "ops.h"
#include "thread_pool.h"

namespace kt {
namespace {

// The k best indices of v (value descending, index ascending among equals).
void top_indices(const std::vector<float>& v, int64_t k, std::vector<int64_t>& idx) {
    idx.resize(v.size());
    std::iota(idx.begin(), idx.end(), int64_t(0));
    std::partial_sort(idx.begin(), idx.begin() + k, idx.end(),
                      [&](int64_t a, int64_t b) { return v[a] > v[b] || (v[a] == v[b] && a < b); });
    idx.resize(k);
}

void route_token(const float* logits, const float* bias, const RouteConfig& c, int64_t* ids, float* weights) {
    const int64_t E = c.n_experts;
    std::vector<float> score(logits, logits + E);
    if (c.sigmoid) {
        for (float& s : score) s = 1.0f / (1.0f + std::exp(-s));
    } else {
        const float top = *std::max_element(score.begin(), score.end());
        float sum = 0.0f;
        for (float& s : score) sum += (s = std::exp(s - top));
        for (float& s : score) s /= sum;
    }
    std::vector<float> choice(score);
    if (c.method == RouteConfig::kNoauxTc)
        for (int64_t e = 0; e < E; ++e) choice[e] += bias[e];
    std::vector<int64_t> idx;
    if (c.method != RouteConfig::kGreedy) {
        const int64_t per_group = E / c.n_group;
        std::vector<float> group_score(c.n_group);
        for (int64_t g = 0; g < c.n_group; ++g) {
            std::vector<float> members(choice.begin() + g * per_group, choice.begin() + (g + 1) * per_group);
            std::sort(members.begin(), members.end(), std::greater<float>());
            group_score[g] = c.method == RouteConfig::kNoauxTc ? members[0] + (per_group > 1 ? members[1] : 0.0f)
                                                                : members[0];
        }
        top_indices(group_score, c.topk_group, idx);
        std::vector<bool> keep(c.n_group, false);
        for (int64_t g : idx) keep[g] = true;
        const float dropped = c.method == RouteConfig::kNoauxTc ? -std::numeric_limits<float>::infinity() : 0.0f;
        for (int64_t e = 0; e < E; ++e)
            if (!keep[e / per_group]) choice[e] = dropped;
    }
    top_indices(choice, c.top_k, idx);
    float sum = 0.0f;
    for (int64_t j = 0; j < c.top_k; ++j) {
        ids[j] = idx[j];
        sum += (weights[j] = score[idx[j]]);
    }
    if (c.normalize && c.top_k > 1)
        for (int64_t j = 0; j < c.top_k; ++j) weights[j] /= sum + 1e-20f;
}

}  // namespace

void moe_route(const float* logits, int64_t T, const float* bias, const RouteConfig& c, int64_t* ids, float* weights) {
    auto token = [&](int64_t t) { route_token(logits + t * c.n_experts, bias, c, ids + t * c.top_k, weights + t * c.top_k); };
    if (T <= 4) {  // decode: cheaper than waking the pool
        for (int64_t t = 0; t < T; ++t) token(t);
        return;
    }
    pool().run(T, token);
}

}  // namespace kt
