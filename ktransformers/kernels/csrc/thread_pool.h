// A persistent pool of worker threads: created once (or on set_num_threads), then every
// parallel call only wakes them. Workers spin briefly before sleeping so back-to-back kernel
// calls of one decode step do not pay a futex wake-up each.
#pragma once
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace kt {

class ThreadPool {
public:
    explicit ThreadPool(int n_threads);
    ~ThreadPool();
    ThreadPool(const ThreadPool&) = delete;
    ThreadPool& operator=(const ThreadPool&) = delete;

    int size() const { return int(workers_.size()) + 1; }  // the calling thread works too

    // Runs task(i) for every i in [0, n_items), items handed out dynamically; returns when all
    // are done. Calls from several Python threads are serialised.
    void run(int64_t n_items, const std::function<void(int64_t)>& task);

private:
    void worker_loop();
    void drain();

    std::vector<std::thread> workers_;
    std::mutex run_mutex_, mutex_;
    std::condition_variable wake_, done_;
    std::atomic<uint64_t> generation_{0};
    std::atomic<int64_t> next_item_{0};
    std::atomic<int> active_{0};     // workers inside the current call
    std::atomic<bool> open_{false};  // a call is handing out items
    int64_t n_items_ = 0;
    const std::function<void(int64_t)>* task_ = nullptr;
    std::atomic<bool> stop_{false};
};

// The process-wide pool; its size comes from set_num_threads (default: hardware threads).
ThreadPool& pool();
void set_num_threads(int n);
int num_threads();

}  // namespace kt
