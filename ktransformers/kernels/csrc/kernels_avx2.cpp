// AVX2 build of every kernel (any x86-64 CPU with AVX2/FMA/F16C).
//
// Only the kernels are compiled for AVX2: the headers come first, under the baseline x86-64
// target (so no inline or template code they hold is emitted with AVX2 instructions and shared
// with the rest of the module), and the table is a compile-time constant, so nothing in this
// file runs before dispatch.cpp has asked the CPU what it supports. A CPU without AVX2 then gets
// "lacks AVX2/FMA", not an illegal instruction.
#include <immintrin.h>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "dot.h"
#include "kernels.h"
#if __has_include("iq_tables.h")
#include "iq_tables.h"
#endif

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,bmi2")
#include "simd.h"

namespace kt::avx2 {
#include "kernels_isa.inc"
constexpr KernelSet kernels = make_kernels("avx2");
}  // namespace kt::avx2
#pragma GCC pop_options
