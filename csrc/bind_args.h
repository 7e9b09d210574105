// What every pybind11 binding file needs: integer addresses to typed pointers, the codebook
// and block-scale structs from their parts, a quantized weight (WeightRef) read once from the
// one tuple python/qengine/ops/weight.py builds, and a native status as a Python exception.
#pragma once
#include <pybind11/pybind11.h>

#include <cstdint>
#include <initializer_list>
#include <limits>
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

// A quantized weight as the kernels read it, parsed once from the tuple that
// python/qengine/ops/weight.py `native_weight` builds (addresses and sizes only, no torch):
//   (packed, packed_bytes, table, bits, blocksize, rule, scales, nscales, nested_table,
//    nested_absmax, nested_nabsmax, nested_blocksize, mean, mean_address, offsets, noffsets,
//    positions, positions_bytes)
// scales are float32 [nscales], or (nested_table != 0) uint8 codes [nscales] decoded with the
// dynamic-8 table float32 [256], absmax float32 [nested_nabsmax] and the mean (a value on the
// CPU, a float32 device address on CUDA). offsets: float32 [noffsets] when rule == 1, else 0.
// positions: the 2:4 layout's uint8 [positions_bytes], else 0.
struct WeightRef {
  addr packed = 0;
  int64_t packed_bytes = 0;
  addr table = 0;
  int bits = 0;
  int64_t blocksize = 0;
  int rule = 0;
  addr scales = 0;
  int64_t nscales = 0;
  addr nested_table = 0;
  addr nested_absmax = 0;
  int64_t nested_nabsmax = 0;
  int64_t nested_blocksize = 1;
  float mean = 0.0f;
  addr mean_address = 0;
  addr offsets = 0;
  int64_t noffsets = 0;
  addr positions = 0;
  int64_t positions_bytes = 0;

  Codebook codebook() const { return bind::codebook(table, 0, 0, bits, true); }
  // The block scales with the mean as a value (CPU); CUDA kernels read mean_address instead.
  BlockScales block_scales() const {
    return bind::block_scales(scales, nested_table, nested_absmax, nested_blocksize, mean);
  }
  // The scales as float32 values, for the ops that read no double-quantized codes (their callers
  // decode those first): a weight with uint8 scale codes is refused, not read as floats.
  const float* float_scales(const char* op) const {
    if (nested_table != 0) {
      throw pybind11::value_error(std::string("qengine: ") + op +
                                  " takes float32 block scales: decode the double-quantized scales first");
    }
    return ptr<const float>(scales);
  }
  const uint8_t* packed_ptr() const { return ptr<const uint8_t>(packed); }
  const float* offsets_ptr() const { return ptr<const float>(offsets); }
  const uint8_t* positions_ptr() const { return ptr<const uint8_t>(positions); }
};

constexpr size_t kWeightRefFields = 18;

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The most values a weight may count: weight_ref multiplies the count by its bits (up to 8).
constexpr int64_t kMaxWeightValues = std::numeric_limits<int64_t>::max() / 8;

// The product of a weight's dimensions (N * K, E * N * K), refused with ValueError where one is
// negative or the product passes kMaxWeightValues: a wrapped count would let weight_ref accept
// buffers shorter than what the kernel then reads.
inline int64_t element_count(std::initializer_list<int64_t> dims) {
  int64_t n = 1;
  for (const int64_t d : dims) {
    if (d < 0) throw pybind11::value_error("qengine: a weight dimension is negative");
    if (d != 0 && n > kMaxWeightValues / d) throw pybind11::value_error("qengine: the weight's element count overflows");
    n *= d;
  }
  return n;
}

// Reads the tuple once and checks that every buffer covers `stored` quantized values (the
// values from the weight's first; 2:4: the kept half): a kernel reading the weight never
// reads past a buffer, whatever the Python side passed.
inline WeightRef weight_ref(const pybind11::tuple& t, int64_t stored) {
  if (t.size() != kWeightRefFields) {
    throw pybind11::value_error("qengine: a weight is described by " + std::to_string(kWeightRefFields) +
                                " fields, got " + std::to_string(t.size()));
  }
  auto a = [&](size_t i) { return t[i].cast<addr>(); };
  auto i64 = [&](size_t i) { return t[i].cast<int64_t>(); };
  WeightRef w;
  w.packed = a(0);
  w.packed_bytes = i64(1);
  w.table = a(2);
  w.bits = t[3].cast<int>();
  w.blocksize = i64(4);
  w.rule = t[5].cast<int>();
  w.scales = a(6);
  w.nscales = i64(7);
  w.nested_table = a(8);
  w.nested_absmax = a(9);
  w.nested_nabsmax = i64(10);
  w.nested_blocksize = i64(11);
  w.mean = t[12].cast<float>();
  w.mean_address = a(13);
  w.offsets = a(14);
  w.noffsets = i64(15);
  w.positions = a(16);
  w.positions_bytes = i64(17);
  auto fail = [](const std::string& what) { throw pybind11::value_error("qengine: weight: " + what); };
  if (w.bits != 4 && w.bits != 8) fail("bits must be 4 or 8, got " + std::to_string(w.bits));
  if (w.blocksize < 1) fail("blocksize must be >= 1");
  if (w.rule != 0 && w.rule != 1) fail("rule must be 0 (absmax) or 1 (minmax)");
  if (stored < 0) fail("negative element count");
  if (stored > kMaxWeightValues) fail("element count too large");
  if (stored == 0) return w;
  if (w.packed == 0 || w.table == 0 || w.scales == 0) fail("packed, table and scales must be given");
  if (w.packed_bytes < ceil_div(stored * w.bits, 8)) fail("packed is shorter than the weight");
  const int64_t nblocks = ceil_div(stored, w.blocksize);
  if (w.nscales < nblocks) fail("scales has fewer entries than the weight has blocks");
  if (w.nested_table != 0) {
    if (w.nested_blocksize < 1) fail("nested blocksize must be >= 1");
    if (w.nested_absmax == 0 || w.nested_nabsmax < ceil_div(w.nscales, w.nested_blocksize)) {
      fail("nested absmax has fewer entries than the scale codes have nested blocks");
    }
  }
  if (w.rule == 1 && (w.offsets == 0 || w.noffsets < nblocks)) fail("offsets has fewer entries than blocks");
  if (w.positions != 0 && w.positions_bytes < ceil_div(stored, 4)) fail("positions is shorter than the weight");
  return w;
}

// weight_ref for W [N, K] (dense_count = N * K) in either layout: a 2:4 weight (positions given,
// field 16) stores half the values.
inline WeightRef weight_ref_any_layout(const pybind11::tuple& t, int64_t dense_count) {
  const bool sparse24 = t.size() == kWeightRefFields && t[16].cast<addr>() != 0;
  return weight_ref(t, sparse24 ? dense_count / 2 : dense_count);
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

// Runs a native call that returns a status with the GIL released (the call must not touch
// Python objects), then raises on a failed status; returns the status.
template <class Call>
int without_gil(Call&& call) {
  int status;
  {
    pybind11::gil_scoped_release release;
    status = call();
  }
  raise_on_error(status);
  return status;
}

}  // namespace qengine::bind
