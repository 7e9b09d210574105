// Builds a StateEncoder (state_encoder.h) from the scalar search it replaces, so the two
// cannot disagree: every table entry is a value of encode_state.
#include "cpu/optim/state_encoder.h"

namespace qengine::cpu {
namespace {

constexpr uint32_t kSign = 0x80000000u;
constexpr uint32_t kMaxFinite = 0x7f7fffffu;
constexpr uint32_t kOneBits = 0x3f800000u;

// Float bits <-> an unsigned key in float order (-0.0 just below +0.0).
uint32_t to_order(uint32_t u) { return (u & kSign) ? ~u : (u | kSign); }
uint32_t from_order(uint32_t o) { return (o & kSign) ? (o & ~kSign) : ~o; }

}  // namespace

bool build_state_encoder(const StateCode& c, StateEncoder* e) {
  auto code = [&](uint32_t bits) { return static_cast<int>(encode_state(bits_float(bits), c)); };
  // A bucket of magnitudes [lo, hi] (bits) may hold one code boundary per sign at most
  // (encode_state is monotone in float order, so its ends tell).
  auto fits = [&](uint32_t lo, uint32_t hi) {
    return code(hi) - code(lo) <= 1 && code(kSign | lo) - code(kSign | hi) <= 1;
  };
  *e = StateEncoder{};
  int key = 0;
  auto add_bucket = [&](uint32_t lo, uint32_t hi) {
    e->first_pos[key] = static_cast<uint8_t>(code(lo));
    if (key < 256) e->first_neg[key] = static_cast<uint8_t>(code(kSign | hi));
    ++key;
  };
  // Octave 0: |y| < 2^-30, one bucket (key 0, shift 7).
  const uint32_t first_octave_bits = static_cast<uint32_t>(kEncoderOctaveBias + 1) << 23;
  if (!fits(0, first_octave_bits - 1)) return false;
  e->octave[0] = 7;
  add_bucket(0, first_octave_bits - 1);
  for (int o = 1; o < 32; ++o) {
    const uint32_t exponent = static_cast<uint32_t>(kEncoderOctaveBias + o);
    const uint32_t lo = exponent << 23;
    int m = 0;
    if (lo == kOneBits) {
      if (!fits(kOneBits, kMaxFinite)) return false;  // [1, 2) and beyond: one bucket
    } else {
      for (; m <= 7; ++m) {
        bool ok = true;
        for (uint32_t j = 0; ok && j < (1u << m); ++j) {
          const uint32_t b = lo | (j << (23 - m));
          ok = fits(b, b + (1u << (23 - m)) - 1);
        }
        if (ok) break;
      }
      if (m > 7) return false;
    }
    if (key + (1 << m) > 512) return false;
    e->octave[o] = static_cast<uint16_t>(key << 3 | (7 - m));
    for (uint32_t j = 0; j < (1u << m); ++j) {
      const uint32_t b = lo | (j << (23 - m));
      add_bucket(b, lo == kOneBits ? kMaxFinite : b + (1u << (23 - m)) - 1);
    }
  }
  e->wide = key > 256;
  e->negative_code = static_cast<uint8_t>(code(kSign));
  if (e->wide && code(kSign | kMaxFinite) != e->negative_code) return false;  // negatives differ
  // threshold[k]: the largest finite float (in float order) whose code is <= k, by bisection.
  float threshold[256];
  for (int k = 0; k < 256; ++k) {
    if (code(kMaxFinite) <= k) {
      threshold[k] = bits_float(kMaxFinite);  // nothing finite is above it
    } else if (code(kSign | kMaxFinite) > k) {
      threshold[k] = bits_float(0xff800000u);  // -inf: no float has a code <= k (never used)
    } else {
      threshold[k] = bits_float(last_float_with_code_at_most(c, k, kSign | kMaxFinite, kMaxFinite));
    }
  }
  e->thresholds = ScalePlanes(threshold);
  e->values = ScalePlanes(c.table);
  return true;
}

uint32_t last_float_with_code_at_most(const StateCode& c, int k, uint32_t lowest, uint32_t highest) {
  uint32_t good = to_order(lowest), bad = to_order(highest);  // code(good) <= k < code(bad)
  while (bad - good > 1) {
    const uint32_t mid = good + (bad - good) / 2;
    if (static_cast<int>(encode_state(bits_float(from_order(mid)), c)) <= k) good = mid;
    else bad = mid;
  }
  return from_order(good);
}

}  // namespace qengine::cpu
