// The nearest-code search of an 8-bit optimizer-state code (encode_state in optim_math.h) in a
// form AVX-512 VBMI byte permutes can evaluate 64 lanes at a time, without gathers (Zen 4
// spends ~21 cycles on each 16-lane gather of the bucket table, most of the 8-bit step).
//
// A magnitude |y| falls in one of at most 256 buckets (512: see `wide`): everything below
// 2^-30 in bucket 0, then each binade [2^e, 2^(e+1)) for e = -30..-1 split into 2^m equal
// buckets (m <= 7, the fewest that leave at most one code boundary per bucket on either sign),
// then [1, 2) in one. With top16 = bits(|y|) >> 16 (exponent and 7 mantissa bits) and
// o = max(top16 >> 7, 96) - 96, the octave's entry w = octave[o] gives
//   key = ((top16 & 127) >> (w & 7)) + (w >> 3)           (w >> 3: the octave's first key)
//   first = (y negative ? first_neg : first_pos)[key]     (the code of the bucket's low end)
//   code = first + (y > threshold[first])                 (threshold[k]: the largest float
//                                                          whose code is <= k)
// which equals encode_state(y) for every y with |y| < 2 (build_state_encoder checks
// the bucket condition against encode_state itself; the thresholds are found by bisection on
// encode_state). Callers route other values to encode_state's own path.
//
// The unsigned map (second moment) is twice as dense and needs up to 512 buckets; its
// negative values, which v never takes, all share one code. `wide` codes are those: keys up
// to 511 for positive values and negative_code for every negative one.
#pragma once
#include <cstdint>

#include "cpu/common/byte_planes.h"
#include "qengine/optim_math.h"

namespace qengine::cpu {

constexpr int kEncoderOctaveBias = 96;  // biased exponents <= 96 (|y| < 2^-30) share bucket 0

struct StateEncoder {
  alignas(64) uint16_t octave[32];  // by octave o: first key << 3 | shift
  alignas(64) uint8_t first_pos[512];  // by bucket key
  alignas(64) uint8_t first_neg[256];  // by bucket key, unless wide
  ScalePlanes thresholds;              // by code
  ScalePlanes values;                  // the code's table (decode), by code
  bool wide;
  uint8_t negative_code;  // wide: the code of every negative value
};

// Fills *e from the code c; false when c does not fit these tables (then *e is unusable and
// callers keep the gather path).
bool build_state_encoder(const StateCode& c, StateEncoder* e);

// The largest float between `lowest` and `highest` (bits, lowest first in float order) whose
// code under encode_state is <= k, found by bisection (encode_state never decreases in float
// order); needs code(lowest) <= k < code(highest). The step of the search between k and k + 1.
uint32_t last_float_with_code_at_most(const StateCode& c, int k, uint32_t lowest, uint32_t highest);

// out[i] = encode_state(x[i]) through the tables, for n a multiple of 64 and every |x[i]| < 2
// (tests compare it with the reference search); false where the CPU lacks VBMI.
bool encode_codes_vbmi(const float* x, int64_t n, const StateEncoder& e, uint8_t* out);

}  // namespace qengine::cpu
