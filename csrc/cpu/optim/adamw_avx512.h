// The gather-based nearest-code search of the AVX-512 AdamW spans (any state code, through its
// lookup table), shared by optim_avx512.cpp and optim_avx512vbmi.cpp; the loops themselves are
// adamw_loops.h's. Include only from files compiled with AVX-512 flags. The anonymous namespace
// is deliberate: each includer compiles its own copy for its own ISA flags, so the linker can
// never merge a VBMI-compiled copy into the plain AVX-512 path.
#pragma once
#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>

#include "cpu/optim/kernels.h"

namespace qengine::cpu {
namespace {  // NOLINT(build/namespaces): see above

// 16 codes of the nearest-code search (encode_state on 16 lanes): one gather.
inline __m128i encode16(__m512 x, const StateCode& c) {
  const __m512i u = _mm512_castps_si512(x);
  __m512i k = _mm512_sub_epi32(_mm512_srli_epi32(_mm512_and_si512(u, _mm512_set1_epi32(0x7fffffff)), 16),
                               _mm512_set1_epi32(c.lut_base));
  k = _mm512_min_epi32(_mm512_max_epi32(k, _mm512_setzero_si512()), _mm512_set1_epi32(c.lut_kmax));
  const __mmask16 neg = _mm512_movepi32_mask(u);
  const __m512i key = _mm512_mask_sub_epi32(_mm512_add_epi32(k, _mm512_set1_epi32(c.lut_kmax + 1)), neg,
                                            _mm512_set1_epi32(c.lut_kmax), k);
  const __m512i e = _mm512_i32gather_epi32(key, c.lut, 4);
  const __m512i lo16 = _mm512_set1_epi32(0xffff);
  const __m512i low = _mm512_and_si512(u, lo16), t = _mm512_and_si512(e, lo16);
  const __mmask16 up = static_cast<__mmask16>((_mm512_cmpgt_epi32_mask(low, t) & ~neg) |
                                              (_mm512_cmpgt_epi32_mask(t, low) & neg));
  const __m512i idx = _mm512_mask_add_epi32(_mm512_srli_epi32(e, 16), up, _mm512_srli_epi32(e, 16),
                                            _mm512_set1_epi32(1));
  return _mm512_cvtepi32_epi8(idx);
}

}  // namespace
}  // namespace qengine::cpu
#endif
