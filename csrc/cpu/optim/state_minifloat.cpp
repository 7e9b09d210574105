// Checks a state code's MinifloatForm against the table and search it replaces (see
// state_minifloat.h). Both the form's encode and encode_state are non-decreasing in float
// order, so they agree everywhere on [-2, 2] when they agree at its ends and on both sides of
// each of encode_state's steps, which bisection finds (state_encoder.h).
#include "cpu/optim/state_minifloat.h"

#include <algorithm>

#include "cpu/optim/state_encoder.h"

namespace qengine::cpu {
namespace {

constexpr uint32_t kSign = 0x80000000u;
constexpr uint32_t kBelowTwo = 0x3fffffffu;  // the largest float below 2.0

// (2^(shift-1) - 1) - (offset << shift) in 32-bit two's complement (no signed-shift overflow).
int rounding_less_offset(int shift, int offset) {
  const uint32_t v = ((1u << (shift - 1)) - 1u) - (static_cast<uint32_t>(offset) << shift);
  return static_cast<int>(v);
}

// The next float up in float order (from -0.0 to +0.0).
uint32_t next_up(uint32_t u) { return u == kSign ? 0u : (u & kSign) ? u - 1 : u + 1; }

}  // namespace

bool minifloat_pieces(const MinifloatForm& f, MinifloatPieces* out) {
  const bool bits_ok = f.top_mantissa_bits >= 1 && f.top_mantissa_bits <= 7 && f.mantissa_bits >= 1 &&
                       f.mantissa_bits <= 7 && f.top_binades >= 0 && f.top_binades <= 16;
  if (!bits_ok || f.zero_code < -1 || f.zero_code > 254) return false;
  const int top = 255 - f.zero_code;  // the magnitude of 1.0
  MinifloatPieces p;
  p.first_top = top - (f.top_binades << f.top_mantissa_bits);
  if (p.first_top < 1) return false;
  p.shift_top = 23 - f.top_mantissa_bits;
  p.shift_low = 23 - f.mantissa_bits;
  p.offset_top = (127 << f.top_mantissa_bits) - top;
  p.offset_low = ((127 - f.top_binades) << f.mantissa_bits) - p.first_top;
  p.split_bits = static_cast<uint32_t>(127 - f.top_binades) << 23;
  // value(1) must be a normal float whose half is one too (exponent field >= 2).
  const int smallest = 1 + (p.first_top > 1 ? p.offset_low : p.offset_top);
  if ((smallest >> (p.first_top > 1 ? f.mantissa_bits : f.top_mantissa_bits)) < 2) return false;
  p.half_smallest = minifloat_value_bits(f.zero_code + 1, f, p) - (1u << 23);
  *out = p;
  return true;
}

uint32_t minifloat_value_bits(int code, const MinifloatForm& f, const MinifloatPieces& p) {
  const int s = code - f.zero_code;
  const int mag = s < 0 ? -s : s;
  if (mag == 0) return 0;
  const uint32_t bits = mag >= p.first_top ? static_cast<uint32_t>(mag + p.offset_top) << p.shift_top
                                           : static_cast<uint32_t>(mag + p.offset_low) << p.shift_low;
  return s < 0 ? (bits | kSign) : bits;
}

int minifloat_encode(float x, const MinifloatForm& f, const MinifloatPieces& p) {
  const uint32_t u = float_bits(x);
  const uint32_t negative = u >> 31, a = u & ~kSign;
  // Round a at the piece's bit: ties go to the lower code, the smaller magnitude for x > 0 and
  // the larger one for x < 0. Below the top piece, a rounded up to the next binade is first_top.
  const bool top = a >= p.split_bits;
  const int shift = top ? p.shift_top : p.shift_low;
  const int raw = static_cast<int>((a + (1u << (shift - 1)) - 1u + negative) >> shift) -
                  (top ? p.offset_top : p.offset_low);
  const int mag = a > p.half_smallest - negative ? std::max(raw, 1) : 0;
  return std::clamp(f.zero_code + (negative ? -mag : mag), 0, 255);
}

MinifloatCodecConstants minifloat_codec_constants(const MinifloatForm& f, bool is_signed) {
  MinifloatPieces p{};
  minifloat_pieces(f, &p);
  const int fold = is_signed ? 0 : f.zero_code;  // unsigned: code = magnitude + zero_code
  MinifloatCodecConstants k{};
  k.shift_top = p.shift_top;
  k.shift_low = p.shift_low;
  k.round_top = rounding_less_offset(p.shift_top, p.offset_top - fold);
  k.round_low = rounding_less_offset(p.shift_low, p.offset_low - fold);
  k.zero_code = f.zero_code;
  k.split_bits = p.split_bits;
  k.half_smallest = p.half_smallest;
  k.first_top = p.first_top + fold;
  k.offset_top = p.offset_top - fold;
  k.offset_low = p.offset_low - fold;
  k.half_shift_top = p.shift_top - 16;
  k.half_shift_low = p.shift_low - 16;
  return k;
}

bool check_minifloat_form(const StateCode& c, const MinifloatForm& f) {
  MinifloatPieces p;
  if (!minifloat_pieces(f, &p) || c.table == nullptr || c.lut == nullptr) return false;
  for (int k = 0; k < 256; ++k) {
    if (minifloat_value_bits(k, f, p) != float_bits(c.table[k])) return false;
  }
  auto agree = [&](uint32_t bits) {
    const float x = bits_float(bits);
    return minifloat_encode(x, f, p) == static_cast<int>(encode_state(x, c));
  };
  const uint32_t lowest = kSign | kBelowTwo, highest = kBelowTwo;
  if (!agree(lowest) || !agree(highest)) return false;
  auto code = [&](uint32_t bits) { return static_cast<int>(encode_state(bits_float(bits), c)); };
  for (int k = code(lowest); k < code(highest); ++k) {
    const uint32_t step = last_float_with_code_at_most(c, k, lowest, highest);
    if (!agree(step) || !agree(next_up(step))) return false;
  }
  return true;
}

}  // namespace qengine::cpu
