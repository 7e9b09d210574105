// AVX2 spans of the fused AdamW step: the loops of adamw_loops.h on F32x8 around this file's
// codecs, so the bytes equal the scalar spans'. Compiled with -mavx2 -mfma -mf16c only here.
#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>

#include <algorithm>
#include <climits>
#include <cmath>

#include "cpu/common/simd_avx2.h"
#include "cpu/optim/adamw_loops.h"
#include "cpu/optim/kernels.h"
#include "cpu/optim/minifloat_vectors.h"
#include "cpu/optim/state_minifloat.h"

namespace qengine::cpu {
namespace {

// 8 codes of the nearest-code search (encode_state on 8 lanes), as int32 lanes: one gather.
inline __m256i encode8(__m256 x, const StateCode& c) {
  const __m256i u = _mm256_castps_si256(x);
  __m256i k = _mm256_sub_epi32(_mm256_srli_epi32(_mm256_and_si256(u, _mm256_set1_epi32(0x7fffffff)), 16),
                               _mm256_set1_epi32(c.lut_base));
  k = _mm256_min_epi32(_mm256_max_epi32(k, _mm256_setzero_si256()), _mm256_set1_epi32(c.lut_kmax));
  const __m256i neg = _mm256_srai_epi32(u, 31);
  const __m256i key = _mm256_blendv_epi8(_mm256_add_epi32(k, _mm256_set1_epi32(c.lut_kmax + 1)),
                                         _mm256_sub_epi32(_mm256_set1_epi32(c.lut_kmax), k), neg);
  const __m256i e = _mm256_i32gather_epi32(reinterpret_cast<const int*>(c.lut), key, 4);
  const __m256i lo16 = _mm256_set1_epi32(0xffff);
  const __m256i low = _mm256_and_si256(u, lo16), t = _mm256_and_si256(e, lo16);
  const __m256i up = _mm256_blendv_epi8(_mm256_cmpgt_epi32(low, t), _mm256_cmpgt_epi32(t, low), neg);
  return _mm256_sub_epi32(_mm256_srli_epi32(e, 16), up);  // true lanes are -1
}

inline __m256 decode8(const uint8_t* q, const float* table, __m256 scale) {
  const __m256i idx = load_codes8(q);
  return _mm256_mul_ps(_mm256_i32gather_ps(table, idx, 4), scale);
}

// Two 8-lane code vectors -> 16 bytes, in order; lanes saturate to 0..255.
inline __m128i pack16(__m256i a, __m256i b) {
  __m256i w = _mm256_packus_epi32(a, b);                  // lanes: a0-3 b0-3 | a4-7 b4-7
  w = _mm256_permute4x64_epi64(w, 0xd8);                  // a0-3 a4-7 | b0-3 b4-7
  __m128i lo = _mm256_castsi256_si128(w), hi = _mm256_extracti128_si256(w, 1);
  return _mm_packus_epi16(lo, hi);
}

// out[0..15]: the codes of x[i] * inv (x 32-byte aligned), 8 lanes at a time by codec.encode8.
template <class Codec>
inline void encode_run16(const Codec& codec, const float* x, __m256 inv, uint8_t* out) {
  const __m128i c = pack16(codec.encode8(_mm256_mul_ps(_mm256_load_ps(x), inv)),
                           codec.encode8(_mm256_mul_ps(_mm256_load_ps(x + 8), inv)));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(out), c);
}

// A code through its table: gathers, for any code.
struct TableCodec {
  static constexpr int64_t kRun = 16;
  const StateCode& c;
  void decode2(const uint8_t* q, __m256 scale, __m256 out[2]) const {
    out[0] = decode8(q, c.table, scale);
    out[1] = decode8(q + 8, c.table, scale);
  }
  __m256i encode8(__m256 x) const { return ::qengine::cpu::encode8(x, c); }
  void encode(const float* x, __m256 inv, uint8_t* out) const { encode_run16(*this, x, inv, out); }
};

// A code through its MinifloatForm (optim_math.h): minifloat_value_bits on 16 lanes and
// minifloat_encode on 8 (state_minifloat.cpp), each lane's piece chosen by a compare, no
// lookups. kSigned: a code with 0.0 and negatives (zero_code >= 0); else one without either
// (zero_code == -1), whose magnitude is code + 1, folded into the offsets. encode: finite |x| < 2.

template <bool kSigned>
struct MinifloatCodec : MinifloatVectors<F32x8> {
  explicit MinifloatCodec(const StateCode& c) : MinifloatVectors<F32x8>(minifloat_codec_constants(c.minifloat, kSigned)) {}

  static constexpr int64_t kRun = 16;  // codes per encode

  // 16 codes at once in 16-bit lanes: a magnitude's float bits have zero low halves (at most 7
  // mantissa bits), so the high halves are computed and the low ones interleaved as zeros.
  void decode2(const uint8_t* q, __m256 scale, __m256 out[2]) const {
    __m256i code = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q)));
    code = _mm256_permute4x64_epi64(code, 0xd8);  // codes 0-3 8-11 | 4-7 12-15: unpack restores order
    const __m256i s = kSigned ? _mm256_sub_epi16(code, zero_code16) : code;
    const __m256i mag = kSigned ? _mm256_abs_epi16(s) : code;  // unsigned: code, offsets folded
    const __m256i low = _mm256_cmpgt_epi16(first_top16, mag);
    __m256i high = _mm256_blendv_epi8(_mm256_sll_epi16(_mm256_add_epi16(mag, offset_top16), half_shift_top),
                                      _mm256_sll_epi16(_mm256_add_epi16(mag, offset_low16), half_shift_low), low);
    if constexpr (kSigned) {
      high = _mm256_andnot_si256(_mm256_cmpeq_epi16(mag, _mm256_setzero_si256()), high);  // 0.0
      high = _mm256_or_si256(high, _mm256_and_si256(s, _mm256_set1_epi16(INT16_MIN)));    // the sign
    }
    out[0] = _mm256_mul_ps(_mm256_castsi256_ps(_mm256_unpacklo_epi16(_mm256_setzero_si256(), high)), scale);
    out[1] = _mm256_mul_ps(_mm256_castsi256_ps(_mm256_unpackhi_epi16(_mm256_setzero_si256(), high)), scale);
  }

  void encode(const float* x, __m256 inv, uint8_t* out) const { encode_run16(*this, x, inv, out); }

  // Codes as int32 lanes, possibly outside 0..255: pack16's saturation clamps them.
  __m256i encode8(__m256 x) const {
    const __m256i u = _mm256_castps_si256(x);
    const __m256i sign_mask = _mm256_srai_epi32(u, 31);
    const __m256i a = _mm256_and_si256(u, _mm256_set1_epi32(INT32_MAX));
    const __m256i low = _mm256_cmpgt_epi32(split, a);
    // Ties go to the lower code: the smaller magnitude for x > 0, the larger one for x < 0.
    const __m256i rounded = kSigned ? _mm256_sub_epi32(a, sign_mask) : a;
    const __m256i raw = _mm256_srav_epi32(_mm256_add_epi32(rounded, _mm256_blendv_epi8(round_top, round_low, low)),
                                          _mm256_blendv_epi8(shift_top, shift_low, low));
    if constexpr (!kSigned) {
      // Below the smallest magnitude raw <= 0, which saturates to code 0, the nearest; every
      // negative x has code 0 too.
      return _mm256_andnot_si256(sign_mask, raw);
    } else {
      const __m256i nonzero = _mm256_cmpgt_epi32(a, _mm256_add_epi32(half_smallest, sign_mask));
      const __m256i mag = _mm256_and_si256(_mm256_max_epi32(raw, _mm256_set1_epi32(1)), nonzero);
      return _mm256_add_epi32(zero_code, _mm256_sign_epi32(mag, u));  // u's sign; u == 0 has mag 0
    }
  }
};

}  // namespace

const OptimKernels kOptimAvx2 = {
    .name = "avx2",
    .adamw32 = adamw32_span_of<F32x8>,
    .adamw8 = adamw8_span_of<F32x8, MinifloatCodec<true>, MinifloatCodec<false>, TableCodec>,
};

}  // namespace qengine::cpu
#endif
