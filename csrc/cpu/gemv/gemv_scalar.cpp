// Portable scalar gemv kernels (the reference the SIMD rows match within rounding) and the
// choice of the active row.
#include "cpu/gemv/kernels.h"

namespace qengine::cpu {
namespace {

void dot_rows(const float* x, int64_t M, int64_t K, int64_t ldx, const float* w, float* y, int64_t ldy) {
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

void axpy_rows(const float* g, int64_t M, int64_t ldg, const float* w, int64_t K, float* acc, int64_t lda) {
  for (int64_t m = 0; m < M; ++m) {
    const float gm = g[m * ldg];
    float* am = acc + m * lda;
    for (int64_t k = 0; k < K; ++k) am[k] += gm * w[k];
  }
}

}  // namespace

const GemvKernels kGemvScalar = {
    .dot_rows = dot_rows,
    .axpy_rows = axpy_rows,
};

const GemvKernels& gemv_kernels() {
  static constexpr IsaRows<GemvKernels> kRows = {
      .scalar = &kGemvScalar,
      // amx: the avx512 row, whose float32 GEMV (bfloat16 x widened once) measured 1.2-1.4x
      // faster than the vdpbf16ps one on a Sapphire Rapids core for bfloat16 x of 1-3 rows
      // (11008x4096 NF4, batch 1: 1.12-1.14 against 1.42-2.0 ms; bench/RESULTS.md).
      QENGINE_X86_ROWS(.avx2 = &kGemvAvx2, .avx512 = &kGemvAvx512, .avx512_bf16 = &kGemvAvx512Bf16,
                       .amx = &kGemvAvx512)};
  return kRows.active();
}

}  // namespace qengine::cpu
