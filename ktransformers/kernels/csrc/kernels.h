// The per-ISA kernel tables and the runtime choice between them.
#pragma once
#include "dot.h"

namespace kt {

struct KernelSet {
    const char* isa = nullptr;
    RowDot dot[kMaxGGMLType] = {};            // quantized weights x Q8Row activations
    RowDotMulti dot_multi[kMaxGGMLType] = {};  // optional multi-row forms of dot (prefill)
    // the type's dot reads Q8Row::qt: its activation rows must be quantized `transposed`, decode too
    bool dot_reads_qt[kMaxGGMLType] = {};
    // activation rows a dot_multi form shares one weight decode between (4 or kMultiRows; set for
    // every type): prefill groups tokens by it, so a group's activations stay in L1
    int multi_width[kMaxGGMLType] = {};
    ShortRowsDot short_rows[kMaxGGMLType] = {};  // optional: rows of fewer than kShortRowLimit values
    FloatRowDot float_dot[kMaxGGMLType] = {};  // F32/F16/BF16 weights x float activations
    double (*stream_sum)(const uint8_t* p, size_t n) = nullptr;
    // one activation row -> n/32 Q8Row blocks (q, d, sum, sum16)
    void (*quantize_row_q8)(const float* x, int64_t n, int8_t* q, float* d, int32_t* sum, int16_t* sum16) = nullptr;
    // RMSNorm of one float32 row (norm_f32.inc)
    void (*rms_norm_row)(const float* x, const float* w, int64_t n, float eps, float* out) = nullptr;
    // one (head group, cache block) of one-token MLA attention (attend_f32.inc)
    void (*attend_block)(const float* q, int64_t G, const float* rows, int64_t C, int64_t D, int64_t V, float scale,
                         float* scratch, float* m, float* l, float* acc) = nullptr;
};

// The tables are constants (no code runs to build them): kernels_avx2.cpp, kernels_vnni.cpp.
namespace avx2 { extern const KernelSet kernels; }
namespace vnni {
extern const KernelSet kernels;
extern const KernelSet gather_kernels;  // "avx512vnni+gather": also needs AVX512-VBMI
}  // namespace vnni

// The best table this CPU supports (AVX512-VNNI, else AVX2); nullptr when the CPU lacks AVX2.
const KernelSet* active_kernels();
// Names of the tables this CPU can run, best first.
const char* const* available_isas(int* count);
// Switch to a named table ("vnni" or "avx2"); returns false if the CPU cannot run it.
bool select_isa(const char* name);

}  // namespace kt
