// The blockwise quantization maths shared by the CPU and CUDA kernels, written once so
// their bytes agree: the scale rules, the nearest-code search and the nibble layout.
//
// A format is a codebook `table` (2^bits float32 values in storage order) plus a scale rule:
//   absmax:  x ~= table[q] * scale,           scale = max|x| over the block
//   minmax:  x ~= table[q] * scale + offset,  scale = max - min, offset = min
// Quantization normalises x, then picks the code whose value is nearest, by counting the
// float32 midpoints between sorted codebook neighbours that lie strictly below the
// normalised value (so a tie goes to the lower code, as bitsandbytes' torch.bucketize does).
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

#include "qengine/dtype.h"

namespace qengine {

enum ScaleRule : int { kAbsmax = 0, kMinmax = 1 };

// Smallest divisor used for an all-zero block, as bitsandbytes clamps absmax (1e-38).
constexpr float kMinScale = 1e-38f;

// The codebook, prepared by python/qengine/formats.py for the search:
//   midpoints[i], i < 2^bits - 1: sorted midpoints, padded with +inf past the last real one;
//   sorted_to_code[i]: storage code of the i-th smallest value; not read (may be null) when
//   identity_order is set.
struct Codebook {
  const float* table;             // 2^bits values, storage order (decoding)
  const float* midpoints;         // 2^bits entries (last always +inf)
  const uint8_t* sorted_to_code;  // 2^bits entries
  int bits;                       // 4 or 8
  int identity_order;             // 1 when sorted_to_code is the identity
  // Optional (null: nearest-code search): 65536 storage codes over a uniform grid of [-1, 1],
  // bitsandbytes' quantize_blockwise rule, kept so its double-quant bytes can be reproduced.
  const uint8_t* grid_lut;
};

// Grid rule (absmax only): k = trunc(((clamp(v, -1, 1) + 1) * 0.5) * 65535 + 0.5), code = grid_lut[k].
constexpr int kGridSize = 65536;

QE_HD int grid_index(float v) {
  // NaN (0 * inf when absmax is subnormal, 1 / absmax overflowing) goes to index 0, as the
  // truncating conversion does in bitsandbytes.
  if (v != v) return 0;
  v = v < -1.0f ? -1.0f : (v > 1.0f ? 1.0f : v);
  float t = (v + 1.0f) * 0.5f;
  return static_cast<int>(t * 65535.0f + 0.5f);
}

// The grid rule's code of x in a block of the given absmax: x * (1 / absmax) on the grid; an
// all-zero block (absmax 0) gets code 0, and the stored scale is the raw absmax.
QE_HD uint8_t grid_code(float x, float absmax, const uint8_t* grid_lut) {
  if (absmax == 0.0f) return 0;
  const float inv = 1.0f / absmax;
  return grid_lut[grid_index(x * inv)];
}

// Per-block statistics; the kernels reduce them in any order (max/min are exact).
struct BlockStats {
  float absmax;
  float min;
  float max;
  bool nonfinite;
};

// Normalisation of one block: value * inv (absmax) or (value - offset) * inv (minmax).
// bitsandbytes multiplies full blocks by the float32 reciprocal but divides the last,
// partial block; `divide` reproduces that so the bytes agree.
struct BlockNorm {
  float scale;   // stored per block
  float offset;  // stored per block (minmax only)
  float inv;     // 1 / max(scale, kMinScale)
  float div;     // max(scale, kMinScale), used when divide is set
  bool divide;
};

QE_HD BlockNorm make_block_norm(const BlockStats& s, int rule, bool partial_block) {
  BlockNorm n;
  if (rule == kAbsmax) {
    n.scale = s.absmax;
    n.offset = 0.0f;
  } else {
    n.scale = s.max - s.min;
    n.offset = s.min;
  }
  n.div = n.scale > kMinScale ? n.scale : kMinScale;
  n.inv = 1.0f / n.div;
  n.divide = partial_block;
  // bitsandbytes stores the clamped absmax of a partial last block; keep its bytes.
  if (partial_block && rule == kAbsmax) n.scale = n.div;
  return n;
}

// The same normalisation rebuilt from a block's stored parameters, for kernels that compute the
// statistics and the codes in separate passes (CUDA). Equal to make_block_norm's result: the
// divisor is max(scale, kMinScale) either way (a partial absmax block stores that divisor).
QE_HD BlockNorm block_norm_from_stored(float scale, float offset, int rule, bool partial_block) {
  BlockNorm n;
  n.scale = scale;
  n.offset = rule == kMinmax ? offset : 0.0f;
  n.div = scale > kMinScale ? scale : kMinScale;
  n.inv = 1.0f / n.div;
  n.divide = partial_block;
  return n;
}

QE_HD float normalise(float x, const BlockNorm& n, int rule) {
  float centred = rule == kMinmax ? x - n.offset : x;
  return n.divide ? centred / n.div : centred * n.inv;
}

// Index of the nearest codebook value in sorted order: the number of midpoints < v.
// Branch-free binary search over the padded midpoints (2^bits entries, last +inf).
QE_HD int sorted_index(float v, const float* midpoints, int bits) {
  int pos = 0;
  for (int step = 1 << (bits - 1); step > 0; step >>= 1) {
    pos += (v > midpoints[pos + step - 1]) ? step : 0;
  }
  return pos;
}

QE_HD uint8_t encode_value(float v, const Codebook& cb) {
  int i = sorted_index(v, cb.midpoints, cb.bits);
  return cb.identity_order ? static_cast<uint8_t>(i) : cb.sorted_to_code[i];
}

// Decoding: value = table[q] * scale (+ offset for minmax, in one rounding).
QE_HD float decode_value(float code_value, float scale, float offset, int rule) {
#if defined(__CUDA_ARCH__)
  return rule == kMinmax ? __fmaf_rn(code_value, scale, offset) : __fmul_rn(code_value, scale);
#else
  return rule == kMinmax ? __builtin_fmaf(code_value, scale, offset) : code_value * scale;
#endif
}

// decode_value's addend for a branch-free fma(table[q], scale, addend): the offset (minmax), or
// -0.0f (absmax), since x + (-0) == x for every x including both zeros, so the single rounding
// of the fma gives table[q] * scale bit for bit.
QE_HD float decode_addend(float offset, int rule) { return rule == kMinmax ? offset : -0.0f; }

// Per-block scales, plain (values) or double-quantized: table[codes[b]] * absmax[b / nested_blocksize]
// + mean, in float32 with two roundings, exactly as the dequantize-then-add of the Python side.
struct BlockScales {
  const float* values;     // float32 [nblocks], or null when double-quantized
  const uint8_t* codes;    // uint8 [nblocks]
  const float* table;      // float32 [256] (the nested format's codebook)
  const float* absmax;     // float32 [ceil(nblocks / nested_blocksize)]
  int64_t nested_blocksize;
  float mean;
  int nested_shift;        // log2(nested_blocksize) when a power of two, else -1 (divide)
  // A hint the CPU GEMV driver sets (never the caller): the nested table is a minifloat the
  // kernels may compute instead of reading (ScaleTable).
  uint8_t table_kind = 0;
};

// What a nested scale table holds, as far as a kernel may compute a code's value instead of
// reading it: E4M3 on every code below its NaN 0x7F (NVFP4's scales), E8M0 (2**(c - 127)) on
// every code below its NaN 0xFF (MXFP4's), or anything else (read the table).
enum ScaleTable : uint8_t { kTableRead = 0, kTableE4m3 = 1, kTableE8m0 = 2 };

// FP8 E4M3's value of code c < 0x7F (bias 7; exponent field 0: subnormal, m * 2**-9).
inline float e4m3_value(int c) {
  const int e = c >> 3, m = c & 7;
  return e == 0 ? std::ldexp(static_cast<float>(m), -9) : std::ldexp(static_cast<float>(8 + m), e - 10);
}

// The table's kind, comparing bits (a -0.0 entry does not pass for E4M3 code 0's +0.0).
inline ScaleTable scale_table_kind(const float* table) {
  const auto matches = [table](int count, auto value) {
    for (int c = 0; c < count; ++c) {
      const float v = value(c);
      if (std::memcmp(&v, table + c, sizeof v) != 0) return false;
    }
    return true;
  };
  if (matches(0x7F, e4m3_value)) return kTableE4m3;
  if (matches(0xFF, [](int c) { return std::ldexp(1.0f, c - 127); })) return kTableE8m0;
  return kTableRead;
}

QE_HD float block_scale(const BlockScales& s, int64_t b) {
  if (s.values != nullptr) return s.values[b];
  const int64_t nb = s.nested_shift >= 0 ? (b >> s.nested_shift) : b / s.nested_blocksize;
  float v = s.table[s.codes[b]] * s.absmax[nb];
  return v + s.mean;
}

// Nibble layout (bitsandbytes'): element 2k in the high nibble of byte k, 2k+1 in the low.
QE_HD uint8_t nibble_at(const uint8_t* packed, int64_t i) {
  uint8_t b = packed[i >> 1];
  return (i & 1) ? static_cast<uint8_t>(b & 0x0f) : static_cast<uint8_t>(b >> 4);
}

QE_HD uint8_t pack_pair(uint8_t even, uint8_t odd) { return static_cast<uint8_t>((even << 4) | (odd & 0x0f)); }

}  // namespace qengine
