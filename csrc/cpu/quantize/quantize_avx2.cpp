// AVX2 + FMA + F16C row of the quantize family: 8 lanes; a 16-entry lookup is two in-register
// permutes and a blend.
#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>

#include <cmath>
#include <cstring>
#include <limits>

#include "cpu/common/ladder.h"
#include "cpu/common/simd_avx2.h"
#include "cpu/quantize/kernels.h"

namespace qengine::cpu {
namespace {

template <int DT>
void stats_impl(const void* x, int64_t len, BlockStats* out) {
  const float inf = std::numeric_limits<float>::infinity();
  __m256 mn = _mm256_set1_ps(inf), mx = _mm256_set1_ps(-inf);
  __m256 poison = _mm256_setzero_ps();  // becomes NaN once x*0 meets a NaN or Inf
  const __m256 zero = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= len; i += 8) {
    __m256 v = load8<DT>(x, i);
    mn = _mm256_min_ps(mn, v);
    mx = _mm256_max_ps(mx, v);
    poison = _mm256_add_ps(poison, _mm256_mul_ps(v, zero));
  }
  BlockStats s;
  s.min = hmin(mn);
  s.max = hmax(mx);
  s.nonfinite = _mm256_movemask_ps(_mm256_cmp_ps(poison, poison, _CMP_UNORD_Q)) != 0;
  s.absmax = std::fmax(std::fabs(s.min), std::fabs(s.max));  // +0 for an all-zero block
  block_stats_tail(x, DT, i, len, &s);
  *out = s;
}

void block_stats(const void* x, int dtype, int64_t len, BlockStats* out) {
  with_dtype(dtype, [&](auto dt) { stats_impl<dt>(x, len, out); });
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

template <int DT, int RULE, bool DIVIDE, int BITS>
void encode_impl(const void* x, int64_t len, const BlockNorm& norm, const Codebook& cb, uint8_t* codes) {
  const __m256 inv = _mm256_set1_ps(norm.inv), div = _mm256_set1_ps(norm.div);
  const __m256 off = _mm256_set1_ps(norm.offset);
  __m256 mids_lo = _mm256_setzero_ps(), mids_hi = _mm256_setzero_ps();
  __m256 map_lo = _mm256_setzero_ps(), map_hi = _mm256_setzero_ps();
  if (BITS == 4) {  // sorted_to_code may be null for identity-ordered tables (k-means)
    mids_lo = _mm256_loadu_ps(cb.midpoints);
    mids_hi = _mm256_loadu_ps(cb.midpoints + 8);
    if (!cb.identity_order) {
      __m256i m0 = load_codes8(cb.sorted_to_code);
      __m256i m1 = load_codes8(cb.sorted_to_code + 8);
      map_lo = _mm256_castsi256_ps(m0);
      map_hi = _mm256_castsi256_ps(m1);
    }
  }
  int64_t i = 0;
  for (; i + 8 <= len; i += 8) {
    __m256 v = load8<DT>(x, i);
    if constexpr (RULE == kMinmax) v = _mm256_sub_ps(v, off);
    v = DIVIDE ? _mm256_div_ps(v, div) : _mm256_mul_ps(v, inv);
    __m256i pos = _mm256_setzero_si256();
    for (int step = 1 << (BITS - 1); step > 0; step >>= 1) {
      __m256i probe = _mm256_add_epi32(pos, _mm256_set1_epi32(step - 1));
      __m256 t = BITS == 4 ? lookup16(probe, mids_lo, mids_hi) : _mm256_i32gather_ps(cb.midpoints, probe, 4);
      __m256i gt = _mm256_castps_si256(_mm256_cmp_ps(v, t, _CMP_GT_OQ));
      pos = _mm256_add_epi32(pos, _mm256_and_si256(gt, _mm256_set1_epi32(step)));
    }
    if (BITS == 4 && !cb.identity_order) pos = _mm256_castps_si256(lookup16(pos, map_lo, map_hi));
    store_low_bytes(codes + i, pos);
    if (BITS == 8 && !cb.identity_order) {
      for (int k = 0; k < 8; ++k) codes[i + k] = cb.sorted_to_code[codes[i + k]];
    }
  }
  encode_tail(x, DT, i, len, norm, RULE, cb, codes);
}

void encode(const void* x, int dtype, int64_t len, const BlockNorm& n, int rule, const Codebook& cb, uint8_t* codes) {
  with_encode_params(dtype, rule, n.divide, cb.bits, [&](auto dt, auto r, auto divide, auto bits) {
    encode_impl<dt, r, divide, bits>(x, len, n, cb, codes);
  });
}

template <int RULE>
inline __m256 apply_scale(__m256 q, __m256 scale, __m256 offset) {
  return RULE == kMinmax ? _mm256_fmadd_ps(q, scale, offset) : _mm256_mul_ps(q, scale);
}

template <int OUT, int RULE>
void decode4(const uint8_t* packed, int64_t first, int64_t len, const Codebook& cb, float scale,
             float offset, void* out, bool stream) {
  int64_t i = 0;
  if (first & 1) {  // odd start: the low nibble of a shared byte
    scalar_decode(packed, first, 1, cb, scale, offset, RULE, out, OUT, false);
    i = 1;
  }
  const __m256 tlo = _mm256_loadu_ps(cb.table), thi = _mm256_loadu_ps(cb.table + 8);
  const __m256 sc = _mm256_set1_ps(scale), of = _mm256_set1_ps(offset);
  const __m256i nib = _mm256_set1_epi32(0x0f);
  for (; i + 16 <= len; i += 16) {
    __m256i b = load_codes8(packed + ((first + i) >> 1));
    __m256 vh = lookup16(_mm256_srli_epi32(b, 4), tlo, thi);
    __m256 vl = lookup16(_mm256_and_si256(b, nib), tlo, thi);
    __m256 a = _mm256_unpacklo_ps(vh, vl);  // h0 l0 h1 l1 | h4 l4 h5 l5
    __m256 c = _mm256_unpackhi_ps(vh, vl);  // h2 l2 h3 l3 | h6 l6 h7 l7
    store8<OUT, true>(out, i, apply_scale<RULE>(_mm256_permute2f128_ps(a, c, 0x20), sc, of), stream);
    store8<OUT, true>(out, i + 8, apply_scale<RULE>(_mm256_permute2f128_ps(a, c, 0x31), sc, of), stream);
  }
  decode_tail(packed, first, i, len, cb, scale, offset, RULE, out, OUT);
}

template <int OUT, int RULE>
void decode8(const uint8_t* packed, int64_t first, int64_t len, const Codebook& cb, float scale,
             float offset, void* out, bool stream) {
  const __m256 sc = _mm256_set1_ps(scale), of = _mm256_set1_ps(offset);
  int64_t i = 0;
  for (; i + 8 <= len; i += 8) {
    __m256i q = load_codes8(packed + first + i);
    store8<OUT, true>(out, i, apply_scale<RULE>(_mm256_i32gather_ps(cb.table, q, 4), sc, of), stream);
  }
  decode_tail(packed, first, i, len, cb, scale, offset, RULE, out, OUT);
}

void decode(const uint8_t* packed, int64_t first, int64_t len, const Codebook& cb, float scale,
            float offset, int rule, void* out, int out_dtype, bool stream) {
  with_decode_params(out_dtype, rule, [&](auto dt, auto r) {
    if (cb.bits == 4) decode4<dt, r>(packed, first, len, cb, scale, offset, out, stream);
    else decode8<dt, r>(packed, first, len, cb, scale, offset, out, stream);
  });
}

}  // namespace

const QuantizeKernels kQuantizeAvx2 = {
    .block_stats = block_stats,
    .encode = encode,
    .decode = decode,
};

}  // namespace qengine::cpu
#endif
