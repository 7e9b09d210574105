// Element types crossing the native boundary, and float16/bfloat16 <-> float32 conversions
// written once for host and device.
#pragma once
#include <cstdint>
#include <cstring>

// Internal linkage on purpose: these functions are compiled into files built with different
// ISA flags (kernels_avx512.cpp, ...), and the linker must never merge an AVX-512 copy into
// code that runs on a CPU without it.
#if defined(__CUDACC__)
#define QE_HD static __host__ __device__ __forceinline__
#else
#define QE_HD static inline
#endif

namespace qengine {

// Codes shared with python/qengine/ops/__init__.py (DTYPE_CODES).
enum DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

static inline int dtype_size(int dtype) { return dtype == kFloat32 ? 4 : 2; }

// Whether a code from the Python side names one of the element types above (the native entry
// points check every dtype code they are handed).
static inline bool valid_dtype(int dtype) { return dtype == kFloat32 || dtype == kFloat16 || dtype == kBFloat16; }

QE_HD uint32_t float_bits(float f) {
  uint32_t u;
#if defined(__CUDA_ARCH__)
  u = __float_as_uint(f);
#else
  std::memcpy(&u, &f, 4);
#endif
  return u;
}

QE_HD float bits_float(uint32_t u) {
  float f;
#if defined(__CUDA_ARCH__)
  f = __uint_as_float(u);
#else
  std::memcpy(&f, &u, 4);
#endif
  return f;
}

QE_HD float bf16_to_float(uint16_t h) { return bits_float(static_cast<uint32_t>(h) << 16); }

// Round to nearest even, as torch's .to(torch.bfloat16); NaN stays a quiet NaN.
QE_HD uint16_t float_to_bf16(float f) {
  uint32_t u = float_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

// IEEE binary16 -> binary32, exact (subnormals included).
QE_HD float half_to_float(uint16_t h) {
  uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t man = h & 0x3ffu;
  uint32_t u;
  if (exp == 0) {
    if (man == 0) {
      u = sign;
    } else {  // subnormal: normalise
      exp = 127 - 15 + 1;
      while ((man & 0x400u) == 0) { man <<= 1; --exp; }
      man &= 0x3ffu;
      u = sign | (exp << 23) | (man << 13);
    }
  } else if (exp == 0x1f) {
    u = sign | 0x7f800000u | (man << 13);
  } else {
    u = sign | ((exp + 127 - 15) << 23) | (man << 13);
  }
  return bits_float(u);
}

// binary32 -> binary16 with round to nearest even (matches F16C / torch).
QE_HD uint16_t float_to_half(float f) {
  uint32_t u = float_bits(f);
  uint32_t sign = (u >> 16) & 0x8000u;
  uint32_t abs = u & 0x7fffffffu;
  if (abs > 0x7f800000u) return static_cast<uint16_t>(sign | 0x7e00u);    // NaN
  if (abs >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);   // overflow -> Inf
  if (abs < 0x38800000u) {                                                // subnormal or zero
    if (abs < 0x33000000u) return static_cast<uint16_t>(sign);            // < half of min subnormal
    uint32_t exp = abs >> 23;
    uint32_t man = (abs & 0x7fffffu) | 0x800000u;
    uint32_t shift = 126 - exp;  // 14 + (113 - exp)
    uint32_t half_man = man >> shift;
    uint32_t rem = man & ((1u << shift) - 1u);
    uint32_t halfway = 1u << (shift - 1);
    if (rem > halfway || (rem == halfway && (half_man & 1u))) ++half_man;
    return static_cast<uint16_t>(sign | half_man);
  }
  uint32_t r = abs + 0x0fffu + ((abs >> 13) & 1u);  // round mantissa to 10 bits
  return static_cast<uint16_t>(sign | ((r - 0x38000000u) >> 13));
}

QE_HD float load_as_float(const void* p, int dtype, int64_t i) {
  if (dtype == kFloat32) return static_cast<const float*>(p)[i];
  if (dtype == kBFloat16) return bf16_to_float(static_cast<const uint16_t*>(p)[i]);
  return half_to_float(static_cast<const uint16_t*>(p)[i]);
}

QE_HD void store_from_float(void* p, int dtype, int64_t i, float v) {
  if (dtype == kFloat32) static_cast<float*>(p)[i] = v;
  else if (dtype == kBFloat16) static_cast<uint16_t*>(p)[i] = float_to_bf16(v);
  else static_cast<uint16_t*>(p)[i] = float_to_half(v);
}

}  // namespace qengine
