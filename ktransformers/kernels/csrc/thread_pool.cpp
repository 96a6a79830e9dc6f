#include "thread_pool.h"

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <memory>

namespace kt {
namespace {

// How long idle workers (and a caller waiting for them) spin before sleeping: long enough to
// bridge the gap between the calls of one decode step. KT_SPIN_US overrides it (0: sleep at once).
const std::chrono::microseconds kSpin = [] {
    const char* env = std::getenv("KT_SPIN_US");
    return std::chrono::microseconds(env && *env ? std::max(0, std::atoi(env)) : 200);
}();

// PAUSE in a spin loop lets a hypervisor deschedule the vCPU (pause-loop exiting), which costs a
// decode call tens of microseconds on VMs; KT_SPIN_PAUSE=0 spins on plain loads instead.
const bool spin_pause = [] {
    const char* env = std::getenv("KT_SPIN_PAUSE");
    return !(env && env[0] == '0');
}();

inline void cpu_relax() {
    if (spin_pause) __builtin_ia32_pause();
}

std::mutex pool_mutex;
std::unique_ptr<ThreadPool> the_pool;
int requested_threads = 0;

}  // namespace

ThreadPool::ThreadPool(int n_threads) {
    for (int i = 1; i < n_threads; ++i) workers_.emplace_back([this] { worker_loop(); });
}

ThreadPool::~ThreadPool() {
    std::lock_guard<std::mutex> serial(run_mutex_);  // let a running call finish first
    {
        std::lock_guard<std::mutex> lock(mutex_);
        stop_.store(true);
        generation_.fetch_add(1);
    }
    wake_.notify_all();
    for (auto& t : workers_) t.join();
}

void ThreadPool::drain() {
    for (int64_t i; (i = next_item_.fetch_add(1, std::memory_order_relaxed)) < n_items_;) (*task_)(i);
}

void ThreadPool::run(int64_t n_items, const std::function<void(int64_t)>& task) {
    if (n_items <= 0) return;
    std::lock_guard<std::mutex> serial(run_mutex_);
    if (workers_.empty() || n_items == 1) {
        for (int64_t i = 0; i < n_items; ++i) task(i);
        return;
    }
    {
        std::lock_guard<std::mutex> lock(mutex_);
        task_ = &task;
        n_items_ = n_items;
        next_item_.store(0);
        open_.store(true);
        generation_.fetch_add(1);
    }
    wake_.notify_all();
    drain();
    // Close the call: workers that wake from now on leave at once, so only the ones still
    // finishing an item are waited for (never one the OS has not scheduled yet).
    open_.store(false);
    const auto spin_until = std::chrono::steady_clock::now() + kSpin;
    for (int i = 0; active_.load() != 0; ++i) {
        cpu_relax();
        if (i % 64 == 63 && std::chrono::steady_clock::now() > spin_until) {
            std::unique_lock<std::mutex> lock(mutex_);
            done_.wait(lock, [this] { return active_.load() == 0; });
        }
    }
}

void ThreadPool::worker_loop() {
    uint64_t seen = 0;
    for (;;) {
        // Spin a little for the next call (without touching the mutex, which 16 workers would
        // queue on), then sleep until woken.
        uint64_t g = generation_.load();
        const auto spin_until = std::chrono::steady_clock::now() + kSpin;
        for (int i = 0; g == seen; ++i) {
            cpu_relax();
            g = generation_.load();
            if (g == seen && i % 64 == 63 && std::chrono::steady_clock::now() > spin_until) {
                std::unique_lock<std::mutex> lock(mutex_);
                wake_.wait(lock, [&] { return generation_.load() != seen; });
                g = generation_.load();
            }
        }
        seen = g;
        if (stop_.load()) return;
        // Announce first, then check the call is still open (all seq_cst): either the caller
        // sees us in active_ and waits, or we see it closed and touch nothing.
        active_.fetch_add(1);
        if (open_.load()) drain();
        if (active_.fetch_sub(1) == 1) {
            std::lock_guard<std::mutex> lock(mutex_);
            done_.notify_all();
        }
    }
}

ThreadPool& pool() {
    std::lock_guard<std::mutex> lock(pool_mutex);
    if (!the_pool) {
        const int n = requested_threads > 0 ? requested_threads : int(std::thread::hardware_concurrency());
        the_pool = std::make_unique<ThreadPool>(n > 0 ? n : 1);
    }
    return *the_pool;
}

void set_num_threads(int n) {
    std::lock_guard<std::mutex> lock(pool_mutex);
    requested_threads = n;
    the_pool.reset();  // joined here; the next pool() builds one of the new size
}

int num_threads() { return pool().size(); }

}  // namespace kt
