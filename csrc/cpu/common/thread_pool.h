// The one parallel_for of the CPU backend: the threads of an OpenMP runtime already loaded in
// the process (torch's, registered by use_openmp_runtime), else a persistent pool of our own
// worker threads. The module never links an OpenMP runtime of its own.
#pragma once
#include <cstdint>
#include <functional>

namespace qengine::cpu {

// Number of threads parallel_for uses (defaults to the hardware concurrency, or
// QENGINE_NUM_THREADS).
int num_threads();
void set_num_threads(int n);

// Runs every later parallel region on the threads of the OpenMP runtime at `path` (a library the
// process has already loaded, e.g. torch's libgomp), through its GOMP_parallel entry point.
// Those are the threads torch's operators keep spinning between their regions: regions of ours
// in between then find them awake, instead of a second set of threads competing with them for
// the cores (measured: a QLoRA step's quantized products ran ~1.7x slower beside spinning
// OpenMP threads). Returns false (and keeps the own pool) where the library is not loaded or
// lacks the entry points. An empty path goes back to the own pool.
bool use_openmp_runtime(const char* path);
// The path registered by use_openmp_runtime ("" for the own pool).
const char* openmp_runtime();

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
