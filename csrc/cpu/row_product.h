// A small-batch dequantize-matmul prepared once and computed by output-row ranges, so that a
// caller can spread the rows of several products (the experts of a MoE layer) over one
// parallel region. matmul_cpu is one RowProduct run over all its rows.
#pragma once
#include <cstdint>
#include <memory>
#include <vector>

#include "cpu/nested_scales.h"
#include "qengine/quant_math.h"

namespace qengine::cpu {

class RowProduct {
 public:
  // y[M, N] (float32, row stride N) = x[M, K] (x_dtype, row stride ldx) @ W^T for the quantized
  // W [N, K]. Copies x into the kernel's order now; the pointers must outlive run(). Arguments
  // are checked by the caller (see valid_product).
  RowProduct(const void* x, int x_dtype, int64_t M, int64_t K, int64_t ldx, int64_t N, const uint8_t* packed,
             int64_t blocksize, const Codebook& cb, int rule, const BlockScales& scales, const float* offsets,
             float* y);
  // Overwrites rows [n0, n1) of every row of y (columns n0..n1 of y's M rows).
  void run(int64_t n0, int64_t n1) const;
  // Output rows per thread below which splitting costs more than it saves.
  int64_t min_rows() const { return min_rows_; }

 private:
  enum class Path { kFusedFloat, kFusedBf16, kDecodeRows };
  Path path_;
  const void* x_;
  int x_dtype_;
  int64_t M_, K_, ldx_, N_;
  const uint8_t* packed_;
  int64_t blocksize_;
  Codebook cb_;
  int rule_;
  BlockScales scales_;
  const float* offsets_;
  float* y_;
  int64_t min_rows_;
  std::vector<float> xf_;       // fused float32 kernel: x in nibble order; decode path: x as float32 rows
  std::vector<uint16_t> xb_;    // fused bfloat16 kernel: x in pair order
  // Fused kernels with double-quantized scales on a VBMI CPU: run() decodes a row range's scales
  // in bulk (no gathers) and hands the kernels plain ones.
  std::unique_ptr<ScalePlanes> planes_;
};

// The checks matmul_cpu applies to its arguments.
bool valid_product(int x_dtype, int64_t M, int64_t K, int64_t ldx, int64_t N, int64_t blocksize, const Codebook& cb);

}  // namespace qengine::cpu
