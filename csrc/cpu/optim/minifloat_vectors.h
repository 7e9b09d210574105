// The constants of a minifloat state codec (MinifloatCodecConstants, state_minifloat.h) as
// vectors of one ISA, written once for both codecs (MinifloatCodec in optim_avx2.cpp,
// MinifloatCodec16 in minifloat_avx512.h): encode's in 32-bit lanes, decode's in 16-bit ones.
// V: the ISA's vector type (F32x8, F32x16) with iset1 / iset1_16. Include only after its
// simd_<isa>.h, from files compiled with that ISA's flags.
#pragma once
#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>

#include <cstdint>

#include "cpu/optim/state_minifloat.h"

namespace qengine::cpu {

template <class V>
struct MinifloatVectors {
  using I = typename V::I;
  I shift_top, shift_low, round_top, round_low, zero_code, split, half_smallest;
  I zero_code16, first_top16, offset_top16, offset_low16;
  __m128i half_shift_top, half_shift_low;

  explicit MinifloatVectors(const MinifloatCodecConstants& k)
      : shift_top(V::iset1(k.shift_top)),
        shift_low(V::iset1(k.shift_low)),
        round_top(V::iset1(k.round_top)),
        round_low(V::iset1(k.round_low)),
        zero_code(V::iset1(k.zero_code)),
        split(V::iset1(static_cast<int>(k.split_bits))),
        half_smallest(V::iset1(static_cast<int>(k.half_smallest))),
        zero_code16(V::iset1_16(static_cast<int16_t>(k.zero_code))),
        first_top16(V::iset1_16(static_cast<int16_t>(k.first_top))),
        offset_top16(V::iset1_16(static_cast<int16_t>(k.offset_top))),
        offset_low16(V::iset1_16(static_cast<int16_t>(k.offset_low))),
        half_shift_top(_mm_cvtsi32_si128(k.half_shift_top)),
        half_shift_low(_mm_cvtsi32_si128(k.half_shift_low)) {}
};

}  // namespace qengine::cpu
#endif
