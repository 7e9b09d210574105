// The 8-bit state codes through their MinifloatForm (optim_math.h) on AVX-512F/BW: decode 32
// codes at a time in 16-bit lanes, encode 16 floats at a time in 32-bit lanes, no lookups.
// The same integer steps as minifloat_value_bits / minifloat_encode (state_minifloat.cpp), so
// the bytes equal the table path's wherever check_minifloat_form accepted the form. Include
// only from files compiled with AVX-512 flags (anonymous namespace: each includer's own copy).
#pragma once
#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>

#include "cpu/common/simd_avx512.h"
#include "cpu/optim/minifloat_vectors.h"
#include "cpu/optim/state_minifloat.h"

namespace qengine::cpu {
namespace {  // NOLINT(build/namespaces): see above

// Four 16-lane code vectors (elements 0-15, 16-31, ...) -> 64 bytes in order, each lane
// saturated to 0..255.
inline __m512i pack64(__m512i c0, __m512i c1, __m512i c2, __m512i c3) {
  // After the packs 128-bit lane l holds elements 4l..4l+3 of c0, c1, c2, c3 (a dword each).
  const __m512i b = _mm512_packus_epi16(_mm512_packus_epi32(c0, c1), _mm512_packus_epi32(c2, c3));
  return _mm512_permutexvar_epi32(_mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15), b);
}

// kSigned: a code with 0.0 and negatives (zero_code >= 0, m's); else one without either
// (zero_code == -1, v's), whose magnitude is code + 1, folded into the offsets.
template <bool kSigned>
struct MinifloatCodec16 : MinifloatVectors<F32x16> {
  explicit MinifloatCodec16(const StateCode& c)
      : MinifloatVectors<F32x16>(minifloat_codec_constants(c.minifloat, kSigned)) {}

  static constexpr int64_t kRun = 64;  // codes per encode

  // 32 codes q[0..31] decoded and scaled: out[0] holds elements 0-15, out[1] 16-31.
  void decode2(const uint8_t* q, __m512 scale, __m512 out[2]) const {
    // Words ordered 0-3 16-19 | 4-7 20-23 | ...: the in-lane unpacks below then restore order.
    alignas(64) static const uint16_t kOrder[32] = {0,  1,  2,  3,  16, 17, 18, 19, 4,  5,  6,  7,  20, 21, 22, 23,
                                                    8,  9,  10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31};
    __m512i code = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(q)));
    code = _mm512_permutexvar_epi16(_mm512_load_si512(kOrder), code);
    const __m512i s = kSigned ? _mm512_sub_epi16(code, zero_code16) : code;
    const __m512i mag = kSigned ? _mm512_abs_epi16(s) : code;  // unsigned: the code, offsets folded
    const __mmask32 low = _mm512_cmpgt_epi16_mask(first_top16, mag);
    __m512i high = _mm512_mask_blend_epi16(low, _mm512_sll_epi16(_mm512_add_epi16(mag, offset_top16), half_shift_top),
                                           _mm512_sll_epi16(_mm512_add_epi16(mag, offset_low16), half_shift_low));
    if constexpr (kSigned) {
      high = _mm512_maskz_mov_epi16(_mm512_test_epi16_mask(mag, mag), high);  // magnitude 0: 0.0
      // high | (s & sign bit): the sign of code - zero_code.
      high = _mm512_ternarylogic_epi32(high, s, _mm512_set1_epi16(INT16_MIN), 0xf8);
    }
    const __m512i zero = _mm512_setzero_si512();
    out[0] = _mm512_mul_ps(_mm512_castsi512_ps(_mm512_unpacklo_epi16(zero, high)), scale);
    out[1] = _mm512_mul_ps(_mm512_castsi512_ps(_mm512_unpackhi_epi16(zero, high)), scale);
  }

  // The codes of 16 floats (finite, |x| < 2) as int32 lanes, possibly outside 0..255: pack64's
  // saturation clamps them, as minifloat_encode's clamp.
  __m512i encode(__m512 x) const {
    const __m512i u = _mm512_castps_si512(x);
    const __m512i a = _mm512_and_si512(u, _mm512_set1_epi32(INT32_MAX));
    const __mmask16 top = _mm512_cmpge_epi32_mask(a, split);
    const __m512i round = _mm512_mask_blend_epi32(top, round_low, round_top);
    const __m512i shift = _mm512_mask_blend_epi32(top, shift_low, shift_top);
    if constexpr (!kSigned) {
      // Every negative x has code 0, as has any x below the smallest magnitude (raw <= 0).
      const __mmask16 nonnegative = _mm512_cmpge_epi32_mask(u, _mm512_setzero_si512());
      return _mm512_maskz_srav_epi32(nonnegative, _mm512_add_epi32(u, round), shift);
    } else {
      const __mmask16 negative = _mm512_movepi32_mask(u);
      // Ties go to the lower code: the smaller magnitude for x > 0, the larger one for x < 0.
      const __m512i rounded = _mm512_mask_add_epi32(a, negative, a, _mm512_set1_epi32(1));
      const __m512i raw = _mm512_srav_epi32(_mm512_add_epi32(rounded, round), shift);
      const __mmask16 nonzero = _mm512_cmpgt_epi32_mask(rounded, half_smallest);  // a > half_smallest - negative
      const __m512i mag = _mm512_maskz_max_epi32(nonzero, raw, _mm512_set1_epi32(1));
      return _mm512_mask_sub_epi32(_mm512_add_epi32(zero_code, mag), negative, zero_code, mag);
    }
  }

  // out[0..63]: the codes of x[i] * inv (x 64-byte aligned).
  void encode(const float* x, __m512 inv, uint8_t* out) const {
    __m512i c[4];
    for (int k = 0; k < 4; ++k) c[k] = encode(_mm512_mul_ps(_mm512_load_ps(x + 16 * k), inv));
    _mm512_storeu_si512(out, pack64(c[0], c[1], c[2], c[3]));
  }
};

}  // namespace
}  // namespace qengine::cpu
#endif
