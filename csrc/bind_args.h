// What every pybind11 binding file needs: integer addresses to typed pointers, the codebook
// and block-scale structs from their parts, and a native status as a Python exception.
#pragma once
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "qengine/quant_math.h"
#include "qengine/status.h"

#if defined(QENGINE_WITH_CUDA)
#include "cuda/check.h"
#endif

namespace qengine::bind {

using addr = std::uintptr_t;

template <typename T>
T* ptr(addr a) { return reinterpret_cast<T*>(a); }

inline Codebook codebook(addr table, addr midpoints, addr order, int bits, bool identity, addr grid_lut = 0) {
  return Codebook{ptr<const float>(table), ptr<const float>(midpoints), ptr<const uint8_t>(order), bits,
                  identity ? 1 : 0, ptr<const uint8_t>(grid_lut)};
}

// scales: float32 values, or (nested_table != 0) uint8 codes of the double-quantized scales.
inline BlockScales block_scales(addr scales, addr nested_table, addr nested_absmax, int64_t nested_blocksize,
                                float mean) {
  if (nested_table == 0) return BlockScales{ptr<const float>(scales), nullptr, nullptr, nullptr, 1, 0.0f, 0};
  int shift = -1;
  for (int s = 0; s < 62; ++s) {
    if ((int64_t{1} << s) == nested_blocksize) shift = s;
  }
  return BlockScales{nullptr, ptr<const uint8_t>(scales), ptr<const float>(nested_table),
                     ptr<const float>(nested_absmax), nested_blocksize, mean, shift};
}

inline void raise_on_error(int status) {
  if (status == kOk) return;
#if defined(QENGINE_WITH_CUDA)
  if (status == kCudaError) {
    throw std::runtime_error(std::string("qengine: CUDA error: ") + cuda::last_error_message() +
                             " (run `qengine doctor` to check every kernel on this machine)");
  }
#endif
  throw pybind11::value_error(std::string("qengine: ") + status_message(status));
}

}  // namespace qengine::bind
