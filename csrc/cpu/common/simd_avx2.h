// AVX2 + FMA + F16C primitives every family's *_avx2.cpp is written with: 8-lane loads and
// stores of each dtype (one bfloat16 rounding rule: float_to_bf16's), horizontal reductions and
// the 16-entry lookup. Include only from files compiled with AVX2 flags (anonymous namespace:
// each includer's own copy, see simd_avx512.h).
#pragma once
#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>

#include <cstdint>

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

}  // namespace
}  // namespace qengine::cpu
#endif
