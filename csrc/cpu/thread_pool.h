// The one parallel_for of the CPU backend: a persistent pool of worker threads (no OpenMP,
// so the module does not bring a second OpenMP runtime next to torch's).
#pragma once
#include <cstdint>
#include <functional>

namespace qengine::cpu {

// Number of threads parallel_for uses (defaults to the hardware concurrency, or
// QENGINE_NUM_THREADS).
int num_threads();
void set_num_threads(int n);

// Calls fn(lo, hi) on disjoint contiguous ranges covering [begin, end), at most one range per
// thread; every range but the first starts at a multiple of `align` (relative to begin), and
// no range is shorter than `min_chunk` unless it is the only one. Blocks until all are done.
void parallel_for(int64_t begin, int64_t end, int64_t min_chunk, int64_t align,
                  const std::function<void(int64_t, int64_t)>& fn);

}  // namespace qengine::cpu
