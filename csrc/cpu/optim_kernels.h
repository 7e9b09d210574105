// The per-ISA spans of the fused AdamW step (optim.cpp: scalar and the driver; optim_avx512.cpp,
// optim_avx2.cpp: SIMD). A span is elements [lo, hi) of one task; for 8-bit states lo is a
// multiple of the 256-element block.
#pragma once
#include <cstdint>
#include <type_traits>

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

// Calls body(maximize, lerp_small) with the step's two flags as std::bool_constant, so the
// span's loop is compiled once per combination with no branch on them (compilers did not
// hoist the branches out of the 8-bit loops: 10-15% of the AVX2 step on Zen 3).
template <class Body>
inline void with_flags(const AdamHyper& h, Body&& body) {
  using T = std::true_type;
  using F = std::false_type;
  if (h.maximize != 0.0f) {
    if (h.lerp_small != 0.0f) body(T{}, T{});
    else body(T{}, F{});
  } else {
    if (h.lerp_small != 0.0f) body(F{}, T{});
    else body(F{}, F{});
  }
}

// True when m's code (c1) has a signed MinifloatForm and v's (c2) an unsigned one: the forms the
// SIMD spans' arithmetic codecs take (the codes' tables are used otherwise).
inline bool minifloat_forms(const StateCode& c1, const StateCode& c2) {
  return c1.minifloat.mantissa_bits != 0 && c1.minifloat.zero_code >= 0 && c2.minifloat.mantissa_bits != 0 &&
         c2.minifloat.zero_code == -1;
}

// The SIMD family of the spans in the current kernel table (cpu::kernels(), which holds them):
// "scalar", "avx2" or "avx512". Diagnostics only.
const char* adamw_spans_name();

}  // namespace qengine::cpu
