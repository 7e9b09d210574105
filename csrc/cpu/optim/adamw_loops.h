// The fused AdamW step's loops, written once over a vector type V (F32x8 in simd_avx2.h,
// F32x16 in simd_avx512.h) and instantiated by each ISA's file: the element update (the
// operations of adamw_element in its order, each correctly rounded, so the bytes equal the
// scalar spans'), the 32-bit span, and the 8-bit span's two passes over each 256-element block
// (decode + update + absmax into L1-resident temporaries, then encode) around the ISA's own
// codecs. Include only from files compiled with that ISA's flags (anonymous namespace: each
// includer compiles its own copy, see simd_avx512.h).
#pragma once
#include <cmath>
#include <cstdint>

#include "cpu/optim/kernels.h"

namespace qengine::cpu {
namespace {  // NOLINT(build/namespaces): see above

template <class V>
struct AdamConstants {
  using F = typename V::F;
  F decay, w1, w1m1, beta2, w2, bc2, eps, step;
  explicit AdamConstants(const AdamHyper& h)
      : decay(V::set1(h.decay)), w1(V::set1(h.w1)), w1m1(V::set1(h.w1 - 1.0f)), beta2(V::set1(h.beta2)),
        w2(V::set1(h.w2)), bc2(V::set1(h.bc2_sqrt)), eps(V::set1(h.eps)), step(V::set1(h.neg_step)) {}
};

// adamw_element on V's lanes; the flags (maximize, lerp_small) from with_flags (kernels.h).
template <class V, bool kMaximize, bool kSmall>
inline void adam_update(typename V::F g, typename V::F& p, typename V::F& m, typename V::F& v,
                        const AdamConstants<V>& h) {
  if constexpr (kMaximize) g = V::neg(g);
  p = V::mul(p, h.decay);
  const typename V::F d = V::sub(g, m);
  m = kSmall ? V::fmadd(h.w1, d, m) : V::fmadd(h.w1m1, d, g);
  v = V::fmadd(V::mul(h.w2, g), g, V::mul(v, h.beta2));
  const typename V::F denom = V::add(V::div(V::sqrt(v), h.bc2), h.eps);
  p = V::add(p, V::div(V::mul(h.step, m), denom));
}

template <class V, int DT, bool kMaximize, bool kSmall>
void adamw32_loop(const OptimTask& t, int64_t lo, int64_t hi, const AdamHyper& hs) {
  const auto [p, g, dt, m, v, q1, q2, a1, a2] = TaskArrays(t);
  const AdamConstants<V> h(hs);
  int64_t i = lo;
  for (; i + V::kLanes <= hi; i += V::kLanes) {
    typename V::F pv = V::template load<DT>(p, i), mv = V::loadu(m + i), vv = V::loadu(v + i);
    adam_update<V, kMaximize, kSmall>(V::template load<DT>(g, i), pv, mv, vv, h);
    V::template store<DT>(p, i, pv);
    V::storeu(m + i, mv);
    V::storeu(v + i, vv);
  }
  if (i < hi) scalar_adamw32(t, i, hi, hs);
}

// The largest of the lanes of V::max_abs_bits as a float, every NaN as absmax_step's one
// canonical NaN.
template <class V>
inline float reduced_absmax(typename V::I acc) {
  const uint32_t bits = V::reduce_max_bits(acc);
  return bits_float(bits > 0x7f800000u ? 0x7fc00000u : bits);
}

// The codes of both states of a block: kOptimBlock codes of m[i] * i1 and of v[i] * i2 (64-byte
// aligned), in runs of the codecs' kRun. With 32 vector registers a run of each state in turn
// (two independent chains for the core to overlap); with 16 one state after the other, since
// both codecs' constants would not fit in the registers together (AVX2: ~5 % slower interleaved).
template <class V, class C1, class C2, class F>
inline void encode_states(const C1& e1, const C2& e2, const float* m, const float* v, F i1, F i2, uint8_t* out1,
                          uint8_t* out2) {
  static_assert(C1::kRun == C2::kRun, "both states' codecs encode runs of the same length");
  if constexpr (V::kRegisters >= 32) {
    for (int64_t i = 0; i < kOptimBlock; i += C1::kRun) {
      e1.encode(m + i, i1, out1 + i);
      e2.encode(v + i, i2, out2 + i);
    }
  } else {
    for (int64_t i = 0; i < kOptimBlock; i += C1::kRun) e1.encode(m + i, i1, out1 + i);
    for (int64_t i = 0; i < kOptimBlock; i += C2::kRun) e2.encode(v + i, i2, out2 + i);
  }
}

// The 8-bit span over whole blocks (lo a block start); the partial last block is the scalar
// span's. Codecs (the ISA's, each constructed from its StateCode): decode2(q, scale, F out[2])
// decodes 2 * kLanes codes times scale; encode(x, inv, out) writes the kRun codes of x[i] * inv,
// for finite |x * inv| < 2. K1, K2 take m's and v's codes where `arithmetic` (their minifloat
// forms), S1, S2 (table searches) any value: the encode of a block whose absmax is not finite,
// and every block otherwise. The codecs are built here, as locals: their constants then stay in
// registers or on this frame (taken by reference, the AVX2 loop ran out of registers for its
// pointers and counter: 4-7 % slower).
template <class V, int DT, bool kMaximize, bool kSmall, class K1, class K2, class S1, class S2>
void adamw8_loop(const OptimTask& t, int64_t lo, int64_t hi, const AdamHyper& hs, const StateCode& c1,
                 const StateCode& c2, bool arithmetic) {
  const K1 k1{c1};
  const K2 k2{c2};
  const S1 s1{c1};
  const S2 s2{c2};
  using F = typename V::F;
  using I = typename V::I;
  constexpr int L = V::kLanes;
  const auto [p, g, dt, m, v, q1, q2, a1, a2] = TaskArrays(t);
  const AdamConstants<V> h(hs);
  alignas(64) float mt[kOptimBlock], vt[kOptimBlock];
  int64_t b0 = lo;
  for (; b0 + kOptimBlock <= hi; b0 += kOptimBlock) {
    const int64_t b = b0 / kOptimBlock;
    prefetch_block(t, b0 + kPrefetchBlocks * kOptimBlock, hi);
    const F scale1 = V::set1(a1[b]), scale2 = V::set1(a2[b]);
    I n1 = V::iset1(0), p1 = n1, n2 = n1;
    for (int64_t i = 0; i < kOptimBlock; i += 2 * L) {
      F mv[2], vv[2];
      k1.decode2(q1 + b0 + i, scale1, mv);
      k2.decode2(q2 + b0 + i, scale2, vv);
      for (int j = 0; j < 2; ++j) {
        const int64_t e = b0 + i + L * j;
        F pv = V::template load<DT>(p, e);
        adam_update<V, kMaximize, kSmall>(V::template load<DT>(g, e), pv, mv[j], vv[j], h);
        V::template store<DT>(p, e, pv);
        V::storeu(mt + i + L * j, mv[j]);
        V::storeu(vt + i + L * j, vv[j]);
        n1 = V::max_abs_bits(n1, mv[j]);
        p1 = V::max_pos_bits(p1, mv[j]);
        n2 = V::max_abs_bits(n2, vv[j]);
      }
    }
    const float m1 = m_signed_scale(reduced_absmax<V>(n1), bits_float(V::reduce_max_bits(p1)));
    const float m2 = reduced_absmax<V>(n2);
    a1[b] = m1;
    a2[b] = m2;
    const F i1 = V::set1(state_inv_scale(m1)), i2 = V::set1(state_inv_scale(m2));
    if (arithmetic && std::isfinite(m1) && std::isfinite(m2)) {  // a finite absmax bounds the block by 1
      encode_states<V>(k1, k2, mt, vt, i1, i2, q1 + b0, q2 + b0);
    } else {
      encode_states<V>(s1, s2, mt, vt, i1, i2, q1 + b0, q2 + b0);
    }
  }
  if (b0 < hi) scalar_adamw8(t, b0, hi, hs, c1, c2);
}

// The spans of an ISA's table row: the loops above instantiated for every dtype and flag
// (with_span_params), the 8-bit one with the ISA's minifloat codecs (M for m's signed code,
// U for v's unsigned one) where both codes have minifloat forms, else its table search T.
template <class V>
void adamw32_span_of(const OptimTask& t, int64_t lo, int64_t hi, const AdamHyper& h) {
  with_span_params(t, h, [&](auto dt, auto mx, auto sm) { adamw32_loop<V, dt, mx, sm>(t, lo, hi, h); });
}

template <class V, class M, class U, class T>
void adamw8_span_of(const OptimTask& t, int64_t lo, int64_t hi, const AdamHyper& h, const StateCode& c1,
                    const StateCode& c2) {
  const bool forms = minifloat_forms(c1, c2);
  with_span_params(t, h, [&](auto dt, auto mx, auto sm) {
    if (forms) adamw8_loop<V, dt, mx, sm, M, U, T, T>(t, lo, hi, h, c1, c2, true);
    else adamw8_loop<V, dt, mx, sm, T, T, T, T>(t, lo, hi, h, c1, c2, false);
  });
}

}  // namespace
}  // namespace qengine::cpu
