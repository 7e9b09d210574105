// AVX-512 (F, BW, VL, DQ) row of the quantize family: 16 lanes; the 16-entry codebook and its
// midpoints live in one register each, so a 4-bit lookup is one permute.
#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>

#include <cmath>
#include <cstring>
#include <limits>

#include "cpu/common/ladder.h"
#include "cpu/common/simd_avx512.h"
#include "cpu/quantize/kernels.h"
#include "qengine/status.h"

namespace qengine::cpu {
namespace {

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
  block_stats_tail(x, DT, i, len, &s);
  *out = s;
}

void block_stats(const void* x, int dtype, int64_t len, BlockStats* out) {
  with_dtype(dtype, [&](auto dt) { stats_impl<dt>(x, len, out); });
}

template <int DT, int RULE, bool DIVIDE, int BITS>
void encode_impl(const void* x, int64_t len, const BlockNorm& norm, const Codebook& cb, uint8_t* codes) {
  const __m512 inv = _mm512_set1_ps(norm.inv), div = _mm512_set1_ps(norm.div);
  const __m512 off = _mm512_set1_ps(norm.offset);
  __m512 mids16 = BITS == 4 ? _mm512_loadu_ps(cb.midpoints) : _mm512_setzero_ps();
  // sorted_to_code may be null for identity-ordered tables (k-means).
  __m512i map16 = (BITS == 4 && !cb.identity_order)
                      ? load_codes16(cb.sorted_to_code)
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
  encode_tail(x, DT, i, len, norm, RULE, cb, codes);
}

void encode(const void* x, int dtype, int64_t len, const BlockNorm& n, int rule, const Codebook& cb, uint8_t* codes) {
  with_encode_params(dtype, rule, n.divide, cb.bits, [&](auto dt, auto r, auto divide, auto bits) {
    encode_impl<dt, r, divide, bits>(x, len, n, cb, codes);
  });
}

template <int RULE>
inline __m512 apply_scale(__m512 q, __m512 scale, __m512 offset) {
  return RULE == kMinmax ? _mm512_fmadd_ps(q, scale, offset) : _mm512_mul_ps(q, scale);
}

// 32 codes from 16 packed bytes (high nibble first), scaled, into out[i .. i + 32).
template <int OUT, int RULE>
inline void decode32(const uint8_t* src, __m512 tbl, __m512 sc, __m512 of, void* out, int64_t i, bool stream) {
  const __m512i lo_idx = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
  const __m512i hi_idx = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
  const __m512i b = load_codes16(src);
  const __m512 vh = lookup16(_mm512_srli_epi32(b, 4), tbl);
  const __m512 vl = lookup16(_mm512_and_si512(b, _mm512_set1_epi32(0x0f)), tbl);
  store16<OUT, true>(out, i, apply_scale<RULE>(_mm512_permutex2var_ps(vh, lo_idx, vl), sc, of), stream);
  store16<OUT, true>(out, i + 16, apply_scale<RULE>(_mm512_permutex2var_ps(vh, hi_idx, vl), sc, of), stream);
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
  for (; i + 32 <= len; i += 32) decode32<OUT, RULE>(packed + ((first + i) >> 1), tbl, sc, of, out, i, stream);
  decode_tail(packed, first, i, len, cb, scale, offset, RULE, out, OUT);
}

// Whole 4-bit blocks with the block loop inside: the table and permutation constants stay in
// registers across blocks, and only the scale (and offset) change.
template <int OUT, int RULE>
void decode_blocks4_impl(const uint8_t* packed, int64_t first_block, int64_t count, int64_t blocksize,
                         const float* table, const float* scales, const float* offsets, void* out, bool stream) {
  const __m512 tbl = _mm512_loadu_ps(table);
  for (int64_t b = 0; b < count; ++b) {
    const int64_t blk = first_block + b;
    const __m512 sc = _mm512_set1_ps(scales[blk]);
    const __m512 of = _mm512_set1_ps(RULE == kMinmax ? offsets[blk] : 0.0f);
    const uint8_t* src = packed + ((blk * blocksize) >> 1);
    const int64_t base = b * blocksize;
    for (int64_t i = 0; i < blocksize; i += 32) decode32<OUT, RULE>(src + (i >> 1), tbl, sc, of, out, base + i, stream);
  }
}

void decode_blocks4(const uint8_t* packed, int64_t first_block, int64_t count, int64_t blocksize, const float* table,
                    int rule, const float* scales, const float* offsets, void* out, int out_dtype, bool stream) {
  with_decode_params(out_dtype, rule, [&](auto dt, auto r) {
    decode_blocks4_impl<dt, r>(packed, first_block, count, blocksize, table, scales, offsets, out, stream);
  });
}

template <int OUT, int RULE>
void decode8(const uint8_t* packed, int64_t first, int64_t len, const Codebook& cb, float scale,
             float offset, void* out, bool stream) {
  const __m512 sc = _mm512_set1_ps(scale), of = _mm512_set1_ps(offset);
  int64_t i = 0;
  for (; i + 16 <= len; i += 16) {
    __m512i q = load_codes16(packed + first + i);
    __m512 v = _mm512_i32gather_ps(q, cb.table, 4);
    store16<OUT, true>(out, i, apply_scale<RULE>(v, sc, of), stream);
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
  const __m512i map16 = remap ? load_codes16(cb.sorted_to_code)
                              : _mm512_setzero_si512();
  const __m512 zero = _mm512_setzero_ps();
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
        abs_bits = max_abs_bits(abs_bits, v);
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

int quantize_blocks4(const void* x, int dtype, int64_t bs, int64_t b0, int64_t b1, const Codebook& cb, int rule,
                     uint8_t* packed, float* scales, float* offsets) {
  if (cb.bits != 4 || bs % 32 != 0) return kInvalidArgument;
  return with_decode_params(dtype, rule, [&](auto dt, auto r) {
    return quantize_blocks4_impl<dt, r>(x, bs, b0, b1, cb, packed, scales, offsets);
  });
}

}  // namespace

const QuantizeKernels kQuantizeAvx512 = {
    .block_stats = block_stats,
    .encode = encode,
    .decode = decode,
    .decode_blocks4 = decode_blocks4,
    .quantize_blocks4 = quantize_blocks4,
};

}  // namespace qengine::cpu
#endif
