// The per-ISA spans of the fused AdamW step (optim.cpp: scalar and the driver; optim_avx512.cpp,
// optim_avx2.cpp: SIMD). A span is elements [lo, hi) of one task; for 8-bit states lo is a
// multiple of the 256-element block.
#pragma once
#include <cstdint>

#include "qengine/optim_math.h"

namespace qengine::cpu {

using AdamSpan32 = void (*)(const OptimTask& t, int64_t lo, int64_t hi, const AdamHyper& h);
using AdamSpan8 = void (*)(const OptimTask& t, int64_t lo, int64_t hi, const AdamHyper& h, const StateCode& c1,
                           const StateCode& c2);

void scalar_adamw32(const OptimTask& t, int64_t lo, int64_t hi, const AdamHyper& h);
void scalar_adamw8(const OptimTask& t, int64_t lo, int64_t hi, const AdamHyper& h, const StateCode& c1,
                   const StateCode& c2);
#if defined(__x86_64__) || defined(_M_X64)
void avx512_adamw32(const OptimTask& t, int64_t lo, int64_t hi, const AdamHyper& h);
void avx512_adamw8(const OptimTask& t, int64_t lo, int64_t hi, const AdamHyper& h, const StateCode& c1,
                   const StateCode& c2);
// The 8-bit span without gathers (optim_avx512vbmi.cpp); call only where vbmi_scales_available().
void avx512vbmi_adamw8(const OptimTask& t, int64_t lo, int64_t hi, const AdamHyper& h, const StateCode& c1,
                       const StateCode& c2);
void avx2_adamw32(const OptimTask& t, int64_t lo, int64_t hi, const AdamHyper& h);
void avx2_adamw8(const OptimTask& t, int64_t lo, int64_t hi, const AdamHyper& h, const StateCode& c1,
                 const StateCode& c2);
#endif

// The SIMD family of the spans in the current kernel table (cpu::kernels(), which holds them):
// "scalar", "avx2" or "avx512". Diagnostics only.
const char* adamw_spans_name();

}  // namespace qengine::cpu
