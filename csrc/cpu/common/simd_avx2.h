// AVX2 + FMA + F16C primitives every family's *_avx2.cpp is written with: 8-lane loads and
// stores of each dtype (one bfloat16 rounding rule: float_to_bf16's), horizontal reductions and
// the 16-entry lookup. Include only from files compiled with AVX2 flags (anonymous namespace:
// each includer's own copy, see simd_avx512.h).
#pragma once
#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>

#include <cstdint>
#include <cstring>

#include "qengine/dtype.h"

namespace qengine::cpu {
namespace {  // NOLINT(build/namespaces): see above

template <int DT>
inline __m256 load8(const void* x, int64_t i) {
  if constexpr (DT == kFloat32) {
    return _mm256_loadu_ps(static_cast<const float*>(x) + i);
  } else {
    __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(x) + i));
    if constexpr (DT == kBFloat16) return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    else return _mm256_cvtph_ps(h);
  }
}

// float_to_bf16 on 8 lanes: round to nearest even, NaN -> quiet NaN; results in 16 bytes.
template <bool kFinite = false>
inline __m128i to_bf16(__m256 v) {
  __m256i u = _mm256_castps_si256(v);
  __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7fff), lsb)), 16);
  if constexpr (!kFinite) {  // as simd_avx512.h's to_bf16
    __m256i nan = _mm256_or_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(0x40));
    r = _mm256_blendv_epi8(r, nan, _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q)));
  }
  return _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
}

// `stream`: non-temporal stores where aligned (large outputs not read back soon).
template <int DT, bool kFinite = false>
inline void store8(void* out, int64_t i, __m256 v, bool stream = false) {
  if constexpr (DT == kFloat32) {
    float* p = static_cast<float*>(out) + i;
    if (stream && (reinterpret_cast<uintptr_t>(p) & 31) == 0) _mm256_stream_ps(p, v);
    else _mm256_storeu_ps(p, v);
  } else {
    __m128i h = DT == kBFloat16 ? to_bf16<kFinite>(v) : _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    uint16_t* p = static_cast<uint16_t*>(out) + i;
    if (stream && (reinterpret_cast<uintptr_t>(p) & 15) == 0) _mm_stream_si128(reinterpret_cast<__m128i*>(p), h);
    else _mm_storeu_si128(reinterpret_cast<__m128i*>(p), h);
  }
}

// op over the 8 lanes, pairwise (op on 4-lane halves, then 2, then 1).
template <class Op>
inline float hreduce(__m256 v, Op op) {
  __m128 m = op(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = op(m, _mm_movehl_ps(m, m));
  m = op(m, _mm_shuffle_ps(m, m, 1));
  return _mm_cvtss_f32(m);
}

inline float hsum(__m256 v) { return hreduce(v, [](__m128 a, __m128 b) { return _mm_add_ps(a, b); }); }
inline float hmin(__m256 v) { return hreduce(v, [](__m128 a, __m128 b) { return _mm_min_ps(a, b); }); }
inline float hmax(__m256 v) { return hreduce(v, [](__m128 a, __m128 b) { return _mm_max_ps(a, b); }); }

// The largest of 8 non-negative int32 lanes.
inline uint32_t hmax_bits(__m256i v) {
  __m128i m = _mm_max_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  m = _mm_max_epi32(m, _mm_shuffle_epi32(m, 0x4e));
  m = _mm_max_epi32(m, _mm_shuffle_epi32(m, 0xb1));
  return static_cast<uint32_t>(_mm_cvtsi128_si32(m));
}

// |x|'s bits: as integers they order like |x|, with every NaN above +inf (see simd_avx512.h).
inline __m256i max_abs_bits(__m256i acc, __m256 x) {
  return _mm256_max_epi32(acc, _mm256_and_si256(_mm256_castps_si256(x), _mm256_set1_epi32(0x7fffffff)));
}

// table[idx] for a 16-entry table held in two registers (idx in 0..15).
inline __m256 lookup16(__m256i idx, __m256 lo, __m256 hi) {
  __m256 a = _mm256_permutevar8x32_ps(lo, idx);
  __m256 b = _mm256_permutevar8x32_ps(hi, idx);
  __m256i upper = _mm256_cmpgt_epi32(idx, _mm256_set1_epi32(7));
  return _mm256_blendv_ps(a, b, _mm256_castsi256_ps(upper));
}

// 8 byte codes widened to int32 lanes.
inline __m256i load_codes8(const uint8_t* q) {
  return _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q)));
}

// The low byte of each of 8 int32 lanes, stored as 8 bytes.
inline void store_low_bytes(uint8_t* dst, __m256i v) {
  const __m256i pick = _mm256_setr_epi8(0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,
                                        0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1);
  __m256i b = _mm256_shuffle_epi8(v, pick);
  uint32_t lo = static_cast<uint32_t>(_mm_cvtsi128_si32(_mm256_castsi256_si128(b)));
  uint32_t hi = static_cast<uint32_t>(_mm256_extract_epi32(b, 4));
  std::memcpy(dst, &lo, 4);
  std::memcpy(dst + 4, &hi, 4);
}

// The vector type loops written once for every ISA take (F32x16 in simd_avx512.h has the same
// members): float32 lanes F, int32 lanes I, and the operations those loops use.
struct F32x8 {
  using F = __m256;
  using I = __m256i;
  static constexpr int kLanes = 8;
  static constexpr int kRegisters = 16;  // vector registers of the ISA
  template <int DT>
  static F load(const void* x, int64_t i) { return load8<DT>(x, i); }
  // Values that are never NaN (decoded weights): the bfloat16 NaN fix-up skipped.
  template <int DT>
  static void store_finite(void* out, int64_t i, F v, bool stream) { store8<DT, true>(out, i, v, stream); }
  template <int DT>
  static void store(void* out, int64_t i, F v) { store8<DT>(out, i, v); }
  static F loadu(const float* x) { return _mm256_loadu_ps(x); }
  static void storeu(float* out, F v) { _mm256_storeu_ps(out, v); }
  static F set1(float v) { return _mm256_set1_ps(v); }
  static F neg(F a) { return _mm256_xor_ps(a, _mm256_set1_ps(-0.0f)); }
  static F sqrt(F a) { return _mm256_sqrt_ps(a); }
  static F add(F a, F b) { return _mm256_add_ps(a, b); }
  static F sub(F a, F b) { return _mm256_sub_ps(a, b); }
  static F mul(F a, F b) { return _mm256_mul_ps(a, b); }
  static F div(F a, F b) { return _mm256_div_ps(a, b); }
  static F fmadd(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
  static F min(F a, F b) { return _mm256_min_ps(a, b); }
  static F max(F a, F b) { return _mm256_max_ps(a, b); }
  static float reduce_min(F v) { return hmin(v); }
  static float reduce_max(F v) { return hmax(v); }
  static bool any_nan(F v) { return _mm256_movemask_ps(_mm256_cmp_ps(v, v, _CMP_UNORD_Q)) != 0; }
  static I iset1(int v) { return _mm256_set1_epi32(v); }
  static I iset1_16(int16_t v) { return _mm256_set1_epi16(v); }
  static I iadd(I a, I b) { return _mm256_add_epi32(a, b); }
  // Running maxima of float bits as int32 lanes (acc starts at 0): of |x| (every NaN above
  // +inf), and of x itself (negatives never win); the largest lane, a signed max.
  static I max_abs_bits(I acc, F x) { return ::qengine::cpu::max_abs_bits(acc, x); }
  static I max_pos_bits(I acc, F x) { return _mm256_max_epi32(acc, _mm256_castps_si256(x)); }
  static uint32_t reduce_max_bits(I acc) { return hmax_bits(acc); }
  // a + step in the lanes where v > t (ordered), a elsewhere.
  static I add_where_greater(I a, F v, F t, int step) {
    const I gt = _mm256_castps_si256(_mm256_cmp_ps(v, t, _CMP_GT_OQ));
    return _mm256_add_epi32(a, _mm256_and_si256(gt, _mm256_set1_epi32(step)));
  }
  static I load_codes(const uint8_t* q) { return load_codes8(q); }
  static void store_codes(uint8_t* dst, I codes) { store_low_bytes(dst, codes); }
  static F gather(const float* base, I idx) { return _mm256_i32gather_ps(base, idx, 4); }
  // A 16-entry table of floats (or of int32 codes, as their bits) in registers.
  struct Table16 {
    F lo, hi;
  };
  static Table16 table16(const float* t) { return {_mm256_loadu_ps(t), _mm256_loadu_ps(t + 8)}; }
  static Table16 code_table16(const uint8_t* c) {
    return {_mm256_castsi256_ps(load_codes8(c)), _mm256_castsi256_ps(load_codes8(c + 8))};
  }
  static F lookup(I idx, const Table16& t) { return lookup16(idx, t.lo, t.hi); }
  static I lookup_code(I idx, const Table16& t) { return _mm256_castps_si256(lookup16(idx, t.lo, t.hi)); }
};

}  // namespace
}  // namespace qengine::cpu
#endif
