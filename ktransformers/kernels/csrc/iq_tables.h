// Codebooks of the IQ quant formats (grids, sign patterns, non-linear 4-bit values).
// They are never pasted into this source: ktransformers/kernels/iq_tables.py reads them from the
// installed gguf package at import time and hands them over through kt_init_iq_tables, which
// also derives the SIMD-friendly forms below. Kernels read them as plain arrays.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>

namespace kt::iq {

// Each uint64 is one grid entry of 8 bytes, loadable into a vector lane in one go.
alignas(64) extern uint64_t iq1s_grid[2048];   // int8 values in {-1, 0, 1} (IQ1_S and IQ1_M)
// Derived from iq1s_grid when it is stored: IQ1_S's grid + 1 (uint8 in {0, 1, 2}) and
// IQ1_M's grid with its delta folded in: entry (delta_bit << 11 | i) = 8 * grid[i] + (bit ? -1 : +1).
alignas(64) extern uint64_t iq1s_grid_u8[2048];
alignas(64) extern uint64_t iq1m_grid_delta[4096];
alignas(64) extern uint64_t iq2xxs_grid[256];  // uint8 magnitudes in {8, 25, 43}
alignas(64) extern uint64_t iq2xs_grid[512];   // uint8 magnitudes in {8, 25, 43}
alignas(64) extern uint64_t iq2s_grid[1024];   // uint8 magnitudes in {8, 25, 43}
alignas(64) extern uint32_t iq3xxs_grid[256];  // 4 uint8 magnitudes in {4, ..., 62}
alignas(64) extern uint32_t iq3s_grid[512];    // 4 uint8 magnitudes in {1, 3, ..., 15}
// ksigns[i] (7 sign bits + parity bit) expanded to 8 int8 of +1 / -1, for _mm256_sign_epi8.
alignas(64) extern uint64_t sign_pm1[128];
alignas(64) extern uint8_t ksigns[128];        // the raw ksigns bytes (vpermi2b lookups)
alignas(16) extern int8_t iq4nl_values[16];    // IQ4_NL / IQ4_XS non-linear values

// Names and byte sizes of the tables kt_init_iq_tables accepts.
struct TableSpec { const char* name; size_t nbytes; };
extern const TableSpec kTableSpecs[8];

}  // namespace kt::iq

// Stores one table. name is one of kt::iq::kTableSpecs; a wrong name or byte count throws
// std::invalid_argument naming the table and the reason (nothing is written then).
void kt_init_iq_tables(const std::string& name, const uint8_t* data, size_t nbytes);
