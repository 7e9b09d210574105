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

// Calls fn(lo, hi) on the ranges [begin + i * chunk, ...) of at most `chunk` elements, which the
// threads claim from a shared counter rather than one fixed share each: on a machine where other
// work holds a core for a moment, the slowed thread then does less of the work instead of making
// the whole call wait for it. A range runs on one thread; one thread runs many ranges.
void parallel_chunks(int64_t begin, int64_t end, int64_t chunk, const std::function<void(int64_t, int64_t)>& fn);

}  // namespace qengine::cpu
