// The optim family: the per-ISA spans of the fused AdamW step (optim.cpp: scalar and the driver;
// optim_avx512.cpp, optim_avx2.cpp: SIMD). A span is elements [lo, hi) of one task; for 8-bit states lo is a
// multiple of the 256-element block.
#pragma once
#include <cstdint>
#include <type_traits>

#include "cpu/common/isa.h"
#include "cpu/common/ladder.h"
#include "qengine/optim_math.h"

namespace qengine::cpu {

using AdamSpan32 = void (*)(const OptimTask& t, int64_t lo, int64_t hi, const AdamHyper& h);
using AdamSpan8 = void (*)(const OptimTask& t, int64_t lo, int64_t hi, const AdamHyper& h, const StateCode& c1,
                           const StateCode& c2);

// The optim family's per-ISA table (optim.cpp, optim_avx2.cpp, optim_avx512.cpp fill a row each
// by field name; the avx512 row also serves avx512_bf16).
struct OptimKernels {
  const char* name;  // diagnostics (adamw_spans_name)
  AdamSpan32 adamw32;
  AdamSpan8 adamw8;
};

extern const OptimKernels kOptimScalar;
#if defined(__x86_64__) || defined(_M_X64)
extern const OptimKernels kOptimAvx2;
extern const OptimKernels kOptimAvx512;
// The 8-bit span without gathers (optim_avx512vbmi.cpp); call only where vbmi_scales_available().
void adamw8_avx512vbmi(const OptimTask& t, int64_t lo, int64_t hi, const AdamHyper& h, const StateCode& c1,
                       const StateCode& c2);
#endif

// The row of the active ISA (isa.h).
const OptimKernels& optim_kernels();

// The scalar spans, also the SIMD spans' partial last block.
void scalar_adamw32(const OptimTask& t, int64_t lo, int64_t hi, const AdamHyper& h);
void scalar_adamw8(const OptimTask& t, int64_t lo, int64_t hi, const AdamHyper& h, const StateCode& c1,
                   const StateCode& c2);

// A task's arrays with their types: the parameter and gradient (dtype dt), the states (float32
// m, v for 32-bit states; codes q1, q2 with block absmax a1, a2 for 8-bit ones).
struct TaskArrays {
  void* p;
  const void* g;
  int dt;
  float* m;
  float* v;
  uint8_t* q1;
  uint8_t* q2;
  float* a1;
  float* a2;
  explicit TaskArrays(const OptimTask& t)
      : p(reinterpret_cast<void*>(t.param)), g(reinterpret_cast<const void*>(t.grad)), dt(static_cast<int>(t.dtype)),
        m(reinterpret_cast<float*>(t.state1)), v(reinterpret_cast<float*>(t.state2)),
        q1(reinterpret_cast<uint8_t*>(t.state1)), q2(reinterpret_cast<uint8_t*>(t.state2)),
        a1(reinterpret_cast<float*>(t.absmax1)), a2(reinterpret_cast<float*>(t.absmax2)) {}
};

// Calls body(maximize, lerp_small) with the step's two flags as std::bool_constant, so the
// span's loop is compiled once per combination with no branch on them (compilers did not
// hoist the branches out of the 8-bit loops: 10-15% of the AVX2 step on Zen 3).
template <class Body>
inline void with_flags(const AdamHyper& h, Body&& body) {
  with_bool(h.maximize != 0.0f, [&](auto maximize) {
    with_bool(h.lerp_small != 0.0f, [&](auto small) { body(maximize, small); });
  });
}

// The template parameters of a SIMD span's loop: f(dtype, maximize, lerp_small).
template <class F>
inline void with_span_params(const OptimTask& t, const AdamHyper& h, F&& f) {
  with_dtype(static_cast<int>(t.dtype), [&](auto dt) { with_flags(h, [&](auto mx, auto sm) { f(dt, mx, sm); }); });
}

// The 8-bit spans alternate a decode/update pass and an encode pass over L1-resident
// temporaries; their gathers keep the hardware prefetchers from running far enough ahead on
// large steps, so the inputs of the block kPrefetchBlocks ahead are requested explicitly.
constexpr int64_t kPrefetchBlocks = 4;

inline void prefetch_block(const OptimTask& t, int64_t e, int64_t hi) {
  if (e >= hi) return;
  const int64_t len = hi - e < kOptimBlock ? hi - e : kOptimBlock;
  const int esize = dtype_size(static_cast<int>(t.dtype));
  const char* p = reinterpret_cast<const char*>(t.param) + e * esize;
  const char* g = reinterpret_cast<const char*>(t.grad) + e * esize;
  for (int64_t off = 0; off < len * esize; off += 64) {  // prefetcht0, as _mm_prefetch(_MM_HINT_T0)
    __builtin_prefetch(p + off, 0, 3);
    __builtin_prefetch(g + off, 0, 3);
  }
  const char* q1 = reinterpret_cast<const char*>(t.state1) + e;
  const char* q2 = reinterpret_cast<const char*>(t.state2) + e;
  for (int64_t off = 0; off < len; off += 64) {
    __builtin_prefetch(q1 + off, 0, 3);
    __builtin_prefetch(q2 + off, 0, 3);
  }
}

// True when m's code (c1) has a signed MinifloatForm and v's (c2) an unsigned one: the forms the
// SIMD spans' arithmetic codecs take (the codes' tables are used otherwise).
inline bool minifloat_forms(const StateCode& c1, const StateCode& c2) {
  return c1.minifloat.mantissa_bits != 0 && c1.minifloat.zero_code >= 0 && c2.minifloat.mantissa_bits != 0 &&
         c2.minifloat.zero_code == -1;
}

// The name of the active optim row: "scalar", "avx2" or "avx512". Diagnostics only.
const char* adamw_spans_name();

}  // namespace qengine::cpu
