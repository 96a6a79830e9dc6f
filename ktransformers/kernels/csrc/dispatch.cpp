// Picks the kernel table for this CPU once; KT_CPU_ISA=avx2 (or select_isa) forces the AVX2 one.
#include <atomic>
#include <cstdlib>
#include <cstring>

#include "kernels.h"

namespace kt {
namespace {

struct Tables {
    KernelSet vnni, avx2;
    const char* names[2];
    int count = 0;
    Tables() {
        vnni::fill_kernels(vnni);
        vnni.isa = "avx512vnni";
        avx2::fill_kernels(avx2);
        avx2.isa = "avx2";
        __builtin_cpu_init();
        const bool has_avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
        // The VNNI build uses 256-bit AVX512VL forms, so it needs VL/BW/DQ as well as VNNI.
        if (has_avx2 && __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512vl") &&
            __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq"))
            names[count++] = vnni.isa;
        if (has_avx2) names[count++] = avx2.isa;
    }
    const KernelSet* by_name(const char* name) const {
        for (int i = 0; i < count; ++i)
            if (std::strcmp(names[i], name) == 0 || (std::strcmp(name, "vnni") == 0 && names[i] == vnni.isa))
                return names[i] == vnni.isa ? &vnni : &avx2;
        return nullptr;
    }
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
        if (!k && t.count) k = t.by_name(t.names[0]);
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
