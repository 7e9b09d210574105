// A small fork-join pool: parallel_for hands each worker one contiguous range and waits;
// parallel_chunks lets the threads claim ranges as they go.
#include "cpu/common/thread_pool.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <mutex>
#include <thread>
#include <vector>

namespace qengine::cpu {
namespace {

int default_threads() {
  if (const char* env = std::getenv("QENGINE_NUM_THREADS")) {
    int n = std::atoi(env);
    if (n > 0) return n;
  }
  unsigned hw = std::thread::hardware_concurrency();
  return hw == 0 ? 1 : static_cast<int>(hw);
}

// Spins on an atomic for up to kSpin before sleeping on a condition variable: regions come in
// quick succession (a layer's product, its LoRA epilogue, the next layer), and waking a thread
// that sleeps in the kernel costs 30-100 us on a virtual machine, a tenth of a decode-step GEMV.
constexpr std::chrono::microseconds kSpin{100};

template <typename Ready>
bool spin_until(Ready ready) {
  const auto deadline = std::chrono::steady_clock::now() + kSpin;
  for (int i = 0;; ++i) {
    if (ready()) return true;
    if ((i & 63) == 63 && std::chrono::steady_clock::now() > deadline) return false;
#if defined(__x86_64__) || defined(_M_X64)
    __builtin_ia32_pause();
#endif
  }
}

class Pool {
 public:
  Pool() : threads_(default_threads()) {}
  ~Pool() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop_ = true;
      generation_.fetch_add(1);
    }
    cv_.notify_all();
    for (auto& w : workers_) w.join();
  }

  int threads() const { return threads_; }
  void set_threads(int n) {
    std::lock_guard<std::mutex> run(run_mu_);
    threads_ = std::max(1, n);
  }

  // Runs task(i) for i in [0, count); the caller runs task(0) itself.
  void run(int count, const std::function<void(int)>& task) {
    std::lock_guard<std::mutex> run(run_mu_);  // one parallel region at a time
    ensure_workers(count - 1);
    {
      std::lock_guard<std::mutex> lock(mu_);
      task_ = &task;
      pending_.store(count - 1);
      next_ = 1;
      limit_ = count;
      generation_.fetch_add(1, std::memory_order_release);
    }
    cv_.notify_all();
    task(0);
    if (!spin_until([&] { return pending_.load(std::memory_order_acquire) == 0; })) {
      std::unique_lock<std::mutex> lock(mu_);
      done_cv_.wait(lock, [&] { return pending_.load() == 0; });
    }
    std::lock_guard<std::mutex> lock(mu_);
    task_ = nullptr;
  }

 private:
  void ensure_workers(int n) {
    while (static_cast<int>(workers_.size()) < n) {
      workers_.emplace_back([this] { worker_loop(); });
    }
  }

  void worker_loop() {
    uint64_t seen = 0;  // the last region this worker took part in (or found fully taken)
    for (;;) {
      spin_until([&] { return generation_.load(std::memory_order_acquire) != seen; });
      std::unique_lock<std::mutex> lock(mu_);
      cv_.wait(lock, [&] { return stop_ || generation_.load() != seen; });
      if (stop_) return;
      seen = generation_.load();
      if (next_ >= limit_) continue;  // the others took every index of this region
      const int index = next_++;
      const std::function<void(int)>* task = task_;
      lock.unlock();
      (*task)(index);
      // The decrement is the last touch of the region: the caller may return (and the task
      // die) as soon as it reads zero.
      if (pending_.fetch_sub(1, std::memory_order_acq_rel) == 1) {
        lock.lock();  // pairs with the caller's predicate check under mu_
        lock.unlock();
        done_cv_.notify_one();
      }
    }
  }

  int threads_;
  std::vector<std::thread> workers_;
  std::mutex run_mu_;
  std::mutex mu_;
  std::condition_variable cv_, done_cv_;
  const std::function<void(int)>* task_ = nullptr;
  std::atomic<int> pending_{0};
  int next_ = 0, limit_ = 0;
  std::atomic<uint64_t> generation_{0};
  bool stop_ = false;
};

Pool& pool() {
  // Leaked on purpose: joining threads from a static destructor at interpreter exit can
  // deadlock; the OS reclaims them.
  static Pool* p = new Pool();
  return *p;
}

}  // namespace

int num_threads() { return pool().threads(); }
void set_num_threads(int n) { pool().set_threads(n); }

void parallel_for(int64_t begin, int64_t end, int64_t min_chunk, int64_t align,
                  const std::function<void(int64_t, int64_t)>& fn) {
  int64_t total = end - begin;
  if (total <= 0) return;
  align = std::max<int64_t>(align, 1);
  min_chunk = std::max<int64_t>(min_chunk, 1);
  int64_t parts = std::min<int64_t>(pool().threads(), (total + min_chunk - 1) / min_chunk);
  if (parts <= 1) {
    fn(begin, end);
    return;
  }
  // Even split, each boundary rounded up to the alignment.
  std::vector<int64_t> bounds(parts + 1);
  bounds[0] = begin;
  for (int64_t p = 1; p < parts; ++p) {
    int64_t b = total * p / parts;
    b = (b + align - 1) / align * align;
    bounds[p] = std::min(begin + b, end);
  }
  bounds[parts] = end;
  pool().run(static_cast<int>(parts), [&](int p) {
    int64_t lo = bounds[p], hi = bounds[p + 1];
    if (lo < hi) fn(lo, hi);
  });
}

void parallel_chunks(int64_t begin, int64_t end, int64_t chunk, const std::function<void(int64_t, int64_t)>& fn) {
  const int64_t total = end - begin;
  if (total <= 0) return;
  chunk = std::max<int64_t>(chunk, 1);
  const int64_t chunks = (total + chunk - 1) / chunk;
  std::atomic<int64_t> next{0};
  parallel_for(0, std::min<int64_t>(pool().threads(), chunks), 1, 1, [&](int64_t, int64_t) {
    for (int64_t i = next.fetch_add(1); i < chunks; i = next.fetch_add(1)) {
      fn(begin + i * chunk, std::min(end, begin + (i + 1) * chunk));
    }
  });
}

}  // namespace qengine::cpu
