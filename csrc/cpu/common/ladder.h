// Runtime values -> template parameters, written once: each ladder calls f with the value as a
// std::integral_constant, so a kernel's loop is compiled once per value with no branch inside.
#pragma once
#include <cstdint>
#include <type_traits>

#include "qengine/dtype.h"
#include "qengine/quant_math.h"

namespace qengine::cpu {

template <int V>
using IntC = std::integral_constant<int, V>;

// dtype in {kFloat32, kBFloat16, kFloat16} (anything else is taken as kFloat16).
template <class F>
inline decltype(auto) with_dtype(int dtype, F&& f) {
  if (dtype == kFloat32) return f(IntC<kFloat32>{});
  if (dtype == kBFloat16) return f(IntC<kBFloat16>{});
  return f(IntC<kFloat16>{});
}

// rule in {kAbsmax, kMinmax}.
template <class F>
inline decltype(auto) with_rule(int rule, F&& f) {
  if (rule == kAbsmax) return f(IntC<kAbsmax>{});
  return f(IntC<kMinmax>{});
}

// bits in {4, 8}.
template <class F>
inline decltype(auto) with_bits(int bits, F&& f) {
  if (bits == 4) return f(IntC<4>{});
  return f(IntC<8>{});
}

template <class F>
inline decltype(auto) with_bool(bool b, F&& f) {
  if (b) return f(std::true_type{});
  return f(std::false_type{});
}

// m in 1..kMax (rows of x a GEMV kernel holds in registers).
template <int kMax, class F>
inline decltype(auto) with_rows(int64_t m, F&& f) {
  if constexpr (kMax > 1) {
    if (m < kMax) return with_rows<kMax - 1>(m, static_cast<F&&>(f));
  }
  return f(IntC<kMax>{});
}

}  // namespace qengine::cpu
