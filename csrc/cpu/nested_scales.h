// 256-entry float32 table lookups of byte codes in bulk without gathers, on CPUs with AVX-512
// VBMI (nested_scales_vbmi.cpp): the matmul decodes a row chunk's double-quantized scales once
// and hands the kernels plain float32 scales; the 8-bit optimizer decodes its state codes
// (optim_avx512vbmi.cpp, with the same lookup: byte_planes_vbmi.h).
// Zen 4 takes ~27 cycles per 16-lane gather, a fifth of a one-row GEMV.
#pragma once
#include <cstdint>

#include "qengine/quant_math.h"

namespace qengine::cpu {

// True where the CPU has AVX-512 VBMI (and AVX-512 F/BW) and QENGINE_NO_VBMI is unset (the
// switch keeps the gather path testable on such CPUs).
bool vbmi_scales_available();

// The nested table as four byte planes: planes[p * 256 + e] = byte p of table[e].
struct ScalePlanes {
  alignas(64) uint8_t bytes[4 * 256];
  ScalePlanes() = default;
  explicit ScalePlanes(const float* table);
};

// out[i] = block_scale(s, b_lo + i) for i < count, bit for bit (s double-quantized, its
// nested_shift >= 0). Call only where vbmi_scales_available().
void decode_nested_scales_vbmi(const BlockScales& s, const ScalePlanes& planes, int64_t b_lo, int64_t count,
                               float* out);

}  // namespace qengine::cpu
