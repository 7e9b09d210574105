// AVX2 + FMA row of the gemv family: the dot and axpy tiles of the decode-then-multiply paths.
#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>

#include "cpu/common/simd_avx2.h"
#include "cpu/gemv/kernels.h"

namespace qengine::cpu {
namespace {

void dot_rows(const float* x, int64_t M, int64_t K, int64_t ldx, const float* w, float* y, int64_t ldy) {
  const int64_t K8 = K & ~int64_t{7};
  int64_t m = 0;
  for (; m + 4 <= M; m += 4) {  // four rows share each weight load
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
    const float* x0 = x + m * ldx;
    for (int64_t k = 0; k < K8; k += 8) {
      __m256 wv = _mm256_loadu_ps(w + k);
      a0 = _mm256_fmadd_ps(_mm256_loadu_ps(x0 + k), wv, a0);
      a1 = _mm256_fmadd_ps(_mm256_loadu_ps(x0 + ldx + k), wv, a1);
      a2 = _mm256_fmadd_ps(_mm256_loadu_ps(x0 + 2 * ldx + k), wv, a2);
      a3 = _mm256_fmadd_ps(_mm256_loadu_ps(x0 + 3 * ldx + k), wv, a3);
    }
    float r[4] = {hsum(a0), hsum(a1), hsum(a2), hsum(a3)};
    for (int j = 0; j < 4; ++j) {
      for (int64_t k = K8; k < K; ++k) r[j] += x0[j * ldx + k] * w[k];
      y[(m + j) * ldy] = r[j];
    }
  }
  for (; m < M; ++m) {
    const float* xm = x + m * ldx;
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 16 <= K8; k += 16) {
      a0 = _mm256_fmadd_ps(_mm256_loadu_ps(xm + k), _mm256_loadu_ps(w + k), a0);
      a1 = _mm256_fmadd_ps(_mm256_loadu_ps(xm + k + 8), _mm256_loadu_ps(w + k + 8), a1);
    }
    for (; k < K8; k += 8) a0 = _mm256_fmadd_ps(_mm256_loadu_ps(xm + k), _mm256_loadu_ps(w + k), a0);
    float r = hsum(_mm256_add_ps(a0, a1));
    for (k = K8; k < K; ++k) r += xm[k] * w[k];
    y[m * ldy] = r;
  }
}

void axpy_rows(const float* g, int64_t M, int64_t ldg, const float* w, int64_t K, float* acc, int64_t lda) {
  const int64_t K8 = K & ~int64_t{7};
  for (int64_t m = 0; m < M; ++m) {
    const float gm = g[m * ldg];
    const __m256 gv = _mm256_set1_ps(gm);
    float* am = acc + m * lda;
    for (int64_t k = 0; k < K8; k += 8) {
      _mm256_storeu_ps(am + k, _mm256_fmadd_ps(gv, _mm256_loadu_ps(w + k), _mm256_loadu_ps(am + k)));
    }
    for (int64_t k = K8; k < K; ++k) am[k] += gm * w[k];
  }
}

}  // namespace

const GemvKernels kGemvAvx2 = {
    .dot_rows = dot_rows,
    .axpy_rows = axpy_rows,
};

}  // namespace qengine::cpu
#endif
