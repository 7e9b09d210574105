// A 256-entry float32 table as four byte planes, the form AVX-512 VBMI byte permutes look up
// without gathers (byte_planes_vbmi.h): double-quantized matmul scales, 8-bit optimizer states.
#pragma once
#include <cstdint>
#include <cstring>

namespace qengine::cpu {

// planes[p * 256 + e] = byte p of table[e].
struct ScalePlanes {
  alignas(64) uint8_t bytes[4 * 256];
  ScalePlanes() = default;
  explicit ScalePlanes(const float* table) {
    for (int e = 0; e < 256; ++e) {
      uint32_t bits;
      std::memcpy(&bits, table + e, 4);
      for (int p = 0; p < 4; ++p) bytes[p * 256 + e] = static_cast<uint8_t>(bits >> (8 * p));
    }
  }
};

}  // namespace qengine::cpu
