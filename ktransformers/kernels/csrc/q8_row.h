// Activation rows quantized to int8 blocks of 32 (kt::Q8Row), in 64-byte aligned storage.
#pragma once
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <new>

#include "dot.h"

namespace kt {

struct KernelSet;

template <typename T>
class AlignedArray {
public:
    AlignedArray() = default;
    explicit AlignedArray(size_t n) {
        const size_t bytes = ((n * sizeof(T) + 63) / 64) * 64;
        data_.reset(static_cast<T*>(std::aligned_alloc(64, bytes ? bytes : 64)));
        if (!data_) throw std::bad_alloc();
    }
    T* get() const { return data_.get(); }

private:
    struct Free { void operator()(T* p) const { std::free(p); } };
    std::unique_ptr<T, Free> data_;
};

// `rows` activation rows of `n` elements (n % 32 == 0), each quantized as a Q8Row. Only rows made
// `transposed` carry Q8Row::qt (the multi-row prefill forms read it, and the one-row forms of the
// types in KernelSet::dot_reads_qt); the others' qt is null, so decode pays neither its copy nor
// its memory.
class Q8Rows {
public:
    Q8Rows() = default;
    Q8Rows(int64_t rows, int64_t n, bool transposed = false);
    Q8Row row(int64_t r) const {
        return {q_.get() + r * row_stride(), d_.get() + r * blocks_stride(), sum_.get() + r * blocks_stride(),
                sum16_.get() + r * 2 * blocks_stride(), transposed_ ? qt_.get() + r * row_stride() : nullptr};
    }
    // Quantizes row r from x[0..n): d = max|x| / 127, q = round(x / d), so |q| <= 127; and fills qt.
    void quantize(int64_t r, const float* x);
    // The same with a given table's quantizer (dispatch.cpp's timing, before a table is active).
    void quantize(int64_t r, const float* x, const KernelSet& kernels);
    int64_t n() const { return n_; }

private:
    // Strides rounded up to 64 bytes so every row stays aligned.
    int64_t row_stride() const { return (n_ + 63) / 64 * 64; }
    int64_t blocks_stride() const { return (n_ / 32 + 15) / 16 * 16; }
    int64_t n_ = 0;
    bool transposed_ = false;
    AlignedArray<int8_t> q_, qt_;
    AlignedArray<float> d_;
    AlignedArray<int32_t> sum_;
    AlignedArray<int16_t> sum16_;
};

// Quantizes `rows` rows of x (row stride n) in parallel on the pool.
Q8Rows quantize_rows(const float* x, int64_t rows, int64_t n, bool transposed = false);

}  // namespace kt
