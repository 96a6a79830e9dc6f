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

// Routed experts: out[t] = sum_j weights[t, j] * down_e(silu(gate_e(x[t])) * up_e(x[t])),
// e = ids[t, j]. gate/up/down describe the whole 3-D stacks, rows = n_experts * out_features.
void moe_forward(const float* x, int64_t T, int64_t hidden, const int64_t* ids, const float* weights, int64_t k,
                 const QuantMatrix& gate, const QuantMatrix& up, const QuantMatrix& down, int64_t n_experts,
                 int64_t intermediate, float* out);

// Per-head matrix-vector products: out[h, n] = sum_k w[h, n, k] * x[h, k] for float weights
// (ggml_type F32, F16 or BF16) stored contiguously as [H, N, K], float32 x [H, K] and out [H, N].
void head_gemv(const uint8_t* w, int ggml_type, int64_t H, int64_t N, int64_t K, const float* x, float* out);

// Sum of all bytes of p[0..n), read by every pool thread in parallel (bandwidth probe).
double stream_sum(const uint8_t* p, size_t n);

}  // namespace kt
