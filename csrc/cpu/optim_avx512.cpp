// AVX-512 spans of the fused AdamW step: 16 lanes, the same operations as adamw_element in
// the same order (every one correctly rounded), so the bytes equal the scalar spans'.
// Compiled with -mavx512* only here.
#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>

#include <algorithm>
#include <memory>

#include "cpu/nested_scales.h"
#include "cpu/optim_kernels.h"

namespace qengine::cpu {
namespace {

template <int DT>
inline __m512 load16(const void* x, int64_t i) {
  if constexpr (DT == kFloat32) {
    return _mm512_loadu_ps(static_cast<const float*>(x) + i);
  } else {
    __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(x) + i));
    if constexpr (DT == kBFloat16) return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    else return _mm512_cvtph_ps(h);
  }
}

// Round to nearest even, NaN -> quiet NaN, as float_to_bf16.
inline __m256i to_bf16(__m512 v) {
  __m512i u = _mm512_castps_si512(v);
  __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), lsb)), 16);
  __m512i nan = _mm512_or_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40));
  r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), nan);
  return _mm512_cvtepi32_epi16(r);
}

template <int DT>
inline void store16(void* x, int64_t i, __m512 v) {
  if constexpr (DT == kFloat32) {
    _mm512_storeu_ps(static_cast<float*>(x) + i, v);
  } else {
    __m256i h = DT == kBFloat16 ? to_bf16(v) : _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(static_cast<uint16_t*>(x) + i), h);
  }
}

struct Hyper16 {
  __m512 decay, w1, w1m1, beta2, w2, bc2, eps, step;
  bool small, maximize;
  explicit Hyper16(const AdamHyper& h)
      : decay(_mm512_set1_ps(h.decay)), w1(_mm512_set1_ps(h.w1)), w1m1(_mm512_set1_ps(h.w1 - 1.0f)),
        beta2(_mm512_set1_ps(h.beta2)), w2(_mm512_set1_ps(h.w2)), bc2(_mm512_set1_ps(h.bc2_sqrt)),
        eps(_mm512_set1_ps(h.eps)), step(_mm512_set1_ps(h.neg_step)), small(h.lerp_small != 0.0f),
        maximize(h.maximize != 0.0f) {}
};

// adamw_element on 16 lanes.
inline void update16(__m512 g, __m512& p, __m512& m, __m512& v, const Hyper16& h) {
  if (h.maximize) g = _mm512_xor_ps(g, _mm512_set1_ps(-0.0f));
  p = _mm512_mul_ps(p, h.decay);
  const __m512 d = _mm512_sub_ps(g, m);
  m = h.small ? _mm512_fmadd_ps(h.w1, d, m) : _mm512_fmadd_ps(h.w1m1, d, g);
  v = _mm512_fmadd_ps(_mm512_mul_ps(h.w2, g), g, _mm512_mul_ps(v, h.beta2));
  const __m512 denom = _mm512_add_ps(_mm512_div_ps(_mm512_sqrt_ps(v), h.bc2), h.eps);
  p = _mm512_add_ps(p, _mm512_div_ps(_mm512_mul_ps(h.step, m), denom));
}

template <int DT>
void adamw32(const OptimTask& t, int64_t lo, int64_t hi, const AdamHyper& hs) {
  void* p = reinterpret_cast<void*>(t.param);
  const void* g = reinterpret_cast<const void*>(t.grad);
  float* m = reinterpret_cast<float*>(t.state1);
  float* v = reinterpret_cast<float*>(t.state2);
  const Hyper16 h(hs);
  int64_t i = lo;
  for (; i + 16 <= hi; i += 16) {
    __m512 pv = load16<DT>(p, i), mv = _mm512_loadu_ps(m + i), vv = _mm512_loadu_ps(v + i);
    update16(load16<DT>(g, i), pv, mv, vv, h);
    store16<DT>(p, i, pv);
    _mm512_storeu_ps(m + i, mv);
    _mm512_storeu_ps(v + i, vv);
  }
  if (i < hi) scalar_adamw32(t, i, hi, hs);
}

// 16 codes of the nearest-code search (encode_state on 16 lanes): one gather.
inline __m128i encode16(__m512 x, const StateCode& c) {
  const __m512i u = _mm512_castps_si512(x);
  __m512i k = _mm512_sub_epi32(_mm512_srli_epi32(_mm512_and_si512(u, _mm512_set1_epi32(0x7fffffff)), 16),
                               _mm512_set1_epi32(c.lut_base));
  k = _mm512_min_epi32(_mm512_max_epi32(k, _mm512_setzero_si512()), _mm512_set1_epi32(c.lut_kmax));
  const __mmask16 neg = _mm512_movepi32_mask(u);
  const __m512i key = _mm512_mask_sub_epi32(_mm512_add_epi32(k, _mm512_set1_epi32(c.lut_kmax + 1)), neg,
                                            _mm512_set1_epi32(c.lut_kmax), k);
  const __m512i e = _mm512_i32gather_epi32(key, c.lut, 4);
  const __m512i lo16 = _mm512_set1_epi32(0xffff);
  const __m512i low = _mm512_and_si512(u, lo16), t = _mm512_and_si512(e, lo16);
  const __mmask16 up = static_cast<__mmask16>((_mm512_cmpgt_epi32_mask(low, t) & ~neg) |
                                              (_mm512_cmpgt_epi32_mask(t, low) & neg));
  const __m512i idx = _mm512_mask_add_epi32(_mm512_srli_epi32(e, 16), up, _mm512_srli_epi32(e, 16),
                                            _mm512_set1_epi32(1));
  return _mm512_cvtepi32_epi8(idx);
}

inline __m512 decode16(const uint8_t* q, const float* table, __m512 scale) {
  const __m512i idx = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q)));
  return _mm512_mul_ps(_mm512_i32gather_ps(idx, table, 4), scale);
}

// NaN-propagating |x| max (absmax_step on 16 lanes): the NaN lanes are tracked separately.
inline void absmax16(__m512& acc, __mmask16& nan, __m512 x) {
  acc = _mm512_max_ps(acc, _mm512_abs_ps(x));
  nan = static_cast<__mmask16>(nan | _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q));
}

inline float reduce_absmax(__m512 acc, __mmask16 nan) {
  return nan ? bits_float(0x7fc00000u) : _mm512_reduce_max_ps(acc);
}

// The block loop alternates a decode/update pass and an encode pass over L1-resident
// temporaries; its gathers keep the hardware prefetchers from running far enough ahead on
// large steps, so the inputs of the block kPrefetchBlocks ahead are requested explicitly.
constexpr int64_t kPrefetchBlocks = 4;

inline void prefetch_block(const OptimTask& t, int64_t e, int64_t hi) {
  if (e >= hi) return;
  const int64_t len = std::min(kOptimBlock, hi - e);
  const int esize = dtype_size(static_cast<int>(t.dtype));
  const char* p = reinterpret_cast<const char*>(t.param) + e * esize;
  const char* g = reinterpret_cast<const char*>(t.grad) + e * esize;
  for (int64_t off = 0; off < len * esize; off += 64) {
    _mm_prefetch(p + off, _MM_HINT_T0);
    _mm_prefetch(g + off, _MM_HINT_T0);
  }
  const char* q1 = reinterpret_cast<const char*>(t.state1) + e;
  const char* q2 = reinterpret_cast<const char*>(t.state2) + e;
  for (int64_t off = 0; off < len; off += 64) {
    _mm_prefetch(q1 + off, _MM_HINT_T0);
    _mm_prefetch(q2 + off, _MM_HINT_T0);
  }
}

template <int DT>
void adamw8(const OptimTask& t, int64_t lo, int64_t hi, const AdamHyper& hs, const StateCode& c1,
            const StateCode& c2) {
  void* p = reinterpret_cast<void*>(t.param);
  const void* g = reinterpret_cast<const void*>(t.grad);
  uint8_t* q1 = reinterpret_cast<uint8_t*>(t.state1);
  uint8_t* q2 = reinterpret_cast<uint8_t*>(t.state2);
  float* a1 = reinterpret_cast<float*>(t.absmax1);
  float* a2 = reinterpret_cast<float*>(t.absmax2);
  const Hyper16 h(hs);
  alignas(64) float mt[kOptimBlock], vt[kOptimBlock];
  // On VBMI CPUs the codes are decoded a block at a time by byte permutes (no gathers).
  std::unique_ptr<ScalePlanes> planes1, planes2;
  if (vbmi_scales_available()) {
    planes1 = std::make_unique<ScalePlanes>(c1.table);
    planes2 = std::make_unique<ScalePlanes>(c2.table);
  }
  int64_t b0 = lo;
  for (; b0 + kOptimBlock <= hi; b0 += kOptimBlock) {
    const int64_t b = b0 / kOptimBlock;
    prefetch_block(t, b0 + kPrefetchBlocks * kOptimBlock, hi);
    const __m512 s1 = _mm512_set1_ps(a1[b]), s2 = _mm512_set1_ps(a2[b]);
    if (planes1) {
      decode_scaled_vbmi(q1 + b0, kOptimBlock, *planes1, a1[b], mt);
      decode_scaled_vbmi(q2 + b0, kOptimBlock, *planes2, a2[b], vt);
    }
    __m512 n1 = _mm512_setzero_ps(), n2 = _mm512_setzero_ps();
    __mmask16 nan1 = 0, nan2 = 0;
    for (int64_t i = 0; i < kOptimBlock; i += 16) {
      __m512 pv = load16<DT>(p, b0 + i);
      __m512 mv = planes1 ? _mm512_load_ps(mt + i) : decode16(q1 + b0 + i, c1.table, s1);
      __m512 vv = planes1 ? _mm512_load_ps(vt + i) : decode16(q2 + b0 + i, c2.table, s2);
      update16(load16<DT>(g, b0 + i), pv, mv, vv, h);
      store16<DT>(p, b0 + i, pv);
      _mm512_store_ps(mt + i, mv);
      _mm512_store_ps(vt + i, vv);
      absmax16(n1, nan1, mv);
      absmax16(n2, nan2, vv);
    }
    const float m1 = reduce_absmax(n1, nan1), m2 = reduce_absmax(n2, nan2);
    a1[b] = m1;
    a2[b] = m2;
    const __m512 i1 = _mm512_set1_ps(state_inv_scale(m1)), i2 = _mm512_set1_ps(state_inv_scale(m2));
    for (int64_t i = 0; i < kOptimBlock; i += 16) {
      _mm_storeu_si128(reinterpret_cast<__m128i*>(q1 + b0 + i), encode16(_mm512_mul_ps(_mm512_load_ps(mt + i), i1), c1));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(q2 + b0 + i), encode16(_mm512_mul_ps(_mm512_load_ps(vt + i), i2), c2));
    }
  }
  if (b0 < hi) scalar_adamw8(t, b0, hi, hs, c1, c2);  // the partial last block
}

}  // namespace

void avx512_adamw32(const OptimTask& t, int64_t lo, int64_t hi, const AdamHyper& h) {
  if (t.dtype == kFloat32) adamw32<kFloat32>(t, lo, hi, h);
  else if (t.dtype == kBFloat16) adamw32<kBFloat16>(t, lo, hi, h);
  else adamw32<kFloat16>(t, lo, hi, h);
}

void avx512_adamw8(const OptimTask& t, int64_t lo, int64_t hi, const AdamHyper& h, const StateCode& c1,
                   const StateCode& c2) {
  if (t.dtype == kFloat32) adamw8<kFloat32>(t, lo, hi, h, c1, c2);
  else if (t.dtype == kBFloat16) adamw8<kBFloat16>(t, lo, hi, h, c1, c2);
  else adamw8<kFloat16>(t, lo, hi, h, c1, c2);
}

}  // namespace qengine::cpu
#endif
