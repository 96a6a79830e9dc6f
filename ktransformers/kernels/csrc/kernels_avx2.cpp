// AVX2 build of every kernel (any x86-64 CPU with AVX2/FMA/F16C).
#pragma GCC target("avx2,fma,f16c,bmi2")
#include "simd.h"
#include "kernels.h"
#if __has_include("iq_tables.h")
#include "iq_tables.h"
#endif

namespace kt::avx2 {
#include "kernels_isa.inc"
}  // namespace kt::avx2
