// AVX512-VNNI build of every kernel: the same sources on 256-bit vectors, with vpdpbusd doing
// the u8*s8 dot products (Ice Lake / Sapphire Rapids / Zen 4 and later).
#pragma GCC target("avx2,fma,f16c,bmi2,avx512f,avx512bw,avx512vl,avx512dq,avx512vnni")
#define KT_VNNI 1
// GCC 12 flags its own 512-bit intrinsics (their "undefined" pass-through operands) as (maybe) uninitialized.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#include "simd.h"
#include "kernels.h"
#if __has_include("iq_tables.h")
#include "iq_tables.h"
#endif

namespace kt::vnni {
#include "kernels_isa.inc"
}  // namespace kt::vnni
