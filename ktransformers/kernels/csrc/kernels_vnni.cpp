// AVX512-VNNI build of every kernel: the same sources on 256-bit vectors, with vpdpbusd doing
// the u8*s8 dot products (Ice Lake / Sapphire Rapids / Zen 4 and later). As in kernels_avx2.cpp,
// headers stay baseline and the tables are compile-time constants: no code of this file runs
// unless dispatch.cpp has found the CPU features it needs.
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
#pragma GCC target("avx2,fma,f16c,bmi2,avx512f,avx512bw,avx512vl,avx512dq,avx512vnni")
#define KT_VNNI 1
// GCC 12 flags its own 512-bit intrinsics (their "undefined" pass-through operands) as (maybe) uninitialized.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#include "simd.h"

namespace kt::vnni {
#include "kernels_isa.inc"
constexpr KernelSet kernels = make_kernels("avx512vnni");
constexpr KernelSet gather_kernels = make_gather_kernels("avx512vnni+gather");
}  // namespace kt::vnni
#pragma GCC pop_options
