// The AVX-512 building blocks of the fused AdamW step, shared by optim_avx512.cpp and
// optim_avx512vbmi.cpp: the element update, the NaN-propagating absmax and the gather-based
// nearest-code search (loads and stores: common/simd_avx512.h). Include only from files
// compiled with AVX-512 flags. The anonymous namespace is deliberate: each includer compiles
// its own copy for its own ISA flags, so the linker can never merge a VBMI-compiled copy into
// the plain AVX-512 path.
#pragma once
#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>

#include "cpu/common/simd_avx512.h"
#include "cpu/optim/kernels.h"

namespace qengine::cpu {
namespace {  // NOLINT(build/namespaces): see above

struct Hyper16 {
  __m512 decay, w1, w1m1, beta2, w2, bc2, eps, step;
  explicit Hyper16(const AdamHyper& h)
      : decay(_mm512_set1_ps(h.decay)), w1(_mm512_set1_ps(h.w1)), w1m1(_mm512_set1_ps(h.w1 - 1.0f)),
        beta2(_mm512_set1_ps(h.beta2)), w2(_mm512_set1_ps(h.w2)), bc2(_mm512_set1_ps(h.bc2_sqrt)),
        eps(_mm512_set1_ps(h.eps)), step(_mm512_set1_ps(h.neg_step)) {}
};

// adamw_element on 16 lanes; the flags (maximize, lerp_small) from with_flags (optim_kernels.h).
template <bool kMaximize, bool kSmall>
inline void update16(__m512 g, __m512& p, __m512& m, __m512& v, const Hyper16& h) {
  if constexpr (kMaximize) g = _mm512_xor_ps(g, _mm512_set1_ps(-0.0f));
  p = _mm512_mul_ps(p, h.decay);
  const __m512 d = _mm512_sub_ps(g, m);
  m = kSmall ? _mm512_fmadd_ps(h.w1, d, m) : _mm512_fmadd_ps(h.w1m1, d, g);
  v = _mm512_fmadd_ps(_mm512_mul_ps(h.w2, g), g, _mm512_mul_ps(v, h.beta2));
  const __m512 denom = _mm512_add_ps(_mm512_div_ps(_mm512_sqrt_ps(v), h.bc2), h.eps);
  p = _mm512_add_ps(p, _mm512_div_ps(_mm512_mul_ps(h.step, m), denom));
}

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

inline float reduce_absmax(__m512i acc) {
  const uint32_t m = _mm512_reduce_max_epu32(acc);
  return bits_float(m > 0x7f800000u ? 0x7fc00000u : m);  // absmax_step's one canonical NaN
}

// posmax_step on 16 lanes: x's bits as int32 (acc starts at 0, so negatives never win).
inline __m512i max_pos_bits(__m512i acc, __m512 x) { return _mm512_max_epi32(acc, _mm512_castps_si512(x)); }

// m_signed_scale from the lanes of max_abs_bits and max_pos_bits.
inline float reduce_m_scale(__m512i abs_acc, __m512i pos_acc) {
  return m_signed_scale(reduce_absmax(abs_acc), bits_float(static_cast<uint32_t>(_mm512_reduce_max_epi32(pos_acc))));
}

}  // namespace
}  // namespace qengine::cpu
#endif
