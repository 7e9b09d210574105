// AVX-512 spans of the fused AdamW step: 16 lanes, the same operations as adamw_element in
// the same order (every one correctly rounded), so the bytes equal the scalar spans'. The
// 8-bit span takes qengine's state codes through their minifloat arithmetic
// (minifloat_avx512_inl.h); other codes are looked up with byte permutes on CPUs with VBMI
// (optim_avx512vbmi.cpp) and with gathers here otherwise. Compiled with -mavx512* only here.
#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>

#include <cmath>
#include <type_traits>

#include "cpu/optim/minifloat_avx512.h"
#include "cpu/common/isa.h"
#include "cpu/optim/adamw_avx512.h"
#include "cpu/optim/kernels.h"

namespace qengine::cpu {
namespace {

// 16 state codes decoded with one gather: table[q[i]] * scale.
inline __m512 decode16(const uint8_t* q, const float* table, __m512 scale) {
  const __m512i idx = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q)));
  return _mm512_mul_ps(_mm512_i32gather_ps(idx, table, 4), scale);
}

template <int DT, bool kMaximize, bool kSmall>
void adamw32(const OptimTask& t, int64_t lo, int64_t hi, const AdamHyper& hs) {
  const auto [p, g, dt, m, v, q1, q2, a1, a2] = TaskArrays(t);
  const Hyper16 h(hs);
  int64_t i = lo;
  for (; i + 16 <= hi; i += 16) {
    __m512 pv = load16<DT>(p, i), mv = _mm512_loadu_ps(m + i), vv = _mm512_loadu_ps(v + i);
    update16<kMaximize, kSmall>(load16<DT>(g, i), pv, mv, vv, h);
    store16<DT>(p, i, pv);
    _mm512_storeu_ps(m + i, mv);
    _mm512_storeu_ps(v + i, vv);
  }
  if (i < hi) scalar_adamw32(t, i, hi, hs);
}

// A code through its table: gathers, for any code.
struct TableCodec16 {
  const StateCode& c;
  void decode32(const uint8_t* q, __m512 scale, __m512 out[2]) const {
    out[0] = decode16(q, c.table, scale);
    out[1] = decode16(q + 16, c.table, scale);
  }
  void encode64(const float* x, __m512 inv, uint8_t* out) const {
    for (int k = 0; k < 4; ++k) {
      const __m512 y = _mm512_mul_ps(_mm512_load_ps(x + 16 * k), inv);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(out + 16 * k), encode16(y, c));
    }
  }
};

// kMinifloat: both codes through their MinifloatForm (m's signed, v's unsigned), except the
// encode of a block whose absmax is not finite (its values then need not lie in (-2, 2)), which
// searches the tables.
template <int DT, bool kMinifloat, bool kMaximize, bool kSmall>
void adamw8(const OptimTask& t, int64_t lo, int64_t hi, const AdamHyper& hs, const StateCode& c1,
            const StateCode& c2) {
  const auto [p, g, dt, m, v, q1, q2, a1, a2] = TaskArrays(t);
  const Hyper16 h(hs);
  auto codec = [](const StateCode& c, auto is_signed) {
    if constexpr (kMinifloat) return MinifloatCodec16<decltype(is_signed)::value>(c.minifloat);
    else return TableCodec16{c};
  };
  const auto k1 = codec(c1, std::true_type{}), k2 = codec(c2, std::false_type{});
  const TableCodec16 search1{c1}, search2{c2};
  // Both states' 64-code pieces in turn.
  auto encode_block = [](const auto& e1, const auto& e2, const float* m, const float* v, __m512 i1, __m512 i2,
                         uint8_t* out1, uint8_t* out2) {
    for (int64_t i = 0; i < kOptimBlock; i += 64) {
      e1.encode64(m + i, i1, out1 + i);
      e2.encode64(v + i, i2, out2 + i);
    }
  };
  alignas(64) float mt[kOptimBlock], vt[kOptimBlock];
  int64_t b0 = lo;
  for (; b0 + kOptimBlock <= hi; b0 += kOptimBlock) {
    const int64_t b = b0 / kOptimBlock;
    prefetch_block(t, b0 + kPrefetchBlocks * kOptimBlock, hi);
    const __m512 s1 = _mm512_set1_ps(a1[b]), s2 = _mm512_set1_ps(a2[b]);
    __m512i n1 = _mm512_setzero_si512(), p1 = n1, n2 = n1;
    for (int64_t i = 0; i < kOptimBlock; i += 32) {
      __m512 mv[2], vv[2];
      k1.decode32(q1 + b0 + i, s1, mv);
      k2.decode32(q2 + b0 + i, s2, vv);
      for (int j = 0; j < 2; ++j) {
        const int64_t e = b0 + i + 16 * j;
        __m512 pv = load16<DT>(p, e);
        update16<kMaximize, kSmall>(load16<DT>(g, e), pv, mv[j], vv[j], h);
        store16<DT>(p, e, pv);
        _mm512_store_ps(mt + i + 16 * j, mv[j]);
        _mm512_store_ps(vt + i + 16 * j, vv[j]);
        n1 = max_abs_bits(n1, mv[j]);
        p1 = max_pos_bits(p1, mv[j]);
        n2 = max_abs_bits(n2, vv[j]);
      }
    }
    const float m1 = reduce_m_scale(n1, p1), m2 = reduce_absmax(n2);
    a1[b] = m1;
    a2[b] = m2;
    const __m512 i1 = _mm512_set1_ps(state_inv_scale(m1)), i2 = _mm512_set1_ps(state_inv_scale(m2));
    if (kMinifloat && std::isfinite(m1) && std::isfinite(m2)) {  // a finite absmax bounds the block by 1
      encode_block(k1, k2, mt, vt, i1, i2, q1 + b0, q2 + b0);
    } else {
      encode_block(search1, search2, mt, vt, i1, i2, q1 + b0, q2 + b0);
    }
  }
  if (b0 < hi) scalar_adamw8(t, b0, hi, hs, c1, c2);  // the partial last block
}

void adamw32_span(const OptimTask& t, int64_t lo, int64_t hi, const AdamHyper& h) {
  with_span_params(t, h, [&](auto dt, auto mx, auto sm) { adamw32<dt, mx, sm>(t, lo, hi, h); });
}

void adamw8_span(const OptimTask& t, int64_t lo, int64_t hi, const AdamHyper& h, const StateCode& c1,
                 const StateCode& c2) {
  // Other codes than qengine's (no minifloat forms): byte permutes where VBMI has them.
  if (!minifloat_forms(c1, c2) && vbmi_scales_available()) return adamw8_avx512vbmi(t, lo, hi, h, c1, c2);
  const bool forms = minifloat_forms(c1, c2);
  with_span_params(t, h, [&](auto dt, auto mx, auto sm) {
    with_bool(forms, [&](auto f) { adamw8<dt, f, mx, sm>(t, lo, hi, h, c1, c2); });
  });
}

}  // namespace

const OptimKernels kOptimAvx512 = {
    .name = "avx512",
    .adamw32 = adamw32_span,
    .adamw8 = adamw8_span,
};

}  // namespace qengine::cpu
#endif
