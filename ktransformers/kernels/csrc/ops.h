// The compute entry points behind the Python bindings. Callers (bindings.cpp) have already
// checked sizes and types; these only compute. Both run on the thread pool.
#pragma once
#include <cstdint>

namespace kt {

// One weight matrix of raw GGUF rows: `rows` rows of `cols` elements, `row_bytes` bytes each.
struct QuantMatrix {
    const uint8_t* data;
    int ggml_type;
    int64_t rows, cols, row_bytes;
    const uint8_t* row(int64_t r) const { return data + r * row_bytes; }
};

bool is_float_type(int ggml_type);  // F32/F16/BF16: float activations instead of Q8Row
bool has_kernel(int ggml_type);     // in the active ISA's table

// out[M, N] = x[M, K] @ W^T.
void quant_linear(const float* x, int64_t M, const QuantMatrix& w, float* out);

// One decode row x [K] through several matrices of K columns at once (MLA's q_a and kv_a, an MLP's
// gate and up): x is quantized once and one pool call walks all their rows. outs[i] [rows_i] equals
// quant_linear's result bit for bit.
void linear_group(const float* x, const QuantMatrix* ws, float* const* outs, int count);

// A shared expert (gate/up [I, hidden], down [hidden, I]) that every token passes through.
struct SharedExpert {
    QuantMatrix gate, up, down;
    int64_t I;
};

// Routed experts: out[t] = routed_scale * sum_j weights[t, j] * down_e(silu(gate_e(x[t])) * up_e(x[t]))
// (+ the shared expert's output for x[t] when `shared` is given), e = ids[t, j]. gate/up/down
// describe the whole 3-D stacks, rows = n_experts * out_features.
void moe_forward(const float* x, int64_t T, int64_t hidden, const int64_t* ids, const float* weights, int64_t k,
                 const QuantMatrix& gate, const QuantMatrix& up, const QuantMatrix& down, int64_t n_experts,
                 int64_t intermediate, float* out, float routed_scale = 1.0f, const SharedExpert* shared = nullptr);

// Per-head linears: out[h, M, N] = x[h, M, K] @ W_h^T for h < heads, where `w` describes head 0
// (N rows of K) and head h's rows start h * head_stride bytes after it (quantized or float rows).
// Output row (h, t) starts at out + (h * M + t) * out_ld (out_ld <= 0: N, i.e. contiguous).
void head_linear(const float* x, int64_t M, const QuantMatrix& w, int64_t heads, int64_t head_stride, float* out,
                 int64_t out_ld = 0);

// MLA's rows before attention, for T tokens: q [T, H, nope + rope] (q_b_proj's output) and
// kv [T, kv_lora + rope] (kv_a_proj_with_mqa's output), rotations [T, rope / 2] as (cos, sin) pairs
// (times the YaRN magnitude). Writes q_nope [H, T, nope] (for the absorbed W_UK product), the
// rotated query rope part into columns kv_lora.. of query [H, T, kv_lora + rope], and the cache rows
// [T, kv_lora + rope] = RMSNorm(latent) * norm_w | rotated key rope. `interleaved`: rope pairs are
// (x0, x1), (x2, x3), ...; else (x_i, x_{i + rope / 2}).
struct MlaShape { int64_t T, H, nope, rope, kv_lora; };
void mla_prepare(const MlaShape& s, const float* q, const float* kv, const float* norm_w, float eps, const float* rot,
                 bool interleaved, float* q_nope, float* query, float* rows);

// One-token MLA attention over float32 cache rows [S, D] (first V values of a row: the latent):
// out[h, :V] = sum_s softmax_s(scale * q[h] . cache[s]) * cache[s, :V] for q [H, D].
void mla_decode_attention(const float* q, int64_t H, const float* cache, int64_t S, int64_t D, int64_t V, float scale,
                          float* out);
// Causal MLA attention of T tokens at positions start..start+T-1: q float32 [H, T, D] (head-major
// rows), cache rows [start + T, D] -> out [H, T, V]; token t attends rows 0..start+t. Each token's
// result equals mla_decode_attention's for it.
void mla_prefill_attention(const float* q, int64_t H, int64_t T, const float* cache, int64_t start, int64_t D,
                           int64_t V, float scale, float* out);

// One decode token of MLA in a single call, from the linears' outputs to the values: mla_prepare
// (T = 1), the absorbed W_UK product, attention over cache rows 0..position and W_UV. q and kv as
// for mla_prepare, rot: this position's rope / 2 (cos, sin) pairs; w_uk: head 0 of kv_lora rows of
// nope, w_uv: head 0 of v rows of kv_lora, heads `head_stride` bytes apart. Writes the cache row
// `position` of cache [>= position + 1, kv_lora + rope] and out [H, v] (o_proj's input).
struct HeadStack { QuantMatrix w; int64_t head_stride; };
void mla_decode(const MlaShape& s, const float* q, const float* kv, const float* norm_w, float eps, const float* rot,
                bool interleaved, const HeadStack& w_uk, const HeadStack& w_uv, float* cache, int64_t position,
                float scale, float* out);

// How the MoE router picks experts (moe_route.cpp); `n_group`/`topk_group` matter for the grouped methods.
struct RouteConfig {
    enum Method { kGreedy = 0, kGroupLimitedGreedy = 1, kNoauxTc = 2 };
    int64_t n_experts, top_k, n_group, topk_group;
    Method method;
    bool sigmoid, normalize;
};

// ids [T, top_k] and weights [T, top_k] of the experts each token's router logits [T, n_experts] choose;
// bias [n_experts] (noaux_tc only) steers the choice, not the weights.
void moe_route(const float* logits, int64_t T, const float* bias, const RouteConfig& c, int64_t* ids, float* weights);

// Rows ids[0..n) of a matrix of Q8_0 / Q4_K / Q5_K / Q6_K rows (`cols` values, `row_bytes` bytes each)
// decoded to float32 out[n, cols] (dequant_rows.cpp); has_row_decoder says which types, and
// decoded_row_bytes the bytes of a row of `cols` values (0: not whole blocks of a decodable type).
bool has_row_decoder(int ggml_type);
int64_t decoded_row_bytes(int ggml_type, int64_t cols);
void dequantize_rows(const uint8_t* data, int ggml_type, int64_t cols, int64_t row_bytes, const int64_t* ids, int64_t n,
                     float* out);

// Sum of all bytes of p[0..n), read by every pool thread in parallel (bandwidth probe).
double stream_sum(const uint8_t* p, size_t n);

}  // namespace kt
