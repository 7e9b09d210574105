// AVX-512 spans of the fused AdamW step: 16 lanes, the same operations as adamw_element in
// the same order (every one correctly rounded), so the bytes equal the scalar spans'. The
// 8-bit span here looks codes up with gathers; CPUs with VBMI take optim_avx512vbmi.cpp's.
// Compiled with -mavx512* only here.
#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>

#include "cpu/nested_scales.h"
#include "cpu/optim_avx512_inl.h"
#include "cpu/optim_kernels.h"

namespace qengine::cpu {
namespace {

// 16 state codes decoded with one gather: table[q[i]] * scale.
inline __m512 decode16(const uint8_t* q, const float* table, __m512 scale) {
  const __m512i idx = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q)));
  return _mm512_mul_ps(_mm512_i32gather_ps(idx, table, 4), scale);
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
  int64_t b0 = lo;
  for (; b0 + kOptimBlock <= hi; b0 += kOptimBlock) {
    const int64_t b = b0 / kOptimBlock;
    prefetch_block(t, b0 + kPrefetchBlocks * kOptimBlock, hi);
    const __m512 s1 = _mm512_set1_ps(a1[b]), s2 = _mm512_set1_ps(a2[b]);
    __m512i n1 = _mm512_setzero_si512(), n2 = _mm512_setzero_si512();
    for (int64_t i = 0; i < kOptimBlock; i += 16) {
      __m512 pv = load16<DT>(p, b0 + i);
      __m512 mv = decode16(q1 + b0 + i, c1.table, s1), vv = decode16(q2 + b0 + i, c2.table, s2);
      update16(load16<DT>(g, b0 + i), pv, mv, vv, h);
      store16<DT>(p, b0 + i, pv);
      _mm512_store_ps(mt + i, mv);
      _mm512_store_ps(vt + i, vv);
      n1 = absmax16(n1, mv);
      n2 = absmax16(n2, vv);
    }
    const float m1 = reduce_absmax(n1), m2 = reduce_absmax(n2);
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
  if (vbmi_scales_available()) return avx512vbmi_adamw8(t, lo, hi, h, c1, c2);  // no gathers
  if (t.dtype == kFloat32) adamw8<kFloat32>(t, lo, hi, h, c1, c2);
  else if (t.dtype == kBFloat16) adamw8<kBFloat16>(t, lo, hi, h, c1, c2);
  else adamw8<kFloat16>(t, lo, hi, h, c1, c2);
}

}  // namespace qengine::cpu
#endif
