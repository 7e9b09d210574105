// CPU dequantize-matmul for small batches (the GEMV regime): threads split the output rows;
// each weight row is decoded once into an L1-resident float32 buffer and dotted with every
// input row. The transposed product (backward for x) splits the columns instead.
#include <algorithm>
#include <vector>

#include "cpu/kernels.h"
#include "cpu/thread_pool.h"
#include "qengine/ops.h"
#include "qengine/status.h"

namespace qengine {
namespace {

// Decodes elements [first, first + count) of the quantized weight into w (float32).
void decode_span(const cpu::Kernels& k, const uint8_t* packed, int64_t first, int64_t count, int64_t blocksize,
                 const Codebook& cb, int rule, const BlockScales& scales, const float* offsets, float* w) {
  for (int64_t i = first; i < first + count;) {
    const int64_t b = i / blocksize;
    const int64_t end = std::min(first + count, (b + 1) * blocksize);
    const float offset = rule == kMinmax ? offsets[b] : 0.0f;
    k.decode(packed, i, end - i, cb, block_scale(scales, b), offset, rule, w + (i - first), kFloat32, false);
    i = end;
  }
}

bool valid(int64_t M, int64_t K, int64_t N, int64_t blocksize, const Codebook& cb) {
  return M >= 0 && K >= 0 && N >= 0 && blocksize >= 1 && (cb.bits == 4 || cb.bits == 8);
}

}  // namespace

int matmul_cpu(const float* x, int64_t M, int64_t K, int64_t ldx, int64_t N, const uint8_t* packed, int64_t blocksize,
               const Codebook& cb, int rule, const BlockScales& scales, const float* offsets, float* y) {
  if (!valid(M, K, N, blocksize, cb) || ldx < K) return kInvalidArgument;
  if (M == 0 || N == 0) return kOk;
  const cpu::Kernels& k = cpu::kernels();
  // Enough rows per thread that the decode of a row dominates the bookkeeping.
  const int64_t min_rows = std::max<int64_t>(1, 65536 / std::max<int64_t>(K, 1));
  const bool fused = k.gemv4 != nullptr && cb.bits == 4 && rule == kAbsmax && K % blocksize == 0 &&
                     blocksize % 32 == 0;
  if (fused) {
    cpu::parallel_for(0, N, min_rows, 1, [&](int64_t n0, int64_t n1) {
      for (int64_t m = 0; m < M; m += 4) {
        k.gemv4(x + m * ldx, std::min<int64_t>(4, M - m), K, ldx, packed, blocksize, cb.table, scales, n0, n1,
                y + m * N, N);
      }
    });
    return kOk;
  }
  cpu::parallel_for(0, N, min_rows, 1, [&](int64_t n0, int64_t n1) {
    std::vector<float> w(static_cast<size_t>(std::max<int64_t>(K, 1)));
    for (int64_t o = n0; o < n1; ++o) {
      decode_span(k, packed, o * K, K, blocksize, cb, rule, scales, offsets, w.data());
      k.dot_rows(x, M, K, ldx, w.data(), y + o, N);
    }
  });
  return kOk;
}

int matmul_t_cpu(const float* g, int64_t M, int64_t N, int64_t K, const uint8_t* packed, int64_t blocksize,
                 const Codebook& cb, int rule, const BlockScales& scales, const float* offsets, float* gx) {
  if (!valid(M, K, N, blocksize, cb)) return kInvalidArgument;
  if (M == 0 || K == 0) return kOk;
  std::fill(gx, gx + M * K, 0.0f);
  if (N == 0) return kOk;
  const cpu::Kernels& k = cpu::kernels();
  // Column ranges: no two threads write the same output element, no reduction needed.
  cpu::parallel_for(0, K, 256, 64, [&](int64_t k0, int64_t k1) {
    std::vector<float> w(static_cast<size_t>(k1 - k0));
    for (int64_t o = 0; o < N; ++o) {
      decode_span(k, packed, o * K + k0, k1 - k0, blocksize, cb, rule, scales, offsets, w.data());
      k.axpy_rows(g + o, M, N, w.data(), k1 - k0, gx + k0, K);
    }
  });
  return kOk;
}

}  // namespace qengine
