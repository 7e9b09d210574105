// A 256-entry float32 table as four byte planes, the form AVX-512 VBMI byte permutes look up
// without gathers (byte_planes_vbmi.h): double-quantized matmul scales, 8-bit optimizer states.
#pragma once
#include <cstdint>
#include <cstring>

namespace qengine::cpu {

// planes[p * 256 + e] = byte p of table[e].
struct ScalePlanes {
  alignas(64) uint8_t bytes[4 * 256];
  // Whether every value's low 16 bits are zero (at most 8 significant bits: GGUF's integer grids
  // over a power of two, FP8), so that planes 0 and 1 need no lookup.
  bool low_half_zero = false;
  ScalePlanes() = default;
  explicit ScalePlanes(const float* table) {
    uint32_t low = 0;
    for (int e = 0; e < 256; ++e) {
      uint32_t bits;
      std::memcpy(&bits, table + e, 4);
      low |= bits & 0xFFFFu;
      for (int p = 0; p < 4; ++p) bytes[p * 256 + e] = static_cast<uint8_t>(bits >> (8 * p));
    }
    low_half_zero = low == 0;
  }
};

}  // namespace qengine::cpu
