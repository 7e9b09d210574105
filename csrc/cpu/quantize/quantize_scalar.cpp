// Portable scalar quantize kernels: the reference every SIMD row must match byte for byte;
// and the choice of the active row.
#include <cmath>
#include <limits>

#include "cpu/quantize/kernels.h"

namespace qengine::cpu {

void scalar_block_stats(const void* x, int dtype, int64_t len, BlockStats* out) {
  float mn = std::numeric_limits<float>::infinity();
  float mx = -std::numeric_limits<float>::infinity();
  bool nonfinite = false;
  for (int64_t i = 0; i < len; ++i) {
    float v = load_as_float(x, dtype, i);
    nonfinite |= !std::isfinite(v);
    mn = v < mn ? v : mn;
    mx = v > mx ? v : mx;
  }
  out->min = mn;
  out->max = mx;
  out->absmax = std::fmax(std::fabs(mn), std::fabs(mx));
  out->nonfinite = nonfinite;
}

void scalar_encode(const void* x, int dtype, int64_t len, const BlockNorm& norm, int rule,
                   const Codebook& cb, uint8_t* codes) {
  for (int64_t i = 0; i < len; ++i) {
    codes[i] = encode_value(normalise(load_as_float(x, dtype, i), norm, rule), cb);
  }
}

void scalar_decode(const uint8_t* packed, int64_t first, int64_t len, const Codebook& cb,
                   float scale, float offset, int rule, void* out, int out_dtype, bool) {
  for (int64_t i = 0; i < len; ++i) {
    int64_t e = first + i;
    uint8_t q = cb.bits == 4 ? nibble_at(packed, e) : packed[e];
    store_from_float(out, out_dtype, i, decode_value(cb.table[q], scale, offset, rule));
  }
}

const QuantizeKernels kQuantizeScalar = {
    .block_stats = scalar_block_stats,
    .encode = scalar_encode,
    .decode = scalar_decode,
};

const QuantizeKernels& quantize_kernels() {
  static constexpr IsaRows<QuantizeKernels> kRows = {
      .scalar = &kQuantizeScalar, QENGINE_X86_ROWS(.avx2 = &kQuantizeAvx2, .avx512 = &kQuantizeAvx512)};
  return kRows.active();
}

}  // namespace qengine::cpu
