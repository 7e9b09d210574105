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
#include "cpu/quantize/quantize_loops.h"
#include "qengine/status.h"

namespace qengine::cpu {
namespace {

// 32 codes from 16 packed bytes (high nibble first), scaled, into out[i .. i + 32).
template <int OUT, int RULE>
inline void decode32(const uint8_t* src, __m512 tbl, __m512 sc, __m512 of, void* out, int64_t i, bool stream) {
  const __m512i lo_idx = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
  const __m512i hi_idx = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
  const __m512i b = load_codes16(src);
  const __m512 vh = lookup16(_mm512_srli_epi32(b, 4), tbl);
  const __m512 vl = lookup16(_mm512_and_si512(b, _mm512_set1_epi32(0x0f)), tbl);
  store16<OUT, true>(out, i, apply_scale<F32x16, RULE>(_mm512_permutex2var_ps(vh, lo_idx, vl), sc, of), stream);
  store16<OUT, true>(out, i + 16, apply_scale<F32x16, RULE>(_mm512_permutex2var_ps(vh, hi_idx, vl), sc, of), stream);
}

// The 4-bit decode's main loop (decode4 in quantize_loops.h): 16 bytes give 32 codes a step.
struct Nibbles {
  template <int OUT, int RULE>
  static int64_t run(const uint8_t* packed, int64_t first, int64_t i, int64_t len, const Codebook& cb, float scale,
                     float offset, void* out, bool stream) {
    const __m512 tbl = _mm512_loadu_ps(cb.table);
    const __m512 sc = _mm512_set1_ps(scale), of = _mm512_set1_ps(offset);
    for (; i + 32 <= len; i += 32) decode32<OUT, RULE>(packed + ((first + i) >> 1), tbl, sc, of, out, i, stream);
    return i;
  }
};

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
    .block_stats = block_stats<F32x16>,
    .encode = encode<F32x16>,
    .decode = decode<F32x16, Nibbles>,
    .decode_blocks4 = decode_blocks4,
    .quantize_blocks4 = quantize_blocks4,
};

}  // namespace qengine::cpu
#endif
