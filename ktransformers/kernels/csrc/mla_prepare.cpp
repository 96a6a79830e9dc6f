// The small steps of MLA between its linears and the absorbed W_UK product (see ops.h), in one
// pass instead of some twenty torch ops a layer: split q, normalize the latent, rotate the rope
// parts of query and key, lay the query out head-major.
#include "kernels.h"
#include "ops.h"
#include "thread_pool.h"

namespace kt {
namespace {

// out = x rotated by rot (rope / 2 complex factors, as (cos, sin) pairs).
void rotate(const float* x, const float* rot, int64_t rope, bool interleaved, float* out) {
    const int64_t half = rope / 2;
    for (int64_t i = 0; i < half; ++i) {
        const float c = rot[2 * i], s = rot[2 * i + 1];
        const int64_t a = interleaved ? 2 * i : i, b = interleaved ? 2 * i + 1 : i + half;
        const float re = x[a], im = x[b];
        out[a] = re * c - im * s;
        out[b] = re * s + im * c;
    }
}

}  // namespace

void mla_prepare(const MlaShape& s, const float* q, const float* kv, const float* norm_w, float eps, const float* rot,
                 bool interleaved, float* q_nope, float* query, float* rows) {
    const KernelSet* k = active_kernels();
    const int64_t q_width = s.nope + s.rope, width = s.kv_lora + s.rope;
    auto token = [&](int64_t t) {
        const float* r = rot + t * s.rope;  // rope / 2 pairs
        for (int64_t h = 0; h < s.H; ++h) {
            const float* qh = q + (t * s.H + h) * q_width;
            float* nope_out = q_nope + (h * s.T + t) * s.nope;
            for (int64_t i = 0; i < s.nope; ++i) nope_out[i] = qh[i];
            rotate(qh + s.nope, r, s.rope, interleaved, query + (h * s.T + t) * width + s.kv_lora);
        }
        const float* kvt = kv + t * width;
        k->rms_norm_row(kvt, norm_w, s.kv_lora, eps, rows + t * width);
        rotate(kvt + s.kv_lora, r, s.rope, interleaved, rows + t * width + s.kv_lora);
    };
    if (s.T <= 4) {  // decode: cheaper than waking the pool
        for (int64_t t = 0; t < s.T; ++t) token(t);
        return;
    }
    pool().run(s.T, token);
}

}  // namespace kt
