// Small SIMD helpers shared by the per-type kernels. Included by kernels_avx2.cpp (AVX2 build)
// and kernels_vnni.cpp (after `#define KT_VNNI 1`: AVX512-VNNI on 256-bit vectors), each under
// its own `#pragma GCC target`, so every helper is static and compiled once per ISA.
#pragma once
#include <immintrin.h>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "dot.h"

// acc + per-32-bit-lane sums of the 4 adjacent products a_u8[i] * b_s8[i].
// AVX2 path: _mm256_maddubs_epi16 first adds PAIRS of products and saturates them to int16.
// Exact guarantee: the result is exact whenever |a[2i]*b[2i] + a[2i+1]*b[2i+1]| <= 32767 for
// every pair, e.g. a <= 128 and |b| <= 127 (2*128*127 = 32512), or a <= 255 and |b| <= 64.
// The VNNI path (vpdpbusd) has no intermediate saturation.
static inline __m256i kt_dot_u8s8(__m256i acc, __m256i a_u8, __m256i b_s8) {
#if defined(KT_VNNI)
    return _mm256_dpbusd_epi32(acc, a_u8, b_s8);
#else
    const __m256i pairs = _mm256_maddubs_epi16(a_u8, b_s8);
    return _mm256_add_epi32(acc, _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)));
#endif
}

// acc + per-32-bit-lane sums of 4 adjacent signed products a_s8[i] * b_s8[i], by the sign trick
// (|a| times b carrying a's sign). a may be any int8 including -128 (|a| = 128 read as u8);
// b must satisfy |b| <= 127 (true for Q8Row activations), which keeps every pair sum within
// 2*128*127 = 32512 < 32768, so the AVX2 path is exact too. Pass the weight as a and the
// activation as b.
static inline __m256i kt_dot_s8s8(__m256i acc, __m256i a_s8, __m256i b_s8) {
    return kt_dot_u8s8(acc, _mm256_sign_epi8(a_s8, a_s8), _mm256_sign_epi8(b_s8, a_s8));
}

static inline float kt_hsum_f32(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

static inline int32_t kt_hsum_i32(__m256i v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(1, 0, 3, 2)));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(2, 3, 0, 1)));
    return _mm_cvtsi128_si32(s);
}

static inline float kt_fp16_to_fp32(uint16_t h) { return _cvtsh_ss(h); }

static inline float kt_bf16_to_fp32(uint16_t h) {
    const uint32_t bits = uint32_t(h) << 16;
    float f;
    std::memcpy(&f, &bits, sizeof f);
    return f;
}

// 8 fp16 values -> 8 floats.
static inline __m256 kt_load_fp16x8(const void* p) {
    return _mm256_cvtph_ps(_mm_loadu_si128(static_cast<const __m128i*>(p)));
}

// exp of 8 floats to ~1 ulp (Cephes' single-precision polynomial on x - n ln2, times 2^n); exactly 0
// below -87.3 and for -inf, so softmax lanes padded with -inf add nothing.
static inline __m256 kt_exp_ps(__m256 x) {
    const __m256 lowest = _mm256_set1_ps(-87.3f);
    const __m256 live = _mm256_cmp_ps(x, lowest, _CMP_GE_OQ);
    x = _mm256_min_ps(_mm256_max_ps(x, lowest), _mm256_set1_ps(88.3f));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    x = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);  // ln 2 in two parts: x - n ln2 stays exact
    x = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), x);
    __m256 y = _mm256_set1_ps(1.9875691500e-4f);
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
    y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
    const __m256i scale = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_and_ps(_mm256_mul_ps(y, _mm256_castsi256_ps(scale)), live);
}

// Low 4 bits of 32 bytes (and the high 4 bits) as 32 bytes each, for the packed 4-bit formats.
static inline __m256i kt_low_nibbles(__m256i v) { return _mm256_and_si256(v, _mm256_set1_epi8(0x0F)); }
static inline __m256i kt_high_nibbles(__m256i v) {
    return _mm256_and_si256(_mm256_srli_epi16(v, 4), _mm256_set1_epi8(0x0F));
}

// v[c] lane k <- v[k] lane c: an 8x8 transpose of dwords (unpacks within 128-bit halves, then a
// swap of halves), the order Q8Row::qt holds the activations in.
static inline void kt_transpose8x8_epi32(__m256i v[8]) {
    __m256i t[8], u[8];
    for (int i = 0; i < 4; ++i) {
        t[2 * i] = _mm256_unpacklo_epi32(v[2 * i], v[2 * i + 1]);
        t[2 * i + 1] = _mm256_unpackhi_epi32(v[2 * i], v[2 * i + 1]);
    }
    for (int i = 0; i < 2; ++i) {
        u[4 * i] = _mm256_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
        u[4 * i + 1] = _mm256_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
        u[4 * i + 2] = _mm256_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
        u[4 * i + 3] = _mm256_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
    }
    for (int c = 0; c < 4; ++c) {
        v[c] = _mm256_permute2x128_si256(u[c], u[c + 4], 0x20);
        v[c + 4] = _mm256_permute2x128_si256(u[c], u[c + 4], 0x31);
    }
}

// The body of a RowDotMulti for a kernel template rows<NX> written for NX <= 4: nx (<= kMultiRows)
// activation rows in groups of 4, then the rest.
#define KT_MULTI_IN_FOURS(rows, w, x, nx, out, n)                          \
    do {                                                                   \
        int left_ = (nx);                                                  \
        const Q8Row* x_ = (x);                                             \
        float* out_ = (out);                                               \
        for (; left_ > 4; left_ -= 4, x_ += 4, out_ += 4) rows<4>(w, x_, out_, n); \
        switch (left_) {                                                   \
            case 1: rows<1>(w, x_, out_, n); break;                       \
            case 2: rows<2>(w, x_, out_, n); break;                       \
            case 3: rows<3>(w, x_, out_, n); break;                       \
            default: rows<4>(w, x_, out_, n); break;                      \
        }                                                                  \
    } while (0)

// The same for kernels whose rows<NX> also take NX up to 8 (where 32 vector registers hold 8
// rows' accumulators: the VNNI build): one decoded weight block serves all nx <= kMultiRows rows.
#define KT_MULTI_UP_TO_8(rows, w, x, nx, out, n)           \
    do {                                                   \
        switch (nx) {                                      \
            case 1: rows<1>(w, x, out, n); break;          \
            case 2: rows<2>(w, x, out, n); break;          \
            case 3: rows<3>(w, x, out, n); break;          \
            case 4: rows<4>(w, x, out, n); break;          \
            case 5: rows<5>(w, x, out, n); break;          \
            case 6: rows<6>(w, x, out, n); break;          \
            case 7: rows<7>(w, x, out, n); break;          \
            default: rows<8>(w, x, out, n); break;         \
        }                                                  \
    } while (0)
