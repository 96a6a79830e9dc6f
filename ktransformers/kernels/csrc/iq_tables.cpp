// Storage for the IQ codebooks (see iq_tables.h): filled at run time from the gguf package.
#include "iq_tables.h"

#include <cstring>
#include <stdexcept>

namespace kt::iq {

alignas(64) uint64_t iq1s_grid[2048];
alignas(64) uint64_t iq1s_grid_u8[2048];
alignas(64) uint64_t iq1m_grid_delta[4096];
alignas(64) uint64_t iq2xxs_grid[256];
alignas(64) uint64_t iq2xs_grid[512];
alignas(64) uint64_t iq2s_grid[1024];
alignas(64) uint32_t iq3xxs_grid[256];
alignas(64) uint32_t iq3s_grid[512];
alignas(64) uint64_t sign_pm1[128];
alignas(64) uint8_t ksigns[128];
alignas(16) int8_t iq4nl_values[16];

const TableSpec kTableSpecs[8] = {
    {"iq1s_grid", sizeof iq1s_grid},     {"iq2xxs_grid", sizeof iq2xxs_grid},
    {"iq2xs_grid", sizeof iq2xs_grid},   {"iq3xxs_grid", sizeof iq3xxs_grid},
    {"ksigns", 128},                      {"iq4nl_values", sizeof iq4nl_values},
    {"iq2s_grid", sizeof iq2s_grid},     {"iq3s_grid", sizeof iq3s_grid},
};

namespace {

// One ksigns byte -> 8 int8 of +1 (bit clear) or -1 (bit set), element i from bit i.
uint64_t expand_signs(uint8_t bits) {
    uint64_t out = 0;
    for (int i = 0; i < 8; ++i) {
        const uint64_t byte = (bits >> i) & 1 ? 0xFF : 0x01;
        out |= byte << (8 * i);
    }
    return out;
}

// The kernel-friendly forms of the IQ1 grid (see iq_tables.h).
void derive_iq1_grids() {
    for (int i = 0; i < 2048; ++i) {
        int8_t grid[8], plus1[8], low_delta[8], high_delta[8];
        std::memcpy(grid, &iq1s_grid[i], 8);
        for (int e = 0; e < 8; ++e) {
            plus1[e] = int8_t(grid[e] + 1);
            low_delta[e] = int8_t(8 * grid[e] + 1);   // delta bit clear: +1/8
            high_delta[e] = int8_t(8 * grid[e] - 1);  // delta bit set: -1/8
        }
        std::memcpy(&iq1s_grid_u8[i], plus1, 8);
        std::memcpy(&iq1m_grid_delta[i], low_delta, 8);
        std::memcpy(&iq1m_grid_delta[2048 + i], high_delta, 8);
    }
}

void* destination(int index) {
    switch (index) {
        case 0: return iq1s_grid;
        case 1: return iq2xxs_grid;
        case 2: return iq2xs_grid;
        case 3: return iq3xxs_grid;
        case 5: return iq4nl_values;
        case 6: return iq2s_grid;
        case 7: return iq3s_grid;
        default: return nullptr;  // ksigns is stored in its expanded form
    }
}

}  // namespace
}  // namespace kt::iq

void kt_init_iq_tables(const std::string& name, const uint8_t* data, size_t nbytes) {
    using namespace kt::iq;
    for (int i = 0; i < 8; ++i) {
        if (name != kTableSpecs[i].name) continue;
        if (nbytes != kTableSpecs[i].nbytes)
            throw std::invalid_argument("IQ table '" + name + "': expected " +
                                        std::to_string(kTableSpecs[i].nbytes) + " bytes, got " +
                                        std::to_string(nbytes));
        if (void* dst = destination(i)) {
            std::memcpy(dst, data, nbytes);
            if (dst == iq1s_grid) derive_iq1_grids();
        } else {
            std::memcpy(ksigns, data, 128);
            for (int s = 0; s < 128; ++s) sign_pm1[s] = expand_signs(data[s]);
        }
        return;
    }
    throw std::invalid_argument("IQ table '" + name + "': unknown table name");
}
