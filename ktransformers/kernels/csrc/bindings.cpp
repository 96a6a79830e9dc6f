// pybind11 module ktransformers.kernels._cpu. Arguments arrive as Python buffers (numpy views of
// torch tensors, zero-copy); every size and type is checked here so bad input raises ValueError
// instead of reading out of bounds. Compute releases the GIL.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <optional>
#include <string>
#include <type_traits>
#include <vector>

#include "kernels.h"
#include "ops.h"
#include "q8_row.h"
#include "thread_pool.h"
#if __has_include("iq_tables.h")
#include "iq_tables.h"
#define KT_HAVE_IQ_TABLES 1
#endif

namespace py = pybind11;

namespace {

// Buffer format codes accepted for T ('l' and 'q' are both int64 on LP64 Linux).
template <typename T>
bool format_matches(std::string f) {
    if (!f.empty() && (f[0] == '<' || f[0] == '=' || f[0] == '@')) f.erase(0, 1);
    if (std::is_same_v<T, int64_t>) return f == "q" || f == "l";
    return f == py::format_descriptor<T>::format();
}

template <typename T>
T* buffer_ptr(const py::buffer& b, const char* name, int64_t min_elements, bool writable = false) {
    const py::buffer_info info = b.request(writable);
    if (info.itemsize != sizeof(T) || !format_matches<T>(info.format))
        throw py::value_error(std::string(name) + ": expected " + py::format_descriptor<T>::format() +
                              " elements, got format '" + info.format + "'");
    py::ssize_t expected_stride = info.itemsize;
    for (py::ssize_t d = info.ndim - 1; d >= 0; --d) {
        if (info.shape[d] > 1 && info.strides[d] != expected_stride)
            throw py::value_error(std::string(name) + ": must be C-contiguous");
        expected_stride *= info.shape[d];
    }
    if (info.size < min_elements)
        throw py::value_error(std::string(name) + ": has " + std::to_string(info.size) + " elements, needs " +
                              std::to_string(min_elements));
    return static_cast<T*>(info.ptr);
}

const kt::KernelSet& kernels_or_throw() {
    const kt::KernelSet* k = kt::active_kernels();
    if (!k) throw std::runtime_error("this CPU lacks AVX2/FMA: the native cpu_quant kernels cannot run");
    return *k;
}

kt::QuantMatrix matrix(const py::buffer& raw, const char* name, int type, int64_t rows, int64_t cols, int64_t row_bytes) {
    kernels_or_throw();
    if (!kt::has_kernel(type))
        throw py::value_error(std::string(name) + ": no native kernel for ggml type " + std::to_string(type));
    if (rows <= 0 || cols <= 0 || row_bytes <= 0) throw py::value_error(std::string(name) + ": empty matrix");
    if (!kt::is_float_type(type) && cols % 32)
        throw py::value_error(std::string(name) + ": quantized rows need a multiple of 32 elements, got " + std::to_string(cols));
    return {buffer_ptr<uint8_t>(raw, name, rows * row_bytes), type, rows, cols, row_bytes};
}

void quant_linear(py::buffer x, int64_t M, py::buffer w, int type, int64_t N, int64_t K, int64_t row_bytes, py::buffer out) {
    const kt::QuantMatrix wm = matrix(w, "weight", type, N, K, row_bytes);
    const float* xp = buffer_ptr<float>(x, "x", M * K);
    float* op = buffer_ptr<float>(out, "out", M * N, true);
    if (M <= 0) return;
    py::gil_scoped_release release;
    kt::quant_linear(xp, M, wm, op);
}

// matrices: (raw, type, rows, cols, row_bytes) tuples sharing cols; outs: one float32 [M, rows] buffer each.
void linear_group(py::buffer x, int64_t M, py::list matrices, py::list outs) {
    if (M != 1) throw py::value_error("linear_group: one decode row only, got " + std::to_string(M));
    if (matrices.size() == 0 || matrices.size() != outs.size())
        throw py::value_error("linear_group: need one output per matrix, and at least one matrix");
    std::vector<kt::QuantMatrix> ws;
    std::vector<float*> out_ptrs;
    for (size_t i = 0; i < matrices.size(); ++i) {
        const py::tuple t = matrices[i].cast<py::tuple>();
        if (t.size() != 5) throw py::value_error("linear_group: a matrix is (raw, type, rows, cols, row_bytes)");
        ws.push_back(matrix(t[0].cast<py::buffer>(), "weight", t[1].cast<int>(), t[2].cast<int64_t>(),
                            t[3].cast<int64_t>(), t[4].cast<int64_t>()));
        if (ws.back().cols != ws[0].cols) throw py::value_error("linear_group: the matrices must share their column count");
        out_ptrs.push_back(buffer_ptr<float>(outs[i].cast<py::buffer>(), "out", M * ws.back().rows, true));
    }
    const float* xp = buffer_ptr<float>(x, "x", M * ws[0].cols);
    py::gil_scoped_release release;
    kt::linear_group(xp, ws.data(), out_ptrs.data(), int(ws.size()));
}

void moe_forward(py::buffer x, int64_t T, int64_t H, py::buffer ids, py::buffer weights, int64_t k, py::buffer gate,
                 int gate_type, int64_t gate_row_bytes, py::buffer up, int up_type, int64_t up_row_bytes, py::buffer down,
                 int down_type, int64_t down_row_bytes, int64_t n_experts, int64_t I, py::buffer out, float routed_scale,
                 py::object shared) {
    const kt::QuantMatrix g = matrix(gate, "gate", gate_type, n_experts * I, H, gate_row_bytes);
    const kt::QuantMatrix u = matrix(up, "up", up_type, n_experts * I, H, up_row_bytes);
    const kt::QuantMatrix d = matrix(down, "down", down_type, n_experts * H, I, down_row_bytes);
    const float* xp = buffer_ptr<float>(x, "x", T * H);
    const int64_t* idp = buffer_ptr<int64_t>(ids, "topk_ids", T * k);
    const float* wp = buffer_ptr<float>(weights, "topk_weights", T * k);
    float* op = buffer_ptr<float>(out, "out", T * H, true);
    for (int64_t p = 0; p < T * k; ++p)
        if (idp[p] < 0 || idp[p] >= n_experts)
            throw py::value_error("topk_ids: expert id " + std::to_string(idp[p]) + " at position " + std::to_string(p) +
                                  " is outside [0, " + std::to_string(n_experts) + ")");
    // shared: None, or (gate, type, row_bytes, up, type, row_bytes, down, type, row_bytes, I) of a shared expert
    std::optional<kt::SharedExpert> se;
    if (!shared.is_none()) {
        const py::tuple t = shared.cast<py::tuple>();
        if (t.size() != 10) throw py::value_error("moe_forward: shared must be a 10-tuple");
        const int64_t IS = t[9].cast<int64_t>();
        se = kt::SharedExpert{
            matrix(t[0].cast<py::buffer>(), "shared gate", t[1].cast<int>(), IS, H, t[2].cast<int64_t>()),
            matrix(t[3].cast<py::buffer>(), "shared up", t[4].cast<int>(), IS, H, t[5].cast<int64_t>()),
            matrix(t[6].cast<py::buffer>(), "shared down", t[7].cast<int>(), H, IS, t[8].cast<int64_t>()), IS};
    }
    if (T <= 0) return;
    py::gil_scoped_release release;
    kt::moe_forward(xp, T, H, idp, wp, k, g, u, d, n_experts, I, op, routed_scale, se ? &*se : nullptr);
}

// A stack of per-head matrices: head h reads N rows of K at byte offset h * head_stride of w.
kt::HeadStack head_stack(const py::buffer& w, const char* name, int type, int64_t heads, int64_t N, int64_t K,
                         int64_t row_bytes, int64_t head_stride) {
    if (heads <= 0 || row_bytes <= 0 || head_stride < N * row_bytes || head_stride % row_bytes)
        throw py::value_error(std::string(name) + ": " + std::to_string(heads) + " heads must start whole rows apart "
                              "without overlapping: head_stride " + std::to_string(head_stride) + " bytes, a head holds " +
                              std::to_string(N) + " rows of " + std::to_string(row_bytes) + " bytes");
    kt::QuantMatrix wm = matrix(w, name, type, (heads - 1) * head_stride / row_bytes + N, K, row_bytes);
    wm.rows = N;  // head 0; the others follow head_stride bytes apart
    return {wm, head_stride};
}

// Per-head linears; output row (h, t) starts at out + (h * M + t) * out_ld (out_ld >= N; N: contiguous).
void head_linear(py::buffer x, int64_t M, py::buffer w, int type, int64_t heads, int64_t N, int64_t K, int64_t row_bytes,
                 int64_t head_stride, py::buffer out, int64_t out_ld) {
    const kt::HeadStack ws = head_stack(w, "head_linear weight", type, heads, N, K, row_bytes, head_stride);
    if (out_ld < N) throw py::value_error("head_linear: out_ld " + std::to_string(out_ld) + " is shorter than a row");
    const float* xp = buffer_ptr<float>(x, "x", heads * M * K);
    float* op = buffer_ptr<float>(out, "out", M <= 0 ? 0 : (heads * M - 1) * out_ld + N, true);
    if (M <= 0) return;
    py::gil_scoped_release release;
    kt::head_linear(xp, M, ws.w, heads, ws.head_stride, op, out_ld);
}

void mla_prepare(py::buffer q, py::buffer kv, int64_t T, int64_t H, int64_t nope, int64_t rope, int64_t kv_lora,
                 py::buffer norm_w, float eps, py::buffer rot, bool interleaved, py::buffer q_nope, py::buffer query,
                 py::buffer rows) {
    kernels_or_throw();
    if (T < 0 || H <= 0 || nope < 0 || rope < 0 || rope % 2 || kv_lora <= 0)
        throw py::value_error("mla_prepare: need T >= 0, H > 0, nope >= 0, an even rope >= 0 and kv_lora > 0");
    const kt::MlaShape s{T, H, nope, rope, kv_lora};
    const float* qp = buffer_ptr<float>(q, "q", T * H * (nope + rope));
    const float* kvp = buffer_ptr<float>(kv, "kv", T * (kv_lora + rope));
    const float* wp = buffer_ptr<float>(norm_w, "norm_weight", kv_lora);
    const float* rp = buffer_ptr<float>(rot, "rotations", T * rope);
    float* nope_out = buffer_ptr<float>(q_nope, "q_nope", H * T * nope, true);
    float* query_out = buffer_ptr<float>(query, "query", H * T * (kv_lora + rope), true);
    float* rows_out = buffer_ptr<float>(rows, "rows", T * (kv_lora + rope), true);
    py::gil_scoped_release release;
    kt::mla_prepare(s, qp, kvp, wp, eps, rp, interleaved, nope_out, query_out, rows_out);
}

// w_uk / w_uv: (raw, ggml type, rows, cols, row_bytes, head_stride) of H per-head matrices.
kt::HeadStack head_stack(const py::tuple& t, const char* name, int64_t heads, int64_t rows, int64_t cols) {
    if (t.size() != 6) throw py::value_error(std::string(name) + ": need (raw, type, rows, cols, row_bytes, head_stride)");
    if (t[2].cast<int64_t>() != rows || t[3].cast<int64_t>() != cols)
        throw py::value_error(std::string(name) + ": need " + std::to_string(rows) + " rows of " + std::to_string(cols) +
                              " per head, got " + std::to_string(t[2].cast<int64_t>()) + " of " +
                              std::to_string(t[3].cast<int64_t>()));
    return head_stack(t[0].cast<py::buffer>(), name, t[1].cast<int>(), heads, rows, cols, t[4].cast<int64_t>(),
                      t[5].cast<int64_t>());
}

// rope_table: (cos, sin) pairs [positions, rope / 2]; cache: [positions >= position + 1, kv_lora + rope].
void mla_decode(py::buffer q, py::buffer kv, int64_t H, int64_t nope, int64_t rope, int64_t kv_lora, py::buffer norm_w,
                float eps, py::buffer rope_table, bool interleaved, py::tuple w_uk, py::tuple w_uv, int64_t v,
                py::buffer cache, int64_t position, float scale, py::buffer out) {
    kernels_or_throw();
    if (H <= 0 || nope <= 0 || rope < 0 || rope % 2 || kv_lora <= 0 || v <= 0 || position < 0)
        throw py::value_error("mla_decode: need H, nope, kv_lora, v > 0, an even rope >= 0 and position >= 0");
    const kt::MlaShape s{1, H, nope, rope, kv_lora};
    const kt::HeadStack uk = head_stack(w_uk, "w_uk", H, kv_lora, nope), uv = head_stack(w_uv, "w_uv", H, v, kv_lora);
    const float* qp = buffer_ptr<float>(q, "q", H * (nope + rope));
    const float* kvp = buffer_ptr<float>(kv, "kv", kv_lora + rope);
    const float* wp = buffer_ptr<float>(norm_w, "norm_weight", kv_lora);
    const float* rp = buffer_ptr<float>(rope_table, "rope_table", (position + 1) * rope) + position * rope;
    float* cp = buffer_ptr<float>(cache, "cache", (position + 1) * (kv_lora + rope), true);
    float* op = buffer_ptr<float>(out, "out", H * v, true);
    py::gil_scoped_release release;
    kt::mla_decode(s, qp, kvp, wp, eps, rp, interleaved, uk, uv, cp, position, scale, op);
}

// Embedding lookups: rows ids of a [rows, cols] matrix of raw blocks -> out [n, cols] float32.
void dequantize_rows(py::buffer raw, int type, int64_t rows, int64_t cols, int64_t row_bytes, py::buffer ids,
                     py::buffer out) {
    if (!kt::has_row_decoder(type)) throw py::value_error("dequantize_rows: no native decoder for ggml type " + std::to_string(type));
    if (rows <= 0 || row_bytes != kt::decoded_row_bytes(type, cols) || row_bytes == 0)
        throw py::value_error("dequantize_rows: " + std::to_string(rows) + " rows of " + std::to_string(cols) +
                              " values cannot be rows of " + std::to_string(row_bytes) + " bytes of type " + std::to_string(type));
    const uint8_t* data = buffer_ptr<uint8_t>(raw, "raw", rows * row_bytes);
    const py::buffer_info info = ids.request();
    const int64_t n = info.size;
    const int64_t* idp = buffer_ptr<int64_t>(ids, "ids", n);
    for (int64_t i = 0; i < n; ++i)
        if (idp[i] < 0 || idp[i] >= rows)
            throw py::value_error("dequantize_rows: row id " + std::to_string(idp[i]) + " outside [0, " + std::to_string(rows) + ")");
    float* op = buffer_ptr<float>(out, "out", n * cols, true);
    py::gil_scoped_release release;
    kt::dequantize_rows(data, type, cols, row_bytes, idp, n, op);
}

void mla_decode_attention(py::buffer q, int64_t H, py::buffer cache, int64_t S, int64_t D, int64_t V, float scale,
                          py::buffer out) {
    kernels_or_throw();
    if (H <= 0 || S <= 0 || D <= 0 || V <= 0 || V > D)
        throw py::value_error("mla_decode_attention: need H, S, D > 0 and 0 < V <= D, got H=" + std::to_string(H) +
                              " S=" + std::to_string(S) + " D=" + std::to_string(D) + " V=" + std::to_string(V));
    const float* qp = buffer_ptr<float>(q, "q", H * D);
    const float* cp = buffer_ptr<float>(cache, "cache", S * D);
    float* op = buffer_ptr<float>(out, "out", H * V, true);
    py::gil_scoped_release release;
    kt::mla_decode_attention(qp, H, cp, S, D, V, scale, op);
}

void mla_prefill_attention(py::buffer q, int64_t H, int64_t T, py::buffer cache, int64_t start, int64_t D, int64_t V,
                           float scale, py::buffer out) {
    kernels_or_throw();
    if (H <= 0 || T <= 0 || start < 0 || D <= 0 || V <= 0 || V > D)
        throw py::value_error("mla_prefill_attention: need H, T, D > 0, start >= 0 and 0 < V <= D, got H=" +
                              std::to_string(H) + " T=" + std::to_string(T) + " start=" + std::to_string(start) +
                              " D=" + std::to_string(D) + " V=" + std::to_string(V));
    const float* qp = buffer_ptr<float>(q, "q", H * T * D);
    const float* cp = buffer_ptr<float>(cache, "cache", (start + T) * D);
    float* op = buffer_ptr<float>(out, "out", H * T * V, true);
    py::gil_scoped_release release;
    kt::mla_prefill_attention(qp, H, T, cp, start, D, V, scale, op);
}

// out[r] = RMSNorm(x[r]) * w for M rows of n floats; rows in parallel on the pool when there are many.
void rms_norm(py::buffer x, int64_t M, int64_t n, py::buffer w, float eps, py::buffer out) {
    const kt::KernelSet& k = kernels_or_throw();
    if (M < 0 || n <= 0) throw py::value_error("rms_norm: need M >= 0 rows of n > 0 values");
    const float* xp = buffer_ptr<float>(x, "x", M * n);
    const float* wp = buffer_ptr<float>(w, "weight", n);
    float* op = buffer_ptr<float>(out, "out", M * n, true);
    py::gil_scoped_release release;
    if (M * n < (1 << 16)) {  // a decode row: waking the pool would cost more than the row
        for (int64_t r = 0; r < M; ++r) k.rms_norm_row(xp + r * n, wp, n, eps, op + r * n);
        return;
    }
    kt::pool().run(M, [&](int64_t r) { k.rms_norm_row(xp + r * n, wp, n, eps, op + r * n); });
}

void moe_route(py::buffer logits, int64_t T, int64_t E, py::object bias, int method, bool sigmoid, int64_t n_group,
               int64_t topk_group, int64_t top_k, bool normalize, py::buffer ids, py::buffer weights) {
    if (T < 0 || E <= 0 || top_k <= 0 || method < 0 || method > 2)
        throw py::value_error("moe_route: need T >= 0, experts > 0, top_k > 0 and method 0..2");
    const bool grouped = method != kt::RouteConfig::kGreedy;
    if (grouped && (n_group <= 0 || E % n_group || topk_group <= 0 || topk_group > n_group ||
                    top_k > topk_group * (E / n_group)))
        throw py::value_error("moe_route: " + std::to_string(E) + " experts cannot form " + std::to_string(n_group) +
                              " groups of which " + std::to_string(topk_group) + " hold " + std::to_string(top_k) +
                              " picks");
    if (top_k > E) throw py::value_error("moe_route: top_k exceeds the number of experts");
    const float* lp = buffer_ptr<float>(logits, "logits", T * E);
    const float* bp = nullptr;
    if (method == kt::RouteConfig::kNoauxTc) {
        if (bias.is_none()) throw py::value_error("moe_route: noaux_tc needs the routing bias");
        bp = buffer_ptr<float>(bias.cast<py::buffer>(), "bias", E);
    }
    int64_t* ip = buffer_ptr<int64_t>(ids, "ids", T * top_k, true);
    float* wp = buffer_ptr<float>(weights, "weights", T * top_k, true);
    const kt::RouteConfig c{E, top_k, grouped ? n_group : 1, grouped ? topk_group : 1,
                            kt::RouteConfig::Method(method), sigmoid, normalize};
    py::gil_scoped_release release;
    kt::moe_route(lp, T, bp, c, ip, wp);
}

// The Q8Row of one float row (q, d, sum, sum16), for tests that rebuild the exact int8 reference.
py::tuple quantize_q8(py::buffer x, int64_t n) {
    if (n <= 0 || n % 32) throw py::value_error("quantize_q8: n must be a positive multiple of 32");
    const float* xp = buffer_ptr<float>(x, "x", n);
    kernels_or_throw();
    kt::Q8Rows rows(1, n);
    rows.quantize(0, xp);
    const kt::Q8Row r = rows.row(0);
    return py::make_tuple(py::bytes(reinterpret_cast<const char*>(r.q), n),
                          std::vector<float>(r.d, r.d + n / 32), std::vector<int32_t>(r.sum, r.sum + n / 32),
                          std::vector<int16_t>(r.sum16, r.sum16 + n / 16));
}

std::vector<int> supported_types() {
    std::vector<int> types;
    for (int t = 0; t < kt::kMaxGGMLType; ++t)
        if (kt::has_kernel(t)) types.push_back(t);
    return types;
}

}  // namespace

PYBIND11_MODULE(_cpu, m) {
    m.doc() = "Native CPU kernels for GGUF-quantized linears and routed experts";
    m.def("quant_linear", &quant_linear, "out[M,N] = x[M,K] @ dequant(W)[N,K]^T");
    m.def("moe_forward", &moe_forward, "fused routed experts (and a shared expert)", py::arg("x"), py::arg("T"),
          py::arg("H"), py::arg("ids"), py::arg("weights"), py::arg("k"), py::arg("gate"), py::arg("gate_type"),
          py::arg("gate_row_bytes"), py::arg("up"), py::arg("up_type"), py::arg("up_row_bytes"), py::arg("down"),
          py::arg("down_type"), py::arg("down_row_bytes"), py::arg("n_experts"), py::arg("I"), py::arg("out"),
          py::arg("routed_scale") = 1.0f, py::arg("shared") = py::none());
    m.def("linear_group", &linear_group, "one decode row through several matrices sharing its width, in one pass");
    m.def("head_linear", &head_linear, "out[h, M, N] = x[h, M, K] @ W_h^T for a stack of per-head matrices");
    m.def("mla_prepare", &mla_prepare, "MLA's split, latent norm, rope and head-major query layout before W_UK");
    m.def("dequantize_rows", &dequantize_rows, "rows ids of Q8_0/Q4_K/Q5_K/Q6_K blocks -> float32 (embedding lookups)");
    m.def("row_decoder_types", [] {
        std::vector<int> types;
        for (int t = 0; t < kt::kMaxGGMLType; ++t)
            if (kt::has_row_decoder(t)) types.push_back(t);
        return types;
    });
    m.def("mla_decode", &mla_decode, "one decode token of MLA from q_b/kv_a outputs to W_UV's (cache row written)");
    m.def("mla_decode_attention", &mla_decode_attention, "one-token MLA attention over float32 latent cache rows");
    m.def("mla_prefill_attention", &mla_prefill_attention, "a prefill chunk's causal MLA attention over float32 latent cache rows");
    m.def("moe_route", &moe_route, "the MoE router's experts and weights from its logits");
    m.def("rms_norm", &rms_norm, "out = RMSNorm(x) * weight, row by row, float32");
    m.def("quantize_q8", &quantize_q8, "one float row -> (int8 bytes, block scales, block sums)");
    m.def("supported_types", &supported_types, "ggml type ids with a kernel in the active ISA");
    m.def("isa", [] { const kt::KernelSet* k = kt::active_kernels(); return std::string(k ? k->isa : ""); });
    m.def("available_isas", [] {
        int n = 0;
        const char* const* names = kt::available_isas(&n);
        return std::vector<std::string>(names, names + n);
    });
    m.def("select_isa", [](const std::string& name) {
        if (!kt::select_isa(name.c_str())) throw py::value_error("ISA '" + name + "' is not available on this CPU");
    });
    m.def("set_num_threads", [](int n) {
        if (n < 1) throw py::value_error("set_num_threads: need at least 1 thread, got " + std::to_string(n));
        py::gil_scoped_release release;
        kt::set_num_threads(n);
    });
    m.def("num_threads", &kt::num_threads);
    m.def("stream_sum", [](py::buffer b) {
        const py::buffer_info info = b.request();
        const uint8_t* p = buffer_ptr<uint8_t>(b, "data", 0);
        kernels_or_throw();
        py::gil_scoped_release release;
        return kt::stream_sum(p, size_t(info.size));
    }, "sum of all bytes, read by every pool thread (memory bandwidth probe)");
#ifdef KT_HAVE_IQ_TABLES
    m.def("init_iq_table", [](const std::string& name, py::bytes data) {
        const std::string s = data;
        kt_init_iq_tables(name, reinterpret_cast<const uint8_t*>(s.data()), s.size());
    }, "install one IQ codebook/sign table taken from the gguf package");
    m.attr("has_iq_tables") = true;
#else
    m.attr("has_iq_tables") = false;
#endif
}
