// AVX2 spans of the fused AdamW step: 8 lanes, the same operations as adamw_element in the
// same order, so the bytes equal the scalar spans'. Compiled with -mavx2 -mfma -mf16c only here.
#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>

#include <algorithm>
#include <climits>
#include <cmath>

#include "cpu/common/simd_avx2.h"
#include "cpu/optim/kernels.h"
#include "cpu/optim/state_minifloat.h"

namespace qengine::cpu {
namespace {

struct Hyper8 {
  __m256 decay, w1, w1m1, beta2, w2, bc2, eps, step;
  explicit Hyper8(const AdamHyper& h)
      : decay(_mm256_set1_ps(h.decay)), w1(_mm256_set1_ps(h.w1)), w1m1(_mm256_set1_ps(h.w1 - 1.0f)),
        beta2(_mm256_set1_ps(h.beta2)), w2(_mm256_set1_ps(h.w2)), bc2(_mm256_set1_ps(h.bc2_sqrt)),
        eps(_mm256_set1_ps(h.eps)), step(_mm256_set1_ps(h.neg_step)) {}
};

template <bool kMaximize, bool kSmall>
inline void update8(__m256 g, __m256& p, __m256& m, __m256& v, const Hyper8& h) {
  if constexpr (kMaximize) g = _mm256_xor_ps(g, _mm256_set1_ps(-0.0f));
  p = _mm256_mul_ps(p, h.decay);
  const __m256 d = _mm256_sub_ps(g, m);
  m = kSmall ? _mm256_fmadd_ps(h.w1, d, m) : _mm256_fmadd_ps(h.w1m1, d, g);
  v = _mm256_fmadd_ps(_mm256_mul_ps(h.w2, g), g, _mm256_mul_ps(v, h.beta2));
  const __m256 denom = _mm256_add_ps(_mm256_div_ps(_mm256_sqrt_ps(v), h.bc2), h.eps);
  p = _mm256_add_ps(p, _mm256_div_ps(_mm256_mul_ps(h.step, m), denom));
}

template <int DT, bool kMaximize, bool kSmall>
void adamw32(const OptimTask& t, int64_t lo, int64_t hi, const AdamHyper& hs) {
  const auto [p, g, dt, m, v, q1, q2, a1, a2] = TaskArrays(t);
  const Hyper8 h(hs);
  int64_t i = lo;
  for (; i + 8 <= hi; i += 8) {
    __m256 pv = load8<DT>(p, i), mv = _mm256_loadu_ps(m + i), vv = _mm256_loadu_ps(v + i);
    update8<kMaximize, kSmall>(load8<DT>(g, i), pv, mv, vv, h);
    store8<DT>(p, i, pv);
    _mm256_storeu_ps(m + i, mv);
    _mm256_storeu_ps(v + i, vv);
  }
  if (i < hi) scalar_adamw32(t, i, hi, hs);
}

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

// A code through its table: gathers, for any code.
struct TableCodec {
  const StateCode& c;
  void decode16(const uint8_t* q, __m256 scale, __m256& first, __m256& second) const {
    first = decode8(q, c.table, scale);
    second = decode8(q + 8, c.table, scale);
  }
  __m256i encode(__m256 x) const { return encode8(x, c); }
};

// A code through its MinifloatForm (optim_math.h): minifloat_value_bits on 16 lanes and
// minifloat_encode on 8 (state_minifloat.cpp), each lane's piece chosen by a compare, no
// lookups. kSigned: a code with 0.0 and negatives (zero_code >= 0); else one without either
// (zero_code == -1), whose magnitude is code + 1, folded into the offsets. encode: finite |x| < 2.

template <bool kSigned>
struct MinifloatCodec {
  // The vectors of MinifloatCodecConstants (state_minifloat.h): encode in 32-bit lanes, decode
  // in 16-bit ones.
  __m256i shift_top, shift_low, round_top, round_low, zero_code, split, half_smallest;
  __m256i zero_code16, first_top16, offset_top16, offset_low16;
  __m128i half_shift_top, half_shift_low;
  explicit MinifloatCodec(const MinifloatForm& f) {
    const MinifloatCodecConstants k = minifloat_codec_constants(f, kSigned);
    shift_top = _mm256_set1_epi32(k.shift_top);
    shift_low = _mm256_set1_epi32(k.shift_low);
    round_top = _mm256_set1_epi32(k.round_top);
    round_low = _mm256_set1_epi32(k.round_low);
    zero_code = _mm256_set1_epi32(k.zero_code);
    split = _mm256_set1_epi32(static_cast<int>(k.split_bits));
    half_smallest = _mm256_set1_epi32(static_cast<int>(k.half_smallest));
    zero_code16 = _mm256_set1_epi16(static_cast<int16_t>(k.zero_code));
    first_top16 = _mm256_set1_epi16(static_cast<int16_t>(k.first_top));
    offset_top16 = _mm256_set1_epi16(static_cast<int16_t>(k.offset_top));
    offset_low16 = _mm256_set1_epi16(static_cast<int16_t>(k.offset_low));
    half_shift_top = _mm_cvtsi32_si128(k.half_shift_top);
    half_shift_low = _mm_cvtsi32_si128(k.half_shift_low);
  }

  // 16 codes at once in 16-bit lanes: a magnitude's float bits have zero low halves (at most 7
  // mantissa bits), so the high halves are computed and the low ones interleaved as zeros.
  void decode16(const uint8_t* q, __m256 scale, __m256& first, __m256& second) const {
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
    first = _mm256_mul_ps(_mm256_castsi256_ps(_mm256_unpacklo_epi16(_mm256_setzero_si256(), high)), scale);
    second = _mm256_mul_ps(_mm256_castsi256_ps(_mm256_unpackhi_epi16(_mm256_setzero_si256(), high)), scale);
  }

  // Codes as int32 lanes, possibly outside 0..255: pack16's saturation clamps them.
  __m256i encode(__m256 x) const {
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

// Two 8-lane code vectors -> 16 bytes, in order; lanes saturate to 0..255.
inline __m128i pack16(__m256i a, __m256i b) {
  __m256i w = _mm256_packus_epi32(a, b);                  // lanes: a0-3 b0-3 | a4-7 b4-7
  w = _mm256_permute4x64_epi64(w, 0xd8);                  // a0-3 a4-7 | b0-3 b4-7
  __m128i lo = _mm256_castsi256_si128(w), hi = _mm256_extracti128_si256(w, 1);
  return _mm_packus_epi16(lo, hi);
}

inline float reduce_absmax(__m256i acc) {
  const uint32_t bits = hmax_bits(acc);
  return bits_float(bits > 0x7f800000u ? 0x7fc00000u : bits);  // one canonical NaN, as absmax_step
}

// posmax_step on 8 lanes: x's bits as int32 (acc starts at 0, so negatives never win); reduced
// with hmax_bits, a signed max.
inline __m256i max_pos_bits(__m256i acc, __m256 x) { return _mm256_max_epi32(acc, _mm256_castps_si256(x)); }

// Encodes one state of a block: 256 codes of x[i] * inv.
template <class Codec>
inline void encode_block(const float* x, __m256 inv, const Codec& codec, uint8_t* out) {
  for (int64_t i = 0; i < kOptimBlock; i += 16) {
    const __m128i c = pack16(codec.encode(_mm256_mul_ps(_mm256_load_ps(x + i), inv)),
                             codec.encode(_mm256_mul_ps(_mm256_load_ps(x + i + 8), inv)));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + i), c);
  }
}

// kMinifloat: both codes through their MinifloatForm (m's signed, v's unsigned), except the
// encode of a block whose absmax is not finite (its values then need not lie in (-2, 2)),
// which searches the tables.
template <int DT, bool kMinifloat, bool kMaximize, bool kSmall>
void adamw8(const OptimTask& t, int64_t lo, int64_t hi, const AdamHyper& hs, const StateCode& c1,
            const StateCode& c2) {
  const auto [p, g, dt, m, v, q1, q2, a1, a2] = TaskArrays(t);
  const Hyper8 h(hs);
  auto codec = [](const StateCode& c, auto is_signed) {
    if constexpr (kMinifloat) return MinifloatCodec<decltype(is_signed)::value>(c.minifloat);
    else return TableCodec{c};
  };
  const auto k1 = codec(c1, std::true_type{}), k2 = codec(c2, std::false_type{});
  const TableCodec search1{c1}, search2{c2};
  alignas(32) float mt[kOptimBlock], vt[kOptimBlock];
  int64_t b0 = lo;
  for (; b0 + kOptimBlock <= hi; b0 += kOptimBlock) {
    const int64_t b = b0 / kOptimBlock;
    prefetch_block(t, b0 + kPrefetchBlocks * kOptimBlock, hi);
    const __m256 s1 = _mm256_set1_ps(a1[b]), s2 = _mm256_set1_ps(a2[b]);
    __m256i n1 = _mm256_setzero_si256(), p1 = n1, n2 = n1;
    for (int64_t i = 0; i < kOptimBlock; i += 16) {
      __m256 mv[2], vv[2];
      k1.decode16(q1 + b0 + i, s1, mv[0], mv[1]);
      k2.decode16(q2 + b0 + i, s2, vv[0], vv[1]);
      for (int j = 0; j < 2; ++j) {
        const int64_t e = b0 + i + 8 * j;
        __m256 pv = load8<DT>(p, e);
        update8<kMaximize, kSmall>(load8<DT>(g, e), pv, mv[j], vv[j], h);
        store8<DT>(p, e, pv);
        _mm256_store_ps(mt + i + 8 * j, mv[j]);
        _mm256_store_ps(vt + i + 8 * j, vv[j]);
        n1 = max_abs_bits(n1, mv[j]);
        p1 = max_pos_bits(p1, mv[j]);
        n2 = max_abs_bits(n2, vv[j]);
      }
    }
    const float m1 = m_signed_scale(reduce_absmax(n1), bits_float(hmax_bits(p1))), m2 = reduce_absmax(n2);
    a1[b] = m1;
    a2[b] = m2;
    const __m256 i1 = _mm256_set1_ps(state_inv_scale(m1)), i2 = _mm256_set1_ps(state_inv_scale(m2));
    if (kMinifloat && std::isfinite(m1) && std::isfinite(m2)) {  // a finite absmax bounds the block by 1
      encode_block(mt, i1, k1, q1 + b0);
      encode_block(vt, i2, k2, q2 + b0);
    } else {
      encode_block(mt, i1, search1, q1 + b0);
      encode_block(vt, i2, search2, q2 + b0);
    }
  }
  if (b0 < hi) scalar_adamw8(t, b0, hi, hs, c1, c2);  // the partial last block
}

void adamw32_span(const OptimTask& t, int64_t lo, int64_t hi, const AdamHyper& h) {
  with_span_params(t, h, [&](auto dt, auto mx, auto sm) { adamw32<dt, mx, sm>(t, lo, hi, h); });
}

void adamw8_span(const OptimTask& t, int64_t lo, int64_t hi, const AdamHyper& h, const StateCode& c1,
                 const StateCode& c2) {
  const bool forms = minifloat_forms(c1, c2);
  with_span_params(t, h, [&](auto dt, auto mx, auto sm) {
    with_bool(forms, [&](auto f) { adamw8<dt, f, mx, sm>(t, lo, hi, h, c1, c2); });
  });
}

}  // namespace

const OptimKernels kOptimAvx2 = {
    .name = "avx2",
    .adamw32 = adamw32_span,
    .adamw8 = adamw8_span,
};

}  // namespace qengine::cpu
#endif
