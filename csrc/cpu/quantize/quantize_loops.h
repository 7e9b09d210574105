// The quantize family's SIMD loops written once over a vector type V (F32x8 of simd_avx2.h,
// F32x16 of simd_avx512.h): block statistics, the nearest-code encode and the 8-bit decode.
// quantize_avx2.cpp and quantize_avx512.cpp instantiate them after including their ISA's SIMD
// header, and add what only their ISA does (the 4-bit decode's nibble interleave, AVX-512's
// fused quantize). Include only from files compiled with SIMD flags: the anonymous namespace
// gives each includer its own copy.
#pragma once
#include <cmath>
#include <cstdint>
#include <limits>

#include "cpu/common/ladder.h"
#include "cpu/quantize/kernels.h"

namespace qengine::cpu {
namespace {  // NOLINT(build/namespaces): see above

template <class V, int DT>
void stats_impl(const void* x, int64_t len, BlockStats* out) {
  using F = typename V::F;
  const float inf = std::numeric_limits<float>::infinity();
  F mn = V::set1(inf), mx = V::set1(-inf);
  F poison = V::set1(0.0f);  // becomes NaN once x*0 meets a NaN or Inf
  const F zero = V::set1(0.0f);
  int64_t i = 0;
  for (; i + V::kLanes <= len; i += V::kLanes) {
    F v = V::template load<DT>(x, i);
    mn = V::min(mn, v);
    mx = V::max(mx, v);
    poison = V::add(poison, V::mul(v, zero));
  }
  BlockStats s;
  s.min = V::reduce_min(mn);
  s.max = V::reduce_max(mx);
  s.nonfinite = V::any_nan(poison);
  s.absmax = std::fmax(std::fabs(s.min), std::fabs(s.max));  // +0 for an all-zero block
  block_stats_tail(x, DT, i, len, &s);
  *out = s;
}

template <class V>
void block_stats(const void* x, int dtype, int64_t len, BlockStats* out) {
  with_dtype(dtype, [&](auto dt) { stats_impl<V, dt>(x, len, out); });
}

// The code of each value: a binary search over the codebook's sorted midpoints (in registers
// for 4 bits, gathered for 8), then sorted position -> storage code.
template <class V, int DT, int RULE, bool DIVIDE, int BITS>
void encode_impl(const void* x, int64_t len, const BlockNorm& norm, const Codebook& cb, uint8_t* codes) {
  using F = typename V::F;
  using I = typename V::I;
  const F inv = V::set1(norm.inv), div = V::set1(norm.div), off = V::set1(norm.offset);
  typename V::Table16 mids{}, map{};
  if (BITS == 4) {
    mids = V::table16(cb.midpoints);
    if (!cb.identity_order) map = V::code_table16(cb.sorted_to_code);  // may be null when identity
  }
  int64_t i = 0;
  for (; i + V::kLanes <= len; i += V::kLanes) {
    F v = V::template load<DT>(x, i);
    if constexpr (RULE == kMinmax) v = V::sub(v, off);
    v = DIVIDE ? V::div(v, div) : V::mul(v, inv);
    I pos = V::iset1(0);
    for (int step = 1 << (BITS - 1); step > 0; step >>= 1) {
      const I probe = V::iadd(pos, V::iset1(step - 1));
      const F t = BITS == 4 ? V::lookup(probe, mids) : V::gather(cb.midpoints, probe);
      pos = V::add_where_greater(pos, v, t, step);
    }
    if (BITS == 4 && !cb.identity_order) pos = V::lookup_code(pos, map);
    V::store_codes(codes + i, pos);
    if (BITS == 8 && !cb.identity_order) {
      for (int k = 0; k < V::kLanes; ++k) codes[i + k] = cb.sorted_to_code[codes[i + k]];
    }
  }
  encode_tail(x, DT, i, len, norm, RULE, cb, codes);
}

template <class V>
void encode(const void* x, int dtype, int64_t len, const BlockNorm& n, int rule, const Codebook& cb, uint8_t* codes) {
  with_encode_params(dtype, rule, n.divide, cb.bits, [&](auto dt, auto r, auto divide, auto bits) {
    encode_impl<V, dt, r, divide, bits>(x, len, n, cb, codes);
  });
}

template <class V, int RULE>
inline typename V::F apply_scale(typename V::F q, typename V::F scale, typename V::F offset) {
  return RULE == kMinmax ? V::fmadd(q, scale, offset) : V::mul(q, scale);
}

template <class V, int OUT, int RULE>
void decode8(const uint8_t* packed, int64_t first, int64_t len, const Codebook& cb, float scale, float offset,
             void* out, bool stream) {
  const typename V::F sc = V::set1(scale), of = V::set1(offset);
  int64_t i = 0;
  for (; i + V::kLanes <= len; i += V::kLanes) {
    const typename V::F q = V::gather(cb.table, V::load_codes(packed + first + i));
    V::template store_finite<OUT>(out, i, apply_scale<V, RULE>(q, sc, of), stream);
  }
  decode_tail(packed, first, i, len, cb, scale, offset, RULE, out, OUT);
}

// The 4-bit decode around the ISA's main loop, Nibbles::run<OUT, RULE>(packed, first, i, len, cb,
// scale, offset, out, stream), which decodes from element i (even: whole bytes) and returns
// where it stopped: an odd start's shared byte before it and the tail after it in scalar code.
template <class Nibbles, int OUT, int RULE>
void decode4(const uint8_t* packed, int64_t first, int64_t len, const Codebook& cb, float scale, float offset,
             void* out, bool stream) {
  int64_t i = 0;
  if (first & 1) {  // odd start: the low nibble of a shared byte
    scalar_decode(packed, first, 1, cb, scale, offset, RULE, out, OUT, false);
    i = 1;
  }
  i = Nibbles::template run<OUT, RULE>(packed, first, i, len, cb, scale, offset, out, stream);
  decode_tail(packed, first, i, len, cb, scale, offset, RULE, out, OUT);
}

// The family's decode entry: 4-bit codes through decode4 with the ISA's Nibbles, 8-bit ones
// through decode8.
template <class V, class Nibbles>
void decode(const uint8_t* packed, int64_t first, int64_t len, const Codebook& cb, float scale, float offset, int rule,
            void* out, int out_dtype, bool stream) {
  with_decode_params(out_dtype, rule, [&](auto dt, auto r) {
    if (cb.bits == 4) decode4<Nibbles, dt, r>(packed, first, len, cb, scale, offset, out, stream);
    else decode8<V, dt, r>(packed, first, len, cb, scale, offset, out, stream);
  });
}

}  // namespace
}  // namespace qengine::cpu
