// Picks the kernel table for this CPU once; KT_CPU_ISA=<name> (or select_isa) forces another.
//
// Tables, best first: "avx512vnni+gather" and "avx512vnni" (the same VNNI kernels, codebook
// lookups of some low-bit types by gather instructions or by scalar loads) and "avx2". Whether
// gathers pay off depends on the core (fast on Intel server cores, slow on AMD Zen 4 and on Intel
// cores with the Downfall microcode fix), so the default VNNI table is the faster of the two in
// a short timing of the IQ1_S kernel on cache-resident data.
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "kernels.h"
#include "q8_row.h"

namespace kt {
namespace {

// Seconds for one pass of `dot` over cache-resident rows.
double time_row_dot(RowDot dot, const std::vector<uint8_t>& rows, int64_t row_bytes, int64_t n, const Q8Row& x) {
    static volatile float sink = 0;
    const auto start = std::chrono::steady_clock::now();
    float s = 0;
    for (size_t off = 0; off + row_bytes <= rows.size(); off += row_bytes) s += dot(rows.data() + off, x, n);
    sink = sink + s;
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

// True when the gather form of the IQ1_S kernel beats the scalar-load form on this core.
bool gathers_are_faster(const KernelSet& plain, const KernelSet& gather) {
    constexpr int kIQ1_S = 19;
    constexpr int64_t n = 7168, row_bytes = n / 256 * 50, n_rows = 48;  // ~67 KB: stays in L2
    if (!plain.dot[kIQ1_S] || !gather.dot[kIQ1_S] || plain.dot[kIQ1_S] == gather.dot[kIQ1_S]) return false;
    std::vector<uint8_t> rows(n_rows * row_bytes);
    uint32_t state = 12345;
    for (size_t i = 0; i < rows.size(); ++i) {
        state = state * 1664525u + 1013904223u;
        rows[i] = uint8_t(state >> 24);
    }
    for (int64_t off = 0; off < int64_t(rows.size()); off += 50) rows[off] = rows[off + 1] = 0;  // fp16 scale 0: no NaN/denormal timing
    Q8Rows x(1, n, true);  // with qt, which gather forms read
    std::vector<float> ones(n, 1.0f);
    x.quantize(0, ones.data(), plain);  // by the table itself: no table is active yet
    const Q8Row xr = x.row(0);
    // Best of 9 passes each, the two forms alternating: a stall of the core (a VM's vCPU descheduled
    // for a few ms) then hits both, where timing one form's passes and then the other's once let it
    // hit only one, and two processes on a 2-core Zen 4 VM picked different tables (gathers 1.6x
    // slower there). Gathers must also win clearly: where the two are close, either costs little.
    double t_plain = 1e9, t_gather = 1e9;
    for (int round = 0; round < 9; ++round) {
        t_plain = std::min(t_plain, time_row_dot(plain.dot[kIQ1_S], rows, row_bytes, n, xr));
        t_gather = std::min(t_gather, time_row_dot(gather.dot[kIQ1_S], rows, row_bytes, n, xr));
    }
    return t_gather < 0.9 * t_plain;
}

// Only CPU checks run here before a table is chosen; each table's code runs only on a CPU that
// has its features (the timing probe included).
struct Tables {
    const KernelSet* sets[3];
    int count = 0;
    Tables() {
        __builtin_cpu_init();
        const bool has_avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                              __builtin_cpu_supports("f16c") && __builtin_cpu_supports("bmi2");
        // The VNNI build uses 256-bit AVX512VL forms, so it needs F/VL/BW/DQ as well as VNNI; its
        // gather forms also use 512-bit vectors and VBMI byte permutes (not on Cascade Lake).
        if (has_avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vnni") &&
            __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq")) {
            const bool with_gather = __builtin_cpu_supports("avx512vbmi");
            const bool gather_first = with_gather && gathers_are_faster(vnni::kernels, vnni::gather_kernels);
            if (gather_first) sets[count++] = &vnni::gather_kernels;
            sets[count++] = &vnni::kernels;
            if (with_gather && !gather_first) sets[count++] = &vnni::gather_kernels;
        }
        if (has_avx2) sets[count++] = &avx2::kernels;
        for (int i = 0; i < count; ++i) names[i] = sets[i]->isa;
    }
    // "vnni" names whichever VNNI table is the default here.
    const KernelSet* by_name(const char* name) const {
        for (int i = 0; i < count; ++i)
            if (std::strcmp(sets[i]->isa, name) == 0 ||
                (std::strcmp(name, "vnni") == 0 && std::strncmp(sets[i]->isa, "avx512vnni", 10) == 0))
                return sets[i];
        return nullptr;
    }
    const char* names[3];
};

const Tables& tables() {
    static const Tables t;
    return t;
}

std::atomic<const KernelSet*> chosen{nullptr};
std::atomic<bool> initialised{false};

}  // namespace

const KernelSet* active_kernels() {
    if (!initialised.load(std::memory_order_acquire)) {
        const Tables& t = tables();
        const char* forced = std::getenv("KT_CPU_ISA");
        const KernelSet* k = forced && *forced ? t.by_name(forced) : nullptr;
        if (!k && t.count) k = t.sets[0];
        chosen.store(k);
        initialised.store(true, std::memory_order_release);
    }
    return chosen.load();
}

const char* const* available_isas(int* count) {
    *count = tables().count;
    return tables().names;
}

bool select_isa(const char* name) {
    const KernelSet* k = tables().by_name(name);
    if (!k) return false;
    active_kernels();
    chosen.store(k);
    return true;
}

}  // namespace kt
