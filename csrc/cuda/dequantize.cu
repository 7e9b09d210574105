// CUDA blockwise dequantization: one thread per output pair, the codebook in shared memory.
// Mirrors cpu/quantize/dequantize.cpp and uses the same decode_value, so the bytes match.
#include <cstdint>

#include "cuda/check.h"
#include "qengine/ops.h"

namespace qengine {
namespace {

constexpr int kThreads = 256;

__global__ void dequantize_kernel(const uint8_t* __restrict__ packed, int64_t n, int64_t blocksize,
                                  const float* __restrict__ table, int bits, int rule,
                                  const float* __restrict__ scales, const float* __restrict__ offsets,
                                  void* __restrict__ out, int out_dtype) {
  __shared__ float tbl[256];
  const int ncodes = 1 << bits;
  for (int i = threadIdx.x; i < ncodes; i += blockDim.x) tbl[i] = table[i];
  __syncthreads();
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < n; e += stride) {
    const int64_t b = e / blocksize;
    const uint8_t q = bits == 4 ? nibble_at(packed, e) : packed[e];
    const float offset = rule == kMinmax ? offsets[b] : 0.0f;
    store_from_float(out, out_dtype, e, decode_value(tbl[q], scales[b], offset, rule));
  }
}

}  // namespace

int dequantize_cuda(const uint8_t* packed, int64_t n, int64_t blocksize, const Codebook& cb, int rule,
                    const float* scales, const float* offsets, void* out, int out_dtype, void* stream) {
  if (n < 0 || blocksize < 1 || (cb.bits != 4 && cb.bits != 8)) return kInvalidArgument;
  if (n == 0) return kOk;
  int64_t blocks = (n + kThreads - 1) / kThreads;
  const int grid = static_cast<int>(blocks < 65535 * 8 ? blocks : 65535 * 8);
  dequantize_kernel<<<grid, kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
      packed, n, blocksize, cb.table, cb.bits, rule, scales, offsets, out, out_dtype);
  QE_CUDA_CHECK(cudaGetLastError());
  return kOk;
}

}  // namespace qengine
