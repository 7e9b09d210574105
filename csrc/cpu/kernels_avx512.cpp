// AVX-512 (F, BW, VL, DQ) kernels: 16 lanes; the 16-entry codebook and its midpoints live in
// one register each, so a 4-bit lookup is one permute. Compiled with -mavx512* only here.
#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>

#include <cmath>
#include <cstring>
#include <limits>

#include "cpu/kernels.h"
#include "qengine/status.h"

namespace qengine::cpu {
namespace {

template <int DT>
inline __m512 load16(const void* x, int64_t i) {
  if constexpr (DT == kFloat32) {
    return _mm512_loadu_ps(static_cast<const float*>(x) + i);
  } else if constexpr (DT == kBFloat16) {
    __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(x) + i));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  } else {
    __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(x) + i));
    return _mm512_cvtph_ps(h);
  }
}

template <int DT>
void stats_impl(const void* x, int64_t len, BlockStats* out) {
  const float inf = std::numeric_limits<float>::infinity();
  __m512 mn = _mm512_set1_ps(inf), mx = _mm512_set1_ps(-inf);
  __m512 poison = _mm512_setzero_ps();  // becomes NaN once x*0 meets a NaN or Inf
  const __m512 zero = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= len; i += 16) {
    __m512 v = load16<DT>(x, i);
    mn = _mm512_min_ps(mn, v);
    mx = _mm512_max_ps(mx, v);
    poison = _mm512_add_ps(poison, _mm512_mul_ps(v, zero));
  }
  BlockStats s;
  s.min = _mm512_reduce_min_ps(mn);
  s.max = _mm512_reduce_max_ps(mx);
  s.nonfinite = _mm512_cmp_ps_mask(poison, poison, _CMP_UNORD_Q) != 0;
  s.absmax = std::fmax(std::fabs(s.min), std::fabs(s.max));  // +0 for an all-zero block
  if (i < len) {
    BlockStats tail;
    scalar_block_stats(static_cast<const char*>(x) + i * dtype_size(DT), DT, len - i, &tail);
    merge_stats(&s, tail);
    s.absmax = std::fmax(std::fabs(s.min), std::fabs(s.max));  // +0 for an all-zero block
  }
  *out = s;
}

void block_stats(const void* x, int dtype, int64_t len, BlockStats* out) {
  if (dtype == kFloat32) stats_impl<kFloat32>(x, len, out);
  else if (dtype == kBFloat16) stats_impl<kBFloat16>(x, len, out);
  else stats_impl<kFloat16>(x, len, out);
}

template <int DT, int RULE, bool DIVIDE, int BITS>
void encode_impl(const void* x, int64_t len, const BlockNorm& norm, const Codebook& cb, uint8_t* codes) {
  const __m512 inv = _mm512_set1_ps(norm.inv), div = _mm512_set1_ps(norm.div);
  const __m512 off = _mm512_set1_ps(norm.offset);
  __m512 mids16 = BITS == 4 ? _mm512_loadu_ps(cb.midpoints) : _mm512_setzero_ps();
  // sorted_to_code may be null for identity-ordered tables (k-means).
  __m512i map16 = (BITS == 4 && !cb.identity_order)
                      ? _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(cb.sorted_to_code)))
                      : _mm512_setzero_si512();
  int64_t i = 0;
  for (; i + 16 <= len; i += 16) {
    __m512 v = load16<DT>(x, i);
    if constexpr (RULE == kMinmax) v = _mm512_sub_ps(v, off);
    v = DIVIDE ? _mm512_div_ps(v, div) : _mm512_mul_ps(v, inv);
    __m512i pos = _mm512_setzero_si512();
    for (int step = 1 << (BITS - 1); step > 0; step >>= 1) {
      __m512i probe = _mm512_add_epi32(pos, _mm512_set1_epi32(step - 1));
      __m512 t = BITS == 4 ? _mm512_permutexvar_ps(probe, mids16) : _mm512_i32gather_ps(probe, cb.midpoints, 4);
      __mmask16 gt = _mm512_cmp_ps_mask(v, t, _CMP_GT_OQ);
      pos = _mm512_mask_add_epi32(pos, gt, pos, _mm512_set1_epi32(step));
    }
    if (BITS == 4 && !cb.identity_order) pos = _mm512_permutexvar_epi32(pos, map16);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(codes + i), _mm512_cvtepi32_epi8(pos));
    if (BITS == 8 && !cb.identity_order) {
      for (int k = 0; k < 16; ++k) codes[i + k] = cb.sorted_to_code[codes[i + k]];
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

// Round-to-nearest-even float32 -> bfloat16 bits in the low half of each lane (finite input).
inline __m512i to_bf16_bits(__m512 v) {
  __m512i u = _mm512_castps_si512(v);
  __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  u = _mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), lsb));
  return _mm512_srli_epi32(u, 16);
}

template <int OUT>
inline void store16(void* out, int64_t i, __m512 v, bool stream) {
  if constexpr (OUT == kFloat32) {
    float* p = static_cast<float*>(out) + i;
    if (stream && (reinterpret_cast<uintptr_t>(p) & 63) == 0) _mm512_stream_ps(p, v);
    else _mm512_storeu_ps(p, v);
  } else {
    __m256i h = OUT == kBFloat16 ? _mm512_cvtepi32_epi16(to_bf16_bits(v))
                                 : _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    uint16_t* p = static_cast<uint16_t*>(out) + i;
    if (stream && (reinterpret_cast<uintptr_t>(p) & 31) == 0) _mm256_stream_si256(reinterpret_cast<__m256i*>(p), h);
    else _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), h);
  }
}

template <int RULE>
inline __m512 apply_scale(__m512 q, __m512 scale, __m512 offset) {
  return RULE == kMinmax ? _mm512_fmadd_ps(q, scale, offset) : _mm512_mul_ps(q, scale);
}

template <int OUT, int RULE>
void decode4(const uint8_t* packed, int64_t first, int64_t len, const Codebook& cb, float scale,
             float offset, void* out, bool stream) {
  int64_t i = 0;
  if (first & 1) {  // odd start: the low nibble of a shared byte
    scalar_decode(packed, first, 1, cb, scale, offset, RULE, out, OUT, false);
    i = 1;
  }
  const __m512 tbl = _mm512_loadu_ps(cb.table);
  const __m512 sc = _mm512_set1_ps(scale), of = _mm512_set1_ps(offset);
  const __m512i lo_idx = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
  const __m512i hi_idx = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
  const __m512i nib = _mm512_set1_epi32(0x0f);
  for (; i + 32 <= len; i += 32) {
    __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(packed + ((first + i) >> 1))));
    __m512 vh = _mm512_permutexvar_ps(_mm512_srli_epi32(b, 4), tbl);
    __m512 vl = _mm512_permutexvar_ps(_mm512_and_si512(b, nib), tbl);
    store16<OUT>(out, i, apply_scale<RULE>(_mm512_permutex2var_ps(vh, lo_idx, vl), sc, of), stream);
    store16<OUT>(out, i + 16, apply_scale<RULE>(_mm512_permutex2var_ps(vh, hi_idx, vl), sc, of), stream);
  }
  if (i < len) {
    scalar_decode(packed, first + i, len - i, cb, scale, offset, RULE,
                  static_cast<char*>(out) + i * dtype_size(OUT), OUT, false);
  }
}

// Whole 4-bit blocks with the block loop inside: the table and permutation constants stay in
// registers across blocks, and only the scale (and offset) change.
template <int OUT, int RULE>
void decode_blocks4_impl(const uint8_t* packed, int64_t first_block, int64_t count, int64_t blocksize,
                         const float* table, const float* scales, const float* offsets, void* out, bool stream) {
  const __m512 tbl = _mm512_loadu_ps(table);
  const __m512i lo_idx = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
  const __m512i hi_idx = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
  const __m512i nib = _mm512_set1_epi32(0x0f);
  for (int64_t b = 0; b < count; ++b) {
    const int64_t blk = first_block + b;
    const __m512 sc = _mm512_set1_ps(scales[blk]);
    const __m512 of = _mm512_set1_ps(RULE == kMinmax ? offsets[blk] : 0.0f);
    const uint8_t* src = packed + ((blk * blocksize) >> 1);
    const int64_t base = b * blocksize;
    for (int64_t i = 0; i < blocksize; i += 32) {
      __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + (i >> 1))));
      __m512 vh = _mm512_permutexvar_ps(_mm512_srli_epi32(bytes, 4), tbl);
      __m512 vl = _mm512_permutexvar_ps(_mm512_and_si512(bytes, nib), tbl);
      store16<OUT>(out, base + i, apply_scale<RULE>(_mm512_permutex2var_ps(vh, lo_idx, vl), sc, of), stream);
      store16<OUT>(out, base + i + 16, apply_scale<RULE>(_mm512_permutex2var_ps(vh, hi_idx, vl), sc, of), stream);
    }
  }
}

template <int OUT>
void decode_blocks4_out(const uint8_t* packed, int64_t first_block, int64_t count, int64_t blocksize,
                        const float* table, int rule, const float* scales, const float* offsets, void* out,
                        bool stream) {
  if (rule == kAbsmax) decode_blocks4_impl<OUT, kAbsmax>(packed, first_block, count, blocksize, table, scales, offsets, out, stream);
  else decode_blocks4_impl<OUT, kMinmax>(packed, first_block, count, blocksize, table, scales, offsets, out, stream);
}

void decode_blocks4(const uint8_t* packed, int64_t first_block, int64_t count, int64_t blocksize, const float* table,
                    int rule, const float* scales, const float* offsets, void* out, int out_dtype, bool stream) {
  if (out_dtype == kFloat32) decode_blocks4_out<kFloat32>(packed, first_block, count, blocksize, table, rule, scales, offsets, out, stream);
  else if (out_dtype == kBFloat16) decode_blocks4_out<kBFloat16>(packed, first_block, count, blocksize, table, rule, scales, offsets, out, stream);
  else decode_blocks4_out<kFloat16>(packed, first_block, count, blocksize, table, rule, scales, offsets, out, stream);
}

template <int OUT, int RULE>
void decode8(const uint8_t* packed, int64_t first, int64_t len, const Codebook& cb, float scale,
             float offset, void* out, bool stream) {
  const __m512 sc = _mm512_set1_ps(scale), of = _mm512_set1_ps(offset);
  int64_t i = 0;
  for (; i + 16 <= len; i += 16) {
    __m512i q = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(packed + first + i)));
    __m512 v = _mm512_i32gather_ps(q, cb.table, 4);
    store16<OUT>(out, i, apply_scale<RULE>(v, sc, of), stream);
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

// Binary search of 16 normalised values over the 16 padded midpoints held in a register.
inline __m512i sorted_index16(__m512 v, __m512 mids16) {
  __m512i pos = _mm512_setzero_si512();
  for (int step = 8; step > 0; step >>= 1) {
    __m512 t = _mm512_permutexvar_ps(_mm512_add_epi32(pos, _mm512_set1_epi32(step - 1)), mids16);
    pos = _mm512_mask_add_epi32(pos, _mm512_cmp_ps_mask(v, t, _CMP_GT_OQ), pos, _mm512_set1_epi32(step));
  }
  return pos;
}

// Fused 4-bit path: per block, one pass for the statistics and one (from L1) that encodes
// and packs pairs of codes straight into bytes.
template <int DT, int RULE>
int quantize_blocks4_impl(const void* x, int64_t blocksize, int64_t b0, int64_t b1, const Codebook& cb,
                          uint8_t* packed, float* scales, float* offsets) {
  const __m512 mids16 = _mm512_loadu_ps(cb.midpoints);
  const bool remap = !cb.identity_order;
  const __m512i map16 = remap ? _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(cb.sorted_to_code)))
                              : _mm512_setzero_si512();
  const __m512 zero = _mm512_setzero_ps();
  const __m512 sign = _mm512_castsi512_ps(_mm512_set1_epi32(0x7fffffff));
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t base = b * blocksize;
    __m512 acc0 = _mm512_set1_ps(RULE == kAbsmax ? 0.0f : std::numeric_limits<float>::infinity());
    __m512 acc1 = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
    __m512 poison = zero;
    // absmax rule: the integer max of |x|'s bits is |x|'s max (non-negative floats order like
    // their bits), and NaN / Inf bit patterns sort above every finite value: one op per vector.
    __m512i abs_bits = _mm512_setzero_si512();
    for (int64_t j = 0; j < blocksize; j += 16) {
      __m512 v = load16<DT>(x, base + j);
      if constexpr (RULE == kAbsmax) {
        abs_bits = _mm512_max_epu32(abs_bits, _mm512_castps_si512(_mm512_and_ps(v, sign)));
      } else {
        acc0 = _mm512_min_ps(acc0, v);
        acc1 = _mm512_max_ps(acc1, v);
        poison = _mm512_add_ps(poison, _mm512_mul_ps(v, zero));
      }
    }
    BlockStats st{};
    if constexpr (RULE == kAbsmax) {
      const uint32_t top = static_cast<uint32_t>(_mm512_reduce_max_epu32(abs_bits));
      if (top >= 0x7f800000u) return kNonFiniteInput;
      st.absmax = bits_float(top);
    } else {
      if (_mm512_cmp_ps_mask(poison, poison, _CMP_UNORD_Q) != 0) return kNonFiniteInput;
      st.min = _mm512_reduce_min_ps(acc0);
      st.max = _mm512_reduce_max_ps(acc1);
    }
    const BlockNorm norm = make_block_norm(st, RULE, false);
    if (!(norm.scale <= std::numeric_limits<float>::max())) return kScaleOverflow;
    scales[b] = norm.scale;
    if (RULE == kMinmax) offsets[b] = norm.offset;
    const __m512 inv = _mm512_set1_ps(norm.inv), off = _mm512_set1_ps(norm.offset);
    for (int64_t j = 0; j < blocksize; j += 16) {
      __m512 v = load16<DT>(x, base + j);
      if constexpr (RULE == kMinmax) v = _mm512_sub_ps(v, off);
      __m512i q = sorted_index16(_mm512_mul_ps(v, inv), mids16);
      if (remap) q = _mm512_permutexvar_epi32(q, map16);
      // 64-bit lane k holds codes 2k (low half) and 2k+1: byte = code[2k] << 4 | code[2k+1].
      __m512i pairs = _mm512_or_si512(_mm512_slli_epi64(q, 4), _mm512_srli_epi64(q, 32));
      _mm_storel_epi64(reinterpret_cast<__m128i*>(packed + ((base + j) >> 1)), _mm512_cvtepi64_epi8(pairs));
    }
  }
  return kOk;
}

template <int DT>
int quantize_blocks4_dt(const void* x, int64_t bs, int64_t b0, int64_t b1, const Codebook& cb, int rule,
                        uint8_t* packed, float* scales, float* offsets) {
  if (rule == kAbsmax) return quantize_blocks4_impl<DT, kAbsmax>(x, bs, b0, b1, cb, packed, scales, offsets);
  return quantize_blocks4_impl<DT, kMinmax>(x, bs, b0, b1, cb, packed, scales, offsets);
}

int quantize_blocks4(const void* x, int dtype, int64_t bs, int64_t b0, int64_t b1, const Codebook& cb, int rule,
                     uint8_t* packed, float* scales, float* offsets) {
  if (cb.bits != 4 || bs % 32 != 0) return kInvalidArgument;
  if (dtype == kFloat32) return quantize_blocks4_dt<kFloat32>(x, bs, b0, b1, cb, rule, packed, scales, offsets);
  if (dtype == kBFloat16) return quantize_blocks4_dt<kBFloat16>(x, bs, b0, b1, cb, rule, packed, scales, offsets);
  return quantize_blocks4_dt<kFloat16>(x, bs, b0, b1, cb, rule, packed, scales, offsets);
}

void dot_rows(const float* x, int64_t M, int64_t K, int64_t ldx, const float* w, float* y, int64_t ldy) {
  const int64_t K16 = K & ~int64_t{15};
  const __mmask16 tail = static_cast<__mmask16>((1u << (K - K16)) - 1u);
  int64_t m = 0;
  for (; m + 4 <= M; m += 4) {  // four rows share each weight load
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
    const float* x0 = x + m * ldx;
    for (int64_t k = 0; k < K16; k += 16) {
      __m512 wv = _mm512_loadu_ps(w + k);
      a0 = _mm512_fmadd_ps(_mm512_loadu_ps(x0 + k), wv, a0);
      a1 = _mm512_fmadd_ps(_mm512_loadu_ps(x0 + ldx + k), wv, a1);
      a2 = _mm512_fmadd_ps(_mm512_loadu_ps(x0 + 2 * ldx + k), wv, a2);
      a3 = _mm512_fmadd_ps(_mm512_loadu_ps(x0 + 3 * ldx + k), wv, a3);
    }
    if (tail) {
      __m512 wv = _mm512_maskz_loadu_ps(tail, w + K16);
      a0 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(tail, x0 + K16), wv, a0);
      a1 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(tail, x0 + ldx + K16), wv, a1);
      a2 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(tail, x0 + 2 * ldx + K16), wv, a2);
      a3 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(tail, x0 + 3 * ldx + K16), wv, a3);
    }
    y[m * ldy] = _mm512_reduce_add_ps(a0);
    y[(m + 1) * ldy] = _mm512_reduce_add_ps(a1);
    y[(m + 2) * ldy] = _mm512_reduce_add_ps(a2);
    y[(m + 3) * ldy] = _mm512_reduce_add_ps(a3);
  }
  for (; m < M; ++m) {  // one row: four accumulators to cover the FMA latency
    const float* xm = x + m * ldx;
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 64 <= K16; k += 64) {
      a0 = _mm512_fmadd_ps(_mm512_loadu_ps(xm + k), _mm512_loadu_ps(w + k), a0);
      a1 = _mm512_fmadd_ps(_mm512_loadu_ps(xm + k + 16), _mm512_loadu_ps(w + k + 16), a1);
      a2 = _mm512_fmadd_ps(_mm512_loadu_ps(xm + k + 32), _mm512_loadu_ps(w + k + 32), a2);
      a3 = _mm512_fmadd_ps(_mm512_loadu_ps(xm + k + 48), _mm512_loadu_ps(w + k + 48), a3);
    }
    for (; k < K16; k += 16) a0 = _mm512_fmadd_ps(_mm512_loadu_ps(xm + k), _mm512_loadu_ps(w + k), a0);
    if (tail) a1 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(tail, xm + K16), _mm512_maskz_loadu_ps(tail, w + K16), a1);
    y[m * ldy] = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
  }
}

void axpy_rows(const float* g, int64_t M, int64_t ldg, const float* w, int64_t K, float* acc, int64_t lda) {
  const int64_t K16 = K & ~int64_t{15};
  const __mmask16 tail = static_cast<__mmask16>((1u << (K - K16)) - 1u);
  for (int64_t m = 0; m < M; ++m) {
    const __m512 gv = _mm512_set1_ps(g[m * ldg]);
    float* am = acc + m * lda;
    for (int64_t k = 0; k < K16; k += 16) {
      _mm512_storeu_ps(am + k, _mm512_fmadd_ps(gv, _mm512_loadu_ps(w + k), _mm512_loadu_ps(am + k)));
    }
    if (tail) {
      __m512 r = _mm512_fmadd_ps(gv, _mm512_maskz_loadu_ps(tail, w + K16), _mm512_maskz_loadu_ps(tail, am + K16));
      _mm512_mask_storeu_ps(am + K16, tail, r);
    }
  }
}

}  // namespace

const Kernels kAvx512Kernels = {"avx512", block_stats, encode, decode, decode_blocks4, dot_rows, axpy_rows, avx512_gemv4,
                                  quantize_blocks4, nullptr, avx512_adamw32, avx512_adamw8};
const Kernels kAvx512Bf16Kernels = {"avx512_bf16", block_stats,      encode,            decode,
                                    decode_blocks4, dot_rows,        axpy_rows,         avx512_gemv4,
                                    quantize_blocks4, avx512_gemv4_bf16, avx512_adamw32, avx512_adamw8};

}  // namespace qengine::cpu
#endif
