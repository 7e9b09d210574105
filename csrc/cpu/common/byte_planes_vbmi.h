// Lookups of 64 byte codes in a 256-entry float32 table held as four byte planes
// (byte_planes.h), with AVX-512 VBMI byte permutes instead of gathers. Include only from files
// compiled with -mavx512vbmi (gemv/scales_avx512vbmi.cpp, optim/optim_avx512vbmi.cpp); the anonymous
// namespace keeps each includer's copy to itself.
#pragma once
#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>

#include "cpu/common/byte_planes.h"

namespace qengine::cpu {
namespace {  // NOLINT(build/namespaces): see above

// The unpack network below leaves element 16k + 4l + e of 64 in 128-bit lane l of output k
// at position e when code position 16l + 4k + e holds it: this byte permutation puts it there.
inline __m512i unpack_order() {
  alignas(64) uint8_t idx[64];
  for (int l = 0; l < 4; ++l) {
    for (int k = 0; k < 4; ++k) {
      for (int e = 0; e < 4; ++e) idx[16 * l + 4 * k + e] = static_cast<uint8_t>(16 * k + 4 * l + e);
    }
  }
  return _mm512_load_si512(idx);
}

// A table's 16 byte-plane vectors, loaded once (a caller looking up many groups of 64 keeps them
// in registers across calls).
struct PlaneRegs {
  __m512i v[4][4];
  explicit PlaneRegs(const ScalePlanes& t) {
    for (int p = 0; p < 4; ++p) {
      for (int q = 0; q < 4; ++q) v[p][q] = _mm512_load_si512(t.bytes + p * 256 + q * 64);
    }
  }
  // The 64 float32 table values of 64 codes, as 4 vectors of 16 in code order.
  void lookup64(__m512i codes, const __m512i order, __m512i out[4]) const {
    lookup64_unordered(_mm512_permutexvar_epi8(order, codes), out);
  }
  // The same without the reordering: lane 4l + e of out[k] holds the value of code position
  // 16l + 4k + e (a caller that permutes its codes anyway folds unpack_order into its own).
  // kLowHalfZero: the table's low_half_zero holds, so planes 0 and 1 are zeros, not looked up.
  template <bool kLowHalfZero = false>
  void lookup64_unordered(__m512i codes, __m512i out[4]) const {
    const __mmask64 high = _mm512_movepi8_mask(codes);  // entries 128..255
    __m512i b[4];
    for (int p = kLowHalfZero ? 2 : 0; p < 4; ++p) {
      const __m512i lo = _mm512_permutex2var_epi8(v[p][0], codes, v[p][1]);
      const __m512i hi = _mm512_permutex2var_epi8(v[p][2], codes, v[p][3]);
      b[p] = _mm512_mask_blend_epi8(high, lo, hi);
    }
    const __m512i w23_lo = _mm512_unpacklo_epi8(b[2], b[3]), w23_hi = _mm512_unpackhi_epi8(b[2], b[3]);
    if constexpr (kLowHalfZero) {
      const __m512i zero = _mm512_setzero_si512();
      out[0] = _mm512_unpacklo_epi16(zero, w23_lo);
      out[1] = _mm512_unpackhi_epi16(zero, w23_lo);
      out[2] = _mm512_unpacklo_epi16(zero, w23_hi);
      out[3] = _mm512_unpackhi_epi16(zero, w23_hi);
      return;
    }
    const __m512i w01_lo = _mm512_unpacklo_epi8(b[0], b[1]), w01_hi = _mm512_unpackhi_epi8(b[0], b[1]);
    out[0] = _mm512_unpacklo_epi16(w01_lo, w23_lo);
    out[1] = _mm512_unpackhi_epi16(w01_lo, w23_lo);
    out[2] = _mm512_unpacklo_epi16(w01_hi, w23_hi);
    out[3] = _mm512_unpackhi_epi16(w01_hi, w23_hi);
  }
};

// One lookup of 64 codes (the planes loaded for it alone).
inline void lookup64(__m512i codes, const ScalePlanes& t, const __m512i order, __m512i out[4]) {
  PlaneRegs(t).lookup64(codes, order, out);
}

}  // namespace
}  // namespace qengine::cpu
#endif
