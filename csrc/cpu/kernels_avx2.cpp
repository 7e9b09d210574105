// AVX2 + FMA + F16C kernels: 8 lanes; a 16-entry lookup is two in-register permutes and a
// blend. Compiled with -mavx2 -mfma -mf16c only here.
#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>

#include <cmath>
#include <cstring>
#include <limits>

#include "cpu/kernels.h"

namespace qengine::cpu {
namespace {

template <int DT>
inline __m256 load8(const void* x, int64_t i) {
  if constexpr (DT == kFloat32) {
    return _mm256_loadu_ps(static_cast<const float*>(x) + i);
  } else if constexpr (DT == kBFloat16) {
    __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(x) + i));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  } else {
    __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(x) + i));
    return _mm256_cvtph_ps(h);
  }
}

inline float hmin(__m256 v) {
  __m128 m = _mm_min_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_min_ps(m, _mm_movehl_ps(m, m));
  m = _mm_min_ss(m, _mm_shuffle_ps(m, m, 1));
  return _mm_cvtss_f32(m);
}

inline float hmax(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_shuffle_ps(m, m, 1));
  return _mm_cvtss_f32(m);
}

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
  if (i < len) {
    BlockStats tail;
    scalar_block_stats(static_cast<const char*>(x) + i * dtype_size(DT), DT, len - i, &tail);
    merge_stats(&s, tail);
  }
  s.absmax = std::fmax(std::fabs(s.min), std::fabs(s.max));  // +0 for an all-zero block
  *out = s;
}

void block_stats(const void* x, int dtype, int64_t len, BlockStats* out) {
  if (dtype == kFloat32) stats_impl<kFloat32>(x, len, out);
  else if (dtype == kBFloat16) stats_impl<kBFloat16>(x, len, out);
  else stats_impl<kFloat16>(x, len, out);
}

// table[idx] for a 16-entry table held in two registers (idx in 0..15).
inline __m256 lookup16(__m256i idx, __m256 lo, __m256 hi) {
  __m256 a = _mm256_permutevar8x32_ps(lo, idx);
  __m256 b = _mm256_permutevar8x32_ps(hi, idx);
  __m256i upper = _mm256_cmpgt_epi32(idx, _mm256_set1_epi32(7));
  return _mm256_blendv_ps(a, b, _mm256_castsi256_ps(upper));
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
      __m256i m0 = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(cb.sorted_to_code)));
      __m256i m1 = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(cb.sorted_to_code + 8)));
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
  if (i < len) scalar_encode(static_cast<const char*>(x) + i * dtype_size(DT), DT, len - i, norm, RULE, cb, codes + i);
}

template <int DT, int RULE, bool DIVIDE>
void encode_bits(const void* x, int64_t len, const BlockNorm& n, const Codebook& cb, uint8_t* codes) {
  if (cb.bits == 4) encode_impl<DT, RULE, DIVIDE, 4>(x, len, n, cb, codes);
  else encode_impl<DT, RULE, DIVIDE, 8>(x, len, n, cb, codes);
}

template <int DT>
void encode_dt(const void* x, int64_t len, const BlockNorm& n, int rule, const Codebook& cb, uint8_t* codes) {
  if (rule == kAbsmax) {
    if (n.divide) encode_bits<DT, kAbsmax, true>(x, len, n, cb, codes);
    else encode_bits<DT, kAbsmax, false>(x, len, n, cb, codes);
  } else {
    if (n.divide) encode_bits<DT, kMinmax, true>(x, len, n, cb, codes);
    else encode_bits<DT, kMinmax, false>(x, len, n, cb, codes);
  }
}

void encode(const void* x, int dtype, int64_t len, const BlockNorm& n, int rule, const Codebook& cb, uint8_t* codes) {
  if (dtype == kFloat32) encode_dt<kFloat32>(x, len, n, rule, cb, codes);
  else if (dtype == kBFloat16) encode_dt<kBFloat16>(x, len, n, rule, cb, codes);
  else encode_dt<kFloat16>(x, len, n, rule, cb, codes);
}

template <int OUT>
inline void store8(void* out, int64_t i, __m256 v, bool stream) {
  if constexpr (OUT == kFloat32) {
    float* p = static_cast<float*>(out) + i;
    if (stream && (reinterpret_cast<uintptr_t>(p) & 31) == 0) _mm256_stream_ps(p, v);
    else _mm256_storeu_ps(p, v);
  } else {
    __m128i h;
    if constexpr (OUT == kBFloat16) {
      __m256i u = _mm256_castps_si256(v);
      __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
      u = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7fff), lsb)), 16);
      __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(u, u), 0x08);
      h = _mm256_castsi256_si128(packed);
    } else {
      h = _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    }
    uint16_t* p = static_cast<uint16_t*>(out) + i;
    if (stream && (reinterpret_cast<uintptr_t>(p) & 15) == 0) _mm_stream_si128(reinterpret_cast<__m128i*>(p), h);
    else _mm_storeu_si128(reinterpret_cast<__m128i*>(p), h);
  }
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
    __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(packed + ((first + i) >> 1))));
    __m256 vh = lookup16(_mm256_srli_epi32(b, 4), tlo, thi);
    __m256 vl = lookup16(_mm256_and_si256(b, nib), tlo, thi);
    __m256 a = _mm256_unpacklo_ps(vh, vl);  // h0 l0 h1 l1 | h4 l4 h5 l5
    __m256 c = _mm256_unpackhi_ps(vh, vl);  // h2 l2 h3 l3 | h6 l6 h7 l7
    store8<OUT>(out, i, apply_scale<RULE>(_mm256_permute2f128_ps(a, c, 0x20), sc, of), stream);
    store8<OUT>(out, i + 8, apply_scale<RULE>(_mm256_permute2f128_ps(a, c, 0x31), sc, of), stream);
  }
  if (i < len) {
    scalar_decode(packed, first + i, len - i, cb, scale, offset, RULE,
                  static_cast<char*>(out) + i * dtype_size(OUT), OUT, false);
  }
}

template <int OUT, int RULE>
void decode8(const uint8_t* packed, int64_t first, int64_t len, const Codebook& cb, float scale,
             float offset, void* out, bool stream) {
  const __m256 sc = _mm256_set1_ps(scale), of = _mm256_set1_ps(offset);
  int64_t i = 0;
  for (; i + 8 <= len; i += 8) {
    __m256i q = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(packed + first + i)));
    store8<OUT>(out, i, apply_scale<RULE>(_mm256_i32gather_ps(cb.table, q, 4), sc, of), stream);
  }
  if (i < len) {
    scalar_decode(packed, first + i, len - i, cb, scale, offset, RULE,
                  static_cast<char*>(out) + i * dtype_size(OUT), OUT, false);
  }
}

template <int OUT, int RULE>
void decode_rule(const uint8_t* packed, int64_t first, int64_t len, const Codebook& cb, float scale,
                 float offset, void* out, bool stream) {
  if (cb.bits == 4) decode4<OUT, RULE>(packed, first, len, cb, scale, offset, out, stream);
  else decode8<OUT, RULE>(packed, first, len, cb, scale, offset, out, stream);
}

template <int OUT>
void decode_out(const uint8_t* packed, int64_t first, int64_t len, const Codebook& cb, float scale,
                float offset, int rule, void* out, bool stream) {
  if (rule == kAbsmax) decode_rule<OUT, kAbsmax>(packed, first, len, cb, scale, offset, out, stream);
  else decode_rule<OUT, kMinmax>(packed, first, len, cb, scale, offset, out, stream);
}

void decode(const uint8_t* packed, int64_t first, int64_t len, const Codebook& cb, float scale,
            float offset, int rule, void* out, int out_dtype, bool stream) {
  if (out_dtype == kFloat32) decode_out<kFloat32>(packed, first, len, cb, scale, offset, rule, out, stream);
  else if (out_dtype == kBFloat16) decode_out<kBFloat16>(packed, first, len, cb, scale, offset, rule, out, stream);
  else decode_out<kFloat16>(packed, first, len, cb, scale, offset, rule, out, stream);
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}

void dot_rows(const float* x, int64_t M, int64_t K, int64_t ldx, const float* w, float* y, int64_t ldy) {
  const int64_t K8 = K & ~int64_t{7};
  int64_t m = 0;
  for (; m + 4 <= M; m += 4) {  // four rows share each weight load
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
    const float* x0 = x + m * ldx;
    for (int64_t k = 0; k < K8; k += 8) {
      __m256 wv = _mm256_loadu_ps(w + k);
      a0 = _mm256_fmadd_ps(_mm256_loadu_ps(x0 + k), wv, a0);
      a1 = _mm256_fmadd_ps(_mm256_loadu_ps(x0 + ldx + k), wv, a1);
      a2 = _mm256_fmadd_ps(_mm256_loadu_ps(x0 + 2 * ldx + k), wv, a2);
      a3 = _mm256_fmadd_ps(_mm256_loadu_ps(x0 + 3 * ldx + k), wv, a3);
    }
    float r[4] = {hsum(a0), hsum(a1), hsum(a2), hsum(a3)};
    for (int j = 0; j < 4; ++j) {
      for (int64_t k = K8; k < K; ++k) r[j] += x0[j * ldx + k] * w[k];
      y[(m + j) * ldy] = r[j];
    }
  }
  for (; m < M; ++m) {
    const float* xm = x + m * ldx;
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 16 <= K8; k += 16) {
      a0 = _mm256_fmadd_ps(_mm256_loadu_ps(xm + k), _mm256_loadu_ps(w + k), a0);
      a1 = _mm256_fmadd_ps(_mm256_loadu_ps(xm + k + 8), _mm256_loadu_ps(w + k + 8), a1);
    }
    for (; k < K8; k += 8) a0 = _mm256_fmadd_ps(_mm256_loadu_ps(xm + k), _mm256_loadu_ps(w + k), a0);
    float r = hsum(_mm256_add_ps(a0, a1));
    for (k = K8; k < K; ++k) r += xm[k] * w[k];
    y[m * ldy] = r;
  }
}

void axpy_rows(const float* g, int64_t M, int64_t ldg, const float* w, int64_t K, float* acc, int64_t lda) {
  const int64_t K8 = K & ~int64_t{7};
  for (int64_t m = 0; m < M; ++m) {
    const float gm = g[m * ldg];
    const __m256 gv = _mm256_set1_ps(gm);
    float* am = acc + m * lda;
    for (int64_t k = 0; k < K8; k += 8) {
      _mm256_storeu_ps(am + k, _mm256_fmadd_ps(gv, _mm256_loadu_ps(w + k), _mm256_loadu_ps(am + k)));
    }
    for (int64_t k = K8; k < K; ++k) am[k] += gm * w[k];
  }
}

}  // namespace

const Kernels kAvx2Kernels = {"avx2",  block_stats, encode,  decode,  nullptr,      dot_rows,
                                 axpy_rows, nullptr,  nullptr, nullptr, avx2_adamw32, avx2_adamw8};

}  // namespace qengine::cpu
#endif
