// A small fork-join pool, or a loaded OpenMP runtime's team (use_openmp_runtime): parallel_for
// hands each thread one contiguous range and waits; parallel_chunks lets the threads claim
// ranges as they go.
#include "cpu/common/thread_pool.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#if defined(__linux__)
#include <dlfcn.h>
#endif

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

// The entry points of a loaded OpenMP runtime (libgomp's ABI; LLVM's and Intel's runtimes export
// it too). GOMP_parallel(fn, data, n, 0) runs fn(data) on a team of n threads, the caller
// among them, and returns when all are done.
struct OpenMp {
  void (*parallel)(void (*fn)(void*), void* data, unsigned num_threads, unsigned flags) = nullptr;
  int (*thread_num)() = nullptr;
  int (*team_size)() = nullptr;
};

std::mutex omp_mu;
OpenMp omp;            // guarded by omp_mu; a region copies the three pointers under it
std::string omp_path;  // guarded by omp_mu: where they came from ("" for the own pool)

struct OmpRegion {
  const std::function<void(int)>* task;
  int count;
  const OpenMp* rt;
};

// Each team member runs the indices congruent to its number: all of them when the runtime
// gave a smaller team (a region nested inside another gets one thread).
void omp_trampoline(void* data) {
  const auto* r = static_cast<const OmpRegion*>(data);
  const int me = r->rt->thread_num(), size = std::max(1, r->rt->team_size());
  for (int i = me; i < r->count; i += size) (*r->task)(i);
}

Pool& pool() {
  // Leaked on purpose: joining threads from a static destructor at interpreter exit can
  // deadlock; the OS reclaims them.
  static Pool* p = new Pool();
  return *p;
}

// Runs task(i) for i in [0, count) on the registered OpenMP runtime's team, or the own pool.
void run_region(int count, const std::function<void(int)>& task) {
  OpenMp rt;
  {
    std::lock_guard<std::mutex> lock(omp_mu);
    rt = omp;
  }
  if (rt.parallel == nullptr) {
    pool().run(count, task);
    return;
  }
  OmpRegion region{&task, count, &rt};
  rt.parallel(omp_trampoline, &region, static_cast<unsigned>(count), 0);
}

}  // namespace

int num_threads() { return pool().threads(); }
void set_num_threads(int n) { pool().set_threads(n); }

bool use_openmp_runtime(const char* path) {
  OpenMp rt;
  if (path != nullptr && path[0] != '\0') {
#if defined(__linux__)
    // RTLD_NOLOAD: only a runtime the process already has (never a second copy).
    void* lib = dlopen(path, RTLD_NOW | RTLD_NOLOAD);
    if (lib == nullptr) return false;
    rt.parallel = reinterpret_cast<decltype(rt.parallel)>(dlsym(lib, "GOMP_parallel"));
    rt.thread_num = reinterpret_cast<decltype(rt.thread_num)>(dlsym(lib, "omp_get_thread_num"));
    rt.team_size = reinterpret_cast<decltype(rt.team_size)>(dlsym(lib, "omp_get_num_threads"));
    dlclose(lib);  // drops our reference only: the library stays loaded by its owner
    if (rt.parallel == nullptr || rt.thread_num == nullptr || rt.team_size == nullptr) return false;
#else
    return false;
#endif
  }
  std::lock_guard<std::mutex> lock(omp_mu);
  omp = rt;
  omp_path = rt.parallel != nullptr ? path : "";
  return true;
}

const char* openmp_runtime() {
  std::lock_guard<std::mutex> lock(omp_mu);
  static thread_local std::string copy;
  copy = omp_path;
  return copy.c_str();
}

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
  run_region(static_cast<int>(parts), [&](int p) {
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
