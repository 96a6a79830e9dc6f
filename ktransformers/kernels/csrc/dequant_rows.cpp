// Whole rows of the common k-quant and Q8_0 blocks decoded to float32: the token embedding's
// lookups (a decode step needs one row; torch's vectorized decoders cost ~25 small ops for it).
// Plain scalar C++ in the baseline ISA, where the compiler cannot fuse a multiply and a subtract:
// the values equal the gguf package's (float32, the same operations in the same order).
#include <cstring>

#include "ops.h"
#include "thread_pool.h"

namespace kt {
namespace {

float half_to_float(const uint8_t* p) {
    uint16_t h;
    std::memcpy(&h, p, 2);
    const uint32_t sign = uint32_t(h & 0x8000) << 16, exponent = (h >> 10) & 0x1f, mantissa = h & 0x3ff;
    uint32_t bits;
    if (exponent == 0x1f) {
        bits = sign | 0x7f800000 | (mantissa << 13);
    } else if (exponent != 0) {
        bits = sign | ((exponent + 112) << 23) | (mantissa << 13);
    } else if (mantissa == 0) {
        bits = sign;
    } else {  // subnormal half: normalize
        int e = -1;
        uint32_t m = mantissa;
        do { ++e; m <<= 1; } while (!(m & 0x400));
        bits = sign | ((112 - e) << 23) | ((m & 0x3ff) << 13);
    }
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
}

// The 6-bit scale and min of sub-block j (of 8) in a Q4_K / Q5_K block's 12 scale bytes.
void scale_min(const uint8_t* s, int j, int& scale, int& min) {
    if (j < 4) {
        scale = s[j] & 63, min = s[j + 4] & 63;
    } else {
        scale = (s[j + 4] & 0xf) | ((s[j - 4] >> 6) << 4);
        min = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
    }
}

void q8_0_row(const uint8_t* b, int64_t n, float* y) {
    for (int64_t i = 0; i < n / 32; ++i, b += 34, y += 32) {
        const float d = half_to_float(b);
        for (int l = 0; l < 32; ++l) y[l] = d * float(int8_t(b[2 + l]));
    }
}

// Q4_K (144 bytes: d, dmin, 12 scale bytes, 128 nibble bytes) and Q5_K (176: the same with 32 bytes of
// fifth bits before the nibbles): sub-block 2c takes chunk c's low nibbles, 2c + 1 its high ones.
void q4_5_k_row(const uint8_t* b, int64_t n, float* y, bool fifth) {
    const int64_t block_bytes = fifth ? 176 : 144;
    for (int64_t i = 0; i < n / 256; ++i, b += block_bytes) {
        const float d = half_to_float(b), dmin = half_to_float(b + 2);
        const uint8_t* high = b + 16;
        const uint8_t* qs = b + (fifth ? 48 : 16);
        for (int sub = 0; sub < 8; ++sub, y += 32) {
            int scale, min;
            scale_min(b + 4, sub, scale, min);
            const float ds = d * float(scale), dm = dmin * float(min);
            const uint8_t* q = qs + 32 * (sub / 2);
            for (int l = 0; l < 32; ++l) {
                int v = sub % 2 ? q[l] >> 4 : q[l] & 0xf;
                if (fifth) v |= ((high[l] >> sub) & 1) << 4;
                y[l] = ds * float(v) - dm;
            }
        }
    }
}

// Q6_K (210 bytes: 128 low-nibble bytes, 64 high-bit bytes, 16 int8 scales, d): value 32r + l of
// half h takes low bits from ql[64h + l + 32 (r % 2)] (nibble r / 2) and two high bits from qh[32h + l].
void q6_k_row(const uint8_t* b, int64_t n, float* y) {
    for (int64_t i = 0; i < n / 256; ++i, b += 210) {
        const float d = half_to_float(b + 208);
        const int8_t* scales = reinterpret_cast<const int8_t*>(b + 192);
        for (int h = 0; h < 2; ++h)
            for (int r = 0; r < 4; ++r)
                for (int l = 0; l < 32; ++l) {
                    const int index = 128 * h + 32 * r + l;
                    const uint8_t low = b[64 * h + l + 32 * (r % 2)], high = b[128 + 32 * h + l];
                    const int q = (((r / 2 ? low >> 4 : low & 0xf)) | (((high >> (2 * r)) & 3) << 4)) - 32;
                    y[index] = (d * float(scales[index / 16])) * float(q);
                }
        y += 256;
    }
}

void q4_k_row(const uint8_t* b, int64_t n, float* y) { q4_5_k_row(b, n, y, false); }
void q5_k_row(const uint8_t* b, int64_t n, float* y) { q4_5_k_row(b, n, y, true); }

// The decodable types: values and bytes per block, and the row decoder.
struct RowFormat {
    int type;
    int64_t block, block_bytes;
    void (*decode)(const uint8_t* row, int64_t n, float* y);
};
constexpr RowFormat kFormats[] = {
    {8, 32, 34, q8_0_row}, {12, 256, 144, q4_k_row}, {13, 256, 176, q5_k_row}, {14, 256, 210, q6_k_row}};

const RowFormat* format_of(int type) {
    for (const RowFormat& f : kFormats)
        if (f.type == type) return &f;
    return nullptr;
}

}  // namespace

bool has_row_decoder(int type) { return format_of(type) != nullptr; }

int64_t decoded_row_bytes(int type, int64_t cols) {
    const RowFormat* f = format_of(type);
    return f && cols > 0 && cols % f->block == 0 ? cols / f->block * f->block_bytes : 0;
}

void dequantize_rows(const uint8_t* data, int type, int64_t cols, int64_t row_bytes, const int64_t* ids, int64_t n,
                     float* out) {
    const auto decode = format_of(type)->decode;
    auto row = [&](int64_t i) { decode(data + ids[i] * row_bytes, cols, out + i * cols); };
    if (n <= 4) {  // a decode step's lookup: cheaper than waking the pool
        for (int64_t i = 0; i < n; ++i) row(i);
        return;
    }
    pool().run(n, row);
}

}  // namespace kt
