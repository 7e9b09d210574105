// The arithmetic form of an 8-bit optimizer-state code (MinifloatForm, optim_math.h) in scalar
// code, and the check that lets a SIMD kernel use it: decoding and encoding by shifts must give
// the bytes of the code's table and nearest-code search exactly.
#pragma once
#include <cstdint>

#include "qengine/optim_math.h"

namespace qengine::cpu {

// The integer constants of a form's two pieces (top: magnitudes from first_top up to 1.0).
struct MinifloatPieces {
  int shift_top, shift_low;    // 23 - mantissa bits of the piece
  int offset_top, offset_low;  // bits(k) = (k + offset) << shift
  int first_top;               // the smallest magnitude of the top piece
  uint32_t split_bits;         // the float bits of value(first_top), a power of two
  uint32_t half_smallest;      // the float bits of value(1) / 2: the midpoint between 0.0 and value(1)
};

// False when f is not a well-formed form (then *out is unusable).
bool minifloat_pieces(const MinifloatForm& f, MinifloatPieces* out);

// The float bits of code `code` (0..255); p from minifloat_pieces(f).
uint32_t minifloat_value_bits(int code, const MinifloatForm& f, const MinifloatPieces& p);

// The nearest code of x (ties to the lower code, as encode_state), for finite |x| < 2. The SIMD
// kernels compute these same integer steps on 8 or 16 lanes.
int minifloat_encode(float x, const MinifloatForm& f, const MinifloatPieces& p);

// The integer constants of the SIMD codecs (optim_avx2.cpp, minifloat_avx512.h), broadcast
// into their vectors. is_signed: a code with 0.0 and negatives (zero_code >= 0); else one
// without either (zero_code == -1), whose code is magnitude - 1: that -1 is folded into the
// offsets below, so codes come out of the same steps.
struct MinifloatCodecConstants {
  // encode, per piece (top, low): the shift, and the rounding increment less the offset
  // shifted into place: (a + round) >> shift (arithmetic, exact below 0) is a's magnitude
  // rounded at the piece's bit (ties down), less the offset.
  int shift_top, shift_low, round_top, round_low;
  int zero_code;
  uint32_t split_bits, half_smallest;  // as MinifloatPieces
  // decode in 16-bit lanes (a magnitude's float bits have zero low halves): the first magnitude
  // of the top piece and the offset of each piece, folded; the shifts less 16.
  int first_top, offset_top, offset_low;
  int half_shift_top, half_shift_low;
};

// f must be a checked form (check_minifloat_form).
MinifloatCodecConstants minifloat_codec_constants(const MinifloatForm& f, bool is_signed);

// True when f is a well-formed form of c: its value of every code equals c.table bit for bit,
// and its code of every finite x with |x| < 2 equals encode_state(x, c).
bool check_minifloat_form(const StateCode& c, const MinifloatForm& f);

}  // namespace qengine::cpu
