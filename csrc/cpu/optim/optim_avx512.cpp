// AVX-512 spans of the fused AdamW step: the loops of adamw_loops.h on F32x16, so the bytes
// equal the scalar spans'. The 8-bit span takes qengine's state codes through their minifloat
// arithmetic (minifloat_avx512.h); other codes are looked up with byte permutes on CPUs with
// VBMI (optim_avx512vbmi.cpp) and with gathers here otherwise. Compiled with -mavx512* only here.
#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>

#include "cpu/common/isa.h"
#include "cpu/common/simd_avx512.h"
#include "cpu/optim/adamw_avx512.h"
#include "cpu/optim/adamw_loops.h"
#include "cpu/optim/kernels.h"
#include "cpu/optim/minifloat_avx512.h"

namespace qengine::cpu {
namespace {

// 16 state codes decoded with one gather: table[q[i]] * scale.
inline __m512 decode16(const uint8_t* q, const float* table, __m512 scale) {
  const __m512i idx = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q)));
  return _mm512_mul_ps(_mm512_i32gather_ps(idx, table, 4), scale);
}

// A code through its table: gathers, for any code.
struct TableCodec16 {
  static constexpr int64_t kRun = 64;
  const StateCode& c;
  void decode2(const uint8_t* q, __m512 scale, __m512 out[2]) const {
    out[0] = decode16(q, c.table, scale);
    out[1] = decode16(q + 16, c.table, scale);
  }
  void encode(const float* x, __m512 inv, uint8_t* out) const {
    for (int k = 0; k < 4; ++k) {
      const __m512 y = _mm512_mul_ps(_mm512_load_ps(x + 16 * k), inv);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(out + 16 * k), encode16(y, c));
    }
  }
};

void adamw8_span(const OptimTask& t, int64_t lo, int64_t hi, const AdamHyper& h, const StateCode& c1,
                 const StateCode& c2) {
  // Other codes than qengine's (no minifloat forms): byte permutes where VBMI has them.
  if (!minifloat_forms(c1, c2) && vbmi_scales_available()) return adamw8_avx512vbmi(t, lo, hi, h, c1, c2);
  adamw8_span_of<F32x16, MinifloatCodec16<true>, MinifloatCodec16<false>, TableCodec16>(t, lo, hi, h, c1, c2);
}

}  // namespace

const OptimKernels kOptimAvx512 = {
    .name = "avx512",
    .adamw32 = adamw32_span_of<F32x16>,
    .adamw8 = adamw8_span,
};

}  // namespace qengine::cpu
#endif
