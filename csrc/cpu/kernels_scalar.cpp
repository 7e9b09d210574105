// Portable scalar kernels: the reference every SIMD variant must match byte for byte.
#include <cmath>
#include <limits>

#include "cpu/kernels.h"

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

void scalar_dot_rows(const float* x, int64_t M, int64_t K, int64_t ldx, const float* w, float* y, int64_t ldy) {
  for (int64_t m = 0; m < M; ++m) {
    const float* xm = x + m * ldx;
    float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};  // four chains, as the SIMD variants reassociate too
    int64_t k = 0;
    for (; k + 4 <= K; k += 4) {
      for (int j = 0; j < 4; ++j) acc[j] += xm[k + j] * w[k + j];
    }
    for (; k < K; ++k) acc[0] += xm[k] * w[k];
    y[m * ldy] = (acc[0] + acc[1]) + (acc[2] + acc[3]);
  }
}

void scalar_axpy_rows(const float* g, int64_t M, int64_t ldg, const float* w, int64_t K, float* acc, int64_t lda) {
  for (int64_t m = 0; m < M; ++m) {
    const float gm = g[m * ldg];
    float* am = acc + m * lda;
    for (int64_t k = 0; k < K; ++k) am[k] += gm * w[k];
  }
}

const Kernels kScalarKernels = {"scalar",        scalar_block_stats, scalar_encode,  scalar_decode,
                                nullptr,         scalar_dot_rows,    scalar_axpy_rows, nullptr,
                                nullptr,         nullptr,            scalar_adamw32,   scalar_adamw8};

}  // namespace qengine::cpu
