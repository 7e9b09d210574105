// The 8-bit AdamW span on CPUs with AVX-512 VBMI for state codes without a minifloat form
// (qengine's own codes take optim_avx512.cpp's arithmetic codec, 1.2-1.7x faster on Zen 5):
// codes decoded and encoded with byte permutes (byte_planes_vbmi.h, state_encoder.h) instead
// of gathers, bytes equal to the scalar span's. Compiled with -mavx512vbmi only here;
// optim_avx512.cpp calls it only where vbmi_scales_available().
//
// A block's codes can only be written once its absmax is known, after its update pass, and
// the decode and encode are all byte shuffles while the update waits on the divider (sqrt and
// two divisions per element). So the update of block b is interleaved with the decode of
// block b+1 and the encode of block b-1 for the out-of-order core to overlap (a few percent
// on Zen 4, where the shuffles and the update's arithmetic share pipes: the encode of both
// states is about half of the step).
#include "cpu/optim/state_encoder.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>

#include <cmath>
#include <memory>

#include "cpu/common/byte_planes_vbmi.h"
#include "cpu/common/isa.h"
#include "cpu/common/simd_avx512.h"
#include "cpu/optim/adamw_avx512.h"
#include "cpu/optim/adamw_loops.h"
#include "cpu/optim/kernels.h"

namespace qengine::cpu {
namespace {

// Word i of the result: the high half of float i of (a, b) (32 floats).
inline __m512i high_words(__m512 a, __m512 b) {
  alignas(64) static const uint16_t kOdd[32] = {1,  3,  5,  7,  9,  11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31,
                                                33, 35, 37, 39, 41, 43, 45, 47, 49, 51, 53, 55, 57, 59, 61, 63};
  return _mm512_permutex2var_epi16(_mm512_castps_si512(a), _mm512_load_si512(kOdd), _mm512_castps_si512(b));
}

// The bucket keys (state_encoder.h) of 32 floats (|x| < 2) given their high words.
inline __m512i bucket_keys(__m512i top, const StateEncoder& e) {
  top = _mm512_and_si512(top, _mm512_set1_epi16(0x7fff));
  // max(exponent, 96) - 96 is its low 5 bits (exponent <= 127), all vpermw reads of an index.
  static_assert(kEncoderOctaveBias % 32 == 0, "the octave index is the exponent's low 5 bits");
  const __m512i exponent = _mm512_max_epu16(_mm512_srli_epi16(top, 7), _mm512_set1_epi16(kEncoderOctaveBias));
  const __m512i w = _mm512_permutexvar_epi16(exponent, _mm512_load_si512(e.octave));
  const __m512i mantissa = _mm512_and_si512(top, _mm512_set1_epi16(127));
  return _mm512_add_epi16(_mm512_srlv_epi16(mantissa, _mm512_and_si512(w, _mm512_set1_epi16(7))),
                          _mm512_srli_epi16(w, 3));
}

// 256-entry byte table lookup of 64 byte indices (high: their bit 7).
inline __m512i lookup_bytes(__m512i idx, __mmask64 high, const uint8_t* table) {
  const __m512i lo = _mm512_permutex2var_epi8(_mm512_load_si512(table), idx, _mm512_load_si512(table + 64));
  const __m512i hi = _mm512_permutex2var_epi8(_mm512_load_si512(table + 128), idx, _mm512_load_si512(table + 192));
  return _mm512_mask_blend_epi8(high, lo, hi);
}

// encode_state of the 64 floats x[i] * inv (finite, |.| < 2) into out[0..63].
template <bool kWide>
inline void encode64(const float* x, __m512 inv, const StateEncoder& e, __m512i order, uint8_t* out) {
  alignas(64) static const uint8_t kEven[64] = {
      0,  2,  4,  6,  8,  10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30, 32, 34, 36, 38, 40, 42,
      44, 46, 48, 50, 52, 54, 56, 58, 60, 62, 64, 66, 68, 70, 72, 74, 76, 78, 80, 82, 84, 86,
      88, 90, 92, 94, 96, 98, 100, 102, 104, 106, 108, 110, 112, 114, 116, 118, 120, 122, 124, 126};
  __m512 y[4];
  for (int k = 0; k < 4; ++k) y[k] = _mm512_mul_ps(_mm512_load_ps(x + 16 * k), inv);
  const __m512i top01 = high_words(y[0], y[1]), top23 = high_words(y[2], y[3]);
  const __mmask64 negative = _mm512_kunpackd(static_cast<__mmask64>(_mm512_movepi16_mask(top23)),
                                             static_cast<__mmask64>(_mm512_movepi16_mask(top01)));
  const __m512i k01 = bucket_keys(top01, e), k23 = bucket_keys(top23, e);
  const __m512i keys = _mm512_permutex2var_epi8(k01, _mm512_load_si512(kEven), k23);  // low bytes
  const __mmask64 high = _mm512_movepi8_mask(keys);
  __m512i first;
  if constexpr (kWide) {
    const __m512i bit8 = _mm512_set1_epi16(0x100);
    const __mmask64 upper = _mm512_kunpackd(static_cast<__mmask64>(_mm512_test_epi16_mask(k23, bit8)),
                                            static_cast<__mmask64>(_mm512_test_epi16_mask(k01, bit8)));
    first = _mm512_mask_blend_epi8(upper, lookup_bytes(keys, high, e.first_pos),
                                   lookup_bytes(keys, high, e.first_pos + 256));
    first = _mm512_mask_mov_epi8(first, negative, _mm512_set1_epi8(static_cast<char>(e.negative_code)));
  } else {
    first = _mm512_mask_blend_epi8(negative, lookup_bytes(keys, high, e.first_pos),
                                   lookup_bytes(keys, high, e.first_neg));
  }
  __m512i threshold[4];
  lookup64(first, e.thresholds, order, threshold);
  __mmask16 above[4];
  for (int k = 0; k < 4; ++k) above[k] = _mm512_cmp_ps_mask(y[k], _mm512_castsi512_ps(threshold[k]), _CMP_GT_OQ);
  const __mmask64 up = _mm512_kunpackd(static_cast<__mmask64>(_mm512_kunpackw(above[3], above[2])),
                                       static_cast<__mmask64>(_mm512_kunpackw(above[1], above[0])));
  _mm512_storeu_si512(out, _mm512_mask_add_epi8(first, up, first, _mm512_set1_epi8(1)));
}

inline void encode64(const float* x, __m512 inv, const StateEncoder& e, __m512i order, uint8_t* out) {
  if (e.wide) encode64<true>(x, inv, e, order, out);
  else encode64<false>(x, inv, e, order, out);
}

// 64 codes of a state decoded: out[i] = table[codes[i]] * scale.
inline void decode64(const uint8_t* codes, const ScalePlanes& planes, __m512 scale, __m512i order, float* out) {
  __m512i values[4];
  lookup64(_mm512_loadu_si512(codes), planes, order, values);
  for (int k = 0; k < 4; ++k) _mm512_store_ps(out + 16 * k, _mm512_mul_ps(_mm512_castsi512_ps(values[k]), scale));
}

// The states of three consecutive blocks in flight: the one being updated, the next one
// being decoded and the previous one being encoded (state_buffers[k % 3] holds block k's).
struct BlockStates {
  alignas(64) float m[kOptimBlock];
  alignas(64) float v[kOptimBlock];
};

template <int DT, bool kMaximize, bool kSmall>
void adamw8(const OptimTask& t, int64_t lo, int64_t hi, const AdamHyper& hs, const StateCode& c1,
            const StateCode& c2) {
  const auto [p, g, dt, m, v, q1, q2, a1, a2] = TaskArrays(t);
  const AdamConstants<F32x16> h(hs);
  const auto* e1 = static_cast<const StateEncoder*>(c1.cpu_encoder);
  const auto* e2 = static_cast<const StateEncoder*>(c2.cpu_encoder);
  const bool encoders = e1 != nullptr && e2 != nullptr;
  // The decode tables: the encoders' copies (built once per code), else built here.
  std::unique_ptr<ScalePlanes> own1, own2;
  if (!encoders) {
    own1 = std::make_unique<ScalePlanes>(c1.table);
    own2 = std::make_unique<ScalePlanes>(c2.table);
  }
  const ScalePlanes& planes1 = encoders ? e1->values : *own1;
  const ScalePlanes& planes2 = encoders ? e2->values : *own2;
  const __m512i order = unpack_order();
  BlockStates buffers[3];
  const int64_t blocks = (hi - lo) / kOptimBlock;  // full blocks; lo is a block start
  const int64_t first_block = lo / kOptimBlock;
  // Pieces of 64 codes: piece j of a block is state j & 1 (m, v), elements 64 * (j >> 1) on.
  auto decode_piece = [&](int64_t k, int j) {
    const int64_t b = first_block + k, at = 64 * (j >> 1);
    BlockStates& s = buffers[k % 3];
    if ((j & 1) == 0) decode64(q1 + b * kOptimBlock + at, planes1, _mm512_set1_ps(a1[b]), order, s.m + at);
    else decode64(q2 + b * kOptimBlock + at, planes2, _mm512_set1_ps(a2[b]), order, s.v + at);
  };
  __m512 pending_inv1 = _mm512_setzero_ps(), pending_inv2 = _mm512_setzero_ps();
  bool pending = false;  // block k - 1 awaits its encode
  auto encode_piece = [&](int64_t k, int j) {
    const int64_t b = first_block + k, at = 64 * (j >> 1);
    const BlockStates& s = buffers[k % 3];
    if ((j & 1) == 0) encode64(s.m + at, pending_inv1, *e1, order, q1 + b * kOptimBlock + at);
    else encode64(s.v + at, pending_inv2, *e2, order, q2 + b * kOptimBlock + at);
  };
  for (int j = 0; blocks > 0 && j < 8; ++j) decode_piece(0, j);
  for (int64_t k = 0; k < blocks; ++k) {
    const int64_t b = first_block + k, b0 = b * kOptimBlock;
    BlockStates& s = buffers[k % 3];
    prefetch_block(t, b0 + kPrefetchBlocks * kOptimBlock, hi);
    const bool decode_next = k + 1 < blocks;
    __m512i n1 = _mm512_setzero_si512(), p1 = n1, n2 = n1;
    for (int64_t i = 0; i < kOptimBlock; i += 16) {
      __m512 pv = load16<DT>(p, b0 + i);
      __m512 mv = _mm512_load_ps(s.m + i), vv = _mm512_load_ps(s.v + i);
      adam_update<F32x16, kMaximize, kSmall>(load16<DT>(g, b0 + i), pv, mv, vv, h);
      store16<DT>(p, b0 + i, pv);
      _mm512_store_ps(s.m + i, mv);
      _mm512_store_ps(s.v + i, vv);
      n1 = F32x16::max_abs_bits(n1, mv);
      p1 = F32x16::max_pos_bits(p1, mv);
      n2 = F32x16::max_abs_bits(n2, vv);
      // The byte-shuffle work of the neighbouring blocks, between the divider-bound updates.
      const int j = static_cast<int>(i >> 5);
      if ((i & 16) == 0) {
        if (decode_next) decode_piece(k + 1, j);
      } else if (pending) {
        encode_piece(k - 1, j);
      }
    }
    const float m1 = m_signed_scale(reduced_absmax<F32x16>(n1), bits_float(F32x16::reduce_max_bits(p1)));
    const float m2 = reduced_absmax<F32x16>(n2);
    a1[b] = m1;
    a2[b] = m2;
    const __m512 i1 = _mm512_set1_ps(state_inv_scale(m1)), i2 = _mm512_set1_ps(state_inv_scale(m2));
    // The byte-table search holds for finite |x| < 2: a finite absmax bounds the block by 1.
    pending = encoders && std::isfinite(m1) && std::isfinite(m2);
    if (pending) {
      pending_inv1 = i1;
      pending_inv2 = i2;
    } else {
      for (int64_t i = 0; i < kOptimBlock; i += 16) {
        _mm_storeu_si128(reinterpret_cast<__m128i*>(q1 + b0 + i), encode16(_mm512_mul_ps(_mm512_load_ps(s.m + i), i1), c1));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(q2 + b0 + i), encode16(_mm512_mul_ps(_mm512_load_ps(s.v + i), i2), c2));
      }
    }
  }
  for (int j = 0; pending && j < 8; ++j) encode_piece(blocks - 1, j);
  const int64_t tail = lo + blocks * kOptimBlock;
  if (tail < hi) scalar_adamw8(t, tail, hi, hs, c1, c2);  // the partial last block
}

}  // namespace

bool encode_codes_vbmi(const float* x, int64_t n, const StateEncoder& e, uint8_t* out) {
  if (!vbmi_scales_available() || n % 64 != 0) return false;
  const __m512i order = unpack_order();
  alignas(64) float chunk[64];
  for (int64_t i = 0; i < n; i += 64) {
    for (int k = 0; k < 64; k += 16) _mm512_store_ps(chunk + k, _mm512_loadu_ps(x + i + k));
    encode64(chunk, _mm512_set1_ps(1.0f), e, order, out + i);
  }
  return true;
}

void adamw8_avx512vbmi(const OptimTask& t, int64_t lo, int64_t hi, const AdamHyper& h, const StateCode& c1,
                       const StateCode& c2) {
  with_span_params(t, h, [&](auto dt, auto mx, auto sm) { adamw8<dt, mx, sm>(t, lo, hi, h, c1, c2); });
}

}  // namespace qengine::cpu
#else
namespace qengine::cpu {
bool encode_codes_vbmi(const float*, int64_t, const StateEncoder&, uint8_t*) { return false; }
}  // namespace qengine::cpu
#endif
