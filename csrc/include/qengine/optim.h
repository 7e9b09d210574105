// Entry points of the fused optimizer step (CPU and CUDA). They take task and constant tables
// that python/qengine/ops/optim.py has built and checked, and return a Status.
#pragma once
#include <cstdint>

#include "qengine/optim_math.h"

namespace qengine {

// One AdamW step over every span in tasks[0..ntasks): reads gradient, parameter and states
// once, writes parameter and states. state_bits 32: float32 m, v; 8: uint8 codes with
// codes[0] (m, signed map) and codes[1] (v, unsigned map). hyper has nhyper rows.
int adamw_cpu(const OptimTask* tasks, int64_t ntasks, const AdamHyper* hyper, int64_t nhyper, int state_bits,
              const StateCode* codes);

#if defined(QENGINE_WITH_CUDA)
// The same on device buffers (task addresses are device addresses; the task and hyper tables
// themselves are host memory, read before the launches return), on `stream`.
int adamw_cuda(const OptimTask* tasks, int64_t ntasks, const AdamHyper* hyper, int64_t nhyper, int state_bits,
               const StateCode* codes, void* stream);
#endif

}  // namespace qengine
